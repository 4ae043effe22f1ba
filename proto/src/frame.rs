//! Frame codec: a fixed 32-byte header, then a body of `body_len_bytes` bytes.
//!
//! ```text
//! offset size field
//!      0    4 magic          0x5242_4B31 ("RBK1")
//!      4    2 version        1
//!      6    2 kind           message kind (see `message`)
//!      8    2 flags          bit 0 = RESPONSE; bits 1..15 reserved, must be 0
//!     10    2 reserved       must be 0
//!     12    8 request_id     chosen by the requester, echoed in the response
//!     20    4 body_len_bytes <= MAX_FRAME_BODY_BYTES
//!     24    4 reserved_2     must be 0 (pads the header to 32 bytes)
//!     28    4 crc            CRC-32C over header bytes 0..28, then the body
//! ```
//!
//! All integers are little-endian. The named fields add up to 28 bytes; the
//! 32-bit `reserved_2` word pads the header to 32 bytes so the body starts
//! aligned, and is covered by the CRC like every other header byte.
//!
//! Decoding is incremental ([`decode_frame`], [`FrameCodec`]). The header is
//! validated (magic, version, reserved bits, `body_len_bytes` bound) as soon as its
//! 32 bytes are present — before waiting for or reserving space for the body
//! — so a peer cannot make us buffer gigabytes by lying about the length.
//! Then the CRC is checked over the whole frame, so any corrupted byte is
//! rejected. The body is handed out zero-copy: [`Frame::body`] is a slice of
//! the read buffer. Decoding never panics, whatever the input.
//!
//! Encoding ([`encode_frame`], [`FrameBuilder`]) writes header and body into
//! one buffer, so a payload is copied exactly once (from the message into the
//! frame); writers hand the resulting `Bytes` to the socket without further
//! copies.
//!
//! The frame layer does not interpret kinds; `Message::from_frame` maps an
//! unknown kind to [`FrameError::UnknownKind`].

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::wire::DecodeError;

/// "RBK1".
pub const MAGIC: u32 = 0x5242_4B31;
/// The only version this build speaks.
pub const VERSION: u16 = 1;
pub const HEADER_BYTES: usize = 32;
/// Largest data payload a message may carry.
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;
/// Largest body: a maximal payload plus room for the message's other fields.
pub const MAX_FRAME_BODY_BYTES: usize = MAX_PAYLOAD_BYTES + 64 * 1024;
/// `flags` bit 0: this frame answers the request with the same id.
pub const FLAG_RESPONSE: u16 = 0x0001;
const KNOWN_FLAGS: u16 = FLAG_RESPONSE;
/// Bytes of the header covered by the CRC (everything before the crc field).
const CRC_COVERED_HEADER_BYTES: usize = 28;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    pub kind: u16,
    pub flags: u16,
    pub request_id: u64,
    pub body_len_bytes: u32,
}

impl FrameHeader {
    pub fn is_response(&self) -> bool {
        self.flags & FLAG_RESPONSE != 0
    }

    /// Header bytes with the crc field set to `crc`.
    fn to_bytes(self, crc: u32) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&self.kind.to_le_bytes());
        out[8..10].copy_from_slice(&self.flags.to_le_bytes());
        // 10..12 reserved, 24..28 reserved_2: zero.
        out[12..20].copy_from_slice(&self.request_id.to_le_bytes());
        out[20..24].copy_from_slice(&self.body_len_bytes.to_le_bytes());
        out[28..32].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Validate everything that does not need the body. Returns the header
    /// and the CRC it carries.
    fn parse(raw: &[u8; HEADER_BYTES]) -> Result<(FrameHeader, u32), FrameError> {
        let u16_at = |at: usize| u16::from_le_bytes([raw[at], raw[at + 1]]);
        let u32_at =
            |at: usize| u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let version = u16_at(4);
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion { found: version });
        }
        let flags = u16_at(8);
        if flags & !KNOWN_FLAGS != 0 || u16_at(10) != 0 || u32_at(24) != 0 {
            return Err(FrameError::ReservedBits);
        }
        let body_len = u32_at(20);
        if body_len as usize > MAX_FRAME_BODY_BYTES {
            return Err(FrameError::TooLarge {
                body_len_bytes: body_len.into(),
                max_bytes: MAX_FRAME_BODY_BYTES as u64,
            });
        }
        let mut request_id = [0u8; 8];
        request_id.copy_from_slice(&raw[12..20]);
        let header = FrameHeader {
            kind: u16_at(6),
            flags,
            request_id: u64::from_le_bytes(request_id),
            body_len_bytes: body_len,
        };
        Ok((header, u32_at(28)))
    }
}

/// One decoded frame. `body` is a zero-copy slice of the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: FrameHeader,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {found:#010x}")]
    BadMagic { found: u32 },
    #[error("unsupported protocol version {found}")]
    UnsupportedVersion { found: u16 },
    #[error("reserved header bits set")]
    ReservedBits,
    #[error("frame body of {body_len_bytes} bytes exceeds the maximum of {max_bytes}")]
    TooLarge { body_len_bytes: u64, max_bytes: u64 },
    #[error("CRC-32C mismatch: header says {expected:#010x}, frame has {found:#010x}")]
    Checksum { expected: u32, found: u32 },
    /// Only from one-shot decoding of a buffer that should hold a frame.
    #[error("truncated frame")]
    Truncated,
    /// Only from one-shot decoding: bytes after the frame.
    #[error("{extra} bytes after the frame")]
    TrailingBytes { extra: usize },
    #[error("unknown message kind {kind:#06x}")]
    UnknownKind { kind: u16 },
    /// The RESPONSE flag disagrees with the kind (a request kind flagged as
    /// a response or the reverse).
    #[error("kind {kind:#06x} with flags {flags:#06x}: RESPONSE flag does not match the kind")]
    ResponseFlagMismatch { kind: u16, flags: u16 },
    #[error("bad body: {0}")]
    Body(#[from] DecodeError),
    /// An authenticated connection's frame tag did not verify
    /// (`crate::auth`): tampered, replayed, reordered or forged.
    #[error("frame MAC does not verify")]
    Mac,
    /// Transport error while reading or writing frames (codec use only).
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// Short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            FrameError::BadMagic { .. } => "bad_magic",
            FrameError::UnsupportedVersion { .. } => "unsupported_version",
            FrameError::ReservedBits => "reserved_bits",
            FrameError::TooLarge { .. } => "too_large",
            FrameError::Checksum { .. } => "checksum",
            FrameError::Truncated => "truncated",
            FrameError::TrailingBytes { .. } => "trailing_bytes",
            FrameError::UnknownKind { .. } => "unknown_kind",
            FrameError::ResponseFlagMismatch { .. } => "response_flag_mismatch",
            FrameError::Body(_) => "body",
            FrameError::Mac => "mac",
            FrameError::Io(_) => "io",
        }
    }
}

/// Most buffer space reserved ahead of a body's bytes.
const RESERVE_AHEAD_BYTES: usize = 64 << 10;

/// Decode one frame from the front of `buf`.
///
/// `Ok(None)`: not enough bytes yet (space for up to 64 KiB more of the
/// announced body has been reserved). `Ok(Some(frame))`: the frame's bytes were removed from `buf`.
/// `Err`: the stream is corrupt; the caller must drop the connection (the
/// buffer is left as it was).
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    let Some(raw) = buf.get(..HEADER_BYTES) else {
        return Ok(None);
    };
    let mut raw_header = [0u8; HEADER_BYTES];
    raw_header.copy_from_slice(raw);
    let (header, expected) = FrameHeader::parse(&raw_header)?;
    let frame_len = HEADER_BYTES + header.body_len_bytes as usize;
    if buf.len() < frame_len {
        // Room for the body as it arrives, not on the header's word: a
        // peer announcing 16 MiB and sending nothing costs 64 KiB.
        buf.reserve((frame_len - buf.len()).min(RESERVE_AHEAD_BYTES));
        return Ok(None);
    }
    let found = frame_crc(&raw_header, &buf[HEADER_BYTES..frame_len]);
    if found != expected {
        return Err(FrameError::Checksum { expected, found });
    }
    let mut frame = buf.split_to(frame_len);
    frame.advance(HEADER_BYTES);
    Ok(Some(Frame {
        header,
        body: frame.freeze(),
    }))
}

/// The length (header and body) of the frame at the front of `buf`, once
/// its header is there and valid; the body need not have arrived.
pub fn peek_frame_len(buf: &BytesMut) -> Result<Option<usize>, FrameError> {
    let Some(raw) = buf.get(..HEADER_BYTES) else {
        return Ok(None);
    };
    let mut raw_header = [0u8; HEADER_BYTES];
    raw_header.copy_from_slice(raw);
    let (header, _) = FrameHeader::parse(&raw_header)?;
    Ok(Some(HEADER_BYTES + header.body_len_bytes as usize))
}

/// Decode a buffer that must hold exactly one frame. Zero-copy.
pub fn decode_frame_exact(bytes: Bytes) -> Result<Frame, FrameError> {
    let Some(raw) = bytes.get(..HEADER_BYTES) else {
        return Err(FrameError::Truncated);
    };
    let mut raw_header = [0u8; HEADER_BYTES];
    raw_header.copy_from_slice(raw);
    let (header, expected) = FrameHeader::parse(&raw_header)?;
    let frame_len = HEADER_BYTES + header.body_len_bytes as usize;
    match bytes.len().cmp(&frame_len) {
        std::cmp::Ordering::Less => return Err(FrameError::Truncated),
        std::cmp::Ordering::Greater => {
            return Err(FrameError::TrailingBytes {
                extra: bytes.len() - frame_len,
            })
        }
        std::cmp::Ordering::Equal => {}
    }
    let found = frame_crc(&raw_header, &bytes[HEADER_BYTES..]);
    if found != expected {
        return Err(FrameError::Checksum { expected, found });
    }
    Ok(Frame {
        header,
        body: bytes.slice(HEADER_BYTES..),
    })
}

fn frame_crc(header: &[u8; HEADER_BYTES], body: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&header[..CRC_COVERED_HEADER_BYTES]);
    crc32c::crc32c_append(crc, body)
}

/// Builds one frame in a single buffer: reserve the header, let the caller
/// write the body in place, then fill in length and CRC.
#[derive(Debug)]
pub struct FrameBuilder {
    buf: BytesMut,
    kind: u16,
    flags: u16,
    request_id: u64,
}

impl FrameBuilder {
    pub fn new(kind: u16, flags: u16, request_id: u64, body_capacity_hint: usize) -> FrameBuilder {
        let mut buf = BytesMut::with_capacity(HEADER_BYTES + body_capacity_hint);
        buf.put_bytes(0, HEADER_BYTES);
        FrameBuilder {
            buf,
            kind,
            flags,
            request_id,
        }
    }

    /// The body so far; append to it.
    pub fn body_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Seal the frame. Fails if the body is too large for the wire.
    pub fn finish(mut self) -> Result<Bytes, FrameError> {
        let body_len = self.buf.len() - HEADER_BYTES;
        if body_len > MAX_FRAME_BODY_BYTES {
            return Err(FrameError::TooLarge {
                body_len_bytes: body_len as u64,
                max_bytes: MAX_FRAME_BODY_BYTES as u64,
            });
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(FrameError::ReservedBits);
        }
        let header = FrameHeader {
            kind: self.kind,
            flags: self.flags,
            request_id: self.request_id,
            body_len_bytes: body_len as u32, // bounded above
        };
        let unsealed = header.to_bytes(0);
        let crc = frame_crc(&unsealed, &self.buf[HEADER_BYTES..]);
        self.buf[..HEADER_BYTES].copy_from_slice(&header.to_bytes(crc));
        Ok(self.buf.freeze())
    }
}

/// Encode one frame with `body`. Copies `body` once.
pub fn encode_frame(
    kind: u16,
    flags: u16,
    request_id: u64,
    body: &[u8],
) -> Result<Bytes, FrameError> {
    let mut builder = FrameBuilder::new(kind, flags, request_id, body.len());
    builder.body_mut().put_slice(body);
    builder.finish()
}

/// `tokio_util` codec for `Framed`/`FramedRead`/`FramedWrite`.
///
/// Decodes [`Frame`]s; encodes pre-built frames (`Bytes` from
/// [`encode_frame`] / `Message::to_frame`) and [`Frame`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameCodec;

impl tokio_util::codec::Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        decode_frame(src)
    }
}

impl tokio_util::codec::Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let bytes = encode_frame(
            frame.header.kind,
            frame.header.flags,
            frame.header.request_id,
            &frame.body,
        )?;
        dst.extend_from_slice(&bytes);
        Ok(())
    }
}

impl tokio_util::codec::Encoder<Bytes> for FrameCodec {
    type Error = FrameError;

    /// `frame` must be a complete encoded frame (it is appended as is).
    fn encode(&mut self, frame: Bytes, dst: &mut BytesMut) -> Result<(), FrameError> {
        dst.extend_from_slice(&frame);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_is_fixed() {
        let frame = encode_frame(0x0102, FLAG_RESPONSE, 0x1122_3344_5566_7788, b"abc").unwrap();
        assert_eq!(frame.len(), 35);
        assert_eq!(&frame[0..4], b"1KBR", "magic 0x52424B31 little-endian");
        assert_eq!(&frame[4..6], &[1, 0]);
        assert_eq!(&frame[6..8], &[0x02, 0x01]);
        assert_eq!(&frame[8..10], &[1, 0]);
        assert_eq!(&frame[10..12], &[0, 0]);
        assert_eq!(&frame[12..20], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&frame[20..24], &3u32.to_le_bytes());
        assert_eq!(&frame[24..28], &[0; 4]);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&frame[..28]), b"abc");
        assert_eq!(&frame[28..32], &crc.to_le_bytes());
        assert_eq!(&frame[32..], b"abc");
    }

    #[test]
    fn incremental_decode() {
        let a = encode_frame(1, 0, 7, b"hello").unwrap();
        let b = encode_frame(2, FLAG_RESPONSE, 8, b"").unwrap();
        let mut stream = BytesMut::new();
        stream.extend_from_slice(&a);
        stream.extend_from_slice(&b);
        let all = stream.clone().freeze();
        for split in 0..all.len() {
            let mut buf = BytesMut::from(&all[..split]);
            let mut frames = Vec::new();
            while let Some(frame) = decode_frame(&mut buf).unwrap() {
                frames.push(frame);
            }
            buf.extend_from_slice(&all[split..]);
            while let Some(frame) = decode_frame(&mut buf).unwrap() {
                frames.push(frame);
            }
            assert_eq!(frames.len(), 2);
            assert_eq!(frames[0].header.request_id, 7);
            assert_eq!(&frames[0].body[..], b"hello");
            assert!(frames[1].header.is_response());
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn oversized_body_rejected_from_header_alone() {
        let mut header = encode_frame(1, 0, 1, b"").unwrap().to_vec();
        header[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut buf = BytesMut::from(&header[..]);
        let capacity_before = buf.capacity();
        assert!(matches!(
            decode_frame(&mut buf),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(
            buf.capacity(),
            capacity_before,
            "nothing reserved for a rejected body"
        );
    }

    #[test]
    fn an_announced_body_reserves_at_most_64_kib_ahead() {
        let mut header = encode_frame(1, 0, 1, b"").unwrap().to_vec();
        header[20..24].copy_from_slice(&(MAX_FRAME_BODY_BYTES as u32).to_le_bytes());
        let mut buf = BytesMut::from(&header[..]);
        assert!(matches!(decode_frame(&mut buf), Ok(None)));
        assert!(
            buf.capacity() <= HEADER_BYTES + RESERVE_AHEAD_BYTES,
            "reserved {} bytes on a header's word",
            buf.capacity()
        );
    }

    #[test]
    fn maximal_body_accepted() {
        let body = vec![0xa5u8; MAX_FRAME_BODY_BYTES];
        let frame = encode_frame(1, 0, 1, &body).unwrap();
        let decoded = decode_frame_exact(frame).unwrap();
        assert_eq!(decoded.body.len(), MAX_FRAME_BODY_BYTES);
        let too_big = vec![0u8; MAX_FRAME_BODY_BYTES + 1];
        assert!(matches!(
            encode_frame(1, 0, 1, &too_big),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn exact_decode_rejects_short_and_long() {
        let frame = encode_frame(1, 0, 1, b"xyz").unwrap();
        assert!(matches!(
            decode_frame_exact(frame.slice(..34)),
            Err(FrameError::Truncated)
        ));
        let mut long = frame.to_vec();
        long.push(0);
        assert!(matches!(
            decode_frame_exact(long.into()),
            Err(FrameError::TrailingBytes { extra: 1 })
        ));
    }

    #[test]
    fn reserved_bits_rejected() {
        for (at, value) in [(8usize, 2u8), (10, 1), (11, 0x80), (24, 1), (27, 1)] {
            let mut bytes = encode_frame(1, 0, 1, b"").unwrap().to_vec();
            bytes[at] |= value;
            let mut buf = BytesMut::from(&bytes[..]);
            assert!(
                matches!(decode_frame(&mut buf), Err(FrameError::ReservedBits)),
                "byte {at}"
            );
        }
    }
}
