//! Why a relay could not load its identity, start or keep running.

use std::{io, path::PathBuf, time::Duration};

use libp2p::{Multiaddr, PeerId, identity::DecodingError, noise};
use tokio::task::JoinError;

/// Loading or creating the identity file failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file exists but cannot be read (permissions, a directory, I/O error).
    #[error("cannot read the relay identity file {path}")]
    Read {
        /// The identity file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file is not a protobuf-encoded keypair.
    #[error(
        "the relay identity file {path} is not a protobuf-encoded keypair; move it away to \
         create a new identity (the relay's PeerId will change and peers must be given the new \
         address)"
    )]
    Decode {
        /// The identity file.
        path: PathBuf,
        /// The decoding error.
        #[source]
        source: DecodingError,
    },
    /// The directory for a new identity file cannot be created.
    #[error("cannot create the directory {path} for the relay identity")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A new identity file cannot be written.
    #[error("cannot write the new relay identity file {path}")]
    Write {
        /// The identity file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The generated keypair cannot be encoded (should not happen for ed25519).
    #[error("cannot encode the relay keypair")]
    Encode(#[source] DecodingError),
}

/// Starting the relay failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The identity could not be loaded or created.
    #[error("cannot load the relay identity")]
    Identity(#[from] IdentityError),
    /// A limit has a value libp2p cannot work with.
    #[error("invalid relay limit {name}: {reason}")]
    InvalidLimit {
        /// The field of [`RelayLimits`](super::RelayLimits).
        name: &'static str,
        /// Why the value is refused.
        reason: &'static str,
    },
    /// No listen address was configured.
    #[error("no listen address given")]
    NoListenAddrs,
    /// An external address cannot be used.
    #[error("invalid external address {addr}: {reason}")]
    InvalidExternalAddr {
        /// The address as given.
        addr: Multiaddr,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An external address ends in `/p2p/<id>` with someone else's id.
    #[error("external address {addr} ends in another peer's id; this relay is {local}")]
    ExternalAddrPeerMismatch {
        /// The address as given.
        addr: Multiaddr,
        /// The relay's own PeerId.
        local: PeerId,
    },
    /// The Noise transport could not be set up.
    #[error("cannot set up the TCP/Noise/Yamux transport")]
    Transport(#[source] noise::Error),
    /// A listen address is not a TCP address.
    #[error(
        "cannot listen on {addr}: not a TCP address (expected /ip4/<ip>/tcp/<port> or \
         /ip6/<ip>/tcp/<port>)"
    )]
    UnsupportedListenAddr {
        /// The address as given.
        addr: Multiaddr,
    },
    /// Binding a listen address failed, e.g. the port is in use.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address as given.
        addr: Multiaddr,
        /// The I/O error (`AddrInUse`, `AddrNotAvailable`, `PermissionDenied`, …).
        #[source]
        source: io::Error,
    },
    /// A listener closed before it reported its address.
    #[error("the listener on {addr} closed during startup")]
    ListenerClosed {
        /// The address as given.
        addr: Multiaddr,
        /// Why, if the transport said.
        #[source]
        source: Option<io::Error>,
    },
    /// A listener did not report its address in time.
    #[error("the listener on {addr} reported no address within {timeout:?}")]
    ListenTimeout {
        /// The address as given.
        addr: Multiaddr,
        /// How long we waited.
        timeout: Duration,
    },
}

/// The relay task ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Every listener closed, so the relay can no longer accept connections.
    #[error("every listener closed; the relay can no longer accept connections")]
    ListenersClosed,
    /// The relay task panicked or was cancelled.
    #[error("the relay task failed")]
    Task(#[source] JoinError),
}

/// The relay task has stopped, so it cannot answer.
#[derive(Debug, thiserror::Error)]
#[error("the relay task has stopped")]
pub struct RelayGone;

/// Error of [`run`](super::run).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The relay did not start.
    #[error("the relay did not start")]
    Start(#[from] StartError),
    /// The relay stopped abnormally.
    #[error("the relay stopped abnormally")]
    Run(#[from] RunError),
}
