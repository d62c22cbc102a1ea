//! Pairing, wired to the store and the network: tickets in redb (single use, expiring, dead
//! after 5 wrong tries, secret wiped when spent), the desktop's `/errand/pair/1` responder,
//! the phone's side, revocation and forgetting.
//!
//! - The desktop's gate lets unknown peers connect (to pair, nothing else) exactly while some
//!   ticket in the store is live: [`refresh_window`] recomputes that window from the store when
//!   a ticket is issued, used, expires or dies, and when the responder starts after a restart.
//! - Checking a ticket and spending it (used, or one more wrong try) happen in one redb write
//!   transaction, so two handshakes racing on one ticket cannot both succeed or lose a try.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use errand_core::{
    DeviceId, DeviceKind, EventKind, TaskStatus, Ticket, fold,
    ticket::{TicketId, TicketSecret},
};
use errand_crdt::{Store, StoreError, ThreadGenesis, TrustedPeer};
use futures::StreamExt;
use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::{
    pair::{self, PAIR_PROTOCOL, PairError, PhoneHello, TicketBook, Welcome},
    peer::{Peer, PeerError, PeerEvent, now_ms},
    replica::Binding,
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
/// Pairing handshakes served at once. A person pairs one phone at a time; a few more cover a
/// retry while an earlier attempt times out. Each handshake runs on a blocking thread, so
/// without a cap 750 silent streams took 516 threads (issue 14).
pub const MAX_CONCURRENT_PAIRINGS: usize = 4;
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

/// Applies `f` to a stored ticket inside one write transaction, so the read and the update
/// cannot interleave with another handshake's. `f` returns whether to store its change.
/// Returns `f`'s view of the ticket, or `None` for an unknown id.
fn update_ticket(
    store: &Store,
    id: &TicketId,
    f: impl FnOnce(&mut StoredTicket) -> bool,
) -> Result<Option<StoredTicket>, StoreError> {
    store.write(|tx| {
        let mut table = tx.table(TICKETS)?;
        let current: Option<StoredTicket> = table
            .get(id.as_bytes().as_slice())?
            .and_then(|v| serde_json::from_slice(v.value()).ok());
        let Some(mut t) = current else {
            return Ok(None);
        };
        if f(&mut t) {
            let bytes = serde_json::to_vec(&t).unwrap_or_default();
            table.insert(id.as_bytes().as_slice(), bytes.as_slice())?;
        }
        Ok(Some(t))
    })
}

/// The latest expiry (UTC ms) of a ticket that is live at `now`, if any.
fn latest_live_expiry(store: &Store, now: i64) -> Option<i64> {
    store
        .read_table(TICKETS, |t| {
            let mut latest = None;
            for row in t.iter()? {
                let (_, v) = row?;
                if let Ok(st) = serde_json::from_slice::<StoredTicket>(v.value())
                    && st.state == TicketState::Live
                    && st.expires_at > now
                {
                    latest = latest.max(Some(st.expires_at));
                }
            }
            Ok(latest)
        })
        .ok()
        .flatten()
        .flatten()
}

/// Drops tickets whose expiry has passed, whatever their state: an unknown id is refused just
/// like a used or expired one, and this keeps the table as small as the open tickets.
fn prune_tickets(store: &Store, now: i64) -> Result<(), StoreError> {
    let stale: Vec<Vec<u8>> = store
        .read_table(TICKETS, |t| {
            let mut out = Vec::new();
            for row in t.iter()? {
                let (k, v) = row?;
                let expired = serde_json::from_slice::<StoredTicket>(v.value())
                    .map_or(true, |st| st.expires_at <= now);
                if expired {
                    out.push(k.value().to_vec());
                }
            }
            Ok(out)
        })?
        .unwrap_or_default();
    if stale.is_empty() {
        return Ok(());
    }
    store.write(|tx| {
        let mut table = tx.table(TICKETS)?;
        for k in &stale {
            table.remove(k.as_slice())?;
        }
        Ok(())
    })
}

/// Opens the desktop's pairing window until the last live ticket expires, or closes it when
/// none is live. The window lets unknown peers connect (the pairing protocol still needs the
/// secret, and sync streams still need trust).
pub fn refresh_window(peer: &Peer) {
    let now = now_ms();
    let latest = peer.replica().with_store(|s| latest_live_expiry(s, now));
    let until = latest
        .map(|ms| Instant::now() + Duration::from_millis(u64::try_from(ms - now).unwrap_or(0)));
    if let Ok(mut g) = peer.gate().write() {
        g.pairing_open_until = until;
    }
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
    let stored = StoredTicket {
        secret: Some(hex::encode(ticket.secret().as_bytes())),
        expires_at: ticket.expires_at(),
        tries: 0,
        state: TicketState::Live,
    };
    let id = ticket.id();
    peer.replica()
        .store_blocking(move |s| {
            prune_tickets(s, now)?;
            save_ticket(s, &id, &stored)
        })
        .await??;
    refresh_window(peer);
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
        let mut expired = false;
        let secret = self.with_store(|s| {
            let mut t = load_ticket(s, id)?;
            if t.state == TicketState::Live && t.expires_at <= now_ms() {
                t.state = TicketState::Expired;
                t.secret = None;
                expired = true;
                let _ = save_ticket(s, id, &t);
            }
            if t.state != TicketState::Live {
                return None;
            }
            let bytes = hex::decode(t.secret.as_deref()?).ok()?;
            Some(TicketSecret::from_bytes(bytes.try_into().ok()?))
        });
        if expired {
            refresh_window(&self.peer);
        }
        secret
    }

    fn record_failure(&mut self, id: &TicketId) {
        let result = self.with_store(|s| {
            update_ticket(s, id, |t| {
                if t.state != TicketState::Live {
                    return false;
                }
                t.tries += 1;
                if t.tries >= MAX_TRIES {
                    t.state = TicketState::Dead;
                    t.secret = None;
                }
                true
            })
        });
        match result {
            Ok(Some(t)) if t.state == TicketState::Dead => {
                tracing::warn!(ticket = %id, "pairing ticket dead after {MAX_TRIES} wrong tries");
                refresh_window(&self.peer);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(ticket = %id, error = %e, "could not count a wrong try"),
        }
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
            let secret = discovery_secret(s).map_err(|e| e.to_string())?;
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
            // One transaction: the ticket is checked and spent exactly when trust is granted,
            // so a second handshake that raced this one on the same ticket finds it used.
            let spent = s
                .write(|tx| -> Result<bool, StoreError> {
                    let mut table = tx.table(TICKETS)?;
                    let current: Option<StoredTicket> = table
                        .get(id.as_bytes().as_slice())?
                        .and_then(|v| serde_json::from_slice(v.value()).ok());
                    let Some(mut t) =
                        current.filter(|t| t.state == TicketState::Live && t.expires_at > now_ms())
                    else {
                        return Ok(false);
                    };
                    t.state = TicketState::Used;
                    t.secret = None;
                    let bytes = serde_json::to_vec(&t).unwrap_or_default();
                    table.insert(id.as_bytes().as_slice(), bytes.as_slice())?;
                    drop(table);
                    tx.put_trusted(&trusted)?;
                    Ok(true)
                })
                .map_err(|e| e.to_string())?;
            if !spent {
                return Err(
                    "this pairing code is no longer valid; ask for a new one on the \
                            desktop: errand-desktop pair"
                        .into(),
                );
            }
            Ok(secret)
        })?;
        if let Ok(mut g) = self.peer.gate().write() {
            g.trusted.insert(phone);
        }
        // Other live tickets keep the window open; otherwise it closes now.
        refresh_window(&self.peer);
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
pub fn serve(
    peer: &Peer,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, PeerError> {
    let node = peer.node().ok_or(PeerError::NotStarted)?;
    let mut incoming = node
        .control()
        .accept(PAIR_PROTOCOL)
        .map_err(|e| PeerError::Invalid(e.to_string()))?;
    // Tickets issued before a restart stay usable until they expire.
    refresh_window(peer);
    let peer = peer.clone();
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_PAIRINGS));
    Ok(tokio::spawn(async move {
        loop {
            let (phone, mut stream) = tokio::select! {
                _ = cancel.cancelled() => return,
                next = incoming.next() => match next {
                    Some(n) => n,
                    None => return,
                },
            };
            // A handshake holds a permit (and a blocking thread) until it ends, at most a few
            // step timeouts; when all are taken, the stream is dropped at once.
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                tracing::info!(%phone, "refused a pairing stream: {MAX_CONCURRENT_PAIRINGS} handshakes already run");
                drop(stream);
                continue;
            };
            let peer = peer.clone();
            tokio::spawn(async move {
                let _permit = permit;
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
                        if let Err(e) = peer
                            .replica()
                            .ensure_device(
                                phone,
                                paired.hello.name.clone(),
                                DeviceKind::Phone,
                                paired.hello.actor.clone(),
                                Binding::Pairing,
                                now_ms(),
                            )
                            .await
                        {
                            tracing::warn!(%phone, error = %e, "could not record the paired phone's actor; its changes will be refused");
                        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(state: TicketState, expires_at: i64) -> StoredTicket {
        StoredTicket {
            secret: (state == TicketState::Live).then(|| "00".repeat(32)),
            expires_at,
            tries: 0,
            state,
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn the_window_lasts_until_the_last_live_ticket_expires() {
        let (_dir, s) = store();
        assert_eq!(latest_live_expiry(&s, 1_000), None, "no table yet");
        let ids: Vec<TicketId> = (0..5).map(|_| TicketId::random()).collect();
        save_ticket(&s, &ids[0], &ticket(TicketState::Live, 5_000)).unwrap();
        save_ticket(&s, &ids[1], &ticket(TicketState::Live, 9_000)).unwrap();
        save_ticket(&s, &ids[2], &ticket(TicketState::Used, 20_000)).unwrap();
        save_ticket(&s, &ids[3], &ticket(TicketState::Dead, 20_000)).unwrap();
        save_ticket(&s, &ids[4], &ticket(TicketState::Live, 500)).unwrap();
        assert_eq!(latest_live_expiry(&s, 1_000), Some(9_000));
        assert_eq!(latest_live_expiry(&s, 9_000), None, "expiry is exclusive");
    }

    #[test]
    fn pruning_drops_only_tickets_past_their_expiry() {
        let (_dir, s) = store();
        let (old, live, used) = (TicketId::random(), TicketId::random(), TicketId::random());
        save_ticket(&s, &old, &ticket(TicketState::Live, 500)).unwrap();
        save_ticket(&s, &live, &ticket(TicketState::Live, 5_000)).unwrap();
        save_ticket(&s, &used, &ticket(TicketState::Used, 5_000)).unwrap();
        prune_tickets(&s, 1_000).unwrap();
        assert!(load_ticket(&s, &old).is_none());
        assert_eq!(load_ticket(&s, &live).unwrap().state, TicketState::Live);
        assert_eq!(
            load_ticket(&s, &used).unwrap().state,
            TicketState::Used,
            "a used ticket stays used until it expires"
        );
    }

    #[test]
    fn update_ticket_stores_only_what_the_closure_accepts() {
        let (_dir, s) = store();
        let id = TicketId::random();
        assert!(
            update_ticket(&s, &id, |_| true).unwrap().is_none(),
            "unknown"
        );
        save_ticket(&s, &id, &ticket(TicketState::Live, 5_000)).unwrap();
        let seen = update_ticket(&s, &id, |t| {
            t.tries = 7;
            false
        })
        .unwrap()
        .unwrap();
        assert_eq!(seen.tries, 7);
        assert_eq!(load_ticket(&s, &id).unwrap().tries, 0, "not stored");
        update_ticket(&s, &id, |t| {
            t.tries = 2;
            true
        })
        .unwrap();
        assert_eq!(load_ticket(&s, &id).unwrap().tries, 2);
    }
}
