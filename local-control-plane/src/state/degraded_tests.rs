//! Degraded extents: allocation on fewer than k+m sleds with owed columns,
//! their repair, and the serde form of states written before them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::repair::{RepairPhase, RepairReason, RepairTask};
use super::tests::{ok, p, refused, sled, unit};
use super::*;
use crate::repair::{plan, DownSince, RepairConfig};

fn refill(partition: PartitionId, target: u32, min_columns: Option<u16>) -> Command {
    Command::RefillSandbox {
        partition,
        target,
        min_columns,
    }
}

fn set_sled(state: &mut UnitState, n: usize, health: Health) {
    ok(
        state,
        Command::SetSledHealth {
            sled: sled(n),
            health,
        },
    );
}

fn sandbox_extents(state: &UnitState, partition: PartitionId) -> Vec<Extent> {
    state
        .partition(partition)
        .unwrap()
        .sandbox
        .iter()
        .map(|e| state.extents()[e].clone())
        .collect()
}

#[test]
fn one_sled_down_gives_extents_with_the_last_parity_column_owed() {
    let mut state = unit();
    set_sled(&mut state, 5, Health::Down);
    // Commands from before degraded extents: full extents only.
    assert!(matches!(
        refused(&mut state, refill(p(1, 0), 2, None)),
        CommandError::NotEnoughSleds {
            needed: 6,
            available: 5
        }
    ));
    ok(&mut state, refill(p(1, 0), 2, Some(5)));
    let extents = sandbox_extents(&state, p(1, 0));
    assert_eq!(extents.len(), 2);
    for e in &extents {
        assert_eq!(e.columns.len(), 6);
        assert!(e.is_degraded());
        assert_eq!(e.owed().collect::<Vec<_>>(), vec![5]);
        let sleds: BTreeSet<_> = e.present().map(|(_, c)| c.sled.clone()).collect();
        assert_eq!(sleds.len(), 5);
        assert!(!sleds.contains(&sled(5)));
        // Fault domains are spread as far as 5 sleds in 3 domains allow.
        let mut per_domain = BTreeMap::new();
        for s in &sleds {
            *per_domain
                .entry(state.sleds()[s].fault_domain.clone())
                .or_insert(0) += 1;
        }
        assert!(per_domain.values().all(|n| *n <= 2), "{per_domain:?}");
    }
    // With every sled Up again, the next extents are full.
    set_sled(&mut state, 5, Health::Up);
    ok(&mut state, refill(p(1, 1), 2, Some(5)));
    assert!(sandbox_extents(&state, p(1, 1))
        .iter()
        .all(|e| !e.is_degraded()));
}

#[test]
fn min_columns_is_clamped_to_k_and_never_undercut() {
    let mut state = unit();
    set_sled(&mut state, 4, Health::Down);
    set_sled(&mut state, 5, Health::Failed);
    // k+1 = 5 columns cannot be had on 4 sleds: refused, nothing changes.
    assert!(matches!(
        refused(&mut state, refill(p(1, 0), 1, Some(5))),
        CommandError::NotEnoughSleds {
            needed: 5,
            available: 4
        }
    ));
    // Below k is raised to k: 4 columns, both parity columns owed.
    ok(&mut state, refill(p(1, 0), 1, Some(1)));
    let e = &sandbox_extents(&state, p(1, 0))[0];
    assert_eq!(e.owed().collect::<Vec<_>>(), vec![4, 5]);
    assert_eq!(e.present().count(), 4);
    // Three sleds: never fewer than k columns.
    set_sled(&mut state, 3, Health::Down);
    refused(&mut state, refill(p(1, 1), 1, Some(0)));
    // k+m or more allows no degraded extent.
    set_sled(&mut state, 3, Health::Up);
    refused(&mut state, refill(p(1, 1), 1, Some(60)));
}

#[test]
fn a_degraded_refill_replaces_sandbox_extents_on_sleds_that_are_not_up() {
    let mut state = unit();
    ok(&mut state, refill(p(1, 0), 2, None));
    let before = sandbox_extents(&state, p(1, 0));
    set_sled(&mut state, 2, Health::Down);
    // Top-up by an old-style command: nothing dropped.
    ok(&mut state, refill(p(1, 0), 2, None));
    assert_eq!(sandbox_extents(&state, p(1, 0)), before);
    ok(&mut state, refill(p(1, 0), 2, Some(5)));
    let after = sandbox_extents(&state, p(1, 0));
    assert_eq!(after.len(), 2);
    for e in &after {
        assert!(state.extent_writable(e.id));
        assert!(e.present().all(|(_, c)| c.sled != sled(2)));
        assert!(before.iter().all(|b| b.id != e.id));
    }
    // The dropped extents' columns are free again (never claimed).
    for e in &before {
        assert!(!state.extents().contains_key(&e.id));
        for (_, c) in e.present() {
            let d = &state.sleds()[&c.sled].devices[&c.device];
            assert!(
                d.free_columns.contains(&c.index) || d.used_columns.contains_key(&c.index),
                "{c} neither free nor reused"
            );
        }
    }
}

#[test]
fn an_owed_column_is_repaired_once_a_sled_without_a_column_of_the_extent_is_up() {
    let mut state = unit();
    set_sled(&mut state, 5, Health::Down);
    ok(&mut state, refill(p(1, 0), 1, Some(5)));
    let extent = *state.partition(p(1, 0)).unwrap().sandbox.first().unwrap();
    assert_eq!(
        state.columns_needing_repair(),
        vec![(extent, 5, RepairReason::Owed)]
    );
    // Nowhere to put it: every Up sled holds a column of the extent.
    assert!(state.plan_replacement(extent, 5).is_err());
    let config = RepairConfig {
        sled_failed_after: Duration::from_secs(3600),
        ..RepairConfig::default()
    };
    let mut down = DownSince::new();
    let start = Instant::now();
    assert!(plan(&state, &config, start, 0, &mut down, &Default::default()).is_empty());
    // The sled returns: the controller writes the owed column there.
    set_sled(&mut state, 5, Health::Up);
    let commands = plan(&state, &config, start, 1, &mut down, &Default::default());
    assert_eq!(commands.len(), 1, "{commands:?}");
    let Command::ReplaceColumn { new, reason, .. } = commands[0].clone() else {
        panic!("{commands:?}")
    };
    assert_eq!(reason, RepairReason::Owed);
    assert_eq!(new.sled, sled(5));
    // A wrong reason for an owed column (or Owed for a present one) is
    // refused.
    let mut wrong = commands[0].clone();
    if let Command::ReplaceColumn { reason, .. } = &mut wrong {
        *reason = RepairReason::SledFailed;
    }
    refused(&mut state, wrong);
    ok(&mut state, commands[0].clone());
    let task = state.repairs().find(extent, 5).unwrap().clone();
    assert_eq!(task.old, None);
    assert_eq!(task.phase, RepairPhase::Pending);
    assert!(state.columns_needing_repair().is_empty());
    let epoch = state.partition(p(1, 0)).unwrap().epoch;
    ok(
        &mut state,
        Command::CompleteRepair {
            extent,
            column_index: 5,
            new: new.clone(),
            epoch,
        },
    );
    let e = &state.extents()[&extent];
    assert!(!e.is_degraded());
    assert_eq!(e.columns[5], Some(new.clone()));
    assert_eq!(
        state.sleds()[&new.sled].devices[&new.device].used_columns[&new.index],
        extent
    );
    assert!(state.columns_needing_repair().is_empty());
    // Freeing the extent frees every column, the repaired one included.
    ok(
        &mut state,
        Command::FreeExtent {
            extent,
            partition: p(1, 0),
            epoch,
        },
    );
    assert!(state.sleds()[&new.sled].devices[&new.device]
        .free_columns
        .contains(&new.index));
}

#[test]
fn states_written_before_owed_columns_still_load() {
    let column =
        |n: usize| serde_json::json!({"sled": format!("sled-{n}"), "device": 0, "index": 3});
    let old_extent = serde_json::json!({
        "id": 7,
        "code": {"k": 4, "m": 2},
        "columns": (0..6).map(column).collect::<Vec<_>>(),
        "owner": {"volume": 1, "index": 0},
    });
    let extent: Extent = serde_json::from_value(old_extent.clone()).unwrap();
    assert!(!extent.is_degraded());
    assert_eq!(extent.present().count(), 6);
    // A full extent's serde form is unchanged.
    assert_eq!(serde_json::to_value(&extent).unwrap(), old_extent);
    let old_task = serde_json::json!({
        "extent": 7, "column_index": 2, "partition": {"volume": 1, "index": 0},
        "old": column(2), "new": column(5), "reason": "SledFailed",
        "phase": "Running", "node": null, "bytes_done": 0, "bytes_total": 0,
        "rate_bytes_per_second": 1, "created_ms": 0, "started_ms": null,
        "updated_ms": 0,
    });
    let task: RepairTask = serde_json::from_value(old_task).unwrap();
    assert_eq!(task.old.unwrap().sled, sled(2));
    // And an old command without `min_columns` allocates full extents only.
    let command: Command = serde_json::from_value(serde_json::json!({
        "RefillSandbox": {"partition": {"volume": 1, "index": 0}, "target": 2}
    }))
    .unwrap();
    assert_eq!(command, refill(p(1, 0), 2, None));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any set of sleds not Up and any requested minimum: a refill succeeds
    /// exactly when enough Up sleds remain, and every extent keeps at least
    /// max(min, k) columns on distinct Up sleds; then the sleds come back
    /// and the repair controller fills every owed column.
    #[test]
    fn degraded_refills_and_their_repair(
        not_up in proptest::collection::btree_map(0usize..6, 0usize..3, 0..4),
        min_columns in proptest::option::of(0u16..9),
        partitions in proptest::collection::vec(0u32..4, 1..5),
    ) {
        let mut state = unit();
        let lost = [Health::Down, Health::Failed, Health::Draining];
        for (n, h) in &not_up {
            set_sled(&mut state, *n, lost[*h]);
        }
        let up = 6 - not_up.len();
        let least = match min_columns {
            None => 6,
            Some(n) => usize::from(n).clamp(4, 6),
        };
        for index in partitions {
            let command = refill(p(1, index), 2, min_columns);
            if up >= least {
                ok(&mut state, command);
                for e in sandbox_extents(&state, p(1, index)) {
                    prop_assert!(e.present().count() >= least);
                    prop_assert_eq!(e.present().count(), up.min(6));
                    prop_assert!(state.extent_writable(e.id));
                    prop_assert!(e.owed().all(|i| usize::from(i) >= e.present().count()));
                }
            } else {
                refused(&mut state, command);
            }
        }
        for n in not_up.keys() {
            if state.sleds()[&sled(*n)].health != Health::Failed {
                set_sled(&mut state, *n, Health::Up);
            }
        }
        let config = RepairConfig {
            max_concurrent: 8,
            sled_failed_after: Duration::from_secs(3600),
            ..RepairConfig::default()
        };
        let mut down = DownSince::new();
        let start = Instant::now();
        for tick in 0..100u64 {
            let commands = plan(&state, &config, start, tick, &mut down, &Default::default());
            if commands.is_empty() && state.repairs().tasks.is_empty() {
                break;
            }
            for command in commands {
                ok(&mut state, command);
            }
            for task in state.repairs().tasks.clone() {
                let epoch = state.partition(task.partition).unwrap().epoch;
                ok(&mut state, Command::CompleteRepair {
                    extent: task.extent,
                    column_index: task.column_index,
                    new: task.new,
                    epoch,
                });
            }
        }
        // Whatever could be placed was: an extent stays degraded only
        // while every Up sled already holds one of its columns.
        let up_sleds = state.sleds().values().filter(|s| s.health == Health::Up).count();
        for e in state.extents().values() {
            let sleds: BTreeSet<_> = e.present().map(|(_, c)| c.sled.clone()).collect();
            prop_assert_eq!(sleds.len(), e.present().count());
            if e.is_degraded() {
                prop_assert!(e.present().count() >= up_sleds.min(6), "{:?}", e);
            }
        }
    }
}

#[test]
fn unit_status_says_why_extents_are_degraded_or_wait() {
    let mut state = unit();
    assert!(state.allocation_status().reasons.is_empty());
    set_sled(&mut state, 5, Health::Down);
    ok(&mut state, refill(p(1, 0), 2, Some(5)));
    let status = state.unit_status().allocation;
    assert_eq!(status.writable_sleds, 5);
    assert_eq!(status.degraded_extents, 2);
    assert_eq!(status.owed_columns, 2);
    assert_eq!(status.reasons.len(), 2, "{:?}", status.reasons);
    assert!(
        status.reasons[0].contains("degraded"),
        "{:?}",
        status.reasons
    );
    assert!(
        status.reasons[1].contains("2 owed columns wait"),
        "{:?}",
        status.reasons
    );
    set_sled(&mut state, 4, Health::Down);
    set_sled(&mut state, 3, Health::Down);
    let status = state.allocation_status();
    assert!(
        status.reasons[0].contains("flushes wait"),
        "{:?}",
        status.reasons
    );
}
