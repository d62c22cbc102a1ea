//! The commands both CLIs offer, as requests a daemon answers over its control socket or a
//! CLI runs itself on an opened [`Peer`]. The JSON shapes are the stable `--json` outputs
//! (DESIGN.md section 9; the README documents them).

use std::str::FromStr;

use errand_core::{
    DeviceKind, EventKind, Task, TaskEvent, TaskId, TaskStatus, fold, time::rfc3339,
};
use errand_crdt::{NewTask, TrustedPeer};
use serde::{Deserialize, Serialize};

use crate::{
    control::ApiError,
    peer::{Peer, PeerError, now_ms, parse_addr, parse_peer_id},
};

/// Output kept in `output_tail`: the last 4 KiB reads comfortably on a phone screen.
pub const OUTPUT_TAIL_BYTES: usize = 4096;

/// Exit codes (DESIGN.md section 9).
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// An error.
    pub const ERROR: i32 = 1;
    /// Bad usage.
    pub const USAGE: i32 = 2;
    /// A peer is unreachable or the wait timed out.
    pub const UNREACHABLE: i32 = 3;
    /// The task ended failed, cancelled, denied or interrupted.
    pub const TASK_FAILED: i32 = 4;
    /// The home is locked by a process that does not answer on its control socket.
    pub const LOCKED: i32 = 5;
}

/// A request to a peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// `status`.
    Status,
    /// `thread [--all]`.
    Thread {
        /// Every segment, not only the newest and those with unfinished tasks.
        #[serde(default)]
        all: bool,
    },
    /// `task ID`.
    Task {
        /// Task id.
        id: String,
    },
    /// `send TEXT`.
    Send {
        /// The instruction.
        text: String,
        /// Executor name (default: the desktop's first).
        executor: Option<String>,
        /// Expiry, UTC ms.
        not_after: Option<i64>,
    },
    /// `approve|deny|cancel|retry ID`.
    Act {
        /// Task id.
        id: String,
        /// approve, deny, cancel or retry.
        action: Action,
    },
    /// `devices`.
    Devices,
    /// `pair` on a desktop: issue a ticket.
    Pair {
        /// Lifetime in seconds.
        ttl_secs: u64,
    },
    /// `pair TICKET` on a phone.
    PairWith {
        /// The ticket text.
        ticket: String,
    },
    /// `devices revoke ID`.
    Revoke {
        /// PeerId.
        id: String,
    },
    /// `forget` on a phone.
    Forget,
    /// `devices add PEER_ID`.
    DevicesAdd {
        /// PeerId.
        id: String,
        /// Where to dial it.
        addrs: Vec<String>,
        /// A name until it tells us its own.
        name: Option<String>,
    },
}

/// A phone's request on a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Let an awaiting task run.
    Approve,
    /// Refuse an awaiting task.
    Deny,
    /// Stop it or keep it from starting.
    Cancel,
    /// Run an ended task again as a new attempt.
    Retry,
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "approve" => Ok(Self::Approve),
            "deny" => Ok(Self::Deny),
            "cancel" => Ok(Self::Cancel),
            "retry" => Ok(Self::Retry),
            _ => Err(format!("unknown action {s:?}")),
        }
    }
}

/// One event in `task --json`.
#[derive(Debug, Clone, Serialize)]
pub struct EventJson {
    /// RFC 3339.
    pub at: String,
    /// Kind name.
    pub kind: &'static str,
    /// Attempt.
    pub attempt: u32,
    /// Author PeerId.
    pub author: String,
    /// For `output`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// For `finished`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// For `failed` and `cancelled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `task ID --json`, and each entry of `thread --json`'s `tasks`.
#[derive(Debug, Clone, Serialize)]
pub struct TaskJson {
    /// Task id.
    pub id: String,
    /// Instruction.
    pub instruction: String,
    /// Executor.
    pub executor: String,
    /// Target desktop PeerId.
    pub target: String,
    /// Author PeerId.
    pub author: String,
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
    pub events: Vec<EventJson>,
}

fn event_json(e: &TaskEvent) -> EventJson {
    let (text, exit_code, reason) = match &e.kind {
        EventKind::Output { text } => (Some(text.clone()), None, None),
        EventKind::Finished { exit_code } => (None, Some(*exit_code), None),
        EventKind::Failed { reason } | EventKind::Cancelled { reason } => {
            (None, None, Some(reason.clone()))
        }
        _ => (None, None, None),
    };
    EventJson {
        at: rfc3339(e.at),
        kind: e.kind.name(),
        attempt: e.attempt,
        author: e.author.to_string(),
        text,
        exit_code,
        reason,
    }
}

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

/// The JSON view of a task.
pub fn task_json(t: &Task) -> TaskJson {
    let v = fold(t);
    TaskJson {
        id: t.id.to_string(),
        instruction: t.instruction.clone(),
        executor: t.executor.clone(),
        target: t.target.to_string(),
        author: t.author.to_string(),
        created_at: rfc3339(t.created_at),
        not_after: t.not_after.map(rfc3339),
        status: v.status,
        attempt: v.attempt,
        exit_code: v.exit_code,
        reason: v.reason,
        output_tail: tail(&v.output, OUTPUT_TAIL_BYTES),
        requests: v.requests,
        events: t.events.iter().map(event_json).collect(),
    }
}

fn err(e: PeerError) -> ApiError {
    ApiError::new(e.to_string())
}

fn parse_task_id(id: &str) -> Result<TaskId, ApiError> {
    id.trim()
        .parse()
        .map_err(|e: errand_core::IdError| ApiError::with_code(exit::USAGE, e.to_string()))
}

/// Answers a request on an opened peer (with or without its network running).
pub async fn handle(peer: &Peer, req: Request) -> Result<serde_json::Value, ApiError> {
    let json = |v: &dyn erased::Ser| v.to_value();
    match req {
        Request::Status => Ok(json(&peer.status().await.map_err(err)?)),
        Request::Thread { all } => {
            let read = |d: &errand_crdt::ThreadDoc| (d.genesis().clone(), d.tasks(), d.messages());
            let r = if all {
                peer.replica().read_all(read).await
            } else {
                peer.replica().read(read).await
            };
            let (genesis, tasks, messages) = r.map_err(|e| ApiError::new(e.to_string()))?;
            Ok(serde_json::json!({
                "thread_id": genesis.thread_id.to_string(),
                "tasks": tasks.iter().map(task_json).collect::<Vec<_>>(),
                "messages": messages.iter().map(|m| serde_json::json!({
                    "id": m.id.to_string(), "author": m.author.to_string(), "kind": m.kind,
                    "text": m.text, "at": rfc3339(m.at), "task": m.task.map(|t| t.to_string()),
                })).collect::<Vec<_>>(),
            }))
        }
        Request::Task { id } => {
            let id = parse_task_id(&id)?;
            // An old task's segment may not be held in memory.
            peer.replica()
                .ensure_task_loaded(id)
                .await
                .map_err(|e| ApiError::new(e.to_string()))?;
            let task = peer
                .replica()
                .read(move |d| d.task(&id))
                .await
                .map_err(|e| ApiError::new(e.to_string()))?
                .ok_or_else(|| {
                    ApiError::new(format!(
                        "no task {id} in this thread (it may not have synced here yet)"
                    ))
                })?;
            Ok(json(&task_json(&task)))
        }
        Request::Send {
            text,
            executor,
            not_after,
        } => {
            if text.trim().is_empty() {
                return Err(ApiError::with_code(exit::USAGE, "the instruction is empty"));
            }
            let (target, default_exec) = desktop_target(peer).await?;
            let task = NewTask {
                instruction: text,
                executor: executor.unwrap_or(default_exec),
                target,
                not_after,
            };
            let id = peer.enqueue_task(task).await.map_err(err)?;
            Ok(serde_json::json!({ "task_id": id.to_string(), "status": TaskStatus::Queued }))
        }
        Request::Act { id, action } => {
            let id = parse_task_id(&id)?;
            let task = peer
                .replica()
                .read(move |d| d.task(&id))
                .await
                .map_err(|e| ApiError::new(e.to_string()))?
                .ok_or_else(|| ApiError::new(format!("no task {id} in this thread")))?;
            let view = fold(&task);
            let kind = match action {
                Action::Approve => EventKind::Approved,
                Action::Deny => EventKind::Denied,
                Action::Cancel => EventKind::CancelRequested,
                Action::Retry => {
                    if !view.status.is_terminal() {
                        return Err(ApiError::new(format!(
                            "task {id} is {}; only an ended task can be retried",
                            view.status
                        )));
                    }
                    EventKind::Retried
                }
            };
            if view.status.is_terminal() && action != Action::Retry {
                return Err(ApiError::new(format!(
                    "task {id} already ended ({})",
                    view.status
                )));
            }
            peer.append_event(id, view.attempt, kind)
                .await
                .map_err(err)?;
            Ok(serde_json::json!({ "task_id": id.to_string(), "requested": action }))
        }
        Request::Devices => {
            let devices = peer
                .replica()
                .read(|d| d.devices())
                .await
                .unwrap_or_default();
            let trusted = peer.trusted_peers().await.map_err(err)?;
            let out: Vec<_> = trusted
                .iter()
                .map(|t| {
                    let d = devices.iter().find(|d| d.id == t.id);
                    serde_json::json!({
                        "id": t.id.to_string(),
                        "name": d.map_or(t.name.clone(), |d| if d.name.is_empty() { t.name.clone() } else { d.name.clone() }),
                        "kind": t.kind,
                        "paired_at": rfc3339(t.paired_at),
                        "last_seen": t.last_seen.map(rfc3339),
                        "revoked": t.revoked,
                        "addrs": t.addrs,
                    })
                })
                .collect();
            Ok(serde_json::Value::Array(out))
        }
        Request::Pair { ttl_secs } => {
            if ttl_secs == 0 {
                return Err(ApiError::with_code(
                    exit::USAGE,
                    "--ttl must be more than 0",
                ));
            }
            let ticket = crate::pairing::create_ticket(peer, std::time::Duration::from_secs(ttl_secs))
                .await
                .map_err(|e| match e {
                    PeerError::NotStarted => ApiError::new(
                        "the desktop's network is not running in this process; start `errand-desktop run`",
                    ),
                    e => err(e),
                })?;
            Ok(
                serde_json::json!({ "ticket": ticket.to_string(), "expires_at": rfc3339(ticket.expires_at()) }),
            )
        }
        Request::PairWith { ticket } => {
            let ticket: errand_core::Ticket =
                ticket.parse().map_err(|e: errand_core::TicketError| {
                    ApiError::with_code(exit::USAGE, format!("bad ticket: {e}"))
                })?;
            let out = crate::pairing::pair_phone(peer, &ticket)
                .await
                .map_err(|e| match e {
                    crate::pairing::PhonePairError::Unreachable(_) => {
                        ApiError::with_code(exit::UNREACHABLE, e.to_string())
                    }
                    e => ApiError::new(e.to_string()),
                })?;
            Ok(json(&out))
        }
        Request::Revoke { id } => crate::pairing::revoke(peer, &id).await.map_err(err),
        Request::Forget => crate::pairing::forget(peer).await.map_err(err),
        Request::DevicesAdd { id, addrs, name } => {
            let pid =
                parse_peer_id(&id).map_err(|e| ApiError::with_code(exit::USAGE, e.to_string()))?;
            if pid == peer.peer_id() {
                return Err(ApiError::with_code(
                    exit::USAGE,
                    "that is this device's own id",
                ));
            }
            for a in &addrs {
                parse_addr(a).map_err(|e| ApiError::with_code(exit::USAGE, e.to_string()))?;
            }
            let kind = match peer.kind() {
                DeviceKind::Desktop => DeviceKind::Phone,
                DeviceKind::Phone => DeviceKind::Desktop,
            };
            let existing = peer
                .trusted_peers()
                .await
                .map_err(err)?
                .into_iter()
                .find(|t| t.id.as_str() == pid.to_base58());
            let other_desktop = peer
                .trusted_peers()
                .await
                .map_err(err)?
                .into_iter()
                .find(|t| {
                    t.kind == DeviceKind::Desktop && !t.revoked && t.id.as_str() != pid.to_base58()
                });
            if let (DeviceKind::Desktop, Some(other)) = (kind, other_desktop) {
                return Err(ApiError::new(format!(
                    "this phone already has a desktop ({}); run `errand-phone forget` first",
                    other.id
                )));
            }
            let mut t = existing.unwrap_or(TrustedPeer {
                id: pid
                    .to_base58()
                    .parse()
                    .map_err(|e: errand_core::IdError| ApiError::new(e.to_string()))?,
                name: String::new(),
                kind,
                addrs: Vec::new(),
                paired_at: now_ms(),
                last_seen: None,
                last_sync_at: None,
                revoked: false,
            });
            if let Some(n) = name {
                t.name = n;
            }
            for a in addrs {
                if !t.addrs.contains(&a) {
                    t.addrs.insert(0, a);
                }
            }
            t.revoked = false;
            peer.trust(t.clone()).await.map_err(err)?;
            if let Some(node) = peer.node() {
                let maddrs = t.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                let _ = node.dial(pid, maddrs).await;
            }
            Ok(serde_json::json!({ "id": t.id.to_string(), "kind": t.kind, "addrs": t.addrs }))
        }
    }
}

/// The desktop a new task goes to, and its default executor.
async fn desktop_target(peer: &Peer) -> Result<(errand_core::DeviceId, String), ApiError> {
    let devices = peer
        .replica()
        .read(|d| (d.genesis().owner.clone(), d.devices()))
        .await
        .map_err(|e| ApiError::new(e.to_string()))?;
    let (owner, devices) = devices;
    let exec = devices
        .iter()
        .find(|d| d.id == owner)
        .and_then(|d| d.executors.first().cloned())
        .unwrap_or_else(|| "shell".to_owned());
    Ok((owner, exec))
}

mod erased {
    /// Serialises any value to JSON; serialising our own structs cannot fail.
    pub trait Ser {
        fn to_value(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_value(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
        }
    }
}
