//! The runner in-process, on a desktop peer without a network: tasks enqueued locally run, and
//! the thread gets their facts. Phones and real processes are in `tests/tests/desktop.rs`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use errand_core::{DeviceKind, EventKind, MessageKind, Task, TaskId, TaskStatus, fold};
use errand_crdt::NewTask;
use errand_desktop::{
    config::Settings,
    executor::{ExecutorConfig, ExecutorKind},
    ledger::{self, LedgerState, ProcessGroup},
    runner::Runner,
};
use errand_p2p::peer::{Peer, PeerConfig, now_ms};

/// Generous: these take milliseconds on a quiet machine.
const DEADLINE: Duration = Duration::from_secs(60);

struct Desk {
    _dir: tempfile::TempDir,
    home: PathBuf,
    peer: Peer,
}

fn desk() -> Desk {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("desktop");
    let peer = Peer::open(PeerConfig {
        home: home.clone(),
        kind: DeviceKind::Desktop,
        name: Some("test desktop".into()),
        listen: Vec::new(),
        mdns: false,
        relays: Vec::new(),
        relay_only: false,
        blob_caps: Default::default(),
    })
    .unwrap();
    Desk {
        _dir: dir,
        home,
        peer,
    }
}

impl Desk {
    fn settings(&self) -> Settings {
        Settings::defaults(&self.home)
    }

    async fn send(&self, instruction: &str) -> TaskId {
        self.send_with(instruction, "shell", None).await
    }

    async fn send_with(&self, instruction: &str, executor: &str, not_after: Option<i64>) -> TaskId {
        self.peer
            .enqueue_task(NewTask {
                instruction: instruction.into(),
                executor: executor.into(),
                target: self.peer.device_id(),
                not_after,
                attachments: Vec::new(),
            })
            .await
            .unwrap()
    }

    async fn task(&self, id: TaskId) -> Task {
        self.peer
            .replica()
            .read(move |d| d.task(&id))
            .await
            .unwrap()
            .unwrap()
    }

    async fn wait_status(&self, id: TaskId, want: impl Fn(TaskStatus) -> bool) -> Task {
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            let t = self.task(id).await;
            if want(fold(&t).status) {
                return t;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "task {id} stayed {:?}",
                fold(&t)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_ended(&self, id: TaskId) -> Task {
        self.wait_status(id, TaskStatus::is_terminal).await
    }

    fn workspace(&self) -> PathBuf {
        self.settings().workspace
    }
}

fn kinds(t: &Task) -> Vec<&'static str> {
    t.events.iter().map(|e| e.kind.name()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_runs_and_its_output_and_exit_code_reach_the_thread() {
    let d = desk();
    let runner = Runner::start(d.peer.clone(), d.settings()).await.unwrap();
    let ok = d
        .send("echo hello from $ERRAND_TASK_ID; echo oops >&2")
        .await;
    let bad = d.send("echo failing; exit 3").await;

    let t = d.wait_ended(ok).await;
    let v = fold(&t);
    assert_eq!((v.status, v.exit_code), (TaskStatus::Done, Some(0)));
    assert!(v.output.contains(&format!("hello from {ok}")), "{v:?}");
    assert!(v.output.contains("oops"), "{v:?}");
    assert_eq!(kinds(&t)[..2], ["delivered", "started"]);
    assert_eq!(kinds(&t).last(), Some(&"finished"));

    let t = d.wait_ended(bad).await;
    let v = fold(&t);
    assert_eq!((v.status, v.exit_code), (TaskStatus::Failed, Some(3)));

    // The full log stays in the home, and a message on the task names it.
    let log = d.home.join("logs").join(format!("{ok}-1.log"));
    assert!(std::fs::read_to_string(&log).unwrap().contains("oops"));
    let messages = d.peer.replica().read(|d| d.messages()).await.unwrap();
    assert!(messages.iter().any(|m| m.task == Some(ok)
        && m.kind == MessageKind::System
        && m.text.contains(&log.display().to_string())));
    // The ledger ended both attempts. The runner ends the ledger entry after the thread's
    // terminal fact is durable, so it may trail the fact by a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let entries = d
            .peer
            .replica()
            .store_blocking(move |s| ledger::entries_for(s, [ok, bad]))
            .await
            .unwrap()
            .unwrap();
        let ended = entries.len() == 2
            && entries
                .values()
                .all(|e| matches!(e.state, LedgerState::Ended { .. }));
        if ended {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the ledger did not end both attempts: {entries:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tasks_run_one_at_a_time_oldest_first() {
    let d = desk();
    let order = d.workspace().join("order");
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            d.send(&format!(
                "echo start {i} >> '{0}'; sleep 0.05; echo end {i} >> '{0}'",
                order.display()
            ))
            .await,
        );
    }
    let runner = Runner::start(d.peer.clone(), d.settings()).await.unwrap();
    for id in &ids {
        assert_eq!(fold(&d.wait_ended(*id).await).status, TaskStatus::Done);
    }
    let lines = std::fs::read_to_string(&order).unwrap();
    let want: String = (0..5).map(|i| format!("start {i}\nend {i}\n")).collect();
    assert_eq!(lines, want);
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_command_executor_gets_the_instruction_as_one_literal_argument_and_the_thread() {
    let d = desk();
    let script = d._dir.path().join("agent.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nprintf 'argc=%s\\n' \"$#\"\nprintf 'instruction=%s\\n' \"$1\"\n\
         echo \"workspace=$ERRAND_WORKSPACE\"\necho '--- thread ---'\ncat \"$ERRAND_THREAD\"\n",
    )
    .unwrap();
    make_executable(&script);
    let mut settings = d.settings();
    settings.executors = vec![
        ExecutorConfig::shell(),
        ExecutorConfig::new(
            "agent",
            ExecutorKind::Command {
                argv: vec![script.display().to_string(), "{instruction}".into()],
            },
        )
        .unwrap(),
    ];
    let runner = Runner::start(d.peer.clone(), settings).await.unwrap();
    let first = d.send("echo the-answer-is-42").await;
    d.wait_ended(first).await;
    let evil = "summarise that $(touch pwned) `touch pwned2`; touch pwned3";
    let second = d.send_with(evil, "agent", None).await;
    let v = fold(&d.wait_ended(second).await);
    assert_eq!(v.status, TaskStatus::Done, "{v:?}");
    assert!(v.output.contains("argc=1\n"), "{}", v.output);
    assert!(
        v.output.contains(&format!("instruction={evil}\n")),
        "{}",
        v.output
    );
    assert!(
        v.output
            .contains(&format!("workspace={}", d.workspace().display()))
    );
    let thread = &v.output[v.output.find("--- thread ---").unwrap()..];
    assert!(thread.contains("echo the-answer-is-42"), "{thread}");
    assert!(thread.contains("the-answer-is-42\n"), "{thread}");
    assert!(thread.contains("## This task"), "{thread}");
    for f in ["pwned", "pwned2", "pwned3"] {
        assert!(!d.workspace().join(f).exists(), "{f} exists");
    }
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instruction_starting_with_a_dash_is_never_an_option_of_a_command_executor() {
    // Root cause: a command template was filled argument by argument with no regard for where
    // the program reads options, so with ["sort", "{instruction}"] the instruction
    // "-o<file>" became sort's output option and sort (reading /dev/null) wrote <file>.
    let d = desk();
    let mut settings = d.settings();
    settings.executors = vec![
        ExecutorConfig::shell(),
        ExecutorConfig::new(
            "sort",
            ExecutorKind::Command {
                argv: vec!["sort".into(), "{instruction}".into()],
            },
        )
        .unwrap(),
        ExecutorConfig::new(
            "sort-operands",
            ExecutorKind::Command {
                argv: vec!["sort".into(), "--".into(), "{instruction}".into()],
            },
        )
        .unwrap(),
    ];
    let runner = Runner::start(d.peer.clone(), settings).await.unwrap();
    let target = d._dir.path().join("written-by-sort");
    let injected = format!("-o{}", target.display());

    let refused = d.send_with(&injected, "sort", None).await;
    let t = d.wait_ended(refused).await;
    let v = fold(&t);
    assert_eq!(v.status, TaskStatus::Failed, "{v:?}");
    let reason = v.reason.unwrap_or_default();
    assert!(
        reason.contains("starts with '-'") && reason.contains(r#"add "--" before {instruction}"#),
        "{reason}"
    );
    assert!(!kinds(&t).contains(&"started"), "{:?}", kinds(&t));
    assert!(!target.exists(), "sort wrote {}", target.display());

    // After "--" the same text is an operand: sort looks for a file of that name and fails.
    let operand = d.send_with(&injected, "sort-operands", None).await;
    let v = fold(&d.wait_ended(operand).await);
    assert_eq!(v.status, TaskStatus::Failed, "{v:?}");
    assert_eq!(v.exit_code, Some(2), "{v:?}");
    assert!(!target.exists(), "sort wrote {}", target.display());

    // The shell executor runs such an instruction as a command, not as sh's option.
    let shell = d.send("-o 2>/dev/null; echo ran").await;
    let v = fold(&d.wait_ended(shell).await);
    assert_eq!(v.status, TaskStatus::Done, "{v:?}");
    assert!(v.output.contains("ran"), "{v:?}");
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_executor_fails_without_running_anything() {
    let d = desk();
    let runner = Runner::start(d.peer.clone(), d.settings()).await.unwrap();
    let id = d.send_with("touch ran", "nope", None).await;
    let v = fold(&d.wait_ended(id).await);
    assert_eq!(v.status, TaskStatus::Failed);
    assert!(v.reason.unwrap().contains("no executor named \"nope\""));
    assert!(!d.workspace().join("ran").exists());
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_task_is_cancelled_and_never_runs_late() {
    let d = desk();
    let past = d
        .send_with("touch late-1", "shell", Some(now_ms() - 1))
        .await;
    let runner = Runner::start(d.peer.clone(), d.settings()).await.unwrap();
    // One task holds the only slot while the next one's deadline passes.
    let blocker = d.send("sleep 1").await;
    d.wait_status(blocker, |s| s == TaskStatus::Running).await;
    let soon = d
        .send_with("touch late-2", "shell", Some(now_ms() + 200))
        .await;
    for id in [past, soon] {
        let v = fold(&d.wait_ended(id).await);
        assert_eq!(
            (v.status, v.reason.as_deref()),
            (TaskStatus::Cancelled, Some("expired"))
        );
    }
    d.wait_ended(blocker).await;
    assert!(!d.workspace().join("late-1").exists());
    assert!(!d.workspace().join("late-2").exists());
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_kills_the_whole_process_group() {
    let d = desk();
    let mut settings = d.settings();
    settings.task_timeout = Duration::from_secs(1);
    let runner = Runner::start(d.peer.clone(), settings).await.unwrap();
    let pid_file = d.workspace().join("grandchild.pid");
    let id = d
        .send(&format!(
            "sh -c 'sleep 300 & echo $! > {}; wait'",
            pid_file.display()
        ))
        .await;
    let v = fold(&d.wait_ended(id).await);
    assert_eq!(v.status, TaskStatus::Failed);
    assert!(v.reason.unwrap().contains("timed out"));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_gone(pid).await;
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_stops_running_tasks_and_marks_them_interrupted() {
    let d = desk();
    let runner = Runner::start(d.peer.clone(), d.settings()).await.unwrap();
    let id = d.send("sleep 300").await;
    d.wait_status(id, |s| s == TaskStatus::Running).await;
    runner.shutdown().await;
    let v = fold(&d.task(id).await);
    assert_eq!(v.status, TaskStatus::Interrupted);
    // A restart does not run it again.
    let runner = Runner::start(d.peer.clone(), d.settings()).await.unwrap();
    assert!(runner.recovered().is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = d.task(id).await;
    assert_eq!(kinds(&t).iter().filter(|k| **k == "started").count(), 1);
    runner.shutdown().await;
}

/// Regression: a crash between the ledger's write-ahead entry and the terminal fact leaves the
/// process group running and the ledger at `started`; start-up must kill the group and mark
/// the attempt interrupted instead of running it again.
#[tokio::test(flavor = "multi_thread")]
async fn start_up_recovery_kills_a_left_over_group_and_marks_it_interrupted() {
    let d = desk();
    let id = d.send("sleep 300").await;
    // What a crashed run leaves behind: facts up to `started`, a live group, a ledger entry.
    d.peer
        .append_event(id, 1, EventKind::Delivered)
        .await
        .unwrap();
    let mut child = std::process::Command::new("sh")
        .args(["-c", "sleep 300 & sleep 300"])
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = child.id() as i32;
    let group = ProcessGroup::capture(pgid);
    d.peer
        .replica()
        .store_blocking(move |s| ledger::begin_start(s, id, 1, group, now_ms()))
        .await
        .unwrap()
        .unwrap();
    d.peer
        .append_event(id, 1, EventKind::Started)
        .await
        .unwrap();

    let runner = Runner::start(d.peer.clone(), d.settings()).await.unwrap();
    assert_eq!(runner.recovered().len(), 1);
    assert!(runner.recovered()[0].killed && runner.recovered()[0].interrupted);
    assert!(!ledger::group_has_live_members(pgid));
    child.wait().unwrap();
    let t = d.task(id).await;
    assert_eq!(fold(&t).status, TaskStatus::Interrupted);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = d.task(id).await;
    assert_eq!(kinds(&t).iter().filter(|k| **k == "started").count(), 1);
    runner.shutdown().await;
}

/// An attempt whose `started` reached the document but whose ledger entry did not (or was
/// lost) is never started again either.
#[tokio::test(flavor = "multi_thread")]
async fn an_attempt_started_in_the_document_never_starts_again() {
    let d = desk();
    let id = d.send("touch ran").await;
    d.peer
        .append_event(id, 1, EventKind::Started)
        .await
        .unwrap();
    let runner = Runner::start(d.peer.clone(), d.settings()).await.unwrap();
    let v = fold(&d.wait_ended(id).await);
    assert_eq!(v.status, TaskStatus::Interrupted);
    assert!(!d.workspace().join("ran").exists());
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn output_beyond_the_cap_keeps_the_tail_and_names_the_log() {
    let d = desk();
    let mut settings = d.settings();
    settings.output_cap = 16 * 1024;
    let runner = Runner::start(d.peer.clone(), settings).await.unwrap();
    let id = d
        .send("i=0; while [ $i -lt 3000 ]; do echo line $i; i=$((i+1)); done; echo THE-END")
        .await;
    let t = d.wait_ended(id).await;
    let v = fold(&t);
    assert_eq!(v.status, TaskStatus::Done);
    assert!(v.output.len() <= 16 * 1024, "{}", v.output.len());
    assert!(v.output.contains("line 0\n"));
    assert!(
        v.output.trim_end().ends_with("THE-END"),
        "{}",
        &v.output[v.output.len() - 200..]
    );
    assert!(v.output.contains(&format!("{id}-1.log")));
    runner.shutdown().await;
}

async fn wait_gone(pid: i32) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while alive(pid) {
        assert!(
            tokio::time::Instant::now() < end,
            "process {pid} is still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Alive and not a zombie (orphans may be left unreaped by a container's init).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

use std::os::unix::process::CommandExt;
