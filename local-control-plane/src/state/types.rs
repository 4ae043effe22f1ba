//! Identifiers and records of the unit state.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// Fencing credential of a partition (same type the sleds persist).
pub type Epoch = proto::sled::Epoch;

/// A volume, as numbered by the zonal control plane.
pub type VolumeId = u64;

/// An attachment of a volume to a host: the zonal plane's attachment id,
/// or a random id with the top bit set for one registered straight
/// through the unit (`rackblock attach --rack`).
pub type AttachmentId = u64;

/// SHA-256 of an attachment's secret token (the token itself is never
/// stored by the unit).
pub type TokenDigest = proto::volume::TokenDigest;

/// A head node, named as in the rack file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

/// A sled controller, named as in the rack file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SledId(pub String);

/// An extent, numbered by the state machine (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExtentId(pub u64);

/// A volume partition: the one type, [`proto::sled::PartitionId`] (its serde
/// form, `{"volume": .., "index": ..}`, is what the state has always stored).
pub use proto::sled::PartitionId;

/// One device of one sled.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceRef {
    pub sled: SledId,
    pub device: u16,
}

/// One column of the unit: a [`proto::sled::ColumnId`] qualified by its sled.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ColumnRef {
    pub sled: SledId,
    pub device: u16,
    pub index: u32,
}

/// Health of a head node, sled or device, as decided by the failure detector
/// or an operator. Only `Up` things receive new roles or columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Health {
    Up,
    /// Both network paths silent past the timeout; may come back.
    Down,
    /// Operator is emptying it: keeps its roles, gets no new ones.
    Draining,
    /// Declared lost; needs replacement.
    Failed,
}

/// Reachability of one endpoint on each network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathHealth {
    pub network_a_up: bool,
    pub network_b_up: bool,
}

impl Default for PathHealth {
    fn default() -> Self {
        PathHealth {
            network_a_up: true,
            network_b_up: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadNode {
    pub id: NodeId,
    pub address_a: String,
    pub address_b: String,
    pub health: Health,
    pub paths: PathHealth,
    /// Why the node took itself out of service (a failed write log), as it
    /// reported with [`Command::ReportNodeFailure`](crate::Command::ReportNodeFailure);
    /// cleared when it is set Up again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub size_bytes: u64,
    pub health: Health,
    /// Columns the sled reported free and no extent uses.
    pub free_columns: BTreeSet<u32>,
    /// Columns in use, and by which extent.
    pub used_columns: BTreeMap<u32, ExtentId>,
    /// Columns reserved as the replacement of a column of this extent by a
    /// repair task (being rebuilt; not yet part of the extent).
    #[serde(default)]
    pub reserved_columns: BTreeMap<u32, ExtentId>,
    /// Columns an extent no longer uses after a repair (the lost or drained
    /// original, or a cancelled replacement). They may still hold claimed
    /// data on the sled, so they are never handed out again by this version.
    #[serde(default)]
    pub retired_columns: BTreeSet<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sled {
    pub id: SledId,
    pub address_a: String,
    pub address_b: String,
    pub fault_domain: String,
    pub power_domain: String,
    pub column_size_bytes: u64,
    pub health: Health,
    pub paths: PathHealth,
    pub devices: BTreeMap<u16, Device>,
}

/// Reed–Solomon code of a volume's extents: `k` data + `m` parity columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureCode {
    pub k: u8,
    pub m: u8,
}

impl ErasureCode {
    /// Columns per extent, each on a different sled.
    pub fn width(self) -> usize {
        usize::from(self.k) + usize::from(self.m)
    }
}

/// Read lease of a partition's primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub holder: NodeId,
    pub expires_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub id: PartitionId,
    pub primary: NodeId,
    pub secondary: NodeId,
    /// Starts at 1; +1 at every change of primary or secondary.
    pub epoch: Epoch,
    pub lease: Option<Lease>,
    /// Pre-approved extents the primary has not opened yet.
    pub sandbox: BTreeSet<ExtentId>,
    /// The secondary named at this epoch may lack records the primary
    /// acknowledged (it was just assigned and the primary has not reported
    /// it caught up, [`Command::SecondaryInSync`](crate::Command::SecondaryInSync)):
    /// the failover controller never promotes it. Set by every role change
    /// that names a new secondary, cleared by the primary's report. Absent
    /// in state written before it existed: in sync (the old behaviour).
    #[serde(default)]
    pub secondary_catching_up: bool,
}

/// A host's right to do I/O on a volume: head nodes accept a host request
/// only with an attachment id listed here and a token whose SHA-256 is
/// `token_digest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub id: AttachmentId,
    pub token_digest: TokenDigest,
    pub host: String,
    pub created_at_ms: u64,
    /// How long the attachment lasts past its registration or last
    /// renewal (`None`: until removed). Absent in state written before
    /// attachments could expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// Head nodes refuse the token from this wall-clock time on (ms since
    /// the Unix epoch; set with `ttl_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

impl Attachment {
    /// Whether the attachment has expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= now_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    pub partition_size_bytes: u64,
    pub code: ErasureCode,
    /// Indexed by partition index.
    pub partitions: Vec<Partition>,
    /// Valid attachments (credentials head nodes accept).
    #[serde(default)]
    pub attachments: BTreeMap<AttachmentId, Attachment>,
    /// QoS limits the attach agents enforce (`None`: unlimited); set by
    /// `SetVolumeQos`, handed out with the partition map. Absent from
    /// states written before QoS existed (and from unlimited volumes'
    /// JSON, so their snapshots do not change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<proto::qos::VolumeQos>,
    /// A clone's parent snapshot (`RegisterClone`): the blocks the clone
    /// never wrote read as the parent snapshot's (see `state::snapshots`,
    /// clones). Absent from volumes that are not clones, so their JSON
    /// does not change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<CloneParent>,
    /// A clone's flatten in progress (`StartFlatten`): its primaries copy
    /// every block the clone never wrote from the parent snapshot; once
    /// all report none left, `parent` and `flatten` are cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flatten: Option<Flatten>,
    /// A rollback to one of the volume's snapshots in progress
    /// (`StartRollback`): the volume takes no attachment until its
    /// primaries have all rewritten the blocks that differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<Rollback>,
}

/// A volume's rollback as the unit records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollback {
    /// The snapshot whose content becomes the live content.
    pub snapshot: u64,
    /// Per partition, the block below which its primary has rolled back
    /// (it resumes there after a failover; absent: 0).
    pub cursors: BTreeMap<u32, u64>,
    /// Partitions done.
    pub done: BTreeSet<u32>,
}

/// A clone's flatten as the unit records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flatten {
    /// Copy rate of each partition's primary, bytes per second.
    pub rate_bytes_per_second: u64,
    /// Blocks each partition still reads from the parent, as its primary
    /// last reported (a partition not in the map has not reported yet).
    pub remaining_blocks: BTreeMap<u32, u64>,
}

/// Where a clone's unwritten blocks read from: snapshot `snapshot` of
/// volume `volume`, of the same size and partition size as the clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneParent {
    pub volume: VolumeId,
    pub snapshot: u64,
}

/// A volume being deleted: out of every map and placement, its partitions
/// served by no head node; its extents are freed on the sleds and released
/// one by one by the leader's deleter, then the record is purged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletingVolume {
    /// The volume as it was (partitions keep their last epoch and lease:
    /// the deleter waits for those leases to lapse, and frees columns on
    /// the sleds at that epoch).
    pub volume: Volume,
    pub requested_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub id: ExtentId,
    pub code: ErasureCode,
    /// Stripe order: k data columns, then m parity columns; always
    /// `code.width()` slots. `None` is an **owed** column: the extent was
    /// allocated degraded (fewer than k+m sleds could take a column), the
    /// slot holds no column on any sled, readers treat it like a lost
    /// column, and repair writes it on a sled the extent does not use yet
    /// (`RepairReason::Owed`). At least k slots are always present. The
    /// serde form of a full extent is unchanged (`Some` is the bare
    /// column), so states written before owed columns existed still load.
    pub columns: Vec<Option<ColumnRef>>,
    pub owner: PartitionId,
}

impl Extent {
    /// Present columns with their index in stripe order.
    pub fn present(&self) -> impl Iterator<Item = (u16, &ColumnRef)> + '_ {
        self.columns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((u16::try_from(i).ok()?, c.as_ref()?)))
    }

    /// Indexes of the owed columns (see [`Extent::columns`]).
    pub fn owed(&self) -> impl Iterator<Item = u16> + '_ {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_none())
            .filter_map(|(i, _)| u16::try_from(i).ok())
    }

    /// Whether any column is owed.
    pub fn is_degraded(&self) -> bool {
        self.columns.iter().any(Option::is_none)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for SledId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for ExtentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for ColumnRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.sled, self.device, self.index)
    }
}

impl ColumnRef {
    /// The sled-local half, as the sled controller names the column.
    pub fn column_id(&self) -> proto::sled::ColumnId {
        proto::sled::ColumnId {
            device: self.device,
            index: self.index,
        }
    }

    pub fn device_ref(&self) -> DeviceRef {
        DeviceRef {
            sled: self.sled.clone(),
            device: self.device,
        }
    }
}

impl NodeId {
    pub fn new(s: impl Into<String>) -> Self {
        NodeId(s.into())
    }
}

impl SledId {
    pub fn new(s: impl Into<String>) -> Self {
        SledId(s.into())
    }
}
