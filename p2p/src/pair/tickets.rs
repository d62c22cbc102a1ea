//! The desktop's tickets in its store: single use, expiring, dead after [`MAX_TRIES`] wrong
//! tries, secret wiped when spent. Also the pairing window they open, and the discovery secret
//! the paired devices share.
//!
//! - The desktop's gate lets unknown peers connect (to pair, nothing else) exactly while some
//!   ticket in the store is live: [`refresh_window`] recomputes that window from the store when
//!   a ticket is issued, used, expires or dies, and when the responder starts after a restart.
//! - Checking a ticket and spending it (used, or one more wrong try) happen in one redb write
//!   transaction, so two handshakes racing on one ticket cannot both succeed or lose a try.

use std::time::{Duration, Instant};

use errand_core::{
    DeviceId, DeviceKind, Ticket,
    ticket::{TicketId, TicketSecret},
};
use errand_crdt::{Store, StoreError, ThreadGenesis, TrustedPeer};
use libp2p::PeerId;
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::messages::{PhoneHello, TicketBook, Welcome};
use crate::{
    clock::now_ms,
    replica::Replica,
    sync::{gate::SharedGate, session::DeviceInfo},
};

use errand_crdt::tables::PAIR_TICKETS as TICKETS;
/// Store key of the discovery secret the paired devices share (rendezvous namespace).
pub const META_DISCOVERY: &str = "discovery_secret";

/// Wrong tries after which a ticket is dead (DESIGN.md section 7).
pub const MAX_TRIES: u32 = 5;

/// What pairing works with on a desktop: the parts of its peer that a handshake reads and
/// writes, and nothing else.
#[derive(Debug, Clone)]
pub struct Desk {
    /// The replica: its store holds the tickets and the trust records, its document the
    /// devices.
    pub replica: Replica,
    /// The gate: pairing opens and closes its window and lets a paired phone in.
    pub gate: SharedGate,
    /// This desktop, as its welcome describes it.
    pub me: DeviceInfo,
}

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
pub fn refresh_window(replica: &Replica, gate: &SharedGate) {
    let now = now_ms();
    let latest = replica.with_store(|s| latest_live_expiry(s, now));
    let until = latest
        .map(|ms| Instant::now() + Duration::from_millis(u64::try_from(ms - now).unwrap_or(0)));
    gate.set_pairing_window(until);
}

/// Records a ticket just issued as live, after dropping the tickets past their expiry.
pub fn record_issued(store: &Store, ticket: &Ticket, now: i64) -> Result<(), StoreError> {
    let stored = StoredTicket {
        secret: Some(hex::encode(ticket.secret().as_bytes())),
        expires_at: ticket.expires_at(),
        tries: 0,
        state: TicketState::Live,
    };
    prune_tickets(store, now)?;
    save_ticket(store, &ticket.id(), &stored)
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

/// The desktop's ticket book over its store.
pub(super) struct Book {
    pub(super) desk: Desk,
}

impl Book {
    fn with_store<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        self.desk.replica.with_store(f)
    }

    fn refresh_window(&self) {
        refresh_window(&self.desk.replica, &self.desk.gate);
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
            self.refresh_window();
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
                self.refresh_window();
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
            .desk
            .replica
            .genesis()
            .ok_or("the desktop has no thread")?;
        let phone_id: DeviceId = phone.to_base58().parse().map_err(|_| "bad phone id")?;
        let executors = self
            .desk
            .replica
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
        self.desk.gate.trust(phone);
        // Other live tickets keep the window open; otherwise it closes now.
        self.refresh_window();
        let me = self.desk.me.clone();
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
