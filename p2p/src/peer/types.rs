//! The `Peer`'s public vocabulary: how to open one, what it reports, why it fails, and the
//! parsers for what a person types.

use std::{collections::BTreeSet, path::PathBuf};

use errand_core::{DeviceKind, TaskId};
use errand_crdt::StoreError;
use libp2p::{Multiaddr, PeerId};

use crate::{
    net::node::{self},
    replica::ReplicaError,
};

/// How to open a peer.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The home directory.
    pub home: PathBuf,
    /// Desktop or phone.
    pub kind: DeviceKind,
    /// This device's name (kept from the last run when `None`).
    pub name: Option<String>,
    /// Where to listen.
    pub listen: Vec<Multiaddr>,
    /// LAN discovery.
    pub mdns: bool,
    /// Relays to use besides those the home remembers (these are remembered too).
    pub relays: Vec<Multiaddr>,
    /// Reach peers only through relay circuits: no direct dials, mDNS or DCUtR (for testing
    /// the relayed path).
    pub relay_only: bool,
    /// The caps of this home's blob store.
    pub blob_caps: crate::blob::BlobCaps,
}

impl PeerConfig {
    /// A home opened for local commands: no listening, no discovery, no relays, the default
    /// blob caps.
    pub fn local(home: PathBuf, kind: DeviceKind) -> Self {
        Self {
            home,
            kind,
            name: None,
            listen: Vec::new(),
            mdns: false,
            relays: Vec::new(),
            relay_only: false,
            blob_caps: crate::blob::BlobCaps::default(),
        }
    }
}

/// What happens on the network.
#[derive(Debug, Clone)]
pub enum PeerEvent {
    /// A trusted peer connected.
    Connected {
        /// Who.
        peer: PeerId,
        /// Through a relay.
        relayed: bool,
    },
    /// A peer's last connection closed.
    Disconnected {
        /// Who.
        peer: PeerId,
    },
    /// Changes from `peer` were merged and are durable.
    Merged {
        /// Who sent them.
        peer: PeerId,
        /// Tasks with new content.
        tasks: Vec<TaskId>,
    },
    /// A local write is durable.
    Committed {
        /// Tasks with new content.
        tasks: Vec<TaskId>,
    },
    /// `peer` has exactly our heads.
    InSync {
        /// Who.
        peer: PeerId,
    },
}

/// Why a peer operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The store failed (including: another process holds the home).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The replica failed.
    #[error(transparent)]
    Replica(Box<ReplicaError>),
    /// The network node failed.
    #[error(transparent)]
    Node(#[from] node::NodeError),
    /// The stored identity is damaged.
    #[error("the stored node identity is damaged: {0}")]
    Identity(String),
    /// Bad input from the caller.
    #[error("{0}")]
    Invalid(String),
    /// The network is not started.
    #[error("the network is not running in this process")]
    NotStarted,
    /// The blob store failed.
    #[error(transparent)]
    Blob(Box<crate::blob::BlobError>),
}

impl From<crate::blob::BlobError> for PeerError {
    fn from(e: crate::blob::BlobError) -> Self {
        Self::Blob(Box::new(e))
    }
}

impl From<ReplicaError> for PeerError {
    fn from(e: ReplicaError) -> Self {
        Self::Replica(Box::new(e))
    }
}

/// Parses a PeerId given by a person, with an error that says what was expected.
pub fn parse_peer_id(s: &str) -> Result<PeerId, PeerError> {
    s.trim().parse().map_err(|_| {
        PeerError::Invalid(format!(
            "{s:?} is not a peer id (expected something like 12D3KooW…)"
        ))
    })
}

/// Parses a multiaddr given by a person.
pub fn parse_addr(s: &str) -> Result<Multiaddr, PeerError> {
    s.trim().parse().map_err(|e| {
        PeerError::Invalid(format!(
            "{s:?} is not a multiaddr ({e}); expected e.g. /ip4/192.168.1.5/tcp/4001"
        ))
    })
}

/// The tasks whose content changed in a set of events (for runners that react to merges).
pub fn changed_tasks(ev: &PeerEvent) -> BTreeSet<TaskId> {
    match ev {
        PeerEvent::Merged { tasks, .. } | PeerEvent::Committed { tasks } => {
            tasks.iter().copied().collect()
        }
        _ => BTreeSet::new(),
    }
}
