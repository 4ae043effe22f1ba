//! The write log over every engine: memory, io_uring and pread/pwrite files,
//! and the fault-injecting wrapper.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hardware::{
    AlignedBuf, BlockDevice, DeviceInfo, EngineChoice, FaultOps, FaultyDevice, IoFuture,
    MemoryDevice, OpenOptions, SharedDevice,
};
use head_node::wal::{LogPosition, LogRecord, RecordKind, ScanStop, Wal, WalError, WalOptions};
use proto::sled::PartitionId;

const B: usize = proto::BLOCK_SIZE_BYTES as usize;
const RING: u64 = 8192;

fn part() -> PartitionId {
    PartitionId {
        volume: 3,
        index: 1,
    }
}

/// A write of `blocks` blocks whose bytes are derived from `seq`.
fn write(seq: u64, blocks: usize) -> LogRecord {
    let data: Vec<u8> = (0..blocks * B)
        .map(|i| (seq as usize * 31 + i / 7) as u8)
        .collect();
    LogRecord::write(part(), 1, seq, seq * 8, Bytes::from(data))
}

fn options(capacity_bytes: u64) -> WalOptions {
    WalOptions {
        capacity_bytes: Some(capacity_bytes),
        ..WalOptions::default()
    }
}

/// Counts flushes and writes of the device below.
#[derive(Debug)]
struct Counting {
    inner: SharedDevice,
    flushes: AtomicU64,
    writes: AtomicU64,
    flush_delay: Duration,
}

impl Counting {
    fn new(inner: SharedDevice, flush_delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner,
            flushes: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            flush_delay,
        })
    }
}

impl BlockDevice for Counting {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, AlignedBuf> {
        self.inner.read_at(offset, len)
    }
    fn write_at(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, AlignedBuf> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            tokio::time::sleep(self.flush_delay).await;
            self.flushes.fetch_add(1, Ordering::SeqCst);
            self.inner.flush().await
        })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.inner.discard(offset, len)
    }
}

#[derive(Debug, Clone, Copy)]
enum Engine {
    Memory,
    Uring,
    Sync,
}

/// Opens "the same device" again: the same memory device, or the file anew.
struct Disk {
    engine: Engine,
    memory: Option<SharedDevice>,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    size: u64,
}

impl Disk {
    fn new(engine: Engine, size: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.img");
        let memory = match engine {
            Engine::Memory => Some(Arc::new(MemoryDevice::new(size)) as SharedDevice),
            _ => None,
        };
        Self {
            engine,
            memory,
            _dir: dir,
            path,
            size,
        }
    }

    fn device(&self) -> SharedDevice {
        let choice = match self.engine {
            Engine::Memory => return self.memory.clone().unwrap(),
            Engine::Uring => EngineChoice::Uring,
            Engine::Sync => EngineChoice::Sync,
        };
        file_device(&self.path, choice, self.size)
    }
}

fn file_device(path: &Path, engine: EngineChoice, size: u64) -> SharedDevice {
    let options = OpenOptions {
        engine,
        direct: true,
        create_size_bytes: Some(size),
        zero_fill_on_create: true,
        queue_depth: 32,
    };
    hardware::open_device(path, &options).unwrap()
}

async fn open(device: SharedDevice, capacity: u64) -> (Wal, Vec<(LogPosition, LogRecord)>) {
    let (wal, recovered) = Wal::open(device, options(capacity)).await.unwrap();
    let recovered = recovered
        .into_iter()
        .map(|r| (r.position, r.record))
        .collect();
    (wal, recovered)
}

// ---------------------------------------------------------------- per engine

async fn round_trip_and_recovery(engine: Engine) {
    let disk = Disk::new(engine, 2 << 20);
    let (wal, recovered) = open(disk.device(), 1 << 20).await;
    assert!(recovered.is_empty());
    let mut acked = Vec::new();
    for seq in 1..=5u64 {
        let record = write(seq, 1 + seq as usize % 3);
        let position = wal.append_one(record.clone()).await.unwrap();
        acked.push((position, record));
    }
    let trim = LogRecord::trim(part(), 1, 6, 100, 9);
    let commit = LogRecord {
        kind: RecordKind::FlushCommit,
        payload: Bytes::from_static(b"extent 7, columns 0..6"),
        block_count: 0,
        ..LogRecord::trim(part(), 1, 7, 0, 1)
    };
    let positions = wal
        .append(vec![trim.clone(), commit.clone()])
        .await
        .unwrap();
    acked.push((positions[0], trim));
    acked.push((positions[1], commit));
    // Reads of every record, whole or by block.
    for (position, record) in &acked {
        assert_eq!(&wal.read(*position).await.unwrap(), record);
    }
    let (position, record) = &acked[1];
    let block = wal.read_blocks(*position, 1, 1).await.unwrap();
    assert_eq!(&block[..], &record.payload[B..2 * B]);
    assert!(matches!(
        wal.read_blocks(*position, 3, 1).await,
        Err(WalError::NotFound { .. })
    ));
    assert!(matches!(
        wal.read(LogPosition(acked[0].0 .0 + B as u64)).await,
        Err(WalError::NotFound { .. })
    ));
    let stats = wal.stats();
    assert_eq!(stats.appended_records, 7);
    assert_eq!(stats.durable, stats.head);
    drop(wal);
    let (wal, recovered) = open(disk.device(), 1 << 20).await;
    assert_eq!(recovered, acked);
    assert!(matches!(wal.recovery_stop(), ScanStop::Blank { .. }));
    // Appends continue after the recovered records.
    let position = wal.append_one(write(8, 1)).await.unwrap();
    assert_eq!(position.0, wal.stats().head - 2 * B as u64);
    drop(wal);
    let (_, recovered) = open(disk.device(), 1 << 20).await;
    assert_eq!(recovered.len(), acked.len() + 1);
}

/// Many laps through a small ring with releases; every reopen recovers
/// exactly the live records, never a stale one of an earlier lap.
async fn wrap_around_with_release(engine: Engine) {
    let capacity = 24 * B as u64;
    let disk = Disk::new(engine, RING + capacity);
    let (mut wal, _) = open(disk.device(), capacity).await;
    let mut live: Vec<(LogPosition, LogRecord)> = Vec::new();
    let mut seq = 0;
    for round in 0..60u64 {
        seq += 1;
        let record = write(seq, 1 + (round % 4) as usize);
        let position = loop {
            match wal.append_one(record.clone()).await {
                Ok(position) => break position,
                Err(WalError::LogFull { .. }) => {
                    // Release the older half.
                    let keep = live.split_off(live.len() / 2);
                    let up_to = keep.first().map_or(wal.head(), |(p, _)| *p);
                    wal.release(up_to).await.unwrap();
                    live = keep;
                }
                Err(e) => panic!("append: {e}"),
            }
        };
        live.push((position, record));
        if round % 9 == 0 {
            drop(wal);
            let (reopened, recovered) = open(disk.device(), capacity).await;
            assert_eq!(recovered, live, "round {round}");
            wal = reopened;
        }
    }
    assert!(
        wal.stats().head > 3 * capacity,
        "only {} bytes",
        wal.stats().head
    );
}

async fn corrupt_file_tail_is_cut(engine: Engine) {
    let disk = Disk::new(engine, 1 << 20);
    let (wal, _) = open(disk.device(), 512 << 10).await;
    let a = wal.append_one(write(1, 2)).await.unwrap();
    let b = wal.append_one(write(2, 2)).await.unwrap();
    drop(wal);
    // Flip one byte in the payload of the last record, on the medium.
    let device = disk.device();
    let offset = RING + b.0 + B as u64;
    let mut block = device.read_at(offset, B).await.unwrap();
    block[100] ^= 0xff;
    device.write_at(offset, block).await.unwrap();
    device.flush().await.unwrap();
    drop(device);
    let (wal, recovered) = open(disk.device(), 512 << 10).await;
    assert_eq!(recovered, vec![(a, write(1, 2))]);
    assert!(matches!(wal.recovery_stop(), ScanStop::Cut { position, .. } if *position == b.0));
    // The next write overwrites the cut record.
    let c = wal.append_one(write(3, 1)).await.unwrap();
    assert_eq!(c, b);
    drop(wal);
    let (_, recovered) = open(disk.device(), 512 << 10).await;
    assert_eq!(recovered, vec![(a, write(1, 2)), (c, write(3, 1))]);
}

macro_rules! per_engine {
    ($($name:ident),*) => {
        mod memory { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Engine::Memory).await } )* }
        mod uring { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Engine::Uring).await } )* }
        mod sync { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Engine::Sync).await } )* }
    };
}

per_engine!(
    round_trip_and_recovery,
    wrap_around_with_release,
    corrupt_file_tail_is_cut
);

// ---------------------------------------------------------------- faults etc.

#[tokio::test]
async fn torn_write_fails_the_append_and_is_cut() {
    let memory: SharedDevice = Arc::new(MemoryDevice::new(1 << 20));
    let faulty = Arc::new(FaultyDevice::new(memory.clone()));
    let control = faulty.control();
    let (wal, _) = open(faulty.clone(), 512 << 10).await;
    let a = wal.append_one(write(1, 3)).await.unwrap();
    // Only the header block of the next record reaches the medium.
    control.tear_next_write(1);
    let err = wal.append_one(write(2, 3)).await.unwrap_err();
    assert!(matches!(err, WalError::Failed { .. }), "{err}");
    // Fail-stop: later appends are refused, nothing is acknowledged.
    assert!(matches!(
        wal.append_one(write(3, 1)).await,
        Err(WalError::Failed { .. })
    ));
    drop(wal);
    let (wal, recovered) = open(faulty.clone(), 512 << 10).await;
    assert_eq!(recovered, vec![(a, write(1, 3))]);
    assert!(matches!(wal.recovery_stop(), ScanStop::Cut { .. }));
    let b = wal.append_one(write(4, 1)).await.unwrap();
    drop(wal);
    let (_, recovered) = open(faulty, 512 << 10).await;
    assert_eq!(recovered, vec![(a, write(1, 3)), (b, write(4, 1))]);
}

#[tokio::test]
async fn device_error_fails_the_append_and_it_is_not_recovered() {
    let memory: SharedDevice = Arc::new(MemoryDevice::new(1 << 20));
    let faulty = Arc::new(FaultyDevice::new(memory.clone()));
    let control = faulty.control();
    let (wal, _) = open(faulty.clone(), 512 << 10).await;
    let a = wal.append_one(write(1, 1)).await.unwrap();
    control.fail_range(RING, 512 << 10, FaultOps::Writes);
    assert!(matches!(
        wal.append_one(write(2, 1)).await,
        Err(WalError::Failed { .. })
    ));
    assert!(matches!(wal.release(a).await, Err(WalError::Failed { .. })));
    drop(wal);
    control.heal();
    let (_, recovered) = open(faulty.clone(), 512 << 10).await;
    assert_eq!(recovered, vec![(a, write(1, 1))]);

    // A failing flush also fails the append.
    let (wal, _) = open(faulty.clone(), 512 << 10).await;
    control.fail_device();
    assert!(wal.append_one(write(3, 1)).await.is_err());
}

/// What takes a head node out of service (manager: `watch_log`): an EIO
/// on the log, then, on the reopened log, a device that hangs under the
/// `TimedDevice` deadline the manager puts below every log. Both fail-stop
/// the log, wake `failed()` with a reason that names the cause, refuse
/// every later append, and lose nothing acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_then_a_hang_fail_stop_the_log_and_say_why() {
    let memory: SharedDevice = Arc::new(MemoryDevice::new(1 << 20));
    let faulty = Arc::new(FaultyDevice::new(memory.clone()));
    let control = faulty.control();
    let timed: SharedDevice =
        Arc::new(hardware::TimedDevice::new(faulty.clone(), Duration::from_millis(200)).unwrap());

    // EIO on a log write.
    let (wal, _) = open(timed.clone(), 512 << 10).await;
    assert_eq!(wal.failure(), None);
    let watcher = tokio::spawn({
        let wal = wal.clone();
        async move { wal.failed().await }
    });
    let a = wal.append_one(write(1, 1)).await.unwrap();
    control.fail_range(RING, 512 << 10, FaultOps::Writes);
    assert!(matches!(
        wal.append_one(write(2, 1)).await,
        Err(WalError::Failed { .. })
    ));
    let reason = tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("failed() wakes at once")
        .unwrap();
    assert!(
        reason.contains("Input/output error") || reason.contains("os error 5"),
        "{reason}"
    );
    assert_eq!(wal.failure().as_deref(), Some(reason.as_str()));
    // Fail-stop: later appends are refused without touching the device.
    control.heal();
    assert!(matches!(
        wal.append_one(write(3, 1)).await,
        Err(WalError::Failed { .. })
    ));
    drop(wal);

    // Reopened (a restart), then the device hangs: the deadline fails it.
    let (wal, recovered) = open(timed.clone(), 512 << 10).await;
    assert_eq!(recovered, vec![(a, write(1, 1))]);
    let b = wal.append_one(write(4, 1)).await.unwrap();
    control.set_latency(Duration::from_secs(3600));
    let started = std::time::Instant::now();
    let hung = tokio::time::timeout(Duration::from_secs(5), wal.append_one(write(5, 1)))
        .await
        .expect("a hung log device fails within its deadline, not never");
    assert!(matches!(hung, Err(WalError::Failed { .. })), "{hung:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let reason = tokio::time::timeout(Duration::from_secs(1), wal.failed())
        .await
        .unwrap();
    assert!(reason.contains("did not complete"), "{reason}");
    drop(wal);
    control.heal();
    let (_, recovered) = open(timed, 512 << 10).await;
    assert_eq!(recovered, vec![(a, write(1, 1)), (b, write(4, 1))]);
}

/// A record left behind by a cut tail must not come back when newer records
/// end exactly where it starts (the open generation fences it).
#[tokio::test]
async fn cut_records_are_never_resurrected() {
    let memory: SharedDevice = Arc::new(MemoryDevice::new(1 << 20));
    let (wal, _) = open(memory.clone(), 512 << 10).await;
    let a = wal.append_one(write(1, 1)).await.unwrap();
    let b = wal.append_one(write(2, 2)).await.unwrap();
    let c = wal.append_one(write(3, 1)).await.unwrap();
    drop(wal);
    // B torn (payload lost), C fully on the medium.
    memory
        .write_at(RING + b.0 + B as u64, AlignedBuf::zeroed(B).unwrap())
        .await
        .unwrap();
    let (wal, recovered) = open(memory.clone(), 512 << 10).await;
    assert_eq!(recovered, vec![(a, write(1, 1))]);
    // B' has B's size, so it ends exactly where C starts.
    let b2 = wal.append_one(write(4, 2)).await.unwrap();
    assert_eq!(b2, b);
    drop(wal);
    let (wal, recovered) = open(memory.clone(), 512 << 10).await;
    assert_eq!(recovered, vec![(a, write(1, 1)), (b2, write(4, 2))]);
    assert!(matches!(wal.recovery_stop(), ScanStop::Cut { position, .. } if *position == c.0));
}

#[tokio::test]
async fn log_full_is_backpressure_and_release_makes_room() {
    let capacity = 16 * B as u64;
    let memory: SharedDevice = Arc::new(MemoryDevice::new(RING + capacity));
    let (wal, _) = open(memory.clone(), capacity).await;
    let mut positions = Vec::new();
    for seq in 0..4 {
        positions.push(wal.append_one(write(seq, 3)).await.unwrap());
    }
    let err = wal.append_one(write(9, 1)).await.unwrap_err();
    assert!(err.is_retryable());
    assert!(matches!(
        err,
        WalError::LogFull {
            needed_bytes: 8192,
            free_bytes: 0
        }
    ));
    assert_eq!(wal.stats().fill_ratio(), 1.0);
    assert!(matches!(
        wal.release(LogPosition(positions[1].0 + 4096)).await,
        Err(WalError::BadRelease { .. })
    ));
    assert!(matches!(
        wal.append(vec![write(9, 1), write(10, 3)]).await,
        Err(WalError::LogFull { .. })
    ));
    wal.release(positions[1]).await.unwrap();
    // 4 blocks free at the start of the next lap: a 2-block record fits.
    let p = wal.append_one(write(9, 1)).await.unwrap();
    assert_eq!(p.0, capacity);
    assert!(matches!(
        wal.append_one(write(10, 2)).await,
        Err(WalError::LogFull { .. })
    ));
    assert!(matches!(
        wal.append_one(write(11, MAX_BLOCKS_FOR_TEST)).await,
        Err(WalError::RecordTooLarge { .. })
    ));
    drop(wal);
    let (_, recovered) = open(memory, capacity).await;
    let seqs: Vec<u64> = recovered.iter().map(|(_, r)| r.sequence).collect();
    assert_eq!(seqs, vec![1, 2, 3, 9]);
}

const MAX_BLOCKS_FOR_TEST: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_flushes_and_all_recover() {
    let memory: SharedDevice = Arc::new(MemoryDevice::new(8 << 20));
    let counting = Counting::new(memory.clone(), Duration::from_millis(3));
    let (wal, _) = open(counting.clone(), 4 << 20).await;
    let flushes_before = counting.flushes.load(Ordering::SeqCst);
    let mut tasks = Vec::new();
    for task in 0..64u64 {
        let wal = wal.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..4 {
                let record = write(task * 100 + i, 1 + (task % 3) as usize);
                let position = wal.append_one(record.clone()).await.unwrap();
                out.push((position, record));
            }
            out
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.unwrap());
    }
    let flushes = counting.flushes.load(Ordering::SeqCst) - flushes_before;
    assert!(flushes < 64, "{flushes} flushes for 256 appends");
    assert_eq!(wal.stats().batches, flushes);
    acked.sort_by_key(|(p, _)| *p);
    drop(wal);
    let (_, recovered) = open(memory, 4 << 20).await;
    assert_eq!(recovered, acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_on_uring_file_share_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal.img");
    let device = file_device(&path, EngineChoice::Uring, 4 << 20);
    let counting = Counting::new(device, Duration::ZERO);
    let (wal, _) = open(counting.clone(), 2 << 20).await;
    let mut tasks = Vec::new();
    for task in 0..64u64 {
        let wal = wal.clone();
        tasks.push(tokio::spawn(async move {
            let record = write(task, 1);
            (wal.append_one(record.clone()).await.unwrap(), record)
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.push(task.await.unwrap());
    }
    assert!(wal.stats().batches < 64, "{:?}", wal.stats());
    acked.sort_by_key(|(p, _)| *p);
    drop(wal);
    drop(counting);
    let (_, recovered) = open(file_device(&path, EngineChoice::Uring, 4 << 20), 2 << 20).await;
    assert_eq!(recovered, acked);
}

#[tokio::test]
async fn superblocks_are_checked() {
    let memory: SharedDevice = Arc::new(MemoryDevice::new(1 << 20));
    let (wal, _) = open(memory.clone(), 512 << 10).await;
    let a = wal.append_one(write(1, 1)).await.unwrap();
    wal.release(wal.head()).await.unwrap();
    let b = wal.append_one(write(2, 1)).await.unwrap();
    assert!(b > a);
    drop(wal);
    // The newest copy (generation 2, the release) torn: the previous copy
    // still opens; only the release is lost (its space was not reused yet).
    let mut junk = AlignedBuf::zeroed(B).unwrap();
    junk[17] = 1;
    memory.write_at(0, junk).await.unwrap();
    let (_, recovered) = open(memory.clone(), 512 << 10).await;
    assert_eq!(recovered, vec![(a, write(1, 1)), (b, write(2, 1))]);
    // Both destroyed: refused, never reformatted.
    for offset in [0, 4096] {
        let mut junk = AlignedBuf::zeroed(B).unwrap();
        junk[17] = 1;
        memory.write_at(offset, junk).await.unwrap();
    }
    assert!(matches!(
        Wal::open(memory.clone(), options(512 << 10)).await,
        Err(WalError::SuperblockCorrupt { .. })
    ));
    let tiny: SharedDevice = Arc::new(MemoryDevice::new(8 * 4096));
    assert!(matches!(
        Wal::open(tiny, WalOptions::default()).await,
        Err(WalError::TooSmall { .. })
    ));
}

#[tokio::test]
async fn reads_of_queued_records_are_served_from_memory() {
    let memory: SharedDevice = Arc::new(MemoryDevice::new(1 << 20));
    let faulty = Arc::new(FaultyDevice::new(memory));
    let control = faulty.control();
    let (wal, _) = open(faulty, 512 << 10).await;
    // The device write takes a second: the record stays queued or in
    // flight (not durable) for all of the checks below.
    control.set_latency(Duration::from_secs(1));
    let appender = {
        let wal = wal.clone();
        tokio::spawn(async move { wal.append_one(write(1, 2)).await })
    };
    crate::wait_until(
        "the append reserves its position",
        Duration::from_secs(10),
        || wal.stats().head > wal.stats().tail,
    )
    .await;
    let position = LogPosition(wal.stats().tail);
    assert!(wal.stats().durable < wal.stats().head);
    assert_eq!(wal.read(position).await.unwrap(), write(1, 2));
    // Still not durable after the read: it was served from memory.
    assert!(wal.stats().durable < wal.stats().head);
    assert_eq!(appender.await.unwrap().unwrap(), position);
    control.heal();
    assert_eq!(wal.read(position).await.unwrap(), write(1, 2));
}

// ---------------------------------------------------------------- model test

#[derive(Debug, Clone)]
enum WalOp {
    /// Append records of these payload block counts (one call).
    Append(Vec<usize>),
    /// Release the oldest `n` live records.
    Release(usize),
    /// Drop and reopen.
    Reopen,
    /// The next write keeps only its first `n` blocks and fails; then reopen.
    TornAppend(usize, u64),
    /// Flip a byte of a live record on the medium... of a *released* one
    /// (never-read space): must change nothing.
    ScribbleFreeSpace,
}

fn wal_op() -> impl proptest::strategy::Strategy<Value = WalOp> {
    use proptest::prelude::*;
    prop_oneof![
        6 => proptest::collection::vec(1usize..5, 1..4).prop_map(WalOp::Append),
        2 => (0usize..4).prop_map(WalOp::Release),
        1 => Just(WalOp::Reopen),
        1 => (1usize..4, 0u64..6).prop_map(|(b, n)| WalOp::TornAppend(b, n)),
        1 => Just(WalOp::ScribbleFreeSpace),
    ]
}

async fn run_model(ops: Vec<WalOp>) {
    let capacity = 32 * B as u64;
    let memory: SharedDevice = Arc::new(MemoryDevice::new(RING + capacity));
    let faulty = Arc::new(FaultyDevice::new(memory.clone()));
    let control = faulty.control();
    let (mut wal, _) = open(faulty.clone(), capacity).await;
    let mut live: Vec<(LogPosition, LogRecord)> = Vec::new();
    let mut seq = 0u64;
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            WalOp::Append(sizes) => {
                let records: Vec<LogRecord> = sizes
                    .iter()
                    .map(|&blocks| {
                        seq += 1;
                        write(seq, blocks)
                    })
                    .collect();
                match wal.append(records.clone()).await {
                    Ok(positions) => live.extend(positions.into_iter().zip(records)),
                    Err(WalError::LogFull { .. }) => {}
                    Err(e) => panic!("step {step}: {e}"),
                }
            }
            WalOp::Release(n) => {
                let n = n.min(live.len());
                let up_to = live.get(n).map_or(wal.head(), |(p, _)| *p);
                wal.release(up_to).await.unwrap();
                live.drain(..n);
            }
            WalOp::Reopen => {
                drop(wal);
                let (reopened, recovered) = open(faulty.clone(), capacity).await;
                assert_eq!(recovered, live, "step {step}");
                wal = reopened;
            }
            WalOp::TornAppend(blocks, kept) => {
                seq += 1;
                let record = write(seq, blocks);
                control.tear_next_write(kept);
                match wal.append_one(record.clone()).await {
                    Err(WalError::LogFull { .. }) => {
                        control.heal();
                        continue;
                    }
                    Err(WalError::Failed { .. }) => {}
                    other => panic!("step {step}: torn append returned {other:?}"),
                }
                control.heal();
                drop(wal);
                let (reopened, recovered) = open(faulty.clone(), capacity).await;
                // The failed record was never acknowledged: it may be there
                // (all its blocks landed) or not, but nothing else changes.
                if recovered.len() == live.len() + 1 {
                    let (position, extra) = recovered.last().unwrap().clone();
                    assert_eq!(extra, record, "step {step}");
                    live.push((position, extra));
                }
                assert_eq!(recovered, live, "step {step}");
                wal = reopened;
            }
            WalOp::ScribbleFreeSpace => {
                let stats = wal.stats();
                if stats.head - stats.tail + (B as u64) <= capacity {
                    // The last block before the tail (one lap back) is free.
                    // (The tail's batch starts at the tail rounded down to 4 KiB.)
                    let batch = stats.tail / B as u64 * B as u64;
                    let free = (batch + capacity - B as u64) % capacity;
                    let mut junk = AlignedBuf::zeroed(B).unwrap();
                    junk.iter_mut().for_each(|b| *b = 0xA5);
                    memory.write_at(RING + free, junk).await.unwrap();
                }
            }
        }
    }
    drop(wal);
    let (_, recovered) = open(faulty, capacity).await;
    assert_eq!(recovered, live);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    #[test]
    fn wal_matches_a_model_across_reopens_and_torn_writes(
        ops in proptest::collection::vec(wal_op(), 1..60)
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run_model(ops));
    }
}

// ------------------------------------------------------- ack after flush

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    WriteDone { offset: u64, len: u64 },
    FlushStart,
    FlushEnd,
    Ack { offset: u64 },
}

/// Records the order of completed writes, flush starts/ends (and, from the
/// test, acknowledgements).
#[derive(Debug)]
struct Recording {
    inner: SharedDevice,
    events: std::sync::Mutex<Vec<Event>>,
}

impl Recording {
    fn push(&self, event: Event) {
        self.events.lock().unwrap().push(event);
    }
}

impl BlockDevice for Recording {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, AlignedBuf> {
        self.inner.read_at(offset, len)
    }
    fn write_at(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, AlignedBuf> {
        Box::pin(async move {
            let len = buf.len() as u64;
            tokio::time::sleep(Duration::from_micros(300)).await;
            let out = self.inner.write_at(offset, buf).await;
            self.push(Event::WriteDone { offset, len });
            out
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.push(Event::FlushStart);
            tokio::time::sleep(Duration::from_millis(1)).await;
            let out = self.inner.flush().await;
            self.push(Event::FlushEnd);
            out
        })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.inner.discard(offset, len)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ack_follows_a_flush_that_started_after_its_write() {
    let memory: SharedDevice = Arc::new(MemoryDevice::new(4 << 20));
    let recording = Arc::new(Recording {
        inner: memory,
        events: std::sync::Mutex::new(Vec::new()),
    });
    // Large enough that no ring slot is reused during the test.
    let capacity = 512 * B as u64;
    let (wal, _) = open(recording.clone(), capacity).await;
    let mut tasks = Vec::new();
    for task in 0..32u64 {
        let wal = wal.clone();
        let recording = recording.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..6 {
                let record = write(task * 10 + i, 1);
                let position = wal.append_one(record).await.unwrap();
                recording.push(Event::Ack {
                    offset: RING + position.0 % capacity,
                });
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let events = recording.events.lock().unwrap().clone();
    let mut acks = 0;
    for (at, event) in events.iter().enumerate() {
        let Event::Ack { offset } = *event else {
            continue;
        };
        acks += 1;
        // The last completed write of this record's header before the ack.
        let written = events[..at]
            .iter()
            .rposition(|e| matches!(*e, Event::WriteDone { offset: o, len } if o <= offset && offset < o + len))
            .expect("ack without a write");
        let flush_start = events[written..at]
            .iter()
            .position(|e| *e == Event::FlushStart)
            .map(|i| written + i)
            .expect("ack without a later flush start");
        assert!(
            events[flush_start..at].contains(&Event::FlushEnd),
            "ack before its flush ended"
        );
    }
    assert_eq!(acks, 32 * 6);
}

/// The newest superblock copy (the open that stamped the records) is lost:
/// the older copy still recovers the records, and the next open generation
/// is above theirs so stale records stay fenced.
#[tokio::test]
async fn superblock_fallback_keeps_records_of_the_lost_open() {
    let memory: SharedDevice = Arc::new(MemoryDevice::new(1 << 20));
    // Format writes generation 0 (copy A), the open bump generation 1 (copy B).
    let (wal, _) = open(memory.clone(), 512 << 10).await;
    let a = wal.append_one(write(1, 1)).await.unwrap();
    let b = wal.append_one(write(2, 2)).await.unwrap();
    drop(wal);
    let mut junk = AlignedBuf::zeroed(B).unwrap();
    junk[99] = 7;
    memory.write_at(4096, junk).await.unwrap();
    let (wal, recovered) = open(memory.clone(), 512 << 10).await;
    assert_eq!(recovered, vec![(a, write(1, 1)), (b, write(2, 2))]);
    // Appends continue after the recovered records and survive a reopen.
    let c = wal.append_one(write(3, 1)).await.unwrap();
    drop(wal);
    let (_, recovered) = open(memory, 512 << 10).await;
    assert_eq!(recovered.last().unwrap(), &(c, write(3, 1)));
    assert_eq!(recovered.len(), 3);
}

// ------------------------------------------------ batches, memory, upgrade

fn options_with_cache(capacity_bytes: u64, cache_bytes: u64) -> WalOptions {
    WalOptions {
        capacity_bytes: Some(capacity_bytes),
        cache_bytes,
        ..WalOptions::default()
    }
}

/// One append of several records is one batch: one header block for all,
/// and a payload block torn on the medium cuts the whole batch (none of
/// its records comes back), never a part of it.
#[tokio::test]
async fn a_batch_is_one_header_and_is_recovered_whole_or_not_at_all() {
    let memory: SharedDevice = Arc::new(MemoryDevice::new(1 << 20));
    let (wal, _) = open(memory.clone(), 512 << 10).await;
    let a = wal.append_one(write(1, 1)).await.unwrap();
    let records = vec![write(2, 1), write(3, 2), write(4, 1)];
    let positions = wal.append(records.clone()).await.unwrap();
    // Record i of the batch is at batch + i; the batch is one header block
    // and the four payload blocks.
    let batch = positions[0].0;
    assert_eq!(batch, a.0 + 2 * B as u64);
    assert_eq!(
        positions,
        vec![
            LogPosition(batch),
            LogPosition(batch + 1),
            LogPosition(batch + 2)
        ]
    );
    assert_eq!(wal.stats().head, batch + 5 * B as u64);
    for (position, record) in positions.iter().zip(&records) {
        assert_eq!(&wal.read(*position).await.unwrap(), record);
    }
    drop(wal);
    let (wal, recovered) = open(memory.clone(), 512 << 10).await;
    let mut expected = vec![(a, write(1, 1))];
    expected.extend(positions.iter().copied().zip(records.clone()));
    assert_eq!(recovered, expected);
    // Released up to the middle of the batch: the rest of it is recovered.
    wal.release(positions[1]).await.unwrap();
    drop(wal);
    let (wal, recovered) = open(memory.clone(), 512 << 10).await;
    assert_eq!(recovered, expected[2..].to_vec());
    drop(wal);
    // The last payload block of the batch torn: the whole batch is the cut
    // tail, even the records whose blocks are intact.
    memory
        .write_at(RING + batch + 4 * B as u64, AlignedBuf::zeroed(B).unwrap())
        .await
        .unwrap();
    let (wal, recovered) = open(memory.clone(), 512 << 10).await;
    assert!(recovered.is_empty(), "{recovered:?}");
    assert!(matches!(wal.recovery_stop(), ScanStop::Cut { position, .. } if *position == batch));
}

/// Reads of live records come from memory while the budget allows; the
/// oldest payloads beyond it are read back from the device (checked
/// against their CRCs), also after a reopen.
#[tokio::test]
async fn the_unflushed_tail_is_read_from_memory_within_its_budget() {
    let memory: SharedDevice = Arc::new(MemoryDevice::new(1 << 20));
    let capacity = 512 << 10;
    let budget = 3 * B as u64;
    let (wal, _) = Wal::open(memory.clone(), options_with_cache(capacity, budget))
        .await
        .unwrap();
    let mut acked = Vec::new();
    for seq in 1..=5 {
        let record = write(seq, 1);
        acked.push((wal.append_one(record.clone()).await.unwrap(), record));
    }
    let stats = wal.stats();
    assert_eq!(
        (stats.cached_bytes, stats.cache_budget_bytes),
        (budget, budget)
    );
    // The newest three from memory, the oldest two from the device.
    for (i, (position, record)) in acked.iter().enumerate().rev() {
        let before = wal.stats();
        let block = wal.read_blocks(*position, 0, 1).await.unwrap();
        assert_eq!(&block[..], &record.payload[..]);
        let after = wal.stats();
        let from_memory = i >= 2;
        assert_eq!(
            after.cache_hits - before.cache_hits,
            u64::from(from_memory),
            "record {i}"
        );
        assert_eq!(
            after.cache_misses - before.cache_misses,
            u64::from(!from_memory),
            "record {i}"
        );
    }
    // Released records leave the budget.
    wal.release(acked[3].0).await.unwrap();
    assert_eq!(wal.stats().cached_bytes, 2 * B as u64);
    drop(wal);
    // A corrupt block of a record read back from the device is refused.
    memory
        .write_at(
            RING + acked[3].0 .0 + B as u64,
            AlignedBuf::zeroed(B).unwrap(),
        )
        .await
        .unwrap();
    let (wal, recovered) = Wal::open(memory.clone(), options_with_cache(capacity, 0))
        .await
        .unwrap();
    // Recovery itself stops at the corrupt record: nothing live.
    assert!(recovered.is_empty());
    drop(wal);

    // Budget 0: every read goes to the device, and is right.
    let memory: SharedDevice = Arc::new(MemoryDevice::new(1 << 20));
    let (wal, _) = Wal::open(memory.clone(), options_with_cache(capacity, 0))
        .await
        .unwrap();
    let records = vec![write(1, 2), write(2, 3)];
    let positions = wal.append(records.clone()).await.unwrap();
    assert_eq!(wal.stats().cached_bytes, 0);
    for (position, record) in positions.iter().zip(&records) {
        assert_eq!(&wal.read(*position).await.unwrap(), record);
        let block = wal.read_blocks(*position, 1, 1).await.unwrap();
        assert_eq!(&block[..], &record.payload[B..2 * B]);
    }
    assert_eq!(wal.stats().cache_hits, 0);
    assert_eq!(wal.stats().cache_misses, 4);
    // Flipped on the medium while live: refused, not served.
    let payload = positions[1].0 / B as u64 * B as u64 + 3 * B as u64;
    let mut block = memory.read_at(RING + payload, B).await.unwrap();
    block[7] ^= 1;
    memory.write_at(RING + payload, block).await.unwrap();
    assert!(matches!(
        wal.read_blocks(positions[1], 0, 1).await,
        Err(WalError::Corrupt { .. })
    ));
}

/// The upgrade: a log written by the previous format (one header block per
/// record) is replayed at open, then continued in batches; nothing
/// acknowledged is lost, across reopens, releases and wrap-around.
async fn version_1_log_is_replayed_then_continued_in_batches(engine: Engine, cache_bytes: u64) {
    use head_node::wal::format::{choose_superblock, SuperblockState, FORMAT_VERSION};
    use head_node::wal::legacy::V1Writer;
    let capacity = 48 * B as u64;
    let disk = Disk::new(engine, RING + capacity);
    let open = |device: SharedDevice| async move {
        let (wal, recovered) = Wal::open(device, options_with_cache(capacity, cache_bytes))
            .await
            .unwrap();
        let recovered: Vec<(LogPosition, LogRecord)> = recovered
            .into_iter()
            .map(|r| (r.position, r.record))
            .collect();
        (wal, recovered)
    };
    let mut acked: Vec<(LogPosition, LogRecord)> = Vec::new();
    {
        let mut v1 = V1Writer::format(disk.device(), capacity, 0xB1)
            .await
            .unwrap();
        for seq in 1..=6u64 {
            let record = write(seq, 1 + seq as usize % 3);
            acked.push((v1.append(&record).await.unwrap(), record));
        }
        let trim = LogRecord::trim(part(), 1, 7, 40, 3);
        acked.push((v1.append(&trim).await.unwrap(), trim));
        let commit = LogRecord {
            kind: RecordKind::FlushCommit,
            payload: Bytes::from_static(b"extent 3"),
            block_count: 0,
            ..LogRecord::trim(part(), 1, 8, 0, 1)
        };
        acked.push((v1.append(&commit).await.unwrap(), commit));
    }
    // Replayed by the new code; the log is version 2 from here on.
    let (wal, recovered) = open(disk.device()).await;
    assert_eq!(recovered, acked);
    let copies = disk.device().read_at(0, 2 * B).await.unwrap();
    let SuperblockState::Valid(superblock) = choose_superblock([&copies[..B], &copies[B..]]) else {
        panic!("superblock");
    };
    assert_eq!(superblock.version, FORMAT_VERSION);
    assert_eq!(superblock.batches_from_position_bytes, wal.stats().head);
    for copy in [&copies[..B], &copies[B..]] {
        assert_eq!(
            head_node::wal::format::Superblock::decode(copy)
                .unwrap()
                .version,
            FORMAT_VERSION,
            "both copies upgraded"
        );
    }
    // The version 1 records read back (from memory or their v1 place).
    for (position, record) in &acked {
        assert_eq!(&wal.read(*position).await.unwrap(), record);
    }
    // Appends continue in batches after them.
    let more = vec![write(9, 1), write(10, 2), write(11, 1)];
    let positions = wal.append(more.clone()).await.unwrap();
    assert_eq!(positions[1].0, positions[0].0 + 1, "one batch");
    acked.extend(positions.into_iter().zip(more));
    drop(wal);
    let (wal, recovered) = open(disk.device()).await;
    assert_eq!(recovered, acked);
    for (position, record) in &acked {
        assert_eq!(&wal.read(*position).await.unwrap(), record);
    }
    // Release half of the version 1 records, reopen, then wrap the ring
    // several times: the version 1 records' space is reused by batches.
    wal.release(acked[4].0).await.unwrap();
    acked.drain(..4);
    drop(wal);
    let (mut wal, recovered) = open(disk.device()).await;
    assert_eq!(recovered, acked);
    let mut seq = 100;
    for round in 0..40u64 {
        seq += 1;
        let record = write(seq, 1 + (round % 3) as usize);
        let position = loop {
            match wal.append_one(record.clone()).await {
                Ok(position) => break position,
                Err(WalError::LogFull { .. }) => {
                    let keep = acked.split_off(acked.len() / 2);
                    let up_to = keep.first().map_or(wal.head(), |(p, _)| *p);
                    wal.release(up_to).await.unwrap();
                    acked = keep;
                }
                Err(e) => panic!("append: {e}"),
            }
        };
        acked.push((position, record));
        if round % 7 == 0 {
            drop(wal);
            let (reopened, recovered) = open(disk.device()).await;
            assert_eq!(recovered, acked, "round {round}");
            wal = reopened;
        }
    }
    assert!(wal.stats().head > 2 * capacity, "{:?}", wal.stats());
    drop(wal);
    let (_, recovered) = open(disk.device()).await;
    assert_eq!(recovered, acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_from_version_1_memory() {
    version_1_log_is_replayed_then_continued_in_batches(Engine::Memory, 256 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_from_version_1_file_reads_back_from_the_device() {
    version_1_log_is_replayed_then_continued_in_batches(Engine::Sync, 0).await;
}
