#!/usr/bin/env node
// automerge-repo baseline for errand-bench (P1: commit -> merged+durable on the other peer;
// P2: catch-up after reconnect). Everything runs on 127.0.0.1 in this one process: a sync server
// Repo (WebSocketServerAdapter on a `ws` server, port 0) and two client Repos A and B
// (WebSocketClientAdapter), each with NodeFSStorageAdapter on its own temp dir.
//
// stdout: one JSON object (the results, or {"error": ...} on failure/timeout).
// stderr: progress.
//
// See README.md in this folder for what is measured and the caveats.

import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createRequire } from "node:module";
import { performance } from "node:perf_hooks";

import * as Automerge from "@automerge/automerge";
import { Repo } from "@automerge/automerge-repo";
import {
  WebSocketClientAdapter,
  WebSocketServerAdapter,
} from "@automerge/automerge-repo-network-websocket";
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs";
import { WebSocketServer } from "ws";

// ---------------------------------------------------------------------------------------------
// Flags

const USAGE = `usage: node automerge-repo-bench.mjs [--quick] [options]
  --quick                 p1 runs 10, large thread 2,000 tasks, p2 sizes 1000, 1 run, 2 min timeout
  --p1-runs K             P1 samples per thread (default 30)
  --small-tasks N         tasks in the small thread (default 250)
  --large-tasks N         tasks in the large thread (default 20000)
  --events-per-task E     events per pre-built task (default 4: delivered, started, output, finished)
  --p1-warmup W           unreported P1 samples before the measured ones, per thread (default 3)
  --p1-gap-ms MS          idle time before each P1 sample (default 250; automerge-repo throttles
                          sync and storage saves to one per 100 ms per document)
  --p2-sizes a,b          offline task counts (default 1000,10000)
  --p2-runs R             runs per P2 size (default 3)
  --p2-base-tasks N       tasks in the thread before the disconnect (default 250)
  --p2-modes m,...        b-offline: only B is disconnected; A stays connected to the server, which
                                     already holds A's writes when B reconnects (the brief's setup)
                          ab-offline: A and B both disconnected while A writes; both reconnect at t0,
                                     so the changes travel A -> server -> B after reconnect
                          (default b-offline,ab-offline; the first one is reported as "p2")
  --p2-reconnect how      adapter: B keeps its Repo, drops its WebSocket adapter and adds a new one
                          restart: B's Repo is shut down (flushed) and a new Repo is created on the
                                   same storage dir at t0 (default adapter)
  --offline-writes how    bulk: A's N offline tasks are made as N separate Automerge changes on a fork
                                of A's document and merged into A's handle in one update (default)
                          handle: N calls of handle.change() (slow: see README)
  --fsync                 fsync every file NodeFSStorageAdapter writes (stock adapter does not)
  --timeout-s S           global timeout (default 1200; 120 with --quick)
  --seed N                PRNG seed for ids (default 1)
  --keep-dirs             do not delete the temp storage dirs
`;

function parseArgs(argv) {
  const o = {
    quick: false,
    p1Runs: null,
    smallTasks: 250,
    largeTasks: null,
    eventsPerTask: 4,
    p1GapMs: 250,
    p1Warmup: 3,
    p2Sizes: null,
    p2Runs: null,
    p2BaseTasks: 250,
    p2Modes: ["b-offline", "ab-offline"],
    p2Reconnect: "adapter",
    offlineWrites: "bulk",
    fsync: false,
    timeoutS: null,
    seed: 1,
    keepDirs: false,
  };
  const int = (v, name) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) throw new Error(`${name} needs a non-negative integer, got ${v}`);
    return n;
  };
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    switch (a) {
      case "--quick": o.quick = true; break;
      case "--p1-runs": o.p1Runs = int(next(), a); break;
      case "--small-tasks": o.smallTasks = int(next(), a); break;
      case "--large-tasks": o.largeTasks = int(next(), a); break;
      case "--events-per-task": o.eventsPerTask = int(next(), a); break;
      case "--p1-warmup": o.p1Warmup = int(next(), a); break;
      case "--p1-gap-ms": o.p1GapMs = int(next(), a); break;
      case "--p2-sizes": o.p2Sizes = next().split(",").filter(Boolean).map(s => int(s, a)); break;
      case "--p2-runs": o.p2Runs = int(next(), a); break;
      case "--p2-base-tasks": o.p2BaseTasks = int(next(), a); break;
      case "--p2-modes": o.p2Modes = next().split(",").filter(Boolean); break;
      case "--p2-reconnect": o.p2Reconnect = next(); break;
      case "--offline-writes": o.offlineWrites = next(); break;
      case "--fsync": o.fsync = true; break;
      case "--timeout-s": o.timeoutS = int(next(), a); break;
      case "--seed": o.seed = int(next(), a); break;
      case "--keep-dirs": o.keepDirs = true; break;
      case "-h": case "--help": process.stderr.write(USAGE); process.exit(0);
      default: process.stderr.write(USAGE); throw new Error(`unknown flag ${a}`);
    }
  }
  o.p1Runs ??= o.quick ? 10 : 30;
  o.largeTasks ??= o.quick ? 2000 : 20000;
  o.p2Sizes ??= o.quick ? [1000] : [1000, 10000];
  o.p2Runs ??= o.quick ? 1 : 3;
  o.timeoutS ??= o.quick ? 120 : 1200;
  for (const m of o.p2Modes) {
    if (m !== "b-offline" && m !== "ab-offline") throw new Error(`unknown --p2-modes entry ${m}`);
  }
  if (!["adapter", "restart"].includes(o.p2Reconnect)) throw new Error(`bad --p2-reconnect ${o.p2Reconnect}`);
  if (!["bulk", "handle"].includes(o.offlineWrites)) throw new Error(`bad --offline-writes ${o.offlineWrites}`);
  if (o.p1Runs < 1 || o.p2Runs < 1) throw new Error("--p1-runs and --p2-runs must be >= 1");
  return o;
}

// ---------------------------------------------------------------------------------------------
// Small helpers

const T_START = performance.now();
const log = (...args) =>
  process.stderr.write(`[${((performance.now() - T_START) / 1000).toFixed(1)}s] ${args.join(" ")}\n`);
const sleep = ms => new Promise(r => setTimeout(r, ms));
const round = (x, d = 3) => (x == null ? null : Math.round(x * 10 ** d) / 10 ** d);

function quantile(xs, q) {
  // nearest-rank: the smallest sample with at least q of the samples <= it
  const s = [...xs].sort((a, b) => a - b);
  if (s.length === 0) return null;
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))];
}
function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  if (s.length === 0) return null;
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}
const sameHeads = (a, b) => a.length === b.length && [...a].sort().join() === [...b].sort().join();

// mulberry32
function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

class Ids {
  constructor(seed) {
    this.rand = prng(seed);
    this.lastMs = 0;
    this.seq = 0;
  }
  // 26-char ULID: 10 chars of ms timestamp + 16 random chars (Crockford base32)
  ulid(ms = Date.now()) {
    let t = ms;
    let head = "";
    for (let i = 0; i < 10; i++) {
      head = CROCKFORD[t % 32] + head;
      t = Math.floor(t / 32);
    }
    let tail = "";
    for (let i = 0; i < 16; i++) tail += CROCKFORD[Math.floor(this.rand() * 32)];
    return head + tail;
  }
  // 52-char libp2p-style peer id (base58 of an identity multihash of an ed25519 key: "12D3KooW...")
  peerId() {
    let s = "12D3KooW";
    while (s.length < 52) s += BASE58[Math.floor(this.rand() * 58)];
    return s;
  }
}

const EVENT_KINDS = ["delivered", "started", "output", "finished"];
const OUTPUT_TEXT = "a.csv: 1204 rows, 7 columns\nb.csv: 88 rows, 3 columns\nsummary written to ~/Downloads/summary.md\n";
const instruction = i => `task ${i}: summarise the CSVs in ~/Downloads`;

// The shape written by Errand (crdt/src/doc.rs): root { schema, thread_id, owner, owner_actor,
// devices, messages, tasks }, tasks { <ulid>: { id, instruction, executor, target, created_at,
// events[] } }, events [{ at, kind, attempt, text? | exit_code? }].
// One change for the genesis, one per task creation, one per event.
function taskValue(id, i, target, now) {
  return { id, instruction: instruction(i), executor: "shell", target, created_at: now, events: [] };
}

// Appends `count` tasks (and `eventsPerTask` events each) to `handle` as separate Automerge
// changes. The changes are made with the low-level API on a fork of the handle's document (the
// proxy-based Automerge.change() gets slower with every task in a map of thousands: see README)
// and then merged into the handle with one update(). Returns the number of changes.
function appendTasksBulk(handle, ctx, { first, count, eventsPerTask, genesis }) {
  const base = Automerge.getBackend(handle.doc());
  const before = base.getHeads();
  const b = base.fork();
  let changes = 0;
  let tasksObj;
  if (genesis) {
    b.put("_root", "schema", 1, "uint");
    b.put("_root", "thread_id", ctx.ids.ulid());
    b.put("_root", "owner", ctx.ownerPeer);
    b.put("_root", "owner_actor", "00".repeat(16));
    const devices = b.putObject("_root", "devices", {});
    for (const [peer, name, kind] of [[ctx.ownerPeer, "phone", "phone"], [ctx.targetPeer, "desktop", "desktop"]]) {
      const d = b.putObject(devices, peer, {});
      b.put(d, "name", name);
      b.put(d, "kind", kind);
      b.putObject(d, "actors", []);
      const ex = b.putObject(d, "executors", []);
      b.insert(ex, 0, "shell");
      b.put(d, "added_at", Date.now(), "int");
    }
    b.putObject("_root", "messages", []);
    tasksObj = b.putObject("_root", "tasks", {});
    b.commit();
    changes++;
  } else {
    const t = b.getWithType("_root", "tasks");
    if (!t || t[0] !== "map") throw new Error("document has no tasks map");
    tasksObj = t[1];
  }
  for (let i = first; i < first + count; i++) {
    const now = Date.now();
    const id = ctx.ids.ulid(now);
    const o = b.putObject(tasksObj, id, {});
    b.put(o, "id", id);
    b.put(o, "instruction", instruction(i));
    b.put(o, "executor", "shell");
    b.put(o, "target", ctx.targetPeer);
    b.put(o, "created_at", now, "int");
    const ev = b.putObject(o, "events", []);
    b.commit();
    changes++;
    ctx.lastTaskId = id;
    for (let e = 0; e < eventsPerTask; e++) {
      const kind = EVENT_KINDS[e % EVENT_KINDS.length];
      const eo = b.insertObject(ev, e, {});
      b.put(eo, "at", Date.now(), "int");
      b.put(eo, "kind", kind);
      b.put(eo, "attempt", 1, "int");
      if (kind === "output") b.put(eo, "text", OUTPUT_TEXT);
      if (kind === "finished") b.put(eo, "exit_code", 0, "int");
      b.commit();
      changes++;
    }
  }
  const bytes = b.saveSince(before);
  b.free?.();
  handle.update(doc => Automerge.loadIncremental(doc, bytes));
  return changes;
}

// The same through the public API: one handle.change() per task.
function appendTasksViaHandle(handle, ctx, { first, count }) {
  for (let i = first; i < first + count; i++) {
    const now = Date.now();
    const id = ctx.ids.ulid(now);
    handle.change(d => {
      d.tasks[id] = taskValue(id, i, ctx.targetPeer, now);
    });
    ctx.lastTaskId = id;
  }
  return count;
}

// ---------------------------------------------------------------------------------------------
// Storage: NodeFSStorageAdapter, plus a record of which document heads have been written to
// disk (to know when a change is durable on a peer), plus optional fsync.

class TrackedStorage {
  constructor(dir, { fsync }) {
    this.inner = new NodeFSStorageAdapter(dir);
    this.dir = dir;
    this.fsync = fsync;
    this.pendingHeads = new Map(); // docId -> heads announced by the StorageSubsystem for the next save
    this.saved = new Map(); // docId -> Set of change hashes that were heads of a completed save
    this.waiters = new Set();
  }
  attach(repo) {
    // StorageSubsystem emits these synchronously right before it calls save() on the adapter.
    const ss = repo.storageSubsystem;
    ss.on("doc-saved", e => this.pendingHeads.set(e.documentId, e.savedHeads));
    ss.on("doc-compacted", e => this.pendingHeads.set(e.documentId, e.savedHeads));
  }
  load(key) { return this.inner.load(key); }
  loadRange(prefix) { return this.inner.loadRange(prefix); }
  remove(key) { return this.inner.remove(key); }
  removeRange(prefix) { return this.inner.removeRange(prefix); }
  async save(key, binary) {
    const isDoc = key.length >= 2 && (key[1] === "incremental" || key[1] === "snapshot");
    const heads = isDoc ? this.pendingHeads.get(key[0]) : undefined;
    if (isDoc) this.pendingHeads.delete(key[0]);
    await this.inner.save(key, binary);
    if (this.fsync) {
      const fh = await fs.promises.open(this.inner.getFilePath(key), "r");
      try { await fh.sync(); } finally { await fh.close(); }
    }
    if (heads) {
      let s = this.saved.get(key[0]);
      if (!s) this.saved.set(key[0], (s = new Set()));
      for (const h of heads) s.add(h);
      for (const w of [...this.waiters]) w();
    }
  }
  isSaved(docId, heads) {
    const s = this.saved.get(docId);
    return !!s && heads.every(h => s.has(h));
  }
  // Resolves when a document save whose heads include all of `heads` has completed.
  waitSaved(docId, heads, timeoutMs, what) {
    return new Promise((resolve, reject) => {
      if (this.isSaved(docId, heads)) return resolve(performance.now());
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what} to be saved`));
      }, timeoutMs);
      const check = () => {
        if (this.isSaved(docId, heads)) {
          clearTimeout(timer);
          this.waiters.delete(check);
          resolve(performance.now());
        }
      };
      this.waiters.add(check);
    });
  }
}

// Resolves (with performance.now()) the first time pred(doc) holds for a handle, checking now
// and on every "change" event.
function waitForDoc(handle, pred, timeoutMs, what) {
  return new Promise((resolve, reject) => {
    if (handle.isReady() && pred(handle.doc())) return resolve(performance.now());
    const timer = setTimeout(() => {
      handle.off("change", onChange);
      reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
    }, timeoutMs);
    const onChange = ({ doc }) => {
      if (pred(doc)) {
        const t = performance.now();
        clearTimeout(timer);
        handle.off("change", onChange);
        resolve(t);
      }
    };
    handle.on("change", onChange);
  });
}

async function pollUntil(fn, timeoutMs, what, everyMs = 10) {
  const end = performance.now() + timeoutMs;
  for (;;) {
    if (fn()) return performance.now();
    if (performance.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

// ---------------------------------------------------------------------------------------------
// The three peers

class Bench {
  constructor(opts) {
    this.opts = opts;
    this.root = fs.mkdtempSync(path.join(os.tmpdir(), "errand-amrepo-bench-"));
    this.ids = new Ids(opts.seed);
    this.ownerPeer = this.ids.peerId();
    this.targetPeer = this.ids.peerId();
    this.links = new Map(); // label -> stats of the server side of the latest connection with that label
    this.connSeq = 0;
  }

  async start() {
    this.wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
    await new Promise((resolve, reject) => {
      this.wss.once("listening", resolve);
      this.wss.once("error", reject);
    });
    this.port = this.wss.address().port;
    // Count bytes per client connection at the server's socket (B's link is what P2 reports).
    // Registered before the server adapter's own "connection" listener, so send() is wrapped
    // before anything is sent.
    this.wss.on("connection", (socket, req) => {
      const label = new URL(req.url, "http://x").searchParams.get("peer") ?? "?";
      const st = { label, socket, toClient: 0, fromClient: 0, msgsToClient: 0, msgsFromClient: 0 };
      const origSend = socket.send.bind(socket);
      socket.send = (data, ...rest) => {
        st.toClient += data.byteLength ?? data.length ?? 0;
        st.msgsToClient++;
        return origSend(data, ...rest);
      };
      socket.on("message", data => {
        st.fromClient += Array.isArray(data) ? data.reduce((n, b) => n + b.length, 0) : data.byteLength;
        st.msgsFromClient++;
      });
      this.links.set(label, st);
    });
    this.serverStorage = new TrackedStorage(this.dir("server"), this.opts);
    // Like the reference automerge-repo sync server: it does not announce documents, it answers.
    this.server = new Repo({
      network: [new WebSocketServerAdapter(this.wss)],
      storage: this.serverStorage,
      sharePolicy: async () => false,
    });
    this.serverStorage.attach(this.server);
    this.a = this.makeClient("a");
    this.b = this.makeClient("b");
    await Promise.all([this.waitPeer(this.a), this.waitPeer(this.b)]);
    log(`server on ws://127.0.0.1:${this.port}, peers A and B connected; storage under ${this.root}`);
  }

  dir(name) {
    const d = path.join(this.root, name);
    fs.mkdirSync(d, { recursive: true });
    return d;
  }

  url(label) {
    return `ws://127.0.0.1:${this.port}/?peer=${label}`;
  }

  makeClient(label) {
    const storage = new TrackedStorage(this.dir(label), this.opts);
    const adapter = new WebSocketClientAdapter(this.url(label));
    const repo = new Repo({ network: [adapter], storage });
    storage.attach(repo);
    return { label, repo, storage, adapter };
  }

  waitPeer(client, timeoutMs = 10000) {
    return pollUntil(() => client.repo.peers.length > 0, timeoutMs, `${client.label} to connect to the server`, 2);
  }

  disconnect(client) {
    client.repo.networkSubsystem.removeNetworkAdapter(client.adapter);
    client.adapter = null;
  }

  reconnect(client) {
    client.adapter = new WebSocketClientAdapter(this.url(client.label));
    client.repo.networkSubsystem.addNetworkAdapter(client.adapter);
  }

  async restartB() {
    // B's process "restarts": its Repo is flushed and shut down; a new one is created later on
    // the same storage dir.
    await this.b.repo.shutdown();
    this.b = { label: "b", repo: null, storage: null, adapter: null };
  }

  recreateB() {
    this.b = this.makeClient("b");
  }

  serverHeads(docId) {
    const h = this.server.handles[docId];
    return h && h.isReady() ? Automerge.getHeads(h.doc()) : null;
  }

  async waitServerHas(docId, heads, timeoutMs, what) {
    return pollUntil(() => {
      const sh = this.serverHeads(docId);
      return sh != null && sameHeads(sh, heads);
    }, timeoutMs, what);
  }

  // A creates a document holding a thread of `tasks` tasks; B (and the server) get all of it.
  async newThread(tasks, what) {
    const a = this.a.repo;
    const t0 = performance.now();
    const handleA = a.create();
    const changes = appendTasksBulk(handleA, this, {
      first: 0, count: tasks, eventsPerTask: this.opts.eventsPerTask, genesis: true,
    });
    const tBuilt = performance.now();
    const heads = Automerge.getHeads(handleA.doc());
    const docId = handleA.documentId;
    log(`${what}: built ${tasks} tasks (${changes} changes) on A in ${((tBuilt - t0) / 1000).toFixed(1)} s`);
    const long = 15 * 60 * 1000;
    await this.waitServerHas(docId, heads, long, `${what} to reach the server`);
    const tServer = performance.now();
    const handleB = await this.b.repo.find(handleA.url);
    await waitForDoc(handleB, d => sameHeads(Automerge.getHeads(d), heads), long, `${what} to reach B`);
    const tB = performance.now();
    await this.b.storage.waitSaved(docId, heads, long, `${what} on B`);
    await this.a.storage.waitSaved(docId, heads, long, `${what} on A`);
    const tSaved = performance.now();
    const setup = {
      tasks,
      changes: Automerge.getAllChanges(handleA.doc()).length,
      build_s: round((tBuilt - t0) / 1000, 2),
      to_server_s: round((tServer - tBuilt) / 1000, 2),
      to_b_s: round((tB - tServer) / 1000, 2),
      saved_s: round((tSaved - tB) / 1000, 2),
      saved_bytes: Automerge.save(handleA.doc()).length,
    };
    log(`${what}: server has it after ${setup.to_server_s} s, B after a further ${setup.to_b_s} s, ` +
      `saved after ${setup.saved_s} s; ${setup.changes} changes, ${setup.saved_bytes} bytes saved`);
    return { handleA, handleB, docId, setup };
  }

  // Drop a finished scenario's document from all three Repos' caches, so that later reconnects
  // do not also sync it (which would add to the bytes counted on B's link).
  async forget(docId) {
    await sleep(300); // let trailing sync messages for it settle first
    for (const repo of [this.a.repo, this.b.repo, this.server]) {
      if (repo && repo.handles[docId]) await repo.removeFromCache(docId).catch(() => {});
    }
  }

  async close() {
    const tasks = [];
    for (const c of [this.a, this.b]) if (c?.repo) tasks.push(c.repo.shutdown().catch(() => {}));
    await Promise.all(tasks);
    for (const s of this.wss?.clients ?? []) s.terminate();
    await new Promise(r => (this.wss ? this.wss.close(() => r()) : r()));
    await this.server?.shutdown().catch(() => {});
    // Saves that automerge-repo started but did not await (throttled saves, sync states) can
    // still land after shutdown(); give them a moment. removeDirs() runs again at exit.
    await sleep(500);
    this.removeDirs();
  }

  removeDirs() {
    if (!this.opts.keepDirs) fs.rmSync(this.root, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------------------------
// P1: latency from just before A's handle.change() to B having merged it and written it to disk.

async function p1(bench, label, tasks, results) {
  const opts = bench.opts;
  const { handleA, handleB, docId, setup } = await bench.newThread(tasks, `p1.${label}`);
  const durable = [];
  const merged = [];
  const localChange = [];
  const total = opts.p1Warmup + opts.p1Runs;
  for (let r = 0; r < total; r++) {
    const warm = r < opts.p1Warmup;
    await sleep(opts.p1GapMs);
    const now = Date.now();
    const id = bench.ids.ulid(now);
    const seen = waitForDoc(handleB, d => d.tasks?.[id] !== undefined, 60000, `P1 task on B`);
    const t0 = performance.now();
    handleA.change(d => {
      d.tasks[id] = taskValue(id, tasks + r, bench.targetPeer, now);
    });
    const tLocal = performance.now();
    const heads = Automerge.getHeads(handleA.doc());
    const tMerged = await seen;
    const tDurable = await bench.b.storage.waitSaved(docId, heads, 60000, "P1 task on B");
    if (!warm) {
      localChange.push(tLocal - t0);
      merged.push(tMerged - t0);
      durable.push(tDurable - t0);
    }
    log(`p1.${label} ${warm ? "warm-up" : "run"} ${r + 1}/${total}: merged ${(tMerged - t0).toFixed(2)} ms, ` +
      `durable ${(tDurable - t0).toFixed(2)} ms (A's change() itself ${(tLocal - t0).toFixed(2)} ms)`);
  }
  results[label] = {
    median_ms: round(median(durable)),
    p99_ms: round(quantile(durable, 0.99)),
    runs: durable.length,
    warmup_runs: opts.p1Warmup,
    durable_on_b: true,
    merged_median_ms: round(median(merged)),
    merged_p99_ms: round(quantile(merged, 0.99)),
    a_change_median_ms: round(median(localChange)),
    a_change_p99_ms: round(quantile(localChange, 0.99)),
    tasks,
    changes_in_thread: setup.changes,
    setup,
    samples_ms: durable.map(x => round(x, 2)),
  };
  await bench.forget(docId);
}

// ---------------------------------------------------------------------------------------------
// P2: A writes N tasks while B is offline; time from reconnect until B has them (merged, and
// written to B's disk) and bytes over B's WebSocket.

async function p2Run(bench, mode, n, run) {
  const opts = bench.opts;
  const what = `p2.${mode}.${n}#${run}`;
  const { handleA, docId } = await bench.newThread(opts.p2BaseTasks, what);
  await sleep(150);

  // go offline
  if (opts.p2Reconnect === "restart") await bench.restartB();
  else bench.disconnect(bench.b);
  if (mode === "ab-offline") bench.disconnect(bench.a);
  await pollUntil(() => !bench.server.peers.includes(bench.b.repo?.peerId ?? "gone") &&
    (mode !== "ab-offline" || !bench.server.peers.includes(bench.a.repo.peerId)), 10000, "server to notice the disconnect");

  // A queues N tasks, one change each
  const tw0 = performance.now();
  if (opts.offlineWrites === "bulk") {
    appendTasksBulk(handleA, bench, { first: opts.p2BaseTasks, count: n, eventsPerTask: 0, genesis: false });
  } else {
    appendTasksViaHandle(handleA, bench, { first: opts.p2BaseTasks, count: n });
  }
  const lastId = bench.lastTaskId;
  const heads = Automerge.getHeads(handleA.doc());
  const writeMs = performance.now() - tw0;
  await bench.a.storage.waitSaved(docId, heads, 120000, `${what} offline writes on A`);
  if (mode === "b-offline") {
    await bench.waitServerHas(docId, heads, 120000, `${what} writes to reach the server`);
    await bench.server.flush([docId]);
  }
  log(`${what}: A wrote ${n} tasks offline in ${writeMs.toFixed(0)} ms (${opts.offlineWrites})`);
  await sleep(200);

  // reconnect
  const t0 = performance.now();
  let handleB;
  if (opts.p2Reconnect === "restart") {
    bench.recreateB();
    if (mode === "ab-offline") bench.reconnect(bench.a);
    handleB = await bench.b.repo.find(handleA.url);
  } else {
    bench.reconnect(bench.b);
    if (mode === "ab-offline") bench.reconnect(bench.a);
    handleB = bench.b.repo.handles[docId];
  }
  const tMerged = await waitForDoc(handleB, d => d.tasks?.[lastId] !== undefined &&
    sameHeads(Automerge.getHeads(d), heads), 300000, `${what} on B`);
  const linkB = bench.links.get("b");
  const bytesAtMerge = linkB.toClient + linkB.fromClient;
  const tDurable = await bench.b.storage.waitSaved(docId, heads, 300000, `${what} on B`);
  const bytesToB = linkB.toClient;
  const bytesFromB = linkB.fromClient;
  const wireB = (linkB.socket._socket?.bytesRead ?? 0) + (linkB.socket._socket?.bytesWritten ?? 0);
  const msgsB = linkB.msgsToClient + linkB.msgsFromClient;
  const linkA = bench.links.get("a");
  const aBytes = mode === "ab-offline" ? linkA.toClient + linkA.fromClient : null;
  await sleep(500);
  const settled = linkB.toClient + linkB.fromClient;
  const tasksOnB = Object.keys(handleB.doc().tasks).length;
  if (tasksOnB !== opts.p2BaseTasks + n) throw new Error(`${what}: B has ${tasksOnB} tasks, expected ${opts.p2BaseTasks + n}`);
  const r = {
    durable_ms: tDurable - t0,
    merged_ms: tMerged - t0,
    bytes: bytesToB + bytesFromB,
    bytes_at_merge: bytesAtMerge,
    bytes_after_500ms: settled,
    bytes_to_b: bytesToB,
    bytes_from_b: bytesFromB,
    messages: msgsB,
    wire_bytes: wireB,
    a_link_bytes: aBytes,
    offline_write_ms: writeMs,
  };
  await bench.forget(docId);
  log(`${what}: B merged after ${r.merged_ms.toFixed(1)} ms, durable after ${r.durable_ms.toFixed(1)} ms; ` +
    `${r.bytes} bytes over B's link (${bytesToB} to B, ${bytesFromB} from B, ${msgsB} messages; ${wireB} on the wire)`);
  return r;
}

async function p2(bench, mode, results) {
  const opts = bench.opts;
  for (const n of opts.p2Sizes) {
    const runs = [];
    for (let run = 1; run <= opts.p2Runs; run++) runs.push(await p2Run(bench, mode, n, run));
    const pick = k => runs.map(r => r[k]);
    results[String(n)] = {
      median_ms: round(median(pick("durable_ms"))),
      p99_ms: round(quantile(pick("durable_ms"), 0.99)),
      bytes: median(pick("bytes")),
      runs: runs.length,
      durable_on_b: true,
      merged_median_ms: round(median(pick("merged_ms"))),
      merged_p99_ms: round(quantile(pick("merged_ms"), 0.99)),
      bytes_to_b: median(pick("bytes_to_b")),
      bytes_from_b: median(pick("bytes_from_b")),
      bytes_at_merge: median(pick("bytes_at_merge")),
      bytes_after_500ms: median(pick("bytes_after_500ms")),
      messages: median(pick("messages")),
      wire_bytes: median(pick("wire_bytes")),
      a_link_bytes: mode === "ab-offline" ? median(pick("a_link_bytes")) : undefined,
      base_tasks: opts.p2BaseTasks,
      offline_write_median_ms: round(median(pick("offline_write_ms")), 1),
      samples_ms: pick("durable_ms").map(x => round(x, 2)),
    };
  }
}

// ---------------------------------------------------------------------------------------------

function installedVersions() {
  const require = createRequire(import.meta.url);
  const v = {};
  for (const p of [
    "@automerge/automerge",
    "@automerge/automerge-repo",
    "@automerge/automerge-repo-network-websocket",
    "@automerge/automerge-repo-storage-nodefs",
    "ws",
  ]) {
    // read package.json from disk (some packages do not export ./package.json)
    const dirs = require.resolve.paths(p) ?? [];
    for (const d of dirs) {
      const f = path.join(d, p, "package.json");
      if (fs.existsSync(f)) {
        v[p] = JSON.parse(fs.readFileSync(f, "utf8")).version;
        break;
      }
    }
  }
  return v;
}

async function main() {
  let opts;
  try {
    opts = parseArgs(process.argv);
  } catch (e) {
    process.stdout.write(JSON.stringify({ tool: "automerge-repo", error: String(e.message ?? e) }) + "\n");
    process.exit(2);
  }
  const out = {
    tool: "automerge-repo",
    versions: installedVersions(),
    node: process.version,
    platform: `${os.platform()} ${os.arch()}, ${os.cpus().length} cpus`,
    quick: opts.quick,
    transport: "WebSocket sync server (WebSocketServerAdapter) on 127.0.0.1; A and B are WebSocketClientAdapter clients: A -> server -> B",
    storage: `NodeFSStorageAdapter per peer (server too)${opts.fsync ? ", fsync after each write" : ", no fsync (stock adapter)"}`,
    durability_note:
      "durable_on_b: median_ms/p99_ms end when B's stock throttled save (Repo saveDebounceRate 100 ms) has " +
      "finished writing a file whose heads include A's change; merged_* end at B's handle 'change' event",
    settings: {
      p1_runs: opts.p1Runs, p1_warmup: opts.p1Warmup, p1_gap_ms: opts.p1GapMs, events_per_task: opts.eventsPerTask,
      p2_runs: opts.p2Runs, p2_base_tasks: opts.p2BaseTasks, p2_modes: opts.p2Modes,
      p2_reconnect: opts.p2Reconnect, offline_writes: opts.offlineWrites, fsync: opts.fsync, seed: opts.seed,
    },
    p1: {},
    p2: {},
  };
  let bench;
  let phase = "start";
  let finished = false;
  const fail = (code, err) => {
    if (finished) return;
    finished = true;
    out.error = err;
    out.phase = phase;
    out.elapsed_s = round((performance.now() - T_START) / 1000, 1);
    process.stdout.write(JSON.stringify(out) + "\n");
    log(`FAILED in ${phase}: ${err}`);
    // best effort cleanup, then leave no matter what
    setTimeout(() => process.exit(code), 3000).unref();
    (bench ? bench.close() : Promise.resolve()).catch(() => {}).finally(() => process.exit(code));
  };
  const timer = setTimeout(() => fail(3, `global timeout of ${opts.timeoutS} s reached`), opts.timeoutS * 1000);
  process.on("unhandledRejection", e => fail(1, `unhandled rejection: ${e?.stack ?? e}`));
  process.on("uncaughtException", e => fail(1, `uncaught exception: ${e?.stack ?? e}`));

  try {
    bench = new Bench(opts);
    process.on("exit", () => bench.removeDirs());
    await bench.start();
    phase = "p1.small";
    await p1(bench, "small", opts.smallTasks, out.p1);
    phase = "p1.large";
    await p1(bench, "large", opts.largeTasks, out.p1);
    for (const mode of opts.p2Modes) {
      phase = `p2.${mode}`;
      const res = {};
      await p2(bench, mode, res);
      if (mode === opts.p2Modes[0]) {
        out.p2 = res;
        out.p2_mode = mode;
      } else {
        out[`p2_${mode.replace("-", "_")}`] = res;
      }
    }
    phase = "shutdown";
    out.elapsed_s = round((performance.now() - T_START) / 1000, 1);
    let closeTimer;
    await Promise.race([
      bench.close(),
      new Promise(r => { closeTimer = setTimeout(() => { log("shutdown took over 10 s; going on"); r(); }, 10000); }),
    ]);
    clearTimeout(closeTimer);
  } catch (e) {
    fail(1, e?.stack ?? String(e));
    return;
  }
  if (finished) return;
  finished = true;
  clearTimeout(timer);
  process.stdout.write(JSON.stringify(out) + "\n");
  log(`done in ${out.elapsed_s} s`);
  // All sockets, servers and repos are closed; if a stray timer is still pending, do not wait for it.
  setTimeout(() => {
    log("still running 2 s after shutdown (" + process.getActiveResourcesInfo().join(", ") + "); exiting anyway");
    process.exit(0);
  }, 2000).unref();
}

main();
