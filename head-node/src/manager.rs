//! The partition manager: which partitions this head node serves, in which
//! role, at which epoch — driven by the local control plane's state.
//!
//! ```text
//! start ─▶ open the WAL (one per head node, created zero-filled if absent)
//!          ─▶ recovered records grouped by partition (kept until handed over)
//! whenever this member's state machine applies a new entry (at most every
//! MIN_RECONCILE_SPACING), and every poll interval anyway (reconcile):
//!   first time: a Raft write barrier, then the local state machine up to the
//!   leader's applied index (see `peers::write_barrier`)
//!   desired = { partitions whose primary or secondary is this node, epoch }
//!   hosted but no longer desired, role changed      ─▶ shut down, drop (in-flight
//!                                                      writes fail NotPrimary)
//!   primary at a new epoch (new secondary named)    ─▶ Partition::take_over in place
//!   secondary promoted to primary (failover)        ─▶ Partition::take_over in place
//!   secondary at a new epoch                        ─▶ keep (it adopts the epoch
//!                                                      from the primary's records)
//!   desired but not hosted                          ─▶ Partition::open(role, epoch,
//!                                                      its recovered records)
//!   all partitions that had records opened           ─▶ READY (traffic, flush, GC)
//! per node:    lease task  (one GrantLeases for all its primaries every renew
//!                           interval, and at once when a primary is hosted;
//!                           lease_until per primary)
//! per primary: sync report (SecondaryInSync once the secondary caught up)
//!              duty task   (flush when due: fill ratio / age; GC every gc interval)
//! host request   ─▶ attachment credential valid for the volume and the range
//!                   inside the volume (applied LCP state; else Unauthorized /
//!                   OutOfRange, re-checked once after a read barrier)
//!                   ─▶ hosted primary, READY, lease valid ─▶ Partition::handle_host
//!                   else NotPrimary{hint: the map's primary} | Unavailable (opening,
//!                   no lease yet: the client backs off and resends)
//! replica request ─▶ hosted secondary, READY ─▶ Partition::handle_replica
//!                    else NotSecondary (the primary's replicator retries)
//! ```
//!
//! **Why READY gates everything.** The WAL is shared: [`SharedLog::release`]
//! frees the log up to the oldest position any *registered* partition
//! needs. Records of a partition that is not opened yet are not protected,
//! so nothing that can release (host writes filling the log, flushes,
//! FlushCommits from a primary) runs until every partition that had
//! recovered records is open — or is no longer assigned here (its records
//! are then dropped: the control plane moved it). A partition that cannot
//! open (its sleds all down) therefore keeps the node not ready; that is
//! the safe side.
//!
//! **Leases** (ARCHITECTURE.md, Leases and failover). A primary serves
//! reads and writes only while it holds a lease. The local deadline is measured from *before*
//! the proposal and shortened by a safety margin (a tenth of
//! the duration) for clock rate differences, so this node stops serving
//! before the control plane's copy of the lease expires. One lease task
//! per node renews the leases of all its primaries in one
//! [`Command::GrantLeases`] (one Raft entry per node per renew interval,
//! however many partitions it serves; it was one `GrantLease` per
//! partition, ~7 Raft commits a second per primary, the largest part of an
//! idle unit's CPU). The control plane checks and records each listed
//! partition's lease exactly as a `GrantLease` would; a partition is only
//! listed at the epoch its running instance serves, and a lease granted is
//! applied only to that instance, so the fencing argument is unchanged. A
//! newly hosted primary (opened, promoted, taken over) wakes the task, so
//! it gets its lease at once, not a renew interval later.
//!
//! **A failed write log** (EIO, a failed sync, an operation past
//! `wal_timeout`: the log fail-stops, see [`crate::wal`]) takes the whole
//! node out of service at once: every hosted partition is shut down (no
//! more acknowledgements, no lease renewals; host requests get the
//! retryable `Unavailable`, replication `NotSecondary`), nothing is opened
//! again, and the node reports itself Failed to the control plane with the
//! reason ([`Command::ReportNodeFailure`]), so the failover controller
//! promotes its primaries' secondaries once their leases are over and
//! re-mirrors its secondaries, as for a dead node. `/status` and
//! `rackblock_wal_failed{path,reason}` say which log failed and why. A
//! restart with a working log sets the node Up again.
//!
//! **Failed sled devices.** A sled whose device fails (an I/O error or a
//! timeout: its store fail-stops the device) keeps serving its other
//! devices and answers `DeviceFailed` for that one's columns. Whatever
//! request of this node got that answer (a flush append, a read, a claim),
//! the device is recorded Failed in the control plane
//! ([`Command::SetDeviceHealth`], checked against the applied state
//! first): new extents are placed elsewhere (degraded when too few sleds
//! are left), and its columns are rebuilt on another sled where one can
//! take them (reads reconstruct them meanwhile). A device recorded Failed
//! whose sled reports it healthy again (the sled controller restarted on
//! a working disk; asked every second) is recorded Up, and repair writes
//! the owed columns on it.
//!
//! **Role changes** (failover, re-mirroring; the control plane's failover
//! controller decides them). A secondary promoted while running, and a
//! primary whose epoch moved on because its secondary was replaced, are
//! taken over **in place** ([`Partition::take_over`]): the running
//! instance stops accepting the old epoch, the log records its index and
//! pending trims refer to are handed to a new primary instance at the new
//! epoch, which claims every owned column (fencing the old primary
//! on the sleds), takes the lease and serves. The new secondary is caught
//! up by the replicator with a flush-commit jump to the replication
//! queue's front; the log tail it was jumped over is flushed instead of
//! shipped, and the pair is in sync once that flush commit is confirmed
//! (`partition::replica`). Until the secondary confirms the jump, writes
//! wait (bounded by the replica timeout, then `Unavailable`, which the
//! client retries): a new write is never acknowledged on one copy. The
//! owed tail, acknowledged when the old secondary held it, is in the
//! primary's log only until its flush commits: that is why the pair is
//! "catching up" until then, and never promoted.
//!
//! **A new secondary is caught up proactively and reported.** The
//! replicator of a new primary instance asks its secondary what it holds
//! and catches it up at once (see `partition::replica`), write or no write.
//! Until then the control plane marks the secondary "catching up" and never
//! promotes it: it may lack acknowledged writes that only this node's log
//! holds (the bug: a re-mirror with no host write for seconds, then the
//! primary died and an empty secondary was promoted). The sync-report task
//! proposes `SecondaryInSync` once [`Partition::secondary_in_sync`]; a dead
//! primary's partition then fails over as before.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hardware::rack::Rack;
use hardware::{open_device, EngineChoice, FaultyDevice, OpenOptions, SharedDevice, TimedDevice};
use local_control_plane::state::{CloneParent, Health, NodeId, SledId, UnitState};
use local_control_plane::{Command, LcpNode, Outcome};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::link::LinkMetrics;
use proto::sled::PartitionId;
use proto::volume::{
    digests_equal, AttachmentCredential, AttachmentToken, HostError, HostOp, HostReply,
    HostRequest, NodeHint, ReplicaError, ReplicaReply, ReplicaRequest, SnapshotAction, TokenDigest,
};
use proto::Message;
use proto::BLOCK_SIZE_BYTES;
use serde::Serialize;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::partition::{
    OpenRole, ParentSnapshot, Partition, PartitionConfig, PartitionDeps, PeerError, Role, SharedLog,
};
use crate::peers::{
    data_link_config, propose, sync_local_state, write_barrier, HeadNodeLinks, LcpExtents,
    ProposeError, SledLinks,
};
use crate::wal::{RecoveredRecord, Wal, WalError, WalOptions};

/// Bound on opening one partition (claims, summary reads, log replay).
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a caller waits for one flush or GC pass (it runs to its end
/// regardless: [`run_duty`]).
const DUTY_TIMEOUT: Duration = Duration::from_secs(120);

/// Which duty [`run_duty`] runs.
#[derive(Debug, Clone, Copy)]
enum Duty {
    Flush,
    Gc,
}

/// What a duty did.
enum DutyReport {
    Flush(crate::partition::FlushReport),
    Gc(crate::partition::GcReport),
}

/// Runs one flush or GC pass of `hosted` in a task of its own and waits for
/// it at most [`DUTY_TIMEOUT`]. The pass itself is never abandoned half-way:
/// neither the wait's timeout nor the partition's cancellation (a role
/// change, shutdown) drops it between a column append and the index update
/// or the flush commit that records it (issue 14 item 3); it ends by
/// itself, bounded by its sled requests' own deadlines (a timed-out append
/// seals its extent inside the engine), or fails once the partition is
/// fenced. `Err(())`: the wait timed out (the pass goes on).
async fn run_duty(hosted: &Arc<Hosted>, duty: Duty) -> Result<Result<DutyReport, String>, ()> {
    let partition = hosted.clone();
    let task = tokio::spawn(async move {
        match duty {
            Duty::Flush => partition.partition.flush_now().await.map(DutyReport::Flush),
            Duty::Gc => partition.partition.gc_pass().await.map(DutyReport::Gc),
        }
    });
    match tokio::time::timeout(DUTY_TIMEOUT, task).await {
        Ok(Ok(result)) => Ok(result.map_err(|e| e.to_string())),
        Ok(Err(join)) => Ok(Err(format!("{duty:?} task ended: {join}"))),
        Err(_) => Err(()),
    }
}
/// How often a primary's duty task checks whether a flush is due.
const FLUSH_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// Bound on the index checkpoints written at a clean shutdown.
const SHUTDOWN_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause after a failed lease request (no leader yet, say): short, since
/// the partition serves nothing without a lease.
const LEASE_RETRY_INTERVAL: Duration = Duration::from_millis(50);
/// How often a primary whose secondary is catching up looks whether it
/// is in sync (then reports it to the control plane), and retries a
/// report that did not commit.
const SYNC_REPORT_INTERVAL: Duration = Duration::from_millis(50);
/// Least time between two reconciliations woken by applied entries (every
/// lease renewal is one): bounds the manager's work, not its reaction.
const MIN_RECONCILE_SPACING: Duration = Duration::from_millis(10);

/// Tunables of the manager (from [`crate::HeadNodeConfig`]).
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// This head node's id in the rack.
    pub node_id: String,
    pub wal_path: std::path::PathBuf,
    pub wal_size_bytes: u64,
    pub engine: EngineChoice,
    /// Deadline of one write-log device operation.
    pub wal_timeout: Duration,
    /// Memory budget of the log's unflushed payloads ([`WalOptions::cache_bytes`]).
    pub wal_cache_bytes: u64,
    pub lease_duration: Duration,
    pub lease_renew_interval: Duration,
    pub flush_age: Duration,
    pub flush_fill_ratio: f64,
    pub gc_interval: Duration,
    /// Index checkpoint after this many flush commits (0: by time only).
    pub checkpoint_every_flushes: u64,
    /// Writes of at least this many bytes go straight to the sleds (0: off).
    pub direct_write_min_bytes: u64,
    /// ... or after this long if anything was flushed (zero: by count only).
    pub checkpoint_interval: Duration,
    pub poll_interval: Duration,
    /// The unit credential of the links to sleds and head nodes
    /// (`proto::auth`; `None` only against open unit ports, in tests).
    pub auth: Option<Arc<proto::auth::Credential>>,
    /// A rollback's pace at each primary (`rollback_bytes_per_second`;
    /// `None`: unpaced).
    pub rollback_bytes_per_second: Option<u64>,
    /// Test only: a successful snapshot cut is answered this late
    /// (`test_snapshot_cut_reply_delay_ms`; zero in production).
    pub test_cut_reply_delay: Duration,
}

/// Why the manager could not start.
#[derive(Debug, Error)]
pub enum ManagerError {
    #[error("write log {}: {source}", path.display())]
    Device {
        path: std::path::PathBuf,
        source: hardware::DeviceError,
    },
    #[error("write log {}: {source}", path.display())]
    Wal {
        path: std::path::PathBuf,
        source: WalError,
    },
    #[error("cannot create the directory of {}: {source}", path.display())]
    Directory {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// One partition this node serves.
#[derive(Debug)]
struct Hosted {
    partition: Partition,
    role: OpenRole,
    /// The control plane's epoch when opened (primary: the serving epoch).
    opened_epoch: u64,
    /// Latest epoch the control plane shows (a secondary keeps running).
    lcp_epoch: AtomicU64,
    /// Primary: the secondary it replicates to.
    secondary: Option<String>,
    /// Primary: serve until then.
    lease_until: Mutex<Option<Instant>>,
    /// Stops the duty and sync-report tasks; a cancelled partition's
    /// lease is not renewed.
    cancel: CancellationToken,
    /// Primary: background flushes that failed.
    flushes_failed: AtomicU64,
    /// A take-over to a new primary epoch was started (logged once).
    promotion_pending: AtomicBool,
    /// Primary of a flattening clone: its flatten task runs.
    flattening: AtomicBool,
    /// Primary of a volume being rolled back: its rollback task runs.
    rolling_back: AtomicBool,
    /// Blocks still read from the clone's parent, as the flatten task
    /// last counted them (`u64::MAX`: not counted).
    flatten_remaining: AtomicU64,
}

impl Hosted {
    fn lease_remaining(&self) -> Option<Duration> {
        let until = (*lock(&self.lease_until))?;
        until.checked_duration_since(Instant::now())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WalFailedLabels {
    path: String,
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    partition: String,
}

/// `/metrics` of the data path, per partition and per node.
#[derive(Debug, Clone, Default)]
struct ManagerMetrics {
    role: Family<PartitionLabels, Gauge>,
    epoch: Family<PartitionLabels, Gauge>,
    lease_valid: Family<PartitionLabels, Gauge>,
    log_resident_blocks: Family<PartitionLabels, Gauge>,
    writes: Family<PartitionLabels, Gauge>,
    reads: Family<PartitionLabels, Gauge>,
    flushes: Family<PartitionLabels, Gauge>,
    flushed_blocks: Family<PartitionLabels, Gauge>,
    direct_writes: Family<PartitionLabels, Gauge>,
    gc_passes: Family<PartitionLabels, Gauge>,
    extents_freed: Family<PartitionLabels, Gauge>,
    degraded_reads: Family<PartitionLabels, Gauge>,
    sled_reads: Family<PartitionLabels, Gauge>,
    repair_queue: Family<PartitionLabels, Gauge>,
    checkpoints_written: Family<PartitionLabels, Gauge>,
    recovery_rows_scanned: Family<PartitionLabels, Gauge>,
    recovery_checkpoint_used: Family<PartitionLabels, Gauge>,
    recovery_held_index_used: Family<PartitionLabels, Gauge>,
    recovery_duration_ms: Family<PartitionLabels, Gauge>,
    snapshots: Family<PartitionLabels, Gauge>,
    snapshot_pinned_blocks: Family<PartitionLabels, Gauge>,
    snapshot_cuts: Family<PartitionLabels, Gauge>,
    flatten_remaining_blocks: Family<PartitionLabels, Gauge>,
    flattened_blocks: Family<PartitionLabels, Gauge>,
    rolled_back_blocks: Family<PartitionLabels, Gauge>,
    wal_fill_ratio: Gauge<f64, AtomicU64>,
    wal_used_bytes: Gauge,
    wal_capacity_bytes: Gauge,
    /// Payload bytes of durable log records held in memory.
    wal_cached_bytes: Gauge,
    /// Log reads served from memory / from the log device since start.
    wal_memory_reads: Gauge,
    wal_device_reads: Gauge,
    /// Records appended to the log since start, and the durable device
    /// writes (group-commit rounds) that carried them: their ratio is the
    /// records sharing one batch header (issue 13, bytes per host byte).
    wal_records: Gauge,
    wal_writes: Gauge,
    /// 1 with the log's path and the failure's reason once the log failed;
    /// 0 with an empty reason while it works.
    wal_failed: Family<WalFailedLabels, Gauge>,
    hosted_partitions: Gauge,
    ready: Gauge,
    /// Host requests refused for their attachment credential.
    host_unauthorized: Counter,
}

impl ManagerMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = ManagerMetrics::default();
        let families: [(&str, &str, &Family<PartitionLabels, Gauge>); 25] = [
            (
                "rackblock_partition_flatten_remaining_blocks",
                "Flattening clone: blocks still read from the parent snapshot (-1: not counted yet)",
                &m.flatten_remaining_blocks,
            ),
            (
                "rackblock_partition_flattened_blocks",
                "Blocks a flatten copied from the parent snapshot as primary since open",
                &m.flattened_blocks,
            ),
            (
                "rackblock_partition_rolled_back_blocks",
                "Blocks a rollback rewrote as primary since open",
                &m.rolled_back_blocks,
            ),
            (
                "rackblock_partition_role",
                "1 primary, 2 secondary, 3 fenced",
                &m.role,
            ),
            (
                "rackblock_partition_epoch",
                "Epoch this node serves (primary) or highest seen (secondary)",
                &m.epoch,
            ),
            (
                "rackblock_partition_lease_valid",
                "1 while the primary holds a valid lease",
                &m.lease_valid,
            ),
            (
                "rackblock_partition_log_resident_blocks",
                "Blocks whose latest version is only in the write log",
                &m.log_resident_blocks,
            ),
            (
                "rackblock_partition_writes",
                "Host writes acknowledged since open",
                &m.writes,
            ),
            (
                "rackblock_partition_reads",
                "Host reads answered since open",
                &m.reads,
            ),
            (
                "rackblock_partition_flushes",
                "Flush batches committed since open",
                &m.flushes,
            ),
            (
                "rackblock_partition_flushed_blocks",
                "Blocks written to sleds by flushes since open",
                &m.flushed_blocks,
            ),
            (
                "rackblock_partition_direct_writes",
                "Host writes that went straight to the sleds as full stripes since open",
                &m.direct_writes,
            ),
            (
                "rackblock_partition_gc_passes",
                "Garbage-collection passes since open",
                &m.gc_passes,
            ),
            (
                "rackblock_partition_extents_freed",
                "Extents freed by GC since open",
                &m.extents_freed,
            ),
            (
                "rackblock_partition_degraded_reads",
                "Reads served by erasure decoding since open",
                &m.degraded_reads,
            ),
            (
                "rackblock_partition_sled_reads",
                "Sled read requests sent by host reads since open (one per stretch of consecutive blocks of a column)",
                &m.sled_reads,
            ),
            (
                "rackblock_partition_repair_queue",
                "Columns reported for repair and not yet taken",
                &m.repair_queue,
            ),
            (
                "rackblock_partition_checkpoints_written",
                "Index checkpoints written to the sleds since open",
                &m.checkpoints_written,
            ),
            (
                "rackblock_partition_recovery_rows_scanned",
                "Stripe summaries read by the last recovery from the sleds",
                &m.recovery_rows_scanned,
            ),
            (
                "rackblock_partition_recovery_checkpoint_used",
                "1 if the last recovery from the sleds started from an index checkpoint, 0 if it scanned every summary",
                &m.recovery_checkpoint_used,
            ),
            (
                "rackblock_partition_recovery_held_index_used",
                "1 if the last recovery from the sleds started from the index of the flushed data this node already held (a promotion or a take-over at a new epoch), 0 if not",
                &m.recovery_held_index_used,
            ),
            (
                "rackblock_partition_snapshots",
                "Snapshots whose layers this partition holds",
                &m.snapshots,
            ),
            (
                "rackblock_partition_snapshot_pinned_blocks",
                "Blocks only snapshot layers reference (overwritten since their cut)",
                &m.snapshot_pinned_blocks,
            ),
            (
                "rackblock_partition_snapshot_cuts",
                "Snapshot cuts taken as primary since open",
                &m.snapshot_cuts,
            ),
            (
                "rackblock_partition_recovery_duration_ms",
                "Wall time of the last recovery from the sleds (claims, checkpoint, summaries)",
                &m.recovery_duration_ms,
            ),
        ];
        for (name, help, family) in families {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "rackblock_wal_fill_ratio",
            "Used fraction of the head node's write log",
            m.wal_fill_ratio.clone(),
        );
        registry.register(
            "rackblock_wal_used_bytes",
            "Bytes between the write log's tail and head",
            m.wal_used_bytes.clone(),
        );
        registry.register(
            "rackblock_wal_capacity_bytes",
            "Size of the write log's ring",
            m.wal_capacity_bytes.clone(),
        );
        registry.register(
            "rackblock_wal_cached_bytes",
            "Payload bytes of durable write-log records held in memory (at most wal_cache_bytes)",
            m.wal_cached_bytes.clone(),
        );
        registry.register(
            "rackblock_wal_memory_reads",
            "Write-log reads (flush and reads of logged blocks) served from memory since start",
            m.wal_memory_reads.clone(),
        );
        registry.register(
            "rackblock_wal_device_reads",
            "Write-log reads that went to the log device since start",
            m.wal_device_reads.clone(),
        );
        registry.register(
            "rackblock_wal_records",
            "Records appended to the write log since start",
            m.wal_records.clone(),
        );
        registry.register(
            "rackblock_wal_writes",
            "Durable device writes (group-commit rounds, one batch header each unless a round carries several batches) of the write log since start",
            m.wal_writes.clone(),
        );
        registry.register(
            "rackblock_wal_failed",
            "1 once the write log failed (the head node is out of service), with the log's path and the reason; 0 while it works",
            m.wal_failed.clone(),
        );
        registry.register(
            "rackblock_hosted_partitions",
            "Partitions this head node serves (primary or secondary)",
            m.hosted_partitions.clone(),
        );
        registry.register(
            "rackblock_datapath_ready",
            "1 once every partition with recovered log records is open",
            m.ready.clone(),
        );
        registry.register(
            "rackblock_host_unauthorized",
            "Host requests refused for a missing, unknown or revoked attachment credential",
            m.host_unauthorized.clone(),
        );
        m
    }

    fn families(&self) -> [&Family<PartitionLabels, Gauge>; 25] {
        [
            &self.flatten_remaining_blocks,
            &self.flattened_blocks,
            &self.rolled_back_blocks,
            &self.snapshots,
            &self.snapshot_pinned_blocks,
            &self.snapshot_cuts,
            &self.role,
            &self.epoch,
            &self.lease_valid,
            &self.log_resident_blocks,
            &self.writes,
            &self.reads,
            &self.flushes,
            &self.flushed_blocks,
            &self.direct_writes,
            &self.gc_passes,
            &self.extents_freed,
            &self.degraded_reads,
            &self.sled_reads,
            &self.repair_queue,
            &self.checkpoints_written,
            &self.recovery_rows_scanned,
            &self.recovery_checkpoint_used,
            &self.recovery_held_index_used,
            &self.recovery_duration_ms,
        ]
    }
}

/// What `/status` and `/partitions` show of one hosted partition.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub volume: u64,
    pub partition: u32,
    /// "primary", "secondary" or "fenced".
    pub role: String,
    /// Epoch the partition serves (primary) or the highest seen (secondary).
    pub epoch: u64,
    /// The control plane's epoch.
    pub lcp_epoch: u64,
    pub secondary: Option<String>,
    /// Primary: the secondary holds every acknowledged record (false:
    /// "secondary catching up", it is not promoted if this node dies).
    pub secondary_in_sync: Option<bool>,
    /// Milliseconds of lease left (primary).
    pub lease_remaining_ms: Option<u64>,
    pub log_resident_blocks: u64,
    pub writes: u64,
    pub reads: u64,
    pub flushes: u64,
    pub flushed_blocks: u64,
    /// Host writes that went straight to the sleds (full stripes).
    pub direct_writes: u64,
    pub gc_passes: u64,
    pub extents_freed: u64,
    pub degraded_reads: u64,
    /// Sled read requests sent by host reads.
    pub sled_reads: u64,
    pub repair_queue: usize,
    pub extents: usize,
    /// Background flushes that failed (they are retried).
    pub flush_failures: u64,
    /// Index checkpoints written to the sleds since open.
    pub checkpoints_written: u64,
    /// Last recovery from the sleds: summaries read, whether it started
    /// from a checkpoint, and how long it took.
    pub recovery_rows_scanned: u64,
    pub recovery_checkpoint_used: bool,
    /// Whether it started from the index of the flushed data this node
    /// already held (a promotion, or a take-over at a new epoch).
    pub recovery_held_index_used: bool,
    pub recovery_duration_ms: u64,
    /// Snapshots whose layers the partition holds, and the blocks only
    /// those layers reference.
    pub snapshots: usize,
    pub snapshot_pinned_blocks: u64,
    /// Snapshot cuts taken as primary since open.
    pub snapshot_cuts: u64,
    /// A flattening clone's primary: blocks still read from the parent
    /// (as last counted), and blocks copied since open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flatten_remaining_blocks: Option<u64>,
    pub flattened_blocks: u64,
    /// Blocks a rollback rewrote as primary since open.
    pub rolled_back_blocks: u64,
}

/// Why this head node's write log failed (`/status`).
#[derive(Debug, Clone, Serialize)]
pub struct LogFailure {
    /// The log's device.
    pub path: String,
    /// The device error that stopped it.
    pub reason: String,
    /// Wall-clock time of the failure, milliseconds since the epoch.
    pub at_ms: u64,
    /// Whether the control plane recorded this node Failed.
    pub reported: bool,
}

/// What `/flush` did for one primary.
#[derive(Debug, Clone, Serialize)]
pub struct FlushOutcome {
    pub volume: u64,
    pub partition: u32,
    pub blocks: u64,
    pub stripes: u64,
    pub error: Option<String>,
}

/// The data path of one head node. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PartitionManager {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ManagerConfig,
    me: NodeId,
    node: LcpNode,
    log: Arc<SharedLog>,
    sleds: Arc<SledLinks>,
    heads: Arc<HeadNodeLinks>,
    extents: LcpExtents,
    hosted: RwLock<BTreeMap<PartitionId, Arc<Hosted>>>,
    /// Recovered log records not yet handed to their partition.
    recovered: Mutex<HashMap<PartitionId, Vec<RecoveredRecord>>>,
    synced: AtomicBool,
    ready: AtomicBool,
    metrics: ManagerMetrics,
    /// When the last read barrier of a refused host request completed
    /// (single flight: refusals arriving meanwhile reuse it).
    access_sync: tokio::sync::Mutex<Option<Instant>>,
    /// Tokens already hashed and found to match, per (volume, attachment),
    /// with the digest they matched: a request whose token equals the
    /// cached one (constant-time) while the state still lists that digest
    /// skips the SHA-256. Revocation needs no invalidation: the state
    /// lookup comes first.
    verified_tokens: RwLock<HashMap<(u64, u64), VerifiedToken>>,
    /// Set (under the `hosted` write lock) once the log failed: nothing is
    /// hosted or opened again.
    out_of_service: AtomicBool,
    log_failure: Mutex<Option<LogFailure>>,
    /// Wakes the lease task: a primary was hosted and needs its lease now.
    lease_wake: tokio::sync::Notify,
    shutdown: CancellationToken,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn label(id: PartitionId) -> PartitionLabels {
    PartitionLabels {
        partition: id.to_string(),
    }
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What the control plane wants this node to be for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Desired {
    role: OpenRole,
    epoch: u64,
    secondary: String,
    first_block: u64,
    size_blocks: u64,
    /// A clone's parent snapshot.
    parent: Option<CloneParent>,
}

fn desired_partitions(state: &UnitState, me: &NodeId) -> BTreeMap<PartitionId, Desired> {
    let mut desired = BTreeMap::new();
    for volume in state.volumes().values() {
        for p in &volume.partitions {
            let role = if &p.primary == me {
                OpenRole::Primary
            } else if &p.secondary == me {
                OpenRole::Secondary
            } else {
                continue;
            };
            // Every partition is opened at its full size, the last one too:
            // host I/O is bounded by the volume's size in the state
            // (`check_host_access`), so growing a volume never has to
            // reopen a partition.
            let start = u64::from(p.id.index) * volume.partition_size_bytes;
            let size = volume.partition_size_bytes;
            desired.insert(
                p.id,
                Desired {
                    role,
                    epoch: p.epoch,
                    secondary: p.secondary.0.clone(),
                    first_block: start / BLOCK_SIZE_BYTES,
                    size_blocks: size / BLOCK_SIZE_BYTES,
                    parent: volume.parent,
                },
            );
        }
    }
    desired
}

impl PartitionManager {
    /// Opens (creating if absent) and recovers the write log; partitions
    /// open later, in [`PartitionManager::run`].
    pub async fn start(
        config: ManagerConfig,
        node: LcpNode,
        rack: &Rack,
        registry: &mut Registry,
    ) -> Result<PartitionManager, ManagerError> {
        if let Some(dir) = config.wal_path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ManagerError::Directory {
                path: config.wal_path.clone(),
                source,
            })?;
        }
        let options = OpenOptions {
            engine: config.engine,
            create_size_bytes: Some(config.wal_size_bytes),
            // Syncs into written blocks need no journal commit.
            zero_fill_on_create: true,
            ..OpenOptions::default()
        };
        let device =
            open_device(&config.wal_path, &options).map_err(|source| ManagerError::Device {
                path: config.wal_path.clone(),
                source,
            })?;
        let device = test_fault_device(device);
        // A hung log device is a failed one (module docs).
        let device: SharedDevice = Arc::new(TimedDevice::new(device, config.wal_timeout).map_err(
            |source| ManagerError::Device {
                path: config.wal_path.clone(),
                source,
            },
        )?);
        let (wal, recovered) = Wal::open(
            device,
            WalOptions {
                cache_bytes: config.wal_cache_bytes,
                ..WalOptions::default()
            },
        )
        .await
        .map_err(|source| ManagerError::Wal {
            path: config.wal_path.clone(),
            source,
        })?;
        let mut by_partition: HashMap<PartitionId, Vec<RecoveredRecord>> = HashMap::new();
        let total = recovered.len();
        for record in recovered {
            by_partition
                .entry(record.record.partition)
                .or_default()
                .push(record);
        }
        info!(
            path = %config.wal_path.display(),
            records = total,
            partitions = by_partition.len(),
            stop = ?wal.recovery_stop(),
            "write log recovered"
        );
        let link_registry = registry.sub_registry_with_prefix("datapath");
        let link_metrics = LinkMetrics::new(link_registry);
        let sleds = Arc::new(SledLinks::new(
            rack,
            data_link_config(Duration::from_secs(2), config.auth.clone()),
            link_metrics.clone(),
        ));
        let heads = Arc::new(HeadNodeLinks::new(
            rack,
            &config.node_id,
            data_link_config(Duration::from_secs(4), config.auth.clone()),
            link_metrics,
        ));
        let metrics = ManagerMetrics::register(registry);
        metrics
            .wal_failed
            .get_or_create(&WalFailedLabels {
                path: config.wal_path.display().to_string(),
                reason: String::new(),
            })
            .set(0);
        let extents = LcpExtents::new(node.clone(), sleds.clone())
            .with_min_flush_columns(rack.unit.min_flush_columns);
        Ok(PartitionManager {
            inner: Arc::new(Inner {
                me: NodeId::new(config.node_id.clone()),
                config,
                node,
                log: SharedLog::new(wal),
                sleds,
                heads,
                extents,
                hosted: RwLock::new(BTreeMap::new()),
                recovered: Mutex::new(by_partition),
                synced: AtomicBool::new(false),
                ready: AtomicBool::new(false),
                metrics,
                access_sync: tokio::sync::Mutex::new(None),
                verified_tokens: RwLock::new(HashMap::new()),
                out_of_service: AtomicBool::new(false),
                log_failure: Mutex::new(None),
                lease_wake: tokio::sync::Notify::new(),
                shutdown: CancellationToken::new(),
            }),
        })
    }

    /// Reconciles with the control plane every poll interval until
    /// `shutdown`, then stops every partition.
    pub async fn run(&self, shutdown: CancellationToken) {
        let inner = &self.inner;
        // A role change (promotion) is acted on as soon as it is applied
        // here, not a poll interval later.
        let mut metrics = inner.node.raft().metrics();
        tokio::spawn(watch_log(self.inner.clone(), shutdown.clone()));
        tokio::spawn(watch_sled_devices(self.inner.clone(), shutdown.clone()));
        tokio::spawn(lease_task(self.inner.clone(), shutdown.clone()));
        loop {
            let applied = metrics.borrow_and_update().last_applied;
            reconcile(inner).await;
            update_metrics(inner);
            let newly_applied = async {
                tokio::time::sleep(MIN_RECONCILE_SPACING).await;
                // An error means Raft stopped: the poll interval remains.
                if metrics
                    .wait_for(|m| m.last_applied != applied)
                    .await
                    .is_err()
                {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = tokio::time::sleep(inner.config.poll_interval) => {}
                () = newly_applied => {}
                () = shutdown.cancelled() => break,
            }
        }
        checkpoint_primaries(inner).await;
        self.stop();
    }

    /// Stops every partition and link (also done by `run` on shutdown).
    pub fn stop(&self) {
        let inner = &self.inner;
        inner.shutdown.cancel();
        // Emptied: requests after shutdown get NotPrimary / NotSecondary.
        let hosted = std::mem::take(&mut *write(&inner.hosted));
        for h in hosted.into_values() {
            h.cancel.cancel();
            h.partition.shutdown();
        }
        inner.heads.close();
        inner.sleds.close();
    }

    /// Why the write log failed, once it did (the node is out of service).
    pub fn log_failure(&self) -> Option<LogFailure> {
        lock(&self.inner.log_failure).clone()
    }

    /// Whether every partition with recovered log records is open.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// Answers a host request (see the module docs).
    pub async fn handle_host(&self, request: HostRequest) -> HostReply {
        if is_unit_snapshot_op(&request.op) {
            return HostReply::Error(HostError::BadRequest {
                reason: format!(
                    "{} is the unit's (coordinator, operators), not a host's",
                    request.op.name()
                ),
            });
        }
        if let Err(error) = check_host_access(&self.inner, &request).await {
            return HostReply::Error(error);
        }
        self.serve_primary(request).await
    }

    /// Answers the unit's snapshot coordinator ([`HostOp::SnapshotControl`],
    /// unit port, authenticated head nodes only; the request's credential
    /// is not an attachment's and is not checked): the partition's primary
    /// here cuts, releases or drops, at the request's epoch.
    pub async fn handle_snapshot_control(&self, request: HostRequest) -> HostReply {
        if !matches!(request.op, HostOp::SnapshotControl { .. }) {
            return HostReply::Error(HostError::BadRequest {
                reason: format!("{} is not a snapshot control request", request.op.name()),
            });
        }
        let delay = self.inner.config.test_cut_reply_delay;
        let is_cut = matches!(
            request.op,
            HostOp::SnapshotControl {
                action: SnapshotAction::Cut { .. },
                ..
            }
        );
        let reply = self.serve_primary(request).await;
        if is_cut && !delay.is_zero() && !matches!(reply, HostReply::Error(_)) {
            tracing::warn!(
                ?delay,
                "test_snapshot_cut_reply_delay_ms: answering a cut late"
            );
            tokio::time::sleep(delay).await;
        }
        reply
    }

    /// Answers an operator's (or a head node's) index query of a
    /// partition's snapshots ([`HostOp::SnapshotDiff`],
    /// [`HostOp::SnapshotUsage`], [`HostOp::SnapshotMap`]; unit port, authenticated by the unit
    /// credential, not an attachment's): the partition's primary here
    /// answers from its index, at the request's epoch. Reads no data.
    pub async fn handle_snapshot_query(&self, request: HostRequest) -> HostReply {
        if !matches!(
            request.op,
            HostOp::SnapshotDiff { .. } | HostOp::SnapshotUsage | HostOp::SnapshotMap { .. }
        ) {
            return HostReply::Error(HostError::BadRequest {
                reason: format!("{} is not a snapshot query", request.op.name()),
            });
        }
        self.serve_primary(request).await
    }

    /// Answers another head node's read of a snapshot for a clone's
    /// partition ([`HostOp::ReadSnapshot`] on the unit port, authenticated
    /// head nodes only, with no attachment: see [`ParentReader`]).
    pub async fn handle_parent_read(&self, request: HostRequest) -> HostReply {
        if !matches!(request.op, HostOp::ReadSnapshot { .. }) {
            return HostReply::Error(HostError::BadRequest {
                reason: format!("{} is not a snapshot read", request.op.name()),
            });
        }
        self.serve_primary(request).await
    }

    /// A host or coordinator request, access checked: to the partition's
    /// primary here.
    async fn serve_primary(&self, request: HostRequest) -> HostReply {
        let inner = &self.inner;
        if inner.out_of_service.load(Ordering::Acquire) {
            return unavailable("this head node's write log failed; its partitions fail over");
        }
        let id = request.partition_id();
        let hosted = read(&inner.hosted).get(&id).cloned();
        let Some(hosted) = hosted.filter(|h| h.role == OpenRole::Primary) else {
            return HostReply::Error(not_primary(inner, id));
        };
        if !inner.ready.load(Ordering::Acquire) {
            return unavailable("head node is opening its partitions");
        }
        if hosted.lease_remaining().is_none() {
            return unavailable("primary holds no valid lease yet");
        }
        match hosted.partition.handle_host(request).await {
            HostReply::Error(HostError::NotPrimary { hint: None }) => {
                HostReply::Error(not_primary(inner, id))
            }
            reply => reply,
        }
    }

    /// Whether `credential` is a valid attachment of `volume` (the host
    /// port's partition-map read checks it like any host request).
    pub async fn check_attachment(
        &self,
        volume: u64,
        credential: &AttachmentCredential,
    ) -> Result<(), HostError> {
        check_access(&self.inner, volume, credential, None).await
    }

    /// Answers a replication request (see the module docs).
    pub async fn handle_replica(&self, request: ReplicaRequest) -> ReplicaReply {
        let inner = &self.inner;
        if inner.out_of_service.load(Ordering::Acquire) {
            return ReplicaReply::Error(ReplicaError::NotSecondary);
        }
        let hosted = read(&inner.hosted).get(&request.partition()).cloned();
        match hosted {
            Some(h) if h.role == OpenRole::Secondary && inner.ready.load(Ordering::Acquire) => {
                h.partition.handle_replica(request).await
            }
            _ => ReplicaReply::Error(ReplicaError::NotSecondary),
        }
    }

    /// The partitions this node serves as primary right now (the repair
    /// worker rebuilds their columns).
    pub fn primaries(&self) -> Vec<Partition> {
        read(&self.inner.hosted)
            .values()
            .filter(|h| h.role == OpenRole::Primary)
            .map(|h| h.partition.clone())
            .collect()
    }

    /// Flushes every primary now (admin `POST /flush`, tests).
    pub async fn flush_all(&self) -> Vec<FlushOutcome> {
        let primaries: Vec<Arc<Hosted>> = read(&self.inner.hosted)
            .values()
            .filter(|h| h.role == OpenRole::Primary)
            .cloned()
            .collect();
        let mut outcomes = Vec::new();
        for h in primaries {
            let id = h.partition.id();
            let (blocks, stripes, error) = match run_duty(&h, Duty::Flush).await {
                Ok(Ok(DutyReport::Flush(report))) => (report.blocks, report.stripes, None),
                Ok(Ok(DutyReport::Gc(_))) => (0, 0, None),
                Ok(Err(error)) => (0, 0, Some(error)),
                Err(()) => (0, 0, Some(format!("still running after {DUTY_TIMEOUT:?}"))),
            };
            outcomes.push(FlushOutcome {
                volume: id.volume,
                partition: id.index,
                blocks,
                stripes,
                error,
            });
        }
        outcomes
    }

    /// What every partition hosted here says of volume block `block`
    /// (admin `GET /volumes/{id}/blocks/{block}`).
    pub fn describe_block(&self, volume: u64, block: u64) -> Vec<serde_json::Value> {
        read(&self.inner.hosted)
            .iter()
            .filter(|(id, _)| id.volume == volume)
            .filter_map(|(_, h)| h.partition.describe_block(block))
            .collect()
    }

    /// The hosted partitions, for `/status`.
    pub fn status(&self) -> Vec<PartitionStatus> {
        read(&self.inner.hosted)
            .values()
            .map(|h| partition_status(h))
            .collect()
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A token that hashed to `digest` (see `Inner::verified_tokens`).
#[derive(Debug, Clone, Copy)]
struct VerifiedToken {
    token: AttachmentToken,
    digest: TokenDigest,
}

/// Bound on cached verified tokens (cleared when full).
const MAX_VERIFIED_TOKENS: usize = 4096;

/// Whether `credential` is valid for `volume`; on success the volume size.
fn credential_valid(inner: &Inner, volume: u64, credential: &AttachmentCredential) -> Option<u64> {
    let (size_bytes, digest, expires_at_ms) = inner
        .node
        .attachment_digest(volume, credential.attachment)
        .ok()?;
    // An expiring attachment (the state machine's module docs) is refused
    // from its expiry on, by this node's clock.
    if expires_at_ms.is_some_and(|at| at <= now_ms()) {
        debug!(
            volume,
            attachment = credential.attachment,
            "attachment expired"
        );
        return None;
    }
    let key = (volume, credential.attachment);
    let cached = read(&inner.verified_tokens).get(&key).copied();
    if let Some(hit) = cached {
        if hit.digest == digest && tokens_equal(&hit.token, &credential.token) {
            return Some(size_bytes);
        }
    }
    if !digests_equal(&credential.token.digest(), &digest) {
        return None;
    }
    let mut verified = write(&inner.verified_tokens);
    if verified.len() >= MAX_VERIFIED_TOKENS {
        verified.clear();
    }
    verified.insert(
        key,
        VerifiedToken {
            token: credential.token,
            digest,
        },
    );
    Some(size_bytes)
}

/// Compares two tokens without an early exit.
fn tokens_equal(a: &AttachmentToken, b: &AttachmentToken) -> bool {
    a.0.iter().zip(&b.0).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The request's attachment credential and range against the volume in
/// the applied control-plane state (see `proto::volume`'s module docs):
/// `Unauthorized` for a credential the volume does not list, `OutOfRange`
/// past the volume's end. A refusal is re-checked once after a read
/// barrier, so an attachment or a resize committed a moment ago is not
/// refused by a head node whose state machine lags; barriers are single
/// flight, and a refusal that arrived during one reuses it.
/// The snapshot ops only the unit port serves (coordinator control and
/// operators' index queries): never a host's.
fn is_unit_snapshot_op(op: &HostOp) -> bool {
    matches!(
        op,
        HostOp::SnapshotControl { .. }
            | HostOp::SnapshotDiff { .. }
            | HostOp::SnapshotUsage
            | HostOp::SnapshotMap { .. }
    )
}

async fn check_host_access(inner: &Inner, request: &HostRequest) -> Result<(), HostError> {
    check_access(
        inner,
        request.volume,
        &request.credential,
        request.op.range(),
    )
    .await
}

/// [`check_host_access`] for a credential and an optional byte range.
async fn check_access(
    inner: &Inner,
    volume: u64,
    credential: &AttachmentCredential,
    range: Option<(u64, u32)>,
) -> Result<(), HostError> {
    let check = || -> Result<(), HostError> {
        let size_bytes =
            credential_valid(inner, volume, credential).ok_or(HostError::Unauthorized {
                attachment: credential.attachment,
            })?;
        if let Some((offset_bytes, len)) = range {
            let end = offset_bytes.saturating_add(u64::from(len));
            if end > size_bytes {
                return Err(HostError::OutOfRange {
                    offset_bytes,
                    len_bytes: len,
                    partition_start_bytes: 0,
                    partition_end_bytes: size_bytes,
                });
            }
        }
        Ok(())
    };
    if check().is_ok() {
        return Ok(());
    }
    let arrived = Instant::now();
    {
        let mut last = inner.access_sync.lock().await;
        if last.is_none_or(|done| done < arrived) {
            if let Err(error) = sync_local_state(&inner.node).await {
                debug!(%error, "read barrier before a host refusal failed");
            }
            *last = Some(Instant::now());
        }
    }
    let verdict = check();
    if let Err(HostError::Unauthorized { attachment }) = &verdict {
        inner.metrics.host_unauthorized.inc();
        debug!(
            volume,
            attachment, "host request refused: attachment credential not valid"
        );
    }
    verdict
}

fn unavailable(reason: &str) -> HostReply {
    HostReply::Error(HostError::Unavailable {
        reason: reason.to_string(),
    })
}

/// `NotPrimary` with the map's primary as the hint; `Unavailable` when the
/// map names this node (the partition is still opening here).
fn not_primary(inner: &Inner, id: PartitionId) -> HostError {
    let state = inner.node.local_state();
    let Some(entry) = state.partition(id) else {
        return HostError::NotPrimary { hint: None };
    };
    if entry.primary == inner.me {
        return HostError::Unavailable {
            reason: "partition is opening on this head node".to_string(),
        };
    }
    let hint = state.nodes().get(&entry.primary).and_then(|node| {
        let address_a: SocketAddr = node.address_a.parse().ok()?;
        let address_b: SocketAddr = node.address_b.parse().ok()?;
        Some(NodeHint {
            node_id: node.id.0.clone(),
            address_a,
            address_b,
        })
    });
    HostError::NotPrimary { hint }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Secondary => "secondary",
        Role::Fenced { .. } => "fenced",
    }
}

fn partition_status(h: &Hosted) -> PartitionStatus {
    let id = h.partition.id();
    let m = h.partition.metrics();
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let snapshots = h.partition.snapshots();
    PartitionStatus {
        volume: id.volume,
        partition: id.index,
        role: role_name(h.partition.role()).to_string(),
        epoch: h.partition.epoch(),
        lcp_epoch: h.lcp_epoch.load(Ordering::Relaxed),
        secondary: h.secondary.clone(),
        secondary_in_sync: h
            .secondary
            .is_some()
            .then(|| h.partition.secondary_in_sync()),
        lease_remaining_ms: h
            .lease_remaining()
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        log_resident_blocks: h.partition.log_resident_blocks(),
        writes: get(&m.writes),
        reads: get(&m.reads),
        flushes: get(&m.flushes),
        flushed_blocks: get(&m.flushed_blocks),
        direct_writes: get(&m.direct_writes),
        gc_passes: get(&m.gc_passes),
        extents_freed: get(&m.extents_freed),
        degraded_reads: get(&m.degraded_reads),
        sled_reads: get(&m.sled_reads),
        repair_queue: h.partition.repair_queue().len(),
        extents: h.partition.extent_usage().len(),
        flush_failures: h.flushes_failed.load(Ordering::Relaxed),
        checkpoints_written: get(&m.checkpoints_written),
        recovery_rows_scanned: get(&m.recovery_rows_scanned),
        recovery_checkpoint_used: get(&m.recovery_checkpoint_used) == 1,
        recovery_held_index_used: get(&m.recovery_held_index_used) == 1,
        recovery_duration_ms: get(&m.recovery_duration_ms),
        snapshots: snapshots.len(),
        snapshot_pinned_blocks: snapshots.iter().map(|s| s.pinned_blocks).sum(),
        snapshot_cuts: get(&m.snapshot_cuts),
        flatten_remaining_blocks: Some(h.flatten_remaining.load(Ordering::Relaxed))
            .filter(|left| *left != u64::MAX),
        flattened_blocks: get(&m.flattened_blocks),
        rolled_back_blocks: get(&m.rolled_back_blocks),
    }
}

fn update_metrics(inner: &Inner) {
    let m = &inner.metrics;
    let stats = inner.log.wal().stats();
    m.wal_fill_ratio.set(stats.fill_ratio());
    m.wal_used_bytes.set(as_i64(stats.used_bytes));
    m.wal_capacity_bytes.set(as_i64(stats.capacity_bytes));
    m.wal_cached_bytes.set(as_i64(stats.cached_bytes));
    m.wal_memory_reads.set(as_i64(stats.cache_hits));
    m.wal_device_reads.set(as_i64(stats.cache_misses));
    m.wal_records.set(as_i64(stats.appended_records));
    m.wal_writes.set(as_i64(stats.batches));
    m.ready.set(i64::from(inner.ready.load(Ordering::Acquire)));
    let hosted: Vec<Arc<Hosted>> = read(&inner.hosted).values().cloned().collect();
    m.hosted_partitions
        .set(i64::try_from(hosted.len()).unwrap_or(i64::MAX));
    for h in hosted {
        let s = partition_status(&h);
        let l = label(h.partition.id());
        let role = match h.partition.role() {
            Role::Primary => 1,
            Role::Secondary => 2,
            Role::Fenced { .. } => 3,
        };
        let values = [
            (&m.role, role),
            (&m.epoch, as_i64(s.epoch)),
            (&m.lease_valid, i64::from(s.lease_remaining_ms.is_some())),
            (&m.log_resident_blocks, as_i64(s.log_resident_blocks)),
            (&m.writes, as_i64(s.writes)),
            (&m.reads, as_i64(s.reads)),
            (&m.flushes, as_i64(s.flushes)),
            (&m.flushed_blocks, as_i64(s.flushed_blocks)),
            (&m.direct_writes, as_i64(s.direct_writes)),
            (&m.gc_passes, as_i64(s.gc_passes)),
            (&m.extents_freed, as_i64(s.extents_freed)),
            (&m.degraded_reads, as_i64(s.degraded_reads)),
            (&m.sled_reads, as_i64(s.sled_reads)),
            (&m.checkpoints_written, as_i64(s.checkpoints_written)),
            (&m.recovery_rows_scanned, as_i64(s.recovery_rows_scanned)),
            (
                &m.recovery_checkpoint_used,
                i64::from(s.recovery_checkpoint_used),
            ),
            (
                &m.recovery_held_index_used,
                i64::from(s.recovery_held_index_used),
            ),
            (&m.recovery_duration_ms, as_i64(s.recovery_duration_ms)),
            (&m.snapshots, i64::try_from(s.snapshots).unwrap_or(i64::MAX)),
            (&m.snapshot_pinned_blocks, as_i64(s.snapshot_pinned_blocks)),
            (&m.snapshot_cuts, as_i64(s.snapshot_cuts)),
            (
                &m.flatten_remaining_blocks,
                s.flatten_remaining_blocks.map_or(-1, as_i64),
            ),
            (&m.flattened_blocks, as_i64(s.flattened_blocks)),
            (&m.rolled_back_blocks, as_i64(s.rolled_back_blocks)),
            (
                &m.repair_queue,
                i64::try_from(s.repair_queue).unwrap_or(i64::MAX),
            ),
        ];
        for (family, value) in values {
            family.get_or_create(&l).set(value);
        }
    }
}

/// One reconciliation step (see the module docs).
async fn reconcile(inner: &Arc<Inner>) {
    if inner.out_of_service.load(Ordering::Acquire) {
        return;
    }
    if !inner.synced.load(Ordering::Acquire) {
        if !inner.node.leader_known() {
            return;
        }
        // The first look decides which recovered records are dropped, so
        // it must see every committed command (see `peers::write_barrier`).
        let any_partition = inner
            .node
            .local_state()
            .volumes()
            .values()
            .flat_map(|v| v.partitions.first())
            .map(|p| p.id)
            .next();
        let synced = match any_partition {
            Some(partition) => write_barrier(&inner.node, partition).await,
            None if lock(&inner.recovered).is_empty() => sync_local_state(&inner.node).await,
            None => Err(crate::partition::PeerError::Unreachable {
                peer: "local-control-plane".to_string(),
                reason: "recovered log records but no volume known yet".to_string(),
            }),
        };
        match synced {
            Ok(()) => inner.synced.store(true, Ordering::Release),
            Err(error) => {
                debug!(%error, "control-plane state not synced yet");
                return;
            }
        }
    }
    let state = inner.node.local_state();
    // Back in service after a restart with a working log: this node
    // reported itself Failed (a failure reason is recorded); nothing else
    // sets a head node Failed.
    if state
        .nodes()
        .get(&inner.me)
        .is_some_and(|n| n.health == Health::Failed && n.failure.is_some())
    {
        let command = Command::SetNodeHealth {
            node: inner.me.clone(),
            health: Health::Up,
        };
        match propose(&inner.node, command).await {
            Ok(_) => info!("write log works again: this head node is back in service"),
            Err(error) => debug!(%error, "cannot record this head node Up yet"),
        }
    }
    let desired = desired_partitions(&state, &inner.me);

    // Drop what is no longer ours or changed role; note new epochs.
    let hosted: Vec<(PartitionId, Arc<Hosted>)> = read(&inner.hosted)
        .iter()
        .map(|(id, h)| (*id, h.clone()))
        .collect();
    // Take-overs run concurrently (each claims its columns and reads its
    // sled summaries: the last partition of a failed node is served one
    // take-over after the first, not one per partition).
    let mut take_overs = Vec::new();
    for (id, h) in hosted {
        let drop_reason = match desired.get(&id) {
            None => Some("no longer assigned to this head node".to_string()),
            Some(d)
                if d.role == OpenRole::Primary
                    && (h.role == OpenRole::Secondary || d.epoch != h.opened_epoch) =>
            {
                // Promotion, or a primary at a new epoch: in place.
                if !h.promotion_pending.swap(true, Ordering::Relaxed) {
                    info!(partition = ?id, from = ?h.role, epoch = d.epoch, "taking the partition over as primary");
                }
                h.lcp_epoch.store(d.epoch, Ordering::Relaxed);
                take_overs.push((id, h.clone(), d.clone()));
                None
            }
            Some(d) if d.role != h.role => Some(format!("role changed to {:?}", d.role)),
            Some(d) => {
                h.lcp_epoch.store(d.epoch, Ordering::Relaxed);
                None
            }
        };
        if let Some(reason) = drop_reason {
            info!(partition = ?id, role = ?h.role, %reason, "closing partition");
            write(&inner.hosted).remove(&id);
            h.cancel.cancel();
            h.partition.shutdown();
            for family in inner.metrics.families() {
                family.remove(&label(id));
            }
        }
    }
    futures::future::join_all(
        take_overs
            .into_iter()
            .map(|(id, h, d)| async move { take_over(inner, id, &h, d).await }),
    )
    .await;

    start_flattens(inner, &state);
    start_rollbacks(inner, &state);

    // Open what is ours and not hosted.
    let missing: Vec<(PartitionId, Desired)> = {
        let hosted = read(&inner.hosted);
        desired
            .iter()
            .filter(|(id, _)| !hosted.contains_key(id))
            .map(|(id, d)| (*id, d.clone()))
            .collect()
    };
    for (id, d) in missing {
        if inner.shutdown.is_cancelled() {
            return;
        }
        open_partition(inner, id, d).await;
    }

    if !inner.ready.load(Ordering::Acquire) {
        let mut recovered = lock(&inner.recovered);
        let hosted: BTreeSet<PartitionId> = read(&inner.hosted).keys().copied().collect();
        recovered.retain(|id, records| {
            let keep = desired.contains_key(id) && !hosted.contains(id);
            if !keep && !hosted.contains(id) {
                info!(partition = ?id, records = records.len(), "recovered records of a partition no longer assigned here are dropped");
            }
            keep
        });
        if recovered.is_empty() {
            inner.ready.store(true, Ordering::Release);
            info!(partitions = hosted.len(), "data path ready");
        }
    }
}

/// Replaces the hosted `old` by a primary at `d.epoch` taken over in place
/// (see the module docs); on failure the old one stays and the next
/// reconcile retries.
async fn take_over(inner: &Arc<Inner>, id: PartitionId, old: &Arc<Hosted>, d: Desired) {
    let started = Instant::now();
    let (config, deps) = partition_setup(inner, id, &d);
    let taken = tokio::time::timeout(OPEN_TIMEOUT, old.partition.take_over(config, deps)).await;
    let partition = match taken {
        Ok(Ok(partition)) => partition,
        Ok(Err(error)) => {
            warn!(partition = ?id, epoch = d.epoch, %error, "cannot take the partition over; retrying");
            return;
        }
        Err(_) => {
            warn!(partition = ?id, epoch = d.epoch, "taking the partition over timed out; retrying");
            return;
        }
    };
    old.cancel.cancel();
    info!(
        partition = ?id,
        epoch = d.epoch,
        secondary = %d.secondary,
        took_ms = started.elapsed().as_millis() as u64,
        log_resident_blocks = partition.log_resident_blocks(),
        "serving as primary after an in-place take-over"
    );
    host_primary(inner, id, &d, partition);
}

/// Clean shutdown: every primary leaves an index checkpoint on the sleds,
/// so whoever serves its partitions next reads only what is flushed after
/// it (bounded; a checkpoint is an optimisation, never needed for data).
async fn checkpoint_primaries(inner: &Inner) {
    let primaries: Vec<Partition> = read(&inner.hosted)
        .values()
        .filter(|h| matches!(h.partition.role(), Role::Primary))
        .map(|h| h.partition.clone())
        .collect();
    let writes = futures::future::join_all(primaries.iter().map(|p| async move {
        if let Err(error) = p.write_checkpoint().await {
            tracing::info!(partition = ?p.id(), %error, "no index checkpoint at shutdown");
        }
    }));
    if tokio::time::timeout(SHUTDOWN_CHECKPOINT_TIMEOUT, writes)
        .await
        .is_err()
    {
        tracing::warn!("index checkpoints at shutdown did not finish in time");
    }
}

fn partition_setup(
    inner: &Arc<Inner>,
    id: PartitionId,
    d: &Desired,
) -> (PartitionConfig, PartitionDeps) {
    let mut config = PartitionConfig::new(id, d.first_block, d.size_blocks, d.epoch);
    config.flush_age = inner.config.flush_age;
    config.flush_fill_ratio = inner.config.flush_fill_ratio;
    config.checkpoint_every_flushes = inner.config.checkpoint_every_flushes;
    config.direct_write_min_bytes = inner.config.direct_write_min_bytes;
    config.checkpoint_interval = inner.config.checkpoint_interval;
    config.parent = d.parent.map(|parent| {
        Arc::new(ParentReader {
            inner: Arc::downgrade(inner),
            parent,
        }) as Arc<dyn ParentSnapshot>
    });
    let replica = (d.role == OpenRole::Primary).then(|| inner.heads.replica_peer(&d.secondary));
    let deps = PartitionDeps {
        log: inner.log.clone(),
        sleds: inner.sleds.clone(),
        extents: Arc::new(inner.extents.clone()),
        replica,
    };
    (config, deps)
}

/// Registers an opened partition and starts its lease and duty tasks.
fn host_primary(inner: &Arc<Inner>, id: PartitionId, d: &Desired, partition: Partition) {
    let hosted = Arc::new(Hosted {
        partition,
        role: d.role,
        opened_epoch: d.epoch,
        lcp_epoch: AtomicU64::new(d.epoch),
        secondary: (d.role == OpenRole::Primary).then(|| d.secondary.clone()),
        lease_until: Mutex::new(None),
        cancel: inner.shutdown.child_token(),
        flushes_failed: AtomicU64::new(0),
        promotion_pending: AtomicBool::new(false),
        flattening: AtomicBool::new(false),
        rolling_back: AtomicBool::new(false),
        flatten_remaining: AtomicU64::new(u64::MAX),
    });
    let mut all = write(&inner.hosted);
    if inner.out_of_service.load(Ordering::Acquire) {
        // The log failed while this partition opened: serve nothing.
        hosted.cancel.cancel();
        hosted.partition.shutdown();
        return;
    }
    if d.role == OpenRole::Primary {
        tokio::spawn(duty_task(inner.clone(), hosted.clone()));
        tokio::spawn(sync_report_task(inner.clone(), hosted.clone()));
    }
    all.insert(id, hosted);
    drop(all);
    if d.role == OpenRole::Primary {
        // Its lease now, not at the next renewal.
        inner.lease_wake.notify_one();
    }
}

/// `RACKBLOCK_TEST_WAL_FAULT_FILE`, for end-to-end tests only: when set, the
/// write log's device is wrapped in a [`FaultyDevice`] driven by that file
/// ([`hardware::FaultControl::follow_file`]: `eio` fails every write (and
/// sync) with EIO, `hang` delays every operation by an hour (the
/// `wal_timeout` deadline turns it into a failure), anything else heals).
/// Unset (the product's path), the device is returned as it is. The sled
/// controller's devices have the same hook (`fault_control_file`).
fn test_fault_device(device: SharedDevice) -> SharedDevice {
    let Some(file) = std::env::var_os("RACKBLOCK_TEST_WAL_FAULT_FILE") else {
        return device;
    };
    let file = std::path::PathBuf::from(file);
    warn!(control = %file.display(), "write log on a fault-injection device (RACKBLOCK_TEST_WAL_FAULT_FILE)");
    let size_bytes = device.info().size_bytes;
    let faulty = Arc::new(FaultyDevice::new(device));
    faulty.control().follow_file(file, size_bytes);
    faulty
}

/// How often sled devices that answered `DeviceFailed` are reported.
const DEVICE_REPORT_INTERVAL: Duration = Duration::from_millis(250);
/// How often the sleds with a device recorded Failed are asked whether it
/// works again.
const DEVICE_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Keeps the control plane's device health in step with what the sleds
/// answer (see the module docs): a device that answered `DeviceFailed`
/// (the sled's store failed it after an I/O error or a timeout) is
/// recorded Failed, so that no new column is placed on it and its columns
/// are repaired or owed; one recorded Failed that its Up sled reports
/// healthy again (restarted on a working or replaced disk) is recorded Up.
/// Every head node does this (the commands are idempotent and checked
/// against the applied state first).
async fn watch_sled_devices(inner: Arc<Inner>, shutdown: CancellationToken) {
    let mut last_probe = Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(DEVICE_REPORT_INTERVAL) => {}
            () = shutdown.cancelled() => return,
        }
        let state = inner.node.local_state();
        for (sled, device) in inner.sleds.take_failed_devices() {
            let sled = SledId::new(sled);
            let recorded = state
                .sleds()
                .get(&sled)
                .and_then(|s| s.devices.get(&device))
                .map(|d| d.health);
            if recorded != Some(Health::Up) {
                continue;
            }
            set_device_health(&inner, sled, device, Health::Failed).await;
        }
        if last_probe.elapsed() < DEVICE_PROBE_INTERVAL {
            continue;
        }
        last_probe = Instant::now();
        for (id, sled) in state.sleds() {
            let failed: BTreeSet<u16> = sled
                .devices
                .iter()
                .filter(|(_, d)| d.health == Health::Failed)
                .map(|(index, _)| *index)
                .collect();
            if sled.health != Health::Up || failed.is_empty() {
                continue;
            }
            match inner.sleds.inventory(&id.0).await {
                Ok(inventory) => {
                    for device in inventory.devices {
                        if failed.contains(&device.device)
                            && device.state == proto::sled::DeviceState::Healthy
                        {
                            set_device_health(&inner, id.clone(), device.device, Health::Up).await;
                        }
                    }
                }
                Err(error) => debug!(sled = %id.0, %error, "sled inventory unavailable"),
            }
        }
    }
}

/// Proposes device `device` of `sled` `health` (errors logged: the next
/// round tries again).
async fn set_device_health(inner: &Inner, sled: SledId, device: u16, health: Health) {
    let command = Command::SetDeviceHealth {
        device: local_control_plane::DeviceRef {
            sled: sled.clone(),
            device,
        },
        health,
    };
    match propose(&inner.node, command).await {
        Ok(_) if health == Health::Failed => {
            warn!(sled = %sled.0, device, "sled device answers DeviceFailed: recorded Failed")
        }
        Ok(_) => info!(sled = %sled.0, device, "sled device works again: recorded Up"),
        Err(error) => {
            debug!(sled = %sled.0, device, %error, "cannot record the device's health yet")
        }
    }
}

/// Waits for the write log to fail, then takes the node out of service
/// (see the module docs).
async fn watch_log(inner: Arc<Inner>, shutdown: CancellationToken) {
    let wal = inner.log.wal().clone();
    let reason = tokio::select! {
        reason = wal.failed() => reason,
        () = shutdown.cancelled() => return,
    };
    take_out_of_service(&inner, wal.path(), &reason, &shutdown).await;
}

/// Stops every partition and reports this node Failed (module docs).
async fn take_out_of_service(
    inner: &Arc<Inner>,
    path: &std::path::Path,
    reason: &str,
    shutdown: &CancellationToken,
) {
    let path = path.display().to_string();
    tracing::error!(log = %path, %reason, "write log failed: taking this head node out of service");
    *lock(&inner.log_failure) = Some(LogFailure {
        path: path.clone(),
        reason: reason.to_string(),
        at_ms: now_ms(),
        reported: false,
    });
    inner.metrics.wal_failed.clear();
    inner
        .metrics
        .wal_failed
        .get_or_create(&WalFailedLabels {
            path: path.clone(),
            reason: reason.to_string(),
        })
        .set(1);
    let hosted = {
        let mut hosted = write(&inner.hosted);
        inner.out_of_service.store(true, Ordering::Release);
        std::mem::take(&mut *hosted)
    };
    for (id, h) in hosted {
        // No renewal after this; the lease lapses on its own.
        h.cancel.cancel();
        *lock(&h.lease_until) = None;
        h.partition.shutdown();
        for family in inner.metrics.families() {
            family.remove(&label(id));
        }
    }
    let command = Command::ReportNodeFailure {
        node: inner.me.clone(),
        reason: format!("write log {path} failed: {reason}"),
    };
    // Bounded by the shutdown: without a leader the report waits for one.
    loop {
        match propose(&inner.node, command.clone()).await {
            Ok(_) => {
                info!(log = %path, "control plane recorded this head node Failed");
                if let Some(failure) = lock(&inner.log_failure).as_mut() {
                    failure.reported = true;
                }
                return;
            }
            Err(ProposeError::Refused(error)) => {
                warn!(%error, "control plane refused the failure report");
                return;
            }
            Err(error) => debug!(%error, "failure report not committed yet; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(LEASE_RETRY_INTERVAL) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn open_partition(inner: &Arc<Inner>, id: PartitionId, d: Desired) {
    if d.size_blocks == 0 {
        return;
    }
    let (config, deps) = partition_setup(inner, id, &d);
    let records = lock(&inner.recovered).get(&id).cloned().unwrap_or_default();
    let opened = tokio::time::timeout(
        OPEN_TIMEOUT,
        Partition::open(config, d.role, deps, &records),
    )
    .await;
    let partition = match opened {
        Ok(Ok(partition)) => partition,
        Ok(Err(error)) => {
            warn!(partition = ?id, role = ?d.role, epoch = d.epoch, %error, "cannot open partition; retrying");
            return;
        }
        Err(_) => {
            warn!(partition = ?id, role = ?d.role, epoch = d.epoch, "opening the partition timed out; retrying");
            return;
        }
    };
    lock(&inner.recovered).remove(&id);
    info!(
        partition = ?id,
        role = ?d.role,
        epoch = d.epoch,
        records = records.len(),
        extents = partition.extent_usage().len(),
        log_resident_blocks = partition.log_resident_blocks(),
        "partition open"
    );
    host_primary(inner, id, &d, partition);
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Keeps the leases of every primary this node hosts (see the module
/// docs): one [`Command::GrantLeases`] per renew interval for all of them,
/// and at once whenever a primary is hosted ([`Inner::lease_wake`]), so a
/// promoted or newly opened partition waits for no timer. Runs until
/// `shutdown`.
async fn lease_task(inner: Arc<Inner>, shutdown: CancellationToken) {
    let duration = inner.config.lease_duration;
    let duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    loop {
        let primaries: Vec<Arc<Hosted>> = read(&inner.hosted)
            .values()
            .filter(|h| h.role == OpenRole::Primary && !h.cancel.is_cancelled())
            .cloned()
            .collect();
        let mut serving = Vec::with_capacity(primaries.len());
        for hosted in primaries {
            if matches!(hosted.partition.role(), Role::Primary) {
                serving.push(hosted);
            } else {
                // Stopped serving (fenced, taken over): no renewal.
                *lock(&hosted.lease_until) = None;
            }
        }
        let pause = if serving.is_empty() {
            None
        } else if renew_leases(&inner, &serving, duration_ms).await {
            Some(until_next_renewal(
                now_ms(),
                inner.config.lease_renew_interval,
            ))
        } else {
            Some(LEASE_RETRY_INTERVAL)
        };
        let sleep = async {
            match pause {
                Some(pause) => tokio::time::sleep(pause).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {}
            () = inner.lease_wake.notified() => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Time from `now_ms` (wall clock) to the next multiple of `interval`:
/// every head node renews at the same instants, so the leader's proposal
/// queue ([`local_control_plane::proposals`]) finds their renewals
/// together and commits them in one Raft entry rather than one each. The
/// time between two renewals stays at most one interval plus the commit.
fn until_next_renewal(now_ms: u64, interval: Duration) -> Duration {
    let interval_ms = u64::try_from(interval.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    Duration::from_millis(interval_ms - now_ms % interval_ms)
}

/// One renewal of `serving`'s leases; whether every lease was granted
/// (otherwise the next attempt comes after the retry interval).
async fn renew_leases(inner: &Arc<Inner>, serving: &[Arc<Hosted>], duration_ms: u64) -> bool {
    let started = Instant::now();
    let now = now_ms();
    let command = Command::GrantLeases {
        holder: inner.me.clone(),
        now_ms: now,
        duration_ms,
        partitions: serving
            .iter()
            .map(|h| (h.partition.id(), h.opened_epoch))
            .collect(),
    };
    let leases = match propose(&inner.node, command).await {
        Ok(Outcome::LeasesGranted { leases, .. }) => leases,
        Ok(other) => {
            warn!(?other, "unexpected answer to GrantLeases");
            return false;
        }
        Err(ProposeError::Refused(error)) => {
            warn!(%error, "lease renewal refused");
            return false;
        }
        Err(error) => {
            debug!(%error, "lease renewal failed");
            return false;
        }
    };
    let mut all_granted = leases.len() == serving.len();
    for (hosted, (id, result)) in serving.iter().zip(leases) {
        let expected = hosted.partition.id();
        if id != expected {
            warn!(partition = ?expected, answered = ?id, "GrantLeases answered out of order");
            all_granted = false;
            continue;
        }
        match result {
            Ok(expires_at_ms) => {
                // Measured from before the proposal, shortened by a tenth
                // for clock rate differences (module docs).
                let granted_ms = expires_at_ms.saturating_sub(now).min(duration_ms);
                let margin_ms = granted_ms / 10;
                let until = started + Duration::from_millis(granted_ms - margin_ms);
                let mut lease = lock(&hosted.lease_until);
                // A partition shut down meanwhile (log failure, role
                // change) keeps no lease.
                if hosted.cancel.is_cancelled() {
                    continue;
                }
                match *lease {
                    None => {
                        info!(partition = ?id, epoch = hosted.opened_epoch, "lease granted");
                    }
                    Some(previous) => {
                        // A renewal that came after the lease ran out: the
                        // partition served nothing meanwhile
                        // (bench/raft-term.sh reports the longest gap).
                        if let Some(gap) = Instant::now().checked_duration_since(previous) {
                            warn!(
                                partition = ?id,
                                gap_ms = u64::try_from(gap.as_millis()).unwrap_or(u64::MAX),
                                "lease renewed after it lapsed"
                            );
                        }
                    }
                }
                *lease = Some(until);
            }
            Err(error) => {
                warn!(partition = ?id, epoch = hosted.opened_epoch, %error, "lease refused");
                all_granted = false;
            }
        }
    }
    all_granted
}

/// Tells the control plane once this primary's secondary holds every
/// acknowledged record (see the module docs): `SecondaryInSync` at the
/// epoch this instance serves, when the control plane still marks that
/// secondary as catching up. Ends once reported, when the control plane
/// no longer needs it (in sync already, roles or epoch moved on), or with
/// the partition.
async fn sync_report_task(inner: Arc<Inner>, hosted: Arc<Hosted>) {
    let id = hosted.partition.id();
    let Some(secondary) = hosted.secondary.clone() else {
        return;
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(SYNC_REPORT_INTERVAL) => {}
            () = hosted.cancel.cancelled() => return,
        }
        if !matches!(hosted.partition.role(), Role::Primary) {
            return;
        }
        let state = inner.node.local_state();
        let Some(entry) = state.partition(id) else {
            return;
        };
        if entry.epoch != hosted.opened_epoch
            || entry.primary != inner.me
            || entry.secondary.0 != secondary
            || !entry.secondary_catching_up
        {
            // Nothing to report for this instance (a take-over at the new
            // epoch reports its own).
            return;
        }
        if !hosted.partition.secondary_in_sync() {
            continue;
        }
        let command = Command::SecondaryInSync {
            partition: id,
            primary: inner.me.clone(),
            secondary: entry.secondary.clone(),
            epoch: hosted.opened_epoch,
        };
        match propose(&inner.node, command).await {
            Ok(_) => {
                info!(partition = ?id, epoch = hosted.opened_epoch, %secondary, "secondary in sync, reported to the control plane");
                return;
            }
            Err(ProposeError::Refused(error)) => {
                info!(partition = ?id, epoch = hosted.opened_epoch, %error, "secondary in sync report refused");
                return;
            }
            Err(error) => {
                debug!(partition = ?id, %error, "secondary in sync report failed; retrying")
            }
        }
    }
}

/// Background flush (when due) and GC (every interval) of one primary.
async fn duty_task(inner: Arc<Inner>, hosted: Arc<Hosted>) {
    let id = hosted.partition.id();
    let mut last_gc = Instant::now();
    let mut reported_repairs = 0;
    loop {
        tokio::select! {
            () = tokio::time::sleep(FLUSH_CHECK_INTERVAL) => {}
            () = hosted.cancel.cancelled() => return,
        }
        if !matches!(hosted.partition.role(), Role::Primary) {
            return;
        }
        if !inner.ready.load(Ordering::Acquire) {
            continue;
        }
        if hosted.partition.flush_due() {
            // Cancellation only stops the wait (see `run_duty`).
            let result = tokio::select! {
                r = run_duty(&hosted, Duty::Flush) => r,
                () = hosted.cancel.cancelled() => return,
            };
            match result {
                Ok(Ok(DutyReport::Flush(report))) => debug!(partition = ?id, ?report, "flushed"),
                Ok(Ok(DutyReport::Gc(_))) => {}
                Ok(Err(error)) => {
                    hosted.flushes_failed.fetch_add(1, Ordering::Relaxed);
                    warn!(partition = ?id, %error, "background flush failed");
                }
                Err(()) => {
                    warn!(partition = ?id, "background flush still running after {DUTY_TIMEOUT:?}")
                }
            }
        }
        if last_gc.elapsed() >= inner.config.gc_interval {
            last_gc = Instant::now();
            let result = tokio::select! {
                r = run_duty(&hosted, Duty::Gc) => r,
                () = hosted.cancel.cancelled() => return,
            };
            match result {
                Ok(Ok(DutyReport::Gc(report)))
                    if report.extents_freed > 0 || report.blocks_moved > 0 =>
                {
                    info!(partition = ?id, ?report, "garbage collected");
                }
                Ok(Ok(_)) => {}
                Ok(Err(error)) => warn!(partition = ?id, %error, "GC pass failed"),
                Err(()) => warn!(partition = ?id, "GC pass still running after {DUTY_TIMEOUT:?}"),
            }
        }
        // The repair worker (`repair.rs`) takes the queue; its length is
        // also in /metrics.
        let repairs = hosted.partition.repair_queue().len();
        if repairs != reported_repairs {
            if repairs > 0 {
                warn!(partition = ?id, columns = repairs, "columns queued for repair");
            }
            reported_repairs = repairs;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Renewals land on wall-clock multiples of the interval (so the head
    /// nodes' renewals meet in one Raft entry), never more than one
    /// interval apart, never with a zero pause.
    #[test]
    fn renewals_are_aligned_to_the_interval() {
        let interval = Duration::from_millis(150);
        for now in [0_u64, 1, 149, 150, 151, 299, 1_000_000_007] {
            let pause = until_next_renewal(now, interval);
            let at = now + u64::try_from(pause.as_millis()).unwrap();
            assert_eq!(at % 150, 0, "now {now}");
            assert!(
                pause > Duration::ZERO && pause <= interval,
                "now {now}: {pause:?}"
            );
        }
    }

    fn unit() -> UnitState {
        let mut state = UnitState::new();
        for sled in local_control_plane::fixture::register_nodes_and_sleds(&mut state, 3, 3) {
            state
                .apply(Command::AddFreeColumns {
                    sled,
                    device: 0,
                    columns: (0..16).collect(),
                })
                .unwrap();
        }
        state
            .apply(Command::RegisterVolume {
                volume: 7,
                name: "v".into(),
                size_bytes: 10 << 20,
                partition_size_bytes: 4 << 20,
                k: 2,
                m: 1,
            })
            .unwrap();
        state
    }

    #[test]
    fn desired_partitions_follow_the_map_and_open_a_short_last_partition_whole() {
        let state = unit();
        let mut primaries = 0;
        let mut secondaries = 0;
        let mut blocks = BTreeMap::new();
        for n in 1..=3 {
            let me = NodeId::new(format!("hn-{n}"));
            for (id, d) in desired_partitions(&state, &me) {
                let entry = state.partition(id).unwrap();
                match d.role {
                    OpenRole::Primary => {
                        assert_eq!(entry.primary, me);
                        primaries += 1;
                    }
                    OpenRole::Secondary => {
                        assert_eq!(entry.secondary, me);
                        secondaries += 1;
                    }
                }
                assert_eq!(d.epoch, entry.epoch);
                assert_eq!(d.secondary, entry.secondary.0);
                blocks.insert(id.index, (d.first_block, d.size_blocks));
            }
        }
        assert_eq!((primaries, secondaries), (3, 3));
        let per = (4 << 20) / BLOCK_SIZE_BYTES;
        assert_eq!(blocks[&0], (0, per));
        assert_eq!(blocks[&1], (per, per));
        // The short last partition is opened whole (I/O is bounded by the
        // volume size instead), so a grow never reopens it.
        assert_eq!(blocks[&2], (2 * per, per));
    }
}

/// A clone partition's [`ParentSnapshot`]: reads the parent snapshot from
/// the primary of the parent volume's partition of the same index, looked
/// up in this node's applied unit state at every read. That is this node's
/// own partition when it is its primary (no network), else another head
/// node over the unit port ([`HostOp::ReadSnapshot`] with no attachment,
/// which only authenticated head nodes may send there). A failover of the
/// parent's primary makes the read fail retryably (`NotPrimary`,
/// unreachable) until this node's state names the new one; the clone's
/// host read then fails `Unavailable` and the host's client resends it.
#[derive(Debug)]
struct ParentReader {
    inner: std::sync::Weak<Inner>,
    parent: CloneParent,
}

/// Bound on one read of a parent snapshot from another head node.
const PARENT_READ_TIMEOUT: Duration = Duration::from_secs(5);

impl ParentSnapshot for ParentReader {
    fn read(
        &self,
        offset_bytes: u64,
        len_bytes: u32,
    ) -> futures::future::BoxFuture<'static, Result<bytes::Bytes, PeerError>> {
        let inner = self.inner.upgrade();
        let parent = self.parent;
        Box::pin(async move {
            let refused = |reason: String| PeerError::Refused {
                peer: format!("parent volume {}", parent.volume),
                reason,
            };
            let inner = inner.ok_or_else(|| refused("head node shutting down".into()))?;
            // Where the parent's partition is, and how much of the range
            // the parent volume has (a clone grown past its parent reads
            // zeros there).
            let found = inner.node.with_state(|state| {
                let volume = state.volumes().get(&parent.volume)?;
                let index = offset_bytes / volume.partition_size_bytes.max(1);
                let entry = volume.partitions.get(usize::try_from(index).ok()?)?;
                Some((
                    entry.id,
                    entry.epoch,
                    entry.primary.clone(),
                    volume.size_bytes,
                ))
            });
            let len = u64::from(len_bytes);
            let mut out = vec![0u8; len_bytes as usize];
            let Some((id, epoch, primary, parent_size)) = found else {
                if inner
                    .node
                    .with_state(|s| s.volumes().contains_key(&parent.volume))
                {
                    // Past the parent's last partition: zeros.
                    return Ok(out.into());
                }
                return Err(refused("the parent volume is not in the unit state".into()));
            };
            let readable = parent_size.saturating_sub(offset_bytes).min(len);
            if readable == 0 {
                return Ok(out.into());
            }
            let readable = u32::try_from(readable).unwrap_or(len_bytes);
            let request = HostRequest {
                volume: id.volume,
                partition: id.index,
                epoch,
                credential: AttachmentCredential {
                    attachment: 0,
                    token: AttachmentToken([0; 16]),
                },
                op: HostOp::ReadSnapshot {
                    snapshot: parent.snapshot,
                    offset_bytes,
                    len_bytes: readable,
                },
            };
            let reply = if primary == inner.me {
                PartitionManager {
                    inner: inner.clone(),
                }
                .serve_primary(request)
                .await
            } else {
                let call = inner.heads.call(&primary.0, Message::Host(request), true);
                match tokio::time::timeout(PARENT_READ_TIMEOUT, call).await {
                    Ok(Ok(Message::HostReply(reply))) => reply,
                    Ok(Ok(other)) => {
                        return Err(refused(format!("unexpected answer {:?}", other.kind())))
                    }
                    Ok(Err(error)) => return Err(error),
                    Err(_) => {
                        return Err(PeerError::Timeout {
                            peer: primary.0.clone(),
                        })
                    }
                }
            };
            match reply {
                HostReply::Data { data, crcs } => {
                    if data.len() != readable as usize {
                        return Err(refused(format!(
                            "{} bytes for a read of {readable}",
                            data.len()
                        )));
                    }
                    if proto::volume::chunk_crcs(&data) != crcs {
                        return Err(refused("a parent block failed its CRC".into()));
                    }
                    out[..data.len()].copy_from_slice(&data);
                    Ok(out.into())
                }
                HostReply::Error(error) => Err(refused(error.to_string())),
                other => Err(refused(format!("unexpected reply {other:?}"))),
            }
        })
    }
}

/// Blocks one flatten step copies at most (1 MiB).
const FLATTEN_STEP_BLOCKS: u64 = 256;
/// How often a flatten task reports its progress to the control plane.
const FLATTEN_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Pause after a flatten step that failed (parent unreachable, no lease).
const FLATTEN_RETRY_INTERVAL: Duration = Duration::from_millis(200);

/// Starts the flatten task of every primary here whose volume the control
/// plane flattens and that has none running.
fn start_flattens(inner: &Arc<Inner>, state: &UnitState) {
    let hosted: Vec<Arc<Hosted>> = read(&inner.hosted).values().cloned().collect();
    for h in hosted {
        let id = h.partition.id();
        let flattening = state
            .volumes()
            .get(&id.volume)
            .is_some_and(|v| v.flatten.is_some());
        if flattening
            && h.role == OpenRole::Primary
            && h.partition.is_clone()
            && !h.flattening.swap(true, Ordering::AcqRel)
        {
            info!(partition = ?id, "flattening the clone's partition");
            tokio::spawn(flatten_task(inner.clone(), h));
        }
    }
}

/// The flatten of one clone partition at this primary (see
/// `partition::flatten`): steps through its never-written blocks at the
/// volume's rate, reports the blocks left every second and once none are
/// left, until the control plane's record says the flatten is over (or
/// this instance stops serving: a new primary starts over, finding only
/// the holes still left).
async fn flatten_task(inner: Arc<Inner>, hosted: Arc<Hosted>) {
    let id = hosted.partition.id();
    let epoch = hosted.opened_epoch;
    let mut cursor = 0;
    let mut last_report: Option<Instant> = None;
    let rate_of = || {
        inner.node.with_state(|s| {
            s.volumes()
                .get(&id.volume)
                .and_then(|v| v.flatten.as_ref())
                .map(|f| f.rate_bytes_per_second.max(1))
        })
    };
    while let Some(rate) = rate_of() {
        if hosted.cancel.is_cancelled() {
            break;
        }
        let pause = if hosted.lease_remaining().is_none() {
            FLATTEN_RETRY_INTERVAL
        } else {
            match hosted
                .partition
                .flatten_step(epoch, cursor, FLATTEN_STEP_BLOCKS)
                .await
            {
                Ok(step) => {
                    cursor = step.next.unwrap_or(0);
                    // The rate: this step's bytes at `rate` per second.
                    let secs = (step.copied_blocks * BLOCK_SIZE_BYTES) as f64 / rate as f64;
                    let pause = Duration::from_secs_f64(secs.min(10.0));
                    if step.next.is_none() {
                        // A pass found no hole left behind the cursor:
                        // count and report now, then look again.
                        last_report = None;
                        pause.max(FLATTEN_RETRY_INTERVAL)
                    } else {
                        pause
                    }
                }
                Err(error) => {
                    debug!(partition = ?id, %error, "flatten step failed; retrying");
                    FLATTEN_RETRY_INTERVAL
                }
            }
        };
        if last_report.is_none_or(|at| at.elapsed() >= FLATTEN_REPORT_INTERVAL) {
            let left = hosted.partition.parent_blocks();
            hosted.flatten_remaining.store(left, Ordering::Relaxed);
            let command = Command::FlattenProgress {
                partition: id,
                epoch,
                remaining_blocks: left,
            };
            match propose(&inner.node, command).await {
                Ok(_) => last_report = Some(Instant::now()),
                Err(error) => debug!(partition = ?id, %error, "flatten progress not recorded"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = hosted.cancel.cancelled() => break,
        }
    }
    hosted.flattening.store(false, Ordering::Release);
    debug!(partition = ?id, "flatten task ends");
}

/// Blocks one rollback step covers at most (1 MiB).
const ROLLBACK_STEP_BLOCKS: u64 = 256;
/// How often a rollback task records its cursor with the control plane.
const ROLLBACK_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Starts the rollback task of every primary here whose volume the
/// control plane rolls back, whose partition is not done and that has
/// none running.
fn start_rollbacks(inner: &Arc<Inner>, state: &UnitState) {
    let hosted: Vec<Arc<Hosted>> = read(&inner.hosted).values().cloned().collect();
    for h in hosted {
        let id = h.partition.id();
        let pending = state
            .volumes()
            .get(&id.volume)
            .and_then(|v| v.rollback.as_ref())
            .is_some_and(|r| !r.done.contains(&id.index));
        if pending && h.role == OpenRole::Primary && !h.rolling_back.swap(true, Ordering::AcqRel) {
            info!(partition = ?id, "rolling the partition back to a snapshot");
            tokio::spawn(rollback_task(inner.clone(), h));
        }
    }
}

/// The rollback of one partition at this primary (see
/// `partition::rollback`): from the cursor the control plane recorded,
/// step by step to the end (each step's rewritten bytes paced at
/// `rollback_bytes_per_second` when set), recording the cursor every
/// second and `done` at the end. A new primary after a failover resumes
/// at the recorded cursor: the steps behind it are committed (replicated)
/// before the cursor is proposed, and a step redone changes nothing.
async fn rollback_task(inner: Arc<Inner>, hosted: Arc<Hosted>) {
    let id = hosted.partition.id();
    let epoch = hosted.opened_epoch;
    // (snapshot, recorded cursor), while this partition is not done.
    let pending = || {
        inner.node.with_state(|s| {
            let r = s.volumes().get(&id.volume)?.rollback.as_ref()?;
            (!r.done.contains(&id.index))
                .then(|| (r.snapshot, r.cursors.get(&id.index).copied().unwrap_or(0)))
        })
    };
    let mut cursor: Option<u64> = None;
    let mut last_report = Instant::now();
    while let Some((snapshot, recorded)) = pending() {
        if hosted.cancel.is_cancelled() {
            break;
        }
        let at = *cursor.get_or_insert(recorded);
        let mut finished = false;
        let mut pause = Duration::ZERO;
        if hosted.lease_remaining().is_none() {
            pause = FLATTEN_RETRY_INTERVAL;
        } else {
            match hosted
                .partition
                .rollback_step(epoch, snapshot, at, ROLLBACK_STEP_BLOCKS)
                .await
            {
                Ok(step) => match step.next {
                    Some(next) => {
                        cursor = Some(next);
                        if let Some(rate) = inner.config.rollback_bytes_per_second {
                            let secs = (step.rewritten_blocks * BLOCK_SIZE_BYTES) as f64
                                / rate.max(1) as f64;
                            pause = Duration::from_secs_f64(secs.min(10.0));
                        }
                    }
                    None => finished = true,
                },
                Err(error) => {
                    debug!(partition = ?id, %error, "rollback step failed; retrying");
                    pause = FLATTEN_RETRY_INTERVAL;
                }
            }
        }
        if finished || last_report.elapsed() >= ROLLBACK_REPORT_INTERVAL {
            let command = Command::RollbackProgress {
                partition: id,
                epoch,
                cursor: cursor.unwrap_or(0),
                done: finished,
            };
            match propose(&inner.node, command).await {
                Ok(_) => {
                    last_report = Instant::now();
                    if finished {
                        // Until this node applied it.
                        pause = FLATTEN_RETRY_INTERVAL;
                    }
                }
                Err(error) => {
                    debug!(partition = ?id, %error, "rollback progress not recorded");
                    pause = pause.max(FLATTEN_RETRY_INTERVAL);
                }
            }
        }
        if !pause.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = hosted.cancel.cancelled() => break,
            }
        }
    }
    hosted.rolling_back.store(false, Ordering::Release);
    debug!(partition = ?id, "rollback task ends");
}
