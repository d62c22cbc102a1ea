//! The network node: one libp2p swarm per peer, run as an actor.
//!
//! - [`node`]: the actor that owns the swarm, its handle and its events.
//! - [`behaviour`]: the composed behaviour and the swarm builder (both the node and the relay
//!   client drive a `Swarm<Behaviour>`).
//! - [`relay_client`]: reservations on relays, rendezvous registration and discovery.
//! - [`discovery`]: how paired devices find each other (mDNS, the rendezvous namespace).
//!
//! This folder knows nothing of sync sessions, pairing or the `Peer`: it carries streams for
//! whatever protocol asks, and admits connections through the sync gate.

pub mod behaviour;
pub mod discovery;
pub mod node;
pub mod relay_client;
