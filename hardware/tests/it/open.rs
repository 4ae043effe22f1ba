//! `open_device`: creation, sizing, O_DIRECT, engine selection, errors, and
//! the io_uring engine's thread lifecycle.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hardware::{
    open_device, DeviceError, EngineChoice, EngineKind, OpenOptions, ENGINE_ENV_VAR, IO_ALIGN_BYTES,
};

use crate::conformance::pattern;
use crate::engines::options;

fn uring_allowed_missing() -> bool {
    std::env::var("RACKBLOCK_ALLOW_NO_URING").as_deref() == Ok("1")
}

#[tokio::test]
async fn zero_fill_on_create_allocates_every_block_and_reads_zeros() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let sparse = dir.path().join("sparse.img");
    let filled = dir.path().join("filled.img");
    drop(open_device(&sparse, &options(EngineChoice::Sync, size)).unwrap());
    let zeroed = OpenOptions {
        zero_fill_on_create: true,
        ..options(EngineChoice::Sync, size)
    };
    let device = open_device(&filled, &zeroed).unwrap();
    assert_eq!(device.info().size_bytes, size);
    let data = device.read_at(size - 8192, 8192).await.unwrap();
    assert!(data.iter().all(|b| *b == 0));
    // st_blocks counts 512-byte units actually allocated.
    let allocated = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
    assert!(
        allocated(&filled) >= size,
        "{} of {size}",
        allocated(&filled)
    );
    assert!(allocated(&sparse) < size / 2, "the default stays sparse");
}

#[tokio::test]
async fn write_durable_at_writes_like_write_at_on_every_engine() {
    let dir = tempfile::tempdir().unwrap();
    for (name, engine) in [("sync", EngineChoice::Sync), ("uring", EngineChoice::Uring)] {
        let path = dir.path().join(format!("{name}.img"));
        let device = match open_device(&path, &options(engine, 1 << 20)) {
            Ok(device) => device,
            Err(error) if name == "uring" && uring_allowed_missing() => {
                eprintln!("io_uring unavailable: {error}");
                continue;
            }
            Err(error) => panic!("{name}: {error}"),
        };
        let data = pattern(7, 3).to_vec();
        let back = device
            .write_durable_at(4 * IO_ALIGN_BYTES as u64, pattern(7, 3))
            .await
            .unwrap();
        assert_eq!(back.len(), data.len(), "{name}: buffer handed back");
        let read = device
            .read_at(4 * IO_ALIGN_BYTES as u64, data.len())
            .await
            .unwrap();
        assert_eq!(&read[..], &data[..], "{name}");
        // Out of range is refused like any write.
        let buf = hardware::AlignedBuf::zeroed(IO_ALIGN_BYTES).unwrap();
        assert!(
            device.write_durable_at(1 << 20, buf).await.is_err(),
            "{name}"
        );
    }
}

#[tokio::test]
async fn creates_sizes_and_uses_direct_io() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.img");
    // Unaligned sizes are rounded down to whole blocks.
    let device = open_device(&path, &options(EngineChoice::Sync, 1 << 20 | 100)).unwrap();
    assert_eq!(device.info().size_bytes, 1 << 20);
    assert_eq!(device.info().path, path);
    // ext4/xfs support O_DIRECT; tmpfs on old kernels does not.
    if !is_tmpfs(dir.path()) {
        assert!(device.info().direct_io);
    }
    drop(device);
    // An existing file is opened as is, not resized.
    let device = open_device(&path, &options(EngineChoice::Sync, 8 << 20)).unwrap();
    assert_eq!(device.info().size_bytes, 1 << 20);
    let buffered = OpenOptions {
        direct: false,
        ..options(EngineChoice::Sync, 0)
    };
    assert!(!open_device(&path, &buffered).unwrap().info().direct_io);
}

fn is_tmpfs(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let mut best: Option<(usize, bool)> = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() > 2 && path.starts_with(fields[1]) {
            let len = fields[1].len();
            if best.is_none_or(|(best_len, _)| len >= best_len) {
                best = Some((len, fields[2] == "tmpfs"));
            }
        }
    }
    best.is_some_and(|(_, tmpfs)| tmpfs)
}

#[tokio::test]
async fn auto_prefers_uring() {
    let dir = tempfile::tempdir().unwrap();
    let device = open_device(
        &dir.path().join("a.img"),
        &options(EngineChoice::Auto, 1 << 20),
    )
    .unwrap();
    if !uring_allowed_missing() {
        assert_eq!(device.info().engine, EngineKind::Uring);
    }
    device.write_at(0, pattern(1, 1)).await.unwrap();
    assert_eq!(
        device.read_at(0, IO_ALIGN_BYTES).await.unwrap(),
        pattern(1, 1)
    );
}

#[test]
fn missing_file_without_create_is_an_open_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.img");
    let options = OpenOptions::default();
    match open_device(&path, &options) {
        Err(DeviceError::Open {
            path: reported,
            source,
        }) => {
            assert_eq!(reported, path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Open error, got {other:?}"),
    }
}

#[test]
fn too_small_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.img");
    std::fs::write(&path, [0u8; 100]).unwrap();
    assert!(matches!(
        open_device(&path, &OpenOptions::default()),
        Err(DeviceError::TooSmall {
            size_bytes: 100,
            needed_bytes: 4096,
            ..
        })
    ));
}

#[test]
fn engine_from_env() {
    // The only test touching this variable.
    std::env::set_var(ENGINE_ENV_VAR, "sync");
    assert_eq!(EngineChoice::from_env().unwrap(), EngineChoice::Sync);
    std::env::set_var(ENGINE_ENV_VAR, "uring");
    assert_eq!(EngineChoice::from_env().unwrap(), EngineChoice::Uring);
    std::env::set_var(ENGINE_ENV_VAR, "nvme-of");
    assert!(matches!(
        EngineChoice::from_env(),
        Err(DeviceError::InvalidEngine { value }) if value == "nvme-of"
    ));
    std::env::remove_var(ENGINE_ENV_VAR);
    assert_eq!(EngineChoice::from_env().unwrap(), EngineChoice::Auto);
}

/// Queue depth 1: hundreds of concurrent callers funnel through one slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_queue_depth_one() {
    let dir = tempfile::tempdir().unwrap();
    let options = OpenOptions {
        queue_depth: 1,
        ..options(EngineChoice::Uring, 1 << 20)
    };
    let Ok(device) = open_device(&dir.path().join("q1.img"), &options) else {
        assert!(uring_allowed_missing(), "io_uring unavailable");
        return;
    };
    let tasks: Vec<_> = (0..200u64)
        .map(|task| {
            let device = Arc::clone(&device);
            tokio::spawn(async move {
                let offset = (task % 256) * IO_ALIGN_BYTES as u64;
                device.write_at(offset, pattern(task, 1)).await.unwrap();
                assert_eq!(
                    device.read_at(offset, IO_ALIGN_BYTES).await.unwrap(),
                    pattern(task, 1)
                );
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// Threads of this process, not counting the kernel's io_uring workers
/// (`iou-wrk-*`, which the kernel adds for operations it cannot run inline).
fn thread_count() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .map(|comm| !comm.starts_with("iou-"))
                .unwrap_or(false)
        })
        .count()
}

/// No ring thread: the runtime's threads drive the rings. Operations whose
/// futures are dropped in flight keep their buffers until their completion
/// and then free their slots: more abandoned operations than a ring has
/// slots leave the device fully usable.
///
/// Threads are counted per process, and the other tests of this binary
/// start and end threads of their own meanwhile: so the check runs alone,
/// in a child process of this test binary (the ignored test below).
#[test]
fn uring_runs_inline_and_abandoned_operations_free_their_slots() {
    let exe = std::env::current_exe().unwrap();
    let output = std::process::Command::new(exe)
        .args([
            "--exact",
            "--ignored",
            "--test-threads=1",
            "--nocapture",
            "open::uring_inline_alone",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("1 passed"),
        "the child ran no test: {stdout}"
    );
}

/// The body of the test above, alone in its process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run alone, as a child process, by uring_runs_inline_and_abandoned_operations_free_their_slots"]
async fn uring_inline_alone() {
    let dir = tempfile::tempdir().unwrap();
    // Warm the runtime's threads (and this thread's ring) first.
    let Ok(warm) = open_device(
        &dir.path().join("warm"),
        &options(EngineChoice::Uring, 1 << 20),
    ) else {
        assert!(uring_allowed_missing(), "io_uring unavailable");
        return;
    };
    warm.read_at(0, IO_ALIGN_BYTES).await.unwrap();
    let before = thread_count();
    let device = open_device(
        &dir.path().join("lifecycle"),
        &options(EngineChoice::Uring, 1 << 20),
    )
    .unwrap();
    for _ in 0..300 {
        let read = device.read_at(0, 64 * IO_ALIGN_BYTES);
        let _ = tokio::time::timeout(Duration::from_micros(1), read).await;
    }
    let mut buf = hardware::AlignedBuf::zeroed(IO_ALIGN_BYTES).unwrap();
    buf.fill(0x5a);
    device
        .write_durable_at(8 * IO_ALIGN_BYTES as u64, buf)
        .await
        .unwrap();
    let read = device
        .read_at(8 * IO_ALIGN_BYTES as u64, IO_ALIGN_BYTES)
        .await
        .unwrap();
    assert!(read.iter().all(|&byte| byte == 0x5a));
    assert_eq!(
        thread_count(),
        before,
        "opening an io_uring device started a thread"
    );
    drop(device);
}
