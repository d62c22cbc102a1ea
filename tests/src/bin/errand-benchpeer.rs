//! `errand-benchpeer`: one benchmark process for `errand-bench`.
//!
//! - `peer`: opens a home as a desktop or a phone with the same [`Peer`] the real binaries run
//!   (no task runner, no control socket), starts the network on loopback, and takes line commands
//!   on stdin. Every answer and every peer event is one JSON line on stdout, stamped with
//!   `CLOCK_MONOTONIC` nanoseconds (`t`), which compare across processes on one machine.
//! - `reserve`: idle relay reservations from in-process client swarms, then idle circuits on
//!   command, so the bench can read the relay's RSS between the steps.
//! - `throughput`: bytes through one libp2p stream, direct and through a relay circuit.
//! - `stock-relay`: a stock rust-libp2p circuit relay v2 (relay + identify + ping, as in
//!   rust-libp2p's `relay-server` example, with its count limits raised): the reference for the
//!   relay's memory per reservation and per circuit.
//!
//! Closing stdin ends every mode, so a bench that dies leaves no process behind.

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use errand_core::DeviceKind;
use errand_crdt::NewTask;
use errand_p2p::{
    api::{self, Call as _},
    peer::{Peer, PeerConfig, PeerEvent, now_ms},
};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, identify,
    multiaddr::Protocol,
    noise, ping, relay,
    swarm::{NetworkBehaviour, SwarmEvent},
    tcp, yamux,
};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};

/// Tasks per commit in `fill`: one Automerge change per task, one store write per batch (the
/// same batching as the test harness's `fill_tasks`), so queueing 10,000 offline tasks takes
/// seconds. Only the catch-up after it is measured.
const FILL_BATCH: usize = 250;
/// Lifetime of a pairing ticket the bench asks for: longer than any run.
const TICKET_TTL_SECS: u64 = 600;
/// Client swarms keep idle connections this long: the relay measurements hold reservations and
/// circuits open with no stream on them for far less than this.
const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// A client reservation or circuit that takes longer than this counts as failed.
const CLIENT_STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Identify protocol of Errand's nodes, so the relay sees the same identify traffic as from a peer.
const IDENTIFY_PROTOCOL: &str = "/errand/id/1.0.0";
/// The throughput test's stream protocol.
const THROUGHPUT_PROTOCOL: StreamProtocol = StreamProtocol::new("/errand-bench/throughput/1");
/// Write size for the throughput test: a typical socket-buffer-sized chunk.
const THROUGHPUT_CHUNK: usize = 64 * 1024;
/// Client notes buffered to the coordinating task; each client sends a handful at most.
const NOTE_CAPACITY: usize = 1024;

/// One benchmark process for errand-bench.
#[derive(Debug, Parser)]
#[command(name = "errand-benchpeer", about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a desktop or phone peer that takes line commands on stdin (see `COMMANDS`).
    Peer(PeerArgs),
    /// Hold idle reservations on a relay; `circuits M` on stdin adds M idle circuits.
    Reserve {
        /// The relay, ending in /p2p/<relay id>.
        #[arg(long)]
        relay: Multiaddr,
        /// How many reservations (one client swarm each).
        #[arg(long)]
        count: usize,
        /// Clients handshaking at once.
        #[arg(long, default_value_t = 32)]
        parallel: usize,
    },
    /// Measure stream throughput, direct and through the relay.
    Throughput {
        /// The relay, ending in /p2p/<relay id>.
        #[arg(long)]
        relay: Multiaddr,
        /// Bytes per run.
        #[arg(long)]
        bytes: usize,
        /// Runs per path.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Run a stock rust-libp2p relay (the reference for the relay's memory).
    StockRelay {
        /// Where to listen.
        #[arg(long, default_value = "/ip4/127.0.0.1/tcp/0")]
        listen: Multiaddr,
    },
}

#[derive(Debug, clap::Args)]
struct PeerArgs {
    /// The home.
    #[arg(long)]
    home: PathBuf,
    /// desktop or phone.
    #[arg(long)]
    kind: String,
    /// Device name.
    #[arg(long)]
    name: Option<String>,
    /// Listen address.
    #[arg(long, default_value = "/ip4/127.0.0.1/tcp/0")]
    listen: Multiaddr,
    /// A relay to reserve on (repeatable).
    #[arg(long)]
    relay: Vec<Multiaddr>,
    /// Reach peers only through relay circuits.
    #[arg(long)]
    relay_only: bool,
}

/// The line commands of `peer` mode, one per line on stdin.
const COMMANDS: &str = "send TEXT | send-to EXECUTOR TEXT | send-measure TEXT | fill N TEXT | \
dial PEER ADDR | stop-net | start-net [PEER ADDR] | status | cpu | ticket | pair TICKET | \
auto-answer | quit";

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Logs go to stderr (the bench keeps them per process); RUST_LOG filters them.
    errand_p2p::cli::init_logging("warn");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("while building the tokio runtime")?;
    rt.block_on(async {
        match cli.command {
            Command::Peer(a) => run_peer(a).await,
            Command::Reserve {
                relay,
                count,
                parallel,
            } => run_reserve(relay, count, parallel).await,
            Command::Throughput { relay, bytes, runs } => run_throughput(relay, bytes, runs).await,
            Command::StockRelay { listen } => run_stock_relay(listen).await,
        }
    })
}

// ---- output ------------------------------------------------------------------------------

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process on the machine. (Through
/// libc, so the peer also runs under valgrind.)
fn mono_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_MONOTONIC)
}

/// CPU time of this whole process (all threads, including exited ones), in nanoseconds.
fn process_cpu_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID)
}

fn clock_ns(clock: nix::time::ClockId) -> u64 {
    // These clocks exist on every Linux; 0 would only make one figure wrong, visibly.
    nix::time::clock_gettime(clock).map_or(0, |ts| {
        ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
    })
}

/// Prints one JSON line and flushes, so the bench sees it at once.
fn emit(v: Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn error_line(cmd: &str, e: &anyhow::Error) -> Value {
    json!({ "ev": "error", "t": mono_ns(), "cmd": cmd, "error": format!("{e:#}") })
}

/// Commands buffered from stdin: the bench sends one and waits for its answer.
const STDIN_CAPACITY: usize = 64;

/// Lines from stdin until it closes, read on a plain thread (a blocking read is not
/// cancel-safe inside `select!`).
fn stdin_lines() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(STDIN_CAPACITY);
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

// ---- peer mode ---------------------------------------------------------------------------

async fn run_peer(a: PeerArgs) -> Result<()> {
    let kind: DeviceKind = a.kind.parse().map_err(|e: String| anyhow!(e))?;
    let peer = Peer::open(PeerConfig {
        home: a.home.clone(),
        kind,
        name: a.name.clone(),
        listen: vec![a.listen.clone()],
        mdns: false,
        relays: a.relay.clone(),
        relay_only: a.relay_only,
        blob_caps: Default::default(),
    })
    .with_context(|| format!("while opening {}", a.home.display()))?;
    let events = peer.events();
    tokio::spawn(print_events(events));
    peer.start().await.context("while starting the network")?;
    emit(json!({
        "ev": "ready",
        "t": mono_ns(),
        "peer_id": peer.peer_id().to_base58(),
        "thread_id": peer.replica().genesis().map(|g| g.thread_id.to_string()),
        "listen_addrs": listen_addrs(&peer).await,
    }));
    let mut lines = stdin_lines();
    while let Some(line) = lines.recv().await {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        if cmd == "quit" {
            break;
        }
        match peer_command(&peer, cmd, rest.trim()).await {
            Ok(v) => emit(v),
            Err(e) => emit(error_line(cmd, &e)),
        }
    }
    peer.shutdown().await;
    emit(json!({ "ev": "bye", "t": mono_ns() }));
    Ok(())
}

async fn listen_addrs(peer: &Peer) -> Vec<String> {
    match peer.node() {
        Some(n) => n
            .listen_addrs()
            .await
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect(),
        None => Vec::new(),
    }
}

async fn print_events(mut events: tokio::sync::broadcast::Receiver<PeerEvent>) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let ev = match events.recv().await {
            Ok(ev) => ev,
            Err(RecvError::Lagged(n)) => {
                emit(json!({ "ev": "lagged", "t": mono_ns(), "n": n }));
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let t = mono_ns();
        emit(match ev {
            PeerEvent::Connected { peer, relayed } => {
                json!({ "ev": "connected", "t": t, "peer": peer.to_base58(), "relayed": relayed })
            }
            PeerEvent::Disconnected { peer } => {
                json!({ "ev": "disconnected", "t": t, "peer": peer.to_base58() })
            }
            PeerEvent::Merged { peer, tasks } => json!({
                "ev": "merged",
                "t": t,
                "peer": peer.to_base58(),
                "tasks": tasks.iter().map(ToString::to_string).collect::<Vec<_>>(),
            }),
            PeerEvent::Committed { tasks } => {
                json!({ "ev": "committed", "t": t, "n": tasks.len() })
            }
            PeerEvent::InSync { peer } => {
                json!({ "ev": "in_sync", "t": t, "peer": peer.to_base58() })
            }
        });
    }
}

/// Answers every permission request that merges in with `allow`, and says when.
async fn auto_answer(peer: Peer, mut events: tokio::sync::broadcast::Receiver<PeerEvent>) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let tasks = match events.recv().await {
            Ok(PeerEvent::Merged { tasks, .. }) => tasks,
            Ok(_) | Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        };
        for id in tasks {
            let pending = peer
                .replica()
                .read(move |d| d.task(&id))
                .await
                .ok()
                .flatten()
                .and_then(|t| errand_core::fold(&t).permission);
            if pending.is_none() {
                continue;
            }
            let answer = api::Answer {
                id,
                option: "allow".into(),
            };
            match answer.run(&peer).await {
                Ok(a) => emit(json!({
                    "ev": "answered", "t": mono_ns(), "task": id.to_string(), "option": a.option,
                })),
                Err(e) => emit(
                    json!({ "ev": "error", "t": mono_ns(), "cmd": "auto-answer", "error": e.message }),
                ),
            }
        }
    }
}

/// The desktop that runs tasks: the thread's owner.
fn target(peer: &Peer) -> Result<errand_core::DeviceId> {
    peer.replica()
        .genesis()
        .map(|g| g.owner)
        .context("this home has no thread yet")
}

fn new_task(target: errand_core::DeviceId, text: &str) -> NewTask {
    NewTask {
        instruction: text.to_owned(),
        executor: "shell".into(),
        target,
        not_after: None,
        attachments: Vec::new(),
    }
}

fn two_args(rest: &str) -> Result<(PeerId, Multiaddr)> {
    let mut it = rest.split_whitespace();
    let (Some(p), Some(a)) = (it.next(), it.next()) else {
        bail!("expected PEER ADDR");
    };
    Ok((p.parse().context("peer id")?, a.parse().context("address")?))
}

/// Remembers `addr` for `pid` (what pairing or `devices add --addr` stores), then dials it.
async fn remember_and_dial(peer: &Peer, pid: PeerId, addr: Multiaddr) -> Result<()> {
    let mut t = peer
        .trusted_peers()
        .await?
        .into_iter()
        .find(|t| t.id.as_str() == pid.to_base58())
        .with_context(|| format!("{pid} is not trusted by this home"))?;
    t.addrs = vec![addr.to_string()];
    peer.trust(t).await?;
    peer.dial(pid, vec![addr]).await?;
    Ok(())
}

async fn peer_command(peer: &Peer, cmd: &str, rest: &str) -> Result<Value> {
    match cmd {
        "send" => {
            let task = new_task(target(peer)?, rest);
            let t0 = mono_ns();
            let id = peer.enqueue_task(task).await?;
            let t1 = mono_ns();
            Ok(json!({ "ev": "sent", "t": t1, "t0": t0, "t1": t1, "task": id.to_string() }))
        }
        "send-to" => {
            // `send-to EXECUTOR TEXT`: a task for one of the desktop's executors.
            let (executor, text) = rest.split_once(' ').context("expected EXECUTOR TEXT")?;
            let mut task = new_task(target(peer)?, text);
            task.executor = executor.to_owned();
            let t0 = mono_ns();
            let id = peer.enqueue_task(task).await?;
            let t1 = mono_ns();
            Ok(json!({ "ev": "sent", "t": t1, "t0": t0, "t1": t1, "task": id.to_string() }))
        }
        "auto-answer" => {
            // From now on, a permission request that merges in is answered "allow" at once, as
            // a phone app would when its listener fires.
            tokio::spawn(auto_answer(peer.clone(), peer.events()));
            Ok(json!({ "ev": "auto-answer", "t": mono_ns() }))
        }
        "send-measure" => {
            // Like `send`, and also the size of the change itself (Automerge's encoding of it).
            let task = new_task(target(peer)?, rest);
            let t0 = mono_ns();
            let ((id, change_bytes), _) = peer
                .replica()
                .commit(move |d| {
                    let id = d.enqueue_task(&task, now_ms())?;
                    let n = d.task_segment(&id).unwrap_or(0);
                    let len = d
                        .part_mut(n)
                        .and_then(|p| p.automerge().get_last_local_change())
                        .map_or(0, |c| c.raw_bytes().len());
                    Ok((id, len))
                })
                .await?;
            let t1 = mono_ns();
            Ok(json!({
                "ev": "sent", "t": t1, "t0": t0, "t1": t1,
                "task": id.to_string(), "change_bytes": change_bytes,
            }))
        }
        "fill" => {
            let (n, text) = rest.split_once(' ').unwrap_or((rest, "offline task"));
            let n: usize = n.parse().context("fill N TEXT")?;
            let target = target(peer)?;
            let started = Instant::now();
            let mut next = 0;
            while next < n {
                let end = (next + FILL_BATCH).min(n);
                let (target, text) = (target.clone(), text.to_owned());
                peer.replica()
                    .commit(move |d| {
                        for i in next..end {
                            d.enqueue_task(
                                &new_task(target.clone(), &format!("{text} {i}")),
                                now_ms(),
                            )?;
                        }
                        Ok(())
                    })
                    .await?;
                next = end;
            }
            Ok(json!({
                "ev": "filled", "t": mono_ns(), "n": n,
                "ms": started.elapsed().as_secs_f64() * 1e3,
            }))
        }
        "dial" => {
            let (pid, addr) = two_args(rest)?;
            remember_and_dial(peer, pid, addr).await?;
            Ok(json!({ "ev": "dialing", "t": mono_ns() }))
        }
        "stop-net" => {
            peer.shutdown().await;
            Ok(json!({ "ev": "net", "t": mono_ns(), "up": false }))
        }
        "start-net" => {
            let t0 = mono_ns();
            peer.start().await?;
            if !rest.is_empty() {
                let (pid, addr) = two_args(rest)?;
                remember_and_dial(peer, pid, addr).await?;
            }
            Ok(json!({
                "ev": "net", "t": mono_ns(), "t0": t0, "up": true,
                "listen_addrs": listen_addrs(peer).await,
            }))
        }
        "status" => {
            let s = peer.status().await?;
            Ok(json!({ "ev": "status", "t": mono_ns(), "status": s }))
        }
        "cpu" => {
            let cpu = process_cpu_ns();
            Ok(json!({ "ev": "cpu", "t": mono_ns(), "cpu_ns": cpu }))
        }
        "ticket" => {
            let issued = api::IssueTicket {
                ttl_secs: TICKET_TTL_SECS,
            }
            .run(peer)
            .await
            .map_err(|e| anyhow!(e.message))?;
            Ok(json!({ "ev": "ticket", "t": mono_ns(), "ticket": issued.ticket }))
        }
        "pair" => {
            let t0 = mono_ns();
            let out = api::PairWith {
                ticket: rest.to_owned(),
            }
            .run(peer)
            .await;
            let t1 = mono_ns();
            match out {
                Ok(v) => Ok(json!({ "ev": "paired", "t": t1, "t0": t0, "t1": t1, "result": v })),
                Err(e) => Err(anyhow!(e.message)),
            }
        }
        other => bail!("unknown command {other:?}; commands: {COMMANDS}"),
    }
}

// ---- relay clients -----------------------------------------------------------------------

/// What a relay client swarm carries: the relay client, plus identify and ping as an Errand node
/// has them (so the relay sees the same per-connection protocols).
#[derive(NetworkBehaviour)]
struct ClientBehaviour {
    relay: relay::client::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    stream: libp2p_stream::Behaviour,
}

fn client_swarm() -> Result<Swarm<ClientBehaviour>> {
    Ok(SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_relay_client(noise::Config::new, yamux::Config::default)?
        .with_behaviour(|key, relay| ClientBehaviour {
            relay,
            identify: identify::Behaviour::new(identify::Config::new(
                IDENTIFY_PROTOCOL.into(),
                key.public(),
            )),
            ping: ping::Behaviour::new(ping::Config::new()),
            stream: libp2p_stream::Behaviour::new(),
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(CLIENT_IDLE_TIMEOUT))
        .build())
}

/// What a client task reports to the coordinator.
#[derive(Debug)]
enum Note {
    /// A TCP listen address came up.
    Listening(Multiaddr),
    /// The reservation was accepted.
    Reserved(PeerId),
    /// A connection to this peer is up.
    Connected(PeerId),
    /// Something failed.
    Failed(String),
}

/// Drives a client swarm forever, dialing what it is told to and reporting what the
/// coordinator waits for.
async fn drive(
    mut swarm: Swarm<ClientBehaviour>,
    notes: mpsc::Sender<Note>,
    mut dials: mpsc::Receiver<Multiaddr>,
) {
    let me = *swarm.local_peer_id();
    loop {
        let ev = tokio::select! {
            Some(addr) = dials.recv() => {
                if let Err(e) = swarm.dial(addr) {
                    let _ = notes.send(Note::Failed(format!("dial: {e}"))).await;
                }
                continue;
            }
            ev = swarm.select_next_some() => ev,
        };
        let note = match ev {
            SwarmEvent::NewListenAddr { address, .. }
                if !address.iter().any(|p| matches!(p, Protocol::P2pCircuit)) =>
            {
                Note::Listening(address)
            }
            SwarmEvent::Behaviour(ClientBehaviourEvent::Relay(
                relay::client::Event::ReservationReqAccepted { renewal: false, .. },
            )) => Note::Reserved(me),
            SwarmEvent::ConnectionEstablished { peer_id, .. } => Note::Connected(peer_id),
            SwarmEvent::ListenerClosed { reason: Err(e), .. } => {
                Note::Failed(format!("listener closed: {e}"))
            }
            SwarmEvent::OutgoingConnectionError { error, .. } => {
                Note::Failed(format!("dial failed: {error}"))
            }
            _ => continue,
        };
        // The coordinator may have stopped listening; the swarm keeps its connections anyway.
        let _ = notes.send(note).await;
    }
}

/// Spawns a client swarm's driver; returns where its notes arrive and how to make it dial.
fn spawn_client(swarm: Swarm<ClientBehaviour>) -> (mpsc::Receiver<Note>, mpsc::Sender<Multiaddr>) {
    let (note_tx, note_rx) = mpsc::channel(16);
    let (dial_tx, dial_rx) = mpsc::channel(4);
    tokio::spawn(drive(swarm, note_tx, dial_rx));
    (note_rx, dial_tx)
}

/// One reserved client, as the coordinator sees it.
struct Reserved {
    peer: PeerId,
    dial: mpsc::Sender<Multiaddr>,
}

async fn run_reserve(relay_addr: Multiaddr, count: usize, parallel: usize) -> Result<()> {
    let relay_id = relay_peer(&relay_addr)?;
    let started = Instant::now();
    let permits = std::sync::Arc::new(Semaphore::new(parallel.max(1)));
    let (done_tx, mut done_rx) = mpsc::channel::<Result<Reserved, String>>(NOTE_CAPACITY);
    // Circuit results, tagged with the client's peer id.
    let (conn_tx, mut conn_rx) = mpsc::channel::<(PeerId, Result<PeerId, String>)>(NOTE_CAPACITY);
    for _ in 0..count {
        let permit = permits.clone().acquire_owned().await?;
        let mut swarm = client_swarm()?;
        let me = *swarm.local_peer_id();
        swarm.listen_on(relay_addr.clone().with(Protocol::P2pCircuit))?;
        let (done, conns) = (done_tx.clone(), conn_tx.clone());
        tokio::spawn(async move {
            let (mut rx, dial) = spawn_client(swarm);
            let r = tokio::time::timeout(CLIENT_STEP_TIMEOUT, async {
                while let Some(n) = rx.recv().await {
                    match n {
                        Note::Reserved(me) => return Ok(me),
                        Note::Failed(e) => return Err(e),
                        _ => {}
                    }
                }
                Err("client stopped".to_owned())
            })
            .await
            .unwrap_or_else(|_| Err("reservation timed out".into()));
            drop(permit);
            let _ = done.send(r.map(|peer| Reserved { peer, dial })).await;
            // Later connections (circuits) go to the coordinator; keep draining either way.
            while let Some(n) = rx.recv().await {
                let r = match n {
                    Note::Connected(p) if p != relay_id => Ok(p),
                    Note::Failed(e) => Err(e),
                    _ => continue,
                };
                let _ = conns.send((me, r)).await;
            }
        });
    }
    drop(done_tx);
    let mut reserved = Vec::with_capacity(count);
    let mut failures = Vec::new();
    // Each client task keeps its sender while its swarm lives: count answers, not senders.
    for _ in 0..count {
        match done_rx.recv().await {
            Some(Ok(r)) => reserved.push(r),
            Some(Err(e)) => failures.push(e),
            None => break,
        }
    }
    emit(json!({
        "ev": "reserved", "t": mono_ns(), "n": reserved.len(), "failed": failures.len(),
        "first_error": failures.first(), "ms": started.elapsed().as_secs_f64() * 1e3,
        "relay": relay_id.to_base58(),
    }));
    let mut lines = stdin_lines();
    let mut next = 0usize;
    while let Some(line) = lines.recv().await {
        let line = line.trim();
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        match cmd {
            "quit" => break,
            "circuits" => {
                let m: usize = match rest.trim().parse() {
                    Ok(m) => m,
                    Err(e) => {
                        emit(error_line(cmd, &anyhow!("circuits M: {e}")));
                        continue;
                    }
                };
                // Reserved client 2k dials reserved client 2k+1 through the relay, over the
                // connection that holds its own reservation (as a phone does).
                let mut dialers = HashSet::new();
                while dialers.len() < m && next + 1 < reserved.len() {
                    let (a, b) = (&reserved[next], &reserved[next + 1]);
                    let addr = relay_addr
                        .clone()
                        .with(Protocol::P2pCircuit)
                        .with(Protocol::P2p(b.peer));
                    if a.dial.send(addr).await.is_ok() {
                        dialers.insert(a.peer);
                    }
                    next += 2;
                }
                let (mut ok, mut failed, mut first_error) = (0usize, 0usize, None);
                let deadline = tokio::time::Instant::now() + CLIENT_STEP_TIMEOUT;
                while ok + failed < dialers.len() {
                    match tokio::time::timeout_at(deadline, conn_rx.recv()).await {
                        Ok(Some((who, r))) if dialers.contains(&who) => match r {
                            Ok(_) => ok += 1,
                            Err(e) => {
                                failed += 1;
                                first_error.get_or_insert(e);
                            }
                        },
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
                emit(json!({
                    "ev": "circuits", "t": mono_ns(), "n": ok, "failed": failed,
                    "first_error": first_error,
                }));
            }
            "" => {}
            other => emit(error_line(other, &anyhow!("commands: circuits M | quit"))),
        }
    }
    Ok(())
}

fn relay_peer(addr: &Multiaddr) -> Result<PeerId> {
    addr.iter()
        .find_map(|p| match p {
            Protocol::P2p(id) => Some(id),
            _ => None,
        })
        .with_context(|| format!("{addr} does not end in /p2p/<relay id>"))
}

// ---- throughput --------------------------------------------------------------------------

/// Waits for a note matching `f`, or fails with what went wrong.
async fn wait_note<T>(
    rx: &mut mpsc::Receiver<Note>,
    what: &str,
    mut f: impl FnMut(&Note) -> Option<T>,
) -> Result<T> {
    tokio::time::timeout(CLIENT_STEP_TIMEOUT, async {
        while let Some(n) = rx.recv().await {
            if let Some(v) = f(&n) {
                return Ok(v);
            }
            if let Note::Failed(e) = n {
                bail!("{what}: {e}");
            }
        }
        bail!("{what}: the swarm stopped")
    })
    .await
    .map_err(|_| anyhow!("{what}: timed out"))?
}

async fn run_throughput(relay_addr: Multiaddr, bytes: usize, runs: usize) -> Result<()> {
    // The server: listens directly and through the relay, and acks each stream with its length.
    let mut server = client_swarm()?;
    let server_id = *server.local_peer_id();
    server.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
    server.listen_on(relay_addr.clone().with(Protocol::P2pCircuit))?;
    let mut incoming = server
        .behaviour()
        .stream
        .new_control()
        .accept(THROUGHPUT_PROTOCOL)
        .map_err(|e| anyhow!("{e}"))?;
    let (mut server_notes, _server_dials) = spawn_client(server);
    tokio::spawn(async move {
        while let Some((_, mut stream)) = incoming.next().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; THROUGHPUT_CHUNK];
                let mut total = 0u64;
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = stream.write_all(&total.to_be_bytes()).await;
                let _ = stream.close().await;
            });
        }
    });
    let mut direct_addr = None;
    let mut reserved = false;
    while direct_addr.is_none() || !reserved {
        match wait_note(&mut server_notes, "server listen/reserve", |n| match n {
            Note::Listening(a) => Some(Some(a.clone())),
            Note::Reserved(_) => Some(None),
            _ => None,
        })
        .await?
        {
            Some(a) => direct_addr = Some(a),
            None => reserved = true,
        }
    }
    tokio::spawn(async move { while server_notes.recv().await.is_some() {} });
    let direct_addr = direct_addr
        .context("no direct address")?
        .with(Protocol::P2p(server_id));
    let relayed_addr = relay_addr
        .with(Protocol::P2pCircuit)
        .with(Protocol::P2p(server_id));

    let mut results = serde_json::Map::new();
    for (label, addr) in [("direct", direct_addr), ("relayed", relayed_addr)] {
        let mut client = client_swarm()?;
        let mut control = client.behaviour().stream.new_control();
        client.dial(addr)?;
        let (mut notes, _dials) = spawn_client(client);
        wait_note(&mut notes, label, |n| {
            matches!(n, Note::Connected(p) if *p == server_id).then_some(())
        })
        .await?;
        tokio::spawn(async move { while notes.recv().await.is_some() {} });
        let chunk = vec![0x5au8; THROUGHPUT_CHUNK];
        let mut mbps = Vec::with_capacity(runs);
        for _ in 0..runs {
            let mut stream = control
                .open_stream(server_id, THROUGHPUT_PROTOCOL)
                .await
                .map_err(|e| anyhow!("{label}: {e}"))?;
            let started = Instant::now();
            let mut left = bytes;
            while left > 0 {
                let n = left.min(THROUGHPUT_CHUNK);
                stream.write_all(&chunk[..n]).await?;
                left -= n;
            }
            stream.close().await?;
            let mut ack = [0u8; 8];
            stream.read_exact(&mut ack).await?;
            let secs = started.elapsed().as_secs_f64();
            if u64::from_be_bytes(ack) != bytes as u64 {
                bail!(
                    "{label}: the server counted {} of {bytes} bytes",
                    u64::from_be_bytes(ack)
                );
            }
            mbps.push(bytes as f64 / secs / 1e6);
        }
        results.insert(label.to_owned(), json!(mbps));
    }
    emit(json!({ "ev": "throughput", "t": mono_ns(), "bytes": bytes, "mbps": results }));
    Ok(())
}

// ---- stock relay -------------------------------------------------------------------------

/// rust-libp2p's `relay-server` example: relay, identify, ping.
#[derive(NetworkBehaviour)]
struct StockRelayBehaviour {
    relay: relay::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

/// Count limits of the stock relay: high enough for any bench run (libp2p's defaults are 128
/// reservations and 16 circuits, which the bench would hit).
const STOCK_MAX: usize = 100_000;

#[allow(clippy::single_match)]
async fn run_stock_relay(listen: Multiaddr) -> Result<()> {
    let mut swarm = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|key| {
            #[allow(clippy::field_reassign_with_default)]
            let config = {
                let mut config = relay::Config::default();
                config.max_reservations = STOCK_MAX;
                config.max_circuits = STOCK_MAX;
                config.max_circuits_per_peer = STOCK_MAX;
                config.reservation_rate_limiters = Vec::new();
                config
            };
            let mut config = config;
            config.circuit_src_rate_limiters = Vec::new();
            StockRelayBehaviour {
                relay: relay::Behaviour::new(key.public().to_peer_id(), config),
                identify: identify::Behaviour::new(identify::Config::new(
                    "/ipfs/0.1.0".into(),
                    key.public(),
                )),
                ping: ping::Behaviour::new(ping::Config::new()),
            }
        })?
        .build();
    let me = *swarm.local_peer_id();
    swarm.listen_on(listen)?;
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address;
        }
    };
    // A relay grants reservations only once it has an external address.
    swarm.add_external_address(addr.clone());
    emit(
        json!({ "ev": "ready", "t": mono_ns(), "addr": addr.with(Protocol::P2p(me)).to_string() }),
    );
    let reservations = AtomicUsize::new(0);
    let mut circuits: HashSet<(PeerId, PeerId)> = HashSet::new();
    let mut lines = stdin_lines();
    loop {
        tokio::select! {
            line = lines.recv() => match line {
                Some(l) if l.trim() == "stats" => emit(json!({
                    "ev": "stats", "t": mono_ns(),
                    "reservations": reservations.load(Ordering::Relaxed),
                    "circuits": circuits.len(),
                })),
                Some(_) => {}
                None => break,
            },
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::Behaviour(StockRelayBehaviourEvent::Relay(e)) => match e {
                    relay::Event::ReservationReqAccepted { renewed: false, .. } => {
                        reservations.fetch_add(1, Ordering::Relaxed);
                    }
                    relay::Event::ReservationTimedOut { .. }
                    | relay::Event::ReservationClosed { .. } => {
                        reservations.fetch_sub(1, Ordering::Relaxed);
                    }
                    relay::Event::CircuitReqAccepted { src_peer_id, dst_peer_id } => {
                        circuits.insert((src_peer_id, dst_peer_id));
                    }
                    relay::Event::CircuitClosed { src_peer_id, dst_peer_id, .. } => {
                        circuits.remove(&(src_peer_id, dst_peer_id));
                    }
                    _ => {}
                },
                _ => {}
            },
        }
    }
    Ok(())
}
