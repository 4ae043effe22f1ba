use std::sync::Arc;

use bytes::Bytes;
use hardware::{BlockDevice, MemoryDevice};
use proto::sled::PartitionId;
use sled_controller::metrics::Metrics;
use sled_controller::store::{DeviceIdentity, Store, StoreOptions};

pub const COLUMN: u64 = 1 << 20;

pub fn identity(device_index: u16) -> DeviceIdentity {
    DeviceIdentity {
        unit_name: "unit-1".into(),
        sled_id: "sled-1".into(),
        device_index,
    }
}

pub fn memory(size: u64) -> Arc<dyn BlockDevice> {
    Arc::new(MemoryDevice::new(size))
}

pub async fn open(device: &Arc<dyn BlockDevice>, index: u16) -> Store {
    try_open(device, index).await.unwrap()
}

pub fn p(volume: u64, partition: u32) -> PartitionId {
    PartitionId {
        volume,
        index: partition,
    }
}

/// `blocks` blocks of a recognisable pattern.
pub fn data(seed: u8, blocks: usize) -> (Bytes, Vec<u32>) {
    let mut v = vec![0u8; blocks * 4096];
    for (i, b) in v.iter_mut().enumerate() {
        *b = seed
            .wrapping_add((i / 4096) as u8)
            .wrapping_mul(31)
            .wrapping_add(i as u8);
    }
    let crcs = v.chunks(4096).map(crc32c::crc32c).collect();
    (Bytes::from(v), crcs)
}

pub async fn try_open(
    device: &Arc<dyn BlockDevice>,
    index: u16,
) -> Result<Store, sled_controller::store::StoreOpenError> {
    Store::open(
        device.clone(),
        &identity(index),
        &StoreOptions::new(COLUMN),
        Arc::new(Metrics::new()),
    )
    .await
}

/// A file-backed device on `engine` (created at `size` bytes).
pub fn file_device(
    path: &std::path::Path,
    engine: hardware::EngineChoice,
    size: u64,
) -> Arc<dyn BlockDevice> {
    let options = hardware::OpenOptions {
        engine,
        direct: true,
        create_size_bytes: Some(size),
        zero_fill_on_create: false,
        queue_depth: 32,
    };
    hardware::open_device(path, &options).unwrap()
}
