//! The wire format of `/errand/sync/1`.
//!
//! Every frame is a 4-byte big-endian length, then the payload:
//! `kind: u8 | doc_id_len: u8 | doc_id | body`. The length is checked against [`MAX_FRAME`]
//! before anything is allocated. The first frame each way is a [`Hello`]; then `Sync` frames
//! carry Automerge sync messages for the named document (the thread's meta document or one of
//! its segments), and `Changes` frames carry the push path: changes sent directly to a peer
//! known to be in sync, `heads_count: u8 | heads (32 bytes each) | change chunks`.
//!
//! A large sync message may go as `SyncPacked` instead, and a large push as `ChangesPacked`:
//! the same body with its change chunks linked ([`super::linked`]: their checksums and their
//! dependencies on each other, which no compressor can shrink, are left for the receiver to
//! compute), then compressed with zstd. Automerge sends a whole document compressed, but the
//! changes a reconnect is missing one by one and uncompressed (about 360 bytes per task), so
//! without this a peer back from a day offline pays almost a full resync. Unpacking stops at
//! [`MAX_FRAME`] bytes of output and a bounded window, so a small frame cannot expand into
//! gigabytes.

use std::{io, time::Duration};

use errand_crdt::{ChangeHash, DocId, ThreadGenesis};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{Deserialize, Serialize};

use super::linked::{self, LinkError};

/// The sync protocol's version, carried in the hello. Peers on another version are refused.
/// Version 2: segmented threads (the hello lists each document's heads digest) and the push
/// path (`Changes` frames). Version 3: large pushes may be deflated (`ChangesDeflate`).
/// Version 4: sync messages of many changes carry them as one Automerge bundle
/// (`errand_crdt::sync::BUNDLE_MIN_CHANGES`). Version 5: only the desktop sends bundles; the
/// desktop refuses them from phones (Automerge decodes a bundle's columns unbounded).
/// Version 6: packed frames are zstd, not DEFLATE, and carry their change chunks linked
/// (`super::linked`): a 10,000-task catch-up went from 875 to about 400 KB.
pub const PROTOCOL_VERSION: u32 = 6;

/// Largest frame. The first sync of a large thread carries the whole document in one
/// Automerge message (about 140 KB per 10,000 tasks compressed, several MB uncompressed
/// with history), so 64 MiB leaves headroom without letting a peer make us allocate gigabytes.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Once a frame's length has arrived, its body must follow within this time. Generous for a
/// 64 MiB frame over a slow relay, short enough that a stalled peer does not hold a session.
pub const FRAME_BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the peer has to send its hello after the stream opens.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Sync messages and pushes from this size on are packed. Below it, a sync message is heads
/// and a small bloom filter, and a push one task's change or two: compressing would cost more
/// time than the bytes it saves.
pub const PACK_MIN: usize = 1024;

/// The zstd level of packed frames. On a 10,000-task catch-up (3.6 MB of linked changes)
/// level 1 gave 310 KB in 3.4 ms, level 3 332 KB in 5.2 ms, level 9 290 KB in 31 ms; DEFLATE
/// (the previous protocol) 382 KB in 10 ms at its fastest and 357 KB in 25 ms at level 6.
const ZSTD_LEVEL: i32 = 1;

/// The largest zstd window a packed frame may ask the receiver for (log2: 16 MiB). A frame
/// names its window in its header, and the decoder allocates it; the default limit is 128 MiB.
/// Frames are compressed at [`ZSTD_LEVEL`], whose window is far smaller.
const ZSTD_WINDOW_LOG_MAX: u32 = 24;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// The first frame: version and thread.
    Hello = 0,
    /// An Automerge sync message.
    Sync = 1,
    /// An Automerge sync message, packed (linked, then zstd).
    SyncPacked = 2,
    /// Changes pushed to a peer in sync, with the sender's heads after them.
    Changes = 3,
    /// A `Changes` body, packed.
    ChangesPacked = 4,
}

impl FrameKind {
    /// The kind a packed frame of this kind unpacks to, if it is one.
    pub fn unpacked(self) -> Option<Self> {
        match self {
            Self::SyncPacked => Some(Self::Sync),
            Self::ChangesPacked => Some(Self::Changes),
            _ => None,
        }
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it carries.
    pub kind: FrameKind,
    /// The document it is about (for a hello: the thread's document, or empty).
    pub doc_id: Option<DocId>,
    /// The body.
    pub body: Vec<u8>,
}

/// The hello: who we are on the protocol level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The thread we hold, or `None` for a fresh home that will adopt its desktop's thread.
    pub genesis: Option<ThreadGenesis>,
}

/// Why reading or decoding a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream failed or closed mid-frame.
    #[error("stream error: {0}")]
    Io(#[from] io::Error),
    /// The length prefix is over [`MAX_FRAME`].
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(u64),
    /// The body did not arrive in time.
    #[error("frame body did not arrive within {FRAME_BODY_TIMEOUT:?}")]
    Timeout,
    /// The payload is malformed.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// The hello is not valid JSON of the expected shape.
    #[error("malformed hello: {0}")]
    Hello(#[from] serde_json::Error),
    /// A packed body is not valid zstd (or asks for too large a window).
    #[error("malformed packed body: {0}")]
    Unpack(io::Error),
    /// A packed body unpacks past [`MAX_FRAME`].
    #[error("packed body unpacks past the {MAX_FRAME}-byte limit")]
    UnpacksTooLarge,
    /// A packed body's linked change chunks cannot be restored.
    #[error("packed body: {0}")]
    Link(#[from] LinkError),
}

impl Frame {
    /// A hello frame.
    pub fn hello(hello: &Hello) -> Self {
        Self {
            kind: FrameKind::Hello,
            doc_id: None,
            // Serialising a plain struct of strings and numbers cannot fail.
            body: serde_json::to_vec(hello).unwrap_or_default(),
        }
    }

    /// A sync frame.
    pub fn sync(doc_id: DocId, msg: Vec<u8>) -> Self {
        Self {
            kind: FrameKind::Sync,
            doc_id: Some(doc_id),
            body: msg,
        }
    }

    /// This frame packed (`Sync` to `SyncPacked`, `Changes` to `ChangesPacked`) when its
    /// body is at least [`PACK_MIN`] bytes and packing saves at least an eighth; else the
    /// frame as it is. CPU-bound for large bodies: call it off the async workers.
    pub fn packed(self) -> Self {
        let kind = match self.kind {
            FrameKind::Sync => FrameKind::SyncPacked,
            FrameKind::Changes => FrameKind::ChangesPacked,
            _ => return self,
        };
        if self.body.len() < PACK_MIN {
            return self;
        }
        let linked = linked_body(self.kind, &self.body);
        match zstd::bulk::compress(linked.as_deref().unwrap_or(&self.body), ZSTD_LEVEL) {
            Ok(body) if body.len() < self.body.len() - self.body.len() / 8 => Self {
                kind,
                doc_id: self.doc_id,
                body,
            },
            _ => self,
        }
    }

    /// Turns a packed frame into the frame it carries; other frames pass as they are.
    /// Stops at [`MAX_FRAME`] bytes of output. CPU-bound: call it off the async workers.
    pub fn unpacked(self) -> Result<Self, WireError> {
        let Some(kind) = self.kind.unpacked() else {
            return Ok(self);
        };
        use std::io::Read;
        let mut decoder = zstd::stream::read::Decoder::with_buffer(self.body.as_slice())
            .map_err(WireError::Unpack)?;
        decoder
            .window_log_max(ZSTD_WINDOW_LOG_MAX)
            .map_err(WireError::Unpack)?;
        let mut body = Vec::new();
        decoder
            .take(MAX_FRAME as u64 + 1)
            .read_to_end(&mut body)
            .map_err(WireError::Unpack)?;
        if body.len() > MAX_FRAME {
            return Err(WireError::UnpacksTooLarge);
        }
        let body = unlinked_body(kind, body)?;
        Ok(Self {
            kind,
            doc_id: self.doc_id,
            body,
        })
    }

    /// A push frame: `changes` take the receiver (which had our previous heads) to `heads`.
    pub fn changes(doc_id: DocId, heads: &[ChangeHash], changes: &[u8]) -> Self {
        let heads = &heads[..heads.len().min(u8::MAX as usize)];
        let mut body = Vec::with_capacity(1 + 32 * heads.len() + changes.len());
        body.push(heads.len() as u8);
        for h in heads {
            body.extend_from_slice(&h.0);
        }
        body.extend_from_slice(changes);
        Self {
            kind: FrameKind::Changes,
            doc_id: Some(doc_id),
            body,
        }
    }

    /// Splits a push frame's body into the sender's heads and the change chunks.
    pub fn into_changes(self) -> Result<(Vec<ChangeHash>, Vec<u8>), WireError> {
        let n = *self
            .body
            .first()
            .ok_or(WireError::Malformed("an empty changes frame"))? as usize;
        let end = 1 + 32 * n;
        let heads = self
            .body
            .get(1..end)
            .ok_or(WireError::Malformed("heads run past the frame"))?
            .chunks_exact(32)
            .map(|c| ChangeHash::try_from(c).map_err(|_| WireError::Malformed("a head")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut body = self.body;
        Ok((heads, body.split_off(end)))
    }

    /// Encodes the payload (without the length prefix).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.payload_len());
        self.encode_into(&mut out);
        out
    }

    /// The length of [`Frame::encode`]'s payload.
    fn payload_len(&self) -> usize {
        2 + self.doc_id.as_ref().map_or(0, |d| d.as_str().len()) + self.body.len()
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        let doc = self.doc_id.as_ref().map_or("", |d| d.as_str());
        out.push(self.kind as u8);
        out.push(doc.len() as u8); // DocId is at most 64 bytes
        out.extend_from_slice(doc.as_bytes());
        out.extend_from_slice(&self.body);
    }

    /// Decodes a payload.
    pub fn decode(mut payload: Vec<u8>) -> Result<Self, WireError> {
        let [kind, len, ..] = payload[..] else {
            return Err(WireError::Malformed("shorter than its header"));
        };
        let kind = match kind {
            0 => FrameKind::Hello,
            1 => FrameKind::Sync,
            2 => FrameKind::SyncPacked,
            3 => FrameKind::Changes,
            4 => FrameKind::ChangesPacked,
            _ => return Err(WireError::Malformed("unknown frame kind")),
        };
        let end = 2 + len as usize;
        let doc = payload
            .get(2..end)
            .ok_or(WireError::Malformed("document id runs past the frame"))?;
        let doc_id = if doc.is_empty() {
            None
        } else {
            let s = std::str::from_utf8(doc).map_err(|_| WireError::Malformed("document id"))?;
            Some(DocId::parse(s).ok_or(WireError::Malformed("document id"))?)
        };
        let body = payload.split_off(end);
        Ok(Self { kind, doc_id, body })
    }

    /// Parses the body of a hello frame.
    pub fn into_hello(self) -> Result<Hello, WireError> {
        if self.kind != FrameKind::Hello {
            return Err(WireError::Malformed("expected a hello first"));
        }
        Ok(serde_json::from_slice(&self.body)?)
    }
}

/// The body of a `Sync` or `Changes` frame with its change chunks linked, or `None` when it
/// carries none (a sync message whose layout is not Automerge's is sent as it is, and the
/// receiver judges it).
fn linked_body(kind: FrameKind, body: &[u8]) -> Option<Vec<u8>> {
    let mut body = body.to_vec();
    let chunks = match kind {
        FrameKind::Sync => linked::message_chunks(&mut body)?,
        FrameKind::Changes => {
            let heads = 1 + 32 * usize::from(*body.first()?);
            linked::split_chunks(body.get_mut(heads..)?)
        }
        _ => return None,
    };
    if chunks.is_empty() {
        return None;
    }
    linked::link(chunks);
    Some(body)
}

/// The unpacked body of a `Sync` or `Changes` frame with its change chunks restored, in
/// place. A body whose layout is not what its kind says passes as it is: the session's
/// checks refuse it with their own error.
fn unlinked_body(kind: FrameKind, mut body: Vec<u8>) -> Result<Vec<u8>, WireError> {
    let chunks = match kind {
        FrameKind::Sync => linked::message_chunks(&mut body),
        FrameKind::Changes => {
            let heads = 1 + 32 * usize::from(body.first().copied().unwrap_or(0));
            body.get_mut(heads..).map(linked::split_chunks)
        }
        _ => None,
    };
    if let Some(chunks) = chunks {
        linked::unlink(chunks)?;
    }
    Ok(body)
}

/// Writes one frame and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
) -> Result<u64, WireError> {
    let len = frame.payload_len();
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len as u64));
    }
    // One write: the length and the payload leave in one stream frame, not two.
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    frame.encode_into(&mut out);
    w.write_all(&out).await?;
    w.flush().await?;
    Ok(out.len() as u64)
}

/// Reads one frame. `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(Frame, u64)>, WireError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as u64;
    if len > MAX_FRAME as u64 {
        return Err(WireError::TooLarge(len));
    }
    let mut buf = vec![0u8; len as usize];
    tokio::time::timeout(FRAME_BODY_TIMEOUT, r.read_exact(&mut buf))
        .await
        .map_err(|_| WireError::Timeout)??;
    Ok(Some((Frame::decode(buf)?, 4 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_payloads_are_errors() {
        let f = Frame::sync(DocId::parse("abc").unwrap(), vec![1, 2, 3]);
        assert_eq!(Frame::decode(f.encode()).unwrap(), f);
        let h = Frame::hello(&Hello {
            version: 1,
            genesis: None,
        });
        assert_eq!(
            Frame::decode(h.encode())
                .unwrap()
                .into_hello()
                .unwrap()
                .version,
            1
        );
        for bad in [
            vec![],
            vec![0],
            vec![9, 0],
            vec![1, 10, b'a'],
            vec![1, 1, 0xff],
            vec![1, 1, b' '],
        ] {
            assert!(Frame::decode(bad).is_err());
        }
    }

    #[test]
    fn changes_frames_round_trip_and_short_ones_are_errors() {
        let doc = DocId::parse("abc.2").unwrap();
        let heads = [ChangeHash([7; 32]), ChangeHash([9; 32])];
        let f = Frame::changes(doc, &heads, b"chunks");
        let back = Frame::decode(f.encode()).unwrap();
        assert_eq!(back.kind, FrameKind::Changes);
        assert_eq!(
            back.into_changes().unwrap(),
            (heads.to_vec(), b"chunks".to_vec())
        );
        // A large push is deflated and inflates back to the same frame; a small one is not.
        let chunks: Vec<u8> = (0..20_000u32)
            .flat_map(|i| (i % 97).to_le_bytes())
            .collect();
        let doc = DocId::parse("abc.2").unwrap();
        let plain = Frame::changes(doc.clone(), &heads, &chunks);
        let packed = plain.clone().packed();
        assert_eq!(packed.kind, FrameKind::ChangesPacked);
        assert!(packed.body.len() < plain.body.len() / 4);
        let wire = Frame::decode(packed.encode()).unwrap();
        assert_eq!(wire.unpacked().unwrap(), plain);
        let small = Frame::changes(doc, &heads, b"chunks").packed();
        assert_eq!(small.kind, FrameKind::Changes);
        for body in [vec![], vec![1], vec![2; 40]] {
            let bad = Frame {
                kind: FrameKind::Changes,
                doc_id: None,
                body,
            };
            assert!(bad.into_changes().is_err());
        }
    }

    #[test]
    fn large_sync_messages_are_deflated_and_round_trip() {
        let doc = DocId::parse("abc").unwrap();
        let small = Frame::sync(doc.clone(), vec![7; 100]).packed();
        assert_eq!(small.kind, FrameKind::Sync);
        let msg: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_be_bytes())
            .collect();
        let packed = Frame::sync(doc.clone(), msg.clone()).packed();
        assert_eq!(packed.kind, FrameKind::SyncPacked);
        assert!(packed.body.len() < msg.len() / 4);
        let wire = Frame::decode(packed.encode()).unwrap();
        assert_eq!(wire.unpacked().unwrap(), Frame::sync(doc.clone(), msg));
        // Incompressible bytes go as they are.
        let noise: Vec<u8> = (0..10_000).map(|_| rand::random::<u8>()).collect();
        assert_eq!(
            Frame::sync(doc.clone(), noise).packed().kind,
            FrameKind::Sync
        );
        // Not zstd: an error, not a panic.
        let bad = Frame {
            kind: FrameKind::SyncPacked,
            doc_id: Some(doc),
            body: vec![0xff; 64],
        };
        assert!(matches!(bad.unpacked(), Err(WireError::Unpack(_))));
    }

    #[test]
    fn a_sync_message_of_many_changes_goes_linked_and_comes_back_whole() {
        use automerge::{
            AutoCommit, ROOT,
            sync::{State, SyncDoc},
            transaction::Transactable,
        };
        // 300 changes, each on the one before, as a phone back from offline sends them.
        let mut doc = AutoCommit::new();
        for i in 0..300 {
            doc.put(ROOT, format!("task {i}"), "summarise the notes in ~/inbox")
                .unwrap();
            doc.commit();
        }
        // A version 1 message carrying them, as a sync round does for changes the peer lacks.
        let changes: Vec<Vec<u8>> = doc
            .get_changes(&[])
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect();
        let body = automerge::sync::Message {
            heads: doc.get_heads(),
            need: Vec::new(),
            have: Vec::new(),
            changes: changes.into(),
            flags: None,
            version: automerge::sync::MessageVersion::V1,
        }
        .encode();
        assert_eq!(
            automerge::sync::Message::decode(&body)
                .unwrap()
                .changes
                .len(),
            300
        );
        let d = DocId::parse("abc").unwrap();
        let plain = Frame::sync(d.clone(), body.clone());
        let packed = plain.clone().packed();
        assert_eq!(packed.kind, FrameKind::SyncPacked);
        // Without linking, the same body compressed at the same level.
        let unlinked = zstd::bulk::compress(&body, ZSTD_LEVEL).unwrap().len();
        assert!(
            packed.body.len() < unlinked * 3 / 4,
            "linked {} bytes, not linked {unlinked}",
            packed.body.len()
        );
        let back = Frame::decode(packed.encode()).unwrap().unpacked().unwrap();
        assert_eq!(back, plain);
        // And the restored changes apply.
        let mut fresh = AutoCommit::new();
        fresh
            .sync()
            .receive_sync_message(
                &mut State::new(),
                automerge::sync::Message::decode(&back.body).unwrap(),
            )
            .unwrap();
        assert_eq!(fresh.get_heads(), doc.get_heads());
    }

    #[test]
    fn a_packed_message_with_unsorted_heads_unpacks_without_a_panic() {
        // Found by fuzzing: unpacking decoded the message and encoded it again, and
        // Automerge's encoder asserts (in debug builds) that the heads are sorted.
        let mut doc = automerge::AutoCommit::new();
        for i in 0..10 {
            automerge::transaction::Transactable::put(
                &mut doc,
                automerge::ROOT,
                format!("task {i}"),
                "summarise the notes in ~/inbox and the CSVs beside them",
            )
            .unwrap();
            doc.commit();
        }
        let chunks: Vec<Vec<u8>> = doc
            .get_changes(&[])
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect();
        let mut body = vec![0x42, 2];
        body.extend_from_slice(&[0xff; 32]);
        body.extend_from_slice(&[0x01; 32]);
        body.extend_from_slice(&[0, 0, chunks.len() as u8]);
        for c in &chunks {
            // The length as LEB128 (each change is under 16 KiB).
            assert!(c.len() < 1 << 14);
            if c.len() < 0x80 {
                body.push(c.len() as u8);
            } else {
                body.extend_from_slice(&[(c.len() & 0x7f) as u8 | 0x80, (c.len() >> 7) as u8]);
            }
            body.extend_from_slice(c);
        }
        // Automerge reads it (the heads are not checked for order when reading).
        assert_eq!(
            automerge::sync::Message::decode(&body)
                .unwrap()
                .changes
                .len(),
            10
        );
        let plain = Frame::sync(DocId::parse("abc").unwrap(), body);
        let packed = plain.clone().packed();
        assert_eq!(packed.kind, FrameKind::SyncPacked);
        assert_eq!(packed.unpacked().unwrap(), plain);
    }

    #[test]
    fn a_zstd_bomb_stops_at_the_frame_limit_and_a_large_window_is_refused() {
        // A few KiB of zstd that unpack to 80 MiB of zeros.
        let zeros = vec![0u8; 80 * 1024 * 1024];
        let bomb = Frame {
            kind: FrameKind::SyncPacked,
            doc_id: Some(DocId::parse("abc").unwrap()),
            body: zstd::bulk::compress(&zeros, 3).unwrap(),
        };
        assert!(bomb.body.len() < 64 * 1024, "{}", bomb.body.len());
        assert!(matches!(bomb.unpacked(), Err(WireError::UnpacksTooLarge)));
        // A frame that asks for a 128 MiB window (the decoder would allocate it).
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        enc.window_log(27).unwrap();
        enc.long_distance_matching(true).unwrap();
        std::io::Write::write_all(&mut enc, &[7u8; 4096]).unwrap();
        let wide = Frame {
            kind: FrameKind::ChangesPacked,
            doc_id: Some(DocId::parse("abc").unwrap()),
            body: enc.finish().unwrap(),
        };
        assert!(matches!(wide.unpacked(), Err(WireError::Unpack(_))));
    }

    #[tokio::test]
    async fn an_oversized_length_is_refused_before_allocating() {
        let mut data: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut data).await,
            Err(WireError::TooLarge(_))
        ));
        let mut truncated: &[u8] = &[0, 0, 0, 10, 1, 0];
        assert!(read_frame(&mut truncated).await.is_err());
        let mut empty: &[u8] = &[];
        assert!(read_frame(&mut empty).await.unwrap().is_none());
    }
}
