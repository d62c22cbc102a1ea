//! `errand-desktop`: the desktop daemon and its CLI.

mod demo;
mod service;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use errand_core::DeviceKind;
use errand_desktop::{
    config::{self, Overrides, Settings},
    runner::Runner,
};
use errand_p2p::{
    api::{self, Call as _, exit},
    cli::{self, NetArgs, Opened},
    control::ApiError,
    peer::{Peer, PeerConfig, now_ms},
};

/// Errand on your desktop: runs the tasks your phone sends.
#[derive(Debug, Parser)]
#[command(name = "errand-desktop", version, about, long_about = None)]
struct Cli {
    /// The home directory (overrides ERRAND_HOME; default: the platform data dir + errand/desktop).
    #[arg(long, global = true, env = "ERRAND_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the desktop daemon: listen, sync with trusted phones, run their tasks.
    Run {
        #[command(flatten)]
        net: NetArgs,
        /// This desktop's name, as phones show it.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        overrides: Overrides,
        /// Sync the thread but run no tasks: they stay queued until a run without this flag.
        #[arg(long)]
        sync_only: bool,
    },
    /// A one-command tour: a desktop and a phone in this process pair, queue three tasks
    /// offline, reconnect, and run them.
    Demo(demo::DemoArgs),
    /// A scripted ACP agent for the demo and the tests (no LLM).
    #[command(hide = true, name = "demo-agent")]
    DemoAgent(errand_desktop::demo_agent::Options),
    /// Show the configuration in effect (file, then defaults), or where the file is.
    Config {
        /// Print only the config file's path.
        #[arg(long)]
        path: bool,
    },
    /// Show a pairing QR code for a phone to scan (and its text form).
    Pair {
        /// How long the code stays valid.
        #[arg(long, default_value = "10m", value_parser = cli::parse_duration)]
        ttl: std::time::Duration,
        /// Also write the QR code as a PNG image.
        #[arg(long, value_name = "FILE")]
        png: Option<PathBuf>,
        /// Also write the QR code as an SVG image.
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
        /// Print `{ticket, expires_at}` as JSON instead of the QR code.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Run the daemon as your user's service (systemd on Linux, launchd on macOS): install,
    /// uninstall, status.
    Service {
        #[command(subcommand)]
        action: service::ServiceCommand,
    },
    /// Show this desktop's id, thread, addresses and peers.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Routines: instructions this desktop runs on a schedule (cron or interval).
    Routine {
        #[command(subcommand)]
        cmd: cli::RoutineCommand,
    },
    /// List trusted devices, or add or revoke one.
    Devices {
        #[command(subcommand)]
        action: Option<DevicesCommand>,
        /// Print JSON (also after `add` or `revoke ID`).
        #[arg(long, global = true)]
        json: bool,
    },
    /// Queue a task on this desktop itself (handy for trying it out).
    Send {
        /// The instruction.
        text: String,
        /// Executor to run it with (default: the first configured).
        #[arg(long)]
        executor: Option<String>,
        /// Cancel the task instead of running it if it has not started within this long (e.g. 10m).
        #[arg(long, value_name = "DURATION", value_parser = cli::parse_duration)]
        expires_in: Option<Duration>,
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
    },
    /// Show one task.
    Task {
        /// The task id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the thread into a new or empty folder: one .automerge file per document,
    /// thread.json, manifest.json, and this desktop's secret identity key (to move the
    /// desktop to another machine with `import`). Works with the daemon running or not.
    Export {
        /// The folder (must not exist, or be empty).
        dir: PathBuf,
        /// Leave the secret identity key out (the export cannot then be imported).
        #[arg(long)]
        no_identity: bool,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make this home, which must be new and empty, the desktop that wrote an export (moving a
    /// desktop to a new machine); stop the old one for good first.
    Import {
        /// The export folder.
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// Revoke a paired device: close its connections, refuse it from now on, cancel its
    /// unstarted tasks.
    Revoke {
        /// The device's peer id (see `errand-desktop devices`).
        id: String,
    },
    /// Trust a phone by its peer id (manual pairing, as in Syncthing).
    Add {
        /// The phone's peer id (errand-phone status shows it).
        peer_id: String,
        /// An address to dial it at (repeatable).
        #[arg(long = "addr", value_name = "MULTIADDR")]
        addrs: Vec<String>,
        /// A name for it until it tells us its own.
        #[arg(long)]
        name: Option<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = cli::parse("errand-desktop");
    let home = cli::home_dir(cli.home, "desktop");
    cli::finish(run(home, cli.command).await)
}

async fn run(home: PathBuf, command: Command) -> Result<(), ApiError> {
    match command {
        Command::Run {
            net,
            name,
            overrides,
            sync_only,
        } => {
            cli::init_logging("info");
            let settings = load_settings(&home, &overrides)?;
            daemon(home, net, name, settings, !sync_only).await
        }
        Command::Config { path } => show_config(&home, path),
        Command::Demo(args) => {
            // The tour prints its own story; connection churn at its end is not news.
            cli::init_logging("error");
            demo::run(args)
                .await
                .map_err(|e| ApiError::new(format!("{e:#}")))
        }
        Command::DemoAgent(options) => {
            // Logs go to stderr: stdout is the protocol.
            cli::init_logging("warn");
            errand_desktop::demo_agent::serve_stdio_with(options)
                .await
                .map_err(|e| ApiError::new(format!("{e:#}")))
        }
        Command::Service { action } => service::run(&home, action),
        Command::Pair {
            ttl,
            png,
            svg,
            json,
            net,
        } => {
            cli::init_logging("warn");
            pair(home, ttl, png, svg, json, net).await
        }
        Command::Import { dir, json } => cli::import(&home, &dir, json).await,
        other => {
            cli::one_shot(
                PeerConfig::local(home, DeviceKind::Desktop),
                async |opened| request(opened, other).await,
            )
            .await
        }
    }
}

/// A one-shot command: one request, its response printed.
async fn request(opened: &Opened, command: Command) -> Result<(), ApiError> {
    const CLI: DeviceKind = DeviceKind::Desktop;
    match command {
        Command::Run { .. }
        | Command::Pair { .. }
        | Command::Config { .. }
        | Command::Service { .. }
        | Command::Demo(_)
        | Command::DemoAgent(_)
        | Command::Import { .. } => Err(ApiError::with_code(exit::USAGE, "not a request")),
        Command::Status { json } => cli::show(opened, api::GetStatus, json, CLI).await,
        Command::Routine { cmd } => cli::routine::run(opened, cmd, CLI).await,
        Command::Devices { action, json } => match action {
            None => cli::show(opened, api::ListDevices, json, CLI).await,
            Some(DevicesCommand::Revoke { id }) => {
                cli::show(opened, api::Revoke { id }, json, CLI).await
            }
            Some(DevicesCommand::Add {
                peer_id,
                addrs,
                name,
            }) => {
                let add = api::AddDevice {
                    id: peer_id,
                    addrs,
                    name,
                };
                cli::show(opened, add, json, CLI).await
            }
        },
        Command::Send {
            text,
            executor,
            expires_in,
            json,
        } => {
            let not_after = expires_in.map(|d| now_ms().saturating_add(d.as_millis() as i64));
            let send = api::SendTask {
                text,
                executor,
                not_after,
                attach: Vec::new(),
            };
            cli::show(opened, send, json, CLI).await
        }
        Command::Thread { json, all } => cli::show(opened, api::GetThread { all }, json, CLI).await,
        Command::Task { id, json } => {
            let id = api::ops::parse_task_id(&id)?;
            cli::show(opened, api::GetTask { id }, json, CLI).await
        }
        Command::Export {
            dir,
            no_identity,
            json,
        } => cli::export(opened, &dir, !no_identity, json).await,
    }
}

/// `config`: the file's path, or the settings in effect.
fn show_config(home: &std::path::Path, path_only: bool) -> Result<(), ApiError> {
    let path = config::config_path(home);
    if path_only {
        println!("{}", path.display());
        return Ok(());
    }
    let settings = load_settings(home, &Overrides::default())?;
    if path.exists() {
        println!("# from {} and the defaults", path.display());
    } else {
        println!("# defaults ({} does not exist)", path.display());
    }
    print!("{settings}");
    Ok(())
}

fn load_settings(home: &std::path::Path, overrides: &Overrides) -> Result<Settings, ApiError> {
    Settings::load(home, overrides).map_err(|e| ApiError::new(e.to_string()))
}

/// `run`: the daemon. Unless `run_tasks` is false (`--sync-only`), it runs this desktop's tasks.
async fn daemon(
    home: PathBuf,
    net: NetArgs,
    name: Option<String>,
    settings: Settings,
    run_tasks: bool,
) -> Result<(), ApiError> {
    // The claim is held until the daemon returns: commands started meanwhile wait for it.
    let (peer, _claim) = cli::open_daemon(PeerConfig {
        home: home.clone(),
        kind: DeviceKind::Desktop,
        name,
        listen: net.listen_addrs(),
        mdns: !net.no_mdns,
        relays: net.relays.clone(),
        relay_only: net.relay_only,
        blob_caps: settings.blob_caps,
    })
    .await?;
    // Before any task runs: files no kept task references (a crash mid-delete, a revocation
    // while stopped, a partial fetch of a task gone since) are removed.
    if let Err(e) = peer.collect_blobs().await {
        tracing::warn!(error = %e, "could not collect unreferenced files");
    }
    if let Err(e) = config::write_template_if_missing(&home) {
        tracing::warn!(error = %e, "could not write a config template");
    }
    peer.publish_self(settings.executor_names())
        .await
        .map_err(|e| ApiError::new(e.to_string()))?;
    let workspace = settings.workspace.clone();
    let runner = if run_tasks {
        let runner = Runner::start(peer.clone(), settings)
            .await
            .map_err(|e| ApiError::new(e.to_string()))?;
        Some(runner)
    } else {
        None
    };
    peer.start()
        .await
        .map_err(|e| ApiError::new(e.to_string()))?;
    let shutdown = cli::Shutdown::listen();
    let control = cli::serve_control(&peer)
        .map_err(|e| ApiError::new(format!("cannot open the control socket: {e}")))?;
    let status = peer
        .status()
        .await
        .map_err(|e| ApiError::new(e.to_string()))?;
    println!("errand-desktop {} running", status.peer_id);
    for a in &status.listen_addrs {
        println!("listening on {a}/p2p/{}", status.peer_id);
    }
    if runner.is_some() {
        println!("workspace {}", workspace.display());
    } else {
        println!("sync only: tasks stay queued");
    }
    println!("config {}", config::config_path(&home).display());
    if status.peers.is_empty() {
        first_run_pairing(&peer).await;
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    shutdown.wait().await;
    tracing::info!("shutting down");
    control.abort();
    if let Some(runner) = runner {
        runner.shutdown().await;
    }
    peer.shutdown().await;
    Ok(())
}

/// First run with nothing paired: show the pairing QR right away when a person is watching
/// the terminal; otherwise say how to get one (a ticket opens the pairing window, so none is
/// issued for nobody to scan).
async fn first_run_pairing(peer: &Peer) {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        println!("no phone paired yet: run `errand-desktop pair` to show a pairing code");
        return;
    }
    match errand_p2p::pairing::create_ticket(peer, errand_p2p::pairing::DEFAULT_TTL).await {
        Ok(ticket) => {
            let text = ticket.to_string();
            if let Ok(qr) = errand_desktop::qr::render_unicode(&text) {
                println!("{qr}");
            }
            println!(
                "No phone is paired yet. Scan this with Errand on your phone, or run there\n\
                 `errand-phone pair -` and paste:\n"
            );
            println!("  {text}\n");
        }
        Err(e) => tracing::warn!(error = %e, "could not issue a pairing ticket"),
    }
}

/// `pair`: through the daemon when one runs, else (saying so) with this process's own network
/// in the foreground until a phone pairs or the ticket expires.
async fn pair(
    home: PathBuf,
    ttl: std::time::Duration,
    png: Option<PathBuf>,
    svg: Option<PathBuf>,
    json: bool,
    net: NetArgs,
) -> Result<(), ApiError> {
    let issue = api::IssueTicket {
        ttl_secs: ttl.as_secs().max(1),
    };
    let opened = cli::open_with(PeerConfig {
        home: home.clone(),
        kind: DeviceKind::Desktop,
        name: None,
        listen: net.listen_addrs(),
        mdns: !net.no_mdns,
        relays: net.relays.clone(),
        relay_only: net.relay_only,
        blob_caps: Default::default(),
    })
    .await?;
    let (issued, local) = match opened {
        opened @ Opened::Daemon(_) => (opened.call(issue).await?, None),
        Opened::Local(peer) => {
            eprintln!(
                "no errand-desktop daemon runs for {}, so this command serves the pairing \
                 itself, in the foreground, until a phone uses the code or it expires \
                 (Ctrl-C to stop). Start `errand-desktop run` to have the daemon do it.",
                home.display()
            );
            peer.start()
                .await
                .map_err(|e| ApiError::new(e.to_string()))?;
            (issue.run(&peer).await?, Some(peer))
        }
    };
    let ticket = &issued.ticket;
    if let Some(path) = &png {
        errand_desktop::qr::write_png(ticket, path).map_err(|e| ApiError::new(e.to_string()))?;
    }
    if let Some(path) = &svg {
        errand_desktop::qr::write_svg(ticket, path).map_err(|e| ApiError::new(e.to_string()))?;
    }
    if json {
        cli::print_json(&issued);
    } else {
        let qr =
            errand_desktop::qr::render_unicode(ticket).map_err(|e| ApiError::new(e.to_string()))?;
        println!("{qr}");
        println!(
            "Scan this with Errand on your phone, or run `errand-phone pair -` there and paste:\n"
        );
        println!("  {ticket}\n");
        println!("Valid until {}.", issued.expires_at);
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    if let Some(peer) = local {
        // No daemon: keep the network up until a phone pairs or the ticket expires.
        eprintln!("waiting for a phone to pair (Ctrl-C to stop)…");
        let shutdown = cli::Shutdown::listen();
        let before = peer.trusted_peers().await.map(|t| t.len()).unwrap_or(0);
        let mut events = peer.events();
        // Paired once a new device is trusted and has synced, or has gone again (a phone's
        // `pair` leaves once it is in sync, which this side may not see first).
        let wait = async {
            use errand_p2p::peer::PeerEvent;
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match events.recv().await {
                    Ok(PeerEvent::InSync { .. } | PeerEvent::Disconnected { .. })
                    | Err(RecvError::Lagged(_)) => {
                        let now = peer.trusted_peers().await.map(|t| t.len()).unwrap_or(0);
                        if now > before {
                            return true;
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Closed) => return false,
                }
            }
        };
        let paired = tokio::select! {
            p = tokio::time::timeout(ttl, wait) => p.unwrap_or(false),
            _ = shutdown.wait() => false,
        };
        peer.shutdown().await;
        if paired {
            eprintln!("paired.");
        } else {
            return Err(ApiError::with_code(
                exit::UNREACHABLE,
                "no phone paired before the code expired",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    /// Every command form the README shows, with global flags where a person puts them.
    const README_FORMS: &[&[&str]] = &[
        &["run"],
        &["run", "--relay", "/ip4/203.0.113.7/tcp/4001"],
        &["pair"],
        &["pair", "--json"],
        &["demo"],
        &["status", "--json"],
        &["devices", "--json"],
        &["devices", "revoke", "ID", "--json"],
        &["devices", "--json", "revoke", "ID"],
        &["devices", "add", "PHONE_PEER_ID"],
        &["devices", "add", "PHONE_PEER_ID", "--json"],
        &["send", "--json", "summarise the CSVs"],
        &["send", "summarise the CSVs", "--json"],
        &["task", "ID", "--json"],
        &["thread", "--json"],
        &["thread", "--all"],
        &["status", "--home", "/tmp/h"],
        &["devices", "revoke", "ID", "--home", "/tmp/h", "--json"],
        &["service", "install"],
        &["service", "install", "--print"],
        &["service", "install", "--print", "--platform", "macos"],
        &["service", "install", "--print", "--platform", "linux"],
        &["service", "uninstall"],
        &["service", "status"],
        &["service", "status", "--json"],
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
        &["export", "/tmp/errand-export"],
        &["export", "/tmp/errand-export", "--no-identity", "--json"],
        &["--home", "/tmp/new", "import", "/tmp/errand-export"],
    ];

    #[test]
    fn every_readme_command_form_parses() {
        let failed = cli::forms_that_fail::<Cli>("errand-desktop", README_FORMS);
        assert!(failed.is_empty(), "{failed:#?}");
    }

    #[test]
    fn json_after_the_revoked_id_is_the_json_flag() {
        let cli = Cli::try_parse_from(["errand-desktop", "devices", "revoke", "ID", "--json"]);
        assert!(matches!(
            cli.map(|c| c.command),
            Ok(Command::Devices {
                action: Some(DevicesCommand::Revoke { .. }),
                json: true,
            })
        ));
    }

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
