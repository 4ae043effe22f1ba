//! Rolling a detached volume's partition back to one of its snapshots.
//!
//! The control plane refuses the rollback while the volume has an
//! attachment and gives it none until every partition is done, so no host
//! writes meanwhile. One step ([`Partition::rollback_step`]) takes a range
//! of blocks from a cursor, asks the index which of them read differently
//! live than in the snapshot ([`crate::index::PartitionIndex::diff_views`],
//! no data read), reads those from the snapshot and writes them back as
//! ordinary writes (all-zero blocks as tombstones): replicated, logged on
//! both head nodes, flushed like host writes, and ordered after every
//! snapshot's cut, so the layers of the snapshots taken after the target
//! keep what they held (later snapshots stay intact; the target itself
//! too). A rollback interrupted by a crash or a failover resumes at the
//! cursor the control plane recorded: rewriting a block with the content
//! it already has changes nothing a reader sees, and the volume is not
//! attachable before the end, so to a host the rollback either has not
//! happened yet or has happened.
//!
//! A step reports the blocks it rewrote, so the head node's rollback task
//! can pace the rollback (`rollback_bytes_per_second`, like a flatten's
//! rate) and `/partitions` shows how far each primary got
//! (`rolled_back_blocks`).

use std::sync::atomic::Ordering;

use super::error::PartitionError;
use super::{bump, read, Partition};

/// What one [`Partition::rollback_step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollbackStep {
    /// Blocks rewritten (written or made tombstones) by this step.
    pub rewritten_blocks: u64,
    /// Where the next step starts (partition block); `None`: the cursor
    /// was past the end, the partition is rolled back.
    pub next: Option<u64>,
}

impl Partition {
    /// Primary at `epoch` of a detached volume: rolls blocks `from..` (at
    /// most `max_blocks`) back to snapshot `snapshot`; the next cursor
    /// (`None` once `from` is past the end) and the blocks rewritten.
    pub async fn rollback_step(
        &self,
        epoch: u64,
        snapshot: u64,
        from: u64,
        max_blocks: u64,
    ) -> Result<RollbackStep, PartitionError> {
        let shared = &self.shared;
        shared.check_primary(Some(epoch))?;
        let size = shared.config.size_blocks;
        if from >= size {
            return Ok(RollbackStep {
                rewritten_blocks: 0,
                next: None,
            });
        }
        let end = size.min(from.saturating_add(max_blocks.max(1)));
        let differ = {
            let state = shared.lock();
            state
                .core
                .index
                .diff_views(None, Some(snapshot), from, end - from)
                .map_err(|source| PartitionError::Index {
                    partition: self.id(),
                    source,
                })?
        };
        let skipped = RollbackStep {
            rewritten_blocks: 0,
            next: Some(end),
        };
        if differ.is_empty() {
            return Ok(skipped);
        }
        let deadline = tokio::time::Instant::now() + shared.config.replica_timeout;
        let (_permit, mut guard) = self.admitted(from..end, deadline).await?;
        let mut changes = Vec::new();
        let mut rewritten = 0;
        for range in differ {
            rewritten += range.end - range.start;
            let data =
                read::read_view(shared, Some(snapshot), range.start, range.end - range.start)
                    .await?;
            super::flatten::push_copy(&mut changes, range.start, &data);
        }
        self.commit(&mut guard, changes, deadline).await?;
        bump(&shared.metrics.rollback_writes);
        shared
            .metrics
            .rolled_back_blocks
            .fetch_add(rewritten, Ordering::Relaxed);
        Ok(RollbackStep {
            rewritten_blocks: rewritten,
            ..skipped
        })
    }
}
