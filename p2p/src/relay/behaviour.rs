//! The relay's composed behaviour (connection limits first, then circuit relay v2, the
//! rendezvous namespace gate, identify and ping), the swarm built around it, and the address
//! checks both the server and the actor need.

use std::time::Duration;

use libp2p::{
    Multiaddr, PeerId, Swarm, connection_limits, identify, identity::Keypair, multiaddr::Protocol,
    noise, ping, relay, swarm::NetworkBehaviour, tcp, yamux,
};

use super::{IDENTIFY_PROTOCOL_VERSION, config::RelayLimits, error::StartError, namespace_gate};

#[derive(NetworkBehaviour)]
pub(super) struct RelayBehaviour {
    // First: the derive asks behaviours in order, so over-limit connections are denied before
    // the others allocate state for them.
    limits: connection_limits::Behaviour,
    relay: relay::Behaviour,
    rendezvous: namespace_gate::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

pub(super) fn build_swarm(
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
pub(super) fn normalize_external_addr(
    addr: &Multiaddr,
    local: PeerId,
) -> Result<Multiaddr, StartError> {
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
pub(super) fn is_specific(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => !ip.is_unspecified(),
        Some(Protocol::Ip6(ip)) => !ip.is_unspecified(),
        _ => false,
    }
}
