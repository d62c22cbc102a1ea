//! The requests and how a peer answers them.
//!
//! Reads go through the replica; writes through [`Peer`]'s own methods. The task rules are
//! not here: an action is checked by `errand_core::check_action` against the task's history.

use std::time::Duration;

use errand_core::{
    Action, DeviceId, DeviceKind, EventKind, Message, Task, TaskId, TaskStatus, limits,
    time::rfc3339,
};
use errand_crdt::{NewTask, TrustedPeer};
use serde::{Deserialize, Serialize};

use super::{
    ApiError, Call, exit,
    views::{
        Answered, DeviceAdded, DeviceInfo, Forgotten, PairTicket, Paired, Replied, Requested,
        Revoked, Sent, StatusInfo, TaskInfo, ThreadInfo,
    },
};
use crate::{
    pairing::{self, PhonePairError},
    peer::{Peer, PeerError, now_ms, parse_addr, parse_peer_id},
};

pub(super) fn err(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(e.to_string())
}

pub(super) fn usage(e: impl std::fmt::Display) -> ApiError {
    ApiError::with_code(exit::USAGE, e.to_string())
}

/// Parses a task id typed by a person (exit 2 when it is not one).
pub fn parse_task_id(id: &str) -> Result<TaskId, ApiError> {
    id.trim().parse().map_err(usage)
}

/// This device's id in the thread.
fn own_device(peer: &Peer) -> Result<DeviceId, ApiError> {
    peer.peer_id().to_base58().parse().map_err(err)
}

/// `status`: this device, its peers, relay and documents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetStatus;

impl Call for GetStatus {
    type Response = StatusInfo;
    async fn run(self, peer: &Peer) -> Result<StatusInfo, ApiError> {
        Ok(StatusInfo::from_peer(peer.status().await.map_err(err)?))
    }
}

/// The thread as read: its id, tasks and messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thread {
    /// Thread id.
    pub thread_id: String,
    /// Tasks, oldest first.
    pub tasks: Vec<Task>,
    /// Messages, in thread order.
    pub messages: Vec<Message>,
}

impl From<&Thread> for ThreadInfo {
    fn from(thread: &Thread) -> Self {
        Self {
            thread_id: thread.thread_id.clone(),
            tasks: thread.tasks.iter().map(TaskInfo::from).collect(),
            messages: thread.messages.iter().map(Into::into).collect(),
        }
    }
}

/// `thread [--all]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetThread {
    /// Every segment, not only the newest and those with unfinished tasks.
    #[serde(default)]
    pub all: bool,
}

impl GetThread {
    /// Reads the thread (the domain records, for callers that present them their own way).
    pub async fn read(self, peer: &Peer) -> Result<Thread, ApiError> {
        let read = |d: &errand_crdt::ThreadDoc| {
            (d.genesis().thread_id.to_string(), d.tasks(), d.messages())
        };
        let (thread_id, tasks, messages) = if self.all {
            peer.replica().read_all(read).await
        } else {
            peer.replica().read(read).await
        }
        .map_err(err)?;
        Ok(Thread {
            thread_id,
            tasks,
            messages,
        })
    }
}

impl Call for GetThread {
    type Response = ThreadInfo;
    async fn run(self, peer: &Peer) -> Result<ThreadInfo, ApiError> {
        Ok(ThreadInfo::from(&self.read(peer).await?))
    }
}

/// `task ID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetTask {
    /// The task.
    pub id: TaskId,
}

impl GetTask {
    /// Reads the task (the domain record), loading its segment if it is not held.
    pub async fn read(self, peer: &Peer) -> Result<Task, ApiError> {
        let id = self.id;
        // An old task's segment may not be held in memory.
        peer.replica().ensure_task_loaded(id).await.map_err(err)?;
        peer.replica()
            .read(move |d| d.task(&id))
            .await
            .map_err(err)?
            .ok_or_else(|| no_task(id))
    }
}

fn no_task(id: TaskId) -> ApiError {
    ApiError::new(format!(
        "no task {id} in this thread (it may not have synced here yet)"
    ))
}

/// A phone's request on a task: reads the task, lets `check` say whether this device may make
/// it (the event, and what to answer), and appends the event, in one trip to the engine.
async fn request<T: Send + 'static>(
    peer: &Peer,
    id: TaskId,
    check: impl FnOnce(&errand_core::Task, &DeviceId) -> Result<(errand_core::Permitted, T), ApiError>
    + Send
    + 'static,
) -> Result<T, ApiError> {
    let me = own_device(peer)?;
    peer.append_decided(id, move |task| {
        let task = task.ok_or_else(|| no_task(id))?;
        let (permitted, value) = check(&task, &me)?;
        Ok((permitted.attempt, permitted.kind, value))
    })
    .await
    .map_err(err)?
}

impl Call for GetTask {
    type Response = TaskInfo;
    async fn run(self, peer: &Peer) -> Result<TaskInfo, ApiError> {
        let mut info = TaskInfo::from(&self.read(peer).await?);
        for files in [&mut info.attachments, &mut info.artifacts] {
            let paths = peer
                .local_paths(files.iter().map(|f| f.hash).collect())
                .await;
            for (f, p) in files.iter_mut().zip(paths) {
                f.local_path = p.map(|p| p.to_string_lossy().into_owned());
            }
        }
        Ok(info)
    }
}

/// `send TEXT`: queue a task for the thread's desktop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendTask {
    /// The instruction.
    pub text: String,
    /// Executor name (default: the desktop's first).
    pub executor: Option<String>,
    /// Expiry, UTC ms.
    pub not_after: Option<i64>,
    /// Files to attach, as absolute paths on the device that runs the request. Each is
    /// copied into the home's blob store at once (so it is served later, even if the file
    /// goes away), and referenced by the task under its plain file name.
    #[serde(default)]
    pub attach: Vec<std::path::PathBuf>,
}

/// An instruction (of a task or a routine) is not empty and within its cap; exit 2 if not.
pub(super) fn check_instruction(text: &str) -> Result<(), ApiError> {
    if text.trim().is_empty() {
        return Err(usage("the instruction is empty"));
    }
    if text.len() > limits::MAX_INSTRUCTION_BYTES {
        return Err(usage(format!(
            "the instruction is {} bytes, over the limit of {}",
            text.len(),
            limits::MAX_INSTRUCTION_BYTES
        )));
    }
    Ok(())
}

impl SendTask {
    /// Checks the instruction alone (exit 2 when it is empty or too long): what can be said
    /// before looking at the thread.
    pub fn validate(&self) -> Result<(), ApiError> {
        check_instruction(&self.text)?;
        if self.attach.len() > errand_core::blob::MAX_ATTACHMENTS {
            return Err(usage(format!(
                "{} files attached, over the limit of {}",
                self.attach.len(),
                errand_core::blob::MAX_ATTACHMENTS
            )));
        }
        Ok(())
    }
}

/// Copies each file into the peer's blob store and names it for the thread.
async fn store_attachments(
    peer: &Peer,
    files: Vec<std::path::PathBuf>,
) -> Result<Vec<errand_core::BlobRef>, ApiError> {
    let store = peer.blobs();
    let mut out = Vec::with_capacity(files.len());
    for path in files {
        let s = store.clone();
        let p = path.clone();
        let (hash, size) = tokio::task::spawn_blocking(move || s.add_file(&p))
            .await
            .map_err(err)?
            .map_err(|e| usage(format!("cannot attach {}: {e}", path.display())))?;
        let name = errand_core::safe_file_name(
            &path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        out.push(errand_core::BlobRef {
            hash,
            mime: errand_core::blob::mime_for_name(&name).to_owned(),
            name,
            size,
        });
    }
    Ok(out)
}

impl Call for SendTask {
    type Response = Sent;
    async fn run(self, peer: &Peer) -> Result<Sent, ApiError> {
        self.validate()?;
        let (target, default_exec) = desktop_target(peer).await?;
        let attachments = store_attachments(peer, self.attach).await?;
        let task = NewTask {
            instruction: self.text,
            executor: self.executor.unwrap_or(default_exec),
            target,
            not_after: self.not_after,
            attachments,
        };
        let task_id = peer.enqueue_task(task).await.map_err(err)?;
        Ok(Sent {
            task_id,
            status: TaskStatus::Queued,
        })
    }
}

/// The desktop a new task goes to, and its default executor.
pub(super) async fn desktop_target(peer: &Peer) -> Result<(DeviceId, String), ApiError> {
    let (owner, devices) = peer
        .replica()
        .read(|d| (d.genesis().owner.clone(), d.devices()))
        .await
        .map_err(err)?;
    let exec = devices
        .iter()
        .find(|d| d.id == owner)
        .and_then(|d| d.executors.first().cloned())
        .unwrap_or_else(|| "shell".to_owned());
    Ok((owner, exec))
}

/// `approve|deny|cancel|retry ID`: append the request, if this device may make it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Act {
    /// The task.
    pub id: TaskId,
    /// What to ask.
    pub action: Action,
}

impl Call for Act {
    type Response = Requested;
    async fn run(self, peer: &Peer) -> Result<Requested, ApiError> {
        let action = self.action;
        request(peer, self.id, move |task, me| {
            let permitted = errand_core::check_action(task, me, action).map_err(err)?;
            Ok((permitted, ()))
        })
        .await?;
        Ok(Requested {
            task_id: self.id,
            requested: self.action,
        })
    }
}

/// `reply ID TEXT`: the next prompt of an agent task whose turn has ended (it opens the next
/// attempt). Stored here first, so it works offline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The task.
    pub id: TaskId,
    /// What to say.
    pub text: String,
}

impl Call for Reply {
    type Response = Replied;
    async fn run(self, peer: &Peer) -> Result<Replied, ApiError> {
        let text = self.text;
        let attempt = request(peer, self.id, move |task, me| {
            let permitted = errand_core::check_reply(task, me, &text).map_err(err)?;
            let next = permitted.attempt + 1;
            Ok((permitted, next))
        })
        .await?;
        Ok(Replied {
            task_id: self.id,
            attempt,
        })
    }
}

/// `answer ID OPTION`: the answer to the permission request the task's agent waits on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The task.
    pub id: TaskId,
    /// An option id, or `allow` / `deny` for the first option of that kind.
    pub option: String,
}

impl Call for Answer {
    type Response = Answered;
    async fn run(self, peer: &Peer) -> Result<Answered, ApiError> {
        let (id, option) = (self.id, self.option);
        request(peer, id, move |task, me| {
            let permitted = errand_core::check_answer(task, me, &option).map_err(err)?;
            let EventKind::PermissionAnswered { perm_id, option_id } = &permitted.kind else {
                return Err(ApiError::new("internal: an answer that is not an answer"));
            };
            let answered = Answered {
                task_id: id,
                permission: perm_id.clone(),
                option: option_id.clone(),
            };
            Ok((permitted, answered))
        })
        .await
    }
}

/// `devices`: the trusted devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListDevices;

impl Call for ListDevices {
    type Response = Vec<DeviceInfo>;
    async fn run(self, peer: &Peer) -> Result<Vec<DeviceInfo>, ApiError> {
        let devices = peer
            .replica()
            .read(|d| d.devices())
            .await
            .unwrap_or_default();
        let trusted = peer.trusted_peers().await.map_err(err)?;
        Ok(trusted
            .into_iter()
            .map(|t| {
                // The device's own name, once it told us; else the one it was trusted under.
                let name = devices
                    .iter()
                    .find(|d| d.id == t.id && !d.name.is_empty())
                    .map_or(t.name, |d| d.name.clone());
                DeviceInfo {
                    id: t.id,
                    name,
                    kind: t.kind,
                    paired_at: rfc3339(t.paired_at),
                    last_seen: t.last_seen.map(rfc3339),
                    revoked: t.revoked,
                    addrs: t.addrs,
                }
            })
            .collect())
    }
}

/// `pair` on a desktop: issue a pairing ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueTicket {
    /// Lifetime in seconds.
    pub ttl_secs: u64,
}

impl Call for IssueTicket {
    type Response = PairTicket;
    async fn run(self, peer: &Peer) -> Result<PairTicket, ApiError> {
        if self.ttl_secs == 0 {
            return Err(usage("--ttl must be more than 0"));
        }
        let ticket = pairing::create_ticket(peer, Duration::from_secs(self.ttl_secs))
            .await
            .map_err(|e| match e {
                PeerError::NotStarted => ApiError::new(
                    "the desktop's network is not running in this process; start `errand-desktop run`",
                ),
                e => err(e),
            })?;
        Ok(PairTicket {
            ticket: ticket.to_string(),
            expires_at: rfc3339(ticket.expires_at()),
        })
    }
}

/// `pair TICKET` on a phone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairWith {
    /// The ticket text.
    pub ticket: String,
}

impl PairWith {
    /// Pairs with a parsed ticket, failing with the pairing's own error (for a caller that
    /// tells its kinds apart: the phone bridge).
    pub async fn pair(peer: &Peer, ticket: &errand_core::Ticket) -> Result<Paired, PhonePairError> {
        pairing::pair_phone(peer, ticket).await.map(Paired::from)
    }
}

impl Call for PairWith {
    type Response = Paired;
    async fn run(self, peer: &Peer) -> Result<Paired, ApiError> {
        let ticket: errand_core::Ticket = self
            .ticket
            .parse()
            .map_err(|e| usage(format!("bad ticket: {e}")))?;
        Self::pair(peer, &ticket).await.map_err(|e| match e {
            PhonePairError::Unreachable(_) => ApiError::with_code(exit::UNREACHABLE, e.to_string()),
            e => err(e),
        })
    }
}

/// `devices revoke ID`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoke {
    /// PeerId.
    pub id: String,
}

impl Call for Revoke {
    type Response = Revoked;
    async fn run(self, peer: &Peer) -> Result<Revoked, ApiError> {
        let v = pairing::revoke(peer, &self.id).await.map_err(err)?;
        // `pairing` reports as JSON; read it back as the typed record.
        serde_json::from_value(v).map_err(err)
    }
}

/// `forget` on a phone: drop the paired desktop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forget;

impl Call for Forget {
    type Response = Forgotten;
    async fn run(self, peer: &Peer) -> Result<Forgotten, ApiError> {
        let v = pairing::forget(peer).await.map_err(err)?;
        // `pairing` reports as JSON; read it back as the typed record.
        serde_json::from_value(v).map_err(err)
    }
}

/// `devices add PEER_ID`: trust a device by hand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddDevice {
    /// PeerId.
    pub id: String,
    /// Where to dial it.
    pub addrs: Vec<String>,
    /// A name until it tells us its own.
    pub name: Option<String>,
}

impl Call for AddDevice {
    type Response = DeviceAdded;
    async fn run(self, peer: &Peer) -> Result<DeviceAdded, ApiError> {
        let pid = parse_peer_id(&self.id).map_err(usage)?;
        if pid == peer.peer_id() {
            return Err(usage("that is this device's own id"));
        }
        for a in &self.addrs {
            parse_addr(a).map_err(usage)?;
        }
        let kind = match peer.kind() {
            DeviceKind::Desktop => DeviceKind::Phone,
            DeviceKind::Phone => DeviceKind::Desktop,
        };
        let trusted = peer.trusted_peers().await.map_err(err)?;
        let other_desktop = trusted.iter().find(|t| {
            t.kind == DeviceKind::Desktop && !t.revoked && t.id.as_str() != pid.to_base58()
        });
        if let (DeviceKind::Desktop, Some(other)) = (kind, other_desktop) {
            return Err(ApiError::new(format!(
                "this phone already has a desktop ({}); run `errand-phone forget` first",
                other.id
            )));
        }
        let existing = trusted
            .into_iter()
            .find(|t| t.id.as_str() == pid.to_base58());
        let mut t = match existing {
            Some(t) => t,
            None => TrustedPeer {
                id: pid.to_base58().parse().map_err(err)?,
                name: String::new(),
                kind,
                addrs: Vec::new(),
                paired_at: now_ms(),
                last_seen: None,
                last_sync_at: None,
                revoked: false,
            },
        };
        if let Some(n) = self.name {
            t.name = n;
        }
        for a in self.addrs {
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
        Ok(DeviceAdded {
            id: t.id,
            kind: t.kind,
            addrs: t.addrs,
        })
    }
}
