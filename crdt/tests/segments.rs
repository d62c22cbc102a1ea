//! Segmented threads: rollovers that happen apart, facts that stay in their task's segment,
//! and document ids.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{ThreadSync, sync_pair, world};
use errand_core::{EventKind, TaskId, TaskStatus, fold};
use errand_crdt::{DocId, NewTask, ThreadDoc};
use proptest::prelude::*;

/// Small enough that a few dozen tasks roll over several times.
const LIMIT: usize = 12;

fn task(w: &common::World, what: String) -> NewTask {
    NewTask {
        instruction: what,
        executor: "shell".into(),
        target: w.ids[0].clone(),
        not_after: None,
        attachments: Vec::new(),
    }
}

/// How many parts hold each task id.
fn occurrences(doc: &ThreadDoc) -> BTreeMap<TaskId, usize> {
    let mut out = BTreeMap::new();
    for n in doc.loaded() {
        for t in doc.tasks_in(n) {
            *out.entry(t.id).or_default() += 1;
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Op {
    /// Replica 0 (desktop) or 1 (phone) enqueues a task.
    Enqueue(usize),
    /// The desktop appends a fact to one of the tasks it sees.
    Fact(usize, u8),
    /// The two replicas exchange a few messages (a partial sync).
    Exchange(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize).prop_map(Op::Enqueue),
        2 => (any::<usize>(), 0..3u8).prop_map(|(t, k)| Op::Fact(t, k)),
        1 => (1..6u8).prop_map(Op::Exchange),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Two peers apart each add tasks past the segment bound, in random interleavings with
    /// partial syncs, then sync fully: every task is visible exactly once, both hold the
    /// same segments with the same heads, and the folds agree.
    #[test]
    fn concurrent_rollovers_converge(ops in proptest::collection::vec(op(), 20..90)) {
        let w = world(1);
        let mut docs = [w.desktop(), w.replica(1)];
        for d in &mut docs {
            d.set_segment_limit(LIMIT);
        }
        let (mut s0, mut s1) = (ThreadSync::new(), ThreadSync::new());
        // The phone learns its device record first, as pairing does.
        {
            let [a, b] = &mut docs;
            sync_pair(a, &mut s0, b, &mut s1);
        }
        let mut created = BTreeSet::new();
        let mut now = 1_700_000_000_000i64;
        for op in ops {
            now += 3;
            match op {
                Op::Enqueue(r) => {
                    let id = docs[r].enqueue_task(&task(&w, format!("{r} at {now}")), now).unwrap();
                    created.insert(id);
                }
                Op::Fact(t, k) => {
                    let tasks = docs[0].tasks();
                    if let Some(tk) = tasks.get(t % tasks.len().max(1)) {
                        let kind = [EventKind::Delivered, EventKind::Started, EventKind::Finished { exit_code: 0 }][k as usize].clone();
                        let n = docs[0].task_segment(&tk.id);
                        docs[0].append_task_event(tk.id, 1, &kind, now).unwrap();
                        prop_assert_eq!(docs[0].task_segment(&tk.id), n, "a fact stays in its task's segment");
                    }
                }
                Op::Exchange(rounds) => {
                    let [a, b] = &mut docs;
                    for _ in 0..rounds {
                        if let Some((id, m)) = s0.next_message(a) {
                            s1.receive(b, &id, &m).unwrap();
                        }
                        if let Some((id, m)) = s1.next_message(b) {
                            s0.receive(a, &id, &m).unwrap();
                        }
                    }
                }
            }
        }
        // Both sides cross the bound apart once more, whatever came before.
        for (r, d) in docs.iter_mut().enumerate() {
            for i in 0..LIMIT as i64 {
                created.insert(d.enqueue_task(&task(&w, format!("{r} tail {i}")), now + i).unwrap());
            }
        }
        {
            let [a, b] = &mut docs;
            sync_pair(a, &mut s0, b, &mut s1);
        }
        prop_assert!(docs[0].newest_segment() > 1, "the bound was crossed");
        let [a, b] = &mut docs;
        prop_assert_eq!(a.loaded(), b.loaded(), "the same segments, none duplicated");
        prop_assert_eq!(a.heads(), b.heads());
        for d in [&*a, &*b] {
            let occ = occurrences(d);
            prop_assert_eq!(occ.keys().copied().collect::<BTreeSet<_>>(), created.clone());
            prop_assert!(occ.values().all(|c| *c == 1), "every task exactly once");
        }
        let folds = |d: &ThreadDoc| d.tasks().iter().map(|t| (t.id, fold(t))).collect::<Vec<_>>();
        prop_assert_eq!(folds(a), folds(b));
        for d in [&*a, &*b] {
            let mut one_at_a_time = Vec::new();
            d.each_task(|t| one_at_a_time.push(t));
            one_at_a_time.sort_by_key(|t| t.id);
            prop_assert_eq!(one_at_a_time, d.tasks(), "each_task sees what tasks() sees");
        }
        for n in a.loaded().into_iter().filter(|n| *n > 0 && *n < a.newest_segment()) {
            prop_assert!(a.part(n).unwrap().changes() >= LIMIT, "only full segments were left behind");
        }
    }
}

#[test]
fn a_task_from_an_old_segment_finishes_there_after_rollovers() {
    let w = world(1);
    let mut desktop = w.desktop();
    let mut phone = w.replica(1);
    desktop.set_segment_limit(LIMIT);
    phone.set_segment_limit(LIMIT);
    let (mut sd, mut sp) = (ThreadSync::new(), ThreadSync::new());
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);

    let old = phone
        .enqueue_task(&task(&w, "the old one".into()), 10)
        .unwrap();
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);
    desktop
        .append_task_event(old, 1, &EventKind::Delivered, 11)
        .unwrap();
    desktop
        .append_task_event(old, 1, &EventKind::Started, 12)
        .unwrap();
    // The phone rolls over twice while the task runs.
    for i in 0..(LIMIT as i64 * 2) {
        phone
            .enqueue_task(&task(&w, format!("later {i}")), 20 + i)
            .unwrap();
    }
    assert!(phone.newest_segment() >= 3);
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);
    desktop
        .append_task_event(old, 1, &EventKind::Output { text: "ok".into() }, 100)
        .unwrap();
    desktop
        .append_task_event(old, 1, &EventKind::Finished { exit_code: 0 }, 101)
        .unwrap();
    assert_eq!(desktop.task_segment(&old), Some(1));
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);

    for d in [&desktop, &phone] {
        let in_one: Vec<_> = d.tasks_in(1).into_iter().filter(|t| t.id == old).collect();
        assert_eq!(in_one.len(), 1);
        assert_eq!(in_one[0].events.len(), 4, "every fact is in segment 1");
        for n in 2..=d.newest_segment() {
            assert!(d.tasks_in(n).iter().all(|t| t.id != old));
        }
        let view = fold(&d.task(&old).unwrap());
        assert_eq!(view.status, TaskStatus::Done);
        assert_eq!(view.output, "ok");
    }
}

#[test]
fn document_ids_name_the_meta_document_and_segments() {
    let w = world(1);
    let g = &w.genesis;
    assert_eq!(g.part_of(&g.doc_id()), Some(0));
    assert_eq!(g.part_of(&g.segment_doc_id(1)), Some(1));
    assert_eq!(g.part_of(&g.segment_doc_id(4_000_000)), Some(4_000_000));
    let t = g.thread_id.to_string();
    for bad in [
        format!("{t}."),
        format!("{t}.0"),
        format!("{t}.01"),
        format!("{t}.x"),
        format!("{t}.1.2"),
        format!("{t}.99999999999"),
        "other.1".to_string(),
    ] {
        assert_eq!(g.part_of(&DocId::parse(&bad).unwrap()), None, "{bad}");
    }
    // Two peers that create a segment apart create the same document.
    let mut a = w.desktop();
    let mut b = w.replica(1);
    a.attach_segment(3, std::iter::empty()).unwrap();
    b.attach_segment(3, std::iter::empty()).unwrap();
    assert_eq!(
        a.part_mut(3).unwrap().heads(),
        b.part_mut(3).unwrap().heads()
    );
}
