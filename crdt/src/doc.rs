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
    collections::{BTreeSet, HashMap},
    fmt,
    sync::atomic::{AtomicU64, Ordering},
};

use automerge::{
    ActorId, AutoCommit, ChangeHash, ObjId, ObjType, Prop, ROOT, ReadDoc, ScalarValue, Value,
    patches::PatchAction, transaction::CommitOptions, transaction::Transactable,
};
use errand_core::{
    Device, DeviceId, DeviceKind, EventKind, Message, MessageId, MessageKind, Task, TaskEvent,
    TaskId, ThreadId, limits, time::Millis,
};

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
    /// The document id of this thread.
    pub fn doc_id(&self) -> DocId {
        DocId::thread(&self.thread_id)
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
    /// Automerge refused the write.
    #[error("document error: {0}")]
    Automerge(Box<automerge::AutomergeError>),
}

impl From<automerge::AutomergeError> for WriteError {
    fn from(e: automerge::AutomergeError) -> Self {
        Self::Automerge(Box::new(e))
    }
}

/// The thread document.
pub struct ThreadDoc {
    doc: AutoCommit,
    /// Known from creation, the store, the hello or the pairing handshake; never read back
    /// from the document, where a peer could supersede the root keys.
    genesis: ThreadGenesis,
    owner_actor: Option<ActorId>,
    skipped: AtomicU64,
}

impl fmt::Debug for ThreadDoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadDoc")
            .field("actor", &self.doc.get_actor().to_hex_string())
            .finish_non_exhaustive()
    }
}

fn genesis_actor() -> ActorId {
    ActorId::from(GENESIS_ACTOR)
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

impl ThreadDoc {
    /// A new thread document: the genesis change, then `actor` for all later writes.
    pub fn create(genesis: &ThreadGenesis, actor: ActorId) -> Self {
        let mut doc = AutoCommit::new().with_actor(genesis_actor());
        // These writes cannot fail on a fresh document.
        let _ = doc.put(ROOT, "schema", SCHEMA_VERSION);
        let _ = doc.put(ROOT, "thread_id", genesis.thread_id.to_string());
        let _ = doc.put(ROOT, "owner", genesis.owner.as_str());
        let _ = doc.put(ROOT, "owner_actor", genesis.owner_actor.as_str());
        let _ = doc.put_object(ROOT, "devices", ObjType::Map);
        let _ = doc.put_object(ROOT, "messages", ObjType::List);
        let _ = doc.put_object(ROOT, "tasks", ObjType::Map);
        doc.commit_with(CommitOptions::default().with_time(0));
        doc.set_actor(actor);
        Self::wrap(doc, genesis.clone())
    }

    /// Loads a document from a snapshot followed by incremental chunks. The genesis applied
    /// on top is a no-op when the stored document already holds it.
    pub fn load<'a>(
        parts: impl IntoIterator<Item = &'a [u8]>,
        genesis: &ThreadGenesis,
        actor: ActorId,
    ) -> Result<Self, automerge::AutomergeError> {
        let mut doc = Self::create(genesis, actor);
        for part in parts {
            doc.doc.load_incremental(part)?;
        }
        let _ = doc.doc.save_incremental();
        Ok(doc)
    }

    fn wrap(mut doc: AutoCommit, genesis: ThreadGenesis) -> Self {
        // Start from "nothing pending": what was loaded or created is persisted by the caller,
        // who stores `save()` of a new document (see [`Self::save`]).
        let _ = doc.save_incremental();
        Self {
            doc,
            owner_actor: ActorId::try_from(genesis.owner_actor.as_str()).ok(),
            genesis,
            skipped: AtomicU64::new(0),
        }
    }

    /// The Automerge document, for the sync session.
    pub(crate) fn automerge(&mut self) -> &mut AutoCommit {
        &mut self.doc
    }

    /// This replica's actor id.
    pub fn actor(&self) -> &ActorId {
        self.doc.get_actor()
    }

    /// Current heads.
    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// Changes since the last `save_incremental`/`save`, for appending to the store.
    pub fn save_incremental(&mut self) -> Vec<u8> {
        self.doc.save_incremental()
    }

    /// The whole document, compacted, for a store snapshot.
    pub fn save(&mut self) -> Vec<u8> {
        self.doc.save()
    }

    /// Everything not reachable from `heads`.
    pub fn save_after(&mut self, heads: &[ChangeHash]) -> Vec<u8> {
        self.doc.save_after(heads)
    }

    /// How many records reads have skipped as malformed or unauthorised, since creation.
    pub fn skipped_total(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    fn skip(&self, what: &str, why: &str) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(what, why, "skipped a record that does not fit the schema");
    }

    // ---- genesis ----------------------------------------------------------------------

    /// The genesis parameters of this thread.
    pub fn genesis(&self) -> &ThreadGenesis {
        &self.genesis
    }

    /// The document id of this thread.
    pub fn doc_id(&self) -> DocId {
        self.genesis.doc_id()
    }

    // ---- writes ------------------------------------------------------------------------

    fn commit(&mut self, now: Millis, what: &str) {
        self.doc
            .commit_with(CommitOptions::default().with_time(now).with_message(what));
    }

    /// Records (or updates) a device. Only the owner's records count when read.
    pub fn add_device(&mut self, device: &Device) -> Result<(), WriteError> {
        check_len("device name", &device.name, limits::MAX_SHORT_TEXT_BYTES)?;
        let devices = genesis_obj(DEVICES_CTR);
        let result = (|| {
            let obj = self
                .doc
                .put_object(&devices, device.id.as_str(), ObjType::Map)?;
            self.doc.put(&obj, "name", device.name.as_str())?;
            self.doc.put(&obj, "kind", device.kind.as_str())?;
            let actors = self.doc.put_object(&obj, "actors", ObjType::List)?;
            for (i, a) in device.actors.iter().enumerate() {
                self.doc.insert(&actors, i, a.as_str())?;
            }
            let execs = self.doc.put_object(&obj, "executors", ObjType::List)?;
            for (i, e) in device.executors.iter().enumerate() {
                self.doc.insert(&execs, i, e.as_str())?;
            }
            self.doc.put(&obj, "added_at", device.added_at)?;
            if let Some(at) = device.revoked_at {
                self.doc.put(&obj, "revoked_at", at)?;
            }
            Ok::<_, automerge::AutomergeError>(())
        })();
        self.finish(result, device.added_at, "device")
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

    /// Posts a chat message.
    pub fn post_message(
        &mut self,
        kind: MessageKind,
        text: &str,
        task: Option<TaskId>,
        now: Millis,
    ) -> Result<MessageId, WriteError> {
        check_len("message", text, limits::MAX_MESSAGE_BYTES)?;
        let id = MessageId::new_at(now);
        let messages = genesis_obj(MESSAGES_CTR);
        let result = (|| {
            let at = self.doc.length(&messages);
            let obj = self.doc.insert_object(&messages, at, ObjType::Map)?;
            self.doc.put(&obj, "id", id.to_string())?;
            self.doc.put(&obj, "kind", kind.as_str())?;
            self.doc.put(&obj, "text", text)?;
            self.doc.put(&obj, "at", now)?;
            if let Some(task) = task {
                self.doc.put(&obj, "task", task.to_string())?;
            }
            Ok(())
        })();
        self.finish(result, now, "message")?;
        Ok(id)
    }

    /// Enqueues a task. One change; durable once the caller stores `save_incremental()`.
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
        let id = TaskId::new_at(now);
        let tasks = genesis_obj(TASKS_CTR);
        let result = (|| {
            let obj = self.doc.put_object(&tasks, id.to_string(), ObjType::Map)?;
            self.doc.put(&obj, "id", id.to_string())?;
            self.doc
                .put(&obj, "instruction", task.instruction.as_str())?;
            self.doc.put(&obj, "executor", task.executor.as_str())?;
            self.doc.put(&obj, "target", task.target.as_str())?;
            self.doc.put(&obj, "created_at", now)?;
            if let Some(t) = task.not_after {
                self.doc.put(&obj, "not_after", t)?;
            }
            self.doc.put_object(&obj, "events", ObjType::List)?;
            Ok(())
        })();
        self.finish(result, now, "task")?;
        Ok(id)
    }

    /// Appends an event to a task's history. Whether it counts is decided when folding:
    /// facts count only from the target, requests only from others.
    pub fn append_task_event(
        &mut self,
        task: TaskId,
        attempt: u32,
        kind: &EventKind,
        now: Millis,
    ) -> Result<(), WriteError> {
        match kind {
            EventKind::Output { text } => {
                check_len("output", text, limits::MAX_OUTPUT_EVENT_BYTES)?
            }
            EventKind::Failed { reason } | EventKind::Cancelled { reason } => {
                check_len("reason", reason, limits::MAX_SHORT_TEXT_BYTES)?
            }
            _ => {}
        }
        let (obj, creator) = self.task_obj(&task).ok_or(WriteError::UnknownTask(task))?;
        let events = self
            .obj_by(&obj, "events", &creator, ObjType::List)
            .ok_or(WriteError::UnknownTask(task))?;
        let result = (|| {
            let at = self.doc.length(&events);
            let ev = self.doc.insert_object(&events, at, ObjType::Map)?;
            self.doc.put(&ev, "at", now)?;
            self.doc.put(&ev, "kind", kind.name())?;
            self.doc.put(&ev, "attempt", attempt as u64)?;
            match kind {
                EventKind::Output { text } => self.doc.put(&ev, "text", text.as_str())?,
                EventKind::Finished { exit_code } => self.doc.put(&ev, "exit_code", *exit_code)?,
                EventKind::Failed { reason } | EventKind::Cancelled { reason } => {
                    self.doc.put(&ev, "reason", reason.as_str())?
                }
                _ => {}
            }
            Ok(())
        })();
        self.finish(result, now, "event")
    }

    // ---- reads -------------------------------------------------------------------------

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

    /// Devices the owner has recorded, with the owner itself always present.
    pub fn devices(&self) -> Vec<Device> {
        let g = &self.genesis;
        let Some(owner_actor) = self.owner_actor.clone() else {
            self.skip("genesis", "owner actor is not hex");
            return Vec::new();
        };
        let devices = genesis_obj(DEVICES_CTR);
        let mut out = Vec::new();
        let mut owner_seen = false;
        for key in self.doc.keys(&devices) {
            let Ok(id) = key.parse::<DeviceId>() else {
                self.skip("device", "key is not a device id");
                continue;
            };
            let Some(obj) = self.obj_by(&devices, &key, &owner_actor, ObjType::Map) else {
                self.skip("device", "not written by the thread's owner");
                continue;
            };
            match self.read_device(id, &obj, &owner_actor) {
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
                None => self.skip("device", "malformed record"),
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

    /// Maps every known actor to its device, with the device's revocation time.
    fn authors(&self) -> HashMap<ActorId, (DeviceId, Option<Millis>)> {
        let mut map = HashMap::new();
        for d in self.devices() {
            for a in &d.actors {
                if let Ok(actor) = ActorId::try_from(a.as_str()) {
                    map.insert(actor, (d.id.clone(), d.revoked_at));
                }
            }
        }
        map
    }

    /// All well-formed tasks, oldest first.
    pub fn tasks(&self) -> Vec<Task> {
        let authors = self.authors();
        let tasks = genesis_obj(TASKS_CTR);
        let mut out = Vec::new();
        for key in self.doc.keys(&tasks) {
            if let Some(t) = self.read_task_key(&authors, &key) {
                out.push(t);
            }
        }
        out.sort_by_key(|t| t.id);
        out
    }

    /// One task, if it exists and is well formed.
    pub fn task(&self, id: &TaskId) -> Option<Task> {
        self.read_task_key(&self.authors(), &id.to_string())
    }

    /// The tasks with these ids that exist and are well formed, oldest first.
    pub fn tasks_by_id(&self, ids: &BTreeSet<TaskId>) -> Vec<Task> {
        let authors = self.authors();
        ids.iter()
            .filter_map(|id| self.read_task_key(&authors, &id.to_string()))
            .collect()
    }

    /// The task object and its creator's actor, choosing deterministically among conflicts.
    fn task_obj(&self, id: &TaskId) -> Option<(ObjId, ActorId)> {
        let authors = self.authors();
        let all = self
            .doc
            .get_all(genesis_obj(TASKS_CTR), id.to_string())
            .ok()?;
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

    fn read_task_key(
        &self,
        authors: &HashMap<ActorId, (DeviceId, Option<Millis>)>,
        key: &str,
    ) -> Option<Task> {
        let Ok(id) = key.parse::<TaskId>() else {
            self.skip("task", "key is not a task id");
            return None;
        };
        let Ok(all) = self.doc.get_all(genesis_obj(TASKS_CTR), key) else {
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
        let created_at = self.int_by(obj, "created_at", by)?;
        let not_after = self.int_by(obj, "not_after", by);
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
        let kind = match self.str_by(ev, "kind", by, 32)?.as_str() {
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

    /// All well-formed messages, in list order.
    pub fn messages(&self) -> Vec<Message> {
        let authors = self.authors();
        let list = genesis_obj(MESSAGES_CTR);
        let len = self.doc.length(&list);
        let mut out = Vec::new();
        for i in 0..len {
            let Some((Value::Object(ObjType::Map), obj)) = self.doc.get(&list, i).ok().flatten()
            else {
                self.skip("message", "not a map");
                continue;
            };
            match self.read_message(&authors, &obj) {
                Some(m) => out.push(m),
                None => self.skip("message", "malformed or from an unknown device"),
            }
        }
        out
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

    /// Tasks that gained content (the task itself or any of its events) between `before` and
    /// the current heads. Uses Automerge's diff over the tasks object, not a scan of all tasks.
    pub fn tasks_changed_since(&mut self, before: &[ChangeHash]) -> BTreeSet<TaskId> {
        let after = self.doc.get_heads();
        if before == after.as_slice() {
            return BTreeSet::new();
        }
        let tasks = genesis_obj(TASKS_CTR);
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
