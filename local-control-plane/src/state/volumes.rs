//! Volume life cycle after registration: attachments (the credentials
//! head nodes check), growing, and deletion.
//!
//! # Attachments
//!
//! A volume lists its valid attachments: id → SHA-256 of the secret token
//! ([`Attachment`]). Head nodes answer a host request only if its
//! credential names a listed attachment of the request's volume and the
//! token hashes to the recorded digest ([`UnitState::host_access`]); the
//! token itself never enters the replicated state, snapshots or status.
//! Because the list is replicated, I/O keeps working while the zonal plane
//! is down, and a `RemoveAttachment` revokes a token on every head node as
//! soon as it applies the entry.
//!
//! **Expiry.** An attachment registered with a TTL (`ttl_ms`, the zonal
//! plane's `attachment_ttl_ms`, `attachment create --ttl`) carries
//! `expires_at_ms`; head nodes refuse its token from then on, by their own
//! wall clock ([`AccessRefusal::Expired`]). It lives on while its host
//! uses it: a head node that serves the attachment's partition map (agents
//! read it every 2 s) once half the TTL has passed proposes
//! `RenewAttachment`, which moves the expiry to the proposer's now plus the
//! TTL. So a host that stops (crash, power loss, a copy of the token left
//! behind) loses the credential within one TTL even if nobody detaches it,
//! and renewal needs nothing but the unit (not the zonal plane). Expired
//! attachments are dropped when the volume gets a new one. Clocks of head
//! nodes and the zonal plane differ by far less than a sensible TTL
//! (minutes); the expiry is no fencing device.
//!
//! # Growing
//!
//! `ResizeVolume` only grows (`ShrinkRefused` otherwise; the same size is
//! a no-op so a resend is harmless). New partitions are placed exactly as
//! at registration. A short last partition needs nothing: head nodes open
//! every partition at its full `partition_size_bytes` and bound host I/O by
//! the volume's size in this state, so raising the size is all it takes.
//!
//! # QoS
//!
//! `SetVolumeQos` replaces the volume's limits ([`proto::qos::VolumeQos`];
//! all-unlimited is stored as none). They are validated here too (the
//! zonal API and the CLI validate first, but the state machine is the last
//! word: a bad value never reaches an agent). Agents poll them with the
//! partition map and retune their throttles in place.
//!
//! # Deletion
//!
//! ```text
//! DeleteVolume{force}      volumes[v] ──▶ deleting[v]   (attachments revoked, repair
//!                                                        tasks of its extents dropped)
//!   head nodes: v's partitions are no longer desired ──▶ closed
//! deleter (leader, crate::deleter), once every partition's recorded lease
//! has lapsed (+ margin: no old primary still serves):
//!   per extent: FreeColumn on each sled at the partition's epoch (idempotent)
//!               ──▶ ReleaseDeletedExtent  (columns ──▶ free pool)
//!   no extent left ──▶ PurgeVolume           (record gone)
//! ```
//!
//! A column goes back to the free pool only after its sled freed it, and
//! only by `ReleaseDeletedExtent`, which is refused unless the extent's
//! volume is being deleted — so a column still referenced by a live
//! partition is never freed. A crash anywhere leaves the volume in
//! `deleting` with some extents still listed: the next leader's deleter
//! frees them again (a free column frees as a no-op) and finishes. Columns
//! on a Failed sled or device cannot be freed there and are retired (never
//! reused), as a repair would.

use std::collections::BTreeMap;

use proto::volume::{digests_equal, AttachmentCredential};
use proto::BLOCK_SIZE_BYTES;

use super::placement;
use super::types::{
    Attachment, AttachmentId, DeletingVolume, ExtentId, Health, Partition, PartitionId,
    TokenDigest, VolumeId,
};
use super::{validate_name, UnitState, MAX_PARTITIONS_PER_VOLUME};
use crate::command::Outcome;
use crate::error::{CommandError, Entity};

/// Bound on attachments of one volume.
pub const MAX_ATTACHMENTS_PER_VOLUME: usize = 64;
/// Shortest attachment TTL: a head node renews at half of it, and agents
/// read their map every 2 s.
pub const MIN_ATTACHMENT_TTL_MS: u64 = 5_000;
/// Longest attachment TTL (30 days).
pub const MAX_ATTACHMENT_TTL_MS: u64 = 30 * 24 * 3_600_000;

/// Why a host request's credential is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessRefusal {
    /// No live volume of that id (unknown, or being deleted).
    UnknownVolume,
    /// The attachment is not listed or its token does not match.
    Unauthorized,
    /// The attachment's TTL ran out without a renewal.
    Expired,
}

impl UnitState {
    /// Checks a host request's credential for `volume`; on success the
    /// volume's size in bytes (the bound of host I/O). Cheap: two map
    /// lookups, one SHA-256 block, a constant-time compare.
    pub fn host_access(
        &self,
        volume: VolumeId,
        credential: &AttachmentCredential,
        now_ms: u64,
    ) -> Result<u64, AccessRefusal> {
        let entry = self
            .volumes
            .get(&volume)
            .ok_or(AccessRefusal::UnknownVolume)?;
        let attachment = entry
            .attachments
            .get(&credential.attachment)
            .ok_or(AccessRefusal::Unauthorized)?;
        if !digests_equal(&attachment.token_digest, &credential.token.digest()) {
            return Err(AccessRefusal::Unauthorized);
        }
        if attachment.expired(now_ms) {
            return Err(AccessRefusal::Expired);
        }
        Ok(entry.size_bytes)
    }

    /// The volume's size and one of its attachments (for a caller that
    /// caches verified tokens and checks the expiry itself, see the head
    /// node's `check_host_access`).
    pub fn attachment_digest(
        &self,
        volume: VolumeId,
        attachment: AttachmentId,
    ) -> Result<(u64, TokenDigest, Option<u64>), AccessRefusal> {
        let entry = self
            .volumes
            .get(&volume)
            .ok_or(AccessRefusal::UnknownVolume)?;
        let listed = entry
            .attachments
            .get(&attachment)
            .ok_or(AccessRefusal::Unauthorized)?;
        Ok((entry.size_bytes, listed.token_digest, listed.expires_at_ms))
    }

    /// The attachment's TTL and expiry, if it has one (`None` also for an
    /// unknown attachment).
    pub fn attachment_expiry(
        &self,
        volume: VolumeId,
        attachment: AttachmentId,
    ) -> Option<(u64, u64)> {
        let listed = self.volumes.get(&volume)?.attachments.get(&attachment)?;
        Some((listed.ttl_ms?, listed.expires_at_ms?))
    }

    /// The live volume, or why not.
    pub(super) fn live_volume(&self, volume: VolumeId) -> Result<&super::Volume, CommandError> {
        if self.deleting.contains_key(&volume) {
            return Err(CommandError::VolumeDeleting { volume });
        }
        self.volumes
            .get(&volume)
            .ok_or(CommandError::UnknownVolume { volume })
    }

    pub(super) fn register_attachment(
        &mut self,
        volume: VolumeId,
        attachment: AttachmentId,
        token_digest: TokenDigest,
        host: String,
        now_ms: u64,
        ttl_ms: Option<u64>,
    ) -> Result<Outcome, CommandError> {
        validate_name("host", &host)?;
        if attachment == 0 {
            return Err(CommandError::invalid("attachment id 0 is reserved"));
        }
        if let Some(ttl) = ttl_ms {
            if !(MIN_ATTACHMENT_TTL_MS..=MAX_ATTACHMENT_TTL_MS).contains(&ttl) {
                return Err(CommandError::invalid(format!(
                    "attachment TTL {ttl} ms is outside {MIN_ATTACHMENT_TTL_MS}..={MAX_ATTACHMENT_TTL_MS}"
                )));
            }
        }
        let entry = self.live_volume(volume)?;
        if let Some(rollback) = &entry.rollback {
            return Err(CommandError::VolumeRollingBack {
                volume,
                snapshot: rollback.snapshot,
            });
        }
        if let Some(existing) = entry.attachments.get(&attachment) {
            if digests_equal(&existing.token_digest, &token_digest) {
                return Ok(Outcome::Done);
            }
            return Err(CommandError::AlreadyExists {
                entity: Entity::Attachment,
                id: format!("{volume}/{attachment}"),
            });
        }
        let expired = entry
            .attachments
            .values()
            .filter(|a| a.expired(now_ms))
            .count();
        if entry.attachments.len() - expired >= MAX_ATTACHMENTS_PER_VOLUME {
            return Err(CommandError::invalid(format!(
                "volume {volume} already has {MAX_ATTACHMENTS_PER_VOLUME} attachments"
            )));
        }
        if let Some(entry) = self.volumes.get_mut(&volume) {
            entry.attachments.retain(|_, a| !a.expired(now_ms));
            entry.attachments.insert(
                attachment,
                Attachment {
                    id: attachment,
                    token_digest,
                    host,
                    created_at_ms: now_ms,
                    ttl_ms,
                    expires_at_ms: ttl_ms.map(|ttl| now_ms.saturating_add(ttl)),
                },
            );
        }
        Ok(Outcome::Done)
    }

    pub(super) fn renew_attachment(
        &mut self,
        volume: VolumeId,
        attachment: AttachmentId,
        now_ms: u64,
    ) -> Result<Outcome, CommandError> {
        self.live_volume(volume)?;
        let listed = self
            .volumes
            .get_mut(&volume)
            .and_then(|v| v.attachments.get_mut(&attachment))
            .ok_or(CommandError::UnknownAttachment { volume, attachment })?;
        if let (Some(ttl), Some(expires)) = (listed.ttl_ms, listed.expires_at_ms) {
            // An expired credential is not brought back: its host gets a
            // new attachment.
            if expires > now_ms {
                listed.expires_at_ms = Some(expires.max(now_ms.saturating_add(ttl)));
            }
        }
        Ok(Outcome::Done)
    }

    pub(super) fn remove_attachment(
        &mut self,
        volume: VolumeId,
        attachment: AttachmentId,
    ) -> Result<Outcome, CommandError> {
        self.live_volume(volume)?;
        let removed = self
            .volumes
            .get_mut(&volume)
            .and_then(|v| v.attachments.remove(&attachment));
        match removed {
            Some(_) => Ok(Outcome::Done),
            None => Err(CommandError::UnknownAttachment { volume, attachment }),
        }
    }

    pub(super) fn resize_volume(
        &mut self,
        volume: VolumeId,
        size_bytes: u64,
    ) -> Result<Outcome, CommandError> {
        if size_bytes == 0 || size_bytes % BLOCK_SIZE_BYTES != 0 {
            return Err(CommandError::invalid(format!(
                "size {size_bytes} is not a positive multiple of {BLOCK_SIZE_BYTES}"
            )));
        }
        let entry = self.live_volume(volume)?;
        if size_bytes < entry.size_bytes {
            return Err(CommandError::ShrinkRefused {
                volume,
                current_bytes: entry.size_bytes,
                requested_bytes: size_bytes,
            });
        }
        let partition_count = size_bytes.div_ceil(entry.partition_size_bytes);
        if partition_count > MAX_PARTITIONS_PER_VOLUME {
            return Err(CommandError::invalid(format!(
                "{partition_count} partitions exceed the bound of {MAX_PARTITIONS_PER_VOLUME}"
            )));
        }
        let have = entry.partitions.len() as u64;
        // Bounded by MAX_PARTITIONS_PER_VOLUME above, so it fits in u32.
        let first_new = u32::try_from(have)
            .map_err(|_| CommandError::invalid("partition count overflows u32"))?;
        let adding = u32::try_from(partition_count.saturating_sub(have))
            .map_err(|_| CommandError::invalid("partition count overflows u32"))?;
        let added = if adding > 0 {
            placement::place_partitions(&self.nodes, &self.volumes, adding)?
        } else {
            Vec::new()
        };
        if let Some(entry) = self.volumes.get_mut(&volume) {
            entry.size_bytes = size_bytes;
            for ((primary, secondary), index) in added.iter().zip(first_new..) {
                entry.partitions.push(Partition {
                    id: PartitionId { volume, index },
                    primary: primary.clone(),
                    secondary: secondary.clone(),
                    epoch: 1,
                    lease: None,
                    sandbox: Default::default(),
                    secondary_catching_up: false,
                });
            }
        }
        Ok(Outcome::VolumeResized {
            volume,
            size_bytes,
            added,
        })
    }

    pub(super) fn set_volume_qos(
        &mut self,
        volume: VolumeId,
        qos: Option<proto::qos::VolumeQos>,
    ) -> Result<Outcome, CommandError> {
        let qos = match qos {
            Some(qos) => {
                qos.validate().map_err(|error| CommandError::InvalidQos {
                    volume,
                    field: error.field().to_owned(),
                    reason: error.to_string(),
                })?;
                qos.normalized()
            }
            None => None,
        };
        self.live_volume(volume)?;
        if let Some(entry) = self.volumes.get_mut(&volume) {
            entry.qos = qos;
        }
        Ok(Outcome::Done)
    }

    pub(super) fn delete_volume(
        &mut self,
        volume: VolumeId,
        force: bool,
        now_ms: u64,
    ) -> Result<Outcome, CommandError> {
        let entry = self.live_volume(volume)?;
        if self.volume_has_snapshots(volume) {
            return Err(CommandError::invalid(format!(
                "volume {volume} has snapshots: delete them first"
            )));
        }
        if !entry.attachments.is_empty() && !force {
            return Err(CommandError::VolumeAttached {
                volume,
                attachments: entry.attachments.len(),
            });
        }
        let Some(mut entry) = self.volumes.remove(&volume) else {
            return Err(CommandError::UnknownVolume { volume });
        };
        let revoked_attachments = entry.attachments.len();
        entry.attachments.clear();
        self.forget_reservations(volume);
        let extents: Vec<ExtentId> = self
            .extents
            .values()
            .filter(|e| e.owner.volume == volume)
            .map(|e| e.id)
            .collect();
        // No primary will rebuild them any more.
        for extent in &extents {
            self.drop_repairs_of(*extent);
        }
        self.deleting.insert(
            volume,
            DeletingVolume {
                volume: entry,
                requested_at_ms: now_ms,
            },
        );
        Ok(Outcome::DeleteStarted {
            volume,
            extents: extents.len(),
            revoked_attachments,
        })
    }

    pub(super) fn release_deleted_extent(
        &mut self,
        extent: ExtentId,
    ) -> Result<Outcome, CommandError> {
        let entry = self
            .extents
            .get(&extent)
            .ok_or(CommandError::UnknownExtent { extent })?;
        let volume = entry.owner.volume;
        if !self.deleting.contains_key(&volume) {
            return Err(CommandError::invalid(format!(
                "extent {extent} belongs to volume {volume}, which is not being deleted"
            )));
        }
        self.drop_repairs_of(extent);
        let Some(removed) = self.extents.remove(&extent) else {
            return Err(CommandError::UnknownExtent { extent });
        };
        if let Some(deleting) = self.deleting.get_mut(&volume) {
            for p in &mut deleting.volume.partitions {
                p.sandbox.remove(&extent);
            }
        }
        for column in removed.columns.iter().flatten() {
            let sled_failed = self
                .sleds
                .get(&column.sled)
                .is_none_or(|s| s.health == Health::Failed);
            if let Some(device) = self
                .sleds
                .get_mut(&column.sled)
                .and_then(|s| s.devices.get_mut(&column.device))
            {
                device.used_columns.remove(&column.index);
                // The deleter could not free it on a lost sled or device:
                // it may still be claimed there, so it is never reused.
                if sled_failed || device.health == Health::Failed {
                    device.retired_columns.insert(column.index);
                } else {
                    device.free_columns.insert(column.index);
                }
            }
        }
        Ok(Outcome::ExtentFreed {
            extent,
            columns: removed.columns.into_iter().flatten().collect(),
        })
    }

    pub(super) fn purge_volume(&mut self, volume: VolumeId) -> Result<Outcome, CommandError> {
        if !self.deleting.contains_key(&volume) {
            if self.volumes.contains_key(&volume) {
                return Err(CommandError::invalid(format!(
                    "volume {volume} is not being deleted"
                )));
            }
            return Err(CommandError::UnknownVolume { volume });
        }
        let left = self
            .extents
            .values()
            .filter(|e| e.owner.volume == volume)
            .count();
        if left > 0 {
            return Err(CommandError::invalid(format!(
                "volume {volume} still owns {left} extents"
            )));
        }
        self.deleting.remove(&volume);
        Ok(Outcome::Done)
    }

    /// What the deleter may do now (pure, so a new leader re-derives it):
    /// for every volume being deleted whose partitions' leases all lapsed
    /// before `now_ms - lease_margin_ms`, its extents (with the partition
    /// epoch to free their columns at), or, when none is left, a purge.
    /// At most `max_extents` extents in total.
    pub fn deletion_plan(
        &self,
        now_ms: u64,
        lease_margin_ms: u64,
        max_extents: usize,
    ) -> DeletionPlan {
        let mut plan = DeletionPlan::default();
        let mut owned: BTreeMap<VolumeId, Vec<ExtentId>> = BTreeMap::new();
        for e in self.extents.values() {
            if self.deleting.contains_key(&e.owner.volume) {
                owned.entry(e.owner.volume).or_default().push(e.id);
            }
        }
        for (id, deleting) in &self.deleting {
            let lapsed = deleting.volume.partitions.iter().all(|p| {
                p.lease
                    .as_ref()
                    .is_none_or(|l| l.expires_at_ms.saturating_add(lease_margin_ms) <= now_ms)
            });
            if !lapsed {
                plan.waiting_for_leases += 1;
                continue;
            }
            match owned.get(id) {
                None => plan.purge.push(*id),
                Some(extents) => {
                    for extent in extents {
                        if plan.extents.len() >= max_extents {
                            return plan;
                        }
                        let Some(e) = self.extents.get(extent) else {
                            continue;
                        };
                        let epoch = deleting
                            .volume
                            .partitions
                            .get(e.owner.index as usize)
                            .map_or(1, |p| p.epoch);
                        plan.extents.push(ExtentToFree {
                            extent: *extent,
                            partition: e.owner,
                            epoch,
                            columns: e
                                .columns
                                .iter()
                                .flatten()
                                .filter(|c| {
                                    let sled = self.sleds.get(&c.sled);
                                    let failed = sled.is_none_or(|s| {
                                        s.health == Health::Failed
                                            || s.devices
                                                .get(&c.device)
                                                .is_none_or(|d| d.health == Health::Failed)
                                    });
                                    !failed
                                })
                                .cloned()
                                .collect(),
                        });
                    }
                }
            }
        }
        plan
    }
}

/// One extent the deleter frees: FreeColumn for each of `columns` (the
/// ones on sleds and devices not declared Failed), then
/// `ReleaseDeletedExtent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentToFree {
    pub extent: ExtentId,
    pub partition: PartitionId,
    pub epoch: super::Epoch,
    pub columns: Vec<super::ColumnRef>,
}

/// See [`UnitState::deletion_plan`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeletionPlan {
    pub extents: Vec<ExtentToFree>,
    pub purge: Vec<VolumeId>,
    /// Volumes whose old primaries may still hold a lease.
    pub waiting_for_leases: usize,
}
