//! Files: content-addressed blobs and `/errand/blob/1`, in layers as `sync/` is:
//!
//! - [`tree`]: verifying a blob group by group against its BLAKE3 hash (pure).
//! - [`store`]: the home's blobs on disk and their redb index: atomic placement, a verified
//!   prefix that survives a restart, size caps.
//! - [`wire`]: request and response frames, the range cap that fits a relay circuit.
//! - [`protocol`]: serving ranges of referenced blobs, and fetching with verification.
//!
//! Trust (only a trusted peer's stream is served) is checked where streams are accepted, in
//! the peer's supervisor, as for sync. Depends on the replica only.

pub mod protocol;
pub mod store;
pub mod tree;
pub mod wire;

pub use protocol::{FetchError, FetchStats, fetch, serve};
pub use store::{BlobCaps, BlobError, BlobStore, CapsError, MAX_BLOB_BYTES, MAX_TOTAL_BYTES};
pub use wire::BLOB_PROTOCOL;
