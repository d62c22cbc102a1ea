//! [`PhoneClient`]: one phone home, its peer and the runtime the peer runs on.
//!
//! - Every method is blocking and returns quickly except `pair` and `sync_once`, which wait on
//!   the network (bounded). Call them off the UI thread.
//! - Local writes (`send_task`, `approve`, …) return once durable on this phone. They never
//!   wait for the network; sync runs in the background whenever the desktop is reachable.
//! - Work runs on the client's own runtime, and the calling thread waits for it. So any thread
//!   may call, including a listener callback.

use std::{
    future::Future,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use errand_core::{DeviceKind, TaskId};
use errand_p2p::{
    api::{self, Action, Call as _},
    peer::{Peer, PeerConfig, parse_addr, parse_peer_id},
};
use tokio::{runtime::Runtime, sync::broadcast::error::RecvError};
use tokio_util::sync::CancellationToken;

use crate::{
    error::ErrandError,
    listener::{self, Subscription, ThreadListener},
    types::{
        DesktopStatus, FetchedFile, MessageView, OpenOptions, PairResult, RoutineView, StatusView,
        TaskView, ThreadView,
    },
};

/// Runtime worker threads. The bridge does little CPU work on them (Automerge and redb run on
/// blocking threads), and a phone should not get one thread per core for a background peer.
const WORKER_THREADS: usize = 2;
/// Listen address when the options give none: all interfaces, TCP, a port the OS picks.
const DEFAULT_LISTEN: &str = "/ip4/0.0.0.0/tcp/0";
/// How often `sync_once` rechecks in-sync-ness between events. A local commit does not emit
/// a peer event that says "no longer in sync", so a short poll keeps the answer truthful.
const SYNC_POLL: Duration = Duration::from_millis(100);
/// After the network has closed, how long `shutdown` lets leftover tasks (a redb write on a
/// blocking thread) finish before abandoning them. A committed write is durable either way.
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// The phone: queue tasks for the desktop and follow them, online or not.
#[derive(uniffi::Object)]
pub struct PhoneClient {
    /// `None` once shut down.
    peer: RwLock<Option<Peer>>,
    /// `None` once shut down.
    rt: Mutex<Option<Runtime>>,
    /// Parent of every subscription's token.
    closing: CancellationToken,
}

impl std::fmt::Debug for PhoneClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhoneClient")
            .field("peer", &self.peer.read().ok().and_then(|p| p.clone()))
            .finish_non_exhaustive()
    }
}

#[uniffi::export]
impl PhoneClient {
    /// Opens (or creates) the phone home at `home` and starts the network in the background:
    /// listening on all interfaces with mDNS on. `name` is how the desktop shows this phone
    /// (empty: keep the stored name). Fails with `Storage` if another process holds the home.
    #[uniffi::constructor]
    pub fn open(home: String, name: String) -> Result<Arc<Self>, ErrandError> {
        Self::open_with(home, name, OpenOptions::default())
    }

    /// [`PhoneClient::open`] with network options (listen addresses, mDNS).
    #[uniffi::constructor]
    pub fn open_with(
        home: String,
        name: String,
        options: OpenOptions,
    ) -> Result<Arc<Self>, ErrandError> {
        if home.trim().is_empty() {
            return Err(ErrandError::invalid("the home directory is empty"));
        }
        let listen = if options.listen.is_empty() {
            vec![parse_addr(DEFAULT_LISTEN)?]
        } else {
            options
                .listen
                .iter()
                .map(|a| parse_addr(a))
                .collect::<Result<_, _>>()?
        };
        let name = Some(name.trim().to_owned()).filter(|n| !n.is_empty());
        let peer = Peer::open(PeerConfig {
            home: home.into(),
            kind: DeviceKind::Phone,
            name,
            listen,
            mdns: options.mdns,
            relays: Vec::new(),
            relay_only: false,
            blob_caps: Default::default(),
        })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name("errand-mobile")
            .enable_all()
            .build()
            .map_err(|e| ErrandError::internal(format!("cannot start the runtime: {e}")))?;
        let p = peer.clone();
        rt.spawn(async move {
            if let Err(e) = p.start().await {
                // `pair` and `sync_once` start it again and report the error.
                tracing::warn!(error = %e, "the network did not start");
            }
        });
        Ok(Arc::new(Self {
            peer: RwLock::new(Some(peer)),
            rt: Mutex::new(Some(rt)),
            closing: CancellationToken::new(),
        }))
    }

    /// Pairs with the desktop that showed `ticket` (the `errand:` text of its QR code), then
    /// waits for the first sync (bounded). Fails with `InvalidInput` for a bad, used or
    /// expired ticket, `Unreachable` when the desktop cannot be reached.
    pub fn pair(&self, ticket: String) -> Result<PairResult, ErrandError> {
        let ticket: errand_core::Ticket = ticket
            .trim()
            .parse()
            .map_err(|e| ErrandError::invalid(format!("bad ticket: {e}")))?;
        self.run(move |peer| async move {
            peer.start().await?;
            Ok(api::PairWith::pair(&peer, &ticket).await?)
        })
    }

    /// Queues a task for the desktop and returns its id once it is durable on this phone.
    /// Never waits for the network. `executor`: one the desktop advertises (default: its
    /// first). `not_after_ms`: the desktop cancels it instead of running it after this time.
    pub fn send_task(
        &self,
        text: String,
        executor: Option<String>,
        not_after_ms: Option<i64>,
    ) -> Result<TaskId, ErrandError> {
        let send = api::SendTask {
            text,
            executor,
            not_after: not_after_ms,
            attach: Vec::new(),
        };
        send.validate()
            .map_err(|e| ErrandError::from_api(e, ErrandError::invalid_kind))?;
        self.run(move |peer| async move {
            require_thread(&peer)?;
            let sent = send
                .run(&peer)
                .await
                .map_err(|e| ErrandError::from_api(e, ErrandError::storage_kind))?;
            Ok(sent.task_id)
        })
    }

    /// Like [`Self::send_task`], with files: each path is copied into this phone's home at
    /// once (so the task can wait offline, and the file may go away), and referenced by the
    /// task under its plain file name. Up to 32 files of up to 1 GiB each.
    pub fn send_task_with_attachments(
        &self,
        text: String,
        executor: Option<String>,
        not_after_ms: Option<i64>,
        files: Vec<String>,
    ) -> Result<TaskId, ErrandError> {
        let send = api::SendTask {
            text,
            executor,
            not_after: not_after_ms,
            attach: files.into_iter().map(std::path::PathBuf::from).collect(),
        };
        send.validate()
            .map_err(|e| ErrandError::from_api(e, ErrandError::invalid_kind))?;
        self.run(move |peer| async move {
            require_thread(&peer)?;
            let sent = send
                .run(&peer)
                .await
                .map_err(|e| ErrandError::from_api(e, ErrandError::storage_kind))?;
            Ok(sent.task_id)
        })
    }

    /// Downloads the task's artifacts from the desktop into the folder `dir`, each verified
    /// against its hash, resuming what an earlier call left; waits up to `timeout_ms` for
    /// the desktop. Blocks until all are in place; `progress` (if given) hears how far each
    /// file is. Do not call the client from `progress`.
    pub fn fetch_artifacts(
        &self,
        task_id: TaskId,
        dir: String,
        timeout_ms: u64,
        progress: Option<std::sync::Arc<dyn crate::listener::FetchProgress>>,
    ) -> Result<Vec<FetchedFile>, ErrandError> {
        self.run(move |peer| async move {
            require_thread(&peer)?;
            peer.start().await?;
            let mut report = |f: &errand_core::BlobRef, done: u64, size: u64| {
                if let Some(p) = &progress {
                    p.on_progress(f.clone(), done, size);
                }
            };
            let fetched = api::files::fetch_artifacts(
                &peer,
                task_id,
                std::path::PathBuf::from(dir),
                std::time::Duration::from_millis(timeout_ms),
                &mut report,
            )
            .await
            .map_err(|e| ErrandError::from_api(e, ErrandError::storage_kind))?;
            Ok(fetched
                .files
                .into_iter()
                .map(|f| FetchedFile {
                    file: errand_core::BlobRef {
                        hash: f.hash,
                        name: f.name,
                        size: f.size,
                        mime: f.mime,
                    },
                    local_path: f.local_path.unwrap_or_default(),
                })
                .collect())
        })
    }

    /// The whole thread: every task and message.
    pub fn thread(&self) -> Result<ThreadView, ErrandError> {
        self.run(|peer| async move {
            require_thread(&peer)?;
            let thread = api::GetThread { all: false }
                .read(&peer)
                .await
                .map_err(|e| ErrandError::from_api(e, ErrandError::storage_kind))?;
            Ok(ThreadView {
                thread_id: thread.thread_id,
                tasks: thread.tasks.iter().map(TaskView::from).collect(),
                messages: thread.messages.iter().map(MessageView::from).collect(),
            })
        })
    }

    /// Pages back through the thread's history: up to `limit` tasks created before the task
    /// `before` (the newest when `None`), newest first. Older segments are loaded for the
    /// page and released after, so a long thread costs memory only while it is read.
    pub fn tasks_before(
        &self,
        before: Option<String>,
        limit: u32,
    ) -> Result<Vec<TaskView>, ErrandError> {
        let before = before.map(|b| parse_task_id(&b)).transpose()?;
        self.run(move |peer| async move {
            let tasks = peer.replica().tasks_before(before, limit as usize).await?;
            Ok(tasks.iter().map(TaskView::from).collect())
        })
    }

    /// One task. `InvalidInput` if the id is malformed or not in this thread (yet).
    pub fn task(&self, id: String) -> Result<TaskView, ErrandError> {
        let id = parse_task_id(&id)?;
        self.run(move |peer| async move {
            // Exit 1 from a read of one task is mostly "no such task (yet)".
            let task = api::GetTask { id }
                .read(&peer)
                .await
                .map_err(|e| ErrandError::from_api(e, ErrandError::invalid_kind))?;
            Ok(TaskView::from(&task))
        })
    }

    /// Approves a task that waits for approval.
    pub fn approve(&self, id: String) -> Result<(), ErrandError> {
        self.act(id, Action::Approve)
    }

    /// Denies a task that waits for approval.
    pub fn deny(&self, id: String) -> Result<(), ErrandError> {
        self.act(id, Action::Deny)
    }

    /// Asks the desktop to stop the task, or not to start it.
    pub fn cancel(&self, id: String) -> Result<(), ErrandError> {
        self.act(id, Action::Cancel)
    }

    /// Runs an ended task again, as a new attempt.
    pub fn retry(&self, id: String) -> Result<(), ErrandError> {
        self.act(id, Action::Retry)
    }

    /// Replies to an agent's task whose turn has ended: the reply becomes the agent's next
    /// prompt, in the same session. Stored at once, offline too; returns the attempt (the
    /// turn) it opens.
    pub fn reply(&self, id: String, text: String) -> Result<u32, ErrandError> {
        let id = parse_task_id(&id)?;
        self.run(move |peer| async move {
            require_thread(&peer)?;
            let replied = api::Reply { id, text }
                .run(&peer)
                .await
                .map_err(|e| ErrandError::from_api(e, ErrandError::invalid_kind))?;
            Ok(replied.attempt)
        })
    }

    /// Answers the permission request the task's agent waits on with an option id, or
    /// `allow` / `deny` for the first option of that kind. Returns the option id chosen.
    pub fn answer_permission(&self, id: String, option: String) -> Result<String, ErrandError> {
        let id = parse_task_id(&id)?;
        self.run(move |peer| async move {
            require_thread(&peer)?;
            let answered = api::Answer { id, option }
                .run(&peer)
                .await
                .map_err(|e| ErrandError::from_api(e, ErrandError::invalid_kind))?;
            Ok(answered.option)
        })
    }

    /// Creates a routine: an instruction the desktop runs on a schedule, each occurrence an
    /// ordinary task. Give `every_secs` (an interval from now) or `cron` (five fields, or six
    /// with seconds first) with `tz` (an IANA zone, default UTC). `catch_up`: `skip`, `once`
    /// (default) or `all` (up to `catch_up_cap`, default 10). Stored at once, offline too.
    #[allow(clippy::too_many_arguments)]
    pub fn create_routine(
        &self,
        text: String,
        executor: Option<String>,
        every_secs: Option<u64>,
        cron: Option<String>,
        tz: Option<String>,
        catch_up: Option<String>,
        catch_up_cap: Option<u32>,
    ) -> Result<RoutineView, ErrandError> {
        let schedule = match (every_secs, cron) {
            (Some(secs), None) => {
                errand_core::Schedule::every(std::time::Duration::from_secs(secs))
            }
            (None, Some(expr)) => {
                errand_core::Schedule::cron(&expr, tz.as_deref().unwrap_or("UTC"))
            }
            _ => {
                return Err(ErrandError::invalid(
                    "give either every_secs or cron".to_owned(),
                ));
            }
        }
        .map_err(|e| ErrandError::invalid(e.to_string()))?;
        let catch_up = match catch_up {
            Some(c) => c
                .parse()
                .map_err(|e: errand_core::ScheduleError| ErrandError::invalid(e.to_string()))?,
            None => errand_core::CatchUp::default(),
        };
        let add = api::AddRoutine {
            text,
            executor,
            schedule,
            catch_up,
            catch_up_cap,
        };
        self.run(move |peer| async move {
            require_thread(&peer)?;
            let info = add
                .run(&peer)
                .await
                .map_err(|e| ErrandError::from_api(e, ErrandError::invalid_kind))?;
            Ok(RoutineView::from(&info))
        })
    }

    /// The routines, with their last and next occurrence; deleted ones too with `all`.
    pub fn routines(&self, all: bool) -> Result<Vec<RoutineView>, ErrandError> {
        self.run(move |peer| async move {
            require_thread(&peer)?;
            let list = api::ListRoutines { all }
                .run(&peer)
                .await
                .map_err(|e| ErrandError::from_api(e, ErrandError::storage_kind))?;
            Ok(list.iter().map(RoutineView::from).collect())
        })
    }

    /// Pauses a routine (its id, or a prefix only it has). Stored at once, offline too.
    pub fn pause_routine(&self, id: String) -> Result<RoutineView, ErrandError> {
        self.change_routine(id, api::RoutineChange::Pause)
    }

    /// Resumes a paused routine from now on.
    pub fn resume_routine(&self, id: String) -> Result<RoutineView, ErrandError> {
        self.change_routine(id, api::RoutineChange::Resume)
    }

    /// Deletes a routine for good; its past occurrences stay in the thread.
    pub fn delete_routine(&self, id: String) -> Result<RoutineView, ErrandError> {
        self.change_routine(id, api::RoutineChange::Delete)
    }

    /// This phone, its thread and its desktop: connected, how, in sync, last sync.
    pub fn status(&self) -> Result<StatusView, ErrandError> {
        self.run(|peer| async move {
            let status = api::GetStatus
                .run(&peer)
                .await
                .map_err(|e| ErrandError::from_api(e, ErrandError::storage_kind))?;
            let trusted = peer.trusted_peers().await?;
            let mut desktops = Vec::new();
            for p in status
                .peers
                .into_iter()
                .filter(|p| p.kind == DeviceKind::Desktop)
            {
                let last_sync_at_ms = trusted
                    .iter()
                    .find(|t| t.id.as_str() == p.id)
                    .and_then(|t| t.last_sync_at);
                // The peer's own flag is not reset by a local commit; ask the replica, which
                // compares the desktop's last known heads with ours.
                let in_sync = match parse_peer_id(&p.id) {
                    Ok(pid) if p.connected => peer.replica().in_sync(pid).await,
                    _ => false,
                };
                desktops.push(DesktopStatus {
                    path: p.path,
                    id: p.id,
                    name: p.name,
                    connected: p.connected,
                    in_sync,
                    last_sync_at_ms,
                    revoked: p.revoked,
                });
            }
            Ok(StatusView {
                peer_id: status.peer_id,
                name: status.name,
                thread_id: status.thread_id,
                running: status.running,
                listen_addrs: status.listen_addrs,
                desktops,
            })
        })
    }

    /// Forgets the paired desktop (to pair with another one). The thread stays readable.
    /// Returns the forgotten desktops' ids.
    pub fn forget(&self) -> Result<Vec<String>, ErrandError> {
        self.run(|peer| async move {
            let forgotten = api::Forget
                .run(&peer)
                .await
                .map_err(|e| ErrandError::from_api(e, ErrandError::storage_kind))?;
            Ok(forgotten.forgotten)
        })
    }

    /// Connects to the desktop now and waits until the two are in sync, for at most
    /// `timeout_ms`. For the short background windows a phone OS grants. Returns false on
    /// timeout; `NotPaired` if there is no desktop.
    pub fn sync_once(&self, timeout_ms: u64) -> Result<bool, ErrandError> {
        self.run(move |peer| async move {
            let desktop = peer
                .trusted_peers()
                .await?
                .into_iter()
                .find(|t| t.kind == DeviceKind::Desktop && !t.revoked)
                .ok_or_else(|| {
                    ErrandError::not_paired("this phone has no desktop yet: pair first")
                })?;
            let pid = parse_peer_id(desktop.id.as_str())?;
            let mut events = peer.events();
            peer.start().await?;
            if !peer.is_connected(&pid) {
                // Skip the redial backoff: the window is short.
                let addrs = desktop
                    .addrs
                    .iter()
                    .filter_map(|a| a.parse().ok())
                    .collect();
                if let Err(e) = peer.dial(pid, addrs).await {
                    tracing::debug!(error = %e, "dial for sync_once failed");
                }
            }
            let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
            loop {
                if peer.is_connected(&pid) && peer.replica().in_sync(pid).await {
                    return Ok(true);
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => return Ok(false),
                    // Any event (a connection, a merge, "in sync") is a reason to recheck.
                    ev = events.recv() => {
                        if let Err(RecvError::Closed) = ev {
                            return Ok(false);
                        }
                    }
                    _ = tokio::time::sleep(SYNC_POLL) => {}
                }
            }
        })
    }

    /// Tells `listener` about changes until the returned handle is dropped or cancelled.
    /// Keep the handle: dropping it at once means no calls.
    pub fn subscribe(
        &self,
        listener: Arc<dyn ThreadListener>,
    ) -> Result<Arc<Subscription>, ErrandError> {
        let peer = self.peer()?;
        let rt = self.handle()?;
        listener::subscribe(&rt, peer, listener, self.closing.child_token())
            .map(Arc::new)
            .map_err(|e| ErrandError::internal(format!("cannot start a listener thread: {e}")))
    }

    /// Stops the network (closing connections with the desktop), ends every subscription and
    /// releases the home, so it can be opened again. Everything acknowledged is already
    /// durable. Further calls fail with `Internal`. Calling it again does nothing.
    pub fn shutdown(&self) {
        let peer = self
            .peer
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.closing.cancel();
        let rt = self
            .rt
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let (Some(peer), Some(rt)) = (peer, rt) {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            rt.spawn(async move {
                peer.shutdown().await;
                let _ = tx.send(());
            });
            // `Peer::shutdown` bounds itself; this only guards against a lost reply.
            let _ = rx.recv_timeout(errand_p2p::peer::SHUTDOWN_TIMEOUT * 3);
            stop_runtime(rt);
        }
    }
}

impl PhoneClient {
    fn peer(&self) -> Result<Peer, ErrandError> {
        self.peer
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(shut_down)
    }

    fn handle(&self) -> Result<tokio::runtime::Handle, ErrandError> {
        self.rt
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|rt| rt.handle().clone())
            .ok_or_else(shut_down)
    }

    /// Runs `f` on the client's runtime and waits for it on this thread. Unlike `block_on`,
    /// this works from any thread, a runtime worker included.
    fn run<T, F, Fut>(&self, f: F) -> Result<T, ErrandError>
    where
        T: Send + 'static,
        F: FnOnce(Peer) -> Fut,
        Fut: Future<Output = Result<T, ErrandError>> + Send + 'static,
    {
        let fut = f(self.peer()?);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle()?.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| {
            ErrandError::internal("the call did not complete: the client shut down meanwhile")
        })?
    }

    fn change_routine(
        &self,
        id: String,
        change: api::RoutineChange,
    ) -> Result<RoutineView, ErrandError> {
        self.run(move |peer| async move {
            require_thread(&peer)?;
            let info = api::ChangeRoutine { id, change }
                .run(&peer)
                .await
                .map_err(|e| ErrandError::from_api(e, ErrandError::invalid_kind))?;
            Ok(RoutineView::from(&info))
        })
    }

    fn act(&self, id: String, action: Action) -> Result<(), ErrandError> {
        let id = parse_task_id(&id)?;
        self.run(move |peer| async move {
            require_thread(&peer)?;
            // Exit 1 from an action is the task's state ("already ended", "not ended",
            // "no such task"): the caller asked for something this task does not allow.
            api::Act { id, action }
                .run(&peer)
                .await
                .map_err(|e| ErrandError::from_api(e, ErrandError::invalid_kind))?;
            Ok(())
        })
    }
}

impl Drop for PhoneClient {
    fn drop(&mut self) {
        self.closing.cancel();
        if let Some(rt) = self
            .rt
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            stop_runtime(rt);
        }
    }
}

/// Stops a runtime from any thread: waiting a little for leftovers where that is allowed.
fn stop_runtime(rt: Runtime) {
    if tokio::runtime::Handle::try_current().is_ok() {
        // Blocking inside a runtime is not allowed; abandon what is left.
        rt.shutdown_background();
    } else {
        rt.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    }
}

fn shut_down() -> ErrandError {
    ErrandError::internal("this client was shut down; open a new one")
}

fn parse_task_id(id: &str) -> Result<TaskId, ErrandError> {
    id.trim()
        .parse()
        .map_err(|e: errand_core::IdError| ErrandError::invalid(e.to_string()))
}

fn require_thread(peer: &Peer) -> Result<(), ErrandError> {
    match peer.replica().genesis() {
        Some(_) => Ok(()),
        None => Err(ErrandError::not_paired(
            "this phone has no thread yet: pair with a desktop first",
        )),
    }
}
