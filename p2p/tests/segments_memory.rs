//! What a replica holds in memory on a long thread: the meta document, the newest segment and
//! segments with unfinished tasks; older segments load on demand and are released after.

use errand_core::{EventKind, TaskId, ThreadId};
use errand_crdt::{NewTask, Store, ThreadDoc, ThreadGenesis};
use errand_p2p::replica::{Replica, ReplicaError};

const LIMIT: usize = 12;

fn loaded(r: &Replica) -> Vec<u32> {
    r.documents()
        .into_iter()
        .filter(|(_, loaded, _)| *loaded)
        .map(|(n, _, _)| n)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_newest_and_unfinished_segments_stay_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::open(Store::open(dir.path()).unwrap()).unwrap();
    let owner: errand_core::DeviceId = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id()
        .to_base58()
        .parse()
        .unwrap();
    replica
        .create_thread(ThreadGenesis {
            thread_id: ThreadId::new_at(1_700_000_000_000),
            owner: owner.clone(),
            owner_actor: replica.actor().to_hex_string(),
        })
        .unwrap();
    replica.set_segment_limit(LIMIT);
    let mut ids: Vec<TaskId> = Vec::new();
    for i in 0..40 {
        let target = owner.clone();
        let (id, _) = replica
            .commit(move |d| {
                d.enqueue_task(
                    &NewTask {
                        instruction: format!("task {i}"),
                        executor: "shell".into(),
                        target,
                        not_after: None,
                        attachments: Vec::new(),
                    },
                    1_700_000_000_000 + i,
                )
            })
            .await
            .unwrap();
        ids.push(id);
    }
    let keep_open = ids[3];
    let keep_seg = replica
        .read(move |d| d.task_segment(&keep_open))
        .await
        .unwrap()
        .unwrap();
    // Finish every task but one.
    for (k, id) in ids.iter().enumerate() {
        if *id == keep_open {
            continue;
        }
        replica.ensure_task_loaded(*id).await.unwrap();
        let id = *id;
        replica
            .commit(move |d| {
                d.append_task_event(
                    id,
                    1,
                    &EventKind::Finished { exit_code: 0 },
                    1_800_000_000_000 + k as i64,
                )
            })
            .await
            .unwrap();
    }
    let all: Vec<u32> = replica.documents().iter().map(|(n, _, _)| *n).collect();
    let newest = *all.last().unwrap();
    assert!(newest >= 4, "40 tasks rolled over several times: {all:?}");
    assert!(keep_seg < newest);

    // A restart holds the meta document, the newest segment and the unfinished task's.
    replica.reload().unwrap();
    assert_eq!(loaded(&replica), vec![0, keep_seg, newest]);
    let visible = replica.read(|d| d.tasks().len()).await.unwrap();
    assert!(
        visible < 40,
        "old finished segments are not read by default"
    );

    // A page back through history loads what it needs and releases it.
    let page = replica.tasks_before(None, 5).await.unwrap();
    assert_eq!(page.iter().map(|t| t.id).collect::<Vec<_>>(), {
        let mut newest5: Vec<TaskId> = ids.iter().rev().take(5).copied().collect();
        newest5.sort_by_key(|t| std::cmp::Reverse(*t));
        newest5
    });
    let older = replica.tasks_before(Some(ids[10]), 100).await.unwrap();
    assert_eq!(older.len(), 10);
    assert_eq!(loaded(&replica), vec![0, keep_seg, newest]);

    // The whole thread, on demand.
    let every = replica.read_all(|d| d.tasks().len()).await.unwrap();
    assert_eq!(every, 40);
    assert_eq!(loaded(&replica), vec![0, keep_seg, newest]);

    // A request on an old finished task loads its segment.
    let old = ids[0];
    replica.ensure_task_loaded(old).await.unwrap();
    assert!(loaded(&replica).contains(&1), "{:?}", loaded(&replica));
    assert!(replica.read(move |d| d.task(&old)).await.unwrap().is_some());
}

/// A task from a device the desktop bound no actor to is refused at ingest: nothing of it is
/// stored, and the index of unfinished tasks (which the runner starts from) is unchanged,
/// also after a reload from disk. (Before actors were checked at ingest, such a task was
/// stored and counted as unfinished until its author's record arrived; no honest peer can
/// send one any more, since the desktop writes every record itself when it pairs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_from_a_device_without_a_bound_actor_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::open(Store::open(dir.path()).unwrap()).unwrap();
    let owner: errand_core::DeviceId = libp2p::PeerId::random().to_base58().parse().unwrap();
    let genesis = ThreadGenesis {
        thread_id: ThreadId::new_at(1_700_000_000_000),
        owner: owner.clone(),
        owner_actor: replica.actor().to_hex_string(),
    };
    replica.create_thread(genesis.clone()).unwrap();
    let task = |text: &str| NewTask {
        instruction: text.into(),
        executor: "shell".into(),
        target: owner.clone(),
        not_after: None,
        attachments: Vec::new(),
    };
    let mine = task("the desktop's own");
    let (own, _) = replica
        .commit(move |d| d.enqueue_task(&mine, 1_700_000_000_001))
        .await
        .unwrap();

    // A phone the desktop holds no device record for.
    let mut phone = ThreadDoc::create(&genesis, automerge::ActorId::random());
    let id = phone
        .enqueue_task(&task("from an unknown phone"), 1_700_000_000_002)
        .unwrap();
    let n = phone.task_segment(&id).unwrap();
    let part = phone.part_mut(n).unwrap();
    let heads = part.heads();
    let bytes: Vec<u8> = part
        .take_local_changes()
        .iter()
        .flat_map(|c| c.raw_bytes().to_vec())
        .collect();
    let refused = replica
        .receive_changes(
            libp2p::PeerId::random(),
            genesis.segment_doc_id(n),
            heads,
            bytes,
        )
        .await
        .expect_err("refused");
    assert!(matches!(
        refused,
        ReplicaError::Refused(errand_crdt::IngestError::ForeignActor { .. })
    ));

    assert!(replica.read(move |d| d.task(&id)).await.unwrap().is_none());
    let open = replica.open_tasks().await.unwrap();
    assert_eq!(open, [own].into_iter().collect());
    replica.reload().unwrap();
    assert_eq!(replica.open_tasks().await.unwrap(), open);
}
