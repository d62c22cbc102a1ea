//! `/errand/pair/1`: the pairing handshake between a phone and a desktop (DESIGN.md §7), the
//! desktop's tickets, and its responder.
//!
//! - `handshake` and `messages`: the exchange below, transport-agnostic.
//! - [`tickets`]: the ticket book in the desktop's store, the pairing window, the discovery
//!   secret.
//! - [`service`]: the desktop's responder ([`serve`]), at most [`MAX_CONCURRENT_PAIRINGS`]
//!   handshakes at once.
//!
//! This folder works on a [`Desk`] (the replica, the gate, this device) and the node, never
//! on the `Peer`; pairing as a `Peer` does it is `crate::peer::pairing`.
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
//! 1. **phone → desktop, clear:** the 8-byte [`TicketId`](errand_core::ticket::TicketId). The desktop asks its [`TicketBook`] for
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

mod handshake;
mod messages;
pub mod service;
#[cfg(test)]
mod tests;
pub mod tickets;

pub use handshake::{MAX_FRAME, PAIR_PROTOCOL, STEP_TIMEOUT, initiate, respond};
pub use messages::{PairError, Paired, PhoneAck, PhoneHello, TicketBook, Welcome};
pub use service::{MAX_CONCURRENT_PAIRINGS, serve};
pub use tickets::{Desk, MAX_TRIES, META_DISCOVERY, discovery_secret};
