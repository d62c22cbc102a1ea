//! `errand-desktop`: the desktop daemon and its CLI.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use errand_core::DeviceKind;
use errand_p2p::{
    api::{Request, exit},
    cli::{self, NetArgs, Opened},
    control::ApiError,
    peer::{Peer, PeerConfig},
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
    },
    /// Show this desktop's id, thread, addresses and peers.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List trusted devices, or add one by hand.
    Devices {
        #[command(subcommand)]
        action: Option<DevicesCommand>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Queue a task on this desktop itself (handy for trying it out).
    Send {
        /// The instruction.
        text: String,
        /// Executor to run it with (default: the first configured).
        #[arg(long)]
        executor: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the thread: every task and message.
    Thread {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one task.
    Task {
        /// The task id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
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
    let cli = Cli::parse();
    let home = cli::home_dir(cli.home, "desktop");
    cli::finish(run(home, cli.command).await)
}

async fn run(home: PathBuf, command: Command) -> Result<(), ApiError> {
    match command {
        Command::Run { net, name } => {
            cli::init_logging("info");
            daemon(home, net, name).await
        }
        other => {
            cli::init_logging("warn");
            let opened = cli::open(home, DeviceKind::Desktop)?;
            let out = command_request(&opened, other).await;
            if let Opened::Local(peer) = &opened {
                peer.shutdown().await;
            }
            out
        }
    }
}

async fn command_request(opened: &Opened, command: Command) -> Result<(), ApiError> {
    match command {
        Command::Run { .. } => Err(ApiError::with_code(exit::USAGE, "run is not a request")),
        Command::Status { json } => {
            let v = cli::execute(opened, Request::Status).await?;
            if json {
                cli::print_json(&v)
            } else {
                cli::print_status(&v)
            }
            Ok(())
        }
        Command::Devices { action: None, json } => {
            let v = cli::execute(opened, Request::Devices).await?;
            if json {
                cli::print_json(&v);
            } else {
                for d in v.as_array().into_iter().flatten() {
                    let g = |k: &str| d.get(k).and_then(|x| x.as_str()).unwrap_or("-").to_owned();
                    let revoked = d.get("revoked").and_then(|x| x.as_bool()).unwrap_or(false);
                    println!(
                        "{}  {} ({}) paired {} last seen {}{}",
                        g("id"),
                        g("name"),
                        g("kind"),
                        g("paired_at"),
                        g("last_seen"),
                        if revoked { "  REVOKED" } else { "" }
                    );
                }
            }
            Ok(())
        }
        Command::Devices {
            action:
                Some(DevicesCommand::Add {
                    peer_id,
                    addrs,
                    name,
                }),
            json,
        } => {
            let v = cli::execute(
                opened,
                Request::DevicesAdd {
                    id: peer_id,
                    addrs,
                    name,
                },
            )
            .await?;
            if json {
                cli::print_json(&v)
            } else {
                println!(
                    "trusted {}",
                    v.get("id").and_then(|x| x.as_str()).unwrap_or("")
                )
            }
            Ok(())
        }
        Command::Send {
            text,
            executor,
            json,
        } => {
            let v = cli::execute(
                opened,
                Request::Send {
                    text,
                    executor,
                    not_after: None,
                },
            )
            .await?;
            if json {
                cli::print_json(&v)
            } else {
                println!(
                    "{}",
                    v.get("task_id").and_then(|x| x.as_str()).unwrap_or("")
                )
            }
            Ok(())
        }
        Command::Thread { json } => {
            let v = cli::execute(opened, Request::Thread).await?;
            if json {
                cli::print_json(&v)
            } else {
                for t in v
                    .get("tasks")
                    .and_then(|x| x.as_array())
                    .into_iter()
                    .flatten()
                {
                    cli::print_task(t);
                }
            }
            Ok(())
        }
        Command::Task { id, json } => {
            let v = cli::execute(opened, Request::Task { id }).await?;
            if json {
                cli::print_json(&v)
            } else {
                cli::print_task(&v);
                if let Some(out) = v.get("output_tail").and_then(|x| x.as_str()) {
                    print!("{out}");
                }
            }
            Ok(())
        }
    }
}

async fn daemon(home: PathBuf, net: NetArgs, name: Option<String>) -> Result<(), ApiError> {
    let peer = Peer::open(PeerConfig {
        home: home.clone(),
        kind: DeviceKind::Desktop,
        name,
        listen: net.listen_addrs(),
        mdns: !net.no_mdns,
    })
    .map_err(|e| match e {
        errand_p2p::peer::PeerError::Store(errand_crdt::StoreError::Locked(_)) => {
            ApiError::with_code(
                exit::LOCKED,
                format!("another errand-desktop already runs for {}", home.display()),
            )
        }
        e => ApiError::new(e.to_string()),
    })?;
    peer.publish_self(vec!["shell".into()])
        .await
        .map_err(|e| ApiError::new(e.to_string()))?;
    peer.start()
        .await
        .map_err(|e| ApiError::new(e.to_string()))?;
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
    use std::io::Write;
    let _ = std::io::stdout().flush();
    cli::shutdown_signal().await;
    tracing::info!("shutting down");
    control.abort();
    peer.shutdown().await;
    Ok(())
}
