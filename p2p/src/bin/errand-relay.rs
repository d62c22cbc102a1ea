//! `errand-relay`: the minimal relay that lets Errand's phone and desktop reach each other.
//!
//! - Parses flags (every limit configurable; defaults and reasons in `--help`).
//! - Starts [`errand_p2p::relay::Relay`] and prints the addresses to give to desktops, one per
//!   line on stdout, each ending in `/p2p/<peer id>`. Addresses bound later (new interfaces) are
//!   printed as they appear.
//! - Writes a `relay-stats {json}` line to stderr every `--stats-interval` and on SIGUSR1.
//! - Stops cleanly on SIGINT/SIGTERM. Writes nothing to disk except its identity file.

use std::{
    collections::HashSet,
    io::{self, IsTerminal as _, Write as _},
    num::NonZeroU32,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use errand_p2p::relay::{self, Relay, RelayConfig, RelayIdentity, RelayLimits, StartError};
use libp2p::{Multiaddr, multiaddr::Protocol};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// Circuit relay v2 + rendezvous server for Errand devices.
///
/// Give desktops and phones one of the addresses printed on stdout. The relay sees only
/// Noise-encrypted traffic and keeps nothing on disk except its identity key. A rendezvous
/// discover must name its namespace; one without is refused, so nobody can list the devices
/// registered here.
#[derive(Debug, Parser)]
#[command(name = "errand-relay", version)]
struct Cli {
    /// TCP address to listen on; repeat for several. Default: every IPv4 interface on port 4001,
    /// the conventional libp2p relay port. Use /tcp/0 for a random port (the bound one is
    /// printed). TCP only.
    #[arg(long, value_name = "MULTIADDR", default_value = relay::DEFAULT_LISTEN_ADDR,
          value_parser = parse_listen_addr)]
    listen: Vec<Multiaddr>,

    /// Public address peers reach this relay at, e.g. /ip4/203.0.113.7/tcp/4001 or
    /// /dns4/relay.example.org/tcp/4001; repeat for several. Needed for the relay to be useful:
    /// reservations are refused until the relay knows its public address, and it never trusts
    /// what peers say they observed. Default: none; the bound addresses of non-wildcard --listen
    /// addresses (e.g. 127.0.0.1 in tests) are used instead and a warning is logged.
    #[arg(long = "external-addr", value_name = "MULTIADDR", value_parser = parse_external_addr)]
    external_addr: Vec<Multiaddr>,

    /// Keypair file (protobuf-encoded ed25519), created with mode 0600 on first run so the
    /// PeerId, and thus the address given to peers, stays stable. Default: identity.key in the
    /// --home directory.
    #[arg(long, value_name = "FILE")]
    identity: Option<PathBuf>,

    /// Directory holding identity.key, so several relays can run on one machine. Default: the
    /// platform data directory + errand/relay (e.g. ~/.local/share/errand/relay).
    #[arg(long, value_name = "DIR", env = "ERRAND_HOME")]
    home: Option<PathBuf>,

    /// How often to write a `relay-stats {json}` line to stderr (SIGUSR1 writes one at once);
    /// 0 turns the timer off. Often enough to graph, rare enough for a quiet log.
    #[arg(long, value_name = "DURATION",
          default_value_t = relay::DEFAULT_STATS_INTERVAL.into())]
    stats_interval: humantime::Duration,

    /// Close connections that hold no reservation, circuit or stream after this long. Spans a
    /// client's register → discover → dial sequence; idle phones still release their slot soon.
    #[arg(long, value_name = "DURATION", value_parser = parse_nonzero_duration,
          default_value_t = relay::DEFAULT_IDLE_CONNECTION_TIMEOUT.into())]
    idle_connection_timeout: humantime::Duration,

    /// Active reservations in total. One per device; each costs an idle TCP connection and a few
    /// KiB, so this serves ~100 households below --max-connections.
    #[arg(long, value_name = "N", default_value_t = relay::DEFAULT_MAX_RESERVATIONS)]
    max_reservations: usize,

    /// Active reservations per peer. A device needs one; the rest cover a reconnect overlapping
    /// the old connection.
    #[arg(long, value_name = "N", default_value_t = relay::DEFAULT_MAX_RESERVATIONS_PER_PEER)]
    max_reservations_per_peer: usize,

    /// Reservation lifetime. Clients renew automatically, so this only bounds how long a vanished
    /// device holds a slot.
    #[arg(long, value_name = "DURATION", value_parser = parse_nonzero_duration,
          default_value_t = relay::DEFAULT_RESERVATION_DURATION.into())]
    reservation_duration: humantime::Duration,

    /// Concurrent circuits (relayed phone↔desktop sessions) in total: half of
    /// --max-reservations, as each session joins two devices.
    #[arg(long, value_name = "N", default_value_t = relay::DEFAULT_MAX_CIRCUITS)]
    max_circuits: usize,

    /// Concurrent circuits a peer may open (counting those it is source or destination of). One
    /// per paired desktop, plus room for stale circuits during reconnects.
    #[arg(long, value_name = "N", default_value_t = relay::DEFAULT_MAX_CIRCUITS_PER_PEER)]
    max_circuits_per_peer: usize,

    /// Lifetime of one circuit; must be > 0. libp2p's 2 min suits hole punching, not sync: a
    /// first sync of a few thousand tasks over a slow link takes minutes, and when hole punching
    /// fails the relayed connection is the whole session.
    #[arg(long, value_name = "DURATION", value_parser = parse_nonzero_duration,
          default_value_t = relay::DEFAULT_MAX_CIRCUIT_DURATION.into())]
    max_circuit_duration: humantime::Duration,

    /// Bytes per circuit, both directions summed; 0 = unlimited. Default 64 MiB. libp2p's
    /// 128 KiB is smaller than one Automerge sync message of a large thread; 64 MiB carries a
    /// first sync several times over while bounding what one pair costs the operator.
    #[arg(long, value_name = "BYTES", default_value_t = relay::DEFAULT_MAX_CIRCUIT_BYTES)]
    max_circuit_bytes: u64,

    /// New reservations per peer per minute (token bucket of that size); 0 = no limit. Admits a
    /// phone reconnecting with backoff on a flaky network, stops a client stuck in a loop.
    #[arg(long, value_name = "N", default_value_t = relay::DEFAULT_RESERVATION_RATE_PER_PEER)]
    reservation_rate_per_peer: u32,

    /// New reservations per source IP per minute; 0 = no limit. Generous because carrier-grade
    /// NAT puts many phones behind one IP.
    #[arg(long, value_name = "N", default_value_t = relay::DEFAULT_RESERVATION_RATE_PER_IP)]
    reservation_rate_per_ip: u32,

    /// New circuits per source peer per minute; 0 = no limit. Tolerates rapid retries after
    /// failed hole punches.
    #[arg(long, value_name = "N", default_value_t = relay::DEFAULT_CIRCUIT_RATE_PER_PEER)]
    circuit_rate_per_peer: u32,

    /// New circuits per source IP per minute; 0 = no limit. Generous because of carrier-grade NAT.
    #[arg(long, value_name = "N", default_value_t = relay::DEFAULT_CIRCUIT_RATE_PER_IP)]
    circuit_rate_per_ip: u32,

    /// Shortest rendezvous registration TTL accepted (whole seconds). libp2p's 2 h minimum
    /// forces long-lived records; Errand clients re-register every few minutes with short TTLs
    /// so stale addresses vanish quickly.
    #[arg(long, value_name = "DURATION", value_parser = parse_nonzero_duration,
          default_value_t = relay::DEFAULT_RENDEZVOUS_MIN_TTL.into())]
    rendezvous_min_ttl: humantime::Duration,

    /// Longest rendezvous registration TTL accepted: libp2p's default TTL, so clients sending
    /// none are accepted. Longer only keeps stale records, and libp2p keeps a replaced
    /// registration in memory until its TTL ends.
    #[arg(long, value_name = "DURATION", value_parser = parse_nonzero_duration,
          default_value_t = relay::DEFAULT_RENDEZVOUS_MAX_TTL.into())]
    rendezvous_max_ttl: humantime::Duration,

    /// Rendezvous registrations per peer (libp2p's default). A device registers one namespace
    /// per pairing.
    #[arg(long, value_name = "N", default_value_t = relay::DEFAULT_MAX_REGISTRATIONS_PER_PEER)]
    max_registrations_per_peer: usize,

    /// Rendezvous registrations in total (libp2p's default); each is a signed record under
    /// 1 KiB, so the table stays near 10 MiB.
    #[arg(long, value_name = "N", default_value_t = relay::DEFAULT_MAX_REGISTRATIONS)]
    max_registrations: usize,

    /// Established connections in total. Stays below the common 1024 open-file limit; raise it
    /// together with `ulimit -n`.
    #[arg(long, value_name = "N", default_value_t = relay::DEFAULT_MAX_CONNECTIONS)]
    max_connections: u32,

    /// Established connections per peer. Allows a reconnect to overlap the old connection and a
    /// simultaneous dial; one peer cannot hog the table.
    #[arg(long, value_name = "N", default_value_t = relay::DEFAULT_MAX_CONNECTIONS_PER_PEER)]
    max_connections_per_peer: u32,

    /// Incoming connections still in the TCP/Noise handshake. Admits the burst after a restart
    /// while bounding handshake CPU under a flood.
    #[arg(long, value_name = "N", default_value_t = relay::DEFAULT_MAX_PENDING_CONNECTIONS)]
    max_pending_connections: u32,
}

/// `/ip4|ip6/<ip>/tcp/<port>`, optionally ending in `/p2p/<id>`: all the TCP transport binds.
fn parse_listen_addr(s: &str) -> Result<Multiaddr, String> {
    let addr: Multiaddr = s.parse().map_err(|e| format!("not a multiaddr: {e}"))?;
    let mut parts = addr.iter();
    let ip_ok = matches!(parts.next(), Some(Protocol::Ip4(_) | Protocol::Ip6(_)));
    let tcp_ok = matches!(parts.next(), Some(Protocol::Tcp(_)));
    let rest_ok = matches!(parts.next(), None | Some(Protocol::P2p(_))) && parts.next().is_none();
    if ip_ok && tcp_ok && rest_ok {
        Ok(addr)
    } else {
        Err("expected a TCP address like /ip4/0.0.0.0/tcp/4001 or /ip6/::/tcp/4001".to_owned())
    }
}

fn parse_external_addr(s: &str) -> Result<Multiaddr, String> {
    let addr: Multiaddr = s.parse().map_err(|e| format!("not a multiaddr: {e}"))?;
    if !addr.iter().any(|p| matches!(p, Protocol::Tcp(_))) {
        return Err("expected a TCP address like /ip4/203.0.113.7/tcp/4001".to_owned());
    }
    Ok(addr)
}

fn parse_nonzero_duration(s: &str) -> Result<humantime::Duration, String> {
    let d: humantime::Duration = s.parse().map_err(|e| format!("{e}"))?;
    if Duration::from(d).is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(d)
}

impl Cli {
    fn identity_path(&self) -> Result<PathBuf> {
        if let Some(path) = &self.identity {
            return Ok(path.clone());
        }
        let home = match &self.home {
            Some(home) => home.clone(),
            None => dirs::data_dir()
                .context("no platform data directory; pass --home or --identity")?
                .join("errand")
                .join("relay"),
        };
        Ok(home.join(relay::IDENTITY_FILE_NAME))
    }

    fn config(&self) -> Result<RelayConfig> {
        Ok(RelayConfig {
            listen: self.listen.clone(),
            external_addrs: self.external_addr.clone(),
            identity: RelayIdentity::File(self.identity_path()?),
            limits: RelayLimits {
                max_reservations: self.max_reservations,
                max_reservations_per_peer: self.max_reservations_per_peer,
                reservation_duration: self.reservation_duration.into(),
                max_circuits: self.max_circuits,
                max_circuits_per_peer: self.max_circuits_per_peer,
                max_circuit_duration: self.max_circuit_duration.into(),
                max_circuit_bytes: self.max_circuit_bytes,
                reservation_rate_per_peer: NonZeroU32::new(self.reservation_rate_per_peer),
                reservation_rate_per_ip: NonZeroU32::new(self.reservation_rate_per_ip),
                circuit_rate_per_peer: NonZeroU32::new(self.circuit_rate_per_peer),
                circuit_rate_per_ip: NonZeroU32::new(self.circuit_rate_per_ip),
                rendezvous_min_ttl: self.rendezvous_min_ttl.into(),
                rendezvous_max_ttl: self.rendezvous_max_ttl.into(),
                max_registrations_per_peer: self.max_registrations_per_peer,
                max_registrations: self.max_registrations,
                max_connections: self.max_connections,
                max_connections_per_peer: self.max_connections_per_peer,
                max_pending_connections: self.max_pending_connections,
            },
            idle_connection_timeout: self.idle_connection_timeout.into(),
        })
    }
}

/// Which flag to look at for each startup failure.
fn start_hint(error: &StartError) -> &'static str {
    match error {
        StartError::Identity(_) => "check --identity, --home or ERRAND_HOME",
        StartError::InvalidLimit { .. } => "check the limit flags",
        StartError::InvalidExternalAddr { .. } | StartError::ExternalAddrPeerMismatch { .. } => {
            "check --external-addr"
        }
        StartError::NoListenAddrs
        | StartError::UnsupportedListenAddr { .. }
        | StartError::Listen { .. }
        | StartError::ListenerClosed { .. }
        | StartError::ListenTimeout { .. } => "check --listen",
        StartError::Transport(_) => "this is a bug",
    }
}

/// Prints addresses not printed before, one per line, and flushes so a reader sees them at once.
fn print_new_addrs(addrs: &[Multiaddr], printed: &mut HashSet<Multiaddr>) -> io::Result<()> {
    let mut out = io::stdout().lock();
    for addr in addrs {
        if printed.insert(addr.clone()) {
            writeln!(out, "{addr}")?;
        }
    }
    out.flush()
}

fn emit_stats(stats: &relay::RelayStats) {
    // A raw line, not a tracing event, so scripts can rely on the exact prefix.
    let mut err = io::stderr().lock();
    let _ = writeln!(err, "{}", stats.to_log_line());
    let _ = err.flush();
}

/// Waits for the next stats tick, or forever when the timer is off.
async fn next_tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(ticker) => {
            ticker.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .init();

    // Install handlers before anything is printed: SIGUSR1's default action kills the process.
    let mut sigint = signal(SignalKind::interrupt()).context("while installing SIGINT handler")?;
    let mut sigterm =
        signal(SignalKind::terminate()).context("while installing SIGTERM handler")?;
    let mut sigusr1 =
        signal(SignalKind::user_defined1()).context("while installing SIGUSR1 handler")?;

    let config = cli.config()?;
    let relay = match Relay::spawn(config).await {
        Ok(relay) => relay,
        Err(e) => {
            let hint = start_hint(&e);
            return Err(
                anyhow::Error::new(e).context(format!("while starting errand-relay ({hint})"))
            );
        }
    };

    let mut addrs = relay.handle().watch_addrs();
    let mut printed = HashSet::new();
    print_new_addrs(&addrs.borrow_and_update(), &mut printed)
        .context("while printing the relay addresses to stdout")?;

    let interval: Duration = cli.stats_interval.into();
    let mut ticker = (!interval.is_zero()).then(|| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });

    let mut task_ended = false;
    loop {
        tokio::select! {
            biased;
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sigusr1.recv() => {
                if let Ok(stats) = relay.stats().await {
                    emit_stats(&stats);
                }
            }
            () = next_tick(&mut ticker) => {
                if let Ok(stats) = relay.stats().await {
                    emit_stats(&stats);
                }
            }
            changed = addrs.changed() => {
                if changed.is_err() {
                    task_ended = true;
                    break;
                }
                let current = addrs.borrow_and_update().clone();
                if let Err(e) = print_new_addrs(&current, &mut printed) {
                    warn!(error = %e, "cannot print new addresses to stdout");
                }
            }
        }
    }

    let stats = relay
        .shutdown()
        .await
        .context("while running errand-relay")?;
    emit_stats(&stats);
    if task_ended {
        bail!("the relay stopped unexpectedly");
    }
    Ok(())
}
