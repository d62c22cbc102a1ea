//! The write-ahead task ledger: what this desktop did with each attempt, in a redb table of the
//! home's store, so that a crash can never make it run an attempt twice (DESIGN.md section 8).
//!
//! - One entry per (task, attempt). Its state only moves forward: `fetching` (a task's
//!   attachments are being fetched) → `delivered` → `awaiting_approval` → `started` → `ended`.
//! - `started` holds the attempt's process group, and is written durably by
//!   [`begin_start`] from the executor's `on_spawn` hook, while the process still waits at its
//!   start gate: nothing runs that the ledger does not know about. [`begin_start`] refuses an
//!   attempt that has started before.
//! - The terminal fact goes into the document first, then the entry becomes `ended`. An entry
//!   left at `started` therefore means the desktop stopped while the attempt ran.
//! - [`recover`] runs at start-up, before any task starts: it kills what is left of every such
//!   attempt's process group (after checking that the group is still the one recorded: same boot,
//!   same leader) and marks the attempt `interrupted`. It never re-runs it; a retry from the phone
//!   is a new attempt.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use errand_core::{EventKind, MessageKind, TaskId, time::Millis};
use errand_crdt::{Store, StoreError};
use errand_p2p::{
    peer::{Peer, PeerError, now_ms},
    replica::ReplicaError,
};
use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::executor::{kill_process_group, process_group_alive};

/// The ledger's table: (task id, attempt) → JSON of the entry.
pub use errand_crdt::tables::TASK_LEDGER as LEDGER_TABLE;

/// After killing a left-over process group, how long start-up waits for it to be gone. The
/// group was sent SIGKILL, which cannot be caught; only a process in uninterruptible sleep (a
/// hung disk or network file system) takes longer, and start-up must not hang on it.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How often start-up checks whether a killed group is gone.
const KILL_POLL: Duration = Duration::from_millis(20);

/// The kernel's id of the current boot. A process group recorded in another boot is long gone,
/// and its id may belong to anyone now.
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// Where an attempt stands, as far as this desktop's own actions go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LedgerState {
    /// `fetching` was appended: the task's attachments are being fetched.
    Fetching,
    /// `delivered` was appended.
    Delivered,
    /// `approval_requested` was appended; waiting for the phone.
    AwaitingApproval,
    /// The process was spawned (held at its start gate until this entry was durable).
    Started(ProcessGroup),
    /// A terminal fact is in the document.
    Ended {
        /// The fact's kind, such as `finished` or `interrupted`.
        fact: String,
    },
}

impl LedgerState {
    fn rank(&self) -> u8 {
        match self {
            Self::Fetching => 0,
            Self::Delivered => 1,
            Self::AwaitingApproval => 2,
            Self::Started(_) => 3,
            Self::Ended { .. } => 4,
        }
    }

    /// The state's name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Fetching => "fetching",
            Self::Delivered => "delivered",
            Self::AwaitingApproval => "awaiting_approval",
            Self::Started(_) => "started",
            Self::Ended { .. } => "ended",
        }
    }

    /// True once the attempt's process was spawned (it may have ended since).
    pub fn has_started(&self) -> bool {
        self.rank() >= 3
    }
}

/// A process group as recorded when it was spawned, with enough to tell later whether the id
/// still names the same group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessGroup {
    /// The process group id (the start gate's pid).
    pub pgid: i32,
    /// The boot it was spawned in, when the system tells.
    pub boot_id: Option<String>,
    /// The leader's start time in clock ticks since boot (`/proc/<pid>/stat`, field 22), when
    /// the system tells.
    pub leader_start: Option<u64>,
}

impl ProcessGroup {
    /// Records the group led by `pgid`, which must be alive (held at its start gate).
    pub fn capture(pgid: i32) -> Self {
        Self {
            pgid,
            boot_id: boot_id(),
            leader_start: leader_start_time(pgid),
        }
    }

    /// Whether the group is alive and still the one recorded. A group from another boot, or whose
    /// id now leads a process that started at another time, is not ours: Linux does not reuse
    /// an id while a group of that id has members, so a live group with its leader gone is ours.
    pub fn alive_and_ours(&self) -> bool {
        if let (Some(then), Some(now)) = (&self.boot_id, boot_id())
            && *then != now
        {
            return false;
        }
        if !group_has_live_members(self.pgid) {
            return false;
        }
        match (self.leader_start, leader_start_time(self.pgid)) {
            (Some(then), Some(now)) => then == now,
            _ => true,
        }
    }
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string(BOOT_ID_PATH)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Field 22 of `/proc/<pid>/stat`. The command name (field 2) may contain spaces and
/// parentheses, so fields are counted from the last `)`.
fn leader_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: field 3 (state) is the first; field 22 is the 20th.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether group `pgid` has a member that is not a zombie. Orphans of a crashed daemon are
/// reparented to init, and an init that does not reap (some containers) leaves them as zombies,
/// which hold the id but run nothing. Without `/proc`, any member counts.
pub fn group_has_live_members(pgid: i32) -> bool {
    if !process_group_alive(pgid) {
        return false;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        // After the name: state (field 3), ppid (4), pgrp (5).
        let mut fields = stat[close + 1..].split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|f| f.parse::<i32>().ok());
        if pgrp == Some(pgid) && state != Some("Z") && state != Some("X") {
            return true;
        }
    }
    false
}

/// One ledger entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// The task.
    pub task: TaskId,
    /// The attempt (1-based).
    pub attempt: u32,
    /// What this desktop did last.
    pub state: LedgerState,
    /// When, UTC milliseconds.
    pub at: Millis,
}

/// The stored value.
#[derive(Serialize, Deserialize)]
struct Stored {
    at: Millis,
    state: LedgerState,
}

fn decode(task: &str, attempt: u32, bytes: &[u8]) -> Result<LedgerEntry, StoreError> {
    let corrupt = |why: String| StoreError::Corrupt {
        what: format!("ledger entry {task}/{attempt}"),
        why,
    };
    let task: TaskId = task
        .parse()
        .map_err(|e: errand_core::IdError| corrupt(e.to_string()))?;
    let s: Stored = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    Ok(LedgerEntry {
        task,
        attempt,
        state: s.state,
        at: s.at,
    })
}

fn encode(state: &LedgerState, at: Millis) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&Stored {
        at,
        state: state.clone(),
    })
    .map_err(|e| StoreError::Corrupt {
        what: "ledger entry".into(),
        why: e.to_string(),
    })
}

/// Why a ledger operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The attempt has started before: it never starts twice.
    #[error(
        "attempt {attempt} of task {task} is already {state} in the ledger; it never starts twice"
    )]
    AlreadyStarted {
        /// The task.
        task: TaskId,
        /// The attempt.
        attempt: u32,
        /// Its recorded state.
        state: &'static str,
    },
    /// The replica failed.
    #[error(transparent)]
    Replica(Box<ReplicaError>),
    /// Writing to the thread failed.
    #[error(transparent)]
    Peer(Box<PeerError>),
}

impl From<ReplicaError> for LedgerError {
    fn from(e: ReplicaError) -> Self {
        Self::Replica(Box::new(e))
    }
}

impl From<PeerError> for LedgerError {
    fn from(e: PeerError) -> Self {
        Self::Peer(Box::new(e))
    }
}

/// The entry for one attempt.
pub fn get(store: &Store, task: TaskId, attempt: u32) -> Result<Option<LedgerEntry>, StoreError> {
    let key = task.to_string();
    store
        .read_table(LEDGER_TABLE, |t| {
            t.get((key.as_str(), attempt))?
                .map(|v| decode(&key, attempt, v.value()))
                .transpose()
        })
        .map(Option::flatten)
}

/// Every entry of these tasks, by (task, attempt).
pub fn entries_for(
    store: &Store,
    tasks: impl IntoIterator<Item = TaskId>,
) -> Result<HashMap<(TaskId, u32), LedgerEntry>, StoreError> {
    let keys: Vec<String> = tasks.into_iter().map(|t| t.to_string()).collect();
    let found = store.read_table(LEDGER_TABLE, |t| {
        let mut out = HashMap::new();
        for key in &keys {
            for row in t.range((key.as_str(), 0u32)..=(key.as_str(), u32::MAX))? {
                let (k, v) = row?;
                let (task, attempt) = k.value();
                let e = decode(task, attempt, v.value())?;
                out.insert((e.task, e.attempt), e);
            }
        }
        Ok(out)
    })?;
    Ok(found.unwrap_or_default())
}

/// Every entry whose attempt started and has not ended: the desktop stopped while it ran.
pub fn unfinished(store: &Store) -> Result<Vec<LedgerEntry>, StoreError> {
    let found = store.read_table(LEDGER_TABLE, |t| {
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let (task, attempt) = k.value();
            let e = decode(task, attempt, v.value())?;
            if matches!(e.state, LedgerState::Started(_)) {
                out.push(e);
            }
        }
        Ok(out)
    })?;
    Ok(found.unwrap_or_default())
}

/// Records `state` for the attempt if it is further along than what is recorded; durable on
/// return. Returns whether it wrote.
pub fn advance(
    store: &Store,
    task: TaskId,
    attempt: u32,
    state: &LedgerState,
    at: Millis,
) -> Result<bool, StoreError> {
    let key = task.to_string();
    store.write(|txn| {
        let mut t = txn.table(LEDGER_TABLE)?;
        let current = t
            .get((key.as_str(), attempt))?
            .map(|v| decode(&key, attempt, v.value()))
            .transpose()?;
        if current.is_some_and(|c| c.state.rank() >= state.rank()) {
            return Ok(false);
        }
        let bytes = encode(state, at)?;
        t.insert((key.as_str(), attempt), bytes.as_slice())?;
        Ok(true)
    })
}

/// [`advance`] for many attempts in one transaction.
pub fn advance_many(
    store: &Store,
    attempts: &[(TaskId, u32)],
    state: &LedgerState,
    at: Millis,
) -> Result<usize, StoreError> {
    let bytes = encode(state, at)?;
    store.write(|txn| {
        let mut t = txn.table(LEDGER_TABLE)?;
        let mut wrote = 0;
        for (task, attempt) in attempts {
            let key = task.to_string();
            let current = t
                .get((key.as_str(), *attempt))?
                .map(|v| decode(&key, *attempt, v.value()))
                .transpose()?;
            if current.is_some_and(|c| c.state.rank() >= state.rank()) {
                continue;
            }
            t.insert((key.as_str(), *attempt), bytes.as_slice())?;
            wrote += 1;
        }
        Ok(wrote)
    })
}

/// The write-ahead record: the attempt's process group, durable before the process may run.
/// Refuses (and writes nothing) if the attempt has started before.
pub fn begin_start(
    store: &Store,
    task: TaskId,
    attempt: u32,
    group: ProcessGroup,
    at: Millis,
) -> Result<(), LedgerError> {
    let key = task.to_string();
    store.write(|txn| {
        let mut t = txn.table(LEDGER_TABLE)?;
        let current = t
            .get((key.as_str(), attempt))
            .map_err(StoreError::from)?
            .map(|v| decode(&key, attempt, v.value()))
            .transpose()?;
        if let Some(c) = current.filter(|c| c.state.has_started()) {
            return Err(LedgerError::AlreadyStarted {
                task,
                attempt,
                state: c.state.name(),
            });
        }
        let bytes = encode(&LedgerState::Started(group), at)?;
        t.insert((key.as_str(), attempt), bytes.as_slice())
            .map_err(StoreError::from)?;
        Ok(())
    })
}

/// An attempt that [`recover`] found started but not finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The task.
    pub task: TaskId,
    /// The attempt.
    pub attempt: u32,
    /// Its process group was still alive and was killed.
    pub killed: bool,
    /// `interrupted` was appended (false if the document already had a terminal fact).
    pub interrupted: bool,
}

/// Start-up recovery: for every attempt the ledger shows as started but not ended, kill what is
/// left of its process group, append `interrupted` unless the document already ended the
/// attempt, and mark the entry ended. Must run before the runner starts any task.
pub async fn recover(peer: &Peer) -> Result<Vec<Recovered>, LedgerError> {
    let replica = peer.replica().clone();
    let entries = replica.store_blocking(unfinished).await??;
    let me = peer.device_id();
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let LedgerState::Started(group) = &entry.state else {
            continue;
        };
        let killed = if group.alive_and_ours() {
            let pgid = group.pgid;
            tokio::task::spawn_blocking(move || kill_and_wait(pgid))
                .await
                .unwrap_or(false)
        } else {
            false
        };
        let (task, attempt) = (entry.task, entry.attempt);
        let doc_task = replica.read(move |d| d.task(&task)).await?;
        let already_ended = doc_task.as_ref().is_some_and(|t| {
            t.events
                .iter()
                .any(|e| e.attempt == attempt && e.author == me && e.kind.is_terminal())
        });
        let interrupted = doc_task.is_some() && !already_ended;
        if interrupted {
            peer.append_event(task, attempt, EventKind::Interrupted)
                .await?;
            let text = format!(
                "Task {task} (attempt {attempt}) was interrupted: the desktop stopped while it \
                 ran. It will not run again by itself; retry it to run it again."
            );
            if let Err(e) = peer
                .post_message(MessageKind::System, text, Some(task))
                .await
            {
                warn!(%task, error = %e, "could not post the interruption notice");
            }
        }
        let fact = if interrupted { "interrupted" } else { "ended" };
        let state = LedgerState::Ended { fact: fact.into() };
        let now = now_ms();
        replica
            .store_blocking(move |s| advance(s, task, attempt, &state, now))
            .await??;
        info!(%task, attempt, pgid = group.pgid, killed, interrupted, "recovered an attempt left running by a previous run");
        out.push(Recovered {
            task,
            attempt,
            killed,
            interrupted,
        });
    }
    Ok(out)
}

/// SIGKILLs group `pgid` and waits (bounded) until it has no members left.
fn kill_and_wait(pgid: i32) -> bool {
    let sent = kill_process_group(pgid);
    let deadline = Instant::now() + KILL_WAIT;
    while group_has_live_members(pgid) && Instant::now() < deadline {
        std::thread::sleep(KILL_POLL);
    }
    if group_has_live_members(pgid) {
        warn!(
            pgid,
            "a killed process group is still there (zombies or uninterruptible sleep)"
        );
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn an_empty_ledger_has_no_entries() {
        let (_d, s) = store();
        let t = TaskId::new_at(1);
        assert_eq!(get(&s, t, 1).unwrap(), None);
        assert!(entries_for(&s, [t]).unwrap().is_empty());
        assert!(unfinished(&s).unwrap().is_empty());
    }

    #[test]
    fn states_only_move_forward() {
        let (_d, s) = store();
        let t = TaskId::new_at(1);
        assert!(advance(&s, t, 1, &LedgerState::AwaitingApproval, 5).unwrap());
        assert!(!advance(&s, t, 1, &LedgerState::Delivered, 6).unwrap());
        assert_eq!(
            get(&s, t, 1).unwrap().unwrap().state,
            LedgerState::AwaitingApproval
        );
        let ended = LedgerState::Ended {
            fact: "finished".into(),
        };
        assert!(advance(&s, t, 1, &ended, 7).unwrap());
        assert!(!advance(&s, t, 1, &LedgerState::AwaitingApproval, 8).unwrap());
        let e = get(&s, t, 1).unwrap().unwrap();
        assert_eq!((e.state, e.at), (ended, 7));
        // Another attempt is another entry.
        assert!(advance(&s, t, 2, &LedgerState::Delivered, 9).unwrap());
        assert_eq!(entries_for(&s, [t]).unwrap().len(), 2);
        // In bulk, too.
        let u = TaskId::new_at(2);
        let n = advance_many(
            &s,
            &[(t, 2), (t, 3), (u, 1)],
            &LedgerState::AwaitingApproval,
            10,
        );
        assert_eq!(n.unwrap(), 3);
        assert_eq!(
            advance_many(&s, &[(t, 1), (u, 1)], &LedgerState::Delivered, 11).unwrap(),
            0
        );
    }

    #[test]
    fn an_attempt_starts_at_most_once() {
        let (_d, s) = store();
        let t = TaskId::new_at(1);
        let group = ProcessGroup {
            pgid: 4242,
            boot_id: None,
            leader_start: None,
        };
        advance(&s, t, 1, &LedgerState::Delivered, 1).unwrap();
        begin_start(&s, t, 1, group.clone(), 2).unwrap();
        assert_eq!(
            unfinished(&s).unwrap(),
            vec![LedgerEntry {
                task: t,
                attempt: 1,
                state: LedgerState::Started(group.clone()),
                at: 2
            }]
        );
        let again = begin_start(&s, t, 1, group.clone(), 3).unwrap_err();
        assert!(
            matches!(again, LedgerError::AlreadyStarted { .. }),
            "{again}"
        );
        advance(
            &s,
            t,
            1,
            &LedgerState::Ended {
                fact: "finished".into(),
            },
            4,
        )
        .unwrap();
        assert!(unfinished(&s).unwrap().is_empty());
        assert!(begin_start(&s, t, 1, group.clone(), 5).is_err());
        // A retry is a new attempt, and may start.
        begin_start(&s, t, 2, group, 6).unwrap();
    }

    #[test]
    fn entries_survive_reopening_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let t = TaskId::new_at(1);
        {
            let s = Store::open(dir.path()).unwrap();
            begin_start(
                &s,
                t,
                1,
                ProcessGroup::capture(std::process::id() as i32),
                1,
            )
            .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(unfinished(&s).unwrap().len(), 1);
    }

    #[test]
    fn a_process_group_is_recognised_only_while_it_is_the_same() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = child.id() as i32;
        let group = ProcessGroup::capture(pgid);
        assert!(group.alive_and_ours());
        let other_boot = ProcessGroup {
            boot_id: Some("another-boot".into()),
            ..group.clone()
        };
        if group.boot_id.is_some() {
            assert!(!other_boot.alive_and_ours());
        }
        let other_leader = ProcessGroup {
            leader_start: group.leader_start.map(|s| s + 1),
            ..group.clone()
        };
        if group.leader_start.is_some() {
            assert!(!other_leader.alive_and_ours());
        }
        assert!(kill_and_wait(pgid));
        assert!(!group_has_live_members(pgid));
        assert!(!group.alive_and_ours());
        child.wait().unwrap();
        assert!(!process_group_alive(pgid));
    }

    use std::os::unix::process::CommandExt;
}
