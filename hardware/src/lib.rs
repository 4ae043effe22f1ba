//! Hardware layer: what a rack is made of, and how bytes reach a device.
//!
//! * [`rack`] — the rack description (TOML): the unit, its head nodes and sled
//!   controllers (one address on network A and one on network B each), every
//!   sled's devices, and validation with typed errors.
//! * [`device`] — the [`BlockDevice`] seam: positional, aligned, owned-buffer
//!   I/O with four implementations: io_uring (production), pread/pwrite
//!   (portable fallback), in-memory and fault-injecting (tests).
//!
//! This crate depends on no other project crate.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod device;
pub mod rack;

pub use device::{
    check_range, open_device, AlignedBuf, BlockDevice, DeviceError, DeviceInfo, EngineChoice,
    EngineKind, FaultControl, FaultOps, FaultyDevice, FileFault, IoFuture, MemoryDevice,
    OpenOptions, SharedDevice, TimedDevice, DEFAULT_DEVICE_TIMEOUT, ENGINE_ENV_VAR, IO_ALIGN_BYTES,
};
