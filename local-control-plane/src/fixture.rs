//! A small unit state built through commands, for tests (here, and in
//! head-node's tests through the `fixture` feature).

use crate::command::{Command, DeviceSpec};
use crate::state::{NodeId, SledId, UnitState};

/// Applies `command`; panics if the state machine refuses it.
#[track_caller]
pub fn apply(state: &mut UnitState, command: Command) {
    if let Err(error) = state.apply(command) {
        panic!("fixture command refused: {error}");
    }
}

/// Registers head nodes `hn-1..=hn-{nodes}` (127.0.1.n:7000 on network A,
/// 127.0.2.n:7000 on B) and sleds `sled-1..=sled-{sleds}`, each in its own
/// fault domain, all in one power domain, each with one 16 MiB device of
/// 1 MiB columns (no free columns yet). Returns the sleds.
pub fn register_nodes_and_sleds(state: &mut UnitState, nodes: u32, sleds: u32) -> Vec<SledId> {
    for n in 1..=nodes {
        apply(
            state,
            Command::RegisterHeadNode {
                node: NodeId::new(format!("hn-{n}")),
                address_a: format!("127.0.1.{n}:7000"),
                address_b: format!("127.0.2.{n}:7000"),
            },
        );
    }
    (1..=sleds)
        .map(|s| {
            let sled = SledId::new(format!("sled-{s}"));
            apply(
                state,
                Command::RegisterSled {
                    sled: sled.clone(),
                    address_a: format!("127.0.1.{}:7000", 100 + s),
                    address_b: format!("127.0.2.{}:7000", 100 + s),
                    fault_domain: format!("fd-{s}"),
                    power_domain: "p".into(),
                    column_size_bytes: 1 << 20,
                    devices: vec![DeviceSpec {
                        device: 0,
                        size_bytes: 16 << 20,
                    }],
                },
            );
            sled
        })
        .collect()
}
