//! Test harness for end-to-end scenarios: real `errand-desktop`, `errand-phone` and
//! `errand-relay` processes on loopback, each with its own home in a temp dir.
//!
//! - [`bin`] builds the binaries once per test run and returns their paths.
//! - [`Daemon`] runs a long-lived process and kills it (SIGKILL) when dropped.
//! - [`cli`] / [`cli_json`] run one-shot commands.
//! - [`wait_for`] polls a condition with a generous deadline, never a fixed sleep.
//! - [`hostile`]: a paired phone whose home the test writes into with any actor.
//! - [`netns`]: network namespaces, a bridge between them, and the tools to break links.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use errand_core::DeviceKind;
use errand_crdt::NewTask;
use errand_p2p::peer::{Peer, PeerConfig, now_ms};

pub mod hostile;
pub mod netns;

/// Generous deadline for things that take milliseconds on a quiet machine.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The cargo target directory (`CARGO_TARGET_DIR`, else the workspace's `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The path of a workspace binary, built (once per test process) if needed.
///
/// The build selects what `cargo test --workspace` builds, tests and uniffi-bindgen included,
/// so that features resolve the same way and the binaries that the test build made are
/// fresh. Built `--bins` alone, the dev-dependencies' features (proptest's regex-syntax,
/// uniffi-bindgen's clap) drop out, and cargo rebuilt tracing-subscriber and every crate of
/// ours once more: minutes of a CI run on two cores.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "-q",
                "-p",
                "errand-desktop",
                "-p",
                "errand-mobile",
                "-p",
                "errand-p2p",
                "-p",
                "errand-tests",
                "-p",
                "uniffi-bindgen",
                "--bins",
                "--tests",
            ])
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
            .status()
            .expect("cargo build runs");
        assert!(status.success(), "building the binaries failed");
    });
    target_dir().join("debug").join(name)
}

/// A long-lived process (a daemon), killed with SIGKILL on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    /// Lines it printed on stdout so far (read up to the ready line).
    pub stdout_lines: Vec<String>,
    /// Where its stderr goes.
    pub stderr_path: PathBuf,
}

impl Daemon {
    /// Spawns `bin args…` and waits until a stdout line contains `ready`.
    pub fn spawn(bin_name: &str, args: &[&str], ready: &str, log_dir: &Path) -> Result<Self> {
        let stderr_path = log_dir.join(format!(
            "{bin_name}-{}.stderr",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        let stderr = std::fs::File::create(&stderr_path)?;
        let mut child = Command::new(bin(bin_name))
            .args(args)
            .env("RUST_LOG", "info,errand_p2p=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {bin_name}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let done = line.contains(ready);
                    lines.push(line);
                    if done {
                        // Keep draining in the background so the pipe never fills.
                        std::thread::spawn(move || while rx.recv().is_ok() {});
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    bail!("{bin_name} did not print {ready:?}; stdout {lines:?}; stderr:\n{err}");
                }
            }
        }
        Ok(Self {
            child,
            stdout_lines: lines,
            stderr_path,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it gracefully (SIGTERM) and waits up to `DEADLINE`.
    pub fn stop(mut self) -> Result<std::process::ExitStatus> {
        signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("process did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal to a process.
pub fn signal(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Runs a one-shot command.
pub fn cli(bin_name: &str, args: &[&str]) -> Result<Output> {
    Command::new(bin(bin_name))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {bin_name} {args:?}"))
}

/// Runs a one-shot command that must succeed and print JSON.
pub fn cli_json(bin_name: &str, args: &[&str]) -> Result<serde_json::Value> {
    let out = cli(bin_name, args)?;
    if !out.status.success() {
        bail!(
            "{bin_name} {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "{bin_name} {args:?} printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Polls `f` until it returns `Some` or the deadline passes.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A desktop or phone home in a temp dir, with helpers for its CLI.
#[derive(Debug)]
pub struct Home {
    /// `errand-desktop` or `errand-phone`.
    pub bin: &'static str,
    /// The home directory.
    pub dir: PathBuf,
}

impl Home {
    /// A desktop home under `root`.
    pub fn desktop(root: &Path, name: &str) -> Self {
        Self {
            bin: "errand-desktop",
            dir: root.join(name),
        }
    }

    /// A phone home under `root`.
    pub fn phone(root: &Path, name: &str) -> Self {
        Self {
            bin: "errand-phone",
            dir: root.join(name),
        }
    }

    fn args<'a>(&'a self, rest: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["--home", self.dir.to_str().unwrap_or_default()];
        v.extend_from_slice(rest);
        v
    }

    /// Runs a command on this home.
    pub fn run(&self, rest: &[&str]) -> Result<Output> {
        cli(self.bin, &self.args(rest))
    }

    /// Runs a command on this home that prints JSON.
    pub fn json(&self, rest: &[&str]) -> Result<serde_json::Value> {
        cli_json(self.bin, &self.args(rest))
    }

    /// The home's PeerId.
    pub fn peer_id(&self) -> Result<String> {
        let v = self.json(&["status", "--json"])?;
        Ok(v["peer_id"].as_str().context("peer_id")?.to_owned())
    }

    /// Starts its daemon on loopback with mDNS off; returns it and its listen address.
    pub fn start(&self, extra: &[&str]) -> Result<(Daemon, String)> {
        self.start_at("/ip4/127.0.0.1/tcp/0", extra)
    }

    /// Starts its daemon listening on `listen` (for example the address of its previous run,
    /// so peers that remember it can redial), with mDNS off; returns it and its address.
    pub fn start_at(&self, listen: &str, extra: &[&str]) -> Result<(Daemon, String)> {
        let sub = if self.bin == "errand-desktop" {
            "run"
        } else {
            "daemon"
        };
        let mut args = self.args(&[sub, "--listen", listen, "--no-mdns"]);
        args.extend_from_slice(extra);
        let log_dir = self.dir.parent().unwrap_or(Path::new("/tmp")).to_owned();
        std::fs::create_dir_all(&log_dir)?;
        let d = Daemon::spawn(self.bin, &args, "running", &log_dir)?;
        let addr = wait_for("a listen address", DEADLINE, || {
            let v = self.json(&["status", "--json"]).ok()?;
            v["listen_addrs"][0].as_str().map(str::to_owned)
        })?;
        Ok((d, addr))
    }

    /// The thread as JSON.
    pub fn thread(&self) -> Result<serde_json::Value> {
        self.json(&["thread", "--json"])
    }

    /// Task ids in the thread.
    pub fn task_ids(&self) -> Result<Vec<String>> {
        let t = self.thread()?;
        Ok(t["tasks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["id"].as_str().map(str::to_owned))
            .collect())
    }
}

/// Makes a desktop and a phone trust each other (manual pairing), the phone dialing `addr`.
pub fn trust_pair(desktop: &Home, phone: &Home, desktop_addr: Option<&str>) -> Result<()> {
    let d = desktop.peer_id()?;
    let p = phone.peer_id()?;
    let out = desktop.run(&["devices", "add", &p])?;
    if !out.status.success() {
        bail!(
            "desktop devices add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut args = vec!["devices", "add", d.as_str()];
    if let Some(a) = desktop_addr {
        args.extend(["--addr", a]);
    }
    let out = phone.run(&args)?;
    if !out.status.success() {
        bail!(
            "phone devices add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Tasks per commit in [`fill_tasks`]: one Automerge change per task as usual, but one
/// store write and one change scan per batch, so filling stays linear in the task count.
const FILL_BATCH: usize = 250;

/// Fills a home (which no process holds) with `count` tasks in-process and returns their ids.
///
/// Same document shape as `errand-fixture` (one change per task, target = the thread's
/// desktop, executor `shell`), but batched: the fixture pays a whole-thread diff and a store
/// write per task, which makes 5,000 tasks take minutes on a slow machine.
pub fn fill_tasks(home: &Path, kind: DeviceKind, count: usize, text: &str) -> Result<Vec<String>> {
    fill(home, kind, count, text, None)
}

/// [`fill_tasks`] on a phone home whose thread rolls over to a new segment every
/// `segment_changes` changes.
pub fn fill_tasks_with_limit(
    home: &Path,
    segment_changes: usize,
    count: usize,
    text: &str,
) -> Result<Vec<String>> {
    fill(home, DeviceKind::Phone, count, text, Some(segment_changes))
}

fn fill(
    home: &Path,
    kind: DeviceKind,
    count: usize,
    text: &str,
    limit: Option<usize>,
) -> Result<Vec<String>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let peer = Peer::open(PeerConfig::local(home.to_owned(), kind))?;
        if let Some(l) = limit {
            peer.replica().set_segment_limit(l);
        }
        let target = peer.replica().read(|d| d.genesis().owner.clone()).await?;
        let mut ids = Vec::with_capacity(count);
        let mut next = 0;
        while next < count {
            let end = (next + FILL_BATCH).min(count);
            let (target, text) = (target.clone(), text.to_owned());
            let (batch, _) = peer
                .replica()
                .commit(move |d| {
                    (next..end)
                        .map(|i| {
                            d.enqueue_task(
                                &NewTask {
                                    instruction: format!("{text} {i}"),
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
            ids.extend(batch.iter().map(ToString::to_string));
            next = end;
        }
        peer.shutdown().await;
        Ok(ids)
    })
}

/// True when running as root (network-namespace tests need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Every file under `dir`, relative to it (to show that a process stored nothing).
pub fn files_under(dir: &Path) -> Result<std::collections::BTreeSet<String>> {
    let mut out = std::collections::BTreeSet::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path.clone());
            }
            out.insert(path.strip_prefix(dir)?.display().to_string());
        }
    }
    Ok(out)
}
