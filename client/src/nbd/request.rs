//! Sans-IO validation of transmission requests: a header (plus whether a
//! write payload was buffered) in, a [`Command`] or a rejection out.
//!
//! Checks, in this order, each with the error the spec asks for:
//!
//! | check | error |
//! |---|---|
//! | unknown command (`CACHE`, `BLOCK_STATUS` included) | `EINVAL` |
//! | flag not valid for the command / not negotiated | `EINVAL` |
//! | `FLUSH` with nonzero offset or length | `EINVAL` |
//! | zero length on `READ`/`WRITE`/`TRIM`/`WRITE_ZEROES` | `EINVAL` |
//! | `READ`/`WRITE` longer than the maximum payload | `EOVERFLOW` |
//! | offset or length not a multiple of 512 | `EINVAL` |
//! | past the end (or `offset + length` overflows): writes | `ENOSPC` |
//! | past the end: reads and trims | `EINVAL` |

use super::wire::*;

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset_bytes: u64,
        len: u32,
    },
    /// The payload was read by the shell.
    Write {
        offset_bytes: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset_bytes: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset_bytes: u64,
        len: u32,
        fua: bool,
    },
    Disconnect,
}

/// A request answered with an error without touching the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub errno: NbdErrno,
    pub message: String,
}

/// What validation needs to know about the connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub size_bytes: u64,
    pub minimum_block_bytes: u32,
    pub max_payload_bytes: u32,
    pub structured_replies: bool,
}

/// Validate one request header.
pub fn validate(header: &RequestHeader, limits: &Limits) -> Result<Command, Rejection> {
    let offset_bytes = header.offset_bytes;
    let len = header.length_bytes;
    let fua = header.flags & CMD_FLAG_FUA != 0;
    // FUA is accepted on every command (the spec says so once SEND_FUA is
    // advertised); the rest only where documented.
    let allowed_flags = match header.command {
        CMD_READ if limits.structured_replies => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_DISC => CMD_FLAG_FUA,
        CMD_CACHE | CMD_BLOCK_STATUS => {
            return Err(reject(NbdErrno::Invalid, "command not supported"))
        }
        other => {
            return Err(reject(
                NbdErrno::Invalid,
                &format!("unknown command {other}"),
            ))
        }
    };
    if header.flags & !allowed_flags != 0 {
        return Err(reject(
            NbdErrno::Invalid,
            &format!("flags {:#x} not valid for this command", header.flags),
        ));
    }
    match header.command {
        CMD_DISC => return Ok(Command::Disconnect),
        CMD_FLUSH => {
            if offset_bytes != 0 || len != 0 {
                return Err(reject(
                    NbdErrno::Invalid,
                    "flush offset and length must be zero",
                ));
            }
            return Ok(Command::Flush);
        }
        _ => {}
    }
    let is_write = matches!(header.command, CMD_WRITE | CMD_WRITE_ZEROES);
    if len == 0 {
        return Err(reject(NbdErrno::Invalid, "zero-length request"));
    }
    if matches!(header.command, CMD_READ | CMD_WRITE) && len > limits.max_payload_bytes {
        return Err(reject(
            NbdErrno::Overflow,
            &format!(
                "length {len} exceeds the maximum payload of {} bytes",
                limits.max_payload_bytes
            ),
        ));
    }
    let block = u64::from(limits.minimum_block_bytes);
    if offset_bytes % block != 0 || u64::from(len) % block != 0 {
        return Err(reject(
            NbdErrno::Invalid,
            &format!("range {offset_bytes}+{len} is not {block}-byte aligned"),
        ));
    }
    let in_range = offset_bytes
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= limits.size_bytes);
    if !in_range {
        let errno = if is_write {
            NbdErrno::NoSpace
        } else {
            NbdErrno::Invalid
        };
        return Err(reject(
            errno,
            &format!(
                "range {offset_bytes}+{len} beyond the export of {} bytes",
                limits.size_bytes
            ),
        ));
    }
    Ok(match header.command {
        CMD_READ => Command::Read { offset_bytes, len },
        CMD_WRITE => Command::Write {
            offset_bytes,
            len,
            fua,
        },
        CMD_TRIM => Command::Trim {
            offset_bytes,
            len,
            fua,
        },
        // Only WRITE_ZEROES is left: every other command returned above.
        _ => Command::WriteZeroes {
            offset_bytes,
            len,
            fua,
        },
    })
}

fn reject(errno: NbdErrno, message: &str) -> Rejection {
    Rejection {
        errno,
        message: message.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        size_bytes: 1 << 20,
        minimum_block_bytes: 512,
        max_payload_bytes: 32 << 20,
        structured_replies: false,
    };

    fn header(command: u16, flags: u16, offset_bytes: u64, length_bytes: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            handle: 1,
            offset_bytes,
            length_bytes,
        }
    }

    fn errno(h: RequestHeader) -> NbdErrno {
        validate(&h, &LIMITS).unwrap_err().errno
    }

    #[test]
    fn accepts_in_range_aligned_requests() {
        assert_eq!(
            validate(&header(CMD_READ, 0, 0, 1 << 20), &LIMITS),
            Ok(Command::Read {
                offset_bytes: 0,
                len: 1 << 20
            })
        );
        assert_eq!(
            validate(
                &header(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 512, 512),
                &LIMITS
            ),
            Ok(Command::WriteZeroes {
                offset_bytes: 512,
                len: 512,
                fua: true
            })
        );
        assert_eq!(
            validate(&header(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &LIMITS),
            Ok(Command::Flush)
        );
        assert_eq!(
            validate(&header(CMD_DISC, 0, 0, 0), &LIMITS),
            Ok(Command::Disconnect)
        );
    }

    #[test]
    fn rejects_with_the_spec_errors() {
        assert_eq!(errno(header(CMD_READ, 0, 1 << 20, 512)), NbdErrno::Invalid);
        assert_eq!(errno(header(CMD_WRITE, 0, 1 << 20, 512)), NbdErrno::NoSpace);
        assert_eq!(
            errno(header(CMD_WRITE_ZEROES, 0, u64::MAX - 511, 512)),
            NbdErrno::NoSpace
        );
        assert_eq!(
            errno(header(CMD_TRIM, 0, u64::MAX - 511, 1024)),
            NbdErrno::Invalid
        );
        assert_eq!(errno(header(CMD_READ, 0, 100, 512)), NbdErrno::Invalid);
        assert_eq!(errno(header(CMD_WRITE, 0, 0, 100)), NbdErrno::Invalid);
        assert_eq!(errno(header(CMD_READ, 0, 0, 0)), NbdErrno::Invalid);
        assert_eq!(
            errno(header(CMD_READ, 0, 0, (32 << 20) + 512)),
            NbdErrno::Overflow
        );
        assert_eq!(
            errno(header(CMD_READ, CMD_FLAG_DF, 0, 512)),
            NbdErrno::Invalid
        );
        assert_eq!(
            errno(header(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512)),
            NbdErrno::Invalid
        );
        assert_eq!(errno(header(CMD_FLUSH, 0, 0, 512)), NbdErrno::Invalid);
        assert_eq!(errno(header(CMD_CACHE, 0, 0, 512)), NbdErrno::Invalid);
        assert_eq!(
            errno(header(CMD_BLOCK_STATUS, 0, 0, 512)),
            NbdErrno::Invalid
        );
        assert_eq!(errno(header(42, 0, 0, 512)), NbdErrno::Invalid);
        assert_eq!(errno(header(CMD_READ, 1 << 9, 0, 512)), NbdErrno::Invalid);
        // Trims are not bounded by the payload limit.
        let big = Limits {
            size_bytes: 1 << 40,
            ..LIMITS
        };
        assert!(validate(&header(CMD_TRIM, 0, 0, u32::MAX - 511), &big).is_ok());
        // DF is valid once structured replies are on.
        let structured = Limits {
            structured_replies: true,
            ..LIMITS
        };
        assert!(validate(&header(CMD_READ, CMD_FLAG_DF, 0, 512), &structured).is_ok());
    }
}
