//! The commands both CLIs and the phone bridge offer, as one typed API.
//!
//! - Each request is a struct that implements [`Call`]: its [`Call::Response`] is a typed
//!   record ([`views`]) and [`Call::run`] answers it on an opened [`Peer`] (with or without
//!   its network running). `SendTask` answers with the new [`TaskId`](errand_core::TaskId),
//!   `Act` with the [`Action`] requested.
//! - Which action a device may take on a task is decided in `errand_core::action`, next to
//!   the status fold; [`ops`] only reads the task and appends what that allows.
//! - A CLI whose home a daemon holds sends the same request over the control socket as a
//!   [`Request`] (JSON on the wire) and reads the typed response back
//!   (`cli::Opened::call`); the daemon answers it with [`handle`].
//! - JSON appears only where a response is printed (`--json`) or crosses the socket; the
//!   response records carry the stable shapes the README documents.

pub mod export;
pub mod files;
pub mod ops;
pub mod routines;
pub mod views;

use std::future::Future;

pub use errand_core::Action;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub use self::{
    export::{Export, Imported, Manifest},
    files::{FetchArtifacts, Fetched},
    ops::{
        Act, AddDevice, Answer, Forget, GetStatus, GetTask, GetThread, IssueTicket, ListDevices,
        PairWith, Reply, Revoke, SendTask, Thread,
    },
    routines::{
        AddRoutine, ChangeRoutine, ListRoutines, OccurrenceInfo, RoutineChange, RoutineInfo,
    },
    views::{
        Answered, ConnectionPath, ConversationLine, DeviceAdded, DeviceInfo, DocumentLine,
        EventInfo, Forgotten, MessageInfo, OUTPUT_TAIL_BYTES, PairTicket, Paired, PeerLine,
        RelayLine, Replied, Requested, ReservationState, Revoked, Sent, StatusInfo, TaskInfo,
        ThreadInfo, tail,
    },
};
pub use crate::control::ApiError;
use crate::peer::Peer;

/// Exit codes (DESIGN.md section 9).
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// An error.
    pub const ERROR: i32 = 1;
    /// Bad usage.
    pub const USAGE: i32 = 2;
    /// A peer is unreachable or the wait timed out.
    pub const UNREACHABLE: i32 = 3;
    /// The task ended failed, cancelled, denied or interrupted.
    pub const TASK_FAILED: i32 = 4;
    /// The home is locked by a process that does not answer on its control socket.
    pub const LOCKED: i32 = 5;
}

/// One request of the API, with the type of its answer.
pub trait Call: Into<Request> + Send {
    /// What the request answers.
    type Response: Serialize + DeserializeOwned + Into<Response> + Send;

    /// Answers the request on an opened peer.
    fn run(self, peer: &Peer) -> impl Future<Output = Result<Self::Response, ApiError>> + Send;
}

/// Any request, as it crosses the control socket: `{"cmd": "<name>", <its fields>}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// `status`.
    Status(GetStatus),
    /// `thread [--all]`.
    Thread(GetThread),
    /// `task ID`.
    Task(GetTask),
    /// `send TEXT`.
    Send(SendTask),
    /// `approve|deny|cancel|retry ID`.
    Act(Act),
    /// `reply ID TEXT`.
    Reply(Reply),
    /// `answer ID OPTION`.
    Answer(Answer),
    /// `devices`.
    Devices(ListDevices),
    /// `pair` on a desktop: issue a ticket.
    Pair(IssueTicket),
    /// `pair TICKET` on a phone.
    PairWith(PairWith),
    /// `devices revoke ID`.
    Revoke(Revoke),
    /// `forget` on a phone.
    Forget(Forget),
    /// `devices add PEER_ID`.
    DevicesAdd(AddDevice),
    /// `routine add`.
    RoutineAdd(AddRoutine),
    /// `routine list`.
    Routines(ListRoutines),
    /// `routine pause|resume|rm`.
    RoutineChange(ChangeRoutine),
    /// `export DIR`.
    Export(Export),
    Fetch(FetchArtifacts),
}

/// Any response, as the daemon sends it back: the response record itself, untagged (the
/// caller knows which one it asked for).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Response {
    /// To [`GetStatus`].
    Status(StatusInfo),
    /// To [`GetThread`].
    Thread(ThreadInfo),
    /// To [`GetTask`].
    Task(Box<TaskInfo>),
    /// To [`SendTask`].
    Sent(Sent),
    /// To [`Act`].
    Requested(Requested),
    /// To [`Reply`].
    Replied(Replied),
    /// To [`Answer`].
    Answered(Answered),
    /// To [`ListDevices`].
    Devices(Vec<DeviceInfo>),
    /// To [`IssueTicket`].
    Ticket(PairTicket),
    /// To [`PairWith`].
    Paired(Paired),
    /// To [`Revoke`].
    Revoked(Revoked),
    /// To [`Forget`].
    Forgotten(Forgotten),
    /// To [`AddDevice`].
    DeviceAdded(DeviceAdded),
    /// To [`AddRoutine`] and [`ChangeRoutine`].
    Routine(Box<RoutineInfo>),
    /// To [`ListRoutines`].
    Routines(Vec<RoutineInfo>),
    /// To [`Export`].
    Exported(Box<Manifest>),
    Fetched(Fetched),
}

/// Ties each request struct to its [`Request`] variant and its response to its [`Response`]
/// variant.
macro_rules! variants {
    ($($call:ident => $req:ident, $resp:ty => $res:ident;)*) => {$(
        impl From<$call> for Request {
            fn from(c: $call) -> Self {
                Self::$req(c)
            }
        }
        impl From<$resp> for Response {
            fn from(r: $resp) -> Self {
                Self::$res(r.into())
            }
        }
    )*};
}

variants! {
    GetStatus => Status, StatusInfo => Status;
    GetThread => Thread, ThreadInfo => Thread;
    GetTask => Task, TaskInfo => Task;
    SendTask => Send, Sent => Sent;
    Act => Act, Requested => Requested;
    Reply => Reply, Replied => Replied;
    Answer => Answer, Answered => Answered;
    ListDevices => Devices, Vec<DeviceInfo> => Devices;
    IssueTicket => Pair, PairTicket => Ticket;
    PairWith => PairWith, Paired => Paired;
    Revoke => Revoke, Revoked => Revoked;
    Forget => Forget, Forgotten => Forgotten;
    AddDevice => DevicesAdd, DeviceAdded => DeviceAdded;
    AddRoutine => RoutineAdd, RoutineInfo => Routine;
    ListRoutines => Routines, Vec<RoutineInfo> => Routines;
    Export => Export, Manifest => Exported;
    FetchArtifacts => Fetch, Fetched => Fetched;
}

impl From<ChangeRoutine> for Request {
    fn from(c: ChangeRoutine) -> Self {
        Self::RoutineChange(c)
    }
}

/// Answers any request on an opened peer: what a daemon does for its control socket.
pub async fn handle(peer: &Peer, req: Request) -> Result<Response, ApiError> {
    async fn answer<C: Call>(peer: &Peer, call: C) -> Result<Response, ApiError> {
        call.run(peer).await.map(Into::into)
    }
    match req {
        Request::Status(c) => answer(peer, c).await,
        Request::Thread(c) => answer(peer, c).await,
        Request::Task(c) => answer(peer, c).await,
        Request::Send(c) => answer(peer, c).await,
        Request::Act(c) => answer(peer, c).await,
        Request::Reply(c) => answer(peer, c).await,
        Request::Answer(c) => answer(peer, c).await,
        Request::Devices(c) => answer(peer, c).await,
        Request::Pair(c) => answer(peer, c).await,
        Request::PairWith(c) => answer(peer, c).await,
        Request::Revoke(c) => answer(peer, c).await,
        Request::Forget(c) => answer(peer, c).await,
        Request::DevicesAdd(c) => answer(peer, c).await,
        Request::RoutineAdd(c) => answer(peer, c).await,
        Request::Routines(c) => answer(peer, c).await,
        Request::RoutineChange(c) => answer(peer, c).await,
        Request::Export(c) => answer(peer, c).await,
        Request::Fetch(c) => answer(peer, c).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_keep_their_wire_shape() {
        let cases = [
            (Request::Status(GetStatus), r#"{"cmd":"status"}"#),
            (Request::Forget(Forget), r#"{"cmd":"forget"}"#),
            (
                Request::Thread(GetThread { all: true }),
                r#"{"cmd":"thread","all":true}"#,
            ),
            (
                Request::Act(Act {
                    id: errand_core::TaskId::new_at(1),
                    action: Action::Retry,
                }),
                r#"{"cmd":"act","id":"00000000016HVZJ0G0GW1TCV8B","action":"retry"}"#,
            ),
        ];
        for (req, json) in cases {
            let wire = serde_json::to_string(&req).unwrap();
            let back: Request = serde_json::from_str(&wire).unwrap();
            assert_eq!(back, req, "{wire}");
            if !json.contains("00000000016") {
                assert_eq!(wire, json);
            }
        }
        // `all` may be left out, as older clients did.
        let thread: Request = serde_json::from_str(r#"{"cmd":"thread"}"#).unwrap();
        assert_eq!(thread, Request::Thread(GetThread { all: false }));
    }
}
