//! Acceptance tests of issue 5: the desktop runs tasks as they merge in.
//!
//! - Real `errand-desktop` and `errand-phone` processes on 127.0.0.1 with mDNS off, each with its
//!   own home in a temp dir, trusted by hand ([`trust_pair`]).
//! - Side effects are files: a task's instruction appends to a file, so the test can count how
//!   often it really ran, whatever the thread says.
//! - Every wait polls with a generous deadline; nothing asserts on timing except "long before
//!   the task would have ended by itself".

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use errand_tests::{Daemon, Home, cli, trust_pair, wait_for};
use serde_json::Value;

/// For waits that take a second on a quiet machine.
const SHORT: Duration = Duration::from_secs(60);
/// For waits over a hundred tasks in a debug build on a slow machine.
const LONG: Duration = Duration::from_secs(300);

// ---- helpers ----------------------------------------------------------------------------

/// A temp dir for one test's homes, logs and side-effect files; kept (and named on stderr) when
/// `ERRAND_KEEP_TEST_DIRS` is set.
fn test_root() -> Result<tempfile::TempDir> {
    let mut dir = tempfile::Builder::new()
        .prefix("errand-desktop-")
        .tempdir()?;
    if std::env::var_os("ERRAND_KEEP_TEST_DIRS").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    Ok(dir)
}

/// A desktop home with `config` as its config file (if given).
fn desktop_home(root: &Path, config: Option<&str>) -> Result<Home> {
    let desktop = Home::desktop(root, "desktop");
    if let Some(text) = config {
        std::fs::create_dir_all(&desktop.dir)?;
        std::fs::write(desktop.dir.join("config.toml"), text)?;
    }
    Ok(desktop)
}

/// The desktop's workspace (the default one, inside its home).
fn workspace(desktop: &Home) -> PathBuf {
    desktop.dir.join("workspace")
}

/// A running desktop and a running phone that trust each other and share the thread.
struct Pair {
    desktop: Home,
    phone: Home,
    desktop_daemon: Option<Daemon>,
    _phone_daemon: Daemon,
    addr: String,
}

fn pair(root: &Path, config: Option<&str>, desktop_args: &[&str]) -> Result<Pair> {
    let desktop = desktop_home(root, config)?;
    let phone = Home::phone(root, "phone");
    let (desktop_daemon, addr) = desktop.start(desktop_args)?;
    trust_pair(&desktop, &phone, Some(&addr))?;
    let (phone_daemon, _) = phone.start(&[])?;
    wait_for("the phone to get the desktop's thread", SHORT, || {
        phone.thread().ok()
    })?;
    Ok(Pair {
        desktop,
        phone,
        desktop_daemon: Some(desktop_daemon),
        _phone_daemon: phone_daemon,
        addr,
    })
}

/// Queues a task on `home` (phone or desktop); returns its id.
fn send(home: &Home, text: &str, extra: &[&str]) -> Result<String> {
    let mut args = vec!["send", text, "--json"];
    args.extend_from_slice(extra);
    let v = home.json(&args)?;
    Ok(v["task_id"].as_str().context("task_id")?.to_owned())
}

/// `task ID --json` on `home`.
fn task(home: &Home, id: &str) -> Result<Value> {
    home.json(&["task", id, "--json"])
}

/// Waits until `home` shows the task with `status`; returns its JSON.
fn wait_status(home: &Home, id: &str, status: &str, within: Duration) -> Result<Value> {
    let mut last = Value::Null;
    wait_for(&format!("task {id} to be {status}"), within, || {
        let t = task(home, id).ok()?;
        let done = t["status"] == status;
        last = t.clone();
        done.then_some(t)
    })
    .with_context(|| format!("last seen: {last}"))
}

/// Waits until the task has ended (any terminal status) on `home`.
fn wait_ended(home: &Home, id: &str, within: Duration) -> Result<Value> {
    wait_for(&format!("task {id} to end"), within, || {
        let t = task(home, id).ok()?;
        let s = t["status"].as_str()?.to_owned();
        ["done", "failed", "cancelled", "denied", "interrupted"]
            .contains(&s.as_str())
            .then_some(t)
    })
}

/// The kinds of a task's events, in order.
fn kinds(t: &Value) -> Vec<String> {
    t["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["kind"].as_str().map(str::to_owned))
        .collect()
}

/// Lines in a side-effect file (0 when it does not exist).
fn runs(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// True when the process exists and is not a zombie (a container's init may leave orphans
/// unreaped).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

// ---- 1. a task runs; output and result reach the phone ------------------------------------

#[test]
fn a_phone_task_runs_and_its_output_and_result_reach_the_phone() -> Result<()> {
    let root = test_root()?;
    let p = pair(root.path(), None, &[])?;

    let ok = send(
        &p.phone,
        "echo hello from the desktop; echo a warning >&2",
        &[],
    )?;
    let t = wait_status(&p.phone, &ok, "done", SHORT)?;
    ensure!(t["exit_code"] == 0, "{t}");
    let out = t["output_tail"].as_str().unwrap_or_default();
    ensure!(out.contains("hello from the desktop\n"), "{t}");
    ensure!(out.contains("a warning\n"), "{t}");
    let k = kinds(&t);
    for want in ["delivered", "started", "output", "finished"] {
        ensure!(
            k.iter().any(|x| x == want),
            "no {want} event on the phone: {k:?}"
        );
    }
    let desktop_id = p.desktop.peer_id()?;
    ensure!(
        t["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["kind"] != "output")
            .all(|e| e["author"] == desktop_id.as_str()),
        "facts must come from the desktop: {t}"
    );

    let bad = send(&p.phone, "echo going down; exit 7", &[])?;
    let t = wait_status(&p.phone, &bad, "failed", SHORT)?;
    ensure!(t["exit_code"] == 7, "{t}");
    ensure!(
        t["output_tail"]
            .as_str()
            .unwrap_or_default()
            .contains("going down"),
        "{t}"
    );
    Ok(())
}

// ---- 2. the command executor: literal instruction, thread file ----------------------------

#[test]
fn the_command_executor_gets_the_instruction_literally_and_the_thread_so_far() -> Result<()> {
    let root = test_root()?;
    // A stand-in for an agent CLI: it prints its argument and the thread file it was given.
    let agent = root.path().join("fake-agent");
    std::fs::write(
        &agent,
        "#!/bin/sh\n\
         printf 'argc=%s\\n' \"$#\"\n\
         printf 'instruction=%s\\n' \"$2\"\n\
         printf 'task=%s\\n' \"$ERRAND_TASK_ID\"\n\
         printf 'workspace=%s\\n' \"$ERRAND_WORKSPACE\"\n\
         printf 'pwd=%s\\n' \"$(pwd)\"\n\
         echo '--- thread ---'\n\
         cat \"$ERRAND_THREAD\"\n",
    )?;
    make_executable(&agent)?;
    let config = format!(
        "[[executors]]\nname = \"shell\"\nkind = \"shell\"\n\n\
         [[executors]]\nname = \"agent\"\nkind = \"command\"\nargv = [{:?}, \"-p\", \"{{instruction}}\"]\n",
        agent.display().to_string()
    );
    let p = pair(root.path(), Some(&config), &[])?;

    let first = send(&p.phone, "echo the earlier result is 4242", &[])?;
    wait_status(&p.phone, &first, "done", SHORT)?;

    let evil = "summarise that $(touch pwned) `touch pwned2`; touch pwned3";
    let second = send(&p.phone, evil, &["--executor", "agent"])?;
    let t = wait_status(&p.phone, &second, "done", SHORT)?;
    let out = t["output_tail"].as_str().unwrap_or_default();
    ensure!(out.contains("argc=2\n"), "{out}");
    ensure!(out.contains(&format!("instruction={evil}\n")), "{out}");
    ensure!(out.contains(&format!("task={second}\n")), "{out}");
    let ws = workspace(&p.desktop);
    ensure!(
        out.contains(&format!("workspace={}\n", ws.display())),
        "{out}"
    );
    ensure!(out.contains(&format!("pwd={}\n", ws.display())), "{out}");
    let thread = &out[out.find("--- thread ---").context("no thread")?..];
    ensure!(
        thread.contains("echo the earlier result is 4242"),
        "{thread}"
    );
    ensure!(thread.contains("the earlier result is 4242\n"), "{thread}");
    ensure!(thread.contains("Result: done, exit code 0"), "{thread}");
    for name in ["pwned", "pwned2", "pwned3"] {
        for dir in [ws.as_path(), root.path(), p.desktop.dir.as_path()] {
            ensure!(
                !dir.join(name).exists(),
                "{} exists",
                dir.join(name).display()
            );
        }
    }
    Ok(())
}

#[test]
fn a_command_executor_gets_the_thread_as_a_file_argument_and_on_stdin() -> Result<()> {
    // `{thread_file}` names the transcript in the argv; `stdin = "thread"` pipes it in, so an
    // agent CLI that reads context from stdin (`claude -p`) sees the thread.
    let root = test_root()?;
    let config = "[[executors]]\nname = \"shell\"\nkind = \"shell\"\n\n\
         [[executors]]\nname = \"ctx\"\nkind = \"command\"\nstdin = \"thread\"\n\
         argv = [\"sh\", \"-c\", \"printf 'file=%s\\\\n' \\\"$(grep -c 4242 \\\"$1\\\")\\\"; \
         printf 'stdin=%s\\\\n' \\\"$(grep -c 4242)\\\"; printf 'said=%s\\\\n' \\\"$2\\\"\", \
         \"sh\", \"{thread_file}\", \"{instruction}\"]\n";
    let p = pair(root.path(), Some(config), &[])?;
    let first = send(&p.phone, "echo the earlier result is 4242", &[])?;
    wait_status(&p.phone, &first, "done", SHORT)?;
    let second = send(
        &p.phone,
        "what was it? {thread_file}",
        &["--executor", "ctx"],
    )?;
    let t = wait_status(&p.phone, &second, "done", SHORT)?;
    let out = t["output_tail"].as_str().unwrap_or_default();
    ensure!(!out.contains("file=0") && out.contains("file="), "{out}");
    ensure!(!out.contains("stdin=0") && out.contains("stdin="), "{out}");
    // The placeholder is the template's, never the instruction's.
    ensure!(out.contains("said=what was it? {thread_file}\n"), "{out}");
    Ok(())
}

// ---- 3. crash safety --------------------------------------------------------------------

/// kill -9 during a long task; restart: it is interrupted, its processes are gone, it never runs
/// again, and 100 tasks queued behind it each run exactly once. Then a second kill -9 in the
/// middle of those: still no task runs twice and none is lost.
#[test]
fn a_crash_interrupts_the_running_task_and_loses_or_repeats_nothing() -> Result<()> {
    const QUEUED: usize = 100;
    let root = test_root()?;
    let desktop = desktop_home(root.path(), None)?;
    let marks = root.path().join("runs");
    std::fs::create_dir_all(&marks)?;
    let (d, _) = desktop.start(&[])?;

    let long_runs = marks.join("long");
    let main_pid = marks.join("long.pid");
    let child_pid = marks.join("long-child.pid");
    let long = send(
        &desktop,
        &format!(
            "echo run >> {}; echo $$ > {}; sleep 300 & echo $! > {}; wait",
            long_runs.display(),
            main_pid.display(),
            child_pid.display()
        ),
        &[],
    )?;
    wait_status(&desktop, &long, "running", SHORT)?;
    let (main, child) = wait_for("the long task's pid files", SHORT, || {
        Some((read_pid(&main_pid)?, read_pid(&child_pid)?))
    })?;

    let mut queued = BTreeMap::new();
    for i in 0..QUEUED {
        let mark = marks.join(format!("task-{i}"));
        let id = send(
            &desktop,
            &format!("echo run >> {}; sleep 0.02", mark.display()),
            &[],
        )?;
        queued.insert(id, mark);
    }
    // The first crash: the long task runs, the others wait behind it.
    d.kill();
    ensure!(
        alive(main) && alive(child),
        "the task's processes should outlive a kill -9 of the daemon"
    );

    let (d, _) = desktop.start(&[])?;
    let t = wait_status(&desktop, &long, "interrupted", SHORT)?;
    wait_for("the interrupted task's processes to be gone", SHORT, || {
        (!alive(main) && !alive(child)).then_some(())
    })?;
    ensure!(
        kinds(&t).iter().filter(|k| *k == "started").count() == 1,
        "{t}"
    );

    // The second crash, part-way through the queue.
    wait_for("a third of the queue to be done", LONG, || {
        let done = queued.values().filter(|m| runs(m) > 0).count();
        (done >= QUEUED / 3).then_some(())
    })?;
    d.kill();
    let (_d, _) = desktop.start(&[])?;

    let mut interrupted = 0;
    for (id, mark) in &queued {
        let t = wait_ended(&desktop, id, LONG)?;
        let started = kinds(&t).iter().filter(|k| *k == "started").count();
        ensure!(started <= 1, "task {id} started {started} times: {t}");
        match t["status"].as_str() {
            Some("done") => ensure!(runs(mark) == 1, "task {id} ran {} times", runs(mark)),
            // Killed mid-run by the crash: it may have done its work, but only once.
            Some("interrupted") => {
                interrupted += 1;
                ensure!(
                    runs(mark) <= 1,
                    "interrupted task {id} ran {} times",
                    runs(mark)
                );
            }
            other => anyhow::bail!("task {id} ended {other:?}: {t}"),
        }
    }
    ensure!(
        interrupted <= 1,
        "{interrupted} tasks were interrupted; one runs at a time"
    );
    ensure!(
        runs(&long_runs) == 1,
        "the long task ran {} times",
        runs(&long_runs)
    );
    let t = task(&desktop, &long)?;
    ensure!(t["status"] == "interrupted", "{t}");
    Ok(())
}

// ---- 4. cancel, approvals -----------------------------------------------------------------

#[test]
fn cancel_stops_a_running_sleep_long_before_it_would_end() -> Result<()> {
    let root = test_root()?;
    let p = pair(root.path(), None, &[])?;
    let id = send(&p.phone, "sleep 60", &[])?;
    wait_status(&p.phone, &id, "running", SHORT)?;
    let asked = Instant::now();
    let out = p.phone.run(&["cancel", &id])?;
    ensure!(out.status.success(), "cancel: {out:?}");
    let t = wait_status(&p.phone, &id, "cancelled", SHORT)?;
    ensure!(t["reason"] == "requested", "{t}");
    ensure!(
        asked.elapsed() < Duration::from_secs(50),
        "cancel took {:?}, about as long as the sleep",
        asked.elapsed()
    );
    // A queued task that is cancelled before it starts never runs.
    let mark = root.path().join("never");
    let blocker = send(&p.phone, "sleep 60", &[])?;
    wait_status(&p.phone, &blocker, "running", SHORT)?;
    let queued = send(&p.phone, &format!("touch {}", mark.display()), &[])?;
    wait_status(&p.phone, &queued, "delivered", SHORT)?;
    ensure!(p.phone.run(&["cancel", &queued])?.status.success());
    wait_status(&p.phone, &queued, "cancelled", SHORT)?;
    ensure!(p.phone.run(&["cancel", &blocker])?.status.success());
    wait_status(&p.phone, &blocker, "cancelled", SHORT)?;
    ensure!(!mark.exists(), "the cancelled task ran");
    Ok(())
}

#[test]
fn under_ask_a_task_waits_for_approval_even_across_a_restart_and_a_denied_one_never_runs()
-> Result<()> {
    let root = test_root()?;
    let mut p = pair(root.path(), Some("approval = \"ask\"\n"), &[])?;
    let approved_mark = root.path().join("approved-ran");
    let denied_mark = root.path().join("denied-ran");

    let a = send(&p.phone, &format!("touch {}", approved_mark.display()), &[])?;
    let b = send(&p.phone, &format!("touch {}", denied_mark.display()), &[])?;
    wait_status(&p.phone, &a, "awaiting_approval", SHORT)?;
    wait_status(&p.phone, &b, "awaiting_approval", SHORT)?;

    // Still waiting after the desktop restarts.
    let old = p.desktop_daemon.take().context("the desktop runs")?;
    ensure!(old.stop()?.success(), "the desktop did not stop cleanly");
    let (d, _) = p.desktop.start_at(&p.addr, &[])?;
    p.desktop_daemon = Some(d);
    std::thread::sleep(Duration::from_secs(1));
    ensure!(task(&p.desktop, &a)?["status"] == "awaiting_approval");
    ensure!(!approved_mark.exists(), "ran without approval");

    ensure!(p.phone.run(&["approve", &a])?.status.success());
    ensure!(p.phone.run(&["deny", &b])?.status.success());
    wait_status(&p.phone, &a, "done", SHORT)?;
    wait_status(&p.phone, &b, "denied", SHORT)?;
    ensure!(approved_mark.exists(), "the approved task did not run");
    // Give a wrongly running task time to show itself.
    std::thread::sleep(Duration::from_secs(1));
    ensure!(!denied_mark.exists(), "the denied task ran");
    Ok(())
}

// ---- 5. timeout ---------------------------------------------------------------------------

#[test]
fn a_timeout_kills_the_whole_process_group_grandchildren_included() -> Result<()> {
    let root = test_root()?;
    let desktop = desktop_home(root.path(), None)?;
    let (_d, _) = desktop.start(&["--task-timeout", "2s"])?;
    let pid_file = root.path().join("grandchild.pid");
    let id = send(
        &desktop,
        &format!("sh -c 'sleep 300 & echo $! > {}; wait'", pid_file.display()),
        &[],
    )?;
    let t = wait_status(&desktop, &id, "failed", SHORT)?;
    ensure!(
        t["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("timed out"),
        "{t}"
    );
    let pid = read_pid(&pid_file).context("the grandchild's pid")?;
    wait_for("the grandchild to be gone", SHORT, || {
        (!alive(pid)).then_some(())
    })?;
    Ok(())
}

// ---- 6. the demo ------------------------------------------------------------------------

#[test]
fn the_demo_pairs_queues_offline_runs_three_tasks_and_exits_0() -> Result<()> {
    let root = test_root()?;
    let out = std::process::Command::new(errand_tests::bin("errand-desktop"))
        .arg("demo")
        .env("TMPDIR", root.path())
        .env_remove("ERRAND_HOME")
        .stdin(std::process::Stdio::null())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "demo failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "phone paired with",
        "task 1 — done, exit code 0",
        "task 2 — done, exit code 0",
        "task 3 — done, exit code 0",
        "│ Hello from",
        "│ apple\n  │ fig\n  │ pear",
        "│ step 3 of 3",
        "task 4 asks permission: Write summary.md",
        "phone grants the agent's request (allow-once)",
        "task 4 — done, exit code 0, a conversation with the agent",
        "agent │ permission: allow-once",
        "phone │ Thanks! What did you change?",
        "agent │ Done (turn 2 of session",
        "Timings:",
    ] {
        ensure!(
            stdout.contains(want),
            "the demo did not print {want:?}:\n{stdout}"
        );
    }
    // It cleans up after itself.
    let left: Vec<_> = std::fs::read_dir(root.path())?.collect();
    ensure!(left.is_empty(), "the demo left {left:?}");
    Ok(())
}

// ---- configuration ------------------------------------------------------------------------

#[test]
fn a_bad_config_is_refused_with_its_line_and_key() -> Result<()> {
    let root = test_root()?;
    let desktop = desktop_home(
        root.path(),
        Some("approval = \"ask\"\nmax_parallel = \"lots\"\n"),
    )?;
    let path = desktop.run(&["config", "--path"])?;
    ensure!(path.status.success());
    let config_path = desktop.dir.join("config.toml");
    ensure!(
        String::from_utf8_lossy(&path.stdout).trim() == config_path.display().to_string(),
        "{path:?}"
    );
    let home = desktop.dir.display().to_string();
    let out = cli(
        "errand-desktop",
        &[
            "--home",
            &home,
            "run",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
        ],
    )?;
    ensure!(out.status.code() == Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("line 2"), "{err}");
    ensure!(err.contains("max_parallel"), "{err}");
    Ok(())
}
