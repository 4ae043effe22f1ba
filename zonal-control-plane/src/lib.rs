//! Zonal control plane: the zone-wide HTTP/JSON API that creates volumes,
//! assigns each to a unit, hands hosts what they need to attach, and shows
//! the units' capacity and health. It partially controls storage and is
//! never on the I/O path: once attached, a host talks to the unit's head
//! nodes only, so stopping this service stops no I/O (ARCHITECTURE.md,
//! `zonal-control-plane/`).
//!
//! ```text
//!  operator / CLI ──HTTP (bearer token)──▶ api ──▶ service::Zonal ──▶ store (redb)
//!                                                      │
//!                          LcpClient (networks A, B)   ▼
//!                 ┌──────────── RegisterVolume, PartitionMap, UnitStatus ───▶ unit LCP leader
//!                 └── report loop: UnitStatus every report_interval_ms
//! ```
//!
//! * [`model`]: records, spec validation and placement, pure.
//! * [`store`]: the redb store, one durable write transaction per mutation.
//! * [`service`]: the operations (create with placement, describe,
//!   resize, delete, attach, detach, unit reports).
//! * [`api`]: routes, auth, body parsing; [`error`]: typed errors and their
//!   one mapping to HTTP status.
//! * [`config`] and [`daemon`]: `rackblock zonal --config FILE`.
//!
//! Invariants: a volume id is allocated once and never reused; a name is
//! held by at most one live volume; a volume is `available` only after its
//! unit's LCP applied `RegisterVolume` for that id; a create whose outcome
//! at the unit is unknown stays `creating` on that unit until a repeat of
//! the same create settles it.

pub mod api;
pub mod config;
pub mod daemon;
pub mod error;
pub mod metrics;
pub mod model;
pub mod service;
pub mod store;

pub use config::{ConfigError, UnitConfig, ZonalConfig};
pub use daemon::{run, serve};
pub use error::{ApiError, ZonalError};
pub use service::Zonal;
