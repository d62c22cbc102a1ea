//! `errand-desktop demo`: the one-command tour, in this process, with temporary homes.
//!
//! - Starts a desktop (with its task runner) and a phone on 127.0.0.1, mDNS off.
//! - Pairs them with a real ticket: the phone runs the pairing handshake against the desktop.
//! - Takes the phone offline, queues three shell tasks and one for an agent on it, brings it
//!   back, and follows the thread on the phone as each task goes delivered → running → done,
//!   printing its output.
//! - The agent is the scripted ACP agent that ships with the desktop (`demo-agent`, no LLM): it
//!   streams text, makes a tool call and asks one permission, which the demo's phone grants;
//!   then the phone replies and the agent answers in the same session.
//! - Prints the timings, cleans up, and exits 0 (1 if a task did not finish in time).

use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use errand_core::{DeviceKind, Task, TaskId, TaskStatus, fold};
use errand_desktop::{
    config::Settings,
    executor::{AcpOptions, DEFAULT_ACP_IDLE, DEFAULT_ACP_STARTUP, ExecutorConfig, ExecutorKind},
    runner::Runner,
};
use errand_p2p::{
    api::{self, Call as _},
    pairing,
    peer::{Peer, PeerConfig, PeerEvent},
};

/// The tasks the tour sends: quick, harmless, and with visible output. The last one prints
/// over a second, so the phone sees it running with partial output.
const TASKS: [&str; 3] = [
    "echo \"Hello from $(uname -sn)\"",
    "printf '%s\\n' pear apple fig | sort",
    "for i in 1 2 3; do echo \"step $i of 3\"; sleep 0.4; done",
];

/// The agent task: the scripted agent asks a permission for it.
const AGENT_TASK: &str = "Tidy the notes in the workspace [permission]";

/// The phone's reply once the agent's first turn has ended.
const AGENT_REPLY: &str = "Thanks! What did you change?";

/// How long the tour waits for the three tasks. They take about two seconds; the rest is for
/// a slow or busy machine.
const FINISH_TIMEOUT: Duration = Duration::from_secs(120);

/// How long reopening the phone's home may wait for the closed one to let go of it.
const REOPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the phone's view is read again, besides every merge it reports.
const POLL: Duration = Duration::from_millis(200);

/// Options of `errand-desktop demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Keep the temporary homes (their paths are printed) instead of deleting them.
    #[arg(long)]
    keep: bool,
}

/// Runs the tour.
pub async fn run(args: DemoArgs) -> Result<()> {
    let root = temp_root()?;
    let result = tour(&root).await;
    if args.keep {
        println!("\nThe homes are kept in {}", root.display());
    } else {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

async fn tour(root: &Path) -> Result<()> {
    let t0 = Instant::now();
    let open = |kind: DeviceKind, dir: &str, name: &str| {
        Peer::open(PeerConfig {
            home: root.join(dir),
            kind,
            name: Some(name.into()),
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().context("listen address")?],
            mdns: false,
            relays: Vec::new(),
            relay_only: false,
            blob_caps: Default::default(),
        })
        .with_context(|| format!("while opening the {dir} home"))
    };
    println!(
        "Errand demo: a desktop and a phone in this process, homes in {}\n",
        root.display()
    );

    // The desktop: runner first (it recovers nothing in a fresh home), then the network.
    let desktop = open(DeviceKind::Desktop, "desktop", "demo desktop")?;
    let mut settings = Settings::defaults(desktop.home());
    let exe = std::env::current_exe().context("while finding this program for the demo agent")?;
    settings.executors.push(ExecutorConfig::new(
        "agent",
        ExecutorKind::Acp(AcpOptions {
            argv: vec![exe.display().to_string(), "demo-agent".into()],
            auto_allow: Vec::new(),
            permission_expiry: None,
            startup_timeout: DEFAULT_ACP_STARTUP,
            idle_timeout: DEFAULT_ACP_IDLE,
        }),
    )?);
    desktop.publish_self(settings.executor_names()).await?;
    let runner = Runner::start(desktop.clone(), settings)
        .await
        .context("while starting the task runner")?;
    desktop
        .start()
        .await
        .context("while starting the desktop's network")?;
    let phone = open(DeviceKind::Phone, "phone", "demo phone")?;
    phone
        .start()
        .await
        .context("while starting the phone's network")?;
    step(
        t0,
        &format!(
            "desktop {} and phone {} are up",
            short(&desktop),
            short(&phone)
        ),
    );

    // Pairing, with a real ticket.
    let paired_at = Instant::now();
    let ticket = pairing::create_ticket(&desktop, Duration::from_secs(600))
        .await
        .context("while creating a pairing ticket")?;
    let text = ticket.to_string();
    step(
        t0,
        &format!(
            "desktop issued a pairing ticket ({} characters, {}…)",
            text.len(),
            &text[..text.len().min(16)]
        ),
    );
    let outcome = pairing::pair_phone(&phone, &ticket)
        .await
        .context("while pairing the phone")?;
    let pair_time = paired_at.elapsed();
    step(
        t0,
        &format!(
            "phone paired with \"{}\" in {}",
            outcome.desktop_name,
            ms(pair_time)
        ),
    );

    // Offline: the phone app closes; reopened without a network, it queues three tasks that
    // only it has.
    phone.shutdown().await;
    drop(phone);
    let phone = reopen(|| open(DeviceKind::Phone, "phone", "demo phone")).await?;
    step(t0, "phone goes offline");
    let mut ids = Vec::new();
    let all = TASKS
        .iter()
        .map(|t| (*t, None))
        .chain([(AGENT_TASK, Some("agent"))]);
    for (text, executor) in all {
        let send = api::SendTask {
            text: text.into(),
            executor: executor.map(str::to_owned),
            not_after: None,
            attach: Vec::new(),
        };
        let sent = send
            .run(&phone)
            .await
            .map_err(|e| anyhow::anyhow!(e.message))
            .context("while queueing a task on the phone")?;
        ids.push(sent.task_id);
        step(t0, &format!("phone queued task {}: {text}", ids.len()));
    }

    // Back online: follow the phone's view until all three are done.
    let mut events = phone.events();
    let online_at = Instant::now();
    phone
        .start()
        .await
        .context("while reconnecting the phone")?;
    step(t0, "phone is back online and dials the desktop");
    let mut seen: BTreeMap<TaskId, Seen> = BTreeMap::new();
    let mut timings: BTreeMap<TaskId, HashMap<TaskStatus, Duration>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + FINISH_TIMEOUT;
    let agent_id = *ids.last().context("the agent task")?;
    let (mut granted, mut replied) = (false, false);
    loop {
        let tasks = read_tasks(&phone, &ids).await?;
        for (n, task) in tasks.iter().enumerate() {
            report(t0, online_at, n + 1, task, &mut seen, &mut timings);
        }
        // The phone's part in the agent's conversation: grant its permission, then reply.
        if let Some(task) = tasks.iter().find(|t| t.id == agent_id) {
            let v = fold(task);
            if v.status == TaskStatus::AwaitingPermission && !granted {
                let answer = api::Answer {
                    id: agent_id,
                    option: "allow".into(),
                };
                let answered = answer
                    .run(&phone)
                    .await
                    .map_err(|e| anyhow::anyhow!(e.message))?;
                granted = true;
                step(
                    t0,
                    &format!("phone grants the agent's request ({})", answered.option),
                );
            }
            if v.status == TaskStatus::Done && v.attempt == 1 && !replied {
                let reply = api::Reply {
                    id: agent_id,
                    text: AGENT_REPLY.into(),
                };
                reply
                    .run(&phone)
                    .await
                    .map_err(|e| anyhow::anyhow!(e.message))?;
                replied = true;
                step(t0, &format!("phone replies to the agent: {AGENT_REPLY}"));
            }
        }
        let agent_done = tasks
            .iter()
            .any(|t| t.id == agent_id && fold(t).attempt == 2);
        if tasks.len() == ids.len()
            && agent_done
            && tasks.iter().all(|t| fold(t).status.is_terminal())
        {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the tasks did not finish within {FINISH_TIMEOUT:?}");
        }
        tokio::select! {
            _ = events.recv() => {}
            () = tokio::time::sleep(POLL) => {}
        }
        // Everything that merged meanwhile is read in one go.
        while let Ok(ev) = events.try_recv() {
            if matches!(ev, PeerEvent::Disconnected { .. }) {
                step(t0, "phone lost the desktop; it will redial");
            }
        }
    }

    // Results and timings.
    println!("\nResults (as the phone sees them):");
    let tasks = read_tasks(&phone, &ids).await?;
    let mut all_done = true;
    for (n, task) in tasks.iter().enumerate() {
        let v = fold(task);
        all_done &= v.status == TaskStatus::Done;
        let code = v
            .exit_code
            .map_or(String::new(), |c| format!(", exit code {c}"));
        if task.id == agent_id {
            println!(
                "\n  task {} — {}{code}, a conversation with the agent",
                n + 1,
                v.status
            );
            for u in &v.conversation {
                let who = match u.role {
                    errand_core::Role::User => "phone",
                    errand_core::Role::Agent => "agent",
                };
                for line in u.text.lines() {
                    println!("  {who:>5} │ {line}");
                }
            }
            continue;
        }
        println!(
            "\n  task {} — {}{code}\n  $ {}",
            n + 1,
            v.status,
            task.instruction
        );
        for line in v.output.lines() {
            println!("  │ {line}");
        }
    }
    println!("\nTimings:");
    println!("  pairing (ticket to paired):       {}", ms(pair_time));
    for (n, id) in ids.iter().enumerate() {
        let t = timings.get(id).cloned().unwrap_or_default();
        let at = |s| t.get(&s).map_or_else(|| "-".to_owned(), |d| ms(*d));
        println!(
            "  task {}: online → delivered {:>8}, running {:>8}, done {:>8}",
            n + 1,
            at(TaskStatus::Delivered),
            at(TaskStatus::Running),
            at(TaskStatus::Done)
        );
    }
    println!("  whole tour:                       {}", ms(t0.elapsed()));
    let _ = std::io::stdout().flush();

    runner.shutdown().await;
    phone.shutdown().await;
    desktop.shutdown().await;
    if !all_done {
        bail!("not every task finished with exit code 0");
    }
    Ok(())
}

/// Opens a home again once the previous `Peer` on it has let go of it (its last background
/// task may still hold the store for a moment after shutdown).
async fn reopen(open: impl Fn() -> Result<Peer>) -> Result<Peer> {
    let deadline = tokio::time::Instant::now() + REOPEN_TIMEOUT;
    loop {
        match open() {
            Ok(p) => return Ok(p),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "the home is still held; trying again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The phone's copies of the tour's tasks, in the order they were sent.
async fn read_tasks(phone: &Peer, ids: &[TaskId]) -> Result<Vec<Task>> {
    let wanted = ids.to_vec();
    let mut found = phone
        .replica()
        .read(move |d| {
            wanted
                .iter()
                .filter_map(|id| d.task(id))
                .collect::<Vec<_>>()
        })
        .await?;
    found.sort_by_key(|t| ids.iter().position(|i| *i == t.id));
    Ok(found)
}

/// What the tour has shown of a task.
#[derive(Debug, Clone, Copy)]
struct Seen {
    status: TaskStatus,
    attempt: u32,
    output: usize,
    tool_calls: usize,
}

/// Prints what changed for task `n` since the last look: each new status (including the ones
/// passed between two looks), new output lines and new tool calls.
fn report(
    t0: Instant,
    online_at: Instant,
    n: usize,
    task: &Task,
    seen: &mut BTreeMap<TaskId, Seen>,
    timings: &mut BTreeMap<TaskId, HashMap<TaskStatus, Duration>>,
) {
    let v = fold(task);
    let mut old = seen.get(&task.id).copied().unwrap_or(Seen {
        status: TaskStatus::Queued,
        attempt: 1,
        output: 0,
        tool_calls: 0,
    });
    if old.attempt != v.attempt {
        step(t0, &format!("task {n}: turn {} begins", v.attempt));
        old = Seen {
            status: TaskStatus::Queued,
            attempt: v.attempt,
            output: 0,
            tool_calls: 0,
        };
    }
    let reached = |s: TaskStatus| {
        task.events.iter().any(|e| {
            e.author == task.target && e.attempt == v.attempt && e.kind.name() == fact_of(s)
        })
    };
    for s in [TaskStatus::Delivered, TaskStatus::Running] {
        let passed = reached(s) && rank(old.status) < rank(s);
        if passed && !timings.get(&task.id).is_some_and(|t| t.contains_key(&s)) {
            timings
                .entry(task.id)
                .or_default()
                .insert(s, online_at.elapsed());
            step(t0, &format!("task {n} {}", s.as_str()));
        }
    }
    for c in v.tool_calls.iter().skip(old.tool_calls) {
        step(t0, &format!("task {n} tool call: {} ({})", c.title, c.kind));
    }
    // Whole lines only while it runs (an agent's text comes in pieces); the rest at the end.
    let shown = if v.status.is_terminal() {
        v.output.len()
    } else {
        v.output.rfind('\n').map_or(0, |i| i + 1).max(old.output)
    };
    if shown > old.output {
        for line in v.output[old.output..shown].lines() {
            step(t0, &format!("task {n} output │ {line}"));
        }
    }
    if let Some(p) = &v.permission
        && old.status != TaskStatus::AwaitingPermission
    {
        let options: Vec<&str> = p.options.iter().map(|o| o.name.as_str()).collect();
        step(
            t0,
            &format!(
                "task {n} asks permission: {} [{}]",
                p.title,
                options.join(" / ")
            ),
        );
    }
    if v.status.is_terminal() && old.status != v.status {
        timings
            .entry(task.id)
            .or_default()
            .insert(v.status, online_at.elapsed());
        let code = v
            .exit_code
            .map_or(String::new(), |c| format!(" (exit code {c})"));
        step(t0, &format!("task {n} {}{code}", v.status));
    }
    seen.insert(
        task.id,
        Seen {
            status: v.status,
            attempt: v.attempt,
            output: shown,
            tool_calls: v.tool_calls.len(),
        },
    );
}

fn fact_of(s: TaskStatus) -> &'static str {
    match s {
        TaskStatus::Delivered => "delivered",
        TaskStatus::Running => "started",
        _ => "",
    }
}

fn rank(s: TaskStatus) -> u8 {
    match s {
        TaskStatus::Queued | TaskStatus::FetchingAttachments => 0,
        TaskStatus::Delivered => 1,
        TaskStatus::AwaitingApproval => 2,
        TaskStatus::Running | TaskStatus::AwaitingPermission => 3,
        _ => 4,
    }
}

fn step(t0: Instant, what: &str) {
    println!("[{:>7.3}s] {what}", t0.elapsed().as_secs_f64());
    let _ = std::io::stdout().flush();
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn short(peer: &Peer) -> String {
    let id = peer.peer_id().to_base58();
    format!("…{}", &id[id.len().saturating_sub(6)..])
}

/// A fresh private directory for the homes.
fn temp_root() -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let root = std::env::temp_dir().join(format!("errand-demo-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&root).with_context(|| format!("while creating {}", root.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(root)
}
