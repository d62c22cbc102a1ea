//! The phone bridge through its generated bindings: Python drives a `PhoneClient` against a
//! real `errand-desktop run` daemon (issue 6, acceptance 1), and the Kotlin and Swift bindings
//! must still generate.
//!
//! The Python script (`tests/python/test_bridge.py`) asks this test to stop and restart the
//! desktop by printing `@@ stop-desktop` / `@@ start-desktop`; the test answers `ok` on its
//! stdin once done. The desktop comes back on its old port, so the phone can find it again.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{OnceLock, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use errand_tests::{Daemon, Home, target_dir};

/// The whole Python story: two sync waits, a task that sleeps 2 s, pairing, restarts.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(480);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cargo(args: &[&str]) -> Result<()> {
    let out = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(workspace())
        .output()
        .with_context(|| format!("running cargo {args:?}"))?;
    ensure!(
        out.status.success(),
        "cargo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The bridge's cdylib, built once per test run.
fn cdylib() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            // The same selection as `cargo test --workspace`, so the features agree and the
            // cdylib and uniffi-bindgen come out of the build the tests already did (building
            // `-p errand-mobile` alone resolves features differently and recompiles the whole
            // dependency tree: 7.5 minutes of a CI run).
            cargo(&["build", "-q", "--workspace", "--all-targets"]).map_err(|e| e.to_string())?;
            let lib = target_dir().join("debug").join(format!(
                "{}errand_mobile{}",
                std::env::consts::DLL_PREFIX,
                std::env::consts::DLL_SUFFIX
            ));
            if lib.exists() {
                Ok(lib)
            } else {
                Err(format!("{} was not built", lib.display()))
            }
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Runs the workspace's `uniffi-bindgen generate` on the cdylib.
fn generate(languages: &[&str], out_dir: &Path, extra: &[&str]) -> Result<()> {
    let lib = cdylib()?;
    let out = out_dir.to_str().context("utf-8 path")?;
    let mut args = vec!["generate"];
    for l in languages {
        args.extend(["--language", l]);
    }
    args.extend(extra);
    args.extend(["--out-dir", out, lib.to_str().context("utf-8 path")?]);
    // Built by the workspace build in `cdylib()`.
    let bindgen = target_dir().join("debug").join("uniffi-bindgen");
    let out = Command::new(&bindgen)
        .args(&args)
        .current_dir(workspace())
        .output()
        .with_context(|| format!("running {}", bindgen.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "uniffi-bindgen {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// True once the desktop daemon runs tasks (issue 5): then the task must reach `done`.
fn desktop_runs_tasks() -> bool {
    let src = workspace().join("desktop/src");
    src.join("runner.rs").exists()
        && ["main.rs", "lib.rs"]
            .iter()
            .any(|f| std::fs::read_to_string(src.join(f)).is_ok_and(|s| s.contains("runner")))
}

#[test]
fn kotlin_and_swift_bindings_generate() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    generate(&["kotlin", "swift"], tmp.path(), &["--no-format"])?;
    let files = files_under(tmp.path());
    let named = |name: &str| {
        files
            .iter()
            .find(|p| p.file_name().is_some_and(|n| n == name))
            .with_context(|| format!("no {name} among {files:?}"))
    };
    let kotlin = std::fs::read_to_string(named("errand_mobile.kt")?)?;
    ensure!(kotlin.contains("PhoneClient") && kotlin.contains("interface ThreadListener"));
    let swift = std::fs::read_to_string(named("errand_mobile.swift")?)?;
    ensure!(swift.contains("PhoneClient") && swift.contains("protocol ThreadListener"));
    named("errand_mobileFFI.h")?;
    named("errand_mobileFFI.modulemap")?;
    Ok(())
}

/// Kills the script if the test fails half-way.
struct Script(Child);

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn python_pairs_queues_offline_and_follows_the_task_through_the_listener() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let py_dir = tmp.path().join("python");
    generate(&["python"], &py_dir, &[])?;
    let lib = cdylib()?;
    std::fs::copy(&lib, py_dir.join(lib.file_name().context("lib name")?))?;

    let desktop = Home::desktop(tmp.path(), "desktop");
    // The shell first (the default executor), and the scripted ACP agent for the conversation.
    std::fs::create_dir_all(&desktop.dir)?;
    std::fs::write(
        desktop.dir.join("config.toml"),
        format!(
            "[[executors]]\nname = \"shell\"\nkind = \"shell\"\n\n\
             [[executors]]\nname = \"agent\"\nkind = \"acp\"\nargv = [{:?}, \"demo-agent\"]\n",
            errand_tests::bin("errand-desktop").display().to_string()
        ),
    )?;
    let (daemon, addr) = desktop.start(&[])?;
    let mut daemon: Option<Daemon> = Some(daemon);
    // Restarts listen on the same port again (besides a fresh one), so the phone finds it.
    let port = addr
        .rsplit("/tcp/")
        .next()
        .and_then(|p| p.split('/').next())
        .context("a tcp port in the listen address")?
        .to_owned();
    let fixed = format!("/ip4/127.0.0.1/tcp/{port}");
    let ticket = desktop.json(&["pair", "--json"])?["ticket"]
        .as_str()
        .context("ticket")?
        .to_owned();

    let expect_done = desktop_runs_tasks();
    let phone_home = tmp.path().join("phone");
    let stderr_path = tmp.path().join("python.stderr");
    let mut cmd = Command::new("python3");
    cmd.arg(workspace().join("tests/python/test_bridge.py"))
        .arg(&py_dir)
        .arg(&phone_home)
        .arg(&ticket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path)?);
    if expect_done {
        cmd.arg("--expect-done");
    }
    println!("python: expect done = {expect_done}");
    let mut script = Script(cmd.spawn().context("python3 runs")?);
    let mut stdin = script.0.stdin.take().context("stdin")?;
    let stdout = script.0.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let end = Instant::now() + SCRIPT_DEADLINE;
    let mut last = String::new();
    let mut task_id = None;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("the Python script timed out; stderr:\n{}", stderr())
            }
        };
        println!("python: {line}");
        match line.strip_prefix("@@ ") {
            Some("stop-desktop") => {
                if let Some(d) = daemon.take() {
                    d.stop()?;
                }
                writeln!(stdin, "ok")?;
            }
            Some("start-desktop") => {
                daemon = Some(desktop.start(&["--listen", &fixed])?.0);
                writeln!(stdin, "ok")?;
            }
            Some(req) if req.starts_with("task ") => {
                task_id = Some(req["task ".len()..].to_owned());
            }
            Some(other) => bail!("the Python script asked for {other:?}"),
            None => last = line,
        }
    }
    let status = script.0.wait()?;
    ensure!(
        status.success(),
        "the Python script failed ({status}): {last}\nstderr:\n{}",
        stderr()
    );
    let (passed, failed) = last
        .strip_suffix(" failed")
        .and_then(|s| s.split_once(" passed, "))
        .context("a closing `N passed, N failed` line")?;
    ensure!(failed == "0" && passed.parse::<u32>()? > 20, "{last}");

    // The desktop has the task the phone queued while it was down.
    let id = task_id.context("the script named its task")?;
    let task = desktop.json(&["task", &id, "--json"])?;
    if expect_done {
        ensure!(task["status"] == "done", "{task}");
    }
    drop(daemon);
    Ok(())
}
