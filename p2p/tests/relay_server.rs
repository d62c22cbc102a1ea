//! Tests of `errand-relay`: the real binary as a child process, and the library API in-process.
//!
//! All traffic stays on 127.0.0.1. Every child gets its own `--home` in a temp dir and is killed
//! by a drop guard if a test fails. Waits poll a condition against a generous deadline.

use std::{
    io::{BufRead as _, BufReader, Read},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use errand_p2p::relay::{self as relay_server, IDENTITY_FILE_NAME, Relay, RelayConfig, RelayStats};
use futures::StreamExt as _;
use libp2p::{
    Multiaddr, PeerId, Swarm, identify,
    multiaddr::Protocol,
    noise, ping, relay, rendezvous,
    swarm::{NetworkBehaviour, SwarmEvent},
    tcp, yamux,
};

const BIN: &str = env!("CARGO_BIN_EXE_errand-relay");

/// Generous: CI machines are slow and shared; a healthy run takes well under a second per step.
const DEADLINE: Duration = Duration::from_secs(30);

/// How often polled conditions are re-checked.
const POLL: Duration = Duration::from_millis(50);

type Lines = Arc<Mutex<Vec<String>>>;

fn collect_lines(stream: impl Read + Send + 'static) -> Lines {
    let lines = Lines::default();
    let sink = Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// A running `errand-relay`; killed on drop.
struct RelayProcess {
    child: Child,
    stdout: Lines,
    stderr: Lines,
}

impl RelayProcess {
    fn spawn(home: &Path, extra: &[&str]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(["--listen", "/ip4/127.0.0.1/tcp/0", "--home"])
            .arg(home)
            .args(extra)
            .env_remove("ERRAND_HOME");
        Self::start(cmd)
    }

    fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn errand-relay");
        let stdout = collect_lines(child.stdout.take().expect("piped stdout"));
        let stderr = collect_lines(child.stderr.take().expect("piped stderr"));
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// The first address printed on stdout.
    fn first_addr(&mut self) -> Multiaddr {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(line) = self.stdout.lock().unwrap().first() {
                return line.parse().expect("stdout line is a multiaddr");
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("relay exited with {status}: {}", self.stderr_text());
            }
            assert!(
                Instant::now() < deadline,
                "no address on stdout: {}",
                self.stderr_text()
            );
            std::thread::sleep(POLL);
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Sends SIGTERM and waits for the exit.
    fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "relay ignored SIGTERM");
            std::thread::sleep(POLL);
        }
    }

    fn latest_stats(&self) -> Option<RelayStats> {
        let lines = self.stderr.lock().unwrap();
        lines
            .iter()
            .rev()
            .find_map(|l| RelayStats::parse_log_line(l))
    }

    fn stats_lines(&self) -> usize {
        let lines = self.stderr.lock().unwrap();
        lines
            .iter()
            .filter(|l| RelayStats::parse_log_line(l).is_some())
            .count()
    }

    /// Asks for stats with SIGUSR1 until `pred` holds for the latest line.
    fn wait_for_stats(&self, pred: impl Fn(&RelayStats) -> bool) -> RelayStats {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let before = self.stats_lines();
            self.signal("USR1");
            while self.stats_lines() == before {
                assert!(Instant::now() < deadline, "no stats line after SIGUSR1");
                std::thread::sleep(POLL);
            }
            let stats = self.latest_stats().expect("a stats line");
            if pred(&stats) {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "stats never matched; last: {stats:?}"
            );
            std::thread::sleep(POLL * 4);
        }
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        // Kills our own child by its pid; harmless if it already exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn peer_id_of(addr: &Multiaddr) -> PeerId {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => peer,
        _ => panic!("{addr} does not end in /p2p/<peer id>"),
    }
}

#[derive(NetworkBehaviour)]
struct Client {
    relay: relay::client::Behaviour,
    rendezvous: rendezvous::client::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

fn client() -> Swarm<Client> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .unwrap()
        .with_behaviour(|key, relay| Client {
            relay,
            rendezvous: rendezvous::client::Behaviour::new(key.clone()),
            identify: identify::Behaviour::new(identify::Config::new(
                relay_server::IDENTIFY_PROTOCOL_VERSION.to_owned(),
                key.public(),
            )),
            ping: ping::Behaviour::default(),
        })
        .unwrap()
        // Longer than any test, so the relayed connection stays up while we inspect stats.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build()
}

/// Reserves a slot on the relay; returns the (duration, bytes) limit the relay announced.
async fn reserve(swarm: &mut Swarm<Client>, relay_addr: &Multiaddr) -> (Duration, u64) {
    swarm
        .listen_on(relay_addr.clone().with(Protocol::P2pCircuit))
        .unwrap();
    let accepted = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(ClientEvent::Relay(
                    relay::client::Event::ReservationReqAccepted { limit, .. },
                )) => {
                    let limit = limit.expect("the relay announces its circuit limit");
                    return (
                        limit.duration().expect("a duration limit"),
                        limit.data_in_bytes().expect("a byte limit"),
                    );
                }
                SwarmEvent::ListenerClosed { reason, .. } => {
                    panic!("reservation refused: {reason:?}")
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(DEADLINE, accepted)
        .await
        .expect("reservation accepted within the deadline")
}

/// Polls `swarm` until it has a connection to `peer`; returns that connection's remote address.
async fn connect_via(swarm: &mut Swarm<Client>, addr: Multiaddr, peer: PeerId) -> Multiaddr {
    swarm.dial(addr).unwrap();
    let established = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished {
                    peer_id, endpoint, ..
                } if peer_id == peer => return endpoint.get_remote_address().clone(),
                SwarmEvent::OutgoingConnectionError {
                    peer_id: Some(p),
                    error,
                    ..
                } if p == peer => panic!("dial through the relay failed: {error}"),
                _ => {}
            }
        }
    };
    tokio::time::timeout(DEADLINE, established)
        .await
        .expect("connection within the deadline")
}

/// Drives `swarm` in a task; reports each peer it gets a connection with.
fn drive(
    mut swarm: Swarm<Client>,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::Receiver<PeerId>,
) {
    // A handful of connections per test; the driver drops reports rather than blocking.
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let task = tokio::spawn(async move {
        loop {
            if let SwarmEvent::ConnectionEstablished { peer_id, .. } =
                swarm.select_next_some().await
            {
                let _ = tx.try_send(peer_id);
            }
        }
    });
    (task, rx)
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_process_grants_a_reservation_and_relays_a_circuit_between_two_clients() {
    let home = tempfile::tempdir().unwrap();
    let mut relay = RelayProcess::spawn(home.path(), &[]);
    let relay_addr = relay.first_addr();

    let mut a = client();
    let a_id = *a.local_peer_id();
    let (duration, bytes) = reserve(&mut a, &relay_addr).await;
    // The sync-friendly defaults reach the clients, not libp2p's 2 min / 128 KiB.
    assert_eq!(duration, relay_server::DEFAULT_MAX_CIRCUIT_DURATION);
    assert_eq!(bytes, relay_server::DEFAULT_MAX_CIRCUIT_BYTES);
    let (a_task, mut a_connections) = drive(a);

    let mut b = client();
    let b_id = *b.local_peer_id();
    let circuit = relay_addr
        .clone()
        .with(Protocol::P2pCircuit)
        .with(Protocol::P2p(a_id));
    let remote = connect_via(&mut b, circuit, a_id).await;
    assert!(
        remote.iter().any(|p| p == Protocol::P2pCircuit),
        "connection to A should be relayed, got {remote}"
    );
    let seen_by_a = tokio::time::timeout(DEADLINE, async {
        while let Some(peer) = a_connections.recv().await {
            if peer == b_id {
                return true;
            }
        }
        false
    })
    .await
    .expect("A sees B within the deadline");
    assert!(seen_by_a);
    let (b_task, _b_connections) = drive(b);

    let stats = tokio::task::block_in_place(|| {
        relay.wait_for_stats(|s| s.reservations == 1 && s.circuits == 1 && s.connections >= 2)
    });
    assert_eq!(stats.rendezvous_registrations, 0);

    let status = tokio::task::block_in_place(|| relay.terminate());
    assert!(
        status.success(),
        "relay exit: {status}\n{}",
        relay.stderr_text()
    );
    assert!(
        relay.latest_stats().is_some(),
        "a final stats line on shutdown"
    );
    a_task.abort();
    b_task.abort();
}

#[test]
fn relay_process_keeps_its_peer_id_in_a_private_identity_file_and_writes_nothing_else() {
    let home = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut relay = RelayProcess::spawn(home.path(), &[]);
        ids.push(peer_id_of(&relay.first_addr()));
        let status = relay.terminate();
        assert!(
            status.success(),
            "relay exit: {status}\n{}",
            relay.stderr_text()
        );
    }
    assert_eq!(ids[0], ids[1], "PeerId changed across restarts");

    let key = home.path().join(IDENTITY_FILE_NAME);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "identity file mode {mode:o}");
    }
    let entries: Vec<_> = std::fs::read_dir(home.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from(IDENTITY_FILE_NAME)]);
}

#[test]
fn relay_process_takes_its_home_from_errand_home_when_no_flag_is_given() {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["--listen", "/ip4/127.0.0.1/tcp/0"])
        .env("ERRAND_HOME", home.path());
    let mut relay = RelayProcess::start(cmd);
    let _ = relay.first_addr();
    assert!(home.path().join(IDENTITY_FILE_NAME).is_file());
    assert!(relay.terminate().success());
}

#[test]
fn relay_process_writes_a_stats_line_on_its_interval() {
    let home = tempfile::tempdir().unwrap();
    let mut relay = RelayProcess::spawn(home.path(), &["--stats-interval", "200ms"]);
    let _ = relay.first_addr();
    let deadline = Instant::now() + DEADLINE;
    while relay.stats_lines() < 2 {
        assert!(Instant::now() < deadline, "no periodic stats lines");
        std::thread::sleep(POLL);
    }
    assert_eq!(relay.latest_stats(), Some(RelayStats::default()));
}

#[test]
fn help_exits_zero_and_lists_every_flag() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--external-addr",
        "--identity",
        "--home",
        "--stats-interval",
        "--idle-connection-timeout",
        "--max-reservations",
        "--max-reservations-per-peer",
        "--reservation-duration",
        "--max-circuits",
        "--max-circuits-per-peer",
        "--max-circuit-duration",
        "--max-circuit-bytes",
        "--reservation-rate-per-peer",
        "--reservation-rate-per-ip",
        "--circuit-rate-per-peer",
        "--circuit-rate-per-ip",
        "--rendezvous-min-ttl",
        "--rendezvous-max-ttl",
        "--max-registrations-per-peer",
        "--max-registrations",
        "--max-connections",
        "--max-connections-per-peer",
        "--max-pending-connections",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
    assert!(help.contains("[default: 30m]"), "circuit duration default");
    assert!(
        help.contains("[default: 67108864]"),
        "circuit bytes default"
    );
}

#[test]
fn bad_listen_value_exits_with_usage_error_naming_the_flag() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["--listen", "not-a-multiaddr", "--home"])
        .arg(home.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--listen"), "stderr: {stderr}");
    // A usage error touches nothing on disk.
    assert_eq!(std::fs::read_dir(home.path()).unwrap().count(), 0);

    let out = Command::new(BIN)
        .args(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--home"])
        .arg(home.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
}

#[test]
fn port_in_use_exits_nonzero_naming_the_address_and_flag() {
    let home = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("/ip4/127.0.0.1/tcp/{}", taken.local_addr().unwrap().port());
    let out = Command::new(BIN)
        .args(["--listen", &addr, "--home"])
        .arg(home.path())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&addr), "stderr: {stderr}");
    assert!(stderr.contains("--listen"), "stderr: {stderr}");
}

#[test]
fn unreadable_identity_file_exits_nonzero_naming_the_file() {
    let home = tempfile::tempdir().unwrap();
    let key = home.path().join(IDENTITY_FILE_NAME);
    std::fs::write(&key, b"not a keypair").unwrap();
    let out = Command::new(BIN)
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--home"])
        .arg(home.path())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&key.display().to_string()),
        "stderr: {stderr}"
    );
    // The bad key is left alone for the operator to inspect.
    assert_eq!(std::fs::read(&key).unwrap(), b"not a keypair");
}

#[tokio::test(flavor = "multi_thread")]
async fn in_process_relay_counts_reservations_and_registrations_and_shuts_down() {
    let relay = Relay::spawn(RelayConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        ..RelayConfig::default()
    })
    .await
    .unwrap();
    let relay_addr = relay.addrs().first().cloned().expect("a bound address");
    assert_eq!(peer_id_of(&relay_addr), relay.peer_id());

    let mut a = client();
    reserve(&mut a, &relay_addr).await;
    // The reservation gives A its /p2p-circuit external address, which rendezvous needs. A TTL
    // of 2 min is below libp2p's 2 h minimum but above ours.
    let namespace = rendezvous::Namespace::from_static("errand-test");
    a.behaviour_mut()
        .rendezvous
        .register(namespace, relay.peer_id(), Some(120))
        .unwrap();
    tokio::time::timeout(DEADLINE, async {
        loop {
            match a.select_next_some().await {
                SwarmEvent::Behaviour(ClientEvent::Rendezvous(
                    rendezvous::client::Event::Registered { .. },
                )) => return,
                SwarmEvent::Behaviour(ClientEvent::Rendezvous(
                    rendezvous::client::Event::RegisterFailed { error, .. },
                )) => panic!("registration refused: {error:?}"),
                _ => {}
            }
        }
    })
    .await
    .expect("registered within the deadline");
    let (a_task, _) = drive(a);

    let deadline = Instant::now() + DEADLINE;
    let stats = loop {
        let stats = relay.stats().await.unwrap();
        if stats.reservations == 1 && stats.rendezvous_registrations == 1 {
            break stats;
        }
        assert!(Instant::now() < deadline, "stats never matched: {stats:?}");
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(stats.connections, 1);

    // A vanishes: its reservation goes with its connection, its registration stays until the TTL.
    a_task.abort();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let stats = relay.stats().await.unwrap();
        if stats.connections == 0 && stats.reservations == 0 {
            assert_eq!(stats.rendezvous_registrations, 1);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A's reservation never ended: {stats:?}"
        );
        tokio::time::sleep(POLL).await;
    }

    // B holds a reservation, and with it a connection, that shutdown has to close.
    let mut b = client();
    reserve(&mut b, &relay_addr).await;
    let (b_task, _) = drive(b);
    let handle = relay.handle();
    let last = relay.shutdown().await.unwrap();
    assert_eq!(last.connections, 0, "shutdown closes every connection");
    assert_eq!(last.reservations, 0);
    assert!(
        handle.stats().await.is_err(),
        "a stopped relay answers no more"
    );
    b_task.abort();
}

/// Registers `swarm` (which holds a reservation) under `namespace` on the relay.
async fn register(swarm: &mut Swarm<Client>, namespace: rendezvous::Namespace, relay: PeerId) {
    // A TTL of 2 min is below libp2p's 2 h minimum but above ours.
    swarm
        .behaviour_mut()
        .rendezvous
        .register(namespace, relay, Some(120))
        .unwrap();
    tokio::time::timeout(DEADLINE, async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(ClientEvent::Rendezvous(
                    rendezvous::client::Event::Registered { .. },
                )) => return,
                SwarmEvent::Behaviour(ClientEvent::Rendezvous(
                    rendezvous::client::Event::RegisterFailed { error, .. },
                )) => panic!("registration refused: {error:?}"),
                _ => {}
            }
        }
    })
    .await
    .expect("registered within the deadline");
}

/// Sends one discover to the relay: the registrations found, or the error code of a refusal.
async fn discover(
    swarm: &mut Swarm<Client>,
    namespace: Option<rendezvous::Namespace>,
    relay: PeerId,
) -> Result<Vec<rendezvous::Registration>, rendezvous::ErrorCode> {
    swarm
        .behaviour_mut()
        .rendezvous
        .discover(namespace, None, None, relay);
    tokio::time::timeout(DEADLINE, async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(ClientEvent::Rendezvous(
                    rendezvous::client::Event::Discovered { registrations, .. },
                )) => return Ok(registrations),
                SwarmEvent::Behaviour(ClientEvent::Rendezvous(
                    rendezvous::client::Event::DiscoverFailed { error, .. },
                )) => return Err(error),
                _ => {}
            }
        }
    })
    .await
    .expect("a discover answer or failure within the deadline")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_discover_without_a_namespace_is_refused_and_one_with_a_namespace_finds_it() {
    // Root cause: libp2p-rendezvous's server answers a DISCOVER without a namespace with every
    // registration it holds (namespace, PeerId, circuit address), and the relay served it as
    // is, so anyone who connected could list every registered device.
    let relay = Relay::spawn(RelayConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        ..RelayConfig::default()
    })
    .await
    .unwrap();
    let relay_addr = relay.addrs().first().cloned().expect("a bound address");
    let namespace = rendezvous::Namespace::from_static("errand-private-pairing");

    let mut a = client();
    let a_id = *a.local_peer_id();
    // The reservation gives A the /p2p-circuit address that a registration carries.
    reserve(&mut a, &relay_addr).await;
    register(&mut a, namespace.clone(), relay.peer_id()).await;
    let (a_task, _) = drive(a);

    let mut b = client();
    connect_via(&mut b, relay_addr.clone(), relay.peer_id()).await;
    // The relay closes the request unanswered; libp2p's client reports that as Unavailable.
    let everything = discover(&mut b, None, relay.peer_id()).await;
    assert!(
        matches!(everything, Err(rendezvous::ErrorCode::Unavailable)),
        "a discover without a namespace must be refused, got {everything:?}"
    );

    // The refusal leaves the relay serving: the same client, naming the namespace, finds A.
    let found = discover(&mut b, Some(namespace.clone()), relay.peer_id())
        .await
        .expect("a discover with a namespace is answered");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].record.peer_id(), a_id);
    assert_eq!(found[0].namespace, namespace);

    // And a namespace nobody registered finds nothing.
    let other = rendezvous::Namespace::from_static("errand-other-pairing");
    let none = discover(&mut b, Some(other), relay.peer_id())
        .await
        .expect("a discover with a namespace is answered");
    assert!(none.is_empty(), "{none:?}");

    a_task.abort();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn run_returns_when_its_shutdown_future_completes() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let config = RelayConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        ..RelayConfig::default()
    };
    let running = tokio::spawn(relay_server::run(config, async {
        let _ = rx.await;
    }));
    tx.send(()).unwrap();
    let stats = tokio::time::timeout(DEADLINE, running)
        .await
        .expect("run returns within the deadline")
        .unwrap()
        .unwrap();
    assert_eq!(stats, RelayStats::default());
}
