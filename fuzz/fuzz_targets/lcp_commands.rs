//! The local control plane's state machine, driven by programs (the
//! requests' wire decoder has its own, much faster target: `lcp_requests`).
//!
//! The input is a program: each 8-byte instruction picks a command and
//! its operands from small domains (3 head nodes, 7 sleds, 2 volumes, the
//! extents and epochs the state holds), so that sequences reach deep states
//! (failovers, repairs, deletions) rather than stopping at the first
//! refusal. Every command is applied to one unit state; the state machine
//! checks its invariants after each apply (debug assertions are on in fuzz
//! builds), and a refused command must leave the state as it was.
#![no_main]

use libfuzzer_sys::fuzz_target;
use local_control_plane::command::{Command, DeviceSpec, Endpoint, Network};
use local_control_plane::state::{
    ColumnRef, DeviceRef, ExtentId, Health, NodeId, PartitionId, RepairReason, SledId, UnitState,
};

const NODES: u8 = 3;
const SLEDS: u8 = 7;

fn node(n: u8) -> NodeId {
    NodeId::new(format!("hn-{}", n % NODES + 1))
}

fn sled(n: u8) -> SledId {
    SledId::new(format!("sled-{}", n % SLEDS + 1))
}

fn health(n: u8) -> Health {
    match n % 4 {
        0 => Health::Up,
        1 => Health::Down,
        2 => Health::Draining,
        _ => Health::Failed,
    }
}

fn unit() -> UnitState {
    let mut state = UnitState::new();
    for n in 0..NODES {
        let _ = state.apply(Command::RegisterHeadNode {
            node: node(n),
            address_a: format!("127.0.1.{n}:7000"),
            address_b: format!("127.0.2.{n}:7000"),
        });
    }
    for s in 0..SLEDS {
        let _ = state.apply(Command::RegisterSled {
            sled: sled(s),
            address_a: format!("127.0.1.{}:7100", 100 + s),
            address_b: format!("127.0.2.{}:7100", 100 + s),
            fault_domain: format!("fd-{}", s % 4),
            power_domain: format!("pd-{}", s % 2),
            column_size_bytes: 1 << 20,
            devices: vec![DeviceSpec {
                device: 0,
                size_bytes: 8 << 20,
            }],
        });
        let _ = state.apply(Command::AddFreeColumns {
            sled: sled(s),
            device: 0,
            columns: (0..8).collect(),
        });
    }
    state
}

/// One instruction: 8 bytes (opcode and operands).
fn command(state: &UnitState, op: [u8; 8], now_ms: u64) -> Command {
    let [code, a, b, c, d, e, f, g] = op;
    let volume = u64::from(a % 2 + 1);
    let partition = PartitionId {
        volume,
        index: u32::from(b % 3),
    };
    let epoch = u64::from(c % 4);
    let extents: Vec<_> = state.extents().keys().copied().collect();
    let extent = extents
        .get(usize::from(d) % extents.len().max(1))
        .copied()
        .unwrap_or(ExtentId(u64::from(d)));
    let column = ColumnRef {
        sled: sled(e),
        device: 0,
        index: u32::from(f % 8),
    };
    match code % 20 {
        0 => Command::RegisterVolume {
            volume,
            name: format!("v{}", a % 3),
            size_bytes: u64::from(b % 4) << 20,
            partition_size_bytes: 1 << 20,
            k: c % 5,
            m: d % 3,
        },
        1 => Command::AllocateExtent { partition },
        2 => Command::FreeExtent {
            extent,
            partition,
            epoch,
        },
        3 => Command::ChangePrimary {
            partition,
            new_primary: node(d),
            new_secondary: (e % 2 == 0).then(|| node(f)),
            expected_epoch: epoch,
            now_ms,
        },
        4 => Command::ChangeSecondary {
            partition,
            new_secondary: node(d),
        },
        5 => Command::GrantLease {
            partition,
            holder: node(d),
            epoch,
            now_ms,
            duration_ms: u64::from(e) * 10,
        },
        6 => Command::SetNodeHealth {
            node: node(d),
            health: health(e),
        },
        7 => Command::SetSledHealth {
            sled: sled(d),
            health: health(e),
        },
        8 => Command::SetDeviceHealth {
            device: DeviceRef {
                sled: sled(d),
                device: u16::from(e % 2),
            },
            health: health(f),
        },
        9 => {
            let new = state
                .plan_replacement(extent, u16::from(e % 6))
                .unwrap_or(column);
            Command::ReplaceColumn {
                extent,
                column_index: u16::from(e % 6),
                new,
                expected_epoch: (f % 2 == 0).then_some(epoch),
                reason: RepairReason::SledFailed,
                rate_bytes_per_second: 1 << 20,
                now_ms,
            }
        }
        10 => {
            let task = state.repairs().tasks.get(usize::from(d) % 4).cloned();
            match task {
                Some(t) => Command::CompleteRepair {
                    extent: t.extent,
                    column_index: t.column_index,
                    new: t.new,
                    epoch,
                },
                None => Command::CancelRepair {
                    extent,
                    column_index: u16::from(e % 6),
                },
            }
        }
        11 => Command::ReportPathFault {
            endpoint: if d % 2 == 0 {
                Endpoint::Node(node(e))
            } else {
                Endpoint::Sled(sled(e))
            },
            network: if f % 2 == 0 { Network::A } else { Network::B },
            up: g % 2 == 0,
        },
        12 => Command::ReclaimColumns {
            columns: vec![column],
        },
        13 => Command::ResizeVolume {
            volume,
            size_bytes: u64::from(b % 6) << 20,
        },
        14 => Command::DeleteVolume {
            volume,
            force: c % 2 == 0,
            now_ms,
        },
        15 => Command::ReleaseDeletedExtent { extent },
        16 => Command::PurgeVolume { volume },
        // Limits over a small domain: zeros, bursts below their limit and
        // lone burst lengths are refused and must change nothing.
        17 => Command::SetVolumeQos {
            volume,
            qos: (c % 4 != 0).then(|| proto::qos::VolumeQos {
                iops: (d % 3 != 0).then_some(u64::from(d % 5) * 100),
                bandwidth_bytes_per_second: (e % 3 != 0).then_some(u64::from(e % 5) << 20),
                burst_iops: (f % 2 == 0).then_some(u64::from(f % 7) * 100),
                burst_bandwidth_bytes_per_second: None,
                burst_length_ms: (c % 3 == 0).then_some(u64::from(b % 3) * 500),
            }),
        },
        // The primary's report that its secondary caught up: half the time
        // with the partition's real roles and epoch (so it applies and
        // clears `secondary_catching_up`), else with the operands' small
        // domains (a stale epoch, a node that is not primary or secondary).
        18 => match state.partition(partition).filter(|_| g % 2 == 0) {
            Some(p) => Command::SecondaryInSync {
                partition,
                primary: p.primary.clone(),
                secondary: p.secondary.clone(),
                epoch: p.epoch,
            },
            None => Command::SecondaryInSync {
                partition,
                primary: node(d),
                secondary: node(e),
                epoch,
            },
        },
        _ => Command::RefillSandbox {
            partition,
            target: u32::from(d % 4),
            min_columns: (e % 2 == 0).then_some(u16::from(f % 7)),
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let mut state = unit();
    for (step, op) in data.chunks_exact(8).take(256).enumerate() {
        let op: [u8; 8] = op.try_into().unwrap();
        let command = command(&state, op, 1_000 * step as u64);
        let before = state.clone();
        if state.apply(command).is_err() {
            assert!(state == before, "a refused command changed the state");
        }
    }
});
