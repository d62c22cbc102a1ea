//! The Errand desktop: daemon, CLI, pairing UX, executors and the task runner.
//!
//! - [`acp`]: the `acp` executor's agent, spoken to over the Agent Client Protocol.
//! - [`config`]: the TOML config file in the home, and the flags that override it.
//! - [`demo_agent`]: a scripted ACP agent for the demo and the tests (no LLM).
//! - [`executor`]: runs one attempt as a process group behind a start gate.
//! - [`ledger`]: the write-ahead record of attempts, and start-up recovery.
//! - [`runner`]: watches the thread and runs this desktop's tasks.
//! - [`transcript`]: the thread so far as Markdown, for `ERRAND_THREAD`.
//! - [`qr`]: pairing QR codes.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod acp;
mod attempt;
pub mod config;
pub mod demo_agent;
pub mod executor;
pub mod ledger;
pub mod qr;
pub mod runner;
mod schedule;
pub mod transcript;
mod turn;
