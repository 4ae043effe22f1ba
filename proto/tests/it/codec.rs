//! Codec properties: round trips, corruption detection, truncation, junk.

use std::collections::{BTreeSet, HashSet};

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use proto::frame::{
    self, decode_frame, decode_frame_exact, encode_frame, FrameError, FLAG_RESPONSE,
};
use proto::sled::SledResponse;
use proto::volume::{HostReply, ReplicaReply};
use proto::Message;

use crate::strategies;

fn round_trip(message: &Message, request_id: u64) -> Message {
    let response = message.is_response();
    let encoded = message.to_frame(request_id, response);
    let mut buf = BytesMut::from(&encoded[..]);
    let frame = decode_frame(&mut buf).unwrap().unwrap();
    assert!(buf.is_empty());
    assert_eq!(frame.header.request_id, request_id);
    assert_eq!(frame.header.kind, message.kind());
    assert_eq!(frame.header.is_response(), response);
    Message::from_frame(&frame).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips(message in strategies::message(), request_id in any::<u64>()) {
        prop_assert_eq!(round_trip(&message, request_id), message);
    }

    #[test]
    fn header_round_trips(
        kind in any::<u16>(),
        response in any::<bool>(),
        request_id in any::<u64>(),
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let flags = if response { FLAG_RESPONSE } else { 0 };
        let encoded = encode_frame(kind, flags, request_id, &body).unwrap();
        let frame = decode_frame_exact(encoded).unwrap();
        prop_assert_eq!(frame.header.kind, kind);
        prop_assert_eq!(frame.header.flags, flags);
        prop_assert_eq!(frame.header.request_id, request_id);
        prop_assert_eq!(frame.header.body_len_bytes as usize, body.len());
        prop_assert_eq!(&frame.body[..], &body[..]);
    }

    /// Flip any byte of an encoded frame: decoding yields an error or waits
    /// for more bytes (a larger `body_len`), never a frame, never a panic.
    #[test]
    fn any_corrupted_byte_is_detected(
        message in strategies::message(),
        position in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let encoded = message.to_frame(42, message.is_response());
        let mut corrupted = encoded.to_vec();
        let at = position.index(corrupted.len());
        corrupted[at] ^= mask;
        let mut buf = BytesMut::from(&corrupted[..]);
        match decode_frame(&mut buf) {
            Err(_) | Ok(None) => {}
            Ok(Some(frame)) => prop_assert!(false, "corruption at byte {at} accepted: {frame:?}"),
        }
        prop_assert!(decode_frame_exact(Bytes::from(corrupted)).is_err());
    }

    /// Every prefix of a valid frame: incremental decode waits, one-shot
    /// decode says truncated.
    #[test]
    fn truncation_at_every_length(message in strategies::message()) {
        let encoded = message.to_frame(1, message.is_response());
        for len in 0..encoded.len() {
            let mut buf = BytesMut::from(&encoded[..len]);
            prop_assert!(matches!(decode_frame(&mut buf), Ok(None)), "prefix {len}");
            prop_assert!(matches!(decode_frame_exact(encoded.slice(..len)), Err(FrameError::Truncated)));
        }
    }

    /// Junk never panics the frame decoder, with or without a valid header
    /// prefix, nor the message decoder for any kind.
    #[test]
    fn random_bytes_never_panic(
        junk in proptest::collection::vec(any::<u8>(), 0..2048),
        kind in any::<u16>(),
        valid_prefix in any::<bool>(),
    ) {
        let mut buf = BytesMut::new();
        if valid_prefix {
            buf.extend_from_slice(&frame::MAGIC.to_le_bytes());
            buf.extend_from_slice(&frame::VERSION.to_le_bytes());
        }
        buf.extend_from_slice(&junk);
        for _ in 0..64 {
            match decode_frame(&mut buf) {
                Ok(Some(frame)) => { let _ = Message::from_frame(&frame); }
                Ok(None) | Err(_) => break,
            }
        }
        let _ = Message::decode(kind, Bytes::from(junk));
    }

    /// A body with a valid frame around it but junk inside is a typed error.
    #[test]
    fn random_bodies_in_valid_frames(
        kind in prop::sample::select(all_kinds()),
        body in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let flags = if proto::message::kind::is_response(kind) { FLAG_RESPONSE } else { 0 };
        let frame = decode_frame_exact(encode_frame(kind, flags, 1, &body).unwrap()).unwrap();
        if let Ok(message) = Message::from_frame(&frame) {
            // Accepted junk must be canonical: it re-encodes to the same bytes.
            let mut again = BytesMut::new();
            message.encode_body(&mut again);
            prop_assert_eq!(&again[..], &body[..]);
        }
    }
}

fn all_kinds() -> Vec<u16> {
    let mut kinds = vec![0x0001, 0x0002];
    kinds.extend(0x0101..=0x0108);
    kinds.extend(0x0181..=0x0189);
    kinds.extend(0x0201..=0x020a);
    kinds.extend(0x0211..=0x0213);
    kinds.extend(0x0221..=0x0222);
    kinds.extend(0x0281..=0x0286);
    kinds.extend(0x0291..=0x0294);
    kinds.extend(0x02a1..=0x02a2);
    kinds.extend(0x0301..=0x0302);
    kinds.extend(0x0381..=0x0382);
    kinds
}

/// The strategy reaches every kind and every error tag, and each round-trips.
#[test]
fn strategies_cover_every_variant() {
    let mut runner = TestRunner::deterministic();
    let strategy = strategies::message();
    let mut kinds = BTreeSet::new();
    let mut errors = HashSet::new();
    let mut host_errors = HashSet::new();
    let mut replica_errors = HashSet::new();
    for _ in 0..20_000 {
        let message = strategy.new_tree(&mut runner).unwrap().current();
        assert_eq!(round_trip(&message, 7), message);
        kinds.insert(message.kind());
        if let Message::SledReply(SledResponse::Error(error)) = &message {
            errors.insert(std::mem::discriminant(error));
        }
        if let Message::HostReply(HostReply::Error(error)) = &message {
            host_errors.insert(std::mem::discriminant(error));
        }
        if let Message::ReplicaReply(ReplicaReply::Error(error)) = &message {
            replica_errors.insert(std::mem::discriminant(error));
        }
    }
    assert_eq!(kinds.into_iter().collect::<Vec<_>>(), all_kinds());
    assert_eq!(errors.len(), 11);
    assert_eq!(host_errors.len(), 9);
    assert_eq!(replica_errors.len(), 6);
}

/// Exhaustive single-byte corruption of a few fixed frames (every position,
/// every non-zero xor mask).
#[test]
fn every_single_byte_corruption_is_detected_exhaustively() {
    let messages = [
        Message::Ping {
            nonce: 0x0123_4567_89ab_cdef,
        },
        Message::SledReply(SledResponse::Data {
            data: Bytes::from_static(b"some data"),
            block_crcs: vec![9],
        }),
    ];
    for message in messages {
        let encoded = message.to_frame(5, message.is_response());
        for at in 0..encoded.len() {
            for mask in 1..=255u8 {
                let mut corrupted = encoded.to_vec();
                corrupted[at] ^= mask;
                let mut buf = BytesMut::from(&corrupted[..]);
                assert!(
                    !matches!(decode_frame(&mut buf), Ok(Some(_))),
                    "byte {at} mask {mask:#x}"
                );
            }
        }
    }
}

#[test]
fn oversized_body_len_rejected_before_allocation() {
    let mut header = Message::Ping { nonce: 1 }.to_frame(1, false)[..frame::HEADER_BYTES].to_vec();
    let len = (frame::MAX_FRAME_BODY_BYTES + 1) as u32;
    header[20..24].copy_from_slice(&len.to_le_bytes());
    let mut buf = BytesMut::with_capacity(64);
    buf.extend_from_slice(&header);
    assert!(matches!(
        decode_frame(&mut buf),
        Err(FrameError::TooLarge { .. })
    ));
    assert!(buf.capacity() < 1024, "no space was reserved for the body");
}

#[test]
fn unknown_kind_in_valid_frame() {
    let frame = decode_frame_exact(encode_frame(0x020b, 0, 1, b"").unwrap()).unwrap();
    assert!(matches!(
        Message::from_frame(&frame),
        Err(FrameError::UnknownKind { kind: 0x020b })
    ));
}

/// The `frame_decode` fuzzer's find after snapshots merged: a snapshot
/// Release (or Drop) with a nonzero hold decoded to a message that
/// re-encodes with the hold zeroed. Such a body is refused now.
#[test]
fn snapshot_release_with_a_hold_is_refused() {
    let fuzzed = [
        0x88, 0x00, 0x05, 0x01, 0x00, 0x00, 0x10, 0xeb, 0xce, 0xeb, 0xeb, 0x5a, 0xeb, 0xeb, 0x32,
        0xeb, 0xeb, 0xeb, 0xeb, 0xeb, 0xeb, 0xeb, 0xeb, 0xeb, 0xeb, 0x8c, 0xff, 0xeb, 0x30, 0x4b,
        0x37, 0x21, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xeb, 0xeb, 0xeb,
        0xeb, 0xeb, 0x8c, 0xff, 0x30, 0x4b, 0x37, 0x01, 0x00, 0x00, 0x80, 0x00,
    ];
    let error = Message::decode(0x0207, Bytes::copy_from_slice(&fuzzed)).unwrap_err();
    assert!(
        matches!(
            error,
            proto::wire::DecodeError::NotZero {
                field: "hold_ms",
                value: 0x0080_0000
            }
        ),
        "{error:?}"
    );
    // The same body with no hold is a Release, and canonical.
    let mut canonical = fuzzed;
    canonical[fuzzed.len() - 4..].fill(0);
    let message = Message::decode(0x0207, Bytes::copy_from_slice(&canonical)).unwrap();
    let mut again = BytesMut::new();
    message.encode_body(&mut again);
    assert_eq!(&again[..], &canonical[..]);
}
