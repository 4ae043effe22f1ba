//! Unit tests of the volume life cycle: attachments, resize, delete.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proto::volume::{AttachmentCredential, AttachmentToken};

use super::tests::{allocate, ok, p, refused, unit};
use super::*;

fn token(n: u8) -> AttachmentToken {
    AttachmentToken([n; 16])
}

fn attach(volume: VolumeId, attachment: AttachmentId, n: u8) -> Command {
    Command::RegisterAttachment {
        volume,
        attachment,
        token_digest: token(n).digest(),
        host: "host-a".into(),
        now_ms: 1000,
        ttl_ms: None,
    }
}

fn credential(attachment: AttachmentId, n: u8) -> AttachmentCredential {
    AttachmentCredential {
        attachment,
        token: token(n),
    }
}

fn delete(volume: VolumeId, force: bool) -> Command {
    Command::DeleteVolume {
        volume,
        force,
        now_ms: 5000,
    }
}

#[test]
fn attachments_grant_and_revoke_host_access() {
    let mut state = unit();
    assert_eq!(
        state.host_access(1, &credential(7, 1), 2000),
        Err(AccessRefusal::Unauthorized)
    );
    ok(&mut state, attach(1, 7, 1));
    assert_eq!(state.host_access(1, &credential(7, 1), 2000), Ok(4 << 30));
    // Wrong token, wrong id, no credential, wrong volume.
    assert_eq!(
        state.host_access(1, &credential(7, 2), 2000),
        Err(AccessRefusal::Unauthorized)
    );
    assert_eq!(
        state.host_access(1, &credential(8, 1), 2000),
        Err(AccessRefusal::Unauthorized)
    );
    assert_eq!(
        state.host_access(1, &AttachmentCredential::NONE, 2000),
        Err(AccessRefusal::Unauthorized)
    );
    assert_eq!(
        state.host_access(2, &credential(7, 1), 2000),
        Err(AccessRefusal::UnknownVolume)
    );
    // A resend with the same digest is a no-op; another digest conflicts.
    ok(&mut state, attach(1, 7, 1));
    assert!(matches!(
        refused(&mut state, attach(1, 7, 2)),
        CommandError::AlreadyExists {
            entity: Entity::Attachment,
            ..
        }
    ));
    assert_eq!(
        refused(&mut state, attach(9, 7, 1)),
        CommandError::UnknownVolume { volume: 9 }
    );
    assert!(matches!(
        refused(&mut state, attach(1, 0, 1)),
        CommandError::InvalidArgument { .. }
    ));
    // The digest, not the token, is what the state holds.
    let json = serde_json::to_string(&state).unwrap();
    assert!(!json.contains(&token(1).to_hex()));

    ok(
        &mut state,
        Command::RemoveAttachment {
            volume: 1,
            attachment: 7,
        },
    );
    assert_eq!(
        state.host_access(1, &credential(7, 1), 2000),
        Err(AccessRefusal::Unauthorized)
    );
    assert_eq!(
        refused(
            &mut state,
            Command::RemoveAttachment {
                volume: 1,
                attachment: 7
            }
        ),
        CommandError::UnknownAttachment {
            volume: 1,
            attachment: 7
        }
    );
}

#[test]
fn attachments_are_bounded_per_volume() {
    let mut state = unit();
    for id in 1..=MAX_ATTACHMENTS_PER_VOLUME as u64 {
        ok(&mut state, attach(1, id, 1));
    }
    assert!(matches!(
        refused(&mut state, attach(1, 1000, 1)),
        CommandError::InvalidArgument { .. }
    ));
}

fn resize(volume: VolumeId, size_bytes: u64) -> Command {
    Command::ResizeVolume { volume, size_bytes }
}

#[test]
fn resize_grows_and_places_new_partitions() {
    let mut state = unit();
    // 4 GiB in 1 GiB partitions; grow inside the last partition first:
    // nothing is added.
    ok(&mut state, resize(1, (4 << 30) + 4096));
    assert_eq!(state.volumes()[&1].partitions.len(), 5);
    match ok(&mut state, resize(1, 6 << 30)) {
        Outcome::VolumeResized {
            volume,
            size_bytes,
            added,
        } => {
            assert_eq!((volume, size_bytes), (1, 6 << 30));
            assert_eq!(added.len(), 1);
            assert_ne!(added[0].0, added[0].1);
        }
        other => panic!("{other:?}"),
    }
    let v = &state.volumes()[&1];
    assert_eq!(v.size_bytes, 6 << 30);
    assert_eq!(v.partitions.len(), 6);
    assert_eq!(v.partitions[5].id, p(1, 5));
    assert_eq!(v.partitions[5].epoch, 1);
    let map = state.partition_map(1).unwrap();
    assert_eq!(map.size_bytes, 6 << 30);
    assert_eq!(map.partitions.len(), 6);
    // Same size again: a no-op resend.
    let before = state.clone();
    ok(&mut state, resize(1, 6 << 30));
    assert_eq!(state, before);
    // A partial last partition: 6 GiB + 8 KiB, then more inside it.
    ok(&mut state, resize(1, (6 << 30) + 8192));
    assert_eq!(state.volumes()[&1].partitions.len(), 7);
    ok(&mut state, resize(1, (6 << 30) + (512 << 20)));
    assert_eq!(state.volumes()[&1].partitions.len(), 7);
}

#[test]
fn resize_refusals() {
    let mut state = unit();
    assert_eq!(
        refused(&mut state, resize(1, 2 << 30)),
        CommandError::ShrinkRefused {
            volume: 1,
            current_bytes: 4 << 30,
            requested_bytes: 2 << 30
        }
    );
    for bad in [0, 4097, (8 << 30) + 512] {
        assert!(
            matches!(
                refused(&mut state, resize(1, bad)),
                CommandError::InvalidArgument { .. }
            ),
            "{bad}"
        );
    }
    assert_eq!(
        refused(&mut state, resize(2, 8 << 30)),
        CommandError::UnknownVolume { volume: 2 }
    );
    assert!(matches!(
        refused(&mut state, resize(1, (MAX_PARTITIONS_PER_VOLUME + 1) << 30)),
        CommandError::InvalidArgument { .. }
    ));
    ok(&mut state, delete(1, false));
    assert_eq!(
        refused(&mut state, resize(1, 8 << 30)),
        CommandError::VolumeDeleting { volume: 1 }
    );
}

#[test]
fn delete_is_refused_while_attached_unless_forced() {
    let mut state = unit();
    ok(&mut state, attach(1, 7, 1));
    assert_eq!(
        refused(&mut state, delete(1, false)),
        CommandError::VolumeAttached {
            volume: 1,
            attachments: 1
        }
    );
    match ok(&mut state, delete(1, true)) {
        Outcome::DeleteStarted {
            volume,
            revoked_attachments,
            ..
        } => assert_eq!((volume, revoked_attachments), (1, 1)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        state.host_access(1, &credential(7, 1), 2000),
        Err(AccessRefusal::UnknownVolume)
    );
    assert_eq!(
        refused(&mut state, delete(1, true)),
        CommandError::VolumeDeleting { volume: 1 }
    );
    assert_eq!(
        refused(&mut state, delete(2, false)),
        CommandError::UnknownVolume { volume: 2 }
    );
    assert_eq!(
        refused(&mut state, attach(1, 8, 1)),
        CommandError::VolumeDeleting { volume: 1 }
    );
}

#[test]
fn delete_frees_every_column_after_the_leases_lapse_then_purges() {
    let mut state = unit();
    let free_before = state.unit_status().capacity.free_columns;
    allocate(&mut state, p(1, 0));
    allocate(&mut state, p(1, 3));
    ok(
        &mut state,
        Command::RefillSandbox {
            partition: p(1, 1),
            target: 2,
            min_columns: None,
        },
    );
    let primary = state.partition(p(1, 0)).unwrap().primary.clone();
    ok(
        &mut state,
        Command::GrantLease {
            partition: p(1, 0),
            holder: primary,
            epoch: 1,
            now_ms: 4000,
            duration_ms: 2000,
        },
    );
    assert_eq!(state.unit_status().capacity.free_columns, free_before - 24);
    match ok(&mut state, delete(1, false)) {
        Outcome::DeleteStarted { extents, .. } => assert_eq!(extents, 4),
        other => panic!("{other:?}"),
    }
    // Gone from every map and from what head nodes serve.
    assert!(state.volumes().is_empty());
    assert_eq!(
        state.partition_map(1),
        Err(CommandError::VolumeDeleting { volume: 1 })
    );
    assert!(state.partition(p(1, 0)).is_none());
    assert_eq!(state.unit_status().deleting_volumes, 1);
    // Old primaries' commands are refused now.
    assert!(matches!(
        refused(&mut state, Command::AllocateExtent { partition: p(1, 0) }),
        CommandError::UnknownPartition { .. }
    ));
    // The lease (until 6000) plus a 500 ms margin holds the deleter back.
    let waiting = state.deletion_plan(6400, 500, 16);
    assert!(waiting.extents.is_empty() && waiting.purge.is_empty());
    assert_eq!(waiting.waiting_for_leases, 1);
    // Not yet purgeable; the volume's extents cannot leave another way.
    assert!(matches!(
        refused(&mut state, Command::PurgeVolume { volume: 1 }),
        CommandError::InvalidArgument { .. }
    ));
    let plan = state.deletion_plan(6500, 500, 3);
    assert_eq!(plan.extents.len(), 3, "bounded by max_extents");
    let plan = state.deletion_plan(6500, 500, 16);
    assert_eq!(plan.extents.len(), 4);
    assert!(plan.purge.is_empty());
    // A leader that released two extents and crashed: the next leader's
    // plan (a pure function of the state) is exactly the other two.
    let mut crashed = state.clone();
    for e in &plan.extents[..2] {
        ok(
            &mut crashed,
            Command::ReleaseDeletedExtent { extent: e.extent },
        );
    }
    let resumed = crashed.deletion_plan(6500, 500, 16);
    assert_eq!(resumed.extents, plan.extents[2..].to_vec());
    assert!(resumed.purge.is_empty());
    for e in &plan.extents {
        assert_eq!(e.columns.len(), 6);
        assert_eq!(e.epoch, 1);
        ok(
            &mut state,
            Command::ReleaseDeletedExtent { extent: e.extent },
        );
        // A resend after an unknown outcome is refused, changing nothing.
        assert_eq!(
            refused(
                &mut state,
                Command::ReleaseDeletedExtent { extent: e.extent }
            ),
            CommandError::UnknownExtent { extent: e.extent }
        );
    }
    assert_eq!(state.unit_status().capacity.free_columns, free_before);
    let plan = state.deletion_plan(6500, 500, 16);
    assert_eq!(plan.purge, vec![1]);
    ok(&mut state, Command::PurgeVolume { volume: 1 });
    assert!(state.deleting().is_empty());
    assert_eq!(
        refused(&mut state, delete(1, false)),
        CommandError::UnknownVolume { volume: 1 }
    );
    assert_eq!(
        refused(&mut state, Command::PurgeVolume { volume: 1 }),
        CommandError::UnknownVolume { volume: 1 }
    );
    // The name and the id of a purged volume are free again.
    ok(
        &mut state,
        Command::RegisterVolume {
            volume: 1,
            name: "vol-1".into(),
            size_bytes: 1 << 30,
            partition_size_bytes: 1 << 30,
            k: 4,
            m: 2,
        },
    );
}

#[test]
fn release_is_refused_for_a_live_volume_and_columns_on_failed_sleds_are_retired() {
    let mut state = unit();
    let (extent, columns) = allocate(&mut state, p(1, 0));
    assert!(matches!(
        refused(&mut state, Command::ReleaseDeletedExtent { extent }),
        CommandError::InvalidArgument { .. }
    ));
    ok(&mut state, delete(1, false));
    // A deleting volume's id cannot be registered again until purged.
    assert!(matches!(
        refused(
            &mut state,
            Command::RegisterVolume {
                volume: 1,
                name: "other".into(),
                size_bytes: 1 << 30,
                partition_size_bytes: 1 << 30,
                k: 4,
                m: 2,
            }
        ),
        CommandError::AlreadyExists { .. }
    ));
    let lost = columns[0].clone();
    ok(
        &mut state,
        Command::SetSledHealth {
            sled: lost.sled.clone(),
            health: Health::Failed,
        },
    );
    let plan = state.deletion_plan(0, 0, 16);
    assert_eq!(plan.extents.len(), 1);
    // The lost sled is not asked to free its column.
    assert_eq!(plan.extents[0].columns.len(), 5);
    assert!(!plan.extents[0].columns.contains(&lost));
    ok(&mut state, Command::ReleaseDeletedExtent { extent });
    let device = &state.sleds()[&lost.sled].devices[&lost.device];
    assert!(device.retired_columns.contains(&lost.index));
    assert!(!device.free_columns.contains(&lost.index));
    let back = &columns[1];
    assert!(state.sleds()[&back.sled].devices[&back.device]
        .free_columns
        .contains(&back.index));
}

#[test]
fn deleting_volumes_are_not_repaired() {
    let mut state = unit();
    let (extent, columns) = allocate(&mut state, p(1, 0));
    ok(
        &mut state,
        Command::SetSledHealth {
            sled: columns[0].sled.clone(),
            health: Health::Failed,
        },
    );
    assert!(!state.columns_needing_repair().is_empty());
    ok(&mut state, delete(1, false));
    assert!(state.columns_needing_repair().is_empty());
    // 6 sleds only: any free column will do, the refusal comes first.
    let spare = state
        .sleds()
        .values()
        .find(|s| s.id != columns[0].sled)
        .map(|s| ColumnRef {
            sled: s.id.clone(),
            device: 0,
            index: *s.devices[&0].free_columns.iter().next().unwrap(),
        })
        .unwrap();
    assert_eq!(
        refused(
            &mut state,
            Command::ReplaceColumn {
                extent,
                column_index: 0,
                new: spare,
                expected_epoch: None,
                reason: RepairReason::SledFailed,
                rate_bytes_per_second: 1 << 20,
                now_ms: 0,
            }
        ),
        CommandError::VolumeDeleting { volume: 1 }
    );
}

#[test]
fn qos_limits_are_validated_stored_and_mapped() {
    use proto::qos::VolumeQos;
    let mut state = unit();
    assert_eq!(state.partition_map(1).unwrap().qos, None);
    let qos = VolumeQos {
        iops: Some(1_000),
        burst_iops: Some(3_000),
        burst_length_ms: Some(10_000),
        bandwidth_bytes_per_second: Some(50 << 20),
        ..VolumeQos::default()
    };
    let set = |qos| Command::SetVolumeQos { volume: 1, qos };
    ok(&mut state, set(Some(qos)));
    assert_eq!(state.partition_map(1).unwrap().qos, Some(qos));
    // A resend is a no-op.
    ok(&mut state, set(Some(qos)));
    // Refused values change nothing.
    let before = state.clone();
    assert!(matches!(
        refused(
            &mut state,
            set(Some(VolumeQos {
                iops: Some(0),
                ..VolumeQos::default()
            }))
        ),
        CommandError::InvalidQos { volume: 1, ref field, .. } if field == "iops"
    ));
    assert!(matches!(
        refused(
            &mut state,
            set(Some(VolumeQos {
                iops: Some(1_000),
                burst_iops: Some(10),
                ..VolumeQos::default()
            }))
        ),
        CommandError::InvalidQos { ref field, .. } if field == "burst_iops"
    ));
    assert_eq!(state, before);
    assert_eq!(
        refused(
            &mut state,
            Command::SetVolumeQos {
                volume: 9,
                qos: None
            }
        ),
        CommandError::UnknownVolume { volume: 9 }
    );
    // All-unlimited is stored as none; so is clearing.
    ok(&mut state, set(Some(VolumeQos::default())));
    assert_eq!(state.partition_map(1).unwrap().qos, None);
    ok(&mut state, set(Some(qos)));
    ok(&mut state, set(None));
    assert_eq!(state.partition_map(1).unwrap().qos, None);
    // The record's JSON of an unlimited volume has no qos field (states
    // written before QoS load, and their snapshots do not change).
    let json = serde_json::to_string(&state.volumes[&1]).unwrap();
    assert!(!json.contains("qos"), "{json}");
    ok(&mut state, set(Some(qos)));
    let json = serde_json::to_string(&state.volumes[&1]).unwrap();
    let back: Volume = serde_json::from_str(&json).unwrap();
    assert_eq!(back.qos, Some(qos));
    // A volume being deleted takes no QoS change.
    ok(&mut state, delete(1, true));
    assert!(matches!(
        refused(&mut state, set(None)),
        CommandError::VolumeDeleting { volume: 1 }
    ));
}

/// An attachment with a TTL: refused from its expiry on; a renewal before
/// then moves the expiry (never back); an expired one is not revived, and
/// is dropped when the volume gets a new attachment. A TTL outside the
/// bounds is refused.
#[test]
fn expiring_attachments_lapse_unless_renewed() {
    let mut state = unit();
    let with_ttl = |attachment, n, now_ms, ttl_ms| Command::RegisterAttachment {
        volume: 1,
        attachment,
        token_digest: token(n).digest(),
        host: "host-a".into(),
        now_ms,
        ttl_ms: Some(ttl_ms),
    };
    let renew = |attachment, now_ms| Command::RenewAttachment {
        volume: 1,
        attachment,
        now_ms,
    };
    ok(&mut state, with_ttl(7, 1, 1_000, 10_000));
    assert_eq!(state.host_access(1, &credential(7, 1), 10_999), Ok(4 << 30));
    assert_eq!(
        state.host_access(1, &credential(7, 1), 11_000),
        Err(AccessRefusal::Expired)
    );
    // A wrong token is Unauthorized whatever the time.
    assert_eq!(
        state.host_access(1, &credential(7, 2), 20_000),
        Err(AccessRefusal::Unauthorized)
    );
    assert_eq!(state.attachment_expiry(1, 7), Some((10_000, 11_000)));
    ok(&mut state, renew(7, 6_000));
    assert_eq!(state.attachment_expiry(1, 7), Some((10_000, 16_000)));
    // An older proposer's clock never moves it back.
    ok(&mut state, renew(7, 2_000));
    assert_eq!(state.attachment_expiry(1, 7), Some((10_000, 16_000)));
    assert_eq!(state.host_access(1, &credential(7, 1), 15_999), Ok(4 << 30));
    // Expired: a renewal does not bring it back.
    ok(&mut state, renew(7, 16_000));
    assert_eq!(
        state.host_access(1, &credential(7, 1), 16_001),
        Err(AccessRefusal::Expired)
    );
    // Without a TTL: renewals are no-ops, no expiry.
    ok(&mut state, attach(1, 8, 3));
    ok(&mut state, renew(8, 50_000));
    assert_eq!(state.attachment_expiry(1, 8), None);
    assert_eq!(
        state.host_access(1, &credential(8, 3), u64::MAX),
        Ok(4 << 30)
    );
    // A new attachment drops the expired one.
    ok(&mut state, with_ttl(9, 4, 20_000, 10_000));
    assert_eq!(state.attachment_expiry(1, 7), None);
    assert_eq!(
        state.host_access(1, &credential(7, 1), 0),
        Err(AccessRefusal::Unauthorized)
    );
    assert!(matches!(
        refused(&mut state, renew(7, 20_000)),
        CommandError::UnknownAttachment { .. }
    ));
    for bad in [MIN_ATTACHMENT_TTL_MS - 1, MAX_ATTACHMENT_TTL_MS + 1] {
        assert!(matches!(
            refused(&mut state, with_ttl(10, 5, 20_000, bad)),
            CommandError::InvalidArgument { .. }
        ));
    }
}
