//! The errand-relay server (being written).
