//! The thread so far as a Markdown transcript, for an executor's `ERRAND_THREAD` file.
//!
//! - Earlier tasks (instruction, status, exit code, the tail of their output) and chat messages,
//!   oldest first, then the task being run now, last.
//! - Capped in size: the newest entries are kept, the oldest dropped (with a note saying how
//!   many). Each entry is capped too, so one huge output cannot crowd out the conversation.
//! - Texts go inside tilde fences longer than any run of tildes they contain, so nothing in an
//!   instruction or an output can end its block early.

use std::collections::HashMap;

use errand_core::{Device, DeviceId, Message, MessageKind, Task, TaskStatus, fold, time::rfc3339};

/// Most of an instruction shown per task: a long pasted prompt is summarised by its start.
const INSTRUCTION_EXCERPT_BYTES: usize = 4 * 1024;

/// Most of an earlier task's output shown: its tail, where results and errors usually are.
const OUTPUT_EXCERPT_BYTES: usize = 2 * 1024;

/// Most of a chat message shown.
const MESSAGE_EXCERPT_BYTES: usize = 4 * 1024;

/// Room kept for the "N earlier entries omitted" line.
const OMITTED_NOTE_BYTES: usize = 96;

/// What the transcript is made of: a snapshot of the thread.
#[derive(Debug, Clone)]
pub struct ThreadSnapshot {
    /// The thread's id.
    pub thread_id: String,
    /// Every task, any order.
    pub tasks: Vec<Task>,
    /// Every message, any order.
    pub messages: Vec<Message>,
    /// Devices, for their names.
    pub devices: Vec<Device>,
}

/// Renders the transcript for running `current`, at most `cap` bytes, newest last.
pub fn render(thread: &ThreadSnapshot, current: &Task, cap: usize) -> String {
    let names: HashMap<&DeviceId, &str> = thread
        .devices
        .iter()
        .filter(|d| !d.name.is_empty())
        .map(|d| (&d.id, d.name.as_str()))
        .collect();
    let who = |id: &DeviceId| -> String {
        names
            .get(id)
            .map_or_else(|| short_id(id), |n| (*n).to_owned())
    };

    let header = format!(
        "# Errand thread {}\n\nThe conversation so far between the user's devices and this \
         desktop, oldest first (times in UTC). The task being run now comes last.\n\n",
        thread.thread_id
    );
    let this = format!(
        "## This task: {} · {} · from {} · executor {}\n\nInstruction:\n\n{}\n",
        current.id,
        rfc3339(current.created_at),
        who(&current.author),
        current.executor,
        fenced(&head(&current.instruction, INSTRUCTION_EXCERPT_BYTES))
    );

    // Earlier tasks, and messages other than the desktop's own notes about a task.
    let mut entries: Vec<(i64, String)> = Vec::new();
    for t in thread.tasks.iter().filter(|t| t.id < current.id) {
        entries.push((t.created_at, task_entry(t, &who)));
    }
    for m in &thread.messages {
        if m.kind == MessageKind::System && m.task.is_some() {
            continue;
        }
        entries.push((m.at, message_entry(m, &who)));
    }
    entries.sort_by_key(|(at, _)| *at);

    let fixed = header.len() + this.len() + OMITTED_NOTE_BYTES;
    let mut budget = cap.saturating_sub(fixed);
    let mut kept: Vec<String> = Vec::new();
    for (_, text) in entries.iter().rev() {
        if text.len() <= budget {
            budget -= text.len();
            kept.push(text.clone());
        } else {
            if kept.is_empty() && budget > 0 {
                // The newest entry alone is too long: keep its end.
                kept.push(format!("…{}", tail(text, budget.saturating_sub(4))));
            }
            break;
        }
    }
    let omitted = entries.len() - kept.len();
    let mut out = header;
    if omitted > 0 {
        out.push_str(&format!(
            "_({omitted} earlier entries are omitted to keep this file short.)_\n\n"
        ));
    }
    for text in kept.iter().rev() {
        out.push_str(text);
    }
    out.push_str(&this);
    if out.len() > cap {
        // Only when `cap` is smaller than the header and this task: keep the newest part.
        out = tail(&out, cap).to_owned();
    }
    out
}

fn task_entry(t: &Task, who: &dyn Fn(&DeviceId) -> String) -> String {
    let v = fold(t);
    let mut result = v.status.as_str().replace('_', " ");
    if let Some(code) = v.exit_code {
        result.push_str(&format!(", exit code {code}"));
    }
    if let Some(reason) = &v.reason {
        result.push_str(&format!(" ({reason})"));
    }
    if v.attempt > 1 {
        result.push_str(&format!(", attempt {}", v.attempt));
    }
    let mut s = format!(
        "## Task {} · {} · from {} · executor {}\n\nInstruction:\n\n{}\nResult: {result}\n\n",
        t.id,
        rfc3339(t.created_at),
        who(&t.author),
        t.executor,
        fenced(&head(&t.instruction, INSTRUCTION_EXCERPT_BYTES)),
    );
    let shown_output = !v.output.is_empty()
        && matches!(
            v.status,
            TaskStatus::Done
                | TaskStatus::Failed
                | TaskStatus::Running
                | TaskStatus::Cancelled
                | TaskStatus::Interrupted
        );
    if shown_output {
        let out = tail(&v.output, OUTPUT_EXCERPT_BYTES);
        let label = if out.len() < v.output.len() {
            format!("Output (last {} bytes):", out.len())
        } else {
            "Output:".to_owned()
        };
        s.push_str(&format!("{label}\n\n{}\n", fenced(out)));
    }
    s
}

fn message_entry(m: &Message, who: &dyn Fn(&DeviceId) -> String) -> String {
    format!(
        "## Message · {} · {} ({})\n\n{}\n\n",
        rfc3339(m.at),
        who(&m.author),
        m.kind.as_str(),
        head(&m.text, MESSAGE_EXCERPT_BYTES).trim_end()
    )
}

/// `text` in a tilde fence that no run of tildes inside it can close.
fn fenced(text: &str) -> String {
    let longest = text.split(|c| c != '~').map(str::len).max().unwrap_or(0);
    let fence = "~".repeat(longest.max(2) + 1);
    let body = text.strip_suffix('\n').unwrap_or(text);
    format!("{fence}\n{body}\n{fence}\n")
}

fn short_id(id: &DeviceId) -> String {
    let s = id.as_str();
    let start = s.len().saturating_sub(8);
    format!("device …{}", &s[start..])
}

/// The largest index `<= i` on a character boundary of `s`.
pub(crate) fn floor_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// At most the first `max` bytes of `s`, with a note when cut.
fn head(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let cut = floor_boundary(s, max);
    format!("{}\n[… {} more bytes]", &s[..cut], s.len() - cut)
}

/// At most the last `max` bytes of `s`, cut at a character boundary.
pub(crate) fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use errand_core::{DeviceKind, EventKind, MessageId, TaskEvent, TaskId};

    const DESKTOP: &str = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";
    const PHONE: &str = "12D3KooWRBhwfeP2Y4TCx1SM6s9rUoHhR5nLZRb2wNasA4r5w7Xp";

    fn dev(id: &str, name: &str, kind: DeviceKind) -> Device {
        Device {
            id: id.parse().unwrap(),
            name: name.into(),
            kind,
            actors: vec![],
            executors: vec![],
            added_at: 0,
            revoked_at: None,
        }
    }

    fn task(at: i64, instruction: &str, facts: Vec<EventKind>) -> Task {
        let desktop: DeviceId = DESKTOP.parse().unwrap();
        Task {
            id: TaskId::new_at(at),
            instruction: instruction.into(),
            executor: "shell".into(),
            target: desktop.clone(),
            author: PHONE.parse().unwrap(),
            created_at: at,
            not_after: None,
            attachments: Vec::new(),
            events: facts
                .into_iter()
                .enumerate()
                .map(|(i, kind)| TaskEvent {
                    at: at + i as i64,
                    attempt: 1,
                    author: desktop.clone(),
                    kind,
                })
                .collect(),
        }
    }

    fn snapshot(tasks: Vec<Task>, messages: Vec<Message>) -> ThreadSnapshot {
        ThreadSnapshot {
            thread_id: "01THREAD".into(),
            tasks,
            messages,
            devices: vec![
                dev(DESKTOP, "workstation", DeviceKind::Desktop),
                dev(PHONE, "Ada's phone", DeviceKind::Phone),
            ],
        }
    }

    #[test]
    fn earlier_results_and_messages_come_before_the_current_task() {
        let done = task(
            1_000,
            "summarise the CSVs",
            vec![
                EventKind::Delivered,
                EventKind::Started,
                EventKind::Output {
                    text: "3 files, 42 rows\n".into(),
                },
                EventKind::Finished { exit_code: 0 },
            ],
        );
        let msg = Message {
            id: MessageId::new_at(2_000),
            author: PHONE.parse().unwrap(),
            kind: MessageKind::User,
            text: "thanks!".into(),
            at: 2_000,
            task: None,
        };
        let current = task(3_000, "now pull out the outliers", vec![]);
        let later = task(4_000, "not yet", vec![]);
        let s = render(
            &snapshot(vec![later, current.clone(), done], vec![msg]),
            &current,
            64 * 1024,
        );
        let first = s.find("summarise the CSVs").unwrap();
        let result = s.find("3 files, 42 rows").unwrap();
        let thanks = s.find("thanks!").unwrap();
        let now = s.find("## This task").unwrap();
        assert!(first < result && result < thanks && thanks < now, "{s}");
        assert!(s.contains("Result: done, exit code 0"), "{s}");
        assert!(s.contains("Ada's phone"), "{s}");
        assert!(
            !s.contains("not yet"),
            "later tasks are not part of the thread so far"
        );
        assert!(s.trim_end().ends_with("~~~"), "{s}");
    }

    #[test]
    fn the_cap_keeps_the_newest_entries() {
        let tasks: Vec<Task> = (0..200)
            .map(|i| task(1_000 + i, &format!("task number {i}"), vec![]))
            .collect();
        let current = task(10_000, "current", vec![]);
        let mut all = tasks.clone();
        all.push(current.clone());
        let s = render(&snapshot(all, vec![]), &current, 4096);
        assert!(s.len() <= 4096, "{}", s.len());
        assert!(s.contains("task number 199"));
        assert!(!s.contains("task number 0\n"));
        assert!(s.contains("earlier entries are omitted"));
        assert!(s.contains("current"));
    }

    #[test]
    fn fences_cannot_be_closed_from_inside() {
        let f = fenced("a\n~~~\nb ~~~~~ c");
        assert!(f.starts_with("~~~~~~\n"), "{f}");
        assert!(f.ends_with("\n~~~~~~\n"), "{f}");
        assert!(fenced("plain").starts_with("~~~\n"));
    }

    #[test]
    fn a_tiny_cap_is_still_respected() {
        let current = task(1, &"x".repeat(10_000), vec![]);
        let s = render(&snapshot(vec![current.clone()], vec![]), &current, 300);
        assert!(s.len() <= 300);
    }

    #[test]
    fn cutting_respects_character_boundaries() {
        let s = "ééé";
        assert_eq!(tail(s, 3), "é");
        assert_eq!(floor_boundary(s, 3), 2);
        assert!(head(s, 3).starts_with('é'));
    }
}
