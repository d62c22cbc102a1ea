//! Acceptance tests of QR pairing (issue 4, DESIGN.md section 7) with real `errand-desktop` and
//! `errand-phone` processes on 127.0.0.1, mDNS off everywhere.
//!
//! - Every ticket comes from `errand-desktop pair --json` against a running desktop daemon.
//! - Forged tickets (a flipped secret bit, a later expiry, a random id) are made by editing the
//!   binary form that `errand_core::Ticket` documents, so the phone sends them as it would a
//!   real one and only the desktop can tell.
//! - When a refusal must come from the ticket rules rather than the connection gate, another
//!   live ticket keeps the desktop's pairing window open, and the refused phone exits 1 (refused)
//!   rather than 3 (unreachable).
//!
//! The ticket parser's fuzz-style tests (acceptance 5) live next to the parser:
//! `cargo test -p errand-core ticket`.

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::Range,
    path::Path,
    process::Output,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use data_encoding::BASE32_NOPAD;
use errand_core::{Ticket, ticket::TICKET_PREFIX};
use errand_tests::{DEADLINE, Daemon, Home, wait_for};
use serde_json::Value;

/// Byte range of the expiry (Unix seconds, u64 big-endian) in a ticket's binary form:
/// version (1) | id (8) | expires (8) | secret (32) | ….
const EXPIRES: Range<usize> = 9..17;
/// Byte range of the ticket id in the binary form.
const ID: Range<usize> = 1..9;
/// Byte range of the one-time secret in the binary form.
const SECRET: Range<usize> = 17..49;
/// Exit code of a refused pairing (DESIGN.md section 9: 1 is "error"; 3 would mean the desktop
/// was not reachable, which is not what these tests are about).
const REFUSED: i32 = 1;
/// How long `errand-phone sync` tries before it gives up with exit 3. Only used where the sync
/// must fail, so it bounds the test's runtime rather than its correctness.
const FAILING_SYNC_TIMEOUT: &str = "5s";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A temp dir for one test's homes and daemon logs. Short, because the control socket's path
/// must fit in 108 bytes. Set `ERRAND_KEEP_TEST_DIRS` to keep it for reading the logs.
fn tempdir() -> Result<tempfile::TempDir> {
    let mut dir = tempfile::Builder::new().prefix("ep").tempdir_in("/tmp")?;
    if std::env::var_os("ERRAND_KEEP_TEST_DIRS").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    Ok(dir)
}

/// Issues a ticket on a running desktop: `(text, parsed)`.
fn issue(desktop: &Home, ttl: &str) -> Result<(String, Ticket)> {
    let v = desktop.json(&["pair", "--json", "--ttl", ttl])?;
    let text = v["ticket"].as_str().context("pair --json has a ticket")?;
    ensure!(
        v["expires_at"].is_string(),
        "pair --json has expires_at: {v}"
    );
    let ticket: Ticket = text.parse().context("the ticket parses")?;
    Ok((text.to_owned(), ticket))
}

/// Runs `errand-phone pair` on loopback.
fn pair(phone: &Home, ticket: &str) -> Result<Output> {
    let name = phone
        .dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("phone");
    phone.run(&[
        "pair",
        ticket,
        "--name",
        name,
        "--json",
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    ])
}

/// Pairs and requires success: returns `pair --json`'s output.
fn must_pair(phone: &Home, ticket: &str) -> Result<Value> {
    let out = pair(phone, ticket)?;
    ensure!(
        out.status.success(),
        "pairing {} failed ({}): {}",
        phone.dir.display(),
        out.status,
        stderr(&out)
    );
    let v: Value = serde_json::from_slice(&out.stdout).context("pair --json prints JSON")?;
    ensure!(
        v["synced"] == Value::Bool(true),
        "paired but not synced: {v}"
    );
    Ok(v)
}

/// Pairs and requires a refusal by the desktop (exit 1) that left the phone without a thread.
fn must_be_refused(phone: &Home, ticket: &str, why: &str) -> Result<String> {
    let out = pair(phone, ticket)?;
    let err = stderr(&out);
    ensure!(
        out.status.code() == Some(REFUSED),
        "{why}: expected exit {REFUSED}, got {} (stdout {:?}, stderr {err})",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(
        thread_id(phone)?.is_none(),
        "{why}: the phone got a thread anyway"
    );
    Ok(err)
}

/// The phone's or desktop's `status --json` thread id.
fn thread_id(home: &Home) -> Result<Option<String>> {
    let v = home.json(&["status", "--json"])?;
    Ok(v["thread_id"].as_str().map(str::to_owned))
}

/// A thread as compared by these tests: its id, and each task's status and events.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    thread_id: String,
    tasks: BTreeMap<String, (String, Vec<Value>)>,
}

fn snapshot(home: &Home) -> Result<Snapshot> {
    let v = home.thread()?;
    let tasks = v["tasks"]
        .as_array()
        .context("thread --json has tasks")?
        .iter()
        .map(|t| {
            let status = t["status"].as_str().context("task status")?.to_owned();
            let events = t["events"].as_array().context("task events")?.clone();
            Ok((
                t["id"].as_str().context("task id")?.to_owned(),
                (status, events),
            ))
        })
        .collect::<Result<_>>()?;
    Ok(Snapshot {
        thread_id: v["thread_id"].as_str().context("thread_id")?.to_owned(),
        tasks,
    })
}

/// A copy of `ticket` with its binary form edited by `edit`; it must still parse.
fn forge(ticket: &Ticket, edit: impl FnOnce(&mut [u8])) -> Result<(String, Ticket)> {
    let text = ticket.to_string();
    let b32 = text
        .strip_prefix(TICKET_PREFIX)
        .context("ticket text prefix")?;
    let mut bytes = BASE32_NOPAD.decode(b32.as_bytes())?;
    edit(&mut bytes);
    let forged = format!("{TICKET_PREFIX}{}", BASE32_NOPAD.encode(&bytes));
    let parsed: Ticket = forged.parse().context("the forged ticket parses")?;
    ensure!(
        parsed.desktop() == ticket.desktop() && parsed.addrs() == ticket.addrs(),
        "forging changed the wrong fields"
    );
    Ok((forged, parsed))
}

/// The ticket with bit `bit` (0..256) of its secret flipped.
fn flip_secret_bit(ticket: &Ticket, bit: usize) -> Result<String> {
    let (text, forged) = forge(ticket, |b| b[SECRET][bit / 8] ^= 1 << (bit % 8))?;
    ensure!(forged.id() == ticket.id(), "same ticket id");
    ensure!(forged.secret() != ticket.secret(), "the secret changed");
    ensure!(
        forged.expires_at() == ticket.expires_at(),
        "the expiry did not change"
    );
    Ok(text)
}

/// Starts a desktop daemon listening on exactly `listen` (to restart it on the same port).
fn start_desktop_on(home: &Home, listen: &str) -> Result<Daemon> {
    let dir = home.dir.to_str().context("home path")?;
    let log_dir = home.dir.parent().context("home parent")?;
    let d = Daemon::spawn(
        "errand-desktop",
        &["--home", dir, "run", "--listen", listen, "--no-mdns"],
        "running",
        log_dir,
    )?;
    wait_for("the desktop to listen", DEADLINE, || {
        let v = home.json(&["status", "--json"]).ok()?;
        v["listen_addrs"][0].as_str().map(str::to_owned)
    })?;
    Ok(d)
}

/// `devices --json` of a desktop, keyed by device id.
fn devices(desktop: &Home) -> Result<BTreeMap<String, Value>> {
    let v = desktop.json(&["devices", "--json"])?;
    v.as_array()
        .context("devices --json is an array")?
        .iter()
        .map(|d| Ok((d["id"].as_str().context("id")?.to_owned(), d.clone())))
        .collect()
}

/// Queues a task on a home (a phone, or a desktop for itself); returns its id.
fn send(home: &Home, text: &str) -> Result<String> {
    let v = home.json(&["send", text, "--json"])?;
    Ok(v["task_id"].as_str().context("task_id")?.to_owned())
}

/// A task as the desktop sees it, or `None` if it does not have it.
fn task(home: &Home, id: &str) -> Option<Value> {
    home.json(&["task", id, "--json"]).ok()
}

/// `errand-phone sync` on loopback.
fn sync(phone: &Home, timeout: &str) -> Result<Output> {
    phone.run(&[
        "sync",
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--timeout",
        timeout,
    ])
}

fn peer_entry(status: &Value, id: &str) -> Option<Value> {
    status["peers"]
        .as_array()?
        .iter()
        .find(|p| p["id"].as_str() == Some(id))
        .cloned()
}

#[test]
fn pairing_through_a_ticket_gives_the_phone_the_desktops_thread() -> Result<()> {
    let root = tempdir()?;
    let desktop = Home::desktop(root.path(), "desk");
    let phone = Home::phone(root.path(), "ada");
    let (_d, _) = desktop.start(&[])?;
    send(&desktop, "echo one")?;
    send(&desktop, "echo two")?;
    let before = snapshot(&desktop)?;
    ensure!(before.tasks.len() == 2, "{before:?}");

    let (text, _) = issue(&desktop, "10m")?;
    ensure!(
        text.starts_with("errand:") && !text.contains(char::is_whitespace),
        "ticket text is one errand: token: {text:?}"
    );
    let v = must_pair(&phone, &text)?;

    let ours = snapshot(&phone)?;
    let after = snapshot(&desktop)?;
    ensure!(v["desktop_id"] == Value::String(desktop.peer_id()?), "{v}");
    ensure!(
        v["thread_id"] == Value::String(after.thread_id.clone()),
        "{v}"
    );
    ensure!(ours.thread_id == after.thread_id, "{ours:?} vs {after:?}");
    ensure!(
        ours.tasks.keys().eq(after.tasks.keys()),
        "the phone has the desktop's tasks: {ours:?} vs {after:?}"
    );
    // A task runner on the desktop may add events after the sync, so each task's history on
    // the phone is the desktop's from some moment between `before` and `after`; where nothing
    // moved, the two are equal.
    for (id, (status, events)) in &ours.tasks {
        let (_, seen) = before
            .tasks
            .get(id)
            .context("the task was on the desktop")?;
        let (now_status, now) = after.tasks.get(id).context("the task is on the desktop")?;
        ensure!(
            events.len() >= seen.len() && now.starts_with(events),
            "task {id} on the phone: {events:?}; desktop before {seen:?}, after {now:?}"
        );
        ensure!(
            events.len() < now.len() || status == now_status,
            "task {id} is {status} on the phone and {now_status} on the desktop"
        );
    }
    if before == after {
        ensure!(ours == after, "{ours:?} vs {after:?}");
    }

    let phone_id = phone.peer_id()?;
    let devs = devices(&desktop)?;
    let dev = devs.get(&phone_id).context("the desktop lists the phone")?;
    ensure!(dev["kind"] == "phone" && dev["name"] == "ada", "{dev}");
    ensure!(
        dev["revoked"] == false && dev["paired_at"].is_string(),
        "{dev}"
    );
    let status = phone.json(&["status", "--json"])?;
    let desk = peer_entry(&status, &desktop.peer_id()?).context("the phone lists the desktop")?;
    ensure!(desk["kind"] == "desktop", "{desk}");
    Ok(())
}

#[test]
fn a_ticket_pairs_only_once_even_across_a_desktop_crash() -> Result<()> {
    let root = tempdir()?;
    let desktop = Home::desktop(root.path(), "desk");
    let (first, second, third) = (
        Home::phone(root.path(), "p1"),
        Home::phone(root.path(), "p2"),
        Home::phone(root.path(), "p3"),
    );
    let (d, addr) = desktop.start(&[])?;
    let (used, _) = issue(&desktop, "10m")?;
    must_pair(&first, &used)?;

    // Another live ticket keeps the pairing window open, so the refusal is the ticket's.
    let (before_crash, _) = issue(&desktop, "10m")?;
    must_be_refused(&second, &used, "a used ticket, second use")?;
    ensure!(
        !devices(&desktop)?.contains_key(&second.peer_id()?),
        "a refused phone is not a device"
    );

    // A crash (SIGKILL), then the desktop comes back on the same address.
    d.kill();
    let _d = start_desktop_on(&desktop, &addr)?;
    // The ticket issued before the crash is still live and still opens the gate.
    must_pair(&third, &before_crash)?;
    let (fresh, _) = issue(&desktop, "10m")?;
    must_be_refused(&second, &used, "a used ticket after a crash")?;
    must_be_refused(&second, &before_crash, "a ticket used after the crash")?;
    must_pair(&second, &fresh)?;
    let devs = devices(&desktop)?;
    for p in [&first, &second, &third] {
        ensure!(devs.contains_key(&p.peer_id()?), "{devs:?}");
    }
    Ok(())
}

#[test]
fn an_expired_ticket_is_refused_even_if_its_text_claims_otherwise() -> Result<()> {
    let root = tempdir()?;
    let desktop = Home::desktop(root.path(), "desk");
    let phone = Home::phone(root.path(), "late");
    let (_d, _) = desktop.start(&[])?;
    let (short, short_ticket) = issue(&desktop, "2s")?;
    let (long, _) = issue(&desktop, "10m")?;

    // Waiting out the TTL is the point of this test.
    let left = short_ticket.expires_at() - now_ms() + 500;
    std::thread::sleep(Duration::from_millis(u64::try_from(left).unwrap_or(0)));
    ensure!(short_ticket.is_expired(now_ms()));

    let err = must_be_refused(&phone, &short, "an expired ticket")?;
    ensure!(err.contains("expired"), "says why: {err}");

    // The same ticket with its expiry pushed an hour out: the phone's own check passes, and
    // only the desktop's stored expiry can refuse it.
    let later = u64::try_from(now_ms() / 1000 + 3600)?;
    let (forged, forged_ticket) = forge(&short_ticket, |b| {
        b[EXPIRES].copy_from_slice(&later.to_be_bytes())
    })?;
    ensure!(!forged_ticket.is_expired(now_ms()) && forged_ticket.id() == short_ticket.id());
    must_be_refused(&phone, &forged, "an expired ticket with a forged expiry")?;

    must_pair(&phone, &long)?;
    Ok(())
}

#[test]
fn a_wrong_secret_costs_one_try_and_five_kill_the_ticket() -> Result<()> {
    let root = tempdir()?;
    let desktop = Home::desktop(root.path(), "desk");
    let (first, second) = (
        Home::phone(root.path(), "p1"),
        Home::phone(root.path(), "p2"),
    );
    let (_d, _) = desktop.start(&[])?;

    // Four wrong tries, the first with one flipped bit: the real ticket still pairs.
    let (ticket, parsed) = issue(&desktop, "10m")?;
    for bit in [0, 77, 140, 255] {
        let wrong = flip_secret_bit(&parsed, bit)?;
        must_be_refused(&first, &wrong, &format!("secret bit {bit} flipped"))?;
    }
    must_pair(&first, &ticket)?;

    // Five wrong tries kill a ticket: then its right secret fails too.
    let (doomed, parsed) = issue(&desktop, "10m")?;
    let (spare, _) = issue(&desktop, "10m")?;
    for bit in [1, 2, 3, 4, 5] {
        let wrong = flip_secret_bit(&parsed, bit)?;
        must_be_refused(&second, &wrong, &format!("secret bit {bit} flipped"))?;
    }
    must_be_refused(&second, &doomed, "the right secret after 5 wrong tries")?;
    must_pair(&second, &spare)?;
    Ok(())
}

#[test]
fn a_peer_without_the_secret_cannot_pair_sync_or_learn_the_thread() -> Result<()> {
    let root = tempdir()?;
    let desktop = Home::desktop(root.path(), "desk");
    let mallory = Home::phone(root.path(), "mallory");
    let honest = Home::phone(root.path(), "honest");
    let (_d, addr) = desktop.start(&[])?;
    send(&desktop, "echo secret plans")?;
    let desktop_id = desktop.peer_id()?;
    // A live ticket: the pairing window is open, so the gate lets anyone connect.
    let (ticket, parsed) = issue(&desktop, "10m")?;

    let out = pair(&mallory, "errand:NOTATICKET")?;
    ensure!(
        out.status.code() == Some(2),
        "garbage is a usage error: {out:?}"
    );
    must_be_refused(&mallory, &flip_secret_bit(&parsed, 9)?, "a flipped secret")?;
    let (guessed, _) = forge(&parsed, |b| {
        b[ID].copy_from_slice(&rand::random::<[u8; 8]>());
        b[SECRET].copy_from_slice(&rand::random::<[u8; 32]>());
    })?;
    must_be_refused(&mallory, &guessed, "a guessed id and secret")?;

    // Knowing the address and PeerId, Mallory trusts the desktop by hand and tries to sync.
    let v = mallory.json(&["devices", "--json", "add", &desktop_id, "--addr", &addr])?;
    ensure!(v["id"] == Value::String(desktop_id.clone()), "{v}");
    let out = sync(&mallory, FAILING_SYNC_TIMEOUT)?;
    ensure!(
        out.status.code() == Some(3),
        "an untrusted sync exits 3, got {}: {}",
        out.status,
        stderr(&out)
    );
    let status = mallory.json(&["status", "--json"])?;
    ensure!(status["thread_id"].is_null(), "{status}");
    let desk = peer_entry(&status, &desktop_id).context("mallory's desktop entry")?;
    ensure!(
        desk["in_sync"] == false && desk["last_sync_at"].is_null(),
        "{desk}"
    );
    ensure!(
        mallory.thread().is_err() || snapshot(&mallory)?.tasks.is_empty(),
        "mallory has no tasks"
    );
    ensure!(
        !devices(&desktop)?.contains_key(&mallory.peer_id()?),
        "mallory is not a device of the desktop"
    );

    // Two wrong tries later, the ticket still pairs its real phone.
    must_pair(&honest, &ticket)?;
    Ok(())
}

#[test]
fn revoking_a_phone_cuts_it_off_and_cancels_its_unstarted_tasks() -> Result<()> {
    let root = tempdir()?;
    let desktop = Home::desktop(root.path(), "desk");
    let (revoked, other) = (
        Home::phone(root.path(), "gone"),
        Home::phone(root.path(), "kept"),
    );
    let (d, _) = desktop.start(&[])?;
    // Two codes shown at once, one per phone.
    let (t1, _) = issue(&desktop, "10m")?;
    let (t2, _) = issue(&desktop, "10m")?;
    must_pair(&revoked, &t1)?;
    must_pair(&other, &t2)?;
    let (revoked_id, other_id) = (revoked.peer_id()?, other.peer_id()?);

    // The phone to be revoked runs its daemon and syncs two tasks. The desktop's runner (if
    // this build has one) is kept busy by the first, so the second waits, not started, for
    // far longer than the revocation takes even on a slow machine.
    let (phone_daemon, _) = revoked.start(&[])?;
    let synced = [send(&revoked, "sleep 120")?, send(&revoked, "true")?];
    for id in &synced {
        wait_for(&format!("task {id} on the desktop"), DEADLINE, || {
            task(&desktop, id)
        })?;
    }
    let log_before = d.stderr().len();

    let v = desktop.json(&["devices", "--json", "revoke", &revoked_id])?;
    ensure!(v["revoked"] == true, "{v}");
    // Each synced task either had started when the revocation came (a runner got to it first)
    // or is settled `cancelled{revoked}`; without a runner, both are cancelled.
    let mut cancelled = Vec::new();
    for id in &synced {
        let t = task(&desktop, id).context("the task")?;
        let started = t["events"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["kind"] == "started");
        if t["status"] == "cancelled" && t["reason"] == "revoked" {
            cancelled.push(id.clone());
        } else {
            ensure!(started, "task {id} neither started nor was cancelled: {t}");
        }
    }
    ensure!(
        !cancelled.is_empty(),
        "a synced task that had not started is cancelled"
    );
    ensure!(
        v["cancelled_tasks"].as_u64() == Some(cancelled.len() as u64),
        "{v} vs {cancelled:?}"
    );
    let devs = devices(&desktop)?;
    ensure!(devs[&revoked_id]["revoked"] == true, "{devs:?}");
    ensure!(devs[&other_id]["revoked"] == false, "{devs:?}");

    // The live connection is closed, and every new one is refused.
    wait_for("the desktop to drop the revoked phone", DEADLINE, || {
        let s = desktop.json(&["status", "--json"]).ok()?;
        (peer_entry(&s, &revoked_id)?["connected"] == false).then_some(())
    })?;
    let late = send(&revoked, "echo too late")?;
    wait_for("the revoked phone to be refused again", DEADLINE, || {
        let log = d.stderr();
        log.get(log_before..)?
            .lines()
            .any(|l| l.contains("gate refused a connection") && l.contains(&revoked_id))
            .then_some(())
    })?;
    phone_daemon.stop()?;
    let out = sync(&revoked, FAILING_SYNC_TIMEOUT)?;
    ensure!(
        out.status.code() == Some(3),
        "a revoked phone's sync exits 3, got {}: {}",
        out.status,
        stderr(&out)
    );
    ensure!(
        task(&desktop, &late).is_none(),
        "the revoked phone's queued task reached the desktop"
    );

    // The other phone goes on working, and learns of the cancellations.
    let fresh = send(&other, "echo still here")?;
    let out = sync(&other, "60s")?;
    ensure!(out.status.success(), "other phone's sync: {}", stderr(&out));
    ensure!(
        task(&desktop, &fresh).is_some(),
        "the other phone's task arrived"
    );
    for id in &cancelled {
        let t = task(&other, id).context("the other phone has the task")?;
        ensure!(
            t["status"] == "cancelled" && t["reason"] == "revoked",
            "{t}"
        );
    }
    ensure!(task(&other, &late).is_none());
    // A graceful stop, so that a runner stops the `sleep` it may have started.
    d.stop()?;
    Ok(())
}

#[test]
fn pair_png_decodes_to_the_ticket_text() -> Result<()> {
    let root = tempdir()?;
    let desktop = Home::desktop(root.path(), "desk");
    let (_d, _) = desktop.start(&[])?;
    let png = root.path().join("ticket.png");
    let svg = root.path().join("ticket.svg");
    let png_s = png.to_str().context("path")?;
    let svg_s = svg.to_str().context("path")?;
    let v = desktop.json(&["pair", "--json", "--png", png_s, "--svg", svg_s])?;
    let ticket = v["ticket"].as_str().context("ticket")?;

    let bytes = std::fs::read(&png)?;
    ensure!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "--png writes a PNG"
    );
    ensure!(
        decode_qr(&png)? == ticket,
        "the QR code holds the ticket text"
    );
    ensure!(
        std::fs::read_to_string(&svg)?.contains("<svg"),
        "--svg writes an SVG"
    );
    #[cfg(unix)]
    for f in [&png, &svg] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(f)?.permissions().mode() & 0o777;
        ensure!(
            mode & 0o077 == 0,
            "{} is {mode:o}: it holds a secret",
            f.display()
        );
    }
    Ok(())
}

fn decode_qr(path: &Path) -> Result<String> {
    let img = image::open(path)?.to_luma8();
    let mut prepared = rqrr::PreparedImage::prepare(img);
    let grids = prepared.detect_grids();
    let [grid] = grids.as_slice() else {
        bail!("expected one QR code, found {}", grids.len());
    };
    let (_, text) = grid.decode()?;
    Ok(text)
}

#[test]
fn a_phone_must_forget_its_desktop_before_pairing_another() -> Result<()> {
    let root = tempdir()?;
    let (a, b) = (
        Home::desktop(root.path(), "deska"),
        Home::desktop(root.path(), "deskb"),
    );
    let phone = Home::phone(root.path(), "phone");
    let (_da, _) = a.start(&[])?;
    let (_db, _) = b.start(&[])?;
    let task_a = send(&a, "echo on a")?;
    let task_b = send(&b, "echo on b")?;
    let (ta, _) = issue(&a, "10m")?;
    let (tb, _) = issue(&b, "10m")?;
    must_pair(&phone, &ta)?;

    let out = pair(&phone, &tb)?;
    let err = stderr(&out);
    ensure!(
        out.status.code() == Some(REFUSED) && err.contains("errand-phone forget"),
        "a second desktop needs forget first: {} {err}",
        out.status
    );
    ensure!(thread_id(&phone)? == thread_id(&a)?, "still on desktop A");
    ensure!(
        !devices(&b)?.contains_key(&phone.peer_id()?),
        "B did not pair the phone"
    );

    let out = phone.run(&["forget"])?;
    ensure!(out.status.success(), "forget: {}", stderr(&out));
    // B's ticket was not spent by the refused attempt.
    must_pair(&phone, &tb)?;
    ensure!(thread_id(&phone)? == thread_id(&b)?, "now on desktop B");
    let ours = snapshot(&phone)?;
    ensure!(
        ours.tasks.keys().eq([&task_b]),
        "the phone holds B's thread only: {ours:?}"
    );
    ensure!(task(&b, &task_a).is_none(), "A's task did not leak to B");
    let status = phone.json(&["status", "--json"])?;
    let desktops: BTreeSet<&str> = status["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["kind"] == "desktop")
        .filter_map(|p| p["id"].as_str())
        .collect();
    let b_id = b.peer_id()?;
    ensure!(desktops == BTreeSet::from([b_id.as_str()]), "{desktops:?}");
    Ok(())
}
