//! A deadline on every device operation.
//!
//! A disk that fails loudly returns EIO and the sled controller isolates it.
//! A disk that *hangs* (firmware stuck, a path lost below the block layer)
//! returns nothing at all, and without a deadline every append waiting on
//! it — and every group flush it shares — would wait forever. [`TimedDevice`]
//! wraps any engine and turns an operation that has not completed within
//! its deadline into [`DeviceError::TimedOut`], which
//! [`DeviceError::is_device_failure`] counts as a device failure: the
//! caller marks the device failed and the sled keeps serving its others.
//!
//! Safety of abandoning an operation: engines own the buffer and the file
//! descriptor of an in-flight operation until it completes (the io_uring
//! engine keeps them with the submission until its CQE arrives), so
//! dropping the waiting future only stops *waiting*; nothing is freed under
//! the kernel. A late completion is discarded. Since the device is marked
//! failed on the first timeout, nothing acknowledged depends on it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::{AlignedBuf, BlockDevice, DeviceError, DeviceInfo, IoFuture};

/// Default deadline of one device operation.
pub const DEFAULT_DEVICE_TIMEOUT: Duration = Duration::from_secs(30);

/// A [`BlockDevice`] whose operations fail with [`DeviceError::TimedOut`]
/// when the inner device does not complete them within `timeout`.
pub struct TimedDevice {
    inner: Arc<dyn BlockDevice>,
    timeout: Duration,
}

impl fmt::Debug for TimedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimedDevice")
            .field("inner", &self.inner)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl TimedDevice {
    /// Wraps `inner`; a zero `timeout` is refused (use the inner device).
    pub fn new(inner: Arc<dyn BlockDevice>, timeout: Duration) -> Result<Self, DeviceError> {
        if timeout.is_zero() {
            return Err(DeviceError::InvalidTimeout);
        }
        Ok(TimedDevice { inner, timeout })
    }

    /// The deadline of one operation.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn deadline<T>(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        future: IoFuture<'_, T>,
    ) -> Result<T, DeviceError> {
        match tokio::time::timeout(self.timeout, future).await {
            Ok(result) => result,
            Err(_) => Err(DeviceError::TimedOut {
                path: self.inner.info().path.clone(),
                op,
                offset,
                len,
                after: self.timeout,
            }),
        }
    }
}

impl BlockDevice for TimedDevice {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }

    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, AlignedBuf> {
        Box::pin(self.deadline("read", offset, len as u64, self.inner.read_at(offset, len)))
    }

    fn write_at(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, AlignedBuf> {
        let len = buf.len() as u64;
        Box::pin(self.deadline("write", offset, len, self.inner.write_at(offset, buf)))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.deadline("flush", 0, 0, self.inner.flush()))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.deadline("discard", offset, len, self.inner.discard(offset, len)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::device::{FaultyDevice, MemoryDevice, IO_ALIGN_BYTES};

    fn faulty() -> (Arc<FaultyDevice>, crate::device::FaultControl) {
        let inner: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(1 << 20));
        let faulty = Arc::new(FaultyDevice::new(inner));
        let control = faulty.control();
        (faulty, control)
    }

    #[tokio::test]
    async fn a_hung_operation_times_out_as_a_device_failure() {
        let (faulty, control) = faulty();
        let timed = TimedDevice::new(faulty, Duration::from_millis(50)).unwrap();
        // Fast enough: passes through.
        let mut buf = AlignedBuf::zeroed(IO_ALIGN_BYTES).unwrap();
        buf.fill(7);
        timed.write_at(0, buf).await.unwrap();
        assert_eq!(timed.read_at(0, IO_ALIGN_BYTES).await.unwrap()[0], 7);
        // A device that stops answering (for an hour): every kind of
        // operation times out. The outer 10 s bound only keeps a broken
        // deadline from hanging the test.
        control.set_latency(Duration::from_secs(3600));
        let error = tokio::time::timeout(Duration::from_secs(10), timed.read_at(0, IO_ALIGN_BYTES))
            .await
            .expect("the read waited for the hung device, not for its deadline")
            .unwrap_err();
        assert!(
            matches!(error, DeviceError::TimedOut { op: "read", .. }),
            "{error}"
        );
        assert!(error.is_device_failure());
        let error = timed.flush().await.unwrap_err();
        assert!(matches!(error, DeviceError::TimedOut { op: "flush", .. }));
        let error = timed
            .write_at(0, AlignedBuf::zeroed(IO_ALIGN_BYTES).unwrap())
            .await
            .unwrap_err();
        assert!(matches!(error, DeviceError::TimedOut { op: "write", .. }));
        // Argument errors are still argument errors.
        control.heal();
        assert!(matches!(
            timed.read_at(1, IO_ALIGN_BYTES).await.unwrap_err(),
            DeviceError::Unaligned { .. }
        ));
    }

    #[test]
    fn a_zero_timeout_is_refused() {
        let (faulty, _) = faulty();
        assert!(matches!(
            TimedDevice::new(faulty, Duration::ZERO),
            Err(DeviceError::InvalidTimeout)
        ));
    }
}
