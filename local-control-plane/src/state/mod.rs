//! The unit state machine: what the local control plane replicates.
//!
//! # Design
//!
//! [`UnitState`] is a plain value. [`UnitState::apply`] takes a
//! [`Command`] (one Raft log entry) and either applies it fully and returns
//! an [`Outcome`], or refuses it with a [`CommandError`] and changes
//! nothing. There is no I/O, no clock and no randomness inside: time arrives
//! in commands (`now_ms`, read by the proposing leader), ties are broken by
//! identifier, ids come from a counter in the state. Applying the same log
//! on every head node therefore yields the same state, which is what lets
//! openraft replicate it, and lets tests and a simulator drive it directly.
//!
//! Every handler first **validates** (looks only, may fail), then
//! **mutates** (cannot fail). Multi-step commands (placing many partitions,
//! refilling a sandbox with several extents) plan every step before
//! touching anything, so atomicity holds without cloning the state.
//!
//! # What it holds
//!
//! * inventory: head nodes and sleds, each with an address on network A and
//!   B, health ([`Health`]) and per-network [`PathHealth`]; sleds with fault
//!   and power domain and devices; each device lists its free columns (as
//!   reported by the sled controller, [`Command::AddFreeColumns`]) and its
//!   used columns with the extent using them;
//! * volumes and their partitions: primary, secondary, epoch, lease,
//!   sandbox;
//! * extents: k+m columns in stripe order and the owning partition.
//!
//! # Commands, in brief
//!
//! | command | effect | refused with |
//! |---|---|---|
//! | register head node / sled | inventory entry, Up | `AlreadyExists`, `InvalidArgument` |
//! | add free columns | columns enter a device's free set | `UnknownSled/Device`, `AlreadyExists` |
//! | register volume | partitions placed, epoch 1 | `NotEnoughNodes`, `NotEnoughSleds`, `AlreadyExists` |
//! | allocate extent, refill sandbox | k+m free columns → one extent | `NotEnoughSleds`, `NoSpace` |
//! | open sandbox extent, free extent | leave sandbox / columns back to free | `StaleEpoch`, `ExtentNotOwned`, `NotInSandbox` |
//! | change primary | epoch + 1, lease dropped | `StaleEpoch`, `LeaseHeld`, `PrimaryEqualsSecondary` |
//! | change secondary | epoch + 1 | `PrimaryEqualsSecondary`, `NodeNotUp` |
//! | grant lease | primary holds the lease until `now + duration` | `NotPrimary`, `StaleEpoch`, `LeaseHeld` |
//! | grant leases (one head node's renewal) | grant lease, per listed partition | per partition, as grant lease |
//! | set health, report path fault | record it | `Unknown*` |
//! | register / remove attachment | credential digest head nodes accept / revoke | `UnknownVolume`, `VolumeDeleting`, `AlreadyExists`, `UnknownAttachment` |
//! | resize volume | grow: partitions added and placed | `ShrinkRefused`, `InvalidArgument`, `VolumeDeleting`, `NotEnoughNodes` |
//! | delete volume, release deleted extent, purge | volume → deleting; its extents' columns back to free; record gone | `VolumeAttached`, `VolumeDeleting`, `UnknownVolume` |
//!
//! **Epochs.** A partition starts at epoch 1. Changing the primary *or the
//! secondary* raises it by one. The secondary counts too because the epoch
//! is what head nodes fence replication on (ARCHITECTURE.md, Durability and
//! fencing): one epoch names exactly one (primary, secondary) pair, so a
//! removed secondary that comes back is refused by the new pair as soon as
//! it meets the new epoch, and no record acknowledged under the new
//! configuration can have been acknowledged by a replica outside it. Sleds accept a higher epoch by
//! raising their stored one, so the extra bump costs the primary nothing.
//!
//! **Leases.** Only the current primary, at the current epoch, gets a lease;
//! a renewal never shortens it (leaders' clocks differ, so `now_ms` may step
//! back across a leader change). A change of primary is refused while the
//! old primary's lease is unexpired at the command's `now_ms`, so two nodes
//! never both hold a valid lease, and the lease is dropped with the change.
//! A head node renews all its primaries' leases in one `GrantLeases`
//! entry; each listed partition is checked and granted as by its own
//! `GrantLease`, so the record kept per partition and these rules are the
//! same whichever command renewed it.
//!
//! **Failover** is one [`Command::ChangePrimary`] with `new_secondary`: the
//! old secondary becomes primary and a new secondary is named, one epoch.
//!
//! **Freed columns** go straight back to the free set. The sled controller
//! fences a column by partition and epoch, so a column reused by another
//! partition must be freed on the sled first; the shell that proposes
//! `FreeExtent` does that before proposing.
//!
//! # Invariants ([`UnitState::check_invariants`])
//!
//! 1. An extent has exactly k+m columns, on k+m different sleds
//!    (ARCHITECTURE.md invariant 3), all on registered devices.
//! 2. A column is used by at most one extent, is not also free, and the
//!    devices' used-column maps and the extents agree exactly.
//! 3. Every extent is owned by an existing partition, and every sandbox
//!    extent is owned by its partition.
//! 4. Primary != secondary, both registered head nodes; epoch >= 1.
//! 5. A lease, if any, is held by the current primary (with the epoch being
//!    the single fencing credential per partition, this is the control
//!    plane's part of ARCHITECTURE.md invariant 2: one writer per epoch,
//!    one reader per lease).
//! 6. Extent ids are below the id counter (never reused).
//!
//! Epochs never decrease: no command lowers one, and the property tests
//! compare every partition's epoch before and after each step.

mod invariants;
mod placement;
mod read;
mod repair;
mod reservations;
mod snapshots;
mod types;
mod volumes;

#[cfg(test)]
mod degraded_tests;
#[cfg(test)]
mod repair_tests;
#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod volume_tests;

use std::collections::{BTreeMap, BTreeSet};

use proto::BLOCK_SIZE_BYTES;
use serde::{Deserialize, Serialize};

use crate::command::{Command, DeviceSpec, Endpoint, Network, Outcome};
use crate::error::{CommandError, Entity};

pub use read::{
    AllocationStatus, CapacitySummary, CloneStatus, DeviceStatus, FailoverStatus, NodeAddress,
    NodeStatus, PartitionEntry, PartitionMap, RepairStatus, RollbackStatus, SledStatus, UnitStatus,
};
pub use repair::{
    BlockedColumns, DrainOutlook, PlacementBlock, RepairBook, RepairPhase, RepairReason,
    RepairTask, MAX_REPAIR_TASKS,
};
pub use reservations::{
    HeldReservation, LegacyReservation, PersistentReservations, Registration,
    MAX_INITIATOR_NAME_BYTES, MAX_REGISTRATIONS,
};
pub use snapshots::{PartitionCut, SnapshotId, SnapshotRecord, SnapshotState};
pub use types::{
    Attachment, AttachmentId, CloneParent, ColumnRef, DeletingVolume, Device, DeviceRef, Epoch,
    ErasureCode, Extent, ExtentId, Flatten, HeadNode, Health, Lease, NodeId, Partition,
    PartitionId, PathHealth, Rollback, Sled, SledId, TokenDigest, Volume, VolumeId,
};
pub use volumes::{
    AccessRefusal, DeletionPlan, ExtentToFree, MAX_ATTACHMENTS_PER_VOLUME, MAX_ATTACHMENT_TTL_MS,
    MIN_ATTACHMENT_TTL_MS,
};

/// Bound on partitions per volume (a 1 GiB partition size gives 64 TiB).
pub const MAX_PARTITIONS_PER_VOLUME: u64 = 1 << 16;
/// Bound on k + m.
pub const MAX_CODE_WIDTH: usize = 32;
/// Bound on a sandbox refill target.
pub const MAX_SANDBOX_EXTENTS: u32 = 64;
/// Bound on one lease grant or renewal.
pub const MAX_LEASE_DURATION_MS: u64 = 60_000;
/// Bound on columns in one `AddFreeColumns`.
pub const MAX_COLUMNS_PER_COMMAND: usize = 1 << 20;
/// Bound on devices of one sled.
pub const MAX_DEVICES_PER_SLED: usize = 1024;

/// Replicated state of one unit. See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitState {
    nodes: BTreeMap<NodeId, HeadNode>,
    sleds: BTreeMap<SledId, Sled>,
    volumes: BTreeMap<VolumeId, Volume>,
    extents: BTreeMap<ExtentId, Extent>,
    next_extent_id: u64,
    /// Columns being replaced (see [`repair`]).
    #[serde(default)]
    repairs: RepairBook,
    /// Volumes being deleted (see [`volumes`]).
    #[serde(default)]
    deleting: BTreeMap<VolumeId, DeletingVolume>,
    /// Persistent reservations of live volumes (see [`reservations`]);
    /// absent from states written before they existed, and from states
    /// without any, so their snapshots do not change.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    reservations: BTreeMap<VolumeId, PersistentReservations>,
    /// Snapshots (see [`snapshots`]); absent from states written before.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    snapshots: BTreeMap<SnapshotId, SnapshotRecord>,
    /// The next snapshot id (ids are never reused).
    #[serde(default, skip_serializing_if = "is_zero")]
    next_snapshot_id: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl UnitState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn nodes(&self) -> &BTreeMap<NodeId, HeadNode> {
        &self.nodes
    }

    pub fn sleds(&self) -> &BTreeMap<SledId, Sled> {
        &self.sleds
    }

    pub fn volumes(&self) -> &BTreeMap<VolumeId, Volume> {
        &self.volumes
    }

    pub fn extents(&self) -> &BTreeMap<ExtentId, Extent> {
        &self.extents
    }

    /// Volumes being deleted (out of every map; extents being freed).
    pub fn deleting(&self) -> &BTreeMap<VolumeId, DeletingVolume> {
        &self.deleting
    }

    pub fn partition(&self, id: PartitionId) -> Option<&Partition> {
        self.volumes
            .get(&id.volume)?
            .partitions
            .get(id.index as usize)
    }

    /// Every partition of the unit with its epoch (for monotonicity checks).
    pub fn epochs(&self) -> BTreeMap<PartitionId, Epoch> {
        self.volumes
            .values()
            .flat_map(|v| v.partitions.iter())
            .map(|p| (p.id, p.epoch))
            .collect()
    }

    /// Apply one command atomically; a refusal changes nothing.
    ///
    /// Debug builds (and so every test) check every invariant after every
    /// command, applied or refused, and panic with the first violation: a
    /// handler that breaks one is found at the command that did it, not at
    /// the next snapshot install. The check walks the whole state, so
    /// release builds leave it to snapshot installation.
    pub fn apply(&mut self, command: Command) -> Result<Outcome, CommandError> {
        #[cfg(debug_assertions)]
        let applied = command.clone();
        let result = self.apply_unchecked(command);
        #[cfg(debug_assertions)]
        if let Err(violation) = self.check_invariants() {
            panic!("unit state invariant broken by {applied:?} ({result:?}): {violation}");
        }
        result
    }

    fn apply_unchecked(&mut self, command: Command) -> Result<Outcome, CommandError> {
        match command {
            Command::RegisterHeadNode {
                node,
                address_a,
                address_b,
            } => self.register_head_node(node, address_a, address_b),
            Command::RegisterSled {
                sled,
                address_a,
                address_b,
                fault_domain,
                power_domain,
                column_size_bytes,
                devices,
            } => self.register_sled(
                Sled {
                    id: sled,
                    address_a,
                    address_b,
                    fault_domain,
                    power_domain,
                    column_size_bytes,
                    health: Health::Up,
                    paths: PathHealth::default(),
                    devices: BTreeMap::new(),
                },
                devices,
            ),
            Command::AddFreeColumns {
                sled,
                device,
                columns,
            } => self.add_free_columns(DeviceRef { sled, device }, columns),
            Command::RegisterVolume {
                volume,
                name,
                size_bytes,
                partition_size_bytes,
                k,
                m,
            } => self.register_volume(
                volume,
                name,
                size_bytes,
                partition_size_bytes,
                ErasureCode { k, m },
            ),
            Command::AllocateExtent { partition } => self.allocate_extent(partition),
            Command::FreeExtent {
                extent,
                partition,
                epoch,
            } => self.free_extent(extent, partition, epoch),
            Command::RefillSandbox {
                partition,
                target,
                min_columns,
            } => self.refill_sandbox(partition, target, min_columns),
            Command::OpenSandboxExtent {
                partition,
                extent,
                epoch,
            } => self.open_sandbox_extent(partition, extent, epoch),
            Command::ChangePrimary {
                partition,
                new_primary,
                new_secondary,
                expected_epoch,
                now_ms,
            } => self.change_primary(
                partition,
                new_primary,
                new_secondary,
                expected_epoch,
                now_ms,
            ),
            Command::ChangeSecondary {
                partition,
                new_secondary,
            } => self.change_secondary(partition, new_secondary),
            Command::GrantLease {
                partition,
                holder,
                epoch,
                now_ms,
                duration_ms,
            } => self.grant_lease(partition, holder, epoch, now_ms, duration_ms),
            Command::GrantLeases {
                holder,
                now_ms,
                duration_ms,
                partitions,
            } => Ok(Outcome::LeasesGranted {
                leases: partitions
                    .into_iter()
                    .map(|(partition, epoch)| {
                        let granted =
                            self.grant_lease(partition, holder.clone(), epoch, now_ms, duration_ms);
                        let granted = granted.and_then(|outcome| match outcome {
                            Outcome::LeaseGranted { expires_at_ms, .. } => Ok(expires_at_ms),
                            other => Err(CommandError::invalid(format!(
                                "lease grant answered {other:?}"
                            ))),
                        });
                        (partition, granted)
                    })
                    .collect(),
                holder,
            }),
            Command::SecondaryInSync {
                partition,
                primary,
                secondary,
                epoch,
            } => self.secondary_in_sync(partition, primary, secondary, epoch),
            Command::SetNodeHealth { node, health } => {
                let entry = self.node_mut(&node)?;
                entry.health = health;
                if health == Health::Up {
                    entry.failure = None;
                }
                Ok(Outcome::Done)
            }
            Command::ReportNodeFailure { node, reason } => {
                let entry = self.node_mut(&node)?;
                entry.health = Health::Failed;
                entry.failure = Some(reason);
                Ok(Outcome::Done)
            }
            Command::SetSledHealth { sled, health } => {
                self.sled_mut(&sled)?.health = health;
                Ok(Outcome::Done)
            }
            Command::SetDeviceHealth { device, health } => {
                self.device_mut(&device)?.health = health;
                Ok(Outcome::Done)
            }
            Command::ReplaceColumn {
                extent,
                column_index,
                new,
                expected_epoch,
                reason,
                rate_bytes_per_second,
                now_ms,
            } => self.replace_column(
                extent,
                column_index,
                new,
                expected_epoch,
                reason,
                rate_bytes_per_second,
                now_ms,
            ),
            Command::RepairProgress {
                extent,
                column_index,
                node,
                epoch,
                bytes_done,
                bytes_total,
                now_ms,
            } => self.repair_progress(
                extent,
                column_index,
                node,
                epoch,
                bytes_done,
                bytes_total,
                now_ms,
            ),
            Command::CompleteRepair {
                extent,
                column_index,
                new,
                epoch,
            } => self.complete_repair(extent, column_index, new, epoch),
            Command::CancelRepair {
                extent,
                column_index,
            } => self.cancel_repair(extent, column_index),
            Command::ReclaimColumns { columns } => self.reclaim_columns(&columns),
            Command::RegisterAttachment {
                volume,
                attachment,
                token_digest,
                host,
                now_ms,
                ttl_ms,
            } => self.register_attachment(volume, attachment, token_digest, host, now_ms, ttl_ms),
            Command::RenewAttachment {
                volume,
                attachment,
                now_ms,
            } => self.renew_attachment(volume, attachment, now_ms),
            Command::RemoveAttachment { volume, attachment } => {
                self.remove_attachment(volume, attachment)
            }
            Command::ResizeVolume { volume, size_bytes } => self.resize_volume(volume, size_bytes),
            Command::SetVolumeQos { volume, qos } => self.set_volume_qos(volume, qos),
            Command::SetReservations {
                volume,
                expected_version,
                record,
            } => self.set_reservations(volume, expected_version, record),
            Command::DeleteVolume {
                volume,
                force,
                now_ms,
            } => self.delete_volume(volume, force, now_ms),
            Command::ReleaseDeletedExtent { extent } => self.release_deleted_extent(extent),
            Command::PurgeVolume { volume } => self.purge_volume(volume),
            Command::CreateSnapshot {
                name,
                volumes,
                now_ms,
            } => self.create_snapshot(name, volumes, now_ms),
            Command::SnapshotCut {
                snapshot,
                cuts,
                pause_us,
            } => self.snapshot_cut(snapshot, cuts, pause_us),
            Command::AbortSnapshot { snapshot, reason } => self.abort_snapshot(snapshot, reason),
            Command::DeleteSnapshot { snapshot } => self.delete_snapshot(snapshot),
            Command::RegisterClone {
                volume,
                name,
                parent,
                snapshot,
            } => self.register_clone(volume, name, parent, &snapshot),
            Command::StartFlatten {
                volume,
                rate_bytes_per_second,
            } => self.start_flatten(volume, rate_bytes_per_second),
            Command::StartRollback { volume, snapshot } => self.start_rollback(volume, &snapshot),
            Command::RollbackProgress {
                partition,
                epoch,
                cursor,
                done,
            } => self.rollback_progress(partition, epoch, cursor, done),
            Command::FlattenProgress {
                partition,
                epoch,
                remaining_blocks,
            } => self.flatten_progress(partition, epoch, remaining_blocks),
            Command::PurgeSnapshot { snapshot } => self.purge_snapshot(snapshot),
            Command::ReportPathFault {
                endpoint,
                network,
                up,
            } => {
                let paths = match &endpoint {
                    Endpoint::Node(node) => &mut self.node_mut(node)?.paths,
                    Endpoint::Sled(sled) => &mut self.sled_mut(sled)?.paths,
                };
                match network {
                    Network::A => paths.network_a_up = up,
                    Network::B => paths.network_b_up = up,
                }
                Ok(Outcome::Done)
            }
            Command::Batch(commands) => Ok(Outcome::Batch(
                commands
                    .into_iter()
                    .map(|command| match command {
                        Command::Batch(_) => Err(CommandError::invalid("a batch inside a batch")),
                        command => self.apply_unchecked(command),
                    })
                    .collect(),
            )),
        }
    }

    // ---- inventory ------------------------------------------------------

    fn register_head_node(
        &mut self,
        node: NodeId,
        address_a: String,
        address_b: String,
    ) -> Result<Outcome, CommandError> {
        validate_name("head node id", &node.0)?;
        validate_addresses(&address_a, &address_b)?;
        if self.nodes.contains_key(&node) {
            return Err(CommandError::AlreadyExists {
                entity: Entity::HeadNode,
                id: node.0,
            });
        }
        self.nodes.insert(
            node.clone(),
            HeadNode {
                id: node,
                address_a,
                address_b,
                health: Health::Up,
                paths: PathHealth::default(),
                failure: None,
            },
        );
        Ok(Outcome::Done)
    }

    fn register_sled(
        &mut self,
        mut sled: Sled,
        devices: Vec<DeviceSpec>,
    ) -> Result<Outcome, CommandError> {
        validate_name("sled id", &sled.id.0)?;
        validate_addresses(&sled.address_a, &sled.address_b)?;
        validate_name("fault domain", &sled.fault_domain)?;
        validate_name("power domain", &sled.power_domain)?;
        if sled.column_size_bytes == 0 || sled.column_size_bytes % BLOCK_SIZE_BYTES != 0 {
            return Err(CommandError::invalid(format!(
                "column size {} is not a positive multiple of {BLOCK_SIZE_BYTES}",
                sled.column_size_bytes
            )));
        }
        if devices.is_empty() || devices.len() > MAX_DEVICES_PER_SLED {
            return Err(CommandError::invalid(format!(
                "a sled needs 1..={MAX_DEVICES_PER_SLED} devices, got {}",
                devices.len()
            )));
        }
        if self.sleds.contains_key(&sled.id) {
            return Err(CommandError::AlreadyExists {
                entity: Entity::Sled,
                id: sled.id.0,
            });
        }
        for spec in devices {
            if spec.size_bytes < sled.column_size_bytes {
                return Err(CommandError::invalid(format!(
                    "device {} ({} bytes) cannot hold one column",
                    spec.device, spec.size_bytes
                )));
            }
            let device = Device {
                size_bytes: spec.size_bytes,
                health: Health::Up,
                free_columns: BTreeSet::new(),
                used_columns: BTreeMap::new(),
                reserved_columns: BTreeMap::new(),
                retired_columns: BTreeSet::new(),
            };
            if sled.devices.insert(spec.device, device).is_some() {
                return Err(CommandError::AlreadyExists {
                    entity: Entity::Device,
                    id: format!("{}:{}", sled.id, spec.device),
                });
            }
        }
        self.sleds.insert(sled.id.clone(), sled);
        Ok(Outcome::Done)
    }

    fn add_free_columns(
        &mut self,
        at: DeviceRef,
        columns: Vec<u32>,
    ) -> Result<Outcome, CommandError> {
        let sled = self.sled(&at.sled)?;
        let device = sled
            .devices
            .get(&at.device)
            .ok_or_else(|| CommandError::UnknownDevice { device: at.clone() })?;
        if columns.is_empty() || columns.len() > MAX_COLUMNS_PER_COMMAND {
            return Err(CommandError::invalid(format!(
                "1..={MAX_COLUMNS_PER_COMMAND} columns per command, got {}",
                columns.len()
            )));
        }
        let column_count = device.size_bytes / sled.column_size_bytes;
        let mut seen = BTreeSet::new();
        for &index in &columns {
            let column = || ColumnRef {
                sled: at.sled.clone(),
                device: at.device,
                index,
            };
            if u64::from(index) >= column_count {
                return Err(CommandError::invalid(format!(
                    "column {} is beyond the device's {column_count} columns",
                    column()
                )));
            }
            if !seen.insert(index) {
                return Err(CommandError::invalid(format!(
                    "column {} listed twice",
                    column()
                )));
            }
            if device.free_columns.contains(&index)
                || device.used_columns.contains_key(&index)
                || device.reserved_columns.contains_key(&index)
                || device.retired_columns.contains(&index)
            {
                return Err(CommandError::AlreadyExists {
                    entity: Entity::Column,
                    id: column().to_string(),
                });
            }
        }
        let device = self.device_mut(&at)?;
        device.free_columns.extend(seen);
        Ok(Outcome::Done)
    }

    fn node(&self, node: &NodeId) -> Result<&HeadNode, CommandError> {
        self.nodes
            .get(node)
            .ok_or_else(|| CommandError::UnknownNode { node: node.clone() })
    }

    fn node_mut(&mut self, node: &NodeId) -> Result<&mut HeadNode, CommandError> {
        self.nodes
            .get_mut(node)
            .ok_or_else(|| CommandError::UnknownNode { node: node.clone() })
    }

    fn sled(&self, sled: &SledId) -> Result<&Sled, CommandError> {
        self.sleds
            .get(sled)
            .ok_or_else(|| CommandError::UnknownSled { sled: sled.clone() })
    }

    fn sled_mut(&mut self, sled: &SledId) -> Result<&mut Sled, CommandError> {
        self.sleds
            .get_mut(sled)
            .ok_or_else(|| CommandError::UnknownSled { sled: sled.clone() })
    }

    fn device_mut(&mut self, at: &DeviceRef) -> Result<&mut Device, CommandError> {
        self.sled_mut(&at.sled)?
            .devices
            .get_mut(&at.device)
            .ok_or_else(|| CommandError::UnknownDevice { device: at.clone() })
    }

    // ---- volumes and partitions -----------------------------------------

    fn register_volume(
        &mut self,
        volume: VolumeId,
        name: String,
        size_bytes: u64,
        partition_size_bytes: u64,
        code: ErasureCode,
    ) -> Result<Outcome, CommandError> {
        validate_name("volume name", &name)?;
        for (what, bytes) in [
            ("size", size_bytes),
            ("partition size", partition_size_bytes),
        ] {
            if bytes == 0 || bytes % BLOCK_SIZE_BYTES != 0 {
                return Err(CommandError::invalid(format!(
                    "{what} {bytes} is not a positive multiple of {BLOCK_SIZE_BYTES}"
                )));
            }
        }
        if code.k == 0 || code.m == 0 || code.width() > MAX_CODE_WIDTH {
            return Err(CommandError::invalid(format!(
                "erasure code {}+{} needs k >= 1, m >= 1, k+m <= {MAX_CODE_WIDTH}",
                code.k, code.m
            )));
        }
        let partition_count = size_bytes.div_ceil(partition_size_bytes);
        if partition_count > MAX_PARTITIONS_PER_VOLUME {
            return Err(CommandError::invalid(format!(
                "{partition_count} partitions exceed the bound of {MAX_PARTITIONS_PER_VOLUME}"
            )));
        }
        if self.volumes.contains_key(&volume) || self.deleting.contains_key(&volume) {
            return Err(CommandError::AlreadyExists {
                entity: Entity::Volume,
                id: volume.to_string(),
            });
        }
        if self.volumes.values().any(|v| v.name == name) {
            return Err(CommandError::AlreadyExists {
                entity: Entity::VolumeName,
                id: name,
            });
        }
        // A volume whose extents could never be placed is refused up front.
        let up = placement::up_sleds(&self.sleds);
        if up < code.width() {
            return Err(CommandError::NotEnoughSleds {
                needed: code.width(),
                available: up,
            });
        }
        // Bounded by MAX_PARTITIONS_PER_VOLUME above, so it fits in u32.
        let count = u32::try_from(partition_count)
            .map_err(|_| CommandError::invalid("partition count overflows u32"))?;
        let placement = placement::place_partitions(&self.nodes, &self.volumes, count)?;
        let partitions = placement
            .iter()
            .zip(0u32..)
            .map(|((primary, secondary), index)| Partition {
                id: PartitionId { volume, index },
                primary: primary.clone(),
                secondary: secondary.clone(),
                epoch: 1,
                lease: None,
                sandbox: BTreeSet::new(),
                secondary_catching_up: false,
            })
            .collect();
        self.volumes.insert(
            volume,
            Volume {
                id: volume,
                name,
                size_bytes,
                partition_size_bytes,
                code,
                partitions,
                attachments: BTreeMap::new(),
                qos: None,
                parent: None,
                flatten: None,
                rollback: None,
            },
        );
        Ok(Outcome::VolumeRegistered { volume, placement })
    }

    fn partition_ref(&self, id: PartitionId) -> Result<&Partition, CommandError> {
        self.partition(id)
            .ok_or(CommandError::UnknownPartition { partition: id })
    }

    fn partition_mut(&mut self, id: PartitionId) -> Result<&mut Partition, CommandError> {
        self.volumes
            .get_mut(&id.volume)
            .and_then(|v| v.partitions.get_mut(id.index as usize))
            .ok_or(CommandError::UnknownPartition { partition: id })
    }

    fn up_node(&self, node: &NodeId) -> Result<&HeadNode, CommandError> {
        let entry = self.node(node)?;
        if entry.health != Health::Up {
            return Err(CommandError::NodeNotUp {
                node: node.clone(),
                health: entry.health,
            });
        }
        Ok(entry)
    }

    fn change_primary(
        &mut self,
        id: PartitionId,
        new_primary: NodeId,
        new_secondary: Option<NodeId>,
        expected_epoch: Epoch,
        now_ms: u64,
    ) -> Result<Outcome, CommandError> {
        let partition = self.partition_ref(id)?;
        if partition.epoch != expected_epoch {
            return Err(CommandError::StaleEpoch {
                partition: id,
                current: partition.epoch,
                presented: expected_epoch,
            });
        }
        if new_primary == partition.primary {
            return Err(CommandError::invalid(format!(
                "{new_primary} is already primary of {id}; use ChangeSecondary"
            )));
        }
        self.up_node(&new_primary)?;
        if let Some(secondary) = &new_secondary {
            self.up_node(secondary)?;
        }
        let secondary = new_secondary.unwrap_or_else(|| partition.secondary.clone());
        if secondary == new_primary {
            return Err(CommandError::PrimaryEqualsSecondary {
                partition: id,
                node: new_primary,
            });
        }
        if let Some(lease) = &partition.lease {
            if lease.expires_at_ms > now_ms {
                return Err(CommandError::LeaseHeld {
                    partition: id,
                    holder: lease.holder.clone(),
                    until_ms: lease.expires_at_ms,
                });
            }
        }
        let epoch = next_epoch(id, partition.epoch)?;
        let partition = self.partition_mut(id)?;
        partition.primary = new_primary;
        partition.secondary = secondary;
        partition.epoch = epoch;
        partition.lease = None;
        // Whoever is secondary now, the new primary has not confirmed it
        // holds every record it acknowledged (see `secondary_catching_up`).
        partition.secondary_catching_up = true;
        Ok(Outcome::EpochChanged {
            partition: id,
            epoch,
        })
    }

    fn change_secondary(
        &mut self,
        id: PartitionId,
        new_secondary: NodeId,
    ) -> Result<Outcome, CommandError> {
        let partition = self.partition_ref(id)?;
        self.up_node(&new_secondary)?;
        if new_secondary == partition.primary {
            return Err(CommandError::PrimaryEqualsSecondary {
                partition: id,
                node: new_secondary,
            });
        }
        if new_secondary == partition.secondary {
            return Err(CommandError::invalid(format!(
                "{new_secondary} is already secondary of {id}"
            )));
        }
        let epoch = next_epoch(id, partition.epoch)?;
        let partition = self.partition_mut(id)?;
        partition.secondary = new_secondary;
        partition.epoch = epoch;
        partition.secondary_catching_up = true;
        Ok(Outcome::EpochChanged {
            partition: id,
            epoch,
        })
    }

    /// The primary at `epoch` reports that `secondary` holds every record
    /// it acknowledged: it may be promoted again. Refused when the roles or
    /// the epoch moved on (the report is about a configuration that no
    /// longer exists); a repeat is a no-op.
    fn secondary_in_sync(
        &mut self,
        id: PartitionId,
        primary: NodeId,
        secondary: NodeId,
        epoch: Epoch,
    ) -> Result<Outcome, CommandError> {
        let partition = self.primary_of_epoch(id, &primary, epoch)?;
        if secondary != partition.secondary {
            return Err(CommandError::invalid(format!(
                "{secondary} is not the secondary of {id} ({} is)",
                partition.secondary
            )));
        }
        self.partition_mut(id)?.secondary_catching_up = false;
        Ok(Outcome::Done)
    }

    /// The partition, if `node` is its primary at `epoch` (else
    /// `NotPrimary` or `StaleEpoch`): what a primary's own report or lease
    /// request must present.
    fn primary_of_epoch(
        &self,
        id: PartitionId,
        node: &NodeId,
        epoch: Epoch,
    ) -> Result<&Partition, CommandError> {
        let partition = self.partition_ref(id)?;
        if *node != partition.primary {
            return Err(CommandError::NotPrimary {
                partition: id,
                node: node.clone(),
                primary: partition.primary.clone(),
            });
        }
        if epoch != partition.epoch {
            return Err(CommandError::StaleEpoch {
                partition: id,
                current: partition.epoch,
                presented: epoch,
            });
        }
        Ok(partition)
    }

    fn grant_lease(
        &mut self,
        id: PartitionId,
        holder: NodeId,
        epoch: Epoch,
        now_ms: u64,
        duration_ms: u64,
    ) -> Result<Outcome, CommandError> {
        let partition = self.primary_of_epoch(id, &holder, epoch)?;
        // A Draining primary keeps serving until it is moved; a Down or
        // Failed one must not block its own failover by renewing.
        let node = self.node(&holder)?;
        if !matches!(node.health, Health::Up | Health::Draining) {
            return Err(CommandError::NodeNotUp {
                node: holder,
                health: node.health,
            });
        }
        if duration_ms == 0 || duration_ms > MAX_LEASE_DURATION_MS {
            return Err(CommandError::invalid(format!(
                "lease duration {duration_ms} ms outside 1..={MAX_LEASE_DURATION_MS}"
            )));
        }
        let until_ms = now_ms
            .checked_add(duration_ms)
            .ok_or_else(|| CommandError::invalid("lease expiry overflows u64"))?;
        let expires_at_ms = match &partition.lease {
            Some(lease) if lease.holder == holder => lease.expires_at_ms.max(until_ms),
            Some(lease) if lease.expires_at_ms > now_ms => {
                return Err(CommandError::LeaseHeld {
                    partition: id,
                    holder: lease.holder.clone(),
                    until_ms: lease.expires_at_ms,
                });
            }
            _ => until_ms,
        };
        let partition = self.partition_mut(id)?;
        partition.lease = Some(Lease {
            holder: holder.clone(),
            expires_at_ms,
        });
        Ok(Outcome::LeaseGranted {
            partition: id,
            holder,
            expires_at_ms,
        })
    }

    // ---- extents ----------------------------------------------------------

    /// Plan `count` extents of `code` (validated, nothing changed yet).
    fn plan_extents(
        &self,
        code: ErasureCode,
        count: usize,
        min_columns: Option<u16>,
    ) -> Result<Vec<Vec<Option<ColumnRef>>>, CommandError> {
        let min_columns = placement::min_columns(code, min_columns);
        let count_u64 =
            u64::try_from(count).map_err(|_| CommandError::invalid("too many extents"))?;
        if self.next_extent_id.checked_add(count_u64).is_none() {
            return Err(CommandError::invalid("extent ids exhausted"));
        }
        let mut taken = BTreeSet::new();
        let mut plans = Vec::with_capacity(count);
        for _ in 0..count {
            let columns = placement::plan_extent(&self.sleds, code, &taken, min_columns)?;
            self.check_new_extent(code, &columns, &taken, min_columns)?;
            taken.extend(columns.iter().flatten().cloned());
            plans.push(columns);
        }
        Ok(plans)
    }

    /// Guard at the commit boundary, independent of the placement policy.
    fn check_new_extent(
        &self,
        code: ErasureCode,
        columns: &[Option<ColumnRef>],
        taken: &BTreeSet<ColumnRef>,
        min_columns: usize,
    ) -> Result<(), CommandError> {
        let present = columns.iter().flatten().count();
        if columns.len() != code.width() || present < min_columns.max(usize::from(code.k)) {
            return Err(CommandError::invalid(format!(
                "extent of code {}+{} needs {} slots with at least {} columns, got {} with {present}",
                code.k,
                code.m,
                code.width(),
                min_columns,
                columns.len()
            )));
        }
        let mut sleds = BTreeSet::new();
        for column in columns.iter().flatten() {
            if !sleds.insert(&column.sled) {
                return Err(CommandError::ColumnsOnSameSled {
                    sled: column.sled.clone(),
                });
            }
            let free = self
                .sleds
                .get(&column.sled)
                .and_then(|s| s.devices.get(&column.device))
                .is_some_and(|d| d.free_columns.contains(&column.index));
            if !free || taken.contains(column) {
                return Err(CommandError::invalid(format!(
                    "column {column} is not free"
                )));
            }
        }
        Ok(())
    }

    /// Commit a planned extent. Infallible: `plan_extents` checked it.
    fn insert_extent(
        &mut self,
        owner: PartitionId,
        code: ErasureCode,
        columns: Vec<Option<ColumnRef>>,
    ) -> ExtentId {
        let id = ExtentId(self.next_extent_id);
        self.next_extent_id = self.next_extent_id.saturating_add(1);
        for column in columns.iter().flatten() {
            if let Some(device) = self
                .sleds
                .get_mut(&column.sled)
                .and_then(|s| s.devices.get_mut(&column.device))
            {
                device.free_columns.remove(&column.index);
                device.used_columns.insert(column.index, id);
            }
        }
        self.extents.insert(
            id,
            Extent {
                id,
                code,
                columns,
                owner,
            },
        );
        id
    }

    fn code_of(&self, id: PartitionId) -> Result<ErasureCode, CommandError> {
        self.partition_ref(id)?;
        self.volumes
            .get(&id.volume)
            .map(|v| v.code)
            .ok_or(CommandError::UnknownVolume { volume: id.volume })
    }

    fn allocate_extent(&mut self, partition: PartitionId) -> Result<Outcome, CommandError> {
        let code = self.code_of(partition)?;
        let mut plans = self.plan_extents(code, 1, None)?;
        let columns = plans
            .pop()
            .ok_or_else(|| CommandError::invalid("empty plan"))?;
        let extent = self.insert_extent(partition, code, columns.clone());
        Ok(Outcome::ExtentAllocated { extent, columns })
    }

    fn refill_sandbox(
        &mut self,
        id: PartitionId,
        target: u32,
        min_columns: Option<u16>,
    ) -> Result<Outcome, CommandError> {
        if target > MAX_SANDBOX_EXTENTS {
            return Err(CommandError::invalid(format!(
                "sandbox target {target} exceeds {MAX_SANDBOX_EXTENTS}"
            )));
        }
        let code = self.code_of(id)?;
        let sandbox = &self.partition_ref(id)?.sandbox;
        // Degraded mode: sandbox extents with a column that cannot be
        // written now are dropped (they were never opened, so no sled
        // holds a claim on their columns) and replaced below.
        let stale: Vec<ExtentId> = if min_columns.is_some() {
            sandbox
                .iter()
                .copied()
                .filter(|e| !self.extent_writable(*e))
                .collect()
        } else {
            Vec::new()
        };
        let have = sandbox.len() - stale.len();
        let missing = (target as usize).saturating_sub(have);
        let plans = if stale.is_empty() {
            self.plan_extents(code, missing, min_columns)?
        } else {
            // Plan as if the stale extents' columns were free again.
            let mut trial = self.clone();
            for extent in &stale {
                trial.drop_sandbox_extent(id, *extent);
            }
            let plans = trial.plan_extents(code, missing, min_columns)?;
            for extent in &stale {
                self.drop_sandbox_extent(id, *extent);
            }
            plans
        };
        let added: Vec<ExtentId> = plans
            .into_iter()
            .map(|columns| self.insert_extent(id, code, columns))
            .collect();
        let partition = self.partition_mut(id)?;
        partition.sandbox.extend(added.iter().copied());
        Ok(Outcome::SandboxRefilled {
            partition: id,
            added,
        })
    }

    /// Every present column of `extent` is on an Up sled and device (a
    /// sandbox extent a primary can open now).
    pub fn extent_writable(&self, extent: ExtentId) -> bool {
        self.extents.get(&extent).is_some_and(|e| {
            e.present().all(|(_, c)| {
                self.sleds.get(&c.sled).is_some_and(|s| {
                    s.health == Health::Up
                        && s.devices
                            .get(&c.device)
                            .is_some_and(|d| d.health == Health::Up)
                })
            })
        })
    }

    /// Removes an unopened sandbox extent: its columns were never claimed,
    /// so they are free again at once.
    fn drop_sandbox_extent(&mut self, id: PartitionId, extent: ExtentId) {
        if let Ok(partition) = self.partition_mut(id) {
            partition.sandbox.remove(&extent);
        }
        self.drop_repairs_of(extent);
        let Some(removed) = self.extents.remove(&extent) else {
            return;
        };
        for column in removed.columns.iter().flatten() {
            if let Ok(device) = self.device_mut(&column.device_ref()) {
                device.used_columns.remove(&column.index);
                device.free_columns.insert(column.index);
            }
        }
    }

    fn check_epoch(&self, id: PartitionId, presented: Epoch) -> Result<&Partition, CommandError> {
        let partition = self.partition_ref(id)?;
        if partition.epoch != presented {
            return Err(CommandError::StaleEpoch {
                partition: id,
                current: partition.epoch,
                presented,
            });
        }
        Ok(partition)
    }

    fn owned_extent(
        &self,
        extent: ExtentId,
        partition: PartitionId,
    ) -> Result<&Extent, CommandError> {
        let entry = self
            .extents
            .get(&extent)
            .ok_or(CommandError::UnknownExtent { extent })?;
        if entry.owner != partition {
            return Err(CommandError::ExtentNotOwned {
                extent,
                owner: entry.owner,
                partition,
            });
        }
        Ok(entry)
    }

    fn open_sandbox_extent(
        &mut self,
        id: PartitionId,
        extent: ExtentId,
        epoch: Epoch,
    ) -> Result<Outcome, CommandError> {
        let partition = self.check_epoch(id, epoch)?;
        if !partition.sandbox.contains(&extent) {
            self.owned_extent(extent, id)?;
            return Err(CommandError::NotInSandbox {
                extent,
                partition: id,
            });
        }
        self.partition_mut(id)?.sandbox.remove(&extent);
        Ok(Outcome::Done)
    }

    fn free_extent(
        &mut self,
        extent: ExtentId,
        id: PartitionId,
        epoch: Epoch,
    ) -> Result<Outcome, CommandError> {
        self.check_epoch(id, epoch)?;
        self.owned_extent(extent, id)?;
        // Both lookups were validated above; no refusal can follow a change.
        self.partition_mut(id)?.sandbox.remove(&extent);
        self.drop_repairs_of(extent);
        let removed = self
            .extents
            .remove(&extent)
            .ok_or(CommandError::UnknownExtent { extent })?;
        for column in removed.columns.iter().flatten() {
            if let Some(device) = self
                .sleds
                .get_mut(&column.sled)
                .and_then(|s| s.devices.get_mut(&column.device))
            {
                device.used_columns.remove(&column.index);
                device.free_columns.insert(column.index);
            }
        }
        Ok(Outcome::ExtentFreed {
            extent,
            columns: removed.columns.into_iter().flatten().collect(),
        })
    }
}

fn next_epoch(partition: PartitionId, current: Epoch) -> Result<Epoch, CommandError> {
    current
        .checked_add(1)
        .ok_or(CommandError::EpochBackwards { partition, current })
}

fn validate_name(what: &str, value: &str) -> Result<(), CommandError> {
    if value.is_empty() || value.len() > 256 {
        return Err(CommandError::invalid(format!(
            "{what} must be 1..=256 bytes"
        )));
    }
    Ok(())
}

fn validate_addresses(address_a: &str, address_b: &str) -> Result<(), CommandError> {
    validate_name("address on network A", address_a)?;
    validate_name("address on network B", address_b)?;
    if address_a == address_b {
        return Err(CommandError::invalid(format!(
            "address {address_a} given for both networks"
        )));
    }
    Ok(())
}
