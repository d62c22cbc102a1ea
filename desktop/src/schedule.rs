//! The scheduler: turns this desktop's routines into tasks as they fall due.
//!
//! Each pass reads the routines that target this desktop, and for each asks
//! [`errand_core::routine::plan`] what is due since the last handled time: occurrences to run
//! become ordinary tasks with derived ids (the runner picks them up like any other), and what
//! the catch-up policy does not run becomes one `missed` fact. The handled time is kept in
//! the home's redb file after the writes it covers, so a desktop killed at any point never
//! creates an occurrence twice (its id already exists) and never drops one silently (it is
//! planned again, and a range recorded twice counts once).

use std::{collections::HashMap, time::Duration};

use errand_core::{
    Routine, RoutineEventKind, RoutineId,
    routine::{self, MAX_ACTIVE_ROUTINES, Plan},
    time::Millis,
};
use errand_crdt::{Store, StoreError, tables::ROUTINE_HANDLED};
use errand_p2p::peer::{Peer, now_ms};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long to wait after a failed pass before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// How long a change waits before the pass it wakes: routines are on a grid of seconds, while
/// the moment after a change is when the sync sessions push it and the runner reads its
/// tasks, and a pass then would only stand in their way. Changes in that time share one pass.
const SETTLE: Duration = Duration::from_millis(25);

/// Runs until `shutdown`.
pub(crate) async fn run(peer: Peer, shutdown: CancellationToken) {
    let mut changes = peer.replica().subscribe_changes();
    let mut handled: HashMap<RoutineId, Millis> = HashMap::new();
    loop {
        let next = match pass(&peer, &mut handled).await {
            Ok(next) => next,
            Err(e) => {
                warn!(error = %e, "the scheduler could not look at the routines; trying again shortly");
                Some(now_ms() + RETRY_AFTER.as_millis() as i64)
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = sleep_until(next) => {}
            changed = wait_change(&mut changes) => if changed.is_err() { break },
        }
    }
}

async fn wait_change(changes: &mut watch::Receiver<u64>) -> Result<(), watch::error::RecvError> {
    changes.changed().await?;
    tokio::time::sleep(SETTLE).await;
    changes.borrow_and_update();
    Ok(())
}

async fn sleep_until(at: Option<Millis>) {
    match at {
        Some(at) => {
            let ms = (at - now_ms()).max(0) as u64;
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        None => std::future::pending().await,
    }
}

/// One look at every routine: what is due is run or recorded as missed. Returns the next due
/// time of any of them.
async fn pass(
    peer: &Peer,
    handled: &mut HashMap<RoutineId, Millis>,
) -> Result<Option<Millis>, Box<dyn std::error::Error + Send + Sync>> {
    let me = peer.device_id();
    let routines: Vec<Routine> = peer
        .replica()
        .read(move |d| {
            d.routines()
                .into_iter()
                .filter(|r| r.target == me)
                .collect()
        })
        .await?;
    let mut next: Option<Millis> = None;
    let active = routines
        .iter()
        .filter(|r| r.state() == errand_core::RoutineState::Active)
        .count();
    if active > MAX_ACTIVE_ROUTINES {
        warn!(
            active,
            max = MAX_ACTIVE_ROUTINES,
            "more active routines than this desktop runs: the newest wait until older ones are paused or deleted"
        );
    }
    let mut running = 0;
    for r in routines {
        if r.state() == errand_core::RoutineState::Active {
            running += 1;
            if running > MAX_ACTIVE_ROUTINES {
                continue;
            }
        }
        let since = match handled.get(&r.id) {
            Some(t) => *t,
            None => {
                // First sight in this process: where the last run left off, past any
                // occurrence it created without remembering it.
                let id = r.id;
                let stored = peer
                    .replica()
                    .store_blocking(move |s| load_handled(s, &id))
                    .await??;
                let start = match stored {
                    Some(t) => t,
                    None => from_thread(peer, &r).await?,
                };
                skip_existing(peer, &r, start).await?
            }
        };
        let now = now_ms();
        let plan = routine::plan(&r, since, now);
        apply(peer, &r, &plan).await?;
        // A paused or deleted routine owes nothing, and its resume bounds what it owes
        // after: only an active one's progress is worth a write.
        if plan.handled_until != since && r.state() == errand_core::RoutineState::Active {
            let (id, until) = (r.id, plan.handled_until);
            peer.replica()
                .store_blocking(move |s| save_handled(s, &id, until))
                .await??;
        }
        handled.insert(r.id, plan.handled_until);
        if let Some(n) = plan.next {
            next = Some(next.map_or(n, |m: Millis| m.min(n)));
        }
    }
    Ok(next)
}

/// Where a routine this home has no record of stands, by the thread: its newest occurrence
/// or missed range (a desktop moved to a new home by `import` carries no scheduler state),
/// else its creation.
async fn from_thread(
    peer: &Peer,
    r: &Routine,
) -> Result<Millis, Box<dyn std::error::Error + Send + Sync>> {
    let routine = r.clone();
    let newest_occurrence = peer
        .replica()
        .read(move |d| {
            let mut newest = None;
            d.each_task(|t| {
                if routine.is_occurrence(&t) {
                    newest = newest.max(Some(t.id.timestamp_ms()));
                }
            });
            newest
        })
        .await?;
    let newest_missed = r.missed().map(|(_, last, _)| last).max();
    Ok([Some(r.created_at), newest_occurrence, newest_missed]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(r.created_at))
}

/// Moves past occurrences that exist already: a desktop stopped after creating one and
/// before remembering it finds it here, and plans from after it.
async fn skip_existing(
    peer: &Peer,
    r: &Routine,
    mut since: Millis,
) -> Result<Millis, Box<dyn std::error::Error + Send + Sync>> {
    while let Some(due) = r.schedule.next_after(r.created_at, since) {
        if due > now_ms() {
            break;
        }
        let id = routine::occurrence_id(&r.id, due);
        // Loads the segment that holds it, if the index knows one.
        let _ = peer.replica().ensure_task_loaded(id).await;
        let exists = peer
            .replica()
            .read(move |d| d.task_segment(&id).is_some())
            .await?;
        if !exists {
            break;
        }
        since = due;
    }
    Ok(since)
}

async fn apply(
    peer: &Peer,
    r: &Routine,
    plan: &Plan,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if let Some(m) = plan.missed {
        info!(
            routine = %r.id,
            count = m.count,
            first = %errand_core::time::rfc3339(m.first),
            last = %errand_core::time::rfc3339(m.last),
            policy = r.catch_up.name(),
            "occurrences missed while this desktop was away"
        );
        peer.routine_event(
            r.id,
            RoutineEventKind::Missed {
                first: m.first,
                last: m.last,
                count: m.count,
            },
        )
        .await?;
    }
    for due in &plan.run {
        match peer.enqueue_occurrence(r.clone(), *due).await? {
            Some(task) => debug!(
                routine = %r.id,
                %task,
                due = %errand_core::time::rfc3339(*due),
                "occurrence created"
            ),
            None => debug!(routine = %r.id, "occurrence exists already"),
        }
    }
    Ok(())
}

fn load_handled(store: &Store, id: &RoutineId) -> Result<Option<Millis>, StoreError> {
    let key = id.to_string();
    store
        .read_table(ROUTINE_HANDLED, |t| {
            Ok(t.get(key.as_str())?.map(|v| v.value()))
        })
        .map(Option::flatten)
}

fn save_handled(store: &Store, id: &RoutineId, until: Millis) -> Result<(), StoreError> {
    let key = id.to_string();
    store.write(|txn| {
        let mut t = txn.table(ROUTINE_HANDLED)?;
        t.insert(key.as_str(), until)?;
        Ok(())
    })
}
