//! A peer's document content is untrusted: garbage written through raw Automerge calls and
//! synced in must not hide real tasks, forge facts, or panic.

mod common;

use automerge::{AutoCommit, ObjType, ROOT, ReadDoc, transaction::Transactable};
use common::{ThreadSync, sync_pair, world};
use errand_core::{EventKind, TaskStatus, fold};
use errand_crdt::{NewTask, TaskTouch, Touched};

#[test]
fn garbage_from_a_peer_is_skipped_and_real_tasks_stay_visible() {
    let w = world(1);
    let mut desktop = w.desktop();
    let mut phone = w.replica(1);
    let (mut sd, mut sp) = (ThreadSync::new(), ThreadSync::new());
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);

    let task = |s: &str| NewTask {
        instruction: s.into(),
        executor: "shell".into(),
        target: w.ids[0].clone(),
        not_after: None,
        attachments: Vec::new(),
    };
    let real = phone.enqueue_task(&task("real work"), 100).unwrap();
    let acted = phone.enqueue_task(&task("second"), 101).unwrap();
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);
    desktop
        .append_task_event(acted, 1, &EventKind::Delivered, 102)
        .unwrap();
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);

    // The phone's replica turns hostile: raw Automerge writes with the phone's own actor, in
    // the segment that holds the tasks and in the meta document.
    assert_eq!(phone.task_segment(&real), Some(1));
    let raw: &mut AutoCommit = phone.part_mut(1).unwrap().automerge();
    let tasks = match raw.get(ROOT, "tasks").unwrap() {
        Some((_, id)) => id,
        None => panic!("tasks root missing"),
    };
    // Wrong types and shapes inside the tasks map.
    raw.put(&tasks, "01ARZ3NDEKTSV4RRFFQ69G5FAV", 42).unwrap();
    let list_task = raw
        .put_object(&tasks, "01ARZ3NDEKTSV4RRFFQ69G5FAW", ObjType::List)
        .unwrap();
    raw.insert(&list_task, 0, "x").unwrap();
    raw.put(&tasks, "not-a-task-id", "junk").unwrap();
    // A task with a missing field and one with a 10 MB instruction.
    let partial = raw
        .put_object(&tasks, "01ARZ3NDEKTSV4RRFFQ69G5FAX", ObjType::Map)
        .unwrap();
    raw.put(&partial, "id", "01ARZ3NDEKTSV4RRFFQ69G5FAX")
        .unwrap();
    let huge = raw
        .put_object(&tasks, "01ARZ3NDEKTSV4RRFFQ69G5FAY", ObjType::Map)
        .unwrap();
    raw.put(&huge, "id", "01ARZ3NDEKTSV4RRFFQ69G5FAY").unwrap();
    raw.put(&huge, "instruction", "a".repeat(10 * 1024 * 1024))
        .unwrap();
    raw.put(&huge, "executor", "shell").unwrap();
    raw.put(&huge, "target", w.ids[0].as_str()).unwrap();
    raw.put(&huge, "created_at", 5).unwrap();
    raw.put_object(&huge, "events", ObjType::List).unwrap();
    // Events on the real task: an unknown kind, a wrong type, and a forged `finished` fact.
    let real_obj = match raw.get(&tasks, real.to_string()).unwrap() {
        Some((_, id)) => id,
        None => panic!("real task missing"),
    };
    let events = match raw.get(&real_obj, "events").unwrap() {
        Some((_, id)) => id,
        None => panic!("events missing"),
    };
    let ev = raw.insert_object(&events, 0, ObjType::Map).unwrap();
    raw.put(&ev, "kind", "explode").unwrap();
    raw.put(&ev, "at", 1).unwrap();
    raw.put(&ev, "attempt", 1).unwrap();
    raw.insert(&events, 1, "not a map").unwrap();
    let forged = raw.insert_object(&events, 2, ObjType::Map).unwrap();
    raw.put(&forged, "kind", "finished").unwrap();
    raw.put(&forged, "exit_code", 0).unwrap();
    raw.put(&forged, "at", 2).unwrap();
    raw.put(&forged, "attempt", 1).unwrap();
    raw.put(&forged, "author", w.ids[0].as_str()).unwrap(); // a field that claims authorship
    // A new map over ROOT.tasks that would hide every task if reads went through the root
    // key, in the segment and in the meta document; a list where the devices map belongs.
    raw.put_object(ROOT, "tasks", ObjType::Map).unwrap();
    raw.put_object(ROOT, "messages", ObjType::Text).unwrap();
    raw.put(ROOT, "segment", "zero").unwrap();
    raw.commit();
    let meta: &mut AutoCommit = phone.part_mut(0).unwrap().automerge();
    meta.put_object(ROOT, "devices", ObjType::List).unwrap();
    meta.put_object(ROOT, "tasks", ObjType::Map).unwrap();
    meta.put_object(ROOT, "messages", ObjType::Text).unwrap();
    meta.put(ROOT, "thread_id", 7).unwrap();
    meta.commit();

    let mut hostile = phone;
    let mut sh = ThreadSync::new();
    let mut sd2 = ThreadSync::new();
    sync_pair(&mut desktop, &mut sd2, &mut hostile, &mut sh);

    let tasks = desktop.tasks();
    let ids: Vec<_> = tasks.iter().map(|t| t.id).collect();
    assert_eq!(
        ids,
        vec![real, acted],
        "exactly the well-formed tasks are visible"
    );
    let real_task = desktop.task(&real).unwrap();
    assert_eq!(
        fold(&real_task).status,
        TaskStatus::Queued,
        "the forged finished fact is ignored"
    );
    assert_eq!(
        fold(&desktop.task(&acted).unwrap()).status,
        TaskStatus::Delivered
    );
    assert!(desktop.skipped_total() > 0, "skips are counted");
    assert_eq!(desktop.genesis(), &w.genesis);
    assert_eq!(desktop.devices().len(), 2);

    // The desktop keeps working on top of the garbage.
    desktop
        .append_task_event(real, 1, &EventKind::Delivered, 200)
        .unwrap();
    assert_eq!(
        fold(&desktop.task(&real).unwrap()).status,
        TaskStatus::Delivered
    );
}

#[test]
fn a_garbage_sync_message_is_an_error_not_a_panic() {
    let w = world(1);
    let mut desktop = w.desktop();
    let mut s = ThreadSync::new();
    let id = w.genesis.doc_id();
    for bytes in [&b""[..], b"\x42", b"\x42\x00\x00\x00garbage", &[0xff; 64]] {
        assert!(s.receive(&mut desktop, &id, bytes).is_err());
    }
    // A document that is not part of this thread, or a segment far ahead.
    let other = errand_crdt::DocId::parse("someone-else").unwrap();
    assert!(s.receive(&mut desktop, &other, b"\x42").is_err());
    let far = w.genesis.segment_doc_id(1000);
    assert!(s.receive(&mut desktop, &far, b"\x42").is_err());
    assert_eq!(desktop.devices().len(), 2);
}

#[test]
fn new_tasks_are_reported_after_a_peer_overwrites_the_root_keys() {
    let w = world(1);
    let mut desktop = w.desktop();
    let mut phone = w.replica(1);
    let (mut sd, mut sp) = (ThreadSync::new(), ThreadSync::new());
    let task = |s: &str| NewTask {
        instruction: s.into(),
        executor: "shell".into(),
        target: w.ids[0].clone(),
        not_after: None,
        attachments: Vec::new(),
    };
    phone.enqueue_task(&task("first"), 10).unwrap();
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);
    // The phone hides the segment's tasks map and messages list behind new root values.
    let raw: &mut AutoCommit = phone.part_mut(1).unwrap().automerge();
    raw.put_object(ROOT, "tasks", ObjType::Map).unwrap();
    raw.put(ROOT, "messages", "gone").unwrap();
    raw.commit();
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);
    // The tasks a batch of changes touched are found from their ops and each object's
    // parents, which do not depend on the hidden root key: a new task, then its events.
    let part = |d: &mut errand_crdt::ThreadDoc| d.part_mut(1).unwrap().take_local_changes();
    part(&mut desktop);
    let id = desktop.enqueue_task(&task("second"), 20).unwrap();
    let touched = Touched::of(&part(&mut desktop));
    assert_eq!(
        desktop
            .tasks_touched(1, &touched)
            .into_iter()
            .collect::<Vec<_>>(),
        vec![(id, TaskTouch::Created)]
    );
    // Events that cannot end the task leave its row in the unfinished-task index alone.
    desktop
        .append_task_event(id, 1, &EventKind::Delivered, 21)
        .unwrap();
    desktop
        .append_task_event(id, 1, &EventKind::Output { text: "x".into() }, 22)
        .unwrap();
    let touched = Touched::of(&part(&mut desktop));
    assert_eq!(
        desktop
            .tasks_touched(1, &touched)
            .into_iter()
            .collect::<Vec<_>>(),
        vec![(id, TaskTouch::Content)]
    );
    assert_eq!(
        desktop.unfinished_rows(1, &desktop.tasks_touched(1, &touched)),
        vec![]
    );
    // A terminal fact makes the index read the task.
    desktop
        .append_task_event(id, 1, &EventKind::Finished { exit_code: 0 }, 23)
        .unwrap();
    let touched = Touched::of(&part(&mut desktop));
    assert_eq!(
        desktop
            .tasks_touched(1, &touched)
            .into_iter()
            .collect::<Vec<_>>(),
        vec![(id, TaskTouch::Status)]
    );
    assert_eq!(
        desktop.unfinished_rows(1, &desktop.tasks_touched(1, &touched)),
        vec![(id, false)]
    );
    // So does a retry (here the desktop's own, which does not count: the task stays done).
    desktop
        .append_task_event(id, 1, &EventKind::Retried, 24)
        .unwrap();
    let touched = Touched::of(&part(&mut desktop));
    assert_eq!(
        desktop.unfinished_rows(1, &desktop.tasks_touched(1, &touched)),
        vec![(id, false)]
    );
    // The same from the phone's side, on changes it merged.
    assert_eq!(desktop.tasks().len(), 2);
}
