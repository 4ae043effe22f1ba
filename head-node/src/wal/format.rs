//! On-device format of the write log (pure, sans-IO).
//!
//! ```text
//! offset 0       superblock copy A (generation even)      4 KiB
//! offset 4096    superblock copy B (generation odd)       4 KiB
//! offset 8192    ring: batches (version 2; version 1:     capacity_bytes
//!                records), each 4 KiB aligned, never wrapping
//! ```
//!
//! **Batch** (version 2, what is written): the header blocks (one for up to
//! ~67 single-block records), then the payload of each record in order,
//! each padded to whole 4 KiB blocks. Record `i` of the batch at position
//! `p` has position `p + i`. Header, little-endian:
//!
//! ```text
//!   0 magic u64 "RBHNWBAT"       40 open_generation u64
//!   8 version u16 (2)            48 record_count u32 (<= MAX_BATCH_RECORDS)
//!  10 flags u8 (1: padding)      52 header_blocks u32
//!  11 reserved u8 (0)            56 batch_len_bytes u64 (header + payloads;
//!  12 reserved u32                  padding: to the end of the lap)
//!  16 log_id u64                 64 entries, one per record:
//!  24 position_bytes u64              0 kind u8, 1 reserved [3]
//!  32 lap u64                         4 partition u32, 8 volume u64
//!                                    16 lba u64, 24 block_count u32
//!                                    28 payload_blocks u32, 32 epoch u64
//!                                    40 sequence u64, 48 payload_len_bytes u64
//!                                    56 CRC-32C of each payload block, u32 each
//!  header_blocks x 4096 - 4: CRC-32C of every header byte before it
//! ```
//!
//! A batch is accepted by recovery only if its header checksum holds, the
//! `log_id` is this log's, `position_bytes` is exactly where the scan
//! expects the next batch (a stale batch of a previous lap carries an older
//! position; `lap = position_bytes / capacity_bytes` is stored too for
//! humans), `open_generation` does not go backwards (a batch left behind
//! by a cut torn tail is never resurrected after newer batches end exactly
//! where it starts), and *every* payload block of *every* record matches
//! its CRC: the batch was one device write, acknowledged only once all of
//! it was durable, so a torn batch is the cut tail as a whole and never
//! yields a part of its records. A padding batch (no records) fills the
//! rest of a lap that the next batch does not fit in.
//!
//! **Record** (version 1, read by recovery of a log written before the
//! upgrade, written only by [`crate::wal::legacy`]) = one 4 KiB header
//! block followed by `payload_blocks` 4 KiB blocks. Header:
//!
//! ```text
//!   0 magic u64 "RBHNWREC"     48 volume u64
//!   8 version u16 (1)          56 partition u32
//!  10 kind u8                  60 block_count u32
//!  11 reserved u8 (0)          64 epoch u64
//!  12 payload_blocks u32       72 sequence u64
//!  16 log_id u64               80 lba u64 (4 KiB blocks)
//!  24 position_bytes u64       88 payload_len_bytes u64
//!  32 lap u64                  96 CRC-32C of each payload block, payload_blocks x u32
//!  40 open_generation u64    4092 CRC-32C of bytes 0..4092
//! ```
//!
//! with the same acceptance rules per record.
//!
//! **Superblock** (two ping-pong copies, the copy for generation `g` is
//! `g % 2`, highest valid generation wins; a torn superblock write can only
//! destroy the previous-but-one state):
//!
//! ```text
//!   0 magic u64 "RBHNWSB1"      40 tail_position_bytes u64 (position of the oldest live record)
//!   8 version u32 (1 or 2)      48 head_position_hint_bytes u64 (head when written; informational)
//!  12 reserved u32              56 open_generation u64
//!  16 log_id u64                64 batches_from_position_bytes u64 (version 2 only: version 1
//!  24 generation u64               records before it, batches from it on)
//!  32 capacity_bytes u64      4092 CRC-32C of bytes 0..4092
//! ```

use bytes::Bytes;
use proto::sled::PartitionId;
use proto::BLOCK_SIZE_BYTES;
use thiserror::Error;

// Every record and the ring are whole volume blocks ([`BLOCK_SIZE_BYTES`]),
// written with O_DIRECT: a block must be whole device I/O units.
const _: () = assert!(BLOCK_SIZE_BYTES % hardware::IO_ALIGN_BYTES as u64 == 0);

/// Format version of what this code writes: batches (version 2).
pub const FORMAT_VERSION: u16 = 2;
/// The previous format: one header block per record. Still read by recovery
/// (a log written by the previous release is replayed, then continued in
/// version 2), and written only by [`crate::wal::legacy`] for upgrade tests.
pub const V1_FORMAT_VERSION: u16 = 1;
/// Offsets of the two superblock copies.
pub const SUPERBLOCK_OFFSETS: [u64; 2] = [0, BLOCK_SIZE_BYTES];
/// Where the ring of records starts on the device.
pub const RING_OFFSET: u64 = 2 * BLOCK_SIZE_BYTES;

const RECORD_MAGIC: u64 = u64::from_le_bytes(*b"RBHNWREC");
const BATCH_MAGIC: u64 = u64::from_le_bytes(*b"RBHNWBAT");
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
    /// A snapshot marker at `sequence` (a cut or a drop); no blocks, the
    /// payload is the partition's encoded marker.
    Snapshot = 6,
    /// The index record of a full-stripe write that went straight to the
    /// sleds (`sequence`); no blocks, the payload is the partition's
    /// encoded placement (as a flush commit's mappings).
    Direct = 7,
}

impl RecordKind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => RecordKind::Write,
            2 => RecordKind::Trim,
            3 => RecordKind::FlushCommit,
            4 => RecordKind::Checkpoint,
            5 => RecordKind::Padding,
            6 => RecordKind::Snapshot,
            7 => RecordKind::Direct,
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
            RecordKind::Snapshot | RecordKind::Direct => self.block_count != 0,
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
    put(block, 8, &V1_FORMAT_VERSION.to_le_bytes());
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
    if version != V1_FORMAT_VERSION {
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

// ------------------------------------------------------------ version 2

/// Most records one batch carries. A record's position is `batch + i`
/// (its index in the batch), so it must stay below 4 KiB: a record
/// position rounded down to 4 KiB is always its batch.
pub const MAX_BATCH_RECORDS: usize = 1024;
const BATCH_FIXED_BYTES: u64 = 64;
const ENTRY_FIXED_BYTES: u64 = 56;
const BATCH_FLAG_PADDING: u8 = 1;

/// Bytes of a record's entry in a batch header.
pub fn entry_bytes(record: &LogRecord) -> u64 {
    ENTRY_FIXED_BYTES + 4 * record.payload_blocks() as u64
}

/// Header blocks of a batch whose entries take `entries_bytes`.
pub fn batch_header_blocks(entries_bytes: u64) -> u64 {
    (BATCH_FIXED_BYTES + entries_bytes + 4).div_ceil(BLOCK_SIZE_BYTES)
}

/// Ring bytes of a batch: its header blocks and its payload blocks.
pub fn batch_len(entries_bytes: u64, payload_blocks: u64) -> u64 {
    (batch_header_blocks(entries_bytes) + payload_blocks) * BLOCK_SIZE_BYTES
}

/// One record as described in a batch header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEntry {
    /// Kind (never `Padding`).
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
    /// Payload bytes.
    pub payload_len_bytes: u64,
    /// CRC-32C of each payload block.
    pub block_crcs: Vec<u32>,
}

impl BatchEntry {
    /// The entry of `record`.
    pub fn of(record: &LogRecord) -> Self {
        Self {
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

    /// The record with `payload` (its bytes, unpadded).
    pub fn record(&self, payload: Bytes) -> LogRecord {
        LogRecord {
            kind: self.kind,
            partition: self.partition,
            epoch: self.epoch,
            sequence: self.sequence,
            lba: self.lba,
            block_count: self.block_count,
            payload,
        }
    }
}

/// A decoded, checksum-verified batch header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchHeader {
    /// Placement stamp (position of the batch).
    pub stamp: RecordStamp,
    /// Blocks of the header.
    pub header_blocks: u64,
    /// A padding batch: no records, fills the ring to the end of the lap.
    pub padding: bool,
    /// Ring bytes of the whole batch.
    pub len_bytes: u64,
    /// The records, in order; record `i` is at position `batch + i`.
    pub entries: Vec<BatchEntry>,
}

impl BatchHeader {
    /// Offset of each entry's payload from the start of the batch.
    pub fn payload_offsets(&self) -> Vec<u64> {
        let mut at = self.header_blocks * BLOCK_SIZE_BYTES;
        self.entries
            .iter()
            .map(|entry| {
                let here = at;
                at += entry.block_crcs.len() as u64 * BLOCK_SIZE_BYTES;
                here
            })
            .collect()
    }
}

/// What the first block at a position of the ring is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// All zeros.
    Blank,
    /// A version 1 record header (maybe).
    Record,
    /// A version 2 batch header (maybe): the header blocks it claims
    /// (unverified until [`decode_batch_header`]).
    Batch {
        /// Claimed header blocks.
        header_blocks: u64,
    },
    /// Anything else.
    Other {
        /// The magic found.
        magic: u64,
    },
}

/// Classifies the first block of a record or batch by its magic.
pub fn classify(block: &[u8]) -> BlockKind {
    if block.len() < BLOCK_SIZE_BYTES as usize || is_blank(&block[..BLOCK_SIZE_BYTES as usize]) {
        return BlockKind::Blank;
    }
    match le_u64(block, 0) {
        RECORD_MAGIC => BlockKind::Record,
        BATCH_MAGIC => BlockKind::Batch {
            header_blocks: u64::from(le_u32(block, 52)),
        },
        magic => BlockKind::Other { magic },
    }
}

fn put_stamp(block: &mut [u8], stamp: RecordStamp) {
    put(block, 16, &stamp.log_id.to_le_bytes());
    put(block, 24, &stamp.position_bytes.to_le_bytes());
    put(block, 32, &stamp.lap.to_le_bytes());
    put(block, 40, &stamp.open_generation.to_le_bytes());
}

fn seal_region(region: &mut [u8]) {
    let at = region.len() - 4;
    let crc = crc32c::crc32c(&region[..at]);
    region[at..].copy_from_slice(&crc.to_le_bytes());
}

/// Writes a batch of `records` (header blocks, then each payload, 4 KiB
/// aligned and zero-padded) into `out`, which must be exactly
/// [`batch_len`] bytes and zeroed. Each record comes with its
/// [`block_crcs`] (computed once, when it was appended).
pub fn encode_batch(stamp: RecordStamp, records: &[(&LogRecord, &[u32])], out: &mut [u8]) {
    assert!(!records.is_empty() && records.len() <= MAX_BATCH_RECORDS);
    let entries_bytes: u64 = records.iter().map(|(r, _)| entry_bytes(r)).sum();
    let payload_blocks: u64 = records.iter().map(|(r, _)| r.payload_blocks() as u64).sum();
    let header_blocks = batch_header_blocks(entries_bytes);
    let len_bytes = batch_len(entries_bytes, payload_blocks);
    debug_assert_eq!(out.len() as u64, len_bytes);
    let header_len = (header_blocks * BLOCK_SIZE_BYTES) as usize;
    let (header, payloads) = out.split_at_mut(header_len);
    put(header, 0, &BATCH_MAGIC.to_le_bytes());
    put(header, 8, &FORMAT_VERSION.to_le_bytes());
    header[10] = 0;
    put_stamp(header, stamp);
    put(header, 48, &(records.len() as u32).to_le_bytes());
    put(header, 52, &(header_blocks as u32).to_le_bytes());
    put(header, 56, &len_bytes.to_le_bytes());
    let mut at = BATCH_FIXED_BYTES as usize;
    let mut payload_at = 0usize;
    for (record, crcs) in records {
        debug_assert_eq!(crcs.len(), record.payload_blocks());
        header[at] = record.kind as u8;
        put(header, at + 4, &record.partition.index.to_le_bytes());
        put(header, at + 8, &record.partition.volume.to_le_bytes());
        put(header, at + 16, &record.lba.to_le_bytes());
        put(header, at + 24, &record.block_count.to_le_bytes());
        put(header, at + 28, &(crcs.len() as u32).to_le_bytes());
        put(header, at + 32, &record.epoch.to_le_bytes());
        put(header, at + 40, &record.sequence.to_le_bytes());
        put(
            header,
            at + 48,
            &(record.payload.len() as u64).to_le_bytes(),
        );
        at += ENTRY_FIXED_BYTES as usize;
        for crc in crcs.iter() {
            put(header, at, &crc.to_le_bytes());
            at += 4;
        }
        payloads[payload_at..payload_at + record.payload.len()].copy_from_slice(&record.payload);
        payload_at += crcs.len() * BLOCK_SIZE_BYTES as usize;
    }
    seal_region(header);
}

/// Writes a padding batch header (one block, in `out`) that fills the ring
/// for `len_bytes` from its position (its own block included).
pub fn encode_padding_batch(stamp: RecordStamp, len_bytes: u64, out: &mut [u8]) {
    let header = &mut out[..BLOCK_SIZE_BYTES as usize];
    put(header, 0, &BATCH_MAGIC.to_le_bytes());
    put(header, 8, &FORMAT_VERSION.to_le_bytes());
    header[10] = BATCH_FLAG_PADDING;
    put_stamp(header, stamp);
    put(header, 48, &0u32.to_le_bytes());
    put(header, 52, &1u32.to_le_bytes());
    put(header, 56, &len_bytes.to_le_bytes());
    seal_region(header);
}

/// Decodes and verifies a batch header: `region` is exactly the header
/// blocks [`classify`] announced. Payloads are checked by the caller
/// ([`first_bad_entry`]).
pub fn decode_batch_header(region: &[u8]) -> Result<BatchHeader, FormatError> {
    let bad = |field: &'static str, value: u64| FormatError::BadField { field, value };
    if region.is_empty() || region.len() % BLOCK_SIZE_BYTES as usize != 0 {
        return Err(bad("header_length", region.len() as u64));
    }
    if is_blank(&region[..BLOCK_SIZE_BYTES as usize]) {
        return Err(FormatError::Blank);
    }
    let crc_at = region.len() - 4;
    let stored = le_u32(region, crc_at);
    let computed = crc32c::crc32c(&region[..crc_at]);
    if stored != computed {
        return Err(FormatError::Checksum { stored, computed });
    }
    let magic = le_u64(region, 0);
    if magic != BATCH_MAGIC {
        return Err(FormatError::BadMagic { found: magic });
    }
    let version = le_u16(region, 8);
    if version != FORMAT_VERSION {
        return Err(FormatError::BadVersion {
            found: version.into(),
        });
    }
    let flags = region[10];
    let padding = match flags {
        0 => false,
        BATCH_FLAG_PADDING => true,
        other => return Err(bad("flags", other.into())),
    };
    let count = le_u32(region, 48) as usize;
    let header_blocks = u64::from(le_u32(region, 52));
    let len_bytes = le_u64(region, 56);
    if header_blocks * BLOCK_SIZE_BYTES != region.len() as u64 {
        return Err(bad("header_blocks", header_blocks));
    }
    if count > MAX_BATCH_RECORDS || (padding && count != 0) || (!padding && count == 0) {
        return Err(bad("record_count", count as u64));
    }
    let stamp = RecordStamp {
        log_id: le_u64(region, 16),
        position_bytes: le_u64(region, 24),
        lap: le_u64(region, 32),
        open_generation: le_u64(region, 40),
    };
    if padding {
        if header_blocks != 1 || len_bytes < BLOCK_SIZE_BYTES || len_bytes % BLOCK_SIZE_BYTES != 0 {
            return Err(bad("padding_len_bytes", len_bytes));
        }
        return Ok(BatchHeader {
            stamp,
            header_blocks,
            padding,
            len_bytes,
            entries: Vec::new(),
        });
    }
    let mut entries = Vec::with_capacity(count);
    let mut at = BATCH_FIXED_BYTES as usize;
    let mut payload_blocks = 0u64;
    for _ in 0..count {
        if at + ENTRY_FIXED_BYTES as usize > crc_at {
            return Err(bad("entries", at as u64));
        }
        let kind = RecordKind::from_u8(region[at])
            .filter(|k| *k != RecordKind::Padding)
            .ok_or(bad("kind", region[at].into()))?;
        let blocks = le_u32(region, at + 28) as usize;
        let payload_len_bytes = le_u64(region, at + 48);
        if blocks > MAX_PAYLOAD_BLOCKS
            || payload_len_bytes.div_ceil(BLOCK_SIZE_BYTES) != blocks as u64
        {
            return Err(bad("payload_len_bytes", payload_len_bytes));
        }
        let crcs_at = at + ENTRY_FIXED_BYTES as usize;
        if crcs_at + 4 * blocks > crc_at {
            return Err(bad("payload_blocks", blocks as u64));
        }
        entries.push(BatchEntry {
            kind,
            partition: PartitionId {
                volume: le_u64(region, at + 8),
                index: le_u32(region, at + 4),
            },
            lba: le_u64(region, at + 16),
            block_count: le_u32(region, at + 24),
            epoch: le_u64(region, at + 32),
            sequence: le_u64(region, at + 40),
            payload_len_bytes,
            block_crcs: (0..blocks)
                .map(|i| le_u32(region, crcs_at + 4 * i))
                .collect(),
        });
        payload_blocks += blocks as u64;
        at = crcs_at + 4 * blocks;
    }
    let entries_bytes = at as u64 - BATCH_FIXED_BYTES;
    if batch_header_blocks(entries_bytes) != header_blocks
        || batch_len(entries_bytes, payload_blocks) != len_bytes
    {
        return Err(bad("len_bytes", len_bytes));
    }
    Ok(BatchHeader {
        stamp,
        header_blocks,
        padding,
        len_bytes,
        entries,
    })
}

/// The first `(entry, block)` whose payload block does not match its CRC;
/// `payloads` are the batch's bytes after its header.
pub fn first_bad_entry(header: &BatchHeader, payloads: &[u8]) -> Option<(usize, usize)> {
    let base = header.header_blocks * BLOCK_SIZE_BYTES;
    for (i, (entry, offset)) in header
        .entries
        .iter()
        .zip(header.payload_offsets())
        .enumerate()
    {
        let start = (offset - base) as usize;
        for (b, crc) in entry.block_crcs.iter().enumerate() {
            let from = start + b * BLOCK_SIZE_BYTES as usize;
            let good = payloads
                .get(from..from + BLOCK_SIZE_BYTES as usize)
                .is_some_and(|block| crc32c::crc32c(block) == *crc);
            if !good {
                return Some((i, b));
            }
        }
    }
    None
}

/// The log superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// Format of the log: [`V1_FORMAT_VERSION`] (records only) or
    /// [`FORMAT_VERSION`] (batches from `batches_from_position_bytes` on).
    pub version: u16,
    /// Random id of this log instance; records of another instance are refused.
    pub log_id: u64,
    /// Bumped on every superblock write; selects the copy (`generation % 2`).
    pub generation: u64,
    /// Ring size in bytes.
    pub capacity_bytes: u64,
    /// Logical position of the oldest live record (version 2: a record
    /// position `batch + i`, so not always 4 KiB aligned; the scan starts
    /// at the batch, `tail` rounded down to 4 KiB, and skips the records
    /// before `tail`).
    pub tail_position_bytes: u64,
    /// Head position when written (informational; recovery scans from
    /// `tail_position_bytes`).
    pub head_position_hint_bytes: u64,
    /// Times the log was opened; stamped into every record written since.
    pub open_generation: u64,
    /// Version 2: where the first batch was (or will be) written. Version 1
    /// records are valid only before it, batches only from it on (0 for a
    /// log formatted as version 2; the head at the upgrade otherwise).
    /// `u64::MAX` for version 1.
    pub batches_from_position_bytes: u64,
}

impl Superblock {
    /// Which copy this generation goes to.
    pub fn slot(&self) -> usize {
        (self.generation % 2) as usize
    }

    /// Encodes into one 4 KiB block (in the layout of `self.version`).
    pub fn encode(&self) -> [u8; BLOCK_SIZE_BYTES as usize] {
        let mut block = [0u8; BLOCK_SIZE_BYTES as usize];
        put(&mut block, 0, &SUPERBLOCK_MAGIC.to_le_bytes());
        put(&mut block, 8, &u32::from(self.version).to_le_bytes());
        put(&mut block, 16, &self.log_id.to_le_bytes());
        put(&mut block, 24, &self.generation.to_le_bytes());
        put(&mut block, 32, &self.capacity_bytes.to_le_bytes());
        put(&mut block, 40, &self.tail_position_bytes.to_le_bytes());
        put(&mut block, 48, &self.head_position_hint_bytes.to_le_bytes());
        put(&mut block, 56, &self.open_generation.to_le_bytes());
        if self.version >= FORMAT_VERSION {
            put(
                &mut block,
                64,
                &self.batches_from_position_bytes.to_le_bytes(),
            );
        }
        seal(&mut block);
        block
    }

    /// Decodes and verifies one copy (version 1 or 2).
    pub fn decode(block: &[u8]) -> Result<Self, FormatError> {
        check(block)?;
        let magic = le_u64(block, 0);
        if magic != SUPERBLOCK_MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        let version = le_u32(block, 8);
        let version = match u16::try_from(version) {
            Ok(v) if v == V1_FORMAT_VERSION || v == FORMAT_VERSION => v,
            _ => return Err(FormatError::BadVersion { found: version }),
        };
        let superblock = Self {
            version,
            log_id: le_u64(block, 16),
            generation: le_u64(block, 24),
            capacity_bytes: le_u64(block, 32),
            tail_position_bytes: le_u64(block, 40),
            head_position_hint_bytes: le_u64(block, 48),
            open_generation: le_u64(block, 56),
            batches_from_position_bytes: if version == V1_FORMAT_VERSION {
                u64::MAX
            } else {
                le_u64(block, 64)
            },
        };
        if superblock.capacity_bytes == 0 || superblock.capacity_bytes % BLOCK_SIZE_BYTES != 0 {
            return Err(FormatError::BadField {
                field: "capacity_bytes",
                value: superblock.capacity_bytes,
            });
        }
        // Version 1 tails are record headers; version 2 tails are records
        // of a batch: `batch + i` with `i < MAX_BATCH_RECORDS`.
        let misaligned = superblock.tail_position_bytes % BLOCK_SIZE_BYTES;
        if (version == V1_FORMAT_VERSION && misaligned != 0)
            || misaligned >= MAX_BATCH_RECORDS as u64
        {
            return Err(FormatError::BadField {
                field: "tail_position_bytes",
                value: superblock.tail_position_bytes,
            });
        }
        if version == FORMAT_VERSION
            && superblock.batches_from_position_bytes % BLOCK_SIZE_BYTES != 0
        {
            return Err(FormatError::BadField {
                field: "batches_from_position_bytes",
                value: superblock.batches_from_position_bytes,
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
            let sb = Superblock { version: FORMAT_VERSION, log_id, generation, capacity_bytes: 1 << 20, tail_position_bytes: tail * BLOCK_SIZE_BYTES + tail % 7, head_position_hint_bytes: 0, open_generation, batches_from_position_bytes: tail * BLOCK_SIZE_BYTES };
            prop_assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
            let v1 = Superblock { version: V1_FORMAT_VERSION, tail_position_bytes: tail * BLOCK_SIZE_BYTES, batches_from_position_bytes: u64::MAX, ..sb };
            prop_assert_eq!(Superblock::decode(&v1.encode()), Ok(v1));
        }
    }

    fn encode(records: &[LogRecord], position: u64) -> Vec<u8> {
        let crcs: Vec<Vec<u32>> = records.iter().map(|r| block_crcs(&r.payload)).collect();
        let refs: Vec<(&LogRecord, &[u32])> = records
            .iter()
            .zip(&crcs)
            .map(|(r, c)| (r, &c[..]))
            .collect();
        let entries: u64 = records.iter().map(entry_bytes).sum();
        let blocks: u64 = records.iter().map(|r| r.payload_blocks() as u64).sum();
        let mut out = vec![0u8; batch_len(entries, blocks) as usize];
        encode_batch(stamp(position), &refs, &mut out);
        out
    }

    /// Decodes a batch as recovery does: classify, header, payload CRCs.
    fn decode(out: &[u8]) -> Result<Vec<LogRecord>, String> {
        let BlockKind::Batch { header_blocks } = classify(out) else {
            return Err(format!("not a batch: {:?}", classify(out)));
        };
        let header_len = (header_blocks * BLOCK_SIZE_BYTES) as usize;
        let header = out
            .get(..header_len)
            .ok_or("short")
            .map_err(str::to_string)
            .and_then(|h| decode_batch_header(h).map_err(|e| e.to_string()))?;
        let payloads = out
            .get(header_len..header.len_bytes as usize)
            .ok_or_else(|| "short".to_string())?;
        if let Some(bad) = first_bad_entry(&header, payloads) {
            return Err(format!("bad payload {bad:?}"));
        }
        Ok(header
            .entries
            .iter()
            .zip(header.payload_offsets())
            .map(|(entry, at)| {
                let from = at as usize - header_len;
                entry.record(Bytes::copy_from_slice(
                    &payloads[from..from + entry.payload_len_bytes as usize],
                ))
            })
            .collect())
    }

    proptest! {
        #[test]
        fn batch_round_trips(records in proptest::collection::vec(record_strategy(), 1..80), position in 0u64..1 << 40) {
            let position = position * BLOCK_SIZE_BYTES;
            let out = encode(&records, position);
            let BlockKind::Batch { header_blocks } = classify(&out) else { panic!("not a batch") };
            let header = decode_batch_header(&out[..(header_blocks * BLOCK_SIZE_BYTES) as usize]).unwrap();
            prop_assert_eq!(header.stamp, stamp(position));
            prop_assert_eq!(header.len_bytes, out.len() as u64);
            prop_assert!(!header.padding);
            prop_assert_eq!(decode(&out), Ok(records));
        }

        #[test]
        fn any_batch_corruption_is_detected(records in proptest::collection::vec(record_strategy(), 1..6), at: usize, flip in 1u8..=255) {
            let mut out = encode(&records, 0);
            let at = at % out.len();
            out[at] ^= flip;
            prop_assert!(decode(&out).is_err());
        }
    }

    /// A batch torn at any block boundary (the first `k` blocks new, the
    /// rest what was there before: zeros, or an older batch at the same
    /// place) never decodes: none of its records is recovered.
    #[test]
    fn a_batch_torn_at_any_block_boundary_is_refused() {
        let p = PartitionId {
            volume: 1,
            index: 2,
        };
        // 80 one-block writes: two header blocks, 80 payload blocks; and a
        // batch with one big record.
        let many: Vec<LogRecord> = (0..80u64)
            .map(|i| {
                LogRecord::write(
                    p,
                    1,
                    i,
                    i,
                    Bytes::from(vec![i as u8 + 1; BLOCK_SIZE_BYTES as usize]),
                )
            })
            .collect();
        let big = vec![LogRecord::write(
            p,
            1,
            1,
            0,
            Bytes::from(vec![9u8; 40 * BLOCK_SIZE_BYTES as usize]),
        )];
        for records in [many, big] {
            let new = encode(&records, 0);
            assert_eq!(decode(&new), Ok(records.clone()));
            let older: Vec<LogRecord> = records
                .iter()
                .map(|r| LogRecord {
                    payload: Bytes::from(vec![0x5A; r.payload.len()]),
                    ..r.clone()
                })
                .collect();
            let old = encode(&older, 0);
            let blocks = new.len() / BLOCK_SIZE_BYTES as usize;
            for k in 0..blocks {
                for before in [vec![0u8; new.len()], old.clone()] {
                    let mut torn = before;
                    let cut = k * BLOCK_SIZE_BYTES as usize;
                    torn[..cut].copy_from_slice(&new[..cut]);
                    let decoded = decode(&torn);
                    // The older batch itself (k = 0) is a valid batch of
                    // the same position: the scan refuses it by its open
                    // generation or position; here only the torn mixes count.
                    if k > 0 {
                        assert!(
                            decoded.is_err(),
                            "torn after {k} of {blocks} blocks decoded"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn padding_batches_and_header_sizes() {
        let mut out = vec![0u8; BLOCK_SIZE_BYTES as usize];
        encode_padding_batch(stamp(8192), 5 * BLOCK_SIZE_BYTES, &mut out);
        assert_eq!(classify(&out), BlockKind::Batch { header_blocks: 1 });
        let header = decode_batch_header(&out).unwrap();
        assert!(header.padding && header.entries.is_empty());
        assert_eq!(
            (header.len_bytes, header.stamp),
            (5 * BLOCK_SIZE_BYTES, stamp(8192))
        );
        assert_eq!(
            classify(&[0u8; BLOCK_SIZE_BYTES as usize]),
            BlockKind::Blank
        );
        // 4 KiB writes: 67 entries share one header block, 32 of them
        // (QD32) cost 33 blocks instead of 64.
        assert_eq!(batch_header_blocks(67 * 60), 1);
        assert_eq!(batch_header_blocks(68 * 60), 2);
        assert_eq!(batch_len(32 * 60, 32), 33 * BLOCK_SIZE_BYTES);
        // A maximal record fits (its CRCs span two header blocks).
        let p = PartitionId {
            volume: 1,
            index: 0,
        };
        let max = LogRecord::write(
            p,
            1,
            1,
            0,
            Bytes::from(vec![3u8; MAX_PAYLOAD_BLOCKS * BLOCK_SIZE_BYTES as usize]),
        );
        assert_eq!(
            decode(&encode(std::slice::from_ref(&max), 0)),
            Ok(vec![max])
        );
    }

    #[test]
    fn superblock_selection() {
        let sb = |generation| Superblock {
            version: FORMAT_VERSION,
            batches_from_position_bytes: 0,
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
