//! Unit tests: every command's effect and every refusal.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

pub(super) fn node(n: usize) -> NodeId {
    NodeId(format!("head-{n}"))
}

pub(super) fn sled(n: usize) -> SledId {
    SledId(format!("sled-{n}"))
}

const COLUMN: u64 = 64 << 20;

pub(super) fn register_node(n: usize) -> Command {
    Command::RegisterHeadNode {
        node: node(n),
        address_a: format!("10.0.0.{n}:7000"),
        address_b: format!("10.1.0.{n}:7000"),
    }
}

/// Sled `n` in fault domain `n % 3`, power domain `n % 2`, two devices of 8 columns.
pub(super) fn register_sled(n: usize) -> Command {
    Command::RegisterSled {
        sled: sled(n),
        address_a: format!("10.0.1.{n}:7100"),
        address_b: format!("10.1.1.{n}:7100"),
        fault_domain: format!("fd-{}", n % 3),
        power_domain: format!("pd-{}", n % 2),
        column_size_bytes: COLUMN,
        devices: vec![
            DeviceSpec {
                device: 0,
                size_bytes: 8 * COLUMN,
            },
            DeviceSpec {
                device: 1,
                size_bytes: 8 * COLUMN,
            },
        ],
    }
}

pub(super) fn free_columns(n: usize, device: u16, columns: std::ops::Range<u32>) -> Command {
    Command::AddFreeColumns {
        sled: sled(n),
        device,
        columns: columns.collect(),
    }
}

pub(crate) fn volume(id: VolumeId, partitions: u64, k: u8, m: u8) -> Command {
    Command::RegisterVolume {
        volume: id,
        name: format!("vol-{id}"),
        size_bytes: partitions << 30,
        partition_size_bytes: 1 << 30,
        k,
        m,
    }
}

pub(crate) fn ok(state: &mut UnitState, command: Command) -> Outcome {
    let before = state.epochs();
    let outcome = state
        .apply(command.clone())
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    state.check_invariants().unwrap();
    let after = state.epochs();
    for (p, e) in before {
        // A deleted volume's partitions leave the map (with their epochs).
        if let Some(now) = after.get(&p) {
            assert!(*now >= e, "epoch of {p} went down");
        }
    }
    outcome
}

pub(crate) fn refused(state: &mut UnitState, command: Command) -> CommandError {
    let before = state.clone();
    let error = state
        .apply(command.clone())
        .expect_err(&format!("{command:?} applied"));
    assert_eq!(
        *state, before,
        "{command:?} was refused with {error} but changed the state"
    );
    error
}

/// 3 head nodes, 6 sleds in 3 fault domains with 16 free columns each, and
/// volume 1 (4 partitions, 4+2).
pub(crate) fn unit() -> UnitState {
    let mut state = UnitState::new();
    for n in 0..3 {
        ok(&mut state, register_node(n));
    }
    for n in 0..6 {
        ok(&mut state, register_sled(n));
        ok(&mut state, free_columns(n, 0, 0..8));
        ok(&mut state, free_columns(n, 1, 0..8));
    }
    ok(&mut state, volume(1, 4, 4, 2));
    state
}

pub(super) fn p(volume: VolumeId, index: u32) -> PartitionId {
    PartitionId { volume, index }
}

pub(super) fn allocate(
    state: &mut UnitState,
    partition: PartitionId,
) -> (ExtentId, Vec<ColumnRef>) {
    match ok(state, Command::AllocateExtent { partition }) {
        Outcome::ExtentAllocated { extent, columns } => {
            (extent, columns.into_iter().map(Option::unwrap).collect())
        }
        other => panic!("{other:?}"),
    }
}

// Commands by their fields, in declaration order (a command literal per
// call made these tests mostly braces).

fn set_node_health(node: NodeId, health: Health) -> Command {
    Command::SetNodeHealth { node, health }
}

fn set_sled_health(sled: SledId, health: Health) -> Command {
    Command::SetSledHealth { sled, health }
}

fn set_device_health(sled: SledId, device: u16, health: Health) -> Command {
    Command::SetDeviceHealth {
        device: DeviceRef { sled, device },
        health,
    }
}

fn path_fault(endpoint: Endpoint, network: Network, up: bool) -> Command {
    Command::ReportPathFault {
        endpoint,
        network,
        up,
    }
}

fn grant_lease(
    partition: PartitionId,
    holder: NodeId,
    epoch: Epoch,
    now_ms: u64,
    duration_ms: u64,
) -> Command {
    Command::GrantLease {
        partition,
        holder,
        epoch,
        now_ms,
        duration_ms,
    }
}

fn change_primary(
    partition: PartitionId,
    new_primary: NodeId,
    new_secondary: Option<NodeId>,
    expected_epoch: Epoch,
    now_ms: u64,
) -> Command {
    Command::ChangePrimary {
        partition,
        new_primary,
        new_secondary,
        expected_epoch,
        now_ms,
    }
}

fn change_secondary(partition: PartitionId, new_secondary: NodeId) -> Command {
    Command::ChangeSecondary {
        partition,
        new_secondary,
    }
}

fn free_extent(extent: ExtentId, partition: PartitionId, epoch: Epoch) -> Command {
    Command::FreeExtent {
        extent,
        partition,
        epoch,
    }
}

fn refill_sandbox(partition: PartitionId, target: u32) -> Command {
    Command::RefillSandbox {
        partition,
        target,
        min_columns: None,
    }
}

fn open_sandbox_extent(partition: PartitionId, extent: ExtentId, epoch: Epoch) -> Command {
    Command::OpenSandboxExtent {
        partition,
        extent,
        epoch,
    }
}

// ---- inventory ------------------------------------------------------------

#[test]
fn register_head_node_adds_an_up_node() {
    let mut state = UnitState::new();
    ok(&mut state, register_node(7));
    let entry = &state.nodes()[&node(7)];
    assert_eq!(entry.health, Health::Up);
    assert_eq!(entry.address_b, "10.1.0.7:7000");
    assert_eq!(
        entry.paths,
        PathHealth {
            network_a_up: true,
            network_b_up: true
        }
    );
}

#[test]
fn register_head_node_refusals() {
    let mut state = UnitState::new();
    ok(&mut state, register_node(1));
    assert!(matches!(
        refused(&mut state, register_node(1)),
        CommandError::AlreadyExists {
            entity: Entity::HeadNode,
            ..
        }
    ));
    let same_address = Command::RegisterHeadNode {
        node: node(2),
        address_a: "x:1".into(),
        address_b: "x:1".into(),
    };
    assert!(matches!(
        refused(&mut state, same_address),
        CommandError::InvalidArgument { .. }
    ));
    let empty = Command::RegisterHeadNode {
        node: NodeId::new(""),
        address_a: "a".into(),
        address_b: "b".into(),
    };
    assert!(matches!(
        refused(&mut state, empty),
        CommandError::InvalidArgument { .. }
    ));
}

#[test]
fn register_sled_and_its_refusals() {
    let mut state = UnitState::new();
    ok(&mut state, register_sled(0));
    let entry = &state.sleds()[&sled(0)];
    assert_eq!(entry.devices.len(), 2);
    assert_eq!(entry.fault_domain, "fd-0");
    assert!(matches!(
        refused(&mut state, register_sled(0)),
        CommandError::AlreadyExists {
            entity: Entity::Sled,
            ..
        }
    ));
    let Command::RegisterSled { mut devices, .. } = register_sled(1) else {
        unreachable!()
    };
    devices.push(DeviceSpec {
        device: 0,
        size_bytes: COLUMN,
    });
    let duplicate_device = Command::RegisterSled {
        sled: sled(1),
        address_a: "a".into(),
        address_b: "b".into(),
        fault_domain: "f".into(),
        power_domain: "p".into(),
        column_size_bytes: COLUMN,
        devices,
    };
    assert!(matches!(
        refused(&mut state, duplicate_device),
        CommandError::AlreadyExists {
            entity: Entity::Device,
            ..
        }
    ));
    let bad_column_size = Command::RegisterSled {
        sled: sled(1),
        address_a: "a".into(),
        address_b: "b".into(),
        fault_domain: "f".into(),
        power_domain: "p".into(),
        column_size_bytes: 1000,
        devices: vec![DeviceSpec {
            device: 0,
            size_bytes: COLUMN,
        }],
    };
    assert!(matches!(
        refused(&mut state, bad_column_size),
        CommandError::InvalidArgument { .. }
    ));
    let no_devices = Command::RegisterSled {
        sled: sled(1),
        address_a: "a".into(),
        address_b: "b".into(),
        fault_domain: "f".into(),
        power_domain: "p".into(),
        column_size_bytes: COLUMN,
        devices: vec![],
    };
    assert!(matches!(
        refused(&mut state, no_devices),
        CommandError::InvalidArgument { .. }
    ));
}

#[test]
fn add_free_columns_and_its_refusals() {
    let mut state = UnitState::new();
    ok(&mut state, register_sled(0));
    ok(&mut state, free_columns(0, 0, 0..4));
    assert_eq!(state.sleds()[&sled(0)].devices[&0].free_columns.len(), 4);
    assert!(matches!(
        refused(&mut state, free_columns(0, 0, 3..5)),
        CommandError::AlreadyExists {
            entity: Entity::Column,
            ..
        }
    ));
    assert!(matches!(
        refused(&mut state, free_columns(9, 0, 0..1)),
        CommandError::UnknownSled { .. }
    ));
    assert!(matches!(
        refused(&mut state, free_columns(0, 7, 0..1)),
        CommandError::UnknownDevice { .. }
    ));
    // Beyond the device end (8 columns), listed twice, empty.
    assert!(matches!(
        refused(&mut state, free_columns(0, 1, 7..9)),
        CommandError::InvalidArgument { .. }
    ));
    let twice = Command::AddFreeColumns {
        sled: sled(0),
        device: 1,
        columns: vec![5, 5],
    };
    assert!(matches!(
        refused(&mut state, twice),
        CommandError::InvalidArgument { .. }
    ));
    assert!(matches!(
        refused(&mut state, free_columns(0, 1, 0..0)),
        CommandError::InvalidArgument { .. }
    ));
}

#[test]
fn columns_in_use_cannot_be_added_again() {
    let mut state = unit();
    let (_, columns) = allocate(&mut state, p(1, 0));
    let c = &columns[0];
    let again = Command::AddFreeColumns {
        sled: c.sled.clone(),
        device: c.device,
        columns: vec![c.index],
    };
    assert!(matches!(
        refused(&mut state, again),
        CommandError::AlreadyExists {
            entity: Entity::Column,
            ..
        }
    ));
}

#[test]
fn health_commands_record_health() {
    let mut state = unit();
    ok(&mut state, set_node_health(node(0), Health::Draining));
    ok(&mut state, set_sled_health(sled(1), Health::Down));
    ok(&mut state, set_device_health(sled(2), 1, Health::Failed));
    assert_eq!(state.nodes()[&node(0)].health, Health::Draining);
    assert_eq!(state.sleds()[&sled(1)].health, Health::Down);
    assert_eq!(state.sleds()[&sled(2)].devices[&1].health, Health::Failed);
    // Idempotent.
    assert_eq!(
        ok(&mut state, set_sled_health(sled(1), Health::Down)),
        Outcome::Done
    );
    assert!(matches!(
        refused(&mut state, set_node_health(node(9), Health::Up)),
        CommandError::UnknownNode { .. }
    ));
    assert!(matches!(
        refused(&mut state, set_sled_health(sled(9), Health::Up)),
        CommandError::UnknownSled { .. }
    ));
    assert!(matches!(
        refused(&mut state, set_device_health(sled(0), 9, Health::Up)),
        CommandError::UnknownDevice { .. }
    ));
}

#[test]
fn path_faults_are_recorded_without_changing_health() {
    let mut state = unit();
    let fault = path_fault(Endpoint::Node(node(1)), Network::A, false);
    ok(&mut state, fault);
    let entry = &state.nodes()[&node(1)];
    assert_eq!(
        entry.paths,
        PathHealth {
            network_a_up: false,
            network_b_up: true
        }
    );
    assert_eq!(entry.health, Health::Up);
    ok(
        &mut state,
        path_fault(Endpoint::Sled(sled(3)), Network::B, false),
    );
    assert!(!state.sleds()[&sled(3)].paths.network_b_up);
    ok(
        &mut state,
        path_fault(Endpoint::Node(node(1)), Network::A, true),
    );
    assert!(state.nodes()[&node(1)].paths.network_a_up);
    assert!(matches!(
        refused(
            &mut state,
            path_fault(Endpoint::Node(node(9)), Network::A, false)
        ),
        CommandError::UnknownNode { .. }
    ));
    assert!(matches!(
        refused(
            &mut state,
            path_fault(Endpoint::Sled(sled(9)), Network::B, true)
        ),
        CommandError::UnknownSled { .. }
    ));
}

// ---- volumes --------------------------------------------------------------

#[test]
fn register_volume_places_balanced_partitions() {
    let mut state = unit();
    let Outcome::VolumeRegistered { placement, .. } = ok(&mut state, volume(2, 8, 2, 1)) else {
        panic!()
    };
    assert_eq!(placement.len(), 8);
    for (primary, secondary) in &placement {
        assert_ne!(primary, secondary);
    }
    // 12 partitions over 3 nodes: 4 primaries and 4 secondaries each.
    for n in state.unit_status().nodes {
        assert_eq!((n.primaries, n.secondaries), (4, 4), "{n:?}");
    }
    let v = &state.volumes()[&2];
    assert!(v
        .partitions
        .iter()
        .all(|p| p.epoch == 1 && p.lease.is_none()));
    // A non-multiple size rounds the partition count up.
    ok(
        &mut state,
        Command::RegisterVolume {
            volume: 3,
            name: "odd".into(),
            size_bytes: (1 << 30) + 4096,
            partition_size_bytes: 1 << 30,
            k: 2,
            m: 1,
        },
    );
    assert_eq!(state.volumes()[&3].partitions.len(), 2);
}

#[test]
fn register_volume_skips_nodes_that_are_not_up() {
    let mut state = unit();
    ok(&mut state, set_node_health(node(2), Health::Draining));
    ok(&mut state, volume(2, 4, 2, 1));
    for partition in &state.volumes()[&2].partitions {
        assert_ne!(partition.primary, node(2));
        assert_ne!(partition.secondary, node(2));
    }
}

#[test]
fn register_volume_refusals() {
    let mut state = unit();
    assert!(matches!(
        refused(&mut state, volume(1, 1, 2, 1)),
        CommandError::AlreadyExists {
            entity: Entity::Volume,
            ..
        }
    ));
    let same_name = Command::RegisterVolume {
        volume: 9,
        name: "vol-1".into(),
        size_bytes: 1 << 30,
        partition_size_bytes: 1 << 30,
        k: 2,
        m: 1,
    };
    assert!(matches!(
        refused(&mut state, same_name),
        CommandError::AlreadyExists {
            entity: Entity::VolumeName,
            ..
        }
    ));
    assert_eq!(
        refused(&mut state, volume(9, 1, 6, 1)),
        CommandError::NotEnoughSleds {
            needed: 7,
            available: 6
        }
    );
    for (k, m) in [(0, 1), (1, 0), (30, 3)] {
        assert!(matches!(
            refused(&mut state, volume(9, 1, k, m)),
            CommandError::InvalidArgument { .. }
        ));
    }
    let unaligned = Command::RegisterVolume {
        volume: 9,
        name: "x".into(),
        size_bytes: 1000,
        partition_size_bytes: 1 << 30,
        k: 2,
        m: 1,
    };
    assert!(matches!(
        refused(&mut state, unaligned),
        CommandError::InvalidArgument { .. }
    ));
    let too_many = Command::RegisterVolume {
        volume: 9,
        name: "x".into(),
        size_bytes: 1 << 40,
        partition_size_bytes: 4096,
        k: 2,
        m: 1,
    };
    assert!(matches!(
        refused(&mut state, too_many),
        CommandError::InvalidArgument { .. }
    ));
    for n in 1..3 {
        ok(&mut state, set_node_health(node(n), Health::Down));
    }
    assert_eq!(
        refused(&mut state, volume(9, 1, 2, 1)),
        CommandError::NotEnoughNodes {
            needed: 2,
            available: 1
        }
    );
}

// ---- extents ----------------------------------------------------------------

#[test]
fn allocate_extent_uses_distinct_sleds_and_fault_domains() {
    let mut state = unit();
    let (extent, columns) = allocate(&mut state, p(1, 2));
    assert_eq!(columns.len(), 6);
    let sleds: BTreeSet<_> = columns.iter().map(|c| &c.sled).collect();
    assert_eq!(sleds.len(), 6);
    // 3 fault domains of 2 sleds: the first three columns span all three.
    let domains: BTreeSet<_> = columns[..3]
        .iter()
        .map(|c| &state.sleds()[&c.sled].fault_domain)
        .collect();
    assert_eq!(domains.len(), 3);
    assert_eq!(state.extents()[&extent].owner, p(1, 2));
    for c in &columns {
        let d = &state.sleds()[&c.sled].devices[&c.device];
        assert_eq!(d.used_columns.get(&c.index), Some(&extent));
        assert!(!d.free_columns.contains(&c.index));
    }
}

#[test]
fn allocation_prefers_different_fault_domains_when_it_can() {
    // 4 sleds in 4 fault domains plus 4 sleds sharing one domain; 2+1 code.
    let mut state = UnitState::new();
    for n in 0..2 {
        ok(&mut state, register_node(n));
    }
    for n in 0..8 {
        ok(
            &mut state,
            Command::RegisterSled {
                sled: sled(n),
                address_a: format!("a{n}"),
                address_b: format!("b{n}"),
                fault_domain: if n < 4 {
                    format!("fd-{n}")
                } else {
                    "fd-shared".into()
                },
                power_domain: "pd".into(),
                column_size_bytes: COLUMN,
                devices: vec![DeviceSpec {
                    device: 0,
                    size_bytes: 64 * COLUMN,
                }],
            },
        );
        // The shared-domain sleds have more free space: domain spread wins.
        let count = if n < 4 { 4 } else { 64 };
        ok(&mut state, free_columns(n, 0, 0..count));
    }
    ok(&mut state, volume(1, 1, 2, 1));
    let (_, columns) = allocate(&mut state, p(1, 0));
    let domains: BTreeSet<_> = columns
        .iter()
        .map(|c| state.sleds()[&c.sled].fault_domain.clone())
        .collect();
    assert_eq!(domains.len(), 3, "{columns:?}");
}

#[test]
fn allocation_skips_sleds_and_devices_that_are_not_up() {
    let mut state = unit();
    ok(&mut state, volume(2, 1, 2, 1));
    ok(&mut state, set_sled_health(sled(0), Health::Draining));
    ok(&mut state, set_sled_health(sled(1), Health::Down));
    ok(&mut state, set_device_health(sled(2), 0, Health::Failed));
    for _ in 0..8 {
        let (_, columns) = allocate(&mut state, p(2, 0));
        for c in columns {
            assert!(c.sled != sled(0) && c.sled != sled(1));
            assert!(!(c.sled == sled(2) && c.device == 0));
        }
    }
}

#[test]
fn allocation_refusals() {
    let mut state = unit();
    assert!(matches!(
        refused(&mut state, Command::AllocateExtent { partition: p(1, 9) }),
        CommandError::UnknownPartition { .. }
    ));
    assert!(matches!(
        refused(&mut state, Command::AllocateExtent { partition: p(7, 0) }),
        CommandError::UnknownPartition { .. }
    ));
    // 16 columns per sled, one per sled per extent: 16 extents fit.
    for _ in 0..16 {
        allocate(&mut state, p(1, 0));
    }
    assert_eq!(
        refused(&mut state, Command::AllocateExtent { partition: p(1, 0) }),
        CommandError::NoSpace {
            needed: 6,
            available: 0
        }
    );
    ok(&mut state, set_sled_health(sled(5), Health::Failed));
    assert_eq!(
        refused(&mut state, Command::AllocateExtent { partition: p(1, 0) }),
        CommandError::NotEnoughSleds {
            needed: 6,
            available: 5
        }
    );
}

#[test]
fn commit_guard_refuses_two_columns_on_one_sled() {
    let state = unit();
    let code = ErasureCode { k: 1, m: 1 };
    let columns = vec![
        ColumnRef {
            sled: sled(0),
            device: 0,
            index: 0,
        },
        ColumnRef {
            sled: sled(0),
            device: 1,
            index: 0,
        },
    ];
    assert_eq!(
        state.check_new_extent(
            code,
            &columns.into_iter().map(Some).collect::<Vec<_>>(),
            &BTreeSet::new(),
            code.width()
        ),
        Err(CommandError::ColumnsOnSameSled { sled: sled(0) })
    );
}

#[test]
fn free_extent_returns_columns() {
    let mut state = unit();
    let free_before = state.unit_status().capacity.free_columns;
    let (extent, columns) = allocate(&mut state, p(1, 1));
    let outcome = ok(&mut state, free_extent(extent, p(1, 1), 1));
    assert_eq!(outcome, Outcome::ExtentFreed { extent, columns });
    assert!(state.extents().is_empty());
    assert_eq!(state.unit_status().capacity.free_columns, free_before);
    // Ids are never reused.
    let (next, _) = allocate(&mut state, p(1, 1));
    assert!(next > extent);
}

#[test]
fn free_extent_refusals() {
    let mut state = unit();
    let (extent, _) = allocate(&mut state, p(1, 1));
    assert!(matches!(
        refused(&mut state, free_extent(ExtentId(77), p(1, 1), 1)),
        CommandError::UnknownExtent { .. }
    ));
    assert_eq!(
        refused(&mut state, free_extent(extent, p(1, 2), 1)),
        CommandError::ExtentNotOwned {
            extent,
            owner: p(1, 1),
            partition: p(1, 2)
        }
    );
    assert_eq!(
        refused(&mut state, free_extent(extent, p(1, 1), 0)),
        CommandError::StaleEpoch {
            partition: p(1, 1),
            current: 1,
            presented: 0
        }
    );
    assert!(matches!(
        refused(&mut state, free_extent(extent, p(1, 9), 1)),
        CommandError::UnknownPartition { .. }
    ));
}

#[test]
fn refill_sandbox_tops_up_to_target() {
    let mut state = unit();
    let Outcome::SandboxRefilled { added, .. } = ok(&mut state, refill_sandbox(p(1, 0), 3)) else {
        panic!()
    };
    assert_eq!(added.len(), 3);
    assert_eq!(state.partition(p(1, 0)).unwrap().sandbox.len(), 3);
    ok(&mut state, open_sandbox_extent(p(1, 0), added[0], 1));
    let sandbox = &state.partition(p(1, 0)).unwrap().sandbox;
    assert_eq!(sandbox.len(), 2);
    assert_eq!(
        state.extents()[&added[0]].owner,
        p(1, 0),
        "opened extents stay owned"
    );
    let Outcome::SandboxRefilled { added: more, .. } = ok(&mut state, refill_sandbox(p(1, 0), 3))
    else {
        panic!()
    };
    assert_eq!(more.len(), 1);
    // Already full: nothing added, nothing changed.
    let before = state.clone();
    ok(&mut state, refill_sandbox(p(1, 0), 2));
    assert_eq!(state, before);
    // Freeing a sandbox extent also leaves the sandbox.
    ok(&mut state, free_extent(more[0], p(1, 0), 1));
    assert!(!state.partition(p(1, 0)).unwrap().sandbox.contains(&more[0]));
}

#[test]
fn refill_sandbox_is_all_or_nothing() {
    let mut state = unit();
    // 16 extents fit in total; ask for 17 at once.
    assert!(matches!(
        refused(&mut state, refill_sandbox(p(1, 0), 17)),
        CommandError::NoSpace { .. }
    ));
    assert!(matches!(
        refused(&mut state, refill_sandbox(p(1, 0), MAX_SANDBOX_EXTENTS + 1)),
        CommandError::InvalidArgument { .. }
    ));
    assert!(matches!(
        refused(&mut state, refill_sandbox(p(1, 9), 1)),
        CommandError::UnknownPartition { .. }
    ));
    ok(&mut state, refill_sandbox(p(1, 0), 16));
}

#[test]
fn open_sandbox_extent_refusals() {
    let mut state = unit();
    ok(&mut state, refill_sandbox(p(1, 0), 1));
    let (direct, _) = allocate(&mut state, p(1, 0));
    let (other, _) = allocate(&mut state, p(1, 1));
    let sandboxed = *state.partition(p(1, 0)).unwrap().sandbox.first().unwrap();
    assert_eq!(
        refused(&mut state, open_sandbox_extent(p(1, 0), direct, 1)),
        CommandError::NotInSandbox {
            extent: direct,
            partition: p(1, 0)
        }
    );
    assert!(matches!(
        refused(&mut state, open_sandbox_extent(p(1, 0), other, 1)),
        CommandError::ExtentNotOwned { .. }
    ));
    assert!(matches!(
        refused(&mut state, open_sandbox_extent(p(1, 0), ExtentId(99), 1)),
        CommandError::UnknownExtent { .. }
    ));
    assert!(matches!(
        refused(&mut state, open_sandbox_extent(p(1, 0), sandboxed, 2)),
        CommandError::StaleEpoch {
            current: 1,
            presented: 2,
            ..
        }
    ));
}

// ---- roles, epochs, leases -------------------------------------------------

fn roles(state: &UnitState, id: PartitionId) -> (NodeId, NodeId, Epoch) {
    let partition = state.partition(id).unwrap();
    (
        partition.primary.clone(),
        partition.secondary.clone(),
        partition.epoch,
    )
}

fn third_node(state: &UnitState, id: PartitionId) -> NodeId {
    let (primary, secondary, _) = roles(state, id);
    (0..3)
        .map(node)
        .find(|n| *n != primary && *n != secondary)
        .unwrap()
}

#[test]
fn failover_promotes_the_secondary_and_names_a_new_one() {
    let mut state = unit();
    let id = p(1, 0);
    let (old_primary, old_secondary, _) = roles(&state, id);
    let spare = third_node(&state, id);
    let outcome = ok(
        &mut state,
        change_primary(id, old_secondary.clone(), Some(spare.clone()), 1, 0),
    );
    assert_eq!(
        outcome,
        Outcome::EpochChanged {
            partition: id,
            epoch: 2
        }
    );
    assert_eq!(roles(&state, id), (old_secondary, spare, 2));
    assert_ne!(state.partition(id).unwrap().primary, old_primary);
}

#[test]
fn change_primary_to_a_third_node_keeps_the_secondary() {
    let mut state = unit();
    let id = p(1, 1);
    let (_, secondary, _) = roles(&state, id);
    let spare = third_node(&state, id);
    ok(&mut state, change_primary(id, spare.clone(), None, 1, 0));
    assert_eq!(roles(&state, id), (spare, secondary, 2));
}

#[test]
fn change_primary_refusals() {
    let mut state = unit();
    let id = p(1, 0);
    let (primary, secondary, _) = roles(&state, id);
    let spare = third_node(&state, id);
    let change = |new_primary: &NodeId, new_secondary: Option<&NodeId>, expected_epoch| {
        change_primary(
            id,
            new_primary.clone(),
            new_secondary.cloned(),
            expected_epoch,
            1_000,
        )
    };
    assert_eq!(
        refused(&mut state, change(&secondary, None, 1)),
        CommandError::PrimaryEqualsSecondary {
            partition: id,
            node: secondary.clone()
        }
    );
    assert_eq!(
        refused(&mut state, change(&spare, Some(&spare), 1)),
        CommandError::PrimaryEqualsSecondary {
            partition: id,
            node: spare.clone()
        }
    );
    assert_eq!(
        refused(&mut state, change(&spare, None, 0)),
        CommandError::StaleEpoch {
            partition: id,
            current: 1,
            presented: 0
        }
    );
    assert!(matches!(
        refused(&mut state, change(&primary, None, 1)),
        CommandError::InvalidArgument { .. }
    ));
    assert!(matches!(
        refused(&mut state, change(&node(9), None, 1)),
        CommandError::UnknownNode { .. }
    ));
    assert!(matches!(
        refused(
            &mut state,
            change_primary(p(1, 9), spare.clone(), None, 1, 0)
        ),
        CommandError::UnknownPartition { .. }
    ));
    ok(&mut state, set_node_health(spare.clone(), Health::Down));
    assert_eq!(
        refused(&mut state, change(&spare, None, 1)),
        CommandError::NodeNotUp {
            node: spare.clone(),
            health: Health::Down
        }
    );
    assert!(matches!(
        refused(&mut state, change(&secondary, Some(&spare), 1)),
        CommandError::NodeNotUp { .. }
    ));
}

#[test]
fn change_primary_waits_for_the_lease_to_expire() {
    let mut state = unit();
    let id = p(1, 0);
    let (primary, secondary, _) = roles(&state, id);
    let spare = third_node(&state, id);
    ok(
        &mut state,
        grant_lease(id, primary.clone(), 1, 1_000, 5_000),
    );
    let promote = |now_ms| change_primary(id, secondary.clone(), Some(spare.clone()), 1, now_ms);
    assert_eq!(
        refused(&mut state, promote(5_999)),
        CommandError::LeaseHeld {
            partition: id,
            holder: primary.clone(),
            until_ms: 6_000
        }
    );
    ok(&mut state, promote(6_000));
    assert_eq!(state.partition(id).unwrap().lease, None);
    // The old primary can no longer get a lease, at either epoch.
    assert!(matches!(
        refused(
            &mut state,
            grant_lease(id, primary.clone(), 2, 6_000, 5_000)
        ),
        CommandError::NotPrimary { .. }
    ));
}

#[test]
fn change_secondary_bumps_the_epoch() {
    let mut state = unit();
    let id = p(1, 3);
    let (primary, _, _) = roles(&state, id);
    let spare = third_node(&state, id);
    ok(&mut state, grant_lease(id, primary.clone(), 1, 0, 1_000));
    let outcome = ok(&mut state, change_secondary(id, spare.clone()));
    assert_eq!(
        outcome,
        Outcome::EpochChanged {
            partition: id,
            epoch: 2
        }
    );
    assert_eq!(roles(&state, id), (primary.clone(), spare.clone(), 2));
    // The primary keeps its lease; renewing it needs the new epoch.
    assert!(state.partition(id).unwrap().lease.is_some());
    assert!(matches!(
        refused(&mut state, grant_lease(id, primary.clone(), 1, 10, 1_000)),
        CommandError::StaleEpoch { current: 2, .. }
    ));
    ok(&mut state, grant_lease(id, primary.clone(), 2, 10, 1_000));
}

#[test]
fn change_secondary_refusals() {
    let mut state = unit();
    let id = p(1, 3);
    let (primary, secondary, _) = roles(&state, id);
    let spare = third_node(&state, id);
    assert_eq!(
        refused(&mut state, change_secondary(id, primary.clone())),
        CommandError::PrimaryEqualsSecondary {
            partition: id,
            node: primary.clone()
        }
    );
    assert!(matches!(
        refused(&mut state, change_secondary(id, secondary)),
        CommandError::InvalidArgument { .. }
    ));
    assert!(matches!(
        refused(&mut state, change_secondary(id, node(9))),
        CommandError::UnknownNode { .. }
    ));
    assert!(matches!(
        refused(&mut state, change_secondary(p(1, 9), spare.clone())),
        CommandError::UnknownPartition { .. }
    ));
    ok(&mut state, set_node_health(spare.clone(), Health::Failed));
    assert!(matches!(
        refused(&mut state, change_secondary(id, spare)),
        CommandError::NodeNotUp {
            health: Health::Failed,
            ..
        }
    ));
}

#[test]
fn epoch_cannot_wrap() {
    let mut state = unit();
    let id = p(1, 0);
    let spare = third_node(&state, id);
    state.volumes.get_mut(&1).unwrap().partitions[0].epoch = Epoch::MAX;
    assert_eq!(
        refused(&mut state, change_secondary(id, spare)),
        CommandError::EpochBackwards {
            partition: id,
            current: Epoch::MAX
        }
    );
}

#[test]
fn lease_grant_and_renewal() {
    let mut state = unit();
    let id = p(1, 2);
    let (primary, _, _) = roles(&state, id);
    let grant = |now_ms, duration_ms| grant_lease(id, primary.clone(), 1, now_ms, duration_ms);
    assert!(matches!(
        ok(&mut state, grant(100, 1_000)),
        Outcome::LeaseGranted {
            expires_at_ms: 1_100,
            ..
        }
    ));
    assert!(matches!(
        ok(&mut state, grant(600, 1_000)),
        Outcome::LeaseGranted {
            expires_at_ms: 1_600,
            ..
        }
    ));
    // A renewal from a clock that is behind never shortens the lease.
    assert!(matches!(
        ok(&mut state, grant(50, 1_000)),
        Outcome::LeaseGranted {
            expires_at_ms: 1_600,
            ..
        }
    ));
    // A Draining primary still renews.
    ok(
        &mut state,
        set_node_health(primary.clone(), Health::Draining),
    );
    ok(&mut state, grant(700, 1_000));
    assert_eq!(
        state.partition_map(1).unwrap().partitions[2].lease_expires_at_ms,
        Some(1_700)
    );
}

#[test]
fn lease_refusals() {
    let mut state = unit();
    let id = p(1, 2);
    let (primary, secondary, _) = roles(&state, id);
    let grant = |holder: &NodeId, epoch, now_ms, duration_ms| {
        grant_lease(id, holder.clone(), epoch, now_ms, duration_ms)
    };
    assert_eq!(
        refused(&mut state, grant(&secondary, 1, 0, 1_000)),
        CommandError::NotPrimary {
            partition: id,
            node: secondary.clone(),
            primary: primary.clone()
        }
    );
    assert_eq!(
        refused(&mut state, grant(&primary, 2, 0, 1_000)),
        CommandError::StaleEpoch {
            partition: id,
            current: 1,
            presented: 2
        }
    );
    for duration in [0, MAX_LEASE_DURATION_MS + 1] {
        assert!(matches!(
            refused(&mut state, grant(&primary, 1, 0, duration)),
            CommandError::InvalidArgument { .. }
        ));
    }
    assert!(matches!(
        refused(&mut state, grant(&primary, 1, u64::MAX, 1)),
        CommandError::InvalidArgument { .. }
    ));
    assert!(matches!(
        refused(&mut state, grant_lease(p(1, 9), primary.clone(), 1, 0, 1)),
        CommandError::UnknownPartition { .. }
    ));
    ok(&mut state, set_node_health(primary.clone(), Health::Down));
    assert!(matches!(
        refused(&mut state, grant(&primary, 1, 0, 1_000)),
        CommandError::NodeNotUp {
            health: Health::Down,
            ..
        }
    ));
}

/// One head node's renewal (`GrantLeases`) grants each listed partition
/// exactly as its own `GrantLease` would, and refuses each on its own:
/// a stale epoch or a partition it is not primary of takes nothing from
/// the others, and the record is the one a `GrantLease` leaves.
#[test]
fn node_lease_renewal_grants_and_refuses_each_partition_as_grant_lease() {
    let mut state = unit();
    let first = p(1, 0);
    let (holder, _, _) = roles(&state, first);
    let ids: Vec<PartitionId> = (0..8)
        .map(|i| p(1, i))
        .filter(|&id| state.partition(id).is_some())
        .collect();
    let mine: Vec<PartitionId> = ids
        .iter()
        .copied()
        .filter(|&id| roles(&state, id).0 == holder)
        .collect();
    let other = ids
        .iter()
        .copied()
        .find(|&id| roles(&state, id).0 != holder)
        .expect("a partition another node is primary of");
    let renew = |partitions: Vec<(PartitionId, Epoch)>, now_ms| Command::GrantLeases {
        holder: holder.clone(),
        now_ms,
        duration_ms: 1_000,
        partitions,
    };
    let mut listed: Vec<(PartitionId, Epoch)> = mine.iter().map(|&id| (id, 1)).collect();
    listed.push((other, 1));
    listed.push((first, 2));
    let mut expected_state = state.clone();
    let Outcome::LeasesGranted { holder: h, leases } = ok(&mut state, renew(listed.clone(), 100))
    else {
        panic!("not LeasesGranted");
    };
    assert_eq!(h, holder);
    assert_eq!(leases.len(), listed.len());
    for ((id, epoch), (answered, result)) in listed.iter().zip(&leases) {
        assert_eq!(id, answered);
        let alone = expected_state.apply(grant_lease(*id, holder.clone(), *epoch, 100, 1_000));
        match (result, alone) {
            (Ok(expires), Ok(Outcome::LeaseGranted { expires_at_ms, .. })) => {
                assert_eq!(*expires, expires_at_ms);
                assert_eq!(*expires, 1_100);
            }
            (Err(batched), Err(own)) => assert_eq!(*batched, own),
            (batched, own) => panic!("{id}: renewal {batched:?}, own GrantLease {own:?}"),
        }
    }
    assert!(leases[..mine.len()].iter().all(|(_, r)| r.is_ok()));
    assert!(matches!(
        leases[mine.len()].1,
        Err(CommandError::NotPrimary { .. })
    ));
    assert!(matches!(
        leases[mine.len() + 1].1,
        Err(CommandError::StaleEpoch { .. })
    ));
    // The same records as the GrantLeases one at a time.
    for &id in &ids {
        assert_eq!(
            state.partition(id).unwrap().lease,
            expected_state.partition(id).unwrap().lease
        );
    }
    // A renewal from a clock that is behind never shortens a lease.
    let Outcome::LeasesGranted { leases, .. } = ok(&mut state, renew(vec![(first, 1)], 50)) else {
        panic!("not LeasesGranted");
    };
    assert_eq!(leases, vec![(first, Ok(1_100))]);
    // A node that is not Up renews nothing.
    ok(&mut state, set_node_health(holder.clone(), Health::Down));
    let Outcome::LeasesGranted { leases, .. } = ok(&mut state, renew(vec![(first, 1)], 200)) else {
        panic!("not LeasesGranted");
    };
    assert!(matches!(leases[0].1, Err(CommandError::NodeNotUp { .. })));
    assert_eq!(
        state
            .partition(first)
            .unwrap()
            .lease
            .as_ref()
            .unwrap()
            .expires_at_ms,
        1_100
    );
}

#[test]
fn lease_of_another_holder_blocks_a_grant_until_it_expires() {
    // Not reachable through commands (a change of primary drops the lease);
    // the grant path checks it anyway.
    let mut state = unit();
    let id = p(1, 2);
    let (primary, secondary, _) = roles(&state, id);
    state.volumes.get_mut(&1).unwrap().partitions[2].lease = Some(Lease {
        holder: secondary.clone(),
        expires_at_ms: 500,
    });
    // That state breaks invariant 5, so the commands go around `apply`'s
    // debug check of every invariant; the grant below restores it.
    let grant = |now_ms| grant_lease(id, primary.clone(), 1, now_ms, 1_000);
    assert_eq!(
        state.apply_unchecked(grant(100)).unwrap_err(),
        CommandError::LeaseHeld {
            partition: id,
            holder: secondary,
            until_ms: 500
        }
    );
    assert!(matches!(
        state.apply_unchecked(grant(500)),
        Ok(Outcome::LeaseGranted {
            expires_at_ms: 1_500,
            ..
        })
    ));
    state.check_invariants().unwrap();
}

// ---- read models --------------------------------------------------------------

#[test]
fn partition_map_has_both_addresses_and_epochs() {
    let state = unit();
    let map = state.partition_map(1).unwrap();
    assert_eq!(map.partitions.len(), 4);
    assert_eq!(map.partition_size_bytes, 1 << 30);
    for (i, entry) in map.partitions.iter().enumerate() {
        assert_eq!(entry.index as usize, i);
        assert_eq!(entry.epoch, 1);
        assert!(entry.primary.address_a.starts_with("10.0.0."));
        assert!(entry.primary.address_b.starts_with("10.1.0."));
        assert_ne!(entry.primary.id, entry.secondary.id);
        assert!(!entry.secondary.address_a.is_empty());
    }
    assert_eq!(
        state.partition_map(5),
        Err(CommandError::UnknownVolume { volume: 5 })
    );
}

#[test]
fn unit_status_counts_capacity() {
    let mut state = unit();
    allocate(&mut state, p(1, 0));
    ok(&mut state, set_sled_health(sled(0), Health::Down));
    let status = state.unit_status();
    assert_eq!((status.nodes.len(), status.sleds.len()), (3, 6));
    assert_eq!(
        (status.volumes, status.partitions, status.extents),
        (1, 4, 1)
    );
    assert_eq!(status.capacity.used_columns, 6);
    assert_eq!(status.capacity.free_columns, 6 * 16 - 6);
    assert_eq!(status.capacity.allocatable_columns, 5 * 16 - 5);
    assert_eq!(status.capacity.used_bytes, 6 * COLUMN);
    assert_eq!(status.nodes.iter().map(|n| n.primaries).sum::<usize>(), 4);
}

// ---- invariant checker ----------------------------------------------------------

#[test]
fn invariant_checker_catches_corruption() {
    let base = {
        let mut state = unit();
        ok(&mut state, refill_sandbox(p(1, 0), 2));
        state
    };
    let first = *base.extents().keys().next().unwrap();
    type Corruption = fn(&mut UnitState, ExtentId);
    let corruptions: [(&str, Corruption); 7] = [
        ("primary equals secondary", |s, _| {
            let part = &mut s.volumes.get_mut(&1).unwrap().partitions[0];
            part.secondary = part.primary.clone();
        }),
        ("two columns on one sled", |s, e| {
            let extent = s.extents.get_mut(&e).unwrap();
            let sled = extent.columns[0].as_ref().unwrap().sled.clone();
            extent.columns[1].as_mut().unwrap().sled = sled;
        }),
        ("column both free and used", |s, e| {
            let c = s.extents[&e].columns[0].clone().unwrap();
            s.sleds
                .get_mut(&c.sled)
                .unwrap()
                .devices
                .get_mut(&c.device)
                .unwrap()
                .free_columns
                .insert(c.index);
        }),
        ("column in two extents", |s, e| {
            let mut twin = s.extents[&e].clone();
            twin.id = ExtentId(s.next_extent_id);
            s.next_extent_id += 1;
            s.extents.insert(twin.id, twin);
        }),
        ("sandbox extent of another partition", |s, e| {
            s.extents.get_mut(&e).unwrap().owner = p(1, 1);
        }),
        ("lease held by a non-primary", |s, _| {
            let part = &mut s.volumes.get_mut(&1).unwrap().partitions[0];
            part.lease = Some(Lease {
                holder: part.secondary.clone(),
                expires_at_ms: 1,
            });
        }),
        ("extent id not below counter", |s, _| {
            s.next_extent_id = 0;
        }),
    ];
    base.check_invariants().unwrap();
    for (name, corrupt) in corruptions {
        let mut state = base.clone();
        corrupt(&mut state, first);
        assert!(state.check_invariants().is_err(), "checker missed: {name}");
    }
}

#[test]
fn error_codes_and_retryability() {
    let held = CommandError::LeaseHeld {
        partition: p(1, 0),
        holder: node(0),
        until_ms: 5,
    };
    assert!(held.is_retryable());
    assert_eq!(held.code(), "lease_held");
    let stale = CommandError::StaleEpoch {
        partition: p(1, 0),
        current: 2,
        presented: 1,
    };
    assert!(!stale.is_retryable());
    assert_eq!(
        stale.to_string(),
        "partition 1/0: epoch 1 presented, current is 2"
    );
}

#[test]
fn proto_conversions() {
    let id = p(3, 7);
    // The serde form the replicated state has always had.
    assert_eq!(
        serde_json::to_string(&id).unwrap(),
        r#"{"volume":3,"index":7}"#
    );
    assert_eq!(
        serde_json::from_str::<PartitionId>(r#"{"volume":3,"index":7}"#).unwrap(),
        id
    );
    let column = ColumnRef {
        sled: sled(1),
        device: 2,
        index: 9,
    };
    assert_eq!(
        column.column_id(),
        proto::sled::ColumnId {
            device: 2,
            index: 9
        }
    );
}
