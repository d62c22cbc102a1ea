//! A change is acknowledged only once it is durable: a writer killed with SIGKILL mid-stream
//! loses nothing it had acknowledged.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use errand_core::DeviceKind;
use errand_p2p::peer::{Peer, PeerConfig};
use errand_tests::bin;

#[test]
fn every_acknowledged_task_survives_a_sigkill_of_the_writer() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let home = dir.path().join("desktop");
    let mut child = Command::new(bin("errand-fixture"))
        .args([
            "--home",
            home.to_str().unwrap_or_default(),
            "--count",
            "100000",
            "--print-ids",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut acked = BTreeSet::new();
    for line in BufReader::new(stdout).lines() {
        acked.insert(line?);
        if acked.len() == 300 {
            // Mid-stream: the writer is between commits or inside one.
            child.kill()?;
            break;
        }
    }
    child.wait()?;
    assert_eq!(
        acked.len(),
        300,
        "the writer acknowledged 300 tasks before the kill"
    );

    let rt = tokio::runtime::Runtime::new()?;
    let stored: BTreeSet<String> = rt.block_on(async {
        let peer = Peer::open(PeerConfig {
            home,
            kind: DeviceKind::Desktop,
            name: None,
            listen: Vec::new(),
            mdns: false,
            relays: Vec::new(),
            relay_only: false,
            blob_caps: Default::default(),
        })?;
        let tasks = peer.replica().read(|d| d.tasks()).await?;
        anyhow::Ok(tasks.into_iter().map(|t| t.id.to_string()).collect())
    })?;
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but lost after SIGKILL: {lost:?}"
    );
    println!(
        "acknowledged {}, stored {} (a write in flight may add one)",
        acked.len(),
        stored.len()
    );
    Ok(())
}
