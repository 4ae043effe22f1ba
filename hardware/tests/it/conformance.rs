//! The device conformance suite: every function takes a [`Factory`] and checks
//! one clause of the `BlockDevice` contract. `engines.rs` instantiates it for
//! each engine with the `conformance_suite!` macro.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use hardware::{AlignedBuf, BlockDevice, DeviceError, EngineKind, IO_ALIGN_BYTES};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

/// Device size used by the suite: 4 MiB = 1024 blocks.
pub const SIZE_BYTES: u64 = 4 << 20;
const BLOCKS: u64 = SIZE_BYTES / IO_ALIGN_BYTES as u64;

/// How to get a device of one engine.
pub struct Factory {
    /// Opens (creating if needed) a device of `size_bytes` whose backing
    /// storage, if any, lives in `dir`. Opening twice with the same `dir`
    /// opens the same storage. `None` = engine unavailable and allowed to be.
    pub make: fn(dir: &Path, size_bytes: u64) -> Option<Arc<dyn BlockDevice>>,
    /// Whether data survives dropping the device and opening it again.
    pub persistent: bool,
    /// The engine the device must report.
    pub kind: EngineKind,
}

impl Factory {
    pub fn open(&self, dir: &Path) -> Option<Arc<dyn BlockDevice>> {
        let device = (self.make)(dir, SIZE_BYTES)?;
        assert_eq!(device.info().engine, self.kind);
        assert_eq!(device.info().size_bytes, SIZE_BYTES);
        Some(device)
    }
}

/// A block-sized buffer whose every byte identifies (tag, block).
pub fn pattern(tag: u64, blocks: usize) -> AlignedBuf {
    let mut buf = AlignedBuf::zeroed(blocks * IO_ALIGN_BYTES).unwrap();
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = (tag.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8;
    }
    buf
}

pub async fn round_trip(factory: &Factory) {
    let dir = tempfile::tempdir().unwrap();
    let Some(device) = factory.open(dir.path()) else {
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut written = Vec::new();
    for tag in 0..32u64 {
        let blocks = rng.random_range(1..=8usize);
        let block = rng.random_range(0..=BLOCKS - blocks as u64);
        let offset = block * IO_ALIGN_BYTES as u64;
        let buf = pattern(tag, blocks);
        let returned = device.write_at(offset, buf.clone()).await.unwrap();
        assert_eq!(returned, buf, "write hands the buffer back");
        let read = device
            .read_at(offset, blocks * IO_ALIGN_BYTES)
            .await
            .unwrap();
        assert_eq!(read, buf, "read after write at offset {offset}");
        written.push((offset, buf));
    }
    // Whole device vs. replay of the writes in order.
    let mut model = vec![0u8; SIZE_BYTES as usize];
    for (offset, buf) in &written {
        model[*offset as usize..*offset as usize + buf.len()].copy_from_slice(buf);
    }
    let all = device.read_at(0, SIZE_BYTES as usize).await.unwrap();
    assert!(all[..] == model[..], "whole-device read matches the model");
}

pub async fn unaligned_refused(factory: &Factory) {
    let dir = tempfile::tempdir().unwrap();
    let Some(device) = factory.open(dir.path()) else {
        return;
    };
    for offset in [1u64, 512, 4095, 4097] {
        assert!(matches!(
            device.read_at(offset, IO_ALIGN_BYTES).await,
            Err(DeviceError::Unaligned { .. })
        ));
        assert!(matches!(
            device.write_at(offset, pattern(1, 1)).await,
            Err(DeviceError::Unaligned { .. })
        ));
        assert!(matches!(
            device.discard(offset, IO_ALIGN_BYTES as u64).await,
            Err(DeviceError::Unaligned { .. })
        ));
    }
    for len in [1usize, 512, 4095, 4097] {
        assert!(matches!(
            device.read_at(0, len).await,
            Err(DeviceError::Unaligned { .. })
        ));
        assert!(matches!(
            device.discard(0, len as u64).await,
            Err(DeviceError::Unaligned { .. })
        ));
    }
}

pub async fn out_of_range_refused(factory: &Factory) {
    let dir = tempfile::tempdir().unwrap();
    let Some(device) = factory.open(dir.path()) else {
        return;
    };
    let last = SIZE_BYTES - IO_ALIGN_BYTES as u64;
    device.write_at(last, pattern(1, 1)).await.unwrap();
    assert!(matches!(
        device.write_at(last, pattern(1, 2)).await,
        Err(DeviceError::OutOfRange {
            size_bytes: SIZE_BYTES,
            ..
        })
    ));
    assert!(matches!(
        device.read_at(SIZE_BYTES, IO_ALIGN_BYTES).await,
        Err(DeviceError::OutOfRange { .. })
    ));
    assert!(matches!(
        device.read_at(u64::MAX - 4095, IO_ALIGN_BYTES).await,
        Err(DeviceError::OutOfRange { .. })
    ));
    assert!(matches!(
        device.discard(last, 2 * IO_ALIGN_BYTES as u64).await,
        Err(DeviceError::OutOfRange { .. })
    ));
    // The refused write changed nothing.
    assert_eq!(
        device.read_at(last, IO_ALIGN_BYTES).await.unwrap(),
        pattern(1, 1)
    );
}

pub async fn discard_reads_zeros(factory: &Factory) {
    let dir = tempfile::tempdir().unwrap();
    let Some(device) = factory.open(dir.path()) else {
        return;
    };
    device.write_at(0, pattern(3, 16)).await.unwrap();
    device
        .discard(4 * IO_ALIGN_BYTES as u64, 8 * IO_ALIGN_BYTES as u64)
        .await
        .unwrap();
    let read = device.read_at(0, 16 * IO_ALIGN_BYTES).await.unwrap();
    let expected = pattern(3, 16);
    assert!(read[..4 * IO_ALIGN_BYTES] == expected[..4 * IO_ALIGN_BYTES]);
    assert!(read[4 * IO_ALIGN_BYTES..12 * IO_ALIGN_BYTES]
        .iter()
        .all(|b| *b == 0));
    assert!(read[12 * IO_ALIGN_BYTES..] == expected[12 * IO_ALIGN_BYTES..]);
    // Zero-length operations are no-ops.
    device.discard(0, 0).await.unwrap();
    assert!(device.read_at(0, 0).await.unwrap().is_empty());
}

pub async fn flush_works(factory: &Factory) {
    let dir = tempfile::tempdir().unwrap();
    let Some(device) = factory.open(dir.path()) else {
        return;
    };
    device.flush().await.unwrap();
    device.write_at(8192, pattern(9, 2)).await.unwrap();
    device.flush().await.unwrap();
    assert_eq!(
        device.read_at(8192, 2 * IO_ALIGN_BYTES).await.unwrap(),
        pattern(9, 2)
    );
}

/// 256 tasks, each on its own blocks, write then read back concurrently, with
/// flushes mixed in. The engine's bounded queue must absorb the burst.
pub async fn concurrent_ops(factory: &Factory) {
    let dir = tempfile::tempdir().unwrap();
    let Some(device) = factory.open(dir.path()) else {
        return;
    };
    let mut tasks = Vec::new();
    for task in 0..256u64 {
        let device = Arc::clone(&device);
        tasks.push(tokio::spawn(async move {
            let offset = task * 4 * IO_ALIGN_BYTES as u64;
            for round in 0..4u64 {
                let tag = task * 100 + round;
                device.write_at(offset, pattern(tag, 4)).await.unwrap();
                if task % 64 == 0 {
                    device.flush().await.unwrap();
                }
                let read = device.read_at(offset, 4 * IO_ALIGN_BYTES).await.unwrap();
                assert_eq!(read, pattern(tag, 4), "task {task} round {round}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let all = device.read_at(0, SIZE_BYTES as usize).await.unwrap();
    for task in 0..256usize {
        let start = task * 4 * IO_ALIGN_BYTES;
        assert!(all[start..start + 4 * IO_ALIGN_BYTES] == pattern(task as u64 * 100 + 3, 4)[..]);
    }
}

/// Reads and writes whose futures are dropped mid-flight must neither crash
/// the engine nor corrupt other data: the op owns its buffer until its
/// completion arrives.
pub async fn dropped_futures(factory: &Factory) {
    let dir = tempfile::tempdir().unwrap();
    let Some(device) = factory.open(dir.path()) else {
        return;
    };
    device.write_at(0, pattern(5, 64)).await.unwrap();
    for round in 0..50 {
        let read = device.read_at(0, 64 * IO_ALIGN_BYTES);
        // Poll once (submits), then drop.
        let _ = tokio::time::timeout(std::time::Duration::from_micros(1), read).await;
        let write = device.write_at(128 * IO_ALIGN_BYTES as u64, pattern(round, 16));
        let _ = tokio::time::timeout(std::time::Duration::from_micros(1), write).await;
        // Futures never polled at all.
        drop(device.read_at(0, IO_ALIGN_BYTES));
    }
    // Let in-flight ops finish; the engine keeps working.
    device.flush().await.unwrap();
    assert_eq!(
        device.read_at(0, 64 * IO_ALIGN_BYTES).await.unwrap(),
        pattern(5, 64)
    );
    device
        .write_at(256 * IO_ALIGN_BYTES as u64, pattern(6, 1))
        .await
        .unwrap();
    assert_eq!(
        device
            .read_at(256 * IO_ALIGN_BYTES as u64, IO_ALIGN_BYTES)
            .await
            .unwrap(),
        pattern(6, 1)
    );
}

pub async fn reopen_sees_data(factory: &Factory) {
    if !factory.persistent {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(device) = factory.open(dir.path()) else {
        return;
    };
    device.write_at(40960, pattern(11, 3)).await.unwrap();
    device.flush().await.unwrap();
    drop(device);
    let device = factory.open(dir.path()).unwrap();
    assert_eq!(
        device.read_at(40960, 3 * IO_ALIGN_BYTES).await.unwrap(),
        pattern(11, 3)
    );
}

#[derive(Debug, Clone)]
pub enum Op {
    Write { block: u64, blocks: usize, tag: u64 },
    Read { block: u64, blocks: usize },
    Discard { block: u64, blocks: u64 },
    Flush,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    // Keep ops inside the first 64 blocks so they overlap often.
    prop_oneof![
        4 => (0u64..60, 1usize..=4, any::<u64>())
            .prop_map(|(block, blocks, tag)| Op::Write { block, blocks, tag }),
        3 => (0u64..60, 1usize..=4).prop_map(|(block, blocks)| Op::Read { block, blocks }),
        1 => (0u64..60, 1u64..=4).prop_map(|(block, blocks)| Op::Discard { block, blocks }),
        1 => Just(Op::Flush),
    ]
}

/// Model test: random write/read/discard/flush sequences against a `Vec<u8>`.
pub fn model(factory: &Factory) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config = ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(ops in proptest::collection::vec(op_strategy(), 1..40))| {
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let Some(device) = factory.open(dir.path()) else {
                return Ok(());
            };
            let mut model = vec![0u8; 64 * IO_ALIGN_BYTES];
            let mut touched = HashSet::new();
            for op in &ops {
                match *op {
                    Op::Write { block, blocks, tag } => {
                        let buf = pattern(tag, blocks);
                        let start = block as usize * IO_ALIGN_BYTES;
                        model[start..start + buf.len()].copy_from_slice(&buf);
                        device.write_at(block * IO_ALIGN_BYTES as u64, buf).await.unwrap();
                        touched.insert(block);
                    }
                    Op::Read { block, blocks } => {
                        let start = block as usize * IO_ALIGN_BYTES;
                        let read = device.read_at(block * IO_ALIGN_BYTES as u64, blocks * IO_ALIGN_BYTES).await.unwrap();
                        prop_assert!(read[..] == model[start..start + blocks * IO_ALIGN_BYTES], "{:?}", op);
                    }
                    Op::Discard { block, blocks } => {
                        let start = block as usize * IO_ALIGN_BYTES;
                        model[start..start + blocks as usize * IO_ALIGN_BYTES].fill(0);
                        device.discard(block * IO_ALIGN_BYTES as u64, blocks * IO_ALIGN_BYTES as u64).await.unwrap();
                    }
                    Op::Flush => device.flush().await.unwrap(),
                }
            }
            let all = device.read_at(0, 64 * IO_ALIGN_BYTES).await.unwrap();
            prop_assert!(all[..] == model[..]);
            Ok(())
        })?;
    });
}

/// Instantiates every conformance test for one engine.
#[macro_export]
macro_rules! conformance_suite {
    ($engine:ident, $factory:expr) => {
        mod $engine {
            use $crate::conformance;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn round_trip() {
                conformance::round_trip(&$factory).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unaligned_refused() {
                conformance::unaligned_refused(&$factory).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn out_of_range_refused() {
                conformance::out_of_range_refused(&$factory).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn discard_reads_zeros() {
                conformance::discard_reads_zeros(&$factory).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn flush_works() {
                conformance::flush_works(&$factory).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_ops() {
                conformance::concurrent_ops(&$factory).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dropped_futures() {
                conformance::dropped_futures(&$factory).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn reopen_sees_data() {
                conformance::reopen_sees_data(&$factory).await;
            }

            #[test]
            fn model() {
                conformance::model(&$factory);
            }
        }
    };
}
