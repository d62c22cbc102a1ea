//! Tasks, their events, and the pure status fold.
//!
//! A task's history is a list of events. Only the task's *target* desktop writes facts
//! (`delivered`, `approval_requested`, `started`, `output`, `finished`, `failed`, `cancelled`,
//! `denied`, `interrupted`). Other devices write requests (`cancel_requested`, `approved`,
//! `denied`, `retried`). [`fold`] turns that history into a [`TaskView`]: the status of the
//! latest attempt, plus the requests still waiting for an answer.

use serde::{Deserialize, Serialize};

use crate::{DeviceId, TaskId, time::Millis};

/// What happened, with its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// Fact: the desktop has the task.
    Delivered,
    /// Fact: the desktop waits for the phone's approval.
    ApprovalRequested,
    /// Fact: the process was spawned.
    Started,
    /// Fact: a batch of output.
    Output {
        /// The batch, already capped.
        text: String,
    },
    /// Fact: the process exited.
    Finished {
        /// The exit code (non-zero means `failed`).
        exit_code: i64,
    },
    /// Fact: the task could not run or did not complete.
    Failed {
        /// Why.
        reason: String,
    },
    /// Fact: the desktop cancelled it (requested, expired, revoked).
    Cancelled {
        /// Why.
        reason: String,
    },
    /// Fact from the desktop (the denial took effect), or a request from a phone.
    Denied,
    /// Fact: the desktop restarted while the attempt ran.
    Interrupted,
    /// Request: run it.
    Approved,
    /// Request: stop it, or don't start it.
    CancelRequested,
    /// Request: run the ended attempt again as a new attempt.
    Retried,
}

impl EventKind {
    /// The kind's name in the document.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::ApprovalRequested => "approval_requested",
            Self::Started => "started",
            Self::Output { .. } => "output",
            Self::Finished { .. } => "finished",
            Self::Failed { .. } => "failed",
            Self::Cancelled { .. } => "cancelled",
            Self::Denied => "denied",
            Self::Interrupted => "interrupted",
            Self::Approved => "approved",
            Self::CancelRequested => "cancel_requested",
            Self::Retried => "retried",
        }
    }

    /// True for kinds that end an attempt when the target desktop writes them.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Finished { .. }
                | Self::Failed { .. }
                | Self::Cancelled { .. }
                | Self::Denied
                | Self::Interrupted
        )
    }

    /// The names of the kinds for which [`Self::is_terminal`] holds.
    pub fn terminal_names() -> [&'static str; 5] {
        ["finished", "failed", "cancelled", "denied", "interrupted"]
    }

    /// True for kinds that count only when the target desktop writes them.
    pub fn is_fact_kind(&self) -> bool {
        !matches!(self, Self::Approved | Self::CancelRequested | Self::Retried)
    }

    /// True for kinds that count only when another device writes them.
    /// (`denied` is both: a request from a phone, a fact from the desktop.)
    pub fn is_request_kind(&self) -> bool {
        matches!(
            self,
            Self::Approved | Self::CancelRequested | Self::Retried | Self::Denied
        )
    }
}

/// One entry of a task's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// When, by the author's clock.
    pub at: Millis,
    /// The attempt it belongs to (1-based). A `retried` names the attempt it retries.
    pub attempt: u32,
    /// The device that wrote it (from the op's actor, never from a field).
    pub author: DeviceId,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// A task as read from the thread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Unique, time-sortable id.
    pub id: TaskId,
    /// What to do.
    pub instruction: String,
    /// Which executor of the target should run it.
    pub executor: String,
    /// The desktop that runs it; the only device whose facts count.
    pub target: DeviceId,
    /// The device that created it.
    pub author: DeviceId,
    /// When it was created, by the author's clock.
    pub created_at: Millis,
    /// Past this, the desktop settles it as cancelled (`expired`) instead of running it.
    pub not_after: Option<Millis>,
    /// The history, in list order (which need not be time order).
    pub events: Vec<TaskEvent>,
}

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// No fact yet: only its author has it, as far as anyone knows.
    Queued,
    /// The desktop has it.
    Delivered,
    /// The desktop waits for approval.
    AwaitingApproval,
    /// The process runs.
    Running,
    /// Finished with exit code 0.
    Done,
    /// Finished non-zero, or could not run.
    Failed,
    /// Cancelled by request, expiry or revocation.
    Cancelled,
    /// Denied.
    Denied,
    /// The desktop restarted while it ran; it is not re-run by itself.
    Interrupted,
}

impl TaskStatus {
    /// The status's name in JSON and on screen.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Delivered => "delivered",
            Self::AwaitingApproval => "awaiting_approval",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Denied => "denied",
            Self::Interrupted => "interrupted",
        }
    }

    /// True when the attempt has ended.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Done | Self::Failed | Self::Cancelled | Self::Denied | Self::Interrupted
        )
    }
}

impl std::fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request that the desktop has not answered yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Someone asked to cancel.
    CancelRequested,
    /// Someone approved.
    Approved,
    /// Someone denied.
    Denied,
}

/// The folded state of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskView {
    /// Status of the latest attempt.
    pub status: TaskStatus,
    /// The latest attempt (1-based).
    pub attempt: u32,
    /// Exit code, when the latest attempt finished.
    pub exit_code: Option<i64>,
    /// The reason given with `failed` or `cancelled`.
    pub reason: Option<String>,
    /// Requests in the latest attempt that no fact answers yet, deduplicated and sorted.
    pub requests: Vec<Request>,
    /// The latest attempt's output, in list order.
    pub output: String,
}

/// Rank of a fact for the status table: higher wins within an attempt.
fn rank(kind: &EventKind) -> u8 {
    match kind {
        k if k.is_terminal() => 4,
        EventKind::Started => 3,
        EventKind::ApprovalRequested => 2,
        EventKind::Delivered => 1,
        _ => 0,
    }
}

/// Folds a task's history into its view. Pure: same events in, same view out, on every peer.
///
/// - Only the target's facts count; facts from anyone else are ignored.
/// - Attempt 1 is open from the start. A `retried` request naming attempt n opens attempt n+1,
///   but only once attempt n has a terminal fact.
/// - Within the latest attempt the highest-ranked fact decides (terminal > started >
///   approval requested > delivered), so list order and duplicates do not matter. If the
///   desktop ever wrote two terminal facts, the earliest (by time, then list order) wins.
pub fn fold(task: &Task) -> TaskView {
    let is_fact = |e: &TaskEvent| e.author == task.target && e.kind.is_fact_kind();
    let is_request = |e: &TaskEvent| e.author != task.target && e.kind.is_request_kind();

    let terminal_in = |attempt: u32| {
        task.events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.attempt == attempt && is_fact(e) && e.kind.is_terminal())
            .min_by_key(|(i, e)| (e.at, *i))
            .map(|(_, e)| e)
    };
    let retried = |attempt: u32| {
        task.events
            .iter()
            .any(|e| e.attempt == attempt && is_request(e) && e.kind == EventKind::Retried)
    };

    let mut attempt = 1u32;
    while attempt < u32::MAX && terminal_in(attempt).is_some() && retried(attempt) {
        attempt += 1;
    }

    let terminal = terminal_in(attempt);
    let best = task
        .events
        .iter()
        .filter(|e| e.attempt == attempt && is_fact(e))
        .map(|e| rank(&e.kind))
        .max()
        .unwrap_or(0);
    let (status, exit_code, reason) = match terminal.map(|e| &e.kind) {
        Some(EventKind::Finished { exit_code }) => (
            if *exit_code == 0 {
                TaskStatus::Done
            } else {
                TaskStatus::Failed
            },
            Some(*exit_code),
            None,
        ),
        Some(EventKind::Failed { reason }) => (TaskStatus::Failed, None, Some(reason.clone())),
        Some(EventKind::Cancelled { reason }) => {
            (TaskStatus::Cancelled, None, Some(reason.clone()))
        }
        Some(EventKind::Denied) => (TaskStatus::Denied, None, None),
        Some(_) => (TaskStatus::Interrupted, None, None),
        None => (
            match best {
                3 => TaskStatus::Running,
                2 => TaskStatus::AwaitingApproval,
                1 => TaskStatus::Delivered,
                _ => TaskStatus::Queued,
            },
            None,
            None,
        ),
    };

    let mut requests: Vec<Request> = task
        .events
        .iter()
        .filter(|e| e.attempt == attempt && is_request(e))
        .filter_map(|e| match e.kind {
            EventKind::CancelRequested if !status.is_terminal() => Some(Request::CancelRequested),
            EventKind::Approved if best < 3 && !status.is_terminal() => Some(Request::Approved),
            EventKind::Denied if best < 3 && !status.is_terminal() => Some(Request::Denied),
            _ => None,
        })
        .collect();
    requests.sort();
    requests.dedup();

    let output = task
        .events
        .iter()
        .filter(|e| e.attempt == attempt && is_fact(e))
        .filter_map(|e| match &e.kind {
            EventKind::Output { text } => Some(text.as_str()),
            _ => None,
        })
        .collect();

    TaskView {
        status,
        attempt,
        exit_code,
        reason,
        requests,
        output,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ids::tests::{PEER_A, PEER_B, PEER_QM};

    pub(crate) fn desktop() -> DeviceId {
        PEER_A.parse().unwrap()
    }
    pub(crate) fn phone() -> DeviceId {
        PEER_B.parse().unwrap()
    }
    fn other() -> DeviceId {
        PEER_QM.parse().unwrap()
    }
    pub(crate) fn ev(author: DeviceId, attempt: u32, at: i64, kind: EventKind) -> TaskEvent {
        TaskEvent {
            at,
            attempt,
            author,
            kind,
        }
    }
    /// A task from the phone to the desktop with these events.
    pub(crate) fn task(events: Vec<TaskEvent>) -> Task {
        Task {
            id: TaskId::new_at(1),
            instruction: "echo hi".into(),
            executor: "shell".into(),
            target: desktop(),
            author: phone(),
            created_at: 1,
            not_after: None,
            events,
        }
    }
    use EventKind::*;

    #[test]
    fn a_task_without_facts_is_queued() {
        let v = fold(&task(vec![]));
        assert_eq!(v.status, TaskStatus::Queued);
        assert_eq!(v.attempt, 1);
    }

    #[test]
    fn status_follows_the_table() {
        let d = desktop();
        let cases = [
            (vec![Delivered], TaskStatus::Delivered),
            (
                vec![Delivered, ApprovalRequested],
                TaskStatus::AwaitingApproval,
            ),
            (vec![Delivered, Started], TaskStatus::Running),
            (
                vec![Delivered, Started, Finished { exit_code: 0 }],
                TaskStatus::Done,
            ),
            (vec![Started, Finished { exit_code: 3 }], TaskStatus::Failed),
            (
                vec![Failed {
                    reason: "spawn".into(),
                }],
                TaskStatus::Failed,
            ),
            (
                vec![Cancelled {
                    reason: "expired".into(),
                }],
                TaskStatus::Cancelled,
            ),
            (vec![ApprovalRequested, Denied], TaskStatus::Denied),
            (vec![Started, Interrupted], TaskStatus::Interrupted),
        ];
        for (kinds, want) in cases {
            let events = kinds
                .into_iter()
                .enumerate()
                .map(|(i, k)| ev(d.clone(), 1, i as i64, k))
                .collect();
            assert_eq!(fold(&task(events)).status, want);
        }
    }

    #[test]
    fn events_out_of_list_order_fold_the_same() {
        let d = desktop();
        let mut events = vec![
            ev(d.clone(), 1, 10, Delivered),
            ev(d.clone(), 1, 20, Started),
            ev(d.clone(), 1, 25, Output { text: "a".into() }),
            ev(d.clone(), 1, 30, Finished { exit_code: 0 }),
        ];
        let forward = fold(&task(events.clone()));
        events.reverse();
        let backward = fold(&task(events));
        assert_eq!(forward.status, TaskStatus::Done);
        assert_eq!(forward.status, backward.status);
        assert_eq!(forward.exit_code, Some(0));
    }

    #[test]
    fn duplicate_facts_change_nothing() {
        let d = desktop();
        let events = vec![
            ev(d.clone(), 1, 1, Delivered),
            ev(d.clone(), 1, 1, Delivered),
            ev(d.clone(), 1, 2, Started),
            ev(d.clone(), 1, 2, Started),
        ];
        let v = fold(&task(events));
        assert_eq!(v.status, TaskStatus::Running);
    }

    #[test]
    fn facts_from_a_non_target_device_are_ignored() {
        let events = vec![
            ev(desktop(), 1, 1, Delivered),
            ev(phone(), 1, 2, Finished { exit_code: 0 }),
            ev(other(), 1, 3, Started),
        ];
        assert_eq!(fold(&task(events)).status, TaskStatus::Delivered);
    }

    #[test]
    fn requests_from_the_target_itself_are_not_requests() {
        let events = vec![
            ev(desktop(), 1, 1, Delivered),
            ev(desktop(), 1, 2, CancelRequested),
        ];
        assert!(fold(&task(events)).requests.is_empty());
    }

    #[test]
    fn concurrent_requests_show_beside_the_status_until_answered() {
        let d = desktop();
        let mut events = vec![
            ev(d.clone(), 1, 1, Delivered),
            ev(d.clone(), 1, 2, ApprovalRequested),
            ev(phone(), 1, 3, Approved),
            ev(other(), 1, 3, Denied),
            ev(phone(), 1, 4, CancelRequested),
            ev(phone(), 1, 4, CancelRequested),
        ];
        let v = fold(&task(events.clone()));
        assert_eq!(v.status, TaskStatus::AwaitingApproval);
        assert_eq!(
            v.requests,
            vec![Request::CancelRequested, Request::Approved, Request::Denied]
        );
        // The desktop settles the race by what it did first: here it started the task.
        events.push(ev(d.clone(), 1, 5, Started));
        let v = fold(&task(events.clone()));
        assert_eq!(v.status, TaskStatus::Running);
        assert_eq!(v.requests, vec![Request::CancelRequested]);
        events.push(ev(
            d,
            1,
            6,
            Cancelled {
                reason: "requested".into(),
            },
        ));
        let v = fold(&task(events));
        assert_eq!(v.status, TaskStatus::Cancelled);
        assert!(v.requests.is_empty());
    }

    #[test]
    fn a_retry_after_failed_opens_the_next_attempt() {
        let d = desktop();
        let mut events = vec![
            ev(d.clone(), 1, 1, Delivered),
            ev(d.clone(), 1, 2, Started),
            ev(
                d.clone(),
                1,
                3,
                Output {
                    text: "boom".into(),
                },
            ),
            ev(d.clone(), 1, 4, Finished { exit_code: 1 }),
        ];
        assert_eq!(fold(&task(events.clone())).status, TaskStatus::Failed);
        events.push(ev(phone(), 1, 5, Retried));
        events.push(ev(phone(), 1, 5, Retried)); // duplicate retry: still one new attempt
        let v = fold(&task(events.clone()));
        assert_eq!((v.attempt, v.status), (2, TaskStatus::Queued));
        assert_eq!(v.output, "");
        events.push(ev(d.clone(), 2, 6, Delivered));
        events.push(ev(d.clone(), 2, 7, Started));
        events.push(ev(d, 2, 8, Finished { exit_code: 0 }));
        let v = fold(&task(events));
        assert_eq!(
            (v.attempt, v.status, v.exit_code),
            (2, TaskStatus::Done, Some(0))
        );
    }

    #[test]
    fn a_retry_before_the_attempt_ended_opens_nothing() {
        let events = vec![ev(desktop(), 1, 1, Started), ev(phone(), 1, 2, Retried)];
        let v = fold(&task(events));
        assert_eq!((v.attempt, v.status), (1, TaskStatus::Running));
    }

    #[test]
    fn a_retry_by_the_desktop_itself_opens_nothing() {
        let events = vec![
            ev(desktop(), 1, 1, Finished { exit_code: 2 }),
            ev(desktop(), 1, 2, Retried),
        ];
        assert_eq!(fold(&task(events)).attempt, 1);
    }

    #[test]
    fn two_terminal_facts_resolve_to_the_earliest() {
        let d = desktop();
        let events = vec![
            ev(
                d.clone(),
                1,
                9,
                Cancelled {
                    reason: "requested".into(),
                },
            ),
            ev(d, 1, 5, Finished { exit_code: 0 }),
        ];
        assert_eq!(fold(&task(events)).status, TaskStatus::Done);
    }

    proptest::proptest! {
        #[test]
        fn fold_ignores_list_order(seed in proptest::collection::vec((0u8..12, 0u8..3, 1u32..3, 0i64..50), 0..20)) {
            let devs = [desktop(), phone(), other()];
            let kinds = |k: u8| match k {
                0 => Delivered, 1 => ApprovalRequested, 2 => Started,
                3 => Output { text: "x".into() }, 4 => Finished { exit_code: 0 },
                5 => Finished { exit_code: 1 }, 6 => Failed { reason: "r".into() },
                7 => Denied, 8 => Interrupted, 9 => Approved, 10 => CancelRequested, _ => Retried,
            };
            // Distinct times, so "earliest terminal" never depends on list position.
            let events: Vec<_> = seed.iter().enumerate()
                .map(|(i, (k, d, a, t))| ev(devs[*d as usize].clone(), *a, t * 100 + i as i64, kinds(*k)))
                .collect();
            let mut shuffled = events.clone();
            shuffled.reverse();
            let (a, b) = (fold(&task(events)), fold(&task(shuffled)));
            proptest::prop_assert_eq!(a.status, b.status);
            proptest::prop_assert_eq!(a.attempt, b.attempt);
            proptest::prop_assert_eq!(a.requests, b.requests);
        }
    }
}
