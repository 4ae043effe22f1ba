//! Fault-injecting [`BlockDevice`] wrapper for tests.
//!
//! [`FaultyDevice`] forwards every operation to an inner device after
//! consulting the shared state behind its [`FaultControl`] handle. A test
//! keeps the (cloneable) control and arms faults while the system under test
//! uses the device:
//!
//! * EIO on chosen byte ranges, for reads, writes (discards count as writes)
//!   or both — [`FaultControl::fail_range`];
//! * extra latency before every operation — [`FaultControl::set_latency`];
//! * silent corruption: a chosen bit at a chosen byte flipped in every
//!   subsequent read covering it (the medium is untouched) —
//!   [`FaultControl::flip_bit`];
//! * a torn write: only the first N blocks of the next write reach the inner
//!   device, then it fails with EIO — [`FaultControl::tear_next_write`];
//! * whole-device failure: every operation returns
//!   [`DeviceError::Failed`] — [`FaultControl::fail_device`];
//! * [`FaultControl::heal`] clears everything.
//!
//! Faults are decided under a short mutex before the inner operation starts;
//! the lock is never held across an `.await`.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{
    check_range, AlignedBuf, BlockDevice, DeviceError, DeviceInfo, EngineKind, IoFuture,
    IO_ALIGN_BYTES,
};

/// Which operations a fault range applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOps {
    /// Reads only.
    Reads,
    /// Writes and discards only.
    Writes,
    /// Everything that touches the range.
    ReadsAndWrites,
}

impl FaultOps {
    fn covers_reads(self) -> bool {
        matches!(self, FaultOps::Reads | FaultOps::ReadsAndWrites)
    }

    fn covers_writes(self) -> bool {
        matches!(self, FaultOps::Writes | FaultOps::ReadsAndWrites)
    }
}

#[derive(Debug, Clone, Copy)]
struct FaultRange {
    start: u64,
    end: u64,
    ops: FaultOps,
}

#[derive(Debug, Clone, Copy)]
struct BitFlip {
    offset: u64,
    bit: u8,
}

#[derive(Debug, Default)]
struct FaultState {
    failed: bool,
    latency: Duration,
    ranges: Vec<FaultRange>,
    bit_flips: Vec<BitFlip>,
    /// Blocks of the next write that reach the inner device before it fails.
    torn_next_write_blocks: Option<u64>,
}

impl FaultState {
    fn range_fault(&self, offset: u64, len: u64, write: bool) -> bool {
        let end = offset.saturating_add(len);
        self.ranges.iter().any(|range| {
            let applies = if write {
                range.ops.covers_writes()
            } else {
                range.ops.covers_reads()
            };
            applies && range.start < end && offset < range.end
        })
    }
}

/// Cloneable handle that arms and clears the faults of one [`FaultyDevice`].
#[derive(Debug, Clone, Default)]
pub struct FaultControl {
    state: Arc<Mutex<FaultState>>,
}

impl FaultControl {
    fn lock(&self) -> MutexGuard<'_, FaultState> {
        // The state is plain data, always consistent between statements.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes operations overlapping `[offset, offset + len)` fail with EIO.
    pub fn fail_range(&self, offset: u64, len: u64, ops: FaultOps) {
        self.lock().ranges.push(FaultRange {
            start: offset,
            end: offset.saturating_add(len),
            ops,
        });
    }

    /// Delays every operation (including flush) by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Flips bit `bit` (0..8, taken modulo 8) of the byte at `offset` in every
    /// subsequent read that covers it. The stored data is not changed.
    pub fn flip_bit(&self, offset: u64, bit: u8) {
        self.lock().bit_flips.push(BitFlip {
            offset,
            bit: bit % 8,
        });
    }

    /// The next write (only) persists its first `blocks_written` blocks, then
    /// fails with EIO.
    pub fn tear_next_write(&self, blocks_written: u64) {
        self.lock().torn_next_write_blocks = Some(blocks_written);
    }

    /// Every operation fails with [`DeviceError::Failed`] until [`heal`](Self::heal).
    pub fn fail_device(&self) {
        self.lock().failed = true;
    }

    /// Whether [`fail_device`](Self::fail_device) is in effect.
    pub fn is_failed(&self) -> bool {
        self.lock().failed
    }

    /// Clears every armed fault and the latency.
    pub fn heal(&self) {
        *self.lock() = FaultState::default();
    }
}

/// A fault mode named by a control file ([`FaultControl::follow_file`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFault {
    /// Every write (and flush, discard) of the device fails with EIO.
    Eio,
    /// Every operation is delayed by an hour: a `TimedDevice` deadline
    /// above turns it into a failure.
    Hang,
    /// No fault.
    Healthy,
}

impl FileFault {
    /// The mode a control file's text names (surrounding white space
    /// ignored): `eio`, `hang`, anything else (an empty file) healthy.
    pub fn parse(text: &str) -> FileFault {
        match text.trim() {
            "eio" => FileFault::Eio,
            "hang" => FileFault::Hang,
            _ => FileFault::Healthy,
        }
    }
}

/// How often [`FaultControl::follow_file`] reads its file.
pub const FOLLOW_FILE_INTERVAL: Duration = Duration::from_millis(100);

impl FaultControl {
    /// Arms `fault` on a device of `size_bytes` (after clearing every fault).
    pub fn apply(&self, fault: FileFault, size_bytes: u64) {
        self.heal();
        match fault {
            FileFault::Eio => self.fail_range(0, size_bytes, FaultOps::Writes),
            FileFault::Hang => self.set_latency(Duration::from_secs(3600)),
            FileFault::Healthy => {}
        }
    }

    /// End-to-end tests drive a process's devices through a file: a
    /// thread reads `file` every [`FOLLOW_FILE_INTERVAL`] and applies the
    /// [`FileFault`] its text names whenever it changes (a missing file is
    /// healthy). The thread lives as long as the process.
    pub fn follow_file(&self, file: std::path::PathBuf, size_bytes: u64) {
        let control = self.clone();
        std::thread::spawn(move || {
            let mut applied = FileFault::Healthy;
            loop {
                std::thread::sleep(FOLLOW_FILE_INTERVAL);
                let wanted = FileFault::parse(&std::fs::read_to_string(&file).unwrap_or_default());
                if wanted != applied {
                    control.apply(wanted, size_bytes);
                    applied = wanted;
                }
            }
        });
    }
}

/// A device that injects the faults armed through its [`FaultControl`].
#[derive(Debug)]
pub struct FaultyDevice {
    inner: Arc<dyn BlockDevice>,
    info: DeviceInfo,
    control: FaultControl,
}

impl FaultyDevice {
    /// Wraps `inner`; no fault is armed.
    pub fn new(inner: Arc<dyn BlockDevice>) -> Self {
        let info = DeviceInfo {
            engine: EngineKind::Fault,
            ..inner.info().clone()
        };
        Self {
            inner,
            info,
            control: FaultControl::default(),
        }
    }

    /// A handle to arm faults on this device.
    pub fn control(&self) -> FaultControl {
        self.control.clone()
    }

    /// The wrapped device.
    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }

    fn eio(&self, offset: u64, len: u64) -> DeviceError {
        DeviceError::io(
            &self.info.path,
            offset,
            len,
            io::Error::from_raw_os_error(libc::EIO),
        )
    }

    fn failed(&self) -> DeviceError {
        DeviceError::Failed {
            path: self.info.path.clone(),
        }
    }

    /// Waits the armed latency, then checks whole-device failure.
    async fn before_op(&self) -> Result<(), DeviceError> {
        let latency = self.control.lock().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if self.control.is_failed() {
            return Err(self.failed());
        }
        Ok(())
    }
}

impl BlockDevice for FaultyDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, AlignedBuf> {
        Box::pin(async move {
            check_range(&self.info, offset, len as u64)?;
            self.before_op().await?;
            if self.control.lock().range_fault(offset, len as u64, false) {
                return Err(self.eio(offset, len as u64));
            }
            let mut buf = self.inner.read_at(offset, len).await?;
            let flips = self.control.lock().bit_flips.clone();
            for flip in flips {
                if flip.offset >= offset && flip.offset - offset < len as u64 {
                    buf[(flip.offset - offset) as usize] ^= 1 << flip.bit;
                }
            }
            Ok(buf)
        })
    }

    fn write_at(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, AlignedBuf> {
        Box::pin(async move {
            let len = buf.len() as u64;
            check_range(&self.info, offset, len)?;
            self.before_op().await?;
            let torn = {
                let mut state = self.control.lock();
                if state.range_fault(offset, len, true) {
                    return Err(self.eio(offset, len));
                }
                state.torn_next_write_blocks.take()
            };
            if let Some(blocks) = torn {
                let kept = (blocks.saturating_mul(IO_ALIGN_BYTES as u64)).min(len) as usize;
                if kept > 0 {
                    let prefix = AlignedBuf::from_slice(&buf[..kept])?;
                    self.inner.write_at(offset, prefix).await?;
                }
                return Err(self.eio(offset, len));
            }
            self.inner.write_at(offset, buf).await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.before_op().await?;
            self.inner.flush().await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            check_range(&self.info, offset, len)?;
            self.before_op().await?;
            if self.control.lock().range_fault(offset, len, true) {
                return Err(self.eio(offset, len));
            }
            self.inner.discard(offset, len).await
        })
    }
}
