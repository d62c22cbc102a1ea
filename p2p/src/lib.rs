//! Errand's peer-to-peer layer: the libp2p node, the sync and pairing protocols, the `Peer`
//! that wires them to the replica, the control API, and the `errand-relay` server.
//!
//! Folders, each a module, from the bottom up (a folder depends only on those listed before
//! it, never on a sibling above it):
//!
//! - [`replica`] and [`clock`]: the document, store and sync states behind one lock, durable
//!   on every ack; the wall clock.
//! - [`sync`]: `/errand/sync/1` in three layers: the connection [`sync::gate`] (who may
//!   connect), the [`sync::session`] (hello, sync, push) and the [`sync::wire`] format.
//!   Depends on the replica only.
//! - [`net`]: the libp2p swarm as an actor (TCP + Noise + Yamux, identify, ping, mDNS, relay
//!   client, DCUtR, rendezvous client, streams) behind the gate. Knows no protocol above the
//!   streams it carries; no pairing, no `Peer`.
//! - [`pair`]: `/errand/pair/1`: the handshake, the desktop's ticket book and its responder.
//!   Works on the replica, the gate and the node; never on the `Peer`.
//! - [`peer`]: all of that wired together; the desktop and the phone both run a
//!   [`peer::Peer`]. Its supervisor runs the sync sessions and the pairing responder;
//!   [`peer::pairing`] is pairing as a `Peer` does it (tickets, pairing a phone, revoking).
//! - [`control`], [`api`], [`cli`]: the local control socket a daemon serves to its own CLI,
//!   the requests it answers, and the shared command-line plumbing.
//! - [`relay`]: the `errand-relay` server; depends on nothing else in this crate.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod api;
pub mod blob;
pub mod cli;
pub mod clock;
pub mod control;
pub mod net;
pub mod pair;
pub mod peer;
pub mod relay;
pub mod replica;
pub mod sync;

/// libp2p's peer id, for crates that name peers without depending on libp2p.
pub use libp2p::PeerId;
/// Pairing as a `Peer` does it, at its old path (the control API and other crates use it).
pub use peer::pairing;
/// The sync session at its old path, for callers outside this crate.
pub use sync::session;
