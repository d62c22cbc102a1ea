//! The desktop's configuration: a TOML file in the home, overridden by flags on `run`.
//!
//! - [`config_path`] is where the file lives (`errand-desktop config --path` prints it). A
//!   missing file means every default; `run` writes a commented template the first time.
//! - [`Settings::load`] parses the file, applies [`Overrides`] from the command line, and checks
//!   every value. A bad file is an error that names the file, the line and the key: serde's
//!   errors carry toml's spans, which become line numbers here.
//! - Every setting is optional:
//!
//! ```toml
//! workspace = "~/errand-workspace"   # where tasks run (default: <home>/workspace)
//! approval = "ask"                   # "auto" (default) or "ask"
//! approval_expiry = "1h"             # under "ask": deny a task that waits this long
//! task_timeout = "30m"               # kill a task (its whole process group) after this
//! output_cap = "256KiB"              # output kept in the thread per task
//! thread_context = "64KiB"           # most of the thread handed over in ERRAND_THREAD
//! max_parallel = 1                   # tasks that run at once
//! max_blob_bytes = "1GiB"            # largest file a task may bring or leave
//! max_blob_storage_bytes = "10GiB"   # most bytes of files kept in the home
//!
//! [[executors]]                      # default: only `shell`
//! name = "agent"
//! kind = "command"
//! argv = ["my-agent", "--", "{instruction}"]   # "--": an instruction is never an option
//! ```

use std::{
    collections::HashSet,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use errand_core::limits::{MAX_EXECUTORS, MAX_OUTPUT_PER_TASK_BYTES};
use serde::{Deserialize, Deserializer, de};
use toml::Spanned;

use crate::executor::ExecutorConfig;

/// The config file's name inside the home.
pub const CONFIG_FILE: &str = "config.toml";

/// Default workspace, relative to the home: inside it, so that trying Errand out (or running
/// its tests) never touches the user's files until they choose a directory.
pub const DEFAULT_WORKSPACE_DIR: &str = "workspace";

/// Default task timeout: long enough for an agent to work through a real errand, short enough
/// that a hung process does not hold the (by default single) task slot for the rest of the day.
pub const DEFAULT_TASK_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Shortest accepted timeout or approval expiry: below a second, the start-up of a process or
/// the round trip to a phone would be cut off.
pub const MIN_DURATION: Duration = Duration::from_secs(1);

/// Longest accepted timeout or approval expiry: 30 days. Longer is almost certainly a typo
/// (`"30d"` meant as minutes); a setting that should never fire needs no timeout at all.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// Default for [`Settings::output_cap`]: the most the document accepts per task.
pub const DEFAULT_OUTPUT_CAP: usize = MAX_OUTPUT_PER_TASK_BYTES;

/// Smallest accepted output cap: room for the tail of the output (4 KiB) plus the notice that
/// says where the full log is.
pub const MIN_OUTPUT_CAP: usize = 8 * 1024;

/// Default for [`Settings::thread_context`]: 64 KiB is roughly 16k tokens, a fair share of an
/// agent's context window for the conversation so far.
pub const DEFAULT_THREAD_CONTEXT: usize = 64 * 1024;

/// Smallest accepted thread context: one short earlier task with its result.
pub const MIN_THREAD_CONTEXT: usize = 1024;

/// Largest accepted thread context: 16 MiB is far beyond any agent's context window.
pub const MAX_THREAD_CONTEXT: usize = 16 << 20;

/// Most tasks that may run at once. Each one is a process tree and an open log; 64 is more than
/// any workstation wants, and bounds what a config typo can start.
pub const MAX_PARALLEL: usize = 64;

/// Smallest accepted `max_blob_bytes` and `max_blob_storage_bytes`: 1 KiB. Less would refuse
/// every file worth sending, which is more likely a typo (a missing unit) than a wish.
pub const MIN_BLOB_CAP: usize = 1024;

/// Largest accepted `max_blob_bytes` and `max_blob_storage_bytes`: 16 TiB, past any disk a
/// desktop has; a larger number is a typo.
pub const MAX_BLOB_CAP: usize = 16 << 40;

/// The path of the config file in `home`.
pub fn config_path(home: &Path) -> PathBuf {
    home.join(CONFIG_FILE)
}

/// Whether tasks run as they arrive or wait for the phone's approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalPolicy {
    /// Run tasks as they arrive.
    #[default]
    Auto,
    /// Append `approval_requested` and wait for `approved` or `denied`.
    Ask,
}

impl ApprovalPolicy {
    /// The name used in the config file and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Ask => "ask",
        }
    }
}

/// The desktop's effective settings: defaults, then the file, then flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The directory tasks run in. Created when the runner starts.
    pub workspace: PathBuf,
    /// The executors this desktop offers, in the order it advertises them.
    pub executors: Vec<ExecutorConfig>,
    /// Run as tasks arrive, or ask first.
    pub approval: ApprovalPolicy,
    /// Under `ask`: a task waiting longer than this for an answer is denied.
    pub approval_expiry: Option<Duration>,
    /// A task running longer is killed with its whole process group.
    pub task_timeout: Duration,
    /// Output kept in the document per task, in bytes (the full log stays in the home).
    pub output_cap: usize,
    /// The most of the thread's transcript handed to an executor, in bytes.
    pub thread_context: usize,
    /// Tasks that may run at once.
    pub max_parallel: usize,
    /// The caps of the home's blob store: the largest file, and the most bytes of files.
    pub blob_caps: errand_p2p::blob::BlobCaps,
}

impl Settings {
    /// Every default, for a desktop whose home is `home`.
    pub fn defaults(home: &Path) -> Self {
        Self {
            workspace: home.join(DEFAULT_WORKSPACE_DIR),
            executors: vec![ExecutorConfig::shell()],
            approval: ApprovalPolicy::Auto,
            approval_expiry: None,
            task_timeout: DEFAULT_TASK_TIMEOUT,
            output_cap: DEFAULT_OUTPUT_CAP,
            thread_context: DEFAULT_THREAD_CONTEXT,
            max_parallel: 1,
            blob_caps: errand_p2p::blob::BlobCaps::default(),
        }
    }

    /// Reads `<home>/config.toml` (if it exists) and applies `overrides`.
    pub fn load(home: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let path = config_path(home);
        let mut settings = match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(home, &path, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::defaults(home),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        overrides.apply(home, &mut settings);
        Ok(settings)
    }

    /// Parses config text; `path` only names the file in errors.
    pub fn parse(home: &Path, path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::at(path, text, &e))?;
        let mut s = Self::defaults(home);
        if let Some(w) = raw.workspace {
            s.workspace = resolve_dir(home, &w);
        }
        if let Some(a) = raw.approval {
            s.approval = a;
        }
        s.approval_expiry = raw.approval_expiry.map(|d| d.0);
        if let Some(t) = raw.task_timeout {
            s.task_timeout = t.0;
        }
        if let Some(c) = raw.output_cap {
            s.output_cap = c.0;
        }
        if let Some(c) = raw.thread_context {
            s.thread_context = c.0;
        }
        if let Some(p) = raw.max_parallel {
            s.max_parallel = p.0;
        }
        if raw.max_blob_bytes.is_some() || raw.max_blob_storage_bytes.is_some() {
            let blob = raw
                .max_blob_bytes
                .as_ref()
                .map_or(s.blob_caps.max_blob_bytes(), |b| b.get_ref().0);
            let total = raw
                .max_blob_storage_bytes
                .as_ref()
                .map_or(s.blob_caps.max_total_bytes(), |b| b.get_ref().0);
            s.blob_caps = errand_p2p::blob::BlobCaps::new(blob, total).map_err(|e| {
                let at = raw
                    .max_blob_bytes
                    .as_ref()
                    .or(raw.max_blob_storage_bytes.as_ref())
                    .map_or(0, |b| b.span().start);
                let (line, key) = locate(text, at);
                ConfigError::Invalid {
                    path: path.to_owned(),
                    line,
                    key,
                    message: e.to_string(),
                }
            })?;
        }
        if let Some(list) = raw.executors {
            s.executors = check_executors(path, text, list)?;
        }
        Ok(s)
    }

    /// The executor named `name`, if this desktop offers it.
    pub fn executor(&self, name: &str) -> Option<&ExecutorConfig> {
        self.executors.iter().find(|e| e.name() == name)
    }

    /// The executor names, as advertised in the device record.
    pub fn executor_names(&self) -> Vec<String> {
        self.executors.iter().map(|e| e.name().to_owned()).collect()
    }
}

impl fmt::Display for Settings {
    /// The settings as TOML, for `errand-desktop config`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
        writeln!(f, "workspace = {}", q(&self.workspace.to_string_lossy()))?;
        writeln!(f, "approval = {}", q(self.approval.as_str()))?;
        match self.approval_expiry {
            Some(d) => writeln!(
                f,
                "approval_expiry = {}",
                q(&humantime::format_duration(d).to_string())
            )?,
            None => writeln!(f, "# approval_expiry: none (wait for an answer forever)")?,
        }
        writeln!(
            f,
            "task_timeout = {}",
            q(&humantime::format_duration(self.task_timeout).to_string())
        )?;
        writeln!(f, "output_cap = {}", self.output_cap)?;
        writeln!(f, "thread_context = {}", self.thread_context)?;
        writeln!(f, "max_parallel = {}", self.max_parallel)?;
        writeln!(f, "max_blob_bytes = {}", self.blob_caps.max_blob_bytes())?;
        writeln!(
            f,
            "max_blob_storage_bytes = {}",
            self.blob_caps.max_total_bytes()
        )?;
        for e in &self.executors {
            writeln!(f, "\n[[executors]]\nname = {}", q(e.name()))?;
            match e.kind() {
                crate::executor::ExecutorKind::Shell => writeln!(f, "kind = \"shell\"")?,
                crate::executor::ExecutorKind::Command { argv } => {
                    let argv: Vec<String> = argv.iter().map(|a| q(a)).collect();
                    writeln!(f, "kind = \"command\"\nargv = [{}]", argv.join(", "))?;
                    if e.stdin_thread() {
                        writeln!(f, "stdin = \"thread\"")?;
                    }
                }
                crate::executor::ExecutorKind::Acp(acp) => {
                    let list = |v: &[String]| v.iter().map(|a| q(a)).collect::<Vec<_>>().join(", ");
                    let d = |d: Duration| q(&humantime::format_duration(d).to_string());
                    writeln!(f, "kind = \"acp\"\nargv = [{}]", list(&acp.argv))?;
                    if !acp.auto_allow.is_empty() {
                        writeln!(f, "auto_allow = [{}]", list(&acp.auto_allow))?;
                    }
                    if let Some(e) = acp.permission_expiry {
                        writeln!(f, "permission_expiry = {}", d(e))?;
                    }
                    writeln!(f, "startup_timeout = {}", d(acp.startup_timeout))?;
                    writeln!(f, "idle_timeout = {}", d(acp.idle_timeout))?;
                }
            }
        }
        Ok(())
    }
}

/// Settings given as flags to `errand-desktop run`; each one wins over the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct Overrides {
    /// The directory tasks run in (config: workspace).
    #[arg(long, value_name = "DIR")]
    pub workspace: Option<PathBuf>,
    /// Run tasks as they arrive (auto) or wait for the phone's approval (ask) (config: approval).
    #[arg(long, value_enum)]
    pub approval: Option<ApprovalPolicy>,
    /// Under ask: deny a task that waits this long, e.g. 1h (config: approval_expiry).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_flag)]
    pub approval_expiry: Option<Duration>,
    /// Kill a task (its whole process group) after this long, e.g. 30m (config: task_timeout).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_flag)]
    pub task_timeout: Option<Duration>,
    /// Output kept in the thread per task, e.g. 64KiB (config: output_cap).
    #[arg(long, value_name = "BYTES", value_parser = parse_output_cap_flag)]
    pub output_cap: Option<usize>,
    /// Tasks that may run at once (config: max_parallel).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=MAX_PARALLEL as i64))]
    pub max_parallel: Option<u16>,
}

impl Overrides {
    fn apply(&self, home: &Path, s: &mut Settings) {
        if let Some(w) = &self.workspace {
            let cwd = std::env::current_dir().unwrap_or_else(|_| home.to_owned());
            s.workspace = resolve_dir(&cwd, w);
        }
        if let Some(a) = self.approval {
            s.approval = a;
        }
        if let Some(d) = self.approval_expiry {
            s.approval_expiry = Some(d);
        }
        if let Some(d) = self.task_timeout {
            s.task_timeout = d;
        }
        if let Some(c) = self.output_cap {
            s.output_cap = c;
        }
        if let Some(p) = self.max_parallel {
            s.max_parallel = usize::from(p);
        }
    }
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("cannot read the config file {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// A value in the file is malformed or out of range.
    #[error(
        "bad config file {}, line {line}{}: {message}",
        .path.display(),
        .key.as_ref().map(|k| format!(", key `{k}`")).unwrap_or_default()
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending value (or key).
        line: usize,
        /// The key, when it can be told.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    fn at(path: &Path, text: &str, e: &toml::de::Error) -> Self {
        let (line, key) = match e.span() {
            Some(span) => locate(text, span.start),
            None => (1, None),
        };
        Self::Invalid {
            path: path.to_owned(),
            line,
            key,
            message: e.message().trim().to_owned(),
        }
    }

    fn spanned(path: &Path, text: &str, span: std::ops::Range<usize>, message: String) -> Self {
        let (line, key) = locate(text, span.start);
        Self::Invalid {
            path: path.to_owned(),
            line,
            key,
            message,
        }
    }
}

/// The 1-based line of byte `offset`, and the key on that line (`key = …`), if there is one.
fn locate(text: &str, offset: usize) -> (usize, Option<String>) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_text = text[start..].lines().next().unwrap_or("");
    let key = line_text
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_owned())
        .filter(|k| !k.is_empty() && !k.starts_with('#') && !k.starts_with('['))
        .or_else(|| {
            let t = line_text.trim();
            t.starts_with('[')
                .then(|| t.trim_matches(['[', ']']).trim().to_owned())
        });
    (line, key)
}

/// Expands a leading `~/` and makes a relative path relative to `base`.
fn resolve_dir(base: &Path, p: &Path) -> PathBuf {
    if let Ok(rest) = p.strip_prefix("~")
        && let Some(home) = std::env::var_os("HOME")
    {
        return PathBuf::from(home).join(rest);
    }
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

fn check_executors(
    path: &Path,
    text: &str,
    list: Spanned<Vec<Spanned<toml::Table>>>,
) -> Result<Vec<ExecutorConfig>, ConfigError> {
    let span = list.span();
    let list = list.into_inner();
    if list.is_empty() {
        return Err(ConfigError::spanned(
            path,
            text,
            span,
            "no executors listed; remove `executors` to use the default `shell` executor".into(),
        ));
    }
    if list.len() > MAX_EXECUTORS {
        return Err(ConfigError::spanned(
            path,
            text,
            span,
            format!(
                "{} executors listed; at most {MAX_EXECUTORS} are allowed",
                list.len()
            ),
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(list.len());
    for (i, e) in list.into_iter().enumerate() {
        // Each entry on its own, so that an error points at its `[[executors]]` header.
        let span = e.span();
        let e: ExecutorConfig =
            toml::Value::Table(e.into_inner())
                .try_into()
                .map_err(|err: toml::de::Error| {
                    ConfigError::spanned(
                        path,
                        text,
                        span.clone(),
                        format!("executor #{}: {}", i + 1, err.message().trim()),
                    )
                })?;
        if !seen.insert(e.name().to_owned()) {
            return Err(ConfigError::spanned(
                path,
                text,
                span,
                format!("executor name {:?} is used twice", e.name()),
            ));
        }
        out.push(e);
    }
    Ok(out)
}

/// The file's shape. Unknown keys are errors, so a typo does not silently mean a default.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    workspace: Option<PathBuf>,
    approval: Option<ApprovalPolicy>,
    approval_expiry: Option<ConfDuration>,
    task_timeout: Option<ConfDuration>,
    output_cap: Option<OutputCap>,
    thread_context: Option<ThreadContext>,
    max_parallel: Option<Parallel>,
    max_blob_bytes: Option<Spanned<BlobCap>>,
    max_blob_storage_bytes: Option<Spanned<BlobCap>>,
    executors: Option<Spanned<Vec<Spanned<toml::Table>>>>,
}

/// A duration written as text (`"30s"`, `"10m"`, `"1h 30m"`), within the accepted range.
struct ConfDuration(Duration);

impl<'de> Deserialize<'de> for ConfDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d).map_err(|_| {
            de::Error::custom("expected a duration in quotes, such as \"30s\", \"10m\" or \"2h\"")
        })?;
        parse_duration(&text).map(Self).map_err(de::Error::custom)
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        format!("{text:?} is not a duration ({e}); use e.g. \"30s\", \"10m\" or \"2h\"")
    })?;
    if d < MIN_DURATION {
        return Err(format!("{text:?} is too short; the least is 1s"));
    }
    if d > MAX_DURATION {
        return Err(format!("{text:?} is too long; the most is 30 days"));
    }
    Ok(d)
}

fn parse_duration_flag(text: &str) -> Result<Duration, String> {
    parse_duration(text)
}

/// A size in bytes: an integer, or text such as `"64KiB"`, `"1 MiB"`, `"16k"`.
fn parse_bytes(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size; use e.g. 65536, \"64KiB\" or \"1MiB\""))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1024,
        "kb" => 1000,
        "m" | "mib" => 1024 * 1024,
        "mb" => 1_000_000,
        "g" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        "t" | "tib" => 1 << 40,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?}; use B, KiB, MiB, GiB or TiB"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn bytes_in_range(text: &str, min: usize, max: usize) -> Result<usize, String> {
    let n = parse_bytes(text)?;
    if n < min || n > max {
        return Err(format!(
            "{text} is out of range; it must be between {min} and {max} bytes"
        ));
    }
    Ok(n)
}

fn parse_output_cap_flag(text: &str) -> Result<usize, String> {
    bytes_in_range(text, MIN_OUTPUT_CAP, MAX_OUTPUT_PER_TASK_BYTES)
}

/// Deserializes an integer or a size string, then checks its range.
fn deserialize_bytes<'de, D: Deserializer<'de>>(
    d: D,
    min: usize,
    max: usize,
) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(i64),
        Text(String),
    }
    let text = match Raw::deserialize(d).map_err(|_| {
        de::Error::custom("expected a size: a number of bytes, or text such as \"64KiB\"")
    })? {
        Raw::Int(i) => i.to_string(),
        Raw::Text(t) => t,
    };
    bytes_in_range(&text, min, max).map_err(de::Error::custom)
}

struct OutputCap(usize);
impl<'de> Deserialize<'de> for OutputCap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_bytes(d, MIN_OUTPUT_CAP, MAX_OUTPUT_PER_TASK_BYTES).map(Self)
    }
}

struct ThreadContext(usize);
impl<'de> Deserialize<'de> for ThreadContext {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_bytes(d, MIN_THREAD_CONTEXT, MAX_THREAD_CONTEXT).map(Self)
    }
}

struct BlobCap(u64);
impl<'de> Deserialize<'de> for BlobCap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_bytes(d, MIN_BLOB_CAP, MAX_BLOB_CAP).map(|n| Self(n as u64))
    }
}

struct Parallel(usize);
impl<'de> Deserialize<'de> for Parallel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)
            .map_err(|_| de::Error::custom("expected a whole number, such as 1"))?;
        match usize::try_from(n) {
            Ok(n) if (1..=MAX_PARALLEL).contains(&n) => Ok(Self(n)),
            _ => Err(de::Error::custom(format!(
                "{n} is out of range; it must be between 1 and {MAX_PARALLEL}"
            ))),
        }
    }
}

/// The file `run` writes when the home has none: every setting, commented out, at its default.
pub const TEMPLATE: &str = r#"# Errand desktop configuration. Every setting is optional; the commented values are the
# defaults. Flags on `errand-desktop run` override this file (see `errand-desktop run --help`).
# Durations are text such as "30s", "10m" or "2h"; sizes are bytes or text such as "64KiB".

# Where tasks run. Relative paths are relative to this file's folder; "~/" is your home.
# workspace = "workspace"

# "auto" runs tasks as they arrive; "ask" waits until the phone approves or denies each one.
# approval = "auto"

# With approval = "ask": deny a task that waited this long for an answer (default: wait forever).
# approval_expiry = "1h"

# Kill a task that runs longer than this, with every process it started.
# task_timeout = "1h"

# Output kept in the thread per task (at most 256KiB). The full log stays in logs/ beside this file.
# output_cap = "256KiB"

# The most of the conversation so far that an executor gets in the file named by $ERRAND_THREAD.
# thread_context = "64KiB"

# Tasks that may run at once.
# max_parallel = 1

# The largest file a phone may attach or a task may leave in $ERRAND_OUT: 1GiB holds a video
# clip or a small project's disk image; larger files belong in a shared folder.
# max_blob_bytes = "1GiB"

# The most bytes of files (attachments and artifacts) kept in blobs/ beside this file, so
# files from the phone never fill the disk unnoticed; a file that would go over is refused.
# max_blob_storage_bytes = "10GiB"

# Executors this desktop offers; the phone picks one per task. Without this list, only "shell"
# (sh -c -- <instruction>, in the workspace) is offered. A "command" executor fills {instruction}
# into its argv argument by argument, never through a shell.
#
# Put "--" before {instruction} when the program accepts it (most do: it ends the options), so
# an instruction starting with '-' reaches the program as text and not as an option. Without
# "--", a task whose instruction starts with '-' fails without running: with
# argv = ["sort", "{instruction}"], the instruction "-o/home/me/.profile" would have had sort
# overwrite that file.
#
# [[executors]]
# name = "shell"
# kind = "shell"
#
# {thread_file} in the argv is the path of a file holding the thread so far (also in
# $ERRAND_THREAD), and stdin = "thread" hands that text to the program on stdin:
#
# [[executors]]
# name = "agent"
# kind = "command"
# argv = ["my-agent", "--print", "--context", "{thread_file}", "--", "{instruction}"]
#
# {attachments}, as an argv element of its own, becomes one argument per file sent with the
# task: the absolute path of its copy in <workspace>/<task>/attachments/ (none without files;
# the folder is also in $ERRAND_ATTACHMENTS):
#
# [[executors]]
# name = "summarise"
# kind = "command"
# argv = ["my-agent", "--print", "{attachments}", "--", "{instruction}"]
#
# [[executors]]
# name = "claude-print"
# kind = "command"
# argv = ["claude", "-p", "{instruction}"]
# stdin = "thread"
#
# An "acp" executor is an agent that speaks the Agent Client Protocol: the phone sees its
# messages, tool calls and plan, answers its permission requests, and replies in the same
# session (errand-phone reply / answer). Its argv starts the agent; no {instruction} needed.
# auto_allow lists ACP tool kinds allowed without asking (each recorded in the thread);
# permission_expiry rejects a request nobody answered in time (default: wait).
#
# [[executors]]
# name = "claude"
# kind = "acp"
# argv = ["npx", "-y", "@zed-industries/claude-code-acp"]
# auto_allow = ["read", "search", "think"]
# permission_expiry = "30m"
#
# [[executors]]
# name = "codex"
# kind = "acp"
# argv = ["npx", "-y", "@zed-industries/codex-acp"]
#
# [[executors]]
# name = "gemini"
# kind = "acp"
# argv = ["gemini", "--experimental-acp"]
"#;

/// Writes [`TEMPLATE`] to the home's config file if there is none yet. Returns its path.
pub fn write_template_if_missing(home: &Path) -> std::io::Result<PathBuf> {
    let path = config_path(home);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
    {
        Ok(mut f) => {
            use std::io::Write;
            f.write_all(TEMPLATE.as_bytes())?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::ExecutorKind;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        Settings::parse(Path::new("/h"), Path::new("/h/config.toml"), text)
    }

    fn invalid(text: &str) -> (usize, Option<String>, String) {
        match parse(text) {
            Err(ConfigError::Invalid {
                line, key, message, ..
            }) => (line, key, message),
            other => panic!("expected an invalid config, got {other:?}"),
        }
    }

    #[test]
    fn blob_caps_are_settings_with_defaults_and_clear_errors() {
        let s = parse("").unwrap();
        assert_eq!(s.blob_caps.max_blob_bytes(), 1 << 30);
        assert_eq!(s.blob_caps.max_total_bytes(), 10 << 30);
        let s = parse("max_blob_bytes = \"5MiB\"\nmax_blob_storage_bytes = \"2GiB\"\n").unwrap();
        assert_eq!(s.blob_caps.max_blob_bytes(), 5 << 20);
        assert_eq!(s.blob_caps.max_total_bytes(), 2 << 30);
        assert!(s.to_string().contains("max_blob_bytes = 5242880"));
        let (line, key, msg) = invalid("\nmax_blob_bytes = 12\n");
        assert_eq!((line, key.as_deref()), (2, Some("max_blob_bytes")));
        assert!(msg.contains("between 1024"), "{msg}");
        let (line, key, msg) =
            invalid("max_blob_storage_bytes = \"1MiB\"\nmax_blob_bytes = \"2MiB\"\n");
        assert_eq!((line, key.as_deref()), (2, Some("max_blob_bytes")));
        assert!(msg.contains("could never be stored"), "{msg}");
        let (_, key, msg) = invalid("max_blob_storage_bytes = \"lots\"\n");
        assert_eq!(key.as_deref(), Some("max_blob_storage_bytes"));
        assert!(msg.contains("not a size"), "{msg}");
    }

    #[test]
    fn an_empty_file_means_every_default() {
        let s = parse("").unwrap();
        assert_eq!(s, Settings::defaults(Path::new("/h")));
        assert_eq!(s.workspace, Path::new("/h/workspace"));
        assert_eq!(s.executor_names(), ["shell"]);
        assert_eq!(s.max_parallel, 1);
    }

    #[test]
    fn the_template_parses_to_the_defaults() {
        assert_eq!(
            parse(TEMPLATE).unwrap(),
            Settings::defaults(Path::new("/h"))
        );
    }

    #[test]
    fn every_setting_parses() {
        let s = parse(
            r#"
workspace = "work"
approval = "ask"
approval_expiry = "90m"
task_timeout = "10s"
output_cap = "64KiB"
thread_context = 2048
max_parallel = 3

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
        assert_eq!(s.workspace, Path::new("/h/work"));
        assert_eq!(s.approval, ApprovalPolicy::Ask);
        assert_eq!(s.approval_expiry, Some(Duration::from_secs(90 * 60)));
        assert_eq!(s.task_timeout, Duration::from_secs(10));
        assert_eq!(s.output_cap, 64 * 1024);
        assert_eq!(s.thread_context, 2048);
        assert_eq!(s.max_parallel, 3);
        assert_eq!(s.executor_names(), ["claude", "shell"]);
        assert!(matches!(
            s.executor("claude").unwrap().kind(),
            ExecutorKind::Command { .. }
        ));
        // What `config` prints parses back to the same settings.
        assert_eq!(parse(&s.to_string()).unwrap(), s);
    }

    #[test]
    fn an_acp_executor_parses_prints_and_refuses_its_options_elsewhere() {
        let s = parse(
            "[[executors]]\nname = \"claude\"\nkind = \"acp\"\n\
             argv = [\"npx\", \"-y\", \"@zed-industries/claude-code-acp\"]\n\
             auto_allow = [\"read\", \"think\"]\npermission_expiry = \"30m\"\n",
        )
        .unwrap();
        let ExecutorKind::Acp(acp) = s.executor("claude").unwrap().kind() else {
            panic!("not acp");
        };
        assert_eq!(acp.argv[2], "@zed-industries/claude-code-acp");
        assert_eq!(acp.auto_allow, ["read", "think"]);
        assert_eq!(acp.permission_expiry, Some(Duration::from_secs(1800)));
        assert_eq!(acp.idle_timeout, crate::executor::DEFAULT_ACP_IDLE);
        assert_eq!(parse(&s.to_string()).unwrap(), s);

        let (_, _, msg) = invalid(
            "[[executors]]\nname = \"c\"\nkind = \"command\"\nargv = [\"x\", \"{instruction}\"]\n\
             auto_allow = [\"read\"]\n",
        );
        assert!(msg.contains("only used with kind = \"acp\""), "{msg}");
        let (_, _, msg) = invalid("[[executors]]\nname = \"c\"\nkind = \"acp\"\n");
        assert!(msg.contains("needs the agent's argv"), "{msg}");
    }

    #[test]
    fn errors_name_the_line_and_the_key() {
        let (line, key, msg) = invalid("approval = \"auto\"\n\ntask_timeout = \"soon\"\n");
        assert_eq!(line, 3);
        assert_eq!(key.as_deref(), Some("task_timeout"));
        assert!(msg.contains("not a duration"), "{msg}");

        let (line, key, msg) = invalid("max_parallel = 0\n");
        assert_eq!((line, key.as_deref()), (1, Some("max_parallel")));
        assert!(msg.contains("between 1 and 64"), "{msg}");

        let (line, key, msg) = invalid("\napproval = \"sometimes\"\n");
        assert_eq!((line, key.as_deref()), (2, Some("approval")));
        assert!(msg.contains("auto") && msg.contains("ask"), "{msg}");

        let (line, key, msg) = invalid("output_cap = \"1MiB\"\n");
        assert_eq!((line, key.as_deref()), (1, Some("output_cap")));
        assert!(msg.contains("out of range"), "{msg}");

        let (line, key, msg) = invalid("max_paralel = 2\n");
        assert_eq!((line, key.as_deref()), (1, Some("max_paralel")));
        assert!(msg.contains("unknown field"), "{msg}");

        let (line, _, msg) = invalid("task_timeout = \"1h\"\nthis is not toml\n");
        assert_eq!(line, 2);
        assert!(!msg.is_empty());
    }

    #[test]
    fn executor_errors_name_their_line() {
        let text = r#"
[[executors]]
name = "a"
kind = "shell"

[[executors]]
name = "b"
kind = "command"
argv = ["tool", "-p"]
"#;
        let (line, key, msg) = invalid(text);
        assert_eq!((line, key.as_deref()), (6, Some("executors")));
        assert!(msg.starts_with("executor #2: "), "{msg}");
        assert!(msg.contains("{instruction}"), "{msg}");

        let dup = "[[executors]]\nname = \"a\"\nkind = \"shell\"\n\n[[executors]]\nname = \"a\"\nkind = \"shell\"\n";
        let (line, _, msg) = invalid(dup);
        assert_eq!(line, 5);
        assert!(msg.contains("used twice"), "{msg}");

        let (_, _, msg) = invalid("executors = []\n");
        assert!(msg.contains("no executors"), "{msg}");
    }

    #[test]
    fn the_error_message_reads_well() {
        let err = parse("task_timeout = \"0s\"\n").unwrap_err().to_string();
        assert!(
            err.starts_with("bad config file /h/config.toml, line 1, key `task_timeout`:"),
            "{err}"
        );
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            config_path(dir.path()),
            "approval = \"ask\"\nmax_parallel = 2\n",
        )
        .unwrap();
        let s = Settings::load(
            dir.path(),
            &Overrides {
                approval: Some(ApprovalPolicy::Auto),
                task_timeout: Some(Duration::from_secs(5)),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(s.approval, ApprovalPolicy::Auto);
        assert_eq!(s.max_parallel, 2);
        assert_eq!(s.task_timeout, Duration::from_secs(5));
    }

    #[test]
    fn a_missing_file_is_the_defaults_and_the_template_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Settings::load(dir.path(), &Overrides::default()).unwrap();
        assert_eq!(s, Settings::defaults(dir.path()));
        let p = write_template_if_missing(dir.path()).unwrap();
        std::fs::write(&p, "max_parallel = 4\n").unwrap();
        write_template_if_missing(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "max_parallel = 4\n");
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("65536").unwrap(), 65536);
        assert_eq!(parse_bytes("64KiB").unwrap(), 65536);
        assert_eq!(parse_bytes("64 k").unwrap(), 65536);
        assert_eq!(parse_bytes("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_bytes("2kb").unwrap(), 2000);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("12 parsecs").is_err());
    }
}
