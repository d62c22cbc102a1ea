//! Bad input to `errand-phone` gets a clear error and exit code, and loses nothing queued.

use std::process::{Command, Stdio};

use errand_tests::{Home, bin, wait_for};

#[test]
fn bad_input_gets_clear_errors_and_queued_tasks_survive() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let desktop = Home::desktop(dir.path(), "desktop");
    let phone = Home::phone(dir.path(), "phone");
    let (_d, _) = desktop.start(&[])?;
    let ticket = desktop.json(&["pair", "--json"])?["ticket"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let out = phone.run(&[
        "pair",
        &ticket,
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    ])?;
    assert!(out.status.success(), "pairing");
    let queued = phone.json(&["send", "--json", "kept"])?["task_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    let code = |args: &[&str]| -> anyhow::Result<(Option<i32>, String)> {
        let o = phone.run(args)?;
        Ok((
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ))
    };
    let (c, e) = code(&["pair", "errand:not-base32!"])?;
    assert_eq!(c, Some(2), "bad ticket: {e}");
    assert!(e.contains("ticket"), "{e}");
    let (c, e) = code(&["task", "not-an-id"])?;
    assert_eq!(c, Some(2), "malformed task id: {e}");
    let (c, e) = code(&["task", "01ARZ3NDEKTSV4RRFFQ69G5FAV"])?;
    assert_eq!(c, Some(1), "unknown task id: {e}");
    assert!(e.contains("no task"), "{e}");
    let (c, e) = code(&["send", "   "])?;
    assert_eq!(c, Some(2), "empty instruction: {e}");

    // Another process holds the home and does not answer on a control socket: exit 5.
    let mut holder = Command::new(bin("errand-fixture"))
        .args([
            "--home",
            phone.dir.to_str().unwrap_or_default(),
            "--kind",
            "phone",
            "--count",
            "1000000",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let locked = wait_for("the home to be locked", errand_tests::DEADLINE, || {
        let (c, e) = code(&["send", "x"]).ok()?;
        (c == Some(5)).then_some(e)
    });
    holder.kill()?;
    holder.wait()?;
    let e = locked?;
    assert!(e.contains("locked"), "{e}");

    let ids = phone.task_ids()?;
    assert!(
        ids.contains(&queued),
        "the queued task survived every error"
    );
    Ok(())
}
