//! Attachments on tasks and `artifact` facts: written by the right device, read with the
//! same checks as other task fields, and never holding a name that is a path.

mod common;

use automerge::{AutoCommit, ObjType, ROOT, ReadDoc, transaction::Transactable};
use common::{ThreadSync, sync_pair, world};
use errand_core::{BlobHash, BlobRef, EventKind, blob::MAX_ATTACHMENTS, fold};
use errand_crdt::{NewTask, WriteError};

fn file(n: u8, name: &str) -> BlobRef {
    BlobRef {
        hash: BlobHash::from_bytes([n; 32]),
        name: name.into(),
        size: 1 << 40,
        mime: "application/octet-stream".into(),
    }
}

#[test]
fn attachments_and_artifacts_reach_the_other_side_as_written() {
    let w = world(1);
    let mut desktop = w.desktop();
    let mut phone = w.replica(1);
    let (mut sd, mut sp) = (ThreadSync::new(), ThreadSync::new());
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);

    let attachments = vec![file(1, "photo.jpg"), file(2, "notes.txt")];
    let id = phone
        .enqueue_task(
            &NewTask {
                instruction: "look at these".into(),
                executor: "shell".into(),
                target: w.ids[0].clone(),
                not_after: None,
                attachments: attachments.clone(),
            },
            100,
        )
        .unwrap();
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);
    let t = desktop.task(&id).unwrap();
    assert_eq!(t.attachments, attachments);

    let out = file(3, "result.csv");
    desktop
        .append_task_event(id, 1, &EventKind::Artifact { file: out.clone() }, 101)
        .unwrap();
    // A phone's artifact is not a fact: it is written but never counts.
    phone
        .append_task_event(id, 1, &EventKind::Artifact { file: file(4, "x") }, 102)
        .unwrap();
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);
    for replica in [&desktop, &phone] {
        let v = fold(&replica.task(&id).unwrap());
        assert_eq!(v.artifacts, vec![out.clone()]);
    }
}

#[test]
fn writes_refuse_unsafe_names_and_too_many_attachments() {
    let w = world(1);
    let mut phone = w.replica(1);
    let task = |attachments: Vec<BlobRef>| NewTask {
        instruction: "x".into(),
        executor: "shell".into(),
        target: w.ids[0].clone(),
        not_after: None,
        attachments,
    };
    assert!(matches!(
        phone.enqueue_task(&task(vec![file(1, "../../x")]), 1),
        Err(WriteError::Blob(_))
    ));
    let many = (0..=MAX_ATTACHMENTS).map(|i| file(i as u8, "a")).collect();
    assert!(matches!(
        phone.enqueue_task(&task(many), 1),
        Err(WriteError::TooLong { .. })
    ));
}

#[test]
fn an_attachment_named_by_a_path_reads_as_its_last_name_and_a_bad_hash_is_skipped() {
    let w = world(1);
    let mut desktop = w.desktop();
    let mut phone = w.replica(1);
    let (mut sd, mut sp) = (ThreadSync::new(), ThreadSync::new());
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);
    let id = phone
        .enqueue_task(
            &NewTask {
                instruction: "honest".into(),
                executor: "shell".into(),
                target: w.ids[0].clone(),
                not_after: None,
                attachments: vec![file(1, "a.txt")],
            },
            100,
        )
        .unwrap();

    // The phone turns hostile: raw writes with its own actor, a task whose attachment is named
    // `../../x` (read as `x`: a name is never a path), and one whose hash is not 64 hex
    // characters (skipped as malformed). The third, written the same way but well-formed, shows
    // the raw writes are otherwise readable.
    let raw: &mut AutoCommit = phone.part_mut(1).unwrap().automerge();
    let tasks = raw.get(ROOT, "tasks").unwrap().unwrap().1;
    for (key, name, hash) in [
        ("01ARZ3NDEKTSV4RRFFQ69G5FAV", "../../x", "ab".repeat(32)),
        ("01ARZ3NDEKTSV4RRFFQ69G5FAW", "ok.txt", "zz".repeat(32)),
        ("01ARZ3NDEKTSV4RRFFQ69G5FAX", "ok.txt", "cd".repeat(32)),
    ] {
        let t = raw.put_object(&tasks, key, ObjType::Map).unwrap();
        raw.put(&t, "id", key).unwrap();
        raw.put(&t, "instruction", "hostile").unwrap();
        raw.put(&t, "executor", "shell").unwrap();
        raw.put(&t, "target", w.ids[0].as_str()).unwrap();
        raw.put(&t, "created_at", 5).unwrap();
        raw.put_object(&t, "events", ObjType::List).unwrap();
        let list = raw.put_object(&t, "attachments", ObjType::List).unwrap();
        let m = raw.insert_object(&list, 0, ObjType::Map).unwrap();
        raw.put(&m, "hash", hash.as_str()).unwrap();
        raw.put(&m, "name", name).unwrap();
        raw.put(&m, "size", 3u64).unwrap();
        raw.put(&m, "mime", "text/plain").unwrap();
    }
    raw.commit();
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);
    let tasks = desktop.tasks();
    let seen: Vec<_> = tasks.iter().map(|t| t.id).collect();
    let control = "01ARZ3NDEKTSV4RRFFQ69G5FAX".parse().unwrap();
    let pathy = "01ARZ3NDEKTSV4RRFFQ69G5FAV".parse().unwrap();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.contains(&id) && seen.contains(&control) && seen.contains(&pathy));
    let pathy = tasks.iter().find(|t| t.id == pathy).unwrap();
    let names: Vec<&str> = pathy.attachments.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["x"]);
}
