//! The records and enums the bridge exports, and their conversions from the domain types.
//! Times are UTC milliseconds since the Unix epoch (`*_ms`), as in the document.

use errand_core::{BlobHash, BlobRef, DeviceId, Message, Task, TaskId, fold};
use errand_p2p::api::{OUTPUT_TAIL_BYTES, tail};

/// How to open a phone home.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct OpenOptions {
    /// Multiaddrs to listen on. Empty: all interfaces, TCP, a random port.
    #[uniffi(default)]
    pub listen: Vec<String>,
    /// Find the desktop on the LAN by mDNS.
    #[uniffi(default = true)]
    pub mdns: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            mdns: true,
        }
    }
}

// The domain's own enums and event record, exported as they are. UniFFI needs each one's
// shape restated here (`uniffi::remote`); it checks the restatement against the real type, so
// a variant or field added in `errand_core` fails to compile here instead of drifting. The
// `as` names keep the names the bindings have always had.
pub use errand_core::{
    EventKind as TaskEventKind, MessageKind, PendingPermission, PermissionChoice, PlanEntry,
    Request as TaskRequest, Role, TaskEvent as TaskEventView, TaskStatus, ToolCallView,
};
pub use errand_p2p::api::{ConnectionPath, Paired as PairResult};

/// Where a task stands (DESIGN.md section 3); `queued`: the desktop has not confirmed it yet.
#[uniffi::remote(Enum)]
pub enum TaskStatus {
    Queued,
    FetchingAttachments,
    Delivered,
    AwaitingApproval,
    Running,
    AwaitingPermission,
    Done,
    Failed,
    Cancelled,
    Denied,
    Interrupted,
}

/// A request from a phone that the desktop has not answered yet.
#[uniffi::remote(Enum)]
pub enum TaskRequest {
    CancelRequested,
    Approved,
    Denied,
}

/// What an event says: a fact from the desktop, or a request from a phone.
#[uniffi::remote(Enum)]
pub enum TaskEventKind {
    Fetching,
    Delivered,
    ApprovalRequested,
    Started,
    Output {
        text: String,
    },
    Finished {
        exit_code: i64,
    },
    Failed {
        reason: String,
    },
    Cancelled {
        reason: String,
    },
    Denied,
    Interrupted,
    Approved,
    CancelRequested,
    Retried,
    Replied {
        text: String,
    },
    AgentSession {
        session_id: String,
        how: String,
    },
    ToolCall {
        call_id: String,
        title: String,
        tool_kind: String,
        status: String,
    },
    Plan {
        entries: Vec<PlanEntry>,
    },
    PermissionRequested {
        perm_id: String,
        title: String,
        tool_kind: String,
        options: Vec<PermissionChoice>,
    },
    PermissionAnswered {
        perm_id: String,
        option_id: String,
    },
    PermissionResolved {
        perm_id: String,
        option_id: String,
        by: String,
    },
    Artifact {
        file: BlobRef,
    },
}

/// A file the thread names: an attachment of a task or an artifact of an attempt. `hash` is
/// its BLAKE3 hash in hex; `name` is one plain file name, never a path.
#[uniffi::remote(Record)]
pub struct BlobRef {
    hash: BlobHash,
    name: String,
    size: u64,
    mime: String,
}

/// One step of an agent's plan.
#[uniffi::remote(Record)]
pub struct PlanEntry {
    content: String,
    status: String,
}

/// One option of a permission request: `kind` is allow_once, allow_always, reject_once or
/// reject_always.
#[uniffi::remote(Record)]
pub struct PermissionChoice {
    id: String,
    name: String,
    kind: String,
}

/// A tool call of the agent's current turn.
#[uniffi::remote(Record)]
pub struct ToolCallView {
    id: String,
    title: String,
    kind: String,
    status: String,
}

/// The permission request the agent waits on; answer it with `answer_permission`.
#[uniffi::remote(Record)]
pub struct PendingPermission {
    id: String,
    title: String,
    kind: String,
    options: Vec<PermissionChoice>,
}

/// Who speaks in a conversation.
#[uniffi::remote(Enum)]
pub enum Role {
    User,
    Agent,
}

/// One entry of a task's conversation, `at_ms` in UTC ms.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct UtteranceView {
    /// When it was said.
    pub at_ms: i64,
    /// Who said it.
    pub role: Role,
    /// What was said.
    pub text: String,
}

/// One entry of a task's history: `at` in UTC ms by its author's clock, the attempt it
/// belongs to (1-based), the device that wrote it.
#[uniffi::remote(Record)]
pub struct TaskEventView {
    at: i64,
    attempt: u32,
    author: DeviceId,
    kind: TaskEventKind,
}

/// Who a message speaks for.
#[uniffi::remote(Enum)]
pub enum MessageKind {
    User,
    Agent,
    System,
}

/// How a connection reaches the desktop.
#[uniffi::remote(Enum)]
pub enum ConnectionPath {
    Direct,
    Relayed,
}

// Ids cross the FFI as their text (a PeerId, a ULID); text from the app is parsed back.
uniffi::custom_type!(DeviceId, String, {
    remote,
    lower: |id| id.to_string(),
    try_lift: |s| Ok(s.parse()?),
});
uniffi::custom_type!(BlobHash, String, {
    remote,
    lower: |h| h.to_string(),
    try_lift: |s| Ok(s.parse()?),
});
uniffi::custom_type!(TaskId, String, {
    remote,
    lower: |id| id.to_string(),
    try_lift: |s| Ok(s.parse()?),
});

/// An artifact written to a folder by `fetch_artifacts`.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct FetchedFile {
    /// The file as the thread names it.
    pub file: BlobRef,
    /// Where it was written.
    pub local_path: String,
}

/// A task as this phone sees it now.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct TaskView {
    /// Task id (a ULID).
    pub id: TaskId,
    /// What to do.
    pub instruction: String,
    /// The executor that runs it.
    pub executor: String,
    /// The desktop that runs it (PeerId).
    pub target: DeviceId,
    /// The device that created it (PeerId).
    pub author: DeviceId,
    /// When it was created.
    pub created_at_ms: i64,
    /// After this the desktop cancels it instead of running it.
    pub not_after_ms: Option<i64>,
    /// Where the latest attempt stands.
    pub status: TaskStatus,
    /// The latest attempt (1-based).
    pub attempt: u32,
    /// Exit code of the latest attempt, once it finished.
    pub exit_code: Option<i64>,
    /// The reason given with `failed` or `cancelled`.
    pub reason: Option<String>,
    /// The last 4 KiB of the latest attempt's output.
    pub output_tail: String,
    /// Requests the desktop has not answered yet.
    pub requests: Vec<TaskRequest>,
    /// The whole history, in document order.
    pub events: Vec<TaskEventView>,
    /// The conversation: the instruction and replies (`user`), each attempt's output (`agent`).
    pub conversation: Vec<UtteranceView>,
    /// The latest attempt's tool calls.
    pub tool_calls: Vec<ToolCallView>,
    /// The latest attempt's plan.
    pub plan: Vec<PlanEntry>,
    /// The permission request the agent waits on, unanswered.
    pub permission: Option<PendingPermission>,
    /// Files sent with the task.
    pub attachments: Vec<BlobRef>,
    /// Files the desktop produced, over all attempts.
    pub artifacts: Vec<BlobRef>,
}

impl From<&Task> for TaskView {
    fn from(t: &Task) -> Self {
        let v = fold(t);
        Self {
            id: t.id,
            instruction: t.instruction.clone(),
            executor: t.executor.clone(),
            target: t.target.clone(),
            author: t.author.clone(),
            created_at_ms: t.created_at,
            not_after_ms: t.not_after,
            status: v.status,
            attempt: v.attempt,
            exit_code: v.exit_code,
            reason: v.reason,
            output_tail: tail(&v.output, OUTPUT_TAIL_BYTES),
            requests: v.requests,
            events: t.events.clone(),
            conversation: v
                .conversation
                .into_iter()
                .map(|u| UtteranceView {
                    at_ms: u.at,
                    role: u.role,
                    text: u.text,
                })
                .collect(),
            tool_calls: v.tool_calls,
            plan: v.plan,
            permission: v.permission,
            attachments: t.attachments.clone(),
            artifacts: v.artifacts,
        }
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct MessageView {
    /// Message id (a ULID).
    pub id: String,
    /// The device that wrote it (PeerId).
    pub author: DeviceId,
    /// Who it speaks for.
    pub kind: MessageKind,
    /// The text.
    pub text: String,
    /// When it was written.
    pub at_ms: i64,
    /// The task it is about.
    pub task: Option<TaskId>,
}

impl From<&Message> for MessageView {
    fn from(m: &Message) -> Self {
        Self {
            id: m.id.to_string(),
            author: m.author.clone(),
            kind: m.kind,
            text: m.text.clone(),
            at_ms: m.at,
            task: m.task,
        }
    }
}

/// The whole thread.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ThreadView {
    /// Thread id.
    pub thread_id: String,
    /// Every task, oldest first.
    pub tasks: Vec<TaskView>,
    /// Every message, in thread order.
    pub messages: Vec<MessageView>,
}

/// One paired desktop in [`StatusView`].
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct DesktopStatus {
    /// Its PeerId.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Connected now.
    pub connected: bool,
    /// How, when connected.
    pub path: Option<ConnectionPath>,
    /// It has exactly this phone's changes, and this phone has its changes, right now.
    pub in_sync: bool,
    /// The last time the two were in sync.
    pub last_sync_at_ms: Option<i64>,
    /// Revoked (refused from now on).
    pub revoked: bool,
}

/// This phone and its desktop.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct StatusView {
    /// This phone's PeerId.
    pub peer_id: String,
    /// This phone's name.
    pub name: String,
    /// The thread, once paired.
    pub thread_id: Option<String>,
    /// The network runs in this client.
    pub running: bool,
    /// Where this phone listens.
    pub listen_addrs: Vec<String>,
    /// Paired desktops (one, today).
    pub desktops: Vec<DesktopStatus>,
}

/// What pairing did: the desktop's PeerId and name, the thread this phone now follows, and
/// whether the first full sync finished (if not, it goes on in the background).
#[uniffi::remote(Record)]
pub struct PairResult {
    desktop_id: String,
    desktop_name: String,
    thread_id: String,
    synced: bool,
}

/// A routine as this phone sees it now.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct RoutineView {
    /// Routine id (a ULID).
    pub id: String,
    /// What each occurrence does.
    pub instruction: String,
    /// The executor that runs it.
    pub executor: String,
    /// When it is due, in words (`every 2h`, `cron "0 8 * * 1-5" (Europe/Berlin)`).
    pub schedule: String,
    /// The interval in milliseconds, for an interval routine.
    pub every_ms: Option<u64>,
    /// The cron expression, for a cron routine.
    pub cron: Option<String>,
    /// The cron expression's time zone.
    pub tz: Option<String>,
    /// `skip`, `once` or `all`.
    pub catch_up: String,
    /// With `all`: most missed occurrences run after a gap.
    pub catch_up_cap: u32,
    /// `active`, `paused` or `deleted`.
    pub state: String,
    /// Who created it (PeerId).
    pub author: String,
    /// When it was created, RFC 3339.
    pub created_at: String,
    /// The newest occurrence's task id, if this phone holds one.
    pub last_task_id: Option<String>,
    /// When that occurrence was due, RFC 3339.
    pub last_scheduled_at: Option<String>,
    /// That occurrence's status.
    pub last_status: Option<TaskStatus>,
    /// The next due time, RFC 3339 (none unless active).
    pub next_at: Option<String>,
    /// Occurrences the desktop recorded as missed, in all.
    pub missed: u64,
}

impl From<&errand_p2p::api::RoutineInfo> for RoutineView {
    fn from(r: &errand_p2p::api::RoutineInfo) -> Self {
        let (every_ms, cron, tz) = match &r.schedule_spec {
            errand_core::Schedule::Every { every_ms } => (Some(*every_ms), None, None),
            errand_core::Schedule::Cron { expr, tz } => {
                (None, Some(expr.clone()), Some(tz.clone()))
            }
        };
        Self {
            id: r.id.clone(),
            instruction: r.instruction.clone(),
            executor: r.executor.clone(),
            schedule: r.schedule.clone(),
            every_ms,
            cron,
            tz,
            catch_up: r.catch_up.name().to_owned(),
            catch_up_cap: r.catch_up_cap,
            state: r.state.name().to_owned(),
            author: r.author.to_string(),
            created_at: r.created_at.clone(),
            last_task_id: r.last.as_ref().map(|l| l.task_id.clone()),
            last_scheduled_at: r.last.as_ref().map(|l| l.scheduled_at.clone()),
            last_status: r.last.as_ref().map(|l| l.status),
            next_at: r.next_at.clone(),
            missed: r.missed,
        }
    }
}
