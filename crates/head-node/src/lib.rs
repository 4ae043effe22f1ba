//! The head node: hosts a member of the unit's local control plane and
//! (with the data-path issues) the partitions it is primary or secondary
//! of.
//!
//! Daemon (control plane):
//!
//! * [`config`] — [`HeadNodeConfig`], the `--config` TOML.
//! * [`daemon`] — [`run`]: rack file → [`local_control_plane::LcpNode`] →
//!   protocol on networks A and B, admin HTTP.
//! * [`admin`] — `/metrics`, `/health`, `/status`,
//!   `/volumes/{id}/partition-map`.
//!
//! Data path (ARCHITECTURE.md §3–4): `wal`, `index`, `erasure`, and
//! [`partition`] — the partition engine (write path, replication, reads with
//! degraded decode, flush to sleds, GC, recovery).

pub mod admin;
pub mod config;
pub mod daemon;
pub mod erasure;
pub mod index;
pub mod partition;
pub mod wal;

pub use config::HeadNodeConfig;
pub use daemon::{run, HeadNodeError};
