//! The thread document: schema, genesis, typed writes and validating reads.
//!
//! Root (DESIGN.md section 3):
//! ```text
//! schema: 1, thread_id, owner, owner_actor          <- genesis change, fixed actor, time 0
//! devices:  { <peer_id>: { name, kind, actors[], executors[], added_at, revoked_at? } }
//! messages: [ { id, kind, text, at, task? } ]
//! tasks:    { <task_id>: { id, instruction, executor, target, created_at, not_after?, events[] } }
//! ```
//! Reads reach `devices`, `messages` and `tasks` by their genesis object ids, never through the
//! root keys, so a later write over `ROOT.tasks` changes nothing. Device records count only
//! when the thread's owner (the desktop named in genesis) wrote them. Every other record's
//! author is the device that owns the actor of the op that created it, and each field must come
//! from that same actor.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use automerge::{
    ActorId, AutoCommit, ChangeHash, ObjId, ObjType, Prop, ROOT, ReadDoc, ScalarValue, Value,
    patches::PatchAction, transaction::CommitOptions, transaction::Transactable,
};
use errand_core::{
    BlobRef, Device, DeviceId, DeviceKind, EventKind, Message, MessageId, MessageKind,
    PermissionChoice, PlanEntry, Task, TaskEvent, TaskId, ThreadId, limits, time::Millis,
};

use errand_core::blob::{MAX_ATTACHMENTS, MAX_FILE_NAME_BYTES, MAX_MIME_BYTES};

mod routines;
pub use routines::NewRoutine;

/// The actor of the genesis change. Fixed, so every peer's genesis is byte-identical.
const GENESIS_ACTOR: &[u8] = b"errand-genesis-v1";
/// The schema version written in genesis.
pub const SCHEMA_VERSION: u64 = 1;
/// Op counters of the genesis change: `put schema, thread_id, owner, owner_actor`, then
/// `devices`, `messages`, `tasks`. Reads build the object ids from these.
const DEVICES_CTR: u64 = 5;
const MESSAGES_CTR: u64 = 6;
const TASKS_CTR: u64 = 7;

/// Identifies one Automerge document in the store and on the wire. A thread is one document
/// today; segments (DESIGN.md 3.1) will add more, each with its own id.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct DocId(String);

/// Longest document id accepted from the wire.
pub const MAX_DOC_ID_LEN: usize = 64;

impl DocId {
    /// The id of a thread's (single) document.
    pub fn thread(thread: &ThreadId) -> Self {
        Self(thread.to_string())
    }
    /// Parses an id received from a peer: short, printable ASCII.
    pub fn parse(s: &str) -> Option<Self> {
        (!s.is_empty() && s.len() <= MAX_DOC_ID_LEN && s.bytes().all(|b| b.is_ascii_graphic()))
            .then(|| Self(s.to_owned()))
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocId({})", self.0)
    }
}

/// What every peer of a thread must agree on to build the same genesis change.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ThreadGenesis {
    /// The thread.
    pub thread_id: ThreadId,
    /// The desktop that owns it: the only device whose device records and facts count.
    pub owner: DeviceId,
    /// The owner's Automerge actor id, hex.
    pub owner_actor: String,
}

impl ThreadGenesis {
    /// The id of this thread's meta document (the whole thread before segments existed).
    pub fn doc_id(&self) -> DocId {
        DocId::thread(&self.thread_id)
    }

    /// The id of segment `n` (>= 1): derived from the thread id and `n`, so two peers that
    /// roll over while apart create the same document.
    pub fn segment_doc_id(&self, n: u32) -> DocId {
        DocId(format!("{}.{n}", self.thread_id))
    }

    /// Which part of this thread a document id names: 0 for the meta document, n >= 1 for
    /// segment n, `None` for anything else.
    pub fn part_of(&self, id: &DocId) -> Option<u32> {
        let thread = self.thread_id.to_string();
        let rest = id.as_str().strip_prefix(thread.as_str())?;
        if rest.is_empty() {
            return Some(0);
        }
        let digits = rest.strip_prefix('.')?;
        if digits.is_empty()
            || digits.len() > 9
            || !digits.bytes().all(|b| b.is_ascii_digit())
            || digits.starts_with('0')
        {
            return None;
        }
        digits.parse().ok()
    }
}

/// A task to enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTask {
    /// What to do.
    pub instruction: String,
    /// Which of the target's executors runs it.
    pub executor: String,
    /// The desktop that runs it.
    pub target: DeviceId,
    /// Settle as cancelled (`expired`) rather than run after this time.
    pub not_after: Option<Millis>,
    /// Files sent with it (already stored locally), at most
    /// [`errand_core::blob::MAX_ATTACHMENTS`]; written in the same change as the task.
    pub attachments: Vec<BlobRef>,
}

/// Why a write was refused. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The instruction is empty.
    #[error("the instruction is empty")]
    EmptyInstruction,
    /// A text is over its cap.
    #[error("{what} is {len} bytes, over the limit of {max}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The task does not exist (or has not synced here yet).
    #[error("no task {0} in this thread")]
    UnknownTask(TaskId),
    /// The routine does not exist (or has not synced here yet).
    #[error("no routine {0} in this thread")]
    UnknownRoutine(errand_core::RoutineId),
    /// The schedule is not one a routine can have.
    #[error(transparent)]
    Schedule(errand_core::ScheduleError),
    /// A task with this id exists already.
    #[error("task {0} exists already")]
    TaskExists(TaskId),
    /// The segment the write belongs in is not held in memory.
    #[error("segment {0} of the thread is not loaded")]
    NotLoaded(u32),
    /// A file reference may not be written as it is.
    #[error(transparent)]
    Blob(#[from] errand_core::blob::BlobRefError),
    /// Automerge refused the write.
    #[error("document error: {0}")]
    Automerge(Box<automerge::AutomergeError>),
}

impl From<automerge::AutomergeError> for WriteError {
    fn from(e: automerge::AutomergeError) -> Self {
        Self::Automerge(Box::new(e))
    }
}

/// A segment is closed to new tasks once it holds this many changes. Automerge's sync
/// protocol and its loading walk the whole change history of a document, so their cost grows
/// with it (DESIGN.md 3.1: one new task costs 0.26 ms at about 1,250 changes and 15 ms at
/// 100,000). 10,000 changes (about 2,000 tasks of five changes each) keeps every document in
/// the range where a sync round stays around a couple of milliseconds and a load well under
/// 100 ms, while a busy thread still rolls over only every few weeks.
pub const SEGMENT_MAX_CHANGES: usize = 10_000;

/// A segment is also closed to new tasks once it holds this many ops, so that changes with
/// many ops cannot grow one document without bound while its change count stays low. Our
/// schema writes about six ops per change (a task and its usual events are about 30 ops in
/// 5 changes), so a segment of [`SEGMENT_MAX_CHANGES`] holds about 60,000: twice that is
/// only reached by unusually large changes.
pub const SEGMENT_MAX_OPS: usize = 120_000;

/// How far past the newest segment a peer may name a document: a rollover during a session
/// creates the next one, and a peer back from a long absence lists its own in the hello.
pub const SEGMENT_AHEAD: u32 = 4;

/// Op counters of a segment's genesis change: `put schema, thread_id, segment`, then
/// `messages`, `tasks`.
const SEG_MESSAGES_CTR: u64 = 4;
const SEG_TASKS_CTR: u64 = 5;

/// One Automerge document of a thread: the meta document (number 0, which also holds the
/// tasks and messages of a thread written before segments existed) or segment n >= 1.
pub struct Part {
    n: u32,
    id: DocId,
    doc: AutoCommit,
    tasks: ObjId,
    messages: ObjId,
    /// Local changes since the last [`Part::take_local_changes`].
    local: Vec<automerge::Change>,
    /// Heads at the last [`Part::save_incremental`] or [`Part::save`]: what the store holds.
    /// Kept here rather than in Automerge's own save cursor so a load does not have to encode
    /// every loaded change once more just to move that cursor.
    saved: Vec<ChangeHash>,
}

impl fmt::Debug for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Part")
            .field("id", &self.id)
            .field("changes", &self.changes())
            .finish_non_exhaustive()
    }
}

impl Part {
    /// The thread's meta document with its genesis, `actor` writing from then on.
    fn meta(genesis: &ThreadGenesis, actor: ActorId) -> Self {
        let mut doc = genesis_doc(
            actor.clone(),
            |doc| {
                doc.put(ROOT, "owner", genesis.owner.as_str())?;
                doc.put(ROOT, "owner_actor", genesis.owner_actor.as_str())?;
                doc.put_object(ROOT, "devices", ObjType::Map)?;
                Ok(())
            },
            genesis,
        );
        routines::add_routines_map(&mut doc, actor);
        Self {
            n: 0,
            id: genesis.doc_id(),
            saved: doc.get_heads(),
            doc,
            tasks: genesis_obj(TASKS_CTR),
            messages: genesis_obj(MESSAGES_CTR),
            local: Vec::new(),
        }
    }

    /// Segment `n` (>= 1) with its deterministic genesis.
    fn segment(genesis: &ThreadGenesis, n: u32, actor: ActorId) -> Self {
        let mut doc = genesis_doc(actor, |doc| doc.put(ROOT, "segment", u64::from(n)), genesis);
        Self {
            n,
            id: genesis.segment_doc_id(n),
            saved: doc.get_heads(),
            doc,
            tasks: genesis_obj(SEG_TASKS_CTR),
            messages: genesis_obj(SEG_MESSAGES_CTR),
            local: Vec::new(),
        }
    }

    /// Applies stored bytes (a snapshot, then chunks) on top of the genesis.
    ///
    /// A leading compacted snapshot that holds this part's genesis is loaded with
    /// `Automerge::load`, which builds the op set from the snapshot's columns; applying it
    /// with `load_incremental` instead rebuilds and applies every change one by one, about
    /// five times the work. The chunks after it are applied as changes.
    fn load<'a>(
        mut self,
        parts: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Self, automerge::AutomergeError> {
        let mut parts = parts.into_iter().peekable();
        if let Some(first) = parts.next_if(|p| is_document_chunk(p)) {
            let genesis = self.doc.get_heads();
            match AutoCommit::load(first) {
                Ok(mut doc) if genesis.iter().all(|h| doc.get_change_by_hash(h).is_some()) => {
                    doc.set_actor(self.doc.get_actor().clone());
                    self.doc = doc;
                }
                // Not this part's history (or unreadable as a whole): apply it as changes,
                // which reports what is wrong with it.
                _ => {
                    self.doc.load_incremental(first)?;
                }
            }
        }
        // The chunks go in as one batch: Automerge applies a batch of changes in one pass
        // over its columns, so one call per stored chunk redid that pass per chunk (a small
        // phone home holding 61 one-change chunks after its snapshot, one per `send`, opened
        // in 11 ms that way and in 7 ms in one call).
        let rest: Vec<&[u8]> = parts.collect();
        match rest.as_slice() {
            [] => {}
            [one] => {
                self.doc.load_incremental(one)?;
            }
            many => {
                self.doc.load_incremental(&many.concat())?;
            }
        }
        self.saved = self.doc.get_heads();
        self.doc.reset_diff_cursor();
        Ok(self)
    }

    /// The document id.
    pub fn id(&self) -> &DocId {
        &self.id
    }

    /// Changes in the document (Automerge keeps the count).
    pub fn changes(&self) -> usize {
        self.doc.stats().num_changes as usize
    }

    /// Ops in the document (Automerge keeps the count).
    pub fn ops(&self) -> usize {
        self.doc.stats().num_ops as usize
    }

    /// The Automerge document, for the sync session and the push path.
    pub fn automerge(&mut self) -> &mut AutoCommit {
        &mut self.doc
    }

    /// Current heads (sorted).
    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// Changes since the last `save_incremental`/`save`, for appending to the store. Every
    /// local commit and merge ends here, so this is also where Automerge's patch log is
    /// dropped: it keeps what loading and merging applied (84 MB of a 148 MB heap after
    /// loading a 100,000-change document, measured with massif), and nothing here reads it.
    pub fn save_incremental(&mut self) -> Vec<u8> {
        let bytes = self.doc.save_after(&self.saved);
        if !bytes.is_empty() {
            self.saved = self.doc.get_heads();
        }
        self.doc.reset_diff_cursor();
        bytes
    }

    /// The whole document, compacted, for a store snapshot.
    pub fn save(&mut self) -> Vec<u8> {
        let bytes = self.doc.save();
        self.saved = self.doc.get_heads();
        bytes
    }

    fn reader<'a>(&'a self, skipped: &'a AtomicU64, owner: &'a DeviceId) -> Reader<'a> {
        Reader {
            doc: &self.doc,
            tasks: &self.tasks,
            skipped,
            owner,
        }
    }

    fn commit(&mut self, now: Millis, what: &str) {
        self.doc
            .commit_with(CommitOptions::default().with_time(now).with_message(what));
        if let Some(c) = self.doc.get_last_local_change() {
            self.local.push(c);
        }
    }

    /// The local changes made since the last call, oldest first (for the push path and for
    /// finding the tasks they touched).
    pub fn take_local_changes(&mut self) -> Vec<automerge::Change> {
        std::mem::take(&mut self.local)
    }

    /// Commits on success, rolls back on error, so a failed write leaves nothing behind.
    fn finish(
        &mut self,
        result: Result<(), automerge::AutomergeError>,
        now: Millis,
        what: &str,
    ) -> Result<(), WriteError> {
        match result {
            Ok(()) => {
                self.commit(now, what);
                Ok(())
            }
            Err(e) => {
                self.doc.rollback();
                Err(e.into())
            }
        }
    }

    /// Tasks that gained content (the task itself or any of its events) between `before` and
    /// the current heads, by Automerge's diff of the tasks map. The diff walks every task
    /// (about 95% of a merge's CPU on a 20,000-task document, measured with callgrind) and
    /// sees nothing once a peer has hidden the map behind a new root value, so the replica
    /// uses [`ThreadDoc::tasks_touched`] instead.
    fn tasks_changed_since(&mut self, before: &[ChangeHash]) -> BTreeSet<TaskId> {
        let after = self.doc.get_heads();
        if before == after.as_slice() {
            return BTreeSet::new();
        }
        let tasks = self.tasks.clone();
        let Ok(patches) = self.doc.diff_obj(&tasks, before, &after, true) else {
            return BTreeSet::new();
        };
        let mut out = BTreeSet::new();
        for p in patches {
            let key = if p.obj == tasks {
                match &p.action {
                    PatchAction::PutMap { key, .. } => Some(key.clone()),
                    _ => None,
                }
            } else {
                p.path.iter().find_map(|(obj, prop)| match prop {
                    Prop::Map(k) if *obj == tasks => Some(k.clone()),
                    _ => None,
                })
            };
            if let Some(id) = key.and_then(|k| k.parse::<TaskId>().ok()) {
                out.insert(id);
            }
        }
        out
    }

    fn has_task_key(&self, id: &TaskId) -> bool {
        self.doc
            .get_all(&self.tasks, id.to_string())
            .is_ok_and(|v| !v.is_empty())
    }
}

/// What a batch of changes touched: each op's object, its map key, what the op can do to a
/// task (only add, replace, or change its status), and for a new object under an existing
/// map key the actor that made it (a new task counts as unfinished without a read only if
/// that actor's device is in good standing). Decoded before the changes are applied (it
/// needs no document), resolved to tasks after ([`ThreadDoc::tasks_touched`]).
#[derive(Debug, Default, Clone)]
pub struct Touched(Vec<(ObjId, Option<String>, OpClass, Option<ActorId>)>);

/// What an op can do to a task, ordered from least to most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum OpClass {
    /// It only adds: a field of an object made in the same batch, or an element inserted
    /// into a list.
    Adds,
    /// It makes a new object under an existing map key: a new task in the tasks map, or a
    /// replacement anywhere else.
    Replaces,
    /// It can end a task or open a new attempt: a terminal fact, a retry, a delete, an
    /// overwrite of an existing object's field.
    Status,
}

/// Event kinds whose arrival can change whether a task is finished: the terminal facts, and
/// a retry or a reply (which open a new attempt).
fn status_kind(kind: &str) -> bool {
    EventKind::opening_names().contains(&kind) || EventKind::terminal_names().contains(&kind)
}

impl Touched {
    /// The objects and keys the ops of `changes` write to.
    ///
    /// An op counts as able to change a task's status ("status op") unless it is one of the
    /// writes that only add to a task: making a new object (a task, its events list, an
    /// event), inserting into a list, or putting a field of an object made in the same batch
    /// (other than a `kind` that is terminal or a retry). Everything else (a delete, an
    /// overwrite of an existing object's field, a terminal fact, a retry) is a status op, and
    /// makes the engine read that task.
    ///
    /// Ops on objects made in the same batch are left out unless they are status ops: the
    /// op that made the object names its parent, which leads to the same task.
    pub fn of<'a>(changes: impl IntoIterator<Item = &'a automerge::Change>) -> Self {
        use automerge::legacy::{Key, ObjectId, OpId, OpType};
        let mut out = Vec::new();
        // Objects made in this batch, by actor, then counter.
        let mut made: HashMap<ActorId, BTreeSet<u64>> = HashMap::new();
        for change in changes {
            let change = change.decode();
            let mut mine = made.remove(&change.actor_id).unwrap_or_default();
            for (i, op) in change.operations.into_iter().enumerate() {
                let id = change.start_op.get() + i as u64;
                let ObjectId::Id(OpId(ctr, actor)) = op.obj else {
                    continue;
                };
                let fresh = if actor == change.actor_id {
                    mine.contains(&ctr)
                } else {
                    made.get(&actor).is_some_and(|m| m.contains(&ctr))
                };
                let mut maker = None;
                let class = match &op.action {
                    OpType::Make(_) => {
                        mine.insert(id);
                        if fresh || op.insert {
                            OpClass::Adds
                        } else {
                            maker = Some(change.actor_id.clone());
                            OpClass::Replaces
                        }
                    }
                    OpType::Put(v) if fresh => match (&op.key, v) {
                        (Key::Map(k), ScalarValue::Str(kind))
                            if k == "kind" && status_kind(kind) =>
                        {
                            OpClass::Status
                        }
                        _ => OpClass::Adds,
                    },
                    OpType::Put(_) if op.insert => OpClass::Adds,
                    _ => OpClass::Status,
                };
                if fresh && class != OpClass::Status {
                    continue;
                }
                let key = match op.key {
                    Key::Map(k) => Some(k.to_string()),
                    Key::Seq(_) => None,
                };
                out.push((ObjId::Id(ctr, actor, 0), key, class, maker));
            }
            made.insert(change.actor_id, mine);
        }
        out.sort_by(|a, b| cmp_obj(&a.0, &b.0).then_with(|| a.1.cmp(&b.1)));
        // One entry per (object, key), with the most any of its ops can do.
        out.dedup_by(|later, kept| {
            let same = later.0 == kept.0 && later.1 == kept.1;
            if same {
                kept.2 = kept.2.max(later.2);
                // Two objects made under one map key: a conflict, read.
                if kept.1.is_some() && kept.3.is_some() && later.3.is_some() {
                    kept.2 = OpClass::Status;
                }
            }
            same
        });
        Self(out)
    }
}

/// Orders object ids by their op id (counter, then actor), without allocating.
fn cmp_obj(a: &ObjId, b: &ObjId) -> std::cmp::Ordering {
    match (a, b) {
        (ObjId::Id(ca, aa, _), ObjId::Id(cb, ab, _)) => {
            ca.cmp(cb).then_with(|| aa.to_bytes().cmp(ab.to_bytes()))
        }
        (ObjId::Root, ObjId::Root) => std::cmp::Ordering::Equal,
        (ObjId::Root, _) => std::cmp::Ordering::Less,
        (_, ObjId::Root) => std::cmp::Ordering::Greater,
    }
}

/// How a batch of changes touched one task, for the unfinished-task index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TaskTouch {
    /// New events or fields that cannot end the task or open a new attempt (output,
    /// progress, delivered, started, approvals, cancel requests): finished or not, it stays
    /// as it was.
    Content,
    /// The task itself was put into the tasks map: a new task, unfinished.
    Created,
    /// A terminal fact, a retry, a delete or an overwrite: whether it is finished is read.
    Status,
}

/// The thread: its meta document and the segments held in memory.
///
/// Writes go to the right document by themselves (devices to the meta document, new tasks
/// and messages to the newest segment, a task's events to the task's own segment); reads
/// cover the documents held in memory. Which segments are held is the caller's choice (the
/// replica keeps the newest one and those with unfinished tasks, and loads others on demand).
pub struct ThreadDoc {
    /// Known from creation, the store, the hello or the pairing handshake; never read back
    /// from the document, where a peer could supersede the root keys.
    genesis: ThreadGenesis,
    owner_actor: Option<ActorId>,
    actor: ActorId,
    meta: Part,
    segments: BTreeMap<u32, Part>,
    /// The highest segment number known to exist (0: none yet).
    newest: u32,
    /// Parts written locally since the last [`Self::take_dirty`].
    dirty: BTreeSet<u32>,
    /// [`SEGMENT_MAX_CHANGES`], or less in tests that exercise rollovers.
    segment_max: usize,
    /// [`SEGMENT_MAX_OPS`], scaled down with `segment_max` in tests.
    segment_max_ops: usize,
    skipped: AtomicU64,
    /// The device map of the meta document, rebuilt only when the meta document changed:
    /// every read of a task needs it, and rebuilding it was a fifth of the CPU a merged task
    /// cost (callgrind, issue 8).
    authors: Mutex<Option<(MetaVersion, Arc<Authors>)>>,
}

/// Identifies a state of the meta document for [`ThreadDoc::authors`]: changes only grow, and
/// an uncommitted write adds an op.
type MetaVersion = (u64, u64);

impl fmt::Debug for ThreadDoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadDoc")
            .field("actor", &self.actor.to_hex_string())
            .field("segments", &self.segments.keys().collect::<Vec<_>>())
            .field("newest", &self.newest)
            .finish_non_exhaustive()
    }
}

fn genesis_actor() -> ActorId {
    ActorId::from(GENESIS_ACTOR)
}

/// A document whose first change is a genesis: the fixed actor at time 0 writes `schema` and
/// `thread_id`, then what `more` adds, then the `messages` list and `tasks` map. From then on
/// `actor` writes. The genesis counts as stored (every peer derives it; it is never sent).
fn genesis_doc(
    actor: ActorId,
    more: impl FnOnce(&mut AutoCommit) -> Result<(), automerge::AutomergeError>,
    genesis: &ThreadGenesis,
) -> AutoCommit {
    let mut doc = AutoCommit::new().with_actor(genesis_actor());
    // These writes cannot fail on a fresh document.
    let _ = (|| {
        doc.put(ROOT, "schema", SCHEMA_VERSION)?;
        doc.put(ROOT, "thread_id", genesis.thread_id.to_string())?;
        more(&mut doc)?;
        doc.put_object(ROOT, "messages", ObjType::List)?;
        doc.put_object(ROOT, "tasks", ObjType::Map)?;
        Ok::<_, automerge::AutomergeError>(())
    })();
    doc.commit_with(CommitOptions::default().with_time(0));
    doc.set_actor(actor);
    let _ = doc.save_incremental();
    doc
}

/// Automerge's chunk magic bytes: every chunk is `magic | checksum(4) | type(1) | uleb128 len |
/// data`.
pub const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// True if `bytes` starts with an Automerge document chunk (a `save()`), not a change chunk
/// (type 1, or 2 compressed).
pub fn is_document_chunk(bytes: &[u8]) -> bool {
    bytes.len() > 8 && bytes[..4] == CHUNK_MAGIC && bytes[8] == 0
}

/// True if `actor` already wrote a `kind` event (for a terminal kind: any terminal event) in
/// `attempt` of the events list `events`.
fn has_own_fact(
    doc: &AutoCommit,
    events: &ObjId,
    actor: &ActorId,
    attempt: u32,
    kind: &EventKind,
) -> bool {
    let len = doc.length(events).min(limits::MAX_EVENTS_PER_TASK);
    (0..len).any(|i| {
        let Some((Value::Object(ObjType::Map), ev)) = doc.get(events, i).ok().flatten() else {
            return false;
        };
        if actor_of(&ev) != Some(actor) {
            return false;
        }
        let scalar = |key: &str| match doc.get(&ev, key).ok().flatten() {
            Some((Value::Scalar(v), _)) => Some(v.into_owned()),
            _ => None,
        };
        let same_attempt = match scalar("attempt") {
            Some(ScalarValue::Uint(a)) => a == u64::from(attempt),
            Some(ScalarValue::Int(a)) => a == i64::from(attempt),
            _ => false,
        };
        let Some(ScalarValue::Str(name)) = scalar("kind") else {
            return false;
        };
        same_attempt
            && (name.as_str() == kind.name()
                || (kind.is_terminal() && EventKind::terminal_names().contains(&name.as_str())))
    })
}

/// Refuses an event over the document's caps before anything is written.
fn check_event(kind: &EventKind) -> Result<(), WriteError> {
    let short = limits::MAX_SHORT_TEXT_BYTES;
    let too_many = |what: &'static str, n: usize, max: usize| {
        if n > max {
            Err(WriteError::TooLong { what, len: n, max })
        } else {
            Ok(())
        }
    };
    match kind {
        EventKind::Output { text } => check_len("output", text, limits::MAX_OUTPUT_EVENT_BYTES),
        EventKind::Failed { reason } | EventKind::Cancelled { reason } => {
            check_len("reason", reason, short)
        }
        EventKind::Replied { text } => check_len("reply", text, limits::MAX_MESSAGE_BYTES),
        EventKind::AgentSession { session_id, how } => {
            check_len("session id", session_id, short)?;
            check_len("session how", how, short)
        }
        EventKind::ToolCall {
            call_id,
            title,
            tool_kind,
            status,
        } => {
            for (what, v) in [
                ("tool call id", call_id),
                ("tool call title", title),
                ("tool kind", tool_kind),
                ("tool call status", status),
            ] {
                check_len(what, v, short)?;
            }
            Ok(())
        }
        EventKind::Plan { entries } => {
            too_many(
                "plan entries",
                entries.len(),
                errand_core::task::MAX_PLAN_ENTRIES,
            )?;
            for e in entries {
                check_len("plan entry", &e.content, short)?;
                check_len("plan status", &e.status, short)?;
            }
            Ok(())
        }
        EventKind::PermissionRequested {
            perm_id,
            title,
            tool_kind,
            options,
        } => {
            check_len("permission id", perm_id, short)?;
            check_len("permission title", title, short)?;
            check_len("tool kind", tool_kind, short)?;
            too_many(
                "permission options",
                options.len(),
                errand_core::task::MAX_PERMISSION_OPTIONS,
            )?;
            for o in options {
                check_len("option id", &o.id, short)?;
                check_len("option name", &o.name, short)?;
                check_len("option kind", &o.kind, short)?;
            }
            Ok(())
        }
        EventKind::PermissionAnswered { perm_id, option_id } => {
            check_len("permission id", perm_id, short)?;
            check_len("option id", option_id, short)
        }
        EventKind::PermissionResolved {
            perm_id,
            option_id,
            by,
        } => {
            check_len("permission id", perm_id, short)?;
            check_len("option id", option_id, short)?;
            check_len("answered by", by, short)
        }
        EventKind::Artifact { file } => Ok(file.check()?),
        _ => Ok(()),
    }
}

/// Writes a file reference's fields into `m`.
fn put_blob_ref(
    doc: &mut AutoCommit,
    m: &ObjId,
    b: &BlobRef,
) -> Result<(), automerge::AutomergeError> {
    doc.put(m, "hash", b.hash.to_string())?;
    doc.put(m, "name", b.name.as_str())?;
    doc.put(m, "size", b.size)?;
    doc.put(m, "mime", b.mime.as_str())?;
    Ok(())
}

/// Writes an event's own fields (beyond `at`, `kind` and `attempt`) into its map.
fn put_event_fields(
    doc: &mut AutoCommit,
    ev: &ObjId,
    kind: &EventKind,
) -> Result<(), automerge::AutomergeError> {
    match kind {
        EventKind::Output { text } | EventKind::Replied { text } => {
            doc.put(ev, "text", text.as_str())?
        }
        EventKind::Finished { exit_code } => doc.put(ev, "exit_code", *exit_code)?,
        EventKind::Failed { reason } | EventKind::Cancelled { reason } => {
            doc.put(ev, "reason", reason.as_str())?
        }
        EventKind::AgentSession { session_id, how } => {
            doc.put(ev, "session_id", session_id.as_str())?;
            doc.put(ev, "how", how.as_str())?;
        }
        EventKind::ToolCall {
            call_id,
            title,
            tool_kind,
            status,
        } => {
            doc.put(ev, "call_id", call_id.as_str())?;
            doc.put(ev, "title", title.as_str())?;
            doc.put(ev, "tool_kind", tool_kind.as_str())?;
            doc.put(ev, "status", status.as_str())?;
        }
        EventKind::Plan { entries } => {
            let list = doc.put_object(ev, "entries", ObjType::List)?;
            for (i, e) in entries.iter().enumerate() {
                let m = doc.insert_object(&list, i, ObjType::Map)?;
                doc.put(&m, "content", e.content.as_str())?;
                doc.put(&m, "status", e.status.as_str())?;
            }
        }
        EventKind::PermissionRequested {
            perm_id,
            title,
            tool_kind,
            options,
        } => {
            doc.put(ev, "perm_id", perm_id.as_str())?;
            doc.put(ev, "title", title.as_str())?;
            doc.put(ev, "tool_kind", tool_kind.as_str())?;
            let list = doc.put_object(ev, "options", ObjType::List)?;
            for (i, o) in options.iter().enumerate() {
                let m = doc.insert_object(&list, i, ObjType::Map)?;
                doc.put(&m, "id", o.id.as_str())?;
                doc.put(&m, "name", o.name.as_str())?;
                doc.put(&m, "kind", o.kind.as_str())?;
            }
        }
        EventKind::PermissionAnswered { perm_id, option_id } => {
            doc.put(ev, "perm_id", perm_id.as_str())?;
            doc.put(ev, "option_id", option_id.as_str())?;
        }
        EventKind::PermissionResolved {
            perm_id,
            option_id,
            by,
        } => {
            doc.put(ev, "perm_id", perm_id.as_str())?;
            doc.put(ev, "option_id", option_id.as_str())?;
            doc.put(ev, "by", by.as_str())?;
        }
        EventKind::Artifact { file } => put_blob_ref(doc, ev, file)?,
        _ => {}
    }
    Ok(())
}

fn genesis_obj(ctr: u64) -> ObjId {
    // The index is only a hint; automerge looks the actor up when it does not match.
    ObjId::Id(ctr, genesis_actor(), 0)
}

fn actor_of(id: &ObjId) -> Option<&ActorId> {
    match id {
        ObjId::Id(_, actor, _) => Some(actor),
        ObjId::Root => None,
    }
}

/// The identifying part of an op id, for ordering candidates deterministically.
fn op_key(id: &ObjId) -> (u64, Vec<u8>) {
    match id {
        ObjId::Id(ctr, actor, _) => (*ctr, actor.to_bytes().to_vec()),
        ObjId::Root => (0, Vec::new()),
    }
}

type Authors = HashMap<ActorId, (DeviceId, Option<Millis>)>;

impl ThreadDoc {
    /// A new thread: the meta document's genesis, then `actor` for all later writes.
    pub fn create(genesis: &ThreadGenesis, actor: ActorId) -> Self {
        Self {
            meta: Part::meta(genesis, actor.clone()),
            owner_actor: ActorId::try_from(genesis.owner_actor.as_str()).ok(),
            genesis: genesis.clone(),
            actor,
            segments: BTreeMap::new(),
            newest: 0,
            dirty: BTreeSet::new(),
            segment_max: SEGMENT_MAX_CHANGES,
            segment_max_ops: SEGMENT_MAX_OPS,
            skipped: AtomicU64::new(0),
            authors: Mutex::new(None),
        }
    }

    /// Rolls over to a new segment after `changes` changes instead of
    /// [`SEGMENT_MAX_CHANGES`] (tests and benchmarks that exercise rollovers).
    pub fn set_segment_limit(&mut self, changes: usize) {
        self.segment_max = changes.max(2);
        self.segment_max_ops = SEGMENT_MAX_OPS / SEGMENT_MAX_CHANGES * self.segment_max;
    }

    /// Loads the meta document from a snapshot followed by incremental chunks. Segments are
    /// attached separately ([`Self::attach_segment`]).
    pub fn load<'a>(
        parts: impl IntoIterator<Item = &'a [u8]>,
        genesis: &ThreadGenesis,
        actor: ActorId,
    ) -> Result<Self, automerge::AutomergeError> {
        let mut doc = Self::create(genesis, actor);
        let meta = std::mem::replace(&mut doc.meta, Part::meta(genesis, doc.actor.clone()));
        doc.meta = meta.load(parts)?;
        Ok(doc)
    }

    /// Loads segment `n` from stored bytes (none: a fresh segment) and holds it in memory.
    pub fn attach_segment<'a>(
        &mut self,
        n: u32,
        parts: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(), automerge::AutomergeError> {
        if n == 0 || self.segments.contains_key(&n) {
            return Ok(());
        }
        let part = Part::segment(&self.genesis, n, self.actor.clone()).load(parts)?;
        self.segments.insert(n, part);
        self.newest = self.newest.max(n);
        Ok(())
    }

    /// The heads of segment `n` holding nothing but its genesis: what a peer that never saw
    /// the segment has (it creates the same genesis on demand).
    pub fn segment_genesis_heads(&self, n: u32) -> Vec<ChangeHash> {
        Part::segment(&self.genesis, n.max(1), self.actor.clone())
            .doc
            .get_heads()
    }

    /// Releases segment `n` from memory (never the meta document). Its unsaved local
    /// changes must have been stored first.
    pub fn detach_segment(&mut self, n: u32) -> bool {
        self.segments.remove(&n).is_some()
    }

    /// Records that segment `n` exists (a stored or a peer's segment) without loading it.
    pub fn note_segment(&mut self, n: u32) {
        self.newest = self.newest.max(n);
    }

    /// The highest segment number known (0: none yet).
    pub fn newest_segment(&self) -> u32 {
        self.newest
    }

    /// Part numbers held in memory: 0 (the meta document) and the loaded segments.
    pub fn loaded(&self) -> Vec<u32> {
        std::iter::once(0)
            .chain(self.segments.keys().copied())
            .collect()
    }

    /// True if part `n` is held in memory.
    pub fn is_loaded(&self, n: u32) -> bool {
        n == 0 || self.segments.contains_key(&n)
    }

    /// Part `n`, if held in memory.
    pub fn part(&self, n: u32) -> Option<&Part> {
        if n == 0 {
            Some(&self.meta)
        } else {
            self.segments.get(&n)
        }
    }

    /// Part `n`, if held in memory.
    pub fn part_mut(&mut self, n: u32) -> Option<&mut Part> {
        if n == 0 {
            Some(&mut self.meta)
        } else {
            self.segments.get_mut(&n)
        }
    }

    /// Which part of this thread a document id names: 0 for the meta document, n for
    /// segment n. `None` for anything else.
    pub fn part_of(&self, id: &DocId) -> Option<u32> {
        self.genesis.part_of(id)
    }

    /// Parts written locally since the last call, for the caller to store.
    pub fn take_dirty(&mut self) -> BTreeSet<u32> {
        std::mem::take(&mut self.dirty)
    }

    /// The heads of every part in memory, tagged by part (for comparing replicas).
    pub fn heads(&mut self) -> Vec<(u32, Vec<ChangeHash>)> {
        let mut out = vec![(0, self.meta.heads())];
        for (n, p) in &mut self.segments {
            out.push((*n, p.heads()));
        }
        out
    }

    /// This replica's actor id.
    pub fn actor(&self) -> &ActorId {
        &self.actor
    }

    /// How many records reads have skipped as malformed or unauthorised, since creation.
    pub fn skipped_total(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// The genesis parameters of this thread.
    pub fn genesis(&self) -> &ThreadGenesis {
        &self.genesis
    }

    /// The meta document's id.
    pub fn doc_id(&self) -> DocId {
        self.genesis.doc_id()
    }

    // ---- writes ------------------------------------------------------------------------

    /// The segment new tasks and messages go to: the newest, or a new one when the newest is
    /// full (or none exists yet). The newest segment must be held in memory.
    fn newest_part(&mut self) -> Result<&mut Part, WriteError> {
        let full = match self.segments.get(&self.newest) {
            Some(p) => p.changes() >= self.segment_max || p.ops() >= self.segment_max_ops,
            None if self.newest == 0 => true,
            None => return Err(WriteError::NotLoaded(self.newest)),
        };
        if full {
            let n = self.newest + 1;
            tracing::info!(segment = n, "starting a new segment of the thread");
            self.segments
                .insert(n, Part::segment(&self.genesis, n, self.actor.clone()));
            self.newest = n;
        }
        let n = self.newest;
        self.dirty.insert(n);
        self.segments.get_mut(&n).ok_or(WriteError::NotLoaded(n))
    }

    /// Records (or updates) a device. Only the owner's records count when read.
    pub fn add_device(&mut self, device: &Device) -> Result<(), WriteError> {
        check_len("device name", &device.name, limits::MAX_SHORT_TEXT_BYTES)?;
        let devices = genesis_obj(DEVICES_CTR);
        let p = &mut self.meta;
        let result = (|| {
            let obj = p
                .doc
                .put_object(&devices, device.id.as_str(), ObjType::Map)?;
            p.doc.put(&obj, "name", device.name.as_str())?;
            p.doc.put(&obj, "kind", device.kind.as_str())?;
            let actors = p.doc.put_object(&obj, "actors", ObjType::List)?;
            for (i, a) in device.actors.iter().enumerate() {
                p.doc.insert(&actors, i, a.as_str())?;
            }
            let execs = p.doc.put_object(&obj, "executors", ObjType::List)?;
            for (i, e) in device.executors.iter().enumerate() {
                p.doc.insert(&execs, i, e.as_str())?;
            }
            p.doc.put(&obj, "added_at", device.added_at)?;
            if let Some(at) = device.revoked_at {
                p.doc.put(&obj, "revoked_at", at)?;
            }
            Ok::<_, automerge::AutomergeError>(())
        })();
        p.finish(result, device.added_at, "device")?;
        self.dirty.insert(0);
        Ok(())
    }

    /// Posts a chat message (to the newest segment).
    pub fn post_message(
        &mut self,
        kind: MessageKind,
        text: &str,
        task: Option<TaskId>,
        now: Millis,
    ) -> Result<MessageId, WriteError> {
        check_len("message", text, limits::MAX_MESSAGE_BYTES)?;
        let id = MessageId::new_at(now);
        let p = self.newest_part()?;
        let messages = p.messages.clone();
        let result = (|| {
            let at = p.doc.length(&messages);
            let obj = p.doc.insert_object(&messages, at, ObjType::Map)?;
            p.doc.put(&obj, "id", id.to_string())?;
            p.doc.put(&obj, "kind", kind.as_str())?;
            p.doc.put(&obj, "text", text)?;
            p.doc.put(&obj, "at", now)?;
            if let Some(task) = task {
                p.doc.put(&obj, "task", task.to_string())?;
            }
            Ok(())
        })();
        p.finish(result, now, "message")?;
        Ok(id)
    }

    /// Enqueues a task in the newest segment. One change; durable once the caller stores it.
    pub fn enqueue_task(&mut self, task: &NewTask, now: Millis) -> Result<TaskId, WriteError> {
        if task.instruction.trim().is_empty() {
            return Err(WriteError::EmptyInstruction);
        }
        check_len(
            "instruction",
            &task.instruction,
            limits::MAX_INSTRUCTION_BYTES,
        )?;
        check_len(
            "executor name",
            &task.executor,
            limits::MAX_SHORT_TEXT_BYTES,
        )?;
        if task.attachments.len() > MAX_ATTACHMENTS {
            return Err(WriteError::TooLong {
                what: "attachments",
                len: task.attachments.len(),
                max: MAX_ATTACHMENTS,
            });
        }
        for b in &task.attachments {
            b.check()?;
        }
        self.enqueue_task_with_id(task, TaskId::new_at(now), now)
    }

    /// Enqueues a task with a given id (a routine's occurrence) in the newest segment.
    fn enqueue_task_with_id(
        &mut self,
        task: &NewTask,
        id: TaskId,
        now: Millis,
    ) -> Result<TaskId, WriteError> {
        if task.instruction.trim().is_empty() {
            return Err(WriteError::EmptyInstruction);
        }
        if self.task_segment(&id).is_some() {
            return Err(WriteError::TaskExists(id));
        }
        let p = self.newest_part()?;
        let tasks = p.tasks.clone();
        let result = (|| {
            let obj = p.doc.put_object(&tasks, id.to_string(), ObjType::Map)?;
            p.doc.put(&obj, "id", id.to_string())?;
            p.doc.put(&obj, "instruction", task.instruction.as_str())?;
            p.doc.put(&obj, "executor", task.executor.as_str())?;
            p.doc.put(&obj, "target", task.target.as_str())?;
            p.doc.put(&obj, "created_at", now)?;
            if let Some(t) = task.not_after {
                p.doc.put(&obj, "not_after", t)?;
            }
            if !task.attachments.is_empty() {
                let list = p.doc.put_object(&obj, "attachments", ObjType::List)?;
                for (i, b) in task.attachments.iter().enumerate() {
                    let m = p.doc.insert_object(&list, i, ObjType::Map)?;
                    put_blob_ref(&mut p.doc, &m, b)?;
                }
            }
            p.doc.put_object(&obj, "events", ObjType::List)?;
            Ok(())
        })();
        p.finish(result, now, "task")?;
        Ok(id)
    }

    /// Appends an event to a task's history, in the task's own segment. Whether it counts is
    /// decided when folding: facts count only from the target, requests only from others.
    pub fn append_task_event(
        &mut self,
        task: TaskId,
        attempt: u32,
        kind: &EventKind,
        now: Millis,
    ) -> Result<(), WriteError> {
        check_event(kind)?;
        let authors = self.authors();
        let n = self
            .task_segment(&task)
            .ok_or(WriteError::UnknownTask(task))?;
        let skipped = &self.skipped;
        let p = if n == 0 {
            &mut self.meta
        } else {
            self.segments
                .get_mut(&n)
                .ok_or(WriteError::UnknownTask(task))?
        };
        let r = p.reader(skipped, &self.genesis.owner);
        let (obj, creator) = r
            .task_obj(&authors, &task)
            .ok_or(WriteError::UnknownTask(task))?;
        let events = r
            .obj_by(&obj, "events", &creator, ObjType::List)
            .ok_or(WriteError::UnknownTask(task))?;
        if !kind.is_repeated_fact()
            && !matches!(kind, EventKind::PermissionAnswered { .. })
            && has_own_fact(&p.doc, &events, &self.actor, attempt, kind)
        {
            // A fact is written once per attempt: a second one (a runner that misread the
            // task, or raced itself) would be noise at best and a loop at worst.
            tracing::debug!(task = %task, attempt, kind = kind.name(), "fact already recorded");
            return Ok(());
        }
        let result = (|| {
            let at = p.doc.length(&events);
            let ev = p.doc.insert_object(&events, at, ObjType::Map)?;
            p.doc.put(&ev, "at", now)?;
            p.doc.put(&ev, "kind", kind.name())?;
            p.doc.put(&ev, "attempt", attempt as u64)?;
            put_event_fields(&mut p.doc, &ev, kind)?;
            Ok(())
        })();
        p.finish(result, now, "event")?;
        self.dirty.insert(n);
        Ok(())
    }

    // ---- reads -------------------------------------------------------------------------

    /// Devices the owner has recorded, with the owner itself always present.
    pub fn devices(&self) -> Vec<Device> {
        let g = &self.genesis;
        let Some(owner_actor) = self.owner_actor.clone() else {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        };
        let r = self.meta.reader(&self.skipped, &self.genesis.owner);
        let devices = genesis_obj(DEVICES_CTR);
        let mut out = Vec::new();
        let mut owner_seen = false;
        for key in self.meta.doc.keys(&devices) {
            let Ok(id) = key.parse::<DeviceId>() else {
                r.skip("device", "key is not a device id");
                continue;
            };
            let Some(obj) = r.obj_by(&devices, &key, &owner_actor, ObjType::Map) else {
                r.skip("device", "not written by the thread's owner");
                continue;
            };
            match r.read_device(id, &obj, &owner_actor) {
                Some(mut d) => {
                    if d.id == g.owner {
                        owner_seen = true;
                        if !d.actors.contains(&g.owner_actor) {
                            d.actors.push(g.owner_actor.clone());
                        }
                        d.revoked_at = None; // the owner cannot be revoked
                    }
                    out.push(d)
                }
                None => r.skip("device", "malformed record"),
            }
        }
        if !owner_seen {
            out.push(Device {
                id: g.owner.clone(),
                name: String::new(),
                kind: DeviceKind::Desktop,
                actors: vec![g.owner_actor.clone()],
                executors: Vec::new(),
                added_at: 0,
                revoked_at: None,
            });
        }
        out
    }

    /// Maps every known actor to its device, with the device's revocation time.
    fn authors(&self) -> Arc<Authors> {
        let stats = self.meta.doc.stats();
        let version = (stats.num_changes, stats.num_ops);
        let mut cached = self.authors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((v, map)) = cached.as_ref()
            && *v == version
        {
            return Arc::clone(map);
        }
        let map = Arc::new(self.bound_actors());
        *cached = Some((version, Arc::clone(&map)));
        map
    }

    /// Every actor bound to exactly one device. The owner's actor is the owner's alone, the
    /// genesis actor is nobody's, and an actor that two records list counts for neither (a
    /// record made before actors were checked at binding could hold one).
    fn bound_actors(&self) -> Authors {
        let genesis = genesis_actor();
        let owner = &self.genesis.owner;
        let mut map: Authors = HashMap::new();
        let mut conflicting = BTreeSet::new();
        for d in self.devices() {
            for a in &d.actors {
                let Ok(actor) = ActorId::try_from(a.as_str()) else {
                    continue;
                };
                if actor == genesis
                    || actor == routines::routines_actor()
                    || (self.owner_actor.as_ref() == Some(&actor) && d.id != *owner)
                {
                    continue;
                }
                match map.get(&actor) {
                    Some((other, _)) if *other != d.id => {
                        conflicting.insert(actor);
                    }
                    _ => {
                        map.insert(actor, (d.id.clone(), d.revoked_at));
                    }
                }
            }
        }
        for actor in conflicting {
            map.remove(&actor);
        }
        map
    }

    /// True if this replica is the thread's owner desktop.
    pub fn owns_thread(&self) -> bool {
        self.owner_actor.as_ref() == Some(&self.actor)
    }

    /// Who may have written the changes `from` sends: see [`crate::ingest`].
    ///
    /// On the owner desktop, a phone sends only what its own bound actors wrote, and nothing
    /// once it is revoked. On a phone, the owner desktop relays what it took: anything but a
    /// new change under the genesis actor (the desktop checked every change at its ingest;
    /// reads attribute a change only through the device records). Anyone else sends nothing.
    pub fn authority_for(&self, from: &DeviceId) -> crate::ingest::Authority {
        if self.owns_thread() {
            let actors = self
                .authors()
                .iter()
                .filter(|(_, (id, revoked))| {
                    id == from && revoked.is_none() && id != &self.genesis.owner
                })
                .map(|(a, _)| a.clone())
                .collect();
            crate::ingest::Authority {
                actors,
                all_but: None,
            }
        } else if *from == self.genesis.owner {
            // The desktop checked each phone's changes as they came in. Its sync messages are
            // per document, so a phone's task (in a segment) can arrive before the device
            // record that binds its actor (in the meta document); reads skip it until then.
            crate::ingest::Authority {
                actors: BTreeSet::new(),
                all_but: Some(genesis_actor()),
            }
        } else {
            crate::ingest::Authority::default()
        }
    }

    /// True if an actor may be bound to `device`: it is not the genesis actor, not the
    /// owner's (unless `device` is the owner), and no other device lists it.
    pub fn actor_is_free_for(&self, device: &DeviceId, actor: &ActorId) -> bool {
        if *actor == genesis_actor() || *actor == routines::routines_actor() {
            return false;
        }
        if self.owner_actor.as_ref() == Some(actor) {
            return *device == self.genesis.owner;
        }
        self.devices()
            .iter()
            .filter(|d| d.id != *device)
            .all(|d| !d.actors.iter().any(|a| a.as_str() == actor.to_hex_string()))
    }

    fn parts(&self) -> impl Iterator<Item = &Part> {
        std::iter::once(&self.meta).chain(self.segments.values())
    }

    /// All well-formed tasks in the parts held in memory, oldest first. A task id found in
    /// two segments counts once, from the lower one.
    pub fn tasks(&self) -> Vec<Task> {
        let authors = self.authors();
        let mut out: BTreeMap<TaskId, Task> = BTreeMap::new();
        for p in self.parts() {
            let r = p.reader(&self.skipped, &self.genesis.owner);
            for key in p.doc.keys(&p.tasks) {
                if let Some(t) = r.read_task_key(&authors, &key) {
                    out.entry(t.id).or_insert(t);
                }
            }
        }
        out.into_values().collect()
    }

    /// Hands `f` each well-formed task in the parts held in memory, one at a time, for a scan
    /// that keeps little of each task: [`Self::tasks`] holds every task at once (a 20,000-task
    /// thread left a phone daemon's heap 3 to 6 MB larger after one such read). Parts are
    /// walked in order and a task id found in two segments counts once, from the lower one, as
    /// in [`Self::tasks`]; within a part the order is the map's.
    pub fn each_task(&self, mut f: impl FnMut(Task)) {
        let authors = self.authors();
        let mut seen = std::collections::HashSet::new();
        for p in self.parts() {
            let r = p.reader(&self.skipped, &self.genesis.owner);
            for key in p.doc.keys(&p.tasks) {
                if let Some(t) = r.read_task_key(&authors, &key)
                    && seen.insert(t.id)
                {
                    f(t);
                }
            }
        }
    }

    /// The well-formed tasks of part `n`, oldest first (empty if it is not held).
    pub fn tasks_in(&self, n: u32) -> Vec<Task> {
        let Some(p) = self.part(n) else {
            return Vec::new();
        };
        let authors = self.authors();
        let r = p.reader(&self.skipped, &self.genesis.owner);
        let mut out: Vec<Task> = p
            .doc
            .keys(&p.tasks)
            .filter_map(|key| r.read_task_key(&authors, &key))
            .collect();
        out.sort_by_key(|t| t.id);
        out
    }

    /// The part (among those held) that holds task `id`: the lowest, if several claim it.
    pub fn task_segment(&self, id: &TaskId) -> Option<u32> {
        self.parts().find(|p| p.has_task_key(id)).map(|p| p.n)
    }

    /// One task, if it is held in memory and well formed.
    pub fn task(&self, id: &TaskId) -> Option<Task> {
        let authors = self.authors();
        let key = id.to_string();
        self.parts().filter(|p| p.has_task_key(id)).find_map(|p| {
            p.reader(&self.skipped, &self.genesis.owner)
                .read_task_key(&authors, &key)
        })
    }

    /// The tasks with these ids that are held and well formed, oldest first.
    pub fn tasks_by_id(&self, ids: &BTreeSet<TaskId>) -> Vec<Task> {
        let authors = self.authors();
        ids.iter()
            .filter_map(|id| {
                let key = id.to_string();
                self.parts().filter(|p| p.has_task_key(id)).find_map(|p| {
                    p.reader(&self.skipped, &self.genesis.owner)
                        .read_task_key(&authors, &key)
                })
            })
            .collect()
    }

    /// All well-formed messages of the parts held in memory, in part then list order.
    pub fn messages(&self) -> Vec<Message> {
        let authors = self.authors();
        let mut out = Vec::new();
        for p in self.parts() {
            let r = p.reader(&self.skipped, &self.genesis.owner);
            let len = p.doc.length(&p.messages);
            for i in 0..len {
                let Some((Value::Object(ObjType::Map), obj)) =
                    p.doc.get(&p.messages, i).ok().flatten()
                else {
                    r.skip("message", "not a map");
                    continue;
                };
                match r.read_message(&authors, &obj) {
                    Some(m) => out.push(m),
                    None => r.skip("message", "malformed or from an unknown device"),
                }
            }
        }
        out
    }

    /// Tasks of part `n` that the ops in `touched` wrote to, and how: a new task (a key of
    /// the tasks map) or anything inside one (found through the object's parents, which
    /// Automerge keeps even when a peer has hidden the tasks map behind a new root value).
    /// Costs a few steps per op, whatever the size of the document.
    pub fn tasks_touched(&self, n: u32, touched: &Touched) -> BTreeMap<TaskId, TaskTouch> {
        let Some(p) = self.part(n) else {
            return BTreeMap::new();
        };
        let mut out = BTreeMap::new();
        let mut note = |id: TaskId, how: TaskTouch| {
            let e = out.entry(id).or_insert(how);
            *e = (*e).max(how);
        };
        let authors = self.authors();
        let mut last: Option<(&ObjId, Option<TaskId>)> = None;
        for (obj, key, class, maker) in &touched.0 {
            if *obj == p.tasks {
                if let Some(id) = key.as_deref().and_then(|k| k.parse().ok()) {
                    // A new task by a device in good standing is unfinished. Anything else
                    // done to its key (a delete, a scalar over it), and a task by an actor
                    // that is unknown or revoked, is read.
                    let good = maker
                        .as_ref()
                        .and_then(|a| authors.get(a))
                        .is_some_and(|(_, revoked)| revoked.is_none());
                    note(
                        id,
                        match class {
                            OpClass::Adds | OpClass::Replaces if good => TaskTouch::Created,
                            _ => TaskTouch::Status,
                        },
                    );
                }
                continue;
            }
            let how = match class {
                OpClass::Adds => TaskTouch::Content,
                OpClass::Replaces | OpClass::Status => TaskTouch::Status,
            };
            let task = match last {
                Some((o, task)) if o == obj => task,
                _ => {
                    let task = p.doc.parents(obj).ok().and_then(|parents| {
                        parents
                            .take(limits::MAX_DEPTH)
                            .find(|parent| parent.obj == p.tasks)
                            .and_then(|parent| match &parent.prop {
                                Prop::Map(k) => k.parse().ok(),
                                Prop::Seq(_) => None,
                            })
                    });
                    last = Some((obj, task));
                    task
                }
            };
            if let Some(id) = task {
                note(id, how);
            }
        }
        out
    }

    /// The unfinished-task index's new rows for what `touched` did to part `n`: (task,
    /// unfinished). A new task by a device in good standing is unfinished; a task touched by
    /// a status op is read ([`Self::unfinished`]); a task that only gained content keeps its
    /// row, and is left out.
    pub fn unfinished_rows(
        &self,
        n: u32,
        touched: &BTreeMap<TaskId, TaskTouch>,
    ) -> Vec<(TaskId, bool)> {
        let read: BTreeSet<TaskId> = touched
            .iter()
            .filter(|(id, how)| **how == TaskTouch::Status && self.task_segment(id) == Some(n))
            .map(|(id, _)| *id)
            .collect();
        let folded = self.unfinished(&read);
        touched
            .iter()
            .filter_map(|(id, how)| match how {
                TaskTouch::Content => None,
                TaskTouch::Created => Some((*id, true)),
                TaskTouch::Status => folded.get(id).map(|open| (*id, *open)),
            })
            .collect()
    }

    /// Whether each of `ids` (held in memory) counts as unfinished for the index: a task that
    /// reads and is not finished, or one written by an actor that no device record names
    /// yet (its record may still arrive: the desktop's runner starts from this index). A
    /// task that does not read for any other reason (its device was revoked before the
    /// desktop acted on it, a wrong target, malformed) is nobody's to run.
    pub fn unfinished(&self, ids: &BTreeSet<TaskId>) -> BTreeMap<TaskId, bool> {
        if ids.is_empty() {
            return BTreeMap::new();
        }
        let mut out: BTreeMap<TaskId, bool> = self
            .tasks_by_id(ids)
            .iter()
            .map(|t| (t.id, !errand_core::fold(t).status.is_terminal()))
            .collect();
        let authors = self.authors();
        for id in ids {
            if out.contains_key(id) {
                continue;
            }
            let key = id.to_string();
            let pending = self.parts().any(|p| {
                p.doc.get_all(&p.tasks, key.as_str()).is_ok_and(|all| {
                    all.iter().any(|(v, obj)| {
                        matches!(v, Value::Object(ObjType::Map))
                            && actor_of(obj).is_some_and(|a| !authors.contains_key(a))
                    })
                })
            });
            out.insert(*id, pending);
        }
        out
    }

    /// Every task key of part `n` (after a merge that carried a whole document).
    pub fn task_keys(&self, n: u32) -> BTreeSet<TaskId> {
        self.part(n)
            .map(|p| {
                p.doc
                    .keys(&p.tasks)
                    .filter_map(|k| k.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Tasks of part `n` that gained content (the task itself or any of its events) between
    /// `before` and its current heads. Uses Automerge's diff over the tasks object.
    pub fn tasks_changed_since(&mut self, n: u32, before: &[ChangeHash]) -> BTreeSet<TaskId> {
        self.part_mut(n)
            .map(|p| p.tasks_changed_since(before))
            .unwrap_or_default()
    }
}

/// Validating reads over one document.
struct Reader<'a> {
    doc: &'a AutoCommit,
    tasks: &'a ObjId,
    skipped: &'a AtomicU64,
    /// The thread's desktop: the only valid target of a task.
    owner: &'a DeviceId,
}

impl Reader<'_> {
    fn skip(&self, what: &str, why: &str) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(what, why, "skipped a record that does not fit the schema");
    }

    /// The task object and its creator's actor, choosing deterministically among conflicts.
    fn task_obj(&self, authors: &Authors, id: &TaskId) -> Option<(ObjId, ActorId)> {
        self.known_map(authors, self.tasks, &id.to_string())
    }

    /// The map at `map[key]` made by a known device's actor, and that actor, choosing
    /// deterministically among conflicting ones.
    fn known_map(&self, authors: &Authors, map: &ObjId, key: &str) -> Option<(ObjId, ActorId)> {
        let all = self.doc.get_all(map, key).ok()?;
        all.into_iter()
            .filter_map(|(v, obj)| match v {
                Value::Object(ObjType::Map) => {
                    let actor = actor_of(&obj)?.clone();
                    authors.contains_key(&actor).then_some((obj, actor))
                }
                _ => None,
            })
            .min_by_key(|(obj, _)| op_key(obj))
    }

    /// The value of `obj[key]` written by `author`, among concurrent values.
    fn value_by(&self, obj: &ObjId, key: &str, author: &ActorId) -> Option<(Value<'_>, ObjId)> {
        let all = self.doc.get_all(obj, key).ok()?;
        all.into_iter()
            .filter(|(_, id)| actor_of(id) == Some(author))
            .max_by_key(|(_, id)| op_key(id))
    }
    fn scalar_by(&self, obj: &ObjId, key: &str, author: &ActorId) -> Option<ScalarValue> {
        match self.value_by(obj, key, author)? {
            (Value::Scalar(s), _) => Some(s.into_owned()),
            _ => None,
        }
    }
    fn obj_by(&self, obj: &ObjId, key: &str, author: &ActorId, ty: ObjType) -> Option<ObjId> {
        match self.value_by(obj, key, author)? {
            (Value::Object(t), id) if t == ty => Some(id),
            _ => None,
        }
    }
    /// A string field written by `author`, at most `max` bytes.
    fn str_by(&self, obj: &ObjId, key: &str, author: &ActorId, max: usize) -> Option<String> {
        let all = self.doc.get_all(obj, key).ok()?;
        let (v, _) = all
            .into_iter()
            .filter(|(_, id)| actor_of(id) == Some(author))
            .max_by_key(|(_, id)| op_key(id))?;
        match v {
            Value::Scalar(s) => match s.as_ref() {
                ScalarValue::Str(s) if s.len() <= max => Some(s.to_string()),
                _ => None,
            },
            Value::Object(_) => None,
        }
    }
    fn int_by(&self, obj: &ObjId, key: &str, author: &ActorId) -> Option<i64> {
        match self.scalar_by(obj, key, author)? {
            ScalarValue::Int(i) | ScalarValue::Timestamp(i) => Some(i),
            ScalarValue::Uint(u) => i64::try_from(u).ok(),
            _ => None,
        }
    }
    /// The maps of the list `obj[key]` written by `author` (at most `max`; more is no list).
    fn maps_by(&self, obj: &ObjId, key: &str, author: &ActorId, max: usize) -> Option<Vec<ObjId>> {
        let list = self.obj_by(obj, key, author, ObjType::List)?;
        let len = self.doc.length(&list);
        if len > max {
            return None;
        }
        (0..len)
            .map(|i| match self.doc.get(&list, i).ok().flatten() {
                Some((Value::Object(ObjType::Map), m)) if actor_of(&m) == Some(author) => Some(m),
                _ => None,
            })
            .collect()
    }
    fn str_list_by(
        &self,
        obj: &ObjId,
        key: &str,
        author: &ActorId,
        max: usize,
    ) -> Option<Vec<String>> {
        let list = self.obj_by(obj, key, author, ObjType::List)?;
        let len = self.doc.length(&list);
        if len > max {
            return None;
        }
        let mut out = Vec::with_capacity(len);
        for i in 0..len {
            match self.doc.get(&list, i).ok().flatten() {
                Some((Value::Scalar(s), _)) => match s.as_ref() {
                    ScalarValue::Str(s) if s.len() <= limits::MAX_SHORT_TEXT_BYTES => {
                        out.push(s.to_string())
                    }
                    _ => return None,
                },
                _ => return None,
            }
        }
        Some(out)
    }
    /// A file reference in `m`, all of it written by `by`: a 64-hex hash, a file name (read
    /// as a plain one), a size, a valid media type.
    fn read_blob_ref(&self, m: &ObjId, by: &ActorId) -> Option<BlobRef> {
        let b = BlobRef {
            hash: self.str_by(m, "hash", by, 64)?.parse().ok()?,
            // A name that is not one plain file name (`../../x`, `C:\\a`) is read as the
            // plain name it ends in: the file still arrives, and never by its path.
            name: errand_core::safe_file_name(&self.str_by(m, "name", by, MAX_FILE_NAME_BYTES)?),
            size: match self.scalar_by(m, "size", by)? {
                ScalarValue::Uint(u) => u,
                ScalarValue::Int(i) => u64::try_from(i).ok()?,
                _ => return None,
            },
            mime: self.str_by(m, "mime", by, MAX_MIME_BYTES)?,
        };
        b.check().ok()?;
        Some(b)
    }
    fn read_device(&self, id: DeviceId, obj: &ObjId, by: &ActorId) -> Option<Device> {
        Some(Device {
            id,
            name: self.str_by(obj, "name", by, limits::MAX_SHORT_TEXT_BYTES)?,
            kind: self.str_by(obj, "kind", by, 16)?.parse().ok()?,
            actors: self.str_list_by(obj, "actors", by, limits::MAX_ACTORS_PER_DEVICE)?,
            executors: self
                .str_list_by(obj, "executors", by, limits::MAX_EXECUTORS)
                .unwrap_or_default(),
            added_at: self.int_by(obj, "added_at", by).unwrap_or(0),
            revoked_at: self.int_by(obj, "revoked_at", by),
        })
    }
    fn read_task_key(
        &self,
        authors: &HashMap<ActorId, (DeviceId, Option<Millis>)>,
        key: &str,
    ) -> Option<Task> {
        let Ok(id) = key.parse::<TaskId>() else {
            self.skip("task", "key is not a task id");
            return None;
        };
        let Ok(all) = self.doc.get_all(self.tasks, key) else {
            return None;
        };
        let mut candidates: Vec<_> = all
            .into_iter()
            .filter_map(|(v, obj)| matches!(v, Value::Object(ObjType::Map)).then_some(obj))
            .collect();
        candidates.sort_by_key(op_key);
        for obj in candidates {
            match self.read_task(authors, id, &obj) {
                Some(t) => return Some(t),
                None => self.skip("task", "malformed or from an unknown device"),
            }
        }
        None
    }
    fn read_task(
        &self,
        authors: &HashMap<ActorId, (DeviceId, Option<Millis>)>,
        id: TaskId,
        obj: &ObjId,
    ) -> Option<Task> {
        let creator = actor_of(obj)?;
        let (author, revoked_at) = authors.get(creator)?.clone();
        let by = creator;
        let stored_id: TaskId = self.str_by(obj, "id", by, 26)?.parse().ok()?;
        if stored_id != id {
            return None;
        }
        let instruction = self.str_by(obj, "instruction", by, limits::MAX_INSTRUCTION_BYTES)?;
        let executor = self.str_by(obj, "executor", by, limits::MAX_SHORT_TEXT_BYTES)?;
        let target: DeviceId = self.str_by(obj, "target", by, 128)?.parse().ok()?;
        if target != *self.owner {
            // One thread belongs to one desktop: a task for anyone else is nobody's to run.
            self.skip("task", "its target is not the thread's desktop");
            return None;
        }
        let created_at = self.int_by(obj, "created_at", by)?;
        let not_after = self.int_by(obj, "not_after", by);
        // Attachments are part of the task: absent is none, malformed makes the task
        // malformed (its creator wrote both in one change).
        let attachments = match self.value_by(obj, "attachments", by) {
            None => Vec::new(),
            Some(_) => self
                .maps_by(obj, "attachments", by, MAX_ATTACHMENTS)?
                .iter()
                .map(|m| self.read_blob_ref(m, by))
                .collect::<Option<Vec<_>>>()?,
        };
        let events_obj = self.obj_by(obj, "events", by, ObjType::List)?;
        let mut events = Vec::new();
        let mut output_bytes = 0usize;
        let len = self
            .doc
            .length(&events_obj)
            .min(limits::MAX_EVENTS_PER_TASK);
        for i in 0..len {
            let Some((Value::Object(ObjType::Map), ev)) =
                self.doc.get(&events_obj, i).ok().flatten()
            else {
                self.skip("event", "not a map");
                continue;
            };
            match self.read_event(authors, &ev) {
                Some((e, ev_revoked)) => {
                    // Requests from a revoked device no longer count.
                    if ev_revoked && e.author != target {
                        self.skip("event", "from a revoked device");
                        continue;
                    }
                    if let EventKind::Output { text } = &e.kind {
                        output_bytes += text.len();
                        if output_bytes > limits::MAX_OUTPUT_PER_TASK_BYTES {
                            self.skip("event", "output over the per-task cap");
                            continue;
                        }
                    }
                    events.push(e)
                }
                None => self.skip("event", "malformed or from an unknown device"),
            }
        }
        // A revoked device's task stays visible only if its desktop already acted on it.
        if revoked_at.is_some() && !events.iter().any(|e| e.author == target) {
            self.skip("task", "from a revoked device and never acted on");
            return None;
        }
        Some(Task {
            id,
            instruction,
            executor,
            target,
            author,
            created_at,
            not_after,
            attachments,
            events,
        })
    }
    fn read_event(
        &self,
        authors: &HashMap<ActorId, (DeviceId, Option<Millis>)>,
        ev: &ObjId,
    ) -> Option<(TaskEvent, bool)> {
        let by = actor_of(ev)?;
        let (author, revoked_at) = authors.get(by)?.clone();
        let at = self.int_by(ev, "at", by)?;
        let attempt = u32::try_from(self.int_by(ev, "attempt", by)?).ok()?;
        if attempt == 0 {
            return None;
        }
        let short = limits::MAX_SHORT_TEXT_BYTES;
        let field = |obj: &ObjId, key: &str| self.str_by(obj, key, by, short);
        let text = |key: &str| field(ev, key);
        let kind = match self.str_by(ev, "kind", by, 32)?.as_str() {
            "fetching" => EventKind::Fetching,
            "delivered" => EventKind::Delivered,
            "approval_requested" => EventKind::ApprovalRequested,
            "started" => EventKind::Started,
            "output" => EventKind::Output {
                text: self.str_by(ev, "text", by, limits::MAX_OUTPUT_EVENT_BYTES)?,
            },
            "finished" => EventKind::Finished {
                exit_code: self.int_by(ev, "exit_code", by)?,
            },
            "failed" => EventKind::Failed {
                reason: self.str_by(ev, "reason", by, limits::MAX_SHORT_TEXT_BYTES)?,
            },
            "cancelled" => EventKind::Cancelled {
                reason: self.str_by(ev, "reason", by, limits::MAX_SHORT_TEXT_BYTES)?,
            },
            "denied" => EventKind::Denied,
            "interrupted" => EventKind::Interrupted,
            "approved" => EventKind::Approved,
            "cancel_requested" => EventKind::CancelRequested,
            "retried" => EventKind::Retried,
            "replied" => EventKind::Replied {
                text: self.str_by(ev, "text", by, limits::MAX_MESSAGE_BYTES)?,
            },
            "agent_session" => EventKind::AgentSession {
                session_id: text("session_id")?,
                how: text("how")?,
            },
            "tool_call" => EventKind::ToolCall {
                call_id: text("call_id")?,
                title: text("title")?,
                tool_kind: text("tool_kind")?,
                status: text("status")?,
            },
            "plan" => EventKind::Plan {
                entries: self
                    .maps_by(ev, "entries", by, errand_core::task::MAX_PLAN_ENTRIES)?
                    .into_iter()
                    .map(|m| {
                        Some(PlanEntry {
                            content: field(&m, "content")?,
                            status: field(&m, "status")?,
                        })
                    })
                    .collect::<Option<_>>()?,
            },
            "permission_requested" => EventKind::PermissionRequested {
                perm_id: text("perm_id")?,
                title: text("title")?,
                tool_kind: text("tool_kind")?,
                options: self
                    .maps_by(ev, "options", by, errand_core::task::MAX_PERMISSION_OPTIONS)?
                    .into_iter()
                    .map(|m| {
                        Some(PermissionChoice {
                            id: field(&m, "id")?,
                            name: field(&m, "name")?,
                            kind: field(&m, "kind")?,
                        })
                    })
                    .collect::<Option<_>>()?,
            },
            "permission_answered" => EventKind::PermissionAnswered {
                perm_id: text("perm_id")?,
                option_id: text("option_id")?,
            },
            "permission_resolved" => EventKind::PermissionResolved {
                perm_id: text("perm_id")?,
                option_id: text("option_id")?,
                by: text("by")?,
            },
            "artifact" => EventKind::Artifact {
                file: self.read_blob_ref(ev, by)?,
            },
            _ => return None,
        };
        Some((
            TaskEvent {
                at,
                attempt,
                author,
                kind,
            },
            revoked_at.is_some(),
        ))
    }
    fn read_message(
        &self,
        authors: &HashMap<ActorId, (DeviceId, Option<Millis>)>,
        obj: &ObjId,
    ) -> Option<Message> {
        let by = actor_of(obj)?;
        let (author, revoked_at) = authors.get(by)?.clone();
        let at = self.int_by(obj, "at", by)?;
        if revoked_at.is_some_and(|r| at > r) {
            return None;
        }
        Some(Message {
            id: self.str_by(obj, "id", by, 26)?.parse().ok()?,
            author,
            kind: MessageKind::parse(&self.str_by(obj, "kind", by, 16)?)?,
            text: self.str_by(obj, "text", by, limits::MAX_MESSAGE_BYTES)?,
            at,
            task: match self.str_by(obj, "task", by, 26) {
                Some(t) => Some(t.parse().ok()?),
                None => None,
            },
        })
    }
}

fn check_len(what: &'static str, s: &str, max: usize) -> Result<(), WriteError> {
    if s.len() > max {
        Err(WriteError::TooLong {
            what,
            len: s.len(),
            max,
        })
    } else {
        Ok(())
    }
}
