//! Files of the thread: downloading a task's artifacts, and where this device holds each.

use std::{path::PathBuf, time::Duration};

use errand_core::{BlobRef, TaskId, fold};
use serde::{Deserialize, Serialize};

use super::{ApiError, Call, ops::GetTask, views::FileInfo};
use crate::{blob::FetchError, peer::Peer};

/// First wait before trying a fetch again after the stream broke; doubles up to 10 s.
const RETRY_START: Duration = Duration::from_millis(500);
/// Longest wait between tries.
const RETRY_MAX: Duration = Duration::from_secs(10);

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
}

/// Sets `local_path` on each file this device holds whole.
pub async fn with_local_paths(peer: &Peer, files: &mut [FileInfo]) {
    let store = peer.blobs();
    let hashes: Vec<_> = files.iter().map(|f| f.hash).collect();
    let paths = tokio::task::spawn_blocking(move || {
        hashes
            .iter()
            .map(|h| store.path(h).ok().flatten())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for (f, p) in files.iter_mut().zip(paths) {
        f.local_path = p.map(|p| p.to_string_lossy().into_owned());
    }
}

/// Fetches one blob from `from`, trying again while the stream breaks, until `deadline`.
pub async fn fetch_with_retries(
    peer: &Peer,
    from: libp2p::PeerId,
    blob: &BlobRef,
    deadline: tokio::time::Instant,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<PathBuf, ApiError> {
    let mut delay = RETRY_START;
    loop {
        match peer.fetch_blob(from, blob, progress).await {
            Ok(p) => return Ok(p),
            Err(FetchError::Stream { source, .. }) => {
                if tokio::time::Instant::now() + delay > deadline {
                    return Err(ApiError::with_code(
                        super::exit::UNREACHABLE,
                        format!("could not fetch {}: {source}", blob.name),
                    ));
                }
                tracing::debug!(file = %blob.name, error = %source, "fetching again shortly");
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
    let deadline = tokio::time::Instant::now() + timeout;
    let mut used = std::collections::HashSet::new();
    let mut files = Vec::new();
    for a in &artifacts {
        let mut each = |done: u64, size: u64| progress(a, done, size);
        let source = fetch_with_retries(peer, from, a, deadline, &mut each).await?;
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
    Ok(Fetched { task_id: id, files })
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
