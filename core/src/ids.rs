//! Identifiers. Tasks and messages use ULIDs: sortable by creation time and unique without
//! coordination, so the desktop can run tasks oldest first. Devices are libp2p PeerIds.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use ulid::Ulid;

/// Why an identifier did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Not a 26-character Crockford base32 ULID.
    #[error("not a valid id (expected a 26-character ULID): {0:?}")]
    Ulid(String),
    /// Not a base58 libp2p PeerId.
    #[error("not a valid device id (expected a libp2p PeerId such as 12D3KooW…): {0:?}")]
    PeerId(String),
}

macro_rules! ulid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Ulid);

        impl $name {
            /// A new id for the given creation time (UTC milliseconds) with random bits.
            /// Ids made by one process never go backwards, even within one millisecond, so
            /// "oldest first" is creation order.
            pub fn new_at(ms: i64) -> Self {
                Self(monotonic(Ulid::from_parts(ms.max(0) as u64, rand::random())))
            }
            /// The creation time encoded in the id, in UTC milliseconds.
            pub fn timestamp_ms(&self) -> i64 {
                self.0.timestamp_ms() as i64
            }
            /// An id from its time and its 80 random bits, for ids derived from others.
            pub fn from_parts(ms: i64, random: u128) -> Self {
                Self(Ulid::from_parts(ms.max(0) as u64, random))
            }
            /// The id's 80 random bits.
            pub fn random_bits(&self) -> u128 {
                self.0.random()
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                if s.len() != 26 {
                    return Err(IdError::Ulid(truncate(s)));
                }
                Ulid::from_string(s).map(Self).map_err(|_| IdError::Ulid(truncate(s)))
            }
        }
        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                s.parse()
            }
        }
        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.to_string()
            }
        }
    };
}

/// The last id this process made; the next one is greater.
static LAST_ULID: std::sync::Mutex<u128> = std::sync::Mutex::new(0);

fn monotonic(candidate: Ulid) -> Ulid {
    let Ok(mut last) = LAST_ULID.lock() else {
        return candidate;
    };
    let next = if u128::from(candidate) > *last || *last == u128::MAX {
        u128::from(candidate)
    } else {
        *last + 1
    };
    *last = next;
    Ulid::from(next)
}

ulid_id!(
    /// Identifies a task. Its ULID timestamp is the task's creation time.
    TaskId
);
ulid_id!(
    /// Identifies a chat message.
    MessageId
);
ulid_id!(
    /// Identifies a routine: a scheduled instruction whose occurrences become tasks.
    RoutineId
);
ulid_id!(
    /// Identifies a thread: the one conversation a desktop and its phones share.
    ThreadId
);

/// A device: the string form of its libp2p PeerId, checked to be well formed.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

/// Longest PeerId text we accept. An inlined Ed25519 key is 52 characters; sha256-hashed
/// keys are 46. 128 leaves room for larger inlined keys without admitting junk.
const MAX_PEER_ID_LEN: usize = 128;

impl DeviceId {
    /// The PeerId in its usual base58 text form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The binary multihash form of the PeerId.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Validated on construction, so decoding cannot fail.
        bs58::decode(&self.0).into_vec().unwrap_or_default()
    }

    /// Builds a DeviceId from the binary multihash form of a PeerId.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IdError> {
        check_multihash(bytes)
            .map(|()| Self(bs58::encode(bytes).into_string()))
            .ok_or_else(|| IdError::PeerId(format!("<{} bytes>", bytes.len())))
    }
}

/// A PeerId is a multihash: identity (0x00) or sha2-256 (0x12), a length byte, then the digest.
fn check_multihash(b: &[u8]) -> Option<()> {
    let (&code, rest) = b.split_first()?;
    let (&len, digest) = rest.split_first()?;
    let ok = match code {
        0x00 => (len as usize) == digest.len() && (1..=64).contains(&digest.len()),
        0x12 => len == 32 && digest.len() == 32,
        _ => false,
    };
    ok.then_some(())
}

impl FromStr for DeviceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.is_empty() || s.len() > MAX_PEER_ID_LEN {
            return Err(IdError::PeerId(truncate(s)));
        }
        let bytes = bs58::decode(s)
            .into_vec()
            .map_err(|_| IdError::PeerId(truncate(s)))?;
        check_multihash(&bytes).ok_or_else(|| IdError::PeerId(truncate(s)))?;
        Ok(Self(s.to_owned()))
    }
}
impl TryFrom<String> for DeviceId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}
impl From<DeviceId> for String {
    fn from(id: DeviceId) -> String {
        id.0
    }
}
impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.0)
    }
}

/// Error messages quote at most this much of the bad input.
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A real Ed25519 PeerId, as libp2p prints it.
    pub const PEER_A: &str = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";
    pub const PEER_B: &str = "12D3KooWRBhwfeP2Y4TCx1SM6s9rUoHhR5nLZRb2wNasA4r5w7Xp";
    /// A sha256-hashed (RSA-style) PeerId.
    pub const PEER_QM: &str = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N";

    #[test]
    fn device_ids_parse_real_peer_ids_and_reject_junk() {
        for ok in [PEER_A, PEER_B, PEER_QM] {
            let id: DeviceId = ok.parse().unwrap();
            assert_eq!(id.as_str(), ok);
            assert_eq!(DeviceId::from_bytes(&id.to_bytes()).unwrap(), id);
        }
        for bad in [
            "",
            "hello",
            "0OIl",
            "12D3KooW",
            &"1".repeat(300),
            "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5",
        ] {
            assert!(bad.parse::<DeviceId>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn task_ids_round_trip_and_sort_by_time() {
        let a = TaskId::new_at(1_000);
        let b = TaskId::new_at(2_000);
        assert!(a < b);
        assert_eq!(a.to_string().parse::<TaskId>().unwrap(), a);
        assert_eq!(a.timestamp_ms(), 1_000);
        assert!("not-a-ulid".parse::<TaskId>().is_err());
        assert!("0123456789ABCDEFGHJKMNPQRU".parse::<TaskId>().is_err());
        let ids: Vec<TaskId> = (0..100).map(|_| TaskId::new_at(5_000)).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids in one millisecond keep creation order"
        );
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<TaskId>(&json).unwrap(), a);
    }
}
