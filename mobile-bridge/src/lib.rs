//! `errand-mobile`: the Errand phone peer as a library, exported to Kotlin, Swift and Python
//! with UniFFI proc-macros, and `errand-phone`, its terminal client (`src/bin`).
//!
//! A thin layer over [`errand_p2p::peer::Peer`]: it converts types, calls the shared peer API
//! and maps errors. Nothing here is logic the desktop could also need.
//!
//! - [`PhoneClient`] owns one phone home and a tokio runtime; the network starts in the
//!   background when it opens. Local writes return once durable and never wait for the
//!   network; `sync_once` serves the phone OS's short background windows.
//! - [`ThreadListener`] is implemented by the app; [`PhoneClient::subscribe`] returns a
//!   [`Subscription`] that stops delivery when dropped.
//! - [`ErrandError`] is the one error type: five stable kinds, each with a message.
//! - Views ([`TaskView`], [`ThreadView`], [`StatusView`]) are plain records; every task shows
//!   one [`TaskStatus`], and `queued` means the desktop has not confirmed it yet.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod client;
mod error;
mod listener;
mod types;

pub use client::PhoneClient;
pub use errand_core::{BlobHash, BlobRef};
pub use error::ErrandError;
pub use listener::{FetchProgress, Subscription, ThreadListener};
pub use types::{
    ConnectionPath, DesktopStatus, FetchedFile, MessageKind, MessageView, OpenOptions, PairResult,
    RoutineView, StatusView, TaskEventKind, TaskEventView, TaskRequest, TaskStatus, TaskView,
    ThreadView,
};

uniffi::setup_scaffolding!();

/// Sends this library's logs to stderr, filtered like `RUST_LOG` (e.g. `info,errand_p2p=debug`).
/// Call once; later calls do nothing. Apps that route logs elsewhere need not call it.
#[uniffi::export]
pub fn init_logging(filter: String) {
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
