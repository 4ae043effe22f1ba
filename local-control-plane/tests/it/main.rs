//! Integration tests of the local control plane, one binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod properties;
mod raft_store;
mod sim;
mod snapshot;
