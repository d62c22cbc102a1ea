//! A sans-IO Automerge sync session: one per peer and document.
//!
//! Feed it what the peer sent with [`SyncSession::receive`]; ask it what to send with
//! [`SyncSession::next_message`]. It never touches a socket or a clock. Its state can be
//! persisted with [`SyncSession::encode_state`] so a reconnect sends only what is missing.

use std::panic::AssertUnwindSafe;

use automerge::{
    AutoCommit, Change, ChangeHash,
    sync::{self, SyncDoc},
};

use crate::{DocId, Part};

/// A sync message with at least this many changes carries them as one Automerge bundle.
/// Change by change, each change repeats its actor and its dependencies' 32-byte hashes,
/// which do not compress: 10,000 one-task changes were 3.6 MB, 929 KB deflated (the wire now
/// links them before compressing: `errand_p2p::sync::linked`, 316 KB). As a bundle
/// (encoded like a document, dependencies as indices) they were 374 KB, built in about
/// 0.1 s. Unlike a document, a bundle's ops per change can be counted from its change
/// metadata before any change is built (`crate::ingest`), so the owner can still bound what
/// a phone sends. Smaller messages stay change by change (the push path sends single
/// changes anyway).
pub const BUNDLE_MIN_CHANGES: usize = 8;

/// Rounds in which the peer asked for a change that is not one of our heads (so its Bloom
/// filter had hidden a change it lacked) before the session stops trusting its filters. A
/// filter misses about one change in a hundred by chance, which costs one such round; a
/// paired device that mines its changes' hashes against another peer's filter (about 500
/// tries a change, hoytech/automerge-poison) can make every change of a chain cost one.
const DISTRUST_AFTER_GAPS: u32 = 2;

/// Missing changes built for a session's first part ([`SyncSession::next_part`]): a task is a
/// few hundred bytes, so 64 of them are about one 24 KiB part.
const FIRST_PART_CHANGES: usize = 64;

/// The changes of `chunks` as one bundle chunk, if there are enough of them and each is a
/// change this document holds.
fn bundle_of(am: &mut automerge::AutoCommit, chunks: &sync::ChunkList) -> Option<Vec<u8>> {
    if chunks.len() < BUNDLE_MIN_CHANGES {
        return None;
    }
    let hashes = chunks
        .iter()
        .map(|c| automerge::Change::try_from(c).ok().map(|c| c.hash()))
        .collect::<Option<Vec<_>>>()?;
    std::panic::catch_unwind(AssertUnwindSafe(|| am.bundle(hashes)))
        .ok()?
        .ok()
        .map(|b| b.bytes().to_vec())
}

/// The first changes of `chunks` whose bytes add up to at most `max` (at least one), with
/// their hashes; `None` when all of them fit (or one does not parse: then the message goes
/// out whole, as before). Automerge lists the missing changes in the order it applied them,
/// which is causal: a prefix never holds a change without the dependencies it lacks there.
fn part_of(chunks: &sync::ChunkList, max: usize) -> Option<(sync::ChunkList, Vec<ChangeHash>)> {
    let total: usize = chunks.iter().map(<[u8]>::len).sum();
    if total <= max {
        return None;
    }
    let mut used = 0;
    let mut kept = Vec::new();
    let mut hashes = Vec::new();
    for chunk in chunks.iter() {
        if !kept.is_empty() && used + chunk.len() > max {
            break;
        }
        let change = automerge::Change::try_from(chunk).ok()?;
        used += chunk.len();
        hashes.push(change.hash());
        kept.push(chunk.to_vec());
    }
    Some((kept.into(), hashes))
}

/// Why a received message was refused. After any of these the session should be reset
/// (and, after [`SyncError::Panicked`], the document reloaded from the store).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The bytes are not an Automerge sync message.
    #[error("not a sync message: {0}")]
    Decode(#[from] automerge::sync::ReadMessageError),
    /// Automerge refused the changes.
    #[error("the peer's changes were refused: {0}")]
    Apply(#[from] automerge::AutomergeError),
    /// Automerge panicked while applying. The in-memory document may be half-applied.
    #[error("automerge panicked while applying the peer's message; the document must be reloaded")]
    Panicked,
    /// The message's changes do not parse.
    #[error(transparent)]
    Malformed(#[from] crate::IngestError),
    /// The message names a document that is not part of this thread.
    #[error("the message names a document that is not part of this thread")]
    UnknownDocument,
    /// A persisted state did not decode.
    #[error("stored sync state is corrupt: {0}")]
    State(#[from] automerge::sync::DecodeStateError),
}

/// What one received message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Our heads before applying.
    pub heads_before: Vec<ChangeHash>,
    /// True if the message carried changes that moved our heads.
    pub changed: bool,
}

/// Sync state for one peer and one document.
pub struct SyncSession {
    doc_id: DocId,
    state: sync::State,
    /// We pushed changes and the peer has not acknowledged them yet: `their_heads` is what
    /// we expect, not what the peer said.
    unconfirmed: bool,
    /// False: our messages do not advertise Automerge's v2 messages, so the peer sends
    /// changes, never a whole document (see [`Self::refuse_documents`]).
    documents: bool,
    /// False: our changes go one by one, never as a bundle (see [`Self::send_no_bundles`]).
    bundles: bool,
    /// How many missing changes [`Self::next_part`] builds for one part: grown while parts
    /// come out small, cut to what fit when one comes out too big.
    part_changes: usize,
    /// Rounds since the last in-sync point in which the peer asked for one of our changes
    /// that is not a head: its filter hid a change from us ([`DISTRUST_AFTER_GAPS`]).
    gaps: u32,
}

impl std::fmt::Debug for SyncSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncSession")
            .field("doc_id", &self.doc_id)
            .field(
                "their_heads",
                &self.state.their_heads.as_ref().map(Vec::len),
            )
            .finish_non_exhaustive()
    }
}

impl SyncSession {
    /// A fresh session (the first message carries our heads and a bloom filter).
    pub fn new(doc_id: DocId) -> Self {
        Self {
            doc_id,
            state: sync::State::new(),
            unconfirmed: false,
            documents: true,
            bundles: true,
            part_changes: FIRST_PART_CHANGES,
            gaps: 0,
        }
    }

    /// Restores a session from [`Self::encode_state`]; only the shared heads survive, which is
    /// what lets a reconnect skip what both sides already had.
    pub fn restore(doc_id: DocId, bytes: &[u8]) -> Result<Self, SyncError> {
        Ok(Self {
            doc_id,
            state: sync::State::decode(bytes)?,
            unconfirmed: false,
            documents: true,
            bundles: true,
            part_changes: FIRST_PART_CHANGES,
            gaps: 0,
        })
    }

    /// The document this session syncs.
    pub fn doc_id(&self) -> &DocId {
        &self.doc_id
    }

    /// The state to persist, in the same transaction as the changes it describes.
    pub fn encode_state(&self) -> Vec<u8> {
        self.state.encode()
    }

    /// The next message to send, if there is anything to say.
    pub fn next_message(&mut self, doc: &mut Part) -> Option<Vec<u8>> {
        self.next_part(doc, None)
    }

    /// The next message to send, if there is anything to say.
    ///
    /// With `max_change_bytes`, the message carries only the longest prefix of the missing
    /// changes, in causal order, whose change bytes fit (at least one change, however big):
    /// the rest follows once the peer has answered, one part per round trip. Automerge
    /// otherwise puts everything the peer lacks in one message, and a message bigger than a
    /// relay circuit's byte limit never gets through (DESIGN.md section 4). Each part is
    /// stored by the peer with its sync state, so a cut circuit loses at most the part in
    /// flight.
    pub fn next_part(
        &mut self,
        doc: &mut Part,
        max_change_bytes: Option<usize>,
    ) -> Option<Vec<u8>> {
        let am = doc.automerge();
        self.judge_filters(am);
        let Some(max) = max_change_bytes else {
            let msg = am.sync().generate_sync_message(&mut self.state);
            return self.finish(am, msg);
        };
        // Automerge builds every change it sends from its op set, which costs about as much
        // as applying it: building the whole backlog for each part would make a catch-up
        // quadratic. Changes past the first `part_changes` missing ones are therefore marked
        // sent while the message is built, and unmarked after.
        let before = self.state.sent_hashes.clone();
        let held = self.hold_back(am);
        let msg = am.sync().generate_sync_message(&mut self.state);
        let Some(mut m) = msg else {
            self.state.sent_hashes = before;
            return None;
        };
        let built = m.changes.len();
        let bytes: usize = m.changes.iter().map(<[u8]>::len).sum();
        if let Some((kept, hashes)) = part_of(&m.changes, max) {
            // Only the part goes out: the rest must stay sendable, or the next round would
            // leave it out.
            self.part_changes = hashes.len().max(1);
            m.changes = kept;
            self.state.sent_hashes = before;
            self.state.sent_hashes.extend(hashes);
        } else {
            for h in &held {
                self.state.sent_hashes.remove(h);
            }
            if !held.is_empty() && built > 0 && bytes < max / 2 {
                // Small changes: more of them fit next time.
                self.part_changes = self.part_changes.saturating_mul(2);
            }
        }
        self.finish(am, Some(m))
    }

    /// Decides what the peer lacks without its Bloom filters when they cannot be trusted.
    ///
    /// Automerge sends the changes past the peer's last sync that its filters do not hold. A
    /// false positive hides a change, and the peer then asks for it by hash, one round trip
    /// per change of a chain: a paired device that mines its changes' hashes against an
    /// honest phone's filter turns a three-message catch-up into dozens (issue 18).
    ///
    /// - When we hold every head the peer announced, its document is exactly their
    ///   ancestors, so what it lacks is everything past them: the filters say nothing more,
    ///   and they are set aside. This is the usual case of a catch-up, also after the peer
    ///   lost its sync state (its heads are still ours), and it costs no extra message.
    /// - Otherwise (the peer holds changes we have not seen yet), after
    ///   [`DISTRUST_AFTER_GAPS`] rounds in which the peer asked for a change hidden by its
    ///   filters, the session sends everything past the heads both sides are known to share
    ///   (those stored for the peer, or confirmed since).
    fn judge_filters(&mut self, am: &mut automerge::AutoCommit) {
        let Some(theirs) = self.state.their_heads.as_ref() else {
            return;
        };
        if self.state.their_have.is_none() {
            return;
        }
        let doc = am.document();
        // (Never past no heads at all: that would send the document's genesis change, which
        // every peer builds for itself and the owner refuses from anyone else.)
        let last_sync = if !theirs.is_empty()
            && theirs
                .iter()
                .all(|h| doc.get_change_meta_by_hash(h).is_some())
        {
            theirs.clone()
        } else if self.gaps >= DISTRUST_AFTER_GAPS && !self.state.shared_heads.is_empty() {
            self.state.shared_heads.clone()
        } else {
            return;
        };
        self.state.their_have = Some(vec![sync::Have {
            last_sync,
            bloom: Default::default(),
        }]);
    }

    /// Marks as sent, for the time one message is built, the missing changes past the first
    /// [`Self::part_changes`], in the order Automerge applied them (causal), as Automerge
    /// picks them: after the peer's last sync, outside its Bloom filters. Returns them.
    fn hold_back(&mut self, am: &mut automerge::AutoCommit) -> Vec<ChangeHash> {
        let Some(have) = self.state.their_have.as_ref() else {
            return Vec::new();
        };
        let mut last_sync: Vec<ChangeHash> = have
            .iter()
            .flat_map(|h| h.last_sync.iter().copied())
            .collect();
        last_sync.sort();
        last_sync.dedup();
        let doc = am.document();
        if !last_sync
            .iter()
            .all(|h| doc.get_change_meta_by_hash(h).is_some())
        {
            // Automerge answers this with a reset message, which carries no changes.
            return Vec::new();
        }
        let held: Vec<ChangeHash> = doc
            .get_changes_meta(&last_sync)
            .into_iter()
            .map(|c| c.hash)
            // Those Automerge would send: not sent yet, and not in the peer's filters. (A
            // part of changes the peer already holds would say nothing, and the session
            // would wait for an answer that never comes.)
            .filter(|h| {
                !self.state.sent_hashes.contains(h)
                    && have.iter().all(|have| !have.bloom.contains_hash(h))
            })
            .skip(self.part_changes)
            .collect();
        self.state.sent_hashes.extend(held.iter().copied());
        held
    }

    /// Strips the flags and bundles the changes, as this session sends them.
    fn finish(
        &self,
        am: &mut automerge::AutoCommit,
        msg: Option<sync::Message>,
    ) -> Option<Vec<u8>> {
        let (documents, bundles) = (self.documents, self.bundles);
        msg.map(|mut m| {
            if !documents {
                m.flags = None;
            }
            if bundles && let Some(bundle) = bundle_of(am, &m.changes) {
                m.changes = vec![bundle].into();
            }
            m.encode()
        })
    }

    /// Stops advertising Automerge's v2 messages (its message flags), so that the peer
    /// sends changes one by one and never a whole document. A document chunk cannot be
    /// bounded before it is loaded (a 1 KiB document held a million ops, which took 94 MB
    /// and seconds to load); changes can, one by one. The owner desktop asks this of phones.
    pub fn refuse_documents(&mut self) {
        self.documents = false;
    }

    /// Sends changes one by one, never as a bundle: what a phone does for its desktop, which
    /// takes no bundle from a phone (`ingest::Bounds::bundles`).
    pub fn send_no_bundles(&mut self) {
        self.bundles = false;
    }

    /// Applies a message from the peer, unchecked (tests and tools; the engine checks what a
    /// peer sent first and calls [`Self::receive_checked`]). Panics inside Automerge are
    /// caught and reported.
    pub fn receive(&mut self, doc: &mut Part, bytes: &[u8]) -> Result<Received, SyncError> {
        let msg = sync::Message::decode(bytes)?;
        let changes = crate::ingest::message_changes(&msg)?;
        self.receive_checked(doc, msg, changes)
    }

    /// Applies a decoded message from the peer whose changes the caller parsed (and checked):
    /// `changes` are applied in place of the message's own chunks, which Automerge would
    /// otherwise parse a second time. The sync state ends as Automerge's own
    /// `receive_sync_message` leaves it. Panics inside Automerge are caught and reported.
    pub fn receive_checked(
        &mut self,
        doc: &mut Part,
        msg: sync::Message,
        changes: Vec<Change>,
    ) -> Result<Received, SyncError> {
        let their_last_sync: Vec<Vec<ChangeHash>> =
            msg.have.iter().map(|h| h.last_sync.clone()).collect();
        let am = doc.automerge();
        let heads_before = am.get_heads();
        // A change the peer needs that is one of ours but not a head: it got changes that
        // depend on it, so its filter hid it from us.
        let gap = msg.need.iter().any(|h| {
            !heads_before.contains(h) && am.document().get_change_meta_by_hash(h).is_some()
        });
        if gap {
            self.gaps = self.gaps.saturating_add(1);
        }
        let state = &mut self.state;
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| apply_message(am, state, msg, changes)));
        self.unconfirmed = false;
        match result {
            Ok(Ok(())) => {
                let heads = am.get_heads();
                if self
                    .state
                    .their_heads
                    .as_ref()
                    .is_some_and(|t| same(t, &heads))
                {
                    self.gaps = 0;
                }
                // A peer that does not yet know it shares our heads waits for us to say so.
                // Without this, a session that started assumed in sync (a hello digest, or a
                // segment the peer never listed) stays silent: Automerge counts it as having
                // responded, and the peer, which started afresh, never reaches in-sync.
                if !their_last_sync.iter().any(|l| same(l, &heads)) {
                    self.state.have_responded = false;
                }
                let changed = heads != heads_before;
                Ok(Received {
                    heads_before,
                    changed,
                })
            }
            Ok(Err(e)) => Err(SyncError::Apply(e)),
            Err(_) => Err(SyncError::Panicked),
        }
    }

    /// True when the peer's last known heads equal ours: nothing left to exchange.
    pub fn in_sync(&self, doc: &mut Part) -> bool {
        self.in_sync_at(&doc.heads())
    }

    /// True when the peer's last known heads equal `ours` (and it has confirmed them).
    pub fn in_sync_at(&self, ours: &[ChangeHash]) -> bool {
        !self.unconfirmed
            && self
                .state
                .their_heads
                .as_ref()
                .is_some_and(|theirs| same(theirs, ours))
    }

    /// True when there is nothing to say at `ours`: the peer has exactly these heads and we
    /// have told it so. The session can skip generating a message (which walks the history).
    /// (A push not yet acknowledged counts: what was pushed need not be said again.)
    pub fn settled_at(&self, ours: &[ChangeHash]) -> bool {
        self.state
            .their_heads
            .as_ref()
            .is_some_and(|theirs| same(theirs, ours))
            && same(&self.state.last_sent_heads, ours)
            && self.state.have_responded
    }

    /// Takes the peer to be at `heads`, which are ours too (their digest matched ours in the
    /// hello): the session starts in sync without a round trip.
    pub fn assume_in_sync(&mut self, heads: &[ChangeHash]) {
        let heads = sorted(heads);
        self.state.shared_heads.clone_from(&heads);
        self.at_heads(heads);
        self.state.have_responded = true;
    }

    /// We sent the peer changes that take it from our previous heads (which it had) to
    /// `heads` (the push path). Its state is moved there as if a sync round had confirmed it,
    /// except `shared_heads` (the persisted part), which moves only on evidence from the peer.
    /// The pushed hashes are deliberately not recorded as sent: if the peer cannot apply them
    /// it asks for them through the sync protocol, and they must not be filtered out then.
    pub fn pushed(&mut self, heads: &[ChangeHash]) {
        self.at_heads(sorted(heads));
        self.state.have_responded = true;
        self.unconfirmed = true;
    }

    /// The peer acknowledged a push: it durably holds `heads`. Acts only on the latest push
    /// (an older acknowledgement is superseded by the one that follows it).
    ///
    /// The acknowledgement states the peer's heads, so they become `their_heads` (a sync
    /// message from the peer in between may have left an older value there).
    pub fn acked(&mut self, heads: &[ChangeHash]) {
        let heads = sorted(heads);
        if same(&self.state.last_sent_heads, &heads) {
            self.state.shared_heads.clone_from(&heads);
            self.at_heads(heads);
            self.unconfirmed = false;
        } else if !self.unconfirmed {
            // Not an acknowledgement of an older push still being overtaken by newer ones
            // (those are superseded by the acknowledgement that follows).
            self.state.their_heads = Some(heads);
        }
    }

    /// We applied changes the peer pushed, which took it to `theirs`; `ours` are our heads
    /// now. When they are equal both sides are in sync at them, durably on our side.
    pub fn applied_push(&mut self, theirs: &[ChangeHash], ours: &[ChangeHash]) {
        self.unconfirmed = false;
        let theirs = sorted(theirs);
        if same(&theirs, ours) {
            self.state.shared_heads.clone_from(&theirs);
            self.at_heads(theirs);
            self.state.have_responded = true;
        } else {
            // We hold changes the peer lacks: the next message sends them.
            self.state.their_heads = Some(theirs.clone());
            self.state.their_have = Some(vec![sync::Have {
                last_sync: theirs,
                bloom: Default::default(),
            }]);
            self.state.their_need = Some(Vec::new());
            self.state.in_flight = false;
        }
    }

    /// The peer pushed changes we cannot apply (their dependencies are missing here): fall
    /// back to the sync protocol, which asks for what is missing.
    pub fn push_refused(&mut self, theirs: &[ChangeHash]) {
        self.state.their_heads = Some(sorted(theirs));
        self.state.in_flight = false;
    }

    fn at_heads(&mut self, heads: Vec<ChangeHash>) {
        self.state.last_sent_heads.clone_from(&heads);
        self.state.their_have = Some(vec![sync::Have {
            last_sync: heads.clone(),
            bloom: Default::default(),
        }]);
        self.state.their_heads = Some(heads);
        self.state.their_need = Some(Vec::new());
        self.state.in_flight = false;
    }

    /// The heads the peer last told us about.
    pub fn their_heads(&self) -> Option<&[ChangeHash]> {
        self.state.their_heads.as_deref()
    }

    /// Forgets everything about the peer, as after a bad message.
    pub fn reset(&mut self) {
        self.state = sync::State::new();
        self.gaps = 0;
    }
}

fn sorted(heads: &[ChangeHash]) -> Vec<ChangeHash> {
    let mut v = heads.to_vec();
    v.sort();
    v
}

fn same(a: &[ChangeHash], b: &[ChangeHash]) -> bool {
    a.len() == b.len() && sorted(a) == sorted(b)
}

/// What Automerge's `receive_sync_message` does with `msg`, with `changes` (the message's own,
/// parsed by the caller) applied in place of its chunks, so they are not parsed again.
fn apply_message(
    am: &mut AutoCommit,
    state: &mut sync::State,
    mut msg: sync::Message,
    changes: Vec<Change>,
) -> Result<(), automerge::AutomergeError> {
    let carried = !msg.changes.is_empty();
    msg.changes = Vec::<Vec<u8>>::new().into();
    if carried && !state.read_only {
        let before = am.get_heads();
        am.apply_changes(changes)?;
        state.shared_heads = advance_heads(&before, &am.get_heads(), &state.shared_heads);
    }
    // Given no changes, Automerge takes a message at our heads as having seen what we last
    // sent; given the message as the peer sent it, it does not.
    let last_sent = state.last_sent_heads.clone();
    am.sync().receive_sync_message(state, msg)?;
    if carried {
        state.last_sent_heads = last_sent;
    }
    Ok(())
}

/// Our shared heads with the peer after applying its changes took our heads from `before` to
/// `after`: the new heads, and the old shared heads still among ours (as Automerge 0.12's
/// sync protocol computes it).
fn advance_heads(
    before: &[ChangeHash],
    after: &[ChangeHash],
    shared: &[ChangeHash],
) -> Vec<ChangeHash> {
    let mut out: Vec<ChangeHash> = after
        .iter()
        .filter(|h| !before.contains(h))
        .chain(shared.iter().filter(|h| after.contains(h)))
        .copied()
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use automerge::{ROOT, transaction::Transactable as _};

    use super::*;

    fn doc(actor: u8) -> AutoCommit {
        let mut d = AutoCommit::new().with_actor(automerge::ActorId::from(&[actor; 16][..]));
        d.put(ROOT, "seed", 0).unwrap();
        d
    }

    fn write(d: &mut AutoCommit, key: &str, n: usize) {
        for i in 0..n {
            d.put(ROOT, format!("{key}{i}"), i as i64).unwrap();
            d.commit();
        }
    }

    /// `apply_message` leaves the document and the sync state exactly as Automerge's own
    /// `receive_sync_message` does, message by message, through a whole exchange: changes
    /// both ways, a replayed message whose changes the receiver already holds, catch-ups cut
    /// in half under heads that name all of them, and a whole document (Automerge sends one
    /// to a peer that lacks most of it).
    #[test]
    fn applying_parsed_changes_leaves_the_state_automerge_would() {
        let mut a = doc(1);
        // A shared history, so that what each lacks goes as changes, not a whole document.
        write(&mut a, "s", 60);
        let mut b = a.fork().with_actor(automerge::ActorId::from(&[2; 16][..]));
        write(&mut a, "a", 12);
        write(&mut b, "b", 7);
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        let mut compared = 0;
        let mut with_changes = 0;
        let mut documents = 0;
        let mut cuts = 0;
        let mut step = |from: &mut AutoCommit,
                        from_state: &mut sync::State,
                        to: &mut AutoCommit,
                        to_state: &mut sync::State,
                        replay: bool,
                        cut: bool|
         -> bool {
            let Some(mut msg) = from.sync().generate_sync_message(from_state) else {
                return false;
            };
            let parts: Vec<Vec<u8>> = msg
                .changes
                .iter()
                .flat_map(|c| crate::ingest::split_chunks(c).unwrap())
                .map(<[u8]>::to_vec)
                .collect();
            if cut && parts.len() >= 2 && !parts.iter().any(|p| crate::is_document_chunk(p)) {
                // Only the first half of the changes, under heads that name them all (as a
                // catch-up sent in parts is).
                let half = parts.len() / 2;
                msg.changes = vec![parts[..half].concat()].into();
                // The sender sends the rest later (as `part_of`'s caller does).
                for p in &parts[half..] {
                    let change = crate::ingest::parse_change(p).unwrap();
                    from_state.sent_hashes.remove(&change.hash());
                }
                cuts += 1;
            }
            let bytes = msg.encode();
            for _ in 0..if replay { 2 } else { 1 } {
                let msg = sync::Message::decode(&bytes).unwrap();
                if !msg.changes.is_empty() {
                    with_changes += 1;
                }
                if msg.changes.iter().any(crate::is_document_chunk) {
                    documents += 1;
                }
                let (mut theirs, mut their_state) = (to.fork(), to_state.clone());
                theirs
                    .sync()
                    .receive_sync_message(&mut their_state, msg.clone())
                    .unwrap();
                let changes = crate::ingest::message_changes(&msg).unwrap();
                apply_message(to, to_state, msg, changes).unwrap();
                assert_eq!(to.get_heads(), theirs.get_heads());
                assert_eq!(*to_state, their_state);
                compared += 1;
            }
            true
        };
        for round in 0..64 {
            let x = step(&mut a, &mut sa, &mut b, &mut sb, round == 3, round < 3);
            let y = step(&mut b, &mut sb, &mut a, &mut sa, round == 2, false);
            if !x && !y {
                break;
            }
        }
        assert_eq!(a.get_heads(), b.get_heads());
        // A newcomer with a history of its own, most of A's missing: Automerge sends it the
        // whole document.
        let mut c = doc(3);
        let (mut sa2, mut sc) = (sync::State::new(), sync::State::new());
        for _ in 0..64 {
            let x = step(&mut a, &mut sa2, &mut c, &mut sc, false, false);
            let y = step(&mut c, &mut sc, &mut a, &mut sa2, false, false);
            if !x && !y {
                break;
            }
        }
        assert_eq!(c.get_heads(), a.get_heads());
        assert!(
            compared >= 6 && with_changes >= 3 && documents >= 1 && cuts >= 1,
            "{compared} compared, {with_changes} with changes, {documents} documents, {cuts} cut"
        );
    }
}
