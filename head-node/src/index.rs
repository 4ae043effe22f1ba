//! The per-partition index: which 4 KiB block lives where (pure, sans-IO).
//!
//! A [`PartitionIndex`] is a `BTreeMap` from first LBA to a run of blocks that
//! share a *base* location and the sequence number of the operation that
//! produced them. Block `lba + i` of a run lives at `base.advanced(i)`: in a
//! record of the head node's write log ([`Location::Log`]) or in a column of
//! an erasure-coded extent on the sleds ([`Location::Sled`]). A run without a
//! location is a *tombstone* left by trim/write-zeroes; gaps and tombstones
//! read as zeros. Tombstones keep their sequence so that an older write
//! applied late (replay, replication) cannot resurrect trimmed data.
//!
//! Every update splits the runs it partially overlaps, rewrites the runs
//! inside the range and merges neighbours that became contiguous, so:
//!
//! * runs never overlap and never extend past the partition;
//! * **newest sequence wins** per block: a write or unmap with a sequence
//!   lower than the block's current one leaves that block alone;
//! * [`PartitionIndex::apply_flush`] moves only blocks that are still mapped
//!   to the log with a sequence not newer than the flushed data, so a write
//!   that landed while its block was being flushed stays in the log;
//! * per-extent live block counts (for GC) and per-log-record reference counts
//!   (so the log is only released behind the oldest referenced record) are
//!   maintained incrementally and always equal a recount
//!   ([`PartitionIndex::check_invariants`]).
//!
//! Snapshots are copy-on-write layers beside the runs ([`snapshot`]): the
//! pre-cut versions of the blocks overwritten after a snapshot's cut,
//! counted in the same reference counts, so GC and log release respect them.
//!
//! [`PartitionIndex::serialize`] writes a versioned, CRC-32C-sealed checkpoint
//! (version 2 adds the snapshot layers; version 1 still loads).

use std::collections::BTreeMap;
use std::ops::Range;

use proto::sled::PartitionId;
use proto::BLOCK_SIZE_BYTES;
use thiserror::Error;

use crate::wal::LogPosition;

mod snapshot;
pub use snapshot::{DiffRange, LayerEntry, SnapshotInfo, SnapshotLayer};

/// Checkpoint format version (2: runs, then snapshot layers).
pub const CHECKPOINT_VERSION: u16 = 2;
/// The checkpoint version before snapshots (runs only); still loaded.
const CHECKPOINT_VERSION_NO_SNAPSHOTS: u16 = 1;
const CHECKPOINT_MAGIC: u64 = u64::from_le_bytes(*b"RBHNIDX1");
const CHECKPOINT_HEADER_BYTES: usize = 8 + 2 + 2 + 8 + 4 + 8 + 8;
const CHECKPOINT_ENTRY_BYTES: usize = 8 + 8 + 8 + 1 + 8 + 8 + 4;

/// Where a block's current content is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Location {
    /// Payload block `block_in_record` of the log record at `position`.
    Log {
        /// Record position.
        position: LogPosition,
        /// Index of the block in the record's payload.
        block_in_record: u32,
    },
    /// Byte `offset_bytes` of column `column` (index within the extent).
    Sled {
        /// Extent id.
        extent: u64,
        /// Column index within the extent.
        column: u16,
        /// Byte offset in the column.
        offset_bytes: u64,
    },
}

impl Location {
    /// The location of the block `blocks` after this one in the same run.
    pub fn advanced(self, blocks: u64) -> Location {
        match self {
            Location::Log {
                position,
                block_in_record,
            } => Location::Log {
                position,
                block_in_record: block_in_record
                    .saturating_add(u32::try_from(blocks).unwrap_or(u32::MAX)),
            },
            Location::Sled {
                extent,
                column,
                offset_bytes,
            } => Location::Sled {
                extent,
                column,
                offset_bytes: offset_bytes + blocks * BLOCK_SIZE_BYTES,
            },
        }
    }
}

/// One run of the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Blocks in the run (> 0).
    pub block_count: u64,
    /// Sequence of the operation that produced it.
    pub sequence: u64,
    /// Base location; `None` for a tombstone (reads as zeros).
    pub location: Option<Location>,
}

impl Run {
    fn piece(self, offset: u64, count: u64) -> Run {
        Run {
            block_count: count,
            sequence: self.sequence,
            location: self.location.map(|l| l.advanced(offset)),
        }
    }

    fn continues_with(&self, next: &Run) -> bool {
        self.sequence == next.sequence
            && self.location.map(|l| l.advanced(self.block_count)) == next.location
    }
}

/// A piece of a [`PartitionIndex::lookup`] answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupPiece {
    /// Blocks covered.
    pub lbas: Range<u64>,
    /// Where the first one is (`None`: zeros).
    pub location: Option<Location>,
}

/// One piece of a lookup answer, with its sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// Blocks covered.
    pub lbas: Range<u64>,
    /// Where the first one is (`None`: zeros).
    pub location: Option<Location>,
    /// Sequence of the operation that wrote it (`None`: never written).
    pub sequence: Option<u64>,
}

/// What the index refuses.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IndexError {
    /// The range is empty or outside the partition.
    #[error(
        "blocks {lba}+{block_count} outside partition {volume}/{partition} of {size_blocks} blocks"
    )]
    OutOfRange {
        /// Volume.
        volume: u64,
        /// Partition.
        partition: u32,
        /// First block.
        lba: u64,
        /// Blocks.
        block_count: u64,
        /// Partition size.
        size_blocks: u64,
    },
    /// A checkpoint that cannot be loaded.
    #[error("index checkpoint invalid: {reason}")]
    Checkpoint {
        /// Why.
        reason: String,
    },
    /// Checkpoint checksum mismatch.
    #[error(
        "index checkpoint checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    CheckpointChecksum {
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
    /// A snapshot operation the index refuses.
    #[error("snapshot {id}: {reason}")]
    Snapshot {
        /// Snapshot id.
        id: u64,
        /// Why.
        reason: String,
    },
    /// Checkpoint of an unknown version.
    #[error("index checkpoint version {found} unsupported")]
    CheckpointVersion {
        /// Found version.
        found: u16,
    },
}

/// The index of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionIndex {
    partition: PartitionId,
    size_blocks: u64,
    runs: BTreeMap<u64, Run>,
    /// Blocks referencing each log record.
    log_refs: BTreeMap<LogPosition, u64>,
    /// Blocks mapped to each extent.
    extent_live: BTreeMap<u64, u64>,
    /// Blocks mapped to the log (the sum of `log_refs`), kept so that
    /// status and metrics do not walk every run.
    log_blocks: u64,
    /// Snapshot layers by snapshot id (their entries are counted in
    /// `log_refs`, `extent_live` and `log_blocks` too).
    snapshots: BTreeMap<u64, SnapshotLayer>,
}

impl PartitionIndex {
    /// An empty index (everything reads as zeros).
    pub fn new(partition: PartitionId, size_blocks: u64) -> Self {
        Self {
            partition,
            size_blocks,
            runs: BTreeMap::new(),
            log_refs: BTreeMap::new(),
            extent_live: BTreeMap::new(),
            log_blocks: 0,
            snapshots: BTreeMap::new(),
        }
    }

    /// The partition.
    pub fn partition(&self) -> PartitionId {
        self.partition
    }

    /// Partition size in blocks.
    pub fn size_blocks(&self) -> u64 {
        self.size_blocks
    }

    /// Number of runs (memory use).
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// All runs in LBA order.
    pub fn runs(&self) -> impl Iterator<Item = (u64, &Run)> + '_ {
        self.runs.iter().map(|(lba, run)| (*lba, run))
    }

    fn check(&self, lba: u64, count: u64) -> Result<u64, IndexError> {
        match lba.checked_add(count) {
            Some(end) if count > 0 && end <= self.size_blocks => Ok(end),
            _ => Err(IndexError::OutOfRange {
                volume: self.partition.volume,
                partition: self.partition.index,
                lba,
                block_count: count,
                size_blocks: self.size_blocks,
            }),
        }
    }

    /// Blocks `lba..lba+count` now hold the data of the write `sequence`;
    /// block `lba + i` is at `location.advanced(i)`. Blocks with a newer
    /// sequence are left alone.
    pub fn apply_write(
        &mut self,
        lba: u64,
        count: u64,
        sequence: u64,
        location: Location,
    ) -> Result<(), IndexError> {
        let end = self.check(lba, count)?;
        self.snapshot_before_update(lba, count, sequence, Some(location))?;
        self.update(lba, end, |offset, len, old| match old {
            Some(old) if old.sequence > sequence => Some(old),
            _ => Some(Run {
                block_count: len,
                sequence,
                location: Some(location.advanced(offset)),
            }),
        });
        // Newest wins: every block now holds this write or a newer one.
        debug_assert!(
            self.every_piece(lba, count, |offset, m| match m.sequence {
                Some(s) if s > sequence => true,
                Some(s) => s == sequence && m.location == Some(location.advanced(offset)),
                None => false,
            }),
            "apply_write({lba}+{count}, sequence {sequence}) left an older or unmapped block"
        );
        Ok(())
    }

    /// Blocks `lba..lba+count` were trimmed or zeroed by `sequence`.
    pub fn apply_unmap(&mut self, lba: u64, count: u64, sequence: u64) -> Result<(), IndexError> {
        let end = self.check(lba, count)?;
        self.snapshot_before_update(lba, count, sequence, None)?;
        self.update(lba, end, |_, len, old| match old {
            Some(old) if old.sequence > sequence => Some(old),
            _ => Some(Run {
                block_count: len,
                sequence,
                location: None,
            }),
        });
        // Newest wins: every block is now this tombstone or newer.
        debug_assert!(
            self.every_piece(lba, count, |_, m| match m.sequence {
                Some(s) => s > sequence || (s == sequence && m.location.is_none()),
                None => false,
            }),
            "apply_unmap({lba}+{count}, sequence {sequence}) left an older or unmapped block"
        );
        Ok(())
    }

    /// The data of write `sequence` for blocks `lba..lba+count` reached the
    /// sleds at `location` (block `lba + i` at `location.advanced(i)`). Only
    /// blocks still mapped to the log with a sequence `<= sequence` move;
    /// returns how many did.
    pub fn apply_flush(
        &mut self,
        lba: u64,
        count: u64,
        sequence: u64,
        location: Location,
    ) -> Result<u64, IndexError> {
        // A flush moves blocks to the sleds; a log location here would
        // count the block as flushed while it is still only in the log.
        assert!(
            matches!(location, Location::Sled { .. }),
            "apply_flush to a log location {location:?}"
        );
        let end = self.check(lba, count)?;
        let mut moved = 0;
        self.update(lba, end, |offset, len, old| match old {
            Some(old)
                if matches!(old.location, Some(Location::Log { .. }))
                    && old.sequence <= sequence =>
            {
                moved += len;
                Some(Run {
                    block_count: len,
                    sequence,
                    location: Some(location.advanced(offset)),
                })
            }
            other => other,
        });
        debug_assert!(moved <= count);
        // Snapshot layers' log-resident copies of the same data move too
        // (counted apart: `moved` is about the live blocks).
        self.snapshot_flushed(lba, count, sequence, location);
        // No block of the range is left in the log at a sequence the
        // flushed data covers (it would be read and flushed again, and hold
        // the log).
        debug_assert!(
            self.every_piece(lba, count, |_, m| {
                !matches!(m.location, Some(Location::Log { .. }))
                    || m.sequence.is_some_and(|s| s > sequence)
            }),
            "apply_flush({lba}+{count}, sequence {sequence}) left a covered block in the log"
        );
        Ok(moved)
    }

    /// Forgets every live run that points into the log with a sequence
    /// `<= sequence` (the blocks become unmapped here); returns how many
    /// blocks. A secondary's index after a flush commit up to `sequence`:
    /// the sleds hold those blocks (or something newer), the log records
    /// are no longer needed, and the commit's mappings need not name them
    /// all (a record that reached this secondary by a catch-up resend was
    /// flushed before it joined: no later commit maps it). Snapshot layers
    /// are left alone.
    pub fn forget_log_through(&mut self, sequence: u64) -> u64 {
        let covered: Vec<u64> = self
            .runs
            .iter()
            .filter(|(_, run)| {
                matches!(run.location, Some(Location::Log { .. })) && run.sequence <= sequence
            })
            .map(|(start, _)| *start)
            .collect();
        let mut forgotten = 0;
        for start in covered {
            if let Some(run) = self.remove(start) {
                forgotten += run.block_count;
            }
        }
        debug_assert!(
            self.runs.values().all(|run| {
                !matches!(run.location, Some(Location::Log { .. })) || run.sequence > sequence
            }),
            "forget_log_through({sequence}) left a covered run in the log"
        );
        forgotten
    }

    /// Where blocks `lba..lba+count` are, in order, covering exactly the
    /// range (`None`: zeros).
    pub fn lookup(&self, lba: u64, count: u64) -> Result<Vec<LookupPiece>, IndexError> {
        Ok(self
            .lookup_with_sequence(lba, count)?
            .into_iter()
            .map(|m| LookupPiece {
                lbas: m.lbas,
                location: m.location,
            })
            .collect())
    }

    /// [`lookup`](Self::lookup) with the sequence of each piece.
    pub fn lookup_with_sequence(&self, lba: u64, count: u64) -> Result<Vec<Mapped>, IndexError> {
        let end = self.check(lba, count)?;
        let mut out: Vec<Mapped> = Vec::new();
        let mut cursor = lba;
        let first = self
            .runs
            .range(..lba)
            .next_back()
            .filter(|(start, run)| **start + run.block_count > lba)
            .map(|(start, run)| (*start, *run));
        let mut push = |lbas: Range<u64>, location: Option<Location>, sequence: Option<u64>| {
            if let Some(last) = out.last_mut() {
                if location.is_none() && last.location.is_none() && last.sequence == sequence {
                    last.lbas.end = lbas.end;
                    return;
                }
            }
            out.push(Mapped {
                lbas,
                location,
                sequence,
            });
        };
        for (start, run) in first
            .into_iter()
            .chain(self.runs.range(lba..end).map(|(s, r)| (*s, *r)))
        {
            if cursor < start {
                push(cursor..start, None, None);
                cursor = start;
            }
            let piece_end = (start + run.block_count).min(end);
            push(
                cursor..piece_end,
                run.location.map(|l| l.advanced(cursor - start)),
                Some(run.sequence),
            );
            cursor = piece_end;
        }
        if cursor < end {
            push(cursor..end, None, None);
        }
        Ok(out)
    }

    /// Live (mapped) blocks per extent, for garbage collection.
    pub fn live_blocks_per_extent(&self) -> &BTreeMap<u64, u64> {
        &self.extent_live
    }

    /// Blocks whose latest version is only in the log (not yet flushed).
    pub fn log_resident_blocks(&self) -> u64 {
        self.log_blocks
    }

    /// Oldest log record still referenced; the log may be released up to it.
    pub fn oldest_log_position(&self) -> Option<LogPosition> {
        self.log_refs.keys().next().copied()
    }

    /// Runs still mapped to log records before `position` (they must be
    /// flushed before the log is released past them).
    pub fn entries_referencing_log_before(
        &self,
        position: LogPosition,
    ) -> Vec<(Range<u64>, Location)> {
        if self.log_refs.range(..position).next().is_none() {
            return Vec::new();
        }
        self.runs
            .iter()
            .filter_map(|(start, run)| match run.location {
                Some(location @ Location::Log { position: p, .. }) if p < position => {
                    Some((*start..*start + run.block_count, location))
                }
                _ => None,
            })
            .collect()
    }

    /// Whether `ok(offset, piece)` holds for every piece of a lookup of
    /// `lba..lba+count` (`offset`: of the piece's first block from `lba`),
    /// and the runs around the range are ordered, non-empty and inside the
    /// partition. Postcondition check of the apply paths (debug builds).
    fn every_piece(&self, lba: u64, count: u64, ok: impl Fn(u64, &Mapped) -> bool) -> bool {
        let end = lba + count;
        let from = self.runs.range(..lba).next_back().map_or(lba, |(s, _)| *s);
        let mut previous_end = 0;
        for (start, run) in self.runs.range(from..) {
            if run.block_count == 0
                || *start < previous_end
                || start + run.block_count > self.size_blocks
            {
                return false;
            }
            previous_end = start + run.block_count;
            if *start > end {
                break;
            }
        }
        self.lookup_with_sequence(lba, count)
            .is_ok_and(|pieces| pieces.iter().all(|m| ok(m.lbas.start - lba, m)))
    }

    /// Verifies the structural invariants (runs ordered, non-overlapping,
    /// inside the partition, counters equal a recount).
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut previous_end = 0;
        let mut log_refs: BTreeMap<LogPosition, u64> = BTreeMap::new();
        let mut extent_live: BTreeMap<u64, u64> = BTreeMap::new();
        for (start, run) in &self.runs {
            if run.block_count == 0
                || *start < previous_end
                || start + run.block_count > self.size_blocks
            {
                return Err(format!(
                    "run {start}+{} overlaps or is out of range",
                    run.block_count
                ));
            }
            previous_end = start + run.block_count;
            match run.location {
                Some(Location::Log { position, .. }) => {
                    *log_refs.entry(position).or_default() += run.block_count
                }
                Some(Location::Sled { extent, .. }) => {
                    *extent_live.entry(extent).or_default() += run.block_count
                }
                None => {}
            }
        }
        for run in self.check_layers(true)? {
            match run.location {
                Some(Location::Log { position, .. }) => {
                    *log_refs.entry(position).or_default() += run.block_count
                }
                Some(Location::Sled { extent, .. }) => {
                    *extent_live.entry(extent).or_default() += run.block_count
                }
                None => {}
            }
        }
        if log_refs != self.log_refs
            || extent_live != self.extent_live
            || log_refs.values().sum::<u64>() != self.log_blocks
        {
            return Err("reference counters differ from a recount".to_string());
        }
        Ok(())
    }

    fn count(&mut self, run: &Run, add: bool) {
        let (map, key): (&mut BTreeMap<_, u64>, _) = match run.location {
            Some(Location::Log { position, .. }) => {
                let entry = self.log_refs.entry(position).or_default();
                adjust(entry, run.block_count, add);
                adjust(&mut self.log_blocks, run.block_count, add);
                if *entry == 0 {
                    self.log_refs.remove(&position);
                }
                return;
            }
            Some(Location::Sled { extent, .. }) => (&mut self.extent_live, extent),
            None => return,
        };
        let entry = map.entry(key).or_default();
        adjust(entry, run.block_count, add);
        if *entry == 0 {
            map.remove(&key);
        }
    }

    fn insert(&mut self, start: u64, run: Run) {
        // An empty run, or one replacing another without `remove` (which
        // uncounts it), would leave the reference counts wrong: the log
        // could then be released under a referenced record.
        assert!(run.block_count > 0, "empty run at {start}");
        self.count(&run, true);
        let replaced = self.runs.insert(start, run);
        assert!(
            replaced.is_none(),
            "run at {start} replaced without removal"
        );
    }

    fn remove(&mut self, start: u64) -> Option<Run> {
        let run = self.runs.remove(&start)?;
        self.count(&run, false);
        Some(run)
    }

    /// Splits the run containing `at` (if it starts before) into two.
    fn split_at(&mut self, at: u64) {
        let Some((start, run)) = self
            .runs
            .range(..at)
            .next_back()
            .map(|(s, r)| (*s, *r))
            .filter(|(s, r)| s + r.block_count > at)
        else {
            return;
        };
        self.remove(start);
        self.insert(start, run.piece(0, at - start));
        self.insert(at, run.piece(at - start, start + run.block_count - at));
    }

    /// Rewrites `[lba, end)`: `decide(offset, len, old)` returns the new run
    /// (of exactly `len` blocks) for each existing run or gap of the range.
    fn update(
        &mut self,
        lba: u64,
        end: u64,
        mut decide: impl FnMut(u64, u64, Option<Run>) -> Option<Run>,
    ) {
        self.split_at(lba);
        self.split_at(end);
        let starts: Vec<u64> = self.runs.range(lba..end).map(|(s, _)| *s).collect();
        let mut pieces = Vec::with_capacity(starts.len() * 2 + 1);
        let mut cursor = lba;
        for start in starts {
            let Some(old) = self.remove(start) else {
                continue;
            };
            if cursor < start {
                pieces.push((cursor, decide(cursor - lba, start - cursor, None)));
            }
            pieces.push((start, decide(start - lba, old.block_count, Some(old))));
            cursor = start + old.block_count;
        }
        if cursor < end {
            pieces.push((cursor, decide(cursor - lba, end - cursor, None)));
        }
        for (start, run) in pieces {
            if let Some(run) = run {
                debug_assert!(run.block_count > 0);
                self.insert(start, run);
            }
        }
        self.merge(lba, end);
    }

    /// Merges contiguous runs from the one before `lba` through the one at `end`.
    fn merge(&mut self, lba: u64, end: u64) {
        let from = self.runs.range(..lba).next_back().map_or(lba, |(s, _)| *s);
        let starts: Vec<u64> = self.runs.range(from..=end).map(|(s, _)| *s).collect();
        let mut current: Option<(u64, Run)> = None;
        for start in starts {
            let Some(run) = self.runs.get(&start).copied() else {
                continue;
            };
            match current {
                Some((cs, cr)) if cs + cr.block_count == start && cr.continues_with(&run) => {
                    self.remove(start);
                    self.remove(cs);
                    let merged = Run {
                        block_count: cr.block_count + run.block_count,
                        ..cr
                    };
                    self.insert(cs, merged);
                    current = Some((cs, merged));
                }
                _ => current = Some((start, run)),
            }
        }
    }

    /// Encodes a checkpoint: header, runs, CRC-32C (little-endian).
    pub fn serialize(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            CHECKPOINT_HEADER_BYTES + self.runs.len() * CHECKPOINT_ENTRY_BYTES + 4,
        );
        out.extend_from_slice(&CHECKPOINT_MAGIC.to_le_bytes());
        out.extend_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.partition.volume.to_le_bytes());
        out.extend_from_slice(&self.partition.index.to_le_bytes());
        out.extend_from_slice(&self.size_blocks.to_le_bytes());
        out.extend_from_slice(&(self.runs.len() as u64).to_le_bytes());
        for (start, run) in &self.runs {
            out.extend_from_slice(&start.to_le_bytes());
            out.extend_from_slice(&run.block_count.to_le_bytes());
            out.extend_from_slice(&run.sequence.to_le_bytes());
            encode_location(&mut out, run.location);
        }
        // Version 2: the snapshot layers, each entry like a one-block run.
        out.extend_from_slice(&(self.snapshots.len() as u64).to_le_bytes());
        for (id, layer) in &self.snapshots {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&layer.cut.to_le_bytes());
            out.extend_from_slice(&(layer.entries.len() as u64).to_le_bytes());
            for (block, entry) in &layer.entries {
                out.extend_from_slice(&block.to_le_bytes());
                out.extend_from_slice(&entry.sequence.to_le_bytes());
                encode_location(&mut out, entry.location);
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and validates a checkpoint written by [`serialize`](Self::serialize).
    pub fn deserialize(bytes: &[u8]) -> Result<Self, IndexError> {
        let bad = |reason: String| IndexError::Checkpoint { reason };
        if bytes.len() < CHECKPOINT_HEADER_BYTES + 4 {
            return Err(bad(format!("{} bytes is too short", bytes.len())));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        let computed = crc32c::crc32c(body);
        if stored != computed {
            return Err(IndexError::CheckpointChecksum { stored, computed });
        }
        let mut reader = Reader::new(body, |reason| IndexError::Checkpoint { reason });
        let magic = reader.u64()?;
        if magic != CHECKPOINT_MAGIC {
            return Err(bad(format!("bad magic {magic:#x}")));
        }
        let version = reader.u16()?;
        if version != CHECKPOINT_VERSION && version != CHECKPOINT_VERSION_NO_SNAPSHOTS {
            return Err(IndexError::CheckpointVersion { found: version });
        }
        // Reserved, written as zero: anything else is not a checkpoint this
        // version wrote (and would not survive a rewrite unchanged).
        let reserved = reader.u16()?;
        if reserved != 0 {
            return Err(bad(format!("reserved field {reserved:#x} is not zero")));
        }
        let partition = PartitionId {
            volume: reader.u64()?,
            index: reader.u32()?,
        };
        let size_blocks = reader.u64()?;
        let run_count = reader.u64()?;
        let runs_bytes = body.len() - CHECKPOINT_HEADER_BYTES;
        let expected = runs_bytes / CHECKPOINT_ENTRY_BYTES;
        let exact = runs_bytes % CHECKPOINT_ENTRY_BYTES == 0 && run_count == expected as u64;
        // Version 1 is runs only; version 2 has the layers after them.
        let fits = run_count <= expected as u64;
        if (version == CHECKPOINT_VERSION_NO_SNAPSHOTS && !exact) || !fits {
            return Err(bad(format!(
                "{run_count} runs declared, {expected} present"
            )));
        }
        let mut index = PartitionIndex::new(partition, size_blocks);
        let mut previous_end = 0;
        for _ in 0..run_count {
            let start = reader.u64()?;
            let count = reader.u64()?;
            let sequence = reader.u64()?;
            let location = decode_location(&mut reader)?;
            let end = start
                .checked_add(count)
                .filter(|end| count > 0 && *end <= size_blocks);
            match end {
                Some(end) if start >= previous_end => previous_end = end,
                _ => return Err(bad(format!("run {start}+{count} overlaps or out of range"))),
            }
            index.insert(
                start,
                Run {
                    block_count: count,
                    sequence,
                    location,
                },
            );
        }
        if version == CHECKPOINT_VERSION {
            let snapshot_count = reader.u64()?;
            for _ in 0..snapshot_count {
                let id = reader.u64()?;
                let cut = reader.u64()?;
                let entry_count = reader.u64()?;
                if index.snapshots.contains_key(&id) {
                    return Err(bad(format!("snapshot {id} twice")));
                }
                index.snapshots.insert(
                    id,
                    SnapshotLayer {
                        cut,
                        entries: BTreeMap::new(),
                    },
                );
                let mut previous: Option<u64> = None;
                for _ in 0..entry_count {
                    let block = reader.u64()?;
                    let sequence = reader.u64()?;
                    let location = decode_location(&mut reader)?;
                    if block >= size_blocks || previous.is_some_and(|p| block <= p) {
                        return Err(bad(format!("snapshot {id}: entry for block {block}")));
                    }
                    previous = Some(block);
                    index.set_layer_entry(id, block, LayerEntry { sequence, location });
                }
            }
            if reader.at() != body.len() {
                return Err(bad(format!(
                    "{} bytes after the snapshot layers",
                    body.len() - reader.at()
                )));
            }
        }
        index
            .check_layers(false)
            .map_err(|reason| bad(format!("snapshot layers: {reason}")))?;
        Ok(index)
    }
}

/// Appends a location as a checkpoint's (tag, a, b, c) fields.
fn encode_location(out: &mut Vec<u8>, location: Option<Location>) {
    let (tag, a, b, c) = match location {
        None => (0u8, 0u64, 0u64, 0u32),
        Some(Location::Log {
            position,
            block_in_record,
        }) => (1, position.0, 0, block_in_record),
        Some(Location::Sled {
            extent,
            column,
            offset_bytes,
        }) => (2, extent, offset_bytes, u32::from(column)),
    };
    out.push(tag);
    out.extend_from_slice(&a.to_le_bytes());
    out.extend_from_slice(&b.to_le_bytes());
    out.extend_from_slice(&c.to_le_bytes());
}

/// Reads what [`encode_location`] wrote.
fn decode_location(reader: &mut Reader<'_, IndexError>) -> Result<Option<Location>, IndexError> {
    let bad = |reason: String| IndexError::Checkpoint { reason };
    let tag = reader.u8()?;
    let (a, b, c) = (reader.u64()?, reader.u64()?, reader.u32()?);
    // Fields a location does not use are written as zero: anything else
    // would decode to a location that encodes differently (the format is
    // canonical; the fuzzer found a tombstone with junk in them).
    let unused_zero = match tag {
        0 => a == 0 && b == 0 && c == 0,
        1 => b == 0,
        _ => true,
    };
    if !unused_zero {
        return Err(bad(format!(
            "location tag {tag} with nonzero unused fields ({a}, {b}, {c})"
        )));
    }
    Ok(match tag {
        0 => None,
        1 => Some(Location::Log {
            position: LogPosition(a),
            block_in_record: c,
        }),
        2 => Some(Location::Sled {
            extent: a,
            column: u16::try_from(c).map_err(|_| bad(format!("column {c}")))?,
            offset_bytes: b,
        }),
        other => return Err(bad(format!("location tag {other}"))),
    })
}

fn adjust(value: &mut u64, by: u64, add: bool) {
    if add {
        *value += by;
    } else {
        // An underflow means the counts no longer match the runs: the log
        // could be released behind a record a run still points at, or GC
        // could free an extent that still holds live blocks.
        assert!(*value >= by, "reference count underflow: {value} - {by}");
        *value -= by;
    }
}

/// Little-endian cursor over checkpoint bytes (the index's, and the
/// partition checkpoint's around it); reading past the end is the error
/// `truncated("truncated at byte N")`.
pub(crate) struct Reader<'a, E> {
    bytes: &'a [u8],
    at: usize,
    truncated: fn(String) -> E,
}

impl<'a, E> Reader<'a, E> {
    pub(crate) fn new(bytes: &'a [u8], truncated: fn(String) -> E) -> Self {
        Self {
            bytes,
            at: 0,
            truncated,
        }
    }
    /// Bytes read so far.
    pub(crate) fn at(&self) -> usize {
        self.at
    }
    /// Reads no further than byte `end` from now on.
    pub(crate) fn end_at(&mut self, end: usize) {
        self.bytes = &self.bytes[..end];
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], E> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| (self.truncated)(format!("truncated at byte {}", self.at)))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], E> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, E> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, E> {
        self.array().map(u16::from_le_bytes)
    }
    pub(crate) fn u32(&mut self) -> Result<u32, E> {
        self.array().map(u32::from_le_bytes)
    }
    pub(crate) fn u64(&mut self) -> Result<u64, E> {
        self.array().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Found by the `index_checkpoint` fuzz target: a checkpoint whose
    /// reserved header field was not zero decoded, and re-encoded to other
    /// bytes. It is refused now.
    #[test]
    fn checkpoint_with_a_nonzero_reserved_field_is_refused() {
        let index = PartitionIndex::new(
            PartitionId {
                volume: 1,
                index: 0,
            },
            64,
        );
        let mut bytes = index.serialize();
        assert!(PartitionIndex::deserialize(&bytes).is_ok());
        bytes[10] = 0x57;
        let body = bytes.len() - 4;
        let crc = crc32c::crc32c(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            PartitionIndex::deserialize(&bytes),
            Err(IndexError::Checkpoint { .. })
        ));
    }

    /// Found by the `index_checkpoint` fuzz target after snapshots merged:
    /// a location's unused fields (all three of a tombstone, the middle one
    /// of a log location) with junk in them decoded, and re-encoded as
    /// zeros. Refused now.
    #[test]
    fn checkpoint_location_with_junk_in_unused_fields_is_refused() {
        let mut index = PartitionIndex::new(
            PartitionId {
                volume: 1,
                index: 0,
            },
            64,
        );
        index.apply_unmap(0, 4, 1).unwrap();
        index
            .apply_write(
                8,
                2,
                2,
                Location::Log {
                    position: LogPosition(4096),
                    block_in_record: 0,
                },
            )
            .unwrap();
        let good = index.serialize();
        assert_eq!(
            PartitionIndex::deserialize(&good).unwrap().serialize(),
            good
        );
        // Run entries: start, count, sequence (24 bytes), then the location:
        // tag (1), a (8), b (8), c (4).
        let first_location = CHECKPOINT_HEADER_BYTES + 24;
        let second_location = first_location + CHECKPOINT_ENTRY_BYTES;
        for (at, what) in [
            (first_location + 1, "a tombstone's a"),
            (first_location + 9, "a tombstone's b"),
            (first_location + 17, "a tombstone's c"),
            (second_location + 9, "a log location's b"),
        ] {
            let mut bytes = good.clone();
            bytes[at] = 0x10;
            let body = bytes.len() - 4;
            let crc = crc32c::crc32c(&bytes[..body]);
            bytes[body..].copy_from_slice(&crc.to_le_bytes());
            assert!(
                matches!(
                    PartitionIndex::deserialize(&bytes),
                    Err(IndexError::Checkpoint { .. })
                ),
                "{what} with junk decoded"
            );
        }
    }

    /// [`PartitionIndex::lookup`] as (blocks, location) pairs.
    fn lookup(index: &PartitionIndex, lba: u64, count: u64) -> Vec<(Range<u64>, Option<Location>)> {
        let pieces = index.lookup(lba, count).unwrap();
        pieces
            .into_iter()
            .map(|piece| (piece.lbas, piece.location))
            .collect()
    }

    fn p() -> PartitionId {
        PartitionId {
            volume: 7,
            index: 2,
        }
    }

    fn log(position: u64) -> Location {
        Location::Log {
            position: LogPosition(position),
            block_in_record: 0,
        }
    }

    fn sled(extent: u64, offset_blocks: u64) -> Location {
        Location::Sled {
            extent,
            column: 1,
            offset_bytes: offset_blocks * BLOCK_SIZE_BYTES,
        }
    }

    #[test]
    fn overlapping_writes_split_and_newest_wins() {
        let mut index = PartitionIndex::new(p(), 100);
        index.apply_write(10, 10, 1, log(0)).unwrap();
        index.apply_write(12, 2, 2, log(8192)).unwrap();
        // An older write arriving late does not override the newer blocks.
        index.apply_write(11, 4, 0, log(4096 * 9)).unwrap();
        let got = lookup(&index, 8, 14);
        assert_eq!(
            got,
            vec![
                (8..10, None),
                (10..12, Some(log(0))),
                (12..14, Some(log(8192))),
                (
                    14..20,
                    Some(Location::Log {
                        position: LogPosition(0),
                        block_in_record: 4
                    })
                ),
                (20..22, None),
            ]
        );
        index.check_invariants().unwrap();
        assert_eq!(index.oldest_log_position(), Some(LogPosition(0)));
    }

    #[test]
    fn flush_keeps_newer_log_writes() {
        let mut index = PartitionIndex::new(p(), 100);
        index.apply_write(0, 8, 1, log(0)).unwrap();
        index.apply_write(4, 1, 5, log(40960)).unwrap();
        let moved = index.apply_flush(0, 8, 1, sled(3, 0)).unwrap();
        assert_eq!(moved, 7);
        assert_eq!(lookup(&index, 4, 1), vec![(4..5, Some(log(40960)))]);
        assert_eq!(lookup(&index, 5, 1), vec![(5..6, Some(sled(3, 5)))]);
        assert_eq!(index.live_blocks_per_extent().get(&3), Some(&7));
        assert_eq!(index.oldest_log_position(), Some(LogPosition(40960)));
        assert_eq!(
            index.entries_referencing_log_before(LogPosition(40960)),
            vec![]
        );
        assert_eq!(
            index.entries_referencing_log_before(LogPosition(40961)),
            vec![(4..5, log(40960))]
        );
        // Unmap of flushed data frees the extent's blocks.
        index.apply_unmap(0, 8, 6).unwrap();
        assert!(index.live_blocks_per_extent().is_empty());
        assert_eq!(lookup(&index, 0, 8), vec![(0..8, None)]);
        assert_eq!(index.run_count(), 1);
        index.check_invariants().unwrap();
    }

    #[test]
    fn range_is_checked() {
        let mut index = PartitionIndex::new(p(), 10);
        assert!(matches!(
            index.apply_write(8, 3, 1, log(0)),
            Err(IndexError::OutOfRange {
                lba: 8,
                block_count: 3,
                ..
            })
        ));
        assert!(index.apply_unmap(0, 0, 1).is_err());
        assert!(index.lookup(u64::MAX, 2).is_err());
    }

    #[test]
    fn checkpoint_round_trips_and_rejects_corruption() {
        let mut index = PartitionIndex::new(p(), 1000);
        index.apply_write(0, 100, 1, log(0)).unwrap();
        index.apply_flush(10, 20, 1, sled(9, 0)).unwrap();
        index.apply_unmap(50, 5, 2).unwrap();
        let bytes = index.serialize();
        let back = PartitionIndex::deserialize(&bytes).unwrap();
        assert_eq!(back, index);
        for at in [0, 9, 30, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(PartitionIndex::deserialize(&bad).is_err(), "flip at {at}");
        }
        assert!(PartitionIndex::deserialize(&bytes[..bytes.len() - 5]).is_err());
    }
}
