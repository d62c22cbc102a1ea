//! The `acp` executor's agent: a child process spoken to over the Agent Client Protocol
//! (JSON-RPC 2.0, one message per line on its stdin and stdout), with the official
//! `agent-client-protocol` crate.
//!
//! - [`Agent::spawn`] starts the agent in its own process group, answers its requests (file
//!   reads and writes inside the workspace only, permission requests through
//!   [`AgentEvent::Permission`]) and completes `initialize`.
//! - [`Agent::open`] starts a session (`session/new`) or loads an earlier one (`session/load`).
//! - [`Agent::prompt`] runs one turn: it hands each update to the caller as an [`AgentEvent`]
//!   and returns how the turn ended. A cancel becomes `session/cancel`; an agent that does not
//!   end its turn within [`CANCEL_GRACE`] is killed.
//! - The agent's stderr goes to the log file, and its tail explains a failure.
//! - Dropping an [`Agent`] kills its process group.
//!
//! The agent is not trusted: a line longer than [`MAX_LINE_BYTES`] ends the connection, a
//! path outside the workspace is refused, and updates are read with back-pressure (a flood
//! waits for the caller instead of filling memory).

use std::{
    collections::VecDeque,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_client_protocol::{
    Client, Error as AcpError,
    schema::ProtocolVersion,
    v1::{
        ConnectionTo,
        schema::{
            CancelNotification, ClientCapabilities, ContentBlock, FileSystemCapabilities,
            InitializeRequest, LoadSessionRequest, NewSessionRequest, PromptRequest,
            ReadTextFileRequest, ReadTextFileResponse, RequestPermissionOutcome,
            RequestPermissionRequest, RequestPermissionResponse, ResourceLink,
            SelectedPermissionOutcome, SessionNotification, SessionUpdate, StopReason, TextContent,
            WriteTextFileRequest, WriteTextFileResponse,
        },
    },
};
use errand_core::{PermissionChoice, PlanEntry};
use futures::{SinkExt, StreamExt as _};
use tokio::{
    io::AsyncWriteExt as _,
    process::{Child, Command},
    sync::{Notify, mpsc, oneshot},
    task::JoinHandle,
};
use tokio_util::{
    codec::{FramedRead, FramedWrite, LinesCodec},
    sync::CancellationToken,
};
use tracing::{debug, info, warn};

/// Longest line the agent may send. Tool output inside an update can be large, but a line
/// past this is not a message worth holding in memory.
pub const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;

/// How long the agent has to end its turn after `session/cancel` before it is killed.
pub const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// Longest stderr line kept; the rest of a longer one is skipped.
const STDERR_LINE_BYTES: usize = 64 * 1024;

/// How much of the agent's stderr is kept to explain a failure.
const STDERR_TAIL_BYTES: usize = 2 * 1024;

/// Updates buffered between the agent and the caller before the agent waits.
const EVENT_BUFFER: usize = 256;

/// Largest file the agent may read through the desktop.
const MAX_READ_BYTES: u64 = 16 * 1024 * 1024;

/// How to start an agent.
#[derive(Clone)]
pub struct AgentSpec {
    /// The program (a name is looked up in `PATH`) and its arguments.
    pub argv: Vec<String>,
    /// The working directory: the workspace. File access is confined to it.
    pub workspace: PathBuf,
    /// Variables set on top of the daemon's environment.
    pub env: Vec<(String, String)>,
    /// Where the agent's stderr goes (appended).
    pub log_path: PathBuf,
    /// How long `initialize` may take (an `npx` agent may first download itself).
    pub startup_timeout: Duration,
}

impl std::fmt::Debug for AgentSpec {
    /// The environment may hold secrets (API keys): only its names are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env_names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("AgentSpec")
            .field("argv", &self.argv)
            .field("workspace", &self.workspace)
            .field("env_names", &env_names)
            .field("log_path", &self.log_path)
            .field("startup_timeout", &self.startup_timeout)
            .finish()
    }
}

/// Something the agent did during a turn.
#[derive(Debug)]
pub enum AgentEvent {
    /// Text of the agent's message, as it streams.
    Text(String),
    /// A tool call, new or updated (empty strings: unchanged).
    ToolCall {
        /// The agent's id for it.
        id: String,
        /// Its title.
        title: String,
        /// Its ACP tool kind.
        kind: String,
        /// Its status.
        status: String,
    },
    /// The agent's plan, whole.
    Plan(Vec<PlanEntry>),
    /// The agent asks for permission and waits for [`PermissionAsk::answer`].
    Permission(PermissionAsk),
    /// A file request the desktop refused.
    Refused {
        /// `read` or `write`.
        op: &'static str,
        /// The path the agent gave.
        path: String,
        /// Why.
        why: String,
    },
}

/// A permission request waiting for an answer.
#[derive(Debug)]
pub struct PermissionAsk {
    /// The tool call's title.
    pub title: String,
    /// Its ACP tool kind (empty when not given).
    pub kind: String,
    /// The options, in the agent's order.
    pub options: Vec<PermissionChoice>,
    /// Send `Some(option id)` to choose, `None` to cancel the request. Dropping it cancels.
    pub answer: oneshot::Sender<Option<String>>,
}

/// One step of a turn, from [`Agent::next`].
#[derive(Debug)]
pub enum Step {
    /// An update.
    Event(AgentEvent),
    /// `session/cancel` went out; the end follows.
    Cancelling,
    /// The turn ended.
    End(TurnEnd),
}

/// How a turn ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnEnd {
    /// `end_turn`: the agent finished.
    Finished,
    /// `cancelled`, or killed after the grace period.
    Cancelled,
    /// `refusal`, `max_tokens` or `max_turn_requests`, in words.
    Stopped(String),
    /// The agent failed the prompt or went away; the agent is not usable any more.
    Failed(String),
}

/// Why an agent could not be started or a session opened.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The process could not be started.
    #[error("could not start the agent {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The agent broke off or answered with an error.
    #[error("{0}")]
    Protocol(String),
}

/// The `initialize` answer that matters here.
#[derive(Debug, Clone, Default)]
pub struct AgentInfo {
    /// The agent can load an earlier session.
    pub load_session: bool,
    /// How to log in, in the agent's words (`authMethods`), if it offers any.
    pub login_hint: Option<String>,
}

/// One content block of a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptBlock {
    /// Text.
    Text(String),
    /// A file in the workspace, as an ACP `resource_link`: the agent reads it itself.
    File {
        /// Its name, as sent.
        name: String,
        /// Its absolute path.
        path: PathBuf,
        /// Its MIME type.
        mime: String,
        /// Its size in bytes.
        size: u64,
    },
}

impl PromptBlock {
    fn into_content(self) -> ContentBlock {
        match self {
            Self::Text(t) => ContentBlock::Text(TextContent::new(t)),
            Self::File {
                name,
                path,
                mime,
                size,
            } => ContentBlock::ResourceLink(
                ResourceLink::new(name, file_uri(&path))
                    .mime_type(mime)
                    .size(i64::try_from(size).unwrap_or(i64::MAX)),
            ),
        }
    }
}

/// The `file://` URI of an absolute path, each byte outside RFC 3986's unreserved set and `/`
/// percent-encoded (a file name from a phone may hold spaces, `#` or `%`).
pub fn file_uri(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::from("file://");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

enum Cmd {
    New {
        cwd: PathBuf,
        reply: oneshot::Sender<Result<String, String>>,
    },
    Load {
        session: String,
        cwd: PathBuf,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Prompt {
        session: String,
        blocks: Vec<PromptBlock>,
        reply: oneshot::Sender<Result<StopReason, String>>,
    },
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    cmds: mpsc::Sender<Cmd>,
    cancel: Arc<Notify>,
    events: mpsc::Receiver<AgentEvent>,
    pgid: i32,
    info: AgentInfo,
    stderr: Arc<Mutex<Tail>>,
    connection: JoinHandle<Result<(), String>>,
    child: Arc<tokio::sync::Mutex<Child>>,
    session: Option<String>,
    turn: Option<oneshot::Receiver<Result<StopReason, String>>>,
    early_end: Option<Result<Result<StopReason, String>, oneshot::error::RecvError>>,
    cancel_deadline: Option<tokio::time::Instant>,
    usable: bool,
}

impl Agent {
    /// Starts the agent and completes `initialize`.
    pub async fn spawn(spec: &AgentSpec) -> Result<Self, AgentError> {
        let program = spec.argv.first().cloned().unwrap_or_default();
        let spawn_error = |source| AgentError::Spawn {
            program: program.clone(),
            source,
        };
        let mut child = Command::new(&program)
            .args(spec.argv.iter().skip(1))
            .current_dir(&spec.workspace)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        let pgid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| spawn_error(io::Error::other("the new process has no pid")))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(spawn_error(io::Error::other("no pipes to the agent")));
        };
        info!(pgid, program = %program, "agent started");

        let tail = Arc::new(Mutex::new(Tail::default()));
        tokio::spawn(copy_stderr(stderr, spec.log_path.clone(), tail.clone()));

        let incoming = FramedRead::new(stdout, LinesCodec::new_with_max_length(MAX_LINE_BYTES))
            .map(|line| line.map_err(io::Error::other));
        let outgoing = SinkExt::<String>::sink_map_err(
            FramedWrite::new(stdin, LinesCodec::new()),
            io::Error::other,
        );
        let transport = agent_client_protocol::Lines::new(outgoing, incoming);

        let (events_tx, events) = mpsc::channel(EVENT_BUFFER);
        let (cmds, cmds_rx) = mpsc::channel(4);
        let (ready_tx, ready_rx) = oneshot::channel();
        let cancel = Arc::new(Notify::new());
        let fs = Arc::new(Workspace::new(&spec.workspace));
        let connection = tokio::spawn(serve(
            transport,
            events_tx,
            fs,
            cmds_rx,
            ready_tx,
            cancel.clone(),
        ));
        let child = Arc::new(tokio::sync::Mutex::new(child));
        let mut agent = Self {
            cmds,
            cancel,
            events,
            pgid,
            info: AgentInfo::default(),
            stderr: tail,
            connection,
            child,
            session: None,
            turn: None,
            early_end: None,
            cancel_deadline: None,
            usable: true,
        };
        match tokio::time::timeout(spec.startup_timeout, ready_rx).await {
            Ok(Ok(Ok(info))) => {
                agent.info = info;
                Ok(agent)
            }
            Ok(Ok(Err(e))) => Err(AgentError::Protocol(agent.explain("initialize failed", &e))),
            Ok(Err(_)) => {
                let why = agent.ended().await;
                Err(AgentError::Protocol(
                    agent.explain("initialize failed", &why),
                ))
            }
            Err(_) => Err(AgentError::Protocol(agent.explain(
                "the agent did not answer initialize",
                &format!(
                    "no answer within {}",
                    humantime::format_duration(spec.startup_timeout)
                ),
            ))),
        }
    }

    /// The agent's process group (its leader's pid).
    pub fn pgid(&self) -> i32 {
        self.pgid
    }

    /// What `initialize` said.
    pub fn info(&self) -> &AgentInfo {
        &self.info
    }

    /// The session prompts go to, once one is open.
    pub fn session(&self) -> Option<&str> {
        self.session.as_deref()
    }

    /// Opens a new session in `cwd`, or loads `earlier` (when the agent can).
    pub async fn open(&mut self, cwd: &Path, earlier: Option<&str>) -> Result<(), AgentError> {
        match earlier {
            Some(session) => {
                let (reply, rx) = oneshot::channel();
                self.send(Cmd::Load {
                    session: session.to_owned(),
                    cwd: cwd.to_owned(),
                    reply,
                })
                .await?;
                match rx.await {
                    Ok(Ok(())) => {
                        self.session = Some(session.to_owned());
                        Ok(())
                    }
                    Ok(Err(e)) => Err(AgentError::Protocol(
                        self.explain("session/load failed", &e),
                    )),
                    Err(_) => Err(self.gone("session/load failed").await),
                }
            }
            None => {
                let (reply, rx) = oneshot::channel();
                self.send(Cmd::New {
                    cwd: cwd.to_owned(),
                    reply,
                })
                .await?;
                match rx.await {
                    Ok(Ok(id)) => {
                        self.session = Some(id);
                        Ok(())
                    }
                    Ok(Err(e)) => Err(AgentError::Protocol(self.explain("session/new failed", &e))),
                    Err(_) => Err(self.gone("session/new failed").await),
                }
            }
        }
    }

    /// Starts a turn with `blocks` as the prompt's text blocks; then read it with
    /// [`Self::next`] until it ends.
    pub async fn start_turn(&mut self, blocks: Vec<PromptBlock>) -> Result<(), TurnEnd> {
        let Some(session) = self.session.clone() else {
            return Err(TurnEnd::Failed("no session is open".into()));
        };
        let (reply, done) = oneshot::channel();
        let cmd = Cmd::Prompt {
            session,
            blocks,
            reply,
        };
        if self.cmds.send(cmd).await.is_err() {
            self.usable = false;
            return Err(TurnEnd::Failed(
                self.gone_reason("the agent went away").await,
            ));
        }
        self.turn = Some(done);
        self.cancel_deadline = None;
        Ok(())
    }

    /// The next thing the turn brings: an update, or its end. Once `cancel` fires,
    /// `session/cancel` is sent, and an agent that does not end the turn within
    /// [`CANCEL_GRACE`] is killed. Cancel-safe: it may lose a `select!` and be called again.
    pub async fn next(&mut self, cancel: &CancellationToken) -> Step {
        if let Some(r) = self.early_end.take() {
            if let Ok(ev) = self.events.try_recv() {
                self.early_end = Some(r);
                return Step::Event(ev);
            }
            self.turn = None;
            return Step::End(self.conclude(r).await);
        }
        let Some(done) = self.turn.as_mut() else {
            return Step::End(TurnEnd::Failed("no turn is running".into()));
        };
        tokio::select! {
            biased;
            Some(ev) = self.events.recv() => Step::Event(ev),
            r = done => {
                // Updates sent before the answer come before the end.
                if let Ok(ev) = self.events.try_recv() {
                    self.early_end = Some(r);
                    return Step::Event(ev);
                }
                self.turn = None;
                Step::End(self.conclude(r).await)
            }
            () = cancel.cancelled(), if self.cancel_deadline.is_none() => {
                debug!(pgid = self.pgid, "cancelling the turn");
                self.cancel.notify_one();
                self.cancel_deadline = Some(tokio::time::Instant::now() + CANCEL_GRACE);
                Step::Cancelling
            }
            () = sleep_until(self.cancel_deadline) => {
                warn!(pgid = self.pgid, "the agent did not end its turn after session/cancel; killing it");
                self.turn = None;
                self.kill().await;
                Step::End(TurnEnd::Cancelled)
            }
        }
    }

    /// Whether the agent can take another turn.
    pub fn usable(&self) -> bool {
        self.usable && self.turn.is_none()
    }

    async fn conclude(
        &mut self,
        r: Result<Result<StopReason, String>, oneshot::error::RecvError>,
    ) -> TurnEnd {
        match r {
            Ok(Ok(stop)) => turn_end(stop),
            Ok(Err(e)) => {
                self.usable = false;
                // A closed transport is the agent gone: say how it ended.
                match self.exit_status().await {
                    Some(status) => TurnEnd::Failed(
                        self.explain("the agent exited mid-turn", &format!("{status}")),
                    ),
                    None => TurnEnd::Failed(self.explain("the prompt failed", &e)),
                }
            }
            Err(_) => {
                self.usable = false;
                TurnEnd::Failed(self.gone_reason("the agent exited mid-turn").await)
            }
        }
    }

    /// Ends the agent: closes its stdin, waits briefly, then kills its process group.
    pub async fn shutdown(mut self) {
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.cmds, closed));
        let mut child = self.child.lock().await;
        if tokio::time::timeout(Duration::from_secs(2), child.wait())
            .await
            .is_err()
        {
            crate::executor::kill_process_group(self.pgid);
            let _ = child.wait().await;
        }
    }

    async fn kill(&mut self) {
        self.usable = false;
        crate::executor::kill_process_group(self.pgid);
        let mut child = self.child.lock().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
    }

    async fn send(&self, cmd: Cmd) -> Result<(), AgentError> {
        if self.cmds.send(cmd).await.is_err() {
            return Err(AgentError::Protocol(
                self.gone_reason("the agent went away").await,
            ));
        }
        Ok(())
    }

    async fn gone(&self, what: &str) -> AgentError {
        AgentError::Protocol(self.gone_reason(what).await)
    }

    /// `what`, with how the agent ended and the tail of its stderr.
    async fn gone_reason(&self, what: &str) -> String {
        let mut child = self.child.lock().await;
        let status = match tokio::time::timeout(Duration::from_millis(500), child.wait()).await {
            Ok(Ok(s)) => format!("it exited ({s})"),
            _ => "it broke the protocol".to_owned(),
        };
        drop(child);
        self.explain(what, &status)
    }

    /// The agent's exit status, if it ended (or ends within a moment).
    async fn exit_status(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.lock().await;
        match tokio::time::timeout(Duration::from_millis(500), child.wait()).await {
            Ok(Ok(s)) => Some(s),
            _ => None,
        }
    }

    /// Waits for the connection to end and says why.
    async fn ended(&mut self) -> String {
        match (&mut self.connection).await {
            Ok(Ok(())) => "the connection closed".into(),
            Ok(Err(e)) => e,
            Err(e) => e.to_string(),
        }
    }

    /// `what: why`, then the agent's last stderr line and its login hint, when there are.
    fn explain(&self, what: &str, why: &str) -> String {
        let mut out = format!("{what}: {why}");
        let tail = self
            .stderr
            .lock()
            .map(|t| t.last_lines(3))
            .unwrap_or_default();
        if !tail.is_empty() {
            out.push_str("; the agent said: ");
            out.push_str(&tail);
        }
        if let Some(hint) = &self.info.login_hint {
            out.push_str("; if it needs a login: ");
            out.push_str(hint);
        }
        out
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // `kill_on_drop` ends the leader; the rest of its group goes with this.
        crate::executor::kill_process_group(self.pgid);
        self.connection.abort();
    }
}

fn turn_end(stop: StopReason) -> TurnEnd {
    match stop {
        StopReason::EndTurn => TurnEnd::Finished,
        StopReason::Cancelled => TurnEnd::Cancelled,
        StopReason::Refusal => TurnEnd::Stopped("the agent refused to continue (refusal)".into()),
        StopReason::MaxTokens => {
            TurnEnd::Stopped("the agent reached its token limit (max_tokens)".into())
        }
        StopReason::MaxTurnRequests => TurnEnd::Stopped(
            "the agent reached its limit of requests in one turn (max_turn_requests)".into(),
        ),
        other => TurnEnd::Stopped(format!("the agent stopped: {}", wire_name(&other))),
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A value's name on the wire (`"read"`, `"in_progress"`, …), for the enums the document
/// stores as text.
fn wire_name(v: &impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// An SDK error in words: its message, and the details an agent put in its data.
fn describe(e: &AcpError) -> String {
    let mut out = e.message.clone();
    match &e.data {
        Some(serde_json::Value::String(s)) => {
            out.push_str(": ");
            out.push_str(s);
        }
        Some(serde_json::Value::Object(m)) => {
            if let Some(serde_json::Value::String(s)) =
                m.get("details").or_else(|| m.get("message"))
            {
                out.push_str(": ");
                out.push_str(s);
            }
        }
        _ => {}
    }
    out
}

/// Serves the connection: the agent's requests through the handlers, the caller's commands
/// in order.
async fn serve(
    transport: impl agent_client_protocol::ConnectTo<Client> + 'static,
    events: mpsc::Sender<AgentEvent>,
    fs: Arc<Workspace>,
    mut cmds: mpsc::Receiver<Cmd>,
    ready: oneshot::Sender<Result<AgentInfo, String>>,
    cancel: Arc<Notify>,
) -> Result<(), String> {
    let updates = events.clone();
    let asks = events.clone();
    let reads = (events.clone(), fs.clone());
    let writes = (events, fs);
    let result = Client
        .v1()
        .name("errand")
        .on_receive_notification(
            async move |n: SessionNotification, _cx| {
                if let Some(ev) = from_update(n.update) {
                    // Back-pressure: the agent waits while the caller catches up.
                    let _ = updates.send(ev).await;
                }
                Ok(())
            },
            agent_client_protocol::on_receive_notification!(),
        )
        .on_receive_request(
            async move |req: RequestPermissionRequest, responder, cx: ConnectionTo<_>| {
                let (answer, chosen) = oneshot::channel();
                let fields = &req.tool_call.fields;
                let ask = PermissionAsk {
                    title: fields.title.clone().unwrap_or_default(),
                    kind: fields.kind.as_ref().map(wire_name).unwrap_or_default(),
                    options: req
                        .options
                        .iter()
                        .map(|o| PermissionChoice {
                            id: o.option_id.to_string(),
                            name: o.name.clone(),
                            kind: wire_name(&o.kind),
                        })
                        .collect(),
                    answer,
                };
                let _ = asks.send(AgentEvent::Permission(ask)).await;
                // The answer may take minutes: wait for it off the dispatch loop.
                cx.spawn(async move {
                    let outcome = match chosen.await {
                        Ok(Some(id)) => {
                            RequestPermissionOutcome::Selected(SelectedPermissionOutcome::new(id))
                        }
                        _ => RequestPermissionOutcome::Cancelled,
                    };
                    responder.respond(RequestPermissionResponse::new(outcome))
                })
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            async move |req: ReadTextFileRequest, responder, _cx| {
                let (events, fs) = &reads;
                match fs.read(&req.path, req.line, req.limit) {
                    Ok(text) => responder.respond(ReadTextFileResponse::new(text)),
                    Err(why) => {
                        let _ = events
                            .send(AgentEvent::Refused {
                                op: "read",
                                path: req.path.display().to_string(),
                                why: why.clone(),
                            })
                            .await;
                        responder.respond_with_error(AcpError::invalid_params().data(why))
                    }
                }
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            async move |req: WriteTextFileRequest, responder, _cx| {
                let (events, fs) = &writes;
                match fs.write(&req.path, &req.content) {
                    Ok(()) => responder.respond(WriteTextFileResponse::new()),
                    Err(why) => {
                        let _ = events
                            .send(AgentEvent::Refused {
                                op: "write",
                                path: req.path.display().to_string(),
                                why: why.clone(),
                            })
                            .await;
                        responder.respond_with_error(AcpError::invalid_params().data(why))
                    }
                }
            },
            agent_client_protocol::on_receive_request!(),
        )
        .connect_with(transport, async move |cx: ConnectionTo<_>| {
            let init = cx
                .send_request(
                    InitializeRequest::new(ProtocolVersion::V1).client_capabilities(
                        ClientCapabilities::new().fs(FileSystemCapabilities::new()
                            .read_text_file(true)
                            .write_text_file(true)),
                    ),
                )
                .block_task()
                .await;
            let init = match init {
                Ok(init) => init,
                Err(e) => {
                    let _ = ready.send(Err(describe(&e)));
                    return Ok(());
                }
            };
            let login_hint = init
                .auth_methods
                .iter()
                .map(|m| m.description().unwrap_or(m.name()).to_owned())
                .next();
            let _ = ready.send(Ok(AgentInfo {
                load_session: init.agent_capabilities.load_session,
                login_hint,
            }));
            while let Some(cmd) = cmds.recv().await {
                match cmd {
                    Cmd::New { cwd, reply } => {
                        let r = cx
                            .send_request(NewSessionRequest::new(cwd))
                            .block_task()
                            .await;
                        let _ = reply.send(
                            r.map(|r| r.session_id.to_string())
                                .map_err(|e| describe(&e)),
                        );
                    }
                    Cmd::Load {
                        session,
                        cwd,
                        reply,
                    } => {
                        let r = cx
                            .send_request(LoadSessionRequest::new(session, cwd))
                            .block_task()
                            .await;
                        let _ = reply.send(r.map(|_| ()).map_err(|e| describe(&e)));
                    }
                    Cmd::Prompt {
                        session,
                        blocks,
                        reply,
                    } => {
                        let prompt = blocks.into_iter().map(PromptBlock::into_content).collect();
                        let turn = cx
                            .send_request(PromptRequest::new(session.clone(), prompt))
                            .block_task();
                        tokio::pin!(turn);
                        let r = loop {
                            tokio::select! {
                                r = &mut turn => break r,
                                () = cancel.notified() => {
                                    cx.send_notification(CancelNotification::new(session.clone()))?;
                                }
                            }
                        };
                        let _ = reply.send(r.map(|r| r.stop_reason).map_err(|e| describe(&e)));
                    }
                }
            }
            Ok(())
        })
        .await;
    result.map_err(|e| describe(&e))
}

/// What the desktop keeps of a session update; `None` for kinds it does not keep (the fuzz
/// target `acp` feeds it every update the SDK decodes).
pub fn from_update(update: SessionUpdate) -> Option<AgentEvent> {
    match update {
        SessionUpdate::AgentMessageChunk(chunk) => match chunk.content {
            ContentBlock::Text(t) => Some(AgentEvent::Text(t.text)),
            _ => None,
        },
        SessionUpdate::ToolCall(call) => Some(AgentEvent::ToolCall {
            id: call.tool_call_id.to_string(),
            title: call.title,
            kind: wire_name(&call.kind),
            status: wire_name(&call.status),
        }),
        SessionUpdate::ToolCallUpdate(update) => {
            let f = update.fields;
            Some(AgentEvent::ToolCall {
                id: update.tool_call_id.to_string(),
                title: f.title.unwrap_or_default(),
                kind: f.kind.as_ref().map(wire_name).unwrap_or_default(),
                status: f.status.as_ref().map(wire_name).unwrap_or_default(),
            })
        }
        SessionUpdate::Plan(plan) => Some(AgentEvent::Plan(
            plan.entries
                .into_iter()
                .map(|e| PlanEntry {
                    content: e.content,
                    status: wire_name(&e.status),
                })
                .collect(),
        )),
        _ => None,
    }
}

/// The workspace, as the agent may see it: paths that resolve inside it, and nothing else.
#[derive(Debug)]
struct Workspace {
    root: Option<PathBuf>,
}

impl Workspace {
    fn new(root: &Path) -> Self {
        Self {
            root: std::fs::canonicalize(root).ok(),
        }
    }

    /// `path` resolved (through `..` and symbolic links) if it lies inside the workspace. A
    /// file that does not exist yet is resolved through its parent directory.
    fn resolve(&self, path: &Path) -> Result<PathBuf, String> {
        let Some(root) = &self.root else {
            return Err("the workspace does not exist".into());
        };
        if !path.is_absolute() {
            return Err(format!("{} is not an absolute path", path.display()));
        }
        let resolved = match std::fs::canonicalize(path) {
            Ok(p) => p,
            Err(_) => {
                let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                    return Err(format!("{} has no parent directory", path.display()));
                };
                let parent = std::fs::canonicalize(parent)
                    .map_err(|e| format!("{}: {e}", parent.display()))?;
                parent.join(name)
            }
        };
        if resolved.starts_with(root) {
            Ok(resolved)
        } else {
            Err(format!(
                "{} is outside the workspace {}",
                path.display(),
                root.display()
            ))
        }
    }

    fn read(&self, path: &Path, line: Option<u32>, limit: Option<u32>) -> Result<String, String> {
        let p = self.resolve(path)?;
        let meta = std::fs::metadata(&p).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.len() > MAX_READ_BYTES {
            return Err(format!(
                "{} is {} bytes; at most {MAX_READ_BYTES} are read",
                path.display(),
                meta.len()
            ));
        }
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", path.display()))?;
        if line.is_none() && limit.is_none() {
            return Ok(text);
        }
        let skip = line.map_or(0, |l| l.saturating_sub(1) as usize);
        let take = limit.map_or(usize::MAX, |l| l as usize);
        Ok(text.split_inclusive('\n').skip(skip).take(take).collect())
    }

    fn write(&self, path: &Path, content: &str) -> Result<(), String> {
        let p = self.resolve(path)?;
        // A symbolic link created after the check would still be followed by a plain write:
        // write to a new file beside it and rename over the name.
        let tmp = p.with_file_name(format!(
            ".{}.errand-tmp",
            p.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ));
        std::fs::write(&tmp, content).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::rename(&tmp, &p).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("{}: {e}", path.display())
        })
    }
}

/// The end of the agent's stderr.
#[derive(Debug, Default)]
struct Tail {
    lines: VecDeque<String>,
    bytes: usize,
}

impl Tail {
    fn push(&mut self, line: &str) {
        let line = strip_ansi(line);
        let line = line.trim_end();
        if line.is_empty() {
            return;
        }
        let line: String = line.chars().take(STDERR_TAIL_BYTES / 2).collect();
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.bytes > STDERR_TAIL_BYTES {
            match self.lines.pop_front() {
                Some(l) => self.bytes -= l.len(),
                None => break,
            }
        }
    }

    fn last_lines(&self, n: usize) -> String {
        let skip = self.lines.len().saturating_sub(n);
        self.lines
            .iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

/// `text` without terminal escape sequences (colours), which agents' loggers add.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out
}

/// Copies the agent's stderr to the log, keeping its tail.
async fn copy_stderr(
    stderr: tokio::process::ChildStderr,
    log_path: PathBuf,
    tail: Arc<Mutex<Tail>>,
) {
    let mut log = match tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .await
    {
        Ok(f) => Some(f),
        Err(e) => {
            warn!(path = %log_path.display(), error = %e, "cannot open the agent's log");
            None
        }
    };
    let mut lines = FramedRead::new(stderr, LinesCodec::new_with_max_length(STDERR_LINE_BYTES));
    while let Some(line) = lines.next().await {
        let line = match line {
            Ok(line) => line,
            // The codec skips the rest of an overlong line and goes on.
            Err(tokio_util::codec::LinesCodecError::MaxLineLengthExceeded) => continue,
            Err(_) => break,
        };
        if let Some(f) = log.as_mut()
            && f.write_all(format!("{line}\n").as_bytes()).await.is_err()
        {
            log = None;
        }
        if let Ok(mut t) = tail.lock() {
            t.push(&line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_refuses_paths_that_leave_it() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        std::fs::write(ws.join("notes.txt"), "a\nb\nc\n").unwrap();
        std::fs::write(dir.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), ws.join("link")).unwrap();
        std::os::unix::fs::symlink(dir.path(), ws.join("up")).unwrap();
        let w = Workspace::new(&ws);
        assert_eq!(
            w.read(&ws.join("notes.txt"), None, None).unwrap(),
            "a\nb\nc\n"
        );
        assert_eq!(
            w.read(&ws.join("notes.txt"), Some(2), Some(1)).unwrap(),
            "b\n"
        );
        for bad in [
            ws.join("../secret"),
            ws.join("link"),
            ws.join("up/secret"),
            PathBuf::from("/etc/passwd"),
            PathBuf::from("relative.txt"),
        ] {
            let err = w.read(&bad, None, None).unwrap_err();
            assert!(
                err.contains("outside the workspace") || err.contains("not an absolute"),
                "{bad:?}: {err}"
            );
            assert!(w.write(&bad, "x").is_err(), "{bad:?}");
        }
        assert_eq!(
            std::fs::read_to_string(dir.path().join("secret")).unwrap(),
            "s"
        );
        w.write(&ws.join("new.md"), "hello").unwrap();
        assert_eq!(std::fs::read_to_string(ws.join("new.md")).unwrap(), "hello");
    }

    #[test]
    fn the_stderr_tail_keeps_the_last_lines() {
        let mut t = Tail::default();
        for i in 0..1000 {
            t.push(&format!("line {i}\n"));
        }
        assert_eq!(t.last_lines(2), "line 998 | line 999");
        t.push("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m session created\u{7}");
        assert_eq!(t.last_lines(1), "2026  INFO session created");
        assert!(t.bytes <= STDERR_TAIL_BYTES);
    }
}
