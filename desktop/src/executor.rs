//! Running one task attempt as a process.
//!
//! - An [`ExecutorConfig`] (read from the desktop's TOML config, or the embedded `shell` default)
//!   turns an instruction into an argv: `sh -c -- <instruction>`, or a `command` template filled
//!   in argument by argument, never through a shell. An instruction starting with `-` never lands
//!   where the program reads options: a template that would put it there refuses it.
//! - [`run`] checks the working directory, the program and the log file, then spawns the argv in
//!   its own process group behind a *start gate*: a `/bin/sh` wrapper that waits for one line on
//!   its stdin before it `exec`s the real program.
//! - While the process waits at the gate, [`run`] hands its process group id to `on_spawn`, which
//!   records it durably (the write-ahead ledger of DESIGN.md §8). Only then is the gate opened. If
//!   recording fails, or the daemon dies before it opens the gate, the wrapper reads end-of-file
//!   and exits without running anything.
//! - stdout and stderr are read concurrently. Every byte goes to the log file; decoded text is sent
//!   to the caller as it is read (the runner groups it into `output` events: output is batched
//!   in one place), never waiting for the caller; the last few KiB are kept as the tail.
//! - A timeout or a cancellation terminates the whole group (SIGTERM, then SIGKILL), grandchildren
//!   included. When the main process exits, whatever it left running in its group is killed too:
//!   nothing an attempt starts outlives it.
//! - [`kill_process_group`] and [`process_group_alive`] serve start-up recovery of attempts left
//!   over from a crash.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use errand_core::limits::MAX_SHORT_TEXT_BYTES;
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, getpgrp};
use serde::Deserialize;
use tokio::fs::File;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::process::{Child, Command};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The text in a `command` template that is replaced by the task's instruction.
pub const INSTRUCTION_PLACEHOLDER: &str = "{instruction}";

/// Name of the embedded default executor.
pub const SHELL_EXECUTOR_NAME: &str = "shell";

/// The argument that ends a program's options (POSIX utility guideline 10, and getopt, clap,
/// click, commander): an instruction placed after it is an operand even when it starts with `-`.
pub const END_OF_OPTIONS: &str = "--";

/// How often the log file is flushed while output arrives, so it can be followed live, and how
/// soon text the caller had no room for is offered again.
const FLUSH_INTERVAL: Duration = Duration::from_millis(500);

/// Default for [`ExecSpec::tail_bytes`]: enough for the last error message or the end of a stack
/// trace, small enough to put in a `failed` reason or a notification.
pub const DEFAULT_TAIL_BYTES: usize = 4 * 1024;

/// Most text held for a consumer that does not keep up: 16 full `output` events. Beyond it the oldest
/// text is dropped from the live stream (the log file keeps everything) rather than buffered
/// without limit, and the child is never made to wait.
const MAX_PENDING_BYTES: usize = 256 * 1024;

/// One read from a pipe. Linux pipes hold 64 KiB, so a fast writer needs a few reads per buffer,
/// each of them cheap.
const READ_BUFFER_BYTES: usize = 8 * 1024;

/// Between SIGTERM and SIGKILL on timeout or cancel: half of the one second within which a
/// cancelled group must be gone, which is enough for a well-behaved program to clean up.
const TERM_GRACE: Duration = Duration::from_millis(500);

/// After the main process exits, how long what it left behind may keep the output pipes open
/// (to write its last lines) before the group is killed.
const LINGER_GRACE: Duration = Duration::from_secs(2);

/// After SIGKILL, how long to wait for the output pipes to close. A process that left the group
/// (`setsid`) can hold them open forever, so the wait is bounded.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// How long to wait for a killed main process to be reaped before giving up on its exit status.
const REAP_GRACE: Duration = Duration::from_secs(2);

/// Once the process is done, how long the last text may wait for room in the output channel.
/// The caller may only start reading after [`run`] returns, so this must not wait forever.
const FINAL_SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// `PATH` to search when neither the spec nor the daemon's environment sets one (the same default
/// as `sh`).
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Like [`GATE_SCRIPT`], with stdin from the file `$ERRAND_STDIN_FILE` (the thread so far).
const GATE_SCRIPT_STDIN_FILE: &str = r#"IFS= read -r gate || exit 125; [ "$gate" = go ] || exit 125; exec "$@" <"$ERRAND_STDIN_FILE""#;

/// The start gate's shell. An absolute path, so it does not depend on the task's `PATH`.
const GATE_SHELL: &str = "/bin/sh";

/// The start gate: wait for `go` on stdin, then become the real program (`"$@"`) with stdin from
/// `/dev/null`. End-of-file or anything else means the start was not recorded: exit without
/// running anything.
const GATE_SCRIPT: &str =
    r#"IFS= read -r gate || exit 125; [ "$gate" = go ] || exit 125; exec "$@" </dev/null"#;

/// `$0` of the start gate, which is what `ps` shows until the gate opens.
const GATE_ARG0: &str = "errand-exec";

/// The line that opens the start gate.
const GATE_OPEN: &[u8] = b"go\n";

// ---------------------------------------------------------------------------------------------
// Executor configuration
// ---------------------------------------------------------------------------------------------

/// How an executor turns an instruction into a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutorKind {
    /// `sh -c -- <instruction>`: the instruction is a shell script.
    Shell,
    /// A fixed argv in which every [`INSTRUCTION_PLACEHOLDER`] is replaced by the instruction,
    /// argument by argument, e.g. `["claude", "-p", "{instruction}"]`. Where an argument starts
    /// with the placeholder and no [`END_OF_OPTIONS`] argument comes before it, an instruction
    /// starting with `-` is refused ([`ArgvError::LooksLikeOption`]): the program would read it
    /// as an option (`sort -o/home/me/.bashrc`).
    Command {
        /// The template. Its first element is the program, looked up in `PATH`.
        argv: Vec<String>,
    },
    /// An agent that speaks the Agent Client Protocol on its stdin and stdout, e.g.
    /// `["npx", "-y", "@zed-industries/claude-code-acp"]`. A task is a conversation with it:
    /// the instruction is its first prompt and each reply the next (see [`crate::acp`]).
    Acp(AcpOptions),
}

/// How an `acp` executor runs its agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpOptions {
    /// The program and its arguments (no placeholder: the instruction goes in the prompt).
    pub argv: Vec<String>,
    /// ACP tool kinds (`read`, `search`, `think`, …) whose permission requests are allowed
    /// once without asking; each is recorded in the thread.
    pub auto_allow: Vec<String>,
    /// A permission request unanswered this long is rejected once, and the thread says so.
    /// `None`: the agent waits for the person as long as the task may run.
    pub permission_expiry: Option<Duration>,
    /// How long the agent may take to answer `initialize`.
    pub startup_timeout: Duration,
    /// How long an agent stays up after a turn, waiting for a reply, before it is stopped (a
    /// later reply then loads the session again, or starts one with the transcript).
    pub idle_timeout: Duration,
}

/// Default [`AcpOptions::startup_timeout`]: `npx` may first download the agent.
pub const DEFAULT_ACP_STARTUP: Duration = Duration::from_secs(120);

/// Default [`AcpOptions::idle_timeout`].
pub const DEFAULT_ACP_IDLE: Duration = Duration::from_secs(10 * 60);

/// A named, validated executor, as listed under `[[executors]]` in the desktop's config:
///
/// ```toml
/// [[executors]]
/// name = "claude"
/// kind = "command"
/// argv = ["claude", "-p", "{instruction}"]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawExecutorConfig")]
pub struct ExecutorConfig {
    name: String,
    kind: ExecutorKind,
    /// A `command` executor gets the thread's transcript on stdin (`stdin = "thread"`);
    /// otherwise stdin is empty.
    stdin_thread: bool,
}

/// Replaced, in a `command` executor's argv, by the path of a file holding the thread so far
/// (the same file `ERRAND_THREAD` names).
pub const THREAD_FILE_PLACEHOLDER: &str = "{thread_file}";

/// An argv element of a `command` executor that is exactly this becomes one argument per
/// attachment of the task: the absolute path of its copy in `<workspace>/<task>/attachments/`,
/// in the task's order (no argument when it has none). A path never starts with `-`, so no
/// program takes it for an option.
pub const ATTACHMENTS_PLACEHOLDER: &str = "{attachments}";

/// Why an executor configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecutorConfigError {
    /// The name is empty or blank.
    #[error("executor name is empty")]
    EmptyName,
    /// The name is longer than the document accepts.
    #[error("executor name is {len} bytes long; at most {max} are allowed", max = MAX_SHORT_TEXT_BYTES)]
    NameTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// `kind = "command"` without `argv`.
    #[error(
        "executor \"{executor}\": kind = \"command\" needs an argv, \
         e.g. argv = [\"claude\", \"-p\", \"{{instruction}}\"]"
    )]
    MissingArgv {
        /// The executor's name.
        executor: String,
    },
    /// `kind = "acp"` without `argv`.
    #[error(
        "executor \"{executor}\": kind = \"acp\" needs the agent's argv, \
         e.g. argv = [\"npx\", \"-y\", \"@zed-industries/claude-code-acp\"]"
    )]
    MissingAgentArgv {
        /// The executor's name.
        executor: String,
    },
    /// `stdin` other than `"thread"` on a `command` executor.
    #[error(
        "executor \"{executor}\": stdin = {value:?} is not supported; a kind = \"command\" \
         executor may set stdin = \"thread\" to read the thread so far on stdin"
    )]
    Stdin {
        /// The executor's name.
        executor: String,
        /// What was given.
        value: String,
    },
    /// An option only an `acp` executor has, on another kind.
    #[error(
        "executor \"{executor}\": auto_allow, permission_expiry, startup_timeout and \
         idle_timeout are only used with kind = \"acp\""
    )]
    AcpOnly {
        /// The executor's name.
        executor: String,
    },
    /// A duration that does not parse.
    #[error("executor \"{executor}\": {field}: {reason}")]
    Duration {
        /// The executor's name.
        executor: String,
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// `kind = "shell"` with an `argv`, which it would ignore.
    #[error("executor \"{executor}\": argv is only used with kind = \"command\"")]
    ArgvWithShell {
        /// The executor's name.
        executor: String,
    },
    /// The template has no elements.
    #[error("executor \"{executor}\": argv is empty; its first element must name the program")]
    EmptyArgv {
        /// The executor's name.
        executor: String,
    },
    /// The template's first element is an empty string.
    #[error("executor \"{executor}\": the program (the first argv element) is empty")]
    EmptyProgram {
        /// The executor's name.
        executor: String,
    },
    /// The template's first element contains the placeholder, so the instruction would choose the
    /// program.
    #[error(
        "executor \"{executor}\": the program (the first argv element) must be fixed; \
         put {{instruction}} in a later element"
    )]
    PlaceholderInProgram {
        /// The executor's name.
        executor: String,
    },
    /// `{attachments}` shares an element with other text, or names the program: it stands for
    /// any number of arguments, so it must be an element of its own.
    #[error(
        "executor \"{executor}\": {{attachments}} must be an argv element of its own, after the \
         program (it becomes one argument per attached file)"
    )]
    AttachmentsNotAlone {
        /// The executor's name.
        executor: String,
    },
    /// No element contains the placeholder, so the instruction would never reach the program.
    #[error(
        "executor \"{executor}\": no argv element contains {{instruction}}, \
         so the task's instruction would never reach the program"
    )]
    MissingInstruction {
        /// The executor's name.
        executor: String,
    },
}

/// Why an instruction cannot be handed to an executor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgvError {
    /// The instruction starts with `-` and would land where the program reads options.
    #[error(
        "the instruction starts with '-' and executor \"{executor}\" ({program}) would read it \
         as an option; add \"--\" before {{instruction}} in its argv in config.toml, or start \
         the instruction with another character"
    )]
    LooksLikeOption {
        /// The executor's name.
        executor: String,
        /// Its program (the first argv element).
        program: String,
    },
}

impl ExecutorConfig {
    /// Checks and builds an executor. A `Command` template must name a fixed program and use
    /// [`INSTRUCTION_PLACEHOLDER`] in a later element.
    pub fn new(name: impl Into<String>, kind: ExecutorKind) -> Result<Self, ExecutorConfigError> {
        let name = name.into();
        if name.trim().is_empty() {
            return Err(ExecutorConfigError::EmptyName);
        }
        if name.len() > MAX_SHORT_TEXT_BYTES {
            return Err(ExecutorConfigError::NameTooLong { len: name.len() });
        }
        if let ExecutorKind::Acp(acp) = &kind {
            let executor = name.clone();
            match acp.argv.first() {
                None => return Err(ExecutorConfigError::EmptyArgv { executor }),
                Some(p) if p.is_empty() => {
                    return Err(ExecutorConfigError::EmptyProgram { executor });
                }
                Some(_) => {}
            }
        }
        if let ExecutorKind::Command { argv } = &kind {
            let executor = name.clone();
            let Some((program, args)) = argv.split_first() else {
                return Err(ExecutorConfigError::EmptyArgv { executor });
            };
            if program.is_empty() {
                return Err(ExecutorConfigError::EmptyProgram { executor });
            }
            if program.contains(INSTRUCTION_PLACEHOLDER) {
                return Err(ExecutorConfigError::PlaceholderInProgram { executor });
            }
            if !args.iter().any(|a| a.contains(INSTRUCTION_PLACEHOLDER)) {
                return Err(ExecutorConfigError::MissingInstruction { executor });
            }
            if program.contains(ATTACHMENTS_PLACEHOLDER)
                || args
                    .iter()
                    .any(|a| a.contains(ATTACHMENTS_PLACEHOLDER) && a != ATTACHMENTS_PLACEHOLDER)
            {
                return Err(ExecutorConfigError::AttachmentsNotAlone { executor });
            }
        }
        Ok(Self {
            name,
            kind,
            stdin_thread: false,
        })
    }

    /// Hands the thread's transcript to a `command` executor on stdin.
    pub fn with_stdin_thread(mut self) -> Self {
        self.stdin_thread = matches!(self.kind, ExecutorKind::Command { .. });
        self
    }

    /// Whether the executor reads the transcript on stdin.
    pub fn stdin_thread(&self) -> bool {
        self.stdin_thread
    }

    /// [`Self::argv`], with every [`THREAD_FILE_PLACEHOLDER`] of the template replaced by
    /// `thread_file` (before the instruction goes in, so an instruction's text stays as is),
    /// and each template element that is [`ATTACHMENTS_PLACEHOLDER`] replaced by the
    /// `attachments` paths, one argument each (chosen by the template's element, so an
    /// instruction that reads `{attachments}` stays text).
    pub fn argv_with_thread(
        &self,
        instruction: &str,
        thread_file: &str,
        attachments: &[String],
    ) -> Result<Vec<String>, ArgvError> {
        match &self.kind {
            ExecutorKind::Command { argv } => {
                let template: Vec<String> = argv
                    .iter()
                    .map(|a| a.replace(THREAD_FILE_PLACEHOLDER, thread_file))
                    .collect();
                let filled = Self {
                    name: self.name.clone(),
                    kind: ExecutorKind::Command { argv: template },
                    stdin_thread: self.stdin_thread,
                }
                .argv(instruction)?;
                Ok(argv
                    .iter()
                    .zip(filled)
                    .flat_map(|(t, f)| {
                        if t == ATTACHMENTS_PLACEHOLDER {
                            attachments.to_vec()
                        } else {
                            vec![f]
                        }
                    })
                    .collect())
            }
            _ => self.argv(instruction),
        }
    }

    /// The embedded default: `shell`, running `sh -c -- <instruction>`.
    pub fn shell() -> Self {
        Self {
            name: SHELL_EXECUTOR_NAME.to_owned(),
            kind: ExecutorKind::Shell,
            stdin_thread: false,
        }
    }

    /// The name the desktop advertises and a task picks.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How it runs an instruction.
    pub fn kind(&self) -> &ExecutorKind {
        &self.kind
    }

    /// The argv that runs `instruction`. For `Command`, each template element has every
    /// [`INSTRUCTION_PLACEHOLDER`] replaced by the instruction as plain text: no shell sees it, so
    /// `$(rm -rf ~)` stays text. An instruction starting with `-` is never passed where it would
    /// be read as an option: `Shell` puts it after `--`, and `Command` refuses it unless every
    /// argument that starts with the placeholder comes after a literal `--` argument.
    pub fn argv(&self, instruction: &str) -> Result<Vec<String>, ArgvError> {
        match &self.kind {
            ExecutorKind::Acp(acp) => Ok(acp.argv.clone()),
            ExecutorKind::Shell => Ok(vec![
                "sh".into(),
                "-c".into(),
                END_OF_OPTIONS.into(),
                instruction.into(),
            ]),
            ExecutorKind::Command { argv } => {
                if instruction.starts_with('-') && places_in_option_position(argv) {
                    return Err(ArgvError::LooksLikeOption {
                        executor: self.name.clone(),
                        program: argv.first().cloned().unwrap_or_default(),
                    });
                }
                Ok(argv
                    .iter()
                    .map(|a| a.replace(INSTRUCTION_PLACEHOLDER, instruction))
                    .collect())
            }
        }
    }
}

/// True when some argument of `template` starts with the placeholder (so the filled argument
/// starts with the instruction) before any [`END_OF_OPTIONS`] argument, where the program still
/// parses options. An argument like `--prompt={instruction}` starts with the template's own
/// text, so the instruction cannot turn it into another option.
fn places_in_option_position(template: &[String]) -> bool {
    template
        .iter()
        .skip(1)
        .take_while(|a| a.as_str() != END_OF_OPTIONS)
        .any(|a| a.starts_with(INSTRUCTION_PLACEHOLDER))
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self::shell()
    }
}

/// The config file's shape, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExecutorConfig {
    name: String,
    kind: RawExecutorKind,
    argv: Option<Vec<String>>,
    auto_allow: Option<Vec<String>>,
    permission_expiry: Option<String>,
    startup_timeout: Option<String>,
    idle_timeout: Option<String>,
    stdin: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawExecutorKind {
    Shell,
    Command,
    Acp,
}

impl TryFrom<RawExecutorConfig> for ExecutorConfig {
    type Error = ExecutorConfigError;

    fn try_from(raw: RawExecutorConfig) -> Result<Self, Self::Error> {
        let stdin_thread = match raw.stdin.as_deref() {
            None | Some("none") => false,
            Some("thread") if matches!(raw.kind, RawExecutorKind::Command) => true,
            Some(other) => {
                return Err(ExecutorConfigError::Stdin {
                    executor: raw.name,
                    value: other.to_owned(),
                });
            }
        };
        let acp_only = raw.auto_allow.is_some()
            || raw.permission_expiry.is_some()
            || raw.startup_timeout.is_some()
            || raw.idle_timeout.is_some();
        if acp_only && !matches!(raw.kind, RawExecutorKind::Acp) {
            return Err(ExecutorConfigError::AcpOnly { executor: raw.name });
        }
        let duration = |field: &'static str, v: Option<String>| {
            v.map(|text| {
                humantime::parse_duration(text.trim()).map_err(|e| ExecutorConfigError::Duration {
                    executor: raw.name.clone(),
                    field,
                    reason: format!(
                        "{text:?} is not a duration ({e}); use e.g. \"30s\" or \"10m\""
                    ),
                })
            })
            .transpose()
        };
        let permission_expiry = duration("permission_expiry", raw.permission_expiry)?;
        let startup_timeout = duration("startup_timeout", raw.startup_timeout)?;
        let idle_timeout = duration("idle_timeout", raw.idle_timeout)?;
        let kind = match (raw.kind, raw.argv) {
            (RawExecutorKind::Acp, Some(argv)) => ExecutorKind::Acp(AcpOptions {
                argv,
                auto_allow: raw.auto_allow.unwrap_or_default(),
                permission_expiry,
                startup_timeout: startup_timeout.unwrap_or(DEFAULT_ACP_STARTUP),
                idle_timeout: idle_timeout.unwrap_or(DEFAULT_ACP_IDLE),
            }),
            (RawExecutorKind::Acp, None) => {
                return Err(ExecutorConfigError::MissingAgentArgv { executor: raw.name });
            }
            (RawExecutorKind::Shell, None) => ExecutorKind::Shell,
            (RawExecutorKind::Shell, Some(_)) => {
                return Err(ExecutorConfigError::ArgvWithShell { executor: raw.name });
            }
            (RawExecutorKind::Command, Some(argv)) => ExecutorKind::Command { argv },
            (RawExecutorKind::Command, None) => {
                return Err(ExecutorConfigError::MissingArgv { executor: raw.name });
            }
        };
        let config = Self::new(raw.name, kind)?;
        Ok(if stdin_thread {
            config.with_stdin_thread()
        } else {
            config
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Running an attempt
// ---------------------------------------------------------------------------------------------

/// What to run for one attempt, and how to report it.
#[derive(Clone)]
pub struct ExecSpec {
    /// The program and its arguments, usually from [`ExecutorConfig::argv`]. A program without a
    /// `/` is looked up in `PATH` (the one in `env`, if set there).
    pub argv: Vec<String>,
    /// The working directory. It must exist.
    pub cwd: PathBuf,
    /// Variables set on top of the daemon's own environment. May hold secrets (API keys), so
    /// `Debug` shows only their names.
    pub env: Vec<(String, String)>,
    /// How long the process may run, counted from the moment it is let through the start gate.
    pub timeout: Duration,
    /// Where the full output goes: stdout and stderr bytes in arrival order. The file is created
    /// (or truncated), with its parent directories.
    pub log_path: PathBuf,
    /// How much of the end of the output [`ExecOutcome::tail`] keeps.
    pub tail_bytes: usize,
    /// The program's stdin: this file, else empty (`/dev/null`).
    pub stdin_file: Option<PathBuf>,
}

impl ExecSpec {
    /// A spec with no extra environment and the default tail size.
    pub fn new(
        argv: Vec<String>,
        cwd: impl Into<PathBuf>,
        log_path: impl Into<PathBuf>,
        timeout: Duration,
    ) -> Self {
        Self {
            argv,
            cwd: cwd.into(),
            env: Vec::new(),
            timeout,
            log_path: log_path.into(),
            tail_bytes: DEFAULT_TAIL_BYTES,
            stdin_file: None,
        }
    }
}

impl fmt::Debug for ExecSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env_names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("ExecSpec")
            .field("program", &self.argv.first())
            .field("args", &self.argv.len().saturating_sub(1))
            .field("cwd", &self.cwd)
            .field("env_names", &env_names)
            .field("timeout", &self.timeout)
            .field("log_path", &self.log_path)
            .field("tail_bytes", &self.tail_bytes)
            .finish()
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// The main process's exit code, or `None` if a signal ended it (see [`Self::signal`]) or its
    /// status could not be collected. Never `128 + signal`, so a real `exit 137` stays
    /// distinguishable from SIGKILL.
    pub exit_code: Option<i64>,
    /// The signal that ended the main process, if one did (SIGTERM or SIGKILL after a timeout or
    /// cancel).
    pub signal: Option<i32>,
    /// The timeout fired and the group was killed.
    pub timed_out: bool,
    /// Cancellation fired and the group was killed (or, if it fired before the spawn, nothing
    /// ran).
    pub cancelled: bool,
    /// The last [`ExecSpec::tail_bytes`] (or fewer) of the output, cut at a character boundary.
    pub tail: String,
    /// Bytes read from stdout and stderr together.
    pub total_bytes: u64,
    /// From the spawn to the end of the attempt.
    pub duration: Duration,
    /// Whether the log file received every byte. `false` after a write error (disk full), which
    /// is logged; the attempt is not stopped for it.
    pub log_complete: bool,
}

impl ExecOutcome {
    /// Exit code 0, not killed by a timeout or a cancellation.
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out && !self.cancelled
    }
}

/// Why an attempt could not be run. Once the process is let through the start gate, [`run`]
/// always returns an [`ExecOutcome`].
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The argv is empty.
    #[error("nothing to run: the argv is empty")]
    EmptyArgv,
    /// A bare program name was not found in any `PATH` directory.
    #[error("executor program \"{program}\" not found in PATH")]
    ProgramNotFound {
        /// The name as configured.
        program: String,
    },
    /// A program given as a path does not exist or is not executable.
    #[error("executor program {} does not exist or is not an executable file", .path.display())]
    NotExecutable {
        /// The path, resolved against the working directory.
        path: PathBuf,
    },
    /// The working directory is missing or not a directory.
    #[error("working directory {} is not usable", .path.display())]
    WorkingDir {
        /// The directory.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// The log file (or its directory) could not be created.
    #[error("cannot create log file {}", .path.display())]
    Log {
        /// The log file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// The operating system refused to start the process.
    #[error("failed to start executor program \"{program}\"")]
    Spawn {
        /// The program as configured.
        program: String,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// `on_spawn` failed, so the start was not recorded; the process was killed at the start
    /// gate, before the program ran.
    #[error("could not record process group {pgid} before the start; it was killed before running")]
    Record {
        /// The process group that was killed.
        pgid: i32,
        /// `on_spawn`'s error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Runs one attempt: spawns `spec.argv` in a new process group, calls `on_spawn(pgid)` before the
/// program runs, streams its output, and waits for it, its timeout, or `cancel`.
///
/// - `on_spawn` must make the process group id durable (the ledger entry). The process waits at
///   the start gate until it returns `Ok`, so there is no window in which the program runs
///   unrecorded. If it returns `Err`, the group is killed and [`ExecError::Record`] returned. It
///   runs on the async worker: keep it to one quick write.
/// - Batches of output go to `output` without waiting: when the channel is full, text keeps
///   accumulating (up to a cap, then the oldest text is dropped from the stream with a notice).
///   The log file always gets everything. If the receiver is dropped, the attempt continues.
/// - If `cancel` has fired before the spawn, nothing is spawned and `on_spawn` is not called.
/// - Dropping the returned future kills the process group.
pub async fn run<F, E>(
    spec: ExecSpec,
    cancel: CancellationToken,
    on_spawn: F,
    output: mpsc::Sender<String>,
) -> Result<ExecOutcome, ExecError>
where
    F: FnOnce(i32) -> Result<(), E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Prepare: everything that can be refused is refused before a process exists.
    let program = spec.argv.first().ok_or(ExecError::EmptyArgv)?.clone();
    check_working_dir(&spec.cwd)?;
    let resolved = resolve_program(&program, &spec.cwd, &spec.env)?;
    debug!(program = %program, resolved = %resolved.display(), "executor program found");
    let log = open_log(&spec.log_path).await?;
    if cancel.is_cancelled() {
        info!(program = %program, "attempt cancelled before it was spawned");
        return Ok(ExecOutcome {
            exit_code: None,
            signal: None,
            timed_out: false,
            cancelled: true,
            tail: String::new(),
            total_bytes: 0,
            duration: Duration::ZERO,
            log_complete: true,
        });
    }

    // Spawn, held at the start gate.
    let spawned_at = Instant::now();
    let (mut child, pgid) = spawn_gated(&spec, &program)?;
    let mut guard = GroupGuard { pgid, armed: true };

    // Record: the write-ahead ledger entry, while nothing has run yet.
    if let Err(e) = on_spawn(pgid) {
        // Converted before the next await, so a non-`Send` error cannot make this future `!Send`.
        let source = e.into();
        warn!(pgid, program = %program, error = %source, "start not recorded; killing the process at the gate");
        drop(child.stdin.take());
        signal_group(pgid, Signal::SIGKILL);
        if timeout(REAP_GRACE, child.wait()).await.is_ok() {
            guard.armed = false;
        }
        return Err(ExecError::Record { pgid, source });
    }

    // Release.
    open_gate(&mut child, pgid).await;
    info!(pgid, program = %program, "attempt started");

    // Supervise.
    let sink = OutputSink::new(log, &spec, output);
    let outcome = supervise(child, pgid, &spec, &cancel, sink, spawned_at).await;
    guard.armed = false;
    info!(
        pgid,
        exit_code = ?outcome.exit_code,
        signal = ?outcome.signal,
        timed_out = outcome.timed_out,
        cancelled = outcome.cancelled,
        total_bytes = outcome.total_bytes,
        "attempt finished"
    );
    Ok(outcome)
}

/// Sends SIGKILL to process group `pgid`. Returns whether the signal was delivered. Refuses (and
/// returns `false` for) ids that are not a plain foreign group: `pgid <= 1` (which would mean the
/// caller's own group or every process) and the daemon's own group.
///
/// Used on start-up to kill attempts the ledger shows as started but not finished.
pub fn kill_process_group(pgid: i32) -> bool {
    signal_group(pgid, Signal::SIGKILL)
}

/// Whether process group `pgid` still has a member (`kill(-pgid, 0)`), counting a member that
/// exists but may not be signalled by us, and a not yet reaped (zombie) leader.
pub fn process_group_alive(pgid: i32) -> bool {
    if pgid <= 0 {
        return false;
    }
    match killpg(Pid::from_raw(pgid), None) {
        Ok(()) | Err(Errno::EPERM) => true,
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Phases of `run`
// ---------------------------------------------------------------------------------------------

fn check_working_dir(cwd: &Path) -> Result<(), ExecError> {
    match std::fs::metadata(cwd) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(ExecError::WorkingDir {
            path: cwd.to_owned(),
            source: io::Error::other("not a directory"),
        }),
        Err(source) => Err(ExecError::WorkingDir {
            path: cwd.to_owned(),
            source,
        }),
    }
}

/// Finds the program as `exec` would: a name containing `/` is a path (relative to `cwd`);
/// anything else is searched in `PATH`. Done up front so that a missing program is a clear
/// error rather than exit code 127 from the start gate's `exec`.
fn resolve_program(
    program: &str,
    cwd: &Path,
    env: &[(String, String)],
) -> Result<PathBuf, ExecError> {
    if program.is_empty() {
        return Err(ExecError::EmptyArgv);
    }
    if program.contains('/') {
        let path = cwd.join(program);
        return if is_executable_file(&path) {
            Ok(path)
        } else {
            Err(ExecError::NotExecutable { path })
        };
    }
    let path_var: OsString = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| OsString::from(v))
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_else(|| OsString::from(DEFAULT_PATH));
    std::env::split_paths(&path_var)
        .map(|dir| cwd.join(dir).join(program))
        .find(|candidate| is_executable_file(candidate))
        .ok_or_else(|| ExecError::ProgramNotFound {
            program: program.to_owned(),
        })
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

async fn open_log(path: &Path) -> Result<BufWriter<File>, ExecError> {
    let log_error = |source| ExecError::Log {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(parent).await.map_err(log_error)?;
    }
    let file = File::create(path).await.map_err(log_error)?;
    Ok(BufWriter::new(file))
}

/// Spawns the start gate wrapping `spec.argv`, as the leader of a new process group.
fn spawn_gated(spec: &ExecSpec, program: &str) -> Result<(Child, i32), ExecError> {
    let spawn_error = |source| ExecError::Spawn {
        program: program.to_owned(),
        source,
    };
    let mut command = Command::new(GATE_SHELL);
    command.arg("-c");
    match &spec.stdin_file {
        Some(file) => command
            .arg(GATE_SCRIPT_STDIN_FILE)
            .env("ERRAND_STDIN_FILE", file),
        None => command.arg(GATE_SCRIPT),
    };
    let child = command
        .arg(GATE_ARG0)
        .args(&spec.argv)
        .current_dir(&spec.cwd)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_error)?;
    // The group id is the leader's pid, known until the child is reaped, which it cannot be yet.
    let pgid = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .ok_or_else(|| spawn_error(io::Error::other("the new process has no pid")))?;
    Ok((child, pgid))
}

/// Lets the program run. If the wrapper is already gone (killed from outside), supervision sees
/// its exit; there is nothing else to do here.
async fn open_gate(child: &mut Child, pgid: i32) {
    if let Some(mut stdin) = child.stdin.take()
        && let Err(e) = stdin.write_all(GATE_OPEN).await
    {
        warn!(pgid, error = %e, "could not open the start gate; the process is gone");
    }
}

/// Why supervision stopped the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    TimedOut,
    Cancelled,
}

/// Reads both pipes until they close, handles the timeout and cancellation, and reaps the main
/// process.
async fn supervise(
    mut child: Child,
    pgid: i32,
    spec: &ExecSpec,
    cancel: &CancellationToken,
    mut sink: OutputSink,
    spawned_at: Instant,
) -> ExecOutcome {
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut out_buf = vec![0u8; READ_BUFFER_BYTES];
    let mut err_buf = vec![0u8; READ_BUFFER_BYTES];
    let mut out_utf8 = Utf8Decoder::default();
    let mut err_utf8 = Utf8Decoder::default();

    let deadline = Instant::now() + spec.timeout;
    let mut stop: Option<StopReason> = None;
    let mut exited = false;
    let mut status: Option<ExitStatus> = None;
    // When to SIGKILL the group, and when to stop waiting for the pipes; set once the attempt is
    // ending (stop requested, or the main process exited with the pipes still open).
    let mut kill_at: Option<Instant> = None;
    let mut give_up_at: Option<Instant> = None;

    loop {
        if exited && stdout.is_none() && stderr.is_none() {
            break;
        }
        let flush_due = sink.flush_deadline();
        tokio::select! {
            biased;
            () = cancel.cancelled(), if stop.is_none() && !exited => {
                info!(pgid, "cancelled; terminating the process group");
                stop = Some(StopReason::Cancelled);
                (kill_at, give_up_at) = begin_termination(pgid);
            }
            () = sleep_until(deadline), if stop.is_none() && !exited => {
                info!(pgid, timeout = ?spec.timeout, "timed out; terminating the process group");
                stop = Some(StopReason::TimedOut);
                (kill_at, give_up_at) = begin_termination(pgid);
            }
            () = sleep_until_opt(kill_at) => {
                debug!(pgid, "killing the process group");
                signal_group(pgid, Signal::SIGKILL);
                kill_at = None;
            }
            () = sleep_until_opt(give_up_at) => {
                warn!(
                    pgid,
                    "output pipes still open after the process group was killed; \
                     a process that left the group holds them; not waiting any longer"
                );
                break;
            }
            read = read_opt(&mut stdout, &mut out_buf) => {
                on_read(read, &mut stdout, &out_buf, &mut out_utf8, &mut sink, "stdout").await;
            }
            read = read_opt(&mut stderr, &mut err_buf) => {
                on_read(read, &mut stderr, &err_buf, &mut err_utf8, &mut sink, "stderr").await;
            }
            () = sleep_until_opt(flush_due) => {
                sink.flush_due(Instant::now()).await;
            }
            waited = child.wait(), if !exited => {
                exited = true;
                match waited {
                    Ok(s) => status = Some(s),
                    Err(e) => warn!(pgid, error = %e, "could not collect the exit status"),
                }
                let pipes_open = stdout.is_some() || stderr.is_some();
                if pipes_open && kill_at.is_none() && give_up_at.is_none() {
                    // The main process is done but something it started still holds the pipes.
                    let now = Instant::now();
                    kill_at = Some(now + LINGER_GRACE);
                    give_up_at = Some(now + LINGER_GRACE + DRAIN_GRACE);
                }
            }
        }
    }

    // Finish: decode what is left, reap, sweep the group, send the last text.
    for decoder in [&mut out_utf8, &mut err_utf8] {
        let mut text = String::new();
        decoder.finish(&mut text);
        sink.push_text(&text, Instant::now());
    }
    if !exited {
        match timeout(REAP_GRACE, child.wait()).await {
            Ok(Ok(s)) => status = Some(s),
            Ok(Err(e)) => warn!(pgid, error = %e, "could not collect the exit status"),
            Err(_) => warn!(pgid, "the main process was not reaped in time; leaving it"),
        }
    }
    // Whatever the main process left in its group does not outlive the attempt. The leader is
    // reaped, so this group id is only reused if the pid wraps around in these microseconds.
    signal_group(pgid, Signal::SIGKILL);
    let (tail, total_bytes, log_complete) = sink.finish().await;

    ExecOutcome {
        exit_code: status.and_then(|s| s.code()).map(i64::from),
        signal: status.and_then(|s| s.signal()),
        timed_out: stop == Some(StopReason::TimedOut),
        cancelled: stop == Some(StopReason::Cancelled),
        tail,
        total_bytes,
        duration: spawned_at.elapsed(),
        log_complete,
    }
}

/// SIGTERM now; returns when to SIGKILL and when to stop waiting for the pipes.
fn begin_termination(pgid: i32) -> (Option<Instant>, Option<Instant>) {
    signal_group(pgid, Signal::SIGTERM);
    let now = Instant::now();
    (Some(now + TERM_GRACE), Some(now + TERM_GRACE + DRAIN_GRACE))
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reads from a pipe that is still open; never completes for a closed one.
async fn read_opt<R: AsyncRead + Unpin>(
    reader: &mut Option<R>,
    buf: &mut [u8],
) -> io::Result<usize> {
    match reader {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn on_read<R>(
    read: io::Result<usize>,
    reader: &mut Option<R>,
    buf: &[u8],
    decoder: &mut Utf8Decoder,
    sink: &mut OutputSink,
    stream: &'static str,
) {
    let mut text = String::new();
    match read {
        Ok(0) => {
            *reader = None;
            decoder.finish(&mut text);
        }
        Ok(n) => {
            let bytes = &buf[..n];
            sink.write_raw(bytes).await;
            decoder.decode(bytes, &mut text);
        }
        Err(e) => {
            warn!(stream, error = %e, "reading output failed; closing the stream");
            *reader = None;
            decoder.finish(&mut text);
        }
    }
    sink.push_text(&text, Instant::now());
}

/// Signals a process group, refusing ids that would reach beyond one foreign group.
fn signal_group(pgid: i32, signal: Signal) -> bool {
    // killpg(0) is our own group and killpg(1) is kill(-1): every process we may signal.
    if pgid <= 1 || pgid == getpgrp().as_raw() {
        warn!(pgid, "refusing to signal this process group");
        return false;
    }
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) => true,
        Err(Errno::ESRCH) => false,
        Err(e) => {
            warn!(pgid, %signal, error = %e, "could not signal the process group");
            false
        }
    }
}

/// Kills the group if `run` is dropped mid-attempt (`kill_on_drop` alone reaches only the
/// leader).
struct GroupGuard {
    pgid: i32,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, Signal::SIGKILL);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Output: log file, stream, tail
// ---------------------------------------------------------------------------------------------

/// Where the output goes: every byte to the log, decoded text to the stream and the tail.
struct OutputSink {
    log: Option<BufWriter<File>>,
    log_path: PathBuf,
    log_complete: bool,
    /// When the log is flushed and waiting text offered again; set by the first write after
    /// the last flush.
    flush_at: Option<Instant>,
    stream: TextStream,
    tail: Tail,
    total_bytes: u64,
}

impl OutputSink {
    fn new(log: BufWriter<File>, spec: &ExecSpec, output: mpsc::Sender<String>) -> Self {
        Self {
            log: Some(log),
            log_path: spec.log_path.clone(),
            log_complete: true,
            flush_at: None,
            stream: TextStream::new(output),
            tail: Tail::new(spec.tail_bytes),
            total_bytes: 0,
        }
    }

    async fn write_raw(&mut self, bytes: &[u8]) {
        self.total_bytes += bytes.len() as u64;
        self.flush_at
            .get_or_insert_with(|| Instant::now() + FLUSH_INTERVAL);
        if let Some(log) = &mut self.log
            && let Err(e) = log.write_all(bytes).await
        {
            self.log_failed(&e);
        }
    }

    fn push_text(&mut self, text: &str, now: Instant) {
        if text.is_empty() {
            return;
        }
        self.stream.push(text);
        if self.stream.waiting() {
            self.flush_at.get_or_insert(now + FLUSH_INTERVAL);
        }
        self.tail.push(text);
    }

    fn flush_deadline(&self) -> Option<Instant> {
        self.flush_at
    }

    /// The flush interval passed: offer waiting text again, and let the log file catch up so
    /// it can be followed live.
    async fn flush_due(&mut self, now: Instant) {
        self.stream.flush();
        self.flush_log().await;
        self.flush_at = self.stream.waiting().then_some(now + FLUSH_INTERVAL);
    }

    async fn flush_log(&mut self) {
        if let Some(log) = &mut self.log
            && let Err(e) = log.flush().await
        {
            self.log_failed(&e);
        }
    }

    fn log_failed(&mut self, e: &io::Error) {
        warn!(
            path = %self.log_path.display(),
            error = %e,
            "writing the log file failed; the rest of the output is not logged"
        );
        self.log = None;
        self.log_complete = false;
    }

    /// Sends the last text (waiting a bounded time for room) and closes the log. Returns the
    /// tail, the byte count and whether the log is complete.
    async fn finish(mut self) -> (String, u64, bool) {
        self.flush_log().await;
        if let Some(log) = &mut self.log
            && let Err(e) = log.get_mut().sync_data().await
        {
            self.log_failed(&e);
        }
        self.stream.finish(FINAL_SEND_TIMEOUT).await;
        (self.tail.finish(), self.total_bytes, self.log_complete)
    }
}

/// Hands decoded text to the caller as it is read, never waiting for it. The caller (the
/// runner's `OutputPlan`) groups it into `output` events; this only holds what the channel had
/// no room for, up to [`MAX_PENDING_BYTES`], and beyond that drops the oldest with a notice
/// (the log file keeps everything).
struct TextStream {
    tx: mpsc::Sender<String>,
    /// Text the channel had no room for yet, oldest first.
    pending: String,
    /// Bytes dropped from the front of `pending` since the last notice about it.
    skipped: u64,
    /// The receiver is gone: text is discarded.
    closed: bool,
}

impl TextStream {
    fn new(tx: mpsc::Sender<String>) -> Self {
        Self {
            tx,
            pending: String::new(),
            skipped: 0,
            closed: false,
        }
    }

    fn push(&mut self, text: &str) {
        if self.closed || text.is_empty() {
            return;
        }
        self.pending.push_str(text);
        self.flush();
        if self.pending.len() > MAX_PENDING_BYTES {
            // The consumer is behind. Keep the newest half so the cap is not hit on every push.
            let cut = ceil_char_boundary(&self.pending, self.pending.len() - MAX_PENDING_BYTES / 2);
            self.pending.drain(..cut);
            self.skipped += cut as u64;
        }
    }

    /// True while text (or a notice) waits for room in the channel.
    fn waiting(&self) -> bool {
        !self.closed && (self.skipped > 0 || !self.pending.is_empty())
    }

    /// Sends the notice, then the waiting text, as far as the channel has room.
    fn flush(&mut self) {
        while !self.closed {
            let Some((text, is_notice)) = self.next() else {
                break;
            };
            match self.tx.try_send(text) {
                Ok(()) if is_notice => self.skipped = 0,
                Ok(()) => {}
                Err(TrySendError::Full(text)) => {
                    if !is_notice {
                        self.pending = text;
                    }
                    break;
                }
                Err(TrySendError::Closed(_)) => self.close(),
            }
        }
    }

    /// The next text to send, and whether it is the skipped-output notice (which goes first).
    /// Waiting text is taken out of `pending`; a failed send puts it back.
    fn next(&mut self) -> Option<(String, bool)> {
        if self.skipped > 0 {
            let notice = format!(
                "\n[errand: {} bytes of output were not streamed because the reader fell \
                 behind; the log file has them]\n",
                self.skipped
            );
            return Some((notice, true));
        }
        (!self.pending.is_empty()).then(|| (std::mem::take(&mut self.pending), false))
    }

    fn close(&mut self) {
        debug!("output receiver dropped; output now only goes to the log file");
        self.closed = true;
        self.pending.clear();
        self.skipped = 0;
    }

    /// Sends everything waiting, waiting for room for at most `limit` in total.
    async fn finish(&mut self, limit: Duration) {
        let give_up = Instant::now() + limit;
        while !self.closed {
            let Some((text, is_notice)) = self.next() else {
                return;
            };
            let len = text.len();
            match tokio::time::timeout_at(give_up, self.tx.send(text)).await {
                Ok(Ok(())) if is_notice => self.skipped = 0,
                Ok(Ok(())) => {}
                Ok(Err(_)) => self.close(),
                Err(_) => {
                    warn!(
                        bytes = len,
                        "output receiver is not reading; the last output is only in the log file"
                    );
                    return;
                }
            }
        }
    }
}

/// The end of the output, cut at character boundaries.
struct Tail {
    text: String,
    max_bytes: usize,
}

impl Tail {
    fn new(max_bytes: usize) -> Self {
        Self {
            text: String::new(),
            max_bytes,
        }
    }

    fn push(&mut self, text: &str) {
        self.text.push_str(text);
        // Trim only once twice the size, so pushing stays amortised O(1) per byte.
        if self.text.len() > self.max_bytes.saturating_mul(2) {
            self.trim();
        }
    }

    fn trim(&mut self) {
        if self.text.len() > self.max_bytes {
            let cut = ceil_char_boundary(&self.text, self.text.len() - self.max_bytes);
            self.text.drain(..cut);
        }
    }

    fn finish(mut self) -> String {
        self.trim();
        self.text
    }
}

/// Decodes one stream's bytes as UTF-8 across read boundaries; invalid bytes become U+FFFD.
#[derive(Default)]
struct Utf8Decoder {
    /// The start of a character whose remaining bytes have not arrived yet (at most 3 bytes).
    carry: Vec<u8>,
}

impl Utf8Decoder {
    fn decode(&mut self, chunk: &[u8], out: &mut String) {
        let joined;
        let mut input: &[u8] = if self.carry.is_empty() {
            chunk
        } else {
            self.carry.extend_from_slice(chunk);
            joined = std::mem::take(&mut self.carry);
            &joined
        };
        loop {
            match std::str::from_utf8(input) {
                Ok(text) => {
                    out.push_str(text);
                    return;
                }
                Err(e) => {
                    let (valid, rest) = input.split_at(e.valid_up_to());
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            input = &rest[bad..];
                        }
                        None => {
                            self.carry.extend_from_slice(rest);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// The stream ended: a dangling partial character becomes U+FFFD.
    fn finish(&mut self, out: &mut String) {
        if !self.carry.is_empty() {
            out.push_str(&String::from_utf8_lossy(&self.carry));
            self.carry.clear();
        }
    }
}

/// The smallest character boundary at or after `index` (or the end).
fn ceil_char_boundary(s: &str, mut index: usize) -> usize {
    while index < s.len() && !s.is_char_boundary(index) {
        index += 1;
    }
    index.min(s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Generous bound for anything that should take a few seconds, on a slow 2-core machine.
    const SLOW_MACHINE_BOUND: Duration = Duration::from_secs(30);

    fn shell_spec(dir: &Path, script: &str) -> ExecSpec {
        ExecSpec::new(
            ExecutorConfig::shell().argv(script).unwrap(),
            dir,
            dir.join("logs").join("attempt.log"),
            Duration::from_secs(60),
        )
    }

    fn record_nothing(_pgid: i32) -> Result<(), io::Error> {
        Ok(())
    }

    /// Runs `spec` with a consumer that keeps up; returns the outcome and the batches received.
    async fn run_collecting(
        spec: ExecSpec,
        cancel: CancellationToken,
    ) -> (Result<ExecOutcome, ExecError>, Vec<String>) {
        let (tx, mut rx) = mpsc::channel(64);
        let collector = tokio::spawn(async move {
            let mut batches = Vec::new();
            while let Some(batch) = rx.recv().await {
                batches.push(batch);
            }
            batches
        });
        let result = run(spec, cancel, record_nothing, tx).await;
        (result, collector.await.unwrap())
    }

    /// Whether `pid` is gone (or a zombie waiting for init), polling for up to 10 s.
    async fn wait_until_gone(pid: i32) -> bool {
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            let gone = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => true,
                Ok(stat) => stat
                    .rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            };
            if gone || Instant::now() > give_up {
                return gone;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn read_pid(path: &Path) -> i32 {
        std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn stdout_and_stderr_reach_batches_tail_and_log() {
        let dir = tempfile::tempdir().unwrap();
        let spec = shell_spec(dir.path(), "echo out; echo err >&2");
        let log_path = spec.log_path.clone();
        let (result, batches) = run_collecting(spec, CancellationToken::new()).await;
        let outcome = result.unwrap();
        assert_eq!(outcome.exit_code, Some(0));
        assert_eq!(outcome.signal, None);
        assert!(outcome.succeeded());
        assert!(outcome.log_complete);
        assert_eq!(outcome.total_bytes, 8);
        let streamed = batches.concat();
        for text in [&streamed, &outcome.tail] {
            assert!(text.contains("out\n") && text.contains("err\n"), "{text:?}");
        }
        let logged = std::fs::read_to_string(log_path).unwrap();
        assert!(
            logged.contains("out\n") && logged.contains("err\n"),
            "{logged:?}"
        );
    }

    #[test]
    fn run_can_be_spawned_on_a_multi_threaded_runtime() {
        fn assert_send<T: Send>(_: &T) {}
        let (tx, _rx) = mpsc::channel(1);
        let spec = ExecSpec::new(vec!["true".into()], ".", "log", Duration::from_secs(1));
        let future = run(spec, CancellationToken::new(), record_nothing, tx);
        assert_send(&future);
    }

    #[tokio::test]
    async fn exit_code_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (result, _) =
            run_collecting(shell_spec(dir.path(), "exit 3"), CancellationToken::new()).await;
        let outcome = result.unwrap();
        assert_eq!(outcome.exit_code, Some(3));
        assert!(!outcome.succeeded());
    }

    #[test]
    fn attachments_become_one_argument_each_where_the_template_says() {
        let executor = command(&[
            "tool",
            "--thread",
            "{thread_file}",
            "{attachments}",
            "--",
            "{instruction}",
        ]);
        let files = [
            "/w/t/attachments/a b.txt".to_owned(),
            "/w/t/attachments/c".to_owned(),
        ];
        assert_eq!(
            executor
                .argv_with_thread("{attachments} $(x)", "/l/t.md", &files)
                .unwrap(),
            [
                "tool",
                "--thread",
                "/l/t.md",
                "/w/t/attachments/a b.txt",
                "/w/t/attachments/c",
                "--",
                "{attachments} $(x)",
            ]
        );
        // No attachments: no argument at all, not an empty one.
        assert_eq!(
            executor.argv_with_thread("hi", "/l/t.md", &[]).unwrap(),
            ["tool", "--thread", "/l/t.md", "--", "hi"]
        );
    }

    #[test]
    fn an_attachments_placeholder_must_be_an_element_of_its_own() {
        for argv in [
            &["tool", "--files={attachments}", "{instruction}"][..],
            &["{attachments}", "{instruction}"],
            &["tool", "{instruction} {attachments}"],
        ] {
            let argv: Vec<String> = argv.iter().map(|a| (*a).to_owned()).collect();
            let refused = ExecutorConfig::new("t", ExecutorKind::Command { argv }).unwrap_err();
            assert!(
                matches!(refused, ExecutorConfigError::AttachmentsNotAlone { .. }),
                "{refused:?}"
            );
            assert!(refused.to_string().contains("argv element of its own"));
        }
    }

    #[tokio::test]
    async fn instruction_in_a_command_template_stays_literal_text() {
        let dir = tempfile::tempdir().unwrap();
        let executor = ExecutorConfig::new(
            "printer",
            ExecutorKind::Command {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    r#"printf %s "$1""#.into(),
                    "sh".into(),
                    INSTRUCTION_PLACEHOLDER.into(),
                ],
            },
        )
        .unwrap();
        let instruction = "$(touch pwned) `touch pwned2`; touch pwned3";
        let spec = ExecSpec::new(
            executor.argv(instruction).unwrap(),
            dir.path(),
            dir.path().join("attempt.log"),
            Duration::from_secs(60),
        );
        let (result, batches) = run_collecting(spec, CancellationToken::new()).await;
        assert_eq!(result.unwrap().exit_code, Some(0));
        assert_eq!(batches.concat(), instruction);
        for name in ["pwned", "pwned2", "pwned3"] {
            assert!(!dir.path().join(name).exists(), "{name} was created");
        }
    }

    fn command(argv: &[&str]) -> ExecutorConfig {
        let argv = argv.iter().map(|a| (*a).to_owned()).collect();
        ExecutorConfig::new("sort", ExecutorKind::Command { argv }).unwrap()
    }

    #[test]
    fn an_instruction_starting_with_a_dash_is_refused_where_it_would_be_an_option() {
        // Root cause: the template was filled argument by argument with no regard for where the
        // program parses options, so ["sort", "{instruction}"] ran `sort -o/path` and wrote a
        // file the instruction chose.
        for template in [
            &["sort", "{instruction}"][..],
            &["sort", "-r", "{instruction}"],
            &["sort", "{instruction} please"],
            &["sort", "{instruction}", "--", "x"],
        ] {
            let err = command(template).argv("-o/tmp/x").unwrap_err();
            assert!(
                matches!(&err, ArgvError::LooksLikeOption { executor, program }
                    if executor == "sort" && program == "sort"),
                "{template:?}: {err:?}"
            );
            let message = err.to_string();
            assert!(message.contains("starts with '-'"), "{message}");
            assert!(
                message.contains(r#"add "--" before {instruction}"#),
                "{message}"
            );
        }
    }

    #[test]
    fn an_instruction_starting_with_a_dash_passes_after_double_dash_or_inside_an_argument() {
        assert_eq!(
            command(&["sort", "--", "{instruction}"])
                .argv("-o/tmp/x")
                .unwrap(),
            ["sort", "--", "-o/tmp/x"]
        );
        assert_eq!(
            command(&["sort", "--key={instruction}"])
                .argv("-o/tmp/x")
                .unwrap(),
            ["sort", "--key=-o/tmp/x"]
        );
        // Instructions that do not start with '-' are filled in as before.
        assert_eq!(
            command(&["sort", "{instruction}"]).argv("a -o b").unwrap(),
            ["sort", "a -o b"]
        );
        assert_eq!(
            ExecutorConfig::shell().argv("-o/tmp/x").unwrap(),
            ["sh", "-c", "--", "-o/tmp/x"]
        );
    }

    #[tokio::test]
    async fn the_shell_executor_runs_an_instruction_starting_with_a_dash_as_a_command() {
        let dir = tempfile::tempdir().unwrap();
        // Without "--", sh would take "-x" as its option and the script as missing.
        let (result, batches) = run_collecting(
            shell_spec(dir.path(), "-x 2>/dev/null; echo ran"),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(result.unwrap().exit_code, Some(0));
        assert_eq!(batches.concat(), "ran\n");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group_including_grandchildren() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = shell_spec(dir.path(), "sleep 60 & echo $! > child.pid; wait");
        spec.timeout = Duration::from_secs(1);
        let begun = Instant::now();
        let (result, _) = run_collecting(spec, CancellationToken::new()).await;
        let outcome = result.unwrap();
        assert!(
            begun.elapsed() < SLOW_MACHINE_BOUND,
            "{:?}",
            begun.elapsed()
        );
        assert!(outcome.timed_out);
        assert!(!outcome.cancelled);
        assert_eq!(outcome.exit_code, None);
        assert!(outcome.signal.is_some());
        let grandchild = read_pid(&dir.path().join("child.pid"));
        assert!(
            wait_until_gone(grandchild).await,
            "grandchild {grandchild} survived"
        );
    }

    #[tokio::test]
    async fn background_process_holding_the_pipes_does_not_hang_run() {
        let dir = tempfile::tempdir().unwrap();
        let spec = shell_spec(dir.path(), "sleep 60 & echo $! > child.pid; echo done");
        let begun = Instant::now();
        let (result, batches) = run_collecting(spec, CancellationToken::new()).await;
        let outcome = result.unwrap();
        assert!(
            begun.elapsed() < SLOW_MACHINE_BOUND,
            "{:?}",
            begun.elapsed()
        );
        assert_eq!(outcome.exit_code, Some(0));
        assert!(!outcome.timed_out);
        assert_eq!(batches.concat(), "done\n");
        let grandchild = read_pid(&dir.path().join("child.pid"));
        assert!(
            wait_until_gone(grandchild).await,
            "grandchild {grandchild} survived"
        );
    }

    #[tokio::test]
    async fn cancel_stops_a_long_sleep_quickly() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let canceller = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            canceller.cancel();
        });
        let begun = Instant::now();
        let (result, _) = run_collecting(shell_spec(dir.path(), "sleep 60"), cancel).await;
        let outcome = result.unwrap();
        assert!(
            begun.elapsed() < Duration::from_secs(5),
            "{:?}",
            begun.elapsed()
        );
        assert!(outcome.cancelled);
        assert!(!outcome.timed_out);
        assert!(!outcome.succeeded());
    }

    #[tokio::test]
    async fn cancelled_before_spawn_runs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let (tx, _rx) = mpsc::channel(1);
        let outcome = run(
            shell_spec(dir.path(), "touch ran"),
            cancel,
            |_| Err(io::Error::other("on_spawn must not be called")),
            tx,
        )
        .await
        .unwrap();
        assert!(outcome.cancelled);
        assert!(!dir.path().join("ran").exists());
    }

    #[tokio::test]
    async fn failed_record_kills_the_process_before_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let mut recorded = None;
        let err = run(
            shell_spec(dir.path(), "touch ran"),
            CancellationToken::new(),
            |pgid| {
                recorded = Some(pgid);
                Err(io::Error::other("ledger is read-only"))
            },
            tx,
        )
        .await
        .unwrap_err();
        let pgid = recorded.unwrap();
        assert!(matches!(err, ExecError::Record { pgid: p, .. } if p == pgid));
        assert!(!process_group_alive(pgid));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!dir.path().join("ran").exists(), "the program ran");
    }

    #[tokio::test]
    async fn slow_lines_reach_the_consumer_as_they_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let script = "i=0; while [ $i -lt 100 ]; do echo line $i; i=$((i+1)); sleep 0.01; done";
        let (result, pieces) =
            run_collecting(shell_spec(dir.path(), script), CancellationToken::new()).await;
        assert_eq!(result.unwrap().exit_code, Some(0));
        let expected: String = (0..100).map(|i| format!("line {i}\n")).collect();
        assert_eq!(pieces.concat(), expected);
        // Not held back for grouping: that is the runner's `OutputPlan`'s job.
        assert!(pieces.len() > 1, "{} pieces", pieces.len());
    }

    #[tokio::test]
    async fn fast_output_reaches_a_consumer_that_keeps_up_whole() {
        let dir = tempfile::tempdir().unwrap();
        let spec = shell_spec(
            dir.path(),
            "yes abcdefghijklmnopqrstuvwxyz | head -c 102400",
        );
        let (result, pieces) = run_collecting(spec, CancellationToken::new()).await;
        let outcome = result.unwrap();
        assert_eq!(outcome.exit_code, Some(0));
        assert_eq!(outcome.total_bytes, 102_400);
        assert_eq!(outcome.tail.len(), DEFAULT_TAIL_BYTES);
        assert_eq!(
            pieces.concat(),
            "abcdefghijklmnopqrstuvwxyz\n".repeat(4000)[..102_400]
        );
    }

    #[tokio::test]
    async fn a_consumer_that_does_not_read_never_blocks_the_child() {
        let dir = tempfile::tempdir().unwrap();
        let spec = shell_spec(dir.path(), "head -c 1048576 /dev/zero | tr '\\0' x");
        let log_path = spec.log_path.clone();
        let (tx, mut rx) = mpsc::channel(2);
        let begun = Instant::now();
        let outcome = run(spec, CancellationToken::new(), record_nothing, tx)
            .await
            .unwrap();
        assert!(
            begun.elapsed() < SLOW_MACHINE_BOUND,
            "{:?}",
            begun.elapsed()
        );
        assert_eq!(outcome.exit_code, Some(0));
        assert_eq!(outcome.total_bytes, 1_048_576);
        assert!(outcome.log_complete);
        assert_eq!(std::fs::metadata(log_path).unwrap().len(), 1_048_576);
        let mut received = 0;
        while let Some(piece) = rx.recv().await {
            assert!(piece.len() <= MAX_PENDING_BYTES);
            received += piece.len();
        }
        assert!(received < 1_048_576);
    }

    #[test]
    fn the_stream_drops_the_oldest_text_with_a_notice_when_the_consumer_lags() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut stream = TextStream::new(tx);
        let piece = "a".repeat(8 * 1024);
        for _ in 0..75 {
            stream.push(&piece);
        }
        assert!(stream.pending.len() <= MAX_PENDING_BYTES);
        assert!(stream.skipped > 0 && stream.waiting());
        // The first piece went at once; the rest waited.
        assert_eq!(rx.try_recv().unwrap().len(), 8 * 1024);
        stream.flush();
        let notice = rx.try_recv().unwrap();
        assert!(notice.contains("not streamed"), "{notice:?}");
        let waiting = stream.pending.len();
        stream.flush();
        assert_eq!(rx.try_recv().unwrap().len(), waiting);
        assert!(!stream.waiting());
    }

    #[test]
    fn the_stream_drops_text_at_a_character_boundary() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut stream = TextStream::new(tx);
        stream.push("x");
        // 300,000 bytes of three-byte characters while the channel is full: the cut at the
        // cap's half falls inside one unless it is moved to a boundary (draining there panics).
        let text = "€".repeat(100_000);
        assert_ne!((text.len() - MAX_PENDING_BYTES / 2) % 3, 0);
        stream.push(&text);
        assert!(stream.pending.starts_with('€') && stream.pending.len() <= MAX_PENDING_BYTES);
        assert_eq!(
            stream.skipped + stream.pending.len() as u64,
            text.len() as u64
        );
        assert_eq!(rx.try_recv().unwrap(), "x");
    }

    #[test]
    fn decoder_joins_characters_split_across_reads_and_replaces_invalid_bytes() {
        let mut decoder = Utf8Decoder::default();
        let mut out = String::new();
        let bytes = "héllo €".as_bytes();
        for byte in bytes {
            decoder.decode(std::slice::from_ref(byte), &mut out);
        }
        assert_eq!(out, "héllo €");
        out.clear();
        decoder.decode(b"a\xffb\xe2\x82", &mut out);
        assert_eq!(out, "a\u{FFFD}b");
        decoder.finish(&mut out);
        assert_eq!(out, "a\u{FFFD}b\u{FFFD}");
    }

    #[test]
    fn tail_keeps_the_end_at_a_character_boundary() {
        // Six bytes back from the end falls inside a "€", so the tail starts after it.
        let mut tail = Tail::new(6);
        for _ in 0..10 {
            tail.push("ab€");
        }
        assert_eq!(tail.finish(), "ab€");
    }

    #[test]
    fn process_group_helpers_find_and_kill_a_group() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = i32::try_from(child.id()).unwrap();
        assert!(process_group_alive(pgid));
        assert!(kill_process_group(pgid));
        child.wait().unwrap();
        assert!(!process_group_alive(pgid));
        assert!(!kill_process_group(pgid));
    }

    #[test]
    fn kill_process_group_refuses_special_and_own_groups() {
        for pgid in [-1, 0, 1, getpgrp().as_raw()] {
            assert!(!kill_process_group(pgid), "{pgid}");
        }
        assert!(!process_group_alive(0));
    }

    #[tokio::test]
    async fn missing_program_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ExecSpec::new(
            vec!["errand-no-such-program".into(), "x".into()],
            dir.path(),
            dir.path().join("attempt.log"),
            Duration::from_secs(60),
        );
        let (result, _) = run_collecting(spec, CancellationToken::new()).await;
        let err = result.unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"executor program "errand-no-such-program" not found in PATH"#
        );
    }

    #[tokio::test]
    async fn unwritable_log_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), "").unwrap();
        let mut spec = shell_spec(dir.path(), "touch ran");
        spec.log_path = dir.path().join("file").join("attempt.log");
        let (result, _) = run_collecting(spec, CancellationToken::new()).await;
        let err = result.unwrap_err();
        assert!(matches!(err, ExecError::Log { .. }), "{err:?}");
        assert!(err.to_string().starts_with("cannot create log file"));
        assert!(!dir.path().join("ran").exists());
    }

    #[test]
    fn executors_parse_from_toml() {
        #[derive(Deserialize)]
        struct Config {
            executors: Vec<ExecutorConfig>,
        }
        let config: Config = toml::from_str(
            r#"
            [[executors]]
            name = "claude"
            kind = "command"
            argv = ["claude", "-p", "{instruction}"]

            [[executors]]
            name = "shell"
            kind = "shell"
            "#,
        )
        .unwrap();
        let [claude, shell] = &config.executors[..] else {
            panic!("two executors expected");
        };
        assert_eq!(claude.name(), "claude");
        assert_eq!(
            claude.argv("fix $(it)").unwrap(),
            ["claude", "-p", "fix $(it)"]
        );
        assert_eq!(shell, &ExecutorConfig::default());
        assert_eq!(shell.argv("ls").unwrap(), ["sh", "-c", "--", "ls"]);
    }

    #[test]
    fn invalid_executor_configs_are_refused_with_a_reason() {
        let cases = [
            (
                r#"name = "x"
kind = "command"
argv = []"#,
                "argv is empty",
            ),
            (
                r#"name = "x"
kind = "command"
argv = ["", "{instruction}"]"#,
                "program (the first argv element) is empty",
            ),
            (
                r#"name = "x"
kind = "command"
argv = ["{instruction}"]"#,
                "must be fixed",
            ),
            (
                r#"name = "x"
kind = "command"
argv = ["claude", "-p"]"#,
                "no argv element contains {instruction}",
            ),
            (
                r#"name = "x"
kind = "command""#,
                "needs an argv",
            ),
            (
                r#"name = "x"
kind = "shell"
argv = ["sh"]"#,
                "only used with kind",
            ),
            (
                r#"name = " "
kind = "shell""#,
                "name is empty",
            ),
            (
                r#"name = "x"
kind = "shell"
shell = "bash""#,
                "unknown field",
            ),
        ];
        for (text, reason) in cases {
            let err = toml::from_str::<ExecutorConfig>(text).unwrap_err();
            assert!(err.to_string().contains(reason), "{text}: {err}");
        }
    }
}
