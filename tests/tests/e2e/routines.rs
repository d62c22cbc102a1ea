//! Routines between real processes (issue 17): an `errand-desktop run` and `errand-phone`
//! homes on 127.0.0.1. A routine made on an offline phone runs after the first sync at its
//! interval; a desktop stopped for 7 s with `catch_up = once` runs one catch-up occurrence
//! and records the rest as missed; a SIGKILL during an occurrence and two phones that pause
//! and resume the same routine while apart never create an occurrence twice.
//!
//! Nothing here asserts how late an occurrence ran: that depends on the machine. What is
//! checked is which due times ran, which were recorded as missed, and that no due time ran
//! twice or ran early.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result, ensure};
use errand_core::TaskId;
use errand_tests::{Home, trust_pair, wait_for};
use serde_json::Value;

/// For waits that take a few seconds on a quiet machine.
const WAIT: Duration = Duration::from_secs(90);
/// The routine's interval.
const EVERY_MS: i64 = 2_000;

/// The occurrences of the routine whose instruction is `text` that `home` holds: due time →
/// (task id, status, created_at).
fn occurrences(home: &Home, text: &str) -> Result<BTreeMap<i64, (String, String, i64)>> {
    let t = home.json(&["thread", "--all", "--json"])?;
    let mut out = BTreeMap::new();
    for task in t["tasks"].as_array().into_iter().flatten() {
        if task["instruction"] != text {
            continue;
        }
        let id = task["id"].as_str().context("task id")?;
        let due = id.parse::<TaskId>()?.timestamp_ms();
        let created = task["created_at"]
            .as_str()
            .context("created_at")?
            .parse::<jiff::Timestamp>()?
            .as_millisecond();
        let status = task["status"].as_str().unwrap_or_default().to_owned();
        ensure!(
            out.insert(due, (id.to_owned(), status, created)).is_none(),
            "two tasks for the due time {due}"
        );
    }
    Ok(out)
}

fn routine(home: &Home, id: &str) -> Result<Value> {
    let list = home.json(&["routine", "list", "--all", "--json"])?;
    list.as_array()
        .into_iter()
        .flatten()
        .find(|r| r["id"] == id)
        .cloned()
        .with_context(|| format!("routine {id} not in {list:#}"))
}

/// Every due time from the first occurrence to the last one is accounted for exactly once:
/// it ran, or it is in the missed count.
fn check_accounted(
    occ: &BTreeMap<i64, (String, String, i64)>,
    anchor: i64,
    missed: u64,
) -> Result<()> {
    let (first, last) = (
        *occ.keys().next().context("no occurrence")?,
        *occ.keys().last().context("no occurrence")?,
    );
    for (due, (id, _, created)) in occ {
        ensure!(
            (due - anchor) % EVERY_MS == 0,
            "occurrence {id} is due at {due}, off the 2 s grid from {anchor}"
        );
        ensure!(
            *created >= *due,
            "occurrence {id} was created at {created}, before it was due ({due})"
        );
    }
    let due_times = ((last - first) / EVERY_MS + 1) as u64;
    ensure!(
        occ.len() as u64 + missed >= due_times,
        "{} ran and {missed} missed, but {due_times} were due from the first to the last",
        occ.len()
    );
    Ok(())
}

#[test]
fn routines_run_on_schedule_catch_up_once_and_never_twice() -> Result<()> {
    let root = tempfile::Builder::new()
        .prefix("errand-routines-")
        .tempdir()?;
    let desktop = Home::desktop(root.path(), "desktop");
    let phone = Home::phone(root.path(), "phone");
    let phone2 = Home::phone(root.path(), "phone2");
    let (d, addr) = desktop.start(&[])?;
    trust_pair(&desktop, &phone, Some(&addr))?;
    trust_pair(&desktop, &phone2, Some(&addr))?;
    for p in [&phone, &phone2] {
        p.run(&["sync"])?;
        wait_for("the phone to hold the thread", WAIT, || p.thread().ok())?;
    }
    d.stop()?;

    // 1. Made on a phone with no network at all: stored, and runs after the first sync.
    let text = "sleep 1.2; echo tick";
    let made = phone.json(&["routine", "add", text, "--every", "2s", "--json"])?;
    let id = made["id"].as_str().context("routine id")?.to_owned();
    ensure!(
        made["state"] == "active" && made["catch_up"] == "once",
        "{made:#}"
    );
    let anchor = made["created_at"]
        .as_str()
        .context("created_at")?
        .parse::<jiff::Timestamp>()?
        .as_millisecond();
    let (d, addr) = desktop.start_at(&addr_listen(&addr), &[])?;
    let (p, _) = phone.start(&[])?;
    let occ = wait_for("four occurrences after the first sync", WAIT, || {
        occurrences(&desktop, text).ok().filter(|o| o.len() >= 4)
    })?;
    check_accounted(
        &occ,
        anchor,
        routine(&desktop, &id)?["missed"].as_u64().unwrap_or(0),
    )?;

    // 2. The desktop stops (SIGTERM) for 7 s: with catch_up = once, exactly one catch-up
    //    runs and the others are recorded as missed.
    let before = routine(&desktop, &id)?["missed"].as_u64().unwrap_or(0);
    d.stop()?;
    let last_before = *occurrences(&desktop, text)?
        .keys()
        .last()
        .context("occurrences")?;
    std::thread::sleep(Duration::from_secs(7));
    let (d, _) = desktop.start_at(&addr_listen(&addr), &[])?;
    let after = wait_for("the missed occurrences to be recorded", WAIT, || {
        let r = routine(&desktop, &id).ok()?;
        let missed = r["missed"].as_u64()?;
        (missed > before).then_some(missed)
    })?;
    let occ = occurrences(&desktop, text)?;
    let catch_up = *occ
        .range(last_before + 1..)
        .next()
        .context("no occurrence after the restart")?
        .0;
    let skipped = ((catch_up - last_before) / EVERY_MS - 1) as u64;
    ensure!(
        skipped >= 2,
        "only {skipped} due times fell in a 7 s stop of a 2 s routine"
    );
    ensure!(
        after - before == skipped,
        "{skipped} due times between {last_before} and the catch-up {catch_up} should be missed, \
         {} were recorded",
        after - before
    );

    // 3. SIGKILL while an occurrence runs; the restart never creates it again and never
    //    runs it again.
    let running = wait_for("an occurrence to be running", WAIT, || {
        occurrences(&desktop, text)
            .ok()?
            .into_iter()
            .find(|(_, (_, s, _))| s == "running")
    })?;
    d.kill();
    let (d, _) = desktop.start_at(&addr_listen(&addr), &[])?;
    wait_for("two more occurrences after the SIGKILL", WAIT, || {
        let o = occurrences(&desktop, text).ok()?;
        (o.range(running.0 + 1..).count() >= 2).then_some(())
    })?;
    let occ = occurrences(&desktop, text)?;
    let killed = &occ[&running.0];
    ensure!(
        killed.0 == running.1.0 && killed.1 == "interrupted",
        "the occurrence killed mid-run is {killed:?}"
    );

    // 4. Two phones apart: one pauses, the other (which has not seen that) pauses and
    //    resumes. Both merge to the same state, and while paused nothing runs.
    p.stop()?;
    phone.run(&["routine", "pause", &id])?;
    phone2.run(&["routine", "pause", &id[..10]])?;
    phone2.run(&["routine", "resume", &id])?;
    for ph in [&phone, &phone2] {
        ensure!(ph.run(&["sync"])?.status.success(), "sync");
    }
    phone.run(&["sync"])?;
    let states: Vec<Value> = [&desktop, &phone, &phone2]
        .iter()
        .map(|h| routine(h, &id).map(|r| r["state"].clone()))
        .collect::<Result<_>>()?;
    ensure!(
        states.iter().all(|s| *s == states[0]),
        "replicas disagree after merging: {states:?}"
    );
    // Settle on paused from the first phone, now that it has seen everything.
    phone.run(&["routine", "pause", &id])?;
    phone.run(&["sync"])?;
    wait_for("the desktop to see the pause", WAIT, || {
        (routine(&desktop, &id).ok()?["state"] == "paused").then_some(())
    })?;
    let paused_at = occurrences(&desktop, text)?.len();
    std::thread::sleep(Duration::from_millis(4 * EVERY_MS as u64));
    // At most one that was already due when the pause merged.
    let now = occurrences(&desktop, text)?.len();
    ensure!(
        now <= paused_at + 1,
        "{} occurrences ran while paused",
        now - paused_at
    );
    let r = routine(&desktop, &id)?;
    ensure!(
        r["next_at"].is_null(),
        "a paused routine has no next run: {r:#}"
    );

    // Deleted: gone from the list, kept with --all, and nothing more runs.
    let gone = phone.json(&["routine", "rm", &id, "--json"])?;
    ensure!(gone["state"] == "deleted", "{gone:#}");
    let listed = phone.json(&["routine", "list", "--json"])?;
    ensure!(listed.as_array().is_some_and(Vec::is_empty), "{listed:#}");
    drop(d);
    Ok(())
}

/// A daemon's listen address without its `/p2p/…` suffix, to listen on it again.
fn addr_listen(addr: &str) -> String {
    match addr.find("/p2p/") {
        Some(i) => addr[..i].to_owned(),
        None => addr.to_owned(),
    }
}

#[test]
fn routine_commands_refuse_bad_input_in_words() -> Result<()> {
    let root = tempfile::Builder::new()
        .prefix("errand-routines-")
        .tempdir()?;
    let desktop = Home::desktop(root.path(), "desktop");
    desktop.run(&["status"])?;
    let cases: &[(&[&str], &str)] = &[
        (
            &["routine", "add", "x", "--every", "10ms"],
            "between 1s and 366 days",
        ),
        (
            &["routine", "add", "x", "--cron", "0 8 * *"],
            "not a cron expression",
        ),
        (
            &[
                "routine",
                "add",
                "x",
                "--cron",
                "0 8 * * *",
                "--tz",
                "Mars/Base",
            ],
            "not a time zone name",
        ),
        (
            &[
                "routine",
                "add",
                "x",
                "--every",
                "1h",
                "--catch-up",
                "sometimes",
            ],
            "skip, once or all",
        ),
        (
            &["routine", "add", "  ", "--every", "1h"],
            "instruction is empty",
        ),
        (&["routine", "add", "x"], "--every"),
        (
            &["routine", "pause", "01ARZ3NDEKTSV4RRFFQ69G5FAV"],
            "no routine",
        ),
        (&["routine", "rm", "01"], "too short"),
    ];
    for (args, want) in cases {
        let out = desktop.run(args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2),
            "{args:?} exited {:?}: {err}",
            out.status
        );
        ensure!(err.contains(want), "{args:?} said {err:?}, not {want:?}");
        ensure!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
    Ok(())
}
