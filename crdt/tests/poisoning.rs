//! Bloom-filter poisoning (issue 18, point 6).
//!
//! Automerge's sync sends the changes past the peer's last sync that the peer's Bloom filter
//! does not hold. A false positive hides a change, and the peer asks for it by hash once
//! changes that depend on it arrive: one round trip per hidden change of a chain. A paired
//! device can mine its changes' hashes so that each one is a false positive in the filter
//! an honest phone sends after its sync state was reset (the filter then covers the phone's
//! whole document, which every paired device holds): about a hundred tries a change here.
//! hoytech/automerge-poison does this; between real processes it turned a three-message
//! catch-up into 25 to 87 messages each way.
//!
//! These tests mine such chains for real and count the messages of the catch-up.

mod common;

use automerge::{
    AutoCommit, ROOT,
    sync::BloomFilter,
    transaction::{CommitOptions, Transactable},
};
use common::{ThreadSync, world};
use errand_crdt::{NewTask, ThreadDoc};

/// Changes in a mined chain: enough that one round trip per change would be plain to see.
const CHAIN: usize = 12;

/// The Bloom filter a peer sends for `am` when its session starts from nothing: every
/// change it holds.
fn filter_of(am: &mut AutoCommit) -> BloomFilter {
    let hashes: Vec<_> = am.get_changes(&[]).iter().map(|c| c.hash()).collect();
    BloomFilter::from_hashes(hashes.iter())
}

/// Appends a chain of `len` changes to `am`, each depending on the one before. With
/// `hide_in`, each change's hash is mined (by trying nonces) to be a false positive of that
/// filter. Returns how many changes were tried.
fn chain(am: &mut AutoCommit, len: usize, hide_in: Option<&BloomFilter>) -> usize {
    let actor = am.get_actor().clone();
    let mut tries = 0;
    for k in 0..len {
        for nonce in 0u64.. {
            tries += 1;
            let mut fork = am.fork().with_actor(actor.clone());
            fork.put(ROOT, "note", format!("{k} {nonce}")).unwrap();
            let at = CommitOptions::default().with_time(1_000 + k as i64);
            let hash = fork.commit_with(at).unwrap();
            if hide_in.is_none_or(|f| f.contains_hash(&hash)) {
                let change = fork.get_change_by_hash(&hash).unwrap().clone();
                am.apply_changes([change]).unwrap();
                break;
            }
            assert!(nonce < 100_000, "mining found no false positive");
        }
    }
    tries
}

/// Runs the sync loop between two replicas until neither has anything to say; returns the
/// messages sent (both ways).
fn exchange(
    a: &mut ThreadDoc,
    sa: &mut ThreadSync,
    b: &mut ThreadDoc,
    sb: &mut ThreadSync,
) -> usize {
    exchange_until(a, sa, b, sb, false, |_, _| false)
}

/// [`exchange`], stopping early once `done` holds. With `strip_b`, `b`'s messages reach `a`
/// without their changes (a peer whose own changes never arrive, so that `a` never learns
/// its heads; the two then never fall quiet, hence `done`).
fn exchange_until(
    a: &mut ThreadDoc,
    sa: &mut ThreadSync,
    b: &mut ThreadDoc,
    sb: &mut ThreadSync,
    strip_b: bool,
    done: impl Fn(&mut ThreadDoc, &mut ThreadDoc) -> bool,
) -> usize {
    let mut sent = 0;
    for _ in 0..1_000 {
        if done(a, b) {
            return sent;
        }
        let mut quiet = true;
        if let Some((id, m)) = sa.next_message(a) {
            sb.receive(b, &id, &m).unwrap();
            sent += 1;
            quiet = false;
        }
        if let Some((id, mut m)) = sb.next_message(b) {
            if strip_b {
                let mut msg = automerge::sync::Message::decode(&m).unwrap();
                msg.changes = Vec::<Vec<u8>>::new().into();
                m = msg.encode();
            }
            sa.receive(a, &id, &m).unwrap();
            sent += 1;
            quiet = false;
        }
        if quiet {
            return sent;
        }
    }
    panic!("sync did not quiesce in 1,000 rounds");
}

fn task(w: &common::World, i: usize) -> NewTask {
    NewTask {
        instruction: format!("task {i}"),
        executor: "shell".into(),
        target: w.ids[0].clone(),
        not_after: None,
        attachments: Vec::new(),
    }
}

/// What a catch-up after an honest phone's reset cost.
#[derive(Debug)]
struct CatchUp {
    messages: usize,
    tries: usize,
}

/// A desktop, an honest phone and a paired attacker, in sync. The attacker appends a chain
/// (mined against the phone's filter when `mine`), which reaches the desktop. Then the
/// phone's sync state is lost, and the phone catches up with the desktop.
fn catch_up_after_reset(mine: bool) -> CatchUp {
    let w = world(2);
    let mut desktop = w.desktop();
    let mut phone = w.replica(1);
    let mut attacker = w.replica(2);
    let (mut dp, mut pd) = (ThreadSync::new(), ThreadSync::new());
    let (mut dm, mut md) = (ThreadSync::new(), ThreadSync::new());
    for i in 0..30 {
        phone.enqueue_task(&task(&w, i), 1_000 + i as i64).unwrap();
    }
    exchange(&mut desktop, &mut dp, &mut phone, &mut pd);
    exchange(&mut desktop, &mut dm, &mut attacker, &mut md);
    let n = desktop.newest_segment();
    let filter = filter_of(phone.part_mut(n).unwrap().automerge());
    let am = attacker.part_mut(n).unwrap().automerge();
    let tries = chain(am, CHAIN, mine.then_some(&filter));
    exchange(&mut desktop, &mut dm, &mut attacker, &mut md);
    assert_eq!(
        desktop.part_mut(n).unwrap().heads(),
        attacker.part_mut(n).unwrap().heads()
    );

    // The phone lost its sync state; the desktop starts a new session from what it stored,
    // as on a new connection.
    let mut pd = ThreadSync::new();
    let mut dp = ThreadSync::restore(&dp.encode_states()).unwrap();
    let messages = exchange(&mut desktop, &mut dp, &mut phone, &mut pd);
    assert_eq!(
        phone.part_mut(n).unwrap().heads(),
        desktop.part_mut(n).unwrap().heads(),
        "the phone did not catch up"
    );
    CatchUp { messages, tries }
}

#[test]
fn a_chain_mined_against_a_reset_phones_filter_costs_no_more_than_twice_the_messages() {
    let honest = catch_up_after_reset(false);
    let poisoned = catch_up_after_reset(true);
    eprintln!("catch-up after a reset: honest {honest:?}, poisoned {poisoned:?}");
    // The mining is real: each change took many tries to hide in the phone's filter.
    assert!(
        poisoned.tries > 10 * CHAIN,
        "the chain was not mined: {poisoned:?}"
    );
    assert!(
        poisoned.messages <= 2 * honest.messages,
        "the poisoned catch-up took {} messages, the honest one {}",
        poisoned.messages,
        honest.messages
    );
}

/// The fallback: the peer's heads stay unknown (its own changes never arrive), so the
/// filters cannot be set aside at once; after a couple of rounds that each fetched one
/// hidden change, the session stops trusting them.
fn catch_up_with_hidden_heads(mine: bool) -> usize {
    let w = world(1);
    let mut desktop = w.desktop();
    let mut phone = w.replica(1);
    let (mut dp, mut pd) = (ThreadSync::new(), ThreadSync::new());
    for i in 0..30 {
        phone.enqueue_task(&task(&w, i), 1_000 + i as i64).unwrap();
    }
    exchange(&mut desktop, &mut dp, &mut phone, &mut pd);
    let n = desktop.newest_segment();
    // The phone writes one change of its own that never reaches the desktop.
    phone.enqueue_task(&task(&w, 99), 5_000).unwrap();
    let filter = filter_of(phone.part_mut(n).unwrap().automerge());
    chain(
        desktop.part_mut(n).unwrap().automerge(),
        CHAIN,
        mine.then_some(&filter),
    );
    let changes = |d: &mut ThreadDoc| d.part_mut(n).unwrap().automerge().get_changes(&[]).len();
    let ours = changes(&mut desktop);
    // The phone lost its sync state; the desktop starts from what it stored.
    let mut dp = ThreadSync::restore(&dp.encode_states()).unwrap();
    let mut pd = ThreadSync::new();
    let got_all = |_: &mut ThreadDoc, p: &mut ThreadDoc| changes(p) == ours + 1;
    let messages = exchange_until(&mut desktop, &mut dp, &mut phone, &mut pd, true, got_all);
    assert!(
        got_all(&mut desktop, &mut phone),
        "the phone did not get the desktop's chain"
    );
    messages
}

#[test]
fn when_the_peers_heads_stay_unknown_the_session_stops_trusting_a_filter_that_hides_changes() {
    let honest = catch_up_with_hidden_heads(false);
    let poisoned = catch_up_with_hidden_heads(true);
    eprintln!(
        "catch-up with the peer's heads unknown: honest {honest}, poisoned {poisoned} messages"
    );
    assert!(
        poisoned <= 2 * honest,
        "the poisoned catch-up took {poisoned} messages, the honest one {honest}"
    );
}
