//! Acceptance 4 of issue 16: hostile peers on `/errand/blob/1`, between real processes.
//!
//! The honest side is always the real `errand-desktop` and `errand-phone` binaries; the
//! hostile side is an in-process libp2p peer ([`errand_tests::hostile::BlobPeer`]) that speaks
//! the blob protocol and nothing else, or a phone home written in-process
//! ([`errand_tests::hostile::Forger`]). Each attack is refused or fetched again with a clear
//! error, and an honest transfer running at the same time goes on.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use errand_core::BlobRef;
use errand_crdt::Store;
use errand_p2p::{
    blob::{BlobStore, MAX_BLOB_BYTES, wire::MAX_RANGE},
    peer::now_ms,
    replica::Replica,
};
use errand_tests::{
    Home, bin,
    hostile::{
        BlobPeer, Forger, Thread, ThreadOptions, blob_request, home_keypair, task, test_root,
    },
    trust_pair, wait_for,
};
use sha2::{Digest, Sha256};

/// For waits that take a second on a quiet machine.
const SHORT: Duration = Duration::from_secs(60);
/// For tens of MiB to cross in a debug build on a busy machine.
const LONG: Duration = Duration::from_secs(300);

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

fn ended(home: &Home, id: &str) -> Result<serde_json::Value> {
    wait_for(&format!("task {id} to end"), LONG, || {
        let t = home.json(&["task", id, "--json"]).ok()?;
        let s = t["status"].as_str()?.to_owned();
        ["done", "failed", "cancelled", "interrupted"]
            .contains(&s.as_str())
            .then_some(t)
    })
}

fn hash_bytes(hex: &str) -> Result<[u8; 32]> {
    let h: errand_core::BlobHash = hex.parse().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(*h.as_bytes())
}

#[test]
fn hostile_blob_requests_are_refused_while_an_honest_fetch_goes_on() -> Result<()> {
    const SIZE: usize = 64 * 1024 * 1024;
    let root = test_root()?;
    let desktop = Home::desktop(root.path(), "desk");
    let phone = Home::phone(root.path(), "phone");
    let (mut desktop_daemon, addr) = desktop.start(&[])?;
    trust_pair(&desktop, &phone, Some(&addr))?;
    let (phone_daemon, _) = phone.start(&[])?;
    wait_for("the phone to get the desktop's thread", SHORT, || {
        phone.thread().ok()
    })?;
    let sent = phone.json(&[
        "send",
        &format!("head -c {SIZE} /dev/urandom > \"$ERRAND_OUT/big.bin\""),
        "--json",
    ])?;
    let id = sent["task_id"].as_str().context("task_id")?.to_owned();
    let done = ended(&phone, &id)?;
    ensure!(done["status"] == "done", "{done}");
    let hex = done["artifacts"][0]["hash"]
        .as_str()
        .context("artifact hash")?
        .to_owned();
    let hash = hash_bytes(&hex)?;
    phone_daemon.stop()?;

    // A peer the desktop trusts (as it trusts any device added by hand) that misbehaves.
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let hostile_id = keypair.public().to_peer_id().to_base58();
    let out = desktop.run(&["devices", "add", &hostile_id])?;
    ensure!(out.status.success(), "devices add: {out:?}");
    let desktop_id = desktop.peer_id()?;
    let hostile = BlobPeer::connect(keypair, &desktop_id, &addr)?;

    // The honest fetch, in its own process.
    let into = root.path().join("downloads");
    let into = into.to_str().context("path")?;
    let home = phone.dir.to_str().context("path")?;
    let mut fetch = Command::new(bin("errand-phone"))
        .args([
            "--home",
            home,
            "fetch",
            &id,
            into,
            "--json",
            "--timeout",
            "5m",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + LONG;
    while std::fs::metadata(phone.dir.join("blobs/partial").join(&hex)).map_or(0, |m| m.len()) == 0
    {
        ensure!(fetch.try_wait()?.is_none(), "the honest fetch ended early");
        ensure!(Instant::now() < deadline, "the honest fetch never started");
        std::thread::sleep(Duration::from_millis(2));
    }

    let size = SIZE as u64;
    let unreferenced: [u8; 32] = rand::random();
    let answers = hostile.ask(&[
        blob_request(0, &unreferenced, 0, 1024),
        blob_request(1, &unreferenced, 0, 1024),
        blob_request(0, &hash, size, 1),
        blob_request(0, &hash, size - 10, 100),
        blob_request(0, &hash, u64::MAX - 5, 100),
        blob_request(0, &hash, 0, MAX_RANGE + 1),
        blob_request(0, &hash, 0, 16 * 1024),
    ])?;
    let honest_running = fetch.try_wait()?.is_none();
    let statuses: Vec<Option<(u8, usize)>> = answers
        .iter()
        .map(|a| a.as_ref().ok().map(|(s, _, n)| (*s, *n)))
        .collect();
    println!("answers {answers:?}; the honest fetch still running: {honest_running}");
    // NotFound (1) for a hash no task references, data or outboard; BadRange (2) past the
    // end, across it, at an overflowing offset and over the range cap; then a fair request
    // on the same stream is still served (0, 16 KiB).
    ensure!(
        statuses
            == [
                Some((1, 0)),
                Some((1, 0)),
                Some((2, 0)),
                Some((2, 0)),
                Some((2, 0)),
                Some((2, 0)),
                Some((0, 16 * 1024)),
            ],
        "{answers:?}"
    );
    // A frame of an unknown kind closes that stream, and only that one.
    let garbage = hostile.ask(&[blob_request(7, &hash, 0, 1)])?;
    ensure!(garbage[0].is_err(), "{garbage:?}");
    let again = hostile.ask(&[blob_request(0, &hash, 0, 1)])?;
    ensure!(again[0] == Ok((0, size, 1)), "{again:?}");
    hostile.close();

    let out = fetch.wait_with_output()?;
    ensure!(
        out.status.success(),
        "the honest fetch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(desktop_daemon.is_running(), "the desktop died");
    let original = std::fs::read(
        desktop
            .dir
            .join("workspace")
            .join(&id)
            .join("out/1/big.bin"),
    )?;
    let got = std::fs::read(Path::new(into).join("big.bin"))?;
    ensure!(got.len() == SIZE, "{} bytes", got.len());
    ensure!(blake3::hash(&got).to_hex().as_str() == hex);
    ensure!(sha256_hex(&got) == sha256_hex(&original));
    let log = desktop_daemon.stderr();
    for line in [
        "refused a blob no task references",
        "refused a range past the end",
    ] {
        ensure!(log.contains(line), "the desktop did not log {line:?}");
    }
    Ok(())
}

#[test]
fn an_author_serving_flipped_bits_is_refused_and_the_attachment_arrives_whole() -> Result<()> {
    const SIZE: usize = 24 * 1024 * 1024;
    let root = test_root()?;
    let desktop = Home::desktop(root.path(), "desk");
    let phone = Home::phone(root.path(), "phone");
    let (desktop_daemon, addr) = desktop.start(&[])?;
    trust_pair(&desktop, &phone, Some(&addr))?;
    // The phone learns the thread and gets its actor bound (a task of its own runs).
    let (phone_daemon, _) = phone.start(&[])?;
    wait_for("the phone to get the desktop's thread", SHORT, || {
        phone.thread().ok()
    })?;
    let first = phone.json(&["send", "true", "--json"])?;
    let first = first["task_id"].as_str().context("task_id")?.to_owned();
    ensure!(ended(&phone, &first)?["status"] == "done");
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
    // The task reaches the desktop; the phone leaves as soon as the thread is in sync, so
    // the desktop waits for the author to fetch the rest of the file.
    let out = phone.run(&[
        "sync",
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--timeout",
        "60s",
    ])?;
    ensure!(out.status.success(), "sync: {out:?}");
    wait_for("the desktop to have the task", SHORT, || {
        task(&desktop, &id)
    })?;

    // Now the author comes back as a peer that flips a bit in every other range it serves.
    let desktop_id = desktop.peer_id()?;
    let hostile = BlobPeer::connect(home_keypair(&phone.dir)?, &desktop_id, &addr)?;
    let served = hostile.serve_flipping(phone.dir.join("blobs"), 2)?;
    let done = ended(&desktop, &id)?;
    let flipped = served.flipped.load(std::sync::atomic::Ordering::Relaxed);
    let responses = served.responses.load(std::sync::atomic::Ordering::Relaxed);
    hostile.close();
    println!("{responses} ranges served, {flipped} with a flipped bit");
    ensure!(done["status"] == "done", "{done}");
    ensure!(flipped > 0, "the hostile author served nothing");
    let placed = desktop
        .dir
        .join("workspace")
        .join(&id)
        .join("attachments/data.bin");
    let copy = std::fs::read(&placed)?;
    ensure!(blake3::hash(&copy) == blake3::hash(&original));
    let sha = sha256_hex(&original);
    ensure!(sha256_hex(&copy) == sha);
    let printed = done["output_tail"].as_str().unwrap_or_default();
    ensure!(printed.contains(&sha), "the task printed {printed:?}");
    let log = desktop_daemon.stderr();
    ensure!(
        log.contains("refused a range that does not match"),
        "the desktop did not log the refused ranges"
    );
    Ok(())
}

#[test]
fn a_name_with_dot_dots_lands_as_its_last_part_and_a_blob_over_the_cap_is_refused() -> Result<()> {
    let t = Thread::start(ThreadOptions::default())?;
    t.honest_task_done("first")?;
    t.must_sync(&t.hostile)?;
    // The hostile phone stores a file, then writes two tasks by hand: one whose attachment
    // is named `../../x`, one whose attachment claims to be over the per-file cap.
    let input = t.root.path().join("input.txt");
    std::fs::write(&input, b"only a file name\n")?;
    let (hash, size) = {
        let replica = Replica::open(Store::open(&t.hostile.dir)?)?;
        BlobStore::new(&t.hostile.dir, replica).add_file(&input)?
    };
    let mut f = Forger::open(&t.hostile.dir)?;
    let own = f.own_actor();
    let mut named = f.task_for_desktop("cat \"$ERRAND_ATTACHMENTS\"/x; ls \"$ERRAND_ATTACHMENTS\"");
    named.attachments = vec![BlobRef {
        hash,
        name: "placeholder".into(),
        size,
        mime: "text/plain".into(),
    }];
    let named = f.write(&own, |d| d.enqueue_task(&named, now_ms()))?;
    // The typed write refuses such a name, so it goes in as a raw op over the placeholder.
    f.raw(&own, |am, tasks| {
        use automerge::{ReadDoc, transaction::Transactable};
        let (_, task) = am.get(tasks, named.to_string())?.context("the task")?;
        let (_, list) = am.get(&task, "attachments")?.context("attachments")?;
        let (_, first) = am.get(&list, 0)?.context("attachment 0")?;
        am.put(&first, "name", "../../x")?;
        Ok(())
    })?;
    let mut huge = f.task_for_desktop("echo should not run");
    huge.attachments = vec![BlobRef {
        hash: errand_core::BlobHash::from_bytes(rand::random()),
        name: "huge.bin".into(),
        size: MAX_BLOB_BYTES + 1,
        mime: "application/octet-stream".into(),
    }];
    let huge = f.write(&own, |d| d.enqueue_task(&huge, now_ms()))?;
    f.save()?;
    let (named, huge) = (named.to_string(), huge.to_string());

    // The hostile phone's daemon carries both tasks over and serves its file.
    let (_phone, _) = t.hostile.start(&[])?;
    let done = ended(&t.desktop, &named)?;
    ensure!(done["status"] == "done", "{done}");
    let attachments = &done["attachments"];
    ensure!(attachments[0]["name"] == "x", "{done}");
    let out = done["output_tail"].as_str().unwrap_or_default();
    ensure!(out.contains("only a file name"), "the task printed {out:?}");
    let folder = t.desktop.dir.join("workspace").join(&named);
    ensure!(folder.join("attachments/x").is_file());
    for outside in [
        t.desktop.dir.join("workspace/x"),
        t.desktop.dir.join("x"),
        t.root.path().join("x"),
        folder.join("x"),
    ] {
        ensure!(!outside.exists(), "{} was written", outside.display());
    }

    let refused = ended(&t.desktop, &huge)?;
    ensure!(refused["status"] == "failed", "{refused}");
    let text = refused.to_string();
    ensure!(
        text.contains("over the limit"),
        "no clear reason: {refused}"
    );
    ensure!(t.runs("first") == 1);
    // The honest phone's work goes on meanwhile.
    t.honest_task_done("after")?;
    Ok(())
}
