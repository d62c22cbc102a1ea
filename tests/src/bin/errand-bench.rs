//! `errand-bench`: Errand's performance figures (issue 8), each with its median and p99 over
//! repeated runs, a reference measured in the same run, the issue's goal, and automerge-repo
//! where the issue compares with it.
//!
//! - Builds the binaries it drives (`errand-desktop`, `errand-phone`, `errand-relay`,
//!   `errand-benchpeer`) in its own profile.
//! - Builds the fixtures once and caches them (`<target>/bench-cache/v<FORMAT>-…`): a desktop
//!   home and a phone home that trust each other and hold the same thread, made by the two
//!   peers syncing over loopback (tasks from the phone, four facts each from the desktop). Every
//!   run works on a copy.
//! - Runs real peers as separate processes on loopback: `errand-benchpeer peer` (the `Peer` the
//!   binaries run, driven over stdin, reporting events with `CLOCK_MONOTONIC` stamps) for
//!   P1–P3 and P6, the real binaries for P4, P6 (CLI), P7 and P8, `errand-relay` for P5, and
//!   all three for P11 (a relay restart between `--relay-only` peers).
//! - Times P3's ingest check in-process (`--only ingest` alone): on the owner desktop's copy
//!   of each fixture thread, `authority_for` + `check_pushed` of one new task change pushed by
//!   the fixture's phone, change after change.
//! - Runs `tests/bench/automerge-repo-bench.mjs` for the P1/P2 comparison, if Node.js is there.
//! - Prints a Markdown table; `--json FILE` writes every figure and sample.
//!
//! Nothing is asserted. A metric that cannot be measured says why. The exit code is 0 unless the
//! harness itself broke.

use std::{
    collections::{HashSet, VecDeque},
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use errand_core::{DeviceId, DeviceKind, EventKind};
use errand_crdt::{
    ActorId, NewTask, ThreadDoc, ThreadGenesis, TrustedPeer,
    ingest::{self, Bounds},
};
use errand_p2p::peer::{Peer, PeerConfig, now_ms};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Bump when the fixture's shape or the store format changes: cached fixtures of another
/// version are ignored (and can be deleted).
const FIXTURE_FORMAT: u32 = 4;
/// Facts per fixture task: delivered, started, output, finished (issue 8: "4 facts each").
const FACTS_PER_TASK: usize = 4;
/// Tasks in the small thread (issue 8).
const SMALL_TASKS: usize = 250;
/// Tasks in the large thread (issue 8).
const LARGE_TASKS: usize = 20_000;
/// Tasks per round trip while building a fixture: the phone commits this many tasks (one change
/// each), the desktop commits their facts (one change each) once they arrive.
const FIXTURE_BATCH: usize = 250;
/// The instruction of every bench task: the same text automerge-repo's script uses.
const TASK_TEXT: &str = "summarise the CSVs in ~/Downloads";
/// Waits for things that take milliseconds on a quiet machine; generous for a debug build on a
/// busy 2-core box.
const STEP: Duration = Duration::from_secs(60);
/// Waits that move or load a 100,000-change thread.
const LONG: Duration = Duration::from_secs(600);

/// When the bench started, for the progress lines.
static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// A progress line on stderr, with the time since the start.
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!(
            "errand-bench [{:6.1} s] {}",
            STARTED.get_or_init(Instant::now).elapsed().as_secs_f64(),
            format!($($arg)*)
        )
    };
}

// ---- command line and plan ---------------------------------------------------------------

/// Measure Errand against the floor and against automerge-repo, in one run (issue 8).
#[derive(Debug, Parser)]
#[command(name = "errand-bench", about, long_about = None)]
struct Args {
    /// A short run for CI (under 2 minutes even in a debug build): small thread only, fewer runs.
    #[arg(long)]
    quick: bool,
    /// Also write every figure and sample as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Run only these metrics, e.g. `--only P1,P3` (P3 needs P1's session; it runs with it).
    /// `ingest` runs only P3's in-process row, the ingest check of one pushed change.
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    only: Vec<String>,
    /// Skip the automerge-repo comparison.
    #[arg(long)]
    no_repo: bool,
    /// Where fixtures are cached (default: <target>/bench-cache).
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Keep the run's homes and logs (their path is printed).
    #[arg(long)]
    keep: bool,
    /// Do not build the binaries first (use what is in the bench's own target directory).
    #[arg(long)]
    no_build: bool,
}

/// Sizes and repetitions of one run.
#[derive(Debug, Clone, Serialize)]
struct Plan {
    quick: bool,
    large: bool,
    p1_warmup: usize,
    p1_runs: usize,
    p1_gap_ms: u64,
    floor_runs: usize,
    p2_sizes: Vec<usize>,
    p2_runs: usize,
    p3_runs: usize,
    ingest_runs: usize,
    p4_runs: usize,
    p5_reservations: usize,
    p5_circuits: usize,
    p5_runs: usize,
    throughput_bytes: usize,
    throughput_runs: usize,
    p6_runs: usize,
    p6_cli_runs: usize,
    p7_runs: usize,
    p7_large_runs: usize,
    p8_runs: usize,
    p8_large_runs: usize,
    p9_runs: usize,
    p10_bytes: usize,
    p10_runs: usize,
    settle_ms: u64,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                large: false,
                p1_warmup: 2,
                p1_runs: 10,
                p1_gap_ms: 30,
                floor_runs: 50,
                p2_sizes: vec![1_000],
                p2_runs: 1,
                p3_runs: 5,
                ingest_runs: 2_000,
                p4_runs: 2,
                p5_reservations: 100,
                p5_circuits: 50,
                p5_runs: 1,
                throughput_bytes: 4 << 20,
                throughput_runs: 1,
                p6_runs: 3,
                p6_cli_runs: 1,
                p7_runs: 1,
                p7_large_runs: 0,
                p8_runs: 5,
                p8_large_runs: 0,
                p9_runs: 5,
                p10_bytes: 100 << 20,
                p10_runs: 1,
                settle_ms: 1_000,
            }
        } else {
            Self {
                quick,
                large: true,
                p1_warmup: 3,
                p1_runs: 30,
                p1_gap_ms: 100,
                floor_runs: 300,
                p2_sizes: vec![1_000, 10_000],
                p2_runs: 3,
                p3_runs: 20,
                ingest_runs: 2_000,
                p4_runs: 5,
                p5_reservations: 1_000,
                p5_circuits: 500,
                p5_runs: 2,
                throughput_bytes: 32 << 20,
                throughput_runs: 3,
                p6_runs: 10,
                p6_cli_runs: 5,
                p7_runs: 3,
                p7_large_runs: 2,
                p8_runs: 20,
                p8_large_runs: 5,
                p9_runs: 30,
                p10_bytes: 100 << 20,
                p10_runs: 3,
                settle_ms: 3_000,
            }
        }
    }
}

// ---- statistics --------------------------------------------------------------------------

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s
}

/// The median (mean of the middle two for an even count).
fn median(v: &[f64]) -> f64 {
    let s = sorted(v);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Nearest-rank 99th percentile: with fewer than 100 samples, the maximum.
fn p99(v: &[f64]) -> f64 {
    let s = sorted(v);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((0.99 * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

// ---- the report --------------------------------------------------------------------------

/// How a figure is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Unit {
    /// Milliseconds.
    Ms,
    /// Bytes (shown as B, KB, MB: powers of 1,000, as the issue's goals are written).
    Bytes,
    /// KiB (the relay's memory per reservation or circuit, as the issue writes it).
    KiB,
    /// Megabytes per second.
    MBps,
}

fn fmt_value(v: f64, unit: Unit) -> String {
    if !v.is_finite() {
        return "—".into();
    }
    match unit {
        Unit::Ms if v < 1.0 => format!("{v:.3} ms"),
        Unit::Ms if v < 10.0 => format!("{v:.2} ms"),
        Unit::Ms if v < 100.0 => format!("{v:.1} ms"),
        Unit::Ms => format!("{v:.0} ms"),
        Unit::Bytes if v < 10_000.0 => format!("{v:.0} B"),
        Unit::Bytes if v < 1_000_000.0 => format!("{:.1} KB", v / 1e3),
        Unit::Bytes if v < 10_000_000.0 => format!("{:.2} MB", v / 1e6),
        Unit::Bytes => format!("{:.1} MB", v / 1e6),
        Unit::KiB => format!("{v:.1} KiB"),
        Unit::MBps => format!("{v:.0} MB/s"),
    }
}

/// One condition of a goal.
#[derive(Debug, Clone, Serialize)]
enum Check {
    /// The median is at most this.
    P50AtMost(f64),
    /// The p99 is at most this.
    P99AtMost(f64),
    /// The median is at most this many times the reference.
    RefRatioAtMost(f64),
    /// The median is at least this many times the reference.
    RefRatioAtLeast(f64),
    /// The median is at most this many times automerge-repo's (0.5 = "2× better").
    RepoRatioAtMost(f64),
}

/// What a check concluded.
#[derive(Debug, Clone, Serialize)]
struct Verdict {
    met: Option<bool>,
    text: String,
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
struct Row {
    id: &'static str,
    metric: String,
    unit: Unit,
    samples: Vec<f64>,
    /// The reference measured in this run, in the row's unit.
    reference: Option<(String, f64)>,
    /// automerge-repo's figure in this run: `Err` says why it is missing.
    repo: Option<Result<f64, String>>,
    goals: Vec<Check>,
    /// Set when the goal is written for another size than what was measured (quick mode).
    goal_not_applicable: Option<String>,
    note: String,
    missing: Option<String>,
}

impl Row {
    fn new(id: &'static str, metric: impl Into<String>, unit: Unit) -> Self {
        Self {
            id,
            metric: metric.into(),
            unit,
            samples: Vec::new(),
            reference: None,
            repo: None,
            goals: Vec::new(),
            goal_not_applicable: None,
            note: String::new(),
            missing: None,
        }
    }

    fn missing(id: &'static str, metric: impl Into<String>, unit: Unit, why: String) -> Self {
        let mut r = Self::new(id, metric, unit);
        r.missing = Some(why);
        r
    }

    fn samples(mut self, s: Vec<f64>) -> Self {
        self.samples = s;
        self
    }

    fn reference(mut self, label: impl Into<String>, v: f64) -> Self {
        self.reference = Some((label.into(), v));
        self
    }

    fn goals(mut self, g: Vec<Check>) -> Self {
        self.goals = g;
        self
    }

    fn note(mut self, n: impl Into<String>) -> Self {
        self.note = n.into();
        self
    }

    fn median(&self) -> f64 {
        median(&self.samples)
    }

    fn ratio(&self) -> Option<f64> {
        let (_, r) = self.reference.as_ref()?;
        (*r > 0.0 && !self.samples.is_empty()).then(|| self.median() / r)
    }

    fn repo_ratio(&self) -> Option<f64> {
        match &self.repo {
            Some(Ok(r)) if *r > 0.0 && !self.samples.is_empty() => Some(self.median() / r),
            _ => None,
        }
    }

    fn goal_text(&self) -> String {
        let u = self.unit;
        self.goals
            .iter()
            .map(|g| match g {
                Check::P50AtMost(x) => format!("p50 ≤ {}", fmt_value(*x, u)),
                Check::P99AtMost(x) => format!("p99 ≤ {}", fmt_value(*x, u)),
                Check::RefRatioAtMost(x) => format!("≤ {x}× reference"),
                Check::RefRatioAtLeast(x) => format!("≥ {:.0}% of reference", x * 100.0),
                Check::RepoRatioAtMost(x) => {
                    format!("≥ {:.0}× better than automerge-repo", 1.0 / x)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn verdicts(&self) -> Vec<Verdict> {
        if self.missing.is_some() || self.samples.is_empty() {
            return Vec::new();
        }
        let u = self.unit;
        let (m, p) = (self.median(), p99(&self.samples));
        let over = |what: &str, v: f64, limit: f64| {
            if v <= limit {
                Verdict {
                    met: Some(true),
                    text: format!("{what} met"),
                }
            } else {
                Verdict {
                    met: Some(false),
                    text: format!(
                        "{what} missed: {} vs {} ({:.1}×, +{})",
                        fmt_value(v, u),
                        fmt_value(limit, u),
                        v / limit,
                        fmt_value(v - limit, u)
                    ),
                }
            }
        };
        self.goals
            .iter()
            .map(|g| match g {
                Check::P50AtMost(x) => over("p50", m, *x),
                Check::P99AtMost(x) => over("p99", p, *x),
                Check::RefRatioAtMost(x) => match self.ratio() {
                    Some(r) if r <= *x => Verdict {
                        met: Some(true),
                        text: format!("{r:.2}× reference met"),
                    },
                    Some(r) => Verdict {
                        met: Some(false),
                        text: format!("{r:.2}× reference missed (goal ≤ {x}×)"),
                    },
                    None => Verdict {
                        met: None,
                        text: "no reference".into(),
                    },
                },
                Check::RefRatioAtLeast(x) => match self.ratio() {
                    Some(r) if r >= *x => Verdict {
                        met: Some(true),
                        text: format!("{:.0}% of reference met", r * 100.0),
                    },
                    Some(r) => Verdict {
                        met: Some(false),
                        text: format!(
                            "{:.0}% of reference missed (goal ≥ {:.0}%)",
                            r * 100.0,
                            x * 100.0
                        ),
                    },
                    None => Verdict {
                        met: None,
                        text: "no reference".into(),
                    },
                },
                Check::RepoRatioAtMost(x) => match (self.repo_ratio(), &self.repo) {
                    (Some(r), _) if r <= *x => Verdict {
                        met: Some(true),
                        text: format!("{:.1}× better than automerge-repo met", 1.0 / r),
                    },
                    (Some(r), _) => Verdict {
                        met: Some(false),
                        text: if r < 1.0 {
                            format!(
                                "only {:.2}× better than automerge-repo (goal {:.0}×)",
                                1.0 / r,
                                1.0 / x
                            )
                        } else {
                            format!(
                                "{r:.2}× worse than automerge-repo (goal {:.0}× better)",
                                1.0 / x
                            )
                        },
                    },
                    (None, Some(Err(why))) => Verdict {
                        met: None,
                        text: format!("automerge-repo not measured: {why}"),
                    },
                    (None, _) => Verdict {
                        met: None,
                        text: "automerge-repo not measured".into(),
                    },
                },
            })
            .collect()
    }

    fn result_text(&self) -> String {
        if let Some(why) = &self.missing {
            return format!("missing: {why}");
        }
        if self.goals.is_empty() {
            return "—".into();
        }
        if let Some(why) = &self.goal_not_applicable {
            return format!("n/a ({why})");
        }
        let v = self.verdicts();
        let all_met = v.iter().all(|v| v.met == Some(true));
        let text: Vec<String> = v.iter().map(|v| v.text.clone()).collect();
        if all_met {
            "**met**".into()
        } else {
            format!("**missed** — {}", text.join("; "))
        }
    }

    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "metric": self.metric,
            "unit": self.unit,
            "n": self.samples.len(),
            "median": (!self.samples.is_empty()).then(|| self.median()),
            "p99": (!self.samples.is_empty()).then(|| p99(&self.samples)),
            "samples": self.samples,
            "reference": self.reference.as_ref().map(|(l, v)| json!({ "label": l, "median": v })),
            "ratio": self.ratio(),
            "automerge_repo": match &self.repo {
                Some(Ok(v)) => json!({ "median": v }),
                Some(Err(why)) => json!({ "missing": why }),
                None => Value::Null,
            },
            "vs_automerge_repo": self.repo_ratio(),
            "goal": self.goal_text(),
            "goal_not_applicable": self.goal_not_applicable,
            "verdicts": self.verdicts(),
            "result": self.result_text(),
            "note": self.note,
            "missing": self.missing,
        })
    }
}

/// Escapes a cell for a Markdown table.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(
        "| id | metric | median / p99 (n) | reference (same run) | ratio | automerge-repo | ours ÷ theirs | goal | result |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let figure = if r.missing.is_some() || r.samples.is_empty() {
            "—".to_owned()
        } else {
            format!(
                "{} / {} ({})",
                fmt_value(r.median(), r.unit),
                fmt_value(p99(&r.samples), r.unit),
                r.samples.len()
            )
        };
        let reference = r.reference.as_ref().map_or("—".to_owned(), |(l, v)| {
            format!("{}: {l}", fmt_value(*v, r.unit))
        });
        let ratio = r.ratio().map_or("—".to_owned(), |x| format!("{x:.2}×"));
        let repo = match &r.repo {
            Some(Ok(v)) => fmt_value(*v, r.unit),
            Some(Err(why)) => format!("skipped: {why}"),
            None => "—".to_owned(),
        };
        let repo_ratio = r
            .repo_ratio()
            .map_or("—".to_owned(), |x| format!("{x:.2}×"));
        let goal = if r.goals.is_empty() {
            "—".to_owned()
        } else {
            r.goal_text()
        };
        let metric = if r.note.is_empty() {
            r.metric.clone()
        } else {
            format!("{} <br><sub>{}</sub>", r.metric, r.note)
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.id,
            cell(&metric),
            figure,
            cell(&reference),
            ratio,
            cell(&repo),
            repo_ratio,
            cell(&goal),
            cell(&r.result_text())
        );
    }
    out
}

// ---- processes ---------------------------------------------------------------------------

/// A child process whose stdout lines are read (and time-stamped on arrival) by a thread.
struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<(Instant, String)>,
    backlog: VecDeque<Value>,
    stderr_path: PathBuf,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

impl Proc {
    fn spawn(name: &str, bin: &Path, args: &[String], log_dir: &Path) -> Result<Self> {
        let stderr_path = log_dir.join(format!(
            "{name}-{}.stderr",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        let stderr = std::fs::File::create(&stderr_path)?;
        let mut child = Command::new(bin)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("BENCH_RUST_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("while spawning {}", bin.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            name: name.to_owned(),
            child,
            stdin,
            lines: rx,
            backlog: VecDeque::new(),
            stderr_path,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    fn died(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "{} exited ({status}); stderr:\n{}",
                self.name,
                self.stderr_tail()
            )),
            _ => None,
        }
    }

    fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin is closed")?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("while writing to {}", self.name))
    }

    /// The next raw stdout line satisfying `f`, with the time it arrived.
    fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&str) -> bool,
    ) -> Result<(Instant, String)> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok((at, line)) if f(&line) => return Ok((at, line)),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(why) = self.died() {
                        bail!("waiting for {what}: {why}");
                    }
                    if left.is_zero() {
                        bail!(
                            "timed out after {timeout:?} waiting for {what} from {}",
                            self.name
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(50));
                    let why = self.died().unwrap_or_else(|| "stdout closed".into());
                    bail!("waiting for {what}: {why}");
                }
            }
        }
    }

    /// The next JSON event satisfying `f` (earlier non-matching events are kept for later).
    fn wait_ev(
        &mut self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        if let Some(i) = self.backlog.iter().position(&mut f) {
            return Ok(self.backlog.remove(i).unwrap_or_default());
        }
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok((_, line)) => {
                    let Ok(v) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    if f(&v) {
                        return Ok(v);
                    }
                    self.backlog.push_back(v);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(why) = self.died() {
                        bail!("waiting for {what}: {why}");
                    }
                    if left.is_zero() {
                        bail!(
                            "timed out after {timeout:?} waiting for {what} from {}",
                            self.name
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(50));
                    let why = self.died().unwrap_or_else(|| "stdout closed".into());
                    bail!("waiting for {what}: {why}");
                }
            }
        }
    }

    /// Sends a command and waits for its answer (`ev` = `answer`), or its error.
    fn request(&mut self, line: &str, answer: &str, timeout: Duration) -> Result<Value> {
        self.send(line)?;
        let cmd = line.split_whitespace().next().unwrap_or("").to_owned();
        let v = self.wait_ev(&format!("the answer to {cmd:?}"), timeout, |v| {
            v["ev"] == answer || (v["ev"] == "error" && v["cmd"] == cmd.as_str())
        })?;
        if v["ev"] == "error" {
            bail!("{} {cmd}: {}", self.name, v["error"].as_str().unwrap_or(""));
        }
        Ok(v)
    }

    /// Drops every event received so far.
    fn clear(&mut self) {
        self.backlog.clear();
        while self.lines.try_recv().is_ok() {}
    }

    /// Asks a bench peer to quit (closing stdin), then kills it if it lingers. Its home is a
    /// throw-away copy, so a clean shutdown buys nothing, and a desktop `Peer::shutdown` takes
    /// its full 5 s timeout (the pairing responder's accept loop is not cancelled).
    fn stop(mut self) {
        let _ = self.send("quit");
        self.stdin = None;
        let end = Instant::now() + Duration::from_millis(300);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// VmRSS of a process, in bytes.
fn rss_bytes(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("while reading /proc/{pid}/status"))?;
    let kib: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kib * 1024.0)
}

/// Apparent size of every file under `dir`, in bytes.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// Copies a home (files and directories; sockets and the like are skipped).
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let t = e.file_type()?;
        let dst = to.join(e.file_name());
        if t.is_dir() {
            copy_dir(&e.path(), &dst)?;
        } else if t.is_file() {
            std::fs::copy(e.path(), &dst)
                .with_context(|| format!("while copying {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// TCP payload bytes (sent + received, from the kernel's `tcp_info`) of the established
/// sockets whose local port is `port`, if `ss` is available.
fn tcp_bytes(port: u16) -> Option<u64> {
    let out = Command::new("ss")
        .args([
            "-tinH",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut total = 0u64;
    let mut found = false;
    for tok in text.split_whitespace() {
        for key in ["bytes_sent:", "bytes_received:"] {
            if let Some(v) = tok.strip_prefix(key).and_then(|v| v.parse::<u64>().ok()) {
                total += v;
                found = true;
            }
        }
    }
    found.then_some(total)
}

fn port_of(addr: &str) -> Option<u16> {
    let mut it = addr.split('/');
    while let Some(p) = it.next() {
        if p == "tcp" {
            return it.next()?.parse().ok();
        }
    }
    None
}

fn ns(v: &Value, key: &str) -> Result<u64> {
    v[key]
        .as_u64()
        .with_context(|| format!("{key} missing in {v}"))
}

fn ms_between(from_ns: u64, to_ns: u64) -> f64 {
    (to_ns as f64 - from_ns as f64) / 1e6
}

// ---- context -----------------------------------------------------------------------------

/// Everything a metric needs.
struct Ctx {
    plan: Plan,
    bin_dir: PathBuf,
    /// Binaries that could not be built, with why.
    unbuilt: Option<String>,
    work: PathBuf,
    logs: PathBuf,
    cache: PathBuf,
    counter: usize,
}

impl Ctx {
    fn bin(&self, name: &str) -> Result<PathBuf> {
        let p = self.bin_dir.join(name);
        if p.exists() {
            Ok(p)
        } else {
            bail!(
                "{name} is not built in {}{}",
                self.bin_dir.display(),
                self.unbuilt
                    .as_ref()
                    .map_or(String::new(), |why| format!(" ({why})"))
            )
        }
    }

    fn fresh_dir(&mut self, label: &str) -> Result<PathBuf> {
        self.counter += 1;
        let d = self.work.join(format!("{label}-{}", self.counter));
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    fn settle(&self) {
        std::thread::sleep(Duration::from_millis(self.plan.settle_ms));
    }

    /// Starts a bench peer on `home` and waits until its network runs.
    fn bench_peer(
        &self,
        label: &str,
        home: &Path,
        kind: &str,
        extra: &[String],
    ) -> Result<(Proc, Value)> {
        let mut args = vec![
            "peer".to_owned(),
            "--home".into(),
            home.display().to_string(),
            "--kind".into(),
            kind.into(),
        ];
        args.extend_from_slice(extra);
        let mut p = Proc::spawn(label, &self.bin("errand-benchpeer")?, &args, &self.logs)?;
        let ready = p.wait_ev("ready", LONG, |v| v["ev"] == "ready")?;
        Ok((p, ready))
    }

    /// Runs a one-shot CLI command and returns its output.
    fn cli(&self, bin: &str, args: &[&str]) -> Result<std::process::Output> {
        Command::new(self.bin(bin)?)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("while running {bin} {args:?}"))
    }

    fn cli_json(&self, bin: &str, args: &[&str]) -> Result<Value> {
        let out = self.cli(bin, args)?;
        if !out.status.success() {
            bail!(
                "{bin} {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{bin} {args:?} printed no JSON"))
    }
}

// ---- building the binaries ---------------------------------------------------------------

/// Builds the binaries the bench drives, in the bench's own profile. Returns why it failed, if
/// it did (the bench then uses whatever binaries exist).
fn build_binaries(bin_dir: &Path) -> Option<String> {
    let cargo = std::env::var_os("CARGO")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO").map(PathBuf::from))?;
    let release = bin_dir.file_name().is_some_and(|n| n == "release");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q"]);
    if release {
        cmd.arg("--release");
    }
    cmd.args([
        "-p",
        "errand-desktop",
        "-p",
        "errand-mobile",
        "-p",
        "errand-p2p",
        "-p",
        "errand-tests",
        "--bins",
    ])
    .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    progress!(
        "building the binaries it drives ({})",
        if release { "release" } else { "debug" }
    );
    match cmd.output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let first = err
                .lines()
                .find(|l| l.starts_with("error"))
                .unwrap_or("cargo build failed");
            Some(format!("cargo build failed: {first}"))
        }
        Err(e) => Some(format!("cannot run cargo: {e}")),
    }
}

// ---- fixtures ----------------------------------------------------------------------------

/// A cached pair of homes holding the same thread.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Fixture {
    #[serde(skip)]
    dir: PathBuf,
    format: u32,
    tasks: usize,
    facts_per_task: usize,
    changes: usize,
    desktop_id: String,
    phone_id: String,
    genesis: ThreadGenesis,
    /// `save()` of each of the thread's documents (meta, segments), in `thread.N.automerge`.
    save_bytes: usize,
    /// How many documents: the meta document and its segments.
    #[serde(default)]
    documents: u32,
    build_secs: f64,
}

impl Fixture {
    fn desktop(&self) -> PathBuf {
        self.dir.join("desktop")
    }
    fn phone(&self) -> PathBuf {
        self.dir.join("phone")
    }
    /// `save()` of each document of the thread: (part number, bytes).
    fn save(&self) -> Result<Vec<(u32, Vec<u8>)>> {
        (0..self.documents.max(1))
            .map(|n| {
                std::fs::read(self.dir.join(format!("thread.{n}.automerge")))
                    .map(|b| (n, b))
                    .context("while reading the fixture's save()")
            })
            .collect()
    }

    /// The thread, every document loaded, with `actor` writing.
    fn load(&self, actor: ActorId) -> Result<ThreadDoc> {
        let parts = self.save()?;
        let mut doc = ThreadDoc::load([parts[0].1.as_slice()], &self.genesis, actor)?;
        for (n, bytes) in &parts[1..] {
            doc.attach_segment(*n, [bytes.as_slice()])?;
        }
        Ok(doc)
    }
    fn label(&self) -> String {
        format!("{} tasks, {} changes", self.tasks, self.changes)
    }
}

fn fixture(cache: &Path, tasks: usize) -> Result<Fixture> {
    let dir = cache.join(format!("v{FIXTURE_FORMAT}-{tasks}x{FACTS_PER_TASK}"));
    if let Ok(bytes) = std::fs::read(dir.join("fixture.json"))
        && let Ok(mut f) = serde_json::from_slice::<Fixture>(&bytes)
        && f.format == FIXTURE_FORMAT
    {
        f.dir = dir;
        return Ok(f);
    }
    let tmp = cache.join(format!(
        "v{FIXTURE_FORMAT}-{tasks}x{FACTS_PER_TASK}.building"
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&tmp)?;
    progress!(
        "building the {tasks}-task fixture once (cached in {})",
        dir.display()
    );
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut f = rt.block_on(build_fixture(&tmp, tasks))?;
    drop(rt);
    // The homes at rest: building them leaves the store files mostly free pages (redb never
    // shrinks a file), which a home's next open compacts once and records. Done here, so that
    // the starts measured on copies of a fixture are the ones a user sees after the first.
    for who in ["desktop", "phone"] {
        errand_crdt::store::Store::open(&tmp.join(who))?;
    }
    f.build_secs = started.elapsed().as_secs_f64();
    std::fs::write(tmp.join("fixture.json"), serde_json::to_vec_pretty(&f)?)?;
    std::fs::rename(&tmp, &dir)?;
    f.dir = dir;
    progress!("fixture built in {:.1} s", f.build_secs);
    Ok(f)
}

/// Polls `f` every 20 ms until it returns `Some`.
async fn poll<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> Result<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The current heads of a replica's documents in memory (a commit that writes nothing is how
/// to get `&mut`).
async fn heads(p: &Peer) -> Result<Vec<(u32, Vec<errand_crdt::ChangeHash>)>> {
    Ok(p.replica().commit(|d| Ok(d.heads())).await?.0)
}

fn peer_config(home: PathBuf, kind: DeviceKind, name: &str) -> Result<PeerConfig> {
    Ok(PeerConfig {
        home,
        kind,
        name: Some(name.into()),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        mdns: false,
        relays: Vec::new(),
        relay_only: false,
        blob_caps: Default::default(),
    })
}

fn trusted(p: &Peer, name: &str) -> TrustedPeer {
    TrustedPeer {
        id: p.device_id(),
        name: name.into(),
        kind: p.kind(),
        addrs: Vec::new(),
        paired_at: now_ms(),
        last_seen: None,
        last_sync_at: None,
        revoked: false,
    }
}

/// Builds the two homes the way a paired desktop and phone come to hold them: the phone queues
/// tasks, they sync, the desktop writes four facts per task, they sync back.
async fn build_fixture(dir: &Path, tasks: usize) -> Result<Fixture> {
    let d = Peer::open(peer_config(
        dir.join("desktop"),
        DeviceKind::Desktop,
        "bench-desktop",
    )?)?;
    let p = Peer::open(peer_config(
        dir.join("phone"),
        DeviceKind::Phone,
        "bench-phone",
    )?)?;
    d.publish_self(vec!["shell".into()]).await?;
    d.trust(trusted(&p, "bench-phone")).await?;
    p.trust(trusted(&d, "bench-desktop")).await?;
    d.start().await?;
    p.start().await?;
    let addrs = d.node().context("desktop network")?.listen_addrs().await?;
    p.dial(d.peer_id(), addrs).await?;
    let (dp, pp) = (d.peer_id(), p.peer_id());
    poll("the first sync", STEP, || async {
        (p.replica().genesis().is_some() && p.is_in_sync(&dp) && d.is_in_sync(&pp)).then_some(())
    })
    .await?;
    let target = d.device_id();
    let mut next = 0;
    while next < tasks {
        let end = (next + FIXTURE_BATCH).min(tasks);
        let target = target.clone();
        let (ids, _) = p
            .replica()
            .commit(move |doc| {
                (next..end)
                    .map(|i| {
                        doc.enqueue_task(
                            &NewTask {
                                instruction: format!("task {i}: {TASK_TEXT}"),
                                executor: "shell".into(),
                                target: target.clone(),
                                not_after: None,
                                attachments: Vec::new(),
                            },
                            now_ms(),
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        let last = *ids.last().context("empty batch")?;
        poll("the desktop to receive a batch", LONG, || async {
            d.replica()
                .read(move |doc| doc.task(&last).is_some())
                .await
                .ok()
                .filter(|x| *x)
        })
        .await?;
        d.replica()
            .commit(move |doc| {
                for (k, id) in ids.iter().enumerate() {
                    let facts = [
                        EventKind::Delivered,
                        EventKind::Started,
                        EventKind::Output {
                            text: format!("{} rows summarised\n", next + k),
                        },
                        EventKind::Finished { exit_code: 0 },
                    ];
                    for f in &facts[..FACTS_PER_TASK] {
                        doc.append_task_event(*id, 1, f, now_ms())?;
                    }
                }
                Ok(())
            })
            .await?;
        next = end;
        if (next / FIXTURE_BATCH).is_multiple_of(10) {
            progress!("fixture {next}/{tasks} tasks");
        }
    }
    poll("both homes to hold the same thread", LONG, || async {
        let (a, b) = (heads(&d).await.ok()?, heads(&p).await.ok()?);
        (a == b && p.is_in_sync(&dp) && d.is_in_sync(&pp)).then_some(())
    })
    .await?;
    // Let the last acknowledgements (and their sync states) reach both stores.
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.shutdown().await;
    d.shutdown().await;
    let genesis = d.replica().genesis().context("desktop thread")?;
    let documents = d.replica().documents().len() as u32;
    let (mut changes, mut save_bytes) = (0, 0);
    for n in 0..documents {
        let doc_id = if n == 0 {
            genesis.doc_id()
        } else {
            genesis.segment_doc_id(n)
        };
        let parts = d
            .replica()
            .store_blocking(move |s| s.load_doc(&doc_id))
            .await??;
        let mut am = automerge::Automerge::new();
        for part in parts.parts() {
            am.load_incremental(part)?;
        }
        changes += am.get_changes(&[]).len();
        let save = am.save();
        save_bytes += save.len();
        std::fs::write(dir.join(format!("thread.{n}.automerge")), &save)?;
    }
    Ok(Fixture {
        dir: dir.to_owned(),
        format: FIXTURE_FORMAT,
        tasks,
        facts_per_task: FACTS_PER_TASK,
        changes,
        desktop_id: d.peer_id().to_base58(),
        phone_id: p.peer_id().to_base58(),
        genesis,
        save_bytes,
        documents,
        build_secs: 0.0,
    })
}

// ---- references measured in-process ------------------------------------------------------

/// Loopback TCP round trips of `payload` bytes (echoed back) through plain std sockets.
fn tcp_floor(payload: usize, runs: usize) -> Result<Vec<f64>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; payload];
        loop {
            if s.read_exact(&mut buf).is_err() {
                return Ok(());
            }
            s.write_all(&buf)?;
        }
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let msg = vec![0x5au8; payload];
    let mut back = vec![0u8; payload];
    let mut out = Vec::with_capacity(runs);
    for i in 0..runs + runs / 10 {
        let t = Instant::now();
        c.write_all(&msg)?;
        c.read_exact(&mut back)?;
        if i >= runs / 10 {
            out.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    drop(c);
    let _ = server.join();
    Ok(out)
}

/// P2's floor: the same thread engine as the peers, in one process, over copies of the
/// fixture's two homes (real redb files, durable writes), joined in memory
/// (`errand_crdt::engine::loopback`): the phone queues `n` tasks offline, then the time and
/// the payload bytes of the session that catches the desktop up. Everything but the network
/// and the wire encoding.
fn inproc_catch_up(fx: &Fixture, n: usize) -> Result<(f64, f64)> {
    use errand_crdt::{
        Store,
        engine::{Engine, EngineConfig, loopback},
    };
    let dir = tempfile::tempdir()?;
    copy_dir(&fx.desktop(), &dir.path().join("desktop"))?;
    copy_dir(&fx.phone(), &dir.path().join("phone"))?;
    let config = EngineConfig {
        ops_per_minute: u64::MAX / 2,
        segment_limit: None,
    };
    let mut desktop = Engine::open(Store::open(&dir.path().join("desktop"))?, config)?;
    let mut phone = Engine::open(Store::open(&dir.path().join("phone"))?, config)?;
    let desktop_id: DeviceId = fx.desktop_id.parse()?;
    let phone_id: DeviceId = fx.phone_id.parse()?;
    loopback::sync(&mut phone, &phone_id, &mut desktop, &desktop_id)?;
    for i in 0..n {
        phone.commit(|d| {
            d.enqueue_task(
                &NewTask {
                    instruction: format!("offline task {i}: {TASK_TEXT}"),
                    executor: "shell".into(),
                    target: desktop_id.clone(),
                    not_after: None,
                    attachments: Vec::new(),
                },
                now_ms(),
            )
        })?;
    }
    let t = Instant::now();
    let x = loopback::sync(&mut phone, &phone_id, &mut desktop, &desktop_id)?;
    Ok((t.elapsed().as_secs_f64() * 1e3, x.bytes as f64))
}

// ---- a desktop and a phone bench peer ----------------------------------------------------

/// A desktop and a phone bench peer on copies of a fixture, connected and in sync.
struct PeerPair {
    desktop: Proc,
    phone: Proc,
    desktop_id: String,
    phone_id: String,
    /// What the phone dials.
    desktop_addr: String,
    desktop_port: Option<u16>,
}

fn start_pair(ctx: &mut Ctx, fx: &Fixture, label: &str, relay: Option<&str>) -> Result<PeerPair> {
    let dir = ctx.fresh_dir(label)?;
    copy_dir(&fx.desktop(), &dir.join("desktop"))?;
    copy_dir(&fx.phone(), &dir.join("phone"))?;
    let extra: Vec<String> = match relay {
        Some(r) => vec!["--relay".into(), r.into(), "--relay-only".into()],
        None => Vec::new(),
    };
    let (mut desktop, ready) =
        ctx.bench_peer("desktop", &dir.join("desktop"), "desktop", &extra)?;
    let direct = ready["listen_addrs"][0]
        .as_str()
        .context("the desktop has no listen address")?
        .to_owned();
    let desktop_addr = match relay {
        None => direct.clone(),
        Some(r) => {
            let end = Instant::now() + STEP;
            loop {
                let s = desktop.request("status", "status", STEP)?;
                if s["status"]["relay"]["reservation"] == "accepted" {
                    break;
                }
                if Instant::now() > end {
                    bail!(
                        "the desktop got no reservation on the relay: {}",
                        s["status"]["relay"]
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            progress!("the desktop holds a reservation on the relay");
            format!("{r}/p2p-circuit/p2p/{}", fx.desktop_id)
        }
    };
    let (mut phone, _) = ctx.bench_peer("phone", &dir.join("phone"), "phone", &extra)?;
    phone.request(
        &format!("dial {} {desktop_addr}", fx.desktop_id),
        "dialing",
        STEP,
    )?;
    let (d, p) = (fx.desktop_id.clone(), fx.phone_id.clone());
    phone.wait_ev("the phone in sync", LONG, |v| {
        v["ev"] == "in_sync" && v["peer"] == d.as_str()
    })?;
    progress!("{label}: the phone is in sync");
    desktop.wait_ev("the desktop in sync", LONG, |v| {
        v["ev"] == "in_sync" && v["peer"] == p.as_str()
    })?;
    Ok(PeerPair {
        desktop,
        phone,
        desktop_id: d,
        phone_id: p,
        desktop_port: port_of(&direct),
        desktop_addr,
    })
}

impl PeerPair {
    /// Sync frame bytes the desktop sent to and received from the phone, this process.
    fn traffic(&mut self) -> Result<(u64, u64)> {
        let s = self.desktop.request("status", "status", STEP)?;
        let p = s["status"]["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["id"] == self.phone_id.as_str())
            .context("the phone is not among the desktop's peers")?;
        Ok((
            p["bytes_sent"].as_u64().unwrap_or(0),
            p["bytes_received"].as_u64().unwrap_or(0),
        ))
    }

    /// One task from the phone to the desktop: (latency ms, phone commit ms, the sent event).
    fn one_task(&mut self, text: &str, measure: bool) -> Result<(f64, f64, Value)> {
        self.phone.clear();
        self.desktop.clear();
        let cmd = if measure { "send-measure" } else { "send" };
        let sent = self.phone.request(&format!("{cmd} {text}"), "sent", STEP)?;
        let task = sent["task"].as_str().context("task id")?.to_owned();
        let merged = self
            .desktop
            .wait_ev("the task merged on the desktop", LONG, |v| {
                v["ev"] == "merged"
                    && v["tasks"]
                        .as_array()
                        .is_some_and(|ts| ts.iter().any(|t| t == task.as_str()))
            })?;
        // The desktop's acknowledgement: the phone sees it in sync again.
        let d = self.desktop_id.clone();
        let _ = self.phone.wait_ev("the acknowledgement", STEP, |v| {
            v["ev"] == "in_sync" && v["peer"] == d.as_str()
        });
        let t0 = ns(&sent, "t0")?;
        Ok((
            ms_between(t0, ns(&merged, "t")?),
            ms_between(t0, ns(&sent, "t1")?),
            sent,
        ))
    }

    fn stop(self) {
        self.phone.stop();
        self.desktop.stop();
    }
}

// ---- P1 and P3 ---------------------------------------------------------------------------

/// Sync frame bytes of one task's round (phone → desktop and back), for the floor's payload.
struct P1Out {
    latency: Vec<f64>,
    commit: Vec<f64>,
    payload: Option<u64>,
}

fn p1_samples(ctx: &Ctx, pair: &mut PeerPair) -> Result<P1Out> {
    let plan = &ctx.plan;
    let mut out = P1Out {
        latency: Vec::new(),
        commit: Vec::new(),
        payload: None,
    };
    for i in 0..plan.p1_warmup + plan.p1_runs {
        std::thread::sleep(Duration::from_millis(plan.p1_gap_ms));
        let before = if i == 0 { Some(pair.traffic()?) } else { None };
        let (lat, commit, _) = pair.one_task(&format!("bench task {i}: {TASK_TEXT}"), false)?;
        if let Some((_, r0)) = before {
            let (_, r1) = pair.traffic()?;
            out.payload = Some(r1 - r0);
        }
        if i >= plan.p1_warmup {
            out.latency.push(lat);
            out.commit.push(commit);
        }
    }
    Ok(out)
}

/// P3 on a connected pair: bytes both ways and the desktop's CPU for one new task.
struct P3Out {
    bytes: Vec<f64>,
    tcp_bytes: Vec<f64>,
    cpu_ms: Vec<f64>,
    change_bytes: Vec<f64>,
    idle_cpu_ms_per_s: f64,
}

fn cpu(p: &mut Proc) -> Result<(u64, u64)> {
    let v = p.request("cpu", "cpu", STEP)?;
    Ok((ns(&v, "t")?, ns(&v, "cpu_ns")?))
}

fn p3_samples(ctx: &Ctx, pair: &mut PeerPair) -> Result<P3Out> {
    // The desktop's idle CPU rate, subtracted from each window.
    let (ta, ca) = cpu(&mut pair.desktop)?;
    std::thread::sleep(Duration::from_millis(ctx.plan.settle_ms));
    let (tb, cb) = cpu(&mut pair.desktop)?;
    let idle_rate = (cb - ca) as f64 / (tb - ta).max(1) as f64;
    let mut out = P3Out {
        bytes: Vec::new(),
        tcp_bytes: Vec::new(),
        cpu_ms: Vec::new(),
        change_bytes: Vec::new(),
        idle_cpu_ms_per_s: idle_rate * 1e3,
    };
    for i in 0..ctx.plan.p3_runs {
        std::thread::sleep(Duration::from_millis(ctx.plan.p1_gap_ms));
        let (s0, r0) = pair.traffic()?;
        let tcp0 = pair.desktop_port.and_then(tcp_bytes);
        let (t0, c0) = cpu(&mut pair.desktop)?;
        let (_, _, sent) = pair.one_task(&format!("p3 task {i}: {TASK_TEXT}"), true)?;
        // Whatever the desktop still does for this task (its reply) ends well within this.
        std::thread::sleep(Duration::from_millis(50));
        let (t1, c1) = cpu(&mut pair.desktop)?;
        let tcp1 = pair.desktop_port.and_then(tcp_bytes);
        let (s1, r1) = pair.traffic()?;
        out.bytes.push(((s1 - s0) + (r1 - r0)) as f64);
        if let (Some(a), Some(b)) = (tcp0, tcp1) {
            out.tcp_bytes.push(b.saturating_sub(a) as f64);
        }
        let busy = (c1 - c0) as f64 - idle_rate * (t1 - t0) as f64;
        out.cpu_ms.push(busy.max(0.0) / 1e6);
        out.change_bytes
            .push(sent["change_bytes"].as_f64().unwrap_or(f64::NAN));
    }
    Ok(out)
}

fn p3_rows(out: &P3Out, fx: &Fixture, quick: bool) -> Vec<Row> {
    let change = median(&out.change_bytes);
    let na = quick
        .then(|| "quick mode measures the small thread; the goal is for the large one".to_owned());
    let what = format!("one new task into the thread ({})", fx.label());
    let mut rows = Vec::new();
    let mut frames = Row::new("P3", format!("{what}: sync frame bytes, both ways"), Unit::Bytes)
        .samples(out.bytes.clone())
        .reference("the change itself (Automerge encoding)", change)
        .goals(vec![Check::P50AtMost(350.0)])
        .note("length prefix + frame header + Automerge sync message: the phone's message with the change, and the desktop's acknowledgement");
    frames.goal_not_applicable = na.clone();
    rows.push(frames);
    let mut tcp = if out.tcp_bytes.is_empty() {
        Row::missing(
            "P3",
            format!("{what}: TCP payload bytes, both ways"),
            Unit::Bytes,
            "`ss` (iproute2) is not available to read the socket's counters".into(),
        )
    } else {
        Row::new("P3", format!("{what}: TCP payload bytes, both ways"), Unit::Bytes)
            .samples(out.tcp_bytes.clone())
            .reference("the change itself (Automerge encoding)", change)
            .goals(vec![Check::P50AtMost(350.0)])
            .note("the same exchange on the wire: the frames inside Yamux and Noise (tcp_info bytes_sent + bytes_received of the desktop's socket)")
    };
    tcp.goal_not_applicable = na.clone();
    rows.push(tcp);
    let mut cpu = Row::new("P3", format!("{what}: receiver (desktop) CPU"), Unit::Ms)
        .samples(out.cpu_ms.clone())
        .goals(vec![Check::P50AtMost(1.0)])
        .note(format!(
            "CLOCK_PROCESS_CPUTIME_ID of the desktop process over the exchange, minus its idle rate ({:.3} ms/s)",
            out.idle_cpu_ms_per_s
        ));
    cpu.goal_not_applicable = na;
    rows.push(cpu);
    rows
}

/// P3's ingest check, in-process: what the owner desktop's replica runs on every change a
/// phone pushes before it applies it (`Replica::receive_changes`): `ThreadDoc::authority_for`
/// of the sending phone, then `ingest::check_pushed` with the phone's bounds, against the part
/// the change is for.
struct IngestOut {
    /// Milliseconds per change: `authority_for` + `check_pushed`.
    check_ms: Vec<f64>,
    /// Milliseconds per change: applying it afterwards, as the replica does next.
    apply_ms: Vec<f64>,
    /// Bytes of each pushed change.
    change_bytes: Vec<f64>,
}

fn ingest_samples(fx: &Fixture, runs: usize) -> Result<IngestOut> {
    let owner_actor = ActorId::try_from(fx.genesis.owner_actor.as_str())
        .map_err(|e| anyhow!("the fixture's owner actor: {e}"))?;
    // The desktop's replica owns the thread: its document writes with the owner's actor, so
    // `authority_for` applies the rules for a phone.
    let mut desktop = fx.load(owner_actor)?;
    if !desktop.owns_thread() {
        bail!("the desktop's copy of the fixture does not own the thread");
    }
    let phone_id: DeviceId = fx
        .phone_id
        .parse()
        .map_err(|e| anyhow!("the fixture's phone id: {e}"))?;
    // The phone writes with the actor the desktop bound to it, so the check admits its changes.
    let authority = desktop.authority_for(&phone_id);
    let phone_actor = desktop
        .devices()
        .into_iter()
        .find(|d| d.id == phone_id)
        .context("the fixture's phone is not in the thread's device map")?
        .actors
        .iter()
        .filter_map(|a| ActorId::try_from(a.as_str()).ok())
        .find(|a| authority.allows(a))
        .context("no actor of the fixture's phone is admitted from it")?;
    let mut phone = fx.load(phone_actor)?;
    // The changes, as the phone's replica pushes them (`Replica::commit`): one task each.
    let target = fx.genesis.owner.clone();
    let mut pushed: Vec<(u32, Vec<u8>)> = Vec::with_capacity(runs);
    for i in 0..runs {
        phone.enqueue_task(
            &NewTask {
                instruction: format!("ingest task {i}: {TASK_TEXT}"),
                executor: "shell".into(),
                target: target.clone(),
                not_after: None,
                attachments: Vec::new(),
            },
            now_ms(),
        )?;
        for n in phone.take_dirty() {
            let part = phone.part_mut(n).context("the part just written")?;
            let bytes: Vec<u8> = part
                .take_local_changes()
                .into_iter()
                .flat_map(|mut c| c.bytes().into_owned())
                .collect();
            if !bytes.is_empty() {
                pushed.push((n, bytes));
            }
        }
    }
    let mut out = IngestOut {
        check_ms: Vec::with_capacity(pushed.len()),
        apply_ms: Vec::with_capacity(pushed.len()),
        change_bytes: Vec::with_capacity(pushed.len()),
    };
    for (n, bytes) in &pushed {
        // A segment the phone just started: the desktop creates it on demand, from its genesis.
        desktop.attach_segment(*n, [])?;
        let t = Instant::now();
        let authority = desktop.authority_for(&phone_id);
        let part = desktop.part_mut(*n).context("the part the change is for")?;
        let checked = ingest::check_pushed(
            bytes,
            part.automerge().document(),
            &authority,
            Bounds::PHONE,
        );
        let check = t.elapsed();
        let checked = checked.context("the ingest check refused the phone's change")?;
        if checked.changes.len() != 1 {
            bail!(
                "the ingest check admitted {} changes of one push (the desktop already held it?)",
                checked.changes.len()
            );
        }
        // Applied afterwards, so the next change is checked against the thread as it would be
        // by then (not timed as part of the check).
        let t = Instant::now();
        part.automerge().apply_changes(checked.changes)?;
        let apply = t.elapsed();
        out.check_ms.push(check.as_secs_f64() * 1e3);
        out.apply_ms.push(apply.as_secs_f64() * 1e3);
        out.change_bytes.push(bytes.len() as f64);
    }
    Ok(out)
}

fn run_ingest(ctx: &Ctx, small: &Fixture, large: Option<&Fixture>) -> Vec<Row> {
    let mut threads = vec![small];
    threads.extend(large);
    let metric = |fx: &Fixture| {
        format!(
            "ingest check of one pushed change (authority + parse + bounds), thread {}",
            fx.label()
        )
    };
    threads
        .into_iter()
        .map(|fx| {
            progress!("P3 ingest check, thread {}", fx.label());
            match ingest_samples(fx, ctx.plan.ingest_runs) {
                Ok(o) => Row::new("P3", metric(fx), Unit::Ms)
                    .samples(o.check_ms)
                    .reference("applying the change afterwards (apply_changes)", median(&o.apply_ms))
                    .goals(vec![Check::P50AtMost(0.1)])
                    .note(format!(
                        "in-process, per change, on the owner desktop's copy: ThreadDoc::authority_for(phone) + ingest::check_pushed(bytes, part, authority, Bounds::PHONE) (split, parse with checksum, held-change lookup, actor, op and string bounds) of one new task the phone pushed ({} median, as Replica::commit sends it), against a part that does not hold it yet; each is applied after it is timed, as one push after another",
                        fmt_value(median(&o.change_bytes), Unit::Bytes)
                    )),
                Err(e) => Row::missing("P3", metric(fx), Unit::Ms, format!("{e:#}")),
            }
        })
        .collect()
}

/// automerge-repo's figure at `path` (`p1.small.median_ms`…), or why it is missing.
fn repo_value(repo: &Result<Value, String>, path: &[&str]) -> Option<Result<f64, String>> {
    Some(match repo {
        Ok(v) => {
            let mut cur = v;
            for p in path {
                cur = &cur[*p];
            }
            cur.as_f64().ok_or_else(|| {
                v["error"].as_str().map_or_else(
                    || format!("no {} in its output", path.join(".")),
                    |e| format!("its run failed: {}", e.lines().next().unwrap_or("")),
                )
            })
        }
        Err(why) => Err(why.clone()),
    })
}

fn p1_row(label: &str, fx: &Fixture, out: &P1Out, floor: &[f64], path: &str) -> Row {
    Row::new(
        "P1",
        format!(
            "{label}, thread {}: commit on phone → merged and stored on desktop",
            fx.label()
        ),
        Unit::Ms,
    )
    .samples(out.latency.clone())
    .reference(
        format!(
            "loopback TCP round trip of {} B",
            out.payload.map_or("?".into(), |p| p.to_string())
        ),
        median(floor),
    )
    .goals(if path == "direct" {
        vec![
            Check::P50AtMost(2.0),
            Check::P99AtMost(5.0),
            Check::RepoRatioAtMost(0.5),
        ]
    } else {
        Vec::new()
    })
    .note(format!(
        "the phone's own durable commit is {} of it (median)",
        fmt_value(median(&out.commit), Unit::Ms)
    ))
}

fn run_p1_p3(ctx: &mut Ctx, small: &Fixture, large: Option<&Fixture>, want_p3: bool) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut threads: Vec<(&Fixture, &str)> = vec![(small, "small")];
    if let Some(l) = large {
        threads.push((l, "large"));
    }
    let mut payload = None;
    let mut pending_p1: Vec<(String, &Fixture, P1Out, &str)> = Vec::new();
    for (fx, size) in &threads {
        progress!("P1 direct, {size} thread");
        let result = (|| -> Result<()> {
            let mut pair = start_pair(ctx, fx, &format!("p1-{size}"), None)?;
            let out = p1_samples(ctx, &mut pair)?;
            payload = payload.or(out.payload);
            pending_p1.push((format!("direct, {size}"), fx, out, "direct"));
            // P3 is for the large thread; quick mode has only the small one.
            let p3_here = want_p3 && (*size == "large" || large.is_none());
            if p3_here {
                progress!("P3, {size} thread");
                let o = p3_samples(ctx, &mut pair)?;
                rows.extend(p3_rows(&o, fx, large.is_none()));
            }
            pair.stop();
            Ok(())
        })();
        if let Err(e) = result {
            rows.push(Row::missing(
                "P1",
                format!("direct, {size} thread"),
                Unit::Ms,
                format!("{e:#}"),
            ));
        }
    }
    // Over a relay process (default limits), small thread.
    progress!("P1 through errand-relay, small thread");
    let relayed = (|| -> Result<P1Out> {
        let relay = spawn_relay(ctx, &[])?;
        let mut pair = start_pair(ctx, small, "p1-relay", Some(&relay.1))?;
        let out = p1_samples(ctx, &mut pair)?;
        pair.stop();
        drop(relay);
        Ok(out)
    })();
    match relayed {
        Ok(out) => pending_p1.push((
            "through errand-relay (--relay-only), small".into(),
            small,
            out,
            "relay",
        )),
        Err(e) => rows.push(Row::missing(
            "P1",
            "through errand-relay, small thread",
            Unit::Ms,
            format!("{e:#}"),
        )),
    }
    let floor = tcp_floor(payload.unwrap_or(300) as usize, ctx.plan.floor_runs).unwrap_or_default();
    let mut p1_rows: Vec<Row> = pending_p1
        .iter()
        .map(|(label, fx, out, path)| p1_row(label, fx, out, &floor, path))
        .collect();
    p1_rows.extend(rows);
    p1_rows
}

// ---- P2 ----------------------------------------------------------------------------------

struct P2Run {
    ms: f64,
    bytes: f64,
    tcp_bytes: Option<f64>,
}

fn p2_run(ctx: &mut Ctx, fx: &Fixture, n: usize) -> Result<P2Run> {
    let mut pair = start_pair(ctx, fx, &format!("p2-{n}"), None)?;
    pair.phone.request("stop-net", "net", STEP)?;
    let p = pair.phone_id.clone();
    pair.desktop
        .wait_ev("the desktop to see the phone go", STEP, |v| {
            v["ev"] == "disconnected" && v["peer"] == p.as_str()
        })?;
    pair.phone
        .request(&format!("fill {n} offline task"), "filled", LONG)?;
    let (s0, r0) = pair.traffic()?;
    pair.phone.clear();
    pair.desktop.clear();
    let up = pair.phone.request(
        &format!("start-net {} {}", pair.desktop_id, pair.desktop_addr),
        "net",
        STEP,
    )?;
    let t0 = ns(&up, "t0")?;
    let mut seen: HashSet<String> = HashSet::new();
    let mut last = t0;
    while seen.len() < n {
        let v = pair
            .desktop
            .wait_ev("the offline tasks to merge", LONG, |v| v["ev"] == "merged")?;
        seen.extend(
            v["tasks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(str::to_owned)),
        );
        last = ns(&v, "t")?;
    }
    let d = pair.desktop_id.clone();
    pair.phone.wait_ev("the phone in sync", LONG, |v| {
        v["ev"] == "in_sync" && v["peer"] == d.as_str()
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let (s1, r1) = pair.traffic()?;
    let tcp = pair.desktop_port.and_then(tcp_bytes).map(|b| b as f64);
    pair.stop();
    Ok(P2Run {
        ms: ms_between(t0, last),
        bytes: ((s1 - s0) + (r1 - r0)) as f64,
        tcp_bytes: tcp,
    })
}

fn run_p2(ctx: &mut Ctx, fx: &Fixture, repo: &Result<Value, String>) -> Vec<Row> {
    let mut rows = Vec::new();
    for n in ctx.plan.p2_sizes.clone() {
        progress!("P2, {n} offline tasks");
        let mut runs = Vec::new();
        let mut err = None;
        for _ in 0..ctx.plan.p2_runs {
            match p2_run(ctx, fx, n) {
                Ok(r) => runs.push(r),
                Err(e) => {
                    err = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        let floor: Vec<(f64, f64)> = (0..ctx.plan.p2_runs)
            .filter_map(|_| inproc_catch_up(fx, n).ok())
            .collect();
        let label = format!(
            "catch-up of {n} tasks queued offline on the phone (base thread {})",
            fx.label()
        );
        if runs.is_empty() {
            let why = err.unwrap_or_else(|| "no run".into());
            rows.push(Row::missing(
                "P2",
                format!("{label}: time"),
                Unit::Ms,
                why.clone(),
            ));
            rows.push(Row::missing(
                "P2",
                format!("{label}: bytes"),
                Unit::Bytes,
                why,
            ));
            continue;
        }
        let key = n.to_string();
        let big = n >= 10_000;
        let mut time = Row::new("P2", format!("{label}: time"), Unit::Ms)
            .samples(runs.iter().map(|r| r.ms).collect())
            .reference(
                "the same engine in one process (real redb files, no network)",
                median(&floor.iter().map(|f| f.0).collect::<Vec<_>>()),
            )
            .goals(if big {
                vec![
                    Check::P50AtMost(600.0),
                    Check::RefRatioAtMost(1.5),
                    Check::RepoRatioAtMost(0.5),
                ]
            } else {
                vec![Check::RepoRatioAtMost(0.5)]
            })
            .note("phone network up (t0) → the desktop's last merge of them is stored");
        time.repo = repo_value(repo, &["p2", &key, "median_ms"]);
        let tcp: Vec<f64> = runs.iter().filter_map(|r| r.tcp_bytes).collect();
        let mut bytes = Row::new("P2", format!("{label}: bytes"), Unit::Bytes)
            .samples(runs.iter().map(|r| r.bytes).collect())
            .reference(
                "the same engine in one process: payload bytes",
                median(&floor.iter().map(|f| f.1).collect::<Vec<_>>()),
            )
            .goals(if big {
                vec![Check::P50AtMost(600_000.0), Check::RefRatioAtMost(1.5), Check::RepoRatioAtMost(0.5)]
            } else {
                vec![Check::RepoRatioAtMost(0.5)]
            })
            .note(format!(
                "sync frames both ways, hello included; TCP payload of the new connection (Noise, Yamux, identify, ping too): {}",
                if tcp.is_empty() { "not measured".into() } else { fmt_value(median(&tcp), Unit::Bytes) }
            ));
        bytes.repo = repo_value(repo, &["p2", &key, "bytes"]);
        if let Some(e) = err {
            time.note.push_str(&format!("; a later run failed: {e}"));
        }
        rows.push(time);
        rows.push(bytes);
    }
    rows
}

// ---- P4 ----------------------------------------------------------------------------------

fn run_p4(ctx: &mut Ctx, fx: &Fixture) -> Result<Vec<Row>> {
    let bin = ctx.bin("errand-desktop")?;
    let mut ready = Vec::new();
    let mut sizes = Vec::new();
    for i in 0..=ctx.plan.p4_runs {
        let home = ctx.fresh_dir("p4")?.join("desktop");
        copy_dir(&fx.desktop(), &home)?;
        let args: Vec<String> = [
            "--home",
            &home.display().to_string(),
            "run",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let t = Instant::now();
        let mut d = Proc::spawn("errand-desktop", &bin, &args, &ctx.logs)?;
        let (at, _) = d.wait_line("running", LONG, |l| l.contains(" running"))?;
        // Run 0 warms the page cache and is not reported.
        if i > 0 {
            ready.push(at.duration_since(t).as_secs_f64() * 1e3);
        }
        drop(d);
        if i > 0 {
            sizes.push(dir_bytes(&home) as f64);
        }
    }
    let save = fx.save()?;
    let mut load = Vec::new();
    for _ in 0..ctx.plan.p4_runs.max(3) {
        let t = Instant::now();
        let docs = save
            .iter()
            .map(|(_, b)| automerge::Automerge::load(b))
            .collect::<Result<Vec<_>, _>>()?;
        load.push(t.elapsed().as_secs_f64() * 1e3);
        drop(docs);
    }
    let na = ctx
        .plan
        .quick
        .then(|| "quick mode measures the small thread; the goal is for the large one".to_owned());
    let mut time = Row::new(
        "P4",
        format!("desktop cold start, thread {}: time to ready", fx.label()),
        Unit::Ms,
    )
    .samples(ready)
    .reference("automerge::Automerge::load of its save()", median(&load))
    .goals(vec![Check::P50AtMost(300.0)])
    .note("`errand-desktop run` spawned → its \"running\" line (store open, thread loaded, runner scan, network and control socket up)");
    time.goal_not_applicable = na.clone();
    let mut size = Row::new(
        "P4",
        format!("desktop home on disk, thread {}", fx.label()),
        Unit::Bytes,
    )
    .samples(sizes)
    .reference("the thread's save()", fx.save_bytes as f64)
    .goals(vec![Check::P50AtMost(2_000_000.0)])
    .note("apparent size of every file in the home after the run (redb store, config)");
    size.goal_not_applicable = na;
    Ok(vec![time, size])
}

// ---- P5 ----------------------------------------------------------------------------------

/// Starts `errand-relay` on loopback with extra flags; returns it and its address.
fn spawn_relay(ctx: &mut Ctx, extra: &[&str]) -> Result<(Proc, String)> {
    let home = ctx.fresh_dir("relay")?;
    let mut args: Vec<String> = [
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--home",
        &home.display().to_string(),
        "--stats-interval",
        "0s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut p = Proc::spawn("errand-relay", &ctx.bin("errand-relay")?, &args, &ctx.logs)?;
    let (_, addr) = p.wait_line("the relay address", STEP, |l| l.contains("/p2p/"))?;
    Ok((p, addr.trim().to_owned()))
}

/// Limits for the reservation test: every count limit out of the way, rate limits off (all
/// clients come from 127.0.0.1), unlimited circuit bytes for the throughput test.
const P5_RELAY_FLAGS: &[&str] = &[
    "--max-reservations",
    "20000",
    "--max-circuits",
    "20000",
    "--max-connections",
    "40000",
    "--max-pending-connections",
    "1024",
    "--reservation-rate-per-peer",
    "0",
    "--reservation-rate-per-ip",
    "0",
    "--circuit-rate-per-peer",
    "0",
    "--circuit-rate-per-ip",
    "0",
    "--max-circuit-bytes",
    "0",
];

struct RelayMem {
    per_reservation_kib: f64,
    per_circuit_kib: f64,
    base_mb: f64,
    /// What the relay itself counted at the end.
    counters: String,
}

/// RSS of a relay before, with `n` idle reservations, and with `m` idle circuits more.
fn relay_memory(ctx: &Ctx, relay: &mut Proc, addr: &str) -> Result<RelayMem> {
    let (n, m) = (ctx.plan.p5_reservations, ctx.plan.p5_circuits);
    std::thread::sleep(Duration::from_millis(500));
    let r0 = rss_bytes(relay.pid())?;
    let args: Vec<String> = ["reserve", "--relay", addr, "--count", &n.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut clients = Proc::spawn("reserve", &ctx.bin("errand-benchpeer")?, &args, &ctx.logs)?;
    let v = clients.wait_ev("reservations", LONG, |v| v["ev"] == "reserved")?;
    progress!(
        "{} reservations in {:.1} s",
        v["n"],
        v["ms"].as_f64().unwrap_or(0.0) / 1e3
    );
    if v["n"].as_u64() != Some(n as u64) {
        bail!(
            "only {} of {n} reservations were accepted (first error: {})",
            v["n"],
            v["first_error"]
        );
    }
    ctx.settle();
    let r1 = rss_bytes(relay.pid())?;
    let v = clients.request(&format!("circuits {m}"), "circuits", LONG)?;
    progress!("{} circuits", v["n"]);
    if v["n"].as_u64() != Some(m as u64) {
        bail!(
            "only {} of {m} circuits came up (first error: {})",
            v["n"],
            v["first_error"]
        );
    }
    ctx.settle();
    let r2 = rss_bytes(relay.pid())?;
    let counters = relay_counters(relay).unwrap_or_else(|e| format!("counters unavailable: {e:#}"));
    clients.stop();
    Ok(RelayMem {
        per_reservation_kib: (r1 - r0) / 1024.0 / n as f64,
        per_circuit_kib: (r2 - r1) / 1024.0 / m as f64,
        base_mb: r0 / 1e6,
        counters,
    })
}

/// The relay's own counters (errand-relay: its `relay-stats` line after SIGUSR1; the stock
/// relay: its `stats` answer), to confirm what the RSS figures were taken with.
fn relay_counters(relay: &mut Proc) -> Result<String> {
    if relay.name == "stock-relay" {
        let v = relay.request("stats", "stats", STEP)?;
        return Ok(format!(
            "reservations {}, circuits {}",
            v["reservations"], v["circuits"]
        ));
    }
    let before = std::fs::read_to_string(&relay.stderr_path)?.len();
    Command::new("kill")
        .args(["-USR1", &relay.pid().to_string()])
        .status()?;
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        let log = std::fs::read_to_string(&relay.stderr_path)?;
        if let Some(line) = log
            .get(before..)
            .and_then(|new| new.lines().rfind(|l| l.starts_with("relay-stats ")))
        {
            let v: Value = serde_json::from_str(line.trim_start_matches("relay-stats "))?;
            return Ok(format!(
                "reservations {}, circuits {}, connections {}",
                v["reservations"], v["circuits"], v["connections"]
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("no relay-stats line after SIGUSR1")
}

fn run_p5(ctx: &mut Ctx) -> Vec<Row> {
    let (n, m) = (ctx.plan.p5_reservations, ctx.plan.p5_circuits);
    let mut ours = Vec::new();
    let mut stock = Vec::new();
    let mut errors = Vec::new();
    let mut throughput: Result<Value> = Err(anyhow!("not run"));
    for run in 0..ctx.plan.p5_runs {
        match (|| -> Result<RelayMem> {
            let (mut relay, addr) = spawn_relay(ctx, P5_RELAY_FLAGS)?;
            let mem = relay_memory(ctx, &mut relay, &addr)?;
            if run + 1 == ctx.plan.p5_runs {
                let args: Vec<String> = [
                    "throughput",
                    "--relay",
                    &addr,
                    "--bytes",
                    &ctx.plan.throughput_bytes.to_string(),
                    "--runs",
                    &ctx.plan.throughput_runs.to_string(),
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                throughput = Proc::spawn(
                    "throughput",
                    &ctx.bin("errand-benchpeer")?,
                    &args,
                    &ctx.logs,
                )
                .and_then(|mut p| p.wait_ev("throughput", LONG, |v| v["ev"] == "throughput"));
            }
            Ok(mem)
        })() {
            Ok(mem) => ours.push(mem),
            Err(e) => errors.push(format!("errand-relay: {e:#}")),
        }
        match (|| -> Result<RelayMem> {
            let args = vec!["stock-relay".to_owned()];
            let mut relay = Proc::spawn(
                "stock-relay",
                &ctx.bin("errand-benchpeer")?,
                &args,
                &ctx.logs,
            )?;
            let ready = relay.wait_ev("stock relay", STEP, |v| v["ev"] == "ready")?;
            let addr = ready["addr"].as_str().context("addr")?.to_owned();
            relay_memory(ctx, &mut relay, &addr)
        })() {
            Ok(mem) => stock.push(mem),
            Err(e) => errors.push(format!("stock relay: {e:#}")),
        }
    }
    let mut rows = Vec::new();
    let err = errors.join("; ");
    let stock_res: Vec<f64> = stock.iter().map(|m| m.per_reservation_kib).collect();
    let stock_circ: Vec<f64> = stock.iter().map(|m| m.per_circuit_kib).collect();
    if ours.is_empty() {
        rows.push(Row::missing(
            "P5",
            "relay RSS per idle reservation",
            Unit::KiB,
            err.clone(),
        ));
        rows.push(Row::missing(
            "P5",
            "relay RSS per idle circuit",
            Unit::KiB,
            err.clone(),
        ));
    } else {
        let mut res = Row::new(
            "P5",
            format!("errand-relay RSS per idle reservation ({n} reservations)"),
            Unit::KiB,
        )
        .samples(ours.iter().map(|m| m.per_reservation_kib).collect())
        .goals(vec![Check::P50AtMost(45.0)])
        .note(format!(
            "VmRSS delta / {n}; client swarms with relay client + identify + ping (no rendezvous registration); relay RSS before: {:.1} MB; relay's counters at the end: {}",
            median(&ours.iter().map(|m| m.base_mb).collect::<Vec<_>>()),
            ours.last().map_or("", |m| m.counters.as_str())
        ));
        if !stock_res.is_empty() {
            res = res.reference(
                "stock rust-libp2p relay (relay+identify+ping)",
                median(&stock_res),
            );
        }
        let mut circ = Row::new(
            "P5",
            format!("errand-relay RSS per idle circuit ({m} circuits)"),
            Unit::KiB,
        )
        .samples(ours.iter().map(|m| m.per_circuit_kib).collect())
        .goals(vec![Check::P50AtMost(45.0)])
        .note("VmRSS delta / circuits; reserved client 2k dials reserved client 2k+1 through the relay over the connection holding its own reservation (as a phone does): the circuit adds the relayed stream pair, no connection");
        if !stock_circ.is_empty() {
            circ = circ.reference("stock rust-libp2p relay", median(&stock_circ));
        }
        if !err.is_empty() {
            res.note.push_str(&format!("; failures: {err}"));
        }
        rows.push(res);
        rows.push(circ);
    }
    match throughput {
        Ok(v) => {
            let f = |k: &str| -> Vec<f64> {
                v["mbps"][k]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_f64)
                    .collect()
            };
            let (direct, relayed) = (f("direct"), f("relayed"));
            rows.push(
                Row::new(
                    "P5",
                    format!(
                        "relayed throughput ({} per run, one libp2p stream through errand-relay)",
                        fmt_value(ctx.plan.throughput_bytes as f64, Unit::Bytes)
                    ),
                    Unit::MBps,
                )
                .samples(relayed)
                .reference("direct connection, same stream test", median(&direct))
                .goals(vec![Check::RefRatioAtLeast(0.5)])
                .note("loopback, so CPU-bound: the relayed path runs Noise three times per byte (end-to-end inside the circuit, plus client→relay and relay→server) where the direct one runs it once, on the same 2 cores"),
            );
        }
        Err(e) => rows.push(Row::missing(
            "P5",
            "relayed throughput",
            Unit::MBps,
            format!("{e:#}"),
        )),
    }
    rows
}

// ---- P6 ----------------------------------------------------------------------------------

fn run_p6(ctx: &mut Ctx) -> Vec<Row> {
    let mut inproc = Vec::new();
    let mut errors = Vec::new();
    for _ in 0..ctx.plan.p6_runs {
        let r = (|| -> Result<f64> {
            let dir = ctx.fresh_dir("p6")?;
            let (mut d, _) = ctx.bench_peer("desktop", &dir.join("desktop"), "desktop", &[])?;
            let (mut p, ready) = ctx.bench_peer("phone", &dir.join("phone"), "phone", &[])?;
            let phone_id = ready["peer_id"].as_str().context("peer id")?.to_owned();
            let ticket = d.request("ticket", "ticket", STEP)?;
            let ticket = ticket["ticket"].as_str().context("ticket")?.to_owned();
            let paired = p.request(&format!("pair {ticket}"), "paired", STEP)?;
            if paired["result"]["synced"] != true {
                bail!(
                    "paired, but the first sync did not finish: {}",
                    paired["result"]
                );
            }
            let s = d.request("status", "status", STEP)?;
            let trusted = s["status"]["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|x| x["id"] == phone_id.as_str());
            if !trusted {
                bail!("the desktop does not list the phone as trusted after pairing");
            }
            let ms = ms_between(ns(&paired, "t0")?, ns(&paired, "t1")?);
            p.stop();
            d.stop();
            Ok(ms)
        })();
        match r {
            Ok(ms) => inproc.push(ms),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let mut cli = Vec::new();
    for _ in 0..ctx.plan.p6_cli_runs {
        let r = (|| -> Result<f64> {
            let dir = ctx.fresh_dir("p6cli")?;
            let (mut d, _) = ctx.bench_peer("desktop", &dir.join("desktop"), "desktop", &[])?;
            let ticket = d.request("ticket", "ticket", STEP)?;
            let ticket = ticket["ticket"].as_str().context("ticket")?.to_owned();
            let home = dir.join("phone").display().to_string();
            let t = Instant::now();
            let v = ctx.cli_json(
                "errand-phone",
                &[
                    "--home",
                    &home,
                    "pair",
                    &ticket,
                    "--listen",
                    "/ip4/127.0.0.1/tcp/0",
                    "--no-mdns",
                    "--json",
                ],
            )?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if v["synced"] != true {
                bail!("errand-phone pair did not finish the first sync: {v}");
            }
            d.stop();
            Ok(ms)
        })();
        match r {
            Ok(ms) => cli.push(ms),
            Err(e) => errors.push(format!("CLI: {e:#}")),
        }
    }
    let mut rows = Vec::new();
    let err = errors.join("; ");
    if inproc.is_empty() {
        rows.push(Row::missing(
            "P6",
            "pairing, in the phone's process",
            Unit::Ms,
            err.clone(),
        ));
    } else {
        let mut r = Row::new(
            "P6",
            "pairing (empty thread): ticket text handed to the phone's Peer → durable trust on both sides + first full sync",
            Unit::Ms,
        )
        .samples(inproc)
        .goals(vec![Check::P50AtMost(5.0)])
        .note("api PairWith in a running phone process: dial, /errand/pair/1 + Noise NNpsk0, trust + thread stored, reconnect, first sync to in-sync");
        if !err.is_empty() {
            r.note.push_str(&format!("; failures: {err}"));
        }
        rows.push(r);
    }
    if !cli.is_empty() {
        rows.push(
            Row::new(
                "P6",
                "`errand-phone pair TICKET` wall time (empty thread)",
                Unit::Ms,
            )
            .samples(cli)
            .note(
                "process start, new home (identity, redb), network up, the pairing above, shutdown",
            ),
        );
    } else if ctx.plan.p6_cli_runs > 0 {
        rows.push(Row::missing(
            "P6",
            "`errand-phone pair` wall time",
            Unit::Ms,
            err,
        ));
    }
    rows
}

// ---- P7 ----------------------------------------------------------------------------------

/// The desktop home `dhs` trusts the phone home `phs` (which gets its identity here).
fn trust_phone(ctx: &Ctx, dhs: &str, phs: &str) -> Result<()> {
    let v = ctx.cli_json("errand-phone", &["--home", phs, "status", "--json"])?;
    let phone_id = v["peer_id"].as_str().context("peer id")?.to_owned();
    let out = ctx.cli(
        "errand-desktop",
        &["--home", dhs, "devices", "add", &phone_id],
    )?;
    if !out.status.success() {
        bail!(
            "errand-desktop devices add: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Starts `errand-desktop run` on `dhs` (loopback, no mDNS); returns it, its peer id and its
/// listen address.
fn start_desktop(ctx: &Ctx, dhs: &str) -> Result<(Proc, String, String)> {
    let args: Vec<String> = [
        "--home",
        dhs,
        "run",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut desktop = Proc::spawn(
        "errand-desktop",
        &ctx.bin("errand-desktop")?,
        &args,
        &ctx.logs,
    )?;
    let (_, running) = desktop.wait_line("running", LONG, |l| l.contains(" running"))?;
    let desktop_id = running
        .split_whitespace()
        .nth(1)
        .context("no peer id in the running line")?
        .to_owned();
    let (_, listening) =
        desktop.wait_line("listening", STEP, |l| l.starts_with("listening on "))?;
    let addr = listening
        .trim_start_matches("listening on ")
        .trim()
        .to_owned();
    Ok((desktop, desktop_id, addr))
}

/// The phone home `phs` trusts the desktop, dialing it at `addr`.
fn trust_desktop(ctx: &Ctx, phs: &str, desktop_id: &str, addr: &str) -> Result<()> {
    let out = ctx.cli(
        "errand-phone",
        &["--home", phs, "devices", "add", desktop_id, "--addr", addr],
    )?;
    if !out.status.success() {
        bail!(
            "errand-phone devices add: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Idle RSS (desktop, phone) of the real daemons, connected and in sync.
fn p7_run(ctx: &mut Ctx, fx: Option<&Fixture>) -> Result<(f64, f64)> {
    let dir = ctx.fresh_dir("p7")?;
    let (dh, ph) = (dir.join("desktop"), dir.join("phone"));
    let (dhs, phs) = (dh.display().to_string(), ph.display().to_string());
    match fx {
        Some(f) => {
            copy_dir(&f.desktop(), &dh)?;
            copy_dir(&f.phone(), &ph)?;
        }
        None => trust_phone(ctx, &dhs, &phs)?,
    }
    let (desktop, desktop_id, addr) = start_desktop(ctx, &dhs)?;
    trust_desktop(ctx, &phs, &desktop_id, &addr)?;
    let args: Vec<String> = [
        "--home",
        &phs,
        "daemon",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut phone = Proc::spawn("errand-phone", &ctx.bin("errand-phone")?, &args, &ctx.logs)?;
    phone.wait_line("running", LONG, |l| l.contains(" running"))?;
    let end = Instant::now() + LONG;
    loop {
        let in_sync = ctx
            .cli_json("errand-phone", &["--home", &phs, "status", "--json"])
            .ok()
            .is_some_and(|v| {
                v["peers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["id"] == desktop_id.as_str() && p["in_sync"] == true)
            });
        if in_sync {
            break;
        }
        if Instant::now() > end {
            bail!("the phone daemon never got in sync with the desktop");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ctx.settle();
    Ok((rss_bytes(desktop.pid())?, rss_bytes(phone.pid())?))
}

fn run_p7(ctx: &mut Ctx, large: Option<&Fixture>) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut cases: Vec<(Option<&Fixture>, usize, f64)> = vec![(None, ctx.plan.p7_runs, 8e6)];
    if let Some(l) = large {
        cases.push((Some(l), ctx.plan.p7_large_runs, 64e6));
    }
    for (fx, runs, goal) in cases {
        let what = fx.map_or("empty thread".to_owned(), |f| {
            format!("thread {}", f.label())
        });
        let mut d = Vec::new();
        let mut p = Vec::new();
        let mut err = None;
        for _ in 0..runs {
            match p7_run(ctx, fx) {
                Ok((a, b)) => {
                    d.push(a);
                    p.push(b);
                }
                Err(e) => err = Some(format!("{e:#}")),
            }
        }
        for (who, s) in [
            ("desktop (`errand-desktop run`)", d),
            ("phone (`errand-phone daemon`)", p),
        ] {
            if s.is_empty() {
                rows.push(Row::missing(
                    "P7",
                    format!("idle RSS, {who}, {what}"),
                    Unit::Bytes,
                    err.clone().unwrap_or_else(|| "no run".into()),
                ));
            } else {
                rows.push(
                    Row::new("P7", format!("idle RSS, {who}, {what}"), Unit::Bytes)
                        .samples(s)
                        .goals(vec![Check::P50AtMost(goal)])
                        .note(format!(
                            "VmRSS {:.0} s after both daemons report in sync",
                            ctx.plan.settle_ms as f64 / 1e3
                        )),
                );
            }
        }
    }
    rows
}

// ---- P8 ----------------------------------------------------------------------------------

fn p8_samples(ctx: &mut Ctx, fx: &Fixture, runs: usize) -> Result<Vec<f64>> {
    let home = ctx.fresh_dir("p8")?.join("phone");
    copy_dir(&fx.phone(), &home)?;
    let h = home.display().to_string();
    let bin = ctx.bin("errand-phone")?;
    let mut out = Vec::new();
    for i in 0..=runs {
        let text = format!("offline task {i}: {TASK_TEXT}");
        let t = Instant::now();
        let status = Command::new(&bin)
            .args(["--home", &h, "send", &text])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if !status.success() {
            bail!("errand-phone send exited {status}");
        }
        if i > 0 {
            out.push(ms);
        }
    }
    Ok(out)
}

fn run_p8(ctx: &mut Ctx, small: &Fixture, large: Option<&Fixture>) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut cases = vec![(small, ctx.plan.p8_runs)];
    if let Some(l) = large {
        cases.push((l, ctx.plan.p8_large_runs));
    }
    for (fx, runs) in cases {
        let metric = format!(
            "`errand-phone send` with no desktop reachable, thread {}",
            fx.label()
        );
        rows.push(match p8_samples(ctx, fx, runs) {
            Ok(s) => Row::new("P8", metric, Unit::Ms)
                .samples(s)
                .goals(vec![Check::P50AtMost(50.0)])
                .note("process spawn → exit 0 (open home, load thread, durable commit); no daemon holds the home"),
            Err(e) => Row::missing("P8", metric, Unit::Ms, format!("{e:#}")),
        });
    }
    rows
}

// ---- P9 ----------------------------------------------------------------------------------

/// Permission round trips through a real `errand-desktop run`, its `acp` executor (the scripted
/// agent, which times each request) and a phone that answers as soon as the request merges.
fn p9_samples(ctx: &mut Ctx, runs: usize) -> Result<Vec<f64>> {
    const WARMUP: usize = 2;
    let dir = ctx.fresh_dir("p9")?;
    let (dh, ph) = (dir.join("desktop"), dir.join("phone"));
    let (dhs, phs) = (dh.display().to_string(), ph.display().to_string());
    let log = dir.join("agent.log");
    std::fs::create_dir_all(&dh)?;
    let agent = [
        ctx.bin("errand-desktop")?.display().to_string(),
        "demo-agent".into(),
        "--log".into(),
        log.display().to_string(),
    ];
    let argv: Vec<String> = agent.iter().map(|a| format!("{a:?}")).collect();
    std::fs::write(
        dh.join("config.toml"),
        format!(
            "[[executors]]\nname = \"agent\"\nkind = \"acp\"\nargv = [{}]\n",
            argv.join(", ")
        ),
    )?;
    trust_phone(ctx, &dhs, &phs)?;
    let (desktop, desktop_id, addr) = start_desktop(ctx, &dhs)?;
    trust_desktop(ctx, &phs, &desktop_id, &addr)?;
    let (mut phone, _) = ctx.bench_peer("p9-phone", &ph, "phone", &[])?;
    phone.wait_ev("in sync with the desktop", LONG, |v| v["ev"] == "in_sync")?;
    phone.request("auto-answer", "auto-answer", STEP)?;
    let waited = |log: &Path| -> Vec<f64> {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == "permission")
            .filter_map(|v| v["waited_ms"].as_f64())
            .collect()
    };
    for i in 0..WARMUP + runs {
        phone.request(
            &format!("send-to agent p9 task {i} [permission]"),
            "sent",
            STEP,
        )?;
        let end = Instant::now() + STEP;
        while waited(&log).len() <= i {
            if Instant::now() > end {
                bail!("no answer reached the agent for task {i}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(ctx.plan.p1_gap_ms));
    }
    phone.stop();
    desktop.stop();
    Ok(waited(&log).into_iter().skip(WARMUP).collect())
}

fn run_p9(ctx: &mut Ctx) -> Vec<Row> {
    let runs = ctx.plan.p9_runs;
    let metric = "permission round trip: the agent's session/request_permission → its answer, phone answering at once, loopback";
    vec![match p9_samples(ctx, runs) {
        Ok(s) => Row::new("P9", metric, Unit::Ms)
            .samples(s)
            .goals(vec![Check::P50AtMost(10.0)])
            .note("timed inside the agent (the scripted ACP agent); the request crosses the desktop's runner, the thread to the phone and the answer back"),
        Err(e) => Row::missing("P9", metric, Unit::Ms, format!("{e:#}")),
    }]
}

// ---- P10 ---------------------------------------------------------------------------------

/// One P10 transfer: the blob's throughput as the fetch timed it, and the peak RSS of each
/// side while it ran.
struct BlobRun {
    mbps: f64,
    desktop_peak: f64,
    phone_peak: f64,
}

/// How often P10 samples the RSS of both sides during a transfer.
const P10_RSS_EVERY: Duration = Duration::from_millis(10);

/// A desktop and a phone that trust each other, directly or through `relay` only; the phone
/// daemon is not running.
struct BlobPair {
    desktop: Proc,
    phs: String,
    net: Vec<String>,
}

fn p10_pair(ctx: &mut Ctx, relay: Option<&str>) -> Result<BlobPair> {
    let dir = ctx.fresh_dir("p10")?;
    let (dh, ph) = (dir.join("desktop"), dir.join("phone"));
    let (dhs, phs) = (dh.display().to_string(), ph.display().to_string());
    trust_phone(ctx, &dhs, &phs)?;
    let Some(relay) = relay else {
        let (desktop, desktop_id, addr) = start_desktop(ctx, &dhs)?;
        trust_desktop(ctx, &phs, &desktop_id, &addr)?;
        return Ok(BlobPair {
            desktop,
            phs,
            net: Vec::new(),
        });
    };
    let args: Vec<String> = [
        "--home",
        &dhs,
        "run",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
        "--relay",
        relay,
        "--relay-only",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut desktop = Proc::spawn(
        "errand-desktop",
        &ctx.bin("errand-desktop")?,
        &args,
        &ctx.logs,
    )?;
    let (_, running) = desktop.wait_line("running", LONG, |l| l.contains(" running"))?;
    let desktop_id = running
        .split_whitespace()
        .nth(1)
        .context("no peer id in the running line")?
        .to_owned();
    let end = Instant::now() + STEP;
    loop {
        let v = ctx.cli_json("errand-desktop", &["--home", &dhs, "status", "--json"])?;
        if v["relay"]["reservation"] == "accepted" {
            break;
        }
        if Instant::now() > end {
            bail!(
                "the desktop got no reservation on the relay: {}",
                v["relay"]
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let circuit = format!("{relay}/p2p-circuit/p2p/{desktop_id}");
    trust_desktop(ctx, &phs, &desktop_id, &circuit)?;
    Ok(BlobPair {
        desktop,
        phs,
        net: vec!["--relay".into(), relay.into(), "--relay-only".into()],
    })
}

/// Has the desktop make a `bytes`-byte artifact (the phone's daemon sends the task and waits
/// for it), then times `errand-phone fetch` of it while sampling both sides' RSS.
fn p10_transfer(ctx: &mut Ctx, pair: &mut BlobPair, bytes: usize) -> Result<BlobRun> {
    let net: Vec<&str> = pair.net.iter().map(String::as_str).collect();
    let mut args: Vec<String> = [
        "--home",
        &pair.phs,
        "daemon",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(pair.net.iter().cloned());
    let mut phone = Proc::spawn("errand-phone", &ctx.bin("errand-phone")?, &args, &ctx.logs)?;
    phone.wait_line("running", LONG, |l| l.contains("running"))?;
    let end = Instant::now() + LONG;
    while ctx
        .cli_json("errand-phone", &["--home", &pair.phs, "thread", "--json"])
        .is_err()
    {
        if Instant::now() > end {
            bail!("the phone never got the desktop's thread");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let sent = ctx.cli_json(
        "errand-phone",
        &[
            "--home",
            &pair.phs,
            "send",
            &format!("head -c {bytes} /dev/urandom > \"$ERRAND_OUT/p10.bin\""),
            "--json",
        ],
    )?;
    let id = sent["task_id"].as_str().context("task id")?.to_owned();
    let end = Instant::now() + LONG;
    loop {
        let t = ctx.cli_json(
            "errand-phone",
            &["--home", &pair.phs, "task", &id, "--json"],
        )?;
        match t["status"].as_str() {
            Some("done") if t["artifacts"].as_array().is_some_and(|a| !a.is_empty()) => break,
            Some("failed" | "cancelled" | "interrupted") => bail!("the artifact task ended: {t}"),
            _ => {}
        }
        if Instant::now() > end {
            bail!("the artifact task did not end: {t}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    terminate(phone)?;
    ctx.settle();
    let into = ctx.fresh_dir("p10-into")?.display().to_string();
    let mut fetch_args = vec![
        "--home",
        &pair.phs,
        "fetch",
        &id,
        &into,
        "--json",
        "--timeout",
        "10m",
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    ];
    fetch_args.extend(net);
    let mut child = Command::new(ctx.bin("errand-phone")?)
        .args(&fetch_args)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_RUST_LOG").unwrap_or("warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (mut desktop_peak, mut phone_peak) = (0f64, 0f64);
    let end = Instant::now() + LONG;
    while child.try_wait()?.is_none() {
        if let Ok(r) = rss_bytes(pair.desktop.pid()) {
            desktop_peak = desktop_peak.max(r);
        }
        if let Ok(r) = rss_bytes(child.id()) {
            phone_peak = phone_peak.max(r);
        }
        if Instant::now() > end {
            let _ = child.kill();
            bail!("the fetch did not end");
        }
        std::thread::sleep(P10_RSS_EVERY);
    }
    let out = child.wait_with_output()?;
    // Kept with the other processes' logs (`--keep`; `BENCH_RUST_LOG` sets their level).
    let _ = std::fs::write(ctx.logs.join(format!("fetch-{id}.stderr")), &out.stderr);
    if !out.status.success() {
        bail!(
            "errand-phone fetch failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("fetch printed no JSON")?;
    let t = &v["transfers"][0];
    let ms = t["ms"].as_f64().context("no transfer time")?;
    if t["resumed_from"].as_u64() != Some(0) {
        bail!("the fetch did not start from zero: {t}");
    }
    let _ = std::fs::remove_dir_all(&into);
    Ok(BlobRun {
        mbps: bytes as f64 / (ms / 1e3) / 1e6,
        desktop_peak,
        phone_peak,
    })
}

/// Stops a daemon with SIGTERM and waits for it to exit (what it merged is then on disk).
fn terminate(mut p: Proc) -> Result<()> {
    Command::new("kill")
        .args(["-TERM", &p.pid().to_string()])
        .status()?;
    let end = Instant::now() + STEP;
    while p.child.try_wait()?.is_none() {
        if Instant::now() > end {
            bail!("{} did not exit after SIGTERM", p.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn p10_runs(ctx: &mut Ctx, relay: Option<&str>) -> Result<Vec<BlobRun>> {
    let mut pair = p10_pair(ctx, relay)?;
    let mut runs = Vec::new();
    for _ in 0..ctx.plan.p10_runs {
        runs.push(p10_transfer(ctx, &mut pair, ctx.plan.p10_bytes)?);
    }
    terminate(pair.desktop)?;
    Ok(runs)
}

fn run_p10(ctx: &mut Ctx) -> Vec<Row> {
    let bytes = ctx.plan.p10_bytes;
    let size = fmt_value(bytes as f64, Unit::Bytes);
    let mut rows = Vec::new();
    // The floor, in the same run: bytes through one libp2p stream (TCP + Noise + Yamux),
    // directly and through the relay, as P5 measures it.
    let relay = spawn_relay(ctx, P5_RELAY_FLAGS);
    let raw: Result<Value> = relay
        .as_ref()
        .map_err(|e| anyhow!("{e:#}"))
        .and_then(|(_, addr)| {
            let args: Vec<String> = [
                "throughput",
                "--relay",
                addr,
                "--bytes",
                &bytes.to_string(),
                "--runs",
                &ctx.plan.p10_runs.max(2).to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            Proc::spawn(
                "throughput",
                &ctx.bin("errand-benchpeer")?,
                &args,
                &ctx.logs,
            )
            .and_then(|mut p| p.wait_ev("throughput", LONG, |v| v["ev"] == "throughput"))
        });
    let raw_of = |k: &str| -> Option<f64> {
        let v = raw.as_ref().ok()?;
        let s: Vec<f64> = v["mbps"][k]
            .as_array()?
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        (!s.is_empty()).then(|| median(&s))
    };
    let relay_addr = relay.as_ref().ok().map(|(_, a)| a.clone());
    for (label, via) in [("direct", None), ("relayed", relay_addr.as_deref())] {
        let metric = format!(
            "blob throughput, {label} ({size} artifact, errand-phone fetch from errand-desktop, loopback)"
        );
        if label == "relayed" && via.is_none() {
            rows.push(Row::missing(
                "P10",
                metric,
                Unit::MBps,
                "no relay".to_owned(),
            ));
            continue;
        }
        match p10_runs(ctx, via) {
            Ok(runs) => {
                let mut row = Row::new("P10", metric, Unit::MBps)
                    .samples(runs.iter().map(|r| r.mbps).collect());
                if let Some(r) = raw_of(label) {
                    row =
                        row.reference("raw TCP + Noise (+ Yamux): one libp2p stream, same run", r);
                }
                if label == "direct" {
                    row = row.goals(vec![Check::RefRatioAtLeast(0.6)]);
                }
                rows.push(row.note(format!(
                    "the fetch's own timing (from the fetch's start, dialing the desktop included, to the verified end): 32 KiB ranges, {} in flight; the phone checks each 16 KiB group against the BLAKE3 outboard and writes {} KiB batches on a blocking thread while it reads the next (its verified offset committed at most once a second); the desktop reads {} KiB ahead",
                    errand_p2p::blob::protocol::PIPELINE,
                    errand_p2p::blob::protocol::APPEND_BATCH / 1024,
                    errand_p2p::blob::protocol::READ_AHEAD / 1024
                )));
                for (side, peak) in [
                    (
                        "desktop",
                        runs.iter().map(|r| r.desktop_peak).collect::<Vec<_>>(),
                    ),
                    (
                        "phone (the fetch process)",
                        runs.iter().map(|r| r.phone_peak).collect(),
                    ),
                ] {
                    rows.push(
                        Row::new(
                            "P10",
                            format!("peak RSS during a {label} transfer, {side}"),
                            Unit::Bytes,
                        )
                        .samples(peak)
                        .goals(vec![Check::P50AtMost(64.0 * 1024.0 * 1024.0)])
                        .note(format!(
                            "VmRSS sampled every {} ms while the fetch ran; goal 64 MiB",
                            P10_RSS_EVERY.as_millis()
                        )),
                    );
                }
            }
            Err(e) => rows.push(Row::missing("P10", metric, Unit::MBps, format!("{e:#}"))),
        }
    }
    if let Ok((relay, _)) = relay {
        relay.stop();
    }
    if let Err(e) = &raw {
        rows.push(Row::missing(
            "P10",
            "raw TCP + Noise throughput",
            Unit::MBps,
            format!("{e:#}"),
        ));
    }
    rows
}

// ---- P11 ---------------------------------------------------------------------------------

/// Relay restarts timed by P11 (issue 18 item 3 asks for the median of 5).
const P11_RUNS: usize = 5;

/// `errand-relay` on loopback port `port` with home `home`: the same identity and address on
/// every start. Returns it and when its address line arrived (the relay is up).
fn p11_relay(ctx: &Ctx, home: &Path, port: u16) -> Result<(Proc, Instant, String)> {
    let args: Vec<String> = [
        "--listen",
        &format!("/ip4/127.0.0.1/tcp/{port}"),
        "--home",
        &home.display().to_string(),
        "--stats-interval",
        "0s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut p = Proc::spawn("errand-relay", &ctx.bin("errand-relay")?, &args, &ctx.logs)?;
    let (up, addr) = p.wait_line("the relay address", STEP, |l| l.contains("/p2p/"))?;
    Ok((p, up, addr.trim().to_owned()))
}

/// `status --json` of a running daemon's home.
fn p11_status(ctx: &Ctx, bin: &str, home: &str) -> Option<Value> {
    ctx.cli_json(bin, &["--home", home, "status", "--json"])
        .ok()
}

/// Polls `f` every 20 ms until it holds; returns when it was first seen.
fn p11_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<Instant> {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return Ok(Instant::now());
        }
        if Instant::now() > end {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Per run: the relay between a `--relay-only` desktop and phone is SIGKILLed, the phone
/// queues a task, the relay starts again; the sample is from its address line to the phone
/// seeing the task done (the desktop ran it and the result came back through the relay).
fn p11_samples(ctx: &mut Ctx) -> Result<Vec<f64>> {
    let dir = ctx.fresh_dir("p11")?;
    let relay_home = dir.join("relay");
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let (relay, _, relay_addr) = p11_relay(ctx, &relay_home, port)?;
    let mut relay = Some(relay);
    let (dh, ph) = (dir.join("desktop"), dir.join("phone"));
    let (dhs, phs) = (dh.display().to_string(), ph.display().to_string());
    trust_phone(ctx, &dhs, &phs)?;
    let net = |home: &str, sub: &str| -> Vec<String> {
        [
            "--home",
            home,
            sub,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
            "--relay",
            &relay_addr,
            "--relay-only",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let mut desktop = Proc::spawn(
        "errand-desktop",
        &ctx.bin("errand-desktop")?,
        &net(&dhs, "run"),
        &ctx.logs,
    )?;
    let (_, running) = desktop.wait_line("running", LONG, |l| l.contains(" running"))?;
    let desktop_id = running
        .split_whitespace()
        .nth(1)
        .context("no peer id in the running line")?
        .to_owned();
    let reserved = |bin: &str, home: &str| {
        p11_status(ctx, bin, home).is_some_and(|v| v["relay"]["reservation"] == "accepted")
    };
    p11_until("the desktop's reservation", STEP, || {
        reserved("errand-desktop", &dhs)
    })?;
    trust_desktop(
        ctx,
        &phs,
        &desktop_id,
        &format!("{relay_addr}/p2p-circuit/p2p/{desktop_id}"),
    )?;
    let phone = Proc::spawn(
        "errand-phone",
        &ctx.bin("errand-phone")?,
        &net(&phs, "daemon"),
        &ctx.logs,
    )?;
    let link = |v: &Value| -> Option<Value> {
        v["peers"]
            .as_array()?
            .iter()
            .find(|p| p["id"] == desktop_id.as_str())
            .cloned()
    };
    let settled = || {
        reserved("errand-desktop", &dhs)
            && p11_status(ctx, "errand-phone", &phs).is_some_and(|v| {
                v["relay"]["reservation"] == "accepted"
                    && link(&v).is_some_and(|l| l["path"] == "relayed" && l["in_sync"] == true)
            })
    };
    let mut samples = Vec::new();
    for i in 0..P11_RUNS {
        p11_until("both peers reserved and the phone in sync", LONG, &settled)?;
        drop(relay.take());
        p11_until("the phone to lose the desktop", STEP, || {
            p11_status(ctx, "errand-phone", &phs)
                .and_then(|v| link(&v))
                .is_some_and(|l| l["connected"] == false)
        })?;
        let sent = ctx.cli_json(
            "errand-phone",
            &["--home", &phs, "send", &format!(": p11 run {i}"), "--json"],
        )?;
        let task = sent["task_id"].as_str().context("task_id")?.to_owned();
        let (p, up, _) = p11_relay(ctx, &relay_home, port)?;
        relay = Some(p);
        let done = p11_until("the queued task done on the phone", LONG, || {
            ctx.cli_json("errand-phone", &["--home", &phs, "task", &task, "--json"])
                .is_ok_and(|t| t["status"] == "done")
        })?;
        let ms = done.duration_since(up).as_secs_f64() * 1e3;
        progress!("P11 run {i}: the queued task was done {ms:.0} ms after the relay was up");
        samples.push(ms);
    }
    phone.stop();
    desktop.stop();
    Ok(samples)
}

fn run_p11(ctx: &mut Ctx) -> Vec<Row> {
    let metric = "relay restart: relay SIGKILLed and started again (same identity), the relay up → the task queued meanwhile done on the phone, --relay-only peers, loopback";
    vec![match p11_samples(ctx) {
        Ok(s) => Row::new("P11", metric, Unit::Ms)
            .samples(s)
            .goals(vec![Check::P50AtMost(5_000.0)])
            .note("polled with `errand-phone task --json` every 20 ms (one CLI process per poll); the peers redial the relay from 250 ms, capped at 2 s"),
        Err(e) => Row::missing("P11", metric, Unit::Ms, format!("{e:#}")),
    }]
}

// ---- automerge-repo ----------------------------------------------------------------------

/// Runs automerge-repo's script; `Err` says why the column is skipped.
fn run_repo(quick: bool, logs: &Path) -> Result<Value, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench");
    let script = dir.join("automerge-repo-bench.mjs");
    if !script.exists() {
        return Err(format!("{} is missing", script.display()));
    }
    match Command::new("node").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(_) | Err(_) => return Err("`node` is not installed".into()),
    }
    if !dir.join("node_modules/@automerge/automerge-repo").exists() {
        progress!("installing automerge-repo (npm ci)");
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr);
                let why = err
                    .lines()
                    .rfind(|l| l.contains("ERR"))
                    .unwrap_or("npm ci failed")
                    .to_owned();
                return Err(format!("npm ci failed (registry unreachable?): {why}"));
            }
            Err(e) => return Err(format!("`npm` is not usable: {e}")),
        }
    }
    let mut args = vec!["automerge-repo-bench.mjs".to_owned()];
    if quick {
        // Only the small thread and N = 1,000 are compared in quick mode.
        args.extend(
            [
                "--quick",
                "--large-tasks",
                "250",
                "--p1-runs",
                "5",
                "--p2-modes",
                "b-offline",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
    }
    progress!("running automerge-repo's script (node {})", args.join(" "));
    let stderr =
        std::fs::File::create(logs.join("automerge-repo.stderr")).map_err(|e| e.to_string())?;
    let out = Command::new("node")
        .args(&args)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stderr(stderr)
        .output()
        .map_err(|e| format!("cannot run node: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().rev().find(|l| l.trim_start().starts_with('{'));
    match last.map(serde_json::from_str::<Value>) {
        Some(Ok(v)) => Ok(v),
        _ => Err(format!(
            "its script printed no result ({}); see {}",
            out.status,
            logs.join("automerge-repo.stderr").display()
        )),
    }
}

fn attach_repo(rows: &mut [Row], repo: &Result<Value, String>) {
    for r in rows.iter_mut() {
        if r.id != "P1" || !r.metric.starts_with("direct") {
            continue;
        }
        let size = if r.metric.starts_with("direct, large") {
            "large"
        } else {
            "small"
        };
        r.repo = repo_value(repo, &["p1", size, "median_ms"]);
    }
}

// ---- main --------------------------------------------------------------------------------

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let git = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "kernel": kernel,
        "loadavg_at_start": load.trim(),
        "git": git,
    })
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            progress!("the harness broke: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    let started = *STARTED.get_or_init(Instant::now);
    let plan = Plan::new(args.quick);
    let want =
        |id: &str| args.only.is_empty() || args.only.iter().any(|o| o.eq_ignore_ascii_case(id));
    let exe = std::env::current_exe().context("while finding errand-bench's own path")?;
    let bin_dir = exe.parent().context("no binary directory")?.to_owned();
    let profile = bin_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unbuilt = if args.no_build {
        None
    } else {
        build_binaries(&bin_dir)
    };
    if let Some(why) = &unbuilt {
        progress!("{why}; using the binaries already built");
    }
    let cache = args
        .cache
        .clone()
        .unwrap_or_else(|| bin_dir.parent().unwrap_or(&bin_dir).join("bench-cache"));
    std::fs::create_dir_all(&cache)?;
    let tmp = tempfile::Builder::new().prefix("errand-bench-").tempdir()?;
    let work = tmp.path().to_owned();
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut ctx = Ctx {
        plan: plan.clone(),
        bin_dir,
        unbuilt,
        work,
        logs,
        cache,
        counter: 0,
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut notes: Vec<String> = Vec::new();

    let small = fixture(&ctx.cache, SMALL_TASKS)?;
    let large = if plan.large {
        match fixture(&ctx.cache, LARGE_TASKS) {
            Ok(f) => Some(f),
            Err(e) => {
                notes.push(format!("the large fixture could not be built: {e:#}"));
                None
            }
        }
    } else {
        notes.push(
            "quick mode: the large thread (20,000 tasks) is skipped; P3 and P4 run on the small thread, \
             so their goals (written for the large thread) are marked n/a, except the ingest check's \
             (per change, on any thread)"
                .into(),
        );
        None
    };

    // automerge-repo first, alone on the machine, so neither run slows the other.
    let repo = if args.no_repo {
        Err("--no-repo".into())
    } else if !(want("P1") || want("P2")) {
        Err("P1 and P2 not selected".into())
    } else {
        run_repo(plan.quick, &ctx.logs)
    };
    if let Err(why) = &repo {
        notes.push(format!("automerge-repo column skipped: {why}"));
    }
    if want("P1") || want("P3") {
        rows.extend(run_p1_p3(&mut ctx, &small, large.as_ref(), want("P3")));
        attach_repo(&mut rows, &repo);
    }
    if want("P3") || want("ingest") {
        rows.extend(run_ingest(&ctx, &small, large.as_ref()));
    }
    if want("P2") {
        rows.extend(run_p2(&mut ctx, &small, &repo));
    }
    if want("P4") {
        progress!("P4");
        let fx = large.as_ref().unwrap_or(&small);
        match run_p4(&mut ctx, fx) {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(Row::missing(
                "P4",
                "desktop cold start",
                Unit::Ms,
                format!("{e:#}"),
            )),
        }
    }
    if want("P5") {
        progress!("P5");
        rows.extend(run_p5(&mut ctx));
    }
    if want("P6") {
        progress!("P6");
        rows.extend(run_p6(&mut ctx));
    }
    if want("P7") {
        progress!("P7");
        rows.extend(run_p7(&mut ctx, large.as_ref()));
    }
    if want("P8") {
        progress!("P8");
        rows.extend(run_p8(&mut ctx, &small, large.as_ref()));
    }
    if want("P9") {
        progress!("P9");
        rows.extend(run_p9(&mut ctx));
    }
    if want("P10") {
        progress!("P10");
        rows.extend(run_p10(&mut ctx));
    }
    if want("P11") {
        progress!("P11");
        rows.extend(run_p11(&mut ctx));
    }
    rows.sort_by_key(|r| r.id);

    let elapsed = started.elapsed().as_secs_f64();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "errand-bench{} — {} build, {} — {:.0} s",
        if plan.quick { " --quick" } else { "" },
        profile,
        machine()["cpu"].as_str().unwrap_or(""),
        elapsed
    );
    md.push('\n');
    md.push_str(&table(&rows));
    md.push('\n');
    md.push_str(
        "Medians over the runs shown as n; p99 is nearest-rank (the maximum below 100 runs). ",
    );
    md.push_str("Ratios are ours ÷ the reference measured in this run. Event times are CLOCK_MONOTONIC stamps taken inside the peer processes.\n");
    if profile != "release" {
        md.push_str("\n**This is a debug build**: its figures keep the benchmark working; compare only a release build with the goals.\n");
    }
    for n in &notes {
        let _ = writeln!(md, "\n- {n}");
    }
    println!("{md}");
    if let Some(path) = &args.json {
        let v = json!({
            "tool": "errand-bench",
            "quick": plan.quick,
            "profile": profile,
            "machine": machine(),
            "plan": plan,
            "elapsed_s": elapsed,
            "fixtures": {
                "small": { "tasks": small.tasks, "changes": small.changes, "save_bytes": small.save_bytes, "build_s": small.build_secs },
                "large": large.as_ref().map(|l| json!({ "tasks": l.tasks, "changes": l.changes, "save_bytes": l.save_bytes, "build_s": l.build_secs })),
            },
            "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
            "notes": notes,
            "automerge_repo": match &repo { Ok(v) => v.clone(), Err(why) => json!({ "skipped": why }) },
            "table_markdown": md,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("while writing {}", path.display()))?;
        progress!("wrote {}", path.display());
    }
    if args.keep {
        let kept = tmp.keep();
        progress!("homes and logs kept in {}", kept.display());
    }
    Ok(())
}
