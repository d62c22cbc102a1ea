//! The redb store: lock, chunks, compaction, sync states.

mod common;

use errand_core::DeviceKind;
use errand_crdt::{NewTask, Store, StoreError, ThreadDoc, TrustedPeer};

#[test]
fn a_second_open_of_a_home_names_the_home() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Store::open(dir.path()).unwrap();
    match Store::open(dir.path()) {
        Err(e @ StoreError::Locked(_)) => {
            assert!(e.to_string().contains(&dir.path().display().to_string()))
        }
        other => panic!("expected Locked, got {other:?}"),
    }
}

#[test]
fn reopen_after_compaction_equals_reopen_before() {
    let dir = tempfile::tempdir().unwrap();
    let w = common::world(1);
    let meta_id = w.genesis.doc_id();
    let seg_id = w.genesis.segment_doc_id(1);
    {
        let store = Store::open(dir.path()).unwrap();
        let mut doc = w.desktop();
        let first = doc.part_mut(0).unwrap().save();
        store.write(|t| t.append_chunk(&meta_id, &first)).unwrap();
        for i in 0..1000 {
            let task = NewTask {
                instruction: format!("task {i} {}", "x".repeat(200)),
                executor: "shell".into(),
                target: w.ids[0].clone(),
                not_after: None,
                attachments: Vec::new(),
            };
            doc.enqueue_task(&task, 1_000 + i).unwrap();
            let chunk = doc.part_mut(1).unwrap().save_incremental();
            store.write(|t| t.append_chunk(&seg_id, &chunk)).unwrap();
        }
        assert!(store.needs_compaction(&seg_id).unwrap());
    }
    let open = |store: &Store| {
        let meta = store.load_doc(&meta_id).unwrap();
        let seg = store.load_doc(&seg_id).unwrap();
        let mut doc = ThreadDoc::load(meta.parts(), &w.genesis, w.actors[0].clone()).unwrap();
        doc.attach_segment(1, seg.parts()).unwrap();
        doc
    };
    let store = Store::open(dir.path()).unwrap();
    let mut before = open(&store);
    let snapshot = before.part_mut(1).unwrap().save();
    store
        .write(|t| t.replace_snapshot(&seg_id, &snapshot))
        .unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let loaded = store.load_doc(&seg_id).unwrap();
    assert!(loaded.chunks.is_empty() && loaded.snapshot.is_some());
    assert!(!store.needs_compaction(&seg_id).unwrap());
    let mut after = open(&store);
    assert_eq!(before.heads(), after.heads());
    assert_eq!(before.tasks(), after.tasks());
    assert_eq!(after.tasks().len(), 1000);
    assert_eq!(after.part(1).unwrap().changes(), 1001);

    // Loaded from the snapshot, the next stored chunk holds only the new change, and the
    // snapshot plus that chunk reload to the same document.
    let task = NewTask {
        instruction: "one more".into(),
        executor: "shell".into(),
        target: w.ids[0].clone(),
        not_after: None,
        attachments: Vec::new(),
    };
    after.enqueue_task(&task, 5_000).unwrap();
    let chunk = after.part_mut(1).unwrap().save_incremental();
    assert!(
        !chunk.is_empty() && chunk.len() < 1_000,
        "{} bytes",
        chunk.len()
    );
    assert!(after.part_mut(1).unwrap().save_incremental().is_empty());
    store.write(|t| t.append_chunk(&seg_id, &chunk)).unwrap();
    let mut again = open(&store);
    assert_eq!(again.heads(), after.heads());
    assert_eq!(again.tasks().len(), 1001);
}

#[test]
fn meta_sync_states_and_trusted_peers_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let w = common::world(1);
    let doc_id = w.genesis.doc_id();
    let peer = TrustedPeer {
        id: w.ids[1].clone(),
        name: "phone".into(),
        kind: DeviceKind::Phone,
        addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
        paired_at: 5,
        last_seen: None,
        last_sync_at: None,
        revoked: false,
    };
    {
        let store = Store::open(dir.path()).unwrap();
        store
            .write(|t| {
                t.put_meta("actor", b"abc")?;
                t.put_sync_state(&doc_id, peer.id.as_str(), b"state")?;
                t.put_trusted(&peer)
            })
            .unwrap();
        // A failed transaction keeps nothing.
        let r: Result<(), StoreError> = store.write(|t| {
            t.put_meta("actor", b"changed")?;
            Err(StoreError::Corrupt {
                what: "test".into(),
                why: "abort".into(),
            })
        });
        assert!(r.is_err());
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.meta("actor").unwrap().unwrap(), b"abc");
    assert_eq!(
        store
            .sync_state(&doc_id, peer.id.as_str())
            .unwrap()
            .unwrap(),
        b"state"
    );
    assert_eq!(store.trusted_peers().unwrap(), vec![peer]);
}

#[test]
fn a_file_left_mostly_free_shrinks_when_opened_again_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(errand_crdt::store::STORE_FILE);
    let doc = errand_crdt::DocId::parse("thread:01M95QGHBQ3XMTTA3E6XR810EC").unwrap();
    let other = errand_crdt::DocId::parse("thread:01M95QGHBQ3XMTTA3E6XR810EC/1").unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        // 4 MB of chunks, another document's after them (so the free pages are not at the
        // file's end, which redb trims by itself), then a small snapshot in their place.
        for i in 0..64u8 {
            store
                .write(|t| t.append_chunk(&doc, &vec![i; 64 * 1024]))
                .unwrap();
        }
        store
            .write(|t| t.append_chunk(&other, &vec![1; 64 * 1024]))
            .unwrap();
        store
            .write(|t| t.replace_snapshot(&doc, b"the snapshot"))
            .unwrap();
    }
    let before = std::fs::metadata(&file).unwrap().len();
    let store = Store::open(dir.path()).unwrap();
    let after = std::fs::metadata(&file).unwrap().len();
    assert!(
        after * 4 < before,
        "the file stayed at {after} bytes (was {before})"
    );
    let loaded = store.load_doc(&doc).unwrap();
    assert_eq!(loaded.snapshot.as_deref(), Some(&b"the snapshot"[..]));
    assert!(loaded.chunks.is_empty());
    assert_eq!(
        store.load_doc(&other).unwrap().chunks,
        vec![vec![1; 64 * 1024]]
    );
}
