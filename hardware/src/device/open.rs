//! [`open_device`]: path + options -> the right engine, and the file-level
//! helpers both file engines share (O_DIRECT open with fallback, sizing,
//! discard).
//!
//! Engine selection: `Uring` builds a ring or fails; `Sync` never tries;
//! `Auto` builds a ring and falls back to sync when the kernel refuses
//! io_uring (EPERM from seccomp or `io_uring_disabled`, ENOSYS on kernels
//! without it, EOPNOTSUPP, ENOMEM from a low RLIMIT_MEMLOCK on pre-5.12
//! kernels) or lacks an opcode we use.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use super::sync::SyncDevice;
use super::uring::UringDevice;
use super::{
    AlignedBuf, BlockDevice, DeviceError, DeviceInfo, EngineChoice, EngineKind, OpenOptions,
    IO_ALIGN_BYTES,
};

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 127)`: zero a range of a block device (`[start, len]` in bytes).
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Opens (and optionally creates) a device file or block device.
///
/// * creates a regular file of `create_size_bytes` if the path is missing
///   (zero-filled when `zero_fill_on_create`, else sparse);
/// * opens with O_DIRECT when `options.direct`, retrying without it when the
///   file system refuses (EINVAL) and recording `direct_io: false`;
/// * sizes regular files by their length and block devices by
///   `BLKGETSIZE64`, rounded down to [`IO_ALIGN_BYTES`];
/// * picks the engine as described in the module docs.
pub fn open_device(
    path: &Path,
    options: &OpenOptions,
) -> Result<Arc<dyn BlockDevice>, DeviceError> {
    let open_error = |source: io::Error| DeviceError::Open {
        path: path.to_path_buf(),
        source,
    };
    if let Some(size_bytes) = options.create_size_bytes {
        create_if_missing(path, size_bytes, options.zero_fill_on_create).map_err(open_error)?;
    }
    let (file, direct_io) = open_file(path, options.direct).map_err(open_error)?;
    let metadata = file.metadata().map_err(open_error)?;
    let is_block_device = metadata.file_type().is_block_device();
    let raw_size = if is_block_device {
        block_device_size(&file).map_err(open_error)?
    } else {
        metadata.len()
    };
    let size_bytes = raw_size - raw_size % IO_ALIGN_BYTES as u64;
    if size_bytes == 0 {
        return Err(DeviceError::TooSmall {
            path: path.to_path_buf(),
            size_bytes: raw_size,
            needed_bytes: IO_ALIGN_BYTES as u64,
        });
    }
    let queue_depth = options.queue_depth.clamp(1, 4096);
    let file = DeviceFile {
        file: Arc::new(file),
        is_block_device,
    };
    let mut info = DeviceInfo {
        path: path.to_path_buf(),
        size_bytes,
        engine: EngineKind::Sync,
        direct_io,
    };
    match options.engine {
        EngineChoice::Sync => Ok(Arc::new(SyncDevice::new(file, info, queue_depth))),
        EngineChoice::Uring => {
            info.engine = EngineKind::Uring;
            let device = UringDevice::new(file, info, queue_depth).map_err(open_error)?;
            Ok(Arc::new(device))
        }
        EngineChoice::Auto => {
            info.engine = EngineKind::Uring;
            match UringDevice::new(file.clone(), info.clone(), queue_depth) {
                Ok(device) => Ok(Arc::new(device)),
                Err(error) if uring_refused(&error) => {
                    tracing::warn!(
                        path = %path.display(),
                        %error,
                        "io_uring unavailable, using the pread/pwrite engine"
                    );
                    info.engine = EngineKind::Sync;
                    Ok(Arc::new(SyncDevice::new(file, info, queue_depth)))
                }
                Err(error) => Err(open_error(error)),
            }
        }
    }
}

/// Whether an io_uring setup error means "this kernel/sandbox does not let
/// us use io_uring" (fall back) rather than a real problem (report).
fn uring_refused(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EPERM | libc::ENOSYS | libc::EOPNOTSUPP | libc::ENOMEM | libc::EACCES)
    ) || error.kind() == io::ErrorKind::Unsupported
}

/// An open device file shared by the engine and its in-flight operations.
#[derive(Debug, Clone)]
pub(crate) struct DeviceFile {
    pub(crate) file: Arc<File>,
    pub(crate) is_block_device: bool,
}

/// Sized first, then (optionally) written with zeros: a crash halfway
/// leaves a file of the right size with a sparse tail, which only costs
/// speed.
fn create_if_missing(path: &Path, size_bytes: u64, zero_fill: bool) -> io::Result<()> {
    match File::options().write(true).create_new(true).open(path) {
        Ok(file) => {
            file.set_len(size_bytes)?;
            if zero_fill {
                let zeros = vec![0u8; 1 << 20];
                let mut at = 0;
                while at < size_bytes {
                    let len = (size_bytes - at).min(zeros.len() as u64) as usize;
                    file.write_all_at(&zeros[..len], at)?;
                    at += len as u64;
                }
            }
            file.sync_all()
        }
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(error),
    }
}

fn open_file(path: &Path, direct: bool) -> io::Result<(File, bool)> {
    let mut options = File::options();
    options.read(true).write(true);
    if direct {
        let mut direct_options = options.clone();
        direct_options.custom_flags(libc::O_DIRECT);
        match direct_options.open(path) {
            Ok(file) => return Ok((file, true)),
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(
                    path = %path.display(),
                    "O_DIRECT refused by the file system, using buffered I/O"
                );
            }
            Err(error) => return Err(error),
        }
    }
    Ok((options.open(path)?, false))
}

pub(crate) fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size_bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to
    // a live, properly aligned u64 on our stack; the fd is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size_bytes) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size_bytes)
}

/// Errno values meaning "this file (system) cannot punch holes".
pub(crate) fn punch_unsupported(errno: i32) -> bool {
    matches!(
        errno,
        libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV
    )
}

/// Blocking discard with the "reads return zeros" guarantee:
/// fallocate(PUNCH_HOLE | KEEP_SIZE) (works on regular files and, since
/// Linux 4.9, block devices), else [`zero_fill`]. BLKDISCARD is not used: it
/// does not promise that later reads return zeros.
pub(crate) fn discard_blocking(file: &DeviceFile, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: plain syscall on an open fd; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(errno) if punch_unsupported(errno) => zero_fill(file, offset, len),
        _ => Err(error),
    }
}

/// Makes `[offset, offset + len)` read as zeros without punching holes:
/// BLKZEROOUT on block devices, else writing zero blocks.
pub(crate) fn zero_fill(file: &DeviceFile, offset: u64, len: u64) -> io::Result<()> {
    if file.is_block_device {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKZEROOUT reads two u64s from the pointer, which points to
        // a live array on our stack; the fd is open.
        let rc = unsafe { libc::ioctl(file.file.as_raw_fd(), BLKZEROOUT as _, &range) };
        if rc == 0 {
            return Ok(());
        }
    }
    const CHUNK_BYTES: u64 = 1 << 20;
    let zeros = AlignedBuf::zeroed(CHUNK_BYTES as usize).map_err(io::Error::other)?;
    let mut done = 0u64;
    while done < len {
        let chunk = (len - done).min(CHUNK_BYTES) as usize;
        file.file.write_all_at(&zeros[..chunk], offset + done)?;
        done += chunk as u64;
    }
    Ok(())
}
