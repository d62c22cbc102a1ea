//! The one error type the bridge exports: a small, stable set of kinds, each with a message
//! for the person. The kinds say what an app can do about it; the message says what happened.

use errand_crdt::WriteError;
use errand_p2p::{
    api::exit, control::ApiError, pairing::PhonePairError, peer::PeerError, replica::ReplicaError,
};

/// Why a bridge call failed.
///
/// The set of kinds is part of the stable API: apps switch on them. Messages are for people
/// and may change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, uniffi::Error)]
pub enum ErrandError {
    /// The caller passed something unusable (a bad ticket, an unknown task id, an empty
    /// instruction), or asked for something the task's state does not allow. Nothing changed.
    #[error("invalid input: {msg}")]
    InvalidInput {
        /// What was wrong and what to do.
        msg: String,
    },
    /// This phone has no desktop (or no thread) yet: pair first.
    #[error("not paired: {msg}")]
    NotPaired {
        /// What to do.
        msg: String,
    },
    /// The desktop could not be reached, or did not answer in time.
    #[error("unreachable: {msg}")]
    Unreachable {
        /// What failed.
        msg: String,
    },
    /// The local store failed, or another process holds the home.
    #[error("storage: {msg}")]
    Storage {
        /// What failed.
        msg: String,
    },
    /// Anything else: a bug, or the client was shut down.
    #[error("internal: {msg}")]
    Internal {
        /// What failed.
        msg: String,
    },
}

impl ErrandError {
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidInput { msg: msg.into() }
    }

    pub(crate) fn not_paired(msg: impl Into<String>) -> Self {
        Self::NotPaired { msg: msg.into() }
    }

    pub(crate) fn internal(msg: impl Into<String>) -> Self {
        Self::Internal { msg: msg.into() }
    }

    /// Maps an error of `api::handle` by its exit code. `general` is the kind that exit 1
    /// stands for in the request at hand: the API does not type its errors further (yet).
    pub(crate) fn from_api(e: ApiError, general: fn(String) -> Self) -> Self {
        let msg = e.message;
        match e.code {
            exit::USAGE => Self::InvalidInput { msg },
            exit::UNREACHABLE => Self::Unreachable { msg },
            exit::LOCKED => Self::Storage { msg },
            _ => general(msg),
        }
    }

    pub(crate) fn storage_kind(msg: String) -> Self {
        Self::Storage { msg }
    }

    pub(crate) fn invalid_kind(msg: String) -> Self {
        Self::InvalidInput { msg }
    }
}

impl From<ReplicaError> for ErrandError {
    fn from(e: ReplicaError) -> Self {
        let msg = e.to_string();
        match e {
            ReplicaError::NoThread => Self::NotPaired { msg },
            ReplicaError::Write(WriteError::Automerge(_)) => Self::Internal { msg },
            ReplicaError::Write(_) => Self::InvalidInput { msg },
            ReplicaError::Store(_) | ReplicaError::Load(_) => Self::Storage { msg },
            _ => Self::Internal { msg },
        }
    }
}

impl From<PeerError> for ErrandError {
    fn from(e: PeerError) -> Self {
        match e {
            PeerError::Replica(r) => (*r).into(),
            PeerError::Store(_) | PeerError::Identity(_) | PeerError::Blob(_) => {
                Self::Storage { msg: e.to_string() }
            }
            PeerError::Invalid(msg) => Self::InvalidInput { msg },
            PeerError::Node(_) | PeerError::NotStarted => Self::Unreachable { msg: e.to_string() },
        }
    }
}

impl From<PhonePairError> for ErrandError {
    fn from(e: PhonePairError) -> Self {
        use errand_p2p::pair::PairError;
        let msg = e.to_string();
        match e {
            PhonePairError::Peer(p) => p.into(),
            PhonePairError::Unreachable(_)
            | PhonePairError::Pair(PairError::Timeout { .. } | PairError::Io(_)) => {
                Self::Unreachable { msg }
            }
            PhonePairError::Pair(PairError::NotSaved(_)) => Self::Storage { msg },
            PhonePairError::AlreadyPaired(_) | PhonePairError::Pair(_) => {
                Self::InvalidInput { msg }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_exit_codes_map_to_stable_kinds() {
        let e = |code| ApiError::with_code(code, "m");
        assert!(matches!(
            ErrandError::from_api(e(exit::USAGE), ErrandError::storage_kind),
            ErrandError::InvalidInput { .. }
        ));
        assert!(matches!(
            ErrandError::from_api(e(exit::UNREACHABLE), ErrandError::storage_kind),
            ErrandError::Unreachable { .. }
        ));
        assert!(matches!(
            ErrandError::from_api(e(exit::ERROR), ErrandError::invalid_kind),
            ErrandError::InvalidInput { .. }
        ));
        assert!(matches!(
            ErrandError::from_api(e(exit::ERROR), ErrandError::storage_kind),
            ErrandError::Storage { .. }
        ));
    }

    #[test]
    fn a_home_without_a_thread_reads_as_not_paired() {
        let e: ErrandError = PeerError::from(ReplicaError::NoThread).into();
        assert!(matches!(e, ErrandError::NotPaired { .. }), "{e:?}");
    }
}
