//! Feed arbitrary bytes to the frame decoder (incrementally, in the chunks
//! the input describes) and to the message decoder.
//!
//! Run with `cargo +nightly fuzz run frame_decode`; it also builds on stable
//! with `cargo build --manifest-path fuzz/Cargo.toml`.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use proto::frame::{decode_frame, decode_frame_exact};
use proto::Message;

fuzz_target!(|data: &[u8]| {
    // 1. The whole input as a stream of frames, fed in two chunks split at a
    //    position chosen by the first byte.
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut buf = BytesMut::from(&data[..split]);
    let mut fed_rest = false;
    for _ in 0..data.len() + 2 {
        match decode_frame(&mut buf) {
            Ok(Some(frame)) => {
                if let Ok(message) = Message::from_frame(&frame) {
                    // Whatever decodes must re-encode to the same frame.
                    let again =
                        message.to_frame(frame.header.request_id, frame.header.is_response());
                    let reparsed = decode_frame_exact(again).map(|f| Message::from_frame(&f).ok());
                    assert!(matches!(reparsed, Ok(Some(ref m)) if *m == message));
                }
            }
            Ok(None) if !fed_rest => {
                buf.extend_from_slice(&data[split..]);
                fed_rest = true;
            }
            Ok(None) | Err(_) => break,
        }
    }

    // 2. The input as a one-shot frame.
    let _ = decode_frame_exact(Bytes::copy_from_slice(data));

    // 3. The input as a message body: kind from the first two bytes.
    if data.len() >= 2 {
        let kind = u16::from_le_bytes([data[0], data[1]]);
        if let Ok(message) = Message::decode(kind, Bytes::copy_from_slice(&data[2..])) {
            let mut body = BytesMut::new();
            message.encode_body(&mut body);
            assert_eq!(&body[..], &data[2..], "decoding is canonical");
        }
    }
});
