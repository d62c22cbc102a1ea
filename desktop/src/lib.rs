//! The Errand desktop: daemon, CLI, pairing UX, executors and the task runner.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod executor;
pub mod qr;
