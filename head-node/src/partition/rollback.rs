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

use super::error::PartitionError;
use super::{bump, read, Partition};

impl Partition {
    /// Primary at `epoch` of a detached volume: rolls blocks `from..` (at
    /// most `max_blocks`) back to snapshot `snapshot`; the next cursor, or
    /// `None` once `from` is past the end.
    pub async fn rollback_step(
        &self,
        epoch: u64,
        snapshot: u64,
        from: u64,
        max_blocks: u64,
    ) -> Result<Option<u64>, PartitionError> {
        let shared = &self.shared;
        shared.check_primary(Some(epoch))?;
        let size = shared.config.size_blocks;
        if from >= size {
            return Ok(None);
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
        if differ.is_empty() {
            return Ok(Some(end));
        }
        let deadline = tokio::time::Instant::now() + shared.config.replica_timeout;
        let (_permit, mut guard) = self.admitted(from..end, deadline).await?;
        let mut changes = Vec::new();
        for range in differ {
            let data =
                read::read_view(shared, Some(snapshot), range.start, range.end - range.start)
                    .await?;
            super::flatten::push_copy(&mut changes, range.start, &data);
        }
        self.commit(&mut guard, changes, deadline).await?;
        bump(&shared.metrics.rollback_writes);
        Ok(Some(end))
    }
}
