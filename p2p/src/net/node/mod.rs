//! The node actor: it owns the libp2p `Swarm` (built in [`super::behaviour`]) and talks to
//! the rest of the peer through a bounded command channel and a bounded event channel.
//!
//! - [`spawn`] builds the swarm, binds every listener and starts the actor.
//! - [`NodeHandle`] sends it commands (dial, disconnect, relay state, shutdown), each with a
//!   `oneshot` for the reply.
//! - The actor reports connections, discoveries and listen addresses as [`NodeEvent`]s, and
//!   keeps the relays of [`super::relay_client`] up to date ([`actor`]).

use std::{collections::HashMap, time::Duration};

use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use super::relay_client::RelayInfo;

mod actor;

pub use actor::spawn;

/// Commands queued to the node. Callers wait when it is busy rather than pile up work.
const COMMAND_CAPACITY: usize = 64;
/// How long a caller that just dialed waits for the connection before it opens a stream
/// anyway (see [`NodeHandle::wait_connected`]): a loopback or LAN dial takes milliseconds; a
/// peer that is away makes the open fail on the failed dial instead.
pub const CONNECT_WAIT: Duration = Duration::from_secs(2);

/// Events queued from the node to the peer. The peer drains them promptly; if it falls
/// behind, the swarm waits rather than drop a connect/disconnect.
const EVENT_CAPACITY: usize = 256;

/// How the node is set up.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// LAN discovery.
    pub mdns: bool,
    /// Relays to keep a reservation on (each ending in `/p2p/<relay id>`).
    pub relays: Vec<Multiaddr>,
    /// Rendezvous namespace of this thread's devices (none before pairing).
    pub namespace: Option<String>,
    /// Only ever connect to peers through relay circuits: no direct dials, no mDNS, no DCUtR.
    /// For testing the relayed path.
    pub relay_only: bool,
    /// How long a relayed connection outlives a hole punch while a pairing may be running on
    /// it (the peer is not trusted yet, or our pairing window is open): closing it at once cuts
    /// the handshake after the desktop consumed the ticket but before the phone got its
    /// welcome. The peer passes one pairing step's timeout, which covers the rest of a healthy
    /// handshake.
    pub pairing_grace: Duration,
}

/// What the node reports.
#[derive(Debug, Clone)]
pub enum NodeEvent {
    /// A connection to `peer` was established.
    Connected {
        /// The peer.
        peer: PeerId,
        /// The peer is reachable through relay circuits only: this connection is relayed and
        /// no direct one is open. (A relayed connection opened next to a direct one, such as a
        /// hole-punch retry that crossed a success, does not make the path relayed.)
        relayed: bool,
        /// The circuit's byte limit (both ways summed), as the relay stated it when the
        /// circuit opened; `None` when direct or not stated.
        circuit_bytes: Option<u64>,
        /// The remote address.
        addr: Multiaddr,
    },
    /// A connection to `peer` closed and others remain, and with it the path changed: the
    /// last direct one closed (`relayed`), or the last relayed one next to a direct one.
    Path {
        /// The peer.
        peer: PeerId,
        /// Reachable through relay circuits only.
        relayed: bool,
    },
    /// A hole punch replaced the relayed connections to `peer`, and we closed them. A stream
    /// on a connection closed from this side can wait forever for its next frame, so the
    /// sync session must be started again (on the direct connection).
    Upgraded {
        /// The peer.
        peer: PeerId,
    },
    /// The last connection to `peer` closed.
    Disconnected {
        /// The peer.
        peer: PeerId,
    },
    /// mDNS found a peer on the LAN.
    Discovered {
        /// The peer.
        peer: PeerId,
        /// Where.
        addr: Multiaddr,
    },
    /// Identify told us where a connected peer listens.
    PeerListenAddrs {
        /// The peer.
        peer: PeerId,
        /// Its listen addresses.
        addrs: Vec<Multiaddr>,
    },
    /// We listen on a new address.
    NewListenAddr(Multiaddr),
    /// A relay accepted our reservation (again): peers behind it may be reachable now.
    RelayReady(PeerId),
}

/// Why a node command failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The node has stopped.
    #[error("the network node has stopped")]
    Gone,
    /// Building the swarm failed.
    #[error("cannot start the network node: {0}")]
    Build(String),
    /// Listening failed.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// Dialing failed immediately.
    #[error("cannot dial {peer}: {reason}")]
    Dial {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
}

/// A snapshot of one peer's connections.
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    /// Open connections that go straight to the peer.
    pub direct: usize,
    /// Open connections through a relay circuit.
    pub relayed: usize,
}

enum Command {
    /// Answers once the node has a connection to `peer` (at once if it has one).
    WhenConnected {
        peer: PeerId,
        reply: oneshot::Sender<()>,
    },
    Dial {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
    Disconnect {
        peer: PeerId,
        reply: oneshot::Sender<()>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Connections {
        reply: oneshot::Sender<HashMap<PeerId, ConnInfo>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
    RelayInfo {
        reply: oneshot::Sender<(Vec<RelayInfo>, Vec<Multiaddr>)>,
    },
    AddRelay {
        addr: Multiaddr,
    },
    SetNamespace {
        namespace: String,
    },
}

/// A cloneable handle to the node actor.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    peer_id: PeerId,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("peer_id", &self.peer_id)
            .finish()
    }
}

impl NodeHandle {
    /// Our PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The stream control, for opening and accepting protocol streams.
    pub fn control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| NodeError::Gone)?;
        rx.await.map_err(|_| NodeError::Gone)
    }

    /// Dials `peer` at `addrs` unless already connected or dialing.
    pub async fn dial(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(), NodeError> {
        self.call(|reply| Command::Dial { peer, addrs, reply })
            .await?
    }

    /// Closes every connection to `peer` and returns once they are closed, so a dial right
    /// after it makes a new connection instead of finding the old one still open.
    pub async fn disconnect(&self, peer: PeerId) -> Result<(), NodeError> {
        self.call(|reply| Command::Disconnect { peer, reply }).await
    }

    /// Where we listen.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NodeError> {
        self.call(|reply| Command::ListenAddrs { reply }).await
    }

    /// Open connections by peer.
    pub async fn connections(&self) -> Result<HashMap<PeerId, ConnInfo>, NodeError> {
        self.call(|reply| Command::Connections { reply }).await
    }

    /// Waits up to `within` (usually [`CONNECT_WAIT`]) until this node has a connection to
    /// `peer`; true if it does.
    ///
    /// Open a stream only after this: the stream behaviour learns of a new connection a
    /// moment after the connection exists, and a stream asked for in between waits for a dial
    /// that never comes (the peer is connected), so it hangs.
    pub async fn wait_connected(&self, peer: PeerId, within: Duration) -> bool {
        let connected = self.call(|reply| Command::WhenConnected { peer, reply });
        matches!(tokio::time::timeout(within, connected).await, Ok(Ok(())))
    }

    /// Relay states, and the circuit addresses to put in a ticket.
    pub async fn relay_info(&self) -> Result<(Vec<RelayInfo>, Vec<Multiaddr>), NodeError> {
        self.call(|reply| Command::RelayInfo { reply }).await
    }

    /// Adds a relay (learned from a ticket) and reserves on it.
    pub async fn add_relay(&self, addr: Multiaddr) -> Result<(), NodeError> {
        self.tx
            .send(Command::AddRelay { addr })
            .await
            .map_err(|_| NodeError::Gone)
    }

    /// Sets the rendezvous namespace (after pairing).
    pub async fn set_namespace(&self, namespace: String) -> Result<(), NodeError> {
        self.tx
            .send(Command::SetNamespace { namespace })
            .await
            .map_err(|_| NodeError::Gone)
    }

    /// Closes every connection and stops the node.
    pub async fn shutdown(&self) -> Result<(), NodeError> {
        self.call(|reply| Command::Shutdown { reply }).await
    }
}
