//! The errand-relay server: circuit relay v2, rendezvous, identify and ping over
//! TCP + Noise + Yamux.
//!
//! Flow:
//! - [`Relay::spawn`] loads or creates the identity ([`load_or_create_identity`]), builds the
//!   swarm, binds every listen address and waits until each listener has reported its bound
//!   address, so `/tcp/0` resolves to a real port before the caller prints anything.
//! - External addresses come from [`RelayConfig::external_addrs`], never from what peers say they
//!   observed (identify). libp2p-relay refuses reservations until it knows an external address, so
//!   when none is configured the relay falls back to the bound addresses of *specific*
//!   (non-wildcard) listen addresses, e.g. `127.0.0.1` in tests, and logs a warning.
//! - An actor task owns the swarm. It keeps [`RelayStats`] up to date from swarm events and
//!   answers [`RelayHandle::stats`]. [`RelayHandle::watch_addrs`] publishes the addresses to give
//!   to peers.
//! - [`Relay::shutdown`] stops listening, closes connections, joins the task and returns the final
//!   stats.
//! - Rendezvous goes through [`namespace_gate`]: a discover must name its namespace, so nobody
//!   can list every device registered here.
//! - Nothing is written to disk except the identity file.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    io::{self, Write as _},
    num::NonZeroU32,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::StreamExt as _;
use libp2p::{
    Multiaddr, PeerId, Swarm, TransportError, connection_limits,
    core::transport::ListenerId,
    identify,
    identity::{DecodingError, Keypair},
    multiaddr::Protocol,
    noise, ping, relay, rendezvous,
    swarm::{NetworkBehaviour, SwarmEvent},
    tcp, yamux,
};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::{JoinError, JoinHandle},
    time::Instant,
};
use tracing::{Instrument as _, debug, info, info_span, warn};

mod namespace_gate;

/// Default listen address: every IPv4 interface on TCP port 4001, the port libp2p relays
/// conventionally use, so firewall rules written for other libp2p relays apply unchanged.
pub const DEFAULT_LISTEN_ADDR: &str = "/ip4/0.0.0.0/tcp/4001";

/// Name of the identity file inside the relay's home directory.
pub const IDENTITY_FILE_NAME: &str = "identity.key";

/// Prefix of the machine-readable stats line the binary writes to stderr; the rest of the line is
/// the JSON form of [`RelayStats`]. See [`RelayStats::to_log_line`].
pub const STATS_LINE_PREFIX: &str = "relay-stats ";

/// Identify protocol version the relay announces; the same family as the peers' `/errand/id/…`.
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/errand/id/1.0.0";

/// How long a connection with no reservation, circuit or open stream stays up.
///
/// Connections holding a reservation or a circuit are kept alive by the relay handler regardless.
/// One minute spans a client's register → discover → circuit-dial sequence and several 15 s ping
/// rounds, so a client that only did rendezvous need not redial for its next step, while an idle
/// phone still releases its file descriptor soon (libp2p's 10 s default cuts that sequence).
pub const DEFAULT_IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the binary logs a stats line by default: often enough to graph, rare enough that the
/// log of a quiet relay stays small.
pub const DEFAULT_STATS_INTERVAL: Duration = Duration::from_secs(60);

/// Total active reservations. Each is one idle TCP connection plus a few KiB. Every Errand device
/// holds one, so 256 serves ~100 households with room for reconnect overlap, and stays well under
/// [`DEFAULT_MAX_CONNECTIONS`] (libp2p's default is 128).
pub const DEFAULT_MAX_RESERVATIONS: usize = 256;

/// Reservations per peer (libp2p's default). A device needs one; the extra ones cover a reconnect
/// racing a not-yet-closed old connection, each of which may hold a reservation.
pub const DEFAULT_MAX_RESERVATIONS_PER_PEER: usize = 4;

/// Reservation lifetime (libp2p's default). The client renews it automatically before it ends, so
/// this only bounds how long a vanished device occupies a slot.
pub const DEFAULT_RESERVATION_DURATION: Duration = Duration::from_secs(60 * 60);

/// Concurrent relayed connections in total. A circuit is one phone↔desktop sync session: half of
/// [`DEFAULT_MAX_RESERVATIONS`], since each session joins two reserved devices.
pub const DEFAULT_MAX_CIRCUITS: usize = 128;

/// Circuits a peer may open (libp2p counts those it is source or destination of). A phone needs
/// one per paired desktop; 8 leaves room for stale circuits during reconnects (libp2p: 4).
pub const DEFAULT_MAX_CIRCUITS_PER_PEER: usize = 8;

/// Lifetime of one circuit. libp2p's 2 min suits a hole punch, not sync: a first sync of a few
/// thousand tasks over a slow mobile link can take minutes, and when DCUtR fails the relayed
/// connection *is* the session. 30 min bounds abandoned circuits; clients redial after it.
pub const DEFAULT_MAX_CIRCUIT_DURATION: Duration = Duration::from_secs(30 * 60);

/// Bytes per circuit, both directions summed (0 = unlimited). libp2p's 128 KiB is smaller than a
/// single Automerge sync message for ~10k tasks (≈157 KB); 64 MiB carries a first sync of a
/// large thread several times over while bounding what one pair can cost the operator.
pub const DEFAULT_MAX_CIRCUIT_BYTES: u64 = 64 * 1024 * 1024;

/// New reservations per peer per minute (token bucket; bucket size = the same number). A phone on
/// a flaky network reconnects with backoff, about once per few seconds at worst, so 10 admits
/// that and stops a buggy client looping.
pub const DEFAULT_RESERVATION_RATE_PER_PEER: u32 = 10;

/// New reservations per source IP per minute. Generous because carrier-grade NAT puts many phones
/// behind one IP.
pub const DEFAULT_RESERVATION_RATE_PER_IP: u32 = 60;

/// New circuits per source peer per minute. A phone opens one per paired desktop per reconnect;
/// 30 tolerates rapid retries after failed hole punches.
pub const DEFAULT_CIRCUIT_RATE_PER_PEER: u32 = 30;

/// New circuits per source IP per minute. Generous for the same carrier-grade NAT reason as
/// [`DEFAULT_RESERVATION_RATE_PER_IP`].
pub const DEFAULT_CIRCUIT_RATE_PER_IP: u32 = 120;

/// Shortest rendezvous registration TTL accepted. libp2p's 2 h forces long-lived records; clients
/// re-register every few minutes with short TTLs so stale addresses vanish quickly, and 60 s
/// accepts those.
pub const DEFAULT_RENDEZVOUS_MIN_TTL: Duration = Duration::from_secs(60);

/// Longest rendezvous registration TTL accepted: libp2p's default TTL (2 h), so a client sending
/// no TTL is still accepted. Longer only keeps stale records; also, libp2p-rendezvous 0.18 keeps
/// a replaced registration in memory until its TTL ends, so a short maximum bounds that memory.
pub const DEFAULT_RENDEZVOUS_MAX_TTL: Duration = Duration::from_secs(rendezvous::DEFAULT_TTL);

/// Registrations per peer (libp2p's default). A device registers one namespace per pairing.
pub const DEFAULT_MAX_REGISTRATIONS_PER_PEER: usize = 32;

/// Registrations in total (libp2p's default). Each holds a signed peer record under 1 KiB, so the
/// table stays around 10 MiB.
pub const DEFAULT_MAX_REGISTRATIONS: usize = 10_000;

/// Established connections in total. Each reservation holds one and circuit sources and
/// rendezvous-only clients add more; 768 stays below the common 1024 open-file soft limit,
/// leaving descriptors for listeners and the runtime. Raise it together with `ulimit -n`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 768;

/// Established connections per peer. A device normally has one; this allows a reconnect to
/// overlap the old connection and a simultaneous dial, while one peer cannot hog the table.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: u32 = 8;

/// Incoming connections still in the TCP/Noise handshake. Honest clients finish in well under a
/// second, so 128 admits bursts after a relay restart while bounding handshake CPU under a flood.
pub const DEFAULT_MAX_PENDING_CONNECTIONS: u32 = 128;

/// How long [`Relay::spawn`] waits for each listener to report its bound address. Binding itself
/// is synchronous; the report normally arrives within milliseconds, but enumerating interfaces
/// for a wildcard address can take a moment on a busy host.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Relay::shutdown`] waits for connections to close. Long enough for the close to
/// reach peers on a healthy link, short enough to finish well inside a service manager's usual
/// 10 s between SIGTERM and SIGKILL.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Capacity of the command channel to the relay actor. Callers are few (a stats timer, a signal
/// handler, tests); when it is full they wait rather than queue without bound.
const COMMAND_CHANNEL_CAPACITY: usize = 16;

/// Tolerance when matching a rendezvous expiry to the registration we recorded: our clock reads
/// the registration time a little after the server did. A replaced registration expires at least
/// this much before its replacement unless the client re-registered within a second.
const REGISTRATION_EXPIRY_SLACK: Duration = Duration::from_secs(1);

/// Where the relay's keypair comes from.
pub enum RelayIdentity {
    /// A fresh ed25519 keypair that lives only in memory (tests, benchmarks); the PeerId changes
    /// on every start.
    Ephemeral,
    /// A protobuf-encoded keypair file, created with mode 0600 on first use so the PeerId stays
    /// stable across restarts. See [`load_or_create_identity`].
    File(PathBuf),
    /// A keypair the caller already holds.
    Keypair(Keypair),
}

impl fmt::Debug for RelayIdentity {
    // By hand, so a secret key never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ephemeral => f.write_str("Ephemeral"),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Keypair(k) => f
                .debug_tuple("Keypair")
                .field(&k.public().to_peer_id())
                .finish(),
        }
    }
}

/// Every limit the relay enforces. [`Default`] gives the `DEFAULT_*` constants of this module,
/// each documented with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayLimits {
    /// Total active reservations.
    pub max_reservations: usize,
    /// Active reservations per peer.
    pub max_reservations_per_peer: usize,
    /// Reservation lifetime; clients renew automatically.
    pub reservation_duration: Duration,
    /// Concurrent circuits in total.
    pub max_circuits: usize,
    /// Concurrent circuits a source peer may be part of.
    pub max_circuits_per_peer: usize,
    /// Lifetime of one circuit; must be non-zero (libp2p closes a 0 s circuit at once).
    pub max_circuit_duration: Duration,
    /// Bytes per circuit, both directions summed; 0 means unlimited.
    pub max_circuit_bytes: u64,
    /// New reservations per peer per minute (token bucket of that size); `None` = no limiter.
    pub reservation_rate_per_peer: Option<NonZeroU32>,
    /// New reservations per source IP per minute; `None` = no limiter.
    pub reservation_rate_per_ip: Option<NonZeroU32>,
    /// New circuits per source peer per minute; `None` = no limiter.
    pub circuit_rate_per_peer: Option<NonZeroU32>,
    /// New circuits per source IP per minute; `None` = no limiter.
    pub circuit_rate_per_ip: Option<NonZeroU32>,
    /// Shortest rendezvous TTL accepted (whole seconds).
    pub rendezvous_min_ttl: Duration,
    /// Longest rendezvous TTL accepted (whole seconds).
    pub rendezvous_max_ttl: Duration,
    /// Rendezvous registrations per peer.
    pub max_registrations_per_peer: usize,
    /// Rendezvous registrations in total.
    pub max_registrations: usize,
    /// Established connections in total.
    pub max_connections: u32,
    /// Established connections per peer.
    pub max_connections_per_peer: u32,
    /// Incoming connections still handshaking.
    pub max_pending_connections: u32,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_reservations: DEFAULT_MAX_RESERVATIONS,
            max_reservations_per_peer: DEFAULT_MAX_RESERVATIONS_PER_PEER,
            reservation_duration: DEFAULT_RESERVATION_DURATION,
            max_circuits: DEFAULT_MAX_CIRCUITS,
            max_circuits_per_peer: DEFAULT_MAX_CIRCUITS_PER_PEER,
            max_circuit_duration: DEFAULT_MAX_CIRCUIT_DURATION,
            max_circuit_bytes: DEFAULT_MAX_CIRCUIT_BYTES,
            reservation_rate_per_peer: NonZeroU32::new(DEFAULT_RESERVATION_RATE_PER_PEER),
            reservation_rate_per_ip: NonZeroU32::new(DEFAULT_RESERVATION_RATE_PER_IP),
            circuit_rate_per_peer: NonZeroU32::new(DEFAULT_CIRCUIT_RATE_PER_PEER),
            circuit_rate_per_ip: NonZeroU32::new(DEFAULT_CIRCUIT_RATE_PER_IP),
            rendezvous_min_ttl: DEFAULT_RENDEZVOUS_MIN_TTL,
            rendezvous_max_ttl: DEFAULT_RENDEZVOUS_MAX_TTL,
            max_registrations_per_peer: DEFAULT_MAX_REGISTRATIONS_PER_PEER,
            max_registrations: DEFAULT_MAX_REGISTRATIONS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            max_pending_connections: DEFAULT_MAX_PENDING_CONNECTIONS,
        }
    }
}

impl RelayLimits {
    /// Rejects values libp2p would misbehave on: a zero circuit duration closes every circuit at
    /// once, a duration beyond `u32::MAX` seconds panics, and an empty TTL range refuses every
    /// registration.
    pub fn validate(&self) -> Result<(), StartError> {
        let invalid = |name, reason| Err(StartError::InvalidLimit { name, reason });
        if self.max_circuit_duration.is_zero() {
            return invalid(
                "max_circuit_duration",
                "must be at least 1s; libp2p closes a 0s circuit immediately",
            );
        }
        if self.max_circuit_duration.as_secs() > u64::from(u32::MAX) {
            return invalid("max_circuit_duration", "must fit in 32-bit seconds");
        }
        if self.reservation_duration.is_zero() {
            return invalid("reservation_duration", "must be at least 1s");
        }
        if self.rendezvous_min_ttl.as_secs() == 0 {
            return invalid("rendezvous_min_ttl", "must be at least 1s");
        }
        if self.rendezvous_min_ttl.as_secs() > self.rendezvous_max_ttl.as_secs() {
            return invalid(
                "rendezvous_min_ttl",
                "must not exceed rendezvous_max_ttl, or every registration is refused",
            );
        }
        Ok(())
    }

    fn relay_config(&self) -> relay::Config {
        // The rate-limit builders push onto libp2p's default limiters; start from empty vectors
        // so the configured rates are the only ones.
        let mut config = relay::Config {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: self.max_reservations_per_peer,
            reservation_duration: self.reservation_duration,
            reservation_rate_limiters: Vec::new(),
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            max_circuit_duration: self.max_circuit_duration,
            max_circuit_bytes: self.max_circuit_bytes,
            circuit_src_rate_limiters: Vec::new(),
        };
        if let Some(n) = self.reservation_rate_per_peer {
            config = config.reservation_rate_per_peer(n, refill_interval(n));
        }
        if let Some(n) = self.reservation_rate_per_ip {
            config = config.reservation_rate_per_ip(n, refill_interval(n));
        }
        if let Some(n) = self.circuit_rate_per_peer {
            config = config.circuit_src_per_peer(n, refill_interval(n));
        }
        if let Some(n) = self.circuit_rate_per_ip {
            config = config.circuit_src_per_ip(n, refill_interval(n));
        }
        config
    }

    fn rendezvous_config(&self) -> rendezvous::server::Config {
        rendezvous::server::Config::default()
            .with_min_ttl(self.rendezvous_min_ttl.as_secs())
            .with_max_ttl(self.rendezvous_max_ttl.as_secs())
            .with_max_registration_per_peer(self.max_registrations_per_peer)
            .with_max_registration_total(self.max_registrations)
    }

    fn connection_limits(&self) -> connection_limits::ConnectionLimits {
        connection_limits::ConnectionLimits::default()
            .with_max_established(Some(self.max_connections))
            .with_max_established_per_peer(Some(self.max_connections_per_peer))
            .with_max_pending_incoming(Some(self.max_pending_connections))
    }
}

/// A bucket of `n` tokens refilled at `n` per minute: one token every `60 s / n`.
fn refill_interval(per_minute: NonZeroU32) -> Duration {
    Duration::from_secs(60) / per_minute.get()
}

/// Configuration of one relay instance.
#[derive(Debug)]
pub struct RelayConfig {
    /// TCP addresses to listen on, e.g. `/ip4/0.0.0.0/tcp/4001`. Port 0 picks a free port.
    pub listen: Vec<Multiaddr>,
    /// Public addresses peers use to reach the relay; handed out in reservations. Empty: fall
    /// back to the bound addresses of specific (non-wildcard) listen addresses.
    pub external_addrs: Vec<Multiaddr>,
    /// Where the keypair comes from.
    pub identity: RelayIdentity,
    /// Every limit the relay enforces.
    pub limits: RelayLimits,
    /// See [`DEFAULT_IDLE_CONNECTION_TIMEOUT`].
    pub idle_connection_timeout: Duration,
}

impl Default for RelayConfig {
    /// Listens on [`DEFAULT_LISTEN_ADDR`] with an in-memory identity and no external address;
    /// the binary sets a file identity.
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN_ADDR.parse().into_iter().collect(),
            external_addrs: Vec::new(),
            identity: RelayIdentity::Ephemeral,
            limits: RelayLimits::default(),
            idle_connection_timeout: DEFAULT_IDLE_CONNECTION_TIMEOUT,
        }
    }
}

/// Live counters, maintained from swarm events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStats {
    /// Active circuit relay reservations.
    pub reservations: usize,
    /// Active relayed connections (circuits).
    pub circuits: usize,
    /// Active rendezvous registrations (peer, namespace).
    pub rendezvous_registrations: usize,
    /// Established connections to the relay itself.
    pub connections: usize,
}

impl RelayStats {
    /// `relay-stats {"reservations":…}`: [`STATS_LINE_PREFIX`] then one line of JSON.
    pub fn to_log_line(&self) -> String {
        let json = serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"error\":\"{}\"}}", e.to_string().replace('"', "'")));
        format!("{STATS_LINE_PREFIX}{json}")
    }

    /// Parses a line written by [`RelayStats::to_log_line`]; `None` for any other line.
    pub fn parse_log_line(line: &str) -> Option<Self> {
        serde_json::from_str(line.trim_end().strip_prefix(STATS_LINE_PREFIX)?).ok()
    }
}

/// Loading or creating the identity file failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file exists but cannot be read (permissions, a directory, I/O error).
    #[error("cannot read the relay identity file {path}")]
    Read {
        /// The identity file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file is not a protobuf-encoded keypair.
    #[error(
        "the relay identity file {path} is not a protobuf-encoded keypair; move it away to \
         create a new identity (the relay's PeerId will change and peers must be given the new \
         address)"
    )]
    Decode {
        /// The identity file.
        path: PathBuf,
        /// The decoding error.
        #[source]
        source: DecodingError,
    },
    /// The directory for a new identity file cannot be created.
    #[error("cannot create the directory {path} for the relay identity")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A new identity file cannot be written.
    #[error("cannot write the new relay identity file {path}")]
    Write {
        /// The identity file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The generated keypair cannot be encoded (should not happen for ed25519).
    #[error("cannot encode the relay keypair")]
    Encode(#[source] DecodingError),
}

/// Starting the relay failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The identity could not be loaded or created.
    #[error("cannot load the relay identity")]
    Identity(#[from] IdentityError),
    /// A limit has a value libp2p cannot work with.
    #[error("invalid relay limit {name}: {reason}")]
    InvalidLimit {
        /// The field of [`RelayLimits`].
        name: &'static str,
        /// Why the value is refused.
        reason: &'static str,
    },
    /// No listen address was configured.
    #[error("no listen address given")]
    NoListenAddrs,
    /// An external address cannot be used.
    #[error("invalid external address {addr}: {reason}")]
    InvalidExternalAddr {
        /// The address as given.
        addr: Multiaddr,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An external address ends in `/p2p/<id>` with someone else's id.
    #[error("external address {addr} ends in another peer's id; this relay is {local}")]
    ExternalAddrPeerMismatch {
        /// The address as given.
        addr: Multiaddr,
        /// The relay's own PeerId.
        local: PeerId,
    },
    /// The Noise transport could not be set up.
    #[error("cannot set up the TCP/Noise/Yamux transport")]
    Transport(#[source] noise::Error),
    /// A listen address is not a TCP address.
    #[error(
        "cannot listen on {addr}: not a TCP address (expected /ip4/<ip>/tcp/<port> or \
         /ip6/<ip>/tcp/<port>)"
    )]
    UnsupportedListenAddr {
        /// The address as given.
        addr: Multiaddr,
    },
    /// Binding a listen address failed, e.g. the port is in use.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address as given.
        addr: Multiaddr,
        /// The I/O error (`AddrInUse`, `AddrNotAvailable`, `PermissionDenied`, …).
        #[source]
        source: io::Error,
    },
    /// A listener closed before it reported its address.
    #[error("the listener on {addr} closed during startup")]
    ListenerClosed {
        /// The address as given.
        addr: Multiaddr,
        /// Why, if the transport said.
        #[source]
        source: Option<io::Error>,
    },
    /// A listener did not report its address in time.
    #[error("the listener on {addr} reported no address within {timeout:?}")]
    ListenTimeout {
        /// The address as given.
        addr: Multiaddr,
        /// How long we waited.
        timeout: Duration,
    },
}

/// The relay task ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Every listener closed, so the relay can no longer accept connections.
    #[error("every listener closed; the relay can no longer accept connections")]
    ListenersClosed,
    /// The relay task panicked or was cancelled.
    #[error("the relay task failed")]
    Task(#[source] JoinError),
}

/// The relay task has stopped, so it cannot answer.
#[derive(Debug, thiserror::Error)]
#[error("the relay task has stopped")]
pub struct RelayGone;

/// Error of [`run`].
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The relay did not start.
    #[error("the relay did not start")]
    Start(#[from] StartError),
    /// The relay stopped abnormally.
    #[error("the relay stopped abnormally")]
    Run(#[from] RunError),
}

/// Reads the protobuf-encoded keypair at `path`, or creates a new ed25519 one there.
///
/// A new file is created with mode 0600 (its directory with 0700) and never overwrites an
/// existing file, so two relays started at once end up with the same identity.
pub fn load_or_create_identity(path: &Path) -> Result<Keypair, IdentityError> {
    match std::fs::read(path) {
        Ok(bytes) => decode_identity(path, &bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_identity(path),
        Err(source) => Err(IdentityError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn decode_identity(path: &Path, bytes: &[u8]) -> Result<Keypair, IdentityError> {
    let keypair =
        Keypair::from_protobuf_encoding(bytes).map_err(|source| IdentityError::Decode {
            path: path.to_owned(),
            source,
        })?;
    warn_if_readable_by_others(path);
    Ok(keypair)
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        warn!(path = %path.display(), "identity file is accessible to other users; chmod 600 it");
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

fn create_identity(path: &Path) -> Result<Keypair, IdentityError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(dir)
            .map_err(|source| IdentityError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
    }
    let keypair = Keypair::generate_ed25519();
    let bytes = keypair
        .to_protobuf_encoding()
        .map_err(IdentityError::Encode)?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = match options.open(path) {
        Ok(file) => file,
        // Another process created it between our read and our create: use theirs.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let bytes = std::fs::read(path).map_err(|source| IdentityError::Read {
                path: path.to_owned(),
                source,
            })?;
            return decode_identity(path, &bytes);
        }
        Err(source) => {
            return Err(IdentityError::Write {
                path: path.to_owned(),
                source,
            });
        }
    };
    if let Err(source) = file.write_all(&bytes).and_then(|()| file.sync_all()) {
        // Leave no half-written key behind to fail the next start.
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(IdentityError::Write {
            path: path.to_owned(),
            source,
        });
    }
    let peer_id = keypair.public().to_peer_id();
    info!(path = %path.display(), %peer_id, "created relay identity");
    Ok(keypair)
}

#[derive(NetworkBehaviour)]
struct RelayBehaviour {
    // First: the derive asks behaviours in order, so over-limit connections are denied before
    // the others allocate state for them.
    limits: connection_limits::Behaviour,
    relay: relay::Behaviour,
    rendezvous: namespace_gate::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

fn build_swarm(
    keypair: Keypair,
    limits: &RelayLimits,
    idle_connection_timeout: Duration,
) -> Result<Swarm<RelayBehaviour>, StartError> {
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(StartError::Transport)?
        .with_behaviour(|key| RelayBehaviour {
            limits: connection_limits::Behaviour::new(limits.connection_limits()),
            relay: relay::Behaviour::new(key.public().to_peer_id(), limits.relay_config()),
            rendezvous: namespace_gate::Behaviour::new(limits.rendezvous_config()),
            identify: identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_owned(), key.public())
                    .with_agent_version(format!("errand-relay/{}", env!("CARGO_PKG_VERSION")))
                    // Announce only the configured external addresses, not every interface
                    // (docker bridges, LAN addresses) a wildcard listener is bound to.
                    .with_hide_listen_addrs(true)
                    // The relay never dials peers, so it needs no address cache.
                    .with_cache_size(0),
            ),
            ping: ping::Behaviour::new(ping::Config::new()),
        })
        .unwrap_or_else(|never| match never {})
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle_connection_timeout))
        .build();
    Ok(swarm)
}

/// Strips a trailing `/p2p/<own id>` and rejects addresses this relay cannot be reached at.
fn normalize_external_addr(addr: &Multiaddr, local: PeerId) -> Result<Multiaddr, StartError> {
    let invalid = |reason| StartError::InvalidExternalAddr {
        addr: addr.clone(),
        reason,
    };
    if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        return Err(invalid(
            "the relay's own address cannot be a /p2p-circuit address",
        ));
    }
    if !addr.iter().any(|p| matches!(p, Protocol::Tcp(_))) {
        return Err(invalid(
            "it names no TCP port; this relay listens on TCP only",
        ));
    }
    let mut normalized = addr.clone();
    if let Some(Protocol::P2p(named)) = normalized.iter().last() {
        if named != local {
            return Err(StartError::ExternalAddrPeerMismatch {
                addr: addr.clone(),
                local,
            });
        }
        normalized.pop();
    }
    Ok(normalized)
}

/// True for `/ip4/<ip>` or `/ip6/<ip>` addresses whose IP is not a wildcard.
fn is_specific(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => !ip.is_unspecified(),
        Some(Protocol::Ip6(ip)) => !ip.is_unspecified(),
        _ => false,
    }
}

enum Command {
    Stats { reply: oneshot::Sender<RelayStats> },
}

/// A cloneable handle to a running relay.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    addrs: watch::Receiver<Vec<Multiaddr>>,
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stats { .. } => f.write_str("Stats"),
        }
    }
}

impl RelayHandle {
    /// The relay's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The addresses to give to peers, each ending in `/p2p/<relay id>`: configured external
    /// addresses first, then the bound listen addresses (wildcards expanded per interface).
    pub fn addrs(&self) -> Vec<Multiaddr> {
        self.addrs.borrow().clone()
    }

    /// A receiver that sees every change of [`RelayHandle::addrs`]; `changed()` fails once the
    /// relay task has stopped.
    pub fn watch_addrs(&self) -> watch::Receiver<Vec<Multiaddr>> {
        self.addrs.clone()
    }

    /// The current counters.
    pub async fn stats(&self) -> Result<RelayStats, RelayGone> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Stats { reply })
            .await
            .map_err(|_| RelayGone)?;
        rx.await.map_err(|_| RelayGone)
    }
}

/// A running relay: owns its task. Dropping it stops the relay without waiting; prefer
/// [`Relay::shutdown`].
#[derive(Debug)]
pub struct Relay {
    handle: RelayHandle,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<RelayStats, RunError>>,
}

impl Relay {
    /// Starts a relay on the current tokio runtime and returns once every listener has reported
    /// its bound address.
    pub async fn spawn(config: RelayConfig) -> Result<Self, StartError> {
        config.limits.validate()?;
        if config.listen.is_empty() {
            return Err(StartError::NoListenAddrs);
        }
        let keypair = match config.identity {
            RelayIdentity::Ephemeral => Keypair::generate_ed25519(),
            RelayIdentity::File(path) => load_or_create_identity(&path)?,
            RelayIdentity::Keypair(keypair) => keypair,
        };
        let peer_id = keypair.public().to_peer_id();
        let external = config
            .external_addrs
            .iter()
            .map(|a| normalize_external_addr(a, peer_id))
            .collect::<Result<Vec<_>, _>>()?;
        let mut swarm = build_swarm(keypair, &config.limits, config.idle_connection_timeout)?;

        let span = info_span!("relay", %peer_id);
        let (addrs_tx, addrs_rx) = watch::channel(Vec::new());
        let mut state = State {
            peer_id,
            listeners: Vec::new(),
            fallback_external: external.is_empty(),
            external,
            peers: HashMap::new(),
            circuits: 0,
            connections: 0,
            registrations: HashMap::new(),
            addrs_tx,
        };
        async {
            state.start(&mut swarm, &config.listen)?;
            state.await_listen_addrs(&mut swarm).await
        }
        .instrument(span.clone())
        .await?;
        info!(parent: &span, limits = ?config.limits, "relay started");

        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let task = tokio::spawn(run_actor(swarm, state, commands_rx, shutdown_rx).instrument(span));
        Ok(Self {
            handle: RelayHandle {
                peer_id,
                commands: commands_tx,
                addrs: addrs_rx,
            },
            shutdown: Some(shutdown_tx),
            task,
        })
    }

    /// A cloneable handle for stats and addresses.
    pub fn handle(&self) -> RelayHandle {
        self.handle.clone()
    }

    /// The relay's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.handle.peer_id
    }

    /// See [`RelayHandle::addrs`].
    pub fn addrs(&self) -> Vec<Multiaddr> {
        self.handle.addrs()
    }

    /// See [`RelayHandle::stats`].
    pub async fn stats(&self) -> Result<RelayStats, RelayGone> {
        self.handle.stats().await
    }

    /// Stops listening, closes every connection (waiting up to a few seconds), joins the task
    /// and returns the final counters.
    pub async fn shutdown(mut self) -> Result<RelayStats, RunError> {
        if let Some(tx) = self.shutdown.take() {
            // Fails only if the task already ended; joining reports how.
            let _ = tx.send(());
        }
        (&mut self.task).await.map_err(RunError::Task)?
    }
}

/// Runs a relay until `shutdown` completes, then shuts it down cleanly. For callers that need
/// neither the addresses nor the stats while it runs.
pub async fn run(
    config: RelayConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<RelayStats, RelayError> {
    let relay = Relay::spawn(config).await?;
    let mut addrs = relay.handle.watch_addrs();
    tokio::select! {
        biased;
        () = shutdown => {}
        // The task ended by itself; shutdown() below reports why.
        () = async { while addrs.changed().await.is_ok() {} } => {}
    }
    Ok(relay.shutdown().await?)
}

struct Listener {
    id: ListenerId,
    requested: Multiaddr,
    specific: bool,
    bound: Vec<Multiaddr>,
}

#[derive(Debug, Default)]
struct PeerCounts {
    connections: usize,
    reservations: usize,
}

struct State {
    peer_id: PeerId,
    listeners: Vec<Listener>,
    /// Configured external addresses, without `/p2p`.
    external: Vec<Multiaddr>,
    /// No external address configured: use bound addresses of specific listeners.
    fallback_external: bool,
    /// Peers with at least one established connection.
    peers: HashMap<PeerId, PeerCounts>,
    circuits: usize,
    connections: usize,
    /// Active registrations and when we expect each to expire.
    registrations: HashMap<(PeerId, rendezvous::Namespace), Instant>,
    addrs_tx: watch::Sender<Vec<Multiaddr>>,
}

/// A listener closed; the relay keeps running on the others.
struct ListenerFailure {
    addr: Multiaddr,
    source: Option<io::Error>,
}

impl State {
    fn start(
        &mut self,
        swarm: &mut Swarm<RelayBehaviour>,
        listen: &[Multiaddr],
    ) -> Result<(), StartError> {
        for addr in listen {
            let id = swarm.listen_on(addr.clone()).map_err(|e| match e {
                TransportError::MultiaddrNotSupported(_) => {
                    StartError::UnsupportedListenAddr { addr: addr.clone() }
                }
                TransportError::Other(source) => StartError::Listen {
                    addr: addr.clone(),
                    source,
                },
            })?;
            self.listeners.push(Listener {
                id,
                requested: addr.clone(),
                specific: is_specific(addr),
                bound: Vec::new(),
            });
        }
        for addr in &self.external {
            info!(%addr, "external address (from configuration)");
            swarm.add_external_address(addr.clone());
        }
        if self.fallback_external {
            if self.listeners.iter().any(|l| l.specific) {
                warn!(
                    "no external address configured; using the bound addresses of the specific \
                     listen addresses instead. Peers outside this network can only use the \
                     relay if those addresses reach it: pass --external-addr"
                );
            } else {
                warn!(
                    "no external address configured and every listen address is a wildcard: \
                     the relay will refuse every reservation. Pass --external-addr"
                );
            }
        }
        Ok(())
    }

    async fn await_listen_addrs(
        &mut self,
        swarm: &mut Swarm<RelayBehaviour>,
    ) -> Result<(), StartError> {
        let deadline = tokio::time::sleep(LISTEN_TIMEOUT);
        tokio::pin!(deadline);
        while let Some(waiting) = self.listeners.iter().find(|l| l.bound.is_empty()) {
            let waiting = waiting.requested.clone();
            tokio::select! {
                () = &mut deadline => {
                    let timeout = LISTEN_TIMEOUT;
                    return Err(StartError::ListenTimeout { addr: waiting, timeout });
                }
                event = swarm.select_next_some() => {
                    if let Some(failure) = self.on_event(swarm, event) {
                        return Err(StartError::ListenerClosed {
                            addr: failure.addr,
                            source: failure.source,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn stats(&self) -> RelayStats {
        RelayStats {
            reservations: self.peers.values().map(|p| p.reservations).sum(),
            circuits: self.circuits,
            rendezvous_registrations: self.registrations.len(),
            connections: self.connections,
        }
    }

    fn publish_addrs(&self) {
        let mut addrs: Vec<Multiaddr> = Vec::new();
        let bound = self.listeners.iter().flat_map(|l| l.bound.iter());
        for addr in self.external.iter().chain(bound) {
            let full = addr.clone().with(Protocol::P2p(self.peer_id));
            if !addrs.contains(&full) {
                addrs.push(full);
            }
        }
        self.addrs_tx.send_if_modified(|current| {
            let changed = *current != addrs;
            if changed {
                *current = addrs;
            }
            changed
        });
    }

    fn on_command(&self, command: Command) {
        match command {
            Command::Stats { reply } => {
                // The caller may have given up waiting; nothing to do then.
                let _ = reply.send(self.stats());
            }
        }
    }

    /// Updates the counters and addresses from one swarm event. Returns the listener that
    /// closed, if any.
    fn on_event(
        &mut self,
        swarm: &mut Swarm<RelayBehaviour>,
        event: SwarmEvent<RelayBehaviourEvent>,
    ) -> Option<ListenerFailure> {
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                info!(%address, "listening");
                let listener = self.listeners.iter_mut().find(|l| l.id == listener_id)?;
                listener.bound.push(address.clone());
                if self.fallback_external && listener.specific {
                    info!(%address, "external address (fallback: bound listen address)");
                    swarm.add_external_address(address);
                }
                self.publish_addrs();
            }
            SwarmEvent::ExpiredListenAddr {
                listener_id,
                address,
            } => {
                info!(%address, "no longer listening");
                let listener = self.listeners.iter_mut().find(|l| l.id == listener_id)?;
                listener.bound.retain(|a| *a != address);
                if self.fallback_external && listener.specific {
                    swarm.remove_external_address(&address);
                }
                self.publish_addrs();
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                let index = self.listeners.iter().position(|l| l.id == listener_id)?;
                let listener = self.listeners.remove(index);
                if self.fallback_external && listener.specific {
                    for address in &addresses {
                        swarm.remove_external_address(address);
                    }
                }
                self.publish_addrs();
                return Some(ListenerFailure {
                    addr: listener.requested,
                    source: reason.err(),
                });
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                warn!(?listener_id, %error, "listener error");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                let addr = endpoint.get_remote_address();
                debug!(peer = %peer_id, %addr, "connection established");
                self.connections += 1;
                self.peers.entry(peer_id).or_default().connections += 1;
            }
            SwarmEvent::ConnectionClosed { peer_id, cause, .. } => {
                debug!(peer = %peer_id, ?cause, "connection closed");
                self.connections = self.connections.saturating_sub(1);
                if let Some(counts) = self.peers.get_mut(&peer_id) {
                    counts.connections = counts.connections.saturating_sub(1);
                    if counts.connections == 0 {
                        self.peers.remove(&peer_id);
                    } else {
                        // A reservation lives on one connection: at most one per connection.
                        counts.reservations = counts.reservations.min(counts.connections);
                    }
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                debug!(addr = %send_back_addr, %error, "incoming connection failed");
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                debug!(%address, "external address confirmed");
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
        None
    }

    fn on_behaviour_event(&mut self, event: RelayBehaviourEvent) {
        match event {
            RelayBehaviourEvent::Relay(event) => self.on_relay_event(event),
            RelayBehaviourEvent::Rendezvous(event) => self.on_rendezvous_event(event),
            RelayBehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                // `info.observed_addr` is deliberately ignored: a peer's claim about our address
                // is not evidence of it. External addresses come from configuration only.
                debug!(peer = %peer_id, agent = %info.agent_version, "identified peer");
            }
            RelayBehaviourEvent::Identify(_) | RelayBehaviourEvent::Ping(_) => {}
            RelayBehaviourEvent::Limits(never) => match never {},
        }
    }

    fn on_relay_event(&mut self, event: relay::Event) {
        match event {
            relay::Event::ReservationReqAccepted {
                src_peer_id,
                renewed,
            } => {
                info!(peer = %src_peer_id, renewed, "reservation accepted");
                if !renewed && let Some(counts) = self.peers.get_mut(&src_peer_id) {
                    counts.reservations = (counts.reservations + 1).min(counts.connections);
                }
            }
            relay::Event::ReservationTimedOut { src_peer_id } => {
                info!(peer = %src_peer_id, "reservation timed out");
                if let Some(counts) = self.peers.get_mut(&src_peer_id) {
                    counts.reservations = counts.reservations.saturating_sub(1);
                }
            }
            relay::Event::ReservationClosed { src_peer_id } => {
                // libp2p-relay 0.22 emits this for *every* closed connection of a peer, with or
                // without a reservation, and without saying which connection. The count is
                // therefore kept from ConnectionClosed: at most one reservation per connection.
                debug!(peer = %src_peer_id, "reservation closed (or connection without one)");
            }
            relay::Event::ReservationReqDenied {
                src_peer_id,
                status,
            } => {
                info!(peer = %src_peer_id, ?status, "reservation denied");
            }
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                info!(src = %src_peer_id, dst = %dst_peer_id, "circuit opened");
                self.circuits += 1;
            }
            relay::Event::CircuitClosed {
                src_peer_id,
                dst_peer_id,
                error,
            } => {
                let error = error.map(|e| e.to_string());
                info!(src = %src_peer_id, dst = %dst_peer_id, ?error, "circuit closed");
                self.circuits = self.circuits.saturating_sub(1);
            }
            relay::Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                status,
            } => {
                info!(src = %src_peer_id, dst = %dst_peer_id, ?status, "circuit denied");
            }
            relay::Event::StatusChanged { status } => {
                info!(?status, "relay service status changed");
            }
            other => debug!(event = ?other, "relay event"),
        }
    }

    fn on_rendezvous_event(&mut self, event: rendezvous::server::Event) {
        use rendezvous::server::Event;
        match event {
            Event::PeerRegistered { peer, registration } => {
                let (namespace, ttl) = (&registration.namespace, registration.ttl);
                debug!(%peer, %namespace, ttl, "registered");
                let expires = Instant::now() + Duration::from_secs(registration.ttl);
                self.registrations
                    .insert((peer, registration.namespace), expires);
            }
            Event::PeerUnregistered { peer, namespace } => {
                debug!(%peer, %namespace, "unregistered");
                self.registrations.remove(&(peer, namespace));
            }
            Event::RegistrationExpired(registration) => {
                // libp2p-rendezvous 0.18 also reports the expiry of a registration that a
                // re-registration replaced; only drop ours if it is the one due now.
                let key = (registration.record.peer_id(), registration.namespace);
                if let Some(expires) = self.registrations.get(&key)
                    && *expires <= Instant::now() + REGISTRATION_EXPIRY_SLACK
                {
                    debug!(peer = %key.0, namespace = %key.1, "registration expired");
                    self.registrations.remove(&key);
                }
            }
            Event::PeerNotRegistered {
                peer,
                namespace,
                error,
            } => {
                info!(%peer, %namespace, ?error, "registration refused");
            }
            Event::DiscoverServed { .. } | Event::DiscoverNotServed { .. } => {}
        }
    }

    /// Stops listening, asks every connection to close and waits up to [`SHUTDOWN_GRACE`].
    async fn close(&mut self, swarm: &mut Swarm<RelayBehaviour>) -> RelayStats {
        for listener in std::mem::take(&mut self.listeners) {
            swarm.remove_listener(listener.id);
        }
        let peers: Vec<PeerId> = swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = swarm.disconnect_peer_id(peer);
        }
        let deadline = tokio::time::sleep(SHUTDOWN_GRACE);
        tokio::pin!(deadline);
        while self.connections > 0 {
            tokio::select! {
                () = &mut deadline => {
                    warn!(connections = self.connections, "connections still open at shutdown");
                    break;
                }
                event = swarm.select_next_some() => {
                    let _ = self.on_event(swarm, event);
                }
            }
        }
        let stats = self.stats();
        info!(?stats, "relay stopped");
        stats
    }
}

async fn run_actor(
    mut swarm: Swarm<RelayBehaviour>,
    mut state: State,
    mut commands: mpsc::Receiver<Command>,
    mut shutdown: oneshot::Receiver<()>,
) -> Result<RelayStats, RunError> {
    loop {
        tokio::select! {
            biased;
            // A send or a dropped `Relay` both mean stop.
            _ = &mut shutdown => break,
            Some(command) = commands.recv() => state.on_command(command),
            event = swarm.select_next_some() => {
                if let Some(failure) = state.on_event(&mut swarm, event) {
                    let error = failure.source.as_ref().map(ToString::to_string);
                    warn!(addr = %failure.addr, ?error, "listener closed");
                    if state.listeners.is_empty() {
                        state.close(&mut swarm).await;
                        return Err(RunError::ListenersClosed);
                    }
                }
            }
        }
    }
    Ok(state.close(&mut swarm).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_line_round_trips() {
        let stats = RelayStats {
            reservations: 3,
            circuits: 1,
            rendezvous_registrations: 2,
            connections: 5,
        };
        let line = stats.to_log_line();
        assert!(line.starts_with(STATS_LINE_PREFIX));
        assert!(!line.contains('\n'));
        assert_eq!(RelayStats::parse_log_line(&line), Some(stats));
        assert_eq!(RelayStats::parse_log_line("INFO something else"), None);
    }

    #[test]
    fn rate_flag_is_the_only_limiter() {
        let limits = RelayLimits::default();
        let config = limits.relay_config();
        assert_eq!(config.reservation_rate_limiters.len(), 2);
        assert_eq!(config.circuit_src_rate_limiters.len(), 2);
        let none = RelayLimits {
            reservation_rate_per_peer: None,
            reservation_rate_per_ip: None,
            circuit_rate_per_peer: None,
            circuit_rate_per_ip: None,
            ..RelayLimits::default()
        };
        let config = none.relay_config();
        assert!(config.reservation_rate_limiters.is_empty());
        assert!(config.circuit_src_rate_limiters.is_empty());
    }

    #[test]
    fn zero_circuit_duration_is_refused() {
        let limits = RelayLimits {
            max_circuit_duration: Duration::ZERO,
            ..RelayLimits::default()
        };
        assert!(matches!(
            limits.validate(),
            Err(StartError::InvalidLimit {
                name: "max_circuit_duration",
                ..
            })
        ));
        assert!(RelayLimits::default().validate().is_ok());
    }

    #[test]
    fn external_addr_with_own_peer_id_is_normalized_and_foreign_one_refused() {
        let local = Keypair::generate_ed25519().public().to_peer_id();
        let other = Keypair::generate_ed25519().public().to_peer_id();
        let base: Multiaddr = "/ip4/203.0.113.7/tcp/4001".parse().unwrap();
        let own = base.clone().with(Protocol::P2p(local));
        assert_eq!(normalize_external_addr(&own, local).unwrap(), base);
        let foreign = base.clone().with(Protocol::P2p(other));
        assert!(matches!(
            normalize_external_addr(&foreign, local),
            Err(StartError::ExternalAddrPeerMismatch { .. })
        ));
        let udp: Multiaddr = "/ip4/203.0.113.7/udp/4001".parse().unwrap();
        assert!(normalize_external_addr(&udp, local).is_err());
    }

    #[test]
    fn identity_is_created_once_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join(IDENTITY_FILE_NAME);
        let first = load_or_create_identity(&path).unwrap();
        let second = load_or_create_identity(&path).unwrap();
        assert_eq!(first.public(), second.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn garbage_identity_file_is_a_decode_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(IDENTITY_FILE_NAME);
        std::fs::write(&path, b"not a key").unwrap();
        let err = load_or_create_identity(&path).unwrap_err();
        assert!(matches!(err, IdentityError::Decode { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));
    }
}
