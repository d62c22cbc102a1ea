//! The size caps of a home's blob store, and their defaults.

/// Default largest blob a home stores or fetches (`max_blob_bytes`). 1 GiB holds a video clip or a disk image of a
/// small project; larger files belong in a shared folder, not in a phone's queue.
pub const MAX_BLOB_BYTES: u64 = 1 << 30;

/// Default for the most bytes of blobs one home holds, whole or partial
/// (`max_blob_storage_bytes`). 10 GiB leaves room for a few
/// hundred phone photos and their results without filling a laptop's disk unnoticed.
pub const MAX_TOTAL_BYTES: u64 = 10 << 30;

/// The caps a home's blob store keeps: a setting on each device (the desktop's config.toml,
/// the phone's daemon flags), [`MAX_BLOB_BYTES`] and [`MAX_TOTAL_BYTES`] by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobCaps {
    /// Largest blob stored or fetched.
    max_blob_bytes: u64,
    /// Most bytes of blobs the home holds, whole or partial.
    max_total_bytes: u64,
}

/// Why caps were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapsError {
    /// A cap of zero would refuse every file.
    #[error("{what} must be at least 1 byte")]
    Zero {
        /// Which cap.
        what: &'static str,
    },
    /// A file at the per-file cap could never be stored.
    #[error(
        "max_blob_bytes ({max_blob_bytes}) is over max_blob_storage_bytes ({max_total_bytes}): \
         a file that large could never be stored"
    )]
    BlobOverTotal {
        /// The per-file cap.
        max_blob_bytes: u64,
        /// The storage cap.
        max_total_bytes: u64,
    },
}

impl BlobCaps {
    /// Checked caps: both at least one byte, the per-file cap within the storage cap.
    pub fn new(max_blob_bytes: u64, max_total_bytes: u64) -> Result<Self, CapsError> {
        if max_blob_bytes == 0 {
            return Err(CapsError::Zero {
                what: "max_blob_bytes",
            });
        }
        if max_total_bytes == 0 {
            return Err(CapsError::Zero {
                what: "max_blob_storage_bytes",
            });
        }
        if max_blob_bytes > max_total_bytes {
            return Err(CapsError::BlobOverTotal {
                max_blob_bytes,
                max_total_bytes,
            });
        }
        Ok(Self {
            max_blob_bytes,
            max_total_bytes,
        })
    }

    /// Largest blob stored or fetched.
    pub fn max_blob_bytes(&self) -> u64 {
        self.max_blob_bytes
    }

    /// Most bytes of blobs the home holds.
    pub fn max_total_bytes(&self) -> u64 {
        self.max_total_bytes
    }
}

impl Default for BlobCaps {
    fn default() -> Self {
        Self {
            max_blob_bytes: MAX_BLOB_BYTES,
            max_total_bytes: MAX_TOTAL_BYTES,
        }
    }
}
