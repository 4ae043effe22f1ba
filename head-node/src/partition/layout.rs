//! On-sled layout of a partition's extents (pure, sans-IO).
//!
//! Every column of an extent is a sequence of **rows**; row `r` of every
//! column starts at byte `r * ROW_BYTES` and holds
//!
//! ```text
//!   [ chunk: CHUNK_BLOCKS (16) x 4 KiB data or parity ][ summary: 4 KiB ]
//! ```
//!
//! Row `r` across the `k + m` columns is **stripe** `r`: the k data chunks
//! hold 16 consecutive *slots* each (slot `s` of the stripe is block
//! `s % 16` of data column `s / 16`), the m parity chunks are Reed–Solomon
//! parity of the data chunks (the summary blocks are not coded). The same
//! summary block is appended to **every** column of the stripe, so any
//! surviving column describes the stripe; it is what lets a partition's
//! index be rebuilt from the sleds alone. One stripe is one `Append` of 17
//! blocks per column at offset `r * ROW_BYTES` (== the column's length).
//!
//! Summary block, little-endian:
//!
//! ```text
//!   0 magic u64 "RBHNSUM1"      32 extent u64
//!   8 version u16               40 stripe u64
//!  10 slots u16 (k*16)          48 epoch u64
//!  12 tombstones u16            56 slot entries: slots x (lba u64, sequence u64, crc u32)
//!  14 kind u16 (version 2)         (lba == u64::MAX: empty slot, zeros)
//!  16 volume u64                   then tombstones x (lba u64, block_count u64, sequence u64)
//!  24 partition u32           4092 CRC-32C of bytes 0..4092
//!  28 reserved u32
//! ```
//!
//! LBAs are partition-relative 4 KiB blocks. A tombstone records a trim or
//! write-zeroes (sequence) so that rebuilding from the sleds never
//! resurrects older data of a trimmed block.
//!
//! **Kinds.** A data stripe is written as version 1 (bytes 14..16 zero).
//! A row of an **index checkpoint** ([`super::checkpoint`]) is version 2
//! with kind 1: its data chunks hold checkpoint bytes, slot `s` describes
//! block `lba` of the checkpoint (the block's index in the checkpoint, not
//! a partition block) with `sequence` = the checkpoint's id and the block's
//! CRC, so repair rebuilds and verifies it like any row, while recovery
//! never maps it. A version-1 reader refuses version 2 (it cannot mistake a
//! checkpoint for data).

use proto::BLOCK_SIZE_BYTES;
use thiserror::Error;

/// Data (or parity) blocks of one column per stripe.
pub const CHUNK_BLOCKS: u64 = 16;
/// Bytes of one chunk (the stripe unit).
pub const CHUNK_BYTES: u64 = CHUNK_BLOCKS * BLOCK_SIZE_BYTES;
/// Bytes of one row of a column: chunk + summary block.
pub const ROW_BYTES: u64 = CHUNK_BYTES + BLOCK_SIZE_BYTES;
/// Summary format version of a data stripe.
pub const SUMMARY_VERSION: u16 = 1;
/// Summary format version of a row that carries a [`StripeKind`] other than data.
pub const SUMMARY_VERSION_KIND: u16 = 2;
/// Largest k a summary block can describe.
pub const MAX_DATA_COLUMNS: usize =
    (SUMMARY_CRC_OFFSET - SUMMARY_FIXED_BYTES) / (CHUNK_BLOCKS as usize * SLOT_ENTRY_BYTES);

const SUMMARY_MAGIC: u64 = u64::from_le_bytes(*b"RBHNSUM1");
const SUMMARY_FIXED_BYTES: usize = 56;
const SLOT_ENTRY_BYTES: usize = 20;
const TOMBSTONE_ENTRY_BYTES: usize = 24;
const SUMMARY_CRC_OFFSET: usize = BLOCK_SIZE_BYTES as usize - 4;
const EMPTY_SLOT: u64 = u64::MAX;

/// Most tombstones one stripe's summary can carry with `k` data columns.
pub fn max_tombstones(k: usize) -> usize {
    SUMMARY_CRC_OFFSET
        .saturating_sub(SUMMARY_FIXED_BYTES + k * CHUNK_BLOCKS as usize * SLOT_ENTRY_BYTES)
        / TOMBSTONE_ENTRY_BYTES
}

/// Byte offset in its column of block `block` (0..16) of stripe `stripe`.
pub fn block_offset(stripe: u64, block: u64) -> u64 {
    debug_assert!(block < CHUNK_BLOCKS);
    stripe * ROW_BYTES + block * BLOCK_SIZE_BYTES
}

/// `(stripe, block in chunk)` of a data byte offset; `None` if it is not a
/// data block (a summary block or unaligned).
pub fn split_offset(offset_bytes: u64) -> Option<(u64, u64)> {
    let in_row = offset_bytes % ROW_BYTES;
    (offset_bytes % BLOCK_SIZE_BYTES == 0 && in_row < CHUNK_BYTES)
        .then_some((offset_bytes / ROW_BYTES, in_row / BLOCK_SIZE_BYTES))
}

/// One data slot of a stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotEntry {
    /// Partition-relative block.
    pub lba: u64,
    /// Sequence of the write that produced the block.
    pub sequence: u64,
    /// CRC-32C of the block.
    pub crc: u32,
}

/// An unmapped range (trim / write-zeroes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tombstone {
    /// First partition-relative block.
    pub lba: u64,
    /// Blocks.
    pub block_count: u64,
    /// Sequence of the unmap.
    pub sequence: u64,
}

/// What a row's chunks carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StripeKind {
    /// Partition blocks (slots map LBAs).
    #[default]
    Data,
    /// Bytes of an index checkpoint (slots number the checkpoint's blocks).
    IndexCheckpoint,
}

impl StripeKind {
    fn code(self) -> u16 {
        match self {
            StripeKind::Data => 0,
            StripeKind::IndexCheckpoint => 1,
        }
    }
}

/// What one stripe holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeSummary {
    /// Data stripe or checkpoint row.
    pub kind: StripeKind,
    /// Volume.
    pub volume: u64,
    /// Partition.
    pub partition: u32,
    /// Epoch of the primary that wrote it.
    pub epoch: u64,
    /// Extent.
    pub extent: u64,
    /// Stripe (row) number.
    pub stripe: u64,
    /// `k * 16` slots; `None` for a padding slot (zeros).
    pub slots: Vec<Option<SlotEntry>>,
    /// Unmapped ranges.
    pub tombstones: Vec<Tombstone>,
}

/// Why a summary block is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SummaryError {
    /// All zero: never written.
    #[error("blank summary block")]
    Blank,
    /// Wrong magic or version.
    #[error("not a summary block (magic {magic:#x}, version {version})")]
    NotSummary {
        /// Found magic.
        magic: u64,
        /// Found version.
        version: u16,
    },
    /// CRC mismatch.
    #[error("summary checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Stored.
        stored: u32,
        /// Computed.
        computed: u32,
    },
    /// Counts that do not fit the block.
    #[error("summary of {slots} slots and {tombstones} tombstones does not fit a block")]
    TooLarge {
        /// Slots.
        slots: usize,
        /// Tombstones.
        tombstones: usize,
    },
}

impl StripeSummary {
    /// Encodes into one 4 KiB block.
    pub fn encode(&self) -> Result<Vec<u8>, SummaryError> {
        let needed = SUMMARY_FIXED_BYTES
            + self.slots.len() * SLOT_ENTRY_BYTES
            + self.tombstones.len() * TOMBSTONE_ENTRY_BYTES;
        let too_large = || SummaryError::TooLarge {
            slots: self.slots.len(),
            tombstones: self.tombstones.len(),
        };
        if needed > SUMMARY_CRC_OFFSET {
            return Err(too_large());
        }
        let slots = u16::try_from(self.slots.len()).map_err(|_| too_large())?;
        let tombstones = u16::try_from(self.tombstones.len()).map_err(|_| too_large())?;
        let mut out = Vec::with_capacity(BLOCK_SIZE_BYTES as usize);
        let version = match self.kind {
            StripeKind::Data => SUMMARY_VERSION,
            _ => SUMMARY_VERSION_KIND,
        };
        out.extend_from_slice(&SUMMARY_MAGIC.to_le_bytes());
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&slots.to_le_bytes());
        out.extend_from_slice(&tombstones.to_le_bytes());
        out.extend_from_slice(&self.kind.code().to_le_bytes());
        out.extend_from_slice(&self.volume.to_le_bytes());
        out.extend_from_slice(&self.partition.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.extent.to_le_bytes());
        out.extend_from_slice(&self.stripe.to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        for slot in &self.slots {
            let e = slot.unwrap_or(SlotEntry {
                lba: EMPTY_SLOT,
                sequence: 0,
                crc: 0,
            });
            out.extend_from_slice(&e.lba.to_le_bytes());
            out.extend_from_slice(&e.sequence.to_le_bytes());
            out.extend_from_slice(&e.crc.to_le_bytes());
        }
        for t in &self.tombstones {
            out.extend_from_slice(&t.lba.to_le_bytes());
            out.extend_from_slice(&t.block_count.to_le_bytes());
            out.extend_from_slice(&t.sequence.to_le_bytes());
        }
        out.resize(SUMMARY_CRC_OFFSET, 0);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(out.len() as u64, BLOCK_SIZE_BYTES);
        Ok(out)
    }

    /// Decodes and checks a summary block.
    pub fn decode(block: &[u8]) -> Result<Self, SummaryError> {
        if block.len() != BLOCK_SIZE_BYTES as usize {
            return Err(SummaryError::TooLarge {
                slots: 0,
                tombstones: 0,
            });
        }
        if block.iter().all(|b| *b == 0) {
            return Err(SummaryError::Blank);
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&block[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&block[at..at + 4]);
            u32::from_le_bytes(b)
        };
        let u16_at = |at: usize| u16::from_le_bytes([block[at], block[at + 1]]);
        let magic = u64_at(0);
        let version = u16_at(8);
        let kind = match (magic == SUMMARY_MAGIC, version, u16_at(14)) {
            (true, SUMMARY_VERSION, _) => StripeKind::Data,
            (true, SUMMARY_VERSION_KIND, 1) => StripeKind::IndexCheckpoint,
            _ => return Err(SummaryError::NotSummary { magic, version }),
        };
        let stored = u32_at(SUMMARY_CRC_OFFSET);
        let computed = crc32c::crc32c(&block[..SUMMARY_CRC_OFFSET]);
        if stored != computed {
            return Err(SummaryError::Checksum { stored, computed });
        }
        let slots = usize::from(u16_at(10));
        let tombstones = usize::from(u16_at(12));
        if SUMMARY_FIXED_BYTES + slots * SLOT_ENTRY_BYTES + tombstones * TOMBSTONE_ENTRY_BYTES
            > SUMMARY_CRC_OFFSET
        {
            return Err(SummaryError::TooLarge { slots, tombstones });
        }
        let mut at = SUMMARY_FIXED_BYTES;
        let mut slot_entries = Vec::with_capacity(slots);
        for _ in 0..slots {
            let lba = u64_at(at);
            let entry = SlotEntry {
                lba,
                sequence: u64_at(at + 8),
                crc: u32_at(at + 16),
            };
            slot_entries.push((lba != EMPTY_SLOT).then_some(entry));
            at += SLOT_ENTRY_BYTES;
        }
        let mut tombstone_entries = Vec::with_capacity(tombstones);
        for _ in 0..tombstones {
            tombstone_entries.push(Tombstone {
                lba: u64_at(at),
                block_count: u64_at(at + 8),
                sequence: u64_at(at + 16),
            });
            at += TOMBSTONE_ENTRY_BYTES;
        }
        Ok(StripeSummary {
            kind,
            volume: u64_at(16),
            partition: u32_at(24),
            extent: u64_at(32),
            stripe: u64_at(40),
            epoch: u64_at(48),
            slots: slot_entries,
            tombstones: tombstone_entries,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn summary_round_trip_and_corruption() {
        let summary = StripeSummary {
            kind: StripeKind::Data,
            volume: 7,
            partition: 3,
            epoch: 9,
            extent: 11,
            stripe: 2,
            slots: (0..64)
                .map(|i| {
                    (i % 3 != 0).then_some(SlotEntry {
                        lba: i,
                        sequence: 100 + i,
                        crc: i as u32 * 7,
                    })
                })
                .collect(),
            tombstones: vec![Tombstone {
                lba: 5,
                block_count: 9,
                sequence: 77,
            }],
        };
        let block = summary.encode().unwrap();
        assert_eq!(StripeSummary::decode(&block).unwrap(), summary);
        for bit in [0usize, 100, 4000 * 8, 4095 * 8 + 7] {
            let mut bad = block.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(StripeSummary::decode(&bad).is_err());
        }
        assert_eq!(
            StripeSummary::decode(&[0u8; 4096]),
            Err(SummaryError::Blank)
        );
        assert!(max_tombstones(4) >= 100);
        // A checkpoint row round-trips with its kind; a version-1 reader
        // would refuse it (version 2).
        let checkpoint = StripeSummary {
            kind: StripeKind::IndexCheckpoint,
            tombstones: Vec::new(),
            ..summary
        };
        let block = checkpoint.encode().unwrap();
        assert_eq!(
            u16::from_le_bytes([block[8], block[9]]),
            SUMMARY_VERSION_KIND
        );
        assert_eq!(StripeSummary::decode(&block).unwrap(), checkpoint);
        assert_eq!(MAX_DATA_COLUMNS, 12);
    }

    #[test]
    fn offsets() {
        assert_eq!(block_offset(2, 3), 2 * ROW_BYTES + 3 * 4096);
        assert_eq!(split_offset(block_offset(2, 3)), Some((2, 3)));
        assert_eq!(split_offset(ROW_BYTES - 4096), None);
    }
}
