//! Snapshot records: crash-consistent snapshots of one volume or of a
//! consistency group of volumes, as the unit decided them.
//!
//! ```text
//! CreateSnapshot{name, volumes}   ──▶ Creating   (id assigned, never reused)
//!   coordinator (leader): every partition's primary cuts and holds the
//!   acknowledgements of later writes; all cut ─▶ SnapshotCut{cuts}
//! SnapshotCut{cuts}                Creating ──▶ Ready    (one cut per partition
//!                                                         of every volume, each at
//!                                                         the partition's current epoch)
//!   coordinator releases every cut (acks flow again)
//! AbortSnapshot{reason}            Creating ──▶ Aborted  (a primary failed or a cut
//!                                                         timed out; never visible)
//! DeleteSnapshot                   Ready | Aborted ──▶ Deleting
//!   head nodes drop the snapshot's layers (what only it pinned is GC'd)
//! PurgeSnapshot                    Deleting | Aborted ──▶ gone
//! ```
//!
//! **Why the epoch check.** A cut lives in the partition's write logs (a
//! marker record on both head nodes); a cut reported at an epoch that is no
//! longer the partition's was taken by a primary that has been replaced
//! since: the new one may not hold it (its marker may have been
//! unconfirmed), so `SnapshotCut` refuses it and the coordinator aborts.
//!
//! A volume with a snapshot that is not purged cannot be deleted
//! (`DeleteVolume` is refused): its layers live in the volume's partitions.
//!
//! **Clones.** `RegisterClone` makes a new volume whose record names its
//! parent ([`CloneParent`]: a ready snapshot of a live volume of the
//! same size, partition size and code); head nodes read the blocks the
//! clone never wrote from the parent snapshot's partition of the same
//! index. `DeleteSnapshot` of a snapshot a live clone names is refused
//! ([`CommandError::SnapshotHasClones`]); deleting the clone frees it.

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use super::types::{CloneParent, Epoch, Flatten, PartitionId, Rollback, VolumeId};
use super::UnitState;
use crate::command::Outcome;
use crate::error::CommandError;

/// Snapshot id (unit-wide, never reused).
pub type SnapshotId = u64;

/// Where a snapshot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotState {
    /// Being cut; not visible to readers.
    Creating,
    /// Every partition cut: readable.
    Ready,
    /// Not taken (a primary failed or timed out); its partial cuts are
    /// dropped on the head nodes before it is purged.
    Aborted,
    /// Deleted; its layers are being dropped.
    Deleting,
}

impl SnapshotState {
    /// The lower-case name the CLI and metrics show.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Creating => "creating",
            SnapshotState::Ready => "ready",
            SnapshotState::Aborted => "aborted",
            SnapshotState::Deleting => "deleting",
        }
    }
}

/// One partition's cut: the snapshot holds its operations below `cut`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionCut {
    pub partition: PartitionId,
    /// The partition's epoch when its primary cut.
    pub epoch: Epoch,
    /// The cut sequence.
    pub cut: u64,
}

/// A snapshot as the unit records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    /// Unique among the live snapshots of each of its volumes.
    pub name: String,
    /// The consistency group (one volume for a plain snapshot), sorted.
    pub volumes: Vec<VolumeId>,
    pub state: SnapshotState,
    pub created_ms: u64,
    /// One per partition of every volume once `Ready`.
    pub cuts: Vec<PartitionCut>,
    /// Why it was aborted.
    pub reason: Option<String>,
    /// The I/O pause of its cut as the coordinator measured it (first
    /// cut sent to last hold released), microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_us: Option<u64>,
}

impl UnitState {
    /// Every snapshot record, by id.
    pub fn snapshots(&self) -> &std::collections::BTreeMap<SnapshotId, SnapshotRecord> {
        &self.snapshots
    }

    /// Volume `volume`'s snapshot named `name` that is not aborted or
    /// being deleted.
    pub fn snapshot_named(&self, volume: VolumeId, name: &str) -> Option<&SnapshotRecord> {
        self.snapshots.values().find(|s| {
            s.name == name
                && s.volumes.contains(&volume)
                && matches!(s.state, SnapshotState::Creating | SnapshotState::Ready)
        })
    }

    /// Whether a snapshot not yet purged holds `volume`'s partitions.
    pub(super) fn volume_has_snapshots(&self, volume: VolumeId) -> bool {
        self.snapshots.values().any(|s| s.volumes.contains(&volume))
    }

    pub(super) fn create_snapshot(
        &mut self,
        name: String,
        mut volumes: Vec<VolumeId>,
        now_ms: u64,
    ) -> Result<Outcome, CommandError> {
        volumes.sort_unstable();
        volumes.dedup();
        if volumes.is_empty() {
            return Err(CommandError::invalid("a snapshot of no volume"));
        }
        if name.is_empty() || name.len() > 128 || name.contains(['@', '/']) || name.trim() != name {
            return Err(CommandError::invalid(format!(
                "snapshot name {name:?}: 1 to 128 characters, no '@' or '/', no outer spaces"
            )));
        }
        for volume in &volumes {
            let entry = self.live_volume(*volume)?;
            if let Some(rollback) = &entry.rollback {
                return Err(CommandError::VolumeRollingBack {
                    volume: *volume,
                    snapshot: rollback.snapshot,
                });
            }
            if entry.flatten.is_some() {
                return Err(CommandError::invalid(format!(
                    "volume {volume} is being flattened"
                )));
            }
            if self.snapshot_named(*volume, &name).is_some() {
                return Err(CommandError::invalid(format!(
                    "volume {volume} already has a snapshot named {name:?}"
                )));
            }
        }
        let id = self.next_snapshot_id.max(1);
        self.next_snapshot_id = id + 1;
        self.snapshots.insert(
            id,
            SnapshotRecord {
                id,
                name,
                volumes,
                state: SnapshotState::Creating,
                created_ms: now_ms,
                cuts: Vec::new(),
                reason: None,
                pause_us: None,
            },
        );
        Ok(Outcome::SnapshotCreated { snapshot: id })
    }

    fn snapshot_mut(&mut self, id: SnapshotId) -> Result<&mut SnapshotRecord, CommandError> {
        self.snapshots
            .get_mut(&id)
            .ok_or_else(|| CommandError::invalid(format!("unknown snapshot {id}")))
    }

    pub(super) fn snapshot_cut(
        &mut self,
        id: SnapshotId,
        mut cuts: Vec<PartitionCut>,
        pause_us: Option<u64>,
    ) -> Result<Outcome, CommandError> {
        let record = self
            .snapshots
            .get(&id)
            .ok_or_else(|| CommandError::invalid(format!("unknown snapshot {id}")))?;
        match record.state {
            SnapshotState::Creating => {}
            SnapshotState::Ready if record.cuts == sorted(cuts.clone()) => {
                return Ok(Outcome::Done)
            }
            other => {
                return Err(CommandError::invalid(format!(
                    "snapshot {id} is {}, not creating",
                    other.as_str()
                )))
            }
        }
        cuts = sorted(cuts);
        let mut expected = Vec::new();
        for volume in &record.volumes {
            let entry = self.live_volume(*volume)?;
            expected.extend(entry.partitions.iter().map(|p| (p.id, p.epoch)));
        }
        let got: Vec<(PartitionId, Epoch)> = cuts.iter().map(|c| (c.partition, c.epoch)).collect();
        if got != expected {
            return Err(CommandError::invalid(format!(
                "snapshot {id}: cuts at {got:?}, the partitions and epochs are {expected:?}"
            )));
        }
        let record = self.snapshot_mut(id)?;
        record.cuts = cuts;
        record.state = SnapshotState::Ready;
        record.pause_us = pause_us;
        Ok(Outcome::Done)
    }

    pub(super) fn abort_snapshot(
        &mut self,
        id: SnapshotId,
        reason: String,
    ) -> Result<Outcome, CommandError> {
        let record = self.snapshot_mut(id)?;
        match record.state {
            SnapshotState::Creating => {
                record.state = SnapshotState::Aborted;
                record.reason = Some(reason);
                Ok(Outcome::Done)
            }
            SnapshotState::Aborted => Ok(Outcome::Done),
            other => Err(CommandError::invalid(format!(
                "snapshot {id} is {}: only a creating one aborts",
                other.as_str()
            ))),
        }
    }

    /// The live volumes that are clones of snapshot `id`, by id.
    pub fn clones_of(&self, id: SnapshotId) -> Vec<VolumeId> {
        self.volumes
            .values()
            .filter(|v| v.parent.is_some_and(|p| p.snapshot == id))
            .map(|v| v.id)
            .collect()
    }

    pub(super) fn register_clone(
        &mut self,
        volume: VolumeId,
        name: String,
        parent: VolumeId,
        snapshot: &str,
    ) -> Result<Outcome, CommandError> {
        let source = self.live_volume(parent)?;
        let (size_bytes, partition_size_bytes, code) =
            (source.size_bytes, source.partition_size_bytes, source.code);
        let record = self
            .snapshot_named(parent, snapshot)
            .filter(|s| s.state == SnapshotState::Ready)
            .ok_or_else(|| {
                CommandError::invalid(format!(
                    "volume {parent} has no ready snapshot named {snapshot:?}"
                ))
            })?;
        let snapshot_id = record.id;
        let outcome = self.register_volume(volume, name, size_bytes, partition_size_bytes, code)?;
        let entry = self
            .volumes
            .get_mut(&volume)
            .ok_or(CommandError::UnknownVolume { volume })?;
        entry.parent = Some(CloneParent {
            volume: parent,
            snapshot: snapshot_id,
        });
        Ok(outcome)
    }

    pub(super) fn start_flatten(
        &mut self,
        volume: VolumeId,
        rate_bytes_per_second: u64,
    ) -> Result<Outcome, CommandError> {
        let entry = self.live_volume(volume)?;
        if entry.parent.is_none() {
            return Err(CommandError::invalid(format!(
                "volume {volume} is not a clone (or is flattened already)"
            )));
        }
        if let Some(rollback) = &entry.rollback {
            return Err(CommandError::VolumeRollingBack {
                volume,
                snapshot: rollback.snapshot,
            });
        }
        if rate_bytes_per_second == 0 {
            return Err(CommandError::invalid("a flatten rate of 0"));
        }
        if self.volume_has_snapshots(volume) {
            return Err(CommandError::invalid(format!(
                "volume {volume} has snapshots, whose unwritten blocks read from its parent: delete them first"
            )));
        }
        let entry = self
            .volumes
            .get_mut(&volume)
            .ok_or(CommandError::UnknownVolume { volume })?;
        match &mut entry.flatten {
            Some(flatten) => flatten.rate_bytes_per_second = rate_bytes_per_second,
            None => {
                entry.flatten = Some(Flatten {
                    rate_bytes_per_second,
                    remaining_blocks: BTreeMap::new(),
                })
            }
        }
        Ok(Outcome::Done)
    }

    /// Checks that a progress report comes from `partition`'s primary at
    /// its current epoch (a report from a deposed primary is refused with
    /// `StaleEpoch`); returns the volume's partition count.
    fn current_primary_report(
        &self,
        partition: PartitionId,
        epoch: Epoch,
    ) -> Result<usize, CommandError> {
        let entry = self.live_volume(partition.volume)?;
        let current = entry
            .partitions
            .get(partition.index as usize)
            .ok_or(CommandError::UnknownPartition { partition })?
            .epoch;
        if epoch != current {
            return Err(CommandError::StaleEpoch {
                partition,
                presented: epoch,
                current,
            });
        }
        Ok(entry.partitions.len())
    }

    pub(super) fn flatten_progress(
        &mut self,
        partition: PartitionId,
        epoch: Epoch,
        remaining_blocks: u64,
    ) -> Result<Outcome, CommandError> {
        let volume = partition.volume;
        let count = self.current_primary_report(partition, epoch)?;
        let entry = self
            .volumes
            .get_mut(&volume)
            .ok_or(CommandError::UnknownVolume { volume })?;
        let Some(flatten) = &mut entry.flatten else {
            // Done already (a late report), or never started.
            return if entry.parent.is_none() {
                Ok(Outcome::Done)
            } else {
                Err(CommandError::invalid(format!(
                    "volume {volume} is not being flattened"
                )))
            };
        };
        flatten
            .remaining_blocks
            .insert(partition.index, remaining_blocks);
        let done = flatten.remaining_blocks.len() == count
            && flatten.remaining_blocks.values().all(|left| *left == 0);
        if done {
            entry.flatten = None;
            entry.parent = None;
        }
        Ok(Outcome::Done)
    }

    pub(super) fn start_rollback(
        &mut self,
        volume: VolumeId,
        snapshot: &str,
    ) -> Result<Outcome, CommandError> {
        let entry = self.live_volume(volume)?;
        if !entry.attachments.is_empty() {
            return Err(CommandError::VolumeAttached {
                volume,
                attachments: entry.attachments.len(),
            });
        }
        if entry.flatten.is_some() {
            return Err(CommandError::invalid(format!(
                "volume {volume} is being flattened"
            )));
        }
        let id = self
            .snapshot_named(volume, snapshot)
            .filter(|s| s.state == SnapshotState::Ready)
            .map(|s| s.id)
            .ok_or_else(|| {
                CommandError::invalid(format!(
                    "volume {volume} has no ready snapshot named {snapshot:?}"
                ))
            })?;
        let entry = self
            .volumes
            .get_mut(&volume)
            .ok_or(CommandError::UnknownVolume { volume })?;
        match &entry.rollback {
            Some(rollback) if rollback.snapshot == id => Ok(Outcome::Done),
            Some(rollback) => Err(CommandError::VolumeRollingBack {
                volume,
                snapshot: rollback.snapshot,
            }),
            None => {
                entry.rollback = Some(Rollback {
                    snapshot: id,
                    cursors: BTreeMap::new(),
                    done: std::collections::BTreeSet::new(),
                });
                Ok(Outcome::Done)
            }
        }
    }

    pub(super) fn rollback_progress(
        &mut self,
        partition: PartitionId,
        epoch: Epoch,
        cursor: u64,
        done: bool,
    ) -> Result<Outcome, CommandError> {
        let volume = partition.volume;
        let count = self.current_primary_report(partition, epoch)?;
        let entry = self
            .volumes
            .get_mut(&volume)
            .ok_or(CommandError::UnknownVolume { volume })?;
        let Some(rollback) = &mut entry.rollback else {
            // Over already (a late report).
            return Ok(Outcome::Done);
        };
        let at = rollback.cursors.entry(partition.index).or_insert(0);
        *at = (*at).max(cursor);
        if done {
            rollback.done.insert(partition.index);
        }
        if rollback.done.len() == count {
            entry.rollback = None;
        }
        Ok(Outcome::Done)
    }

    pub(super) fn delete_snapshot(&mut self, id: SnapshotId) -> Result<Outcome, CommandError> {
        if let Some(volume) = self
            .volumes
            .values()
            .find(|v| v.rollback.as_ref().is_some_and(|r| r.snapshot == id))
        {
            return Err(CommandError::VolumeRollingBack {
                volume: volume.id,
                snapshot: id,
            });
        }
        let clones = self.clones_of(id);
        if !clones.is_empty() {
            return Err(CommandError::SnapshotHasClones {
                snapshot: id,
                clones,
            });
        }
        let record = self.snapshot_mut(id)?;
        match record.state {
            SnapshotState::Ready => {
                record.state = SnapshotState::Deleting;
                Ok(Outcome::Done)
            }
            // An aborted one is dropped and purged by its coordinator.
            SnapshotState::Deleting | SnapshotState::Aborted => Ok(Outcome::Done),
            SnapshotState::Creating => Err(CommandError::invalid(format!(
                "snapshot {id} is being created"
            ))),
        }
    }

    pub(super) fn purge_snapshot(&mut self, id: SnapshotId) -> Result<Outcome, CommandError> {
        let record = self.snapshot_mut(id)?;
        match record.state {
            SnapshotState::Deleting | SnapshotState::Aborted => {
                self.snapshots.remove(&id);
                Ok(Outcome::Done)
            }
            other => Err(CommandError::invalid(format!(
                "snapshot {id} is {}: delete it first",
                other.as_str()
            ))),
        }
    }

    /// Snapshot invariants: ids below the next id, volumes sorted and
    /// live, a ready snapshot has exactly one cut per partition.
    pub(super) fn check_snapshots(&self) -> Result<(), String> {
        for v in self.volumes.values() {
            if v.flatten.is_some() && v.parent.is_none() {
                return Err(format!("volume {} flattens with no parent", v.id));
            }
            if let Some(parent) = v.parent {
                let ready = self.snapshots.get(&parent.snapshot).is_some_and(|s| {
                    s.state == SnapshotState::Ready && s.volumes.contains(&parent.volume)
                });
                if !ready {
                    return Err(format!(
                        "clone {} of snapshot {} of volume {}, which is not ready",
                        v.id, parent.snapshot, parent.volume
                    ));
                }
            }
        }
        for (id, s) in &self.snapshots {
            if s.id != *id || *id >= self.next_snapshot_id.max(1) {
                return Err(format!("snapshot {id} misfiled or above the next id"));
            }
            if s.volumes.is_empty() || s.volumes.windows(2).any(|w| w[0] >= w[1]) {
                return Err(format!("snapshot {id}: volumes {:?}", s.volumes));
            }
            for volume in &s.volumes {
                if !self.volumes.contains_key(volume) {
                    return Err(format!("snapshot {id} of a volume {volume} not live"));
                }
            }
            if s.state == SnapshotState::Ready {
                let partitions: usize = s
                    .volumes
                    .iter()
                    .filter_map(|v| self.volumes.get(v))
                    .map(|v| v.partitions.len())
                    .sum();
                if s.cuts.len() != partitions {
                    return Err(format!(
                        "ready snapshot {id}: {} cuts for {partitions} partitions",
                        s.cuts.len()
                    ));
                }
            }
        }
        Ok(())
    }
}

fn sorted(mut cuts: Vec<PartitionCut>) -> Vec<PartitionCut> {
    cuts.sort_by_key(|c| (c.partition.volume, c.partition.index));
    cuts
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::tests::{ok, p, refused, unit, volume};
    use super::*;
    use crate::command::Command;

    fn create(name: &str, volumes: Vec<VolumeId>) -> Command {
        Command::CreateSnapshot {
            name: name.into(),
            volumes,
            now_ms: 1000,
        }
    }

    fn cuts_of(state: &UnitState, volumes: &[VolumeId]) -> Vec<PartitionCut> {
        volumes
            .iter()
            .flat_map(|v| state.volumes()[v].partitions.clone())
            .map(|part| PartitionCut {
                partition: part.id,
                epoch: part.epoch,
                cut: 10 + u64::from(part.id.index),
            })
            .collect()
    }

    fn created(state: &mut UnitState, command: Command) -> SnapshotId {
        match ok(state, command) {
            Outcome::SnapshotCreated { snapshot } => snapshot,
            other => panic!("{other:?}"),
        }
    }

    /// A ready snapshot `name` of `volumes`: created, then cut on every
    /// partition at its current epoch (the coordinator's two commands).
    fn ready(state: &mut UnitState, name: &str, volumes: &[VolumeId]) -> SnapshotId {
        let id = created(state, create(name, volumes.to_vec()));
        let cuts = cuts_of(state, volumes);
        ok(
            state,
            Command::SnapshotCut {
                snapshot: id,
                cuts,
                pause_us: None,
            },
        );
        id
    }

    #[test]
    fn creating_then_ready_then_deleted_and_purged() {
        let mut state = unit();
        let id = created(&mut state, create("s1", vec![1]));
        assert_eq!(state.snapshots()[&id].state, SnapshotState::Creating);
        // Names are unique per volume among live snapshots.
        refused(&mut state, create("s1", vec![1]));
        refused(&mut state, create("a@b", vec![1]));
        refused(&mut state, create("x", vec![9]));
        refused(&mut state, create("x", vec![]));
        // A cut missing a partition is refused; all of them make it ready.
        let cuts = cuts_of(&state, &[1]);
        refused(
            &mut state,
            Command::SnapshotCut {
                snapshot: id,
                cuts: cuts[1..].to_vec(),
                pause_us: None,
            },
        );
        // Deleting a creating snapshot is refused (abort it).
        refused(&mut state, Command::DeleteSnapshot { snapshot: id });
        let mut reversed = cuts.clone();
        reversed.reverse();
        ok(
            &mut state,
            Command::SnapshotCut {
                snapshot: id,
                cuts: reversed,
                pause_us: None,
            },
        );
        let record = &state.snapshots()[&id];
        assert_eq!(
            (record.state, record.cuts.clone()),
            (SnapshotState::Ready, cuts.clone())
        );
        // A resend is harmless; an abort of a ready one is refused.
        ok(
            &mut state,
            Command::SnapshotCut {
                snapshot: id,
                cuts,
                pause_us: None,
            },
        );
        refused(
            &mut state,
            Command::AbortSnapshot {
                snapshot: id,
                reason: "late".into(),
            },
        );
        // The volume cannot be deleted while the snapshot exists.
        refused(
            &mut state,
            Command::DeleteVolume {
                volume: 1,
                force: true,
                now_ms: 2000,
            },
        );
        refused(&mut state, Command::PurgeSnapshot { snapshot: id });
        ok(&mut state, Command::DeleteSnapshot { snapshot: id });
        assert!(state.snapshot_named(1, "s1").is_none());
        ok(&mut state, Command::PurgeSnapshot { snapshot: id });
        assert!(state.snapshots().is_empty());
        // Ids are never reused; the name is free again.
        let again = created(&mut state, create("s1", vec![1]));
        assert!(again > id);
    }

    #[test]
    fn a_cut_at_an_old_epoch_is_refused_and_the_snapshot_aborts() {
        let mut state = unit();
        ok(&mut state, volume(2, 2, 4, 2));
        let id = created(&mut state, create("group", vec![2, 1]));
        assert_eq!(state.snapshots()[&id].volumes, vec![1, 2]);
        let cuts = cuts_of(&state, &[1, 2]);
        // A failover of one partition after its primary cut.
        let part = state.partition(p(2, 1)).unwrap().clone();
        ok(
            &mut state,
            Command::ChangePrimary {
                partition: part.id,
                new_primary: part.secondary.clone(),
                new_secondary: Some(part.primary.clone()),
                expected_epoch: part.epoch,
                now_ms: u64::MAX / 2,
            },
        );
        refused(
            &mut state,
            Command::SnapshotCut {
                snapshot: id,
                cuts,
                pause_us: None,
            },
        );
        ok(
            &mut state,
            Command::AbortSnapshot {
                snapshot: id,
                reason: "partition 2/1 changed primary".into(),
            },
        );
        let record = &state.snapshots()[&id];
        assert_eq!(record.state, SnapshotState::Aborted);
        assert!(state.snapshot_named(1, "group").is_none());
        // An aborted snapshot is purged (after its partial cuts are dropped).
        ok(&mut state, Command::PurgeSnapshot { snapshot: id });
        assert!(state.snapshots().is_empty());
    }

    /// A consistency group is one record over several volumes: each
    /// volume finds it by the group's name, a name taken on any member
    /// refuses the group, and one delete removes it from every member.
    #[test]
    fn a_group_snapshot_is_one_record_every_member_finds_and_one_delete_removes() {
        let mut state = unit();
        ok(&mut state, volume(2, 2, 4, 2));
        ok(&mut state, volume(3, 1, 4, 2));
        let taken = ready(&mut state, "g", &[3]);
        // Volume 3 has a "g" already: the whole group is refused.
        refused(&mut state, create("g", vec![1, 2, 3]));
        let id = ready(&mut state, "g", &[2, 1]);
        let record = &state.snapshots()[&id];
        assert_eq!(record.volumes, vec![1, 2]);
        let partitions =
            state.volumes()[&1].partitions.len() + state.volumes()[&2].partitions.len();
        assert_eq!(record.cuts.len(), partitions);
        for v in [1, 2] {
            assert_eq!(state.snapshot_named(v, "g").map(|s| s.id), Some(id));
        }
        assert_eq!(state.snapshot_named(3, "g").map(|s| s.id), Some(taken));
        // A member can be cloned from and rolled back like any snapshot.
        ok(
            &mut state,
            Command::RegisterClone {
                volume: 7,
                name: "c".into(),
                parent: 2,
                snapshot: "g".into(),
            },
        );
        // Neither member can be deleted while the group holds it.
        for v in [1, 2] {
            refused(
                &mut state,
                Command::DeleteVolume {
                    volume: v,
                    force: true,
                    now_ms: 2000,
                },
            );
        }
        ok(
            &mut state,
            Command::DeleteVolume {
                volume: 7,
                force: true,
                now_ms: 2000,
            },
        );
        ok(&mut state, Command::DeleteSnapshot { snapshot: id });
        for v in [1, 2] {
            assert!(state.snapshot_named(v, "g").is_none());
        }
        ok(&mut state, Command::PurgeSnapshot { snapshot: id });
        assert!(!state.volume_has_snapshots(1));
        assert!(!state.volume_has_snapshots(2));
        assert!(state.volume_has_snapshots(3));
    }

    #[test]
    fn a_clone_pins_its_parent_snapshot_until_it_is_deleted() {
        let mut state = unit();
        let id = created(&mut state, create("base", vec![1]));
        let clone = |name: &str| Command::RegisterClone {
            volume: 7,
            name: name.into(),
            parent: 1,
            snapshot: "base".into(),
        };
        // Not ready yet: no clone.
        refused(&mut state, clone("c"));
        let cuts = cuts_of(&state, &[1]);
        ok(
            &mut state,
            Command::SnapshotCut {
                snapshot: id,
                cuts,
                pause_us: None,
            },
        );
        // Unknown parent or snapshot name.
        refused(
            &mut state,
            Command::RegisterClone {
                volume: 7,
                name: "c".into(),
                parent: 9,
                snapshot: "base".into(),
            },
        );
        refused(
            &mut state,
            Command::RegisterClone {
                volume: 7,
                name: "c".into(),
                parent: 1,
                snapshot: "other".into(),
            },
        );
        ok(&mut state, clone("c"));
        let (parent, child) = (&state.volumes()[&1], &state.volumes()[&7]);
        assert_eq!(
            (child.size_bytes, child.partition_size_bytes, child.code),
            (parent.size_bytes, parent.partition_size_bytes, parent.code)
        );
        assert_eq!(
            child.parent,
            Some(CloneParent {
                volume: 1,
                snapshot: id
            })
        );
        assert_eq!(state.clones_of(id), vec![7]);
        // The snapshot stays while the clone reads from it (typed error).
        assert_eq!(
            refused(&mut state, Command::DeleteSnapshot { snapshot: id }),
            CommandError::SnapshotHasClones {
                snapshot: id,
                clones: vec![7]
            }
        );
        // The same id again is refused like any volume's.
        refused(&mut state, clone("c2"));
        ok(
            &mut state,
            Command::DeleteVolume {
                volume: 7,
                force: true,
                now_ms: 2000,
            },
        );
        assert!(state.clones_of(id).is_empty());
        ok(&mut state, Command::DeleteSnapshot { snapshot: id });
    }

    #[test]
    fn a_flatten_ends_when_every_partition_reports_nothing_left() {
        let mut state = unit();
        let id = ready(&mut state, "base", &[1]);
        // Not a clone: nothing to flatten.
        refused(
            &mut state,
            Command::StartFlatten {
                volume: 1,
                rate_bytes_per_second: 1 << 20,
            },
        );
        ok(
            &mut state,
            Command::RegisterClone {
                volume: 7,
                name: "c".into(),
                parent: 1,
                snapshot: "base".into(),
            },
        );
        // A clone with a snapshot of its own is not flattened.
        let own = created(&mut state, create("own", vec![7]));
        let start = Command::StartFlatten {
            volume: 7,
            rate_bytes_per_second: 1 << 20,
        };
        refused(&mut state, start.clone());
        ok(
            &mut state,
            Command::AbortSnapshot {
                snapshot: own,
                reason: "test".into(),
            },
        );
        ok(&mut state, Command::PurgeSnapshot { snapshot: own });
        ok(&mut state, start.clone());
        // No snapshot of a flattening clone.
        refused(&mut state, create("during", vec![7]));
        let parts = state.volumes()[&7].partitions.clone();
        let report = |index: usize, epoch: Epoch, left: u64| Command::FlattenProgress {
            partition: parts[index].id,
            epoch,
            remaining_blocks: left,
        };
        // A report at another epoch is refused.
        refused(&mut state, report(0, parts[0].epoch + 1, 0));
        ok(&mut state, report(0, parts[0].epoch, 10));
        for (i, p) in parts.iter().enumerate().skip(1) {
            ok(&mut state, report(i, p.epoch, 0));
        }
        // Partition 0 still has blocks to copy: the parent stays pinned.
        assert!(state.volumes()[&7].parent.is_some());
        assert_eq!(
            state.unit_status().clones[0]
                .flatten
                .as_ref()
                .map(|f| f.remaining_blocks.values().sum::<u64>()),
            Some(10)
        );
        refused(&mut state, Command::DeleteSnapshot { snapshot: id });
        ok(&mut state, report(0, parts[0].epoch, 0));
        let clone = &state.volumes()[&7];
        assert_eq!((clone.parent, clone.flatten.clone()), (None, None));
        assert!(state.unit_status().clones.is_empty());
        // A late report is harmless; the parent snapshot can go now.
        ok(&mut state, report(1, parts[1].epoch, 0));
        refused(&mut state, start);
        ok(&mut state, Command::DeleteSnapshot { snapshot: id });
    }

    #[test]
    fn a_rollback_needs_a_detached_volume_and_keeps_it_detached_until_done() {
        let mut state = unit();
        let id = ready(&mut state, "s1", &[1]);
        let attach = |attachment: u64| Command::RegisterAttachment {
            volume: 1,
            attachment,
            token_digest: [attachment as u8; proto::volume::TOKEN_DIGEST_BYTES],
            host: "h".into(),
            now_ms: 1000,
            ttl_ms: None,
        };
        let start = Command::StartRollback {
            volume: 1,
            snapshot: "s1".into(),
        };
        ok(&mut state, attach(1));
        assert_eq!(
            refused(&mut state, start.clone()),
            CommandError::VolumeAttached {
                volume: 1,
                attachments: 1
            }
        );
        ok(
            &mut state,
            Command::RemoveAttachment {
                volume: 1,
                attachment: 1,
            },
        );
        refused(
            &mut state,
            Command::StartRollback {
                volume: 1,
                snapshot: "nope".into(),
            },
        );
        ok(&mut state, start.clone());
        ok(&mut state, start.clone());
        // No attachment, snapshot or delete of the target meanwhile.
        assert_eq!(
            refused(&mut state, attach(2)),
            CommandError::VolumeRollingBack {
                volume: 1,
                snapshot: id
            }
        );
        refused(&mut state, create("s2", vec![1]));
        refused(&mut state, Command::DeleteSnapshot { snapshot: id });
        let parts = state.volumes()[&1].partitions.clone();
        let report = |i: usize, epoch: Epoch, cursor: u64, done: bool| Command::RollbackProgress {
            partition: parts[i].id,
            epoch,
            cursor,
            done,
        };
        refused(&mut state, report(0, parts[0].epoch + 1, 5, false));
        ok(&mut state, report(0, parts[0].epoch, 256, false));
        // A cursor never goes back (a resumed primary may report less).
        ok(&mut state, report(0, parts[0].epoch, 10, false));
        assert_eq!(
            state.volumes()[&1].rollback.as_ref().unwrap().cursors[&0],
            256
        );
        for (i, p) in parts.iter().enumerate() {
            assert!(state.volumes()[&1].rollback.is_some());
            ok(&mut state, report(i, p.epoch, 1 << 18, true));
        }
        assert!(state.volumes()[&1].rollback.is_none());
        assert!(state.unit_status().rollbacks.is_empty());
        ok(&mut state, attach(2));
        ok(&mut state, Command::DeleteSnapshot { snapshot: id });
    }

    #[test]
    fn state_without_snapshots_serializes_as_before() {
        let state = unit();
        let json = serde_json::to_string(&state).unwrap();
        assert!(!json.contains("snapshot"), "{json}");
        let back: UnitState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
    }
}
