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
//!
//! Files: `config` (identity source, limits, config, stats), `error`, `identity` (the key
//! file), `behaviour` (the swarm), `server` ([`RelayHandle`], [`Relay`]), `actor` (the task
//! that owns the swarm), `namespace_gate`. This folder is the server only: it depends on no
//! other module of the crate, and the peer's side of a relay lives in `net::relay_client`.

mod actor;
mod behaviour;
mod config;
mod error;
mod identity;
mod namespace_gate;
mod server;
#[cfg(test)]
mod tests;

use std::time::Duration;

use libp2p::rendezvous;

pub use config::{RelayConfig, RelayIdentity, RelayLimits, RelayStats};
pub use error::{IdentityError, RelayError, RelayGone, RunError, StartError};
pub use identity::load_or_create_identity;
pub use server::{Relay, RelayHandle, run};

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
