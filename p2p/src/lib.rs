//! Errand's peer-to-peer layer.
//!
//! - [`node`]: the libp2p swarm as an actor (TCP + Noise + Yamux, identify, ping, mDNS, relay
//!   client, DCUtR, rendezvous client, streams) behind the [`gate`].
//! - [`wire`] and [`session`]: `/errand/sync/1`, a hello then the Automerge sync loop.
//! - [`replica`]: the document, store and sync states behind one lock, durable on every ack.
//! - [`peer`]: all of that wired together; the desktop and the phone both run a [`peer::Peer`].
//! - [`control`]: the local control socket a daemon serves to its own CLI.
//! - [`relay`]: the `errand-relay` server.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod api;
pub mod cli;
pub mod control;
pub mod gate;
pub mod node;
pub mod pair;
pub mod pairing;
pub mod peer;
pub mod relay;
pub mod relay_client;
pub mod replica;
pub mod session;
pub mod wire;
