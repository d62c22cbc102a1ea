//! QR rendering (being written).
