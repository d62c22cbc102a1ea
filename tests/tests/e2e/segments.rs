//! Segmented threads across real processes: the push path carries a trickle of tasks between
//! peers in sync without a sync-protocol round, and a home written before segments is
//! migrated when it opens and syncs with a peer on the new format.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use automerge::{ObjType, ROOT, ReadDoc, transaction::Transactable};
use errand_crdt::{ActorId, Store, ThreadDoc, ThreadGenesis};
use errand_p2p::replica::{META_ACTOR, META_FORMAT, META_GENESIS};
use errand_tests::{DEADLINE, Daemon, Home, trust_pair, wait_for};
use serde_json::Value;

fn counts(home: &Home) -> Result<Value> {
    Ok(home.json(&["status", "--json"])?["sync"].clone())
}

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// Under `root`: a desktop home with its daemon running, and a phone home that trusts it at
/// the daemon's address (and is trusted), not started. Returns the homes, the daemon and its
/// address.
fn desktop_running_with_trusted_phone(root: &Path) -> Result<(Home, Home, Daemon, String)> {
    let desktop = Home::desktop(root, "d");
    let phone = Home::phone(root, "p");
    let (daemon, addr) = desktop.start(&[])?;
    trust_pair(&desktop, &phone, Some(&addr))?;
    Ok((desktop, phone, daemon, addr))
}

fn status_of(home: &Home, id: &str) -> Option<String> {
    let v = home.json(&["task", id, "--json"]).ok()?;
    v["status"].as_str().map(str::to_owned)
}

#[test]
fn a_trickle_of_tasks_between_peers_in_sync_goes_through_the_push_path() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (desktop, phone, dd, _) = desktop_running_with_trusted_phone(dir.path())?;
    let (pd, _) = phone.start(&[])?;
    // In sync, and quiet: the device record the desktop writes on the first hello has
    // arrived and the phone sees itself in the thread.
    wait_for("the first sync", DEADLINE, || {
        let s = phone.json(&["status", "--json"]).ok()?;
        (s["peers"][0]["in_sync"] == true).then_some(())
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let (p0, d0) = (counts(&phone)?, counts(&desktop)?);

    const TASKS: usize = 12;
    for i in 0..TASKS {
        let out = phone.run(&["send", &format!("echo trickle {i}")])?;
        ensure!(out.status.success(), "send {i}: {out:?}");
        let id = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .find(|w| w.len() == 26)
            .context("task id in send's output")?
            .to_owned();
        // The task runs on the desktop and every fact comes back before the next one.
        wait_for(&format!("task {i} done on the phone"), DEADLINE, || {
            (status_of(&phone, &id).as_deref() == Some("done")).then_some(())
        })?;
        // Let the last acknowledgement land.
        wait_for("both in sync", DEADLINE, || {
            let s = phone.json(&["status", "--json"]).ok()?;
            (s["peers"][0]["in_sync"] == true).then_some(())
        })?;
    }
    let (p1, d1) = (counts(&phone)?, counts(&desktop)?);
    let delta = |a: &Value, b: &Value, k: &str| count(b, k) - count(a, k);
    eprintln!("phone before {p0} after {p1}; desktop before {d0} after {d1}");
    if std::env::var_os("SHOW_LOGS").is_some() {
        eprintln!("DESKTOP:\n{}\nPHONE:\n{}", dd.stderr(), pd.stderr());
    }
    ensure!(
        delta(&p0, &p1, "sync_sent") == 0 && delta(&d0, &d1, "sync_sent") == 0,
        "no sync-protocol message during the trickle: phone {p0} -> {p1}, desktop {d0} -> {d1}"
    );
    ensure!(
        delta(&p0, &p1, "pushes_sent") >= TASKS as u64,
        "every task went through the push path: {p0} -> {p1}"
    );
    ensure!(
        delta(&d0, &d1, "pushes_applied") >= TASKS as u64,
        "the desktop applied them directly: {d0} -> {d1}"
    );
    // Each task's facts (delivered, started, output, finished) came back pushed too.
    ensure!(
        delta(&d0, &d1, "pushes_sent") >= TASKS as u64 * 3,
        "the desktop's facts went through the push path: {d0} -> {d1}"
    );
    ensure!(count(&p1, "pushes_refused") == 0 && count(&d1, "pushes_refused") == 0);
    Ok(())
}

/// Rewrites a (stopped) desktop home into the format before segments: its thread is one
/// document holding `n` finished tasks, and the home has no format marker. Returns each
/// task's id with the status it must keep.
fn write_old_format_home(home: &std::path::Path, n: usize) -> Result<Vec<(String, &'static str)>> {
    let store = Store::open(home)?;
    let genesis: ThreadGenesis = store
        .meta_json(META_GENESIS)?
        .context("the desktop home has a thread")?;
    let actor = ActorId::from(store.meta(META_ACTOR)?.context("actor")?.as_slice());
    let meta_id = genesis.doc_id();
    let loaded = store.load_doc(&meta_id)?;
    let mut doc = ThreadDoc::load(loaded.parts(), &genesis, actor)?;
    let am = doc.part_mut(0).context("meta document")?.automerge();
    let tasks = match am.get(ROOT, "tasks")? {
        Some((_, id)) => id,
        None => anyhow::bail!("no tasks map in genesis"),
    };
    let mut expected = Vec::with_capacity(n);
    let base = 1_700_000_000_000i64;
    for i in 0..n {
        let id = errand_core::TaskId::new_at(base + i as i64).to_string();
        let t = am.put_object(&tasks, id.as_str(), ObjType::Map)?;
        am.put(&t, "id", id.as_str())?;
        am.put(&t, "instruction", format!("old task {i}"))?;
        am.put(&t, "executor", "shell")?;
        am.put(&t, "target", genesis.owner.as_str())?;
        am.put(&t, "created_at", base + i as i64)?;
        let events = am.put_object(&t, "events", ObjType::List)?;
        let (facts, status): (Vec<(&str, Option<i64>)>, &str) = match i % 3 {
            0 => (
                vec![
                    ("delivered", None),
                    ("started", None),
                    ("finished", Some(0)),
                ],
                "done",
            ),
            1 => (
                vec![
                    ("delivered", None),
                    ("started", None),
                    ("finished", Some(2)),
                ],
                "failed",
            ),
            _ => (vec![("delivered", None), ("cancelled", None)], "cancelled"),
        };
        for (k, (kind, code)) in facts.into_iter().enumerate() {
            let ev = am.insert_object(&events, k, ObjType::Map)?;
            am.put(&ev, "at", base + i as i64 + 1)?;
            am.put(&ev, "kind", kind)?;
            am.put(&ev, "attempt", 1u64)?;
            if let Some(c) = code {
                am.put(&ev, "exit_code", c)?;
            }
            if kind == "cancelled" {
                am.put(&ev, "reason", "user")?;
            }
        }
        am.commit();
        expected.push((id, status));
    }
    let chunk = am.save_incremental();
    store.write(|t| {
        t.append_chunk(&meta_id, &chunk)?;
        t.delete_meta(META_FORMAT)
    })?;
    Ok(expected)
}

#[test]
fn a_home_in_the_single_document_format_is_migrated_and_syncs_with_a_new_peer() -> Result<()> {
    const TASKS: usize = 5_000;
    let dir = tempfile::tempdir()?;
    let desktop = Home::desktop(dir.path(), "d");
    let phone = Home::phone(dir.path(), "p");
    // Create both homes, pair them (manual trust), then turn the desktop's into an old one.
    desktop.peer_id()?;
    phone.peer_id()?;
    let expected = write_old_format_home(&desktop.dir, TASKS)?;

    let (d, addr) = desktop.start(&[])?;
    ensure!(
        d.stderr()
            .contains("migrated the home to the segmented format"),
        "the desktop says it migrated: {}",
        d.stderr()
    );
    let thread = desktop.json(&["thread", "--json"])?;
    let statuses: std::collections::HashMap<String, String> = thread["tasks"]
        .as_array()
        .context("tasks")?
        .iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap_or_default().to_owned(),
                t["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    ensure!(statuses.len() == TASKS, "every task: {}", statuses.len());
    for (id, status) in &expected {
        ensure!(
            statuses.get(id).map(String::as_str) == Some(*status),
            "task {id} kept its status {status}"
        );
    }

    // A phone on the new format syncs the whole thread, then sends a task, which goes to a
    // segment and runs.
    trust_pair(&desktop, &phone, Some(&addr))?;
    let out = phone.run(&["sync", "--timeout", "120s"])?;
    ensure!(out.status.success(), "phone sync: {out:?}");
    ensure!(phone.task_ids()?.len() == TASKS, "the phone has every task");
    let out = phone.run(&[
        "send",
        "--wait",
        "--timeout",
        "120s",
        "echo after migration",
    ])?;
    ensure!(
        out.status.success(),
        "a new task runs after the migration: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = desktop.json(&["status", "--json"])?;
    let parts: Vec<u64> = status["documents"]
        .as_array()
        .context("documents")?
        .iter()
        .filter_map(|d| d["part"].as_u64())
        .collect();
    ensure!(
        parts == [0, 1],
        "the old tasks stay in the meta document, the new one went to segment 1: {status}"
    );
    ensure!(desktop.task_ids()?.len() == TASKS + 1);
    // Reopening does not migrate again.
    d.stop()?;
    let (d, _) = desktop.start(&[])?;
    ensure!(!d.stderr().contains("migrated the home"));
    Ok(())
}

#[test]
fn a_phone_that_rolled_over_while_offline_catches_up() -> Result<()> {
    // Small segments, so a few hundred tasks span several.
    let dir = tempfile::tempdir()?;
    let (desktop, phone, d, addr) = desktop_running_with_trusted_phone(dir.path())?;
    let out = phone.run(&["sync", "--timeout", "60s"])?;
    ensure!(out.status.success(), "first sync: {out:?}");
    d.stop()?;
    // Offline: the phone queues enough tasks to roll over twice.
    let ids = errand_tests::fill_tasks_with_limit(&phone.dir, 120, 400, "offline")?;
    let (_d, _) = desktop.start_at(&addr, &[])?;
    let out = phone.run(&["sync", "--timeout", "120s"])?;
    ensure!(
        out.status.success(),
        "sync after the offline rollover: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let have = desktop.json(&["thread", "--all", "--json"])?;
    let n = have["tasks"].as_array().map_or(0, Vec::len);
    ensure!(n == ids.len(), "the desktop has {n} of {} tasks", ids.len());
    let docs = phone.json(&["status", "--json"])?["documents"]
        .as_array()
        .map_or(0, Vec::len);
    ensure!(docs >= 3, "the phone rolled over: {docs} documents");
    Ok(())
}
