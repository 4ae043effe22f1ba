//! Snapshots of a partition: the cut and drop markers, and the driver side
//! of taking, releasing, reading and dropping a snapshot.
//!
//! **The cut.** A snapshot of the partition is taken by a write operation
//! like any other: [`Partition::cut_snapshot`] commits a
//! [`Change::Snapshot`] through the core, which gives the marker the next
//! sequence `S` *and* registers the snapshot in the index under the same
//! lock (so every operation ordered after the cut finds the layer there
//! when it is applied, and saves what it replaces into it; see
//! [`crate::index`]'s snapshot layers). The marker is logged on both head
//! nodes and acknowledged by the ack rule, so a promoted secondary and a
//! log replay rebuild the same snapshot. A cut may **hold** acknowledgements:
//! until [`Partition::release_cut`], no write ordered after the cut
//! completes (it is durable and waits); this is what makes a cut over
//! several partitions causally consistent (the coordinator releases every
//! partition's cut only when all are taken, so no write acknowledged before
//! another was issued can be after the cut while the later one is before
//! it). [`Partition::abort_cut`] releases the acknowledgements and drops
//! the snapshot (a drop marker, so a replay drops it too).
//!
//! **Persistence.** The layers go into index checkpoints (version 2); a
//! marker stays held in the log until a checkpoint written after it is
//! durable, and recovery registers the log's cuts before it applies the
//! sled summaries, so the pre-cut versions of blocks find their layer in
//! any order. The secondary writes no checkpoint and releases what a flush
//! commit covers, markers included: so the primary parks a flush commit
//! that covers a marker until its checkpoint holding that marker is
//! durable ([`PartitionCore::queue_flush_commit`]); at every moment a cut
//! is in the secondary's log or in the sleds' newest checkpoint, and a
//! promoted or restarted secondary cannot forget a snapshot.
//!
//! **Reads** ([`Partition::read_snapshot`]) go through the same read path
//! as live reads with the snapshot's view of the index.

use bytes::Bytes;
use proto::sled::PartitionId;

use std::sync::Arc;
use std::time::Duration;

use proto::volume::{ChangedRange, SnapshotUsage, MAX_DIFF_RANGES};

use crate::index::DiffRange;
use proto::BLOCK_SIZE_BYTES;

use proto::volume::ReplicaRequest;

/// Most blocks one diff page scans under the partition lock (1 GiB of
/// volume; a few milliseconds of index lookups).
pub const DIFF_SCAN_BLOCKS: u64 = 1 << 18;

use super::core::{Admission, Change, Completion, PartitionCore, WriteId};
use super::error::PartitionError;
use super::{bump, read, Partition, Shared, WriteGuard};
use crate::index::{IndexError, SnapshotInfo};
use crate::wal::{LogPosition, LogRecord, RecordKind, RecoveredRecord};

/// What a snapshot marker record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkerOp {
    /// The snapshot's cut is the record's sequence.
    Cut,
    /// The snapshot is dropped (its layer uncounted).
    Drop,
}

/// The payload of a snapshot marker record (log and replication).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotMarker {
    /// Snapshot id.
    pub id: u64,
    /// Cut or drop.
    pub op: MarkerOp,
}

/// Most flush commits queued for the secondary, and most parked behind a
/// checkpoint; the oldest goes first (it only keeps more of the
/// secondary's log).
pub(super) const MAX_QUEUED_COMMITS: usize = 256;

const MARKER_MAGIC: &[u8; 8] = b"RBSNAPM1";
const MARKER_BYTES: usize = 8 + 8 + 1;

impl SnapshotMarker {
    /// The payload bytes.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(MARKER_BYTES);
        out.extend_from_slice(MARKER_MAGIC);
        out.extend_from_slice(&self.id.to_le_bytes());
        out.push(match self.op {
            MarkerOp::Cut => 1,
            MarkerOp::Drop => 2,
        });
        out.into()
    }

    /// Decodes [`encode`](Self::encode)'s bytes; `None` if they are not a
    /// marker.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != MARKER_BYTES || &bytes[..8] != MARKER_MAGIC {
            return None;
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[8..16]);
        let op = match bytes[16] {
            1 => MarkerOp::Cut,
            2 => MarkerOp::Drop,
            _ => return None,
        };
        Some(Self {
            id: u64::from_le_bytes(id),
            op,
        })
    }
}

impl Partition {
    /// Primary: takes snapshot `id` (see the module docs): a cut marker at
    /// the next sequence, durable on both logs when this returns the cut.
    /// With `hold`, the writes ordered after the cut wait for
    /// [`release_cut`](Self::release_cut) or [`abort_cut`](Self::abort_cut),
    /// and at most `hold_timeout`, after which the cut aborts itself (a
    /// coordinator that died cannot stall the partition).
    pub async fn cut_snapshot(
        &self,
        epoch: Option<u64>,
        id: u64,
        hold: bool,
        hold_timeout: Duration,
    ) -> Result<u64, PartitionError> {
        self.shared.check_primary(epoch)?;
        let change = Change::Snapshot {
            id,
            op: MarkerOp::Cut,
            hold,
        };
        match self.submit_marker(change).await {
            Ok(()) => {}
            Err(error) => {
                // The marker may have reached a log: drop it for good.
                self.abort_cut(id).await;
                return Err(error);
            }
        }
        let cut = self
            .shared
            .lock()
            .core
            .index
            .snapshot_layer(id)
            .map(|layer| layer.cut)
            .ok_or_else(|| PartitionError::BadRequest {
                partition: self.id(),
                reason: format!("snapshot {id} dropped while it was cut"),
            })?;
        bump(&self.shared.metrics.snapshot_cuts);
        if hold {
            let weak = Arc::downgrade(&self.shared);
            tokio::spawn(async move {
                tokio::time::sleep(hold_timeout).await;
                let Some(shared) = weak.upgrade() else { return };
                let partition = Partition { shared };
                if partition
                    .shared
                    .lock()
                    .core
                    .held_cut()
                    .is_some_and(|(h, _)| h == id)
                {
                    tracing::warn!(partition = ?partition.id(), snapshot = id, "cut not released in time; aborting it");
                    partition.abort_cut(id).await;
                }
            });
        }
        Ok(cut)
    }

    /// Releases the acknowledgements held by snapshot `id`'s cut.
    pub fn release_cut(&self, id: u64) {
        let outcome = self.shared.lock().core.release_cut(id);
        self.shared.deliver(outcome);
    }

    /// The coordinator's release: releases snapshot `id`'s held cut, or
    /// fails if it is not held now (it timed out and aborted itself, so
    /// the snapshot is being dropped here and must not be recorded ready).
    /// The check and the release are one step under the partition lock,
    /// so the hold timeout and this release cannot both win.
    pub fn release_held_cut(&self, id: u64) -> Result<(), PartitionError> {
        let outcome = {
            let mut state = self.shared.lock();
            if state.core.held_cut().is_none_or(|(held, _)| held != id) {
                return Err(PartitionError::BadRequest {
                    partition: self.id(),
                    reason: format!(
                        "snapshot {id}'s cut is not held here (its hold timed out and it aborted, or it was never cut here)"
                    ),
                });
            }
            state.core.release_cut(id)
        };
        self.shared.deliver(outcome);
        Ok(())
    }

    /// Aborts snapshot `id`'s cut: the held acknowledgements go, the
    /// snapshot is dropped (a drop marker on both logs; if that cannot be
    /// logged now, the local layer goes at once and the coordinator's
    /// delete retries the marker).
    pub async fn abort_cut(&self, id: u64) {
        self.release_cut(id);
        if let Err(error) = self.drop_snapshot(id).await {
            tracing::warn!(partition = ?self.id(), snapshot = id, %error, "drop marker of an aborted cut not logged");
        }
    }

    /// Primary: drops snapshot `id` (idempotent): a drop marker on both
    /// logs, then its layer is uncounted (what only it held becomes
    /// reclaimable by GC).
    pub async fn drop_snapshot(&self, id: u64) -> Result<(), PartitionError> {
        self.shared.check_primary(None)?;
        self.submit_marker(Change::Snapshot {
            id,
            op: MarkerOp::Drop,
            hold: false,
        })
        .await
    }

    /// Primary: reads `len` bytes at volume byte `offset_bytes` of snapshot
    /// `id` (512-aligned). Every returned byte passed a CRC.
    pub async fn read_snapshot(
        &self,
        epoch: Option<u64>,
        id: u64,
        offset_bytes: u64,
        len: u32,
    ) -> Result<Bytes, PartitionError> {
        self.shared.check_primary(epoch)?;
        let bytes = self.check_range(offset_bytes, len)?;
        let first_block = bytes.start / BLOCK_SIZE_BYTES;
        let end_block = bytes.end.div_ceil(BLOCK_SIZE_BYTES);
        let data =
            read::read_view(&self.shared, Some(id), first_block, end_block - first_block).await?;
        let at = (bytes.start - first_block * BLOCK_SIZE_BYTES) as usize;
        bump(&self.shared.metrics.reads);
        Ok(data.slice(at..at + len as usize))
    }

    /// The blocks (volume-absolute, 4 KiB) that read differently in view
    /// `to` than in `from` (`None`: live, `Some(id)`: snapshot `id`), from
    /// the index alone (see [`crate::index::PartitionIndex::diff_views`]).
    pub fn snapshot_diff(
        &self,
        from: Option<u64>,
        to: Option<u64>,
    ) -> Result<Vec<std::ops::Range<u64>>, PartitionError> {
        let first = self.shared.config.first_block;
        let size = self.shared.config.size_blocks;
        let ranges = self
            .shared
            .lock()
            .core
            .index
            .diff_views(from, to, 0, size)
            .map_err(|source| PartitionError::Index {
                partition: self.id(),
                source,
            })?;
        Ok(ranges
            .into_iter()
            .map(|r| first + r.start..first + r.end)
            .collect())
    }

    /// Primary: one page of the diff of view `from` → `to` (`None`: live,
    /// `Some(id)`: snapshot `id`) from volume byte `start_bytes` (a block
    /// boundary inside the partition, or its end): at most `max_ranges`
    /// ranges, volume-absolute bytes, and where the next page starts. A
    /// page scans at most [`DIFF_SCAN_BLOCKS`] blocks under the partition
    /// lock (see [`crate::index::PartitionIndex::diff_page`]).
    pub fn snapshot_diff_page(
        &self,
        epoch: Option<u64>,
        from: Option<u64>,
        to: Option<u64>,
        start_bytes: u64,
        max_ranges: u32,
    ) -> Result<(Vec<ChangedRange>, Option<u64>), PartitionError> {
        let start = self.query_start(epoch, start_bytes)?;
        let max = max_ranges.clamp(1, MAX_DIFF_RANGES) as usize;
        let page = self
            .shared
            .lock()
            .core
            .index
            .diff_page(from, to, start, max, DIFF_SCAN_BLOCKS);
        self.query_page(page)
    }

    /// Primary: one page of the allocation map of view `view` (`None`:
    /// live, `Some(id)`: snapshot `id`) from volume byte `start_bytes`,
    /// paged like [`snapshot_diff_page`](Self::snapshot_diff_page): the
    /// blocks that hold data in the view (see
    /// [`crate::index::PartitionIndex::map_page`]); a reader skips the
    /// rest, which reads as zeros. A clone's partition (not flattened)
    /// answers its whole rest as data: its never-written blocks read from
    /// the parent snapshot, whose map its index does not hold.
    pub fn snapshot_map_page(
        &self,
        epoch: Option<u64>,
        view: Option<u64>,
        start_bytes: u64,
        max_ranges: u32,
    ) -> Result<(Vec<ChangedRange>, Option<u64>), PartitionError> {
        let start = self.query_start(epoch, start_bytes)?;
        let max = max_ranges.clamp(1, MAX_DIFF_RANGES) as usize;
        let state = self.shared.lock();
        let index = &state.core.index;
        let page = if self.is_clone() {
            // The view must exist all the same (an empty page scan).
            index.map_page(view, start, 1, 1).map(|_| {
                let size = self.shared.config.size_blocks;
                let rest = (start < size).then_some(DiffRange {
                    blocks: start..size,
                    zero: false,
                });
                (rest.into_iter().collect(), None)
            })
        } else {
            index.map_page(view, start, max, DIFF_SCAN_BLOCKS)
        };
        drop(state);
        self.query_page(page)
    }

    /// The partition block a query page starts at: `start_bytes` checked
    /// (a block boundary inside the partition, or its end), at a primary.
    fn query_start(&self, epoch: Option<u64>, start_bytes: u64) -> Result<u64, PartitionError> {
        self.shared.check_primary(epoch)?;
        let config = &self.shared.config;
        if start_bytes % BLOCK_SIZE_BYTES != 0
            || start_bytes < config.start_bytes()
            || start_bytes > config.end_bytes()
        {
            return Err(PartitionError::OutOfRange {
                partition: self.id(),
                offset_bytes: start_bytes,
                len_bytes: 0,
                partition_start_bytes: config.start_bytes(),
                partition_end_bytes: config.end_bytes(),
            });
        }
        Ok(start_bytes / BLOCK_SIZE_BYTES - config.first_block)
    }

    /// A query page of the index in volume-absolute bytes.
    fn query_page(
        &self,
        page: Result<(Vec<DiffRange>, Option<u64>), IndexError>,
    ) -> Result<(Vec<ChangedRange>, Option<u64>), PartitionError> {
        let first = self.shared.config.first_block;
        let (ranges, next) = page.map_err(|source| PartitionError::Index {
            partition: self.id(),
            source,
        })?;
        let ranges = ranges
            .into_iter()
            .map(|r| ChangedRange {
                offset_bytes: (first + r.blocks.start) * BLOCK_SIZE_BYTES,
                len_bytes: (r.blocks.end - r.blocks.start) * BLOCK_SIZE_BYTES,
                zero: r.zero,
            })
            .collect();
        Ok((ranges, next.map(|b| (first + b) * BLOCK_SIZE_BYTES)))
    }

    /// The partition's snapshots (id, cut, blocks each pins and holds
    /// exclusively).
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.shared.lock().core.index.snapshots()
    }

    /// Primary: the partition's snapshots with the bytes each pins and
    /// holds exclusively.
    pub fn snapshot_usage(&self, epoch: Option<u64>) -> Result<Vec<SnapshotUsage>, PartitionError> {
        self.shared.check_primary(epoch)?;
        Ok(self
            .snapshots()
            .into_iter()
            .map(|s| SnapshotUsage {
                snapshot: s.id,
                cut: s.cut,
                pinned_bytes: s.pinned_blocks * BLOCK_SIZE_BYTES,
                exclusive_bytes: s.exclusive_blocks * BLOCK_SIZE_BYTES,
            })
            .collect())
    }

    /// Commits one snapshot marker like a write of no blocks.
    async fn submit_marker(&self, change: Change) -> Result<(), PartitionError> {
        let shared: &Arc<Shared> = &self.shared;
        let deadline = tokio::time::Instant::now() + shared.config.replica_timeout;
        // An empty range: it waits for no write and no write waits for it.
        let admission = shared.lock().core.admit(0..0);
        let mut guard = WriteGuard {
            shared: shared.clone(),
            id: admission.id(),
            appending: false,
        };
        debug_assert!(matches!(admission, Admission::Ready(_)));
        self.commit(&mut guard, vec![change], deadline).await
    }
}

/// The core's snapshot events (see the module docs and
/// [`Change::Snapshot`]).
impl PartitionCore {
    /// Refuses snapshot changes that are not alone in their write, a cut
    /// of an existing snapshot, and a second held cut.
    pub(super) fn check_snapshot_changes(&self, changes: &[Change]) -> Result<(), PartitionError> {
        let bad = |reason: String| PartitionError::BadRequest {
            partition: self.partition(),
            reason,
        };
        let snapshots = changes
            .iter()
            .filter(|c| matches!(c, Change::Snapshot { .. }))
            .count();
        if snapshots == 0 {
            return Ok(());
        }
        if changes.len() != 1 {
            return Err(bad("a snapshot marker is alone in its write".to_string()));
        }
        if let Some(Change::Snapshot { id, op, hold }) = changes.first() {
            if *op == MarkerOp::Cut {
                if self.index.snapshot_layer(*id).is_some() {
                    return Err(bad(format!("snapshot {id} exists")));
                }
                if *hold && self.cut_hold.is_some() {
                    return Err(bad("another cut holds acknowledgements".to_string()));
                }
            }
        }
        Ok(())
    }

    /// The log record of a marker at `sequence`.
    pub(super) fn marker_record(&self, sequence: u64, marker: Bytes) -> LogRecord {
        LogRecord {
            kind: RecordKind::Snapshot,
            partition: self.partition(),
            epoch: self.epoch(),
            sequence,
            lba: 0,
            block_count: 0,
            payload: marker,
        }
    }

    /// A marker durable on both logs (or replayed): a cut registers the
    /// snapshot (idempotent), a drop uncounts it; both stay held in the
    /// log until the next checkpoint.
    pub(super) fn apply_marker(
        &mut self,
        record: &LogRecord,
        position: LogPosition,
    ) -> Result<(), IndexError> {
        let Some(marker) = SnapshotMarker::decode(&record.payload) else {
            return Err(IndexError::Snapshot {
                id: 0,
                reason: format!("undecodable marker at sequence {}", record.sequence),
            });
        };
        self.snapshot_markers.insert(record.sequence, position);
        match marker.op {
            MarkerOp::Cut => self.index.add_snapshot(marker.id, record.sequence),
            MarkerOp::Drop => {
                self.index.drop_snapshot(marker.id);
                if self.cut_hold.is_some_and(|(id, _)| id == marker.id) {
                    self.cut_hold = None;
                }
                Ok(())
            }
        }
    }

    /// Registers the cuts of `recovered` (this partition's markers) that are
    /// not dropped later in it, before any write is applied.
    pub(crate) fn register_cuts(
        &mut self,
        recovered: &[RecoveredRecord],
    ) -> Result<(), PartitionError> {
        for (id, cut) in cuts_in(self.partition(), recovered) {
            self.index
                .add_snapshot(id, cut)
                .map_err(|source| PartitionError::Index {
                    partition: self.partition(),
                    source,
                })?;
        }
        Ok(())
    }

    /// The cut of snapshot `id` that holds acknowledgements, if any.
    pub fn held_cut(&self) -> Option<(u64, u64)> {
        self.cut_hold
    }

    /// Releases the held cut of snapshot `id`: the writes ordered after it
    /// complete (those durable on both logs at once).
    pub fn release_cut(&mut self, id: u64) -> (Vec<Completion>, Vec<WriteId>) {
        if self.cut_hold.is_some_and(|(held, _)| held == id) {
            self.cut_hold = None;
        }
        self.settle_all()
    }

    /// A checkpoint holding the effect of every marker up to `sequence`
    /// is durable: they need not stay in the log, and the parked flush
    /// commits that covered no other marker go to the secondary now.
    /// Returns whether any did (the caller wakes the replicator).
    pub fn forget_snapshot_markers(&mut self, through: u64) -> bool {
        self.snapshot_markers
            .retain(|sequence, _| *sequence > through);
        let first_held = self.snapshot_markers.keys().next().copied();
        let mut released = false;
        while let Some((up_to, _)) = self.parked_commits.front() {
            if first_held.is_some_and(|held| *up_to >= held) {
                break;
            }
            if let Some((_, commit)) = self.parked_commits.pop_front() {
                self.push_flush_commit(commit);
                released = true;
            }
        }
        released
    }

    /// Primary: queues a flush commit at watermark `up_to` for the
    /// secondary, or parks it while it covers a snapshot marker that no
    /// durable checkpoint holds yet (or a parked commit is ahead of it:
    /// commits go in order).
    ///
    /// **Why.** A secondary releases the markers a flush commit covers
    /// from its log (it writes no checkpoint). Were the commit sent before
    /// the primary's checkpoint that holds the cut is durable, a primary
    /// dying in between would leave the snapshot nowhere: not in the
    /// secondary's log, not in the sleds' newest checkpoint; the promoted
    /// secondary (after a restart, or its own crash before its first
    /// checkpoint) would forget a snapshot the control plane records
    /// ready. A parked commit only keeps more of the secondary's log.
    pub(crate) fn queue_flush_commit(&mut self, up_to: u64, commit: ReplicaRequest) {
        self.note_flush_queued(up_to);
        let covers_marker = self
            .snapshot_markers
            .keys()
            .next()
            .is_some_and(|first| *first <= up_to);
        if covers_marker || !self.parked_commits.is_empty() {
            if self.parked_commits.len() >= MAX_QUEUED_COMMITS {
                // Dropping a commit only keeps more of the secondary's log
                // (its index keeps the records it maps).
                tracing::warn!(partition = ?self.partition(), "flush commits parked behind a checkpoint; dropping the oldest");
                self.parked_commits.pop_front();
            }
            self.parked_commits.push_back((up_to, commit));
        } else {
            self.push_flush_commit(commit);
        }
    }

    fn push_flush_commit(&mut self, commit: ReplicaRequest) {
        if self.pending_commits.len() >= MAX_QUEUED_COMMITS {
            tracing::warn!(partition = ?self.partition(), "secondary behind on flush commits; dropping the oldest");
            self.pending_commits.pop_front();
        }
        self.pending_commits.push_back(commit);
    }
}

/// The cuts (id, cut sequence) of `partition`'s markers in `recovered`
/// that no later marker drops.
pub(crate) fn cuts_in(partition: PartitionId, recovered: &[RecoveredRecord]) -> Vec<(u64, u64)> {
    let mut cuts = std::collections::BTreeMap::new();
    let mut dropped = std::collections::BTreeSet::new();
    for r in recovered {
        if r.record.partition != partition || r.record.kind != RecordKind::Snapshot {
            continue;
        }
        match SnapshotMarker::decode(&r.record.payload) {
            Some(SnapshotMarker {
                id,
                op: MarkerOp::Cut,
            }) => {
                cuts.insert(id, r.record.sequence);
            }
            Some(SnapshotMarker {
                id,
                op: MarkerOp::Drop,
            }) => {
                dropped.insert(id);
            }
            None => {}
        }
    }
    cuts.into_iter()
        .filter(|(id, _)| !dropped.contains(id))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips_and_rejects_other_bytes() {
        for op in [MarkerOp::Cut, MarkerOp::Drop] {
            let m = SnapshotMarker { id: 77, op };
            assert_eq!(SnapshotMarker::decode(&m.encode()), Some(m));
        }
        let mut bad = SnapshotMarker {
            id: 1,
            op: MarkerOp::Cut,
        }
        .encode()
        .to_vec();
        bad[16] = 9;
        assert_eq!(SnapshotMarker::decode(&bad), None);
        assert_eq!(SnapshotMarker::decode(b"rackblock"), None);
    }
}
