//! Routines in the meta document: the map every peer derives, writes from two phones that
//! merge, facts that count only from the desktop, and occurrences created once.

mod common;

use std::time::Duration;

use automerge::{ObjType, ROOT, ReadDoc, transaction::Transactable};
use common::{ThreadSync, sync_pair, world};
use errand_core::{CatchUp, RoutineEventKind, RoutineState, Schedule};
use errand_crdt::NewRoutine;

fn every(secs: u64) -> NewRoutine {
    NewRoutine {
        instruction: "echo tick".into(),
        executor: "shell".into(),
        target: world(0).ids[0].clone(),
        schedule: Schedule::every(Duration::from_secs(secs)).unwrap(),
        catch_up: CatchUp::Once,
        catch_up_cap: 10,
    }
}

#[test]
fn routines_merge_from_two_phones_and_occurrences_are_created_once() {
    let w = world(2);
    let mut desktop = w.desktop();
    let mut a = w.replica(1);
    let mut b = w.replica(2);
    let (mut sda, mut sa) = (ThreadSync::new(), ThreadSync::new());
    let (mut sdb, mut sb) = (ThreadSync::new(), ThreadSync::new());
    sync_pair(&mut desktop, &mut sda, &mut a, &mut sa);
    sync_pair(&mut desktop, &mut sdb, &mut b, &mut sb);

    // Both phones create a routine while apart: neither map is lost (the map is the same
    // object on every peer).
    let mut r = every(2);
    r.target = w.ids[0].clone();
    let ra = a.create_routine(&r, 1_000).unwrap();
    let rb = b.create_routine(&r, 1_001).unwrap();
    sync_pair(&mut desktop, &mut sda, &mut a, &mut sa);
    sync_pair(&mut desktop, &mut sdb, &mut b, &mut sb);
    sync_pair(&mut desktop, &mut sda, &mut a, &mut sa);
    let ids: Vec<_> = desktop.routines().iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![ra, rb]);
    assert_eq!(a.routines().len(), 2);

    // Concurrent pause (a) and resume (b) of the same routine: every replica folds the same
    // state once merged.
    a.append_routine_event(ra, &RoutineEventKind::Paused, 2_000)
        .unwrap();
    b.append_routine_event(ra, &RoutineEventKind::Resumed, 2_000)
        .unwrap();
    for _ in 0..2 {
        sync_pair(&mut desktop, &mut sda, &mut a, &mut sa);
        sync_pair(&mut desktop, &mut sdb, &mut b, &mut sb);
    }
    let states: Vec<RoutineState> = [&desktop, &a, &b]
        .iter()
        .map(|d| d.routine(&ra).unwrap().state())
        .collect();
    assert_eq!(states[0], states[1]);
    assert_eq!(states[0], states[2]);

    // A phone's `missed` does not count; the desktop's does.
    a.append_routine_event(
        rb,
        &RoutineEventKind::Missed {
            first: 3_000,
            last: 5_000,
            count: 2,
        },
        6_000,
    )
    .unwrap();
    sync_pair(&mut desktop, &mut sda, &mut a, &mut sa);
    assert_eq!(desktop.routine(&rb).unwrap().missed_total(), 0);
    desktop
        .append_routine_event(
            rb,
            &RoutineEventKind::Missed {
                first: 3_001,
                last: 5_001,
                count: 2,
            },
            6_000,
        )
        .unwrap();
    sync_pair(&mut desktop, &mut sda, &mut a, &mut sa);
    assert_eq!(a.routine(&rb).unwrap().missed_total(), 2);

    // Occurrences: created once; a phone's task with the same random bits is no occurrence.
    let routine = desktop.routine(&rb).unwrap();
    let first = desktop.enqueue_occurrence(&routine, 7_001, 7_050).unwrap();
    assert!(first.is_some());
    assert_eq!(
        desktop.enqueue_occurrence(&routine, 7_001, 7_060).unwrap(),
        None
    );
    sync_pair(&mut desktop, &mut sdb, &mut b, &mut sb);
    let task = b.task(&first.unwrap()).unwrap();
    assert!(routine.is_occurrence(&task));
    assert_eq!(task.id.timestamp_ms(), 7_001);
}

#[test]
fn a_phone_cannot_replace_the_routines_map() {
    let w = world(1);
    let mut desktop = w.desktop();
    let mut phone = w.replica(1);
    let (mut sd, mut sp) = (ThreadSync::new(), ThreadSync::new());
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);
    let mut r = every(60);
    r.target = w.ids[0].clone();
    let id = phone.create_routine(&r, 1_000).unwrap();
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);

    // The phone writes a new `routines` map over the root key, and junk into the real one.
    let raw = phone.part_mut(0).unwrap().automerge();
    let (_, real) = raw.get(ROOT, "routines").unwrap().unwrap();
    raw.put(&real, "not-an-id", 1).unwrap();
    raw.put(&real, "01ARZ3NDEKTSV4RRFFQ69G5FAV", "junk")
        .unwrap();
    let fake = raw.put_object(ROOT, "routines", ObjType::Map).unwrap();
    raw.put(&fake, "x", 1).unwrap();
    raw.commit();
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);
    let ids: Vec<_> = desktop.routines().iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![id]);
}
