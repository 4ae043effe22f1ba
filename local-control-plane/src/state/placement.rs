//! Placement policies: which head nodes get a partition's roles, which
//! columns make an extent. Pure functions of the state; every tie is broken
//! by identifier so that all members compute the same answer.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use super::types::{ColumnRef, ErasureCode, HeadNode, Health, NodeId, Sled, SledId, Volume};
use super::VolumeId;
use crate::error::CommandError;

/// Roles a head node holds across all partitions of the unit.
#[derive(Debug, Clone, Copy, Default)]
struct RoleCount {
    primaries: usize,
    secondaries: usize,
}

impl RoleCount {
    fn total(self) -> usize {
        self.primaries + self.secondaries
    }
}

/// Place `count` new partitions on Up head nodes: primary != secondary;
/// primaries go to the node with the fewest primaries, then fewest roles;
/// secondaries to the node with the fewest roles, then fewest secondaries.
pub(super) fn place_partitions(
    nodes: &BTreeMap<NodeId, HeadNode>,
    volumes: &BTreeMap<VolumeId, Volume>,
    count: u32,
) -> Result<Vec<(NodeId, NodeId)>, CommandError> {
    let mut roles: BTreeMap<&NodeId, RoleCount> = nodes
        .values()
        .filter(|n| n.health == Health::Up)
        .map(|n| (&n.id, RoleCount::default()))
        .collect();
    if roles.len() < 2 {
        return Err(CommandError::NotEnoughNodes {
            needed: 2,
            available: roles.len(),
        });
    }
    for partition in volumes.values().flat_map(|v| v.partitions.iter()) {
        if let Some(r) = roles.get_mut(&partition.primary) {
            r.primaries += 1;
        }
        if let Some(r) = roles.get_mut(&partition.secondary) {
            r.secondaries += 1;
        }
    }
    let mut placement = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let primary = roles
            .iter()
            .min_by_key(|(id, r)| (r.primaries, r.total(), **id))
            .map(|(id, _)| *id)
            .ok_or(CommandError::NotEnoughNodes {
                needed: 2,
                available: 0,
            })?;
        let secondary = roles
            .iter()
            .filter(|(id, _)| **id != primary)
            .min_by_key(|(id, r)| (r.total(), r.secondaries, **id))
            .map(|(id, _)| *id)
            .ok_or(CommandError::NotEnoughNodes {
                needed: 2,
                available: 1,
            })?;
        if let Some(r) = roles.get_mut(primary) {
            r.primaries += 1;
        }
        if let Some(r) = roles.get_mut(secondary) {
            r.secondaries += 1;
        }
        placement.push((primary.clone(), secondary.clone()));
    }
    Ok(placement)
}

/// Number of Up sleds: the ones allocation may use at all.
pub(super) fn up_sleds(sleds: &BTreeMap<SledId, Sled>) -> usize {
    sleds.values().filter(|s| s.health == Health::Up).count()
}

/// Effective minimum of present columns of a degraded extent: `requested`
/// clamped to `[k, k+m]`; `None` (the default of commands written before
/// degraded extents existed) allows no degraded extent.
pub(super) fn min_columns(code: ErasureCode, requested: Option<u16>) -> usize {
    match requested {
        None => code.width(),
        Some(n) => usize::from(n).clamp(usize::from(code.k), code.width()),
    }
}

/// Choose columns for a new extent of `code` on different Up sleds, each on
/// an Up device, none of them in `taken` (columns planned earlier in the same
/// command). Sleds are picked greedily: fewest already-chosen sleds in the
/// same fault domain, then in the same power domain, then most free columns
/// (to even out fill), then by id. On the sled, the Up device with the most
/// free columns, then its lowest free column.
///
/// `code.width()` columns when that many sleds can take one. Otherwise, if
/// at least `min_columns` (see [`min_columns`]) can, a **degraded** extent:
/// as many columns as there are such sleds, in the first slots (data
/// columns first, so reads stay direct), the remaining parity slots `None`
/// (owed, written later by repair).
pub(super) fn plan_extent(
    sleds: &BTreeMap<SledId, Sled>,
    code: ErasureCode,
    taken: &BTreeSet<ColumnRef>,
    min_columns: usize,
) -> Result<Vec<Option<ColumnRef>>, CommandError> {
    let width = code.width();
    struct Candidate<'a> {
        sled: &'a Sled,
        free: usize,
    }
    let free_on = |sled: &Sled, device: u16, columns: &BTreeSet<u32>| {
        columns
            .iter()
            .filter(|&&index| {
                !taken.contains(&ColumnRef {
                    sled: sled.id.clone(),
                    device,
                    index,
                })
            })
            .count()
    };
    let candidates: Vec<Candidate<'_>> = sleds
        .values()
        .filter(|s| s.health == Health::Up)
        .map(|s| Candidate {
            sled: s,
            free: s
                .devices
                .iter()
                .filter(|(_, d)| d.health == Health::Up)
                .map(|(n, d)| free_on(s, *n, &d.free_columns))
                .sum(),
        })
        .filter(|c| c.free > 0)
        .collect();
    let needed = candidates.len().min(width);
    if candidates.len() < min_columns.max(usize::from(code.k)) {
        let needed = min_columns.max(usize::from(code.k));
        let up = up_sleds(sleds);
        return Err(if up >= needed {
            CommandError::NoSpace {
                needed,
                available: candidates.len(),
            }
        } else {
            CommandError::NotEnoughSleds {
                needed,
                available: up,
            }
        });
    }

    let mut chosen: Vec<usize> = Vec::with_capacity(needed);
    let mut per_fault_domain: BTreeMap<&str, usize> = BTreeMap::new();
    let mut per_power_domain: BTreeMap<&str, usize> = BTreeMap::new();
    for _ in 0..needed {
        let next = candidates
            .iter()
            .enumerate()
            .filter(|(i, _)| !chosen.contains(i))
            .min_by_key(|(_, c)| {
                (
                    per_fault_domain
                        .get(c.sled.fault_domain.as_str())
                        .copied()
                        .unwrap_or(0),
                    per_power_domain
                        .get(c.sled.power_domain.as_str())
                        .copied()
                        .unwrap_or(0),
                    Reverse(c.free),
                    &c.sled.id,
                )
            })
            .map(|(i, _)| i)
            .ok_or(CommandError::NotEnoughSleds {
                needed,
                available: candidates.len(),
            })?;
        let sled = candidates[next].sled;
        *per_fault_domain
            .entry(sled.fault_domain.as_str())
            .or_insert(0) += 1;
        *per_power_domain
            .entry(sled.power_domain.as_str())
            .or_insert(0) += 1;
        chosen.push(next);
    }

    let mut columns = Vec::with_capacity(needed);
    for i in chosen {
        let sled = candidates[i].sled;
        let (device, free) = sled
            .devices
            .iter()
            .filter(|(_, d)| d.health == Health::Up)
            .map(|(n, d)| (*n, d))
            .max_by_key(|(n, d)| (free_on(sled, *n, &d.free_columns), Reverse(*n)))
            .ok_or(CommandError::NoSpace {
                needed,
                available: 0,
            })?;
        let column = free
            .free_columns
            .iter()
            .map(|&index| ColumnRef {
                sled: sled.id.clone(),
                device,
                index,
            })
            .find(|c| !taken.contains(c))
            .ok_or(CommandError::NoSpace {
                needed,
                available: 0,
            })?;
        columns.push(Some(column));
    }
    columns.resize(width, None);
    Ok(columns)
}
