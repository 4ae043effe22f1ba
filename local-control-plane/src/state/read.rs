//! Read models: what clients (partition map) and operators (unit status)
//! see. Plain serde values computed from the state; the shell adds Raft
//! facts (members, leader, term) to the unit status.

use serde::{Deserialize, Serialize};

use super::repair::{BlockedColumns, DrainOutlook, RepairPhase, RepairTask};
use super::types::{Epoch, HeadNode, Health, NodeId, PathHealth, SledId, VolumeId};
use super::UnitState;
use crate::error::CommandError;

/// A head node and how to reach it on both networks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddress {
    pub id: NodeId,
    pub address_a: String,
    pub address_b: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionEntry {
    pub index: u32,
    pub primary: NodeAddress,
    pub secondary: NodeAddress,
    pub epoch: Epoch,
    /// Expiry of the primary's read lease, if one was granted.
    pub lease_expires_at_ms: Option<u64>,
}

/// Where a volume's partitions live, as a client routes to them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMap {
    pub volume: VolumeId,
    pub size_bytes: u64,
    pub partition_size_bytes: u64,
    pub partitions: Vec<PartitionEntry>,
    /// The volume's QoS limits (absent: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<proto::qos::VolumeQos>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub address_a: String,
    pub address_b: String,
    pub health: Health,
    pub paths: PathHealth,
    pub primaries: usize,
    pub secondaries: usize,
    /// Why the node took itself out of service (a failed write log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub device: u16,
    pub health: Health,
    pub size_bytes: u64,
    pub free_columns: usize,
    pub used_columns: usize,
    /// Reserved as replacements being rebuilt.
    #[serde(default)]
    pub reserved_columns: usize,
    /// No longer used after a repair; not reused.
    #[serde(default)]
    pub retired_columns: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SledStatus {
    pub id: SledId,
    pub health: Health,
    pub paths: PathHealth,
    pub fault_domain: String,
    pub power_domain: String,
    pub column_size_bytes: u64,
    pub devices: Vec<DeviceStatus>,
    /// What draining this sled would do now (columns, and those no other
    /// sled could take, by why): `sled drain` checks it up front.
    #[serde(default)]
    pub drain: DrainOutlook,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CapacitySummary {
    pub free_columns: u64,
    pub used_columns: u64,
    /// Free columns on Up devices of Up sleds: what allocation can use.
    pub allocatable_columns: u64,
    pub free_bytes: u64,
    pub used_bytes: u64,
}

/// Operator view of the unit's state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitStatus {
    pub nodes: Vec<NodeStatus>,
    pub sleds: Vec<SledStatus>,
    pub volumes: usize,
    /// Volumes being deleted (their extents still being freed).
    #[serde(default)]
    pub deleting_volumes: usize,
    pub partitions: usize,
    pub extents: usize,
    pub capacity: CapacitySummary,
    #[serde(default)]
    pub repair: RepairStatus,
    #[serde(default)]
    pub failover: FailoverStatus,
    #[serde(default)]
    pub allocation: AllocationStatus,
    /// Every snapshot record (creating, ready, aborted, deleting).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<super::SnapshotRecord>,
    /// Every volume that is a clone of a snapshot, with its flatten.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clones: Vec<CloneStatus>,
    /// Every volume being rolled back to a snapshot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollbacks: Vec<RollbackStatus>,
}

/// A volume's rollback, for `volume rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackStatus {
    pub volume: super::VolumeId,
    pub name: String,
    pub partitions: usize,
    pub partition_size_blocks: u64,
    pub rollback: super::Rollback,
}

/// A clone and its flatten, for `volume flatten` and `volume describe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneStatus {
    pub volume: super::VolumeId,
    pub name: String,
    pub parent: super::CloneParent,
    /// Blocks of the clone (all partitions).
    pub size_blocks: u64,
    pub partitions: usize,
    /// The flatten in progress, if any.
    pub flatten: Option<super::Flatten>,
}

/// Whether new extents can be allocated at full width, degraded, or not at
/// all, and the degraded extents waiting for their owed columns.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AllocationStatus {
    /// Up sleds with a free column on an Up device: how many columns a new
    /// extent can have.
    pub writable_sleds: usize,
    /// Extents with owed columns.
    pub degraded_extents: usize,
    /// Owed columns across those extents (repair writes them).
    pub owed_columns: usize,
    /// Why new extents are degraded or cannot be allocated, or why owed
    /// columns wait; one line per volume code affected. Empty when every
    /// code gets full-width extents and nothing is owed.
    pub reasons: Vec<String>,
}

/// Head-node failover across the unit, from the recorded health: what the
/// leader's failover controller (`crate::failover`) is working on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FailoverStatus {
    /// Primary on a Down/Failed head node, secondary Up: being promoted
    /// (after the old lease expires).
    pub failing_over: usize,
    /// Primary Up, secondary on a Down/Failed head node: a new secondary is
    /// being named and caught up; writes wait meanwhile.
    pub remirroring: usize,
    /// No copy on an Up head node: waits for one to return.
    pub no_live_copy: usize,
    /// Secondary not yet reported in sync by its primary ("secondary
    /// catching up"): it is not promoted if the primary dies meanwhile.
    #[serde(default)]
    pub secondary_catching_up: usize,
    /// Primary on a Down/Failed head node and secondary still catching up:
    /// unavailable until the old primary returns (a stale copy is never
    /// promoted).
    #[serde(default)]
    pub waiting_for_old_primary: usize,
}

/// Column repair across the unit: what runs, what is left, how fast.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RepairStatus {
    /// Tasks waiting for their primary to start.
    pub pending: usize,
    /// Tasks rebuilding.
    pub running: usize,
    /// Columns on Failed or Draining sleds / Failed devices with no task
    /// yet (admitted as running tasks finish, per the concurrency limit).
    pub columns_waiting: usize,
    /// Bytes still to rebuild in known tasks (running tasks' totals minus
    /// what they did).
    pub bytes_remaining: u64,
    /// Sum of the running tasks' measured rates.
    pub rate_bytes_per_second: u64,
    pub completed: u64,
    pub completed_bytes: u64,
    pub cancelled: u64,
    pub tasks: Vec<RepairTask>,
    /// Of `columns_waiting`, the ones no sled can take now, by why (they
    /// wait for a sled or capacity, not for the concurrency limit).
    #[serde(default)]
    pub blocked: Vec<BlockedColumns>,
}
fn address(node: Option<&HeadNode>, id: &NodeId) -> NodeAddress {
    // Invariant 4 makes `node` Some; an empty address is the honest answer
    // for a state that broke it, rather than a panic in a read path.
    NodeAddress {
        id: id.clone(),
        address_a: node.map(|n| n.address_a.clone()).unwrap_or_default(),
        address_b: node.map(|n| n.address_b.clone()).unwrap_or_default(),
    }
}

impl UnitState {
    /// The partition map of `volume`: primary and secondary with both
    /// addresses, epoch and lease expiry per partition.
    pub fn partition_map(&self, volume: VolumeId) -> Result<PartitionMap, CommandError> {
        if self.deleting.contains_key(&volume) {
            return Err(CommandError::VolumeDeleting { volume });
        }
        let entry = self
            .volumes
            .get(&volume)
            .ok_or(CommandError::UnknownVolume { volume })?;
        let partitions = entry
            .partitions
            .iter()
            .map(|p| PartitionEntry {
                index: p.id.index,
                primary: address(self.nodes.get(&p.primary), &p.primary),
                secondary: address(self.nodes.get(&p.secondary), &p.secondary),
                epoch: p.epoch,
                lease_expires_at_ms: p.lease.as_ref().map(|l| l.expires_at_ms),
            })
            .collect();
        Ok(PartitionMap {
            volume,
            size_bytes: entry.size_bytes,
            partition_size_bytes: entry.partition_size_bytes,
            partitions,
            qos: entry.qos,
        })
    }

    pub fn unit_status(&self) -> UnitStatus {
        let all_partitions = || self.volumes.values().flat_map(|v| v.partitions.iter());
        let nodes = self
            .nodes
            .values()
            .map(|n| NodeStatus {
                id: n.id.clone(),
                address_a: n.address_a.clone(),
                address_b: n.address_b.clone(),
                health: n.health,
                paths: n.paths,
                primaries: all_partitions().filter(|p| p.primary == n.id).count(),
                secondaries: all_partitions().filter(|p| p.secondary == n.id).count(),
                failure: n.failure.clone(),
            })
            .collect();
        let mut capacity = CapacitySummary::default();
        let sleds = self
            .sleds
            .values()
            .map(|s| {
                let devices = s
                    .devices
                    .iter()
                    .map(|(n, d)| {
                        let free = d.free_columns.len() as u64;
                        let used = d.used_columns.len() as u64;
                        capacity.free_columns += free;
                        capacity.used_columns += used;
                        capacity.free_bytes += free.saturating_mul(s.column_size_bytes);
                        capacity.used_bytes += used.saturating_mul(s.column_size_bytes);
                        if s.health == Health::Up && d.health == Health::Up {
                            capacity.allocatable_columns += free;
                        }
                        DeviceStatus {
                            device: *n,
                            health: d.health,
                            size_bytes: d.size_bytes,
                            free_columns: d.free_columns.len(),
                            used_columns: d.used_columns.len(),
                            reserved_columns: d.reserved_columns.len(),
                            retired_columns: d.retired_columns.len(),
                        }
                    })
                    .collect();
                SledStatus {
                    id: s.id.clone(),
                    health: s.health,
                    paths: s.paths,
                    fault_domain: s.fault_domain.clone(),
                    power_domain: s.power_domain.clone(),
                    column_size_bytes: s.column_size_bytes,
                    devices,
                    drain: self.drain_outlook(&s.id),
                }
            })
            .collect();
        UnitStatus {
            nodes,
            sleds,
            volumes: self.volumes.len(),
            deleting_volumes: self.deleting.len(),
            snapshots: self.snapshots.values().cloned().collect(),
            clones: self
                .volumes
                .values()
                .filter_map(|v| {
                    Some(CloneStatus {
                        volume: v.id,
                        name: v.name.clone(),
                        parent: v.parent?,
                        size_blocks: v.size_bytes / proto::BLOCK_SIZE_BYTES,
                        partitions: v.partitions.len(),
                        flatten: v.flatten.clone(),
                    })
                })
                .collect(),
            rollbacks: self
                .volumes
                .values()
                .filter_map(|v| {
                    Some(RollbackStatus {
                        volume: v.id,
                        name: v.name.clone(),
                        partitions: v.partitions.len(),
                        partition_size_blocks: v.partition_size_bytes / proto::BLOCK_SIZE_BYTES,
                        rollback: v.rollback.clone()?,
                    })
                })
                .collect(),
            partitions: all_partitions().count(),
            extents: self.extents.len(),
            capacity,
            repair: self.repair_status(),
            failover: self.failover_status(),
            allocation: self.allocation_status(),
        }
    }

    pub fn allocation_status(&self) -> AllocationStatus {
        let writable_sleds = self
            .sleds
            .values()
            .filter(|s| s.health == Health::Up)
            .filter(|s| {
                s.devices
                    .values()
                    .any(|d| d.health == Health::Up && !d.free_columns.is_empty())
            })
            .count();
        let mut status = AllocationStatus {
            writable_sleds,
            ..AllocationStatus::default()
        };
        let codes: std::collections::BTreeSet<(u8, u8)> = self
            .volumes
            .values()
            .map(|v| (v.code.k, v.code.m))
            .collect();
        for (k, m) in codes {
            let width = usize::from(k) + usize::from(m);
            if writable_sleds >= width {
                continue;
            }
            status.reasons.push(if writable_sleds > usize::from(k) {
                format!(
                    "{k}+{m}: only {writable_sleds} sleds can take a column: new extents are degraded ({} columns owed each, written by repair when a sled returns or is added)",
                    width - writable_sleds
                )
            } else if writable_sleds == usize::from(k) {
                format!(
                    "{k}+{m}: only {writable_sleds} sleds can take a column: new extents only if min_flush_columns is {k}; otherwise flushes wait and the write logs absorb writes"
                )
            } else {
                format!(
                    "{k}+{m}: only {writable_sleds} sleds can take a column, fewer than k={k}: no new extent, flushes wait and the write logs absorb writes until sleds return"
                )
            });
        }
        for extent in self.extents.values() {
            let owed = extent.owed().count();
            if owed > 0 {
                status.degraded_extents += 1;
                status.owed_columns += owed;
            }
        }
        let waiting = self
            .columns_needing_repair()
            .into_iter()
            .filter(|(extent, index, reason)| {
                *reason == super::repair::RepairReason::Owed
                    && self.plan_replacement(*extent, *index).is_err()
            })
            .count();
        if waiting > 0 {
            status.reasons.push(format!(
                "{waiting} owed columns wait: every Up sled with free columns already holds a column of their extent"
            ));
        }
        status
    }

    pub fn failover_status(&self) -> FailoverStatus {
        let health = |node: &NodeId| self.nodes.get(node).map(|n| n.health);
        let dead = |node: &NodeId| matches!(health(node), Some(Health::Down | Health::Failed));
        let up = |node: &NodeId| health(node) == Some(Health::Up);
        let mut status = FailoverStatus::default();
        for p in self.volumes.values().flat_map(|v| v.partitions.iter()) {
            if p.secondary_catching_up {
                status.secondary_catching_up += 1;
            }
            if !up(&p.primary) && !up(&p.secondary) {
                status.no_live_copy += 1;
            } else if dead(&p.primary) && p.secondary_catching_up {
                status.waiting_for_old_primary += 1;
            } else if dead(&p.primary) {
                status.failing_over += 1;
            } else if dead(&p.secondary) {
                status.remirroring += 1;
            }
        }
        status
    }

    pub fn repair_status(&self) -> RepairStatus {
        let book = self.repairs();
        let running = || {
            book.tasks
                .iter()
                .filter(|t| t.phase == RepairPhase::Running)
        };
        RepairStatus {
            pending: book
                .tasks
                .iter()
                .filter(|t| t.phase == RepairPhase::Pending)
                .count(),
            running: running().count(),
            columns_waiting: self.columns_needing_repair().len(),
            bytes_remaining: book
                .tasks
                .iter()
                .map(|t| t.bytes_total.saturating_sub(t.bytes_done))
                .sum(),
            rate_bytes_per_second: running().map(RepairTask::measured_bytes_per_second).sum(),
            completed: book.completed,
            completed_bytes: book.completed_bytes,
            cancelled: book.cancelled,
            tasks: book.tasks.clone(),
            blocked: self.blocked_repairs(),
        }
    }
}
