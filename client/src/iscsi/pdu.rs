//! RFC 7143 PDU framing, sans-IO: the 48-byte basic header segment (BHS),
//! additional header segments (AHS), the data segment padded to 4 bytes,
//! and the optional CRC-32C header and data digests.
//!
//! ```text
//! | BHS 48 | AHS 4·n | [header digest 4] | data (padded to 4) | [data digest 4] |
//! ```
//!
//! Digests are CRC-32C (Castagnoli), sent least significant byte first;
//! the header digest covers BHS and AHS, the data digest covers the data
//! and its padding. [`decode`] takes bytes and either returns a whole PDU
//! and how many bytes it used, asks for more, or reports a typed
//! [`PduError`]; [`Pdu::encode`] is its inverse. Field accessors read and
//! write the big-endian fields of the BHS in place.

use bytes::{BufMut, Bytes, BytesMut};

/// Length of the basic header segment.
pub const BHS_BYTES: usize = 48;
/// The "reserved" task tag (unsolicited NOP-In, no target transfer tag).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Initiator opcodes.
pub mod op {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MANAGEMENT: u8 = 0x02;
    pub const LOGIN: u8 = 0x03;
    pub const TEXT: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT: u8 = 0x06;
    pub const SNACK: u8 = 0x10;
    // Target opcodes.
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MANAGEMENT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const REJECT: u8 = 0x3f;
}

/// Which digests a connection uses (negotiated at login; none before).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// A malformed or unacceptable PDU. Any of these ends the connection
/// (error recovery level 0 has no finer recovery).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("unknown initiator opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("data segment of {len} bytes exceeds the negotiated {max}")]
    DataTooLong { len: usize, max: usize },
    #[error("header digest mismatch: computed {computed:#010x}, received {received:#010x}")]
    HeaderDigest { computed: u32, received: u32 },
    #[error("data digest mismatch: computed {computed:#010x}, received {received:#010x}")]
    DataDigest { computed: u32, received: u32 },
}

/// One PDU: its header, AHS and (unpadded) data segment.
#[derive(Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_BYTES],
    pub ahs: Bytes,
    pub data: Bytes,
}

impl std::fmt::Debug for Pdu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pdu")
            .field("opcode", &format_args!("{:#04x}", self.opcode()))
            .field("itt", &format_args!("{:#x}", self.itt()))
            .field("ahs", &self.ahs.len())
            .field("data", &self.data.len())
            .finish()
    }
}

fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// What [`decode`] found in a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole PDU, and the bytes it took from the front of the buffer.
    Pdu(Pdu, usize),
    /// At least this many bytes are needed in total.
    Need(usize),
}

/// Decode one PDU from the front of `buf`. `max_data` is the longest data
/// segment accepted (our MaxRecvDataSegmentLength, or the login limit).
pub fn decode(buf: &[u8], digests: Digests, max_data: usize) -> Result<Decoded, PduError> {
    decode_with(buf, digests, max_data, |opcode| {
        matches!(
            opcode,
            op::NOP_OUT
                | op::SCSI_COMMAND
                | op::TASK_MANAGEMENT
                | op::LOGIN
                | op::TEXT
                | op::DATA_OUT
                | op::LOGOUT
                | op::SNACK
        )
    })
}

/// Decode a PDU the target sent (tests play the initiator).
#[cfg(test)]
pub fn decode_target(buf: &[u8], digests: Digests, max_data: usize) -> Result<Decoded, PduError> {
    decode_with(buf, digests, max_data, |opcode| opcode >= 0x20)
}

fn decode_with(
    buf: &[u8],
    digests: Digests,
    max_data: usize,
    known: impl Fn(u8) -> bool,
) -> Result<Decoded, PduError> {
    if buf.len() < BHS_BYTES {
        return Ok(Decoded::Need(BHS_BYTES));
    }
    let opcode = buf[0] & 0x3f;
    if !known(opcode) {
        return Err(PduError::UnknownOpcode(opcode));
    }
    let ahs_len = usize::from(buf[4]) * 4;
    let data_len = usize::from(buf[5]) << 16 | usize::from(buf[6]) << 8 | usize::from(buf[7]);
    if data_len > max_data {
        return Err(PduError::DataTooLong {
            len: data_len,
            max: max_data,
        });
    }
    let header_end = BHS_BYTES + ahs_len;
    let header_digest = if digests.header { 4 } else { 0 };
    let data_start = header_end + header_digest;
    let padded = data_len + pad4(data_len);
    let data_digest = if digests.data && data_len > 0 { 4 } else { 0 };
    let total = data_start + padded + data_digest;
    if buf.len() < total {
        return Ok(Decoded::Need(total));
    }
    if digests.header {
        let computed = crc32c::crc32c(&buf[..header_end]);
        let received = u32::from_le_bytes([
            buf[header_end],
            buf[header_end + 1],
            buf[header_end + 2],
            buf[header_end + 3],
        ]);
        if computed != received {
            return Err(PduError::HeaderDigest { computed, received });
        }
    }
    if data_digest != 0 {
        let at = data_start + padded;
        let computed = crc32c::crc32c(&buf[data_start..at]);
        let received = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        if computed != received {
            return Err(PduError::DataDigest { computed, received });
        }
    }
    let mut bhs = [0u8; BHS_BYTES];
    bhs.copy_from_slice(&buf[..BHS_BYTES]);
    Ok(Decoded::Pdu(
        Pdu {
            bhs,
            ahs: Bytes::copy_from_slice(&buf[BHS_BYTES..header_end]),
            data: Bytes::copy_from_slice(&buf[data_start..data_start + data_len]),
        },
        total,
    ))
}

impl Pdu {
    /// A PDU with this opcode, everything else zero.
    pub fn new(opcode: u8) -> Pdu {
        let mut bhs = [0u8; BHS_BYTES];
        bhs[0] = opcode & 0x3f;
        Pdu {
            bhs,
            ahs: Bytes::new(),
            data: Bytes::new(),
        }
    }

    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }

    /// The I bit: an immediate command (does not advance CmdSN).
    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }

    /// The F bit (final / last PDU of a sequence).
    pub fn final_bit(&self) -> bool {
        self.bhs[1] & 0x80 != 0
    }

    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }

    pub fn set_flags(&mut self, flags: u8) {
        self.bhs[1] = flags;
    }

    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes([
            self.bhs[at],
            self.bhs[at + 1],
            self.bhs[at + 2],
            self.bhs[at + 3],
        ])
    }

    pub fn set_u32_at(&mut self, at: usize, value: u32) {
        self.bhs[at..at + 4].copy_from_slice(&value.to_be_bytes());
    }

    pub fn lun(&self) -> u64 {
        u64::from_be_bytes([
            self.bhs[8],
            self.bhs[9],
            self.bhs[10],
            self.bhs[11],
            self.bhs[12],
            self.bhs[13],
            self.bhs[14],
            self.bhs[15],
        ])
    }

    pub fn set_lun(&mut self, lun: u64) {
        self.bhs[8..16].copy_from_slice(&lun.to_be_bytes());
    }

    /// Initiator task tag.
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }

    pub fn set_itt(&mut self, itt: u32) {
        self.set_u32_at(16, itt);
    }

    /// Target transfer tag (Data-Out, NOP-Out, Text).
    pub fn ttt(&self) -> u32 {
        self.u32_at(20)
    }

    /// CmdSN of a request (bytes 24..28).
    pub fn cmdsn(&self) -> u32 {
        self.u32_at(24)
    }

    /// ExpStatSN of a request (bytes 28..32).
    pub fn exp_statsn(&self) -> u32 {
        self.u32_at(28)
    }

    /// Sets the data segment (its length goes into the BHS at encoding).
    pub fn with_data(mut self, data: Bytes) -> Pdu {
        self.data = data;
        self
    }

    /// The wire form in three parts, without copying the data segment:
    /// the header (BHS, AHS, header digest), the data segment itself, and
    /// the trailer (padding and data digest). Their concatenation is
    /// [`Pdu::encode`]'s output; the connection's writer sends the parts
    /// one after the other into its buffer (a read's payload is copied
    /// once, into the socket buffer, instead of twice).
    pub fn encode_parts(&self, digests: Digests) -> (PduHead, &[u8], PduTrailer) {
        let data_len = self.data.len().min(0xff_ffff);
        let mut bhs = self.bhs;
        bhs[4] = (self.ahs.len() / 4) as u8;
        bhs[5] = (data_len >> 16) as u8;
        bhs[6] = (data_len >> 8) as u8;
        bhs[7] = data_len as u8;
        let mut head = PduHead {
            bhs,
            ahs: self.ahs.clone(),
            digest: [0; 4],
            digest_len: 0,
        };
        if digests.header {
            let crc = crc32c::crc32c_append(crc32c::crc32c(&head.bhs), &head.ahs);
            head.digest = crc.to_le_bytes();
            head.digest_len = 4;
        }
        let data = &self.data[..data_len];
        let mut trailer = PduTrailer::default();
        if data_len > 0 {
            let pad = [0u8; 3];
            let pad = &pad[..pad4(data_len)];
            trailer.bytes[..pad.len()].copy_from_slice(pad);
            trailer.len = pad.len();
            if digests.data {
                let crc = crc32c::crc32c_append(crc32c::crc32c(data), pad);
                trailer.bytes[trailer.len..trailer.len + 4].copy_from_slice(&crc.to_le_bytes());
                trailer.len += 4;
            }
        }
        (head, data, trailer)
    }

    /// The wire form: header, digests and padding as negotiated. Data
    /// segments longer than 2^24 - 1 bytes are cut (never produced here:
    /// every segment is bounded by the peer's MaxRecvDataSegmentLength).
    pub fn encode(&self, digests: Digests) -> Bytes {
        let data_len = self.data.len().min(0xff_ffff);
        let mut bhs = self.bhs;
        bhs[4] = (self.ahs.len() / 4) as u8;
        bhs[5] = (data_len >> 16) as u8;
        bhs[6] = (data_len >> 8) as u8;
        bhs[7] = data_len as u8;
        let mut out = BytesMut::with_capacity(BHS_BYTES + self.ahs.len() + data_len + 12);
        out.put_slice(&bhs);
        out.put_slice(&self.ahs);
        if digests.header {
            let crc = crc32c::crc32c(&out);
            out.put_u32_le(crc);
        }
        if data_len > 0 {
            let start = out.len();
            out.put_slice(&self.data[..data_len]);
            out.put_bytes(0, pad4(data_len));
            if digests.data {
                let crc = crc32c::crc32c(&out[start..]);
                out.put_u32_le(crc);
            }
        }
        out.freeze()
    }
}

/// A PDU's header on the wire: BHS, AHS and header digest, without a
/// heap allocation per PDU (the AHS is a reference-counted slice, empty
/// in every PDU this target sends).
#[derive(Debug)]
pub struct PduHead {
    bhs: [u8; BHS_BYTES],
    ahs: Bytes,
    digest: [u8; 4],
    digest_len: usize,
}

impl PduHead {
    /// The BHS with its lengths set.
    pub fn bhs(&self) -> &[u8] {
        &self.bhs
    }

    /// The AHS, then the header digest (when negotiated).
    pub fn rest(&self) -> (&[u8], &[u8]) {
        (&self.ahs, &self.digest[..self.digest_len])
    }
}

/// A PDU's trailer on the wire: padding (≤ 3 bytes) and data digest.
#[derive(Debug, Default, Clone, Copy)]
pub struct PduTrailer {
    bytes: [u8; 7],
    len: usize,
}

impl PduTrailer {
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parts_concatenate_to_the_encoding() {
        for data_len in [0usize, 1, 3, 4, 5, 4096, 4099] {
            for (header, data) in [(false, false), (true, false), (false, true), (true, true)] {
                let digests = Digests { header, data };
                for ahs in [0usize, 8] {
                    let mut pdu = sample();
                    pdu.ahs = Bytes::from(vec![0xa1; ahs]);
                    pdu = pdu.with_data(Bytes::from(vec![0x5a; data_len]));
                    let (head, body, trailer) = pdu.encode_parts(digests);
                    let (ahs_bytes, digest) = head.rest();
                    let mut joined = head.bhs().to_vec();
                    joined.extend_from_slice(ahs_bytes);
                    joined.extend_from_slice(digest);
                    joined.extend_from_slice(body);
                    joined.extend_from_slice(trailer.as_slice());
                    assert_eq!(
                        joined,
                        pdu.encode(digests).to_vec(),
                        "{data_len} {digests:?} ahs {ahs}"
                    );
                }
            }
        }
    }

    fn sample() -> Pdu {
        let mut pdu = Pdu::new(op::SCSI_COMMAND);
        pdu.bhs[0] |= 0x40;
        pdu.set_flags(0xa1);
        pdu.set_lun(1 << 48);
        pdu.set_itt(0x1234_5678);
        pdu.set_u32_at(24, 7);
        pdu.with_data(Bytes::from_static(b"hello"))
    }

    #[test]
    fn round_trips_with_and_without_digests() {
        for digests in [
            Digests::default(),
            Digests {
                header: true,
                data: true,
            },
            Digests {
                header: true,
                data: false,
            },
        ] {
            let pdu = sample();
            let wire = pdu.encode(digests);
            // 48 + [4] + 5 data + 3 padding + [4]
            let expected =
                48 + if digests.header { 4 } else { 0 } + 8 + if digests.data { 4 } else { 0 };
            assert_eq!(wire.len(), expected);
            assert_eq!(
                &wire[wire.len() - 3 - if digests.data { 4 } else { 0 }..][..3],
                &[0, 0, 0]
            );
            let Decoded::Pdu(back, used) = decode(&wire, digests, 8192).unwrap() else {
                panic!("incomplete")
            };
            assert_eq!(used, wire.len());
            assert_eq!(back.data, pdu.data);
            assert_eq!(back.itt(), 0x1234_5678);
            assert!(back.immediate());
            assert_eq!(back.lun(), 1 << 48);
            assert_eq!(back.cmdsn(), 7);
            // Every prefix asks for more.
            for cut in 0..wire.len() {
                assert!(matches!(
                    decode(&wire[..cut], digests, 8192).unwrap(),
                    Decoded::Need(n) if n > cut
                ));
            }
        }
    }

    #[test]
    fn digest_bytes_are_crc32c_little_endian() {
        // RFC 7143 B.4: 32 bytes of zeros have CRC-32C 0x8a9136aa, sent
        // as aa 36 91 8a.
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        let mut pdu = Pdu::new(op::NOP_OUT);
        pdu.data = Bytes::from(vec![0u8; 32]);
        let wire = pdu.encode(Digests {
            header: false,
            data: true,
        });
        assert_eq!(&wire[wire.len() - 4..], &[0xaa, 0x36, 0x91, 0x8a]);
    }

    #[test]
    fn malformed_pdus_are_typed_errors() {
        let digests = Digests {
            header: true,
            data: true,
        };
        let wire = sample().encode(digests);
        let mut bad_header = wire.to_vec();
        bad_header[20] ^= 1;
        assert!(matches!(
            decode(&bad_header, digests, 8192),
            Err(PduError::HeaderDigest { .. })
        ));
        let mut bad_data = wire.to_vec();
        bad_data[53] ^= 1;
        assert!(matches!(
            decode(&bad_data, digests, 8192),
            Err(PduError::DataDigest { .. })
        ));
        assert_eq!(
            decode(&wire, digests, 4),
            Err(PduError::DataTooLong { len: 5, max: 4 })
        );
        let mut target_opcode = wire.to_vec();
        target_opcode[0] = op::SCSI_RESPONSE;
        assert_eq!(
            decode(&target_opcode, digests, 8192),
            Err(PduError::UnknownOpcode(op::SCSI_RESPONSE))
        );
    }

    #[test]
    fn ahs_is_framed() {
        let mut pdu = Pdu::new(op::SCSI_COMMAND);
        pdu.ahs = Bytes::from_static(&[0, 5, 1, 0, 1, 2, 3, 4]);
        let wire = pdu.encode(Digests::default());
        assert_eq!(wire[4], 2);
        let Decoded::Pdu(back, _) = decode(&wire, Digests::default(), 0).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!(back.ahs.len(), 8);
    }
}
