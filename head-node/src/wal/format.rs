//! On-device format of the write log (pure, sans-IO).
//!
//! ```text
//! offset 0       superblock copy A (generation even)      4 KiB
//! offset 4096    superblock copy B (generation odd)       4 KiB
//! offset 8192    ring: records, each 4 KiB aligned         capacity_bytes
//! ```
//!
//! **Record** = one 4 KiB header block followed by `payload_blocks` 4 KiB
//! blocks. Header, little-endian:
//!
//! ```text
//!   0 magic u64 "RBHNWREC"     48 volume u64
//!   8 version u16              56 partition u32
//!  10 kind u8                  60 block_count u32
//!  11 reserved u8 (0)          64 epoch u64
//!  12 payload_blocks u32       72 sequence u64
//!  16 log_id u64               80 lba u64 (4 KiB blocks)
//!  24 position_bytes u64       88 payload_len_bytes u64
//!  32 lap u64                  96 CRC-32C of each payload block, payload_blocks x u32
//!  40 open_generation u64    4092 CRC-32C of bytes 0..4092
//! ```
//!
//! A record is accepted by recovery only if the header checksum holds, the
//! `log_id` is this log's, `position_bytes` is exactly where the scan
//! expects the next record (so a stale record of a previous lap, which
//! carries an older position, is refused: `lap = position_bytes /
//! capacity_bytes` is stored too for humans), `open_generation` does not go backwards (a record left behind by
//! a cut torn tail is never resurrected after newer records end exactly where
//! it starts) and every payload block matches its CRC.
//!
//! **Superblock** (two ping-pong copies, the copy for generation `g` is
//! `g % 2`, highest valid generation wins; a torn superblock write can only
//! destroy the previous-but-one state):
//!
//! ```text
//!   0 magic u64 "RBHNWSB1"      40 tail_position_bytes u64 (logical position of the oldest live record)
//!   8 version u32               48 head_position_hint_bytes u64 (head when written; informational)
//!  12 reserved u32              56 open_generation u64
//!  16 log_id u64               4092 CRC-32C of bytes 0..4092
//!  24 generation u64
//!  32 capacity_bytes u64
//! ```

use bytes::Bytes;
use proto::sled::PartitionId;
use proto::BLOCK_SIZE_BYTES;
use thiserror::Error;

// Every record and the ring are whole volume blocks ([`BLOCK_SIZE_BYTES`]),
// written with O_DIRECT: a block must be whole device I/O units.
const _: () = assert!(BLOCK_SIZE_BYTES % hardware::IO_ALIGN_BYTES as u64 == 0);

/// Record and superblock format version.
pub const FORMAT_VERSION: u16 = 1;
/// Offsets of the two superblock copies.
pub const SUPERBLOCK_OFFSETS: [u64; 2] = [0, BLOCK_SIZE_BYTES];
/// Where the ring of records starts on the device.
pub const RING_OFFSET: u64 = 2 * BLOCK_SIZE_BYTES;

const RECORD_MAGIC: u64 = u64::from_le_bytes(*b"RBHNWREC");
const SUPERBLOCK_MAGIC: u64 = u64::from_le_bytes(*b"RBHNWSB1");
const HEADER_FIXED_BYTES: usize = 96;
const CRC_OFFSET: usize = BLOCK_SIZE_BYTES as usize - 4;

/// Most payload blocks one record can carry (their CRCs fill the header).
pub const MAX_PAYLOAD_BLOCKS: usize = (CRC_OFFSET - HEADER_FIXED_BYTES) / 4;

/// What a record means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// `block_count` blocks of data at `lba`; the payload is the blocks.
    Write = 1,
    /// `block_count` blocks at `lba` unmapped (trim, write-zeroes); no payload.
    Trim = 2,
    /// Logged blocks up to `sequence` reached the sleds; the payload is the
    /// caller's encoded commit (extent, columns, ranges).
    FlushCommit = 3,
    /// A caller-defined checkpoint marker; the payload is opaque.
    Checkpoint = 4,
    /// Internal: fills the ring up to its end so that no record wraps.
    Padding = 5,
}

impl RecordKind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => RecordKind::Write,
            2 => RecordKind::Trim,
            3 => RecordKind::FlushCommit,
            4 => RecordKind::Checkpoint,
            5 => RecordKind::Padding,
            _ => return None,
        })
    }
}

/// One logical log record, as appended and as recovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Meaning of the record.
    pub kind: RecordKind,
    /// Partition it belongs to.
    pub partition: PartitionId,
    /// Epoch of the primary that produced it.
    pub epoch: u64,
    /// Per-partition sequence number.
    pub sequence: u64,
    /// First 4 KiB block it covers.
    pub lba: u64,
    /// Number of 4 KiB blocks it covers.
    pub block_count: u32,
    /// `Write`: `block_count * BLOCK_SIZE_BYTES` bytes; `Trim`: empty; otherwise opaque.
    pub payload: Bytes,
}

impl LogRecord {
    /// A write of whole blocks (`data.len()` a multiple of [`BLOCK_SIZE_BYTES`]).
    pub fn write(partition: PartitionId, epoch: u64, sequence: u64, lba: u64, data: Bytes) -> Self {
        let block_count = u32::try_from(data.len() / BLOCK_SIZE_BYTES as usize).unwrap_or(u32::MAX);
        Self {
            kind: RecordKind::Write,
            partition,
            epoch,
            sequence,
            lba,
            block_count,
            payload: data,
        }
    }

    /// A write whose blocks must match the CRC-32Cs the client sent (end to
    /// end: a block corrupted between the socket and the log is refused, not
    /// logged under a fresh checksum).
    pub fn write_with_crcs(
        partition: PartitionId,
        epoch: u64,
        sequence: u64,
        lba: u64,
        data: Bytes,
        expected_crcs: &[u32],
    ) -> Result<Self, FormatError> {
        let record = Self::write(partition, epoch, sequence, lba, data);
        record.validate()?;
        let computed = block_crcs(&record.payload);
        if computed.len() != expected_crcs.len() {
            return Err(FormatError::BadField {
                field: "block_crcs",
                value: expected_crcs.len() as u64,
            });
        }
        if let Some(block) = computed.iter().zip(expected_crcs).position(|(a, b)| a != b) {
            return Err(FormatError::BlockChecksum {
                block: block as u32,
                stored: expected_crcs[block],
                computed: computed[block],
            });
        }
        Ok(record)
    }

    /// An unmap of `block_count` blocks at `lba`.
    pub fn trim(
        partition: PartitionId,
        epoch: u64,
        sequence: u64,
        lba: u64,
        block_count: u32,
    ) -> Self {
        Self {
            kind: RecordKind::Trim,
            partition,
            epoch,
            sequence,
            lba,
            block_count,
            payload: Bytes::new(),
        }
    }

    /// Payload blocks on the device (the payload rounded up to 4 KiB).
    pub fn payload_blocks(&self) -> usize {
        self.payload.len().div_ceil(BLOCK_SIZE_BYTES as usize)
    }

    /// Bytes the record occupies in the ring (header + padded payload).
    pub fn encoded_len(&self) -> u64 {
        (1 + self.payload_blocks() as u64) * BLOCK_SIZE_BYTES
    }

    /// Checks the shape rules before the record is queued.
    pub fn validate(&self) -> Result<(), FormatError> {
        let blocks = self.payload_blocks();
        if blocks > MAX_PAYLOAD_BLOCKS {
            return Err(FormatError::PayloadTooLarge {
                payload_len_bytes: self.payload.len() as u64,
                max_len_bytes: (MAX_PAYLOAD_BLOCKS * BLOCK_SIZE_BYTES as usize) as u64,
            });
        }
        let bad = match self.kind {
            RecordKind::Write => {
                self.payload.len() % BLOCK_SIZE_BYTES as usize != 0
                    || self.block_count == 0
                    || blocks != self.block_count as usize
            }
            RecordKind::Trim => !self.payload.is_empty() || self.block_count == 0,
            RecordKind::FlushCommit | RecordKind::Checkpoint => false,
            RecordKind::Padding => true,
        };
        if bad {
            return Err(FormatError::BadShape {
                kind: self.kind,
                block_count: self.block_count,
                payload_len_bytes: self.payload.len() as u64,
            });
        }
        Ok(())
    }
}

/// Where a record sits in the ring, as written in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordStamp {
    /// The log instance.
    pub log_id: u64,
    /// Logical byte position (monotonic across laps).
    pub position_bytes: u64,
    /// `position_bytes / capacity_bytes`.
    pub lap: u64,
    /// Open count of the log when written.
    pub open_generation: u64,
}

/// A decoded, checksum-verified header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    /// Placement stamp.
    pub stamp: RecordStamp,
    /// Kind.
    pub kind: RecordKind,
    /// Partition.
    pub partition: PartitionId,
    /// Epoch.
    pub epoch: u64,
    /// Sequence.
    pub sequence: u64,
    /// First block.
    pub lba: u64,
    /// Blocks covered.
    pub block_count: u32,
    /// Payload bytes (for `Padding`: ring bytes skipped after the header).
    pub payload_len_bytes: u64,
    /// CRC-32C of each payload block (empty for `Padding` and `Trim`).
    pub block_crcs: Vec<u32>,
}

impl RecordHeader {
    /// The header `record` is written with at `stamp`.
    pub fn of(record: &LogRecord, stamp: RecordStamp) -> Self {
        Self {
            stamp,
            kind: record.kind,
            partition: record.partition,
            epoch: record.epoch,
            sequence: record.sequence,
            lba: record.lba,
            block_count: record.block_count,
            payload_len_bytes: record.payload.len() as u64,
            block_crcs: block_crcs(&record.payload),
        }
    }

    /// Ring bytes of the whole record.
    pub fn encoded_len(&self) -> u64 {
        if self.kind == RecordKind::Padding {
            BLOCK_SIZE_BYTES + self.payload_len_bytes
        } else {
            (1 + self.block_crcs.len() as u64) * BLOCK_SIZE_BYTES
        }
    }
}

/// Why a block is not a valid header or superblock.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    /// All zeros: never written.
    #[error("blank block")]
    Blank,
    /// Wrong magic.
    #[error("bad magic {found:#x}")]
    BadMagic {
        /// What was there.
        found: u64,
    },
    /// Unknown format version.
    #[error("unsupported format version {found}")]
    BadVersion {
        /// What was there.
        found: u32,
    },
    /// Checksum mismatch.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
    /// A field holds an impossible value.
    #[error("field {field} invalid: {value}")]
    BadField {
        /// Field name.
        field: &'static str,
        /// The value.
        value: u64,
    },
    /// A block does not match the CRC-32C it came with.
    #[error(
        "block {block} checksum mismatch (expected {stored:#010x}, computed {computed:#010x})"
    )]
    BlockChecksum {
        /// Index of the block in the record.
        block: u32,
        /// CRC sent with the data.
        stored: u32,
        /// CRC of the data.
        computed: u32,
    },
    /// A record whose payload does not fit in one record.
    #[error("payload of {payload_len_bytes} bytes exceeds {max_len_bytes}")]
    PayloadTooLarge {
        /// Payload bytes.
        payload_len_bytes: u64,
        /// Limit.
        max_len_bytes: u64,
    },
    /// Kind, block count and payload length disagree.
    #[error(
        "{kind:?} record with block_count {block_count} and payload of {payload_len_bytes} bytes"
    )]
    BadShape {
        /// Kind.
        kind: RecordKind,
        /// Block count.
        block_count: u32,
        /// Payload length.
        payload_len_bytes: u64,
    },
}

fn is_blank(block: &[u8]) -> bool {
    block.iter().all(|b| *b == 0)
}

fn seal(block: &mut [u8]) {
    let crc = crc32c::crc32c(&block[..CRC_OFFSET]);
    block[CRC_OFFSET..BLOCK_SIZE_BYTES as usize].copy_from_slice(&crc.to_le_bytes());
}

fn check(block: &[u8]) -> Result<(), FormatError> {
    if block.len() < BLOCK_SIZE_BYTES as usize {
        return Err(FormatError::BadField {
            field: "block_length",
            value: block.len() as u64,
        });
    }
    let block = &block[..BLOCK_SIZE_BYTES as usize];
    if is_blank(block) {
        return Err(FormatError::Blank);
    }
    let stored = le_u32(block, CRC_OFFSET);
    let computed = crc32c::crc32c(&block[..CRC_OFFSET]);
    if stored != computed {
        return Err(FormatError::Checksum { stored, computed });
    }
    Ok(())
}

fn le_u64(block: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&block[at..at + 8]);
    u64::from_le_bytes(raw)
}

fn le_u32(block: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&block[at..at + 4]);
    u32::from_le_bytes(raw)
}

fn le_u16(block: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([block[at], block[at + 1]])
}

fn put(block: &mut [u8], at: usize, bytes: &[u8]) {
    block[at..at + bytes.len()].copy_from_slice(bytes);
}

/// CRC-32C of each 4 KiB block of `payload` (the last one zero-padded).
pub fn block_crcs(payload: &[u8]) -> Vec<u32> {
    payload
        .chunks(BLOCK_SIZE_BYTES as usize)
        .map(|chunk| {
            if chunk.len() == BLOCK_SIZE_BYTES as usize {
                crc32c::crc32c(chunk)
            } else {
                let padded = crc32c::crc32c(chunk);
                crc32c::crc32c_append(
                    padded,
                    &[0u8; BLOCK_SIZE_BYTES as usize][..BLOCK_SIZE_BYTES as usize - chunk.len()],
                )
            }
        })
        .collect()
}

/// Writes the record (header + payload, zero-padded) into `out`, which must be
/// exactly [`LogRecord::encoded_len`] bytes and zeroed.
pub fn encode_record(record: &LogRecord, stamp: RecordStamp, out: &mut [u8]) {
    debug_assert_eq!(out.len() as u64, record.encoded_len());
    encode_header(
        &RecordHeader::of(record, stamp),
        &mut out[..BLOCK_SIZE_BYTES as usize],
    );
    out[BLOCK_SIZE_BYTES as usize..BLOCK_SIZE_BYTES as usize + record.payload.len()]
        .copy_from_slice(&record.payload);
}

/// Writes a padding record header that skips `skip_bytes` after itself.
pub fn encode_padding(stamp: RecordStamp, skip_bytes: u64, out: &mut [u8]) {
    encode_header(
        &RecordHeader {
            stamp,
            kind: RecordKind::Padding,
            partition: PartitionId {
                volume: 0,
                index: 0,
            },
            epoch: 0,
            sequence: 0,
            lba: 0,
            block_count: 0,
            payload_len_bytes: skip_bytes,
            block_crcs: Vec::new(),
        },
        &mut out[..BLOCK_SIZE_BYTES as usize],
    );
}

/// Encodes a header into one zeroed 4 KiB block.
pub fn encode_header(header: &RecordHeader, block: &mut [u8]) {
    assert!(header.block_crcs.len() <= MAX_PAYLOAD_BLOCKS);
    put(block, 0, &RECORD_MAGIC.to_le_bytes());
    put(block, 8, &FORMAT_VERSION.to_le_bytes());
    block[10] = header.kind as u8;
    block[11] = 0;
    put(block, 12, &(header.block_crcs.len() as u32).to_le_bytes());
    put(block, 16, &header.stamp.log_id.to_le_bytes());
    put(block, 24, &header.stamp.position_bytes.to_le_bytes());
    put(block, 32, &header.stamp.lap.to_le_bytes());
    put(block, 40, &header.stamp.open_generation.to_le_bytes());
    put(block, 48, &header.partition.volume.to_le_bytes());
    put(block, 56, &header.partition.index.to_le_bytes());
    put(block, 60, &header.block_count.to_le_bytes());
    put(block, 64, &header.epoch.to_le_bytes());
    put(block, 72, &header.sequence.to_le_bytes());
    put(block, 80, &header.lba.to_le_bytes());
    put(block, 88, &header.payload_len_bytes.to_le_bytes());
    for (i, crc) in header.block_crcs.iter().enumerate() {
        put(block, HEADER_FIXED_BYTES + 4 * i, &crc.to_le_bytes());
    }
    seal(block);
}

/// Decodes and verifies a header block (not the payload).
pub fn decode_header(block: &[u8]) -> Result<RecordHeader, FormatError> {
    check(block)?;
    let magic = le_u64(block, 0);
    if magic != RECORD_MAGIC {
        return Err(FormatError::BadMagic { found: magic });
    }
    let version = le_u16(block, 8);
    if version != FORMAT_VERSION {
        return Err(FormatError::BadVersion {
            found: version.into(),
        });
    }
    let kind = RecordKind::from_u8(block[10]).ok_or(FormatError::BadField {
        field: "kind",
        value: block[10].into(),
    })?;
    let payload_blocks = le_u32(block, 12) as usize;
    if payload_blocks > MAX_PAYLOAD_BLOCKS {
        return Err(FormatError::BadField {
            field: "payload_blocks",
            value: payload_blocks as u64,
        });
    }
    let payload_len_bytes = le_u64(block, 88);
    if kind != RecordKind::Padding
        && payload_len_bytes.div_ceil(BLOCK_SIZE_BYTES) != payload_blocks as u64
    {
        return Err(FormatError::BadField {
            field: "payload_len_bytes",
            value: payload_len_bytes,
        });
    }
    if kind == RecordKind::Padding
        && (payload_blocks != 0 || payload_len_bytes % BLOCK_SIZE_BYTES != 0)
    {
        return Err(FormatError::BadField {
            field: "padding_len_bytes",
            value: payload_len_bytes,
        });
    }
    let block_crcs = (0..payload_blocks)
        .map(|i| le_u32(block, HEADER_FIXED_BYTES + 4 * i))
        .collect();
    Ok(RecordHeader {
        stamp: RecordStamp {
            log_id: le_u64(block, 16),
            position_bytes: le_u64(block, 24),
            lap: le_u64(block, 32),
            open_generation: le_u64(block, 40),
        },
        kind,
        partition: PartitionId {
            volume: le_u64(block, 48),
            index: le_u32(block, 56),
        },
        block_count: le_u32(block, 60),
        epoch: le_u64(block, 64),
        sequence: le_u64(block, 72),
        lba: le_u64(block, 80),
        payload_len_bytes,
        block_crcs,
    })
}

/// Index of the first payload block whose CRC does not match, if any.
pub fn first_bad_block(header: &RecordHeader, payload: &[u8]) -> Option<usize> {
    header
        .block_crcs
        .iter()
        .enumerate()
        .find(|(i, crc)| {
            payload
                .get(i * BLOCK_SIZE_BYTES as usize..(i + 1) * BLOCK_SIZE_BYTES as usize)
                .is_none_or(|block| crc32c::crc32c(block) != **crc)
        })
        .map(|(i, _)| i)
}

/// The log superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// Random id of this log instance; records of another instance are refused.
    pub log_id: u64,
    /// Bumped on every superblock write; selects the copy (`generation % 2`).
    pub generation: u64,
    /// Ring size in bytes.
    pub capacity_bytes: u64,
    /// Logical byte position of the oldest live record.
    pub tail_position_bytes: u64,
    /// Head position when written (informational; recovery scans from
    /// `tail_position_bytes`).
    pub head_position_hint_bytes: u64,
    /// Times the log was opened; stamped into every record written since.
    pub open_generation: u64,
}

impl Superblock {
    /// Which copy this generation goes to.
    pub fn slot(&self) -> usize {
        (self.generation % 2) as usize
    }

    /// Encodes into one 4 KiB block.
    pub fn encode(&self) -> [u8; BLOCK_SIZE_BYTES as usize] {
        let mut block = [0u8; BLOCK_SIZE_BYTES as usize];
        put(&mut block, 0, &SUPERBLOCK_MAGIC.to_le_bytes());
        put(&mut block, 8, &u32::from(FORMAT_VERSION).to_le_bytes());
        put(&mut block, 16, &self.log_id.to_le_bytes());
        put(&mut block, 24, &self.generation.to_le_bytes());
        put(&mut block, 32, &self.capacity_bytes.to_le_bytes());
        put(&mut block, 40, &self.tail_position_bytes.to_le_bytes());
        put(&mut block, 48, &self.head_position_hint_bytes.to_le_bytes());
        put(&mut block, 56, &self.open_generation.to_le_bytes());
        seal(&mut block);
        block
    }

    /// Decodes and verifies one copy.
    pub fn decode(block: &[u8]) -> Result<Self, FormatError> {
        check(block)?;
        let magic = le_u64(block, 0);
        if magic != SUPERBLOCK_MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        let version = le_u32(block, 8);
        if version != u32::from(FORMAT_VERSION) {
            return Err(FormatError::BadVersion { found: version });
        }
        let superblock = Self {
            log_id: le_u64(block, 16),
            generation: le_u64(block, 24),
            capacity_bytes: le_u64(block, 32),
            tail_position_bytes: le_u64(block, 40),
            head_position_hint_bytes: le_u64(block, 48),
            open_generation: le_u64(block, 56),
        };
        if superblock.capacity_bytes == 0 || superblock.capacity_bytes % BLOCK_SIZE_BYTES != 0 {
            return Err(FormatError::BadField {
                field: "capacity_bytes",
                value: superblock.capacity_bytes,
            });
        }
        if superblock.tail_position_bytes % BLOCK_SIZE_BYTES != 0 {
            return Err(FormatError::BadField {
                field: "tail_position_bytes",
                value: superblock.tail_position_bytes,
            });
        }
        Ok(superblock)
    }
}

/// What the two superblock copies say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SuperblockState {
    /// Both copies blank: a never-formatted log.
    Blank,
    /// The newest valid copy.
    Valid(Superblock),
    /// Not blank, and no copy is valid: refuse the device.
    Corrupt {
        /// Why copy A failed.
        first: FormatError,
        /// Why copy B failed.
        second: FormatError,
    },
}

/// Picks the newest valid superblock among the two copies.
pub fn choose_superblock(copies: [&[u8]; 2]) -> SuperblockState {
    let decoded = copies.map(Superblock::decode);
    match decoded {
        [Ok(a), Ok(b)] => SuperblockState::Valid(if a.generation >= b.generation { a } else { b }),
        [Ok(a), Err(_)] => SuperblockState::Valid(a),
        [Err(_), Ok(b)] => SuperblockState::Valid(b),
        [Err(FormatError::Blank), Err(FormatError::Blank)] => SuperblockState::Blank,
        [Err(first), Err(second)] => SuperblockState::Corrupt { first, second },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stamp(position: u64) -> RecordStamp {
        RecordStamp {
            log_id: 77,
            position_bytes: position,
            lap: position / (1 << 20),
            open_generation: 3,
        }
    }

    fn record_strategy() -> impl Strategy<Value = LogRecord> {
        (
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            0u8..4,
            1usize..4,
            any::<u8>(),
        )
            .prop_map(
                |(volume, partition, epoch, sequence, lba, kind, blocks, fill)| {
                    let partition = PartitionId {
                        volume,
                        index: partition,
                    };
                    match kind {
                        0 => LogRecord::write(
                            partition,
                            epoch,
                            sequence,
                            lba,
                            Bytes::from(vec![fill; blocks * BLOCK_SIZE_BYTES as usize]),
                        ),
                        1 => LogRecord::trim(partition, epoch, sequence, lba, blocks as u32),
                        k => LogRecord {
                            kind: if k == 2 {
                                RecordKind::FlushCommit
                            } else {
                                RecordKind::Checkpoint
                            },
                            partition,
                            epoch,
                            sequence,
                            lba,
                            block_count: 0,
                            payload: Bytes::from(vec![fill; blocks * 1000]),
                        },
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn record_round_trips(record in record_strategy(), position in 0u64..1 << 40) {
            prop_assert!(record.validate().is_ok());
            let position = position * BLOCK_SIZE_BYTES;
            let mut out = vec![0u8; record.encoded_len() as usize];
            encode_record(&record, stamp(position), &mut out);
            let header = decode_header(&out[..BLOCK_SIZE_BYTES as usize]).unwrap();
            prop_assert_eq!(header.stamp, stamp(position));
            prop_assert_eq!(header.encoded_len(), record.encoded_len());
            prop_assert_eq!(first_bad_block(&header, &out[BLOCK_SIZE_BYTES as usize..]), None);
            prop_assert_eq!(header.kind, record.kind);
            prop_assert_eq!(header.partition, record.partition);
            prop_assert_eq!((header.epoch, header.sequence, header.lba, header.block_count),
                (record.epoch, record.sequence, record.lba, record.block_count));
            prop_assert_eq!(&out[BLOCK_SIZE_BYTES as usize..BLOCK_SIZE_BYTES as usize + record.payload.len()], &record.payload[..]);
        }

        #[test]
        fn any_corruption_is_detected(record in record_strategy(), at in 0usize..BLOCK_SIZE_BYTES as usize * 4, flip in 1u8..=255) {
            let mut out = vec![0u8; record.encoded_len() as usize];
            encode_record(&record, stamp(0), &mut out);
            let at = at % out.len();
            out[at] ^= flip;
            let header = decode_header(&out[..BLOCK_SIZE_BYTES as usize]);
            let detected = match header {
                Err(_) => true,
                Ok(header) => first_bad_block(&header, &out[BLOCK_SIZE_BYTES as usize..]).is_some(),
            };
            // Bytes past the payload inside its last block are covered by the block CRC.
            prop_assert!(detected);
        }

        #[test]
        fn superblock_round_trips(log_id: u64, generation: u64, tail in 0u64..1 << 40, open_generation: u64) {
            let sb = Superblock { log_id, generation, capacity_bytes: 1 << 20, tail_position_bytes: tail * BLOCK_SIZE_BYTES, head_position_hint_bytes: 0, open_generation };
            prop_assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
        }
    }

    #[test]
    fn superblock_selection() {
        let sb = |generation| Superblock {
            log_id: 1,
            generation,
            capacity_bytes: 1 << 20,
            tail_position_bytes: 0,
            head_position_hint_bytes: 0,
            open_generation: 1,
        };
        let blank = [0u8; BLOCK_SIZE_BYTES as usize];
        let mut junk = [0u8; BLOCK_SIZE_BYTES as usize];
        junk[5] = 1;
        let (a, b) = (sb(4).encode(), sb(5).encode());
        assert_eq!(choose_superblock([&a, &b]), SuperblockState::Valid(sb(5)));
        assert_eq!(
            choose_superblock([&a, &junk]),
            SuperblockState::Valid(sb(4))
        );
        assert_eq!(choose_superblock([&blank, &blank]), SuperblockState::Blank);
        assert!(matches!(
            choose_superblock([&blank, &junk]),
            SuperblockState::Corrupt { .. }
        ));
    }

    #[test]
    fn shapes_are_validated() {
        let p = PartitionId {
            volume: 1,
            index: 0,
        };
        assert!(LogRecord::write(p, 1, 1, 0, Bytes::from(vec![0; 100]))
            .validate()
            .is_err());
        assert!(LogRecord::write(p, 1, 1, 0, Bytes::new())
            .validate()
            .is_err());
        assert!(LogRecord::trim(p, 1, 1, 0, 0).validate().is_err());
        let data = Bytes::from(vec![7u8; 2 * BLOCK_SIZE_BYTES as usize]);
        let crcs = block_crcs(&data);
        assert!(LogRecord::write_with_crcs(p, 1, 1, 0, data.clone(), &crcs).is_ok());
        assert!(matches!(
            LogRecord::write_with_crcs(p, 1, 1, 0, data, &[crcs[0], crcs[1] ^ 1]),
            Err(FormatError::BlockChecksum { block: 1, .. })
        ));
        let big = Bytes::from(vec![
            0;
            (MAX_PAYLOAD_BLOCKS + 1) * BLOCK_SIZE_BYTES as usize
        ]);
        assert!(matches!(
            LogRecord::write(p, 1, 1, 0, big).validate(),
            Err(FormatError::PayloadTooLarge { .. })
        ));
    }
}
