//! Index checkpoints on the sleds, and a primary's recovery from them
//! (ARCHITECTURE.md, `head-node/`: a new primary recovers from the newest
//! checkpoint plus the unflushed log tail).
//!
//! **What a checkpoint is.** The primary's *flushed* index as of a flush
//! commit: every run of the index that points at the sleds or is a
//! tombstone (log-resident runs are left out: their records are in the
//! log of both head nodes until a flush writes them to rows after the
//! checkpoint), plus, for every data extent, the number of rows it covers
//! and the CRC of every data slot of those rows (the read path checks each
//! block against it, end to end). Its header names the partition, the
//! epoch and id of the checkpoint (ordered by `(epoch, id)`) and
//! `flushed_through`: every write or trim with a sequence up to it is in
//! the checkpoint or superseded.
//!
//! **Where it lives.** In a **checkpoint extent**: an ordinary extent of the
//! partition's sandbox (so the control plane's accounting, fencing, column
//! repair and freeing apply unchanged) that holds only checkpoints,
//! appended one after the other. A checkpoint of `n` rows is `n` stripes:
//! the bytes are split over the `k` data chunks of each row, `m` parity
//! chunks are encoded (it survives any `m` lost columns, like data), and
//! every row carries a summary of kind
//! [`StripeKind::IndexCheckpoint`](super::layout::StripeKind) whose slots
//! number the checkpoint's blocks (`lba` = block index in the checkpoint,
//! `sequence` = checkpoint id, CRC), so repair verifies and rebuilds it like
//! any row and a recovery never maps it. Appends carry the primary's epoch
//! on columns it claimed, so an old primary can never add a checkpoint once
//! a new one claimed them (the control plane also refuses it a new extent).
//!
//! ```text
//!  write  (every `checkpoint_every_flushes` flush commits, or after
//!          `checkpoint_interval` if anything was flushed or written by a
//!          full-stripe write since; and
//!          Partition::write_checkpoint, called on clean shutdown)
//!         under the flush lock: snapshot ─▶ encode (CRC-32C) ─▶ rows of the
//!         current checkpoint extent (a new one from the sandbox if none, it
//!         is full, sealed by repair, or an append failed) ─▶ all present columns
//!         durable ─▶ superseded checkpoint extents are freed (a newer
//!         checkpoint is durable first)
//!
//!  recover (primary open and in-place take-over)
//!         claim every owned extent at the new epoch (fences the old primary)
//!         ─▶ row 0's summary of each: checkpoint extents vs data extents
//!         ─▶ candidates newest first: the last row of each checkpoint
//!            extent names its checkpoint's first row; read those rows from
//!            any k columns (decode, slot CRCs), decode the payload (CRC,
//!            version, partition, epoch <= ours, row count: a torn tail is
//!            refused and the previous checkpoint of that extent is next)
//!         ─▶ checks: every covered extent still owned has at least the rows
//!            covered, with the same k; every index run points into a
//!            covered extent
//!         ─▶ index = checkpoint, then the summaries of only the rows after
//!            it (rows beyond the covered count; every row of extents it
//!            does not cover), newest sequence wins
//!         ─▶ no run may point at an extent that is no longer owned (freed
//!            by GC after the checkpoint) unless the log records replayed
//!            next supersede it (invariant 4)
//!         any doubt ─▶ the next older candidate (at most 4) ─▶ the full
//!         scan of every summary of every data extent
//! ```
//!
//! **Secondary index.** A secondary keeps the same index of the primary's
//! flushed data (a [`Shadow`]: sled runs and tombstones, slot CRCs, the
//! rows applied per extent, the snapshot cuts it was built under), so that
//! a promotion neither loads a checkpoint nor scans the rows behind one:
//!
//! ```text
//!  refresh (secondary, after each flush commit: one pass at a time, at
//!           most one per 200 ms; Partition::refresh_secondary_index)
//!         owned extents ─▶ column lengths by ColumnStatus (no claim: the
//!         primary keeps appending; a row counts once k columns hold it)
//!         ─▶ the summaries of only the rows not applied yet (a new extent:
//!            row 0 tells checkpoint from data) ─▶ the shadow covers them
//!         no shadow yet, or the snapshot cuts changed ─▶ built like a
//!         recovery (newest checkpoint + rows after it, or every summary)
//!  promotion (take-over of a secondary: it waits for a running pass)
//!         claims as above ─▶ shadow checks: same cuts as handed over, every
//!         covered extent still owned has the rows applied with the same k
//!         ─▶ index = shadow + the summaries of the rows after it ─▶ no run
//!         at a freed extent unless the handed log runs supersede it
//!         any doubt ─▶ the checkpoint path above
//! ```
//!
//! Nothing is replicated for it: GC moves, tombstones and CRCs are in the
//! rows' summaries like any flush, and a pass that missed rows (a late
//! refresh, a secondary that joined after them) only leaves more rows for
//! the next pass or the promotion to read. It is exactly a checkpoint held
//! in memory that covers the rows applied, checked the same way.
//!
//! GC never compacts a checkpoint extent (it holds no blocks); freed data
//! extents need no special care: a checkpoint that covers one is still used
//! (the extent's blocks were re-written with their sequence to rows after
//! the checkpoint, which win) and the dangling-run check above catches any
//! case where that does not hold. Column repair seals a checkpoint extent
//! like any other; the next checkpoint then goes to a new extent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future;
use futures::StreamExt as _;
use proto::sled::{PartitionId, SledError, SledRequest, SledResponse};
use proto::BLOCK_SIZE_BYTES;

use super::core::LogResident;
use super::flush::{
    open_extent, open_next_extent, read_summary, read_verified, sled_call, zero_block_crc,
};
use super::layout::{
    self, SlotEntry, StripeKind, StripeSummary, CHUNK_BLOCKS, CHUNK_BYTES, ROW_BYTES,
};
use super::{bump, ExtentGrant, ExtentState, PartitionError, Shared};
use crate::erasure::ErasureCodec;
use crate::index::{IndexError, Location, PartitionIndex, Reader};
use crate::wal::{RecordKind, RecoveredRecord};

const PAYLOAD_MAGIC: u64 = u64::from_le_bytes(*b"RBHNCKP1");
/// Checkpoint payload format version.
pub const PAYLOAD_VERSION: u16 = 1;
/// magic, version, reserved, body length, volume, partition, epoch, id,
/// flushed_through, highest_sequence, extent count.
const HEADER_BYTES: usize = 8 + 2 + 2 + 8 + 8 + 4 + 8 + 8 + 8 + 8 + 4;
/// Where the payload header keeps the body length (after magic, version,
/// reserved).
const BODY_LEN_AT: usize = 8 + 2 + 2;
/// Checkpoints tried (newest first) before the full summary scan.
const MAX_CANDIDATES: usize = 4;
/// Rows per sled request when writing or reading a checkpoint.
const BATCH_ROWS: u64 = 16;
/// Stripe summaries a recovery reads at once.
const SUMMARY_READS_IN_FLIGHT: usize = 32;
/// Extents a recovery opens (claims at the new epoch) at once.
const EXTENT_OPENS_IN_FLIGHT: usize = 16;

/// What a checkpoint write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointReport {
    /// Checkpoint id (ordered within the epoch).
    pub id: u64,
    /// Epoch it was written at.
    pub epoch: u64,
    /// Checkpoint extent.
    pub extent: u64,
    /// First row in that extent.
    pub first_row: u64,
    /// Rows (stripes) it takes.
    pub rows: u64,
    /// Payload bytes.
    pub bytes: u64,
    /// Superseded checkpoint extents freed.
    pub extents_freed: u64,
}

/// How the last recovery from the sleds went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The checkpoint used, `(epoch, id)`; `None`: full summary scan.
    pub checkpoint: Option<(u64, u64)>,
    /// Stripe summaries read.
    pub rows_scanned: u64,
    /// Checkpoints refused (corrupt, torn, stale) before the one used.
    pub checkpoints_refused: u64,
    /// Wall time of the recovery from the sleds.
    pub duration: Duration,
    /// Built on the index of the flushed data this node held (a promoted
    /// secondary's, or a primary's own at a new epoch): no checkpoint
    /// loaded, only the rows written after it read.
    pub held_index: bool,
}

/// The primary's bookkeeping of its checkpoint extents (part of `State`).
#[derive(Debug)]
pub(super) struct Tracker {
    /// Every checkpoint extent the partition owns (current and superseded).
    extents: BTreeSet<u64>,
    /// Where the next checkpoint goes, if it fits.
    current: Option<u64>,
    next_id: u64,
    /// `metrics.flushes` at the last checkpoint.
    flushes_at_last: u64,
    /// `metrics.direct_writes` at the last checkpoint: full-stripe writes
    /// add rows without a flush, and count for the time cadence.
    direct_at_last: u64,
    last_at: Instant,
}

impl Tracker {
    pub(super) fn new() -> Self {
        Tracker {
            extents: BTreeSet::new(),
            current: None,
            next_id: 1,
            flushes_at_last: 0,
            direct_at_last: 0,
            last_at: Instant::now(),
        }
    }

    /// The partition's checkpoint extents.
    pub(super) fn extents(&self) -> Vec<u64> {
        self.extents.iter().copied().collect()
    }

    /// Whether `extent` is one of the partition's checkpoint extents.
    pub(super) fn holds(&self, extent: u64) -> bool {
        self.extents.contains(&extent)
    }
}

/// A data extent as a checkpoint covers it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CoveredExtent {
    extent: u64,
    k: u8,
    rows: u64,
    /// Per data column, the CRC of every slot of the covered rows.
    crcs: Vec<Vec<u32>>,
}

/// A decoded checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Checkpoint {
    partition: PartitionId,
    epoch: u64,
    id: u64,
    flushed_through: u64,
    highest_sequence: u64,
    extents: Vec<CoveredExtent>,
    /// Sled locations and tombstones only.
    index: PartitionIndex,
}

impl Checkpoint {
    /// Little-endian: the header, per extent (id u64, k u8, rows u64, then
    /// k x rows x 16 slot CRCs u32), the index ([`PartitionIndex::serialize`],
    /// itself CRC-sealed) as length u64 + bytes, and a CRC-32C of
    /// everything before it.
    fn encode(&self) -> Vec<u8> {
        let index = self.index.serialize();
        let mut out = Vec::with_capacity(HEADER_BYTES + index.len() + 4);
        out.extend_from_slice(&PAYLOAD_MAGIC.to_le_bytes());
        out.extend_from_slice(&PAYLOAD_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes()); // body length, patched below
        out.extend_from_slice(&self.partition.volume.to_le_bytes());
        out.extend_from_slice(&self.partition.index.to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.flushed_through.to_le_bytes());
        out.extend_from_slice(&self.highest_sequence.to_le_bytes());
        out.extend_from_slice(&(self.extents.len() as u32).to_le_bytes());
        for e in &self.extents {
            out.extend_from_slice(&e.extent.to_le_bytes());
            out.push(e.k);
            out.extend_from_slice(&e.rows.to_le_bytes());
            for column in &e.crcs {
                for crc in column {
                    out.extend_from_slice(&crc.to_le_bytes());
                }
            }
        }
        out.extend_from_slice(&(index.len() as u64).to_le_bytes());
        out.extend_from_slice(&index);
        let body_len = out.len() as u64;
        out[BODY_LEN_AT..BODY_LEN_AT + 8].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Inverse of [`encode`](Self::encode); `bytes` may carry zero padding
    /// after the CRC.
    fn decode(bytes: &[u8]) -> Result<Checkpoint, String> {
        let mut r = Reader::new(bytes, |reason| reason);
        if r.u64()? != PAYLOAD_MAGIC {
            return Err("bad magic".to_string());
        }
        let version = r.u16()?;
        if version != PAYLOAD_VERSION {
            return Err(format!("version {version} unsupported"));
        }
        r.u16()?;
        let body_len = usize::try_from(r.u64()?).map_err(|_| "body length".to_string())?;
        let crc_end = body_len
            .checked_add(4)
            .filter(|end| *end <= bytes.len() && body_len >= HEADER_BYTES)
            .ok_or_else(|| format!("body of {body_len} bytes in {} bytes", bytes.len()))?;
        let stored = u32::from_le_bytes(
            bytes[body_len..crc_end]
                .try_into()
                .map_err(|_| "crc".to_string())?,
        );
        let computed = crc32c::crc32c(&bytes[..body_len]);
        if stored != computed {
            return Err(format!(
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        r.end_at(body_len);
        let partition = PartitionId {
            volume: r.u64()?,
            index: r.u32()?,
        };
        let epoch = r.u64()?;
        let id = r.u64()?;
        let flushed_through = r.u64()?;
        let highest_sequence = r.u64()?;
        let count = r.u32()?;
        let mut extents = Vec::new();
        for _ in 0..count {
            let extent = r.u64()?;
            let k = r.u8()?;
            let rows = r.u64()?;
            if k == 0 || usize::from(k) > layout::MAX_DATA_COLUMNS {
                return Err(format!("extent {extent}: k = {k}"));
            }
            let per_column = rows
                .checked_mul(CHUNK_BLOCKS)
                .filter(|n| n.saturating_mul(4 * u64::from(k)) <= body_len as u64)
                .ok_or_else(|| format!("extent {extent}: {rows} rows"))?;
            let mut crcs = Vec::with_capacity(usize::from(k));
            for _ in 0..k {
                let mut column = Vec::with_capacity(per_column as usize);
                for _ in 0..per_column {
                    column.push(r.u32()?);
                }
                crcs.push(column);
            }
            extents.push(CoveredExtent {
                extent,
                k,
                rows,
                crcs,
            });
        }
        let index_len = usize::try_from(r.u64()?).map_err(|_| "index length".to_string())?;
        let index_bytes = r.take(index_len)?;
        if r.at() != body_len {
            return Err(format!("{} trailing bytes", body_len - r.at()));
        }
        let index = PartitionIndex::deserialize(index_bytes).map_err(|e| e.to_string())?;
        if index.partition() != partition {
            return Err("index of another partition".to_string());
        }
        Ok(Checkpoint {
            partition,
            epoch,
            id,
            flushed_through,
            highest_sequence,
            extents,
            index,
        })
    }
}

// ------------------------------------------------------------------ write

/// After a flush: writes a checkpoint if one is due (see the module docs).
/// A failure is logged and counted; the next flush tries again.
pub(super) async fn after_flush(shared: &Arc<Shared>) {
    if !due(shared) {
        return;
    }
    if let Err(error) = write(shared).await {
        tracing::warn!(partition = ?shared.id(), %error, "index checkpoint not written");
    }
}

fn due(shared: &Shared) -> bool {
    // Snapshot markers stay held in the log until a checkpoint holds their
    // effect (`super::snapshot`): one is due whatever the cadence, or the
    // log would fill behind them.
    if !shared.lock().core.snapshot_markers.is_empty() {
        return true;
    }
    let every = shared.config.checkpoint_every_flushes;
    let interval = shared.config.checkpoint_interval;
    if every == 0 && interval.is_zero() {
        return false;
    }
    let flushes = shared.metrics.flushes.load(Ordering::Relaxed);
    let direct = shared.metrics.direct_writes.load(Ordering::Relaxed);
    let state = shared.lock();
    let since = flushes.saturating_sub(state.checkpoints.flushes_at_last);
    // Rows written by full-stripe writes (no flush) since: by time only,
    // or a workload of large writes would never checkpoint and every
    // recovery would read all its rows.
    let direct_since = direct.saturating_sub(state.checkpoints.direct_at_last);
    (every > 0 && since >= every && since > 0)
        || ((since > 0 || direct_since > 0)
            && !interval.is_zero()
            && state.checkpoints.last_at.elapsed() >= interval)
}

/// Writes a checkpoint now (primary only), then frees superseded
/// checkpoint extents.
pub(super) async fn write(shared: &Arc<Shared>) -> Result<CheckpointReport, PartitionError> {
    let _serial = shared.flush_lock.lock().await;
    shared.check_primary(None)?;
    write_held(shared).await
}

/// [`write`] for a caller that holds the flush lock already: a flush whose
/// commit is parked behind a snapshot marker
/// ([`PartitionCore::queue_flush_commit`](super::core::PartitionCore::queue_flush_commit))
/// writes the checkpoint that releases it between two batches.
pub(super) async fn write_held(shared: &Arc<Shared>) -> Result<CheckpointReport, PartitionError> {
    let result = write_locked(shared).await;
    match &result {
        Ok(report) => {
            bump(&shared.metrics.checkpoints_written);
            tracing::info!(partition = ?shared.id(), ?report, "index checkpoint written");
        }
        Err(_) => bump(&shared.metrics.checkpoint_failures),
    }
    result
}

/// The flushed index, as of now (the caller holds the flush lock, so no
/// stripe is half committed).
fn snapshot(shared: &Shared) -> Result<Checkpoint, PartitionError> {
    let state = shared.lock();
    let mut index = PartitionIndex::new(shared.id(), shared.config.size_blocks);
    let mut highest_sequence = 0;
    let mut oldest_in_log: Option<u64> = None;
    let index_error = |source| PartitionError::Index {
        partition: shared.id(),
        source,
    };
    for (lba, run) in state.core.index.runs() {
        match run.location {
            Some(Location::Log { .. }) => {
                oldest_in_log = Some(oldest_in_log.map_or(run.sequence, |s| s.min(run.sequence)));
            }
            Some(location) => {
                highest_sequence = highest_sequence.max(run.sequence);
                index
                    .apply_write(lba, run.block_count, run.sequence, location)
                    .map_err(index_error)?;
            }
            None => {
                highest_sequence = highest_sequence.max(run.sequence);
                index
                    .apply_unmap(lba, run.block_count, run.sequence)
                    .map_err(index_error)?;
            }
        }
    }
    // The snapshot layers' flushed entries and tombstones (log-resident
    // ones come back from the log's replay, which holds them).
    for (id, layer) in state.core.index.snapshot_layers() {
        let entries = layer
            .entries
            .iter()
            .filter(|(_, e)| !matches!(e.location, Some(Location::Log { .. })));
        index.restore_layer(id, layer.cut, entries.map(|(b, e)| (*b, *e)));
    }
    let flushed_through = oldest_in_log
        .map_or(state.core.applied_through, |s| s.saturating_sub(1))
        .min(state.core.applied_through);
    let zero = zero_block_crc();
    let extents = state
        .extents
        .values()
        .filter(|e| !state.checkpoints.holds(e.grant.extent))
        .map(|e| {
            let slots = (e.rows_written * CHUNK_BLOCKS) as usize;
            CoveredExtent {
                extent: e.grant.extent,
                k: e.grant.k,
                rows: e.rows_written,
                crcs: e
                    .crcs
                    .iter()
                    .map(|column| {
                        let mut c: Vec<u32> = column.iter().take(slots).copied().collect();
                        c.resize(slots, zero);
                        c
                    })
                    .collect(),
            }
        })
        .collect();
    Ok(Checkpoint {
        partition: shared.id(),
        epoch: state.core.epoch,
        id: state.checkpoints.next_id,
        flushed_through,
        highest_sequence,
        extents,
        index,
    })
}

fn rows_for(bytes: usize, k: usize) -> u64 {
    (bytes as u64).div_ceil(k as u64 * CHUNK_BYTES).max(1)
}

async fn write_locked(shared: &Arc<Shared>) -> Result<CheckpointReport, PartitionError> {
    // Snapshot markers logged so far are in the index the checkpoint
    // takes below; once it is durable they need not stay in the log.
    let markers_through = shared.lock().core.snapshot_markers.keys().last().copied();
    let checkpoint = snapshot(shared)?;
    let epoch = checkpoint.epoch;
    let payload = checkpoint.encode();
    let Target {
        grant,
        first_row,
        codec,
    } = target(shared, epoch, payload.len()).await?;
    let extent_id = grant.extent;
    let k = codec.data_shards();
    let rows = rows_for(payload.len(), k);
    let row_bytes = k * CHUNK_BYTES as usize;
    let zero = zero_block_crc();
    let mut row = 0;
    while row < rows {
        let batch = (rows - row).min(BATCH_ROWS);
        let mut columns: Vec<BytesMut> = (0..grant.columns.len())
            .map(|_| BytesMut::with_capacity((batch * ROW_BYTES) as usize))
            .collect();
        let mut row_crcs: Vec<Vec<u32>> = Vec::new();
        for r in row..row + batch {
            let from = (r as usize * row_bytes).min(payload.len());
            let to = (from + row_bytes).min(payload.len());
            let mut chunks = vec![vec![0u8; CHUNK_BYTES as usize]; k];
            let mut slots = vec![None; k * CHUNK_BLOCKS as usize];
            for (i, byte) in payload[from..to].chunks(CHUNK_BYTES as usize).enumerate() {
                chunks[i][..byte.len()].copy_from_slice(byte);
            }
            let mut crcs = vec![zero; k * CHUNK_BLOCKS as usize];
            let used_blocks = (to - from).div_ceil(BLOCK_SIZE_BYTES as usize);
            for (slot, entry) in slots.iter_mut().enumerate().take(used_blocks) {
                let column = slot / CHUNK_BLOCKS as usize;
                let at = (slot % CHUNK_BLOCKS as usize) * BLOCK_SIZE_BYTES as usize;
                let crc = crc32c::crc32c(&chunks[column][at..at + BLOCK_SIZE_BYTES as usize]);
                crcs[slot] = crc;
                *entry = Some(SlotEntry {
                    lba: r * (k as u64) * CHUNK_BLOCKS + slot as u64,
                    sequence: checkpoint.id,
                    crc,
                });
            }
            let parity = codec
                .encode(&chunks)
                .map_err(|source| PartitionError::Erasure {
                    partition: shared.id(),
                    extent: extent_id,
                    source,
                })?;
            let summary = StripeSummary {
                kind: StripeKind::IndexCheckpoint,
                volume: shared.id().volume,
                partition: shared.id().index,
                epoch,
                extent: extent_id,
                stripe: first_row + r,
                slots,
                tombstones: Vec::new(),
            }
            .encode()
            .map_err(|e| PartitionError::Recovery {
                partition: shared.id(),
                reason: format!("checkpoint summary: {e}"),
            })?;
            for (column, chunk) in columns.iter_mut().zip(chunks.iter().chain(parity.iter())) {
                column.extend_from_slice(chunk);
                column.extend_from_slice(&summary);
            }
            row_crcs.push(crcs);
        }
        let offset = (first_row + row) * ROW_BYTES;
        append_all(shared, extent_id, &grant, epoch, offset, columns).await?;
        let mut state = shared.lock();
        if let Some(e) = state.extents.get_mut(&extent_id) {
            for (i, crcs) in row_crcs.iter().enumerate() {
                let base = ((first_row + row + i as u64) * CHUNK_BLOCKS) as usize;
                for (column, column_crcs) in e.crcs.iter_mut().enumerate() {
                    column_crcs.resize(base + CHUNK_BLOCKS as usize, zero);
                    column_crcs[base..base + CHUNK_BLOCKS as usize].copy_from_slice(
                        &crcs[column * CHUNK_BLOCKS as usize..(column + 1) * CHUNK_BLOCKS as usize],
                    );
                }
            }
            e.rows_written = e.rows_written.max(first_row + row + batch);
        }
        row += batch;
    }
    let superseded: Vec<u64> = {
        let mut state = shared.lock();
        let flushes = shared.metrics.flushes.load(Ordering::Relaxed);
        let tracker = &mut state.checkpoints;
        tracker.next_id = checkpoint.id + 1;
        tracker.flushes_at_last = flushes;
        tracker.direct_at_last = shared.metrics.direct_writes.load(Ordering::Relaxed);
        tracker.last_at = Instant::now();
        tracker
            .extents
            .iter()
            .copied()
            .filter(|e| *e != extent_id)
            .collect()
    };
    if let Some(through) = markers_through {
        if shared.lock().core.forget_snapshot_markers(through) {
            shared.repl_wakeup.notify_one();
        }
    }
    // The new checkpoint is durable: older checkpoint extents can go.
    let mut extents_freed = 0;
    for old in superseded {
        match shared
            .extent_source
            .free_extent(shared.id(), epoch, old)
            .await
        {
            Ok(()) => {
                let mut state = shared.lock();
                state.extents.remove(&old);
                state.checkpoints.extents.remove(&old);
                extents_freed += 1;
            }
            Err(error) => {
                tracing::warn!(partition = ?shared.id(), extent = old, %error, "superseded checkpoint extent not freed (retried after the next checkpoint)");
            }
        }
    }
    Ok(CheckpointReport {
        id: checkpoint.id,
        epoch,
        extent: extent_id,
        first_row,
        rows,
        bytes: payload.len() as u64,
        extents_freed,
    })
}

/// Where the next checkpoint goes.
struct Target {
    /// The checkpoint extent (`grant.extent` is its id).
    grant: super::ExtentGrant,
    /// The checkpoint's first row in that extent.
    first_row: u64,
    /// The extent's erasure codec.
    codec: Arc<crate::erasure::ErasureCodec>,
}

/// The checkpoint extent and first row the next checkpoint goes to.
async fn target(shared: &Arc<Shared>, epoch: u64, bytes: usize) -> Result<Target, PartitionError> {
    {
        let state = shared.lock();
        if let Some(e) = state
            .checkpoints
            .current
            .and_then(|id| state.extents.get(&id))
        {
            let rows = rows_for(bytes, e.codec.data_shards());
            if !e.sealed && e.rows_written + rows <= e.rows_capacity {
                return Ok(Target {
                    grant: e.grant.clone(),
                    first_row: e.rows_written,
                    codec: e.codec.clone(),
                });
            }
        }
    }
    let extent = open_next_extent(shared, epoch).await?;
    let id = extent.grant.extent;
    let rows = rows_for(bytes, extent.codec.data_shards());
    let fits = rows <= extent.rows_capacity;
    let target = Target {
        grant: extent.grant.clone(),
        first_row: 0,
        codec: extent.codec.clone(),
    };
    {
        let mut state = shared.lock();
        state.extents.insert(id, extent);
        state.checkpoints.extents.insert(id);
        state.checkpoints.current = Some(id);
    }
    if !fits {
        // Freed with the superseded ones once a checkpoint fits again.
        seal_current(shared);
        return Err(shared.unavailable(format!(
            "a checkpoint of {bytes} bytes does not fit one extent"
        )));
    }
    Ok(target)
}

/// No more checkpoints go to the current checkpoint extent.
fn seal_current(shared: &Shared) {
    let mut state = shared.lock();
    if let Some(id) = state.checkpoints.current.take() {
        if let Some(e) = state.extents.get_mut(&id) {
            e.sealed = true;
        }
    }
}

/// Appends `data[i]` to column `i` at `offset`; every present column must
/// be durable (owed columns get nothing: repair writes them).
async fn append_all(
    shared: &Arc<Shared>,
    extent: u64,
    grant: &super::ExtentGrant,
    epoch: u64,
    offset: u64,
    data: Vec<BytesMut>,
) -> Result<(), PartitionError> {
    let present = grant
        .columns
        .iter()
        .zip(data)
        .enumerate()
        .filter(|(i, _)| !grant.is_owed(*i))
        .map(|(_, c)| c);
    let appends = present.map(|((sled, column), data)| {
        let data: Bytes = data.freeze();
        let request = SledRequest::Append {
            column: *column,
            partition: shared.id(),
            epoch,
            offset_bytes: offset,
            block_crcs: crate::wal::format::block_crcs(&data),
            data,
        };
        async move {
            // One retry: appends are idempotent (same offset, same CRCs).
            let mut last = String::new();
            for _ in 0..2 {
                match sled_call(shared, sled, request.clone()).await {
                    Ok(SledResponse::Appended { .. }) => return Ok(()),
                    Ok(SledResponse::Error(SledError::Fenced { current_epoch })) => {
                        return Err(Some(current_epoch))
                    }
                    Ok(other) => last = format!("sled {sled}: {other:?}"),
                    Err(error) => last = error.to_string(),
                }
            }
            tracing::debug!(last, "checkpoint append failed");
            Err(None)
        }
    });
    let mut failed = 0;
    for result in future::join_all(appends).await {
        match result {
            Ok(()) => {}
            Err(Some(current)) => {
                shared.fence(current);
                return Err(PartitionError::Fenced {
                    partition: shared.id(),
                    current,
                });
            }
            Err(None) => failed += 1,
        }
    }
    if failed > 0 {
        // The columns may now differ in length: never append here again.
        seal_current(shared);
        return Err(shared.unavailable(format!(
            "checkpoint extent {extent}: {failed} column appends failed"
        )));
    }
    Ok(())
}

// ------------------------------------------------------------------ recover

/// Summaries read during one recovery (each at most once).
struct Scanner {
    cache: BTreeMap<(u64, u64), Option<StripeSummary>>,
    rows_scanned: u64,
}

impl Scanner {
    /// Reads the summaries of `rows` (extent, row) that are not cached yet,
    /// [`SUMMARY_READS_IN_FLIGHT`] at once: the scans below then walk them
    /// in order from the cache. One read at a time made a take-over's
    /// recovery grow with every row written since the last checkpoint (a
    /// round trip each).
    async fn prefetch(
        &mut self,
        shared: &Shared,
        extents: &BTreeMap<u64, ExtentState>,
        rows: impl Iterator<Item = (u64, u64)>,
    ) {
        let wanted: Vec<(u64, u64)> = rows.filter(|key| !self.cache.contains_key(key)).collect();
        // The futures are made up front (not by a closure of the stream:
        // that is not `Send` for every lifetime, which the spawned manager
        // needs); they start only when the stream polls them.
        let reads: Vec<_> = wanted
            .into_iter()
            .filter_map(|(id, row)| {
                let extent = extents.get(&id)?;
                Some(async move { ((id, row), read_summary(shared, extent, row).await) })
            })
            .collect();
        let read: Vec<_> = futures::stream::iter(reads)
            .buffer_unordered(SUMMARY_READS_IN_FLIGHT)
            .collect()
            .await;
        self.rows_scanned += read.len() as u64;
        self.cache.extend(read);
    }

    async fn summary(
        &mut self,
        shared: &Shared,
        extent: &ExtentState,
        row: u64,
    ) -> Option<StripeSummary> {
        let key = (extent.grant.extent, row);
        if let Some(found) = self.cache.get(&key) {
            return found.clone();
        }
        self.rows_scanned += 1;
        let found = read_summary(shared, extent, row).await;
        self.cache.insert(key, found.clone());
        found
    }
}

/// A checkpoint found on the sleds, not yet loaded.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    epoch: u64,
    id: u64,
    extent: u64,
    first_row: u64,
    last_row: u64,
}

/// What recovery builds before it is installed.
struct Built {
    index: PartitionIndex,
    crcs: BTreeMap<u64, Vec<Vec<u32>>>,
    highest_sequence: u64,
}

/// What a primary's open applies over the index recovered from the sleds.
#[derive(Debug, Clone, Copy)]
pub(super) enum Replayed<'a> {
    /// The log records replayed (a cold open).
    Records(&'a [RecoveredRecord]),
    /// The old instance's log-resident state (an in-place take-over).
    Handed(&'a LogResident),
}

impl Replayed<'_> {
    /// The snapshot cuts (id, cut) to register before any sled row is
    /// applied: the log's (not dropped later in it), or the old instance's.
    fn cuts(self, partition: PartitionId) -> Vec<(u64, u64)> {
        match self {
            Replayed::Records(records) => super::snapshot::cuts_in(partition, records),
            Replayed::Handed(handed) => handed.snapshots.clone(),
        }
    }

    /// Applies it to `probe` (locations in the log do not matter there).
    fn apply_to(
        self,
        partition: PartitionId,
        probe: &mut PartitionIndex,
    ) -> Result<(), IndexError> {
        match self {
            Replayed::Handed(handed) => handed.apply_to(probe),
            Replayed::Records(records) => {
                for r in records.iter().map(|r| &r.record) {
                    if r.partition != partition {
                        continue;
                    }
                    match r.kind {
                        RecordKind::Write => probe.apply_write(
                            r.lba,
                            u64::from(r.block_count),
                            r.sequence,
                            Location::Log {
                                position: crate::wal::LogPosition(0),
                                block_in_record: 0,
                            },
                        )?,
                        RecordKind::Trim => {
                            probe.apply_unmap(r.lba, u64::from(r.block_count), r.sequence)?
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
        }
    }
}

/// A secondary's copy of its primary's flushed index (see the module
/// docs, "secondary index"): what a recovery from the sleds would build
/// from the rows it names, kept current in the background so that a
/// promotion scans only the rows written since.
#[derive(Debug)]
pub(super) struct Shadow {
    /// Sled locations and tombstones (the log-resident runs stay in the
    /// core: the take-over hands them over).
    index: PartitionIndex,
    /// Per data extent, the CRC of every data slot of the rows applied.
    crcs: BTreeMap<u64, Vec<Vec<u32>>>,
    /// Data extents and the rows applied of each: `(k, rows)`.
    covered: BTreeMap<u64, (u8, u64)>,
    /// Checkpoint extents (row 0 says so): never scanned as data.
    checkpoint_extents: BTreeSet<u64>,
    highest_sequence: u64,
    /// The snapshot cuts registered before any row was applied (sorted): a
    /// layer is only right for the cuts it was built under.
    cuts: Vec<(u64, u64)>,
}

impl Shadow {
    /// Data extents and rows applied (observability, tests).
    pub(super) fn rows(&self) -> u64 {
        self.covered.values().map(|(_, rows)| rows).sum()
    }
}

/// Snapshot cuts in one order (a shadow is compared with a promotion's).
fn sorted_cuts(mut cuts: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// Primary recovery from the sleds (see the module docs): claims every
/// owned extent at the partition's epoch and rebuilds the index from the
/// secondary index `shadow` this node kept (a promotion) plus the rows
/// after it, or from the newest valid checkpoint plus the rows after it,
/// or from every summary. `replayed` (what is applied over it next) only
/// decides whether a run pointing at a freed extent is superseded.
pub(super) async fn recover(
    shared: &Arc<Shared>,
    replayed: Replayed<'_>,
    shadow: Option<Shadow>,
) -> Result<RecoveryReport, PartitionError> {
    let started = Instant::now();
    let grants = shared
        .extent_source
        .owned_extents(shared.id())
        .await
        .map_err(|source| PartitionError::Peer {
            partition: shared.id(),
            source,
        })?;
    let epoch = shared.lock().core.epoch;
    // Each open is a claim round trip to every sled of the extent: many at
    // once (in order; the first error wins as before).
    let opens: Vec<_> = grants
        .into_iter()
        .map(|grant| open_extent(shared, grant, epoch, true))
        .collect();
    let opened: Vec<Result<ExtentState, PartitionError>> = futures::stream::iter(opens)
        .buffered(EXTENT_OPENS_IN_FLIGHT)
        .collect()
        .await;
    let mut extents = BTreeMap::new();
    for extent in opened {
        let extent = extent?;
        extents.insert(extent.grant.extent, extent);
    }
    let (built, checkpoint_extents, mut report) =
        rebuild(shared, &extents, replayed, shadow, epoch).await?;
    report.duration = started.elapsed();
    {
        let mut state = shared.lock();
        for (id, crcs) in built.crcs {
            if let Some(e) = extents.get_mut(&id) {
                e.crcs = crcs;
            }
        }
        state
            .core
            .install_recovered_index(built.index, built.highest_sequence);
        state.extents = extents;
        state.checkpoints = Tracker::new();
        state.checkpoints.extents = checkpoint_extents;
        state.checkpoints.flushes_at_last = shared.metrics.flushes.load(Ordering::Relaxed);
        state.checkpoints.direct_at_last = shared.metrics.direct_writes.load(Ordering::Relaxed);
    }
    let m = &shared.metrics;
    m.recovery_rows_scanned
        .store(report.rows_scanned, Ordering::Relaxed);
    m.recovery_checkpoint_used
        .store(u64::from(report.checkpoint.is_some()), Ordering::Relaxed);
    m.recovery_duration_ms
        .store(report.duration.as_millis() as u64, Ordering::Relaxed);
    m.recovery_checkpoints_refused
        .store(report.checkpoints_refused, Ordering::Relaxed);
    m.recovery_held_index_used
        .store(u64::from(report.held_index), Ordering::Relaxed);
    match report.checkpoint {
        _ if report.held_index => tracing::info!(
            partition = ?shared.id(),
            epoch,
            rows_scanned = report.rows_scanned,
            duration_ms = report.duration.as_millis() as u64,
            "recovered from the index this node held plus the rows after it"
        ),
        Some((ckpt_epoch, id)) => tracing::info!(
            partition = ?shared.id(),
            epoch,
            checkpoint_epoch = ckpt_epoch,
            checkpoint_id = id,
            rows_scanned = report.rows_scanned,
            refused = report.checkpoints_refused,
            duration_ms = report.duration.as_millis() as u64,
            "recovered from an index checkpoint plus the rows after it"
        ),
        None => tracing::info!(
            partition = ?shared.id(),
            epoch,
            rows_scanned = report.rows_scanned,
            refused = report.checkpoints_refused,
            duration_ms = report.duration.as_millis() as u64,
            "recovered by the full summary scan (no usable index checkpoint)"
        ),
    }
    let mut last = shared
        .recovery
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    *last = report;
    Ok(report)
}

/// The index of `extents` (opened by the caller: claimed by a primary,
/// looked at by a secondary): from `shadow` plus the rows after it if it
/// passes the checks, else from the newest valid checkpoint plus the rows
/// after it, else from every summary. Returns it with the checkpoint
/// extents and how it went (no duration).
async fn rebuild(
    shared: &Arc<Shared>,
    extents: &BTreeMap<u64, ExtentState>,
    replayed: Replayed<'_>,
    shadow: Option<Shadow>,
    epoch: u64,
) -> Result<(Built, BTreeSet<u64>, RecoveryReport), PartitionError> {
    let mut scanner = Scanner {
        cache: BTreeMap::new(),
        rows_scanned: 0,
    };
    let mut report = RecoveryReport::default();
    if let Some(shadow) = shadow {
        match try_shadow(shared, &mut scanner, extents, shadow, replayed).await? {
            Ok((built, checkpoint_extents)) => {
                report.held_index = true;
                report.rows_scanned = scanner.rows_scanned;
                return Ok((built, checkpoint_extents, report));
            }
            Err(reason) => tracing::warn!(
                partition = ?shared.id(),
                reason,
                "held index refused; recovering from a checkpoint"
            ),
        }
    }
    let firsts = extents
        .values()
        .filter(|e| e.rows_written > 0)
        .map(|e| (e.grant.extent, 0));
    scanner.prefetch(shared, extents, firsts).await;
    // Row 0 tells a checkpoint extent from a data extent.
    let mut checkpoint_extents = BTreeSet::new();
    for extent in extents.values() {
        if extent.rows_written == 0 {
            continue;
        }
        if let Some(s) = scanner.summary(shared, extent, 0).await {
            if s.kind == StripeKind::IndexCheckpoint {
                checkpoint_extents.insert(extent.grant.extent);
            }
        }
    }
    let mut cursors: BTreeMap<u64, Option<u64>> = checkpoint_extents
        .iter()
        .filter_map(|id| {
            extents
                .get(id)
                .map(|e| (*id, e.rows_written.checked_sub(1)))
        })
        .collect();
    let mut built = None;
    for _ in 0..MAX_CANDIDATES {
        let mut best: Option<Candidate> = None;
        for (id, cursor) in cursors.iter_mut() {
            let Some(last_row) = *cursor else { continue };
            let Some(extent) = extents.get(id) else {
                continue;
            };
            match candidate_at(&mut scanner, shared, extent, last_row, epoch).await {
                Some(c) => {
                    if best.is_none_or(|b| (c.epoch, c.id) > (b.epoch, b.id)) {
                        best = Some(c);
                    }
                }
                None => *cursor = None,
            }
        }
        let Some(candidate) = best else { break };
        let attempt = match extents.get(&candidate.extent) {
            Some(extent) => {
                try_candidate(
                    shared,
                    &mut scanner,
                    extents,
                    &checkpoint_extents,
                    extent,
                    candidate,
                    replayed,
                )
                .await?
            }
            None => Err("extent vanished".to_string()),
        };
        match attempt {
            Ok(b) => {
                report.checkpoint = Some((candidate.epoch, candidate.id));
                built = Some(b);
                break;
            }
            Err(reason) => {
                report.checkpoints_refused += 1;
                tracing::warn!(partition = ?shared.id(), ?candidate, reason, "index checkpoint refused; trying an older one");
                cursors.insert(candidate.extent, candidate.first_row.checked_sub(1));
            }
        }
    }
    let built = match built {
        Some(b) => b,
        None => {
            let mut b = Built {
                index: PartitionIndex::new(shared.id(), shared.config.size_blocks),
                crcs: BTreeMap::new(),
                highest_sequence: 0,
            };
            // Without a checkpoint the snapshots are the log's cuts (a cut
            // no checkpoint holds is held in the log until one does).
            for (id, cut) in replayed.cuts(shared.id()) {
                b.index
                    .add_snapshot(id, cut)
                    .map_err(|source| PartitionError::Index {
                        partition: shared.id(),
                        source,
                    })?;
            }
            let from: BTreeMap<u64, u64> = extents
                .keys()
                .filter(|id| !checkpoint_extents.contains(id))
                .map(|id| (*id, 0))
                .collect();
            scan(shared, &mut scanner, extents, &from, &mut b).await?;
            b
        }
    };
    report.rows_scanned = scanner.rows_scanned;
    Ok((built, checkpoint_extents, report))
}

/// Checks and extends a secondary index: `Ok(Err(reason))` when it is not
/// trusted (the caller recovers from a checkpoint), `Err` for failures a
/// checkpoint recovery would hit too. Extents it does not cover yet are
/// told apart by row 0 and scanned from their first row; covered ones from
/// the first row it has not applied.
async fn try_shadow(
    shared: &Arc<Shared>,
    scanner: &mut Scanner,
    extents: &BTreeMap<u64, ExtentState>,
    shadow: Shadow,
    replayed: Replayed<'_>,
) -> Result<Result<(Built, BTreeSet<u64>), String>, PartitionError> {
    if shadow.index.size_blocks() != shared.config.size_blocks {
        return Ok(Err("another size".to_string()));
    }
    if shadow.cuts != sorted_cuts(replayed.cuts(shared.id())) {
        return Ok(Err("built under other snapshot cuts".to_string()));
    }
    let mut from: BTreeMap<u64, u64> = BTreeMap::new();
    let mut unknown = Vec::new();
    let mut checkpoint_extents = BTreeSet::new();
    for (id, extent) in extents {
        if shadow.checkpoint_extents.contains(id) {
            checkpoint_extents.insert(*id);
        } else if let Some((k, rows)) = shadow.covered.get(id) {
            if extent.grant.k != *k || extent.rows_written < *rows {
                return Ok(Err(format!(
                    "extent {id}: {rows} rows of k={k} applied, sleds hold {} of k={}",
                    extent.rows_written, extent.grant.k
                )));
            }
            from.insert(*id, *rows);
        } else if extent.rows_written > 0 {
            unknown.push(*id);
        } else {
            // Empty: nothing to tell apart yet, nothing to scan.
            from.insert(*id, 0);
        }
    }
    scanner
        .prefetch(shared, extents, unknown.iter().map(|id| (*id, 0)))
        .await;
    for id in unknown {
        let Some(extent) = extents.get(&id) else {
            continue;
        };
        match scanner.summary(shared, extent, 0).await {
            Some(s) if s.kind == StripeKind::IndexCheckpoint => {
                checkpoint_extents.insert(id);
            }
            _ => {
                from.insert(id, 0);
            }
        }
    }
    let Shadow {
        index,
        mut crcs,
        highest_sequence,
        ..
    } = shadow;
    crcs.retain(|id, _| from.contains_key(id));
    let mut built = Built {
        index,
        crcs,
        highest_sequence,
    };
    scan(shared, scanner, extents, &from, &mut built).await?;
    // Invariant 4, as for a checkpoint: nothing may point at an extent
    // that is gone (freed by GC after its rows were applied), unless the
    // log replayed next supersedes it.
    if let Err(why) = nothing_points_outside(shared, &built, &from, replayed) {
        return Ok(Err(why));
    }
    Ok(Ok((built, checkpoint_extents)))
}

/// A secondary brings its index of the primary's flushed data up to date
/// (see the module docs): the extents the partition owns, looked at
/// without a claim (the primary keeps writing), and the rows written since
/// the last pass (the first pass, or one after the snapshot cuts changed,
/// starts from the newest checkpoint). Its own log-resident runs decide,
/// as at a promotion, whether a run at a freed extent is superseded.
pub(super) async fn refresh_shadow(shared: &Arc<Shared>) -> Result<u64, PartitionError> {
    // Held to the end: a promotion waits for the pass and takes its result.
    let mut slot = shared.shadow.lock().await;
    let grants = shared
        .extent_source
        .owned_extents(shared.id())
        .await
        .map_err(|source| PartitionError::Peer {
            partition: shared.id(),
            source,
        })?;
    let looks: Vec<_> = grants
        .into_iter()
        .map(|grant| look_at_extent(shared, grant))
        .collect();
    let looked: Vec<Result<ExtentState, PartitionError>> = futures::stream::iter(looks)
        .buffered(EXTENT_OPENS_IN_FLIGHT)
        .collect()
        .await;
    let mut extents = BTreeMap::new();
    for extent in looked {
        let extent = extent?;
        extents.insert(extent.grant.extent, extent);
    }
    let (handed, epoch) = {
        let state = shared.lock();
        if !matches!(state.core.role(), super::Role::Secondary) {
            return Ok(0);
        }
        (
            state.core.take_over_plan(true).log_resident,
            state.core.epoch,
        )
    };
    let base = slot.take();
    let replayed = Replayed::Handed(&handed);
    let (built, checkpoint_extents, report) =
        rebuild(shared, &extents, replayed, base, epoch).await?;
    let covered: BTreeMap<u64, (u8, u64)> = extents
        .values()
        .filter(|e| !checkpoint_extents.contains(&e.grant.extent) && e.rows_written > 0)
        .map(|e| (e.grant.extent, (e.grant.k, e.rows_written)))
        .collect();
    let crcs = built
        .crcs
        .into_iter()
        .filter(|(id, _)| covered.contains_key(id))
        .collect();
    *slot = Some(Shadow {
        index: built.index,
        crcs,
        covered,
        checkpoint_extents,
        highest_sequence: built.highest_sequence,
        cuts: sorted_cuts(handed.snapshots.clone()),
    });
    Ok(report.rows_scanned)
}

/// A primary's own index of its flushed data as a [`Shadow`], for its
/// in-place take-over at a new epoch (its secondary replaced): the new
/// instance then reads only rows appended after it. The caller holds the
/// flush lock (no stripe half committed). `None` while the partition has
/// snapshots (their layers come back from a checkpoint or the scan, which
/// register the cuts first).
pub(super) fn own_shadow(shared: &Shared) -> Option<Shadow> {
    if !shared.lock().core.index.snapshots().is_empty() {
        return None;
    }
    let checkpoint = snapshot(shared).ok()?;
    let checkpoint_extents: BTreeSet<u64> =
        shared.lock().checkpoints.extents.iter().copied().collect();
    let mut crcs = BTreeMap::new();
    let mut covered = BTreeMap::new();
    for e in checkpoint.extents {
        if e.rows > 0 {
            covered.insert(e.extent, (e.k, e.rows));
            crcs.insert(e.extent, e.crcs);
        }
    }
    Some(Shadow {
        index: checkpoint.index,
        crcs,
        covered,
        checkpoint_extents,
        highest_sequence: checkpoint.highest_sequence,
        cuts: Vec::new(),
    })
}

/// An extent as a secondary sees it: every present column's length from
/// `ColumnStatus` (no claim: the primary keeps appending), a row counted
/// once k columns hold it, like a claim's answer counts it.
async fn look_at_extent(
    shared: &Arc<Shared>,
    grant: ExtentGrant,
) -> Result<ExtentState, PartitionError> {
    let (k, m) = (usize::from(grant.k), usize::from(grant.m));
    let bad = |reason: String| PartitionError::Recovery {
        partition: shared.id(),
        reason: format!("extent {}: {reason}", grant.extent),
    };
    if grant.columns.len() != k + m || k == 0 || k > layout::MAX_DATA_COLUMNS {
        return Err(bad(format!("k={k} m={m} unsupported")));
    }
    let codec = Arc::new(
        ErasureCodec::new(k, m).map_err(|source| PartitionError::Erasure {
            partition: shared.id(),
            extent: grant.extent,
            source,
        })?,
    );
    let statuses = grant.present().map(|(_, (sled, column))| {
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
        return Err(bad(format!("only {} columns answered", lengths.len())));
    }
    lengths.sort_unstable_by(|a, b| b.cmp(a));
    Ok(ExtentState {
        rows_capacity: grant.column_size_bytes / ROW_BYTES,
        crcs: vec![Vec::new(); k],
        rows_written: lengths[k - 1] / ROW_BYTES,
        sealed: true,
        codec,
        grant,
    })
}

/// The checkpoint whose last row is `last_row`, from that row's summary.
async fn candidate_at(
    scanner: &mut Scanner,
    shared: &Shared,
    extent: &ExtentState,
    last_row: u64,
    epoch: u64,
) -> Option<Candidate> {
    let summary = scanner.summary(shared, extent, last_row).await?;
    if summary.kind != StripeKind::IndexCheckpoint || summary.epoch > epoch {
        return None;
    }
    let first = summary.slots.first().copied().flatten()?;
    let per_row = u64::from(extent.grant.k) * CHUNK_BLOCKS;
    if first.lba % per_row != 0 {
        return None;
    }
    let first_row = last_row.checked_sub(first.lba / per_row)?;
    Some(Candidate {
        epoch: summary.epoch,
        id: first.sequence,
        extent: extent.grant.extent,
        first_row,
        last_row,
    })
}

/// Loads, checks and applies one candidate; `Ok(Err(reason))` when it is
/// not trusted (the caller tries an older one), `Err` for failures that a
/// full scan would hit too.
async fn try_candidate(
    shared: &Arc<Shared>,
    scanner: &mut Scanner,
    extents: &BTreeMap<u64, ExtentState>,
    checkpoint_extents: &BTreeSet<u64>,
    holder: &ExtentState,
    candidate: Candidate,
    replayed: Replayed<'_>,
) -> Result<Result<Built, String>, PartitionError> {
    let checkpoint = match load(shared, holder, candidate).await {
        Ok(c) => c,
        Err(reason) => return Ok(Err(reason)),
    };
    let epoch = shared.lock().core.epoch;
    if checkpoint.partition != shared.id()
        || checkpoint.index.size_blocks() != shared.config.size_blocks
    {
        return Ok(Err("another partition or size".to_string()));
    }
    if checkpoint.epoch != candidate.epoch
        || checkpoint.id != candidate.id
        || checkpoint.epoch > epoch
    {
        return Ok(Err(format!(
            "header says epoch {} id {}, rows say {} {}",
            checkpoint.epoch, checkpoint.id, candidate.epoch, candidate.id
        )));
    }
    let mut built = Built {
        index: checkpoint.index,
        crcs: BTreeMap::new(),
        highest_sequence: checkpoint.highest_sequence,
    };
    // Cuts the log holds that the checkpoint predates: registered before
    // the summaries after it are applied (see `super::snapshot`).
    for (id, cut) in replayed.cuts(shared.id()) {
        if let Err(error) = built.index.add_snapshot(id, cut) {
            return Ok(Err(format!("the log's cut of snapshot {id}: {error}")));
        }
    }
    let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
    for e in checkpoint.extents {
        if checkpoint_extents.contains(&e.extent) {
            return Ok(Err(format!("covers checkpoint extent {}", e.extent)));
        }
        if let Some(owned) = extents.get(&e.extent) {
            if owned.grant.k != e.k || owned.rows_written < e.rows {
                return Ok(Err(format!(
                    "extent {}: covers {} rows of k={}, sleds hold {} of k={}",
                    e.extent, e.rows, e.k, owned.rows_written, owned.grant.k
                )));
            }
            built.crcs.insert(e.extent, e.crcs);
        }
        covered.insert(e.extent, e.rows);
    }
    for (_, run) in built.index.runs() {
        if let Some(Location::Sled {
            extent,
            offset_bytes,
            ..
        }) = run.location
        {
            let last = offset_bytes + (run.block_count - 1) * BLOCK_SIZE_BYTES;
            let inside = covered.get(&extent).is_some_and(|rows| {
                layout::split_offset(last).is_some_and(|(stripe, _)| stripe < *rows)
            });
            if !inside {
                return Ok(Err(format!(
                    "a run points outside the rows covered of extent {extent}"
                )));
            }
        }
    }
    let from: BTreeMap<u64, u64> = extents
        .keys()
        .filter(|id| !checkpoint_extents.contains(id))
        .map(|id| (*id, covered.get(id).copied().unwrap_or(0)))
        .collect();
    scan(shared, scanner, extents, &from, &mut built).await?;
    // Invariant 4: nothing may point at an extent that is gone, unless the
    // log replayed next supersedes it.
    if let Err(why) = nothing_points_outside(shared, &built, &from, replayed) {
        return Ok(Err(why));
    }
    Ok(Ok(built))
}

/// Invariant 4 of a rebuilt index: no block points at a sled extent
/// outside `from` (the partition's extents; one GC freed is gone) unless
/// the log records replayed next supersede it. `Err` says why the index
/// cannot be used.
fn nothing_points_outside(
    shared: &Shared,
    built: &Built,
    from: &BTreeMap<u64, u64>,
    replayed: Replayed<'_>,
) -> Result<(), String> {
    let owned: BTreeSet<u64> = from.keys().copied().collect();
    if !points_outside(&built.index, &owned) {
        return Ok(());
    }
    let mut probe = built.index.clone();
    if replayed.apply_to(shared.id(), &mut probe).is_err() {
        return Err("a log record does not fit the partition".to_string());
    }
    if points_outside(&probe, &owned) {
        return Err("blocks still point at a freed extent after the rows and the log".to_string());
    }
    Ok(())
}

fn points_outside(index: &PartitionIndex, owned: &BTreeSet<u64>) -> bool {
    index.runs().any(|(_, run)| {
        matches!(run.location, Some(Location::Sled { extent, .. }) if !owned.contains(&extent))
    })
}

/// Reads the candidate's rows (any k columns per row), checks them against
/// their summaries and decodes the payload.
async fn load(
    shared: &Shared,
    holder: &ExtentState,
    candidate: Candidate,
) -> Result<Checkpoint, String> {
    let k = holder.codec.data_shards();
    let per_row = k as u64 * CHUNK_BLOCKS;
    let zero = zero_block_crc();
    let mut payload: Vec<u8> = Vec::new();
    let mut row = candidate.first_row;
    while row <= candidate.last_row {
        let batch = (candidate.last_row + 1 - row).min(BATCH_ROWS);
        let len = batch * ROW_BYTES;
        // Owed columns hold nothing: decoded around like lost ones.
        let reads = holder
            .grant
            .columns
            .iter()
            .enumerate()
            .map(|(i, (sled, column))| async move {
                if holder.grant.is_owed(i) {
                    return None;
                }
                read_verified(shared, sled, *column, row * ROW_BYTES, len).await
            });
        let columns: Vec<Option<Bytes>> = future::join_all(reads).await;
        for r in 0..batch {
            let stripe = row + r;
            let at = (r * ROW_BYTES) as usize;
            let chunk_end = at + CHUNK_BYTES as usize;
            let summary = columns.iter().flatten().find_map(|c| {
                StripeSummary::decode(&c[chunk_end..at + ROW_BYTES as usize])
                    .ok()
                    .filter(|s| {
                        s.kind == StripeKind::IndexCheckpoint
                            && s.extent == holder.grant.extent
                            && s.stripe == stripe
                            && s.epoch == candidate.epoch
                            && s.volume == shared.id().volume
                            && s.partition == shared.id().index
                    })
            });
            let Some(summary) = summary else {
                return Err(format!("row {stripe}: no valid checkpoint summary"));
            };
            let mut shards: Vec<Option<Vec<u8>>> = columns
                .iter()
                .map(|c| c.as_ref().map(|c| c[at..chunk_end].to_vec()))
                .collect();
            holder
                .codec
                .reconstruct_data(&mut shards)
                .map_err(|e| format!("row {stripe}: {e}"))?;
            for (d, shard) in shards.iter().take(k).enumerate() {
                let Some(shard) = shard else {
                    return Err(format!("row {stripe}: data column {d} not decoded"));
                };
                for (b, block) in shard.chunks(BLOCK_SIZE_BYTES as usize).enumerate() {
                    let slot = d * CHUNK_BLOCKS as usize + b;
                    let entry = summary.slots.get(slot).copied().flatten();
                    let expected_lba = (stripe - candidate.first_row) * per_row + slot as u64;
                    let ok = match entry {
                        Some(e) => {
                            e.lba == expected_lba
                                && e.sequence == candidate.id
                                && crc32c::crc32c(block) == e.crc
                        }
                        None => crc32c::crc32c(block) == zero,
                    };
                    if !ok {
                        return Err(format!(
                            "row {stripe} column {d} block {b} does not match its summary"
                        ));
                    }
                }
                payload.extend_from_slice(shard);
            }
        }
        row += batch;
    }
    let checkpoint = Checkpoint::decode(&payload)?;
    // Its encoded length is the header's body length plus the CRC (decode
    // checked both): re-encoding a checkpoint of a few MB only to measure
    // it cost a take-over as much again as decoding it.
    let encoded_len = payload
        .get(BODY_LEN_AT..BODY_LEN_AT + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .and_then(|b| usize::try_from(u64::from_le_bytes(b)).ok())
        .and_then(|body_len| body_len.checked_add(4))
        .ok_or_else(|| "no body length".to_string())?;
    let rows = rows_for(encoded_len, k);
    if rows != candidate.last_row + 1 - candidate.first_row {
        return Err(format!(
            "{rows} rows expected, {} found (torn)",
            candidate.last_row + 1 - candidate.first_row
        ));
    }
    Ok(checkpoint)
}

/// Applies the summaries of rows `from[extent]..rows_written` of every data
/// extent, in extent order (newest sequence wins; equal sequences: the
/// later row, i.e. a GC move, wins).
async fn scan(
    shared: &Shared,
    scanner: &mut Scanner,
    extents: &BTreeMap<u64, ExtentState>,
    from: &BTreeMap<u64, u64>,
    built: &mut Built,
) -> Result<(), PartitionError> {
    let zero = zero_block_crc();
    let index_error = |source| PartitionError::Index {
        partition: shared.id(),
        source,
    };
    let rows = from.iter().flat_map(|(id, start)| {
        let end = extents.get(id).map_or(0, |e| e.rows_written);
        (*start..end).map(move |row| (*id, row))
    });
    scanner.prefetch(shared, extents, rows).await;
    for (id, start) in from {
        let Some(extent) = extents.get(id) else {
            continue;
        };
        let k = usize::from(extent.grant.k);
        let crcs = built.crcs.entry(*id).or_insert_with(|| vec![Vec::new(); k]);
        for row in *start..extent.rows_written {
            let Some(summary) = scanner.summary(shared, extent, row).await else {
                return Err(PartitionError::Recovery {
                    partition: shared.id(),
                    reason: format!("extent {id} stripe {row}: no readable summary"),
                });
            };
            for column in crcs.iter_mut() {
                column.resize(((row + 1) * CHUNK_BLOCKS) as usize, zero);
            }
            if summary.kind != StripeKind::Data {
                continue;
            }
            for (slot, entry) in summary.slots.iter().enumerate() {
                let column = slot / CHUNK_BLOCKS as usize;
                let in_chunk = (slot % CHUNK_BLOCKS as usize) as u64;
                if column >= k {
                    break;
                }
                crcs[column][(row * CHUNK_BLOCKS + in_chunk) as usize] =
                    entry.map_or(zero, |e| e.crc);
                let Some(entry) = entry else { continue };
                built.highest_sequence = built.highest_sequence.max(entry.sequence);
                built
                    .index
                    .apply_write(
                        entry.lba,
                        1,
                        entry.sequence,
                        Location::Sled {
                            extent: *id,
                            column: column as u16,
                            offset_bytes: layout::block_offset(row, in_chunk),
                        },
                    )
                    .map_err(index_error)?;
            }
            for t in &summary.tombstones {
                built.highest_sequence = built.highest_sequence.max(t.sequence);
                built
                    .index
                    .apply_unmap(t.lba, t.block_count, t.sequence)
                    .map_err(index_error)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        let partition = PartitionId {
            volume: 3,
            index: 4,
        };
        let mut index = PartitionIndex::new(partition, 1000);
        index
            .apply_write(
                10,
                20,
                7,
                Location::Sled {
                    extent: 5,
                    column: 1,
                    offset_bytes: 4096,
                },
            )
            .unwrap();
        index.apply_unmap(40, 5, 9).unwrap();
        Checkpoint {
            partition,
            epoch: 2,
            id: 11,
            flushed_through: 9,
            highest_sequence: 9,
            extents: vec![CoveredExtent {
                extent: 5,
                k: 2,
                rows: 1,
                crcs: vec![(0..16).collect(), (16..32).collect()],
            }],
            index,
        }
    }

    #[test]
    fn payload_round_trips_with_padding_and_rejects_corruption() {
        let checkpoint = sample();
        let mut bytes = checkpoint.encode();
        let len = bytes.len();
        bytes.resize(len + 5000, 0);
        assert_eq!(Checkpoint::decode(&bytes).unwrap(), checkpoint);
        for at in [0, 9, 14, 30, len / 2, len - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x04;
            assert!(Checkpoint::decode(&bad).is_err(), "flip at {at}");
        }
        assert!(Checkpoint::decode(&bytes[..len - 1]).is_err());
        assert!(Checkpoint::decode(&[0u8; 8192]).is_err());
    }

    #[test]
    fn rows_needed() {
        assert_eq!(rows_for(1, 4), 1);
        assert_eq!(rows_for(4 * CHUNK_BYTES as usize, 4), 1);
        assert_eq!(rows_for(4 * CHUNK_BYTES as usize + 1, 4), 2);
    }
}
