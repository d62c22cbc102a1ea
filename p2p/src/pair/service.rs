//! The desktop's `/errand/pair/1` responder: it accepts pairing streams, runs at most
//! [`MAX_CONCURRENT_PAIRINGS`] handshakes at once against the ticket book, and records each
//! paired phone's device and actor.

use std::sync::Arc;

use errand_core::DeviceKind;
use futures::StreamExt;
use libp2p_stream::AlreadyRegistered;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::{
    PAIR_PROTOCOL, respond,
    tickets::{Book, Desk, refresh_window},
};
use crate::{clock::now_ms, net::node::NodeHandle, replica::Binding};

/// Pairing handshakes served at once. A person pairs one phone at a time; a few more cover a
/// retry while an earlier attempt times out. Each handshake runs on a blocking thread, so
/// without a cap 750 silent streams took 516 threads (issue 14).
pub const MAX_CONCURRENT_PAIRINGS: usize = 4;

/// Serves `/errand/pair/1` on a started desktop until the network stops or `cancel` fires.
/// The task joins every handshake it started before it ends (handshakes still running then
/// are aborted: the network they ran on is gone).
pub fn serve(
    desk: Desk,
    node: &NodeHandle,
    cancel: CancellationToken,
) -> Result<JoinHandle<()>, AlreadyRegistered> {
    let mut incoming = node.control().accept(PAIR_PROTOCOL)?;
    // Tickets issued before a restart stay usable until they expire.
    refresh_window(&desk.replica, &desk.gate);
    let desktop = node.peer_id();
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_PAIRINGS));
    Ok(tokio::spawn(async move {
        let mut handshakes = JoinSet::new();
        loop {
            let (phone, mut stream) = tokio::select! {
                _ = cancel.cancelled() => break,
                next = incoming.next() => match next {
                    Some(n) => n,
                    None => break,
                },
            };
            // Reap finished handshakes (at most MAX_CONCURRENT_PAIRINGS run).
            while handshakes.try_join_next().is_some() {}
            // A handshake holds a permit (and a blocking thread) until it ends, at most a few
            // step timeouts; when all are taken, the stream is dropped at once.
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                tracing::info!(%phone, "refused a pairing stream: {MAX_CONCURRENT_PAIRINGS} handshakes already run");
                drop(stream);
                continue;
            };
            let desk = desk.clone();
            // Counted from the first byte: the node keeps a relayed connection that a hole
            // punch supersedes open while a handshake with its peer runs (the welcome may be
            // on it).
            let running = desk.gate.handshake(phone);
            handshakes.spawn(async move {
                let _permit = permit;
                let _running = running;
                let replica = desk.replica.clone();
                // The book does brief redb work; keep it off the async workers.
                let result = tokio::task::spawn_blocking(move || {
                    let handle = tokio::runtime::Handle::current();
                    let mut book = Book { desk };
                    handle.block_on(respond(&mut stream, desktop, phone, &mut book))
                })
                .await;
                match result {
                    Ok(Ok(paired)) => {
                        tracing::info!(%phone, name = %paired.hello.name, confirmed = paired.confirmed(), "paired a phone");
                        if let Err(e) = replica
                            .ensure_device(
                                phone,
                                paired.hello.name.clone(),
                                DeviceKind::Phone,
                                paired.hello.actor.clone(),
                                Binding::Pairing,
                                now_ms(),
                            )
                            .await
                        {
                            tracing::warn!(%phone, error = %e, "could not record the paired phone's actor; its changes will be refused");
                        }
                    }
                    Ok(Err(e)) => tracing::info!(%phone, error = %e, "pairing failed"),
                    Err(e) => tracing::warn!(%phone, error = %e, "pairing task failed"),
                }
            });
        }
        handshakes.shutdown().await;
    }))
}
