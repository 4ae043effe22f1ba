//! End-to-end tests: real `rackblock` processes on loopback networks A and B.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent;
mod cli;
mod cli_verbs;
mod clone;
mod dashboard;
mod datapath;
mod datapath_smoke;
mod degraded;
mod failover;
mod faults_nbd;
mod iscsi;
mod kernel_device;
mod lcp;
mod nbd_e2e;
mod network;
mod power_loss;
mod repair;
mod security;
mod sled;
mod sled_network;
mod snapshot;
mod snapshot_crash;
mod tls;
mod volume_delete;
