//! The Errand desktop: daemon, CLI, pairing UX, executors and the task runner.
//!
//! - [`config`]: the TOML config file in the home, and the flags that override it.
//! - [`executor`]: runs one attempt as a process group behind a start gate.
//! - [`ledger`]: the write-ahead record of attempts, and start-up recovery.
//! - [`runner`]: watches the thread and runs this desktop's tasks.
//! - [`transcript`]: the thread so far as Markdown, for `ERRAND_THREAD`.
//! - [`qr`]: pairing QR codes.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod config;
pub mod executor;
pub mod ledger;
pub mod qr;
pub mod runner;
pub mod transcript;
