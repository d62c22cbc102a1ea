//! The durable store of one home: one redb file, owned by one process at a time.
//!
//! - Documents: an optional compacted `save()` snapshot plus incremental change chunks, keyed
//!   by document id. A commit appends its chunk in the same transaction that acknowledges it.
//! - Per-peer sync states, keyed by (document id, peer), written with the changes they describe.
//! - Trusted peers, and small named values (`meta`): the device's Automerge actor, its node
//!   identity, the thread's genesis, secrets. The other crates' tables are declared with
//!   these in [`crate::tables`] and reached through [`StoreTxn::table`] and
//!   [`Store::read_table`].
//! - Each failure names the operation that failed ([`StoreError`]: begin, table, storage,
//!   commit), as redb's own errors do.
//! - A failed write to the disk (a full disk: ENOSPC) leaves redb's handle failing every later
//!   operation ("Previous I/O error occurred"). The store then closes it and opens the file
//!   again, which recovers the last committed state, so the peer goes on once the disk has
//!   room ([`Store::reopen`]).

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock},
};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::DocId;

use crate::tables::{CHUNKS, META, SNAPSHOTS, SYNC_STATES, TRUSTED};

/// The store's file name inside a home.
pub const STORE_FILE: &str = "errand.redb";

/// redb's page cache. Its default is 1 GiB; a phone cannot spare that, and a thread's working
/// set (one document plus a few sync states) fits in a few MiB.
const CACHE_BYTES: usize = 32 << 20;

/// Compact once incremental chunks exceed this many bytes *and* the snapshot's size. Chunks
/// are uncompressed and carry per-change overhead (about 15x a compacted save, measured in the
/// dependency notes), so this keeps the file within a small multiple of the document.
pub(crate) const COMPACT_MIN_CHUNK_BYTES: u64 = 256 * 1024;

/// Why the store could not do something.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the home.
    #[error("the home {0} is in use by another Errand process")]
    Locked(PathBuf),
    /// The home directory could not be created or read.
    #[error("cannot use the home directory {path}: {source}")]
    Home {
        /// The home.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database file is damaged or unreadable.
    #[error("the store in {path} cannot be opened: {source}")]
    Open {
        /// The home.
        path: PathBuf,
        /// Why.
        #[source]
        source: redb::DatabaseError,
    },
    /// A transaction could not begin.
    #[error("the store could not begin a transaction: {0}")]
    Begin(#[from] redb::TransactionError),
    /// A table could not be opened.
    #[error("the store could not open a table: {0}")]
    Table(#[from] redb::TableError),
    /// Reading or writing a table failed (the file, or the disk under it).
    #[error("the store could not read or write: {0}")]
    Storage(#[from] redb::StorageError),
    /// A transaction could not commit: nothing of it is stored.
    #[error("the store could not commit: {0}")]
    Commit(#[from] redb::CommitError),
    /// A transaction's durability could not be set.
    #[error("the store could not set a transaction's durability: {0}")]
    Durability(#[from] redb::SetDurabilityError),
    /// The store's file failed earlier and could not be opened again yet (the disk may
    /// still be full); each later operation tries again.
    #[error("the store failed and could not be opened again: {0}")]
    Reopen(#[source] redb::DatabaseError),
    /// A stored record did not decode.
    #[error("stored record {what} is corrupt: {why}")]
    Corrupt {
        /// Which record.
        what: String,
        /// Why.
        why: String,
    },
}

/// A peer this home trusts, with what it knows of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedPeer {
    /// The peer's PeerId.
    pub id: errand_core::DeviceId,
    /// Its name, as it told us.
    pub name: String,
    /// Desktop or phone.
    pub kind: errand_core::DeviceKind,
    /// Addresses to dial it at (configured, or remembered from the last session).
    pub addrs: Vec<String>,
    /// When trust was granted.
    pub paired_at: i64,
    /// When we last had a connection to it.
    pub last_seen: Option<i64>,
    /// When we last were in sync with it.
    pub last_sync_at: Option<i64>,
    /// Revoked peers are refused.
    pub revoked: bool,
}

/// A document as stored: the snapshot (if any) followed by its chunks, in order.
#[derive(Debug, Default)]
pub struct LoadedDoc {
    /// The compacted snapshot, if one was written.
    pub snapshot: Option<Vec<u8>>,
    /// Incremental chunks since the snapshot.
    pub chunks: Vec<Vec<u8>>,
}

impl LoadedDoc {
    /// Snapshot then chunks, ready for [`crate::ThreadDoc::load`].
    pub fn parts(&self) -> impl Iterator<Item = &[u8]> {
        self.snapshot
            .iter()
            .map(Vec::as_slice)
            .chain(self.chunks.iter().map(Vec::as_slice))
    }
    /// True if nothing is stored for the document.
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none() && self.chunks.is_empty()
    }
    /// Total stored bytes.
    pub fn bytes(&self) -> u64 {
        self.parts().map(|p| p.len() as u64).sum()
    }
}

/// Opens the store's database again (see [`Store::reopen`]).
type Opener = Arc<dyn Fn() -> Result<Database, redb::DatabaseError> + Send + Sync>;

/// The durable store of one home.
pub struct Store {
    /// The open database; `None` only while opening it again after a failure did not work.
    db: RwLock<Option<Database>>,
    /// How to open it again after an I/O error (the same file, or the same image).
    opener: Opener,
    home: PathBuf,
    /// The store is a file in `home`, recorded in its holder file (not an in-memory image).
    on_disk: bool,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("home", &self.home).finish()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Before `db` closes and releases the lock, so a record never outlives its holder.
        if self.on_disk {
            crate::holder::clear(&self.home);
        }
    }
}

/// Store key of the file's length right after its last compaction (8 bytes, big-endian).
const META_COMPACTED_LEN: &str = "store_compacted_len";

/// A file smaller than this is never compacted, and one must grow by at least this much (and
/// to twice its compacted length) before it is compacted again.
const COMPACT_MIN_BYTES: u64 = 1 << 20;

/// Gives the file's free pages back once it has grown a lot. redb reuses free pages but never
/// shrinks its file by itself, and a thread's writes (chunks compacted into snapshots, index
/// updates) leave about as many free pages as live ones: the 20,000-task desktop home of the
/// benchmark was 3.7 MB on disk, 1.9 MB of it free, and 2.1 MB after this (in milliseconds).
///
/// Deciding must not read the file: redb's statistics walk every page (the large phone home's
/// idle memory grew by 5 MB from it). So the length after the last compaction is kept in the
/// store, and the file is compacted when it is twice that (or has none recorded). Compacting
/// reads every page into redb's cache, so the database is opened afresh after it. Done at open,
/// before anything else uses the file; a failed compaction leaves the file as it was and is
/// only logged.
fn compact_if_grown(
    mut db: Database,
    path: &Path,
    opener: &Opener,
) -> Result<Database, redb::DatabaseError> {
    let len = std::fs::metadata(path).map_or(0, |m| m.len());
    if len < COMPACT_MIN_BYTES {
        return Ok(db);
    }
    let last = (|| {
        let bytes = db
            .begin_read()
            .ok()?
            .open_table(META)
            .ok()?
            .get(META_COMPACTED_LEN)
            .ok()??;
        Some(u64::from_be_bytes(bytes.value().try_into().ok()?))
    })();
    if last.is_some_and(|l| len < l.saturating_mul(2).max(l.saturating_add(COMPACT_MIN_BYTES))) {
        return Ok(db);
    }
    if let Err(e) = db.compact() {
        tracing::warn!(path = %path.display(), error = %e, "could not compact the store");
        return Ok(db);
    }
    let after = std::fs::metadata(path).map_or(len, |m| m.len());
    let recorded = db.begin_write().map_err(redb::Error::from).and_then(|tx| {
        tx.open_table(META)?
            .insert(META_COMPACTED_LEN, &after.to_be_bytes()[..])?;
        tx.commit()?;
        Ok(())
    });
    if let Err(e) = recorded {
        tracing::warn!(path = %path.display(), error = %e, "could not record the store's compaction");
    }
    tracing::debug!(path = %path.display(), before = len, after, "compacted the store");
    // Dropped first: the file's lock must be released before it is opened again.
    drop(db);
    opener()
}

impl Store {
    /// Opens or creates the store in `home`, taking the home's single-owner lock, and records
    /// this process as its holder ([`crate::holder`]).
    pub fn open(home: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(home).map_err(|source| StoreError::Home {
            path: home.to_owned(),
            source,
        })?;
        restrict_dir(home);
        let path = home.join(STORE_FILE);
        let opener: Opener = {
            let path = path.clone();
            Arc::new(move || {
                Database::builder()
                    .set_cache_size(CACHE_BYTES)
                    .create(&path)
            })
        };
        let opened = |e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked(home.to_owned()),
            source => StoreError::Open {
                path: home.to_owned(),
                source,
            },
        };
        let db = opener().map_err(opened)?;
        // Before the holder is recorded: another process may take the home while the file is
        // opened again after a compaction (this one then finds it locked, and waits).
        let db = compact_if_grown(db, &path, &opener).map_err(opened)?;
        restrict_file(&path);
        crate::holder::record(home);
        Self::with_tables(db, opener, home.to_owned(), true)
    }

    /// Opens a store kept in memory, in `image` (empty for a new store). A store opened again
    /// over the same image sees exactly what was committed before, as a restarted process
    /// sees its file: tests of the engine restart peers this way, with no disk.
    pub fn in_memory(image: &MemoryImage) -> Result<Self, StoreError> {
        Self::over_backend(image.clone())
    }

    /// Opens a store over any redb backend that a clone opens again as it stands (as
    /// [`MemoryImage`] does): for tests that make the storage fail on purpose.
    pub fn over_backend<B>(backend: B) -> Result<Self, StoreError>
    where
        B: redb::StorageBackend + Clone,
    {
        let opener: Opener = Arc::new(move || {
            Database::builder()
                .set_cache_size(CACHE_BYTES)
                .create_with_backend(backend.clone())
        });
        let db = opener().map_err(|source| StoreError::Open {
            path: PathBuf::from("<memory>"),
            source,
        })?;
        Self::with_tables(db, opener, PathBuf::new(), false)
    }

    fn with_tables(
        db: Database,
        opener: Opener,
        home: PathBuf,
        on_disk: bool,
    ) -> Result<Self, StoreError> {
        // Created once: a home that has them is not written to (a durable commit, an fsync,
        // on every open of every command).
        let present = {
            let rx = db.begin_read()?;
            rx.open_table(SNAPSHOTS).is_ok()
                && rx.open_table(CHUNKS).is_ok()
                && rx.open_table(SYNC_STATES).is_ok()
                && rx.open_table(META).is_ok()
                && rx.open_table(TRUSTED).is_ok()
        };
        if !present {
            let tx = db.begin_write()?;
            {
                tx.open_table(SNAPSHOTS)?;
                tx.open_table(CHUNKS)?;
                tx.open_table(SYNC_STATES)?;
                tx.open_table(META)?;
                tx.open_table(TRUSTED)?;
            }
            tx.commit()?;
        }
        Ok(Self {
            db: RwLock::new(Some(db)),
            opener,
            home,
            on_disk,
        })
    }

    /// Runs `f` on the database. After an error, if redb's handle has failed for good (a
    /// write to the disk failed: it then answers every operation with "Previous I/O error
    /// occurred"), the store is opened again at once, so the next operation finds the last
    /// committed state instead of the same error. The error itself is still returned: what
    /// `f` did is not stored.
    fn with_db<T, E>(&self, f: impl FnOnce(&Database) -> Result<T, E>) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        let closed = self
            .db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none();
        if closed {
            self.reopen()?;
        }
        let (result, failed) = {
            let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
            let Some(db) = db.as_ref() else {
                return Err(StoreError::Reopen(redb::DatabaseError::DatabaseAlreadyOpen).into());
            };
            let result = f(db);
            let failed = result.is_err() && has_failed(db);
            (result, failed)
        };
        if failed && let Err(e) = self.reopen() {
            tracing::error!(home = %self.home.display(), error = %e, "the store failed and could not be opened again; trying again on the next operation");
        }
        result
    }

    /// Closes the database and opens it again, if it has failed (or is closed): redb then
    /// recovers the last committed state from the file. Called by every operation that finds
    /// the database failed; public for tests.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut db = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if db.as_ref().is_some_and(|d| !has_failed(d)) {
            return Ok(());
        }
        // Dropped first: the file's lock must be released before it is opened again.
        drop(db.take());
        let opened = (self.opener)().map_err(StoreError::Reopen)?;
        *db = Some(opened);
        tracing::warn!(home = %self.home.display(), "the store had failed (a write to the disk failed); opened it again at its last committed state");
        Ok(())
    }

    /// The home directory.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Runs `f` in one write transaction and commits it durably. If `f` fails nothing is kept.
    pub fn write<T, E>(&self, f: impl FnOnce(&mut StoreTxn<'_>) -> Result<T, E>) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        self.write_with(Durability::Immediate, f)
    }

    /// Like [`Self::write`], but commits without waiting for the disk (`Durability::None`):
    /// consistent, and durable with the next durable commit, but a crash may lose it. Only
    /// for bookkeeping that may be lost, such as when a peer was last seen.
    pub fn write_relaxed<T, E>(
        &self,
        f: impl FnOnce(&mut StoreTxn<'_>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        self.write_with(Durability::None, f)
    }

    fn write_with<T, E>(
        &self,
        durability: Durability,
        f: impl FnOnce(&mut StoreTxn<'_>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        self.with_db(|db| {
            let mut tx = db.begin_write().map_err(StoreError::from)?;
            tx.set_durability(durability).map_err(StoreError::from)?;
            let mut txn = StoreTxn {
                tx,
                _p: std::marker::PhantomData,
            };
            let out = f(&mut txn)?;
            txn.tx.commit().map_err(StoreError::from)?;
            Ok(out)
        })
    }

    /// Reads a stored document.
    pub fn load_doc(&self, doc: &DocId) -> Result<LoadedDoc, StoreError> {
        self.with_db(|db| {
            let rx = db.begin_read()?;
            let snapshot = rx
                .open_table(SNAPSHOTS)?
                .get(doc.as_str())?
                .map(|g| g.value().to_vec());
            let mut chunks = Vec::new();
            let table = rx.open_table(CHUNKS)?;
            for row in table.range((doc.as_str(), 0)..=(doc.as_str(), u64::MAX))? {
                let (_, v) = row?;
                chunks.push(v.value().to_vec());
            }
            Ok(LoadedDoc { snapshot, chunks })
        })
    }

    /// True when a document's chunks have grown past the compaction threshold.
    pub fn needs_compaction(&self, doc: &DocId) -> Result<bool, StoreError> {
        self.with_db(|db| {
            let rx = db.begin_read()?;
            let snap = rx
                .open_table(SNAPSHOTS)?
                .get(doc.as_str())?
                .map_or(0, |g| g.value().len() as u64);
            let mut chunk_bytes = 0u64;
            for row in rx
                .open_table(CHUNKS)?
                .range((doc.as_str(), 0)..=(doc.as_str(), u64::MAX))?
            {
                chunk_bytes += row?.1.value().len() as u64;
            }
            Ok(chunk_bytes > COMPACT_MIN_CHUNK_BYTES.max(snap))
        })
    }

    /// A persisted sync state.
    pub fn sync_state(&self, doc: &DocId, peer: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_db(|db| {
            Ok(db
                .begin_read()?
                .open_table(SYNC_STATES)?
                .get((doc.as_str(), peer))?
                .map(|g| g.value().to_vec()))
        })
    }

    /// A named value.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_db(|db| {
            Ok(db
                .begin_read()?
                .open_table(META)?
                .get(key)?
                .map(|g| g.value().to_vec()))
        })
    }

    /// A named JSON value.
    pub fn meta_json<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        self.meta(key)?
            .map(|b| {
                serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
                    what: key.to_owned(),
                    why: e.to_string(),
                })
            })
            .transpose()
    }

    /// Every trusted (or revoked) peer.
    pub fn trusted_peers(&self) -> Result<Vec<TrustedPeer>, StoreError> {
        self.with_db(|db| {
            let rx = db.begin_read()?;
            let mut out = Vec::new();
            for row in rx.open_table(TRUSTED)?.iter()? {
                let (k, v) = row?;
                match serde_json::from_slice(v.value()) {
                    Ok(p) => out.push(p),
                    Err(e) => {
                        return Err(StoreError::Corrupt {
                            what: format!("trusted peer {}", k.value()),
                            why: e.to_string(),
                        });
                    }
                }
            }
            Ok(out)
        })
    }

    /// One trusted peer.
    pub fn trusted_peer(&self, id: &str) -> Result<Option<TrustedPeer>, StoreError> {
        Ok(self
            .trusted_peers()?
            .into_iter()
            .find(|p| p.id.as_str() == id))
    }

    /// Reads rows of a caller-defined table (created on first write; empty before that).
    pub fn read_table<K, V, T>(
        &self,
        def: TableDefinition<K, V>,
        f: impl FnOnce(&redb::ReadOnlyTable<K, V>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError>
    where
        K: redb::Key + 'static,
        V: redb::Value + 'static,
    {
        self.with_db(|db| {
            let rx = db.begin_read()?;
            match rx.open_table(def) {
                Ok(t) => f(&t).map(Some),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
    }
}

/// True when redb's handle has failed for good: it refuses to begin a transaction with
/// "Previous I/O error occurred", and only closing and opening it again recovers. (Does not
/// wait for a write in progress: redb checks for the failure first.)
fn has_failed(db: &Database) -> bool {
    matches!(
        db.try_begin_write(),
        Err(redb::TransactionError::Storage(
            redb::StorageError::PreviousIo
        ))
    )
}

/// One write transaction. Dropped without commit on error.
pub struct StoreTxn<'a> {
    tx: redb::WriteTransaction,
    #[allow(dead_code)]
    _p: std::marker::PhantomData<&'a ()>,
}

impl fmt::Debug for StoreTxn<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreTxn")
    }
}

impl StoreTxn<'_> {
    /// Appends an incremental chunk to a document. Empty chunks are skipped.
    pub fn append_chunk(&mut self, doc: &DocId, chunk: &[u8]) -> Result<(), StoreError> {
        if chunk.is_empty() {
            return Ok(());
        }
        let mut t = self.tx.open_table(CHUNKS)?;
        let next = t
            .range((doc.as_str(), 0)..=(doc.as_str(), u64::MAX))?
            .next_back()
            .transpose()?
            .map_or(0, |(k, _)| k.value().1 + 1);
        t.insert((doc.as_str(), next), chunk)?;
        Ok(())
    }

    /// Replaces a document's snapshot and drops its chunks: compaction, atomically.
    pub fn replace_snapshot(&mut self, doc: &DocId, snapshot: &[u8]) -> Result<(), StoreError> {
        self.tx
            .open_table(SNAPSHOTS)?
            .insert(doc.as_str(), snapshot)?;
        let mut t = self.tx.open_table(CHUNKS)?;
        let keys: Vec<u64> = t
            .range((doc.as_str(), 0)..=(doc.as_str(), u64::MAX))?
            .map(|r| r.map(|(k, _)| k.value().1))
            .collect::<Result<_, _>>()?;
        for k in keys {
            t.remove((doc.as_str(), k))?;
        }
        Ok(())
    }

    /// Stores a peer's sync state.
    pub fn put_sync_state(
        &mut self,
        doc: &DocId,
        peer: &str,
        state: &[u8],
    ) -> Result<(), StoreError> {
        self.tx
            .open_table(SYNC_STATES)?
            .insert((doc.as_str(), peer), state)?;
        Ok(())
    }

    /// Forgets a peer's sync state.
    pub fn delete_sync_state(&mut self, doc: &DocId, peer: &str) -> Result<(), StoreError> {
        self.tx
            .open_table(SYNC_STATES)?
            .remove((doc.as_str(), peer))?;
        Ok(())
    }

    /// Sets a named value.
    pub fn put_meta(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.tx.open_table(META)?.insert(key, value)?;
        Ok(())
    }

    /// Sets a named JSON value.
    pub fn put_meta_json<T: Serialize>(&mut self, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
            what: key.to_owned(),
            why: e.to_string(),
        })?;
        self.put_meta(key, &bytes)
    }

    /// Removes a named value.
    pub fn delete_meta(&mut self, key: &str) -> Result<(), StoreError> {
        self.tx.open_table(META)?.remove(key)?;
        Ok(())
    }

    /// Adds or updates a trusted peer.
    pub fn put_trusted(&mut self, peer: &TrustedPeer) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(peer).map_err(|e| StoreError::Corrupt {
            what: format!("trusted peer {}", peer.id),
            why: e.to_string(),
        })?;
        self.tx
            .open_table(TRUSTED)?
            .insert(peer.id.as_str(), bytes.as_slice())?;
        Ok(())
    }

    /// Removes a trusted peer entirely.
    pub fn delete_trusted(&mut self, id: &str) -> Result<(), StoreError> {
        self.tx.open_table(TRUSTED)?.remove(id)?;
        Ok(())
    }

    /// Opens a caller-defined table in this transaction.
    pub fn table<K, V>(
        &mut self,
        def: TableDefinition<K, V>,
    ) -> Result<redb::Table<'_, K, V>, StoreError>
    where
        K: redb::Key + 'static,
        V: redb::Value + 'static,
    {
        Ok(self.tx.open_table(def)?)
    }
}

#[cfg(unix)]
fn restrict_dir(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
}
#[cfg(unix)]
fn restrict_file(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}
#[cfg(not(unix))]
fn restrict_dir(_: &Path) {}
#[cfg(not(unix))]
fn restrict_file(_: &Path) {}

/// The bytes of an in-memory store ([`Store::in_memory`]), shared so that a store opened
/// again over the same image finds what the previous one committed.
#[derive(Debug, Clone, Default)]
pub struct MemoryImage(std::sync::Arc<std::sync::RwLock<Vec<u8>>>);

impl MemoryImage {
    /// An empty image: a new store.
    pub fn new() -> Self {
        Self::default()
    }

    fn bytes(&self) -> std::sync::RwLockReadGuard<'_, Vec<u8>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bytes_mut(&self) -> std::sync::RwLockWriteGuard<'_, Vec<u8>> {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn out_of_range() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "past the end of the image",
    )
}

impl redb::StorageBackend for MemoryImage {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.bytes().len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let bytes = self.bytes();
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let end = start.checked_add(out.len()).ok_or_else(out_of_range)?;
        out.copy_from_slice(bytes.get(start..end).ok_or_else(out_of_range)?);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let len = usize::try_from(len).map_err(|_| out_of_range())?;
        self.bytes_mut().resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut bytes = self.bytes_mut();
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let end = start.checked_add(data.len()).ok_or_else(out_of_range)?;
        bytes
            .get_mut(start..end)
            .ok_or_else(out_of_range)?
            .copy_from_slice(data);
        Ok(())
    }
}
