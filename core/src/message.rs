//! Chat messages in a thread.

use serde::{Deserialize, Serialize};

use crate::{DeviceId, MessageId, TaskId, time::Millis};

/// Who a message speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageKind {
    /// Written by a person.
    User,
    /// Written by an agent running on the desktop.
    Agent,
    /// Written by Errand itself.
    System,
}

impl MessageKind {
    /// The name used in the document and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Agent => "agent",
            Self::System => "system",
        }
    }

    /// Parses the document form.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(Self::User),
            "agent" => Some(Self::Agent),
            "system" => Some(Self::System),
            _ => None,
        }
    }
}

/// One message. Its author is the device that owns the Automerge actor that wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Unique, time-sortable id.
    pub id: MessageId,
    /// The device that wrote it (from the op's actor, never from a field).
    pub author: DeviceId,
    /// User, agent or system.
    pub kind: MessageKind,
    /// The text.
    pub text: String,
    /// When it was written, by the author's clock.
    pub at: Millis,
    /// The task it is about, if any.
    pub task: Option<TaskId>,
}
