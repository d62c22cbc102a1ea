//! The end-to-end tests: real Errand processes (desktop, phone, relay), real libp2p
//! connections, real redb homes, in one test binary. One binary links once, and its tests
//! share one pool of test threads (`RUST_TEST_THREADS`), so a long test of one module
//! (the nemesis, a NAT) runs beside the short ones of another instead of after them.
//!
//! Run one module's tests with its path as the filter, e.g.
//! `cargo test -p errand-tests --test e2e relay::`.

mod acp;
mod cli_trust;
mod control_socket;
mod daemon_start;
mod desktop;
mod durability;
mod export;
mod files;
mod files_hostile;
mod files_use;
mod hostile;
mod nemesis;
mod pairing;
mod phone_errors;
mod phone_json;
mod phone_wait;
mod python_bridge;
mod relay;
mod routines;
mod segments;
mod sync;
