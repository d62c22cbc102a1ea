//! Routines: an instruction that runs on a schedule (a plain interval, or a cron expression in
//! a time zone). Each due occurrence becomes an ordinary task whose id is derived from
//! (routine, scheduled time), so two merges or a restart can never create it twice; what the
//! desktop could not run on time is recorded as a `missed` fact, never dropped silently.
//!
//! Everything here is pure: the next times, the state fold, and the plan the desktop follows
//! when it wakes ([`plan`]).

use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{DeviceId, RoutineId, TaskId, limits, time::Millis};

/// Shortest interval: a routine is not a busy loop.
pub const MIN_EVERY: Duration = Duration::from_secs(1);
/// Longest interval: a year and a day.
pub const MAX_EVERY: Duration = Duration::from_secs(366 * 86_400);
/// Longest cron expression or zone name kept.
pub const MAX_SCHEDULE_BYTES: usize = 256;
/// Default and largest `catch_up = all` cap: how many missed occurrences run after a gap.
pub const DEFAULT_CATCH_UP_CAP: u32 = 10;
/// Largest `catch_up = all` cap.
pub const MAX_CATCH_UP_CAP: u32 = 100;
/// Most due times one [`plan`] walks: a cron routine left alone for years is planned in
/// several steps, each recording its own `missed` fact.
pub const MAX_DUE_PER_PLAN: usize = 10_000;
/// Most active routines a desktop runs (the oldest ones): each can make a task a second, so
/// a phone cannot flood its desktop with them. A phone refuses to make more.
pub const MAX_ACTIVE_ROUTINES: usize = 100;
/// Most events read per routine (pauses, resumes, missed facts).
pub const MAX_EVENTS_PER_ROUTINE: usize = limits::MAX_EVENTS_PER_TASK;

/// Why a schedule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// An interval under [`MIN_EVERY`] or over [`MAX_EVERY`].
    #[error("an interval must be between 1s and 366 days, not {0}")]
    Every(String),
    /// The cron expression does not parse.
    #[error(
        "{expr:?} is not a cron expression ({why}); write it as \"MIN HOUR DAY MONTH WEEKDAY\", e.g. \"0 8 * * 1-5\""
    )]
    Cron {
        /// The expression.
        expr: String,
        /// What the parser said.
        why: String,
    },
    /// The cron expression never matches.
    #[error("the cron expression {0:?} never matches a time")]
    Never(String),
    /// An unknown time zone.
    #[error("{0:?} is not a time zone name (use an IANA name such as Europe/Berlin, or UTC)")]
    Zone(String),
    /// Over [`MAX_SCHEDULE_BYTES`].
    #[error("the schedule is longer than {MAX_SCHEDULE_BYTES} bytes")]
    TooLong,
    /// An unknown catch-up policy.
    #[error("{0:?} is not a catch-up policy: use skip, once or all")]
    CatchUp(String),
}

/// When a routine is due.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// Every `every_ms`, counted from the routine's creation.
    Every {
        /// The interval in milliseconds.
        every_ms: u64,
    },
    /// A cron expression (five fields, or six with seconds first) read in a time zone.
    Cron {
        /// The expression.
        expr: String,
        /// An IANA time zone name.
        tz: String,
    },
}

impl Schedule {
    /// A plain interval.
    pub fn every(every: Duration) -> Result<Self, ScheduleError> {
        if !(MIN_EVERY..=MAX_EVERY).contains(&every) {
            return Err(ScheduleError::Every(format!("{every:?}")));
        }
        Ok(Self::Every {
            every_ms: every.as_millis() as u64,
        })
    }

    /// A cron expression in `tz`, checked to parse and to match some time.
    pub fn cron(expr: &str, tz: &str) -> Result<Self, ScheduleError> {
        let s = Self::Cron {
            expr: expr.trim().to_owned(),
            tz: tz.trim().to_owned(),
        };
        s.check()?;
        Ok(s)
    }

    /// Checks a schedule read from a peer or built by hand.
    pub fn check(&self) -> Result<(), ScheduleError> {
        match self {
            Self::Every { every_ms } => {
                let d = Duration::from_millis(*every_ms);
                if !(MIN_EVERY..=MAX_EVERY).contains(&d) {
                    return Err(ScheduleError::Every(format!("{d:?}")));
                }
                Ok(())
            }
            Self::Cron { expr, tz } => {
                if expr.len() > MAX_SCHEDULE_BYTES || tz.len() > MAX_SCHEDULE_BYTES {
                    return Err(ScheduleError::TooLong);
                }
                let (cron, zone) = parse_cron(expr, tz)?;
                let start = jiff::Timestamp::UNIX_EPOCH.to_zoned(zone);
                match cron.find_next_occurrence(&start, false) {
                    Ok(_) => Ok(()),
                    Err(_) => Err(ScheduleError::Never(expr.clone())),
                }
            }
        }
    }

    /// The first due time strictly after `t`, for a routine created at `anchor`; `None` if
    /// there is none (a cron expression past its last match, or a bad stored schedule).
    pub fn next_after(&self, anchor: Millis, t: Millis) -> Option<Millis> {
        match self {
            Self::Every { every_ms } => {
                let every = i64::try_from(*every_ms).ok().filter(|e| *e > 0)?;
                if t < anchor {
                    return anchor.checked_add(every);
                }
                let k = (t - anchor) / every + 1;
                anchor.checked_add(k.checked_mul(every)?)
            }
            Self::Cron { expr, tz } => {
                let (cron, zone) = parse_cron(expr, tz).ok()?;
                let start = jiff::Timestamp::from_millisecond(t).ok()?.to_zoned(zone);
                let next = cron.find_next_occurrence(&start, false).ok()?;
                Some(next.timestamp().as_millisecond())
            }
        }
    }

    /// The schedule in words, for lists.
    pub fn describe(&self) -> String {
        match self {
            Self::Every { every_ms } => {
                format!(
                    "every {}",
                    crate::time::human_duration(Duration::from_millis(*every_ms))
                )
            }
            Self::Cron { expr, tz } => format!("cron \"{expr}\" ({tz})"),
        }
    }
}

fn parse_cron(expr: &str, tz: &str) -> Result<(croner::Cron, jiff::tz::TimeZone), ScheduleError> {
    let zone = jiff::tz::TimeZone::get(tz).map_err(|_| ScheduleError::Zone(tz.to_owned()))?;
    let cron = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| ScheduleError::Cron {
            expr: expr.to_owned(),
            why: e.to_string(),
        })?;
    Ok((cron, zone))
}

/// What a desktop does with occurrences it could not run on time (it was off, asleep, or the
/// routine reached it late).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Run only what is on time; every late occurrence is missed.
    Skip,
    /// Run the newest due occurrence once; the others are missed.
    #[default]
    Once,
    /// Run the newest ones up to the routine's cap; the rest are missed.
    All,
}

impl CatchUp {
    /// The policy's name in the document and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::Once => "once",
            Self::All => "all",
        }
    }
}

impl FromStr for CatchUp {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Self, ScheduleError> {
        match s {
            "skip" => Ok(Self::Skip),
            "once" => Ok(Self::Once),
            "all" => Ok(Self::All),
            other => Err(ScheduleError::CatchUp(other.to_owned())),
        }
    }
}

impl fmt::Display for CatchUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happened to a routine, in its history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RoutineEventKind {
    /// Request: stop creating occurrences.
    Paused,
    /// Request: create occurrences again, from now on.
    Resumed,
    /// Request: the routine is gone; nothing more is created.
    Deleted,
    /// Fact (the target desktop): due occurrences that did not run.
    Missed {
        /// The first missed due time.
        first: Millis,
        /// The last missed due time.
        last: Millis,
        /// How many due times from `first` to `last` were missed.
        count: u64,
    },
}

impl RoutineEventKind {
    /// The kind's name in the document.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Paused => "paused",
            Self::Resumed => "resumed",
            Self::Deleted => "deleted",
            Self::Missed { .. } => "missed",
        }
    }

    /// True for what only the target desktop writes.
    pub fn is_fact(&self) -> bool {
        matches!(self, Self::Missed { .. })
    }
}

/// One entry of a routine's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutineEvent {
    /// When, by the writer's clock.
    pub at: Millis,
    /// Who wrote it (from the op's actor).
    pub author: DeviceId,
    /// What.
    #[serde(flatten)]
    pub kind: RoutineEventKind,
}

/// A routine as the thread holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routine {
    /// Its id; its ULID time is its creation time.
    pub id: RoutineId,
    /// What each occurrence does.
    pub instruction: String,
    /// Which executor of the target runs it.
    pub executor: String,
    /// The desktop that runs it.
    pub target: DeviceId,
    /// Who created it.
    pub author: DeviceId,
    /// When it was created (the anchor of an interval).
    pub created_at: Millis,
    /// When it is due.
    pub schedule: Schedule,
    /// What happens to occurrences that could not run on time.
    pub catch_up: CatchUp,
    /// With `catch_up = all`: most missed occurrences run after one gap.
    pub catch_up_cap: u32,
    /// Its history, in list order.
    pub events: Vec<RoutineEvent>,
}

/// Whether a routine creates occurrences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutineState {
    /// It runs on schedule.
    Active,
    /// Paused by a request; resumable.
    Paused,
    /// Deleted: it never runs again.
    Deleted,
}

impl RoutineState {
    /// The state's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Paused => "paused",
            Self::Deleted => "deleted",
        }
    }
}

impl Routine {
    /// Its state: deleted once any device deleted it; otherwise the last pause or resume in
    /// list order decides (the same on every replica once they have merged).
    pub fn state(&self) -> RoutineState {
        let mut state = RoutineState::Active;
        for e in self.requests() {
            match e.kind {
                RoutineEventKind::Deleted => return RoutineState::Deleted,
                RoutineEventKind::Paused => state = RoutineState::Paused,
                RoutineEventKind::Resumed => state = RoutineState::Active,
                RoutineEventKind::Missed { .. } => {}
            }
        }
        state
    }

    /// The requests that count (pause, resume, delete from any device).
    pub fn requests(&self) -> impl Iterator<Item = &RoutineEvent> {
        self.events.iter().filter(|e| !e.kind.is_fact())
    }

    /// The `missed` facts that count: only the target's, each range once (a desktop that
    /// stopped between recording a range and remembering it records it again).
    pub fn missed(&self) -> impl Iterator<Item = (Millis, Millis, u64)> + '_ {
        let mut seen = std::collections::BTreeSet::new();
        self.events
            .iter()
            .filter(|e| e.author == self.target)
            .filter_map(|e| match e.kind {
                RoutineEventKind::Missed { first, last, count } => Some((first, last, count)),
                _ => None,
            })
            .filter(move |(first, last, _)| seen.insert((*first, *last)))
    }

    /// Occurrences missed in all, by the target's facts.
    pub fn missed_total(&self) -> u64 {
        self.missed().map(|(_, _, n)| n).sum()
    }

    /// When the last resume that counts was written (0 if none): due times before it that
    /// fell in a pause are not occurrences.
    pub fn resumed_at(&self) -> Millis {
        self.requests()
            .filter(|e| e.kind == RoutineEventKind::Resumed)
            .map(|e| e.at)
            .max()
            .unwrap_or(0)
    }

    /// True if `task` is one of this routine's occurrences: its id carries the routine's
    /// random bits, and the routine's desktop wrote it (nobody else may create one).
    pub fn is_occurrence(&self, task: &crate::Task) -> bool {
        task.id.random_bits() == self.id.random_bits() && task.author == self.target
    }

    /// The next due time strictly after `t` (none once deleted or paused).
    pub fn next_after(&self, t: Millis) -> Option<Millis> {
        match self.state() {
            RoutineState::Active => self.schedule.next_after(self.created_at, t),
            _ => None,
        }
    }
}

/// The id of the task for `routine`'s occurrence due at `scheduled_at`: its ULID time is the
/// due time and its random part the routine's, so the same pair always gives the same id and
/// different routines never share one.
pub fn occurrence_id(routine: &RoutineId, scheduled_at: Millis) -> TaskId {
    TaskId::from_parts(scheduled_at, routine.random_bits())
}

/// A missed range, as a `missed` fact records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Missed {
    /// The first missed due time.
    pub first: Millis,
    /// The last.
    pub last: Millis,
    /// How many.
    pub count: u64,
}

/// What the desktop does for one routine when it wakes ([`plan`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Due times to run now, oldest first.
    pub run: Vec<Millis>,
    /// Due times that will not run, as one fact.
    pub missed: Option<Missed>,
    /// Every due time up to here is handled (ran, missed, or fell in a pause).
    pub handled_until: Millis,
    /// The next due time after `handled_until`, if the routine is active.
    pub next: Option<Millis>,
}

/// How late an occurrence may start and still count as on time under `catch_up = skip`: half
/// the gap to the next due time, between 1 s and 60 s.
pub fn grace(schedule: &Schedule, anchor: Millis, due: Millis) -> Millis {
    let gap = schedule
        .next_after(anchor, due)
        .map_or(60_000, |n| (n - due) / 2);
    gap.clamp(1_000, 60_000)
}

/// The desktop's plan for `routine` at `now`, when every due time up to `handled_until` is
/// already handled. Due times in `(handled_until, now]` are run or missed by the routine's
/// catch-up policy; while the routine is paused they are not occurrences at all.
pub fn plan(routine: &Routine, handled_until: Millis, now: Millis) -> Plan {
    let state = routine.state();
    if state != RoutineState::Active {
        return Plan {
            handled_until: handled_until.max(now),
            ..Plan::default()
        };
    }
    // A pause ended by a resume: what fell due during it is not owed.
    let from = handled_until.max(routine.resumed_at().min(now));
    let anchor = routine.created_at;
    let mut due = Vec::new();
    let mut t = from;
    while due.len() < MAX_DUE_PER_PLAN {
        match routine.schedule.next_after(anchor, t) {
            Some(n) if n <= now => {
                due.push(n);
                t = n;
            }
            _ => break,
        }
    }
    let handled_until = due.last().copied().unwrap_or(from).max(from);
    let keep = match routine.catch_up {
        CatchUp::Once => due.len().min(1),
        CatchUp::All => due.len().min(routine.catch_up_cap.max(1) as usize),
        CatchUp::Skip => due
            .iter()
            .rev()
            .take_while(|d| now - **d <= grace(&routine.schedule, anchor, **d))
            .count(),
    };
    let run = due.split_off(due.len() - keep);
    let missed = (!due.is_empty()).then(|| Missed {
        first: due[0],
        last: due[due.len() - 1],
        count: due.len() as u64,
    });
    Plan {
        run,
        missed,
        handled_until,
        next: routine.schedule.next_after(anchor, handled_until.max(now)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEVICE: &str = "12D3KooWGzBpS7L6Fp9sQsRLd5kJ9y3rN7tqPHqHbW1rLWGxvjh8";

    fn ms(s: &str) -> Millis {
        s.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    fn at(s: &str, tz: &str) -> Millis {
        jiff::civil::DateTime::from_str(s)
            .unwrap()
            .to_zoned(jiff::tz::TimeZone::get(tz).unwrap())
            .unwrap()
            .timestamp()
            .as_millisecond()
    }

    fn routine(schedule: Schedule, catch_up: CatchUp) -> Routine {
        let device: DeviceId = DEVICE.parse().unwrap();
        Routine {
            id: RoutineId::new_at(1_000),
            instruction: "x".into(),
            executor: "shell".into(),
            target: device.clone(),
            author: device,
            created_at: 1_000,
            schedule,
            catch_up,
            catch_up_cap: 3,
            events: Vec::new(),
        }
    }

    fn next_n(s: &Schedule, from: Millis, n: usize) -> Vec<Millis> {
        let mut out = Vec::new();
        let mut t = from;
        for _ in 0..n {
            t = s.next_after(0, t).unwrap();
            out.push(t);
        }
        out
    }

    /// Next cron times as a pure function, against a table of cases: a DST change in the
    /// routine's zone (both directions), the last day of the month, and a leap day.
    #[test]
    fn cron_next_times_table() {
        struct Case {
            what: &'static str,
            expr: &'static str,
            tz: &'static str,
            after: Millis,
            want: Vec<Millis>,
        }
        let b = "Europe/Berlin";
        let ny = "America/New_York";
        let cases = [
            Case {
                what: "weekdays at 8 in Berlin, across the spring change (29 March 2026)",
                expr: "0 8 * * 1-5",
                tz: b,
                after: at("2026-03-26T09:00", b),
                // Friday 27th at 08:00 CET (07:00Z), then Monday 30th at 08:00 CEST (06:00Z).
                want: vec![ms("2026-03-27T07:00:00Z"), ms("2026-03-30T06:00:00Z")],
            },
            Case {
                what: "02:30 daily: the spring gap in Berlin runs it at the first valid time",
                expr: "30 2 * * *",
                tz: b,
                after: at("2026-03-28T12:00", b),
                want: vec![
                    ms("2026-03-29T01:00:00Z"), // 03:00 CEST, right after the gap
                    ms("2026-03-30T00:30:00Z"), // 02:30 CEST
                ],
            },
            Case {
                what: "01:30 daily: the autumn overlap in New York runs it once",
                expr: "30 1 * * *",
                tz: ny,
                after: at("2026-10-31T12:00", ny),
                want: vec![
                    ms("2026-11-01T05:30:00Z"), // 01:30 EDT, the first pass
                    ms("2026-11-02T06:30:00Z"), // 01:30 EST
                ],
            },
            Case {
                what: "hourly across the autumn overlap: both passes of 01:00",
                expr: "0 * * * *",
                tz: ny,
                after: at("2026-11-01T00:30", ny),
                want: vec![
                    ms("2026-11-01T05:00:00Z"), // 01:00 EDT
                    ms("2026-11-01T06:00:00Z"), // 01:00 EST
                    ms("2026-11-01T07:00:00Z"), // 02:00 EST
                ],
            },
            Case {
                what: "the last day of each month (L)",
                expr: "0 9 L * *",
                tz: "UTC",
                after: ms("2027-01-15T00:00:00Z"),
                want: vec![
                    ms("2027-01-31T09:00:00Z"),
                    ms("2027-02-28T09:00:00Z"),
                    ms("2027-03-31T09:00:00Z"),
                    ms("2027-04-30T09:00:00Z"),
                ],
            },
            Case {
                what: "the last day of February in a leap year",
                expr: "0 9 L 2 *",
                tz: b,
                after: ms("2027-06-01T00:00:00Z"),
                want: vec![at("2028-02-29T09:00", b), at("2029-02-28T09:00", b)],
            },
            Case {
                what: "a leap day: 29 February only",
                expr: "0 12 29 2 *",
                tz: "UTC",
                after: ms("2026-12-05T00:00:00Z"),
                want: vec![ms("2028-02-29T12:00:00Z"), ms("2032-02-29T12:00:00Z")],
            },
            Case {
                what: "six fields: every 2 seconds",
                expr: "*/2 * * * * *",
                tz: "UTC",
                after: ms("2026-12-05T10:00:01Z"),
                want: vec![ms("2026-12-05T10:00:02Z"), ms("2026-12-05T10:00:04Z")],
            },
        ];
        for c in cases {
            let s = Schedule::cron(c.expr, c.tz).unwrap();
            let got = next_n(&s, c.after, c.want.len());
            let show = |v: &[Millis]| -> Vec<String> {
                v.iter().map(|t| crate::time::rfc3339(*t)).collect()
            };
            assert_eq!(show(&got), show(&c.want), "{}", c.what);
        }
    }

    #[test]
    fn bad_schedules_say_why() {
        assert!(matches!(
            Schedule::cron("61 * * * *", "UTC"),
            Err(ScheduleError::Cron { .. })
        ));
        assert!(matches!(
            Schedule::cron("0 8 * * *", "Mars/Olympus"),
            Err(ScheduleError::Zone(_))
        ));
        assert!(matches!(
            Schedule::cron("0 0 30 2 *", "UTC"),
            Err(ScheduleError::Never(_)) | Err(ScheduleError::Cron { .. })
        ));
        assert!(Schedule::every(Duration::from_millis(10)).is_err());
        assert!("sometimes".parse::<CatchUp>().is_err());
    }

    #[test]
    fn intervals_count_from_creation() {
        let s = Schedule::every(Duration::from_secs(2)).unwrap();
        assert_eq!(s.next_after(1_000, 0), Some(3_000));
        assert_eq!(s.next_after(1_000, 1_000), Some(3_000));
        assert_eq!(s.next_after(1_000, 2_999), Some(3_000));
        assert_eq!(s.next_after(1_000, 3_000), Some(5_000));
    }

    #[test]
    fn occurrence_ids_are_stable_and_distinct() {
        let a = RoutineId::new_at(5);
        let b = RoutineId::new_at(5);
        assert_eq!(occurrence_id(&a, 10_000), occurrence_id(&a, 10_000));
        assert_ne!(occurrence_id(&a, 10_000), occurrence_id(&a, 12_000));
        assert_ne!(occurrence_id(&a, 10_000), occurrence_id(&b, 10_000));
        assert_eq!(occurrence_id(&a, 10_000).timestamp_ms(), 10_000);
    }

    #[test]
    fn catch_up_policies() {
        let every = Schedule::every(Duration::from_secs(2)).unwrap();
        // Due at 3, 5, 7, 9 and 11 s; handled up to 3 s, now 11.2 s.
        let once = plan(&routine(every.clone(), CatchUp::Once), 3_000, 11_200);
        assert_eq!(once.run, vec![11_000]);
        assert_eq!(
            once.missed,
            Some(Missed {
                first: 5_000,
                last: 9_000,
                count: 3
            })
        );
        assert_eq!(once.handled_until, 11_000);
        assert_eq!(once.next, Some(13_000));

        let all = plan(&routine(every.clone(), CatchUp::All), 3_000, 11_200);
        assert_eq!(all.run, vec![7_000, 9_000, 11_000]);
        assert_eq!(all.missed.map(|m| m.count), Some(1));

        let skip = plan(&routine(every.clone(), CatchUp::Skip), 3_000, 11_200);
        assert_eq!(skip.run, vec![11_000]);
        assert_eq!(skip.missed.map(|m| m.count), Some(3));
        let late = plan(&routine(every.clone(), CatchUp::Skip), 3_000, 12_500);
        assert!(late.run.is_empty(), "1.5 s late is past half the interval");

        // Nothing due: nothing to do, handled stays.
        let idle = plan(&routine(every.clone(), CatchUp::Once), 11_000, 12_000);
        assert_eq!(
            idle,
            Plan {
                run: vec![],
                missed: None,
                handled_until: 11_000,
                next: Some(13_000)
            }
        );
    }

    #[test]
    fn paused_routines_owe_nothing() {
        let every = Schedule::every(Duration::from_secs(2)).unwrap();
        let mut r = routine(every, CatchUp::Once);
        let device = r.target.clone();
        let ev = |at, kind| RoutineEvent {
            at,
            author: device.clone(),
            kind,
        };
        r.events.push(ev(4_000, RoutineEventKind::Paused));
        assert_eq!(r.state(), RoutineState::Paused);
        let p = plan(&r, 3_000, 20_000);
        assert!(p.run.is_empty() && p.missed.is_none());
        assert_eq!(p.handled_until, 20_000);
        // Resumed at 20 s: only what falls due after it counts.
        r.events.push(ev(20_000, RoutineEventKind::Resumed));
        assert_eq!(r.state(), RoutineState::Active);
        let p = plan(&r, 3_000, 23_500);
        assert_eq!(p.run, vec![23_000]);
        assert_eq!(p.missed.map(|m| m.count), Some(1)); // 21 s
        r.events.push(ev(30_000, RoutineEventKind::Deleted));
        r.events.push(ev(31_000, RoutineEventKind::Resumed));
        assert_eq!(r.state(), RoutineState::Deleted);
    }

    #[test]
    fn missed_facts_count_only_from_the_target() {
        let every = Schedule::every(Duration::from_secs(2)).unwrap();
        let mut r = routine(every, CatchUp::Once);
        let other: DeviceId = "12D3KooWRBy97UB99e3J6hiPesre1MZeuNQvfan4gBziswrRJsNK"
            .parse()
            .unwrap();
        let m = RoutineEventKind::Missed {
            first: 1,
            last: 2,
            count: 2,
        };
        r.events.push(RoutineEvent {
            at: 5,
            author: other,
            kind: m.clone(),
        });
        assert_eq!(r.missed_total(), 0);
        r.events.push(RoutineEvent {
            at: 6,
            author: r.target.clone(),
            kind: m,
        });
        assert_eq!(r.missed_total(), 2);
    }
}
