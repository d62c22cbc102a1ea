//! Size caps on what a thread may hold. Reads skip anything over these; writes refuse it.

/// Longest task instruction, in bytes. 64 KiB holds a long prompt with pasted context,
/// while keeping one task's change well below a sync frame.
pub const MAX_INSTRUCTION_BYTES: usize = 64 * 1024;

/// Longest chat message, in bytes. Same reasoning as instructions.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Most output text kept in the document per task, summed over its `output` events.
/// 256 KiB is plenty to read on a phone; the full log stays on the desktop.
pub const MAX_OUTPUT_PER_TASK_BYTES: usize = 256 * 1024;

/// Largest single `output` event. Output is batched at most every 500 ms or 16 KiB.
pub const MAX_OUTPUT_EVENT_BYTES: usize = 16 * 1024;

/// Longest free-text reason on `failed` / `cancelled`, and longest device or executor name.
pub const MAX_SHORT_TEXT_BYTES: usize = 512;

/// Most events read per task. A runaway writer cannot make one task unreadable:
/// output is capped long before this (256 KiB / 16 KiB = 16 full events, more small ones).
pub const MAX_EVENTS_PER_TASK: usize = 4096;

/// Most actor ids one device may list. A device gets a new actor only when a home is reset.
pub const MAX_ACTORS_PER_DEVICE: usize = 64;

/// Most executors a desktop may advertise.
pub const MAX_EXECUTORS: usize = 64;

/// How far up from a changed object a merge looks for the task that holds it. Our schema is
/// four levels deep (tasks map, task, events list, event); a peer's deeper nesting is not a
/// task's content.
pub const MAX_DEPTH: usize = 8;
