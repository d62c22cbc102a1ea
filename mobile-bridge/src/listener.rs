//! Observers: a foreign [`ThreadListener`] and the [`Subscription`] handle that feeds it.
//!
//! - A pump task on the client's runtime turns the peer's events into notices (reading the
//!   changed tasks from the replica) and queues them on a bounded channel.
//! - One plain thread per subscription takes them off the channel and calls the listener. It is
//!   not a runtime worker, so a listener may call back into the client, and a slow listener
//!   only slows its own subscription.
//! - Dropping the handle, or `cancel()`, stops delivery. So does shutting the client down.

use std::{panic::AssertUnwindSafe, sync::Arc};

use errand_p2p::peer::{Peer, PeerEvent};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_util::sync::CancellationToken;

use crate::types::TaskView;

/// Notices queued per subscription before the pump waits for the listener. A listener that
/// falls this far behind makes the peer's event channel lag, which turns into one
/// `on_thread_changed` ("reread everything") instead of unbounded memory.
const NOTICE_CAPACITY: usize = 256;

/// Gets told what changed. Implemented by the app (Kotlin, Swift, Python).
///
/// Calls come from a background thread that belongs to the subscription, one at a time and in
/// order; marshal to the UI thread yourself. A listener may call the client.
#[uniffi::export(foreign)]
pub trait ThreadListener: Send + Sync {
    /// Something in the thread changed (tasks, messages, devices, routines): reread what you
    /// show.
    fn on_thread_changed(&self);
    /// A task has new content (status, output, requests), locally or from the desktop.
    fn on_task_changed(&self, task: TaskView);
    /// A paired desktop connected or disconnected.
    fn on_connection_changed(&self, desktop_id: String, connected: bool);
}

/// Hears how far a download of artifacts is. Called on the download's own runtime thread:
/// return quickly, and do not call the client from it.
#[uniffi::export(foreign)]
pub trait FetchProgress: Send + Sync {
    /// `done` of `size` bytes of `file` are verified and stored.
    fn on_progress(&self, file: errand_core::BlobRef, done: u64, size: u64);
}

/// A live subscription. Delivery stops when this is dropped or cancelled.
#[derive(Debug, uniffi::Object)]
pub struct Subscription {
    cancel: CancellationToken,
}

#[uniffi::export]
impl Subscription {
    /// Stops delivery now. A call already running finishes.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

enum Notice {
    Thread,
    Task(Box<TaskView>),
    Connection(String, bool),
}

/// Starts delivering `peer`'s changes to `listener` until `cancel` fires.
pub(crate) fn subscribe(
    rt: &tokio::runtime::Handle,
    peer: Peer,
    listener: Arc<dyn ThreadListener>,
    cancel: CancellationToken,
) -> std::io::Result<Subscription> {
    // Subscribe before returning, so nothing that happens after `subscribe` is missed.
    let events = peer.events();
    let changes = peer.replica().subscribe_changes();
    let (tx, rx) = mpsc::channel(NOTICE_CAPACITY);
    std::thread::Builder::new()
        .name("errand-listener".into())
        .spawn({
            let cancel = cancel.clone();
            move || deliver(rx, listener, cancel)
        })?;
    rt.spawn(pump(peer, events, changes, tx, cancel.clone()));
    Ok(Subscription { cancel })
}

async fn pump(
    peer: Peer,
    mut events: tokio::sync::broadcast::Receiver<PeerEvent>,
    mut changes: tokio::sync::watch::Receiver<u64>,
    tx: mpsc::Sender<Notice>,
    cancel: CancellationToken,
) {
    loop {
        let notices = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            r = changes.changed() => match r {
                Ok(()) => vec![Notice::Thread],
                Err(_) => return,
            },
            ev = events.recv() => match ev {
                Ok(PeerEvent::Committed { tasks } | PeerEvent::Merged { tasks, .. }) => {
                    task_notices(&peer, tasks).await
                }
                Ok(PeerEvent::Connected { peer, .. }) => {
                    vec![Notice::Connection(peer.to_base58(), true)]
                }
                Ok(PeerEvent::Disconnected { peer }) => {
                    vec![Notice::Connection(peer.to_base58(), false)]
                }
                Ok(PeerEvent::InSync { .. }) => Vec::new(),
                Err(RecvError::Lagged(n)) => {
                    tracing::debug!(missed = n, "listener lagged; asking for a reread");
                    vec![Notice::Thread]
                }
                Err(RecvError::Closed) => return,
            },
        };
        for n in notices {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                sent = tx.send(n) => if sent.is_err() { return },
            }
        }
    }
}

async fn task_notices(peer: &Peer, tasks: Vec<errand_core::TaskId>) -> Vec<Notice> {
    if tasks.is_empty() {
        return Vec::new();
    }
    let ids = tasks.into_iter().collect();
    match peer.replica().read(move |d| d.tasks_by_id(&ids)).await {
        Ok(tasks) => tasks
            .iter()
            .map(|t| Notice::Task(Box::new(t.into())))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "could not read changed tasks; asking for a reread");
            vec![Notice::Thread]
        }
    }
}

fn deliver(
    mut rx: mpsc::Receiver<Notice>,
    listener: Arc<dyn ThreadListener>,
    cancel: CancellationToken,
) {
    while let Some(notice) = rx.blocking_recv() {
        if cancel.is_cancelled() {
            break;
        }
        // A foreign listener that throws surfaces here as a panic; it must not end delivery.
        let call = std::panic::catch_unwind(AssertUnwindSafe(|| match notice {
            Notice::Thread => listener.on_thread_changed(),
            Notice::Task(t) => listener.on_task_changed(*t),
            Notice::Connection(id, up) => listener.on_connection_changed(id, up),
        }));
        if call.is_err() {
            tracing::warn!("a thread listener callback failed; delivery goes on");
        }
    }
}
