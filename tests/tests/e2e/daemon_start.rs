//! A daemon and a command started at the same moment, as a person types
//! `errand-desktop run &` and then `errand-desktop pair` at once: the command goes through the
//! daemon, or (when it won the race and serves the pairing itself) the daemon waits for it
//! instead of giving up. Also that a restarted desktop listens on the port its phone remembers.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use errand_tests::{DEADLINE, Home, bin, wait_for};

const LISTEN: &str = "/ip4/127.0.0.1/tcp/0";

/// A process of the test, killed on drop, its stdout lines collected by a thread.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: std::path::PathBuf,
}

impl Proc {
    fn spawn(bin_name: &str, home: &Path, args: &[&str], stderr: &Path) -> Result<Self> {
        let mut child = Command::new(bin(bin_name))
            .arg("--home")
            .arg(home)
            .args(args)
            .env_remove("ERRAND_HOME")
            .env("RUST_LOG", "info,errand_p2p=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(stderr)?)
            .spawn()
            .with_context(|| format!("spawning {bin_name}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            seen: Vec::new(),
            stderr: stderr.to_owned(),
        })
    }

    /// Waits for a stdout line containing `marker`.
    fn wait_line(&mut self, marker: &str, what: &str) -> Result<String> {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(marker) {
                        return Ok(line);
                    }
                }
                Err(_) => bail!(
                    "{what} did not print {marker:?}; it printed {:?}, and on stderr:\n{}",
                    self.seen,
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                ),
            }
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn wait_exit(&mut self) -> Result<std::process::ExitStatus> {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(
                Instant::now() < end,
                "the process did not exit; its stderr:\n{}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Our own child, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `errand-desktop run` on loopback with mDNS off, its stderr to `log`; not waited for.
fn start_daemon(desktop: &Home, log: &Path) -> Result<Proc> {
    Proc::spawn(
        "errand-desktop",
        &desktop.dir,
        &["run", "--listen", LISTEN, "--no-mdns"],
        log,
    )
}

/// The ticket in `pair --json`'s output.
fn ticket_of(json: &str) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(json).context("pair --json output")?;
    Ok(v["ticket"].as_str().context("ticket")?.to_owned())
}

/// `errand-phone pair -` with `ticket` on stdin.
fn phone_pair(phone: &Home, ticket: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new(bin("errand-phone"))
        .arg("--home")
        .arg(&phone.dir)
        .args(["pair", "-", "--no-mdns"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    writeln!(child.stdin.take().context("stdin")?, "{ticket}")?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "the phone did not pair: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Queues a task on the phone, syncs it over, and waits for the desktop to finish it: the phone
/// reached the desktop at the address it remembers (mDNS is off everywhere).
fn task_runs(phone: &Home, desktop: &Home) -> Result<()> {
    let out = phone.run(&["send", "echo started-later"])?;
    ensure!(out.status.success(), "send failed");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    wait_for("the phone to sync with the desktop", DEADLINE, || {
        phone
            .run(&["sync", "--no-mdns", "--timeout", "10s"])
            .ok()
            .filter(|o| o.status.success())
    })?;
    wait_for("the task to finish on the desktop", DEADLINE, || {
        let t = desktop.json(&["task", &id, "--json"]).ok()?;
        (t["status"] == "done").then_some(())
    })
}

#[test]
fn a_daemon_started_while_pair_serves_itself_waits_for_it_then_runs() -> Result<()> {
    let root = tempfile::tempdir()?;
    let desktop = Home::desktop(root.path(), "desk");
    let phone = Home::phone(root.path(), "phone");
    let mut pair = Proc::spawn(
        "errand-desktop",
        &desktop.dir,
        &["pair", "--json", "--listen", LISTEN, "--no-mdns"],
        &root.path().join("pair.stderr"),
    )?;
    let ticket = ticket_of(
        &pair
            .wait_line("}", "pair --json")
            .map(|_| pair.seen.join("\n"))?,
    )?;
    let daemon_log = root.path().join("run.stderr");
    let mut daemon = start_daemon(&desktop, &daemon_log)?;
    // Longer than a daemon used to wait for a home held by another process (10 s).
    std::thread::sleep(Duration::from_secs(12));
    ensure!(
        daemon.running(),
        "the daemon gave up while `pair` served the pairing: {}",
        std::fs::read_to_string(&daemon_log).unwrap_or_default()
    );
    let said = std::fs::read_to_string(&daemon_log)?;
    ensure!(
        said.contains("errand-desktop pair"),
        "the daemon does not say what it waits for: {said}"
    );
    phone_pair(&phone, &ticket)?;
    ensure!(pair.wait_exit()?.success(), "pair did not end with success");
    daemon.wait_line("running", "errand-desktop run")?;
    task_runs(&phone, &desktop)
}

#[test]
fn pair_right_after_the_daemon_claims_the_home_goes_through_the_daemon() -> Result<()> {
    let root = tempfile::tempdir()?;
    let desktop = Home::desktop(root.path(), "desk");
    let phone = Home::phone(root.path(), "phone");
    let mut daemon = start_daemon(&desktop, &root.path().join("run.stderr"))?;
    // The moment the daemon has claimed the home (its pid in the claim file), long before it
    // serves its control socket.
    let claim = desktop.dir.join(errand_p2p::cli::claim::CLAIM_FILE);
    wait_for("the daemon's claim", DEADLINE, || {
        let pid = std::fs::read_to_string(&claim).ok()?;
        (pid.trim() == daemon.child.id().to_string()).then_some(())
    })?;
    let out = desktop.run(&["pair", "--json", "--listen", LISTEN, "--no-mdns"])?;
    ensure!(
        out.status.success(),
        "pair failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !stderr.contains("serves the pairing itself"),
        "pair served the pairing itself while the daemon was starting: {stderr}"
    );
    let ticket = ticket_of(&String::from_utf8_lossy(&out.stdout))?;
    daemon.wait_line("running", "errand-desktop run")?;
    phone_pair(&phone, &ticket)?;
    task_runs(&phone, &desktop)?;

    // Restarted on a random port again, the desktop gets the port it had, so the phone (no
    // mDNS, no relay) reaches it at the address it remembers.
    drop(daemon);
    let mut again = start_daemon(&desktop, &root.path().join("run2.stderr"))?;
    again.wait_line("running", "errand-desktop run (restarted)")?;
    task_runs(&phone, &desktop)
}
