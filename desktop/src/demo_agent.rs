//! `errand-desktop demo-agent`: a scripted ACP agent, so that Errand can be demoed and tested
//! without an LLM.
//!
//! It speaks ACP v1 as newline-delimited JSON-RPC on this process's stdin and stdout (logs go
//! to stderr). Two threads move the lines, so one writer keeps every stdout line whole, even
//! the deliberately broken ones.
//!
//! - `initialize` answers protocol v1, `agentCapabilities.loadSession = true` and agent info
//!   `errand-demo-agent`.
//! - `session/new` answers a fresh id `sess-<random hex>`. `session/load` accepts any id and
//!   answers at once (no history is replayed).
//! - `session/prompt` plays a turn scripted by markers in the prompt's text (all its text blocks
//!   joined with `\n`), in this order:
//!   1. a `plan` update ("Read the request" completed, "Answer" in progress), then
//!      `Working on: <first line of the prompt, at most 80 chars>\n` as `agent_message_chunk`
//!      updates of 8 chars;
//!   2. a `tool_call` `call-1` ("Look around", kind read, pending), then a `tool_call_update`
//!      marking it completed;
//!   3. `[flood N]`: N `agent_message_chunk` updates of `x`, as fast as possible;
//!   4. `[read PATH]`: `fs/read_text_file`, then `read ok: <first 40 chars>\n` or
//!      `read refused: <error message>\n` (every such marker, in order);
//!   5. `[write PATH]`: `fs/write_text_file` with `written by the demo agent\n`, then `write ok\n`
//!      or `write refused: <error message>\n` (every such marker, in order); `[out NAME]`: the
//!      same text written by the agent itself to `$ERRAND_OUT/NAME`, then `out ok: NAME\n` or
//!      `out refused: <why>\n`;
//!   6. `[permission]`: `session/request_permission` for tool call `call-2` ("Write summary.md",
//!      kind edit) with the options `allow-once`, `allow-always`, `reject-once`,
//!      `reject-always`; it waits for the answer however long it takes. A `cancelled` outcome
//!      ends the turn with `cancelled`, a selected one streams `permission: <option id>\n` (an
//!      error answer streams `permission error: <message>\n`);
//!   7. `[wait]`: waits for `session/cancel` (at most [`WAIT_FOR_CANCEL`]), then ends the turn
//!      with `cancelled`;
//!   8. `[exit]`: exits the process at once with code 3, answering nothing;
//!   9. `[refuse]`: ends the turn with `refusal`; `[max-tokens]`: with `max_tokens`;
//!   10. `[garbage]`: writes the line `this is not json` to stdout, outside JSON-RPC (after the
//!       turn's updates so far);
//!
//!   then streams `Done (turn <n> of session <S>)\n` (n counts the session's prompts from 1) and
//!   answers `end_turn`.
//! - `session/cancel` ends the session's turns in progress with `cancelled`, wherever they
//!   are. A permission request still pending is abandoned: no `$/cancel_request` is sent, since
//!   ACP has the client answer it with `cancelled` itself.
//! - With `ERRAND_DEMO_AGENT_LOG` set, every message of interest is appended to that file as
//!   one JSON line: `{"event":"initialize"}`,
//!   `{"event":"new_session","session_id":S,"cwd":C}`, `{"event":"load_session","session_id":S}`,
//!   `{"event":"prompt","session_id":S,"text":T,"links":[{name,uri,mime,size}],
//!   "errand_out":O,"errand_attachments":A}` (the prompt's `resource_link`s and the agent's
//!   `$ERRAND_OUT` and `$ERRAND_ATTACHMENTS`, null when unset), `{"event":"cancel","session_id":S}`,
//!   `{"event":"permission","outcome":"selected"|"cancelled","option_id":O|null}` (written when
//!   the answer arrives, even for an abandoned request; an error answer has outcome `error` and
//!   an `error` field), `{"event":"fs_read","path":P,"ok":B}`, `{"event":"fs_write","path":P,"ok":B}`.
//! - `--no-initialize` never answers `initialize` (it still logs it) and reads until stdin
//!   closes; `--garbage-first` writes `not json at all` to stdout before serving.
//! - At the end of stdin it exits 0.

use std::{
    collections::HashMap,
    fs::File,
    io::{BufRead as _, Write as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use agent_client_protocol::{
    self as acp, Agent, Client, JsonRpcRequest, Lines, UntypedMessage,
    schema::ProtocolVersion,
    v1::{
        ConnectionTo, Responder,
        schema::{
            AgentCapabilities, CancelNotification, ContentBlock, ContentChunk, Implementation,
            InitializeRequest, InitializeResponse, LoadSessionRequest, LoadSessionResponse,
            NewSessionRequest, NewSessionResponse, PermissionOption, PermissionOptionKind, Plan,
            PlanEntry, PlanEntryPriority, PlanEntryStatus, PromptRequest, PromptResponse,
            ReadTextFileRequest, RequestPermissionOutcome, RequestPermissionRequest, SessionId,
            SessionNotification, SessionUpdate, StopReason, ToolCall, ToolCallStatus,
            ToolCallUpdate, ToolCallUpdateFields, ToolKind, WriteTextFileRequest,
        },
    },
};
use anyhow::Context as _;
use futures::{
    SinkExt as _, StreamExt as _,
    channel::{mpsc, oneshot},
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The environment variable naming the event log file.
pub const LOG_ENV: &str = "ERRAND_DEMO_AGENT_LOG";

/// The name the agent gives in `initialize`.
pub const AGENT_NAME: &str = "errand-demo-agent";

/// How long `[wait]` waits for `session/cancel`: long enough for any test to send it, short
/// enough that a forgotten turn does not hang a test run for good.
pub const WAIT_FOR_CANCEL: Duration = Duration::from_secs(120);

/// The exit code of `[exit]`: not 0, 1 or 2, so a test knows the agent died on purpose.
pub const EXIT_CODE: i32 = 3;

/// Client lines read ahead of the dispatch loop. Small: the reader thread then waits, which is
/// the backpressure a pipe gives anyway.
const INCOMING_LINES: usize = 64;

/// Lines waiting for the stdout thread. A `[flood]` fills it; the agent then waits for the
/// client to read.
const OUTGOING_LINES: usize = 256;

/// The largest `[flood N]` played: a million updates is already far past any real turn.
const MAX_FLOOD: usize = 1_000_000;

/// How many flood updates go out between two yields, so a `session/cancel` still gets in.
const FLOOD_BATCH: usize = 256;

/// The size, in chars, of the message chunks the agent streams.
const CHUNK_CHARS: usize = 8;

/// How much of the prompt's first line `Working on:` quotes, in chars.
const FIRST_LINE_CHARS: usize = 80;

/// How much of a file `read ok:` quotes, in chars.
const READ_QUOTE_CHARS: usize = 40;

/// The ACP method of session updates.
const SESSION_UPDATE: &str = "session/update";

/// The line `[garbage]` writes, outside JSON-RPC.
const GARBAGE_LINE: &str = "this is not json";

/// The method of a placeholder notification that the stdout sink replaces with
/// [`GARBAGE_LINE`]. Writing the line straight to stdout instead could overtake the turn's
/// updates still queued in the SDK.
const GARBAGE_METHOD: &str = "_errand_demo_agent/garbage";

/// What `[write PATH]` writes.
const WRITTEN: &str = "written by the demo agent\n";

/// Options of `errand-desktop demo-agent`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Options {
    /// Never answer `initialize`: just read stdin until it closes.
    #[arg(long)]
    pub no_initialize: bool,
    /// Write `not json at all` to stdout before serving.
    #[arg(long)]
    pub garbage_first: bool,
    /// Append what it receives to this file, one JSON object per line (also:
    /// `ERRAND_DEMO_AGENT_LOG`).
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
}

/// Serves ACP on stdin and stdout with the default [`Options`], until stdin closes.
pub async fn serve_stdio() -> anyhow::Result<()> {
    serve_stdio_with(Options::default()).await
}

/// Serves ACP on stdin and stdout until stdin closes.
pub async fn serve_stdio_with(options: Options) -> anyhow::Result<()> {
    let log = match &options.log {
        Some(path) => EventLog::open(path)?,
        None => EventLog::from_env()?,
    };
    let stdout = StdoutLines::spawn().context("while starting the stdout thread")?;
    let incoming = spawn_stdin_reader().context("while starting the stdin thread")?;
    if options.garbage_first {
        stdout.write("not json at all").await?;
    }
    if options.no_initialize {
        read_without_answering(incoming, &log).await;
    } else {
        let state = Arc::new(State {
            log,
            sessions: Mutex::new(HashMap::new()),
        });
        let outgoing = stdout.sink();
        serve(state, Lines::new(outgoing, incoming))
            .await
            .map_err(|e| anyhow::anyhow!("the ACP connection failed: {e}"))?;
    }
    stdout.flush().await;
    Ok(())
}

/// `--no-initialize`: reads until stdin closes, logging `initialize` but answering nothing.
async fn read_without_answering(
    mut incoming: mpsc::Receiver<std::io::Result<String>>,
    log: &EventLog,
) {
    while let Some(line) = incoming.next().await {
        let Ok(line) = line else { break };
        let method = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v.get("method").and_then(Value::as_str).map(str::to_owned));
        if method.as_deref() == Some("initialize") {
            log.record(json!({"event": "initialize"}));
        }
    }
}

/// The connection: one handler per message of interest; turns run in tasks of their own.
async fn serve(
    state: Arc<State>,
    transport: impl acp::ConnectTo<Agent> + 'static,
) -> Result<(), acp::Error> {
    let on_initialize = state.clone();
    let on_new = state.clone();
    let on_load = state.clone();
    let on_prompt = state.clone();
    let on_cancel = state;
    Agent
        .v1()
        .name(AGENT_NAME)
        .on_receive_request(
            async move |_request: InitializeRequest,
                        responder: Responder<InitializeResponse>,
                        _cx: ConnectionTo<Client>| {
                on_initialize.log.record(json!({"event": "initialize"}));
                responder.respond(
                    InitializeResponse::new(ProtocolVersion::V1)
                        .agent_capabilities(AgentCapabilities::new().load_session(true))
                        .agent_info(Implementation::new(AGENT_NAME, env!("CARGO_PKG_VERSION"))),
                )
            },
            acp::on_receive_request!(),
        )
        .on_receive_request(
            async move |request: NewSessionRequest,
                        responder: Responder<NewSessionResponse>,
                        _cx: ConnectionTo<Client>| {
                let id = format!("sess-{:020x}", ulid::Ulid::new().random());
                on_new.log.record(json!({
                    "event": "new_session",
                    "session_id": id,
                    "cwd": path_text(&request.cwd),
                }));
                on_new.open_session(&id);
                tracing::info!(session = %id, "session created");
                responder.respond(NewSessionResponse::new(id))
            },
            acp::on_receive_request!(),
        )
        .on_receive_request(
            async move |request: LoadSessionRequest,
                        responder: Responder<LoadSessionResponse>,
                        _cx: ConnectionTo<Client>| {
                let id = request.session_id.0.to_string();
                on_load
                    .log
                    .record(json!({"event": "load_session", "session_id": id}));
                on_load.open_session(&id);
                tracing::info!(session = %id, "session loaded");
                responder.respond(LoadSessionResponse::new())
            },
            acp::on_receive_request!(),
        )
        .on_receive_request(
            async move |request: PromptRequest,
                        responder: Responder<PromptResponse>,
                        cx: ConnectionTo<Client>| {
                let text = prompt_text(&request.prompt);
                let id = request.session_id.0.to_string();
                let env = |k: &str| std::env::var(k).ok();
                on_prompt.log.record(json!({
                    "event": "prompt",
                    "session_id": id,
                    "text": text,
                    "links": prompt_links(&request.prompt),
                    "errand_out": env("ERRAND_OUT"),
                    "errand_attachments": env("ERRAND_ATTACHMENTS"),
                }));
                let Some((number, cancel)) = on_prompt.begin_turn(&id) else {
                    return responder.respond_with_error(
                        acp::Error::invalid_params().data(format!("unknown session {id}")),
                    );
                };
                tracing::info!(session = %id, turn = number, "turn started");
                let turn = Turn {
                    cx: cx.clone(),
                    state: on_prompt.clone(),
                    session_id: request.session_id,
                    number,
                    first_line: prefix(text.lines().next().unwrap_or_default(), FIRST_LINE_CHARS),
                };
                // The turn waits for the client (files, permission, cancel): it must not hold
                // the dispatch loop that delivers those answers.
                // The script is the first block: later ones carry the client's context (the
                // thread so far), whose earlier prompts must not run again.
                let script = Script::parse(&first_text(&request.prompt));
                cx.spawn(turn.run(script, cancel, responder))
            },
            acp::on_receive_request!(),
        )
        .on_receive_notification(
            async move |notification: CancelNotification, _cx: ConnectionTo<Client>| {
                let id = notification.session_id.0.to_string();
                on_cancel
                    .log
                    .record(json!({"event": "cancel", "session_id": id}));
                on_cancel.cancel_turns(&id);
                tracing::info!(session = %id, "turns cancelled");
                Ok(())
            },
            acp::on_receive_notification!(),
        )
        .connect_to(transport)
        .await
}

/// What every handler shares.
#[derive(Debug)]
struct State {
    log: EventLog,
    /// By session id. It only grows: a demo agent lives for one client.
    sessions: Mutex<HashMap<String, Session>>,
}

/// One session's turn counter, and the token its turns in progress end on.
#[derive(Debug, Default)]
struct Session {
    turns: u32,
    cancel: CancellationToken,
}

impl State {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a session (new or loaded); a known one keeps its turn count.
    fn open_session(&self, id: &str) {
        self.sessions().entry(id.to_owned()).or_default();
    }

    /// Counts a prompt: its turn number, and the token that ends it. `None` for an unknown
    /// session.
    fn begin_turn(&self, id: &str) -> Option<(u32, CancellationToken)> {
        let mut sessions = self.sessions();
        let session = sessions.get_mut(id)?;
        session.turns = session.turns.saturating_add(1);
        Some((session.turns, session.cancel.clone()))
    }

    /// Ends the session's turns in progress; later turns get a fresh token.
    fn cancel_turns(&self, id: &str) {
        if let Some(session) = self.sessions().get_mut(id) {
            std::mem::take(&mut session.cancel).cancel();
        }
    }
}

/// The markers of a prompt, parsed once.
#[derive(Debug, Default, PartialEq, Eq)]
struct Script {
    flood: Option<usize>,
    reads: Vec<String>,
    writes: Vec<String>,
    outs: Vec<String>,
    permission: bool,
    wait: bool,
    exit: bool,
    refuse: bool,
    max_tokens: bool,
    garbage: bool,
}

impl Script {
    fn parse(text: &str) -> Self {
        Self {
            flood: arguments(text, "flood")
                .into_iter()
                .find_map(|n| n.parse::<usize>().ok())
                .map(|n| n.min(MAX_FLOOD)),
            reads: arguments(text, "read"),
            writes: arguments(text, "write"),
            outs: arguments(text, "out"),
            permission: text.contains("[permission]"),
            wait: text.contains("[wait]"),
            exit: text.contains("[exit]"),
            refuse: text.contains("[refuse]"),
            max_tokens: text.contains("[max-tokens]"),
            garbage: text.contains("[garbage]"),
        }
    }
}

/// The arguments of every `[name ARG]` marker in `text`, trimmed, in order.
fn arguments(text: &str, name: &str) -> Vec<String> {
    let open = format!("[{name} ");
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&open) {
        rest = &rest[start + open.len()..];
        let Some(end) = rest.find(']') else { break };
        let argument = rest[..end].trim();
        if !argument.is_empty() {
            found.push(argument.to_owned());
        }
        rest = &rest[end + 1..];
    }
    found
}

/// One prompt being played.
#[derive(Debug)]
struct Turn {
    cx: ConnectionTo<Client>,
    state: Arc<State>,
    session_id: SessionId,
    /// The count of this session's prompts, this one included.
    number: u32,
    /// The prompt's first line, at most [`FIRST_LINE_CHARS`] long.
    first_line: String,
}

impl Turn {
    /// Plays the script until it ends or the turn is cancelled, then answers the prompt.
    async fn run(
        self,
        script: Script,
        cancel: CancellationToken,
        responder: Responder<PromptResponse>,
    ) -> Result<(), acp::Error> {
        let request_cancelled = responder.cancellation();
        let outcome = tokio::select! {
            biased;
            () = cancel.cancelled() => Ok(StopReason::Cancelled),
            () = request_cancelled.cancelled() => Ok(StopReason::Cancelled),
            outcome = self.play(&script) => outcome,
        };
        tracing::info!(session = %self.session_id.0, turn = self.number, ?outcome, "turn ended");
        let answered = match outcome {
            Ok(reason) => responder.respond(PromptResponse::new(reason)),
            Err(e) => responder.respond_with_error(e),
        };
        if let Err(e) = answered {
            tracing::warn!(error = %e, "could not answer the prompt");
        }
        Ok(())
    }

    async fn play(&self, script: &Script) -> Result<StopReason, acp::Error> {
        self.update(SessionUpdate::Plan(Plan::new(vec![
            PlanEntry::new(
                "Read the request",
                PlanEntryPriority::High,
                PlanEntryStatus::Completed,
            ),
            PlanEntry::new(
                "Answer",
                PlanEntryPriority::High,
                PlanEntryStatus::InProgress,
            ),
        ])))?;
        self.say(&format!("Working on: {}\n", self.first_line))?;

        self.announce(
            ToolCall::new("call-1", "Look around")
                .kind(ToolKind::Read)
                .status(ToolCallStatus::Pending),
        )?;
        self.update(SessionUpdate::ToolCallUpdate(ToolCallUpdate::new(
            "call-1",
            ToolCallUpdateFields::new().status(ToolCallStatus::Completed),
        )))?;

        if let Some(n) = script.flood {
            for i in 0..n {
                self.update(chunk("x"))?;
                if (i + 1) % FLOOD_BATCH == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
        for path in &script.reads {
            let line = match self.read(path).await {
                Ok(content) => format!("read ok: {}\n", prefix(&content, READ_QUOTE_CHARS)),
                Err(e) => format!("read refused: {}\n", e.message),
            };
            self.say(&line)?;
        }
        for path in &script.writes {
            let line = match self.write(path).await {
                Ok(()) => "write ok\n".to_owned(),
                Err(e) => format!("write refused: {}\n", e.message),
            };
            self.say(&line)?;
        }
        for name in &script.outs {
            let line = match write_result(name) {
                Ok(()) => format!("out ok: {name}\n"),
                Err(e) => format!("out refused: {e}\n"),
            };
            self.say(&line)?;
        }
        if script.permission {
            match self.ask_permission().await {
                Ok(RequestPermissionOutcome::Selected(selected)) => {
                    self.say(&format!("permission: {}\n", selected.option_id.0))?;
                }
                Ok(_) => return Ok(StopReason::Cancelled),
                Err(e) => self.say(&format!("permission error: {}\n", e.message))?,
            }
        }
        if script.wait {
            // A `session/cancel` ends the turn sooner, through `run`.
            tokio::time::sleep(WAIT_FOR_CANCEL).await;
            return Ok(StopReason::Cancelled);
        }
        if script.exit {
            tracing::warn!("exiting mid-turn, as the prompt asked");
            std::process::exit(EXIT_CODE);
        }
        if script.refuse {
            return Ok(StopReason::Refusal);
        }
        if script.max_tokens {
            return Ok(StopReason::MaxTokens);
        }
        if script.garbage {
            // The stdout sink swaps this for the bare line, in order after the updates above.
            self.cx
                .send_notification(UntypedMessage::new(GARBAGE_METHOD, json!({}))?)?;
        }
        self.say(&format!(
            "Done (turn {} of session {})\n",
            self.number, self.session_id.0
        ))?;
        Ok(StopReason::EndTurn)
    }

    fn update(&self, update: SessionUpdate) -> Result<(), acp::Error> {
        self.cx
            .send_notification(SessionNotification::new(self.session_id.clone(), update))
    }

    /// Sends a `tool_call` update with its `status` spelled out: the SDK leaves out a `pending`
    /// status, its default, but clients and tests read it.
    fn announce(&self, call: ToolCall) -> Result<(), acp::Error> {
        let status = serde_json::to_value(call.status).map_err(acp::Error::into_internal_error)?;
        let notification =
            SessionNotification::new(self.session_id.clone(), SessionUpdate::ToolCall(call));
        let mut params =
            serde_json::to_value(notification).map_err(acp::Error::into_internal_error)?;
        if let Some(update) = params.get_mut("update").and_then(Value::as_object_mut) {
            update.entry("status").or_insert(status);
        }
        self.cx
            .send_notification(UntypedMessage::new(SESSION_UPDATE, params)?)
    }

    /// Streams `text` as message chunks of [`CHUNK_CHARS`].
    fn say(&self, text: &str) -> Result<(), acp::Error> {
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(CHUNK_CHARS) {
            self.update(chunk(piece.iter().collect::<String>()))?;
        }
        Ok(())
    }

    async fn read(&self, path: &str) -> Result<String, acp::Error> {
        let log = self.state.log.clone();
        let logged = path.to_owned();
        let request = ReadTextFileRequest::new(self.session_id.clone(), path);
        let answer = ask(&self.cx, request, move |answer| {
            log.record(json!({"event": "fs_read", "path": logged, "ok": answer.is_ok()}));
        })
        .await?;
        Ok(answer.content)
    }

    async fn write(&self, path: &str) -> Result<(), acp::Error> {
        let log = self.state.log.clone();
        let logged = path.to_owned();
        let request = WriteTextFileRequest::new(self.session_id.clone(), path, WRITTEN);
        ask(&self.cx, request, move |answer| {
            log.record(json!({"event": "fs_write", "path": logged, "ok": answer.is_ok()}));
        })
        .await?;
        Ok(())
    }

    async fn ask_permission(&self) -> Result<RequestPermissionOutcome, acp::Error> {
        let tool_call = ToolCallUpdate::new(
            "call-2",
            ToolCallUpdateFields::new()
                .title("Write summary.md")
                .kind(ToolKind::Edit),
        );
        let options = vec![
            PermissionOption::new("allow-once", "Allow once", PermissionOptionKind::AllowOnce),
            PermissionOption::new(
                "allow-always",
                "Always allow",
                PermissionOptionKind::AllowAlways,
            ),
            PermissionOption::new("reject-once", "Reject", PermissionOptionKind::RejectOnce),
            PermissionOption::new(
                "reject-always",
                "Always reject",
                PermissionOptionKind::RejectAlways,
            ),
        ];
        let request = RequestPermissionRequest::new(self.session_id.clone(), tool_call, options);
        let log = self.state.log.clone();
        // From sending the request to the answer: errand-bench's P9.
        let asked = std::time::Instant::now();
        let answer = ask(&self.cx, request, move |answer| {
            let waited_ms = asked.elapsed().as_secs_f64() * 1e3;
            let mut event = match answer {
                Ok(response) => match &response.outcome {
                    RequestPermissionOutcome::Selected(selected) => json!({
                        "event": "permission",
                        "outcome": "selected",
                        "option_id": selected.option_id.0.to_string(),
                    }),
                    _ => json!({"event": "permission", "outcome": "cancelled", "option_id": null}),
                },
                Err(e) => json!({
                    "event": "permission",
                    "outcome": "error",
                    "option_id": null,
                    "error": e.message,
                }),
            };
            event["waited_ms"] = json!(waited_ms);
            log.record(event);
        })
        .await?;
        Ok(answer.outcome)
    }
}

/// Sends `request` to the client and waits for its answer, calling `on_answer` when it arrives.
///
/// The answer is taken by a callback rather than awaited: when the turn is cancelled, the
/// request is abandoned without a `$/cancel_request`, and `on_answer` still sees the client's
/// eventual answer.
async fn ask<Req>(
    cx: &ConnectionTo<Client>,
    request: Req,
    on_answer: impl FnOnce(&Result<Req::Response, acp::Error>) + Send + 'static,
) -> Result<Req::Response, acp::Error>
where
    Req: JsonRpcRequest,
    Req::Response: Send + 'static,
{
    let (answer_tx, answer_rx) = oneshot::channel();
    cx.send_request(request)
        .on_receiving_result(move |answer| {
            on_answer(&answer);
            // The turn may be over (cancelled): nobody waits for the answer then.
            let _ = answer_tx.send(answer);
            futures::future::ready(Ok(()))
        })?;
    answer_rx
        .await
        .map_err(|_| acp::Error::internal_error().data("the connection closed before the answer"))?
}

fn chunk(text: impl Into<String>) -> SessionUpdate {
    SessionUpdate::AgentMessageChunk(ContentChunk::new(ContentBlock::from(text.into())))
}

/// All the text blocks of a prompt, joined with `\n`.
fn prompt_text(prompt: &[ContentBlock]) -> String {
    prompt
        .iter()
        .filter_map(|block| match block {
            ContentBlock::Text(text) => Some(text.text.as_str()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `[out NAME]`: writes [`WRITTEN`] to `$ERRAND_OUT/NAME` itself (a result file, as
/// an agent's shell tool would leave one). NAME must be a plain file name.
fn write_result(name: &str) -> Result<(), String> {
    let out = std::env::var_os("ERRAND_OUT").ok_or("ERRAND_OUT is not set")?;
    if name.is_empty() || name.contains(['/', '\\']) || name == ".." || name == "." {
        return Err(format!("{name:?} is not a plain file name"));
    }
    std::fs::write(Path::new(&out).join(name), WRITTEN).map_err(|e| e.to_string())
}

/// The `resource_link` blocks of a prompt, as `{name, uri, mime, size}`.
fn prompt_links(prompt: &[ContentBlock]) -> Vec<serde_json::Value> {
    prompt
        .iter()
        .filter_map(|block| match block {
            ContentBlock::ResourceLink(l) => Some(json!({
                "name": l.name,
                "uri": l.uri,
                "mime": l.mime_type,
                "size": l.size,
            })),
            _ => None,
        })
        .collect()
}

/// The first text block of a prompt.
fn first_text(prompt: &[ContentBlock]) -> String {
    prompt
        .iter()
        .find_map(|block| match block {
            ContentBlock::Text(text) => Some(text.text.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// The first `chars` chars of `text`.
fn prefix(text: &str, chars: usize) -> String {
    text.chars().take(chars).collect()
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// The JSON-lines event log named by [`LOG_ENV`], if set.
#[derive(Debug, Clone, Default)]
struct EventLog {
    file: Option<Arc<Mutex<File>>>,
}

impl EventLog {
    fn from_env() -> anyhow::Result<Self> {
        let Some(path) = std::env::var_os(LOG_ENV) else {
            return Ok(Self::default());
        };
        Self::open(&PathBuf::from(path))
    }

    fn open(path: &Path) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("while opening the event log {}", path.display()))?;
        Ok(Self {
            file: Some(Arc::new(Mutex::new(file))),
        })
    }

    /// Appends `event` as one line, flushed. A failure is logged, not fatal.
    fn record(&self, event: Value) {
        let Some(file) = &self.file else { return };
        let mut line = event.to_string();
        line.push('\n');
        let mut file = file.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = file.write_all(line.as_bytes()).and_then(|()| file.flush()) {
            tracing::warn!(error = %e, "could not write the event log");
        }
    }
}

/// What the stdout thread is asked to do.
#[derive(Debug)]
enum Out {
    Line(String),
    /// Answered once every line before it is written.
    Flush(oneshot::Sender<()>),
}

/// The one writer of stdout: a thread that writes whole lines, fed by a bounded channel.
#[derive(Debug, Clone)]
struct StdoutLines {
    tx: mpsc::Sender<Out>,
}

impl StdoutLines {
    fn spawn() -> std::io::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Out>(OUTGOING_LINES);
        std::thread::Builder::new()
            .name("demo-agent-stdout".into())
            .spawn(move || {
                let stdout = std::io::stdout();
                while let Some(out) = futures::executor::block_on(rx.next()) {
                    match out {
                        Out::Line(line) => {
                            let mut stdout = stdout.lock();
                            let written = stdout
                                .write_all(line.as_bytes())
                                .and_then(|()| stdout.write_all(b"\n"))
                                .and_then(|()| stdout.flush());
                            if let Err(e) = written {
                                tracing::warn!(error = %e, "stdout closed");
                                break;
                            }
                        }
                        Out::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Writes one line as is, outside JSON-RPC.
    async fn write(&self, line: &str) -> anyhow::Result<()> {
        self.tx
            .clone()
            .send(Out::Line(line.to_owned()))
            .await
            .context("while writing to stdout: its thread is gone")
    }

    /// The sink the SDK writes its lines to. It writes the [`GARBAGE_METHOD`] placeholder as
    /// [`GARBAGE_LINE`].
    fn sink(&self) -> impl futures::Sink<String, Error = std::io::Error> + Send + 'static + use<> {
        self.tx
            .clone()
            .sink_map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stdout closed"))
            .with(|line: String| {
                let line = if is_garbage_placeholder(&line) {
                    GARBAGE_LINE.to_owned()
                } else {
                    line
                };
                futures::future::ready(Ok::<_, std::io::Error>(Out::Line(line)))
            })
    }

    /// Waits until every line sent so far is written (or the thread is gone).
    async fn flush(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.tx.clone().send(Out::Flush(done_tx)).await.is_ok() {
            let _ = done_rx.await;
        }
    }
}

/// Whether `line` is the JSON-RPC notification [`GARBAGE_METHOD`]. Its name cannot appear
/// unescaped inside a string, so the quick test only lets real candidates through to parsing.
fn is_garbage_placeholder(line: &str) -> bool {
    line.contains(GARBAGE_METHOD)
        && serde_json::from_str::<Value>(line)
            .is_ok_and(|v| v.get("method").and_then(Value::as_str) == Some(GARBAGE_METHOD))
}

/// Reads stdin line by line on a thread. The stream ends at the end of stdin.
fn spawn_stdin_reader() -> std::io::Result<mpsc::Receiver<std::io::Result<String>>> {
    let (mut tx, rx) = mpsc::channel(INCOMING_LINES);
    std::thread::Builder::new()
        .name("demo-agent-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let line = match stdin.read_until(b'\n', &mut buf) {
                    Ok(0) => break,
                    // Bad UTF-8 still makes a line: the SDK then answers a parse error.
                    Ok(_) => Ok(String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_owned()),
                    Err(e) => Err(e),
                };
                let failed = line.is_err();
                if futures::executor::block_on(tx.send(line)).is_err() || failed {
                    break;
                }
            }
        })?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_prompt_has_no_markers() {
        assert_eq!(Script::parse("hello there"), Script::default());
    }

    #[test]
    fn every_marker_is_found_anywhere_in_the_text() {
        let script = Script::parse(
            "go [flood 12] [read /a b.txt]\n[write out.md][permission] [wait] [exit] [refuse] \
             [garbage] [read c] [out r.md] [max-tokens]",
        );
        assert_eq!(
            script,
            Script {
                flood: Some(12),
                reads: vec!["/a b.txt".into(), "c".into()],
                writes: vec!["out.md".into()],
                outs: vec!["r.md".into()],
                permission: true,
                wait: true,
                exit: true,
                refuse: true,
                max_tokens: true,
                garbage: true,
            }
        );
    }

    #[test]
    fn a_flood_is_capped_and_a_bad_count_ignored() {
        assert_eq!(Script::parse("[flood 99999999999]").flood, Some(MAX_FLOOD));
        assert_eq!(Script::parse("[flood lots]").flood, None);
        assert_eq!(Script::parse("[flood 3").flood, None);
    }

    #[test]
    fn prompt_text_joins_only_the_text_blocks() {
        let prompt = vec![ContentBlock::from("one"), ContentBlock::from("two")];
        assert_eq!(prompt_text(&prompt), "one\ntwo");
    }

    #[test]
    fn only_the_placeholder_itself_becomes_garbage() {
        let placeholder =
            format!(r#"{{"jsonrpc":"2.0","method":"{GARBAGE_METHOD}","params":{{}}}}"#);
        assert!(is_garbage_placeholder(&placeholder));
        let quoted = serde_json::to_string(&json!({"text": placeholder})).unwrap();
        assert!(!is_garbage_placeholder(&quoted));
    }

    #[test]
    fn prefix_counts_chars_not_bytes() {
        assert_eq!(prefix("héllo", 2), "hé");
    }
}
