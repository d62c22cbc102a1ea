//! Pairing, wired to the store and the network: tickets in redb (single use, expiring, dead
//! after 5 wrong tries, secret wiped when spent), the desktop's `/errand/pair/1` responder,
//! the phone's side, revocation and forgetting.

use std::time::Duration;

use errand_core::{
    DeviceId, DeviceKind, EventKind, TaskStatus, Ticket, fold,
    ticket::{TicketId, TicketSecret},
};
use errand_crdt::{Store, StoreError, ThreadGenesis, TrustedPeer};
use futures::StreamExt;
use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};
use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use crate::{
    pair::{self, PAIR_PROTOCOL, PairError, PhoneHello, TicketBook, Welcome},
    peer::{Peer, PeerError, PeerEvent, now_ms},
};

const TICKETS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("pair_tickets");
/// Store key of the discovery secret the paired devices share (rendezvous namespace).
pub const META_DISCOVERY: &str = "discovery_secret";

/// Wrong tries after which a ticket is dead (DESIGN.md section 7).
pub const MAX_TRIES: u32 = 5;
/// Default ticket lifetime: long enough to find the phone and scan, short enough that a
/// photographed code is soon useless.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10 * 60);
/// Addresses put in a ticket: the QR must stay small; the phone learns more by identify.
const MAX_TICKET_ADDRS: usize = 3;
/// Dial attempts before pairing gives up on the ticket's addresses.
const PAIR_DIAL_ATTEMPTS: u32 = 3;
/// How long the phone waits for its first full sync after the handshake.
pub const FIRST_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredTicket {
    /// Hex secret; `None` once used, expired or dead.
    secret: Option<String>,
    expires_at: i64,
    tries: u32,
    state: TicketState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum TicketState {
    Live,
    Used,
    Expired,
    Dead,
}

fn load_ticket(store: &Store, id: &TicketId) -> Option<StoredTicket> {
    store
        .read_table(TICKETS, |t| {
            Ok(t.get(id.as_bytes().as_slice())?
                .and_then(|v| serde_json::from_slice(v.value()).ok()))
        })
        .ok()
        .flatten()
        .flatten()
}

fn save_ticket(store: &Store, id: &TicketId, t: &StoredTicket) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(t).unwrap_or_default();
    store.write(|tx| {
        tx.table(TICKETS)?
            .insert(id.as_bytes().as_slice(), bytes.as_slice())?;
        Ok(())
    })
}

/// The discovery secret shared by this thread's devices, created on first use.
pub fn discovery_secret(store: &Store) -> Result<[u8; 32], StoreError> {
    if let Some(b) = store.meta(META_DISCOVERY)?
        && let Ok(a) = <[u8; 32]>::try_from(b.as_slice())
    {
        return Ok(a);
    }
    let fresh: [u8; 32] = rand::random();
    store.write(|t| t.put_meta(META_DISCOVERY, &fresh))?;
    Ok(fresh)
}

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
        addrs.iter().take(MAX_TICKET_ADDRS).map(ToString::to_string).collect()
    };
    // Relay circuit addresses too, so a phone elsewhere can pair through the relay.
    texts.extend(circuits.iter().map(ToString::to_string));
    texts.truncate(errand_core::ticket::MAX_TICKET_ADDRS);
    let now = now_ms();
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let ticket = Ticket::new(peer.device_id(), texts, ttl_ms, now);
    let stored = StoredTicket {
        secret: Some(hex::encode(ticket.secret().as_bytes())),
        expires_at: ticket.expires_at(),
        tries: 0,
        state: TicketState::Live,
    };
    let id = ticket.id();
    peer.replica()
        .store_blocking(move |s| save_ticket(s, &id, &stored))
        .await??;
    if let Ok(mut g) = peer.gate().write() {
        let until = std::time::Instant::now() + ttl;
        g.pairing_open_until = Some(g.pairing_open_until.map_or(until, |u| u.max(until)));
    }
    tracing::info!(ticket = %ticket.id(), "pairing ticket issued");
    Ok(ticket)
}

/// The desktop's ticket book over its store.
struct Book {
    peer: Peer,
}

impl Book {
    fn with_store<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        self.peer.replica().with_store(f)
    }
}

impl TicketBook for Book {
    type Genesis = ThreadGenesis;

    fn secret(&mut self, id: &TicketId) -> Option<TicketSecret> {
        self.with_store(|s| {
            let mut t = load_ticket(s, id)?;
            if t.state == TicketState::Live && t.expires_at <= now_ms() {
                t.state = TicketState::Expired;
                t.secret = None;
                let _ = save_ticket(s, id, &t);
            }
            if t.state != TicketState::Live {
                return None;
            }
            let bytes = hex::decode(t.secret.as_deref()?).ok()?;
            Some(TicketSecret::from_bytes(bytes.try_into().ok()?))
        })
    }

    fn record_failure(&mut self, id: &TicketId) {
        self.with_store(|s| {
            let Some(mut t) = load_ticket(s, id) else {
                return;
            };
            t.tries += 1;
            if t.tries >= MAX_TRIES {
                t.state = TicketState::Dead;
                t.secret = None;
                tracing::warn!(ticket = %id, "pairing ticket dead after {MAX_TRIES} wrong tries");
            }
            let _ = save_ticket(s, id, &t);
        });
    }

    fn accept(
        &mut self,
        id: &TicketId,
        phone: PeerId,
        hello: &PhoneHello,
    ) -> Result<Welcome<ThreadGenesis>, String> {
        let genesis = self
            .peer
            .replica()
            .genesis()
            .ok_or("the desktop has no thread")?;
        let phone_id: DeviceId = phone.to_base58().parse().map_err(|_| "bad phone id")?;
        let executors = self
            .peer
            .replica()
            .read_now(|d| {
                d.devices()
                    .into_iter()
                    .find(|x| x.id == d.genesis().owner)
                    .map(|x| x.executors)
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        let name = hello.name.clone();
        let discovery = self.with_store(|s| -> Result<[u8; 32], String> {
            let mut t = load_ticket(s, id).ok_or("unknown ticket")?;
            if t.state != TicketState::Live {
                return Err("the ticket is no longer valid".into());
            }
            let secret = discovery_secret(s).map_err(|e| e.to_string())?;
            t.state = TicketState::Used;
            t.secret = None;
            let bytes = serde_json::to_vec(&t).unwrap_or_default();
            let trusted = TrustedPeer {
                id: phone_id.clone(),
                name: name.clone(),
                kind: DeviceKind::Phone,
                addrs: Vec::new(),
                paired_at: now_ms(),
                last_seen: Some(now_ms()),
                last_sync_at: None,
                revoked: false,
            };
            // One transaction: the ticket is spent exactly when trust is granted.
            s.write(|tx| {
                tx.table(TICKETS)?
                    .insert(id.as_bytes().as_slice(), bytes.as_slice())?;
                tx.put_trusted(&trusted)
            })
            .map_err(|e| e.to_string())?;
            Ok(secret)
        })?;
        if let Ok(mut g) = self.peer.gate().write() {
            g.trusted.insert(phone);
            g.pairing_open_until = None;
        }
        let me = self.peer.device_info();
        Ok(Welcome {
            name: me.name,
            kind: DeviceKind::Desktop,
            actor: me.actor,
            genesis,
            discovery_secret: discovery,
            executors,
        })
    }
}

/// Serves `/errand/pair/1` on a started desktop until the network stops.
pub fn serve(peer: &Peer) -> Result<tokio::task::JoinHandle<()>, PeerError> {
    let node = peer.node().ok_or(PeerError::NotStarted)?;
    let mut incoming = node
        .control()
        .accept(PAIR_PROTOCOL)
        .map_err(|e| PeerError::Invalid(e.to_string()))?;
    let peer = peer.clone();
    Ok(tokio::spawn(async move {
        while let Some((phone, mut stream)) = incoming.next().await {
            let peer = peer.clone();
            tokio::spawn(async move {
                let desktop = peer.peer_id();
                let book_peer = peer.clone();
                // The book does brief redb work; keep it off the async workers.
                let result = tokio::task::spawn_blocking(move || {
                    let handle = tokio::runtime::Handle::current();
                    let mut book = Book { peer: book_peer };
                    handle.block_on(pair::respond(&mut stream, desktop, phone, &mut book))
                })
                .await;
                match result {
                    Ok(Ok(paired)) => {
                        tracing::info!(%phone, name = %paired.hello.name, confirmed = paired.confirmed(), "paired a phone");
                        let _ = peer
                            .replica()
                            .ensure_device(
                                phone,
                                paired.hello.name.clone(),
                                DeviceKind::Phone,
                                paired.hello.actor.clone(),
                                now_ms(),
                            )
                            .await;
                    }
                    Ok(Err(e)) => tracing::info!(%phone, error = %e, "pairing failed"),
                    Err(e) => tracing::warn!(%phone, error = %e, "pairing task failed"),
                }
            });
        }
    }))
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
    /// Could not reach the desktop.
    #[error("cannot reach the desktop at any address in the ticket: {0}")]
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
        if let Some(relay) = a.strip_suffix("/p2p-circuit").and_then(|r| r.parse::<Multiaddr>().ok())
            && crate::relay_client::relay_peer(&relay).is_some()
        {
            peer.add_relay(relay).await?;
        }
    }
    // Let the desktop through our gate for the handshake only.
    if let Ok(mut g) = peer.gate().write() {
        g.infra.insert(desktop);
    }
    let result = pair_inner(peer, ticket, desktop, &node).await;
    if let Ok(mut g) = peer.gate().write() {
        g.infra.remove(&desktop);
    }
    result
}

async fn pair_inner(
    peer: &Peer,
    ticket: &Ticket,
    desktop: PeerId,
    node: &crate::node::NodeHandle,
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
        let opened =
            tokio::time::timeout(pair::STEP_TIMEOUT, control.open_stream(desktop, PAIR_PROTOCOL)).await;
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
    if let Ok(mut g) = peer.gate().write() {
        g.trusted.insert(desktop);
    }
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
/// thread, settle its unstarted tasks as `cancelled{revoked}`, rotate the discovery secret.
pub async fn revoke(peer: &Peer, id: &str) -> Result<serde_json::Value, PeerError> {
    let pid = crate::peer::parse_peer_id(id)?;
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
                TaskStatus::Queued | TaskStatus::Delivered | TaskStatus::AwaitingApproval
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
    Ok(serde_json::json!({ "id": t.id.to_string(), "revoked": true, "cancelled_tasks": cancelled }))
}

/// The phone forgets its desktop: trust removed, connections closed. The thread stays readable.
pub async fn forget(peer: &Peer) -> Result<serde_json::Value, PeerError> {
    let trusted = peer.trusted_peers().await?;
    let mut forgotten = Vec::new();
    for t in trusted
        .into_iter()
        .filter(|t| t.kind == DeviceKind::Desktop)
    {
        let id = t.id.to_string();
        let pid = crate::peer::parse_peer_id(&id)?;
        let i2 = id.clone();
        peer.replica()
            .store_blocking(move |s| s.write(|tx| tx.delete_trusted(&i2)))
            .await??;
        if let Ok(mut g) = peer.gate().write() {
            g.trusted.remove(&pid);
        }
        peer.disconnect(pid).await;
        forgotten.push(id);
    }
    Ok(serde_json::json!({ "forgotten": forgotten }))
}
