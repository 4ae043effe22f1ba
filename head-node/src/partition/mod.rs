//! The partition engine: one [`Partition`] per volume partition this head
//! node serves, as **primary** or **secondary** (ARCHITECTURE.md: Write
//! path, Read path, Durability and fencing; "invariant N" below is its
//! System invariant N).
//!
//! ```text
//!  host write ─▶ validate (role, epoch, range, CRCs) ─▶ core: admit (range table; + read-modify-write
//!               of partial 4 KiB blocks) ─▶ core: start_commit (sequences, log hold) ─┬─▶ local WAL append
//!                                                                                     └─▶ replication queue ─▶ replicator task
//!                                                                                         ─▶ ReplicaRequest::Append ─▶ secondary WAL
//!               core: local_done + on_appended (both durable) ─▶ index: LBA → Log(position) ─▶ ack (Done)
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
//! **Core and driver.** The write path's and replication's decisions are
//! [`core::PartitionCore`], a sans-IO state machine (no tokio, no clock, no
//! locks): the range table that serialises overlapping writes, sequence
//! assignment, the ack rule, the replication queue and catch-up plan, the
//! secondary's ordering, log holds, fencing, take-over and log replay.
//! [`Partition`] is its driver: the core sits in the partition's one state
//! mutex (next to the flush bookkeeping), and whichever task observes an
//! event (a host handler whose log append returned, the replicator with the
//! secondary's answer, the secondary's request handler) steps it and
//! executes what it returns through the seams; host writes get their
//! outcome through a per-write reply channel. There is no task per write.
//! Flush, GC, checkpoints and recovery from the sleds are still async
//! driver code that reads and updates the core's state under the same lock
//! (see `core`'s module docs for the list). `head-node/tests/it/sim.rs`
//! drives the same core through a seeded simulation.
//!
//! **Roles.** `Primary` serves hosts and drives replication, flush and GC;
//! `Secondary` only answers [`Partition::handle_replica`]; `Fenced` is what a
//! primary becomes when a sled answers `Fenced` or the secondary reports a
//! newer epoch: it stops acknowledging at once and fails in-flight requests
//! with `NotPrimary` (invariant 2). A node becomes primary of an epoch by
//! [`Partition::open`] with [`OpenRole::Primary`], which claims every column
//! of the partition's extents with the new epoch and rebuilds the index from
//! the sleds (newest index checkpoint plus the summaries written after it)
//! and its own log. A secondary keeps that index of the flushed data
//! current in the background after each flush commit, so that its
//! promotion in place reads only the rows written since its last pass
//! (`checkpoint`'s module docs, "secondary index").
//!
//! **Durability (default policy, invariant 1).** A write is acknowledged only
//! when it is durable in the primary's log *and* the secondary's. If the
//! secondary does not confirm within `replica_timeout` the host gets the
//! retryable `Unavailable`; the record stays queued for the secondary (so the
//! two logs converge when it returns) and is applied to the index only once
//! both copies exist. There is no single-copy mode. A host that gives up
//! while its local append is still in flight (a full log) abandons the
//! write: the core is told the append failed, the records may still reach
//! one or both logs (an unacknowledged write, like any other in flight).
//!
//! **Ordering.** The primary is the single point of ordering of its
//! partition: the core assigns sequences in one step, replication sends
//! them in sequence order (the secondary refuses holes with `Gap` and the
//! primary resends from its log, or — for records it already flushed,
//! released or abandoned — sends a catch-up jump, a `FlushCommit` marked
//! with [`core::jump_marker`], that moves the secondary past them without
//! touching the trims and tail it holds), and the index applies "newest
//! sequence wins" everywhere (log replay, flush, GC). Overlapping writes
//! are serialised by the core's range table (first come, first served; a
//! write stays in it until resolved, even if its host gave up), which also
//! makes the read-modify-write of partial blocks atomic. A host `Flush`
//! waits until every write that arrived before it left the table.
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

pub mod core;
pub mod error;
pub mod layout;
pub mod seams;

mod checkpoint;
mod dedupe;
mod direct;
mod flatten;
mod flush;
mod read;
mod rebuild;
mod replica;
mod rollback;
mod snapshot;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use proto::sled::PartitionId;
use proto::volume::{HostOp, HostReply, HostRequest, SnapshotAction, SECTOR_BYTES};
use tokio::sync::{oneshot, Notify, Semaphore};

pub use self::core::{live_records, PartitionCore};
pub use checkpoint::{CheckpointReport, RecoveryReport};

use self::core::{Admission, Change, Completion, LogResident, TakeOverPlan, WriteId};
pub use dedupe::{DEDUPE_CAPACITY, DEDUPE_MAX_AGE};
pub use error::PartitionError;
pub use flatten::FlattenStep;
pub use flush::{FlushReport, GcReport};
pub use rebuild::{RebuildError, RebuildProgress, RebuildTask};
pub use rollback::RollbackStep;
pub use seams::{ExtentGrant, ExtentSource, ParentSnapshot, PeerError, ReplicaPeer, SledAccess};

use crate::erasure::ErasureCodec;
use crate::index::Location;
use crate::wal::{LogPosition, LogRecord, RecoveredRecord, Wal, WalError};
use proto::BLOCK_SIZE_BYTES;

/// Log reads a flush or a catch-up keeps in flight.
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
    /// A take-over in place starts from the index of the flushed data this
    /// node holds: a secondary keeps it current in the background after
    /// each flush commit, a primary taken over at a new epoch has its own.
    /// Off: neither (only [`Partition::refresh_secondary_index`] builds a
    /// secondary's; tests of the checkpoint and full-scan paths).
    pub reuse_held_index: bool,
    /// A write of whole blocks of at least this many bytes goes straight
    /// to the sleds as full stripes ([`direct`]); 0: never.
    pub direct_write_min_bytes: u64,
    /// A clone's partition: where the blocks it never wrote are read from
    /// (see [`ParentSnapshot`]); `None` for every other volume.
    pub parent: Option<Arc<dyn ParentSnapshot>>,
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
            reuse_held_index: true,
            direct_write_min_bytes: crate::config::DEFAULT_DIRECT_WRITE_MIN_BYTES,
            parent: None,
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
    /// Snapshot cuts taken.
    pub snapshot_cuts: AtomicU64,
    /// Runs of a clone's never-written blocks read from its parent
    /// snapshot.
    pub parent_reads: AtomicU64,
    /// Blocks a flatten copied from the parent snapshot.
    pub flattened_blocks: AtomicU64,
    /// Flatten copies committed (each one write operation).
    pub flatten_copies: AtomicU64,
    /// Rollback steps that rewrote blocks (each one write operation).
    pub rollback_writes: AtomicU64,
    /// Blocks a rollback rewrote (written or made tombstones).
    pub rolled_back_blocks: AtomicU64,
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
    /// Last recovery from the sleds: 1 if it started from the index of the
    /// flushed data this node held (a promotion, or a primary's take-over
    /// at a new epoch), 0 if not.
    pub recovery_held_index_used: AtomicU64,
    /// Last recovery from the sleds: wall time in milliseconds.
    pub recovery_duration_ms: AtomicU64,
    /// Host writes that went straight to the sleds as full stripes.
    pub direct_writes: AtomicU64,
    /// Writes eligible for that which went through the logs instead (the
    /// stripes failed, or the flush lock stayed busy).
    pub direct_fallbacks: AtomicU64,
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
    /// When a full log was last reported (one report per
    /// [`FULL_REPORT_INTERVAL`]).
    full_reported: Mutex<Option<Instant>>,
}

/// Least time between two reports of a full log ([`SharedLog::report_full`]).
const FULL_REPORT_INTERVAL: Duration = Duration::from_secs(5);

impl SharedLog {
    /// Wraps an opened log.
    pub fn new(wal: Wal) -> Arc<Self> {
        Arc::new(Self {
            wal,
            partitions: Mutex::new(Vec::new()),
            release_lock: tokio::sync::Mutex::new(()),
            space: Notify::new(),
            full_reported: Mutex::new(None),
        })
    }

    /// A writer gave up on a full log: says (at most every
    /// [`FULL_REPORT_INTERVAL`]) which partitions hold the log's tail and
    /// by what, so that a log that stays full names its cause.
    fn report_full(&self) {
        {
            let mut last = lock(&self.full_reported);
            if last.is_some_and(|at| at.elapsed() < FULL_REPORT_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        let stats = self.wal.stats();
        let partitions: Vec<Arc<Shared>> = lock(&self.partitions)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let mut holders: Vec<(LogPosition, String)> = partitions
            .iter()
            .filter_map(|p| {
                let state = p.lock();
                let hold = state.core.log_hold()?;
                let what = format!(
                    "{:?} {:?} at epoch {}: {:?}",
                    p.id(),
                    state.core.role(),
                    state.core.epoch(),
                    state.core.log_holds()
                );
                Some((hold, what))
            })
            .collect();
        holders.sort_by_key(|(hold, _)| *hold);
        let holders: Vec<String> = holders
            .into_iter()
            .take(4)
            .map(|(hold, what)| format!("{} by {what}", hold.0))
            .collect();
        tracing::warn!(
            tail = stats.tail,
            durable = stats.durable,
            head = stats.head,
            used_bytes = stats.used_bytes,
            capacity_bytes = stats.capacity_bytes,
            partitions = partitions.len(),
            oldest_holds = ?holders,
            "write log full: writers give up; the oldest holds"
        );
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

/// The partition's state behind its one mutex: the sans-IO
/// [`PartitionCore`] (write path, replication, index, log holds) and what
/// the flush, GC and checkpoint pipelines keep next to it, plus the
/// driver's reply channels of writes in flight.
#[derive(Debug)]
struct State {
    core: PartitionCore,
    extents: BTreeMap<u64, ExtentState>,
    open_extent: Option<u64>,
    /// Primary: its checkpoint extents (also in `extents`).
    checkpoints: checkpoint::Tracker,
    /// Host writes waiting for their completion, by write.
    replies: HashMap<WriteId, oneshot::Sender<Result<(), PartitionError>>>,
}

impl State {
    /// Delivers what the core resolved: replies to the hosts still
    /// waiting. Returns whether writes became ready (wake the queue).
    fn deliver(&mut self, (completions, ready): (Vec<Completion>, Vec<WriteId>)) -> bool {
        let resolved = !completions.is_empty();
        for completion in completions {
            if let Some(reply) = self.replies.remove(&completion.write) {
                let _ = reply.send(completion.result);
            }
        }
        resolved || !ready.is_empty()
    }
}

/// Ends a host write in the core's range table when the host side is done
/// (answered, timed out or cancelled); a cancelled local append is reported
/// as failed so that its hold and sequences are not left behind.
#[derive(Debug)]
struct WriteGuard {
    shared: Arc<Shared>,
    id: WriteId,
    /// The local append is in flight (not reported to the core yet).
    appending: bool,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let shared = &self.shared;
        let mut state = shared.lock();
        if self.appending {
            let outcome = state
                .core
                .local_done(self.id, Err(shared.unavailable("write cancelled")));
            state.deliver(outcome);
        }
        state.replies.remove(&self.id);
        let _ready = state.core.end_write(self.id);
        drop(state);
        // Queued writes may be ready, a flush may wait for this one.
        shared.admitted.notify_waiters();
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
    /// Woken when writes left the core's range table or became ready in
    /// it (queued writes, host flushes and take-overs wait on it).
    admitted: Notify,
    write_permits: Arc<Semaphore>,
    /// One flush or GC at a time; also serialises replication requests on a
    /// secondary.
    flush_lock: tokio::sync::Mutex<()>,
    /// Secondary: a replication request ended (wakes requests waiting for
    /// the core's replica slot or for their predecessors).
    replica_advanced: Notify,
    repl_wakeup: Arc<Notify>,
    repair: Mutex<VecDeque<RepairItem>>,
    metrics: Arc<PartitionMetrics>,
    /// Host write ids seen by this primary (in memory only, see [`dedupe`]).
    dedupe: Arc<dedupe::WriteDedupe>,
    /// A log-full flush is running (single flight, see [`kick_flush`]).
    flushing: std::sync::atomic::AtomicBool,
    /// How the last recovery from the sleds went (primary).
    recovery: Mutex<RecoveryReport>,
    /// Secondary: its index of the primary's flushed data, kept current in
    /// the background ([`kick_shadow`]) and taken by a promotion.
    shadow: tokio::sync::Mutex<Option<checkpoint::Shadow>>,
    /// Secondary: a flush commit arrived since the last shadow pass began.
    shadow_dirty: std::sync::atomic::AtomicBool,
    /// Secondary: a shadow pass is running (single flight).
    shadow_running: std::sync::atomic::AtomicBool,
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
        self.lock().core.log_hold()
    }

    /// Drops what the log released below `tail` from the catch-up list.
    ///
    /// Every hold of this partition was counted before the release, and a
    /// new one is taken at or above the durable position then: none may be
    /// below the new tail (invariant 4: the index never points at
    /// reclaimed log space; an append in flight keeps its records).
    fn forget_released(&self, tail: LogPosition) {
        self.lock().core.forget_released(tail);
    }

    /// Primary check: role and (if given) the request's epoch.
    fn check_primary(&self, epoch: Option<u64>) -> Result<(), PartitionError> {
        self.lock().core.check_primary(epoch)
    }

    /// Stops acknowledging: a newer epoch owns the partition. Every write
    /// in flight fails `NotPrimary` at once.
    fn fence(&self, current: u64) {
        let mut state = self.lock();
        if matches!(state.core.role, Role::Primary) {
            tracing::warn!(partition = ?self.id(), epoch = state.core.epoch, current, "fenced: dropping the primary role");
            bump(&self.metrics.fenced);
        }
        let outcome = state.core.fence(current);
        let wake = state.deliver(outcome);
        drop(state);
        if wake {
            self.admitted.notify_waiters();
        }
        self.repl_wakeup.notify_one();
    }

    /// Delivers completions of the core (outside of a `State` borrow).
    fn deliver(&self, outcome: (Vec<Completion>, Vec<WriteId>)) {
        if self.lock().deliver(outcome) {
            self.admitted.notify_waiters();
        }
    }

    /// Waits until every write that arrived before this call left the
    /// core's range table (resolved: applied, failed or fenced, and its
    /// local append answered): the host `Flush` barrier.
    async fn writes_before(&self) {
        let mark = self.lock().core.write_mark();
        loop {
            let notified = self.admitted.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.lock().core.writes_before(mark) {
                return;
            }
            notified.await;
        }
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

/// What [`Partition::open_with`] builds the log-resident state from.
#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    /// Records recovered from the log (a cold open).
    Log(&'a [RecoveredRecord]),
    /// The old instance's log-resident state (an in-place take-over).
    HandedOver(&'a LogResident),
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
        Self::open_with(config, role, deps, Source::Log(recovered), 1, None).await
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
    /// hand over: the index runs that point into the log and the pending
    ///            trims, as the old instance holds them (take_over_plan; the
    ///            records they refer to are pinned, never re-read: the pause
    ///            does not grow with the unflushed log)
    /// open:      a primary over them: claims every owned column at the new
    ///            epoch (fences the old primary on the sleds), index = the
    ///            secondary's own index of the flushed data (a promotion) or
    ///            the newest sled checkpoint, + the summaries after it (or
    ///            every summary) + the handed runs and trims (newest
    ///            sequence wins),
    ///            sequences continue after the highest this instance
    ///            assigned or saw
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
        // The core's replica slot, held to the end: no replication of the
        // old epoch is accepted from here on.
        let _replica_slot = replica::enter(old, None, None).await;
        let was_secondary = {
            let mut state = old.lock();
            let (was_secondary, completions, ready) = state.core.take_over(new_epoch)?;
            if state.deliver((completions, ready)) {
                old.admitted.notify_waiters();
            }
            was_secondary
        };
        // A primary taken over at a new epoch starts from its own index of
        // the flushed data, taken while no flush is half committed (none
        // if a flush outlived the wait: the checkpoint path then).
        let mut own_shadow = None;
        if !was_secondary {
            old.repl_wakeup.notify_one();
            // In-flight writes end quickly once the core stopped them.
            let wait = old.config.replica_timeout;
            let _ = tokio::time::timeout(wait, old.writes_before()).await;
            if let Ok(_flushing) = tokio::time::timeout(wait, old.flush_lock.lock()).await {
                if old.config.reuse_held_index {
                    own_shadow = checkpoint::own_shadow(old);
                }
            }
        }
        let plan = {
            let mut state = old.lock();
            let plan = state.core.take_over_plan(was_secondary);
            // Pinned until the new instance holds them itself, whatever the
            // old index does meanwhile (a flush that outlived the wait
            // above may still move blocks to the sleds).
            if let Some(first) = plan.needed.first() {
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
                state.core.add_hold(*first);
            }
            plan
        };
        let pin = plan.needed.first().copied();
        // A promoted secondary starts from the index of the flushed data it
        // kept (only the rows written since its last pass are read); a
        // pass still running is waited for, at most `replica_timeout`.
        let shadow = if was_secondary {
            match tokio::time::timeout(old.config.replica_timeout, old.shadow.lock()).await {
                Ok(mut slot) => slot.take(),
                Err(_) => None,
            }
        } else {
            own_shadow
        };
        let taken = Self::open_from(old, config, deps, &plan, shadow).await;
        if let Some(pin) = pin {
            old.lock().core.remove_hold(pin);
        }
        let (taken, records) = taken?;
        // The rest of the tail is only offered to the new secondary's
        // catch-up (superseded or flushed: never replayed, never held; a
        // record released meanwhile is skipped there). Without it the
        // catch-up would jump over every hole between the records the index
        // refers to, one round trip per hole.
        let tail = old.lock().core.retained_tail();
        taken.shared.lock().core.adopt_retained(&tail);
        let done = old.lock().core.take_over_done(new_epoch);
        old.deliver(done);
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

    /// The take-over's second half: opens the new primary over the old
    /// instance's log-resident state as it holds it (no log reads: the
    /// pause does not grow with the unflushed log). The `needed` records
    /// it refers to are pinned by the caller until the new instance holds
    /// them itself.
    async fn open_from(
        old: &Arc<Shared>,
        config: PartitionConfig,
        deps: PartitionDeps,
        plan: &TakeOverPlan,
        shadow: Option<checkpoint::Shadow>,
    ) -> Result<(Partition, usize), PartitionError> {
        let head_before = old.log.wal().head();
        let taken = Self::open_with(
            config,
            OpenRole::Primary,
            deps,
            Source::HandedOver(&plan.log_resident),
            plan.next_sequence,
            shadow,
        )
        .await?;
        // The new instance maps blocks only to the records handed over
        // (pinned by the old instance until it holds them itself) or to its
        // own new writes: a record of the tail nobody holds may be released
        // at any moment (the stale read fixed in ARCHITECTURE.md).
        debug_assert!(
            taken
                .shared
                .lock()
                .core
                .index
                .runs()
                .all(|(_, run)| match run.location {
                    Some(Location::Log { position, .. }) => {
                        position >= head_before || plan.needed.contains(&position)
                    }
                    _ => true,
                }),
            "partition {:?}: the take-over maps a block to a log record it was not handed",
            old.id()
        );
        Ok((taken, plan.needed.len()))
    }

    async fn open_with(
        config: PartitionConfig,
        role: OpenRole,
        deps: PartitionDeps,
        source: Source<'_>,
        min_next_sequence: u64,
        shadow: Option<checkpoint::Shadow>,
    ) -> Result<Partition, PartitionError> {
        if config.size_blocks == 0 || !(0.0..=1.0).contains(&config.flush_fill_ratio) {
            return Err(PartitionError::BadRequest {
                partition: config.partition,
                reason: "partition of 0 blocks or fill ratio outside 0..1".to_string(),
            });
        }
        let role_now = match role {
            OpenRole::Primary => Role::Primary,
            OpenRole::Secondary => Role::Secondary,
        };
        let state = State {
            core: PartitionCore::new(
                config.partition,
                config.first_block,
                config.size_blocks,
                role_now,
                config.epoch,
            ),
            extents: BTreeMap::new(),
            open_extent: None,
            checkpoints: checkpoint::Tracker::new(),
            replies: HashMap::new(),
        };
        let shared = Arc::new(Shared {
            write_permits: Arc::new(Semaphore::new(config.max_inflight_writes.max(1))),
            config,
            log: deps.log.clone(),
            sleds: deps.sleds,
            extent_source: deps.extents,
            replica: deps.replica,
            state: Mutex::new(state),
            admitted: Notify::new(),
            flush_lock: tokio::sync::Mutex::new(()),
            replica_advanced: Notify::new(),
            repl_wakeup: Arc::new(Notify::new()),
            repair: Mutex::new(VecDeque::new()),
            metrics: Arc::new(PartitionMetrics::default()),
            dedupe: dedupe::WriteDedupe::new(),
            flushing: std::sync::atomic::AtomicBool::new(false),
            recovery: Mutex::new(RecoveryReport::default()),
            shadow: tokio::sync::Mutex::new(None),
            shadow_dirty: std::sync::atomic::AtomicBool::new(false),
            shadow_running: std::sync::atomic::AtomicBool::new(false),
        });
        let mut recovered = match source {
            Source::Log(recovered) => live_records(shared.id(), recovered),
            Source::HandedOver(_) => Vec::new(),
        };
        if role == OpenRole::Secondary {
            // Joining at `epoch`: what this log holds of older epochs is
            // either in the primary's history (which the primary holds) or
            // a dead primary's records past the point where the next
            // primary took over, reusing their sequences. The marker voids
            // them for every later replay too (see `live_records`).
            let epoch = shared.config.epoch;
            recovered.retain(|r| r.record.epoch >= epoch);
            let marker = PartitionCore::join_marker(shared.id(), epoch);
            shared
                .log
                .wal()
                .append_one(marker)
                .await
                .map_err(|source| shared.wal_error(source))?;
        }
        if role == OpenRole::Primary {
            let replayed = match source {
                Source::Log(_) => checkpoint::Replayed::Records(&recovered),
                Source::HandedOver(handed) => checkpoint::Replayed::Handed(handed),
            };
            checkpoint::recover(&shared, replayed, shadow).await?;
        }
        {
            let mut state = shared.lock();
            match source {
                Source::Log(_) => state.core.replay(
                    role == OpenRole::Secondary,
                    &recovered,
                    min_next_sequence,
                    Instant::now(),
                )?,
                Source::HandedOver(handed) => {
                    state
                        .core
                        .adopt_log_resident(handed, min_next_sequence, Instant::now())?
                }
            }
            // What recovery and replay built, before anything relies on it
            // (a recount of every run: debug builds only).
            debug_assert_eq!(
                state.core.index.check_invariants(),
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
        } else {
            kick_shadow(&shared);
        }
        Ok(Partition { shared })
    }

    /// The partition id.
    pub fn id(&self) -> PartitionId {
        self.shared.id()
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.shared.lock().core.role
    }

    /// Primary: its epoch; secondary: the highest epoch seen.
    pub fn epoch(&self) -> u64 {
        self.shared.lock().core.epoch
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
        self.shared
            .lock()
            .core
            .index
            .live_blocks_per_extent()
            .clone()
    }

    /// Primary: every record this primary acknowledged is on the secondary
    /// or on the sleds (at the queue's front, and any tail a catch-up
    /// jumped it over flushed and the commit confirmed; see the replica
    /// module docs). The manager reports it to the control plane, which
    /// promotes only an in-sync secondary.
    pub fn secondary_in_sync(&self) -> bool {
        self.shared.lock().core.secondary_in_sync()
    }

    /// What holds this partition's share of the log, part by part (status
    /// pages, the log-full warning, tests).
    pub fn log_holds(&self) -> self::core::LogHolds {
        self.shared.lock().core.log_holds()
    }

    /// Blocks whose latest version is only in the log.
    pub fn log_resident_blocks(&self) -> u64 {
        self.shared.lock().core.index.log_resident_blocks()
    }

    /// Where partition block `block` is: its index location and, for a sled
    /// location, the sled and column holding it (debug endpoints, tests).
    pub fn location_of(
        &self,
        block: u64,
    ) -> Option<(Location, Option<(String, proto::sled::ColumnId)>)> {
        let state = self.shared.lock();
        let location = state
            .core
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
        let mapped = state.core.index.lookup_with_sequence(block, 1).ok()?;
        let first = mapped.first()?;
        Some(serde_json::json!({
            "volume": config.partition.volume,
            "partition": config.partition.index,
            "role": format!("{:?}", state.core.role),
            "epoch": state.core.epoch,
            "block_in_partition": block,
            "sequence": first.sequence,
            "location": first.location.map(|l| format!("{l:?}")),
        }))
    }

    /// Checks the index's structural invariants (tests, debug endpoints).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.shared.lock().core.index.check_invariants()
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
            HostOp::ReadSnapshot {
                snapshot,
                offset_bytes,
                len_bytes: len,
            } => match self
                .read_snapshot(Some(epoch), snapshot, offset_bytes, len)
                .await
            {
                Ok(data) => {
                    let crcs = proto::volume::chunk_crcs(&data);
                    return HostReply::Data { data, crcs };
                }
                Err(error) => Err(error),
            },
            HostOp::SnapshotControl { snapshot, action } => match action {
                SnapshotAction::Cut { hold_ms } => {
                    let hold = Duration::from_millis(u64::from(hold_ms));
                    match self
                        .cut_snapshot(Some(epoch), snapshot, hold_ms > 0, hold)
                        .await
                    {
                        Ok(cut) => return HostReply::Cut { cut },
                        Err(error) => Err(error),
                    }
                }
                SnapshotAction::Release => self.release_held_cut(snapshot),
                SnapshotAction::Drop => self.drop_snapshot(snapshot).await,
            },
            HostOp::SnapshotDiff {
                from,
                to,
                start_bytes,
                max_ranges,
            } => match self.snapshot_diff_page(Some(epoch), from, to, start_bytes, max_ranges) {
                Ok((ranges, next_offset_bytes)) => {
                    return HostReply::Diff {
                        ranges,
                        next_offset_bytes,
                    }
                }
                Err(error) => Err(error),
            },
            HostOp::SnapshotMap {
                view,
                start_bytes,
                max_ranges,
            } => match self.snapshot_map_page(Some(epoch), view, start_bytes, max_ranges) {
                Ok((ranges, next_offset_bytes)) => {
                    return HostReply::Diff {
                        ranges,
                        next_offset_bytes,
                    }
                }
                Err(error) => Err(error),
            },
            HostOp::SnapshotUsage => match self.snapshot_usage(Some(epoch)) {
                Ok(snapshots) => return HostReply::SnapshotUsage { snapshots },
                Err(error) => Err(error),
            },
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
        let barrier = self.shared.writes_before();
        match tokio::time::timeout(self.shared.config.replica_timeout, barrier).await {
            Ok(()) => self.shared.check_primary(Some(epoch)),
            Err(_) => Err(self.shared.unavailable("writes in flight did not complete")),
        }
    }

    /// Runs one write-like operation over partition bytes `bytes`: `data`
    /// for a write, `None` for an unmap.
    async fn submit(&self, bytes: Range<u64>, data: Option<Bytes>) -> Result<(), PartitionError> {
        let deadline = tokio::time::Instant::now() + self.shared.config.replica_timeout;
        let first_block = bytes.start / BLOCK_SIZE_BYTES;
        let end_block = bytes.end.div_ceil(BLOCK_SIZE_BYTES);
        let (_permit, mut guard) = self.admitted(first_block..end_block, deadline).await?;
        if direct::eligible(&self.shared, &bytes, data.as_ref()) {
            if let Some(data) = data {
                let work = direct::write(&self.shared, guard.id, first_block, data);
                let (changes, serial) =
                    tokio::time::timeout_at(deadline, work)
                        .await
                        .map_err(|_| {
                            self.shared
                                .unavailable("full-stripe write did not complete")
                        })??;
                return self
                    .commit_with(&mut guard, changes, serial, deadline)
                    .await;
            }
        }
        let changes = self.plan(bytes, data).await?;
        self.commit(&mut guard, changes, deadline).await
    }

    /// Waits for a write permit and for `blocks` to be admitted in the
    /// core's range table (every earlier write to them applied), by
    /// `deadline`.
    async fn admitted(
        &self,
        blocks: Range<u64>,
        deadline: tokio::time::Instant,
    ) -> Result<(tokio::sync::OwnedSemaphorePermit, WriteGuard), PartitionError> {
        let shared = &self.shared;
        let permit =
            tokio::time::timeout_at(deadline, shared.write_permits.clone().acquire_owned())
                .await
                .map_err(|_| shared.unavailable("too many writes in flight"))?
                .map_err(|_| shared.unavailable("partition closing"))?;
        // The core's range table serialises overlapping writes (and makes
        // the read-modify-write of partial blocks atomic).
        let admission = shared.lock().core.admit(blocks);
        let guard = WriteGuard {
            shared: shared.clone(),
            id: admission.id(),
            appending: false,
        };
        let id = admission.id();
        if let Admission::Queued(_) = admission {
            let admitted = async {
                loop {
                    let notified = shared.admitted.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if shared.lock().core.is_admitted(id) {
                        return;
                    }
                    notified.await;
                }
            };
            tokio::time::timeout_at(deadline, admitted)
                .await
                .map_err(|_| shared.unavailable("overlapping writes did not complete"))?;
        }
        Ok((permit, guard))
    }

    /// Commits admitted write `guard.id`'s `changes`: sequences, both logs,
    /// the ack rule; answers its outcome by `deadline`.
    async fn commit(
        &self,
        guard: &mut WriteGuard,
        changes: Vec<Change>,
        deadline: tokio::time::Instant,
    ) -> Result<(), PartitionError> {
        self.commit_with(guard, changes, None, deadline).await
    }

    /// [`commit`](Self::commit); `serial`: the flush lock a full-stripe
    /// write holds until its `start_commit` mapped it ([`direct`]).
    async fn commit_with(
        &self,
        guard: &mut WriteGuard,
        changes: Vec<Change>,
        serial: Option<direct::Serial<'_>>,
        deadline: tokio::time::Instant,
    ) -> Result<(), PartitionError> {
        let shared = &self.shared;
        let timeout = shared.config.replica_timeout;
        let id = guard.id;
        let (records, reply) = {
            let mut state = shared.lock();
            let head = shared.log.wal().head();
            let plan = state.core.start_commit(id, changes, head, Instant::now())?;
            let (tx, rx) = oneshot::channel();
            state.replies.insert(id, tx);
            (plan.records, rx)
        };
        drop(serial);
        shared.repl_wakeup.notify_one();
        guard.appending = true;
        let outcome = async {
            let local = append_local(shared, records).await;
            let resolved = shared.lock().core.local_done(id, local);
            guard.appending = false;
            shared.deliver(resolved);
            reply.await
        };
        match tokio::time::timeout_at(deadline, outcome).await {
            Ok(Ok(result)) => result,
            Ok(Err(_closed)) => Err(shared.unavailable("write dropped by the partition")),
            Err(_) => {
                bump(&shared.metrics.unavailable);
                Err(shared
                    .unavailable(format!("not durable on both head nodes within {timeout:?}")))
            }
        }
    }

    /// Turns a byte range into block changes, read-modify-writing partial
    /// blocks (the caller's write is admitted in the core's range table).
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
    ///
    /// The handling runs in a task of its own, to completion: the unit
    /// port drops a reset connection's handlers, and an `Append` dropped
    /// between taking its log hold and the log's answer would keep that
    /// hold forever (the log then fills and host writes fail). Only the
    /// reply is lost with the connection; the primary resends.
    pub async fn handle_replica(
        &self,
        request: proto::volume::ReplicaRequest,
    ) -> proto::volume::ReplicaReply {
        let shared = self.shared.clone();
        match tokio::spawn(async move { replica::handle(&shared, request).await }).await {
            Ok(reply) => reply,
            Err(error) => proto::volume::ReplicaReply::Error(proto::volume::ReplicaError::Io {
                reason: format!("replication request handler ended: {error}"),
            }),
        }
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

    /// Secondary: brings its index of the primary's flushed data up to
    /// date now (what a flush commit starts in the background); returns
    /// the stripe summaries it read.
    pub async fn refresh_secondary_index(&self) -> Result<u64, PartitionError> {
        checkpoint::refresh_shadow(&self.shared).await
    }

    /// Secondary: rows of the primary's data extents its index covers
    /// (`None`: none kept yet, or a pass is running).
    pub fn secondary_index_rows(&self) -> Option<u64> {
        let slot = self.shared.shadow.try_lock().ok()?;
        slot.as_ref().map(checkpoint::Shadow::rows)
    }

    /// How the last recovery from the sleds went (primary open and
    /// take-over).
    pub fn recovery_report(&self) -> RecoveryReport {
        *lock(&self.shared.recovery)
    }

    /// Primary: whether a flush is due (log fill ratio or age).
    pub fn flush_due(&self) -> bool {
        let fill = self.shared.log.wal().stats().fill_ratio();
        let config = &self.shared.config;
        self.shared.lock().core.flush_due(
            Instant::now(),
            fill,
            config.flush_fill_ratio,
            config.flush_age,
        )
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
        let stopped = self.shared.lock().core.stop();
        self.shared.deliver(stopped);
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

/// Least time between two passes of a secondary's index refresh: a burst
/// of flush commits costs one pass, not one each.
const SHADOW_REFRESH_INTERVAL: Duration = Duration::from_millis(200);

/// Secondary: brings its index of the primary's flushed data up to date in
/// the background ([`checkpoint::refresh_shadow`]), one pass at a time; a
/// kick during a pass runs one more after it. Ends when the partition is
/// dropped or stops being secondary (a promotion takes the index).
fn kick_shadow(shared: &Arc<Shared>) {
    if !shared.config.reuse_held_index {
        return;
    }
    shared.shadow_dirty.store(true, Ordering::Release);
    if shared
        .shadow_running
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    let weak = Arc::downgrade(shared);
    tokio::spawn(async move {
        loop {
            let Some(shared) = weak.upgrade() else { return };
            let secondary = matches!(shared.lock().core.role(), Role::Secondary);
            if !secondary || !shared.shadow_dirty.swap(false, Ordering::AcqRel) {
                shared.shadow_running.store(false, Ordering::Release);
                // A kick between the swap and the store found the pass
                // still running: take its turn.
                if secondary
                    && shared.shadow_dirty.load(Ordering::Acquire)
                    && shared
                        .shadow_running
                        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    continue;
                }
                return;
            }
            match checkpoint::refresh_shadow(&shared).await {
                Ok(rows) => {
                    tracing::debug!(partition = ?shared.id(), rows, "secondary index refreshed")
                }
                Err(error) => {
                    tracing::debug!(partition = ?shared.id(), %error, "secondary index refresh failed")
                }
            }
            drop(shared);
            tokio::time::sleep(SHADOW_REFRESH_INTERVAL).await;
        }
    });
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
                    shared.log.report_full();
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
