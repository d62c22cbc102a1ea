//! The thread engine: the thread document split into parts (the meta document and its
//! segments), which segments are resident, the segment and unfinished-task indexes, the push
//! log, the per-(peer, document) sync sessions, the head digests, migration, and the ingest
//! check of everything a peer sends. It is sans-IO in the sense that matters here: no
//! sockets, no async runtime, no libp2p. Peers are keyed by [`DeviceId`]. Storage is this
//! crate's [`Store`] (redb), written in one transaction per step, before anything is
//! acknowledged. The network layer (`errand-p2p`'s replica) drives it from blocking threads.
//!
//! A change is acknowledged only once it is durable: local writes append their chunk before
//! returning, and merged remote changes are stored in the same transaction as the peer's
//! updated sync state.

mod export;
pub mod loopback;

pub use export::{ExportedDoc, TransferError, check_document};

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    time::{Duration, Instant},
};

use errand_core::{DeviceId, DeviceKind, TaskId};
use redb::ReadableTable;

use crate::{
    ActorId, ChangeHash, DocId, SEGMENT_AHEAD, Store, StoreError, SyncError, SyncSession,
    TaskTouch, ThreadDoc, ThreadGenesis, Touched, WriteError,
    ingest::{self, Authority, Bounds, Checked, IngestError, OpBudget, PEER_OPS_PER_MINUTE},
};

/// Store key of the thread's genesis (JSON).
pub const META_GENESIS: &str = "genesis";
/// Store key of this device's Automerge actor id (bytes).
pub const META_ACTOR: &str = "actor";

/// Why a replica operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The write was refused.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The peer's sync data was refused (boxed: Automerge's errors are large).
    #[error(transparent)]
    Sync(Box<SyncError>),
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
    /// The peer's changes do not parse, or Automerge refused them.
    #[error("the peer's changes do not parse: {0}")]
    BadChanges(String),
    /// The ingest check refused what the peer sent: nothing of it was applied.
    #[error("refused what the peer sent: {0}")]
    Refused(#[from] IngestError),
    /// An actor cannot be bound to the device.
    #[error("{0}")]
    ActorRefused(String),
    /// The peer is out of budget; its session may start again later.
    #[error("the peer is over its budget of {0} ops per minute; it may sync again shortly")]
    OutOfBudget(u64),
    /// A document id that is not part of this thread.
    #[error("the peer named a document that is not part of this thread")]
    NotOurDocument,
    /// A segment far past the newest one known.
    #[error("the peer named segment {0}, far past the newest segment of the thread")]
    UnknownDocument(u32),
    /// A peer id that is not a well-formed device id.
    #[error("the peer id is not a device id: {0}")]
    BadPeer(String),
    /// The task driving the engine panicked or was cancelled (the network layer runs the
    /// engine on blocking threads).
    #[error("internal task failed: {0}")]
    Join(String),
}

impl From<SyncError> for EngineError {
    fn from(e: SyncError) -> Self {
        Self::Sync(Box::new(e))
    }
}

/// What a received sync message or push did.
#[derive(Debug, Clone, Default)]
pub struct Merged {
    /// Tasks with new content.
    pub tasks: BTreeSet<TaskId>,
    /// True if the message moved our heads.
    pub changed: bool,
    /// After applying a push: our heads, durable, to acknowledge to the pusher.
    pub ack: Option<Vec<ChangeHash>>,
}

/// What to send a peer for one document.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// An Automerge sync message.
    Sync(Vec<u8>),
    /// The push path: our new changes, which take the peer from the heads it had (ours,
    /// before a local commit) to `heads`.
    Changes {
        /// Our heads after these changes.
        heads: Vec<ChangeHash>,
        /// The changes, as concatenated Automerge change chunks.
        changes: Vec<u8>,
    },
}

/// How often each sync path ran since the engine opened, for `status --json` and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PathCounts {
    /// Automerge sync messages sent.
    pub sync_sent: u64,
    /// Automerge sync messages received.
    pub sync_received: u64,
    /// Push frames sent (changes sent directly to a peer in sync).
    pub pushes_sent: u64,
    /// Push frames applied directly.
    pub pushes_applied: u64,
    /// Push frames whose dependencies were missing here (fell back to the sync protocol).
    pub pushes_refused: u64,
}

/// One local commit, kept briefly so peers in sync can be sent the change itself.
#[derive(Debug)]
struct Pushed {
    before: Vec<ChangeHash>,
    after: Vec<ChangeHash>,
    change: Vec<u8>,
}

/// Local commits remembered per document for the push path. A peer further behind than this
/// gets the sync protocol.
const PUSH_LOG: usize = 64;

/// A segment that is neither the newest nor holds unfinished tasks is released from memory
/// once it has not been touched for this long (it was loaded for a sync or a full read).
const RELEASE_IDLE: Duration = Duration::from_secs(10);

/// What an engine is opened with.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Ops per minute each phone may make the owner apply ([`PEER_OPS_PER_MINUTE`] by
    /// default; benchmarks that replay many catch-ups raise it).
    pub ops_per_minute: u64,
    /// Roll the thread over after this many changes instead of
    /// [`crate::SEGMENT_MAX_CHANGES`] (tests and benchmarks of long threads; peers with
    /// different bounds interoperate: the bound only decides when this device starts a
    /// segment).
    pub segment_limit: Option<usize>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            ops_per_minute: PEER_OPS_PER_MINUTE,
            segment_limit: None,
        }
    }
}

/// Most documents a peer may list in its hello. A segment holds about 2,000 tasks, so 4,096
/// documents are about eight million tasks: years of heavy use. A hello listing 100,000 made
/// the desktop create every one of them (issue 14).
pub const MAX_HELLO_DOCS: usize = 4_096;

/// Store key of the home's format: absent before segments, [`FORMAT`] since.
pub const META_FORMAT: &str = "format";
/// The current home format: a meta document plus segments, with the indexes below.
const FORMAT: &[u8] = b"2";

pub use crate::tables::{DOC_HEADS, OPEN_TASKS, TASK_SEGMENT};

#[derive(Debug, Default, Clone, Copy)]
struct Sizes {
    chunk_bytes: u64,
    snapshot_bytes: u64,
}

pub struct Engine {
    store: Store,
    actor: ActorId,
    doc: Option<ThreadDoc>,
    sessions: HashMap<(DeviceId, DocId), SyncSession>,
    sizes: HashMap<u32, Sizes>,
    /// Heads of every document of the thread, loaded or not (mirrors [`DOC_HEADS`]).
    heads: BTreeMap<u32, Vec<ChangeHash>>,
    /// Unfinished tasks per segment (mirrors [`OPEN_TASKS`]).
    open: BTreeMap<u32, BTreeSet<TaskId>>,
    pushlog: HashMap<u32, VecDeque<Pushed>>,
    touched: HashMap<u32, Instant>,
    /// The newest segment each peer listed in its hello: frames for segments up to it (and
    /// a little past, for rollovers during the session) are accepted.
    peer_newest: HashMap<DeviceId, u32>,
    /// Rollover bound for the thread (see [`ThreadDoc::set_segment_limit`]).
    segment_limit: Option<usize>,
    /// Each phone's budget of ops per minute (the owner desktop bounds its phones).
    budgets: HashMap<DeviceId, OpBudget>,
    /// Ops per minute each phone may make us apply ([`PEER_OPS_PER_MINUTE`] by default).
    ops_per_minute: u64,
    /// The clock of the budgets.
    epoch: Instant,
    /// This home owns the thread (kept apart from `doc`, which is taken out while a frame
    /// is applied: sessions made then must know it too).
    owner: bool,
    /// How often each sync path ran.
    stats: PathCounts,
    /// Most change bytes one frame may carry to each peer (see [`Self::set_part_limit`]);
    /// no bound for a peer not listed.
    part_limits: HashMap<DeviceId, usize>,
    /// What is in memory may differ from the store (a write failed and reading the store
    /// back failed too): every operation reloads first ([`Self::recover`]).
    stale: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("owner", &self.owner)
            .field("documents", &self.heads.len())
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}
fn heads_bytes(heads: &[ChangeHash]) -> Vec<u8> {
    heads.iter().flat_map(|h| h.0).collect()
}

fn heads_from(bytes: &[u8]) -> Vec<ChangeHash> {
    bytes
        .chunks_exact(32)
        .filter_map(|c| ChangeHash::try_from(c).ok())
        .collect()
}

/// The newest segment of a peer's hello that we may create here: segments above our newest
/// count only as far as the peer lists them without a gap (a peer rolls over one segment at a
/// time, and keeps every one it made). A hello that lists numbers far past ours therefore
/// creates nothing (issue 14: 100,000 numbers near 10^9 made 100,002 documents).
fn plausible_newest(listed: impl Iterator<Item = u32>, our_newest: u32) -> u32 {
    let listed: BTreeSet<u32> = listed.collect();
    let mut newest = listed
        .range(..=our_newest)
        .next_back()
        .copied()
        .unwrap_or(0);
    let mut next = our_newest.saturating_add(1);
    while next > newest && listed.contains(&next) {
        newest = next;
        next = next.saturating_add(1);
    }
    newest
}

/// A short digest of a document's heads, for the hello.
pub fn heads_digest(heads: &[ChangeHash]) -> String {
    use sha2::Digest;
    let mut sorted = heads.to_vec();
    sorted.sort();
    let mut h = sha2::Sha256::new();
    for head in &sorted {
        h.update(head.0);
    }
    h.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn is_open(task: &errand_core::Task) -> bool {
    !errand_core::fold(task).status.is_terminal()
}
impl Engine {
    fn doc_id(&self, n: u32) -> Option<DocId> {
        let g = self.doc.as_ref()?.genesis();
        Some(if n == 0 {
            g.doc_id()
        } else {
            g.segment_doc_id(n)
        })
    }

    /// Stores a new thread's meta document, in the current format.
    fn persist_new_doc(&mut self, doc: &mut ThreadDoc) -> Result<(), StoreError> {
        self.owner = doc.owns_thread();
        let genesis = doc.genesis().clone();
        let meta = doc.part_mut(0).map(|p| (p.save(), p.heads()));
        let Some((snapshot, heads)) = meta else {
            return Ok(());
        };
        self.store.write(|t| {
            t.put_meta_json(META_GENESIS, &genesis)?;
            t.put_meta(META_FORMAT, FORMAT)?;
            t.replace_snapshot(&genesis.doc_id(), &snapshot)?;
            t.table(DOC_HEADS)?
                .insert(genesis.doc_id().as_str(), heads_bytes(&heads).as_slice())?;
            Ok::<_, StoreError>(())
        })?;
        self.sizes.clear();
        self.sizes.insert(
            0,
            Sizes {
                chunk_bytes: 0,
                snapshot_bytes: snapshot.len() as u64,
            },
        );
        self.heads.clear();
        self.heads.insert(0, heads);
        self.open.clear();
        self.pushlog.clear();
        Ok(())
    }

    /// Reloads from the store after a failure; if that fails too (the store is still
    /// failing: a full disk), marks the engine stale so that the next operation tries again
    /// before it touches the document. A document holding a change that was not stored must
    /// never be used: a later chunk would be stored without it.
    fn reload_or_mark(&mut self) {
        match self.reload() {
            Ok(()) => self.stale = false,
            Err(e) => {
                tracing::error!(error = %e, "reloading the thread from the store failed; trying again on the next operation");
                self.stale = true;
            }
        }
    }

    /// Reloads from the store if an earlier failure left memory and store apart.
    fn recover(&mut self) -> Result<(), EngineError> {
        if self.stale {
            self.sessions.clear();
            self.reload()?;
            self.stale = false;
            tracing::info!("reloaded the thread from the store after a failure");
        }
        Ok(())
    }

    fn reload(&mut self) -> Result<(), EngineError> {
        self.pushlog.clear();
        self.touched.clear();
        let Some(genesis) = self.store.meta_json::<ThreadGenesis>(META_GENESIS)? else {
            self.doc = None;
            self.owner = false;
            return Ok(());
        };
        let loaded = self.store.load_doc(&genesis.doc_id())?;
        self.sizes.clear();
        self.sizes.insert(0, sizes_of(&loaded));
        let mut doc = ThreadDoc::load(loaded.parts(), &genesis, self.actor.clone())
            .map_err(|e| EngineError::Load(Box::new(e)))?;
        if self.store.meta(META_FORMAT)?.is_none() {
            migrate(&self.store, &mut doc)?;
        }
        // Which documents exist, and which tasks are unfinished where.
        self.heads = self
            .store
            .read_table(DOC_HEADS, |t| {
                let mut out = BTreeMap::new();
                for row in t.iter()? {
                    let (k, v) = row?;
                    if let Some(n) = DocId::parse(k.value()).and_then(|id| genesis.part_of(&id)) {
                        out.insert(n, heads_from(v.value()));
                    }
                }
                Ok(out)
            })?
            .unwrap_or_default();
        self.open = self
            .store
            .read_table(OPEN_TASKS, |t| {
                let mut out: BTreeMap<u32, BTreeSet<TaskId>> = BTreeMap::new();
                for row in t.iter()? {
                    let (k, v) = row?;
                    if let Ok(id) = k.value().parse::<TaskId>() {
                        out.entry(v.value()).or_default().insert(id);
                    }
                }
                Ok(out)
            })?
            .unwrap_or_default();
        let newest = self.heads.keys().copied().max().unwrap_or(0);
        doc.note_segment(newest);
        let mut wanted: BTreeSet<u32> = self
            .open
            .iter()
            .filter(|(_, t)| !t.is_empty())
            .map(|(n, _)| *n)
            .collect();
        wanted.insert(newest);
        if let Some(limit) = self.segment_limit {
            doc.set_segment_limit(limit);
        }
        self.owner = doc.owns_thread();
        self.doc = Some(doc);
        for n in wanted.into_iter().filter(|n| *n > 0) {
            self.attach(n)?;
        }
        Ok(())
    }

    /// Loads segment `n` from the store (a fresh one if nothing is stored) into memory.
    fn attach(&mut self, n: u32) -> Result<(), EngineError> {
        self.touched.insert(n, Instant::now());
        let Some(doc_id) = self.doc_id(n) else {
            return Err(EngineError::NoThread);
        };
        if self.doc.as_ref().is_some_and(|d| d.is_loaded(n)) {
            return Ok(());
        }
        let loaded = self.store.load_doc(&doc_id)?;
        let doc = self.doc.as_mut().ok_or(EngineError::NoThread)?;
        doc.attach_segment(n, loaded.parts())
            .map_err(|e| EngineError::Load(Box::new(e)))?;
        self.sizes.insert(n, sizes_of(&loaded));
        tracing::debug!(segment = n, bytes = loaded.bytes(), "loaded a segment");
        Ok(())
    }

    /// Releases segments that are not needed in memory: not the newest, no unfinished
    /// tasks, not touched for [`RELEASE_IDLE`] (or at all, with `now`).
    fn release_idle(&mut self, now: bool) {
        let Some(doc) = self.doc.as_mut() else {
            return;
        };
        let newest = doc.newest_segment();
        for n in doc.loaded() {
            let idle = now
                || self
                    .touched
                    .get(&n)
                    .is_none_or(|t| t.elapsed() >= RELEASE_IDLE);
            let open = self.open.get(&n).is_some_and(|t| !t.is_empty());
            if n > 0 && n != newest && !open && idle && doc.detach_segment(n) {
                self.pushlog.remove(&n);
                tracing::debug!(segment = n, "released a segment from memory");
            }
        }
    }

    fn maybe_compact(&mut self, n: u32) -> Result<(), StoreError> {
        let size = self.sizes.get(&n).copied().unwrap_or_default();
        if size.chunk_bytes <= crate::store::COMPACT_MIN_CHUNK_BYTES.max(size.snapshot_bytes) {
            return Ok(());
        }
        let Some(doc_id) = self.doc_id(n) else {
            return Ok(());
        };
        let Some(part) = self.doc.as_mut().and_then(|d| d.part_mut(n)) else {
            return Ok(());
        };
        let snapshot = part.save();
        self.store
            .write(|t| t.replace_snapshot(&doc_id, &snapshot))?;
        tracing::debug!(%doc_id, bytes = snapshot.len(), "compacted a document");
        self.sizes.insert(
            n,
            Sizes {
                chunk_bytes: 0,
                snapshot_bytes: snapshot.len() as u64,
            },
        );
        Ok(())
    }

    fn session(&mut self, peer: &DeviceId, doc_id: &DocId) -> &mut SyncSession {
        let store = &self.store;
        let owner = self.owner;
        self.sessions
            .entry((peer.clone(), doc_id.clone()))
            .or_insert_with(|| {
                let mut session = match store.sync_state(doc_id, peer.as_str()) {
                    Ok(Some(bytes)) => SyncSession::restore(doc_id.clone(), &bytes)
                        .unwrap_or_else(|_| SyncSession::new(doc_id.clone())),
                    _ => SyncSession::new(doc_id.clone()),
                };
                // Changes travel one by one, never as a whole document: the owner bounds a
                // phone's changes one by one (ingest), and a change taken out of a document
                // chunk can come out with another hash than the one its author gave it (the
                // engine harness found a segment's genesis re-hashed that way, which the
                // receiver then took for a forgery and refused for good).
                session.refuse_documents();
                // Nor as a bundle from a phone: its desktop takes none (ingest).
                if !owner {
                    session.send_no_bundles();
                }
                session
            })
    }

    /// Writes `chunk` of part `n` with its heads and index rows (and, for a merge, the peer's
    /// sync state) in one transaction, then updates the in-memory mirrors.
    fn store_part(
        &mut self,
        n: u32,
        chunk: &[u8],
        heads: &[ChangeHash],
        tasks: &BTreeMap<TaskId, TaskTouch>,
        sync_state: Option<(&DeviceId, &[u8])>,
    ) -> Result<(), StoreError> {
        let Some(doc_id) = self.doc_id(n) else {
            return Ok(());
        };
        let Some(doc) = self.doc.as_ref() else {
            return Ok(());
        };
        let open = doc.unfinished_rows(n, tasks);
        // A change to the meta document may record a device (whose tasks, indexed as
        // waiting for their author's record, can now be read) or revoke one (whose tasks
        // the desktop never acted on are nobody's to run): the other unfinished tasks are
        // read again. Meta changes are rare (pairing, revocation).
        let mut closed: Vec<TaskId> = Vec::new();
        if n == 0 && !chunk.is_empty() {
            let others: BTreeSet<TaskId> = self
                .open
                .values()
                .flatten()
                .filter(|id| !tasks.contains_key(id))
                .copied()
                .collect();
            closed = doc
                .unfinished(&others)
                .into_iter()
                .filter(|(_, open)| !open)
                .map(|(id, _)| id)
                .collect();
        }
        // A local change is durable before anything sees it (its actor's sequence numbers
        // must never be reused after a crash). A peer's changes merged here are committed
        // without waiting for the disk: the peer holds them durably, a crash loses them
        // together with the sync state that records them (so the next session asks again),
        // and the next durable commit (any local fact about them) persists them first.
        let write = |t: &mut crate::StoreTxn<'_>| {
            t.append_chunk(&doc_id, chunk)?;
            t.table(DOC_HEADS)?
                .insert(doc_id.as_str(), heads_bytes(heads).as_slice())?;
            write_task_index(t, n, tasks, &open)?;
            {
                let mut opened = t.table(OPEN_TASKS)?;
                for id in &closed {
                    opened.remove(id.to_string().as_str())?;
                }
            }
            if let Some((peer, state)) = sync_state {
                t.put_sync_state(&doc_id, peer.as_str(), state)?;
            }
            Ok::<_, StoreError>(())
        };
        if sync_state.is_some() {
            self.store.write_relaxed(write)?;
        } else {
            self.store.write(write)?;
        }
        self.heads.insert(n, heads.to_vec());
        for id in &closed {
            for set in self.open.values_mut() {
                set.remove(id);
            }
        }
        let set = self.open.entry(n).or_default();
        for (id, is_open) in open {
            if is_open {
                set.insert(id);
            } else {
                set.remove(&id);
            }
        }
        let size = self.sizes.entry(n).or_default();
        size.chunk_bytes += chunk.len() as u64;
        self.touched.insert(n, Instant::now());
        Ok(())
    }

    /// The part of the thread a peer's frame names, held in memory.
    fn resolve(&mut self, peer: &DeviceId, doc_id: &DocId) -> Result<u32, EngineError> {
        let n = self
            .doc
            .as_ref()
            .ok_or(EngineError::NoThread)?
            .part_of(doc_id)
            .ok_or(EngineError::NotOurDocument)?;
        self.part_for_peer(n, peer)?;
        Ok(n)
    }

    /// Stores what a peer's frame merged into part `n`, with the peer's sync state; on
    /// failure, forgets the session and reloads what the store holds.
    #[allow(clippy::too_many_arguments)]
    fn store_merge(
        &mut self,
        peer: &DeviceId,
        doc_id: DocId,
        n: u32,
        chunk: &[u8],
        heads: &[ChangeHash],
        tasks: &BTreeMap<TaskId, TaskTouch>,
        state: &[u8],
    ) -> Result<(), EngineError> {
        if let Err(e) = self.store_part(n, chunk, heads, tasks, Some((peer, state))) {
            self.sessions.remove(&(peer.clone(), doc_id));
            self.reload_or_mark();
            return Err(EngineError::from(e));
        }
        if !chunk.is_empty() {
            self.maybe_compact(n)?;
        }
        self.release_idle(false);
        Ok(())
    }

    /// The ingest check of what `peer` sent for part `n` (see [`crate::ingest`]): on the
    /// owner desktop, also the phone's bounds and its budget of ops. A refusal forgets the
    /// peer's session for the document, and is logged with its reason.
    fn ingest(
        &mut self,
        peer: &DeviceId,
        doc_id: &DocId,
        n: u32,
        check: impl FnOnce(&automerge::Automerge, &Authority, Bounds) -> Result<Checked, IngestError>,
    ) -> Result<Checked, EngineError> {
        let now = self.epoch.elapsed().as_millis() as u64;
        let per_minute = self.ops_per_minute;
        let doc = self.doc.as_mut().ok_or(EngineError::NoThread)?;
        let authority = doc.authority_for(peer);
        let owner = self.owner;
        let bounds = if owner {
            Bounds::PHONE
        } else {
            Bounds::DESKTOP
        };
        let part = doc.part_mut(n).ok_or(EngineError::NotOurDocument)?;
        let mut result = check(part.automerge().document(), &authority, bounds);
        if owner {
            let budget = self
                .budgets
                .entry(peer.clone())
                .or_insert_with(|| OpBudget::new(per_minute, now));
            match &result {
                Ok(checked) => {
                    if let Err(e) = budget.take(checked.ops, now) {
                        result = Err(e);
                    }
                }
                Err(_) => budget.drain(now),
            }
        }
        if let Err(e) = &result {
            tracing::warn!(%peer, doc = %doc_id, reason = %e, "refused what the peer sent; closing its session");
        }
        let result = result.map_err(EngineError::from);
        self.or_drop_session(peer, doc_id, result)
    }

    /// Passes `r` through; on an error, first forgets the peer's session for the document.
    fn or_drop_session<T>(
        &mut self,
        peer: &DeviceId,
        doc_id: &DocId,
        r: Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        if r.is_err() {
            self.drop_session(peer, doc_id);
        }
        r
    }

    /// Forgets a peer's session for a document, in memory and in the store.
    fn drop_session(&mut self, peer: &DeviceId, doc_id: &DocId) {
        self.sessions.remove(&(peer.clone(), doc_id.clone()));
        let _ = self
            .store
            .write(|t| t.delete_sync_state(doc_id, peer.as_str()));
    }

    /// Part `n` of the thread, loading it if it is stored or creating it fresh if it is a
    /// plausible new segment.
    fn part_for_peer(&mut self, n: u32, peer: &DeviceId) -> Result<(), EngineError> {
        let their_newest = self.peer_newest.get(peer).copied().unwrap_or(0);
        let doc = self.doc.as_ref().ok_or(EngineError::NoThread)?;
        if doc.is_loaded(n) {
            self.touched.insert(n, Instant::now());
            return Ok(());
        }
        let limit = doc
            .newest_segment()
            .max(their_newest)
            .saturating_add(SEGMENT_AHEAD);
        if !self.heads.contains_key(&n) && n > limit {
            return Err(EngineError::UnknownDocument(n));
        }
        self.attach(n)
    }

    /// Is the peer in sync with us on every document of the thread?
    fn in_sync_all(&mut self, peer: &DeviceId) -> bool {
        let Some(doc) = self.doc.as_mut() else {
            return false;
        };
        let g = doc.genesis().clone();
        let mut docs: BTreeMap<u32, Vec<ChangeHash>> = self.heads.clone();
        for n in doc.loaded() {
            if let Some(p) = doc.part_mut(n) {
                docs.insert(n, p.heads());
            }
        }
        docs.iter().all(|(n, heads)| {
            let id = if *n == 0 {
                g.doc_id()
            } else {
                g.segment_doc_id(*n)
            };
            self.sessions
                .get(&(peer.clone(), id))
                .is_some_and(|s| s.in_sync_at(heads))
        })
    }
}
/// Writes the task indexes for what a stored batch did to part `n`: a segment row for each
/// new task (a task stays in the segment it was created in), and the unfinished-task rows
/// `open` ([`ThreadDoc::unfinished_rows`]). Anything that stores a part's changes outside the
/// engine (a test that writes a home by hand) keeps the indexes the same way.
pub fn write_task_index(
    t: &mut crate::StoreTxn<'_>,
    n: u32,
    tasks: &BTreeMap<TaskId, TaskTouch>,
    open: &[(TaskId, bool)],
) -> Result<(), StoreError> {
    {
        let mut index = t.table(TASK_SEGMENT)?;
        for (id, how) in tasks {
            if *how != TaskTouch::Content {
                index.insert(id.to_string().as_str(), n)?;
            }
        }
    }
    let mut opened = t.table(OPEN_TASKS)?;
    for (id, is_open) in open {
        if *is_open {
            opened.insert(id.to_string().as_str(), n)?;
        } else {
            opened.remove(id.to_string().as_str())?;
        }
    }
    Ok(())
}

fn sizes_of(loaded: &crate::LoadedDoc) -> Sizes {
    Sizes {
        snapshot_bytes: loaded.snapshot.as_ref().map_or(0, |s| s.len() as u64),
        chunk_bytes: loaded.chunks.iter().map(|c| c.len() as u64).sum(),
    }
}

/// Brings a home written before segments to the current format. The single document it held
/// becomes the meta document, read as part 0 (its tasks and messages stay where they are:
/// authorship is the actor of each op, so history cannot be copied into new documents without
/// losing it); new tasks go to segments from now on. Nothing is rewritten, so an interrupted
/// migration simply runs again.
fn migrate(store: &Store, doc: &mut ThreadDoc) -> Result<(), EngineError> {
    let tasks = doc.tasks_in(0);
    let open: Vec<TaskId> = tasks.iter().filter(|t| is_open(t)).map(|t| t.id).collect();
    let heads = doc.part_mut(0).map(|p| p.heads()).unwrap_or_default();
    let meta_id = doc.doc_id();
    store.write(|t| {
        {
            let mut index = t.table(OPEN_TASKS)?;
            for id in &open {
                index.insert(id.to_string().as_str(), 0)?;
            }
        }
        t.table(DOC_HEADS)?
            .insert(meta_id.as_str(), heads_bytes(&heads).as_slice())?;
        t.put_meta(META_FORMAT, FORMAT)?;
        Ok::<_, StoreError>(())
    })?;
    tracing::info!(
        tasks = tasks.len(),
        unfinished = open.len(),
        "migrated the home to the segmented format: existing tasks stay in the meta document, new ones go to segments"
    );
    Ok(())
}

/// The pushable chain of local commits from `theirs` (the heads the peer has) to `ours`.
fn push_chain(
    log: &VecDeque<Pushed>,
    theirs: &[ChangeHash],
    ours: &[ChangeHash],
) -> Option<Vec<u8>> {
    let same = |a: &[ChangeHash], b: &[ChangeHash]| {
        let (mut a, mut b) = (a.to_vec(), b.to_vec());
        a.sort();
        b.sort();
        a == b
    };
    let start = log.iter().position(|p| same(&p.before, theirs))?;
    let mut out = Vec::new();
    let mut at: &[ChangeHash] = theirs;
    for p in log.iter().skip(start) {
        if !same(&p.before, at) {
            return None;
        }
        out.extend_from_slice(&p.change);
        at = &p.after;
    }
    same(at, ours).then_some(out)
}

impl Engine {
    /// Opens the engine over an opened store, loading the thread if the home has one (and
    /// migrating a home written before segments).
    pub fn open(store: Store, config: EngineConfig) -> Result<Self, EngineError> {
        let actor = match store.meta(META_ACTOR)? {
            Some(bytes) => ActorId::from(bytes.as_slice()),
            None => {
                let actor = ActorId::random();
                store.write(|t| t.put_meta(META_ACTOR, actor.to_bytes()))?;
                actor
            }
        };
        let mut engine = Self {
            store,
            actor,
            doc: None,
            sessions: HashMap::new(),
            sizes: HashMap::new(),
            heads: BTreeMap::new(),
            open: BTreeMap::new(),
            pushlog: HashMap::new(),
            touched: HashMap::new(),
            peer_newest: HashMap::new(),
            budgets: HashMap::new(),
            ops_per_minute: config.ops_per_minute,
            epoch: Instant::now(),
            owner: false,
            segment_limit: config.segment_limit,
            stats: PathCounts::default(),
            part_limits: HashMap::new(),
            stale: false,
        };
        engine.reload()?;
        Ok(engine)
    }

    /// The store under the engine (the same lock guards both).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// This device's actor.
    pub fn actor(&self) -> ActorId {
        self.actor.clone()
    }

    /// The thread's genesis, if this home has a thread.
    pub fn genesis(&self) -> Option<ThreadGenesis> {
        self.doc.as_ref().map(|d| d.genesis().clone())
    }

    /// The thread as held in memory (the meta document, the newest segment and those with
    /// unfinished tasks).
    pub fn doc(&self) -> Option<&ThreadDoc> {
        self.doc.as_ref()
    }

    /// Rolls the thread over after `changes` changes instead of
    /// [`crate::SEGMENT_MAX_CHANGES`] (tests and benchmarks of long threads).
    pub fn set_segment_limit(&mut self, changes: usize) {
        self.segment_limit = Some(changes);
        if let Some(doc) = self.doc.as_mut() {
            doc.set_segment_limit(changes);
        }
    }

    /// Reloads the thread from the store, as a restart would, and forgets every session.
    pub fn restart(&mut self) -> Result<(), EngineError> {
        self.sessions.clear();
        self.reload()
    }

    /// Bounds what one frame to `peer` carries to about `max_change_bytes` of changes (or
    /// lifts the bound, with `None`): a catch-up larger than that goes in parts, one per
    /// round trip, each stored by the peer with its sync state as it arrives, and a push
    /// chain larger than that goes through the sync protocol instead. The network layer sets
    /// it for a session over a relay circuit, which the relay closes after a number of bytes
    /// (one change bigger than the bound still goes alone, whole).
    pub fn set_part_limit(&mut self, peer: &DeviceId, max_change_bytes: Option<usize>) {
        match max_change_bytes {
            Some(max) => {
                self.part_limits.insert(peer.clone(), max);
            }
            None => {
                self.part_limits.remove(peer);
            }
        }
    }

    /// How often each sync path ran since the engine opened.
    pub fn path_counts(&self) -> PathCounts {
        self.stats
    }

    /// The thread's documents: (part number, loaded?, changes if loaded), oldest first.
    pub fn documents(&self) -> Vec<(u32, bool, Option<usize>)> {
        let Some(doc) = self.doc.as_ref() else {
            return Vec::new();
        };
        let mut parts: BTreeSet<u32> = self.heads.keys().copied().collect();
        parts.extend(doc.loaded());
        parts
            .into_iter()
            .map(|n| {
                let p = doc.part(n);
                (n, p.is_some(), p.map(|p| p.changes()))
            })
            .collect()
    }

    /// Creates this home's thread (desktop), if it has none.
    pub fn create_thread(&mut self, genesis: ThreadGenesis) -> Result<ThreadGenesis, EngineError> {
        if let Some(doc) = &self.doc {
            return Ok(doc.genesis().clone());
        }
        let mut doc = ThreadDoc::create(&genesis, self.actor.clone());
        self.persist_new_doc(&mut doc)?;
        self.doc = Some(doc);
        Ok(genesis)
    }

    /// Switches this home to `genesis` (a phone pairing with a desktop). The previous thread,
    /// if any, stays in the store under its own document ids but is no longer shown.
    pub fn replace_thread(&mut self, genesis: ThreadGenesis) -> Result<(), EngineError> {
        if self.doc.as_ref().is_some_and(|d| d.genesis() == &genesis) {
            return Ok(());
        }
        let loaded = self.store.load_doc(&genesis.doc_id())?;
        let mut doc = ThreadDoc::load(loaded.parts(), &genesis, self.actor.clone())
            .map_err(|e| EngineError::Load(Box::new(e)))?;
        self.persist_new_doc(&mut doc)?;
        self.doc = Some(doc);
        self.sessions.clear();
        // Segments of that thread already stored here (a phone pairing again).
        self.reload()
    }

    /// Adopts the thread of a trusted desktop that owns it. A home that has a thread keeps
    /// it: a different thread is an error.
    pub fn adopt(&mut self, genesis: ThreadGenesis) -> Result<(), EngineError> {
        if let Some(doc) = &self.doc {
            if doc.genesis() == &genesis {
                return Ok(());
            }
            return Err(EngineError::ThreadMismatch {
                ours: doc.genesis().thread_id.to_string(),
                theirs: genesis.thread_id.to_string(),
            });
        }
        let mut doc = ThreadDoc::create(&genesis, self.actor.clone());
        self.persist_new_doc(&mut doc)?;
        self.doc = Some(doc);
        tracing::info!(thread = %genesis.thread_id, "adopted the desktop's thread");
        Ok(())
    }

    /// Unfinished tasks, from the index kept with every stored change (no document is read):
    /// where the desktop's runner starts.
    pub fn open_tasks(&self) -> BTreeSet<TaskId> {
        self.open.values().flatten().copied().collect()
    }

    /// Reads the whole thread: every segment is loaded for the read and released after.
    pub fn read_all<T>(&mut self, f: impl FnOnce(&ThreadDoc) -> T) -> Result<T, EngineError> {
        let stored: Vec<u32> = self.heads.keys().copied().filter(|n| *n > 0).collect();
        for n in stored {
            self.attach(n)?;
        }
        let out = self.doc.as_ref().map(f).ok_or(EngineError::NoThread);
        self.release_idle(true);
        out
    }

    /// A page of the thread's history: up to `limit` tasks older than `before` (all tasks when
    /// `None`), newest first. Segments are loaded one at a time from the newest down, only
    /// as far as the page needs, and released after.
    pub fn tasks_before(
        &mut self,
        before: Option<TaskId>,
        limit: usize,
    ) -> Result<Vec<errand_core::Task>, EngineError> {
        let doc = self.doc.as_ref().ok_or(EngineError::NoThread)?;
        let mut parts: BTreeSet<u32> = self.heads.keys().copied().collect();
        parts.extend(doc.loaded());
        let mut out = Vec::new();
        let mut filled = false;
        for n in parts.into_iter().rev() {
            self.attach(n)?;
            let doc = self.doc.as_ref().ok_or(EngineError::NoThread)?;
            out.extend(
                doc.tasks_in(n)
                    .into_iter()
                    .filter(|t| before.is_none_or(|b| t.id < b)),
            );
            // Segments hold tasks in creation order, except for tasks queued offline
            // somewhere else; one more segment than needed covers the overlap.
            if out.len() >= limit {
                if filled {
                    break;
                }
                filled = true;
            }
        }
        self.release_idle(true);
        out.sort_by_key(|t| std::cmp::Reverse(t.id));
        out.dedup_by_key(|t| t.id);
        out.truncate(limit);
        Ok(out)
    }

    /// Makes sure the segment holding `task` is in memory (a request on an old task).
    pub fn ensure_task_loaded(&mut self, task: TaskId) -> Result<(), EngineError> {
        let doc = self.doc.as_ref().ok_or(EngineError::NoThread)?;
        if doc.task_segment(&task).is_some() {
            return Ok(());
        }
        let n = self
            .store
            .read_table(TASK_SEGMENT, |t| {
                Ok(t.get(task.to_string().as_str())?.map(|g| g.value()))
            })?
            .flatten();
        match n {
            Some(n) => self.attach(n),
            None => Ok(()),
        }
    }

    /// Makes a local change durable. Returns `f`'s value and the tasks it touched.
    pub fn commit<T>(
        &mut self,
        f: impl FnOnce(&mut ThreadDoc) -> Result<T, WriteError>,
    ) -> Result<(T, BTreeSet<TaskId>), EngineError> {
        self.recover()?;
        let doc = self.doc.as_mut().ok_or(EngineError::NoThread)?;
        let mut before = HashMap::new();
        for n in doc.loaded() {
            if let Some(p) = doc.part_mut(n) {
                before.insert(n, p.heads());
            }
        }
        let value = match f(doc) {
            Ok(v) => v,
            Err(e) => {
                doc.take_dirty();
                return Err(e.into());
            }
        };
        let mut all_tasks = BTreeSet::new();
        for n in doc.take_dirty() {
            let doc = self.doc.as_mut().ok_or(EngineError::NoThread)?;
            let Some(part) = doc.part_mut(n) else {
                continue;
            };
            let chunk = part.save_incremental();
            let heads = part.heads();
            let local = part.take_local_changes();
            let touched = Touched::of(&local);
            let change: Option<Vec<u8>> = (!local.is_empty()).then(|| {
                local
                    .into_iter()
                    .flat_map(|mut c| c.bytes().into_owned())
                    .collect()
            });
            // A segment created by this commit (a rollover) starts from its genesis.
            let was = before
                .get(&n)
                .cloned()
                .or_else(|| (n > 0).then(|| doc.segment_genesis_heads(n)));
            let tasks = doc.tasks_touched(n, &touched);
            if let Err(e) = self.store_part(n, &chunk, &heads, &tasks, None) {
                // Not durable, so not acknowledged: drop it from memory as well.
                self.reload_or_mark();
                return Err(EngineError::from(e));
            }
            if let (Some(before), Some(change)) = (was, change) {
                let log = self.pushlog.entry(n).or_default();
                log.push_back(Pushed {
                    before,
                    after: heads,
                    change,
                });
                while log.len() > PUSH_LOG {
                    log.pop_front();
                }
            }
            self.maybe_compact(n)?;
            all_tasks.extend(tasks.into_keys());
        }
        self.release_idle(false);
        Ok((value, all_tasks))
    }

    /// Everything to send `peer` now: for each document held in memory (and each in
    /// `extra`, loaded for the purpose) that is not settled, the pushed changes if the peer
    /// was in sync before them, or else the next sync message.
    pub fn outgoing(
        &mut self,
        peer: &DeviceId,
        extra: &[DocId],
    ) -> Result<Vec<(DocId, Outgoing)>, EngineError> {
        self.recover()?;
        let doc = self.doc.as_ref().ok_or(EngineError::NoThread)?;
        let mut parts: BTreeSet<u32> = doc.loaded().into_iter().collect();
        for id in extra {
            if let Some(n) = doc.part_of(id) {
                parts.insert(n);
            }
        }
        let mut out = Vec::new();
        let limit = self.part_limits.get(peer).copied();
        for n in parts {
            if self.part_for_peer(n, peer).is_err() {
                continue;
            }
            let Some(doc_id) = self.doc_id(n) else {
                continue;
            };
            // A segment the peer did not list and never synced with us: it holds no more
            // than the genesis there, so our first change in it can be pushed.
            let key = (peer.clone(), doc_id.clone());
            if n > 0
                && !self.sessions.contains_key(&key)
                && n > self.peer_newest.get(peer).copied().unwrap_or(0)
                && matches!(self.store.sync_state(&doc_id, peer.as_str()), Ok(None))
                && let Some(doc) = self.doc.as_ref()
            {
                let mut session = SyncSession::new(doc_id.clone());
                session.refuse_documents();
                if !self.owner {
                    session.send_no_bundles();
                }
                session.assume_in_sync(&doc.segment_genesis_heads(n));
                self.sessions.insert(key, session);
            }
            let mut doc = self.doc.take().ok_or(EngineError::NoThread)?;
            let msg = (|| {
                let part = doc.part_mut(n)?;
                let heads = part.heads();
                let session = self.session(peer, &doc_id);
                if session.settled_at(&heads) {
                    return None;
                }
                let theirs = session
                    .their_heads()
                    .map(<[_]>::to_vec)
                    .filter(|t| session.settled_at(t));
                let log_len = self.pushlog.get(&n).map_or(0, VecDeque::len);
                // A chain over the part limit goes through the sync protocol, in parts.
                let chain = theirs
                    .and_then(|t| self.pushlog.get(&n).and_then(|l| push_chain(l, &t, &heads)))
                    .filter(|c| limit.is_none_or(|max| c.len() <= max));
                let session = self.session(peer, &doc_id);
                if let Some(changes) = chain {
                    session.pushed(&heads);
                    self.stats.pushes_sent += 1;
                    return Some(Outgoing::Changes { heads, changes });
                }
                let m = session.next_part(part, limit)?;
                tracing::debug!(
                    doc = %doc_id,
                    ours = ?heads,
                    theirs = ?session.their_heads(),
                    pushable = log_len,
                    "sync message (not the push path)"
                );
                self.stats.sync_sent += 1;
                Some(Outgoing::Sync(m))
            })();
            self.doc = Some(doc);
            if let Some(m) = msg {
                out.push((doc_id, m));
            }
        }
        Ok(out)
    }

    /// Digests of our documents' heads for the hello: (part number, digest).
    pub fn digests(&mut self) -> Vec<(u32, String)> {
        let mut all = self.heads.clone();
        if let Some(doc) = self.doc.as_mut() {
            for n in doc.loaded() {
                if let Some(p) = doc.part_mut(n) {
                    all.insert(n, p.heads());
                }
            }
        }
        all.into_iter()
            .map(|(n, h)| (n, heads_digest(&h)))
            .collect()
    }

    /// Starts `peer`'s sessions afresh (a new stream) from its hello: documents whose heads
    /// match ours start in sync, with no message; the others are returned, to be synced.
    pub fn start_session(
        &mut self,
        peer: &DeviceId,
        theirs: Vec<(u32, String)>,
    ) -> Result<Vec<DocId>, EngineError> {
        self.recover()?;
        self.sessions.retain(|(p, _), _| p != peer);
        let now = self.epoch.elapsed().as_millis() as u64;
        let per_minute = self.ops_per_minute;
        let doc = self.doc.as_mut().ok_or(EngineError::NoThread)?;
        if self.owner
            && !self
                .budgets
                .entry(peer.clone())
                .or_insert_with(|| OpBudget::new(per_minute, now))
                .has_some(now)
        {
            return Err(EngineError::OutOfBudget(per_minute));
        }
        let g = doc.genesis().clone();
        let mut ours = self.heads.clone();
        for n in doc.loaded() {
            if let Some(p) = doc.part_mut(n) {
                ours.insert(n, p.heads());
            }
        }
        let our_newest = doc
            .newest_segment()
            .max(ours.keys().copied().max().unwrap_or(0));
        let their_newest = plausible_newest(theirs.iter().map(|(n, _)| *n), our_newest);
        self.peer_newest.insert(peer.clone(), their_newest);
        let limit = our_newest.max(their_newest);
        let theirs: BTreeMap<u32, String> =
            theirs.into_iter().filter(|(n, _)| *n <= limit).collect();
        let mut active = Vec::new();
        let all: BTreeSet<u32> = ours.keys().chain(theirs.keys()).copied().collect();
        for n in all.into_iter().filter(|n| *n <= limit) {
            let id = if n == 0 {
                g.doc_id()
            } else {
                g.segment_doc_id(n)
            };
            match (ours.get(&n), theirs.get(&n)) {
                (Some(h), Some(d)) if heads_digest(h) == *d => {
                    self.session(peer, &id).assume_in_sync(h);
                }
                _ => active.push(id),
            }
        }
        Ok(active)
    }

    /// Applies a sync message from `peer` for document `doc_id`, durably with the peer's
    /// sync state.
    pub fn receive(
        &mut self,
        peer: &DeviceId,
        doc_id: DocId,
        bytes: &[u8],
    ) -> Result<Merged, EngineError> {
        self.recover()?;
        self.stats.sync_received += 1;
        let n = self.resolve(peer, &doc_id)?;
        let msg = match automerge::sync::Message::decode(bytes) {
            Ok(msg) => msg,
            Err(e) => {
                self.drop_session(peer, &doc_id);
                return Err(SyncError::Decode(e).into());
            }
        };
        let checked = self.ingest(peer, &doc_id, n, |doc, authority, bounds| {
            ingest::check_message(&msg, doc, authority, bounds)
        })?;
        let (changes, touched) = (checked.changes, checked.touched);
        let mut doc = self.doc.take().ok_or(EngineError::NoThread)?;
        let Some(part) = doc.part_mut(n) else {
            self.doc = Some(doc);
            return Err(EngineError::NotOurDocument);
        };
        // Nothing waits in Automerge's queue for its dependencies: what this message applies
        // is exactly what the ingest check took from it.
        let nothing_queued = part.automerge().get_missing_deps(&[]).is_empty();
        // The changes the check parsed are the ones applied: each chunk is parsed once.
        let result = self
            .session(peer, &doc_id)
            .receive_checked(part, msg, changes);
        let received = match result {
            Ok(r) => r,
            Err(e) => {
                self.doc = Some(doc);
                self.drop_session(peer, &doc_id);
                if matches!(e, SyncError::Panicked) {
                    // The document may be half-applied: reload what the store holds.
                    self.reload_or_mark();
                }
                return Err(e.into());
            }
        };
        // What this message made Automerge apply: its own changes, and any it queued
        // earlier for want of their dependencies (a frame lost in between), which the
        // message's own changes do not name.
        let applied = if received.changed && !nothing_queued {
            Touched::of(&part.automerge().get_changes(&received.heads_before))
        } else {
            touched
        };
        let chunk = part.save_incremental();
        let heads = part.heads();
        let session = self.session(peer, &doc_id);
        let state = session.encode_state();
        let tasks = if !received.changed {
            BTreeMap::new()
        } else if checked.document {
            // A whole document: every task of the part is read.
            doc.task_keys(n)
                .into_iter()
                .map(|id| (id, TaskTouch::Status))
                .collect()
        } else {
            doc.tasks_touched(n, &applied)
        };
        self.doc = Some(doc);
        self.store_merge(peer, doc_id, n, &chunk, &heads, &tasks, &state)?;
        Ok(Merged {
            tasks: tasks.into_keys().collect(),
            changed: received.changed,
            ack: None,
        })
    }

    /// Applies changes `peer` pushed for `doc_id` (taking it to `theirs`), directly when we
    /// hold their dependencies; otherwise falls back to the sync protocol (the next
    /// [`Self::outgoing`] asks for what is missing).
    pub fn receive_changes(
        &mut self,
        peer: &DeviceId,
        doc_id: DocId,
        theirs: &[ChangeHash],
        bytes: &[u8],
    ) -> Result<Merged, EngineError> {
        self.recover()?;
        let n = self.resolve(peer, &doc_id)?;
        let checked = self.ingest(peer, &doc_id, n, |doc, authority, bounds| {
            ingest::check_pushed(bytes, doc, authority, bounds)
        })?;
        let (changes, touched) = (checked.changes, checked.touched);
        let mut doc = self.doc.take().ok_or(EngineError::NoThread)?;
        let Some(part) = doc.part_mut(n) else {
            self.doc = Some(doc);
            return Err(EngineError::NotOurDocument);
        };
        // Dependencies: in the document already, or earlier in the batch.
        let batch: BTreeSet<ChangeHash> = changes.iter().map(|c| c.hash()).collect();
        let outside: Vec<ChangeHash> = changes
            .iter()
            .flat_map(|c| c.deps().iter().copied())
            .filter(|d| !batch.contains(d))
            .collect();
        let am = part.automerge();
        let missing = !am.get_missing_deps(&outside).is_empty();
        if missing {
            self.session(peer, &doc_id).push_refused(theirs);
            self.doc = Some(doc);
            self.stats.pushes_refused += 1;
            return Ok(Merged::default());
        }
        let heads_before = am.get_heads();
        let nothing_queued = am.get_missing_deps(&[]).is_empty();
        let applied =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| am.apply_changes(changes)));
        match applied {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.doc = Some(doc);
                self.drop_session(peer, &doc_id);
                return Err(EngineError::BadChanges(e.to_string()));
            }
            Err(_) => {
                self.drop_session(peer, &doc_id);
                self.reload_or_mark();
                return Err(EngineError::BadChanges(
                    "automerge panicked while applying them".into(),
                ));
            }
        }
        let heads = part.heads();
        let changed = heads != heads_before;
        // Changes queued earlier for want of dependencies may have been applied with these.
        let touched = if changed && !nothing_queued {
            Touched::of(&part.automerge().get_changes(&heads_before))
        } else {
            touched
        };
        let chunk = part.save_incremental();
        let session = self.session(peer, &doc_id);
        session.applied_push(theirs, &heads);
        let state = session.encode_state();
        let tasks = if changed {
            doc.tasks_touched(n, &touched)
        } else {
            BTreeMap::new()
        };
        self.doc = Some(doc);
        self.store_merge(peer, doc_id, n, &chunk, &heads, &tasks, &state)?;
        self.stats.pushes_applied += 1;
        Ok(Merged {
            tasks: tasks.into_keys().collect(),
            changed,
            ack: Some(heads),
        })
    }

    /// `peer` acknowledged our pushes up to `heads` on `doc_id`.
    pub fn push_acked(&mut self, peer: &DeviceId, doc_id: DocId, heads: &[ChangeHash]) {
        if let Some(session) = self.sessions.get_mut(&(peer.clone(), doc_id)) {
            session.acked(heads);
        }
    }

    /// True if `peer`'s last known heads equal ours on every document of the thread.
    pub fn in_sync(&mut self, peer: &DeviceId) -> bool {
        self.in_sync_all(peer)
    }

    /// Records the device `id` in the thread with `actor`, if this home owns the thread.
    /// Returns whether anything was written.
    ///
    /// An actor is bound to a device only by the pairing handshake ([`Binding::Pairing`]),
    /// or, for a device trusted by hand (`devices add`) that has no actor yet, once by its
    /// first hello ([`Binding::FirstHello`]); a later hello never adds or changes one. The
    /// genesis actor, the owner's actor and an actor bound to another device are refused.
    pub fn ensure_device(
        &mut self,
        id: DeviceId,
        name: String,
        kind: DeviceKind,
        actor: String,
        binding: Binding,
        now: i64,
    ) -> Result<bool, EngineError> {
        let parsed = ActorId::try_from(actor.as_str())
            .map_err(|_| EngineError::ActorRefused(format!("{actor} is not an actor id")))?;
        let d = self.doc.as_ref().ok_or(EngineError::NoThread)?;
        let (owns, free, current) = (
            d.owns_thread(),
            d.actor_is_free_for(&id, &parsed),
            d.devices().into_iter().find(|x| x.id == id),
        );
        if !owns {
            return Ok(false);
        }
        if current
            .as_ref()
            .is_some_and(|d| d.actors.contains(&actor) && d.name == name)
        {
            return Ok(false);
        }
        let has_actor = current.as_ref().is_some_and(|d| !d.actors.is_empty());
        let may_bind = match binding {
            Binding::Pairing => true,
            Binding::FirstHello => !has_actor,
        };
        let peer = id.clone();
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
        if !device.actors.contains(&actor) {
            if !may_bind {
                tracing::warn!(%peer, claimed = %actor, "a hello claimed an actor the device was not paired with; ignored");
                if device.name == name {
                    return Ok(false);
                }
            } else if !free {
                return Err(EngineError::ActorRefused(format!(
                    "actor {actor} already belongs to another device (or to the thread itself)"
                )));
            } else {
                device.actors.push(actor);
            }
        }
        device.name = name;
        self.commit(move |d| d.add_device(&device))?;
        Ok(true)
    }
}

/// A frame of a sync session between two engines, as the wire carries it after the hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerFrame {
    /// An Automerge sync message for one document.
    Sync {
        /// The document.
        doc: DocId,
        /// The encoded message.
        message: Vec<u8>,
    },
    /// The push path: changes that take the receiver to `heads`; with no changes, the
    /// acknowledgement that the sender durably holds `heads`.
    Changes {
        /// The document.
        doc: DocId,
        /// The sender's heads after the changes.
        heads: Vec<ChangeHash>,
        /// Concatenated change chunks (empty for an acknowledgement).
        changes: Vec<u8>,
    },
}

impl PeerFrame {
    /// The document the frame is about.
    pub fn doc(&self) -> &DocId {
        match self {
            Self::Sync { doc, .. } | Self::Changes { doc, .. } => doc,
        }
    }
}

/// What one [`Engine::step`] of a session did.
#[derive(Debug, Default)]
pub struct Step {
    /// Frames to send the peer, in order (an acknowledgement first).
    pub frames: Vec<PeerFrame>,
    /// Tasks with new content from the peer.
    pub tasks: BTreeSet<TaskId>,
    /// Whether the peer is now in sync with us on every document.
    pub in_sync: bool,
}

impl Engine {
    /// One step of the sync session with `peer`, after its hello was taken by
    /// [`Self::start_session`]: applies `incoming` (if any: a step without one answers a
    /// local change), then says everything there is to say. `extra` holds documents to say
    /// something about even if they are not in memory (those the hello found different, and
    /// those the peer just wrote about); the step empties it.
    pub fn step(
        &mut self,
        peer: &DeviceId,
        incoming: Option<PeerFrame>,
        extra: &mut Vec<DocId>,
    ) -> Result<Step, EngineError> {
        let mut step = Step::default();
        if let Some(frame) = incoming {
            let doc = frame.doc().clone();
            let merged = match frame {
                PeerFrame::Sync { doc, message } => self.receive(peer, doc, &message)?,
                PeerFrame::Changes {
                    doc,
                    heads,
                    changes,
                } if changes.is_empty() => {
                    self.push_acked(peer, doc, &heads);
                    Merged::default()
                }
                PeerFrame::Changes {
                    doc,
                    heads,
                    changes,
                } => self.receive_changes(peer, doc, &heads, &changes)?,
            };
            if let Some(heads) = merged.ack {
                step.frames.push(PeerFrame::Changes {
                    doc: doc.clone(),
                    heads,
                    changes: Vec::new(),
                });
            }
            step.tasks = merged.tasks;
            extra.push(doc);
        }
        for (doc, out) in self.outgoing(peer, &std::mem::take(extra))? {
            step.frames.push(match out {
                Outgoing::Sync(message) => PeerFrame::Sync { doc, message },
                Outgoing::Changes { heads, changes } => PeerFrame::Changes {
                    doc,
                    heads,
                    changes,
                },
            });
        }
        step.in_sync = self.in_sync(peer);
        Ok(step)
    }

    /// Forgets what this engine knows of `peer`'s sync state for every document, in memory
    /// and in the store: the next session starts from nothing (a peer whose sync state was
    /// lost, or a test of that).
    pub fn forget_sync_states(&mut self, peer: &DeviceId) -> Result<(), EngineError> {
        let docs: Vec<DocId> = self.heads.keys().filter_map(|n| self.doc_id(*n)).collect();
        self.sessions.retain(|(p, _), _| p != peer);
        self.store.write(|t| {
            for doc in &docs {
                t.delete_sync_state(doc, peer.as_str())?;
            }
            Ok::<_, StoreError>(())
        })?;
        Ok(())
    }

    /// Revokes device `id` (the owner desktop): it stays in the thread's device list with
    /// the time of revocation, and nothing it sends is taken from then on.
    pub fn revoke_device(&mut self, id: &DeviceId, now: i64) -> Result<bool, EngineError> {
        let d = self.doc.as_ref().ok_or(EngineError::NoThread)?;
        let Some(mut device) = d.devices().into_iter().find(|x| &x.id == id) else {
            return Ok(false);
        };
        if device.revoked_at.is_some() {
            return Ok(false);
        }
        device.revoked_at = Some(now);
        self.commit(move |d| d.add_device(&device))?;
        self.sessions.retain(|(p, _), _| p != id);
        Ok(true)
    }
}

/// How [`Engine::ensure_device`] may bind an actor to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// The pairing handshake carried it: bind it (unless another device holds it).
    Pairing,
    /// A hello carried it: bind it only if the device has no actor yet (trusted by hand).
    FirstHello,
}

#[cfg(test)]
mod tests {
    use super::plausible_newest;

    #[test]
    fn a_hello_counts_segments_above_ours_only_without_a_gap() {
        assert_eq!(plausible_newest([0, 1, 2].into_iter(), 2), 2);
        assert_eq!(plausible_newest([0, 1, 2, 3, 4].into_iter(), 2), 4);
        assert_eq!(plausible_newest([0, 1, 5, 6].into_iter(), 2), 1);
        assert_eq!(plausible_newest(999_000_000..999_100_000, 3), 0);
        assert_eq!(
            plausible_newest([0, u32::MAX].into_iter(), u32::MAX - 1),
            u32::MAX
        );
    }
}
