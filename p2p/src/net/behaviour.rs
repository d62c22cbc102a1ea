//! The node's composed libp2p behaviour and the swarm built around it.
//!
//! Transport: TCP + Noise + Yamux (and the relay client transport, the same upgrade over a
//! circuit). Behaviours, in order: the gate (first, so its refusal stops the rest), relay
//! client, DCUtR, identify, ping, mDNS (switchable), rendezvous client, and `libp2p-stream`
//! for `/errand/sync/1` and `/errand/pair/1`.
//!
//! Both the node actor ([`super::node`]) and the relay client ([`super::relay_client`]) drive a
//! `Swarm<Behaviour>`; neither depends on the other for it.

use std::time::Duration;

use libp2p::{
    Swarm, dcutr, identify, identity, mdns, noise, ping, relay, rendezvous,
    swarm::{NetworkBehaviour, behaviour::toggle::Toggle},
    tcp, yamux,
};

use crate::sync::gate::{Gate, SharedGate};

/// Identify's protocol string, shared with the relay.
pub const IDENTIFY_PROTOCOL: &str = "/errand/id/1.0.0";

/// Ping every 15 s: a quarter of the idle timeout, so a dead connection is noticed well
/// before it would idle out, and the traffic stays negligible on a phone.
const PING_INTERVAL: Duration = Duration::from_secs(15);

/// Close a connection with no streams after 60 s. The sync stream keeps a trusted peer's
/// connection open; this only reaps connections nothing uses (dependency notes, 1.6).
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Peers whose identify-reported addresses are kept for dials by PeerId (libp2p's default).
const IDENTIFY_CACHE_SIZE: usize = 100;

/// The composed behaviour.
#[allow(missing_debug_implementations)]
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub(super) gate: Gate,
    pub(super) relay_client: relay::client::Behaviour,
    pub(super) dcutr: Toggle<dcutr::Behaviour>,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(super) rendezvous: rendezvous::client::Behaviour,
    pub(super) stream: libp2p_stream::Behaviour,
}

/// Why the swarm could not be built (a transport or a behaviour failed to set up).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(String);

/// Builds the swarm: transports, the composed [`Behaviour`] and the idle timeout. Nothing
/// listens or dials yet.
pub(super) fn build_swarm(
    keypair: identity::Keypair,
    gate: SharedGate,
    enable_mdns: bool,
    enable_dcutr: bool,
    relay_only: bool,
) -> Result<Swarm<Behaviour>, BuildError> {
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| BuildError(e.to_string()))?
        .with_dns()
        .map_err(|e| BuildError(e.to_string()))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| BuildError(e.to_string()))?
        .with_behaviour(|key, relay_client| {
            let peer_id = key.public().to_peer_id();
            let mdns = if enable_mdns {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    peer_id,
                )?)
            } else {
                None
            };
            Ok(Behaviour {
                gate: Gate::new(gate),
                relay_client,
                dcutr: Toggle::from(enable_dcutr.then(|| dcutr::Behaviour::new(peer_id))),
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                        .with_agent_version(format!("errand/{}", env!("CARGO_PKG_VERSION")))
                        // Identify hands the listen addresses it learned to any dial by PeerId
                        // alone, such as libp2p-stream's `open_stream` on a peer that just
                        // disconnected: relay-only would quietly dial direct. No cache then.
                        .with_cache_size(if relay_only { 0 } else { IDENTIFY_CACHE_SIZE }),
                ),
                ping: ping::Behaviour::new(ping::Config::new().with_interval(PING_INTERVAL)),
                mdns: Toggle::from(mdns),
                rendezvous: rendezvous::client::Behaviour::new(key.clone()),
                stream: libp2p_stream::Behaviour::new(),
            })
        })
        .map_err(|e| BuildError(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();

    Ok(swarm)
}
