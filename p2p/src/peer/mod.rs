//! `Peer`: the store, the thread replica and the network node wired together. The desktop and
//! the phone both run one.
//!
//! - [`Peer::open`] opens a home (no network): enough for local commands, which are durable
//!   the moment they return.
//! - [`Peer::start`] brings the node up: listening, dialing trusted peers with backoff, mDNS,
//!   and one long-lived sync session per connected trusted peer.
//! - [`Peer::events`] reports connections, merged changes (with task ids) and "in sync".
//!
//! Files: `types` (config, events, errors, parsers), `handle` (the [`Peer`] handle and its
//! local operations), `files` (its blob store, garbage collection, fetching), `status`, `port` (the
//! listening port kept across restarts), `supervisor` (start, shutdown, and the task that runs sync
//! sessions and redials), `pairing` (pairing as a `Peer` does it, over [`crate::pair`]).

mod files;
mod handle;
pub mod pairing;
mod port;
mod status;
mod supervisor;
mod types;

pub use crate::clock::now_ms;
pub use handle::Peer;
pub(crate) use handle::{META_IDENTITY, META_NAME};
pub use status::{DocumentStatus, PeerStatus, Status};
pub use supervisor::{BACKOFF_MAX, SHUTDOWN_TIMEOUT};
pub use types::{PeerConfig, PeerError, PeerEvent, changed_tasks, parse_addr, parse_peer_id};
