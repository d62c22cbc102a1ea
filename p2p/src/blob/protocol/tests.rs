use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use errand_crdt::Store;
use tokio_util::compat::TokioAsyncReadCompatExt;

use super::*;

fn store(dir: &std::path::Path) -> BlobStore {
    let replica = Replica::open(Store::open(dir).unwrap()).unwrap();
    BlobStore::new(dir, replica)
}

/// A server over `from` that flips a bit in the first `flips` data responses, and stops
/// after `stop_after` data responses; counts the data bytes it sent.
fn spawn_server(
    from: BlobStore,
    flips: u32,
    stop_after: u32,
    sent: Arc<AtomicU64>,
) -> tokio::io::DuplexStream {
    spawn_flipper(from, flips, 0, stop_after, sent)
}

/// [`spawn_server`] that also flips a bit in every `every`-th data response (0: none).
fn spawn_flipper(
    from: BlobStore,
    flips: u32,
    every: u32,
    stop_after: u32,
    sent: Arc<AtomicU64>,
) -> tokio::io::DuplexStream {
    let (a, b) = tokio::io::duplex(256 * 1024);
    tokio::spawn(async move {
        let mut s = b.compat();
        let (mut flips, mut served) = (flips, 0u32);
        while let Ok(Some(req)) = wire::read_request(&mut s).await {
            let hash = BlobHash::from_bytes(req.hash);
            let (size, mut bytes) = from.read(&hash, req.what, req.offset, req.len).unwrap();
            if req.what == What::Data {
                if served == stop_after {
                    return;
                }
                served += 1;
                if flips > 0 || (every > 0 && served % every == 0) {
                    flips = flips.saturating_sub(1);
                    let last = bytes.len() - 1;
                    bytes[last] ^= 1;
                }
                sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
            wire::write_response(&mut s, Status::Ok, size, &bytes)
                .await
                .unwrap();
        }
    });
    a
}

/// A reference to blob `hash` of `size` bytes, as a task would carry it.
fn blob_ref(hash: BlobHash, size: u64) -> BlobRef {
    BlobRef {
        hash,
        name: "x.bin".into(),
        size,
        mime: "application/octet-stream".into(),
    }
}

/// Fetches `blob` into `into` over `stream`, with no progress report.
async fn fetch_over(
    stream: tokio::io::DuplexStream,
    into: &BlobStore,
    blob: &BlobRef,
) -> (Result<PathBuf, FetchError>, FetchStats) {
    let mut stats = FetchStats::default();
    let mut stream = stream.compat();
    let r = fetch(
        &mut stream,
        PeerId::random(),
        into,
        blob,
        &mut |_, _| {},
        &mut stats,
    )
    .await;
    (r, stats)
}

fn random_file(dir: &std::path::Path, len: usize) -> (PathBuf, Vec<u8>) {
    let bytes: Vec<u8> = (0..len).map(|_| rand::random()).collect();
    let p = dir.join("input.bin");
    std::fs::write(&p, &bytes).unwrap();
    (p, bytes)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flipped_bit_is_refused_and_fetched_again_and_the_blob_arrives_whole() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (store(da.path()), store(db.path()));
    let (src, bytes) = random_file(da.path(), 300 * 1024 + 17);
    let (hash, size) = a.add_file(&src).unwrap();
    let blob = BlobRef {
        hash,
        name: "x.bin".into(),
        size,
        mime: "application/octet-stream".into(),
    };
    let sent = Arc::new(AtomicU64::new(0));
    let mut stream = spawn_server(a, 2, u32::MAX, sent.clone()).compat();
    let peer = PeerId::random();
    let mut seen = Vec::new();
    let path = fetch(
        &mut stream,
        peer,
        &b,
        &blob,
        &mut |done, _| seen.push(done),
        &mut FetchStats::default(),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert!(seen.windows(2).all(|w| w[0] <= w[1]));
    // Each bad response's first group was good and kept; the bad group was asked for
    // again, and so were the ranges in flight behind it (dropped unread), twice.
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent >= size + 2 * tree::GROUP, "{sent}");
    assert!(
        sent <= size + 2 * (tree::GROUP + (PIPELINE as u64 - 1) * u64::from(MAX_RANGE)),
        "{sent}"
    );
    assert!(
        !db.path()
            .join("blobs/partial")
            .join(hash.to_string())
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fetch_cut_off_resumes_from_the_verified_offset() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (store(da.path()), store(db.path()));
    let (src, bytes) = random_file(da.path(), 1024 * 1024);
    let (hash, size) = a.add_file(&src).unwrap();
    let blob = BlobRef {
        hash,
        name: "x.bin".into(),
        size,
        mime: "application/octet-stream".into(),
    };
    let peer = PeerId::random();
    let first = Arc::new(AtomicU64::new(0));
    let mut s1 = spawn_server(a.clone(), 0, 10, first.clone()).compat();
    let err = fetch(
        &mut s1,
        peer,
        &b,
        &blob,
        &mut |_, _| {},
        &mut FetchStats::default(),
    )
    .await;
    assert!(matches!(err, Err(FetchError::Stream { .. })), "{err:?}");
    assert_eq!(first.load(Ordering::Relaxed), 10 * u64::from(MAX_RANGE));

    // A new store over the same home: as after a restart.
    drop(b);
    let b = store(db.path());
    let second = Arc::new(AtomicU64::new(0));
    let mut s2 = spawn_server(a, 0, u32::MAX, second.clone()).compat();
    let mut stats = FetchStats::default();
    let path = fetch(&mut s2, peer, &b, &blob, &mut |_, _| {}, &mut stats)
        .await
        .unwrap();
    assert_eq!(stats.resumed_from, 10 * u64::from(MAX_RANGE));
    assert_eq!(stats.received, size - stats.resumed_from);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(
        second.load(Ordering::Relaxed),
        size - 10 * u64::from(MAX_RANGE)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_spoiling_every_other_answer_still_gets_the_blob_across_and_every_answer_is_cut_off()
{
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (store(da.path()), store(db.path()));
    let (src, bytes) = random_file(da.path(), 2 * 1024 * 1024 + 5);
    let (hash, size) = a.add_file(&src).unwrap();
    let blob = blob_ref(hash, size);
    let sent = Arc::new(AtomicU64::new(0));
    let every_other = spawn_flipper(a.clone(), 0, 2, u32::MAX, sent.clone());
    let (path, _) = fetch_over(every_other, &b, &blob).await;
    assert_eq!(std::fs::read(path.unwrap()).unwrap(), bytes);

    let dc = tempfile::tempdir().unwrap();
    let every = spawn_flipper(a, 0, 1, u32::MAX, sent);
    let (err, _) = fetch_over(every, &store(dc.path()), &blob).await;
    let err = err.unwrap_err();
    assert!(
        matches!(err, FetchError::Corrupt { count, .. } if count == MAX_BAD_RESPONSES),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_commits_loses_at_most_one_commit_of_verified_bytes() {
    use super::super::store::{COMMIT_EVERY, COMMIT_INTERVAL};
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (store(da.path()), store(db.path()));
    let (src, bytes) = random_file(da.path(), 3 * 1024 * 1024 + 512 * 1024);
    let (hash, size) = a.add_file(&src).unwrap();
    let mut partial = b.receive(hash, size).unwrap();
    let total = tree::outboard_len(size) as u32;
    partial
        .set_outboard(a.read(&hash, What::Outboard, 0, total).unwrap().1)
        .unwrap();
    // 2.5 MiB verified and written, then the process dies: no flush. The link is slow
    // enough that each MiB is a commit ([`COMMIT_INTERVAL`] passes before it ends).
    let upto = 5 * COMMIT_EVERY / 2;
    for offset in (0..upto).step_by(MAX_RANGE as usize) {
        let (_, range) = a.read(&hash, What::Data, offset, MAX_RANGE).unwrap();
        if (offset + u64::from(MAX_RANGE)) % COMMIT_EVERY == 0 {
            std::thread::sleep(COMMIT_INTERVAL);
        }
        partial.append(&range).unwrap();
    }
    assert_eq!(partial.verified_upto(), upto);
    drop(partial);
    drop(b);

    let b = store(db.path());
    let resumed = b.receive(hash, size).unwrap();
    assert_eq!(resumed.verified_upto(), 2 * COMMIT_EVERY);
    let on_disk = std::fs::metadata(db.path().join("blobs/partial").join(hash.to_string()))
        .unwrap()
        .len();
    assert_eq!(
        on_disk,
        2 * COMMIT_EVERY,
        "the file is cut back to the commit"
    );
    drop(resumed);
    let blob = blob_ref(hash, size);
    let sent = Arc::new(AtomicU64::new(0));
    let (path, stats) = fetch_over(spawn_server(a, 0, u32::MAX, sent.clone()), &b, &blob).await;
    assert_eq!(std::fs::read(path.unwrap()).unwrap(), bytes);
    assert_eq!(stats.resumed_from, 2 * COMMIT_EVERY);
    assert_eq!(sent.load(Ordering::Relaxed), size - 2 * COMMIT_EVERY);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_no_task_references_is_not_served_even_when_held() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (store(da.path()), store(db.path()));
    let (src, _) = random_file(da.path(), 40 * 1024);
    let (hash, size) = a.add_file(&src).unwrap();
    // A home without a thread: no task references anything.
    let replica = Replica::open(Store::open(&da.path().join("other")).unwrap()).unwrap();
    let (client, server) = tokio::io::duplex(64 * 1024);
    let peer = PeerId::random();
    tokio::spawn(serve(
        server.compat(),
        peer,
        Referenced::new(replica),
        a.clone(),
    ));
    let blob = BlobRef {
        hash,
        name: "x.bin".into(),
        size,
        mime: "application/octet-stream".into(),
    };
    let mut stream = client.compat();
    let err = fetch(
        &mut stream,
        peer,
        &b,
        &blob,
        &mut |_, _| {},
        &mut FetchStats::default(),
    )
    .await;
    assert!(matches!(err, Err(FetchError::NotFound { .. })), "{err:?}");
    // A range past the end of a held blob is refused by the store the server reads.
    assert!(matches!(
        a.read(&hash, What::Data, size, 1),
        Err(BlobError::Range { .. })
    ));
    assert!(matches!(
        a.read(&hash, What::Data, u64::MAX, MAX_RANGE),
        Err(BlobError::Range { .. })
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_over_the_cap_is_refused_before_anything_is_fetched() {
    let db = tempfile::tempdir().unwrap();
    let b = store(db.path());
    let err = b.receive(
        BlobHash::from_bytes([1; 32]),
        super::super::MAX_BLOB_BYTES + 1,
    );
    assert!(matches!(err, Err(BlobError::TooLarge { .. })), "{err:?}");
}
