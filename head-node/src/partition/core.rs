//! [`PartitionCore`]: the partition's write path and replication as a
//! sans-IO state machine (no tokio, no clock, no locks, no I/O).
//!
//! ```text
//!            events in                         PartitionCore                       actions out
//!  host write admitted ─ admit(blocks) ─▶  range table (FIFO per overlap)  ─▶ Admission::Ready / Queued,
//!                                                                              end_write ─▶ newly ready ids
//!  planned changes ─── start_commit(id, changes, head, now) ─▶ sequences, hold, ─▶ CommitPlan: records to
//!                                                      replication queue         append to the local log
//!  local log durable ─ local_done(id, positions | error) ─┐
//!  secondary answered  next_append / on_appended(up_to) ──┼─▶ ack rule ─▶ Completion { write, result }
//!  newer epoch ─────── fence(current) ────────────────────┘              (index applied, hold dropped)
//!  secondary side ──── replica_begin_append / replica_appended / replica_commit ─▶ log records, replies
//!  log space ───────── log_hold() / forget_released(tail)                ─▶ how far the log may go
//!  take-over ───────── take_over(new_epoch) / take_over_records()        ─▶ what the new primary replays
//!  recovery ────────── replay(role, records)                             ─▶ index, sequences, epoch
//! ```
//!
//! **Who drives it.** One driver per partition owns the core (the
//! `Partition` in [`super`], which keeps it in the partition's state
//! mutex next to the flush bookkeeping): it calls the event methods from
//! whichever task observed the event (a host handler that got its log
//! append back, the replicator that got the secondary's answer, the
//! secondary's request handler) and executes what they return through the
//! seams (`SharedLog`, `ReplicaPeer`). Nothing inside awaits; every
//! decision below is a pure function of the core's state and the event.
//! The deterministic simulation (`head-node/tests/it/sim.rs`) drives the
//! same methods with in-memory logs, a lossy network and crashes.
//!
//! **The ack rule (invariant 1).** A write completes `Ok` only when its
//! records are durable in this node's log ([`PartitionCore::local_done`]
//! with positions) *and* the secondary confirmed every one of its
//! sequences ([`PartitionCore::on_appended`]); only then is it applied to
//! the index. A local failure completes it with the error at once; a fence
//! completes every write in flight with `NotPrimary` at once, and from then
//! on nothing completes `Ok`.
//!
//! **Ordering.** Sequences are assigned at [`PartitionCore::start_commit`],
//! in one step, so they are the partition's order. Overlapping writes are
//! serialised by the range table: a write is admitted only when no earlier
//! write that overlaps it is still in the table (first come, first served,
//! so a stream of small writes cannot starve a large one), and it stays in
//! the table until it is resolved, even when its host stopped waiting. The
//! secondary accepts records in sequence order only (duplicates skipped,
//! holes refused with `Gap`), one request at a time
//! ([`PartitionCore::replica_try_enter`]).
//!
//! **Log space (invariant 4).** [`PartitionCore::log_hold`] is the oldest
//! log position the partition still needs: records the index maps, pending
//! trims, appends in flight (a hold at the log head taken before the
//! append), and on a primary the records the secondary has not confirmed.
//! Holds are single-owner counters here; releasing one never taken panics.
//!
//! **In sync (the promotion gate).** [`PartitionCore::secondary_in_sync`]
//! holds when the secondary is at the replication queue's front *and* has
//! confirmed a flush commit whose watermark covers
//! [`PartitionCore::owed_through`]: what a catch-up jumped it over
//! ([`CatchUp::Owe`]: the tail is flushed instead of shipped, so new writes
//! are confirmed at once) or, for an instance opened from a log or a
//! take-over, everything that log holds. While something is owed, the
//! tail acknowledged when the old secondary held it is in this node's log
//! only; new writes are in both logs. The control plane never promotes a
//! secondary that is not in sync, so a crash of this node in that window
//! waits for its log, as before; the owed flush is due at once
//! ([`PartitionCore::flush_due`]) and commits its watermark even with
//! nothing left to move.
//!
//! **Flush.** [`PartitionCore::flush_plan`] decides the next batch (the
//! log-resident runs and pending trims it takes, and its watermark) and
//! [`PartitionCore::flush_due`] when one is due.
//!
//! **What is still driver-side** (see ARCHITECTURE.md): the rest of the
//! flush and GC pipelines and the checkpoint writer (stripe building, the
//! commit's index update, extent bookkeeping: async code in `flush.rs` and
//! `checkpoint.rs` that updates this core's index, trims and watermarks
//! under the same lock), recovery from the sleds, the write-id dedupe
//! table, the in-flight write permits, the log-full wait, and every
//! timeout.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::sled::PartitionId;
use proto::volume::{FlushedRange, ReplicaError, ReplicaRecord, ReplicaRecordKind, ReplicaRequest};
use proto::BLOCK_SIZE_BYTES;

use super::error::PartitionError;
use super::snapshot::{MarkerOp, SnapshotMarker};
use super::Role;
use crate::index::{IndexError, LayerEntry, Location, PartitionIndex, Run};
use crate::wal::{LogPosition, LogRecord, RecordKind, RecoveredRecord};

/// Payload of the marker a partition opened as secondary logs (a
/// [`RecordKind::Checkpoint`] record at the epoch it joins at).
pub const JOIN_MARKER: &[u8] = b"rackblock: secondary joined at this epoch";

/// Most records per replication `Append`.
pub const BATCH_RECORDS: usize = 128;
/// Most payload bytes per replication `Append`.
pub const BATCH_BYTES: usize = 8 << 20;

/// A write known to the core (admitted or queued), by arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WriteId(pub u64);

/// What a write operation logs: whole blocks or unmapped ranges.
#[derive(Debug, Clone)]
pub enum Change {
    /// Blocks `lba..` get `data` (whole 4 KiB blocks).
    Write {
        /// First partition block.
        lba: u64,
        /// The blocks.
        data: Bytes,
    },
    /// Blocks `lba..lba + count` read as zeros.
    Unmap {
        /// First partition block.
        lba: u64,
        /// Blocks.
        count: u64,
    },
    /// The index record of a full-stripe write whose blocks are on the
    /// sleds already (alone in its write, committed with the sequence
    /// [`PartitionCore::reserve_direct`] gave it before the stripes were
    /// written; see [`super::direct`]).
    Direct {
        /// First partition block of the write.
        lba: u64,
        /// Where its blocks landed (volume blocks, as a flush commit's).
        mappings: Vec<FlushedRange>,
    },
    /// A snapshot marker (alone in its write): a cut takes its sequence as
    /// the snapshot's cut, and with `hold` keeps the acknowledgements of
    /// every later write until [`PartitionCore::release_cut`]; a drop
    /// uncounts the snapshot once it is durable on both logs.
    Snapshot {
        /// Snapshot id.
        id: u64,
        /// Cut or drop.
        op: MarkerOp,
        /// Cut only: hold later acknowledgements until released.
        hold: bool,
    },
}

/// Answer of [`PartitionCore::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// No earlier overlapping write: go on.
    Ready(WriteId),
    /// Waits for earlier overlapping writes; [`PartitionCore::end_write`]
    /// names it once it is ready.
    Queued(WriteId),
}

impl Admission {
    /// The write's id.
    pub fn id(self) -> WriteId {
        match self {
            Admission::Ready(id) | Admission::Queued(id) => id,
        }
    }
}

/// What [`PartitionCore::start_commit`] asks the driver to do.
#[derive(Debug, Clone)]
pub struct CommitPlan {
    /// Append these to the local log (in this order), then report
    /// [`PartitionCore::local_done`].
    pub records: Vec<LogRecord>,
    /// The records are queued for the secondary: wake the replicator.
    pub replicate: bool,
}

/// A write the core resolved: reply to its host (if it still waits).
#[derive(Debug)]
pub struct Completion {
    /// Which write.
    pub write: WriteId,
    /// Its outcome.
    pub result: Result<(), PartitionError>,
}

/// A trim or write-zeroes in the index (as a tombstone) whose tombstone is
/// not yet in a stripe summary on the sleds; its log record stays pinned
/// until then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingTrim {
    /// First partition block.
    pub lba: u64,
    /// Blocks trimmed.
    pub block_count: u64,
    /// The trim's log record.
    pub position: LogPosition,
}

impl PendingTrim {
    /// Trim `record`, logged at `position`.
    pub fn of(record: &LogRecord, position: LogPosition) -> Self {
        Self {
            lba: record.lba,
            block_count: u64::from(record.block_count),
            position,
        }
    }
}

/// Where a write in the range table is.
#[derive(Debug)]
enum Stage {
    /// Waits for an earlier overlapping write.
    Queued,
    /// May plan (read-modify-write) and commit.
    Admitted,
    /// Sequences assigned, records on their way to both logs.
    Committing(Commit),
}

#[derive(Debug)]
struct Commit {
    /// The write's records (payloads shared with the log's copy).
    records: Vec<LogRecord>,
    /// Log head taken before the local append.
    hold: LogPosition,
    /// `Some` once the local log answered.
    local: Option<Result<Vec<LogPosition>, ()>>,
    /// The completion was handed out (applied, fenced, or failed locally).
    resolved: bool,
    /// Hold dropped and sequences marked applied: nothing left to do.
    done: bool,
}

impl Commit {
    fn last_sequence(&self) -> u64 {
        self.records.last().map_or(0, |r| r.sequence)
    }

    fn first_sequence(&self) -> u64 {
        self.records.first().map_or(0, |r| r.sequence)
    }
}

#[derive(Debug)]
struct WriteSlot {
    blocks: Range<u64>,
    stage: Stage,
    /// The host no longer waits ([`PartitionCore::end_write`] came first):
    /// the slot goes when the commit is resolved.
    detached: bool,
}

/// What the secondary's log append of one `Append` request is.
#[derive(Debug, Clone)]
pub enum ReplicaAppend {
    /// Every record is a duplicate: answer `Appended { up_to_sequence }`.
    Nothing {
        /// Highest sequence held.
        up_to_sequence: u64,
    },
    /// Append `records` to the log (the core took a hold at `hold`), then
    /// report [`PartitionCore::replica_appended`].
    Log {
        /// Records to log.
        records: Vec<LogRecord>,
        /// The hold taken.
        hold: LogPosition,
    },
}

/// What the primary sends a secondary that expects an older sequence
/// ([`PartitionCore::catch_up_plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatchUp {
    /// The secondary is at the replication queue's front: the normal path
    /// goes on.
    Caught,
    /// Move the secondary past sequences this log no longer holds (flushed,
    /// superseded or abandoned) with a jump up to this sequence
    /// ([`PartitionCore::jump_request`]).
    Skip {
        /// `up_to_sequence` of the commit.
        up_to: u64,
    },
    /// The secondary misses records this log still holds: instead of
    /// resending them, jump it to the queue's front (`up_to` is the front
    /// minus one) and owe it a flush commit covering them
    /// ([`PartitionCore::jump_owed`]): new writes are confirmed at once,
    /// the pair is in sync once that flush commit is confirmed.
    Owe {
        /// `up_to_sequence` of the jump.
        up_to: u64,
    },
    /// The secondary misses records this log no longer has: re-mirror.
    Lost,
}

/// A log-resident run of the index, or its head when the batch is full:
/// blocks `lba..lba + block_count`, payload blocks `first_block_in_record..`
/// of the log record at `position`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogPiece {
    /// First partition block.
    pub lba: u64,
    /// Blocks in the piece.
    pub block_count: u64,
    /// Sequence of the write that produced them.
    pub sequence: u64,
    /// The log record holding them.
    pub position: LogPosition,
    /// Index of the piece's first block in that record's payload.
    pub first_block_in_record: u32,
}

/// What the next flush batch writes ([`PartitionCore::flush_plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushPlan {
    /// Log-resident runs, up to the batch size.
    pub pieces: Vec<LogPiece>,
    /// Pending trims up to `up_to_sequence`, by sequence.
    pub trims: Vec<(u64, PendingTrim)>,
    /// The watermark of the batch's flush commit.
    pub up_to_sequence: u64,
    /// Log-resident runs remain for another batch.
    pub more: bool,
}

/// What a take-over hands the new primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeOverPlan {
    /// Whether the old instance was a secondary (a promotion).
    pub was_secondary: bool,
    /// The log records the new primary replays: what the index and the
    /// pending trims refer to.
    pub needed: BTreeSet<LogPosition>,
    /// The new primary continues after this instance's sequences.
    pub next_sequence: u64,
    /// The rest of the tail, offered to the new secondary's catch-up only.
    pub retained: Vec<(u64, LogPosition)>,
    /// What the `needed` records put in the index, as this instance holds
    /// it: the new primary adopts it without reading the log
    /// ([`PartitionCore::adopt_log_resident`]).
    pub log_resident: LogResident,
}

/// The log-resident part of a partition's state, handed from the old
/// instance to the new primary by a take-over as it is: every index run
/// that points into the log and every pending trim. Adopting it builds what
/// replaying the records it refers to would (newest sequence wins), without
/// reading them: the take-over's pause does not grow with the unflushed
/// log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogResident {
    /// Index runs that point into the log, by first partition block.
    pub runs: Vec<(u64, Run)>,
    /// Pending trims by sequence.
    pub trims: Vec<(u64, PendingTrim)>,
    /// The old index's snapshots (id, cut): registered before recovery
    /// applies any sled row, as a cold open registers the log's cuts.
    pub snapshots: Vec<(u64, u64)>,
    /// Snapshot layers' log-resident entries (snapshot, block, entry).
    pub layer_entries: Vec<(u64, u64, LayerEntry)>,
    /// Snapshot markers no durable checkpoint holds yet (sequence,
    /// position): still held in the log by the new instance.
    pub markers: Vec<(u64, LogPosition)>,
}

impl LogResident {
    /// Applies what adopting this would put in an index to `index` (the
    /// recovery's probe of freed extents, [`super::checkpoint`]).
    pub fn apply_to(&self, index: &mut PartitionIndex) -> Result<(), IndexError> {
        for (lba, run) in &self.runs {
            if let Some(location) = run.location {
                index.apply_write(*lba, run.block_count, run.sequence, location)?;
            }
        }
        for (sequence, trim) in &self.trims {
            index.apply_unmap(trim.lba, trim.block_count, *sequence)?;
        }
        Ok(())
    }
}

/// The parts of a partition's log hold ([`PartitionCore::log_holds`]):
/// the oldest position each one needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogHolds {
    /// Records the index maps (log-resident blocks).
    pub index: Option<LogPosition>,
    /// Appends in flight (and take-over pins).
    pub in_flight: Option<LogPosition>,
    /// Trims not yet in a stripe summary.
    pub trims: Option<LogPosition>,
    /// Records kept for the replication peer: on a primary the ones the
    /// secondary has not confirmed, on a secondary its unflushed tail.
    pub unconfirmed: Option<LogPosition>,
    /// Snapshot markers no checkpoint holds yet.
    pub markers: Option<LogPosition>,
    /// Writes in the range table.
    pub writes_in_table: usize,
}

/// The partition's single-owner state (see the module docs).
#[derive(Debug)]
pub struct PartitionCore {
    partition: PartitionId,
    first_block: u64,
    size_blocks: u64,
    /// Current role.
    pub(crate) role: Role,
    /// Primary: its epoch. Secondary: the highest epoch seen.
    pub(crate) epoch: u64,
    /// Block runs to log or sled locations.
    pub(crate) index: PartitionIndex,
    /// Primary: next sequence to assign. Secondary: next expected.
    pub(crate) next_sequence: u64,
    /// Every sequence up to here is applied (or abandoned).
    pub(crate) applied_through: u64,
    applied_above: BTreeSet<u64>,
    /// Trims not yet written to a summary, by sequence.
    pub(crate) pending_trims: BTreeMap<u64, PendingTrim>,
    /// Own log records by sequence (catch-up of the secondary; a
    /// secondary's unflushed tail).
    pub(crate) retained: BTreeMap<u64, LogPosition>,
    /// Log heads taken before appends in flight (counted).
    inflight_holds: BTreeMap<LogPosition, usize>,
    /// Primary: records the secondary has not confirmed, in sequence order.
    pub(crate) repl_queue: VecDeque<ReplicaRecord>,
    /// Flush commits the secondary has not confirmed.
    pub(crate) pending_commits: VecDeque<ReplicaRequest>,
    /// Primary: flush commits that cover a snapshot marker no durable
    /// checkpoint holds yet, with their watermark: the secondary gets them
    /// only once one does (see [`forget_snapshot_markers`](Self::forget_snapshot_markers)).
    pub(crate) parked_commits: VecDeque<(u64, ReplicaRequest)>,
    /// Primary: highest sequence the secondary confirmed.
    acked_through: u64,
    /// Primary: highest sequence handed to an outstanding `Append`.
    sent_through: u64,
    /// Primary: replication stopped (fenced or shut down).
    stopped: bool,
    /// Primary: the secondary is at the replication queue's front (it
    /// confirmed an `Append`, or a catch-up or status probe found it
    /// there): the replicator stops probing and sends appends. False for a
    /// new instance: a secondary named at this epoch may be empty. Once
    /// true it stays true. It does not make the pair in sync on its own: a
    /// catch-up jump may have moved the secondary over records only this
    /// log holds ([`owed_through`](Self::owed_through)).
    secondary_at_front: bool,
    /// Primary: the secondary may lack acknowledged records up to this
    /// sequence that only this log holds (a catch-up jumped it over them,
    /// or, for an instance opened from its log, an earlier instance may
    /// have): the pair is in sync only once a flush commit with a
    /// watermark at least this high is confirmed by the secondary. 0:
    /// nothing owed.
    owed_through: u64,
    /// Primary: highest watermark of a flush commit queued for the
    /// secondary (pending or parked behind a snapshot marker).
    flush_queued_through: u64,
    /// Primary: highest watermark of a flush commit the secondary
    /// confirmed (a parked commit counts only once sent and confirmed).
    flush_confirmed_through: u64,
    /// The range table: writes by arrival.
    writes: BTreeMap<WriteId, WriteSlot>,
    next_write: u64,
    /// Secondary: one replication request is being handled.
    replica_busy: bool,
    /// When the oldest unflushed write was applied (the driver's clock).
    pub(crate) oldest_unflushed: Option<Instant>,
    /// Snapshot markers logged since the last index checkpoint, by
    /// sequence: held in the log until a checkpoint holds their effect.
    pub(crate) snapshot_markers: BTreeMap<u64, LogPosition>,
    /// Primary: a cut (snapshot id, cut sequence) that holds the
    /// acknowledgements of the writes ordered after it.
    pub(crate) cut_hold: Option<(u64, u64)>,
    /// Primary: sequences given to full-stripe writes whose stripes are
    /// being written ([`reserve_direct`](Self::reserve_direct)), by write.
    /// Replication stops before the lowest one until its record is queued
    /// (the secondary accepts sequences only in order).
    reserved: BTreeMap<WriteId, u64>,
}

impl PartitionCore {
    /// A core with an empty index, in `role` at `epoch`.
    pub fn new(
        partition: PartitionId,
        first_block: u64,
        size_blocks: u64,
        role: Role,
        epoch: u64,
    ) -> Self {
        Self {
            partition,
            first_block,
            size_blocks,
            role,
            epoch,
            index: PartitionIndex::new(partition, size_blocks),
            next_sequence: 1,
            applied_through: 0,
            applied_above: BTreeSet::new(),
            pending_trims: BTreeMap::new(),
            retained: BTreeMap::new(),
            inflight_holds: BTreeMap::new(),
            repl_queue: VecDeque::new(),
            pending_commits: VecDeque::new(),
            parked_commits: VecDeque::new(),
            acked_through: 0,
            sent_through: 0,
            stopped: false,
            secondary_at_front: false,
            owed_through: 0,
            flush_queued_through: 0,
            flush_confirmed_through: 0,
            writes: BTreeMap::new(),
            next_write: 0,
            replica_busy: false,
            oldest_unflushed: None,
            snapshot_markers: BTreeMap::new(),
            cut_hold: None,
            reserved: BTreeMap::new(),
        }
    }

    // ----- accessors -------------------------------------------------------

    /// The partition.
    pub fn partition(&self) -> PartitionId {
        self.partition
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Primary: its epoch; secondary: the highest epoch seen.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The index.
    pub fn index(&self) -> &PartitionIndex {
        &self.index
    }

    /// Primary: next sequence to assign; secondary: next expected.
    pub fn next_sequence(&self) -> u64 {
        self.next_sequence
    }

    /// Every sequence up to here is applied or abandoned.
    pub fn applied_through(&self) -> u64 {
        self.applied_through
    }

    /// Primary: highest sequence the secondary confirmed.
    pub fn acked_through(&self) -> u64 {
        self.acked_through
    }

    /// Replication stopped (fenced or shut down).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Primary: every record this primary acknowledged is on the secondary
    /// or on the sleds: the secondary is at the queue's front
    /// ([`secondary_at_front`](Self::secondary_at_front)) *and* confirmed a
    /// flush commit covering whatever it was jumped over
    /// ([`owed_through`](Self::owed_through)). The driver reports it to the
    /// control plane, which promotes only an in-sync secondary.
    pub fn secondary_in_sync(&self) -> bool {
        self.secondary_at_front && self.flush_confirmed_through >= self.owed_through
    }

    /// Primary: whether a flush commit at watermark `up_to` with nothing to
    /// move is worth queuing: something is owed and no commit at least as
    /// high is queued yet (a watermark still below what is owed, because
    /// writes are not applied yet, is queued once, not at every check).
    pub fn owed_commit_worth(&self, up_to: u64) -> bool {
        self.owes_flush() && up_to > self.flush_queued_through
    }

    /// Primary: the secondary is at the replication queue's front (new
    /// writes go to it as appends; the replicator stops probing).
    pub fn secondary_at_front(&self) -> bool {
        self.secondary_at_front
    }

    /// Primary: the secondary is owed a flush commit up to this sequence
    /// (0: nothing owed; see [`secondary_in_sync`](Self::secondary_in_sync)).
    pub fn owed_through(&self) -> u64 {
        self.owed_through
    }

    /// Primary: a flush must commit a watermark of at least
    /// [`owed_through`](Self::owed_through) (none queued yet), even with
    /// nothing left to move.
    pub fn owes_flush(&self) -> bool {
        matches!(self.role, Role::Primary)
            && !self.stopped
            && self.owed_through > self.flush_queued_through
    }

    /// Writes in the range table (queued, admitted or committing).
    pub fn writes_in_table(&self) -> usize {
        self.writes.len()
    }

    fn not_primary(&self) -> PartitionError {
        PartitionError::NotPrimary {
            partition: self.partition,
        }
    }

    fn index_error(&self, source: IndexError) -> PartitionError {
        PartitionError::Index {
            partition: self.partition,
            source,
        }
    }

    /// Primary check: role and (if given) the request's epoch.
    pub fn check_primary(&self, epoch: Option<u64>) -> Result<(), PartitionError> {
        if !matches!(self.role, Role::Primary) {
            return Err(self.not_primary());
        }
        match epoch {
            Some(requested) if requested != self.epoch => Err(PartitionError::StaleEpoch {
                partition: self.partition,
                requested,
                current: self.epoch,
            }),
            _ => Ok(()),
        }
    }

    // ----- applied watermark and log holds ----------------------------------

    /// Marks `sequence` applied (or abandoned).
    pub(crate) fn mark_applied(&mut self, sequence: u64) {
        if sequence <= self.applied_through {
            return;
        }
        self.applied_above.insert(sequence);
        while self.applied_above.remove(&(self.applied_through + 1)) {
            self.applied_through += 1;
        }
    }

    /// Takes a hold at `position` (an append in flight starts at or after
    /// it).
    pub fn add_hold(&mut self, position: LogPosition) {
        *self.inflight_holds.entry(position).or_default() += 1;
    }

    /// Drops one hold taken with [`add_hold`](Self::add_hold) at
    /// `position`. Holds are counted per position: removing one that was
    /// never taken would drop another holder's and let the log be released
    /// under its records.
    pub fn remove_hold(&mut self, position: LogPosition) {
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

    /// The oldest in-flight hold.
    pub fn oldest_hold(&self) -> Option<LogPosition> {
        self.inflight_holds.keys().next().copied()
    }

    /// Oldest log position this partition still needs.
    pub fn log_hold(&self) -> Option<LogPosition> {
        // A secondary keeps its whole unflushed tail (everything after the
        // last flush commit): it is what a promotion replays and what the
        // next secondary is caught up from, with no hole in the sequences.
        let acked = if matches!(self.role, Role::Secondary) {
            0
        } else {
            self.acked_through
        };
        [
            self.index.oldest_log_position(),
            self.oldest_hold(),
            self.pending_trims.values().map(|t| t.position).min(),
            self.retained.range(acked + 1..).map(|(_, p)| *p).min(),
            self.snapshot_markers.values().min().copied(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// What [`log_hold`](Self::log_hold) is made of, each part's oldest
    /// position (`None`: that part holds nothing): the diagnostic of a full
    /// log ([`LogHolds`]).
    pub fn log_holds(&self) -> LogHolds {
        let acked = if matches!(self.role, Role::Secondary) {
            0
        } else {
            self.acked_through
        };
        LogHolds {
            index: self.index.oldest_log_position(),
            in_flight: self.oldest_hold(),
            trims: self.pending_trims.values().map(|t| t.position).min(),
            unconfirmed: self.retained.range(acked + 1..).map(|(_, p)| *p).min(),
            markers: self.snapshot_markers.values().min().copied(),
            writes_in_table: self.writes.len(),
        }
    }

    /// The log released everything below `tail`: drops it from the
    /// catch-up list. Panics if anything the partition needs was below
    /// (invariant 4).
    pub fn forget_released(&mut self, tail: LogPosition) {
        let oldest_indexed = self.index.oldest_log_position();
        assert!(
            oldest_indexed.is_none_or(|p| p >= tail),
            "partition {:?}: the log was released to {} under a record the index maps ({oldest_indexed:?})",
            self.partition,
            tail.0
        );
        let oldest_held = self.oldest_hold();
        assert!(
            oldest_held.is_none_or(|p| p >= tail),
            "partition {:?}: the log was released to {} under a held position ({oldest_held:?})",
            self.partition,
            tail.0
        );
        debug_assert!(
            self.log_hold().is_none_or(|hold| hold >= tail),
            "partition {:?}: the log was released to {} under its hold {:?}",
            self.partition,
            tail.0,
            self.log_hold()
        );
        self.retained.retain(|_, position| *position >= tail);
    }

    /// Whether a flush is due at `now`: the secondary is owed a flush
    /// commit ([`owes_flush`](Self::owes_flush)), the shared log is fuller
    /// than `fill_ratio` (`fill` is its current fill), or the oldest
    /// unflushed write is older than `age`.
    pub fn flush_due(&self, now: Instant, fill: f64, fill_ratio: f64, age: Duration) -> bool {
        // What the secondary is owed goes first: until it is on the sleds,
        // the owed tail is in this log only and the pair is not in sync.
        self.owes_flush()
            || fill > fill_ratio
            || self
                .oldest_unflushed
                .is_some_and(|t| now.saturating_duration_since(t) >= age)
    }

    /// The next flush batch: log-resident runs up to `limit_blocks`, the
    /// pending trims up to the batch's watermark, the watermark, and
    /// whether more runs remain.
    ///
    /// The watermark (`up_to` of the batch's flush commit) is the applied
    /// watermark, lowered below the oldest log-resident run this batch
    /// leaves for the next one: a secondary that is behind jumps to `up_to`
    /// on the commit, and drops its trims up to it, so `up_to` must never
    /// cover a record the sleds do not hold yet.
    pub fn flush_plan(&self, limit_blocks: u64) -> FlushPlan {
        let limit = limit_blocks.max(1);
        let mut up_to = self.applied_through;
        let mut total = 0;
        let mut pieces = Vec::new();
        let mut more = false;
        for (lba, run) in self.index.runs() {
            if let Some(Location::Log {
                position,
                block_in_record,
            }) = run.location
            {
                if total >= limit {
                    more = true;
                    up_to = up_to.min(run.sequence.saturating_sub(1));
                    continue;
                }
                let block_count = run.block_count.min(limit - total);
                pieces.push(LogPiece {
                    lba,
                    block_count,
                    sequence: run.sequence,
                    position,
                    first_block_in_record: block_in_record,
                });
                total += block_count;
                if block_count < run.block_count {
                    more = true;
                    up_to = up_to.min(run.sequence.saturating_sub(1));
                }
            }
        }
        // Snapshot layers' log-resident blocks go to the sleds too (one
        // block per piece; the commit moves every layer's entry of that
        // sequence).
        for (lba, entry) in self.index.snapshot_log_entries() {
            let Some(Location::Log {
                position,
                block_in_record,
            }) = entry.location
            else {
                continue;
            };
            if total >= limit {
                more = true;
                up_to = up_to.min(entry.sequence.saturating_sub(1));
                continue;
            }
            pieces.push(LogPiece {
                lba,
                block_count: 1,
                sequence: entry.sequence,
                position,
                first_block_in_record: block_in_record,
            });
            total += 1;
        }
        let trims = self
            .pending_trims
            .range(..=up_to)
            .map(|(sequence, trim)| (*sequence, *trim))
            .collect();
        FlushPlan {
            pieces,
            trims,
            up_to_sequence: up_to,
            more,
        }
    }

    /// A flush batch planned by [`flush_plan`](Self::flush_plan) is
    /// durable on the sleds: `placed` names where each block went
    /// (partition block, the write's sequence, its sled location; one
    /// block each), `trims` the pending trims its summaries recorded.
    /// Moves the blocks still at that version to the sleds (newer writes
    /// win), forgets the trims, and queues the flush commit at `up_to` for
    /// the secondary (parked behind an uncheckpointed snapshot marker).
    /// Returns the blocks moved. The engine's flush (`flush.rs`) does the
    /// same under the partition lock, interleaved with GC relocations; the
    /// seeded simulation commits its flushes through this.
    pub fn commit_flushed(
        &mut self,
        placed: &[(u64, u64, Location)],
        trims: &[u64],
        up_to: u64,
    ) -> Result<u64, PartitionError> {
        if !matches!(self.role, Role::Primary) || self.stopped {
            return Err(self.not_primary());
        }
        if up_to > self.applied_through {
            return Err(PartitionError::BadRequest {
                partition: self.partition,
                reason: format!(
                    "flush commit up to {up_to}, applied through {}",
                    self.applied_through
                ),
            });
        }
        let mut moved = 0;
        let mut mappings: Vec<FlushedRange> = Vec::new();
        for (lba, sequence, location) in placed {
            let Location::Sled {
                extent,
                column,
                offset_bytes,
            } = *location
            else {
                return Err(PartitionError::BadRequest {
                    partition: self.partition,
                    reason: format!("block {lba} flushed to {location:?}"),
                });
            };
            moved += self
                .index
                .apply_flush(*lba, 1, *sequence, *location)
                .map_err(|e| self.index_error(e))?;
            mappings.push(FlushedRange {
                lba: self.first_block + lba,
                blocks: 1,
                sequence: *sequence,
                extent,
                column,
                offset_bytes,
            });
        }
        for sequence in trims {
            self.pending_trims.remove(sequence);
        }
        let commit = ReplicaRequest::FlushCommit {
            partition: self.partition,
            epoch: self.epoch,
            up_to_sequence: up_to,
            mappings,
        };
        self.queue_flush_commit(up_to, commit);
        Ok(moved)
    }

    /// Recovery from the sleds built `index` (newest checkpoint plus the
    /// rows after it, or every summary; the highest sequence it saw is
    /// `highest_sequence`): it replaces this core's index before the log's
    /// records are replayed or a take-over's are adopted over it. New
    /// sequences continue after `highest_sequence`, so that a sequence a row
    /// holds (a full-stripe write whose record never reached a log) is never
    /// given to another write.
    pub fn install_recovered_index(&mut self, index: PartitionIndex, highest_sequence: u64) {
        self.index = index;
        self.next_sequence = self.next_sequence.max(highest_sequence + 1);
    }

    // ----- primary: the range table -----------------------------------------

    /// A write over partition blocks `blocks` arrives: it is ready at once
    /// unless an earlier write in the table overlaps it.
    pub fn admit(&mut self, blocks: Range<u64>) -> Admission {
        let id = WriteId(self.next_write);
        self.next_write += 1;
        let busy = self.overlaps_earlier(id, &blocks);
        self.writes.insert(
            id,
            WriteSlot {
                blocks,
                stage: if busy { Stage::Queued } else { Stage::Admitted },
                detached: false,
            },
        );
        if busy {
            Admission::Queued(id)
        } else {
            Admission::Ready(id)
        }
    }

    fn overlaps_earlier(&self, id: WriteId, blocks: &Range<u64>) -> bool {
        self.writes
            .range(..id)
            .any(|(_, slot)| slot.blocks.start < blocks.end && blocks.start < slot.blocks.end)
    }

    /// The id the next write will get: [`writes_before`](Self::writes_before)
    /// of it tells whether every write that arrived so far is resolved.
    pub fn write_mark(&self) -> WriteId {
        WriteId(self.next_write)
    }

    /// Whether a write that arrived before `mark` is still in the table
    /// (the host `Flush` barrier waits for none).
    pub fn writes_before(&self, mark: WriteId) -> bool {
        self.writes.range(..mark).next().is_some()
    }

    /// Whether write `id` may go on (admitted or further).
    pub fn is_admitted(&self, id: WriteId) -> bool {
        self.writes
            .get(&id)
            .is_some_and(|slot| !matches!(slot.stage, Stage::Queued))
    }

    /// The host side of write `id` is done (answered, timed out or
    /// cancelled). A write whose commit is not resolved stays in the table
    /// (its range stays locked) until it is. Returns the writes this made
    /// ready.
    pub fn end_write(&mut self, id: WriteId) -> Vec<WriteId> {
        self.void_reservation(id);
        let Some(slot) = self.writes.get_mut(&id) else {
            return Vec::new();
        };
        if let Stage::Committing(commit) = &slot.stage {
            if !commit.done {
                slot.detached = true;
                return Vec::new();
            }
        }
        self.writes.remove(&id);
        self.promote_queued()
    }

    /// Queued writes with no earlier overlapping write left become ready.
    fn promote_queued(&mut self) -> Vec<WriteId> {
        let queued: Vec<WriteId> = self
            .writes
            .iter()
            .filter(|(_, s)| matches!(s.stage, Stage::Queued))
            .map(|(id, _)| *id)
            .collect();
        let mut ready = Vec::new();
        for id in queued {
            let blocks = self.writes[&id].blocks.clone();
            if !self.overlaps_earlier(id, &blocks) {
                if let Some(slot) = self.writes.get_mut(&id) {
                    slot.stage = Stage::Admitted;
                }
                ready.push(id);
            }
        }
        ready
    }

    // ----- primary: commit and the ack rule ----------------------------------

    /// Assigns sequences to write `id`'s `changes`, takes a log hold at
    /// `head` (the log's head now: the append lands at or after it) and
    /// queues the records for the secondary. `NotPrimary` if the role
    /// ended (the write is dropped from the table: call
    /// [`end_write`](Self::end_write) as usual).
    pub fn start_commit(
        &mut self,
        id: WriteId,
        changes: Vec<Change>,
        head: LogPosition,
        now: Instant,
    ) -> Result<CommitPlan, PartitionError> {
        if !matches!(self.role, Role::Primary) || self.stopped {
            return Err(self.not_primary());
        }
        if !self.is_admitted(id) {
            return Err(PartitionError::BadRequest {
                partition: self.partition,
                reason: format!("write {id:?} committed before its range was free"),
            });
        }
        self.check_snapshot_changes(&changes)?;
        let direct = changes.iter().any(|c| matches!(c, Change::Direct { .. }));
        let reserved = self.reserved.get(&id).copied();
        if direct && (changes.len() != 1 || reserved.is_none()) {
            return Err(PartitionError::BadRequest {
                partition: self.partition,
                reason: format!(
                    "write {id:?}: a direct record goes alone, at its reserved sequence"
                ),
            });
        }
        if let (Some(sequence), Some(Change::Direct { mappings, .. })) = (reserved, changes.first())
        {
            // The stripes are durable on every present column: reads may
            // see the blocks from now on (the driver holds the flush lock,
            // so no checkpoint sees the rows without this mapping).
            self.map_direct(sequence, mappings)?;
        }
        self.add_hold(head);
        self.reserved.remove(&id);
        let mut records = Vec::with_capacity(changes.len());
        for (i, change) in changes.into_iter().enumerate() {
            // A reserved sequence (a full-stripe write, or its fallback to
            // the log) goes to the first record; the rest follow it.
            let sequence = match reserved {
                Some(sequence) if i == 0 => sequence,
                _ => {
                    self.next_sequence += 1;
                    self.next_sequence - 1
                }
            };
            let (log, replica) = match change {
                Change::Direct { lba, mappings } => {
                    let payload: Bytes = super::flush::encode_commit(sequence, &mappings).into();
                    let replica = ReplicaRecord {
                        sequence,
                        kind: ReplicaRecordKind::Direct,
                        lba: self.first_block + lba,
                        blocks: 0,
                        crcs: Vec::new(),
                        data: payload.clone(),
                    };
                    let log = LogRecord {
                        kind: RecordKind::Direct,
                        partition: self.partition,
                        epoch: self.epoch,
                        sequence,
                        lba,
                        block_count: 0,
                        payload,
                    };
                    (log, replica)
                }
                Change::Write { lba, data } => {
                    let blocks = data.len() as u64 / BLOCK_SIZE_BYTES;
                    let replica = ReplicaRecord {
                        sequence,
                        kind: ReplicaRecordKind::Write,
                        lba: self.first_block + lba,
                        blocks: blocks as u32,
                        crcs: crate::wal::format::block_crcs(&data),
                        data: data.clone(),
                    };
                    let log = LogRecord::write(self.partition, self.epoch, sequence, lba, data);
                    (log, replica)
                }
                Change::Unmap { lba, count } => {
                    let replica = ReplicaRecord {
                        sequence,
                        kind: ReplicaRecordKind::Unmap,
                        lba: self.first_block + lba,
                        blocks: count as u32,
                        crcs: Vec::new(),
                        data: Bytes::new(),
                    };
                    let log =
                        LogRecord::trim(self.partition, self.epoch, sequence, lba, count as u32);
                    (log, replica)
                }
                Change::Snapshot { id, op, hold } => {
                    if op == MarkerOp::Cut {
                        // Registered now, under the lock that orders every
                        // write: whatever is ordered after the cut finds
                        // the layer when it is applied. Cannot fail here:
                        // `check_snapshot_changes` refused an existing id,
                        // and nothing applied is at or after `sequence`.
                        if let Err(source) = self.index.add_snapshot(id, sequence) {
                            debug_assert!(false, "cut refused after the checks: {source}");
                        }
                        if hold {
                            self.cut_hold = Some((id, sequence));
                        }
                    }
                    let marker = SnapshotMarker { id, op }.encode();
                    let replica = ReplicaRecord {
                        sequence,
                        kind: ReplicaRecordKind::Snapshot,
                        lba: self.first_block,
                        blocks: 0,
                        crcs: Vec::new(),
                        data: marker.clone(),
                    };
                    (self.marker_record(sequence, marker), replica)
                }
            };
            self.queue_replica(replica);
            records.push(log);
        }
        if !direct {
            self.oldest_unflushed.get_or_insert(now);
        }
        if let Some(slot) = self.writes.get_mut(&id) {
            slot.stage = Stage::Committing(Commit {
                records: records.clone(),
                hold: head,
                local: None,
                resolved: false,
                done: false,
            });
        }
        Ok(CommitPlan {
            records,
            replicate: true,
        })
    }

    /// Gives admitted write `id` the next sequence before anything is
    /// logged: a full-stripe write writes its stripes with it (the sleds'
    /// summaries carry it), then commits its index record
    /// ([`Change::Direct`]) or, if the stripes failed, its blocks through
    /// the log, at this sequence ([`start_commit`](Self::start_commit)).
    /// Until then replication stops before it. The caller must end the
    /// reservation one of these ways or with
    /// [`end_write`](Self::end_write) (which voids it).
    pub fn reserve_direct(&mut self, id: WriteId) -> Result<u64, PartitionError> {
        if !matches!(self.role, Role::Primary) || self.stopped {
            return Err(self.not_primary());
        }
        if !self.is_admitted(id) || self.reserved.contains_key(&id) {
            return Err(PartitionError::BadRequest {
                partition: self.partition,
                reason: format!("write {id:?} reserved before its range was free, or twice"),
            });
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.reserved.insert(id, sequence);
        Ok(sequence)
    }

    /// Points the index at the sled copy of a direct write at `sequence`
    /// (newest sequence wins). Refuses a mapping outside the partition or
    /// at another sequence.
    fn map_direct(
        &mut self,
        sequence: u64,
        mappings: &[FlushedRange],
    ) -> Result<(), PartitionError> {
        for m in mappings {
            let lba = m
                .lba
                .checked_sub(self.first_block)
                .filter(|lba| lba + u64::from(m.blocks) <= self.size_blocks)
                .filter(|_| m.sequence == sequence)
                .ok_or_else(|| PartitionError::BadRequest {
                    partition: self.partition,
                    reason: format!(
                        "direct mapping {m:?} outside the partition or not at {sequence}"
                    ),
                })?;
            self.index
                .apply_write(
                    lba,
                    u64::from(m.blocks),
                    sequence,
                    Location::Sled {
                        extent: m.extent,
                        column: m.column,
                        offset_bytes: m.offset_bytes,
                    },
                )
                .map_err(|e| self.index_error(e))?;
        }
        Ok(())
    }

    /// The sequence reserved for write `id`, if any.
    pub fn reserved_sequence(&self, id: WriteId) -> Option<u64> {
        self.reserved.get(&id).copied()
    }

    /// The lowest sequence reserved and not yet queued for the secondary.
    fn replication_stop(&self) -> u64 {
        self.reserved.values().min().copied().unwrap_or(u64::MAX)
    }

    /// Queues `record` for the secondary in sequence order (a reserved
    /// sequence arrives after later ones; none of those was sent, since
    /// replication stops before a reserved sequence).
    fn queue_replica(&mut self, record: ReplicaRecord) {
        let at = self
            .repl_queue
            .iter()
            .rposition(|r| r.sequence < record.sequence)
            .map_or(0, |i| i + 1);
        debug_assert!(record.sequence > self.sent_through.max(self.acked_through) || self.stopped);
        self.repl_queue.insert(at, record);
    }

    /// Voids write `id`'s reservation (the write ended before committing
    /// anything): the secondary gets an empty index record at that
    /// sequence, so the sequences stay contiguous; nothing maps it.
    fn void_reservation(&mut self, id: WriteId) {
        let Some(sequence) = self.reserved.remove(&id) else {
            return;
        };
        let payload: Bytes = super::flush::encode_commit(sequence, &[]).into();
        self.queue_replica(ReplicaRecord {
            sequence,
            kind: ReplicaRecordKind::Direct,
            lba: self.first_block,
            blocks: 0,
            crcs: Vec::new(),
            data: payload,
        });
        self.mark_applied(sequence);
    }

    /// The local log answered write `id`'s append: `Ok(positions)` (durable)
    /// or `Err(error)` (failed, or the driver gave up on it: the records
    /// may still reach the log, but the write is abandoned). Returns the
    /// completions this resolves (at most this write's), plus writes made
    /// ready if a detached write left the table.
    pub fn local_done(
        &mut self,
        id: WriteId,
        outcome: Result<Vec<LogPosition>, PartitionError>,
    ) -> (Vec<Completion>, Vec<WriteId>) {
        let mut completions = Vec::new();
        let Some(slot) = self.writes.get_mut(&id) else {
            return (completions, Vec::new());
        };
        let Stage::Committing(commit) = &mut slot.stage else {
            return (completions, Vec::new());
        };
        match outcome {
            Ok(positions) => commit.local = Some(Ok(positions)),
            Err(error) => {
                commit.local = Some(Err(()));
                if !commit.resolved {
                    commit.resolved = true;
                    completions.push(Completion {
                        write: id,
                        result: Err(error),
                    });
                }
            }
        }
        let mut ready = Vec::new();
        self.settle(id, &mut completions, &mut ready);
        (completions, ready)
    }

    /// Applies write `id` if both copies are durable, or cleans it up if it
    /// is resolved and its local append answered.
    fn settle(&mut self, id: WriteId, completions: &mut Vec<Completion>, ready: &mut Vec<WriteId>) {
        let acked = self.acked_through;
        let primary = matches!(self.role, Role::Primary) && !self.stopped;
        let held_after = self.cut_hold.map(|(_, cut)| cut);
        let Some(slot) = self.writes.get_mut(&id) else {
            return;
        };
        let detached = slot.detached;
        let Stage::Committing(commit) = &mut slot.stage else {
            return;
        };
        if commit.done {
            return;
        }
        // A held cut keeps the writes ordered after it waiting (durable,
        // not acknowledged) until it is released.
        let held = held_after.is_some_and(|cut| commit.first_sequence() > cut);
        let apply = match &commit.local {
            None => return,
            Some(Ok(_)) if !commit.resolved && primary && held => return,
            Some(Ok(_)) if !commit.resolved && primary && commit.last_sequence() <= acked => true,
            Some(Ok(_)) if !commit.resolved => return,
            Some(_) => false,
        };
        let records = std::mem::take(&mut commit.records);
        let hold = commit.hold;
        let positions = match commit.local.take() {
            Some(Ok(positions)) => positions,
            _ => Vec::new(),
        };
        commit.resolved = true;
        commit.done = true;
        if apply {
            let result = self.apply_logged(&records, &positions);
            completions.push(Completion { write: id, result });
        }
        self.remove_hold(hold);
        for record in &records {
            self.mark_applied(record.sequence);
        }
        if detached {
            self.writes.remove(&id);
            ready.extend(self.promote_queued());
        }
    }

    /// Points the index at records durable on both logs.
    fn apply_logged(
        &mut self,
        records: &[LogRecord],
        positions: &[LogPosition],
    ) -> Result<(), PartitionError> {
        let mut outcome = Ok(());
        for (record, position) in records.iter().zip(positions) {
            let applied = match record.kind {
                RecordKind::Write => index_logged_write(&mut self.index, record, *position),
                RecordKind::Snapshot => self.apply_marker(record, *position),
                // Mapped at `start_commit`, when the stripes were durable
                // (GC may have moved them since): nothing to map again.
                RecordKind::Direct => Ok(()),
                _ => {
                    let trim = PendingTrim::of(record, *position);
                    self.pending_trims.insert(record.sequence, trim);
                    self.index.apply_unmap(
                        record.lba,
                        u64::from(record.block_count),
                        record.sequence,
                    )
                }
            };
            if let Err(source) = applied {
                outcome = Err(self.index_error(source));
            }
            self.retained.insert(record.sequence, *position);
        }
        outcome
    }

    /// Completes every committing write whose records are durable locally
    /// and confirmed by the secondary.
    pub(super) fn settle_all(&mut self) -> (Vec<Completion>, Vec<WriteId>) {
        let ids: Vec<WriteId> = self
            .writes
            .iter()
            .filter(|(_, s)| matches!(s.stage, Stage::Committing(_)))
            .map(|(id, _)| *id)
            .collect();
        let mut completions = Vec::new();
        let mut ready = Vec::new();
        for id in ids {
            self.settle(id, &mut completions, &mut ready);
        }
        (completions, ready)
    }

    // ----- primary: replication ----------------------------------------------

    /// The next `Append` of records after those already sent (at most
    /// [`BATCH_RECORDS`] / [`BATCH_BYTES`]), or `None` (nothing to send,
    /// stopped, or a flush commit must go first, alone).
    pub fn next_append(&mut self) -> Option<ReplicaRequest> {
        if !matches!(self.role, Role::Primary) || self.stopped || !self.pending_commits.is_empty() {
            return None;
        }
        self.sent_through = self.sent_through.max(self.acked_through);
        let sent = self.sent_through;
        let stop = self.replication_stop();
        let mut bytes = 0;
        let records: Vec<ReplicaRecord> = self
            .repl_queue
            .iter()
            .skip_while(|r| r.sequence <= sent)
            .take_while(|r| r.sequence < stop)
            .enumerate()
            .take_while(|(i, r)| {
                bytes += r.data.len();
                *i == 0 || bytes <= BATCH_BYTES
            })
            .take(BATCH_RECORDS)
            .map(|(_, r)| r.clone())
            .collect();
        let last = records.last()?.sequence;
        self.sent_through = last;
        Some(ReplicaRequest::Append {
            partition: self.partition,
            epoch: self.epoch,
            records,
        })
    }

    /// The oldest unconfirmed flush commit, sent alone when no `Append` is
    /// outstanding.
    pub fn next_commit(&self) -> Option<ReplicaRequest> {
        if !matches!(self.role, Role::Primary) || self.stopped {
            return None;
        }
        self.pending_commits.front().cloned()
    }

    /// Whether replication has anything to send.
    pub fn has_replication_work(&self) -> bool {
        !self.pending_commits.is_empty()
            || self.repl_queue.iter().any(|r| {
                r.sequence > self.sent_through.max(self.acked_through)
                    && r.sequence < self.replication_stop()
            })
    }

    /// A send failed or was refused: what is outstanding is dropped, the
    /// next `Append` starts after the last confirmed sequence (the
    /// secondary skips the duplicates a resend brings).
    pub fn replication_failed(&mut self) {
        self.sent_through = self.acked_through;
    }

    /// The secondary confirmed a flush commit (the front of the queue).
    pub fn on_committed(&mut self) {
        if let Some(ReplicaRequest::FlushCommit {
            up_to_sequence,
            mappings,
            ..
        }) = self.pending_commits.pop_front()
        {
            if !is_jump(&mappings) {
                self.flush_confirmed_through = self.flush_confirmed_through.max(up_to_sequence);
            }
        }
    }

    /// A flush commit at watermark `up_to` was queued for the secondary
    /// (pending or parked): an owed flush is no longer due.
    pub(crate) fn note_flush_queued(&mut self, up_to: u64) {
        self.flush_queued_through = self.flush_queued_through.max(up_to);
    }

    /// The secondary holds every sequence up to `up_to`: drops them from
    /// the queue and completes the writes durable on both logs.
    pub fn on_appended(&mut self, up_to: u64) -> (Vec<Completion>, Vec<WriteId>) {
        while self.repl_queue.front().is_some_and(|r| r.sequence <= up_to) {
            self.repl_queue.pop_front();
        }
        self.acked_through = self.acked_through.max(up_to);
        // The secondary accepts records in sequence order only (holes are
        // refused with `Gap`), so holding `up_to` means it is at the
        // queue's front; whatever a catch-up jumped it over is owed
        // (`owed_through`) until a flush commit covers it.
        self.secondary_at_front = true;
        self.settle_all()
    }

    /// A secondary that expects sequence `expected` (a `Gap`, a status
    /// probe, a catch-up round): whether it is at the queue's front (and
    /// records it). "Expects X" does not mean "holds everything below X"
    /// (a jump moves it over records this log may still hold): that is
    /// [`secondary_in_sync`](Self::secondary_in_sync)'s business.
    pub fn note_secondary_expects(&mut self, expected: u64) -> bool {
        if matches!(self.role, Role::Primary)
            && !self.stopped
            && matches!(self.catch_up_plan(expected), CatchUp::Caught)
        {
            self.secondary_at_front = true;
        }
        self.secondary_at_front
    }

    /// What to send a secondary that expects sequence `expected`.
    pub fn catch_up_plan(&self, expected: u64) -> CatchUp {
        // A reserved sequence not queued yet (a full-stripe write's
        // stripes in flight) is the front too: its record still goes to
        // the secondary, so no jump may move the secondary past it.
        let front = self
            .repl_queue
            .front()
            .map_or(self.next_sequence, |r| r.sequence)
            .min(self.replication_stop());
        if expected >= front {
            return CatchUp::Caught;
        }
        // Records this log still holds below the front: the secondary jumps
        // to the front and is owed a flush commit over them (the tail is
        // flushed instead of shipped; see the module docs of `replica`).
        if self.retained.range(expected..front).next().is_some() {
            return CatchUp::Owe { up_to: front - 1 };
        }
        // Sequences from `expected` up to the next one this log still has
        // (and at most the applied watermark) are flushed, superseded or
        // abandoned writes: a flush commit moves the secondary past them.
        // This covers a released prefix and the holes a take-over leaves
        // (it replays only the records still needed).
        let next_retained = self
            .retained
            .range(expected..)
            .next()
            .map_or(front, |(s, _)| *s);
        let released_through = next_retained
            .min(self.applied_through + 1)
            .saturating_sub(1);
        if expected <= released_through {
            return CatchUp::Skip {
                up_to: released_through,
            };
        }
        CatchUp::Lost
    }

    /// The jump of [`CatchUp::Owe`]: records that the secondary is owed a
    /// flush commit up to `up_to` (from now on, whether or not the jump
    /// arrives: the pair is out of sync until such a commit is confirmed)
    /// and returns the jump ([`jump_request`](Self::jump_request)). The
    /// driver starts a flush at once.
    pub fn jump_owed(&mut self, up_to: u64) -> ReplicaRequest {
        self.owed_through = self.owed_through.max(up_to);
        self.jump_request(up_to)
    }

    /// The catch-up's jump of the secondary's expected sequence to
    /// `up_to + 1`: a `FlushCommit` whose only mapping is the jump marker
    /// ([`is_jump`]). Unlike a flush's commit it does not tell the
    /// secondary that its trims and tail below `up_to` are on the sleds.
    pub fn jump_request(&self, up_to: u64) -> ReplicaRequest {
        ReplicaRequest::FlushCommit {
            partition: self.partition,
            epoch: self.epoch,
            up_to_sequence: up_to,
            mappings: vec![jump_marker(up_to)],
        }
    }

    /// The replication form of one of this partition's log records (a
    /// catch-up resend).
    pub fn replica_record(&self, record: &LogRecord) -> ReplicaRecord {
        let write = record.kind == RecordKind::Write;
        if record.kind == RecordKind::Direct {
            return ReplicaRecord {
                sequence: record.sequence,
                kind: ReplicaRecordKind::Direct,
                lba: self.first_block + record.lba,
                blocks: 0,
                crcs: Vec::new(),
                data: record.payload.clone(),
            };
        }
        if record.kind == RecordKind::Snapshot {
            return ReplicaRecord {
                sequence: record.sequence,
                kind: ReplicaRecordKind::Snapshot,
                lba: self.first_block,
                blocks: 0,
                crcs: Vec::new(),
                data: record.payload.clone(),
            };
        }
        ReplicaRecord {
            sequence: record.sequence,
            kind: if write {
                ReplicaRecordKind::Write
            } else {
                ReplicaRecordKind::Unmap
            },
            lba: self.first_block + record.lba,
            blocks: record.block_count,
            crcs: if write {
                crate::wal::format::block_crcs(&record.payload)
            } else {
                Vec::new()
            },
            data: if write {
                record.payload.clone()
            } else {
                Bytes::new()
            },
        }
    }

    /// A newer epoch owns the partition: stop acknowledging at once. Every
    /// write in flight completes `NotPrimary` now (its log hold stays until
    /// its local append answers).
    pub fn fence(&mut self, current: u64) -> (Vec<Completion>, Vec<WriteId>) {
        if matches!(self.role, Role::Primary) {
            self.role = Role::Fenced { current };
        }
        self.stop()
    }

    /// Stops replication (shutdown, fence): every write in flight
    /// completes `NotPrimary`.
    pub fn stop(&mut self) -> (Vec<Completion>, Vec<WriteId>) {
        self.stopped = true;
        let partition = self.partition;
        let mut completions = Vec::new();
        for (id, slot) in &mut self.writes {
            if let Stage::Committing(commit) = &mut slot.stage {
                if !commit.resolved {
                    commit.resolved = true;
                    completions.push(Completion {
                        write: *id,
                        result: Err(PartitionError::NotPrimary { partition }),
                    });
                }
            }
        }
        let (more, ready) = self.settle_all();
        completions.extend(more);
        (completions, ready)
    }

    // ----- secondary ----------------------------------------------------------

    /// Starts handling one replication request whose first record is
    /// `first` (appends), unless another one is being handled or (before
    /// `give_up`) it starts past the next expected sequence. The driver
    /// waits and retries on `false`, and calls
    /// [`replica_leave`](Self::replica_leave) when done.
    pub fn replica_try_enter(&mut self, first: Option<u64>, give_up: bool) -> bool {
        if self.replica_busy {
            return false;
        }
        let ready = first.is_none_or(|first| first <= self.next_sequence);
        if !ready && !give_up {
            return false;
        }
        self.replica_busy = true;
        true
    }

    /// Ends what [`replica_try_enter`](Self::replica_try_enter) started.
    pub fn replica_leave(&mut self) {
        self.replica_busy = false;
    }

    /// Epoch check shared by every mutating replication request: refuse
    /// lower, adopt higher.
    pub fn replica_check_epoch(&mut self, epoch: u64) -> Result<(), ReplicaError> {
        if !matches!(self.role, Role::Secondary) {
            return Err(ReplicaError::NotSecondary);
        }
        if epoch < self.epoch {
            return Err(ReplicaError::StaleEpoch {
                current: self.epoch,
            });
        }
        self.epoch = epoch;
        Ok(())
    }

    /// Secondary: plans logging `records` of an `Append` at `epoch`
    /// (duplicates skipped, a hole refused with `Gap`), taking a hold at
    /// the log's `head`.
    pub fn replica_begin_append(
        &mut self,
        epoch: u64,
        records: Vec<ReplicaRecord>,
        head: LogPosition,
    ) -> Result<ReplicaAppend, ReplicaError> {
        self.replica_check_epoch(epoch)?;
        let bad = |reason: String| ReplicaError::BadRequest { reason };
        let expected = self.next_sequence;
        let mut log_records = Vec::new();
        let fresh = records.into_iter().filter(|r| r.sequence >= expected);
        for (next, record) in (expected..).zip(fresh) {
            if record.sequence != next {
                return Err(ReplicaError::Gap {
                    expected_sequence: next,
                });
            }
            let lba = record
                .lba
                .checked_sub(self.first_block)
                .filter(|lba| lba + u64::from(record.blocks) <= self.size_blocks)
                .ok_or_else(|| bad(format!("record {} outside the partition", record.sequence)))?;
            let log = match record.kind {
                ReplicaRecordKind::Write => LogRecord::write_with_crcs(
                    self.partition,
                    epoch,
                    record.sequence,
                    lba,
                    record.data,
                    &record.crcs,
                )
                .map_err(|e| bad(e.to_string()))?,
                ReplicaRecordKind::Unmap => {
                    LogRecord::trim(self.partition, epoch, record.sequence, lba, record.blocks)
                }
                ReplicaRecordKind::Direct => {
                    if record.blocks != 0
                        || super::flush::decode_commit(&record.data)
                            .is_none_or(|(s, _)| s != record.sequence)
                    {
                        return Err(bad(format!(
                            "record {} is no direct write's index record",
                            record.sequence
                        )));
                    }
                    LogRecord {
                        kind: RecordKind::Direct,
                        partition: self.partition,
                        epoch,
                        sequence: record.sequence,
                        lba,
                        block_count: 0,
                        payload: record.data,
                    }
                }
                ReplicaRecordKind::Snapshot => {
                    if record.blocks != 0 || SnapshotMarker::decode(&record.data).is_none() {
                        return Err(bad(format!(
                            "record {} is no snapshot marker",
                            record.sequence
                        )));
                    }
                    LogRecord {
                        kind: RecordKind::Snapshot,
                        partition: self.partition,
                        epoch,
                        sequence: record.sequence,
                        lba: 0,
                        block_count: 0,
                        payload: record.data,
                    }
                }
            };
            if log.kind == RecordKind::Write
                && u64::from(log.block_count) != u64::from(record.blocks)
            {
                return Err(bad(format!("record {} block count", record.sequence)));
            }
            log_records.push(log);
        }
        if log_records.is_empty() {
            return Ok(ReplicaAppend::Nothing {
                up_to_sequence: expected - 1,
            });
        }
        self.add_hold(head);
        Ok(ReplicaAppend::Log {
            records: log_records,
            hold: head,
        })
    }

    /// Secondary: the log answered the append planned by
    /// [`replica_begin_append`](Self::replica_begin_append). Returns the
    /// `up_to_sequence` to confirm.
    pub fn replica_appended(
        &mut self,
        records: &[LogRecord],
        hold: LogPosition,
        outcome: Result<Vec<LogPosition>, ReplicaError>,
    ) -> Result<u64, ReplicaError> {
        self.remove_hold(hold);
        let positions = outcome?;
        for (record, position) in records.iter().zip(positions) {
            if record.kind == RecordKind::Direct {
                // The blocks are on the sleds (durable on every present
                // column before the record was sent): flushed from birth,
                // so not part of the tail this secondary keeps (the shadow
                // and a promotion's recovery read them from the summaries).
                self.apply_direct(record)
                    .map_err(|error| ReplicaError::Io {
                        reason: error.to_string(),
                    })?;
                continue;
            }
            self.retained.insert(record.sequence, position);
            let count = u64::from(record.block_count);
            let applied = if record.kind == RecordKind::Write {
                index_logged_write(&mut self.index, record, position)
            } else if record.kind == RecordKind::Snapshot {
                self.apply_marker(record, position)
            } else {
                let trim = PendingTrim::of(record, position);
                self.pending_trims.insert(record.sequence, trim);
                self.index.apply_unmap(record.lba, count, record.sequence)
            };
            applied.map_err(|error| ReplicaError::Io {
                reason: error.to_string(),
            })?;
        }
        if let Some(last) = records.last() {
            if last.sequence >= self.next_sequence {
                self.next_sequence = last.sequence + 1;
                self.applied_through = last.sequence;
            }
        }
        Ok(self.next_sequence - 1)
    }

    /// Secondary: a flush commit up to `up_to` at `epoch`: forgets the
    /// trims and the tail it covers, maps the flushed ranges (advisory),
    /// moves the expected sequence past it. Returns the commit record to
    /// log (best effort: a full log only loses it).
    pub fn replica_commit(
        &mut self,
        epoch: u64,
        up_to: u64,
        mappings: &[FlushedRange],
    ) -> Result<LogRecord, ReplicaError> {
        self.replica_check_epoch(epoch)?;
        if !is_jump(mappings) {
            for m in mappings {
                // Advisory on a secondary (GC moves are not replicated): it
                // only tells which log records the sleds now hold.
                let _ = map_flushed(&mut self.index, self.first_block, m);
            }
            // A flush: every trim up to `up_to` is in a stripe summary and
            // the tail up to it is on the sleds (or superseded).
            self.pending_trims.retain(|sequence, _| *sequence > up_to);
            self.retained.retain(|sequence, _| *sequence > up_to);
            // So is every block the index still maps into the log at or
            // below it, mapped above or not: a record that came with the
            // catch-up of this secondary's join was flushed before it and
            // is named by no later commit (it held the log for good, and
            // filled it; see `PartitionIndex::forget_log_through`).
            self.index.forget_log_through(up_to);
            // A secondary writes no checkpoint: its markers are held like
            // its tail, until a flush commit covers them; the primary sends
            // such a commit only once a durable checkpoint holds the
            // markers (`PartitionCore::queue_flush_commit`), so a promoted
            // or restarted secondary always finds a cut either in its log
            // or in the sleds' newest checkpoint.
            self.snapshot_markers
                .retain(|sequence, _| *sequence > up_to);
        }
        // A jump only moves the expected sequence: the trims and the tail
        // this secondary holds below it may not be on the sleds (a late
        // copy of a jump must not drop them either).
        if up_to >= self.next_sequence {
            self.next_sequence = up_to + 1;
            self.applied_through = up_to;
        }
        Ok(LogRecord {
            kind: RecordKind::FlushCommit,
            partition: self.partition,
            epoch,
            sequence: up_to,
            lba: 0,
            block_count: 0,
            payload: super::flush::encode_commit(up_to, mappings).into(),
        })
    }

    /// Secondary: points the index at the sled copy a direct write's index
    /// record names (advisory, as a flush commit's mappings: newest
    /// sequence wins, so it never hides a newer logged block).
    fn apply_direct(&mut self, record: &LogRecord) -> Result<(), IndexError> {
        let Some((_, mappings)) = super::flush::decode_commit(&record.payload) else {
            return Ok(());
        };
        for m in &mappings {
            if let Some(mapped) = map_flushed(&mut self.index, self.first_block, m) {
                mapped?;
            }
        }
        Ok(())
    }

    /// The marker a node logs when it joins the partition as secondary at
    /// `epoch` (see [`live_records`]).
    pub fn join_marker(partition: PartitionId, epoch: u64) -> LogRecord {
        LogRecord {
            kind: RecordKind::Checkpoint,
            partition,
            epoch,
            sequence: 0,
            lba: 0,
            block_count: 0,
            payload: Bytes::from_static(JOIN_MARKER),
        }
    }

    // ----- take-over and recovery ----------------------------------------------

    /// Starts taking this instance over at `new_epoch`: a primary is fenced
    /// at once (in-flight writes complete `NotPrimary`); a secondary keeps
    /// its role until [`take_over_done`](Self::take_over_done) (the driver
    /// holds the replica slot meanwhile, so no replication of the old
    /// epoch is accepted). Refuses an epoch not above the current one.
    pub fn take_over(
        &mut self,
        new_epoch: u64,
    ) -> Result<(bool, Vec<Completion>, Vec<WriteId>), PartitionError> {
        if new_epoch <= self.epoch && !matches!(self.role, Role::Fenced { .. }) {
            return Err(PartitionError::StaleEpoch {
                partition: self.partition,
                requested: new_epoch,
                current: self.epoch,
            });
        }
        match self.role {
            Role::Secondary => Ok((true, Vec::new(), Vec::new())),
            Role::Primary => {
                self.role = Role::Fenced { current: new_epoch };
                let (completions, ready) = self.stop();
                Ok((false, completions, ready))
            }
            Role::Fenced { .. } => {
                let (completions, ready) = self.stop();
                Ok((false, completions, ready))
            }
        }
    }

    /// What the new primary takes from this instance: a pure function of
    /// its state. Only what the index and the pending trims refer to: this
    /// instance holds exactly those in the log until the new one has
    /// registered its own holds. A record of the unflushed tail that the
    /// index no longer refers to is superseded or on the sleds; this
    /// instance does not hold it, so the log may release it at any moment:
    /// replayed, it would map blocks whose sled copy has the same sequence
    /// to a log record that is gone (the stale read of ARCHITECTURE.md).
    pub fn take_over_plan(&self, was_secondary: bool) -> TakeOverPlan {
        let mut needed: BTreeSet<LogPosition> = self
            .index
            .runs()
            .filter_map(|(_, run)| match run.location {
                Some(Location::Log { position, .. }) => Some(position),
                _ => None,
            })
            .collect();
        needed.extend(self.pending_trims.values().map(|t| t.position));
        // Snapshot layers' log-resident blocks, and the markers no
        // checkpoint holds yet.
        needed.extend(
            self.index
                .snapshot_log_entries()
                .into_iter()
                .filter_map(|(_, e)| match e.location {
                    Some(Location::Log { position, .. }) => Some(position),
                    _ => None,
                }),
        );
        needed.extend(self.snapshot_markers.values().copied());
        let log_resident = LogResident {
            runs: self
                .index
                .runs()
                .filter(|(_, run)| matches!(run.location, Some(Location::Log { .. })))
                .map(|(lba, run)| (lba, *run))
                .collect(),
            trims: self.pending_trims.iter().map(|(s, t)| (*s, *t)).collect(),
            snapshots: self
                .index
                .snapshots()
                .iter()
                .map(|s| (s.id, s.cut))
                .collect(),
            layer_entries: self
                .index
                .snapshot_layers()
                .flat_map(|(id, layer)| {
                    layer
                        .entries
                        .iter()
                        .filter(|(_, e)| matches!(e.location, Some(Location::Log { .. })))
                        .map(move |(block, e)| (id, *block, *e))
                })
                .collect(),
            markers: self
                .snapshot_markers
                .iter()
                .map(|(s, p)| (*s, *p))
                .collect(),
        };
        TakeOverPlan {
            was_secondary,
            needed,
            next_sequence: self.next_sequence,
            retained: self.retained_tail(),
            log_resident,
        }
    }

    /// The own log records kept by sequence (a take-over offers them to the
    /// new secondary's catch-up).
    pub fn retained_tail(&self) -> Vec<(u64, LogPosition)> {
        self.retained.iter().map(|(s, p)| (*s, *p)).collect()
    }

    /// A take-over's new primary adopts the old instance's log-resident
    /// state ([`TakeOverPlan::log_resident`]) over what recovery from the
    /// sleds built: the same index, trims and tail as [`replay`](Self::replay)
    /// of the records it refers to (newest sequence wins, so a sled copy
    /// newer than a run keeps its place), with no log read. Sequences
    /// continue at least at `min_next_sequence`; `now` starts the age of
    /// what is left unflushed.
    pub fn adopt_log_resident(
        &mut self,
        handed: &LogResident,
        min_next_sequence: u64,
        now: Instant,
    ) -> Result<(), PartitionError> {
        let mut highest_sequence = self.next_sequence - 1;
        // Snapshots: recovery registered the handed cuts before any sled
        // row (idempotent here); one a checkpoint still held but the old
        // instance had dropped goes.
        let kept: BTreeMap<u64, u64> = handed.snapshots.iter().copied().collect();
        for info in self.index.snapshots() {
            if !kept.contains_key(&info.id) {
                self.index.drop_snapshot(info.id);
            }
        }
        for (id, cut) in &handed.snapshots {
            self.index
                .add_snapshot(*id, *cut)
                .map_err(|e| self.index_error(e))?;
        }
        for (lba, run) in &handed.runs {
            let Some(location @ Location::Log { position, .. }) = run.location else {
                return Err(PartitionError::Recovery {
                    partition: self.partition,
                    reason: format!("handed run at block {lba} does not point into the log"),
                });
            };
            self.index
                .apply_write(*lba, run.block_count, run.sequence, location)
                .map_err(|e| self.index_error(e))?;
            self.retained.entry(run.sequence).or_insert(position);
            highest_sequence = highest_sequence.max(run.sequence);
        }
        for (sequence, trim) in &handed.trims {
            self.index
                .apply_unmap(trim.lba, trim.block_count, *sequence)
                .map_err(|e| self.index_error(e))?;
            self.pending_trims.insert(*sequence, *trim);
            self.retained.entry(*sequence).or_insert(trim.position);
            highest_sequence = highest_sequence.max(*sequence);
        }
        // The layers' log-resident blocks (superseded in the live index, so
        // in no run above) come back as the old layers held them.
        for (id, block, entry) in &handed.layer_entries {
            let Some(cut) = kept.get(id) else { continue };
            self.index.restore_layer(*id, *cut, [(*block, *entry)]);
            if let Some(Location::Log { position, .. }) = entry.location {
                self.retained.entry(entry.sequence).or_insert(position);
            }
        }
        for (sequence, position) in &handed.markers {
            self.snapshot_markers.insert(*sequence, *position);
            self.retained.entry(*sequence).or_insert(*position);
            highest_sequence = highest_sequence.max(*sequence);
        }
        self.replay(false, &[], min_next_sequence.max(highest_sequence + 1), now)
    }

    /// The take-over is done: this instance is fenced for good.
    pub fn take_over_done(&mut self, new_epoch: u64) -> (Vec<Completion>, Vec<WriteId>) {
        self.role = Role::Fenced { current: new_epoch };
        self.stop()
    }

    /// After a take-over's open: offers the old instance's tail to the new
    /// secondary's catch-up (superseded or flushed: never replayed, never
    /// held; a record released meanwhile is skipped there).
    pub fn adopt_retained(&mut self, tail: &[(u64, LogPosition)]) {
        for (sequence, position) in tail {
            self.retained.entry(*sequence).or_insert(*position);
        }
    }

    /// Applies the partition's live records of a recovered log (writes and
    /// trims; a secondary also its flush commits), newest sequence wins;
    /// sequences continue after the highest seen and at least at
    /// `min_next_sequence`; a secondary adopts the highest epoch seen, a
    /// primary refuses a log with a newer epoch than its own (`Fenced`).
    /// `now` starts the age of what is left unflushed.
    pub fn replay(
        &mut self,
        secondary: bool,
        recovered: &[RecoveredRecord],
        min_next_sequence: u64,
        now: Instant,
    ) -> Result<(), PartitionError> {
        let mut highest_sequence = self.next_sequence - 1;
        let mut highest_epoch = self.epoch;
        // The cuts first: the log holds records in append order, not
        // sequence order, and a write after a cut must find its layer.
        self.register_cuts(recovered)?;
        for RecoveredRecord { position, record } in recovered {
            if record.partition != self.partition {
                continue;
            }
            highest_epoch = highest_epoch.max(record.epoch);
            match record.kind {
                RecordKind::Snapshot => {
                    self.apply_marker(record, *position)
                        .map_err(|e| self.index_error(e))?;
                    self.retained.insert(record.sequence, *position);
                    highest_sequence = highest_sequence.max(record.sequence);
                }
                RecordKind::Write => {
                    index_logged_write(&mut self.index, record, *position)
                        .map_err(|e| self.index_error(e))?;
                    self.retained.insert(record.sequence, *position);
                    highest_sequence = highest_sequence.max(record.sequence);
                }
                RecordKind::Direct => {
                    // The sled summaries are a primary's truth (recovery
                    // mapped the rows, GC may have moved them since); a
                    // secondary maps them as live.
                    if secondary {
                        self.apply_direct(record).map_err(|e| self.index_error(e))?;
                    }
                    highest_sequence = highest_sequence.max(record.sequence);
                }
                RecordKind::Trim => {
                    self.index
                        .apply_unmap(record.lba, u64::from(record.block_count), record.sequence)
                        .map_err(|e| self.index_error(e))?;
                    let trim = PendingTrim::of(record, *position);
                    self.pending_trims.insert(record.sequence, trim);
                    self.retained.insert(record.sequence, *position);
                    highest_sequence = highest_sequence.max(record.sequence);
                }
                RecordKind::FlushCommit => {
                    let Some((up_to, mappings)) = super::flush::decode_commit(&record.payload)
                    else {
                        return Err(PartitionError::Recovery {
                            partition: self.partition,
                            reason: format!("flush commit at {} undecodable", position.0),
                        });
                    };
                    // As live (`replica_commit`): a catch-up jump is not a
                    // flush of what came before it.
                    let jump = is_jump(&mappings);
                    highest_sequence = highest_sequence.max(up_to);
                    if !jump {
                        self.pending_trims.retain(|sequence, _| *sequence > up_to);
                    }
                    if secondary && !jump {
                        // The tail a secondary keeps starts after the commit.
                        self.retained.retain(|sequence, _| *sequence > up_to);
                        // The primary's truth for flushed data is the sled
                        // summaries (GC may have moved blocks since); only a
                        // secondary maps.
                        for m in mappings {
                            if let Some(mapped) = map_flushed(&mut self.index, self.first_block, &m)
                            {
                                mapped.map_err(|e| self.index_error(e))?;
                            }
                        }
                        // As live (`replica_commit`): nothing at or below
                        // the commit stays mapped into the log.
                        self.index.forget_log_through(up_to);
                    }
                }
                RecordKind::Checkpoint | RecordKind::Padding => {}
            }
        }
        self.next_sequence = self
            .next_sequence
            .max(highest_sequence + 1)
            .max(min_next_sequence);
        self.applied_through = self.next_sequence - 1;
        self.acked_through = self.next_sequence - 1;
        self.sent_through = self.acked_through;
        if !secondary {
            // A primary instance opened from a log (or handed a take-over's
            // tail): an earlier instance may have jumped its secondary over
            // records that are on no sled yet, so "the secondary expects X"
            // no longer implies "it holds everything below X". Everything
            // this log holds is owed until a flush commit covers it.
            if let Some((highest, _)) = self.retained.last_key_value() {
                self.owed_through = self.owed_through.max(*highest);
            }
        }
        if secondary {
            self.epoch = highest_epoch;
        } else if highest_epoch > self.epoch {
            return Err(PartitionError::Fenced {
                partition: self.partition,
                current: highest_epoch,
            });
        }
        if self.index.oldest_log_position().is_some() || !self.pending_trims.is_empty() {
            self.oldest_unflushed = Some(now);
        }
        Ok(())
    }
}

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
pub fn live_records(partition: PartitionId, recovered: &[RecoveredRecord]) -> Vec<RecoveredRecord> {
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

/// The mapping that marks a `FlushCommit` as a catch-up jump (no flushed
/// range has zero blocks on extent `u64::MAX`). Encoded like any mapping:
/// no wire or log format change, and the secondary's logged commit keeps
/// it for replay.
pub fn jump_marker(up_to: u64) -> FlushedRange {
    FlushedRange {
        lba: u64::MAX,
        blocks: 0,
        sequence: up_to,
        extent: u64::MAX,
        column: u16::MAX,
        offset_bytes: 0,
    }
}

/// Whether a commit's `mappings` mark it as a catch-up jump
/// ([`jump_marker`]) rather than a flush.
pub fn is_jump(mappings: &[FlushedRange]) -> bool {
    matches!(mappings, [m] if m.blocks == 0 && m.extent == u64::MAX && m.column == u16::MAX)
}

/// Points the index at the blocks of write `record`, logged at `position`.
pub(crate) fn index_logged_write(
    index: &mut PartitionIndex,
    record: &LogRecord,
    position: LogPosition,
) -> Result<(), IndexError> {
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
pub(crate) fn map_flushed(
    index: &mut PartitionIndex,
    first_block: u64,
    m: &FlushedRange,
) -> Option<Result<u64, IndexError>> {
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
