//! A catch-up bigger than a relay circuit's byte budget goes in parts (DESIGN.md section 4).
//!
//! Root cause of the fault: Automerge puts every change the peer lacks in one sync message.
//! Through a relay that closes a circuit after N bytes, a catch-up bigger than N was cut on
//! every circuit and sent again whole on the next one, forever. With a part limit
//! (`Engine::set_part_limit`) each frame carries at most that many change bytes, the
//! receiver stores each part with its sync state, and the next circuit starts from there.
//!
//! Circuits are simulated in memory: two engines exchange frames until the bytes of one
//! circuit are used up; the frame that crosses the budget and everything in flight is lost,
//! and both sides start a fresh session, as real peers do on a new circuit.

mod common;

use std::collections::VecDeque;

use errand_core::{DeviceId, DeviceKind};
use errand_crdt::{
    MemoryImage, NewTask, Store,
    engine::{Binding, Engine, EngineConfig, META_ACTOR, PeerFrame, loopback},
};

/// Change bytes in a frame.
fn change_bytes(frame: &PeerFrame) -> usize {
    match frame {
        PeerFrame::Sync { message, .. } => automerge::sync::Message::decode(message)
            .map(|m| m.changes.iter().map(<[u8]>::len).sum())
            .unwrap_or(0),
        PeerFrame::Changes { changes, .. } => changes.len(),
    }
}

/// Text that Automerge cannot shrink much: a simple generator, the same every run.
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

struct Pair {
    desktop: Engine,
    phone: Engine,
    d: DeviceId,
    p: DeviceId,
}

/// A paired desktop and phone, in sync, then `tasks` tasks of `len` characters queued on the
/// phone.
fn pair_with_backlog(tasks: usize, len: usize) -> Pair {
    let w = common::world(1);
    let open = |actor: &errand_crdt::ActorId| {
        let store = Store::in_memory(&MemoryImage::new()).unwrap();
        store
            .write(|t| t.put_meta(META_ACTOR, actor.to_bytes()))
            .unwrap();
        Engine::open(store, EngineConfig::default()).unwrap()
    };
    let mut desktop = open(&w.actors[0]);
    desktop.create_thread(w.genesis.clone()).unwrap();
    desktop
        .ensure_device(
            w.ids[1].clone(),
            "phone".into(),
            DeviceKind::Phone,
            w.actors[1].to_hex_string(),
            Binding::Pairing,
            1,
        )
        .unwrap();
    let mut phone = open(&w.actors[1]);
    phone.adopt(w.genesis.clone()).unwrap();
    let (d, p) = (w.ids[0].clone(), w.ids[1].clone());
    loopback::sync(&mut desktop, &d, &mut phone, &p).unwrap();
    for i in 0..tasks {
        let task = NewTask {
            instruction: format!("{i} {}", noise(i as u64, len)),
            executor: "shell".into(),
            target: d.clone(),
            not_after: None,
            attachments: Vec::new(),
        };
        phone
            .commit(|doc| doc.enqueue_task(&task, 1_000 + i as i64))
            .unwrap();
    }
    Pair {
        desktop,
        phone,
        d,
        p,
    }
}

/// What [`circuits`] saw.
#[derive(Debug)]
struct Outcome {
    /// The catch-up finished: nothing left to say, the desktop holds every task.
    done: bool,
    /// Circuits used.
    circuits: usize,
    /// The most change bytes one frame carried.
    biggest: usize,
    /// Tasks the desktop held after each circuit.
    held: Vec<usize>,
}

/// Runs sessions of at most `budget` frame bytes each (both ways summed) until the catch-up
/// finishes or `max` circuits are used. Every third circuit, both peers also restart from
/// what they stored.
fn circuits(pair: &mut Pair, limit: Option<usize>, budget: usize, max: usize) -> Outcome {
    let Pair {
        desktop,
        phone,
        d,
        p,
    } = pair;
    let total = phone.read_all(|t| t.tasks().len()).unwrap();
    let mut out = Outcome {
        done: false,
        circuits: 0,
        biggest: 0,
        held: Vec::new(),
    };
    while out.circuits < max {
        out.circuits += 1;
        if out.circuits.is_multiple_of(3) {
            desktop.restart().unwrap();
            phone.restart().unwrap();
        }
        desktop.set_part_limit(p, limit);
        phone.set_part_limit(d, limit);
        let (dd, pd) = (desktop.digests(), phone.digests());
        let mut extra_d = desktop.start_session(p, pd).unwrap();
        let mut extra_p = phone.start_session(d, dd).unwrap();
        let mut to_p: VecDeque<PeerFrame> =
            desktop.step(p, None, &mut extra_d).unwrap().frames.into();
        let mut to_d: VecDeque<PeerFrame> =
            phone.step(d, None, &mut extra_p).unwrap().frames.into();
        let mut used = 0;
        let mut cut = false;
        let idle = |p: &VecDeque<PeerFrame>, d: &VecDeque<PeerFrame>| p.is_empty() && d.is_empty();
        while !cut && !idle(&to_p, &to_d) {
            if let Some(f) = to_d.pop_front() {
                used += loopback::frame_bytes(&f);
                out.biggest = out.biggest.max(change_bytes(&f));
                if used > budget {
                    cut = true;
                } else {
                    to_p.extend(desktop.step(p, Some(f), &mut extra_d).unwrap().frames);
                }
            }
            if let Some(f) = to_p.pop_front().filter(|_| !cut) {
                used += loopback::frame_bytes(&f);
                if used > budget {
                    cut = true;
                } else {
                    to_d.extend(phone.step(d, Some(f), &mut extra_p).unwrap().frames);
                }
            }
        }
        let held = desktop.read_all(|t| t.tasks().len()).unwrap();
        out.held.push(held);
        if !cut && held == total {
            out.done = true;
            break;
        }
    }
    out
}

/// The per-circuit budget, both directions summed, as in the relay tests.
const BUDGET: usize = 64 * 1024;
/// What one frame may carry, as over a relay circuit.
const PART: usize = 16 * 1024;

#[test]
fn a_catch_up_bigger_than_a_circuit_goes_in_parts_and_each_circuit_adds_to_what_is_stored() {
    // 400 tasks of 600 characters: about 270 KB of changes, four circuits' worth.
    let mut pair = pair_with_backlog(400, 600);
    let out = circuits(&mut pair, Some(PART), BUDGET, 40);
    assert!(out.done, "the catch-up did not finish: {out:?}");
    assert!(
        out.circuits > 3,
        "the backlog fit fewer circuits than expected: {out:?}"
    );
    assert!(
        out.biggest <= PART,
        "a frame carried {} change bytes, over the part limit of {PART}",
        out.biggest
    );
    assert!(
        out.held.windows(2).all(|w| w[0] <= w[1]),
        "a circuit lost what an earlier one stored: {:?}",
        out.held
    );
    assert!(
        out.held.iter().filter(|h| **h > 0).count() > 2,
        "progress did not build up across circuits: {:?}",
        out.held
    );
    let Pair {
        desktop,
        phone,
        d,
        p,
    } = &mut pair;
    assert!(desktop.in_sync(p) && phone.in_sync(d));
}

#[test]
fn without_parts_the_same_catch_up_never_gets_through_a_circuit() {
    // The control: the same backlog in one message is cut on every circuit.
    let mut pair = pair_with_backlog(400, 600);
    let out = circuits(&mut pair, None, BUDGET, 6);
    assert!(!out.done, "a whole catch-up fit one circuit: {out:?}");
    assert!(out.held.iter().all(|h| *h == 0), "{out:?}");
}

#[test]
fn one_change_bigger_than_the_part_limit_still_goes_whole() {
    let mut pair = pair_with_backlog(3, 40 * 1024);
    let out = circuits(&mut pair, Some(PART), 10 * BUDGET, 4);
    assert!(out.done, "{out:?}");
    assert!(out.biggest > PART, "{out:?}");
}
