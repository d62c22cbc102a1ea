//! The records and enums the bridge exports, and their conversions from the domain types.
//! Times are UTC milliseconds since the Unix epoch (`*_ms`), as in the document.

use errand_core::{EventKind, Message, Task, TaskEvent, fold};
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

/// Where a task stands (DESIGN.md section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum TaskStatus {
    /// Only on this phone, as far as anyone knows: the desktop has not confirmed it.
    Queued,
    /// The desktop has it.
    Delivered,
    /// The desktop waits for this phone's approval.
    AwaitingApproval,
    /// It runs.
    Running,
    /// It finished with exit code 0.
    Done,
    /// It finished non-zero, or could not run.
    Failed,
    /// Cancelled by request, expiry or revocation.
    Cancelled,
    /// Denied.
    Denied,
    /// The desktop restarted while it ran; it does not run again by itself.
    Interrupted,
}

impl From<errand_core::TaskStatus> for TaskStatus {
    fn from(s: errand_core::TaskStatus) -> Self {
        use errand_core::TaskStatus as S;
        match s {
            S::Queued => Self::Queued,
            S::Delivered => Self::Delivered,
            S::AwaitingApproval => Self::AwaitingApproval,
            S::Running => Self::Running,
            S::Done => Self::Done,
            S::Failed => Self::Failed,
            S::Cancelled => Self::Cancelled,
            S::Denied => Self::Denied,
            S::Interrupted => Self::Interrupted,
        }
    }
}

/// A request from a phone that the desktop has not answered yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
pub enum TaskRequest {
    /// Cancel requested.
    CancelRequested,
    /// Approved.
    Approved,
    /// Denied.
    Denied,
}

impl From<errand_core::Request> for TaskRequest {
    fn from(r: errand_core::Request) -> Self {
        match r {
            errand_core::Request::CancelRequested => Self::CancelRequested,
            errand_core::Request::Approved => Self::Approved,
            errand_core::Request::Denied => Self::Denied,
        }
    }
}

/// What an event says.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum TaskEventKind {
    /// Fact: the desktop has the task.
    Delivered,
    /// Fact: the desktop waits for approval.
    ApprovalRequested,
    /// Fact: the process started.
    Started,
    /// Fact: a batch of output.
    Output {
        /// The text.
        text: String,
    },
    /// Fact: the process exited.
    Finished {
        /// Its exit code.
        exit_code: i64,
    },
    /// Fact: it could not run or complete.
    Failed {
        /// Why.
        reason: String,
    },
    /// Fact: the desktop cancelled it.
    Cancelled {
        /// Why.
        reason: String,
    },
    /// Fact from the desktop, or a request from a phone.
    Denied,
    /// Fact: the desktop restarted while it ran.
    Interrupted,
    /// Request: run it.
    Approved,
    /// Request: stop it.
    CancelRequested,
    /// Request: run it again.
    Retried,
}

impl From<&EventKind> for TaskEventKind {
    fn from(k: &EventKind) -> Self {
        match k {
            EventKind::Delivered => Self::Delivered,
            EventKind::ApprovalRequested => Self::ApprovalRequested,
            EventKind::Started => Self::Started,
            EventKind::Output { text } => Self::Output { text: text.clone() },
            EventKind::Finished { exit_code } => Self::Finished {
                exit_code: *exit_code,
            },
            EventKind::Failed { reason } => Self::Failed {
                reason: reason.clone(),
            },
            EventKind::Cancelled { reason } => Self::Cancelled {
                reason: reason.clone(),
            },
            EventKind::Denied => Self::Denied,
            EventKind::Interrupted => Self::Interrupted,
            EventKind::Approved => Self::Approved,
            EventKind::CancelRequested => Self::CancelRequested,
            EventKind::Retried => Self::Retried,
        }
    }
}

/// One entry of a task's history.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct TaskEventView {
    /// When, by its author's clock.
    pub at_ms: i64,
    /// The attempt it belongs to (1-based).
    pub attempt: u32,
    /// The device that wrote it (PeerId).
    pub author: String,
    /// What it says.
    pub kind: TaskEventKind,
}

impl From<&TaskEvent> for TaskEventView {
    fn from(e: &TaskEvent) -> Self {
        Self {
            at_ms: e.at,
            attempt: e.attempt,
            author: e.author.to_string(),
            kind: (&e.kind).into(),
        }
    }
}

/// A task as this phone sees it now.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct TaskView {
    /// Task id (a ULID).
    pub id: String,
    /// What to do.
    pub instruction: String,
    /// The executor that runs it.
    pub executor: String,
    /// The desktop that runs it (PeerId).
    pub target: String,
    /// The device that created it (PeerId).
    pub author: String,
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
}

impl From<&Task> for TaskView {
    fn from(t: &Task) -> Self {
        let v = fold(t);
        Self {
            id: t.id.to_string(),
            instruction: t.instruction.clone(),
            executor: t.executor.clone(),
            target: t.target.to_string(),
            author: t.author.to_string(),
            created_at_ms: t.created_at,
            not_after_ms: t.not_after,
            status: v.status.into(),
            attempt: v.attempt,
            exit_code: v.exit_code,
            reason: v.reason,
            output_tail: tail(&v.output, OUTPUT_TAIL_BYTES),
            requests: v.requests.into_iter().map(Into::into).collect(),
            events: t.events.iter().map(Into::into).collect(),
        }
    }
}

/// Who a message speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum MessageKind {
    /// A person.
    User,
    /// An agent on the desktop.
    Agent,
    /// Errand itself.
    System,
}

impl From<errand_core::MessageKind> for MessageKind {
    fn from(k: errand_core::MessageKind) -> Self {
        match k {
            errand_core::MessageKind::User => Self::User,
            errand_core::MessageKind::Agent => Self::Agent,
            errand_core::MessageKind::System => Self::System,
        }
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct MessageView {
    /// Message id (a ULID).
    pub id: String,
    /// The device that wrote it (PeerId).
    pub author: String,
    /// Who it speaks for.
    pub kind: MessageKind,
    /// The text.
    pub text: String,
    /// When it was written.
    pub at_ms: i64,
    /// The task it is about.
    pub task: Option<String>,
}

impl From<&Message> for MessageView {
    fn from(m: &Message) -> Self {
        Self {
            id: m.id.to_string(),
            author: m.author.to_string(),
            kind: m.kind.into(),
            text: m.text.clone(),
            at_ms: m.at,
            task: m.task.map(|t| t.to_string()),
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

/// How a connection reaches the desktop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum ConnectionPath {
    /// Straight to the desktop.
    Direct,
    /// Through a relay.
    Relayed,
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

/// What pairing did.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct PairResult {
    /// The desktop's PeerId.
    pub desktop_id: String,
    /// The desktop's name.
    pub desktop_name: String,
    /// The thread this phone now follows.
    pub thread_id: String,
    /// The first full sync finished (if not, it goes on in the background).
    pub synced: bool,
}

impl From<errand_p2p::pairing::PairOutcome> for PairResult {
    fn from(p: errand_p2p::pairing::PairOutcome) -> Self {
        Self {
            desktop_id: p.desktop_id,
            desktop_name: p.desktop_name,
            thread_id: p.thread_id,
            synced: p.synced,
        }
    }
}
