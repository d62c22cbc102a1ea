#!/usr/bin/env python3
"""Profiles the paths behind errand-bench's missed goals with valgrind (issue 8).

Drives the same release binaries errand-bench drives (errand-benchpeer, errand-desktop), on
copies of errand-bench's cached fixtures, and runs the process of interest under valgrind:

  p1   P1/P3 on the large thread (or --thread small): the desktop (receiver) and the phone
       (sender) under callgrind, instrumentation on only while K tasks go phone -> desktop.
  p2   P2: N tasks queued offline on the phone (small base thread), then the catch-up; both
       peers under callgrind, instrumentation on from `start-net` to the phone in sync.
  p4   P4: `errand-desktop run` on the large thread under callgrind, counted from exec to
       its "running" line (dumped there with callgrind_control -d).
  p7   P7: `errand-desktop run` on the large thread under massif; a detailed heap snapshot is
       taken once it is idle (vgdb detailed_snapshot), next to the native process's VmRSS.

Output goes to --out (callgrind.out.* / massif.out.* files, plus summary text from
callgrind_annotate / ms_print). Needs valgrind (callgrind_control, callgrind_annotate, vgdb,
ms_print). Build first: cargo build --release -p errand-tests -p errand-desktop --bins, and
run errand-bench once so the fixtures exist (target/bench-cache).
"""

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TASK_TEXT = "summarise the CSVs in ~/Downloads"


def log(msg):
    print(f"profile.py [{time.monotonic() - START:7.1f} s] {msg}", file=sys.stderr, flush=True)


START = time.monotonic()
FORMAT = None  # fixture format; --format


class Proc:
    """A child whose stdout lines are read on a thread (JSON events, or plain lines)."""

    def __init__(self, name, argv, logdir, env=None):
        self.name = name
        self.err = open(os.path.join(logdir, f"{name}.stderr"), "w")
        e = dict(os.environ, RUST_LOG="warn")
        e.update(env or {})
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.err, text=True, env=e)
        self.q = queue.Queue()
        self.backlog = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    @property
    def pid(self):
        return self.p.pid

    def send(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def wait_line(self, pred, timeout, what):
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: timed out waiting for {what}")
            try:
                line = self.q.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.name} closed stdout waiting for {what}")
            if pred(line):
                return line

    def wait_ev(self, pred, timeout, what):
        for i, v in enumerate(self.backlog):
            if pred(v):
                return self.backlog.pop(i)
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: timed out waiting for {what}")
            try:
                line = self.q.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.name} closed stdout waiting for {what}")
            try:
                v = json.loads(line)
            except ValueError:
                continue
            if pred(v):
                return v
            self.backlog.append(v)

    def request(self, line, answer, timeout=600):
        self.send(line)
        cmd = line.split()[0]
        v = self.wait_ev(lambda v: v.get("ev") == answer or
                         (v.get("ev") == "error" and v.get("cmd") == cmd), timeout, cmd)
        if v.get("ev") == "error":
            raise RuntimeError(f"{self.name} {cmd}: {v.get('error')}")
        return v

    def clear(self):
        self.backlog.clear()
        while not self.q.empty():
            self.q.get_nowait()

    def quit(self, timeout=600):
        try:
            self.send("quit")
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()

    def term(self, timeout=600):
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def callgrind(out, instr_at_start):
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            f"--instr-atstart={'yes' if instr_at_start else 'no'}"]


def cg_instr(pid, on):
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(pid)],
                   check=True, stdout=subprocess.DEVNULL)


def annotate(out, summary, extra=()):
    """callgrind_annotate, inclusive and exclusive, into summary files next to `out`."""
    for mode, flag in (("inclusive", "--inclusive=yes"), ("exclusive", "--inclusive=no")):
        with open(f"{summary}.{mode}.txt", "w") as f:
            subprocess.run(["callgrind_annotate", flag, "--threshold=99.9", *extra, out],
                           stdout=f, stderr=subprocess.STDOUT, check=False)


def fixture_dir(cache, tasks, fmt):
    """errand-bench's cached fixture of `tasks` tasks: format `fmt`, or the newest there is."""
    if fmt is None:
        found = [d for d in os.listdir(cache)
                 if d.endswith(f"-{tasks}x4") and d[1:].split("-")[0].isdigit()]
        if not found:
            sys.exit(f"no {tasks}-task fixture in {cache}: run errand-bench once first")
        return os.path.join(cache, max(found, key=lambda d: int(d[1:].split("-")[0])))
    return os.path.join(cache, f"v{fmt}-{tasks}x4")


def copy_fixture(cache, tasks, work, label):
    src = fixture_dir(cache, tasks, FORMAT)
    meta = json.load(open(os.path.join(src, "fixture.json")))
    dst = os.path.join(work, label)
    shutil.copytree(os.path.join(src, "desktop"), os.path.join(dst, "desktop"))
    shutil.copytree(os.path.join(src, "phone"), os.path.join(dst, "phone"))
    return meta, os.path.join(dst, "desktop"), os.path.join(dst, "phone")


def peer(bin_dir, home, kind, logdir, name, wrap=()):
    p = Proc(name, [*wrap, os.path.join(bin_dir, "errand-benchpeer"), "peer", "--home", home,
                    "--kind", kind], logdir)
    ready = p.wait_ev(lambda v: v.get("ev") == "ready", 1800, "ready")
    return p, ready


def start_pair(a, tasks, label, wrap_desktop=(), wrap_phone=()):
    meta, dh, ph = copy_fixture(a.cache, tasks, a.work, label)
    log(f"{label}: starting the desktop")
    desktop, ready = peer(a.bin, dh, "desktop", a.out, f"{label}-desktop", wrap_desktop)
    log(f"{label}: starting the phone")
    phone, _ = peer(a.bin, ph, "phone", a.out, f"{label}-phone", wrap_phone)
    addr = ready["listen_addrs"][0]
    phone.request(f"dial {meta['desktop_id']} {addr}", "dialing")
    phone.wait_ev(lambda v: v.get("ev") == "in_sync" and v.get("peer") == meta["desktop_id"],
                  1800, "phone in sync")
    desktop.wait_ev(lambda v: v.get("ev") == "in_sync" and v.get("peer") == meta["phone_id"],
                    1800, "desktop in sync")
    log(f"{label}: in sync")
    return meta, desktop, phone, addr


def one_task(meta, desktop, phone, text):
    phone.clear()
    desktop.clear()
    sent = phone.request(f"send {text}", "sent")
    task = sent["task"]
    merged = desktop.wait_ev(lambda v: v.get("ev") == "merged" and task in v.get("tasks", []),
                             600, "merged")
    phone.wait_ev(lambda v: v.get("ev") == "in_sync" and v.get("peer") == meta["desktop_id"],
                  600, "ack")
    return (merged["t"] - sent["t0"]) / 1e6


def run_p1(a):
    tag = f"p1-{a.thread}"
    d_out = os.path.join(a.out, f"{tag}-desktop.callgrind.out")
    p_out = os.path.join(a.out, f"{tag}-phone.callgrind.out")
    tasks = 20000 if a.thread == "large" else 250
    meta, desktop, phone, _ = start_pair(a, tasks, tag, callgrind(d_out, False),
                                         callgrind(p_out, False))
    for i in range(2):  # warm-up, not counted
        one_task(meta, desktop, phone, f"warmup {i}: {TASK_TEXT}")
    time.sleep(1)
    cg_instr(desktop.pid, True)
    cg_instr(phone.pid, True)
    lat = []
    for i in range(a.tasks):
        time.sleep(0.3)
        lat.append(one_task(meta, desktop, phone, f"profile task {i}: {TASK_TEXT}"))
    time.sleep(1)
    cg_instr(desktop.pid, False)
    cg_instr(phone.pid, False)
    log(f"{tag}: {a.tasks} tasks under callgrind, latencies (ms): {[round(x) for x in lat]}")
    desktop.quit()
    phone.quit()
    annotate(d_out, os.path.join(a.out, f"{tag}-desktop"))
    annotate(p_out, os.path.join(a.out, f"{tag}-phone"))


def run_p2(a):
    d_out = os.path.join(a.out, "p2-desktop.callgrind.out")
    p_out = os.path.join(a.out, "p2-phone.callgrind.out")
    meta, desktop, phone, addr = start_pair(a, 250, "p2", callgrind(d_out, False),
                                            callgrind(p_out, False))
    phone.request("stop-net", "net")
    desktop.wait_ev(lambda v: v.get("ev") == "disconnected" and v.get("peer") == meta["phone_id"],
                    600, "disconnected")
    log(f"p2: filling {a.n} tasks offline")
    phone.request(f"fill {a.n} offline task", "filled", 3600)
    phone.clear()
    desktop.clear()
    cg_instr(desktop.pid, True)
    cg_instr(phone.pid, True)
    t = time.monotonic()
    phone.request(f"start-net {meta['desktop_id']} {addr}", "net")
    seen = set()
    while len(seen) < a.n:
        v = desktop.wait_ev(lambda v: v.get("ev") == "merged", 3600, "merges")
        seen.update(v.get("tasks", []))
    phone.wait_ev(lambda v: v.get("ev") == "in_sync" and v.get("peer") == meta["desktop_id"],
                  3600, "in sync")
    log(f"p2: catch-up of {a.n} under callgrind took {time.monotonic() - t:.1f} s")
    cg_instr(desktop.pid, False)
    cg_instr(phone.pid, False)
    desktop.quit()
    phone.quit()
    annotate(d_out, os.path.join(a.out, "p2-desktop"))
    annotate(p_out, os.path.join(a.out, "p2-phone"))


def desktop_run(a, home, wrap, name):
    argv = [*wrap, os.path.join(a.bin, "errand-desktop"), "--home", home, "run", "--listen",
            "/ip4/127.0.0.1/tcp/0", "--no-mdns"]
    return Proc(name, argv, a.out)


def run_p4(a):
    _, dh, _ = copy_fixture(a.cache, 20000, a.work, "p4")
    out = os.path.join(a.out, "p4-desktop.callgrind.out")
    d = desktop_run(a, dh, callgrind(out, True), "p4-desktop")
    d.wait_line(lambda l: " running" in l, 3600, "running")
    # The dump holds exec -> "running"; the rest (idle, shutdown) goes to a second file.
    subprocess.run(["callgrind_control", "-d", "ready", str(d.pid)], check=True,
                   stdout=subprocess.DEVNULL)
    d.term()
    dumps = sorted(f for f in os.listdir(a.out) if f.startswith("p4-desktop.callgrind.out."))
    log(f"p4: dumps {dumps}")
    if dumps:
        annotate(os.path.join(a.out, dumps[0]), os.path.join(a.out, "p4-desktop"))


def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_p7(a):
    # Native first: VmRSS once idle, and glibc's own malloc statistics (malloc_stats via gdb).
    _, dh, _ = copy_fixture(a.cache, 20000, a.work, "p7-native")
    d = desktop_run(a, dh, (), "p7-native-desktop")
    d.wait_line(lambda l: " running" in l, 600, "running")
    time.sleep(a.settle)
    rss = rss_kb(d.pid)
    with open(os.path.join(a.out, "p7-native-smaps_rollup.txt"), "w") as f:
        f.write(open(f"/proc/{d.pid}/smaps_rollup").read())
    subprocess.run(["gdb", "-p", str(d.pid), "-batch", "-ex", "call (void)malloc_stats()"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    time.sleep(0.5)
    log(f"p7: native idle VmRSS {rss} kB (malloc_stats in p7-native-desktop.stderr)")
    d.term()
    # Then under massif: the heap by allocation site, peak and idle.
    _, dh, _ = copy_fixture(a.cache, 20000, a.work, "p7-massif")
    out = os.path.join(a.out, "p7-desktop.massif.out")
    wrap = ["valgrind", "--tool=massif", f"--massif-out-file={out}", "--vgdb=yes",
            "--depth=40", "--threshold=0.5"]
    d = desktop_run(a, dh, wrap, "p7-massif-desktop")
    d.wait_line(lambda l: " running" in l, 3600, "running")
    time.sleep(a.settle)
    idle = os.path.join(a.out, "p7-desktop-idle.massif.out")
    subprocess.run(["vgdb", "--pid=" + str(d.pid), "detailed_snapshot", idle],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    d.term()
    for f in (out, idle):
        if os.path.exists(f):
            with open(f + ".txt", "w") as o:
                subprocess.run(["ms_print", "--threshold=0.5", f], stdout=o, check=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["p1", "p2", "p4", "p7"])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--cache", default=os.path.join(ROOT, "target", "bench-cache"))
    ap.add_argument("--out", required=True, help="directory for the profiles")
    ap.add_argument("--tasks", type=int, default=5, help="p1: tasks counted")
    ap.add_argument("--thread", choices=["small", "large"], default="large",
                    help="p1: the fixture (250 or 20,000 tasks)")
    ap.add_argument("--n", type=int, default=10000, help="p2: tasks queued offline")
    ap.add_argument("--settle", type=float, default=5.0, help="p7: idle seconds before reading")
    ap.add_argument("--format", type=int, help="fixture format (default: the newest cached)")
    a = ap.parse_args()
    global FORMAT
    FORMAT = a.format
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="errand-profile-") as work:
        a.work = work
        {"p1": run_p1, "p2": run_p2, "p4": run_p4, "p7": run_p7}[a.what](a)
    log("done")


if __name__ == "__main__":
    main()
