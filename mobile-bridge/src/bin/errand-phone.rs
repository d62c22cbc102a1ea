//! `errand-phone`: the reference phone client for a terminal (Termux works).

use std::{collections::HashSet, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use errand_core::{DeviceKind, TaskId, TaskStatus};
use errand_p2p::{
    api::{self, Action, Call as _, TaskInfo, exit},
    cli::{self, NetArgs, Opened, Show as _},
    control::ApiError,
    peer::{PeerConfig, PeerEvent},
};

/// The kind of device this CLI speaks for.
const CLI: DeviceKind = DeviceKind::Phone;

/// Errand on your phone: send work to your desktop and follow it.
#[derive(Debug, Parser)]
#[command(name = "errand-phone", version, about, long_about = None)]
struct Cli {
    /// The home directory (overrides ERRAND_HOME; default: the platform data dir + errand/phone).
    #[arg(long, global = true, env = "ERRAND_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
    #[command(flatten)]
    files: FileArgs,
    #[command(subcommand)]
    command: Command,
}

/// The phone's file settings. The phone has no config file: these are flags on every
/// command, also read from the environment so that the daemon and one-shot commands of a
/// home agree.
#[derive(Debug, Clone, clap::Args)]
struct FileArgs {
    /// Largest file this phone attaches or fetches, in bytes or with a unit (1GiB holds a
    /// video clip; larger files belong in a shared folder).
    #[arg(long, global = true, env = "ERRAND_MAX_BLOB_BYTES", value_name = "BYTES",
          default_value = "1GiB", value_parser = cli::parse_size)]
    max_blob_bytes: u64,
    /// Most bytes of files this phone keeps (attachments it sent, artifacts it fetched), so
    /// files never fill the phone unnoticed.
    #[arg(long, global = true, env = "ERRAND_MAX_BLOB_STORAGE_BYTES", value_name = "BYTES",
          default_value = "10GiB", value_parser = cli::parse_size)]
    max_blob_storage_bytes: u64,
    /// The daemon fetches each artifact up to this size by itself as soon as it is reported
    /// (0: never); larger ones wait for `errand-phone fetch`. 10MiB covers a report, a chart
    /// or a photo without spending a phone's data on a large build output.
    #[arg(long, global = true, env = "ERRAND_AUTO_FETCH_BYTES", value_name = "BYTES",
          default_value = "10MiB", value_parser = cli::parse_size)]
    auto_fetch_bytes: u64,
}

/// The blob caps given on the command line (or in the environment), set once in `main`.
static BLOB_CAPS: std::sync::OnceLock<errand_p2p::blob::BlobCaps> = std::sync::OnceLock::new();

#[derive(Debug, Subcommand)]
enum Command {
    /// Keep syncing with the desktop in the foreground.
    Daemon {
        #[command(flatten)]
        net: NetArgs,
        /// This phone's name, as the desktop shows it.
        #[arg(long)]
        name: Option<String>,
    },
    /// Pair with a desktop: scan its QR code, or paste the `errand:` text it printed.
    Pair {
        /// The ticket text (starts with `errand:`), or `-` to read it from stdin, which keeps
        /// it out of the process list.
        ticket: String,
        /// This phone's name, as the desktop shows it.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        net: NetArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forget the paired desktop (to pair with another one).
    Forget {
        /// Print `{forgotten: [ids]}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Connect, sync until in sync or timed out, then exit (0 synced, 3 unreachable).
    Sync {
        #[command(flatten)]
        net: NetArgs,
        /// Give up after this long.
        #[arg(long, default_value = "30s", value_parser = cli::parse_duration)]
        timeout: Duration,
    },
    /// Queue a task for the desktop. Returns once it is stored on this phone.
    Send {
        /// The instruction.
        text: String,
        /// Executor to run it with (default: the desktop's first).
        #[arg(long)]
        executor: Option<String>,
        /// Attach a file (repeatable, up to 32). It is stored in this home at once, so the
        /// task can be queued offline; the desktop fetches it before the task starts.
        #[arg(long, value_name = "FILE")]
        attach: Vec<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Follow the task live and show its output as it arrives; the exit code reflects
        /// the final status (4 for failed, cancelled, denied or interrupted).
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (exit 3).
        #[arg(long, default_value = "10m", value_parser = cli::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Download a task's artifacts (the files its attempts left in $ERRAND_OUT), each
    /// verified against its BLAKE3 hash, into DIR (default: the current directory). Resumes
    /// a download cut off earlier. Exits 0 once all are verified, 3 if the desktop stayed
    /// out of reach.
    Fetch {
        /// The task.
        id: String,
        /// Where to put the files.
        dir: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Give up after this long without the desktop (exit 3).
        #[arg(long, default_value = "10m", value_parser = cli::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Show this phone's id, thread and desktop.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the thread: the newest segment's tasks and messages, and every unfinished task.
    Thread {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Read every segment of the thread, back to its first task (slower on a long thread).
        #[arg(long)]
        all: bool,
        /// Keep running and print each task as it changes (one JSON object per line with
        /// --json).
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Show one task.
    Task {
        /// Task id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve a task that waits for approval.
    Approve {
        /// Task id.
        id: String,
        /// Print `{task_id, requested}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Deny a task that waits for approval.
    Deny {
        /// Task id.
        id: String,
        /// Print `{task_id, requested}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a task (stops it, or keeps it from starting).
    Cancel {
        /// Task id.
        id: String,
        /// Print `{task_id, requested}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run an ended task again.
    Retry {
        /// Task id.
        id: String,
        /// Print `{task_id, requested}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Reply to an agent's task whose turn has ended: the reply is its next prompt, in the
    /// same session. Stored here first, so it works offline.
    Reply {
        /// Task id.
        id: String,
        /// What to say.
        text: String,
        /// Print `{task_id, attempt}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Routines: instructions the desktop runs on a schedule (cron or interval).
    Routine {
        #[command(subcommand)]
        cmd: cli::RoutineCommand,
    },
    /// Answer the permission request a task's agent waits on.
    Answer {
        /// Task id.
        id: String,
        /// An option id (`task ID` lists them), or `allow` / `deny` for the first option
        /// of that kind.
        option: String,
        /// Print `{task_id, permission, option}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the thread into a new or empty folder: one .automerge file per document,
    /// thread.json and manifest.json. Works with the daemon running or not.
    Export {
        /// The folder (must not exist, or be empty).
        dir: PathBuf,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the trusted desktop, or add one by hand.
    Devices {
        #[command(subcommand)]
        action: Option<DevicesCommand>,
        /// Print JSON (also after `add`).
        #[arg(long, global = true)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// Trust a desktop by its peer id (manual pairing).
    Add {
        /// The desktop's peer id (errand-desktop status shows it).
        peer_id: String,
        /// An address to dial it at (repeatable), e.g. /ip4/192.168.1.5/tcp/4001.
        #[arg(long = "addr", value_name = "MULTIADDR")]
        addrs: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = cli::parse("errand-phone");
    let home = cli::home_dir(cli.home, "phone");
    let caps =
        errand_p2p::blob::BlobCaps::new(cli.files.max_blob_bytes, cli.files.max_blob_storage_bytes);
    match caps {
        Ok(caps) => {
            let _ = BLOB_CAPS.set(caps);
        }
        Err(e) => {
            return cli::finish(Err(ApiError::with_code(
                exit::USAGE,
                format!("bad file settings: {e}"),
            )));
        }
    }
    cli::finish(run(home, cli.files.auto_fetch_bytes, cli.command).await)
}

/// How to open this phone's home with the network flags given.
fn peer_config(home: &std::path::Path, net: &NetArgs, name: Option<String>) -> PeerConfig {
    PeerConfig {
        home: home.to_owned(),
        kind: DeviceKind::Phone,
        name,
        listen: net.listen_addrs(),
        mdns: !net.no_mdns,
        relays: net.relays.clone(),
        relay_only: net.relay_only,
        blob_caps: BLOB_CAPS.get().copied().unwrap_or_default(),
    }
}

/// Opens the home with this process's own network, or finds the daemon that holds it.
async fn open_net(
    home: &std::path::Path,
    net: &NetArgs,
    name: Option<String>,
) -> Result<Opened, ApiError> {
    let opened = cli::open_with(peer_config(home, net, name)).await?;
    Ok(opened)
}

/// Longest line `pair -` reads: a ticket is a few hundred bytes, even with several relays.
const MAX_TICKET_LINE: u64 = 16 * 1024;

/// The ticket argument, read from stdin when it is `-`.
fn ticket_arg(arg: String) -> Result<String, ApiError> {
    use std::io::{BufRead, IsTerminal, Read};
    if arg != "-" {
        return Ok(arg);
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("paste the pairing code (errand:…) and press Enter:");
    }
    let mut line = String::new();
    stdin
        .lock()
        .take(MAX_TICKET_LINE)
        .read_line(&mut line)
        .map_err(|e| ApiError::new(format!("cannot read the ticket from stdin: {e}")))?;
    let ticket = line.trim();
    if ticket.is_empty() {
        return Err(ApiError::with_code(
            exit::USAGE,
            "no ticket on stdin: pipe in the `errand:` text the desktop printed",
        ));
    }
    Ok(ticket.to_owned())
}

async fn run(home: PathBuf, auto_fetch_bytes: u64, command: Command) -> Result<(), ApiError> {
    match command {
        Command::Daemon { net, name } => {
            cli::init_logging("info");
            // Held until the daemon returns: commands started meanwhile wait for it.
            let (peer, _claim) = cli::open_daemon(peer_config(&home, &net, name)).await?;
            if let Err(e) = peer.collect_blobs().await {
                tracing::warn!(error = %e, "could not collect unreferenced files");
            }
            peer.start()
                .await
                .map_err(|e| ApiError::new(e.to_string()))?;
            let shutdown = cli::Shutdown::listen();
            let control = cli::serve_control(&peer)
                .map_err(|e| ApiError::new(format!("cannot open the control socket: {e}")))?;
            let stop_fetching = tokio_util::sync::CancellationToken::new();
            let fetcher = tokio::spawn(api::files::auto_fetch(
                peer.clone(),
                auto_fetch_bytes,
                stop_fetching.clone(),
            ));
            println!("errand-phone {} running", peer.peer_id());
            use std::io::Write;
            let _ = std::io::stdout().flush();
            shutdown.wait().await;
            stop_fetching.cancel();
            let _ = fetcher.await;
            control.abort();
            peer.shutdown().await;
            Ok(())
        }
        Command::Sync { net, timeout } => {
            cli::init_logging("warn");
            sync(&home, &net, timeout).await
        }
        Command::Send {
            text,
            executor,
            attach,
            json,
            wait: true,
            timeout,
            net,
        } => {
            cli::init_logging("warn");
            let attach = absolute_paths(attach)?;
            let opened = open_online(&home, &net).await?;
            let send = api::SendTask {
                text,
                executor,
                not_after: None,
                attach,
            };
            let out = async {
                let sent = opened.call(send).await?;
                if !json {
                    println!("{}", sent.task_id);
                }
                follow_task(&opened, sent.task_id, timeout, json).await
            }
            .await;
            opened.close().await;
            out
        }
        Command::Fetch {
            id,
            dir,
            json,
            timeout,
            net,
        } => {
            cli::init_logging("warn");
            let id = api::ops::parse_task_id(&id)?;
            let dir = std::path::absolute(dir.unwrap_or_else(|| PathBuf::from(".")))
                .map_err(|e| ApiError::new(format!("cannot resolve the folder: {e}")))?;
            let opened = open_online(&home, &net).await?;
            let fetched = match &opened {
                Opened::Daemon(_) => {
                    let call = api::FetchArtifacts {
                        id,
                        dir,
                        timeout_ms: timeout.as_millis() as u64,
                    };
                    opened
                        .call_within(call, timeout + Duration::from_secs(60))
                        .await
                }
                Opened::Local(peer) => {
                    let mut shown = std::collections::HashMap::new();
                    let mut progress = |f: &errand_core::BlobRef, done: u64, size: u64| {
                        // A line per tenth of each file, on stderr.
                        let tenth = (done * 10).checked_div(size).unwrap_or(10);
                        if !json && shown.insert(f.hash, tenth) != Some(tenth) {
                            eprintln!("{}: {}% of {} bytes", f.name, tenth * 10, size);
                        }
                    };
                    api::files::fetch_artifacts(peer, id, dir, timeout, &mut progress).await
                }
            };
            opened.close().await;
            let fetched = fetched?;
            if json {
                cli::print_json(&fetched);
            } else {
                for (i, f) in fetched.files.iter().enumerate() {
                    println!(
                        "{}  {} bytes  {}",
                        f.name,
                        f.size,
                        f.local_path.as_deref().unwrap_or("")
                    );
                    if let Some(t) = fetched.transfers.get(i) {
                        if t.resumed_from > 0 {
                            eprintln!("  resumed at byte {}", t.resumed_from);
                        }
                        if t.reconnects > 0 {
                            eprintln!(
                                "  the connection was cut {} times (a relay's circuit limit, or the desktop away); each time the transfer went on from the verified offset",
                                t.reconnects
                            );
                        }
                    }
                }
            }
            Ok(())
        }
        Command::Thread {
            json,
            follow: true,
            net,
            ..
        } => {
            cli::init_logging("warn");
            let opened = open_online(&home, &net).await?;
            let out = follow_thread(&opened, json).await;
            opened.close().await;
            out
        }
        Command::Pair {
            ticket,
            name,
            net,
            json,
        } => {
            cli::init_logging("warn");
            let pair = api::PairWith {
                ticket: ticket_arg(ticket)?,
            };
            let paired = match open_net(&home, &net, name).await? {
                opened @ Opened::Daemon(_) => opened.call(pair).await?,
                Opened::Local(peer) => {
                    peer.start()
                        .await
                        .map_err(|e| ApiError::new(e.to_string()))?;
                    let out = pair.run(&peer).await;
                    peer.shutdown().await;
                    out?
                }
            };
            if json {
                cli::print_json(&paired);
            } else {
                paired.show(CLI);
            }
            if !paired.synced {
                eprintln!(
                    "warning: paired, but the first sync did not finish; run errand-phone sync"
                );
            }
            Ok(())
        }
        other => {
            let config = PeerConfig {
                blob_caps: BLOB_CAPS.get().copied().unwrap_or_default(),
                ..PeerConfig::local(home, CLI)
            };
            cli::one_shot(config, async |opened| request(opened, other).await).await
        }
    }
}

/// Opens the home with the network running here, or finds the daemon that holds it.
async fn open_online(home: &std::path::Path, net: &NetArgs) -> Result<Opened, ApiError> {
    let opened = open_net(home, net, None).await?;
    if let Opened::Local(peer) = &opened {
        peer.start()
            .await
            .map_err(|e| ApiError::new(e.to_string()))?;
    }
    Ok(opened)
}

/// How often `--wait` and `--follow` look for news. Local reads are cheap; a quarter second
/// keeps output feeling live.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

/// Follows one task until it ends: prints output as it arrives, exits by its final status.
async fn follow_task(
    opened: &Opened,
    id: TaskId,
    timeout: Duration,
    json: bool,
) -> Result<(), ApiError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut printed = 0usize;
    let mut last_status = None;
    let mut asked = HashSet::new();
    loop {
        let t = opened.call(api::GetTask { id }).await?;
        if !json {
            prompt_permission(opened, &t, &mut asked).await?;
        }
        let status = t.status;
        let outputs: Vec<&str> = t.outputs().collect();
        if !json {
            if Some(status) != last_status {
                eprintln!("[{}]", status.label());
            }
            for o in outputs.iter().skip(printed) {
                cli::print_text(o);
            }
        }
        printed = outputs.len();
        last_status = Some(status);
        if status.is_terminal() {
            if json {
                cli::print_json(&t);
            }
            return if status == TaskStatus::Done {
                Ok(())
            } else {
                Err(ApiError::with_code(
                    exit::TASK_FAILED,
                    format!("task {id} ended {status}"),
                ))
            };
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::with_code(
                exit::UNREACHABLE,
                format!(
                    "timed out after {timeout:?}; task {id} is {}",
                    status.label()
                ),
            ));
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

/// Shows a permission request the first time it is seen; in a terminal, lets the person answer
/// it in place (Enter leaves it for later, or for `errand-phone answer`).
async fn prompt_permission(
    opened: &Opened,
    t: &TaskInfo,
    asked: &mut HashSet<(TaskId, String)>,
) -> Result<(), ApiError> {
    let Some(p) = &t.permission else {
        return Ok(());
    };
    if !asked.insert((t.id, p.id.clone())) {
        return Ok(());
    }
    let text = |s: &str| cli::printable(s, false);
    eprintln!(
        "task {} asks permission: {} ({})",
        t.id,
        text(&p.title),
        text(&p.kind)
    );
    for (n, o) in p.options.iter().enumerate() {
        eprintln!("  {}) {} [{}]", n + 1, text(&o.name), text(&o.kind));
    }
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "answer with: errand-phone answer {} OPTION (or allow / deny)",
            t.id
        );
        return Ok(());
    }
    eprint!("choose 1-{} (Enter: later): ", p.options.len());
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await
    .map_err(|e| ApiError::new(e.to_string()))?
    .map_err(|e| ApiError::new(format!("cannot read the answer: {e}")))?;
    let Some(option) = line
        .trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_sub(1))
        .and_then(|n| p.options.get(n))
    else {
        eprintln!("left for later: errand-phone answer {} OPTION", t.id);
        return Ok(());
    };
    let answered = opened
        .call(api::Answer {
            id: t.id,
            option: option.id.clone(),
        })
        .await?;
    eprintln!("answered {}", text(&answered.option));
    Ok(())
}

/// Prints tasks as they change until interrupted.
async fn follow_thread(opened: &Opened, json: bool) -> Result<(), ApiError> {
    let shutdown = cli::Shutdown::listen();
    let mut seen: std::collections::HashMap<TaskId, TaskInfo> = Default::default();
    let mut asked = HashSet::new();
    let follow = async {
        loop {
            let thread = opened.call(api::GetThread { all: false }).await?;
            for t in thread.tasks {
                if !json {
                    prompt_permission(opened, &t, &mut asked).await?;
                }
                if seen.get(&t.id) != Some(&t) {
                    if json {
                        use std::io::Write;
                        let line = serde_json::to_string(&t).unwrap_or_default();
                        let _ = writeln!(std::io::stdout().lock(), "{line}");
                    } else {
                        println!("{}", cli::task_line(&t));
                    }
                    seen.insert(t.id, t);
                }
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
        #[allow(unreachable_code)]
        Ok::<(), ApiError>(())
    };
    tokio::select! {
        r = follow => r,
        _ = shutdown.wait() => Ok(()),
    }
}

async fn sync(home: &std::path::Path, net: &NetArgs, timeout: Duration) -> Result<(), ApiError> {
    let opened = open_net(home, net, None).await?;
    match opened {
        Opened::Daemon(_) => {
            // The daemon syncs already: wait until it reports the desktop in sync.
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let status = opened.call(api::GetStatus).await?;
                let desktop = status.peers.iter().find(|p| p.kind == DeviceKind::Desktop);
                if desktop.is_some_and(|d| d.in_sync) {
                    println!("in sync");
                    return Ok(());
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(ApiError::with_code(
                        exit::UNREACHABLE,
                        "the desktop is unreachable (timed out)",
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Opened::Local(peer) => {
            let trusted = peer
                .trusted_peers()
                .await
                .map_err(|e| ApiError::new(e.to_string()))?;
            let Some(desk) = trusted
                .iter()
                .find(|t| t.kind == DeviceKind::Desktop && !t.revoked)
            else {
                return Err(ApiError::new(
                    "this phone has no desktop yet: run errand-phone pair <TICKET> first",
                ));
            };
            let desk_id = errand_p2p::peer::parse_peer_id(desk.id.as_str())
                .map_err(|e| ApiError::new(e.to_string()))?;
            let mut events = peer.events();
            peer.start()
                .await
                .map_err(|e| ApiError::new(e.to_string()))?;
            let wait = async {
                loop {
                    match events.recv().await {
                        Ok(PeerEvent::InSync { peer: p }) if p == desk_id => return true,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            if peer.is_in_sync(&desk_id) {
                                return true;
                            }
                        }
                        Err(_) => return false,
                    }
                }
            };
            let synced = tokio::time::timeout(timeout, wait).await.unwrap_or(false);
            peer.shutdown().await;
            if synced {
                println!("in sync");
                Ok(())
            } else {
                Err(ApiError::with_code(
                    exit::UNREACHABLE,
                    format!(
                        "the desktop {} is unreachable (no sync within {timeout:?})",
                        desk.id
                    ),
                ))
            }
        }
    }
}

/// A one-shot command: one request, its response printed.
async fn request(opened: &Opened, command: Command) -> Result<(), ApiError> {
    let act = async |id: String, action: Action, json: bool| {
        let id = api::ops::parse_task_id(&id)?;
        cli::show(opened, api::Act { id, action }, json, CLI).await
    };
    match command {
        Command::Daemon { .. }
        | Command::Sync { .. }
        | Command::Pair { .. }
        | Command::Fetch { .. } => Err(ApiError::with_code(exit::USAGE, "not a request")),
        Command::Forget { json } => cli::show(opened, api::Forget, json, CLI).await,
        Command::Send {
            text,
            executor,
            attach,
            json,
            ..
        } => {
            let send = api::SendTask {
                text,
                executor,
                not_after: None,
                attach: absolute_paths(attach)?,
            };
            cli::show(opened, send, json, CLI).await
        }
        Command::Status { json } => cli::show(opened, api::GetStatus, json, CLI).await,
        Command::Thread { json, all, .. } => {
            cli::show(opened, api::GetThread { all }, json, CLI).await
        }
        Command::Task { id, json } => {
            let id = api::ops::parse_task_id(&id)?;
            cli::show(opened, api::GetTask { id }, json, CLI).await
        }
        Command::Approve { id, json } => act(id, Action::Approve, json).await,
        Command::Deny { id, json } => act(id, Action::Deny, json).await,
        Command::Cancel { id, json } => act(id, Action::Cancel, json).await,
        Command::Retry { id, json } => act(id, Action::Retry, json).await,
        Command::Reply { id, text, json } => {
            let id = api::ops::parse_task_id(&id)?;
            cli::show(opened, api::Reply { id, text }, json, CLI).await
        }
        Command::Routine { cmd } => cli::routine::run(opened, cmd, CLI).await,
        Command::Answer { id, option, json } => {
            let id = api::ops::parse_task_id(&id)?;
            cli::show(opened, api::Answer { id, option }, json, CLI).await
        }
        Command::Devices { action: None, json } => {
            cli::show(opened, api::ListDevices, json, CLI).await
        }
        Command::Export { dir, json } => cli::export(opened, &dir, false, json).await,
        Command::Devices {
            action: Some(DevicesCommand::Add { peer_id, addrs }),
            json,
        } => {
            let add = api::AddDevice {
                id: peer_id,
                addrs,
                name: None,
            };
            cli::show(opened, add, json, CLI).await
        }
    }
}

/// The files as absolute paths: a running daemon reads them, from its own working directory.
fn absolute_paths(files: Vec<PathBuf>) -> Result<Vec<PathBuf>, ApiError> {
    files
        .into_iter()
        .map(|f| {
            std::path::absolute(&f)
                .map_err(|e| ApiError::new(format!("cannot resolve {}: {e}", f.display())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    /// Every command form the README shows, with global flags where a person puts them.
    const README_FORMS: &[&[&str]] = &[
        &["pair", "errand:AAAA"],
        &["pair", "-"],
        &["pair", "-", "--json"],
        &["send", "summarise the CSVs in ~/Downloads"],
        &["send", "--json", "x"],
        &["send", "x", "--json"],
        &["send", "x", "--wait"],
        &["reply", "ID", "go on"],
        &["answer", "ID", "allow", "--json"],
        &["sync"],
        &["thread"],
        &["thread", "--all"],
        &["thread", "--json"],
        &["status", "--json"],
        &["task", "ID", "--json"],
        &["devices", "--json"],
        &[
            "devices",
            "add",
            "DESKTOP_PEER_ID",
            "--addr",
            "/ip4/192.168.1.5/tcp/4001",
        ],
        &["devices", "add", "DESKTOP_PEER_ID", "--json"],
        &["daemon"],
        &["status", "--home", "/tmp/h"],
        &["devices", "add", "ID", "--home", "/tmp/h", "--json"],
        &[
            "routine",
            "add",
            "summarise ~/inbox",
            "--cron",
            "0 8 * * 1-5",
            "--tz",
            "Europe/Berlin",
        ],
        &[
            "routine",
            "add",
            "df -h /",
            "--every",
            "6h",
            "--catch-up",
            "skip",
        ],
        &["routine", "add", "x", "--every", "1h", "--json"],
        &["routine", "list"],
        &["routine", "list", "--all", "--json"],
        &["routine", "pause", "ID"],
        &["routine", "resume", "ID", "--json"],
        &["routine", "rm", "ID"],
        &["export", "/tmp/errand-export", "--json"],
        &[
            "send",
            "--attach",
            "photo.jpg",
            "--attach",
            "notes.txt",
            "ls -l \"$ERRAND_ATTACHMENTS\"",
        ],
        &["send", "sort data.csv > \"$ERRAND_OUT/sorted.csv\""],
        &["fetch", "ID", "/tmp/downloads"],
        &["fetch", "ID", "--json", "--timeout", "1m"],
    ];

    #[test]
    fn every_readme_command_form_parses() {
        let failed = cli::forms_that_fail::<Cli>("errand-phone", README_FORMS);
        assert!(failed.is_empty(), "{failed:#?}");
    }

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
