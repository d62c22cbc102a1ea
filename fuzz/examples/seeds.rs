//! Writes the seed corpora of the fuzz targets into `fuzz/seeds/<target>/`: real frames, a
//! real ticket, a phone's real sync message and changes, real config files and real ACP
//! updates (as the scripted agent and Claude Code's adapter send them).
//!
//! `cargo run --example seeds` in `fuzz/`, then commit what changed.

use std::path::Path;

use automerge::{ActorId, AutoCommit, sync::SyncDoc as _, transaction::Transactable as _};
use errand_core::{DeviceId, Ticket};
use errand_crdt::DocId;
use errand_p2p::sync::wire::{Frame, Hello, PROTOCOL_VERSION};

fn write(target: &str, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(name), bytes)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A phone's document with a task-shaped change or two, by the actor the ingest target
    // binds to the phone.
    let mut doc = AutoCommit::new().with_actor(ActorId::from([7u8; 16]));
    let tasks = doc.put_object(automerge::ROOT, "tasks", automerge::ObjType::Map)?;
    for i in 0..3 {
        let t = doc.put_object(&tasks, format!("task-{i}"), automerge::ObjType::Map)?;
        doc.put(&t, "instruction", format!("summarise the CSVs {i}"))?;
        doc.put(&t, "created_at", 1_700_000_000_000i64 + i)?;
        doc.commit();
    }
    let changes: Vec<u8> = doc
        .get_changes(&[])
        .iter()
        .flat_map(|c| c.raw_bytes().to_vec())
        .collect();
    let mut state = automerge::sync::State::new();
    let msg = doc
        .sync()
        .generate_sync_message(&mut state)
        .map(|m| m.encode())
        .unwrap_or_default();
    write("ingest", "changes", &changes)?;
    write("ingest", "sync-message", &msg)?;
    let hashes: Vec<_> = doc.get_changes(&[]).iter().map(|c| c.hash()).collect();
    let bundle = doc.bundle(hashes)?;
    write("ingest", "bundle", bundle.bytes())?;

    let doc_id = DocId::parse("meta").ok_or("doc id")?;
    let hello = Frame::hello(&Hello {
        version: PROTOCOL_VERSION,
        genesis: None,
    });
    write("frame", "hello", &hello.encode())?;
    write(
        "frame",
        "sync",
        &Frame::sync(doc_id.clone(), msg.clone()).encode(),
    )?;
    let heads = doc.get_heads();
    write(
        "frame",
        "changes",
        &Frame::changes(doc_id.clone(), &heads, &changes).encode(),
    )?;
    let big: Vec<u8> = msg.iter().cycle().take(64 * 1024).copied().collect();
    write(
        "frame",
        "sync-packed",
        &Frame::sync(doc_id.clone(), big).packed().encode(),
    )?;
    // Forty one-task changes in a row, as a phone back from offline sends them: packed
    // frames carry them linked (checksums zeroed, dependencies as indices).
    for i in 3..43 {
        let t = doc.put_object(&tasks, format!("task-{i}"), automerge::ObjType::Map)?;
        doc.put(&t, "instruction", format!("summarise the CSVs {i}"))?;
        doc.commit();
    }
    let queued: Vec<Vec<u8>> = doc
        .get_changes(&heads)
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect();
    let linked_msg = automerge::sync::Message {
        heads: doc.get_heads(),
        need: Vec::new(),
        have: Vec::new(),
        changes: queued.clone().into(),
        flags: None,
        version: automerge::sync::MessageVersion::V1,
    };
    write(
        "frame",
        "sync-linked",
        &Frame::sync(doc_id.clone(), linked_msg.encode())
            .packed()
            .encode(),
    )?;
    write(
        "frame",
        "changes-linked",
        &Frame::changes(doc_id, &doc.get_heads(), &queued.concat())
            .packed()
            .encode(),
    )?;

    let desktop: DeviceId = "12D3KooWDCT34peGpcuEMCN8VpNeqmJ3jDZ26cjpQQmvKovri1fm".parse()?;
    let ticket = Ticket::new(
        desktop,
        [
            "/ip4/192.168.1.5/tcp/4001",
            "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWNxXjQP6QJS1mSFt4tFwqATwM6kkiaDbwDsi1yXB8Uw3m/p2p-circuit",
        ],
        600_000,
        1_765_000_000_000,
    );
    write("ticket", "lan-and-relay", ticket.to_string().as_bytes())?;

    write(
        "config",
        "template",
        errand_desktop::config::TEMPLATE.as_bytes(),
    )?;
    write(
        "config",
        "agents",
        br#"workspace = "~/work"
approval = "ask"
approval_expiry = "1h"
task_timeout = "30m"
output_cap = "64KiB"
max_parallel = 2

[[executors]]
name = "shell"
kind = "shell"

[[executors]]
name = "claude"
kind = "acp"
argv = ["npx", "-y", "@zed-industries/claude-code-acp"]
auto_allow = ["read", "search"]
permission_expiry = "30m"

[[executors]]
name = "print"
kind = "command"
argv = ["claude", "-p", "--", "{instruction}"]
stdin = "thread"
"#,
    )?;

    let updates = [
        r#"{"sessionId":"sess-1","update":{"sessionUpdate":"agent_message_chunk","content":{"type":"text","text":"Working "}}}"#,
        r#"{"sessionId":"sess-1","update":{"sessionUpdate":"tool_call","toolCallId":"call-1","title":"Look around","kind":"read","status":"pending"}}"#,
        r#"{"sessionId":"sess-1","update":{"sessionUpdate":"tool_call_update","toolCallId":"call-1","status":"completed"}}"#,
        r#"{"sessionId":"sess-1","update":{"sessionUpdate":"plan","entries":[{"content":"Read the request","priority":"high","status":"completed"},{"content":"Answer","priority":"high","status":"in_progress"}]}}"#,
        r#"{"sessionId":"sess-1","update":{"sessionUpdate":"agent_thought_chunk","content":{"type":"text","text":"hmm"}}}"#,
        r#"{"sessionId":"sess-1","update":{"sessionUpdate":"available_commands_update","availableCommands":[]}}"#,
    ];
    for (i, u) in updates.iter().enumerate() {
        write("acp", &format!("update-{i}"), u.as_bytes())?;
    }
    Ok(())
}
