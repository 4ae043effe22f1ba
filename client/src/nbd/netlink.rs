//! Generic netlink, just enough for the kernel NBD family ([`super::kernel`]).
//!
//! A generic netlink request is one netlink message:
//!
//! ```text
//! nlmsghdr   len u32 | type u16 (family id) | flags u16 | seq u32 | port u32
//! genlmsghdr cmd u8 | version u8 | reserved u16
//! attributes len u16 | type u16 | payload, padded to 4 bytes
//!            (a nested attribute's payload is more attributes; its type
//!             carries NLA_F_NESTED)
//! ```
//!
//! The kernel answers with zero or more messages of the family's type (the
//! command's reply, e.g. the index of a connected device) and then one
//! `NLMSG_ERROR` whose error is 0 (the acknowledgement `NLM_F_ACK` asks
//! for) or a negative errno, optionally followed by the extended-ack
//! message text. A family's id is dynamic: `CTRL_CMD_GETFAMILY` to the
//! controller (id 0x10) resolves the name; `ENOENT` means no such family
//! (for "nbd": the module is not loaded and could not be loaded).
//!
//! Encoding ([`Message`]) and decoding ([`messages`], [`attributes`]) are
//! sans-IO and unit-tested; [`GenlSocket`] is the blocking socket around
//! them (a receive timeout bounds every request).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// `NLMSG_ERROR` (include/uapi/linux/netlink.h).
const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`.
const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST`.
const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_ACK`.
const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_CAPPED`: an error message carries only the request's header.
const NLM_F_CAPPED: u16 = 0x100;
/// `NLM_F_ACK_TLVS`: extended-ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLMSGERR_ATTR_MSG`: the extended ack's text.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// `NETLINK_CAP_ACK` and `NETLINK_EXT_ACK` socket options (SOL_NETLINK).
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;
/// `NLA_F_NESTED`, `NLA_F_NET_BYTEORDER`.
pub const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | 0x4000);
/// The generic netlink controller and its commands (linux/genetlink.h).
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

const NLMSG_HEADER_BYTES: usize = 16;
const GENL_HEADER_BYTES: usize = 4;
const NLA_HEADER_BYTES: usize = 4;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Why a generic netlink request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket itself (open, send, receive, timeout).
    #[error("netlink socket: {0}")]
    Socket(#[from] io::Error),
    /// The kernel refused the request with this errno.
    #[error("{}{}", io::Error::from_raw_os_error(*errno), message.as_ref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Refused {
        errno: i32,
        /// The extended ack's text, when the kernel gave one.
        message: Option<String>,
    },
    /// The answer did not parse.
    #[error("malformed netlink answer: {0}")]
    Malformed(&'static str),
}

/// One generic netlink request being built.
#[derive(Debug)]
pub struct Message {
    buffer: Vec<u8>,
    nests: Vec<usize>,
}

impl Message {
    /// A request (`NLM_F_REQUEST | NLM_F_ACK`) of `command` to `family`.
    pub fn new(family: u16, command: u8, version: u8) -> Message {
        let mut buffer = Vec::with_capacity(64);
        buffer.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buffer.extend_from_slice(&family.to_ne_bytes());
        buffer.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buffer.extend_from_slice(&0u32.to_ne_bytes()); // seq, set by the socket
        buffer.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's is 0
        buffer.extend_from_slice(&[command, version, 0, 0]);
        Message {
            buffer,
            nests: Vec::new(),
        }
    }

    fn put(&mut self, kind: u16, payload: &[u8]) -> &mut Message {
        let length = NLA_HEADER_BYTES + payload.len();
        // Attribute payloads here are a few bytes; u16 cannot overflow.
        self.buffer
            .extend_from_slice(&u16::try_from(length).unwrap_or(u16::MAX).to_ne_bytes());
        self.buffer.extend_from_slice(&kind.to_ne_bytes());
        self.buffer.extend_from_slice(payload);
        self.buffer.resize(align4(self.buffer.len()), 0);
        self
    }

    pub fn put_u8(&mut self, kind: u16, value: u8) -> &mut Message {
        self.put(kind, &[value])
    }

    pub fn put_u32(&mut self, kind: u16, value: u32) -> &mut Message {
        self.put(kind, &value.to_ne_bytes())
    }

    pub fn put_u64(&mut self, kind: u16, value: u64) -> &mut Message {
        self.put(kind, &value.to_ne_bytes())
    }

    /// A NUL-terminated string attribute.
    pub fn put_str(&mut self, kind: u16, value: &str) -> &mut Message {
        let mut bytes = Vec::with_capacity(value.len() + 1);
        bytes.extend_from_slice(value.as_bytes());
        bytes.push(0);
        self.put(kind, &bytes)
    }

    /// Opens a nested attribute; close it with [`Message::end_nested`].
    pub fn begin_nested(&mut self, kind: u16) -> &mut Message {
        self.nests.push(self.buffer.len());
        self.buffer.extend_from_slice(&0u16.to_ne_bytes());
        self.buffer
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn end_nested(&mut self) -> &mut Message {
        if let Some(start) = self.nests.pop() {
            let length = u16::try_from(self.buffer.len() - start).unwrap_or(u16::MAX);
            self.buffer[start..start + 2].copy_from_slice(&length.to_ne_bytes());
        }
        self
    }

    /// The encoded message with sequence number `seq`.
    pub fn finish(&self, seq: u32) -> Vec<u8> {
        let mut bytes = self.buffer.clone();
        let length = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        bytes[0..4].copy_from_slice(&length.to_ne_bytes());
        bytes[8..12].copy_from_slice(&seq.to_ne_bytes());
        bytes
    }
}

/// One received netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// The netlink messages in one datagram.
pub fn messages(datagram: &[u8]) -> Result<Vec<Received<'_>>, NetlinkError> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while rest.len() >= NLMSG_HEADER_BYTES {
        let length = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if length < NLMSG_HEADER_BYTES || length > rest.len() {
            return Err(NetlinkError::Malformed("netlink message length"));
        }
        out.push(Received {
            kind: u16::from_ne_bytes([rest[4], rest[5]]),
            flags: u16::from_ne_bytes([rest[6], rest[7]]),
            seq: u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]),
            payload: &rest[NLMSG_HEADER_BYTES..length],
        });
        rest = &rest[align4(length).min(rest.len())..];
    }
    Ok(out)
}

/// The attributes in `bytes` as (type without flags, payload).
pub fn attributes(bytes: &[u8]) -> Result<Vec<(u16, &[u8])>, NetlinkError> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= NLA_HEADER_BYTES {
        let length = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        if length < NLA_HEADER_BYTES || length > rest.len() {
            return Err(NetlinkError::Malformed("attribute length"));
        }
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        out.push((kind, &rest[NLA_HEADER_BYTES..length]));
        rest = &rest[align4(length).min(rest.len())..];
    }
    Ok(out)
}

pub fn attr_u8(payload: &[u8]) -> Result<u8, NetlinkError> {
    payload
        .first()
        .copied()
        .ok_or(NetlinkError::Malformed("u8 attribute"))
}

pub fn attr_u16(payload: &[u8]) -> Result<u16, NetlinkError> {
    let bytes: [u8; 2] = payload
        .get(..2)
        .and_then(|b| b.try_into().ok())
        .ok_or(NetlinkError::Malformed("u16 attribute"))?;
    Ok(u16::from_ne_bytes(bytes))
}

pub fn attr_u32(payload: &[u8]) -> Result<u32, NetlinkError> {
    let bytes: [u8; 4] = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(NetlinkError::Malformed("u32 attribute"))?;
    Ok(u32::from_ne_bytes(bytes))
}

/// What an `NLMSG_ERROR` payload says: `Ok` for an acknowledgement.
fn decode_error(flags: u16, payload: &[u8]) -> Result<(), NetlinkError> {
    let bytes: [u8; 4] = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(NetlinkError::Malformed("short error message"))?;
    let error = i32::from_ne_bytes(bytes);
    if error == 0 {
        return Ok(());
    }
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        // After the errno: the request's header (capped) or whole request.
        let echoed = payload
            .get(4..8)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .unwrap_or(0);
        let skip = 4 + if flags & NLM_F_CAPPED != 0 {
            NLMSG_HEADER_BYTES
        } else {
            align4(echoed)
        };
        if let Some(tlvs) = payload.get(skip..) {
            for (kind, value) in attributes(tlvs).unwrap_or_default() {
                if kind == NLMSGERR_ATTR_MSG {
                    let text = value.split(|&b| b == 0).next().unwrap_or_default();
                    message = Some(String::from_utf8_lossy(text).into_owned());
                }
            }
        }
    }
    Err(NetlinkError::Refused {
        errno: -error,
        message,
    })
}

/// A blocking generic netlink socket.
#[derive(Debug)]
pub struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
}

/// How long one request waits for the kernel's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

impl GenlSocket {
    pub fn open() -> Result<GenlSocket, NetlinkError> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        for option in [NETLINK_CAP_ACK, NETLINK_EXT_ACK] {
            // SAFETY: setsockopt reads one c_int from `one`. Both options
            // are optional niceties (older kernels lack them): ignored.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_NETLINK,
                    option,
                    std::ptr::from_ref(&one).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        let timeout = libc::timeval {
            tv_sec: ANSWER_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: setsockopt reads one timeval from `timeout`.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: an all-zero sockaddr_nl is valid; we set the family.
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: bind reads a sockaddr_nl of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&address).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(GenlSocket { fd, seq: 1 })
    }

    /// Sends `message` and collects the payloads (after the generic
    /// netlink header) of the family's replies until the acknowledgement.
    pub fn request(&mut self, message: &Message) -> Result<Vec<Vec<u8>>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = message.finish(seq);
        // SAFETY: an all-zero sockaddr_nl addresses the kernel (port 0).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: sendto reads `bytes` and the address, both alive here.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                std::ptr::from_ref(&kernel).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let mut replies = Vec::new();
        let mut buffer = vec![0u8; 64 << 10];
        // Bounded: each receive waits at most ANSWER_TIMEOUT, and the
        // kernel sends a handful of messages per request.
        for _ in 0..1024 {
            // SAFETY: recv writes at most buffer.len() bytes into buffer.
            let received = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if received < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error.into());
            }
            let datagram = &buffer[..received as usize];
            for reply in messages(datagram)? {
                if reply.seq != seq {
                    continue; // a late answer to an earlier request
                }
                match reply.kind {
                    NLMSG_ERROR => {
                        decode_error(reply.flags, reply.payload)?;
                        return Ok(replies);
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => {
                        let body = reply
                            .payload
                            .get(GENL_HEADER_BYTES..)
                            .ok_or(NetlinkError::Malformed("short generic netlink header"))?;
                        replies.push(body.to_vec());
                    }
                }
            }
        }
        Err(NetlinkError::Malformed("no acknowledgement"))
    }

    /// The id of generic netlink family `name`; `Ok(None)` when the
    /// kernel has no such family.
    pub fn family_id(&mut self, name: &str) -> Result<Option<u16>, NetlinkError> {
        let mut message = Message::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
        message.put_str(CTRL_ATTR_FAMILY_NAME, name);
        let replies = match self.request(&message) {
            Ok(replies) => replies,
            Err(NetlinkError::Refused { errno, .. }) if errno == libc::ENOENT => return Ok(None),
            Err(error) => return Err(error),
        };
        for reply in &replies {
            for (kind, payload) in attributes(reply)? {
                if kind == CTRL_ATTR_FAMILY_ID {
                    return attr_u16(payload).map(Some);
                }
            }
        }
        Err(NetlinkError::Malformed("family answer without an id"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_request_with_nested_attributes_encodes_and_parses_back() {
        let mut message = Message::new(0x1c, 1, 1);
        message.put_u32(1, 7).put_u64(2, 1 << 30);
        message.begin_nested(7).begin_nested(1).put_u32(1, 42);
        message.end_nested().end_nested();
        message.put_str(10, "abc");
        let bytes = message.finish(9);
        assert_eq!(bytes.len() % 4, 0);
        let parsed = messages(&bytes).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].kind, 0x1c);
        assert_eq!(parsed[0].seq, 9);
        assert_eq!(parsed[0].flags, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(&parsed[0].payload[..4], &[1, 1, 0, 0]);
        let attrs = attributes(&parsed[0].payload[4..]).unwrap();
        assert_eq!(attrs.len(), 4);
        assert_eq!(attr_u32(attrs[0].1).unwrap(), 7);
        assert_eq!(attrs[1].1, &(1u64 << 30).to_ne_bytes());
        assert_eq!(attrs[2].0, 7, "the nested flag is masked off");
        let items = attributes(attrs[2].1).unwrap();
        assert_eq!(items.len(), 1);
        let fds = attributes(items[0].1).unwrap();
        assert_eq!(attr_u32(fds[0].1).unwrap(), 42);
        assert_eq!(attrs[3].1, b"abc\0");
    }

    fn error_message(errno: i32, flags: u16, text: Option<&str>) -> Vec<u8> {
        let mut payload = (-errno).to_ne_bytes().to_vec();
        // The capped echo of the request's header.
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&20u32.to_ne_bytes());
        payload.extend_from_slice(&header);
        if let Some(text) = text {
            let mut tlv = Message::new(0, 0, 0);
            tlv.put_str(NLMSGERR_ATTR_MSG, text);
            payload.extend_from_slice(&tlv.finish(0)[20..]);
        }
        let mut out = ((16 + payload.len()) as u32).to_ne_bytes().to_vec();
        out.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&5u32.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&payload);
        out
    }

    #[test]
    fn errors_and_acks_decode() {
        let ack = error_message(0, NLM_F_CAPPED, None);
        let parsed = messages(&ack).unwrap();
        assert!(decode_error(parsed[0].flags, parsed[0].payload).is_ok());

        let busy = error_message(libc::EBUSY, NLM_F_CAPPED | NLM_F_ACK_TLVS, Some("in use"));
        let parsed = messages(&busy).unwrap();
        match decode_error(parsed[0].flags, parsed[0].payload) {
            Err(NetlinkError::Refused { errno, message }) => {
                assert_eq!(errno, libc::EBUSY);
                assert_eq!(message.as_deref(), Some("in use"));
            }
            other => panic!("{other:?}"),
        }
        let plain = error_message(libc::EPERM, NLM_F_CAPPED, None);
        let parsed = messages(&plain).unwrap();
        assert!(matches!(
            decode_error(parsed[0].flags, parsed[0].payload),
            Err(NetlinkError::Refused { errno, message: None }) if errno == libc::EPERM
        ));
    }

    #[test]
    fn truncated_input_is_refused_not_read_past() {
        let mut bytes = Message::new(0x1c, 1, 1).finish(1);
        bytes[0..4].copy_from_slice(&400u32.to_ne_bytes());
        assert!(messages(&bytes).is_err());
        assert!(attributes(&[8, 0, 1, 0, 1]).is_err());
        assert!(attr_u32(&[1, 2]).is_err());
        assert!(decode_error(0, &[1]).is_err());
    }

    /// The controller family always exists; "nbd" only with the module.
    #[test]
    fn the_controller_resolves_families() {
        let mut socket = GenlSocket::open().unwrap();
        assert_eq!(socket.family_id("nlctrl").unwrap(), Some(GENL_ID_CTRL));
        assert_eq!(socket.family_id("rb-no-such-fam").unwrap(), None);
    }
}
