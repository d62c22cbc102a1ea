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
       With --thread empty: errand-bench's empty-thread P7 (fresh homes, `errand-desktop run`
       and `errand-phone daemon` paired and in sync): both daemons' RSS by mapping kind
       (smaps), threads and malloc_stats, under a few environments (MALLOC_ARENA_MAX=1,
       MALLOC_TRIM_THRESHOLD_=0, TOKIO_WORKER_THREADS=1), then each under massif at idle,
       heap by allocation site (p7-empty.md).
  p5   P5: --part mem: errand-relay (errand-bench's flags) and the stock relay, RSS by mapping
       kind and malloc_stats before/after --reservations idle reservations, then each under
       massif, heap per reservation by allocation site (p5-mem.md). --part throughput:
       errand-bench's throughput test (one errand-benchpeer process: client and server) through
       errand-relay under `perf record -a`; CPU per process per MB from /proc, direct and
       relayed, and each process's self time by function and category (p5-throughput.md).

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
    if a.thread == "empty":
        return run_p7_touched(a) if a.touched else run_p7_empty(a)
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


# ---- P5 and P7 (empty thread): memory breakdowns and the relayed throughput's CPU ------------

# errand-bench's P5_RELAY_FLAGS: count limits out of the way, rate limits off, circuit bytes
# unlimited.
P5_RELAY_FLAGS = ["--max-reservations", "20000", "--max-circuits", "20000",
                  "--max-connections", "40000", "--max-pending-connections", "1024",
                  "--reservation-rate-per-peer", "0", "--reservation-rate-per-ip", "0",
                  "--circuit-rate-per-peer", "0", "--circuit-rate-per-ip", "0",
                  "--max-circuit-bytes", "0"]


def status_kb(pid):
    """VmRSS, RssAnon, RssFile, VmHWM (kB) and Threads from /proc/PID/status."""
    out = {}
    for line in open(f"/proc/{pid}/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "Threads"):
            out[k] = int(v.split()[0])
    return out


def smaps_breakdown(pid):
    """RSS (kB) of /proc/PID/smaps by kind of mapping.

    The executable's own mappings by permission (text r-x, read-only r--, data rw-), shared
    libraries, the brk heap (glibc's main arena), other glibc arenas (an rw- anonymous mapping
    starting on a 64 MiB boundary, followed by its ---p reserve), thread stacks (an rw- anonymous
    mapping right after a ---p guard page), the main stack, and any other anonymous mapping
    (large malloc'ed blocks are mmap'd on their own, as are runtime/library mmaps)."""
    exe = os.path.realpath(f"/proc/{pid}/exe")
    maps = []
    cur = None
    for line in open(f"/proc/{pid}/smaps"):
        f = line.split()
        if "-" in f[0] and not f[0].endswith(":"):
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            cur = {"lo": lo, "hi": hi, "perm": f[1], "path": " ".join(f[5:]) if len(f) > 5 else "",
                   "rss": 0}
            maps.append(cur)
        elif f[0] == "Rss:":
            cur["rss"] = int(f[1])
    out = {}
    for i, m in enumerate(maps):
        path, perm = m["path"], m["perm"]
        if path == exe or path.startswith(exe + " "):
            kind = {"r-xp": "binary text (r-x)", "r--p": "binary read-only (r--)",
                    "rw-p": "binary data (rw-)"}.get(perm, f"binary {perm}")
        elif path == "[heap]":
            kind = "brk heap (main arena)"
        elif path == "[stack]":
            kind = "main thread stack"
        elif path.startswith("["):
            kind = f"{path}"
        elif path:
            kind = "shared libraries"
        elif perm == "---p":
            kind = "guard / arena reserve (---p)"
        else:
            prev = maps[i - 1] if i else None
            nxt = maps[i + 1] if i + 1 < len(maps) else None
            if m["lo"] % (64 << 20) == 0 and nxt and nxt["perm"] == "---p" and \
                    nxt["lo"] == m["hi"] and not nxt["path"]:
                kind = "glibc arenas (non-main)"
            elif prev and prev["perm"] == "---p" and prev["hi"] == m["lo"] and not prev["path"]:
                kind = "thread stacks"
            else:
                kind = "other anonymous mmap"
        out[kind] = out.get(kind, 0) + m["rss"]
    return out


def malloc_stats(pid, stderr_path):
    """glibc's malloc_stats() of a live process (through gdb; it prints to the process's
    stderr): the totals over all arenas, bytes."""
    before = os.path.getsize(stderr_path)
    subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "call (void)malloc_stats()"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    time.sleep(0.5)
    with open(stderr_path) as f:
        f.seek(before)
        text = f.read()
    tot = text.rfind("Total (incl. mmap):")
    out = {"arenas": text.count("Arena ")}
    if tot >= 0:
        for line in text[tot:].splitlines()[1:4]:
            k, _, v = line.partition("=")
            if v.strip().isdigit():
                out[k.strip()] = int(v)
    return out


def mem_report(pid, stderr_path=None):
    r = {"status": status_kb(pid), "smaps": smaps_breakdown(pid),
         "threads": sorted(open(f"/proc/{pid}/task/{t}/comm").read().strip()
                           for t in os.listdir(f"/proc/{pid}/task"))}
    if stderr_path:
        r["malloc"] = malloc_stats(pid, stderr_path)
    return r


# Frames that say nothing about who allocated: the allocator, std/core/alloc generics, hash
# maps and buffers. A site is the first frame past them with a full path (inlined frames carry
# only a short name; a path with `::` is the function they were inlined into, or a call).
BORING = ("alloc::", "core::", "std::", "__rust", "__rdl", "__rg_", "hashbrown::", "bytes::",
          "smallvec::", "indexmap::", "T as ", "&mut T as ", "&T as ", "[T] as ", "serde::",
          "futures_util::", "futures_core::", "tracing::", "tracing_core::",
          "asynchronous_codec::", "unsigned_varint::", "quick_protobuf::", "prost::")


def strip_generics(name):
    out, depth = [], 0
    for ch in name:
        if ch == "<":
            depth += 1
            if depth == 1 and out and out[-1] not in ":":
                pass
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    s = "".join(out).strip()
    return s.replace(" as ", " as ").lstrip("&")


def site_of(stack):
    """(site, caller): the first meaningful frame of an allocation's stack (innermost first),
    and the next meaningful frame of another function."""
    named = []
    for fn in stack[1:]:
        name = fn.split(" (", 1)[0]
        if ": " in name and name.startswith("0x"):
            name = name.split(": ", 1)[1]
        loc = fn.rsplit(" (", 1)[1].rstrip(")") if " (" in fn else ""
        named.append((name, loc))
    sites = []
    for i, (name, loc) in enumerate(named):
        full = name.lstrip("<")
        if "::" not in name or full.startswith(BORING) or name.startswith("in "):
            continue
        s = strip_generics(name.lstrip("<"))
        if "::" not in s or s.startswith(BORING):
            continue
        if not sites or sites[-1] != s:
            sites.append(s)
        if len(sites) == 2:
            break
    if not sites:
        return "(no meaningful frame: " + (named[0][0][:60] if named else "?") + ")", ""
    return sites[0], sites[1] if len(sites) > 1 else ""


def massif_sites(path, snapshot=None, pairs=False):
    """Heap bytes (useful, not malloc overhead) of one detailed massif snapshot by allocation
    site (see site_of), or by (site, caller) with pairs. Returns ({site: bytes}, heap_B,
    extra_B)."""
    lines = open(path).read().splitlines()
    snaps = []
    i = 0
    while i < len(lines):
        if lines[i].startswith("snapshot="):
            j = i + 1
            heap = extra = 0
            tree = None
            while j < len(lines) and not lines[j].startswith("snapshot="):
                if lines[j].startswith("mem_heap_B="):
                    heap = int(lines[j].split("=")[1])
                elif lines[j].startswith("mem_heap_extra_B="):
                    extra = int(lines[j].split("=")[1])
                elif lines[j] in ("heap_tree=detailed", "heap_tree=peak"):
                    tree = j + 1
                j += 1
            snaps.append((heap, extra, tree, j))
            i = j
        else:
            i += 1
    snaps = [s for s in snaps if s[2] is not None]
    if not snaps:
        return {}, 0, 0
    heap, extra, start, end = snaps[-1 if snapshot is None else snapshot]
    nodes = []  # (bytes, frame text, children)
    for line in lines[start:end]:
        s = line.lstrip(" ")
        if not s.startswith("n"):
            continue
        head, _, rest = s.partition(": ")
        b, _, fn = rest.partition(" ")
        nodes.append((int(b), fn, int(head[1:])))
    sites = {}
    pos = [0]

    def add(stack, b):
        site, caller = site_of(stack)
        key = f"{site} <- {caller}" if pairs else site
        sites[key] = sites.get(key, 0) + b

    def walk(stack):
        b, fn, n = nodes[pos[0]]
        pos[0] += 1
        if fn.startswith("in ") and n == 0:  # "in N places, all below massif's threshold"
            add(stack, b)
            return
        stack = stack + [fn]
        covered = 0
        for _ in range(n):
            covered += nodes[pos[0]][0]
            walk(stack)
        if b > covered:
            add(stack, b - covered)

    while pos[0] < len(nodes):
        walk([])
    return sites, heap, extra


def crate_of(site):
    s = site.lstrip("<&(")
    return s.split("::", 1)[0] if "::" in s else s.split(" ", 1)[0]


def write_sites(f, title, sites, per=1, unit="B", top=25, pairs=None):
    total = sum(sites.values())
    f.write(f"\n## {title}\n\ntotal {total / per:,.0f} {unit}\n\n")
    crates = {}
    for s, b in sites.items():
        c = crate_of(s)
        crates[c] = crates.get(c, 0) + b
    f.write(f"| crate of the site | {unit} | % |\n|---|---|---|\n")
    for c, b in sorted(crates.items(), key=lambda kv: -abs(kv[1]))[:15]:
        f.write(f"| {c} | {b / per:,.0f} | {100 * b / total if total else 0:.1f} |\n")
    f.write(f"\n| site (first non-generic frame) | {unit} | % |\n|---|---|---|\n")
    for s, b in sorted(sites.items(), key=lambda kv: -abs(kv[1]))[:top]:
        f.write(f"| `{s[:200]}` | {b / per:,.0f} | {100 * b / total if total else 0:.1f} |\n")
    if pairs:
        f.write(f"\n| site <- caller | {unit} |\n|---|---|\n")
        for s, b in sorted(pairs.items(), key=lambda kv: -abs(kv[1]))[:top]:
            f.write(f"| `{s[:260]}` | {b / per:,.0f} |\n")


def massif_wrap(out):
    return ["valgrind", "--tool=massif", f"--massif-out-file={out}", "--vgdb=yes",
            "--depth=40", "--threshold=0.1",
            "--detailed-freq=1000000", "--max-snapshots=100"]


def massif_snapshot(pid, path):
    subprocess.run(["vgdb", f"--pid={pid}", "detailed_snapshot", path],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    for _ in range(100):
        if os.path.exists(path) and os.path.getsize(path) > 0:
            break
        time.sleep(0.1)
    time.sleep(0.5)


def start_relay(a, kind, wrap, name):
    """errand-relay (errand-bench's P5 flags) or the stock relay; returns (Proc, address)."""
    if kind == "errand":
        home = tempfile.mkdtemp(prefix="relay-", dir=a.work)
        p = Proc(name, [*wrap, os.path.join(a.bin, "errand-relay"), "--listen",
                        "/ip4/127.0.0.1/tcp/0", "--home", home, "--stats-interval", "0s",
                        *P5_RELAY_FLAGS], a.out)
        addr = p.wait_line(lambda l: "/p2p/" in l, 600, "the relay address").strip()
    else:
        p = Proc(name, [*wrap, os.path.join(a.bin, "errand-benchpeer"), "stock-relay"], a.out)
        addr = p.wait_ev(lambda v: v.get("ev") == "ready", 600, "ready")["addr"]
    return p, addr


def reserve(a, addr, name):
    c = Proc(name, [os.path.join(a.bin, "errand-benchpeer"), "reserve", "--relay", addr,
                    "--count", str(a.reservations)], a.out)
    v = c.wait_ev(lambda v: v.get("ev") == "reserved", 1800, "reserved")
    if v.get("n") != a.reservations:
        raise RuntimeError(f"{name}: only {v.get('n')} of {a.reservations} reserved: {v.get('first_error')}")
    log(f"{name}: {a.reservations} reservations in {v['ms'] / 1e3:.1f} s")
    return c


def diff(after, before):
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}


def p5_mem(a):
    """Per-reservation memory of errand-relay and the stock relay: native RSS by mapping kind
    and glibc's in-use bytes, then (one valgrind at a time) massif's heap by allocation site."""
    res = {}
    report = open(os.path.join(a.out, "p5-mem.md"), "w")
    report.write(f"# P5: relay memory per idle reservation ({a.reservations} reservations)\n")
    for kind in ("errand", "stock"):
        for run in range(a.runs):
            relay, addr = start_relay(a, kind, (), f"p5-{kind}-native{run}")
            time.sleep(a.settle)
            m0 = mem_report(relay.pid, relay.err.name)
            c = reserve(a, addr, f"p5-{kind}-reserve{run}")
            time.sleep(a.settle)
            m1 = mem_report(relay.pid, relay.err.name)
            c.quit(30)
            relay.term(30)
            st = diff(m1["status"], m0["status"])
            sm = diff(m1["smaps"], m0["smaps"])
            ml = diff(m1["malloc"], m0["malloc"])
            res.setdefault(kind, []).append({"before": m0, "after": m1})
            log(f"p5 {kind} run {run}: RSS/res {st['VmRSS'] / a.reservations:.2f} KiB, "
                f"anon {st['RssAnon'] / a.reservations:.2f}, file {st['RssFile'] / a.reservations:.2f}, "
                f"malloc in use {ml.get('in use bytes', 0) / 1024 / a.reservations:.2f} KiB, "
                f"system {ml.get('system bytes', 0) / 1024 / a.reservations:.2f} KiB")
            report.write(f"\n## {kind} relay, native run {run}\n\n"
                         f"threads {m0['status']['Threads']} -> {m1['status']['Threads']}; "
                         f"malloc arenas {m0['malloc'].get('arenas')} -> "
                         f"{m1['malloc'].get('arenas')}\n\n| | before kB | after kB | "
                         f"per reservation KiB |\n|---|---|---|---|\n")
            for k in ("VmRSS", "RssAnon", "RssFile"):
                report.write(f"| {k} | {m0['status'][k]} | {m1['status'][k]} | "
                             f"{st[k] / a.reservations:.2f} |\n")
            for k in sorted(set(m0["smaps"]) | set(m1["smaps"])):
                report.write(f"| smaps: {k} | {m0['smaps'].get(k, 0)} | "
                             f"{m1['smaps'].get(k, 0)} | {sm[k] / a.reservations:.2f} |\n")
            for k in ("system bytes", "in use bytes"):
                report.write(f"| malloc_stats {k} | {m0['malloc'].get(k, 0) // 1024} | "
                             f"{m1['malloc'].get(k, 0) // 1024} | {ml.get(k, 0) / 1024 / a.reservations:.2f} |\n")
            report.flush()
    json.dump(res, open(os.path.join(a.out, "p5-mem-native.json"), "w"), indent=1)
    if a.no_massif:
        return
    for kind in ("errand", "stock"):
        out = os.path.join(a.out, f"p5-{kind}.massif.out")
        relay, addr = start_relay(a, kind, massif_wrap(out), f"p5-{kind}-massif")
        time.sleep(a.settle)
        s0 = os.path.join(a.out, f"p5-{kind}-before.massif.out")
        massif_snapshot(relay.pid, s0)
        c = reserve(a, addr, f"p5-{kind}-massif-reserve")
        time.sleep(a.settle * 2)
        s1 = os.path.join(a.out, f"p5-{kind}-after.massif.out")
        massif_snapshot(relay.pid, s1)
        c.quit(60)
        relay.term(120)
        b0, h0, e0 = massif_sites(s0)
        b1, h1, e1 = massif_sites(s1)
        d = diff(b1, b0)
        dp = diff(massif_sites(s1, pairs=True)[0], massif_sites(s0, pairs=True)[0])
        log(f"p5 {kind} massif: heap/res {(h1 - h0) / 1024 / a.reservations:.2f} KiB, "
            f"malloc overhead/res {(e1 - e0) / 1024 / a.reservations:.2f} KiB")
        report.write(f"\n## {kind} relay, massif\n\nheap {h0:,} -> {h1:,} B "
                     f"({(h1 - h0) / a.reservations:,.0f} B per reservation); massif's malloc overhead "
                     f"estimate {e0:,} -> {e1:,} B ({(e1 - e0) / a.reservations:,.0f} B per reservation)\n")
        write_sites(report, f"{kind} relay: heap per reservation by site (B)", d, a.reservations,
                    "B", a.top, dp)
        for s in (s0, s1):
            with open(s + ".txt", "w") as o:
                subprocess.run(["ms_print", "--threshold=0.5", s], stdout=o, check=False)
        report.flush()
    report.close()


def system_busy_ticks():
    """Busy clock ticks of all CPUs together, from /proc/stat."""
    f = open("/proc/stat").readline().split()
    return sum(int(x) for x in f[1:4]) + sum(int(x) for x in f[6:9])


def cpu_ticks(pid):
    """utime + stime of a whole process, clock ticks."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


CATEGORIES = (  # first match wins; perf symbol text, "[k] " = kernel
    ("kernel: copy to/from user, page clearing", ("[k] copy_", "[k] _copy_", "[k] rep_movs",
                                                  "[k] clear_page")),
    ("kernel: other (TCP, syscalls, scheduler, page faults)", ("[k] ",)),
    ("Noise: ChaCha20-Poly1305", ("chacha", "poly1305", "ChaCha", "Poly1305", "universal_hash",
                                  "aead::", "cipher::", "snow::")),
    ("Noise framing (libp2p-noise)", ("libp2p_noise",)),
    ("yamux", ("yamux",)),
    ("memcpy/memmove/memset (user)", ("memcpy", "memmove", "memset")),
    ("malloc/free", ("malloc", "_int_free", "_int_realloc", "cfree", "calloc", "realloc",
                     "__rust_dealloc", "__rdl_", "free@")),
    ("tokio", ("tokio::",)),
    ("futures / libp2p other", ("futures", "libp2p", "multistream", "asynchronous_codec",
                                "quick_protobuf")),
)


def categorize(sym):
    for name, pats in CATEGORIES:
        if any(p in sym for p in pats):
            return name
    return "other (user)"


_PERF_SAMPLES = {}


def perf_flat(data, pid, t0, t1):
    """Self time of one process in [t0, t1] from `perf script` (perf report's --pid with
    --time drops samples here): [(percent of the process's samples, "[.] sym" or "[k] sym")]."""
    if data not in _PERF_SAMPLES:
        r = subprocess.run(["perf", "script", "-i", data, "-F", "pid,tid,time,ip,sym,dso",
                            "--hide-call-graph"], capture_output=True, text=True, check=False)
        rows = []
        for line in r.stdout.splitlines():
            f = line.split()
            if len(f) < 4 or "/" not in f[0]:
                continue
            try:
                t = float(f[1].rstrip(":"))
            except ValueError:
                continue
            dso = f[-1]
            kind = "[k]" if "kernel" in dso else "[.]"
            rows.append((int(f[0].split("/")[0]), t, f"{kind} {' '.join(f[3:-1]) or dso}"))
        _PERF_SAMPLES[data] = rows
    counts = {}
    for p, t, sym in _PERF_SAMPLES[data]:
        if p == pid and t0 <= t <= t1:
            sym = sym.split("+0x")[0]
            counts[sym] = counts.get(sym, 0) + 1
    total = sum(counts.values()) or 1
    return sorted(((100 * n / total, s) for s, n in counts.items()), reverse=True)


def p5_throughput(a):
    """errand-relay and the throughput client/server (one errand-benchpeer process, as in
    errand-bench) under `perf record -a`; CPU time per process per MB from /proc, direct and
    relayed, and the self-time profile of each process in each phase, by category."""
    relay, addr = start_relay(a, "errand", (), "p5-tp-relay")
    data = os.path.join(a.out, "p5-throughput.perf.data")
    perf = subprocess.Popen(["perf", "record", "-a", "-F", str(a.freq), "-k", "CLOCK_MONOTONIC",
                             *(["--call-graph", "dwarf,16384"] if a.callgraph else []),
                             "-o", data], stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(a.out, "perf-record.stderr"), "w"))
    time.sleep(1.5)
    tp = Proc("p5-throughput", [os.path.join(a.bin, "errand-benchpeer"), "throughput", "--relay",
                                addr, "--bytes", str(a.bytes), "--runs", str(a.runs)], a.out)
    samples = []  # (t, relay ticks, benchpeer ticks)
    done = []

    def sample():
        while not done:
            try:
                samples.append((time.monotonic(), cpu_ticks(relay.pid), cpu_ticks(tp.pid),
                                system_busy_ticks()))
            except (OSError, IndexError):
                break
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    v = tp.wait_ev(lambda v: v.get("ev") == "throughput", 1800, "throughput")
    done.append(1)
    th.join()
    time.sleep(0.5)
    perf.send_signal(signal.SIGINT)
    perf.wait()
    tp.quit(30)
    relay.term(30)
    hz = os.sysconf("SC_CLK_TCK")
    mb = a.bytes * a.runs / 1e6
    # The relayed phase: the relay busy (over a quarter of a core between two samples 50 ms
    # apart); the direct phase: the benchpeer busy before it.
    def busy(col, frac=0.25, gap=5):
        idx = [i for i in range(gap, len(samples))
               if (samples[i][col] - samples[i - gap][col]) / hz >
               frac * (samples[i][0] - samples[i - gap][0])]
        return idx

    r_idx = busy(1)
    r0, r1 = samples[r_idx[0] - 5], samples[r_idx[-1]]
    b_idx = [i for i in busy(2) if samples[i][0] < r0[0]]
    d0, d1 = samples[b_idx[0] - 5], samples[b_idx[-1]]
    phases = {"direct": (d0, d1), "relayed": (r0, r1)}
    rep = open(os.path.join(a.out, "p5-throughput.md"), "w")
    rep.write(f"# P5 throughput: {a.runs} runs of {a.bytes:,} B per path\n\n"
              f"throughput event: {json.dumps(v['mbps'])}\n\n"
              f"| phase | wall s | MB/s | relay CPU s | benchpeer CPU s (client+server) | relay "
              f"cores | benchpeer cores | other processes' cores (incl. perf) | relay CPU ms/MB "
              f"| benchpeer CPU ms/MB | total CPU ms/MB |\n"
              f"|---|---|---|---|---|---|---|---|---|---|---|\n")
    for name, (s0, s1) in phases.items():
        wall = s1[0] - s0[0]
        rc = (s1[1] - s0[1]) / hz
        bc = (s1[2] - s0[2]) / hz
        oc = (s1[3] - s0[3]) / hz - rc - bc
        rep.write(f"| {name} | {wall:.2f} | {mb / wall:.0f} | {rc:.2f} | {bc:.2f} | "
                  f"{rc / wall:.2f} | {bc / wall:.2f} | {oc / wall:.2f} | {1e3 * rc / mb:.2f} | "
                  f"{1e3 * bc / mb:.2f} | {1e3 * (rc + bc) / mb:.2f} |\n")
        log(f"p5 throughput {name}: wall {wall:.2f} s, relay {rc:.2f} s CPU, benchpeer "
            f"{bc:.2f} s CPU for {mb:.0f} MB; other processes {oc / wall:.2f} cores")
    for name, (s0, s1) in phases.items():
        procs = [("benchpeer", tp.pid)] + ([("relay", relay.pid)] if name == "relayed" else [])
        for who, pid in procs:
            rows = perf_flat(data, pid, s0[0], s1[0])
            cats = {}
            for pct, sym in rows:
                c = categorize(sym)
                cats[c] = cats.get(c, 0) + pct
            rep.write(f"\n## {name}: {who} (pid {pid}), self time by category (% of its "
                      f"samples)\n\n| category | % |\n|---|---|\n")
            for c, pct in sorted(cats.items(), key=lambda kv: -kv[1]):
                rep.write(f"| {c} | {pct:.1f} |\n")
            rep.write(f"\ntop functions:\n\n| % | symbol | category |\n|---|---|---|\n")
            for pct, sym in rows[:a.top]:
                rep.write(f"| {pct:.2f} | `{sym[:150]}` | {categorize(sym)} |\n")
    rep.close()
    json.dump({"samples": samples, "hz": hz, "phases": {k: [p[0][0], p[1][0]]
                                                         for k, p in phases.items()},
               "relay": relay.pid, "benchpeer": tp.pid, "mbps": v["mbps"]},
              open(os.path.join(a.out, "p5-throughput.json"), "w"))


def run_p5(a):
    if a.part in ("mem", "all"):
        p5_mem(a)
    if a.part in ("throughput", "all"):
        p5_throughput(a)


def cli_run(a, binary, args, env=None):
    e = dict(os.environ, RUST_LOG="warn")
    e.update(env or {})
    r = subprocess.run([os.path.join(a.bin, binary), *args], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, env=e)
    if r.returncode != 0:
        raise RuntimeError(f"{binary} {args}: {r.stderr.strip()}")
    return r.stdout


def p7_empty_pair(a, label, env=None, wrap_desktop=(), wrap_phone=()):
    """errand-bench's p7_run on an empty thread: fresh homes, manual pairing, the desktop
    (`errand-desktop run`) and the phone (`errand-phone daemon`) connected and in sync."""
    dh = os.path.join(a.work, label, "desktop")
    ph = os.path.join(a.work, label, "phone")
    os.makedirs(os.path.dirname(dh))
    phone_id = json.loads(cli_run(a, "errand-phone", ["--home", ph, "status", "--json"]))["peer_id"]
    cli_run(a, "errand-desktop", ["--home", dh, "devices", "add", phone_id])
    listen = ["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"]
    d = Proc(f"{label}-desktop", [*wrap_desktop, os.path.join(a.bin, "errand-desktop"), "--home",
                                  dh, "run", *listen], a.out, env)
    running = d.wait_line(lambda l: " running" in l, 1800, "running")
    desktop_id = running.split()[1]
    addr = d.wait_line(lambda l: l.startswith("listening on "), 600, "listening")
    addr = addr[len("listening on "):].strip()
    cli_run(a, "errand-phone", ["--home", ph, "devices", "add", desktop_id, "--addr", addr])
    p = Proc(f"{label}-phone", [*wrap_phone, os.path.join(a.bin, "errand-phone"), "--home", ph,
                                "daemon", *listen], a.out, env)
    p.wait_line(lambda l: " running" in l, 1800, "running")
    end = time.monotonic() + 1800
    while True:
        try:
            v = json.loads(cli_run(a, "errand-phone", ["--home", ph, "status", "--json"]))
            if any(x.get("id") == desktop_id and x.get("in_sync") for x in v.get("peers", [])):
                break
        except (RuntimeError, ValueError):
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"{label}: the phone never got in sync")
        time.sleep(0.1)
    return d, p


def crate_of_symbol(sym):
    """The crate a demangled symbol's code belongs to: the first path that is not core, alloc or
    std (so `core::ptr::drop_in_place<libp2p_swarm::X>` counts for libp2p_swarm)."""
    import re
    names = re.findall(r"(?<![:\w])([A-Za-z_]\w*)::", sym)
    for n in names:
        if n not in ("core", "alloc", "std", "impl", "_", "T", "F", "S", "dyn", "mut"):
            return n
    return names[0] if names else "(C / no path)"


def text_by_crate(pid):
    """The executable's code (.text, from nm symbol sizes) by crate, and how much of it is
    resident in `pid` (present pages of the r-x mapping, from /proc/PID/pagemap; a resident
    page counts for the symbols in it by their bytes). Returns {crate: [size B, resident B]},
    the text segment's size and its resident bytes."""
    import struct
    exe = os.path.realpath(f"/proc/{pid}/exe")
    seg = None
    for line in subprocess.run(["readelf", "-lW", exe], capture_output=True,
                               text=True).stdout.splitlines():
        f = line.split()
        if f and f[0] == "LOAD" and f[-2] == "E":
            seg = (int(f[1], 16), int(f[2], 16), int(f[4], 16))  # offset, vaddr, filesz
    mapping = None
    for line in open(f"/proc/{pid}/maps"):
        f = line.split()
        if len(f) > 5 and f[5] == exe and f[1] == "r-xp":
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            mapping = (lo, hi, int(f[2], 16))
    off, vaddr, filesz = seg
    lo, hi, moff = mapping

    def rt(v):  # symbol vaddr -> runtime address
        return lo + (v - vaddr + off - moff)

    present = set()
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        pm.seek((lo // 4096) * 8)
        data = pm.read(((hi - lo) // 4096) * 8)
    for i in range(len(data) // 8):
        if struct.unpack_from("<Q", data, i * 8)[0] >> 63:
            present.add(lo // 4096 + i)
    out = {}
    nm = subprocess.run(["nm", "-C", "--defined-only", "-S", exe], capture_output=True,
                        text=True).stdout
    for line in nm.splitlines():
        f = line.split(" ", 3)
        if len(f) < 4 or f[2] not in "tTwW":
            continue
        v, size = int(f[0], 16), int(f[1], 16)
        if size == 0:
            continue
        c = crate_of_symbol(f[3])
        a = rt(v)
        res = 0
        p = a // 4096
        while p * 4096 < a + size:
            if p in present:
                res += min(a + size, (p + 1) * 4096) - max(a, p * 4096)
            p += 1
        e = out.setdefault(c, [0, 0])
        e[0] += size
        e[1] += res
    return out, filesz, len(present) * 4096


def write_text_by_crate(f, who, pid, top=20):
    crates, size, resident = text_by_crate(pid)
    f.write(f"\n## {who}: executable code by crate (nm sizes) and resident in the idle "
            f"process (pagemap)\n\ntext segment {size / 1e6:.2f} MB, resident "
            f"{resident / 1e6:.2f} MB ({100 * resident / size:.0f}%)\n\n"
            f"| crate | code MB | resident MB |\n|---|---|---|\n")
    for c, (s, r) in sorted(crates.items(), key=lambda kv: -kv[1][0])[:top]:
        f.write(f"| {c} | {s / 1e6:.2f} | {r / 1e6:.2f} |\n")
    return crates, size, resident


def touched_text(out, exe):
    """Distinct 4 KiB pages (and bytes of distinct 64 KiB windows, the kernel's default
    fault-around) of `exe`'s code that executed at least one instruction, from a callgrind
    file written with --dump-instr=yes."""
    pages = set()
    cur_ob = None
    obs = {}
    addr = 0
    exe_real = os.path.realpath(exe)

    def pos(tok, prev):
        if tok == "*":
            return prev
        if tok[0] in "+-":
            return prev + int(tok, 0)
        return int(tok, 0)

    for line in open(out, errors="replace"):
        if line.startswith(("ob=", "cob=")):
            body = line.split("=", 1)[1].strip()
            if body.startswith("("):
                num, _, name = body.partition(")")
                if name.strip():
                    obs[num] = name.strip()
                name = obs.get(num, "")
            else:
                name = body
            if line.startswith("ob="):
                cur_ob = name
            continue
        if line.startswith(("calls=", "jump=", "jcnd=")):
            # The target's position is compressed against the same base as cost lines.
            toks = line.split("=", 1)[1].split()
            if len(toks) > 1:
                try:
                    addr = pos(toks[1], addr)
                except ValueError:
                    pass
            continue
        c = line[:1]
        if c and (c.isdigit() or c in "+-*"):
            tok = line.split()[0]
            try:
                addr = pos(tok, addr)
            except ValueError:
                continue
            if cur_ob and os.path.realpath(cur_ob) == exe_real:
                pages.add(addr // 4096)
    windows = {p // 16 for p in pages}
    return len(pages) * 4096, len(windows) * 65536


def run_p7_touched(a):
    """Each daemon of the empty-thread P7 under callgrind (--dump-instr=yes), the other native,
    from exec to idle: how much of its code ever executed (4 KiB pages), next to its resident
    text."""
    rep = open(os.path.join(a.out, "p7-touched.md"), "w")
    rep.write("# P7, empty thread: code executed from exec to idle vs resident\n\n"
              "| daemon | text segment MB | executed 4 KiB pages, MB | their 64 KiB windows, MB |"
              "\n|---|---|---|---|\n")
    for who in ("desktop", "phone"):
        out = os.path.join(a.out, f"p7e-{who}.callgrind.out")
        wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                "--dump-instr=yes"]
        d, p = p7_empty_pair(a, f"p7t-{who}", None, wrap if who == "desktop" else (),
                             wrap if who == "phone" else ())
        time.sleep(a.settle)
        target = d if who == "desktop" else p
        subprocess.run(["callgrind_control", "-d", "idle", str(target.pid)], check=False,
                       stdout=subprocess.DEVNULL)
        time.sleep(1)
        p.term(120)
        d.term(120)
        exe = os.path.join(a.bin, f"errand-{who}")
        # The dump at idle (.1) holds exec -> idle; the final file holds the shutdown.
        first = out + ".1" if os.path.exists(out + ".1") else out
        tp, tw = touched_text(first, exe)
        size = None
        for line in subprocess.run(["readelf", "-lW", exe], capture_output=True,
                                   text=True).stdout.splitlines():
            f = line.split()
            if f and f[0] == "LOAD" and f[-2] == "E":
                size = int(f[4], 16)
        log(f"p7 touched {who}: {tp / 1e6:.2f} MB of pages executed, {tw / 1e6:.2f} MB in "
            f"64 KiB windows, text {size / 1e6:.2f} MB ({first})")
        rep.write(f"| {who} | {size / 1e6:.2f} | {tp / 1e6:.2f} | {tw / 1e6:.2f} |\n")
    rep.close()


P7_ENVS = {
    "default": {},
    "MALLOC_ARENA_MAX=1": {"MALLOC_ARENA_MAX": "1"},
    "MALLOC_TRIM_THRESHOLD_=0": {"MALLOC_TRIM_THRESHOLD_": "0"},
    "TOKIO_WORKER_THREADS=1": {"TOKIO_WORKER_THREADS": "1"},
    "all three": {"MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": "0",
                  "TOKIO_WORKER_THREADS": "1"},
}


def run_p7_empty(a):
    """P7 on an empty thread: both daemons' idle RSS broken down by mapping kind, thread names,
    malloc_stats, the same under a few environment experiments, then each daemon under massif
    (the other native) with a detailed snapshot at idle, by allocation site."""
    rep = open(os.path.join(a.out, "p7-empty.md"), "w")
    rep.write("# P7, empty thread: idle RSS breakdown\n")
    allres = {}
    for name, env in P7_ENVS.items():
        for run in range(a.runs):
            label = f"p7e-{name.split('=')[0].lower().replace(' ', '')}-{run}"
            d, p = p7_empty_pair(a, label, env)
            time.sleep(a.settle)
            res = {"desktop": mem_report(d.pid, d.err.name if run == 0 else None),
                   "phone": mem_report(p.pid, p.err.name if run == 0 else None)}
            allres.setdefault(name, []).append(res)
            p.term(30)
            d.term(30)
            log(f"p7 empty [{name}] run {run}: desktop {res['desktop']['status']['VmRSS']} kB, "
                f"phone {res['phone']['status']['VmRSS']} kB")
    json.dump(allres, open(os.path.join(a.out, "p7-empty.json"), "w"), indent=1)
    rep.write("\n## VmRSS by experiment (kB; median of runs)\n\n| environment | desktop | "
              "phone | desktop threads | phone threads |\n|---|---|---|---|---|\n")
    med = lambda xs: sorted(xs)[len(xs) // 2]
    for name, runs in allres.items():
        rep.write(f"| {name} | {med([r['desktop']['status']['VmRSS'] for r in runs])} | "
                  f"{med([r['phone']['status']['VmRSS'] for r in runs])} | "
                  f"{runs[0]['desktop']['status']['Threads']} | "
                  f"{runs[0]['phone']['status']['Threads']} |\n")
    for name, runs in allres.items():
        for who in ("desktop", "phone"):
            r = runs[0][who]
            rep.write(f"\n## {who}, {name}: breakdown (first run)\n\n"
                      f"status: {json.dumps(r['status'])}\n\nthreads: {', '.join(r['threads'])}"
                      f"\n\n")
            if "malloc" in r:
                rep.write(f"malloc_stats: {json.dumps(r['malloc'])}\n\n")
            rep.write("| mapping kind | RSS kB |\n|---|---|\n")
            for k, v in sorted(r["smaps"].items(), key=lambda kv: -kv[1]):
                rep.write(f"| {k} | {v} |\n")
    d, p = p7_empty_pair(a, "p7e-text")
    time.sleep(a.settle)
    text = {"desktop": write_text_by_crate(rep, "desktop", d.pid, a.top)[0],
            "phone": write_text_by_crate(rep, "phone", p.pid, a.top)[0]}
    json.dump(text, open(os.path.join(a.out, "p7-empty-text.json"), "w"), indent=1)
    p.term(30)
    d.term(30)
    rep.flush()
    if a.no_massif:
        return
    for who in ("desktop", "phone"):
        out = os.path.join(a.out, f"p7e-{who}.massif.out")
        wrap = massif_wrap(out)
        d, p = p7_empty_pair(a, f"p7e-massif-{who}", None,
                             wrap if who == "desktop" else (), wrap if who == "phone" else ())
        time.sleep(a.settle * 2)
        target = d if who == "desktop" else p
        idle = os.path.join(a.out, f"p7e-{who}-idle.massif.out")
        massif_snapshot(target.pid, idle)
        p.term(120)
        d.term(120)
        sites, heap, extra = massif_sites(idle)
        log(f"p7 empty massif {who}: heap {heap / 1e6:.2f} MB, malloc overhead {extra / 1e6:.2f} MB")
        rep.write(f"\n## {who}: massif at idle\n\nheap {heap:,} B, massif's malloc overhead "
                  f"estimate {extra:,} B\n")
        write_sites(rep, f"{who}: idle heap by site (B)", sites, 1, "B", a.top,
                    massif_sites(idle, pairs=True)[0])
        with open(idle + ".txt", "w") as o:
            subprocess.run(["ms_print", "--threshold=0.5", idle], stdout=o, check=False)
        rep.flush()
    rep.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["p1", "p2", "p4", "p5", "p7"])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--cache", default=os.path.join(ROOT, "target", "bench-cache"))
    ap.add_argument("--out", required=True, help="directory for the profiles")
    ap.add_argument("--tasks", type=int, default=5, help="p1: tasks counted")
    ap.add_argument("--thread", choices=["small", "large", "empty"], default="large",
                    help="p1: the fixture (250 or 20,000 tasks); p7: large (the fixture) or "
                         "empty (fresh homes, as errand-bench's empty-thread P7)")
    ap.add_argument("--n", type=int, default=10000, help="p2: tasks queued offline")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="p5, p7: idle seconds before reading")
    ap.add_argument("--part", choices=["mem", "throughput", "all"], default="all",
                    help="p5: memory per reservation, relayed throughput's CPU, or both")
    ap.add_argument("--reservations", type=int, default=1000, help="p5: idle reservations")
    ap.add_argument("--runs", type=int, default=2,
                    help="p5: native memory runs / throughput runs per path; p7 empty: runs "
                         "per environment")
    ap.add_argument("--bytes", type=int, default=256 << 20, help="p5: bytes per throughput run")
    ap.add_argument("--freq", type=int, default=999, help="p5: perf sampling frequency")
    ap.add_argument("--callgraph", action="store_true", help="p5: perf --call-graph dwarf")
    ap.add_argument("--top", type=int, default=30, help="p5, p7: rows of top functions/sites")
    ap.add_argument("--no-massif", action="store_true", help="p5, p7 empty: native only")
    ap.add_argument("--touched", action="store_true",
                    help="p7 empty: instead, each daemon under callgrind to idle: code executed "
                         "vs resident (p7-touched.md)")
    ap.add_argument("--format", type=int, help="fixture format (default: the newest cached)")
    a = ap.parse_args()
    global FORMAT
    FORMAT = a.format
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="errand-profile-") as work:
        a.work = work
        {"p1": run_p1, "p2": run_p2, "p4": run_p4, "p5": run_p5, "p7": run_p7}[a.what](a)
    log("done")


if __name__ == "__main__":
    main()
