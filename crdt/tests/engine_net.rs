//! A deterministic network of thread engines in one process: a desktop and phones, each an
//! [`Engine`] over an in-memory store, and one seeded scheduler that delivers, duplicates
//! and drops frames (interleaving links and directions freely), cuts and restores links,
//! restarts peers from what they stored, forgets sync states and revokes a phone, while the phones queue tasks and the
//! desktop runs them. After the faults, every link is healed (fresh sessions, frames in
//! order) and the invariants are checked:
//!
//! - every peer that is still trusted converges: same tasks, in sync both ways;
//! - no task a trusted phone committed is lost;
//! - no fact is written twice for one attempt;
//! - nothing a revoked phone wrote after its revocation reaches anyone.
//!
//! Each scenario runs `ERRAND_ENGINE_SEEDS` seeds (default 1,000: the five scenarios took
//! 217 s together on two cores shared with other builds, with the crate optimized in test
//! builds; `ERRAND_ENGINE_SEEDS=100` for a quick run). A failure prints its seed;
//! `ERRAND_ENGINE_SEED=N` replays that one seed alone.

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use common::world;
use errand_core::{DeviceId, DeviceKind, EventKind, TaskId, TaskStatus, fold};
use errand_crdt::{
    DocId, MemoryImage, NewTask, Store,
    engine::{Binding, Engine, EngineConfig, EngineError, META_ACTOR, PeerFrame},
};

/// SplitMix64: small, seedable, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// What a scenario does, in percent per step.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    name: &'static str,
    phones: usize,
    steps: usize,
    /// A phone queues a task.
    write: u64,
    /// The desktop moves one task on (delivered, started, finished).
    run: u64,
    /// A link goes down (frames in flight are lost) or comes back up.
    flap: u64,
    /// A frame in flight is dropped or duplicated.
    mangle: u64,
    /// A peer restarts from its stored image.
    restart: u64,
    /// A peer restarts having lost its sync states.
    forget: u64,
    /// A phone asks for a finished task to run again (a new attempt).
    retry: u64,
    /// The step at which the desktop revokes the last phone, if any.
    revoke_at: Option<usize>,
    /// Roll segments over after this many changes.
    segment_limit: Option<usize>,
}

const BASE: Scenario = Scenario {
    name: "",
    phones: 2,
    steps: 40,
    write: 20,
    run: 20,
    flap: 8,
    mangle: 0,
    restart: 0,
    forget: 0,
    retry: 0,
    revoke_at: None,
    segment_limit: None,
};

struct Node {
    id: DeviceId,
    actor: Vec<u8>,
    image: MemoryImage,
    engine: Option<Engine>,
    config: EngineConfig,
}

impl Node {
    fn open(id: DeviceId, actor: Vec<u8>, config: EngineConfig) -> Self {
        let image = MemoryImage::new();
        let engine = Some(Self::engine(&image, &actor, config));
        Self {
            id,
            actor,
            image,
            engine,
            config,
        }
    }

    fn engine(image: &MemoryImage, actor: &[u8], config: EngineConfig) -> Engine {
        let store = Store::in_memory(image).expect("in-memory store");
        if store.meta(META_ACTOR).expect("meta").is_none() {
            store
                .write(|t| t.put_meta(META_ACTOR, actor))
                .expect("actor");
        }
        Engine::open(store, config).expect("engine opens")
    }

    /// A restart: the engine is dropped (its store closed) and opened again from what it
    /// stored.
    fn restart(&mut self) {
        self.engine = None;
        self.engine = Some(Self::engine(&self.image, &self.actor, self.config));
    }

    fn e(&mut self) -> &mut Engine {
        self.engine
            .as_mut()
            .expect("the engine is open between restarts")
    }
}

/// The link between the desktop (side 0) and one phone (side 1).
#[derive(Default)]
struct Link {
    up: bool,
    queue: [VecDeque<PeerFrame>; 2],
    extra: [Vec<DocId>; 2],
}

struct Net {
    rng: Rng,
    nodes: Vec<Node>,
    links: Vec<Link>,
    clock: i64,
    /// Tasks each phone committed: (phone, task).
    written: Vec<(usize, TaskId)>,
    /// The revoked phone and when.
    revoked: Option<(usize, i64)>,
    /// Tasks the revoked phone wrote after its revocation.
    after_revocation: BTreeSet<TaskId>,
    log: Vec<String>,
}

type Failure = String;

impl Net {
    fn new(seed: u64, s: &Scenario) -> Self {
        let w = world(s.phones);
        let config = EngineConfig {
            segment_limit: s.segment_limit,
            ..EngineConfig::default()
        };
        let mut nodes: Vec<Node> = (0..=s.phones)
            .map(|i| Node::open(w.ids[i].clone(), w.actors[i].to_bytes().to_vec(), config))
            .collect();
        nodes[0]
            .e()
            .create_thread(w.genesis.clone())
            .expect("thread");
        for i in 1..=s.phones {
            let (id, actor) = (w.ids[i].clone(), w.actors[i].to_hex_string());
            nodes[0]
                .e()
                .ensure_device(
                    id,
                    format!("phone {i}"),
                    DeviceKind::Phone,
                    actor,
                    Binding::Pairing,
                    1,
                )
                .expect("pairing binds the phone's actor");
            nodes[i].e().adopt(w.genesis.clone()).expect("adopt");
        }
        let mut net = Self {
            rng: Rng(seed),
            nodes,
            links: (0..s.phones).map(|_| Link::default()).collect(),
            clock: 1_700_000_000_000,
            written: Vec::new(),
            revoked: None,
            after_revocation: BTreeSet::new(),
            log: Vec::new(),
        };
        for l in 0..s.phones {
            net.connect(l);
        }
        net
    }

    fn phone(l: usize) -> usize {
        l + 1
    }

    fn sides(l: usize) -> [usize; 2] {
        [0, Self::phone(l)]
    }

    fn is_revoked(&self, node: usize) -> bool {
        self.revoked.is_some_and(|(r, _)| r == node)
    }

    fn tick(&mut self) -> i64 {
        self.clock += 1_000;
        self.clock
    }

    /// A fresh session on link `l`: hellos both ways, then each side says what it has.
    fn connect(&mut self, l: usize) {
        let [a, b] = Self::sides(l);
        let (da, db) = (self.nodes[a].e().digests(), self.nodes[b].e().digests());
        let (ia, ib) = (self.nodes[a].id.clone(), self.nodes[b].id.clone());
        let ra = self.nodes[a].e().start_session(&ib, db);
        let rb = self.nodes[b].e().start_session(&ia, da);
        let link = &mut self.links[l];
        link.queue = Default::default();
        match (ra, rb) {
            (Ok(ea), Ok(eb)) => {
                link.extra = [ea, eb];
                link.up = true;
                self.log.push(format!("link {l} up"));
                self.step_side(l, 0, None);
                self.step_side(l, 1, None);
            }
            (ra, rb) => {
                link.up = false;
                self.log.push(format!(
                    "link {l}: no session: {:?} / {:?}",
                    ra.err(),
                    rb.err()
                ));
            }
        }
    }

    fn disconnect(&mut self, l: usize, why: &str) {
        let link = &mut self.links[l];
        if link.up {
            link.up = false;
            link.queue = Default::default();
            self.log.push(format!("link {l} down: {why}"));
        }
    }

    /// One step of side `side` of link `l`; its frames go on the wire. An error closes the
    /// session, as it does between real processes.
    fn step_side(&mut self, l: usize, side: usize, frame: Option<PeerFrame>) -> Option<Failure> {
        if !self.links[l].up {
            return None;
        }
        let sides = Self::sides(l);
        let (me, other) = (sides[side], sides[1 - side]);
        let peer = self.nodes[other].id.clone();
        let mut extra = std::mem::take(&mut self.links[l].extra[side]);
        let about = frame.as_ref().map(|f| f.doc().to_string());
        let r = self.nodes[me].e().step(&peer, frame, &mut extra);
        self.links[l].extra[side] = extra;
        match r {
            Ok(step) => {
                self.links[l].queue[1 - side].extend(step.frames);
                None
            }
            Err(e) => {
                // Refusals are for the revoked phone only: an honest peer's changes are
                // always taken.
                let refused = matches!(e, EngineError::Refused(_) | EngineError::ActorRefused(_));
                let revoked_involved = self.is_revoked(me) || self.is_revoked(other);
                self.disconnect(l, &format!("node {me}: {e}"));
                (refused && !revoked_involved)
                    .then(|| format!("node {me} refused honest node {other} on {about:?}: {e}"))
            }
        }
    }

    /// Delivers one frame on link `l` toward side `to`, maybe mangled.
    fn deliver(&mut self, l: usize, to: usize, mangle: u64) -> Option<Failure> {
        let q = &mut self.links[l].queue[to];
        if q.is_empty() {
            return None;
        }
        let frame = if mangle > 0 && self.rng.chance(mangle) {
            // Dropped or duplicated. Frames are never reordered within a session: a session
            // is one ordered stream (yamux over TCP or a relay circuit); the scheduler
            // interleaves the two directions and the links freely instead.
            let k = self.rng.below(2);
            match k {
                0 => {
                    q.pop_front();
                    self.log
                        .push(format!("link {l}: dropped a frame to side {to}"));
                    return None;
                }
                _ => {
                    let f = q.front().cloned();
                    self.log
                        .push(format!("link {l}: duplicated a frame to side {to}"));
                    f
                }
            }
        } else {
            q.pop_front()
        };
        self.step_side(l, to, frame)
    }

    /// After a local write on `node`, every up link of it says so.
    fn announce(&mut self, node: usize) -> Option<Failure> {
        let mut failure = None;
        for l in 0..self.links.len() {
            let [a, b] = Self::sides(l);
            if a == node {
                failure = failure.or(self.step_side(l, 0, None));
            } else if b == node {
                failure = failure.or(self.step_side(l, 1, None));
            }
        }
        failure
    }

    fn phone_writes(&mut self, phone: usize) -> Option<Failure> {
        let now = self.tick();
        let target = self.nodes[0].id.clone();
        let task = NewTask {
            instruction: format!("task at {now}"),
            executor: "shell".into(),
            target,
            not_after: None,
            attachments: Vec::new(),
        };
        match self.nodes[phone].e().commit(|d| d.enqueue_task(&task, now)) {
            Ok((id, _)) => {
                self.log.push(format!("phone {phone} queued {id}"));
                if self.is_revoked(phone) {
                    self.after_revocation.insert(id);
                } else {
                    self.written.push((phone, id));
                }
                self.announce(phone)
            }
            Err(e) => Some(format!("phone {phone} could not queue a task: {e}")),
        }
    }

    /// A phone asks for one of the tasks it sees finished to run again.
    fn phone_retries(&mut self, phone: usize) -> Option<Failure> {
        if self.is_revoked(phone) {
            return None;
        }
        let done: Vec<(TaskId, u32)> = match self.nodes[phone].e().read_all(|d| d.tasks()) {
            Ok(tasks) => tasks
                .iter()
                .map(|t| (t.id, fold(t)))
                .filter(|(_, v)| v.status == TaskStatus::Done)
                .map(|(id, v)| (id, v.attempt))
                .collect(),
            Err(e) => return Some(format!("phone {phone} cannot read its thread: {e}")),
        };
        if done.is_empty() {
            return None;
        }
        let (id, attempt) = done[self.rng.below(done.len())];
        let now = self.tick();
        if let Err(e) = self.nodes[phone]
            .e()
            .commit(|d| d.append_task_event(id, attempt, &EventKind::Retried, now))
        {
            return Some(format!("phone {phone} could not retry {id}: {e}"));
        }
        self.log.push(format!("phone {phone} retried {id}"));
        self.announce(phone)
    }

    /// The desktop's runner, reduced to its facts: one unfinished task moves one step.
    fn desktop_runs(&mut self) -> Option<Failure> {
        let open: Vec<TaskId> = self.nodes[0].e().open_tasks().into_iter().collect();
        if open.is_empty() {
            return None;
        }
        let id = open[self.rng.below(open.len())];
        self.advance(id)
    }

    /// The desktop writes the next fact of task `id`, if it has one to write.
    fn advance(&mut self, id: TaskId) -> Option<Failure> {
        let task = self.nodes[0].e().doc().and_then(|d| d.task(&id))?;
        let view = fold(&task);
        let fact = match view.status {
            TaskStatus::Queued => EventKind::Delivered,
            TaskStatus::Delivered => EventKind::Started,
            TaskStatus::Running => EventKind::Finished { exit_code: 0 },
            _ => return None,
        };
        let now = self.tick();
        let attempt = view.attempt.max(1);
        if let Err(e) = self.nodes[0]
            .e()
            .commit(|d| d.append_task_event(id, attempt, &fact, now))
        {
            return Some(format!("the desktop could not write {fact:?} on {id}: {e}"));
        }
        self.log.push(format!("desktop: {} on {id}", fact.name()));
        self.announce(0)
    }

    fn restart(&mut self, node: usize, forget: bool) {
        for l in 0..self.links.len() {
            if Self::sides(l).contains(&node) {
                self.disconnect(l, "restart");
            }
        }
        self.nodes[node].restart();
        if forget {
            let peers: Vec<DeviceId> = if node == 0 {
                self.nodes[1..].iter().map(|n| n.id.clone()).collect()
            } else {
                vec![self.nodes[0].id.clone()]
            };
            for p in peers {
                self.nodes[node]
                    .e()
                    .forget_sync_states(&p)
                    .expect("forget sync states");
            }
        }
        self.log.push(format!(
            "node {node} restarted{}",
            if forget { ", sync states lost" } else { "" }
        ));
    }

    fn revoke(&mut self, phone: usize) {
        let now = self.tick();
        let id = self.nodes[phone].id.clone();
        self.nodes[0].e().revoke_device(&id, now).expect("revoke");
        self.revoked = Some((phone, now));
        self.disconnect(phone - 1, "revoked");
        self.log.push(format!("phone {phone} revoked"));
        let _ = self.announce(0);
    }

    fn chaos(&mut self, s: &Scenario) -> Option<Failure> {
        for step in 0..s.steps {
            if s.revoke_at == Some(step) {
                self.revoke(s.phones);
            }
            let phones = self.links.len();
            let f = if self.rng.chance(s.write) {
                let phone = 1 + self.rng.below(phones);
                self.phone_writes(phone)
            } else if s.retry > 0 && self.rng.chance(s.retry) {
                let phone = 1 + self.rng.below(phones);
                self.phone_retries(phone)
            } else if self.rng.chance(s.run) {
                self.desktop_runs()
            } else if self.rng.chance(s.flap) {
                let l = self.rng.below(phones);
                if self.links[l].up {
                    self.disconnect(l, "flap");
                } else if !self.is_revoked(Self::phone(l)) {
                    self.connect(l);
                }
                None
            } else if self.rng.chance(s.restart) {
                let node = self.rng.below(phones + 1);
                self.restart(node, false);
                None
            } else if self.rng.chance(s.forget) {
                let node = self.rng.below(phones + 1);
                self.restart(node, true);
                None
            } else {
                // Deliver a few frames.
                let mut f = None;
                for _ in 0..3 {
                    let l = self.rng.below(phones);
                    let to = self.rng.below(2);
                    f = f.or(self.deliver(l, to, s.mangle));
                }
                f
            };
            if f.is_some() {
                return f;
            }
        }
        None
    }

    /// Fresh sessions on every trusted link, frames delivered in order until all is quiet.
    fn heal(&mut self) -> Option<Failure> {
        let mut failure = None;
        // Round one converges the tasks and the runner finishes them; round two carries
        // the facts back.
        for _ in 0..2 {
            for l in 0..self.links.len() {
                self.disconnect(l, "heal");
                if !self.is_revoked(Self::phone(l)) {
                    self.connect(l);
                }
            }
            for _ in 0..10_000 {
                let mut moved = false;
                for l in 0..self.links.len() {
                    for to in 0..2 {
                        if !self.links[l].queue[to].is_empty() {
                            moved = true;
                            failure = failure.or(self.deliver(l, to, 0));
                        }
                    }
                }
                if !moved {
                    break;
                }
            }
            // Each task needs three facts at most.
            for id in self.nodes[0].e().open_tasks() {
                for _ in 0..3 {
                    failure = failure.or(self.advance(id));
                }
            }
        }
        failure
    }

    fn check(&mut self) -> Option<Failure> {
        let trusted: Vec<usize> = (0..self.nodes.len())
            .filter(|n| !self.is_revoked(*n))
            .collect();
        let mut views: BTreeMap<usize, BTreeMap<TaskId, errand_core::Task>> = BTreeMap::new();
        for &n in &trusted {
            let tasks = match self.nodes[n].e().read_all(|d| d.tasks()) {
                Ok(t) => t,
                Err(e) => return Some(format!("node {n} cannot read its thread: {e}")),
            };
            views.insert(n, tasks.into_iter().map(|t| (t.id, t)).collect());
        }
        let desktop = &views[&0];
        for &n in &trusted[1..] {
            let ids: BTreeSet<_> = views[&n].keys().collect();
            let ours: BTreeSet<_> = desktop.keys().collect();
            if ids != ours {
                return Some(format!(
                    "phone {n} and the desktop differ: phone has {} tasks, desktop {}",
                    ids.len(),
                    ours.len()
                ));
            }
            let peer = self.nodes[n].id.clone();
            let desk = self.nodes[0].id.clone();
            if !self.nodes[0].e().in_sync(&peer) || !self.nodes[n].e().in_sync(&desk) {
                return Some(format!(
                    "phone {n} and the desktop are not in sync after healing"
                ));
            }
        }
        for (phone, id) in &self.written {
            // The revoked phone's tasks that had not reached the desktop before its
            // revocation are refused with everything else it sends.
            if !desktop.contains_key(id) && !self.is_revoked(*phone) {
                return Some(format!("task {id} queued by phone {phone} was lost"));
            }
        }
        for id in &self.after_revocation {
            if let Some(n) = views
                .iter()
                .find(|(_, v)| v.contains_key(id))
                .map(|(n, _)| n)
            {
                return Some(format!(
                    "task {id}, written by the revoked phone after its revocation, reached node {n}"
                ));
            }
        }
        // Every peer's unfinished-task index, kept from the ops it merged, says what
        // reading and folding every task says.
        for (&n, view) in &views {
            let unfinished: BTreeSet<TaskId> = view
                .values()
                .filter(|t| !fold(t).status.is_terminal())
                .map(|t| t.id)
                .collect();
            let indexed = self.nodes[n].e().open_tasks();
            let unread: Vec<String> = indexed
                .iter()
                .filter(|id| !view.contains_key(id))
                .map(|id| {
                    let d = self.nodes[n].e().doc();
                    format!(
                        "{id}: segment {:?}, reads {:?}",
                        d.and_then(|d| d.task_segment(id)),
                        d.and_then(|d| d.task(id)).map(|t| t.author)
                    )
                })
                .collect();
            if !unread.is_empty() {
                return Some(format!("node {n}: indexed but not read: {unread:?}"));
            }
            if indexed != unfinished {
                return Some(format!(
                    "node {n}: the unfinished-task index holds {indexed:?}, the tasks say {unfinished:?}"
                ));
            }
        }
        for (&n, view) in &views {
            for task in view.values() {
                // Per author: two phones may both ask for the same retry.
                let mut seen: BTreeMap<(&DeviceId, u32, &str), usize> = BTreeMap::new();
                for e in &task.events {
                    *seen
                        .entry((&e.author, e.attempt, e.kind.name()))
                        .or_default() += 1;
                }
                if let Some(((_, attempt, kind), count)) = seen.iter().find(|(_, c)| **c > 1) {
                    return Some(format!(
                        "node {n}: task {} has {count} `{kind}` facts in attempt {attempt}",
                        task.id
                    ));
                }
                let status = fold(task).status;
                if status != TaskStatus::Done {
                    let kinds: Vec<&str> = task.events.iter().map(|e| e.kind.name()).collect();
                    let indexed = self.nodes[0].e().open_tasks().contains(&task.id);
                    return Some(format!(
                        "node {n}: task {} by {} is {status:?} after healing, events {kinds:?}, in the desktop's unfinished index: {indexed}",
                        task.id, task.author
                    ));
                }
            }
        }
        None
    }
}

fn run_seed(seed: u64, s: &Scenario) -> Result<(), String> {
    let mut net = Net::new(seed, s);
    let failure = net.chaos(s).or_else(|| net.heal()).or_else(|| net.check());
    match failure {
        None => Ok(()),
        Some(f) => {
            // A replayed seed prints everything that happened; a search, the last events.
            let keep = if std::env::var("ERRAND_ENGINE_SEED").is_ok() {
                usize::MAX
            } else {
                25
            };
            let tail: Vec<_> = net.log.iter().rev().take(keep).rev().cloned().collect();
            Err(format!(
                "scenario `{}` failed at seed {seed}: {f}\nreplay: ERRAND_ENGINE_SEED={seed} cargo test -p errand-crdt --test engine_net {}\nlast events:\n  {}",
                s.name,
                s.name,
                tail.join("\n  ")
            ))
        }
    }
}

fn run(s: Scenario) {
    if let Some(seed) = std::env::var("ERRAND_ENGINE_SEED")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        if let Err(e) = run_seed(seed, &s) {
            panic!("{e}");
        }
        return;
    }
    let seeds: u64 = std::env::var("ERRAND_ENGINE_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    let base = 0x5EED_0000_u64 ^ (s.name.len() as u64 * 1_000_003);
    for i in 0..seeds {
        if let Err(e) = run_seed(base + i, &s) {
            panic!("{e}");
        }
    }
}

#[test]
fn offline_queue_and_convergence() {
    run(Scenario {
        name: "offline_queue_and_convergence",
        flap: 25,
        retry: 10,
        ..BASE
    });
}

#[test]
fn push_path_and_fall_back_to_sync() {
    run(Scenario {
        name: "push_path_and_fall_back_to_sync",
        flap: 3,
        mangle: 30,
        retry: 10,
        ..BASE
    });
}

#[test]
fn segment_rollover_on_two_peers_apart() {
    run(Scenario {
        name: "segment_rollover_on_two_peers_apart",
        phones: 1,
        write: 45,
        run: 30,
        flap: 20,
        segment_limit: Some(6),
        ..BASE
    });
}

#[test]
fn a_peer_restarted_with_its_sync_state_lost() {
    run(Scenario {
        name: "a_peer_restarted_with_its_sync_state_lost",
        restart: 10,
        forget: 10,
        mangle: 10,
        ..BASE
    });
}

#[test]
fn a_revoked_devices_changes() {
    run(Scenario {
        name: "a_revoked_devices_changes",
        phones: 2,
        revoke_at: Some(15),
        write: 30,
        ..BASE
    });
}
