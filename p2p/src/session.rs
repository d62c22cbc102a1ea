//! One sync session: a long-lived `/errand/sync/1` stream with one trusted peer.
//!
//! Phases: hello (versions and threads must match, or a fresh home adopts its desktop's
//! thread), then the Automerge sync loop. A local commit or a merge from another peer wakes
//! the loop; so does every frame from the peer. Reads go through a reader task, because a
//! half-read frame is not cancel-safe inside `select!`.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use errand_core::{DeviceKind, TaskId};
use errand_crdt::{DocId, ThreadGenesis};
use futures::{AsyncReadExt, io::WriteHalf};
use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    replica::{MAX_HELLO_DOCS, Merged, Outgoing, Replica, ReplicaError},
    wire::{self, Frame, FrameKind, HELLO_TIMEOUT, Hello, PROTOCOL_VERSION, WireError},
};

/// The sync protocol.
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/errand/sync/1");

/// Frames buffered between the reader task and the session loop. A few frames are enough to
/// keep the socket busy; more would only hold memory while Automerge works.
const READ_AHEAD: usize = 8;

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

/// Why a session ended with an error. The peer is not punished; the session restarts.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Framing or I/O failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The hello did not arrive in time.
    #[error("no hello within {HELLO_TIMEOUT:?}")]
    HelloTimeout,
    /// The peer speaks another protocol version.
    #[error(
        "peer speaks sync protocol version {0}, this build speaks {PROTOCOL_VERSION}; update the older side"
    )]
    Version(u32),
    /// Different threads, or nobody has one.
    #[error("{0}")]
    Thread(String),
    /// The replica refused the peer's data.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// The peer sent something out of order.
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
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
}

async fn send<W: futures::AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
    traffic: &Traffic,
) -> Result<(), SessionError> {
    let n = wire::write_frame(w, frame).await?;
    traffic.sent.fetch_add(n, Ordering::Relaxed);
    Ok(())
}

/// `frame` deflated if that pays (compressing a large body runs on a blocking thread).
async fn pack(frame: Frame) -> Result<Frame, SessionError> {
    if frame.body.len() < wire::DEFLATE_MIN {
        return Ok(frame);
    }
    tokio::task::spawn_blocking(move || frame.packed())
        .await
        .map_err(|_| SessionError::Protocol("compressing a frame failed"))
}

/// The frame inside a received deflated frame (inflating runs on a blocking thread).
async fn unpack(frame: Frame) -> Result<Frame, WireError> {
    if frame.kind.inflated().is_none() {
        return Ok(frame);
    }
    tokio::task::spawn_blocking(move || frame.unpacked())
        .await
        .map_err(|_| WireError::Malformed("inflating a sync message failed"))?
}

/// Runs a session until the stream ends, an error occurs, or `cancel` fires.
pub async fn run(
    stream: libp2p::Stream,
    peer: PeerId,
    ctx: SessionCtx,
    cancel: CancellationToken,
) -> Result<(), SessionError> {
    let (mut rd, mut wr) = stream.split();
    let ours = ctx.replica.genesis();

    // Phase 1: hello.
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
    send(&mut wr, &frame, &ctx.traffic).await?;
    let (theirs, n) = tokio::time::timeout(HELLO_TIMEOUT, wire::read_frame(&mut rd))
        .await
        .map_err(|_| SessionError::HelloTimeout)??
        .ok_or(SessionError::Protocol("stream closed before the hello"))?;
    ctx.traffic.received.fetch_add(n, Ordering::Relaxed);
    if theirs.kind != FrameKind::Hello {
        return Err(SessionError::Protocol("the first frame must be a hello"));
    }
    // Read the version first, so a future hello shape still gets a clear version error.
    let version = serde_json::from_slice::<serde_json::Value>(&theirs.body)
        .ok()
        .and_then(|v| v.get("version").and_then(|v| v.as_u64()))
        .ok_or(WireError::Malformed("hello without a version"))?;
    if version != u64::from(PROTOCOL_VERSION) {
        return Err(SessionError::Version(
            version.min(u64::from(u32::MAX)) as u32
        ));
    }
    let theirs: SyncHello = serde_json::from_slice(&theirs.body).map_err(WireError::Hello)?;
    if theirs.docs.len() > MAX_HELLO_DOCS {
        return Err(SessionError::Protocol("a hello listing too many documents"));
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
            return Err(SessionError::Thread(format!(
                "peer is on thread {}, this home is on thread {}; they cannot sync",
                b.thread_id, a.thread_id
            )));
        }
        (None, Some(g)) => {
            if !(ctx.may_adopt && g.owner.as_str() == peer.to_base58()) {
                return Err(SessionError::Thread(
                    "this home has no thread and the peer is not a desktop that owns one".into(),
                ));
            }
            ctx.replica.adopt(g.clone()).await?;
        }
        (None, None) => {
            return Err(SessionError::Thread(
                "neither side has a thread yet: pair the phone with its desktop".into(),
            ));
        }
        _ => {}
    }
    if ctx.replica.genesis().is_none() {
        return Err(SessionError::Protocol("no thread after the hello"));
    }

    // Phase 2: sync. A fresh stream restarts the sessions; documents whose heads match start
    // in sync, the others are synced.
    let active = ctx.replica.start_session(peer, theirs.docs).await?;
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
    let result = sync_loop(&mut wr, &mut frames, peer, &ctx, active, cancel).await;
    reader.abort();
    result
}

async fn sync_loop(
    wr: &mut WriteHalf<libp2p::Stream>,
    frames: &mut mpsc::Receiver<Result<Option<Frame>, WireError>>,
    peer: PeerId,
    ctx: &SessionCtx,
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
            frame = frames.recv() => {
                let frame = match frame {
                    Some(Ok(Some(f))) => f,
                    Some(Ok(None)) | None => return Ok(()),
                    Some(Err(e)) => return Err(e.into()),
                };
                let doc = frame
                    .doc_id
                    .clone()
                    .ok_or(SessionError::Protocol("a frame without a document"))?;
                let merged = match frame.kind {
                    FrameKind::Sync => ctx.replica.receive(peer, doc.clone(), frame.body).await?,
                    FrameKind::Changes => {
                        let (heads, changes) = frame.into_changes()?;
                        if changes.is_empty() {
                            ctx.replica.push_acked(peer, doc.clone(), heads).await;
                            Merged::default()
                        } else {
                            ctx.replica.receive_changes(peer, doc.clone(), heads, changes).await?
                        }
                    }
                    FrameKind::Hello | FrameKind::SyncDeflate | FrameKind::ChangesDeflate => {
                        return Err(SessionError::Protocol("a second hello"));
                    }
                };
                if !merged.tasks.is_empty() {
                    let _ = ctx.events.send(SessionEvent::Merged {
                        peer,
                        tasks: merged.tasks.into_iter().collect(),
                    }).await;
                }
                ack = merged.ack.map(|h| (doc.clone(), h));
                extra.push(doc);
            }
            r = changed.changed() => {
                if r.is_err() {
                    return Ok(());
                }
            }
        }
        if let Some((doc, heads)) = ack {
            send(wr, &Frame::changes(doc, &heads, &[]), &ctx.traffic).await?;
        }
        // Whatever woke us, say what there is to say.
        let out = ctx
            .replica
            .outgoing(peer, std::mem::take(&mut extra))
            .await?;
        for (doc, msg) in out {
            let frame = match msg {
                Outgoing::Sync(m) => pack(Frame::sync(doc, m)).await?,
                Outgoing::Changes { heads, changes } => {
                    pack(Frame::changes(doc, &heads, &changes)).await?
                }
            };
            send(wr, &frame, &ctx.traffic).await?;
        }
        let in_sync = ctx.replica.in_sync(peer).await;
        if in_sync && !was_in_sync {
            let _ = ctx.events.send(SessionEvent::InSync { peer }).await;
        }
        was_in_sync = in_sync;
    }
}
