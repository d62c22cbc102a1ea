//! `routine add|list|pause|resume|rm`: the same subcommand on both CLIs.

use std::time::Duration;

use errand_core::{CatchUp, DeviceKind, Schedule};

use super::{Opened, Show, printable, show};
use crate::api::{
    AddRoutine, ApiError, ChangeRoutine, ListRoutines, RoutineChange, RoutineInfo, exit,
};

/// What to do with routines.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum RoutineCommand {
    /// Create a routine: an instruction the desktop runs on a schedule, as ordinary tasks.
    ///
    /// Works offline: it reaches the desktop with the next sync.
    #[command(
        after_help = "Examples:\n  routine add \"summarise ~/inbox\" --cron \"0 8 * * 1-5\" --tz Europe/Berlin\n  routine add \"df -h\" --every 1h"
    )]
    Add {
        /// The instruction each occurrence runs.
        text: String,
        /// Run it at this interval, counted from now (`30s`, `15m`, `1h`, `1d`).
        #[arg(long, value_parser = super::parse_duration, conflicts_with = "cron", required_unless_present = "cron")]
        every: Option<Duration>,
        /// Run it when this cron expression matches: `MIN HOUR DAY MONTH WEEKDAY`, or six
        /// fields with seconds first; `L` is the last day of the month.
        #[arg(long, value_name = "EXPR")]
        cron: Option<String>,
        /// The time zone of `--cron` (an IANA name such as Europe/Berlin).
        #[arg(long, default_value = "UTC", requires = "cron", value_name = "ZONE")]
        tz: String,
        /// Occurrences the desktop could not run on time (it was off or asleep): `skip` them,
        /// run the newest `once`, or run `all` of them up to `--catch-up-cap`. Every one that
        /// does not run is recorded as missed.
        #[arg(long, default_value = "once", value_parser = parse_catch_up)]
        catch_up: CatchUp,
        /// With `--catch-up all`: most missed occurrences run after one gap.
        #[arg(long, value_name = "N")]
        catch_up_cap: Option<u32>,
        /// Which of the desktop's executors runs it (default: its first).
        #[arg(long, short = 'e')]
        executor: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the routines with their last and next occurrence.
    List {
        /// Deleted routines too.
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pause a routine: no occurrences until it is resumed.
    Pause {
        /// The routine's id (or a unique prefix of it).
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resume a paused routine from now on (what fell due during the pause is not owed).
    Resume {
        /// The routine's id (or a unique prefix of it).
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a routine for good. Its past occurrences stay in the thread.
    Rm {
        /// The routine's id (or a unique prefix of it).
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_catch_up(s: &str) -> Result<CatchUp, String> {
    s.parse()
        .map_err(|e: errand_core::ScheduleError| e.to_string())
}

/// Runs a routine command on the opened home (or through its daemon) and prints the answer.
pub async fn run(opened: &Opened, cmd: RoutineCommand, cli: DeviceKind) -> Result<(), ApiError> {
    let change = |id, change, json| (ChangeRoutine { id, change }, json);
    let (call, json) = match cmd {
        RoutineCommand::Add {
            text,
            every,
            cron,
            tz,
            catch_up,
            catch_up_cap,
            executor,
            json,
        } => {
            let schedule = match (every, cron) {
                (Some(every), _) => Schedule::every(every),
                (None, Some(expr)) => Schedule::cron(&expr, &tz),
                (None, None) => {
                    return Err(ApiError::with_code(
                        exit::USAGE,
                        "give --every DURATION or --cron EXPR".to_owned(),
                    ));
                }
            }
            .map_err(|e| ApiError::with_code(exit::USAGE, e.to_string()))?;
            let add = AddRoutine {
                text,
                executor,
                schedule,
                catch_up,
                catch_up_cap,
            };
            return show(opened, add, json, cli).await;
        }
        RoutineCommand::List { all, json } => {
            return show(opened, ListRoutines { all }, json, cli).await;
        }
        RoutineCommand::Pause { id, json } => change(id, RoutineChange::Pause, json),
        RoutineCommand::Resume { id, json } => change(id, RoutineChange::Resume, json),
        RoutineCommand::Rm { id, json } => change(id, RoutineChange::Delete, json),
    };
    show(opened, call, json, cli).await
}

impl Show for RoutineInfo {
    fn show(&self, _: DeviceKind) {
        let last = match &self.last {
            Some(l) => format!(
                "last {} ({}, task {})",
                l.scheduled_at,
                serde_json::to_value(l.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                l.task_id
            ),
            None => "not run yet".to_owned(),
        };
        let next = match &self.next_at {
            Some(n) => format!("next {n}"),
            None => format!("{} (no next run)", self.state.name()),
        };
        let missed = if self.missed > 0 {
            format!(", {} missed", self.missed)
        } else {
            String::new()
        };
        println!(
            "{}  {}  {}\n    {}; {}{}; catch-up {}",
            self.id,
            printable(&self.schedule, false),
            printable(&self.instruction, false),
            next,
            last,
            missed,
            self.catch_up,
        );
    }
}

impl Show for Vec<RoutineInfo> {
    fn show(&self, cli: DeviceKind) {
        if self.is_empty() {
            println!("no routines (create one with `routine add TEXT --every 1h`)");
        }
        for r in self {
            r.show(cli);
        }
    }
}
