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
    io::{self, Read, Seek, SeekFrom, Write},
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

/// Default largest blob a home stores or fetches (`max_blob_bytes`). 1 GiB holds a video clip or a disk image of a
/// small project; larger files belong in a shared folder, not in a phone's queue.
pub const MAX_BLOB_BYTES: u64 = 1 << 30;

/// Default for the most bytes of blobs one home holds, whole or partial
/// (`max_blob_storage_bytes`). 10 GiB leaves room for a few
/// hundred phone photos and their results without filling a laptop's disk unnoticed.
pub const MAX_TOTAL_BYTES: u64 = 10 << 30;

/// The caps a home's blob store keeps: a setting on each device (the desktop's config.toml,
/// the phone's daemon flags), [`MAX_BLOB_BYTES`] and [`MAX_TOTAL_BYTES`] by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobCaps {
    /// Largest blob stored or fetched.
    max_blob_bytes: u64,
    /// Most bytes of blobs the home holds, whole or partial.
    max_total_bytes: u64,
}

/// Why caps were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapsError {
    /// A cap of zero would refuse every file.
    #[error("{what} must be at least 1 byte")]
    Zero {
        /// Which cap.
        what: &'static str,
    },
    /// A file at the per-file cap could never be stored.
    #[error(
        "max_blob_bytes ({max_blob_bytes}) is over max_blob_storage_bytes ({max_total_bytes}): \
         a file that large could never be stored"
    )]
    BlobOverTotal {
        /// The per-file cap.
        max_blob_bytes: u64,
        /// The storage cap.
        max_total_bytes: u64,
    },
}

impl BlobCaps {
    /// Checked caps: both at least one byte, the per-file cap within the storage cap.
    pub fn new(max_blob_bytes: u64, max_total_bytes: u64) -> Result<Self, CapsError> {
        if max_blob_bytes == 0 {
            return Err(CapsError::Zero {
                what: "max_blob_bytes",
            });
        }
        if max_total_bytes == 0 {
            return Err(CapsError::Zero {
                what: "max_blob_storage_bytes",
            });
        }
        if max_blob_bytes > max_total_bytes {
            return Err(CapsError::BlobOverTotal {
                max_blob_bytes,
                max_total_bytes,
            });
        }
        Ok(Self {
            max_blob_bytes,
            max_total_bytes,
        })
    }

    /// Largest blob stored or fetched.
    pub fn max_blob_bytes(&self) -> u64 {
        self.max_blob_bytes
    }

    /// Most bytes of blobs the home holds.
    pub fn max_total_bytes(&self) -> u64 {
        self.max_total_bytes
    }
}

impl Default for BlobCaps {
    fn default() -> Self {
        Self {
            max_blob_bytes: MAX_BLOB_BYTES,
            max_total_bytes: MAX_TOTAL_BYTES,
        }
    }
}

/// The folder of a home's blobs.
pub const BLOB_DIR: &str = "blobs";

/// Verified bytes a fetch writes at least between two commits of its verified offset (an
/// fsync of the partial file and a redb commit), and [`COMMIT_INTERVAL`] the least time: on a
/// slow link one commit per MiB, on a fast one four a second (each costs a few milliseconds
/// of disk, which once per MiB took half the time of a transfer on loopback). A crash
/// re-fetches what came since (the larger of a MiB and a quarter second's worth); what is
/// committed was synced first, so it is never corrupt. A fetch that stops commits all.
pub const COMMIT_EVERY: u64 = 1 << 20;

/// The least time between two commits of a fetch's verified offset (see [`COMMIT_EVERY`]).
pub const COMMIT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

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
        if size > self.caps.max_blob_bytes {
            return Err(BlobError::TooLarge {
                size,
                max: self.caps.max_blob_bytes,
            });
        }
        let others: u64 = self
            .entries()?
            .iter()
            .filter(|(h, _)| h != hash)
            .map(|(_, e)| e.size)
            .sum();
        if others.saturating_add(size) > self.caps.max_total_bytes {
            return Err(BlobError::StoreFull {
                size,
                max: self.caps.max_total_bytes,
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
        if len > self.caps.max_blob_bytes {
            return Err(BlobError::TooLarge {
                size: len,
                max: self.caps.max_blob_bytes,
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
            if size > self.caps.max_blob_bytes {
                return Err(BlobError::TooLarge {
                    size,
                    max: self.caps.max_blob_bytes,
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
        Ok(Partial {
            store: self.clone(),
            hash,
            committed: entry.verified_upto,
            committed_at: std::time::Instant::now(),
            entry,
            verifier,
            file: None,
        })
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

/// A whole blob, or its outboard, open for reading ranges (see [`BlobStore::open_reader`]).
/// The files of a whole blob never change, so the handle stays good while it is held, even
/// past a garbage collection that unlinks it.
#[derive(Debug)]
pub struct BlobReader {
    /// `None` when there is nothing to read (an empty blob, or the outboard of a blob of one
    /// group).
    file: Option<File>,
    path: PathBuf,
    /// Bytes of what was opened (the blob, or its outboard).
    total: u64,
    /// Bytes of the blob.
    blob_size: u64,
}

impl BlobReader {
    /// Bytes of what was opened: the blob's, or its outboard's.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes of the blob.
    pub fn blob_size(&self) -> u64 {
        self.blob_size
    }

    /// Reads `len` bytes at `offset`; `Range` if that passes the end.
    pub fn read_at(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, BlobError> {
        if offset.checked_add(len).is_none_or(|end| end > self.total) {
            return Err(BlobError::Range {
                offset,
                len,
                size: self.total,
            });
        }
        let mut buf = vec![0u8; len as usize];
        if let Some(f) = self.file.as_mut().filter(|_| len > 0) {
            f.seek(SeekFrom::Start(offset))
                .map_err(io_err("reading", &self.path))?;
            f.read_exact(&mut buf)
                .map_err(io_err("reading", &self.path))?;
        }
        Ok(buf)
    }
}

/// A blob being received. Bytes are appended only in verified groups, in order; the
/// verified offset is committed every [`COMMIT_EVERY`] bytes, at the end, and on
/// [`Partial::flush`].
#[derive(Debug)]
pub struct Partial {
    store: BlobStore,
    hash: BlobHash,
    entry: Entry,
    verifier: Option<Verifier>,
    /// The partial file, open for appending.
    file: Option<File>,
    /// The verified offset the index holds.
    committed: u64,
    /// When it was last committed.
    committed_at: std::time::Instant,
}

impl Partial {
    /// True once the blob is whole and in place.
    pub fn is_complete(&self) -> bool {
        self.entry.complete
    }

    /// Bytes verified so far.
    pub fn verified_upto(&self) -> u64 {
        self.entry.verified_upto
    }

    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.entry.size
    }

    /// True when the outboard still has to be fetched.
    pub fn needs_outboard(&self) -> bool {
        !self.entry.complete && self.verifier.is_none()
    }

    /// The outboard bytes received so far by earlier fetches (a relay circuit may carry less
    /// than a whole outboard), not checked yet: [`Self::set_outboard`] checks them whole.
    pub fn outboard_received(&self) -> Vec<u8> {
        fs::read(self.store.pending_outboard(&self.hash)).unwrap_or_default()
    }

    /// Keeps a piece of the outboard that follows what was received so far.
    pub fn keep_outboard_piece(&self, bytes: &[u8]) -> Result<(), BlobError> {
        let path = self.store.pending_outboard(&self.hash);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        f.write_all(bytes).map_err(io_err("writing", &path))
    }

    /// Takes the whole outboard: checked against the hash, stored, or refused. The pieces
    /// kept so far are dropped either way.
    pub fn set_outboard(&mut self, outboard: Vec<u8>) -> Result<(), BlobError> {
        let _ = fs::remove_file(self.store.pending_outboard(&self.hash));
        let v = Verifier::new(*self.hash.as_bytes(), self.entry.size, outboard)?;
        self.store
            .write_atomic(&self.store.partial_outboard(&self.hash), v.outboard())?;
        self.verifier = Some(v);
        Ok(())
    }

    /// Appends the bytes at the verified offset, after checking each group: nothing of a
    /// range with a bad group past the good ones is written, and the verified offset moves
    /// over the good ones only. Returns how many bytes were appended.
    pub fn append(&mut self, bytes: &[u8]) -> Result<u64, BlobError> {
        let Some(v) = &self.verifier else {
            return Err(BlobError::Verify(tree::VerifyError::Outboard));
        };
        let start = self.entry.verified_upto;
        let mut good = 0usize;
        let mut failure = None;
        let mut index = start / tree::GROUP;
        while good < bytes.len() || (self.entry.size == 0 && index == 0) {
            let len = tree::group_len(self.entry.size, index) as usize;
            let piece = &bytes[good..(good + len).min(bytes.len())];
            if let Err(e) = v.check_group(index, piece) {
                failure = Some(e);
                break;
            }
            good += len;
            index += 1;
            if self.entry.size == 0 {
                break;
            }
        }
        if good > 0 {
            let path = self.store.partial(&self.hash);
            let mut f = match self.file.take() {
                Some(f) => f,
                None => OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err("opening", &path))?,
            };
            f.seek(SeekFrom::Start(start))
                .map_err(io_err("writing", &path))?;
            f.write_all(&bytes[..good])
                .map_err(io_err("writing", &path))?;
            self.file = Some(f);
            self.entry.verified_upto = start + good as u64;
            if self.entry.verified_upto - self.committed >= COMMIT_EVERY
                && self.committed_at.elapsed() >= COMMIT_INTERVAL
            {
                self.commit()?;
            }
        }
        if self.entry.verified_upto == self.entry.size && failure.is_none() {
            self.finish()?;
        }
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(good as u64),
        }
    }

    /// Makes the verified offset durable: syncs the partial file, then records the offset.
    fn commit(&mut self) -> Result<(), BlobError> {
        if let Some(f) = &self.file {
            f.sync_data()
                .map_err(io_err("syncing", &self.store.partial(&self.hash)))?;
        }
        self.store.put_entry(&self.hash, &self.entry)?;
        self.committed = self.entry.verified_upto;
        self.committed_at = std::time::Instant::now();
        Ok(())
    }

    /// Commits what was verified since the last commit (a fetch that stops calls it, so the
    /// next one resumes from the last verified group, not the last MiB).
    pub fn flush(&mut self) -> Result<(), BlobError> {
        if !self.entry.complete && self.entry.verified_upto > self.committed {
            self.commit()?;
        }
        Ok(())
    }

    /// Checks the whole file once more, then moves it (and its outboard) into place.
    fn finish(&mut self) -> Result<(), BlobError> {
        if let Some(f) = self.file.take() {
            f.sync_data()
                .map_err(io_err("syncing", &self.store.partial(&self.hash)))?;
        }
        let path = self.store.partial(&self.hash);
        let mut f = File::open(&path).map_err(io_err("opening", &path))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = f.read(&mut buf).map_err(io_err("reading", &path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        if hasher.finalize().as_bytes() != self.hash.as_bytes() {
            // Written verified, read back different: the disk changed it. Start over.
            self.entry.verified_upto = 0;
            self.store.put_entry(&self.hash, &self.entry)?;
            self.committed = 0;
            let _ = fs::remove_file(&path);
            return Err(BlobError::Verify(tree::VerifyError::Group(0)));
        }
        if self.entry.size > tree::GROUP {
            let o = self.store.partial_outboard(&self.hash);
            let dst = self.store.whole_outboard(&self.hash);
            fs::rename(&o, &dst).map_err(io_err("renaming into", &dst))?;
        }
        let dst = self.store.whole(&self.hash);
        fs::rename(&path, &dst).map_err(io_err("renaming into", &dst))?;
        self.store.sync_dir()?;
        self.entry.complete = true;
        self.store.put_entry(&self.hash, &self.entry)?;
        self.committed = self.entry.verified_upto;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use errand_crdt::Store;

    use super::*;

    fn store(dir: &Path) -> BlobStore {
        let replica = Replica::open(Store::open(dir).unwrap()).unwrap();
        BlobStore::new(dir, replica)
    }

    fn add(s: &BlobStore, dir: &Path, name: &str, len: usize) -> BlobHash {
        let src = dir.join(name);
        fs::write(&src, vec![name.as_bytes()[0]; len]).unwrap();
        s.add_file(&src).unwrap().0
    }

    #[test]
    fn caps_are_checked_when_made_and_kept_when_storing() {
        assert!(matches!(BlobCaps::new(0, 10), Err(CapsError::Zero { .. })));
        assert!(matches!(
            BlobCaps::new(11, 10),
            Err(CapsError::BlobOverTotal { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).with_caps(BlobCaps::new(100_000, 150_000).unwrap());
        add(&s, dir.path(), "a", 90_000);
        let big = dir.path().join("big");
        fs::write(&big, vec![1u8; 100_001]).unwrap();
        assert!(matches!(
            s.add_file(&big),
            Err(BlobError::TooLarge { max: 100_000, .. })
        ));
        let more = dir.path().join("more");
        fs::write(&more, vec![2u8; 90_000]).unwrap();
        assert!(matches!(
            s.add_file(&more),
            Err(BlobError::StoreFull { max: 150_000, .. })
        ));
    }

    #[test]
    fn retain_removes_unkept_blobs_partials_and_strays_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let kept = add(&s, dir.path(), "k", 40_000);
        let dropped = add(&s, dir.path(), "d", 40_000);
        // A partial blob: reserved and cut to its verified prefix, never finished.
        let partial = BlobHash::from_bytes(*blake3::hash(b"never finished").as_bytes());
        s.receive(partial, 50_000).unwrap();
        // A file no index row names (a crash between removing the row and the file).
        let stray = dir
            .path()
            .join(BLOB_DIR)
            .join(blake3::hash(b"x").to_hex().as_str());
        fs::write(&stray, b"x").unwrap();

        let done = s.retain(&HashSet::from([kept])).unwrap();
        assert_eq!(
            done,
            Collected {
                blobs: 2,
                bytes: 90_000,
                strays: 1
            }
        );
        assert!(s.path(&kept).unwrap().is_some_and(|p| p.exists()));
        assert!(s.entry(&dropped).unwrap().is_none());
        assert!(s.entry(&partial).unwrap().is_none());
        assert!(!s.whole(&dropped).exists() && !s.whole_outboard(&dropped).exists());
        assert!(!s.partial(&partial).exists() && !stray.exists());
        // Nothing left to remove the second time.
        assert_eq!(
            s.retain(&HashSet::from([kept])).unwrap(),
            Collected::default()
        );
    }

    #[test]
    fn a_whole_blob_removed_or_cut_on_disk_is_forgotten_so_it_can_be_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let removed = add(&s, dir.path(), "r", 40_000);
        let cut = add(&s, dir.path(), "c", 40_000);
        let kept = add(&s, dir.path(), "k", 40_000);
        fs::remove_file(s.whole(&removed)).unwrap();
        OpenOptions::new()
            .write(true)
            .open(s.whole(&cut))
            .unwrap()
            .set_len(1_000)
            .unwrap();

        assert_eq!(s.path(&removed).unwrap(), None);
        assert_eq!(s.path(&cut).unwrap(), None);
        assert!(s.entry(&removed).unwrap().is_none() && s.entry(&cut).unwrap().is_none());
        assert!(!s.whole(&cut).exists() && !s.whole_outboard(&cut).exists());
        assert_eq!(s.path(&kept).unwrap(), Some(s.whole(&kept)));
        // Forgotten, the blob is received again from the start.
        assert_eq!(s.receive(removed, 40_000).unwrap().verified_upto(), 0);
    }
}
