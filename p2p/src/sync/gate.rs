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
struct GateState {
    /// Paired, not revoked.
    trusted: HashSet<PeerId>,
    /// Relays and rendezvous points (and a desktop while we pair with it).
    infra: HashSet<PeerId>,
    /// While set and in the future, anyone may connect (to pair, nothing else).
    pairing_open_until: Option<Instant>,
    /// Pairing handshakes running now, by peer. The desktop trusts a phone before its welcome
    /// has reached it, so trust alone does not say that a pairing is over.
    handshakes: HashMap<PeerId, usize>,
}

/// Who may connect, shared between the [`Gate`] behaviour, which reads it on every new
/// connection inside the swarm's poll (so it cannot wait for a message), and the code that
/// changes trust: pairing, revocation and the relays the node learns. The state is private:
/// every change is one of the named operations below, each taking the lock once.
#[derive(Debug, Clone, Default)]
pub struct SharedGate(Arc<RwLock<GateState>>);

impl SharedGate {
    /// A gate that lets `trusted` through.
    pub fn new(trusted: impl IntoIterator<Item = PeerId>) -> Self {
        Self(Arc::new(RwLock::new(GateState {
            trusted: trusted.into_iter().collect(),
            ..GateState::default()
        })))
    }

    fn read<T>(&self, f: impl FnOnce(&GateState) -> T) -> Option<T> {
        self.0.read().ok().map(|s| f(&s))
    }

    fn write(&self, f: impl FnOnce(&mut GateState)) {
        if let Ok(mut s) = self.0.write() {
            f(&mut s);
        }
    }

    /// True if a connection from or to `peer` is allowed.
    pub fn admits(&self, peer: &PeerId) -> bool {
        self.read(|s| {
            s.trusted.contains(peer)
                || s.infra.contains(peer)
                || s.pairing_open_until.is_some_and(|t| t > Instant::now())
        })
        .unwrap_or(false)
    }

    /// True if `peer` is paired and not revoked.
    pub fn is_trusted(&self, peer: &PeerId) -> bool {
        self.read(|s| s.trusted.contains(peer)).unwrap_or(false)
    }

    /// True if a pairing with `peer` may be running on one of its connections: the peer is not
    /// trusted yet, our pairing window is open, or a handshake with it has not ended.
    pub fn may_be_pairing(&self, peer: &PeerId) -> bool {
        self.read(|s| {
            !s.trusted.contains(peer)
                || s.pairing_open_until.is_some_and(|t| t > Instant::now())
                || s.handshakes.contains_key(peer)
        })
        .unwrap_or(false)
    }

    /// Lets `peer` through for good (it is paired).
    pub fn trust(&self, peer: PeerId) {
        self.write(|s| {
            s.trusted.insert(peer);
        });
    }

    /// Stops letting `peer` through as a paired device (revoked or forgotten).
    pub fn distrust(&self, peer: &PeerId) {
        self.write(|s| {
            s.trusted.remove(peer);
        });
    }

    /// Lets infrastructure peers through: relays and rendezvous points.
    pub fn add_infra(&self, peers: impl IntoIterator<Item = PeerId>) {
        self.write(|s| s.infra.extend(peers));
    }

    /// Lets `peer` through as infrastructure until the guard is dropped (a desktop while we
    /// pair with it). Not for a peer that is infrastructure already.
    pub fn admit_while(&self, peer: PeerId) -> Admitted {
        self.write(|s| {
            s.infra.insert(peer);
        });
        Admitted {
            gate: self.clone(),
            peer,
        }
    }

    /// Opens the pairing window until `until`, or closes it (`None`).
    pub fn set_pairing_window(&self, until: Option<Instant>) {
        self.write(|s| s.pairing_open_until = until);
    }

    /// Counts a handshake with `peer` until the guard is dropped.
    pub fn handshake(&self, peer: PeerId) -> Handshake {
        self.write(|s| *s.handshakes.entry(peer).or_default() += 1);
        Handshake {
            gate: self.clone(),
            peer,
        }
    }
}

/// A peer let through by [`SharedGate::admit_while`] while it lives.
#[derive(Debug)]
pub struct Admitted {
    gate: SharedGate,
    peer: PeerId,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.gate.write(|s| {
            s.infra.remove(&self.peer);
        });
    }
}

/// A running pairing handshake, counted by the gate while it lives.
#[derive(Debug)]
pub struct Handshake {
    gate: SharedGate,
    peer: PeerId,
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.gate.write(|s| {
            if let Some(n) = s.handshakes.get_mut(&self.peer) {
                *n -= 1;
                if *n == 0 {
                    s.handshakes.remove(&self.peer);
                }
            }
        });
    }
}

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
        if self.state.admits(&peer) {
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
        let gate = SharedGate::default();
        assert!(
            gate.may_be_pairing(&peer),
            "an untrusted peer may be pairing"
        );

        // The desktop trusts the phone before the welcome has left.
        gate.trust(peer);
        assert!(
            !gate.may_be_pairing(&peer),
            "trusted, no window, no handshake"
        );
        let first = gate.handshake(peer);
        let second = gate.handshake(peer);
        assert!(gate.may_be_pairing(&peer), "trusted, but a handshake runs");
        drop(first);
        assert!(
            gate.may_be_pairing(&peer),
            "one of two handshakes still runs"
        );
        drop(second);
        assert!(!gate.may_be_pairing(&peer));
        assert!(gate.read(|s| s.handshakes.is_empty()).unwrap());

        // An open window counts for everyone.
        gate.set_pairing_window(Some(Instant::now() + std::time::Duration::from_secs(60)));
        assert!(gate.may_be_pairing(&peer));
    }

    #[test]
    fn a_desktop_is_admitted_only_while_we_pair_with_it() {
        let (desktop, stranger) = (PeerId::random(), PeerId::random());
        let gate = SharedGate::new([]);
        assert!(!gate.admits(&desktop));
        let admitted = gate.admit_while(desktop);
        assert!(gate.admits(&desktop) && !gate.admits(&stranger));
        drop(admitted);
        assert!(!gate.admits(&desktop));
        gate.trust(desktop);
        assert!(gate.admits(&desktop) && gate.is_trusted(&desktop));
        gate.distrust(&desktop);
        assert!(!gate.admits(&desktop));
    }
}
