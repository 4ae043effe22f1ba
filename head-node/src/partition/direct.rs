//! Full-stripe writes: a large write goes straight to the sleds,
//! erasure-coded, and only its index record goes to both head-node logs
//! (issue 13 item 3; Vitastor's full-block writes, ZFS's indirect writes).
//!
//! ```text
//!  host write of whole blocks, >= direct_write_min_bytes, admitted in the
//!  range table (every earlier overlapping write is resolved)
//!    ─▶ flush lock (sled appends of a partition are serialised: a column
//!       grows only at its end; flush, GC and checkpoints take it too)
//!    ─▶ reserve sequence S (PartitionCore::reserve_direct): replication
//!       stops before S until its record is queued
//!    ─▶ stripes of the open extent, every slot carrying (lba, S, crc), as
//!       a flush writes them (same writer: epoch-fenced appends, a failed
//!       append seals the extent and retries on a new one)
//!    ─▶ all present columns durable: start_commit of the index record
//!       (Change::Direct, RecordKind::Direct: S and the placement) maps
//!       the blocks to the sleds at S (newest sequence wins), still under
//!       the flush lock, and queues the record for the secondary
//!    ─▶ flush lock released; the record goes to the local log; the write
//!       is acknowledged by the usual ack rule (both logs)
//!  stripes failed (not fenced) ─▶ the blocks go through the logs at S
//! ```
//!
//! **Why the rows are ordinary data rows.** The stripes carry the write's
//! real sequence, so every path that rebuilds an index from the sleds (a
//! checkpoint plus the rows after it, a secondary's shadow, the full scan)
//! maps them like flushed blocks, GC moves them like flushed blocks, and
//! snapshot cuts order them by that sequence. The index record in the logs
//! is what keeps the replication stream contiguous (the secondary accepts
//! sequences in order only) and carries S past a crash; a primary's
//! replay does not map it (the summaries are the truth, GC may have moved
//! the blocks since), a secondary maps it as advisory like a flush
//! commit's mappings and does not keep it in its tail (the blocks are on
//! the sleds from the start).
//!
//! **Crashes.** Before the columns are durable: rows held by fewer than k
//! columns are not counted by a recovery; rows on k or more are decodable
//! and a recovery maps them at S (an unacknowledged write that became
//! visible, as a block device allows); a recovery continues sequences
//! after the highest it read from the sleds, so S is never reused for an
//! older block. After the index was applied and before the record is on
//! both logs: the write is not acknowledged, its blocks are on the sleds
//! at S (same as above). A write that ends before its record is queued
//! (cancelled, timed out, fenced) voids S: the secondary gets an empty
//! index record at S.
//!
//! **Ordering.** S is reserved after every earlier overlapping write was
//! resolved and before any later one is admitted, so S orders the write
//! exactly as the log path would; an older logged version of the blocks
//! still in the log is never flushed over it (the flush moves only blocks
//! whose index entry is still that log record), and a later small write to
//! the same blocks has a higher sequence and wins everywhere. Reads see
//! the blocks only once all present columns hold them. A checkpoint never
//! sees the rows without the mapping: both change under the flush lock.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use proto::BLOCK_SIZE_BYTES;

use super::core::{Change, WriteId};
use super::{bump, flush, push_writes, PartitionError, Shared};

/// The flush lock, held by a direct write until its `start_commit`.
pub(super) type Serial<'a> = tokio::sync::MutexGuard<'a, ()>;

/// Whether a write of partition bytes `bytes` with `data` goes straight to
/// the sleds: whole blocks, at least `direct_write_min_bytes` (non-zero).
pub(super) fn eligible(shared: &Shared, bytes: &Range<u64>, data: Option<&Bytes>) -> bool {
    let min = shared.config.direct_write_min_bytes;
    min > 0
        && data.is_some()
        && bytes.start % BLOCK_SIZE_BYTES == 0
        && bytes.end % BLOCK_SIZE_BYTES == 0
        && bytes.end - bytes.start >= min.max(BLOCK_SIZE_BYTES)
}

/// Writes admitted write `id`'s blocks `first_block..` (`data`) as full
/// stripes and maps them in the index at a reserved sequence; returns the
/// changes to commit at that sequence: the index record, or (the stripes
/// failed, or the flush lock stayed busy too long) the blocks themselves
/// through the logs, with the flush lock to hold until `start_commit`.
/// `Fenced` / `NotPrimary` are returned as errors (the write's guard voids
/// the reservation).
pub(super) async fn write(
    shared: &Arc<Shared>,
    id: WriteId,
    first_block: u64,
    data: Bytes,
) -> Result<(Vec<Change>, Option<Serial<'_>>), PartitionError> {
    let wait = shared.config.replica_timeout / 2;
    let Ok(serial) = tokio::time::timeout(wait, shared.flush_lock.lock()).await else {
        bump(&shared.metrics.direct_fallbacks);
        let mut changes = Vec::new();
        push_writes(&mut changes, first_block, data);
        return Ok((changes, None));
    };
    let sequence = shared.lock().core.reserve_direct(id)?;
    match flush::write_direct(shared, first_block, sequence, &data).await {
        Ok(mappings) => {
            bump(&shared.metrics.direct_writes);
            let change = Change::Direct {
                lba: first_block,
                mappings,
            };
            Ok((vec![change], Some(serial)))
        }
        Err(error @ (PartitionError::Fenced { .. } | PartitionError::NotPrimary { .. })) => {
            Err(error)
        }
        Err(error) => {
            tracing::warn!(partition = ?shared.id(), %error, "full-stripe write failed; the blocks go through the logs");
            bump(&shared.metrics.direct_fallbacks);
            let mut changes = Vec::new();
            push_writes(&mut changes, first_block, data);
            Ok((changes, None))
        }
    }
}
