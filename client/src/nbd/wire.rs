//! NBD wire constants and encoders (big-endian throughout, as the protocol
//! requires). Pure functions over byte buffers: no I/O here.

use bytes::{BufMut, BytesMut};

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: server greeting and the prefix of every client option.
pub const OPTION_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Prefix of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Option header: magic u64, option u32, length u32.
pub const OPTION_HEADER_BYTES: usize = 16;
/// Request header: magic u32, flags u16, type u16, handle u64, offset u64,
/// length u32.
pub const REQUEST_HEADER_BYTES: usize = 28;

// Handshake flags (server, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
// Client flags (32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags (16 bits).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;

// NBD_INFO_* types inside NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;

// Structured reply chunks.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// Longest string (export name, message) the protocol allows.
pub const MAX_STRING_BYTES: usize = 4096;

/// The error values the NBD protocol allows on the wire ("Error values" in
/// the spec). Anything a backend reports is mapped onto one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NbdErrno {
    /// `EPERM` (1): write to a read-only export.
    PermissionDenied,
    /// `EIO` (5): the device failed (or retries ran out).
    Io,
    /// `ENOMEM` (12).
    OutOfMemory,
    /// `EINVAL` (22): bad offset, length, alignment, flag or command.
    Invalid,
    /// `ENOSPC` (28): a write beyond the end of the export.
    NoSpace,
    /// `EOVERFLOW` (75): a length larger than the maximum payload.
    Overflow,
    /// `ENOTSUP` (95).
    NotSupported,
    /// `ESHUTDOWN` (108): the server is going away.
    Shutdown,
}

impl NbdErrno {
    /// The value sent on the wire.
    pub fn code(self) -> u32 {
        match self {
            NbdErrno::PermissionDenied => 1,
            NbdErrno::Io => 5,
            NbdErrno::OutOfMemory => 12,
            NbdErrno::Invalid => 22,
            NbdErrno::NoSpace => 28,
            NbdErrno::Overflow => 75,
            NbdErrno::NotSupported => 95,
            NbdErrno::Shutdown => 108,
        }
    }

    /// The conventional errno name.
    pub fn name(self) -> &'static str {
        match self {
            NbdErrno::PermissionDenied => "EPERM",
            NbdErrno::Io => "EIO",
            NbdErrno::OutOfMemory => "ENOMEM",
            NbdErrno::Invalid => "EINVAL",
            NbdErrno::NoSpace => "ENOSPC",
            NbdErrno::Overflow => "EOVERFLOW",
            NbdErrno::NotSupported => "ENOTSUP",
            NbdErrno::Shutdown => "ESHUTDOWN",
        }
    }
}

impl std::fmt::Display for NbdErrno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The server's first bytes: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[0..8].copy_from_slice(&INIT_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&OPTION_MAGIC.to_be_bytes());
    out[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// A parsed option header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length_bytes: u32,
}

/// Parse an option header; `None` if the magic is wrong (the client is not
/// speaking newstyle NBD: close).
pub fn parse_option_header(raw: &[u8; OPTION_HEADER_BYTES]) -> Option<OptionHeader> {
    let magic = u64::from_be_bytes(array(&raw[0..8]));
    if magic != OPTION_MAGIC {
        return None;
    }
    Some(OptionHeader {
        option: u32::from_be_bytes(array(&raw[8..12])),
        length_bytes: u32::from_be_bytes(array(&raw[12..16])),
    })
}

/// Append one option reply (header and data) to `out`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    // Every caller builds `data` from bounded pieces (names ≤ 4096 bytes).
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
}

/// A parsed transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset_bytes: u64,
    pub length_bytes: u32,
}

impl RequestHeader {
    /// Bytes of payload that follow this header on the wire (only
    /// `NBD_CMD_WRITE` carries one without extended headers).
    pub fn payload_bytes(&self) -> u32 {
        if self.command == CMD_WRITE {
            self.length_bytes
        } else {
            0
        }
    }
}

/// Parse a request header; `None` if the magic is wrong (the stream is out
/// of sync: close the connection).
pub fn parse_request_header(raw: &[u8; REQUEST_HEADER_BYTES]) -> Option<RequestHeader> {
    if u32::from_be_bytes(array(&raw[0..4])) != REQUEST_MAGIC {
        return None;
    }
    Some(RequestHeader {
        flags: u16::from_be_bytes(array(&raw[4..6])),
        command: u16::from_be_bytes(array(&raw[6..8])),
        handle: u64::from_be_bytes(array(&raw[8..16])),
        offset_bytes: u64::from_be_bytes(array(&raw[16..24])),
        length_bytes: u32::from_be_bytes(array(&raw[24..28])),
    })
}

/// Encode a request header (tests and tools).
pub fn encode_request_header(header: &RequestHeader) -> [u8; REQUEST_HEADER_BYTES] {
    let mut out = [0u8; REQUEST_HEADER_BYTES];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&header.flags.to_be_bytes());
    out[6..8].copy_from_slice(&header.command.to_be_bytes());
    out[8..16].copy_from_slice(&header.handle.to_be_bytes());
    out[16..24].copy_from_slice(&header.offset_bytes.to_be_bytes());
    out[24..28].copy_from_slice(&header.length_bytes.to_be_bytes());
    out
}

/// Simple reply header; the read payload (if any) follows separately.
pub fn put_simple_reply(out: &mut BytesMut, handle: u64, error: u32) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(handle);
}

/// Header of a final `NBD_REPLY_TYPE_OFFSET_DATA` chunk for `data_len`
/// bytes at `offset_bytes`; the data follows separately. `data_len` must
/// be at most `u32::MAX - 8` (the maximum payload is far below).
pub fn put_offset_data_header(out: &mut BytesMut, handle: u64, offset_bytes: u64, data_len: u32) {
    debug_assert!(data_len > 0 && data_len <= u32::MAX - 8);
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(REPLY_FLAG_DONE);
    out.put_u16(REPLY_TYPE_OFFSET_DATA);
    out.put_u64(handle);
    out.put_u32(data_len + 8);
    out.put_u64(offset_bytes);
}

/// A final `NBD_REPLY_TYPE_NONE` chunk (success without data).
pub fn put_structured_done(out: &mut BytesMut, handle: u64) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(REPLY_FLAG_DONE);
    out.put_u16(REPLY_TYPE_NONE);
    out.put_u64(handle);
    out.put_u32(0);
}

/// A final error chunk: `NBD_REPLY_TYPE_ERROR_OFFSET` when the failing
/// offset is known, else `NBD_REPLY_TYPE_ERROR`. The message is cut to
/// 4096 bytes on a character boundary.
pub fn put_structured_error(
    out: &mut BytesMut,
    handle: u64,
    errno: NbdErrno,
    message: &str,
    offset_bytes: Option<u64>,
) {
    let message = truncate_str(message, MAX_STRING_BYTES);
    let message_len = message.len() as u16; // ≤ 4096
    let (reply_type, tail) = match offset_bytes {
        Some(_) => (REPLY_TYPE_ERROR_OFFSET, 8u32),
        None => (REPLY_TYPE_ERROR, 0u32),
    };
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(REPLY_FLAG_DONE);
    out.put_u16(reply_type);
    out.put_u64(handle);
    out.put_u32(4 + 2 + u32::from(message_len) + tail);
    out.put_u32(errno.code());
    out.put_u16(message_len);
    out.put_slice(message.as_bytes());
    if let Some(offset) = offset_bytes {
        out.put_u64(offset);
    }
}

/// The longest prefix of `s` of at most `max` bytes ending on a character
/// boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn array<const N: usize>(slice: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(slice);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trips() {
        let header = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset_bytes: 1 << 40,
            length_bytes: 4096,
        };
        let raw = encode_request_header(&header);
        assert_eq!(parse_request_header(&raw), Some(header));
        assert_eq!(header.payload_bytes(), 4096);
        let mut bad = raw;
        bad[0] ^= 1;
        assert_eq!(parse_request_header(&bad), None);
    }

    #[test]
    fn structured_error_lengths_are_consistent() {
        let mut out = BytesMut::new();
        put_structured_error(&mut out, 9, NbdErrno::Invalid, "bad", Some(4096));
        // header 20 + errno 4 + len 2 + "bad" 3 + offset 8
        assert_eq!(out.len(), 20 + 4 + 2 + 3 + 8);
        assert_eq!(u32::from_be_bytes(array(&out[16..20])), 4 + 2 + 3 + 8);
        assert_eq!(
            u16::from_be_bytes(array(&out[6..8])),
            REPLY_TYPE_ERROR_OFFSET
        );
        let long = "é".repeat(3000);
        assert!(truncate_str(&long, MAX_STRING_BYTES).len() <= MAX_STRING_BYTES);
    }

    #[test]
    fn greeting_is_fixed_newstyle_with_no_zeroes() {
        let g = greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
    }
}
