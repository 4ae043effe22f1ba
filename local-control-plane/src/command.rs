//! Commands of the unit state machine and what applying them returns.
//!
//! A [`Command`] is one Raft log entry's payload. It carries everything the
//! state machine needs, including time (`now_ms`, read from the leader's
//! clock when the command is proposed), so that applying the same log on any
//! member gives the same state and the same [`Outcome`]. A command is applied
//! atomically: it either fully succeeds or is refused with a
//! [`CommandError`](crate::CommandError) and changes nothing.

use serde::{Deserialize, Serialize};

use crate::state::{
    AttachmentId, ColumnRef, DeviceRef, Epoch, ExtentId, Health, NodeId, PartitionId, RepairReason,
    SledId, TokenDigest, VolumeId,
};

/// One of the two redundant internal networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Network {
    A,
    B,
}

/// Something with one address on each network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Endpoint {
    Node(NodeId),
    Sled(SledId),
}

/// A device as a sled controller reports it when the sled registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    pub device: u16,
    pub size_bytes: u64,
}

/// A typed request to the unit state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Add a head node (Up, both paths up).
    RegisterHeadNode {
        node: NodeId,
        address_a: String,
        address_b: String,
    },
    /// Add a sled and its devices (all Up, no free columns yet).
    RegisterSled {
        sled: SledId,
        address_a: String,
        address_b: String,
        fault_domain: String,
        power_domain: String,
        column_size_bytes: u64,
        devices: Vec<DeviceSpec>,
    },
    /// Columns a sled controller reports free on one of its devices.
    AddFreeColumns {
        sled: SledId,
        device: u16,
        columns: Vec<u32>,
    },
    /// Register a volume with this unit and place its partitions on head
    /// nodes (epoch 1, no lease).
    RegisterVolume {
        volume: VolumeId,
        name: String,
        size_bytes: u64,
        partition_size_bytes: u64,
        k: u8,
        m: u8,
    },
    /// Allocate one extent of the volume's code, owned by `partition`.
    AllocateExtent {
        partition: PartitionId,
    },
    /// Return an extent's columns to the free pool. The presenter proves it
    /// acts for the partition's current epoch.
    FreeExtent {
        extent: ExtentId,
        partition: PartitionId,
        epoch: Epoch,
    },
    /// Allocate extents into the partition's sandbox until it holds
    /// `target` unopened extents. All or nothing.
    ///
    /// With `min_columns` (clamped to `[k, k+m]`), an extent may be
    /// allocated **degraded** when fewer than k+m sleds can take a column:
    /// at least `min_columns` present columns, the others owed (see
    /// `Extent::columns`). The refill then also drops sandbox extents that
    /// have a column on a sled or device that is not Up (never opened, so
    /// never claimed: their columns go back to the free pool), so the
    /// sandbox only offers extents whose every present column is writable.
    /// `None` (commands written before degraded extents existed) allocates
    /// full extents only and drops nothing.
    RefillSandbox {
        partition: PartitionId,
        target: u32,
        #[serde(default)]
        min_columns: Option<u16>,
    },
    /// The primary reports it started filling a sandbox extent: the extent
    /// leaves the sandbox (it stays owned by the partition), so the next
    /// refill tops the sandbox up again.
    OpenSandboxExtent {
        partition: PartitionId,
        extent: ExtentId,
        epoch: Epoch,
    },
    /// Make `new_primary` the primary, epoch + 1. Refused while another
    /// node's lease is unexpired at `now_ms`. With `new_secondary`, the
    /// secondary is replaced in the same step (failover promotes the old
    /// secondary and names a new one: one epoch, one consensus write).
    ChangePrimary {
        partition: PartitionId,
        new_primary: NodeId,
        new_secondary: Option<NodeId>,
        expected_epoch: Epoch,
        now_ms: u64,
    },
    /// Replace the secondary, epoch + 1 (see the `state` module docs for why).
    ChangeSecondary {
        partition: PartitionId,
        new_secondary: NodeId,
    },
    /// Grant or renew the read lease of the current primary at the current
    /// epoch until `now_ms + duration_ms` (a renewal never shortens it).
    GrantLease {
        partition: PartitionId,
        holder: NodeId,
        epoch: Epoch,
        now_ms: u64,
        duration_ms: u64,
    },
    /// One head node's lease renewal: [`Command::GrantLease`] for every
    /// `(partition, epoch)` listed, all at `now_ms` for `duration_ms`, in
    /// one Raft entry. A head node renews the leases of all the partitions
    /// it is primary of with one of these every renew interval, instead of
    /// one `GrantLease` per partition: the Raft log then takes one entry
    /// per head node per interval however many partitions it serves. Each
    /// partition is granted or refused on its own, exactly as its own
    /// `GrantLease` would be ([`Outcome::LeasesGranted`]); the fencing
    /// rules do not change.
    GrantLeases {
        holder: NodeId,
        now_ms: u64,
        duration_ms: u64,
        partitions: Vec<(PartitionId, Epoch)>,
    },
    /// The primary at `epoch` confirms that `secondary` holds every record
    /// it acknowledged (its catch-up finished): the partition's
    /// `secondary_catching_up` is cleared, so the failover controller may
    /// promote it again. Refused unless `primary`, `secondary` and `epoch`
    /// are the partition's current ones.
    SecondaryInSync {
        partition: PartitionId,
        primary: NodeId,
        secondary: NodeId,
        epoch: Epoch,
    },
    /// Set a node's health (the detector: Down and back Up; Up also clears
    /// a reported failure).
    SetNodeHealth {
        node: NodeId,
        health: Health,
    },
    SetSledHealth {
        sled: SledId,
        health: Health,
    },
    SetDeviceHealth {
        device: DeviceRef,
        health: Health,
    },
    /// Reserve `new` as the replacement of column `column_index` of
    /// `extent` and record a repair task for the owning partition's primary
    /// (see `state::repair`). With `expected_epoch`, refused unless the
    /// partition is at that epoch.
    ReplaceColumn {
        extent: ExtentId,
        column_index: u16,
        new: ColumnRef,
        expected_epoch: Option<Epoch>,
        reason: RepairReason,
        rate_bytes_per_second: u64,
        now_ms: u64,
    },
    /// The partition's primary (at `epoch`) reports rebuild progress.
    RepairProgress {
        extent: ExtentId,
        column_index: u16,
        node: NodeId,
        epoch: Epoch,
        bytes_done: u64,
        bytes_total: u64,
        now_ms: u64,
    },
    /// The primary (at `epoch`) rebuilt `new` completely: the extent lists
    /// it at `column_index`, the old column is retired.
    CompleteRepair {
        extent: ExtentId,
        column_index: u16,
        new: ColumnRef,
        epoch: Epoch,
    },
    /// Drop a repair task; its reserved column is retired.
    CancelRepair {
        extent: ExtentId,
        column_index: u16,
    },
    /// Record that one network path to a node or sled went down or came
    /// back. A path fault is not a node fault: health is unchanged.
    ReportPathFault {
        endpoint: Endpoint,
        network: Network,
        up: bool,
    },
    /// The leader freed these retired columns on their sleds: they go back
    /// to the free set. Columns that are not retired (already reclaimed,
    /// or never retired) are left alone, so a repeat is harmless.
    ReclaimColumns {
        columns: Vec<ColumnRef>,
    },
    /// Let a host do I/O on `volume` with attachment `attachment` and a
    /// token whose SHA-256 is `token_digest`. Repeating it with the same
    /// digest is a no-op (a resend after an unknown outcome). With
    /// `ttl_ms` the attachment expires `ttl_ms` after `now_ms` unless
    /// renewed ([`Command::RenewAttachment`]); without, it lasts until
    /// removed. Attachments of the volume already expired at `now_ms` are
    /// dropped (they can never be used again).
    RegisterAttachment {
        volume: VolumeId,
        attachment: AttachmentId,
        token_digest: TokenDigest,
        host: String,
        now_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
    },
    /// Push an expiring attachment's expiry to `now_ms` + its TTL (never
    /// earlier than it was). A head node proposes it when the attachment's
    /// host reads its partition map and half the TTL has passed. No-op for
    /// an attachment without a TTL; one already expired stays expired.
    RenewAttachment {
        volume: VolumeId,
        attachment: AttachmentId,
        now_ms: u64,
    },
    /// Revoke an attachment: head nodes refuse its token from the entry on.
    RemoveAttachment {
        volume: VolumeId,
        attachment: AttachmentId,
    },
    /// Grow a volume to `size_bytes` (a multiple of 4096, not smaller than
    /// now): new partitions are placed like at registration; a short last
    /// partition simply covers more (head nodes serve whole partitions and
    /// bound I/O by the volume size). The same size is a no-op.
    ResizeVolume {
        volume: VolumeId,
        size_bytes: u64,
    },
    /// Set a volume's QoS limits (`None` or all-unlimited: none). The
    /// attach agents read them with the partition map and apply them
    /// live. Setting the limits a volume has is a no-op (a resend is
    /// harmless). Refused (`InvalidQos`) unless
    /// `proto::qos::VolumeQos::validate` accepts them.
    SetVolumeQos {
        volume: VolumeId,
        qos: Option<proto::qos::VolumeQos>,
    },
    /// Start deleting a volume: refused while attached unless `force`
    /// (which revokes the attachments). The volume leaves every map, its
    /// partitions are closed by their head nodes, and the leader's deleter
    /// frees its extents ([`Command::ReleaseDeletedExtent`]) and purges it
    /// ([`Command::PurgeVolume`]).
    DeleteVolume {
        volume: VolumeId,
        force: bool,
        now_ms: u64,
    },
    /// An extent of a volume being deleted was freed on every reachable
    /// sled: its columns go back to the free pool (columns on Failed sleds
    /// or devices are retired instead).
    ReleaseDeletedExtent {
        extent: ExtentId,
    },
    /// Forget a volume being deleted whose extents are all released.
    PurgeVolume {
        volume: VolumeId,
    },
    /// Start a crash-consistent snapshot `name` of `volumes` (one volume,
    /// or a consistency group): a record in `Creating` with a new id
    /// ([`Outcome::SnapshotCreated`]); the coordinator cuts every
    /// partition and reports [`Command::SnapshotCut`] or
    /// [`Command::AbortSnapshot`] (see `state::snapshots`).
    CreateSnapshot {
        name: String,
        volumes: Vec<VolumeId>,
        now_ms: u64,
    },
    /// Every partition of the snapshot's volumes cut at its current epoch:
    /// `Ready`. Refused unless the cuts cover exactly those partitions at
    /// those epochs (a failover since means an abort).
    SnapshotCut {
        snapshot: crate::state::SnapshotId,
        cuts: Vec<crate::state::PartitionCut>,
        /// The pause the coordinator measured (first cut sent to last
        /// hold released), microseconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pause_us: Option<u64>,
    },
    /// A snapshot being created is not taken: `Aborted` (never visible).
    AbortSnapshot {
        snapshot: crate::state::SnapshotId,
        reason: String,
    },
    /// A ready snapshot is deleted: `Deleting` until its layers are dropped.
    DeleteSnapshot {
        snapshot: crate::state::SnapshotId,
    },
    /// Register volume `volume` named `name` as a writable clone of the
    /// ready snapshot named `snapshot` of volume `parent`: the parent's
    /// size, partition size and erasure code, placed like a new volume;
    /// its unwritten blocks read as the snapshot's
    /// ([`Outcome::VolumeRegistered`]). The snapshot cannot be deleted
    /// while the clone depends on it.
    RegisterClone {
        volume: VolumeId,
        name: String,
        parent: VolumeId,
        snapshot: String,
    },
    /// Start (or re-rate) the flatten of clone `volume`: its partitions'
    /// primaries copy every block the clone never wrote from the parent
    /// snapshot, at most `rate_bytes_per_second` each. Refused unless the
    /// volume is a clone without snapshots of its own (their unwritten
    /// blocks read from the parent too).
    StartFlatten {
        volume: VolumeId,
        rate_bytes_per_second: u64,
    },
    /// A flattening clone's partition primary at `epoch`: `remaining_blocks`
    /// still read from the parent. Once every partition reported 0 the
    /// clone no longer depends on its parent (`parent` cleared).
    FlattenProgress {
        partition: PartitionId,
        epoch: Epoch,
        remaining_blocks: u64,
    },
    /// Roll detached volume `volume` back to its ready snapshot named
    /// `snapshot`: its primaries rewrite every block that reads
    /// differently from the snapshot (ordinary writes, after every cut:
    /// later snapshots keep their content); no attachment is taken until
    /// all are done. Refused (`VolumeAttached`) while attached.
    StartRollback {
        volume: VolumeId,
        snapshot: String,
    },
    /// A rolling-back volume's partition primary at `epoch`: every block
    /// below `cursor` is rolled back; `done`: all of them.
    RollbackProgress {
        partition: PartitionId,
        epoch: Epoch,
        cursor: u64,
        done: bool,
    },
    /// Forget a deleted or aborted snapshot whose layers are dropped.
    PurgeSnapshot {
        snapshot: crate::state::SnapshotId,
    },
    /// A head node took itself out of service (its write log failed): it is
    /// Failed with `reason`, so the failover controller moves its primaries
    /// (once their leases are over) and secondaries, placement gives it no
    /// new role, and the detector leaves it alone. Set Up again by the node
    /// itself once it restarted with a working log.
    ReportNodeFailure {
        node: NodeId,
        reason: String,
    },
    /// Replace the volume's persistent reservation record if its version
    /// is still `expected_version` (compare-and-set; the record's own
    /// `version` is ignored, the applied one is `expected_version + 1`).
    /// See `state::reservations`.
    SetReservations {
        volume: VolumeId,
        expected_version: u64,
        record: crate::state::PersistentReservations,
    },
    /// Several commands in one Raft entry, applied in order, each on its
    /// own: one refused changes nothing and does not stop the others
    /// ([`Outcome::Batch`] has one result per command). The leader's
    /// proposal queue (`crate::proposals`) makes them from commands
    /// proposed while the previous entry was being committed, so that the
    /// Raft core syncs its log once per batch rather than once per command
    /// (each head node's lease renewal every 150 ms, the controllers'
    /// commands). A batch inside a batch
    /// is refused.
    Batch(Vec<Command>),
}

/// What a successfully applied command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Applied; nothing to report beyond success (also for idempotent
    /// repeats such as setting a health a node already has).
    Done,
    VolumeRegistered {
        volume: VolumeId,
        /// (primary, secondary) per partition index.
        placement: Vec<(NodeId, NodeId)>,
    },
    ExtentAllocated {
        extent: ExtentId,
        /// In stripe order; `None` is an owed column.
        columns: Vec<Option<ColumnRef>>,
    },
    ExtentFreed {
        extent: ExtentId,
        columns: Vec<ColumnRef>,
    },
    SandboxRefilled {
        partition: PartitionId,
        added: Vec<ExtentId>,
    },
    EpochChanged {
        partition: PartitionId,
        epoch: Epoch,
    },
    RepairScheduled {
        extent: ExtentId,
        column_index: u16,
        new: ColumnRef,
    },
    LeaseGranted {
        partition: PartitionId,
        holder: NodeId,
        expires_at_ms: u64,
    },
    /// The answer to [`Command::GrantLeases`]: per listed partition, in
    /// order, the lease expiry granted (what `LeaseGranted` would carry) or
    /// why that partition's lease was refused.
    LeasesGranted {
        holder: NodeId,
        leases: Vec<(PartitionId, Result<u64, crate::error::CommandError>)>,
    },
    VolumeResized {
        volume: VolumeId,
        size_bytes: u64,
        /// (primary, secondary) of each partition added.
        added: Vec<(NodeId, NodeId)>,
    },
    DeleteStarted {
        volume: VolumeId,
        /// Extents the deleter will free.
        extents: usize,
        /// Attachments revoked by a forced delete.
        revoked_attachments: usize,
    },
    /// A volume's reservation record replaced; its new version.
    ReservationsSet { volume: VolumeId, version: u64 },
    /// A snapshot record created (state creating).
    SnapshotCreated { snapshot: crate::state::SnapshotId },
    /// The result of each command of a [`Command::Batch`], in order.
    Batch(Vec<Result<Outcome, crate::error::CommandError>>),
}
