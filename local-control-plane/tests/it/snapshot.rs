//! Snapshot round trip of a state that uses every feature.

use local_control_plane::{
    Command, DeviceRef, DeviceSpec, Endpoint, Health, Network, NodeId, Outcome, PartitionId,
    SledId, UnitState,
};

fn populated() -> UnitState {
    let mut state = UnitState::new();
    let mut apply = |command: Command| state.apply(command).unwrap();
    for n in 0..3 {
        apply(Command::RegisterHeadNode {
            node: NodeId(format!("head-{n}")),
            address_a: format!("10.0.0.{n}:7000"),
            address_b: format!("10.1.0.{n}:7000"),
        });
    }
    for n in 0..6 {
        apply(Command::RegisterSled {
            sled: SledId(format!("sled-{n}")),
            address_a: format!("10.0.1.{n}:7100"),
            address_b: format!("10.1.1.{n}:7100"),
            fault_domain: format!("fd-{}", n % 3),
            power_domain: format!("pd-{}", n % 2),
            column_size_bytes: 64 << 20,
            devices: vec![
                DeviceSpec {
                    device: 0,
                    size_bytes: 1 << 30,
                },
                DeviceSpec {
                    device: 1,
                    size_bytes: 1 << 30,
                },
            ],
        });
        for device in 0..2 {
            apply(Command::AddFreeColumns {
                sled: SledId(format!("sled-{n}")),
                device,
                columns: (0..16).collect(),
            });
        }
    }
    let Outcome::VolumeRegistered { placement, .. } = apply(Command::RegisterVolume {
        volume: 7,
        name: "db".into(),
        size_bytes: 4 << 30,
        partition_size_bytes: 1 << 30,
        k: 4,
        m: 2,
    }) else {
        panic!("volume not registered")
    };
    let partition = PartitionId {
        volume: 7,
        index: 1,
    };
    apply(Command::RefillSandbox {
        partition,
        target: 2,
        min_columns: None,
    });
    apply(Command::AllocateExtent { partition });
    apply(Command::GrantLease {
        partition,
        holder: placement[1].0.clone(),
        epoch: 1,
        now_ms: 10,
        duration_ms: 2_000,
    });
    apply(Command::ChangeSecondary {
        partition: PartitionId {
            volume: 7,
            index: 2,
        },
        new_secondary: (0..3)
            .map(|n| NodeId(format!("head-{n}")))
            .find(|n| *n != placement[2].0 && *n != placement[2].1)
            .unwrap(),
    });
    apply(Command::SetDeviceHealth {
        device: DeviceRef {
            sled: SledId("sled-3".into()),
            device: 1,
        },
        health: Health::Failed,
    });
    apply(Command::ReportPathFault {
        endpoint: Endpoint::Node(NodeId("head-1".into())),
        network: Network::B,
        up: false,
    });
    state
}

#[test]
fn snapshot_round_trips() {
    let state = populated();
    state.check_invariants().unwrap();
    let bytes = serde_json::to_vec(&state).unwrap();
    let restored: UnitState = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(restored, state);
    assert_eq!(serde_json::to_vec(&restored).unwrap(), bytes);
    assert_eq!(
        restored.partition_map(7).unwrap(),
        state.partition_map(7).unwrap()
    );
    assert_eq!(restored.unit_status(), state.unit_status());
}

#[test]
fn restored_state_keeps_deciding_like_the_original() {
    let mut original = populated();
    let mut restored: UnitState =
        serde_json::from_slice(&serde_json::to_vec(&original).unwrap()).unwrap();
    let next = Command::AllocateExtent {
        partition: PartitionId {
            volume: 7,
            index: 3,
        },
    };
    assert_eq!(original.apply(next.clone()), restored.apply(next));
    assert_eq!(original, restored);
}

#[test]
fn partition_map_read_model_serializes_for_clients() {
    let state = populated();
    let map = state.partition_map(7).unwrap();
    let json = serde_json::to_value(&map).unwrap();
    assert_eq!(json["volume"], 7);
    assert_eq!(json["partitions"].as_array().unwrap().len(), 4);
    assert_eq!(json["partitions"][1]["lease_expires_at_ms"], 2_010);
    assert_eq!(json["partitions"][2]["epoch"], 2);
    let primary = &json["partitions"][0]["primary"];
    assert!(primary["address_a"]
        .as_str()
        .unwrap()
        .starts_with("10.0.0."));
    assert!(primary["address_b"]
        .as_str()
        .unwrap()
        .starts_with("10.1.0."));
}
