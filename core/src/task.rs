//! Tasks, their events, and the pure status fold.
//!
//! A task's history is a list of events. Only the task's *target* desktop writes facts
//! (`fetching`, `delivered`, `approval_requested`, `started`, `output`, `finished`, `failed`, `cancelled`,
//! `denied`, `interrupted`, and for agents `agent_session`, `tool_call`, `plan`,
//! `permission_requested`, `permission_resolved`). Other devices write requests
//! (`cancel_requested`, `approved`, `denied`, `retried`, `replied`, `permission_answered`).
//! [`fold`] turns that history into a [`TaskView`]: the status of the latest attempt, plus the
//! requests still waiting for an answer.
//!
//! With an agent (an ACP executor), a task is a conversation and each attempt is one turn: a
//! `replied` request on an ended attempt opens the next one, whose prompt is the reply.

use serde::{Deserialize, Serialize};

use crate::{
    DeviceId, TaskId,
    blob::{BlobRef, MAX_ARTIFACTS_PER_ATTEMPT},
    time::Millis,
};

/// What happened, with its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// Fact: the desktop has the task and fetches its attachments; `delivered` follows once
    /// every one is verified and in place. Written once per attempt, only for a task with
    /// attachments the desktop does not hold yet.
    Fetching,
    /// Fact: the desktop has the task (and its attachments, in place).
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
    /// Request: a reply to the ended attempt; it opens the next attempt (the agent's next
    /// turn), whose prompt is this text.
    Replied {
        /// What the person wrote.
        text: String,
    },
    /// Fact: the agent session this attempt's turn runs in.
    AgentSession {
        /// The agent's session id.
        session_id: String,
        /// How it was reached: [`SESSION_NEW`], [`SESSION_CONTINUED`], [`SESSION_LOADED`] or
        /// [`SESSION_NEW_WITH_TRANSCRIPT`].
        how: String,
    },
    /// Fact: a tool call the agent made, or a change of its status.
    ToolCall {
        /// The agent's id for the call; later facts with the same id update it.
        call_id: String,
        /// What it does, in the agent's words (empty in an update that keeps it).
        title: String,
        /// ACP's tool kind (`read`, `edit`, `execute`, …; empty when not given).
        tool_kind: String,
        /// `pending`, `in_progress`, `completed` or `failed`.
        status: String,
    },
    /// Fact: the agent's plan, whole (the latest one counts).
    Plan {
        /// Its entries, in order.
        entries: Vec<PlanEntry>,
    },
    /// Fact: the agent asks for permission and waits.
    PermissionRequested {
        /// This desktop's id for the request, unique within the attempt.
        perm_id: String,
        /// The tool call it is about.
        title: String,
        /// Its ACP tool kind.
        tool_kind: String,
        /// What the person may choose, in the agent's order.
        options: Vec<PermissionChoice>,
    },
    /// Request: a person's answer to a permission request.
    PermissionAnswered {
        /// The request.
        perm_id: String,
        /// The chosen option's id.
        option_id: String,
    },
    /// Fact: the answer the agent received.
    PermissionResolved {
        /// The request.
        perm_id: String,
        /// The option sent to the agent; empty when the request was cancelled.
        option_id: String,
        /// Who answered: [`ANSWERED_BY_PHONE`], [`ANSWERED_BY_AUTO`], [`ANSWERED_BY_EXPIRY`]
        /// or [`ANSWERED_BY_CANCEL`].
        by: String,
    },
    /// Fact: a file the attempt produced (what the task wrote to `$ERRAND_OUT`), served over
    /// `/errand/blob/1`. At most [`MAX_ARTIFACTS_PER_ATTEMPT`] count per attempt.
    Artifact {
        /// The file.
        file: BlobRef,
    },
}

/// `agent_session.how`: a new session.
pub const SESSION_NEW: &str = "new";
/// `agent_session.how`: the session of the previous turn, still open in the agent.
pub const SESSION_CONTINUED: &str = "continued";
/// `agent_session.how`: the previous session, loaded again (`session/load`).
pub const SESSION_LOADED: &str = "loaded";
/// `agent_session.how`: the previous session was gone; a new one got the transcript.
pub const SESSION_NEW_WITH_TRANSCRIPT: &str = "new_with_transcript";

/// `permission_resolved.by`: the person's answer.
pub const ANSWERED_BY_PHONE: &str = "phone";
/// `permission_resolved.by`: the desktop's `auto_allow` setting.
pub const ANSWERED_BY_AUTO: &str = "auto";
/// `permission_resolved.by`: nobody answered within `permission_expiry`.
pub const ANSWERED_BY_EXPIRY: &str = "expired";
/// `permission_resolved.by`: the turn ended first (cancelled, or the agent went away).
pub const ANSWERED_BY_CANCEL: &str = "cancelled";

/// Most options one permission request keeps.
pub const MAX_PERMISSION_OPTIONS: usize = 8;
/// Most entries one plan keeps.
pub const MAX_PLAN_ENTRIES: usize = 32;

/// One entry of an agent's plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanEntry {
    /// What the step is.
    pub content: String,
    /// `pending`, `in_progress` or `completed`.
    pub status: String,
}

/// One option of a permission request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermissionChoice {
    /// The agent's option id, which the answer names.
    pub id: String,
    /// Its label.
    pub name: String,
    /// `allow_once`, `allow_always`, `reject_once` or `reject_always`.
    pub kind: String,
}

impl PermissionChoice {
    /// True for the `allow_*` kinds.
    pub fn allows(&self) -> bool {
        self.kind.starts_with("allow")
    }

    /// True for the `reject_*` kinds.
    pub fn rejects(&self) -> bool {
        self.kind.starts_with("reject")
    }
}

impl EventKind {
    /// The kind's name in the document.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Fetching => "fetching",
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
            Self::Replied { .. } => "replied",
            Self::AgentSession { .. } => "agent_session",
            Self::ToolCall { .. } => "tool_call",
            Self::Plan { .. } => "plan",
            Self::PermissionRequested { .. } => "permission_requested",
            Self::PermissionAnswered { .. } => "permission_answered",
            Self::PermissionResolved { .. } => "permission_resolved",
            Self::Artifact { .. } => "artifact",
        }
    }

    /// True for the requests that open a new attempt once the named one has ended.
    pub fn opens_attempt(&self) -> bool {
        matches!(self, Self::Retried | Self::Replied { .. })
    }

    /// The names of the kinds for which [`Self::opens_attempt`] holds.
    pub fn opening_names() -> [&'static str; 2] {
        ["retried", "replied"]
    }

    /// True for facts of which an attempt holds many (output and the agent's steps); every
    /// other fact is written once per attempt.
    pub fn is_repeated_fact(&self) -> bool {
        matches!(
            self,
            Self::Output { .. }
                | Self::ToolCall { .. }
                | Self::Plan { .. }
                | Self::PermissionRequested { .. }
                | Self::PermissionResolved { .. }
                | Self::Artifact { .. }
        )
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
        !matches!(
            self,
            Self::Approved
                | Self::CancelRequested
                | Self::Retried
                | Self::Replied { .. }
                | Self::PermissionAnswered { .. }
        )
    }

    /// True for kinds that count only when another device writes them.
    /// (`denied` is both: a request from a phone, a fact from the desktop.)
    pub fn is_request_kind(&self) -> bool {
        matches!(
            self,
            Self::Approved
                | Self::CancelRequested
                | Self::Retried
                | Self::Denied
                | Self::Replied { .. }
                | Self::PermissionAnswered { .. }
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
    /// Files the author sent with it (written in the same change as the task), at most
    /// [`crate::blob::MAX_ATTACHMENTS`].
    #[serde(default)]
    pub attachments: Vec<BlobRef>,
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
    /// The desktop has it and fetches its attachments.
    FetchingAttachments,
    /// The desktop has it.
    Delivered,
    /// The desktop waits for approval.
    AwaitingApproval,
    /// The process runs.
    Running,
    /// The agent waits for a person's answer to a permission request.
    AwaitingPermission,
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
            Self::FetchingAttachments => "fetching_attachments",
            Self::Delivered => "delivered",
            Self::AwaitingApproval => "awaiting_approval",
            Self::Running => "running",
            Self::AwaitingPermission => "awaiting_permission",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Denied => "denied",
            Self::Interrupted => "interrupted",
        }
    }

    /// The status in words, for a person: [`Self::as_str`], except `fetching attachments`.
    pub fn label(self) -> &'static str {
        match self {
            Self::FetchingAttachments => "fetching attachments",
            s => s.as_str(),
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
    /// The conversation, oldest first: the instruction and each reply that opened an attempt
    /// (`user`), and each attempt's output (`agent`).
    pub conversation: Vec<Utterance>,
    /// The latest attempt's tool calls, in the order they first appeared.
    pub tool_calls: Vec<ToolCallView>,
    /// The latest attempt's plan (its newest `plan` fact).
    pub plan: Vec<PlanEntry>,
    /// The permission request the agent waits on that no fact and no answer settles yet.
    pub permission: Option<PendingPermission>,
    /// Files the desktop produced, over all attempts in list order (each attempt's first
    /// [`MAX_ARTIFACTS_PER_ATTEMPT`]), without repeats of the same hash and name.
    pub artifacts: Vec<BlobRef>,
}

/// Who speaks in a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The person: the instruction and the replies.
    User,
    /// The executor: what it said in an attempt.
    Agent,
}

/// One entry of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Utterance {
    /// When it was written (the first batch, for an agent's).
    pub at: Millis,
    /// Who speaks.
    pub role: Role,
    /// What was said.
    pub text: String,
}

/// A tool call as its facts leave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallView {
    /// The agent's id for it.
    pub id: String,
    /// Its title (the first one given).
    pub title: String,
    /// Its ACP tool kind (the first one given).
    pub kind: String,
    /// Its latest status.
    pub status: String,
}

/// A permission request waiting for an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingPermission {
    /// The id an answer names.
    pub id: String,
    /// The tool call it is about.
    pub title: String,
    /// Its ACP tool kind.
    pub kind: String,
    /// The choices.
    pub options: Vec<PermissionChoice>,
}

/// The prompt of `attempt`: the reply that opened it, else the instruction (attempt 1, and an
/// attempt opened by a retry).
pub fn prompt_of(task: &Task, attempt: u32) -> &str {
    attempt
        .checked_sub(1)
        .and_then(|previous| opening_reply(task, previous))
        .map_or(task.instruction.as_str(), |(_, text)| text)
}

/// The reply that opens the attempt after `attempt`: the first by time, then list order.
fn opening_reply(task: &Task, attempt: u32) -> Option<(Millis, &str)> {
    task.events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.attempt == attempt && e.author != task.target)
        .filter_map(|(i, e)| match &e.kind {
            EventKind::Replied { text } => Some((e.at, i, text.as_str())),
            _ => None,
        })
        .min_by_key(|(at, i, _)| (*at, *i))
        .map(|(at, _, text)| (at, text))
}

/// Rank of a fact for the status table: higher wins within an attempt.
fn rank(kind: &EventKind) -> u8 {
    match kind {
        k if k.is_terminal() => 5,
        EventKind::Started => 4,
        EventKind::ApprovalRequested => 3,
        EventKind::Delivered => 2,
        EventKind::Fetching => 1,
        _ => 0,
    }
}

/// Folds a task's history into its view. Pure: same events in, same view out, on every peer.
///
/// - Only the target's facts count; facts from anyone else are ignored.
/// - Attempt 1 is open from the start. A `retried` request naming attempt n opens attempt n+1,
///   but only once attempt n has a terminal fact.
/// - Within the latest attempt the highest-ranked fact decides (terminal > started >
///   approval requested > delivered > fetching), so list order and duplicates do not matter. If the
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
    let reopened = |attempt: u32| {
        task.events
            .iter()
            .any(|e| e.attempt == attempt && is_request(e) && e.kind.opens_attempt())
    };

    let mut attempt = 1u32;
    while attempt < u32::MAX && terminal_in(attempt).is_some() && reopened(attempt) {
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
                4 => TaskStatus::Running,
                3 => TaskStatus::AwaitingApproval,
                2 => TaskStatus::Delivered,
                1 => TaskStatus::FetchingAttachments,
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
            EventKind::Approved if best < 4 && !status.is_terminal() => Some(Request::Approved),
            EventKind::Denied if best < 4 && !status.is_terminal() => Some(Request::Denied),
            _ => None,
        })
        .collect();
    requests.sort();
    requests.dedup();

    let output_of = |n: u32| -> (Option<Millis>, String) {
        let mut first = None;
        let text = task
            .events
            .iter()
            .filter(|e| e.attempt == n && is_fact(e))
            .filter_map(|e| match &e.kind {
                EventKind::Output { text } => {
                    first = Some(first.map_or(e.at, |f: Millis| f.min(e.at)));
                    Some(text.as_str())
                }
                _ => None,
            })
            .collect();
        (first, text)
    };
    let (_, output) = output_of(attempt);

    let mut conversation = vec![Utterance {
        at: task.created_at,
        role: Role::User,
        text: task.instruction.clone(),
    }];
    for n in 1..=attempt {
        if n > 1
            && let Some((at, text)) = opening_reply(task, n - 1)
        {
            conversation.push(Utterance {
                at,
                role: Role::User,
                text: text.to_owned(),
            });
        }
        let (at, text) = output_of(n);
        if let Some(at) = at
            && !text.is_empty()
        {
            conversation.push(Utterance {
                at,
                role: Role::Agent,
                text,
            });
        }
    }

    let latest = || {
        task.events
            .iter()
            .filter(move |e| e.attempt == attempt && is_fact(e))
    };
    let mut tool_calls: Vec<ToolCallView> = Vec::new();
    for e in latest() {
        let EventKind::ToolCall {
            call_id,
            title,
            tool_kind,
            status,
        } = &e.kind
        else {
            continue;
        };
        match tool_calls.iter_mut().find(|c| c.id == *call_id) {
            Some(c) => {
                if c.title.is_empty() {
                    c.title.clone_from(title);
                }
                if c.kind.is_empty() {
                    c.kind.clone_from(tool_kind);
                }
                if !status.is_empty() {
                    c.status.clone_from(status);
                }
            }
            None => tool_calls.push(ToolCallView {
                id: call_id.clone(),
                title: title.clone(),
                kind: tool_kind.clone(),
                status: status.clone(),
            }),
        }
    }
    let plan = latest()
        .enumerate()
        .filter_map(|(i, e)| match &e.kind {
            EventKind::Plan { entries } => Some((e.at, i, entries)),
            _ => None,
        })
        .max_by_key(|(at, i, _)| (*at, *i))
        .map(|(_, _, entries)| entries.clone())
        .unwrap_or_default();

    let settled = |id: &str| {
        task.events.iter().any(|e| {
            e.attempt == attempt
                && match &e.kind {
                    EventKind::PermissionResolved { perm_id, .. } => is_fact(e) && perm_id == id,
                    EventKind::PermissionAnswered { perm_id, .. } => is_request(e) && perm_id == id,
                    _ => false,
                }
        })
    };
    let permission = if status.is_terminal() {
        None
    } else {
        latest().find_map(|e| match &e.kind {
            EventKind::PermissionRequested {
                perm_id,
                title,
                tool_kind,
                options,
            } if !settled(perm_id) => Some(PendingPermission {
                id: perm_id.clone(),
                title: title.clone(),
                kind: tool_kind.clone(),
                options: options.clone(),
            }),
            _ => None,
        })
    };
    let status = if permission.is_some() && status == TaskStatus::Running {
        TaskStatus::AwaitingPermission
    } else {
        status
    };

    TaskView {
        status,
        attempt,
        exit_code,
        reason,
        requests,
        output,
        conversation,
        tool_calls,
        plan,
        permission,
        artifacts: artifacts_of(task),
    }
}

/// The target's `artifact` facts over all attempts, in list order: each attempt's first
/// [`MAX_ARTIFACTS_PER_ATTEMPT`], without repeats of the same hash and name.
pub fn artifacts_of(task: &Task) -> Vec<BlobRef> {
    let mut per_attempt: std::collections::BTreeMap<u32, usize> = Default::default();
    let mut out: Vec<BlobRef> = Vec::new();
    for e in &task.events {
        let EventKind::Artifact { file: b } = &e.kind else {
            continue;
        };
        if e.author != task.target {
            continue;
        }
        let n = per_attempt.entry(e.attempt).or_default();
        if *n >= MAX_ARTIFACTS_PER_ATTEMPT {
            continue;
        }
        *n += 1;
        if !out.iter().any(|o| o.hash == b.hash && o.name == b.name) {
            out.push(b.clone());
        }
    }
    out
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
            attachments: vec![],
            events,
        }
    }
    use EventKind::*;

    fn blob(n: u8, name: &str) -> BlobRef {
        BlobRef {
            hash: crate::BlobHash::from_bytes([n; 32]),
            name: name.into(),
            size: u64::from(n),
            mime: "text/plain".into(),
        }
    }

    #[test]
    fn artifacts_count_only_from_the_target_capped_per_attempt_without_repeats() {
        let (d, p) = (desktop(), phone());
        let mut events = vec![
            ev(
                p.clone(),
                1,
                1,
                Artifact {
                    file: blob(9, "forged.txt"),
                },
            ),
            ev(
                d.clone(),
                1,
                2,
                Artifact {
                    file: blob(1, "a.txt"),
                },
            ),
            ev(
                d.clone(),
                1,
                3,
                Artifact {
                    file: blob(1, "a.txt"),
                },
            ),
            ev(
                d.clone(),
                1,
                4,
                Artifact {
                    file: blob(2, "b.txt"),
                },
            ),
        ];
        for i in 0..100u8 {
            events.push(ev(
                d.clone(),
                2,
                10,
                Artifact {
                    file: blob(i, &format!("{i}.txt")),
                },
            ));
        }
        let v = fold(&task(events));
        assert_eq!(v.artifacts[0], blob(1, "a.txt"));
        assert_eq!(v.artifacts[1], blob(2, "b.txt"));
        assert!(!v.artifacts.iter().any(|a| a.name == "forged.txt"));
        assert_eq!(v.artifacts.len(), 2 + MAX_ARTIFACTS_PER_ATTEMPT);
    }

    #[test]
    fn a_task_without_facts_is_queued() {
        let v = fold(&task(vec![]));
        assert_eq!(v.status, TaskStatus::Queued);
        assert_eq!(v.attempt, 1);
    }

    #[test]
    fn an_agent_task_folds_into_a_conversation_with_tool_calls_and_a_plan() {
        let d = desktop();
        let call = |id: &str, title: &str, status: &str| ToolCall {
            call_id: id.into(),
            title: title.into(),
            tool_kind: if title.is_empty() { "" } else { "read" }.into(),
            status: status.into(),
        };
        let plan = |status: &str| Plan {
            entries: vec![PlanEntry {
                content: "Answer".into(),
                status: status.into(),
            }],
        };
        let mut t = task(vec![
            ev(d.clone(), 1, 2, Started),
            ev(d.clone(), 1, 3, plan("in_progress")),
            ev(d.clone(), 1, 4, call("c1", "Look around", "pending")),
            ev(d.clone(), 1, 5, Output { text: "Hel".into() }),
            ev(d.clone(), 1, 6, call("c1", "", "completed")),
            ev(d.clone(), 1, 7, Output { text: "lo".into() }),
            ev(d.clone(), 1, 8, plan("completed")),
            // Another device's steps are not the agent's.
            ev(phone(), 1, 8, call("c9", "forged", "pending")),
        ]);
        let v = fold(&t);
        assert_eq!(v.status, TaskStatus::Running);
        assert_eq!(
            v.tool_calls,
            vec![ToolCallView {
                id: "c1".into(),
                title: "Look around".into(),
                kind: "read".into(),
                status: "completed".into(),
            }]
        );
        assert_eq!(v.plan[0].status, "completed");
        t.events
            .push(ev(d.clone(), 1, 9, Finished { exit_code: 0 }));
        t.events.push(ev(
            phone(),
            1,
            10,
            Replied {
                text: "more".into(),
            },
        ));
        t.events.push(ev(d.clone(), 2, 11, Started));
        t.events.push(ev(
            d,
            2,
            12,
            Output {
                text: "More.".into(),
            },
        ));
        let v = fold(&t);
        assert_eq!((v.attempt, v.status), (2, TaskStatus::Running));
        assert!(v.tool_calls.is_empty() && v.plan.is_empty());
        let said: Vec<(Role, &str)> = v
            .conversation
            .iter()
            .map(|u| (u.role, u.text.as_str()))
            .collect();
        assert_eq!(
            said,
            vec![
                (Role::User, "echo hi"),
                (Role::Agent, "Hello"),
                (Role::User, "more"),
                (Role::Agent, "More."),
            ]
        );
    }

    #[test]
    fn status_follows_the_table() {
        let d = desktop();
        let cases = [
            (vec![Fetching], TaskStatus::FetchingAttachments),
            (vec![Fetching, Delivered], TaskStatus::Delivered),
            (vec![Delivered, Fetching], TaskStatus::Delivered),
            (
                vec![
                    Fetching,
                    Cancelled {
                        reason: "requested".into(),
                    },
                ],
                TaskStatus::Cancelled,
            ),
            (
                vec![
                    Fetching,
                    Failed {
                        reason: "could not fetch".into(),
                    },
                ],
                TaskStatus::Failed,
            ),
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
