//! Shared helpers for the crdt tests.
#![allow(dead_code)]

use errand_core::{Device, DeviceId, DeviceKind, ThreadId};
use errand_crdt::{
    ActorId, DocId, SyncError, SyncSession, ThreadDoc, ThreadGenesis, sync::Received,
};

/// A syntactically valid Ed25519 PeerId built from a seed byte.
pub fn device(seed: u8) -> DeviceId {
    let mut b = vec![0x00, 0x24, 0x08, 0x01, 0x12, 0x20];
    b.extend(std::iter::repeat_n(seed, 32));
    DeviceId::from_bytes(&b).unwrap()
}

pub fn actor(seed: u8) -> ActorId {
    ActorId::from(&[seed; 16][..])
}

#[derive(Debug)]
pub struct World {
    pub genesis: ThreadGenesis,
    pub ids: Vec<DeviceId>,
    pub actors: Vec<ActorId>,
}

/// A desktop (index 0) and `phones` phones, all sharing one genesis.
pub fn world(phones: usize) -> World {
    let ids: Vec<_> = (0..=phones as u8).map(|i| device(i + 1)).collect();
    let actors: Vec<_> = (0..=phones as u8).map(|i| actor(i + 1)).collect();
    let genesis = ThreadGenesis {
        thread_id: ThreadId::new_at(1_700_000_000_000),
        owner: ids[0].clone(),
        owner_actor: actors[0].to_hex_string(),
    };
    World {
        genesis,
        ids,
        actors,
    }
}

impl World {
    pub fn replica(&self, i: usize) -> ThreadDoc {
        ThreadDoc::create(&self.genesis, self.actors[i].clone())
    }

    /// The desktop replica with every device recorded.
    pub fn desktop(&self) -> ThreadDoc {
        let mut d = self.replica(0);
        for (i, id) in self.ids.iter().enumerate() {
            d.add_device(&Device {
                id: id.clone(),
                name: format!("device {i}"),
                kind: if i == 0 {
                    DeviceKind::Desktop
                } else {
                    DeviceKind::Phone
                },
                actors: vec![self.actors[i].to_hex_string()],
                executors: if i == 0 { vec!["shell".into()] } else { vec![] },
                added_at: 1,
                revoked_at: None,
            })
            .unwrap();
        }
        d
    }
}

/// Runs the sync loop between two replicas until neither has anything to say.
pub fn sync_pair(a: &mut ThreadDoc, sa: &mut ThreadSync, b: &mut ThreadDoc, sb: &mut ThreadSync) {
    for _ in 0..256 {
        let mut quiet = true;
        if let Some((id, m)) = sa.next_message(a) {
            sb.receive(b, &id, &m).unwrap();
            quiet = false;
        }
        if let Some((id, m)) = sb.next_message(b) {
            sa.receive(a, &id, &m).unwrap();
            quiet = false;
        }
        if quiet {
            return;
        }
    }
    panic!("sync did not quiesce in 256 rounds");
}

/// Sync sessions with one peer over every document of a thread (the meta document and its
/// segments), sans-IO. A document the peer names that this replica does not hold yet is
/// created from its deterministic genesis, so a segment that one side rolled over into
/// reaches the other with no extra step. Every segment must be held in memory (the engine does its own
/// loading). A test helper over the crate's public API; production sync is the engine's.
#[derive(Debug, Default)]
pub struct ThreadSync {
    sessions: std::collections::BTreeMap<DocId, SyncSession>,
}

impl ThreadSync {
    /// Fresh sessions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sessions restored from [`Self::encode_states`].
    pub fn restore(states: &std::collections::BTreeMap<DocId, Vec<u8>>) -> Result<Self, SyncError> {
        let mut out = Self::new();
        for (id, bytes) in states {
            out.sessions
                .insert(id.clone(), SyncSession::restore(id.clone(), bytes)?);
        }
        Ok(out)
    }

    /// The states to persist, per document.
    pub fn encode_states(&self) -> std::collections::BTreeMap<DocId, Vec<u8>> {
        self.sessions
            .iter()
            .map(|(id, s)| (id.clone(), s.encode_state()))
            .collect()
    }

    /// The next message for the first document (in part order) that has something to say.
    pub fn next_message(&mut self, doc: &mut ThreadDoc) -> Option<(DocId, Vec<u8>)> {
        for n in doc.loaded() {
            let part = doc.part_mut(n)?;
            let id = part.id().clone();
            let session = self
                .sessions
                .entry(id.clone())
                .or_insert_with(|| SyncSession::new(id.clone()));
            if let Some(m) = session.next_message(part) {
                return Some((id, m));
            }
        }
        None
    }

    /// True when the peer is in sync on every document held in memory.
    pub fn in_sync(&self, doc: &mut ThreadDoc) -> bool {
        doc.loaded().into_iter().all(|n| {
            doc.part_mut(n).is_some_and(|part| {
                self.sessions
                    .get(part.id())
                    .is_some_and(|s| s.in_sync(part))
            })
        })
    }

    /// Applies a message for document `id`, creating the segment if it is new here.
    pub fn receive(
        &mut self,
        doc: &mut ThreadDoc,
        id: &DocId,
        bytes: &[u8],
    ) -> Result<Received, SyncError> {
        let n = doc.part_of(id).ok_or(SyncError::UnknownDocument)?;
        if n > doc.newest_segment() + errand_crdt::SEGMENT_AHEAD {
            return Err(SyncError::UnknownDocument);
        }
        doc.attach_segment(n, std::iter::empty())?;
        let part = doc.part_mut(n).ok_or(SyncError::UnknownDocument)?;
        let session = self
            .sessions
            .entry(id.clone())
            .or_insert_with(|| SyncSession::new(id.clone()));
        let r = session.receive(part, bytes)?;
        Ok(r)
    }
}
