//! Errand's peer-to-peer layer.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod relay;
