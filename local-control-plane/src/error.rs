//! Typed refusals of the unit state machine.
//!
//! Every [`CommandError`] means the command was **not applied**: the state is
//! byte-for-byte what it was before (the property tests compare the serde
//! snapshot before and after). Errors are part of the replicated response of
//! a Raft entry, so they are `Serialize`/`Deserialize` and deterministic: the
//! same state and command give the same error on every member.
//!
//! Each variant carries the identifiers a caller needs to act (the current
//! epoch, the lease holder and its expiry, the sleds available), and
//! [`CommandError::code`] gives a stable name for wire status codes and CLI
//! exit codes.

use serde::{Deserialize, Serialize};

use crate::state::{
    AttachmentId, DeviceRef, Epoch, ExtentId, Health, NodeId, PartitionId, SledId, VolumeId,
};

/// What kind of object an [`CommandError::AlreadyExists`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entity {
    HeadNode,
    Sled,
    Device,
    Column,
    Volume,
    VolumeName,
    Attachment,
}

/// Why a command was refused. A refused command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CommandError {
    /// Raising the epoch would wrap around (the epoch is at `u64::MAX`).
    #[error("epoch of partition {partition} would go backwards from {current}")]
    EpochBackwards {
        partition: PartitionId,
        current: Epoch,
    },
    #[error("partition {partition}: primary and secondary would both be {node}")]
    PrimaryEqualsSecondary {
        partition: PartitionId,
        node: NodeId,
    },
    #[error("not enough usable sleds: need {needed}, {available} available")]
    NotEnoughSleds { needed: usize, available: usize },
    #[error("not enough Up head nodes: need {needed}, {available} available")]
    NotEnoughNodes { needed: usize, available: usize },
    /// Guard on every extent the state machine commits; placement never
    /// produces one, so seeing it means a placement bug.
    #[error("extent would have two columns on sled {sled}")]
    ColumnsOnSameSled { sled: SledId },
    #[error("unknown volume {volume}")]
    UnknownVolume { volume: VolumeId },
    #[error("unknown partition {partition}")]
    UnknownPartition { partition: PartitionId },
    #[error("unknown head node {node}")]
    UnknownNode { node: NodeId },
    #[error("unknown sled {sled}")]
    UnknownSled { sled: SledId },
    #[error("unknown device {}:{}", device.sled, device.device)]
    UnknownDevice { device: DeviceRef },
    #[error("unknown extent {extent}")]
    UnknownExtent { extent: ExtentId },
    #[error("{entity:?} {id} already exists")]
    AlreadyExists { entity: Entity, id: String },
    #[error("partition {partition}: lease held by {holder} until {until_ms} ms")]
    LeaseHeld {
        partition: PartitionId,
        holder: NodeId,
        until_ms: u64,
    },
    #[error("partition {partition}: {node} is not the primary ({primary} is)")]
    NotPrimary {
        partition: PartitionId,
        node: NodeId,
        primary: NodeId,
    },
    #[error("partition {partition}: epoch {presented} presented, current is {current}")]
    StaleEpoch {
        partition: PartitionId,
        current: Epoch,
        presented: Epoch,
    },
    #[error("head node {node} is {health:?}, needs to be Up")]
    NodeNotUp { node: NodeId, health: Health },
    #[error("extent {extent} belongs to partition {owner}, not {partition}")]
    ExtentNotOwned {
        extent: ExtentId,
        owner: PartitionId,
        partition: PartitionId,
    },
    #[error("extent {extent} is not in the sandbox of partition {partition}")]
    NotInSandbox {
        extent: ExtentId,
        partition: PartitionId,
    },
    /// Enough Up sleds exist, but too few of them have a free column on an
    /// Up device.
    #[error("no space: need free columns on {needed} sleds, {available} have some")]
    NoSpace { needed: usize, available: usize },
    #[error("invalid argument: {reason}")]
    InvalidArgument { reason: String },
    #[error("volume {volume} has no attachment {attachment}")]
    UnknownAttachment {
        volume: VolumeId,
        attachment: AttachmentId,
    },
    /// Delete refused: hosts are attached (detach them, or force).
    #[error("volume {volume} has {attachments} attachment(s); detach them or force the delete")]
    VolumeAttached {
        volume: VolumeId,
        attachments: usize,
    },
    /// The volume is being deleted: it takes no new attachment, resize or
    /// role change, and a second delete is refused.
    #[error("volume {volume} is being deleted")]
    VolumeDeleting { volume: VolumeId },
    /// A compare-and-set of a volume's reservation record lost: the record
    /// is at `current`, not `expected` (read it again and recompute).
    #[error("volume {volume}: reservation record at version {current}, not {expected}")]
    ReservationVersion {
        volume: VolumeId,
        expected: u64,
        current: u64,
    },
    /// QoS limits that are not acceptable (`proto::qos::QosSpecError`).
    #[error("volume {volume}: QoS {field}: {reason}")]
    InvalidQos {
        volume: VolumeId,
        field: String,
        reason: String,
    },
    /// A snapshot a clone still reads from cannot be deleted (flatten or
    /// delete the clones first).
    #[error("snapshot {snapshot} has clones that depend on it: volumes {clones:?}")]
    SnapshotHasClones {
        snapshot: u64,
        clones: Vec<VolumeId>,
    },
    /// A volume being rolled back to a snapshot takes no attachment.
    #[error("volume {volume} is being rolled back to snapshot {snapshot}")]
    VolumeRollingBack { volume: VolumeId, snapshot: u64 },
    /// Volumes only grow.
    #[error(
        "volume {volume} is {current_bytes} bytes; shrinking to {requested_bytes} is not supported"
    )]
    ShrinkRefused {
        volume: VolumeId,
        current_bytes: u64,
        requested_bytes: u64,
    },
}

impl CommandError {
    /// The same command may succeed later without being changed: a lease
    /// expires, capacity or sleds come back. Refusals caused by the request
    /// itself (wrong epoch, unknown ids, bad arguments) are not retryable;
    /// the caller must re-read the state first.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CommandError::LeaseHeld { .. }
                | CommandError::NoSpace { .. }
                | CommandError::NotEnoughSleds { .. }
                | CommandError::NotEnoughNodes { .. }
                | CommandError::NodeNotUp { .. }
        )
    }

    /// Stable, wire- and CLI-facing name of the variant.
    pub fn code(&self) -> &'static str {
        match self {
            CommandError::EpochBackwards { .. } => "epoch_backwards",
            CommandError::PrimaryEqualsSecondary { .. } => "primary_equals_secondary",
            CommandError::NotEnoughSleds { .. } => "not_enough_sleds",
            CommandError::NotEnoughNodes { .. } => "not_enough_nodes",
            CommandError::ColumnsOnSameSled { .. } => "columns_on_same_sled",
            CommandError::UnknownVolume { .. } => "unknown_volume",
            CommandError::UnknownPartition { .. } => "unknown_partition",
            CommandError::UnknownNode { .. } => "unknown_node",
            CommandError::UnknownSled { .. } => "unknown_sled",
            CommandError::UnknownDevice { .. } => "unknown_device",
            CommandError::UnknownExtent { .. } => "unknown_extent",
            CommandError::AlreadyExists { .. } => "already_exists",
            CommandError::LeaseHeld { .. } => "lease_held",
            CommandError::NotPrimary { .. } => "not_primary",
            CommandError::StaleEpoch { .. } => "stale_epoch",
            CommandError::NodeNotUp { .. } => "node_not_up",
            CommandError::ExtentNotOwned { .. } => "extent_not_owned",
            CommandError::NotInSandbox { .. } => "not_in_sandbox",
            CommandError::NoSpace { .. } => "no_space",
            CommandError::InvalidArgument { .. } => "invalid_argument",
            CommandError::UnknownAttachment { .. } => "unknown_attachment",
            CommandError::VolumeAttached { .. } => "volume_attached",
            CommandError::VolumeDeleting { .. } => "volume_deleting",
            CommandError::ShrinkRefused { .. } => "shrink_refused",
            CommandError::InvalidQos { .. } => "invalid_qos",
            CommandError::ReservationVersion { .. } => "reservation_version",
            CommandError::SnapshotHasClones { .. } => "snapshot_has_clones",
            CommandError::VolumeRollingBack { .. } => "volume_rolling_back",
        }
    }

    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        CommandError::InvalidArgument {
            reason: reason.into(),
        }
    }
}
