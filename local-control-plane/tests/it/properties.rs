//! Random sequences of commands, valid and invalid mixed.
//!
//! Operations are plain data with "pick" numbers that are resolved against
//! the current state when applied (pick an existing extent, present the
//! current epoch or one off by one, ...), so a good share of them is valid
//! and reaches deep states, while shrinking still works on the raw data.
//!
//! After every step: the invariants hold; no partition's epoch decreased
//! and no partition vanished; a change of primary or secondary raised the
//! epoch by exactly one; a refused command left the serialized state
//! byte-identical; columns are conserved (only `AddFreeColumns` adds any).
//! At the end: replaying the same commands on a fresh state gives the same
//! bytes (determinism), and the snapshot round-trips.

use local_control_plane::{
    Command, DeviceRef, DeviceSpec, Endpoint, Epoch, ExtentId, Health, Network, NodeId, Outcome,
    PartitionId, SledId, UnitState,
};
use proptest::prelude::*;

const NODES: usize = 5;
const SLEDS: usize = 8;
const VOLUMES: u64 = 3;
const COLUMN: u64 = 1 << 20;

fn node(n: usize) -> NodeId {
    NodeId(format!("head-{}", n % NODES))
}

fn sled(n: usize) -> SledId {
    SledId(format!("sled-{}", n % SLEDS))
}

#[derive(Debug, Clone)]
enum Op {
    RegisterNode {
        node: usize,
        same_addresses: bool,
    },
    RegisterSled {
        sled: usize,
        fault_domain: u8,
        power_domain: u8,
        devices: u16,
        columns: u64,
    },
    AddFreeColumns {
        sled: usize,
        device: u16,
        columns: Vec<u32>,
    },
    RegisterVolume {
        volume: u64,
        partitions: u64,
        k: u8,
        m: u8,
        reuse_name: bool,
    },
    Allocate {
        partition: usize,
    },
    Free {
        extent: usize,
        partition: Option<usize>,
        epoch_delta: i8,
    },
    Refill {
        partition: usize,
        target: u32,
        /// Degraded extents allowed with at least this many columns.
        min_columns: Option<u16>,
    },
    OpenSandbox {
        partition: usize,
        extent: usize,
        epoch_delta: i8,
    },
    ChangePrimary {
        partition: usize,
        primary: usize,
        secondary: Option<usize>,
        epoch_delta: i8,
        now_ms: u64,
    },
    ChangeSecondary {
        partition: usize,
        secondary: usize,
    },
    Lease {
        partition: usize,
        holder: Option<usize>,
        epoch_delta: i8,
        now_ms: u64,
        duration_ms: u64,
    },
    NodeHealth {
        node: usize,
        health: Health,
    },
    SledHealth {
        sled: usize,
        health: Health,
    },
    DeviceHealth {
        sled: usize,
        device: u16,
        health: Health,
    },
    PathFault {
        node: Option<usize>,
        sled: usize,
        network_a: bool,
        up: bool,
    },
}

fn health() -> impl Strategy<Value = Health> {
    prop_oneof![
        4 => Just(Health::Up),
        1 => Just(Health::Down),
        1 => Just(Health::Draining),
        1 => Just(Health::Failed),
    ]
}

/// Mostly the current epoch, sometimes one off either way.
fn epoch_delta() -> impl Strategy<Value = i8> {
    prop_oneof![6 => Just(0i8), 1 => Just(-1i8), 1 => Just(1i8)]
}

fn op() -> impl Strategy<Value = Op> {
    let any_index = 0usize..64;
    prop_oneof![
        2 => (0..NODES, prop::bool::weighted(0.1))
            .prop_map(|(node, same_addresses)| Op::RegisterNode { node, same_addresses }),
        2 => (0..SLEDS, 0u8..3, 0u8..2, 1u16..3, 2u64..10)
            .prop_map(|(sled, fault_domain, power_domain, devices, columns)| Op::RegisterSled {
                sled, fault_domain, power_domain, devices, columns
            }),
        3 => (0..SLEDS, 0u16..3, prop::collection::vec(0u32..10, 0..5))
            .prop_map(|(sled, device, columns)| Op::AddFreeColumns { sled, device, columns }),
        2 => (1..=VOLUMES, 1u64..5, 1u8..4, 0u8..3, prop::bool::weighted(0.1))
            .prop_map(|(volume, partitions, k, m, reuse_name)| Op::RegisterVolume {
                volume, partitions, k, m, reuse_name
            }),
        4 => any_index.clone().prop_map(|partition| Op::Allocate { partition }),
        3 => (any_index.clone(), prop::option::weighted(0.2, any_index.clone()), epoch_delta())
            .prop_map(|(extent, partition, epoch_delta)| Op::Free { extent, partition, epoch_delta }),
        2 => (any_index.clone(), 0u32..4, proptest::option::of(0u16..8))
            .prop_map(|(partition, target, min_columns)| Op::Refill { partition, target, min_columns }),
        2 => (any_index.clone(), any_index.clone(), epoch_delta())
            .prop_map(|(partition, extent, epoch_delta)| Op::OpenSandbox { partition, extent, epoch_delta }),
        3 => (any_index.clone(), 0..NODES, prop::option::of(0..NODES), epoch_delta(), 0u64..20_000)
            .prop_map(|(partition, primary, secondary, epoch_delta, now_ms)| Op::ChangePrimary {
                partition, primary, secondary, epoch_delta, now_ms
            }),
        2 => (any_index.clone(), 0..NODES)
            .prop_map(|(partition, secondary)| Op::ChangeSecondary { partition, secondary }),
        3 => (any_index.clone(), prop::option::weighted(0.2, 0..NODES), epoch_delta(), 0u64..20_000, 0u64..8_000)
            .prop_map(|(partition, holder, epoch_delta, now_ms, duration_ms)| Op::Lease {
                partition, holder, epoch_delta, now_ms, duration_ms
            }),
        1 => (0..NODES, health()).prop_map(|(node, health)| Op::NodeHealth { node, health }),
        1 => (0..SLEDS, health()).prop_map(|(sled, health)| Op::SledHealth { sled, health }),
        1 => (0..SLEDS, 0u16..3, health())
            .prop_map(|(sled, device, health)| Op::DeviceHealth { sled, device, health }),
        1 => (prop::option::of(0..NODES), 0..SLEDS, any::<bool>(), any::<bool>())
            .prop_map(|(node, sled, network_a, up)| Op::PathFault { node, sled, network_a, up }),
    ]
}

fn partitions(state: &UnitState) -> Vec<PartitionId> {
    state.epochs().into_keys().collect()
}

/// The `pick`-th existing partition, or a nonexistent one if there is none.
fn pick_partition(state: &UnitState, pick: usize) -> PartitionId {
    let all = partitions(state);
    if all.is_empty() {
        PartitionId {
            volume: 1,
            index: 0,
        }
    } else {
        all[pick % all.len()]
    }
}

fn pick_extent(state: &UnitState, pick: usize) -> ExtentId {
    let all: Vec<_> = state.extents().keys().copied().collect();
    if all.is_empty() {
        ExtentId(pick as u64)
    } else {
        all[pick % all.len()]
    }
}

fn epoch_of(state: &UnitState, partition: PartitionId, delta: i8) -> Epoch {
    let current = state.partition(partition).map_or(1, |p| p.epoch);
    current.saturating_add_signed(i64::from(delta))
}

/// Resolve an operation against the current state.
fn to_command(state: &UnitState, op: &Op) -> Command {
    match op.clone() {
        Op::RegisterNode {
            node: n,
            same_addresses,
        } => Command::RegisterHeadNode {
            node: node(n),
            address_a: format!("a-{n}"),
            address_b: if same_addresses {
                format!("a-{n}")
            } else {
                format!("b-{n}")
            },
        },
        Op::RegisterSled {
            sled: n,
            fault_domain,
            power_domain,
            devices,
            columns,
        } => Command::RegisterSled {
            sled: sled(n),
            address_a: format!("sa-{n}"),
            address_b: format!("sb-{n}"),
            fault_domain: format!("fd-{fault_domain}"),
            power_domain: format!("pd-{power_domain}"),
            column_size_bytes: COLUMN,
            devices: (0..devices)
                .map(|device| DeviceSpec {
                    device,
                    size_bytes: columns * COLUMN,
                })
                .collect(),
        },
        Op::AddFreeColumns {
            sled: n,
            device,
            columns,
        } => Command::AddFreeColumns {
            sled: sled(n),
            device,
            columns,
        },
        Op::RegisterVolume {
            volume,
            partitions,
            k,
            m,
            reuse_name,
        } => Command::RegisterVolume {
            volume,
            name: if reuse_name {
                "vol-1".into()
            } else {
                format!("vol-{volume}")
            },
            size_bytes: partitions * (1 << 20),
            partition_size_bytes: 1 << 20,
            k,
            m,
        },
        Op::Allocate { partition } => Command::AllocateExtent {
            partition: pick_partition(state, partition),
        },
        Op::Free {
            extent,
            partition,
            epoch_delta,
        } => {
            let extent = pick_extent(state, extent);
            let owner = state.extents().get(&extent).map(|e| e.owner);
            let partition = match (partition, owner) {
                (None, Some(owner)) => owner,
                (pick, _) => pick_partition(state, pick.unwrap_or(0)),
            };
            Command::FreeExtent {
                extent,
                partition,
                epoch: epoch_of(state, partition, epoch_delta),
            }
        }
        Op::Refill {
            partition,
            target,
            min_columns,
        } => Command::RefillSandbox {
            partition: pick_partition(state, partition),
            target,
            min_columns,
        },
        Op::OpenSandbox {
            partition,
            extent,
            epoch_delta,
        } => {
            let partition = pick_partition(state, partition);
            let sandbox: Vec<_> = state
                .partition(partition)
                .map(|p| p.sandbox.iter().copied().collect())
                .unwrap_or_default();
            let extent = if sandbox.is_empty() {
                pick_extent(state, extent)
            } else {
                sandbox[extent % sandbox.len()]
            };
            Command::OpenSandboxExtent {
                partition,
                extent,
                epoch: epoch_of(state, partition, epoch_delta),
            }
        }
        Op::ChangePrimary {
            partition,
            primary,
            secondary,
            epoch_delta,
            now_ms,
        } => {
            let partition = pick_partition(state, partition);
            Command::ChangePrimary {
                partition,
                new_primary: node(primary),
                new_secondary: secondary.map(node),
                expected_epoch: epoch_of(state, partition, epoch_delta),
                now_ms,
            }
        }
        Op::ChangeSecondary {
            partition,
            secondary,
        } => Command::ChangeSecondary {
            partition: pick_partition(state, partition),
            new_secondary: node(secondary),
        },
        Op::Lease {
            partition,
            holder,
            epoch_delta,
            now_ms,
            duration_ms,
        } => {
            let partition = pick_partition(state, partition);
            let primary = state.partition(partition).map(|p| p.primary.clone());
            let holder = match (holder, primary) {
                (None, Some(primary)) => primary,
                (pick, _) => node(pick.unwrap_or(0)),
            };
            Command::GrantLease {
                partition,
                holder,
                epoch: epoch_of(state, partition, epoch_delta),
                now_ms,
                duration_ms,
            }
        }
        Op::NodeHealth { node: n, health } => Command::SetNodeHealth {
            node: node(n),
            health,
        },
        Op::SledHealth { sled: n, health } => Command::SetSledHealth {
            sled: sled(n),
            health,
        },
        Op::DeviceHealth {
            sled: n,
            device,
            health,
        } => Command::SetDeviceHealth {
            device: DeviceRef {
                sled: sled(n),
                device,
            },
            health,
        },
        Op::PathFault {
            node: n,
            sled: s,
            network_a,
            up,
        } => Command::ReportPathFault {
            endpoint: match n {
                Some(n) => Endpoint::Node(node(n)),
                None => Endpoint::Sled(sled(s)),
            },
            network: if network_a { Network::A } else { Network::B },
            up,
        },
    }
}

/// A small healthy unit: 4 head nodes, 7 sleds in 3 fault domains with 6
/// free columns each, volume 1 (3 partitions, 2+1).
fn setup() -> Vec<Command> {
    let mut commands = Vec::new();
    for n in 0..4 {
        commands.push(to_command(
            &UnitState::new(),
            &Op::RegisterNode {
                node: n,
                same_addresses: false,
            },
        ));
    }
    for n in 0..7 {
        commands.push(to_command(
            &UnitState::new(),
            &Op::RegisterSled {
                sled: n,
                fault_domain: (n % 3) as u8,
                power_domain: (n % 2) as u8,
                devices: 2,
                columns: 8,
            },
        ));
        for device in 0..2 {
            commands.push(Command::AddFreeColumns {
                sled: sled(n),
                device,
                columns: (0..3).collect(),
            });
        }
    }
    commands.push(Command::RegisterVolume {
        volume: 1,
        name: "vol-1".into(),
        size_bytes: 3 << 20,
        partition_size_bytes: 1 << 20,
        k: 2,
        m: 1,
    });
    commands
}

fn total_columns(state: &UnitState) -> u64 {
    let capacity = state.unit_status().capacity;
    capacity.free_columns + capacity.used_columns
}

/// Apply one command and check every per-step property.
fn step(state: &mut UnitState, command: &Command) -> Result<(), TestCaseError> {
    let before_bytes = serde_json::to_string(&*state).unwrap();
    let before_epochs = state.epochs();
    let before_columns = total_columns(state);
    let result = state.apply(command.clone());
    if let Err(error) = &result {
        let after_bytes = serde_json::to_string(&*state).unwrap();
        // Not prop_assert_eq: two whole snapshots would drown the report.
        prop_assert!(
            before_bytes == after_bytes,
            "{:?} refused with {} changed the state",
            command,
            error
        );
    }
    if let Err(violation) = state.check_invariants() {
        return Err(TestCaseError::fail(format!(
            "after {command:?} -> {result:?}: {violation}"
        )));
    }
    let after_epochs = state.epochs();
    for (partition, epoch) in &before_epochs {
        let after = after_epochs.get(partition);
        prop_assert!(
            after.is_some_and(|a| a >= epoch),
            "epoch of {} went from {} to {:?}",
            partition,
            epoch,
            after
        );
    }
    if let Ok(Outcome::EpochChanged { partition, epoch }) = &result {
        prop_assert_eq!(
            Some(&(before_epochs[partition] + 1)),
            after_epochs.get(partition)
        );
        prop_assert_eq!(after_epochs[partition], *epoch);
    }
    let added = match (command, &result) {
        (Command::AddFreeColumns { columns, .. }, Ok(_)) => columns.len() as u64,
        _ => 0,
    };
    prop_assert_eq!(
        total_columns(state),
        before_columns + added,
        "columns not conserved by {:?}",
        command
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_commands_keep_the_invariants(with_setup in prop::bool::weighted(0.8), ops in prop::collection::vec(op(), 1..80)) {
        let mut state = UnitState::new();
        let mut log = Vec::new();
        if with_setup {
            for command in setup() {
                let before = serde_json::to_string(&state).unwrap();
                prop_assert!(state.apply(command.clone()).is_ok(), "setup {:?} refused", command);
                prop_assert_ne!(before, serde_json::to_string(&state).unwrap());
                log.push(command);
            }
        }
        for op in &ops {
            let command = to_command(&state, op);
            step(&mut state, &command)?;
            log.push(command);
        }

        // Deterministic: the same log gives the same bytes.
        let mut replica = UnitState::new();
        for command in log {
            let _ = replica.apply(command);
        }
        prop_assert_eq!(serde_json::to_string(&replica).unwrap(), serde_json::to_string(&state).unwrap());

        // Snapshot round trip.
        let snapshot = serde_json::to_vec(&state).unwrap();
        let restored: UnitState = serde_json::from_slice(&snapshot).unwrap();
        prop_assert_eq!(&restored, &state);
        restored.check_invariants().map_err(TestCaseError::fail)?;
    }

    #[test]
    fn commands_round_trip_through_serde(op in op(), with_setup in any::<bool>()) {
        let mut state = UnitState::new();
        if with_setup {
            for command in setup() {
                let _ = state.apply(command);
            }
        }
        let command = to_command(&state, &op);
        let bytes = serde_json::to_vec(&command).unwrap();
        let back: Command = serde_json::from_slice(&bytes).unwrap();
        prop_assert_eq!(&back, &command);
        let result = state.apply(command);
        let bytes = serde_json::to_vec(&result).unwrap();
        let back: Result<Outcome, local_control_plane::CommandError> = serde_json::from_slice(&bytes).unwrap();
        prop_assert_eq!(back, result);
    }
}

/// The generator reaches the interesting states, not just refusals.
#[test]
fn generator_covers_successes_of_every_kind() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let mut state = UnitState::new();
        for command in setup() {
            state.apply(command).unwrap();
        }
        let ops = prop::collection::vec(op(), 80)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        for op in &ops {
            let command = to_command(&state, op);
            let name = format!("{command:?}");
            let name = name
                .split([' ', '{'])
                .next()
                .unwrap_or_default()
                .to_string();
            if state.apply(command).is_ok() {
                seen.insert(name);
            }
        }
    }
    for kind in [
        "RegisterHeadNode",
        "RegisterSled",
        "AddFreeColumns",
        "RegisterVolume",
        "AllocateExtent",
        "FreeExtent",
        "RefillSandbox",
        "OpenSandboxExtent",
        "ChangePrimary",
        "ChangeSecondary",
        "GrantLease",
        "SetNodeHealth",
        "SetSledHealth",
        "SetDeviceHealth",
        "ReportPathFault",
    ] {
        assert!(
            seen.contains(kind),
            "no successful {kind} in 64 runs; saw {seen:?}"
        );
    }
}
