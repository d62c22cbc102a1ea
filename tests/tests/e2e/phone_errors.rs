//! Bad input to `errand-phone` gets a clear error and exit code, and loses nothing queued.

use errand_tests::Home;

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

    // Something else holds the home and answers on no control socket: exit 5.
    let holder = errand_crdt::Store::open(&phone.dir)?;
    let (c, e) = code(&["send", "x"])?;
    drop(holder);
    assert_eq!(c, Some(5), "locked home: {e}");
    assert!(e.contains("locked"), "{e}");

    let ids = phone.task_ids()?;
    assert!(
        ids.contains(&queued),
        "the queued task survived every error"
    );
    Ok(())
}
