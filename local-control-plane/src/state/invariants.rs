//! The invariant checker (see the invariant list in the module docs of
//! [`crate::state`]). It walks the whole state, so it runs after every
//! command only in debug builds (and so in every test:
//! [`UnitState::apply`]), and at snapshot installation; not for every
//! command in release.

use std::collections::BTreeSet;

use super::UnitState;

impl UnitState {
    /// `Ok` if every invariant holds; otherwise the first violation found.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check_partitions()?;
        self.check_extents()?;
        self.check_columns()?;
        self.check_repairs()?;
        self.check_snapshots()?;
        Ok(())
    }

    fn check_partitions(&self) -> Result<(), String> {
        for (volume_id, deleting) in &self.deleting {
            if deleting.volume.id != *volume_id || self.volumes.contains_key(volume_id) {
                return Err(format!(
                    "deleting volume {volume_id} is also live or misfiled"
                ));
            }
            if !deleting.volume.attachments.is_empty() {
                return Err(format!("deleting volume {volume_id} has attachments"));
            }
        }
        for (volume_id, volume) in &self.volumes {
            if volume.id != *volume_id {
                return Err(format!("volume keyed {volume_id} has id {}", volume.id));
            }
            let expected = volume
                .size_bytes
                .div_ceil(volume.partition_size_bytes.max(1));
            if volume.partitions.len() as u64 != expected {
                return Err(format!(
                    "volume {volume_id} has {} partitions, expected {expected}",
                    volume.partitions.len()
                ));
            }
            for (index, partition) in volume.partitions.iter().enumerate() {
                let id = partition.id;
                if id.volume != *volume_id || id.index as usize != index {
                    return Err(format!("partition at {volume_id}/{index} has id {id}"));
                }
                if partition.primary == partition.secondary {
                    return Err(format!("partition {id}: primary equals secondary"));
                }
                for node in [&partition.primary, &partition.secondary] {
                    if !self.nodes.contains_key(node) {
                        return Err(format!("partition {id}: unknown head node {node}"));
                    }
                }
                for (id, attachment) in &volume.attachments {
                    if attachment.id != *id {
                        return Err(format!(
                            "volume {volume_id}: attachment keyed {id} has id {}",
                            attachment.id
                        ));
                    }
                }
                if partition.epoch == 0 {
                    return Err(format!("partition {id}: epoch 0"));
                }
                if let Some(lease) = &partition.lease {
                    if lease.holder != partition.primary {
                        return Err(format!(
                            "partition {id}: lease held by {} but primary is {}",
                            lease.holder, partition.primary
                        ));
                    }
                }
                for extent in &partition.sandbox {
                    match self.extents.get(extent) {
                        None => {
                            return Err(format!(
                                "partition {id}: sandbox has unknown extent {extent}"
                            ))
                        }
                        Some(e) if e.owner != id => {
                            return Err(format!(
                                "partition {id}: sandbox extent {extent} is owned by {}",
                                e.owner
                            ))
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        Ok(())
    }

    fn check_extents(&self) -> Result<(), String> {
        for (extent_id, extent) in &self.extents {
            if extent.id != *extent_id {
                return Err(format!("extent keyed {extent_id} has id {}", extent.id));
            }
            if extent_id.0 >= self.next_extent_id {
                return Err(format!(
                    "extent {extent_id} not below the id counter {}",
                    self.next_extent_id
                ));
            }
            if extent.columns.len() != extent.code.width() {
                return Err(format!(
                    "extent {extent_id} has {} columns for code {}+{}",
                    extent.columns.len(),
                    extent.code.k,
                    extent.code.m
                ));
            }
            // Owed columns (None) live on no sled; the present ones must
            // still be able to decode every stripe.
            let present = extent.present().count();
            if present < usize::from(extent.code.k) {
                return Err(format!(
                    "extent {extent_id} has {present} present columns, fewer than k={}",
                    extent.code.k
                ));
            }
            let mut sleds = BTreeSet::new();
            for (_, column) in extent.present() {
                if !sleds.insert(&column.sled) {
                    return Err(format!(
                        "extent {extent_id} has two columns on sled {}",
                        column.sled
                    ));
                }
                let used_by = self
                    .sleds
                    .get(&column.sled)
                    .and_then(|s| s.devices.get(&column.device))
                    .and_then(|d| d.used_columns.get(&column.index));
                if used_by != Some(extent_id) {
                    return Err(format!(
                        "extent {extent_id} lists column {column}, which the device records as {used_by:?}"
                    ));
                }
            }
            let deleting_owner = self
                .deleting
                .get(&extent.owner.volume)
                .is_some_and(|d| (extent.owner.index as usize) < d.volume.partitions.len());
            if self.partition(extent.owner).is_none() && !deleting_owner {
                return Err(format!(
                    "extent {extent_id} owned by unknown partition {}",
                    extent.owner
                ));
            }
        }
        Ok(())
    }

    fn check_columns(&self) -> Result<(), String> {
        for (sled_id, sled) in &self.sleds {
            if sled.id != *sled_id {
                return Err(format!("sled keyed {sled_id} has id {}", sled.id));
            }
            for (device_id, device) in &sled.devices {
                if let Some(index) = device
                    .used_columns
                    .keys()
                    .find(|i| device.free_columns.contains(i))
                {
                    return Err(format!(
                        "column {sled_id}:{device_id}:{index} is both free and used"
                    ));
                }
                for (index, extent_id) in &device.used_columns {
                    let listed = self.extents.get(extent_id).is_some_and(|e| {
                        e.present().any(|(_, c)| {
                            c.sled == *sled_id && c.device == *device_id && c.index == *index
                        })
                    });
                    if !listed {
                        return Err(format!(
                            "column {sled_id}:{device_id}:{index} recorded as used by extent {extent_id}, which does not list it"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}
