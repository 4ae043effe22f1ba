//! Column repair in the unit state: replacing one column of an extent.
//!
//! # Design
//!
//! A column is replaced in two replicated steps, so that the extent always
//! names columns that hold its data:
//!
//! ```text
//!  ReplaceColumn ─▶ task Pending: new column taken from the free set and
//!                   *reserved* for (extent, column index); the extent still
//!                   lists the old column (degraded reads decode around it)
//!  RepairProgress ─▶ task Running: the partition's primary claimed the new
//!                   column and reports rebuilt bytes (operator progress)
//!  CompleteRepair ─▶ the extent lists the new column at the same index (the
//!                   index's Sled locations keep working); the old column is
//!                   retired; the task is gone, the totals count it
//!  CancelRepair   ─▶ the reserved column is retired (it may hold a partial
//!                   rebuild), the task is gone; the controller plans again
//!  ReclaimColumns ─▶ the leader freed retired columns on their (reachable)
//!                   sleds; they are free again
//! ```
//!
//! **Retired columns** are not handed out while retired (they may hold
//! claimed data of the old owner). The leader's repair controller frees them
//! on the sled (`FreeColumn` as the owner the sled reports) and then commits
//! `ReclaimColumns`; a crash between the two only leaves a column retired
//! that the sled already freed, which the next pass finds free and
//! reclaims. A **Failed sled returns** (`SetSledHealth Up`) once it answers
//! on both networks again and no extent and no repair uses any of its
//! columns; its retired columns are then reclaimed like any other.
//!
//! Only the owning partition's **current epoch** may report progress or
//! complete (the primary proves it is the writer; a deposed primary is
//! refused with `StaleEpoch`). The index within the extent never changes, so
//! nothing else (index entries, summaries) has to move.
//!
//! **Placement of a replacement** ([`UnitState::plan_replacement`]): an Up
//! device of an Up sled that holds no column of the extent and no other
//! reserved replacement of it (ARCHITECTURE.md invariant 3 holds for the
//! extent and for every extent the repair can produce), preferring fault domains,
//! then power domains, the extent does not use yet, then the sled with the
//! most free columns, then the id. Pure and deterministic.
//!
//! **What needs repair** ([`UnitState::columns_needing_repair`]): a column
//! on a Failed sled, a Failed device, or a Draining sled, and an **owed**
//! column of a degraded extent (`RepairReason::Owed`, the task's `old` is
//! `None`), with no task yet. A Down sled is not repaired until the
//! controller declares it Failed (it may come back with its data). An owed
//! column is placed like any replacement, so it waits until an Up sled
//! holds no column of its extent (a replacement sled, or the one that
//! returns).
//!
//! Invariants added to [`UnitState::check_invariants`]: free, used,
//! reserved and retired columns of a device are disjoint; every reserved
//! column belongs to exactly one task and vice versa; a task's new column is
//! on a sled holding no other column or reservation of its extent.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::types::{ColumnRef, Epoch, ExtentId, Health, NodeId, PartitionId, SledId};
use super::UnitState;
use crate::command::Outcome;
use crate::error::CommandError;

/// Why a column that needs a new home has none now (typed, so status,
/// metrics and the CLI agree; `Display` is the operator's sentence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PlacementBlock {
    /// Every Up sled already holds a column of the extent, and two columns
    /// of an extent never share a sled.
    NoOtherSled { width: usize, up_sleds: usize },
    /// Sleds that could take it exist, but none has a free column on an
    /// Up device.
    NoFreeColumn { sleds: usize },
}

impl PlacementBlock {
    /// Stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            PlacementBlock::NoOtherSled { .. } => "no_other_sled",
            PlacementBlock::NoFreeColumn { .. } => "no_free_column",
        }
    }
}

impl std::fmt::Display for PlacementBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlacementBlock::NoOtherSled { width, up_sleds } => write!(
                f,
                "no sled left that keeps the extent's {width} columns on distinct sleds \
                 ({up_sleds} usable sleds, each already holding one): add or bring back a sled"
            ),
            PlacementBlock::NoFreeColumn { sleds } => write!(
                f,
                "the {sleds} sleds that could take it have no free column on a healthy device: \
                 add capacity or free space"
            ),
        }
    }
}

/// See [`UnitState::drain_outlook`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DrainOutlook {
    /// Columns the sled holds.
    pub columns: usize,
    /// Of those, the ones that could not be placed elsewhere now, by why.
    pub blocked: Vec<BlockedColumns>,
}

impl DrainOutlook {
    pub fn blocked_columns(&self) -> usize {
        self.blocked.iter().map(|b| b.columns).sum()
    }
}

/// Columns that cannot be placed, for one reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockedColumns {
    pub block: PlacementBlock,
    pub columns: usize,
}

fn grouped(counts: BTreeMap<PlacementBlock, usize>) -> Vec<BlockedColumns> {
    counts
        .into_iter()
        .map(|(block, columns)| BlockedColumns { block, columns })
        .collect()
}

/// Bound on repair tasks held at once (the controller admits far fewer).
pub const MAX_REPAIR_TASKS: usize = 4096;
/// Bound on columns reclaimed by one `ReclaimColumns`.
pub const MAX_RECLAIM_PER_COMMAND: usize = 256;

/// Why a column is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RepairReason {
    /// Its sled was declared Failed.
    SledFailed,
    /// Its device was declared Failed.
    DeviceFailed,
    /// Its sled is being drained by an operator.
    Drain,
    /// A checksum failure (read or scrub) in a column that cannot be
    /// rewritten in place.
    Corruption,
    /// The extent was allocated degraded and never had this column (see
    /// `Extent::columns`); it is written for the first time.
    Owed,
}

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RepairPhase {
    /// Waiting for the partition's primary to start.
    Pending,
    /// The primary is rebuilding; see the byte counts.
    Running,
}

/// One column being replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairTask {
    pub extent: ExtentId,
    /// Index of the column within the extent (stripe order).
    pub column_index: u16,
    pub partition: PartitionId,
    /// The column being replaced; `None` for an owed column (the serde
    /// form of `Some` is the bare column, as before owed columns existed).
    pub old: Option<ColumnRef>,
    /// The reserved replacement.
    pub new: ColumnRef,
    pub reason: RepairReason,
    pub phase: RepairPhase,
    /// Head node that last reported progress.
    pub node: Option<NodeId>,
    pub bytes_done: u64,
    /// 0 until the primary knows how much the column holds.
    pub bytes_total: u64,
    /// This task's share of the unit's repair bandwidth.
    pub rate_bytes_per_second: u64,
    pub created_ms: u64,
    /// First progress report (rate computation).
    pub started_ms: Option<u64>,
    pub updated_ms: u64,
}

impl RepairTask {
    /// Measured rebuild rate of this task so far.
    pub fn measured_bytes_per_second(&self) -> u64 {
        match self.started_ms {
            Some(start) if self.updated_ms > start => {
                self.bytes_done.saturating_mul(1000) / (self.updated_ms - start)
            }
            _ => 0,
        }
    }
}

/// Repair bookkeeping of the unit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairBook {
    /// Tasks in progress, in creation order.
    pub tasks: Vec<RepairTask>,
    /// Tasks completed since the unit was created.
    pub completed: u64,
    /// Bytes rebuilt by completed tasks.
    pub completed_bytes: u64,
    /// Tasks cancelled (new column lost mid-rebuild, ...).
    pub cancelled: u64,
}

impl RepairBook {
    pub fn find(&self, extent: ExtentId, column_index: u16) -> Option<&RepairTask> {
        self.tasks
            .iter()
            .find(|t| t.extent == extent && t.column_index == column_index)
    }

    fn position(&self, extent: ExtentId, column_index: u16) -> Result<usize, CommandError> {
        self.tasks
            .iter()
            .position(|t| t.extent == extent && t.column_index == column_index)
            .ok_or_else(|| {
                CommandError::invalid(format!(
                    "no repair task for column {column_index} of extent {extent}"
                ))
            })
    }
}

impl UnitState {
    pub fn repairs(&self) -> &RepairBook {
        &self.repairs
    }

    /// Health of the sled and device holding `column` (None if unknown).
    fn column_health(&self, column: &ColumnRef) -> Option<(Health, Health)> {
        let sled = self.sleds.get(&column.sled)?;
        let device = sled.devices.get(&column.device)?;
        Some((sled.health, device.health))
    }

    /// Why a replacement for column `column_index` of `extent` cannot be
    /// placed now, or `None` if it can. `also_excluded` is a sled treated
    /// as unusable on top of the state's own health (a sled about to be
    /// drained). Same candidate rule as
    /// [`plan_replacement`](Self::plan_replacement): an Up sled that holds
    /// no column of the extent, with a free column on an Up device.
    pub fn placement_block(
        &self,
        extent: ExtentId,
        also_excluded: Option<&SledId>,
    ) -> Option<PlacementBlock> {
        let entry = self.extents.get(&extent)?;
        let avoid = self.sleds_of_extent(extent);
        let candidates: Vec<_> = self
            .sleds
            .values()
            .filter(|s| s.health == Health::Up && Some(&s.id) != also_excluded)
            .filter(|s| !avoid.contains(&s.id))
            .collect();
        if candidates.is_empty() {
            let up_sleds = self
                .sleds
                .values()
                .filter(|s| s.health == Health::Up && Some(&s.id) != also_excluded)
                .count();
            return Some(PlacementBlock::NoOtherSled {
                width: entry.columns.len(),
                up_sleds,
            });
        }
        let with_space = candidates.iter().any(|s| {
            s.devices
                .values()
                .any(|d| d.health == Health::Up && !d.free_columns.is_empty())
        });
        (!with_space).then_some(PlacementBlock::NoFreeColumn {
            sleds: candidates.len(),
        })
    }

    /// Columns needing repair that cannot be placed now, grouped by why.
    pub fn blocked_repairs(&self) -> Vec<BlockedColumns> {
        let mut out = BTreeMap::new();
        for (extent, _, _) in self.columns_needing_repair() {
            if let Some(block) = self.placement_block(extent, None) {
                *out.entry(block).or_insert(0) += 1;
            }
        }
        grouped(out)
    }

    /// What draining `sled` would do: its columns (of volumes not being
    /// deleted) and, of those, the ones no other sled could take now,
    /// grouped by why.
    pub fn drain_outlook(&self, sled: &SledId) -> DrainOutlook {
        let mut columns = 0;
        let mut blocked = BTreeMap::new();
        for (id, extent) in &self.extents {
            if self.deleting.contains_key(&extent.owner.volume) {
                continue;
            }
            for (_, column) in extent.present() {
                if &column.sled != sled {
                    continue;
                }
                columns += 1;
                if let Some(block) = self.placement_block(*id, Some(sled)) {
                    *blocked.entry(block).or_insert(0) += 1;
                }
            }
        }
        DrainOutlook {
            columns,
            blocked: grouped(blocked),
        }
    }

    /// Columns that need a replacement and have no task yet, in extent
    /// order: `(extent, column index, reason)`.
    pub fn columns_needing_repair(&self) -> Vec<(ExtentId, u16, RepairReason)> {
        let mut out = Vec::new();
        for (id, extent) in &self.extents {
            // A volume being deleted is freed, not repaired.
            if self.deleting.contains_key(&extent.owner.volume) {
                continue;
            }
            for (index, column) in extent.columns.iter().enumerate() {
                let Ok(index) = u16::try_from(index) else {
                    continue;
                };
                let Some(column) = column else {
                    if self.repairs.find(*id, index).is_none() {
                        out.push((*id, index, RepairReason::Owed));
                    }
                    continue;
                };
                let reason = match self.column_health(column) {
                    Some((Health::Failed, _)) | None => RepairReason::SledFailed,
                    Some((Health::Draining, _)) => RepairReason::Drain,
                    Some((_, Health::Failed)) => RepairReason::DeviceFailed,
                    _ => continue,
                };
                if self.repairs.find(*id, index).is_none() {
                    out.push((*id, index, reason));
                }
            }
        }
        out
    }

    /// Sleds an extent touches: its columns and the replacements reserved
    /// for it (a replacement must avoid all of them).
    fn sleds_of_extent(&self, extent: ExtentId) -> BTreeSet<SledId> {
        let mut sleds: BTreeSet<SledId> = self
            .extents
            .get(&extent)
            .map(|e| e.present().map(|(_, c)| c.sled.clone()).collect())
            .unwrap_or_default();
        sleds.extend(
            self.repairs
                .tasks
                .iter()
                .filter(|t| t.extent == extent)
                .map(|t| t.new.sled.clone()),
        );
        sleds
    }

    /// A replacement for column `column_index` of `extent` (see module docs).
    pub fn plan_replacement(
        &self,
        extent: ExtentId,
        column_index: u16,
    ) -> Result<ColumnRef, CommandError> {
        self.plan_replacement_avoiding(extent, column_index, &BTreeSet::new())
    }

    /// [`plan_replacement`](Self::plan_replacement) that also avoids
    /// columns `taken` by replacements planned earlier in the same batch.
    pub fn plan_replacement_avoiding(
        &self,
        extent: ExtentId,
        column_index: u16,
        taken: &BTreeSet<ColumnRef>,
    ) -> Result<ColumnRef, CommandError> {
        let entry = self
            .extents
            .get(&extent)
            .ok_or(CommandError::UnknownExtent { extent })?;
        if usize::from(column_index) >= entry.columns.len() {
            return Err(CommandError::invalid(format!(
                "extent {extent} has no column {column_index}"
            )));
        }
        let avoid = self.sleds_of_extent(extent);
        let domains = |f: fn(&super::Sled) -> &str| -> BTreeSet<String> {
            entry
                .present()
                .filter(|(i, _)| *i != column_index)
                .filter_map(|(_, c)| self.sleds.get(&c.sled).map(|s| f(s).to_string()))
                .collect()
        };
        let fault_domains = domains(|s| s.fault_domain.as_str());
        let power_domains = domains(|s| s.power_domain.as_str());
        let best = self
            .sleds
            .values()
            .filter(|s| s.health == Health::Up && !avoid.contains(&s.id))
            .filter_map(|s| {
                let column = |device: u16, index: u32| ColumnRef {
                    sled: s.id.clone(),
                    device,
                    index,
                };
                let free_on = |device: u16, d: &super::Device| {
                    d.free_columns
                        .iter()
                        .filter(|i| !taken.contains(&column(device, **i)))
                        .count()
                };
                let (device, d) = s
                    .devices
                    .iter()
                    .filter(|(n, d)| d.health == Health::Up && free_on(**n, d) > 0)
                    .max_by_key(|(n, d)| (free_on(**n, d), std::cmp::Reverse(**n)))?;
                let index = *d
                    .free_columns
                    .iter()
                    .find(|i| !taken.contains(&column(*device, **i)))?;
                let free: usize = s.devices.values().map(|d| d.free_columns.len()).sum();
                let key = (
                    fault_domains.contains(&s.fault_domain),
                    power_domains.contains(&s.power_domain),
                    std::cmp::Reverse(free),
                    s.id.clone(),
                );
                Some((
                    key,
                    ColumnRef {
                        sled: s.id.clone(),
                        device: *device,
                        index,
                    },
                ))
            })
            .min_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, c)| c);
        best.ok_or(CommandError::NoSpace {
            needed: 1,
            available: 0,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn replace_column(
        &mut self,
        extent: ExtentId,
        column_index: u16,
        new: ColumnRef,
        expected_epoch: Option<Epoch>,
        reason: RepairReason,
        rate_bytes_per_second: u64,
        now_ms: u64,
    ) -> Result<Outcome, CommandError> {
        let entry = self
            .extents
            .get(&extent)
            .ok_or(CommandError::UnknownExtent { extent })?;
        let old: Option<ColumnRef> = entry
            .columns
            .get(usize::from(column_index))
            .cloned()
            .ok_or_else(|| {
                CommandError::invalid(format!("extent {extent} has no column {column_index}"))
            })?;
        let partition = entry.owner;
        if self.deleting.contains_key(&partition.volume) {
            return Err(CommandError::VolumeDeleting {
                volume: partition.volume,
            });
        }
        if let Some(expected) = expected_epoch {
            self.check_epoch(partition, expected)?;
        }
        if (old.is_none()) != (reason == RepairReason::Owed) {
            return Err(CommandError::invalid(format!(
                "column {column_index} of extent {extent}: reason {reason:?} does not fit {}",
                if old.is_none() {
                    "an owed column"
                } else {
                    "a present column"
                }
            )));
        }
        if self.repairs.find(extent, column_index).is_some() {
            return Err(CommandError::AlreadyExists {
                entity: crate::error::Entity::Column,
                id: format!("repair of column {column_index} of extent {extent}"),
            });
        }
        if self.repairs.tasks.len() >= MAX_REPAIR_TASKS {
            return Err(CommandError::invalid(format!(
                "{MAX_REPAIR_TASKS} repair tasks already"
            )));
        }
        if self.sleds_of_extent(extent).contains(&new.sled) {
            return Err(CommandError::ColumnsOnSameSled { sled: new.sled });
        }
        let sled = self.sled(&new.sled)?;
        let device = sled
            .devices
            .get(&new.device)
            .ok_or_else(|| CommandError::UnknownDevice {
                device: new.device_ref(),
            })?;
        if sled.health != Health::Up || device.health != Health::Up {
            return Err(CommandError::invalid(format!(
                "replacement {new} is not on an Up sled and device"
            )));
        }
        if !device.free_columns.contains(&new.index) {
            return Err(CommandError::invalid(format!("column {new} is not free")));
        }
        // Validated; now mutate (cannot fail).
        let device = self.device_mut(&new.device_ref())?;
        device.free_columns.remove(&new.index);
        device.reserved_columns.insert(new.index, extent);
        self.repairs.tasks.push(RepairTask {
            extent,
            column_index,
            partition,
            old,
            new: new.clone(),
            reason,
            phase: RepairPhase::Pending,
            node: None,
            bytes_done: 0,
            bytes_total: 0,
            rate_bytes_per_second,
            created_ms: now_ms,
            started_ms: None,
            updated_ms: now_ms,
        });
        Ok(Outcome::RepairScheduled {
            extent,
            column_index,
            new,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn repair_progress(
        &mut self,
        extent: ExtentId,
        column_index: u16,
        node: NodeId,
        epoch: Epoch,
        bytes_done: u64,
        bytes_total: u64,
        now_ms: u64,
    ) -> Result<Outcome, CommandError> {
        let at = self.repairs.position(extent, column_index)?;
        let partition = self.repairs.tasks[at].partition;
        self.check_epoch(partition, epoch)?;
        if bytes_done > bytes_total {
            return Err(CommandError::invalid(format!(
                "{bytes_done} bytes done of {bytes_total}"
            )));
        }
        let task = &mut self.repairs.tasks[at];
        task.phase = RepairPhase::Running;
        task.node = Some(node);
        task.bytes_done = bytes_done;
        task.bytes_total = bytes_total;
        task.started_ms.get_or_insert(now_ms);
        task.updated_ms = task.updated_ms.max(now_ms);
        Ok(Outcome::Done)
    }

    pub(super) fn complete_repair(
        &mut self,
        extent: ExtentId,
        column_index: u16,
        new: ColumnRef,
        epoch: Epoch,
    ) -> Result<Outcome, CommandError> {
        let at = self.repairs.position(extent, column_index)?;
        let task = &self.repairs.tasks[at];
        if task.new != new {
            return Err(CommandError::invalid(format!(
                "column {column_index} of extent {extent} is being replaced by {}, not {new}",
                task.new
            )));
        }
        self.check_epoch(task.partition, epoch)?;
        if !self.extents.contains_key(&extent) {
            return Err(CommandError::UnknownExtent { extent });
        }
        // Validated; now mutate.
        let task = self.repairs.tasks.remove(at);
        if let Some(e) = self.extents.get_mut(&extent) {
            if let Some(slot) = e.columns.get_mut(usize::from(column_index)) {
                *slot = Some(new.clone());
            }
        }
        if let Some(old) = &task.old {
            if let Ok(device) = self.device_mut(&old.device_ref()) {
                device.used_columns.remove(&old.index);
                device.retired_columns.insert(old.index);
            }
        }
        if let Ok(device) = self.device_mut(&new.device_ref()) {
            device.reserved_columns.remove(&new.index);
            device.used_columns.insert(new.index, extent);
        }
        self.repairs.completed = self.repairs.completed.saturating_add(1);
        self.repairs.completed_bytes = self
            .repairs
            .completed_bytes
            .saturating_add(task.bytes_total);
        Ok(Outcome::Done)
    }

    pub(super) fn cancel_repair(
        &mut self,
        extent: ExtentId,
        column_index: u16,
    ) -> Result<Outcome, CommandError> {
        let at = self.repairs.position(extent, column_index)?;
        let task = self.repairs.tasks.remove(at);
        self.retire_reserved(&task.new);
        self.repairs.cancelled = self.repairs.cancelled.saturating_add(1);
        Ok(Outcome::Done)
    }

    /// `ReclaimColumns`: retired columns the leader freed on their sleds
    /// become free again. Only retired columns move (a repeat, or a column
    /// that is free, used or reserved, is skipped); the outcome is `Done`.
    pub(super) fn reclaim_columns(
        &mut self,
        columns: &[ColumnRef],
    ) -> Result<Outcome, CommandError> {
        if columns.len() > MAX_RECLAIM_PER_COMMAND {
            return Err(CommandError::invalid(format!(
                "{} columns in one ReclaimColumns (at most {MAX_RECLAIM_PER_COMMAND})",
                columns.len()
            )));
        }
        for column in columns {
            if let Ok(device) = self.device_mut(&column.device_ref()) {
                if device.retired_columns.remove(&column.index) {
                    device.free_columns.insert(column.index);
                }
            }
        }
        Ok(Outcome::Done)
    }

    /// Retired columns that can be freed on their sleds now: the sled is
    /// reachable (Up or Draining) and the device Up. At most `limit`.
    pub fn reclaimable_columns(&self, limit: usize) -> Vec<ColumnRef> {
        let mut out = Vec::new();
        for (sled_id, sled) in &self.sleds {
            if !matches!(sled.health, Health::Up | Health::Draining) {
                continue;
            }
            for (device_index, device) in &sled.devices {
                if device.health != Health::Up {
                    continue;
                }
                for index in &device.retired_columns {
                    if out.len() >= limit {
                        return out;
                    }
                    out.push(ColumnRef {
                        sled: sled_id.clone(),
                        device: *device_index,
                        index: *index,
                    });
                }
            }
        }
        out
    }

    /// Failed sleds that may return to service: reachable again on both
    /// networks (as recorded by the detector) and holding no column of any
    /// extent and no reserved replacement — everything they held has been
    /// rebuilt elsewhere, so whatever stale data they carry is in retired
    /// columns only, which are freed on the sled before reuse.
    pub fn failed_sleds_ready_to_return(&self) -> Vec<SledId> {
        self.sleds
            .values()
            .filter(|s| s.health == Health::Failed)
            .filter(|s| s.paths.network_a_up && s.paths.network_b_up)
            .filter(|s| {
                s.devices
                    .values()
                    .all(|d| d.used_columns.is_empty() && d.reserved_columns.is_empty())
            })
            .map(|s| s.id.clone())
            .collect()
    }

    fn retire_reserved(&mut self, column: &ColumnRef) {
        if let Ok(device) = self.device_mut(&column.device_ref()) {
            device.reserved_columns.remove(&column.index);
            device.retired_columns.insert(column.index);
        }
    }

    /// The extent is being freed: its tasks go, their reserved columns are
    /// retired (a partial rebuild may sit on them).
    pub(super) fn drop_repairs_of(&mut self, extent: ExtentId) {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.repairs.tasks)
            .into_iter()
            .partition(|t| t.extent == extent);
        self.repairs.tasks = kept;
        for task in gone {
            self.retire_reserved(&task.new);
            self.repairs.cancelled = self.repairs.cancelled.saturating_add(1);
        }
    }

    pub(super) fn check_repairs(&self) -> Result<(), String> {
        let mut reserved: BTreeMap<ColumnRef, ExtentId> = BTreeMap::new();
        for (sled_id, sled) in &self.sleds {
            for (device_id, d) in &sled.devices {
                let c = |index: u32| ColumnRef {
                    sled: sled_id.clone(),
                    device: *device_id,
                    index,
                };
                for (index, extent) in &d.reserved_columns {
                    if d.free_columns.contains(index)
                        || d.used_columns.contains_key(index)
                        || d.retired_columns.contains(index)
                    {
                        return Err(format!(
                            "reserved column {} is also free/used/retired",
                            c(*index)
                        ));
                    }
                    reserved.insert(c(*index), *extent);
                }
                for index in &d.retired_columns {
                    if d.free_columns.contains(index) || d.used_columns.contains_key(index) {
                        return Err(format!("retired column {} is also free/used", c(*index)));
                    }
                }
            }
        }
        let mut seen = BTreeSet::new();
        for task in &self.repairs.tasks {
            if !seen.insert((task.extent, task.column_index)) {
                return Err(format!(
                    "two tasks for column {} of extent {}",
                    task.column_index, task.extent
                ));
            }
            if reserved.remove(&task.new) != Some(task.extent) {
                return Err(format!(
                    "task for extent {} does not hold its reservation {}",
                    task.extent, task.new
                ));
            }
            let Some(extent) = self.extents.get(&task.extent) else {
                return Err(format!("task for unknown extent {}", task.extent));
            };
            if extent.columns.get(usize::from(task.column_index)) != Some(&task.old) {
                return Err(format!(
                    "task for extent {} column {} names {:?} but the extent lists {:?}",
                    task.extent,
                    task.column_index,
                    task.old,
                    extent.columns.get(usize::from(task.column_index))
                ));
            }
            if task.old.is_none() != (task.reason == RepairReason::Owed) {
                return Err(format!(
                    "task for extent {} column {}: reason {:?} with old column {:?}",
                    task.extent, task.column_index, task.reason, task.old
                ));
            }
            let others = extent.present().map(|(_, c)| &c.sled).chain(
                self.repairs
                    .tasks
                    .iter()
                    .filter(|t| t.extent == task.extent && t.column_index != task.column_index)
                    .map(|t| &t.new.sled),
            );
            if others.into_iter().any(|s| *s == task.new.sled) {
                return Err(format!(
                    "replacement {} shares a sled with extent {}",
                    task.new, task.extent
                ));
            }
        }
        if let Some((column, extent)) = reserved.into_iter().next() {
            return Err(format!(
                "column {column} reserved for extent {extent} without a task"
            ));
        }
        Ok(())
    }
}
