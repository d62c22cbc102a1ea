//! Errand's domain model. No I/O, no clocks except where a caller passes one in.
//!
//! - [`ids`]: ULID-based [`TaskId`] / [`MessageId`], and [`DeviceId`] (a validated libp2p PeerId).
//! - [`task`]: [`Task`], [`TaskEvent`], and the pure status [`fold`](task::fold).
//! - [`action`]: which [`Action`] a device may take on a task ([`check_action`]).
//! - [`message`] and [`device`]: the other records of a thread.
//! - [`blob`]: [`BlobHash`], [`BlobRef`] (attachments and artifacts) and [`safe_file_name`].
//! - [`limits`]: every size cap, each with its reason.
//! - [`ticket`]: the pairing ticket that a QR code carries.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod action;
pub mod blob;
pub mod device;
pub mod ids;
pub mod limits;
pub mod message;
pub mod routine;
pub mod task;
pub mod ticket;
pub mod time;

pub use action::{
    Action, ActionRefused, AnswerRefused, Permitted, allowed_actions, check_action, check_answer,
    check_reply,
};
pub use blob::{BlobHash, BlobRef, safe_file_name};
pub use device::{Device, DeviceKind};
pub use ids::{DeviceId, IdError, MessageId, RoutineId, TaskId, ThreadId};
pub use message::{Message, MessageKind};
pub use routine::{
    CatchUp, Routine, RoutineEvent, RoutineEventKind, RoutineState, Schedule, ScheduleError,
};
pub use task::{
    EventKind, PendingPermission, PermissionChoice, PlanEntry, Request, Role, Task, TaskEvent,
    TaskStatus, TaskView, ToolCallView, Utterance, artifacts_of, fold, prompt_of,
};
pub use ticket::{Ticket, TicketError};
