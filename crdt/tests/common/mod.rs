//! Shared helpers for the crdt tests.
#![allow(dead_code)]

use errand_core::{Device, DeviceId, DeviceKind, ThreadId};
use errand_crdt::{ActorId, ThreadDoc, ThreadGenesis, ThreadSync};

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
