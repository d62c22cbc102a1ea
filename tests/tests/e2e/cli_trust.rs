//! The CLIs as a new user meets them, with real processes: the daemon starts while a one-shot
//! command holds the home, flags go after the subcommand as the README writes them, a pairing
//! ticket can come on stdin, and text from the thread cannot drive the terminal.

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, ensure};
use errand_tests::{DEADLINE, Daemon, Home, bin, wait_for};

/// How many times the daemon is started against a concurrent `status`. The race was lost in 4
/// of 4 manual tries, so 50 rounds leave it no place to hide.
const START_ROUNDS: usize = 50;

/// A short temp dir (the control socket's path must fit in 108 bytes).
fn tempdir() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix("ec").tempdir_in("/tmp")?)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// Root cause: a one-shot `status` that finds no daemon on the control socket opens the home
// itself and so holds the store's lock for a moment. A daemon starting in that moment failed at
// once with "another errand-desktop already runs", and the new user was left without one.
#[test]
fn the_daemon_starts_every_time_while_status_is_polled_at_once() -> Result<()> {
    for round in 0..START_ROUNDS {
        let dir = tempdir()?;
        let desktop = Home::desktop(dir.path(), "d");
        let home = desktop.dir.to_str().context("utf-8 home")?.to_owned();
        let (daemon, status) = std::thread::scope(|s| {
            let daemon = s.spawn(|| {
                Daemon::spawn(
                    "errand-desktop",
                    &[
                        "--home",
                        &home,
                        "run",
                        "--no-mdns",
                        "--listen",
                        "/ip4/127.0.0.1/tcp/0",
                    ],
                    "running",
                    dir.path(),
                )
            });
            let status = desktop.run(&["status", "--json"]);
            (daemon.join(), status)
        });
        let mut daemon = daemon
            .map_err(|_| anyhow::anyhow!("the spawning thread panicked"))?
            .with_context(|| format!("round {round}: the daemon did not start"))?;
        let status = status?;
        ensure!(
            status.status.success(),
            "round {round}: status failed ({}): {}",
            status.status,
            text(&status.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&status.stdout)
            .with_context(|| format!("round {round}: status --json printed no JSON"))?;
        ensure!(v["peer_id"].is_string(), "round {round}: {v}");
        ensure!(
            daemon.is_running(),
            "round {round}: the daemon exited after ready: {}",
            daemon.stderr()
        );
        // The running daemon answers the next one-shot command.
        let v = desktop.json(&["status", "--json"])?;
        ensure!(
            v["running"] == serde_json::Value::Bool(true),
            "round {round}: {v}"
        );
        daemon.kill();
    }
    Ok(())
}

// Root cause: `--json` was an argument of `devices` only, so the README's
// `devices revoke ID --json` was refused as a usage error and the device stayed trusted.
#[test]
fn devices_revoke_takes_json_after_the_id_and_revokes() -> Result<()> {
    let dir = tempdir()?;
    let desktop = Home::desktop(dir.path(), "d");
    let phone_id = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id()
        .to_string();
    let out = desktop.run(&["devices", "add", &phone_id])?;
    ensure!(out.status.success(), "devices add: {}", text(&out.stderr));

    let v = desktop.json(&["devices", "revoke", &phone_id, "--json"])?;
    ensure!(v["id"] == phone_id.as_str(), "{v}");
    ensure!(v["revoked"] == serde_json::Value::Bool(true), "{v}");
    ensure!(v["cancelled_tasks"].is_u64(), "{v}");
    let devices = desktop.json(&["devices", "--json"])?;
    let d = devices
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["id"] == phone_id.as_str())
        .context("the revoked device is listed")?;
    ensure!(d["revoked"] == serde_json::Value::Bool(true), "{d}");

    // And `--home` after the subcommand too.
    let home = desktop.dir.to_str().context("utf-8 home")?;
    let v = errand_tests::cli_json("errand-desktop", &["devices", "--json", "--home", home])?;
    ensure!(v.as_array().is_some_and(|a| a.len() == 1), "{v}");
    Ok(())
}

// Root cause: the ticket could only be given in argv, where every local user can read it in
// /proc/PID/cmdline while the phone pairs.
#[test]
fn phone_pair_reads_the_ticket_from_stdin() -> Result<()> {
    let dir = tempdir()?;
    let desktop = Home::desktop(dir.path(), "d");
    let phone = Home::phone(dir.path(), "p");
    let (_d, _) = desktop.start(&[])?;
    let ticket = desktop.json(&["pair", "--json"])?["ticket"]
        .as_str()
        .context("pair --json has a ticket")?
        .to_owned();
    let mut child = Command::new(bin("errand-phone"))
        .args([
            "--home",
            phone.dir.to_str().context("utf-8 home")?,
            "pair",
            "-",
            "--json",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(format!("{ticket}\n").as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "pair - failed ({}): {}",
        out.status,
        text(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["synced"] == serde_json::Value::Bool(true), "{v}");
    let phone_id = phone.peer_id()?;
    let devices = desktop.json(&["devices", "--json"])?;
    ensure!(
        devices
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| d["id"] == phone_id.as_str()),
        "the desktop trusts the phone: {devices}"
    );
    Ok(())
}

// Root cause: human output printed instructions and task output verbatim, so a task's text
// could move the cursor, recolour or retitle the terminal of whoever read the thread.
#[test]
fn thread_and_task_print_no_escape_sequences_but_json_keeps_them() -> Result<()> {
    let dir = tempdir()?;
    let desktop = Home::desktop(dir.path(), "d");
    let instruction = "\u{1b}[31mred\u{1b}[0m\u{1b}]0;owned\u{7} bell\u{7}";
    let id = desktop.json(&["send", "--json", instruction])?["task_id"]
        .as_str()
        .context("send --json has task_id")?
        .to_owned();

    for args in [vec!["thread"], vec!["task", id.as_str()]] {
        let out = desktop.run(&args)?;
        ensure!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        let shown = text(&out.stdout);
        ensure!(
            !shown.chars().any(|c| c.is_control() && c != '\n'),
            "{args:?} printed control characters: {shown:?}"
        );
        ensure!(shown.contains("red bell"), "{args:?}: {shown:?}");
        ensure!(!shown.contains("owned"), "{args:?}: {shown:?}");
    }
    let v = desktop.json(&["task", &id, "--json"])?;
    ensure!(v["instruction"] == instruction, "JSON stays exact: {v}");
    Ok(())
}

/// Waits until a file contains `needle`; returns its text.
fn wait_for_text(path: &Path, needle: &str) -> Result<String> {
    wait_for(
        &format!("{needle:?} in {}", path.display()),
        DEADLINE,
        || {
            std::fs::read_to_string(path)
                .ok()
                .filter(|s| s.contains(needle))
        },
    )
}

// Root cause: with no daemon, `pair` quietly became one and held the home until the code
// expired, so the person did not know why `errand-desktop run` then refused to start.
#[test]
fn pair_without_a_daemon_says_it_serves_pairing_in_the_foreground() -> Result<()> {
    let dir = tempdir()?;
    let desktop = Home::desktop(dir.path(), "d");
    let home = desktop.dir.to_str().context("utf-8 home")?;
    let pair = Daemon::spawn(
        "errand-desktop",
        &[
            "--home",
            home,
            "pair",
            "--json",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ],
        "ticket",
        dir.path(),
    )?;
    let err = wait_for_text(&pair.stderr_path, "no errand-desktop daemon runs")?;
    ensure!(err.contains("foreground"), "{err}");
    pair.kill();
    Ok(())
}
