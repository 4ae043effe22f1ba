//! Flush to the sleds, garbage collection and recovery from the sleds.
//!
//! **Flush.** Takes the latest logged version of blocks (index runs that
//! point at the log) and the trims not yet on the sleds, packs them into
//! stripes of the open extent ([`super::layout`]), encodes parity, appends
//! the `k + m` column rows with the partition's epoch (the extent's columns
//! are claimed with the epoch when it is opened), and only when **all**
//! appends are durable commits (a degraded extent's owed columns get no
//! append and no claim: the stripe is durable on its present columns, at
//! least k, and repair writes the owed ones later): the index moves blocks that are
//! still the logged version (newer writes win), a `FlushCommit` goes to the
//! local log and to the secondary, and the shared log is released (a
//! flush with nothing to move still commits its watermark when the
//! secondary is owed one: the catch-up's jump, see [`super::replica`]). `Fenced`
//! from a sled fences the partition at once. An append that fails seals the
//! extent and the stripe is written again to a new extent (bounded).
//!
//! **GC.** Extents whose live blocks fall below the threshold have those
//! blocks re-written through the same stripe writer, each with its
//! **original sequence**, and moved in the index only if the block still
//! has that sequence at that location (so a newer write always wins); every
//! tombstone of the index is re-recorded in the new summaries (a freed
//! extent may have held the only summary of a trim). An extent with no live
//! block left is freed through the [`ExtentSource`](super::ExtentSource).
//!
//! **Recovery** from the sleds (newest index checkpoint plus the summaries
//! of the rows written after it, or every summary) is in
//! [`super::checkpoint`]; it uses [`open_extent`] and [`read_summary`] from
//! here. Recovered extents are sealed; new data goes to new extents.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future;
use futures::StreamExt;
use proto::sled::{SledError, SledRequest, SledResponse};
use proto::volume::{FlushedRange, ReplicaRequest};
use proto::BLOCK_SIZE_BYTES;

use super::core::LogPiece;
use super::layout::{
    self, SlotEntry, StripeSummary, Tombstone, CHUNK_BLOCKS, CHUNK_BYTES, ROW_BYTES,
};
use super::{
    bump, read, ExtentGrant, ExtentState, PartitionError, Role, Shared, State, LOG_READS_IN_FLIGHT,
};
use crate::erasure::ErasureCodec;
use crate::index::{Location, Run};
use crate::wal::{LogRecord, RecordKind, WalError};

/// Most flush batches one `flush_now` writes.
const MAX_BATCHES: usize = 1024;
/// Extents tried for one stripe before giving up.
const STRIPE_ATTEMPTS: usize = 3;
/// Stripes (rows) sent in one `Append` per column: one device write and
/// one device flush on each sled for all of them.
const ROWS_PER_APPEND: usize = 8;
/// A column append of `n` rows may take `sled_timeout * (1 + n / this)`
/// (a larger write is slower on a busy device; a timeout seals the extent).
const ROWS_PER_TIMEOUT: u32 = 4;
const COMMIT_VERSION: u16 = 1;
const COMMIT_ENTRY_BYTES: usize = 8 + 4 + 8 + 8 + 2 + 8;

/// What a flush did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Batches committed.
    pub batches: u64,
    /// Blocks written to sleds.
    pub blocks: u64,
    /// Stripes written.
    pub stripes: u64,
    /// Trims recorded in summaries.
    pub trims: u64,
}

/// What a GC pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Extents below the threshold.
    pub candidates: u64,
    /// Live blocks re-written.
    pub blocks_moved: u64,
    /// Extents freed.
    pub extents_freed: u64,
}

/// A block on its way to a stripe.
#[derive(Debug, Clone)]
struct FlushBlock {
    lba: u64,
    sequence: u64,
    data: Bytes,
    crc: u32,
    /// GC: the location it must still be at to be moved.
    relocate_from: Option<Location>,
}

/// Where a stripe's blocks landed.
#[derive(Debug)]
struct Placed {
    block: FlushBlock,
    location: Location,
}

pub(super) fn zero_block_crc() -> u32 {
    crc32c::crc32c(&[0u8; BLOCK_SIZE_BYTES as usize])
}

/// Flushes every log-resident block and pending trim, then releases the log.
pub(super) async fn flush_now(shared: &Arc<Shared>) -> Result<FlushReport, PartitionError> {
    let _serial = shared.flush_lock.lock().await;
    shared.check_primary(None)?;
    let mut report = FlushReport::default();
    for _ in 0..MAX_BATCHES {
        let batch = collect(shared);
        if batch.pieces.is_empty() && batch.trims.is_empty() {
            // Nothing to move, but the secondary may be owed a flush commit
            // (a catch-up jumped it over records flushed since, or an
            // instance opened from its log): commit the watermark alone,
            // or the pair never gets in sync.
            let worth = shared.lock().core.owed_commit_worth(batch.up_to_sequence);
            if worth {
                commit_flush(shared, Vec::new(), &[], Some(batch.up_to_sequence)).await?;
                checkpoint_if_parked(shared).await;
            }
            break;
        }
        let blocks = load_log_blocks(shared, batch.pieces).await?;
        let trim_sequences: Vec<u64> = batch.trims.iter().map(|t| t.sequence).collect();
        let (placed, stripes) = write_stripes(shared, blocks, batch.trims).await?;
        report.blocks += placed.len() as u64;
        report.stripes += stripes;
        report.trims += trim_sequences.len() as u64;
        report.batches += 1;
        commit_flush(shared, placed, &trim_sequences, Some(batch.up_to_sequence)).await?;
        checkpoint_if_parked(shared).await;
        // Give the space back batch by batch: writers waiting on a full log
        // resume after one batch, not after the whole flush.
        shared
            .log
            .release()
            .await
            .map_err(|source| shared.wal_error(source))?;
        if !batch.more {
            break;
        }
    }
    {
        let mut state = shared.lock();
        if state.core.index.oldest_log_position().is_none() && state.core.pending_trims.is_empty() {
            state.core.oldest_unflushed = None;
        }
    }
    shared
        .log
        .release()
        .await
        .map_err(|source| shared.wal_error(source))?;
    Ok(report)
}

/// What one flush batch writes to the sleds: the core's plan, trims as
/// stripe tombstones.
struct FlushBatch {
    /// Log-resident runs, up to the batch size.
    pieces: Vec<LogPiece>,
    /// Pending trims up to `up_to_sequence`, as stripe tombstones.
    trims: Vec<Tombstone>,
    /// The watermark of the batch's flush commit.
    up_to_sequence: u64,
    /// Log-resident runs remain for another batch.
    more: bool,
}

/// The next batch, as the core plans it ([`PartitionCore::flush_plan`](super::core::PartitionCore::flush_plan)).
fn collect(shared: &Shared) -> FlushBatch {
    let limit = shared.config.flush_batch_blocks.max(1) as u64;
    let plan = shared.lock().core.flush_plan(limit);
    FlushBatch {
        pieces: plan.pieces,
        trims: plan
            .trims
            .into_iter()
            .map(|(sequence, trim)| Tombstone {
                lba: trim.lba,
                block_count: trim.block_count,
                sequence,
            })
            .collect(),
        up_to_sequence: plan.up_to_sequence,
        more: plan.more,
    }
}

async fn load_log_blocks(
    shared: &Shared,
    pieces: Vec<LogPiece>,
) -> Result<Vec<FlushBlock>, PartitionError> {
    // Many small reads (random writes leave one run per record): keep
    // LOG_READS_IN_FLIGHT of them at the device at once, in order.
    let wal = shared.log.wal();
    let mut reads = futures::stream::iter(pieces)
        .map(|piece| async move {
            let data = wal
                .read_blocks(
                    piece.position,
                    piece.first_block_in_record,
                    piece.block_count as u32,
                )
                .await;
            (piece, data)
        })
        .buffered(LOG_READS_IN_FLIGHT);
    let mut blocks = Vec::new();
    while let Some((piece, data)) = reads.next().await {
        let data = match data {
            Ok(data) => data,
            // Superseded and released meanwhile: nothing to flush.
            Err(WalError::NotFound { .. }) => continue,
            Err(source) => return Err(shared.wal_error(source)),
        };
        push_blocks(
            &mut blocks,
            piece.lba,
            piece.block_count,
            piece.sequence,
            &data,
            |_| None,
        );
    }
    Ok(blocks)
}

/// The open extent's parameters for the next rows.
struct Target {
    extent: u64,
    row: u64,
    /// Rows the extent still has room for from `row` on.
    rows_left: u64,
    epoch: u64,
    codec: Arc<ErasureCodec>,
    columns: Vec<(String, proto::sled::ColumnId)>,
    /// Owed columns of the extent (see [`ExtentGrant::owed`]).
    owed: std::collections::BTreeSet<u16>,
}

async fn open_target(shared: &Arc<Shared>) -> Result<Target, PartitionError> {
    for _ in 0..STRIPE_ATTEMPTS {
        let epoch = {
            let state = shared.lock();
            if !matches!(state.core.role, Role::Primary) {
                return Err(PartitionError::NotPrimary {
                    partition: shared.id(),
                });
            }
            if let Some(e) = state.open_extent.and_then(|id| state.extents.get(&id)) {
                if !e.sealed && e.rows_written < e.rows_capacity {
                    return Ok(Target {
                        extent: e.grant.extent,
                        row: e.rows_written,
                        rows_left: e.rows_capacity - e.rows_written,
                        epoch: state.core.epoch,
                        codec: e.codec.clone(),
                        columns: e.grant.columns.clone(),
                        owed: e.grant.owed.clone(),
                    });
                }
            }
            state.core.epoch
        };
        let state = open_next_extent(shared, epoch).await?;
        let mut guard = shared.lock();
        guard.open_extent = Some(state.grant.extent);
        guard.extents.insert(state.grant.extent, state);
    }
    Err(shared.unavailable("no usable extent"))
}

/// Splits `data` (blocks `lba..lba+count` of one write, `sequence`) into
/// flush blocks with their CRCs; `relocate_from(i)`: where block `i` lives
/// now when GC moves it.
fn push_blocks(
    blocks: &mut Vec<FlushBlock>,
    lba: u64,
    count: u64,
    sequence: u64,
    data: &Bytes,
    relocate_from: impl Fn(u64) -> Option<Location>,
) {
    for i in 0..count {
        let from = (i * BLOCK_SIZE_BYTES) as usize;
        let block = data.slice(from..from + BLOCK_SIZE_BYTES as usize);
        blocks.push(FlushBlock {
            lba: lba + i,
            sequence,
            crc: crc32c::crc32c(&block),
            data: block,
            relocate_from: relocate_from(i),
        });
    }
}

/// Takes the next extent of the partition's sandbox from the control plane
/// and opens it (claims its columns) at `epoch`.
pub(super) async fn open_next_extent(
    shared: &Arc<Shared>,
    epoch: u64,
) -> Result<ExtentState, PartitionError> {
    let grant = shared
        .extent_source
        .next_extent(shared.id(), epoch)
        .await
        .map_err(|source| PartitionError::Peer {
            partition: shared.id(),
            source,
        })?;
    open_extent(shared, grant, epoch, false).await
}

/// Validates a grant and claims its columns with `epoch`. `recovering`:
/// tolerate up to m unreachable columns and read back the rows written.
pub(super) async fn open_extent(
    shared: &Arc<Shared>,
    grant: ExtentGrant,
    epoch: u64,
    recovering: bool,
) -> Result<ExtentState, PartitionError> {
    let (k, m) = (usize::from(grant.k), usize::from(grant.m));
    let mut sleds: Vec<&str> = grant.present().map(|(_, (s, _))| s.as_str()).collect();
    let present = sleds.len();
    sleds.sort_unstable();
    sleds.dedup();
    let bad = |reason: String| PartitionError::Recovery {
        partition: shared.id(),
        reason: format!("extent {}: {reason}", grant.extent),
    };
    if grant.columns.len() != k + m || sleds.len() != present || present < k {
        return Err(bad(
            "present columns not on different sleds, or fewer than k (invariant 3)".to_string(),
        ));
    }
    if k > layout::MAX_DATA_COLUMNS || grant.column_size_bytes < ROW_BYTES {
        return Err(bad(format!(
            "k={k} or column size {} unsupported",
            grant.column_size_bytes
        )));
    }
    let codec = Arc::new(
        ErasureCodec::new(k, m).map_err(|source| PartitionError::Erasure {
            partition: shared.id(),
            extent: grant.extent,
            source,
        })?,
    );
    // Owed columns are claimed by the repair that writes them.
    let claims = grant.present().map(|(_, (sled, column))| {
        let request = SledRequest::Claim {
            column: *column,
            partition: shared.id(),
            epoch,
        };
        sled_call(shared, sled, request)
    });
    let mut lengths = Vec::new();
    for ((_, (sled, _)), result) in grant.present().zip(future::join_all(claims).await) {
        match result {
            Ok(SledResponse::Claimed { length_bytes, .. }) => lengths.push(length_bytes),
            Ok(SledResponse::Error(SledError::Fenced { current_epoch })) => {
                shared.fence(current_epoch);
                return Err(PartitionError::Fenced {
                    partition: shared.id(),
                    current: current_epoch,
                });
            }
            Ok(other) if !recovering => {
                return Err(PartitionError::Sled {
                    partition: shared.id(),
                    sled: sled.clone(),
                    source: sled_error(other),
                })
            }
            Err(source) if !recovering => {
                return Err(PartitionError::Peer {
                    partition: shared.id(),
                    source,
                })
            }
            _ => tracing::warn!(
                extent = grant.extent,
                sled,
                "column unreachable while claiming"
            ),
        }
    }
    if lengths.len() < k {
        return Err(bad(format!(
            "only {} of {} columns reachable",
            lengths.len(),
            k + m
        )));
    }
    lengths.sort_unstable_by(|a, b| b.cmp(a));
    // A stripe counts only if at least k columns hold it (decodable).
    let rows_written = lengths[k - 1] / ROW_BYTES;
    if !recovering && lengths[0] != 0 {
        return Err(bad(format!(
            "new extent already holds {} bytes",
            lengths[0]
        )));
    }
    Ok(ExtentState {
        rows_capacity: grant.column_size_bytes / ROW_BYTES,
        crcs: vec![Vec::new(); k],
        rows_written,
        sealed: recovering,
        codec,
        grant,
    })
}

fn sled_error(response: SledResponse) -> SledError {
    match response {
        SledResponse::Error(error) => error,
        other => SledError::BadRequest {
            reason: format!("unexpected answer {other:?}"),
        },
    }
}

pub(super) async fn sled_call(
    shared: &Shared,
    sled: &str,
    request: SledRequest,
) -> Result<SledResponse, super::PeerError> {
    sled_call_within(shared, sled, request, shared.config.sled_timeout).await
}

async fn sled_call_within(
    shared: &Shared,
    sled: &str,
    request: SledRequest,
    timeout: std::time::Duration,
) -> Result<SledResponse, super::PeerError> {
    match tokio::time::timeout(timeout, shared.sleds.call(sled, request)).await {
        Ok(result) => result,
        Err(_) => Err(super::PeerError::Timeout {
            peer: sled.to_string(),
        }),
    }
}

/// The blocks and tombstones of one stripe.
struct Row {
    blocks: Vec<FlushBlock>,
    tombstones: Vec<Tombstone>,
}

/// Packs blocks and tombstones into stripes and writes them, up to
/// [`ROWS_PER_APPEND`] rows per column append; returns where each block
/// landed and the stripe count.
async fn write_stripes(
    shared: &Arc<Shared>,
    blocks: Vec<FlushBlock>,
    tombstones: Vec<Tombstone>,
) -> Result<(Vec<Placed>, u64), PartitionError> {
    let mut placed = Vec::with_capacity(blocks.len());
    let mut blocks = blocks.into_iter().peekable();
    let mut tombstones = tombstones.into_iter().peekable();
    let mut rows: std::collections::VecDeque<Row> = std::collections::VecDeque::new();
    let mut stripes = 0;
    let mut failures = 0;
    // Bounded: every success writes at least one row (each row takes at
    // least one block or tombstone), and failures in a row are bounded.
    loop {
        let target = open_target(shared).await?;
        let k = target.codec.data_shards();
        let slots = k * CHUNK_BLOCKS as usize;
        let want = usize::try_from(target.rows_left)
            .unwrap_or(usize::MAX)
            .min(ROWS_PER_APPEND);
        while rows.len() < want && (blocks.peek().is_some() || tombstones.peek().is_some()) {
            rows.push_back(Row {
                blocks: blocks.by_ref().take(slots).collect(),
                tombstones: tombstones
                    .by_ref()
                    .take(layout::max_tombstones(k))
                    .collect(),
            });
        }
        if rows.is_empty() {
            break;
        }
        let batch = rows.len().min(want);
        let batch_rows: Vec<&Row> = rows.iter().take(batch).collect();
        match write_rows(shared, &target, &batch_rows).await {
            Ok(locations) => {
                for (row, locations) in rows.drain(..batch).zip(locations) {
                    placed.extend(
                        row.blocks
                            .into_iter()
                            .zip(locations)
                            .map(|(block, location)| Placed { block, location }),
                    );
                    stripes += 1;
                    bump(&shared.metrics.stripes_written);
                }
                failures = 0;
            }
            Err(StripeError::Fatal(error)) => return Err(error),
            Err(StripeError::Retry(reason)) => {
                tracing::warn!(partition = ?shared.id(), extent = target.extent, row = target.row, reason, "stripe append failed; sealing the extent");
                {
                    let mut state = shared.lock();
                    if let Some(e) = state.extents.get_mut(&target.extent) {
                        e.sealed = true;
                    }
                    state.open_extent = None;
                }
                failures += 1;
                if failures == STRIPE_ATTEMPTS {
                    return Err(shared.unavailable(format!("stripe append failed: {reason}")));
                }
            }
        }
    }
    Ok((placed, stripes))
}

enum StripeError {
    Retry(String),
    Fatal(PartitionError),
}

/// Encodes `rows` as consecutive stripes of `target` from `target.row` on
/// and appends them with one request per column (rows laid out as in
/// [`layout`]: chunk, then summary, per row). Returns each row's block
/// locations once the appends to every present column are durable.
async fn write_rows(
    shared: &Arc<Shared>,
    target: &Target,
    rows: &[&Row],
) -> Result<Vec<Vec<Location>>, StripeError> {
    let k = target.codec.data_shards();
    let columns = target.columns.len();
    let fatal = |error| StripeError::Fatal(error);
    let mut column_data: Vec<BytesMut> = (0..columns)
        .map(|_| BytesMut::with_capacity(ROW_BYTES as usize * rows.len()))
        .collect();
    let mut all_slots = Vec::with_capacity(rows.len());
    let mut all_locations = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let stripe = target.row + i as u64;
        let mut chunks = vec![vec![0u8; CHUNK_BYTES as usize]; k];
        let mut slots = vec![None; k * CHUNK_BLOCKS as usize];
        let mut locations = Vec::with_capacity(row.blocks.len());
        for (slot, block) in row.blocks.iter().enumerate() {
            let column = slot / CHUNK_BLOCKS as usize;
            let in_chunk = (slot % CHUNK_BLOCKS as usize) as u64;
            let at = (in_chunk * BLOCK_SIZE_BYTES) as usize;
            chunks[column][at..at + BLOCK_SIZE_BYTES as usize].copy_from_slice(&block.data);
            slots[slot] = Some(SlotEntry {
                lba: block.lba,
                sequence: block.sequence,
                crc: block.crc,
            });
            locations.push(Location::Sled {
                extent: target.extent,
                column: column as u16,
                offset_bytes: layout::block_offset(stripe, in_chunk),
            });
        }
        let parity = target.codec.encode(&chunks).map_err(|source| {
            fatal(PartitionError::Erasure {
                partition: shared.id(),
                extent: target.extent,
                source,
            })
        })?;
        let summary = StripeSummary {
            kind: layout::StripeKind::Data,
            volume: shared.id().volume,
            partition: shared.id().index,
            epoch: target.epoch,
            extent: target.extent,
            stripe,
            slots: slots.clone(),
            tombstones: row.tombstones.clone(),
        }
        .encode()
        .map_err(|e| {
            fatal(PartitionError::Recovery {
                partition: shared.id(),
                reason: e.to_string(),
            })
        })?;
        for (data, chunk) in column_data
            .iter_mut()
            .zip(chunks.iter().chain(parity.iter()))
        {
            data.extend_from_slice(chunk);
            data.extend_from_slice(&summary);
        }
        all_slots.push(slots);
        all_locations.push(locations);
    }
    let rows_count = u32::try_from(rows.len()).unwrap_or(u32::MAX);
    let timeout = shared.config.sled_timeout * (1 + rows_count / ROWS_PER_TIMEOUT);
    // Owed columns get nothing: the stripe is durable once every present
    // column holds it (at least k of them: decodable), and repair writes
    // the owed ones from the others.
    let appends = column_data
        .into_iter()
        .zip(&target.columns)
        .enumerate()
        .filter(|(i, _)| u16::try_from(*i).is_ok_and(|i| !target.owed.contains(&i)))
        .map(|(_, (data, (sled, column)))| {
            let data = data.freeze();
            let block_crcs = crate::wal::format::block_crcs(&data);
            let request = SledRequest::Append {
                column: *column,
                partition: shared.id(),
                epoch: target.epoch,
                offset_bytes: target.row * ROW_BYTES,
                data,
                block_crcs,
            };
            async move {
                // One retry: appends are idempotent (same offset, same CRCs).
                let mut last = None;
                for _ in 0..2 {
                    match sled_call_within(shared, sled, request.clone(), timeout).await {
                        Ok(SledResponse::Appended { .. }) => return Ok(()),
                        Ok(SledResponse::Error(SledError::Fenced { current_epoch })) => {
                            return Err(Some(current_epoch))
                        }
                        Ok(other) => last = Some(format!("sled {sled}: {}", sled_error(other))),
                        Err(error) => last = Some(error.to_string()),
                    }
                }
                tracing::debug!(?last, "append failed");
                Err(None)
            }
        });
    // Dropped before the appends end (the pass cancelled at an await):
    // some columns may hold these rows and others not, and the extent's
    // `rows_written` does not know; the guard seals the extent so that no
    // later append lands a different row at the same offset (issue 14
    // item 3). Recovery counts a row only where k columns hold it.
    let guard = SealOnDrop {
        shared,
        extent: target.extent,
        armed: true,
    };
    let results = future::join_all(appends).await;
    guard.disarm();
    let mut failed = 0;
    for result in results {
        match result {
            Ok(()) => {}
            Err(Some(current)) => {
                shared.fence(current);
                return Err(fatal(PartitionError::Fenced {
                    partition: shared.id(),
                    current,
                }));
            }
            Err(None) => failed += 1,
        }
    }
    if failed > 0 {
        return Err(StripeError::Retry(format!(
            "{failed} column appends failed"
        )));
    }
    // Durable on every present column: record the rows.
    let mut state = shared.lock();
    let Some(extent) = state.extents.get_mut(&target.extent) else {
        return Err(StripeError::Retry("extent vanished".to_string()));
    };
    extent.rows_written = extent.rows_written.max(target.row + rows.len() as u64);
    let zero = zero_block_crc();
    for (i, slots) in all_slots.iter().enumerate() {
        let stripe = target.row + i as u64;
        for (column, crcs) in extent.crcs.iter_mut().enumerate() {
            let base = (stripe * CHUNK_BLOCKS) as usize;
            if crcs.len() < base + CHUNK_BLOCKS as usize {
                crcs.resize(base + CHUNK_BLOCKS as usize, zero);
            }
            for b in 0..CHUNK_BLOCKS as usize {
                crcs[base + b] = slots[column * CHUNK_BLOCKS as usize + b].map_or(zero, |s| s.crc);
            }
        }
    }
    Ok(all_locations)
}

/// A full-stripe write ([`super::direct`]; the caller holds the flush
/// lock and reserved `sequence`): writes blocks `lba..` (`data`) as
/// stripes of the open extent, each slot at `sequence`. Returns where they
/// landed once every present column holds them, as a flush commit's
/// mappings (the core maps them at `start_commit`, under the same flush
/// lock).
pub(super) async fn write_direct(
    shared: &Arc<Shared>,
    lba: u64,
    sequence: u64,
    data: &Bytes,
) -> Result<Vec<FlushedRange>, PartitionError> {
    shared.check_primary(None)?;
    let mut blocks = Vec::with_capacity(data.len() / BLOCK_SIZE_BYTES as usize);
    let count = data.len() as u64 / BLOCK_SIZE_BYTES;
    push_blocks(&mut blocks, lba, count, sequence, data, |_| None);
    let (placed, _) = write_stripes(shared, blocks, Vec::new()).await?;
    let mut mappings: Vec<FlushedRange> = Vec::new();
    let state = shared.lock();
    for placed in &placed {
        let Some((extent, column, offset_bytes)) = data_slot(shared, &state, placed) else {
            continue;
        };
        let block = &placed.block;
        push_mapping(
            &mut mappings,
            FlushedRange {
                lba: shared.config.first_block + block.lba,
                blocks: 1,
                sequence,
                extent,
                column,
                offset_bytes,
            },
        );
    }
    Ok(mappings)
}

/// Appends the one-block mapping `next` to a flush commit's `mappings`,
/// extending the last range instead when `next` continues it (the next
/// volume block, the same sequence, the next slot of the same column).
pub(super) fn push_mapping(mappings: &mut Vec<FlushedRange>, next: FlushedRange) {
    match mappings.last_mut() {
        Some(last)
            if last.lba + u64::from(last.blocks) == next.lba
                && last.sequence == next.sequence
                && last.extent == next.extent
                && last.column == next.column
                && last.offset_bytes + u64::from(last.blocks) * BLOCK_SIZE_BYTES
                    == next.offset_bytes =>
        {
            last.blocks += next.blocks
        }
        _ => mappings.push(next),
    }
}

/// Seals `extent` when dropped armed: a stripe append abandoned midway
/// (see [`write_rows`]).
struct SealOnDrop<'a> {
    shared: &'a Shared,
    extent: u64,
    armed: bool,
}

impl SealOnDrop<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for SealOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        tracing::warn!(partition = ?self.shared.id(), extent = self.extent, "stripe append abandoned; sealing the extent");
        let mut state = self.shared.lock();
        if let Some(e) = state.extents.get_mut(&self.extent) {
            e.sealed = true;
        }
        if state.open_extent.is_some_and(|open| open == self.extent) {
            state.open_extent = None;
        }
    }
}

/// Index update, flush-commit records (flushes, not GC moves), trims done.
/// A flush commit parked behind a snapshot marker no durable checkpoint
/// holds yet ([`PartitionCore::queue_flush_commit`](super::core::PartitionCore::queue_flush_commit))
/// keeps the secondary's log: the checkpoint that releases it is written
/// now (the caller holds the flush lock), not after the whole pass, or
/// writers waiting on a full log on the secondary wait for every batch
/// (seen: writes "not durable on both head nodes" while a flush went on
/// behind a held cut). Once a checkpoint holds the markers, commits are
/// no longer parked, so this costs one checkpoint per snapshot. A failure
/// is counted and logged; the commit stays parked for the next one.
async fn checkpoint_if_parked(shared: &Arc<Shared>) {
    if shared.lock().core.parked_commits.is_empty() {
        return;
    }
    if let Err(error) = super::checkpoint::write_held(shared).await {
        tracing::warn!(partition = ?shared.id(), %error, "index checkpoint for a parked flush commit not written");
    }
}

async fn commit_flush(
    shared: &Arc<Shared>,
    placed: Vec<Placed>,
    trim_sequences: &[u64],
    up_to: Option<u64>,
) -> Result<u64, PartitionError> {
    let index_error = |source| PartitionError::Index {
        partition: shared.id(),
        source,
    };
    let mut moved = 0;
    let mut mappings: Vec<FlushedRange> = Vec::new();
    let epoch = {
        let mut state = shared.lock();
        for placed in &placed {
            let Some((extent, column, offset_bytes)) = data_slot(shared, &state, placed) else {
                continue;
            };
            let (block, location) = (&placed.block, &placed.location);
            match block.relocate_from {
                None => {
                    moved += state
                        .core
                        .index
                        .apply_flush(block.lba, 1, block.sequence, *location)
                        .map_err(index_error)?;
                    push_mapping(
                        &mut mappings,
                        FlushedRange {
                            lba: shared.config.first_block + block.lba,
                            blocks: 1,
                            sequence: block.sequence,
                            extent,
                            column,
                            offset_bytes,
                        },
                    );
                }
                Some(from) => {
                    let current = state
                        .core
                        .index
                        .lookup_with_sequence(block.lba, 1)
                        .map_err(index_error)?;
                    let still = current.first().is_some_and(|m| {
                        m.sequence == Some(block.sequence) && m.location == Some(from)
                    });
                    if still {
                        state
                            .core
                            .index
                            .apply_write(block.lba, 1, block.sequence, *location)
                            .map_err(index_error)?;
                        moved += 1;
                    }
                }
            }
        }
        for sequence in trim_sequences {
            state.core.pending_trims.remove(sequence);
        }
        if let Some(up_to) = up_to {
            assert_commit_watermark(shared, &state, up_to);
        }
        // A recount of every run: debug builds only.
        debug_assert_eq!(
            state.core.index.check_invariants(),
            Ok(()),
            "partition {:?}: index after a flush commit",
            shared.id()
        );
        state.core.epoch
    };
    shared
        .metrics
        .flushed_blocks
        .fetch_add(moved, std::sync::atomic::Ordering::Relaxed);
    bump(&shared.metrics.flushes);
    let Some(up_to) = up_to else {
        return Ok(moved);
    };
    let record = LogRecord {
        kind: RecordKind::FlushCommit,
        partition: shared.id(),
        epoch,
        sequence: up_to,
        lba: 0,
        block_count: 0,
        payload: encode_commit(up_to, &mappings).into(),
    };
    // Advisory on the primary (the summaries are the truth); a full log
    // only loses the record.
    match shared.log.wal().append_one(record).await {
        Ok(_) | Err(WalError::LogFull { .. }) => {}
        Err(source) => return Err(shared.wal_error(source)),
    }
    shared.lock().core.queue_flush_commit(
        up_to,
        ReplicaRequest::FlushCommit {
            partition: shared.id(),
            epoch,
            up_to_sequence: up_to,
            mappings,
        },
    );
    shared.repl_wakeup.notify_one();
    Ok(moved)
}

/// Whether byte `offset_bytes` of column `column` of `extent` is a data
/// slot of a row this partition has written to an extent it holds.
/// Where a placed block landed on the sleds, as a commit maps it
/// (`None`: not on a sled). The index must only ever point at data the
/// sleds hold for us: a data slot of a row written (durably, on all present
/// columns) to an extent of this partition; anything else panics.
fn data_slot(shared: &Shared, state: &State, placed: &Placed) -> Option<(u64, u16, u64)> {
    let Location::Sled {
        extent,
        column,
        offset_bytes,
    } = placed.location
    else {
        return None;
    };
    assert!(
        holds_data_slot(state, extent, column, offset_bytes),
        "partition {:?}: block {} (sequence {}) committed to extent {extent} column {column} offset {offset_bytes}, not a written data slot of an extent it holds",
        shared.id(),
        placed.block.lba,
        placed.block.sequence
    );
    Some((extent, column, offset_bytes))
}

fn holds_data_slot(state: &State, extent: u64, column: u16, offset_bytes: u64) -> bool {
    state.extents.get(&extent).is_some_and(|e| {
        column < u16::from(e.grant.k)
            && layout::split_offset(offset_bytes).is_some_and(|(stripe, _)| stripe < e.rows_written)
    })
}

/// Postconditions of a flush commit at watermark `up_to` (its index
/// update done, under the same lock). A secondary that is behind jumps to
/// `up_to` on the commit, and a replay drops the trims it covers, so
/// `up_to` must not cover anything the sleds do not hold yet.
fn assert_commit_watermark(shared: &Shared, state: &State, up_to: u64) {
    // Only what was applied can have been flushed.
    assert!(
        up_to <= state.core.applied_through,
        "partition {:?}: flush commit up to {up_to}, applied through {}",
        shared.id(),
        state.core.applied_through
    );
    // Every trim the watermark covers went into this batch's summaries.
    let trim = state.core.pending_trims.range(..=up_to).next();
    assert!(
        trim.is_none(),
        "partition {:?}: flush commit up to {up_to} leaves trim {trim:?} unwritten",
        shared.id()
    );
    // Every block left in the log is newer than the watermark (the batch
    // lowered it below the oldest run it left for the next one; writes
    // applied since have higher sequences). A walk of every run.
    debug_assert!(
        state.core.index.runs().all(|(_, run)| {
            !matches!(run.location, Some(Location::Log { .. })) || run.sequence > up_to
        }),
        "partition {:?}: flush commit up to {up_to} leaves an older block in the log only",
        shared.id()
    );
}

/// One GC pass (see the module docs).
pub(super) async fn gc_pass(shared: &Arc<Shared>) -> Result<GcReport, PartitionError> {
    let _serial = shared.flush_lock.lock().await;
    shared.check_primary(None)?;
    let mut report = GcReport::default();
    let (candidates, mut tombstones) = {
        let state = shared.lock();
        let live = state.core.index.live_blocks_per_extent();
        let candidates: Vec<u64> = state
            .extents
            .values()
            .filter(|e| state.open_extent != Some(e.grant.extent) || e.sealed)
            // Checkpoint extents hold no blocks; the checkpoint writer frees them.
            .filter(|e| !state.checkpoints.holds(e.grant.extent))
            .filter(|e| {
                let capacity = e.capacity_blocks();
                let live = live.get(&e.grant.extent).copied().unwrap_or(0);
                capacity == 0 || (live as f64) < shared.config.gc_live_threshold * capacity as f64
            })
            .map(|e| e.grant.extent)
            .collect();
        let tombstones: Vec<Tombstone> = state
            .core
            .index
            .runs()
            .filter(|(_, r)| r.location.is_none())
            .map(|(lba, r)| Tombstone {
                lba,
                block_count: r.block_count,
                sequence: r.sequence,
            })
            .collect();
        (candidates, tombstones)
    };
    report.candidates = candidates.len() as u64;
    bump(&shared.metrics.gc_passes);
    for extent in candidates {
        // The extent's runs, by first block.
        let runs: Vec<(u64, Run)> = {
            let state = shared.lock();
            state
                .core.index
                .runs()
                .filter(|(_, r)| {
                    matches!(r.location, Some(Location::Sled { extent: e, .. }) if e == extent)
                })
                .map(|(lba, r)| (lba, *r))
                .collect()
        };
        let mut blocks = Vec::new();
        for (lba, run) in runs {
            let data = read::read_blocks(shared, lba, run.block_count).await?;
            push_blocks(
                &mut blocks,
                lba,
                run.block_count,
                run.sequence,
                &data,
                |i| run.location.map(|l| l.advanced(i)),
            );
        }
        if !blocks.is_empty() || !tombstones.is_empty() {
            let (placed, _) =
                write_stripes(shared, blocks, std::mem::take(&mut tombstones)).await?;
            report.blocks_moved += commit_flush(shared, placed, &[], None).await?;
            checkpoint_if_parked(shared).await;
        }
        let (live, epoch) = {
            let state = shared.lock();
            (
                state
                    .core
                    .index
                    .live_blocks_per_extent()
                    .get(&extent)
                    .copied()
                    .unwrap_or(0),
                state.core.epoch,
            )
        };
        if live == 0 {
            shared
                .extent_source
                .free_extent(shared.id(), epoch, extent)
                .await
                .map_err(|source| PartitionError::Peer {
                    partition: shared.id(),
                    source,
                })?;
            let mut state = shared.lock();
            state.extents.remove(&extent);
            if state.open_extent == Some(extent) {
                state.open_extent = None;
            }
            report.extents_freed += 1;
            bump(&shared.metrics.extents_freed);
        }
    }
    Ok(report)
}

/// Reads stripe `row`'s summary from the first column that has a valid
/// copy for this extent, row and partition.
pub(super) async fn read_summary(
    shared: &Shared,
    extent: &ExtentState,
    row: u64,
) -> Option<StripeSummary> {
    for (_, (sled, column)) in extent.grant.present() {
        let request = SledRequest::Read {
            column: *column,
            offset_bytes: row * ROW_BYTES + CHUNK_BYTES,
            len_bytes: BLOCK_SIZE_BYTES as u32,
        };
        let Ok(SledResponse::Data { data, .. }) = sled_call(shared, sled, request).await else {
            continue;
        };
        match StripeSummary::decode(&data) {
            Ok(s)
                if s.extent == extent.grant.extent
                    && s.stripe == row
                    && s.volume == shared.id().volume
                    && s.partition == shared.id().index =>
            {
                return Some(s)
            }
            other => tracing::warn!(
                extent = extent.grant.extent,
                row,
                sled,
                ?other,
                "bad summary copy"
            ),
        }
    }
    None
}

/// Flush-commit payload: version u16, count u32, up_to u64, entries of
/// (lba u64, blocks u32, sequence u64, extent u64, column u16, offset u64),
/// CRC-32C u32; little-endian.
pub(super) fn encode_commit(up_to: u64, mappings: &[FlushedRange]) -> Vec<u8> {
    let mut out = Vec::with_capacity(14 + mappings.len() * COMMIT_ENTRY_BYTES + 4);
    out.extend_from_slice(&COMMIT_VERSION.to_le_bytes());
    out.extend_from_slice(&(mappings.len() as u32).to_le_bytes());
    out.extend_from_slice(&up_to.to_le_bytes());
    for m in mappings {
        out.extend_from_slice(&m.lba.to_le_bytes());
        out.extend_from_slice(&m.blocks.to_le_bytes());
        out.extend_from_slice(&m.sequence.to_le_bytes());
        out.extend_from_slice(&m.extent.to_le_bytes());
        out.extend_from_slice(&m.column.to_le_bytes());
        out.extend_from_slice(&m.offset_bytes.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Inverse of [`encode_commit`]; `None` if malformed.
pub(super) fn decode_commit(payload: &[u8]) -> Option<(u64, Vec<FlushedRange>)> {
    let body_len = payload.len().checked_sub(4)?;
    let (body, crc) = payload.split_at(body_len);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let mut r = body;
    let mut take = |n: usize| -> Option<&[u8]> {
        if r.len() < n {
            return None;
        }
        let (head, rest) = r.split_at(n);
        r = rest;
        Some(head)
    };
    let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    if u16::from_le_bytes(take(2)?.try_into().ok()?) != COMMIT_VERSION {
        return None;
    }
    let count = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    let up_to = u64_of(take(8)?);
    if count.checked_mul(COMMIT_ENTRY_BYTES)? != body_len - 14 {
        return None;
    }
    let mut mappings = Vec::with_capacity(count);
    for _ in 0..count {
        mappings.push(FlushedRange {
            lba: u64_of(take(8)?),
            blocks: u32::from_le_bytes(take(4)?.try_into().ok()?),
            sequence: u64_of(take(8)?),
            extent: u64_of(take(8)?),
            column: u16::from_le_bytes(take(2)?.try_into().ok()?),
            offset_bytes: u64_of(take(8)?),
        });
    }
    Some((up_to, mappings))
}

/// Reads a range of a column and checks every block against the CRCs the
/// sled stored; `None` if the column cannot give it whole (rebuild and
/// checkpoint loading read around it).
pub(super) async fn read_verified(
    shared: &Shared,
    sled: &str,
    column: proto::sled::ColumnId,
    offset: u64,
    len: u64,
) -> Option<Bytes> {
    let request = SledRequest::Read {
        column,
        offset_bytes: offset,
        len_bytes: u32::try_from(len).ok()?,
    };
    match sled_call(shared, sled, request).await {
        Ok(SledResponse::Data { data, block_crcs }) => {
            let ok = data.len() as u64 == len
                && block_crcs.len() as u64 == len / BLOCK_SIZE_BYTES
                && data
                    .chunks(BLOCK_SIZE_BYTES as usize)
                    .zip(&block_crcs)
                    .all(|(block, crc)| crc32c::crc32c(block) == *crc);
            if !ok {
                tracing::warn!(sled, ?column, offset, "column range fails its CRCs");
            }
            ok.then_some(data)
        }
        Ok(other) => {
            tracing::debug!(sled, ?column, offset, ?other, "rebuild: column unreadable");
            None
        }
        Err(error) => {
            tracing::debug!(sled, ?column, offset, %error, "rebuild: column unreachable");
            None
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn commit_payload_round_trip() {
        let mappings = vec![FlushedRange {
            lba: 5,
            blocks: 3,
            sequence: 9,
            extent: 2,
            column: 1,
            offset_bytes: 8192,
        }];
        let bytes = encode_commit(42, &mappings);
        assert_eq!(decode_commit(&bytes), Some((42, mappings)));
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        assert_eq!(decode_commit(&bad), None);
    }
}
