//! Helpers for the hostile-phone scenarios (`tests/hostile.rs`): a paired phone whose owner
//! writes Automerge changes into its home with any actor, and lets the real `errand-phone sync`
//! carry them to the desktop.
//!
//! - [`Thread`] starts an `errand-desktop run` daemon and pairs two real phones with real
//!   tickets: a hostile one and an honest one. Phones only ever run one-shot commands, so their
//!   homes are free to open in-process between two commands.
//! - [`Forger`] opens a phone home in-process and writes with a chosen actor: typed writes of
//!   [`ThreadDoc`], or raw Automerge ops in one change. [`Forger::save`] stores what it wrote
//!   the way the replica stores a commit: the change chunk, the document's heads (`doc_heads`)
//!   and the task indexes (`task_segment`, `open_tasks`), in one transaction.
//! - [`set_actor`] and [`list_far_segments`] edit what a home's hello will claim: its actor,
//!   and the documents it holds.
//! - [`PairFlood`] holds silent `/errand/pair/1` streams from in-process libp2p clients.
//! - [`peak_rss_kib`], [`threads`], [`cpu_seconds`] and [`Watchdog`] read what a process costs
//!   from `/proc`; [`run_guarded`] runs a command with a deadline and a memory cap.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use automerge::{
    ActorId, AutoCommit, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, transaction::CommitOptions,
};
use errand_core::DeviceId;
use errand_crdt::{NewTask, Store, StoreError, ThreadDoc, ThreadGenesis, Touched, WriteError};
use errand_p2p::replica::DOC_HEADS;
use errand_p2p::{
    peer::now_ms,
    replica::{META_ACTOR, META_GENESIS},
};
use redb::ReadableTable;
use serde_json::Value;

use crate::{DEADLINE, Daemon, Home, bin, signal, wait_for};

/// For a task through a desktop that may be busy with an attack, in a debug build on a slow
/// machine.
pub const LONG: Duration = Duration::from_secs(180);

/// How long a hostile phone's one-shot sync may try. A desktop that refuses the phone's
/// changes never lets it get in sync, so this bounds the test's runtime, not its outcome.
pub const HOSTILE_SYNC: &str = "20s";

/// How long an honest phone's sync may take (it must succeed).
const HONEST_SYNC: &str = "60s";

/// The window of the "nothing more happens" checks, after the last thing that had to happen.
pub const QUIET: Duration = Duration::from_secs(3);

/// What a process may take before [`run_guarded`] or [`Watchdog`] kills it, so an attack that
/// works on the old code fails the test instead of taking the machine down: far above the
/// 256 MB the tests assert, far below what the test machine has.
pub const KILL_RSS_KIB: u64 = 2 * 1024 * 1024;

/// The home's node identity in the store (`errand_p2p::peer`'s `META_IDENTITY`): a libp2p
/// keypair, protobuf-encoded.
const META_IDENTITY: &str = "identity";

// ---- the thread: a desktop and two paired phones --------------------------------------------

/// How to set up a [`Thread`].
#[derive(Debug, Default, Clone)]
pub struct ThreadOptions {
    /// The desktop's `config.toml` (every default when `None`: one `shell` executor, one task
    /// at a time, approval `auto`).
    pub config: Option<String>,
    /// Give the hostile phone a PeerId that sorts after the desktop's, so its device record
    /// comes after the desktop's in the thread's device map.
    pub hostile_sorts_after_desktop: bool,
}

/// A running desktop and two phones paired with it through real tickets.
#[derive(Debug)]
pub struct Thread {
    /// The temp dir with every home, log and marker file (kept when `ERRAND_KEEP_TEST_DIRS` is
    /// set).
    pub root: tempfile::TempDir,
    /// The desktop's home.
    pub desktop: Home,
    /// Its `errand-desktop run`.
    pub daemon: Daemon,
    /// Where it listens.
    pub addr: String,
    /// Its PeerId.
    pub desktop_id: String,
    /// The phone whose home the test writes into.
    pub hostile: Home,
    /// Its PeerId.
    pub hostile_id: String,
    /// A phone that only does what the CLI does.
    pub honest: Home,
    /// Its PeerId.
    pub honest_id: String,
}

/// A temp dir for one test. Short, because a home's control socket path must fit in 108
/// bytes.
pub fn test_root() -> Result<tempfile::TempDir> {
    let mut dir = tempfile::Builder::new().prefix("eh").tempdir_in("/tmp")?;
    if std::env::var_os("ERRAND_KEEP_TEST_DIRS").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    Ok(dir)
}

impl Thread {
    /// Starts the desktop daemon and pairs the honest phone, then the hostile one, each with a
    /// ticket from `errand-desktop pair --json`.
    pub fn start(opts: ThreadOptions) -> Result<Self> {
        let root = test_root()?;
        let desktop = Home::desktop(root.path(), "desk");
        if let Some(config) = &opts.config {
            std::fs::create_dir_all(&desktop.dir)?;
            std::fs::write(desktop.dir.join("config.toml"), config)?;
        }
        let (daemon, addr) = desktop.start(&[])?;
        let desktop_id = desktop.peer_id()?;
        let honest = Home::phone(root.path(), "honest");
        let hostile = Home::phone(root.path(), "hostile");
        if opts.hostile_sorts_after_desktop {
            identity_after(&hostile.dir, &desktop_id)?;
        }
        pair_phone(&desktop, &honest)?;
        pair_phone(&desktop, &hostile)?;
        std::fs::create_dir_all(root.path().join("marks"))?;
        Ok(Self {
            honest_id: honest.peer_id()?,
            hostile_id: hostile.peer_id()?,
            root,
            desktop,
            daemon,
            addr,
            desktop_id,
            hostile,
            honest,
        })
    }

    /// The marker file a task's command appends to.
    pub fn marker(&self, name: &str) -> PathBuf {
        self.root.path().join("marks").join(name)
    }

    /// A shell command that appends a line to the marker `name`: the file says how often the
    /// task really ran, whatever the thread says.
    pub fn marking(&self, name: &str) -> String {
        format!("echo ran >> '{}'", self.marker(name).display())
    }

    /// How often the command of marker `name` ran.
    pub fn runs(&self, name: &str) -> usize {
        std::fs::read_to_string(self.marker(name)).map_or(0, |s| s.lines().count())
    }

    /// Syncs `phone` with the desktop; it must succeed (exit 0: in sync).
    pub fn must_sync(&self, phone: &Home) -> Result<()> {
        let out = sync(phone, HONEST_SYNC)?;
        ensure!(
            out.status.success(),
            "errand-phone sync of {} exited with {}: {}",
            phone.dir.display(),
            out.status,
            last_lines(&out.stderr, 2)
        );
        Ok(())
    }

    /// Syncs the hostile phone once, whatever comes of it: a desktop that refuses its changes
    /// may close every session, so the sync may time out or fail. Returns its output.
    pub fn sync_hostile(&self) -> Result<Output> {
        let deadline = DEADLINE + Duration::from_secs(30);
        run_guarded(
            "errand-phone",
            &[
                "--home",
                path_str(&self.hostile.dir)?,
                "sync",
                "--no-mdns",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--timeout",
                HOSTILE_SYNC,
            ],
            deadline,
            Some(KILL_RSS_KIB),
        )
    }

    /// The honest phone sends a task that appends to marker `name`, syncs, and the desktop
    /// shows it done and the marker was written. Returns the desktop's view of the task.
    pub fn honest_task_done(&self, name: &str) -> Result<Value> {
        let id = send(&self.honest, &self.marking(name))?;
        self.must_sync(&self.honest)
            .context("the honest phone could not sync its task")?;
        let t = wait_status(&self.desktop, &id, "done", LONG)
            .context("the honest phone's task did not get done")?;
        ensure!(
            self.runs(name) == 1,
            "the honest task is done but ran {} times: {t}",
            self.runs(name)
        );
        Ok(t)
    }

    /// The desktop sends itself a task that runs until [`Blocker::release`]: with one task
    /// at a time, every later task waits delivered behind it. Returns once it runs.
    pub fn block_desktop(&self) -> Result<Blocker> {
        let go = self.root.path().join("marks").join("go");
        let id = send(
            &self.desktop,
            &format!("while [ ! -e '{}' ]; do sleep 0.1; done", go.display()),
        )?;
        wait_status(&self.desktop, &id, "running", DEADLINE)?;
        Ok(Blocker { id, go })
    }
}

/// A desktop task that holds the desktop's only task slot until released.
#[derive(Debug)]
pub struct Blocker {
    /// Its task id.
    pub id: String,
    go: PathBuf,
}

impl Blocker {
    /// Lets it end, and waits until the desktop shows it done.
    pub fn release(&self, t: &Thread) -> Result<()> {
        std::fs::write(&self.go, b"go")?;
        wait_status(&t.desktop, &self.id, "done", LONG)?;
        Ok(())
    }
}

/// The last `n` lines of a command's stderr (a failing sync logs the same warning on every
/// retry), without terminal colours.
pub fn last_lines(stderr: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(stderr);
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let lines: Vec<&str> = plain.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("a path that is not UTF-8")
}

/// Pairs `phone` with the running desktop through a fresh ticket, as `errand-phone pair` does
/// with a scanned QR code; requires the first sync to finish.
pub fn pair_phone(desktop: &Home, phone: &Home) -> Result<()> {
    let v = desktop.json(&["pair", "--json", "--ttl", "10m"])?;
    let ticket = v["ticket"].as_str().context("pair --json has a ticket")?;
    let name = phone
        .dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("phone");
    let out = phone.run(&[
        "pair",
        ticket,
        "--name",
        name,
        "--json",
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    ])?;
    ensure!(
        out.status.success(),
        "pairing {} failed ({}): {}",
        phone.dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).context("pair --json prints JSON")?;
    ensure!(v["synced"] == true, "paired but not synced: {v}");
    Ok(())
}

/// Gives a home that does not exist yet a node identity whose PeerId sorts after `other`.
pub fn identity_after(home: &Path, other: &str) -> Result<String> {
    let keypair = loop {
        let k = libp2p::identity::Keypair::generate_ed25519();
        if k.public().to_peer_id().to_base58().as_str() > other {
            break k;
        }
    };
    let bytes = keypair.to_protobuf_encoding()?;
    Store::open(home)?.write(|t| t.put_meta(META_IDENTITY, &bytes))?;
    Ok(keypair.public().to_peer_id().to_base58())
}

/// `errand-phone sync` on loopback, giving up after `timeout`.
pub fn sync(phone: &Home, timeout: &str) -> Result<Output> {
    phone.run(&[
        "sync",
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--timeout",
        timeout,
    ])
}

/// Queues a task on `home` (a phone: stored locally, sent on the next sync; a desktop: for
/// itself); returns its id.
pub fn send(home: &Home, text: &str) -> Result<String> {
    let v = home.json(&["send", text, "--json"])?;
    Ok(v["task_id"]
        .as_str()
        .context("send --json has a task_id")?
        .to_owned())
}

/// `task ID --json` on `home`, or `None` if it does not show the task.
pub fn task(home: &Home, id: &str) -> Option<Value> {
    home.json(&["task", id, "--json"]).ok()
}

/// Task ids `thread --json` on `home` shows.
pub fn shown_tasks(home: &Home) -> Result<BTreeSet<String>> {
    Ok(home.task_ids()?.into_iter().collect())
}

/// Waits until `home` shows task `id` with `status`; returns the task.
pub fn wait_status(home: &Home, id: &str, status: &str, within: Duration) -> Result<Value> {
    let mut last = Value::Null;
    wait_for(&format!("task {id} to be {status}"), within, || {
        let t = task(home, id)?;
        let hit = t["status"] == status;
        last = t.clone();
        hit.then_some(t)
    })
    .with_context(|| format!("last seen: {last}"))
}

/// True if `task` shows `text` in its output or in any event.
pub fn shows_text(task: &Value, text: &str) -> bool {
    task["output_tail"]
        .as_str()
        .is_some_and(|s| s.contains(text))
        || task["events"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["text"].as_str().is_some_and(|s| s.contains(text)))
}

/// Events of `task` of `kind`.
pub fn count_events(task: &Value, kind: &str) -> usize {
    task["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == kind)
        .count()
}

/// Every task's id and status as `thread --json` on `home` shows them.
pub fn statuses(home: &Home) -> Result<BTreeMap<String, String>> {
    let v = home.thread()?;
    v["tasks"]
        .as_array()
        .context("thread --json has tasks")?
        .iter()
        .map(|t| {
            Ok((
                t["id"].as_str().context("task id")?.to_owned(),
                t["status"].as_str().context("task status")?.to_owned(),
            ))
        })
        .collect()
}

/// `interrupted` events over every task `thread --json` on `home` shows.
pub fn interrupted_events(home: &Home) -> Result<usize> {
    let v = home.thread()?;
    Ok(v["tasks"]
        .as_array()
        .context("thread --json has tasks")?
        .iter()
        .map(|t| count_events(t, "interrupted"))
        .sum())
}

// ---- writing into a phone's home -------------------------------------------------------------

/// A phone home opened in-process (no process may hold it), for writing changes with any
/// actor. Nothing is stored until [`Forger::save`].
pub struct Forger {
    store: Store,
    genesis: ThreadGenesis,
    doc: ThreadDoc,
    own: ActorId,
    /// Heads of each part when opened: what the store holds.
    before: BTreeMap<u32, Vec<ChangeHash>>,
}

impl std::fmt::Debug for Forger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forger")
            .field("home", &self.store.home())
            .finish_non_exhaustive()
    }
}

impl Forger {
    /// Opens `home`'s thread: the meta document and every stored segment.
    pub fn open(home: &Path) -> Result<Self> {
        let store = Store::open(home)?;
        let genesis: ThreadGenesis = store
            .meta_json(META_GENESIS)?
            .context("the home has no thread")?;
        let own = ActorId::from(
            store
                .meta(META_ACTOR)?
                .context("the home has no actor")?
                .as_slice(),
        );
        let mut doc = ThreadDoc::load(
            store.load_doc(&genesis.doc_id())?.parts(),
            &genesis,
            own.clone(),
        )?;
        let segments: Vec<u32> = store
            .read_table(DOC_HEADS, |t| {
                let mut out = Vec::new();
                for row in t.iter()? {
                    let (k, _) = row?;
                    if let Some(n) = errand_crdt::DocId::parse(k.value())
                        .and_then(|id| genesis.part_of(&id))
                        .filter(|n| *n > 0)
                    {
                        out.push(n);
                    }
                }
                Ok(out)
            })?
            .unwrap_or_default();
        for n in segments {
            doc.attach_segment(n, store.load_doc(&genesis.segment_doc_id(n))?.parts())?;
        }
        let mut before: BTreeMap<u32, Vec<ChangeHash>> = doc.heads().into_iter().collect();
        if doc.newest_segment() == 0 {
            // No task yet: start segment 1 as the replica would (its genesis, nothing stored),
            // so writes under any actor land in it rather than in one a typed write creates
            // with this home's own actor.
            doc.attach_segment(1, std::iter::empty())?;
            before.insert(1, doc.segment_genesis_heads(1));
        }
        Ok(Self {
            store,
            genesis,
            doc,
            own,
            before,
        })
    }

    /// This phone's own actor.
    pub fn own_actor(&self) -> ActorId {
        self.own.clone()
    }

    /// The desktop's actor, from the thread's genesis.
    pub fn owner_actor(&self) -> Result<ActorId> {
        ActorId::try_from(self.genesis.owner_actor.as_str())
            .map_err(|e| anyhow!("the genesis owner actor: {e}"))
    }

    /// The desktop's device id.
    pub fn owner(&self) -> DeviceId {
        self.genesis.owner.clone()
    }

    /// The (first) actor of device `id`, from the device map in the meta document.
    pub fn device_actor(&self, id: &str) -> Result<ActorId> {
        let device = self
            .doc
            .devices()
            .into_iter()
            .find(|d| d.id.as_str() == id)
            .with_context(|| format!("device {id} is not in this home's device map"))?;
        let hex = device.actors.first().context("the device has no actor")?;
        ActorId::try_from(hex.as_str()).map_err(|e| anyhow!("device {id}'s actor: {e}"))
    }

    /// A task for the desktop, as `errand-phone send` would write it.
    pub fn task_for_desktop(&self, instruction: &str) -> NewTask {
        NewTask {
            instruction: instruction.to_owned(),
            executor: "shell".into(),
            target: self.owner(),
            not_after: None,
            attachments: Vec::new(),
        }
    }

    /// The thread, for reads.
    pub fn doc(&self) -> &ThreadDoc {
        &self.doc
    }

    /// Runs typed writes of the thread with every document's actor set to `actor` (Automerge
    /// gives each change that actor's next sequence number in its document).
    pub fn write<T>(
        &mut self,
        actor: &ActorId,
        f: impl FnOnce(&mut ThreadDoc) -> Result<T, WriteError>,
    ) -> Result<T> {
        self.set_doc_actor(actor);
        let out = f(&mut self.doc);
        let own = self.own.clone();
        self.set_doc_actor(&own);
        Ok(out?)
    }

    /// Writes raw ops into the newest segment as one change by `actor`: `f` gets the segment's
    /// Automerge document and its tasks map. Returns `f`'s value and the change's op count.
    pub fn raw<T>(
        &mut self,
        actor: &ActorId,
        f: impl FnOnce(&mut AutoCommit, &ObjId) -> Result<T>,
    ) -> Result<(T, usize)> {
        let n = self.doc.newest_segment();
        let am = self
            .doc
            .part_mut(n)
            .filter(|_| n > 0)
            .context("the home has no segment yet")?
            .automerge();
        let tasks = match am.get(ROOT, "tasks")? {
            Some((automerge::Value::Object(ObjType::Map), id)) => id,
            _ => bail!("segment {n} has no tasks map"),
        };
        am.set_actor(actor.clone());
        let out = f(am, &tasks);
        am.commit_with(CommitOptions::default().with_time(now_ms()));
        let ops = am.get_last_local_change().map_or(0, |c| c.len());
        am.set_actor(self.own.clone());
        Ok((out?, ops))
    }

    fn set_doc_actor(&mut self, actor: &ActorId) {
        for n in self.doc.loaded() {
            if let Some(p) = self.doc.part_mut(n) {
                p.automerge().set_actor(actor.clone());
            }
        }
    }

    /// Stores every part that changed the way the replica stores a commit (`store_part`): its
    /// new changes as one chunk, its heads, and the task indexes, in one transaction per part.
    pub fn save(mut self) -> Result<()> {
        for (n, before) in std::mem::take(&mut self.before) {
            let Some(part) = self.doc.part_mut(n) else {
                continue;
            };
            if part.heads() == before {
                continue;
            }
            let changes = part.automerge().get_changes(&before);
            let chunk = part.save_incremental();
            let heads = part.heads();
            let tasks = self.doc.tasks_touched(n, &Touched::of(&changes));
            let open = self.doc.unfinished_rows(n, &tasks);
            let doc_id = if n == 0 {
                self.genesis.doc_id()
            } else {
                self.genesis.segment_doc_id(n)
            };
            let heads_bytes: Vec<u8> = heads.iter().flat_map(|h| h.0).collect();
            self.store.write(|t| {
                t.append_chunk(&doc_id, &chunk)?;
                t.table(DOC_HEADS)?
                    .insert(doc_id.as_str(), heads_bytes.as_slice())?;
                errand_crdt::engine::write_task_index(t, n, &tasks, &open)?;
                Ok::<_, StoreError>(())
            })?;
        }
        Ok(())
    }
}

/// Sets the Automerge actor a home (which no process holds) uses from now on: what its
/// replica writes with and what its hello claims.
pub fn set_actor(home: &Path, actor: &ActorId) -> Result<()> {
    Store::open(home)?.write(|t| t.put_meta(META_ACTOR, actor.to_bytes()))?;
    Ok(())
}

/// Adds rows to a home's list of stored documents (`doc_heads`) for segments numbered up to
/// 999,999,999 (the largest a segment id can name), with no heads, until the list holds
/// `total` documents: its next hello lists every one. Returns how many it added.
pub fn list_far_segments(home: &Path, total: usize) -> Result<usize> {
    let store = Store::open(home)?;
    let genesis: ThreadGenesis = store
        .meta_json(META_GENESIS)?
        .context("the home has no thread")?;
    let have = store
        .read_table(DOC_HEADS, |t| Ok(t.iter()?.count()))?
        .unwrap_or(0);
    let add = total.saturating_sub(have);
    store.write(|t| {
        let mut table = t.table(DOC_HEADS)?;
        for i in 0..add {
            let n = 999_999_999 - i as u32;
            table.insert(genesis.segment_doc_id(n).as_str(), &[][..])?;
        }
        Ok::<_, StoreError>(())
    })?;
    Ok(add)
}

// ---- processes -------------------------------------------------------------------------------

/// A `kB` field of `/proc/<pid>/status` (`VmHWM`, `VmRSS`), or a count (`Threads`).
fn proc_status(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Peak resident memory of a process (`VmHWM`), KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    proc_status(pid, "VmHWM")
}

/// Resident memory of a process now (`VmRSS`), KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_status(pid, "VmRSS")
}

/// Threads of a process now.
pub fn threads(pid: u32) -> Option<u64> {
    proc_status(pid, "Threads")
}

/// CPU time a process has used (user + system), seconds. `/proc/<pid>/stat` counts it in
/// `USER_HZ` ticks, which Linux fixes at 100 for user space.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Runs a workspace binary with a deadline, killing it (and failing) if it has not exited by
/// then, or if its resident memory passes `max_rss_kib`.
pub fn run_guarded(
    bin_name: &str,
    args: &[&str],
    deadline: Duration,
    max_rss_kib: Option<u64>,
) -> Result<Output> {
    let mut child = Command::new(bin(bin_name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {bin_name} {args:?}"))?;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let end = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let rss = rss_kib(child.id()).unwrap_or(0);
        if Instant::now() > end || max_rss_kib.is_some_and(|m| rss > m) {
            let _ = child.kill();
            let _ = child.wait();
            let err = err.join().unwrap_or_default();
            bail!(
                "{bin_name} {args:?} killed: still running after {deadline:?} or over its \
                 memory cap ({rss} KiB resident); stderr ends: {}",
                last_lines(&err, 2)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// `status --json` of a running daemon's home, which must answer within [`DEADLINE`].
pub fn status_within(home: &Home) -> Result<Value> {
    let out = run_guarded(
        home.bin,
        &["--home", path_str(&home.dir)?, "status", "--json"],
        DEADLINE,
        None,
    )?;
    ensure!(
        out.status.success(),
        "status --json failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Kills a process (SIGKILL) once its resident memory passes a cap, so a memory attack that
/// works fails the test instead of exhausting the machine. Stops watching when dropped.
#[derive(Debug)]
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    fired: Arc<AtomicBool>,
    pid: u32,
    cap_kib: u64,
}

impl Watchdog {
    /// Watches `pid` against `cap_kib`.
    pub fn watch(pid: u32, cap_kib: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let fired = Arc::new(AtomicBool::new(false));
        let (s, f) = (stop.clone(), fired.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if rss_kib(pid).is_some_and(|r| r > cap_kib) {
                    f.store(true, Ordering::Relaxed);
                    signal(pid, libc::SIGKILL);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self {
            stop,
            fired,
            pid,
            cap_kib,
        }
    }

    /// An error if it had to kill the process.
    pub fn check(&self) -> Result<()> {
        ensure!(
            !self.fired.load(Ordering::Relaxed),
            "process {} passed {} KiB resident and was killed",
            self.pid,
            self.cap_kib
        );
        Ok(())
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---- silent pairing streams ------------------------------------------------------------------

/// Silent `/errand/pair/1` streams to a desktop, held open until dropped: each from one of a
/// few in-process libp2p clients (TCP + Noise + Yamux and `libp2p-stream`, nothing else).
pub struct PairFlood {
    rt: tokio::runtime::Runtime,
    streams: Vec<libp2p::Stream>,
    /// Why streams failed to open, one line per distinct reason.
    pub errors: BTreeSet<String>,
}

impl std::fmt::Debug for PairFlood {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairFlood")
            .field("streams", &self.streams.len())
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

/// Streams one client opens: under Yamux's 256 streams waiting for an acknowledgement.
pub const FLOOD_PER_CONNECTION: usize = 250;

impl PairFlood {
    /// Opens `count` pairing streams to `desktop` at `addr` (needs a live ticket there, so
    /// its gate admits strangers), [`FLOOD_PER_CONNECTION`] per client, and writes nothing.
    pub fn open(desktop: &str, addr: &str, count: usize) -> Result<Self> {
        use futures::StreamExt;
        use libp2p::swarm::{SwarmEvent, dial_opts::DialOpts};
        let desktop: libp2p::PeerId = desktop.parse()?;
        let addr: libp2p::Multiaddr = addr.parse()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (streams, errors) = rt.block_on(async {
            let mut controls = Vec::new();
            for _ in 0..count.div_ceil(FLOOD_PER_CONNECTION) {
                let mut swarm = libp2p::SwarmBuilder::with_new_identity()
                    .with_tokio()
                    .with_tcp(
                        libp2p::tcp::Config::default().nodelay(true),
                        libp2p::noise::Config::new,
                        libp2p::yamux::Config::default,
                    )?
                    .with_behaviour(|_| libp2p_stream::Behaviour::new())?
                    .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
                    .build();
                controls.push(swarm.behaviour().new_control());
                swarm.dial(
                    DialOpts::peer_id(desktop)
                        .addresses(vec![addr.clone()])
                        .build(),
                )?;
                tokio::time::timeout(DEADLINE, async {
                    loop {
                        match swarm.select_next_some().await {
                            SwarmEvent::ConnectionEstablished { peer_id, .. }
                                if peer_id == desktop =>
                            {
                                return Ok(());
                            }
                            SwarmEvent::OutgoingConnectionError { error, .. } => {
                                return Err(anyhow!("dialing the desktop failed: {error}"));
                            }
                            _ => {}
                        }
                    }
                })
                .await
                .context("connecting to the desktop timed out")??;
                tokio::spawn(async move {
                    loop {
                        swarm.select_next_some().await;
                    }
                });
            }
            let opens = (0..count).map(|i| {
                let mut control = controls[i / FLOOD_PER_CONNECTION].clone();
                async move {
                    tokio::time::timeout(
                        DEADLINE,
                        control.open_stream(desktop, errand_p2p::pair::PAIR_PROTOCOL),
                    )
                    .await
                    .map_err(|_| "timed out".to_owned())?
                    .map_err(|e| e.to_string())
                }
            });
            let mut streams = Vec::new();
            let mut errors = BTreeSet::new();
            for r in futures::future::join_all(opens).await {
                match r {
                    Ok(s) => streams.push(s),
                    Err(e) => {
                        errors.insert(e);
                    }
                }
            }
            anyhow::Ok((streams, errors))
        })?;
        Ok(Self {
            rt,
            streams,
            errors,
        })
    }

    /// How many streams opened.
    pub fn opened(&self) -> usize {
        self.streams.len()
    }

    /// Closes every stream and client.
    pub fn close(self) {
        let Self { rt, streams, .. } = self;
        drop(streams);
        rt.shutdown_background();
    }
}

// ---- blob peers ------------------------------------------------------------------------------

/// Reads a home's node identity (the home must not be open in another process).
pub fn home_keypair(home: &Path) -> Result<libp2p::identity::Keypair> {
    let bytes = Store::open(home)?
        .meta(META_IDENTITY)?
        .context("the home has no identity")?;
    Ok(libp2p::identity::Keypair::from_protobuf_encoding(&bytes)?)
}

/// What a [`BlobPeer`]'s server did.
#[derive(Debug, Default)]
pub struct Served {
    /// Data responses sent.
    pub responses: std::sync::atomic::AtomicU64,
    /// Of those, how many had a bit flipped.
    pub flipped: std::sync::atomic::AtomicU64,
}

/// An in-process libp2p peer connected to a desktop for `/errand/blob/1` only (TCP + Noise
/// + Yamux and `libp2p-stream`, nothing else): it asks what it likes, or serves blobs badly.
pub struct BlobPeer {
    rt: tokio::runtime::Runtime,
    control: libp2p_stream::Control,
    desktop: libp2p::PeerId,
}

impl std::fmt::Debug for BlobPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobPeer")
            .field("desktop", &self.desktop)
            .finish_non_exhaustive()
    }
}

/// One answer to a raw request: (status byte, size, body length), or why the stream ended.
pub type Answer = std::result::Result<(u8, u64, usize), String>;

impl BlobPeer {
    /// Connects to `desktop` at `addr` as `keypair`.
    pub fn connect(keypair: libp2p::identity::Keypair, desktop: &str, addr: &str) -> Result<Self> {
        use futures::StreamExt;
        use libp2p::swarm::{SwarmEvent, dial_opts::DialOpts};
        let desktop: libp2p::PeerId = desktop.parse()?;
        let addr: libp2p::Multiaddr = addr.parse()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let control = rt.block_on(async {
            let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
                .with_tokio()
                .with_tcp(
                    libp2p::tcp::Config::default().nodelay(true),
                    libp2p::noise::Config::new,
                    libp2p::yamux::Config::default,
                )?
                .with_behaviour(|_| libp2p_stream::Behaviour::new())?
                .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
                .build();
            let control = swarm.behaviour().new_control();
            swarm.dial(DialOpts::peer_id(desktop).addresses(vec![addr]).build())?;
            tokio::time::timeout(DEADLINE, async {
                loop {
                    match swarm.select_next_some().await {
                        SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == desktop => {
                            return Ok(());
                        }
                        SwarmEvent::OutgoingConnectionError { error, .. } => {
                            return Err(anyhow!("dialing the desktop failed: {error}"));
                        }
                        _ => {}
                    }
                }
            })
            .await
            .context("connecting to the desktop timed out")??;
            tokio::spawn(async move {
                loop {
                    swarm.select_next_some().await;
                }
            });
            anyhow::Ok(control)
        })?;
        Ok(Self {
            rt,
            control,
            desktop,
        })
    }

    /// Opens one blob stream, writes each raw request frame and reads its answer, in order.
    /// After a stream error the remaining answers repeat it.
    pub fn ask(&self, frames: &[Vec<u8>]) -> Result<Vec<Answer>> {
        use futures::{AsyncReadExt, AsyncWriteExt};
        let mut control = self.control.clone();
        let desktop = self.desktop;
        let frames = frames.to_vec();
        self.rt.block_on(async move {
            let mut s = tokio::time::timeout(
                DEADLINE,
                control.open_stream(desktop, errand_p2p::blob::BLOB_PROTOCOL),
            )
            .await
            .context("opening a blob stream timed out")?
            .map_err(|e| anyhow!("opening a blob stream: {e}"))?;
            let mut out = Vec::new();
            let mut broken: Option<String> = None;
            for f in frames {
                if let Some(e) = &broken {
                    out.push(Err(e.clone()));
                    continue;
                }
                let answer = tokio::time::timeout(DEADLINE, async {
                    s.write_all(&f).await?;
                    s.flush().await?;
                    let mut head = [0u8; 13];
                    s.read_exact(&mut head).await?;
                    let size = u64::from_be_bytes(head[1..9].try_into().unwrap_or_default());
                    let len = u32::from_be_bytes(head[9..13].try_into().unwrap_or_default());
                    let mut body = vec![0u8; len as usize];
                    s.read_exact(&mut body).await?;
                    std::io::Result::Ok((head[0], size, body.len()))
                })
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|r| r.map_err(|e| e.to_string()));
                if let Err(e) = &answer {
                    broken = Some(e.clone());
                }
                out.push(answer);
            }
            Ok(out)
        })
    }

    /// Serves blob streams from the files in `blobs` (a home's `blobs` folder: `<hash>` and
    /// `<hash>.obao`), flipping the last bit of every `flip_every`-th data response (0: none).
    /// Serves anything it has, referenced or not, until dropped.
    pub fn serve_flipping(&self, blobs: PathBuf, flip_every: u64) -> Result<Arc<Served>> {
        use errand_p2p::blob::wire::{self, Status, What};
        use futures::StreamExt;
        let served = Arc::new(Served::default());
        let mut incoming = self
            .control
            .clone()
            .accept(errand_p2p::blob::BLOB_PROTOCOL)
            .map_err(|e| anyhow!("{e}"))?;
        let counts = served.clone();
        self.rt.spawn(async move {
            while let Some((_, mut s)) = incoming.next().await {
                let (blobs, counts) = (blobs.clone(), counts.clone());
                tokio::spawn(async move {
                    while let Ok(Some(req)) = wire::read_request(&mut s).await {
                        let hex = data_encoding_hex(&req.hash);
                        let path = match req.what {
                            What::Data => blobs.join(&hex),
                            What::Outboard => blobs.join(format!("{hex}.obao")),
                        };
                        let size = std::fs::metadata(blobs.join(&hex)).map_or(0, |m| m.len());
                        let bytes = std::fs::read(&path).ok().and_then(|all| {
                            let start = usize::try_from(req.offset).ok()?;
                            let end = start.checked_add(req.len as usize)?;
                            all.get(start..end).map(<[u8]>::to_vec)
                        });
                        let Some(mut bytes) = bytes else {
                            if wire::write_response(&mut s, Status::NotFound, 0, &[])
                                .await
                                .is_err()
                            {
                                return;
                            }
                            continue;
                        };
                        if req.what == What::Data {
                            let n = counts.responses.fetch_add(1, Ordering::Relaxed) + 1;
                            if flip_every > 0 && n % flip_every == 0 && !bytes.is_empty() {
                                let last = bytes.len() - 1;
                                bytes[last] ^= 1;
                                counts.flipped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        if wire::write_response(&mut s, Status::Ok, size, &bytes)
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Ok(served)
    }

    /// Closes the peer.
    pub fn close(self) {
        self.rt.shutdown_background();
    }
}

fn data_encoding_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A raw `/errand/blob/1` request frame (see `errand_p2p::blob::wire`): `what` 0 for data,
/// 1 for the outboard.
pub fn blob_request(what: u8, hash: &[u8; 32], offset: u64, len: u32) -> Vec<u8> {
    let mut f = vec![what];
    f.extend_from_slice(hash);
    f.extend_from_slice(&offset.to_be_bytes());
    f.extend_from_slice(&len.to_be_bytes());
    f
}
