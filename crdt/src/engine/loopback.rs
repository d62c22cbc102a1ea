//! Two engines joined in one process: the same hello and the same [`Engine::step`]s that a
//! session between real processes runs, with the frames handed over in memory. It is the
//! floor that errand-bench compares the real peers with (everything but the network and the
//! wire encoding), and a way to profile the engine alone.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use errand_core::DeviceId;

use super::{Engine, EngineError, PeerFrame};

/// What one [`sync`] exchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Exchanged {
    /// Frames, both ways.
    pub frames: usize,
    /// Payload bytes of those frames (sync messages, pushed changes and heads), before any
    /// wire encoding.
    pub bytes: usize,
    /// Time spent in `a`'s steps (hello included).
    pub a_time: Duration,
    /// Time spent in `b`'s steps (hello included).
    pub b_time: Duration,
}

/// Payload bytes of a frame.
pub fn frame_bytes(frame: &PeerFrame) -> usize {
    match frame {
        PeerFrame::Sync { message, .. } => message.len(),
        PeerFrame::Changes { heads, changes, .. } => heads.len() * 32 + changes.len(),
    }
}

/// Most frames one [`sync`] delivers before it gives up: a sync that does not settle is a bug.
const MAX_FRAMES: usize = 100_000;

/// Runs a fresh session between `a` (device `a_id`) and `b` (device `b_id`): hellos both
/// ways, then frames delivered in order, one direction after the other, until neither side
/// has anything to say.
pub fn sync(
    a: &mut Engine,
    a_id: &DeviceId,
    b: &mut Engine,
    b_id: &DeviceId,
) -> Result<Exchanged, EngineError> {
    let mut out = Exchanged::default();
    let t = Instant::now();
    let da = a.digests();
    out.a_time += t.elapsed();
    let t = Instant::now();
    let db = b.digests();
    let mut extra_b = b.start_session(a_id, da)?;
    let mut to_a: VecDeque<PeerFrame> = b.step(a_id, None, &mut extra_b)?.frames.into();
    out.b_time += t.elapsed();
    let t = Instant::now();
    let mut extra_a = a.start_session(b_id, db)?;
    let mut to_b: VecDeque<PeerFrame> = a.step(b_id, None, &mut extra_a)?.frames.into();
    out.a_time += t.elapsed();
    while !(to_a.is_empty() && to_b.is_empty()) {
        if out.frames > MAX_FRAMES {
            return Err(EngineError::Join(format!(
                "the in-process sync did not settle after {MAX_FRAMES} frames"
            )));
        }
        if let Some(f) = to_b.pop_front() {
            out.frames += 1;
            out.bytes += frame_bytes(&f);
            let t = Instant::now();
            to_a.extend(b.step(a_id, Some(f), &mut extra_b)?.frames);
            out.b_time += t.elapsed();
        }
        if let Some(f) = to_a.pop_front() {
            out.frames += 1;
            out.bytes += frame_bytes(&f);
            let t = Instant::now();
            to_b.extend(a.step(b_id, Some(f), &mut extra_a)?.frames);
            out.a_time += t.elapsed();
        }
    }
    Ok(out)
}
