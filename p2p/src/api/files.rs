//! Files of the thread: downloading a task's artifacts, and where this device holds each.

use std::{path::PathBuf, time::Duration};

use errand_core::{BlobRef, TaskId, artifacts_of, fold};
use serde::{Deserialize, Serialize};

use super::{ApiError, Call, ops::GetTask, views::FileInfo};
use crate::{
    blob::{FetchError, FetchStats},
    peer::Peer,
};

/// First wait before trying a fetch again after the stream broke; doubles up to 10 s.
const RETRY_START: Duration = Duration::from_millis(100);
/// Longest wait between tries.
const RETRY_MAX: Duration = Duration::from_secs(10);
/// First wait after a stream that carried bytes was cut (a relay's circuit limit): long
/// enough for the node to see the old connection closed, short enough that a file crossing
/// hundreds of circuits is not slowed by much.
const RETRY_AFTER_CUT: Duration = Duration::from_millis(20);

/// `fetch TASK [DIR]`: download the task's artifacts, verified, into `dir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchArtifacts {
    /// The task.
    pub id: TaskId,
    /// Where to put the files (an absolute path on the device that runs the request).
    pub dir: PathBuf,
    /// Give up after this many milliseconds without the desktop.
    pub timeout_ms: u64,
}

/// What `fetch` got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fetched {
    /// The task.
    pub task_id: TaskId,
    /// Each artifact, with the path it was written to.
    pub files: Vec<FileInfo>,
    /// How each artifact's bytes came, in the order of `files`.
    #[serde(default)]
    pub transfers: Vec<Transfer>,
}

/// How one file's bytes came in one `fetch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// The blob.
    pub hash: errand_core::BlobHash,
    /// Bytes this device held verified before the fetch began (from a fetch cut off
    /// earlier); the fetch asked only for what follows.
    pub resumed_from: u64,
    /// Bytes of the file (and of its outboard, 32 bytes per 16 KiB) received over the wire
    /// by this fetch, good or refused.
    pub received_bytes: u64,
    /// Times a stream that had carried bytes of the file was cut (a relay's circuit limit,
    /// the desktop going away) and the fetch went on from the verified offset over a new one.
    pub reconnects: u32,
    /// Milliseconds from the start of the fetch (dialing the desktop included) to the
    /// verified end, waits included.
    pub ms: u64,
}

/// Fetches one blob from `from`, trying again from the verified offset while the stream
/// breaks, until `timeout` passes without a verified byte.
pub async fn fetch_with_retries(
    peer: &Peer,
    from: libp2p::PeerId,
    blob: &BlobRef,
    timeout: Duration,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<(PathBuf, Transfer), ApiError> {
    let store = peer.blobs();
    let hash = blob.hash;
    let held = tokio::task::spawn_blocking(move || store.entry(&hash))
        .await
        .map_err(|e| ApiError::new(e.to_string()))?
        .map_err(|e| ApiError::new(format!("could not fetch {}: {e}", blob.name)))?;
    let mut transfer = Transfer {
        hash,
        resumed_from: held.map_or(0, |e| if e.complete { e.size } else { e.verified_upto }),
        received_bytes: 0,
        reconnects: 0,
        ms: 0,
    };
    let mut delay = RETRY_START;
    let started = tokio::time::Instant::now();
    let mut deadline = started + timeout;
    loop {
        let mut stats = FetchStats::default();
        let fetched = peer
            .fetch_blob_counted(from, blob, progress, &mut stats)
            .await;
        transfer.received_bytes += stats.received;
        match fetched {
            Ok(p) => {
                transfer.ms = started.elapsed().as_millis() as u64;
                return Ok((p, transfer));
            }
            Err(FetchError::Stream { source, .. }) => {
                if stats.received > 0 {
                    // The peer was there: this is a cut stream (a relay's circuit limit, a
                    // restart), not an absent peer. Go on at once, and wait for it anew.
                    delay = RETRY_AFTER_CUT;
                    deadline = tokio::time::Instant::now() + timeout;
                    transfer.reconnects += 1;
                    tracing::info!(
                        file = %blob.name,
                        from = stats.resumed_from,
                        received = stats.received,
                        error = %source,
                        "the stream was cut; going on from the verified offset"
                    );
                }
                if tokio::time::Instant::now() + delay > deadline {
                    return Err(ApiError::with_code(
                        super::exit::UNREACHABLE,
                        format!("could not fetch {}: {source}", blob.name),
                    ));
                }
            }
            Err(e) => return Err(ApiError::new(format!("could not fetch {}: {e}", blob.name))),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// Downloads the task's artifacts into `dir` under plain, unique file names; `progress`
/// gets (file, verified bytes, size).
pub async fn fetch_artifacts(
    peer: &Peer,
    id: TaskId,
    dir: PathBuf,
    timeout: Duration,
    progress: &mut (dyn FnMut(&BlobRef, u64, u64) + Send),
) -> Result<Fetched, ApiError> {
    let task = GetTask { id }.read(peer).await?;
    let artifacts = fold(&task).artifacts;
    let from = libp2p::PeerId::from_bytes(&task.target.to_bytes())
        .map_err(|e| ApiError::new(e.to_string()))?;
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| ApiError::new(format!("cannot create {}: {e}", dir.display())))?;
    let mut used = std::collections::HashSet::new();
    let mut files = Vec::new();
    let mut transfers = Vec::new();
    for a in &artifacts {
        let mut each = |done: u64, size: u64| progress(a, done, size);
        let (source, transfer) = fetch_with_retries(peer, from, a, timeout, &mut each).await?;
        transfers.push(transfer);
        let mut name = errand_core::safe_file_name(&a.name);
        let mut i = 2;
        while !used.insert(name.to_lowercase()) {
            name = format!("{i}-{}", errand_core::safe_file_name(&a.name));
            i += 1;
        }
        let dst = dir.join(&name);
        let tmp = dir.join(format!(".{name}.part"));
        let placed = async {
            tokio::fs::copy(&source, &tmp).await?;
            tokio::fs::rename(&tmp, &dst).await
        }
        .await;
        if let Err(e) = placed {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(ApiError::new(format!(
                "cannot write {}: {e}",
                dst.display()
            )));
        }
        let mut info = FileInfo::from(a);
        info.local_path = Some(dst.to_string_lossy().into_owned());
        files.push(info);
    }
    Ok(Fetched {
        task_id: id,
        files,
        transfers,
    })
}

/// The default of `auto_fetch_bytes`: artifacts up to 10 MiB (a report, a chart, a patch, a
/// photo) come to the phone by themselves; larger ones wait until someone asks.
pub const DEFAULT_AUTO_FETCH_BYTES: u64 = 10 << 20;

/// How long an automatic fetch waits for the desktop before it leaves the file for later (the
/// next artifact fact, restart or `fetch` tries again).
const AUTO_FETCH_PATIENCE: Duration = Duration::from_secs(600);

/// Artifacts of `tasks` (all held tasks for `None`) that are at most `limit` bytes and not held
/// here yet, with the desktop that serves each.
async fn wanted(
    peer: &Peer,
    tasks: Option<std::collections::BTreeSet<TaskId>>,
    limit: u64,
) -> Vec<(libp2p::PeerId, BlobRef)> {
    // Only the artifacts are kept, one task at a time: the look at start reads every task held.
    let wanted_of = move |t: &errand_core::Task, out: &mut Vec<(libp2p::PeerId, BlobRef)>| {
        let Ok(from) = libp2p::PeerId::from_bytes(&t.target.to_bytes()) else {
            return;
        };
        for a in artifacts_of(t).into_iter().filter(|a| a.size <= limit) {
            out.push((from, a));
        }
    };
    let out = peer
        .replica()
        .read(move |d| {
            let mut out = Vec::new();
            match &tasks {
                Some(ids) => d
                    .tasks_by_id(ids)
                    .iter()
                    .for_each(|t| wanted_of(t, &mut out)),
                None => d.each_task(|t| wanted_of(&t, &mut out)),
            }
            out
        })
        .await
        .unwrap_or_default();
    let store = peer.blobs();
    tokio::task::spawn_blocking(move || {
        let mut seen = std::collections::HashSet::new();
        out.into_iter()
            .filter(|(_, a)| seen.insert(a.hash))
            .filter(|(_, a)| store.path(&a.hash).ok().flatten().is_none())
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// The phone's policy for artifacts: each one of at most `limit` bytes is fetched in the
/// background as soon as its fact arrives (and those missed before, at start and when the
/// events lagged); larger ones wait for `fetch`. Runs until `shutdown`; one file at a time,
/// so a burst of small results never crowds the connection.
pub async fn auto_fetch(peer: Peer, limit: u64, shutdown: tokio_util::sync::CancellationToken) {
    use tokio::sync::broadcast::error::RecvError;
    if limit == 0 {
        return;
    }
    let mut events = peer.events();
    let mut look: Option<Option<std::collections::BTreeSet<TaskId>>> = Some(None);
    loop {
        if let Some(tasks) = look.take() {
            for (from, blob) in wanted(&peer, tasks, limit).await {
                let mut quiet = |_, _| {};
                let fetched = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return,
                    r = fetch_with_retries(&peer, from, &blob, AUTO_FETCH_PATIENCE, &mut quiet) => r,
                };
                match fetched {
                    Ok(_) => {
                        tracing::info!(file = %blob.name, size = blob.size, "artifact fetched")
                    }
                    Err(e) => {
                        tracing::info!(file = %blob.name, error = %e, "artifact left for later")
                    }
                }
            }
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            ev = events.recv() => match ev {
                Ok(crate::peer::PeerEvent::Merged { tasks, .. }) if !tasks.is_empty() => {
                    look = Some(Some(tasks.into_iter().collect()));
                }
                // The desktop came back: what waited for it is tried again.
                Ok(crate::peer::PeerEvent::Connected { .. }) => look = Some(None),
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => look = Some(None),
                Err(RecvError::Closed) => return,
            },
        }
    }
}

impl Call for FetchArtifacts {
    type Response = Fetched;
    async fn run(self, peer: &Peer) -> Result<Fetched, ApiError> {
        fetch_artifacts(
            peer,
            self.id,
            self.dir,
            Duration::from_millis(self.timeout_ms),
            &mut |_, _, _| {},
        )
        .await
    }
}
