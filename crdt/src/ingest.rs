//! The ingest check: what a peer sent, checked before any of it is applied or stored.
//!
//! - Every chunk must parse (Automerge 0.12 skips a chunk it cannot parse and applies the
//!   rest, so garbage would pass silently).
//! - Changes this document already holds are harmless and skipped. Every other change must be
//!   written by an actor the sending device may write with ([`Authority`]): on the desktop,
//!   only the actors bound to that phone at pairing; on a phone, the actors of devices the
//!   owner recorded. Nobody may send changes of the fixed genesis actor.
//! - Bounds ([`Bounds`]): ops per change, the length of any string, and a per-peer budget of
//!   ops per minute ([`OpBudget`]). The refusal is an error value; nothing is applied.
//!
//! It is sans-IO: the caller passes the document, the authority and the time.

use std::collections::BTreeSet;

use automerge::{ActorId, Automerge, AutomergeError, Change, ChangeHash, ReadDoc, ScalarValue};

use crate::Touched;

/// Most ops one change from a phone may hold. A phone writes one task, one request or one
/// message per change: a task is about ten ops, and a task with every optional field and a
/// few dozen attachments stays under a hundred. 4,096 leaves room for schema growth while a
/// single change stays cheap to apply (Automerge 0.12 used about 590 bytes of memory per op
/// while applying one large change: a million-op change took 4.8 GB).
pub const MAX_OPS_PER_CHANGE: usize = 4_096;

/// Ops a phone may make the desktop apply per minute, refilled continuously. A full segment
/// (10,000 changes, about 2,000 tasks) is about 60,000 ops, and a phone back from a week
/// offline with 10,000 queued tasks sends about 100,000 ops: both fit in one minute's budget.
/// 250,000 ops at the worst case of about 590 bytes each stays under 150 MB while applied.
pub const PEER_OPS_PER_MINUTE: u64 = 250_000;

/// Longest string a phone may write in one op: the longest field it may write (an
/// instruction or a message, 64 KiB each, `errand_core::limits`). The CLI refuses longer ones
/// before they are written; the desktop refuses them at ingest too.
pub const MAX_PHONE_STRING_BYTES: usize = {
    let a = errand_core::limits::MAX_INSTRUCTION_BYTES;
    let b = errand_core::limits::MAX_MESSAGE_BYTES;
    if a > b { a } else { b }
};

/// Longest string any field of the thread may hold (an instruction or a message; output
/// events and reasons are shorter).
pub const MAX_STRING_BYTES: usize = MAX_PHONE_STRING_BYTES;

/// Why a peer's bytes were refused. Nothing of them was applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// A chunk does not parse (or has a wrong checksum).
    #[error("the peer's changes do not parse: {0}")]
    Malformed(String),
    /// A change written by an actor the sending device may not write with.
    #[error(
        "change {change} is written by actor {actor}, which is not bound to the sending device"
    )]
    ForeignActor {
        /// The change.
        change: ChangeHash,
        /// Its actor, hex.
        actor: String,
    },
    /// A change with more ops than [`Bounds::max_ops_per_change`].
    #[error("change {change} holds {ops} ops, over the limit of {max} per change")]
    TooManyOps {
        /// The change.
        change: ChangeHash,
        /// Its ops.
        ops: usize,
        /// The limit.
        max: usize,
    },
    /// A string longer than [`Bounds::max_string_bytes`].
    #[error("change {change} writes a string of {bytes} bytes, over the limit of {max}")]
    TooLong {
        /// The change.
        change: ChangeHash,
        /// The string's length.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A bundle whose changes hold more ops than the bounds allow, counted from its change
    /// metadata before any change was built.
    #[error("the peer's bundle holds {ops} ops ({what}), over the limit of {max}")]
    BundleTooLarge {
        /// Which limit: one change's ops, or the whole bundle's.
        what: &'static str,
        /// Ops counted.
        ops: u64,
        /// The limit.
        max: u64,
    },
    /// A whole document where only changes are accepted ([`Bounds::documents`]).
    #[error("the peer sent a whole document; only changes are accepted from it")]
    Document,
    /// A bundle where only changes are accepted ([`Bounds::bundles`]).
    #[error("the peer sent a bundle of changes; only changes one by one are accepted from it")]
    Bundle,
    /// The peer is over its budget of ops per minute.
    #[error(
        "the peer sent {ops} ops, over its budget of {per_minute} ops per minute; it may go on in {retry_after_secs} s"
    )]
    OverBudget {
        /// Ops in what it sent.
        ops: u64,
        /// The budget.
        per_minute: u64,
        /// When enough budget is back for what it sent.
        retry_after_secs: u64,
    },
}

/// Who may have written what a peer sends us.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Authority {
    /// Actors whose new changes are accepted from this peer.
    pub actors: BTreeSet<ActorId>,
    /// Accept every actor but this one instead (a phone, from its owner desktop: every
    /// actor but the genesis actor).
    pub all_but: Option<ActorId>,
}

impl Authority {
    /// True if `actor`'s changes are accepted.
    pub fn allows(&self, actor: &ActorId) -> bool {
        match &self.all_but {
            Some(refused) => actor != refused,
            None => self.actors.contains(actor),
        }
    }
}

/// Bounds on what one peer's changes may do. `None` bounds are not checked (a phone takes
/// what its own desktop sends; the desktop bounds its phones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Most ops in one change.
    pub max_ops_per_change: Option<usize>,
    /// Longest string in one op.
    pub max_string_bytes: Option<usize>,
    /// Whether a whole-document chunk is accepted. Its ops cannot be counted before it is
    /// loaded, and loading is what costs (a 1 KiB document of a million ops took 94 MB), so
    /// the desktop refuses them from phones, which it asks for changes instead
    /// (`SyncSession::refuse_documents`).
    pub documents: bool,
    /// Whether a bundle chunk is accepted. Automerge decodes a bundle's columns whole before
    /// anything can be counted, and a run-length column makes that unbounded: a 320-byte
    /// bundle found by fuzzing made it allocate 2 GiB. The desktop refuses bundles from
    /// phones, which send changes one by one (`SyncSession::send_no_bundles`).
    pub bundles: bool,
}

impl Bounds {
    /// What the desktop enforces on a phone.
    pub const PHONE: Self = Self {
        max_ops_per_change: Some(MAX_OPS_PER_CHANGE),
        max_string_bytes: Some(MAX_PHONE_STRING_BYTES),
        documents: false,
        bundles: false,
    };
    /// What a phone enforces on its desktop: no string longer than any field may be (the
    /// desktop's own changes, such as revoking a device with many tasks, may be large).
    pub const DESKTOP: Self = Self {
        max_ops_per_change: None,
        max_string_bytes: Some(MAX_STRING_BYTES),
        documents: true,
        bundles: true,
    };
    /// No bounds beyond parsing.
    pub const NONE: Self = Self {
        max_ops_per_change: None,
        max_string_bytes: None,
        documents: true,
        bundles: true,
    };
}

/// What passed the check.
#[derive(Debug, Default)]
pub struct Checked {
    /// The changes this document did not hold yet, parsed.
    pub changes: Vec<Change>,
    /// The message carried a whole document (Automerge sends one when more than a third of
    /// the document is missing).
    pub document: bool,
    /// What the new changes write to.
    pub touched: Touched,
    /// Ops in the new changes.
    pub ops: u64,
}

/// A per-peer budget of ops, refilled continuously up to one minute's worth. Time comes from
/// the caller (milliseconds on any monotonic clock).
#[derive(Debug, Clone)]
pub struct OpBudget {
    per_minute: u64,
    /// Ops available, scaled by 60,000 (ms per minute) so refills stay integral.
    scaled: u128,
    at_ms: u64,
}

const MINUTE_MS: u128 = 60_000;

impl OpBudget {
    /// A full budget of `per_minute` ops at time `now_ms`.
    pub fn new(per_minute: u64, now_ms: u64) -> Self {
        Self {
            per_minute,
            scaled: u128::from(per_minute) * MINUTE_MS,
            at_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed = u128::from(now_ms.saturating_sub(self.at_ms));
        let cap = u128::from(self.per_minute) * MINUTE_MS;
        self.scaled = (self.scaled + elapsed * u128::from(self.per_minute)).min(cap);
        self.at_ms = self.at_ms.max(now_ms);
    }

    /// Takes `ops` from the budget, or refuses (taking nothing) if not enough is left.
    pub fn take(&mut self, ops: u64, now_ms: u64) -> Result<(), IngestError> {
        self.refill(now_ms);
        let need = u128::from(ops) * MINUTE_MS;
        if need <= self.scaled {
            self.scaled -= need;
            return Ok(());
        }
        let missing = need - self.scaled;
        let per_ms = u128::from(self.per_minute.max(1));
        Err(IngestError::OverBudget {
            ops,
            per_minute: self.per_minute,
            retry_after_secs: u64::try_from(missing.div_ceil(per_ms).div_ceil(1000))
                .unwrap_or(u64::MAX),
        })
    }

    /// Empties the budget: a peer whose bytes were refused waits until it refills before
    /// its next session, so refusals cannot be repeated at full speed (parsing a change of
    /// millions of ops to find out is itself work).
    pub fn drain(&mut self, now_ms: u64) {
        self.refill(now_ms);
        self.scaled = 0;
    }

    /// True if some budget is left (a new session may start).
    pub fn has_some(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        self.scaled > 0
    }
}

/// Checks an Automerge sync message from a peer against `doc`, before it is applied.
///
/// Bytes that are no sync message at all pass with nothing in them: the session's own decode
/// reports them.
pub fn check_sync_message(
    bytes: &[u8],
    doc: &Automerge,
    authority: &Authority,
    bounds: Bounds,
) -> Result<Checked, IngestError> {
    match automerge::sync::Message::decode(bytes) {
        Ok(msg) => check_message(&msg, doc, authority, bounds),
        Err(_) => Ok(Checked::default()),
    }
}

/// Checks a decoded sync message from a peer against `doc`, before it is applied. The
/// changes in [`Checked::changes`] are what the session applies
/// ([`crate::SyncSession::receive_checked`]), so each chunk is parsed once.
pub fn check_message(
    msg: &automerge::sync::Message,
    doc: &Automerge,
    authority: &Authority,
    bounds: Bounds,
) -> Result<Checked, IngestError> {
    let mut out = Checked::default();
    let document = each_change(msg, bounds, |change| {
        admit(&mut out, change, doc, authority, bounds)
    })?;
    out.document = document;
    out.touched = Touched::of(&out.changes);
    Ok(out)
}

/// Every change a sync message carries, parsed, unchecked (for a caller that trusts the
/// sender: tests and tools).
pub fn message_changes(msg: &automerge::sync::Message) -> Result<Vec<Change>, IngestError> {
    let mut out = Vec::new();
    each_change(msg, Bounds::NONE, |change| {
        out.push(change);
        Ok(())
    })?;
    Ok(out)
}

/// Parses each change of `msg`'s chunks (plain changes, bundles and whole documents, as
/// `bounds` allow) and hands it to `f`. True if a whole document was among them.
fn each_change(
    msg: &automerge::sync::Message,
    bounds: Bounds,
    mut f: impl FnMut(Change) -> Result<(), IngestError>,
) -> Result<bool, IngestError> {
    let mut document = false;
    for chunk in msg.changes.iter() {
        for part in split_chunks(chunk)? {
            if crate::is_document_chunk(part) {
                if !bounds.documents {
                    return Err(IngestError::Document);
                }
                document = true;
                for change in document_changes(part)? {
                    f(change)?;
                }
            } else if is_bundle_chunk(part) {
                if !bounds.bundles {
                    return Err(IngestError::Bundle);
                }
                for change in bundle_changes(part, bounds)? {
                    f(change)?;
                }
            } else {
                f(parse_change(part)?)?;
            }
        }
    }
    Ok(document)
}

/// Checks pushed changes (concatenated change chunks, no documents) from a peer against
/// `doc`. At least one change must be in them.
pub fn check_pushed(
    bytes: &[u8],
    doc: &Automerge,
    authority: &Authority,
    bounds: Bounds,
) -> Result<Checked, IngestError> {
    let mut out = Checked::default();
    let mut any = false;
    for chunk in split_chunks(bytes)? {
        if crate::is_document_chunk(chunk) {
            return Err(IngestError::Malformed(
                "a whole document where changes belong".into(),
            ));
        }
        admit(&mut out, parse_change(chunk)?, doc, authority, bounds)?;
        any = true;
    }
    if !any {
        return Err(IngestError::Malformed("no changes".into()));
    }
    out.touched = Touched::of(&out.changes);
    Ok(out)
}

/// Adds `change` to `out` if `doc` lacks it and it passes the authority and the bounds.
fn admit(
    out: &mut Checked,
    change: Change,
    doc: &Automerge,
    authority: &Authority,
    bounds: Bounds,
) -> Result<(), IngestError> {
    let hash = change.hash();
    // Cheap: a lookup in the change graph (the queue of changes waiting for dependencies is
    // empty between messages).
    if doc.get_missing_deps(&[hash]).is_empty() {
        return Ok(());
    }
    if !authority.allows(change.actor_id()) {
        return Err(IngestError::ForeignActor {
            change: hash,
            actor: change.actor_id().to_hex_string(),
        });
    }
    if let Some(max) = bounds.max_ops_per_change
        && change.len() > max
    {
        return Err(IngestError::TooManyOps {
            change: hash,
            ops: change.len(),
            max,
        });
    }
    if let Some(max) = bounds.max_string_bytes {
        // Automerge parses some changes it then panics decoding (an op naming an actor past
        // the change's own list; found by fuzzing): such a change is malformed.
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| change.decode()))
            .map_err(|_| IngestError::Malformed(format!("change {hash} does not decode")))?;
        for op in decoded.operations {
            if let automerge::legacy::OpType::Put(ScalarValue::Str(s)) = &op.action
                && s.len() > max
            {
                return Err(IngestError::TooLong {
                    change: hash,
                    bytes: s.len(),
                    max,
                });
            }
        }
    }
    out.ops += change.len() as u64;
    out.changes.push(change);
    Ok(())
}

/// Splits concatenated Automerge chunks (`magic | checksum(4) | type(1) | uleb128 len | data`),
/// so each change can be parsed on its own.
pub fn split_chunks(mut bytes: &[u8]) -> Result<Vec<&[u8]>, IngestError> {
    let bad = |why: &str| IngestError::Malformed(why.to_owned());
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.get(..4) != Some(&crate::CHUNK_MAGIC[..]) {
            return Err(bad("a chunk without the automerge magic bytes"));
        }
        let mut pos = 9; // magic, checksum, type
        let (mut len, mut shift) = (0u64, 0u32);
        loop {
            let b = *bytes
                .get(pos)
                .ok_or_else(|| bad("a truncated chunk header"))?;
            pos += 1;
            if shift > 56 {
                return Err(bad("a chunk length that does not fit"));
            }
            len |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| pos.checked_add(l))
            .filter(|e| *e <= bytes.len())
            .ok_or_else(|| bad("a chunk longer than the message"))?;
        out.push(&bytes[..end]);
        bytes = &bytes[end..];
    }
    Ok(out)
}

/// Parses one change chunk (plain or compressed), checking its checksum. Any other chunk is
/// refused before Automerge sees it: `Change::try_from` also takes a bundle, and decodes all
/// of its columns.
pub fn parse_change(chunk: &[u8]) -> Result<Change, IngestError> {
    if !matches!(chunk.get(8), Some(&CHUNK_CHANGE | &CHUNK_COMPRESSED_CHANGE)) {
        return Err(IngestError::Malformed(
            "a chunk that is not a change where a change belongs".into(),
        ));
    }
    let change = std::panic::catch_unwind(|| Change::try_from(chunk))
        .map_err(|_| IngestError::Malformed("automerge panicked while parsing them".into()))?
        .map_err(|e| IngestError::Malformed(e.to_string()))?;
    // Parsing does not check the chunk's checksum (the first four bytes of the change's
    // hash, also for a compressed chunk); loading does, and drops a mismatch silently.
    if chunk.get(4..8) != change.hash().0.get(..4) {
        return Err(IngestError::Malformed(format!(
            "change {} has a wrong checksum",
            change.hash()
        )));
    }
    Ok(change)
}

/// Most ops one bundle from a phone may hold: one minute of its budget. The per-peer budget
/// is taken after the check; this bound keeps the check itself from building more changes
/// than a minute's worth.
pub const MAX_BUNDLE_OPS: u64 = PEER_OPS_PER_MINUTE;

/// Automerge's chunk type of a change.
const CHUNK_CHANGE: u8 = 1;
/// Automerge's chunk type of a deflated change.
const CHUNK_COMPRESSED_CHANGE: u8 = 2;
/// Automerge's chunk type of a bundle.
const CHUNK_BUNDLE: u8 = 3;

/// True for an Automerge bundle chunk, as [`crate::sync`] sends large catch-ups.
pub fn is_bundle_chunk(bytes: &[u8]) -> bool {
    bytes.len() > 8 && bytes[..4] == crate::CHUNK_MAGIC[..] && bytes[8] == CHUNK_BUNDLE
}

/// The changes of a bundle chunk. Under bounds on ops per change, the ops are counted from
/// the bundle's change metadata first (parsing a bundle streams its columns and builds
/// nothing: a bundle of a million ops in 1.1 KB parsed in 0.1 s with no growth of memory),
/// and the changes are built only if they fit.
fn bundle_changes(chunk: &[u8], bounds: Bounds) -> Result<Vec<Change>, IngestError> {
    let panicked = || IngestError::Malformed("automerge panicked while parsing them".into());
    // Loading drops a chunk with a wrong checksum silently: the check must not pass one.
    use sha2::Digest;
    if chunk.get(4..8) != sha2::Sha256::digest(&chunk[8..]).get(..4) {
        return Err(IngestError::Malformed(
            "a bundle with a wrong checksum".into(),
        ));
    }
    let bundle = std::panic::catch_unwind(|| automerge::Bundle::try_from(chunk))
        .map_err(|_| panicked())?
        .map_err(|e| IngestError::Malformed(e.to_string()))?;
    if let Some(max) = bounds.max_ops_per_change {
        let max = max as u64;
        let mut total = 0u64;
        for c in bundle.iter_changes() {
            let ops = c.max_op.saturating_add(1).saturating_sub(c.start_op);
            if ops > max {
                return Err(IngestError::BundleTooLarge {
                    what: "in one change",
                    ops,
                    max,
                });
            }
            total = total.saturating_add(ops);
            if total > MAX_BUNDLE_OPS {
                return Err(IngestError::BundleTooLarge {
                    what: "in all",
                    ops: total,
                    max: MAX_BUNDLE_OPS,
                });
            }
        }
    }
    let changes = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| bundle.to_changes()))
        .map_err(|_| panicked())?
        .map_err(|e| IngestError::Malformed(e.to_string()))?;
    Ok(changes)
}

/// The changes of a whole-document chunk, loaded into a scratch document.
fn document_changes(chunk: &[u8]) -> Result<Vec<Change>, IngestError> {
    let loaded = std::panic::catch_unwind(|| {
        Automerge::load_with_options(
            chunk,
            automerge::LoadOptions::new().on_partial_load(automerge::OnPartialLoad::Error),
        )
    });
    match loaded {
        Ok(Ok(doc)) => Ok(doc.get_changes(&[])),
        Ok(Err(AutomergeError::MissingDeps)) => Err(IngestError::Malformed(
            "a document whose changes miss their dependencies".into(),
        )),
        Ok(Err(e)) => Err(IngestError::Malformed(e.to_string())),
        Err(_) => Err(IngestError::Malformed(
            "automerge panicked while parsing them".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use automerge::{
        AutoCommit, ROOT,
        sync::{self, SyncDoc},
        transaction::Transactable,
    };

    use super::*;

    fn allow(docs: &[&AutoCommit]) -> Authority {
        Authority {
            actors: docs.iter().map(|d| d.get_actor().clone()).collect(),
            all_but: None,
        }
    }

    /// The messages `from` sends `to` until they are in sync.
    fn messages(from: &mut AutoCommit, to: &mut AutoCommit) -> Vec<Vec<u8>> {
        let (mut a, mut b) = (sync::State::new(), sync::State::new());
        let mut out = Vec::new();
        for _ in 0..10 {
            if let Some(m) = from.sync().generate_sync_message(&mut a) {
                out.push(m.clone().encode());
                to.sync().receive_sync_message(&mut b, m).unwrap();
            }
            if let Some(m) = to.sync().generate_sync_message(&mut b) {
                from.sync().receive_sync_message(&mut a, m).unwrap();
            }
        }
        out
    }

    fn message(chunk: Vec<u8>) -> Vec<u8> {
        sync::Message {
            heads: Vec::new(),
            need: Vec::new(),
            have: Vec::new(),
            changes: vec![chunk].into(),
            flags: None,
            version: sync::MessageVersion::V1,
        }
        .encode()
    }

    #[test]
    fn sync_messages_with_changes_that_do_not_parse_are_refused() {
        // A whole document (first sync), then a delta: both pass.
        let mut ours = AutoCommit::new();
        for i in 0..50 {
            ours.put(ROOT, format!("k{i}"), i).unwrap();
            ours.commit();
        }
        let empty = Automerge::new();
        let mut theirs = AutoCommit::new();
        let authority = allow(&[&ours]);
        let first = messages(&mut ours, &mut theirs);
        for m in &first {
            check_sync_message(m, &empty, &authority, Bounds::NONE).unwrap();
        }
        // The desktop takes no whole documents from a phone.
        assert!(first.iter().any(|m| matches!(
            check_sync_message(m, &empty, &authority, Bounds::PHONE),
            Err(IngestError::Document)
        )));
        ours.put(ROOT, "later", 1).unwrap();
        ours.commit();
        let delta = messages(&mut ours, &mut theirs);
        assert!(!delta.is_empty());
        for m in delta {
            check_sync_message(&m, &empty, &authority, Bounds::PHONE).unwrap();
        }
        // Not a sync message at all: left to the session's decode.
        check_sync_message(b"not a message", &empty, &authority, Bounds::PHONE).unwrap();
        // A well-formed message whose changes are garbage.
        let garbage = message(vec![
            0x85, 0x6f, 0x4a, 0x83, 1, 2, 3, 4, 1, 5, 9, 9, 9, 9, 9,
        ]);
        assert!(matches!(
            check_sync_message(&garbage, &empty, &authority, Bounds::PHONE),
            Err(IngestError::Malformed(_))
        ));
    }

    /// A bundle of every change of `doc`.
    /// A phone's bounds, with bundles taken (what a custom bound on a bundle would be).
    const BUNDLES_TAKEN: Bounds = Bounds {
        bundles: true,
        ..Bounds::PHONE
    };

    /// A 320-byte bundle chunk, found by the `ingest` fuzz target, whose run-length columns
    /// made Automerge's bundle parser allocate 2 GiB (`Change::try_from` takes bundles too).
    const RLE_BOMB: &[u8] = include_bytes!("ingest-rle-bomb.bin");

    #[test]
    fn a_bundle_from_a_phone_is_refused_before_automerge_parses_it() {
        assert!(is_bundle_chunk(RLE_BOMB));
        let empty = Automerge::new();
        let phone = Authority::default();
        let t = std::time::Instant::now();
        assert!(matches!(
            check_pushed(RLE_BOMB, &empty, &phone, Bounds::PHONE),
            Err(IngestError::Malformed(why)) if why.contains("not a change")
        ));
        assert!(matches!(
            check_sync_message(&message(RLE_BOMB.to_vec()), &empty, &phone, Bounds::PHONE),
            Err(IngestError::Bundle)
        ));
        // A well-formed bundle is refused the same way.
        let mut ours = AutoCommit::new();
        for i in 0..10 {
            ours.put(ROOT, format!("k{i}"), i).unwrap();
            ours.commit();
        }
        assert!(matches!(
            check_sync_message(
                &message(bundle(&mut ours)),
                &empty,
                &allow(&[&ours]),
                Bounds::PHONE
            ),
            Err(IngestError::Bundle)
        ));
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            t.elapsed()
        );
    }

    /// A change chunk found by the `ingest` fuzz target: its op names an object by an actor
    /// index past the change's own actor list. Automerge parses it, then panics decoding it
    /// (`change.rs`: `actors.get(..).unwrap()`), which the string-length check does.
    const BAD_ACTOR_INDEX: &[u8] = include_bytes!("ingest-foreign-actor-index.bin");

    #[test]
    fn a_change_that_panics_automerge_when_decoded_is_refused() {
        let empty = Automerge::new();
        let phone = Authority {
            actors: BTreeSet::from([ActorId::from([7u8; 16])]),
            all_but: None,
        };
        let refused = std::panic::catch_unwind(|| {
            check_pushed(BAD_ACTOR_INDEX, &empty, &phone, Bounds::PHONE)
        })
        .expect("the ingest check let Automerge's panic escape");
        assert!(
            matches!(&refused, Err(IngestError::Malformed(why)) if why.contains("decode")),
            "{refused:?}"
        );
    }

    fn bundle(doc: &mut AutoCommit) -> Vec<u8> {
        let hashes: Vec<_> = doc.get_changes(&[]).iter().map(|c| c.hash()).collect();
        doc.bundle(hashes).unwrap().bytes().to_vec()
    }

    #[test]
    fn a_bundle_gives_its_changes_under_the_same_checks() {
        let mut ours = AutoCommit::new();
        for i in 0..20 {
            ours.put(ROOT, format!("k{i}"), i).unwrap();
            ours.commit();
        }
        let chunk = bundle(&mut ours);
        assert!(is_bundle_chunk(&chunk));
        let empty = Automerge::new();
        let checked = check_sync_message(
            &message(chunk.clone()),
            &empty,
            &allow(&[&ours]),
            BUNDLES_TAKEN,
        )
        .unwrap();
        let want: Vec<_> = ours.get_changes(&[]).iter().map(|c| c.hash()).collect();
        assert_eq!(
            checked.changes.iter().map(|c| c.hash()).collect::<Vec<_>>(),
            want
        );
        assert_eq!(checked.ops, 20);
        // Another device's actor: refused, as change by change.
        assert!(matches!(
            check_sync_message(&message(chunk.clone()), &empty, &allow(&[]), BUNDLES_TAKEN),
            Err(IngestError::ForeignActor { .. })
        ));
        // A wrong checksum (which loading would drop silently) is refused.
        let mut bad = chunk;
        bad[5] ^= 0xff;
        assert!(matches!(
            check_sync_message(&message(bad), &empty, &allow(&[&ours]), BUNDLES_TAKEN),
            Err(IngestError::Malformed(_))
        ));
    }

    #[test]
    fn a_bundle_over_the_op_bounds_is_refused_from_its_metadata() {
        // One change of a hundred thousand ops fits in a few hundred bytes of bundle.
        let mut big = AutoCommit::new();
        let text = big.put_object(ROOT, "t", automerge::ObjType::Text).unwrap();
        big.splice_text(&text, 0, 0, &"a".repeat(100_000)).unwrap();
        big.commit();
        let chunk = bundle(&mut big);
        assert!(chunk.len() < 4096, "{} bytes", chunk.len());
        let empty = Automerge::new();
        assert!(matches!(
            check_sync_message(
                &message(chunk.clone()),
                &empty,
                &allow(&[&big]),
                BUNDLES_TAKEN
            ),
            Err(IngestError::BundleTooLarge {
                what: "in one change",
                ..
            })
        ));
        // Many small changes past one minute's budget of ops.
        let mut many = AutoCommit::new();
        let per = MAX_OPS_PER_CHANGE;
        for _ in 0..(MAX_BUNDLE_OPS as usize / per + 1) {
            let text = many
                .put_object(ROOT, "t", automerge::ObjType::Text)
                .unwrap();
            many.splice_text(&text, 0, 0, &"a".repeat(per - 1)).unwrap();
            many.commit();
        }
        let chunk = bundle(&mut many);
        assert!(matches!(
            check_sync_message(&message(chunk), &empty, &allow(&[&many]), BUNDLES_TAKEN),
            Err(IngestError::BundleTooLarge { what: "in all", .. })
        ));
    }

    #[test]
    fn a_change_with_a_wrong_checksum_is_refused() {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "long", "x".repeat(4096)).unwrap();
        doc.commit();
        let authority = allow(&[&doc]);
        let mut change = doc.get_last_local_change().unwrap().clone();
        let plain = change.raw_bytes().to_vec();
        let compressed = change.bytes().to_vec();
        assert_eq!(compressed[8], 2, "a compressed change chunk");
        let empty = Automerge::new();
        for chunk in [plain, compressed] {
            check_sync_message(&message(chunk.clone()), &empty, &authority, Bounds::PHONE).unwrap();
            check_pushed(&chunk, &empty, &authority, Bounds::PHONE).unwrap();
            let mut bad = chunk;
            bad[5] ^= 0xff;
            assert!(matches!(
                check_sync_message(&message(bad.clone()), &empty, &authority, Bounds::PHONE),
                Err(IngestError::Malformed(_))
            ));
            assert!(matches!(
                check_pushed(&bad, &empty, &authority, Bounds::PHONE),
                Err(IngestError::Malformed(_))
            ));
        }
    }

    #[test]
    fn changes_of_an_actor_the_sender_may_not_write_with_are_refused_even_in_a_document() {
        let mut forger = AutoCommit::new();
        forger.put(ROOT, "status", "done").unwrap();
        forger.commit();
        let honest = AutoCommit::new();
        let authority = allow(&[&honest]);
        let empty = Automerge::new();
        let change = forger.get_last_local_change().unwrap().raw_bytes().to_vec();
        assert!(matches!(
            check_pushed(&change, &empty, &authority, Bounds::NONE),
            Err(IngestError::ForeignActor { .. })
        ));
        // The first sync of a document sends it whole: its changes are checked too.
        let mut theirs = AutoCommit::new();
        let refused = messages(&mut forger, &mut theirs)
            .iter()
            .any(|m| check_sync_message(m, &empty, &authority, Bounds::NONE).is_err());
        assert!(refused);
    }

    #[test]
    fn a_session_that_refuses_documents_is_sent_changes_instead() {
        let mut ours = AutoCommit::new();
        for i in 0..50 {
            ours.put(ROOT, format!("k{i}"), i).unwrap();
            ours.commit();
        }
        // `theirs` stands for the desktop: its messages carry no v2 flags.
        let mut theirs = AutoCommit::new();
        let (mut a, mut b) = (sync::State::new(), sync::State::new());
        let empty = Automerge::new();
        let authority = allow(&[&ours]);
        for _ in 0..10 {
            if let Some(m) = ours.sync().generate_sync_message(&mut a) {
                let bytes = m.clone().encode();
                check_sync_message(&bytes, &empty, &authority, Bounds::PHONE).unwrap();
                theirs.sync().receive_sync_message(&mut b, m).unwrap();
            }
            if let Some(mut m) = theirs.sync().generate_sync_message(&mut b) {
                m.flags = None;
                ours.sync().receive_sync_message(&mut a, m).unwrap();
            }
        }
        assert_eq!(ours.get_heads(), theirs.get_heads());
    }

    #[test]
    fn changes_the_receiver_already_holds_pass_whoever_wrote_them() {
        let mut desktop = AutoCommit::new();
        desktop.put(ROOT, "fact", 1).unwrap();
        desktop.commit();
        let change = desktop
            .get_last_local_change()
            .unwrap()
            .raw_bytes()
            .to_vec();
        let phone = AutoCommit::new();
        let checked = check_pushed(
            &change,
            desktop.document(),
            &allow(&[&phone]),
            Bounds::PHONE,
        )
        .unwrap();
        assert!(checked.changes.is_empty());
        assert_eq!(checked.ops, 0);
    }

    #[test]
    fn a_change_over_the_op_or_string_bounds_is_refused() {
        let mut doc = AutoCommit::new();
        let list = doc.put_object(ROOT, "l", automerge::ObjType::List).unwrap();
        for i in 0..MAX_OPS_PER_CHANGE {
            doc.insert(&list, i, 1).unwrap();
        }
        doc.commit();
        let authority = allow(&[&doc]);
        let empty = Automerge::new();
        let big = doc.get_last_local_change().unwrap().raw_bytes().to_vec();
        assert!(matches!(
            check_pushed(&big, &empty, &authority, Bounds::PHONE),
            Err(IngestError::TooManyOps { .. })
        ));
        check_pushed(&big, &empty, &authority, Bounds::NONE).unwrap();

        let mut doc = AutoCommit::new();
        doc.put(ROOT, "s", "x".repeat(MAX_PHONE_STRING_BYTES + 1))
            .unwrap();
        doc.commit();
        let long = doc.get_last_local_change().unwrap().raw_bytes().to_vec();
        assert!(matches!(
            check_pushed(&long, &empty, &allow(&[&doc]), Bounds::PHONE),
            Err(IngestError::TooLong { .. })
        ));
    }

    #[test]
    fn the_op_budget_refuses_past_a_minute_and_refills_over_time() {
        let mut budget = OpBudget::new(600, 0);
        budget.take(500, 0).unwrap();
        let Err(IngestError::OverBudget {
            retry_after_secs, ..
        }) = budget.take(200, 0)
        else {
            panic!("over budget");
        };
        // 100 ops missing at 10 ops per second.
        assert_eq!(retry_after_secs, 10);
        budget.take(200, 10_000).unwrap();
        assert!(!budget.has_some(10_000));
        assert!(budget.has_some(10_100));
        // Never more than a minute's worth.
        budget.take(600, 1_000_000).unwrap();
        assert!(budget.take(1, 1_000_000).is_err());
    }
}
