//! Arbitrary bytes into the one-shot and streaming frame decoders.
//!
//! Invariants checked: nothing panics; the streaming decoder never holds more
//! than one frame's worth of bytes; both decoders agree on the first frame;
//! after a fatal error the stream decoder consumes nothing more.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::wire::{FRAME_HEADER_LEN, FrameDecoder, decode_frame};

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose the frame limit and the chunking, the rest is input.
    let (max, chunk, input) = match data {
        [a, b, rest @ ..] => (usize::from(*a) * 64, usize::from(*b).max(1), rest),
        _ => return,
    };
    let one_shot = decode_frame(input, max).map(|(u, used)| (u.id(), used));
    if let Ok((u, _)) = decode_frame(input, max) {
        let _ = u.verify();
    }

    let mut decoder = FrameDecoder::new(max);
    let mut rest = input;
    let mut first = None;
    let mut consumed = 0;
    while !rest.is_empty() {
        let piece = &rest[..rest.len().min(chunk)];
        let (used, frame) = decoder.feed(piece);
        assert!(used <= piece.len());
        assert!(decoder.buffered() <= FRAME_HEADER_LEN + max);
        consumed += used;
        rest = &rest[used..];
        if let Some(frame) = frame {
            if first.is_none() {
                first = Some(frame.as_ref().map(|u| (u.id(), consumed)).map_err(|e| e.clone()));
            }
            match frame {
                Ok(u) => {
                    let _ = u.verify();
                }
                Err(e) if e.is_fatal() => {
                    assert_eq!(decoder.feed(rest).0, 0);
                    break;
                }
                Err(_) => {}
            }
        }
        if used == 0 {
            break;
        }
    }
    // Whenever the one-shot decoder read a whole frame, the stream decoder read the same.
    if let Ok(ok) = one_shot {
        assert_eq!(first, Some(Ok(ok)));
    }
});
