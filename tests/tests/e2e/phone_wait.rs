//! `errand-phone send --wait` follows a task to its end, shows its output, and exits by its
//! final status.

use errand_tests::Home;

#[test]
fn send_wait_shows_output_and_exits_by_the_final_status() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let desktop = Home::desktop(dir.path(), "desktop");
    let phone = Home::phone(dir.path(), "phone");
    let (_d, _addr) = desktop.start(&[])?;
    let ticket = desktop.json(&["pair", "--json"])?["ticket"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let net = ["--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"];
    let mut args = vec!["pair", ticket.as_str()];
    args.extend(net);
    assert!(phone.run(&args)?.status.success(), "pairing");

    let mut ok = vec!["send", "--wait", "--timeout", "120s"];
    ok.extend(net);
    ok.push("echo waited-for-output");
    let out = phone.run(&ok)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("waited-for-output"),
        "output arrives: {stdout}"
    );

    let mut bad = vec!["send", "--wait", "--timeout", "120s"];
    bad.extend(net);
    bad.push("exit 3");
    let out = phone.run(&bad)?;
    assert_eq!(out.status.code(), Some(4), "a failed task exits 4");
    Ok(())
}
