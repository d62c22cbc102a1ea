//! Errand's thread as an Automerge document, its sync sessions, and its durable store.
//!
//! - [`ThreadDoc`] wraps an Automerge `AutoCommit`. Its root objects come from a deterministic
//!   genesis change, so every peer reaches the same objects by the same ids. Reads treat the
//!   document as untrusted: authorship comes from each op's actor, and anything malformed is
//!   skipped and counted.
//! - [`SyncSession`] is the sans-IO Automerge sync state for one peer and one document.
//! - [`Store`] keeps documents, sync states, trust and identity in one redb file per home;
//!   [`holder`] records which process holds a home.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod doc;
pub mod engine;
pub mod holder;
pub mod ingest;
pub mod store;
pub mod sync;
pub mod tables;

pub use doc::{
    CHUNK_MAGIC, DocId, NewRoutine, NewTask, Part, SEGMENT_AHEAD, SEGMENT_MAX_CHANGES,
    SEGMENT_MAX_OPS, TaskTouch, ThreadDoc, ThreadGenesis, Touched, WriteError, is_document_chunk,
};
pub use ingest::IngestError;
pub use store::{LoadedDoc, MemoryImage, Store, StoreError, StoreTxn, TrustedPeer};
pub use sync::{SyncError, SyncSession};

/// Re-exported so callers can name heads and actors without depending on automerge directly.
pub use automerge::{ActorId, ChangeHash};
