//! The listening port a home keeps across restarts.
//!
//! By default a peer listens on a random TCP port. Its paired devices remember the addresses
//! they reached it at, so a desktop that came back on another port could be found again only
//! through mDNS or a relay, and neither is always there (many Wi-Fi networks drop multicast;
//! a VPN carries none). So a home remembers the port it got, and the next start asks for the
//! same one first: the addresses its phones remember stay good. When that port is taken, the
//! peer listens on a new random one, as before. An explicit port (`--listen …/tcp/4001`) is
//! used as given.

use libp2p::{Multiaddr, multiaddr::Protocol};

/// Store key of the TCP port this home last listened on (2 bytes, big-endian).
pub(super) const META_LISTEN_PORT: &str = "listen_port";

/// `listen` with every TCP port 0 replaced by `port`; `None` when none asks for a random port.
pub(super) fn with_port(listen: &[Multiaddr], port: u16) -> Option<Vec<Multiaddr>> {
    let mut changed = false;
    let addrs = listen
        .iter()
        .map(|a| {
            a.iter()
                .map(|p| match p {
                    Protocol::Tcp(0) => {
                        changed = true;
                        Protocol::Tcp(port)
                    }
                    p => p,
                })
                .collect()
        })
        .collect();
    changed.then_some(addrs)
}

/// The TCP port to remember: the one the peer got where `listen` asked for a random one.
pub(super) fn port_to_keep(listen: &[Multiaddr], bound: &[Multiaddr]) -> Option<u16> {
    // Only where a random port was asked for.
    with_port(listen, 0)?;
    bound.iter().find_map(|a| {
        let relayed = a.iter().any(|p| matches!(p, Protocol::P2pCircuit));
        a.iter().find_map(|p| match p {
            Protocol::Tcp(port) if port != 0 && !relayed => Some(port),
            _ => None,
        })
    })
}

/// Decodes the stored port.
pub(super) fn decode(bytes: &[u8]) -> Option<u16> {
    let port = u16::from_be_bytes(bytes.try_into().ok()?);
    (port != 0).then_some(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<Multiaddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn only_a_random_port_is_replaced_and_kept() {
        let random = addrs(&["/ip4/0.0.0.0/tcp/0"]);
        assert_eq!(
            with_port(&random, 4242),
            Some(addrs(&["/ip4/0.0.0.0/tcp/4242"]))
        );
        let fixed = addrs(&["/ip4/0.0.0.0/tcp/4001"]);
        assert_eq!(with_port(&fixed, 4242), None);
        let bound = addrs(&["/ip4/127.0.0.1/tcp/39587", "/ip4/192.0.2.2/tcp/39587"]);
        assert_eq!(port_to_keep(&random, &bound), Some(39587));
        assert_eq!(port_to_keep(&fixed, &bound), None);
        let circuit = addrs(&["/ip4/192.0.2.9/tcp/4001/p2p-circuit"]);
        assert_eq!(port_to_keep(&random, &circuit), None);
        assert_eq!(decode(&39587u16.to_be_bytes()), Some(39587));
        assert_eq!(decode(&[0, 0]), None);
        assert_eq!(decode(&[1, 2, 3]), None);
    }
}
