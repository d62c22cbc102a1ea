//! `errand-phone … --json` is a contract for scripts (issue 6, acceptance 4; DESIGN.md section 9).
//!
//! Each output must have exactly the documented keys, with the documented JSON types; the
//! README lists the same fields. A field added, renamed or retyped fails here on purpose:
//! update the README (and this list) with it. Both ways of running a command are covered:
//! on the home directly, and through the phone daemon's control socket.

use anyhow::{Context, Result, bail, ensure};
use errand_tests::{DEADLINE, Home, wait_for};
use serde_json::Value;

/// A JSON type in the contract.
#[derive(Debug, Clone, Copy)]
enum Ty {
    Str,
    /// A string or null.
    OptStr,
    Bool,
    Int,
    /// An integer or null.
    OptInt,
    /// An array (items checked separately).
    Arr,
    /// An object or null.
    OptObj,
    /// One of these strings.
    OneOf(&'static [&'static str]),
    /// One of these strings, or null.
    OptOneOf(&'static [&'static str]),
}

use Ty::*;

const STATUSES: &[&str] = &[
    "queued",
    "delivered",
    "awaiting_approval",
    "running",
    "awaiting_permission",
    "done",
    "failed",
    "cancelled",
    "denied",
    "interrupted",
];

/// `status --json`.
const STATUS: &[(&str, Ty)] = &[
    ("peer_id", Str),
    ("kind", OneOf(&["phone"])),
    ("name", Str),
    ("thread_id", OptStr),
    ("listen_addrs", Arr),
    ("peers", Arr),
    ("relay", OptObj),
    ("running", Bool),
    ("documents", Arr),
    ("sync", OptObj),
];
/// Each of `status --json`'s `peers`.
const STATUS_PEER: &[(&str, Ty)] = &[
    ("id", Str),
    ("name", Str),
    ("kind", OneOf(&["desktop"])),
    ("connected", Bool),
    ("path", OptOneOf(&["direct", "relayed"])),
    ("last_sync_at", OptStr),
    ("in_sync", Bool),
    ("revoked", Bool),
    ("bytes_sent", Int),
    ("bytes_received", Int),
];
/// `pair TICKET --json`.
const PAIR: &[(&str, Ty)] = &[
    ("desktop_id", Str),
    ("desktop_name", Str),
    ("thread_id", Str),
    ("synced", Bool),
];
/// `send TEXT --json`.
const SEND: &[(&str, Ty)] = &[("task_id", Str), ("status", OneOf(&["queued"]))];
/// `task ID --json`, and each of `thread --json`'s `tasks`.
const TASK: &[(&str, Ty)] = &[
    ("id", Str),
    ("instruction", Str),
    ("executor", Str),
    ("target", Str),
    ("author", Str),
    ("created_at", Str),
    ("not_after", OptStr),
    ("status", OneOf(STATUSES)),
    ("attempt", Int),
    ("exit_code", OptInt),
    ("reason", OptStr),
    ("output_tail", Str),
    ("requests", Arr),
    ("events", Arr),
    ("conversation", Arr),
    ("tool_calls", Arr),
    ("plan", Arr),
    ("permission", OptObj),
    ("attachments", Arr),
    ("artifacts", Arr),
];
/// Each of a task's `conversation`.
const UTTERANCE: &[(&str, Ty)] = &[
    ("at", Str),
    ("role", OneOf(&["user", "agent"])),
    ("text", Str),
];
/// Each of a task's `events`: these always, plus `text` (output), `exit_code` (finished) or
/// `reason` (failed, cancelled).
const EVENT: &[(&str, Ty)] = &[
    ("at", Str),
    (
        "kind",
        OneOf(&[
            "delivered",
            "approval_requested",
            "started",
            "output",
            "finished",
            "failed",
            "cancelled",
            "denied",
            "interrupted",
            "approved",
            "cancel_requested",
            "retried",
            "replied",
            "agent_session",
            "tool_call",
            "plan",
            "permission_requested",
            "permission_answered",
            "permission_resolved",
            "artifact",
        ]),
    ),
    ("attempt", Int),
    ("author", Str),
];
/// `thread --json`.
const THREAD: &[(&str, Ty)] = &[("thread_id", Str), ("tasks", Arr), ("messages", Arr)];
/// Each of `thread --json`'s `messages`.
const MESSAGE: &[(&str, Ty)] = &[
    ("id", Str),
    ("author", Str),
    ("kind", OneOf(&["user", "agent", "system"])),
    ("text", Str),
    ("at", Str),
    ("task", OptStr),
];
/// Each entry of `devices --json` (an array).
const DEVICE: &[(&str, Ty)] = &[
    ("id", Str),
    ("name", Str),
    ("kind", OneOf(&["desktop"])),
    ("paired_at", Str),
    ("last_seen", OptStr),
    ("revoked", Bool),
    ("addrs", Arr),
];
/// `devices add PEER_ID --json`.
const DEVICES_ADD: &[(&str, Ty)] = &[("id", Str), ("kind", OneOf(&["desktop"])), ("addrs", Arr)];
/// `approve|deny|cancel|retry ID --json`.
const ACT: &[(&str, Ty)] = &[
    ("task_id", Str),
    ("requested", OneOf(&["approve", "deny", "cancel", "retry"])),
];
/// `forget --json`.
const FORGET: &[(&str, Ty)] = &[("forgotten", Arr), ("removed_files", Int)];

fn fits(v: &Value, ty: Ty) -> bool {
    match ty {
        Str => v.is_string(),
        OptStr => v.is_string() || v.is_null(),
        Bool => v.is_boolean(),
        Int => v.is_i64() || v.is_u64(),
        OptInt => v.is_i64() || v.is_u64() || v.is_null(),
        Arr => v.is_array(),
        OptObj => v.is_object() || v.is_null(),
        OneOf(names) => v.as_str().is_some_and(|s| names.contains(&s)),
        OptOneOf(names) => v.is_null() || v.as_str().is_some_and(|s| names.contains(&s)),
    }
}

/// `v` is an object with exactly `fields` (plus `extra`, which may be absent), typed as listed.
fn shape_with(what: &str, v: &Value, fields: &[(&str, Ty)], extra: &[(&str, Ty)]) -> Result<()> {
    let obj = v
        .as_object()
        .with_context(|| format!("{what} is not an object: {v}"))?;
    for (key, ty) in fields {
        let got = obj
            .get(*key)
            .with_context(|| format!("{what} lacks {key:?}: {v}"))?;
        ensure!(fits(got, *ty), "{what}.{key} is not {ty:?}: {got}");
    }
    for (key, got) in obj {
        if fields.iter().any(|(k, _)| k == key) {
            continue;
        }
        match extra.iter().find(|(k, _)| k == key) {
            Some((_, ty)) => ensure!(fits(got, *ty), "{what}.{key} is not {ty:?}: {got}"),
            None => bail!("{what} has an undocumented key {key:?}: {v}"),
        }
    }
    Ok(())
}

fn shape(what: &str, v: &Value, fields: &[(&str, Ty)]) -> Result<()> {
    shape_with(what, v, fields, &[])
}

fn each(what: &str, v: &Value, fields: &[(&str, Ty)]) -> Result<()> {
    for (i, item) in v.as_array().into_iter().flatten().enumerate() {
        shape(&format!("{what}[{i}]"), item, fields)?;
    }
    Ok(())
}

fn task_shape(what: &str, v: &Value) -> Result<()> {
    shape(what, v, TASK)?;
    for (i, e) in v["events"].as_array().into_iter().flatten().enumerate() {
        let extra: &[(&str, Ty)] = match e["kind"].as_str() {
            Some("output") => &[("text", Str)],
            Some("finished") => &[("exit_code", Int)],
            Some("failed" | "cancelled") => &[("reason", Str)],
            Some("replied") => &[("text", Str)],
            Some("agent_session") => &[("session_id", Str), ("how", Str)],
            Some("tool_call") => &[
                ("call_id", Str),
                ("title", Str),
                ("tool_kind", Str),
                ("status", Str),
            ],
            Some("plan") => &[("entries", Arr)],
            Some("permission_requested") => &[
                ("perm_id", Str),
                ("title", Str),
                ("tool_kind", Str),
                ("options", Arr),
            ],
            Some("permission_answered") => &[("perm_id", Str), ("option_id", Str)],
            Some("permission_resolved") => &[("perm_id", Str), ("option_id", Str), ("by", Str)],
            Some("artifact") => &[("file", OptObj)],
            _ => &[],
        };
        shape_with(&format!("{what}.events[{i}]"), e, EVENT, extra)?;
        for (key, _) in extra {
            ensure!(
                e.get(*key).is_some(),
                "{what}.events[{i}] lacks {key:?}: {e}"
            );
        }
    }
    for (i, u) in v["conversation"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        shape(&format!("{what}.conversation[{i}]"), u, UTTERANCE)?;
    }
    for r in v["requests"].as_array().into_iter().flatten() {
        ensure!(
            fits(r, OneOf(&["cancel_requested", "approved", "denied"])),
            "{what}.requests has {r}"
        );
    }
    Ok(())
}

const LOOPBACK: [&str; 3] = ["--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"];

#[test]
fn every_phone_json_output_has_exactly_the_documented_fields() -> Result<()> {
    // Short: the daemon's control socket path must fit in 108 bytes.
    let tmp = tempfile::Builder::new().prefix("ej").tempdir_in("/tmp")?;
    let desktop = Home::desktop(tmp.path(), "desktop");
    let (_desktop_daemon, desktop_addr) = desktop.start(&[])?;
    let ticket = desktop.json(&["pair", "--json"])?["ticket"]
        .as_str()
        .context("ticket")?
        .to_owned();
    let phone = Home::phone(tmp.path(), "phone");

    let mut args = vec!["pair", ticket.as_str(), "--json"];
    args.extend(LOOPBACK);
    let paired = phone.json(&args)?;
    shape("pair", &paired, PAIR)?;
    let desktop_id = paired["desktop_id"].as_str().context("desktop_id")?;

    let status = phone.json(&["status", "--json"])?;
    shape("status", &status, STATUS)?;
    each("status.peers", &status["peers"], STATUS_PEER)?;
    ensure!(status["running"] == false && status["peers"][0]["id"] == desktop_id);

    let sent = phone.json(&["send", "echo json-contract", "--json"])?;
    shape("send", &sent, SEND)?;
    let id = sent["task_id"].as_str().context("task_id")?.to_owned();

    // Sync until the desktop has run it, so the task has output and finished events.
    let mut sync = vec!["sync", "--timeout", "30s"];
    sync.extend(LOOPBACK);
    let task = wait_for("the task to finish", DEADLINE * 2, || {
        let _ = phone.run(&sync);
        let t = phone.json(&["task", &id, "--json"]).ok()?;
        (t["status"] == "done").then_some(t)
    })?;
    task_shape("task", &task)?;
    ensure!(task["exit_code"] == 0 && task["output_tail"] == "json-contract\n");

    let thread = phone.json(&["thread", "--json"])?;
    shape("thread", &thread, THREAD)?;
    for (i, t) in thread["tasks"].as_array().into_iter().flatten().enumerate() {
        task_shape(&format!("thread.tasks[{i}]"), t)?;
    }
    each("thread.messages", &thread["messages"], MESSAGE)?;

    let devices = phone.json(&["devices", "--json"])?;
    ensure!(devices.is_array(), "devices --json is an array: {devices}");
    each("devices", &devices, DEVICE)?;

    for (action, requested) in [
        ("retry", "retry"),
        ("approve", "approve"),
        ("deny", "deny"),
        ("cancel", "cancel"),
    ] {
        let v = phone.json(&[action, &id, "--json"])?;
        shape(action, &v, ACT)?;
        ensure!(v["requested"] == requested && v["task_id"] == id.as_str());
    }

    let added = phone.json(&[
        "devices",
        "add",
        desktop_id,
        "--addr",
        &desktop_addr,
        "--json",
    ])?;
    shape("devices add", &added, DEVICES_ADD)?;

    // Through the phone daemon: the same shapes.
    let (phone_daemon, _) = phone.start(&[])?;
    let status = phone.json(&["status", "--json"])?;
    shape("status (daemon)", &status, STATUS)?;
    each("status.peers (daemon)", &status["peers"], STATUS_PEER)?;
    ensure!(status["running"] == true && status["listen_addrs"][0].is_string());
    task_shape("task (daemon)", &phone.json(&["task", &id, "--json"])?)?;
    shape(
        "thread (daemon)",
        &phone.json(&["thread", "--json"])?,
        THREAD,
    )?;
    phone_daemon.stop()?;

    let forgot = phone.json(&["forget", "--json"])?;
    shape("forget", &forgot, FORGET)?;
    ensure!(forgot["forgotten"] == serde_json::json!([desktop_id]));
    Ok(())
}
