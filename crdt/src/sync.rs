//! A sans-IO Automerge sync session: one per peer and document.
//!
//! Feed it what the peer sent with [`SyncSession::receive`]; ask it what to send with
//! [`SyncSession::next_message`]. It never touches a socket or a clock. Its state can be
//! persisted with [`SyncSession::encode_state`] so a reconnect sends only what is missing.

use std::panic::AssertUnwindSafe;

use automerge::{
    ChangeHash,
    sync::{self, SyncDoc},
};

use crate::{DocId, ThreadDoc};

/// Why a received message was refused. After any of these the session should be reset
/// (and, after [`SyncError::Panicked`], the document reloaded from the store).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The bytes are not an Automerge sync message.
    #[error("not a sync message: {0}")]
    Decode(#[from] automerge::sync::ReadMessageError),
    /// Automerge refused the changes.
    #[error("the peer's changes were refused: {0}")]
    Apply(#[from] automerge::AutomergeError),
    /// Automerge panicked while applying. The in-memory document may be half-applied.
    #[error("automerge panicked while applying the peer's message; the document must be reloaded")]
    Panicked,
    /// A persisted state did not decode.
    #[error("stored sync state is corrupt: {0}")]
    State(#[from] automerge::sync::DecodeStateError),
}

/// What one received message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Our heads before applying.
    pub heads_before: Vec<ChangeHash>,
    /// True if the message carried changes that moved our heads.
    pub changed: bool,
}

/// Sync state for one peer and one document.
pub struct SyncSession {
    doc_id: DocId,
    state: sync::State,
}

impl std::fmt::Debug for SyncSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncSession")
            .field("doc_id", &self.doc_id)
            .field(
                "their_heads",
                &self.state.their_heads.as_ref().map(Vec::len),
            )
            .finish_non_exhaustive()
    }
}

impl SyncSession {
    /// A fresh session (the first message carries our heads and a bloom filter).
    pub fn new(doc_id: DocId) -> Self {
        Self {
            doc_id,
            state: sync::State::new(),
        }
    }

    /// Restores a session from [`Self::encode_state`]; only the shared heads survive, which is
    /// what lets a reconnect skip what both sides already had.
    pub fn restore(doc_id: DocId, bytes: &[u8]) -> Result<Self, SyncError> {
        Ok(Self {
            doc_id,
            state: sync::State::decode(bytes)?,
        })
    }

    /// The document this session syncs.
    pub fn doc_id(&self) -> &DocId {
        &self.doc_id
    }

    /// The state to persist, in the same transaction as the changes it describes.
    pub fn encode_state(&self) -> Vec<u8> {
        self.state.encode()
    }

    /// The next message to send, if there is anything to say.
    pub fn next_message(&mut self, doc: &mut ThreadDoc) -> Option<Vec<u8>> {
        let am = doc.automerge();
        let msg = am.sync().generate_sync_message(&mut self.state);
        msg.map(|m| m.encode())
    }

    /// Applies a message from the peer. Panics inside Automerge are caught and reported.
    pub fn receive(&mut self, doc: &mut ThreadDoc, bytes: &[u8]) -> Result<Received, SyncError> {
        let msg = sync::Message::decode(bytes)?;
        let am = doc.automerge();
        let heads_before = am.get_heads();
        let state = &mut self.state;
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            am.sync().receive_sync_message(state, msg)
        }));
        match result {
            Ok(Ok(())) => {
                let changed = am.get_heads() != heads_before;
                Ok(Received {
                    heads_before,
                    changed,
                })
            }
            Ok(Err(e)) => Err(SyncError::Apply(e)),
            Err(_) => Err(SyncError::Panicked),
        }
    }

    /// True when the peer's last known heads equal ours: nothing left to exchange.
    pub fn in_sync(&self, doc: &mut ThreadDoc) -> bool {
        let ours = doc.heads();
        match &self.state.their_heads {
            Some(theirs) => {
                let mut a = theirs.clone();
                let mut b = ours;
                a.sort();
                b.sort();
                a == b
            }
            None => false,
        }
    }

    /// The heads the peer last told us about.
    pub fn their_heads(&self) -> Option<&[ChangeHash]> {
        self.state.their_heads.as_deref()
    }

    /// Forgets everything about the peer, as after a bad message.
    pub fn reset(&mut self) {
        self.state = sync::State::new();
    }
}
