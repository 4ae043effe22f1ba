//! Integration tests of the head node (one binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod erasure;
mod index;
mod partition;
mod wal;
