//! `/errand/pair/1`: the pairing handshake between a phone and a desktop (DESIGN.md §7).
//!
//! Transport-agnostic: both sides run over any `futures` `AsyncRead + AsyncWrite` stream. In
//! production that is a `libp2p::Stream` for [`PAIR_PROTOCOL`] on a connection whose two PeerIds
//! libp2p has already authenticated; the unit tests use an in-memory pipe.
//!
//! # Wire format
//!
//! Every message is one frame: a big-endian `u16` length, then that many bytes (so at most 65535,
//! snow's `MAXMSGLEN`). Lengths are checked before anything is allocated, and every read and
//! every write must finish within [`STEP_TIMEOUT`]. Payloads are JSON.
//!
//! # Sequence
//!
//! The handshake is `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`, with the ticket secret as the PSK
//! (location 0) and this prologue, which binds the protocol and both PeerIds of the connection:
//! `b"/errand/pair/1\0"`, then the desktop's PeerId bytes and then the phone's, each preceded by
//! its length as a big-endian `u16`. A handshake relayed or replayed by a third peer, or one where
//! the phone dialled another desktop than the ticket names, does not decrypt.
//!
//! 1. **phone → desktop, clear:** the 8-byte [`TicketId`]. The desktop asks its [`TicketBook`] for
//!    the secret. An unknown, expired, used or dead ticket ends the exchange: the desktop closes
//!    the stream without a reply, so a peer without a ticket learns nothing.
//! 2. **phone → desktop, Noise message 1** (`psk, e`, payload encrypted under the PSK): the
//!    [`PhoneHello`]. The phone sends it right after the id, without waiting. If it does not
//!    decrypt, the desktop calls [`TicketBook::record_failure`] and closes. If it does, the phone
//!    has proven that it holds the secret: the desktop checks the hello and calls
//!    [`TicketBook::accept`], which consumes the ticket and persists trust of the phone *before*
//!    anything goes back.
//! 3. **desktop → phone, Noise message 2** (`e, ee`): the [`Welcome`], or a short rejection
//!    reason when the hello was invalid or `accept` failed. The handshake is now finished; that
//!    message decrypting proves to the phone that the desktop holds the secret too.
//! 4. **phone:** checks the welcome and runs its `on_welcome` callback, which persists trust of
//!    the desktop. Then **phone → desktop, Noise transport message:** the ack, "stored" or "not
//!    stored" with a reason.
//! 5. Both sides close their half of the stream.
//!
//! The ack is informative, not needed for safety: both sides persist trust only after the other
//! has proven it holds the one-time secret, and the desktop has persisted it by step 2. So once
//! `accept` has succeeded, [`respond`] returns `Ok`, with [`Paired::ack`] telling whether the
//! phone confirmed; the desktop reports full success only for [`PhoneAck::Stored`]. If the phone
//! never stored the pairing, the user revokes the phone and pairs again with a new ticket.
//!
//! Neither side ever logs a secret or a payload.

use std::{fmt, future::Future, io, time::Duration};

use errand_core::{
    DeviceId, DeviceKind, Ticket,
    limits::{MAX_EXECUTORS, MAX_SHORT_TEXT_BYTES},
    ticket::{TicketId, TicketSecret},
};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de::DeserializeOwned};
use tracing::{Instrument, debug, info, info_span, warn};

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
const PROLOGUE_TAG: &[u8] = b"/errand/pair/1\0";

/// Length of a [`TicketId`] on the wire. `TicketId::from_bytes` takes exactly this many bytes,
/// so the build breaks if the ticket format changes it.
const TICKET_ID_LEN: usize = 8;

/// Noise overhead of a handshake message in this pattern: a 32-byte ephemeral key and a 16-byte
/// tag. Payloads of messages 1 and 2 may be at most `MAX_FRAME` minus this.
const HANDSHAKE_OVERHEAD: usize = 32 + TAG_LEN;

/// Most bytes of an Automerge actor id. Automerge makes 16-byte ids; 64 leaves room for ids made
/// some other way while refusing junk.
const MAX_ACTOR_BYTES: usize = 64;

/// The phone's part of the handshake, sent encrypted in message 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhoneHello {
    /// A human name for the phone, such as "Ada's phone" (1 to 512 bytes).
    pub name: String,
    /// The phone's kind, normally [`DeviceKind::Phone`]; the [`TicketBook`] decides what it
    /// accepts.
    pub kind: DeviceKind,
    /// The phone's Automerge actor id, hex (1 to 64 bytes).
    pub actor: String,
}

/// The desktop's part of the handshake, sent encrypted in message 2.
///
/// `G` is the thread genesis; this module only carries it as JSON. `Debug` leaves out the
/// discovery secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome<G = serde_json::Value> {
    /// A human name for the desktop (1 to 512 bytes).
    pub name: String,
    /// The desktop's kind, normally [`DeviceKind::Desktop`].
    pub kind: DeviceKind,
    /// The desktop's Automerge actor id, hex (1 to 64 bytes).
    pub actor: String,
    /// What the phone needs to build the same thread document.
    pub genesis: G,
    /// The secret shared by the paired devices to find each other (hex on the wire).
    #[serde(with = "hex32")]
    pub discovery_secret: [u8; 32],
    /// The executors the desktop offers (at most 64 names of 1 to 512 bytes).
    pub executors: Vec<String>,
}

impl<G: fmt::Debug> fmt::Debug for Welcome<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Welcome")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("actor", &self.actor)
            .field("genesis", &self.genesis)
            .field("discovery_secret", &"<redacted>")
            .field("executors", &self.executors)
            .finish()
    }
}

/// The desktop's view of its tickets, implemented by the caller over its store.
///
/// The methods are synchronous and are called from the async task running [`respond`], each at
/// most once per handshake; keep them brief (a redb read or one small commit is fine). On a
/// multi-threaded runtime an implementation may wrap a slow commit in
/// `tokio::task::block_in_place`.
pub trait TicketBook {
    /// The thread genesis type carried in the [`Welcome`].
    type Genesis: Serialize;

    /// Looks up a live ticket's secret; `None` if it is unknown, expired, used or dead.
    fn secret(&mut self, id: &TicketId) -> Option<TicketSecret>;

    /// A handshake with this id failed to decrypt (a wrong secret, or a prologue naming other
    /// PeerIds): count a try. After 5 the caller kills the ticket.
    fn record_failure(&mut self, id: &TicketId);

    /// Message 1 decrypted, so `phone` holds the ticket's secret: consume the ticket (single use,
    /// durably), persist trust of `phone`, and return the welcome to send. This must be atomic:
    /// either all of it is persisted and `Ok`, or nothing and `Err`.
    ///
    /// An `Err` aborts the pairing; its text is sent to the phone, which has proven it holds the
    /// secret, and shown there. Make it a sentence a person can act on, without secrets or paths.
    fn accept(
        &mut self,
        id: &TicketId,
        phone: PeerId,
        hello: &PhoneHello,
    ) -> Result<Welcome<Self::Genesis>, String>;
}

/// A pairing the desktop has accepted and persisted.
#[derive(Debug)]
pub struct Paired {
    /// The ticket that was used (and is now consumed).
    pub ticket: TicketId,
    /// The phone, now trusted.
    pub phone: PeerId,
    /// What the phone said about itself.
    pub hello: PhoneHello,
    /// Whether the phone confirmed it stored the pairing.
    pub ack: PhoneAck,
}

impl Paired {
    /// True if the phone confirmed it stored the pairing: only then do both sides hold it.
    pub fn confirmed(&self) -> bool {
        matches!(self.ack, PhoneAck::Stored)
    }
}

/// The phone's answer to the welcome. The desktop trusts the phone in every case.
#[derive(Debug)]
pub enum PhoneAck {
    /// The phone stored the pairing.
    Stored,
    /// The phone got the welcome but did not store it, for the reason it gave (at most 512
    /// bytes). Revoke the phone and pair again.
    NotStored(String),
    /// No valid ack arrived: the welcome could not be sent, or the ack timed out, was cut off or
    /// was malformed. The phone may or may not have stored the pairing.
    Unconfirmed(PairError),
}

/// Why a pairing failed.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// Phone: the ticket names another desktop than the peer we are connected to.
    #[error(
        "this pairing code was made by desktop {ticket}, but the connected device is \
         {connected}; scan the code shown on the desktop you want to pair with"
    )]
    WrongDesktop {
        /// The desktop the ticket names.
        ticket: DeviceId,
        /// The peer at the other end of the connection.
        connected: PeerId,
    },
    /// Desktop: the phone sent the id of a ticket that is unknown, expired, used or dead.
    #[error(
        "pairing code {0} is unknown, expired, already used, or blocked after too many wrong \
         tries; ask for a new pairing code on the desktop: errand-desktop pair"
    )]
    UnknownTicket(TicketId),
    /// Phone: the desktop closed the stream instead of answering. It does so for an unknown,
    /// used or expired ticket and for a wrong secret, and does not say which.
    #[error(
        "the desktop refused the pairing code: it may be used, expired, or mistyped; ask for a \
         new pairing code on the desktop: errand-desktop pair"
    )]
    Refused,
    /// A handshake message did not decrypt: the two sides do not hold the same secret, or do not
    /// agree on the PeerIds.
    #[error(
        "the pairing secret did not match: the code was mistyped or damaged, or the other \
         device is not the one showing it; ask for a new pairing code on the desktop: \
         errand-desktop pair"
    )]
    WrongSecret,
    /// The other side did not send or take a message in time.
    #[error(
        "pairing timed out after {after:?} waiting for {waiting_for}; check that both devices \
         are online and try again"
    )]
    Timeout {
        /// The message or step we were waiting for.
        waiting_for: &'static str,
        /// How long we waited.
        after: Duration,
    },
    /// The stream failed.
    #[error("the pairing connection failed; check that both devices are online and try again")]
    Io(#[source] io::Error),
    /// The other side broke the protocol: a malformed frame or payload.
    #[error(
        "pairing failed: {0}; make sure both devices run the same version of Errand and try \
         again"
    )]
    Protocol(String),
    /// The desktop refused a phone that proved it holds the secret, for the reason given.
    #[error("pairing was rejected: {0}")]
    Rejected(String),
    /// Phone: our own hello is invalid, so nothing was sent.
    #[error("cannot pair: {0}")]
    Invalid(String),
    /// Phone: the `on_welcome` callback could not persist the pairing. The desktop was told.
    #[error(
        "this device could not save the pairing: {0}; ask for a new pairing code on the \
         desktop (errand-desktop pair) and try again"
    )]
    NotSaved(String),
}

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

async fn respond_with<S, B>(
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

async fn initiate_with<S, G, F>(
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
// Payloads on the wire

/// Message 2's payload.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply<W> {
    /// The pairing is accepted.
    Welcome(W),
    /// The phone proved it holds the secret, but the desktop refuses it.
    Rejected { reason: String },
}

/// The phone's transport message after the handshake.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Ack {
    /// The phone persisted trust of the desktop.
    Stored,
    /// It did not, for this reason.
    NotStored { reason: String },
}

/// `[u8; 32]` as 64 hex digits.
mod hex32 {
    use super::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&text, &mut out)
            .map_err(|_| serde::de::Error::custom("expected 64 hex digits"))?;
        Ok(out)
    }
}

fn check_hello(hello: &PhoneHello) -> Result<(), String> {
    check_text("the device name", &hello.name)?;
    check_actor(&hello.actor)
}

fn check_welcome<G>(welcome: &Welcome<G>) -> Result<(), String> {
    check_text("the device name", &welcome.name)?;
    check_actor(&welcome.actor)?;
    if welcome.executors.len() > MAX_EXECUTORS {
        return Err(format!(
            "{} executors are listed, at most {MAX_EXECUTORS} are allowed",
            welcome.executors.len()
        ));
    }
    welcome
        .executors
        .iter()
        .try_for_each(|e| check_text("an executor name", e))
}

fn check_text(what: &str, text: &str) -> Result<(), String> {
    if text.trim().is_empty() {
        return Err(format!("{what} is empty"));
    }
    if text.len() > MAX_SHORT_TEXT_BYTES {
        return Err(format!(
            "{what} is {} bytes, at most {MAX_SHORT_TEXT_BYTES} are allowed",
            text.len()
        ));
    }
    Ok(())
}

fn check_actor(actor: &str) -> Result<(), String> {
    let ok = !actor.is_empty()
        && actor.len() <= 2 * MAX_ACTOR_BYTES
        && actor.len().is_multiple_of(2)
        && actor.bytes().all(|b| b.is_ascii_hexdigit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the Automerge actor id is not 1 to {MAX_ACTOR_BYTES} bytes of hex"
        ))
    }
}

/// Parses a decrypted payload. The error names the position only, never the content.
fn parse_json<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "the {what} is not in the expected form (JSON line {}, column {})",
            e.line(),
            e.column()
        )
    })
}

/// Cuts a reason from the other side (or for it) to [`MAX_SHORT_TEXT_BYTES`], at a character
/// boundary.
fn clip(mut text: String) -> String {
    if text.len() > MAX_SHORT_TEXT_BYTES {
        let mut end = MAX_SHORT_TEXT_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Noise and framing

fn noise_params() -> Result<snow::params::NoiseParams, PairError> {
    NOISE_PARAMS.parse().map_err(noise_setup)
}

/// A snow error outside of decrypting: a bug or an unsupported build, never the peer's doing.
fn noise_setup(e: snow::Error) -> PairError {
    PairError::Protocol(format!("the Noise handshake could not be set up ({e})"))
}

/// The prologue both sides must agree on (see the module docs).
fn prologue(desktop: &PeerId, phone: &PeerId) -> Vec<u8> {
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

async fn write_frame<S>(
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
async fn read_frame<S>(
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

#[cfg(test)]
mod tests {
    use std::{cell::Cell, collections::HashMap, str::FromStr};

    use futures::{AsyncReadExt, AsyncWriteExt};
    use libp2p::identity::Keypair;
    use serde_json::json;
    use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

    use super::*;

    type Pipe = Compat<tokio::io::DuplexStream>;

    /// Short enough to keep the timeout tests fast, long enough for the in-memory happy path.
    const TEST_STEP: Duration = Duration::from_millis(300);

    fn peer() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    fn ticket_for(desktop: PeerId) -> Ticket {
        let now = 1_700_000_000_000;
        Ticket::new(
            DeviceId::from_str(&desktop.to_base58()).unwrap(),
            ["/ip4/127.0.0.1/tcp/1"],
            60_000,
            now,
        )
    }

    fn pipe() -> (Pipe, Pipe) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        (a.compat(), b.compat())
    }

    fn hello() -> PhoneHello {
        PhoneHello {
            name: "Ada's phone".into(),
            kind: DeviceKind::Phone,
            actor: "00112233445566778899aabbccddeeff".into(),
        }
    }

    fn welcome() -> Welcome {
        Welcome {
            name: "Ada's laptop".into(),
            kind: DeviceKind::Desktop,
            actor: "ffeeddccbbaa99887766554433221100".into(),
            genesis: json!({"thread_id": "01HZZZ", "owner_actor": "ff"}),
            discovery_secret: [7; 32],
            executors: vec!["claude".into(), "shell".into()],
        }
    }

    /// An in-memory store: consumes tickets on accept, records everything.
    #[derive(Default)]
    struct Book {
        live: HashMap<TicketId, TicketSecret>,
        failures: Vec<TicketId>,
        accepted: Vec<(TicketId, PeerId, PhoneHello)>,
        refuse: Option<String>,
    }

    impl Book {
        fn with(ticket: &Ticket) -> Self {
            let mut book = Book::default();
            book.live.insert(ticket.id(), ticket.secret().clone());
            book
        }
    }

    impl TicketBook for Book {
        type Genesis = serde_json::Value;

        fn secret(&mut self, id: &TicketId) -> Option<TicketSecret> {
            self.live.get(id).cloned()
        }

        fn record_failure(&mut self, id: &TicketId) {
            self.failures.push(*id);
        }

        fn accept(
            &mut self,
            id: &TicketId,
            phone: PeerId,
            hello: &PhoneHello,
        ) -> Result<Welcome, String> {
            if let Some(reason) = &self.refuse {
                return Err(reason.clone());
            }
            self.live.remove(id);
            self.accepted.push((*id, phone, hello.clone()));
            Ok(welcome())
        }
    }

    /// Runs both sides over one pipe; `claimed_desktop` and `seen_phone` let a test make the two
    /// sides disagree on PeerIds.
    async fn run(
        ticket: &Ticket,
        book: &mut Book,
        desktop: PeerId,
        phone: PeerId,
        claimed_desktop: PeerId,
        seen_phone: PeerId,
        store: impl FnOnce(&Welcome) -> Result<(), String>,
    ) -> (Result<Paired, PairError>, Result<Welcome, PairError>) {
        let (mut d, mut p) = pipe();
        let hello = hello();
        tokio::join!(
            respond_with(&mut d, desktop, seen_phone, book, TEST_STEP),
            initiate_with(
                &mut p,
                ticket,
                claimed_desktop,
                phone,
                &hello,
                store,
                TEST_STEP
            ),
        )
    }

    async fn pair_normally(
        ticket: &Ticket,
        book: &mut Book,
        desktop: PeerId,
        phone: PeerId,
    ) -> (Result<Paired, PairError>, Result<Welcome, PairError>) {
        run(ticket, book, desktop, phone, desktop, phone, |_| Ok(())).await
    }

    #[tokio::test]
    async fn pairing_gives_each_side_the_others_details() {
        let (desktop, phone) = (peer(), peer());
        let ticket = ticket_for(desktop);
        let mut book = Book::with(&ticket);
        let stored = Cell::new(false);
        let (d, p) = run(&ticket, &mut book, desktop, phone, desktop, phone, |w| {
            assert_eq!(w, &welcome());
            stored.set(true);
            Ok(())
        })
        .await;

        let paired = d.unwrap();
        assert_eq!(paired.ticket, ticket.id());
        assert_eq!(paired.phone, phone);
        assert_eq!(paired.hello, hello());
        assert!(matches!(paired.ack, PhoneAck::Stored));
        assert!(paired.confirmed());
        assert_eq!(p.unwrap(), welcome());
        assert!(stored.get());
        assert_eq!(book.accepted, vec![(ticket.id(), phone, hello())]);
        assert!(book.failures.is_empty());
        assert!(book.live.is_empty(), "ticket consumed");
    }

    #[tokio::test]
    async fn a_ticket_pairs_only_once() {
        let (desktop, phone) = (peer(), peer());
        let ticket = ticket_for(desktop);
        let mut book = Book::with(&ticket);
        let (d, p) = pair_normally(&ticket, &mut book, desktop, phone).await;
        assert!(d.is_ok() && p.is_ok());

        let (d, p) = pair_normally(&ticket, &mut book, desktop, peer()).await;
        assert!(matches!(d, Err(PairError::UnknownTicket(id)) if id == ticket.id()));
        assert!(matches!(p, Err(PairError::Refused)), "{p:?}");
        assert_eq!(book.accepted.len(), 1);
    }

    #[tokio::test]
    async fn one_flipped_secret_bit_fails_both_sides_and_counts_a_try() {
        let (desktop, phone) = (peer(), peer());
        let ticket = ticket_for(desktop);
        let mut secret = *ticket.secret().as_bytes();
        secret[17] ^= 0x04;
        let mut book = Book::default();
        book.live
            .insert(ticket.id(), TicketSecret::from_bytes(secret));
        let called = Cell::new(false);
        let (d, p) = run(&ticket, &mut book, desktop, phone, desktop, phone, |_| {
            called.set(true);
            Ok(())
        })
        .await;

        assert!(matches!(d, Err(PairError::WrongSecret)), "{d:?}");
        assert!(matches!(p, Err(PairError::Refused)), "{p:?}");
        assert_eq!(book.failures, vec![ticket.id()]);
        assert!(book.accepted.is_empty());
        assert!(!called.get());
        assert_eq!(
            book.live.len(),
            1,
            "the caller, not this module, kills tickets"
        );
    }

    #[tokio::test]
    async fn unknown_ticket_is_refused_without_counting_a_try() {
        let (desktop, phone) = (peer(), peer());
        let ticket = ticket_for(desktop);
        let mut book = Book::default();
        let (d, p) = pair_normally(&ticket, &mut book, desktop, phone).await;

        assert!(matches!(d, Err(PairError::UnknownTicket(id)) if id == ticket.id()));
        assert!(matches!(p, Err(PairError::Refused)), "{p:?}");
        assert!(book.failures.is_empty() && book.accepted.is_empty());
    }

    #[tokio::test]
    async fn phone_that_dialled_another_desktop_fails_the_handshake() {
        // The phone believes it talks to `other` (and holds a ticket naming it), but the stream
        // ends at `desktop`, which knows the same ticket id and secret: the prologues differ.
        let (desktop, phone, other) = (peer(), peer(), peer());
        let ticket = ticket_for(other);
        let mut book = Book::with(&ticket);
        let (d, p) = run(&ticket, &mut book, desktop, phone, other, phone, |_| Ok(())).await;

        assert!(matches!(d, Err(PairError::WrongSecret)), "{d:?}");
        assert!(matches!(p, Err(PairError::Refused)), "{p:?}");
        assert_eq!(book.failures, vec![ticket.id()]);
        assert!(book.accepted.is_empty());
    }

    #[tokio::test]
    async fn handshake_relayed_from_another_phone_fails() {
        let (desktop, phone) = (peer(), peer());
        let ticket = ticket_for(desktop);
        let mut book = Book::with(&ticket);
        let (d, p) = run(&ticket, &mut book, desktop, phone, desktop, peer(), |_| {
            Ok(())
        })
        .await;

        assert!(matches!(d, Err(PairError::WrongSecret)), "{d:?}");
        assert!(matches!(p, Err(PairError::Refused)), "{p:?}");
        assert!(book.accepted.is_empty());
    }

    #[tokio::test]
    async fn ticket_for_another_desktop_is_refused_before_sending_anything() {
        let (desktop, phone) = (peer(), peer());
        let ticket = ticket_for(peer());
        let (mut d, mut p) = pipe();
        let err = initiate_with(
            &mut p,
            &ticket,
            desktop,
            phone,
            &hello(),
            |_: &Welcome| Ok(()),
            TEST_STEP,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, PairError::WrongDesktop { .. }), "{err:?}");
        assert!(err.to_string().contains("scan the code"), "{err}");
        drop(p);
        let mut rest = Vec::new();
        d.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "nothing was sent");
    }

    #[tokio::test]
    async fn desktop_rejection_reaches_the_phone_and_persists_nothing() {
        let (desktop, phone) = (peer(), peer());
        let ticket = ticket_for(desktop);
        let mut book = Book::with(&ticket);
        book.refuse = Some("this desktop already has 8 phones; revoke one first".into());
        let (d, p) = pair_normally(&ticket, &mut book, desktop, phone).await;

        assert!(
            matches!(&d, Err(PairError::Rejected(r)) if r.contains("8 phones")),
            "{d:?}"
        );
        assert!(
            matches!(&p, Err(PairError::Rejected(r)) if r.contains("8 phones")),
            "{p:?}"
        );
        assert!(book.accepted.is_empty() && book.failures.is_empty());
        assert_eq!(book.live.len(), 1);
    }

    #[tokio::test]
    async fn phone_that_cannot_save_tells_the_desktop() {
        let (desktop, phone) = (peer(), peer());
        let ticket = ticket_for(desktop);
        let mut book = Book::with(&ticket);
        let (d, p) = run(&ticket, &mut book, desktop, phone, desktop, phone, |_| {
            Err("disk full".into())
        })
        .await;

        let paired = d.unwrap();
        assert!(matches!(&paired.ack, PhoneAck::NotStored(r) if r == "disk full"));
        assert!(!paired.confirmed());
        assert!(
            matches!(&p, Err(PairError::NotSaved(r)) if r == "disk full"),
            "{p:?}"
        );
        assert_eq!(
            book.accepted.len(),
            1,
            "the desktop trusted the phone anyway"
        );
    }

    #[tokio::test]
    async fn invalid_hello_is_refused_locally() {
        let (desktop, phone) = (peer(), peer());
        let ticket = ticket_for(desktop);
        for bad in [
            PhoneHello {
                name: "x".repeat(MAX_SHORT_TEXT_BYTES + 1),
                ..hello()
            },
            PhoneHello {
                name: " ".into(),
                ..hello()
            },
            PhoneHello {
                actor: "xyz".into(),
                ..hello()
            },
            PhoneHello {
                actor: "a".repeat(2 * MAX_ACTOR_BYTES + 2),
                ..hello()
            },
        ] {
            let (_d, mut p) = pipe();
            let err = initiate_with(
                &mut p,
                &ticket,
                desktop,
                phone,
                &bad,
                |_: &Welcome| Ok(()),
                TEST_STEP,
            )
            .await
            .unwrap_err();
            assert!(matches!(err, PairError::Invalid(_)), "{err:?}");
        }
    }

    /// A phone that holds the secret but sends `payload` as its hello.
    async fn rogue_phone(
        io: &mut Pipe,
        ticket: &Ticket,
        desktop: PeerId,
        phone: PeerId,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut noise = snow::Builder::new(noise_params().unwrap())
            .psk(0, ticket.secret().as_bytes())
            .unwrap()
            .prologue(&prologue(&desktop, &phone))
            .unwrap()
            .build_initiator()
            .unwrap();
        write_frame(io, ticket.id().as_bytes(), "id", TEST_STEP)
            .await
            .unwrap();
        let mut msg = vec![0u8; MAX_FRAME];
        let len = noise.write_message(payload, &mut msg).unwrap();
        write_frame(io, &msg[..len], "hello", TEST_STEP)
            .await
            .unwrap();
        let reply = read_frame(io, MAX_FRAME, "reply", TEST_STEP)
            .await
            .unwrap()
            .unwrap();
        let len = noise.read_message(&reply, &mut msg).unwrap();
        msg.truncate(len);
        msg
    }

    #[tokio::test]
    async fn hello_that_decrypts_but_is_malformed_is_rejected_without_a_try() {
        let (desktop, phone) = (peer(), peer());
        let ticket = ticket_for(desktop);
        for payload in [
            b"not json".to_vec(),
            br#"{"name":"a","kind":"toaster","actor":"00"}"#.to_vec(),
            br#"{"name":"a","kind":"phone","actor":"0g"}"#.to_vec(),
        ] {
            let mut book = Book::with(&ticket);
            let (mut d, mut p) = pipe();
            let (res, reply) = tokio::join!(
                respond_with(&mut d, desktop, phone, &mut book, TEST_STEP),
                rogue_phone(&mut p, &ticket, desktop, phone, &payload),
            );
            assert!(matches!(res, Err(PairError::Protocol(_))), "{res:?}");
            let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
            assert!(reply["rejected"]["reason"].is_string(), "{reply}");
            assert!(book.accepted.is_empty() && book.failures.is_empty());
        }
    }

    /// Runs the desktop against raw bytes from a fake phone, which then closes.
    async fn desktop_against(bytes: &[u8], book: &mut Book) -> Result<Paired, PairError> {
        let (mut d, mut p) = pipe();
        p.write_all(bytes).await.unwrap();
        p.close().await.unwrap();
        respond_with(&mut d, peer(), peer(), book, TEST_STEP).await
    }

    #[tokio::test]
    async fn garbage_from_the_phone_is_an_error_not_a_panic() {
        let ticket = ticket_for(peer());
        let id = *ticket.id().as_bytes();
        let frame = |body: &[u8]| [&(body.len() as u16).to_be_bytes()[..], body].concat();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty stream", vec![]),
            ("text", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
            ("oversize id frame", vec![0xff, 0xff]),
            ("short id frame", frame(&id[..7])),
            ("half a length", vec![0]),
            ("cut id frame", vec![0, 8, 1, 2, 3]),
            ("id then nothing", frame(&id)),
            (
                "id then cut message",
                [frame(&id), vec![0, 200, 1, 2]].concat(),
            ),
        ];
        for (name, bytes) in cases {
            let mut book = Book::with(&ticket);
            let res = desktop_against(&bytes, &mut book).await;
            assert!(
                matches!(res, Err(PairError::Protocol(_))),
                "{name}: {res:?}"
            );
            assert!(book.failures.is_empty(), "{name}");
            assert!(book.accepted.is_empty(), "{name}");
        }
        // A message of the right id but random or too short bytes counts as a wrong try.
        for (name, msg) in [("random", vec![0x5a; 120]), ("short", vec![1, 2, 3])] {
            let mut book = Book::with(&ticket);
            let res = desktop_against(&[frame(&id), frame(&msg)].concat(), &mut book).await;
            assert!(
                matches!(res, Err(PairError::WrongSecret | PairError::Protocol(_))),
                "{name}: {res:?}"
            );
            assert_eq!(book.failures, vec![ticket.id()], "{name}");
            assert!(book.accepted.is_empty(), "{name}");
        }
    }

    #[tokio::test]
    async fn garbage_from_the_desktop_is_an_error_not_a_panic() {
        let (desktop, phone) = (peer(), peer());
        let ticket = ticket_for(desktop);
        let frame = |body: &[u8]| [&(body.len() as u16).to_be_bytes()[..], body].concat();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("random message", frame(&[0xa5; 200])),
            ("short message", frame(&[1; 10])),
            ("cut frame", vec![0xff, 0xff, 1, 2, 3]),
        ];
        for (name, bytes) in cases {
            let (mut d, mut p) = pipe();
            d.write_all(&bytes).await.unwrap();
            d.close().await.unwrap();
            let res = initiate_with(
                &mut p,
                &ticket,
                desktop,
                phone,
                &hello(),
                |_: &Welcome| Ok(()),
                TEST_STEP,
            )
            .await;
            assert!(
                matches!(res, Err(PairError::WrongSecret | PairError::Protocol(_))),
                "{name}: {res:?}"
            );
        }
    }

    #[tokio::test]
    async fn silent_phone_times_out() {
        let ticket = ticket_for(peer());
        let mut book = Book::with(&ticket);
        let (mut d, _p) = pipe();
        let res = respond_with(&mut d, peer(), peer(), &mut book, TEST_STEP).await;
        assert!(matches!(res, Err(PairError::Timeout { .. })), "{res:?}");
        assert!(res.unwrap_err().to_string().contains("try again"));

        // Sends the id, then stalls.
        let (mut d, mut p) = pipe();
        write_frame(&mut p, ticket.id().as_bytes(), "id", TEST_STEP)
            .await
            .unwrap();
        let res = respond_with(&mut d, peer(), peer(), &mut book, TEST_STEP).await;
        assert!(
            matches!(res, Err(PairError::Timeout { waiting_for, .. }) if waiting_for == "the phone's hello")
        );
        assert!(book.failures.is_empty());
    }

    #[tokio::test]
    async fn silent_desktop_times_out() {
        let (desktop, phone) = (peer(), peer());
        let ticket = ticket_for(desktop);
        let (_d, mut p) = pipe();
        let res = initiate_with(
            &mut p,
            &ticket,
            desktop,
            phone,
            &hello(),
            |_: &Welcome| Ok(()),
            TEST_STEP,
        )
        .await;
        assert!(
            matches!(res, Err(PairError::Timeout { waiting_for, .. }) if waiting_for == "the desktop's welcome"),
            "{res:?}"
        );
    }

    #[tokio::test]
    async fn missing_ack_still_leaves_the_phone_paired_on_the_desktop() {
        // The phone's ack is informative: a phone that stops after the welcome is still trusted.
        let (desktop, phone) = (peer(), peer());
        let ticket = ticket_for(desktop);
        let mut book = Book::with(&ticket);
        let (mut d, mut p) = pipe();
        let hello = serde_json::to_vec(&hello()).unwrap();
        let (res, _) = tokio::join!(
            respond_with(&mut d, desktop, phone, &mut book, TEST_STEP),
            rogue_phone(&mut p, &ticket, desktop, phone, &hello),
        );
        let paired = res.unwrap();
        assert!(
            matches!(paired.ack, PhoneAck::Unconfirmed(PairError::Timeout { .. })),
            "{:?}",
            paired.ack
        );
        assert_eq!(book.accepted.len(), 1);
    }

    #[test]
    fn futures_are_send_so_callers_can_spawn_them() {
        fn assert_send<T: Send>(_: T) {}
        let (mut d, mut p) = pipe();
        let mut book = Book::default();
        let ticket = ticket_for(peer());
        let hello = hello();
        assert_send(respond(&mut d, peer(), peer(), &mut book));
        assert_send(initiate(
            &mut p,
            &ticket,
            peer(),
            peer(),
            &hello,
            |_: &Welcome| Ok(()),
        ));
    }

    #[test]
    fn welcome_debug_hides_the_discovery_secret() {
        let w = Welcome {
            discovery_secret: [0xab; 32],
            ..welcome()
        };
        let dbg = format!("{w:?}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
        assert!(!dbg.to_lowercase().contains("abab"), "{dbg}");
        assert!(!dbg.contains("171"), "{dbg}");
    }

    #[test]
    fn welcome_round_trips_with_a_hex_secret() {
        let json = serde_json::to_value(welcome()).unwrap();
        assert_eq!(json["discovery_secret"], "07".repeat(32));
        assert_eq!(serde_json::from_value::<Welcome>(json).unwrap(), welcome());
        let mut bad = serde_json::to_value(welcome()).unwrap();
        bad["discovery_secret"] = "07".into();
        assert!(serde_json::from_value::<Welcome>(bad).is_err());
    }

    #[test]
    fn prologue_binds_the_protocol_and_both_peers_in_order() {
        let (a, b) = (peer(), peer());
        let p = prologue(&a, &b);
        assert!(p.starts_with(b"/errand/pair/1\0"));
        assert_ne!(p, prologue(&b, &a));
        let a_len = a.to_bytes().len();
        assert_eq!(p.len(), PROLOGUE_TAG.len() + 4 + a_len + b.to_bytes().len());
        assert_eq!(
            &p[PROLOGUE_TAG.len()..PROLOGUE_TAG.len() + 2],
            &(a_len as u16).to_be_bytes()
        );
    }

    #[test]
    fn every_error_tells_a_person_what_to_do() {
        let errors = [
            PairError::WrongDesktop {
                ticket: DeviceId::from_str(&peer().to_base58()).unwrap(),
                connected: peer(),
            },
            PairError::UnknownTicket(TicketId::from_bytes([1; 8])),
            PairError::Refused,
            PairError::WrongSecret,
            PairError::Timeout {
                waiting_for: "the desktop's welcome",
                after: STEP_TIMEOUT,
            },
            PairError::Io(io::ErrorKind::BrokenPipe.into()),
            PairError::Protocol("the hello is not in the expected form".into()),
            PairError::NotSaved("disk full".into()),
        ];
        for e in errors {
            let msg = e.to_string();
            assert!(
                ["errand-desktop pair", "try again", "scan the code"]
                    .iter()
                    .any(|hint| msg.contains(hint)),
                "{msg}"
            );
        }
    }

    #[test]
    fn clip_cuts_at_a_character_boundary() {
        let long = "é".repeat(MAX_SHORT_TEXT_BYTES);
        let cut = clip(long);
        assert!(cut.len() <= MAX_SHORT_TEXT_BYTES && cut.chars().all(|c| c == 'é'));
        assert_eq!(clip("short".into()), "short");
    }
}
