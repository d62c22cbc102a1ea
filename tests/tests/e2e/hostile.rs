//! Regression tests: a paired phone writes only as itself.
//!
//! - Every test runs a real `errand-desktop run` daemon and two phones paired with it through
//!   real tickets: an honest one that only uses the CLI, and a hostile one. Phones run one-shot
//!   commands only.
//! - The hostile phone is a real phone home. Between two of its commands the test opens that
//!   home in-process ([`Forger`]), writes Automerge changes with a chosen actor (the desktop's,
//!   from the thread's genesis; the honest phone's, from the device map) and stores them as the
//!   replica stores a commit; then `errand-phone sync` carries them to the desktop.
//! - Side effects are marker files: a task's command appends to one, so a test can tell how
//!   often a task really ran, whatever the thread says.
//! - Each test asserts what must hold once changes are checked against the device that sent
//!   them (DESIGN.md section 3, "Authorship is enforced at ingest"). On the code before that,
//!   each one fails.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use automerge::{ObjType, transaction::Transactable};
use errand_core::{EventKind, TaskId};
use errand_p2p::peer::now_ms;
use errand_tests::hostile::{
    Forger, KILL_RSS_KIB, LONG, PairFlood, QUIET, Thread, ThreadOptions, Watchdog, cpu_seconds,
    interrupted_events, list_far_segments, peak_rss_kib, send, set_actor, shown_tasks, shows_text,
    status_within, statuses, task, threads, wait_status,
};
use serde_json::Value;

/// The output a forged `output` event carries.
const FORGED: &str = "FORGED";
/// What the desktop may peak at after an attack (VmHWM). Idle it takes about 20 MB.
const MAX_PEAK_RSS_KIB: u64 = 256 * 1024;
/// Threads the desktop may run while strangers hold pairing streams open.
const MAX_THREADS: u64 = 64;
/// Silent pairing streams in the flood.
const FLOOD_STREAMS: usize = 750;
/// How long the flood's streams stay open while the desktop's threads are counted: past the
/// pairing handshake's 10 s step timeout, so every stream has been given up on.
const FLOOD_HOLD: Duration = Duration::from_secs(12);
/// The window in which a desktop that was handed a claimed actor must stay idle.
const CLAIM_WINDOW: Duration = Duration::from_secs(5);
/// CPU the desktop may use in that window, as a share of one core.
const MAX_CPU_SHARE: f64 = 0.5;

/// The "nothing more happens" check: waits [`QUIET`] after the last thing that had to happen.
fn quiet() {
    std::thread::sleep(QUIET);
}

/// Passes if nothing failed; otherwise fails with every failure, one per line.
fn verdict(failures: Vec<String>) -> Result<()> {
    if failures.is_empty() {
        return Ok(());
    }
    bail!("{}", failures.join("\n"))
}

/// Neither the desktop nor the honest phone (synced first) shows forged output for task `id`,
/// or shows it done while its command (marker `marker`) never ran, in `task --json` or in
/// `thread --json`.
fn check_not_forged(t: &Thread, id: &str, marker: &str, when: &str) -> Result<()> {
    t.must_sync(&t.honest)?;
    for (who, home) in [("the desktop", &t.desktop), ("the honest phone", &t.honest)] {
        let in_thread = home.thread()?["tasks"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["id"] == id)
            .cloned();
        for (view, v) in [
            ("task --json", task(home, id)),
            ("thread --json", in_thread),
        ] {
            let Some(v) = v else { continue };
            ensure!(
                !shows_text(&v, FORGED),
                "{who}'s {view} shows output the desktop never produced ({when}): {v}"
            );
            ensure!(
                v["status"] != "done" || t.runs(marker) > 0,
                "{who}'s {view} shows task {id} done although its command never ran ({when}): {v}"
            );
        }
    }
    Ok(())
}

/// Writes `started`, an `output` of [`FORGED`] and `finished` with exit code 0 on attempt 1 of
/// task `id`, under `actor`.
fn forge_facts(f: &mut Forger, actor: &automerge::ActorId, id: TaskId) -> Result<()> {
    f.write(actor, |d| {
        let now = now_ms();
        d.append_task_event(id, 1, &EventKind::Started, now)?;
        d.append_task_event(
            id,
            1,
            &EventKind::Output {
                text: format!("{FORGED}\n"),
            },
            now,
        )?;
        d.append_task_event(id, 1, &EventKind::Finished { exit_code: 0 }, now)
    })
}

/// Syncs the hostile phone after an attack; its outcome does not matter (a desktop that
/// refuses it may close every session, and a phone that attacks itself may be killed).
fn deliver_attack(t: &Thread) {
    match t.sync_hostile() {
        Ok(out) if !out.status.success() => eprintln!(
            "the hostile phone's sync exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(_) => {}
        Err(e) => eprintln!("the hostile phone's sync: {e:#}"),
    }
}

// ---- 1. facts under the desktop's actor ----------------------------------------------------

#[test]
fn facts_a_phone_writes_under_the_desktops_actor_never_show_a_task_done() -> Result<()> {
    // Root cause: the desktop merges a phone's changes without checking their actor against
    // the phone, and an event's author is the device that owns its op's actor. Events the
    // phone wrote under the desktop's actor (it is in the thread's genesis) are therefore the
    // desktop's facts: the phone's task shows done, with the phone's output, on the desktop
    // and on every other phone, though its command never ran.
    let t = Thread::start(ThreadOptions::default())?;
    t.must_sync(&t.hostile)?;
    let mut f = Forger::open(&t.hostile.dir)?;
    let (own, owner) = (f.own_actor(), f.owner_actor()?);
    let new = f.task_for_desktop(&t.marking("forged"));
    let id = f.write(&own, |d| d.enqueue_task(&new, now_ms()))?;
    forge_facts(&mut f, &owner, id)?;
    f.save()?;
    let id = id.to_string();
    deliver_attack(&t);

    check_not_forged(&t, &id, "forged", "after the hostile phone synced")?;
    // Any task queued before this one has had its turn once it is done.
    t.honest_task_done("later")?;
    quiet();
    check_not_forged(&t, &id, "forged", "after the desktop ran a later task")?;
    Ok(())
}

#[test]
fn a_phone_cannot_settle_another_phones_queued_task_with_the_desktops_actor() -> Result<()> {
    // Root cause: as above, facts a phone writes under the desktop's actor count as the
    // desktop's, also on a task another phone wrote. A forged `finished` is the task's earliest
    // terminal fact, so the status fold settles it as done and the runner never starts it.
    let t = Thread::start(ThreadOptions::default())?;
    let blocker = t.block_desktop()?;
    let id = send(&t.honest, &t.marking("victim"))?;
    t.must_sync(&t.honest)?;
    wait_status(&t.desktop, &id, "delivered", LONG)?;
    t.must_sync(&t.hostile)?;
    let mut f = Forger::open(&t.hostile.dir)?;
    let owner = f.owner_actor()?;
    let task_id: TaskId = id.parse().context("task id")?;
    forge_facts(&mut f, &owner, task_id)?;
    f.save()?;
    deliver_attack(&t);
    blocker.release(&t)?;

    let mut last = Value::Null;
    let ended = wait_for_end(&t, &id, &mut last)
        .with_context(|| format!("the honest phone's task did not end: {last}"))?;
    ensure!(
        !shows_text(&ended, FORGED),
        "the desktop shows output it never produced on the honest phone's task: {ended}"
    );
    ensure!(
        ended["status"] == "done" && t.runs("victim") == 1,
        "the honest phone's task ended {} but its command ran {} times: {ended}",
        ended["status"],
        t.runs("victim")
    );
    check_not_forged(&t, &id, "victim", "after the task ended")?;
    Ok(())
}

/// Waits until the desktop shows task `id` ended; keeps the last view in `last`.
fn wait_for_end(t: &Thread, id: &str, last: &mut Value) -> Result<Value> {
    errand_tests::wait_for(&format!("task {id} to end"), LONG, || {
        let v = task(&t.desktop, id)?;
        *last = v.clone();
        ["done", "failed", "cancelled", "denied", "interrupted"]
            .iter()
            .any(|s| v["status"] == *s)
            .then_some(v)
    })
}

// ---- 2. authorship -----------------------------------------------------------------------

#[test]
fn tasks_a_phone_writes_with_another_devices_actor_never_run_as_that_device() -> Result<()> {
    // Root cause: a task's author is the device that owns the actor of the op that created it,
    // and the desktop accepts a phone's change whatever its actor. A phone can therefore queue
    // tasks as the other phone (its actor is in the device map) or as the desktop itself, and
    // the desktop runs them as theirs.
    let t = Thread::start(ThreadOptions::default())?;
    t.honest_task_done("first")?;
    t.must_sync(&t.hostile)?;
    let mut f = Forger::open(&t.hostile.dir)?;
    let (owner, honest) = (f.owner_actor()?, f.device_actor(&t.honest_id)?);
    let as_phone = f.task_for_desktop(&t.marking("as-phone"));
    let as_desktop = f.task_for_desktop(&t.marking("as-desktop"));
    let by_phone = f.write(&honest, |d| d.enqueue_task(&as_phone, now_ms()))?;
    let by_desktop = f.write(&owner, |d| d.enqueue_task(&as_desktop, now_ms()))?;
    f.save()?;
    deliver_attack(&t);

    // The honest phone takes in what the desktop holds first, so its next change does not
    // collide with one forged under its actor (that is the wedge test's case).
    t.must_sync(&t.honest)?;
    t.honest_task_done("later")?;
    quiet();
    let mut failures = Vec::new();
    for (id, marker, device, who) in [
        (by_phone, "as-phone", &t.honest_id, "the honest phone"),
        (by_desktop, "as-desktop", &t.desktop_id, "the desktop"),
    ] {
        let id = id.to_string();
        if let Some(v) = task(&t.desktop, &id)
            && v["author"] == device.as_str()
        {
            failures.push(format!(
                "the desktop shows task {id}, written by the hostile phone, as written by {who}: {v}"
            ));
        }
        if t.runs(marker) > 0 {
            failures.push(format!(
                "task {id}, written by the hostile phone as {who}, ran {} time(s)",
                t.runs(marker)
            ));
        }
    }
    verdict(failures)
}

// ---- 3. target -----------------------------------------------------------------------------

#[test]
fn a_task_for_another_target_is_neither_run_nor_shown_by_the_desktop() -> Result<()> {
    // Root cause: a task's target is whatever the writing phone put there, and nothing checks
    // at ingest that it names the thread's owner (DESIGN.md 3: "A task's target must be the
    // thread's owner desktop"). The desktop stores and shows a task meant for a device that
    // runs nothing.
    let t = Thread::start(ThreadOptions::default())?;
    t.must_sync(&t.hostile)?;
    let mut f = Forger::open(&t.hostile.dir)?;
    let own = f.own_actor();
    let mut new = f.task_for_desktop(&t.marking("elsewhere"));
    new.target = t.honest_id.parse().context("device id")?;
    let id = f
        .write(&own, |d| d.enqueue_task(&new, now_ms()))?
        .to_string();
    f.save()?;
    deliver_attack(&t);

    t.honest_task_done("later")?;
    quiet();
    let mut failures = Vec::new();
    if shown_tasks(&t.desktop)?.contains(&id) {
        failures.push(format!(
            "the desktop shows task {id}, whose target is the honest phone: {}",
            task(&t.desktop, &id).unwrap_or_default()
        ));
    }
    if t.runs("elsewhere") > 0 {
        failures.push(format!("task {id} for another target ran"));
    }
    verdict(failures)
}

// ---- 4. revocation -------------------------------------------------------------------------

#[test]
fn a_task_forged_under_the_desktops_actor_never_runs_once_its_writer_is_revoked() -> Result<()> {
    // Root cause: revoking a phone cancels the unstarted tasks it wrote and skips its tasks
    // from then on, by author; but the author is the op's actor, and the desktop accepted the
    // phone's change under the desktop's own actor. The phone's task counts as the desktop's
    // and runs after the phone is revoked.
    let t = Thread::start(ThreadOptions::default())?;
    let blocker = t.block_desktop()?;
    t.must_sync(&t.hostile)?;
    let mut f = Forger::open(&t.hostile.dir)?;
    let owner = f.owner_actor()?;
    let new = f.task_for_desktop(&t.marking("revoked"));
    let id = f
        .write(&owner, |d| d.enqueue_task(&new, now_ms()))?
        .to_string();
    f.save()?;
    deliver_attack(&t);
    let v = t
        .desktop
        .json(&["devices", "--json", "revoke", &t.hostile_id])?;
    ensure!(v["revoked"] == true, "revoking the hostile phone: {v}");
    blocker.release(&t)?;

    // Tasks run oldest first, one at a time: the forged one has had its turn once a later one
    // is done.
    t.honest_task_done("later")?;
    quiet();
    let mut failures = Vec::new();
    if t.runs("revoked") > 0 {
        failures.push(format!(
            "task {id}, written by the revoked phone under the desktop's actor, ran {} time(s)",
            t.runs("revoked")
        ));
    }
    if let Some(v) = task(&t.desktop, &id)
        && (v["status"] == "done" || v["status"] == "running")
    {
        failures.push(format!("the desktop shows task {id} run: {v}"));
    }
    verdict(failures)
}

// ---- 5. a claimed actor in the hello -------------------------------------------------------

#[test]
fn a_phone_claiming_the_desktops_actor_in_its_hello_changes_no_task() -> Result<()> {
    // Root cause: the desktop adds the actor a phone claims in its sync hello to that phone's
    // device record, unchecked (a device's actor should be bound once, at pairing). A phone
    // that claims the desktop's own actor then owns it in the device map (the hostile phone's
    // record sorts after the desktop's, and the later record wins), so every fact the desktop
    // wrote reads as the phone's and is ignored: finished tasks fall back to queued.
    let t = Thread::start(ThreadOptions {
        hostile_sorts_after_desktop: true,
        ..ThreadOptions::default()
    })?;
    t.honest_task_done("honest")?;
    let own = send(&t.hostile, &t.marking("hostile"))?;
    t.must_sync(&t.hostile)?;
    wait_status(&t.desktop, &own, "done", LONG)?;
    t.must_sync(&t.honest)?;
    let before = statuses(&t.desktop)?;
    ensure!(
        before.len() == 2 && before.values().all(|s| s == "done"),
        "{before:?}"
    );
    let honest_before = statuses(&t.honest)?;
    let interrupted = interrupted_events(&t.desktop)?;
    let owner = Forger::open(&t.hostile.dir)?.owner_actor()?;
    set_actor(&t.hostile.dir, &owner)?;
    deliver_attack(&t);

    let pid = t.daemon.pid();
    let cpu_before = cpu_seconds(pid).context("the desktop's CPU time")?;
    let start = Instant::now();
    let mut failures = Vec::new();
    while start.elapsed() < CLAIM_WINDOW {
        let now = statuses(&t.desktop)?;
        if now != before {
            failures.push(format!(
                "the desktop's task statuses changed: before {before:?}, now {now:?}"
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(CLAIM_WINDOW.saturating_sub(start.elapsed()));
    let cpu = cpu_seconds(pid).context("the desktop's CPU time")? - cpu_before;
    let share = cpu / start.elapsed().as_secs_f64();
    if share > MAX_CPU_SHARE {
        failures.push(format!(
            "the desktop used {:.0}% of a core for {:?} after the claim",
            share * 100.0,
            start.elapsed()
        ));
    }
    let after = interrupted_events(&t.desktop)?;
    if after != interrupted {
        failures.push(format!(
            "the desktop appended {} interrupted fact(s)",
            after.saturating_sub(interrupted)
        ));
    }
    t.must_sync(&t.honest)?;
    let honest_after = statuses(&t.honest)?;
    if honest_after != honest_before {
        failures.push(format!(
            "the honest phone's task statuses changed: before {honest_before:?}, now {honest_after:?}"
        ));
    }
    verdict(failures)
}

// ---- 6. wedge ------------------------------------------------------------------------------

#[test]
fn a_change_forged_under_an_honest_phones_actor_does_not_wedge_that_phone() -> Result<()> {
    // Root cause: the desktop accepts a change under the honest phone's actor from the hostile
    // phone. It takes that actor's next sequence number in the document, so the honest phone's
    // own next change carries the same (actor, seq): Automerge refuses it as a duplicate
    // sequence number on every sync, and the honest phone can never send again.
    let t = Thread::start(ThreadOptions::default())?;
    let first = t.honest_task_done("first")?;
    t.must_sync(&t.honest)?;
    t.must_sync(&t.hostile)?;
    let mut f = Forger::open(&t.hostile.dir)?;
    let honest = f.device_actor(&t.honest_id)?;
    let first: TaskId = first["id"]
        .as_str()
        .context("task id")?
        .parse()
        .context("task id")?;
    f.write(&honest, |d| {
        d.append_task_event(first, 1, &EventKind::CancelRequested, now_ms())
    })?;
    f.save()?;
    deliver_attack(&t);

    let id = send(&t.honest, &t.marking("after"))?;
    t.must_sync(&t.honest)
        .context("the honest phone cannot sync after the forged change")?;
    wait_status(&t.desktop, &id, "done", LONG)?;
    ensure!(
        t.runs("after") == 1,
        "the task ran {} times",
        t.runs("after")
    );
    Ok(())
}

// ---- 7. denial of service ------------------------------------------------------------------

/// After an attack: the desktop answers `status --json`, the honest phone still gets a task
/// done, the desktop's peak RSS stayed under [`MAX_PEAK_RSS_KIB`], and the watchdog did not
/// have to kill it. Failures go to `failures`; returns the status if it answered.
fn desktop_survives(t: &Thread, watchdog: &Watchdog, failures: &mut Vec<String>) -> Option<Value> {
    let status = match status_within(&t.desktop) {
        Ok(v) => Some(v),
        Err(e) => {
            failures.push(format!("the desktop's status --json did not answer: {e:#}"));
            None
        }
    };
    if let Err(e) = t.honest_task_done("honest-after") {
        failures.push(format!("the honest phone could not get a task done: {e:#}"));
    }
    match peak_rss_kib(t.daemon.pid()) {
        Some(kib) if kib >= MAX_PEAK_RSS_KIB => failures.push(format!(
            "the desktop's peak RSS was {} MiB (limit {} MiB)",
            kib / 1024,
            MAX_PEAK_RSS_KIB / 1024
        )),
        Some(_) => {}
        None => failures.push("the desktop process is gone".into()),
    }
    if let Err(e) = watchdog.check() {
        failures.push(format!("{e:#}"));
    }
    status
}

#[test]
fn one_change_with_twenty_thousand_tasks_does_not_take_the_desktop_down() -> Result<()> {
    // Root cause: the desktop applies whatever one change from a phone holds; nothing bounds
    // the ops per change. One change can queue 20,000 tasks, which the desktop indexes,
    // delivers and runs ahead of every other phone's.
    let t = Thread::start(ThreadOptions::default())?;
    let watchdog = Watchdog::watch(t.daemon.pid(), KILL_RSS_KIB);
    t.must_sync(&t.hostile)?;
    let mut f = Forger::open(&t.hostile.dir)?;
    let (own, target) = (f.own_actor(), f.owner());
    let (_, ops) = f.raw(&own, |am, tasks| {
        let now = now_ms();
        for _ in 0..20_000 {
            let id = TaskId::new_at(now).to_string();
            let obj = am.put_object(tasks, id.as_str(), ObjType::Map)?;
            am.put(&obj, "id", id.as_str())?;
            am.put(&obj, "instruction", "true")?;
            am.put(&obj, "executor", "shell")?;
            am.put(&obj, "target", target.as_str())?;
            am.put(&obj, "created_at", now)?;
            am.put_object(&obj, "events", ObjType::List)?;
        }
        Ok(())
    })?;
    ensure!(ops >= 20_000 * 7, "the change has only {ops} ops");
    f.save()?;
    deliver_attack(&t);

    let mut failures = Vec::new();
    desktop_survives(&t, &watchdog, &mut failures);
    verdict(failures)
}

#[test]
fn one_change_of_a_million_ops_does_not_take_the_desktop_down() -> Result<()> {
    // Root cause: as above, nothing bounds the ops per change: one change inserting a million
    // characters into a text object is applied, indexed and stored by the desktop in one go.
    let t = Thread::start(ThreadOptions::default())?;
    let watchdog = Watchdog::watch(t.daemon.pid(), KILL_RSS_KIB);
    t.must_sync(&t.hostile)?;
    let mut f = Forger::open(&t.hostile.dir)?;
    let (own, target) = (f.own_actor(), f.owner());
    let (_, ops) = f.raw(&own, |am, tasks| {
        let now = now_ms();
        let id = TaskId::new_at(now).to_string();
        let obj = am.put_object(tasks, id.as_str(), ObjType::Map)?;
        am.put(&obj, "id", id.as_str())?;
        am.put(&obj, "instruction", "true")?;
        am.put(&obj, "executor", "shell")?;
        am.put(&obj, "target", target.as_str())?;
        am.put(&obj, "created_at", now)?;
        am.put_object(&obj, "events", ObjType::List)?;
        let text = am.put_object(&obj, "notes", ObjType::Text)?;
        am.splice_text(&text, 0, 0, &"x".repeat(1_000_000))?;
        Ok(())
    })?;
    ensure!(ops >= 1_000_000, "the change has only {ops} ops");
    f.save()?;
    deliver_attack(&t);

    let mut failures = Vec::new();
    desktop_survives(&t, &watchdog, &mut failures);
    verdict(failures)
}

#[test]
fn a_hello_listing_a_hundred_thousand_far_segments_does_not_take_the_desktop_down() -> Result<()> {
    // Root cause: the desktop takes the documents a peer lists in its hello at their word: it
    // starts a session for each, and each segment number up to the newest the peer claims is
    // created, loaded and stored. A hello listing 100,000 segments near 10^9 makes the desktop
    // hold and keep 100,000 documents.
    let t = Thread::start(ThreadOptions::default())?;
    let watchdog = Watchdog::watch(t.daemon.pid(), KILL_RSS_KIB);
    t.must_sync(&t.hostile)?;
    let added = list_far_segments(&t.hostile.dir, 100_000)?;
    ensure!(added > 99_000, "added only {added} segments");
    deliver_attack(&t);

    let mut failures = Vec::new();
    if let Some(status) = desktop_survives(&t, &watchdog, &mut failures) {
        let documents = status["documents"].as_array().map_or(0, Vec::len);
        if documents >= 100 {
            failures.push(format!(
                "the desktop lists {documents} documents in its thread after the hello"
            ));
        }
    }
    verdict(failures)
}

#[test]
fn silent_pairing_streams_do_not_exhaust_the_desktops_threads() -> Result<()> {
    // Root cause: the desktop serves each `/errand/pair/1` stream on a blocking thread that
    // waits up to the handshake's step timeout for the phone's first message, with no bound on
    // streams. While a ticket is live its gate admits anyone, so silent streams tie up a
    // thread each, up to the runtime's 512 blocking threads.
    let t = Thread::start(ThreadOptions::default())?;
    let watchdog = Watchdog::watch(t.daemon.pid(), KILL_RSS_KIB);
    t.desktop.json(&["pair", "--json", "--ttl", "10m"])?;
    let pid = t.daemon.pid();
    let flood = PairFlood::open(&t.desktop_id, &t.addr, FLOOD_STREAMS)?;
    let start = Instant::now();
    let mut failures = Vec::new();
    let answered = status_within(&t.desktop);
    let mut most = 0;
    while start.elapsed() < FLOOD_HOLD {
        most = most.max(threads(pid).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (opened, errors) = (flood.opened(), flood.errors.clone());
    flood.close();
    if let Err(e) = answered {
        failures.push(format!(
            "the desktop's status --json did not answer during the flood: {e:#}"
        ));
    }
    if most >= MAX_THREADS {
        failures.push(format!(
            "the desktop ran {most} threads with {opened} silent pairing streams open \
             (limit {MAX_THREADS}; streams that failed to open: {errors:?})"
        ));
    }
    desktop_survives(&t, &watchdog, &mut failures);
    verdict(failures)
}
