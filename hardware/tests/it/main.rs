//! Integration tests of the `hardware` crate, in one binary.
//!
//! * `conformance` — the device contract, written once and run over every
//!   engine (`engines`).
//! * `fault` — the fault-injecting device.
//! * `loopdev` — the conformance suite on real block devices (loop devices).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod conformance;
mod engines;
mod fault;
mod loopdev;
mod open;
