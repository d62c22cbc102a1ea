//! Agents over the Agent Client Protocol (issue 19), between real processes: an
//! `errand-desktop run` whose `acp` executor is the scripted agent that ships with it
//! (`errand-desktop demo-agent`, built on the official Rust SDK) or the TypeScript SDK's
//! agent in `tests/acp-ts`, and an `errand-phone daemon`, on 127.0.0.1.
//!
//! The agent's script is in its prompt (`[permission]`, `[wait]`, `[read PATH]`, …; see
//! `desktop/src/demo_agent.rs`) and it logs what it received, one JSON line each, to a file
//! the test reads: what the agent saw is checked there, not in the thread.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use errand_tests::{Daemon, Home, bin, trust_pair, wait_for};
use serde_json::Value;

/// For waits that take a second on a quiet machine.
const SHORT: Duration = Duration::from_secs(60);

struct Setup {
    root: tempfile::TempDir,
    desktop: Home,
    phone: Home,
    desktop_daemon: Option<Daemon>,
    phone_daemon: Option<Daemon>,
    addr: String,
    log: PathBuf,
}

/// The agent's command line: the scripted Rust agent, or the TypeScript one.
fn rust_agent(log: &Path, extra: &[&str]) -> Vec<String> {
    let mut argv = vec![
        bin("errand-desktop").display().to_string(),
        "demo-agent".to_owned(),
        "--log".to_owned(),
        log.display().to_string(),
    ];
    argv.extend(extra.iter().map(|s| (*s).to_owned()));
    argv
}

fn config(argv: &[String], extra: &str) -> String {
    let argv: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "[[executors]]\nname = \"agent\"\nkind = \"acp\"\nargv = [{}]\n{extra}\n\
         [[executors]]\nname = \"shell\"\nkind = \"shell\"\n",
        argv.join(", ")
    )
}

/// A desktop whose first executor is the agent, and a phone, paired and running.
fn setup(argv: impl FnOnce(&Path) -> Vec<String>, extra: &str) -> Result<Setup> {
    let root = tempfile::Builder::new().prefix("errand-acp-").tempdir()?;
    let log = root.path().join("agent.log");
    let desktop = Home::desktop(root.path(), "desktop");
    std::fs::create_dir_all(&desktop.dir)?;
    std::fs::write(desktop.dir.join("config.toml"), config(&argv(&log), extra))?;
    let phone = Home::phone(root.path(), "phone");
    let (d, addr) = desktop.start(&[])?;
    trust_pair(&desktop, &phone, Some(&addr))?;
    let (p, _) = phone.start(&[])?;
    wait_for("the phone to get the desktop's thread", SHORT, || {
        phone.thread().ok()
    })?;
    Ok(Setup {
        root,
        desktop,
        phone,
        desktop_daemon: Some(d),
        phone_daemon: Some(p),
        addr,
        log,
    })
}

impl Setup {
    fn send(&self, text: &str) -> Result<String> {
        self.send_to("agent", text)
    }

    /// Queues `text` on the phone for the desktop's `executor`; returns the task id.
    fn send_to(&self, executor: &str, text: &str) -> Result<String> {
        let v = self
            .phone
            .json(&["send", text, "--executor", executor, "--json"])?;
        Ok(v["task_id"].as_str().context("task_id")?.to_owned())
    }

    fn task(&self, home: &Home, id: &str) -> Result<Value> {
        home.json(&["task", id, "--json"])
    }

    /// Waits until the phone shows the task with `status`.
    fn wait_status(&self, id: &str, status: &str) -> Result<Value> {
        let mut last = Value::Null;
        wait_for(&format!("task {id} to be {status}"), SHORT, || {
            let t = self.task(&self.phone, id).ok()?;
            last = t.clone();
            (t["status"] == status).then_some(t)
        })
        .with_context(|| format!("last seen: {last:#}"))
    }

    /// The agent's log: one JSON object per line.
    fn agent_log(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn logged(&self, event: &str) -> Vec<Value> {
        self.agent_log()
            .into_iter()
            .filter(|v| v["event"] == event)
            .collect()
    }

    fn run_phone(&self, args: &[&str]) -> Result<std::process::Output> {
        self.phone.run(args)
    }
}

fn output_of(t: &Value) -> String {
    t["conversation"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|u| u["role"] == "agent")
        .filter_map(|u| u["text"].as_str())
        .collect()
}

/// Runs the whole flow against one agent: offline queue, permission across a reconnect, a
/// reply in the same session, and a cancel mid-turn.
fn conversation_flow(argv: impl FnOnce(&Path) -> Vec<String>) -> Result<()> {
    let mut s = setup(argv, "")?;

    // The phone queues a task while the desktop is down; it runs once they reconnect.
    s.desktop_daemon.take().context("desktop")?.stop()?;
    let id = s.send("tidy the notes [permission]")?;
    let (d, _) = s.desktop.start_at(&s.addr, &[])?;
    s.desktop_daemon = Some(d);

    // The permission request reaches the phone while the agent waits.
    let t = s.wait_status(&id, "awaiting_permission")?;
    let perm = &t["permission"];
    ensure!(perm["title"] == "Write summary.md", "{t:#}");
    let options: Vec<&str> = perm["options"]
        .as_array()
        .context("options")?
        .iter()
        .filter_map(|o| o["id"].as_str())
        .collect();
    ensure!(
        options == ["allow-once", "allow-always", "reject-once", "reject-always"],
        "{options:?}"
    );
    ensure!(
        s.logged("permission").is_empty(),
        "answered before the phone did"
    );

    // The phone goes away and comes back, then answers; the agent gets exactly that option.
    s.phone_daemon.take().context("phone")?.stop()?;
    let out = s.run_phone(&["answer", &id, "allow-always", "--json"])?;
    ensure!(
        out.status.success(),
        "answer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (p, _) = s.phone.start(&[])?;
    s.phone_daemon = Some(p);
    let t = s.wait_status(&id, "done")?;
    let answers = s.logged("permission");
    ensure!(answers.len() == 1, "{answers:?}");
    ensure!(
        answers[0]["outcome"] == "selected" && answers[0]["option_id"] == "allow-always",
        "{answers:?}"
    );
    let said = output_of(&t);
    ensure!(said.contains("permission: allow-always"), "{said}");
    ensure!(t["permission"].is_null(), "{t:#}");
    let calls = t["tool_calls"].as_array().context("tool_calls")?;
    ensure!(
        calls
            .iter()
            .any(|c| c["id"] == "call-1" && c["status"] == "completed"),
        "{calls:?}"
    );
    ensure!(!t["plan"].as_array().context("plan")?.is_empty(), "{t:#}");

    // A reply continues the same session: same session id, the second prompt.
    let out = s.run_phone(&["reply", &id, "and the second part", "--json"])?;
    ensure!(
        out.status.success(),
        "reply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = wait_for("the reply's turn to end", SHORT, || {
        let t = s.task(&s.phone, &id).ok()?;
        (t["attempt"] == 2 && t["status"] == "done").then_some(t)
    })?;
    let prompts = s.logged("prompt");
    ensure!(prompts.len() == 2, "{prompts:?}");
    ensure!(
        prompts[0]["session_id"] == prompts[1]["session_id"],
        "{prompts:?}"
    );
    ensure!(
        prompts[1]["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("and the second part")),
        "{prompts:?}"
    );
    ensure!(output_of(&t).contains("turn 2 of session"), "{t:#}");
    let roles: Vec<&str> = t["conversation"]
        .as_array()
        .context("conversation")?
        .iter()
        .filter_map(|u| u["role"].as_str())
        .collect();
    ensure!(roles == ["user", "agent", "user", "agent"], "{roles:?}");

    // A cancel mid-turn reaches the agent as session/cancel.
    let id = s.send("hold on [wait]")?;
    s.wait_status(&id, "running")?;
    wait_for("the agent to get the prompt", SHORT, || {
        (s.logged("prompt").len() == 3).then_some(())
    })?;
    let out = s.run_phone(&["cancel", &id])?;
    ensure!(out.status.success(), "cancel");
    let t = s.wait_status(&id, "cancelled")?;
    ensure!(s.logged("cancel").len() == 1, "{:?}", s.agent_log());
    ensure!(t["reason"] == "requested", "{t:#}");
    drop(s.root);
    Ok(())
}

#[test]
fn a_conversation_with_the_rust_sdk_agent_survives_offline_and_reconnects() -> Result<()> {
    conversation_flow(|log| rust_agent(log, &[]))
}

#[test]
fn a_desktop_killed_mid_turn_interrupts_the_turn_and_never_prompts_it_twice() -> Result<()> {
    let mut s = setup(|log| rust_agent(log, &[]), "")?;
    let id = s.send("wait for me [wait]")?;
    s.wait_status(&id, "running")?;
    wait_for("the agent to get the prompt", SHORT, || {
        (!s.logged("prompt").is_empty()).then_some(())
    })?;
    s.desktop_daemon.take().context("desktop")?.kill();
    let (d, _) = s.desktop.start_at(&s.addr, &[])?;
    s.desktop_daemon = Some(d);
    let t = s.wait_status(&id, "interrupted")?;
    std::thread::sleep(Duration::from_secs(1));
    ensure!(s.logged("prompt").len() == 1, "{:?}", s.agent_log());
    // The person can go on: a reply opens the next turn, in a new agent process.
    let out = s.run_phone(&["reply", &id, "go on"])?;
    ensure!(out.status.success(), "reply");
    let t2 = wait_for("the reply's turn", SHORT, || {
        let t = s.task(&s.phone, &id).ok()?;
        (t["attempt"] == 2 && t["status"] == "done").then_some(t)
    })?;
    let how: Vec<&str> = t2["events"]
        .as_array()
        .context("events")?
        .iter()
        .filter(|e| e["kind"] == "agent_session")
        .filter_map(|e| e["how"].as_str())
        .collect();
    // The scripted agent can load sessions, so the second turn loads the first one's.
    ensure!(how == ["new", "loaded"], "{how:?} {t:#}");
    ensure!(s.logged("load_session").len() == 1, "{:?}", s.agent_log());
    Ok(())
}

#[test]
fn hostile_agents_get_a_clear_reason_and_the_desktop_keeps_serving() -> Result<()> {
    let s = setup(|log| rust_agent(log, &[]), "startup_timeout = \"3s\"")?;
    let ws = s.desktop.dir.join("workspace");
    std::fs::create_dir_all(&ws)?;
    let outside = s.root.path().join("outside.txt");
    std::fs::write(&outside, "secret")?;
    std::os::unix::fs::symlink(&outside, ws.join("link.txt"))?;

    // A read out of the workspace through `..`, and a write through a symbolic link.
    let id = s.send(&format!(
        "peek [read {}/../../etc/passwd] [write {}]",
        ws.display(),
        ws.join("link.txt").display()
    ))?;
    let t = s.wait_status(&id, "done")?;
    let said = output_of(&t);
    ensure!(
        said.contains("read refused") && said.contains("write refused"),
        "{said}"
    );
    ensure!(std::fs::read_to_string(&outside)? == "secret");
    let thread = s.phone.thread()?;
    let notes: Vec<&str> = thread["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["text"].as_str())
        .filter(|m| m.contains("refused"))
        .collect();
    ensure!(notes.len() == 2, "{notes:?}");

    // An agent that exits mid-turn: failed, with how it ended.
    let id = s.send("crash [exit]")?;
    let t = s.wait_status(&id, "failed")?;
    let reason = t["reason"].as_str().unwrap_or_default();
    ensure!(reason.contains("exited"), "{reason}");

    // A refusal ends the turn failed, in words.
    let id = s.send("no [refuse]")?;
    let t = s.wait_status(&id, "failed")?;
    let reason = t["reason"].as_str().unwrap_or_default();
    ensure!(reason.contains("refusal"), "{reason}");

    // So does the agent's token limit.
    let id = s.send("long [max-tokens]")?;
    let t = s.wait_status(&id, "failed")?;
    let reason = t["reason"].as_str().unwrap_or_default();
    ensure!(reason.contains("token limit (max_tokens)"), "{reason}");

    // A flood of 100,000 chunks: batched, within the output cap, and the task ends.
    let id = s.send("flood [flood 100000]")?;
    let t = s.wait_status(&id, "done")?;
    let outputs = t["events"]
        .as_array()
        .context("events")?
        .iter()
        .filter(|e| e["kind"] == "output")
        .count();
    ensure!(outputs < 200, "{outputs} output events for one flood");
    let said = output_of(&t);
    ensure!(
        said.len() <= 256 * 1024,
        "{} bytes of output kept",
        said.len()
    );

    // The desktop still runs a plain task.
    let plain = s.send_to("shell", "echo still here")?;
    s.wait_status(&plain, "done")?;
    Ok(())
}

#[test]
fn agents_that_break_the_protocol_fail_their_task_with_a_reason() -> Result<()> {
    // Three more executors on one desktop: one that never answers `initialize`, one that
    // writes garbage before its first message, and the scripted one.
    let extra = |name: &str, flags: &[&str], log: &Path| {
        let argv: Vec<String> = rust_agent(log, flags)
            .iter()
            .map(|a| format!("{a:?}"))
            .collect();
        format!(
            "[[executors]]\nname = \"{name}\"\nkind = \"acp\"\nargv = [{}]\n\
             startup_timeout = \"3s\"\n",
            argv.join(", ")
        )
    };
    let root = tempfile::Builder::new().prefix("errand-acp-").tempdir()?;
    let log = root.path().join("agent.log");
    let more = format!(
        "{}{}",
        extra("silent", &["--no-initialize"], &log),
        extra("garbled", &["--garbage-first"], &log)
    );
    let s = setup(|log| rust_agent(log, &[]), &more)?;

    let silent = s.send_to("silent", "hello")?;
    let t = s.wait_status(&silent, "failed")?;
    let reason = t["reason"].as_str().unwrap_or_default();
    ensure!(reason.contains("did not answer initialize"), "{reason}");

    // A line that is not JSON-RPC, before the first message and in the middle of a turn.
    for (executor, text) in [("garbled", "hello"), ("agent", "noise [garbage]")] {
        let id = s.send_to(executor, text)?;
        let t = wait_for(&format!("the {executor} task to end"), SHORT, || {
            let t = s.task(&s.phone, &id).ok()?;
            ["done", "failed"]
                .contains(&t["status"].as_str()?)
                .then_some(t)
        })?;
        if t["status"] == "failed" {
            let reason = t["reason"].as_str().unwrap_or_default();
            ensure!(!reason.is_empty(), "{t:#}");
        }
    }

    // The desktop still runs a plain task.
    let plain = s.send_to("shell", "echo still here")?;
    s.wait_status(&plain, "done")?;
    Ok(())
}

#[test]
fn a_conversation_with_the_typescript_sdk_agent() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("acp-ts");
    if !dir.join("node_modules/@agentclientprotocol/sdk").exists() {
        eprintln!(
            "skipped: the TypeScript SDK is not installed (npm ci in {})",
            dir.display()
        );
        return Ok(());
    }
    let agent = dir.join("agent.mjs");
    conversation_flow(move |log| {
        vec![
            "env".to_owned(),
            format!("ERRAND_DEMO_AGENT_LOG={}", log.display()),
            "node".to_owned(),
            agent.display().to_string(),
        ]
    })
}

#[test]
fn a_real_agent_from_npm_starts_or_says_in_words_why_it_cannot() -> Result<()> {
    // Claude Code's ACP adapter, installed by `.ci/run` (npm ci in tests/acp-real). Without a
    // login, or as root (it refuses to skip its permission prompts under root), it cannot
    // complete a prompt; the phone must get the reason in words, not "internal error".
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("acp-real");
    let agent = dir.join("node_modules/.bin/claude-code-acp");
    if !agent.exists() {
        eprintln!(
            "skipped: @zed-industries/claude-code-acp is not installed (npm ci in {})",
            dir.display()
        );
        return Ok(());
    }
    let s = setup(
        |_| vec![agent.display().to_string()],
        "startup_timeout = \"60s\"",
    )?;
    let id = s.send("Say hello in one word.")?;
    let t = wait_for(
        "the real agent's task to end",
        Duration::from_secs(180),
        || {
            let t = s.task(&s.phone, &id).ok()?;
            ["done", "failed"]
                .contains(&t["status"].as_str()?)
                .then_some(t)
        },
    )?;
    eprintln!("status {}, reason {}", t["status"], t["reason"]);
    if t["status"] == "failed" {
        let reason = t["reason"].as_str().unwrap_or_default();
        ensure!(
            reason.contains("login") || reason.contains("root"),
            "a reason a person cannot act on: {reason}"
        );
        ensure!(!reason.starts_with("Internal error"), "{reason}");
    }
    Ok(())
}

#[test]
fn send_wait_shows_a_permission_prompt_as_it_comes() -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let s = setup(|log| rust_agent(log, &[]), "")?;
    let mut child = std::process::Command::new(bin("errand-phone"))
        .args(["--home", &s.phone.dir.display().to_string()])
        .args(["send", "--wait", "--timeout", "120s", "--executor", "agent"])
        .arg("write it up [permission]")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let id = BufReader::new(stdout)
        .lines()
        .next()
        .context("no task id")??;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let asked = loop {
        let line = rx
            .recv_timeout(SHORT)
            .with_context(|| format!("no permission prompt; stderr so far: {seen:?}"))?;
        seen.push(line.clone());
        if line.contains("asks permission: Write summary.md") {
            break line;
        }
    };
    ensure!(asked.contains(id.trim()), "{asked}");
    let out = s.run_phone(&["answer", id.trim(), "deny"])?;
    ensure!(
        out.status.success(),
        "answer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = wait_for("send --wait to exit", SHORT, || {
        child.try_wait().ok().flatten()
    })?;
    ensure!(status.success(), "send --wait exited {status}");
    let answers = s.logged("permission");
    ensure!(answers[0]["option_id"] == "reject-once", "{answers:?}");
    Ok(())
}
