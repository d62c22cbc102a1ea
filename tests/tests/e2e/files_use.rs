//! Files in everyday use (issue 16), between real processes: `delivered` waits for the
//! attachments and the status says so, the `{attachments}` placeholder, ACP agents with
//! attachments and results, the caps as settings, the phone fetching small artifacts by
//! itself, and garbage collection after a revocation and `forget`.
//!
//! Real `errand-desktop` and `errand-phone` processes on 127.0.0.1 with mDNS off, each with
//! its own home in a temp dir, trusted by hand.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use errand_tests::{Daemon, Home, bin, files_under, trust_pair, wait_for};
use serde_json::Value;

/// For waits that take a second on a quiet machine.
const SHORT: Duration = Duration::from_secs(60);
/// For a few MiB to cross in a debug build on a busy machine.
const LONG: Duration = Duration::from_secs(300);

fn test_root() -> Result<tempfile::TempDir> {
    let mut dir = tempfile::Builder::new()
        .prefix("errand-files-use-")
        .tempdir()?;
    if std::env::var_os("ERRAND_KEEP_TEST_DIRS").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    Ok(dir)
}

fn random_file(path: &Path, len: usize) -> Result<Vec<u8>> {
    let bytes: Vec<u8> = (0..len).map(|_| rand::random()).collect();
    std::fs::write(path, &bytes)?;
    Ok(bytes)
}

/// A desktop (with `config`, if given) and a phone, trusted both ways, both running, and the
/// phone's own first task done (so the desktop has bound the phone's writes to it).
struct Pair {
    root: tempfile::TempDir,
    desktop: Home,
    phone: Home,
    _desktop_daemon: Option<Daemon>,
    phone_daemon: Option<Daemon>,
}

impl Pair {
    fn start(config: Option<&str>, phone_flags: &[&str]) -> Result<Self> {
        let root = test_root()?;
        let desktop = Home::desktop(root.path(), "desktop");
        if let Some(config) = config {
            std::fs::create_dir_all(&desktop.dir)?;
            std::fs::write(desktop.dir.join("config.toml"), config)?;
        }
        let phone = Home::phone(root.path(), "phone");
        let (d, addr) = desktop.start(&[])?;
        trust_pair(&desktop, &phone, Some(&addr))?;
        let (p, _) = phone.start(phone_flags)?;
        wait_for("the phone to get the desktop's thread", SHORT, || {
            phone.thread().ok()
        })?;
        let pair = Self {
            root,
            desktop,
            phone,
            _desktop_daemon: Some(d),
            phone_daemon: Some(p),
        };
        let first = pair.send(&["true", "--executor", "shell"])?;
        pair.wait_end(&first)?;
        Ok(pair)
    }

    /// `send ARGS --json` on the phone; the task id.
    fn send(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["send"];
        all.extend_from_slice(args);
        all.push("--json");
        let v = self.phone.json(&all)?;
        Ok(v["task_id"].as_str().context("task_id")?.to_owned())
    }

    fn task(&self, home: &Home, id: &str) -> Result<Value> {
        home.json(&["task", id, "--json"])
    }

    /// Waits until the phone shows the task ended; returns it.
    fn wait_end(&self, id: &str) -> Result<Value> {
        let mut last = Value::Null;
        wait_for(&format!("task {id} to end on the phone"), LONG, || {
            let t = self.task(&self.phone, id).ok()?;
            last = t.clone();
            let s = t["status"].as_str()?.to_owned();
            ["done", "failed", "cancelled", "denied", "interrupted"]
                .contains(&s.as_str())
                .then_some(t)
        })
        .with_context(|| format!("last seen: {last:#}"))
    }

    fn stop_phone(&mut self) -> Result<()> {
        if let Some(p) = self.phone_daemon.take() {
            p.stop()?;
        }
        Ok(())
    }

    fn start_phone(&mut self, flags: &[&str]) -> Result<()> {
        let (p, _) = self.phone.start(flags)?;
        self.phone_daemon = Some(p);
        Ok(())
    }

    fn attachments_dir(&self, id: &str) -> PathBuf {
        self.desktop
            .dir
            .join("workspace")
            .join(id)
            .join("attachments")
    }
}

/// The kinds of the desktop's facts in attempt 1, in list order.
fn desktop_facts(t: &Value, desktop_id: &str) -> Vec<String> {
    t["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["author"] == desktop_id && e["attempt"] == 1)
        .filter_map(|e| e["kind"].as_str().map(str::to_owned))
        .collect()
}

/// The blob files (not folders) of a home.
fn blob_files(home: &Home) -> Result<BTreeSet<String>> {
    let dir = home.dir.join("blobs");
    if !dir.exists() {
        return Ok(BTreeSet::new());
    }
    Ok(files_under(&dir)?
        .into_iter()
        .filter(|f| !f.starts_with("tmp/") && dir.join(f).is_file())
        .collect())
}

#[test]
fn a_task_with_attachments_is_fetching_before_it_is_delivered_once_each() -> Result<()> {
    let mut p = Pair::start(None, &[])?;
    let desktop_id = p.desktop.peer_id()?;
    p.stop_phone()?;
    let input = p.root.path().join("data.bin");
    random_file(&input, 3 * 1024 * 1024)?;
    let id = p.send(&[
        "wc -c < \"$ERRAND_ATTACHMENTS/data.bin\"",
        "--attach",
        input.to_str().context("path")?,
    ])?;
    p.start_phone(&[])?;
    let done = p.wait_end(&id)?;
    ensure!(done["status"] == "done", "{done:#}");
    ensure!(
        done["output_tail"]
            .as_str()
            .is_some_and(|o| o.contains("3145728")),
        "{done:#}"
    );
    // Written ahead: `fetching` (the desktop did not hold the file), then `delivered` once it
    // was verified and placed, then the run; each once.
    let facts = desktop_facts(&done, &desktop_id);
    ensure!(
        facts.len() >= 3 && facts[..3] == ["fetching", "delivered", "started"],
        "the desktop wrote {facts:?}"
    );
    for kind in ["fetching", "delivered", "started"] {
        ensure!(
            facts.iter().filter(|f| *f == kind).count() == 1,
            "{kind} in {facts:?}"
        );
    }
    // A task without attachments goes straight to `delivered`.
    let plain = p.send(&["true"])?;
    let plain = p.wait_end(&plain)?;
    let facts = desktop_facts(&plain, &desktop_id);
    ensure!(facts.first().is_some_and(|f| f == "delivered"), "{facts:?}");
    ensure!(!facts.iter().any(|f| f == "fetching"), "{facts:?}");
    Ok(())
}

#[test]
fn an_attachment_the_phone_cannot_serve_fails_the_task_before_it_is_delivered() -> Result<()> {
    let mut p = Pair::start(None, &[])?;
    let desktop_id = p.desktop.peer_id()?;
    p.stop_phone()?;
    let input = p.root.path().join("lost.txt");
    std::fs::write(&input, "gone before it was fetched")?;
    let id = p.send(&[
        "cat \"$ERRAND_ATTACHMENTS/lost.txt\"",
        "--attach",
        input.to_str().context("path")?,
    ])?;
    // The phone loses its copy (its index still names it): it answers `not found`.
    let hash = blake3::hash(b"gone before it was fetched")
        .to_hex()
        .to_string();
    std::fs::remove_file(p.phone.dir.join("blobs").join(&hash))?;
    p.start_phone(&[])?;
    let ended = p.wait_end(&id)?;
    ensure!(ended["status"] == "failed", "{ended:#}");
    let reason = ended["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("could not fetch attachment lost.txt") && reason.contains(&hash),
        "{ended:#}"
    );
    let facts = desktop_facts(&ended, &desktop_id);
    ensure!(facts == ["fetching", "failed"], "{facts:?}");
    Ok(())
}

#[test]
fn the_attachments_placeholder_gives_one_argument_per_file_in_order() -> Result<()> {
    let config = r#"
[[executors]]
name = "files"
kind = "command"
argv = ["sh", "-c", "for f; do printf '%s %s\n' \"$(wc -c < \"$f\")\" \"$f\"; done; echo \"n=$#\"", "{instruction}", "{attachments}"]

[[executors]]
name = "shell"
kind = "shell"
"#;
    let p = Pair::start(Some(config), &[])?;
    let a = p.root.path().join("b first.txt");
    let b = p.root.path().join("a second.txt");
    std::fs::write(&a, "12345")?;
    std::fs::write(&b, "1234567")?;
    let id = p.send(&[
        "list",
        "--executor",
        "files",
        "--attach",
        a.to_str().context("path")?,
        "--attach",
        b.to_str().context("path")?,
    ])?;
    let done = p.wait_end(&id)?;
    ensure!(done["status"] == "done", "{done:#}");
    let dir = p.attachments_dir(&id);
    let want = format!(
        "5 {}\n7 {}\nn=2\n",
        dir.join("b first.txt").display(),
        dir.join("a second.txt").display()
    );
    ensure!(done["output_tail"] == want.as_str(), "{done:#}");
    // Without attachments, no argument at all.
    let none = p.send(&["list", "--executor", "files"])?;
    let none = p.wait_end(&none)?;
    ensure!(none["output_tail"] == "n=0\n", "{none:#}");
    Ok(())
}

#[test]
fn an_agent_gets_its_attachments_as_resource_links_and_its_results_become_artifacts() -> Result<()>
{
    let root_log = tempfile::Builder::new()
        .prefix("errand-agent-log-")
        .tempdir()?;
    let log = root_log.path().join("agent.log");
    let argv = [
        bin("errand-desktop").display().to_string(),
        "demo-agent".to_owned(),
        "--log".to_owned(),
        log.display().to_string(),
    ];
    let argv: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
    let config = format!(
        "[[executors]]\nname = \"agent\"\nkind = \"acp\"\nargv = [{}]\n\n\
         [[executors]]\nname = \"shell\"\nkind = \"shell\"\n",
        argv.join(", ")
    );
    let p = Pair::start(Some(&config), &[])?;
    let notes = p.root.path().join("notes #1.md");
    std::fs::write(&notes, "# Notes\n")?;
    let id = p.send(&[
        "summarise [out summary.md]",
        "--executor",
        "agent",
        "--attach",
        notes.to_str().context("path")?,
    ])?;
    let done = p.wait_end(&id)?;
    ensure!(done["status"] == "done", "{done:#}");
    let prompts: Vec<Value> = std::fs::read_to_string(&log)?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "prompt")
        .collect();
    ensure!(prompts.len() == 1, "{prompts:#?}");
    let prompt = &prompts[0];
    let placed = p.attachments_dir(&id).join("notes #1.md");
    ensure!(std::fs::read(&placed)? == b"# Notes\n");
    let link = &prompt["links"][0];
    ensure!(
        prompt["links"].as_array().map(Vec::len) == Some(1),
        "{prompt:#}"
    );
    ensure!(link["name"] == "notes #1.md", "{prompt:#}");
    ensure!(
        link["uri"]
            == format!("file://{}", placed.display())
                .replace(' ', "%20")
                .replace('#', "%23"),
        "{prompt:#}"
    );
    ensure!(link["mime"] == "text/markdown", "{prompt:#}");
    ensure!(link["size"] == 8, "{prompt:#}");
    ensure!(
        prompt["errand_attachments"] == p.attachments_dir(&id).display().to_string(),
        "{prompt:#}"
    );
    ensure!(prompt["errand_out"].is_string(), "{prompt:#}");
    // What the agent left in $ERRAND_OUT is an artifact of the turn.
    let names: Vec<&str> = done["artifacts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["name"].as_str())
        .collect();
    ensure!(names == ["summary.md"], "{done:#}");
    ensure!(
        done["artifacts"][0]["hash"]
            == blake3::hash(b"written by the demo agent\n")
                .to_hex()
                .as_str(),
        "{done:#}"
    );
    Ok(())
}

#[test]
fn blob_caps_are_settings_that_refuse_files_over_them_with_a_clear_error() -> Result<()> {
    let mut p = Pair::start(Some("max_blob_bytes = \"1MiB\"\n"), &[])?;
    let big = p.root.path().join("big.bin");
    random_file(&big, 2 * 1024 * 1024)?;
    // The phone stores it (its own cap is the default); the desktop refuses to fetch it.
    let id = p.send(&["true", "--attach", big.to_str().context("path")?])?;
    let ended = p.wait_end(&id)?;
    ensure!(ended["status"] == "failed", "{ended:#}");
    let reason = ended["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("big.bin") && reason.contains("over the limit of 1048576"),
        "{ended:#}"
    );
    // The phone's own cap, as a flag (or ERRAND_MAX_BLOB_BYTES), on a command that opens the
    // home itself.
    p.stop_phone()?;
    let out = p.phone.run(&[
        "--max-blob-bytes",
        "64KiB",
        "send",
        "true",
        "--attach",
        big.to_str().context("path")?,
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "{err}");
    ensure!(err.contains("over the limit of 65536"), "{err}");
    // Bad values are refused before anything runs.
    let out = p.phone.run(&[
        "--max-blob-bytes",
        "2GiB",
        "--max-blob-storage-bytes",
        "1GiB",
        "status",
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(2), "{err}");
    ensure!(err.contains("could never be stored"), "{err}");
    let out = p.phone.run(&["--auto-fetch-bytes", "lots", "status"])?;
    ensure!(out.status.code() == Some(2));
    ensure!(String::from_utf8_lossy(&out.stderr).contains("not a size"));
    let bad = p.root.path().join("bad");
    std::fs::create_dir_all(&bad)?;
    std::fs::write(bad.join("config.toml"), "max_blob_storage_bytes = 0\n")?;
    let out = errand_tests::cli(
        "errand-desktop",
        &["--home", bad.to_str().context("path")?, "config"],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "{err}");
    ensure!(err.contains("max_blob_storage_bytes"), "{err}");
    Ok(())
}

#[test]
fn the_phone_fetches_small_artifacts_by_itself_and_large_ones_on_demand() -> Result<()> {
    let p = Pair::start(None, &["--auto-fetch-bytes", "1MiB"])?;
    // Sorted by name, the large one comes first: had the daemon fetched it, it would hold it
    // by the time it holds the small one.
    let id = p.send(&[
        "head -c 2000000 /dev/urandom > \"$ERRAND_OUT/a-large.bin\" && \
         printf small > \"$ERRAND_OUT/b-small.txt\"",
    ])?;
    let done = p.wait_end(&id)?;
    ensure!(done["status"] == "done", "{done:#}");
    let t = wait_for(
        "the small artifact to reach the phone by itself",
        LONG,
        || {
            let t = p.task(&p.phone, &id).ok()?;
            t["artifacts"][1]["local_path"].is_string().then_some(t)
        },
    )?;
    ensure!(t["artifacts"][1]["name"] == "b-small.txt", "{t:#}");
    let small = t["artifacts"][1]["local_path"].as_str().context("path")?;
    ensure!(std::fs::read(small)? == b"small");
    ensure!(t["artifacts"][0]["name"] == "a-large.bin", "{t:#}");
    ensure!(t["artifacts"][0]["local_path"].is_null(), "{t:#}");
    // On demand.
    let into = p.root.path().join("downloads");
    p.phone
        .json(&["fetch", &id, into.to_str().context("path")?, "--json"])?;
    let t = p.task(&p.phone, &id)?;
    ensure!(t["artifacts"][0]["local_path"].is_string(), "{t:#}");
    Ok(())
}

#[test]
fn revocation_and_forget_remove_the_pairings_files_unless_a_kept_task_needs_them() -> Result<()> {
    let p = Pair::start(None, &[])?;
    // A second phone sends a file with the same bytes as one of the first phone's.
    let other = Home::phone(p.root.path(), "other");
    let addr = p.desktop.json(&["status", "--json"])?["listen_addrs"][0]
        .as_str()
        .context("addr")?
        .to_owned();
    trust_pair(&p.desktop, &other, Some(&addr))?;
    let (_other_daemon, _) = other.start(&[])?;
    wait_for("the other phone to get the thread", SHORT, || {
        other.thread().ok()
    })?;

    let shared = p.root.path().join("shared.txt");
    std::fs::write(&shared, "both phones sent this")?;
    let own = p.root.path().join("own.bin");
    random_file(&own, 100_000)?;
    let id = p.send(&[
        "printf result > \"$ERRAND_OUT/result.txt\"",
        "--attach",
        shared.to_str().context("path")?,
        "--attach",
        own.to_str().context("path")?,
    ])?;
    let done = p.wait_end(&id)?;
    ensure!(done["status"] == "done", "{done:#}");
    let v = other.json(&[
        "send",
        "true",
        "--attach",
        shared.to_str().context("path")?,
        "--json",
    ])?;
    let other_task = v["task_id"].as_str().context("task_id")?.to_owned();
    wait_for("the other phone's task to end", LONG, || {
        let t = other.json(&["task", &other_task, "--json"]).ok()?;
        (t["status"] == "done").then_some(())
    })?;
    // The phone fetched the small result by itself (default 10 MiB).
    wait_for("the phone to hold the result", LONG, || {
        let t = p.task(&p.phone, &id).ok()?;
        t["artifacts"][0]["local_path"].is_string().then_some(())
    })?;

    let hash = |bytes: &[u8]| blake3::hash(bytes).to_hex().to_string();
    let shared_hash = hash(b"both phones sent this");
    let own_hash = hash(&std::fs::read(&own)?);
    let result_hash = hash(b"result");
    let desktop_files = blob_files(&p.desktop)?;
    for h in [&shared_hash, &own_hash, &result_hash] {
        ensure!(
            desktop_files.contains(h.as_str()),
            "{h} in {desktop_files:?}"
        );
    }

    let phone_id = p.phone.peer_id()?;
    let revoked = p
        .desktop
        .json(&["devices", "revoke", &phone_id, "--json"])?;
    ensure!(revoked["removed_files"] == 2, "{revoked:#}");
    let left = blob_files(&p.desktop)?;
    ensure!(left.contains(shared_hash.as_str()), "{left:?}");
    for h in [&own_hash, &result_hash] {
        ensure!(
            !left.iter().any(|f| f.starts_with(h.as_str())),
            "{h} in {left:?}"
        );
    }
    // The other phone's task still has its file.
    let t = other.json(&["task", &other_task, "--json"])?;
    ensure!(t["status"] == "done", "{t:#}");

    let phone_files = blob_files(&p.phone)?;
    for h in [&shared_hash, &own_hash, &result_hash] {
        ensure!(phone_files.contains(h.as_str()), "{h} in {phone_files:?}");
    }
    let forgot = p.phone.json(&["forget", "--json"])?;
    ensure!(forgot["removed_files"] == 3, "{forgot:#}");
    let left = blob_files(&p.phone)?;
    ensure!(left.is_empty(), "{left:?}");
    let t = p.task(&p.phone, &id)?;
    ensure!(
        t["attachments"]
            .as_array()
            .is_some_and(|a| a.iter().all(|f| f["local_path"].is_null())),
        "{t:#}"
    );
    Ok(())
}

#[test]
fn a_daemon_removes_partial_and_stray_blob_files_at_start() -> Result<()> {
    let root = test_root()?;
    let desktop = Home::desktop(root.path(), "desktop");
    let (d, _) = desktop.start(&[])?;
    d.stop()?;
    let partial = desktop.dir.join("blobs").join("partial");
    std::fs::create_dir_all(&partial)?;
    let stray = blake3::hash(b"nobody asked for this").to_hex().to_string();
    std::fs::write(partial.join(&stray), b"nobody")?;
    std::fs::write(desktop.dir.join("blobs").join(&stray), b"nobody")?;
    let (_d, _) = desktop.start(&[])?;
    let left = blob_files(&desktop)?;
    ensure!(left.is_empty(), "{left:?}");
    Ok(())
}
