//! The relay's swarm (limits first, then circuit relay v2, the rendezvous namespace gate,
//! identify and ping), its handle, and [`Relay`], which owns the running task.

use std::{collections::HashMap, future::Future};

use libp2p::{Multiaddr, PeerId, identity::Keypair};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::{Instrument as _, info, info_span};

use super::{
    COMMAND_CHANNEL_CAPACITY,
    actor::{Command, State, run_actor},
    behaviour::{build_swarm, normalize_external_addr},
    config::{RelayConfig, RelayIdentity, RelayStats},
    error::{RelayError, RelayGone, RunError, StartError},
    identity::load_or_create_identity,
};

/// A cloneable handle to a running relay.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    addrs: watch::Receiver<Vec<Multiaddr>>,
}

impl RelayHandle {
    /// The relay's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The addresses to give to peers, each ending in `/p2p/<relay id>`: configured external
    /// addresses first, then the bound listen addresses (wildcards expanded per interface).
    pub fn addrs(&self) -> Vec<Multiaddr> {
        self.addrs.borrow().clone()
    }

    /// A receiver that sees every change of [`RelayHandle::addrs`]; `changed()` fails once the
    /// relay task has stopped.
    pub fn watch_addrs(&self) -> watch::Receiver<Vec<Multiaddr>> {
        self.addrs.clone()
    }

    /// The current counters.
    pub async fn stats(&self) -> Result<RelayStats, RelayGone> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Stats { reply })
            .await
            .map_err(|_| RelayGone)?;
        rx.await.map_err(|_| RelayGone)
    }
}

/// A running relay: owns its task. Dropping it stops the relay without waiting; prefer
/// [`Relay::shutdown`].
#[derive(Debug)]
pub struct Relay {
    handle: RelayHandle,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<RelayStats, RunError>>,
}

impl Relay {
    /// Starts a relay on the current tokio runtime and returns once every listener has reported
    /// its bound address.
    pub async fn spawn(config: RelayConfig) -> Result<Self, StartError> {
        config.limits.validate()?;
        if config.listen.is_empty() {
            return Err(StartError::NoListenAddrs);
        }
        let keypair = match config.identity {
            RelayIdentity::Ephemeral => Keypair::generate_ed25519(),
            RelayIdentity::File(path) => load_or_create_identity(&path)?,
            RelayIdentity::Keypair(keypair) => keypair,
        };
        let peer_id = keypair.public().to_peer_id();
        let external = config
            .external_addrs
            .iter()
            .map(|a| normalize_external_addr(a, peer_id))
            .collect::<Result<Vec<_>, _>>()?;
        let mut swarm = build_swarm(keypair, &config.limits, config.idle_connection_timeout)?;

        let span = info_span!("relay", %peer_id);
        let (addrs_tx, addrs_rx) = watch::channel(Vec::new());
        let mut state = State {
            peer_id,
            listeners: Vec::new(),
            fallback_external: external.is_empty(),
            external,
            peers: HashMap::new(),
            circuits: 0,
            connections: 0,
            registrations: HashMap::new(),
            addrs_tx,
        };
        async {
            state.start(&mut swarm, &config.listen)?;
            state.await_listen_addrs(&mut swarm).await
        }
        .instrument(span.clone())
        .await?;
        info!(parent: &span, limits = ?config.limits, "relay started");

        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let task = tokio::spawn(run_actor(swarm, state, commands_rx, shutdown_rx).instrument(span));
        Ok(Self {
            handle: RelayHandle {
                peer_id,
                commands: commands_tx,
                addrs: addrs_rx,
            },
            shutdown: Some(shutdown_tx),
            task,
        })
    }

    /// A cloneable handle for stats and addresses.
    pub fn handle(&self) -> RelayHandle {
        self.handle.clone()
    }

    /// The relay's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.handle.peer_id
    }

    /// See [`RelayHandle::addrs`].
    pub fn addrs(&self) -> Vec<Multiaddr> {
        self.handle.addrs()
    }

    /// See [`RelayHandle::stats`].
    pub async fn stats(&self) -> Result<RelayStats, RelayGone> {
        self.handle.stats().await
    }

    /// Stops listening, closes every connection (waiting up to a few seconds), joins the task
    /// and returns the final counters.
    pub async fn shutdown(mut self) -> Result<RelayStats, RunError> {
        if let Some(tx) = self.shutdown.take() {
            // Fails only if the task already ended; joining reports how.
            let _ = tx.send(());
        }
        (&mut self.task).await.map_err(RunError::Task)?
    }
}

/// Runs a relay until `shutdown` completes, then shuts it down cleanly. For callers that need
/// neither the addresses nor the stats while it runs.
pub async fn run(
    config: RelayConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<RelayStats, RelayError> {
    let relay = Relay::spawn(config).await?;
    let mut addrs = relay.handle.watch_addrs();
    tokio::select! {
        biased;
        () = shutdown => {}
        // The task ended by itself; shutdown() below reports why.
        () = async { while addrs.changed().await.is_ok() {} } => {}
    }
    Ok(relay.shutdown().await?)
}
