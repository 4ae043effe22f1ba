//! Integration tests of the head node (one binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

mod erasure;
mod index;
mod partition;
mod partition_core;
mod sim;
mod wal;

/// Polls `condition` every few milliseconds until it holds; fails the test
/// with `what` if it does not within `timeout` (a bound for a loaded box,
/// not a performance figure).
pub async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
