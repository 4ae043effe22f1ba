//! The read path: index → log, the data columns, or a degraded decode.
//!
//! **Plan.** A host read looks its blocks up in the index once and plans
//! the fetches ([`plan`], pure): zeros, log records, and **one sled request
//! per stretch of a column**. The index's runs of blocks on the sleds are
//! cut at stripe boundaries (a chunk is 16 blocks, followed on the column
//! by the stripe's summary block); the pieces of the read that are
//! consecutive data blocks of the same column of the same extent (whatever
//! their order in the volume) become one [`ColumnRead`], which also reads
//! the summary blocks between its stripes and drops them. A 1 MiB
//! sequential read of a 4+2 extent is 4 requests (one per data column),
//! not 16; after random writes, runs that GC or the flush laid side by side
//! are read together. Gaps are not read across. Every request, log read
//! and zero fill of the read runs concurrently (joined futures, no task per
//! piece).
//!
//! **Checks.** Every block returned passed a CRC-32C: log blocks against
//! their record header, sled blocks against the CRC recorded in the stripe
//! summary and the sled's stored CRC (the summary blocks a request reads
//! in passing against the stored CRC), decoded blocks against the summary
//! CRC after reconstruction.
//!
//! **Faults.** A column request that errs or returns a bad block before the
//! hedge timeout is split: each of its per-stripe pieces is read again on
//! its own (hedged as below), so the faulty stripe is found and reported
//! exactly and the others are still served directly. A request slower than
//! the hedge timeout is raced against degraded reads (k other chunks of
//! each stripe, decoded) of all its pieces; whichever answers first wins.
//! Only a column that **failed** (error, no answer within `sled_timeout`,
//! bad checksum) is reported to the repair queue, for the stripes it
//! failed (the bad blocks' stripes, or all the request's stripes for an
//! error): one that is merely slower than the hedge timeout is not broken
//! (the hedged degraded read may answer first, and the direct read is then
//! left to finish in a task of its own, reported only if it fails). A
//! column the extent still owes (degraded extent) is decoded, never read.
//!
//! **Clones.** A clone's partition ([`PartitionConfig::parent`]) reads the
//! blocks its index has no version of (never written: a trim leaves a
//! tombstone, which reads zeros) from its parent snapshot
//! ([`ParentSnapshot`]), found in the same index lookup as the rest of the
//! read; the live view and the clone's own snapshots alike, and the
//! read-modify-write of a partial block too. A parent that cannot be read
//! fails the read as retryable `Unavailable` (never zeros).
//!
//! [`PartitionConfig::parent`]: super::PartitionConfig::parent

use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::{self, Either, Future};
use proto::sled::{ColumnId, SledError, SledRequest, SledResponse};

use super::layout::{self, CHUNK_BYTES, ROW_BYTES};
use super::seams::ParentSnapshot;
use super::{bump, ColumnFault, PartitionError, RepairItem, Shared};
use crate::index::{Location, LookupPiece};
use crate::wal::WalError;
use proto::BLOCK_SIZE_BYTES;

/// Attempts when the index moved under a read (flush, GC, log release).
const READ_ATTEMPTS: usize = 4;

/// Most column bytes one sled read request covers (data and summaries).
pub(super) const MAX_COLUMN_READ_BYTES: u64 = 4 << 20;

/// Reads partition blocks `lba..lba+count`.
pub(super) async fn read_blocks(
    shared: &Arc<Shared>,
    lba: u64,
    count: u64,
) -> Result<Bytes, PartitionError> {
    read_view(shared, None, lba, count).await
}

/// Reads partition blocks `lba..lba+count` of the live volume (`None`) or
/// of snapshot `Some(id)` (its layer over the live index).
pub(super) async fn read_view(
    shared: &Arc<Shared>,
    snapshot: Option<u64>,
    lba: u64,
    count: u64,
) -> Result<Bytes, PartitionError> {
    for _ in 0..READ_ATTEMPTS {
        if let Ok(result) = read_once(shared, snapshot, lba, count).await {
            return result;
        }
    }
    Err(shared.unavailable(format!("blocks {lba}+{count} kept moving during the read")))
}

/// The index changed between lookup and read; look up again.
struct Moved;

/// Where a run of blocks is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fetch {
    Zeros,
    Log {
        position: crate::wal::LogPosition,
        first: u32,
    },
    /// Piece `run` of sled request `read` of the plan.
    Sled {
        read: usize,
        run: usize,
    },
}

/// Blocks `lba..lba + block_count` of a read, and where they come from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PlannedFetch {
    /// First partition block.
    lba: u64,
    /// Blocks.
    block_count: u64,
    fetch: Fetch,
}

/// `n` blocks from block `block` of chunk `column` of stripe `stripe` of
/// `extent`, as read from the sleds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SledRun {
    extent: u64,
    column: u16,
    stripe: u64,
    block: u64,
    n: u64,
}

impl SledRun {
    fn offset_bytes(&self) -> u64 {
        layout::block_offset(self.stripe, self.block)
    }

    /// Column offset of the data block after the run's last one (the
    /// stripe's summary block is skipped).
    fn next_data_offset(&self) -> u64 {
        let end = self.block + self.n;
        if end < layout::CHUNK_BLOCKS {
            layout::block_offset(self.stripe, end)
        } else {
            layout::block_offset(self.stripe + 1, 0)
        }
    }
}

/// A run and where its blocks sit in the reply of its [`ColumnRead`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RunInRead {
    run: SledRun,
    /// Index of the run's first block among the request's blocks.
    at_block: u64,
}

/// One sled read request: consecutive column blocks from `offset_bytes`,
/// the data blocks of `runs` and the summary blocks between their stripes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ColumnRead {
    extent: u64,
    column: u16,
    offset_bytes: u64,
    /// Column blocks read.
    blocks: u64,
    /// The pieces served, in column order.
    runs: Vec<RunInRead>,
}

impl ColumnRead {
    fn alone(run: SledRun) -> Self {
        ColumnRead {
            extent: run.extent,
            column: run.column,
            offset_bytes: run.offset_bytes(),
            blocks: run.n,
            runs: vec![RunInRead { run, at_block: 0 }],
        }
    }

    /// Adds `run` if it starts at the data block after this request's last
    /// one on the same column and the request stays within `max_bytes`.
    fn try_extend(&mut self, run: SledRun, max_bytes: u64) -> bool {
        let Some(last) = self.runs.last() else {
            return false;
        };
        if run.extent != self.extent
            || run.column != self.column
            || run.offset_bytes() != last.run.next_data_offset()
        {
            return false;
        }
        let at_block = (run.offset_bytes() - self.offset_bytes) / BLOCK_SIZE_BYTES;
        let blocks = at_block + run.n;
        if blocks * BLOCK_SIZE_BYTES > max_bytes {
            return false;
        }
        self.blocks = blocks;
        self.runs.push(RunInRead { run, at_block });
        true
    }
}

/// What a read fetches: its pieces in LBA order and the sled requests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct ReadPlan {
    fetches: Vec<PlannedFetch>,
    reads: Vec<ColumnRead>,
}

/// The index points at an offset that holds no data block.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NotData {
    extent: u64,
    offset_bytes: u64,
}

/// Plans a read from its lookup (pure): log and zero pieces as they are,
/// sled pieces cut per stripe, then the pieces that are consecutive data
/// blocks of one column gathered into one request of at most `max_bytes`
/// (module docs).
fn plan(pieces: Vec<LookupPiece>, max_bytes: u64) -> Result<ReadPlan, NotData> {
    let mut fetches: Vec<PlannedFetch> = Vec::new();
    let mut runs: Vec<(usize, SledRun)> = Vec::new();
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
                        return Err(NotData {
                            extent,
                            offset_bytes: offset,
                        });
                    };
                    let n = (layout::CHUNK_BLOCKS - block).min(range.end - at);
                    runs.push((
                        fetches.len(),
                        SledRun {
                            extent,
                            column,
                            stripe,
                            block,
                            n,
                        },
                    ));
                    fetches.push(PlannedFetch {
                        lba: at,
                        block_count: n,
                        // Set below, once the run has its request.
                        fetch: Fetch::Zeros,
                    });
                    at += n;
                    // Next stripe's row starts after the summary block.
                    offset = layout::block_offset(stripe + 1, 0);
                }
            }
        }
    }
    // Column order: consecutive blocks of a column end up side by side.
    runs.sort_by_key(|(_, run)| (run.extent, run.column, run.offset_bytes()));
    let mut reads: Vec<ColumnRead> = Vec::new();
    for (fetch, run) in runs {
        let extended = reads
            .last_mut()
            .is_some_and(|read| read.try_extend(run, max_bytes));
        if !extended {
            reads.push(ColumnRead::alone(run));
        }
        if let (Some(read), Some(planned)) = (reads.last(), fetches.get_mut(fetch)) {
            planned.fetch = Fetch::Sled {
                read: reads.len() - 1,
                run: read.runs.len() - 1,
            };
        }
    }
    Ok(ReadPlan { fetches, reads })
}

async fn read_once(
    shared: &Arc<Shared>,
    snapshot: Option<u64>,
    lba: u64,
    count: u64,
) -> Result<Result<Bytes, PartitionError>, Moved> {
    let (pieces, holes) = {
        let state = shared.lock();
        let index = &state.core.index;
        let found = match snapshot {
            None => index.lookup_with_sequence(lba, count),
            Some(id) => index.lookup_snapshot(id, lba, count),
        };
        match found {
            Ok(mapped) => {
                // A clone's never-written blocks (no version at all, not
                // a tombstone) read as its parent snapshot's, found under
                // the same lock as the rest of the read's view.
                let holes: Vec<Range<u64>> = if shared.config.parent.is_some() {
                    mapped
                        .iter()
                        .filter(|m| m.location.is_none() && m.sequence.is_none())
                        .map(|m| m.lbas.clone())
                        .collect()
                } else {
                    Vec::new()
                };
                let pieces: Vec<LookupPiece> = mapped
                    .into_iter()
                    .map(|m| LookupPiece {
                        lbas: m.lbas,
                        location: m.location,
                    })
                    .collect();
                (pieces, holes)
            }
            Err(source) => {
                return Ok(Err(PartitionError::Index {
                    partition: shared.id(),
                    source,
                }))
            }
        }
    };
    let ReadPlan { fetches, reads } = match plan(pieces, MAX_COLUMN_READ_BYTES) {
        Ok(plan) => plan,
        Err(NotData {
            extent,
            offset_bytes,
        }) => {
            return Ok(Err(PartitionError::Recovery {
                partition: shared.id(),
                reason: format!(
                    "index points at non-data offset {offset_bytes} of extent {extent}"
                ),
            }))
        }
    };
    shared
        .metrics
        .sled_reads
        .fetch_add(reads.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let log_reads = future::join_all(
        fetches
            .iter()
            .filter(|planned| matches!(planned.fetch, Fetch::Log { .. }))
            .map(|planned| fetch_one(shared, planned.block_count, &planned.fetch)),
    );
    let sled_reads = future::join_all(reads.iter().map(|read| read_column_runs(shared, read)));
    let (log_results, mut sled_results) = future::join(log_reads, sled_reads).await;
    let mut log_results = log_results.into_iter();
    let mut out = BytesMut::with_capacity((count * BLOCK_SIZE_BYTES) as usize);
    for planned in &fetches {
        let at = planned.lba;
        debug_assert_eq!(out.len() as u64, (at - lba) * BLOCK_SIZE_BYTES);
        let (at, result) = match planned.fetch {
            Fetch::Zeros => {
                out.resize(
                    out.len() + (planned.block_count * BLOCK_SIZE_BYTES) as usize,
                    0,
                );
                continue;
            }
            Fetch::Log { .. } => (at, log_results.next().unwrap_or(Err(FetchError::Moved))),
            Fetch::Sled { read, run } => match sled_results.get_mut(read) {
                Some(Ok(data)) => (at, data.get(run).cloned().ok_or(FetchError::Moved)),
                Some(failed @ Err(_)) => match std::mem::replace(failed, Ok(Vec::new())) {
                    // The error is the failed piece's (its first block).
                    Err((run, error)) => {
                        (failed_lba(&fetches, read, run).unwrap_or(at), Err(error))
                    }
                    Ok(_) => (at, Err(FetchError::Moved)),
                },
                None => (at, Err(FetchError::Moved)),
            },
        };
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
    if let Some(parent) = &shared.config.parent {
        if let Err(error) = fill_from_parent(shared, parent.as_ref(), lba, &holes, &mut out).await {
            return Ok(Err(error));
        }
    }
    Ok(Ok(out.freeze()))
}

/// Overwrites the zeros of a clone's never-written blocks `holes` (of a
/// read from block `lba` assembled in `out`) with its parent snapshot's
/// data, read from the parent partition's primary (the parent snapshot's
/// content never changes, so when it is read does not matter).
async fn fill_from_parent(
    shared: &Arc<Shared>,
    parent: &dyn ParentSnapshot,
    lba: u64,
    holes: &[Range<u64>],
    out: &mut BytesMut,
) -> Result<(), PartitionError> {
    let reads = holes.iter().map(|hole| {
        let offset_bytes = (shared.config.first_block + hole.start) * BLOCK_SIZE_BYTES;
        let len = (hole.end - hole.start) * BLOCK_SIZE_BYTES;
        async move {
            let len = u32::try_from(len).map_err(|_| PartitionError::BadRequest {
                partition: shared.id(),
                reason: format!("a parent read of {len} bytes"),
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
            Ok::<Bytes, PartitionError>(data)
        }
    });
    let results = future::join_all(reads).await;
    for (hole, result) in holes.iter().zip(results) {
        let data = result?;
        let at = ((hole.start - lba) * BLOCK_SIZE_BYTES) as usize;
        let Some(slot) = out.get_mut(at..at + data.len()) else {
            return Err(shared.unavailable("parent data outside the read"));
        };
        slot.copy_from_slice(&data);
        bump(&shared.metrics.parent_reads);
    }
    Ok(())
}

/// First block of piece `run` of request `read`.
fn failed_lba(fetches: &[PlannedFetch], read: usize, run: usize) -> Option<u64> {
    fetches
        .iter()
        .find(|planned| planned.fetch == Fetch::Sled { read, run })
        .map(|planned| planned.lba)
}

#[derive(Debug)]
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
        // Planned into column requests, never fetched one by one.
        Fetch::Sled { .. } => Err(FetchError::Moved),
    }
}

/// What we know of an extent to read it.
#[derive(Clone)]
struct ExtentView {
    k: usize,
    columns: Vec<(String, ColumnId)>,
    /// Owed columns: read around, never read.
    owed: std::collections::BTreeSet<u16>,
    codec: Arc<crate::erasure::ErasureCodec>,
}

/// The extent of `read` and the summary CRCs of each of its runs; `None`
/// if the extent or a CRC is gone (GC freed it after our lookup).
fn view(shared: &Shared, read: &ColumnRead) -> Option<(ExtentView, Vec<Vec<u32>>)> {
    let state = shared.lock();
    let e = state.extents.get(&read.extent)?;
    let expected = read
        .runs
        .iter()
        .map(|RunInRead { run, .. }| {
            (run.block..run.block + run.n)
                .map(|b| e.expected_crc(run.column, run.stripe, b))
                .collect::<Option<Vec<u32>>>()
        })
        .collect::<Option<Vec<Vec<u32>>>>()?;
    Some((
        ExtentView {
            k: usize::from(e.grant.k),
            columns: e.grant.columns.clone(),
            owed: e.grant.owed.clone(),
            codec: e.codec.clone(),
        },
        expected,
    ))
}

/// The data of each run of `read`, or the first run that failed and why.
type RunsResult = Result<Vec<Bytes>, (usize, FetchError)>;

async fn read_column_runs(shared: &Arc<Shared>, read: &ColumnRead) -> RunsResult {
    let result = match view(shared, read) {
        // Freed by GC after our lookup: the index has moved on.
        None => Err((0, FetchError::Moved)),
        Some((view, expected)) => read_column_runs_once(shared, read, &view, &expected).await,
    };
    match result {
        // GC moved every live block out of the extent and freed (or is
        // freeing) it while we read it: the index has moved on, look up
        // again.
        Err((run, FetchError::Failed(_))) if extent_vacated(shared, read.extent) => {
            Err((run, FetchError::Moved))
        }
        other => other,
    }
}

fn extent_vacated(shared: &Shared, extent: u64) -> bool {
    let state = shared.lock();
    !state.extents.contains_key(&extent)
        || state
            .core
            .index
            .live_blocks_per_extent()
            .get(&extent)
            .is_none_or(|live| *live == 0)
}

/// Per-run results to one result: every run's data or the first failure.
fn all_runs(results: Vec<Result<Bytes, PartitionError>>) -> RunsResult {
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.map_err(|e| (i, FetchError::Failed(e))))
        .collect()
}

async fn read_column_runs_once(
    shared: &Arc<Shared>,
    read: &ColumnRead,
    view: &ExtentView,
    expected: &[Vec<u32>],
) -> RunsResult {
    let Some((sled, column_id)) = view.columns.get(usize::from(read.column)).cloned() else {
        return Err((0, FetchError::Moved));
    };
    if view.owed.contains(&read.column) {
        // Never written (degraded extent): decode it, nothing to report.
        return all_runs(
            future::join_all(
                read.runs
                    .iter()
                    .zip(expected)
                    .map(|(r, expected)| degraded_read(shared, r.run, view, expected)),
            )
            .await,
        );
    }
    let target = Target {
        sled,
        column: column_id,
    };
    match hedged(shared, read, view, expected, &target, read.runs.len() > 1).await {
        Hedged::Done(result) => result,
        Hedged::Split => {
            // Each piece on its own, so that the faulty stripe is found (and
            // reported) exactly and the others are still read directly.
            let alone: Vec<ColumnRead> =
                read.runs.iter().map(|r| ColumnRead::alone(r.run)).collect();
            bump(&shared.metrics.sled_read_splits);
            let results = future::join_all(alone.iter().zip(expected).map(|(one, expected)| {
                hedged(
                    shared,
                    one,
                    view,
                    std::slice::from_ref(expected),
                    &target,
                    false,
                )
            }))
            .await;
            let mut out = Vec::with_capacity(results.len());
            for (i, result) in results.into_iter().enumerate() {
                match result {
                    Hedged::Done(Ok(mut data)) if data.len() == 1 => out.extend(data.pop()),
                    Hedged::Done(Err((_, error))) => return Err((i, error)),
                    // A one-piece request never splits.
                    Hedged::Done(Ok(_)) | Hedged::Split => return Err((i, FetchError::Moved)),
                }
            }
            Ok(out)
        }
    }
}

/// The sled and column a request goes to.
#[derive(Clone)]
struct Target {
    sled: String,
    column: ColumnId,
}

enum Hedged {
    Done(RunsResult),
    /// The direct read of a many-piece request failed before the hedge
    /// timeout: read the pieces one by one (nothing reported yet).
    Split,
}

/// A direct read of a column that failed, and which of its blocks (their
/// column offsets) were bad (`None`: the whole request failed).
#[derive(Debug)]
struct DirectFault {
    fault: ColumnFault,
    bad_offsets: Option<Vec<u64>>,
}

/// Reads `read` directly, hedged by degraded reads of its pieces (module
/// docs); `split`: a direct failure before the hedge timeout answers
/// [`Hedged::Split`] instead of decoding.
async fn hedged(
    shared: &Arc<Shared>,
    read: &ColumnRead,
    view: &ExtentView,
    expected: &[Vec<u32>],
    target: &Target,
    split: bool,
) -> Hedged {
    // The summary CRC of each block of the request (`None`: a summary
    // block between stripes, checked against the sled's stored CRC only).
    let mut per_block = vec![None; read.blocks as usize];
    for (r, crcs) in read.runs.iter().zip(expected) {
        for (i, crc) in crcs.iter().enumerate() {
            if let Some(slot) = per_block.get_mut(r.at_block as usize + i) {
                *slot = Some(*crc);
            }
        }
    }
    // Owned and boxed, so that a slow direct read can be left to finish
    // (and be judged) in a task of its own after a hedged degraded read
    // answered; no task while it is awaited here.
    let mut direct: Pin<Box<dyn Future<Output = Result<Bytes, DirectFault>> + Send>> =
        Box::pin(read_column(
            shared.clone(),
            target.clone(),
            read.offset_bytes,
            read.blocks,
            per_block,
        ));
    let pieces = |data: Bytes| -> Vec<Bytes> {
        read.runs
            .iter()
            .map(|r| {
                let from = (r.at_block * BLOCK_SIZE_BYTES) as usize;
                data.slice(from..from + (r.run.n * BLOCK_SIZE_BYTES) as usize)
            })
            .collect()
    };
    let hedge = tokio::time::sleep(shared.config.hedge_timeout);
    match future::select(&mut direct, Box::pin(hedge)).await {
        Either::Left((Ok(data), _)) => return Hedged::Done(Ok(pieces(data))),
        Either::Left((Err(_), _)) if split => return Hedged::Split,
        Either::Left((Err(fault), _)) => {
            report(shared, read, &target.sled, fault);
            return Hedged::Done(all_runs(degraded_reads(shared, read, view, expected).await));
        }
        Either::Right(((), _)) => {}
    }
    let degraded = Box::pin(degraded_reads(shared, read, view, expected));
    match future::select(direct, degraded).await {
        Either::Left((Ok(data), _)) => Hedged::Done(Ok(pieces(data))),
        Either::Left((Err(fault), degraded)) => {
            report(shared, read, &target.sled, fault);
            Hedged::Done(all_runs(degraded.await))
        }
        Either::Right((results, direct)) if results.iter().all(Result::is_ok) => {
            // Slow is not broken: report the column only if the direct
            // read then fails (error, sled timeout, bad checksum).
            let shared = shared.clone();
            let late = read.clone();
            let sled = target.sled.clone();
            tokio::spawn(async move {
                if let Err(fault) = direct.await {
                    report(&shared, &late, &sled, fault);
                }
            });
            Hedged::Done(all_runs(results))
        }
        Either::Right((results, direct)) => match direct.await {
            Ok(data) => Hedged::Done(Ok(pieces(data))),
            Err(fault) => {
                report(shared, read, &target.sled, fault);
                Hedged::Done(all_runs(results))
            }
        },
    }
}

/// Degraded reads of every piece of `read`, concurrently.
async fn degraded_reads(
    shared: &Arc<Shared>,
    read: &ColumnRead,
    view: &ExtentView,
    expected: &[Vec<u32>],
) -> Vec<Result<Bytes, PartitionError>> {
    future::join_all(
        read.runs
            .iter()
            .zip(expected)
            .map(|(r, expected)| degraded_read(shared, r.run, view, expected)),
    )
    .await
}

/// Reports the stripes of `read` that `fault` concerns: those of its bad
/// blocks, or every stripe of the request.
fn report(shared: &Shared, read: &ColumnRead, sled: &str, fault: DirectFault) {
    let mut stripes: Vec<u64> = read
        .runs
        .iter()
        .filter(|r| {
            fault.bad_offsets.as_ref().is_none_or(|bad| {
                let from = r.run.offset_bytes();
                let to = from + r.run.n * BLOCK_SIZE_BYTES;
                bad.iter().any(|at| (from..to).contains(at))
            })
        })
        .map(|r| r.run.stripe)
        .collect();
    if stripes.is_empty() {
        // Only a summary block between the pieces was bad: its stripe is
        // the one of the piece before it.
        stripes.extend(fault.bad_offsets.iter().flatten().map(|at| at / ROW_BYTES));
    }
    stripes.dedup();
    for stripe in stripes {
        shared.report_repair(RepairItem {
            extent: read.extent,
            column: read.column,
            sled: sled.to_string(),
            stripe,
            kind: fault.fault.kind,
            reason: fault.fault.reason.clone(),
        });
    }
}

/// Reads `n` column blocks at `offset` and checks each against the sled's
/// stored CRC and, where `expected` has one, the summary CRC.
async fn read_column(
    shared: Arc<Shared>,
    target: Target,
    offset: u64,
    n: u64,
    expected: Vec<Option<u32>>,
) -> Result<Bytes, DirectFault> {
    let whole = |fault| DirectFault {
        fault,
        bad_offsets: None,
    };
    let request = SledRequest::Read {
        column: target.column,
        offset_bytes: offset,
        len_bytes: (n * BLOCK_SIZE_BYTES) as u32,
    };
    let call = shared.sleds.call(&target.sled, request);
    let response = match tokio::time::timeout(shared.config.sled_timeout, call).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => return Err(whole(ColumnFault::unreadable(error.to_string()))),
        Err(_) => {
            return Err(whole(ColumnFault::unreadable(format!(
                "no answer within {:?}",
                shared.config.sled_timeout
            ))))
        }
    };
    let (data, stored) = match response {
        SledResponse::Data { data, block_crcs } => (data, block_crcs),
        SledResponse::Error(SledError::ChecksumMismatch {
            column,
            block_offsets_bytes,
        }) => {
            bump(&shared.metrics.checksum_errors);
            let error = SledError::ChecksumMismatch {
                column,
                block_offsets_bytes: block_offsets_bytes.clone(),
            };
            return Err(DirectFault {
                fault: ColumnFault::corrupt(error.to_string()),
                bad_offsets: Some(block_offsets_bytes),
            });
        }
        SledResponse::Error(error) => {
            return Err(whole(ColumnFault::unreadable(error.to_string())))
        }
        other => {
            return Err(whole(ColumnFault::unreadable(format!(
                "unexpected answer {other:?}"
            ))))
        }
    };
    if data.len() as u64 != n * BLOCK_SIZE_BYTES || stored.len() as u64 != n {
        return Err(whole(ColumnFault::unreadable(format!(
            "short read: {} bytes, {} CRCs",
            data.len(),
            stored.len()
        ))));
    }
    let mut bad = Vec::new();
    let mut first_bad = String::new();
    for (i, chunk) in data.chunks(BLOCK_SIZE_BYTES as usize).enumerate() {
        let crc = crc32c::crc32c(chunk);
        let want = expected.get(i).copied().flatten().unwrap_or(stored[i]);
        if crc != stored[i] || crc != want {
            let at = offset + i as u64 * BLOCK_SIZE_BYTES;
            if bad.is_empty() {
                first_bad = format!(
                    "block {i} at offset {at} fails its CRC (computed {crc:#010x}, stored {:#010x}, summary {want:#010x})",
                    stored[i]
                );
            }
            bad.push(at);
        }
    }
    if !bad.is_empty() {
        bump(&shared.metrics.checksum_errors);
        return Err(DirectFault {
            fault: ColumnFault::corrupt(first_bad),
            bad_offsets: Some(bad),
        });
    }
    Ok(data)
}

/// Reads the other chunks of the stripe, decodes the wanted column and
/// checks the decoded blocks against the summary CRCs.
async fn degraded_read(
    shared: &Arc<Shared>,
    run: SledRun,
    view: &ExtentView,
    expected: &[u32],
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
        let target = Target {
            sled: sled.clone(),
            column: *id,
        };
        async move {
            if !want {
                return None;
            }
            match read_column(shared.clone(), target, row, chunk_blocks, Vec::new()).await {
                Ok(data) => Some(data.to_vec()),
                Err(fault) => {
                    tracing::debug!(
                        extent,
                        column = i,
                        stripe,
                        reason = fault.fault.reason,
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
        if expected
            .get(i)
            .is_none_or(|want| crc32c::crc32c(b) != *want)
        {
            bump(&shared.metrics.checksum_errors);
            return Err(PartitionError::ChecksumMismatch {
                partition: shared.id(),
                offset_bytes: 0,
            });
        }
    }
    Ok(Bytes::copy_from_slice(data))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::index::PartitionIndex;
    use crate::wal::LogPosition;
    use proto::sled::PartitionId;

    const B: u64 = BLOCK_SIZE_BYTES;

    fn index() -> PartitionIndex {
        PartitionIndex::new(
            PartitionId {
                volume: 1,
                index: 0,
            },
            4096,
        )
    }

    fn sled(extent: u64, column: u16, stripe: u64, block: u64) -> Location {
        Location::Sled {
            extent,
            column,
            offset_bytes: layout::block_offset(stripe, block),
        }
    }

    fn log(position: u64) -> Location {
        Location::Log {
            position: LogPosition(position),
            block_in_record: 0,
        }
    }

    /// The plan of a read of `lba..lba+count` of `index`.
    fn plan_of(index: &PartitionIndex, lba: u64, count: u64, max_bytes: u64) -> ReadPlan {
        plan(index.lookup(lba, count).unwrap(), max_bytes).unwrap()
    }

    fn run(extent: u64, column: u16, stripe: u64, block: u64, n: u64) -> SledRun {
        SledRun {
            extent,
            column,
            stripe,
            block,
            n,
        }
    }

    /// (column, offset, blocks, [(stripe, block, n, at_block)]) of each request.
    type Shape = (u16, u64, u64, Vec<(u64, u64, u64, u64)>);

    fn shapes(plan: &ReadPlan) -> Vec<Shape> {
        plan.reads
            .iter()
            .map(|r| {
                (
                    r.column,
                    r.offset_bytes,
                    r.blocks,
                    r.runs
                        .iter()
                        .map(|x| (x.run.stripe, x.run.block, x.run.n, x.at_block))
                        .collect(),
                )
            })
            .collect()
    }

    /// Checks that the plan covers `lba..lba+count` in order and that each
    /// sled piece's request holds the piece's blocks at its `at_block`.
    fn check_covers(plan: &ReadPlan, lba: u64, count: u64) {
        let mut at = lba;
        for f in &plan.fetches {
            assert_eq!(f.lba, at);
            at += f.block_count;
            if let Fetch::Sled { read, run } = f.fetch {
                let r = &plan.reads[read];
                let piece = r.runs[run];
                assert_eq!(piece.run.n, f.block_count);
                assert_eq!(
                    r.offset_bytes + piece.at_block * B,
                    piece.run.offset_bytes()
                );
                assert!(piece.at_block + piece.run.n <= r.blocks);
            }
        }
        assert_eq!(at, lba + count);
    }

    #[test]
    fn a_sequential_stripe_set_is_one_request_per_column() {
        // Two stripes of a k = 2 extent written in order: 16 blocks per
        // chunk, column 0 then column 1, stripe 0 then stripe 1.
        let mut ix = index();
        for (i, (column, stripe)) in [(0, 0), (1, 0), (0, 1), (1, 1)].into_iter().enumerate() {
            ix.apply_write(i as u64 * 16, 16, 1, sled(7, column, stripe, 0))
                .unwrap();
        }
        let p = plan_of(&ix, 0, 64, MAX_COLUMN_READ_BYTES);
        check_covers(&p, 0, 64);
        // Each column: stripe 0's chunk, its summary block, stripe 1's chunk.
        assert_eq!(
            shapes(&p),
            vec![
                (0, 0, 33, vec![(0, 0, 16, 0), (1, 0, 16, 17)]),
                (1, 0, 33, vec![(0, 0, 16, 0), (1, 0, 16, 17)]),
            ]
        );
        assert_eq!(
            p.fetches.iter().map(|f| f.fetch).collect::<Vec<_>>(),
            vec![
                Fetch::Sled { read: 0, run: 0 },
                Fetch::Sled { read: 1, run: 0 },
                Fetch::Sled { read: 0, run: 1 },
                Fetch::Sled { read: 1, run: 1 },
            ]
        );
    }

    #[test]
    fn adjacent_runs_merge_and_gaps_do_not() {
        let mut ix = index();
        // Blocks 0..4 and 4..6 of the chunk (two writes: two index runs),
        // then a gap (block 6), then 7..9.
        ix.apply_write(0, 4, 1, sled(3, 2, 5, 0)).unwrap();
        ix.apply_write(4, 2, 2, sled(3, 2, 5, 4)).unwrap();
        ix.apply_write(6, 2, 3, sled(3, 2, 5, 7)).unwrap();
        let p = plan_of(&ix, 0, 8, MAX_COLUMN_READ_BYTES);
        check_covers(&p, 0, 8);
        let at = layout::block_offset(5, 0);
        assert_eq!(
            shapes(&p),
            vec![
                (2, at, 6, vec![(5, 0, 4, 0), (5, 4, 2, 4)]),
                (2, at + 7 * B, 2, vec![(5, 7, 2, 0)]),
            ]
        );
    }

    #[test]
    fn different_columns_and_extents_do_not_merge() {
        let mut ix = index();
        ix.apply_write(0, 4, 1, sled(3, 0, 0, 0)).unwrap();
        // Where column 0 would continue, but on column 1, then extent 4.
        ix.apply_write(4, 4, 2, sled(3, 1, 0, 4)).unwrap();
        ix.apply_write(8, 4, 3, sled(4, 0, 0, 4)).unwrap();
        let p = plan_of(&ix, 0, 12, MAX_COLUMN_READ_BYTES);
        check_covers(&p, 0, 12);
        assert_eq!(p.reads.len(), 3);
        assert_eq!(
            p.reads
                .iter()
                .map(|r| (r.extent, r.column, r.blocks))
                .collect::<Vec<_>>(),
            vec![(3, 0, 4), (3, 1, 4), (4, 0, 4)]
        );
    }

    #[test]
    fn log_and_zero_pieces_between_pieces_of_one_column() {
        let mut ix = index();
        ix.apply_write(0, 4, 1, sled(9, 1, 2, 0)).unwrap();
        ix.apply_write(4, 2, 2, log(4096)).unwrap();
        // 6..8 never written: zeros; 8..10 trimmed: zeros.
        ix.apply_unmap(8, 2, 3).unwrap();
        ix.apply_write(10, 4, 4, sled(9, 1, 2, 4)).unwrap();
        ix.apply_write(14, 1, 5, log(8192)).unwrap();
        let p = plan_of(&ix, 0, 15, MAX_COLUMN_READ_BYTES);
        check_covers(&p, 0, 15);
        assert_eq!(
            shapes(&p),
            vec![(
                1,
                layout::block_offset(2, 0),
                8,
                vec![(2, 0, 4, 0), (2, 4, 4, 4)]
            )]
        );
        let kinds: Vec<Fetch> = p.fetches.iter().map(|f| f.fetch).collect();
        assert_eq!(
            kinds,
            vec![
                Fetch::Sled { read: 0, run: 0 },
                Fetch::Log {
                    position: LogPosition(4096),
                    first: 0
                },
                // Never written, then trimmed.
                Fetch::Zeros,
                Fetch::Zeros,
                Fetch::Sled { read: 0, run: 1 },
                Fetch::Log {
                    position: LogPosition(8192),
                    first: 0
                },
            ]
        );
        assert_eq!(p.fetches[2].block_count + p.fetches[3].block_count, 4);
    }

    #[test]
    fn column_order_not_volume_order() {
        // Volume blocks 0..4 sit after volume blocks 4..8 on the column
        // (random writes flushed in another order): still one request.
        let mut ix = index();
        ix.apply_write(0, 4, 1, sled(2, 0, 0, 4)).unwrap();
        ix.apply_write(4, 4, 2, sled(2, 0, 0, 0)).unwrap();
        let p = plan_of(&ix, 0, 8, MAX_COLUMN_READ_BYTES);
        check_covers(&p, 0, 8);
        assert_eq!(
            shapes(&p),
            vec![(0, 0, 8, vec![(0, 0, 4, 0), (0, 4, 4, 4)])]
        );
        assert_eq!(
            p.fetches.iter().map(|f| f.fetch).collect::<Vec<_>>(),
            vec![
                Fetch::Sled { read: 0, run: 1 },
                Fetch::Sled { read: 0, run: 0 }
            ]
        );
    }

    #[test]
    fn a_run_across_a_stripe_boundary_and_the_size_bound() {
        let mut ix = index();
        // One index piece from block 8 of stripe 0 into stripe 1: cut per
        // stripe, read as one request over the summary block.
        ix.apply_write(0, 8, 1, sled(5, 3, 0, 8)).unwrap();
        ix.apply_write(8, 12, 1, sled(5, 3, 1, 0)).unwrap();
        let p = plan_of(&ix, 0, 20, MAX_COLUMN_READ_BYTES);
        check_covers(&p, 0, 20);
        assert_eq!(
            shapes(&p),
            vec![(3, 8 * B, 21, vec![(0, 8, 8, 0), (1, 0, 12, 9)])]
        );
        // With room for only 16 blocks per request: two requests.
        let p = plan_of(&ix, 0, 20, 16 * B);
        check_covers(&p, 0, 20);
        assert_eq!(
            shapes(&p),
            vec![
                (3, 8 * B, 8, vec![(0, 8, 8, 0)]),
                (3, layout::block_offset(1, 0), 12, vec![(1, 0, 12, 0)]),
            ]
        );
    }

    #[test]
    fn a_summary_offset_is_not_data() {
        let mut ix = index();
        // Block 16 of stripe 0 is stripe 0's summary block.
        let summary = Location::Sled {
            extent: 5,
            column: 0,
            offset_bytes: layout::CHUNK_BYTES,
        };
        ix.apply_write(0, 1, 1, summary).unwrap();
        let pieces = ix.lookup(0, 1).unwrap();
        assert_eq!(
            plan(pieces, MAX_COLUMN_READ_BYTES),
            Err(NotData {
                extent: 5,
                offset_bytes: layout::CHUNK_BYTES
            })
        );
        let r = run(5, 0, 0, 15, 1);
        assert_eq!(r.next_data_offset(), layout::block_offset(1, 0));
    }
}
