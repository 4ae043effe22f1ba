//! The portable engine: pread/pwrite/fdatasync on tokio's blocking pool.
//!
//! Used when io_uring is refused (seccomp, `io_uring_disabled`, old kernels)
//! or asked for with `RACKBLOCK_IO_ENGINE=sync`. Each operation takes one of
//! `queue_depth` semaphore permits and runs as a `spawn_blocking` job that
//! owns the permit, the buffer and an `Arc` of the file. So the number of
//! blocking jobs per device is bounded, and dropping the caller's future
//! leaves the job to finish with memory it owns.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::open::{discard_blocking, DeviceFile};
use super::{check_range, AlignedBuf, BlockDevice, DeviceError, DeviceInfo, IoFuture};

/// A device served by pread/pwrite.
#[derive(Debug)]
pub struct SyncDevice {
    info: DeviceInfo,
    file: DeviceFile,
    permits: Arc<Semaphore>,
}

impl SyncDevice {
    pub(crate) fn new(file: DeviceFile, info: DeviceInfo, queue_depth: u32) -> Self {
        Self {
            info,
            file,
            permits: Arc::new(Semaphore::new(queue_depth.max(1) as usize)),
        }
    }

    /// Runs `job` on the blocking pool under a queue-depth permit.
    async fn run<T, F>(&self, offset: u64, len: u64, job: F) -> Result<T, DeviceError>
    where
        T: Send + 'static,
        F: FnOnce(&DeviceFile) -> io::Result<T> + Send + 'static,
    {
        let closed = || DeviceError::Closed {
            path: self.info.path.clone(),
        };
        // The semaphore is never closed while `self` lives.
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| closed())?;
        let file = self.file.clone();
        let result = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job(&file)
        })
        .await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(DeviceError::io(&self.info.path, offset, len, source)),
            Err(join_error) if join_error.is_panic() => {
                std::panic::resume_unwind(join_error.into_panic())
            }
            // The runtime is shutting down.
            Err(_) => Err(closed()),
        }
    }
}

impl BlockDevice for SyncDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, AlignedBuf> {
        Box::pin(async move {
            check_range(&self.info, offset, len as u64)?;
            let mut buf = AlignedBuf::zeroed(len)?;
            if len == 0 {
                return Ok(buf);
            }
            self.run(offset, len as u64, move |file| {
                file.file.read_exact_at(&mut buf, offset)?;
                Ok(buf)
            })
            .await
        })
    }

    fn write_at(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, AlignedBuf> {
        Box::pin(async move {
            let len = buf.len() as u64;
            check_range(&self.info, offset, len)?;
            if len == 0 {
                return Ok(buf);
            }
            self.run(offset, len, move |file| {
                file.file.write_all_at(&buf, offset)?;
                Ok(buf)
            })
            .await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.run(0, 0, |file| file.file.sync_data()).await })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            check_range(&self.info, offset, len)?;
            if len == 0 {
                return Ok(());
            }
            self.run(offset, len, move |file| discard_blocking(file, offset, len))
                .await
        })
    }
}
