//! The fault-injecting device: each fault, then heal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hardware::{BlockDevice, DeviceError, FaultOps, FaultyDevice, MemoryDevice, IO_ALIGN_BYTES};

use crate::conformance::pattern;

const B: u64 = IO_ALIGN_BYTES as u64;

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
    let error = device.read_at(0, 4 * IO_ALIGN_BYTES).await.unwrap_err();
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
    device.read_at(3 * B, IO_ALIGN_BYTES).await.unwrap();
    device.read_at(0, 2 * IO_ALIGN_BYTES).await.unwrap();
    device.write_at(2 * B, pattern(2, 1)).await.unwrap();

    control.fail_range(6 * B, B, FaultOps::Writes);
    assert!(device.write_at(6 * B, pattern(3, 1)).await.is_err());
    assert!(device.discard(5 * B, 2 * B).await.is_err());
    device.read_at(6 * B, IO_ALIGN_BYTES).await.unwrap();

    control.heal();
    assert_eq!(
        device.read_at(2 * B, IO_ALIGN_BYTES).await.unwrap(),
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
    let read = device.read_at(0, 4 * IO_ALIGN_BYTES).await.unwrap();
    let expected = pattern(4, 2);
    assert_eq!(read[IO_ALIGN_BYTES + 100], expected[100] ^ 0b1000);
    let differing = read[IO_ALIGN_BYTES..3 * IO_ALIGN_BYTES]
        .iter()
        .zip(expected.iter())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differing, 1);
    // The medium itself is intact; reads elsewhere are clean.
    assert_eq!(
        inner.read_at(B, 2 * IO_ALIGN_BYTES).await.unwrap(),
        expected
    );
    assert_eq!(
        device.read_at(2 * B, IO_ALIGN_BYTES).await.unwrap()[..],
        expected[IO_ALIGN_BYTES..]
    );
    control.heal();
    assert_eq!(
        device.read_at(B, 2 * IO_ALIGN_BYTES).await.unwrap(),
        expected
    );
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
    let read = device.read_at(8 * B, 8 * IO_ALIGN_BYTES).await.unwrap();
    assert!(read[..3 * IO_ALIGN_BYTES] == pattern(5, 8)[..3 * IO_ALIGN_BYTES]);
    assert!(read[3 * IO_ALIGN_BYTES..].iter().all(|b| *b == 0));
    // One-shot: the next write is whole.
    device.write_at(8 * B, pattern(6, 8)).await.unwrap();
    assert_eq!(
        device.read_at(8 * B, 8 * IO_ALIGN_BYTES).await.unwrap(),
        pattern(6, 8)
    );
    // Tearing at 0 blocks writes nothing.
    control.tear_next_write(0);
    assert!(device.write_at(0, pattern(7, 2)).await.is_err());
    assert!(device
        .read_at(0, 2 * IO_ALIGN_BYTES)
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
        device.read_at(0, IO_ALIGN_BYTES).await.unwrap_err(),
        device.write_at(0, pattern(9, 1)).await.unwrap_err(),
        device.flush().await.unwrap_err(),
        device.discard(0, B).await.unwrap_err(),
    ] {
        assert!(matches!(error, DeviceError::Failed { .. }), "{error:?}");
        assert!(error.is_device_failure());
    }
    // Argument errors are still reported as such.
    assert!(matches!(
        device.read_at(1, IO_ALIGN_BYTES).await,
        Err(DeviceError::Unaligned { .. })
    ));
    control.heal();
    assert!(!control.is_failed());
    assert_eq!(
        device.read_at(0, IO_ALIGN_BYTES).await.unwrap(),
        pattern(8, 1)
    );
}

#[tokio::test]
async fn latency_delays_every_op() {
    let (_inner, device) = device();
    let control = device.control();
    control.set_latency(Duration::from_millis(30));
    let started = Instant::now();
    device.write_at(0, pattern(1, 1)).await.unwrap();
    device.read_at(0, IO_ALIGN_BYTES).await.unwrap();
    device.flush().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(90));
    // Heal clears the latency: with an hour armed, a read that still
    // waited for it could not finish within the (generous) 10 s.
    control.set_latency(Duration::from_secs(3600));
    control.heal();
    let read = tokio::time::timeout(Duration::from_secs(10), device.read_at(0, IO_ALIGN_BYTES))
        .await
        .expect("a read after heal still waits for the latency");
    assert_eq!(read.unwrap(), pattern(1, 1));
}

#[tokio::test]
async fn control_is_shared_between_clones() {
    let (_inner, device) = device();
    let control = device.control().clone();
    let device = Arc::new(device);
    control.fail_range(0, B, FaultOps::ReadsAndWrites);
    assert!(device.read_at(0, IO_ALIGN_BYTES).await.is_err());
    assert!(device.write_at(0, pattern(1, 1)).await.is_err());
    device.control().heal();
    assert!(device.read_at(0, IO_ALIGN_BYTES).await.is_ok());
}

mod model {
    //! Model test with injected I/O errors: random writes, reads, discards,
    //! EIO ranges, torn writes and heals against a `Vec<u8>` model that also
    //! predicts which operations fail and what a torn write leaves behind.

    use super::*;
    use proptest::prelude::*;

    const BLOCKS: u64 = 32;

    #[derive(Debug, Clone)]
    enum Op {
        Write {
            block: u64,
            blocks: u64,
            tag: u64,
        },
        Read {
            block: u64,
            blocks: u64,
        },
        Discard {
            block: u64,
            blocks: u64,
        },
        FailRange {
            block: u64,
            blocks: u64,
            ops: FaultOps,
        },
        Tear {
            blocks: u64,
        },
        Heal,
    }

    fn extent() -> impl Strategy<Value = (u64, u64)> {
        (0..BLOCKS).prop_flat_map(|block| (Just(block), 1..=(BLOCKS - block).min(4)))
    }

    fn op() -> impl Strategy<Value = Op> {
        let ops = prop_oneof![
            Just(FaultOps::Reads),
            Just(FaultOps::Writes),
            Just(FaultOps::ReadsAndWrites)
        ];
        prop_oneof![
            5 => (extent(), any::<u64>()).prop_map(|((block, blocks), tag)| Op::Write { block, blocks, tag }),
            4 => extent().prop_map(|(block, blocks)| Op::Read { block, blocks }),
            1 => extent().prop_map(|(block, blocks)| Op::Discard { block, blocks }),
            1 => (extent(), ops).prop_map(|((block, blocks), ops)| Op::FailRange { block, blocks, ops }),
            1 => (0u64..4).prop_map(|blocks| Op::Tear { blocks }),
            1 => Just(Op::Heal),
        ]
    }

    #[derive(Default)]
    struct Faults {
        ranges: Vec<(u64, u64, FaultOps)>,
        torn: Option<u64>,
    }

    impl Faults {
        fn hits(&self, block: u64, blocks: u64, write: bool) -> bool {
            self.ranges.iter().any(|&(start, len, ops)| {
                let applies = match ops {
                    FaultOps::Reads => !write,
                    FaultOps::Writes => write,
                    FaultOps::ReadsAndWrites => true,
                };
                applies && start < block + blocks && block < start + len
            })
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn faulty_device_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let device = FaultyDevice::new(Arc::new(MemoryDevice::new(BLOCKS * B)));
                let control = device.control();
                let mut model = vec![0u8; (BLOCKS * B) as usize];
                let mut faults = Faults::default();
                for op in &ops {
                    match *op {
                        Op::Write { block, blocks, tag } => {
                            let buf = pattern(tag, blocks as usize);
                            let start = (block * B) as usize;
                            let result = device.write_at(block * B, buf.clone()).await;
                            if faults.hits(block, blocks, true) {
                                prop_assert!(result.is_err());
                            } else if let Some(kept) = faults.torn.take() {
                                prop_assert!(result.is_err());
                                let kept = (kept.min(blocks) * B) as usize;
                                model[start..start + kept].copy_from_slice(&buf[..kept]);
                            } else {
                                prop_assert!(result.is_ok());
                                model[start..start + buf.len()].copy_from_slice(&buf);
                            }
                        }
                        Op::Read { block, blocks } => {
                            let result = device.read_at(block * B, (blocks * B) as usize).await;
                            if faults.hits(block, blocks, false) {
                                prop_assert!(result.unwrap_err().is_device_failure());
                            } else {
                                let start = (block * B) as usize;
                                prop_assert!(result.unwrap()[..] == model[start..start + (blocks * B) as usize]);
                            }
                        }
                        Op::Discard { block, blocks } => {
                            let result = device.discard(block * B, blocks * B).await;
                            if faults.hits(block, blocks, true) {
                                prop_assert!(result.is_err());
                            } else {
                                prop_assert!(result.is_ok());
                                let start = (block * B) as usize;
                                model[start..start + (blocks * B) as usize].fill(0);
                            }
                        }
                        Op::FailRange { block, blocks, ops } => {
                            control.fail_range(block * B, blocks * B, ops);
                            faults.ranges.push((block, blocks, ops));
                        }
                        Op::Tear { blocks } => {
                            control.tear_next_write(blocks);
                            faults.torn = Some(blocks);
                        }
                        Op::Heal => {
                            control.heal();
                            faults = Faults::default();
                        }
                    }
                }
                control.heal();
                let all = device.read_at(0, (BLOCKS * B) as usize).await.unwrap();
                prop_assert!(all[..] == model[..]);
                Ok(())
            })?;
        }
    }
}

/// The control file of the end-to-end tests' fault devices
/// (`FaultControl::follow_file`): `eio` fails writes, anything else heals.
#[tokio::test]
async fn a_control_file_arms_and_heals_faults() {
    use hardware::FileFault;
    assert_eq!(FileFault::parse(" eio\n"), FileFault::Eio);
    assert_eq!(FileFault::parse("hang"), FileFault::Hang);
    assert_eq!(FileFault::parse(""), FileFault::Healthy);
    let (_inner, device) = device();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fault");
    device
        .control()
        .follow_file(file.clone(), device.info().size_bytes);
    // Waits (bounded) until a write succeeds or fails as `fail` says.
    let wait_for = |fail: bool| {
        let device = &device;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let failed = device.write_at(0, pattern(3, 1)).await.is_err();
                if failed == fail {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "write failed: {failed}, wanted {fail}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // A missing file is healthy.
    wait_for(false).await;
    std::fs::write(&file, "eio").unwrap();
    wait_for(true).await;
    // Reads still work: only writes fail.
    device.read_at(0, IO_ALIGN_BYTES).await.unwrap();
    std::fs::write(&file, "").unwrap();
    wait_for(false).await;
}
