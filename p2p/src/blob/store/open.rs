//! A blob open for reading ranges ([`BlobReader`]) and a blob being received ([`Partial`]).

use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::PathBuf,
};

use errand_core::BlobHash;

use super::{BlobError, BlobStore, COMMIT_EVERY, COMMIT_INTERVAL, Entry, io_err};
use crate::blob::tree::{self, Verifier};

/// A whole blob, or its outboard, open for reading ranges (see [`BlobStore::open_reader`]).
/// The files of a whole blob never change, so the handle stays good while it is held, even
/// past a garbage collection that unlinks it.
#[derive(Debug)]
pub struct BlobReader {
    /// `None` when there is nothing to read (an empty blob, or the outboard of a blob of one
    /// group).
    pub(super) file: Option<File>,
    pub(super) path: PathBuf,
    /// Bytes of what was opened (the blob, or its outboard).
    pub(super) total: u64,
    /// Bytes of the blob.
    pub(super) blob_size: u64,
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
        let mut buf = Vec::new();
        self.read_into(offset, len, &mut buf)?;
        Ok(buf)
    }

    /// [`Self::read_at`] into `buf` (its contents replaced), reusing its allocation: a server
    /// reads ahead into the same buffer for every window of a fetch.
    pub fn read_into(&mut self, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<(), BlobError> {
        if offset.checked_add(len).is_none_or(|end| end > self.total) {
            return Err(BlobError::Range {
                offset,
                len,
                size: self.total,
            });
        }
        buf.resize(len as usize, 0);
        if let Some(f) = self.file.as_mut().filter(|_| len > 0) {
            f.seek(SeekFrom::Start(offset))
                .map_err(io_err("reading", &self.path))?;
            f.read_exact(buf).map_err(io_err("reading", &self.path))?;
        }
        Ok(())
    }
}

/// A blob being received. Bytes are appended only in verified groups, in order; the
/// verified offset is committed every [`COMMIT_EVERY`] bytes, at the end, and on
/// [`Partial::flush`].
#[derive(Debug)]
pub struct Partial {
    pub(super) store: BlobStore,
    pub(super) hash: BlobHash,
    pub(super) entry: Entry,
    pub(super) verifier: Option<Verifier>,
    /// The partial file, open for appending.
    pub(super) file: Option<File>,
    /// The verified offset the index holds.
    pub(super) committed: u64,
    /// When it was last committed.
    pub(super) committed_at: std::time::Instant,
}

/// Asks the kernel to start writing `len` bytes at `offset` to disk, without waiting: the
/// sync when the blob is whole then waits for the last of them only (a 100 MiB fetch spent
/// 40 to 50 ms, a sixth of its time, in that sync when nothing had been written back yet).
/// `POSIX_FADV_DONTNEED` starts the writeback of dirty pages and leaves pages under writeback
/// in the cache. An error only means no head start.
fn start_writeback(f: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        let _ = posix_fadvise(f, offset, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (f, offset, len);
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
        self.recheck()
    }

    /// Checks again, group by group, the verified prefix that an earlier process left on
    /// disk, and cuts it back to its last good group: the file may have changed while no one
    /// held it, and nothing reads the whole blob back at the end. Done when a partial blob is
    /// reopened and when its outboard arrives; a fresh fetch has no prefix to check.
    pub(super) fn recheck(&mut self) -> Result<(), BlobError> {
        let Some(v) = &self.verifier else {
            return Ok(());
        };
        let upto = self.entry.verified_upto;
        if upto == 0 || self.entry.complete {
            return Ok(());
        }
        let path = self.store.partial(&self.hash);
        let mut good = 0u64;
        if let Ok(mut f) = File::open(&path) {
            let mut buf = vec![0u8; tree::GROUP as usize];
            let mut index = 0u64;
            while good < upto {
                let len = tree::group_len(self.entry.size, index).min(upto - good) as usize;
                if f.read_exact(&mut buf[..len]).is_err()
                    || v.check_group(index, &buf[..len]).is_err()
                {
                    break;
                }
                good += len as u64;
                index += 1;
            }
        }
        if good < upto {
            tracing::warn!(blob = %self.hash, verified = upto, good, "a partial blob changed on disk; fetching it again from its last good group");
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err("opening", &path))?;
            f.set_len(good).map_err(io_err("truncating", &path))?;
            self.entry.verified_upto = good;
            self.store.put_entry(&self.hash, &self.entry)?;
            self.committed = good;
        }
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
            start_writeback(&f, start, good as u64);
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

    /// Moves the file (and its outboard) into place, synced. Every group was checked before
    /// it was written, and a prefix left by an earlier process is checked again when it is
    /// reopened ([`Self::recheck`]): reading the whole file back here cost a fetch of 100 MiB
    /// about a sixth of its time.
    fn finish(&mut self) -> Result<(), BlobError> {
        if let Some(f) = self.file.take() {
            f.sync_data()
                .map_err(io_err("syncing", &self.store.partial(&self.hash)))?;
        }
        let path = self.store.partial(&self.hash);
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
