//! The head node: hosts a member of the unit's local control plane and
//! the partitions it is primary or secondary of.
//!
//! Daemon (control plane):
//!
//! * [`config`] — [`HeadNodeConfig`], the `--config` TOML.
//! * [`daemon`] — [`run`]: rack file → [`local_control_plane::LcpNode`] →
//!   write log and partition manager → protocol on networks A and B, admin
//!   HTTP.
//! * [`admin`] — `/metrics`, `/health`, `/status`, `/partitions`,
//!   `POST /flush`, `/volumes/{id}/partition-map`.
//!
//! Data path (ARCHITECTURE.md, Write path and Read path): `wal`, `index`,
//! `erasure`, and [`partition`] — the partition engine (write path,
//! replication, reads with degraded decode, flush to sleds, GC, recovery).
//! The daemon wires it:
//!
//! * [`peers`] — the engine's seams for real: replication over a
//!   `PeerLink` to the secondary, sled requests over one `PeerLink` per
//!   sled, extents (sandbox, free) through the in-process control-plane
//!   member.
//! * [`manager`] — [`manager::PartitionManager`]: one WAL per head node,
//!   partitions opened and closed as the control plane assigns them,
//!   primary leases, background flush and GC, host and replication
//!   routing.

pub mod admin;
pub mod config;
pub mod daemon;
pub mod erasure;
pub mod index;
pub mod manager;
pub mod partition;
pub mod peers;
pub mod repair;
pub mod wal;

pub use config::HeadNodeConfig;
pub use daemon::{run, HeadNodeError};
