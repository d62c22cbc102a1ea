//! Every table of a home's redb file, in one place. Keys and values are typed here; which
//! module reads and writes each is named beside it. Document ids are `DocId` strings, peers
//! and devices their PeerId strings, tasks their ULID strings.

use redb::TableDefinition;

/// A document's compacted `save()`, if one was written (`Store`).
pub const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("doc_snapshot");
/// A document's incremental chunks since its snapshot, in order: (document, sequence)
/// (`Store`).
pub const CHUNKS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("doc_chunks");
/// Automerge sync state per (document, peer), written with the changes it describes
/// (`Store`).
pub const SYNC_STATES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("sync_state");
/// Small named values: the device's actor, its node identity, the thread's genesis, the
/// home's format, secrets (`Store::meta`).
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Peers this home trusts, JSON (`Store::trusted_peers`).
pub const TRUSTED: TableDefinition<&str, &[u8]> = TableDefinition::new("trusted_peers");
/// Heads of every stored document of the thread, loaded or not (the engine).
pub const DOC_HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("doc_heads");
/// Which segment holds each task (the engine).
pub const TASK_SEGMENT: TableDefinition<&str, u32> = TableDefinition::new("task_segment");
/// Tasks that are not finished, with their segment: such segments stay in memory (the
/// engine).
pub const OPEN_TASKS: TableDefinition<&str, u32> = TableDefinition::new("open_tasks");
/// The desktop runner's write-ahead ledger: (task, attempt) → entry (`errand-desktop`).
pub const TASK_LEDGER: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("task_ledger");
/// The desktop's scheduler: routine → every due time up to here is handled (ran, missed, or
/// fell in a pause), UTC milliseconds (`errand-desktop`).
pub const ROUTINE_HANDLED: TableDefinition<&str, i64> = TableDefinition::new("routine_handled");
/// Pairing tickets that are live or were used: ticket id → record (`errand-p2p`'s ticket
/// book).
pub const PAIR_TICKETS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("pair_tickets");
/// Blobs this home holds or is fetching: BLAKE3 hash (hex) → JSON `{size, complete,
/// verified_upto}`; the bytes are files under `<home>/blobs` (`errand-p2p`'s blob store).
pub const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
