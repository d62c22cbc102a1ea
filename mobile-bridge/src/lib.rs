//! placeholder
uniffi::setup_scaffolding!();
