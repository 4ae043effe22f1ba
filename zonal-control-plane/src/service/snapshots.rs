//! The zonal plane's snapshot routes: a volume's snapshots live in its
//! unit (records in the unit's replicated state, layers in the partitions'
//! indexes); this plane proposes the unit's snapshot commands and reads
//! the records back, with each snapshot's space from the partitions'
//! primaries ([`local_control_plane::snapshot_query`]). Nothing is stored
//! here.
//!
//! A consistency group's snapshot is one unit record over every member
//! (one coordinated cut; see `local_control_plane`'s `snapshotter`):
//! each member lists it under the group's name with `group` (the members'
//! names), and a delete through any member deletes it for all.
//!
//! ```text
//! POST   /v1/volumes/{name}/snapshots        CreateSnapshot ─▶ poll UnitStatus
//!                                            until ready (201), aborted (409) or
//!                                            the wait ends (202, state creating);
//!                                            with `volumes`, one record over the
//!                                            consistency group (same unit)
//! GET    /v1/volumes/{name}/snapshots        UnitStatus.snapshots of the volume
//!                                            + HostSnapshotUsage of every partition
//! GET    /v1/volumes/{name}/snapshots/{snap} one of them
//! DELETE /v1/volumes/{name}/snapshots/{snap} DeleteSnapshot (202, state deleting;
//!                                            the unit drops and purges it)
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use local_control_plane::snapshot_query::{self, SnapshotSpace};
use local_control_plane::state::{SnapshotRecord, SnapshotState, UnitStatus};
use local_control_plane::{Command, Outcome};
use serde::Serialize;

use super::{now_ms, Sent, Zonal, READ_TIMEOUT};
use crate::error::ApiError;
use crate::model::{check_name, VolumeRecord, VolumeState};

/// Pause between two looks at a snapshot being created.
const POLL: Duration = Duration::from_millis(100);

/// A snapshot as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotView {
    pub id: u64,
    pub name: String,
    pub volume: String,
    /// The members of a consistency group (volume names; `id N` for one
    /// this plane does not know), absent for a one-volume snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<Vec<String>>,
    /// creating, ready, aborted or deleting.
    pub state: &'static str,
    pub created_ms: u64,
    /// The I/O pause of its cut, microseconds (once ready).
    pub pause_us: Option<u64>,
    /// Partitions cut.
    pub cuts: usize,
    /// Why it was aborted.
    pub reason: Option<String>,
    /// Bytes its copy-on-write layers map (`null`: the partitions could
    /// not be asked; see `space_error`).
    pub pinned_bytes: Option<u64>,
    /// Bytes no other snapshot maps: what deleting it frees.
    pub exclusive_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub space_error: Option<String>,
}

fn view(
    volume: &str,
    record: &SnapshotRecord,
    names: &BTreeMap<u64, String>,
    space: &Result<BTreeMap<u64, SnapshotSpace>, String>,
) -> SnapshotView {
    let (held, error) = match space {
        Ok(all) => (Some(all.get(&record.id).copied().unwrap_or_default()), None),
        Err(error) => (None, Some(error.clone())),
    };
    SnapshotView {
        id: record.id,
        name: record.name.clone(),
        volume: volume.to_owned(),
        group: (record.volumes.len() > 1).then(|| {
            record
                .volumes
                .iter()
                .map(|v| names.get(v).cloned().unwrap_or_else(|| format!("id {v}")))
                .collect()
        }),
        state: record.state.as_str(),
        created_ms: record.created_ms,
        pause_us: record.pause_us,
        cuts: record.cuts.len(),
        reason: record.reason.clone(),
        pinned_bytes: held.map(|s| s.pinned_bytes),
        exclusive_bytes: held.map(|s| s.exclusive_bytes),
        space_error: error,
    }
}

impl Zonal {
    /// The available volume `name` and its unit.
    async fn snapshot_volume(&self, name: &str) -> Result<VolumeRecord, ApiError> {
        let record = self.live_volume(name).await?;
        if record.state != VolumeState::Available {
            return Err(ApiError::VolumeNotAvailable {
                name: name.to_owned(),
                state: record.state,
            });
        }
        self.unit(&record.unit)?;
        Ok(record)
    }

    /// The status of `volume`'s unit, read within `READ_TIMEOUT`.
    async fn volume_unit_status(&self, volume: &VolumeRecord) -> Result<UnitStatus, ApiError> {
        let unit = self.unit(&volume.unit)?;
        let unreachable = |reason: String| ApiError::UnitUnreachable {
            unit: volume.unit.clone(),
            reason,
        };
        let (_, status) = tokio::time::timeout(READ_TIMEOUT, unit.client.unit_status())
            .await
            .map_err(|_| unreachable(format!("no answer within {READ_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(status)
    }

    /// The unit's snapshot records of `volume` (every state).
    async fn snapshot_records(
        &self,
        volume: &VolumeRecord,
    ) -> Result<Vec<SnapshotRecord>, ApiError> {
        let status = self.volume_unit_status(volume).await?;
        Ok(status
            .snapshots
            .into_iter()
            .filter(|s| s.volumes.contains(&volume.id))
            .collect())
    }

    /// Volume `name` as a clone: its parent and its flatten's progress
    /// (`None`: not a clone, or flattened already), from the unit's status.
    pub async fn clone_view(&self, name: &str) -> Result<Option<CloneView>, ApiError> {
        let volume = self.snapshot_volume(name).await?;
        let status = self.volume_unit_status(&volume).await?;
        Ok(status
            .clones
            .iter()
            .find(|c| c.volume == volume.id)
            .map(CloneView::of))
    }

    /// Every snapshot's space on `volume`, or why it is unknown.
    async fn snapshot_space(
        &self,
        volume: &VolumeRecord,
    ) -> Result<BTreeMap<u64, SnapshotSpace>, String> {
        let unit = self.unit(&volume.unit).map_err(|e| e.to_string())?;
        match tokio::time::timeout(
            READ_TIMEOUT,
            snapshot_query::volume_usage(&unit.client, volume.id),
        )
        .await
        {
            Ok(Ok(space)) => Ok(space),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer within {READ_TIMEOUT:?}")),
        }
    }

    /// The names of the volumes of `volume`'s unit by id (ids are per
    /// unit), if any of `records` is a group's (else none are needed).
    async fn member_names(
        &self,
        volume: &VolumeRecord,
        records: &[SnapshotRecord],
    ) -> Result<BTreeMap<u64, String>, ApiError> {
        if records.iter().all(|r| r.volumes.len() < 2) {
            return Ok(BTreeMap::new());
        }
        Ok(self
            .list_volumes()
            .await?
            .into_iter()
            .filter(|v| v.unit == volume.unit)
            .map(|v| (v.id, v.spec.name))
            .collect())
    }

    /// The snapshots of volume `name`, with their space.
    pub async fn list_snapshots(&self, name: &str) -> Result<Vec<SnapshotView>, ApiError> {
        let volume = self.snapshot_volume(name).await?;
        let records = self.snapshot_records(&volume).await?;
        let space = if records.is_empty() {
            Ok(BTreeMap::new())
        } else {
            self.snapshot_space(&volume).await
        };
        let names = self.member_names(&volume, &records).await?;
        Ok(records
            .iter()
            .map(|r| view(name, r, &names, &space))
            .collect())
    }

    /// Volume `name`'s live (creating or ready) snapshot `snapshot`, else
    /// one in any state by that name (the newest).
    fn named<'a>(records: &'a [SnapshotRecord], snapshot: &str) -> Option<&'a SnapshotRecord> {
        let live = records.iter().find(|s| {
            s.name == snapshot && matches!(s.state, SnapshotState::Creating | SnapshotState::Ready)
        });
        live.or_else(|| records.iter().rev().find(|s| s.name == snapshot))
    }

    pub async fn describe_snapshot(
        &self,
        name: &str,
        snapshot: &str,
    ) -> Result<SnapshotView, ApiError> {
        let volume = self.snapshot_volume(name).await?;
        let records = self.snapshot_records(&volume).await?;
        let record = Self::named(&records, snapshot).ok_or_else(|| ApiError::SnapshotNotFound {
            volume: name.to_owned(),
            snapshot: snapshot.to_owned(),
        })?;
        let space = self.snapshot_space(&volume).await;
        let names = self
            .member_names(&volume, std::slice::from_ref(record))
            .await?;
        Ok(view(name, record, &names, &space))
    }

    /// Takes snapshot `snapshot` of volume `name` and of the volumes
    /// named in `group` (a consistency group, all in `name`'s unit): the
    /// unit records one snapshot of all of them and its coordinator cuts
    /// every partition of each. Returns the snapshot (as `name` lists it)
    /// and whether it is ready (else still creating after `wait`); an
    /// aborted snapshot is an error.
    pub async fn create_snapshot(
        &self,
        name: &str,
        group: &[String],
        snapshot: &str,
        wait: Duration,
    ) -> Result<(SnapshotView, bool), ApiError> {
        check_name("name", snapshot)?;
        if snapshot.contains('@') {
            return Err(ApiError::bad("name", "must not contain '@'"));
        }
        let volume = self.snapshot_volume(name).await?;
        let mut members = vec![volume.clone()];
        for other in group {
            if members.iter().any(|m| m.spec.name == *other) {
                continue;
            }
            let member = self.snapshot_volume(other).await?;
            if member.unit != volume.unit {
                return Err(ApiError::bad(
                    "volumes",
                    format!(
                        "a consistency group lives in one unit: {other} is in {}, {name} in {}",
                        member.unit, volume.unit
                    ),
                ));
            }
            members.push(member);
        }
        // The unit refuses a taken name too (as a bad argument); this is
        // the common case answered as the conflict it is.
        for member in &members {
            let taken = self.snapshot_records(member).await?.iter().any(|s| {
                s.name == snapshot
                    && matches!(s.state, SnapshotState::Creating | SnapshotState::Ready)
            });
            if taken {
                return Err(ApiError::SnapshotExists {
                    volume: member.spec.name.clone(),
                    snapshot: snapshot.to_owned(),
                });
            }
        }
        let names: BTreeMap<u64, String> = members
            .iter()
            .map(|m| (m.id, m.spec.name.clone()))
            .collect();
        let unit = self.unit(&volume.unit)?;
        let command = Command::CreateSnapshot {
            name: snapshot.to_owned(),
            volumes: members.iter().map(|m| m.id).collect(),
            now_ms: now_ms(),
        };
        let id = match self.send(unit, command).await {
            Sent::Applied(Outcome::SnapshotCreated { snapshot }) => snapshot,
            other => return Err(self.not_applied(&volume, other).await),
        };
        let deadline = Instant::now() + wait;
        loop {
            let records = self.snapshot_records(&volume).await?;
            let Some(record) = records.iter().find(|s| s.id == id) else {
                // Aborted and already purged by the coordinator.
                return Err(ApiError::SnapshotAborted {
                    snapshot: snapshot.to_owned(),
                    reason: "aborted and dropped".into(),
                });
            };
            match record.state {
                SnapshotState::Ready => {
                    let space = self.snapshot_space(&volume).await;
                    return Ok((view(name, record, &names, &space), true));
                }
                SnapshotState::Creating if Instant::now() < deadline => {}
                SnapshotState::Creating => {
                    return Ok((view(name, record, &names, &Err("creating".into())), false))
                }
                SnapshotState::Aborted | SnapshotState::Deleting => {
                    return Err(ApiError::SnapshotAborted {
                        snapshot: snapshot.to_owned(),
                        reason: record.reason.clone().unwrap_or_else(|| "aborted".into()),
                    })
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Deletes snapshot `snapshot` of volume `name`: the unit marks it
    /// deleting, its coordinator drops every partition's layer and purges
    /// the record (GET shows it until then).
    pub async fn delete_snapshot(
        &self,
        name: &str,
        snapshot: &str,
    ) -> Result<SnapshotView, ApiError> {
        let volume = self.snapshot_volume(name).await?;
        let records = self.snapshot_records(&volume).await?;
        let record =
            Self::named(&records, snapshot)
                .cloned()
                .ok_or_else(|| ApiError::SnapshotNotFound {
                    volume: name.to_owned(),
                    snapshot: snapshot.to_owned(),
                })?;
        let unit = self.unit(&volume.unit)?;
        let command = Command::DeleteSnapshot {
            snapshot: record.id,
        };
        match self.send(unit, command).await {
            Sent::Applied(_) => {}
            other => return Err(self.not_applied(&volume, other).await),
        }
        let names = self
            .member_names(&volume, std::slice::from_ref(&record))
            .await?;
        let mut shown = view(name, &record, &names, &Err("being deleted".into()));
        shown.state = SnapshotState::Deleting.as_str();
        Ok(shown)
    }
}

/// A clone in `GET /v1/volumes/{name}` (`clone`): where its unwritten
/// blocks read from and how far its flatten is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CloneView {
    /// The parent snapshot: its volume's id in the unit and its id.
    pub parent_volume: u64,
    pub parent_snapshot: u64,
    pub size_bytes: u64,
    /// `None` until `volume flatten` starts one.
    pub flatten: Option<FlattenView>,
}

/// A flatten's progress, as the clone's primaries last reported it (every
/// second while they copy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlattenView {
    /// Copy rate of each partition, bytes per second.
    pub rate_bytes_per_second: u64,
    /// Bytes still read from the parent: the reported partitions' counts,
    /// and a whole partition for each one that has not reported yet.
    pub remaining_bytes: u64,
    /// `size_bytes - remaining_bytes`.
    pub copied_bytes: u64,
    /// Partitions reported / of the clone.
    pub partitions_reported: usize,
    pub partitions: usize,
}

impl CloneView {
    fn of(clone: &local_control_plane::state::CloneStatus) -> CloneView {
        let block = proto::BLOCK_SIZE_BYTES;
        let size_bytes = clone.size_blocks.saturating_mul(block);
        let flatten = clone.flatten.as_ref().map(|f| {
            let reported: u64 = f.remaining_blocks.values().sum();
            let unreported = clone.partitions.saturating_sub(f.remaining_blocks.len()) as u64;
            let per_partition = clone.size_blocks.div_ceil(clone.partitions.max(1) as u64);
            let remaining_blocks = reported
                .saturating_add(unreported.saturating_mul(per_partition))
                .min(clone.size_blocks);
            let remaining_bytes = remaining_blocks.saturating_mul(block);
            FlattenView {
                rate_bytes_per_second: f.rate_bytes_per_second,
                remaining_bytes,
                copied_bytes: size_bytes - remaining_bytes,
                partitions_reported: f.remaining_blocks.len(),
                partitions: clone.partitions,
            }
        });
        CloneView {
            parent_volume: clone.parent.volume,
            parent_snapshot: clone.parent.snapshot,
            size_bytes,
            flatten,
        }
    }
}
