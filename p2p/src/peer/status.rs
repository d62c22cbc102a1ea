//! `status --json`: what a `Peer` knows of itself, its peers, its relay and its documents.

use std::collections::HashMap;

use errand_core::DeviceKind;
use libp2p::PeerId;
use serde::Serialize;

use super::{handle::Peer, types::PeerError};

/// One peer's line in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// PeerId.
    pub id: String,
    /// Name.
    pub name: String,
    /// Desktop or phone.
    pub kind: DeviceKind,
    /// Connected now.
    pub connected: bool,
    /// `direct`, `relayed`, or null when not connected.
    pub path: Option<&'static str>,
    /// Last time we were in sync, RFC 3339.
    pub last_sync_at: Option<String>,
    /// In sync now (peer's heads equal ours).
    pub in_sync: bool,
    /// Revoked.
    pub revoked: bool,
    /// Bytes sent to it by this process.
    pub bytes_sent: u64,
    /// Bytes received from it by this process.
    pub bytes_received: u64,
}

/// `status --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Our PeerId.
    pub peer_id: String,
    /// Desktop or phone.
    pub kind: DeviceKind,
    /// Our name.
    pub name: String,
    /// The thread, if this home has one.
    pub thread_id: Option<String>,
    /// Where we listen (empty when the network is not running here).
    pub listen_addrs: Vec<String>,
    /// Trusted peers.
    pub peers: Vec<PeerStatus>,
    /// Relay state (null: no relay configured).
    pub relay: Option<serde_json::Value>,
    /// True when a daemon answered (the network runs).
    pub running: bool,
    /// The thread's documents: the meta document (part 0) and its segments.
    pub documents: Vec<DocumentStatus>,
    /// How often each sync path ran in this process.
    pub sync: crate::replica::PathCounts,
}

/// One document of the thread, in `status --json`.
#[derive(Debug, Clone, Serialize)]
pub struct DocumentStatus {
    /// 0: the meta document (devices, and tasks from before segments); n: segment n.
    pub part: u32,
    /// Held in memory now.
    pub loaded: bool,
    /// Changes in it, when loaded.
    pub changes: Option<usize>,
}

impl Peer {
    /// The status report.
    pub async fn status(&self) -> Result<Status, PeerError> {
        let trusted = self.trusted_peers().await?;
        let listen_addrs = match self.node() {
            Some(n) => n.listen_addrs().await.unwrap_or_default(),
            None => Vec::new(),
        };
        let running = self.node().is_some();
        let relay = match self.node() {
            Some(n) => n
                .relay_info()
                .await
                .ok()
                .and_then(|(info, _)| info.into_iter().next())
                .and_then(|i| serde_json::to_value(i).ok()),
            None => None,
        };
        let live: HashMap<PeerId, super::handle::Live> = self.inner.view.borrow().peers.clone();
        let peers = trusted
            .into_iter()
            .map(|t| {
                let pid: Option<PeerId> = t.id.as_str().parse().ok();
                let (connected, relayed, in_sync, traffic) = pid
                    .and_then(|p| live.get(&p))
                    .map_or((false, false, false, None), |l| {
                        (l.connected, l.relayed, l.in_sync, Some(l.traffic.clone()))
                    });
                let in_sync = in_sync && pid.is_some_and(|p| self.is_in_sync(&p));
                PeerStatus {
                    id: t.id.to_string(),
                    name: t.name,
                    kind: t.kind,
                    connected,
                    path: connected.then_some(if relayed { "relayed" } else { "direct" }),
                    last_sync_at: t.last_sync_at.map(errand_core::time::rfc3339),
                    in_sync: connected && in_sync,
                    revoked: t.revoked,
                    bytes_sent: traffic
                        .as_ref()
                        .map_or(0, |t| t.sent.load(std::sync::atomic::Ordering::Relaxed)),
                    bytes_received: traffic
                        .as_ref()
                        .map_or(0, |t| t.received.load(std::sync::atomic::Ordering::Relaxed)),
                }
            })
            .collect();
        Ok(Status {
            peer_id: self.inner.peer_id.to_base58(),
            kind: self.kind(),
            name: self.inner.name.clone(),
            thread_id: self
                .inner
                .replica
                .genesis()
                .map(|g| g.thread_id.to_string()),
            listen_addrs: listen_addrs.iter().map(ToString::to_string).collect(),
            peers,
            relay,
            running,
            documents: self
                .inner
                .replica
                .documents()
                .into_iter()
                .map(|(part, loaded, changes)| DocumentStatus {
                    part,
                    loaded,
                    changes,
                })
                .collect(),
            sync: self.inner.replica.path_counts(),
        })
    }
}
