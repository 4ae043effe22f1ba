use proto::sled::{ColumnState, SledError};

use crate::common::*;

#[tokio::test]
async fn allocate_claim_append_read_free() {
    let dev = memory(16 << 20);
    let store = open(&dev, 0).await;
    let total = store.free_count();
    assert!(total >= 10, "{total}");
    let cols = store.allocate(2).await.unwrap();
    assert_eq!(store.free_count(), total - 2);
    let c = cols[0];
    assert_eq!(store.claim(c, p(1, 0), 3).await.unwrap(), (3, 0));
    let (d, crcs) = data(1, 3);
    assert_eq!(
        store.append(c, p(1, 0), 3, 0, &d, &crcs).await.unwrap(),
        3 * 4096
    );
    let (got, got_crcs) = store.read(c, 4096, 8192).await.unwrap();
    assert_eq!(&got[..], &d[4096..]);
    assert_eq!(got_crcs, crcs[1..].to_vec());
    assert!(matches!(
        store.read(c, 8192, 8192).await,
        Err(SledError::OutOfRange { .. })
    ));
    store.free(c, p(1, 0), 3).await.unwrap();
    assert_eq!(store.status(c).await.unwrap().state, ColumnState::Free);
    assert_eq!(store.free_count(), total - 1);
}

#[tokio::test]
async fn fencing_survives_reopen() {
    let dev = memory(16 << 20);
    let store = open(&dev, 0).await;
    let c = store.allocate(1).await.unwrap()[0];
    store.claim(c, p(1, 0), 5).await.unwrap();
    let (d, crcs) = data(2, 1);
    assert_eq!(
        store.append(c, p(1, 0), 4, 0, &d, &crcs).await,
        Err(SledError::Fenced { current_epoch: 5 })
    );
    assert_eq!(
        store.claim(c, p(1, 0), 4).await,
        Err(SledError::Fenced { current_epoch: 5 })
    );
    assert!(matches!(
        store.claim(c, p(2, 0), 9).await,
        Err(SledError::WrongPartition { .. })
    ));
    store.append(c, p(1, 0), 5, 0, &d, &crcs).await.unwrap();
    // A new primary takes over with epoch 7.
    assert_eq!(store.claim(c, p(1, 0), 7).await.unwrap(), (7, 4096));
    assert_eq!(
        store.append(c, p(1, 0), 5, 4096, &d, &crcs).await,
        Err(SledError::Fenced { current_epoch: 7 })
    );
    assert_eq!(
        store.free(c, p(1, 0), 6).await,
        Err(SledError::Fenced { current_epoch: 7 })
    );
    let before = store.status(c).await.unwrap();
    drop(store);
    let store = open(&dev, 0).await;
    assert_eq!(store.status(c).await.unwrap(), before);
    assert_eq!(
        store.append(c, p(1, 0), 6, 4096, &d, &crcs).await,
        Err(SledError::Fenced { current_epoch: 7 })
    );
    // Append with a higher epoch raises it.
    assert_eq!(
        store.append(c, p(1, 0), 8, 4096, &d, &crcs).await.unwrap(),
        8192
    );
    drop(store);
    let store = open(&dev, 0).await;
    assert_eq!(store.status(c).await.unwrap().epoch, 8);
    assert_eq!(store.read(c, 0, 8192).await.unwrap().0.len(), 8192);
}

#[tokio::test]
async fn append_retry_is_idempotent() {
    let dev = memory(16 << 20);
    let store = open(&dev, 0).await;
    let c = store.allocate(1).await.unwrap()[0];
    store.claim(c, p(1, 0), 1).await.unwrap();
    let (d, crcs) = data(3, 4);
    assert_eq!(
        store.append(c, p(1, 0), 1, 0, &d, &crcs).await.unwrap(),
        16384
    );
    assert_eq!(
        store.append(c, p(1, 0), 1, 0, &d, &crcs).await.unwrap(),
        16384
    );
    // Same offset, different data: not a retry.
    let (other, other_crcs) = data(4, 4);
    assert!(matches!(
        store.append(c, p(1, 0), 1, 0, &other, &other_crcs).await,
        Err(SledError::OffsetMismatch { .. })
    ));
    // Past the end, and straddling the end.
    assert!(matches!(
        store.append(c, p(1, 0), 1, 20480, &d, &crcs).await,
        Err(SledError::OffsetMismatch { .. })
    ));
    assert!(matches!(
        store.append(c, p(1, 0), 1, 8192, &d, &crcs).await,
        Err(SledError::OffsetMismatch { .. })
    ));
    // Bad CRCs and shapes.
    let mut bad = crcs.clone();
    bad[2] ^= 1;
    assert!(matches!(
        store.append(c, p(1, 0), 1, 16384, &d, &bad).await,
        Err(SledError::BadRequest { .. })
    ));
    assert!(matches!(
        store.append(c, p(1, 0), 1, 16384, &d, &crcs[..3]).await,
        Err(SledError::BadRequest { .. })
    ));
    assert!(matches!(
        store.append(c, p(1, 0), 1, COLUMN - 8192, &d, &crcs).await,
        Err(SledError::OutOfRange { .. })
    ));
    assert_eq!(store.read(c, 0, 16384).await.unwrap().0, d);
}

/// Counts flushes and delays them, to observe group flush.
#[derive(Debug)]
struct CountingDevice {
    inner: std::sync::Arc<dyn hardware::BlockDevice>,
    flushes: std::sync::atomic::AtomicU64,
}

impl hardware::BlockDevice for CountingDevice {
    fn info(&self) -> &hardware::DeviceInfo {
        self.inner.info()
    }
    fn read_at(&self, offset: u64, len: usize) -> hardware::IoFuture<'_, hardware::AlignedBuf> {
        self.inner.read_at(offset, len)
    }
    fn write_at(
        &self,
        offset: u64,
        buf: hardware::AlignedBuf,
    ) -> hardware::IoFuture<'_, hardware::AlignedBuf> {
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> hardware::IoFuture<'_, ()> {
        Box::pin(async move {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            self.flushes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.flush().await
        })
    }
    fn discard(&self, offset: u64, len: u64) -> hardware::IoFuture<'_, ()> {
        self.inner.discard(offset, len)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_flushes() {
    use std::sync::atomic::Ordering;
    let counting = std::sync::Arc::new(CountingDevice {
        inner: memory(32 << 20),
        flushes: Default::default(),
    });
    let dev: std::sync::Arc<dyn hardware::BlockDevice> = counting.clone();
    let store = std::sync::Arc::new(open(&dev, 0).await);
    let cols = store.allocate(16).await.unwrap();
    for &c in &cols {
        store.claim(c, p(1, 0), 1).await.unwrap();
    }
    let before = counting.flushes.load(Ordering::SeqCst);
    let mut tasks = Vec::new();
    for &c in &cols {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..4u64 {
                let (d, crcs) = data(c as u8 ^ round as u8, 1);
                store
                    .append(c, p(1, 0), 1, round * 4096, &d, &crcs)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let flushes = counting.flushes.load(Ordering::SeqCst) - before;
    // 64 appends; with sharing, far fewer flushes (each waiter still needs a
    // flush that started after its writes, so at least 4 rounds' worth).
    assert!(
        (4..32).contains(&flushes),
        "{flushes} flushes for 64 appends"
    );
    for &c in &cols {
        assert_eq!(store.status(c).await.unwrap().length_bytes, 4 * 4096);
    }
}

/// A device whose flushes and reads wait while their gate is closed, and
/// that counts reads waiting at the gate.
#[derive(Debug)]
struct GatedDevice {
    inner: std::sync::Arc<dyn hardware::BlockDevice>,
    flush_gate: tokio::sync::watch::Sender<bool>,
    read_gate: tokio::sync::watch::Sender<bool>,
    reads_waiting: std::sync::atomic::AtomicU64,
}

impl GatedDevice {
    fn new(inner: std::sync::Arc<dyn hardware::BlockDevice>) -> Self {
        Self {
            inner,
            flush_gate: tokio::sync::watch::channel(true).0,
            read_gate: tokio::sync::watch::channel(true).0,
            reads_waiting: Default::default(),
        }
    }
}

impl hardware::BlockDevice for GatedDevice {
    fn info(&self) -> &hardware::DeviceInfo {
        self.inner.info()
    }
    fn read_at(&self, offset: u64, len: usize) -> hardware::IoFuture<'_, hardware::AlignedBuf> {
        Box::pin(async move {
            let mut open = self.read_gate.subscribe();
            if !*open.borrow() {
                self.reads_waiting
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = open.wait_for(|open| *open).await;
            }
            self.inner.read_at(offset, len).await
        })
    }
    fn write_at(
        &self,
        offset: u64,
        buf: hardware::AlignedBuf,
    ) -> hardware::IoFuture<'_, hardware::AlignedBuf> {
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> hardware::IoFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.flush_gate.subscribe().wait_for(|open| *open).await;
            self.inner.flush().await
        })
    }
    fn discard(&self, offset: u64, len: u64) -> hardware::IoFuture<'_, ()> {
        self.inner.discard(offset, len)
    }
}

async fn open_with_metrics(
    dev: &std::sync::Arc<dyn hardware::BlockDevice>,
    crc_cache_blocks: usize,
) -> (
    std::sync::Arc<sled_controller::store::Store>,
    std::sync::Arc<sled_controller::metrics::Metrics>,
) {
    let metrics = std::sync::Arc::new(sled_controller::metrics::Metrics::new());
    let mut options = sled_controller::store::StoreOptions::new(COLUMN);
    options.crc_cache_blocks = crc_cache_blocks;
    let store =
        sled_controller::store::Store::open(dev.clone(), &identity(0), &options, metrics.clone())
            .await
            .unwrap();
    (std::sync::Arc::new(store), metrics)
}

/// A read of a column does not wait for an append to the same column that
/// holds the column's lock across its (here: stuck) flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_does_not_wait_for_an_append_to_the_same_column() {
    let gated = std::sync::Arc::new(GatedDevice::new(memory(16 << 20)));
    let dev: std::sync::Arc<dyn hardware::BlockDevice> = gated.clone();
    let (store, _) = open_with_metrics(&dev, 4096).await;
    let c = store.allocate(1).await.unwrap()[0];
    store.claim(c, p(1, 0), 1).await.unwrap();
    let (first, first_crcs) = data(5, 4);
    store
        .append(c, p(1, 0), 1, 0, &first, &first_crcs)
        .await
        .unwrap();
    gated.flush_gate.send_replace(false);
    let (second, second_crcs) = data(6, 4);
    let append = tokio::spawn({
        let store = store.clone();
        let second = second.clone();
        async move {
            store
                .append(c, p(1, 0), 1, 16384, &second, &second_crcs)
                .await
        }
    });
    // The append is stuck in its flush, holding the column's lock; reads of
    // what was appended before still answer.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert!(!append.is_finished());
    for _ in 0..10 {
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), store.read(c, 0, 16384))
            .await
            .expect("a read waited for the append's flush");
        assert_eq!(read.unwrap().0, first);
    }
    // Not durable yet: not readable yet.
    assert!(matches!(
        store.read(c, 16384, 4096).await,
        Err(SledError::OutOfRange { .. })
    ));
    gated.flush_gate.send_replace(true);
    assert_eq!(append.await.unwrap().unwrap(), 32768);
    assert_eq!(store.read(c, 16384, 16384).await.unwrap().0, second);
}

/// Readers and appenders on the same columns at once, with a CRC cache too
/// small to hold every column's CRC block (so reads load CRC blocks from
/// the device while appends cache newer ones): every read returns exactly
/// what was appended, and every block still verifies at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_while_appending_to_the_same_columns() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let dev = memory(32 << 20);
    let (store, metrics) = open_with_metrics(&dev, 8).await;
    let cols = store.allocate(12).await.unwrap();
    for &c in &cols {
        store.claim(c, p(1, 0), 1).await.unwrap();
    }
    const APPENDS: u64 = 24;
    let mut tasks = Vec::new();
    for &c in &cols {
        let appended = std::sync::Arc::new(AtomicU64::new(0));
        let store_a = store.clone();
        let appended_a = appended.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..APPENDS {
                let (d, crcs) = data(c as u8 ^ i as u8, 2);
                store_a
                    .append(c, p(1, 0), 1, i * 8192, &d, &crcs)
                    .await
                    .unwrap();
                appended_a.store(i + 1, Ordering::SeqCst);
            }
        }));
        let store_r = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut reads = 0u64;
            // Bounded by count; ends once the appender is done.
            for _ in 0..10_000 {
                let done = appended.load(Ordering::SeqCst);
                if done > 0 {
                    let first = reads % done;
                    let n = (done - first).min(3);
                    let (got, _) = store_r
                        .read(c, first * 8192, n * 8192)
                        .await
                        .unwrap_or_else(|e| panic!("read of column {c} failed: {e}"));
                    for j in 0..n {
                        let at = (j * 8192) as usize;
                        let (want, _) = data(c as u8 ^ (first + j) as u8, 2);
                        assert_eq!(
                            &got[at..at + 8192],
                            &want[..],
                            "column {c} append {}",
                            first + j
                        );
                    }
                    reads += 1;
                }
                if done == APPENDS {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for &c in &cols {
        assert_eq!(
            store.verify(c, 0, APPENDS * 8192).await.unwrap(),
            Vec::<u64>::new()
        );
        store.read(c, 0, APPENDS * 8192).await.unwrap();
    }
    assert_eq!(metrics.checksum_errors.get(), 0);
}

/// A free that lands while a read's device I/O is in flight: the read does
/// not return (or report as corrupt) the discarded bytes; it reads again
/// and finds the column free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_overlapping_a_free_reads_again() {
    use std::sync::atomic::Ordering;
    let gated = std::sync::Arc::new(GatedDevice::new(memory(16 << 20)));
    let dev: std::sync::Arc<dyn hardware::BlockDevice> = gated.clone();
    let (store, metrics) = open_with_metrics(&dev, 4096).await;
    let c = store.allocate(1).await.unwrap()[0];
    store.claim(c, p(1, 0), 1).await.unwrap();
    let (d, crcs) = data(7, 4);
    store.append(c, p(1, 0), 1, 0, &d, &crcs).await.unwrap();
    gated.read_gate.send_replace(false);
    let read = tokio::spawn({
        let store = store.clone();
        async move { store.read(c, 0, 16384).await }
    });
    for _ in 0..500 {
        if gated.reads_waiting.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(
        gated.reads_waiting.load(Ordering::SeqCst) > 0,
        "the read never reached the device"
    );
    store.free(c, p(1, 0), 1).await.unwrap();
    gated.read_gate.send_replace(true);
    let result = read.await.unwrap();
    assert!(
        matches!(
            result,
            Err(SledError::BadColumnState {
                state: ColumnState::Free,
                ..
            })
        ),
        "{result:?}"
    );
    assert_eq!(metrics.read_retries.get(), 1);
    assert_eq!(metrics.checksum_errors.get(), 0);
}
