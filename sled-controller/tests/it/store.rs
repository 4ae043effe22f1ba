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
