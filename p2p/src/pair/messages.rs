//! What the handshake carries and decides: the payloads, the ticket book a desktop answers
//! from, the outcome, the error, and the checks every payload passes.

use std::{fmt, io, time::Duration};

use errand_core::{
    DeviceId, DeviceKind,
    limits::{MAX_EXECUTORS, MAX_SHORT_TEXT_BYTES},
    ticket::{TicketId, TicketSecret},
};
use libp2p::PeerId;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de::DeserializeOwned};

/// Most bytes of an Automerge actor id. Automerge makes 16-byte ids; 64 leaves room for ids made
/// some other way while refusing junk.
pub(super) const MAX_ACTOR_BYTES: usize = 64;

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
/// The methods are synchronous and are called from the async task running [`respond`](super::respond), each at
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

// ---------------------------------------------------------------------------------------------
// Payloads on the wire

/// Message 2's payload.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Reply<W> {
    /// The pairing is accepted.
    Welcome(W),
    /// The phone proved it holds the secret, but the desktop refuses it.
    Rejected { reason: String },
}

/// The phone's transport message after the handshake.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Ack {
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

pub(super) fn check_hello(hello: &PhoneHello) -> Result<(), String> {
    check_text("the device name", &hello.name)?;
    check_actor(&hello.actor)
}

pub(super) fn check_welcome<G>(welcome: &Welcome<G>) -> Result<(), String> {
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

pub(super) fn check_text(what: &str, text: &str) -> Result<(), String> {
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

pub(super) fn check_actor(actor: &str) -> Result<(), String> {
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
pub(super) fn parse_json<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, String> {
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
pub(super) fn clip(mut text: String) -> String {
    if text.len() > MAX_SHORT_TEXT_BYTES {
        let mut end = MAX_SHORT_TEXT_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}
