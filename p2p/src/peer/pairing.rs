//! Pairing, as a `Peer` does it: the desktop issues tickets, the phone pairs with one and waits
//! for its first sync, and either side revokes or forgets a device.
//!
//! - The handshake, the ticket book and the desktop's responder live in [`crate::pair`], which
//!   does not know the `Peer`; this module wires them to it.
//! - [`create_ticket`] stores a ticket and opens the desktop's pairing window until it expires.
//! - [`pair_phone`] lets the desktop through the gate for the handshake only, runs it, stores
//!   trust, and reconnects so the first sync runs on a connection admitted with trust.

use std::time::Duration;

use errand_core::{DeviceKind, EventKind, TaskStatus, Ticket, fold};
use errand_crdt::{ThreadGenesis, TrustedPeer};
use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};
use serde::Serialize;

use super::{
    handle::Peer,
    types::{PeerError, PeerEvent, parse_peer_id},
};
use crate::{
    clock::now_ms,
    net::{node::NodeHandle, relay_client::relay_peer},
    pair::{
        self, PAIR_PROTOCOL, PairError, PhoneHello, Welcome,
        tickets::{self, META_DISCOVERY},
    },
};

/// Default ticket lifetime: long enough to find the phone and scan, short enough that a
/// photographed code is soon useless.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10 * 60);
/// Addresses put in a ticket: the QR must stay small; the phone learns more by identify.
const MAX_TICKET_ADDRS: usize = 3;
/// Dial attempts before pairing gives up on the ticket's addresses.
const PAIR_DIAL_ATTEMPTS: u32 = 3;
/// How long the phone waits for its first full sync after the handshake.
pub const FIRST_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

fn is_loopback(a: &Multiaddr) -> bool {
    a.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

/// Issues a ticket for this desktop (its network must be running) and opens the pairing
/// window until the ticket expires.
pub async fn create_ticket(peer: &Peer, ttl: Duration) -> Result<Ticket, PeerError> {
    if peer.kind() != DeviceKind::Desktop {
        return Err(PeerError::Invalid(
            "only a desktop issues pairing tickets".into(),
        ));
    }
    let node = peer.node().ok_or(PeerError::NotStarted)?;
    let mut addrs = node.listen_addrs().await?;
    // Routable addresses first, loopback last.
    addrs.sort_by_key(is_loopback);
    addrs.dedup();
    let (_, circuits) = node.relay_info().await?;
    let relay_only = peer.relay_only();
    let mut texts: Vec<String> = if relay_only {
        Vec::new()
    } else {
        addrs
            .iter()
            .take(MAX_TICKET_ADDRS)
            .map(ToString::to_string)
            .collect()
    };
    // Relay circuit addresses too, so a phone elsewhere can pair through the relay.
    texts.extend(circuits.iter().map(ToString::to_string));
    texts.truncate(errand_core::ticket::MAX_TICKET_ADDRS);
    let now = now_ms();
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let ticket = Ticket::new(peer.device_id(), texts, ttl_ms, now);
    let issued = ticket.clone();
    peer.replica()
        .store_blocking(move |s| tickets::record_issued(s, &issued, now))
        .await??;
    tickets::refresh_window(peer.replica(), peer.gate());
    tracing::info!(ticket = %ticket.id(), "pairing ticket issued");
    Ok(ticket)
}

/// What the phone learned by pairing.
#[derive(Debug, Clone, Serialize)]
pub struct PairOutcome {
    /// The desktop's PeerId.
    pub desktop_id: String,
    /// The desktop's name.
    pub desktop_name: String,
    /// The thread.
    pub thread_id: String,
    /// True when the first full sync finished.
    pub synced: bool,
}

/// Why the phone could not pair.
#[derive(Debug, thiserror::Error)]
pub enum PhonePairError {
    /// The handshake failed.
    #[error(transparent)]
    Pair(#[from] PairError),
    /// Local failure.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// Already paired with another desktop.
    #[error("this phone is already paired with desktop {0}; run `errand-phone forget` first")]
    AlreadyPaired(String),
    /// Could not reach the desktop. Its gate also closes connections once no ticket is live,
    /// so a used or expired code can end up here too; the message says so.
    #[error(
        "cannot reach the desktop at any address in the ticket ({0}); check that it runs \
         `errand-desktop run` on a network this phone can reach, and that the pairing code is \
         still valid (errand-desktop pair makes a new one)"
    )]
    Unreachable(String),
}

/// Pairs this phone (network started) with the desktop named in `ticket`, then waits for the
/// first full sync (bounded by [`FIRST_SYNC_TIMEOUT`]).
pub async fn pair_phone(peer: &Peer, ticket: &Ticket) -> Result<PairOutcome, PhonePairError> {
    let desktop: PeerId = ticket
        .desktop()
        .as_str()
        .parse()
        .map_err(|_| PeerError::Invalid("the ticket's desktop id is not a peer id".into()))?;
    let trusted = peer.trusted_peers().await?;
    if let Some(other) = trusted.iter().find(|t| {
        t.kind == DeviceKind::Desktop && !t.revoked && t.id.as_str() != desktop.to_base58()
    }) {
        return Err(PhonePairError::AlreadyPaired(other.id.to_string()));
    }
    if ticket.is_expired(now_ms()) {
        return Err(PeerError::Invalid(
            "this pairing code has expired; ask for a new one on the desktop: errand-desktop pair"
                .into(),
        )
        .into());
    }
    let node = peer.node().ok_or(PeerError::NotStarted)?;
    // Relays named in the ticket: remember them and let them through the gate.
    for a in ticket.addrs() {
        if let Some(relay) = a
            .strip_suffix("/p2p-circuit")
            .and_then(|r| r.parse::<Multiaddr>().ok())
            && relay_peer(&relay).is_some()
        {
            peer.add_relay(relay).await?;
        }
    }
    // Let the desktop through our gate for the handshake only.
    let _admitted = peer.gate().admit_while(desktop);
    pair_inner(peer, ticket, desktop, &node).await
}

async fn pair_inner(
    peer: &Peer,
    ticket: &Ticket,
    desktop: PeerId,
    node: &NodeHandle,
) -> Result<PairOutcome, PhonePairError> {
    let addrs: Vec<Multiaddr> = ticket
        .addrs()
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    let mut control = node.control();
    // A circuit dial can lose a race with the relay connection it needs: retry a few times.
    let mut attempt = 0u32;
    let mut stream = loop {
        attempt += 1;
        node.dial(desktop, addrs.clone())
            .await
            .map_err(|e| PhonePairError::Unreachable(e.to_string()))?;
        // A stream asked for before the node has reported the connection can hang until
        // the step's timeout; waiting for it costs nothing when the dial is quick.
        node.wait_connected(desktop, crate::net::node::CONNECT_WAIT)
            .await;
        let opened = tokio::time::timeout(
            pair::STEP_TIMEOUT,
            control.open_stream(desktop, PAIR_PROTOCOL),
        )
        .await;
        match opened {
            Ok(Ok(stream)) => break stream,
            Ok(Err(e)) if attempt >= PAIR_DIAL_ATTEMPTS => {
                return Err(PhonePairError::Unreachable(e.to_string()));
            }
            Err(_) if attempt >= PAIR_DIAL_ATTEMPTS => {
                return Err(PhonePairError::Unreachable("timed out".into()));
            }
            _ => tokio::time::sleep(Duration::from_millis(300 * u64::from(attempt))).await,
        }
    };
    let me = peer.device_info();
    let hello = PhoneHello {
        name: me.name,
        kind: DeviceKind::Phone,
        actor: me.actor,
    };
    let replica = peer.replica().clone();
    let ticket_addrs: Vec<String> = ticket.addrs().to_vec();
    let desktop_id = ticket.desktop().clone();
    let welcome: Welcome<ThreadGenesis> = pair::initiate(
        &mut stream,
        ticket,
        desktop,
        peer.peer_id(),
        &hello,
        |w: &Welcome<ThreadGenesis>| {
            if w.genesis.owner != desktop_id {
                return Err("the desktop sent a thread it does not own".to_owned());
            }
            replica
                .replace_thread(w.genesis.clone())
                .map_err(|e| e.to_string())?;
            let trusted = TrustedPeer {
                id: desktop_id.clone(),
                name: w.name.clone(),
                kind: DeviceKind::Desktop,
                addrs: ticket_addrs.clone(),
                paired_at: now_ms(),
                last_seen: Some(now_ms()),
                last_sync_at: None,
                revoked: false,
            };
            let secret = w.discovery_secret;
            replica
                .with_store(|s| {
                    s.write(|t| {
                        t.put_trusted(&trusted)?;
                        t.put_meta(META_DISCOVERY, &secret)
                    })
                })
                .map_err(|e| e.to_string())
        },
    )
    .await?;
    drop(stream);
    // Trust is durable; open the gate for good and sync.
    let _ = peer.refresh_namespace().await;
    let mut events = peer.events();
    peer.gate().trust(desktop);
    // The connection was admitted before trust existed, so start the session on a fresh one.
    peer.disconnect(desktop).await;
    let addrs: Vec<Multiaddr> = ticket
        .addrs()
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    let _ = node.dial(desktop, addrs).await;
    let synced = tokio::time::timeout(FIRST_SYNC_TIMEOUT, async {
        loop {
            match events.recv().await {
                Ok(PeerEvent::InSync { peer: p }) if p == desktop => return true,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    if peer.is_in_sync(&desktop) {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    Ok(PairOutcome {
        desktop_id: desktop.to_base58(),
        desktop_name: welcome.name,
        thread_id: welcome.genesis.thread_id.to_string(),
        synced,
    })
}

/// Revokes a device: refuse it from now on, close its connections, mark it revoked in the
/// thread, settle its unstarted tasks as `cancelled{revoked}`, rotate the discovery secret,
/// and remove the files of its tasks that no kept task references.
pub async fn revoke(peer: &Peer, id: &str) -> Result<serde_json::Value, PeerError> {
    let pid = parse_peer_id(id)?;
    let mut t = peer
        .trusted_peers()
        .await?
        .into_iter()
        .find(|t| t.id.as_str() == pid.to_base58())
        .ok_or_else(|| PeerError::Invalid(format!("no device {id} is paired with this home")))?;
    t.revoked = true;
    peer.trust(t.clone()).await?;
    peer.disconnect(pid).await;
    let mut cancelled = 0usize;
    if peer.kind() == DeviceKind::Desktop {
        let dev_id = t.id.clone();
        let now = now_ms();
        let device = peer
            .replica()
            .read({
                let dev_id = dev_id.clone();
                move |d| d.devices().into_iter().find(|x| x.id == dev_id)
            })
            .await?;
        if let Some(mut device) = device {
            device.revoked_at = Some(now);
            peer.replica()
                .commit(move |d| d.add_device(&device))
                .await?;
        }
        let me = peer.device_id();
        let tasks = peer.replica().read(|d| d.tasks()).await?;
        for task in tasks
            .into_iter()
            .filter(|x| x.author == dev_id && x.target == me)
        {
            let v = fold(&task);
            if matches!(
                v.status,
                TaskStatus::Queued
                    | TaskStatus::FetchingAttachments
                    | TaskStatus::Delivered
                    | TaskStatus::AwaitingApproval
            ) {
                peer.append_event(
                    task.id,
                    v.attempt,
                    EventKind::Cancelled {
                        reason: "revoked".into(),
                    },
                )
                .await?;
                cancelled += 1;
            }
        }
        let fresh: [u8; 32] = rand::random();
        peer.replica()
            .store_blocking(move |s| s.write(|tx| tx.put_meta(META_DISCOVERY, &fresh)))
            .await??;
    }
    // The files of the revoked device's tasks go, unless a kept task references them.
    let removed = match peer.collect_blobs().await {
        Ok(c) => c.blobs,
        Err(e) => {
            tracing::warn!(error = %e, "could not remove the revoked device's files");
            0
        }
    };
    Ok(serde_json::json!({
        "id": t.id.to_string(),
        "revoked": true,
        "cancelled_tasks": cancelled,
        "removed_files": removed,
    }))
}

/// The phone forgets its desktop: trust removed, connections closed, and the pairing's files
/// removed (attachments it sent, artifacts it fetched). The thread stays readable.
pub async fn forget(peer: &Peer) -> Result<serde_json::Value, PeerError> {
    let trusted = peer.trusted_peers().await?;
    let mut forgotten = Vec::new();
    for t in trusted
        .into_iter()
        .filter(|t| t.kind == DeviceKind::Desktop)
    {
        let id = t.id.to_string();
        let pid = parse_peer_id(&id)?;
        let i2 = id.clone();
        peer.replica()
            .store_blocking(move |s| s.write(|tx| tx.delete_trusted(&i2)))
            .await??;
        peer.gate().distrust(&pid);
        peer.disconnect(pid).await;
        forgotten.push(id);
    }
    // The files of the forgotten pairing go (attachments sent, artifacts fetched).
    let removed = match peer.collect_blobs().await {
        Ok(c) => c.blobs,
        Err(e) => {
            tracing::warn!(error = %e, "could not remove the forgotten pairing's files");
            0
        }
    };
    Ok(serde_json::json!({ "forgotten": forgotten, "removed_files": removed }))
}
