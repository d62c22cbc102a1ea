//! The wire format of `/errand/blob/1`: fixed-size binary frames, big-endian.
//!
//! - Request: `what: u8 | hash: 32 bytes | offset: u64 | len: u32` (45 bytes). `what` is
//!   [`What::Data`] (the blob's bytes) or [`What::Outboard`] (its chaining values).
//! - Response: `status: u8 | size: u64 | len: u32 | len bytes`. `size` is the blob's size;
//!   the bytes are the requested range, whole, or nothing when the status is not `Ok`.
//!
//! A response carries at most [`MAX_RANGE`] bytes: the requester asks range by range, and
//! each request and its response fit well inside a relay circuit's byte budget.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

/// The protocol id.
pub const BLOB_PROTOCOL: StreamProtocol = StreamProtocol::new("/errand/blob/1");

/// Most bytes one response carries: two groups. A relay that cuts circuits at 64 KiB (both
/// directions summed, with Noise, Yamux and the sync session's own frames) still lets one
/// request and its response through whole; the next goes over a new circuit.
pub const MAX_RANGE: u32 = 32 * 1024;

/// Length of a request frame.
pub const REQUEST_LEN: usize = 1 + 32 + 8 + 4;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum What {
    /// The blob's bytes.
    Data = 0,
    /// The blob's outboard (the chaining value of each group).
    Outboard = 1,
}

/// A range request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Bytes or outboard.
    pub what: What,
    /// The blob.
    pub hash: [u8; 32],
    /// Where the range starts.
    pub offset: u64,
    /// Its length, at most [`MAX_RANGE`].
    pub len: u32,
}

/// How the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Here is the range.
    Ok = 0,
    /// No task in the thread references this blob, or this device does not hold it whole.
    NotFound = 1,
    /// The range starts past the end or is longer than [`MAX_RANGE`].
    BadRange = 2,
}

impl Status {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Ok,
            1 => Self::NotFound,
            2 => Self::BadRange,
            _ => return None,
        })
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Writes a request.
pub async fn write_request<W: AsyncWrite + Unpin>(w: &mut W, r: &Request) -> io::Result<()> {
    write_requests(w, std::slice::from_ref(r)).await
}

/// Writes requests in one write (one frame on the connection, not one each).
pub async fn write_requests<W: AsyncWrite + Unpin>(
    w: &mut W,
    requests: &[Request],
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(REQUEST_LEN * requests.len());
    for r in requests {
        buf.push(r.what as u8);
        buf.extend_from_slice(&r.hash);
        buf.extend_from_slice(&r.offset.to_be_bytes());
        buf.extend_from_slice(&r.len.to_be_bytes());
    }
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads a request; `None` when the stream ended cleanly before one.
pub async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Request>> {
    let mut first = [0u8; 1];
    if r.read(&mut first).await? == 0 {
        return Ok(None);
    }
    read_request_after(r, first[0]).await.map(Some)
}

/// Reads a request like [`read_request`], but flushes the stream first when none has begun
/// to arrive: a server answers the requests already at hand, then flushes once.
pub async fn read_request_flushing<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> io::Result<Option<Request>> {
    let mut first = [0u8; 1];
    // Reading one byte either takes it or takes nothing, so a read that is not ready can be
    // dropped without losing a byte.
    let n = match futures::FutureExt::now_or_never(s.read(&mut first)) {
        Some(n) => n?,
        None => {
            s.flush().await?;
            s.read(&mut first).await?
        }
    };
    if n == 0 {
        return Ok(None);
    }
    read_request_after(s, first[0]).await.map(Some)
}

/// The rest of a request whose first byte was `first`.
async fn read_request_after<R: AsyncRead + Unpin>(r: &mut R, first: u8) -> io::Result<Request> {
    let mut buf = [0u8; REQUEST_LEN];
    buf[0] = first;
    r.read_exact(&mut buf[1..]).await?;
    let what = match buf[0] {
        0 => What::Data,
        1 => What::Outboard,
        _ => return Err(invalid("unknown request kind")),
    };
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&buf[1..33]);
    let offset = u64::from_be_bytes(buf[33..41].try_into().map_err(|_| invalid("offset"))?);
    let len = u32::from_be_bytes(buf[41..45].try_into().map_err(|_| invalid("len"))?);
    Ok(Request {
        what,
        hash,
        offset,
        len,
    })
}

/// Writes a response.
pub async fn write_response<W: AsyncWrite + Unpin>(
    w: &mut W,
    status: Status,
    size: u64,
    bytes: &[u8],
) -> io::Result<()> {
    write_response_unflushed(w, status, size, bytes).await?;
    w.flush().await
}

/// Writes a response without flushing: a server that has the next request at hand answers
/// it before it flushes.
pub async fn write_response_unflushed<W: AsyncWrite + Unpin>(
    w: &mut W,
    status: Status,
    size: u64,
    bytes: &[u8],
) -> io::Result<()> {
    let mut head = [0u8; 13];
    head[0] = status as u8;
    head[1..9].copy_from_slice(&size.to_be_bytes());
    head[9..13].copy_from_slice(&(bytes.len() as u32).to_be_bytes());
    // Two writes, not one copy of the body: the stream is flushed once per batch of answers,
    // so the head does not travel on its own (the Noise layer gathers what is written before
    // a flush into its frames).
    w.write_all(&head).await?;
    w.write_all(bytes).await
}

/// Reads a response, appending its body to `out` (a fetch gathers answers in its batch
/// without a copy); refuses one longer than `max` bytes before allocating. Returns the status and the blob's size; the body
/// is what `out` grew by. On an error `out` is as it was.
pub async fn read_response_into<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
    out: &mut Vec<u8>,
) -> io::Result<(Status, u64)> {
    let mut head = [0u8; 13];
    r.read_exact(&mut head).await?;
    let status = Status::from_u8(head[0]).ok_or_else(|| invalid("unknown status"))?;
    let size = u64::from_be_bytes(head[1..9].try_into().map_err(|_| invalid("size"))?);
    let len = u32::from_be_bytes(head[9..13].try_into().map_err(|_| invalid("len"))?);
    if len > max {
        return Err(invalid("response longer than requested"));
    }
    let at = out.len();
    out.resize(at + len as usize, 0);
    if let Err(e) = r.read_exact(&mut out[at..]).await {
        out.truncate(at);
        return Err(e);
    }
    Ok((status, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_and_responses_round_trip() {
        let req = Request {
            what: What::Outboard,
            hash: [7; 32],
            offset: 1 << 40,
            len: MAX_RANGE,
        };
        let mut buf = Vec::new();
        write_request(&mut buf, &req).await.unwrap();
        write_response(&mut buf, Status::Ok, 99, b"abc")
            .await
            .unwrap();
        let mut r = futures::io::Cursor::new(buf);
        assert_eq!(read_request(&mut r).await.unwrap(), Some(req));
        let mut body = Vec::new();
        assert_eq!(
            read_response_into(&mut r, 3, &mut body).await.unwrap(),
            (Status::Ok, 99)
        );
        assert_eq!(body, b"abc");
        assert_eq!(read_request(&mut r).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_response_longer_than_asked_is_refused_before_allocating() {
        let mut buf = Vec::new();
        write_response(&mut buf, Status::Ok, 1, &[0; 10])
            .await
            .unwrap();
        let mut r = futures::io::Cursor::new(buf);
        let mut body = Vec::new();
        assert!(read_response_into(&mut r, 9, &mut body).await.is_err());
        assert!(body.is_empty());
    }
}
