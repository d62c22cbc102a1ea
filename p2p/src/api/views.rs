//! The typed response of each request: what `--json` prints and what crosses the control
//! socket. Field names and order are the stable JSON shapes the README documents; times are
//! RFC 3339 strings, as printed.

use errand_core::{
    Action, DeviceId, DeviceKind, EventKind, Message, MessageKind, PendingPermission,
    PermissionChoice, PlanEntry, Role, Task, TaskEvent, TaskId, TaskStatus, ToolCallView, fold,
    time::rfc3339,
};
use serde::{Deserialize, Serialize};

use crate::{peer, replica::PathCounts};

/// Output kept in `output_tail`: the last 4 KiB reads comfortably on a phone screen.
pub const OUTPUT_TAIL_BYTES: usize = 4096;

/// The last `max` bytes of `s`, cut at a character boundary.
pub fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_owned()
}

/// `status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Our PeerId.
    pub peer_id: String,
    /// Desktop or phone.
    pub kind: DeviceKind,
    /// Our name.
    pub name: String,
    /// The thread, if this home has one.
    pub thread_id: Option<String>,
    /// Where we listen (empty when the network is not running here).
    pub listen_addrs: Vec<String>,
    /// Trusted peers.
    pub peers: Vec<PeerLine>,
    /// Relay state (null: no relay configured).
    pub relay: Option<RelayLine>,
    /// True when the network runs (a daemon answered, or this process started it).
    pub running: bool,
    /// The thread's documents: the meta document (part 0) and its segments.
    pub documents: Vec<DocumentLine>,
    /// How often each sync path ran in this process.
    pub sync: PathCounts,
}

/// How a connection reaches a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionPath {
    /// Straight to the peer.
    Direct,
    /// Through a relay.
    Relayed,
}

impl ConnectionPath {
    /// The path's name in JSON and on screen.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Relayed => "relayed",
        }
    }
}

/// One trusted peer in [`StatusInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLine {
    /// PeerId.
    pub id: String,
    /// Name.
    pub name: String,
    /// Desktop or phone.
    pub kind: DeviceKind,
    /// Connected now.
    pub connected: bool,
    /// How, when connected.
    pub path: Option<ConnectionPath>,
    /// Last time we were in sync, RFC 3339.
    pub last_sync_at: Option<String>,
    /// In sync now (the peer's heads equal ours).
    pub in_sync: bool,
    /// Revoked.
    pub revoked: bool,
    /// Bytes sent to it by this process.
    pub bytes_sent: u64,
    /// Bytes received from it by this process.
    pub bytes_received: u64,
}

/// The relay in [`StatusInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayLine {
    /// The relay's address.
    pub addr: String,
    /// Our reservation there: `none`, `pending` or `accepted`.
    pub reservation: ReservationState,
    /// Registered at its rendezvous point.
    pub registered: bool,
}

/// A relay reservation's state (`relay_client::Reservation`, as `status --json` shows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationState {
    /// Not connected to the relay.
    None,
    /// Connected, reservation requested.
    Pending,
    /// Reservation accepted: we are reachable through the relay.
    Accepted,
}

/// One document of the thread in [`StatusInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentLine {
    /// 0: the meta document (devices, and tasks from before segments); n: segment n.
    pub part: u32,
    /// Held in memory now.
    pub loaded: bool,
    /// Changes in it, when loaded.
    pub changes: Option<usize>,
}

impl StatusInfo {
    /// The peer's own report, typed.
    pub(crate) fn from_peer(s: peer::Status) -> Self {
        Self {
            peer_id: s.peer_id,
            kind: s.kind,
            name: s.name,
            thread_id: s.thread_id,
            listen_addrs: s.listen_addrs,
            peers: s
                .peers
                .into_iter()
                .map(|p| PeerLine {
                    path: p.path.map(|path| match path {
                        "relayed" => ConnectionPath::Relayed,
                        _ => ConnectionPath::Direct,
                    }),
                    id: p.id,
                    name: p.name,
                    kind: p.kind,
                    connected: p.connected,
                    last_sync_at: p.last_sync_at,
                    in_sync: p.in_sync,
                    revoked: p.revoked,
                    bytes_sent: p.bytes_sent,
                    bytes_received: p.bytes_received,
                })
                .collect(),
            // The peer reports its relay as JSON; read it back as the typed line.
            relay: s.relay.and_then(|v| serde_json::from_value(v).ok()),
            running: s.running,
            documents: s
                .documents
                .into_iter()
                .map(|d| DocumentLine {
                    part: d.part,
                    loaded: d.loaded,
                    changes: d.changes,
                })
                .collect(),
            sync: s.sync,
        }
    }
}

/// One event in `task --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventInfo {
    /// RFC 3339.
    pub at: String,
    /// Kind name ([`EventKind::name`]).
    pub kind: String,
    /// Attempt.
    pub attempt: u32,
    /// Author PeerId.
    pub author: DeviceId,
    /// For `output`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// For `finished`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// For `failed` and `cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For `agent_session`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// For `agent_session`: how the session was reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub how: Option<String>,
    /// For `tool_call`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    /// For `tool_call` and `permission_requested`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// For `tool_call` and `permission_requested`: the ACP tool kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_kind: Option<String>,
    /// For `tool_call`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// For `plan`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<PlanEntry>>,
    /// For the permission events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perm_id: Option<String>,
    /// For `permission_requested`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Vec<PermissionChoice>>,
    /// For `permission_answered` and `permission_resolved`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub option_id: Option<String>,
    /// For `permission_resolved`: who answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// For `artifact`: the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<errand_core::BlobRef>,
}

/// A file of `task --json`'s `attachments` and `artifacts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// BLAKE3 hash, 64 hex characters.
    pub hash: errand_core::BlobHash,
    /// A plain file name.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Media type.
    pub mime: String,
    /// Where this device holds it, whole and verified; null when it does not (yet).
    pub local_path: Option<String>,
}

impl From<&errand_core::BlobRef> for FileInfo {
    fn from(b: &errand_core::BlobRef) -> Self {
        Self {
            hash: b.hash,
            name: b.name.clone(),
            size: b.size,
            mime: b.mime.clone(),
            local_path: None,
        }
    }
}

impl From<&TaskEvent> for EventInfo {
    fn from(e: &TaskEvent) -> Self {
        let mut info = Self {
            at: rfc3339(e.at),
            kind: e.kind.name().to_owned(),
            attempt: e.attempt,
            author: e.author.clone(),
            text: None,
            exit_code: None,
            reason: None,
            session_id: None,
            how: None,
            call_id: None,
            title: None,
            tool_kind: None,
            status: None,
            entries: None,
            perm_id: None,
            options: None,
            option_id: None,
            by: None,
            file: None,
        };
        match &e.kind {
            EventKind::Output { text } | EventKind::Replied { text } => {
                info.text = Some(text.clone())
            }
            EventKind::Finished { exit_code } => info.exit_code = Some(*exit_code),
            EventKind::Failed { reason } | EventKind::Cancelled { reason } => {
                info.reason = Some(reason.clone())
            }
            EventKind::AgentSession { session_id, how } => {
                info.session_id = Some(session_id.clone());
                info.how = Some(how.clone());
            }
            EventKind::ToolCall {
                call_id,
                title,
                tool_kind,
                status,
            } => {
                info.call_id = Some(call_id.clone());
                info.title = Some(title.clone());
                info.tool_kind = Some(tool_kind.clone());
                info.status = Some(status.clone());
            }
            EventKind::Plan { entries } => info.entries = Some(entries.clone()),
            EventKind::PermissionRequested {
                perm_id,
                title,
                tool_kind,
                options,
            } => {
                info.perm_id = Some(perm_id.clone());
                info.title = Some(title.clone());
                info.tool_kind = Some(tool_kind.clone());
                info.options = Some(options.clone());
            }
            EventKind::PermissionAnswered { perm_id, option_id } => {
                info.perm_id = Some(perm_id.clone());
                info.option_id = Some(option_id.clone());
            }
            EventKind::PermissionResolved {
                perm_id,
                option_id,
                by,
            } => {
                info.perm_id = Some(perm_id.clone());
                info.option_id = Some(option_id.clone());
                info.by = Some(by.clone());
            }
            EventKind::Artifact { file } => info.file = Some(file.clone()),
            _ => {}
        }
        info
    }
}

/// One entry of `task --json`'s `conversation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationLine {
    /// RFC 3339.
    pub at: String,
    /// `user` or `agent`.
    pub role: Role,
    /// What was said.
    pub text: String,
}

/// `task ID --json`, and each entry of `thread --json`'s `tasks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// Task id.
    pub id: TaskId,
    /// Instruction.
    pub instruction: String,
    /// Executor.
    pub executor: String,
    /// Target desktop PeerId.
    pub target: DeviceId,
    /// Author PeerId.
    pub author: DeviceId,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339, if set.
    pub not_after: Option<String>,
    /// Folded status.
    pub status: TaskStatus,
    /// Latest attempt.
    pub attempt: u32,
    /// Exit code of the latest attempt.
    pub exit_code: Option<i64>,
    /// Reason of `failed`/`cancelled`.
    pub reason: Option<String>,
    /// Last 4 KiB of the latest attempt's output.
    pub output_tail: String,
    /// Pending requests.
    pub requests: Vec<errand_core::Request>,
    /// Every event.
    pub events: Vec<EventInfo>,
    /// The conversation: the instruction and replies (`user`), each attempt's output (`agent`).
    #[serde(default)]
    pub conversation: Vec<ConversationLine>,
    /// The latest attempt's tool calls.
    #[serde(default)]
    pub tool_calls: Vec<ToolCallView>,
    /// The latest attempt's plan.
    #[serde(default)]
    pub plan: Vec<PlanEntry>,
    /// The permission request the agent waits on, if nobody has answered it yet.
    #[serde(default)]
    pub permission: Option<PendingPermission>,
    /// Files sent with the task.
    #[serde(default)]
    pub attachments: Vec<FileInfo>,
    /// Files the desktop produced, over all attempts.
    #[serde(default)]
    pub artifacts: Vec<FileInfo>,
}

impl From<&Task> for TaskInfo {
    fn from(t: &Task) -> Self {
        let v = fold(t);
        Self {
            id: t.id,
            instruction: t.instruction.clone(),
            executor: t.executor.clone(),
            target: t.target.clone(),
            author: t.author.clone(),
            created_at: rfc3339(t.created_at),
            not_after: t.not_after.map(rfc3339),
            status: v.status,
            attempt: v.attempt,
            exit_code: v.exit_code,
            reason: v.reason,
            output_tail: tail(&v.output, OUTPUT_TAIL_BYTES),
            requests: v.requests,
            events: t.events.iter().map(EventInfo::from).collect(),
            conversation: v
                .conversation
                .into_iter()
                .map(|u| ConversationLine {
                    at: rfc3339(u.at),
                    role: u.role,
                    text: u.text,
                })
                .collect(),
            tool_calls: v.tool_calls,
            plan: v.plan,
            permission: v.permission,
            attachments: t.attachments.iter().map(FileInfo::from).collect(),
            artifacts: v.artifacts.iter().map(FileInfo::from).collect(),
        }
    }
}

impl TaskInfo {
    /// The output events of the latest attempt, in list order.
    pub fn outputs(&self) -> impl Iterator<Item = &str> {
        self.events
            .iter()
            .filter(|e| e.kind == "output" && e.attempt == self.attempt)
            .filter_map(|e| e.text.as_deref())
    }
}

/// One message in `thread --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageInfo {
    /// Message id.
    pub id: String,
    /// Author PeerId.
    pub author: DeviceId,
    /// Who it speaks for.
    pub kind: MessageKind,
    /// The text.
    pub text: String,
    /// RFC 3339.
    pub at: String,
    /// The task it is about.
    pub task: Option<TaskId>,
}

impl From<&Message> for MessageInfo {
    fn from(m: &Message) -> Self {
        Self {
            id: m.id.to_string(),
            author: m.author.clone(),
            kind: m.kind,
            text: m.text.clone(),
            at: rfc3339(m.at),
            task: m.task,
        }
    }
}

/// `thread --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadInfo {
    /// Thread id.
    pub thread_id: String,
    /// Tasks, oldest first.
    pub tasks: Vec<TaskInfo>,
    /// Messages, in thread order.
    pub messages: Vec<MessageInfo>,
}

/// `send --json`: the new task, queued on this device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    /// The new task.
    pub task_id: TaskId,
    /// Always `queued`: nobody else has it yet.
    pub status: TaskStatus,
}

/// `approve|deny|cancel|retry ID --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requested {
    /// The task.
    pub task_id: TaskId,
    /// What was asked.
    pub requested: Action,
}

/// `reply ID TEXT --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replied {
    /// The task.
    pub task_id: TaskId,
    /// The attempt (the agent's turn) the reply opens.
    pub attempt: u32,
}

/// `answer ID OPTION --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answered {
    /// The task.
    pub task_id: TaskId,
    /// The permission request answered.
    pub permission: String,
    /// The option chosen.
    pub option: String,
}

/// `devices --json`: one trusted device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// PeerId.
    pub id: DeviceId,
    /// Its name (its own, else the one given when trusting it).
    pub name: String,
    /// Desktop or phone.
    pub kind: DeviceKind,
    /// RFC 3339.
    pub paired_at: String,
    /// RFC 3339.
    pub last_seen: Option<String>,
    /// Revoked.
    pub revoked: bool,
    /// Where to dial it.
    pub addrs: Vec<String>,
}

/// `pair --json` on a desktop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairTicket {
    /// The `errand:` text of the QR code.
    pub ticket: String,
    /// RFC 3339.
    pub expires_at: String,
}

/// `pair --json` on a phone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paired {
    /// The desktop's PeerId.
    pub desktop_id: String,
    /// The desktop's name.
    pub desktop_name: String,
    /// The thread.
    pub thread_id: String,
    /// True when the first full sync finished.
    pub synced: bool,
}

impl From<crate::pairing::PairOutcome> for Paired {
    fn from(p: crate::pairing::PairOutcome) -> Self {
        Self {
            desktop_id: p.desktop_id,
            desktop_name: p.desktop_name,
            thread_id: p.thread_id,
            synced: p.synced,
        }
    }
}

/// `devices revoke ID --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// The device.
    pub id: String,
    /// Always true.
    pub revoked: bool,
    /// Its unstarted tasks that were cancelled.
    pub cancelled_tasks: u64,
    /// Files of its tasks removed from this home (no kept task references them).
    #[serde(default)]
    pub removed_files: u64,
}

/// `forget --json` on a phone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forgotten {
    /// The desktops forgotten.
    pub forgotten: Vec<String>,
    /// Files of the pairing removed from this home.
    #[serde(default)]
    pub removed_files: u64,
}

/// `devices add ID --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceAdded {
    /// PeerId.
    pub id: DeviceId,
    /// Desktop or phone.
    pub kind: DeviceKind,
    /// Where to dial it.
    pub addrs: Vec<String>,
}
