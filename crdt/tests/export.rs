//! Export and import of a whole thread: each exported document loads alone, and a thread
//! imported into an empty store reads the same, with the same task indexes.

mod common;

use common::world;
use errand_core::EventKind;
use errand_crdt::{
    MemoryImage, NewTask, Store,
    engine::{Engine, EngineConfig, META_ACTOR, TransferError, check_document},
};

/// An owner desktop's engine in memory, rolling over every `limit` changes.
fn desktop_engine(w: &common::World, limit: usize) -> Engine {
    let store = Store::in_memory(&MemoryImage::new()).unwrap();
    store
        .write(|t| t.put_meta(META_ACTOR, w.actors[0].to_bytes()))
        .unwrap();
    let mut e = Engine::open(store, EngineConfig::default()).unwrap();
    e.create_thread(w.genesis.clone()).unwrap();
    e.set_segment_limit(limit);
    e
}

#[test]
fn an_exported_thread_imports_into_an_empty_store_with_the_same_tasks_and_indexes() {
    let w = world(1);
    let mut e = desktop_engine(&w, 12);
    let mut ids = Vec::new();
    for i in 0..40 {
        let (id, _) = e
            .commit(|d| {
                d.enqueue_task(
                    &NewTask {
                        instruction: format!("task {i}"),
                        executor: "shell".into(),
                        target: w.ids[0].clone(),
                        not_after: None,
                        attachments: Vec::new(),
                    },
                    1_000 + i,
                )
            })
            .unwrap();
        ids.push(id);
    }
    // Half of them finish; the others stay unfinished.
    for id in ids.iter().step_by(2) {
        e.ensure_task_loaded(*id).unwrap();
        e.commit(|d| {
            d.append_task_event(*id, 1, &EventKind::Started, 2_000)?;
            d.append_task_event(*id, 1, &EventKind::Finished { exit_code: 0 }, 2_001)
        })
        .unwrap();
    }
    let (docs, tasks) = e.export(|d| d.tasks()).unwrap();
    assert!(docs.len() >= 4, "several segments: {}", docs.len());
    assert_eq!(tasks.len(), 40);
    for d in &docs {
        check_document(&w.genesis, d.part, &d.bytes, &d.heads).unwrap();
        // A file is checked against its own place: segment 1 is not segment 2.
        if d.part == 1 {
            assert!(matches!(
                check_document(&w.genesis, 2, &d.bytes, &d.heads),
                Err(TransferError::Genesis { .. })
            ));
        }
    }
    // A truncated document is refused.
    let d = &docs[1];
    assert!(check_document(&w.genesis, d.part, &d.bytes[..d.bytes.len() / 2], &d.heads).is_err());

    let parts: Vec<(u32, &[u8])> = docs.iter().map(|d| (d.part, d.bytes.as_slice())).collect();
    let store = Store::in_memory(&MemoryImage::new()).unwrap();
    let mut imported = Engine::import(store, EngineConfig::default(), &w.genesis, &parts).unwrap();
    assert!(imported.doc().unwrap().owns_thread());
    assert_eq!(imported.open_tasks(), e.open_tasks());
    assert_eq!(imported.open_tasks().len(), 20);
    let again = imported.read_all(|d| d.tasks()).unwrap();
    assert_eq!(again, tasks);
    assert_eq!(imported.digests(), e.digests());
    // An old task's segment is found through the task index.
    imported.ensure_task_loaded(ids[0]).unwrap();

    // A store that holds a thread is never written over.
    let image = MemoryImage::new();
    let s = Store::in_memory(&image).unwrap();
    let mut taken = Engine::open(s, EngineConfig::default()).unwrap();
    taken.create_thread(w.genesis.clone()).unwrap();
    drop(taken);
    let s = Store::in_memory(&image).unwrap();
    assert!(matches!(
        Engine::import(s, EngineConfig::default(), &w.genesis, &parts),
        Err(TransferError::NotEmpty(_))
    ));
}
