//! What one attempt writes to the thread and to the workspace, pure: the reasons its
//! terminal facts give, its output as `output` events within the task's budgets
//! ([`OutputPlan`]), and the folders and names of its files. The runner and a turn of an agent
//! both use it; it uses neither.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::Duration,
};

use errand_core::{
    TaskId,
    limits::{
        MAX_EVENTS_PER_TASK, MAX_OUTPUT_EVENT_BYTES, MAX_OUTPUT_PER_TASK_BYTES,
        MAX_SHORT_TEXT_BYTES,
    },
};

use tokio::time::Instant;

use crate::{
    executor::DEFAULT_TAIL_BYTES,
    transcript::{floor_boundary, tail},
};

/// The reason given when a phone's `cancel_requested` settles a task.
pub const REASON_REQUESTED: &str = "requested";
/// The reason given when a task's `not_after` passed before it ran.
pub const REASON_EXPIRED: &str = "expired";
/// The reason given when the task's author was revoked before it ran.
pub const REASON_REVOKED: &str = "revoked";

/// First spacing of `output` events: the phone sees progress twice a second (DESIGN.md 3).
const OUTPUT_INTERVAL: Duration = Duration::from_millis(500);

/// The spacing doubles after this many events: one minute of chatter at the first spacing.
const OUTPUT_EVENTS_PER_STEP: usize = 120;

/// Widest spacing of `output` events. A task that prints for hours still reports twice a minute,
/// and adds about 120 events an hour rather than 7,200.
const OUTPUT_INTERVAL_MAX: Duration = Duration::from_secs(30);

/// Most `output` events per attempt. Readers stop at 4,096 events per task
/// ([`MAX_EVENTS_PER_TASK`]); a quarter per attempt leaves room for retries and for the facts
/// that must stay readable after the output (the terminal one above all).
const MAX_OUTPUT_EVENTS_PER_ATTEMPT: usize = MAX_EVENTS_PER_TASK / 4;

/// Events kept free per attempt for `started`, the output tail, the terminal fact and requests.
const EVENT_RESERVE: usize = 16;

/// Output bytes kept back from live output for the final tail and its notice, when the live
/// output did not fit: the tail is where results and errors are.
const TAIL_RESERVE: usize = DEFAULT_TAIL_BYTES + 512;

/// `text` cut to what a `failed`/`cancelled` reason may hold.
pub(crate) fn cap_text(text: &str) -> String {
    let cut = floor_boundary(text, MAX_SHORT_TEXT_BYTES);
    text[..cut].to_owned()
}

// ---------------------------------------------------------------------------------------------
// Output batching (pure)
// ---------------------------------------------------------------------------------------------

/// Turns the executor's output batches into `output` events within the attempt's budgets: at
/// most [`MAX_OUTPUT_EVENT_BYTES`] each, spaced by an interval that widens as events add up, and
/// within a byte and an event budget. What does not fit is counted, and the attempt's tail is
/// appended at the end with a notice ([`OutputPlan::tail_event`]).
#[derive(Debug)]
pub(crate) struct OutputPlan {
    live_bytes: usize,
    live_events: usize,
    tail_bytes: usize,
    sent_bytes: usize,
    sent_events: usize,
    pending: String,
    last_flush: Option<Instant>,
    truncated: bool,
    dropped_bytes: u64,
}

impl OutputPlan {
    /// Budgets for a new attempt of a task whose events so far hold `existing_bytes` of output
    /// in `existing_events` events, with a per-task cap of `cap` bytes.
    pub(crate) fn new(cap: usize, existing_bytes: usize, existing_events: usize) -> Self {
        let room = MAX_OUTPUT_PER_TASK_BYTES
            .saturating_sub(existing_bytes)
            .min(cap);
        let tail_bytes = room.min(TAIL_RESERVE);
        let events = MAX_EVENTS_PER_TASK
            .saturating_sub(existing_events)
            .saturating_sub(EVENT_RESERVE)
            .min(MAX_OUTPUT_EVENTS_PER_ATTEMPT);
        Self {
            live_bytes: room - tail_bytes,
            live_events: events,
            tail_bytes,
            sent_bytes: 0,
            sent_events: 0,
            pending: String::new(),
            last_flush: None,
            truncated: false,
            dropped_bytes: 0,
        }
    }

    pub(crate) fn push(&mut self, text: &str) {
        if self.truncated {
            self.dropped_bytes += text.len() as u64;
            return;
        }
        let room = self
            .live_bytes
            .saturating_sub(self.sent_bytes + self.pending.len());
        if text.len() <= room {
            self.pending.push_str(text);
        } else {
            let cut = floor_boundary(text, room);
            self.pending.push_str(&text[..cut]);
            self.dropped_bytes += (text.len() - cut) as u64;
            self.truncated = true;
        }
    }

    fn interval(&self) -> Duration {
        let steps = (self.sent_events / OUTPUT_EVENTS_PER_STEP).min(16) as u32;
        OUTPUT_INTERVAL
            .saturating_mul(1 << steps)
            .min(OUTPUT_INTERVAL_MAX)
    }

    /// When the pending text is due to be sent, if there is any.
    pub(crate) fn due_at(&self) -> Option<Instant> {
        if self.pending.is_empty() {
            return None;
        }
        if self.pending.len() >= MAX_OUTPUT_EVENT_BYTES {
            return Some(Instant::now());
        }
        Some(
            self.last_flush
                .map_or_else(Instant::now, |t| t + self.interval()),
        )
    }

    /// The next event to append, if one is due (or `force`, at the end of the attempt).
    pub(crate) fn take(&mut self, now: Instant, force: bool) -> Option<String> {
        if self.pending.is_empty() {
            return None;
        }
        if self.sent_events >= self.live_events {
            self.dropped_bytes += self.pending.len() as u64;
            self.pending.clear();
            self.truncated = true;
            return None;
        }
        let due = force
            || self.pending.len() >= MAX_OUTPUT_EVENT_BYTES
            || self.last_flush.is_none_or(|t| now >= t + self.interval());
        if !due {
            return None;
        }
        let cut = floor_boundary(&self.pending, MAX_OUTPUT_EVENT_BYTES);
        let batch: String = self.pending.drain(..cut).collect();
        self.sent_bytes += batch.len();
        self.sent_events += 1;
        self.last_flush = Some(now);
        Some(batch)
    }

    /// When output was left out: a last event with a notice naming the log and the output's
    /// tail, within the bytes kept back for it.
    pub(crate) fn tail_event(&self, outcome_tail: &str, log: &Path) -> Option<String> {
        if !self.truncated {
            return None;
        }
        let notice = format!(
            "\n[errand: {} bytes of output are not in the thread; the full log is {}. It ends with:]\n",
            self.dropped_bytes,
            log.display()
        );
        let budget = self.tail_bytes.min(MAX_OUTPUT_EVENT_BYTES);
        if notice.len() > budget {
            return None;
        }
        let text = tail(outcome_tail, budget - notice.len());
        Some(format!("{notice}{text}"))
    }
}

/// The folder of a task's attachments inside the workspace: `<workspace>/<task>/attachments`.
pub fn attachments_dir(workspace: &Path, task: TaskId) -> PathBuf {
    workspace.join(task.to_string()).join("attachments")
}

/// A name for each attachment that is a plain file name and unique in the folder: the second
/// `a.txt` becomes `a-2.txt`. Pure.
pub fn attachment_names(names: &[&str]) -> Vec<String> {
    let mut used = HashSet::new();
    names
        .iter()
        .map(|n| {
            let safe = errand_core::safe_file_name(n);
            let mut candidate = safe.clone();
            let mut i = 2;
            while !used.insert(candidate.to_lowercase()) {
                candidate = match safe.rsplit_once('.') {
                    Some((stem, ext)) if !stem.is_empty() => format!("{stem}-{i}.{ext}"),
                    _ => format!("{safe}-{i}"),
                };
                i += 1;
            }
            candidate
        })
        .collect()
}

/// The folder a task's attempt writes its results to (`$ERRAND_OUT`):
/// `<workspace>/<task>/out/<attempt>`.
pub fn out_dir(workspace: &Path, task: TaskId, attempt: u32) -> PathBuf {
    workspace
        .join(task.to_string())
        .join("out")
        .join(attempt.to_string())
}

/// An agent's `$ERRAND_OUT`, the same for every turn of one agent process:
/// `<workspace>/<task>/out/agent`.
pub fn agent_out_dir(workspace: &Path, task: TaskId) -> PathBuf {
    workspace.join(task.to_string()).join("out").join("agent")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachment_names_are_plain_and_unique_in_the_folder() {
        assert_eq!(
            attachment_names(&["a.txt", "../../a.txt", "A.TXT", "x", "x", "CON"]),
            ["a.txt", "a-2.txt", "A-3.TXT", "x", "x-2", "_CON"]
        );
    }

    #[test]
    fn output_is_batched_within_its_budgets() {
        let mut p = OutputPlan::new(MAX_OUTPUT_PER_TASK_BYTES, 0, 0);
        let t0 = Instant::now();
        p.push("a\n");
        assert_eq!(p.take(t0, false).as_deref(), Some("a\n"));
        p.push("b\n");
        // Not yet due: the last event was just now.
        assert_eq!(p.take(t0, false), None);
        assert_eq!(p.take(t0 + OUTPUT_INTERVAL, false).as_deref(), Some("b\n"));
        // A full event goes at once, and events never exceed the document's limit.
        p.push(&"x".repeat(MAX_OUTPUT_EVENT_BYTES + 10));
        let big = p.take(t0 + OUTPUT_INTERVAL, false).unwrap();
        assert_eq!(big.len(), MAX_OUTPUT_EVENT_BYTES);
        assert_eq!(p.take(t0, true).unwrap().len(), 10);
        assert!(!p.truncated);
        assert_eq!(p.tail_event("end", Path::new("/l")), None);
    }

    #[test]
    fn output_over_the_cap_ends_with_the_tail_and_the_log_path() {
        let cap = 16 * 1024;
        let mut p = OutputPlan::new(cap, 0, 0);
        let mut sent = 0;
        let mut now = Instant::now();
        for _ in 0..100 {
            p.push(&"y".repeat(1000));
            now += OUTPUT_INTERVAL_MAX;
            while let Some(b) = p.take(now, false) {
                sent += b.len();
            }
        }
        assert!(p.truncated);
        let tail_event = p
            .tail_event("THE END", Path::new("/home/logs/t-1.log"))
            .unwrap();
        assert!(tail_event.contains("/home/logs/t-1.log"));
        assert!(tail_event.ends_with("THE END"));
        assert!(
            sent + tail_event.len() <= cap,
            "{sent} + {}",
            tail_event.len()
        );
    }

    #[test]
    fn output_respects_what_earlier_attempts_used() {
        let p = OutputPlan::new(
            MAX_OUTPUT_PER_TASK_BYTES,
            MAX_OUTPUT_PER_TASK_BYTES - 1000,
            0,
        );
        assert_eq!(p.live_bytes + p.tail_bytes, 1000);
        let p = OutputPlan::new(MAX_OUTPUT_PER_TASK_BYTES, 0, MAX_EVENTS_PER_TASK - 10);
        assert_eq!(p.live_events, 0);
    }

    #[test]
    fn the_output_interval_widens_with_the_event_count() {
        let mut p = OutputPlan::new(MAX_OUTPUT_PER_TASK_BYTES, 0, 0);
        assert_eq!(p.interval(), OUTPUT_INTERVAL);
        p.sent_events = OUTPUT_EVENTS_PER_STEP;
        assert_eq!(p.interval(), OUTPUT_INTERVAL * 2);
        p.sent_events = 100 * OUTPUT_EVENTS_PER_STEP;
        assert_eq!(p.interval(), OUTPUT_INTERVAL_MAX);
    }
}
