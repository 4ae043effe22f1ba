//! Checked little-endian primitives for message bodies.
//!
//! Every integer on the wire is little-endian with a fixed width. Composite
//! values use these encodings:
//!
//! | value | layout |
//! |---|---|
//! | `bool` | `u8`: 0 = false, 1 = true, anything else is an error |
//! | `Option<T>` | `u8` tag: 0 = `None`, 1 = `Some` followed by `T` |
//! | string | `u32` byte length (bounded per field), then UTF-8 bytes |
//! | `Vec<T>` | `u32` element count (bounded per field), then the elements |
//! | bytes | `u32` byte length (bounded per field), then the bytes |
//! | enum | `u8` tag, then the variant's fields |
//!
//! [`Reader`] is the decoding half. It reads from untrusted input, so every
//! accessor returns a [`DecodeError`] instead of panicking, every length is
//! checked against a per-field maximum *and* against the bytes actually left
//! before anything is allocated, and [`Reader::finish`] refuses trailing
//! bytes. (Never use `bytes::Buf::get_*` on network input: those panic on
//! short buffers.) Byte slices are returned zero-copy as [`Bytes::slice`]s
//! of the input, so a 16 MiB payload is never copied while decoding.
//!
//! [`Writer`] is the encoding half. It writes values produced by this
//! process, so it cannot fail; a length that does not fit the wire format is
//! a caller bug and panics.

use bytes::{BufMut, Bytes, BytesMut};

/// Why a message body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The body ended inside a field.
    #[error("truncated body: {field} needs {needed} bytes, {remaining} left")]
    Truncated {
        field: &'static str,
        needed: u64,
        remaining: usize,
    },
    /// A length or count prefix is larger than the field allows.
    #[error("{field} too long: {len} > {max}")]
    TooLong {
        field: &'static str,
        len: u64,
        max: u64,
    },
    /// An enum, option or bool tag is not one this version knows.
    #[error("unknown {field} tag {tag}")]
    UnknownTag { field: &'static str, tag: u8 },
    /// A string field is not valid UTF-8.
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    /// A field that must be zero in this form of the message is not (the
    /// encoding stays canonical: one message, one byte string).
    #[error("{field} must be 0 here, not {value}")]
    NotZero { field: &'static str, value: u64 },
    /// The body is longer than its message.
    #[error("{remaining} trailing bytes after the message")]
    TrailingBytes { remaining: usize },
    /// The frame kind is not a message this version knows.
    #[error("unknown message kind {kind:#06x}")]
    UnknownKind { kind: u16 },
}

/// Decoder over an untrusted buffer. Never panics.
#[derive(Debug, Clone)]
pub struct Reader {
    buf: Bytes,
    position: usize,
}

impl Reader {
    pub fn new(buf: Bytes) -> Reader {
        Reader { buf, position: 0 }
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.position
    }

    /// Succeeds only if every byte was consumed.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            remaining => Err(DecodeError::TrailingBytes { remaining }),
        }
    }

    /// Consume `len` bytes; the returned range indexes `self.buf`.
    fn advance(
        &mut self,
        field: &'static str,
        len: u64,
    ) -> Result<std::ops::Range<usize>, DecodeError> {
        let remaining = self.remaining();
        match usize::try_from(len) {
            Ok(len) if len <= remaining => {
                let start = self.position;
                self.position += len;
                Ok(start..self.position)
            }
            _ => Err(DecodeError::Truncated {
                field,
                needed: len,
                remaining,
            }),
        }
    }

    /// `N` raw bytes (a fixed-size field such as a token).
    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let range = self.advance(field, N as u64)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[range]);
        Ok(out)
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_le_bytes)
    }

    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_le_bytes)
    }

    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.array(field).map(u64::from_le_bytes)
    }

    pub fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(DecodeError::UnknownTag { field, tag }),
        }
    }

    /// `u8` presence tag, then the value if present.
    pub fn option<T>(
        &mut self,
        field: &'static str,
        mut value: impl FnMut(&mut Reader) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, DecodeError> {
        match self.u8(field)? {
            0 => Ok(None),
            1 => value(self).map(Some),
            tag => Err(DecodeError::UnknownTag { field, tag }),
        }
    }

    /// `u32` length prefix checked against `max_len`, then the bytes,
    /// returned zero-copy as a slice of the input.
    pub fn bytes(&mut self, field: &'static str, max_len: u32) -> Result<Bytes, DecodeError> {
        let len = self.u32(field)?;
        if len > max_len {
            return Err(DecodeError::TooLong {
                field,
                len: len.into(),
                max: max_len.into(),
            });
        }
        let range = self.advance(field, len.into())?;
        Ok(self.buf.slice(range))
    }

    /// `u32` length prefix checked against `max_len`, then UTF-8.
    pub fn string(&mut self, field: &'static str, max_len: u32) -> Result<String, DecodeError> {
        let raw = self.bytes(field, max_len)?;
        match std::str::from_utf8(&raw) {
            Ok(text) => Ok(text.to_owned()),
            Err(_) => Err(DecodeError::InvalidUtf8 { field }),
        }
    }

    /// `u32` count checked against `max_count`, then the elements.
    ///
    /// Every element takes at least one byte, so the allocation is also
    /// bounded by the bytes actually left: a lying count costs nothing.
    pub fn vec<T>(
        &mut self,
        field: &'static str,
        max_count: u32,
        mut element: impl FnMut(&mut Reader) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let count = self.u32(field)?;
        if count > max_count {
            return Err(DecodeError::TooLong {
                field,
                len: count.into(),
                max: max_count.into(),
            });
        }
        let count = count as usize;
        let mut out = Vec::with_capacity(count.min(self.remaining()));
        for _ in 0..count {
            out.push(element(self)?);
        }
        Ok(out)
    }
}

/// Encoder into a `BytesMut`. Infallible: it only sees trusted values.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut BytesMut,
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut BytesMut) -> Writer<'a> {
        Writer { buf }
    }

    pub fn u8(&mut self, value: u8) {
        self.buf.put_u8(value);
    }

    pub fn u16(&mut self, value: u16) {
        self.buf.put_u16_le(value);
    }

    pub fn u32(&mut self, value: u32) {
        self.buf.put_u32_le(value);
    }

    pub fn u64(&mut self, value: u64) {
        self.buf.put_u64_le(value);
    }

    pub fn bool(&mut self, value: bool) {
        self.u8(u8::from(value));
    }

    /// Raw bytes with no length prefix (a fixed-size field).
    pub fn raw(&mut self, value: &[u8]) {
        self.buf.put_slice(value);
    }

    pub fn option<T>(&mut self, value: Option<&T>, mut write: impl FnMut(&mut Writer<'_>, &T)) {
        match value {
            None => self.u8(0),
            Some(value) => {
                self.u8(1);
                write(self, value);
            }
        }
    }

    /// # Panics
    /// If `len` does not fit the `u32` prefix (a caller bug: frames are far
    /// smaller).
    fn length(&mut self, len: usize) {
        let len =
            u32::try_from(len).unwrap_or_else(|_| panic!("length {len} does not fit a u32 prefix"));
        self.u32(len);
    }

    pub fn bytes(&mut self, value: &[u8]) {
        self.length(value.len());
        self.buf.put_slice(value);
    }

    pub fn string(&mut self, value: &str) {
        self.bytes(value.as_bytes());
    }

    pub fn vec<T>(&mut self, values: &[T], mut write: impl FnMut(&mut Writer<'_>, &T)) {
        self.length(values.len());
        for value in values {
            write(self, value);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn primitives_round_trip() {
        let mut buf = BytesMut::new();
        let mut w = Writer::new(&mut buf);
        w.u8(7);
        w.u16(0x1234);
        w.u32(0xdead_beef);
        w.u64(u64::MAX - 1);
        w.bool(true);
        w.option(Some(&5u32), |w, v| w.u32(*v));
        w.option(None::<&u32>, |w, v| w.u32(*v));
        w.string("héllo");
        w.bytes(b"payload");
        w.vec(&[1u16, 2, 3], |w, v| w.u16(*v));
        let buf = buf.freeze();
        assert_eq!(&buf[1..3], &[0x34, 0x12], "little-endian");

        let mut r = Reader::new(buf.clone());
        assert_eq!(r.u8("a").unwrap(), 7);
        assert_eq!(r.u16("b").unwrap(), 0x1234);
        assert_eq!(r.u32("c").unwrap(), 0xdead_beef);
        assert_eq!(r.u64("d").unwrap(), u64::MAX - 1);
        assert!(r.bool("e").unwrap());
        assert_eq!(r.option("f", |r| r.u32("f")).unwrap(), Some(5));
        assert_eq!(r.option("g", |r| r.u32("g")).unwrap(), None);
        assert_eq!(r.string("h", 16).unwrap(), "héllo");
        let payload = r.bytes("i", 16).unwrap();
        assert_eq!(&payload[..], b"payload");
        // Zero-copy: the slice points into the original buffer.
        assert!(buf.as_ptr_range().contains(&payload.as_ptr()));
        assert_eq!(r.vec("j", 3, |r| r.u16("j")).unwrap(), vec![1, 2, 3]);
        r.finish().unwrap();
    }

    #[test]
    fn errors_instead_of_panics() {
        let mut r = Reader::new(Bytes::from_static(&[1, 2, 3]));
        assert!(matches!(
            r.u32("x"),
            Err(DecodeError::Truncated {
                needed: 4,
                remaining: 3,
                ..
            })
        ));
        // A failed read consumes nothing.
        assert!(r.bool("b").unwrap());

        let mut r = Reader::new(Bytes::from_static(&[2]));
        assert!(matches!(
            r.bool("b"),
            Err(DecodeError::UnknownTag { tag: 2, .. })
        ));

        // A huge count with no elements behind it fails without allocating.
        let mut r = Reader::new(Bytes::from_static(&[0xff, 0xff, 0xff, 0x0f]));
        assert!(matches!(
            r.vec("v", u32::MAX, |r| r.u64("v")),
            Err(DecodeError::Truncated { .. })
        ));

        let mut r = Reader::new(Bytes::from_static(&[5, 0, 0, 0, 1, 2, 3, 4, 5]));
        assert!(matches!(
            r.bytes("s", 4),
            Err(DecodeError::TooLong { len: 5, max: 4, .. })
        ));

        let mut r = Reader::new(Bytes::from_static(&[2, 0, 0, 0, 0xff, 0xfe]));
        assert!(matches!(
            r.string("s", 4),
            Err(DecodeError::InvalidUtf8 { .. })
        ));

        let r = Reader::new(Bytes::from_static(&[0]));
        assert_eq!(r.finish(), Err(DecodeError::TrailingBytes { remaining: 1 }));
    }
}
