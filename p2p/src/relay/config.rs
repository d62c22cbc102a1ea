//! What a relay is started with: its identity source, its limits and the rest of its
//! configuration, and the counters it reports.

use std::{fmt, num::NonZeroU32, path::PathBuf, time::Duration};

use libp2p::{Multiaddr, connection_limits, identity::Keypair, relay, rendezvous};
use serde::{Deserialize, Serialize};

use super::{
    DEFAULT_CIRCUIT_RATE_PER_IP, DEFAULT_CIRCUIT_RATE_PER_PEER, DEFAULT_IDLE_CONNECTION_TIMEOUT,
    DEFAULT_LISTEN_ADDR, DEFAULT_MAX_CIRCUIT_BYTES, DEFAULT_MAX_CIRCUIT_DURATION,
    DEFAULT_MAX_CIRCUITS, DEFAULT_MAX_CIRCUITS_PER_PEER, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_PEER, DEFAULT_MAX_PENDING_CONNECTIONS, DEFAULT_MAX_REGISTRATIONS,
    DEFAULT_MAX_REGISTRATIONS_PER_PEER, DEFAULT_MAX_RESERVATIONS,
    DEFAULT_MAX_RESERVATIONS_PER_PEER, DEFAULT_RENDEZVOUS_MAX_TTL, DEFAULT_RENDEZVOUS_MIN_TTL,
    DEFAULT_RESERVATION_DURATION, DEFAULT_RESERVATION_RATE_PER_IP,
    DEFAULT_RESERVATION_RATE_PER_PEER, STATS_LINE_PREFIX, error::StartError,
};

/// Where the relay's keypair comes from.
pub enum RelayIdentity {
    /// A fresh ed25519 keypair that lives only in memory (tests, benchmarks); the PeerId changes
    /// on every start.
    Ephemeral,
    /// A protobuf-encoded keypair file, created with mode 0600 on first use so the PeerId stays
    /// stable across restarts. See [`load_or_create_identity`](super::load_or_create_identity).
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

    pub(super) fn relay_config(&self) -> relay::Config {
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

    pub(super) fn rendezvous_config(&self) -> rendezvous::server::Config {
        rendezvous::server::Config::default()
            .with_min_ttl(self.rendezvous_min_ttl.as_secs())
            .with_max_ttl(self.rendezvous_max_ttl.as_secs())
            .with_max_registration_per_peer(self.max_registrations_per_peer)
            .with_max_registration_total(self.max_registrations)
    }

    pub(super) fn connection_limits(&self) -> connection_limits::ConnectionLimits {
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
