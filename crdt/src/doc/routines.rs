//! Routines in the meta document (DESIGN.md 8): their records, their histories, and the tasks
//! of their occurrences.
//!
//! ```text
//! routines: { <routine_id>: { id, instruction, executor, target, created_at,
//!                             every_ms | cron + tz, catch_up, catch_up_cap, events[] } }
//! ```
//!
//! The `routines` map comes from a second deterministic change of the meta document (a fixed
//! actor at time 0, after genesis), which every peer derives and nobody sends, so no two
//! peers ever create the map twice. Routines live in the meta document because it is always
//! held: a routine outlives any segment. Their occurrences are ordinary tasks in segments,
//! written by the target desktop with [`errand_core::routine::occurrence_id`] ids.

use automerge::{
    ActorId, AutoCommit, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value,
    transaction::{CommitOptions, Transactable},
};
use errand_core::{
    CatchUp, DeviceId, Routine, RoutineEvent, RoutineEventKind, RoutineId, Schedule, TaskId,
    limits,
    routine::{self, MAX_EVENTS_PER_ROUTINE, MAX_SCHEDULE_BYTES},
    time::Millis,
};

use super::{Authors, NewTask, Reader, ThreadDoc, WriteError, actor_of, check_len};

/// The actor of the change that makes the `routines` map. Fixed, like the genesis actor.
const ROUTINES_ACTOR: &[u8] = b"errand-routines-v1";
/// Its op counter: the first op after the meta genesis's seven.
const ROUTINES_CTR: u64 = 8;

pub(super) fn routines_actor() -> ActorId {
    ActorId::from(ROUTINES_ACTOR)
}

fn routines_obj() -> ObjId {
    ObjId::Id(ROUTINES_CTR, routines_actor(), 1)
}

/// Adds the `routines` change to a fresh meta document (right after its genesis), then hands
/// the document back to `actor`.
pub(super) fn add_routines_map(doc: &mut AutoCommit, actor: ActorId) {
    doc.set_actor(routines_actor());
    let _ = doc.put_object(ROOT, "routines", ObjType::Map);
    doc.commit_with(CommitOptions::default().with_time(0));
    doc.set_actor(actor);
}

/// A routine to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRoutine {
    /// What each occurrence does.
    pub instruction: String,
    /// Which of the target's executors runs it.
    pub executor: String,
    /// The desktop that runs it.
    pub target: DeviceId,
    /// When it is due.
    pub schedule: Schedule,
    /// What happens to occurrences that could not run on time.
    pub catch_up: CatchUp,
    /// With `catch_up = all`: most missed occurrences run after one gap.
    pub catch_up_cap: u32,
}

impl ThreadDoc {
    /// Creates a routine in the meta document. One change.
    pub fn create_routine(&mut self, r: &NewRoutine, now: Millis) -> Result<RoutineId, WriteError> {
        if r.instruction.trim().is_empty() {
            return Err(WriteError::EmptyInstruction);
        }
        check_len("instruction", &r.instruction, limits::MAX_INSTRUCTION_BYTES)?;
        check_len("executor name", &r.executor, limits::MAX_SHORT_TEXT_BYTES)?;
        r.schedule.check().map_err(WriteError::Schedule)?;
        let id = RoutineId::new_at(now);
        let routines = routines_obj();
        let p = &mut self.meta;
        let result = (|| {
            let obj = p.doc.put_object(&routines, id.to_string(), ObjType::Map)?;
            p.doc.put(&obj, "id", id.to_string())?;
            p.doc.put(&obj, "instruction", r.instruction.as_str())?;
            p.doc.put(&obj, "executor", r.executor.as_str())?;
            p.doc.put(&obj, "target", r.target.as_str())?;
            p.doc.put(&obj, "created_at", now)?;
            match &r.schedule {
                Schedule::Every { every_ms } => p.doc.put(&obj, "every_ms", *every_ms)?,
                Schedule::Cron { expr, tz } => {
                    p.doc.put(&obj, "cron", expr.as_str())?;
                    p.doc.put(&obj, "tz", tz.as_str())?;
                }
            }
            p.doc.put(&obj, "catch_up", r.catch_up.name())?;
            p.doc.put(&obj, "catch_up_cap", u64::from(r.catch_up_cap))?;
            p.doc.put_object(&obj, "events", ObjType::List)?;
            Ok(())
        })();
        p.finish(result, now, "routine")?;
        self.dirty.insert(0);
        Ok(id)
    }

    /// Appends to a routine's history: a pause, resume or delete from any device, or a
    /// `missed` fact from its desktop (which counts only from the target when read).
    pub fn append_routine_event(
        &mut self,
        id: RoutineId,
        kind: &RoutineEventKind,
        now: Millis,
    ) -> Result<(), WriteError> {
        let authors = self.authors();
        let skipped = &self.skipped;
        let p = &mut self.meta;
        let r = p.reader(skipped, &self.genesis.owner);
        let (obj, creator) = r
            .routine_obj(&authors, &id)
            .ok_or(WriteError::UnknownRoutine(id))?;
        let events = r
            .obj_by(&obj, "events", &creator, ObjType::List)
            .ok_or(WriteError::UnknownRoutine(id))?;
        let result = (|| {
            let at = p.doc.length(&events);
            let ev = p.doc.insert_object(&events, at, ObjType::Map)?;
            p.doc.put(&ev, "at", now)?;
            p.doc.put(&ev, "kind", kind.name())?;
            if let RoutineEventKind::Missed { first, last, count } = kind {
                p.doc.put(&ev, "first", *first)?;
                p.doc.put(&ev, "last", *last)?;
                p.doc.put(&ev, "count", *count)?;
            }
            Ok(())
        })();
        p.finish(result, now, "routine event")?;
        self.dirty.insert(0);
        Ok(())
    }

    /// Enqueues the task of `routine`'s occurrence due at `due`, in the newest segment, with
    /// its derived id. `None` if a held part already has it (the caller makes sure the part
    /// that would hold it is loaded): an occurrence is created once, whatever merges or
    /// restarts happen.
    pub fn enqueue_occurrence(
        &mut self,
        routine: &Routine,
        due: Millis,
        now: Millis,
    ) -> Result<Option<TaskId>, WriteError> {
        let id = routine::occurrence_id(&routine.id, due);
        if self.task_segment(&id).is_some() {
            return Ok(None);
        }
        let task = NewTask {
            instruction: routine.instruction.clone(),
            executor: routine.executor.clone(),
            target: routine.target.clone(),
            not_after: None,
            attachments: Vec::new(),
        };
        self.enqueue_task_with_id(&task, id, now)?;
        Ok(Some(id))
    }

    /// The routines that are well formed and whose author is in good standing, oldest first.
    pub fn routines(&self) -> Vec<Routine> {
        let authors = self.authors();
        let r = self.meta.reader(&self.skipped, &self.genesis.owner);
        let routines = routines_obj();
        let mut out: Vec<Routine> = self
            .meta
            .doc
            .keys(&routines)
            .filter_map(|key| r.read_routine_key(&authors, &key))
            .collect();
        out.sort_by_key(|r| r.id);
        out
    }

    /// One routine, if it is well formed.
    pub fn routine(&self, id: &RoutineId) -> Option<Routine> {
        let authors = self.authors();
        self.meta
            .reader(&self.skipped, &self.genesis.owner)
            .read_routine_key(&authors, &id.to_string())
    }
}

impl Reader<'_> {
    fn routine_obj(&self, authors: &Authors, id: &RoutineId) -> Option<(ObjId, ActorId)> {
        self.known_map(authors, &routines_obj(), &id.to_string())
    }

    fn read_routine_key(&self, authors: &Authors, key: &str) -> Option<Routine> {
        let Ok(id) = key.parse::<RoutineId>() else {
            self.skip("routine", "key is not a routine id");
            return None;
        };
        let Some((obj, _)) = self.routine_obj(authors, &id) else {
            self.skip("routine", "not a map from a known device");
            return None;
        };
        let r = self.read_routine(authors, id, &obj);
        if r.is_none() {
            self.skip("routine", "malformed, or from a revoked device");
        }
        r
    }

    fn read_routine(&self, authors: &Authors, id: RoutineId, obj: &ObjId) -> Option<Routine> {
        let by = actor_of(obj)?;
        let (author, revoked_at) = authors.get(by)?.clone();
        if revoked_at.is_some() {
            // A revoked device's routines stop with it.
            return None;
        }
        let stored: RoutineId = self.str_by(obj, "id", by, 26)?.parse().ok()?;
        if stored != id {
            return None;
        }
        let target: DeviceId = self.str_by(obj, "target", by, 128)?.parse().ok()?;
        if target != *self.owner {
            return None;
        }
        let schedule = match self.int_by(obj, "every_ms", by) {
            Some(every) => Schedule::Every {
                every_ms: u64::try_from(every).ok()?,
            },
            None => Schedule::Cron {
                expr: self.str_by(obj, "cron", by, MAX_SCHEDULE_BYTES)?,
                tz: self.str_by(obj, "tz", by, MAX_SCHEDULE_BYTES)?,
            },
        };
        schedule.check().ok()?;
        let events_obj = self.obj_by(obj, "events", by, ObjType::List)?;
        let len = self.doc.length(&events_obj).min(MAX_EVENTS_PER_ROUTINE);
        let mut events = Vec::new();
        for i in 0..len {
            let Some((Value::Object(ObjType::Map), ev)) =
                self.doc.get(&events_obj, i).ok().flatten()
            else {
                self.skip("routine event", "not a map");
                continue;
            };
            match self.read_routine_event(authors, &ev) {
                Some(e) => events.push(e),
                None => self.skip("routine event", "malformed, or from a revoked device"),
            }
        }
        Some(Routine {
            id,
            instruction: self.str_by(obj, "instruction", by, limits::MAX_INSTRUCTION_BYTES)?,
            executor: self.str_by(obj, "executor", by, limits::MAX_SHORT_TEXT_BYTES)?,
            target,
            author,
            created_at: self.int_by(obj, "created_at", by)?,
            schedule,
            catch_up: self.str_by(obj, "catch_up", by, 16)?.parse().ok()?,
            catch_up_cap: u32::try_from(self.int_by(obj, "catch_up_cap", by)?)
                .ok()?
                .clamp(1, routine::MAX_CATCH_UP_CAP),
            events,
        })
    }

    fn read_routine_event(&self, authors: &Authors, ev: &ObjId) -> Option<RoutineEvent> {
        let by = actor_of(ev)?;
        let (author, revoked_at) = authors.get(by)?.clone();
        let at = self.int_by(ev, "at", by)?;
        if revoked_at.is_some_and(|r| at > r) {
            return None;
        }
        let kind = match self.str_by(ev, "kind", by, 32)?.as_str() {
            "paused" => RoutineEventKind::Paused,
            "resumed" => RoutineEventKind::Resumed,
            "deleted" => RoutineEventKind::Deleted,
            "missed" => {
                let first = self.int_by(ev, "first", by)?;
                let last = self.int_by(ev, "last", by)?;
                let count = match self.scalar_by(ev, "count", by)? {
                    ScalarValue::Uint(n) => n,
                    ScalarValue::Int(n) => u64::try_from(n).ok()?,
                    _ => return None,
                };
                if last < first || count == 0 {
                    return None;
                }
                RoutineEventKind::Missed { first, last, count }
            }
            _ => return None,
        };
        Some(RoutineEvent { at, author, kind })
    }
}
