//! The read path: index → log, the one data column, or a degraded decode.
//!
//! Every block returned passed a CRC-32C: log blocks against their record
//! header, sled blocks against the CRC recorded in the stripe summary (and
//! the sled's own stored CRCs), decoded blocks against the summary CRC after
//! reconstruction. A sled column that errs, is slower than the hedge timeout
//! or returns a bad block is replaced by k other chunks of the stripe. Only a
//! column that **failed** (error, no answer within `sled_timeout`, bad
//! checksum) is reported to the repair queue: one that is merely slower than
//! the hedge timeout is not broken (the hedged degraded read may answer
//! first, and the direct read is left to finish in the background, reported
//! only if it then fails).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::{self, Either};
use proto::sled::{ColumnId, SledError, SledRequest, SledResponse};

use super::layout::{self, CHUNK_BYTES, ROW_BYTES};
use super::{bump, ColumnFault, PartitionError, RepairItem, Shared};
use crate::index::{Location, LookupPiece};
use crate::wal::WalError;
use proto::BLOCK_SIZE_BYTES;

/// Attempts when the index moved under a read (flush, GC, log release).
const READ_ATTEMPTS: usize = 4;

/// Reads partition blocks `lba..lba+count`.
pub(super) async fn read_blocks(
    shared: &Arc<Shared>,
    lba: u64,
    count: u64,
) -> Result<Bytes, PartitionError> {
    for _ in 0..READ_ATTEMPTS {
        if let Ok(result) = read_once(shared, lba, count).await {
            return result;
        }
    }
    Err(shared.unavailable(format!("blocks {lba}+{count} kept moving during the read")))
}

/// The index changed between lookup and read; look up again.
struct Moved;

/// Where a run of blocks is read from.
enum Fetch {
    Zeros,
    Log {
        position: crate::wal::LogPosition,
        first: u32,
    },
    Sled {
        extent: u64,
        column: u16,
        stripe: u64,
        block: u64,
    },
}

/// Blocks `lba..lba + block_count` of a read, and where they come from.
struct PlannedFetch {
    /// First partition block.
    lba: u64,
    /// Blocks.
    block_count: u64,
    fetch: Fetch,
}

async fn read_once(
    shared: &Arc<Shared>,
    lba: u64,
    count: u64,
) -> Result<Result<Bytes, PartitionError>, Moved> {
    let pieces = {
        let state = shared.lock();
        match state.index.lookup(lba, count) {
            Ok(pieces) => pieces,
            Err(source) => {
                return Ok(Err(PartitionError::Index {
                    partition: shared.id(),
                    source,
                }))
            }
        }
    };
    // Split into fetches of contiguous blocks.
    let mut fetches: Vec<PlannedFetch> = Vec::new();
    for LookupPiece {
        lbas: range,
        location,
    } in pieces
    {
        match location {
            None => fetches.push(PlannedFetch {
                lba: range.start,
                block_count: range.end - range.start,
                fetch: Fetch::Zeros,
            }),
            Some(Location::Log {
                position,
                block_in_record,
            }) => fetches.push(PlannedFetch {
                lba: range.start,
                block_count: range.end - range.start,
                fetch: Fetch::Log {
                    position,
                    first: block_in_record,
                },
            }),
            Some(Location::Sled {
                extent,
                column,
                offset_bytes,
            }) => {
                let mut at = range.start;
                let mut offset = offset_bytes;
                while at < range.end {
                    let Some((stripe, block)) = layout::split_offset(offset) else {
                        return Ok(Err(PartitionError::Recovery {
                            partition: shared.id(),
                            reason: format!(
                                "index points at non-data offset {offset} of extent {extent}"
                            ),
                        }));
                    };
                    let n = (layout::CHUNK_BLOCKS - block).min(range.end - at);
                    fetches.push(PlannedFetch {
                        lba: at,
                        block_count: n,
                        fetch: Fetch::Sled {
                            extent,
                            column,
                            stripe,
                            block,
                        },
                    });
                    at += n;
                    // Next stripe's row starts after the summary block.
                    offset = layout::block_offset(stripe + 1, 0);
                }
            }
        }
    }
    let futures = fetches
        .iter()
        .map(|planned| fetch_one(shared, planned.block_count, &planned.fetch));
    let results = future::join_all(futures).await;
    let mut out = BytesMut::with_capacity((count * BLOCK_SIZE_BYTES) as usize);
    for (planned, result) in fetches.iter().zip(results) {
        let at = planned.lba;
        debug_assert_eq!(out.len() as u64, (at - lba) * BLOCK_SIZE_BYTES);
        match result {
            Ok(data) => {
                debug_assert_eq!(data.len() as u64, planned.block_count * BLOCK_SIZE_BYTES);
                out.extend_from_slice(&data);
            }
            Err(FetchError::Moved) => return Err(Moved),
            Err(FetchError::Failed(PartitionError::ChecksumMismatch { partition, .. })) => {
                return Ok(Err(PartitionError::ChecksumMismatch {
                    partition,
                    offset_bytes: (shared.config.first_block + at) * BLOCK_SIZE_BYTES,
                }))
            }
            Err(FetchError::Failed(error)) => return Ok(Err(error)),
        }
    }
    Ok(Ok(out.freeze()))
}

enum FetchError {
    Moved,
    Failed(PartitionError),
}

async fn fetch_one(shared: &Arc<Shared>, n: u64, fetch: &Fetch) -> Result<Bytes, FetchError> {
    match *fetch {
        Fetch::Zeros => Ok(Bytes::from(vec![0u8; (n * BLOCK_SIZE_BYTES) as usize])),
        Fetch::Log { position, first } => {
            match shared
                .log
                .wal()
                .read_blocks(position, first, n as u32)
                .await
            {
                Ok(data) => Ok(data),
                // Released (flushed meanwhile) or overwritten after release:
                // the index has moved on.
                Err(WalError::NotFound { .. } | WalError::Corrupt { .. }) => Err(FetchError::Moved),
                Err(source) => Err(FetchError::Failed(shared.wal_error(source))),
            }
        }
        Fetch::Sled {
            extent,
            column,
            stripe,
            block,
        } => {
            let run = SledRun {
                extent,
                column,
                stripe,
                block,
                n,
            };
            read_sled(shared, run).await
        }
    }
}

/// `n` blocks from block `block` of chunk `column` of stripe `stripe` of
/// `extent`, as read from the sleds.
#[derive(Clone, Copy)]
struct SledRun {
    extent: u64,
    column: u16,
    stripe: u64,
    block: u64,
    n: u64,
}

/// What we know of an extent to read it.
#[derive(Clone)]
struct ExtentView {
    k: usize,
    columns: Vec<(String, ColumnId)>,
    /// Owed columns: read around, never read.
    owed: std::collections::BTreeSet<u16>,
    codec: Arc<crate::erasure::ErasureCodec>,
    expected: Vec<u32>,
}

fn view(shared: &Shared, run: SledRun) -> Option<ExtentView> {
    let state = shared.lock();
    let e = state.extents.get(&run.extent)?;
    let expected = (run.block..run.block + run.n)
        .map(|b| e.expected_crc(run.column, run.stripe, b))
        .collect::<Option<Vec<u32>>>()?;
    Some(ExtentView {
        k: usize::from(e.grant.k),
        columns: e.grant.columns.clone(),
        owed: e.grant.owed.clone(),
        codec: e.codec.clone(),
        expected,
    })
}

async fn read_sled(shared: &Arc<Shared>, run: SledRun) -> Result<Bytes, FetchError> {
    match read_sled_once(shared, run).await {
        // GC moved every live block out of the extent and freed (or is
        // freeing) it while we read it: the index has moved on, look up
        // again.
        Err(FetchError::Failed(_)) if extent_vacated(shared, run.extent) => Err(FetchError::Moved),
        other => other,
    }
}

fn extent_vacated(shared: &Shared, extent: u64) -> bool {
    let state = shared.lock();
    !state.extents.contains_key(&extent)
        || state
            .index
            .live_blocks_per_extent()
            .get(&extent)
            .is_none_or(|live| *live == 0)
}

async fn read_sled_once(shared: &Arc<Shared>, run: SledRun) -> Result<Bytes, FetchError> {
    let SledRun {
        column,
        stripe,
        block,
        n,
        ..
    } = run;
    // Freed by GC after our lookup: the index has moved on.
    let Some(view) = view(shared, run) else {
        return Err(FetchError::Moved);
    };
    let Some((sled, column_id)) = view.columns.get(usize::from(column)).cloned() else {
        return Err(FetchError::Moved);
    };
    if view.owed.contains(&column) {
        // Never written (degraded extent): decode it, nothing to report.
        return degraded_read(shared, run, view)
            .await
            .map_err(FetchError::Failed);
    }
    let offset = layout::block_offset(stripe, block);
    // A task, so that a slow direct read can finish (and be judged) after
    // a hedged degraded read answered.
    let mut direct = tokio::spawn({
        let shared = shared.clone();
        let sled = sled.clone();
        let expected = view.expected.clone();
        async move { read_column(&shared, &sled, column_id, offset, n, Some(&expected)).await }
    });
    let joined = |result: Result<Result<Bytes, ColumnFault>, tokio::task::JoinError>| {
        result.unwrap_or_else(|error| {
            Err(ColumnFault::unreadable(format!(
                "read task failed: {error}"
            )))
        })
    };
    let hedge = tokio::time::sleep(shared.config.hedge_timeout);
    let slow = match future::select(&mut direct, Box::pin(hedge)).await {
        Either::Left((result, _)) => match joined(result) {
            Ok(data) => return Ok(data),
            Err(fault) => {
                report(shared, run, &sled, fault);
                None
            }
        },
        Either::Right(((), _)) => Some(direct),
    };
    let degraded = Box::pin(degraded_read(shared, run, view.clone()));
    match slow {
        None => degraded.await.map_err(FetchError::Failed),
        Some(direct) => match future::select(direct, degraded).await {
            Either::Left((result, degraded)) => match joined(result) {
                Ok(data) => Ok(data),
                Err(fault) => {
                    report(shared, run, &sled, fault);
                    degraded.await.map_err(FetchError::Failed)
                }
            },
            Either::Right((Ok(data), direct)) => {
                // Slow is not broken: report the column only if the direct
                // read then fails (error, sled timeout, bad checksum).
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(fault) = joined(direct.await) {
                        report(&shared, run, &sled, fault);
                    }
                });
                Ok(data)
            }
            Either::Right((Err(error), direct)) => match joined(direct.await) {
                Ok(data) => Ok(data),
                Err(fault) => {
                    report(shared, run, &sled, fault);
                    Err(FetchError::Failed(error))
                }
            },
        },
    }
}

fn report(shared: &Shared, run: SledRun, sled: &str, fault: ColumnFault) {
    shared.report_repair(RepairItem {
        extent: run.extent,
        column: run.column,
        sled: sled.to_string(),
        stripe: run.stripe,
        kind: fault.kind,
        reason: fault.reason,
    });
}

/// Reads `n` blocks at `offset` of one column and checks them against the
/// sled's stored CRCs and, if given, the summary CRCs.
async fn read_column(
    shared: &Shared,
    sled: &str,
    column: ColumnId,
    offset: u64,
    n: u64,
    expected: Option<&[u32]>,
) -> Result<Bytes, ColumnFault> {
    let request = SledRequest::Read {
        column,
        offset_bytes: offset,
        len_bytes: (n * BLOCK_SIZE_BYTES) as u32,
    };
    let call = shared.sleds.call(sled, request);
    let response = match tokio::time::timeout(shared.config.sled_timeout, call).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => return Err(ColumnFault::unreadable(error.to_string())),
        Err(_) => {
            return Err(ColumnFault::unreadable(format!(
                "no answer within {:?}",
                shared.config.sled_timeout
            )))
        }
    };
    let (data, stored) = match response {
        SledResponse::Data { data, block_crcs } => (data, block_crcs),
        SledResponse::Error(error @ SledError::ChecksumMismatch { .. }) => {
            bump(&shared.metrics.checksum_errors);
            return Err(ColumnFault::corrupt(error.to_string()));
        }
        SledResponse::Error(error) => return Err(ColumnFault::unreadable(error.to_string())),
        other => {
            return Err(ColumnFault::unreadable(format!(
                "unexpected answer {other:?}"
            )))
        }
    };
    if data.len() as u64 != n * BLOCK_SIZE_BYTES || stored.len() as u64 != n {
        return Err(ColumnFault::unreadable(format!(
            "short read: {} bytes, {} CRCs",
            data.len(),
            stored.len()
        )));
    }
    for (i, chunk) in data.chunks(BLOCK_SIZE_BYTES as usize).enumerate() {
        let crc = crc32c::crc32c(chunk);
        let want = expected.map_or(stored[i], |e| e[i]);
        if crc != stored[i] || crc != want {
            bump(&shared.metrics.checksum_errors);
            return Err(ColumnFault::corrupt(format!(
                "block {} at offset {} fails its CRC (computed {crc:#010x}, stored {:#010x}, summary {want:#010x})",
                i,
                offset + i as u64 * BLOCK_SIZE_BYTES,
                stored[i]
            )));
        }
    }
    Ok(data)
}

/// Reads the other chunks of the stripe, decodes the wanted column and
/// checks the decoded blocks against the summary CRCs.
async fn degraded_read(
    shared: &Arc<Shared>,
    run: SledRun,
    view: ExtentView,
) -> Result<Bytes, PartitionError> {
    let SledRun {
        extent,
        column,
        stripe,
        block,
        n,
    } = run;
    bump(&shared.metrics.degraded_reads);
    let row = stripe * ROW_BYTES;
    let chunk_blocks = CHUNK_BYTES / BLOCK_SIZE_BYTES;
    let reads = view.columns.iter().enumerate().map(|(i, (sled, id))| {
        let want =
            i != usize::from(column) && u16::try_from(i).is_ok_and(|i| !view.owed.contains(&i));
        let sled = sled.clone();
        let id = *id;
        async move {
            if !want {
                return None;
            }
            match read_column(shared, &sled, id, row, chunk_blocks, None).await {
                Ok(data) => Some(data.to_vec()),
                Err(fault) => {
                    tracing::debug!(
                        extent,
                        column = i,
                        stripe,
                        reason = fault.reason,
                        "chunk unavailable for a degraded read"
                    );
                    None
                }
            }
        }
    });
    let mut shards: Vec<Option<Vec<u8>>> = future::join_all(reads).await;
    let available = shards.iter().filter(|s| s.is_some()).count();
    let unrecoverable = || PartitionError::Unrecoverable {
        partition: shared.id(),
        extent,
        stripe,
        available,
        needed: view.k,
    };
    if available < view.k {
        return Err(unrecoverable());
    }
    view.codec
        .reconstruct_data(&mut shards)
        .map_err(|source| PartitionError::Erasure {
            partition: shared.id(),
            extent,
            source,
        })?;
    let Some(Some(chunk)) = shards.get(usize::from(column)) else {
        return Err(unrecoverable());
    };
    let from = (block * BLOCK_SIZE_BYTES) as usize;
    let data = &chunk[from..from + (n * BLOCK_SIZE_BYTES) as usize];
    for (i, b) in data.chunks(BLOCK_SIZE_BYTES as usize).enumerate() {
        if crc32c::crc32c(b) != view.expected[i] {
            bump(&shared.metrics.checksum_errors);
            return Err(PartitionError::ChecksumMismatch {
                partition: shared.id(),
                offset_bytes: 0,
            });
        }
    }
    Ok(Bytes::copy_from_slice(data))
}
