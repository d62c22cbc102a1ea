//! The task runner: the desktop runs tasks as they merge in, and writes progress and results
//! back into the thread (DESIGN.md sections 3 and 8).
//!
//! - [`Runner::start`] first runs the ledger's start-up recovery (attempts a crash left running
//!   are killed and marked `interrupted`), then spawns one loop task that owns all scheduling
//!   state. It scans every task once, then reacts to [`PeerEvent::Merged`] and
//!   [`PeerEvent::Committed`] for the tasks they name. A lagging event receiver rescans.
//! - For each task whose target is this desktop, [`decide`] (pure) says what to do with its
//!   latest attempt: append `delivered`; settle it (`cancelled{requested|expired|revoked}`,
//!   `denied`, `failed` for an unknown executor); fetch its attachments; ask for approval and
//!   wait; or run it.
//! - A task with attachments gets `fetching` (once per attempt, when a blob is not held here
//!   yet), and `delivered` only once every attachment is verified and placed in
//!   `<workspace>/<task>/attachments/`. The fetch runs beside the attempts (it takes no run
//!   slot), waits for the phone while it is away, and is stopped by a cancel, a revocation or
//!   an expiry; a fetch that fails for good ends the attempt `failed` with the reason. After
//!   a restart, an attempt left at `fetching` fetches on from the verified prefix.
//! - Runnable tasks wait in a queue ordered by task id (ULIDs sort by creation time, so oldest
//!   first) and start while fewer than `max_parallel` run. Just before a start the task is read
//!   again and decided again.
//! - An attempt: the thread so far is written as a Markdown transcript; the executor spawns the
//!   process behind its start gate; `on_spawn` makes the ledger entry durable; then `started`,
//!   batched `output`, and a terminal fact. Output in the document is capped; the full log stays
//!   in `<home>/logs/<task>-<attempt>.log`, named in a message on the task.
//! - `cancel_requested` on a running attempt fires its cancellation token: the executor kills the
//!   process group within a second. On shutdown, running attempts are stopped and marked
//!   `interrupted`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use errand_core::{
    DeviceId, EventKind, MessageKind, Request, Task, TaskId, TaskStatus, TaskView, fold,
    time::Millis,
};
use errand_p2p::peer::{Peer, PeerEvent, changed_tasks, now_ms};
use tokio::{
    sync::{broadcast, mpsc, oneshot, watch},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    config::{ApprovalPolicy, Settings},
    executor::{self, ExecError, ExecOutcome, ExecSpec, ExecutorConfig, ExecutorKind},
    ledger::{self, LedgerEntry, LedgerError, LedgerState, ProcessGroup},
    transcript::{self, ThreadSnapshot},
    turn::{Agents, Facts, PermissionAnswer, Turn},
};

use crate::attempt::{OutputPlan, cap_text};
pub use crate::attempt::{
    REASON_EXPIRED, REASON_REQUESTED, REASON_REVOKED, agent_out_dir, attachment_names,
    attachments_dir, out_dir,
};

/// The directory in the home that holds attempt logs and thread transcripts.
pub const LOGS_DIR: &str = "logs";

/// Pieces of output text between the executor and [`OutputPlan`], which groups them into
/// `output` events (the one place output is batched). The executor never waits on a full
/// channel (it keeps what did not fit, up to its own cap), so a small channel costs nothing:
/// 16 pieces, each one read of a pipe or the text that waited for room.
const OUTPUT_CHANNEL_CAPACITY: usize = 16;

/// Most task ids remembered as "announced but not readable yet" (a phone's task can merge just
/// before the desktop records the phone's actor). Beyond it the oldest are forgotten; the next
/// full scan finds them.
const MAX_UNREADABLE: usize = 1024;

/// `delivered` facts written per commit when many tasks arrive at once (a phone's offline queue,
/// the start-up scan): one store write per batch instead of one per task, while each commit stays
/// small enough not to hold the replica for long.
const DELIVER_BATCH: usize = 256;

/// After a failed write to the thread, when to look at the task again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// On shutdown, how long running attempts get to stop and record `interrupted`: the executor's
/// kill takes about 0.5 s, its drain at most 2 s more; the rest is for the writes.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Deciding (pure)
// ---------------------------------------------------------------------------------------------

/// What the runner should do with a task's latest attempt (that does not run in this process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing now: the attempt has ended.
    Nothing,
    /// Append this terminal fact.
    Settle(EventKind),
    /// The attempt started before but does not run here: append `interrupted`. It never starts
    /// again.
    Interrupt,
    /// Fetch the attachments (appending `fetching` first when they are not held here), then
    /// look again; if they are not in place by `until`, look again then.
    Fetch {
        /// The task's `not_after`.
        until: Option<Millis>,
    },
    /// Append `approval_requested`, then wait (until `until` at the latest).
    AskApproval {
        /// When to look again (the task's `not_after` or the approval expiry).
        until: Option<Millis>,
    },
    /// Wait for the phone's answer (until `until` at the latest).
    Wait {
        /// When to look again.
        until: Option<Millis>,
    },
    /// The attempt may run; if it has not started by `until`, look again.
    Run {
        /// The task's `not_after`.
        until: Option<Millis>,
    },
}

/// What [`decide`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct DecideInput<'a> {
    /// The task.
    pub task: &'a Task,
    /// Its fold.
    pub view: &'a TaskView,
    /// This desktop's ledger entry for the latest attempt.
    pub ledger: Option<&'a LedgerState>,
    /// The task's author has been revoked.
    pub author_revoked: bool,
    /// This desktop offers the task's executor.
    pub executor_known: bool,
    /// The task has no attachments, or they are verified and placed for this attempt.
    pub attachments_placed: bool,
    /// The approval policy.
    pub policy: ApprovalPolicy,
    /// Deny after waiting this long for approval.
    pub approval_expiry: Option<Duration>,
    /// The time now.
    pub now: Millis,
}

/// Decides what to do with the latest attempt of a task targeting this desktop that does not
/// run in this process. A `queued` or `fetching_attachments` attempt whose attachments are in
/// place is treated as `delivered` (the caller appends that fact first); one whose are not is
/// fetched. Races are settled by a fixed order: cancel, revocation, expiry, unknown executor,
/// a denial, the attachments, approval.
pub fn decide(i: &DecideInput<'_>) -> Decision {
    let v = i.view;
    match v.status {
        s if s.is_terminal() => return Decision::Nothing,
        TaskStatus::Running | TaskStatus::AwaitingPermission => return Decision::Interrupt,
        _ => {}
    }
    if i.ledger.is_some_and(LedgerState::has_started) {
        return Decision::Interrupt;
    }
    let cancelled = |reason: &str| {
        Decision::Settle(EventKind::Cancelled {
            reason: reason.to_owned(),
        })
    };
    if v.requests.contains(&Request::CancelRequested) {
        return cancelled(REASON_REQUESTED);
    }
    if i.author_revoked {
        return cancelled(REASON_REVOKED);
    }
    let not_after = i.task.not_after;
    if not_after.is_some_and(|t| i.now >= t) {
        return cancelled(REASON_EXPIRED);
    }
    if !i.executor_known {
        return Decision::Settle(EventKind::Failed {
            reason: cap_text(&format!(
                "this desktop has no executor named {:?}",
                i.task.executor
            )),
        });
    }
    if v.requests.contains(&Request::Denied) {
        return Decision::Settle(EventKind::Denied);
    }
    if !i.attachments_placed
        && matches!(
            v.status,
            TaskStatus::Queued | TaskStatus::FetchingAttachments
        )
    {
        return Decision::Fetch { until: not_after };
    }
    if v.requests.contains(&Request::Approved) {
        return Decision::Run { until: not_after };
    }
    let expiry_ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    match v.status {
        TaskStatus::AwaitingApproval => {
            let asked_at = i
                .task
                .events
                .iter()
                .filter(|e| {
                    e.attempt == v.attempt
                        && e.author == i.task.target
                        && e.kind == EventKind::ApprovalRequested
                })
                .map(|e| e.at)
                .min()
                .unwrap_or(i.now);
            let expires = i
                .approval_expiry
                .map(|d| asked_at.saturating_add(expiry_ms(d)));
            if expires.is_some_and(|t| i.now >= t) {
                return Decision::Settle(EventKind::Denied);
            }
            Decision::Wait {
                until: earliest(not_after, expires),
            }
        }
        _ => match i.policy {
            ApprovalPolicy::Auto => Decision::Run { until: not_after },
            ApprovalPolicy::Ask => Decision::AskApproval {
                until: earliest(
                    not_after,
                    i.approval_expiry
                        .map(|d| i.now.saturating_add(expiry_ms(d))),
                ),
            },
        },
    }
}

fn earliest(a: Option<Millis>, b: Option<Millis>) -> Option<Millis> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

// ---------------------------------------------------------------------------------------------
// The runner
// ---------------------------------------------------------------------------------------------

/// Why the runner could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The workspace or log directory could not be created.
    #[error("cannot create the directory {}: {source}", .path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// Start-up recovery failed; no task was started.
    #[error("start-up recovery of the task ledger failed: {0}")]
    Recover(#[from] LedgerError),
}

/// The running task runner. [`Runner::shutdown`] stops it.
#[derive(Debug)]
pub struct Runner {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// The scheduler that turns routines into tasks.
    scheduler: tokio::task::JoinHandle<()>,
    recovered: Vec<ledger::Recovered>,
}

impl Runner {
    /// Recovers attempts a previous run left behind, then starts running this desktop's tasks.
    pub async fn start(peer: Peer, settings: Settings) -> Result<Self, RunnerError> {
        let logs = peer.home().join(LOGS_DIR);
        for dir in [&settings.workspace, &logs] {
            std::fs::create_dir_all(dir).map_err(|source| RunnerError::Dir {
                path: dir.clone(),
                source,
            })?;
        }
        restrict_dir(&logs);
        // Subscribe before anything is read, so nothing that merges from now on is missed.
        let events = peer.events();
        let changes = peer.replica().subscribe_changes();
        let recovered = ledger::recover(&peer).await?;
        let shutdown = CancellationToken::new();
        let scheduler = tokio::spawn(
            crate::schedule::run(peer.clone(), shutdown.clone())
                .instrument(info_span!("scheduler")),
        );
        let state = Loop {
            me: peer.device_id(),
            peer,
            settings: Arc::new(settings),
            logs,
            running: HashMap::new(),
            ready: BTreeMap::new(),
            wake: HashMap::new(),
            unreadable: BTreeSet::new(),
            rescan_at: None,
            attempts: JoinSet::new(),
            attempt_ids: HashMap::new(),
            forwarded: HashMap::new(),
            agents: Agents::default(),
            fetches: HashMap::new(),
            fetch_jobs: JoinSet::new(),
            fetch_ids: HashMap::new(),
            placed: HashSet::new(),
            shutdown: shutdown.clone(),
        };
        let task = tokio::spawn(state.run(events, changes).instrument(info_span!("runner")));
        Ok(Self {
            shutdown,
            task,
            scheduler,
            recovered,
        })
    }

    /// Attempts that start-up recovery found left running by a previous run.
    pub fn recovered(&self) -> &[ledger::Recovered] {
        &self.recovered
    }

    /// Stops the runner: running attempts are stopped (process groups killed) and marked
    /// `interrupted`; waits for that, bounded.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.scheduler.await;
        let abort = self.task.abort_handle();
        if tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(2), self.task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

/// A running attempt, as the loop sees it.
#[derive(Debug, Clone)]
struct Active {
    attempt: u32,
    cancel: CancellationToken,
    requested: Arc<AtomicBool>,
    /// Permission answers for an agent's turn.
    answers: mpsc::UnboundedSender<PermissionAnswer>,
}

/// What one load from the document and the ledger returned.
struct Loaded {
    tasks: Vec<Task>,
    revoked: HashSet<DeviceId>,
    ledger: HashMap<(TaskId, u32), LedgerEntry>,
}

struct Loop {
    peer: Peer,
    me: DeviceId,
    settings: Arc<Settings>,
    logs: PathBuf,
    /// Attempts running in this process.
    running: HashMap<TaskId, Active>,
    /// Runnable tasks, oldest first, with their attempt.
    ready: BTreeMap<TaskId, u32>,
    /// When to look at a task again (expiry of `not_after` or of an approval).
    wake: HashMap<TaskId, Millis>,
    /// Tasks a merge named that did not read (yet).
    unreadable: BTreeSet<TaskId>,
    /// When to scan every task again, after a full scan failed.
    rescan_at: Option<Millis>,
    attempts: JoinSet<()>,
    attempt_ids: HashMap<tokio::task::Id, TaskId>,
    /// Permission answers already handed to a running turn, by task.
    forwarded: HashMap<TaskId, HashSet<String>>,
    /// Agents waiting for a reply between turns.
    agents: Agents,
    /// Attachments being fetched, by task: the attempt and what stops the fetch.
    fetches: HashMap<TaskId, (u32, CancellationToken)>,
    /// The fetches themselves; each ends with its task, attempt and result.
    fetch_jobs: JoinSet<(TaskId, u32, Result<PathBuf, FetchStopped>)>,
    fetch_ids: HashMap<tokio::task::Id, TaskId>,
    /// Attempts whose attachments this process placed (verified, copied into the task's
    /// folder): they may be delivered.
    placed: HashSet<(TaskId, u32)>,
    shutdown: CancellationToken,
}

impl Loop {
    async fn run(
        mut self,
        mut events: broadcast::Receiver<PeerEvent>,
        mut changes: watch::Receiver<u64>,
    ) {
        // Finished tasks need nothing from the runner, so it starts from the replica's index
        // of unfinished ones instead of reading every task held in memory (on a long thread
        // that read was half the time to ready, callgrind, issue 8).
        match self.peer.replica().open_tasks().await {
            Ok(open) => self.load_and_handle(Some(open)).await,
            Err(e) => {
                debug!(error = %e, "no index of unfinished tasks; reading them all");
                self.load_and_handle(None).await;
            }
        }
        loop {
            self.dispatch().await;
            let next_wake = self.next_wake();
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                Some(joined) = self.attempts.join_next_with_id(), if !self.attempts.is_empty() => {
                    let id = match joined {
                        Ok((id, ())) => id,
                        Err(e) => {
                            warn!(error = %e, "an attempt's task failed");
                            e.id()
                        }
                    };
                    if let Some(task) = self.attempt_ids.remove(&id) {
                        self.running.remove(&task);
                        self.forwarded.remove(&task);
                        // Requests that arrived while it ran (a retry) are looked at now.
                        self.load_and_handle(Some(BTreeSet::from([task]))).await;
                    }
                }
                Some(joined) = self.fetch_jobs.join_next_with_id(), if !self.fetch_jobs.is_empty() => {
                    match joined {
                        Ok((job, (task, attempt, result))) => {
                            self.fetch_ids.remove(&job);
                            self.fetched(task, attempt, result).await;
                        }
                        Err(e) => {
                            // A fetch that panicked: forget it; the next look fetches again.
                            warn!(error = %e, "a fetch of attachments failed");
                            if let Some(task) = self.fetch_ids.remove(&e.id()) {
                                self.fetches.remove(&task);
                                let at = now_ms() + RETRY_AFTER.as_millis() as i64;
                                self.wake.insert(task, at);
                            }
                        }
                    }
                }
                () = sleep_until_ms(next_wake) => {
                    let now = now_ms();
                    if self.rescan_at.is_some_and(|at| at <= now) {
                        self.rescan_at = None;
                        self.load_and_handle(None).await;
                    }
                    let due: BTreeSet<TaskId> = self
                        .wake
                        .iter()
                        .filter(|(_, at)| **at <= now)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in &due {
                        self.wake.remove(id);
                    }
                    self.load_and_handle(Some(due)).await;
                }
                ev = events.recv() => match ev {
                    Ok(ev) => {
                        let ids = changed_tasks(&ev);
                        if !ids.is_empty() {
                            self.load_and_handle(Some(ids)).await;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        debug!(missed = n, "peer events lagged; rescanning every task");
                        self.load_and_handle(None).await;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                changed = changes.changed(), if !self.unreadable.is_empty() => {
                    if changed.is_err() {
                        break;
                    }
                    let ids = std::mem::take(&mut self.unreadable);
                    self.load_and_handle(Some(ids)).await;
                }
            }
        }
        self.stop_attempts().await;
    }

    /// Stops running attempts (they record `interrupted`) and waits for them, bounded.
    async fn stop_attempts(&mut self) {
        // Fetches stop at the shutdown token; what they verified stays for the next run.
        self.fetch_jobs.abort_all();
        while self.fetch_jobs.join_next().await.is_some() {}
        self.agents.stop_all().await;
        if self.running.is_empty() {
            return;
        }
        info!(running = self.running.len(), "stopping running tasks");
        for a in self.running.values() {
            a.cancel.cancel();
        }
        let all = async { while self.attempts.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, all).await.is_err() {
            warn!("running tasks did not stop in time; killing them");
            self.attempts.abort_all();
            while self.attempts.join_next().await.is_some() {}
        }
    }

    fn next_wake(&self) -> Option<Millis> {
        earliest(self.wake.values().min().copied(), self.rescan_at)
    }

    /// Reads the given tasks (or all, for `None`) and handles each one targeting this desktop.
    async fn load_and_handle(&mut self, ids: Option<BTreeSet<TaskId>>) {
        if ids.as_ref().is_some_and(BTreeSet::is_empty) {
            return;
        }
        let loaded = match self.load(ids.clone()).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "could not read tasks; looking again shortly");
                let at = now_ms() + RETRY_AFTER.as_millis() as i64;
                match ids {
                    Some(ids) => {
                        for id in ids {
                            self.wake.insert(id, at);
                        }
                    }
                    None => self.rescan_at = Some(at),
                }
                return;
            }
        };
        if let Some(ids) = &ids {
            let read: HashSet<TaskId> = loaded.tasks.iter().map(|t| t.id).collect();
            for id in ids.iter().filter(|id| !read.contains(id)) {
                self.unreadable.insert(*id);
            }
            while self.unreadable.len() > MAX_UNREADABLE {
                self.unreadable.pop_first();
            }
        }
        for task in &loaded.tasks {
            self.unreadable.remove(&task.id);
        }
        let mut loaded = loaded;
        self.deliver_many(&mut loaded).await;
        for task in &loaded.tasks {
            if task.target == self.me {
                self.handle(task, &loaded, false).await;
            }
        }
    }

    /// Appends `delivered` to every queued attempt in `loaded`, in a few commits, and adds the
    /// fact to the loaded tasks as well.
    async fn deliver_many(&mut self, loaded: &mut Loaded) {
        let queued: Vec<(TaskId, u32)> = loaded
            .tasks
            .iter()
            .filter(|t| t.target == self.me && !self.running.contains_key(&t.id))
            // A task with attachments is delivered once they are in place (`handle`).
            .filter(|t| t.attachments.is_empty())
            .filter_map(|t| {
                let v = fold(t);
                let started = loaded
                    .ledger
                    .get(&(t.id, v.attempt))
                    .is_some_and(|e| e.state.has_started());
                (v.status == TaskStatus::Queued && !started).then_some((t.id, v.attempt))
            })
            .collect();
        if queued.len() < 2 {
            // One task: `handle` delivers it.
            return;
        }
        let mut delivered = HashMap::new();
        for chunk in queued.chunks(DELIVER_BATCH) {
            let chunk = chunk.to_vec();
            let now = now_ms();
            let wrote = self
                .peer
                .replica()
                .commit(move |d| {
                    // Never fail the closure: what it wrote before an error would stay in
                    // memory without being stored.
                    Ok::<_, errand_crdt::WriteError>(
                        chunk
                            .into_iter()
                            .filter(|(id, attempt)| {
                                d.append_task_event(*id, *attempt, &EventKind::Delivered, now)
                                    .is_ok()
                            })
                            .collect::<Vec<_>>(),
                    )
                })
                .await;
            match wrote {
                Ok((done, _)) => {
                    let ids = done.clone();
                    let r = self
                        .peer
                        .replica()
                        .store_blocking(move |s| {
                            ledger::advance_many(s, &ids, &LedgerState::Delivered, now)
                        })
                        .await;
                    if !matches!(r, Ok(Ok(_))) {
                        warn!("could not update the task ledger");
                    }
                    delivered.extend(done.into_iter().map(|(id, attempt)| (id, (attempt, now))));
                }
                // `handle` tries each of them again on its own.
                Err(e) => {
                    warn!(error = %e, tasks = queued.len(), "could not deliver a batch of tasks")
                }
            }
        }
        info!(tasks = delivered.len(), "delivered");
        for t in &mut loaded.tasks {
            if let Some((attempt, at)) = delivered.get(&t.id) {
                t.events.push(errand_core::TaskEvent {
                    at: *at,
                    attempt: *attempt,
                    author: self.me.clone(),
                    kind: EventKind::Delivered,
                });
            }
        }
    }

    async fn load(&self, ids: Option<BTreeSet<TaskId>>) -> Result<Loaded, LedgerError> {
        let (tasks, devices) = self
            .peer
            .replica()
            .read(move |d| {
                let tasks = match &ids {
                    Some(ids) => d.tasks_by_id(ids),
                    None => d.tasks(),
                };
                (tasks, d.devices())
            })
            .await?;
        let revoked = devices
            .into_iter()
            .filter(|d| d.is_revoked())
            .map(|d| d.id)
            .collect();
        let mine: Vec<TaskId> = tasks
            .iter()
            .filter(|t| t.target == self.me)
            .map(|t| t.id)
            .collect();
        let ledger = self
            .peer
            .replica()
            .store_blocking(move |s| ledger::entries_for(s, mine))
            .await??;
        Ok(Loaded {
            tasks,
            revoked,
            ledger,
        })
    }

    /// Starts runnable tasks, oldest first, while there is room.
    async fn dispatch(&mut self) {
        while self.running.len() < self.settings.max_parallel {
            let Some((id, _)) = self.ready.pop_first() else {
                break;
            };
            // Read it again: a cancel or an expiry may have come since it was queued.
            let loaded = match self.load(Some(BTreeSet::from([id]))).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(task = %id, error = %e, "could not read a task before starting it");
                    let at = now_ms() + RETRY_AFTER.as_millis() as i64;
                    self.wake.insert(id, at);
                    continue;
                }
            };
            for task in &loaded.tasks {
                self.handle(task, &loaded, true).await;
            }
        }
    }

    /// Acts on one task that targets this desktop.
    async fn handle(&mut self, task: &Task, loaded: &Loaded, start_now: bool) {
        let view = fold(task);
        if let Some(active) = self.running.get(&task.id) {
            // A cancel request, or a terminal fact written elsewhere in this desktop (revoking
            // the author settles its tasks), stops the process. Its own terminal fact comes
            // after the process ended, so stopping then changes nothing.
            let cancel = view.requests.contains(&Request::CancelRequested);
            if active.attempt == view.attempt
                && (cancel || view.status.is_terminal())
                && !active.requested.swap(true, Ordering::SeqCst)
            {
                if cancel {
                    info!(task = %task.id, attempt = active.attempt, "cancel requested; stopping the task");
                } else {
                    debug!(task = %task.id, attempt = active.attempt, status = ?view.status, "the task is settled; stopping its process if it still runs");
                }
                active.cancel.cancel();
            }
            // Answers to the agent's permission requests go to the running turn, once each.
            let forwarded = self.forwarded.entry(task.id).or_default();
            for e in &task.events {
                if let EventKind::PermissionAnswered { perm_id, option_id } = &e.kind
                    && e.attempt == active.attempt
                    && e.author != task.target
                    && forwarded.insert(perm_id.clone())
                {
                    let _ = active.answers.send((perm_id.clone(), option_id.clone()));
                }
            }
            return;
        }
        let attempt = view.attempt;
        let ledger_state = loaded
            .ledger
            .get(&(task.id, attempt))
            .map(|e| e.state.clone());
        let attachments_placed =
            task.attachments.is_empty() || self.placed.contains(&(task.id, attempt));
        if matches!(
            view.status,
            TaskStatus::Queued | TaskStatus::FetchingAttachments
        ) && attachments_placed
            && !ledger_state.as_ref().is_some_and(LedgerState::has_started)
        {
            if !self.append(task.id, attempt, EventKind::Delivered).await {
                return;
            }
            self.record(task.id, attempt, LedgerState::Delivered).await;
            info!(task = %task.id, attempt, "delivered");
        }
        let input = DecideInput {
            task,
            view: &view,
            ledger: ledger_state.as_ref(),
            author_revoked: loaded.revoked.contains(&task.author),
            executor_known: self.settings.executor(&task.executor).is_some(),
            attachments_placed,
            policy: self.settings.approval,
            approval_expiry: self.settings.approval_expiry,
            now: now_ms(),
        };
        let decision = decide(&input);
        if !matches!(decision, Decision::Fetch { .. })
            && let Some((_, stop)) = self.fetches.remove(&task.id)
        {
            // Cancelled, revoked, expired or ended elsewhere while its files were fetched.
            stop.cancel();
        }
        match decision {
            Decision::Nothing => self.forget(task.id),
            Decision::Fetch { until } => {
                self.wait(task.id, until);
                if self
                    .fetches
                    .get(&task.id)
                    .is_some_and(|(a, _)| *a == attempt)
                {
                    return;
                }
                if view.status == TaskStatus::Queued && !attachments_held(&self.peer, task).await {
                    if !self.append(task.id, attempt, EventKind::Fetching).await {
                        return;
                    }
                    self.record(task.id, attempt, LedgerState::Fetching).await;
                    info!(task = %task.id, attempt, files = task.attachments.len(), "fetching attachments");
                }
                self.fetch(task, attempt);
            }
            Decision::Settle(fact) => {
                info!(task = %task.id, attempt, fact = fact.name(), "settled");
                self.settle(task.id, attempt, fact).await;
            }
            Decision::Interrupt => {
                warn!(task = %task.id, attempt, "the attempt started before but is not running; marking it interrupted");
                self.settle(task.id, attempt, EventKind::Interrupted).await;
            }
            Decision::AskApproval { until } => {
                if !self
                    .append(task.id, attempt, EventKind::ApprovalRequested)
                    .await
                {
                    return;
                }
                self.record(task.id, attempt, LedgerState::AwaitingApproval)
                    .await;
                info!(task = %task.id, attempt, "approval requested");
                self.wait(task.id, until);
            }
            Decision::Wait { until } => self.wait(task.id, until),
            Decision::Run { until } => {
                if start_now && self.running.len() < self.settings.max_parallel {
                    self.start(task, attempt);
                } else {
                    self.ready.insert(task.id, attempt);
                    match until {
                        Some(at) => self.wake.insert(task.id, at),
                        None => self.wake.remove(&task.id),
                    };
                }
            }
        }
    }

    /// Starts fetching and placing the attachments of the task's attempt, beside the attempts.
    fn fetch(&mut self, task: &Task, attempt: u32) {
        let stop = self.shutdown.child_token();
        if let Some((_, old)) = self.fetches.insert(task.id, (attempt, stop.clone())) {
            old.cancel();
        }
        let (peer, workspace, task) = (
            self.peer.clone(),
            self.settings.workspace.clone(),
            task.clone(),
        );
        let span = info_span!("fetch", task = %task.id, attempt);
        let id = task.id;
        let handle = self.fetch_jobs.spawn(
            async move {
                let r = place_attachments(&peer, &workspace, &task, true, &stop, &stop).await;
                (task.id, attempt, r)
            }
            .instrument(span),
        );
        self.fetch_ids.insert(handle.id(), id);
    }

    /// A fetch ended: deliver the attempt once its files are in place, fail it if the fetch
    /// failed for good, or look again (it was stopped).
    async fn fetched(&mut self, id: TaskId, attempt: u32, result: Result<PathBuf, FetchStopped>) {
        if self.fetches.get(&id).is_some_and(|(a, _)| *a == attempt) {
            self.fetches.remove(&id);
        }
        match result {
            Ok(_) => {
                self.placed.insert((id, attempt));
            }
            Err(FetchStopped::Failed(reason)) if !self.shutdown.is_cancelled() => {
                // Only if the attempt still waits for its files (not cancelled meanwhile).
                let still = self
                    .load(Some(BTreeSet::from([id])))
                    .await
                    .ok()
                    .and_then(|l| l.tasks.into_iter().find(|t| t.id == id))
                    .map(|t| fold(&t))
                    .is_some_and(|v| {
                        v.attempt == attempt
                            && matches!(
                                v.status,
                                TaskStatus::Queued | TaskStatus::FetchingAttachments
                            )
                    });
                if still {
                    warn!(task = %id, attempt, %reason, "fetching the attachments failed");
                    let fact = EventKind::Failed {
                        reason: cap_text(&reason),
                    };
                    self.settle(id, attempt, fact).await;
                    let note =
                        format!("Task {id} (attempt {attempt}) failed before it started: {reason}");
                    if let Err(e) = self
                        .peer
                        .post_message(MessageKind::System, note, Some(id))
                        .await
                    {
                        warn!(error = %e, "could not post the failure note");
                    }
                }
                return;
            }
            Err(_) => {}
        }
        self.load_and_handle(Some(BTreeSet::from([id]))).await;
    }

    fn wait(&mut self, id: TaskId, until: Option<Millis>) {
        self.ready.remove(&id);
        match until {
            Some(at) => self.wake.insert(id, at),
            None => self.wake.remove(&id),
        };
    }

    fn forget(&mut self, id: TaskId) {
        self.ready.remove(&id);
        self.wake.remove(&id);
        self.placed.retain(|(t, _)| *t != id);
    }

    /// Appends a fact; on failure, logs and schedules another look. Returns whether it was
    /// written.
    async fn append(&mut self, id: TaskId, attempt: u32, kind: EventKind) -> bool {
        match self.peer.append_event(id, attempt, kind).await {
            Ok(()) => true,
            Err(e) => {
                warn!(task = %id, attempt, error = %e, "could not write to the thread; trying again shortly");
                self.wake
                    .insert(id, now_ms() + RETRY_AFTER.as_millis() as i64);
                false
            }
        }
    }

    async fn record(&self, id: TaskId, attempt: u32, state: LedgerState) {
        let now = now_ms();
        let r = self
            .peer
            .replica()
            .store_blocking(move |s| ledger::advance(s, id, attempt, &state, now))
            .await;
        if !matches!(r, Ok(Ok(_))) {
            warn!(task = %id, attempt, "could not update the task ledger");
        }
    }

    async fn settle(&mut self, id: TaskId, attempt: u32, fact: EventKind) {
        let name = fact.name().to_owned();
        if self.append(id, attempt, fact).await {
            self.forget(id);
            self.record(id, attempt, LedgerState::Ended { fact: name })
                .await;
        }
    }

    fn start(&mut self, task: &Task, attempt: u32) {
        let Some(exec) = self.settings.executor(&task.executor).cloned() else {
            return;
        };
        self.forget(task.id);
        let (answers, answers_rx) = mpsc::unbounded_channel();
        let active = Active {
            attempt,
            cancel: CancellationToken::new(),
            requested: Arc::new(AtomicBool::new(false)),
            answers,
        };
        self.running.insert(task.id, active.clone());
        let job = AttemptJob {
            peer: self.peer.clone(),
            settings: self.settings.clone(),
            logs: self.logs.clone(),
            task: task.clone(),
            attempt,
            exec,
            active,
            answers: answers_rx,
            agents: self.agents.clone(),
            shutdown: self.shutdown.clone(),
            attachments: None,
            out: None,
        };
        let span = info_span!("task", task = %task.id, attempt);
        let handle = self.attempts.spawn(job.run().instrument(span));
        self.attempt_ids.insert(handle.id(), task.id);
    }
}

/// The libp2p id of a device (a `DeviceId` is a validated PeerId).
fn libp2p_peer_id(device: &errand_core::DeviceId) -> errand_p2p::PeerId {
    errand_p2p::PeerId::from_bytes(&device.to_bytes())
        .unwrap_or_else(|_| errand_p2p::PeerId::random())
}

async fn sleep_until_ms(at: Option<Millis>) {
    match at {
        Some(at) => {
            let ms = u64::try_from(at.saturating_sub(now_ms())).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(unix)]
fn restrict_dir(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
}
#[cfg(not(unix))]
fn restrict_dir(_: &Path) {}

// ---------------------------------------------------------------------------------------------
// One attempt
// ---------------------------------------------------------------------------------------------

/// First wait before fetching an attachment again after the phone went away; doubles up to
/// [`FETCH_RETRY_MAX`]. The phone's own redial backoff is of the same order.
const FETCH_RETRY_START: Duration = Duration::from_secs(1);
/// Longest wait between attempts to fetch an attachment.
const FETCH_RETRY_MAX: Duration = Duration::from_secs(30);

/// Moves the entries an agent's turn left in `from` into `to` (the attempt's own folder), so
/// that the next turn starts with an empty `$ERRAND_OUT` and no file counts twice.
async fn move_results(from: &Path, to: &Path) {
    let Ok(mut entries) = tokio::fs::read_dir(from).await else {
        return;
    };
    while let Ok(Some(e)) = entries.next_entry().await {
        let dst = to.join(e.file_name());
        if let Err(err) = tokio::fs::rename(e.path(), &dst).await {
            warn!(file = %e.path().display(), error = %err, "could not move a result of the turn");
        }
    }
}

/// Why the attachments are not in place.
enum FetchStopped {
    /// The task was cancelled or the desktop is stopping.
    Cancelled,
    /// A fetch failed for good (refused, corrupt, over a cap, a disk error).
    Failed(String),
}

struct AttemptJob {
    peer: Peer,
    settings: Arc<Settings>,
    logs: PathBuf,
    task: Task,
    attempt: u32,
    exec: ExecutorConfig,
    active: Active,
    answers: mpsc::UnboundedReceiver<PermissionAnswer>,
    agents: Agents,
    shutdown: CancellationToken,
    /// The folder of the task's attachments, once they are in place.
    attachments: Option<PathBuf>,
    /// The attempt's `$ERRAND_OUT`, once the process was about to start: what it holds
    /// when the attempt ends becomes artifacts.
    out: Option<PathBuf>,
}

/// How the writer of `output` events ended.
struct Reported {
    started: bool,
    plan: OutputPlan,
}

/// Fetches the task's attachments from its author, verified, and copies them into the task's
/// own folder (a copy: the task may change its files, never the blob store's). Waits for the
/// phone while it is away, trying again with a backoff; returns the folder. With `refresh`
/// every file is copied again (a new attempt gets them as sent); without it, a file already
/// in the folder with the right size is kept.
async fn place_attachments(
    peer: &Peer,
    workspace: &Path,
    task: &Task,
    refresh: bool,
    cancel: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<PathBuf, FetchStopped> {
    let dir = attachments_dir(workspace, task.id);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| FetchStopped::Failed(format!("cannot create {}: {e}", dir.display())))?;
    let from = libp2p_peer_id(&task.author);
    let names: Vec<&str> = task.attachments.iter().map(|a| a.name.as_str()).collect();
    let names = attachment_names(&names);
    for (blob, name) in task.attachments.iter().zip(names) {
        let dst = dir.join(&name);
        if !refresh
            && tokio::fs::symlink_metadata(&dst)
                .await
                .is_ok_and(|m| m.is_file() && m.len() == blob.size)
        {
            continue;
        }
        let mut delay = FETCH_RETRY_START;
        let source = loop {
            let mut shown = 0u64;
            let mut progress = |done: u64, size: u64| {
                // One line per tenth, not one per range.
                if size > 0 && done * 10 / size > shown {
                    shown = done * 10 / size;
                    debug!(file = %name, done, size, "fetching attachment");
                }
            };
            let fetched = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(FetchStopped::Cancelled),
                _ = cancel.cancelled() => return Err(FetchStopped::Cancelled),
                r = peer.fetch_blob(from, blob, &mut progress) => r,
            };
            match fetched {
                Ok(path) => break path,
                Err(errand_p2p::blob::FetchError::Stream { source, .. }) => {
                    debug!(file = %name, error = %source, "the author is away; fetching again later");
                }
                Err(e) => {
                    return Err(FetchStopped::Failed(format!(
                        "could not fetch attachment {name}: {e}"
                    )));
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(FetchStopped::Cancelled),
                _ = cancel.cancelled() => return Err(FetchStopped::Cancelled),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(FETCH_RETRY_MAX);
        };
        let tmp = dir.join(format!(".{name}.part"));
        let copied = async {
            tokio::fs::copy(&source, &tmp).await?;
            tokio::fs::rename(&tmp, &dst).await
        }
        .await;
        if let Err(e) = copied {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(FetchStopped::Failed(format!(
                "cannot place attachment {name} in {}: {e}",
                dir.display()
            )));
        }
        info!(file = %name, size = blob.size, "attachment in place");
    }
    Ok(dir)
}

/// True when every attachment of `task` is held whole in this home's blob store (placing
/// them is then a local copy, with nothing to wait for).
async fn attachments_held(peer: &Peer, task: &Task) -> bool {
    let store = peer.blobs();
    let hashes: Vec<_> = task.attachments.iter().map(|a| a.hash).collect();
    tokio::task::spawn_blocking(move || {
        hashes
            .iter()
            .all(|h| store.path(h).ok().flatten().is_some())
    })
    .await
    .unwrap_or(false)
}

impl AttemptJob {
    async fn run(mut self) {
        let id = self.task.id;
        let attempt = self.attempt;
        let log_path = self.logs.join(format!("{id}-{attempt}.log"));
        let thread_path = self.logs.join(format!("{id}-{attempt}.thread.md"));
        if !self.task.attachments.is_empty() {
            // Placed before `delivered`; fetched again only if a file went missing since
            // (the desktop restarted and someone removed it).
            let placed = place_attachments(
                &self.peer,
                &self.settings.workspace,
                &self.task,
                false,
                &self.active.cancel,
                &self.shutdown,
            )
            .await;
            match placed {
                Ok(dir) => self.attachments = Some(dir),
                Err(stopped) => {
                    let fact = match stopped {
                        FetchStopped::Cancelled if self.shutdown.is_cancelled() => {
                            // Stopping: the attempt never started; the next run fetches on.
                            return;
                        }
                        FetchStopped::Cancelled => EventKind::Cancelled {
                            reason: REASON_REQUESTED.into(),
                        },
                        FetchStopped::Failed(reason) => EventKind::Failed {
                            reason: cap_text(&reason),
                        },
                    };
                    let summary = format!("{}: before it started", fact.name());
                    self.finish(fact, summary, &log_path).await;
                    return;
                }
            }
        }
        if let ExecutorKind::Acp(opts) = self.exec.kind().clone() {
            // The agent's `$ERRAND_OUT` stays the same while its process lives (a parked agent
            // goes on in the next turn); what it holds after a turn moves to the attempt's own
            // folder, and becomes artifacts from there.
            let agent_out = agent_out_dir(&self.settings.workspace, id);
            let out = out_dir(&self.settings.workspace, id, attempt);
            for dir in [&agent_out, &out] {
                if let Err(e) = tokio::fs::create_dir_all(dir).await {
                    let reason = format!("cannot create {}: {e}", dir.display());
                    let fact = EventKind::Failed {
                        reason: cap_text(&reason),
                    };
                    self.finish(fact, reason, &log_path).await;
                    return;
                }
            }
            let (answers_tx, answers) = mpsc::unbounded_channel();
            let answers = std::mem::replace(&mut self.answers, answers);
            drop(answers_tx);
            let turn = Turn {
                peer: &self.peer,
                task: &self.task,
                attempt,
                executor: self.exec.name(),
                opts: &opts,
                workspace: &self.settings.workspace,
                attachments: self.attachments.as_deref(),
                out: &agent_out,
                log_path: &log_path,
                thread_context: self.settings.thread_context,
                task_timeout: self.settings.task_timeout,
                output: self.output_plan(),
                cancel: &self.active.cancel,
                requested: &self.active.requested,
                shutdown: &self.shutdown,
                agents: &self.agents,
                facts: Facts::start(&self.peer, self.task.id, attempt),
            };
            let (fact, summary) = turn.run(answers).await;
            move_results(&agent_out, &out).await;
            self.out = Some(out);
            self.finish(fact, summary, &log_path).await;
            return;
        }

        let out = out_dir(&self.settings.workspace, id, attempt);
        if let Err(e) = tokio::fs::create_dir_all(&out).await {
            let reason = format!("cannot create {}: {e}", out.display());
            let fact = EventKind::Failed {
                reason: cap_text(&reason),
            };
            self.finish(fact, reason, &log_path).await;
            return;
        }
        self.out = Some(out);

        // The prompt of this attempt: a reply, else the instruction.
        let instruction = errand_core::prompt_of(&self.task, attempt).to_owned();
        // An instruction the executor would take for an option is refused before anything runs.
        let result = match self.exec.argv_with_thread(
            &instruction,
            &thread_path.to_string_lossy(),
            &self.attachment_paths(),
        ) {
            Err(refused) => Err(refused.to_string()),
            Ok(argv) => match self.write_transcript(&thread_path).await {
                Ok(()) => Ok(self.execute(argv, &log_path, &thread_path).await),
                Err(reason) => Err(reason),
            },
        };
        let (fact, summary) = match result {
            Err(reason) => (
                EventKind::Failed {
                    reason: cap_text(&reason),
                },
                reason,
            ),
            Ok((outcome, reported)) => {
                if let Some(text) = outcome
                    .as_ref()
                    .ok()
                    .and_then(|o| reported.plan.tail_event(&o.tail, &log_path))
                    && let Err(e) = self
                        .peer
                        .append_event(id, attempt, EventKind::Output { text })
                        .await
                {
                    warn!(error = %e, "could not write the output tail");
                }
                self.conclude(outcome, reported.started)
            }
        };
        self.finish(fact, summary, &log_path).await;
    }

    /// The placed attachments' paths, in the task's order (empty without attachments).
    fn attachment_paths(&self) -> Vec<String> {
        let Some(dir) = &self.attachments else {
            return Vec::new();
        };
        let names: Vec<&str> = self
            .task
            .attachments
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        attachment_names(&names)
            .into_iter()
            .map(|n| dir.join(n).to_string_lossy().into_owned())
            .collect()
    }

    /// Posts the log note, appends the terminal fact and closes the ledger entry.
    /// Stores each regular file the attempt left in its `$ERRAND_OUT` (sorted by name, at
    /// most [`errand_core::blob::MAX_ARTIFACTS_PER_ATTEMPT`]) as a blob and writes an
    /// `artifact` fact for it, before the attempt's terminal fact. A file that cannot be
    /// stored (a link, over a cap) is named in the task's output instead.
    async fn collect_artifacts(&self, dir: &Path) {
        let (id, attempt) = (self.task.id, self.attempt);
        let store = self.peer.blobs();
        let dir = dir.to_owned();
        let found = tokio::task::spawn_blocking(move || {
            let mut paths: Vec<PathBuf> = match std::fs::read_dir(&dir) {
                Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
                Err(_) => Vec::new(),
            };
            paths.sort();
            let extra = paths
                .len()
                .saturating_sub(errand_core::blob::MAX_ARTIFACTS_PER_ATTEMPT);
            paths.truncate(errand_core::blob::MAX_ARTIFACTS_PER_ATTEMPT);
            let results: Vec<Result<errand_core::BlobRef, String>> = paths
                .iter()
                .map(|p| {
                    let raw = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let name = errand_core::safe_file_name(&raw);
                    store
                        .add_regular_file(p)
                        .map(|(hash, size)| errand_core::BlobRef {
                            hash,
                            mime: errand_core::blob::mime_for_name(&name).to_owned(),
                            name,
                            size,
                        })
                        .map_err(|e| format!("{raw}: {e}"))
                })
                .collect();
            (results, extra)
        })
        .await;
        let Ok((results, extra)) = found else {
            warn!("could not collect the artifacts");
            return;
        };
        let mut refused = Vec::new();
        for r in results {
            match r {
                Ok(file) => {
                    info!(file = %file.name, size = file.size, "artifact");
                    if let Err(e) = self
                        .peer
                        .append_event(id, attempt, EventKind::Artifact { file })
                        .await
                    {
                        warn!(error = %e, "could not write an artifact fact");
                    }
                }
                Err(why) => refused.push(why),
            }
        }
        if extra > 0 {
            refused.push(format!(
                "{extra} more files past the first {}",
                errand_core::blob::MAX_ARTIFACTS_PER_ATTEMPT
            ));
        }
        if !refused.is_empty() {
            let text = cap_text(&format!(
                "\n[errand] not kept as artifacts: {}\n",
                refused.join("; ")
            ));
            let _ = self
                .peer
                .append_event(id, attempt, EventKind::Output { text })
                .await;
        }
    }

    async fn finish(&self, fact: EventKind, summary: String, log_path: &Path) {
        let (id, attempt) = (self.task.id, self.attempt);
        if let Some(out) = &self.out {
            self.collect_artifacts(out).await;
        }
        let note = format!(
            "Task {id} (attempt {attempt}): {summary}. Full log: {}",
            log_path.display()
        );
        if let Err(e) = self
            .peer
            .post_message(MessageKind::System, note, Some(id))
            .await
        {
            warn!(error = %e, "could not post the log note");
        }
        let name = fact.name().to_owned();
        info!(fact = %name, "attempt ended");
        if let Err(e) = self.peer.append_event(id, attempt, fact).await {
            // The ledger stays at `started`: the next start-up marks the attempt interrupted.
            warn!(error = %e, "could not write the attempt's end to the thread");
            return;
        }
        let now = now_ms();
        let state = LedgerState::Ended { fact: name };
        let r = self
            .peer
            .replica()
            .store_blocking(move |s| ledger::advance(s, id, attempt, &state, now))
            .await;
        if !matches!(r, Ok(Ok(_))) {
            warn!("could not mark the attempt ended in the ledger");
        }
    }

    /// The terminal fact and a one-line summary for an attempt that reached the executor.
    fn conclude(
        &self,
        outcome: Result<ExecOutcome, ExecError>,
        started: bool,
    ) -> (EventKind, String) {
        let o = match outcome {
            Ok(o) => o,
            Err(e) => {
                let reason = error_chain(&e);
                return (
                    EventKind::Failed {
                        reason: cap_text(&reason),
                    },
                    format!("could not run: {reason}"),
                );
            }
        };
        let took = humantime::format_duration(Duration::from_millis(o.duration.as_millis() as u64));
        if o.cancelled {
            if self.active.requested.load(Ordering::SeqCst) || !self.shutdown.is_cancelled() {
                return (
                    EventKind::Cancelled {
                        reason: REASON_REQUESTED.into(),
                    },
                    if started {
                        format!("cancelled on request after {took}")
                    } else {
                        "cancelled on request before it started".into()
                    },
                );
            }
            return (
                EventKind::Interrupted,
                format!("interrupted after {took}: the desktop shut down"),
            );
        }
        if o.timed_out {
            let limit = humantime::format_duration(self.settings.task_timeout);
            let reason = format!("timed out after {limit}; its processes were killed");
            return (
                EventKind::Failed {
                    reason: reason.clone(),
                },
                reason,
            );
        }
        match (o.exit_code, o.signal) {
            (Some(code), _) => (
                EventKind::Finished { exit_code: code },
                format!("exit code {code} after {took}"),
            ),
            (None, Some(sig)) => {
                let reason = format!("killed by signal {sig}");
                (
                    EventKind::Failed {
                        reason: reason.clone(),
                    },
                    reason,
                )
            }
            (None, None) => {
                let reason = "its exit status could not be collected".to_owned();
                (
                    EventKind::Failed {
                        reason: reason.clone(),
                    },
                    reason,
                )
            }
        }
    }

    /// The output budget of this attempt: what earlier attempts used counts against it.
    fn output_plan(&self) -> OutputPlan {
        let existing_bytes = self
            .task
            .events
            .iter()
            .map(|e| match &e.kind {
                EventKind::Output { text } => text.len(),
                _ => 0,
            })
            .sum();
        OutputPlan::new(
            self.settings.output_cap,
            existing_bytes,
            self.task.events.len(),
        )
    }

    /// Writes the thread so far for `ERRAND_THREAD` (owner-only).
    async fn write_transcript(&self, path: &Path) -> Result<(), String> {
        let current = self.task.clone();
        let cap = self.settings.thread_context;
        let text = self
            .peer
            .replica()
            .read(move |d| {
                let snapshot = ThreadSnapshot {
                    thread_id: d.genesis().thread_id.to_string(),
                    tasks: d.tasks(),
                    messages: d.messages(),
                    devices: d.devices(),
                };
                transcript::render(&snapshot, &current, cap)
            })
            .await
            .map_err(|e| format!("could not read the thread: {e}"))?;
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || write_private(&path, text.as_bytes()))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| format!("could not write the thread file: {e}")))
    }

    /// Runs the process and writes `started` and `output` as they happen.
    async fn execute(
        &self,
        argv: Vec<String>,
        log_path: &Path,
        thread_path: &Path,
    ) -> (Result<ExecOutcome, ExecError>, Reported) {
        let id = self.task.id;
        let attempt = self.attempt;
        let workspace = &self.settings.workspace;
        let mut spec = ExecSpec::new(argv, workspace, log_path, self.settings.task_timeout);
        if self.exec.stdin_thread() {
            spec.stdin_file = Some(thread_path.to_owned());
        }
        spec.env = vec![
            ("ERRAND_TASK_ID".into(), id.to_string()),
            (
                "ERRAND_WORKSPACE".into(),
                workspace.to_string_lossy().into_owned(),
            ),
            (
                "ERRAND_THREAD".into(),
                thread_path.to_string_lossy().into_owned(),
            ),
        ];
        if let Some(out) = &self.out {
            spec.env
                .push(("ERRAND_OUT".into(), out.to_string_lossy().into_owned()));
        }
        if let Some(dir) = &self.attachments {
            spec.env.push((
                "ERRAND_ATTACHMENTS".into(),
                dir.to_string_lossy().into_owned(),
            ));
        }

        let (spawned_tx, spawned_rx) = oneshot::channel::<i32>();
        let replica = self.peer.replica().clone();
        let on_spawn = move |pgid: i32| -> Result<(), LedgerError> {
            let group = ProcessGroup::capture(pgid);
            let now = now_ms();
            block_briefly(|| {
                replica.with_store(|s| ledger::begin_start(s, id, attempt, group, now))
            })?;
            let _ = spawned_tx.send(pgid);
            Ok(())
        };
        let (out_tx, out_rx) = mpsc::channel(OUTPUT_CHANNEL_CAPACITY);
        let plan = self.output_plan();
        let cancel = self.active.cancel.clone();
        tokio::join!(
            executor::run(spec, cancel, on_spawn, out_tx),
            self.report(spawned_rx, out_rx, plan)
        )
    }

    /// Appends `started` once the process is recorded and released, then its output as `output` events.
    async fn report(
        &self,
        spawned: oneshot::Receiver<i32>,
        mut output: mpsc::Receiver<String>,
        mut plan: OutputPlan,
    ) -> Reported {
        let (id, attempt) = (self.task.id, self.attempt);
        // Resolves when `on_spawn` recorded the start, or with an error when the executor gave up
        // before (and dropped the hook).
        let started = match spawned.await {
            Ok(pgid) => {
                if let Err(e) = self
                    .peer
                    .append_event(id, attempt, EventKind::Started)
                    .await
                {
                    warn!(error = %e, "could not write `started`; stopping the task");
                    self.active.cancel.cancel();
                } else {
                    info!(pgid, "started");
                }
                true
            }
            Err(_) => false,
        };
        loop {
            let due = plan.due_at();
            tokio::select! {
                biased;
                piece = output.recv() => match piece {
                    Some(text) => plan.push(&text),
                    None => break,
                },
                () = sleep_until_opt(due) => {}
            }
            while let Some(text) = plan.take(Instant::now(), false) {
                self.append_output(text).await;
            }
        }
        while let Some(text) = plan.take(Instant::now(), true) {
            self.append_output(text).await;
        }
        Reported { started, plan }
    }

    async fn append_output(&self, text: String) {
        if let Err(e) = self
            .peer
            .append_event(self.task.id, self.attempt, EventKind::Output { text })
            .await
        {
            warn!(error = %e, "could not write output to the thread (the log has it)");
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs a short blocking store write from async code: on a multi-threaded runtime the worker
/// hands its other tasks off first; elsewhere (single-threaded tests) it just runs.
fn block_briefly<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use errand_core::{TaskEvent, fold};

    const DESKTOP: &str = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";
    const PHONE: &str = "12D3KooWRBhwfeP2Y4TCx1SM6s9rUoHhR5nLZRb2wNasA4r5w7Xp";

    fn task(events: Vec<(bool, u32, i64, EventKind)>) -> Task {
        let desktop: DeviceId = DESKTOP.parse().unwrap();
        let phone: DeviceId = PHONE.parse().unwrap();
        Task {
            id: TaskId::new_at(1),
            instruction: "echo hi".into(),
            executor: "shell".into(),
            target: desktop.clone(),
            author: phone.clone(),
            created_at: 1,
            not_after: None,
            attachments: Vec::new(),
            events: events
                .into_iter()
                .map(|(from_desktop, attempt, at, kind)| TaskEvent {
                    at,
                    attempt,
                    author: if from_desktop {
                        desktop.clone()
                    } else {
                        phone.clone()
                    },
                    kind,
                })
                .collect(),
        }
    }

    struct Case {
        task: Task,
        ledger: Option<LedgerState>,
        revoked: bool,
        known: bool,
        placed: bool,
        policy: ApprovalPolicy,
        expiry: Option<Duration>,
        now: Millis,
    }

    impl Case {
        fn new(task: Task) -> Self {
            Self {
                task,
                ledger: None,
                revoked: false,
                known: true,
                placed: true,
                policy: ApprovalPolicy::Auto,
                expiry: None,
                now: 1_000,
            }
        }
        fn decide(&self) -> Decision {
            let view = fold(&self.task);
            decide(&DecideInput {
                task: &self.task,
                view: &view,
                ledger: self.ledger.as_ref(),
                author_revoked: self.revoked,
                executor_known: self.known,
                attachments_placed: self.placed,
                policy: self.policy,
                approval_expiry: self.expiry,
                now: self.now,
            })
        }
    }

    const D: bool = true;
    const P: bool = false;
    fn cancelled(reason: &str) -> Decision {
        Decision::Settle(EventKind::Cancelled {
            reason: reason.into(),
        })
    }

    #[test]
    fn a_delivered_task_runs_under_auto_and_asks_under_ask() {
        let t = task(vec![(D, 1, 10, EventKind::Delivered)]);
        assert_eq!(Case::new(t.clone()).decide(), Decision::Run { until: None });
        let mut c = Case::new(t);
        c.policy = ApprovalPolicy::Ask;
        c.expiry = Some(Duration::from_secs(60));
        assert_eq!(
            c.decide(),
            Decision::AskApproval {
                until: Some(61_000)
            }
        );
    }

    #[test]
    fn a_task_whose_attachments_are_not_in_place_is_fetched_first() {
        for events in [vec![], vec![(D, 1, 10, EventKind::Fetching)]] {
            let mut c = Case::new(task(events));
            c.placed = false;
            c.policy = ApprovalPolicy::Ask;
            assert_eq!(c.decide(), Decision::Fetch { until: None });
            // Once they are in place, approval and running go on as for any task.
            c.placed = true;
            assert!(matches!(c.decide(), Decision::AskApproval { .. }));
        }
    }

    #[test]
    fn a_task_fetching_its_attachments_is_cancelled_revoked_or_expired_before_it_runs() {
        let fetching = (D, 1, 10, EventKind::Fetching);
        let mut c = Case::new(task(vec![
            fetching.clone(),
            (P, 1, 20, EventKind::CancelRequested),
        ]));
        c.placed = false;
        assert_eq!(c.decide(), cancelled(REASON_REQUESTED));
        c.task = task(vec![fetching.clone()]);
        c.revoked = true;
        assert_eq!(c.decide(), cancelled(REASON_REVOKED));
        c.revoked = false;
        c.task.not_after = Some(900);
        assert_eq!(c.decide(), cancelled(REASON_EXPIRED));
        c.task.not_after = Some(2_000);
        assert_eq!(c.decide(), Decision::Fetch { until: Some(2_000) });
        // A fetch that failed for good ended the attempt: nothing more to do.
        c.task = task(vec![
            fetching,
            (
                D,
                1,
                30,
                EventKind::Failed {
                    reason: "could not fetch attachment a.txt".into(),
                },
            ),
        ]);
        assert_eq!(c.decide(), Decision::Nothing);
    }

    #[test]
    fn a_queued_task_is_treated_as_delivered() {
        assert_eq!(
            Case::new(task(vec![])).decide(),
            Decision::Run { until: None }
        );
    }

    #[test]
    fn an_awaiting_task_runs_when_approved_and_is_denied_when_denied() {
        let asked = (D, 1, 10, EventKind::ApprovalRequested);
        let mut c = Case::new(task(vec![asked.clone()]));
        c.policy = ApprovalPolicy::Ask;
        assert_eq!(c.decide(), Decision::Wait { until: None });
        c.task = task(vec![asked.clone(), (P, 1, 20, EventKind::Approved)]);
        assert_eq!(c.decide(), Decision::Run { until: None });
        c.task = task(vec![asked.clone(), (P, 1, 20, EventKind::Denied)]);
        assert_eq!(c.decide(), Decision::Settle(EventKind::Denied));
        // Approve and deny at once: the denial wins.
        c.task = task(vec![
            asked,
            (P, 1, 20, EventKind::Approved),
            (P, 1, 21, EventKind::Denied),
        ]);
        assert_eq!(c.decide(), Decision::Settle(EventKind::Denied));
    }

    #[test]
    fn an_unanswered_approval_is_denied_when_it_expires() {
        let mut c = Case::new(task(vec![(D, 1, 10, EventKind::ApprovalRequested)]));
        c.policy = ApprovalPolicy::Ask;
        c.expiry = Some(Duration::from_secs(1));
        c.now = 500;
        assert_eq!(c.decide(), Decision::Wait { until: Some(1_010) });
        c.now = 1_010;
        assert_eq!(c.decide(), Decision::Settle(EventKind::Denied));
    }

    #[test]
    fn cancel_wins_over_everything_before_the_start() {
        let mut c = Case::new(task(vec![
            (D, 1, 10, EventKind::ApprovalRequested),
            (P, 1, 20, EventKind::Approved),
            (P, 1, 21, EventKind::CancelRequested),
        ]));
        c.policy = ApprovalPolicy::Ask;
        assert_eq!(c.decide(), cancelled(REASON_REQUESTED));
    }

    #[test]
    fn an_expired_task_is_cancelled_and_never_runs_late() {
        let mut t = task(vec![(D, 1, 10, EventKind::Delivered)]);
        t.not_after = Some(900);
        assert_eq!(Case::new(t.clone()).decide(), cancelled(REASON_EXPIRED));
        t.not_after = Some(2_000);
        assert_eq!(Case::new(t).decide(), Decision::Run { until: Some(2_000) });
    }

    #[test]
    fn a_revoked_authors_task_is_cancelled() {
        let mut c = Case::new(task(vec![]));
        c.revoked = true;
        assert_eq!(c.decide(), cancelled(REASON_REVOKED));
    }

    #[test]
    fn an_unknown_executor_fails_the_task() {
        let mut c = Case::new(task(vec![]));
        c.known = false;
        let Decision::Settle(EventKind::Failed { reason }) = c.decide() else {
            panic!("expected failed");
        };
        assert!(reason.contains("\"shell\""), "{reason}");
    }

    #[test]
    fn a_started_attempt_never_starts_again() {
        // Started in the document but not running here.
        let c = Case::new(task(vec![(D, 1, 10, EventKind::Started)]));
        assert_eq!(c.decide(), Decision::Interrupt);
        // Started in the ledger, not (yet) in the document.
        let mut c = Case::new(task(vec![(D, 1, 10, EventKind::Delivered)]));
        c.ledger = Some(LedgerState::Started(ProcessGroup {
            pgid: 5,
            boot_id: None,
            leader_start: None,
        }));
        assert_eq!(c.decide(), Decision::Interrupt);
    }

    #[test]
    fn ended_attempts_need_nothing_and_a_retry_opens_a_new_one() {
        let ended = vec![
            (D, 1, 10, EventKind::Started),
            (D, 1, 20, EventKind::Finished { exit_code: 1 }),
        ];
        let mut c = Case::new(task(ended.clone()));
        c.ledger = Some(LedgerState::Ended {
            fact: "finished".into(),
        });
        assert_eq!(c.decide(), Decision::Nothing);
        let mut retried = ended;
        retried.push((P, 1, 30, EventKind::Retried));
        let t = task(retried);
        assert_eq!(fold(&t).attempt, 2);
        // The ledger entry of attempt 2 is empty.
        assert_eq!(Case::new(t).decide(), Decision::Run { until: None });
    }

    #[test]
    fn requests_from_the_desktop_itself_do_not_count() {
        let c = Case::new(task(vec![
            (D, 1, 10, EventKind::Delivered),
            (D, 1, 11, EventKind::CancelRequested),
        ]));
        assert_eq!(c.decide(), Decision::Run { until: None });
    }
}
