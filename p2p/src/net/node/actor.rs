//! The node actor itself: it owns the swarm, answers [`Command`]s, turns swarm events into
//! [`NodeEvent`]s, and keeps relays and hole punches going. [`spawn`] builds and starts it.

use std::{collections::HashMap, time::Duration};

use futures::StreamExt;
use libp2p::{
    Multiaddr, PeerId, Swarm, dcutr, identify, identity, mdns,
    multiaddr::Protocol,
    relay, rendezvous,
    swarm::{
        ConnectionId, SwarmEvent,
        dial_opts::{DialOpts, PeerCondition},
    },
};
use tokio::sync::{mpsc, oneshot};

use super::{
    COMMAND_CAPACITY, Command, ConnInfo, EVENT_CAPACITY, NodeConfig, NodeError, NodeEvent,
    NodeHandle,
};
use crate::{
    net::{
        behaviour::{self, Behaviour, BehaviourEvent},
        relay_client::{Relays, is_circuit},
    },
    sync::gate::SharedGate,
};

/// The relay of a circuit address (`…/p2p/<relay>/p2p-circuit/…`).
fn relay_of(addr: &Multiaddr) -> Option<PeerId> {
    let mut relay = None;
    for p in addr.iter() {
        match p {
            Protocol::P2p(id) => relay = Some(id),
            Protocol::P2pCircuit => return relay,
            _ => {}
        }
    }
    None
}

/// True when `peer` has an open connection and none of them is direct.
fn relayed_only(conns: &HashMap<PeerId, HashMap<ConnectionId, bool>>, peer: &PeerId) -> bool {
    conns
        .get(peer)
        .is_some_and(|cs| !cs.is_empty() && cs.values().all(|relayed| *relayed))
}

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// Builds the swarm and spawns the node actor. Returns once every listener is bound.
pub async fn spawn(
    keypair: identity::Keypair,
    gate: SharedGate,
    config: NodeConfig,
) -> Result<
    (
        NodeHandle,
        mpsc::Receiver<NodeEvent>,
        tokio::task::JoinHandle<()>,
    ),
    NodeError,
> {
    let enable_mdns = config.mdns && !config.relay_only;
    let enable_dcutr = !config.relay_only;
    let relay_only = config.relay_only;
    let relays = Relays::new(&config.relays, config.namespace.clone());
    gate.add_infra(relays.peers());
    let gate_handle = gate.clone();
    let mut swarm = behaviour::build_swarm(keypair, gate, enable_mdns, enable_dcutr, relay_only)
        .map_err(|e| NodeError::Build(e.to_string()))?;

    let mut pending = 0usize;
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NodeError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        pending += 1;
    }
    let mut listen_addrs = Vec::new();
    // Wait until every listener reports an address (or fails), so callers can print them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pending > 0 {
        let ev = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .map_err(|_| NodeError::Build("listeners did not come up within 10 s".into()))?;
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                listen_addrs.push(address);
                pending = pending.saturating_sub(1);
            }
            SwarmEvent::ListenerClosed {
                addresses, reason, ..
            } => {
                return Err(NodeError::Listen {
                    addr: addresses.first().cloned().unwrap_or(Multiaddr::empty()),
                    reason: format!("{reason:?}"),
                });
            }
            SwarmEvent::ListenerError { error, .. } => {
                return Err(NodeError::Build(error.to_string()));
            }
            _ => {}
        }
    }

    let peer_id = *swarm.local_peer_id();
    let control = swarm.behaviour().stream.new_control();
    let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_CAPACITY);
    let actor = NodeActor {
        swarm,
        rx,
        events: ev_tx,
        listen_addrs,
        conns: HashMap::new(),
        relays,
        relay_only: config.relay_only,
        gate: gate_handle,
        superseded: Vec::new(),
        closing: HashMap::new(),
        connecting: HashMap::new(),
        pairing_grace: config.pairing_grace,
        circuit_limits: HashMap::new(),
        punch_retries: HashMap::new(),
        held_dials: HashMap::new(),
    };
    let task = tokio::spawn(actor.run());
    Ok((
        NodeHandle {
            tx,
            control,
            peer_id,
        },
        ev_rx,
        task,
    ))
}

struct NodeActor {
    swarm: Swarm<Behaviour>,
    rx: mpsc::Receiver<Command>,
    events: mpsc::Sender<NodeEvent>,
    listen_addrs: Vec<Multiaddr>,
    conns: HashMap<PeerId, HashMap<ConnectionId, bool>>,
    relays: Relays,
    relay_only: bool,
    gate: SharedGate,
    /// Relayed connections a hole punch replaced, closed once their grace ends.
    superseded: Vec<(PeerId, ConnectionId, tokio::time::Instant)>,
    /// Callers of [`NodeHandle::disconnect`] waiting for a peer's last connection to close.
    closing: HashMap<PeerId, Vec<oneshot::Sender<()>>>,
    /// Callers of [`NodeHandle::wait_connected`] waiting for a connection to a peer.
    connecting: HashMap<PeerId, Vec<oneshot::Sender<()>>>,
    /// See [`NodeConfig::pairing_grace`].
    pairing_grace: Duration,
    /// Byte limits of circuits, as relays state them: by the relay for circuits we open
    /// through it, by the source peer for a circuit it opened to us (taken when its
    /// connection is established). At most [`MAX_CIRCUIT_LIMITS`] entries.
    circuit_limits: HashMap<PeerId, u64>,
    /// Peers whose hole punch failed and that are still relayed only.
    punch_retries: HashMap<PeerId, PunchRetry>,
    /// Dials through a relay of ours that was not connected yet, by relay and then peer: made
    /// once the relay's connection is established. libp2p's relay client cancels a circuit
    /// dial asked for while the relay is still being dialed, and the caller then waited for a
    /// redial after the reservation (1.5 s of a fetch's first second and a half through a
    /// relay, errand-bench P10). At most [`MAX_HELD_DIALS`] in all.
    held_dials: HashMap<PeerId, HashMap<PeerId, Vec<Multiaddr>>>,
}

/// Circuit dials held for relays that are not connected yet, at most; past this the oldest
/// are forgotten (their callers time out and ask again).
const MAX_HELD_DIALS: usize = 64;

/// Circuit limits remembered at once: a few relays and the peers being connected through
/// them; past this, the map starts over (a limit missed only means no check).
const MAX_CIRCUIT_LIMITS: usize = 64;

/// How often the node does relay upkeep (reserve, register, discover, retry hole punches).
/// Cheap: most ticks do nothing.
const RELAY_TICK: Duration = Duration::from_secs(1);

/// First pause before another hole punch, after one failed while the peer is still reachable
/// only through a relay. Punches fail for passing reasons too (on a loaded machine the DCUtR
/// sync and the two dials drift apart), and libp2p's DCUtR never tries again on the same
/// relayed connection: without a retry the peers would stay relayed for as long as it lasts.
const PUNCH_RETRY_START: Duration = Duration::from_secs(2);
/// Cap of the hole-punch retry backoff. Behind a NAT that never lets a punch through (one that
/// maps every destination to a new port) a retry costs one idle circuit through the relay, for
/// a minute, every 5 min.
const PUNCH_RETRY_MAX: Duration = Duration::from_secs(300);

/// Hole-punch retries of one peer that is connected through a relay only.
#[derive(Debug)]
struct PunchRetry {
    /// When to try again.
    due: tokio::time::Instant,
    /// The pause after that try.
    delay: Duration,
}

impl NodeActor {
    async fn run(mut self) {
        let mut relay_tick = tokio::time::interval(RELAY_TICK);
        loop {
            tokio::select! {
                biased;
                cmd = self.rx.recv() => match cmd {
                    Some(Command::Shutdown { reply }) => {
                        self.close_all().await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(cmd) => self.on_command(cmd),
                    None => {
                        self.close_all().await;
                        return;
                    }
                },
                ev = self.swarm.select_next_some() => self.on_event(ev).await,
                _ = relay_tick.tick() => {
                    self.relays.tick(&mut self.swarm, true);
                    for peer in self.close_superseded() {
                        self.emit(NodeEvent::Upgraded { peer }).await;
                    }
                    self.retry_punches();
                }
            }
        }
    }

    /// Closes the superseded relayed connections whose grace has ended; returns their peers.
    fn close_superseded(&mut self) -> Vec<PeerId> {
        let now = tokio::time::Instant::now();
        let swarm = &mut self.swarm;
        let mut closed = Vec::new();
        self.superseded.retain(|(peer, id, due)| {
            if *due > now {
                return true;
            }
            if swarm.close_connection(*id) && !closed.contains(peer) {
                closed.push(*peer);
            }
            false
        });
        closed
    }

    /// A hole punch to `peer` failed: retries start if the peer is still reachable through a
    /// relay only (a failure while they run changes nothing: they keep their own backoff).
    fn punch_failed(&mut self, peer: PeerId, error: &dcutr::Error) {
        if self.relays.is_relay(&peer) || !relayed_only(&self.conns, &peer) {
            tracing::info!(%peer, %error, "hole punch failed");
            return;
        }
        let retry = self
            .punch_retries
            .entry(peer)
            .or_insert_with(|| PunchRetry {
                due: tokio::time::Instant::now() + PUNCH_RETRY_START,
                delay: PUNCH_RETRY_START,
            });
        let retry_in = retry
            .due
            .saturating_duration_since(tokio::time::Instant::now());
        tracing::info!(%peer, %error, ?retry_in, "hole punch failed; staying on the relay and trying again later");
    }

    /// Starts the hole punches that are due, and forgets the peers that are direct or gone.
    ///
    /// libp2p's DCUtR runs one round (up to three dials) per relayed connection, started by
    /// the side that accepted the circuit. So a retry is a new circuit to the peer through
    /// each relay we hold a reservation on: the peer starts the punch on it. The circuit the
    /// session runs on stays untouched; the new one idles out if the punch fails again.
    fn retry_punches(&mut self) {
        let now = tokio::time::Instant::now();
        let conns = &self.conns;
        self.punch_retries
            .retain(|peer, _| relayed_only(conns, peer));
        let me = *self.swarm.local_peer_id();
        let circuits = self.relays.circuit_addrs(me);
        for (peer, retry) in &mut self.punch_retries {
            if retry.due > now {
                continue;
            }
            retry.delay = (retry.delay * 2).min(PUNCH_RETRY_MAX);
            retry.due = now + retry.delay;
            // `<relay>/p2p-circuit/p2p/<me>` → `<relay>/p2p-circuit/p2p/<peer>`.
            let addrs: Vec<Multiaddr> = circuits
                .iter()
                .map(|a| {
                    let mut a = a.clone();
                    a.pop();
                    a.with(Protocol::P2p(*peer))
                })
                .collect();
            if addrs.is_empty() {
                continue;
            }
            tracing::info!(%peer, next_in = ?retry.delay, "trying the hole punch again over a new relayed connection");
            let opts = DialOpts::peer_id(*peer)
                .condition(PeerCondition::Always)
                .addresses(addrs)
                .build();
            if let Err(error) = self.swarm.dial(opts) {
                tracing::debug!(%peer, %error, "cannot dial a new relayed connection");
            }
        }
    }

    /// Closes every connection and gives the swarm a moment to send the closes.
    async fn close_all(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for p in peers {
            let _ = self.swarm.disconnect_peer_id(p);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while self.swarm.connected_peers().next().is_some() {
            match tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await {
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::WhenConnected { peer, reply } => {
                if self.conns.get(&peer).is_some_and(|c| !c.is_empty()) {
                    let _ = reply.send(());
                } else {
                    let waiters = self.connecting.entry(peer).or_default();
                    // Callers that gave up are dropped here.
                    waiters.retain(|w| !w.is_closed());
                    waiters.push(reply);
                }
            }
            Command::Dial {
                peer,
                mut addrs,
                reply,
            } => {
                if self.relay_only {
                    addrs.retain(is_circuit);
                }
                let before = addrs.len();
                addrs.retain(|a| match relay_of(a) {
                    Some(relay)
                        if self.relays.is_relay(&relay) && !self.swarm.is_connected(&relay) =>
                    {
                        if self.held_dials.values().map(HashMap::len).sum::<usize>()
                            >= MAX_HELD_DIALS
                        {
                            self.held_dials.clear();
                        }
                        let held = self
                            .held_dials
                            .entry(relay)
                            .or_default()
                            .entry(peer)
                            .or_default();
                        if !held.contains(a) {
                            held.push(a.clone());
                        }
                        false
                    }
                    _ => true,
                });
                if addrs.is_empty() && before > 0 {
                    tracing::debug!(%peer, "dial held until the relay is connected");
                    let _ = reply.send(Ok(()));
                    return;
                }
                let opts = DialOpts::peer_id(peer)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .addresses(addrs)
                    .build();
                let r = self.swarm.dial(opts).or_else(|e| match e {
                    libp2p::swarm::DialError::DialPeerConditionFalse(_) => Ok(()),
                    e => Err(NodeError::Dial {
                        peer,
                        reason: e.to_string(),
                    }),
                });
                let _ = reply.send(r);
            }
            Command::Disconnect { peer, reply } => {
                if self.swarm.disconnect_peer_id(peer).is_ok() {
                    self.closing.entry(peer).or_default().push(reply);
                } else {
                    let _ = reply.send(());
                }
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.listen_addrs.clone());
            }
            Command::Connections { reply } => {
                let map = self
                    .conns
                    .iter()
                    .map(|(p, cs)| {
                        let relayed = cs.values().filter(|r| **r).count();
                        (
                            *p,
                            ConnInfo {
                                direct: cs.len() - relayed,
                                relayed,
                            },
                        )
                    })
                    .collect();
                let _ = reply.send(map);
            }
            Command::Shutdown { .. } => {}
            Command::RelayInfo { reply } => {
                let _ = reply.send((self.relays.info(), self.relays.ticket_addrs()));
            }
            Command::AddRelay { addr } => {
                if self.relays.add(&addr) {
                    self.gate.add_infra(self.relays.peers());
                }
            }
            Command::SetNamespace { namespace } => self.relays.set_namespace(namespace),
        }
    }

    async fn emit(&mut self, ev: NodeEvent) {
        let _ = self.events.send(ev).await;
    }

    async fn on_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let addr = endpoint.get_remote_address().clone();
                // Not `is_relayed(&addr)`: an inbound circuit's remote address is just
                // `/p2p/<peer>`; only its local (listen) address names the circuit.
                let relayed = endpoint.is_relayed();
                let circuit_bytes = if !relayed {
                    None
                } else if endpoint.is_dialer() {
                    relay_of(&addr).and_then(|r| self.circuit_limits.get(&r).copied())
                } else {
                    self.circuit_limits.remove(&peer_id)
                };
                tracing::debug!(peer = %peer_id, %addr, relayed, ?circuit_bytes, "connected");
                self.conns
                    .entry(peer_id)
                    .or_default()
                    .insert(connection_id, relayed);
                // Every behaviour has seen the connection by now, so a stream may be asked for.
                for waiter in self.connecting.remove(&peer_id).unwrap_or_default() {
                    let _ = waiter.send(());
                }
                if self.relays.is_relay(&peer_id) {
                    // Reserve now, not at the next tick; then the dials that waited for it.
                    self.relays.on_connected(peer_id);
                    self.relays.tick(&mut self.swarm, true);
                    for (peer, addrs) in self.held_dials.remove(&peer_id).unwrap_or_default() {
                        let opts = DialOpts::peer_id(peer)
                            .condition(PeerCondition::DisconnectedAndNotDialing)
                            .addresses(addrs)
                            .build();
                        if let Err(error) = self.swarm.dial(opts) {
                            tracing::debug!(%peer, %error, "a held dial through the relay failed");
                        }
                    }
                }
                let relayed = relayed_only(&self.conns, &peer_id);
                self.emit(NodeEvent::Connected {
                    peer: peer_id,
                    relayed,
                    circuit_bytes,
                    addr,
                })
                .await;
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                tracing::debug!(peer = %peer_id, ?cause, "connection closed");
                let was_relayed = relayed_only(&self.conns, &peer_id);
                if let Some(cs) = self.conns.get_mut(&peer_id) {
                    cs.remove(&connection_id);
                    if cs.is_empty() {
                        self.conns.remove(&peer_id);
                    }
                }
                let relayed = relayed_only(&self.conns, &peer_id);
                if num_established > 0 && relayed != was_relayed {
                    self.emit(NodeEvent::Path {
                        peer: peer_id,
                        relayed,
                    })
                    .await;
                }
                if num_established == 0 {
                    self.punch_retries.remove(&peer_id);
                    for waiting in self.closing.remove(&peer_id).into_iter().flatten() {
                        let _ = waiting.send(());
                    }
                    if self.relays.is_relay(&peer_id) {
                        self.relays.on_disconnected(peer_id);
                    }
                    self.emit(NodeEvent::Disconnected { peer: peer_id }).await;
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address.clone());
                }
                self.emit(NodeEvent::NewListenAddr(address)).await;
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                let error = reason.err().map(|e| e.to_string());
                self.relays
                    .on_listener_closed(listener_id, error.as_deref());
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(
                relay::client::Event::OutboundCircuitEstablished {
                    relay_peer_id: peer,
                    limit,
                }
                | relay::client::Event::InboundCircuitEstablished {
                    src_peer_id: peer,
                    limit,
                },
            )) => {
                // The relay's per-circuit limit, as it announced it: past it the relay cuts
                // the circuit, and whoever needs the peer dials a new one.
                tracing::info!(
                    %peer,
                    limit_bytes = limit.and_then(|l| l.data_in_bytes()),
                    limit_secs = limit.and_then(|l| l.duration()).map(|d| d.as_secs()),
                    "relayed circuit"
                );
                // A relay with no byte limit announces 0 (libp2p's relay counts 0 as none).
                if let Some(bytes) = limit.and_then(|l| l.data_in_bytes()).filter(|b| *b > 0) {
                    if self.circuit_limits.len() >= MAX_CIRCUIT_LIMITS {
                        self.circuit_limits.clear();
                    }
                    self.circuit_limits.insert(peer, bytes);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(
                relay::client::Event::ReservationReqAccepted { relay_peer_id, .. },
            )) => {
                self.relays.on_reservation(relay_peer_id, &mut self.swarm);
                self.emit(NodeEvent::RelayReady(relay_peer_id)).await;
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rendezvous(
                rendezvous::client::Event::Discovered {
                    rendezvous_node,
                    registrations,
                    cookie,
                },
            )) => {
                let me = *self.swarm.local_peer_id();
                let found = self
                    .relays
                    .on_discovered(rendezvous_node, registrations, cookie);
                for (peer, addrs) in found {
                    if peer == me {
                        continue;
                    }
                    for addr in addrs {
                        if self.relay_only && !is_circuit(&addr) {
                            continue;
                        }
                        self.emit(NodeEvent::Discovered { peer, addr }).await;
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rendezvous(ev)) => {
                tracing::debug!(?ev, "rendezvous");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(_) => {
                    self.punch_retries.remove(&remote_peer_id);
                    // Both connections stay open after a hole punch, and streams would land on
                    // either at random: close the relayed ones (dependency notes, 1.3).
                    let relayed: Vec<ConnectionId> = self
                        .conns
                        .get(&remote_peer_id)
                        .map(|cs| cs.iter().filter(|(_, r)| **r).map(|(id, _)| *id).collect())
                        .unwrap_or_default();
                    let pairing = self.gate.may_be_pairing(&remote_peer_id);
                    tracing::info!(peer = %remote_peer_id, closing = relayed.len(), pairing, "hole punch succeeded; moving to the direct connection");
                    if pairing {
                        let due = tokio::time::Instant::now() + self.pairing_grace;
                        self.superseded
                            .extend(relayed.into_iter().map(|id| (remote_peer_id, id, due)));
                    } else {
                        let mut closed = false;
                        for id in relayed {
                            closed |= self.swarm.close_connection(id);
                        }
                        if closed {
                            self.emit(NodeEvent::Upgraded {
                                peer: remote_peer_id,
                            })
                            .await;
                        }
                    }
                }
                Err(e) => self.punch_failed(remote_peer_id, &e),
            },
            SwarmEvent::IncomingConnectionError { error, .. } => {
                tracing::debug!(%error, "incoming connection refused");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, %error, "dial failed");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (peer, addr) in list {
                    self.emit(NodeEvent::Discovered { peer, addr }).await;
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                let addrs: Vec<Multiaddr> = info
                    .listen_addrs
                    .into_iter()
                    .filter(|a| !is_relayed(a))
                    .collect();
                self.emit(NodeEvent::PeerListenAddrs {
                    peer: peer_id,
                    addrs,
                })
                .await;
            }
            _ => {}
        }
    }
}
