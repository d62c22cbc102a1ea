//! `export` and `import` across real processes and real redb files: a running desktop's
//! thread of 300 tasks over several segments is exported document by document, each file
//! loads alone in the JavaScript Automerge and reads the same as `thread --all --json`, the
//! export moves the desktop into a new home where a newly paired phone sees the same thread
//! and the old phone syncs again, and damaged or misplaced input is refused in words that
//! name what is wrong.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Instant,
};

use anyhow::{Context, Result, ensure};
use errand_tests::{DEADLINE, Home, fill_tasks_with_limit, trust_pair, wait_for};
use serde_json::Value;

/// Changes per segment on the phone that writes the tasks: 300 tasks span several segments.
const SEGMENT_CHANGES: usize = 120;
/// Tasks that the first desktop runs (each gets delivered/started/output/finished facts).
const RUN: usize = 12;
/// Tasks left queued (the desktop syncs them with `--sync-only`).
const QUEUED: usize = 288;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must fail; returns its stderr.
fn refused(home: &Home, args: &[&str]) -> Result<String> {
    let out = home.run(args)?;
    ensure!(
        !out.status.success(),
        "{} {args:?} should have failed; stdout {}",
        home.bin,
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(stderr(&out))
}

/// The folder of the JavaScript reader, when node and its installed packages are there
/// (`.ci/run` runs `npm ci` in it).
fn js_reader() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("automerge-js");
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped the JavaScript check: node is not installed");
        return None;
    }
    if !dir.join("node_modules/@automerge/automerge").exists() {
        eprintln!(
            "skipped the JavaScript check: @automerge/automerge is not installed (npm ci in {})",
            dir.display()
        );
        return None;
    }
    Some(dir)
}

/// What the JavaScript Automerge read from the export in `export`.
fn read_with_js(reader: &Path, export: &Path) -> Result<Value> {
    let out = Command::new("node")
        .arg(reader.join("read-export.mjs"))
        .arg(export)
        .output()?;
    ensure!(
        out.status.success(),
        "node read-export.mjs: {}",
        stderr(&out)
    );
    serde_json::from_slice(&out.stdout).context("the reader prints JSON")
}

/// (id, instruction, author, [(kind, attempt, author)]) of each task, by id.
type Summary = BTreeMap<String, (String, String, Vec<(String, u64, String)>)>;

fn summary(tasks: &Value) -> Summary {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    tasks
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let events = t["events"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    (
                        s(&e["kind"]),
                        e["attempt"].as_u64().unwrap_or(0),
                        s(&e["author"]),
                    )
                })
                .collect();
            (s(&t["id"]), (s(&t["instruction"]), s(&t["author"]), events))
        })
        .collect()
}

/// Checks an export folder against its manifest with the JavaScript Automerge: every
/// document loads alone to the manifest's heads, and its tasks read as `thread`'s do.
fn check_in_js(export: &Path, thread: &Value) -> Result<()> {
    let Some(reader) = js_reader() else {
        return Ok(());
    };
    let js = read_with_js(&reader, export)?;
    for d in js["documents"].as_array().context("documents")? {
        ensure!(
            d["heads_match"] == true,
            "{} loads in JavaScript to the manifest's heads: {d}",
            d["file"]
        );
    }
    let (from_js, from_cli) = (summary(&js["tasks"]), summary(&thread["tasks"]));
    ensure!(
        from_js.len() == from_cli.len(),
        "JavaScript read {} tasks, the CLI {}",
        from_js.len(),
        from_cli.len()
    );
    for (id, want) in &from_cli {
        ensure!(
            from_js.get(id) == Some(want),
            "task {id} reads the same in JavaScript: {:?} vs {want:?}",
            from_js.get(id)
        );
    }
    Ok(())
}

fn task_ids(thread: &Value) -> Vec<String> {
    let mut ids: Vec<String> = thread["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

/// Copies an export folder (to damage the copy).
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

#[test]
fn a_running_desktops_export_reads_in_javascript_and_moves_the_desktop_to_a_new_home() -> Result<()>
{
    let started = Instant::now();
    let root = tempfile::tempdir()?;
    let r = root.path();
    let old = Home::desktop(r, "old-desktop");
    let phone = Home::phone(r, "phone");
    let export = r.join("export");
    let s = |p: &Path| p.to_str().unwrap_or_default().to_owned();

    // A thread of 300 tasks over several segments: the phone queues them offline (rolling
    // over every SEGMENT_CHANGES changes) and syncs. The desktop runs the first RUN; the
    // rest stay queued on a sync-only run.
    let (d, addr) = old.start(&[])?;
    trust_pair(&old, &phone, Some(&addr))?;
    let out = phone.run(&["sync", "--timeout", "60s"])?;
    ensure!(
        out.status.success(),
        "the phone adopts the thread: {}",
        stderr(&out)
    );
    let mut ids = fill_tasks_with_limit(&phone.dir, SEGMENT_CHANGES, RUN, "echo ran")?;
    let out = phone.run(&["sync", "--timeout", "60s"])?;
    ensure!(out.status.success(), "first sync: {}", stderr(&out));
    wait_for("the desktop to run the first tasks", DEADLINE, || {
        let t = old.json(&["thread", "--all", "--json"]).ok()?;
        let tasks = t["tasks"].as_array()?;
        (tasks.len() == RUN && tasks.iter().all(|t| t["status"] == "done")).then_some(())
    })?;
    d.stop()?;
    let (d, _) = old.start_at(&addr, &["--sync-only"])?;
    let out = phone.run(&["sync", "--timeout", "60s"])?;
    ensure!(
        out.status.success(),
        "sync of the ran tasks' facts: {}",
        stderr(&out)
    );
    ids.extend(fill_tasks_with_limit(
        &phone.dir,
        SEGMENT_CHANGES,
        QUEUED,
        "queued",
    )?);
    let out = phone.run(&["sync", "--timeout", "60s"])?;
    ensure!(out.status.success(), "second sync: {}", stderr(&out));
    eprintln!("thread of 300 tasks ready after {:?}", started.elapsed());

    // 1. Export from the running desktop (through its control socket).
    let manifest = old.json(&["export", &s(&export), "--json"])?;
    let thread = old.json(&["thread", "--all", "--json"])?;
    ids.sort();
    ensure!(task_ids(&thread) == ids, "the desktop has every task");
    let docs = manifest["documents"].as_array().context("documents")?;
    ensure!(
        docs.len() >= 3,
        "the meta document and at least two segments: {manifest}"
    );
    ensure!(manifest["tasks"] == 300 && manifest["thread_id"] == thread["thread_id"]);
    ensure!(manifest["errand_version"].is_string() && manifest["exported_at"].is_string());
    for doc in docs {
        let file = export.join(doc["file"].as_str().context("file")?);
        let bytes = std::fs::metadata(&file)?.len();
        ensure!(
            Some(bytes) == doc["bytes"].as_u64(),
            "{} size",
            file.display()
        );
        ensure!(doc["heads"].as_array().is_some_and(|h| !h.is_empty()));
        ensure!(doc["sha256"].as_str().is_some_and(|h| h.len() == 64));
    }
    let written: Value = serde_json::from_slice(&std::fs::read(export.join("thread.json"))?)?;
    ensure!(
        written == thread,
        "thread.json is what `thread --all --json` prints"
    );
    let on_disk: Value = serde_json::from_slice(&std::fs::read(export.join("manifest.json"))?)?;
    ensure!(on_disk == manifest, "--json prints the manifest");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(export.join("identity.key"))?
            .permissions()
            .mode();
        ensure!(mode & 0o777 == 0o600, "identity.key is 0600: {mode:o}");
    }
    ensure!(
        manifest["warning"]
            .as_str()
            .is_some_and(|w| w.contains("secret"))
    );
    check_in_js(&export, &thread)?;
    // An export goes only into a new or empty folder.
    let e = refused(&old, &["export", &s(&export)])?;
    ensure!(e.contains("not empty"), "{e}");
    // Without the identity, an export cannot be imported.
    let bare = r.join("export-bare");
    old.json(&["export", &s(&bare), "--no-identity", "--json"])?;
    ensure!(!bare.join("identity.key").exists());
    d.stop()?;
    eprintln!("exported after {:?}", started.elapsed());

    // 4. The phone's export, with no daemon holding its home.
    let phone_export = r.join("phone-export");
    let pm = phone.json(&["export", &s(&phone_export), "--json"])?;
    ensure!(pm["exported_by"]["kind"] == "phone" && pm["secrets"] == Value::Array(vec![]));
    ensure!(!phone_export.join("identity.key").exists());
    let phone_thread = phone.json(&["thread", "--all", "--json"])?;
    ensure!(task_ids(&phone_thread) == ids, "the phone has every task");
    check_in_js(&phone_export, &phone_thread)?;

    // 3. Refusals, each naming what is wrong.
    let fresh = |name: &str| Home::desktop(r, name);
    let e = refused(&fresh("no-identity"), &["import", &s(&bare)])?;
    ensure!(
        e.contains("identity.key") && e.contains("--no-identity"),
        "{e}"
    );
    let damaged = r.join("export-damaged");
    copy_dir(&export, &damaged)?;
    let victim = docs
        .iter()
        .filter_map(|d| d["file"].as_str())
        .find(|f| f.starts_with("segment-"))
        .context("a segment file")?;
    let bytes = std::fs::read(damaged.join(victim))?;
    std::fs::write(damaged.join(victim), &bytes[..bytes.len() * 2 / 3])?;
    let e = refused(&fresh("truncated"), &["import", &s(&damaged)])?;
    ensure!(e.contains(victim), "the error names {victim}: {e}");
    std::fs::remove_file(damaged.join(victim))?;
    let e = refused(&fresh("missing"), &["import", &s(&damaged)])?;
    ensure!(e.contains(victim) && e.contains("missing"), "{e}");
    std::fs::write(damaged.join("manifest.json"), b"{\"format\": 1, garbage")?;
    let e = refused(&fresh("garbage"), &["import", &s(&damaged)])?;
    ensure!(e.contains("manifest.json"), "{e}");
    let e = refused(&fresh("phone-export"), &["import", &s(&phone_export)])?;
    ensure!(
        e.contains("phone"),
        "a phone's export is not a desktop: {e}"
    );
    for name in [
        "no-identity",
        "truncated",
        "missing",
        "garbage",
        "phone-export",
    ] {
        ensure!(
            !r.join(name).join("errand.redb").exists(),
            "a refused import leaves no store in {name}"
        );
    }
    // Never over an existing home, not even the exporter's own.
    let e = refused(&old, &["import", &s(&export)])?;
    ensure!(e.contains("already has a store"), "{e}");

    // 2. The export moves the desktop into a new home.
    let new = Home::desktop(r, "new-desktop");
    let imported = new.json(&["import", &s(&export), "--json"])?;
    let phone_id = phone.peer_id()?;
    ensure!(imported["tasks"] == 300, "{imported}");
    ensure!(imported["unfinished"] == QUEUED, "{imported}");
    ensure!(
        imported["trusted"]
            .as_array()
            .is_some_and(|t| t.iter().any(|p| p == phone_id.as_str())),
        "the phone is trusted again: {imported}"
    );
    let e = refused(&new, &["import", &s(&export)])?;
    ensure!(e.contains("already has a store"), "{e}");
    ensure!(
        new.peer_id()? == manifest["genesis"]["owner"],
        "same identity"
    );
    let (_d2, addr2) = new.start(&["--sync-only"])?;
    let moved = new.json(&["thread", "--all", "--json"])?;
    ensure!(moved == thread, "the new home reads the same thread");

    // A newly paired phone sees the same thread; its pairing is recorded by the new
    // desktop as the thread's owner, which the phone accepts.
    let newcomer = Home::phone(r, "newcomer");
    let ticket = new.json(&["pair", "--json"])?["ticket"]
        .as_str()
        .context("ticket")?
        .to_owned();
    let paired = newcomer.json(&[
        "pair",
        &ticket,
        "--json",
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    ])?;
    ensure!(paired["synced"] == true, "{paired}");
    let seen = newcomer.json(&["thread", "--all", "--json"])?;
    ensure!(task_ids(&seen) == ids, "the new phone sees every task");
    ensure!(
        summary(&seen["tasks"]) == summary(&thread["tasks"]),
        "with the same authors and facts"
    );
    let devices = newcomer.json(&["devices", "--json"])?;
    ensure!(
        devices[0]["id"] == manifest["genesis"]["owner"],
        "{devices}"
    );

    // The old phone, trusted again from the thread's device records, syncs with the moved
    // desktop once told its new address, and its new task arrives there.
    let out = phone.run(&["devices", "add", &old_owner(&manifest)?, "--addr", &addr2])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    let sent = phone.json(&["send", "--json", "echo after the move"])?;
    let out = phone.run(&["sync", "--timeout", "60s"])?;
    ensure!(
        out.status.success(),
        "the old phone syncs: {}",
        stderr(&out)
    );
    let id = sent["task_id"].as_str().context("task_id")?;
    ensure!(
        task_ids(&new.json(&["thread", "--all", "--json"])?).contains(&id.to_owned()),
        "the old phone's new task reached the moved desktop"
    );
    // The newcomer's own task reads as its own: its device record, written by the moved
    // desktop, counts as the owner's.
    let newcomer_id = newcomer.peer_id()?;
    let sent = newcomer.json(&["send", "--json", "echo from the newcomer"])?;
    let out = newcomer.run(&["sync", "--timeout", "60s"])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    let id = sent["task_id"].as_str().context("task_id")?;
    for (who, home) in [("newcomer", &newcomer), ("moved desktop", &new)] {
        let t = home.json(&["task", id, "--json"])?;
        ensure!(
            t["author"] == newcomer_id.as_str(),
            "the {who} reads the newcomer's task as the newcomer's: {t}"
        );
    }
    eprintln!("done after {:?}", started.elapsed());
    Ok(())
}

fn old_owner(manifest: &Value) -> Result<String> {
    Ok(manifest["genesis"]["owner"]
        .as_str()
        .context("genesis.owner")?
        .to_owned())
}

#[test]
fn an_import_of_something_that_is_not_an_export_is_refused_in_words() -> Result<()> {
    let root = tempfile::tempdir()?;
    let r = root.path();
    let s = |p: &Path| p.to_str().unwrap_or_default().to_owned();
    let empty = r.join("empty");
    std::fs::create_dir_all(&empty)?;
    let home = Home::desktop(r, "home");
    let e = refused(&home, &["import", &s(&empty)])?;
    ensure!(
        e.contains("manifest.json") && e.contains("not an Errand export"),
        "{e}"
    );
    let e = refused(&home, &["import", &s(&r.join("nowhere"))])?;
    ensure!(e.contains("manifest.json"), "{e}");
    std::fs::write(empty.join("manifest.json"), b"\x00\xff not json")?;
    let e = refused(&home, &["import", &s(&empty)])?;
    ensure!(e.contains("not an Errand export manifest"), "{e}");
    ensure!(!home.dir.join("errand.redb").exists());
    Ok(())
}
