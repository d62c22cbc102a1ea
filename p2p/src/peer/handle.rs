//! The `Peer` handle: cheap to clone, one `Arc` over the peer's state. Opening a home, the
//! accessors, local writes (durable on return) and trust live here; the network side is in
//! [`super::supervisor`], the status report in [`super::status`].
//!
//! Who owns what: the thread and the store are the [`Replica`]'s (its engine runs on one
//! thread; the handle sends it work); the network's state (the node, each peer's connection
//! and traffic) is the supervisor's, which alone writes the [`NetView`] the handle reads; the
//! running tasks are held by `Inner::net`, taken by `start` and given back by `shutdown`,
//! which joins them. What a home is opened with ([`PeerConfig`]) does not change after.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use errand_core::{DeviceId, DeviceKind, EventKind, MessageKind, TaskId, ThreadId};
use errand_crdt::{NewTask, Store, ThreadGenesis, TrustedPeer};
use libp2p::{Multiaddr, PeerId, identity};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    clock::now_ms,
    net::node::NodeHandle,
    replica::{Replica, ReplicaError},
    sync::{
        gate::SharedGate,
        session::{DeviceInfo, Traffic},
    },
};

use super::types::{PeerConfig, PeerError, PeerEvent, parse_peer_id};

/// Store key of the node's libp2p keypair (protobuf encoding).
pub(crate) const META_IDENTITY: &str = "identity";
/// Store key of this device's name.
pub(crate) const META_NAME: &str = "name";
/// Store key of the relays this home uses (JSON list of multiaddrs).
const META_RELAYS: &str = "relays";

/// Peer events buffered per subscriber. A subscriber that lags gets `Lagged` and rescans.
const EVENT_CAPACITY: usize = 1024;
/// How long [`Peer::disconnect`] waits for the connections to close. Closing is local (the
/// muxer says goodbye and the socket closes), so this only bounds a stuck transport.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What the network side knows of one trusted peer.
#[derive(Debug, Clone, Default)]
pub(super) struct Live {
    pub(super) connected: bool,
    pub(super) relayed: bool,
    /// The circuit's byte limit, if relayed and the relay stated one.
    pub(super) circuit_bytes: Option<u64>,
    pub(super) in_sync: bool,
    /// Bytes exchanged with it by this process (its sessions count them).
    pub(super) traffic: Arc<Traffic>,
}

/// The network as the supervisor last published it: the running node, if any, and what it
/// knows of each peer. Written by the supervisor alone (`start` and `shutdown` included);
/// everyone else reads a snapshot.
#[derive(Debug, Clone, Default)]
pub(super) struct NetView {
    pub(super) node: Option<NodeHandle>,
    pub(super) peers: HashMap<PeerId, Live>,
}

pub(super) struct Net {
    pub(super) node: NodeHandle,
    pub(super) cancel: CancellationToken,
    pub(super) tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub(super) struct Inner {
    pub(super) config: PeerConfig,
    pub(super) name: String,
    pub(super) replica: Replica,
    pub(super) keypair: identity::Keypair,
    pub(super) peer_id: PeerId,
    pub(super) gate: SharedGate,
    pub(super) events: broadcast::Sender<PeerEvent>,
    /// The running network's tasks: `start` fills it, `shutdown` takes and joins them (the
    /// lock makes the two take turns).
    pub(super) net: tokio::sync::Mutex<Option<Net>>,
    /// The supervisor's [`NetView`]; only `supervisor.rs` sends on it.
    pub(super) view: watch::Sender<NetView>,
    /// One fetch per blob at a time in this process: a second one (`errand-phone fetch`
    /// beside the phone's automatic fetch) waits, then finds the blob whole. A map of
    /// locks, not state: each entry lives while a fetch of its blob runs.
    pub(super) fetching: Mutex<HashMap<errand_core::BlobHash, Arc<tokio::sync::Mutex<()>>>>,
}

/// A running (or openable) Errand peer. Cheap to clone.
#[derive(Clone)]
pub struct Peer {
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("peer_id", &self.inner.peer_id)
            .finish_non_exhaustive()
    }
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
        let gate = SharedGate::new(trusted);
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
                view: watch::Sender::new(NetView::default()),
                fetching: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The relays this home uses: those of its [`PeerConfig`] and those it remembers, which
    /// from now on include the former.
    pub(super) async fn relays(&self) -> Result<Vec<Multiaddr>, PeerError> {
        self.remember_relays(self.inner.config.relays.clone()).await
    }

    /// Adds `relays` to those the home remembers; returns them all.
    async fn remember_relays(
        &self,
        mut relays: Vec<Multiaddr>,
    ) -> Result<Vec<Multiaddr>, PeerError> {
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
        Ok(relays)
    }

    /// Remembers a relay (learned from a ticket) and starts using it.
    pub async fn add_relay(&self, addr: Multiaddr) -> Result<(), PeerError> {
        self.remember_relays(vec![addr.clone()]).await?;
        if let Some(node) = self.node() {
            node.add_relay(addr).await?;
        }
        Ok(())
    }

    /// The rendezvous namespace, when this home has a discovery secret (desktops create one).
    pub(super) async fn namespace(&self) -> Result<Option<String>, PeerError> {
        let desktop = self.kind() == DeviceKind::Desktop;
        let secret = self
            .inner
            .replica
            .store_blocking(move |s| {
                if desktop {
                    crate::pair::discovery_secret(s).map(Some)
                } else {
                    s.meta(crate::pair::META_DISCOVERY)
                        .map(|o| o.and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok()))
                }
            })
            .await??;
        Ok(secret.as_ref().map(crate::net::discovery::namespace))
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
        self.inner.config.relay_only
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
        self.inner.view.borrow().node.clone()
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

    /// Reads `task` (`None` if it is not in the thread), lets `decide` turn it into one event
    /// for one of its attempts or refuse, and appends that event: one trip to the engine, so
    /// nothing lands between the decision and the write. Durable on return. `Ok(Err(_))` is
    /// `decide`'s refusal, and nothing was written.
    pub async fn append_decided<T, E>(
        &self,
        task: TaskId,
        decide: impl FnOnce(Option<errand_core::Task>) -> Result<(u32, EventKind, T), E>
        + Send
        + 'static,
    ) -> Result<Result<T, E>, PeerError>
    where
        T: Send + 'static,
        E: Send + 'static,
    {
        let now = now_ms();
        let (decided, tasks) = self
            .inner
            .replica
            .commit_task(task, move |d| match decide(d.task(&task)) {
                Ok((attempt, kind, value)) => {
                    d.append_task_event(task, attempt, &kind, now)?;
                    Ok(Ok(value))
                }
                Err(refused) => Ok(Err(refused)),
            })
            .await?;
        if !tasks.is_empty() {
            let _ = self.inner.events.send(PeerEvent::Committed {
                tasks: tasks.into_iter().collect(),
            });
        }
        Ok(decided)
    }

    /// Appends several events to one task's attempt, in order, with one durable commit (and
    /// so one push) for all of them; durable on return. An event the document refuses is
    /// left out and the others are still written; the first refusal is returned after.
    pub async fn append_events(
        &self,
        task: TaskId,
        attempt: u32,
        kinds: Vec<EventKind>,
    ) -> Result<(), PeerError> {
        if kinds.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        self.inner.replica.ensure_task_loaded(task).await?;
        let (refused, tasks) = self
            .inner
            .replica
            .commit(move |d| {
                let mut refused = None;
                for kind in &kinds {
                    if let Err(e) = d.append_task_event(task, attempt, kind, now) {
                        refused.get_or_insert(e);
                    }
                }
                Ok(refused)
            })
            .await?;
        let _ = self.inner.events.send(PeerEvent::Committed {
            tasks: tasks.into_iter().collect(),
        });
        match refused {
            None => Ok(()),
            Some(e) => Err(ReplicaError::from(e).into()),
        }
    }

    /// Creates a routine; returns once it is durable here. Never waits for the network.
    pub async fn create_routine(
        &self,
        routine: errand_crdt::NewRoutine,
    ) -> Result<errand_core::RoutineId, PeerError> {
        let now = now_ms();
        let (id, _) = self
            .inner
            .replica
            .commit(move |d| d.create_routine(&routine, now))
            .await?;
        Ok(id)
    }

    /// Appends to a routine's history (pause, resume, delete; `missed` from its desktop);
    /// durable on return.
    pub async fn routine_event(
        &self,
        routine: errand_core::RoutineId,
        kind: errand_core::RoutineEventKind,
    ) -> Result<(), PeerError> {
        let now = now_ms();
        self.inner
            .replica
            .commit(move |d| d.append_routine_event(routine, &kind, now))
            .await?;
        Ok(())
    }

    /// Enqueues the task of `routine`'s occurrence due at `due` (this desktop's scheduler);
    /// `None` if it exists already. Durable on return.
    pub async fn enqueue_occurrence(
        &self,
        routine: errand_core::Routine,
        due: errand_core::time::Millis,
    ) -> Result<Option<TaskId>, PeerError> {
        let now = now_ms();
        let (id, tasks) = self
            .inner
            .replica
            .commit(move |d| d.enqueue_occurrence(&routine, due, now))
            .await?;
        if id.is_some() {
            let _ = self.inner.events.send(PeerEvent::Committed {
                tasks: tasks.into_iter().collect(),
            });
        }
        Ok(id)
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
        if peer.revoked {
            self.inner.gate.distrust(&pid);
        } else {
            self.inner.gate.trust(pid);
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

    pub(super) fn is_trusted(&self, peer: &PeerId) -> bool {
        self.inner.gate.is_trusted(peer)
    }

    /// The addresses remembered for a trusted peer (none if it is not trusted).
    pub(super) async fn remembered_addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        let id = peer.to_base58();
        self.inner
            .replica
            .store_blocking(move |s| s.trusted_peer(&id))
            .await
            .ok()
            .and_then(|r| r.ok().flatten())
            .filter(|t| !t.revoked)
            .map(|t| t.addrs.iter().filter_map(|a| a.parse().ok()).collect())
            .unwrap_or_default()
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
            .view
            .borrow()
            .peers
            .get(peer)
            .is_some_and(|v| v.connected)
    }

    /// `Some` when `peer` is connected through a relay circuit: the circuit's byte limit,
    /// if the relay stated one.
    pub(crate) fn circuit(&self, peer: &PeerId) -> Option<Option<u64>> {
        self.inner
            .view
            .borrow()
            .peers
            .get(peer)
            .filter(|v| v.connected && v.relayed)
            .map(|v| v.circuit_bytes)
    }

    /// True when `peer` is connected and its last known heads equal ours (so a local change
    /// made since makes this false until the peer has it).
    pub fn is_in_sync(&self, peer: &PeerId) -> bool {
        self.is_connected(peer) && self.inner.replica.in_sync_now(*peer)
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
