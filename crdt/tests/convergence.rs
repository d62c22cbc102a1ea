//! Replicas that apply random writes and sync in random order, with dropped messages
//! modelled as disconnects, converge on the same heads, tasks and statuses.

mod common;

use std::collections::HashMap;

use common::{ThreadSync, sync_pair, world};
use errand_core::{EventKind, MessageKind, fold};
use errand_crdt::{DocId, NewTask, SyncSession, ThreadDoc};
use proptest::prelude::*;
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
enum Op {
    Enqueue(usize),
    Event(usize, usize, u8),
    Message(usize),
    /// Exchange `rounds` messages between two replicas; if `drop_at` is hit, that message is
    /// lost and both sessions restart from their persisted state.
    Exchange(usize, usize, u8, Option<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..3).prop_map(Op::Enqueue),
        4 => (0usize..3, 0usize..8, 0u8..12).prop_map(|(r, t, k)| Op::Event(r, t, k)),
        1 => (0usize..3).prop_map(Op::Message),
        4 => (0usize..3, 0usize..3, 1u8..6, proptest::option::of(0u8..6))
            .prop_map(|(a, b, n, d)| Op::Exchange(a, b, n, d)),
    ]
}

fn kind(k: u8) -> EventKind {
    match k {
        0 => EventKind::Delivered,
        1 => EventKind::ApprovalRequested,
        2 => EventKind::Started,
        3 => EventKind::Output { text: "out".into() },
        4 => EventKind::Finished { exit_code: 0 },
        5 => EventKind::Finished { exit_code: 2 },
        6 => EventKind::Failed {
            reason: "no".into(),
        },
        7 => EventKind::Denied,
        8 => EventKind::Approved,
        9 => EventKind::CancelRequested,
        10 => EventKind::Retried,
        _ => EventKind::Cancelled {
            reason: "requested".into(),
        },
    }
}

struct Net {
    docs: Vec<ThreadDoc>,
    /// Live sessions, by (owner, peer).
    sessions: HashMap<(usize, usize), ThreadSync>,
    /// What each session last persisted, as the store would hold it.
    persisted: HashMap<(usize, usize), BTreeMap<DocId, Vec<u8>>>,
}

impl Net {
    fn session(&mut self, a: usize, b: usize) -> ThreadSync {
        self.sessions
            .remove(&(a, b))
            .unwrap_or_else(|| match self.persisted.get(&(a, b)) {
                Some(states) => ThreadSync::restore(states).unwrap(),
                None => ThreadSync::new(),
            })
    }

    fn exchange(&mut self, a: usize, b: usize, rounds: u8, drop_at: Option<u8>) {
        if a == b {
            return;
        }
        let mut sa = self.session(a, b);
        let mut sb = self.session(b, a);
        let mut sent = 0u8;
        'outer: for _ in 0..rounds {
            for (from, to) in [(a, b), (b, a)] {
                let (sf, st) = if from == a {
                    (&mut sa, &mut sb)
                } else {
                    (&mut sb, &mut sa)
                };
                let Some((id, m)) = sf.next_message(&mut self.docs[from]) else {
                    continue;
                };
                if Some(sent) == drop_at {
                    // Lost in flight: the connection drops, both sides restart from storage.
                    self.sessions.remove(&(a, b));
                    self.sessions.remove(&(b, a));
                    return;
                }
                sent += 1;
                st.receive(&mut self.docs[to], &id, &m).unwrap();
                self.persisted.insert((to, from), st.encode_states());
                if sent > 40 {
                    break 'outer;
                }
            }
        }
        self.sessions.insert((a, b), sa);
        self.sessions.insert((b, a), sb);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn three_replicas_converge_despite_drops_and_reordering(ops in proptest::collection::vec(op(), 1..60)) {
        let w = world(2);
        let mut net = Net {
            docs: vec![w.desktop(), w.replica(1), w.replica(2)],
            sessions: HashMap::new(),
            persisted: HashMap::new(),
        };
        let mut now = 1_700_000_000_000i64;
        for op in ops {
            now += 7;
            match op {
                Op::Enqueue(r) => {
                    let t = NewTask {
                        instruction: format!("task from {r} at {now}"),
                        executor: "shell".into(),
                        target: w.ids[0].clone(),
                        not_after: None,
                        attachments: Vec::new(),
                    };
                    net.docs[r].enqueue_task(&t, now).unwrap();
                }
                Op::Event(r, t, k) => {
                    let tasks = net.docs[r].tasks();
                    if let Some(task) = tasks.get(t % tasks.len().max(1)) {
                        let attempt = fold(task).attempt;
                        net.docs[r].append_task_event(task.id, attempt, &kind(k), now).unwrap();
                    }
                }
                Op::Message(r) => {
                    net.docs[r].post_message(MessageKind::User, "hi", None, now).unwrap();
                }
                Op::Exchange(a, b, n, d) => net.exchange(a, b, n, d),
            }
        }
        // A final full exchange, through fresh connections restored from persisted state.
        net.sessions.clear();
        for _ in 0..2 {
            for (a, b) in [(0, 1), (0, 2), (1, 2)] {
                let mut sa = net.session(a, b);
                let mut sb = net.session(b, a);
                let (lo, hi) = net.docs.split_at_mut(b);
                sync_pair(&mut lo[a], &mut sa, &mut hi[0], &mut sb);
                net.sessions.insert((a, b), sa);
                net.sessions.insert((b, a), sb);
            }
        }
        let mut heads: Vec<_> = net.docs.iter_mut().map(|d| d.heads()).collect();
        let tasks: Vec<_> = net.docs.iter().map(|d| d.tasks()).collect();
        let folds: Vec<Vec<_>> = tasks.iter().map(|ts| ts.iter().map(fold).collect()).collect();
        prop_assert_eq!(&heads[0], &heads[1]);
        prop_assert_eq!(&heads[0], &heads[2]);
        prop_assert_eq!(&tasks[0], &tasks[1]);
        prop_assert_eq!(&tasks[0], &tasks[2]);
        prop_assert_eq!(&folds[0], &folds[1]);
        prop_assert_eq!(&folds[0], &folds[2]);
        prop_assert_eq!(net.docs[0].messages(), net.docs[2].messages());
        heads.clear();
    }
}

#[test]
fn two_peers_that_start_from_genesis_each_keep_their_task_after_sync() {
    let w = world(1);
    let mut desktop = w.desktop();
    let mut phone = w.replica(1);
    let t = |who: &str| NewTask {
        instruction: format!("from {who}"),
        executor: "shell".into(),
        target: w.ids[0].clone(),
        not_after: None,
        attachments: Vec::new(),
    };
    let a = desktop.enqueue_task(&t("desktop"), 10).unwrap();
    let b = phone.enqueue_task(&t("phone"), 11).unwrap();
    let (mut sa, mut sb) = (ThreadSync::new(), ThreadSync::new());
    sync_pair(&mut desktop, &mut sa, &mut phone, &mut sb);
    for doc in [&desktop, &phone] {
        let ids: Vec<_> = doc.tasks().iter().map(|t| t.id).collect();
        assert_eq!(ids.len(), 2, "both tasks visible");
        assert!(ids.contains(&a) && ids.contains(&b));
    }
    assert!(sa.in_sync(&mut desktop) && sb.in_sync(&mut phone));
    let phone_task = desktop.task(&b).unwrap();
    assert_eq!(
        phone_task.author, w.ids[1],
        "authorship comes from the phone's actor"
    );
}

#[test]
fn tasks_changed_since_reports_new_tasks_and_new_events() {
    let w = world(1);
    let mut desktop = w.desktop();
    let task = NewTask {
        instruction: "x".into(),
        executor: "shell".into(),
        target: w.ids[0].clone(),
        not_after: None,
        attachments: Vec::new(),
    };
    let a = desktop.enqueue_task(&task, 10).unwrap();
    assert_eq!(
        desktop.task_segment(&a),
        Some(1),
        "tasks start in segment 1"
    );
    assert_eq!(
        desktop
            .tasks_changed_since(1, &[])
            .into_iter()
            .collect::<Vec<_>>(),
        vec![a]
    );
    let before = desktop.part_mut(1).unwrap().heads();
    let b = desktop.enqueue_task(&task, 11).unwrap();
    let mid = desktop.part_mut(1).unwrap().heads();
    desktop
        .append_task_event(a, 1, &EventKind::Delivered, 12)
        .unwrap();
    assert_eq!(
        desktop
            .tasks_changed_since(1, &mid)
            .into_iter()
            .collect::<Vec<_>>(),
        vec![a]
    );
    assert_eq!(desktop.tasks_changed_since(1, &before).len(), 2);
    let now = desktop.part_mut(1).unwrap().heads();
    assert!(desktop.tasks_changed_since(1, &now).is_empty());
    let _ = b;
}

#[test]
fn a_session_assumed_in_sync_answers_a_peer_that_starts_afresh() {
    // The desktop holds a segment with only its genesis and takes a phone that never listed
    // it to hold the same (it assumes the session in sync). The phone, which learnt of the
    // segment from the desktop's hello, starts a fresh session and waits for the desktop's
    // heads. The desktop must answer once, or the phone never gets in sync (issue 14: an
    // honest phone's sync hung after a refused attack had made the desktop load a segment).
    let w = world(1);
    let mut desktop = w.desktop();
    let mut phone = w.replica(1);
    let id = w.genesis.segment_doc_id(1);
    desktop.attach_segment(1, std::iter::empty()).unwrap();
    phone.attach_segment(1, std::iter::empty()).unwrap();
    let mut ours = SyncSession::new(id.clone());
    ours.assume_in_sync(&desktop.segment_genesis_heads(1));
    let mut theirs = SyncSession::new(id);
    let ask = theirs.next_message(phone.part_mut(1).unwrap()).unwrap();
    ours.receive(desktop.part_mut(1).unwrap(), &ask).unwrap();
    let heads = desktop.part_mut(1).unwrap().heads();
    assert!(
        !ours.settled_at(&heads),
        "the phone is still owed an answer"
    );
    let answer = ours
        .next_message(desktop.part_mut(1).unwrap())
        .expect("the desktop answers the phone");
    theirs.receive(phone.part_mut(1).unwrap(), &answer).unwrap();
    let phone_heads = phone.part_mut(1).unwrap().heads();
    assert!(theirs.in_sync_at(&phone_heads), "the phone is in sync");
    // And then both are quiet: no ping-pong.
    assert!(theirs.next_message(phone.part_mut(1).unwrap()).is_none());
    assert!(ours.next_message(desktop.part_mut(1).unwrap()).is_none());
}

#[test]
fn an_agent_conversation_round_trips_through_the_document() {
    // Every field of the agent's facts and the phone's answers reads back as written, on the
    // other peer too; an old reader skips these kinds (unknown kinds are not events to it).
    use errand_core::{PermissionChoice, PlanEntry, TaskStatus};
    let w = world(1);
    let mut desktop = w.desktop();
    let mut phone = w.replica(1);
    let (mut sd, mut sp) = (ThreadSync::new(), ThreadSync::new());
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);
    let id = phone
        .enqueue_task(
            &NewTask {
                instruction: "tidy the notes".into(),
                executor: "agent".into(),
                target: w.ids[0].clone(),
                not_after: None,
                attachments: Vec::new(),
            },
            10,
        )
        .unwrap();
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);
    let facts = [
        EventKind::Started,
        EventKind::AgentSession {
            session_id: "sess-1".into(),
            how: "new".into(),
        },
        EventKind::Plan {
            entries: vec![PlanEntry {
                content: "Read".into(),
                status: "in_progress".into(),
            }],
        },
        EventKind::ToolCall {
            call_id: "c1".into(),
            title: "Look around".into(),
            tool_kind: "read".into(),
            status: "pending".into(),
        },
        EventKind::ToolCall {
            call_id: "c1".into(),
            title: String::new(),
            tool_kind: String::new(),
            status: "completed".into(),
        },
        EventKind::PermissionRequested {
            perm_id: "p1".into(),
            title: "Write summary.md".into(),
            tool_kind: "edit".into(),
            options: vec![
                PermissionChoice {
                    id: "allow-once".into(),
                    name: "Allow once".into(),
                    kind: "allow_once".into(),
                },
                PermissionChoice {
                    id: "reject-once".into(),
                    name: "Reject".into(),
                    kind: "reject_once".into(),
                },
            ],
        },
    ];
    for (i, f) in facts.iter().enumerate() {
        desktop.append_task_event(id, 1, f, 20 + i as i64).unwrap();
    }
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);
    let seen = phone.task(&id).unwrap();
    let kinds: Vec<EventKind> = seen.events.iter().map(|e| e.kind.clone()).collect();
    assert_eq!(kinds, facts.to_vec());
    let view = fold(&seen);
    assert_eq!(view.status, TaskStatus::AwaitingPermission);
    assert_eq!(view.tool_calls[0].status, "completed");

    let answer = errand_core::check_answer(&seen, &w.ids[1], "allow").unwrap();
    phone
        .append_task_event(id, answer.attempt, &answer.kind, 40)
        .unwrap();
    sync_pair(&mut desktop, &mut sd, &mut phone, &mut sp);
    let at_desktop = desktop.task(&id).unwrap();
    assert!(at_desktop.events.iter().any(|e| e.author == w.ids[1]
        && e.kind
            == EventKind::PermissionAnswered {
                perm_id: "p1".into(),
                option_id: "allow-once".into(),
            }));
    assert_eq!(fold(&at_desktop).status, TaskStatus::Running);
}
