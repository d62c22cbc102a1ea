//! `/errand/blob/1` on a connection: serving ranges to a trusted peer, and fetching a blob
//! range by range with each group verified before it is written.
//!
//! - The server answers only for blobs that a task in the thread references (an attachment
//!   or an artifact fact) and that it holds whole; anything else is `NotFound`, a range past
//!   the end or over [`MAX_RANGE`] is `BadRange`. Trust is checked by the caller, on the
//!   stream, as for sync.
//! - The fetcher asks for the outboard first (unless it kept a verified one), then for the
//!   bytes from the verified offset on. A group that does not match is refused and asked for
//!   again, up to [`MAX_BAD_RESPONSES`] times in a row; a closed stream leaves the verified
//!   prefix for the next fetch.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use errand_core::{BlobHash, BlobRef, artifacts_of};
use futures::{AsyncRead, AsyncWrite};
use libp2p::PeerId;

use super::{
    store::{BlobError, BlobReader, BlobStore, Partial},
    tree,
    wire::{self, MAX_RANGE, Request, Status, What},
};
use crate::replica::Replica;

/// A fetch gives up after this many bad responses in a row (a flipped bit, a short group):
/// an honest peer on a flaky link sends a good one long before, a hostile one is cut off.
pub const MAX_BAD_RESPONSES: u32 = 4;

/// Range requests a fetch keeps in flight on its stream (2 MiB), so the server always has
/// the next ones at hand while the fetcher checks and writes. Each is still one request and
/// one answer of at most 32 KiB, so each fits a relay circuit; Yamux's window holds back
/// what the fetcher has not read yet. 8 in flight had a 100 MiB fetch on loopback at a third
/// of the raw stream's throughput; 64 (with the larger batch and read-ahead) took it to
/// 0.4 of it (errand-bench P10).
pub const PIPELINE: usize = 64;

/// After a refused range, how many ranges in a row a fetch asks for one at a time, and sees
/// verified, before it fills its pipeline again.
pub const CAREFUL_RANGES: usize = 8;

/// Bytes of answers a fetch gathers before it checks and writes them (on a blocking thread):
/// one trip there per 512 KiB instead of per range, while the next ranges are on their way.
pub const APPEND_BATCH: usize = 512 * 1024;

/// A fetch gives up on its stream when a request cannot be written, or its answer does not
/// come, within this long: a peer that accepted the stream and then went silent (a stalled
/// connection, a server stuck behind its disk) is left for a fresh stream from the verified
/// offset, instead of holding the fetch past its own timeout. An answer is at most 32 KiB,
/// so this allows a link of about 1 KiB/s.
pub const STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// The stream error for an answer or request that did not move within [`STALL`].
fn stalled(peer: PeerId, what: &str) -> FetchError {
    FetchError::Stream {
        peer,
        source: std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} did not move for {} s", STALL.as_secs()),
        ),
    }
}

/// Why a fetch stopped.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The stream could not be opened or broke; the verified prefix is kept.
    #[error("the blob stream to {peer} broke: {source}")]
    Stream {
        /// The server.
        peer: PeerId,
        /// What happened.
        #[source]
        source: std::io::Error,
    },
    /// The peer does not serve this blob (not referenced, or not held whole).
    #[error("{peer} does not serve blob {hash}")]
    NotFound {
        /// The server.
        peer: PeerId,
        /// The blob.
        hash: BlobHash,
    },
    /// The peer answered a valid request with an error, or sent a wrong size.
    #[error("{peer} answered out of protocol: {what}")]
    Protocol {
        /// The server.
        peer: PeerId,
        /// What was wrong.
        what: String,
    },
    /// Too many responses in a row did not match the hash.
    #[error("{peer} sent {count} responses in a row that do not match blob {hash}")]
    Corrupt {
        /// The server.
        peer: PeerId,
        /// The blob.
        hash: BlobHash,
        /// How many.
        count: u32,
    },
    /// The local store refused or failed.
    #[error(transparent)]
    Store(#[from] BlobError),
    /// A blocking task failed.
    #[error("a blocking task failed: {0}")]
    Join(String),
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, FetchError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FetchError::Join(e.to_string()))
}

/// Which blobs the thread references (an attachment of a task, or an artifact fact of its
/// target), read from the thread once per change of it and shared by every stream served:
/// a request does not read every loaded task, and a relay that cuts circuits (a new stream
/// for each) costs no more reads than one stream.
#[derive(Clone)]
pub struct Referenced {
    replica: Replica,
    /// The set, and the replica's change count it was read at.
    cache: Arc<Mutex<Option<ReadAt>>>,
}

/// A set of referenced blobs and the replica's change count it was read at.
type ReadAt = (u64, Arc<HashSet<BlobHash>>);

impl std::fmt::Debug for Referenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Referenced").finish_non_exhaustive()
    }
}

impl Referenced {
    /// The referenced blobs of `replica`'s thread.
    pub fn new(replica: Replica) -> Self {
        Self {
            replica,
            cache: Arc::new(Mutex::new(None)),
        }
    }

    /// True when a task in the thread references `hash`.
    pub async fn contains(&self, hash: BlobHash) -> bool {
        let version = self.replica.change_count();
        if let Ok(c) = self.cache.lock()
            && let Some((v, set)) = c.as_ref()
            && *v == version
        {
            return set.contains(&hash);
        }
        let set: HashSet<BlobHash> = self
            .replica
            .read(|d| {
                let mut set = HashSet::new();
                d.each_task(|t| {
                    set.extend(t.attachments.iter().map(|a| a.hash));
                    set.extend(artifacts_of(&t).iter().map(|a| a.hash));
                });
                set
            })
            .await
            .unwrap_or_default();
        let found = set.contains(&hash);
        if let Ok(mut c) = self.cache.lock() {
            *c = Some((version, Arc::new(set)));
        }
        found
    }
}

/// Bytes a server reads at once for a stream: the range asked for and what follows it, so a
/// sequential fetch costs one disk read (and one trip to a blocking thread) per MiB, not per
/// 32 KiB range. At most [`crate::peer`]'s 16 streams hold this much each.
pub const READ_AHEAD: u64 = 1024 * 1024;

/// What a stream serves from: the blob (or outboard) its last request named, open, and the
/// bytes read from `at` on.
struct Serving {
    hash: BlobHash,
    what: What,
    reader: BlobReader,
    at: u64,
    ahead: Vec<u8>,
}

impl Serving {
    /// The range, if the bytes read ahead hold it whole.
    fn cached(&self, hash: BlobHash, what: What, offset: u64, len: u32) -> Option<&[u8]> {
        if self.hash != hash || self.what != what || offset < self.at {
            return None;
        }
        let from = usize::try_from(offset - self.at).ok()?;
        self.ahead.get(from..from.checked_add(len as usize)?)
    }
}

/// Opens (or keeps) what `req` names and reads its range and up to [`READ_AHEAD`] bytes
/// from there. On an error the stream's reader is dropped; the next request opens anew.
fn read_ahead(
    store: &BlobStore,
    kept: Option<Serving>,
    hash: BlobHash,
    req: Request,
) -> Result<Serving, BlobError> {
    let mut serving = match kept {
        Some(s) if s.hash == hash && s.what == req.what => s,
        _ => Serving {
            hash,
            what: req.what,
            reader: store.open_reader(&hash, req.what)?,
            at: 0,
            ahead: Vec::new(),
        },
    };
    let total = serving.reader.total();
    let len = u64::from(req.len);
    // A range past the end is refused by `read_at` with the size.
    let n = if req.offset <= total {
        len.max(READ_AHEAD).min(total - req.offset).max(len)
    } else {
        len
    };
    let mut ahead = std::mem::take(&mut serving.ahead);
    serving.reader.read_into(req.offset, n, &mut ahead)?;
    serving.ahead = ahead;
    serving.at = req.offset;
    Ok(serving)
}

/// Serves one stream of requests from a trusted peer until it closes.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: PeerId,
    referenced: Referenced,
    store: BlobStore,
) -> std::io::Result<()> {
    let mut allowed: HashMap<[u8; 32], bool> = HashMap::new();
    let mut serving: Option<Serving> = None;
    while let Some(req) = wire::read_request_flushing(&mut stream).await? {
        let hash = BlobHash::from_bytes(req.hash);
        let ok = match allowed.get(&req.hash) {
            Some(ok) => *ok,
            None => {
                let ok = referenced.contains(hash).await;
                allowed.insert(req.hash, ok);
                ok
            }
        };
        if !ok {
            tracing::info!(%peer, blob = %hash, "refused a blob no task references");
            wire::write_response(&mut stream, Status::NotFound, 0, &[]).await?;
            continue;
        }
        if req.len > MAX_RANGE {
            wire::write_response(&mut stream, Status::BadRange, 0, &[]).await?;
            continue;
        }
        if let Some(s) = &serving
            && let Some(bytes) = s.cached(hash, req.what, req.offset, req.len)
        {
            wire::write_response_unflushed(&mut stream, Status::Ok, s.reader.blob_size(), bytes)
                .await?;
            continue;
        }
        let (s, kept) = (store.clone(), serving.take());
        let read = tokio::task::spawn_blocking(move || read_ahead(&s, kept, hash, req))
            .await
            .map_err(std::io::Error::other)?;
        match read {
            Ok(s) => {
                let len = req.len as usize;
                wire::write_response_unflushed(
                    &mut stream,
                    Status::Ok,
                    s.reader.blob_size(),
                    &s.ahead[..len],
                )
                .await?;
                serving = Some(s);
            }
            Err(BlobError::Range { size, .. }) => {
                tracing::info!(%peer, blob = %hash, offset = req.offset, "refused a range past the end");
                wire::write_response(&mut stream, Status::BadRange, size, &[]).await?
            }
            Err(e) => {
                tracing::info!(%peer, blob = %hash, error = %e, "cannot serve a blob");
                wire::write_response(&mut stream, Status::NotFound, 0, &[]).await?
            }
        }
    }
    Ok(())
}

/// Progress of a fetch: (verified bytes, size).
pub type Progress<'a> = &'a mut (dyn FnMut(u64, u64) + Send);

/// What one fetch of a blob moved, for a report: where it started, and how many of the
/// blob's bytes came over the wire (good or refused; the outboard not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// Bytes verified before this fetch asked for anything (what a restart or an earlier,
    /// broken fetch left).
    pub resumed_from: u64,
    /// Bytes received in responses: the blob's and its outboard's (the outboard is 32 bytes
    /// per 16 KiB).
    pub received: u64,
}

/// Fetches `blob` from `peer` over `stream` into `store`, resuming from its verified prefix.
/// Returns the path of the whole, verified blob.
pub async fn fetch<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    peer: PeerId,
    store: &BlobStore,
    blob: &BlobRef,
    progress: Progress<'_>,
    stats: &mut FetchStats,
) -> Result<PathBuf, FetchError> {
    let (hash, size) = (blob.hash, blob.size);
    let s = store.clone();
    let partial: Partial = blocking(move || s.receive(hash, size)).await??;
    stats.resumed_from = partial.verified_upto();
    stats.received = 0;
    let mut slot = Some(partial);
    let fetched = fetch_into(stream, peer, blob, &mut slot, progress, stats).await;
    if fetched.is_err()
        && let Some(mut partial) = slot.take()
    {
        // What was verified since the last commit stays for the next fetch.
        match blocking(move || partial.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(blob = %hash, error = %e, "could not keep the verified prefix")
            }
            Err(e) => {
                tracing::warn!(blob = %hash, error = %e, "could not keep the verified prefix")
            }
        }
    }
    fetched?;
    let s = store.clone();
    blocking(move || s.path(&hash))
        .await??
        .ok_or(FetchError::Store(BlobError::Missing(hash)))
}

/// Sends one range request.
async fn request<S: AsyncWrite + Unpin>(
    stream: &mut S,
    peer: PeerId,
    hash: BlobHash,
    what: What,
    offset: u64,
    len: u32,
) -> Result<(), FetchError> {
    let req = Request {
        what,
        hash: *hash.as_bytes(),
        offset,
        len,
    };
    tokio::time::timeout(STALL, wire::write_request(stream, &req))
        .await
        .map_err(|_| stalled(peer, "a range request"))?
        .map_err(|source| FetchError::Stream { peer, source })
}

/// Reads the answer to a request for `offset`+`len` of a blob of `size` bytes.
async fn answer<S: AsyncRead + Unpin>(
    stream: &mut S,
    peer: PeerId,
    hash: BlobHash,
    size: u64,
    offset: u64,
    len: u32,
) -> Result<Vec<u8>, FetchError> {
    let mut bytes = Vec::new();
    answer_into(stream, peer, hash, size, offset, len, &mut bytes).await?;
    Ok(bytes)
}

/// [`answer`], appending the range to `out` (unchanged on an error). Returns its length.
async fn answer_into<S: AsyncRead + Unpin>(
    stream: &mut S,
    peer: PeerId,
    hash: BlobHash,
    size: u64,
    offset: u64,
    len: u32,
    out: &mut Vec<u8>,
) -> Result<usize, FetchError> {
    let at = out.len();
    let (status, got_size) =
        tokio::time::timeout(STALL, wire::read_response_into(stream, len, out))
            .await
            .map_err(|_| stalled(peer, "the answer to a range request"))?
            .map_err(|source| FetchError::Stream { peer, source })?;
    let got = out.len() - at;
    if status == Status::Ok && got_size == size && got == len as usize {
        return Ok(got);
    }
    out.truncate(at);
    Err(match status {
        Status::Ok => FetchError::Protocol {
            peer,
            what: format!("size {got_size} (expected {size}), {got} bytes (asked {len})"),
        },
        Status::NotFound => FetchError::NotFound { peer, hash },
        Status::BadRange => FetchError::Protocol {
            peer,
            what: format!("range {offset}+{len} refused"),
        },
    })
}

/// The body of [`fetch`]: the outboard, then the bytes with up to [`PIPELINE`] ranges in
/// flight. `slot` holds the partial blob between steps (it is moved to blocking threads).
async fn fetch_into<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    peer: PeerId,
    blob: &BlobRef,
    slot: &mut Option<Partial>,
    progress: Progress<'_>,
    stats: &mut FetchStats,
) -> Result<(), FetchError> {
    let (hash, size) = (blob.hash, blob.size);
    let lost = || FetchError::Join("the partial blob was lost".into());
    let mut bad = 0u32;
    let corrupt = |bad: u32| FetchError::Corrupt {
        peer,
        hash,
        count: bad,
    };
    while slot.as_ref().ok_or_else(lost)?.needs_outboard() {
        let total = tree::outboard_len(size);
        // What earlier fetches received of it: an outboard over 64 KiB (a blob over 32 MiB)
        // crosses several relay circuits.
        let mut outboard = slot.as_ref().ok_or_else(lost)?.outboard_received();
        if outboard.len() as u64 > total {
            outboard.clear();
        }
        while (outboard.len() as u64) < total {
            let offset = outboard.len() as u64;
            let len = (total - offset).min(u64::from(MAX_RANGE)) as u32;
            request(stream, peer, hash, What::Outboard, offset, len).await?;
            let piece = answer(stream, peer, hash, size, offset, len).await?;
            stats.received += piece.len() as u64;
            slot.as_ref()
                .ok_or_else(lost)?
                .keep_outboard_piece(&piece)?;
            outboard.extend(piece);
        }
        match slot.as_mut().ok_or_else(lost)?.set_outboard(outboard) {
            Ok(()) => {}
            Err(BlobError::Verify(e)) => {
                bad += 1;
                tracing::warn!(%peer, blob = %hash, error = %e, "refused an outboard");
                if bad >= MAX_BAD_RESPONSES {
                    return Err(corrupt(bad));
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut verified = slot.as_ref().ok_or_else(lost)?.verified_upto();
    progress(verified, size);
    let mut asked = Asked::new(peer, hash, size, verified);
    // Answers read but not handed to the writer yet: they follow what the writer has without
    // a gap, and go to it [`APPEND_BATCH`] bytes at a time.
    let mut batch: Vec<u8> = Vec::with_capacity(APPEND_BATCH);
    // The batch being checked and written on a blocking thread while the next one is read.
    let mut writer = Writer::default();
    // After a refused range, ranges are asked for one at a time until this many in a row
    // verified: the answers after a bad one are not thrown away wholesale again and again (a
    // peer that spoils every other answer still gets the blob across, slowly), and a peer
    // that spoils every one reaches [`MAX_BAD_RESPONSES`] at once.
    let mut careful = 0usize;
    loop {
        if size == 0 && asked.in_flight.is_empty() && !writer.busy() {
            if slot.as_ref().ok_or_else(lost)?.is_complete() {
                return Ok(());
            }
            // An empty blob: one empty range completes it.
            request(stream, peer, hash, What::Data, 0, 0).await?;
            asked.in_flight.push_back((0, 0));
        }
        asked.more(stream, careful > 0).await;
        // Whether this turn read an answer (an empty blob's is empty, and still goes to the
        // writer).
        let mut answered = false;
        if let Some((offset, len)) = asked.in_flight.pop_front() {
            let got = match answer_into(stream, peer, hash, size, offset, len, &mut batch).await {
                Ok(got) => got,
                Err(e) => {
                    // A cut stream (a relay's circuit limit): what came before it still counts.
                    if writer.busy() {
                        let _ = writer.finish(slot).await;
                    }
                    if !batch.is_empty() {
                        writer.start(slot, &mut batch)?;
                        let _ = writer.finish(slot).await;
                    }
                    return Err(e);
                }
            };
            stats.received += got as u64;
            if batch.len() < APPEND_BATCH && !asked.in_flight.is_empty() {
                continue;
            }
            answered = true;
            // Keep the server busy while this side checks and writes.
            asked.more(stream, careful > 0).await;
        } else if !writer.busy() {
            // Nothing more to read or write.
            if slot.as_ref().ok_or_else(lost)?.is_complete() {
                return Ok(());
            }
            return Err(asked.unsent.take().unwrap_or_else(|| FetchError::Protocol {
                peer,
                what: "nothing left to ask for, yet the blob is not whole".into(),
            }));
        }
        if writer.busy() {
            let r = writer.finish(slot).await?;
            verified = slot.as_ref().ok_or_else(lost)?.verified_upto();
            progress(verified, size);
            match r {
                Ok(_) => {
                    bad = 0;
                    careful = careful.saturating_sub(1);
                }
                Err(e) => {
                    refused(e, &mut bad, peer, hash)?;
                    careful = CAREFUL_RANGES;
                    // The batch read since, and the answers still in flight, start past the
                    // refused group: drop them, then ask again from the verified offset.
                    batch.clear();
                    while let Some((offset, len)) = asked.in_flight.pop_front() {
                        let dropped = answer(stream, peer, hash, size, offset, len).await?;
                        stats.received += dropped.len() as u64;
                    }
                    asked.next = verified;
                    continue;
                }
            }
        }
        if answered {
            writer.start(slot, &mut batch)?;
        }
    }
}

/// Counts a check that failed; the fetch gives up after [`MAX_BAD_RESPONSES`] in a row. An
/// error of the store ends it at once.
fn refused(e: BlobError, bad: &mut u32, peer: PeerId, hash: BlobHash) -> Result<(), FetchError> {
    match e {
        BlobError::Verify(e) => {
            *bad += 1;
            tracing::warn!(%peer, blob = %hash, error = %e, "refused a range that does not match");
            if *bad >= MAX_BAD_RESPONSES {
                return Err(FetchError::Corrupt {
                    peer,
                    hash,
                    count: *bad,
                });
            }
            Ok(())
        }
        e => Err(e.into()),
    }
}

/// What the blocking thread hands back: the check's result, the partial blob, and the
/// batch's buffer (to reuse).
type Written = (Result<u64, BlobError>, Partial, Vec<u8>);

/// Checks and writes batches of answers on a blocking thread, one at a time, while the fetch
/// reads the next batch from the stream. The partial blob travels with the batch.
#[derive(Default)]
struct Writer {
    running: Option<tokio::task::JoinHandle<Written>>,
    /// An emptied buffer to gather the next batch in.
    spare: Vec<u8>,
}

impl Writer {
    fn busy(&self) -> bool {
        self.running.is_some()
    }

    /// Hands `batch` to the blocking thread; `batch` becomes an empty buffer.
    fn start(&mut self, slot: &mut Option<Partial>, batch: &mut Vec<u8>) -> Result<(), FetchError> {
        let mut partial = slot
            .take()
            .ok_or_else(|| FetchError::Join("the partial blob was lost".into()))?;
        let bytes = std::mem::replace(batch, std::mem::take(&mut self.spare));
        self.running = Some(tokio::task::spawn_blocking(move || {
            let r = partial.append(&bytes);
            (r, partial, bytes)
        }));
        Ok(())
    }

    /// Waits for the batch being written and puts the partial blob back in `slot`. The outer
    /// error is the blocking thread's, the inner one the check's or the store's.
    async fn finish(
        &mut self,
        slot: &mut Option<Partial>,
    ) -> Result<Result<u64, BlobError>, FetchError> {
        let Some(running) = self.running.take() else {
            return Ok(Ok(0));
        };
        let (r, partial, mut bytes) = running.await.map_err(|e| FetchError::Join(e.to_string()))?;
        *slot = Some(partial);
        bytes.clear();
        self.spare = bytes;
        Ok(r)
    }
}

/// The ranges a fetch has asked for, in order, and where it asks next.
struct Asked {
    peer: PeerId,
    hash: BlobHash,
    size: u64,
    /// The first offset not asked for yet.
    next: u64,
    in_flight: VecDeque<(u64, u32)>,
    /// A request that could not be sent (the peer closed its side): the answers already on
    /// their way are still read and kept, then this ends the fetch.
    unsent: Option<FetchError>,
}

impl Asked {
    fn new(peer: PeerId, hash: BlobHash, size: u64, from: u64) -> Self {
        Self {
            peer,
            hash,
            size,
            next: from,
            in_flight: VecDeque::with_capacity(PIPELINE),
            unsent: None,
        }
    }

    /// Asks for the ranges after `next` until [`PIPELINE`] (one when `careful`) are in flight,
    /// in one write. Requests that cannot be written leave the error in `unsent`, and nothing
    /// more is asked.
    async fn more<S: AsyncWrite + Unpin>(&mut self, stream: &mut S, careful: bool) {
        let limit = if careful { 1 } else { PIPELINE };
        if self.unsent.is_some() {
            return;
        }
        let mut asked = Vec::new();
        let mut at = self.next;
        while self.in_flight.len() + asked.len() < limit && at < self.size {
            let len = (self.size - at).min(u64::from(MAX_RANGE)) as u32;
            asked.push(Request {
                what: What::Data,
                hash: *self.hash.as_bytes(),
                offset: at,
                len,
            });
            at += u64::from(len);
        }
        if asked.is_empty() {
            return;
        }
        let peer = self.peer;
        let written = tokio::time::timeout(STALL, wire::write_requests(stream, &asked))
            .await
            .map_err(|_| stalled(peer, "a range request"))
            .and_then(|r| r.map_err(|source| FetchError::Stream { peer, source }));
        match written {
            Ok(()) => {
                self.in_flight
                    .extend(asked.iter().map(|r| (r.offset, r.len)));
                self.next = at;
            }
            Err(e) => self.unsent = Some(e),
        }
    }
}

#[cfg(test)]
mod tests;
