//! In-RAM [`BlockDevice`] for tests and simulation.
//!
//! The whole device is one `Vec<u8>` behind a lock (zero pages are allocated
//! lazily by the OS, so a large sparse device is cheap). It enforces the same
//! alignment and range checks as the real engines, so code tested against it
//! behaves the same on disks. Operations complete immediately; wrap it in a
//! [`FaultyDevice`](super::FaultyDevice) for latency and errors.

use std::path::PathBuf;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{
    check_range, AlignedBuf, BlockDevice, DeviceInfo, EngineKind, IoFuture, IO_ALIGN_BYTES,
};

/// An in-memory block device.
#[derive(Debug)]
pub struct MemoryDevice {
    info: DeviceInfo,
    data: RwLock<Vec<u8>>,
}

impl MemoryDevice {
    /// A zeroed device of `size_bytes` (rounded down to a multiple of
    /// [`IO_ALIGN_BYTES`]) labelled `memory`.
    pub fn new(size_bytes: u64) -> Self {
        Self::with_path("memory", size_bytes)
    }

    /// Like [`MemoryDevice::new`] with a label used as the device path in
    /// [`DeviceInfo`] and errors.
    ///
    /// # Panics
    /// If `size_bytes` does not fit in this machine's address space.
    pub fn with_path(path: impl Into<PathBuf>, size_bytes: u64) -> Self {
        let size_bytes = size_bytes - size_bytes % IO_ALIGN_BYTES as u64;
        let Ok(len) = usize::try_from(size_bytes) else {
            panic!("memory device of {size_bytes} bytes does not fit in memory");
        };
        Self {
            info: DeviceInfo {
                path: path.into(),
                size_bytes,
                engine: EngineKind::Memory,
                direct_io: false,
            },
            data: RwLock::new(vec![0u8; len]),
        }
    }

    fn read_lock(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        // A panic while holding the lock cannot leave the bytes inconsistent
        // beyond a partial copy, which a crashed write may do on a disk too.
        self.data
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_lock(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.data
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn range(offset: u64, len: usize) -> std::ops::Range<usize> {
        // check_range proved offset + len <= size_bytes, which fits in usize.
        let start = offset as usize;
        start..start + len
    }
}

impl BlockDevice for MemoryDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, AlignedBuf> {
        Box::pin(async move {
            check_range(&self.info, offset, len as u64)?;
            let mut buf = AlignedBuf::zeroed(len)?;
            buf.copy_from_slice(&self.read_lock()[Self::range(offset, len)]);
            Ok(buf)
        })
    }

    fn write_at(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, AlignedBuf> {
        Box::pin(async move {
            check_range(&self.info, offset, buf.len() as u64)?;
            self.write_lock()[Self::range(offset, buf.len())].copy_from_slice(&buf);
            Ok(buf)
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            check_range(&self.info, offset, len)?;
            self.write_lock()[Self::range(offset, len as usize)].fill(0);
            Ok(())
        })
    }
}
