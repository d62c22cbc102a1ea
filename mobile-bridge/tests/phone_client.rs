//! The exported API, driven from Rust as an app would drive it, against an in-process desktop
//! peer on loopback. The desktop's facts are written by hand here (the runner's job), so these
//! tests check the bridge, not the runner.

use std::{
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use errand_core::{DeviceKind, EventKind, TaskId};
use errand_mobile::{ErrandError, OpenOptions, PhoneClient, TaskStatus, TaskView, ThreadListener};
use errand_p2p::{
    pairing,
    peer::{Peer, PeerConfig},
};

/// Generous: the machine is shared and slow.
const DEADLINE: Duration = Duration::from_secs(60);

fn loopback() -> OpenOptions {
    OpenOptions {
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        mdns: false,
    }
}

#[derive(Debug, Default)]
struct Seen {
    thread_changes: usize,
    tasks: Vec<TaskView>,
    connections: Vec<(String, bool)>,
}

/// Records every call; optionally panics on the first one.
#[derive(Debug, Default)]
struct Recorder {
    seen: Mutex<Seen>,
    cond: Condvar,
    panic_once: Mutex<bool>,
}

impl Recorder {
    fn record(&self, f: impl FnOnce(&mut Seen)) {
        f(&mut self.seen.lock().unwrap());
        self.cond.notify_all();
        let mut p = self.panic_once.lock().unwrap();
        if *p {
            *p = false;
            drop(p);
            panic!("a listener that throws");
        }
    }

    fn wait<T>(&self, what: &str, mut f: impl FnMut(&Seen) -> Option<T>) -> T {
        let end = Instant::now() + DEADLINE;
        let mut seen = self.seen.lock().unwrap();
        loop {
            if let Some(v) = f(&seen) {
                return v;
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; saw {seen:?}"
            );
            seen = self.cond.wait_timeout(seen, left).unwrap().0;
        }
    }

    fn calls(&self) -> usize {
        let s = self.seen.lock().unwrap();
        s.thread_changes + s.tasks.len() + s.connections.len()
    }
}

impl ThreadListener for Recorder {
    fn on_thread_changed(&self) {
        self.record(|s| s.thread_changes += 1);
    }
    fn on_task_changed(&self, task: TaskView) {
        self.record(|s| s.tasks.push(task));
    }
    fn on_connection_changed(&self, desktop_id: String, connected: bool) {
        self.record(|s| s.connections.push((desktop_id, connected)));
    }
}

struct Desktop {
    rt: tokio::runtime::Runtime,
    peer: Peer,
}

impl Desktop {
    fn start(home: &std::path::Path) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let peer = Peer::open(PeerConfig {
            home: home.to_owned(),
            kind: DeviceKind::Desktop,
            name: Some("test-desktop".into()),
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            mdns: false,
            relays: Vec::new(),
            relay_only: false,
            blob_caps: Default::default(),
        })
        .unwrap();
        rt.block_on(async {
            peer.publish_self(vec!["shell".into()]).await.unwrap();
            peer.start().await.unwrap();
        });
        Self { rt, peer }
    }

    fn ticket(&self) -> String {
        self.rt
            .block_on(pairing::create_ticket(&self.peer, Duration::from_secs(600)))
            .unwrap()
            .to_string()
    }

    fn fact(&self, id: &str, kind: EventKind) {
        let id: TaskId = id.parse().unwrap();
        self.rt
            .block_on(self.peer.append_event(id, 1, kind))
            .unwrap();
    }

    fn has_task(&self, id: &str) -> bool {
        let id: TaskId = id.parse().unwrap();
        self.rt
            .block_on(self.peer.replica().read(move |d| d.task(&id)))
            .unwrap()
            .is_some()
    }
}

impl Drop for Desktop {
    fn drop(&mut self) {
        self.rt.block_on(self.peer.shutdown());
    }
}

#[test]
fn calls_before_pairing_fail_with_stable_kinds() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("phone").to_string_lossy().into_owned();
    let phone = PhoneClient::open_with(home.clone(), "phone".into(), loopback()).unwrap();

    let kind = |r: Result<(), ErrandError>| r.unwrap_err();
    assert!(matches!(
        kind(phone.send_task("hello".into(), None, None).map(drop)),
        ErrandError::NotPaired { .. }
    ));
    assert!(matches!(
        kind(phone.thread().map(drop)),
        ErrandError::NotPaired { .. }
    ));
    assert!(matches!(
        kind(phone.sync_once(10).map(drop)),
        ErrandError::NotPaired { .. }
    ));
    assert!(matches!(
        kind(phone.send_task("  ".into(), None, None).map(drop)),
        ErrandError::InvalidInput { .. }
    ));
    assert!(matches!(
        kind(phone.task("not-a-task-id".into()).map(drop)),
        ErrandError::InvalidInput { .. }
    ));
    assert!(matches!(
        kind(phone.pair("errand:nonsense".into()).map(drop)),
        ErrandError::InvalidInput { .. }
    ));
    assert!(matches!(
        kind(
            PhoneClient::open_with(
                tmp.path().join("other").to_string_lossy().into_owned(),
                "x".into(),
                OpenOptions {
                    listen: vec!["not a multiaddr".into()],
                    mdns: false,
                },
            )
            .map(drop)
        ),
        ErrandError::InvalidInput { .. }
    ));
    // One process per home.
    assert!(matches!(
        kind(PhoneClient::open_with(home.clone(), "x".into(), loopback()).map(drop)),
        ErrandError::Storage { .. }
    ));
    let status = phone.status().unwrap();
    assert_eq!(status.thread_id, None);
    assert!(status.desktops.is_empty());

    phone.shutdown();
    phone.shutdown();
    assert!(matches!(
        kind(phone.status().map(drop)),
        ErrandError::Internal { .. }
    ));
    // Shutdown released the home.
    PhoneClient::open_with(home, "phone".into(), loopback())
        .unwrap()
        .shutdown();
}

#[test]
fn a_paired_phone_queues_syncs_and_hears_the_desktops_facts() {
    let tmp = tempfile::tempdir().unwrap();
    let desktop = Desktop::start(&tmp.path().join("desktop"));
    let desktop_id = desktop.peer.peer_id().to_base58();
    let home = tmp.path().join("phone").to_string_lossy().into_owned();
    let phone = PhoneClient::open_with(home.clone(), "phone".into(), loopback()).unwrap();
    let rec = Arc::new(Recorder::default());
    let sub = phone.subscribe(rec.clone()).unwrap();

    let paired = phone.pair(desktop.ticket()).unwrap();
    assert_eq!(paired.desktop_id, desktop_id);
    assert_eq!(paired.desktop_name, "test-desktop");
    assert!(paired.synced, "the first sync finishes");
    rec.wait("the desktop connecting", |s| {
        s.connections
            .iter()
            .any(|(id, up)| *id == desktop_id && *up)
            .then_some(())
    });
    let status = phone.status().unwrap();
    assert_eq!(status.thread_id.as_deref(), Some(paired.thread_id.as_str()));
    let d = &status.desktops[0];
    assert!(
        d.connected && d.in_sync && d.last_sync_at_ms.is_some(),
        "{d:?}"
    );

    let task_id = phone
        .send_task("echo hi".into(), None, Some(i64::MAX))
        .unwrap();
    let id = task_id.to_string();
    let view = phone.task(id.clone()).unwrap();
    assert_eq!(view.status, TaskStatus::Queued);
    assert_eq!(view.executor, "shell");
    assert_eq!(view.not_after_ms, Some(i64::MAX));
    assert!(phone.sync_once(DEADLINE.as_millis() as u64).unwrap());
    assert!(desktop.has_task(&id), "in sync means the desktop has it");

    // The desktop's facts arrive through the listener.
    desktop.fact(&id, EventKind::Delivered);
    rec.wait("delivered", |s| {
        s.tasks
            .iter()
            .any(|t| t.id == task_id && t.status == TaskStatus::Delivered)
            .then_some(())
    });
    desktop.fact(&id, EventKind::Started);
    desktop.fact(
        &id,
        EventKind::Output {
            text: "hi\n".into(),
        },
    );
    desktop.fact(&id, EventKind::Finished { exit_code: 0 });
    let done = rec.wait("done", |s| {
        s.tasks
            .iter()
            .find(|t| t.id == task_id && t.status == TaskStatus::Done)
            .cloned()
    });
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(done.output_tail, "hi\n");
    assert_eq!(phone.task(id.clone()).unwrap(), done);
    assert_eq!(phone.thread().unwrap().tasks, vec![done]);

    // The task's state decides which requests make sense.
    assert!(matches!(
        phone.approve(id.clone()),
        Err(ErrandError::InvalidInput { .. })
    ));
    phone.retry(id.clone()).unwrap();
    assert_eq!(phone.task(id.clone()).unwrap().attempt, 2);
    assert!(matches!(
        phone.retry(id.clone()),
        Err(ErrandError::InvalidInput { .. })
    ));
    assert!(matches!(
        phone.cancel("01ARZ3NDEKTSV4RRFFQ69G5FAV".into()),
        Err(ErrandError::InvalidInput { .. })
    ));

    // A cancelled subscription hears nothing more.
    sub.cancel();
    std::thread::sleep(Duration::from_millis(300));
    let before = rec.calls();
    phone.send_task("echo later".into(), None, None).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rec.calls(), before);

    assert_eq!(phone.forget().unwrap(), vec![desktop_id]);
    assert!(matches!(
        phone.sync_once(10),
        Err(ErrandError::NotPaired { .. })
    ));
    assert_eq!(phone.task(id.clone()).unwrap().attempt, 2, "still readable");
    phone.shutdown();
    let again = PhoneClient::open_with(home, "phone".into(), loopback()).unwrap();
    assert_eq!(again.thread().unwrap().tasks.len(), 2);
    again.shutdown();
}

#[test]
fn a_listener_that_throws_keeps_getting_calls_until_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let desktop = Desktop::start(&tmp.path().join("desktop"));
    let home = tmp.path().join("phone").to_string_lossy().into_owned();
    let phone = PhoneClient::open_with(home, "phone".into(), loopback()).unwrap();
    phone.pair(desktop.ticket()).unwrap();

    let rec = Arc::new(Recorder::default());
    *rec.panic_once.lock().unwrap() = true;
    let sub = phone.subscribe(rec.clone()).unwrap();
    let first = phone.send_task("echo one".into(), None, None).unwrap();
    let second = phone.send_task("echo two".into(), None, None).unwrap();
    rec.wait("both tasks, despite the first call throwing", |s| {
        let ids: Vec<_> = s.tasks.iter().map(|t| t.id).collect();
        (ids.contains(&first) && ids.contains(&second)).then_some(())
    });

    drop(sub);
    std::thread::sleep(Duration::from_millis(300));
    let before = rec.calls();
    phone.send_task("echo three".into(), None, None).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rec.calls(), before, "a dropped subscription is silent");
    phone.shutdown();
}
