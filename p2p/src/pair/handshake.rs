//! The handshake itself: both sides of `/errand/pair/1` over any `AsyncRead + AsyncWrite`
//! stream, with Noise and length-prefixed framing (the sequence is in [`super`]'s docs).

use std::{future::Future, io, time::Duration};

use errand_core::{Ticket, ticket::TicketId};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{PeerId, StreamProtocol};
use serde::{Serialize, de::DeserializeOwned};
use tracing::{Instrument, debug, info, info_span, warn};

use super::messages::{
    Ack, PairError, Paired, PhoneAck, PhoneHello, Reply, TicketBook, Welcome, check_hello,
    check_welcome, clip, parse_json,
};

/// The pairing protocol, negotiated by libp2p. Bump the version when the sequence or a payload
/// changes incompatibly.
pub const PAIR_PROTOCOL: StreamProtocol = StreamProtocol::new("/errand/pair/1");

/// Longest time one read or one write of the handshake may take. Every message is under 64 KiB
/// and a round trip through a relay takes well under a second, so 10 s only fails a peer that
/// has stalled or gone; a person is waiting on both screens and should hear about it soon.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest frame: 65535 bytes, snow's `MAXMSGLEN` (not exported by snow), which is also all a
/// `u16` length can say.
pub const MAX_FRAME: usize = u16::MAX as usize;

/// Bytes the AEAD tag adds to every encrypted payload (ChaChaPoly).
const TAG_LEN: usize = 16;

/// The Noise handshake pattern. `NNpsk0` suffices: the PeerIds are authenticated by libp2p and
/// bound through the prologue, so Noise static keys would add a round trip and nothing else.
const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";

/// What the prologue starts with: the protocol name and a NUL, so it cannot be mistaken for the
/// prologue of another protocol that also hashes PeerIds.
pub(super) const PROLOGUE_TAG: &[u8] = b"/errand/pair/1\0";

/// Length of a [`TicketId`] on the wire. `TicketId::from_bytes` takes exactly this many bytes,
/// so the build breaks if the ticket format changes it.
const TICKET_ID_LEN: usize = 8;

/// Noise overhead of a handshake message in this pattern: a 32-byte ephemeral key and a 16-byte
/// tag. Payloads of messages 1 and 2 may be at most `MAX_FRAME` minus this.
const HANDSHAKE_OVERHEAD: usize = 32 + TAG_LEN;

/// Desktop side: answers a phone that opened [`PAIR_PROTOCOL`].
///
/// `desktop` is our PeerId and `phone` the authenticated remote PeerId of the connection. The
/// `book` decides which tickets are live and counts wrong tries (see [`TicketBook`]). Every
/// error means nothing was persisted except a counted try; once [`TicketBook::accept`] has
/// succeeded this returns `Ok`, even if the phone never confirms (see [`Paired::ack`]). Closes
/// our half of `io` before returning.
pub async fn respond<S, B>(
    io: &mut S,
    desktop: PeerId,
    phone: PeerId,
    book: &mut B,
) -> Result<Paired, PairError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: TicketBook + ?Sized,
{
    respond_with(io, desktop, phone, book, STEP_TIMEOUT)
        .instrument(info_span!("pair", role = "desktop", %phone))
        .await
}

/// Phone side: pairs with `desktop` using `ticket`, over a stream we opened for
/// [`PAIR_PROTOCOL`].
///
/// `desktop` is the authenticated remote PeerId of the connection and must be the one the
/// ticket names; `phone` is our PeerId. `on_welcome` runs once the desktop has proven it holds
/// the secret and has already trusted us: it persists trust of the desktop and returns `Err`
/// with a reason if it cannot. The desktop is then told whether we stored the pairing. Returns
/// the welcome once `on_welcome` succeeded, even if the ack could not be delivered (the desktop
/// trusts us either way). Closes our half of `io` before returning.
pub async fn initiate<S, G, F>(
    io: &mut S,
    ticket: &Ticket,
    desktop: PeerId,
    phone: PeerId,
    hello: &PhoneHello,
    on_welcome: F,
) -> Result<Welcome<G>, PairError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    G: DeserializeOwned,
    F: FnOnce(&Welcome<G>) -> Result<(), String>,
{
    initiate_with(io, ticket, desktop, phone, hello, on_welcome, STEP_TIMEOUT)
        .instrument(info_span!("pair", role = "phone", %desktop))
        .await
}

// ---------------------------------------------------------------------------------------------
// Desktop phases

pub(super) async fn respond_with<S, B>(
    io: &mut S,
    desktop: PeerId,
    phone: PeerId,
    book: &mut B,
    step: Duration,
) -> Result<Paired, PairError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: TicketBook + ?Sized,
{
    let result = respond_steps(io, desktop, phone, book, step).await;
    match &result {
        Ok(paired) if paired.confirmed() => {
            info!(ticket = %paired.ticket, "paired, phone confirmed")
        }
        Ok(paired) => warn!(ticket = %paired.ticket, "paired, but the phone did not confirm"),
        Err(e) => info!(error = %e, "pairing failed"),
    }
    close_quietly(io, step).await;
    result
}

async fn respond_steps<S, B>(
    io: &mut S,
    desktop: PeerId,
    phone: PeerId,
    book: &mut B,
    step: Duration,
) -> Result<Paired, PairError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: TicketBook + ?Sized,
{
    // Phase 1: which ticket.
    let id = read_ticket_id(io, step).await?;
    let Some(secret) = book.secret(&id) else {
        return Err(PairError::UnknownTicket(id));
    };
    debug!(ticket = %id, "ticket is live");

    // Phase 2: message 1, proof that the phone holds the secret.
    let prologue = prologue(&desktop, &phone);
    let mut noise = snow::Builder::new(noise_params()?)
        .psk(0, secret.as_bytes())
        .and_then(|b| b.prologue(&prologue))
        .and_then(|b| b.build_responder())
        .map_err(noise_setup)?;
    let msg1 = read_frame(io, MAX_FRAME, "the phone's hello", step)
        .await?
        .ok_or_else(|| {
            PairError::Protocol("the phone closed the connection before its hello".into())
        })?;
    let mut payload = vec![0u8; MAX_FRAME];
    let len = match noise.read_message(&msg1, &mut payload) {
        Ok(len) => len,
        Err(e) => {
            book.record_failure(&id);
            warn!(ticket = %id, "pairing attempt did not decrypt; counted a try");
            return Err(match e {
                snow::Error::Decrypt => PairError::WrongSecret,
                _ => PairError::Protocol("the phone's first handshake message is malformed".into()),
            });
        }
    };
    let hello = match parse_json::<PhoneHello>(&payload[..len], "hello")
        .and_then(|h| check_hello(&h).map(|()| h))
    {
        Ok(hello) => hello,
        Err(problem) => {
            let reason = format!("the phone sent invalid pairing details: {problem}");
            send_rejection(io, &mut noise, &reason, step).await;
            return Err(PairError::Protocol(reason));
        }
    };

    // Phase 3: consume the ticket and persist trust, then welcome.
    let welcome = match book.accept(&id, phone, &hello) {
        Ok(welcome) => welcome,
        Err(reason) => {
            let reason = clip(reason);
            send_rejection(io, &mut noise, &reason, step).await;
            return Err(PairError::Rejected(reason));
        }
    };
    info!(ticket = %id, "ticket consumed, phone trusted");
    let ack = match welcome_and_await_ack(io, noise, &welcome, step).await {
        Ok(ack) => ack,
        Err(e) => PhoneAck::Unconfirmed(e),
    };
    Ok(Paired {
        ticket: id,
        phone,
        hello,
        ack,
    })
}

async fn read_ticket_id<S>(io: &mut S, step: Duration) -> Result<TicketId, PairError>
where
    S: AsyncRead + Unpin,
{
    let frame = read_frame(io, TICKET_ID_LEN, "the pairing code id", step)
        .await?
        .ok_or_else(|| {
            PairError::Protocol("the phone closed the connection before sending anything".into())
        })?;
    let bytes = <[u8; TICKET_ID_LEN]>::try_from(frame.as_slice()).map_err(|_| {
        PairError::Protocol(format!(
            "the pairing code id is {} bytes, expected {TICKET_ID_LEN}",
            frame.len()
        ))
    })?;
    Ok(TicketId::from_bytes(bytes))
}

/// Sends message 2 with a rejection, best effort: the pairing fails either way.
async fn send_rejection<S>(
    io: &mut S,
    noise: &mut snow::HandshakeState,
    reason: &str,
    step: Duration,
) where
    S: AsyncWrite + Unpin,
{
    let reply: Reply<&Welcome<()>> = Reply::Rejected {
        reason: reason.to_owned(),
    };
    if let Err(e) = write_handshake(io, noise, &reply, "the rejection", step).await {
        debug!(error = %e, "could not send the rejection");
    }
}

async fn welcome_and_await_ack<S, G>(
    io: &mut S,
    mut noise: snow::HandshakeState,
    welcome: &Welcome<G>,
    step: Duration,
) -> Result<PhoneAck, PairError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    G: Serialize,
{
    check_welcome(welcome)
        .map_err(|p| PairError::Invalid(format!("our welcome is invalid: {p}")))?;
    write_handshake(
        io,
        &mut noise,
        &Reply::Welcome(welcome),
        "the welcome",
        step,
    )
    .await?;
    let mut transport = noise.into_transport_mode().map_err(noise_setup)?;

    let frame = read_frame(io, MAX_FRAME, "the phone's confirmation", step)
        .await?
        .ok_or_else(|| {
            PairError::Protocol("the phone closed the connection without confirming".into())
        })?;
    let mut payload = vec![0u8; MAX_FRAME];
    let len = transport
        .read_message(&frame, &mut payload)
        .map_err(|_| PairError::Protocol("the phone's confirmation did not decrypt".into()))?;
    let ack = parse_json::<Ack>(&payload[..len], "confirmation").map_err(PairError::Protocol)?;
    Ok(match ack {
        Ack::Stored => PhoneAck::Stored,
        Ack::NotStored { reason } => PhoneAck::NotStored(clip(reason)),
    })
}

// ---------------------------------------------------------------------------------------------
// Phone phases

pub(super) async fn initiate_with<S, G, F>(
    io: &mut S,
    ticket: &Ticket,
    desktop: PeerId,
    phone: PeerId,
    hello: &PhoneHello,
    on_welcome: F,
    step: Duration,
) -> Result<Welcome<G>, PairError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    G: DeserializeOwned,
    F: FnOnce(&Welcome<G>) -> Result<(), String>,
{
    if ticket.desktop().to_bytes() != desktop.to_bytes() {
        return Err(PairError::WrongDesktop {
            ticket: ticket.desktop().clone(),
            connected: desktop,
        });
    }
    check_hello(hello).map_err(PairError::Invalid)?;
    let result = initiate_steps(io, ticket, desktop, phone, hello, on_welcome, step).await;
    match &result {
        Ok(_) => info!(ticket = %ticket.id(), "paired"),
        Err(e) => info!(ticket = %ticket.id(), error = %e, "pairing failed"),
    }
    close_quietly(io, step).await;
    result
}

async fn initiate_steps<S, G, F>(
    io: &mut S,
    ticket: &Ticket,
    desktop: PeerId,
    phone: PeerId,
    hello: &PhoneHello,
    on_welcome: F,
    step: Duration,
) -> Result<Welcome<G>, PairError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    G: DeserializeOwned,
    F: FnOnce(&Welcome<G>) -> Result<(), String>,
{
    // Phase 1 and 2: the ticket id, then message 1, without waiting in between.
    let prologue = prologue(&desktop, &phone);
    let mut noise = snow::Builder::new(noise_params()?)
        .psk(0, ticket.secret().as_bytes())
        .and_then(|b| b.prologue(&prologue))
        .and_then(|b| b.build_initiator())
        .map_err(noise_setup)?;
    write_frame(io, ticket.id().as_bytes(), "the pairing code id", step).await?;
    write_handshake(io, &mut noise, hello, "our hello", step).await?;

    // Phase 3: message 2, the desktop's proof and its welcome.
    let msg2 = read_frame(io, MAX_FRAME, "the desktop's welcome", step)
        .await?
        .ok_or(PairError::Refused)?;
    let mut payload = vec![0u8; MAX_FRAME];
    let len = noise
        .read_message(&msg2, &mut payload)
        .map_err(|e| match e {
            snow::Error::Decrypt => PairError::WrongSecret,
            _ => PairError::Protocol("the desktop's handshake message is malformed".into()),
        })?;
    let welcome = match parse_json::<Reply<Welcome<G>>>(&payload[..len], "welcome")
        .map_err(PairError::Protocol)?
    {
        Reply::Rejected { reason } => return Err(PairError::Rejected(clip(reason))),
        Reply::Welcome(welcome) => welcome,
    };
    let mut transport = noise.into_transport_mode().map_err(noise_setup)?;

    // Phase 4: store, then tell the desktop.
    let stored = check_welcome(&welcome)
        .map_err(|p| PairError::Protocol(format!("the desktop sent invalid pairing details: {p}")))
        .and_then(|()| on_welcome(&welcome).map_err(|r| PairError::NotSaved(clip(r))));
    let ack = match &stored {
        Ok(()) => Ack::Stored,
        Err(PairError::NotSaved(reason)) => Ack::NotStored {
            reason: reason.clone(),
        },
        Err(e) => Ack::NotStored {
            reason: clip(e.to_string()),
        },
    };
    let sent = write_transport(io, &mut transport, &ack, step).await;
    stored?;
    if let Err(e) = sent {
        // The desktop trusted us before sending the welcome; it only misses the confirmation.
        warn!(error = %e, "paired, but could not confirm to the desktop");
    }
    Ok(welcome)
}

// ---------------------------------------------------------------------------------------------
// Noise and framing

pub(super) fn noise_params() -> Result<snow::params::NoiseParams, PairError> {
    NOISE_PARAMS.parse().map_err(noise_setup)
}

/// A snow error outside of decrypting: a bug or an unsupported build, never the peer's doing.
fn noise_setup(e: snow::Error) -> PairError {
    PairError::Protocol(format!("the Noise handshake could not be set up ({e})"))
}

/// The prologue both sides must agree on (see the module docs).
pub(super) fn prologue(desktop: &PeerId, phone: &PeerId) -> Vec<u8> {
    let mut out = PROLOGUE_TAG.to_vec();
    for id in [desktop, phone] {
        let bytes = id.to_bytes();
        // A PeerId is a multihash of at most a few hundred bytes.
        let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    out
}

/// Serializes `payload`, sends it as the next handshake message.
async fn write_handshake<S, T>(
    io: &mut S,
    noise: &mut snow::HandshakeState,
    payload: &T,
    what: &'static str,
    step: Duration,
) -> Result<(), PairError>
where
    S: AsyncWrite + Unpin,
    T: Serialize + ?Sized,
{
    let json = to_json(payload, what, MAX_FRAME - HANDSHAKE_OVERHEAD)?;
    let mut msg = vec![0u8; MAX_FRAME];
    let len = noise.write_message(&json, &mut msg).map_err(noise_setup)?;
    write_frame(io, &msg[..len], what, step).await
}

/// Serializes `payload`, sends it as a transport message.
async fn write_transport<S, T>(
    io: &mut S,
    noise: &mut snow::TransportState,
    payload: &T,
    step: Duration,
) -> Result<(), PairError>
where
    S: AsyncWrite + Unpin,
    T: Serialize,
{
    let what = "our confirmation";
    let json = to_json(payload, what, MAX_FRAME - TAG_LEN)?;
    let mut msg = vec![0u8; MAX_FRAME];
    let len = noise.write_message(&json, &mut msg).map_err(noise_setup)?;
    write_frame(io, &msg[..len], what, step).await
}

fn to_json<T: Serialize + ?Sized>(
    payload: &T,
    what: &str,
    max: usize,
) -> Result<Vec<u8>, PairError> {
    let json = serde_json::to_vec(payload)
        .map_err(|_| PairError::Invalid(format!("{what} could not be encoded")))?;
    if json.len() > max {
        return Err(PairError::Invalid(format!(
            "{what} is {} bytes, at most {max} fit in one pairing message",
            json.len()
        )));
    }
    Ok(json)
}

pub(super) async fn write_frame<S>(
    io: &mut S,
    body: &[u8],
    what: &'static str,
    step: Duration,
) -> Result<(), PairError>
where
    S: AsyncWrite + Unpin,
{
    let len = u16::try_from(body.len()).map_err(|_| {
        PairError::Invalid(format!(
            "{what} is {} bytes, over the frame limit",
            body.len()
        ))
    })?;
    let mut frame = Vec::with_capacity(2 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(body);
    within(step, what, async {
        io.write_all(&frame).await?;
        io.flush().await
    })
    .await
}

/// Reads one frame of at most `max` bytes. `Ok(None)` if the stream ended before it began.
pub(super) async fn read_frame<S>(
    io: &mut S,
    max: usize,
    what: &'static str,
    step: Duration,
) -> Result<Option<Vec<u8>>, PairError>
where
    S: AsyncRead + Unpin,
{
    enum Read {
        Eof,
        TooLong(usize),
        Cut,
        Frame(Vec<u8>),
    }
    let read = within(step, what, async {
        let mut len = [0u8; 2];
        match io.read_exact(&mut len).await {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Read::Eof),
            other => other?,
        }
        let len = usize::from(u16::from_be_bytes(len));
        if len > max {
            return Ok(Read::TooLong(len));
        }
        let mut body = vec![0u8; len];
        match io.read_exact(&mut body).await {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Read::Cut),
            other => other.map(|()| Read::Frame(body)),
        }
    })
    .await?;
    match read {
        Read::Eof => Ok(None),
        Read::Frame(body) => Ok(Some(body)),
        Read::TooLong(len) => Err(PairError::Protocol(format!(
            "{what} is {len} bytes, at most {max} are allowed"
        ))),
        Read::Cut => Err(PairError::Protocol(format!(
            "the connection closed in the middle of {what}"
        ))),
    }
}

/// Runs one read or write under the step timeout.
async fn within<T>(
    step: Duration,
    what: &'static str,
    fut: impl Future<Output = io::Result<T>>,
) -> Result<T, PairError> {
    match tokio::time::timeout(step, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(PairError::Io(e)),
        Err(_) => Err(PairError::Timeout {
            waiting_for: what,
            after: step,
        }),
    }
}

/// Closes our half of the stream so that the other side reads a clean end, not a reset.
async fn close_quietly<S: AsyncWrite + Unpin>(io: &mut S, step: Duration) {
    if let Ok(Err(e)) = tokio::time::timeout(step, io.close()).await {
        debug!(error = %e, "could not close the pairing stream");
    }
}
