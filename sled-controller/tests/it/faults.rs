//! Torn writes, flipped bytes, failed devices, foreign devices.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use hardware::{BlockDevice, EngineChoice, FaultyDevice, MemoryDevice};
use proto::sled::{ColumnId, DeviceState, SledError, SledRequest, SledResponse};
use sled_controller::metrics::Metrics;
use sled_controller::service::{DeviceSlot, Sled};
use sled_controller::store::StoreOpenError;

use crate::common::*;

#[tokio::test]
async fn torn_append_is_healed_by_retry() {
    let faulty = Arc::new(FaultyDevice::new(memory(16 << 20)));
    let control = faulty.control();
    let dev: Arc<dyn BlockDevice> = faulty;
    let store = open(&dev, 0).await;
    let c = store.allocate(1).await.unwrap()[0];
    store.claim(c, p(1, 0), 1).await.unwrap();
    let (first, first_crcs) = data(10, 2);
    store
        .append(c, p(1, 0), 1, 0, &first, &first_crcs)
        .await
        .unwrap();
    // The data write of the next append persists 1 of 4 blocks, then EIO;
    // its CRC and slot writes reach the device (as they could in a crash).
    let (second, second_crcs) = data(20, 4);
    control.tear_next_write(1);
    let err = store
        .append(c, p(1, 0), 1, 8192, &second, &second_crcs)
        .await
        .unwrap_err();
    assert_eq!(err, SledError::DeviceFailed { device: 0 });
    assert!(store.is_failed());
    drop(store);
    // Restart: the slot says length 24 KiB; the tail [8 KiB, 24 KiB) is in
    // doubt and blocks 1..3 of the torn append fail verification.
    control.heal();
    let store = open(&dev, 0).await;
    let bad: Vec<u64> = store
        .recovered_bad_blocks()
        .iter()
        .map(|b| b.offset_bytes)
        .collect();
    assert_eq!(bad, vec![12288, 16384, 20480]);
    assert_eq!(store.status(c).await.unwrap().length_bytes, 24576);
    assert!(matches!(
        store.read(c, 8192, 16384).await,
        Err(SledError::ChecksumMismatch { .. })
    ));
    // The head node retries the unacknowledged append: it heals.
    assert_eq!(
        store
            .append(c, p(1, 0), 1, 8192, &second, &second_crcs)
            .await
            .unwrap(),
        24576
    );
    let (got, _) = store.read(c, 0, 24576).await.unwrap();
    assert_eq!(&got[..8192], &first[..]);
    assert_eq!(&got[8192..], &second[..]);
    drop(store);
    let store = open(&dev, 0).await;
    assert!(store.recovered_bad_blocks().is_empty());
}

#[tokio::test]
async fn torn_slot_write_keeps_previous_state() {
    let faulty = Arc::new(FaultyDevice::new(memory(16 << 20)));
    let control = faulty.control();
    let dev: Arc<dyn BlockDevice> = faulty;
    let store = open(&dev, 0).await;
    let c = store.allocate(1).await.unwrap()[0];
    store.claim(c, p(1, 0), 4).await.unwrap();
    // A claim writes only a slot; tear it (0 blocks reach the device).
    control.tear_next_write(0);
    assert!(store.claim(c, p(1, 0), 9).await.is_err());
    drop(store);
    control.heal();
    let store = open(&dev, 0).await;
    assert_eq!(store.status(c).await.unwrap().epoch, 4);
}

fn flip_byte(path: &std::path::Path, offset: u64) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x5a;
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&b).unwrap();
    f.sync_all().unwrap();
}

/// A sync-engine store on the file `path` with column `c` holding the four
/// blocks `d` (partition 1/0, epoch 1): `(store, metrics, c, d)`.
async fn store_with_four_blocks(
    path: &std::path::Path,
) -> (
    Arc<sled_controller::store::Store>,
    Arc<Metrics>,
    u32,
    bytes::Bytes,
) {
    let dev = file_device(path, EngineChoice::Sync, 16 << 20);
    let metrics = Arc::new(Metrics::new());
    let store = Arc::new(
        sled_controller::store::Store::open(
            dev,
            &identity(0),
            &sled_controller::store::StoreOptions::new(COLUMN),
            metrics.clone(),
        )
        .await
        .unwrap(),
    );
    let c = store.allocate(1).await.unwrap()[0];
    store.claim(c, p(1, 0), 1).await.unwrap();
    let (d, crcs) = data(7, 4);
    store.append(c, p(1, 0), 1, 0, &d, &crcs).await.unwrap();
    (store, metrics, c, d)
}

#[tokio::test]
async fn flipped_byte_in_device_file_is_detected_by_read_and_scrub() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev0.img");
    let (store, metrics, c, d) = store_with_four_blocks(&path).await;
    flip_byte(&path, store.geometry().data_offset(c, 8192) + 123);
    match store.read(c, 0, 16384).await {
        Err(SledError::ChecksumMismatch {
            column,
            block_offsets_bytes: block_offsets,
        }) => {
            assert_eq!(
                column,
                ColumnId {
                    device: 0,
                    index: c
                }
            );
            assert_eq!(block_offsets, vec![8192]);
        }
        other => panic!("expected checksum mismatch, got {other:?}"),
    }
    assert_eq!(store.read(c, 0, 8192).await.unwrap().0, d.slice(..8192));
    assert_eq!(metrics.checksum_errors.get(), 1);
    let sled = Sled::new(
        "sled-1".into(),
        COLUMN,
        vec![DeviceSlot::Open(store)],
        metrics.clone(),
    );
    let report = sled.scrub_now().await;
    assert_eq!(report.passes, 1);
    assert_eq!(report.bytes_verified, 16384);
    assert_eq!(report.bad_blocks.len(), 1);
    assert_eq!(report.bad_blocks[0].offset_bytes, 8192);
    assert_eq!(metrics.scrub_bad_blocks.get(), 1);
    // A second pass does not count the same block twice.
    let report = sled.scrub_now().await;
    assert_eq!((report.passes, report.bad_blocks.len()), (2, 1));
    let text = metrics.encode().unwrap();
    assert!(
        text.contains("rackblock_sled_scrub_bad_blocks_total 1"),
        "{text}"
    );
}

#[tokio::test]
async fn failed_device_is_isolated() {
    let good = memory(16 << 20);
    let faulty = Arc::new(FaultyDevice::new(memory(16 << 20)));
    let control = faulty.control();
    let bad: Arc<dyn BlockDevice> = faulty;
    let metrics = Arc::new(Metrics::new());
    let open_with = |dev: Arc<dyn BlockDevice>, i: u16| {
        let metrics = metrics.clone();
        async move {
            Arc::new(
                sled_controller::store::Store::open(
                    dev,
                    &identity(i),
                    &sled_controller::store::StoreOptions::new(COLUMN),
                    metrics,
                )
                .await
                .unwrap(),
            )
        }
    };
    let sled = Sled::new(
        "sled-1".into(),
        COLUMN,
        vec![
            DeviceSlot::Open(open_with(good, 0).await),
            DeviceSlot::Open(open_with(bad, 1).await),
        ],
        metrics.clone(),
    );
    // Spread: 4 columns over 2 devices, 2 each.
    let SledResponse::Allocated(cols) = sled
        .handle_request(SledRequest::AllocateColumns {
            column_count: 4,
            device: None,
        })
        .await
    else {
        panic!()
    };
    assert_eq!(cols.iter().filter(|c| c.device == 0).count(), 2, "{cols:?}");
    let on_bad = *cols.iter().find(|c| c.device == 1).unwrap();
    let on_good = *cols.iter().find(|c| c.device == 0).unwrap();
    control.fail_device();
    let (d, crcs) = data(1, 1);
    for column in [on_good, on_bad] {
        let r = sled
            .handle_request(SledRequest::Claim {
                column,
                partition: p(1, 0),
                epoch: 1,
            })
            .await;
        if column.device == 1 {
            assert_eq!(
                r,
                SledResponse::Error(SledError::DeviceFailed { device: 1 })
            );
        } else {
            assert_eq!(
                r,
                SledResponse::Claimed {
                    epoch: 1,
                    length_bytes: 0
                }
            );
        }
    }
    let r = sled
        .handle_request(SledRequest::Append {
            column: on_good,
            partition: p(1, 0),
            epoch: 1,
            offset_bytes: 0,
            data: d.clone(),
            block_crcs: crcs.clone(),
        })
        .await;
    assert_eq!(r, SledResponse::Appended { length_bytes: 4096 });
    assert_eq!(
        sled.handle_request(SledRequest::ColumnStatus { column: on_bad })
            .await,
        SledResponse::Error(SledError::DeviceFailed { device: 1 })
    );
    let inv = sled.inventory();
    assert_eq!(inv.devices[0].state, DeviceState::Healthy);
    assert_eq!(inv.devices[1].state, DeviceState::Failed);
    // New allocations avoid the failed device.
    let SledResponse::Allocated(more) = sled
        .handle_request(SledRequest::AllocateColumns {
            column_count: 3,
            device: None,
        })
        .await
    else {
        panic!()
    };
    assert!(more.iter().all(|c| c.device == 0), "{more:?}");
    let (code, body) = sled_controller::admin::health_of(&sled);
    assert_eq!(code, 200);
    assert_eq!(body["status"], "degraded");
    let text = metrics.encode().unwrap();
    assert!(
        text.contains("rackblock_sled_device_up{device=\"1\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("rackblock_sled_device_up{device=\"0\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn foreign_and_damaged_devices_are_refused_never_reformatted() {
    let dev = memory(16 << 20);
    drop(open(&dev, 0).await);
    // Same device presented as device 1 of the sled: refused.
    let err = try_open(&dev, 1).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreOpenError::Foreign {
                found_device: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_fatal());
    // Another sled's device.
    let other = sled_controller::store::DeviceIdentity {
        sled_id: "sled-2".into(),
        ..identity(0)
    };
    let err = sled_controller::store::Store::open(
        dev.clone(),
        &other,
        &sled_controller::store::StoreOptions::new(COLUMN),
        Arc::new(Metrics::new()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreOpenError::Foreign { .. }), "{err}");
    // A device with garbage in its first 8 KiB: refused, not formatted.
    let junk: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(16 << 20));
    junk.write_at(
        4096,
        hardware::AlignedBuf::from_slice(&[7u8; 4096]).unwrap(),
    )
    .await
    .unwrap();
    let err = try_open(&junk, 0).await.unwrap_err();
    assert!(
        matches!(err, StoreOpenError::NoValidSuperblock { .. }),
        "{err}"
    );
    let still = junk.read_at(0, 8192).await.unwrap();
    assert!(still[..4096].iter().all(|b| *b == 0) && still[4096..].iter().all(|b| *b == 7));
    // One damaged superblock copy is repaired from the other.
    dev.write_at(0, hardware::AlignedBuf::from_slice(&[9u8; 4096]).unwrap())
        .await
        .unwrap();
    drop(open(&dev, 0).await);
    let head = dev.read_at(0, 8192).await.unwrap();
    assert_eq!(&head[..4096], &head[4096..]);
    // A failed device at open is not fatal.
    let faulty = Arc::new(FaultyDevice::new(memory(16 << 20)));
    faulty.control().fail_device();
    let failing: Arc<dyn BlockDevice> = faulty;
    let err = try_open(&failing, 0).await.unwrap_err();
    assert!(!err.is_fatal(), "{err}");
}

#[tokio::test]
async fn health_is_failed_when_no_device_is_healthy() {
    let failed = sled_controller::service::FailedDevice {
        device: 0,
        path: "/dev/x".into(),
        size_bytes: 1 << 30,
        reason: "EIO".into(),
    };
    let sled = Sled::new(
        "sled-1".into(),
        COLUMN,
        vec![DeviceSlot::Failed(failed)],
        Arc::new(Metrics::new()),
    );
    let (code, body) = sled_controller::admin::health_of(&sled);
    assert_eq!(code, 503);
    assert_eq!(body["status"], "failed");
    assert_eq!(body["devices"][0]["state"], "failed");
    assert_eq!(
        sled.handle_request(SledRequest::AllocateColumns {
            column_count: 1,
            device: None
        })
        .await,
        SledResponse::Error(SledError::NoSpace)
    );
    assert_eq!(
        sled.handle_request(SledRequest::Read {
            column: ColumnId {
                device: 0,
                index: 0
            },
            offset_bytes: 0,
            len_bytes: 4096
        })
        .await,
        SledResponse::Error(SledError::DeviceFailed { device: 0 })
    );
    assert_eq!(
        sled.handle_request(SledRequest::ColumnStatus {
            column: ColumnId {
                device: 5,
                index: 0
            }
        })
        .await,
        SledResponse::Error(SledError::NoSuchColumn {
            column: ColumnId {
                device: 5,
                index: 0
            }
        })
    );
}

/// A device that stops answering (no error, no completion) is failed by its
/// deadline: the append waiting on it gets `DeviceFailed` instead of
/// hanging, and the store refuses further work on it.
#[tokio::test]
async fn hung_device_is_failed_by_its_deadline() {
    let faulty = Arc::new(FaultyDevice::new(memory(16 << 20)));
    let control = faulty.control();
    let timed: Arc<dyn BlockDevice> = Arc::new(
        hardware::TimedDevice::new(faulty, std::time::Duration::from_millis(200)).unwrap(),
    );
    let store = open(&timed, 0).await;
    let c = store.allocate(1).await.unwrap()[0];
    store.claim(c, p(1, 0), 1).await.unwrap();
    let (first, crcs) = data(3, 2);
    store.append(c, p(1, 0), 1, 0, &first, &crcs).await.unwrap();
    control.set_latency(std::time::Duration::from_secs(3600));
    let started = std::time::Instant::now();
    let (second, crcs) = data(4, 2);
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        store.append(c, p(1, 0), 1, 8192, &second, &crcs),
    )
    .await
    .expect("an append on a hung device must not hang")
    .unwrap_err();
    assert_eq!(err, SledError::DeviceFailed { device: 0 });
    assert!(store.is_failed());
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // Reads are refused from now on without touching the device: with its
    // hour of latency, a read that reached it could not end within 10 s.
    let refused = tokio::time::timeout(std::time::Duration::from_secs(10), store.read(c, 0, 4096))
        .await
        .expect("a read of a failed device waited for the device");
    assert_eq!(refused.unwrap_err(), SledError::DeviceFailed { device: 0 });
}

/// Issue 14, item 5: corruption a client read finds joins the scrub report
/// at once (no pass needed), and freeing the column clears it.
#[tokio::test]
async fn read_found_corruption_is_reported_and_cleared_when_the_column_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev0.img");
    let (store, metrics, c, _) = store_with_four_blocks(&path).await;
    flip_byte(&path, store.geometry().data_offset(c, 4096) + 9);
    let sled = Sled::new(
        "sled-1".into(),
        COLUMN,
        vec![DeviceSlot::Open(store)],
        metrics.clone(),
    );
    let column = ColumnId {
        device: 0,
        index: c,
    };
    let read = sled
        .handle_request(SledRequest::Read {
            column,
            offset_bytes: 0,
            len_bytes: 16384,
        })
        .await;
    assert!(
        matches!(
            read,
            SledResponse::Error(SledError::ChecksumMismatch { .. })
        ),
        "{read:?}"
    );
    let report = sled.scrub_report();
    assert_eq!(report.passes, 0);
    assert_eq!(report.bad_blocks.len(), 1, "{report:?}");
    assert_eq!(
        (
            report.bad_blocks[0].column,
            report.bad_blocks[0].offset_bytes
        ),
        (column, 4096)
    );
    let freed = sled
        .handle_request(SledRequest::FreeColumn {
            column,
            partition: p(1, 0),
            epoch: 1,
        })
        .await;
    assert!(matches!(freed, SledResponse::Freed), "{freed:?}");
    assert!(sled.scrub_report().bad_blocks.is_empty());
    // The flipped byte is still on the device, but the column is free: a
    // pass does not walk it.
    assert!(sled.scrub_now().await.bad_blocks.is_empty());
}
