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

/// Why a reply or a permission answer is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerRefused {
    /// What any action is refused for (the target's own task).
    #[error(transparent)]
    Action(#[from] ActionRefused),
    /// A reply while the attempt still runs.
    #[error("task {id} is {status}; reply once its turn has ended (or cancel it)")]
    Busy {
        /// The task.
        id: TaskId,
        /// Its status.
        status: TaskStatus,
    },
    /// An empty reply.
    #[error("the reply is empty")]
    Empty,
    /// A reply over the size a message may have.
    #[error("the reply is {len} bytes; at most {max} fit in the thread")]
    TooLong {
        /// Its length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// No permission request waits for an answer.
    #[error("task {id} has no permission request waiting for an answer")]
    NoPermission {
        /// The task.
        id: TaskId,
    },
    /// The option is not one the agent offered.
    #[error("{option:?} is not an option of this request; choose one of: {offered}")]
    UnknownOption {
        /// What was given.
        option: String,
        /// The ids offered, comma-separated.
        offered: String,
    },
}

/// Whether `device` may reply `text` to `task`: the task's latest attempt (its agent's turn)
/// must have ended. The reply opens the next attempt, whose prompt it is.
pub fn check_reply(task: &Task, device: &DeviceId, text: &str) -> Result<Permitted, AnswerRefused> {
    if *device == task.target {
        return Err(ActionRefused::Target { id: task.id }.into());
    }
    if text.trim().is_empty() {
        return Err(AnswerRefused::Empty);
    }
    let max = crate::limits::MAX_MESSAGE_BYTES;
    if text.len() > max {
        return Err(AnswerRefused::TooLong {
            len: text.len(),
            max,
        });
    }
    let view = fold(task);
    if !view.status.is_terminal() {
        return Err(AnswerRefused::Busy {
            id: task.id,
            status: view.status,
        });
    }
    Ok(Permitted {
        kind: EventKind::Replied {
            text: text.to_owned(),
        },
        attempt: view.attempt,
    })
}

/// Whether `device` may answer the pending permission request of `task` with `choice`: an
/// option id, or `allow` / `deny` for the first option that allows / rejects.
pub fn check_answer(
    task: &Task,
    device: &DeviceId,
    choice: &str,
) -> Result<Permitted, AnswerRefused> {
    if *device == task.target {
        return Err(ActionRefused::Target { id: task.id }.into());
    }
    let view = fold(task);
    let pending = view
        .permission
        .ok_or(AnswerRefused::NoPermission { id: task.id })?;
    let option = match choice {
        "allow" => pending.options.iter().find(|o| o.allows()),
        "deny" | "reject" => pending.options.iter().find(|o| o.rejects()),
        id => pending.options.iter().find(|o| o.id == id),
    };
    let Some(option) = option else {
        return Err(AnswerRefused::UnknownOption {
            option: choice.to_owned(),
            offered: pending
                .options
                .iter()
                .map(|o| o.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    Ok(Permitted {
        kind: EventKind::PermissionAnswered {
            perm_id: pending.id,
            option_id: option.id.clone(),
        },
        attempt: view.attempt,
    })
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
            vec![EventKind::Fetching],
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

    fn asking() -> Task {
        let choice = |id: &str, kind: &str| crate::PermissionChoice {
            id: id.into(),
            name: id.into(),
            kind: kind.into(),
        };
        task_with(&[
            EventKind::Started,
            EventKind::PermissionRequested {
                perm_id: "p1".into(),
                title: "Write summary.md".into(),
                tool_kind: "edit".into(),
                options: vec![
                    choice("yes", "allow_once"),
                    choice("always", "allow_always"),
                    choice("no", "reject_once"),
                ],
            },
        ])
    }

    #[test]
    fn a_permission_is_answered_by_option_id_or_by_allow_and_deny() {
        let task = asking();
        assert_eq!(fold(&task).status, TaskStatus::AwaitingPermission);
        let answer = |choice: &str| match check_answer(&task, &phone(), choice) {
            Ok(Permitted {
                kind: EventKind::PermissionAnswered { perm_id, option_id },
                attempt: 1,
            }) => Ok((perm_id, option_id)),
            other => Err(other),
        };
        assert_eq!(answer("always"), Ok(("p1".into(), "always".into())));
        assert_eq!(answer("allow"), Ok(("p1".into(), "yes".into())));
        assert_eq!(answer("deny"), Ok(("p1".into(), "no".into())));
        let refused = check_answer(&task, &phone(), "maybe").unwrap_err();
        assert_eq!(
            refused.to_string(),
            "\"maybe\" is not an option of this request; choose one of: yes, always, no"
        );
        assert!(matches!(
            check_answer(&task, &desktop(), "yes"),
            Err(AnswerRefused::Action(ActionRefused::Target { .. }))
        ));
    }

    #[test]
    fn an_answered_permission_is_no_longer_pending() {
        let mut task = asking();
        task.events.push(ev(
            phone(),
            1,
            9,
            EventKind::PermissionAnswered {
                perm_id: "p1".into(),
                option_id: "yes".into(),
            },
        ));
        assert_eq!(fold(&task).status, TaskStatus::Running);
        assert!(matches!(
            check_answer(&task, &phone(), "yes"),
            Err(AnswerRefused::NoPermission { .. })
        ));
    }

    #[test]
    fn a_reply_waits_for_the_turn_to_end_and_opens_the_next_attempt() {
        let running = task_with(&[EventKind::Started]);
        assert!(matches!(
            check_reply(&running, &phone(), "and then?"),
            Err(AnswerRefused::Busy { .. })
        ));
        let mut done = task_with(&[EventKind::Started, EventKind::Finished { exit_code: 0 }]);
        assert_eq!(
            check_reply(&done, &phone(), "  "),
            Err(AnswerRefused::Empty)
        );
        let permitted = check_reply(&done, &phone(), "and then?").unwrap();
        assert_eq!(permitted.attempt, 1);
        done.events.push(ev(phone(), 1, 9, permitted.kind));
        let view = fold(&done);
        assert_eq!((view.attempt, view.status), (2, TaskStatus::Queued));
        assert_eq!(crate::prompt_of(&done, 2), "and then?");
        assert_eq!(crate::prompt_of(&done, 1), done.instruction);
    }

    #[test]
    fn actions_parse_from_their_names() {
        for a in Action::ALL {
            assert_eq!(a.as_str().parse::<Action>(), Ok(a));
        }
        assert!("approved".parse::<Action>().is_err());
    }
}
