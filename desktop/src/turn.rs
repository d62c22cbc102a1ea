//! One attempt of an `acp` executor's task: one turn of the conversation with its agent.
//!
//! - The agent of a task stays up between turns ([`Agents`]), so a reply continues the same
//!   session. Otherwise the turn loads the task's last session (`session/load`, where the agent
//!   can) or starts a new one with the conversation so far as context; an `agent_session` fact
//!   records which.
//! - The ledger records the agent's process group before the prompt goes out, and `started`
//!   follows: after a crash the attempt is `interrupted` and never prompted again.
//! - The agent's text is batched into `output` facts like a command's output; tool calls (on
//!   a change of status), plans (at most one a second) and permission requests become facts.
//! - A permission request waits for a phone's `permission_answered` (forwarded by the runner
//!   loop), `auto_allow`, or `permission_expiry`; each outcome is a `permission_resolved` fact.
//! - The end of the turn decides the attempt's terminal fact: `end_turn` is `finished` 0;
//!   `refusal`, `max_tokens`, a crash or a protocol error are `failed` with a reason a person
//!   can read; a cancel is `cancelled` (or `interrupted` when the desktop shuts down).

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use errand_core::{
    EventKind, MessageKind, PermissionChoice, PlanEntry, Task, TaskId, fold,
    limits::MAX_SHORT_TEXT_BYTES,
    prompt_of,
    task::{
        ANSWERED_BY_AUTO, ANSWERED_BY_EXPIRY, ANSWERED_BY_PHONE, MAX_PERMISSION_OPTIONS,
        MAX_PLAN_ENTRIES, SESSION_CONTINUED, SESSION_LOADED, SESSION_NEW,
        SESSION_NEW_WITH_TRANSCRIPT,
    },
};
use errand_p2p::peer::{Peer, now_ms};
use tokio::{
    io::AsyncWriteExt as _,
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info, warn};

use crate::{
    acp::{Agent, AgentEvent, AgentSpec, PermissionAsk, PromptBlock, Step, TurnEnd},
    attempt::{OutputPlan, REASON_REQUESTED, attachment_names, cap_text},
    executor::AcpOptions,
    ledger::{self, ProcessGroup},
};

/// Most `tool_call` facts per attempt: an agent's steps, not a log of them.
const MAX_TOOL_CALL_FACTS: usize = 200;

/// Most refusal notes (a file outside the workspace) posted per attempt.
const MAX_REFUSAL_NOTES: usize = 20;

/// A plan is written at most this often; the newest one wins.
const PLAN_INTERVAL: Duration = Duration::from_secs(1);

/// Most facts in one commit of [`Facts`]: a flood of updates still reaches the phone in steps.
const MAX_FACTS_PER_COMMIT: usize = 64;

/// A phone's answer to a permission request: `(perm_id, option_id)`.
pub(crate) type PermissionAnswer = (String, String);

/// The agents that wait for a reply between turns, by task.
#[derive(Debug, Default, Clone)]
pub(crate) struct Agents {
    parked: Arc<Mutex<HashMap<TaskId, (u64, Agent)>>>,
    generation: Arc<AtomicU64>,
}

impl Agents {
    /// The task's agent, if it is still up.
    pub(crate) fn take(&self, id: TaskId) -> Option<Agent> {
        let mut parked = self.parked.lock().ok()?;
        parked.remove(&id).map(|(_, a)| a)
    }

    /// Keeps the agent for the task's next turn, and stops it after `idle` without one.
    pub(crate) fn park(&self, id: TaskId, agent: Agent, idle: Duration) {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let Ok(mut parked) = self.parked.lock() else {
            return;
        };
        parked.insert(id, (generation, agent));
        drop(parked);
        let agents = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(idle).await;
            let agent = {
                let Ok(mut parked) = agents.parked.lock() else {
                    return;
                };
                match parked.get(&id) {
                    Some((g, _)) if *g == generation => parked.remove(&id).map(|(_, a)| a),
                    _ => None,
                }
            };
            if let Some(agent) = agent {
                info!(task = %id, "stopping an agent that waited for a reply too long");
                agent.shutdown().await;
            }
        });
    }

    /// Stops every parked agent (the desktop shuts down).
    pub(crate) async fn stop_all(&self) {
        let all: Vec<Agent> = match self.parked.lock() {
            Ok(mut parked) => parked.drain().map(|(_, (_, a))| a).collect(),
            Err(_) => return,
        };
        for agent in all {
            agent.shutdown().await;
        }
    }
}

/// What one turn needs.
pub(crate) struct Turn<'a> {
    pub peer: &'a Peer,
    pub task: &'a Task,
    pub attempt: u32,
    pub executor: &'a str,
    pub opts: &'a AcpOptions,
    pub workspace: &'a Path,
    /// The task's placed attachments (`$ERRAND_ATTACHMENTS`), if it has any.
    pub attachments: Option<&'a Path>,
    /// The agent's `$ERRAND_OUT`: the task's folder for results, the same for every turn of
    /// one agent process; the runner moves what it holds after each turn.
    pub out: &'a Path,
    pub log_path: &'a Path,
    pub thread_context: usize,
    pub task_timeout: Duration,
    pub output: OutputPlan,
    pub cancel: &'a CancellationToken,
    pub requested: &'a AtomicBool,
    pub shutdown: &'a CancellationToken,
    pub agents: &'a Agents,
    /// Where the turn's facts go (see [`Facts`]).
    pub facts: Facts,
}

/// The writer of one attempt's facts: they are committed in order by one task, and the facts
/// that come while a commit is under way go together in the next one (a group commit). A burst
/// of an agent's updates (text, tool calls, then a permission request) so costs one or two
/// durable commits and pushes instead of one each, and the question reaches the phone sooner.
pub(crate) struct Facts {
    tx: mpsc::UnboundedSender<FactMsg>,
}

enum FactMsg {
    Fact(EventKind),
    /// Answered once every fact sent before it is durable.
    Flush(oneshot::Sender<()>),
}

impl Facts {
    /// Starts the writer of `task`'s `attempt`; it ends when this is dropped and every fact
    /// sent is written.
    pub(crate) fn start(peer: &Peer, task: TaskId, attempt: u32) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_facts(peer.clone(), task, attempt, rx).in_current_span());
        Self { tx }
    }

    fn send(&self, kind: EventKind) {
        if self.tx.send(FactMsg::Fact(kind)).is_err() {
            warn!("the writer of the agent's steps is gone; a step is not recorded");
        }
    }

    /// Waits until every fact sent so far is durable.
    async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.tx.send(FactMsg::Flush(done)).is_ok() {
            let _ = written.await;
        }
    }
}

async fn write_facts(
    peer: Peer,
    task: TaskId,
    attempt: u32,
    mut rx: mpsc::UnboundedReceiver<FactMsg>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::new();
        let mut waiters = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                FactMsg::Fact(kind) => batch.push(kind),
                FactMsg::Flush(done) => waiters.push(done),
            }
            if batch.len() < MAX_FACTS_PER_COMMIT {
                next = rx.try_recv().ok();
            }
        }
        if let Err(e) = peer.append_events(task, attempt, batch).await {
            warn!(error = %e, "could not write the agent's steps to the thread");
        }
        for done in waiters {
            let _ = done.send(());
        }
    }
}

impl Turn<'_> {
    /// Runs the turn; returns the terminal fact and a one-line summary.
    pub(crate) async fn run(
        mut self,
        mut answers: mpsc::UnboundedReceiver<PermissionAnswer>,
    ) -> (EventKind, String) {
        let started_at = Instant::now();
        let (mut agent, how) = match self.agent().await {
            Ok(x) => x,
            Err(reason) => return failed(format!("{}: {reason}", self.executor)),
        };
        if let Err(reason) = self.record_start(&agent, how).await {
            self.facts.flush().await;
            return failed(reason);
        }
        let blocks = self.prompt(how).await;
        if let Err(end) = agent.start_turn(blocks).await {
            return self.conclude(end, agent, started_at, false).await;
        }
        let mut log = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path)
            .await
            .ok();
        let turn_cancel = self.cancel.child_token();
        let deadline = Instant::now() + self.task_timeout;
        let mut timed_out = false;
        let mut state = TurnState::default();
        let end = loop {
            let due = [
                self.output.due_at(),
                state.plan_due,
                state.next_expiry(),
                (!timed_out).then_some(deadline),
            ]
            .into_iter()
            .flatten()
            .min();
            tokio::select! {
                step = agent.next(&turn_cancel) => match step {
                    Step::Event(ev) => self.on_event(ev, &mut state, &mut log).await,
                    Step::Cancelling => {}
                    Step::End(end) => break end,
                },
                Some((perm, option)) = answers.recv() => {
                    self.on_answer(&mut state, perm, option).await;
                }
                () = sleep_until(due) => {
                    let now = Instant::now();
                    if !timed_out && now >= deadline {
                        timed_out = true;
                        turn_cancel.cancel();
                    }
                    self.expire(&mut state, now).await;
                }
            }
            while let Some(text) = self.output.take(Instant::now(), false) {
                self.append(EventKind::Output { text }).await;
            }
            if state.plan_due.is_some_and(|at| at <= Instant::now()) {
                self.flush_plan(&mut state).await;
            }
        };
        self.flush_output().await;
        self.flush_plan(&mut state).await;
        self.conclude(end, agent, started_at, timed_out).await
    }

    /// The task's agent, with a session open: the one parked after the last turn, else a new
    /// process that loads the last session or starts one.
    async fn agent(&self) -> Result<(Agent, &'static str), String> {
        let id = self.task.id;
        if let Some(agent) = self.agents.take(id) {
            if agent.usable() {
                return Ok((agent, SESSION_CONTINUED));
            }
            agent.shutdown().await;
        }
        let spec = AgentSpec {
            argv: self.opts.argv.clone(),
            workspace: self.workspace.to_owned(),
            env: {
                let mut env = vec![
                    ("ERRAND_TASK_ID".into(), id.to_string()),
                    (
                        "ERRAND_WORKSPACE".into(),
                        self.workspace.to_string_lossy().into_owned(),
                    ),
                    ("ERRAND_OUT".into(), self.out.to_string_lossy().into_owned()),
                ];
                if let Some(dir) = self.attachments {
                    env.push((
                        "ERRAND_ATTACHMENTS".into(),
                        dir.to_string_lossy().into_owned(),
                    ));
                }
                env
            },
            log_path: self.log_path.to_owned(),
            startup_timeout: self.opts.startup_timeout,
        };
        let mut agent = Agent::spawn(&spec).await.map_err(|e| e.to_string())?;
        let earlier = last_session(self.task, self.attempt);
        if let Some(session) = &earlier
            && agent.info().load_session
        {
            match agent.open(self.workspace, Some(session)).await {
                Ok(()) => return Ok((agent, SESSION_LOADED)),
                Err(e) => warn!(error = %e, "could not load the last session; starting a new one"),
            }
        }
        agent
            .open(self.workspace, None)
            .await
            .map_err(|e| e.to_string())?;
        let how = if self.attempt > 1 {
            SESSION_NEW_WITH_TRANSCRIPT
        } else {
            SESSION_NEW
        };
        Ok((agent, how))
    }

    /// The ledger entry, then `started` and `agent_session`: from here on, a crash leaves the
    /// attempt `interrupted`, never prompted again.
    async fn record_start(&self, agent: &Agent, how: &str) -> Result<(), String> {
        let (id, attempt) = (self.task.id, self.attempt);
        let group = ProcessGroup::capture(agent.pgid());
        let now = now_ms();
        let r = self
            .peer
            .replica()
            .store_blocking(move |s| ledger::begin_start(s, id, attempt, group, now))
            .await;
        if !matches!(r, Ok(Ok(()))) {
            return Err("could not record the start in the task ledger".into());
        }
        if let Err(e) = self
            .peer
            .append_event(id, attempt, EventKind::Started)
            .await
        {
            return Err(format!("could not write `started`: {e}"));
        }
        let session = cap_text(agent.session().unwrap_or_default());
        self.append(EventKind::AgentSession {
            session_id: session,
            how: how.to_owned(),
        })
        .await;
        info!(pgid = agent.pgid(), how, "agent turn started");
        Ok(())
    }

    /// The prompt's blocks: this turn's text, and for a new session the task's attachments
    /// (as `resource_link`s to their placed copies) and the context. A continued or loaded
    /// session had the attachments in its first prompt.
    async fn prompt(&self, how: &str) -> Vec<PromptBlock> {
        let text = prompt_of(self.task, self.attempt).to_owned();
        match how {
            SESSION_CONTINUED | SESSION_LOADED => vec![PromptBlock::Text(text)],
            _ => {
                let mut blocks = vec![PromptBlock::Text(text)];
                blocks.extend(self.attachment_links());
                let context = self.context().await;
                if !context.is_empty() {
                    blocks.push(PromptBlock::Text(context));
                }
                blocks
            }
        }
    }

    /// A `resource_link` for each placed attachment, in the task's order.
    fn attachment_links(&self) -> Vec<PromptBlock> {
        let Some(dir) = self.attachments else {
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
            .zip(&self.task.attachments)
            .map(|(placed, a)| PromptBlock::File {
                name: placed.clone(),
                path: std::path::absolute(dir.join(&placed)).unwrap_or_else(|_| dir.join(&placed)),
                mime: a.mime.clone(),
                size: a.size,
            })
            .collect()
    }

    /// The thread so far and this task's earlier turns, capped like an executor's transcript.
    async fn context(&self) -> String {
        let current = self.task.clone();
        let cap = self.thread_context;
        let thread = self
            .peer
            .replica()
            .read(move |d| {
                let snapshot = crate::transcript::ThreadSnapshot {
                    thread_id: d.genesis().thread_id.to_string(),
                    tasks: d.tasks(),
                    messages: d.messages(),
                    devices: d.devices(),
                };
                crate::transcript::render(&snapshot, &current, cap)
            })
            .await
            .unwrap_or_default();
        let view = fold(self.task);
        let mut earlier = String::new();
        // The last utterance is this turn's own prompt.
        let before = view.conversation.len().saturating_sub(1);
        for u in view.conversation.iter().take(before) {
            let who = match u.role {
                errand_core::Role::User => "User",
                errand_core::Role::Agent => "Agent",
            };
            earlier.push_str(&format!("{who}:\n{}\n\n", u.text));
        }
        let mut out = String::from(
            "Context from Errand, which relays this conversation from the user's phone.\n\n",
        );
        if !earlier.is_empty() {
            out.push_str("Earlier in this conversation:\n\n");
            out.push_str(crate::transcript::tail(&earlier, cap));
            out.push('\n');
        }
        out.push_str(&thread);
        out
    }

    async fn on_event(
        &mut self,
        ev: AgentEvent,
        state: &mut TurnState,
        log: &mut Option<tokio::fs::File>,
    ) {
        match ev {
            AgentEvent::Text(text) => {
                if let Some(f) = log.as_mut()
                    && f.write_all(text.as_bytes()).await.is_err()
                {
                    *log = None;
                }
                self.output.push(&text);
            }
            AgentEvent::ToolCall {
                id,
                title,
                kind,
                status,
            } => {
                let known = state.tool_status.get(&id);
                let changed = known.is_none() || (!status.is_empty() && known != Some(&status));
                if !changed || state.tool_facts >= MAX_TOOL_CALL_FACTS {
                    return;
                }
                state.tool_facts += 1;
                state.tool_status.insert(id.clone(), status.clone());
                self.flush_output().await;
                self.append(EventKind::ToolCall {
                    call_id: cap_text(&id),
                    title: cap_text(&title),
                    tool_kind: cap_text(&kind),
                    status: cap_text(&status),
                })
                .await;
            }
            AgentEvent::Plan(entries) => {
                state.plan = Some(
                    entries
                        .into_iter()
                        .take(MAX_PLAN_ENTRIES)
                        .map(|e| PlanEntry {
                            content: cap_text(&e.content),
                            status: cap_text(&e.status),
                        })
                        .collect(),
                );
                let at = state
                    .plan_written
                    .map_or_else(Instant::now, |t| t + PLAN_INTERVAL);
                state.plan_due = Some(at.max(Instant::now()));
            }
            AgentEvent::Permission(ask) => self.on_permission(ask, state).await,
            AgentEvent::Refused { op, path, why } => {
                if state.refusals < MAX_REFUSAL_NOTES {
                    state.refusals += 1;
                    self.note(format!("The agent asked to {op} {path}; refused: {why}"))
                        .await;
                }
            }
        }
    }

    async fn on_permission(&mut self, ask: PermissionAsk, state: &mut TurnState) {
        state.permissions += 1;
        let perm_id = format!("p{}", state.permissions);
        self.flush_output().await;
        let options: Vec<PermissionChoice> = ask
            .options
            .iter()
            .take(MAX_PERMISSION_OPTIONS)
            .map(|o| PermissionChoice {
                id: cap_text(&o.id),
                name: cap_text(&o.name),
                kind: cap_text(&o.kind),
            })
            .collect();
        self.append(EventKind::PermissionRequested {
            perm_id: perm_id.clone(),
            title: cap_text(&ask.title),
            tool_kind: cap_text(&ask.kind),
            options: options.clone(),
        })
        .await;
        if options.is_empty() {
            let _ = ask.answer.send(None);
            return;
        }
        let auto = self.opts.auto_allow.contains(&ask.kind);
        if auto && let Some(allow) = pick(&options, "allow_once", PermissionChoice::allows) {
            let _ = ask.answer.send(Some(allow.clone()));
            self.resolved(&perm_id, &allow, ANSWERED_BY_AUTO).await;
            return;
        }
        let expires = self.opts.permission_expiry.map(|d| Instant::now() + d);
        state.pending.insert(
            perm_id,
            Pending {
                title: ask.title,
                options,
                answer: ask.answer,
                expires,
            },
        );
    }

    async fn on_answer(&mut self, state: &mut TurnState, perm: String, option: String) {
        let Some(p) = state.pending.remove(&perm) else {
            return;
        };
        if !p.options.iter().any(|o| o.id == option) {
            warn!(
                perm,
                option, "an answer names no option of its request; ignored"
            );
            state.pending.insert(perm, p);
            return;
        }
        // The agent first: it waits. The thread's record follows.
        let _ = p.answer.send(Some(option.clone()));
        self.resolved(&perm, &option, ANSWERED_BY_PHONE).await;
    }

    /// Answers the requests whose `permission_expiry` passed with a one-time rejection.
    async fn expire(&mut self, state: &mut TurnState, now: Instant) {
        let due: Vec<String> = state
            .pending
            .iter()
            .filter(|(_, p)| p.expires.is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for perm in due {
            let Some(p) = state.pending.remove(&perm) else {
                continue;
            };
            let reject = pick(&p.options, "reject_once", PermissionChoice::rejects);
            let _ = p.answer.send(reject.clone());
            let option = reject.unwrap_or_default();
            self.resolved(&perm, &option, ANSWERED_BY_EXPIRY).await;
            let after = self
                .opts
                .permission_expiry
                .map(|d| humantime::format_duration(d).to_string())
                .unwrap_or_default();
            self.note(format!(
                "Nobody answered the agent's request \"{}\" within {after}: rejected once.",
                p.title
            ))
            .await;
        }
    }

    /// Writes the text batched so far, so that the thread keeps the agent's order: what it said
    /// before a tool call or a question comes before it.
    async fn flush_output(&mut self) {
        while let Some(text) = self.output.take(Instant::now(), true) {
            self.append(EventKind::Output { text }).await;
        }
    }

    async fn flush_plan(&mut self, state: &mut TurnState) {
        state.plan_due = None;
        if let Some(entries) = state.plan.take() {
            state.plan_written = Some(Instant::now());
            self.append(EventKind::Plan { entries }).await;
        }
    }

    async fn resolved(&self, perm: &str, option: &str, by: &str) {
        self.append(EventKind::PermissionResolved {
            perm_id: perm.to_owned(),
            option_id: option.to_owned(),
            by: by.to_owned(),
        })
        .await;
    }

    /// The terminal fact; the agent is parked for a reply when it can take one.
    async fn conclude(
        &self,
        end: TurnEnd,
        agent: Agent,
        started_at: Instant,
        timed_out: bool,
    ) -> (EventKind, String) {
        // The terminal fact, written after this returns, comes after every step.
        self.facts.flush().await;
        let took = humantime::format_duration(Duration::from_millis(
            started_at.elapsed().as_millis() as u64,
        ));
        let stopping = self.shutdown.is_cancelled() && !self.requested.load(Ordering::SeqCst);
        let out = if timed_out {
            let limit = humantime::format_duration(self.task_timeout);
            failed(format!("the agent's turn timed out after {limit}"))
        } else {
            match &end {
                TurnEnd::Finished => (
                    EventKind::Finished { exit_code: 0 },
                    format!("the agent ended its turn after {took}"),
                ),
                TurnEnd::Cancelled if stopping => (
                    EventKind::Interrupted,
                    format!("interrupted after {took}: the desktop shut down"),
                ),
                TurnEnd::Cancelled => (
                    EventKind::Cancelled {
                        reason: REASON_REQUESTED.into(),
                    },
                    format!("cancelled on request after {took}"),
                ),
                TurnEnd::Stopped(reason) | TurnEnd::Failed(reason) => failed(format!(
                    "{} ({}): {reason}",
                    self.executor,
                    if matches!(end, TurnEnd::Failed(_)) {
                        "agent failed"
                    } else {
                        "agent stopped"
                    }
                )),
            }
        };
        if agent.usable() && !self.shutdown.is_cancelled() && !timed_out {
            self.agents
                .park(self.task.id, agent, self.opts.idle_timeout);
        } else {
            agent.shutdown().await;
        }
        out
    }

    async fn append(&self, kind: EventKind) {
        self.facts.send(kind);
    }

    async fn note(&self, text: String) {
        // The note comes after the steps before it.
        self.facts.flush().await;
        if let Err(e) = self
            .peer
            .post_message(MessageKind::System, text, Some(self.task.id))
            .await
        {
            warn!(error = %e, "could not post a note on the task");
        }
    }
}

/// What a turn tracks between updates.
#[derive(Default)]
struct TurnState {
    tool_status: HashMap<String, String>,
    tool_facts: usize,
    plan: Option<Vec<PlanEntry>>,
    plan_due: Option<Instant>,
    plan_written: Option<Instant>,
    permissions: usize,
    pending: HashMap<String, Pending>,
    refusals: usize,
}

impl TurnState {
    fn next_expiry(&self) -> Option<Instant> {
        self.pending.values().filter_map(|p| p.expires).min()
    }
}

/// A permission request the agent waits on.
struct Pending {
    title: String,
    options: Vec<PermissionChoice>,
    answer: tokio::sync::oneshot::Sender<Option<String>>,
    expires: Option<Instant>,
}

/// The option of kind `exact`, else the first for which `fallback` holds.
fn pick(
    options: &[PermissionChoice],
    exact: &str,
    fallback: fn(&PermissionChoice) -> bool,
) -> Option<String> {
    options
        .iter()
        .find(|o| o.kind == exact)
        .or_else(|| options.iter().find(|o| fallback(o)))
        .map(|o| o.id.clone())
}

/// The session the task's agent used last, before `attempt`.
fn last_session(task: &Task, attempt: u32) -> Option<String> {
    task.events
        .iter()
        .filter(|e| e.author == task.target && e.attempt < attempt)
        .filter_map(|e| match &e.kind {
            EventKind::AgentSession { session_id, .. } if !session_id.is_empty() => {
                Some((e.attempt, e.at, session_id.clone()))
            }
            _ => None,
        })
        .max_by_key(|(attempt, at, _)| (*attempt, *at))
        .map(|(_, _, s)| s)
}

fn failed(reason: String) -> (EventKind, String) {
    let capped = if reason.len() > MAX_SHORT_TEXT_BYTES {
        cap_text(&reason)
    } else {
        reason.clone()
    };
    (EventKind::Failed { reason: capped }, reason)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
