//! Routines in the typed API: `routine add|list|pause|resume|rm` on both CLIs and the FFI.

use errand_core::{
    CatchUp, DeviceId, Routine, RoutineEventKind, RoutineId, RoutineState, Schedule, TaskStatus,
    fold,
    routine::{DEFAULT_CATCH_UP_CAP, MAX_ACTIVE_ROUTINES, MAX_CATCH_UP_CAP},
    time::rfc3339,
};
use errand_crdt::NewRoutine;
use serde::{Deserialize, Serialize};

use super::{
    ApiError, Call, exit,
    ops::{check_instruction, err, usage},
};
use crate::peer::{Peer, now_ms};

/// `routine add TEXT --every D | --cron EXPR [--tz ZONE]`: a routine for the thread's
/// desktop. Stored here first, so it works offline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddRoutine {
    /// The instruction each occurrence runs.
    pub text: String,
    /// Executor name (default: the desktop's first).
    pub executor: Option<String>,
    /// When it is due.
    pub schedule: Schedule,
    /// What happens to occurrences that could not run on time (default `once`).
    #[serde(default)]
    pub catch_up: CatchUp,
    /// With `catch_up = all`: most missed occurrences run after a gap (default 10).
    pub catch_up_cap: Option<u32>,
}

impl Call for AddRoutine {
    type Response = RoutineInfo;
    async fn run(self, peer: &Peer) -> Result<RoutineInfo, ApiError> {
        check_instruction(&self.text)?;
        self.schedule.check().map_err(usage)?;
        let cap = self.catch_up_cap.unwrap_or(DEFAULT_CATCH_UP_CAP);
        if !(1..=MAX_CATCH_UP_CAP).contains(&cap) {
            return Err(usage(format!(
                "the catch-up cap must be between 1 and {MAX_CATCH_UP_CAP}, not {cap}"
            )));
        }
        let active = peer
            .replica()
            .read(|d| {
                d.routines()
                    .iter()
                    .filter(|r| r.state() == RoutineState::Active)
                    .count()
            })
            .await
            .map_err(err)?;
        if active >= MAX_ACTIVE_ROUTINES {
            return Err(usage(format!(
                "the thread has {active} active routines, the most a desktop runs: pause or delete one first"
            )));
        }
        let (target, default_exec) = super::ops::desktop_target(peer).await?;
        let new = NewRoutine {
            instruction: self.text,
            executor: self.executor.unwrap_or(default_exec),
            target,
            schedule: self.schedule,
            catch_up: self.catch_up,
            catch_up_cap: cap,
        };
        let id = peer.create_routine(new).await.map_err(err)?;
        read_one(peer, id).await
    }
}

/// `routine list [--all]`: the routines, with their last and next occurrence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRoutines {
    /// Deleted ones too.
    #[serde(default)]
    pub all: bool,
}

impl Call for ListRoutines {
    type Response = Vec<RoutineInfo>;
    async fn run(self, peer: &Peer) -> Result<Vec<RoutineInfo>, ApiError> {
        Ok(read(peer)
            .await?
            .into_iter()
            .filter(|(r, _)| self.all || r.state() != RoutineState::Deleted)
            .map(|(_, info)| info)
            .collect())
    }
}

/// What to do to a routine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutineChange {
    /// Stop creating occurrences.
    Pause,
    /// Create them again, from now on.
    Resume,
    /// Delete it for good.
    Delete,
}

/// `routine pause|resume|rm ID`: a request on a routine, stored here first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRoutine {
    /// The routine: its id, or a prefix of it that only it has.
    pub id: String,
    /// What to do.
    pub change: RoutineChange,
}

impl Call for ChangeRoutine {
    type Response = RoutineInfo;
    async fn run(self, peer: &Peer) -> Result<RoutineInfo, ApiError> {
        let wanted = self.id.trim().to_ascii_uppercase();
        if wanted.len() < 4 {
            return Err(usage(format!(
                "{:?} is too short to name a routine: give its id (see `routine list`)",
                self.id
            )));
        }
        let routines = peer.replica().read(|d| d.routines()).await.map_err(err)?;
        let found: Vec<&Routine> = routines
            .iter()
            .filter(|r| r.id.to_string().starts_with(&wanted))
            .collect();
        let r = match found.as_slice() {
            [r] => *r,
            [] => {
                return Err(ApiError::with_code(
                    exit::USAGE,
                    format!(
                        "no routine {} in this thread (see `routine list --all`)",
                        self.id
                    ),
                ));
            }
            _ => {
                return Err(usage(format!(
                    "{} names several routines: give more of the id",
                    self.id
                )));
            }
        };
        let state = r.state();
        let kind = match (self.change, state) {
            (_, RoutineState::Deleted) => {
                return Err(usage(format!("routine {} is deleted", r.id)));
            }
            (RoutineChange::Pause, RoutineState::Paused) => None,
            (RoutineChange::Resume, RoutineState::Active) => None,
            (RoutineChange::Pause, _) => Some(RoutineEventKind::Paused),
            (RoutineChange::Resume, _) => Some(RoutineEventKind::Resumed),
            (RoutineChange::Delete, _) => Some(RoutineEventKind::Deleted),
        };
        let id = r.id;
        if let Some(kind) = kind {
            peer.routine_event(id, kind).await.map_err(err)?;
        }
        read_one(peer, id).await
    }
}

/// The last occurrence of a routine that this device holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OccurrenceInfo {
    /// Its task.
    pub task_id: String,
    /// When it was due, RFC 3339.
    pub scheduled_at: String,
    /// Its task's status.
    pub status: TaskStatus,
}

/// A routine as both CLIs and the FFI show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutineInfo {
    /// Its id.
    pub id: String,
    /// What each occurrence does.
    pub instruction: String,
    /// Which executor runs it.
    pub executor: String,
    /// When it is due, in words.
    pub schedule: String,
    /// When it is due: `{kind: every, every_ms}` or `{kind: cron, expr, tz}`.
    pub schedule_spec: Schedule,
    /// `skip`, `once` or `all`.
    pub catch_up: CatchUp,
    /// With `all`: most missed occurrences run after a gap.
    pub catch_up_cap: u32,
    /// `active`, `paused` or `deleted`.
    pub state: RoutineState,
    /// Who created it.
    pub author: DeviceId,
    /// When, RFC 3339.
    pub created_at: String,
    /// The newest occurrence this device holds.
    pub last: Option<OccurrenceInfo>,
    /// The next due time, RFC 3339 (none unless active).
    pub next_at: Option<String>,
    /// Occurrences the desktop recorded as missed, in all.
    pub missed: u64,
}

impl RoutineInfo {
    fn of(r: &Routine, last: Option<(errand_core::TaskId, TaskStatus)>, now: i64) -> Self {
        Self {
            id: r.id.to_string(),
            instruction: r.instruction.clone(),
            executor: r.executor.clone(),
            schedule: r.schedule.describe(),
            schedule_spec: r.schedule.clone(),
            catch_up: r.catch_up,
            catch_up_cap: r.catch_up_cap,
            state: r.state(),
            author: r.author.clone(),
            created_at: rfc3339(r.created_at),
            last: last.map(|(id, status)| OccurrenceInfo {
                task_id: id.to_string(),
                scheduled_at: rfc3339(id.timestamp_ms()),
                status,
            }),
            next_at: r.next_after(now).map(rfc3339),
            missed: r.missed_total(),
        }
    }
}

/// Reads the routines, each with its view (the last occurrence found among held tasks).
async fn read(peer: &Peer) -> Result<Vec<(Routine, RoutineInfo)>, ApiError> {
    let now = now_ms();
    peer.replica()
        .read(move |d| {
            let routines = d.routines();
            let tasks = if routines.is_empty() {
                Vec::new()
            } else {
                d.tasks()
            };
            routines
                .into_iter()
                .map(|r| {
                    let last = tasks
                        .iter()
                        .filter(|t| r.is_occurrence(t))
                        .max_by_key(|t| t.id)
                        .map(|t| (t.id, fold(t).status));
                    let info = RoutineInfo::of(&r, last, now);
                    (r, info)
                })
                .collect()
        })
        .await
        .map_err(err)
}

async fn read_one(peer: &Peer, id: RoutineId) -> Result<RoutineInfo, ApiError> {
    read(peer)
        .await?
        .into_iter()
        .find(|(r, _)| r.id == id)
        .map(|(_, info)| info)
        .ok_or_else(|| err(format!("routine {id} does not read back")))
}
