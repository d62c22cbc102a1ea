//! `Peer`: the store, the thread replica and the network node wired together. The desktop and
//! the phone both run one.
//!
//! - [`Peer::open`] opens a home (no network): enough for local commands, which are durable
//!   the moment they return.
//! - [`Peer::start`] brings the node up: listening, dialing trusted peers with backoff, mDNS,
//!   and one long-lived sync session per connected trusted peer.
//! - [`Peer::events`] reports connections, merged changes (with task ids) and "in sync".

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use errand_core::{DeviceId, DeviceKind, EventKind, MessageKind, TaskId, ThreadId};
use errand_crdt::{NewTask, Store, StoreError, ThreadGenesis, TrustedPeer};
use futures::StreamExt;
use libp2p::{Multiaddr, PeerId, identity};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{
    gate::{GateState, SharedGate},
    node::{self, NodeConfig, NodeEvent, NodeHandle},
    replica::{Binding, Replica, ReplicaError},
    session::{self, DeviceInfo, SYNC_PROTOCOL, SessionCtx, SessionEvent, Traffic},
};

/// Store key of the node's libp2p keypair (protobuf encoding).
const META_IDENTITY: &str = "identity";
/// Store key of this device's name.
const META_NAME: &str = "name";
/// Store key of the relays this home uses (JSON list of multiaddrs).
const META_RELAYS: &str = "relays";

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
/// Peer events buffered per subscriber. A subscriber that lags gets `Lagged` and rescans.
const EVENT_CAPACITY: usize = 1024;
/// Session events buffered to the supervisor.
const SESSION_EVENT_CAPACITY: usize = 256;
/// `shutdown` waits at most this long for sessions and the node to close.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Peer::disconnect`] waits for the connections to close. Closing is local (the
/// muxer says goodbye and the socket closes), so this only bounds a stuck transport.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How to open a peer.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The home directory.
    pub home: PathBuf,
    /// Desktop or phone.
    pub kind: DeviceKind,
    /// This device's name (kept from the last run when `None`).
    pub name: Option<String>,
    /// Where to listen.
    pub listen: Vec<Multiaddr>,
    /// LAN discovery.
    pub mdns: bool,
}

/// What happens on the network.
#[derive(Debug, Clone)]
pub enum PeerEvent {
    /// A trusted peer connected.
    Connected {
        /// Who.
        peer: PeerId,
        /// Through a relay.
        relayed: bool,
    },
    /// A peer's last connection closed.
    Disconnected {
        /// Who.
        peer: PeerId,
    },
    /// Changes from `peer` were merged and are durable.
    Merged {
        /// Who sent them.
        peer: PeerId,
        /// Tasks with new content.
        tasks: Vec<TaskId>,
    },
    /// A local write is durable.
    Committed {
        /// Tasks with new content.
        tasks: Vec<TaskId>,
    },
    /// `peer` has exactly our heads.
    InSync {
        /// Who.
        peer: PeerId,
    },
}

/// Why a peer operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The store failed (including: another process holds the home).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The replica failed.
    #[error(transparent)]
    Replica(Box<ReplicaError>),
    /// The network node failed.
    #[error(transparent)]
    Node(#[from] node::NodeError),
    /// The stored identity is damaged.
    #[error("the stored node identity is damaged: {0}")]
    Identity(String),
    /// Bad input from the caller.
    #[error("{0}")]
    Invalid(String),
    /// The network is not started.
    #[error("the network is not running in this process")]
    NotStarted,
}

impl From<ReplicaError> for PeerError {
    fn from(e: ReplicaError) -> Self {
        Self::Replica(Box::new(e))
    }
}

/// One peer's line in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// PeerId.
    pub id: String,
    /// Name.
    pub name: String,
    /// Desktop or phone.
    pub kind: DeviceKind,
    /// Connected now.
    pub connected: bool,
    /// `direct`, `relayed`, or null when not connected.
    pub path: Option<&'static str>,
    /// Last time we were in sync, RFC 3339.
    pub last_sync_at: Option<String>,
    /// In sync now (peer's heads equal ours).
    pub in_sync: bool,
    /// Revoked.
    pub revoked: bool,
    /// Bytes sent to it by this process.
    pub bytes_sent: u64,
    /// Bytes received from it by this process.
    pub bytes_received: u64,
}

/// `status --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Our PeerId.
    pub peer_id: String,
    /// Desktop or phone.
    pub kind: DeviceKind,
    /// Our name.
    pub name: String,
    /// The thread, if this home has one.
    pub thread_id: Option<String>,
    /// Where we listen (empty when the network is not running here).
    pub listen_addrs: Vec<String>,
    /// Trusted peers.
    pub peers: Vec<PeerStatus>,
    /// Relay state (null: no relay configured).
    pub relay: Option<serde_json::Value>,
    /// True when a daemon answered (the network runs).
    pub running: bool,
    /// The thread's documents: the meta document (part 0) and its segments.
    pub documents: Vec<DocumentStatus>,
    /// How often each sync path ran in this process.
    pub sync: crate::replica::PathCounts,
}

/// One document of the thread, in `status --json`.
#[derive(Debug, Clone, Serialize)]
pub struct DocumentStatus {
    /// 0: the meta document (devices, and tasks from before segments); n: segment n.
    pub part: u32,
    /// Held in memory now.
    pub loaded: bool,
    /// Changes in it, when loaded.
    pub changes: Option<usize>,
}

#[derive(Debug, Default)]
struct Live {
    connected: bool,
    relayed: bool,
    in_sync: bool,
}

struct Net {
    node: NodeHandle,
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Inner {
    config: PeerConfig,
    name: String,
    replica: Replica,
    keypair: identity::Keypair,
    peer_id: PeerId,
    gate: SharedGate,
    events: broadcast::Sender<PeerEvent>,
    net: tokio::sync::Mutex<Option<Net>>,
    node: RwLock<Option<NodeHandle>>,
    relay_opts: Mutex<(Vec<Multiaddr>, bool)>,
    live: Mutex<HashMap<PeerId, Live>>,
    traffic: Mutex<HashMap<PeerId, Arc<Traffic>>>,
}

/// A running (or openable) Errand peer. Cheap to clone.
#[derive(Clone)]
pub struct Peer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("peer_id", &self.inner.peer_id)
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn to_device_id(peer: &PeerId) -> DeviceId {
    // A PeerId's base58 form is always a valid DeviceId.
    DeviceId::from_bytes(&peer.to_bytes()).unwrap_or_else(|_| unreachable_device_id())
}

#[cold]
fn unreachable_device_id() -> DeviceId {
    // Only reachable if libp2p changed its PeerId encoding.
    tracing::error!("a libp2p PeerId did not convert to a device id");
    DeviceId::from_bytes(&[0x00, 0x01, 0x00]).unwrap_or_else(|_| std::process::abort())
}

/// Parses a PeerId given by a person, with an error that says what was expected.
pub fn parse_peer_id(s: &str) -> Result<PeerId, PeerError> {
    s.trim().parse().map_err(|_| {
        PeerError::Invalid(format!(
            "{s:?} is not a peer id (expected something like 12D3KooW…)"
        ))
    })
}

/// Parses a multiaddr given by a person.
pub fn parse_addr(s: &str) -> Result<Multiaddr, PeerError> {
    s.trim().parse().map_err(|e| {
        PeerError::Invalid(format!(
            "{s:?} is not a multiaddr ({e}); expected e.g. /ip4/192.168.1.5/tcp/4001"
        ))
    })
}

impl Peer {
    /// Opens a home: store, identity, actor, thread. No network yet.
    pub fn open(config: PeerConfig) -> Result<Self, PeerError> {
        let store = Store::open(&config.home)?;
        let keypair = match store.meta(META_IDENTITY)? {
            Some(bytes) => identity::Keypair::from_protobuf_encoding(&bytes)
                .map_err(|e| PeerError::Identity(e.to_string()))?,
            None => {
                let k = identity::Keypair::generate_ed25519();
                let bytes = k
                    .to_protobuf_encoding()
                    .map_err(|e| PeerError::Identity(e.to_string()))?;
                store.write(|t| t.put_meta(META_IDENTITY, &bytes))?;
                k
            }
        };
        let peer_id = keypair.public().to_peer_id();
        let stored_name = store
            .meta(META_NAME)?
            .and_then(|b| String::from_utf8(b).ok());
        let name = match (&config.name, stored_name) {
            (Some(n), Some(s)) if *n == s => s,
            (Some(n), _) => {
                store.write(|t| t.put_meta(META_NAME, n.as_bytes()))?;
                n.clone()
            }
            (None, Some(s)) => s,
            (None, None) => default_name(config.kind),
        };
        let trusted: Vec<PeerId> = store
            .trusted_peers()?
            .into_iter()
            .filter(|p| !p.revoked)
            .filter_map(|p| p.id.as_str().parse().ok())
            .collect();
        let replica = Replica::open(store)?;
        if config.kind == DeviceKind::Desktop && replica.genesis().is_none() {
            let genesis = ThreadGenesis {
                thread_id: ThreadId::new_at(now_ms()),
                owner: to_device_id(&peer_id),
                owner_actor: replica.actor().to_hex_string(),
            };
            replica.create_thread(genesis)?;
        }
        let gate = Arc::new(RwLock::new(GateState {
            trusted: trusted.into_iter().collect(),
            ..GateState::default()
        }));
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                name,
                replica,
                keypair,
                peer_id,
                gate,
                events: broadcast::channel(EVENT_CAPACITY).0,
                net: tokio::sync::Mutex::new(None),
                node: RwLock::new(None),
                relay_opts: Mutex::new((Vec::new(), false)),
                live: Mutex::new(HashMap::new()),
                traffic: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Sets relays to use (remembered in the home) and whether to use *only* relay circuits
    /// (no direct dials, mDNS or DCUtR: for testing the relayed path). Call before [`Peer::start`].
    pub fn set_relays(&self, relays: Vec<Multiaddr>, relay_only: bool) {
        if let Ok(mut o) = self.inner.relay_opts.lock() {
            *o = (relays, relay_only);
        }
    }

    /// The relays this home remembers, plus those set for this run.
    async fn relays(&self) -> Result<(Vec<Multiaddr>, bool), PeerError> {
        let (mut relays, relay_only) = self
            .inner
            .relay_opts
            .lock()
            .map(|o| o.clone())
            .unwrap_or_default();
        let stored: Vec<String> = self
            .inner
            .replica
            .store_blocking(|s| s.meta_json::<Vec<String>>(META_RELAYS))
            .await??
            .unwrap_or_default();
        for a in stored.iter().filter_map(|a| a.parse::<Multiaddr>().ok()) {
            if !relays.contains(&a) {
                relays.push(a);
            }
        }
        let all: Vec<String> = relays.iter().map(ToString::to_string).collect();
        if all != stored {
            self.inner
                .replica
                .store_blocking(move |s| s.write(|t| t.put_meta_json(META_RELAYS, &all)))
                .await??;
        }
        Ok((relays, relay_only))
    }

    /// Remembers a relay (learned from a ticket) and starts using it.
    pub async fn add_relay(&self, addr: Multiaddr) -> Result<(), PeerError> {
        if let Ok(mut o) = self.inner.relay_opts.lock()
            && !o.0.contains(&addr)
        {
            o.0.push(addr.clone());
        }
        self.relays().await?;
        if let Some(node) = self.node() {
            node.add_relay(addr).await?;
        }
        Ok(())
    }

    /// The rendezvous namespace, when this home has a discovery secret (desktops create one).
    async fn namespace(&self) -> Result<Option<String>, PeerError> {
        let desktop = self.kind() == DeviceKind::Desktop;
        let secret = self
            .inner
            .replica
            .store_blocking(move |s| {
                if desktop {
                    crate::pairing::discovery_secret(s).map(Some)
                } else {
                    s.meta(crate::pairing::META_DISCOVERY)
                        .map(|o| o.and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok()))
                }
            })
            .await??;
        Ok(secret.as_ref().map(crate::relay_client::namespace))
    }

    /// Re-reads the discovery secret and tells the node (after pairing or a rotation).
    pub async fn refresh_namespace(&self) -> Result<(), PeerError> {
        if let (Some(node), Some(ns)) = (self.node(), self.namespace().await?) {
            node.set_namespace(ns).await?;
        }
        Ok(())
    }

    /// True when this peer only uses relay circuits.
    pub fn relay_only(&self) -> bool {
        self.inner.relay_opts.lock().map(|o| o.1).unwrap_or(false)
    }

    /// Our PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// Our device id (the PeerId's text).
    pub fn device_id(&self) -> DeviceId {
        to_device_id(&self.inner.peer_id)
    }

    /// Desktop or phone.
    pub fn kind(&self) -> DeviceKind {
        self.inner.config.kind
    }

    /// Our name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The home directory.
    pub fn home(&self) -> &std::path::Path {
        &self.inner.config.home
    }

    /// The replica (document + store).
    pub fn replica(&self) -> &Replica {
        &self.inner.replica
    }

    /// The node keypair (for pairing prologues and relay registrations).
    pub fn keypair(&self) -> &identity::Keypair {
        &self.inner.keypair
    }

    /// The gate's shared state.
    pub fn gate(&self) -> &SharedGate {
        &self.inner.gate
    }

    /// Subscribes to what happens.
    pub fn events(&self) -> broadcast::Receiver<PeerEvent> {
        self.inner.events.subscribe()
    }

    /// The running node, if started.
    pub fn node(&self) -> Option<NodeHandle> {
        self.inner.node.read().ok().and_then(|n| n.clone())
    }

    /// This device as the hello describes it.
    pub fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            name: self.inner.name.clone(),
            kind: self.inner.config.kind,
            actor: self.inner.replica.actor().to_hex_string(),
        }
    }

    // ---- local writes ----------------------------------------------------------------

    /// Enqueues a task; returns once it is durable here. Never waits for the network.
    pub async fn enqueue_task(&self, task: NewTask) -> Result<TaskId, PeerError> {
        let now = now_ms();
        let (id, tasks) = self
            .inner
            .replica
            .commit(move |d| d.enqueue_task(&task, now))
            .await?;
        let _ = self.inner.events.send(PeerEvent::Committed {
            tasks: tasks.into_iter().collect(),
        });
        Ok(id)
    }

    /// Appends an event to a task; durable on return.
    pub async fn append_event(
        &self,
        task: TaskId,
        attempt: u32,
        kind: EventKind,
    ) -> Result<(), PeerError> {
        let now = now_ms();
        // A request on a finished task in a segment that is not held in memory loads it.
        self.inner.replica.ensure_task_loaded(task).await?;
        let (_, tasks) = self
            .inner
            .replica
            .commit(move |d| d.append_task_event(task, attempt, &kind, now))
            .await?;
        let _ = self.inner.events.send(PeerEvent::Committed {
            tasks: tasks.into_iter().collect(),
        });
        Ok(())
    }

    /// Posts a message; durable on return.
    pub async fn post_message(
        &self,
        kind: MessageKind,
        text: String,
        task: Option<TaskId>,
    ) -> Result<(), PeerError> {
        let now = now_ms();
        self.inner
            .replica
            .commit(move |d| d.post_message(kind, &text, task, now).map(|_| ()))
            .await?;
        Ok(())
    }

    /// Records this desktop's own device entry (name, executors) in the thread.
    pub async fn publish_self(&self, executors: Vec<String>) -> Result<(), PeerError> {
        if self.kind() != DeviceKind::Desktop {
            return Ok(());
        }
        let me = self.device_id();
        let info = self.device_info();
        let current = self
            .inner
            .replica
            .read(move |d| d.devices().into_iter().find(|x| x.id == me))
            .await?;
        if current.as_ref().is_some_and(|d| {
            d.name == info.name && d.executors == executors && d.actors.contains(&info.actor)
        }) {
            return Ok(());
        }
        let device = errand_core::Device {
            id: self.device_id(),
            name: info.name,
            kind: DeviceKind::Desktop,
            actors: vec![info.actor],
            executors,
            added_at: current.map_or_else(now_ms, |d| d.added_at),
            revoked_at: None,
        };
        self.inner
            .replica
            .commit(move |d| d.add_device(&device))
            .await?;
        Ok(())
    }

    // ---- trust -------------------------------------------------------------------------

    /// Trusts a peer (or updates what we know of it), durably, and lets it through the gate.
    pub async fn trust(&self, peer: TrustedPeer) -> Result<(), PeerError> {
        let pid: PeerId = parse_peer_id(peer.id.as_str())?;
        let p = peer.clone();
        self.inner
            .replica
            .store_blocking(move |s| s.write(|t| t.put_trusted(&p)))
            .await??;
        if let Ok(mut g) = self.inner.gate.write() {
            if peer.revoked {
                g.trusted.remove(&pid);
            } else {
                g.trusted.insert(pid);
            }
        }
        Ok(())
    }

    /// Every trusted (or revoked) peer.
    pub async fn trusted_peers(&self) -> Result<Vec<TrustedPeer>, PeerError> {
        Ok(self
            .inner
            .replica
            .store_blocking(|s| s.trusted_peers())
            .await??)
    }

    fn is_trusted(&self, peer: &PeerId) -> bool {
        self.inner
            .gate
            .read()
            .map(|g| g.trusted.contains(peer))
            .unwrap_or(false)
    }

    fn traffic(&self, peer: PeerId) -> Arc<Traffic> {
        self.inner
            .traffic
            .lock()
            .map(|mut t| t.entry(peer).or_default().clone())
            .unwrap_or_default()
    }

    // ---- status ------------------------------------------------------------------------

    /// The status report.
    pub async fn status(&self) -> Result<Status, PeerError> {
        let trusted = self.trusted_peers().await?;
        let listen_addrs = match self.node() {
            Some(n) => n.listen_addrs().await.unwrap_or_default(),
            None => Vec::new(),
        };
        let running = self.node().is_some();
        let relay = match self.node() {
            Some(n) => n
                .relay_info()
                .await
                .ok()
                .and_then(|(info, _)| info.into_iter().next())
                .and_then(|i| serde_json::to_value(i).ok()),
            None => None,
        };
        let live = self.inner.live.lock().map(|l| {
            l.iter()
                .map(|(p, v)| (*p, (v.connected, v.relayed, v.in_sync)))
                .collect::<HashMap<_, _>>()
        });
        let live = live.unwrap_or_default();
        let peers = trusted
            .into_iter()
            .map(|t| {
                let pid: Option<PeerId> = t.id.as_str().parse().ok();
                let (connected, relayed, in_sync) = pid
                    .and_then(|p| live.get(&p).copied())
                    .unwrap_or((false, false, false));
                let traffic = pid.map(|p| self.traffic(p));
                let in_sync = in_sync && pid.is_some_and(|p| self.is_in_sync(&p));
                PeerStatus {
                    id: t.id.to_string(),
                    name: t.name,
                    kind: t.kind,
                    connected,
                    path: connected.then_some(if relayed { "relayed" } else { "direct" }),
                    last_sync_at: t.last_sync_at.map(errand_core::time::rfc3339),
                    in_sync: connected && in_sync,
                    revoked: t.revoked,
                    bytes_sent: traffic
                        .as_ref()
                        .map_or(0, |t| t.sent.load(std::sync::atomic::Ordering::Relaxed)),
                    bytes_received: traffic
                        .as_ref()
                        .map_or(0, |t| t.received.load(std::sync::atomic::Ordering::Relaxed)),
                }
            })
            .collect();
        Ok(Status {
            peer_id: self.inner.peer_id.to_base58(),
            kind: self.kind(),
            name: self.inner.name.clone(),
            thread_id: self
                .inner
                .replica
                .genesis()
                .map(|g| g.thread_id.to_string()),
            listen_addrs: listen_addrs.iter().map(ToString::to_string).collect(),
            peers,
            relay,
            running,
            documents: self
                .inner
                .replica
                .documents()
                .into_iter()
                .map(|(part, loaded, changes)| DocumentStatus {
                    part,
                    loaded,
                    changes,
                })
                .collect(),
            sync: self.inner.replica.path_counts(),
        })
    }

    // ---- network -----------------------------------------------------------------------

    /// Starts the network: listen, dial, discover, sync. Returns once listening.
    pub async fn start(&self) -> Result<(), PeerError> {
        let mut net = self.inner.net.lock().await;
        if net.is_some() {
            return Ok(());
        }
        let (relays, relay_only) = self.relays().await?;
        let namespace = self.namespace().await?;
        let (node, node_events, node_task) = node::spawn(
            self.inner.keypair.clone(),
            self.inner.gate.clone(),
            NodeConfig {
                listen: self.inner.config.listen.clone(),
                mdns: self.inner.config.mdns,
                relays,
                namespace,
                relay_only,
            },
        )
        .await?;
        if let Ok(mut n) = self.inner.node.write() {
            *n = Some(node.clone());
        }
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
        let mut tasks = vec![accept, sup_task, node_task];
        if self.kind() == DeviceKind::Desktop {
            tasks.push(crate::pairing::serve(self, cancel.clone())?);
        }
        *net = Some(Net {
            node,
            cancel,
            tasks,
        });
        Ok(())
    }

    /// Stops the network: closes sessions and connections, joins every task. Bounded by
    /// [`SHUTDOWN_TIMEOUT`]; whatever is left after that is aborted.
    pub async fn shutdown(&self) {
        let Some(net) = self.inner.net.lock().await.take() else {
            return;
        };
        if let Ok(mut n) = self.inner.node.write() {
            *n = None;
        }
        net.cancel.cancel();
        let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, net.node.shutdown()).await;
        // Nothing is connected any more; a later `start` must redial everyone.
        if let Ok(mut l) = self.inner.live.lock() {
            l.clear();
        }
        for task in net.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(SHUTDOWN_TIMEOUT, task).await.is_err() {
                abort.abort();
            }
        }
    }

    /// Dials a trusted peer now at the given addresses (plus what we remember).
    pub async fn dial(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(), PeerError> {
        let node = self.node().ok_or(PeerError::NotStarted)?;
        node.dial(peer, addrs).await?;
        Ok(())
    }

    /// Closes every connection to `peer`, waiting (up to [`DISCONNECT_TIMEOUT`]) until they
    /// are closed.
    pub async fn disconnect(&self, peer: PeerId) {
        if let Some(node) = self.node() {
            let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, node.disconnect(peer)).await;
        }
    }

    /// True when connected to `peer` right now.
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.inner
            .live
            .lock()
            .map(|l| l.get(peer).is_some_and(|v| v.connected))
            .unwrap_or(false)
    }

    /// True when `peer` is connected and its last known heads equal ours (so a local change
    /// made since makes this false until the peer has it).
    pub fn is_in_sync(&self, peer: &PeerId) -> bool {
        self.is_connected(peer) && self.inner.replica.in_sync_now(*peer)
    }

    fn set_live(&self, peer: PeerId, f: impl FnOnce(&mut Live)) {
        if let Ok(mut l) = self.inner.live.lock() {
            f(l.entry(peer).or_default());
        }
    }
}

fn default_name(kind: DeviceKind) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty());
    match (kind, host) {
        (DeviceKind::Desktop, Some(h)) => h,
        (DeviceKind::Desktop, None) => "desktop".into(),
        (DeviceKind::Phone, _) => "phone".into(),
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
    /// Session and stream-opening tasks, joined on shutdown.
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
            traffic: self.peer.traffic(peer),
            may_adopt: self.peer.kind() == DeviceKind::Phone,
        };
        let internal = self.internal_tx.clone();
        self.tasks.spawn(async move {
            let span = tracing::info_span!("sync", %peer);
            let _e = span.enter();
            drop(_e);
            match session::run(stream, peer, ctx, cancel).await {
                Ok(()) => tracing::debug!(%peer, "sync session ended"),
                Err(e) => tracing::warn!(%peer, error = %e, "sync session closed"),
            }
            let _ = internal.send(Internal::Ended(peer, generation)).await;
        });
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
                    self.peer.set_live(peer, |l| l.in_sync = false);
                    if self.opener(&peer) && self.peer.is_connected(&peer) {
                        let tx = self.internal_tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(REOPEN_DELAY).await;
                            let _ = tx.send(Internal::Reopen(peer)).await;
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
                self.peer.set_live(peer, |l| l.in_sync = true);
                let _ = self.peer.inner.events.send(PeerEvent::InSync { peer });
                let replica = self.peer.replica().clone();
                tokio::spawn(async move {
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
                tokio::spawn(async move {
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
            NodeEvent::Connected { peer, relayed, .. } => {
                if !self.peer.is_trusted(&peer) {
                    return;
                }
                self.backoff.remove(&peer);
                self.peer.set_live(peer, |l| {
                    l.connected = true;
                    l.relayed = relayed;
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
            NodeEvent::Disconnected { peer } => {
                self.peer.set_live(peer, |l| {
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
                tokio::spawn(async move {
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

/// The tasks whose content changed in a set of events (for runners that react to merges).
pub fn changed_tasks(ev: &PeerEvent) -> BTreeSet<TaskId> {
    match ev {
        PeerEvent::Merged { tasks, .. } | PeerEvent::Committed { tasks } => {
            tasks.iter().copied().collect()
        }
        _ => BTreeSet::new(),
    }
}
