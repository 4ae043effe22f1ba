//! The fault-injecting device: each fault, then heal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hardware::{BlockDevice, DeviceError, FaultOps, FaultyDevice, MemoryDevice, BLOCK_SIZE};

use crate::conformance::pattern;

const B: u64 = BLOCK_SIZE as u64;

fn device() -> (Arc<MemoryDevice>, FaultyDevice) {
    let inner = Arc::new(MemoryDevice::new(1 << 20));
    let faulty = FaultyDevice::new(inner.clone());
    (inner, faulty)
}

#[tokio::test]
async fn eio_range_hits_only_overlapping_ops() {
    let (_inner, device) = device();
    let control = device.control();
    device.write_at(0, pattern(1, 8)).await.unwrap();
    control.fail_range(2 * B, B, FaultOps::Reads);
    let error = device.read_at(0, 4 * BLOCK_SIZE).await.unwrap_err();
    assert!(error.is_device_failure());
    match error {
        DeviceError::Io {
            offset,
            len,
            source,
            ..
        } => {
            assert_eq!((offset, len), (0, 4 * B));
            assert_eq!(source.raw_os_error(), Some(libc::EIO));
        }
        other => panic!("expected Io, got {other:?}"),
    }
    // Non-overlapping reads and writes into the range still work.
    device.read_at(3 * B, BLOCK_SIZE).await.unwrap();
    device.read_at(0, 2 * BLOCK_SIZE).await.unwrap();
    device.write_at(2 * B, pattern(2, 1)).await.unwrap();

    control.fail_range(6 * B, B, FaultOps::Writes);
    assert!(device.write_at(6 * B, pattern(3, 1)).await.is_err());
    assert!(device.discard(5 * B, 2 * B).await.is_err());
    device.read_at(6 * B, BLOCK_SIZE).await.unwrap();

    control.heal();
    assert_eq!(
        device.read_at(2 * B, BLOCK_SIZE).await.unwrap(),
        pattern(2, 1)
    );
    device.write_at(6 * B, pattern(3, 1)).await.unwrap();
}

#[tokio::test]
async fn bit_flip_is_visible_on_read_only() {
    let (inner, device) = device();
    let control = device.control();
    device.write_at(B, pattern(4, 2)).await.unwrap();
    control.flip_bit(B + 100, 3);
    let read = device.read_at(0, 4 * BLOCK_SIZE).await.unwrap();
    let expected = pattern(4, 2);
    assert_eq!(read[BLOCK_SIZE + 100], expected[100] ^ 0b1000);
    let differing = read[BLOCK_SIZE..3 * BLOCK_SIZE]
        .iter()
        .zip(expected.iter())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differing, 1);
    // The medium itself is intact; reads elsewhere are clean.
    assert_eq!(inner.read_at(B, 2 * BLOCK_SIZE).await.unwrap(), expected);
    assert_eq!(
        device.read_at(2 * B, BLOCK_SIZE).await.unwrap()[..],
        expected[BLOCK_SIZE..]
    );
    control.heal();
    assert_eq!(device.read_at(B, 2 * BLOCK_SIZE).await.unwrap(), expected);
}

#[tokio::test]
async fn torn_write_keeps_only_first_blocks() {
    let (_inner, device) = device();
    let control = device.control();
    control.tear_next_write(3);
    let error = device.write_at(8 * B, pattern(5, 8)).await.unwrap_err();
    assert!(
        matches!(error, DeviceError::Io { offset, len, .. } if offset == 8 * B && len == 8 * B)
    );
    let read = device.read_at(8 * B, 8 * BLOCK_SIZE).await.unwrap();
    assert!(read[..3 * BLOCK_SIZE] == pattern(5, 8)[..3 * BLOCK_SIZE]);
    assert!(read[3 * BLOCK_SIZE..].iter().all(|b| *b == 0));
    // One-shot: the next write is whole.
    device.write_at(8 * B, pattern(6, 8)).await.unwrap();
    assert_eq!(
        device.read_at(8 * B, 8 * BLOCK_SIZE).await.unwrap(),
        pattern(6, 8)
    );
    // Tearing at 0 blocks writes nothing.
    control.tear_next_write(0);
    assert!(device.write_at(0, pattern(7, 2)).await.is_err());
    assert!(device
        .read_at(0, 2 * BLOCK_SIZE)
        .await
        .unwrap()
        .iter()
        .all(|b| *b == 0));
}

#[tokio::test]
async fn whole_device_failure_and_heal() {
    let (_inner, device) = device();
    let control = device.control();
    device.write_at(0, pattern(8, 1)).await.unwrap();
    control.fail_device();
    assert!(control.is_failed());
    for error in [
        device.read_at(0, BLOCK_SIZE).await.unwrap_err(),
        device.write_at(0, pattern(9, 1)).await.unwrap_err(),
        device.flush().await.unwrap_err(),
        device.discard(0, B).await.unwrap_err(),
    ] {
        assert!(matches!(error, DeviceError::Failed { .. }), "{error:?}");
        assert!(error.is_device_failure());
    }
    // Argument errors are still reported as such.
    assert!(matches!(
        device.read_at(1, BLOCK_SIZE).await,
        Err(DeviceError::Unaligned { .. })
    ));
    control.heal();
    assert!(!control.is_failed());
    assert_eq!(device.read_at(0, BLOCK_SIZE).await.unwrap(), pattern(8, 1));
}

#[tokio::test]
async fn latency_delays_every_op() {
    let (_inner, device) = device();
    let control = device.control();
    control.set_latency(Duration::from_millis(30));
    let started = Instant::now();
    device.write_at(0, pattern(1, 1)).await.unwrap();
    device.read_at(0, BLOCK_SIZE).await.unwrap();
    device.flush().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(90));
    control.heal();
    let started = Instant::now();
    device.read_at(0, BLOCK_SIZE).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(30));
}

#[tokio::test]
async fn control_is_shared_between_clones() {
    let (_inner, device) = device();
    let control = device.control().clone();
    let device = Arc::new(device);
    control.fail_range(0, B, FaultOps::ReadsAndWrites);
    assert!(device.read_at(0, BLOCK_SIZE).await.is_err());
    assert!(device.write_at(0, pattern(1, 1)).await.is_err());
    device.control().heal();
    assert!(device.read_at(0, BLOCK_SIZE).await.is_ok());
}
