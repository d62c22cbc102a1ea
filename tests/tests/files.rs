//! Acceptance tests of issue 16: files both ways, content-addressed and verified.
//!
//! Real `errand-desktop` and `errand-phone` processes on 127.0.0.1 with mDNS off, each with
//! its own home in a temp dir, trusted by hand. The bytes are compared by BLAKE3 and SHA-256
//! on both sides.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use errand_tests::{Home, trust_pair, wait_for};
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
    // The phone learns the thread once, then goes offline.
    let (phone_daemon, _) = phone.start(&[])?;
    wait_for("the phone to get the desktop's thread", SHORT, || {
        phone.thread().ok()
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
