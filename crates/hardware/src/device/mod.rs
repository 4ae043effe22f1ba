//! The `BlockDevice` seam.
//!
//! INTERFACE SKETCH — the hardware helper fills in the engines; the signatures
//! below are what the rest of the workspace codes against.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

/// Alignment and granularity of every device I/O (offsets, lengths, buffers).
pub const BLOCK_SIZE: usize = 4096;

/// A boxed I/O future, so that `dyn BlockDevice` works.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, DeviceError>> + Send + 'a>>;

/// Which engine serves a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Uring,
    Sync,
    Memory,
    Fault,
}

/// What a caller asks for; `Auto` tries io_uring and falls back to sync when
/// the kernel refuses it. `from_env` reads `RACKBLOCK_IO_ENGINE=uring|sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    #[default]
    Auto,
    Uring,
    Sync,
}

#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub path: PathBuf,
    pub size_bytes: u64,
    pub engine: EngineKind,
    /// Whether O_DIRECT is in effect.
    pub direct_io: bool,
}

#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub engine: EngineChoice,
    /// Try O_DIRECT, fall back to buffered I/O where the file system refuses it.
    pub direct: bool,
    /// Create a regular file of this size if the path does not exist.
    pub create_size_bytes: Option<u64>,
    /// Bound on submitted-but-not-completed operations (io_uring queue depth).
    pub queue_depth: u32,
}

/// A heap buffer aligned to `BLOCK_SIZE` whose length is a multiple of it.
pub struct AlignedBuf {/* filled by the helper */}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AlignedBuf")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("placeholder")]
    Placeholder,
}

/// Positional block I/O. Offsets and lengths are multiples of `BLOCK_SIZE`.
/// The in-flight operation owns its buffer until completion; writes hand the
/// buffer back so callers can reuse it.
pub trait BlockDevice: Send + Sync + fmt::Debug + 'static {
    fn info(&self) -> &DeviceInfo;
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, AlignedBuf>;
    fn write_at(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, AlignedBuf>;
    /// Makes every completed write durable (fdatasync).
    fn flush(&self) -> IoFuture<'_, ()>;
    /// Tells the device a range is unused (punch hole / BLKDISCARD); reads of it return zeros.
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;
}

pub fn open_device(
    _path: &std::path::Path,
    _options: &OpenOptions,
) -> Result<std::sync::Arc<dyn BlockDevice>, DeviceError> {
    unimplemented!("hardware helper")
}
