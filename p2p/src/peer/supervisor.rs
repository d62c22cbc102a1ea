//! The network side of a `Peer`: [`Peer::start`] brings the node up and spawns the
//! supervisor, which reacts to connections (opening one sync session per trusted peer),
//! redials with backoff, records what peers say, and joins every task it spawned when the
//! network stops ([`Peer::shutdown`]).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use errand_core::DeviceKind;
use futures::StreamExt;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{
    clock::now_ms,
    net::node::{self, NodeConfig, NodeEvent, NodeHandle},
    replica::Binding,
    sync::session::{self, SYNC_PROTOCOL, SessionCtx, SessionEvent},
};

use super::{
    handle::{Live, Net, Peer},
    port,
    types::{PeerError, PeerEvent},
};

/// First redial delay after a disconnect or failed dial.
const BACKOFF_START: Duration = Duration::from_secs(1);
/// Redial delay cap: 30 s keeps a phone that comes back on the network syncing within half a
/// minute, while a desktop that is off costs one dial every 30 s.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often the dialer looks for peers due a redial.
const DIAL_TICK: Duration = Duration::from_millis(500);
/// Delay before reopening a sync stream that ended while the connection stayed up.
const REOPEN_DELAY: Duration = Duration::from_secs(1);
/// Remembered addresses per peer: enough for a LAN address, a VPN one and a relay circuit.
const MAX_REMEMBERED_ADDRS: usize = 8;
/// Session events buffered to the supervisor.
const SESSION_EVENT_CAPACITY: usize = 256;
/// Blob streams served at once, over all peers. A phone fetches one blob at a time and a
/// desktop a task's attachments one by one; 16 leaves room for several phones while a
/// peer that opens streams in a loop cannot make the desktop read its disk without limit.
const MAX_BLOB_STREAMS: usize = 16;
/// `shutdown` waits at most this long for sessions and the node to close.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

impl Peer {
    /// Starts the network: listen, dial, discover, sync. Returns once listening.
    pub async fn start(&self) -> Result<(), PeerError> {
        let mut net = self.inner.net.lock().await;
        if net.is_some() {
            return Ok(());
        }
        let (relays, relay_only) = (self.relays().await?, self.relay_only());
        let namespace = self.namespace().await?;
        let listen = self.inner.config.listen.clone();
        let node_config = |listen| NodeConfig {
            listen,
            mdns: self.inner.config.mdns,
            relays: relays.clone(),
            namespace: namespace.clone(),
            relay_only,
            pairing_grace: crate::pair::STEP_TIMEOUT,
        };
        let spawn =
            |config| node::spawn(self.inner.keypair.clone(), self.inner.gate.clone(), config);
        // Last run's port first, so the addresses paired devices remember stay good.
        let kept = self
            .inner
            .replica
            .store_blocking(|s| s.meta(port::META_LISTEN_PORT))
            .await??
            .and_then(|b| port::decode(&b));
        let (node, node_events, node_task) = match kept.and_then(|p| port::with_port(&listen, p)) {
            Some(same) => match spawn(node_config(same)).await {
                Ok(spawned) => spawned,
                Err(e) => {
                    tracing::info!(error = %e, "last run's port is taken; listening on another");
                    spawn(node_config(listen.clone())).await?
                }
            },
            None => spawn(node_config(listen.clone())).await?,
        };
        if let Some(p) = port::port_to_keep(&listen, &node.listen_addrs().await?)
            && kept != Some(p)
        {
            self.inner
                .replica
                // A hint, not a fact: not worth an fsync of its own (it is made durable by the
                // next durable commit; lost in a crash, the next start takes a new port).
                .store_blocking(move |s| {
                    s.write_relaxed(|t| t.put_meta(port::META_LISTEN_PORT, &p.to_be_bytes()))
                })
                .await??;
        }
        self.inner.view.send_modify(|v| v.node = Some(node.clone()));
        let cancel = CancellationToken::new();
        let (session_tx, session_rx) = mpsc::channel(SESSION_EVENT_CAPACITY);
        let (internal_tx, internal_rx) = mpsc::channel(SESSION_EVENT_CAPACITY);
        let mut incoming = node
            .control()
            .accept(SYNC_PROTOCOL)
            .map_err(|e| PeerError::Invalid(e.to_string()))?;
        let accept_tx = internal_tx.clone();
        let this = self.clone();
        let accept_cancel = cancel.clone();
        let accept = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = accept_cancel.cancelled() => return,
                    next = incoming.next() => {
                        let Some((peer, stream)) = next else { return };
                        // Trust is checked again on every stream: the gate may have admitted
                        // the connection for pairing or as a relay.
                        if !this.is_trusted(&peer) {
                            tracing::info!(%peer, "refused a sync stream from an untrusted peer");
                            drop(stream);
                            continue;
                        }
                        let _ = accept_tx.send(Internal::Accepted(peer, stream)).await;
                    }
                }
            }
        });
        let blobs = self.serve_blobs(&node, cancel.clone())?;
        let sup = Supervisor {
            peer: self.clone(),
            node: node.clone(),
            cancel: cancel.clone(),
            session_tx,
            internal_tx,
            sessions: HashMap::new(),
            generation: 0,
            backoff: HashMap::new(),
            tasks: tokio::task::JoinSet::new(),
        };
        let sup_task = tokio::spawn(sup.run(node_events, session_rx, internal_rx));
        let mut tasks = vec![accept, blobs, sup_task, node_task];
        if self.kind() == DeviceKind::Desktop {
            let desk = crate::pair::Desk {
                replica: self.replica().clone(),
                gate: self.gate().clone(),
                me: self.device_info(),
            };
            tasks.push(
                crate::pair::serve(desk, &node, cancel.clone())
                    .map_err(|e| PeerError::Invalid(e.to_string()))?,
            );
        }
        *net = Some(Net {
            node,
            cancel,
            tasks,
        });
        Ok(())
    }

    /// Accepts `/errand/blob/1` streams from trusted peers and serves each until it closes,
    /// at most [`MAX_BLOB_STREAMS`] at once (more are dropped).
    fn serve_blobs(
        &self,
        node: &NodeHandle,
        cancel: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, PeerError> {
        let mut incoming = node
            .control()
            .accept(crate::blob::BLOB_PROTOCOL)
            .map_err(|e| PeerError::Invalid(e.to_string()))?;
        let this = self.clone();
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_BLOB_STREAMS));
        let referenced = crate::blob::protocol::Referenced::new(self.replica().clone());
        Ok(tokio::spawn(async move {
            let mut streams = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    Some(_) = streams.join_next(), if !streams.is_empty() => {}
                    next = incoming.next() => {
                        let Some((peer, stream)) = next else { break };
                        if !this.is_trusted(&peer) {
                            tracing::info!(%peer, "refused a blob stream from an untrusted peer");
                            continue;
                        }
                        let Ok(permit) = permits.clone().try_acquire_owned() else {
                            tracing::info!(%peer, "refused a blob stream: too many at once");
                            continue;
                        };
                        let (referenced, store) = (referenced.clone(), this.blobs());
                        let cancel = cancel.clone();
                        streams.spawn(async move {
                            let _permit = permit;
                            tokio::select! {
                                _ = cancel.cancelled() => {}
                                r = crate::blob::serve(stream, peer, referenced, store) => {
                                    if let Err(e) = r {
                                        tracing::debug!(%peer, error = %e, "blob stream ended");
                                    }
                                }
                            }
                        }.instrument(tracing::info_span!("blob_serve")));
                    }
                }
            }
            streams.shutdown().await;
        }))
    }

    /// Stops the network: closes sessions and connections, joins every task. Bounded by
    /// [`SHUTDOWN_TIMEOUT`]; whatever is left after that is aborted.
    pub async fn shutdown(&self) {
        let Some(net) = self.inner.net.lock().await.take() else {
            return;
        };
        self.inner.view.send_modify(|v| v.node = None);
        net.cancel.cancel();
        let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, net.node.shutdown()).await;
        // Nothing is connected any more; a later `start` must redial everyone. What each
        // peer's sessions counted stays: it is this process's.
        self.inner.view.send_modify(|v| {
            for l in v.peers.values_mut() {
                (l.connected, l.relayed, l.circuit_bytes, l.in_sync) = (false, false, None, false);
            }
        });
        for task in net.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(SHUTDOWN_TIMEOUT, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

enum Internal {
    Accepted(PeerId, libp2p::Stream),
    Opened(PeerId, u64, libp2p::Stream),
    Ended(PeerId, u64),
    Reopen(PeerId),
}

struct Backoff {
    next: Instant,
    delay: Duration,
}

struct Supervisor {
    peer: Peer,
    node: NodeHandle,
    cancel: CancellationToken,
    session_tx: mpsc::Sender<SessionEvent>,
    internal_tx: mpsc::Sender<Internal>,
    sessions: HashMap<PeerId, (u64, CancellationToken)>,
    generation: u64,
    backoff: HashMap<PeerId, Backoff>,
    /// Every task the supervisor spawns (sessions, stream openers, reopen timers, store
    /// bookkeeping), joined on shutdown; finished ones are reaped on every dial tick.
    tasks: tokio::task::JoinSet<()>,
}

fn jitter(d: Duration) -> Duration {
    // ±25 %, so peers that lost the same network do not redial in lockstep.
    let f = 0.75 + rand::random::<f64>() * 0.5;
    d.mul_f64(f)
}

impl Supervisor {
    async fn run(
        mut self,
        mut node_events: mpsc::Receiver<NodeEvent>,
        mut session_events: mpsc::Receiver<SessionEvent>,
        mut internal: mpsc::Receiver<Internal>,
    ) {
        let mut tick = tokio::time::interval(DIAL_TICK);
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                Some(ev) = internal.recv() => self.on_internal(ev),
                Some(ev) = session_events.recv() => self.on_session(ev),
                ev = node_events.recv() => match ev {
                    Some(ev) => self.on_node(ev).await,
                    None => break,
                },
                _ = tick.tick() => {
                    while self.tasks.try_join_next().is_some() {}
                    self.redial().await
                }
            }
        }
        for (_, (_, c)) in self.sessions.drain() {
            c.cancel();
        }
        // Let sessions see the cancel and finish their last write, then join them.
        let join = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_TIMEOUT / 2, join)
            .await
            .is_err()
        {
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
    }

    /// Changes what the view says of `peer` (the one place it is written while running).
    fn set_live(&self, peer: PeerId, f: impl FnOnce(&mut Live)) {
        self.peer
            .inner
            .view
            .send_modify(|v| f(v.peers.entry(peer).or_default()));
    }

    /// The byte counters of `peer`'s sessions.
    fn traffic(&self, peer: PeerId) -> std::sync::Arc<crate::sync::session::Traffic> {
        let mut traffic = None;
        self.set_live(peer, |l| traffic = Some(l.traffic.clone()));
        traffic.unwrap_or_default()
    }

    fn opener(&self, peer: &PeerId) -> bool {
        // Exactly one side opens the sync stream: the one with the smaller PeerId.
        self.peer.peer_id().to_bytes() < peer.to_bytes()
    }

    fn start_session(&mut self, peer: PeerId, stream: libp2p::Stream) {
        if let Some((_, old)) = self.sessions.remove(&peer) {
            old.cancel();
        }
        self.generation += 1;
        let generation = self.generation;
        let cancel = self.cancel.child_token();
        self.sessions.insert(peer, (generation, cancel.clone()));
        let ctx = SessionCtx {
            replica: self.peer.replica().clone(),
            me: self.peer.device_info(),
            events: self.session_tx.clone(),
            traffic: self.traffic(peer),
            may_adopt: self.peer.kind() == DeviceKind::Phone,
            circuit: self.peer.circuit(&peer),
        };
        let internal = self.internal_tx.clone();
        self.tasks.spawn(
            async move {
                match session::run(stream, peer, ctx, cancel.clone()).await {
                    Ok(()) => tracing::debug!(%peer, "sync session ended"),
                    // Stopping (shutdown, or a newer session of this peer) closes the stream
                    // under the session: that is no fault.
                    Err(e) if cancel.is_cancelled() => {
                        tracing::debug!(%peer, error = %e, "sync session closed while stopping");
                    }
                    Err(e) => tracing::warn!(%peer, error = %e, "sync session closed"),
                }
                let _ = internal.send(Internal::Ended(peer, generation)).await;
            }
            .instrument(tracing::info_span!("session", %peer)),
        );
    }

    fn open_stream(&mut self, peer: PeerId) {
        self.generation += 1;
        let generation = self.generation;
        self.sessions
            .insert(peer, (generation, self.cancel.child_token()));
        let mut control = self.node.control();
        let internal = self.internal_tx.clone();
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            let opened = tokio::select! {
                _ = cancel.cancelled() => return,
                opened = control.open_stream(peer, SYNC_PROTOCOL) => opened,
            };
            match opened {
                Ok(stream) => {
                    let _ = internal
                        .send(Internal::Opened(peer, generation, stream))
                        .await;
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "could not open a sync stream");
                    let _ = internal.send(Internal::Ended(peer, generation)).await;
                }
            }
        });
    }

    fn on_internal(&mut self, ev: Internal) {
        match ev {
            Internal::Accepted(peer, stream) => self.start_session(peer, stream),
            Internal::Opened(peer, generation, stream) => {
                if self
                    .sessions
                    .get(&peer)
                    .is_some_and(|(g, _)| *g == generation)
                {
                    self.start_session(peer, stream);
                }
            }
            Internal::Ended(peer, generation) => {
                if self
                    .sessions
                    .get(&peer)
                    .is_some_and(|(g, _)| *g == generation)
                {
                    self.sessions.remove(&peer);
                    self.set_live(peer, |l| l.in_sync = false);
                    if self.opener(&peer) && self.peer.is_connected(&peer) {
                        let tx = self.internal_tx.clone();
                        let cancel = self.cancel.clone();
                        self.tasks.spawn(async move {
                            tokio::select! {
                                // Shutdown does not wait out the delay.
                                _ = cancel.cancelled() => {}
                                _ = tokio::time::sleep(REOPEN_DELAY) => {
                                    let _ = tx.send(Internal::Reopen(peer)).await;
                                }
                            }
                        });
                    }
                }
            }
            Internal::Reopen(peer) => {
                if !self.sessions.contains_key(&peer)
                    && self.peer.is_connected(&peer)
                    && self.peer.is_trusted(&peer)
                {
                    self.open_stream(peer);
                }
            }
        }
    }

    fn on_session(&mut self, ev: SessionEvent) {
        match ev {
            SessionEvent::Merged { peer, tasks } => {
                let _ = self
                    .peer
                    .inner
                    .events
                    .send(PeerEvent::Merged { peer, tasks });
            }
            SessionEvent::InSync { peer } => {
                self.set_live(peer, |l| l.in_sync = true);
                let _ = self.peer.inner.events.send(PeerEvent::InSync { peer });
                let replica = self.peer.replica().clone();
                self.tasks.spawn(async move {
                    let id = peer.to_base58();
                    let _ = replica
                        .store_blocking(move |s| {
                            if let Ok(Some(mut t)) = s.trusted_peer(&id) {
                                let now = now_ms();
                                t.last_sync_at = Some(now);
                                t.last_seen = Some(now);
                                // Bookkeeping: not worth a disk flush per pushed task.
                                let _ = s.write_relaxed(|tx| tx.put_trusted(&t));
                            }
                        })
                        .await;
                });
            }
            SessionEvent::Hello { peer, device, .. } => {
                let Some(device) = device else { return };
                let this = self.peer.clone();
                self.tasks.spawn(async move {
                    // The owner records a device trusted by hand the first time it says
                    // who it is; a paired device's actor was bound by pairing, and a hello
                    // never changes it.
                    if this.kind() == DeviceKind::Desktop
                        && let Err(e) = this
                            .replica()
                            .ensure_device(
                                peer,
                                device.name.clone(),
                                device.kind,
                                device.actor.clone(),
                                Binding::FirstHello,
                                now_ms(),
                            )
                            .await
                    {
                        tracing::warn!(%peer, error = %e, "could not record the device");
                    }
                    let id = peer.to_base58();
                    let _ = this
                        .replica()
                        .store_blocking(move |s| {
                            if let Ok(Some(mut t)) = s.trusted_peer(&id)
                                && t.name != device.name
                            {
                                t.name = device.name;
                                let _ = s.write(|tx| tx.put_trusted(&t));
                            }
                        })
                        .await;
                });
            }
        }
    }

    async fn on_node(&mut self, ev: NodeEvent) {
        match ev {
            NodeEvent::Connected {
                peer,
                relayed,
                circuit_bytes,
                ..
            } => {
                if !self.peer.is_trusted(&peer) {
                    return;
                }
                self.backoff.remove(&peer);
                self.set_live(peer, |l| {
                    l.connected = true;
                    l.relayed = relayed;
                    l.circuit_bytes = circuit_bytes;
                });
                // A stream the peer opened may have started its session before this event
                // arrived (and taken the previous connection's path): the bound is set here
                // too. A session's first message carries no changes, so it is in place
                // before any part goes out.
                let replica = self.peer.replica().clone();
                self.tasks.spawn(async move {
                    let limit = relayed.then(|| session::part_limit(circuit_bytes));
                    let _ = replica.set_part_limit(peer, limit).await;
                });
                let _ = self
                    .peer
                    .inner
                    .events
                    .send(PeerEvent::Connected { peer, relayed });
                if self.opener(&peer) && !self.sessions.contains_key(&peer) {
                    self.open_stream(peer);
                }
            }
            NodeEvent::Path { peer, relayed } => {
                if self.peer.is_trusted(&peer) {
                    let mut circuit_bytes = None;
                    self.set_live(peer, |l| {
                        l.relayed = relayed;
                        circuit_bytes = l.circuit_bytes;
                    });
                    // Parts are bounded only while every connection to the peer is a circuit.
                    let replica = self.peer.replica().clone();
                    self.tasks.spawn(async move {
                        let limit = relayed.then(|| session::part_limit(circuit_bytes));
                        let _ = replica.set_part_limit(peer, limit).await;
                    });
                }
            }
            NodeEvent::Upgraded { peer } => {
                // The session may sit on a relayed connection we just closed; its stream would
                // not notice. End it: the opener opens a new one on the direct connection.
                if let Some((_, c)) = self.sessions.get(&peer) {
                    tracing::debug!(%peer, "hole punched; restarting the sync session");
                    c.cancel();
                }
            }
            NodeEvent::Disconnected { peer } => {
                self.set_live(peer, |l| {
                    l.connected = false;
                    l.in_sync = false;
                });
                if let Some((_, c)) = self.sessions.remove(&peer) {
                    c.cancel();
                }
                if self.peer.is_trusted(&peer) {
                    self.backoff.insert(
                        peer,
                        Backoff {
                            next: Instant::now() + jitter(BACKOFF_START),
                            delay: BACKOFF_START,
                        },
                    );
                    let _ = self
                        .peer
                        .inner
                        .events
                        .send(PeerEvent::Disconnected { peer });
                }
            }
            NodeEvent::Discovered { peer, addr } => {
                if self.peer.is_trusted(&peer) && !self.peer.is_connected(&peer) {
                    let _ = self.node.dial(peer, vec![addr]).await;
                }
            }
            NodeEvent::PeerListenAddrs { peer, addrs } => {
                if !self.peer.is_trusted(&peer) || addrs.is_empty() {
                    return;
                }
                let id = peer.to_base58();
                let replica = self.peer.replica().clone();
                self.tasks.spawn(async move {
                    let _ = replica
                        .store_blocking(move |s| {
                            let Ok(Some(mut t)) = s.trusted_peer(&id) else {
                                return;
                            };
                            let mut merged: Vec<String> =
                                addrs.iter().map(ToString::to_string).collect();
                            for a in &t.addrs {
                                if !merged.contains(a) {
                                    merged.push(a.clone());
                                }
                            }
                            merged.truncate(MAX_REMEMBERED_ADDRS);
                            if merged != t.addrs {
                                t.addrs = merged;
                                t.last_seen = Some(now_ms());
                                let _ = s.write(|tx| tx.put_trusted(&t));
                            }
                        })
                        .await;
                });
            }
            NodeEvent::NewListenAddr(_) => {}
            NodeEvent::RelayReady(relay) => {
                // A relay came back (or we reached it for the first time): the peers we lost
                // with it are dialed again now, not after their grown backoff.
                tracing::debug!(%relay, "relay ready; redialing peers now");
                self.backoff.clear();
                self.redial().await;
            }
        }
    }

    async fn redial(&mut self) {
        let Ok(trusted) = self.peer.trusted_peers().await else {
            return;
        };
        let now = Instant::now();
        for t in trusted {
            if t.revoked || t.addrs.is_empty() {
                continue;
            }
            let Ok(peer) = t.id.as_str().parse::<PeerId>() else {
                continue;
            };
            if self.peer.is_connected(&peer) {
                continue;
            }
            let b = self.backoff.entry(peer).or_insert(Backoff {
                next: now,
                delay: BACKOFF_START,
            });
            if b.next > now {
                continue;
            }
            b.delay = (b.delay * 2).min(BACKOFF_MAX);
            b.next = now + jitter(b.delay);
            let addrs: Vec<Multiaddr> = t.addrs.iter().filter_map(|a| a.parse().ok()).collect();
            if let Err(e) = self.node.dial(peer, addrs).await {
                tracing::debug!(%peer, error = %e, "redial failed");
            }
        }
    }
}
