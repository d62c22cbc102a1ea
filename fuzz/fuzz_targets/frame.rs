//! A frame from a peer: decoding, unpacking (a zstd bomb must stop at the frame limit, linked
//! change chunks are restored or refused), and reading it as a hello or as pushed changes.
//! Every refusal is an error value.
#![no_main]

use errand_p2p::sync::wire::{Frame, FrameKind, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = Frame::decode(data.to_vec()) else {
        return;
    };
    // What decodes encodes back to the same bytes.
    assert_eq!(frame.encode(), data, "decode then encode changed the frame");
    let Ok(frame) = frame.unpacked() else {
        return;
    };
    assert!(
        frame.body.len() <= MAX_FRAME,
        "an unpacked body of {} bytes passed the {MAX_FRAME}-byte limit",
        frame.body.len()
    );
    assert!(
        frame.kind.unpacked().is_none(),
        "unpacked yet still packed"
    );
    match frame.kind {
        FrameKind::Hello => {
            let _ = frame.into_hello();
        }
        FrameKind::Changes => {
            if let Ok((heads, changes)) = frame.into_changes() {
                assert!(changes.len() <= MAX_FRAME);
                let _ = heads;
            }
        }
        _ => {}
    }
});
