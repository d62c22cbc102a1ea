//! The gate: a behaviour that admits only trusted peers, infrastructure peers (relays), and
//! anyone while a pairing window is open. Streams are checked again when accepted.

use std::{
    collections::HashSet,
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
}

impl GateState {
    /// True if a connection from or to `peer` is allowed.
    pub fn admits(&self, peer: &PeerId) -> bool {
        self.trusted.contains(peer)
            || self.infra.contains(peer)
            || self.pairing_open_until.is_some_and(|t| t > Instant::now())
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
