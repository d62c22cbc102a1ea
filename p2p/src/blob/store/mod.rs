//! The blob store: files under `<home>/blobs`, indexed in the home's redb file.
//!
//! - A whole blob is `blobs/<hash>`, with its outboard beside it as `blobs/<hash>.obao`
//!   (none for a blob of one group). It appears only by rename, after its bytes were written,
//!   synced and checked against the hash: a reader never sees a half-written blob.
//! - A blob being fetched is `blobs/partial/<hash>` (its verified prefix) and
//!   `blobs/partial/<hash>.obao` (its verified outboard). The index
//!   ([`errand_crdt::tables::BLOBS`]) records how many bytes are verified, written after the
//!   bytes are synced; on reopening, the file is cut back to that, so a fetch resumes from the
//!   last verified group after a disconnect, a crash or a restart.
//! - Caps ([`BlobCaps`], settings of each device): [`MAX_BLOB_BYTES`] per blob and
//!   [`MAX_TOTAL_BYTES`] for the home by default (a partial blob counts at its full size,
//!   reserved when its fetch starts).

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    path::{Path, PathBuf},
};

use errand_core::BlobHash;
use errand_crdt::{StoreError, tables::BLOBS};
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::{
    tree::{self, OutboardBuilder, Verifier},
    wire::What,
};
use crate::replica::Replica;
mod caps;
mod open;

pub use caps::{BlobCaps, CapsError, MAX_BLOB_BYTES, MAX_TOTAL_BYTES};
pub use open::{BlobReader, Partial};

/// The folder of a home's blobs.
pub const BLOB_DIR: &str = "blobs";

/// Verified bytes a fetch writes at least between two commits of its verified offset (an
/// fsync of the partial file and a redb commit), and [`COMMIT_INTERVAL`] the least time: on a
/// slow link one commit per MiB, on a fast one one a second. Each commit stalls the fetch
/// behind the disk (four a second took a seventh of a 100 MiB fetch's time on loopback). A
/// crash re-fetches what came since (the larger of a MiB and a second's worth); what is
/// committed was synced first, so it is never corrupt. A fetch that stops (a cut stream, a
/// shutdown) commits all.
pub const COMMIT_EVERY: u64 = 1 << 20;

/// The least time between two commits of a fetch's verified offset (see [`COMMIT_EVERY`]).
pub const COMMIT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// What a garbage collection removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collected {
    /// Blobs (whole or partial) whose files and index row were removed.
    pub blobs: usize,
    /// Their sizes, summed.
    pub bytes: u64,
    /// Files without an index row (left by a crash between the two) that were removed.
    pub strays: usize,
}

/// A temporary file older than this is left over from a crash, not a copy in progress.
const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(3600);

/// What the index holds for one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Its size in bytes.
    pub size: u64,
    /// True once the whole blob is verified and in place.
    pub complete: bool,
    /// Bytes from the start that are verified and synced (a multiple of the group size, or
    /// the size).
    pub verified_upto: u64,
}

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The blob is over the per-file cap.
    #[error("the file is {size} bytes, over the limit of {max} per file")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The cap.
        max: u64,
    },
    /// Storing it would go over the storage cap.
    #[error("storing {size} more bytes would go over the home's limit of {max} bytes of files")]
    StoreFull {
        /// The blob's size.
        size: u64,
        /// The cap.
        max: u64,
    },
    /// A piece did not match the hash.
    #[error(transparent)]
    Verify(#[from] tree::VerifyError),
    /// The blob's size differs from what the index or the thread says.
    #[error("the blob is {got} bytes, expected {expected}")]
    Size {
        /// What was found.
        got: u64,
        /// What was expected.
        expected: u64,
    },
    /// This home does not hold the blob whole.
    #[error("blob {0} is not held here")]
    Missing(BlobHash),
    /// A range outside the blob.
    #[error("range {offset}+{len} is outside the blob ({size} bytes)")]
    Range {
        /// Where it starts.
        offset: u64,
        /// Its length.
        len: u64,
        /// The blob's size.
        size: u64,
    },
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The index could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The index holds something unreadable.
    #[error("the blob index is corrupt: {0}")]
    Corrupt(String),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BlobError + 'a {
    move |source| BlobError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A home's blobs. Cheap to clone; every method does blocking I/O (call it from a blocking
/// thread).
#[derive(Clone)]
pub struct BlobStore {
    dir: PathBuf,
    replica: Replica,
    caps: BlobCaps,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("dir", &self.dir)
            .field("caps", &self.caps)
            .finish()
    }
}

impl BlobStore {
    /// The blob store of the home at `home`, indexed in `replica`'s store, with the default
    /// caps.
    pub fn new(home: &Path, replica: Replica) -> Self {
        Self {
            dir: home.join(BLOB_DIR),
            replica,
            caps: BlobCaps::default(),
        }
    }

    /// The same store with other caps.
    pub fn with_caps(mut self, caps: BlobCaps) -> Self {
        self.caps = caps;
        self
    }

    /// The caps it keeps.
    pub fn caps(&self) -> BlobCaps {
        self.caps
    }

    /// Where a whole blob's bytes are.
    fn whole(&self, hash: &BlobHash) -> PathBuf {
        self.dir.join(hash.to_string())
    }
    fn whole_outboard(&self, hash: &BlobHash) -> PathBuf {
        self.dir.join(format!("{hash}.obao"))
    }
    fn partial(&self, hash: &BlobHash) -> PathBuf {
        self.dir.join("partial").join(hash.to_string())
    }
    fn partial_outboard(&self, hash: &BlobHash) -> PathBuf {
        self.dir.join("partial").join(format!("{hash}.obao"))
    }
    fn pending_outboard(&self, hash: &BlobHash) -> PathBuf {
        self.dir.join("partial").join(format!("{hash}.obao.part"))
    }
    fn tmp(&self) -> PathBuf {
        self.dir
            .join("tmp")
            .join(format!("{:016x}", rand::random::<u64>()))
    }

    fn ensure_dirs(&self) -> Result<(), BlobError> {
        for d in [
            self.dir.clone(),
            self.dir.join("partial"),
            self.dir.join("tmp"),
        ] {
            fs::create_dir_all(&d).map_err(io_err("creating", &d))?;
        }
        Ok(())
    }

    /// The index entry of a blob.
    pub fn entry(&self, hash: &BlobHash) -> Result<Option<Entry>, BlobError> {
        let key = hash.to_string();
        let raw = self.replica.with_store(|s| {
            s.read_table(BLOBS, |t| {
                Ok(t.get(key.as_str())?.map(|v| v.value().to_vec()))
            })
        })?;
        match raw.flatten() {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| BlobError::Corrupt(e.to_string())),
        }
    }

    fn put_entry(&self, hash: &BlobHash, e: &Entry) -> Result<(), BlobError> {
        let key = hash.to_string();
        let value = serde_json::to_vec(e).map_err(|e| BlobError::Corrupt(e.to_string()))?;
        self.replica.with_store(|s| {
            s.write(|t| {
                t.table(BLOBS)?.insert(key.as_str(), value.as_slice())?;
                Ok::<_, StoreError>(())
            })
        })?;
        Ok(())
    }

    /// Every entry of the index.
    pub fn entries(&self) -> Result<Vec<(BlobHash, Entry)>, BlobError> {
        let raw = self.replica.with_store(|s| {
            s.read_table(BLOBS, |t| {
                let mut out = Vec::new();
                for row in t.iter()? {
                    let (k, v) = row?;
                    out.push((k.value().to_owned(), v.value().to_vec()));
                }
                Ok(out)
            })
        })?;
        raw.unwrap_or_default()
            .into_iter()
            .map(|(k, v)| {
                let hash = k.parse().map_err(|_| BlobError::Corrupt(k.clone()))?;
                let e =
                    serde_json::from_slice(&v).map_err(|e| BlobError::Corrupt(e.to_string()))?;
                Ok((hash, e))
            })
            .collect()
    }

    /// Bytes the home holds or has reserved for fetches.
    pub fn total_bytes(&self) -> Result<u64, BlobError> {
        Ok(self.entries()?.iter().map(|(_, e)| e.size).sum())
    }

    fn check_caps(&self, hash: &BlobHash, size: u64) -> Result<(), BlobError> {
        if size > self.caps.max_blob_bytes() {
            return Err(BlobError::TooLarge {
                size,
                max: self.caps.max_blob_bytes(),
            });
        }
        let others: u64 = self
            .entries()?
            .iter()
            .filter(|(h, _)| h != hash)
            .map(|(_, e)| e.size)
            .sum();
        if others.saturating_add(size) > self.caps.max_total_bytes() {
            return Err(BlobError::StoreFull {
                size,
                max: self.caps.max_total_bytes(),
            });
        }
        Ok(())
    }

    /// The path of a blob held whole, if it is. A blob the index calls whole whose file is
    /// gone or has another size (removed or cut by hand) is forgotten, so that a fetch gets it
    /// again instead of failing on a file that is not there.
    pub fn path(&self, hash: &BlobHash) -> Result<Option<PathBuf>, BlobError> {
        let Some(e) = self.entry(hash)? else {
            return Ok(None);
        };
        if !e.complete {
            return Ok(None);
        }
        let path = self.whole(hash);
        match fs::metadata(&path) {
            Ok(m) if m.len() == e.size => Ok(Some(path)),
            found => {
                tracing::warn!(
                    %hash,
                    path = %path.display(),
                    found = ?found.map(|m| m.len()).map_err(|e| e.kind()),
                    expected = e.size,
                    "a blob held whole is missing or cut on disk; forgetting it so that it is fetched again"
                );
                self.forget(&[*hash])?;
                Ok(None)
            }
        }
    }

    /// Removes blobs from the index, then their files (and outboards).
    fn forget(&self, hashes: &[BlobHash]) -> Result<(), BlobError> {
        if hashes.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = hashes.iter().map(ToString::to_string).collect();
        self.replica.with_store(|s| {
            s.write(|t| {
                let mut table = t.table(BLOBS)?;
                for k in &keys {
                    table.remove(k.as_str())?;
                }
                Ok::<_, StoreError>(())
            })
        })?;
        for hash in hashes {
            for path in [
                self.whole(hash),
                self.whole_outboard(hash),
                self.partial(hash),
                self.partial_outboard(hash),
                self.pending_outboard(hash),
            ] {
                remove_if_there(&path)?;
            }
        }
        Ok(())
    }

    /// Stores a copy of the file at `src`: hashed while copied, synced, renamed into place.
    /// Returns its hash and size.
    pub fn add_file(&self, src: &Path) -> Result<(BlobHash, u64), BlobError> {
        let input = File::open(src).map_err(io_err("opening", src))?;
        self.add_opened(src, input)
    }

    /// Like [`Self::add_file`], for a file written by someone not trusted (a task's
    /// `$ERRAND_OUT`): a symbolic link is refused, never followed, and so is anything but a
    /// regular file.
    pub fn add_regular_file(&self, src: &Path) -> Result<(BlobHash, u64), BlobError> {
        let mut opts = OpenOptions::new();
        opts.read(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
        }
        let input = opts.open(src).map_err(io_err("opening", src))?;
        let meta = input.metadata().map_err(io_err("reading", src))?;
        if !meta.is_file() {
            return Err(BlobError::Io {
                what: "refusing",
                path: src.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        self.add_opened(src, input)
    }

    fn add_opened(&self, src: &Path, mut input: File) -> Result<(BlobHash, u64), BlobError> {
        self.ensure_dirs()?;
        let len = input.metadata().map_err(io_err("reading", src))?.len();
        if len > self.caps.max_blob_bytes() {
            return Err(BlobError::TooLarge {
                size: len,
                max: self.caps.max_blob_bytes(),
            });
        }
        let tmp = self.tmp();
        let result = (|| {
            let mut out = File::create(&tmp).map_err(io_err("creating", &tmp))?;
            let mut builder = OutboardBuilder::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = input.read(&mut buf).map_err(io_err("reading", src))?;
                if n == 0 {
                    break;
                }
                builder.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io_err("writing", &tmp))?;
            }
            out.sync_all().map_err(io_err("syncing", &tmp))?;
            let (hash, size, outboard) = builder.finish();
            let hash = BlobHash::from_bytes(*hash.as_bytes());
            if size > self.caps.max_blob_bytes() {
                return Err(BlobError::TooLarge {
                    size,
                    max: self.caps.max_blob_bytes(),
                });
            }
            if let Some(e) = self.entry(&hash)?
                && e.complete
            {
                return Ok((hash, size));
            }
            self.check_caps(&hash, size)?;
            if !outboard.is_empty() {
                self.write_atomic(&self.whole_outboard(&hash), &outboard)?;
            }
            let dst = self.whole(&hash);
            fs::rename(&tmp, &dst).map_err(io_err("renaming into", &dst))?;
            self.sync_dir()?;
            self.put_entry(
                &hash,
                &Entry {
                    size,
                    complete: true,
                    verified_upto: size,
                },
            )?;
            Ok((hash, size))
        })();
        let _ = fs::remove_file(&tmp);
        result
    }

    fn write_atomic(&self, dst: &Path, bytes: &[u8]) -> Result<(), BlobError> {
        let tmp = self.tmp();
        let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
        f.write_all(bytes).map_err(io_err("writing", &tmp))?;
        f.sync_all().map_err(io_err("syncing", &tmp))?;
        fs::rename(&tmp, dst).map_err(io_err("renaming into", dst))
    }

    fn sync_dir(&self) -> Result<(), BlobError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing", &self.dir))
    }

    /// Reads a range of a blob held whole (its bytes or its outboard). Returns the blob's
    /// size and the bytes.
    pub fn read(
        &self,
        hash: &BlobHash,
        what: What,
        offset: u64,
        len: u32,
    ) -> Result<(u64, Vec<u8>), BlobError> {
        let mut reader = self.open_reader(hash, what)?;
        let bytes = reader.read_at(offset, u64::from(len))?;
        Ok((reader.blob_size(), bytes))
    }

    /// Opens a whole blob (`Data`) or its outboard for reading ranges; `Missing` unless the
    /// blob is held whole. A server keeps one open for a stream instead of looking the blob
    /// up and opening it for each range.
    pub fn open_reader(&self, hash: &BlobHash, what: What) -> Result<BlobReader, BlobError> {
        let e = match self.entry(hash)? {
            Some(e) if e.complete => e,
            _ => return Err(BlobError::Missing(*hash)),
        };
        let (path, total) = match what {
            What::Data => (self.whole(hash), e.size),
            What::Outboard => (self.whole_outboard(hash), tree::outboard_len(e.size)),
        };
        let file = if total > 0 {
            Some(File::open(&path).map_err(io_err("opening", &path))?)
        } else {
            None
        };
        Ok(BlobReader {
            file,
            path,
            total,
            blob_size: e.size,
        })
    }

    /// Removes every blob, whole or partial, whose hash is not in `keep`: its index row first,
    /// then its files (and outboards). Then removes files that no index row names (a crash
    /// between the two), and temporary files older than an hour.
    pub fn retain(
        &self,
        keep: &std::collections::HashSet<BlobHash>,
    ) -> Result<Collected, BlobError> {
        let mut out = Collected::default();
        let gone: Vec<(BlobHash, Entry)> = self
            .entries()?
            .into_iter()
            .filter(|(h, _)| !keep.contains(h))
            .collect();
        let hashes: Vec<BlobHash> = gone.iter().map(|(h, _)| *h).collect();
        self.forget(&hashes)?;
        for (_, e) in &gone {
            out.blobs += 1;
            out.bytes += e.size;
        }
        let indexed: std::collections::HashSet<BlobHash> =
            self.entries()?.into_iter().map(|(h, _)| h).collect();
        for dir in [self.dir.clone(), self.dir.join("partial")] {
            let Ok(list) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in list.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let stem = name
                    .strip_suffix(".obao.part")
                    .or_else(|| name.strip_suffix(".obao"))
                    .unwrap_or(&name);
                let Ok(hash) = stem.parse::<BlobHash>() else {
                    continue; // `partial/`, `tmp/`, or not ours
                };
                if !indexed.contains(&hash) && entry.file_type().is_ok_and(|t| t.is_file()) {
                    remove_if_there(&entry.path())?;
                    out.strays += 1;
                }
            }
        }
        if let Ok(list) = fs::read_dir(self.dir.join("tmp")) {
            for entry in list.flatten() {
                let stale = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > STALE_TMP);
                if stale {
                    remove_if_there(&entry.path())?;
                }
            }
        }
        Ok(out)
    }

    /// Starts or resumes receiving a blob of `size` bytes: reserves its size against the
    /// caps and cuts its partial file back to the verified prefix.
    pub fn receive(&self, hash: BlobHash, size: u64) -> Result<Partial, BlobError> {
        self.ensure_dirs()?;
        let entry = match self.entry(&hash)? {
            Some(e) if e.size != size => {
                return Err(BlobError::Size {
                    got: size,
                    expected: e.size,
                });
            }
            Some(e) => e,
            None => {
                self.check_caps(&hash, size)?;
                let e = Entry {
                    size,
                    complete: false,
                    verified_upto: 0,
                };
                self.put_entry(&hash, &e)?;
                e
            }
        };
        let path = self.partial(&hash);
        if !entry.complete {
            let f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&path)
                .map_err(io_err("opening", &path))?;
            f.set_len(entry.verified_upto)
                .map_err(io_err("truncating", &path))?;
        }
        let verifier = if entry.complete {
            None
        } else if size <= tree::GROUP {
            Some(Verifier::new(*hash.as_bytes(), size, Vec::new())?)
        } else {
            // A stored outboard was verified before it was stored; check it again anyway (it
            // is small), and fetch it again if it does not hold up.
            fs::read(self.partial_outboard(&hash))
                .ok()
                .and_then(|o| Verifier::new(*hash.as_bytes(), size, o).ok())
        };
        let mut partial = Partial {
            store: self.clone(),
            hash,
            committed: entry.verified_upto,
            committed_at: std::time::Instant::now(),
            entry,
            verifier,
            file: None,
        };
        partial.recheck()?;
        Ok(partial)
    }
}

fn remove_if_there(path: &Path) -> Result<(), BlobError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(BlobError::Io {
            what: "removing",
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
