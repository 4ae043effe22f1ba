//! Sled controller: owns the columns of one sled's devices.
//!
//! * [`layout`] — pure on-device layout: superblock, ping-pong column slots,
//!   CRC blocks, geometry (sans-IO, property-tested).
//! * [`store`] — one per device: recovery, allocate/claim/append/read/free
//!   with epoch fencing, per-block CRCs and group flush.
//! * [`scrub`] — rate-limited background verification of written blocks.
//! * [`service`] — [`service::Sled`]: the device stores behind the wire
//!   protocol's handler.
//! * [`metrics`] — Prometheus metrics.
//! * [`config`], [`daemon`], [`admin`] — the `rackblock sled-controller` process.

pub mod admin;
pub mod config;
pub mod daemon;
pub mod layout;
pub mod metrics;
pub mod scrub;
pub mod service;
pub mod store;

mod group_flush;

pub use config::{ConfigError, SledControllerConfig};
pub use daemon::{run, SledControllerError};
pub use service::Sled;
