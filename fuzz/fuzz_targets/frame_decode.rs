//! Decode arbitrary bytes as one protocol frame.
//!
//! Properties: the decoder never panics; whatever decodes re-encodes (into a `MAX_FRAME` buffer)
//! to no more bytes than it came from, and decodes again to the same frame; a second encode gives
//! identical bytes (the encoding is canonical after one pass); encoding into a buffer one byte too
//! small fails cleanly with `TooLarge`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wisp::proto::{decode, encode, CodecError, Frame, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = decode(data) else { return };

    let mut buf = vec![0u8; MAX_FRAME];
    let n = encode(&frame, &mut buf).expect("a decoded frame must re-encode");
    assert!(n <= data.len(), "re-encoding grew the frame: {} input bytes, {n} encoded", data.len());

    let again = decode(&buf[..n]).expect("a re-encoded frame must decode");
    assert_eq!(again, frame, "round trip changed the frame");

    let mut buf2 = vec![0u8; MAX_FRAME];
    let m = encode(&again, &mut buf2).expect("second encode");
    assert_eq!(&buf[..n], &buf2[..m], "encoding is not canonical");

    // Too small a buffer is an error, never a panic or a short write reported as success.
    if n > 0 {
        assert_eq!(encode(&frame, &mut buf2[..n - 1]), Err(CodecError::TooLarge));
    }

    // The environment iterator relies on decode having validated the list (it uses `expect`).
    if let Frame::StepStart(s) = &frame {
        assert_eq!(s.env.iter().count(), s.env.len());
    }
    let _ = format!("{frame:?}");
});
