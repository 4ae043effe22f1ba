//! On-device layout of a sled device (pure, sans-IO).
//!
//! ```text
//! offset 0        superblock copy 0                         4 KiB
//! offset 4096     superblock copy 1                         4 KiB
//! column table    per column: slot 0, slot 1                2 x 4 KiB each
//! CRC region      per column: crc_blocks_per_column x 2     4 KiB each (two copies)
//! data region     per column: column_size_bytes             4 KiB aligned
//! ```
//!
//! Every structure is one 4 KiB block, little-endian, carries a magic, a
//! layout version, the identifiers it belongs to (so a misdirected write is
//! detected) and a CRC-32C over everything before the last 4 bytes, stored in
//! those last 4 bytes. A block of all zeros is *blank* (never written), which
//! is distinct from *corrupt* (non-zero, failing magic or checksum).
//!
//! **Superblock.** Written twice at format (both copies identical). The device
//! is usable if at least one copy is valid; both copies blank means a blank
//! device (formatted on first start); both corrupt (or one corrupt, one
//! blank) means the device is refused — we never reformat a non-blank device.
//!
//! **Column slots (ping-pong).** A column's state lives in two slots. The slot
//! for generation `g` is `g % 2`, so a new state is always written over the
//! *older* slot: a torn slot write can only destroy the previous-but-one
//! state and the valid slot with the higher generation wins. Two blank slots
//! mean Free at generation 0 (columns are not written at format).
//!
//! **CRC blocks.** The CRC-32C of every 4 KiB data block of a column is kept in
//! CRC blocks of [`CRC_ENTRIES_PER_BLOCK`] entries plus a 24-byte trailer
//! (magic, column index, CRC block index, generation, checksum). Each CRC block
//! has two copies; a write goes to the copy that does *not* hold the current
//! best version, with generation best + 1, so a torn CRC write cannot lose
//! the CRCs of data that was already acknowledged. Entries are meaningful only
//! below the column's length; entries above it are garbage by design (they may
//! come from an unacknowledged append or a previous use of the column).
//!
//! Geometry: `column_count` is the largest `n` such that the metadata of `n`
//! columns plus `n * column_size_bytes` fits in the device.

use proto::BLOCK_SIZE_BYTES;
use thiserror::Error;

// Everything on the device is whole volume blocks ([`BLOCK_SIZE_BYTES`]),
// read and written with O_DIRECT: a block must be whole device I/O units.
const _: () = assert!(BLOCK_SIZE_BYTES % hardware::IO_ALIGN_BYTES as u64 == 0);

/// Current layout version written into every structure.
pub const LAYOUT_VERSION: u32 = 1;

pub const SUPERBLOCK_MAGIC: u64 = u64::from_le_bytes(*b"RBSLEDSB");
const SLOT_MAGIC: u32 = u32::from_le_bytes(*b"RBCS");
const CRC_BLOCK_MAGIC: u32 = u32::from_le_bytes(*b"RBCC");

/// Offsets of the two superblock copies.
pub const SUPERBLOCK_OFFSETS: [u64; 2] = [0, BLOCK_SIZE_BYTES];
/// Start of the column table.
pub const COLUMN_TABLE_OFFSET: u64 = 2 * BLOCK_SIZE_BYTES;
/// Entries per CRC block: (block size - 24-byte trailer) / 4.
pub const CRC_ENTRIES_PER_BLOCK: usize = (BLOCK_SIZE_BYTES as usize - CRC_TRAILER_BYTES) / 4;
const CRC_TRAILER_BYTES: usize = 24;

/// Longest name (unit or sled id) stored in a superblock, in bytes.
pub const MAX_NAME_BYTES: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LayoutError {
    #[error("column size {column_size_bytes} is not a non-zero multiple of {BLOCK_SIZE_BYTES}")]
    BadColumnSize { column_size_bytes: u64 },
    #[error("device of {device_size_bytes} bytes holds no column of {column_size_bytes} bytes")]
    DeviceTooSmall {
        device_size_bytes: u64,
        column_size_bytes: u64,
    },
    #[error("name {name:?} longer than {MAX_NAME_BYTES} bytes")]
    NameTooLong { name: String },
    #[error("block is blank")]
    Blank,
    #[error("bad magic {found:#x}")]
    BadMagic { found: u64 },
    #[error("unsupported layout version {found}")]
    BadVersion { found: u32 },
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("field {field} invalid: {reason}")]
    BadField { field: &'static str, reason: String },
    #[error("block belongs to {what} {found}, expected {expected}")]
    Misplaced {
        what: &'static str,
        found: u64,
        expected: u64,
    },
    #[error("buffer of {len_bytes} bytes, expected {BLOCK_SIZE_BYTES}")]
    BadLength { len_bytes: usize },
}

fn is_blank(block: &[u8]) -> bool {
    block.iter().all(|b| *b == 0)
}

/// Checks length, blankness and the trailing CRC-32C.
fn check_block(block: &[u8]) -> Result<(), LayoutError> {
    if block.len() != BLOCK_SIZE_BYTES as usize {
        return Err(LayoutError::BadLength {
            len_bytes: block.len(),
        });
    }
    if is_blank(block) {
        return Err(LayoutError::Blank);
    }
    let stored = u32::from_le_bytes(
        block[BLOCK_SIZE_BYTES as usize - 4..]
            .try_into()
            .unwrap_or_default(),
    );
    let computed = crc32c::crc32c(&block[..BLOCK_SIZE_BYTES as usize - 4]);
    if stored != computed {
        return Err(LayoutError::Checksum { stored, computed });
    }
    Ok(())
}

fn seal_block(block: &mut [u8]) {
    debug_assert_eq!(block.len(), BLOCK_SIZE_BYTES as usize);
    let crc = crc32c::crc32c(&block[..BLOCK_SIZE_BYTES as usize - 4]);
    block[BLOCK_SIZE_BYTES as usize - 4..].copy_from_slice(&crc.to_le_bytes());
}

/// Little-endian cursor writer over a fixed block.
struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.buf[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }
    fn u8(&mut self, v: u8) {
        self.put(&[v]);
    }
    fn u16(&mut self, v: u16) {
        self.put(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
    fn u128(&mut self, v: u128) {
        self.put(&v.to_le_bytes());
    }
    fn name(&mut self, s: &str) {
        // Length-prefixed, padded to MAX_NAME_BYTES so the layout is fixed.
        let bytes = s.as_bytes();
        debug_assert!(bytes.len() <= MAX_NAME_BYTES);
        self.u8(bytes.len() as u8);
        let mut padded = [0u8; MAX_NAME_BYTES];
        padded[..bytes.len()].copy_from_slice(bytes);
        self.put(&padded);
    }
}

/// Little-endian cursor reader over a checked block (bounds are static).
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.at..self.at + N]);
        self.at += N;
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn u128(&mut self) -> u128 {
        u128::from_le_bytes(self.take())
    }
    /// Reads a 32-bit magic number: `BadMagic` unless it is `expected`.
    fn magic(&mut self, expected: u32) -> Result<(), LayoutError> {
        let found = self.u32();
        if found != expected {
            return Err(LayoutError::BadMagic {
                found: found as u64,
            });
        }
        Ok(())
    }
    /// Reads the 32-bit number `what` that says where the block belongs:
    /// `Misplaced` unless it is `expected`.
    fn placed(&mut self, what: &'static str, expected: u32) -> Result<(), LayoutError> {
        let found = self.u32();
        if found != expected {
            return Err(LayoutError::Misplaced {
                what,
                found: found as u64,
                expected: expected as u64,
            });
        }
        Ok(())
    }
    fn name(&mut self, field: &'static str) -> Result<String, LayoutError> {
        let len = self.u8() as usize;
        let padded: [u8; MAX_NAME_BYTES] = self.take();
        String::from_utf8(padded[..len].to_vec()).map_err(|e| LayoutError::BadField {
            field,
            reason: e.to_string(),
        })
    }
}

/// Where things are on one device; derived from the device size and the
/// column size, and recorded in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub column_size_bytes: u64,
    pub column_count: u32,
    pub crc_blocks_per_column: u32,
    /// Device byte offsets of the three regions.
    pub column_table_offset_bytes: u64,
    pub crc_region_offset_bytes: u64,
    pub data_region_offset_bytes: u64,
}

impl Geometry {
    /// Computes the geometry for a device of `device_size_bytes`.
    pub fn compute(device_size_bytes: u64, column_size_bytes: u64) -> Result<Self, LayoutError> {
        if column_size_bytes == 0 || column_size_bytes % BLOCK_SIZE_BYTES != 0 {
            return Err(LayoutError::BadColumnSize { column_size_bytes });
        }
        let blocks_per_column = column_size_bytes / BLOCK_SIZE_BYTES;
        let crc_blocks_per_column = blocks_per_column.div_ceil(CRC_ENTRIES_PER_BLOCK as u64);
        let per_column_bytes = 2 * BLOCK_SIZE_BYTES // slots
            + 2 * crc_blocks_per_column * BLOCK_SIZE_BYTES // CRC copies
            + column_size_bytes;
        let usable = device_size_bytes.saturating_sub(COLUMN_TABLE_OFFSET);
        let column_count = (usable / per_column_bytes).min(u32::MAX as u64);
        if column_count == 0 {
            return Err(LayoutError::DeviceTooSmall {
                device_size_bytes,
                column_size_bytes,
            });
        }
        let crc_blocks_per_column = u32::try_from(crc_blocks_per_column)
            .map_err(|_| LayoutError::BadColumnSize { column_size_bytes })?;
        let crc_region_offset_bytes = COLUMN_TABLE_OFFSET + column_count * 2 * BLOCK_SIZE_BYTES;
        let data_region_offset_bytes = crc_region_offset_bytes
            + column_count * 2 * crc_blocks_per_column as u64 * BLOCK_SIZE_BYTES;
        Ok(Self {
            column_size_bytes,
            column_count: column_count as u32,
            crc_blocks_per_column,
            column_table_offset_bytes: COLUMN_TABLE_OFFSET,
            crc_region_offset_bytes,
            data_region_offset_bytes,
        })
    }

    pub fn blocks_per_column(&self) -> u64 {
        self.column_size_bytes / BLOCK_SIZE_BYTES
    }

    /// Device offset of slot `slot` (0 or 1) of `column`.
    pub fn slot_offset(&self, column: u32, slot: u8) -> u64 {
        debug_assert!(column < self.column_count && slot < 2);
        self.column_table_offset_bytes + (column as u64 * 2 + slot as u64) * BLOCK_SIZE_BYTES
    }

    /// Device offset of copy `copy` of CRC block `crc_block` of `column`.
    pub fn crc_block_offset(&self, column: u32, crc_block: u32, copy: u8) -> u64 {
        debug_assert!(column < self.column_count && crc_block < self.crc_blocks_per_column);
        let index = (column as u64 * self.crc_blocks_per_column as u64 + crc_block as u64) * 2
            + copy as u64;
        self.crc_region_offset_bytes + index * BLOCK_SIZE_BYTES
    }

    /// Device offset of byte `offset` of `column`'s data.
    pub fn data_offset(&self, column: u32, offset: u64) -> u64 {
        debug_assert!(column < self.column_count && offset <= self.column_size_bytes);
        self.data_region_offset_bytes + column as u64 * self.column_size_bytes + offset
    }

    /// CRC block index and entry index of the data block at byte `offset`.
    pub fn crc_position(offset: u64) -> (u32, usize) {
        let block = offset / BLOCK_SIZE_BYTES;
        let per = CRC_ENTRIES_PER_BLOCK as u64;
        ((block / per) as u32, (block % per) as usize)
    }

    /// Bytes of the device the layout uses.
    pub fn end_offset(&self) -> u64 {
        self.data_region_offset_bytes + self.column_count as u64 * self.column_size_bytes
    }
}

/// Identity and geometry of a formatted device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub layout_version: u32,
    pub unit_name: String,
    pub sled_id: String,
    pub device_index: u16,
    pub device_uuid: u128,
    pub device_size_bytes: u64,
    pub geometry: Geometry,
}

impl Superblock {
    pub fn encode(&self) -> Result<[u8; BLOCK_SIZE_BYTES as usize], LayoutError> {
        for name in [&self.unit_name, &self.sled_id] {
            if name.len() > MAX_NAME_BYTES {
                return Err(LayoutError::NameTooLong { name: name.clone() });
            }
        }
        let mut block = [0u8; BLOCK_SIZE_BYTES as usize];
        let g = &self.geometry;
        let mut w = Writer {
            buf: &mut block,
            at: 0,
        };
        w.u64(SUPERBLOCK_MAGIC);
        w.u32(self.layout_version);
        w.u32(BLOCK_SIZE_BYTES as u32);
        w.name(&self.unit_name);
        w.name(&self.sled_id);
        w.u16(self.device_index);
        w.u128(self.device_uuid);
        w.u64(self.device_size_bytes);
        w.u64(g.column_size_bytes);
        w.u32(g.column_count);
        w.u32(g.crc_blocks_per_column);
        w.u64(g.column_table_offset_bytes);
        w.u64(g.crc_region_offset_bytes);
        w.u64(g.data_region_offset_bytes);
        seal_block(&mut block);
        Ok(block)
    }

    pub fn decode(block: &[u8]) -> Result<Self, LayoutError> {
        check_block(block)?;
        let mut r = Reader { buf: block, at: 0 };
        let magic = r.u64();
        if magic != SUPERBLOCK_MAGIC {
            return Err(LayoutError::BadMagic { found: magic });
        }
        let layout_version = r.u32();
        if layout_version != LAYOUT_VERSION {
            return Err(LayoutError::BadVersion {
                found: layout_version,
            });
        }
        let block_size_bytes = r.u32();
        if block_size_bytes as u64 != BLOCK_SIZE_BYTES {
            return Err(LayoutError::BadField {
                field: "block_size_bytes",
                reason: block_size_bytes.to_string(),
            });
        }
        let unit_name = r.name("unit_name")?;
        let sled_id = r.name("sled_id")?;
        let device_index = r.u16();
        let device_uuid = r.u128();
        let device_size_bytes = r.u64();
        let geometry = Geometry {
            column_size_bytes: r.u64(),
            column_count: r.u32(),
            crc_blocks_per_column: r.u32(),
            column_table_offset_bytes: r.u64(),
            crc_region_offset_bytes: r.u64(),
            data_region_offset_bytes: r.u64(),
        };
        // The recorded geometry must be the one this code would compute, or
        // offsets derived from it could point anywhere.
        let expected = Geometry::compute(device_size_bytes, geometry.column_size_bytes)?;
        if expected != geometry {
            return Err(LayoutError::BadField {
                field: "geometry",
                reason: format!("recorded {geometry:?}, computed {expected:?}"),
            });
        }
        Ok(Self {
            layout_version,
            unit_name,
            sled_id,
            device_index,
            device_uuid,
            device_size_bytes,
            geometry,
        })
    }
}

/// Allocation state of a column as persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    Free = 0,
    Allocated = 1,
    Claimed = 2,
}

/// One persisted version of a column's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnSlot {
    pub generation: u64,
    pub state: SlotState,
    /// Owner (volume, partition); meaningful when Claimed.
    pub volume: u64,
    pub partition: u32,
    /// Highest epoch accepted.
    pub epoch: u64,
    pub length_bytes: u64,
    /// Byte offset of the start of the last append; `[tail_from_bytes,
    /// length_bytes)` is in doubt after a crash until verified against the
    /// CRCs.
    pub tail_from_bytes: u64,
}

impl ColumnSlot {
    /// The state of a column whose slots were never written.
    pub const BLANK: ColumnSlot = ColumnSlot {
        generation: 0,
        state: SlotState::Free,
        volume: 0,
        partition: 0,
        epoch: 0,
        length_bytes: 0,
        tail_from_bytes: 0,
    };

    /// Which of the two slots holds this generation.
    pub fn slot_index(&self) -> u8 {
        (self.generation % 2) as u8
    }

    pub fn encode(&self, column: u32) -> [u8; BLOCK_SIZE_BYTES as usize] {
        let mut block = [0u8; BLOCK_SIZE_BYTES as usize];
        let mut w = Writer {
            buf: &mut block,
            at: 0,
        };
        w.u32(SLOT_MAGIC);
        w.u32(LAYOUT_VERSION);
        w.u32(column);
        w.u64(self.generation);
        w.u8(self.state as u8);
        w.u64(self.volume);
        w.u32(self.partition);
        w.u64(self.epoch);
        w.u64(self.length_bytes);
        w.u64(self.tail_from_bytes);
        seal_block(&mut block);
        block
    }

    pub fn decode(block: &[u8], column: u32, column_size_bytes: u64) -> Result<Self, LayoutError> {
        check_block(block)?;
        let mut r = Reader { buf: block, at: 0 };
        r.magic(SLOT_MAGIC)?;
        let version = r.u32();
        if version != LAYOUT_VERSION {
            return Err(LayoutError::BadVersion { found: version });
        }
        r.placed("column", column)?;
        let generation = r.u64();
        let state = match r.u8() {
            0 => SlotState::Free,
            1 => SlotState::Allocated,
            2 => SlotState::Claimed,
            other => {
                return Err(LayoutError::BadField {
                    field: "state",
                    reason: other.to_string(),
                })
            }
        };
        let slot = ColumnSlot {
            generation,
            state,
            volume: r.u64(),
            partition: r.u32(),
            epoch: r.u64(),
            length_bytes: r.u64(),
            tail_from_bytes: r.u64(),
        };
        if slot.length_bytes % BLOCK_SIZE_BYTES != 0 || slot.length_bytes > column_size_bytes {
            return Err(LayoutError::BadField {
                field: "length_bytes",
                reason: slot.length_bytes.to_string(),
            });
        }
        if slot.tail_from_bytes % BLOCK_SIZE_BYTES != 0 || slot.tail_from_bytes > slot.length_bytes
        {
            return Err(LayoutError::BadField {
                field: "tail_from",
                reason: slot.tail_from_bytes.to_string(),
            });
        }
        Ok(slot)
    }
}

/// Outcome of reading one block that may be blank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    Valid(T),
    Blank,
    Corrupt(LayoutError),
}

impl<T> Decoded<T> {
    pub fn from_result(r: Result<T, LayoutError>) -> Self {
        match r {
            Ok(v) => Decoded::Valid(v),
            Err(LayoutError::Blank) => Decoded::Blank,
            Err(e) => Decoded::Corrupt(e),
        }
    }
}

/// Result of recovering a column from its two slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotRecovery {
    /// The winning state (highest valid generation, or BLANK).
    Recovered(ColumnSlot),
    /// Neither slot is valid and at least one is not blank... and neither a
    /// single torn write explains it. The column must not be used.
    Unrecoverable { errors: [Option<LayoutError>; 2] },
}

/// Chooses a column's state from its two slots (see module docs).
pub fn recover_slots(slots: [Decoded<ColumnSlot>; 2]) -> SlotRecovery {
    let mut best: Option<ColumnSlot> = None;
    for slot in slots.iter() {
        if let Decoded::Valid(s) = slot {
            if best.is_none_or(|b| s.generation > b.generation) {
                best = Some(*s);
            }
        }
    }
    if let Some(b) = best {
        return SlotRecovery::Recovered(b);
    }
    match &slots {
        [Decoded::Blank, Decoded::Blank] => SlotRecovery::Recovered(ColumnSlot::BLANK),
        // The very first slot write (generation 1, slot 1) was torn: the
        // column was blank before it.
        [Decoded::Blank, Decoded::Corrupt(_)] => SlotRecovery::Recovered(ColumnSlot::BLANK),
        [a, b] => {
            let err = |d: &Decoded<ColumnSlot>| match d {
                Decoded::Corrupt(e) => Some(e.clone()),
                _ => None,
            };
            SlotRecovery::Unrecoverable {
                errors: [err(a), err(b)],
            }
        }
    }
}

/// One version of a CRC block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrcBlock {
    pub generation: u64,
    pub entries: Vec<u32>,
}

impl CrcBlock {
    pub fn blank() -> Self {
        Self {
            generation: 0,
            entries: vec![0; CRC_ENTRIES_PER_BLOCK],
        }
    }

    pub fn encode(&self, column: u32, crc_block: u32) -> [u8; BLOCK_SIZE_BYTES as usize] {
        debug_assert_eq!(self.entries.len(), CRC_ENTRIES_PER_BLOCK);
        let mut block = [0u8; BLOCK_SIZE_BYTES as usize];
        let mut w = Writer {
            buf: &mut block,
            at: 0,
        };
        for e in &self.entries {
            w.u32(*e);
        }
        w.u32(CRC_BLOCK_MAGIC);
        w.u32(column);
        w.u32(crc_block);
        w.u64(self.generation);
        seal_block(&mut block);
        block
    }

    pub fn decode(block: &[u8], column: u32, crc_block: u32) -> Result<Self, LayoutError> {
        check_block(block)?;
        let mut r = Reader { buf: block, at: 0 };
        let entries = (0..CRC_ENTRIES_PER_BLOCK).map(|_| r.u32()).collect();
        r.magic(CRC_BLOCK_MAGIC)?;
        r.placed("column", column)?;
        r.placed("crc block", crc_block)?;
        Ok(Self {
            generation: r.u64(),
            entries,
        })
    }
}

/// Chooses the current version of a CRC block from its two copies; returns
/// the block and the copy index holding it (the next write goes to the
/// other). Neither copy valid yields a blank block whose next write goes to
/// copy 0 — a blank or torn CRC block only matters if the column's length
/// covers it, which verification then reports.
pub fn recover_crc_block(copies: [Decoded<CrcBlock>; 2]) -> (CrcBlock, Option<u8>) {
    let mut best: Option<(CrcBlock, u8)> = None;
    for (i, copy) in copies.into_iter().enumerate() {
        if let Decoded::Valid(b) = copy {
            if best
                .as_ref()
                .is_none_or(|(cur, _)| b.generation > cur.generation)
            {
                best = Some((b, i as u8));
            }
        }
    }
    match best {
        Some((b, i)) => (b, Some(i)),
        None => (CrcBlock::blank(), None),
    }
}

/// CRC-32C of every 4 KiB block of `data` (length a multiple of
/// [`BLOCK_SIZE_BYTES`]).
pub fn block_crcs(data: &[u8]) -> Vec<u32> {
    debug_assert_eq!(data.len() % BLOCK_SIZE_BYTES as usize, 0);
    data.chunks(BLOCK_SIZE_BYTES as usize)
        .map(crc32c::crc32c)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn geometry() -> Geometry {
        Geometry::compute(64 << 20, 1 << 20).unwrap()
    }

    #[test]
    fn geometry_fits_and_does_not_overlap() {
        for (size, col) in [
            (64u64 << 20, 1u64 << 20),
            (1 << 30, 64 << 20),
            (10 << 20, 4096),
            (1 << 40, 64 << 20),
        ] {
            let g = Geometry::compute(size, col).unwrap();
            assert!(g.end_offset() <= size, "{g:?}");
            assert!(
                g.crc_region_offset_bytes
                    >= g.slot_offset(g.column_count - 1, 1) + BLOCK_SIZE_BYTES
            );
            assert!(
                g.data_region_offset_bytes
                    >= g.crc_block_offset(g.column_count - 1, g.crc_blocks_per_column - 1, 1)
                        + BLOCK_SIZE_BYTES
            );
            assert_eq!(g.data_region_offset_bytes % BLOCK_SIZE_BYTES, 0);
            // One more column would not fit.
            let per =
                2 * BLOCK_SIZE_BYTES + 2 * g.crc_blocks_per_column as u64 * BLOCK_SIZE_BYTES + col;
            assert!(g.end_offset() + per > size);
            assert!(
                g.crc_blocks_per_column as u64 * CRC_ENTRIES_PER_BLOCK as u64
                    >= g.blocks_per_column()
            );
        }
        assert!(matches!(
            Geometry::compute(1 << 20, 1 << 20),
            Err(LayoutError::DeviceTooSmall { .. })
        ));
        assert!(matches!(
            Geometry::compute(1 << 30, 1000),
            Err(LayoutError::BadColumnSize { .. })
        ));
    }

    fn superblock(unit: String, sled: String, index: u16, uuid: u128) -> Superblock {
        Superblock {
            layout_version: LAYOUT_VERSION,
            unit_name: unit,
            sled_id: sled,
            device_index: index,
            device_uuid: uuid,
            device_size_bytes: 64 << 20,
            geometry: geometry(),
        }
    }

    fn slot_strategy() -> impl Strategy<Value = ColumnSlot> {
        (
            any::<u64>(),
            0u8..3,
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            0u64..=256,
            0u64..=256,
        )
            .prop_map(|(generation, state, volume, partition, epoch, a, b)| {
                let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
                ColumnSlot {
                    generation,
                    state: [SlotState::Free, SlotState::Allocated, SlotState::Claimed]
                        [state as usize],
                    volume,
                    partition,
                    epoch,
                    length_bytes: hi * BLOCK_SIZE_BYTES,
                    tail_from_bytes: lo * BLOCK_SIZE_BYTES,
                }
            })
    }

    proptest! {
        #[test]
        fn superblock_round_trips(unit in "[a-z0-9-]{0,40}", sled in "[a-z0-9-]{1,40}", index: u16, uuid: u128) {
            let sb = superblock(unit, sled, index, uuid);
            let block = sb.encode().unwrap();
            prop_assert_eq!(Superblock::decode(&block).unwrap(), sb);
        }

        #[test]
        fn superblock_corruption_detected(uuid: u128, at in 0usize..BLOCK_SIZE_BYTES as usize, flip in 1u8..=255) {
            let mut block = superblock("unit".into(), "sled-1".into(), 3, uuid).encode().unwrap();
            block[at] ^= flip;
            prop_assert!(Superblock::decode(&block).is_err());
        }

        #[test]
        fn slot_round_trips(slot in slot_strategy(), column: u32) {
            let block = slot.encode(column);
            prop_assert_eq!(ColumnSlot::decode(&block, column, 1 << 20).unwrap(), slot);
        }

        #[test]
        fn slot_corruption_detected(slot in slot_strategy(), at in 0usize..BLOCK_SIZE_BYTES as usize, flip in 1u8..=255) {
            let mut block = slot.encode(7);
            block[at] ^= flip;
            prop_assert!(ColumnSlot::decode(&block, 7, 1 << 20).is_err());
        }

        #[test]
        fn crc_block_round_trips_and_detects_corruption(entries in proptest::collection::vec(any::<u32>(), CRC_ENTRIES_PER_BLOCK), generation: u64, at in 0usize..BLOCK_SIZE_BYTES as usize, flip in 1u8..=255) {
            let b = CrcBlock { generation, entries };
            let mut block = b.encode(2, 5);
            prop_assert_eq!(&CrcBlock::decode(&block, 2, 5).unwrap(), &b);
            prop_assert!(CrcBlock::decode(&block, 3, 5).is_err());
            block[at] ^= flip;
            prop_assert!(CrcBlock::decode(&block, 2, 5).is_err());
        }

        #[test]
        fn torn_slot_write_keeps_previous_state(prev in slot_strategy(), cut in 0usize..BLOCK_SIZE_BYTES as usize) {
            // prev is current at slot prev%2; the next write (generation+1)
            // goes to the other slot and is torn at `cut`.
            let prev = ColumnSlot { generation: prev.generation % (u64::MAX - 1), ..prev };
            let next = ColumnSlot { generation: prev.generation + 1, length_bytes: prev.length_bytes, ..prev };
            let mut slots = [[0u8; BLOCK_SIZE_BYTES as usize], [0u8; BLOCK_SIZE_BYTES as usize]];
            slots[prev.slot_index() as usize] = prev.encode(1);
            let new_block = next.encode(1);
            let target = next.slot_index() as usize;
            slots[target][..cut].copy_from_slice(&new_block[..cut]);
            let decoded = slots.map(|b| Decoded::from_result(ColumnSlot::decode(&b, 1, 1 << 20)));
            match recover_slots(decoded) {
                SlotRecovery::Recovered(s) => prop_assert_eq!(s, prev),
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }

    #[test]
    fn slot_wrong_column_rejected() {
        let block = ColumnSlot {
            generation: 1,
            ..ColumnSlot::BLANK
        }
        .encode(1);
        assert!(matches!(
            ColumnSlot::decode(&block, 2, 1 << 20),
            Err(LayoutError::Misplaced { .. })
        ));
    }

    #[test]
    fn blank_and_torn_first_write_recover_to_blank() {
        let blank = || Decoded::Blank;
        assert_eq!(
            recover_slots([blank(), blank()]),
            SlotRecovery::Recovered(ColumnSlot::BLANK)
        );
        let torn = Decoded::Corrupt(LayoutError::Checksum {
            stored: 0,
            computed: 1,
        });
        assert_eq!(
            recover_slots([blank(), torn.clone()]),
            SlotRecovery::Recovered(ColumnSlot::BLANK)
        );
        assert!(matches!(
            recover_slots([torn.clone(), torn]),
            SlotRecovery::Unrecoverable { .. }
        ));
    }

    #[test]
    fn crc_block_higher_generation_wins() {
        let a = CrcBlock {
            generation: 4,
            entries: vec![1; CRC_ENTRIES_PER_BLOCK],
        };
        let b = CrcBlock {
            generation: 5,
            entries: vec![2; CRC_ENTRIES_PER_BLOCK],
        };
        let (best, copy) =
            recover_crc_block([Decoded::Valid(a.clone()), Decoded::Valid(b.clone())]);
        assert_eq!((best, copy), (b, Some(1)));
        let (best, copy) = recover_crc_block([Decoded::Valid(a.clone()), Decoded::Blank]);
        assert_eq!((best, copy), (a, Some(0)));
        let (best, copy) = recover_crc_block([Decoded::Blank, Decoded::Blank]);
        assert_eq!((best.generation, copy), (0, None));
    }
}
