//! The store on real files through both engines of `hardware::open_device`.

use proto::sled::SledError;

use hardware::EngineChoice;

use crate::common::*;

async fn store_on_file(engine: EngineChoice) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev.img");
    let dev = file_device(&path, engine, 24 << 20);
    let store = open(&dev, 0).await;
    let cols = store.allocate(3).await.unwrap();
    let c = cols[1];
    store.claim(c, p(3, 1), 2).await.unwrap();
    // Concurrent appends to different columns share flushes.
    let store = std::sync::Arc::new(store);
    let mut tasks = Vec::new();
    for (k, &col) in cols.iter().enumerate() {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            if col != c {
                store.claim(col, p(3, 1), 2).await.unwrap();
            }
            for round in 0..4u64 {
                let (d, crcs) = data((k * 10) as u8 + round as u8, 3);
                store
                    .append(col, p(3, 1), 2, round * 3 * 4096, &d, &crcs)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        store.claim(c, p(3, 1), 1).await,
        Err(SledError::Fenced { current_epoch: 2 })
    );
    store.claim(c, p(3, 1), 5).await.unwrap();
    drop(store);
    drop(dev);
    // Reopen the same file with a fresh device handle: state and data are there.
    let dev = file_device(&path, engine, 24 << 20);
    let store = open(&dev, 0).await;
    let status = store.status(c).await.unwrap();
    assert_eq!((status.epoch, status.length_bytes), (5, 12 * 4096));
    let (d, _) = data(10 + 2, 3);
    assert_eq!(store.read(c, 2 * 3 * 4096, 3 * 4096).await.unwrap().0, d);
    let (d, crcs) = data(1, 1);
    assert_eq!(
        store.append(c, p(3, 1), 4, 12 * 4096, &d, &crcs).await,
        Err(SledError::Fenced { current_epoch: 5 })
    );
    assert!(store.recovered_bad_blocks().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_on_uring_engine() {
    store_on_file(EngineChoice::Uring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_on_sync_engine() {
    store_on_file(EngineChoice::Sync).await;
}
