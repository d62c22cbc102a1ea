//! Devices that share a thread.

use serde::{Deserialize, Serialize};

use crate::{DeviceId, time::Millis};

/// What kind of device a peer is. Only desktops run tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// Runs tasks and owns the thread.
    Desktop,
    /// Creates tasks and requests.
    Phone,
}

impl DeviceKind {
    /// The name used in the document and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Desktop => "desktop",
            Self::Phone => "phone",
        }
    }
}

impl std::str::FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "desktop" => Ok(Self::Desktop),
            "phone" => Ok(Self::Phone),
            other => Err(format!(
                "unknown device kind {other:?} (expected desktop or phone)"
            )),
        }
    }
}

/// A device record in the thread's `devices` map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// The device's PeerId.
    pub id: DeviceId,
    /// A human name, such as "Ada's laptop".
    pub name: String,
    /// Desktop or phone.
    pub kind: DeviceKind,
    /// Automerge actor ids (hex) whose ops belong to this device.
    pub actors: Vec<String>,
    /// Executors this device offers (desktops only).
    pub executors: Vec<String>,
    /// When the device joined the thread.
    pub added_at: Millis,
    /// When the device was revoked, if it was.
    pub revoked_at: Option<Millis>,
}

impl Device {
    /// True once the device has been revoked.
    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }
}
