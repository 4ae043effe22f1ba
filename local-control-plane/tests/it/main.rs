//! Integration tests of the local control plane, one binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod properties;
mod raft_store;
mod sim;
mod snapshot;

/// Head node `n` of the test units: `head-n` at 10.0.0.n, 10.1.0.n (port
/// 7000) and admin 10.2.0.n:8080.
fn node_info(n: u64) -> local_control_plane::raft::HeadNodeInfo {
    local_control_plane::raft::HeadNodeInfo {
        id: format!("head-{n}"),
        address_a: format!("10.0.0.{n}:7000").parse().unwrap(),
        address_b: format!("10.1.0.{n}:7000").parse().unwrap(),
        admin: format!("10.2.0.{n}:8080").parse().unwrap(),
    }
}
