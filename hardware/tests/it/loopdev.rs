//! The conformance suite on real block devices: Linux loop devices
//! (`losetup`) over files, opened through `/dev/loopN` by the io_uring and
//! the pread/pwrite engines. This is the path real sleds take
//! (`BLKGETSIZE64` for the size, `BLKDISCARD`/`BLKZEROOUT` for discards,
//! O_DIRECT on a block device), which file-backed tests never reach.
//!
//! Needs root and the loop driver: CI runs as root. Without either the
//! suite is skipped with a message, unless `RACKBLOCK_REQUIRE_LOOP=1`;
//! with both, any failure to attach fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use hardware::{
    open_device, AlignedBuf, BlockDevice, DeviceInfo, EngineChoice, EngineKind, IoFuture,
    OpenOptions,
};

use crate::conformance::Factory;
use crate::conformance_suite;

/// A device opened on a loop device; detaches it (after closing) on drop.
#[derive(Debug)]
struct LoopBacked {
    inner: Option<Arc<dyn BlockDevice>>,
    loop_path: PathBuf,
}

impl LoopBacked {
    fn inner(&self) -> &Arc<dyn BlockDevice> {
        self.inner.as_ref().expect("present until drop")
    }
}

impl Drop for LoopBacked {
    fn drop(&mut self) {
        // Close our descriptor first (the engine's ring thread may keep it a
        // moment longer; the kernel then detaches on last close).
        drop(self.inner.take());
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.loop_path)
            .status();
    }
}

impl BlockDevice for LoopBacked {
    fn info(&self) -> &DeviceInfo {
        self.inner().info()
    }
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, AlignedBuf> {
        self.inner().read_at(offset, len)
    }
    fn write_at(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, AlignedBuf> {
        self.inner().write_at(offset, buf)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.inner().flush()
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.inner().discard(offset, len)
    }
}

fn loop_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let driver = Path::new("/dev/loop-control").exists();
    if root && driver {
        return true;
    }
    assert!(
        std::env::var("RACKBLOCK_REQUIRE_LOOP").as_deref() != Ok("1"),
        "loop devices unavailable (root: {root}, /dev/loop-control: {driver}) and RACKBLOCK_REQUIRE_LOOP=1"
    );
    eprintln!(
        "loop devices unavailable (root: {root}, /dev/loop-control: {driver}): block-device suite skipped"
    );
    false
}

/// Backing file `dir/backing.img` (created at `size_bytes` if missing, so
/// a reopen sees the same data) attached to a free loop device.
fn attach(dir: &Path, size_bytes: u64) -> PathBuf {
    let backing = dir.join("backing.img");
    if !backing.exists() {
        let file = std::fs::File::create(&backing).unwrap();
        file.set_len(size_bytes).unwrap();
    }
    let output = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
        .expect("losetup runs");
    assert!(
        output.status.success(),
        "losetup --find --show {}: {}",
        backing.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

fn open_loop(engine: EngineChoice, dir: &Path, size_bytes: u64) -> Option<Arc<dyn BlockDevice>> {
    if !loop_available() {
        return None;
    }
    let loop_path = attach(dir, size_bytes);
    let options = OpenOptions {
        engine,
        direct: true,
        create_size_bytes: None,
        queue_depth: 16,
        zero_fill_on_create: false,
    };
    let inner = match open_device(&loop_path, &options) {
        Ok(device) => device,
        Err(error) => {
            let _ = Command::new("losetup").arg("-d").arg(&loop_path).status();
            panic!("open {}: {error}", loop_path.display());
        }
    };
    // The size came from BLKGETSIZE64, not from a file length.
    assert_eq!(inner.info().size_bytes, size_bytes);
    assert!(inner.info().direct_io, "O_DIRECT on a block device");
    Some(Arc::new(LoopBacked {
        inner: Some(inner),
        loop_path,
    }))
}

fn uring(dir: &Path, size_bytes: u64) -> Option<Arc<dyn BlockDevice>> {
    open_loop(EngineChoice::Uring, dir, size_bytes)
}

fn sync(dir: &Path, size_bytes: u64) -> Option<Arc<dyn BlockDevice>> {
    open_loop(EngineChoice::Sync, dir, size_bytes)
}

pub const LOOP_URING: Factory = Factory {
    make: uring,
    persistent: true,
    kind: EngineKind::Uring,
};

pub const LOOP_SYNC: Factory = Factory {
    make: sync,
    persistent: true,
    kind: EngineKind::Sync,
};

conformance_suite!(loop_uring, crate::loopdev::LOOP_URING);
conformance_suite!(loop_sync, crate::loopdev::LOOP_SYNC);
