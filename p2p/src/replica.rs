//! The replica: the thread document, its store, and the per-peer sync sessions, behind one
//! lock. Every method that touches Automerge or redb runs on a blocking thread.
//!
//! A change is acknowledged only once it is durable: local writes append their chunk before
//! returning, and merged remote changes are stored in the same transaction as the peer's
//! updated sync state.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, MutexGuard},
};

use errand_core::{DeviceKind, TaskId};
use errand_crdt::{
    ActorId, DocId, Store, StoreError, SyncError, SyncSession, ThreadDoc, ThreadGenesis, WriteError,
};
use libp2p::PeerId;
use tokio::sync::watch;

/// Store key of the thread's genesis (JSON).
pub const META_GENESIS: &str = "genesis";
/// Store key of this device's Automerge actor id (bytes).
pub const META_ACTOR: &str = "actor";

/// Compact once chunks pass this many bytes and the snapshot's size: chunks are uncompressed
/// change-by-change, about 15x a compacted `save()` (dependency notes, 2.4).
const COMPACT_MIN_CHUNK_BYTES: u64 = 256 * 1024;

/// Why a replica operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The write was refused.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The peer's sync data was refused.
    #[error(transparent)]
    Sync(#[from] SyncError),
    /// The stored document did not load.
    #[error("the stored thread does not load: {0}")]
    Load(Box<automerge::AutomergeError>),
    /// No thread in this home yet.
    #[error("this home has no thread yet: pair with a desktop first (errand-phone pair <TICKET>)")]
    NoThread,
    /// The peer is on another thread.
    #[error("peer is on thread {theirs}, this home is on thread {ours}")]
    ThreadMismatch {
        /// Ours.
        ours: String,
        /// Theirs.
        theirs: String,
    },
    /// The peer's sync message carries changes that do not parse.
    #[error("the peer's changes do not parse: {0}")]
    BadChanges(String),
    /// A blocking task panicked or was cancelled.
    #[error("internal task failed: {0}")]
    Join(String),
}

/// Checks that every change chunk in a peer's sync message parses, before Automerge sees it.
///
/// Automerge 0.12 skips a chunk it cannot parse (it logs "partial load") and applies the rest,
/// so garbage from a peer would pass silently, and the changes it stood for would never
/// arrive: the session must fail like on any other bad message. Loading each chunk into a
/// scratch document parses it; changes whose dependencies are elsewhere only get queued there
/// (`MissingDeps`), which is fine. A whole document (a first sync) is loaded twice, which is
/// rare and bounded by the frame size. Bytes that are no sync message at all pass: the
/// session's own decode reports them.
fn check_changes(bytes: &[u8]) -> Result<(), ReplicaError> {
    let Ok(msg) = automerge::sync::Message::decode(bytes) else {
        return Ok(());
    };
    for chunk in msg.changes.iter() {
        for part in split_chunks(chunk)? {
            check_chunk(part)?;
        }
    }
    Ok(())
}

/// Automerge's chunk magic bytes.
const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// Splits concatenated Automerge chunks (`magic | checksum(4) | type(1) | uleb128 len | data`),
/// so each change can be parsed on its own.
fn split_chunks(mut bytes: &[u8]) -> Result<Vec<&[u8]>, ReplicaError> {
    let bad = |why: &str| ReplicaError::BadChanges(why.to_owned());
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.get(..4) != Some(&CHUNK_MAGIC[..]) {
            return Err(bad("a chunk without the automerge magic bytes"));
        }
        let mut pos = 9; // magic, checksum, type
        let (mut len, mut shift) = (0u64, 0u32);
        loop {
            let b = *bytes
                .get(pos)
                .ok_or_else(|| bad("a truncated chunk header"))?;
            pos += 1;
            if shift > 56 {
                return Err(bad("a chunk length that does not fit"));
            }
            len |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| pos.checked_add(l))
            .filter(|e| *e <= bytes.len())
            .ok_or_else(|| bad("a chunk longer than the message"))?;
        out.push(&bytes[..end]);
        bytes = &bytes[end..];
    }
    Ok(out)
}

/// Parses one chunk: a change (plain or compressed) on its own, a document by loading it.
fn check_chunk(chunk: &[u8]) -> Result<(), ReplicaError> {
    const DOCUMENT: u8 = 0;
    if chunk.get(8) != Some(&DOCUMENT) {
        let change = std::panic::catch_unwind(|| automerge::Change::try_from(chunk))
            .map_err(|_| ReplicaError::BadChanges("automerge panicked while parsing them".into()))?
            .map_err(|e| ReplicaError::BadChanges(e.to_string()))?;
        // Parsing does not check the chunk's checksum (the first four bytes of the change's
        // hash, also for a compressed chunk); loading does, and drops a mismatch silently.
        if chunk.get(4..8) != change.hash().0.get(..4) {
            return Err(ReplicaError::BadChanges(format!(
                "change {} has a wrong checksum",
                change.hash()
            )));
        }
        return Ok(());
    }
    let loaded = std::panic::catch_unwind(|| {
        automerge::Automerge::load_with_options(
            chunk,
            automerge::LoadOptions::new().on_partial_load(automerge::OnPartialLoad::Error),
        )
    });
    match loaded {
        Ok(Ok(_)) | Ok(Err(automerge::AutomergeError::MissingDeps)) => Ok(()),
        Ok(Err(e)) => Err(ReplicaError::BadChanges(e.to_string())),
        Err(_) => Err(ReplicaError::BadChanges(
            "automerge panicked while parsing them".into(),
        )),
    }
}

/// What a received sync message did.
#[derive(Debug, Clone, Default)]
pub struct Merged {
    /// Tasks with new content.
    pub tasks: BTreeSet<TaskId>,
    /// True if the message moved our heads.
    pub changed: bool,
    /// True if the peer now has exactly our heads.
    pub in_sync: bool,
}

struct State {
    store: Store,
    actor: ActorId,
    doc: Option<ThreadDoc>,
    sessions: HashMap<PeerId, SyncSession>,
    chunk_bytes: u64,
    snapshot_bytes: u64,
}

/// Shared handle to the replica.
#[derive(Clone)]
pub struct Replica {
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Replica")
    }
}

impl State {
    fn persist_new_doc(&mut self, doc: &mut ThreadDoc) -> Result<(), StoreError> {
        let genesis = doc.genesis().clone();
        let snapshot = doc.save();
        self.store.write(|t| {
            t.put_meta_json(META_GENESIS, &genesis)?;
            t.replace_snapshot(&genesis.doc_id(), &snapshot)
        })?;
        self.snapshot_bytes = snapshot.len() as u64;
        self.chunk_bytes = 0;
        Ok(())
    }

    fn reload(&mut self) -> Result<(), ReplicaError> {
        let Some(genesis) = self.store.meta_json::<ThreadGenesis>(META_GENESIS)? else {
            self.doc = None;
            return Ok(());
        };
        let loaded = self.store.load_doc(&genesis.doc_id())?;
        self.snapshot_bytes = loaded.snapshot.as_ref().map_or(0, |s| s.len() as u64);
        self.chunk_bytes = loaded.chunks.iter().map(|c| c.len() as u64).sum();
        let doc = ThreadDoc::load(loaded.parts(), &genesis, self.actor.clone())
            .map_err(|e| ReplicaError::Load(Box::new(e)))?;
        self.doc = Some(doc);
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<(), StoreError> {
        if self.chunk_bytes <= COMPACT_MIN_CHUNK_BYTES.max(self.snapshot_bytes) {
            return Ok(());
        }
        let Some(doc) = self.doc.as_mut() else {
            return Ok(());
        };
        let snapshot = doc.save();
        let doc_id = doc.doc_id();
        self.store
            .write(|t| t.replace_snapshot(&doc_id, &snapshot))?;
        tracing::debug!(bytes = snapshot.len(), "compacted the thread");
        self.snapshot_bytes = snapshot.len() as u64;
        self.chunk_bytes = 0;
        Ok(())
    }

    fn session(&mut self, peer: &PeerId, doc_id: &DocId) -> &mut SyncSession {
        let store = &self.store;
        self.sessions.entry(*peer).or_insert_with(|| {
            match store.sync_state(doc_id, &peer.to_base58()) {
                Ok(Some(bytes)) => SyncSession::restore(doc_id.clone(), &bytes)
                    .unwrap_or_else(|_| SyncSession::new(doc_id.clone())),
                _ => SyncSession::new(doc_id.clone()),
            }
        })
    }
}

impl Replica {
    /// Opens the replica over an opened store, loading the thread if the home has one.
    pub fn open(store: Store) -> Result<Self, ReplicaError> {
        let actor = match store.meta(META_ACTOR)? {
            Some(bytes) => ActorId::from(bytes.as_slice()),
            None => {
                let actor = ActorId::random();
                store.write(|t| t.put_meta(META_ACTOR, actor.to_bytes()))?;
                actor
            }
        };
        let mut state = State {
            store,
            actor,
            doc: None,
            sessions: HashMap::new(),
            chunk_bytes: 0,
            snapshot_bytes: 0,
        };
        state.reload()?;
        Ok(Self {
            state: Arc::new(Mutex::new(state)),
            changed: watch::channel(0).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the document possibly half-written; the
        // store still holds every acknowledged change, so recover by reloading.
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => {
                let mut g = poisoned.into_inner();
                let _ = g.reload();
                g.sessions.clear();
                self.state.clear_poison();
                g
            }
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> T + Send + 'static,
    ) -> Result<T, ReplicaError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&mut this.lock()))
            .await
            .map_err(|e| ReplicaError::Join(e.to_string()))
    }

    /// Runs `f` on the store directly (same lock as the document).
    pub fn with_store<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        f(&self.lock().store)
    }

    /// Runs `f` on the store on a blocking thread.
    pub async fn store_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> T + Send + 'static,
    ) -> Result<T, ReplicaError> {
        self.blocking(move |s| f(&s.store)).await
    }

    /// This device's actor.
    pub fn actor(&self) -> ActorId {
        self.lock().actor.clone()
    }

    /// The thread's genesis, if this home has a thread.
    pub fn genesis(&self) -> Option<ThreadGenesis> {
        self.lock().doc.as_ref().map(|d| d.genesis().clone())
    }

    /// Wakes sessions when local or merged changes arrive.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Creates this home's thread (desktop), if it has none.
    pub fn create_thread(&self, genesis: ThreadGenesis) -> Result<ThreadGenesis, ReplicaError> {
        let mut s = self.lock();
        if let Some(doc) = &s.doc {
            return Ok(doc.genesis().clone());
        }
        let mut doc = ThreadDoc::create(&genesis, s.actor.clone());
        s.persist_new_doc(&mut doc)?;
        s.doc = Some(doc);
        Ok(genesis)
    }

    /// Switches this home to `genesis` (a phone pairing with a desktop). The previous thread,
    /// if any, stays in the store under its own document id but is no longer shown.
    pub fn replace_thread(&self, genesis: ThreadGenesis) -> Result<(), ReplicaError> {
        let mut s = self.lock();
        if s.doc.as_ref().is_some_and(|d| d.genesis() == &genesis) {
            return Ok(());
        }
        let loaded = s.store.load_doc(&genesis.doc_id())?;
        let mut doc = ThreadDoc::load(loaded.parts(), &genesis, s.actor.clone())
            .map_err(|e| ReplicaError::Load(Box::new(e)))?;
        s.persist_new_doc(&mut doc)?;
        s.doc = Some(doc);
        s.sessions.clear();
        Ok(())
    }

    /// Adopts the thread of `peer`, a trusted desktop that owns it. A home that has a thread
    /// keeps it: a different thread is an error.
    pub async fn adopt(&self, genesis: ThreadGenesis) -> Result<(), ReplicaError> {
        self.blocking(move |s| {
            if let Some(doc) = &s.doc {
                if doc.genesis() == &genesis {
                    return Ok(());
                }
                return Err(ReplicaError::ThreadMismatch {
                    ours: doc.genesis().thread_id.to_string(),
                    theirs: genesis.thread_id.to_string(),
                });
            }
            let mut doc = ThreadDoc::create(&genesis, s.actor.clone());
            s.persist_new_doc(&mut doc)?;
            s.doc = Some(doc);
            tracing::info!(thread = %genesis.thread_id, "adopted the desktop's thread");
            Ok(())
        })
        .await?
    }

    /// Reads the document.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ThreadDoc) -> T + Send + 'static,
    ) -> Result<T, ReplicaError> {
        self.blocking(move |s| s.doc.as_ref().map(f).ok_or(ReplicaError::NoThread))
            .await?
    }

    /// Reads the document on the calling thread (for callers already off the async workers).
    pub fn read_now<T>(&self, f: impl FnOnce(&ThreadDoc) -> T) -> Result<T, ReplicaError> {
        self.lock()
            .doc
            .as_ref()
            .map(f)
            .ok_or(ReplicaError::NoThread)
    }

    /// Makes a local change durable, then wakes every session.
    pub async fn commit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut ThreadDoc) -> Result<T, WriteError> + Send + 'static,
    ) -> Result<(T, BTreeSet<TaskId>), ReplicaError> {
        let out = self
            .blocking(move |s| {
                let doc = s.doc.as_mut().ok_or(ReplicaError::NoThread)?;
                let before = doc.heads();
                let value = f(doc)?;
                let chunk = doc.save_incremental();
                let tasks = doc.tasks_changed_since(&before);
                let doc_id = doc.doc_id();
                if let Err(e) = s.store.write(|t| t.append_chunk(&doc_id, &chunk)) {
                    // Not durable, so not acknowledged: drop it from memory as well.
                    let _ = s.reload();
                    return Err(ReplicaError::from(e));
                }
                s.chunk_bytes += chunk.len() as u64;
                s.maybe_compact()?;
                Ok((value, tasks))
            })
            .await??;
        self.bump();
        Ok(out)
    }

    /// The next sync message for `peer`, if any.
    pub async fn generate(&self, peer: PeerId) -> Result<Option<(DocId, Vec<u8>)>, ReplicaError> {
        self.blocking(move |s| {
            let doc_id = s.doc.as_ref().map(ThreadDoc::doc_id)?;
            let mut doc = s.doc.take()?;
            let msg = s.session(&peer, &doc_id).next_message(&mut doc);
            s.doc = Some(doc);
            msg.map(|m| (doc_id, m))
        })
        .await
    }

    /// Applies a sync message from `peer`, durably with the peer's sync state.
    pub async fn receive(&self, peer: PeerId, bytes: Vec<u8>) -> Result<Merged, ReplicaError> {
        let merged = self
            .blocking(move |s| {
                let Some(mut doc) = s.doc.take() else {
                    return Err(ReplicaError::NoThread);
                };
                let doc_id = doc.doc_id();
                if let Err(e) = check_changes(&bytes) {
                    s.sessions.remove(&peer);
                    let _ = s
                        .store
                        .write(|t| t.delete_sync_state(&doc_id, &peer.to_base58()));
                    s.doc = Some(doc);
                    return Err(e);
                }
                let result = s.session(&peer, &doc_id).receive(&mut doc, &bytes);
                let received = match result {
                    Ok(r) => r,
                    Err(e) => {
                        s.sessions.remove(&peer);
                        let _ = s
                            .store
                            .write(|t| t.delete_sync_state(&doc_id, &peer.to_base58()));
                        if matches!(e, SyncError::Panicked) {
                            // The document may be half-applied: reload what the store holds.
                            let _ = s.reload();
                        } else {
                            s.doc = Some(doc);
                        }
                        return Err(e.into());
                    }
                };
                let chunk = doc.save_incremental();
                let session = s.session(&peer, &doc_id);
                let state = session.encode_state();
                let in_sync = session.in_sync(&mut doc);
                let tasks = if received.changed {
                    doc.tasks_changed_since(&received.heads_before)
                } else {
                    BTreeSet::new()
                };
                let stored = s.store.write(|t| {
                    t.append_chunk(&doc_id, &chunk)?;
                    t.put_sync_state(&doc_id, &peer.to_base58(), &state)
                });
                s.doc = Some(doc);
                if let Err(e) = stored {
                    s.sessions.remove(&peer);
                    let _ = s.reload();
                    return Err(ReplicaError::from(e));
                }
                s.chunk_bytes += chunk.len() as u64;
                s.maybe_compact()?;
                Ok(Merged {
                    tasks,
                    changed: received.changed,
                    in_sync,
                })
            })
            .await??;
        if merged.changed {
            self.bump();
        }
        Ok(merged)
    }

    /// True if `peer`'s last known heads equal ours.
    pub async fn in_sync(&self, peer: PeerId) -> bool {
        self.blocking(move |s| {
            let Some(mut doc) = s.doc.take() else {
                return false;
            };
            let doc_id = doc.doc_id();
            let r = s.session(&peer, &doc_id).in_sync(&mut doc);
            s.doc = Some(doc);
            r
        })
        .await
        .unwrap_or(false)
    }

    /// [`Self::in_sync`] on the calling thread (brief: compares two head lists).
    pub fn in_sync_now(&self, peer: PeerId) -> bool {
        let mut s = self.lock();
        let Some(mut doc) = s.doc.take() else {
            return false;
        };
        let doc_id = doc.doc_id();
        let r = s.session(&peer, &doc_id).in_sync(&mut doc);
        s.doc = Some(doc);
        r
    }

    /// Starts `peer`'s session afresh from its persisted state (a new stream).
    pub async fn restart_session(&self, peer: PeerId) {
        let _ = self
            .blocking(move |s| {
                s.sessions.remove(&peer);
            })
            .await;
    }

    /// Records the device behind `peer` in the thread if this home owns the thread and the
    /// record is missing or lacks `actor`. Only the owner's records count when read.
    pub async fn ensure_device(
        &self,
        peer: PeerId,
        name: String,
        kind: DeviceKind,
        actor: String,
        now: i64,
    ) -> Result<bool, ReplicaError> {
        let my_actor = self.actor().to_hex_string();
        let id: errand_core::DeviceId = peer
            .to_base58()
            .parse()
            .map_err(|e: errand_core::IdError| ReplicaError::Join(e.to_string()))?;
        let existing = self
            .read(move |d| (d.genesis().owner_actor.clone(), d.devices()))
            .await?;
        let (owner_actor, devices) = existing;
        if owner_actor != my_actor {
            return Ok(false);
        }
        let current = devices.into_iter().find(|d| d.id == id);
        if current
            .as_ref()
            .is_some_and(|d| d.actors.contains(&actor) && d.name == name)
        {
            return Ok(false);
        }
        let mut device = current.unwrap_or(errand_core::Device {
            id,
            name: name.clone(),
            kind,
            actors: Vec::new(),
            executors: Vec::new(),
            added_at: now,
            revoked_at: None,
        });
        if device.revoked_at.is_some() {
            return Ok(false);
        }
        device.name = name;
        if !device.actors.contains(&actor) {
            device.actors.push(actor);
        }
        self.commit(move |d| d.add_device(&device)).await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use automerge::{
        AutoCommit, ROOT,
        sync::{self, SyncDoc},
        transaction::Transactable,
    };

    use super::*;

    /// The messages `from` sends `to` until they are in sync.
    fn messages(from: &mut AutoCommit, to: &mut AutoCommit) -> Vec<Vec<u8>> {
        let (mut a, mut b) = (sync::State::new(), sync::State::new());
        let mut out = Vec::new();
        for _ in 0..10 {
            if let Some(m) = from.sync().generate_sync_message(&mut a) {
                out.push(m.clone().encode());
                to.sync().receive_sync_message(&mut b, m).unwrap();
            }
            if let Some(m) = to.sync().generate_sync_message(&mut b) {
                from.sync().receive_sync_message(&mut a, m).unwrap();
            }
        }
        out
    }

    #[test]
    fn sync_messages_with_changes_that_do_not_parse_are_refused() {
        // A whole document (first sync), then a delta: both pass.
        let mut ours = AutoCommit::new();
        for i in 0..50 {
            ours.put(ROOT, format!("k{i}"), i).unwrap();
            ours.commit();
        }
        let mut theirs = AutoCommit::new();
        for m in messages(&mut ours, &mut theirs) {
            check_changes(&m).unwrap();
        }
        ours.put(ROOT, "later", 1).unwrap();
        ours.commit();
        let delta = messages(&mut ours, &mut theirs);
        assert!(!delta.is_empty());
        for m in delta {
            check_changes(&m).unwrap();
        }
        // Not a sync message at all: left to the session's decode.
        check_changes(b"not a message").unwrap();
        // A well-formed message whose changes are garbage.
        let garbage = sync::Message {
            heads: Vec::new(),
            need: Vec::new(),
            have: Vec::new(),
            changes: vec![vec![
                0x85, 0x6f, 0x4a, 0x83, 1, 2, 3, 4, 1, 5, 9, 9, 9, 9, 9,
            ]]
            .into(),
            flags: None,
            version: sync::MessageVersion::V1,
        };
        assert!(matches!(
            check_changes(&garbage.encode()),
            Err(ReplicaError::BadChanges(_))
        ));
    }

    #[test]
    fn a_change_with_a_wrong_checksum_is_refused() {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "long", "x".repeat(4096)).unwrap();
        doc.commit();
        let mut change = doc.get_last_local_change().unwrap().clone();
        let plain = change.raw_bytes().to_vec();
        let compressed = change.bytes().to_vec();
        assert_eq!(compressed[8], 2, "a compressed change chunk");
        for chunk in [plain, compressed] {
            let message = |chunk: Vec<u8>| {
                sync::Message {
                    heads: Vec::new(),
                    need: Vec::new(),
                    have: Vec::new(),
                    changes: vec![chunk].into(),
                    flags: None,
                    version: sync::MessageVersion::V1,
                }
                .encode()
            };
            check_changes(&message(chunk.clone())).unwrap();
            let mut bad = chunk;
            bad[5] ^= 0xff;
            assert!(matches!(
                check_changes(&message(bad)),
                Err(ReplicaError::BadChanges(_))
            ));
        }
    }
}
