//! Integration tests of the sled controller (one binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod daemon;
mod engines;
mod faults;
mod model;
mod store;
