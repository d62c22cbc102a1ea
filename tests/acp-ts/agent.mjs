#!/usr/bin/env node
// Scripted ACP agent built on the official TypeScript SDK (@agentclientprotocol/sdk,
// stable v1 entrypoint). Errand's interop test runs it as `node tests/acp-ts/agent.mjs`
// and checks the desktop's ACP client against it. The script is deterministic:
// what a prompt turn does is chosen by markers in the prompt text ([permission], [wait]).
// Every message of interest is logged as one JSON line to $ERRAND_DEMO_AGENT_LOG.
// stdout carries JSON-RPC only; diagnostics go to stderr.

import * as acp from "@agentclientprotocol/sdk";
import { appendFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { Readable, Writable } from "node:stream";

const LOG = process.env.ERRAND_DEMO_AGENT_LOG;
const WAIT_LIMIT_MS = 120_000;
const CHUNK = 8;

function log(entry) {
  if (!LOG) return;
  try {
    appendFileSync(LOG, JSON.stringify(entry) + "\n");
  } catch (err) {
    console.error(`errand-ts-agent: cannot write log ${LOG}: ${err}`);
  }
}

// Per-session state: prompt count and the cancel controller of the running turn.
const sessions = new Map();
function session(id) {
  let s = sessions.get(id);
  if (!s) {
    s = { turns: 0, turn: null };
    sessions.set(id, s);
  }
  return s;
}

// Resolves when `signal` aborts (or after `ms`, if given). Never rejects.
function untilAborted(signal, ms) {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve("aborted");
    let timer;
    const onAbort = () => {
      clearTimeout(timer);
      resolve("aborted");
    };
    signal.addEventListener("abort", onAbort, { once: true });
    if (ms !== undefined) {
      timer = setTimeout(() => {
        signal.removeEventListener("abort", onAbort);
        resolve("timeout");
      }, ms);
    }
  });
}

class Cancelled extends Error {}

async function runTurn(client, sessionId, text, n, signal) {
  const update = async (u) => {
    if (signal.aborted) throw new Cancelled();
    await client.notify(acp.methods.client.session.update, { sessionId, update: u });
  };
  const say = async (s) => {
    for (let i = 0; i < s.length; i += CHUNK) {
      await update({
        sessionUpdate: "agent_message_chunk",
        content: { type: "text", text: s.slice(i, i + CHUNK) },
      });
    }
  };

  // 1. Plan, then the echo of the first line.
  await update({
    sessionUpdate: "plan",
    entries: [
      { content: "Read the request", priority: "high", status: "completed" },
      { content: "Answer", priority: "high", status: "in_progress" },
    ],
  });
  const firstLine = text.split("\n")[0].slice(0, 80);
  await say(`Working on: ${firstLine}\n`);

  // 2. A read-only tool call that completes at once.
  await update({
    sessionUpdate: "tool_call",
    toolCallId: "call-1",
    title: "Look around",
    kind: "read",
    status: "pending",
  });
  await update({ sessionUpdate: "tool_call_update", toolCallId: "call-1", status: "completed" });

  // 3. [permission]: ask the client, wait as long as it takes (or until session/cancel).
  if (text.includes("[permission]")) {
    if (signal.aborted) throw new Cancelled();
    const asked = client
      .request(acp.methods.client.session.requestPermission, {
        sessionId,
        toolCall: { toolCallId: "call-2", title: "Write summary.md", kind: "edit" },
        options: [
          { optionId: "allow-once", name: "Allow once", kind: "allow_once" },
          { optionId: "allow-always", name: "Always allow", kind: "allow_always" },
          { optionId: "reject-once", name: "Reject", kind: "reject_once" },
          { optionId: "reject-always", name: "Always reject", kind: "reject_always" },
        ],
      })
      .then((res) => {
        // Logged whenever the answer comes, even after the turn was cancelled.
        const o = res.outcome;
        const selected = o.outcome === "selected";
        log({
          event: "permission",
          outcome: selected ? "selected" : "cancelled",
          option_id: selected ? o.optionId : null,
        });
        return o;
      });
    asked.catch((err) => console.error(`errand-ts-agent: permission request failed: ${err?.message ?? err}`));
    const outcome = await Promise.race([asked, untilAborted(signal).then(() => null)]);
    if (outcome === null || outcome.outcome !== "selected") throw new Cancelled();
    await say(`permission: ${outcome.optionId}\n`);
  }

  // 4. [wait]: hold the turn open until session/cancel (at most WAIT_LIMIT_MS).
  if (text.includes("[wait]")) {
    await untilAborted(signal, WAIT_LIMIT_MS);
    throw new Cancelled();
  }

  // 5. Closing line.
  await say(`Done (turn ${n} of session ${sessionId})\n`);
}

const app = acp
  .agent({ name: "errand-ts-agent" })
  .onRequest(acp.methods.agent.initialize, () => {
    log({ event: "initialize" });
    return {
      protocolVersion: acp.PROTOCOL_VERSION,
      agentCapabilities: { loadSession: true },
      agentInfo: { name: "errand-ts-agent", version: "0.1.0" },
      authMethods: [],
    };
  })
  .onRequest(acp.methods.agent.session.new, ({ params }) => {
    const sessionId = `ts-${randomBytes(8).toString("hex")}`;
    session(sessionId);
    log({ event: "new_session", session_id: sessionId, cwd: params.cwd });
    return { sessionId };
  })
  .onRequest(acp.methods.agent.session.load, ({ params }) => {
    session(params.sessionId);
    log({ event: "load_session", session_id: params.sessionId });
    return {};
  })
  .onRequest(acp.methods.agent.session.prompt, async ({ params, client }) => {
    const sessionId = params.sessionId;
    const text = params.prompt
      .filter((b) => b.type === "text")
      .map((b) => b.text)
      .join("\n");
    log({ event: "prompt", session_id: sessionId, text });
    const s = session(sessionId);
    s.turns += 1;
    const n = s.turns;
    const turn = new AbortController();
    s.turn = turn;
    // The script is in the first block: later ones carry the client's context (the thread
    // so far), whose old prompts must not run again.
    const first = params.prompt.find((b) => b.type === "text")?.text ?? "";
    try {
      await runTurn(client, sessionId, first, n, turn.signal);
      return { stopReason: "end_turn" };
    } catch (err) {
      if (err instanceof Cancelled) return { stopReason: "cancelled" };
      throw err;
    } finally {
      if (s.turn === turn) s.turn = null;
    }
  })
  .onNotification(acp.methods.agent.session.cancel, ({ params }) => {
    log({ event: "cancel", session_id: params.sessionId });
    sessions.get(params.sessionId)?.turn?.abort();
  });

const stream = acp.ndJsonStream(Writable.toWeb(process.stdout), Readable.toWeb(process.stdin));
const connection = app.connect(stream);
// stdin EOF closes the connection; exit 0 then, even if a [wait] timer is pending.
connection.closed.then(
  () => process.exit(0),
  () => process.exit(0),
);
