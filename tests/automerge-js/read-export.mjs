// Reads an Errand export folder with the JavaScript Automerge, one document at a time, and
// prints what it read as JSON on stdout:
//
//   { documents: [{ file, segment, heads_match, tasks }],
//     tasks: [{ id, instruction, author, events: [{ kind, attempt, author }] }] }
//
// Each `.automerge` file is loaded on its own with `Automerge.load` (an export writes each
// document with its genesis, so it needs nothing else). Errand's conventions as JS sees them:
// strings written by Rust are ImmutableString objects, unsigned integers are BigInt, and an
// author is the actor of the op that created the record, looked up in the device records of
// the meta document (only those the thread's owner wrote count).
//
// Usage: node read-export.mjs EXPORT_DIR

import { readFileSync } from "node:fs";
import { join } from "node:path";
import * as A from "@automerge/automerge";

const dir = process.argv[2];
if (!dir) {
  console.error("usage: node read-export.mjs EXPORT_DIR");
  process.exit(2);
}

const manifest = JSON.parse(readFileSync(join(dir, "manifest.json"), "utf8"));

/** A scalar string as Errand writes it (ImmutableString), or a plain string. */
function str(v) {
  if (v === undefined || v === null) return undefined;
  if (typeof v === "string") return v;
  if (v instanceof A.ImmutableString) return v.toString();
  return String(v);
}

/** The actor (hex) of the op that created an object. */
function actorOf(obj) {
  const id = A.getObjectId(obj); // "<counter>@<actor>"
  return id ? id.split("@")[1] : undefined;
}

const docs = [];
let meta;
for (const d of manifest.documents) {
  const bytes = readFileSync(join(dir, d.file));
  const doc = A.load(new Uint8Array(bytes));
  const heads = [...A.getHeads(doc)].sort();
  const expected = [...d.heads].sort();
  const headsMatch = JSON.stringify(heads) === JSON.stringify(expected);
  if (d.segment === 0) meta = doc;
  // Segments carry their number as an unsigned integer: a BigInt here.
  if (d.segment !== 0 && doc.segment !== BigInt(d.segment)) {
    throw new Error(`${d.file}: segment ${String(doc.segment)}, expected ${d.segment}`);
  }
  docs.push({ file: d.file, segment: d.segment, doc, headsMatch });
}
if (!meta) throw new Error("no meta document in the export");

// Actors of each device, from the records the thread's owner wrote.
const ownerActor = str(meta.owner_actor);
const authors = new Map();
for (const [peerId, record] of Object.entries(meta.devices ?? {})) {
  if (actorOf(record) !== ownerActor) continue;
  for (const a of record.actors ?? []) authors.set(str(a), peerId);
}
// The owner's actor is the owner's, whether or not its record lists it.
authors.set(ownerActor, str(meta.owner));

const out = { documents: [], tasks: [] };
for (const { file, segment, doc, headsMatch } of docs) {
  const tasks = Object.entries(doc.tasks ?? {});
  out.documents.push({ file, segment, heads_match: headsMatch, tasks: tasks.length });
  for (const [key, t] of tasks) {
    const events = (t.events ?? []).map((e) => ({
      kind: str(e.kind),
      attempt: typeof e.attempt === "bigint" ? Number(e.attempt) : e.attempt,
      author: authors.get(actorOf(e)),
    }));
    out.tasks.push({
      id: key,
      instruction: str(t.instruction),
      author: authors.get(actorOf(t)),
      events,
    });
  }
}
out.tasks.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
process.stdout.write(JSON.stringify(out) + "\n");
