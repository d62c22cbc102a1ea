//! What a device may ask of a task: approve, deny, cancel or retry it.
//!
//! - An [`Action`] becomes one request event ([`Action::event_kind`]) in the task's history.
//! - [`check_action`] decides, from the task's folded state, whether a device may take an
//!   action; [`allowed_actions`] lists every action it may take. Both are pure, like [`fold`],
//!   so every caller (the CLIs, the daemon, the phone bridge) refuses the same things.
//! - Only requests from a device other than the task's target count in the fold, so the
//!   target itself may take no action: it writes facts.

use serde::{Deserialize, Serialize};

use crate::{DeviceId, EventKind, Task, TaskId, TaskStatus, fold};

/// A request a device makes on a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Let an awaiting task run.
    Approve,
    /// Refuse an awaiting task.
    Deny,
    /// Stop it, or keep it from starting.
    Cancel,
    /// Run an ended task again as a new attempt.
    Retry,
}

impl Action {
    /// Every action, in the order the CLIs list them.
    pub const ALL: [Action; 4] = [Self::Approve, Self::Deny, Self::Cancel, Self::Retry];

    /// The action's name on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Approve => "approve",
            Self::Deny => "deny",
            Self::Cancel => "cancel",
            Self::Retry => "retry",
        }
    }

    /// The request event that carries this action.
    pub fn event_kind(self) -> EventKind {
        match self {
            Self::Approve => EventKind::Approved,
            Self::Deny => EventKind::Denied,
            Self::Cancel => EventKind::CancelRequested,
            Self::Retry => EventKind::Retried,
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown action {s:?}"))
    }
}

/// Why a device may not take an action on a task.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionRefused {
    /// The attempt has ended; only a retry applies.
    #[error("task {id} already ended ({status})")]
    Ended {
        /// The task.
        id: TaskId,
        /// Its status.
        status: TaskStatus,
    },
    /// A retry of an attempt that has not ended.
    #[error("task {id} is {status}; only an ended task can be retried")]
    NotEnded {
        /// The task.
        id: TaskId,
        /// Its status.
        status: TaskStatus,
    },
    /// The device is the task's target: what it writes are facts, never requests.
    #[error("task {id} runs on this device; it answers requests instead of making them")]
    Target {
        /// The task.
        id: TaskId,
    },
}

/// A permitted action: the event to append, and the attempt it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permitted {
    /// The request event.
    pub kind: EventKind,
    /// The latest attempt, which the event names (a retry names the attempt it retries).
    pub attempt: u32,
}

/// Whether `device` may take `action` on `task`, and if so the event that carries it.
///
/// - The task's target may take no action ([`ActionRefused::Target`]).
/// - Approve, deny and cancel apply while the latest attempt has not ended.
/// - Retry applies once it has ended.
pub fn check_action(
    task: &Task,
    device: &DeviceId,
    action: Action,
) -> Result<Permitted, ActionRefused> {
    if *device == task.target {
        return Err(ActionRefused::Target { id: task.id });
    }
    let view = fold(task);
    let ended = view.status.is_terminal();
    match (action, ended) {
        (Action::Retry, false) => Err(ActionRefused::NotEnded {
            id: task.id,
            status: view.status,
        }),
        (Action::Approve | Action::Deny | Action::Cancel, true) => Err(ActionRefused::Ended {
            id: task.id,
            status: view.status,
        }),
        _ => Ok(Permitted {
            kind: action.event_kind(),
            attempt: view.attempt,
        }),
    }
}

/// Every action `device` may take on `task` now, in [`Action::ALL`] order.
pub fn allowed_actions(task: &Task, device: &DeviceId) -> Vec<Action> {
    Action::ALL
        .into_iter()
        .filter(|a| check_action(task, device, *a).is_ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::tests::{desktop, ev, phone, task};

    /// A task whose desktop wrote these facts, in attempt 1.
    fn task_with(facts: &[EventKind]) -> Task {
        let events = facts.iter().enumerate();
        task(
            events
                .map(|(i, k)| ev(desktop(), 1, i as i64, k.clone()))
                .collect(),
        )
    }

    #[test]
    fn an_unfinished_task_may_be_approved_denied_or_cancelled_but_not_retried() {
        for facts in [
            vec![],
            vec![EventKind::Delivered],
            vec![EventKind::ApprovalRequested],
            vec![EventKind::Started],
        ] {
            let task = task_with(&facts);
            assert_eq!(
                allowed_actions(&task, &phone()),
                vec![Action::Approve, Action::Deny, Action::Cancel],
                "{facts:?}"
            );
        }
    }

    #[test]
    fn an_ended_task_may_only_be_retried() {
        let task = task_with(&[EventKind::Started, EventKind::Finished { exit_code: 1 }]);
        assert_eq!(allowed_actions(&task, &phone()), vec![Action::Retry]);
        let refused = check_action(&task, &phone(), Action::Cancel).unwrap_err();
        assert_eq!(
            refused.to_string(),
            format!("task {} already ended (failed)", task.id)
        );
    }

    #[test]
    fn retrying_a_running_task_is_refused_with_its_status() {
        let task = task_with(&[EventKind::Started]);
        let refused = check_action(&task, &phone(), Action::Retry).unwrap_err();
        assert_eq!(
            refused,
            ActionRefused::NotEnded {
                id: task.id,
                status: TaskStatus::Running
            }
        );
        assert!(
            refused
                .to_string()
                .contains("only an ended task can be retried")
        );
    }

    #[test]
    fn a_permitted_action_names_the_latest_attempt() {
        let mut task = task_with(&[EventKind::Finished { exit_code: 2 }]);
        task.events.push(ev(phone(), 1, 5, EventKind::Retried));
        let permitted = check_action(&task, &phone(), Action::Cancel).unwrap();
        assert_eq!(
            permitted,
            Permitted {
                kind: EventKind::CancelRequested,
                attempt: 2
            }
        );
    }

    #[test]
    fn the_target_desktop_may_take_no_action() {
        let task = task_with(&[EventKind::ApprovalRequested]);
        assert!(allowed_actions(&task, &desktop()).is_empty());
        assert_eq!(
            check_action(&task, &desktop(), Action::Approve),
            Err(ActionRefused::Target { id: task.id })
        );
    }

    #[test]
    fn actions_parse_from_their_names() {
        for a in Action::ALL {
            assert_eq!(a.as_str().parse::<Action>(), Ok(a));
        }
        assert!("approved".parse::<Action>().is_err());
    }
}
