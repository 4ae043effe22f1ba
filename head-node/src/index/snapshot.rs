//! Snapshot layers of a [`PartitionIndex`]: copy-on-write views of the
//! partition at a cut sequence (pure, sans-IO).
//!
//! A snapshot of the partition is a **cut** `S`: it holds every write and
//! unmap with a sequence below `S` and none at or above it (the cut is a
//! sequence of the partition's order, assigned by the primary under the
//! same lock as every write's, so "below S" is exactly "ordered before the
//! cut"). The live index already holds the snapshot's view of every block
//! whose newest version is older than `S`; only blocks a newer operation
//! overwrote need more, and that is the snapshot's **layer**: one entry per
//! such block, the newest version with a sequence below `S` (a location,
//! or a tombstone when that version was an unmap).
//!
//! * A post-cut operation (sequence `>= S`) that replaces a live version
//!   older than `S` moves that version into the layer first.
//! * A late pre-cut operation (sequence `< S`, applied after a post-cut one
//!   on the same block: completions, replay and recovery apply out of
//!   order) that is newer than the layer's entry replaces it.
//! * A read of the snapshot is the layer's entry if there is one, else the
//!   live version if its sequence is below `S`, else zeros (the block was
//!   never written before the cut).
//!
//! Layer entries are counted in the same per-extent live counts and
//! per-log-record reference counts as the live runs: GC never frees an
//! extent a snapshot still references, and the log is never released under
//! a record a snapshot maps. A flush moves a layer's log-resident entries to
//! the sleds like live ones ([`PartitionIndex::apply_flush`]); dropping a
//! snapshot uncounts its layer, so GC reclaims what only it held.
//!
//! Entries are per block (a `BTreeMap` from block to entry): a layer only
//! grows with the blocks overwritten after its cut.
//!
//! **Diffs and exclusive space.** Two views (the live index or a snapshot)
//! differ at a block unless both read zeros or both hold the same version
//! (the same sequence, wherever it lives now): [`PartitionIndex::diff_page`]
//! finds those blocks from the index alone, a page at a time, marking the
//! ranges the newer view reads as zeros (trimmed or unmapped since). A
//! snapshot holds a block *exclusively* when its layer maps a version no
//! other layer maps (a layer entry is never the live version: the live
//! index holds a post-cut one there, and a snapshot that falls through to
//! the live index reads that one); dropping the snapshot frees exactly
//! those blocks ([`SnapshotInfo::exclusive_blocks`]).

use std::collections::BTreeMap;
use std::ops::Range;

use super::{IndexError, Location, Mapped, PartitionIndex, Run};

/// One block's version in a snapshot layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerEntry {
    /// Sequence of the operation that produced it (below the cut).
    pub sequence: u64,
    /// Where the block is; `None`: a tombstone (zeros).
    pub location: Option<Location>,
}

/// The copy-on-write layer of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotLayer {
    /// The cut: the snapshot holds the operations with a lower sequence.
    pub cut: u64,
    /// Pre-cut versions of the blocks overwritten since, by block.
    pub entries: BTreeMap<u64, LayerEntry>,
}

impl SnapshotLayer {
    /// Blocks the layer maps to a location (pinned by the snapshot alone).
    pub fn mapped_blocks(&self) -> u64 {
        self.entries
            .values()
            .filter(|e| e.location.is_some())
            .count() as u64
    }
}

/// Summary of one snapshot of the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Snapshot id (unit-wide, from the control plane).
    pub id: u64,
    /// Cut sequence.
    pub cut: u64,
    /// Blocks this snapshot's layer maps (data it pins, maybe shared with
    /// other snapshots' layers).
    pub pinned_blocks: u64,
    /// Of those, the blocks no other snapshot's layer maps: what dropping
    /// this snapshot alone makes reclaimable.
    pub exclusive_blocks: u64,
}

/// One range of a diff between two views of the partition (blocks
/// relative to the partition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffRange {
    /// The blocks that read differently.
    pub blocks: Range<u64>,
    /// The newer (`to`) view reads zeros there (trimmed, unmapped, or not
    /// written in it).
    pub zero: bool,
}

/// A view of the partition a diff compares: the empty partition (nothing
/// ever written: a diff from it is the other view's allocation map), the
/// live volume, or a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View {
    Empty,
    Live,
    Snapshot(u64),
}

impl View {
    /// `None`: live, `Some(id)`: snapshot `id` (the diff API's views).
    fn of(view: Option<u64>) -> View {
        view.map_or(View::Live, View::Snapshot)
    }
}

/// Blocks of one view compared at a time by [`PartitionIndex::diff_page`]
/// (bounds the memory of a diff of a large partition).
const DIFF_WINDOW_BLOCKS: u64 = 1 << 16;

impl PartitionIndex {
    /// Starts snapshot `id` at cut `cut` (an empty layer: until a post-cut
    /// operation is applied, the live index is its view). Idempotent for
    /// the same cut (replay of the cut record); another cut for an existing
    /// id is refused.
    pub fn add_snapshot(&mut self, id: u64, cut: u64) -> Result<(), IndexError> {
        if let Some(layer) = self.snapshots.get(&id) {
            if layer.cut == cut {
                return Ok(());
            }
            return Err(IndexError::Snapshot {
                id,
                reason: format!("exists with cut {}, not {cut}", layer.cut),
            });
        }
        // Operations at or above the cut applied before it was known would
        // have replaced pre-cut versions without saving them.
        if let Some((lba, run)) = self.runs.iter().find(|(_, r)| r.sequence >= cut) {
            return Err(IndexError::Snapshot {
                id,
                reason: format!(
                    "block {lba} already holds sequence {} at or after the cut {cut}",
                    run.sequence
                ),
            });
        }
        self.snapshots.insert(
            id,
            SnapshotLayer {
                cut,
                entries: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Drops snapshot `id` and uncounts its layer (what only it referenced
    /// becomes reclaimable). Returns whether it existed.
    pub fn drop_snapshot(&mut self, id: u64) -> bool {
        let Some(layer) = self.snapshots.remove(&id) else {
            return false;
        };
        for entry in layer.entries.values() {
            self.count_entry(entry, false);
        }
        true
    }

    /// The snapshots of the partition, by id, with the blocks each pins
    /// and holds exclusively (module docs).
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        // How many layers map each (block, sequence) version.
        let mut holders: std::collections::HashMap<(u64, u64), u32> =
            std::collections::HashMap::new();
        for layer in self.snapshots.values() {
            for (block, entry) in &layer.entries {
                if entry.location.is_some() {
                    *holders.entry((*block, entry.sequence)).or_default() += 1;
                }
            }
        }
        self.snapshots
            .iter()
            .map(|(id, layer)| SnapshotInfo {
                id: *id,
                cut: layer.cut,
                pinned_blocks: layer.mapped_blocks(),
                exclusive_blocks: layer
                    .entries
                    .iter()
                    .filter(|(block, e)| {
                        e.location.is_some() && holders.get(&(**block, e.sequence)) == Some(&1)
                    })
                    .count() as u64,
            })
            .collect()
    }

    /// Every snapshot layer, by id.
    pub fn snapshot_layers(&self) -> impl Iterator<Item = (u64, &SnapshotLayer)> + '_ {
        self.snapshots.iter().map(|(id, layer)| (*id, layer))
    }

    /// Puts snapshot `id`'s layer back as a checkpoint holds it (`entries`
    /// replace any of the same block); the live runs may already hold
    /// post-cut versions.
    pub fn restore_layer(
        &mut self,
        id: u64,
        cut: u64,
        entries: impl IntoIterator<Item = (u64, LayerEntry)>,
    ) {
        self.snapshots.entry(id).or_insert_with(|| SnapshotLayer {
            cut,
            entries: BTreeMap::new(),
        });
        for (block, entry) in entries {
            self.set_layer_entry(id, block, entry);
        }
    }

    /// Snapshot `id`'s layer, if it exists.
    pub fn snapshot_layer(&self, id: u64) -> Option<&SnapshotLayer> {
        self.snapshots.get(&id)
    }

    /// Blocks mapped by snapshot layers (all snapshots), for metrics.
    pub fn snapshot_pinned_blocks(&self) -> u64 {
        self.snapshots
            .values()
            .map(SnapshotLayer::mapped_blocks)
            .sum()
    }

    /// Where blocks `lba..lba+count` of snapshot `id` are, covering exactly
    /// the range (`location: None`: zeros).
    pub fn lookup_snapshot(
        &self,
        id: u64,
        lba: u64,
        count: u64,
    ) -> Result<Vec<Mapped>, IndexError> {
        let layer = self.snapshots.get(&id).ok_or(IndexError::Snapshot {
            id,
            reason: "no such snapshot".to_string(),
        })?;
        let live = self.lookup_with_sequence(lba, count)?;
        let mut out: Vec<Mapped> = Vec::new();
        let mut push = |lbas: Range<u64>, location: Option<Location>, sequence: Option<u64>| {
            if let Some(last) = out.last_mut() {
                let contiguous = match (last.location, location) {
                    (None, None) => last.sequence == sequence,
                    (Some(a), Some(b)) => {
                        last.sequence == sequence
                            && a.advanced(last.lbas.end - last.lbas.start) == b
                    }
                    _ => false,
                };
                if contiguous && last.lbas.end == lbas.start {
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
        for piece in live {
            match piece.sequence {
                Some(s) if s >= layer.cut => {
                    // Overwritten after the cut: the layer's entry, or zeros.
                    for block in piece.lbas.clone() {
                        match layer.entries.get(&block) {
                            Some(e) => push(block..block + 1, e.location, Some(e.sequence)),
                            None => push(block..block + 1, None, None),
                        }
                    }
                }
                _ => push(piece.lbas, piece.location, piece.sequence),
            }
        }
        Ok(out)
    }

    /// The blocks of `lba..lba+count` that read differently in view `to`
    /// than in view `from` (`None`: the live volume, `Some(id)`: snapshot
    /// `id`), as ranges in block order, from the index alone (no data
    /// read): a block differs unless both views read zeros or hold the
    /// same version (the same sequence, wherever it is now).
    pub fn diff_views(
        &self,
        from: Option<u64>,
        to: Option<u64>,
        lba: u64,
        count: u64,
    ) -> Result<Vec<Range<u64>>, IndexError> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for range in self.diff_window(View::of(from), View::of(to), lba, count)? {
            match out.last_mut() {
                Some(last) if last.end == range.blocks.start => last.end = range.blocks.end,
                _ => out.push(range.blocks),
            }
        }
        Ok(out)
    }

    /// One page of the diff of `from` → `to` (see
    /// [`diff_views`](Self::diff_views)) from block `start`: at most
    /// `max_ranges` ranges (at least one) found in at most `scan_blocks`
    /// blocks (at least one; bounds the time a page holds the index), each
    /// marked `zero` when `to` reads zeros there, adjacent ranges merged
    /// when they agree on that. Returns the page and the block the next
    /// page starts at (`None`: this page reaches the partition's end).
    /// The pages' ranges joined are the whole diff; a range may be split
    /// where a page ends (a reader merges adjacent ranges of one kind).
    pub fn diff_page(
        &self,
        from: Option<u64>,
        to: Option<u64>,
        start: u64,
        max_ranges: usize,
        scan_blocks: u64,
    ) -> Result<(Vec<DiffRange>, Option<u64>), IndexError> {
        self.page(View::of(from), View::of(to), start, max_ranges, scan_blocks)
    }

    /// One page of the allocation map of `view` (`None`: the live volume,
    /// `Some(id)`: snapshot `id`) from block `start`: the blocks that hold
    /// data in it (written and not trimmed, whatever the data), as ranges
    /// (`zero` false), paged like [`diff_page`](Self::diff_page) (it is
    /// the diff from the empty partition). From the index alone: the
    /// blocks outside need no read, they read as zeros.
    pub fn map_page(
        &self,
        view: Option<u64>,
        start: u64,
        max_ranges: usize,
        scan_blocks: u64,
    ) -> Result<(Vec<DiffRange>, Option<u64>), IndexError> {
        self.page(View::Empty, View::of(view), start, max_ranges, scan_blocks)
    }

    fn page(
        &self,
        from: View,
        to: View,
        start: u64,
        max_ranges: usize,
        scan_blocks: u64,
    ) -> Result<(Vec<DiffRange>, Option<u64>), IndexError> {
        let max_ranges = max_ranges.max(1);
        let end = start
            .saturating_add(scan_blocks.max(1))
            .min(self.size_blocks);
        let mut out: Vec<DiffRange> = Vec::new();
        let mut at = start;
        while at < end {
            let count = DIFF_WINDOW_BLOCKS.min(end - at);
            for range in self.diff_window(from, to, at, count)? {
                match out.last_mut() {
                    Some(last)
                        if last.blocks.end == range.blocks.start && last.zero == range.zero =>
                    {
                        last.blocks.end = range.blocks.end;
                    }
                    _ => out.push(range),
                }
            }
            at += count;
            // One range more than the page holds: the page's last range is
            // complete (another one follows it).
            if out.len() > max_ranges {
                let next = out[max_ranges].blocks.start;
                out.truncate(max_ranges);
                return Ok((out, Some(next)));
            }
        }
        Ok((out, (at < self.size_blocks).then_some(at)))
    }

    /// The differing blocks of `lba..lba+count`, as ranges split where
    /// `to` starts or stops reading zeros.
    fn diff_window(
        &self,
        from: View,
        to: View,
        lba: u64,
        count: u64,
    ) -> Result<Vec<DiffRange>, IndexError> {
        let view = |v: View| -> Result<Vec<Option<u64>>, IndexError> {
            let mapped = match v {
                View::Empty => return Ok(vec![None; count as usize]),
                View::Live => self.lookup_with_sequence(lba, count)?,
                View::Snapshot(id) => self.lookup_snapshot(id, lba, count)?,
            };
            Ok(mapped
                .into_iter()
                .flat_map(|m| {
                    let version = m.location.and(m.sequence);
                    (m.lbas.start..m.lbas.end).map(move |_| version)
                })
                .collect())
        };
        let (a, b) = (view(from)?, view(to)?);
        let mut out: Vec<DiffRange> = Vec::new();
        for (offset, (x, y)) in a.iter().zip(&b).enumerate() {
            if x == y {
                continue;
            }
            let block = lba + offset as u64;
            let zero = y.is_none();
            match out.last_mut() {
                Some(last) if last.blocks.end == block && last.zero == zero => {
                    last.blocks.end = block + 1;
                }
                _ => out.push(DiffRange {
                    blocks: block..block + 1,
                    zero,
                }),
            }
        }
        Ok(out)
    }

    /// Before `lba..lba+count` takes operation `sequence` (block `lba + i`
    /// at `location.advanced(i)`, or a tombstone): saves the pre-cut
    /// versions it replaces into the layers, and takes it into the layers
    /// it is a late pre-cut version for (see the module docs).
    pub(super) fn snapshot_before_update(
        &mut self,
        lba: u64,
        count: u64,
        sequence: u64,
        location: Option<Location>,
    ) -> Result<(), IndexError> {
        if self.snapshots.is_empty() {
            return Ok(());
        }
        let live = self.lookup_with_sequence(lba, count)?;
        let mut changes: Vec<(u64, u64, LayerEntry)> = Vec::new();
        for (id, layer) in &self.snapshots {
            let cut = layer.cut;
            for piece in &live {
                let Some(old) = piece.sequence else {
                    // A gap: nothing pre-cut to save, and a late pre-cut
                    // write to a gap simply goes live (below the cut).
                    continue;
                };
                for block in piece.lbas.clone() {
                    let offset = block - lba;
                    if sequence >= cut && old < cut && sequence > old {
                        // Post-cut replaces pre-cut: save the old version.
                        let entry = LayerEntry {
                            sequence: old,
                            location: piece.location.map(|l| l.advanced(block - piece.lbas.start)),
                        };
                        changes.push((*id, block, entry));
                    } else if sequence < cut && old >= cut {
                        // A late pre-cut version of a block overwritten
                        // after the cut: the layer keeps the newest.
                        let newer = layer
                            .entries
                            .get(&block)
                            .is_none_or(|e| e.sequence < sequence);
                        if newer {
                            let entry = LayerEntry {
                                sequence,
                                location: location.map(|l| l.advanced(offset)),
                            };
                            changes.push((*id, block, entry));
                        }
                    }
                }
            }
        }
        for (id, block, entry) in changes {
            self.set_layer_entry(id, block, entry);
        }
        Ok(())
    }

    /// A flush moved the data of `sequence` for `lba..lba+count` to the
    /// sleds at `location`: layer entries of that sequence still in the log
    /// move too. Returns how many did.
    pub(super) fn snapshot_flushed(
        &mut self,
        lba: u64,
        count: u64,
        sequence: u64,
        location: Location,
    ) -> u64 {
        let mut changes = Vec::new();
        for (id, layer) in &self.snapshots {
            for (block, entry) in layer.entries.range(lba..lba + count) {
                if entry.sequence == sequence
                    && matches!(entry.location, Some(Location::Log { .. }))
                {
                    let moved = LayerEntry {
                        sequence,
                        location: Some(location.advanced(block - lba)),
                    };
                    changes.push((*id, *block, moved));
                }
            }
        }
        let moved = changes.len() as u64;
        for (id, block, entry) in changes {
            self.set_layer_entry(id, block, entry);
        }
        moved
    }

    /// Log-resident layer entries (block, entry), for the flush plan, in
    /// block order per snapshot.
    pub fn snapshot_log_entries(&self) -> Vec<(u64, LayerEntry)> {
        let mut out: Vec<(u64, LayerEntry)> = self
            .snapshots
            .values()
            .flat_map(|layer| layer.entries.iter())
            .filter(|(_, e)| matches!(e.location, Some(Location::Log { .. })))
            .map(|(block, e)| (*block, *e))
            .collect();
        out.sort_by_key(|(block, e)| (*block, e.sequence));
        out.dedup();
        out
    }

    pub(super) fn set_layer_entry(&mut self, id: u64, block: u64, entry: LayerEntry) {
        let previous = self
            .snapshots
            .get_mut(&id)
            .and_then(|layer| layer.entries.insert(block, entry));
        if let Some(previous) = previous {
            self.count_entry(&previous, false);
        }
        self.count_entry(&entry, true);
    }

    fn count_entry(&mut self, entry: &LayerEntry, add: bool) {
        let run = Run {
            block_count: 1,
            sequence: entry.sequence,
            location: entry.location,
        };
        self.count(&run, add);
    }

    /// The layers' part of [`PartitionIndex::check_invariants`]: every
    /// entry is below its cut on a block the live index holds at or after
    /// the cut; returns the entries as runs for the recount.
    pub(super) fn check_layers(&self, strict: bool) -> Result<Vec<Run>, String> {
        let mut runs = Vec::new();
        for (id, layer) in &self.snapshots {
            for (block, entry) in &layer.entries {
                if entry.sequence >= layer.cut || *block >= self.size_blocks {
                    return Err(format!(
                        "snapshot {id}: entry for block {block} at sequence {} (cut {})",
                        entry.sequence, layer.cut
                    ));
                }
                let live = self
                    .lookup_with_sequence(*block, 1)
                    .map_err(|e| e.to_string())?;
                // A checkpoint leaves log-resident live runs out (`strict`
                // off: a gap there is a post-cut write the log replays).
                let replaced = match live.first().and_then(|m| m.sequence) {
                    Some(s) => s >= layer.cut,
                    None => !strict,
                };
                if !replaced {
                    return Err(format!(
                        "snapshot {id}: entry for block {block} that no post-cut operation replaced"
                    ));
                }
                runs.push(Run {
                    block_count: 1,
                    sequence: entry.sequence,
                    location: entry.location,
                });
            }
        }
        Ok(runs)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;
    use proto::sled::PartitionId;
    use proto::BLOCK_SIZE_BYTES;

    use super::*;
    use crate::wal::LogPosition;

    const BLOCKS: u64 = 64;

    fn index() -> PartitionIndex {
        PartitionIndex::new(
            PartitionId {
                volume: 3,
                index: 1,
            },
            BLOCKS,
        )
    }

    /// One generated operation, applied `delay` steps after its sequence.
    #[derive(Debug, Clone)]
    enum Op {
        Write { lba: u64, count: u64 },
        Unmap { lba: u64, count: u64 },
        Cut,
        FlushLive { pick: usize },
        FlushLayers,
        Drop { pick: usize },
    }

    fn op() -> impl Strategy<Value = (Op, u8)> {
        let range = (0..BLOCKS).prop_flat_map(|lba| (Just(lba), 1..=(BLOCKS - lba).min(9)));
        let op = prop_oneof![
            6 => range.clone().prop_map(|(lba, count)| Op::Write { lba, count }),
            2 => range.prop_map(|(lba, count)| Op::Unmap { lba, count }),
            1 => Just(Op::Cut),
            2 => any::<usize>().prop_map(|pick| Op::FlushLive { pick }),
            1 => Just(Op::FlushLayers),
            1 => any::<usize>().prop_map(|pick| Op::Drop { pick }),
        ];
        (op, 0u8..4)
    }

    /// Content identity of a block: (sequence of its write, block it was
    /// written to), or `None` (zeros).
    type Content = Option<(u64, u64)>;

    struct Model {
        /// Every applied write or unmap per block: sequence → content.
        versions: BTreeMap<u64, BTreeMap<u64, Content>>,
        /// Log position → (sequence, first block) of its write.
        records: BTreeMap<u64, (u64, u64)>,
        /// Extent → (sequence, first block at offset 0) of its flush.
        extents: BTreeMap<u64, (u64, u64)>,
        /// Live snapshots: id → cut.
        cuts: BTreeMap<u64, u64>,
    }

    impl Model {
        fn content(&self, location: Option<Location>) -> Content {
            match location? {
                Location::Log {
                    position,
                    block_in_record,
                } => {
                    let (sequence, lba) = self.records[&position.0];
                    Some((sequence, lba + u64::from(block_in_record)))
                }
                Location::Sled {
                    extent,
                    offset_bytes,
                    ..
                } => {
                    let (sequence, lba) = self.extents[&extent];
                    Some((sequence, lba + offset_bytes / BLOCK_SIZE_BYTES))
                }
            }
        }

        /// The newest applied version below `cut` of `block`.
        fn expected(&self, block: u64, cut: u64) -> Content {
            self.versions
                .get(&block)
                .and_then(|v| v.range(..cut).next_back())
                .and_then(|(_, c)| *c)
        }

        fn check(&self, index: &PartitionIndex) {
            index.check_invariants().unwrap();
            let read = |pieces: Vec<Mapped>| -> Vec<Content> {
                pieces
                    .iter()
                    .flat_map(|m| {
                        let base = m.location;
                        (0..m.lbas.end - m.lbas.start)
                            .map(move |i| base.map(|l| l.advanced(i)))
                            .collect::<Vec<_>>()
                    })
                    .map(|l| self.content(l))
                    .collect()
            };
            let live = read(index.lookup_with_sequence(0, BLOCKS).unwrap());
            for block in 0..BLOCKS {
                assert_eq!(
                    live[block as usize],
                    self.expected(block, u64::MAX),
                    "live {block}"
                );
            }
            for (id, cut) in &self.cuts {
                let view = read(index.lookup_snapshot(*id, 0, BLOCKS).unwrap());
                for block in 0..BLOCKS {
                    assert_eq!(
                        view[block as usize],
                        self.expected(block, *cut),
                        "snapshot {id} (cut {cut}) block {block}"
                    );
                }
                // A partial read agrees with the whole one.
                let part = read(index.lookup_snapshot(*id, 5, 20).unwrap());
                assert_eq!(part[..], view[5..25]);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random writes, unmaps, cuts, flushes (of live and layer blocks)
        /// and drops, applied partly out of sequence order (a write may be
        /// applied up to three steps late, never before a cut it follows):
        /// every snapshot reads as the newest version below its cut, the
        /// live index as the newest version, the counts equal a recount,
        /// a checkpoint round-trips, and dropping every snapshot leaves the
        /// counts of the live runs alone.
        #[test]
        fn snapshots_read_as_the_model(ops in proptest::collection::vec(op(), 1..80)) {
            let mut index = index();
            let mut model = Model {
                versions: BTreeMap::new(),
                records: BTreeMap::new(),
                extents: BTreeMap::new(),
                cuts: BTreeMap::new(),
            };
            // Sequence i + 1 for op i; the apply order is by (sequence +
            // delay), a cut with no delay and nothing after it before it.
            let mut order: Vec<(u64, u64, usize)> = Vec::new();
            let mut last_cut = 0;
            for (i, (op, delay)) in ops.iter().enumerate() {
                let sequence = i as u64 + 1;
                let key = match op {
                    Op::Cut => sequence,
                    _ => (sequence + u64::from(*delay)).max(last_cut),
                };
                if matches!(op, Op::Cut) {
                    last_cut = sequence;
                }
                order.push((key, sequence, i));
            }
            order.sort();
            let mut next_extent = 1000;
            for (_, sequence, i) in order {
                match &ops[i].0 {
                    Op::Write { lba, count } => {
                        let position = sequence * 4096;
                        model.records.insert(position, (sequence, *lba));
                        index.apply_write(*lba, *count, sequence, Location::Log {
                            position: LogPosition(position),
                            block_in_record: 0,
                        }).unwrap();
                        for block in *lba..lba + count {
                            model.versions.entry(block).or_default().insert(sequence, Some((sequence, block)));
                        }
                    }
                    Op::Unmap { lba, count } => {
                        index.apply_unmap(*lba, *count, sequence).unwrap();
                        for block in *lba..lba + count {
                            model.versions.entry(block).or_default().insert(sequence, None);
                        }
                    }
                    Op::Cut => {
                        index.add_snapshot(sequence, sequence).unwrap();
                        model.cuts.insert(sequence, sequence);
                    }
                    Op::FlushLive { pick } => {
                        let logged: Vec<Mapped> = index
                            .lookup_with_sequence(0, BLOCKS)
                            .unwrap()
                            .into_iter()
                            .filter(|m| matches!(m.location, Some(Location::Log { .. })))
                            .collect();
                        if let Some(m) = logged.get(pick % logged.len().max(1)) {
                            let (seq, first) = (m.sequence.unwrap(), m.lbas.start);
                            next_extent += 1;
                            model.extents.insert(next_extent, (seq, first));
                            index.apply_flush(first, m.lbas.end - first, seq, Location::Sled {
                                extent: next_extent,
                                column: 0,
                                offset_bytes: 0,
                            }).unwrap();
                        }
                    }
                    Op::FlushLayers => {
                        for (block, entry) in index.snapshot_log_entries() {
                            next_extent += 1;
                            model.extents.insert(next_extent, (entry.sequence, block));
                            index.apply_flush(block, 1, entry.sequence, Location::Sled {
                                extent: next_extent,
                                column: 0,
                                offset_bytes: 0,
                            }).unwrap();
                        }
                        prop_assert!(index.snapshot_log_entries().is_empty());
                    }
                    Op::Drop { pick } => {
                        let ids: Vec<u64> = model.cuts.keys().copied().collect();
                        if let Some(id) = ids.get(pick % ids.len().max(1)) {
                            prop_assert!(index.drop_snapshot(*id));
                            model.cuts.remove(id);
                        }
                    }
                }
                model.check(&index);
            }
            // Diffs between every pair of views equal the model's.
            let views: Vec<(Option<u64>, u64)> = std::iter::once((None, u64::MAX))
                .chain(model.cuts.iter().map(|(id, cut)| (Some(*id), *cut)))
                .collect();
            // Each view's allocation map, paged, is exactly the blocks
            // that read data in it (the model's non-zero versions).
            for (view, cut) in &views {
                for (page, scan) in [(1usize, u64::MAX), (2, 7), (1000, u64::MAX)] {
                    let mut start = Some(0);
                    let mut blocks: Vec<u64> = Vec::new();
                    let mut pages = 0;
                    while let Some(at) = start {
                        let (got, next) = index.map_page(*view, at, page, scan).unwrap();
                        prop_assert!(got.len() <= page);
                        prop_assert!(next.is_none_or(|n| n > at));
                        prop_assert!(got.iter().all(|r| !r.zero && r.blocks.start >= at));
                        blocks.extend(got.into_iter().flat_map(|r| r.blocks));
                        start = next;
                        pages += 1;
                        prop_assert!(pages <= BLOCKS + 1);
                    }
                    let want: Vec<u64> = (0..BLOCKS)
                        .filter(|b| model.expected(*b, *cut).is_some())
                        .collect();
                    prop_assert_eq!(&blocks, &want, "map of {:?}, pages of {}", view, page);
                }
            }
            for (from, from_cut) in &views {
                for (to, to_cut) in &views {
                    let got: Vec<u64> = index
                        .diff_views(*from, *to, 0, BLOCKS)
                        .unwrap()
                        .into_iter()
                        .flatten()
                        .collect();
                    let want: Vec<u64> = (0..BLOCKS)
                        .filter(|b| model.expected(*b, *from_cut) != model.expected(*b, *to_cut))
                        .collect();
                    prop_assert_eq!(&got, &want, "diff {:?} -> {:?}", from, to);
                    // Paged (a few ranges a page, from a few starts), the
                    // pages join into the same blocks, each range marked
                    // zero exactly when `to` reads zeros there, no two
                    // adjacent ranges of one kind left unmerged.
                    for (page, scan) in [(1usize, u64::MAX), (2, 7), (3, u64::MAX), (1000, 5), (1000, u64::MAX)] {
                        let mut start = Some(0);
                        let mut ranges: Vec<DiffRange> = Vec::new();
                        let mut pages = 0;
                        while let Some(at) = start {
                            let (got, next) = index.diff_page(*from, *to, at, page, scan).unwrap();
                            prop_assert!(got.len() <= page);
                            prop_assert!(next.is_none_or(|n| n > at));
                            prop_assert!(got.iter().all(|r| r.blocks.start >= at && next.is_none_or(|n| r.blocks.end <= n)));
                            // The reader's merge of a range split by a page end.
                            for range in got {
                                match ranges.last_mut() {
                                    Some(last) if last.blocks.end == range.blocks.start && last.zero == range.zero => {
                                        last.blocks.end = range.blocks.end;
                                    }
                                    _ => ranges.push(range),
                                }
                            }
                            start = next;
                            pages += 1;
                            prop_assert!(pages <= BLOCKS + 1);
                        }
                        let blocks: Vec<u64> = ranges.iter().flat_map(|r| r.blocks.clone()).collect();
                        prop_assert_eq!(&blocks, &want, "paged {} diff {:?} -> {:?}", page, from, to);
                        for r in &ranges {
                            for b in r.blocks.clone() {
                                prop_assert_eq!(r.zero, model.expected(b, *to_cut).is_none());
                            }
                        }
                        for pair in ranges.windows(2) {
                            prop_assert!(
                                pair[0].blocks.end < pair[1].blocks.start || pair[0].zero != pair[1].zero,
                                "unmerged {:?}", pair
                            );
                        }
                    }
                }
            }
            // Exclusive blocks: a snapshot's data version of a block that
            // neither the live volume nor any other snapshot reads.
            for info in index.snapshots() {
                let cut = model.cuts[&info.id];
                let exclusive = (0..BLOCKS)
                    .filter(|b| {
                        let mine = model.expected(*b, cut);
                        mine.is_some()
                            && mine != model.expected(*b, u64::MAX)
                            && model
                                .cuts
                                .iter()
                                .all(|(id, c)| *id == info.id || model.expected(*b, *c) != mine)
                    })
                    .count() as u64;
                prop_assert_eq!(info.exclusive_blocks, exclusive, "snapshot {}", info.id);
                prop_assert!(info.exclusive_blocks <= info.pinned_blocks);
            }
            let bytes = index.serialize();
            let back = PartitionIndex::deserialize(&bytes).unwrap();
            prop_assert_eq!(&back, &index);
            // Without any snapshot the counts are the live runs' alone.
            let ids: BTreeSet<u64> = model.cuts.keys().copied().collect();
            for id in ids {
                prop_assert!(index.drop_snapshot(id));
                model.cuts.remove(&id);
            }
            model.check(&index);
            let mut live_only = PartitionIndex::new(index.partition(), BLOCKS);
            for (lba, run) in index.runs() {
                match run.location {
                    Some(l) => live_only.apply_write(lba, run.block_count, run.sequence, l).unwrap(),
                    None => live_only.apply_unmap(lba, run.block_count, run.sequence).unwrap(),
                }
            }
            prop_assert_eq!(index.live_blocks_per_extent(), live_only.live_blocks_per_extent());
            prop_assert_eq!(index.oldest_log_position(), live_only.oldest_log_position());
        }
    }

    #[test]
    fn cut_after_a_newer_block_is_refused_and_drop_unpins() {
        let mut index = index();
        let log = |p: u64| Location::Log {
            position: LogPosition(p),
            block_in_record: 0,
        };
        index.apply_write(0, 4, 1, log(4096)).unwrap();
        index.add_snapshot(9, 2).unwrap();
        index.add_snapshot(9, 2).unwrap();
        assert!(index.add_snapshot(9, 3).is_err());
        index.apply_write(0, 4, 3, log(8192)).unwrap();
        assert!(index.add_snapshot(10, 3).is_err());
        // The snapshot pins the first record.
        assert_eq!(index.oldest_log_position(), Some(LogPosition(4096)));
        assert_eq!(index.snapshot_pinned_blocks(), 4);
        assert!(index.drop_snapshot(9));
        assert_eq!(index.oldest_log_position(), Some(LogPosition(8192)));
        assert_eq!(index.snapshot_pinned_blocks(), 0);
        index.check_invariants().unwrap();
    }

    #[test]
    fn version_1_checkpoint_still_loads() {
        let mut index = index();
        index
            .apply_write(
                2,
                3,
                1,
                Location::Sled {
                    extent: 4,
                    column: 0,
                    offset_bytes: 0,
                },
            )
            .unwrap();
        let mut bytes = index.serialize();
        // A version 1 checkpoint: version field 1, no layer section.
        let body_len = bytes.len() - 4 - 8;
        bytes.truncate(body_len);
        bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(PartitionIndex::deserialize(&bytes).unwrap(), index);
    }
}
