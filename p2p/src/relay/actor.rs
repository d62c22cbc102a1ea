//! The task that owns the relay's swarm: it tracks listeners, connections, reservations,
//! circuits and registrations as swarm events arrive, and answers the handle's commands.

use std::{collections::HashMap, fmt, io, time::Duration};

use futures::StreamExt as _;
use libp2p::{
    Multiaddr, PeerId, Swarm, TransportError, core::transport::ListenerId, identify,
    multiaddr::Protocol, relay, rendezvous, swarm::SwarmEvent,
};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tracing::{debug, info, warn};

use super::{
    LISTEN_TIMEOUT, REGISTRATION_EXPIRY_SLACK, SHUTDOWN_GRACE,
    behaviour::{RelayBehaviour, RelayBehaviourEvent, is_specific},
    config::RelayStats,
    error::{RunError, StartError},
};

/// What the handle asks of the actor.
pub(super) enum Command {
    Stats { reply: oneshot::Sender<RelayStats> },
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stats { .. } => f.write_str("Stats"),
        }
    }
}

pub(super) struct Listener {
    id: ListenerId,
    requested: Multiaddr,
    specific: bool,
    bound: Vec<Multiaddr>,
}

#[derive(Debug, Default)]
pub(super) struct PeerCounts {
    connections: usize,
    reservations: usize,
}

pub(super) struct State {
    pub(super) peer_id: PeerId,
    pub(super) listeners: Vec<Listener>,
    /// Configured external addresses, without `/p2p`.
    pub(super) external: Vec<Multiaddr>,
    /// No external address configured: use bound addresses of specific listeners.
    pub(super) fallback_external: bool,
    /// Peers with at least one established connection.
    pub(super) peers: HashMap<PeerId, PeerCounts>,
    pub(super) circuits: usize,
    pub(super) connections: usize,
    /// Active registrations and when we expect each to expire.
    pub(super) registrations: HashMap<(PeerId, rendezvous::Namespace), Instant>,
    pub(super) addrs_tx: watch::Sender<Vec<Multiaddr>>,
}

/// A listener closed; the relay keeps running on the others.
pub(super) struct ListenerFailure {
    addr: Multiaddr,
    source: Option<io::Error>,
}

impl State {
    pub(super) fn start(
        &mut self,
        swarm: &mut Swarm<RelayBehaviour>,
        listen: &[Multiaddr],
    ) -> Result<(), StartError> {
        for addr in listen {
            let id = swarm.listen_on(addr.clone()).map_err(|e| match e {
                TransportError::MultiaddrNotSupported(_) => {
                    StartError::UnsupportedListenAddr { addr: addr.clone() }
                }
                TransportError::Other(source) => StartError::Listen {
                    addr: addr.clone(),
                    source,
                },
            })?;
            self.listeners.push(Listener {
                id,
                requested: addr.clone(),
                specific: is_specific(addr),
                bound: Vec::new(),
            });
        }
        for addr in &self.external {
            info!(%addr, "external address (from configuration)");
            swarm.add_external_address(addr.clone());
        }
        if self.fallback_external {
            if self.listeners.iter().any(|l| l.specific) {
                warn!(
                    "no external address configured; using the bound addresses of the specific \
                     listen addresses instead. Peers outside this network can only use the \
                     relay if those addresses reach it: pass --external-addr"
                );
            } else {
                warn!(
                    "no external address configured and every listen address is a wildcard: \
                     the relay will refuse every reservation. Pass --external-addr"
                );
            }
        }
        Ok(())
    }

    pub(super) async fn await_listen_addrs(
        &mut self,
        swarm: &mut Swarm<RelayBehaviour>,
    ) -> Result<(), StartError> {
        let deadline = tokio::time::sleep(LISTEN_TIMEOUT);
        tokio::pin!(deadline);
        while let Some(waiting) = self.listeners.iter().find(|l| l.bound.is_empty()) {
            let waiting = waiting.requested.clone();
            tokio::select! {
                () = &mut deadline => {
                    let timeout = LISTEN_TIMEOUT;
                    return Err(StartError::ListenTimeout { addr: waiting, timeout });
                }
                event = swarm.select_next_some() => {
                    if let Some(failure) = self.on_event(swarm, event) {
                        return Err(StartError::ListenerClosed {
                            addr: failure.addr,
                            source: failure.source,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn stats(&self) -> RelayStats {
        RelayStats {
            reservations: self.peers.values().map(|p| p.reservations).sum(),
            circuits: self.circuits,
            rendezvous_registrations: self.registrations.len(),
            connections: self.connections,
        }
    }

    fn publish_addrs(&self) {
        let mut addrs: Vec<Multiaddr> = Vec::new();
        let bound = self.listeners.iter().flat_map(|l| l.bound.iter());
        for addr in self.external.iter().chain(bound) {
            let full = addr.clone().with(Protocol::P2p(self.peer_id));
            if !addrs.contains(&full) {
                addrs.push(full);
            }
        }
        self.addrs_tx.send_if_modified(|current| {
            let changed = *current != addrs;
            if changed {
                *current = addrs;
            }
            changed
        });
    }

    fn on_command(&self, command: Command) {
        match command {
            Command::Stats { reply } => {
                // The caller may have given up waiting; nothing to do then.
                let _ = reply.send(self.stats());
            }
        }
    }

    /// Updates the counters and addresses from one swarm event. Returns the listener that
    /// closed, if any.
    fn on_event(
        &mut self,
        swarm: &mut Swarm<RelayBehaviour>,
        event: SwarmEvent<RelayBehaviourEvent>,
    ) -> Option<ListenerFailure> {
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                info!(%address, "listening");
                let listener = self.listeners.iter_mut().find(|l| l.id == listener_id)?;
                listener.bound.push(address.clone());
                if self.fallback_external && listener.specific {
                    info!(%address, "external address (fallback: bound listen address)");
                    swarm.add_external_address(address);
                }
                self.publish_addrs();
            }
            SwarmEvent::ExpiredListenAddr {
                listener_id,
                address,
            } => {
                info!(%address, "no longer listening");
                let listener = self.listeners.iter_mut().find(|l| l.id == listener_id)?;
                listener.bound.retain(|a| *a != address);
                if self.fallback_external && listener.specific {
                    swarm.remove_external_address(&address);
                }
                self.publish_addrs();
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                let index = self.listeners.iter().position(|l| l.id == listener_id)?;
                let listener = self.listeners.remove(index);
                if self.fallback_external && listener.specific {
                    for address in &addresses {
                        swarm.remove_external_address(address);
                    }
                }
                self.publish_addrs();
                return Some(ListenerFailure {
                    addr: listener.requested,
                    source: reason.err(),
                });
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                warn!(?listener_id, %error, "listener error");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                let addr = endpoint.get_remote_address();
                debug!(peer = %peer_id, %addr, "connection established");
                self.connections += 1;
                self.peers.entry(peer_id).or_default().connections += 1;
            }
            SwarmEvent::ConnectionClosed { peer_id, cause, .. } => {
                debug!(peer = %peer_id, ?cause, "connection closed");
                self.connections = self.connections.saturating_sub(1);
                if let Some(counts) = self.peers.get_mut(&peer_id) {
                    counts.connections = counts.connections.saturating_sub(1);
                    if counts.connections == 0 {
                        self.peers.remove(&peer_id);
                    } else {
                        // A reservation lives on one connection: at most one per connection.
                        counts.reservations = counts.reservations.min(counts.connections);
                    }
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                debug!(addr = %send_back_addr, %error, "incoming connection failed");
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                debug!(%address, "external address confirmed");
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
        None
    }

    fn on_behaviour_event(&mut self, event: RelayBehaviourEvent) {
        match event {
            RelayBehaviourEvent::Relay(event) => self.on_relay_event(event),
            RelayBehaviourEvent::Rendezvous(event) => self.on_rendezvous_event(event),
            RelayBehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                // `info.observed_addr` is deliberately ignored: a peer's claim about our address
                // is not evidence of it. External addresses come from configuration only.
                debug!(peer = %peer_id, agent = %info.agent_version, "identified peer");
            }
            RelayBehaviourEvent::Identify(_) | RelayBehaviourEvent::Ping(_) => {}
            RelayBehaviourEvent::Limits(never) => match never {},
        }
    }

    fn on_relay_event(&mut self, event: relay::Event) {
        match event {
            relay::Event::ReservationReqAccepted {
                src_peer_id,
                renewed,
            } => {
                info!(peer = %src_peer_id, renewed, "reservation accepted");
                if !renewed && let Some(counts) = self.peers.get_mut(&src_peer_id) {
                    counts.reservations = (counts.reservations + 1).min(counts.connections);
                }
            }
            relay::Event::ReservationTimedOut { src_peer_id } => {
                info!(peer = %src_peer_id, "reservation timed out");
                if let Some(counts) = self.peers.get_mut(&src_peer_id) {
                    counts.reservations = counts.reservations.saturating_sub(1);
                }
            }
            relay::Event::ReservationClosed { src_peer_id } => {
                // libp2p-relay 0.22 emits this for *every* closed connection of a peer, with or
                // without a reservation, and without saying which connection. The count is
                // therefore kept from ConnectionClosed: at most one reservation per connection.
                debug!(peer = %src_peer_id, "reservation closed (or connection without one)");
            }
            relay::Event::ReservationReqDenied {
                src_peer_id,
                status,
            } => {
                info!(peer = %src_peer_id, ?status, "reservation denied");
            }
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                info!(src = %src_peer_id, dst = %dst_peer_id, "circuit opened");
                self.circuits += 1;
            }
            relay::Event::CircuitClosed {
                src_peer_id,
                dst_peer_id,
                error,
            } => {
                let error = error.map(|e| e.to_string());
                info!(src = %src_peer_id, dst = %dst_peer_id, ?error, "circuit closed");
                self.circuits = self.circuits.saturating_sub(1);
            }
            relay::Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                status,
            } => {
                info!(src = %src_peer_id, dst = %dst_peer_id, ?status, "circuit denied");
            }
            relay::Event::StatusChanged { status } => {
                info!(?status, "relay service status changed");
            }
            other => debug!(event = ?other, "relay event"),
        }
    }

    fn on_rendezvous_event(&mut self, event: rendezvous::server::Event) {
        use rendezvous::server::Event;
        match event {
            Event::PeerRegistered { peer, registration } => {
                let (namespace, ttl) = (&registration.namespace, registration.ttl);
                debug!(%peer, %namespace, ttl, "registered");
                let expires = Instant::now() + Duration::from_secs(registration.ttl);
                self.registrations
                    .insert((peer, registration.namespace), expires);
            }
            Event::PeerUnregistered { peer, namespace } => {
                debug!(%peer, %namespace, "unregistered");
                self.registrations.remove(&(peer, namespace));
            }
            Event::RegistrationExpired(registration) => {
                // libp2p-rendezvous 0.18 also reports the expiry of a registration that a
                // re-registration replaced; only drop ours if it is the one due now.
                let key = (registration.record.peer_id(), registration.namespace);
                if let Some(expires) = self.registrations.get(&key)
                    && *expires <= Instant::now() + REGISTRATION_EXPIRY_SLACK
                {
                    debug!(peer = %key.0, namespace = %key.1, "registration expired");
                    self.registrations.remove(&key);
                }
            }
            Event::PeerNotRegistered {
                peer,
                namespace,
                error,
            } => {
                info!(%peer, %namespace, ?error, "registration refused");
            }
            Event::DiscoverServed { .. } | Event::DiscoverNotServed { .. } => {}
        }
    }

    /// Stops listening, asks every connection to close and waits up to [`SHUTDOWN_GRACE`].
    async fn close(&mut self, swarm: &mut Swarm<RelayBehaviour>) -> RelayStats {
        for listener in std::mem::take(&mut self.listeners) {
            swarm.remove_listener(listener.id);
        }
        let peers: Vec<PeerId> = swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = swarm.disconnect_peer_id(peer);
        }
        let deadline = tokio::time::sleep(SHUTDOWN_GRACE);
        tokio::pin!(deadline);
        while self.connections > 0 {
            tokio::select! {
                () = &mut deadline => {
                    warn!(connections = self.connections, "connections still open at shutdown");
                    break;
                }
                event = swarm.select_next_some() => {
                    let _ = self.on_event(swarm, event);
                }
            }
        }
        let stats = self.stats();
        info!(?stats, "relay stopped");
        stats
    }
}

pub(super) async fn run_actor(
    mut swarm: Swarm<RelayBehaviour>,
    mut state: State,
    mut commands: mpsc::Receiver<Command>,
    mut shutdown: oneshot::Receiver<()>,
) -> Result<RelayStats, RunError> {
    loop {
        tokio::select! {
            biased;
            // A send or a dropped `Relay` both mean stop.
            _ = &mut shutdown => break,
            Some(command) = commands.recv() => state.on_command(command),
            event = swarm.select_next_some() => {
                if let Some(failure) = state.on_event(&mut swarm, event) {
                    let error = failure.source.as_ref().map(ToString::to_string);
                    warn!(addr = %failure.addr, ?error, "listener closed");
                    if state.listeners.is_empty() {
                        state.close(&mut swarm).await;
                        return Err(RunError::ListenersClosed);
                    }
                }
            }
        }
    }
    Ok(state.close(&mut swarm).await)
}
