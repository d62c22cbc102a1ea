//! Files, as a `Peer` handles them: its blob store with the home's caps, garbage collection
//! of blobs no kept task references, and fetching a blob from a trusted peer (one fetch per
//! blob at a time in this process). The protocol itself is [`crate::blob`].

use std::{collections::HashSet, path::PathBuf, sync::Arc};

use errand_core::{BlobHash, DeviceId, DeviceKind};
use libp2p::PeerId;

use super::{Peer, PeerError};

impl Peer {
    /// Where this device holds each of `hashes` whole and verified (`None`: not, or not yet).
    pub async fn local_paths(&self, hashes: Vec<BlobHash>) -> Vec<Option<PathBuf>> {
        let store = self.blobs();
        tokio::task::spawn_blocking(move || {
            hashes
                .iter()
                .map(|h| store.path(h).ok().flatten())
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// This home's blob store, with the caps of its [`PeerConfig`](super::PeerConfig).
    pub fn blobs(&self) -> crate::blob::BlobStore {
        crate::blob::BlobStore::new(self.home(), self.inner.replica.clone())
            .with_caps(self.inner.config.blob_caps)
    }

    /// Garbage collection of this home's blobs: every blob (whole or partial) that no kept
    /// task references is removed, file and index row. A kept task is, on a desktop, one
    /// whose author is not revoked; on a phone, one whose desktop it still trusts (after
    /// `forget`, none). Reads every segment of the thread. Run at a daemon's start and after
    /// a revocation or `forget`.
    pub async fn collect_blobs(&self) -> Result<crate::blob::store::Collected, PeerError> {
        let store = self.blobs();
        let indexed = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.entries().map(|e| !e.is_empty()))
                .await
                .map_err(|e| PeerError::Invalid(format!("a blocking task failed: {e}")))??
        };
        // With no blob in the index there is nothing a task could keep: only stray and
        // temporary files go, and the thread is not read (reading every segment of a large
        // thread took a desktop's start from 62 ms to 2.3 s, and its memory from 31 to 95 MB).
        let keep = if indexed {
            self.blobs_kept().await?
        } else {
            Default::default()
        };
        let done = tokio::task::spawn_blocking(move || store.retain(&keep))
            .await
            .map_err(|e| PeerError::Invalid(format!("a blocking task failed: {e}")))??;
        if done != Default::default() {
            tracing::info!(
                blobs = done.blobs,
                bytes = done.bytes,
                strays = done.strays,
                "removed files no kept task references"
            );
        }
        Ok(done)
    }

    /// The blobs the kept tasks reference (see [`Self::collect_blobs`]): reads every segment.
    async fn blobs_kept(
        &self,
    ) -> Result<std::collections::HashSet<errand_core::BlobHash>, PeerError> {
        let desktops: Option<HashSet<DeviceId>> = match self.kind() {
            DeviceKind::Desktop => None,
            _ => Some(
                self.trusted_peers()
                    .await?
                    .into_iter()
                    .filter(|t| t.kind == DeviceKind::Desktop && !t.revoked)
                    .map(|t| t.id)
                    .collect(),
            ),
        };
        let keep = match self
            .inner
            .replica
            .read_all(move |d| {
                let revoked: HashSet<DeviceId> = d
                    .devices()
                    .into_iter()
                    .filter(|x| x.is_revoked())
                    .map(|x| x.id)
                    .collect();
                d.tasks()
                    .into_iter()
                    .filter(|t| match &desktops {
                        None => !revoked.contains(&t.author),
                        Some(trusted) => trusted.contains(&t.target),
                    })
                    .flat_map(|t| {
                        let artifacts = errand_core::fold(&t).artifacts;
                        t.attachments
                            .into_iter()
                            .chain(artifacts)
                            .map(|b| b.hash)
                            .collect::<Vec<_>>()
                    })
                    .collect::<std::collections::HashSet<_>>()
            })
            .await
        {
            Ok(keep) => keep,
            // No thread yet: nothing references anything.
            Err(crate::replica::ReplicaError::NoThread) => Default::default(),
            Err(e) => return Err(e.into()),
        };
        Ok(keep)
    }

    /// Fetches `blob` from `from` (connected, trusted) into this home's blob store, resuming
    /// from what is verified already; `progress` gets (verified bytes, size). Returns the
    /// path of the whole, verified blob.
    pub async fn fetch_blob(
        &self,
        from: PeerId,
        blob: &errand_core::BlobRef,
        progress: crate::blob::protocol::Progress<'_>,
    ) -> Result<std::path::PathBuf, crate::blob::FetchError> {
        let mut stats = crate::blob::FetchStats::default();
        self.fetch_blob_counted(from, blob, progress, &mut stats)
            .await
    }

    /// [`Self::fetch_blob`], also telling `stats` where it resumed and how many bytes it
    /// received (set even when the fetch fails part way).
    pub async fn fetch_blob_counted(
        &self,
        from: PeerId,
        blob: &errand_core::BlobRef,
        progress: crate::blob::protocol::Progress<'_>,
        stats: &mut crate::blob::FetchStats,
    ) -> Result<std::path::PathBuf, crate::blob::FetchError> {
        *stats = crate::blob::FetchStats::default();
        let turn = {
            let mut fetching = self
                .inner
                .fetching
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            fetching.retain(|_, m| Arc::strong_count(m) > 1);
            fetching.entry(blob.hash).or_default().clone()
        };
        let _turn = turn.lock().await;
        let store = self.blobs();
        if let Some(path) = {
            let (s, h) = (store.clone(), blob.hash);
            tokio::task::spawn_blocking(move || s.path(&h))
                .await
                .map_err(|e| crate::blob::FetchError::Join(e.to_string()))??
        } {
            stats.resumed_from = blob.size;
            progress(blob.size, blob.size);
            return Ok(path);
        }
        let Some(node) = self.node() else {
            return Err(crate::blob::FetchError::Stream {
                peer: from,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "the network is not started",
                ),
            });
        };
        // A relay that cut the last circuit at its byte limit, or a peer that came back: dial
        // now at the addresses we remember instead of waiting for the supervisor's redial,
        // so a transfer through a small circuit limit goes on at once. (The node dials only
        // when it has no connection to the peer, whatever this side has heard yet.)
        let addrs = self.remembered_addrs(&from).await;
        if let Err(e) = node.dial(from, addrs).await {
            tracing::debug!(peer = %from, error = %e, "could not dial for a blob");
        }
        // Open on a connection the node has reported (see `wait_connected`; a fetch started
        // right after the daemon stopped hung here in `.ci/run`). A peer that is away is
        // not waited for longer: the open then fails at once on the failed dial.
        node.wait_connected(from, crate::net::node::CONNECT_WAIT)
            .await;
        // Bounded like each request on it: a dial that neither connects nor fails must not
        // hold the fetch past its caller's timeout.
        let stall = crate::blob::protocol::STALL;
        let mut stream = tokio::time::timeout(
            stall,
            node.control().open_stream(from, crate::blob::BLOB_PROTOCOL),
        )
        .await
        .map_err(|_| crate::blob::FetchError::Stream {
            peer: from,
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no blob stream opened within {} s", stall.as_secs()),
            ),
        })?
        .map_err(|e| crate::blob::FetchError::Stream {
            peer: from,
            source: std::io::Error::other(e.to_string()),
        })?;
        crate::blob::fetch(&mut stream, from, &store, blob, progress, stats).await
    }
}
