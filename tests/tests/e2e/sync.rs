//! Acceptance tests of issue 3: two trusted peers keep one thread in sync over libp2p.
//!
//! - Real `errand-desktop` and `errand-phone` processes on 127.0.0.1 with mDNS off, each
//!   with its own home in a temp dir (see `errand_tests`).
//! - A raw libp2p client (TCP + Noise + Yamux + `libp2p-stream`, nothing of ours but the frame
//!   codec) that feeds the desktop bad `/errand/sync/1` input.
//! - `Peer` in-process, for the shutdown contract.
//!
//! Every wait polls with a generous deadline: the CI box is a slow shared 2-core machine.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Output,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, ensure};
use errand_core::{DeviceKind, ThreadId};
use errand_crdt::{DocId, TrustedPeer};
use errand_p2p::{
    peer::{Peer, PeerConfig, SHUTDOWN_TIMEOUT, now_ms},
    sync::{
        session::{DeviceInfo, SyncHello},
        wire::{Frame, FrameKind, Hello, PROTOCOL_VERSION},
    },
};
use errand_tests::{Daemon, Home, fill_tasks, trust_pair, wait_for};

/// For waits that move thousands of tasks in a debug build on a slow machine.
const LONG: Duration = Duration::from_secs(120);
/// For waits that take a second on a quiet machine.
const SHORT: Duration = Duration::from_secs(60);
/// The size of a "large" thread in these tests (issue 3, acceptance 2 and 5).
const BIG: usize = 5_000;

// ---- helpers ----------------------------------------------------------------------------

/// A temp dir for one test's homes and logs; kept (and named on stderr) when
/// `ERRAND_KEEP_TEST_DIRS` is set, for reading the daemons' logs after a failure.
fn test_root() -> Result<tempfile::TempDir> {
    let mut dir = tempfile::Builder::new().prefix("errand-sync-").tempdir()?;
    if std::env::var_os("ERRAND_KEEP_TEST_DIRS").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    Ok(dir)
}

/// Task ids in a home's thread.
fn ids(home: &Home) -> Result<BTreeSet<String>> {
    Ok(home.task_ids()?.into_iter().collect())
}

/// `status --json`'s entry for `peer`.
fn peer_status(home: &Home, peer: &str) -> Result<serde_json::Value> {
    let v = home.json(&["status", "--json"])?;
    v["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["id"] == peer)
        .cloned()
        .with_context(|| format!("{peer} is not a peer of {}", home.dir.display()))
}

/// True when `home`'s daemon reports `peer` connected and at our heads.
fn in_sync_with(home: &Home, peer: &str) -> bool {
    peer_status(home, peer).is_ok_and(|p| p["in_sync"] == true)
}

/// Bytes `home`'s daemon sent to and received from `peer` (sync frames), this process.
fn traffic(home: &Home, peer: &str) -> Result<(u64, u64)> {
    let p = peer_status(home, peer)?;
    Ok((
        p["bytes_sent"].as_u64().context("bytes_sent")?,
        p["bytes_received"].as_u64().context("bytes_received")?,
    ))
}

/// `send TEXT --json`: the id of a task that is durable on `home`.
fn send(home: &Home, text: &str) -> Result<String> {
    let v = home.json(&["send", text, "--json"])?;
    Ok(v["task_id"].as_str().context("task_id")?.to_owned())
}

/// One `errand-phone sync` on loopback.
fn phone_sync(phone: &Home, timeout: &str) -> Result<Output> {
    phone.run(&[
        "sync",
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--timeout",
        timeout,
    ])
}

/// Waits until both daemons report each other in sync and hold the same tasks, which include
/// `expected`; returns the common set.
fn converged(
    desktop: &Home,
    phone: &Home,
    expected: &BTreeSet<String>,
) -> Result<BTreeSet<String>> {
    let (d, p) = (desktop.peer_id()?, phone.peer_id()?);
    wait_for("desktop and phone to converge", LONG, || {
        if !(in_sync_with(phone, &d) && in_sync_with(desktop, &p)) {
            return None;
        }
        let (a, b) = (ids(desktop).ok()?, ids(phone).ok()?);
        (a == b && a.is_superset(expected)).then_some(a)
    })
}

/// Desktop daemon flags for tests about sync alone: the thread syncs, no task runs (the
/// fixture's thousands of tasks would otherwise run as shell commands).
const SYNC_ONLY: &[&str] = &["--sync-only"];

/// A desktop home (with `tasks` tasks already in its thread) whose daemon runs with `flags`,
/// and a phone home; each trusts the other and the phone knows the desktop's address.
fn desktop_and_phone(
    root: &std::path::Path,
    tasks: usize,
    flags: &[&str],
) -> Result<(Home, Home, Daemon, String)> {
    let desktop = Home::desktop(root, "desktop");
    let phone = Home::phone(root, "phone");
    fill_tasks(&desktop.dir, DeviceKind::Desktop, tasks, "desktop task")?;
    let (d, addr) = desktop.start(flags)?;
    trust_pair(&desktop, &phone, Some(&addr))?;
    Ok((desktop, phone, d, addr))
}

// ---- 1. concurrent edits ----------------------------------------------------------------

/// A command that succeeds or fails, so folded statuses differ from task to task.
fn command(side: &str, i: usize) -> String {
    if i.is_multiple_of(2) {
        format!("echo {side} {i}")
    } else {
        format!("echo {side} {i} failing; exit 3")
    }
}

/// Task id → (folded status, attempt, pending requests), once every task has ended.
fn settled(home: &Home, want: usize) -> Option<BTreeMap<String, String>> {
    let t = home.thread().ok()?;
    let tasks = t["tasks"].as_array()?;
    let ended = |s: &str| {
        matches!(
            s,
            "done" | "failed" | "cancelled" | "denied" | "interrupted"
        )
    };
    if tasks.len() != want
        || !tasks
            .iter()
            .all(|t| ended(t["status"].as_str().unwrap_or("")))
    {
        return None;
    }
    Some(
        tasks
            .iter()
            .map(|t| {
                let id = t["id"].as_str().unwrap_or_default().to_owned();
                (
                    id,
                    format!("{} {} {}", t["status"], t["attempt"], t["requests"]),
                )
            })
            .collect(),
    )
}

#[test]
fn two_peers_converge_on_concurrent_edits() -> Result<()> {
    const EACH: usize = 8;
    let root = test_root()?;
    // The desktop runs tasks as they arrive: its facts are edits too.
    let (desktop, phone, _d, _) = desktop_and_phone(root.path(), 0, &[])?;
    let did = desktop.peer_id()?;
    let (_p, _) = phone.start(&[])?;
    wait_for("the phone to adopt the desktop's thread", SHORT, || {
        in_sync_with(&phone, &did).then_some(())
    })?;

    // Round 1: both sides enqueue at the same time while both daemons run.
    let sends = |home: &Home, side: &str, range: std::ops::Range<usize>| {
        range
            .map(|i| send(home, &command(side, i)).map(|id| (id, i)))
            .collect::<Result<Vec<_>>>()
    };
    let (from_desktop, from_phone) = std::thread::scope(|s| {
        let d = s.spawn(|| sends(&desktop, "desktop", 0..EACH));
        let p = s.spawn(|| sends(&phone, "phone", 0..EACH));
        (d.join(), p.join())
    });
    let from_desktop = from_desktop.map_err(|_| anyhow!("desktop sender panicked"))??;
    let from_phone = from_phone.map_err(|_| anyhow!("phone sender panicked"))??;

    // Round 2: the phone retries its failed tasks (events on existing tasks) while the desktop
    // adds tasks and runs them.
    let to_retry: Vec<String> = from_phone
        .iter()
        .filter(|(_, i)| i % 2 == 1)
        .map(|(id, _)| id.clone())
        .collect();
    wait_for("the phone to see its failing tasks fail", LONG, || {
        let t = phone.thread().ok()?;
        let failed: BTreeSet<&str> = t["tasks"]
            .as_array()?
            .iter()
            .filter(|t| t["status"] == "failed")
            .filter_map(|t| t["id"].as_str())
            .collect();
        to_retry
            .iter()
            .all(|id| failed.contains(id.as_str()))
            .then_some(())
    })?;
    let (more_desktop, retried) = std::thread::scope(|s| {
        let d = s.spawn(|| sends(&desktop, "desktop", EACH..2 * EACH));
        let p = s.spawn(|| {
            for id in &to_retry {
                let out = phone.run(&["retry", id])?;
                ensure!(
                    out.status.success(),
                    "retry {id}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(())
        });
        (d.join(), p.join())
    });
    let more_desktop = more_desktop.map_err(|_| anyhow!("desktop sender panicked"))??;
    retried.map_err(|_| anyhow!("phone retries panicked"))??;

    let all: Vec<(String, usize)> = [from_desktop, from_phone, more_desktop]
        .into_iter()
        .flatten()
        .collect();
    let want = all.len();
    let view = wait_for("both sides to settle every task alike", LONG, || {
        let a = settled(&desktop, want)?;
        (settled(&phone, want)? == a).then_some(a)
    })?;
    for (id, i) in &all {
        let expected = match (i % 2, to_retry.contains(id)) {
            (0, _) => "\"done\" 1 []",
            (_, false) => "\"failed\" 1 []",
            (_, true) => "\"failed\" 2 []",
        };
        ensure!(
            view.get(id).map(String::as_str) == Some(expected),
            "task {id}: {:?}, expected {expected}",
            view.get(id)
        );
    }
    Ok(())
}

// ---- 2. offline queue, delta on reconnect -----------------------------------------------

#[test]
fn offline_queue_converges_after_reconnect_and_sends_only_the_delta() -> Result<()> {
    const MORE: usize = 500;
    let root = test_root()?;
    let (desktop, phone, d, addr) = desktop_and_phone(root.path(), BIG, SYNC_ONLY)?;
    let (did, pid) = (desktop.peer_id()?, phone.peer_id()?);

    // Phase 1: the phone joins and receives all 5,000 tasks.
    let started = Instant::now();
    let (p, _) = phone.start(&[])?;
    let shared = ids(&desktop)?;
    ensure!(shared.len() == BIG, "fixture made {} tasks", shared.len());
    converged(&desktop, &phone, &shared)?;
    let first_sync = started.elapsed();
    let (sent0, received0) = traffic(&phone, &did)?;
    let full = sent0 + received0;

    // Phase 2: the phone goes away; the desktop gets 500 more tasks (stopped meanwhile, so
    // the fixture can open its home) and comes back on the same address.
    ensure!(p.stop()?.success(), "the phone daemon did not exit cleanly");
    ensure!(
        d.stop()?.success(),
        "the desktop daemon did not exit cleanly"
    );
    let queued: BTreeSet<String> = fill_tasks(&desktop.dir, DeviceKind::Desktop, MORE, "queued")?
        .into_iter()
        .collect();
    let (_d, addr2) = desktop.start_at(&addr, SYNC_ONLY)?;
    ensure!(
        addr2 == addr,
        "the desktop came back on {addr2}, not {addr}"
    );

    // Phase 3: the phone restarts; nobody is told to sync.
    let started = Instant::now();
    let (_p, _) = phone.start(&[])?;
    let expected: BTreeSet<String> = shared.union(&queued).cloned().collect();
    let common = converged(&desktop, &phone, &expected)?;
    let resync = started.elapsed();
    ensure!(
        common.len() == BIG + MORE,
        "expected {} tasks, both have {}",
        BIG + MORE,
        common.len()
    );
    let (sent, received) = traffic(&phone, &did)?;
    let delta = sent + received;
    let (dsent, dreceived) = traffic(&desktop, &pid)?;
    println!(
        "initial sync of {BIG} tasks: {full} bytes (phone sent {sent0}, received {received0}) \
         in {first_sync:?}; reconnect after {MORE} more: {delta} bytes (phone sent {sent}, \
         received {received}; desktop sent {dsent}, received {dreceived}) in {resync:?}: {:.1}%",
        100.0 * delta as f64 / full as f64,
    );
    ensure!(
        delta * 10 < full * 3,
        "the reconnect moved {delta} bytes, not well under the {full} bytes of the full sync"
    );
    Ok(())
}

// ---- 3. untrusted peer --------------------------------------------------------------------

#[test]
fn an_untrusted_peer_connects_but_gets_no_thread_and_changes_nothing() -> Result<()> {
    let root = test_root()?;
    let (desktop, phone, d, addr) = desktop_and_phone(root.path(), 3, SYNC_ONLY)?;
    let did = desktop.peer_id()?;
    let out = phone_sync(&phone, "60s")?;
    ensure!(out.status.success(), "trusted phone sync: {out:?}");
    send(&phone, "from the trusted phone")?;
    let out = phone_sync(&phone, "60s")?;
    ensure!(out.status.success(), "trusted phone sync: {out:?}");
    let desktop_before = desktop.thread()?;
    let phone_before = phone.thread()?;
    ensure!(desktop_before["tasks"].as_array().map(Vec::len) == Some(4));
    ensure!(
        desktop_before == phone_before,
        "the trusted pair is not in sync"
    );

    // A third home trusts the desktop, but the desktop does not trust it.
    let stranger = Home::phone(root.path(), "stranger");
    let sid = stranger.peer_id()?;
    let out = stranger.run(&["devices", "add", &did, "--addr", &addr])?;
    ensure!(out.status.success(), "stranger devices add: {out:?}");
    // TCP itself is open to anyone.
    let port: u16 = addr.rsplit('/').next().context("port")?.parse()?;
    std::net::TcpStream::connect(("127.0.0.1", port)).context("TCP connect to the desktop")?;
    let out = phone_sync(&stranger, "10s")?;
    ensure!(
        out.status.code() == Some(3),
        "an untrusted sync must exit 3 (unreachable): {out:?}"
    );
    // It got past TCP and Noise, and the desktop's gate refused it.
    wait_for("the desktop to log the refusal", SHORT, || {
        d.stderr()
            .lines()
            .any(|l| l.contains("gate refused") && l.contains(&sid))
            .then_some(())
    })?;
    let status = stranger.json(&["status", "--json"])?;
    ensure!(
        status["thread_id"].is_null(),
        "the stranger got a thread: {status}"
    );
    ensure!(!stranger.run(&["thread", "--json"])?.status.success());

    // Nothing changed on the trusted side, and the stranger is not a device there.
    ensure!(
        desktop.thread()? == desktop_before,
        "the desktop's thread changed"
    );
    let out = phone_sync(&phone, "60s")?;
    ensure!(out.status.success(), "trusted phone sync: {out:?}");
    ensure!(
        phone.thread()? == phone_before,
        "the phone's thread changed"
    );
    let devices = desktop.json(&["devices", "--json"])?;
    ensure!(
        !devices.to_string().contains(&sid),
        "the stranger became a device: {devices}"
    );
    Ok(())
}

// ---- 4. bad input on the sync stream ------------------------------------------------------

/// A bare libp2p client: TCP + Noise + Yamux and `libp2p-stream`, nothing else.
struct RawClient {
    rt: tokio::runtime::Runtime,
    control: libp2p_stream::Control,
    desktop: libp2p::PeerId,
}

impl RawClient {
    /// Connects to the desktop with `keypair` (which the desktop must trust by then).
    fn connect(
        keypair: libp2p::identity::Keypair,
        desktop: libp2p::PeerId,
        addr: libp2p::Multiaddr,
    ) -> Result<Self> {
        use futures::StreamExt;
        use libp2p::swarm::{SwarmEvent, dial_opts::DialOpts};
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
                // The test opens its streams one after the other: keep the connection between.
                .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
                .build();
            let control = swarm.behaviour().new_control();
            swarm.dial(DialOpts::peer_id(desktop).addresses(vec![addr]).build())?;
            let connected = tokio::time::timeout(SHORT, async {
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
            .await;
            connected.context("connecting to the desktop timed out")??;
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

    /// Opens a sync stream, writes `input` (ignoring write errors: the desktop may close
    /// first), half-closes if `close`, then reads until the desktop closes the stream. Fails if
    /// it has not within `SHORT`.
    fn feed(&mut self, input: &[u8], close: bool) -> Result<()> {
        use futures::{AsyncReadExt, AsyncWriteExt};
        let (control, desktop) = (&mut self.control, self.desktop);
        self.rt.block_on(async {
            let mut stream = control
                .open_stream(desktop, errand_p2p::session::SYNC_PROTOCOL)
                .await
                .map_err(|e| anyhow!("opening a sync stream: {e}"))?;
            let _ = stream.write_all(input).await;
            let _ = stream.flush().await;
            if close {
                let _ = stream.close().await;
            }
            tokio::time::timeout(SHORT, async {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await
            .context("the desktop kept the stream open after bad input")
        })
    }
}

/// A frame as it goes on the wire: length prefix, then the payload.
fn framed(frame: &Frame) -> Vec<u8> {
    let payload = frame.encode();
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&payload);
    out
}

/// A well-formed hello from a fresh phone.
fn good_hello() -> Vec<u8> {
    let hello = SyncHello {
        hello: Hello {
            version: PROTOCOL_VERSION,
            genesis: None,
        },
        device: Some(DeviceInfo {
            name: "raw client".into(),
            kind: DeviceKind::Phone,
            actor: automerge::ActorId::random().to_hex_string(),
        }),
        docs: Vec::new(),
    };
    framed(&Frame {
        kind: FrameKind::Hello,
        doc_id: None,
        body: serde_json::to_vec(&hello).unwrap_or_default(),
    })
}

/// `n` random bytes.
fn random_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|_| rand::random::<u8>()).collect()
}

#[test]
fn bad_sync_input_gets_a_clean_close_and_the_desktop_serves_others() -> Result<()> {
    let root = test_root()?;
    let (desktop, phone, mut d, addr) = desktop_and_phone(root.path(), 1, SYNC_ONLY)?;
    let out = phone_sync(&phone, "60s")?;
    ensure!(out.status.success(), "trusted phone sync: {out:?}");
    let thread: ThreadId = desktop.json(&["status", "--json"])?["thread_id"]
        .as_str()
        .context("thread_id")?
        .parse()
        .map_err(|e| anyhow!("thread id: {e:?}"))?;
    let doc = DocId::thread(&thread);

    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let raw_id = keypair.public().to_peer_id().to_base58();
    let out = desktop.run(&["devices", "add", &raw_id])?;
    ensure!(out.status.success(), "trusting the raw client: {out:?}");
    let mut client = RawClient::connect(keypair, desktop.peer_id()?.parse()?, addr.parse()?)?;

    let garbage_changes = {
        let msg = automerge::sync::Message {
            heads: Vec::new(),
            need: Vec::new(),
            have: Vec::new(),
            changes: vec![random_bytes(300)].into(),
            flags: None,
            version: automerge::sync::MessageVersion::V1,
        };
        msg.encode()
    };
    let mut unknown_kind = framed(&Frame::sync(doc.clone(), random_bytes(64)));
    unknown_kind[4] = 7; // the kind byte follows the length prefix
    let cat = |parts: &[&[u8]]| parts.concat();
    // (what, bytes, half-close after writing, what the desktop's log must say)
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        (
            "random bytes",
            random_bytes(4096),
            false,
            "sync session closed",
        ),
        ("a 4 GiB length prefix", vec![0xff; 4], false, "over the"),
        (
            "a truncated frame, then close",
            cat(&[&100u32.to_be_bytes(), &[0; 10]]),
            true,
            "sync session closed",
        ),
        (
            "a hello, then a frame of an unknown kind",
            cat(&[&good_hello(), &unknown_kind]),
            false,
            "malformed frame",
        ),
        (
            "a hello, then a sync frame that is not an Automerge message",
            cat(&[
                &good_hello(),
                &framed(&Frame::sync(doc.clone(), random_bytes(256))),
            ]),
            false,
            "not a sync message",
        ),
        (
            "a hello, then an Automerge message carrying garbage changes",
            cat(&[
                &good_hello(),
                &framed(&Frame::sync(doc.clone(), garbage_changes)),
            ]),
            false,
            "sync session closed",
        ),
        (
            "a hello, then pushed changes that do not parse",
            cat(&[
                &good_hello(),
                &framed(&Frame::changes(
                    doc.clone(),
                    &[automerge::ChangeHash([1; 32])],
                    &cat(&[
                        &[0x85, 0x6f, 0x4a, 0x83, 1, 2, 3, 4, 1, 5],
                        &random_bytes(5),
                    ]),
                )),
            ]),
            false,
            "do not parse",
        ),
        (
            "a hello, then a sync frame for another thread's document",
            cat(&[
                &good_hello(),
                &framed(&Frame::sync(
                    DocId::parse("01ARZ3NDEKTSV4RRFFQ69G5FAV").context("doc id")?,
                    random_bytes(16),
                )),
            ]),
            false,
            "not part of this thread",
        ),
        (
            "a hello, then a sync frame for a segment far past the newest",
            cat(&[
                &good_hello(),
                &framed(&Frame::sync(
                    DocId::parse(&format!("{thread}.100000")).context("doc id")?,
                    random_bytes(16),
                )),
            ]),
            false,
            "far past the newest segment",
        ),
        (
            "a hello with the wrong version",
            framed(&Frame {
                kind: FrameKind::Hello,
                doc_id: None,
                body: br#"{"version":999,"genesis":null,"device":null}"#.to_vec(),
            }),
            false,
            "speaks sync protocol version 999",
        ),
        (
            "a sync frame before any hello",
            framed(&Frame::sync(doc.clone(), random_bytes(16))),
            false,
            "must be a hello",
        ),
    ];
    for (what, bytes, close, log) in cases {
        let closes_before = d
            .stderr()
            .lines()
            .filter(|l| l.contains("sync session closed") && l.contains(&raw_id))
            .count();
        client
            .feed(&bytes, close)
            .with_context(|| format!("after {what}"))?;
        wait_for(
            &format!("the desktop to log why it closed ({what})"),
            SHORT,
            || {
                let err = d.stderr();
                let ours: Vec<&str> = err
                    .lines()
                    .filter(|l| l.contains("sync session closed") && l.contains(&raw_id))
                    .collect();
                (ours.len() > closes_before
                    && ours[closes_before..].iter().any(|l| l.contains(log)))
                .then_some(())
            },
        )?;
        ensure!(d.is_running(), "the desktop died after {what}");
        // The desktop still serves its trusted phone.
        let task = send(&desktop, &format!("after {what}"))?;
        let out = phone_sync(&phone, "60s")?;
        ensure!(out.status.success(), "phone sync after {what}: {out:?}");
        ensure!(
            ids(&phone)?.contains(&task),
            "the phone did not get the task sent after {what}"
        );
    }
    ensure!(d.is_running(), "the desktop died");
    Ok(())
}

// ---- 5. SIGKILL mid-sync ----------------------------------------------------------------

#[test]
fn a_phone_killed_mid_sync_converges_and_keeps_what_it_acknowledged() -> Result<()> {
    const QUEUED: usize = 20;
    let root = test_root()?;
    let (desktop, phone, _d, _) = desktop_and_phone(root.path(), BIG, SYNC_ONLY)?;
    let pid = phone.peer_id()?;
    let shared = ids(&desktop)?;

    // Kill the phone while it receives the 5,000-task thread for the first time.
    let p = phone.start(&[])?.0;
    wait_for("the phone to adopt the thread", LONG, || {
        p.stderr()
            .contains("adopted the desktop's thread")
            .then_some(())
    })?;
    p.kill();
    let kept = phone.task_ids()?.len();
    println!("the phone held {kept} of {BIG} tasks when it was killed");
    ensure!(
        kept < BIG,
        "the kill came after the transfer had finished; nothing was tested"
    );

    // Offline, it queues tasks: each `send` returns once the task is durable on the phone.
    let acked: BTreeSet<String> = (0..QUEUED)
        .map(|i| send(&phone, &format!("queued on the phone {i}")))
        .collect::<Result<_>>()?;

    // Killed again as soon as it reconnects, while the two exchange the thread.
    let p = phone.start(&[])?.0;
    wait_for("the phone to reconnect", LONG, || {
        p.stderr().contains("connected").then_some(())
    })?;
    p.kill();
    println!(
        "the phone held {} tasks at the second kill",
        phone.task_ids()?.len()
    );

    // Restarted, it converges with nothing acknowledged lost, on either side.
    let (_p, _) = phone.start(&[])?;
    let expected: BTreeSet<String> = shared.union(&acked).cloned().collect();
    let common = converged(&desktop, &phone, &expected)?;
    ensure!(
        common == expected,
        "unexpected tasks: {:?}",
        common.symmetric_difference(&expected)
    );
    for t in desktop.thread()?["tasks"].as_array().into_iter().flatten() {
        if acked.contains(t["id"].as_str().unwrap_or_default()) {
            ensure!(t["author"] == pid.as_str(), "wrong author: {t}");
        }
    }
    Ok(())
}

/// A peer's changes are merged without waiting for the disk (only local writes wait): a
/// desktop SIGKILLed right after merging a phone's tasks may lose them, with the sync state
/// that recorded them, and gets them back from the phone, which keeps them durably.
#[test]
fn a_desktop_killed_right_after_merging_gets_the_phones_tasks_back() -> Result<()> {
    const SENT: usize = 30;
    let root = test_root()?;
    let (desktop, phone, d, addr) = desktop_and_phone(root.path(), 0, SYNC_ONLY)?;
    let (_p, _) = phone.start(&[])?;
    let acked: BTreeSet<String> = (0..SENT)
        .map(|i| send(&phone, &format!("merged then killed {i}")))
        .collect::<Result<_>>()?;
    wait_for("the desktop to merge every task", LONG, || {
        ids(&desktop).ok()?.is_superset(&acked).then_some(())
    })?;
    // No local write on the desktop since (it runs nothing): whatever of the merges the
    // disk does not hold yet is lost with the process.
    d.kill();
    let kept = ids(&desktop)?.intersection(&acked).count();
    println!("the killed desktop kept {kept} of {SENT} merged tasks");
    let listen = addr.split("/p2p/").next().unwrap_or(&addr).to_owned();
    let (_d, _) = desktop.start_at(&listen, SYNC_ONLY)?;
    let common = converged(&desktop, &phone, &acked)?;
    ensure!(
        common.is_superset(&acked),
        "tasks lost: {:?}",
        acked.difference(&common)
    );
    Ok(())
}

// ---- 6. shutdown ------------------------------------------------------------------------

/// A graceful stop: the daemon's shutdown is bounded by design (5 s per stage, but should
/// take well under a second here); allow for a slow machine.
const STOP_BOUND: Duration = Duration::from_secs(10);

#[test]
fn sigterm_stops_a_daemon_with_a_connected_peer_within_a_bound() -> Result<()> {
    let root = test_root()?;
    let (desktop, phone, d, _) = desktop_and_phone(root.path(), 1, &[])?;
    let (did, pid) = (desktop.peer_id()?, phone.peer_id()?);
    let (p, _) = phone.start(&[])?;
    wait_for("the pair to sync", SHORT, || {
        (in_sync_with(&phone, &did) && in_sync_with(&desktop, &pid)).then_some(())
    })?;

    let started = Instant::now();
    let status = d.stop()?;
    let took = started.elapsed();
    println!("desktop stopped in {took:?}");
    ensure!(status.success(), "desktop exit status {status}");
    ensure!(took < STOP_BOUND, "the desktop took {took:?} to stop");
    // It released its home: a local command opens it.
    let v = desktop.json(&["status", "--json"])?;
    ensure!(v["running"] == false, "{v}");

    // The phone, whose peer just left and which is now redialing, stops as promptly.
    let started = Instant::now();
    let status = p.stop()?;
    let took = started.elapsed();
    println!("phone stopped in {took:?}");
    ensure!(status.success(), "phone exit status {status}");
    ensure!(took < STOP_BOUND, "the phone took {took:?} to stop");
    Ok(())
}

/// Tasks the test itself may have alive besides the peers' (none are spawned; the slack
/// covers a runtime-internal task or two).
const TASK_SLACK: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_joins_every_task_within_a_bound() -> Result<()> {
    let root = test_root()?;
    let open = |name: &str, kind| {
        Peer::open(PeerConfig {
            home: root.path().join(name),
            kind,
            name: Some(name.into()),
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
            mdns: false,
            relays: Vec::new(),
            relay_only: false,
            blob_caps: Default::default(),
        })
        .map_err(anyhow::Error::from)
    };
    let desktop = open("desktop", DeviceKind::Desktop)?;
    let phone = open("phone", DeviceKind::Phone)?;
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();

    desktop.start().await?;
    phone.start().await?;
    let addrs = desktop
        .node()
        .context("desktop node")?
        .listen_addrs()
        .await?;
    let trusted = |peer: &Peer, kind, addrs: Vec<String>| TrustedPeer {
        id: peer.device_id(),
        name: peer.name().to_owned(),
        kind,
        addrs,
        paired_at: now_ms(),
        last_seen: None,
        last_sync_at: None,
        revoked: false,
    };
    desktop
        .trust(trusted(&phone, DeviceKind::Phone, Vec::new()))
        .await?;
    phone
        .trust(trusted(
            &desktop,
            DeviceKind::Desktop,
            addrs.iter().map(ToString::to_string).collect(),
        ))
        .await?;
    phone.dial(desktop.peer_id(), addrs).await?;
    tokio::time::timeout(SHORT, async {
        while !(phone.is_in_sync(&desktop.peer_id()) && desktop.is_in_sync(&phone.peer_id())) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .context("the peers did not sync")?;
    let live = metrics.num_alive_tasks();
    ensure!(
        live > baseline,
        "no tasks while running? {live} vs {baseline}"
    );

    // Both at once, each with its peer still connected. `shutdown` gives each stage
    // SHUTDOWN_TIMEOUT and then aborts what is left: finishing sooner means every task
    // ended by itself (nothing was cut off).
    let timed = |peer: &Peer| {
        let peer = peer.clone();
        async move {
            let started = Instant::now();
            tokio::time::timeout(STOP_BOUND, peer.shutdown())
                .await
                .map(|()| started.elapsed())
        }
    };
    let (d, p) = tokio::join!(timed(&desktop), timed(&phone));
    for (what, took) in [("desktop", d), ("phone", p)] {
        let took = took.with_context(|| format!("the {what}'s shutdown hung"))?;
        println!("{what} shut down in {took:?}");
        ensure!(
            took < SHUTDOWN_TIMEOUT,
            "the {what}'s shutdown took {took:?}: a task did not end until shutdown gave up \
             on it after {SHUTDOWN_TIMEOUT:?} and aborted it"
        );
    }
    let after = metrics.num_alive_tasks();
    println!("tasks alive: {baseline} before start, {live} running, {after} after shutdown");
    ensure!(
        after <= baseline + TASK_SLACK,
        "{after} tasks still alive after shutdown (baseline {baseline})"
    );
    Ok(())
}
