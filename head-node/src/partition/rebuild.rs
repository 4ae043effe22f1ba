//! Rebuild of one lost, drained or corrupt column of an extent into its
//! replacement (ARCHITECTURE.md, Repair).
//!
//! ```text
//!  seal       under the flush lock: the extent takes no more stripes (an
//!             append-only column cannot be patched in place, so even a
//!             single corrupt block is repaired by rebuilding the column);
//!             rows = the stripes the partition wrote (or, for an extent it
//!             never opened, the k-th longest surviving column)
//!  claim      the new column at the partition's epoch (fencing as for any
//!             write, invariant 2); its length says where to resume
//!  per batch  read the rows from every other column (any k suffice), verify
//!  of rows    each block against the sled's CRCs, decode the missing chunk
//!             (ErasureCodec), check every data chunk against the summary
//!             CRCs, append chunk + summary to the new column in row order,
//!             paced by a token bucket (bytes/s, `proto::rate::Pacer`)
//!  confirm    under the flush lock again: if the partition opened the
//!             extent meanwhile, seal it and copy the rows it added; then
//!             the caller commits CompleteRepair, and the partition's grant
//!             maps the column index to the new column (the index's Sled
//!             locations keep their (extent, column) and stay valid)
//! ```
//!
//! The old column is never read unless it answers (a drained sled does):
//! every rebuilt row is decodable from k survivors, which is what the test
//! of "stop m other sleds afterwards" proves.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future;
use proto::rate::Pacer;
use proto::sled::{ColumnId, SledError, SledRequest, SledResponse};
use thiserror::Error;
use tokio::sync::watch;

use super::flush::{read_verified, sled_call};
use super::layout::{StripeSummary, CHUNK_BLOCKS, CHUNK_BYTES, ROW_BYTES};
use super::{ExtentGrant, Partition, Role, Shared};
use crate::erasure::ErasureCodec;
use proto::BLOCK_SIZE_BYTES;

/// Rows read and appended per request.
const BATCH_ROWS: u64 = 8;
/// Passes over rows the partition added while the rebuild ran.
const CATCH_UP_PASSES: usize = 3;
/// Attempts of one batch (sled hiccups) before giving up the task.
const BATCH_ATTEMPTS: usize = 3;

/// One column to rebuild, as the control plane recorded the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildTask {
    /// The extent as the control plane lists it (the column being replaced
    /// still at `column`).
    pub grant: ExtentGrant,
    /// Index of the column within the extent.
    pub column: u16,
    /// The replacement: sled and column.
    pub new: (String, ColumnId),
    /// Pace (bytes/s of rebuilt rows).
    pub rate_bytes_per_second: u64,
}

/// Bytes rebuilt so far of the bytes the column holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebuildProgress {
    /// Rebuilt bytes (rows appended to the new column).
    pub bytes_done: u64,
    /// Bytes the column holds (rows × row size).
    pub bytes_total: u64,
}

/// Why a rebuild stopped. Retrying later is always safe: the new column's
/// length says where to resume.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RebuildError {
    /// This node is not the partition's primary (any more).
    #[error("partition {partition:?}: not primary")]
    NotPrimary {
        /// Partition.
        partition: proto::sled::PartitionId,
    },
    /// A sled holds a newer epoch: the partition is fenced.
    #[error("partition {partition:?}: fenced by epoch {current}")]
    Fenced {
        /// Partition.
        partition: proto::sled::PartitionId,
        /// Newer epoch.
        current: u64,
    },
    /// The task does not fit the extent (column index, code, sleds).
    #[error("extent {extent}: {reason}")]
    BadTask {
        /// Extent.
        extent: u64,
        /// Why.
        reason: String,
    },
    /// Fewer than k columns answered for a row.
    #[error("extent {extent} row {row}: {available} of {needed} columns readable")]
    Unrecoverable {
        /// Extent.
        extent: u64,
        /// Row.
        row: u64,
        /// Columns read.
        available: usize,
        /// k.
        needed: usize,
    },
    /// Decoded data does not match the stripe summary.
    #[error("extent {extent} row {row}: {reason}")]
    Corrupt {
        /// Extent.
        extent: u64,
        /// Row.
        row: u64,
        /// What failed.
        reason: String,
    },
    /// The new column refused or could not be reached.
    #[error("new column on sled {sled}: {reason}")]
    NewColumn {
        /// Sled.
        sled: String,
        /// Why.
        reason: String,
    },
    /// The caller could not commit the completion.
    #[error("confirming the rebuild: {reason}")]
    Confirm {
        /// Why.
        reason: String,
    },
}

impl RebuildError {
    /// Worth trying again later with the same task.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            RebuildError::NotPrimary { .. } | RebuildError::Fenced { .. }
        )
    }
}

impl Partition {
    /// Rebuilds column `task.column` of `task.grant` into `task.new` (see
    /// the module docs). `progress` receives the byte counts as rows are
    /// appended; `confirm(epoch)` must commit the completion (the control
    /// plane's `CompleteRepair`) and return only once this head node's view
    /// of the control plane shows it; it runs under the flush lock, so no
    /// stripe can go to the old column after it.
    pub async fn rebuild_column<C, F>(
        &self,
        task: RebuildTask,
        progress: &watch::Sender<RebuildProgress>,
        confirm: C,
    ) -> Result<RebuildProgress, RebuildError>
    where
        C: FnOnce(u64) -> F,
        F: std::future::Future<Output = Result<(), String>>,
    {
        let shared = &self.shared;
        let extent = task.grant.extent;
        let bad = |reason: String| RebuildError::BadTask { extent, reason };
        let (k, m) = (usize::from(task.grant.k), usize::from(task.grant.m));
        if task.grant.columns.len() != k + m || usize::from(task.column) >= k + m {
            return Err(bad(format!(
                "column {} of a {k}+{m} extent with {} columns",
                task.column,
                task.grant.columns.len()
            )));
        }
        if task
            .grant
            .present()
            .any(|(i, (sled, _))| i != usize::from(task.column) && *sled == task.new.0)
        {
            return Err(bad(format!(
                "replacement on sled {} which holds another column (invariant 3)",
                task.new.0
            )));
        }
        let codec = Arc::new(ErasureCodec::new(k, m).map_err(|e| bad(e.to_string()))?);
        let epoch = primary_epoch(shared)?;

        // Seal, and learn how many rows the column holds.
        let known_rows = {
            let _serial = shared.flush_lock.lock().await;
            seal(shared, extent)
        };
        let mut rows = match known_rows {
            Some(rows) => rows,
            None => surviving_rows(shared, &task, k).await?,
        };

        // Claim the replacement; its length is where a previous attempt stopped.
        let (new_sled, new_column) = task.new.clone();
        let claimed = sled_call(
            shared,
            &new_sled,
            SledRequest::Claim {
                column: new_column,
                partition: shared.id(),
                epoch,
            },
        )
        .await;
        let next_row = match claimed {
            Ok(SledResponse::Claimed { length_bytes, .. }) if length_bytes % ROW_BYTES == 0 => {
                length_bytes / ROW_BYTES
            }
            Ok(SledResponse::Claimed { length_bytes, .. }) => {
                return Err(RebuildError::NewColumn {
                    sled: new_sled,
                    reason: format!("holds {length_bytes} bytes, not whole rows"),
                })
            }
            Ok(SledResponse::Error(SledError::Fenced { current_epoch })) => {
                return Err(RebuildError::Fenced {
                    partition: shared.id(),
                    current: current_epoch,
                })
            }
            Ok(other) => {
                return Err(RebuildError::NewColumn {
                    sled: new_sled,
                    reason: format!("claim answered {other:?}"),
                })
            }
            Err(error) => {
                return Err(RebuildError::NewColumn {
                    sled: new_sled,
                    reason: error.to_string(),
                })
            }
        };

        let report = |next_row: u64, rows: u64| {
            let p = RebuildProgress {
                bytes_done: next_row.min(rows) * ROW_BYTES,
                bytes_total: rows * ROW_BYTES,
            };
            progress.send_replace(p);
            p
        };
        report(next_row, rows);
        let mut copy = RowCopy {
            shared,
            task: &task,
            codec: &codec,
            epoch,
            next_row,
            // One second of burst; the shared bucket (`proto::rate`).
            bucket: Pacer::new(
                task.rate_bytes_per_second.max(1),
                task.rate_bytes_per_second.max(1),
            ),
            report: &report,
        };
        copy.up_to(rows).await?;

        // Confirm under the flush lock: no stripe can be appended to the old
        // column between the last copied row and the switch.
        let serial = shared.flush_lock.lock().await;
        for _ in 0..CATCH_UP_PASSES {
            match seal(shared, extent) {
                Some(written) if written > rows => rows = written,
                _ => break,
            }
            copy.up_to(rows).await?;
        }
        if primary_epoch(shared)? != epoch {
            return Err(RebuildError::NotPrimary {
                partition: shared.id(),
            });
        }
        confirm(epoch)
            .await
            .map_err(|reason| RebuildError::Confirm { reason })?;
        {
            let mut state = shared.lock();
            if let Some(e) = state.extents.get_mut(&extent) {
                if let Some(slot) = e.grant.columns.get_mut(usize::from(task.column)) {
                    *slot = task.new.clone();
                    e.grant.owed.remove(&task.column);
                }
            }
        }
        drop(serial);
        Ok(report(copy.next_row, rows))
    }
}

fn primary_epoch(shared: &Shared) -> Result<u64, RebuildError> {
    let state = shared.lock();
    match state.core.role {
        Role::Primary => Ok(state.core.epoch),
        _ => Err(RebuildError::NotPrimary {
            partition: shared.id(),
        }),
    }
}

/// Seals the extent if the partition knows it; returns the rows it wrote.
fn seal(shared: &Shared, extent: u64) -> Option<u64> {
    let mut state = shared.lock();
    if state.open_extent == Some(extent) {
        state.open_extent = None;
    }
    let e = state.extents.get_mut(&extent)?;
    e.sealed = true;
    Some(e.rows_written)
}

/// Rows of an extent the partition never opened: the k-th longest of the
/// surviving columns (a row counts only if k columns hold it).
async fn surviving_rows(
    shared: &Shared,
    task: &RebuildTask,
    k: usize,
) -> Result<u64, RebuildError> {
    let statuses = task
        .grant
        .present()
        .filter(|(i, _)| *i != usize::from(task.column))
        .map(|(_, (sled, column))| {
            sled_call(shared, sled, SledRequest::ColumnStatus { column: *column })
        });
    let mut lengths: Vec<u64> = future::join_all(statuses)
        .await
        .into_iter()
        .filter_map(|r| match r {
            Ok(SledResponse::ColumnStatus(status)) => Some(status.length_bytes),
            _ => None,
        })
        .collect();
    if lengths.len() < k {
        return Err(RebuildError::Unrecoverable {
            extent: task.grant.extent,
            row: 0,
            available: lengths.len(),
            needed: k,
        });
    }
    lengths.sort_unstable_by(|a, b| b.cmp(a));
    Ok(lengths[k - 1] / ROW_BYTES)
}

/// Copies rebuilt rows to the new column, from `next_row` on, at most at
/// the task's rate, reporting progress after every batch.
struct RowCopy<'a, R> {
    shared: &'a Shared,
    task: &'a RebuildTask,
    codec: &'a Arc<ErasureCodec>,
    epoch: u64,
    /// The first row not yet on the new column.
    next_row: u64,
    bucket: Pacer,
    report: &'a R,
}

impl<R> RowCopy<'_, R>
where
    R: Fn(u64, u64) -> RebuildProgress,
{
    /// Copies rows `next_row..rows`.
    async fn up_to(&mut self, rows: u64) -> Result<(), RebuildError> {
        let (shared, task, codec) = (self.shared, self.task, self.codec);
        // Bounded: every iteration appends at least one row or returns.
        while self.next_row < rows {
            let count = BATCH_ROWS.min(rows - self.next_row);
            let mut last_error = None;
            let mut data = None;
            for _ in 0..BATCH_ATTEMPTS {
                match rebuild_rows(shared, task, codec, self.next_row, count).await {
                    Ok(rebuilt) => {
                        data = Some(rebuilt);
                        break;
                    }
                    Err(error) => last_error = Some(error),
                }
            }
            let Some((data, block_crcs)) = data else {
                return Err(last_error.unwrap_or(RebuildError::Unrecoverable {
                    extent: task.grant.extent,
                    row: self.next_row,
                    available: 0,
                    needed: codec.data_shards(),
                }));
            };
            self.bucket.acquire(data.len() as u64).await;
            let offset = self.next_row * ROW_BYTES;
            append(shared, task, self.epoch, offset, data, block_crcs).await?;
            self.next_row += count;
            (self.report)(self.next_row, rows);
        }
        Ok(())
    }
}

async fn append(
    shared: &Shared,
    task: &RebuildTask,
    epoch: u64,
    offset: u64,
    data: Bytes,
    block_crcs: Vec<u32>,
) -> Result<(), RebuildError> {
    let (sled, column) = &task.new;
    let request = SledRequest::Append {
        column: *column,
        partition: shared.id(),
        epoch,
        offset_bytes: offset,
        data,
        block_crcs,
    };
    let mut last = String::new();
    // Appends are idempotent (same offset, same CRCs): one retry.
    for _ in 0..2 {
        match sled_call(shared, sled, request.clone()).await {
            Ok(SledResponse::Appended { .. }) => return Ok(()),
            Ok(SledResponse::Error(SledError::Fenced { current_epoch })) => {
                shared.fence(current_epoch);
                return Err(RebuildError::Fenced {
                    partition: shared.id(),
                    current: current_epoch,
                });
            }
            Ok(other) => last = format!("append answered {other:?}"),
            Err(error) => last = error.to_string(),
        }
    }
    Err(RebuildError::NewColumn {
        sled: sled.clone(),
        reason: last,
    })
}

/// Reads `count` rows from the surviving columns and returns the rebuilt
/// rows of the missing column (chunk + summary each) with block CRCs.
async fn rebuild_rows(
    shared: &Shared,
    task: &RebuildTask,
    codec: &ErasureCodec,
    first_row: u64,
    count: u64,
) -> Result<(Bytes, Vec<u32>), RebuildError> {
    let extent = task.grant.extent;
    let k = codec.data_shards();
    let target = usize::from(task.column);
    let len = count * ROW_BYTES;
    let reads = task
        .grant
        .columns
        .iter()
        .enumerate()
        .map(|(i, (sled, column))| async move {
            // The target and owed columns hold nothing to read.
            if i == target || task.grant.is_owed(i) {
                return None;
            }
            read_verified(shared, sled, *column, first_row * ROW_BYTES, len).await
        });
    let columns: Vec<Option<Bytes>> = future::join_all(reads).await;
    let available = columns.iter().filter(|c| c.is_some()).count();
    if available < k {
        return Err(RebuildError::Unrecoverable {
            extent,
            row: first_row,
            available,
            needed: k,
        });
    }
    let zero_crc = crc32c::crc32c(&[0u8; BLOCK_SIZE_BYTES as usize]);
    let mut out = BytesMut::with_capacity(len as usize);
    let mut crcs = Vec::with_capacity((count * (CHUNK_BLOCKS + 1)) as usize);
    for r in 0..count {
        let row = first_row + r;
        let at = (r * ROW_BYTES) as usize;
        let chunk_end = at + CHUNK_BYTES as usize;
        let row_end = at + ROW_BYTES as usize;
        // Any surviving column's summary describes the stripe.
        let summary = columns.iter().flatten().find_map(|c| {
            let block = &c[chunk_end..row_end];
            StripeSummary::decode(block)
                .ok()
                .filter(|s| s.extent == extent && s.stripe == row)
                .map(|s| (s, Bytes::copy_from_slice(block)))
        });
        let Some((summary, summary_block)) = summary else {
            return Err(RebuildError::Corrupt {
                extent,
                row,
                reason: "no surviving column holds a valid summary".to_string(),
            });
        };
        let mut shards: Vec<Option<Vec<u8>>> = columns
            .iter()
            .map(|c| c.as_ref().map(|c| c[at..chunk_end].to_vec()))
            .collect();
        codec
            .reconstruct(&mut shards)
            .map_err(|e| RebuildError::Corrupt {
                extent,
                row,
                reason: e.to_string(),
            })?;
        // End to end: every data chunk (decoded or read) matches the
        // summary, so the parity encoded from them is right too.
        for (d, shard) in shards.iter().take(k).enumerate() {
            let Some(shard) = shard else {
                return Err(RebuildError::Corrupt {
                    extent,
                    row,
                    reason: format!("data column {d} not decoded"),
                });
            };
            for (b, block) in shard.chunks(BLOCK_SIZE_BYTES as usize).enumerate() {
                let slot = d * CHUNK_BLOCKS as usize + b;
                let want = summary
                    .slots
                    .get(slot)
                    .copied()
                    .flatten()
                    .map_or(zero_crc, |s| s.crc);
                if crc32c::crc32c(block) != want {
                    return Err(RebuildError::Corrupt {
                        extent,
                        row,
                        reason: format!("data column {d} block {b} does not match the summary"),
                    });
                }
            }
        }
        let Some(Some(chunk)) = shards.get(target) else {
            return Err(RebuildError::Corrupt {
                extent,
                row,
                reason: "target column not decoded".to_string(),
            });
        };
        for block in chunk.chunks(BLOCK_SIZE_BYTES as usize) {
            crcs.push(crc32c::crc32c(block));
        }
        crcs.push(crc32c::crc32c(&summary_block));
        out.extend_from_slice(chunk);
        out.extend_from_slice(&summary_block);
    }
    debug_assert_eq!(out.len() as u64, len);
    Ok((out.freeze(), crcs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// One second of burst passes at once; the rest is paced at the rate.
    #[tokio::test]
    async fn token_bucket_paces_beyond_one_second_of_burst() {
        use futures::FutureExt as _;
        let mut bucket = Pacer::new(1 << 20, 1 << 20);
        // A full bucket: the burst is ready at the first poll (no sleep).
        assert!(
            bucket.acquire(1 << 20).now_or_never().is_some(),
            "one second's worth waited"
        );
        let start = Instant::now();
        bucket.acquire(256 << 10).await;
        bucket.acquire(256 << 10).await;
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(450),
            "0.5 MiB past the burst at 1 MiB/s passed in {elapsed:?}"
        );
        // Paced by the deficit, not by something far longer (a sanity
        // bound, ten times the expected 0.5 s).
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    }
}
