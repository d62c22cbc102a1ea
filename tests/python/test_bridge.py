"""The phone bridge, driven from Python through its generated UniFFI bindings.

Run by tests/tests/python_bridge.rs, which owns the desktop daemon and answers on stdin when
this script asks (a line "@@ <request>" on stdout, then one reply line on stdin):

  @@ stop-desktop     stop the desktop daemon, reply once it has exited
  @@ start-desktop    start it again on its old address, reply once it listens
  @@ task <ID>        information only: the task the desktop should now have

The story (issue 6, acceptance 1): pair with the desktop, queue a task while it is down (queued,
durable, no waiting on the network), bring it back, and follow the task through the listener.
With --expect-done the desktop runs tasks, so the task must go on to delivered, running and
done, and its output must arrive through the listener.

Usage: test_bridge.py MODULE_DIR PHONE_HOME TICKET [--expect-done]
Prints "N passed, N failed" last; exits 0 only when nothing failed.
"""

import argparse
import gc
import os
import sys
import threading
import time
import traceback

ap = argparse.ArgumentParser()
ap.add_argument("module_dir")
ap.add_argument("home")
ap.add_argument("ticket")
ap.add_argument("--expect-done", action="store_true")
args = ap.parse_args()
sys.path.insert(0, args.module_dir)

import errand_mobile as em  # noqa: E402  (the path is known only now)

if os.environ.get("ERRAND_LOG"):
    em.init_logging(os.environ["ERRAND_LOG"])

DEADLINE = 60.0  # seconds: generous, the machine is shared
LOOPBACK = em.OpenOptions(listen=["/ip4/127.0.0.1/tcp/0"], mdns=False)
MARKER = "hello-from-python"
passed = 0
failed = 0


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
        print(f"ok   {name}", flush=True)
    else:
        failed += 1
        print(f"FAIL {name} {detail}", flush=True)
    return cond


def raises(name, kind, f):
    try:
        f()
    except kind as e:
        return check(name, True)
    except Exception as e:  # noqa: BLE001  (report what it was)
        return check(name, False, f"raised {type(e).__name__}: {e}")
    return check(name, False, "did not raise")


def ask(request):
    """Asks the Rust test to do something and waits for its reply."""
    print(f"@@ {request}", flush=True)
    reply = sys.stdin.readline().strip()
    if reply != "ok":
        raise RuntimeError(f"the test harness answered {reply!r} to {request!r}")


class Recorder(em.ThreadListener):
    """Keeps every call, and lets the script wait for one."""

    def __init__(self):
        self.cond = threading.Condition()
        self.thread_changes = 0
        self.tasks = []
        self.connections = []
        self.threads = set()

    def _record(self, f):
        with self.cond:
            f()
            self.threads.add(threading.current_thread().name)
            self.cond.notify_all()

    def on_thread_changed(self):
        self._record(lambda: setattr(self, "thread_changes", self.thread_changes + 1))

    def on_task_changed(self, task):
        self._record(lambda: self.tasks.append(task))

    def on_connection_changed(self, desktop_id, connected):
        self._record(lambda: self.connections.append((desktop_id, connected)))

    def calls(self):
        with self.cond:
            return self.thread_changes + len(self.tasks) + len(self.connections)

    def wait(self, pred, timeout=DEADLINE):
        with self.cond:
            return self.cond.wait_for(lambda: pred(self), timeout)

    def statuses(self, task_id):
        with self.cond:
            out = []
            for t in self.tasks:
                if t.id == task_id and (not out or out[-1] != t.status):
                    out.append(t.status)
            return out

    def last(self, task_id):
        with self.cond:
            return next((t for t in reversed(self.tasks) if t.id == task_id), None)


def in_order(seen, wanted):
    """True when `wanted` appears in `seen` in this order (others may come between)."""
    it = iter(seen)
    return all(any(s == w for s in it) for w in wanted)


ORDER = [
    em.TaskStatus.QUEUED,
    em.TaskStatus.DELIVERED,
    em.TaskStatus.AWAITING_APPROVAL,
    em.TaskStatus.RUNNING,
    em.TaskStatus.DONE,
]


def main():
    # --- before pairing -------------------------------------------------------------------
    client = em.PhoneClient.open_with(args.home, "python-phone", LOOPBACK)
    raises("a second client on the same home is refused (Storage)", em.ErrandError.Storage,
           lambda: em.PhoneClient.open_with(args.home, "again", LOOPBACK))
    raises("a bad listen address is InvalidInput", em.ErrandError.InvalidInput,
           lambda: em.PhoneClient.open_with(args.home + "-other", "x",
                                            em.OpenOptions(listen=["nonsense"], mdns=False)))
    raises("send before pairing is NotPaired", em.ErrandError.NotPaired,
           lambda: client.send_task("echo too early", None, None))
    raises("a garbled ticket is InvalidInput", em.ErrandError.InvalidInput,
           lambda: client.pair("errand:not-a-ticket"))
    raises("a malformed task id is InvalidInput", em.ErrandError.InvalidInput,
           lambda: client.task("nope"))
    check("no thread before pairing", client.status().thread_id is None)

    rec = Recorder()
    sub = client.subscribe(rec)

    # --- pair with the running desktop ----------------------------------------------------
    paired = client.pair(args.ticket)
    check("pairing names the desktop and the thread",
          paired.desktop_id.startswith("12D3KooW") and paired.thread_id, str(paired))
    check("the first sync finished", paired.synced)
    desktop = paired.desktop_id
    check("the listener heard the desktop connect",
          rec.wait(lambda r: (desktop, True) in r.connections), str(rec.connections))
    status = client.status()
    d = status.desktops[0] if status.desktops else None
    check("status shows the desktop connected and in sync",
          d is not None and d.id == desktop and d.connected and d.in_sync
          and d.path == em.ConnectionPath.DIRECT and d.last_sync_at_ms is not None, str(status))
    check("status shows the thread", status.thread_id == paired.thread_id)
    raises("a used ticket is refused", em.ErrandError,
           lambda: client.pair(args.ticket))
    check("the thread is empty", client.thread().tasks == [])

    # --- the desktop goes down; the phone queues anyway ----------------------------------
    ask("stop-desktop")
    check("the listener heard the desktop go away",
          rec.wait(lambda r: (desktop, False) in r.connections), str(rec.connections))
    with rec.cond:
        went_down = rec.connections.index((desktop, False)) + 1
    check("status shows it offline", not client.status().desktops[0].connected)

    t0 = time.monotonic()
    task_id = client.send_task(f"sleep 2; echo {MARKER}", None, None)
    took = time.monotonic() - t0
    print(f"send_task returned in {took * 1000:.1f} ms with the desktop down", flush=True)
    check("send_task returns without waiting on the network", took < 2.0, f"{took:.3f}s")
    view = client.task(task_id)
    check("the new task is queued", view.status == em.TaskStatus.QUEUED, str(view.status))
    check("it defaults to the desktop's first executor", view.executor == "shell", view.executor)
    page = client.tasks_before(None, 10)
    check("paging back through history starts with the newest task",
          [t.id for t in page][:1] == [task_id], str([t.id for t in page]))
    check("a page before the newest task holds only older ones",
          all(t.id < task_id for t in client.tasks_before(task_id, 10)))
    check("the listener heard the queued task",
          rec.wait(lambda r: any(t.id == task_id and t.status == em.TaskStatus.QUEUED
                                 for t in r.tasks)))
    raises("an empty instruction is InvalidInput", em.ErrandError.InvalidInput,
           lambda: client.send_task("   ", None, None))
    routine = client.create_routine("echo routine", None, 1, None, None, None, None)
    check("create_routine works offline",
          routine.state == "active" and routine.every_ms == 1000 and routine.catch_up == "once",
          str(routine))
    check("routines lists it", [r.id for r in client.routines(False)] == [routine.id])
    raises("a bad cron expression is InvalidInput", em.ErrandError.InvalidInput,
           lambda: client.create_routine("x", None, None, "0 8 * *", None, None, None))
    raises("an unknown time zone is InvalidInput", em.ErrandError.InvalidInput,
           lambda: client.create_routine("x", None, None, "0 8 * * *", "Mars/Base", None, None))
    raises("retrying a task that has not ended is InvalidInput", em.ErrandError.InvalidInput,
           lambda: client.retry(task_id))
    raises("acting on an unknown task is InvalidInput", em.ErrandError.InvalidInput,
           lambda: client.approve("01ARZ3NDEKTSV4RRFFQ69G5FAV"))

    # Subscriptions: cancel() and dropping the handle both stop delivery.
    other = Recorder()
    other_sub = client.subscribe(other)
    dropped = Recorder()
    dropped_sub = client.subscribe(dropped)
    second = client.send_task("echo second", None, None)
    check("a second subscription hears the second task",
          other.wait(lambda r: any(t.id == second for t in r.tasks))
          and dropped.wait(lambda r: any(t.id == second for t in r.tasks)))
    other_sub.cancel()
    del dropped_sub
    gc.collect()
    time.sleep(0.3)
    other_before, dropped_before = other.calls(), dropped.calls()
    client.cancel(second)
    check("the live subscription hears the cancel request",
          rec.wait(lambda r: any(t.id == second and em.TaskRequest.CANCEL_REQUESTED in t.requests
                                 for t in r.tasks)))
    time.sleep(0.5)
    check("a cancelled subscription hears nothing more", other.calls() == other_before)
    check("a dropped subscription hears nothing more", dropped.calls() == dropped_before)

    t0 = time.monotonic()
    synced = client.sync_once(300)
    check("sync_once gives up when the desktop is down", synced is False)
    check("sync_once keeps to its timeout", time.monotonic() - t0 < 5.0)

    # --- the desktop comes back -----------------------------------------------------------
    ask("start-desktop")
    t0 = time.monotonic()
    check("sync_once reaches the desktop and syncs", client.sync_once(int(DEADLINE * 1000)))
    print(f"sync_once took {(time.monotonic() - t0) * 1000:.0f} ms after the restart", flush=True)
    print(f"@@ task {task_id}", flush=True)
    check("the listener heard the desktop come back",
          rec.wait(lambda r: (desktop, True) in r.connections[went_down:]),
          str(rec.connections))
    d = client.status().desktops[0]
    check("status: connected, in sync, synced just now",
          d.connected and d.in_sync and d.last_sync_at_ms is not None, str(d))

    if args.expect_done:
        done = rec.wait(lambda r: any(t.id == task_id and t.status == em.TaskStatus.DONE
                                      for t in r.tasks), timeout=2 * DEADLINE)
        seen = rec.statuses(task_id)
        print(f"statuses through the listener: {[s.name for s in seen]}", flush=True)
        check("the listener saw the task done", done, str(seen))
        check("statuses only moved forward",
              all(s in ORDER for s in seen)
              and [ORDER.index(s) for s in seen] == sorted(ORDER.index(s) for s in seen),
              str(seen))
        check("the listener saw queued, then running, then done",
              in_order(seen, [em.TaskStatus.QUEUED, em.TaskStatus.RUNNING,
                              em.TaskStatus.DONE]), str(seen))
        last = rec.last(task_id)
        check("the result arrived through the listener",
              last is not None and last.exit_code == 0 and MARKER in last.output_tail,
              str(last))
        events = last.events if last else []
        check("its history has delivered, started and finished",
              all(any(has(e.kind) for e in events) for has in (
                  lambda k: k.is_delivered(), lambda k: k.is_started(),
                  lambda k: k.is_finished())), str(events))
        check("task() agrees with the listener", client.task(task_id) == last)

        # The routine made offline runs once the desktop has it; pause and delete it.
        end = time.monotonic() + 2 * DEADLINE
        while time.monotonic() < end and not any(
                r.last_status == em.TaskStatus.DONE for r in client.routines(False)):
            time.sleep(0.2)
        ran = client.routines(False)
        check("the routine's occurrence ran on the desktop",
              ran and ran[0].last_status == em.TaskStatus.DONE and ran[0].next_at is not None,
              str(ran))
        paused = client.pause_routine(routine.id)
        check("pause_routine pauses it", paused.state == "paused" and paused.next_at is None,
              str(paused))
        check("resume_routine resumes it", client.resume_routine(routine.id).state == "active")
        check("delete_routine takes a prefix of the id",
              client.delete_routine(routine.id[:12]).state == "deleted")
        check("a deleted routine is listed only with all",
              client.routines(False) == [] and len(client.routines(True)) == 1)

        # A conversation with the desktop's ACP agent: its permission request reaches the
        # listener, the bridge answers it, and a reply continues the session.
        agent = client.send_task("tidy the notes [permission]", "agent", None)
        asking = rec.wait(lambda r: any(t.id == agent and t.permission is not None
                                        for t in r.tasks), timeout=2 * DEADLINE)
        view = rec.last(agent)
        check("the listener shows the agent's permission request",
              asking and view.status == em.TaskStatus.AWAITING_PERMISSION
              and [o.id for o in view.permission.options][0] == "allow-once", str(view))
        check("answer_permission picks the first allowing option",
              client.answer_permission(agent, "allow") == "allow-once")
        check("the turn ends done",
              rec.wait(lambda r: any(t.id == agent and t.status == em.TaskStatus.DONE
                                     for t in r.tasks), timeout=2 * DEADLINE))
        raises("a second answer is InvalidInput", em.ErrandError.InvalidInput,
               lambda: client.answer_permission(agent, "allow"))
        check("reply opens the next turn", client.reply(agent, "and then?") == 2)
        check("the second turn ends done",
              rec.wait(lambda r: any(t.id == agent and t.attempt == 2
                                     and t.status == em.TaskStatus.DONE for t in r.tasks),
                       timeout=2 * DEADLINE))
        view = client.task(agent)
        check("the conversation alternates user and agent",
              [u.role for u in view.conversation]
              == [em.Role.USER, em.Role.AGENT, em.Role.USER, em.Role.AGENT],
              str(view.conversation))
        check("the agent's tool call is listed",
              any(c.id == "call-1" and c.status == "completed" for c in view.tool_calls),
              str(view.tool_calls))
    else:
        print("note: no --expect-done (the desktop does not run tasks yet): checked up to "
              "the desktop having the task", flush=True)
        check("the task is still listed", client.task(task_id).id == task_id)

    # --- forget, shut down, reopen --------------------------------------------------------
    check("forget returns the desktop", client.forget() == [desktop])
    raises("sync_once after forget is NotPaired", em.ErrandError.NotPaired,
           lambda: client.sync_once(100))
    check("the thread stays readable after forget", client.task(task_id).id == task_id)
    check("listener calls came from a background thread",
          "MainThread" not in rec.threads, str(rec.threads))
    del sub
    client.shutdown()
    client.shutdown()
    raises("calls after shutdown are Internal", em.ErrandError.Internal, client.thread)
    again = em.PhoneClient.open_with(args.home, "python-phone", LOOPBACK)
    ids = [t.id for t in again.thread().tasks]
    check("after reopening, both tasks are still there", task_id in ids and second in ids, str(ids))
    again.shutdown()


try:
    main()
except Exception:  # noqa: BLE001  (a crash is one more failure, reported with its trace)
    traceback.print_exc()
    failed += 1
print(f"{passed} passed, {failed} failed", flush=True)
sys.exit(0 if failed == 0 else 1)
