//! The gate: a behaviour that admits only trusted peers, infrastructure peers (relays), and
//! anyone while a pairing window is open. Streams are checked again when accepted.

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Instant,
};

use libp2p::{
    Multiaddr, PeerId,
    core::{Endpoint, transport::PortUse},
    swarm::{
        ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
        THandlerOutEvent, ToSwarm, dummy,
    },
};

/// Who may connect.
#[derive(Debug, Default)]
pub struct GateState {
    /// Paired, not revoked.
    pub trusted: HashSet<PeerId>,
    /// Relays and rendezvous points.
    pub infra: HashSet<PeerId>,
    /// While set and in the future, anyone may connect (to pair, nothing else).
    pub pairing_open_until: Option<Instant>,
    /// Pairing handshakes running now, by peer. The desktop trusts a phone before its welcome
    /// has reached it, so trust alone does not say that a pairing is over.
    pub handshakes: HashMap<PeerId, usize>,
}

impl GateState {
    /// True if a connection from or to `peer` is allowed.
    pub fn admits(&self, peer: &PeerId) -> bool {
        self.trusted.contains(peer)
            || self.infra.contains(peer)
            || self.pairing_open_until.is_some_and(|t| t > Instant::now())
    }

    /// True if a pairing with `peer` may be running on one of its connections: the peer is not
    /// trusted yet, our pairing window is open, or a handshake with it has not ended.
    pub fn may_be_pairing(&self, peer: &PeerId) -> bool {
        !self.trusted.contains(peer)
            || self.pairing_open_until.is_some_and(|t| t > Instant::now())
            || self.handshakes.contains_key(peer)
    }

    /// Counts a handshake with `peer` until the guard is dropped.
    pub fn handshake(state: &SharedGate, peer: PeerId) -> Handshake {
        if let Ok(mut s) = state.write() {
            *s.handshakes.entry(peer).or_default() += 1;
        }
        Handshake {
            state: Arc::clone(state),
            peer,
        }
    }
}

/// A running pairing handshake, counted in [`GateState::handshakes`] while it lives.
#[derive(Debug)]
pub struct Handshake {
    state: SharedGate,
    peer: PeerId,
}

impl Drop for Handshake {
    fn drop(&mut self) {
        if let Ok(mut s) = self.state.write()
            && let Some(n) = s.handshakes.get_mut(&self.peer)
        {
            *n -= 1;
            if *n == 0 {
                s.handshakes.remove(&self.peer);
            }
        }
    }
}

/// Shared handle to the gate's state.
pub type SharedGate = Arc<RwLock<GateState>>;

/// The gate behaviour. Put it first in the composed behaviour: its refusal stops the others.
#[derive(Debug)]
pub struct Gate {
    state: SharedGate,
}

/// A connection was refused by the gate.
#[derive(Debug, thiserror::Error)]
#[error("peer {0} is not trusted")]
pub struct NotTrusted(PeerId);

impl Gate {
    /// A gate over shared state.
    pub fn new(state: SharedGate) -> Self {
        Self { state }
    }

    fn check(&self, peer: PeerId) -> Result<(), ConnectionDenied> {
        let admitted = self.state.read().map(|s| s.admits(&peer)).unwrap_or(false);
        if admitted {
            Ok(())
        } else {
            tracing::debug!(%peer, "gate refused a connection");
            Err(ConnectionDenied::new(NotTrusted(peer)))
        }
    }
}

impl NetworkBehaviour for Gate {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        ev: THandlerOutEvent<Self>,
    ) {
        libp2p::core::util::unreachable(ev)
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trusted_peer_counts_as_pairing_while_its_handshake_runs() {
        let peer = PeerId::random();
        let state: SharedGate = Arc::new(RwLock::new(GateState::default()));
        let pairing = |s: &SharedGate| s.read().unwrap().may_be_pairing(&peer);
        assert!(pairing(&state), "an untrusted peer may be pairing");

        // The desktop trusts the phone before the welcome has left.
        state.write().unwrap().trusted.insert(peer);
        assert!(!pairing(&state), "trusted, no window, no handshake");
        let first = GateState::handshake(&state, peer);
        let second = GateState::handshake(&state, peer);
        assert!(pairing(&state), "trusted, but a handshake runs");
        drop(first);
        assert!(pairing(&state), "one of two handshakes still runs");
        drop(second);
        assert!(!pairing(&state));
        assert!(state.read().unwrap().handshakes.is_empty());

        // An open window counts for everyone.
        state.write().unwrap().pairing_open_until =
            Some(Instant::now() + std::time::Duration::from_secs(60));
        assert!(pairing(&state));
    }
}
