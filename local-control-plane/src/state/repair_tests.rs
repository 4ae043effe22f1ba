//! Column repair in the state machine: examples of every refusal, and a
//! property test driving the repair controller's plan with random sled
//! failures, drains and rebuild completions (invariants after every step;
//! at the end no column is on a lost sled and every extent has k+m columns
//! on distinct Up sleds).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::repair::{plan, DownSince, RepairConfig};

fn sled(n: usize) -> SledId {
    SledId(format!("sled-{n}"))
}

fn unit(sleds: usize) -> UnitState {
    let mut state = UnitState::new();
    for n in 0..3 {
        apply(
            &mut state,
            Command::RegisterHeadNode {
                node: NodeId(format!("head-{n}")),
                address_a: format!("10.0.0.{n}:7000"),
                address_b: format!("10.1.0.{n}:7000"),
            },
        );
    }
    for n in 0..sleds {
        apply(
            &mut state,
            Command::RegisterSled {
                sled: sled(n),
                address_a: format!("10.0.1.{n}:7100"),
                address_b: format!("10.1.1.{n}:7100"),
                fault_domain: format!("fd-{}", n % 4),
                power_domain: format!("pd-{}", n % 2),
                column_size_bytes: 1 << 20,
                devices: vec![
                    DeviceSpec {
                        device: 0,
                        size_bytes: 16 << 20,
                    },
                    DeviceSpec {
                        device: 1,
                        size_bytes: 16 << 20,
                    },
                ],
            },
        );
        for device in 0..2 {
            apply(
                &mut state,
                Command::AddFreeColumns {
                    sled: sled(n),
                    device,
                    columns: (0..16).collect(),
                },
            );
        }
    }
    apply(
        &mut state,
        Command::RegisterVolume {
            volume: 1,
            name: "v".into(),
            size_bytes: 2 << 30,
            partition_size_bytes: 1 << 30,
            k: 4,
            m: 2,
        },
    );
    state
}

fn apply(state: &mut UnitState, command: Command) -> Outcome {
    let outcome = state
        .apply(command.clone())
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    state.check_invariants().unwrap();
    outcome
}

fn refused(state: &mut UnitState, command: Command) -> CommandError {
    let before = state.clone();
    let error = state.apply(command).expect_err("applied");
    assert_eq!(*state, before, "refused with {error} but changed the state");
    error
}

fn allocate(state: &mut UnitState) -> ExtentId {
    let partition = PartitionId {
        volume: 1,
        index: 0,
    };
    match apply(state, Command::AllocateExtent { partition }) {
        Outcome::ExtentAllocated { extent, .. } => extent,
        other => panic!("{other:?}"),
    }
}

fn replace(state: &UnitState, extent: ExtentId, column_index: u16, new: ColumnRef) -> Command {
    Command::ReplaceColumn {
        extent,
        column_index,
        new,
        expected_epoch: None,
        reason: RepairReason::SledFailed,
        rate_bytes_per_second: 1,
        now_ms: state.repairs().tasks.len() as u64,
    }
}

#[test]
fn replace_progress_complete_moves_the_column_and_retires_the_old_one() {
    let mut state = unit(8);
    let extent = allocate(&mut state);
    let old = state.extents()[&extent].columns[2].clone().unwrap();
    apply(
        &mut state,
        Command::SetSledHealth {
            sled: old.sled.clone(),
            health: Health::Failed,
        },
    );
    assert_eq!(
        state.columns_needing_repair(),
        vec![(extent, 2, RepairReason::SledFailed)]
    );
    let new = state.plan_replacement(extent, 2).unwrap();
    assert!(state.extents()[&extent]
        .present()
        .all(|(_, c)| c.sled != new.sled));
    let command = replace(&state, extent, 2, new.clone());
    apply(&mut state, command);
    assert!(state.columns_needing_repair().is_empty());
    // Twice: refused.
    let again = replace(&state, extent, 2, new.clone());
    assert!(matches!(
        refused(&mut state, again),
        CommandError::AlreadyExists { .. }
    ));
    // Progress and completion need the partition's epoch.
    let stale = Command::CompleteRepair {
        extent,
        column_index: 2,
        new: new.clone(),
        epoch: 7,
    };
    assert!(matches!(
        refused(&mut state, stale),
        CommandError::StaleEpoch { .. }
    ));
    apply(
        &mut state,
        Command::RepairProgress {
            extent,
            column_index: 2,
            node: NodeId("head-0".into()),
            epoch: 1,
            bytes_done: 10,
            bytes_total: 20,
            now_ms: 5,
        },
    );
    assert_eq!(state.repair_status().running, 1);
    assert_eq!(state.repair_status().bytes_remaining, 10);
    apply(
        &mut state,
        Command::CompleteRepair {
            extent,
            column_index: 2,
            new: new.clone(),
            epoch: 1,
        },
    );
    assert_eq!(state.extents()[&extent].columns[2], Some(new.clone()));
    let device = &state.sleds()[&old.sled].devices[&old.device];
    assert!(device.retired_columns.contains(&old.index));
    assert!(!device.used_columns.contains_key(&old.index));
    assert_eq!(state.repair_status().completed, 1);
    assert!(state.repairs().tasks.is_empty());
}

#[test]
fn a_replacement_never_shares_a_sled_with_its_extent() {
    let mut state = unit(8);
    let extent = allocate(&mut state);
    let columns: Vec<ColumnRef> = state.extents()[&extent]
        .columns
        .iter()
        .flatten()
        .cloned()
        .collect();
    // A free column on a sled holding column 1 cannot replace column 0.
    let sled_of_1 = &state.sleds()[&columns[1].sled];
    let device = *sled_of_1.devices.keys().next().unwrap();
    let index = *sled_of_1.devices[&device]
        .free_columns
        .iter()
        .next()
        .unwrap();
    let bad = ColumnRef {
        sled: columns[1].sled.clone(),
        device,
        index,
    };
    let command = replace(&state, extent, 0, bad);
    assert!(matches!(
        refused(&mut state, command),
        CommandError::ColumnsOnSameSled { .. }
    ));
    // Two replacements of one extent go to two different sleds.
    let first = state.plan_replacement(extent, 0).unwrap();
    let command = replace(&state, extent, 0, first.clone());
    apply(&mut state, command);
    let second = state.plan_replacement(extent, 1).unwrap();
    assert_ne!(first.sled, second.sled);
    let clash = ColumnRef {
        index: first.index + 1,
        ..first.clone()
    };
    let command = replace(&state, extent, 1, clash);
    assert!(matches!(
        refused(&mut state, command),
        CommandError::ColumnsOnSameSled { .. }
    ));
    // With 6 sleds and 6 columns there is nowhere to go.
    let mut small = unit(6);
    let extent = allocate(&mut small);
    assert!(matches!(
        small.plan_replacement(extent, 0),
        Err(CommandError::NoSpace { .. })
    ));
}

#[test]
fn cancel_and_free_retire_the_reserved_column() {
    let mut state = unit(8);
    let extent = allocate(&mut state);
    let new = state.plan_replacement(extent, 0).unwrap();
    let command = replace(&state, extent, 0, new.clone());
    apply(&mut state, command);
    apply(
        &mut state,
        Command::CancelRepair {
            extent,
            column_index: 0,
        },
    );
    let device = &state.sleds()[&new.sled].devices[&new.device];
    assert!(device.retired_columns.contains(&new.index));
    assert_eq!(state.repair_status().cancelled, 1);
    let new = state.plan_replacement(extent, 0).unwrap();
    let command = replace(&state, extent, 0, new.clone());
    apply(&mut state, command);
    apply(
        &mut state,
        Command::FreeExtent {
            extent,
            partition: PartitionId {
                volume: 1,
                index: 0,
            },
            epoch: 1,
        },
    );
    assert!(state.repairs().tasks.is_empty());
    let device = &state.sleds()[&new.sled].devices[&new.device];
    assert!(device.retired_columns.contains(&new.index));
}

/// Completes every task (as the primaries would).
fn complete_all(state: &mut UnitState) {
    let tasks = state.repairs().tasks.clone();
    for task in tasks {
        let epoch = state.partition(task.partition).unwrap().epoch;
        apply(
            state,
            Command::CompleteRepair {
                extent: task.extent,
                column_index: task.column_index,
                new: task.new,
                epoch,
            },
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random losses (at most m = 2 sleds failed or draining, 10 sleds),
    /// each followed by controller ticks and rebuild completions: the
    /// invariants hold after every command, and once the controller is done
    /// every extent has its k+m columns on distinct Up sleds.
    #[test]
    fn controller_restores_full_redundancy(
        extents in 1usize..12,
        losses in proptest::collection::vec((0usize..10, any::<bool>()), 1..3),
        max_concurrent in 1usize..5,
    ) {
        let mut state = unit(10);
        for _ in 0..extents {
            allocate(&mut state);
        }
        let config = RepairConfig {
            max_concurrent,
            sled_failed_after: Duration::ZERO,
            ..RepairConfig::default()
        };
        let mut down = DownSince::new();
        for (n, drain) in losses {
            let health = if drain { Health::Draining } else { Health::Down };
            apply(&mut state, Command::SetSledHealth { sled: sled(n), health });
        }
        let start = Instant::now();
        for tick in 0..200u64 {
            let commands = plan(&state, &config, start, tick, &mut down, &Default::default());
            if commands.is_empty() && state.repairs().tasks.is_empty() {
                break;
            }
            prop_assert!(state.repairs().tasks.len() <= max_concurrent);
            for command in commands {
                apply(&mut state, command);
            }
            prop_assert!(state.repairs().tasks.len() <= max_concurrent);
            complete_all(&mut state);
        }
        prop_assert!(state.repairs().tasks.is_empty());
        prop_assert!(state.columns_needing_repair().is_empty());
        for extent in state.extents().values() {
            let mut sleds = std::collections::BTreeSet::new();
            for (_, column) in extent.present() {
                prop_assert_eq!(state.sleds()[&column.sled].health, Health::Up);
                prop_assert!(sleds.insert(column.sled.clone()));
            }
            prop_assert_eq!(sleds.len(), 6);
        }
    }
}

#[test]
fn a_failed_sled_returns_once_emptied_and_its_retired_columns_are_reclaimed() {
    let mut state = unit(8);
    let extent = allocate(&mut state);
    let old = state.extents()[&extent].columns[3].clone().unwrap();
    let lost = old.sled.clone();
    apply(
        &mut state,
        Command::SetSledHealth {
            sled: lost.clone(),
            health: Health::Failed,
        },
    );
    for network in [Network::A, Network::B] {
        apply(
            &mut state,
            Command::ReportPathFault {
                endpoint: Endpoint::Sled(lost.clone()),
                network,
                up: false,
            },
        );
    }
    // Failed and still holding a column of the extent: not back, nothing
    // reclaimable (the sled is not reachable).
    assert!(state.failed_sleds_ready_to_return().is_empty());
    let new = state.plan_replacement(extent, 3).unwrap();
    let command = replace(&state, extent, 3, new.clone());
    apply(&mut state, command);
    apply(
        &mut state,
        Command::CompleteRepair {
            extent,
            column_index: 3,
            new,
            epoch: 1,
        },
    );
    // Emptied but silent: stays Failed.
    assert!(state.failed_sleds_ready_to_return().is_empty());
    assert!(state.reclaimable_columns(64).is_empty());
    // Answering on one network only: still Failed.
    apply(
        &mut state,
        Command::ReportPathFault {
            endpoint: Endpoint::Sled(lost.clone()),
            network: Network::A,
            up: true,
        },
    );
    assert!(state.failed_sleds_ready_to_return().is_empty());
    apply(
        &mut state,
        Command::ReportPathFault {
            endpoint: Endpoint::Sled(lost.clone()),
            network: Network::B,
            up: true,
        },
    );
    assert_eq!(state.failed_sleds_ready_to_return(), vec![lost.clone()]);
    let planned = plan(
        &state,
        &RepairConfig::default(),
        Instant::now(),
        0,
        &mut DownSince::new(),
        &Default::default(),
    );
    assert!(planned.contains(&Command::SetSledHealth {
        sled: lost.clone(),
        health: Health::Up,
    }));
    apply(
        &mut state,
        Command::SetSledHealth {
            sled: lost.clone(),
            health: Health::Up,
        },
    );
    // Its retired column is reclaimable now, and moves to the free set.
    assert_eq!(state.reclaimable_columns(64), vec![old.clone()]);
    assert!(state.reclaimable_columns(0).is_empty());
    let free_before = state.sleds()[&lost].devices[&old.device].free_columns.len();
    apply(
        &mut state,
        Command::ReclaimColumns {
            columns: vec![old.clone()],
        },
    );
    let device = &state.sleds()[&lost].devices[&old.device];
    assert!(device.free_columns.contains(&old.index));
    assert!(!device.retired_columns.contains(&old.index));
    assert_eq!(device.free_columns.len(), free_before + 1);
    // A repeat, or a column that is in use, changes nothing.
    let used = state.extents()[&extent].columns[0].clone().unwrap();
    let before = state.clone();
    apply(
        &mut state,
        Command::ReclaimColumns {
            columns: vec![old, used],
        },
    );
    assert_eq!(state, before);
    state.check_invariants().unwrap();
    // Too many in one command: refused.
    let many = (0..=super::repair::MAX_RECLAIM_PER_COMMAND as u32)
        .map(|index| ColumnRef {
            sled: lost.clone(),
            device: 0,
            index,
        })
        .collect();
    assert!(matches!(
        refused(&mut state, Command::ReclaimColumns { columns: many }),
        CommandError::InvalidArgument { .. }
    ));
}

#[test]
fn work_that_cannot_be_placed_says_why() {
    // Six sleds, a 4+2 extent on all of them: a Failed sled's column has
    // nowhere to go, and draining any sled would move nothing.
    let mut state = unit(6);
    let extent = allocate(&mut state);
    assert_eq!(state.extents()[&extent].present().count(), 6);
    let outlook = state.drain_outlook(&sled(0));
    assert_eq!(outlook.columns, 1);
    assert_eq!(
        outlook.blocked,
        vec![BlockedColumns {
            block: PlacementBlock::NoOtherSled {
                width: 6,
                up_sleds: 5
            },
            columns: 1
        }]
    );
    assert!(
        state.blocked_repairs().is_empty(),
        "nothing needs repair yet"
    );
    let lost = state.extents()[&extent].columns[0].clone().unwrap().sled;
    apply(
        &mut state,
        Command::SetSledHealth {
            sled: lost.clone(),
            health: Health::Failed,
        },
    );
    let blocked = state.blocked_repairs();
    assert_eq!(blocked.len(), 1, "{blocked:?}");
    assert_eq!(blocked[0].columns, 1);
    assert!(matches!(
        blocked[0].block,
        PlacementBlock::NoOtherSled {
            width: 6,
            up_sleds: 5
        }
    ));
    assert!(blocked[0].block.to_string().contains("distinct sleds"));
    assert_eq!(state.repair_status().blocked, blocked);
    // The status says so, and it serializes (JSON output of the CLI).
    let json = serde_json::to_string(&state.unit_status()).unwrap();
    assert!(json.contains("no_other_sled"), "{json}");
}

/// Sets both devices of `sled` to `health`.
fn set_devices(state: &mut UnitState, sled: &SledId, health: Health) {
    for device in 0..2 {
        apply(
            state,
            Command::SetDeviceHealth {
                device: DeviceRef {
                    sled: sled.clone(),
                    device,
                },
                health,
            },
        );
    }
}

#[test]
fn a_seventh_sled_without_space_is_no_free_column_and_with_space_unblocks() {
    let mut state = unit(7);
    let extent = allocate(&mut state);
    let spare = (0..7)
        .map(sled)
        .find(|s| {
            state.extents()[&extent]
                .present()
                .all(|(_, c)| &c.sled != s)
        })
        .unwrap();
    set_devices(&mut state, &spare, Health::Failed);
    let member = state.extents()[&extent].columns[1].clone().unwrap().sled;
    let outlook = state.drain_outlook(&member);
    assert_eq!(
        outlook.blocked,
        vec![BlockedColumns {
            block: PlacementBlock::NoFreeColumn { sleds: 1 },
            columns: 1
        }]
    );
    set_devices(&mut state, &spare, Health::Up);
    let outlook = state.drain_outlook(&member);
    assert_eq!((outlook.columns, outlook.blocked_columns()), (1, 0));
}
