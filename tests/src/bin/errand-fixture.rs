//! Test fixture tool: fills a home with tasks quickly (in-process, one change per task), so
//! scenario tests and the benchmark can start from threads of thousands of tasks.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use errand_core::DeviceKind;
use errand_p2p::{
    api::{self, Call as _},
    peer::{Peer, PeerConfig},
};

/// Fills a home with tasks.
#[derive(Debug, Parser)]
struct Args {
    /// The home.
    #[arg(long)]
    home: PathBuf,
    /// desktop or phone.
    #[arg(long, default_value = "desktop")]
    kind: String,
    /// How many tasks to enqueue.
    #[arg(long, default_value_t = 0)]
    count: usize,
    /// Instruction prefix.
    #[arg(long, default_value = "fixture task")]
    text: String,
    /// Print the ids, one per line, each after it is durable.
    #[arg(long)]
    print_ids: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let kind: DeviceKind = args.kind.parse().map_err(anyhow::Error::msg)?;
    let peer = Peer::open(PeerConfig::local(args.home, kind))?;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for i in 0..args.count {
        let send = api::SendTask {
            text: format!("{} {i}", args.text),
            executor: None,
            not_after: None,
            attach: Vec::new(),
        };
        let sent = send
            .run(&peer)
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
        if args.print_ids {
            writeln!(out, "{}", sent.task_id)?;
            out.flush()?;
        }
    }
    Ok(())
}
