//! The replica: the thread engine ([`errand_crdt::engine::Engine`]) behind one lock, run on
//! blocking threads, with a watch that wakes every session when the thread changes.
//!
//! The engine holds the thread's logic (parts and segments, indexes, push log, sync
//! sessions, the ingest check); this wrapper only maps libp2p's `PeerId` to the engine's
//! [`DeviceId`], moves work off the async workers, and recovers a poisoned lock by reloading
//! what the store holds.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use errand_core::{DeviceId, DeviceKind, TaskId};
pub use errand_crdt::engine::{
    Binding, DOC_HEADS, EngineError as ReplicaError, MAX_HELLO_DOCS, META_ACTOR, META_FORMAT,
    META_GENESIS, Merged, OPEN_TASKS, Outgoing, PathCounts, TASK_SEGMENT, heads_digest,
};
use errand_crdt::{
    ActorId, ChangeHash, DocId, Store, ThreadDoc, ThreadGenesis, WriteError,
    engine::{Engine, EngineConfig, ExportedDoc, TransferError},
    ingest::PEER_OPS_PER_MINUTE,
};
use libp2p::PeerId;
use tokio::sync::watch;

/// Environment variable that sets the ops per minute a phone may make the desktop apply
/// (default [`PEER_OPS_PER_MINUTE`]; benchmarks that replay many catch-ups raise it).
pub const OPS_PER_MINUTE_ENV: &str = "ERRAND_PEER_OPS_PER_MINUTE";

/// Environment variable that lowers the segment bound (tests and benchmarks of long threads).
pub const SEGMENT_CHANGES_ENV: &str = "ERRAND_SEGMENT_CHANGES";

/// Shared handle to the replica.
#[derive(Clone)]
pub struct Replica {
    engine: Arc<Mutex<Engine>>,
    changed: watch::Sender<u64>,
    /// What a local commit made for each live sync session, waiting for it to be sent.
    ready: Arc<Ready>,
}

/// Frames made at the moment of a local commit for each live sync session, so that the push
/// does not wait for a second trip to the engine behind whoever else the commit woke (the
/// runner reading the task, a listener). Filled under the engine's lock; taken by the session
/// (alone, or under the engine's lock in [`Replica::outgoing`], which puts them first), so
/// frames leave in the order the engine made them.
#[derive(Default)]
struct Ready {
    slots: Mutex<HashMap<PeerId, Slot>>,
    next_token: AtomicU64,
}

struct Slot {
    token: u64,
    frames: Vec<(DocId, Outgoing)>,
}

impl Ready {
    /// A new live session of `peer`: it takes the slot from an older one of the same peer.
    fn enter(ready: &Arc<Self>, peer: PeerId) -> LiveSession {
        let token = ready.next_token.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut slots) = ready.slots.lock() {
            slots.insert(
                peer,
                Slot {
                    token,
                    frames: Vec::new(),
                },
            );
        }
        LiveSession {
            ready: Arc::clone(ready),
            peer,
            token,
        }
    }

    /// The frames made for `peer`'s session `token`; none if another session of the peer
    /// (a newer stream) holds the slot now: they are that session's to send.
    fn take(&self, peer: &PeerId, token: u64) -> Vec<(DocId, Outgoing)> {
        self.slots
            .lock()
            .ok()
            .and_then(|mut s| {
                s.get_mut(peer)
                    .filter(|slot| slot.token == token)
                    .map(|slot| std::mem::take(&mut slot.frames))
            })
            .unwrap_or_default()
    }
}

/// A live sync session's place in [`Replica`]'s ready frames; leaving it (drop) ends that.
pub struct LiveSession {
    ready: Arc<Ready>,
    peer: PeerId,
    token: u64,
}

impl std::fmt::Debug for LiveSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSession")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl LiveSession {
    /// The frames a local commit made for this session since the last take, oldest first.
    /// Send them before anything [`Replica::outgoing`] returns after this call.
    pub fn take_ready(&self) -> Vec<(DocId, Outgoing)> {
        self.ready.take(&self.peer, self.token)
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.ready.slots.lock()
            && slots.get(&self.peer).is_some_and(|s| s.token == self.token)
        {
            slots.remove(&self.peer);
        }
    }
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").finish_non_exhaustive()
    }
}

/// Makes, for every live session, what a commit just gave it to send (see [`Ready`]). A peer
/// the engine cannot serve now is left to its session's own trip to the engine.
fn prepare_pushes(e: &mut Engine, ready: &Ready) {
    let Ok(mut slots) = ready.slots.lock() else {
        return;
    };
    for (peer, slot) in slots.iter_mut() {
        // A session that has not taken the last ones is busy: its own trip to the engine will
        // say the rest in fewer frames.
        if !slot.frames.is_empty() {
            continue;
        }
        let Ok(device) = device(peer) else { continue };
        match e.outgoing(&device, &[]) {
            Ok(frames) => slot.frames.extend(frames),
            Err(error) => tracing::debug!(%peer, %error, "no push made at the commit"),
        }
    }
}

/// The engine's key for a libp2p peer.
fn device(peer: &PeerId) -> Result<DeviceId, ReplicaError> {
    DeviceId::from_bytes(&peer.to_bytes()).map_err(|e| ReplicaError::BadPeer(e.to_string()))
}

/// The engine's configuration from the environment ([`OPS_PER_MINUTE_ENV`],
/// [`SEGMENT_CHANGES_ENV`]).
fn config_from_env() -> EngineConfig {
    let number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    EngineConfig {
        ops_per_minute: number(OPS_PER_MINUTE_ENV).unwrap_or(PEER_OPS_PER_MINUTE),
        segment_limit: number(SEGMENT_CHANGES_ENV).map(|n| n as usize),
    }
}

impl Replica {
    /// Opens the replica over an opened store, loading the thread if the home has one (and
    /// migrating a home written before segments).
    pub fn open(store: Store) -> Result<Self, ReplicaError> {
        let engine = Engine::open(store, config_from_env())?;
        Ok(Self {
            engine: Arc::new(Mutex::new(engine)),
            changed: watch::channel(0).0,
            ready: Arc::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Engine> {
        // A panic while holding the lock leaves the document possibly half-written; the
        // store still holds every acknowledged change, so recover by reloading.
        match self.engine.lock() {
            Ok(g) => g,
            Err(poisoned) => {
                let mut g = poisoned.into_inner();
                let _ = g.restart();
                self.engine.clear_poison();
                g
            }
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine) -> T + Send + 'static,
    ) -> Result<T, ReplicaError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&mut this.lock()))
            .await
            .map_err(|e| ReplicaError::Join(e.to_string()))
    }

    /// Runs `f` on the store directly (same lock as the document).
    pub fn with_store<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        f(self.lock().store())
    }

    /// Runs `f` on the store on a blocking thread.
    pub async fn store_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> T + Send + 'static,
    ) -> Result<T, ReplicaError> {
        self.blocking(move |e| f(e.store())).await
    }

    /// This device's actor.
    pub fn actor(&self) -> ActorId {
        self.lock().actor()
    }

    /// The thread's genesis, if this home has a thread.
    pub fn genesis(&self) -> Option<ThreadGenesis> {
        self.lock().genesis()
    }

    /// Rolls the thread over after `changes` changes instead of
    /// [`errand_crdt::SEGMENT_MAX_CHANGES`] (tests and benchmarks of long threads).
    pub fn set_segment_limit(&self, changes: usize) {
        self.lock().set_segment_limit(changes);
    }

    /// Reloads the thread from the store, as a restart would (tests of what stays in memory).
    pub fn reload(&self) -> Result<(), ReplicaError> {
        self.lock().restart()
    }

    /// How often each sync path ran since the replica opened.
    pub fn path_counts(&self) -> PathCounts {
        self.lock().path_counts()
    }

    /// The thread's documents: (part number, loaded?, changes if loaded), oldest first.
    pub fn documents(&self) -> Vec<(u32, bool, Option<usize>)> {
        self.lock().documents()
    }

    /// Wakes sessions when local or merged changes arrive.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// How many times the thread changed (local commits, merges, a new or adopted thread)
    /// since the replica opened: a cheap key for caches of what the thread says.
    pub fn change_count(&self) -> u64 {
        *self.changed.borrow()
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Creates this home's thread (desktop), if it has none.
    pub fn create_thread(&self, genesis: ThreadGenesis) -> Result<ThreadGenesis, ReplicaError> {
        let created = self.lock().create_thread(genesis);
        self.bump();
        created
    }

    /// Switches this home to `genesis` (a phone pairing with a desktop). The previous thread,
    /// if any, stays in the store under its own document ids but is no longer shown.
    pub fn replace_thread(&self, genesis: ThreadGenesis) -> Result<(), ReplicaError> {
        let replaced = self.lock().replace_thread(genesis);
        self.bump();
        replaced
    }

    /// Adopts the thread of a trusted desktop that owns it. A home that has a thread keeps
    /// it: a different thread is an error.
    pub async fn adopt(&self, genesis: ThreadGenesis) -> Result<(), ReplicaError> {
        let adopted = self.blocking(move |e| e.adopt(genesis)).await?;
        self.bump();
        adopted
    }

    /// Reads the thread (the documents held in memory: the meta document, the newest
    /// segment and those with unfinished tasks).
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ThreadDoc) -> T + Send + 'static,
    ) -> Result<T, ReplicaError> {
        self.blocking(move |e| e.doc().map(f).ok_or(ReplicaError::NoThread))
            .await?
    }

    /// Unfinished tasks, from the index kept with every stored change (no document is read):
    /// where the desktop's runner starts.
    pub async fn open_tasks(&self) -> Result<BTreeSet<TaskId>, ReplicaError> {
        self.blocking(|e| e.open_tasks()).await
    }

    /// Reads the whole thread: every segment is loaded for the read and released after.
    pub async fn read_all<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ThreadDoc) -> T + Send + 'static,
    ) -> Result<T, ReplicaError> {
        self.blocking(move |e| e.read_all(f)).await?
    }

    /// Every document of the thread as a whole `save()` with its genesis, and `f`'s read of
    /// the whole thread at the same moment (see [`Engine::export`]).
    pub async fn export<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ThreadDoc) -> T + Send + 'static,
    ) -> Result<(Vec<ExportedDoc>, T), TransferError> {
        self.blocking(move |e| e.export(f))
            .await
            .map_err(TransferError::from)?
    }

    /// A page of the thread's history: up to `limit` tasks older than `before` (all tasks when
    /// `None`), newest first, loading segments only as far as the page needs.
    pub async fn tasks_before(
        &self,
        before: Option<TaskId>,
        limit: usize,
    ) -> Result<Vec<errand_core::Task>, ReplicaError> {
        self.blocking(move |e| e.tasks_before(before, limit))
            .await?
    }

    /// Reads the document on the calling thread (for callers already off the async workers).
    pub fn read_now<T>(&self, f: impl FnOnce(&ThreadDoc) -> T) -> Result<T, ReplicaError> {
        self.lock().doc().map(f).ok_or(ReplicaError::NoThread)
    }

    /// Makes sure the segment holding `task` is in memory (a request on an old task).
    pub async fn ensure_task_loaded(&self, task: TaskId) -> Result<(), ReplicaError> {
        self.blocking(move |e| e.ensure_task_loaded(task)).await?
    }

    /// Makes a local change durable and makes the frames that carry it to every live session,
    /// then wakes every session.
    pub async fn commit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut ThreadDoc) -> Result<T, WriteError> + Send + 'static,
    ) -> Result<(T, BTreeSet<TaskId>), ReplicaError> {
        self.commit_on(None, f).await
    }

    /// Enters `peer`'s live sync session into the frames a local commit makes (see
    /// [`LiveSession::take_ready`]), until the returned guard is dropped. Call once the
    /// session has started (after [`Replica::start_session`]).
    pub fn live_session(&self, peer: PeerId) -> LiveSession {
        Ready::enter(&self.ready, peer)
    }

    /// Like [`Replica::commit`] on one task: loads the task's segment if it is not held, then
    /// runs `f`, in one trip to the engine (a read, a check and a write that cannot be split
    /// by another writer, and one hand-off instead of three on the way to the push).
    pub async fn commit_task<T: Send + 'static>(
        &self,
        task: TaskId,
        f: impl FnOnce(&mut ThreadDoc) -> Result<T, WriteError> + Send + 'static,
    ) -> Result<(T, BTreeSet<TaskId>), ReplicaError> {
        self.commit_on(Some(task), f).await
    }

    /// [`Replica::commit`], loading `task`'s segment first if one is named.
    async fn commit_on<T: Send + 'static>(
        &self,
        task: Option<TaskId>,
        f: impl FnOnce(&mut ThreadDoc) -> Result<T, WriteError> + Send + 'static,
    ) -> Result<(T, BTreeSet<TaskId>), ReplicaError> {
        let ready = Arc::clone(&self.ready);
        let out = self
            .blocking(move |e| {
                if let Some(task) = task {
                    e.ensure_task_loaded(task)?;
                }
                let out = e.commit(f)?;
                prepare_pushes(e, &ready);
                Ok::<_, ReplicaError>(out)
            })
            .await??;
        self.bump();
        Ok(out)
    }

    /// Everything to send the peer of `live` now (see [`Engine::outgoing`]), and whether it is in
    /// sync once that is sent (see [`Replica::in_sync`]): one trip to the engine.
    pub async fn outgoing(
        &self,
        live: &LiveSession,
        extra: Vec<DocId>,
    ) -> Result<(Vec<(DocId, Outgoing)>, bool), ReplicaError> {
        let (peer, token) = (live.peer, live.token);
        let device = device(&peer)?;
        let ready = Arc::clone(&self.ready);
        self.blocking(move |e| {
            // Frames a commit made and the session has not taken yet go first.
            let mut out = ready.take(&peer, token);
            out.extend(e.outgoing(&device, &extra)?);
            Ok((out, e.in_sync(&device)))
        })
        .await?
    }

    /// Digests of our documents' heads for the hello: (part number, digest).
    pub fn digests(&self) -> Vec<(u32, String)> {
        self.lock().digests()
    }

    /// Starts `peer`'s sessions afresh (a new stream) from its hello: documents whose heads
    /// match ours start in sync, with no message; the others are returned, to be synced.
    /// `part_limit` bounds the change bytes of each frame to the peer (see
    /// `Engine::set_part_limit`).
    pub async fn start_session(
        &self,
        peer: PeerId,
        theirs: Vec<(u32, String)>,
        part_limit: Option<usize>,
    ) -> Result<Vec<DocId>, ReplicaError> {
        let peer = device(&peer)?;
        self.blocking(move |e| {
            e.set_part_limit(&peer, part_limit);
            e.start_session(&peer, theirs)
        })
        .await?
    }

    /// Bounds the change bytes of each frame to `peer` (see `Engine::set_part_limit`), for
    /// the sessions running now and later.
    pub async fn set_part_limit(
        &self,
        peer: PeerId,
        part_limit: Option<usize>,
    ) -> Result<(), ReplicaError> {
        let peer = device(&peer)?;
        self.blocking(move |e| e.set_part_limit(&peer, part_limit))
            .await
    }

    /// Applies a sync message from `peer` for document `doc_id`, durably with the peer's
    /// sync state.
    pub async fn receive(
        &self,
        peer: PeerId,
        doc_id: DocId,
        bytes: Vec<u8>,
    ) -> Result<Merged, ReplicaError> {
        let peer = device(&peer)?;
        let merged = self
            .blocking(move |e| e.receive(&peer, doc_id, &bytes))
            .await??;
        if merged.changed {
            self.bump();
        }
        Ok(merged)
    }

    /// Applies changes `peer` pushed for `doc_id` (taking it to `theirs`), directly when we
    /// hold their dependencies; otherwise falls back to the sync protocol.
    pub async fn receive_changes(
        &self,
        peer: PeerId,
        doc_id: DocId,
        theirs: Vec<ChangeHash>,
        bytes: Vec<u8>,
    ) -> Result<Merged, ReplicaError> {
        let peer = device(&peer)?;
        let merged = self
            .blocking(move |e| e.receive_changes(&peer, doc_id, &theirs, &bytes))
            .await??;
        if merged.changed {
            self.bump();
        }
        Ok(merged)
    }

    /// `peer` acknowledged our pushes up to `heads` on `doc_id`.
    pub async fn push_acked(&self, peer: PeerId, doc_id: DocId, heads: Vec<ChangeHash>) {
        let Ok(peer) = device(&peer) else { return };
        let _ = self
            .blocking(move |e| e.push_acked(&peer, doc_id, &heads))
            .await;
    }

    /// True if `peer`'s last known heads equal ours on every document of the thread.
    pub async fn in_sync(&self, peer: PeerId) -> bool {
        let Ok(peer) = device(&peer) else {
            return false;
        };
        self.blocking(move |e| e.in_sync(&peer))
            .await
            .unwrap_or(false)
    }

    /// [`Self::in_sync`] on the calling thread (brief: compares head lists).
    pub fn in_sync_now(&self, peer: PeerId) -> bool {
        device(&peer).is_ok_and(|peer| self.lock().in_sync(&peer))
    }

    /// Records the device behind `peer` in the thread with `actor`, if this home owns the
    /// thread (see [`Engine::ensure_device`]). Returns whether anything was written.
    pub async fn ensure_device(
        &self,
        peer: PeerId,
        name: String,
        kind: DeviceKind,
        actor: String,
        binding: Binding,
        now: i64,
    ) -> Result<bool, ReplicaError> {
        let id = device(&peer)?;
        let wrote = self
            .blocking(move |e| e.ensure_device(id, name, kind, actor, binding, now))
            .await??;
        if wrote {
            self.bump();
        }
        Ok(wrote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn made(ready: &Ready, peer: &PeerId, byte: u8) {
        let doc = DocId::parse("01HF7YAT00WS6ARJ8ZSQHWX85H").unwrap();
        let mut slots = ready.slots.lock().unwrap();
        let slot = slots.get_mut(peer).unwrap();
        slot.frames.push((doc, Outgoing::Sync(vec![byte])));
    }

    #[test]
    fn an_old_session_of_a_peer_leaves_the_frames_made_for_its_new_one() {
        let ready = Arc::new(Ready::default());
        let peer = PeerId::random();
        let old = Ready::enter(&ready, peer);
        made(&ready, &peer, 1);
        assert_eq!(old.take_ready().len(), 1);
        // A new stream's session takes the slot while the old one winds down.
        let new = Ready::enter(&ready, peer);
        made(&ready, &peer, 2);
        assert!(
            old.take_ready().is_empty(),
            "the old session took the new one's frame"
        );
        drop(old);
        let frames = new.take_ready();
        assert_eq!(frames.len(), 1);
        assert!(matches!(&frames[0].1, Outgoing::Sync(b) if b == &[2]));
        // The old one's end did not end the new one's slot.
        made(&ready, &peer, 3);
        assert_eq!(new.take_ready().len(), 1);
    }
}
