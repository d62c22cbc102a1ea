//! Finding the thread's other devices: on the LAN by mDNS (switched on in
//! [`super::behaviour`]), and elsewhere at the relays' rendezvous points under a namespace that
//! only the paired devices can compute ([`namespace`]; the relay client registers and
//! discovers under it).

use sha2::Digest;

/// The rendezvous namespace of a thread's devices, derived from their shared discovery
/// secret: it hides who pairs with whom from other relay users (it does not authenticate;
/// the gate and PeerIds do).
pub fn namespace(discovery_secret: &[u8; 32]) -> String {
    let mut h = sha2::Sha256::new();
    h.update(b"errand-rendezvous-v1");
    h.update(discovery_secret);
    format!("errand-{}", hex::encode(&h.finalize()[..16]))
}
