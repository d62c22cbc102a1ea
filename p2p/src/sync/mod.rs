//! `/errand/sync/1` in three layers, as rust-libp2p's protocols are built:
//!
//! - [`gate`]: policy across connections: who may connect at all (trusted peers, relays, and
//!   anyone while a pairing window is open). The node runs it as its first behaviour.
//! - [`session`]: the handler of one connection's sync stream, in named phases: hello, then
//!   the sync loop, which pushes local changes before it takes the peer's next frame.
//! - [`wire`]: the framing (length prefix, kind byte, document id, size caps, packing) and the
//!   protocol version; [`linked`]: what a packed frame leaves out of its change chunks.
//!
//! The sync state itself lives in the [`crate::replica`]; this folder moves its messages.
//! It does not depend on the node, pairing or the `Peer`.

pub mod gate;
pub mod linked;
pub mod session;
pub mod wire;
