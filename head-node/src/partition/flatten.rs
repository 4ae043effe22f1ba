//! Flattening a clone's partition: copying every block the clone never
//! wrote from its parent snapshot, so the clone stops depending on it.
//!
//! One step ([`Partition::flatten_step`]) takes the first run of
//! never-written blocks (holes: no version in the index, not even a
//! tombstone) at or after a cursor, reads it from the parent snapshot
//! (outside any lock: the snapshot's content never changes), and then
//! writes it through the ordinary write path **only where the blocks are
//! still holes**: the copy is admitted in the core's range table like a
//! host write, so every host write to those blocks admitted before it has
//! been applied to the index when the copy looks, under the partition's
//! lock, at which blocks are still holes; a host write admitted after it
//! gets a higher sequence and wins by "newest sequence wins" everywhere
//! (secondary, replay, recovery). The copy never overwrites a block the
//! clone wrote. All-zero parent blocks become tombstones (no data), the
//! rest ordinary writes: replicated, logged on both head nodes and
//! flushed like host writes, so a flatten interrupted by a crash or a
//! failover resumes by looking for holes again (nothing to remember).
//!
//! The caller (the manager's flatten task) paces the steps (the rate),
//! reports the holes left to the control plane, and stops at none.

use std::ops::Range;

use bytes::Bytes;

use super::core::Change;
use super::error::PartitionError;
use super::{bump, Partition};
use proto::BLOCK_SIZE_BYTES;

/// What one [`Partition::flatten_step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlattenStep {
    /// Blocks copied (written or made tombstones) by this step.
    pub copied_blocks: u64,
    /// Where the next step starts looking (partition block); `None`: no
    /// hole at or after the cursor was left when this step looked.
    pub next: Option<u64>,
}

impl Partition {
    /// Whether this is a clone's partition (it has a parent snapshot).
    pub fn is_clone(&self) -> bool {
        self.shared.config.parent.is_some()
    }

    /// Blocks of this partition that still read from a clone's parent
    /// (never written: no version in the index). 0 when not a clone.
    pub fn parent_blocks(&self) -> u64 {
        if self.shared.config.parent.is_none() {
            return 0;
        }
        let size = self.shared.config.size_blocks;
        let state = self.shared.lock();
        state
            .core
            .index
            .lookup_with_sequence(0, size)
            .map(|mapped| {
                mapped
                    .iter()
                    .filter(|m| m.location.is_none() && m.sequence.is_none())
                    .map(|m| m.lbas.end - m.lbas.start)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Primary of a clone's partition at `epoch`: copies the first run of
    /// never-written blocks at or after partition block `from`, at most
    /// `max_blocks`, from the parent snapshot (module docs).
    pub async fn flatten_step(
        &self,
        epoch: u64,
        from: u64,
        max_blocks: u64,
    ) -> Result<FlattenStep, PartitionError> {
        let shared = &self.shared;
        shared.check_primary(Some(epoch))?;
        let Some(parent) = shared.config.parent.clone() else {
            return Err(PartitionError::BadRequest {
                partition: self.id(),
                reason: "not a clone's partition: nothing to flatten".into(),
            });
        };
        let size = shared.config.size_blocks;
        let Some(hole) = first_hole(self, from, size, max_blocks.max(1)) else {
            return Ok(FlattenStep {
                copied_blocks: 0,
                next: None,
            });
        };
        let offset_bytes = (shared.config.first_block + hole.start) * BLOCK_SIZE_BYTES;
        let len = (hole.end - hole.start) * BLOCK_SIZE_BYTES;
        let len = u32::try_from(len).map_err(|_| PartitionError::BadRequest {
            partition: self.id(),
            reason: format!("a flatten step of {len} bytes"),
        })?;
        let data = parent.read(offset_bytes, len).await.map_err(|error| {
            shared.unavailable(format!("clone's parent snapshot unreadable: {error}"))
        })?;
        if data.len() != len as usize {
            return Err(shared.unavailable(format!(
                "clone's parent snapshot answered {} bytes for {len}",
                data.len()
            )));
        }
        let copied = self.copy_if_unmapped(hole.clone(), data).await?;
        shared
            .metrics
            .flattened_blocks
            .fetch_add(copied, std::sync::atomic::Ordering::Relaxed);
        Ok(FlattenStep {
            copied_blocks: copied,
            next: Some(hole.end),
        })
    }

    /// Writes `data` (the parent's blocks `blocks`) where the blocks are
    /// still holes once admitted; the blocks copied.
    async fn copy_if_unmapped(
        &self,
        blocks: Range<u64>,
        data: Bytes,
    ) -> Result<u64, PartitionError> {
        let shared = &self.shared;
        let deadline = tokio::time::Instant::now() + shared.config.replica_timeout;
        let (_permit, mut guard) = self.admitted(blocks.clone(), deadline).await?;
        // Admitted: every earlier write to these blocks is in the index.
        let holes: Vec<Range<u64>> = {
            let state = shared.lock();
            state
                .core
                .index
                .lookup_with_sequence(blocks.start, blocks.end - blocks.start)
                .map_err(|source| PartitionError::Index {
                    partition: self.id(),
                    source,
                })?
                .into_iter()
                .filter(|m| m.location.is_none() && m.sequence.is_none())
                .map(|m| m.lbas)
                .collect()
        };
        let mut changes = Vec::new();
        let mut copied = 0;
        for hole in holes {
            copied += hole.end - hole.start;
            let at = |block: u64| ((block - blocks.start) * BLOCK_SIZE_BYTES) as usize;
            push_copy(
                &mut changes,
                hole.start,
                &data.slice(at(hole.start)..at(hole.end)),
            );
        }
        if changes.is_empty() {
            // The clone wrote them all meanwhile (the guard ends the
            // admission).
            return Ok(0);
        }
        self.commit(&mut guard, changes, deadline).await?;
        bump(&shared.metrics.flatten_copies);
        Ok(copied)
    }
}

/// The first run of holes at or after `from`, at most `max_blocks` long.
fn first_hole(partition: &Partition, from: u64, size: u64, max_blocks: u64) -> Option<Range<u64>> {
    if from >= size {
        return None;
    }
    let state = partition.shared.lock();
    let mapped = state
        .core
        .index
        .lookup_with_sequence(from, size - from)
        .ok()?;
    mapped
        .into_iter()
        .find(|m| m.location.is_none() && m.sequence.is_none())
        .map(|m| m.lbas.start..m.lbas.end.min(m.lbas.start + max_blocks))
}

/// The changes that make blocks `lba..` hold `data` (whole blocks): runs
/// of all-zero blocks as tombstones (no data kept), the rest as writes.
pub(super) fn push_copy(changes: &mut Vec<Change>, lba: u64, data: &Bytes) {
    let blocks = data.len() as u64 / BLOCK_SIZE_BYTES;
    let at = |block: u64| (block * BLOCK_SIZE_BYTES) as usize;
    let mut i = 0;
    while i < blocks {
        let zero = is_zero(&data[at(i)..at(i + 1)]);
        let mut end = i + 1;
        while end < blocks && is_zero(&data[at(end)..at(end + 1)]) == zero {
            end += 1;
        }
        if zero {
            changes.push(Change::Unmap {
                lba: lba + i,
                count: end - i,
            });
        } else {
            super::push_writes(changes, lba + i, data.slice(at(i)..at(end)));
        }
        i = end;
    }
}

fn is_zero(block: &[u8]) -> bool {
    block.iter().all(|b| *b == 0)
}
