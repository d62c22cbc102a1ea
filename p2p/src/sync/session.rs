//! One sync session: a long-lived `/errand/sync/1` stream with one trusted peer.
//!
//! A session runs in named phases, each a function with its own `tracing` span and its own
//! error, so a log says which phase failed:
//!
//! - **hello** ([`HelloError`]): versions and threads must match, or a fresh home adopts its
//!   desktop's thread.
//! - **sync** ([`SyncError`]): the Automerge sync loop. It takes in the peer's frames and
//!   merges them. A local commit or a merge from another peer wakes it, and local work comes
//!   first: a change made here is pushed before the peer's next frame is taken in. Reads go
//!   through a reader task, because a half-read frame is not cancel-safe inside `select!`.
//! - **push** ([`PushError`]): after every wake, everything there is to say to the peer (an
//!   ack of pushed changes, sync messages, changes pushed to a peer that was in sync).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use errand_core::{DeviceKind, TaskId};
use errand_crdt::{ChangeHash, DocId, ThreadGenesis};
use futures::{
    AsyncReadExt,
    io::{ReadHalf, WriteHalf},
};
use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info_span};

use super::wire::{self, Frame, FrameKind, HELLO_TIMEOUT, Hello, PROTOCOL_VERSION, WireError};
use crate::replica::{LiveSession, MAX_HELLO_DOCS, Merged, Outgoing, Replica, ReplicaError};

/// The sync protocol.
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/errand/sync/1");

/// Frames buffered between the reader task and the session loop. A few frames are enough to
/// keep the socket busy; more would only hold memory while Automerge works.
const READ_AHEAD: usize = 8;

/// Most change bytes one frame carries over a relay circuit: a catch-up bigger than this goes
/// in parts, one per round trip (`Engine::set_part_limit`). A relay closes a circuit after a
/// number of bytes, both ways summed, counted on the encrypted connection (libp2p's default
/// is 128 KiB; errand-relay's `--max-circuit-bytes` may be as low as 64 KiB). At 24 KiB, a
/// part of incompressible text plus the connection's own traffic (Noise, identify, the
/// hello) fits a 64 KiB circuit at least twice; packing shrinks the usual text 3 to 4 times.
pub const RELAYED_PART_BYTES: usize = 24 * 1024;

/// The part limit over a circuit that closes after `circuit_bytes` (if the relay said):
/// [`RELAYED_PART_BYTES`], or a third of a smaller circuit's budget, so that a part, the
/// answer and the connection's own traffic fit it together.
pub fn part_limit(circuit_bytes: Option<u64>) -> usize {
    let third = circuit_bytes.map_or(usize::MAX, |b| usize::try_from(b / 3).unwrap_or(usize::MAX));
    RELAYED_PART_BYTES.min(third).max(MIN_PART_BYTES)
}

/// The smallest part limit: below this, round trips would dominate.
const MIN_PART_BYTES: usize = 1024;

/// Who we are, as told in the hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Human name.
    pub name: String,
    /// Desktop or phone.
    pub kind: DeviceKind,
    /// Our Automerge actor, hex.
    pub actor: String,
}

/// The hello on the wire: protocol version, thread, and who is speaking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncHello {
    /// Version and thread.
    #[serde(flatten)]
    pub hello: Hello,
    /// Who is speaking.
    pub device: Option<DeviceInfo>,
    /// Each document of the thread we hold: (part number, digest of its heads). Documents
    /// whose digests match start in sync, with no message.
    #[serde(default)]
    pub docs: Vec<(u32, String)>,
}

/// Why a session ended with an error, by the phase that failed. The peer is not punished;
/// the session restarts.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The hello failed: nothing was synced.
    #[error("hello: {0}")]
    Hello(#[from] HelloError),
    /// Taking in the peer's frames failed.
    #[error("sync: {0}")]
    Sync(#[from] SyncError),
    /// Sending to the peer failed.
    #[error("push: {0}")]
    Push(#[from] PushError),
}

/// Why the hello failed.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// Framing or I/O failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The hello did not arrive in time.
    #[error("no hello within {HELLO_TIMEOUT:?}")]
    Timeout,
    /// The peer speaks another protocol version.
    #[error(
        "peer speaks sync protocol version {0}, this build speaks {PROTOCOL_VERSION}; update the older side"
    )]
    Version(u32),
    /// Different threads, or nobody has one.
    #[error("{0}")]
    Thread(String),
    /// Adopting the desktop's thread failed.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// The peer sent something out of order.
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
}

/// Why taking in the peer's frames failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Framing or I/O failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The replica refused the peer's data, or could not start the session.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// The peer sent something out of order.
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
}

/// Why sending to the peer failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// Writing failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The replica could not say what to send.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// Compressing a frame on a blocking thread failed.
    #[error("protocol violation: compressing a frame failed")]
    Compress,
    /// A frame can never pass the relay circuit: one change alone is bigger than the bytes
    /// the relay lets through a circuit.
    #[error(
        "a sync frame of {bytes} bytes cannot pass the relay, which closes each circuit after \
         {limit} bytes (its circuit byte limit, --max-circuit-bytes); connect the peers \
         directly or raise the relay's limit"
    )]
    TooBigForCircuit {
        /// The frame's size on the wire.
        bytes: usize,
        /// The circuit's byte limit.
        limit: u64,
    },
}

/// What the session reports to its peer.
#[derive(Debug, Clone)]
pub enum SessionEvent {
    /// The peer's changes were merged and stored.
    Merged {
        /// The peer.
        peer: PeerId,
        /// Tasks with new content.
        tasks: Vec<TaskId>,
    },
    /// The peer now has exactly our heads.
    InSync {
        /// The peer.
        peer: PeerId,
    },
    /// The peer told us who it is.
    Hello {
        /// The peer.
        peer: PeerId,
        /// What it said.
        device: Option<DeviceInfo>,
        /// Its thread.
        genesis: Option<ThreadGenesis>,
    },
}

/// Byte counters of one peer, across sessions.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Bytes we sent.
    pub sent: AtomicU64,
    /// Bytes we received.
    pub received: AtomicU64,
}

/// Everything a session needs.
#[derive(Debug, Clone)]
pub struct SessionCtx {
    /// The replica.
    pub replica: Replica,
    /// Who we are.
    pub me: DeviceInfo,
    /// Where to report.
    pub events: mpsc::Sender<SessionEvent>,
    /// The peer's counters.
    pub traffic: Arc<Traffic>,
    /// Whether we may adopt this peer's thread (a trusted desktop, when we have none).
    pub may_adopt: bool,
    /// `Some` over a relay circuit, with the circuit's byte limit if the relay stated one:
    /// frames then carry at most [`part_limit`] change bytes, and a frame bigger than the
    /// whole circuit is reported rather than sent. `None` on a direct connection.
    pub circuit: Option<Option<u64>>,
}

async fn send<W: futures::AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
    traffic: &Traffic,
) -> Result<(), WireError> {
    let n = wire::write_frame(w, frame).await?;
    traffic.sent.fetch_add(n, Ordering::Relaxed);
    Ok(())
}

/// `frame` packed if that pays (compressing a large body runs on a blocking thread).
async fn pack(frame: Frame) -> Result<Frame, PushError> {
    if frame.body.len() < wire::PACK_MIN {
        return Ok(frame);
    }
    tokio::task::spawn_blocking(move || frame.packed())
        .await
        .map_err(|_| PushError::Compress)
}

/// The frame inside a received packed frame (unpacking runs on a blocking thread).
async fn unpack(frame: Frame) -> Result<Frame, WireError> {
    if frame.kind.unpacked().is_none() {
        return Ok(frame);
    }
    tokio::task::spawn_blocking(move || frame.unpacked())
        .await
        .map_err(|_| WireError::Malformed("unpacking a sync message failed"))?
}

/// Runs a session until the stream ends, an error occurs, or `cancel` fires: the hello, then
/// the sync loop (which pushes after every wake).
pub async fn run(
    stream: libp2p::Stream,
    peer: PeerId,
    ctx: SessionCtx,
    cancel: CancellationToken,
) -> Result<(), SessionError> {
    let (mut rd, mut wr) = stream.split();
    let theirs = hello(&mut rd, &mut wr, peer, &ctx)
        .instrument(info_span!("hello"))
        .await?;
    sync(rd, wr, peer, &ctx, theirs.docs, cancel)
        .instrument(info_span!("sync"))
        .await
}

/// The hello phase: send ours, read theirs, check the version and the thread (adopting the
/// desktop's thread on a fresh phone). Returns the peer's hello.
async fn hello(
    rd: &mut ReadHalf<libp2p::Stream>,
    wr: &mut WriteHalf<libp2p::Stream>,
    peer: PeerId,
    ctx: &SessionCtx,
) -> Result<SyncHello, HelloError> {
    let ours = ctx.replica.genesis();
    let hello = SyncHello {
        hello: Hello {
            version: PROTOCOL_VERSION,
            genesis: ours.clone(),
        },
        device: Some(ctx.me.clone()),
        docs: ctx.replica.digests(),
    };
    let frame = Frame {
        kind: FrameKind::Hello,
        doc_id: None,
        body: serde_json::to_vec(&hello).unwrap_or_default(),
    };
    send(wr, &frame, &ctx.traffic).await?;
    let (theirs, n) = tokio::time::timeout(HELLO_TIMEOUT, wire::read_frame(rd))
        .await
        .map_err(|_| HelloError::Timeout)??
        .ok_or(HelloError::Protocol("stream closed before the hello"))?;
    ctx.traffic.received.fetch_add(n, Ordering::Relaxed);
    if theirs.kind != FrameKind::Hello {
        return Err(HelloError::Protocol("the first frame must be a hello"));
    }
    // Read the version first, so a future hello shape still gets a clear version error.
    let version = serde_json::from_slice::<serde_json::Value>(&theirs.body)
        .ok()
        .and_then(|v| v.get("version").and_then(|v| v.as_u64()))
        .ok_or(WireError::Malformed("hello without a version"))?;
    if version != u64::from(PROTOCOL_VERSION) {
        return Err(HelloError::Version(version.min(u64::from(u32::MAX)) as u32));
    }
    let theirs: SyncHello = serde_json::from_slice(&theirs.body).map_err(WireError::Hello)?;
    if theirs.docs.len() > MAX_HELLO_DOCS {
        return Err(HelloError::Protocol("a hello listing too many documents"));
    }
    let _ = ctx
        .events
        .send(SessionEvent::Hello {
            peer,
            device: theirs.device.clone(),
            genesis: theirs.hello.genesis.clone(),
        })
        .await;
    match (&ours, &theirs.hello.genesis) {
        (Some(a), Some(b)) if a != b => {
            return Err(HelloError::Thread(format!(
                "peer is on thread {}, this home is on thread {}; they cannot sync",
                b.thread_id, a.thread_id
            )));
        }
        (None, Some(g)) => {
            if !(ctx.may_adopt && g.owner.as_str() == peer.to_base58()) {
                return Err(HelloError::Thread(
                    "this home has no thread and the peer is not a desktop that owns one".into(),
                ));
            }
            ctx.replica.adopt(g.clone()).await?;
        }
        (None, None) => {
            return Err(HelloError::Thread(
                "neither side has a thread yet: pair the phone with its desktop".into(),
            ));
        }
        _ => {}
    }
    if ctx.replica.genesis().is_none() {
        return Err(HelloError::Protocol("no thread after the hello"));
    }
    Ok(theirs)
}

/// The sync phase. A fresh stream restarts the sessions; documents whose heads match (by the
/// digests in the peer's hello) start in sync, the others are synced.
async fn sync(
    mut rd: ReadHalf<libp2p::Stream>,
    mut wr: WriteHalf<libp2p::Stream>,
    peer: PeerId,
    ctx: &SessionCtx,
    their_docs: Vec<(u32, String)>,
    cancel: CancellationToken,
) -> Result<(), SessionError> {
    let active = ctx
        .replica
        .start_session(peer, their_docs, ctx.circuit.map(part_limit))
        .await
        .map_err(SyncError::from)?;
    let (tx, mut frames) = mpsc::channel(READ_AHEAD);
    let traffic = ctx.traffic.clone();
    let reader = tokio::spawn(async move {
        loop {
            let r = match wire::read_frame(&mut rd).await {
                Ok(Some((frame, n))) => {
                    traffic.received.fetch_add(n, Ordering::Relaxed);
                    unpack(frame).await.map(Some)
                }
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            let stop = !matches!(r, Ok(Some(_)));
            if tx.send(r).await.is_err() || stop {
                return;
            }
        }
    });
    let live = ctx.replica.live_session(peer);
    let result = sync_loop(&mut wr, &mut frames, peer, ctx, &live, active, cancel).await;
    drop(live);
    reader.abort();
    // Joined, so the session ends with its reader (it holds the stream's read half).
    let _ = reader.await;
    result
}

async fn sync_loop(
    wr: &mut WriteHalf<libp2p::Stream>,
    frames: &mut mpsc::Receiver<Result<Option<Frame>, WireError>>,
    peer: PeerId,
    ctx: &SessionCtx,
    live: &LiveSession,
    active: Vec<DocId>,
    cancel: CancellationToken,
) -> Result<(), SessionError> {
    let mut changed: watch::Receiver<u64> = ctx.replica.subscribe_changes();
    changed.mark_changed();
    let mut was_in_sync = false;
    // Documents to say something about even if they are not held in memory.
    let mut extra = active;
    loop {
        let mut ack = None;
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            // Local work first: a change made here (or merged from another peer) goes out
            // before the next frame of this peer is taken in.
            r = changed.changed() => {
                if r.is_err() {
                    return Ok(());
                }
            }
            frame = frames.recv() => {
                let Some((doc, merged_ack)) = take_frame(frame, peer, ctx).await? else {
                    return Ok(());
                };
                ack = merged_ack.map(|h| (doc.clone(), h));
                extra.push(doc);
            }
        }
        // The push below says everything there is to say as of now, so a change that woke
        // the loop (or that merging the frame made) needs no second wake.
        changed.borrow_and_update();
        let in_sync = push(wr, ctx, live, ack, std::mem::take(&mut extra))
            .instrument(info_span!("push"))
            .await?;
        if in_sync && !was_in_sync {
            let _ = ctx.events.send(SessionEvent::InSync { peer }).await;
        }
        was_in_sync = in_sync;
    }
}

/// Takes in one frame from the reader: merges it and reports the tasks it changed. Returns
/// the frame's document and the heads to ack, or `None` once the stream has ended.
async fn take_frame(
    frame: Option<Result<Option<Frame>, WireError>>,
    peer: PeerId,
    ctx: &SessionCtx,
) -> Result<Option<(DocId, Option<Vec<ChangeHash>>)>, SyncError> {
    let frame = match frame {
        Some(Ok(Some(f))) => f,
        Some(Ok(None)) | None => return Ok(None),
        Some(Err(e)) => return Err(e.into()),
    };
    let doc = frame
        .doc_id
        .clone()
        .ok_or(SyncError::Protocol("a frame without a document"))?;
    let merged = match frame.kind {
        FrameKind::Sync => ctx.replica.receive(peer, doc.clone(), frame.body).await?,
        FrameKind::Changes => {
            let (heads, changes) = frame.into_changes()?;
            if changes.is_empty() {
                ctx.replica.push_acked(peer, doc.clone(), heads).await;
                Merged::default()
            } else {
                ctx.replica
                    .receive_changes(peer, doc.clone(), heads, changes)
                    .await?
            }
        }
        FrameKind::Hello | FrameKind::SyncPacked | FrameKind::ChangesPacked => {
            return Err(SyncError::Protocol("a second hello"));
        }
    };
    if !merged.tasks.is_empty() {
        let _ = ctx
            .events
            .send(SessionEvent::Merged {
                peer,
                tasks: merged.tasks.into_iter().collect(),
            })
            .await;
    }
    Ok(Some((doc, merged.ack)))
}

/// The push phase: the ack of a frame of pushed changes, if one is due, what local commits
/// made for this session, then everything else there is to say to the peer about the loaded
/// documents and `extra`. Returns whether the peer is in sync once that is sent.
async fn push(
    wr: &mut WriteHalf<libp2p::Stream>,
    ctx: &SessionCtx,
    live: &LiveSession,
    ack: Option<(DocId, Vec<ChangeHash>)>,
    extra: Vec<DocId>,
) -> Result<bool, PushError> {
    if let Some((doc, heads)) = ack {
        send(wr, &Frame::changes(doc, &heads, &[]), &ctx.traffic).await?;
    }
    // Made at the commit: they leave without a trip to the engine.
    send_all(wr, ctx, live.take_ready()).await?;
    let (out, in_sync) = ctx.replica.outgoing(live, extra).await?;
    send_all(wr, ctx, out).await?;
    Ok(in_sync)
}

/// Sends what the engine made, in order.
async fn send_all(
    wr: &mut WriteHalf<libp2p::Stream>,
    ctx: &SessionCtx,
    out: Vec<(DocId, Outgoing)>,
) -> Result<(), PushError> {
    for (doc, msg) in out {
        let frame = match msg {
            Outgoing::Sync(m) => pack(Frame::sync(doc, m)).await?,
            Outgoing::Changes { heads, changes } => {
                pack(Frame::changes(doc, &heads, &changes)).await?
            }
        };
        // Sent anyway, the relay would cut the circuit mid-frame, every time.
        if let Some(Some(limit)) = ctx.circuit
            && frame.body.len() as u64 >= limit
        {
            return Err(PushError::TooBigForCircuit {
                bytes: frame.body.len(),
                limit,
            });
        }
        send(wr, &frame, &ctx.traffic).await?;
    }
    Ok(())
}
