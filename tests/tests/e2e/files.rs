//! Acceptance tests of issue 16: files both ways, content-addressed and verified.
//!
//! Real `errand-desktop` and `errand-phone` processes on 127.0.0.1 with mDNS off, each with
//! its own home in a temp dir, trusted by hand. The bytes are compared by BLAKE3 and SHA-256
//! on both sides.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use errand_tests::{Home, bin, trust_pair, wait_for};
use sha2::{Digest, Sha256};

/// For waits that take a second on a quiet machine.
const SHORT: Duration = Duration::from_secs(60);
/// For 20 MiB to cross in a debug build on a busy machine.
const LONG: Duration = Duration::from_secs(300);

fn test_root() -> Result<tempfile::TempDir> {
    let mut dir = tempfile::Builder::new().prefix("errand-files-").tempdir()?;
    if std::env::var_os("ERRAND_KEEP_TEST_DIRS").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    Ok(dir)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn random_file(path: &Path, len: usize) -> Result<Vec<u8>> {
    let bytes: Vec<u8> = (0..len).map(|_| rand::random()).collect();
    std::fs::write(path, &bytes)?;
    Ok(bytes)
}

#[test]
fn an_attachment_queued_offline_reaches_the_task_folder_byte_identical() -> Result<()> {
    const SIZE: usize = 20 * 1024 * 1024;
    let root = test_root()?;
    let desktop = Home::desktop(root.path(), "desktop");
    let phone = Home::phone(root.path(), "phone");
    let (_desktop_daemon, addr) = desktop.start(&[])?;
    trust_pair(&desktop, &phone, Some(&addr))?;
    // The phone learns the thread, and the record that binds its own writes to it (a task
    // of its own shows done), then goes offline.
    let (phone_daemon, _) = phone.start(&[])?;
    wait_for("the phone to get the desktop's thread", SHORT, || {
        phone.thread().ok()
    })?;
    let first = phone.json(&["send", "true", "--json"])?;
    let first = first["task_id"].as_str().context("task_id")?.to_owned();
    wait_for("a first task to run", SHORT, || {
        let t = phone.json(&["task", &first, "--json"]).ok()?;
        (t["status"] == "done").then_some(())
    })?;
    phone_daemon.stop()?;

    let input = root.path().join("data.bin");
    let original = random_file(&input, SIZE)?;
    let sent = phone.json(&[
        "send",
        "sha256sum \"$ERRAND_ATTACHMENTS\"/data.bin",
        "--attach",
        input.to_str().context("path")?,
        "--json",
    ])?;
    let id = sent["task_id"].as_str().context("task_id")?.to_owned();
    // The blob is the phone's own copy: the original may go away.
    std::fs::remove_file(&input)?;
    let queued = phone.json(&["task", &id, "--json"])?;
    let attachments = queued["attachments"].as_array().context("attachments")?;
    ensure!(attachments.len() == 1, "{queued}");
    ensure!(attachments[0]["name"] == "data.bin", "{queued}");
    ensure!(attachments[0]["size"] == SIZE as u64, "{queued}");
    ensure!(
        attachments[0]["hash"] == blake3::hash(&original).to_hex().as_str(),
        "{queued}"
    );

    let (_phone_daemon, _) = phone.start(&[])?;
    let done = wait_for(&format!("task {id} to end on the phone"), LONG, || {
        let t = phone.json(&["task", &id, "--json"]).ok()?;
        let s = t["status"].as_str()?.to_owned();
        ["done", "failed", "cancelled", "interrupted"]
            .contains(&s.as_str())
            .then_some(t)
    })?;
    ensure!(done["status"] == "done", "{done}");

    let placed = desktop
        .dir
        .join("workspace")
        .join(&id)
        .join("attachments")
        .join("data.bin");
    let copy = std::fs::read(&placed).with_context(|| format!("reading {}", placed.display()))?;
    ensure!(copy.len() == SIZE, "{} bytes", copy.len());
    ensure!(blake3::hash(&copy) == blake3::hash(&original));
    let sha = sha256_hex(&original);
    ensure!(sha256_hex(&copy) == sha);
    // The task saw the file: its output is sha256sum's line.
    let out = done["output_tail"].as_str().unwrap_or_default();
    ensure!(out.contains(&sha), "the task printed {out:?}");
    Ok(())
}

#[test]
fn files_a_task_writes_to_errand_out_become_artifacts_that_fetch_gets_byte_identical() -> Result<()>
{
    let root = test_root()?;
    let desktop = Home::desktop(root.path(), "desktop");
    let phone = Home::phone(root.path(), "phone");
    let (_desktop_daemon, addr) = desktop.start(&[])?;
    trust_pair(&desktop, &phone, Some(&addr))?;
    // Artifacts wait for `fetch` (the daemon would fetch files this small by itself).
    let (_phone_daemon, _) = phone.start(&["--auto-fetch-bytes", "0"])?;
    wait_for("the phone to get the desktop's thread", SHORT, || {
        phone.thread().ok()
    })?;

    let sent = phone.json(&[
        "send",
        "head -c 3000000 /dev/urandom > \"$ERRAND_OUT/one.bin\" && printf hello > \"$ERRAND_OUT/two.txt\"",
        "--json",
    ])?;
    let id = sent["task_id"].as_str().context("task_id")?.to_owned();
    let done = wait_for(
        &format!("task {id} to end with its artifacts"),
        LONG,
        || {
            let t = phone.json(&["task", &id, "--json"]).ok()?;
            let s = t["status"].as_str()?.to_owned();
            ["done", "failed", "cancelled", "interrupted"]
                .contains(&s.as_str())
                .then_some(t)
        },
    )?;
    ensure!(done["status"] == "done", "{done}");
    let artifacts = done["artifacts"].as_array().context("artifacts")?;
    let names: Vec<&str> = artifacts
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    ensure!(names == ["one.bin", "two.txt"], "{done}");
    // Not fetched yet: the phone does not hold them.
    ensure!(
        artifacts.iter().all(|a| a["local_path"].is_null()),
        "{done}"
    );

    let into = root.path().join("downloads");
    let fetched = phone.json(&["fetch", &id, into.to_str().context("path")?, "--json"])?;
    ensure!(
        fetched["files"].as_array().map(Vec::len) == Some(2),
        "{fetched}"
    );
    let written = desktop
        .dir
        .join("workspace")
        .join(&id)
        .join("out")
        .join("1");
    for (a, name) in artifacts.iter().zip(["one.bin", "two.txt"]) {
        let original = std::fs::read(written.join(name))?;
        let got = std::fs::read(into.join(name))?;
        ensure!(got.len() == original.len(), "{name}: {} bytes", got.len());
        ensure!(blake3::hash(&got) == blake3::hash(&original), "{name}");
        ensure!(sha256_hex(&got) == sha256_hex(&original), "{name}");
        ensure!(a["hash"] == blake3::hash(&got).to_hex().as_str(), "{name}");
    }
    // Now the phone holds them.
    let after = phone.json(&["task", &id, "--json"])?;
    ensure!(
        after["artifacts"]
            .as_array()
            .is_some_and(|v| v.iter().all(|a| a["local_path"].is_string())),
        "{after}"
    );
    Ok(())
}

/// Runs a task on `desktop` that writes `size` random bytes to `$ERRAND_OUT/name`, waits
/// for the phone's daemon to see it done, and returns the task id and the artifact's JSON.
fn task_with_artifact(
    phone: &Home,
    name: &str,
    size: usize,
) -> Result<(String, serde_json::Value)> {
    let sent = phone.json(&[
        "send",
        &format!("head -c {size} /dev/urandom > \"$ERRAND_OUT/{name}\""),
        "--json",
    ])?;
    let id = sent["task_id"].as_str().context("task_id")?.to_owned();
    let done = wait_for(&format!("task {id} to end with its artifact"), LONG, || {
        let t = phone.json(&["task", &id, "--json"]).ok()?;
        let s = t["status"].as_str()?.to_owned();
        ["done", "failed", "cancelled", "interrupted"]
            .contains(&s.as_str())
            .then_some(t)
    })?;
    ensure!(done["status"] == "done", "{done}");
    let artifact = done["artifacts"][0].clone();
    ensure!(artifact["size"] == size as u64, "{done}");
    Ok((id, artifact))
}

/// The last 8,000 bytes of a log, from a line start.
fn tail(log: &str) -> &str {
    let mut from = log.len().saturating_sub(8000);
    while !log.is_char_boundary(from) {
        from += 1;
    }
    log[from..].find('\n').map_or("", |i| &log[from + i + 1..])
}

/// Length of the phone's partial copy of a blob (its verified groups), if there is one.
fn partial_len(phone: &Home, hash: &str) -> Option<u64> {
    std::fs::metadata(phone.dir.join("blobs/partial").join(hash))
        .ok()
        .map(|m| m.len())
}

#[test]
fn a_fetch_cut_by_a_sigkill_of_the_desktop_resumes_from_the_verified_offset() -> Result<()> {
    const SIZE: usize = 40 * 1024 * 1024;
    let root = test_root()?;
    let desktop = Home::desktop(root.path(), "desktop");
    let phone = Home::phone(root.path(), "phone");
    let (desktop_daemon, addr) = desktop.start(&[])?;
    trust_pair(&desktop, &phone, Some(&addr))?;
    let (phone_daemon, _) = phone.start(&[])?;
    wait_for("the phone to get the desktop's thread", SHORT, || {
        phone.thread().ok()
    })?;
    let (id, artifact) = task_with_artifact(&phone, "big.bin", SIZE)?;
    let hash = artifact["hash"].as_str().context("hash")?.to_owned();
    // `fetch` runs the phone in its own process from here on.
    phone_daemon.stop()?;

    let into = root.path().join("downloads");
    let into = into.to_str().context("path")?;
    let home = phone.dir.to_str().context("path")?;
    // A short timeout: once the desktop is gone, this fetch gives up (exit 3) after 20 s
    // without a verified byte.
    let first_log = root.path().join("first-fetch.log");
    let mut first = Command::new(bin("errand-phone"))
        .args([
            "--home",
            home,
            "fetch",
            &id,
            into,
            "--json",
            "--timeout",
            "20s",
        ])
        .env("RUST_LOG", "debug,libp2p_stream=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // A file, not a pipe: nobody reads until the fetch ends, and a full pipe would stop
        // the fetch at its next log line.
        .stderr(std::fs::File::create(&first_log)?)
        .spawn()?;
    let log = || std::fs::read_to_string(&first_log).unwrap_or_default();
    // Poll closely: the desktop must die while the phone holds some but not all of it.
    let deadline = Instant::now() + LONG;
    let cut_at = loop {
        if let Some(len) = partial_len(&phone, &hash)
            && len > 0
        {
            break len;
        }
        ensure!(
            first.try_wait()?.is_none(),
            "the first fetch ended before it wrote anything: {:?}\n{}\nthe desktop's log:\n{}",
            first.wait_with_output()?,
            log(),
            tail(&desktop_daemon.stderr())
        );
        if Instant::now() > deadline {
            let _ = first.kill();
            bail!(
                "the fetch never started; its log:\n{}\nthe desktop's:\n{}",
                log(),
                tail(&desktop_daemon.stderr())
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    desktop_daemon.kill();
    ensure!(
        cut_at < SIZE as u64,
        "the whole file was in before the kill"
    );
    let out = first.wait_with_output()?;
    ensure!(
        out.status.code() == Some(3),
        "the first fetch should give up on the dead desktop with exit 3: {out:?}\n{}",
        log()
    );
    let held = partial_len(&phone, &hash).context("the partial copy is gone")?;
    ensure!(
        held > 0 && held < SIZE as u64,
        "the phone holds {held} bytes"
    );
    ensure!(!Path::new(into).join("big.bin").exists());

    let (_desktop_daemon, _) = desktop.start_at(&addr, &[])?;
    let second = phone.json(&["fetch", &id, into, "--json", "--timeout", "5m"])?;
    let t = &second["transfers"][0];
    let resumed = t["resumed_from"].as_u64().context("resumed_from")?;
    let received = t["received_bytes"].as_u64().context("received_bytes")?;
    println!("killed at {cut_at} bytes; resumed from {resumed}; received {received} of {SIZE}");
    ensure!(resumed > 0, "{second}");
    ensure!(
        received < SIZE as u64,
        "the second fetch took every byte again: {second}"
    );
    ensure!(received >= SIZE as u64 - resumed, "{second}");

    let original = std::fs::read(
        desktop
            .dir
            .join("workspace")
            .join(&id)
            .join("out/1/big.bin"),
    )?;
    let got = std::fs::read(Path::new(into).join("big.bin"))?;
    ensure!(got.len() == SIZE, "{} bytes", got.len());
    ensure!(blake3::hash(&got) == blake3::hash(&original));
    ensure!(blake3::hash(&got).to_hex().as_str() == hash);
    ensure!(sha256_hex(&got) == sha256_hex(&original));
    Ok(())
}
