//! Unit tests of the relay server.

use super::behaviour::normalize_external_addr;
use super::*;
use libp2p::{Multiaddr, identity::Keypair, multiaddr::Protocol};

#[test]
fn stats_line_round_trips() {
    let stats = RelayStats {
        reservations: 3,
        circuits: 1,
        rendezvous_registrations: 2,
        connections: 5,
    };
    let line = stats.to_log_line();
    assert!(line.starts_with(STATS_LINE_PREFIX));
    assert!(!line.contains('\n'));
    assert_eq!(RelayStats::parse_log_line(&line), Some(stats));
    assert_eq!(RelayStats::parse_log_line("INFO something else"), None);
}

#[test]
fn rate_flag_is_the_only_limiter() {
    let limits = RelayLimits::default();
    let config = limits.relay_config();
    assert_eq!(config.reservation_rate_limiters.len(), 2);
    assert_eq!(config.circuit_src_rate_limiters.len(), 2);
    let none = RelayLimits {
        reservation_rate_per_peer: None,
        reservation_rate_per_ip: None,
        circuit_rate_per_peer: None,
        circuit_rate_per_ip: None,
        ..RelayLimits::default()
    };
    let config = none.relay_config();
    assert!(config.reservation_rate_limiters.is_empty());
    assert!(config.circuit_src_rate_limiters.is_empty());
}

#[test]
fn zero_circuit_duration_is_refused() {
    let limits = RelayLimits {
        max_circuit_duration: Duration::ZERO,
        ..RelayLimits::default()
    };
    assert!(matches!(
        limits.validate(),
        Err(StartError::InvalidLimit {
            name: "max_circuit_duration",
            ..
        })
    ));
    assert!(RelayLimits::default().validate().is_ok());
}

#[test]
fn external_addr_with_own_peer_id_is_normalized_and_foreign_one_refused() {
    let local = Keypair::generate_ed25519().public().to_peer_id();
    let other = Keypair::generate_ed25519().public().to_peer_id();
    let base: Multiaddr = "/ip4/203.0.113.7/tcp/4001".parse().unwrap();
    let own = base.clone().with(Protocol::P2p(local));
    assert_eq!(normalize_external_addr(&own, local).unwrap(), base);
    let foreign = base.clone().with(Protocol::P2p(other));
    assert!(matches!(
        normalize_external_addr(&foreign, local),
        Err(StartError::ExternalAddrPeerMismatch { .. })
    ));
    let udp: Multiaddr = "/ip4/203.0.113.7/udp/4001".parse().unwrap();
    assert!(normalize_external_addr(&udp, local).is_err());
}

#[test]
fn identity_is_created_once_with_private_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested").join(IDENTITY_FILE_NAME);
    let first = load_or_create_identity(&path).unwrap();
    let second = load_or_create_identity(&path).unwrap();
    assert_eq!(first.public(), second.public());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn garbage_identity_file_is_a_decode_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(IDENTITY_FILE_NAME);
    std::fs::write(&path, b"not a key").unwrap();
    let err = load_or_create_identity(&path).unwrap_err();
    assert!(matches!(err, IdentityError::Decode { .. }));
    assert!(err.to_string().contains(&path.display().to_string()));
}
