//! The partition engine: one [`Partition`] per volume partition this head
//! node serves, as **primary** or **secondary** (ARCHITECTURE.md: Write
//! path, Read path, Durability and fencing; "invariant N" below is its
//! System invariant N).
//!
//! ```text
//!  host write ─▶ validate (role, epoch, range, CRCs) ─▶ range lock (+ read-modify-write
//!               of partial 4 KiB blocks) ─▶ assign sequence(s) ─┬─▶ local WAL append (group commit)
//!                                                               └─▶ replication queue ─▶ replicator task
//!                                                                   ─▶ ReplicaRequest::Append ─▶ secondary WAL
//!               both durable ─▶ index: LBA → Log(position) ─▶ ack (Done)
//!  flush (fill ratio / age / flush_now) ─▶ Log-resident blocks + pending trims ─▶ stripes of
//!               the open extent (k data chunks + m parity + summary per column) ─▶ k+m sled
//!               Appends with the epoch ─▶ all durable ─▶ index: LBA → Sled(extent, column, offset)
//!               ─▶ FlushCommit to the local WAL and to the secondary ─▶ release the WAL
//!  host read  ─▶ index ─▶ Log: WAL read (CRC) | Sled: the one data column (CRC against the
//!               summary CRC), hedged: error / timeout / bad CRC ─▶ k other chunks, decode,
//!               repair queue | never written / unmapped: zeros
//!  gc_pass    ─▶ extents below the live threshold ─▶ live blocks re-flushed with their
//!               ORIGINAL sequence (a newer write always wins) ─▶ free_extent
//! ```
//!
//! **Roles.** `Primary` serves hosts and drives replication, flush and GC;
//! `Secondary` only answers [`Partition::handle_replica`]; `Fenced` is what a
//! primary becomes when a sled answers `Fenced` or the secondary reports a
//! newer epoch: it stops acknowledging at once and fails in-flight requests
//! with `NotPrimary` (invariant 2). A node becomes primary of an epoch by
//! [`Partition::open`] with [`OpenRole::Primary`], which claims every column
//! of the partition's extents with the new epoch and rebuilds the index from
//! the sleds (newest index checkpoint plus the summaries written after it)
//! and its own log (the promoted secondary does exactly this).
//!
//! **Durability (default policy, invariant 1).** A write is acknowledged only
//! when it is durable in the primary's log *and* the secondary's. If the
//! secondary does not confirm within `replica_timeout` the host gets the
//! retryable `Unavailable`; the record stays queued for the secondary (so the
//! two logs converge when it returns) and is applied to the index only once
//! both copies exist. There is no single-copy mode.
//!
//! **Ordering.** The primary is the single point of ordering of its
//! partition: sequences are assigned under one lock, replication sends them
//! in sequence order (the secondary refuses holes with `Gap` and the primary
//! resends from its log, or — for records it already flushed and released —
//! sends a `FlushCommit` that moves the secondary past them), and the index
//! applies "newest sequence wins" everywhere (log replay, flush, GC).
//! Overlapping writes are serialised by a range lock, which also makes the
//! read-modify-write of partial blocks atomic.
//!
//! **Log space.** Several partitions share the head node's [`Wal`]; a
//! [`SharedLog`] releases it up to the oldest position any partition still
//! needs: records the index points at, writes in flight, trims not yet
//! written to a summary, records the secondary has not confirmed (invariant
//! 4: the index never points at reclaimed log space).
//!
//! **Recovery.** Primary: claim the extents, load the newest valid index
//! checkpoint from the sleds and read the stripe summaries (slots and
//! tombstones, see [`layout`]) of only the rows written after it — or of
//! every row when no checkpoint can be trusted ([`checkpoint`]) — then
//! replay the partition's records of the log (writes and trims; newest
//! sequence wins). Secondary: replay the log (writes, trims and flush
//! commits) of its epoch only, and log a join marker that voids the
//! partition's older-epoch records for every later replay (a dead
//! primary's unconfirmed records share sequences with the next primary's
//! writes, see [`live_records`]); the highest epoch seen is the highest
//! epoch of its logged records. The primary writes a checkpoint every
//! `checkpoint_every_flushes` flush commits or `checkpoint_interval`, and
//! on [`Partition::write_checkpoint`].

pub mod error;
pub mod layout;
pub mod seams;

mod checkpoint;
mod dedupe;
mod flush;
mod read;
mod rebuild;
mod replica;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;
use proto::sled::PartitionId;
use proto::volume::{
    HostOp, HostReply, HostRequest, ReplicaRecord, ReplicaRecordKind, SECTOR_BYTES,
};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

pub use checkpoint::{CheckpointReport, RecoveryReport};
pub use dedupe::{DEDUPE_CAPACITY, DEDUPE_MAX_AGE};
pub use error::PartitionError;
pub use flush::{FlushReport, GcReport};
pub use rebuild::{RebuildError, RebuildProgress, RebuildTask};
pub use seams::{ExtentGrant, ExtentSource, PeerError, ReplicaPeer, SledAccess};

use crate::erasure::ErasureCodec;
use crate::index::{Location, PartitionIndex};
use crate::wal::{LogPosition, LogRecord, RecordKind, RecoveredRecord, Wal, WalError};
use proto::BLOCK_SIZE_BYTES;

/// Log reads a flush, a take-over or a catch-up keeps in flight.
const LOG_READS_IN_FLIGHT: usize = 32;
/// Most blocks in one log / replication record (a host write is split).
pub const MAX_RECORD_BLOCKS: u64 = 256;
/// Bound of the repair queue (oldest entries are dropped and counted).
pub const REPAIR_QUEUE_CAPACITY: usize = 4096;

/// Tunables of one partition.
#[derive(Debug, Clone)]
pub struct PartitionConfig {
    /// Which partition.
    pub partition: PartitionId,
    /// First 4 KiB block of the partition in the volume.
    pub first_block: u64,
    /// Size in 4 KiB blocks.
    pub size_blocks: u64,
    /// The epoch this node serves the partition at (primary) or the lowest
    /// it accepts (secondary).
    pub epoch: u64,
    /// How long a write waits for both copies before `Unavailable`.
    pub replica_timeout: Duration,
    /// Pause between replication retries.
    pub replica_retry_interval: Duration,
    /// A sled read slower than this starts a degraded read in parallel.
    pub hedge_timeout: Duration,
    /// Bound on one sled request.
    pub sled_timeout: Duration,
    /// Flush when the shared log is fuller than this (0..1).
    pub flush_fill_ratio: f64,
    /// Flush when the oldest unflushed write is older than this.
    pub flush_age: Duration,
    /// Most blocks one flush batch packs.
    pub flush_batch_blocks: usize,
    /// GC compacts extents whose live fraction is below this (0..1).
    pub gc_live_threshold: f64,
    /// Writes in flight (bounded queue of the write path).
    pub max_inflight_writes: usize,
    /// Write an index checkpoint to the sleds after this many flush
    /// commits (0: only by time).
    pub checkpoint_every_flushes: u64,
    /// ... or once this long passed since the last one and something was
    /// flushed since (zero: only by count; both zero: never).
    pub checkpoint_interval: Duration,
}

impl PartitionConfig {
    /// Defaults for a partition (`replica_timeout` 5 s, hedge 50 ms, flush at
    /// 25 % log fill or 5 s, GC below 50 % live, index checkpoint every 32
    /// flush commits or 60 s).
    pub fn new(partition: PartitionId, first_block: u64, size_blocks: u64, epoch: u64) -> Self {
        Self {
            partition,
            first_block,
            size_blocks,
            epoch,
            replica_timeout: Duration::from_secs(5),
            replica_retry_interval: Duration::from_millis(20),
            hedge_timeout: Duration::from_millis(50),
            sled_timeout: Duration::from_secs(2),
            flush_fill_ratio: 0.25,
            flush_age: Duration::from_secs(5),
            flush_batch_blocks: 16_384,
            gc_live_threshold: 0.5,
            max_inflight_writes: 256,
            checkpoint_every_flushes: 32,
            checkpoint_interval: Duration::from_secs(60),
        }
    }

    fn start_bytes(&self) -> u64 {
        self.first_block * BLOCK_SIZE_BYTES
    }

    fn end_bytes(&self) -> u64 {
        (self.first_block + self.size_blocks) * BLOCK_SIZE_BYTES
    }
}

/// How to open a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenRole {
    /// Serve hosts at `config.epoch` (claims the columns).
    Primary,
    /// Accept replication at epochs `>= config.epoch`.
    Secondary,
}

/// What the partition currently is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serving hosts.
    Primary,
    /// Accepting replication.
    Secondary,
    /// Was primary; a newer epoch took over. Refuses everything.
    Fenced {
        /// The newer epoch.
        current: u64,
    },
}

/// What was wrong with a column a read reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnFaultKind {
    /// A block failed its CRC (the sled's stored one, or the row
    /// summary's): the data is bad and the column needs a rebuild.
    Corrupt,
    /// No usable answer (error, timeout, short read): the sled-failure
    /// path decides about the column.
    Unreadable,
}

/// Why a read of one column failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnFault {
    pub kind: ColumnFaultKind,
    /// For people.
    pub reason: String,
}

impl ColumnFault {
    pub(crate) fn corrupt(reason: String) -> Self {
        ColumnFault {
            kind: ColumnFaultKind::Corrupt,
            reason,
        }
    }

    pub(crate) fn unreadable(reason: String) -> Self {
        ColumnFault {
            kind: ColumnFaultKind::Unreadable,
            reason,
        }
    }
}

impl std::fmt::Display for ColumnFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// A column reported for repair (degraded read, bad checksum).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairItem {
    /// Extent.
    pub extent: u64,
    /// Column index within the extent.
    pub column: u16,
    /// Sled holding it.
    pub sled: String,
    /// Stripe found bad.
    pub stripe: u64,
    /// What was wrong (the repair worker turns `Corrupt` into a repair).
    pub kind: ColumnFaultKind,
    /// Why, for people.
    pub reason: String,
}

/// Counters the daemon exports.
#[derive(Debug, Default)]
pub struct PartitionMetrics {
    /// Host writes acknowledged.
    pub writes: AtomicU64,
    /// Host reads answered.
    pub reads: AtomicU64,
    /// Trims and write-zeroes acknowledged.
    pub unmaps: AtomicU64,
    /// Partial-block writes (read-modify-write).
    pub read_modify_writes: AtomicU64,
    /// Writes refused `Unavailable` (secondary or log not ready in time).
    pub unavailable: AtomicU64,
    /// Replication sends retried.
    pub replica_retries: AtomicU64,
    /// `Gap` answers handled (catch-up).
    pub replica_gaps: AtomicU64,
    /// Reads served by decoding.
    pub degraded_reads: AtomicU64,
    /// Sled read requests sent by host reads (one per stretch of
    /// consecutive blocks of a column; degraded reads not counted).
    pub sled_reads: AtomicU64,
    /// Column read requests split into one request per stripe after a
    /// direct read failed.
    pub sled_read_splits: AtomicU64,
    /// Blocks that failed a CRC on read.
    pub checksum_errors: AtomicU64,
    /// Flush batches committed.
    pub flushes: AtomicU64,
    /// Blocks written to sleds by flushes (GC included).
    pub flushed_blocks: AtomicU64,
    /// Stripes written.
    pub stripes_written: AtomicU64,
    /// GC passes.
    pub gc_passes: AtomicU64,
    /// Extents freed by GC.
    pub extents_freed: AtomicU64,
    /// Times this partition was fenced.
    pub fenced: AtomicU64,
    /// Repair items dropped because the queue was full.
    pub repair_dropped: AtomicU64,
    /// Host write copies answered from the write-id dedupe table (or after
    /// waiting for the first copy) instead of being applied again.
    pub duplicate_writes: AtomicU64,
    /// Index checkpoints written to the sleds.
    pub checkpoints_written: AtomicU64,
    /// Index checkpoint writes that failed.
    pub checkpoint_failures: AtomicU64,
    /// Last recovery from the sleds: stripe summaries read.
    pub recovery_rows_scanned: AtomicU64,
    /// Last recovery from the sleds: 1 if it used a checkpoint, 0 if it
    /// scanned every summary.
    pub recovery_checkpoint_used: AtomicU64,
    /// Last recovery from the sleds: checkpoints refused before.
    pub recovery_checkpoints_refused: AtomicU64,
    /// Last recovery from the sleds: wall time in milliseconds.
    pub recovery_duration_ms: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The head node's write log, shared by its partitions; releases space
/// behind the oldest position any of them still needs.
#[derive(Debug)]
pub struct SharedLog {
    wal: Wal,
    partitions: Mutex<Vec<Weak<Shared>>>,
    release_lock: tokio::sync::Mutex<()>,
    /// Woken whenever log space was released (writers waiting on a full log).
    space: Notify,
}

impl SharedLog {
    /// Wraps an opened log.
    pub fn new(wal: Wal) -> Arc<Self> {
        Arc::new(Self {
            wal,
            partitions: Mutex::new(Vec::new()),
            release_lock: tokio::sync::Mutex::new(()),
            space: Notify::new(),
        })
    }

    /// The log.
    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    fn register(&self, shared: &Arc<Shared>) {
        let mut partitions = lock(&self.partitions);
        partitions.retain(|p| p.strong_count() > 0);
        partitions.push(Arc::downgrade(shared));
    }

    /// Releases the log up to the oldest position still needed by a live
    /// partition (never past the durable position).
    pub async fn release(&self) -> Result<(), WalError> {
        let _serial = self.release_lock.lock().await;
        // Durable first: a hold registered after this read is at or above it.
        let mut up_to = LogPosition(self.wal.stats().durable);
        let partitions: Vec<Arc<Shared>> = lock(&self.partitions)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for partition in &partitions {
            if let Some(hold) = partition.log_hold() {
                up_to = up_to.min(hold);
            }
        }
        if up_to > self.wal.tail() {
            self.wal.release(up_to).await?;
            let tail = self.wal.tail();
            // Only this function releases the shared log, one call at a time.
            assert_eq!(tail, up_to, "the log tail moved past the release");
            for partition in &partitions {
                partition.forget_released(tail);
            }
            self.space.notify_waiters();
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data, consistent between statements.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Per-extent bookkeeping of the primary.
#[derive(Debug)]
struct ExtentState {
    grant: ExtentGrant,
    codec: Arc<ErasureCodec>,
    rows_written: u64,
    rows_capacity: u64,
    /// No more appends (recovered, or an append failed).
    sealed: bool,
    /// CRC of every data slot written, per data column, by `stripe * 16 + block`.
    crcs: Vec<Vec<u32>>,
}

impl ExtentState {
    fn expected_crc(&self, column: u16, stripe: u64, block: u64) -> Option<u32> {
        self.crcs
            .get(usize::from(column))?
            .get((stripe * layout::CHUNK_BLOCKS + block) as usize)
            .copied()
    }

    fn capacity_blocks(&self) -> u64 {
        self.rows_written * u64::from(self.grant.k) * layout::CHUNK_BLOCKS
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct ReplProgress {
    acked_through: u64,
    stopped: bool,
}

/// A trim or write-zeroes in the index (as a tombstone) whose tombstone is
/// not yet in a stripe summary on the sleds; its log record stays pinned
/// until then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PendingTrim {
    /// First partition block.
    lba: u64,
    /// Blocks trimmed.
    block_count: u64,
    /// The trim's log record.
    position: LogPosition,
}

impl PendingTrim {
    /// Trim `record`, logged at `position`.
    fn of(record: &LogRecord, position: LogPosition) -> Self {
        Self {
            lba: record.lba,
            block_count: u64::from(record.block_count),
            position,
        }
    }
}

#[derive(Debug)]
struct State {
    role: Role,
    /// Primary: its epoch. Secondary: the highest epoch seen.
    epoch: u64,
    index: PartitionIndex,
    /// Primary: next sequence to assign. Secondary: next expected.
    next_sequence: u64,
    /// Every sequence up to here is applied (or abandoned).
    applied_through: u64,
    applied_above: BTreeSet<u64>,
    /// Trims not yet written to a summary, by sequence.
    pending_trims: BTreeMap<u64, PendingTrim>,
    /// Primary: own log records by sequence (catch-up of the secondary).
    retained: BTreeMap<u64, LogPosition>,
    /// Log heads taken before appends in flight.
    inflight_holds: BTreeMap<LogPosition, usize>,
    /// Primary: records the secondary has not confirmed, in sequence order.
    repl_queue: VecDeque<ReplicaRecord>,
    /// Flush commits the secondary has not confirmed.
    pending_commits: VecDeque<proto::volume::ReplicaRequest>,
    extents: BTreeMap<u64, ExtentState>,
    open_extent: Option<u64>,
    oldest_unflushed: Option<Instant>,
    /// Primary: its checkpoint extents (also in `extents`).
    checkpoints: checkpoint::Tracker,
}

impl State {
    fn mark_applied(&mut self, sequence: u64) {
        if sequence <= self.applied_through {
            return;
        }
        self.applied_above.insert(sequence);
        while self.applied_above.remove(&(self.applied_through + 1)) {
            self.applied_through += 1;
        }
    }

    fn add_hold(&mut self, position: LogPosition) {
        *self.inflight_holds.entry(position).or_default() += 1;
    }

    /// Drops one hold taken with [`add_hold`](Self::add_hold) at
    /// `position`. Holds are counted per position: removing one that was
    /// never taken would drop another holder's and let the log be released
    /// under its records.
    fn remove_hold(&mut self, position: LogPosition) {
        let count = self.inflight_holds.get_mut(&position);
        assert!(
            count.as_ref().is_some_and(|c| **c > 0),
            "log hold at {} released more often than taken",
            position.0
        );
        if let Some(count) = count {
            *count -= 1;
            if *count == 0 {
                self.inflight_holds.remove(&position);
            }
        }
    }
}

/// A range lock over partition blocks: overlapping writes are serialised.
#[derive(Debug, Default)]
struct RangeLocks {
    held: Mutex<Vec<(u64, Range<u64>)>>,
    next_id: AtomicU64,
    released: Notify,
}

#[derive(Debug)]
struct RangeGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        lock(&self.shared.range_locks.held).retain(|(id, _)| *id != self.id);
        self.shared.range_locks.released.notify_waiters();
    }
}

#[derive(Debug)]
struct Shared {
    config: PartitionConfig,
    log: Arc<SharedLog>,
    sleds: Arc<dyn SledAccess>,
    extent_source: Arc<dyn ExtentSource>,
    replica: Option<Arc<dyn ReplicaPeer>>,
    state: Mutex<State>,
    range_locks: RangeLocks,
    /// Writes hold a read guard; a host Flush takes the write guard (barrier).
    barrier: Arc<tokio::sync::RwLock<()>>,
    write_permits: Arc<Semaphore>,
    /// One flush or GC at a time; also serialises replication requests on a
    /// secondary.
    flush_lock: tokio::sync::Mutex<()>,
    replica_lock: tokio::sync::Mutex<()>,
    /// Secondary: its next expected sequence moved (wakes out-of-order
    /// appends waiting for their predecessors).
    replica_advanced: Notify,
    progress: watch::Sender<ReplProgress>,
    repl_wakeup: Arc<Notify>,
    repair: Mutex<VecDeque<RepairItem>>,
    metrics: Arc<PartitionMetrics>,
    /// Host write ids seen by this primary (in memory only, see [`dedupe`]).
    dedupe: Arc<dedupe::WriteDedupe>,
    /// A log-full flush is running (single flight, see [`kick_flush`]).
    flushing: std::sync::atomic::AtomicBool,
    /// How the last recovery from the sleds went (primary).
    recovery: Mutex<RecoveryReport>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn id(&self) -> PartitionId {
        self.config.partition
    }

    fn unavailable(&self, reason: impl Into<String>) -> PartitionError {
        PartitionError::Unavailable {
            partition: self.id(),
            reason: reason.into(),
        }
    }

    fn wal_error(&self, source: WalError) -> PartitionError {
        PartitionError::Wal {
            partition: self.id(),
            source,
        }
    }

    /// Oldest log position this partition still needs.
    fn log_hold(&self) -> Option<LogPosition> {
        self.hold_of(&self.lock())
    }

    /// [`log_hold`](Self::log_hold) of `state` (this partition's, locked).
    fn hold_of(&self, state: &State) -> Option<LogPosition> {
        // A secondary keeps its whole unflushed tail (everything after the
        // last flush commit): it is what a promotion replays and what the
        // next secondary is caught up from, with no hole in the sequences.
        let acked = if matches!(state.role, Role::Secondary) {
            0
        } else {
            self.progress.borrow().acked_through
        };
        [
            state.index.oldest_log_position(),
            state.inflight_holds.keys().next().copied(),
            state.pending_trims.values().map(|t| t.position).min(),
            state.retained.range(acked + 1..).map(|(_, p)| *p).min(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Drops what the log released below `tail` from the catch-up list.
    ///
    /// Every hold of this partition was counted before the release, and a
    /// new one is taken at or above the durable position then: none may be
    /// below the new tail (invariant 4: the index never points at
    /// reclaimed log space; an append in flight keeps its records).
    fn forget_released(&self, tail: LogPosition) {
        let mut state = self.lock();
        let oldest_indexed = state.index.oldest_log_position();
        assert!(
            oldest_indexed.is_none_or(|p| p >= tail),
            "partition {:?}: the log was released to {} under a record the index maps ({oldest_indexed:?})",
            self.id(),
            tail.0
        );
        let oldest_held = state.inflight_holds.keys().next().copied();
        assert!(
            oldest_held.is_none_or(|p| p >= tail),
            "partition {:?}: the log was released to {} under a held position ({oldest_held:?})",
            self.id(),
            tail.0
        );
        // The full hold (pending trims and unconfirmed records too) walks
        // every trim and retained record.
        debug_assert!(
            self.hold_of(&state).is_none_or(|hold| hold >= tail),
            "partition {:?}: the log was released to {} under its hold {:?}",
            self.id(),
            tail.0,
            self.hold_of(&state)
        );
        state.retained.retain(|_, position| *position >= tail);
    }

    /// Primary check: role and (if given) the request's epoch.
    fn check_primary(&self, epoch: Option<u64>) -> Result<(), PartitionError> {
        let state = self.lock();
        match state.role {
            Role::Primary => {}
            Role::Fenced { .. } | Role::Secondary => {
                return Err(PartitionError::NotPrimary {
                    partition: self.id(),
                })
            }
        }
        match epoch {
            Some(requested) if requested != state.epoch => Err(PartitionError::StaleEpoch {
                partition: self.id(),
                requested,
                current: state.epoch,
            }),
            _ => Ok(()),
        }
    }

    /// Stops acknowledging: a newer epoch owns the partition.
    fn fence(&self, current: u64) {
        let mut state = self.lock();
        if matches!(state.role, Role::Primary) {
            tracing::warn!(partition = ?self.id(), epoch = state.epoch, current, "fenced: dropping the primary role");
            state.role = Role::Fenced { current };
            bump(&self.metrics.fenced);
        }
        drop(state);
        self.progress.send_modify(|p| p.stopped = true);
        self.repl_wakeup.notify_one();
    }

    fn report_repair(&self, item: RepairItem) {
        tracing::warn!(partition = ?self.id(), ?item, "column reported for repair");
        let mut queue = lock(&self.repair);
        if queue.len() >= REPAIR_QUEUE_CAPACITY {
            queue.pop_front();
            bump(&self.metrics.repair_dropped);
        }
        queue.push_back(item);
    }

    async fn lock_range(self: &Arc<Self>, blocks: Range<u64>) -> RangeGuard {
        let id = self.range_locks.next_id.fetch_add(1, Ordering::Relaxed);
        loop {
            let released = self.range_locks.released.notified();
            {
                let mut held = lock(&self.range_locks.held);
                let busy = held
                    .iter()
                    .any(|(_, r)| r.start < blocks.end && blocks.start < r.end);
                if !busy {
                    held.push((id, blocks.clone()));
                    return RangeGuard {
                        shared: self.clone(),
                        id,
                    };
                }
            }
            released.await;
        }
    }
}

/// What a write operation logs: whole blocks or unmapped ranges.
#[derive(Debug, Clone)]
enum Change {
    Write { lba: u64, data: Bytes },
    Unmap { lba: u64, count: u64 },
}

/// One partition served by this head node. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Partition {
    shared: Arc<Shared>,
}

/// The partition's dependencies.
#[derive(Debug, Clone)]
pub struct PartitionDeps {
    /// The head node's log.
    pub log: Arc<SharedLog>,
    /// Sled controllers.
    pub sleds: Arc<dyn SledAccess>,
    /// The control plane's extents.
    pub extents: Arc<dyn ExtentSource>,
    /// The secondary (primary role only).
    pub replica: Option<Arc<dyn ReplicaPeer>>,
}

impl Partition {
    /// Opens the partition: rebuilds its state from the sleds (primary) and
    /// from `recovered` (what [`Wal::open`] returned; records of other
    /// partitions are skipped), then starts the replicator (primary).
    pub async fn open(
        config: PartitionConfig,
        role: OpenRole,
        deps: PartitionDeps,
        recovered: &[RecoveredRecord],
    ) -> Result<Partition, PartitionError> {
        Self::open_with(config, role, deps, recovered, 1).await
    }

    /// Takes the partition over as primary at `config.epoch` from this
    /// running instance, without a restart: in place **promotion** of a
    /// secondary, or a primary moving to a new epoch (new secondary).
    ///
    /// ```text
    /// secondary: hold the replica lock (no replication of the old epoch
    ///            is accepted from here on)
    /// primary:   Fenced{new epoch} + replicator stopped (in-flight writes
    ///            fail NotPrimary), wait (bounded) for writes and a flush
    ///            in flight to finish
    /// collect:   every log record the index or the pending trims refer to
    ///            (what the old instance holds in the log), read from the WAL
    /// open:      Partition::open(Primary) over those records: claims every
    ///            owned column at the new epoch (fences the old primary on
    ///            the sleds), index = newest sled checkpoint + the summaries
    ///            after it (or every summary) + the records, sequences
    ///            continue after the highest this instance assigned or saw
    /// done:      this instance becomes Fenced{new epoch}; the old one stays
    ///            registered with the log until then, so nothing it refers
    ///            to is released before the new one holds it
    /// ```
    ///
    /// On error a secondary stays a working secondary (the caller retries);
    /// a primary stays fenced and can be taken over again.
    pub async fn take_over(
        &self,
        config: PartitionConfig,
        deps: PartitionDeps,
    ) -> Result<Partition, PartitionError> {
        let old = &self.shared;
        let new_epoch = config.epoch;
        let _replica_serial = old.replica_lock.lock().await;
        let was_secondary = {
            let mut state = old.lock();
            if new_epoch <= state.epoch && !matches!(state.role, Role::Fenced { .. }) {
                return Err(PartitionError::StaleEpoch {
                    partition: old.id(),
                    requested: new_epoch,
                    current: state.epoch,
                });
            }
            match state.role {
                Role::Secondary => true,
                Role::Primary => {
                    state.role = Role::Fenced { current: new_epoch };
                    false
                }
                Role::Fenced { .. } => false,
            }
        };
        if !was_secondary {
            old.progress.send_modify(|p| p.stopped = true);
            old.repl_wakeup.notify_one();
            // In-flight writes end quickly once the replicator stopped.
            let wait = old.config.replica_timeout;
            let _ = tokio::time::timeout(wait, old.barrier.write()).await;
            let _ = tokio::time::timeout(wait, old.flush_lock.lock()).await;
        }
        // Only what the index and the pending trims refer to: the old
        // instance holds exactly those in the log until the new one has
        // registered its own holds. A record of the unflushed tail that the
        // index no longer refers to is superseded or on the sleds; the old
        // instance does not hold it, so the log may release it at any moment
        // (another partition's flush): replayed, it would map blocks whose
        // sled copy has the same sequence to a log record that is gone.
        let (needed, next_sequence) = {
            let mut state = old.lock();
            let mut needed: BTreeSet<LogPosition> = state
                .index
                .runs()
                .filter_map(|(_, run)| match run.location {
                    Some(Location::Log { position, .. }) => Some(position),
                    _ => None,
                })
                .collect();
            needed.extend(state.pending_trims.values().map(|t| t.position));
            // Pinned until the new instance holds them itself, whatever the
            // old index does meanwhile (a flush that outlived the wait
            // above may still move blocks to the sleds).
            if let Some(first) = needed.first() {
                // Held by the index and the trims until now (invariant 4),
                // so still in the log: a pin below the tail protects nothing.
                let tail = old.log.wal().tail();
                assert!(
                    *first >= tail,
                    "partition {:?}: take-over pins {} below the log tail {}",
                    old.id(),
                    first.0,
                    tail.0
                );
                state.add_hold(*first);
            }
            (needed, state.next_sequence)
        };
        let pin = needed.first().copied();
        let taken = Self::open_from(old, config, deps, needed, next_sequence).await;
        if let Some(pin) = pin {
            old.lock().remove_hold(pin);
        }
        let (taken, records) = taken?;
        // The rest of the tail is only offered to the new secondary's
        // catch-up (superseded or flushed: never replayed, never held; a
        // record released meanwhile is skipped there). Without it the
        // catch-up would jump over every hole between the records the index
        // refers to, one round trip per hole.
        let tail: Vec<(u64, LogPosition)> =
            old.lock().retained.iter().map(|(s, p)| (*s, *p)).collect();
        {
            let mut state = taken.shared.lock();
            for (sequence, position) in tail {
                state.retained.entry(sequence).or_insert(position);
            }
        }
        {
            let mut state = old.lock();
            state.role = Role::Fenced { current: new_epoch };
        }
        old.progress.send_modify(|p| p.stopped = true);
        old.repl_wakeup.notify_one();
        tracing::info!(
            partition = ?old.id(),
            epoch = new_epoch,
            promoted = was_secondary,
            records,
            "taken over in place"
        );
        Ok(taken)
    }

    /// The take-over's second half: reads the `needed` records from the
    /// log and opens the new primary over them.
    async fn open_from(
        old: &Arc<Shared>,
        config: PartitionConfig,
        deps: PartitionDeps,
        needed: BTreeSet<LogPosition>,
        next_sequence: u64,
    ) -> Result<(Partition, usize), PartitionError> {
        let wal = old.log.wal();
        let head_before = wal.head();
        // Many small records (random writes): keep LOG_READS_IN_FLIGHT of
        // them at the device at once, in order.
        let mut reads = futures::stream::iter(needed)
            .map(|position| async move { (position, wal.read(position).await) })
            .buffered(LOG_READS_IN_FLIGHT);
        let mut records = Vec::new();
        while let Some((position, read)) = reads.next().await {
            match read {
                Ok(record)
                    if record.partition == old.id()
                        && matches!(record.kind, RecordKind::Write | RecordKind::Trim) =>
                {
                    records.push(RecoveredRecord { position, record });
                }
                Ok(other) => {
                    return Err(PartitionError::Recovery {
                        partition: old.id(),
                        reason: format!(
                            "log record at {} is {:?} of {:?}, not this partition's data",
                            position.0, other.kind, other.partition
                        ),
                    })
                }
                Err(source) => return Err(old.wal_error(source)),
            }
        }
        let taken =
            Self::open_with(config, OpenRole::Primary, deps, &records, next_sequence).await?;
        // The new instance maps blocks only to the records handed over
        // (pinned by the old instance until it holds them itself) or to its
        // own new writes: a record of the tail nobody holds may be released
        // at any moment (the stale read fixed in ARCHITECTURE.md).
        debug_assert!(
            taken
                .shared
                .lock()
                .index
                .runs()
                .all(|(_, run)| match run.location {
                    Some(Location::Log { position, .. }) => {
                        position >= head_before
                            || records
                                .binary_search_by_key(&position, |r| r.position)
                                .is_ok()
                    }
                    _ => true,
                }),
            "partition {:?}: the take-over maps a block to a log record it was not handed",
            old.id()
        );
        Ok((taken, records.len()))
    }

    async fn open_with(
        config: PartitionConfig,
        role: OpenRole,
        deps: PartitionDeps,
        recovered: &[RecoveredRecord],
        min_next_sequence: u64,
    ) -> Result<Partition, PartitionError> {
        if config.size_blocks == 0 || !(0.0..=1.0).contains(&config.flush_fill_ratio) {
            return Err(PartitionError::BadRequest {
                partition: config.partition,
                reason: "partition of 0 blocks or fill ratio outside 0..1".to_string(),
            });
        }
        let state = State {
            role: match role {
                OpenRole::Primary => Role::Primary,
                OpenRole::Secondary => Role::Secondary,
            },
            epoch: config.epoch,
            index: PartitionIndex::new(config.partition, config.size_blocks),
            next_sequence: 1,
            applied_through: 0,
            applied_above: BTreeSet::new(),
            pending_trims: BTreeMap::new(),
            retained: BTreeMap::new(),
            inflight_holds: BTreeMap::new(),
            repl_queue: VecDeque::new(),
            pending_commits: VecDeque::new(),
            extents: BTreeMap::new(),
            open_extent: None,
            oldest_unflushed: None,
            checkpoints: checkpoint::Tracker::new(),
        };
        let (progress, _) = watch::channel(ReplProgress::default());
        let shared = Arc::new(Shared {
            write_permits: Arc::new(Semaphore::new(config.max_inflight_writes.max(1))),
            config,
            log: deps.log.clone(),
            sleds: deps.sleds,
            extent_source: deps.extents,
            replica: deps.replica,
            state: Mutex::new(state),
            range_locks: RangeLocks::default(),
            barrier: Arc::new(tokio::sync::RwLock::new(())),
            flush_lock: tokio::sync::Mutex::new(()),
            replica_lock: tokio::sync::Mutex::new(()),
            replica_advanced: Notify::new(),
            progress,
            repl_wakeup: Arc::new(Notify::new()),
            repair: Mutex::new(VecDeque::new()),
            metrics: Arc::new(PartitionMetrics::default()),
            dedupe: dedupe::WriteDedupe::new(),
            flushing: std::sync::atomic::AtomicBool::new(false),
            recovery: Mutex::new(RecoveryReport::default()),
        });
        let mut recovered = live_records(shared.id(), recovered);
        if role == OpenRole::Secondary {
            // Joining at `epoch`: what this log holds of older epochs is
            // either in the primary's history (which the primary holds) or
            // a dead primary's records past the point where the next
            // primary took over, reusing their sequences. The marker voids
            // them for every later replay too (see `live_records`).
            let epoch = shared.config.epoch;
            recovered.retain(|r| r.record.epoch >= epoch);
            let marker = LogRecord {
                kind: RecordKind::Checkpoint,
                partition: shared.id(),
                epoch,
                sequence: 0,
                lba: 0,
                block_count: 0,
                payload: Bytes::from_static(JOIN_MARKER),
            };
            shared
                .log
                .wal()
                .append_one(marker)
                .await
                .map_err(|source| shared.wal_error(source))?;
        }
        if role == OpenRole::Primary {
            checkpoint::recover(&shared, &recovered).await?;
        }
        replay_log(&shared, role, &recovered)?;
        {
            let mut state = shared.lock();
            if state.next_sequence < min_next_sequence {
                state.next_sequence = min_next_sequence;
                state.applied_through = min_next_sequence - 1;
            }
            let acked = state.next_sequence - 1;
            shared.progress.send_replace(ReplProgress {
                acked_through: acked,
                stopped: false,
            });
            // What recovery and replay built, before anything relies on it
            // (a recount of every run: debug builds only).
            debug_assert_eq!(
                state.index.check_invariants(),
                Ok(()),
                "partition {:?}: index after open",
                shared.id()
            );
        }
        deps.log.register(&shared);
        if role == OpenRole::Primary {
            if shared.replica.is_none() {
                return Err(PartitionError::BadRequest {
                    partition: shared.id(),
                    reason: "a primary needs a replica peer".to_string(),
                });
            }
            tokio::spawn(replica::run_replicator(Arc::downgrade(&shared)));
        }
        Ok(Partition { shared })
    }

    /// The partition id.
    pub fn id(&self) -> PartitionId {
        self.shared.id()
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.shared.lock().role
    }

    /// Primary: its epoch; secondary: the highest epoch seen.
    pub fn epoch(&self) -> u64 {
        self.shared.lock().epoch
    }

    /// The head node's log this partition writes to.
    pub fn log(&self) -> &Arc<SharedLog> {
        &self.shared.log
    }

    /// Counters.
    pub fn metrics(&self) -> Arc<PartitionMetrics> {
        self.shared.metrics.clone()
    }

    /// Columns reported for repair (oldest first).
    pub fn repair_queue(&self) -> Vec<RepairItem> {
        lock(&self.shared.repair).iter().cloned().collect()
    }

    /// Removes and returns the repair items (for the daemon's repair loop).
    pub fn take_repair_items(&self) -> Vec<RepairItem> {
        lock(&self.shared.repair).drain(..).collect()
    }

    /// Extents the partition holds, with the bytes appended to each column
    /// (all present columns), for space accounting.
    pub fn extent_usage(&self) -> Vec<(u64, u64)> {
        self.shared
            .lock()
            .extents
            .values()
            .map(|e| {
                (
                    e.grant.extent,
                    e.rows_written * layout::ROW_BYTES * e.grant.present().count() as u64,
                )
            })
            .collect()
    }

    /// Live (mapped) blocks per extent.
    pub fn live_blocks_per_extent(&self) -> BTreeMap<u64, u64> {
        self.shared.lock().index.live_blocks_per_extent().clone()
    }

    /// Blocks whose latest version is only in the log.
    pub fn log_resident_blocks(&self) -> u64 {
        self.shared.lock().index.log_resident_blocks()
    }

    /// Where partition block `block` is: its index location and, for a sled
    /// location, the sled and column holding it (debug endpoints, tests).
    pub fn location_of(
        &self,
        block: u64,
    ) -> Option<(Location, Option<(String, proto::sled::ColumnId)>)> {
        let state = self.shared.lock();
        let location = state
            .index
            .lookup(block, 1)
            .ok()?
            .into_iter()
            .next()?
            .location?;
        let column = match location {
            Location::Sled { extent, column, .. } => state
                .extents
                .get(&extent)
                .filter(|e| !e.grant.is_owed(usize::from(column)))
                .and_then(|e| e.grant.columns.get(usize::from(column)).cloned()),
            Location::Log { .. } => None,
        };
        Some((location, column))
    }

    /// What the index says of *volume* block `volume_block`, if this
    /// partition holds it: role, epoch, the sequence of the write (or trim)
    /// that last touched it and where its data is (admin debug endpoint).
    pub fn describe_block(&self, volume_block: u64) -> Option<serde_json::Value> {
        let config = &self.shared.config;
        let block = volume_block.checked_sub(config.first_block)?;
        if block >= config.size_blocks {
            return None;
        }
        let state = self.shared.lock();
        let mapped = state.index.lookup_with_sequence(block, 1).ok()?;
        let first = mapped.first()?;
        Some(serde_json::json!({
            "volume": config.partition.volume,
            "partition": config.partition.index,
            "role": format!("{:?}", state.role),
            "epoch": state.epoch,
            "block_in_partition": block,
            "sequence": first.sequence,
            "location": first.location.map(|l| format!("{l:?}")),
        }))
    }

    /// Checks the index's structural invariants (tests, debug endpoints).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.shared.lock().index.check_invariants()
    }

    /// Answers one host request (the daemon's host-protocol handler).
    ///
    /// A write, trim or write-zeroes with a `write_id` goes through the
    /// per-partition dedupe table ([`dedupe`]): a copy of an id already
    /// completed is answered `Done` without being applied again, a copy of
    /// an id in flight waits for (and returns) the first copy's outcome.
    pub async fn handle_host(&self, request: HostRequest) -> HostReply {
        let Some(write_id) = request.op.write_id() else {
            return self.apply_host(request).await;
        };
        // The table is this primary's: refuse other epochs first.
        if let Err(error) = self.shared.check_primary(Some(request.epoch)) {
            return HostReply::Error(error.to_host_error());
        }
        let (offset_bytes, len) = request.op.range().unwrap_or((0, 0));
        let key = dedupe::OpKey {
            kind: request.op.name(),
            offset_bytes,
            len,
        };
        let wait_bound = self.shared.config.replica_timeout * 2;
        loop {
            match self.shared.dedupe.begin(write_id, key) {
                dedupe::Begin::Apply(ticket) => {
                    let reply = self.apply_host(request).await;
                    ticket.finish(&reply);
                    return reply;
                }
                dedupe::Begin::Answer(reply) => {
                    bump(&self.shared.metrics.duplicate_writes);
                    return reply;
                }
                dedupe::Begin::Wait(mut outcome) => {
                    match tokio::time::timeout(wait_bound, outcome.wait_for(Option::is_some)).await
                    {
                        Ok(Ok(reply)) => {
                            if let Some(reply) = reply.clone() {
                                bump(&self.shared.metrics.duplicate_writes);
                                return reply;
                            }
                        }
                        // The first copy was cancelled: begin again.
                        Ok(Err(_closed)) => {}
                        Err(_elapsed) => {
                            return HostReply::Error(
                                self.shared
                                    .unavailable(format!(
                                        "write id {write_id:#x} is still in flight"
                                    ))
                                    .to_host_error(),
                            );
                        }
                    }
                }
            }
        }
    }

    /// Completed write ids the dedupe table remembers (tests, metrics).
    pub fn dedupe_completed(&self) -> usize {
        self.shared.dedupe.completed()
    }

    async fn apply_host(&self, request: HostRequest) -> HostReply {
        let epoch = request.epoch;
        let result = match request.op {
            HostOp::Read {
                offset_bytes,
                len_bytes: len,
            } => match self.read(epoch, offset_bytes, len).await {
                Ok(data) => {
                    let crcs = proto::volume::chunk_crcs(&data);
                    return HostReply::Data { data, crcs };
                }
                Err(error) => Err(error),
            },
            HostOp::Write {
                offset_bytes,
                data,
                crcs,
                ..
            } => self.write(epoch, offset_bytes, data, &crcs).await,
            HostOp::Trim {
                offset_bytes,
                len_bytes: len,
                ..
            }
            | HostOp::WriteZeroes {
                offset_bytes,
                len_bytes: len,
                ..
            } => self.unmap(epoch, offset_bytes, len).await,
            HostOp::Flush => self.flush(epoch).await,
        };
        match result {
            Ok(()) => HostReply::Done,
            Err(error) => HostReply::Error(error.to_host_error()),
        }
    }

    fn check_range(&self, offset_bytes: u64, len: u32) -> Result<Range<u64>, PartitionError> {
        let config = &self.shared.config;
        let out_of_range = || PartitionError::OutOfRange {
            partition: config.partition,
            offset_bytes,
            len_bytes: len,
            partition_start_bytes: config.start_bytes(),
            partition_end_bytes: config.end_bytes(),
        };
        let end = offset_bytes
            .checked_add(u64::from(len))
            .ok_or_else(out_of_range)?;
        if len == 0 || offset_bytes % SECTOR_BYTES != 0 || u64::from(len) % SECTOR_BYTES != 0 {
            return Err(PartitionError::BadRequest {
                partition: config.partition,
                reason: format!(
                    "range {offset_bytes}+{len} is not a non-empty multiple of 512 bytes"
                ),
            });
        }
        if offset_bytes < config.start_bytes() || end > config.end_bytes() {
            return Err(out_of_range());
        }
        Ok(offset_bytes - config.start_bytes()..end - config.start_bytes())
    }

    /// Host write of `data` at volume byte `offset_bytes` (512-aligned),
    /// `crcs` as [`proto::volume::chunk_crcs`]. Acknowledged only when
    /// durable on both logs.
    pub async fn write(
        &self,
        epoch: u64,
        offset_bytes: u64,
        data: Bytes,
        crcs: &[u32],
    ) -> Result<(), PartitionError> {
        self.shared.check_primary(Some(epoch))?;
        let len = u32::try_from(data.len()).map_err(|_| PartitionError::BadRequest {
            partition: self.id(),
            reason: format!("write of {} bytes", data.len()),
        })?;
        let bytes = self.check_range(offset_bytes, len)?;
        proto::volume::verify_chunk_crcs(&data, crcs).map_err(|e| match e {
            proto::volume::CrcError::Mismatch {
                offset_bytes: at, ..
            } => PartitionError::ChecksumMismatch {
                partition: self.id(),
                offset_bytes: offset_bytes + at,
            },
            other => PartitionError::BadRequest {
                partition: self.id(),
                reason: other.to_string(),
            },
        })?;
        self.submit(bytes, Some(data)).await?;
        bump(&self.shared.metrics.writes);
        Ok(())
    }

    /// Trim or write-zeroes: whole blocks are unmapped (read as zeros);
    /// partial blocks at the edges are read-modify-written with zeros.
    pub async fn unmap(
        &self,
        epoch: u64,
        offset_bytes: u64,
        len: u32,
    ) -> Result<(), PartitionError> {
        self.shared.check_primary(Some(epoch))?;
        let bytes = self.check_range(offset_bytes, len)?;
        self.submit(bytes, None).await?;
        bump(&self.shared.metrics.unmaps);
        Ok(())
    }

    /// Host flush: every write acknowledged before is durable on both logs
    /// already; this waits for writes in flight (a barrier).
    pub async fn flush(&self, epoch: u64) -> Result<(), PartitionError> {
        self.shared.check_primary(Some(epoch))?;
        let barrier = self.shared.barrier.write();
        match tokio::time::timeout(self.shared.config.replica_timeout, barrier).await {
            Ok(_guard) => self.shared.check_primary(Some(epoch)),
            Err(_) => Err(self.shared.unavailable("writes in flight did not complete")),
        }
    }

    /// Runs one write-like operation over partition bytes `bytes`: `data`
    /// for a write, `None` for an unmap.
    async fn submit(&self, bytes: Range<u64>, data: Option<Bytes>) -> Result<(), PartitionError> {
        let shared = &self.shared;
        let timeout = shared.config.replica_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let permit =
            tokio::time::timeout_at(deadline, shared.write_permits.clone().acquire_owned())
                .await
                .map_err(|_| shared.unavailable("too many writes in flight"))?
                .map_err(|_| shared.unavailable("partition closing"))?;
        let barrier = shared.barrier.clone().read_owned().await;
        let first_block = bytes.start / BLOCK_SIZE_BYTES;
        let end_block = bytes.end.div_ceil(BLOCK_SIZE_BYTES);
        let guard = tokio::time::timeout_at(deadline, shared.lock_range(first_block..end_block))
            .await
            .map_err(|_| shared.unavailable("overlapping writes did not complete"))?;
        let changes = self.plan(bytes, data).await?;
        shared.check_primary(None)?;
        let task_shared = shared.clone();
        let task = tokio::spawn(async move {
            let result = commit(&task_shared, changes).await;
            drop(guard);
            drop(barrier);
            drop::<OwnedSemaphorePermit>(permit);
            result
        });
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(shared.unavailable(format!("write task failed: {join}"))),
            Err(_) => {
                bump(&shared.metrics.unavailable);
                Err(shared
                    .unavailable(format!("not durable on both head nodes within {timeout:?}")))
            }
        }
    }

    /// Turns a byte range into block changes, read-modify-writing partial
    /// blocks (the caller holds the range lock).
    async fn plan(
        &self,
        bytes: Range<u64>,
        data: Option<Bytes>,
    ) -> Result<Vec<Change>, PartitionError> {
        let first_block = bytes.start / BLOCK_SIZE_BYTES;
        let end_block = bytes.end.div_ceil(BLOCK_SIZE_BYTES);
        let head_partial = bytes.start % BLOCK_SIZE_BYTES != 0;
        let tail_partial = bytes.end % BLOCK_SIZE_BYTES != 0;
        let mut changes = Vec::new();
        match data {
            Some(data) if !head_partial && !tail_partial => {
                push_writes(&mut changes, first_block, data);
            }
            Some(data) => {
                bump(&self.shared.metrics.read_modify_writes);
                let blocks = end_block - first_block;
                let mut buf = BytesMut::zeroed((blocks * BLOCK_SIZE_BYTES) as usize);
                if head_partial {
                    let old = read::read_blocks(&self.shared, first_block, 1).await?;
                    buf[..BLOCK_SIZE_BYTES as usize].copy_from_slice(&old);
                }
                if tail_partial && (end_block - 1 != first_block || !head_partial) {
                    let old = read::read_blocks(&self.shared, end_block - 1, 1).await?;
                    let at = ((blocks - 1) * BLOCK_SIZE_BYTES) as usize;
                    buf[at..].copy_from_slice(&old);
                }
                let at = (bytes.start - first_block * BLOCK_SIZE_BYTES) as usize;
                buf[at..at + data.len()].copy_from_slice(&data);
                push_writes(&mut changes, first_block, buf.freeze());
            }
            None => {
                let whole_start = bytes.start.div_ceil(BLOCK_SIZE_BYTES);
                let whole_end = bytes.end / BLOCK_SIZE_BYTES;
                let edge = |block: u64, from: u64, to: u64| async move {
                    let old = read::read_blocks(&self.shared, block, 1).await?;
                    let mut buf = BytesMut::from(&old[..]);
                    let base = block * BLOCK_SIZE_BYTES;
                    buf[(from - base) as usize..(to - base) as usize].fill(0);
                    Ok::<_, PartitionError>(Change::Write {
                        lba: block,
                        data: buf.freeze(),
                    })
                };
                if whole_start > whole_end {
                    // Inside one block.
                    changes.push(edge(first_block, bytes.start, bytes.end).await?);
                } else {
                    if head_partial {
                        changes.push(
                            edge(first_block, bytes.start, whole_start * BLOCK_SIZE_BYTES).await?,
                        );
                    }
                    let mut lba = whole_start;
                    while lba < whole_end {
                        let count = (whole_end - lba).min(MAX_RECORD_BLOCKS * 64);
                        changes.push(Change::Unmap { lba, count });
                        lba += count;
                    }
                    if tail_partial {
                        changes.push(
                            edge(end_block - 1, whole_end * BLOCK_SIZE_BYTES, bytes.end).await?,
                        );
                    }
                }
                if head_partial || tail_partial {
                    bump(&self.shared.metrics.read_modify_writes);
                }
            }
        }
        Ok(changes)
    }

    /// Reads `len` bytes at volume byte `offset_bytes` (512-aligned). Every
    /// returned byte passed a CRC.
    pub async fn read(
        &self,
        epoch: u64,
        offset_bytes: u64,
        len: u32,
    ) -> Result<Bytes, PartitionError> {
        self.shared.check_primary(Some(epoch))?;
        let bytes = self.check_range(offset_bytes, len)?;
        let first_block = bytes.start / BLOCK_SIZE_BYTES;
        let end_block = bytes.end.div_ceil(BLOCK_SIZE_BYTES);
        let data = read::read_blocks(&self.shared, first_block, end_block - first_block).await?;
        let at = (bytes.start - first_block * BLOCK_SIZE_BYTES) as usize;
        bump(&self.shared.metrics.reads);
        Ok(data.slice(at..at + len as usize))
    }

    /// Secondary: handles one replication request.
    pub async fn handle_replica(
        &self,
        request: proto::volume::ReplicaRequest,
    ) -> proto::volume::ReplicaReply {
        replica::handle(&self.shared, request).await
    }

    /// Primary: flushes every log-resident block and pending trim to the
    /// sleds now, then releases the log.
    pub async fn flush_now(&self) -> Result<FlushReport, PartitionError> {
        let report = flush::flush_now(&self.shared).await?;
        checkpoint::after_flush(&self.shared).await;
        Ok(report)
    }

    /// Primary: one garbage-collection pass.
    pub async fn gc_pass(&self) -> Result<GcReport, PartitionError> {
        let report = flush::gc_pass(&self.shared).await?;
        checkpoint::after_flush(&self.shared).await;
        Ok(report)
    }

    /// Primary: writes an index checkpoint to the sleds now (clean
    /// shutdown, tests); see [`checkpoint`].
    pub async fn write_checkpoint(&self) -> Result<CheckpointReport, PartitionError> {
        checkpoint::write(&self.shared).await
    }

    /// The extents holding this primary's index checkpoints (debug
    /// endpoints, tests).
    pub fn checkpoint_extents(&self) -> Vec<u64> {
        self.shared.lock().checkpoints.extents()
    }

    /// How the last recovery from the sleds went (primary open and
    /// take-over).
    pub fn recovery_report(&self) -> RecoveryReport {
        *lock(&self.shared.recovery)
    }

    /// Primary: whether a flush is due (log fill ratio or age).
    pub fn flush_due(&self) -> bool {
        let fill = self.shared.log.wal().stats().fill_ratio();
        let oldest = self.shared.lock().oldest_unflushed;
        fill > self.shared.config.flush_fill_ratio
            || oldest.is_some_and(|t| t.elapsed() >= self.shared.config.flush_age)
    }

    /// Starts the background flusher (checks every `interval`); it ends when
    /// the partition is dropped or stops being primary.
    pub fn spawn_flusher(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(shared) = weak.upgrade() else { return };
                let partition = Partition { shared };
                if !matches!(partition.role(), Role::Primary) {
                    return;
                }
                if partition.flush_due() {
                    if let Err(error) = partition.flush_now().await {
                        tracing::warn!(partition = ?partition.id(), %error, "background flush failed");
                    }
                }
            }
        })
    }

    /// Stops the partition's background work (the replicator ends).
    pub fn shutdown(&self) {
        self.shared.progress.send_modify(|p| p.stopped = true);
        self.shared.repl_wakeup.notify_one();
    }
}

fn push_writes(changes: &mut Vec<Change>, first_block: u64, data: Bytes) {
    let mut lba = first_block;
    let mut rest = data;
    while !rest.is_empty() {
        let take = rest
            .len()
            .min((MAX_RECORD_BLOCKS * BLOCK_SIZE_BYTES) as usize);
        let piece = rest.split_to(take);
        let blocks = piece.len() as u64 / BLOCK_SIZE_BYTES;
        changes.push(Change::Write { lba, data: piece });
        lba += blocks;
    }
}

/// Logs `changes` locally and on the secondary (in parallel), then applies
/// them to the index. Runs in its own task so that a host timeout never
/// leaves the two logs and the index disagreeing.
async fn commit(shared: &Arc<Shared>, changes: Vec<Change>) -> Result<(), PartitionError> {
    let wal = shared.log.wal().clone();
    let (records, hold, last_sequence) = {
        let mut state = shared.lock();
        if !matches!(state.role, Role::Primary) {
            return Err(PartitionError::NotPrimary {
                partition: shared.id(),
            });
        }
        let hold = wal.head();
        state.add_hold(hold);
        let mut records = Vec::with_capacity(changes.len());
        for change in changes {
            let sequence = state.next_sequence;
            state.next_sequence += 1;
            let (log, replica) = match change {
                Change::Write { lba, data } => {
                    let blocks = data.len() as u64 / BLOCK_SIZE_BYTES;
                    let replica = ReplicaRecord {
                        sequence,
                        kind: ReplicaRecordKind::Write,
                        lba: shared.config.first_block + lba,
                        blocks: blocks as u32,
                        crcs: crate::wal::format::block_crcs(&data),
                        data: data.clone(),
                    };
                    let log = LogRecord::write(shared.id(), state.epoch, sequence, lba, data);
                    (log, replica)
                }
                Change::Unmap { lba, count } => {
                    let replica = ReplicaRecord {
                        sequence,
                        kind: ReplicaRecordKind::Unmap,
                        lba: shared.config.first_block + lba,
                        blocks: count as u32,
                        crcs: Vec::new(),
                        data: Bytes::new(),
                    };
                    let log =
                        LogRecord::trim(shared.id(), state.epoch, sequence, lba, count as u32);
                    (log, replica)
                }
            };
            state.repl_queue.push_back(replica);
            records.push(log);
        }
        state.oldest_unflushed.get_or_insert_with(Instant::now);
        let last = state.next_sequence - 1;
        (records, hold, last)
    };
    shared.repl_wakeup.notify_one();
    let sequences: Vec<u64> = records.iter().map(|r| r.sequence).collect();
    let local = append_local(shared, records.clone());
    let remote = wait_replicated(shared, last_sequence);
    let (local, remote) = tokio::join!(local, remote);
    let result = match (local, remote) {
        (Ok(positions), Ok(())) => {
            let mut state = shared.lock();
            let mut outcome = Ok(());
            for (record, position) in records.iter().zip(&positions) {
                let applied = match record.kind {
                    RecordKind::Write => index_logged_write(&mut state.index, record, *position),
                    _ => {
                        let trim = PendingTrim::of(record, *position);
                        state.pending_trims.insert(record.sequence, trim);
                        state.index.apply_unmap(
                            record.lba,
                            u64::from(record.block_count),
                            record.sequence,
                        )
                    }
                };
                if let Err(source) = applied {
                    outcome = Err(PartitionError::Index {
                        partition: shared.id(),
                        source,
                    });
                }
                state.retained.insert(record.sequence, *position);
            }
            if outcome.is_ok() && !matches!(state.role, Role::Primary) {
                outcome = Err(PartitionError::NotPrimary {
                    partition: shared.id(),
                });
            }
            outcome
        }
        (Err(error), _) | (_, Err(error)) => Err(error),
    };
    let mut state = shared.lock();
    state.remove_hold(hold);
    for sequence in sequences {
        state.mark_applied(sequence);
    }
    result
}

/// Starts one flush in the background unless one is already running
/// (single flight: writers that find the log full do not each flush
/// inline, they wait for space).
fn kick_flush(shared: &Arc<Shared>) {
    if shared
        .flushing
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        match flush::flush_now(&shared).await {
            Ok(_) => checkpoint::after_flush(&shared).await,
            Err(error) => {
                tracing::debug!(partition = ?shared.id(), %error, "flush to make log room failed")
            }
        }
        if let Err(error) = shared.log.release().await {
            tracing::debug!(%error, "log release failed");
        }
        shared.flushing.store(false, Ordering::Release);
        shared.log.space.notify_waiters();
    });
}

/// Appends to the local log. When it is full, starts a flush (one at a
/// time, [`kick_flush`]) and waits for released space, at most
/// `replica_timeout`, then answers the retryable `Unavailable`.
async fn append_local(
    shared: &Arc<Shared>,
    records: Vec<LogRecord>,
) -> Result<Vec<LogPosition>, PartitionError> {
    let wal = shared.log.wal();
    let deadline = tokio::time::Instant::now() + shared.config.replica_timeout;
    loop {
        // Registered before the attempt: a release in between is not missed.
        let space = shared.log.space.notified();
        match wal.append(records.clone()).await {
            Ok(positions) => return Ok(positions),
            Err(WalError::LogFull { .. }) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(shared.unavailable("write log full"));
                }
                kick_flush(shared);
                // Another partition's flush may free space too: poll as well.
                let poll = tokio::time::sleep(
                    shared
                        .config
                        .replica_retry_interval
                        .max(Duration::from_millis(5)),
                );
                tokio::select! {
                    () = space => {}
                    () = poll => {
                        if let Err(error) = shared.log.release().await {
                            tracing::debug!(%error, "log release failed");
                        }
                    }
                    () = tokio::time::sleep_until(deadline) => {}
                }
            }
            Err(source) => return Err(shared.wal_error(source)),
        }
    }
}

/// Waits until the secondary confirmed `sequence` (or the role ended).
async fn wait_replicated(shared: &Arc<Shared>, sequence: u64) -> Result<(), PartitionError> {
    let mut progress = shared.progress.subscribe();
    let outcome = progress
        .wait_for(|p| p.acked_through >= sequence || p.stopped)
        .await
        .map(|p| *p);
    match outcome {
        Ok(p) if p.acked_through >= sequence => Ok(()),
        _ => Err(PartitionError::NotPrimary {
            partition: shared.id(),
        }),
    }
}

/// Payload of the marker a partition opened as secondary logs (a
/// [`RecordKind::Checkpoint`] record at the epoch it joins at).
const JOIN_MARKER: &[u8] = b"rackblock: secondary joined at this epoch";

/// `partition`'s records of `recovered` that are still part of its history.
///
/// **Why some are not.** A primary that dies leaves records it logged but
/// never got confirmed; the promoted secondary continues from *its* next
/// sequence, so the same sequences then name other writes. If the dead
/// node's log is replayed later (it rejoins as secondary, or is promoted
/// again and restarts), its stale records would win over acknowledged
/// writes with the same sequence, or make the secondary skip them as
/// duplicates. A node that joins a partition as secondary at epoch `E`
/// therefore logs a join marker, and every record of the partition before
/// a marker with an epoch below the marker's is void (it holds nothing the
/// epoch-`E` primary does not have). Records of other partitions, and the
/// markers themselves, are dropped here.
fn live_records(partition: PartitionId, recovered: &[RecoveredRecord]) -> Vec<RecoveredRecord> {
    let mut voided_below = 0;
    let mut live: Vec<RecoveredRecord> = Vec::new();
    for r in recovered.iter().rev() {
        if r.record.partition != partition {
            continue;
        }
        if r.record.kind == RecordKind::Checkpoint && r.record.payload[..] == *JOIN_MARKER {
            voided_below = voided_below.max(r.record.epoch);
        } else if r.record.epoch >= voided_below {
            live.push(r.clone());
        }
    }
    live.reverse();
    live
}

/// Points the index at the blocks of write `record`, logged at `position`.
pub(super) fn index_logged_write(
    index: &mut PartitionIndex,
    record: &LogRecord,
    position: LogPosition,
) -> Result<(), crate::index::IndexError> {
    index.apply_write(
        record.lba,
        u64::from(record.block_count),
        record.sequence,
        Location::Log {
            position,
            block_in_record: 0,
        },
    )
}

/// Points a secondary's index at the sled copy that a flush commit names
/// for `m`; `None` if `m` starts below this partition's `first_block`.
fn map_flushed(
    index: &mut PartitionIndex,
    first_block: u64,
    m: &proto::volume::FlushedRange,
) -> Option<Result<u64, crate::index::IndexError>> {
    let lba = m.lba.checked_sub(first_block)?;
    Some(index.apply_flush(
        lba,
        u64::from(m.blocks),
        m.sequence,
        Location::Sled {
            extent: m.extent,
            column: m.column,
            offset_bytes: m.offset_bytes,
        },
    ))
}

/// Applies the partition's records of the recovered log.
fn replay_log(
    shared: &Arc<Shared>,
    role: OpenRole,
    recovered: &[RecoveredRecord],
) -> Result<(), PartitionError> {
    let mut state = shared.lock();
    let index_error = |source| PartitionError::Index {
        partition: shared.id(),
        source,
    };
    let mut highest_sequence = state.next_sequence - 1;
    let mut highest_epoch = state.epoch;
    let mut seen: HashMap<u64, ()> = HashMap::new();
    for RecoveredRecord { position, record } in recovered {
        if record.partition != shared.id() {
            continue;
        }
        highest_epoch = highest_epoch.max(record.epoch);
        match record.kind {
            RecordKind::Write => {
                index_logged_write(&mut state.index, record, *position).map_err(index_error)?;
                state.retained.insert(record.sequence, *position);
                highest_sequence = highest_sequence.max(record.sequence);
                seen.insert(record.sequence, ());
            }
            RecordKind::Trim => {
                state
                    .index
                    .apply_unmap(record.lba, u64::from(record.block_count), record.sequence)
                    .map_err(index_error)?;
                let trim = PendingTrim::of(record, *position);
                state.pending_trims.insert(record.sequence, trim);
                state.retained.insert(record.sequence, *position);
                highest_sequence = highest_sequence.max(record.sequence);
            }
            RecordKind::FlushCommit => {
                let Some((up_to, mappings)) = flush::decode_commit(&record.payload) else {
                    return Err(PartitionError::Recovery {
                        partition: shared.id(),
                        reason: format!("flush commit at {} undecodable", position.0),
                    });
                };
                highest_sequence = highest_sequence.max(up_to);
                state.pending_trims.retain(|sequence, _| *sequence > up_to);
                if role == OpenRole::Secondary {
                    // The tail a secondary keeps starts after the commit.
                    state.retained.retain(|sequence, _| *sequence > up_to);
                }
                // The primary's truth for flushed data is the sled summaries
                // (GC may have moved blocks since); only a secondary maps.
                if role == OpenRole::Secondary {
                    for m in mappings {
                        let first_block = shared.config.first_block;
                        if let Some(mapped) = map_flushed(&mut state.index, first_block, &m) {
                            mapped.map_err(index_error)?;
                        }
                    }
                }
            }
            RecordKind::Checkpoint | RecordKind::Padding => {}
        }
    }
    state.next_sequence = state.next_sequence.max(highest_sequence + 1);
    state.applied_through = state.next_sequence - 1;
    if role == OpenRole::Secondary {
        state.epoch = highest_epoch;
    } else if highest_epoch > state.epoch {
        return Err(PartitionError::Fenced {
            partition: shared.id(),
            current: highest_epoch,
        });
    }
    if state.index.oldest_log_position().is_some() || !state.pending_trims.is_empty() {
        state.oldest_unflushed = Some(Instant::now());
    }
    Ok(())
}
