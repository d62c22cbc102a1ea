//! The peer's side of the relay: keep a reservation on each configured relay, register at
//! its rendezvous point under the paired devices' namespace, discover the other devices
//! there, and dial them through `/p2p-circuit`. DCUtR then upgrades to a direct connection
//! where the NATs allow it, and the relayed connection is closed.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use super::behaviour::Behaviour;
use libp2p::{
    Multiaddr, PeerId, Swarm, core::transport::ListenerId, multiaddr::Protocol, rendezvous,
};
use serde::Serialize;

/// Registration TTL asked of the rendezvous point. The errand-relay accepts 60 s to 2 h; 10 min
/// keeps a stale registration (a phone that went away) short-lived.
pub const REGISTRATION_TTL_SECS: u64 = 600;
/// Re-register at half the TTL, so one lost refresh does not drop us from discovery.
pub const REREGISTER_EVERY: Duration = Duration::from_secs(REGISTRATION_TTL_SECS / 2);
/// Discovery poll while any paired device is not connected. Discovery is one small
/// request to the relay; 5 s makes a reconnect through the relay feel prompt.
pub const DISCOVER_EVERY: Duration = Duration::from_secs(5);
/// First delay before re-reserving after the relay went away; doubles up to the cap.
const RESERVE_BACKOFF_START: Duration = Duration::from_secs(1);
/// First pause between dials of a relay that is not connected. A dial is one TCP connect,
/// nothing the relay counts against anyone, so it starts small and stays small: a restarted
/// relay is used again within [`DIAL_BACKOFF_MAX`] of coming back.
const DIAL_BACKOFF_START: Duration = Duration::from_millis(250);
/// Cap of the relay dial backoff.
const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Cap of the re-reservation backoff: a restarted relay is used again within 30 s.
const RESERVE_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Splits `/…/p2p/<relay>` into the relay's PeerId and the address.
pub fn relay_peer(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// True for a `/p2p-circuit` address.
pub fn is_circuit(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// Reservation state of one relay, as `status --json` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reservation {
    /// Not connected to the relay.
    None,
    /// Connected, reservation requested.
    Pending,
    /// Reservation accepted: we are reachable through the relay.
    Accepted,
}

/// One relay's state.
#[derive(Debug, Clone, Serialize)]
pub struct RelayInfo {
    /// The relay's address.
    pub addr: String,
    /// Our reservation there.
    pub reservation: Reservation,
    /// Registered at its rendezvous point.
    pub registered: bool,
}

struct RelayEntry {
    addr: Multiaddr,
    peer: PeerId,
    listener: Option<ListenerId>,
    reservation: Reservation,
    registered_at: Option<Instant>,
    cookie: Option<rendezvous::Cookie>,
    next_attempt: Instant,
    backoff: Duration,
    next_dial: Instant,
    dial_backoff: Duration,
    last_discover: Option<Instant>,
}

/// All relays of a node.
pub struct Relays {
    entries: Vec<RelayEntry>,
    namespace: Option<rendezvous::Namespace>,
}

impl std::fmt::Debug for Relays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relays")
            .field("count", &self.entries.len())
            .finish()
    }
}

impl Relays {
    /// Relays from addresses that end in `/p2p/<relay id>`; others are skipped with a warning.
    pub fn new(addrs: &[Multiaddr], namespace: Option<String>) -> Self {
        let mut relays = Self {
            entries: Vec::new(),
            namespace: namespace.and_then(|n| rendezvous::Namespace::new(n).ok()),
        };
        for a in addrs {
            relays.add(a);
        }
        relays
    }

    /// Adds a relay (e.g. learned from a ticket), keeping the state of the others: rebuilding
    /// would forget their listeners, so a live reservation would be taken a second time.
    /// Returns false if it is already known or lacks `/p2p/<relay id>`.
    pub fn add(&mut self, addr: &Multiaddr) -> bool {
        let Some(peer) = relay_peer(addr) else {
            tracing::warn!(%addr, "relay address lacks /p2p/<relay id>; ignored");
            return false;
        };
        if self.entries.iter().any(|e| e.addr == *addr) {
            return false;
        }
        self.entries.push(RelayEntry {
            addr: addr.clone(),
            peer,
            listener: None,
            reservation: Reservation::None,
            registered_at: None,
            cookie: None,
            next_attempt: Instant::now(),
            backoff: RESERVE_BACKOFF_START,
            next_dial: Instant::now(),
            dial_backoff: DIAL_BACKOFF_START,
            last_discover: None,
        });
        true
    }

    /// The namespace, as text.
    pub fn namespace_string(&self) -> Option<String> {
        self.namespace.as_ref().map(|n| n.to_string())
    }

    /// Sets the namespace (after pairing) and registers again.
    pub fn set_namespace(&mut self, namespace: String) {
        self.namespace = rendezvous::Namespace::new(namespace).ok();
        for e in &mut self.entries {
            e.registered_at = None;
            e.cookie = None;
            e.last_discover = None;
        }
    }

    /// The relays' PeerIds (infrastructure: admitted by the gate).
    pub fn peers(&self) -> Vec<PeerId> {
        self.entries.iter().map(|e| e.peer).collect()
    }

    /// True if `peer` is one of our relays.
    pub fn is_relay(&self, peer: &PeerId) -> bool {
        self.entries.iter().any(|e| e.peer == *peer)
    }

    /// The circuit addresses through which we can be reached (accepted reservations).
    pub fn circuit_addrs(&self, me: PeerId) -> Vec<Multiaddr> {
        self.entries
            .iter()
            .filter(|e| e.reservation == Reservation::Accepted)
            .map(|e| {
                e.addr
                    .clone()
                    .with(Protocol::P2pCircuit)
                    .with(Protocol::P2p(me))
            })
            .collect()
    }

    /// The configured relay addresses, with a circuit suffix: what a ticket carries.
    pub fn ticket_addrs(&self) -> Vec<Multiaddr> {
        self.entries
            .iter()
            .map(|e| e.addr.clone().with(Protocol::P2pCircuit))
            .collect()
    }

    /// State for `status`.
    pub fn info(&self) -> Vec<RelayInfo> {
        self.entries
            .iter()
            .map(|e| RelayInfo {
                addr: e.addr.to_string(),
                reservation: e.reservation,
                registered: e.registered_at.is_some(),
            })
            .collect()
    }

    /// Periodic work: (re)connect and reserve, re-register, discover.
    pub fn tick(&mut self, swarm: &mut Swarm<Behaviour>, want_discovery: bool) {
        let now = Instant::now();
        let ns = self.namespace.clone();
        for e in &mut self.entries {
            if !swarm.is_connected(&e.peer) {
                if e.listener.is_none() && e.next_dial <= now {
                    e.next_dial = now + e.dial_backoff;
                    e.dial_backoff = (e.dial_backoff * 2).min(DIAL_BACKOFF_MAX);
                    if let Err(err) = swarm.dial(e.addr.clone()) {
                        tracing::debug!(relay = %e.peer, error = %err, "relay dial failed");
                    }
                }
                continue;
            }
            if e.listener.is_none() && e.next_attempt <= now {
                match swarm.listen_on(e.addr.clone().with(Protocol::P2pCircuit)) {
                    Ok(id) => {
                        e.listener = Some(id);
                        e.reservation = Reservation::Pending;
                    }
                    Err(err) => {
                        tracing::warn!(relay = %e.peer, error = %err, "cannot listen on the relay")
                    }
                }
            }
            let Some(ns) = ns.clone() else { continue };
            if e.reservation == Reservation::Accepted
                && e.registered_at
                    .is_none_or(|t| now.duration_since(t) >= REREGISTER_EVERY)
            {
                e.registered_at = Some(now);
                if let Err(err) = swarm.behaviour_mut().rendezvous.register(
                    ns.clone(),
                    e.peer,
                    Some(REGISTRATION_TTL_SECS),
                ) {
                    tracing::debug!(relay = %e.peer, error = ?err, "rendezvous registration not possible yet");
                    e.registered_at = None;
                }
            }
            if want_discovery
                && e.last_discover
                    .is_none_or(|t| now.duration_since(t) >= DISCOVER_EVERY)
            {
                e.last_discover = Some(now);
                swarm
                    .behaviour_mut()
                    .rendezvous
                    .discover(Some(ns), e.cookie.clone(), None, e.peer);
            }
        }
    }

    /// A reservation was accepted.
    pub fn on_reservation(&mut self, relay: PeerId, swarm: &mut Swarm<Behaviour>) {
        for e in self.entries.iter_mut().filter(|e| e.peer == relay) {
            e.reservation = Reservation::Accepted;
            e.backoff = RESERVE_BACKOFF_START;
            e.registered_at = None;
            e.last_discover = None;
            e.cookie = None;
        }
        tracing::info!(%relay, "relay reservation accepted");
        self.tick(swarm, true);
    }

    /// A listener closed: if it was a relay's, the reservation is gone (or was refused).
    ///
    /// The backoff grows here too: a relay that refuses the reservation (its cap or rate limit
    /// reached) keeps the connection open, so without this the client would ask again every
    /// tick, and from one IP that drains the relay's per-IP budget for every other client.
    pub fn on_listener_closed(&mut self, id: ListenerId, error: Option<&str>) {
        for e in self.entries.iter_mut().filter(|e| e.listener == Some(id)) {
            tracing::info!(relay = %e.peer, ?error, retry_in = ?e.backoff, "relay reservation lost or refused; will re-reserve");
            e.listener = None;
            e.reservation = Reservation::None;
            e.registered_at = None;
            e.next_attempt = Instant::now() + e.backoff;
            e.backoff = (e.backoff * 2).min(RESERVE_BACKOFF_MAX);
        }
    }

    /// A connection to a relay was established: reserve at once rather than after the dial's
    /// backoff (the dial already waited for it).
    pub fn on_connected(&mut self, peer: PeerId) {
        let now = Instant::now();
        for e in self.entries.iter_mut().filter(|e| e.peer == peer) {
            e.dial_backoff = DIAL_BACKOFF_START;
            if e.listener.is_none() {
                e.next_attempt = now;
            }
        }
    }

    /// The connection to a relay closed.
    /// The relay restarted or the network dropped: it is dialed again from the smallest
    /// backoff, and a reservation it had accepted is asked for again at once.
    pub fn on_disconnected(&mut self, peer: PeerId) {
        let now = Instant::now();
        for e in self.entries.iter_mut().filter(|e| e.peer == peer) {
            if e.reservation == Reservation::Accepted {
                e.backoff = RESERVE_BACKOFF_START;
                e.next_attempt = now;
            }
            e.reservation = Reservation::None;
            e.registered_at = None;
            e.next_dial = now;
            e.dial_backoff = DIAL_BACKOFF_START;
        }
    }

    /// Discovery results: the trusted peers among them, with their circuit addresses.
    pub fn on_discovered(
        &mut self,
        relay: PeerId,
        registrations: Vec<rendezvous::Registration>,
        cookie: rendezvous::Cookie,
    ) -> HashMap<PeerId, Vec<Multiaddr>> {
        for e in self.entries.iter_mut().filter(|e| e.peer == relay) {
            e.cookie = Some(cookie.clone());
        }
        let mut out: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for r in registrations {
            out.entry(r.record.peer_id())
                .or_default()
                .extend(r.record.addresses().iter().cloned());
        }
        out
    }

    /// Forgets the discovery cookies, so the next discovery returns every registration again.
    pub fn reset_cookies(&mut self) {
        for e in &mut self.entries {
            e.cookie = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay_addr() -> Multiaddr {
        let id = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        format!("/ip4/127.0.0.1/tcp/4001/p2p/{id}").parse().unwrap()
    }

    #[test]
    fn adding_a_relay_keeps_the_state_of_the_others() {
        let first = relay_addr();
        let mut relays = Relays::new(std::slice::from_ref(&first), None);
        let listener = ListenerId::next();
        relays.entries[0].listener = Some(listener);
        relays.entries[0].reservation = Reservation::Accepted;

        assert!(!relays.add(&first), "a known relay is not added twice");
        assert!(relays.add(&relay_addr()));
        assert!(!relays.add(&"/ip4/127.0.0.1/tcp/4001".parse().unwrap()));
        assert_eq!(relays.entries.len(), 2);
        assert_eq!(relays.entries[0].listener, Some(listener));
        assert_eq!(relays.entries[0].reservation, Reservation::Accepted);
    }

    #[test]
    fn a_refused_reservation_is_retried_with_a_growing_backoff() {
        let mut relays = Relays::new(&[relay_addr()], None);
        let peer = relays.entries[0].peer;
        let mut delays = Vec::new();
        for _ in 0..8 {
            let listener = ListenerId::next();
            relays.entries[0].listener = Some(listener);
            let before = Instant::now();
            relays.on_listener_closed(listener, Some("reservation refused"));
            // Whole seconds: the clock moves between `before` and the call.
            let delay = relays.entries[0].next_attempt.duration_since(before);
            delays.push(Duration::from_secs(delay.as_secs()));
        }
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
        assert!(delays[0] >= RESERVE_BACKOFF_START);
        assert!(delays[3] >= RESERVE_BACKOFF_START * 8, "{delays:?}");
        assert_eq!(*delays.last().unwrap(), RESERVE_BACKOFF_MAX);

        // Once connected again, the next attempt is due at once.
        relays.on_connected(peer);
        assert!(relays.entries[0].next_attempt <= Instant::now());
    }
}
