//! Partition engine, in process: six real sleds over memory devices, a real
//! write log per head node, a primary and a secondary wired by an in-process
//! replica peer, an in-process extent source (the LCP seam).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use hardware::{BlockDevice, FaultControl, FaultyDevice, MemoryDevice, SharedDevice};
use head_node::index::Location;
use head_node::partition::{
    CheckpointReport, ExtentGrant, ExtentSource, OpenRole, ParentSnapshot, Partition,
    PartitionConfig, PartitionDeps, PartitionError, PeerError, RebuildProgress, RebuildTask,
    ReplicaPeer, Role, SharedLog, SledAccess,
};
use head_node::wal::{Wal, WalOptions};
use proto::sled::{PartitionId, SledError, SledRequest, SledResponse};
use proto::volume::{
    chunk_crcs, HostError, HostOp, HostReply, HostRequest, ReplicaReply, ReplicaRequest,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sled_controller::metrics::Metrics;
use sled_controller::service::DeviceSlot;
use sled_controller::store::{DeviceIdentity, Store, StoreOptions};
use sled_controller::Sled;

use crate::wait_until;

const COLUMN: u64 = 1 << 20;
const SLED_DEVICE: u64 = 48 << 20;
const WAL_DEVICE: u64 = 8 << 20;
const K: u8 = 4;
const M: u8 = 2;
const PART: PartitionId = PartitionId {
    volume: 7,
    index: 1,
};
/// The partition starts at this volume block.
const FIRST_BLOCK: u64 = 4096;
const BLOCK: u64 = proto::BLOCK_SIZE_BYTES;
const CHUNK_BYTES: u64 = 16 * BLOCK;
/// One row of a column: a chunk and its summary block.
const ROW_BYTES: u64 = CHUNK_BYTES + BLOCK;

// ---------------------------------------------------------------- sleds

struct SledBox {
    id: String,
    memory: Arc<MemoryDevice>,
    faults: FaultControl,
    sled: Arc<Sled>,
}

async fn open_sled(id: &str, memory: Arc<MemoryDevice>) -> SledBox {
    let faulty = FaultyDevice::new(memory.clone() as Arc<dyn BlockDevice>);
    let faults = faulty.control();
    let device: Arc<dyn BlockDevice> = Arc::new(faulty);
    let metrics = Arc::new(Metrics::new());
    let identity = DeviceIdentity {
        unit_name: "unit-1".into(),
        sled_id: id.into(),
        device_index: 0,
    };
    let store = Store::open(
        device,
        &identity,
        &StoreOptions::new(COLUMN),
        metrics.clone(),
    )
    .await
    .unwrap();
    let sled = Sled::new(
        id.into(),
        COLUMN,
        vec![DeviceSlot::Open(Arc::new(store))],
        metrics,
    );
    SledBox {
        id: id.into(),
        memory,
        faults,
        sled: Arc::new(sled),
    }
}

#[derive(Debug, Default)]
struct Sleds {
    sleds: Mutex<BTreeMap<String, Arc<Sled>>>,
    down: Mutex<HashSet<String>>,
    /// Reads of one stripe summary block (what recovery scans).
    summary_reads: AtomicU64,
    /// `Append` requests sent.
    appends: AtomicU64,
    /// `Append` number from which every append fails (`0`: none fails).
    fail_appends_from: AtomicU64,
    /// `Read` requests each sled has answered.
    reads_answered: Arc<Mutex<BTreeMap<String, u64>>>,
    /// Every call yields before (sled-i: i+1 times) and after the sled
    /// handles it: await points where a cancelled pass can be dropped.
    yield_around_calls: AtomicBool,
}

impl Sleds {
    /// `Read` requests `sled` has answered so far.
    fn reads_answered(&self, sled: &str) -> u64 {
        self.reads_answered
            .lock()
            .unwrap()
            .get(sled)
            .copied()
            .unwrap_or(0)
    }
}

impl SledAccess for Sleds {
    fn call(
        &self,
        sled: &str,
        request: SledRequest,
    ) -> BoxFuture<'static, Result<SledResponse, PeerError>> {
        let mut failing = false;
        if matches!(request, SledRequest::Append { .. }) {
            let n = self.appends.fetch_add(1, Ordering::Relaxed) + 1;
            let from = self.fail_appends_from.load(Ordering::SeqCst);
            failing = from != 0 && n >= from;
        }
        let target = self.sleds.lock().unwrap().get(sled).cloned();
        let down = failing || self.down.lock().unwrap().contains(sled);
        if let SledRequest::Read {
            offset_bytes: offset,
            len_bytes: len,
            ..
        } = &request
        {
            if u64::from(*len) == BLOCK && offset % ROW_BYTES == CHUNK_BYTES {
                self.summary_reads.fetch_add(1, Ordering::SeqCst);
            }
        }
        let peer = sled.to_string();
        let is_read = matches!(request, SledRequest::Read { .. });
        let reads_answered = self.reads_answered.clone();
        // sled-i yields i+1 times before its answer: the columns of one
        // stripe are appended at different await points.
        let yields = if self.yield_around_calls.load(Ordering::SeqCst) {
            1 + sled
                .trim_start_matches("sled-")
                .parse::<usize>()
                .unwrap_or(0)
        } else {
            0
        };
        Box::pin(async move {
            for _ in 0..yields {
                tokio::task::yield_now().await;
            }
            match target {
                Some(s) if !down => {
                    let response = s.handle_request(request).await;
                    if yields > 0 {
                        tokio::task::yield_now().await;
                    }
                    if is_read {
                        *reads_answered.lock().unwrap().entry(peer).or_default() += 1;
                    }
                    Ok(response)
                }
                _ => Err(PeerError::Unreachable {
                    peer,
                    reason: "stopped".into(),
                }),
            }
        })
    }
}

/// The LCP seam: one column on each of k+m different sleds per extent.
#[derive(Debug)]
struct Extents {
    sleds: Arc<Sleds>,
    next_id: AtomicU64,
    owned: Arc<Mutex<BTreeMap<u64, ExtentGrant>>>,
    /// Like the LCP's `OpenSandboxExtent`: a lower epoch is refused.
    min_epoch: AtomicU64,
    /// Column indexes every new extent owes (the LCP only owes the last
    /// parity columns; the engine must not care which).
    owe: Mutex<Vec<u16>>,
}

impl ExtentSource for Extents {
    fn next_extent(
        &self,
        _partition: PartitionId,
        epoch: u64,
    ) -> BoxFuture<'static, Result<ExtentGrant, PeerError>> {
        if epoch < self.min_epoch.load(Ordering::SeqCst) {
            return Box::pin(async move {
                Err(PeerError::Refused {
                    peer: "lcp".into(),
                    reason: format!("stale epoch {epoch}"),
                })
            });
        }
        // Like the LCP with degraded extents allowed: only sleds that are
        // not down take a column; missing columns (at the end: parity
        // first) are owed.
        let down = self.sleds.down.lock().unwrap().clone();
        let ids: Vec<String> = self
            .sleds
            .sleds
            .lock()
            .unwrap()
            .keys()
            .filter(|id| !down.contains(*id))
            .cloned()
            .collect();
        let extent = self.next_id.fetch_add(1, Ordering::Relaxed);
        let sleds = self.sleds.clone();
        let owned = self.owned.clone();
        let owe: BTreeSet<u16> = self.owe.lock().unwrap().iter().copied().collect();
        Box::pin(async move {
            let mut columns = Vec::new();
            for id in ids.iter().take(usize::from(K + M) - owe.len()) {
                match sleds
                    .call(
                        id,
                        SledRequest::AllocateColumns {
                            column_count: 1,
                            device: None,
                        },
                    )
                    .await?
                {
                    SledResponse::Allocated(c) => columns.push((id.clone(), c[0])),
                    other => {
                        return Err(PeerError::Refused {
                            peer: id.clone(),
                            reason: format!("{other:?}"),
                        })
                    }
                }
            }
            if columns.len() < usize::from(K) + 1 {
                return Err(PeerError::Unreachable {
                    peer: "lcp".into(),
                    reason: format!("only {} sleds up", columns.len()),
                });
            }
            let mut owed: BTreeSet<u16> = owe.clone();
            let mut present = columns.into_iter();
            let mut columns = Vec::new();
            for i in 0..u16::from(K + M) {
                let next = if owe.contains(&i) {
                    None
                } else {
                    present.next()
                };
                match next {
                    Some(c) => columns.push(c),
                    None => {
                        owed.insert(i);
                        columns.push(ExtentGrant::owed_slot());
                    }
                }
            }
            let grant = ExtentGrant {
                extent,
                k: K,
                m: M,
                column_size_bytes: COLUMN,
                columns,
                owed,
            };
            owned.lock().unwrap().insert(extent, grant.clone());
            Ok(grant)
        })
    }

    fn free_extent(
        &self,
        partition: PartitionId,
        epoch: u64,
        extent: u64,
    ) -> BoxFuture<'static, Result<(), PeerError>> {
        // Like the LCP: the columns first (fenced by epoch on the sleds),
        // then the record.
        let grant = self.owned.lock().unwrap().get(&extent).cloned();
        let sleds = self.sleds.clone();
        let owned = self.owned.clone();
        Box::pin(async move {
            let Some(grant) = grant else { return Ok(()) };
            let present: Vec<_> = grant.present().map(|(_, c)| c.clone()).collect();
            for (sled, column) in present {
                let r = sleds
                    .call(
                        &sled,
                        SledRequest::FreeColumn {
                            column,
                            partition,
                            epoch,
                        },
                    )
                    .await?;
                match r {
                    SledResponse::Freed | SledResponse::Error(SledError::BadColumnState { .. }) => {
                    }
                    // A fenced (old) primary's free is refused.
                    other => {
                        return Err(PeerError::Refused {
                            peer: sled,
                            reason: format!("{other:?}"),
                        })
                    }
                }
            }
            owned.lock().unwrap().remove(&extent);
            Ok(())
        })
    }

    fn owned_extents(
        &self,
        _partition: PartitionId,
    ) -> BoxFuture<'static, Result<Vec<ExtentGrant>, PeerError>> {
        let grants = self.owned.lock().unwrap().values().cloned().collect();
        Box::pin(async move { Ok(grants) })
    }
}

// ---------------------------------------------------------------- replication

/// Primary → secondary, in process; `down` makes it unreachable.
#[derive(Debug, Default)]
struct Peer {
    target: Mutex<Option<Partition>>,
    down: AtomicBool,
}

impl ReplicaPeer for Peer {
    fn send(&self, request: ReplicaRequest) -> BoxFuture<'static, Result<ReplicaReply, PeerError>> {
        let target = self.target.lock().unwrap().clone();
        let down = self.down.load(Ordering::SeqCst);
        Box::pin(async move {
            match target {
                Some(t) if !down => Ok(t.handle_replica(request).await),
                _ => Err(PeerError::Unreachable {
                    peer: "secondary".into(),
                    reason: "stopped".into(),
                }),
            }
        })
    }
}

// ---------------------------------------------------------------- unit

struct Unit {
    sleds: Vec<SledBox>,
    access: Arc<Sleds>,
    extents: Arc<Extents>,
    /// Head nodes' log devices: primary, secondary.
    logs: [Arc<MemoryDevice>; 2],
    peer: Arc<Peer>,
    primary: Partition,
    secondary: Partition,
    size_blocks: u64,
    epoch: u64,
    /// Applied to every partition config the unit opens.
    tune: fn(&mut PartitionConfig),
}

fn no_tuning(_: &mut PartitionConfig) {}

fn tuned(size_blocks: u64, epoch: u64, tune: fn(&mut PartitionConfig)) -> PartitionConfig {
    let mut c = config(size_blocks, epoch);
    tune(&mut c);
    c
}

fn config(size_blocks: u64, epoch: u64) -> PartitionConfig {
    let mut c = PartitionConfig::new(PART, FIRST_BLOCK, size_blocks, epoch);
    c.replica_timeout = Duration::from_millis(400);
    c.replica_retry_interval = Duration::from_millis(5);
    c.hedge_timeout = Duration::from_millis(50);
    c.sled_timeout = Duration::from_millis(500);
    c
}

async fn open_log(
    memory: &Arc<MemoryDevice>,
) -> (Arc<SharedLog>, Vec<head_node::wal::RecoveredRecord>) {
    let device: SharedDevice = memory.clone();
    let options = WalOptions {
        capacity_bytes: None,
        ..WalOptions::default()
    };
    let (wal, recovered) = Wal::open(device, options).await.unwrap();
    (SharedLog::new(wal), recovered)
}

/// Opens the partition as `role` over the log on `log_device` (recovering
/// what it holds) and the unit's sleds and extent source.
async fn open_partition(
    access: &Arc<Sleds>,
    extents: &Arc<Extents>,
    log_device: &Arc<MemoryDevice>,
    config: PartitionConfig,
    role: OpenRole,
    replica: Option<Arc<dyn ReplicaPeer>>,
) -> Partition {
    let (log, records) = open_log(log_device).await;
    Partition::open(
        config,
        role,
        PartitionDeps {
            log,
            sleds: access.clone(),
            extents: extents.clone(),
            replica,
        },
        &records,
    )
    .await
    .unwrap()
}

/// Takes `source` over in place as `config` says, like the manager does,
/// replicating to `replica` (`None`: a peer that reaches nothing; reads only).
async fn take_over_in_place(
    source: &Partition,
    config: PartitionConfig,
    access: &Arc<Sleds>,
    extents: &Arc<Extents>,
    replica: Option<Arc<Peer>>,
) -> Result<Partition, PartitionError> {
    let replica: Arc<dyn ReplicaPeer> = replica.unwrap_or_default();
    source
        .take_over(
            config,
            PartitionDeps {
                log: source.log().clone(),
                sleds: access.clone(),
                extents: extents.clone(),
                replica: Some(replica),
            },
        )
        .await
}

impl Unit {
    async fn new(size_blocks: u64) -> Unit {
        Self::new_tuned(size_blocks, no_tuning).await
    }

    async fn new_tuned(size_blocks: u64, tune: fn(&mut PartitionConfig)) -> Unit {
        let mut sleds = Vec::new();
        for i in 0..6 {
            sleds.push(
                open_sled(
                    &format!("sled-{i}"),
                    Arc::new(MemoryDevice::new(SLED_DEVICE)),
                )
                .await,
            );
        }
        let access = Arc::new(Sleds::default());
        for s in &sleds {
            access
                .sleds
                .lock()
                .unwrap()
                .insert(s.id.clone(), s.sled.clone());
        }
        let extents = Arc::new(Extents {
            sleds: access.clone(),
            next_id: AtomicU64::new(1),
            owned: Arc::new(Mutex::new(BTreeMap::new())),
            min_epoch: AtomicU64::new(0),
            owe: Mutex::new(Vec::new()),
        });
        let logs = [
            Arc::new(MemoryDevice::new(WAL_DEVICE)),
            Arc::new(MemoryDevice::new(WAL_DEVICE)),
        ];
        let peer = Arc::new(Peer::default());
        let (primary, secondary) =
            Self::open_partitions(&access, &extents, &logs, &peer, size_blocks, 1, tune).await;
        Unit {
            sleds,
            access,
            extents,
            logs,
            peer,
            primary,
            secondary,
            size_blocks,
            epoch: 1,
            tune,
        }
    }

    async fn open_partitions(
        access: &Arc<Sleds>,
        extents: &Arc<Extents>,
        logs: &[Arc<MemoryDevice>; 2],
        peer: &Arc<Peer>,
        size_blocks: u64,
        epoch: u64,
        tune: fn(&mut PartitionConfig),
    ) -> (Partition, Partition) {
        let config = tuned(size_blocks, epoch, tune);
        let secondary = open_partition(
            access,
            extents,
            &logs[1],
            config.clone(),
            OpenRole::Secondary,
            None,
        )
        .await;
        *peer.target.lock().unwrap() = Some(secondary.clone());
        let replica: Arc<dyn ReplicaPeer> = peer.clone();
        let primary = open_partition(
            access,
            extents,
            &logs[0],
            config,
            OpenRole::Primary,
            Some(replica),
        )
        .await;
        (primary, secondary)
    }

    /// Drops both head nodes and every sled process, reopens everything
    /// from the devices.
    async fn restart(&mut self) {
        self.primary.shutdown();
        self.secondary.shutdown();
        *self.peer.target.lock().unwrap() = None;
        let down: HashSet<String> = self.access.down.lock().unwrap().clone();
        let mut sleds = Vec::new();
        for s in self.sleds.drain(..) {
            let memory = s.memory.clone();
            drop(s);
            sleds.push(open_sled(&format!("sled-{}", sleds.len()), memory).await);
        }
        self.sleds = sleds;
        {
            let mut map = self.access.sleds.lock().unwrap();
            map.clear();
            for s in &self.sleds {
                map.insert(s.id.clone(), s.sled.clone());
            }
        }
        *self.access.down.lock().unwrap() = down;
        // Let the old tasks notice the shutdown and drop their log handles.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (primary, secondary) = Self::open_partitions(
            &self.access,
            &self.extents,
            &self.logs,
            &self.peer,
            self.size_blocks,
            self.epoch,
            self.tune,
        )
        .await;
        self.primary = primary;
        self.secondary = secondary;
    }

    async fn write(
        &self,
        block: u64,
        offset_in_block: u64,
        data: Vec<u8>,
    ) -> Result<(), PartitionError> {
        let crcs = chunk_crcs(&data);
        self.primary
            .write(
                self.epoch,
                (FIRST_BLOCK + block) * 4096 + offset_in_block,
                Bytes::from(data),
                &crcs,
            )
            .await
    }

    async fn read(&self, byte: u64, len: u32) -> Bytes {
        self.primary
            .read(self.epoch, FIRST_BLOCK * 4096 + byte, len)
            .await
            .unwrap()
    }

    fn sled_bytes_in_use(&self) -> u64 {
        self.primary.extent_usage().iter().map(|(_, b)| b).sum()
    }
}

/// Byte model of the partition.
struct Model(Vec<u8>);

impl Model {
    /// A partition of `size_blocks` that was never written.
    fn zeroed(size_blocks: u64) -> Model {
        Model(vec![0; (size_blocks * 4096) as usize])
    }

    fn check(&self, got: &[u8], at: u64, what: &str) {
        let want = &self.0[at as usize..at as usize + got.len()];
        if got != want {
            let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
            panic!(
                "{what}: byte {} differs (got {}, want {})",
                at + first as u64,
                got[first],
                want[first]
            );
        }
    }
}

async fn check_all(unit: &Unit, model: &Model, what: &str) {
    let total = unit.size_blocks * 4096;
    let mut at = 0;
    while at < total {
        let len = (total - at).min(1 << 20);
        let got = unit.read(at, len as u32).await;
        model.check(&got, at, what);
        at += len;
    }
    unit.primary.check_invariants().unwrap();
}

fn pattern(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let seed: u8 = rng.random();
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8).wrapping_mul(7) ^ (i as u8))
        .collect()
}

async fn random_ops(unit: &Unit, model: &mut Model, rng: &mut StdRng, ops: usize) {
    let sectors = unit.size_blocks * 8;
    for _ in 0..ops {
        let start = rng.random_range(0..sectors);
        let max = (sectors - start).min(64);
        let len = rng.random_range(1..=max);
        let (byte, len_bytes) = (start * 512, len * 512);
        match rng.random_range(0..10) {
            0 => {
                unit.primary
                    .unmap(unit.epoch, FIRST_BLOCK * 4096 + byte, len_bytes as u32)
                    .await
                    .unwrap();
                model.0[byte as usize..(byte + len_bytes) as usize].fill(0);
            }
            1 => {
                let got = unit.read(byte, len_bytes as u32).await;
                model.check(&got, byte, "random read");
            }
            _ => {
                let data = pattern(rng, len_bytes as usize);
                unit.write(byte / 4096, byte % 4096, data.clone())
                    .await
                    .unwrap();
                model.0[byte as usize..(byte + len_bytes) as usize].copy_from_slice(&data);
            }
        }
    }
}

/// Writes 16 blocks of a fresh pattern at block `chunk * 16`, in the unit
/// and the model.
async fn write_chunk(unit: &Unit, model: &mut Model, rng: &mut StdRng, chunk: u64) {
    let data = pattern(rng, 16 * 4096);
    unit.write(chunk * 16, 0, data.clone()).await.unwrap();
    let at = (chunk * 16 * 4096) as usize;
    model.0[at..at + data.len()].copy_from_slice(&data);
}

/// A replica's `(highest_sequence, highest_epoch)`.
async fn replica_status(replica: &Partition) -> (u64, u64) {
    match replica
        .handle_replica(ReplicaRequest::Status { partition: PART })
        .await
    {
        ReplicaReply::Status {
            highest_sequence,
            highest_epoch,
        } => (highest_sequence, highest_epoch),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_before_and_after_flush_restart_and_two_sleds_down() {
    let size_blocks = 512;
    let mut unit = Unit::new(size_blocks).await;
    let mut model = Model::zeroed(size_blocks);
    let mut rng = StdRng::seed_from_u64(0x5eed);
    check_all(&unit, &model, "empty").await;
    random_ops(&unit, &mut model, &mut rng, 150).await;
    check_all(&unit, &model, "logged").await;
    let report = unit.primary.flush_now().await.unwrap();
    assert!(report.blocks > 0 && report.stripes > 0, "{report:?}");
    assert_eq!(unit.primary.log_resident_blocks(), 0);
    check_all(&unit, &model, "flushed").await;
    // The flush released the log: from here the data lives on the sleds.
    assert!(unit.primary.log().wal().tail().0 > 0);
    // The secondary releases once the flush commit reached it (replicated
    // after the primary's commit, not inside flush_now).
    wait_until(
        "the secondary's log released after the flush commit",
        Duration::from_secs(10),
        || unit.secondary.log().wal().tail().0 > 0,
    )
    .await;
    // Mixed: some flushed, some logged, overwrites across both.
    random_ops(&unit, &mut model, &mut rng, 150).await;
    unit.primary.flush_now().await.unwrap();
    random_ops(&unit, &mut model, &mut rng, 100).await;
    check_all(&unit, &model, "mixed").await;

    unit.restart().await;
    check_all(&unit, &model, "after restart").await;
    // Replication resumes with the recovered sequences.
    random_ops(&unit, &mut model, &mut rng, 100).await;
    check_all(&unit, &model, "after restart + writes").await;
    unit.primary.flush_now().await.unwrap();

    // Any two sleds down: degraded reads decode. One sled process is
    // unreachable, the other's device has failed.
    unit.access.down.lock().unwrap().insert("sled-0".into());
    unit.sleds[3].faults.fail_device();
    check_all(&unit, &model, "two sleds down").await;
    assert!(
        unit.primary
            .metrics()
            .degraded_reads
            .load(Ordering::Relaxed)
            > 0
    );
    assert!(!unit.primary.repair_queue().is_empty());
    // Writes keep flowing (to the log) while sleds are down.
    random_ops(&unit, &mut model, &mut rng, 50).await;
    check_all(&unit, &model, "two sleds down + writes").await;
    // The sleds come back (the failed device's sled restarts with it).
    unit.access.down.lock().unwrap().clear();
    unit.sleds[3].faults.heal();
    unit.restart().await;
    unit.primary.flush_now().await.unwrap();
    check_all(&unit, &model, "second restart").await;
    unit.restart().await;
    check_all(&unit, &model, "third restart").await;
}

fn logged_only(c: &mut PartitionConfig) {
    c.direct_write_min_bytes = 0;
}

fn direct_256k(c: &mut PartitionConfig) {
    c.direct_write_min_bytes = 256 << 10;
}

/// Full-stripe writes (256 KiB and up go straight to the sleds) mixed with
/// small and partial writes and trims over the same blocks: the model holds
/// before and after a flush, a GC pass, a checkpoint, a restart of both
/// head nodes (recovery from the sleds plus the logs) and a promotion of
/// the secondary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_mixed_with_logged_ones_survive_flush_gc_restart_and_promotion() {
    let size_blocks = 1024;
    let mut unit = Unit::new_tuned(size_blocks, direct_256k).await;
    let mut model = Model::zeroed(size_blocks);
    let mut rng = StdRng::seed_from_u64(0xd1ec7);
    let big = |rng: &mut StdRng| {
        let blocks = [64u64, 96, 128, 256][rng.random_range(0..4)];
        let at = rng.random_range(0..=size_blocks - blocks);
        (at, blocks)
    };
    for round in 0..4 {
        for _ in 0..6 {
            let (at, blocks) = big(&mut rng);
            let data = pattern(&mut rng, (blocks * 4096) as usize);
            unit.write(at, 0, data.clone()).await.unwrap();
            let from = (at * 4096) as usize;
            model.0[from..from + data.len()].copy_from_slice(&data);
            random_ops(&unit, &mut model, &mut rng, 15).await;
        }
        check_all(&unit, &model, &format!("round {round}, mixed")).await;
        match round {
            0 => {
                unit.primary.flush_now().await.unwrap();
            }
            1 => {
                unit.primary.flush_now().await.unwrap();
                unit.primary.gc_pass().await.unwrap();
                unit.primary.write_checkpoint().await.unwrap();
            }
            _ => {}
        }
        check_all(&unit, &model, &format!("round {round}, after flush/gc")).await;
        unit.restart().await;
        check_all(&unit, &model, &format!("round {round}, after restart")).await;
    }
    // Promotion: the secondary takes over in place at a new epoch and
    // must read every acknowledged write.
    for _ in 0..4 {
        let (at, blocks) = big(&mut rng);
        let data = pattern(&mut rng, (blocks * 4096) as usize);
        unit.write(at, 0, data.clone()).await.unwrap();
        let from = (at * 4096) as usize;
        model.0[from..from + data.len()].copy_from_slice(&data);
    }
    assert!(unit.primary.metrics().direct_writes.load(Ordering::Relaxed) >= 4);
    unit.primary.shutdown();
    let promoted = take_over_in_place(
        &unit.secondary,
        tuned(size_blocks, unit.epoch + 1, direct_256k),
        &unit.access,
        &unit.extents,
        None,
    )
    .await
    .unwrap();
    let total = size_blocks * 4096;
    let mut at = 0;
    while at < total {
        let len = (total - at).min(1 << 20);
        let got = promoted
            .read(unit.epoch + 1, FIRST_BLOCK * 4096 + at, len as u32)
            .await
            .unwrap();
        model.check(&got, at, "after promotion");
        at += len;
    }
    promoted.check_invariants().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_down_write_stalls_instead_of_acknowledging() {
    let unit = Unit::new(256).await;
    unit.write(0, 0, vec![1; 4096]).await.unwrap();
    unit.peer.down.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let err = unit.write(1, 0, vec![2; 4096]).await.unwrap_err();
    assert!(matches!(err, PartitionError::Unavailable { .. }), "{err}");
    assert!(err.is_retryable());
    assert!(matches!(err.to_host_error(), HostError::Unavailable { .. }));
    assert!(started.elapsed() >= Duration::from_millis(350));
    // Host flush is a barrier: it cannot complete while a write is in flight.
    assert!(unit.primary.flush(unit.epoch).await.is_err());
    // The secondary comes back: the queued record and new writes go through.
    unit.peer.down.store(false, Ordering::SeqCst);
    unit.write(2, 0, vec![3; 4096]).await.unwrap();
    unit.primary.flush(unit.epoch).await.unwrap();
    assert_eq!(&unit.read(0, 4096).await[..], &[1; 4096][..]);
    // The unacknowledged write stayed queued and reached both logs.
    assert_eq!(&unit.read(4096, 4096).await[..], &[2; 4096][..]);
    assert_eq!(&unit.read(8192, 4096).await[..], &[3; 4096][..]);
    assert_eq!(replica_status(&unit.secondary).await.0, 3);
    assert!(
        unit.primary
            .metrics()
            .replica_retries
            .load(Ordering::Relaxed)
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bit_on_a_sled_is_detected_decoded_and_reported() {
    let unit = Unit::new(256).await;
    let data: Vec<u8> = (0..64 * 1024).map(|i| (i * 13 % 251) as u8).collect();
    unit.write(0, 0, data.clone()).await.unwrap();
    unit.primary.flush_now().await.unwrap();
    let (location, column) = unit.primary.location_of(5).unwrap();
    let Location::Sled { offset_bytes, .. } = location else {
        panic!("{location:?}")
    };
    let (sled_id, column) = column.unwrap();
    let sled = unit.sleds.iter().find(|s| s.id == sled_id).unwrap();
    let geometry = *sled.sled.stores()[0].geometry();
    sled.faults
        .flip_bit(geometry.data_offset(column.index, offset_bytes) + 100, 3);
    let got = unit.read(0, 64 * 1024).await;
    assert_eq!(&got[..], &data[..]);
    let repairs = unit.primary.repair_queue();
    assert_eq!(repairs.len(), 1, "{repairs:?}");
    assert_eq!(repairs[0].sled, sled_id);
    assert!(
        unit.primary
            .metrics()
            .checksum_errors
            .load(Ordering::Relaxed)
            >= 1
    );
}

/// A read of two full stripes sends one sled request per data column (the
/// pieces of a column are consecutive on it, across the summary block); a
/// flipped bit in the second stripe of one column splits that column's
/// request per stripe, so exactly that stripe is decoded and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_is_one_sled_request_per_column_and_a_bad_block_splits_it() {
    let unit = Unit::new(1024).await;
    let k = u64::from(K);
    let blocks = 2 * k * 16;
    let data: Vec<u8> = (0..blocks * 4096).map(|i| (i * 7 % 249) as u8).collect();
    unit.write(0, 0, data.clone()).await.unwrap();
    unit.primary.flush_now().await.unwrap();
    let m = unit.primary.metrics();
    let sled_reads = || m.sled_reads.load(Ordering::Relaxed);
    let before = sled_reads();
    let got = unit.read(0, (blocks * 4096) as u32).await;
    assert_eq!(&got[..], &data[..]);
    assert_eq!(sled_reads() - before, k, "one request per data column");
    assert_eq!(m.degraded_reads.load(Ordering::Relaxed), 0);

    // A bad block in the second stripe of one column.
    let second = k * 16;
    let (location, column) = unit.primary.location_of(second + 3).unwrap();
    let Location::Sled { offset_bytes, .. } = location else {
        panic!("{location:?}")
    };
    let (sled_id, column) = column.unwrap();
    let sled = unit.sleds.iter().find(|s| s.id == sled_id).unwrap();
    let geometry = *sled.sled.stores()[0].geometry();
    sled.faults
        .flip_bit(geometry.data_offset(column.index, offset_bytes) + 9, 1);
    let got = unit.read(0, (blocks * 4096) as u32).await;
    assert_eq!(&got[..], &data[..]);
    assert_eq!(m.sled_read_splits.load(Ordering::Relaxed), 1);
    // Only the bad stripe was decoded (its piece of 16 blocks), and only
    // it is reported.
    assert_eq!(m.degraded_reads.load(Ordering::Relaxed), 1);
    let repairs = unit.primary.repair_queue();
    assert_eq!(repairs.len(), 1, "{repairs:?}");
    assert_eq!(repairs[0].sled, sled_id);
    assert_eq!(repairs[0].stripe, offset_bytes / (17 * 4096));
}

/// Sled timeout of the hedging test: a slow sled answers well within it,
/// and well after the hedged degraded read (50 ms + k reads and a decode).
const HEDGE_TEST_SLED_TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sled_read_is_hedged_by_a_degraded_read_and_not_reported() {
    let unit = Unit::new_tuned(256, |c| c.sled_timeout = HEDGE_TEST_SLED_TIMEOUT).await;
    let data: Vec<u8> = (0..64 * 1024).map(|i| (i * 31 % 253) as u8).collect();
    unit.write(0, 0, data.clone()).await.unwrap();
    unit.primary.flush_now().await.unwrap();
    let (_, column) = unit.primary.location_of(0).unwrap();
    let (sled_id, _) = column.unwrap();
    let sled = unit.sleds.iter().find(|s| s.id == sled_id).unwrap();
    // Slow, not broken: half the sled timeout.
    sled.faults.set_latency(HEDGE_TEST_SLED_TIMEOUT / 2);
    let answered = unit.access.reads_answered(&sled_id);
    let got = unit.read(0, 4096).await;
    assert_eq!(&got[..], &data[..4096]);
    // The degraded read answered: the slow sled had not, yet.
    assert_eq!(
        unit.access.reads_answered(&sled_id),
        answered,
        "the read waited for the slow sled instead of hedging"
    );
    assert_eq!(
        unit.primary
            .metrics()
            .degraded_reads
            .load(Ordering::Relaxed),
        1
    );
    // Slow is not broken: the direct read finishes (within the sled
    // timeout) and the column is not queued for repair. The direct read
    // is judged as soon as its answer arrives; the short pause only gives
    // that judgement time to run (a late one would let the check pass, it
    // cannot make it fail).
    wait_until(
        "the slow sled answers the direct read",
        Duration::from_secs(10),
        || unit.access.reads_answered(&sled_id) > answered,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        unit.primary.repair_queue().is_empty(),
        "{:?}",
        unit.primary.repair_queue()
    );
    // A sled that does not answer within the sled timeout is reported.
    sled.faults
        .set_latency(HEDGE_TEST_SLED_TIMEOUT + HEDGE_TEST_SLED_TIMEOUT / 2);
    let got = unit.read(0, 4096).await;
    assert_eq!(&got[..], &data[..4096]);
    wait_until(
        "the sled that timed out is reported for repair",
        Duration::from_secs(10),
        || !unit.primary.repair_queue().is_empty(),
    )
    .await;
    let repairs = unit.primary.repair_queue();
    assert_eq!(repairs.len(), 1, "{repairs:?}");
    assert_eq!(repairs[0].sled, sled_id);
    sled.faults.heal();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_primary_fences_the_old_one() {
    let mut unit = Unit::new(256).await;
    unit.write(0, 0, vec![1; 8192]).await.unwrap();
    unit.primary.flush_now().await.unwrap();
    unit.write(4, 0, vec![2; 4096]).await.unwrap();
    let old = unit.primary.clone();
    // Promote the secondary: its node reopens the partition as primary at
    // epoch 2 (claims the columns, rebuilds from the sleds and its log).
    unit.secondary.shutdown();
    let old_secondary = unit.secondary.clone();
    drop(old_secondary);
    *unit.peer.target.lock().unwrap() = None;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let promoted = open_partition(
        &unit.access,
        &unit.extents,
        &unit.logs[1],
        config(256, 2),
        OpenRole::Primary,
        Some(Arc::new(Peer::default())),
    )
    .await;
    // The old primary's next flush is refused by the sleds: it drops the
    // role and stops acknowledging.
    let err = old.flush_now().await.unwrap_err();
    assert!(
        matches!(err, PartitionError::Fenced { current: 2, .. }),
        "{err}"
    );
    assert_eq!(old.role(), Role::Fenced { current: 2 });
    let crcs = chunk_crcs(&[9; 4096]);
    let err = old
        .write(1, FIRST_BLOCK * 4096, Bytes::from(vec![9; 4096]), &crcs)
        .await
        .unwrap_err();
    assert!(matches!(err, PartitionError::NotPrimary { .. }), "{err}");
    // Every acknowledged write is on the new primary.
    unit.primary = promoted;
    unit.epoch = 2;
    assert_eq!(&unit.read(0, 8192).await[..], &[1; 8192][..]);
    assert_eq!(&unit.read(4 * 4096, 4096).await[..], &[2; 4096][..]);
    // A stale client epoch is refused.
    let err = unit
        .primary
        .read(1, FIRST_BLOCK * 4096, 512)
        .await
        .unwrap_err();
    assert!(
        matches!(err, PartitionError::StaleEpoch { current: 2, .. }),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_returns_sled_space_to_about_k_plus_m_over_k_of_live_data() {
    let size_blocks = 512u64;
    let mut unit = Unit::new(size_blocks).await;
    let mut model = Model::zeroed(size_blocks);
    let mut rng = StdRng::seed_from_u64(7);
    // Write the partition's size twice over, flushing as we go.
    for round in 0..2 {
        for chunk in 0..size_blocks / 16 {
            write_chunk(&unit, &mut model, &mut rng, chunk).await;
            if chunk % 8 == 7 {
                unit.primary.flush_now().await.unwrap();
            }
        }
        let _ = round;
    }
    // Trim a quarter: the live data shrinks.
    unit.primary
        .unmap(
            unit.epoch,
            FIRST_BLOCK * 4096,
            (size_blocks / 4 * 4096) as u32,
        )
        .await
        .unwrap();
    model.0[..(size_blocks / 4 * 4096) as usize].fill(0);
    unit.primary.flush_now().await.unwrap();
    let before = unit.sled_bytes_in_use();
    let report = unit.primary.gc_pass().await.unwrap();
    assert!(report.extents_freed > 0, "{report:?}");
    let after = unit.sled_bytes_in_use();
    let live_bytes: u64 = unit.primary.live_blocks_per_extent().values().sum::<u64>() * 4096;
    assert_eq!(live_bytes, size_blocks * 3 / 4 * 4096);
    // (k+m)/k of the live data, plus the summary block per 16 data blocks,
    // plus at most one partly filled stripe row per extent.
    let bound = live_bytes * u64::from(K + M) / u64::from(K) * 17 / 16
        + unit.primary.extent_usage().len() as u64 * 6 * 68 * 1024;
    assert!(
        after <= bound,
        "after GC {after} bytes on sleds, bound {bound} (before {before})"
    );
    assert!(after < before);
    check_all(&unit, &model, "after gc").await;
    unit.restart().await;
    check_all(&unit, &model, "after gc + restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_with_flush_and_gc_running() {
    let size_blocks = 512u64;
    let unit = Arc::new(Unit::new(size_blocks).await);
    let writers = 8u64;
    let region = size_blocks / writers;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let unit = unit.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(100 + w);
            let mut model = vec![0u8; (region * 4096) as usize];
            let base = w * region * 4096;
            for _ in 0..60 {
                let sectors = region * 8;
                let start = rng.random_range(0..sectors);
                let len = rng.random_range(1..=(sectors - start).min(40));
                let (at, len) = (start * 512, len * 512);
                if rng.random_range(0..6) == 0 {
                    unit.primary
                        .unmap(unit.epoch, (FIRST_BLOCK * 4096) + base + at, len as u32)
                        .await
                        .unwrap();
                    model[at as usize..(at + len) as usize].fill(0);
                } else {
                    let data = pattern(&mut rng, len as usize);
                    let byte = base + at;
                    unit.write(byte / 4096, byte % 4096, data.clone())
                        .await
                        .unwrap();
                    model[at as usize..(at + len) as usize].copy_from_slice(&data);
                }
                let got = unit.read(base, (region * 4096) as u32).await;
                assert!(got[..] == model[..], "writer {w} region differs");
            }
            model
        }));
    }
    let background = {
        let unit = unit.clone();
        tokio::spawn(async move {
            for i in 0..40 {
                unit.primary.flush_now().await.unwrap();
                if i % 5 == 4 {
                    unit.primary.gc_pass().await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut model = Model(Vec::new());
    for task in tasks {
        model.0.extend(task.await.unwrap());
    }
    background.await.unwrap();
    check_all(&unit, &model, "after concurrent writers").await;
    unit.primary.flush_now().await.unwrap();
    unit.primary.gc_pass().await.unwrap();
    check_all(&unit, &model, "after final flush + gc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_secondary_catches_up_from_the_primary_log() {
    let unit = Unit::new(256).await;
    for i in 0..4 {
        unit.write(i, 0, vec![i as u8 + 1; 4096]).await.unwrap();
    }
    unit.primary.flush_now().await.unwrap();
    unit.write(10, 0, vec![10; 4096]).await.unwrap();
    unit.write(11, 0, vec![11; 4096]).await.unwrap();
    // Replace the secondary by one with an empty log (sequence 5 and 6 are
    // only in the primary's log; 1..4 were flushed and released).
    unit.secondary.shutdown();
    let fresh = open_partition(
        &unit.access,
        &unit.extents,
        &Arc::new(MemoryDevice::new(WAL_DEVICE)),
        config(256, 1),
        OpenRole::Secondary,
        None,
    )
    .await;
    *unit.peer.target.lock().unwrap() = Some(fresh.clone());
    unit.write(12, 0, vec![12; 4096]).await.unwrap();
    assert_eq!(replica_status(&fresh).await, (7, 1));
    assert!(unit.primary.metrics().replica_gaps.load(Ordering::Relaxed) >= 1);
    // A lower epoch is refused by the secondary.
    let reply = fresh
        .handle_replica(ReplicaRequest::Append {
            partition: PART,
            epoch: 0,
            records: Vec::new(),
        })
        .await;
    assert!(matches!(
        reply,
        ReplicaReply::Error(proto::volume::ReplicaError::StaleEpoch { current: 1 })
    ));
}

/// A replication `Append` whose handler is dropped while the secondary's
/// log writes it (the unit port drops a reset connection's handlers) must
/// not keep its log hold: a hold nobody releases pins the shared log until
/// it is full and every host write on the head node fails (seen once under
/// load as "write log full" with a secondary's `in_flight` hold that never
/// moved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_replica_append_releases_its_log_hold() {
    let memory = Arc::new(MemoryDevice::new(WAL_DEVICE));
    let faulty = FaultyDevice::new(memory.clone() as Arc<dyn BlockDevice>);
    let faults = faulty.control();
    let device: SharedDevice = Arc::new(faulty);
    let options = WalOptions {
        capacity_bytes: None,
        ..WalOptions::default()
    };
    let (wal, _) = Wal::open(device, options).await.unwrap();
    let unit = Unit::new(64).await;
    let secondary = Partition::open(
        config(64, 1),
        OpenRole::Secondary,
        PartitionDeps {
            log: SharedLog::new(wal),
            sleds: unit.access.clone(),
            extents: unit.extents.clone(),
            replica: None,
        },
        &[],
    )
    .await
    .unwrap();
    let append = |sequence: u64| {
        let data = Bytes::from(vec![sequence as u8; 4096]);
        ReplicaRequest::Append {
            partition: PART,
            epoch: 1,
            records: vec![proto::volume::ReplicaRecord {
                sequence,
                kind: proto::volume::ReplicaRecordKind::Write,
                lba: FIRST_BLOCK + sequence,
                blocks: 1,
                crcs: chunk_crcs(&data),
                data,
            }],
        }
    };
    // The log device answers slowly: the handler is dropped mid-write.
    faults.set_latency(Duration::from_millis(400));
    let dropped = tokio::time::timeout(
        Duration::from_millis(50),
        secondary.handle_replica(append(1)),
    )
    .await;
    assert!(dropped.is_err(), "the append ended before it was dropped");
    faults.set_latency(Duration::ZERO);
    // The log's answer comes; the hold goes with it.
    wait_until(
        "the dropped append's log hold released",
        Duration::from_secs(10),
        || secondary.log_holds().in_flight.is_none(),
    )
    .await;
    // The primary's resend is taken as usual.
    let reply = secondary.handle_replica(append(1)).await;
    assert!(matches!(reply, ReplicaReply::Appended { .. }), "{reply:?}");
    let reply = secondary.handle_replica(append(2)).await;
    assert!(
        matches!(reply, ReplicaReply::Appended { up_to_sequence: 2 }),
        "{reply:?}"
    );
    assert!(secondary.log_holds().in_flight.is_none());
}

/// The kernel-NBD VM test's data loss, in process: the secondary dies, a
/// fresh (empty) one is named and the primary is taken over in place at the
/// new epoch, as the manager does — and then **no host write comes**. The
/// primary must catch the new secondary up on its own (not when a write
/// meets a `Gap`) and only then call it in sync; a promotion of that
/// secondary after the primary dies then reads every acknowledged block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_secondary_is_caught_up_without_any_host_write() {
    let size = 256;
    let unit = Unit::new(size).await;
    // Flushed blocks (on the sleds) and unflushed ones (only in the logs).
    for block in 0..4u64 {
        unit.write(block, 0, vec![block as u8 + 1; 4096])
            .await
            .unwrap();
    }
    unit.primary.flush_now().await.unwrap();
    for block in 4..40u64 {
        unit.write(block, 0, vec![block as u8 + 1; 4096])
            .await
            .unwrap();
    }
    assert!(unit.primary.log_resident_blocks() >= 36);
    assert!(unit.primary.secondary_in_sync());

    // The secondary dies; a fresh one is named at epoch 2, still closed.
    unit.secondary.shutdown();
    let peer = Arc::new(Peer::default());
    let primary = take_over_in_place(
        &unit.primary,
        config(size, 2),
        &unit.access,
        &unit.extents,
        Some(peer.clone()),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !primary.secondary_in_sync(),
        "an unreachable new secondary is not in sync"
    );
    let fresh = open_partition(
        &unit.access,
        &unit.extents,
        &Arc::new(MemoryDevice::new(WAL_DEVICE)),
        config(size, 2),
        OpenRole::Secondary,
        None,
    )
    .await;
    assert_eq!(
        replica_status(&fresh).await.0,
        0,
        "the new secondary is empty"
    );
    *peer.target.lock().unwrap() = Some(fresh.clone());

    // No write: the primary catches it up by itself, bounded in time.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !primary.secondary_in_sync() {
        assert!(
            Instant::now() < deadline,
            "the new secondary was not caught up without a host write"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(replica_status(&fresh).await.0 >= 40);

    // The primary dies; the caught-up secondary is promoted and has it all.
    primary.shutdown();
    let promoted = take_over_in_place(&fresh, config(size, 3), &unit.access, &unit.extents, None)
        .await
        .unwrap();
    let got = promoted
        .read(3, FIRST_BLOCK * 4096, 40 * 4096)
        .await
        .unwrap();
    for block in 0..40usize {
        assert!(
            got[block * 4096..(block + 1) * 4096]
                .iter()
                .all(|b| *b == block as u8 + 1),
            "block {block} lost by the promoted secondary"
        );
    }
}

fn host_write(unit: &Unit, write_id: u64, block: u64, fill: u8) -> HostRequest {
    let data = vec![fill; 4096];
    HostRequest {
        volume: PART.volume,
        partition: PART.index,
        epoch: unit.epoch,
        // The partition engine below the manager checks no credential.
        credential: proto::volume::AttachmentCredential::NONE,
        op: HostOp::Write {
            write_id,
            offset_bytes: (FIRST_BLOCK + block) * 4096,
            crcs: chunk_crcs(&data),
            data: Bytes::from(data),
            fua: false,
        },
    }
}

/// A late copy of an acknowledged write (same write id) must not overwrite
/// a newer write to the same block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_duplicate_of_an_acknowledged_write_is_not_applied_again() {
    let unit = Unit::new(256).await;
    let w1 = host_write(&unit, 0x1234_0000_0001, 3, 0x11);
    let w2 = host_write(&unit, 0x1234_0000_0002, 3, 0x22);
    assert_eq!(unit.primary.handle_host(w1.clone()).await, HostReply::Done);
    assert_eq!(unit.primary.handle_host(w2).await, HostReply::Done);
    // W1's first attempt, delayed, arrives now.
    assert_eq!(unit.primary.handle_host(w1.clone()).await, HostReply::Done);
    assert_eq!(&unit.read(3 * 4096, 4096).await[..], &[0x22; 4096][..]);
    // Also after W2 was flushed to the sleds.
    unit.primary.flush_now().await.unwrap();
    assert_eq!(unit.primary.handle_host(w1).await, HostReply::Done);
    assert_eq!(&unit.read(3 * 4096, 4096).await[..], &[0x22; 4096][..]);
    assert_eq!(
        unit.primary
            .metrics()
            .duplicate_writes
            .load(Ordering::Relaxed),
        2
    );
    assert_eq!(unit.primary.metrics().writes.load(Ordering::Relaxed), 2);
    // Reusing an id for another range is refused, not answered Done.
    let reused = host_write(&unit, 0x1234_0000_0002, 4, 0x33);
    assert!(matches!(
        unit.primary.handle_host(reused).await,
        HostReply::Error(HostError::BadRequest { .. })
    ));
    // A write without an id (0) is applied every time, as before.
    assert_eq!(
        unit.primary
            .handle_host(host_write(&unit, 0, 5, 0x44))
            .await,
        HostReply::Done
    );
    assert_eq!(&unit.read(5 * 4096, 4096).await[..], &[0x44; 4096][..]);
}

/// A copy of a write id that is still in flight waits for the first copy
/// and returns its outcome; the write is logged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_of_an_in_flight_write_waits_for_the_first_outcome() {
    // A replica timeout far beyond the test: the first copy cannot time out
    // while the secondary is away, however slow the box.
    let unit = Unit::new_tuned(256, |c| c.replica_timeout = Duration::from_secs(30)).await;
    // The secondary is slow to answer: the first copy stays in flight.
    unit.peer.down.store(true, Ordering::SeqCst);
    let w1 = host_write(&unit, 0x5678_0000_0001, 0, 0x55);
    let first = tokio::spawn({
        let primary = unit.primary.clone();
        let w1 = w1.clone();
        async move { primary.handle_host(w1).await }
    });
    // In flight: logged and offered to the (unreachable) secondary.
    wait_until(
        "the first copy is sent to the secondary",
        Duration::from_secs(10),
        || {
            unit.primary
                .metrics()
                .replica_retries
                .load(Ordering::Relaxed)
                > 0
        },
    )
    .await;
    let second = tokio::spawn({
        let primary = unit.primary.clone();
        async move { primary.handle_host(w1).await }
    });
    // Time for the copy to reach the dedupe table; it must then wait (the
    // first cannot finish while the secondary is down).
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!second.is_finished());
    assert!(!first.is_finished());
    unit.peer.down.store(false, Ordering::SeqCst);
    assert_eq!(first.await.unwrap(), HostReply::Done);
    assert_eq!(second.await.unwrap(), HostReply::Done);
    assert_eq!(
        unit.primary
            .metrics()
            .duplicate_writes
            .load(Ordering::Relaxed),
        1
    );
    assert_eq!(unit.primary.metrics().writes.load(Ordering::Relaxed), 1);
    assert_eq!(
        replica_status(&unit.secondary).await.0,
        1,
        "the write was logged once"
    );
    assert_eq!(&unit.read(0, 4096).await[..], &[0x55; 4096][..]);
}

/// Sequential 256 KiB writes, 4 at once, through a log much smaller than the
/// data, with the background flusher running: no write may stall for long
/// when the log fills (prints the latencies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_writes_through_a_full_log_do_not_stall() {
    const BS: usize = 256 * 1024;
    const QD: usize = 4;
    const TOTAL: u64 = 48 << 20;
    let unit = Arc::new(Unit::new(4096).await);
    // Sleds answer like disks over a network, not like memory.
    for sled in &unit.sleds {
        sled.faults.set_latency(Duration::from_millis(10));
    }
    let flusher = unit.primary.spawn_flusher(Duration::from_millis(250));
    let next = Arc::new(AtomicU64::new(0));
    let unavailable = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut writers = Vec::new();
    for _ in 0..QD {
        let unit = unit.clone();
        let next = next.clone();
        let unavailable = unavailable.clone();
        writers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let at = next.fetch_add(BS as u64, Ordering::Relaxed);
                if at >= TOTAL {
                    return latencies;
                }
                let block = (at % (4096 * 4096)) / 4096;
                let t = std::time::Instant::now();
                // Retry `Unavailable` as the volume client does: after a
                // pause (a retry that never yields could starve the flusher
                // that frees the log) and for a bounded time.
                let mut pause = Duration::from_millis(1);
                loop {
                    match unit.write(block, 0, vec![(at >> 18) as u8; BS]).await {
                        Ok(()) => break,
                        Err(error) if error.is_retryable() => {
                            unavailable.fetch_add(1, Ordering::Relaxed);
                            assert!(
                                t.elapsed() < Duration::from_secs(60),
                                "a write kept failing for 60 s: {error}"
                            );
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_millis(50));
                        }
                        Err(error) => panic!("{error}"),
                    }
                }
                latencies.push(t.elapsed());
            }
        }));
    }
    let mut latencies = Vec::new();
    for writer in writers {
        latencies.extend(writer.await.unwrap());
    }
    let seconds = started.elapsed().as_secs_f64();
    flusher.abort();
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    let max = *latencies.last().unwrap();
    println!(
        "seqwrite through full log: {} writes, {} Unavailable, {:.1} MB/s, p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        unavailable.load(Ordering::Relaxed),
        TOTAL as f64 / seconds / 1e6,
        p(0.5),
        p(0.99),
        max
    );
    assert!(max < Duration::from_secs(3), "a write stalled for {max:?}");
}

// ---------------------------------------------------------------- index checkpoints

/// A checkpoint every 3 flush commits, never by time; a promotion finds
/// no secondary index (these tests are about checkpoints).
fn checkpoint_every_3(c: &mut PartitionConfig) {
    c.checkpoint_every_flushes = 3;
    c.checkpoint_interval = Duration::ZERO;
    c.reuse_held_index = false;
}

/// Checkpoints only when asked (`write_checkpoint`); a promotion finds no
/// secondary index.
fn checkpoint_on_demand(c: &mut PartitionConfig) {
    c.checkpoint_every_flushes = 0;
    c.checkpoint_interval = Duration::ZERO;
    c.reuse_held_index = false;
}

/// Checkpoints only when asked; the secondary index only when the test
/// refreshes it (`refresh_secondary_index`); a primary's take-over at a
/// new epoch scans every row.
fn index_on_demand(c: &mut PartitionConfig) {
    c.checkpoint_every_flushes = 0;
    c.checkpoint_interval = Duration::ZERO;
    c.reuse_held_index = false;
}

impl Unit {
    /// Takes the partition over in place at `epoch` from the secondary
    /// (promotion) or from the primary (new epoch), as the manager does;
    /// the new primary has no secondary (reads only).
    async fn take_over(&mut self, from_secondary: bool, epoch: u64) -> Partition {
        let source = if from_secondary {
            self.secondary.clone()
        } else {
            self.primary.clone()
        };
        let taken = take_over_in_place(
            &source,
            tuned(self.size_blocks, epoch, self.tune),
            &self.access,
            &self.extents,
            None,
        )
        .await
        .unwrap();
        self.extents.min_epoch.store(epoch, Ordering::SeqCst);
        self.primary = taken.clone();
        self.epoch = epoch;
        taken
    }

    /// Takes `partition`'s checkpoint extents out of the extent source, as
    /// if they were never written: a take-over then scans every row.
    fn hide_checkpoint_extents(&self, partition: &Partition) -> Vec<(u64, ExtentGrant)> {
        let mut owned = self.extents.owned.lock().unwrap();
        partition
            .checkpoint_extents()
            .iter()
            .map(|e| (*e, owned.remove(e).unwrap()))
            .collect()
    }

    /// Puts extents taken out by [`Unit::hide_checkpoint_extents`] back.
    fn unhide_extents(&self, hidden: Vec<(u64, ExtentGrant)>) {
        self.extents.owned.lock().unwrap().extend(hidden);
    }

    fn summary_reads(&self) -> u64 {
        self.access.summary_reads.load(Ordering::SeqCst)
    }

    /// Device byte of `row` of column `index` of `extent` on its sled.
    fn column_byte(&self, extent: u64, index: usize, row: u64) -> (&SledBox, u64) {
        let grant = self.extents.owned.lock().unwrap()[&extent].clone();
        let (sled_id, column) = grant.columns[index].clone();
        let sled = self.sleds.iter().find(|s| s.id == sled_id).unwrap();
        let geometry = *sled.sled.stores()[0].geometry();
        (sled, geometry.data_offset(column.index, row * ROW_BYTES))
    }
}

/// A 512-block unit with checkpoints on demand: random writes (seeded by
/// `seed`), a flush, a checkpoint (returned), more writes and a flush.
async fn flushed_past_a_checkpoint(seed: u64) -> (Unit, Model, CheckpointReport) {
    let size_blocks = 512u64;
    let unit = Unit::new_tuned(size_blocks, checkpoint_on_demand).await;
    let mut model = Model::zeroed(size_blocks);
    let mut rng = StdRng::seed_from_u64(seed);
    random_ops(&unit, &mut model, &mut rng, 60).await;
    unit.primary.flush_now().await.unwrap();
    let checkpoint = unit.primary.write_checkpoint().await.unwrap();
    random_ops(&unit, &mut model, &mut rng, 60).await;
    unit.primary.flush_now().await.unwrap();
    (unit, model, checkpoint)
}

/// Every block's index location (the comparable part of two indexes).
fn locations(partition: &Partition, size_blocks: u64) -> Vec<Option<Location>> {
    (0..size_blocks)
        .map(|b| partition.location_of(b).map(|(l, _)| l))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn take_over_reads_only_rows_after_the_checkpoint_and_matches_a_full_scan() {
    let size_blocks = 1024u64;
    let mut unit = Unit::new_tuned(size_blocks, checkpoint_every_3).await;
    let mut model = Model::zeroed(size_blocks);
    let mut rng = StdRng::seed_from_u64(61);
    for _ in 0..14 {
        random_ops(&unit, &mut model, &mut rng, 40).await;
        unit.primary.flush_now().await.unwrap();
    }
    let written = unit
        .primary
        .metrics()
        .checkpoints_written
        .load(Ordering::Relaxed);
    assert!(written >= 4, "{written} checkpoints");
    // Superseded checkpoint extents were freed: one is left.
    assert_eq!(unit.primary.checkpoint_extents().len(), 1);
    // An unflushed tail in both logs.
    random_ops(&unit, &mut model, &mut rng, 30).await;

    let before = unit.summary_reads();
    let promoted = unit.take_over(true, 2).await;
    let with_checkpoint = promoted.recovery_report();
    let reads = unit.summary_reads() - before;
    assert!(with_checkpoint.checkpoint.is_some(), "{with_checkpoint:?}");
    assert_eq!(reads, with_checkpoint.rows_scanned);
    assert_eq!(
        promoted
            .metrics()
            .recovery_checkpoint_used
            .load(Ordering::Relaxed),
        1
    );
    check_all(&unit, &model, "after take-over from a checkpoint").await;
    let from_checkpoint = locations(&promoted, size_blocks);

    // The same take-over with the checkpoint extents hidden scans every row.
    let hidden = unit.hide_checkpoint_extents(&promoted);
    assert!(!hidden.is_empty());
    let before = unit.summary_reads();
    let rescanned = unit.take_over(false, 3).await;
    let full = rescanned.recovery_report();
    let full_reads = unit.summary_reads() - before;
    assert_eq!(full.checkpoint, None, "{full:?}");
    assert_eq!(full_reads, full.rows_scanned);
    assert_eq!(
        locations(&rescanned, size_blocks),
        from_checkpoint,
        "checkpoint + rows after it must give the index of a full scan"
    );
    check_all(&unit, &model, "after a full-scan take-over").await;
    println!(
        "summary reads: {reads} with the checkpoint, {full_reads} by the full scan; {:?} vs {:?}",
        with_checkpoint.duration, full.duration
    );
    assert!(
        reads * 3 <= full_reads,
        "{reads} summary reads with a checkpoint, {full_reads} without"
    );
    unit.unhide_extents(hidden);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_newest_checkpoint_falls_back_to_the_previous_one() {
    let (mut unit, model, older) = flushed_past_a_checkpoint(62).await;
    let newest = unit.primary.write_checkpoint().await.unwrap();
    assert_eq!(newest.extent, older.extent);
    assert_eq!(newest.first_row, older.first_row + older.rows);
    // m + 1 columns of the newest checkpoint's first row go bad: it cannot
    // be decoded (the sleds' block CRCs catch every flipped bit).
    for index in [0, 1, 4] {
        let (sled, byte) = unit.column_byte(newest.extent, index, newest.first_row);
        sled.faults.flip_bit(byte + 8, 1);
    }
    let promoted = unit.take_over(true, 2).await;
    let report = promoted.recovery_report();
    assert_eq!(report.checkpoint, Some((1, older.id)), "{report:?}");
    assert_eq!(report.checkpoints_refused, 1);
    check_all(&unit, &model, "after falling back to the older checkpoint").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_checkpoint_leaves_the_previous_one_and_no_checkpoint_means_a_full_scan() {
    let (mut unit, model, older) = flushed_past_a_checkpoint(63).await;
    // The next checkpoint reaches only m + 1 columns: not durable (fewer
    // than k hold the row), the write fails and the extent is sealed.
    let ids: Vec<String> = unit.sleds.iter().map(|s| s.id.clone()).collect();
    unit.access
        .down
        .lock()
        .unwrap()
        .extend(ids[..3].iter().cloned());
    assert!(unit.primary.write_checkpoint().await.is_err());
    unit.access.down.lock().unwrap().clear();
    assert_eq!(
        unit.primary
            .metrics()
            .checkpoint_failures
            .load(Ordering::Relaxed),
        1
    );
    let promoted = unit.take_over(true, 2).await;
    let report = promoted.recovery_report();
    assert_eq!(report.checkpoint, Some((1, older.id)), "{report:?}");
    check_all(&unit, &model, "after a torn checkpoint").await;

    // The new primary's checkpoint goes to a new extent and supersedes
    // the old ones; with none left, recovery scans every summary.
    let fresh = promoted.write_checkpoint().await.unwrap();
    assert_ne!(fresh.extent, older.extent);
    assert_eq!(fresh.extents_freed, 1);
    assert_eq!(promoted.checkpoint_extents(), vec![fresh.extent]);
    let hidden = unit.hide_checkpoint_extents(&promoted);
    let rescanned = unit.take_over(false, 3).await;
    assert_eq!(rescanned.recovery_report().checkpoint, None);
    check_all(&unit, &model, "after a full scan").await;
    unit.unhide_extents(hidden);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_survives_m_lost_sleds() {
    let size_blocks = 512u64;
    let mut unit = Unit::new_tuned(size_blocks, checkpoint_on_demand).await;
    let mut model = Model::zeroed(size_blocks);
    let mut rng = StdRng::seed_from_u64(64);
    random_ops(&unit, &mut model, &mut rng, 80).await;
    unit.primary.flush_now().await.unwrap();
    let checkpoint = unit.primary.write_checkpoint().await.unwrap();
    random_ops(&unit, &mut model, &mut rng, 20).await;
    // Two sleds holding data columns of the checkpoint are lost.
    let grant = unit.extents.owned.lock().unwrap()[&checkpoint.extent].clone();
    let lost: Vec<String> = grant.columns[..2].iter().map(|(s, _)| s.clone()).collect();
    unit.access.down.lock().unwrap().extend(lost);
    let promoted = unit.take_over(true, 2).await;
    let report = promoted.recovery_report();
    assert_eq!(report.checkpoint, Some((1, checkpoint.id)), "{report:?}");
    check_all(&unit, &model, "checkpoint decoded from k of k+m columns").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_after_a_checkpoint_frees_extents_it_covers() {
    let size_blocks = 512u64;
    let mut unit = Unit::new_tuned(size_blocks, checkpoint_on_demand).await;
    let mut model = Model::zeroed(size_blocks);
    let mut rng = StdRng::seed_from_u64(65);
    // Twice over: the first extent fills up (960 blocks) and is left with
    // fewer than half of them live.
    for _ in 0..2 {
        for chunk in 0..size_blocks / 16 {
            write_chunk(&unit, &mut model, &mut rng, chunk).await;
        }
        unit.primary.flush_now().await.unwrap();
    }
    unit.primary.write_checkpoint().await.unwrap();
    let covered: Vec<u64> = unit
        .primary
        .live_blocks_per_extent()
        .keys()
        .copied()
        .collect();
    // Overwrite most blocks and trim some: the covered extents empty out.
    for chunk in 0..size_blocks / 16 {
        if chunk % 4 == 3 {
            continue;
        }
        write_chunk(&unit, &mut model, &mut rng, chunk).await;
    }
    unit.primary
        .unmap(unit.epoch, FIRST_BLOCK * 4096, 8 * 4096)
        .await
        .unwrap();
    model.0[..8 * 4096].fill(0);
    unit.primary.flush_now().await.unwrap();
    let report = unit.primary.gc_pass().await.unwrap();
    assert!(report.extents_freed > 0, "{report:?}");
    let owned: Vec<u64> = unit.extents.owned.lock().unwrap().keys().copied().collect();
    assert!(
        covered.iter().any(|e| !owned.contains(e)),
        "GC freed no extent the checkpoint covers"
    );
    // The checkpoint extent itself is never compacted away.
    let checkpoint_extents = unit.primary.checkpoint_extents();
    assert!(checkpoint_extents.iter().all(|e| owned.contains(e)));
    // Unflushed writes over blocks of freed extents, too.
    unit.write(20, 0, vec![0x5a; 4096]).await.unwrap();
    model.0[20 * 4096..21 * 4096].fill(0x5a);
    let promoted = unit.take_over(true, 2).await;
    let recovery = promoted.recovery_report();
    assert!(recovery.checkpoint.is_some(), "{recovery:?}");
    check_all(
        &unit,
        &model,
        "after GC freed extents the checkpoint covers",
    )
    .await;
    unit.restart().await;
    check_all(&unit, &model, "after GC + restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_epoch_primary_cannot_write_a_checkpoint() {
    let size_blocks = 256u64;
    let mut unit = Unit::new_tuned(size_blocks, checkpoint_on_demand).await;
    unit.write(0, 0, vec![3; 8192]).await.unwrap();
    unit.primary.flush_now().await.unwrap();
    let first = unit.primary.write_checkpoint().await.unwrap();
    let old = unit.primary.clone();
    let promoted = unit.take_over(true, 2).await;
    assert_eq!(promoted.recovery_report().checkpoint, Some((1, first.id)));
    // The old primary still believes it serves epoch 1: the sleds refuse
    // its checkpoint rows (the new primary claimed the columns).
    let err = old.write_checkpoint().await.unwrap_err();
    assert!(
        matches!(err, PartitionError::Fenced { current: 2, .. }),
        "{err}"
    );
    assert_eq!(old.role(), Role::Fenced { current: 2 });
    // Nothing of it is visible: the new primary's own checkpoint is next.
    let second = promoted.write_checkpoint().await.unwrap();
    assert_eq!(second.epoch, 2);
    assert_ne!(second.extent, first.extent);
    let again = unit.take_over(false, 3).await;
    assert_eq!(again.recovery_report().checkpoint, Some((2, second.id)));
    assert_eq!(&unit.read(0, 8192).await[..], &[3; 8192][..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_appends_many_stripes_per_column_request_and_recovers_them() {
    const STRIPE_BLOCKS: u64 = 4 * 16;
    const STRIPES: u64 = 20;
    // Through the log (a full-stripe write would skip the flush measured
    // here).
    let mut unit = Unit::new_tuned(4096, logged_only).await;
    let mut model = Model::zeroed(4096);
    let mut rng = StdRng::seed_from_u64(7);
    // 256 KiB writes, one stripe's worth each, concurrently (the secondary
    // sees several appends in flight).
    let writes = (0..STRIPES).map(|i| {
        let data = pattern(&mut rng, (STRIPE_BLOCKS * 4096) as usize);
        let at = i * STRIPE_BLOCKS * 4096;
        model.0[at as usize..at as usize + data.len()].copy_from_slice(&data);
        (i * STRIPE_BLOCKS, data)
    });
    let writes: Vec<_> = writes.collect();
    futures::future::try_join_all(
        writes
            .into_iter()
            .map(|(block, data)| unit.write(block, 0, data)),
    )
    .await
    .unwrap();
    let before = unit.access.appends.load(Ordering::Relaxed);
    let report = unit.primary.flush_now().await.unwrap();
    let appends = unit.access.appends.load(Ordering::Relaxed) - before;
    assert_eq!(report.stripes, STRIPES);
    // Up to 8 rows per append, never past an extent's end: a 1 MiB column
    // holds 15 rows, so 20 stripes are 8 + 7 rows, then 5 in the next
    // extent: three appends per column, not twenty.
    let rows_per_extent = COLUMN / (17 * 4096);
    assert_eq!(rows_per_extent, 15);
    let expected = u64::from(K + M) * 3;
    assert_eq!(appends, expected, "column appends for {STRIPES} stripes");
    check_all(&unit, &model, "after a multi-row flush").await;
    unit.restart().await;
    check_all(&unit, &model, "after restart (summaries of batched rows)").await;
}

// ---------------------------------------------------------------- take-overs under load

/// What serves the partition in [`take_overs_under_load_lose_no_acknowledged_write`].
#[derive(Clone)]
struct Serving {
    primary: Partition,
    secondary: Partition,
    peer: Arc<Peer>,
    epoch: u64,
}

struct Chaos {
    access: Arc<Sleds>,
    extents: Arc<Extents>,
    serving: Mutex<Serving>,
    size_blocks: u64,
    stop: AtomicBool,
    /// Take-overs done (for failure messages).
    events: Mutex<Vec<String>>,
    /// Applied to every partition config.
    tune: fn(&mut PartitionConfig),
    /// Full-stripe writes of the primaries replaced so far.
    direct_writes: AtomicU64,
}

/// Slots of `CHAOS_SLOT_BLOCKS` blocks; writer `w` owns the slots `s` with
/// `s % CHAOS_WRITERS == w`, so every slot has one sequential writer.
const CHAOS_SLOT_BLOCKS: u64 = 2;
const CHAOS_WRITERS: u64 = 4;

fn chaos_tune(c: &mut PartitionConfig) {
    c.checkpoint_every_flushes = 2;
    c.checkpoint_interval = Duration::ZERO;
    c.replica_timeout = Duration::from_millis(300);
}

impl Chaos {
    fn serving(&self) -> Serving {
        self.serving.lock().unwrap().clone()
    }

    fn history(&self) -> String {
        self.events.lock().unwrap().join("; ")
    }

    /// Runs `op` on whatever serves now until it succeeds, like the attach
    /// agent resends (30 s at most, then the test fails naming `what`).
    async fn until_ok<T, F, Fut>(&self, what: &str, op: F) -> T
    where
        F: Fn(Serving) -> Fut,
        Fut: std::future::Future<Output = Result<T, PartitionError>>,
    {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match op(self.serving()).await {
                Ok(value) => return value,
                Err(error) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{what} never answered: {error}; {}",
                        self.history()
                    );
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }

    /// Writes (or unmaps, `data` None) `slot` until a primary acknowledges.
    async fn put(&self, slot: u64, data: Option<&[u8]>) {
        let byte = (FIRST_BLOCK + slot * CHAOS_SLOT_BLOCKS) * BLOCK;
        let what = format!("slot {slot}");
        self.until_ok(&what, |s| async move {
            match data {
                Some(data) => {
                    let crcs = chunk_crcs(data);
                    s.primary
                        .write(s.epoch, byte, Bytes::copy_from_slice(data), &crcs)
                        .await
                }
                None => {
                    s.primary
                        .unmap(s.epoch, byte, (CHAOS_SLOT_BLOCKS * BLOCK) as u32)
                        .await
                }
            }
        })
        .await
    }

    async fn get(&self, byte: u64, len: u32) -> Bytes {
        let what = format!("read at {byte}");
        self.until_ok(&what, |s| async move {
            s.primary
                .read(s.epoch, FIRST_BLOCK * BLOCK + byte, len)
                .await
        })
        .await
    }

    async fn writer(self: Arc<Self>, w: u64) -> BTreeMap<u64, Vec<u8>> {
        let slots = self.size_blocks / CHAOS_SLOT_BLOCKS;
        let slot_bytes = (CHAOS_SLOT_BLOCKS * BLOCK) as usize;
        let mut rng = StdRng::seed_from_u64(1000 + w);
        let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut ops = 0u64;
        while !self.stop.load(Ordering::Relaxed) && ops < 200_000 {
            ops += 1;
            let slot = w + CHAOS_WRITERS * rng.random_range(0..slots / CHAOS_WRITERS);
            match rng.random_range(0..16) {
                0..=3 => {
                    let got = self.get(slot * slot_bytes as u64, slot_bytes as u32).await;
                    let zeros = vec![0u8; slot_bytes];
                    let want = model.get(&slot).unwrap_or(&zeros);
                    assert!(
                        got[..] == want[..],
                        "slot {slot}: read back differs from its last acknowledged write \
                         (epoch {}); {}",
                        self.serving().epoch,
                        self.history()
                    );
                }
                4 => {
                    self.put(slot, None).await;
                    model.insert(slot, vec![0u8; slot_bytes]);
                }
                _ => {
                    let data = pattern(&mut rng, slot_bytes);
                    self.put(slot, Some(&data)).await;
                    model.insert(slot, data);
                }
            }
        }
        model
    }

    /// Flushes, GC passes and checkpoints on whatever is primary.
    async fn background(self: Arc<Self>) {
        let mut i = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            i += 1;
            let primary = self.serving().primary;
            let _ = primary.flush_now().await;
            if i % 3 == 0 {
                let _ = primary.gc_pass().await;
            }
            if i % 2 == 0 {
                let _ = primary.write_checkpoint().await;
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }

    /// Releases the primary's log as often as it can, like the other
    /// partitions sharing a head node's log do (their flushes release it
    /// at any moment, also in the middle of a take-over).
    async fn releaser(self: Arc<Self>) {
        while !self.stop.load(Ordering::Relaxed) {
            let s = self.serving();
            let _ = s.primary.log().release().await;
            let _ = s.secondary.log().release().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A fresh secondary (empty log) at `epoch` and the peer that reaches it.
    async fn fresh_secondary(&self, epoch: u64) -> (Partition, Arc<Peer>) {
        let secondary = open_partition(
            &self.access,
            &self.extents,
            &Arc::new(MemoryDevice::new(WAL_DEVICE)),
            tuned(self.size_blocks, epoch, self.tune),
            OpenRole::Secondary,
            None,
        )
        .await;
        let peer = Arc::new(Peer::default());
        *peer.target.lock().unwrap() = Some(secondary.clone());
        (secondary, peer)
    }

    /// Kills the secondary (`promote` false: the primary takes over in
    /// place at the next epoch) or the primary (`promote` true: the
    /// secondary takes over); a fresh secondary joins either way.
    async fn take_over(&self, promote: bool, stall: Duration) {
        let old = self.serving();
        self.direct_writes.fetch_add(
            old.primary.metrics().direct_writes.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        old.peer.down.store(true, Ordering::SeqCst);
        if promote {
            old.primary.shutdown();
        } else {
            old.secondary.shutdown();
        }
        tokio::time::sleep(stall).await;
        let epoch = old.epoch + 1;
        let (secondary, peer) = self.fresh_secondary(epoch).await;
        let source = if promote {
            &old.secondary
        } else {
            &old.primary
        };
        let primary = take_over_in_place(
            source,
            tuned(self.size_blocks, epoch, self.tune),
            &self.access,
            &self.extents,
            Some(peer.clone()),
        )
        .await
        .unwrap_or_else(|e| panic!("take-over at epoch {epoch}: {e}; {}", self.history()));
        self.extents.min_epoch.store(epoch, Ordering::SeqCst);
        let recovery = primary.recovery_report();
        self.events.lock().unwrap().push(format!(
            "epoch {epoch}: {} (stall {stall:?}; held index {}, {} rows read)",
            if promote { "promoted" } else { "re-mirrored" },
            recovery.held_index,
            recovery.rows_scanned
        ));
        *self.serving.lock().unwrap() = Serving {
            primary,
            secondary,
            peer,
            epoch,
        };
    }
}

/// In-place take-overs (re-mirror: the secondary dies; promotion: the
/// primary dies) while writers with one sequential writer per slot write,
/// trim and read back, and flushes, GC and checkpoints run: every read
/// returns the slot's last acknowledged content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn take_overs_under_load_lose_no_acknowledged_write() {
    take_overs_under_load(chaos_tune).await;
}

fn chaos_direct_tune(c: &mut PartitionConfig) {
    chaos_tune(c);
    // Every chaos write of data (one 2-block slot) goes straight to the
    // sleds as a (partial) stripe: the full-stripe path under take-overs,
    // flushes, GC and checkpoints.
    c.direct_write_min_bytes = CHAOS_SLOT_BLOCKS * BLOCK;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn take_overs_under_load_with_direct_writes_lose_no_acknowledged_write() {
    let direct = take_overs_under_load(chaos_direct_tune).await;
    assert!(direct > 0, "no write went straight to the sleds");
}

/// Writers, flushes, GC and checkpoints on whatever serves, with
/// take-overs in between; every slot must read back its last acknowledged
/// write at the end. Returns the primaries' full-stripe writes.
async fn take_overs_under_load(tune: fn(&mut PartitionConfig)) -> u64 {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5u64);
    let rounds: u64 = std::env::var("CHAOS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let size_blocks = 512u64;
    let unit = Unit::new_tuned(size_blocks, tune).await;
    let chaos = Arc::new(Chaos {
        access: unit.access.clone(),
        extents: unit.extents.clone(),
        serving: Mutex::new(Serving {
            primary: unit.primary.clone(),
            secondary: unit.secondary.clone(),
            peer: unit.peer.clone(),
            epoch: unit.epoch,
        }),
        size_blocks,
        stop: AtomicBool::new(false),
        events: Mutex::new(Vec::new()),
        tune,
        direct_writes: AtomicU64::new(0),
    });
    let writers: Vec<_> = (0..CHAOS_WRITERS)
        .map(|w| tokio::spawn(chaos.clone().writer(w)))
        .collect();
    let background = tokio::spawn(chaos.clone().background());
    let releaser = tokio::spawn(chaos.clone().releaser());
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_millis(rng.random_range(30..150))).await;
        let stall = Duration::from_millis(rng.random_range(0..40));
        chaos.take_over(rng.random_bool(0.5), stall).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    chaos.stop.store(true, Ordering::SeqCst);
    let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for w in writers {
        model.extend(w.await.unwrap());
    }
    background.await.unwrap();
    releaser.await.unwrap();
    let slot_bytes = CHAOS_SLOT_BLOCKS * BLOCK;
    for (slot, want) in &model {
        let got = chaos.get(slot * slot_bytes, slot_bytes as u32).await;
        assert!(
            got[..] == want[..],
            "slot {slot} differs at the end; {}",
            chaos.history()
        );
    }
    chaos.serving().primary.check_invariants().unwrap();
    let history = chaos.history();
    println!("take-overs: {history}");
    // Promotions and re-mirrors start from the index the node held (the
    // checks above hold for them too).
    assert!(history.contains("held index true"), "{history}");
    chaos.direct_writes.load(Ordering::Relaxed)
        + chaos
            .serving()
            .primary
            .metrics()
            .direct_writes
            .load(Ordering::Relaxed)
}

/// A primary logs a write its secondary never confirms, dies, and the
/// promoted secondary reuses that sequence for another write. When the dead
/// node's log comes back (it rejoins as secondary, then is promoted, then
/// restarts), the unconfirmed record must not shadow the acknowledged write
/// with the same sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_primarys_unconfirmed_records_never_come_back() {
    let size = 64;
    let unit = Unit::new(size).await;
    unit.write(0, 0, vec![1; 4096]).await.unwrap();
    unit.peer.down.store(true, Ordering::SeqCst);
    let lost = unit.write(1, 0, vec![0xEE; 4096]).await;
    assert!(
        matches!(lost, Err(PartitionError::Unavailable { .. })),
        "{lost:?}"
    );
    unit.primary.shutdown();

    // The dead primary's node rejoins as the secondary of epoch 2 from its
    // own log; the old secondary is promoted and writes sequence 2 again.
    let rejoined = open_partition(
        &unit.access,
        &unit.extents,
        &unit.logs[0],
        config(size, 2),
        OpenRole::Secondary,
        None,
    )
    .await;
    let to_rejoined = Arc::new(Peer::default());
    *to_rejoined.target.lock().unwrap() = Some(rejoined.clone());
    let primary = take_over_in_place(
        &unit.secondary,
        config(size, 2),
        &unit.access,
        &unit.extents,
        Some(to_rejoined),
    )
    .await
    .unwrap();
    let acknowledged = vec![0x77; 4096];
    primary
        .write(
            2,
            (FIRST_BLOCK + 1) * 4096,
            Bytes::from(acknowledged.clone()),
            &chunk_crcs(&acknowledged),
        )
        .await
        .unwrap();
    // The rejoined node opened with nothing (its own records are not
    // trusted at a new epoch) and was jumped over the new primary's
    // unflushed tail (sequence 1): it holds block 0 only once the owed
    // flush is committed to it. Until then the pair is not in sync and the
    // control plane never promotes it (promoting it here anyway reads zeros
    // for block 0 in about 1 run of 7).
    wait_until("the pair in sync", Duration::from_secs(10), || {
        primary.secondary_in_sync()
    })
    .await;
    primary.shutdown();
    unit.extents.min_epoch.store(3, Ordering::SeqCst);

    // The rejoined node is promoted: it has the acknowledged write.
    let promoted = take_over_in_place(
        &rejoined,
        config(size, 3),
        &unit.access,
        &unit.extents,
        None,
    )
    .await
    .unwrap();
    let read = |p: Partition, epoch: u64| async move {
        p.read(epoch, FIRST_BLOCK * 4096, 2 * 4096).await.unwrap()
    };
    let got = read(promoted.clone(), 3).await;
    assert!(got[..4096] == [1u8; 4096][..], "block 0 after promotion");
    assert!(
        got[4096..] == acknowledged[..],
        "block 1 after promotion: the unconfirmed write came back"
    );
    promoted.shutdown();

    // ... and restarts from its log as the primary: the join marker keeps
    // the dead epoch's record out of the replay.
    let restarted = open_partition(
        &unit.access,
        &unit.extents,
        &unit.logs[0],
        config(size, 3),
        OpenRole::Primary,
        Some(Arc::new(Peer::default())),
    )
    .await;
    let got = read(restarted, 3).await;
    assert!(got[..4096] == [1u8; 4096][..], "block 0 after a restart");
    assert!(
        got[4096..] == acknowledged[..],
        "block 1 after a restart from the log: the unconfirmed write came back"
    );
}

/// An in-place take-over maps blocks only to log records the old instance
/// still holds: flushed records of the tail are left out, even while the
/// shared log still has them (another partition holds it further back), or
/// a release during the take-over would leave the index pointing at a log
/// record that is gone (reads and flushes of those blocks would then fail
/// for good, checkpoints would leave them out and GC free their sled copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn take_over_maps_no_block_to_a_log_record_it_does_not_hold() {
    let size = 64;
    let mut unit = Unit::new(size).await;
    // Another partition on the same log holds it from its first record on.
    let other_id = PartitionId {
        volume: PART.volume,
        index: PART.index + 1,
    };
    let other = Partition::open(
        PartitionConfig::new(other_id, FIRST_BLOCK + size, size, 1),
        OpenRole::Secondary,
        PartitionDeps {
            log: unit.primary.log().clone(),
            sleds: unit.access.clone(),
            extents: unit.extents.clone(),
            replica: None,
        },
        &[],
    )
    .await
    .unwrap();
    let data = Bytes::from(vec![9u8; 4096]);
    let reply = other
        .handle_replica(ReplicaRequest::Append {
            partition: other_id,
            epoch: 1,
            records: vec![proto::volume::ReplicaRecord {
                sequence: 1,
                kind: proto::volume::ReplicaRecordKind::Write,
                lba: FIRST_BLOCK + size,
                blocks: 1,
                crcs: chunk_crcs(&data),
                data,
            }],
        })
        .await;
    assert!(matches!(reply, ReplicaReply::Appended { .. }), "{reply:?}");
    for block in 0..4 {
        unit.write(block, 0, vec![block as u8 + 1; 4096])
            .await
            .unwrap();
    }
    unit.primary.flush_now().await.unwrap();
    assert_eq!(unit.primary.log_resident_blocks(), 0);
    let taken = unit.take_over(false, 2).await;
    assert_eq!(
        taken.log_resident_blocks(),
        0,
        "the take-over mapped flushed blocks to log records only the tail named"
    );
    let got = taken.read(2, FIRST_BLOCK * 4096, 4 * 4096).await.unwrap();
    for block in 0..4usize {
        assert!(got[block * 4096..(block + 1) * 4096]
            .iter()
            .all(|b| *b == block as u8 + 1));
    }
    drop(other);
}

/// A flush that writes its first batch and then fails: the first batch's
/// flush commit must not move a secondary that is still catching up past
/// the records left for the next batch (they are only in the logs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_flush_commit_does_not_skip_a_catching_up_secondary_past_unflushed_records() {
    fn two_block_batches(c: &mut PartitionConfig) {
        c.flush_batch_blocks = 2;
        c.checkpoint_every_flushes = 0;
        c.checkpoint_interval = Duration::ZERO;
    }
    let size = 64;
    let unit = Unit::new_tuned(size, two_block_batches).await;
    // Block 7 gets the oldest sequence, block 0 the newest: the first batch
    // (blocks 0 and 1) holds the newest records.
    for block in (0..8u64).rev() {
        unit.write(block, 0, vec![block as u8 + 1; 4096])
            .await
            .unwrap();
    }
    unit.secondary.shutdown();
    let fresh = open_partition(
        &unit.access,
        &unit.extents,
        &Arc::new(MemoryDevice::new(WAL_DEVICE)),
        tuned(size, 1, two_block_batches),
        OpenRole::Secondary,
        None,
    )
    .await;
    *unit.peer.target.lock().unwrap() = Some(fresh.clone());
    // One stripe (k + m appends) succeeds, then the sleds fail.
    let appended = unit.access.appends.load(Ordering::SeqCst);
    unit.access
        .fail_appends_from
        .store(appended + u64::from(K + M) + 1, Ordering::SeqCst);
    assert!(unit.primary.flush_now().await.is_err());
    unit.access.fail_appends_from.store(0, Ordering::SeqCst);
    // A new write: the secondary takes the flush commit, then catches up.
    unit.write(20, 0, vec![21; 4096]).await.unwrap();
    // That write found the fresh secondary (the primary learns of it only
    // by its next request) and jumped it over the unflushed tail, which it
    // is owed as a flush commit over all of it (a batch's commit below the
    // owed watermark is not one). The control plane promotes a secondary
    // only once the pair is in sync: the owed flush has then committed
    // every record the jump skipped. (Promoting it earlier, as this test
    // did before the tail was flushed instead of shipped, loses blocks.)
    wait_until("the pair in sync", Duration::from_secs(10), || {
        unit.primary.secondary_in_sync()
    })
    .await;
    unit.primary.shutdown();
    let promoted = take_over_in_place(
        &fresh,
        tuned(size, 2, two_block_batches),
        &unit.access,
        &unit.extents,
        None,
    )
    .await
    .unwrap();
    let got = promoted
        .read(2, FIRST_BLOCK * 4096, 8 * 4096)
        .await
        .unwrap();
    for block in 0..8usize {
        assert!(
            got[block * 4096..(block + 1) * 4096]
                .iter()
                .all(|b| *b == block as u8 + 1),
            "block {block} lost by the promoted secondary"
        );
    }
}

/// One sled gone (6 sleds, 4+2): flushes go to degraded extents (5 columns,
/// the last parity owed) instead of stopping; every block reads back, also
/// with a second sled down (decoded from the k others while the owed
/// column is missing) and after a restart (recovery reads summaries around
/// the owed column); the owed column is then rebuilt on the returning sled
/// and the extent survives any two lost sleds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sled_gone_flushes_into_degraded_extents_and_repair_writes_the_owed_column() {
    let size_blocks = 512;
    let mut unit = Unit::new(size_blocks).await;
    let mut model = Model::zeroed(size_blocks);
    let mut rng = StdRng::seed_from_u64(0xde9);
    unit.access.down.lock().unwrap().insert("sled-5".into());
    random_ops(&unit, &mut model, &mut rng, 200).await;
    let report = unit.primary.flush_now().await.unwrap();
    assert!(report.blocks > 0 && report.stripes > 0, "{report:?}");
    assert_eq!(unit.primary.log_resident_blocks(), 0);
    let degraded: Vec<ExtentGrant> = unit
        .extents
        .owned
        .lock()
        .unwrap()
        .values()
        .cloned()
        .collect();
    assert!(!degraded.is_empty());
    for grant in &degraded {
        assert_eq!(grant.owed, [5u16].into_iter().collect(), "{grant:?}");
        assert!(grant.present().all(|(_, (sled, _))| sled != "sled-5"));
    }
    let reads_before = unit.access.reads_answered("sled-5");
    check_all(&unit, &model, "flushed into degraded extents").await;
    // A second sled down: k columns left, reads decode around both.
    unit.access.down.lock().unwrap().insert("sled-0".into());
    check_all(&unit, &model, "degraded extent with a data sled down").await;
    assert!(
        unit.primary
            .metrics()
            .degraded_reads
            .load(Ordering::Relaxed)
            > 0
    );
    unit.access.down.lock().unwrap().remove("sled-0");
    // More writes and a flush; then recovery from the sleds alone.
    random_ops(&unit, &mut model, &mut rng, 100).await;
    unit.primary.flush_now().await.unwrap();
    unit.restart().await;
    check_all(&unit, &model, "after a restart with the owed column").await;
    assert_eq!(unit.access.reads_answered("sled-5"), reads_before);

    // sled-5 returns: rebuild the owed column of every degraded extent.
    unit.access.down.lock().unwrap().clear();
    let grants: Vec<ExtentGrant> = unit
        .extents
        .owned
        .lock()
        .unwrap()
        .values()
        .cloned()
        .collect();
    let mut rebuilt = 0;
    for grant in grants.into_iter().filter(|g| !g.owed.is_empty()) {
        let new = match unit
            .access
            .call(
                "sled-5",
                SledRequest::AllocateColumns {
                    column_count: 1,
                    device: None,
                },
            )
            .await
            .unwrap()
        {
            SledResponse::Allocated(c) => ("sled-5".to_string(), c[0]),
            other => panic!("{other:?}"),
        };
        let task = RebuildTask {
            grant: grant.clone(),
            column: 5,
            new: new.clone(),
            rate_bytes_per_second: 1 << 30,
        };
        let (progress, _watch) = tokio::sync::watch::channel(RebuildProgress::default());
        let owned = unit.extents.owned.clone();
        let extent = grant.extent;
        let done = unit
            .primary
            .rebuild_column(task, &progress, |_epoch| async move {
                // The control plane's CompleteRepair.
                let mut owned = owned.lock().unwrap();
                let g = owned.get_mut(&extent).unwrap();
                g.columns[5] = new;
                g.owed.remove(&5);
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(done.bytes_done, done.bytes_total);
        rebuilt += 1;
    }
    assert!(rebuilt > 0);
    // Reads are direct again (no decode with every sled up) ...
    let degraded_before = unit
        .primary
        .metrics()
        .degraded_reads
        .load(Ordering::Relaxed);
    check_all(&unit, &model, "after the rebuild").await;
    assert_eq!(
        unit.primary
            .metrics()
            .degraded_reads
            .load(Ordering::Relaxed),
        degraded_before
    );
    // ... and the rebuilt column decodes: any two other sleds down.
    unit.access.down.lock().unwrap().insert("sled-0".into());
    unit.access.down.lock().unwrap().insert("sled-4".into());
    check_all(&unit, &model, "rebuilt column with two sleds down").await;
    unit.access.down.lock().unwrap().clear();
    unit.restart().await;
    check_all(&unit, &model, "restart after the rebuild").await;
}

/// The engine does not care which columns are owed: with *data* column 0
/// owed in every extent, flushed blocks of that column are decoded on every
/// read (and not reported for repair), and a checkpoint written to a
/// degraded extent loads on a take-over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owed_data_column_is_decoded_on_reads_checkpoints_and_take_over() {
    let size_blocks = 512;
    let mut unit = Unit::new_tuned(size_blocks, checkpoint_on_demand).await;
    *unit.extents.owe.lock().unwrap() = vec![0];
    let mut model = Model::zeroed(size_blocks);
    let mut rng = StdRng::seed_from_u64(0x0ed);
    random_ops(&unit, &mut model, &mut rng, 150).await;
    unit.primary.flush_now().await.unwrap();
    check_all(&unit, &model, "owed data column").await;
    assert!(
        unit.primary
            .metrics()
            .degraded_reads
            .load(Ordering::Relaxed)
            > 0
    );
    assert!(unit.primary.repair_queue().is_empty());
    let checkpoint = unit.primary.write_checkpoint().await.unwrap();
    random_ops(&unit, &mut model, &mut rng, 60).await;
    unit.primary.flush_now().await.unwrap();
    for grant in unit.extents.owned.lock().unwrap().values() {
        assert_eq!(grant.owed, [0u16].into_iter().collect());
    }
    let taken = unit.take_over(false, 2).await;
    // The checkpoint in the degraded extent was loaded, not refused.
    let report = taken.recovery_report();
    assert_eq!(report.checkpoint, Some((1, checkpoint.id)), "{report:?}");
    assert_eq!(report.checkpoints_refused, 0);
    check_all(&unit, &model, "after a take-over from the checkpoint").await;
}

/// Polls `pass` until it has been suspended `awaits` times (or ends), then
/// drops it: the pass cancelled at its `awaits`-th await point. Returns
/// its output if it ended first.
async fn cancel_after<F: std::future::Future>(pass: F, awaits: usize) -> Option<F::Output> {
    let mut pass = std::pin::pin!(pass);
    for _ in 0..=awaits {
        if let std::task::Poll::Ready(output) = futures::poll!(pass.as_mut()) {
            return Some(output);
        }
        tokio::task::yield_now().await;
    }
    None
}

/// Issue 14 item 3: a flush, then a GC pass, cancelled at every await
/// point of their column appends (the sled seam yields around each call,
/// N = 0, 1, 2, ... until the pass completes), each followed by writes and
/// a complete pass; every block reads back after each step and after a
/// restart from the sleds (recovery finds no row it cannot decode or that
/// maps a block wrongly). Before `SealOnDrop` an abandoned append left its
/// extent open with `rows_written` short of what some columns held, and
/// the next stripe went to the same offset: accepted by the columns that
/// had nothing there, refused by the others (a row mixing two stripes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_and_gc_cancelled_at_every_await_leave_no_torn_row() {
    let size_blocks = 256u64;
    let mut unit = Unit::new(size_blocks).await;
    let mut model = Model::zeroed(size_blocks);
    let mut rng = StdRng::seed_from_u64(0xca9c);
    unit.access.yield_around_calls.store(true, Ordering::SeqCst);
    for gc in [false, true] {
        let what = if gc { "gc" } else { "flush" };
        let mut completed = false;
        for awaits in 0..400 {
            // Something to flush, and (for GC) garbage: overwrites of
            // flushed blocks.
            for _ in 0..4 {
                let chunk = rng.random_range(0..size_blocks / 16);
                write_chunk(&unit, &mut model, &mut rng, chunk).await;
            }
            if gc {
                // Every chunk flushed, then most overwritten and flushed:
                // extents with little live data left.
                for chunk in 0..size_blocks / 16 {
                    write_chunk(&unit, &mut model, &mut rng, chunk).await;
                }
                unit.primary.flush_now().await.unwrap();
                for chunk in 0..size_blocks / 16 {
                    if chunk % 4 != 0 {
                        write_chunk(&unit, &mut model, &mut rng, chunk).await;
                    }
                }
                unit.primary.flush_now().await.unwrap();
            }
            // Ended: the pass completed with work done (a GC pass that
            // found no candidate proves nothing).
            let ended = if gc {
                cancel_after(unit.primary.gc_pass(), awaits)
                    .await
                    .is_some_and(|r| r.unwrap().blocks_moved > 0)
            } else {
                cancel_after(unit.primary.flush_now(), awaits)
                    .await
                    .is_some_and(|r| r.unwrap().blocks > 0)
            };
            check_all(
                &unit,
                &model,
                &format!("{what} cancelled after {awaits} awaits"),
            )
            .await;
            // The next complete pass appends after whatever was abandoned.
            unit.primary.flush_now().await.unwrap();
            unit.primary.gc_pass().await.unwrap();
            check_all(
                &unit,
                &model,
                &format!("complete passes after {what} cancelled at {awaits}"),
            )
            .await;
            if awaits % 8 == 0 || ended {
                unit.restart().await;
                check_all(
                    &unit,
                    &model,
                    &format!("restart after {what} cancelled at {awaits}"),
                )
                .await;
            }
            if ended {
                assert!(awaits > 0, "{what} had no await point: nothing to do?");
                eprintln!("{what}: cancelled at each of its first {awaits} await points");
                completed = true;
                break;
            }
        }
        assert!(completed, "{what} did not complete within 400 awaits");
    }
}

/// Snapshot `id` read whole, 1 MiB at a time, checked against `model`.
async fn check_snapshot(unit: &Unit, id: u64, model: &Model, what: &str) {
    let total = unit.size_blocks * 4096;
    let mut at = 0;
    while at < total {
        let len = (total - at).min(1 << 20);
        let got = unit
            .primary
            .read_snapshot(Some(unit.epoch), id, FIRST_BLOCK * 4096 + at, len as u32)
            .await
            .unwrap();
        model.check(&got, at, what);
        at += len;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_survives_overwrites_flush_gc_restarts_and_its_drop_frees_space() {
    let size_blocks = 512u64;
    let mut unit = Unit::new(size_blocks).await;
    let mut model = Model::zeroed(size_blocks);
    let mut rng = StdRng::seed_from_u64(17);
    // Pattern A: half flushed, half still in the log at the cut, a hole.
    for chunk in 0..size_blocks / 16 - 2 {
        write_chunk(&unit, &mut model, &mut rng, chunk).await;
        if chunk == size_blocks / 32 {
            unit.primary.flush_now().await.unwrap();
        }
    }
    let cut = unit
        .primary
        .cut_snapshot(Some(unit.epoch), 1, false, Duration::from_secs(1))
        .await
        .unwrap();
    let at_cut = Model(model.0.clone());
    // The secondary holds the same snapshot (the marker was replicated).
    let on_secondary: Vec<(u64, u64)> = unit
        .secondary
        .snapshots()
        .iter()
        .map(|s| (s.id, s.cut))
        .collect();
    assert_eq!(on_secondary, vec![(1, cut)]);
    // Overwrite everything twice (the hole too), flushing as we go.
    for _ in 0..2 {
        for chunk in 0..size_blocks / 16 {
            write_chunk(&unit, &mut model, &mut rng, chunk).await;
            if chunk % 8 == 7 {
                unit.primary.flush_now().await.unwrap();
            }
        }
    }
    check_all(&unit, &model, "live after overwrites").await;
    check_snapshot(&unit, 1, &at_cut, "snapshot after overwrites").await;
    // Every block changed since the cut (the hole too, written since).
    let diff = unit.primary.snapshot_diff(Some(1), None).unwrap();
    assert_eq!(diff, vec![FIRST_BLOCK..FIRST_BLOCK + size_blocks]);
    assert!(unit
        .primary
        .snapshot_diff(Some(1), Some(1))
        .unwrap()
        .is_empty());
    unit.primary.flush_now().await.unwrap();
    assert_eq!(unit.primary.log_resident_blocks(), 0);
    unit.primary.gc_pass().await.unwrap();
    check_snapshot(&unit, 1, &at_cut, "snapshot after flush + gc").await;
    check_all(&unit, &model, "live after flush + gc").await;
    let pinned = unit.primary.snapshots()[0].pinned_blocks;
    assert_eq!(
        pinned,
        size_blocks - 32,
        "every block written before the cut"
    );
    // Restart without a checkpoint: the log's cut marker and the sled
    // summaries rebuild the layer.
    unit.restart().await;
    check_snapshot(&unit, 1, &at_cut, "snapshot after restart (full scan)").await;
    check_all(&unit, &model, "live after restart").await;
    // With a checkpoint: the layer comes from it.
    unit.primary.write_checkpoint().await.unwrap();
    unit.restart().await;
    assert!(unit.primary.recovery_report().checkpoint.is_some());
    check_snapshot(&unit, 1, &at_cut, "snapshot after restart (checkpoint)").await;
    check_all(&unit, &model, "live after checkpoint restart").await;
    // Drop: GC gets the pinned space back.
    let before = unit.sled_bytes_in_use();
    unit.primary.drop_snapshot(1).await.unwrap();
    assert!(unit.primary.snapshots().is_empty());
    assert!(unit.secondary.snapshots().is_empty());
    unit.primary.gc_pass().await.unwrap();
    let after = unit.sled_bytes_in_use();
    assert!(
        after < before,
        "sled bytes {before} before the drop, {after} after GC"
    );
    check_all(&unit, &model, "live after drop + gc").await;
    assert!(unit
        .primary
        .read_snapshot(Some(unit.epoch), 1, FIRST_BLOCK * 4096, 4096)
        .await
        .is_err());
    // It stays dropped across a restart.
    unit.restart().await;
    assert!(unit.primary.snapshots().is_empty());
    check_all(&unit, &model, "live after drop + restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_cut_delays_later_acks_until_released_and_aborts_on_its_own() {
    let size_blocks = 64u64;
    let unit = Arc::new(Unit::new(size_blocks).await);
    let mut model = Model::zeroed(size_blocks);
    let mut rng = StdRng::seed_from_u64(3);
    write_chunk(&unit, &mut model, &mut rng, 0).await;
    let at_cut = Model(model.0.clone());
    unit.primary
        .cut_snapshot(Some(unit.epoch), 5, true, Duration::from_secs(30))
        .await
        .unwrap();
    // A write after the cut is durable but not acknowledged while held.
    let writer = {
        let unit = unit.clone();
        tokio::spawn(async move { unit.write(0, 0, vec![0xab; 4096]).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!writer.is_finished(), "acknowledged through a held cut");
    let released = Instant::now();
    unit.primary.release_held_cut(5).unwrap();
    writer.await.unwrap().unwrap();
    // Released: a second release is refused (nothing is held).
    assert!(unit.primary.release_held_cut(5).is_err());
    assert!(released.elapsed() < Duration::from_millis(200));
    model.0[..4096].fill(0xab);
    check_snapshot(&unit, 5, &at_cut, "released snapshot").await;
    check_all(&unit, &model, "live after release").await;
    // A held cut nobody releases aborts itself: acks go, the snapshot too.
    unit.primary
        .cut_snapshot(Some(unit.epoch), 6, true, Duration::from_millis(100))
        .await
        .unwrap();
    unit.write(1, 0, vec![0xcd; 4096]).await.unwrap();
    model.0[4096..8192].fill(0xcd);
    wait_until("the unreleased cut aborted", Duration::from_secs(5), || {
        unit.primary.snapshots().iter().all(|s| s.id != 6)
    })
    .await;
    // The coordinator's late release is refused: the snapshot is gone.
    assert!(unit.primary.release_held_cut(6).is_err());
    check_all(&unit, &model, "live after abort").await;
    let ids: Vec<u64> = unit.primary.snapshots().iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![5]);
}

/// Block 0 of `unit` read as the counter the chain writer puts there.
async fn counter_in(unit: &Unit, snapshot: Option<u64>) -> u32 {
    let at = FIRST_BLOCK * 4096;
    let data = match snapshot {
        Some(id) => unit
            .primary
            .read_snapshot(Some(unit.epoch), id, at, 4096)
            .await
            .unwrap(),
        None => unit.read(0, 4096).await,
    };
    u32::from_le_bytes([data[0], data[1], data[2], data[3]])
}

/// Two partitions (of two units), one chain writer: write `i` to the
/// first, wait for its ack, write `i` to the second, then `i + 1` to the
/// first... Each snapshot cuts both with held acknowledgements and
/// releases them only once both are cut (what the control plane's
/// coordinator does): the snapshot then holds a prefix of the chain, so the
/// first partition's counter is the second's or one more. Without the
/// hold, a write acknowledged on the first after its cut could be followed
/// by one on the second before the second's cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_cuts_across_two_partitions_keep_causal_order() {
    let first = Arc::new(Unit::new(64).await);
    let second = Arc::new(Unit::new(64).await);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (first, second, stop) = (first.clone(), second.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i: u32 = 0;
            while !stop.load(Ordering::Relaxed) && i < 1_000_000 {
                i += 1;
                let block = |i: u32| {
                    let mut b = vec![0u8; 4096];
                    b[..4].copy_from_slice(&i.to_le_bytes());
                    b
                };
                first.write(0, 0, block(i)).await.unwrap();
                second.write(0, 0, block(i)).await.unwrap();
            }
            i
        })
    };
    let mut pauses = Vec::new();
    for id in 1..=8u64 {
        tokio::time::sleep(Duration::from_millis(20 + id * 7)).await;
        let started = Instant::now();
        let hold = Duration::from_secs(5);
        first
            .primary
            .cut_snapshot(Some(first.epoch), id, true, hold)
            .await
            .unwrap();
        // The coordinator's round trip to the second primary.
        tokio::time::sleep(Duration::from_millis(2)).await;
        second
            .primary
            .cut_snapshot(Some(second.epoch), id, true, hold)
            .await
            .unwrap();
        first.primary.release_cut(id);
        second.primary.release_cut(id);
        pauses.push(started.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written > 16, "the writer made {written} steps");
    for id in 1..=8u64 {
        let a = counter_in(&first, Some(id)).await;
        let b = counter_in(&second, Some(id)).await;
        assert!(
            a == b || a == b + 1,
            "snapshot {id}: first partition at {a}, second at {b}: not a prefix of the chain"
        );
    }
    let (a, b) = (
        counter_in(&first, None).await,
        counter_in(&second, None).await,
    );
    assert_eq!((a, b), (written, written));
    pauses.sort();
    println!("cut pause over two partitions (cut, cut, release): {pauses:?}");
}

/// The primary dies after a snapshot is ready: the secondary's node opens
/// the partition as primary from the sleds and its own log (the cut marker
/// and the pre-cut writes it holds) and serves the same snapshot; both
/// before any checkpoint (cut only in the logs) and with layer blocks
/// flushed and unflushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_secondary_serves_the_snapshot_of_the_dead_primary() {
    let size_blocks = 128u64;
    let mut unit = Unit::new(size_blocks).await;
    let mut model = Model::zeroed(size_blocks);
    let mut rng = StdRng::seed_from_u64(23);
    for chunk in 0..size_blocks / 16 {
        write_chunk(&unit, &mut model, &mut rng, chunk).await;
        if chunk == 3 {
            unit.primary.flush_now().await.unwrap();
        }
    }
    unit.primary
        .cut_snapshot(Some(unit.epoch), 3, false, Duration::from_secs(1))
        .await
        .unwrap();
    let at_cut = Model(model.0.clone());
    // Overwrite half, flush some of it (moving layer blocks to the sleds),
    // overwrite the other half only in the log.
    for chunk in 0..size_blocks / 32 {
        write_chunk(&unit, &mut model, &mut rng, chunk).await;
    }
    unit.primary.flush_now().await.unwrap();
    for chunk in size_blocks / 32..size_blocks / 16 {
        write_chunk(&unit, &mut model, &mut rng, chunk).await;
    }
    check_snapshot(&unit, 3, &at_cut, "before the primary dies").await;
    // The primary dies (no clean shutdown of its state matters: its node
    // is gone); the secondary's node takes over at epoch 2.
    let old = unit.primary.clone();
    old.shutdown();
    unit.secondary.shutdown();
    *unit.peer.target.lock().unwrap() = None;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let promoted = open_partition(
        &unit.access,
        &unit.extents,
        &unit.logs[1],
        config(size_blocks, 2),
        OpenRole::Primary,
        Some(Arc::new(Peer::default())),
    )
    .await;
    unit.primary = promoted;
    unit.epoch = 2;
    check_snapshot(&unit, 3, &at_cut, "on the promoted secondary").await;
    check_all(&unit, &model, "live on the promoted secondary").await;
}

/// In-place take-overs (a promotion of the secondary, then the primary
/// moving to a new epoch) hand the snapshots over with the log-resident
/// state: the cut, the layer's blocks still in the log (superseded in the
/// live index), the flushed ones, and a snapshot dropped since a checkpoint
/// that still holds it stays dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_take_overs_hand_the_snapshots_over() {
    let size_blocks = 128u64;
    let mut unit = Unit::new(size_blocks).await;
    let mut model = Model::zeroed(size_blocks);
    let mut rng = StdRng::seed_from_u64(29);
    for chunk in 0..size_blocks / 16 {
        write_chunk(&unit, &mut model, &mut rng, chunk).await;
        if chunk == 2 {
            unit.primary.flush_now().await.unwrap();
        }
    }
    unit.primary
        .cut_snapshot(Some(unit.epoch), 7, false, Duration::from_secs(1))
        .await
        .unwrap();
    let at_seven = Model(model.0.clone());
    unit.primary
        .cut_snapshot(Some(unit.epoch), 8, false, Duration::from_secs(1))
        .await
        .unwrap();
    // A checkpoint holds both snapshots; then 8 is dropped.
    unit.primary.write_checkpoint().await.unwrap();
    unit.primary.drop_snapshot(8).await.unwrap();
    // Overwrite half and flush it (layer blocks to the sleds), the other
    // half only in the log (layer blocks still in the log).
    for chunk in 0..size_blocks / 32 {
        write_chunk(&unit, &mut model, &mut rng, chunk).await;
    }
    unit.primary.flush_now().await.unwrap();
    for chunk in size_blocks / 32..size_blocks / 16 {
        write_chunk(&unit, &mut model, &mut rng, chunk).await;
    }
    check_snapshot(&unit, 7, &at_seven, "before the take-overs").await;
    let promoted = unit.take_over(true, 2).await;
    let ids: Vec<u64> = promoted.snapshots().iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![7], "snapshots after the promotion");
    check_snapshot(&unit, 7, &at_seven, "after the promotion").await;
    check_all(&unit, &model, "live after the promotion").await;
    let moved = unit.take_over(false, 3).await;
    let ids: Vec<u64> = moved.snapshots().iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![7], "snapshots after the new epoch");
    check_snapshot(&unit, 7, &at_seven, "after the new epoch").await;
    check_all(&unit, &model, "live after the new epoch").await;
}

// ---------------------------------------------------------------- secondary index

/// A promotion starts from the index the secondary kept of the flushed
/// data and reads only the rows written since its last pass (flushes and a
/// GC pass that moved blocks and freed extents it had applied); the result
/// is the index a full scan builds, and every acknowledged block reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_reads_only_rows_after_the_secondary_index_and_matches_a_full_scan() {
    let size_blocks = 1024u64;
    let mut unit = Unit::new_tuned(size_blocks, index_on_demand).await;
    let mut model = Model::zeroed(size_blocks);
    let mut rng = StdRng::seed_from_u64(71);
    for _ in 0..8 {
        random_ops(&unit, &mut model, &mut rng, 40).await;
        unit.primary.flush_now().await.unwrap();
    }
    let first = unit.secondary.refresh_secondary_index().await.unwrap();
    assert!(first > 0, "the first pass reads every row");
    let covered = unit.secondary.secondary_index_rows().unwrap();
    assert!(covered >= 8, "{covered} rows");
    // Nothing new: a second pass reads no summary.
    assert_eq!(unit.secondary.refresh_secondary_index().await.unwrap(), 0);
    // A GC pass moves blocks to new rows and frees extents the secondary
    // had applied; more flushes; a second pass applies them.
    let gc = unit.primary.gc_pass().await.unwrap();
    println!("gc: {gc:?}");
    for _ in 0..6 {
        random_ops(&unit, &mut model, &mut rng, 40).await;
        unit.primary.flush_now().await.unwrap();
    }
    assert!(unit.secondary.refresh_secondary_index().await.unwrap() > 0);
    // Rows the secondary has not applied: overwrites, another GC pass,
    // another flush, and an unflushed tail.
    random_ops(&unit, &mut model, &mut rng, 60).await;
    unit.primary.flush_now().await.unwrap();
    let gc = unit.primary.gc_pass().await.unwrap();
    println!("gc: {gc:?}");
    random_ops(&unit, &mut model, &mut rng, 20).await;
    unit.primary.flush_now().await.unwrap();
    random_ops(&unit, &mut model, &mut rng, 20).await;

    let before = unit.summary_reads();
    let promoted = unit.take_over(true, 2).await;
    let report = promoted.recovery_report();
    let reads = unit.summary_reads() - before;
    assert!(report.held_index, "{report:?}");
    assert_eq!(report.checkpoint, None);
    assert_eq!(reads, report.rows_scanned);
    assert!(reads > 0, "rows were written after the last pass");
    assert_eq!(
        promoted
            .metrics()
            .recovery_held_index_used
            .load(Ordering::Relaxed),
        1
    );
    check_all(&unit, &model, "after a promotion from the secondary index").await;
    let from_shadow = locations(&promoted, size_blocks);

    // The same index by a full scan (no checkpoint exists).
    let before = unit.summary_reads();
    let rescanned = unit.take_over(false, 3).await;
    let full = rescanned.recovery_report();
    let full_reads = unit.summary_reads() - before;
    assert!(!full.held_index && full.checkpoint.is_none(), "{full:?}");
    assert_eq!(
        locations(&rescanned, size_blocks),
        from_shadow,
        "secondary index + rows after it must give the index of a full scan"
    );
    check_all(&unit, &model, "after a full-scan take-over").await;
    println!("summary reads: {reads} from the secondary index, {full_reads} by the full scan");
    assert!(reads < full_reads, "{reads} vs {full_reads}");
}

/// With the background refresh on (the default), flush commits keep the
/// secondary's index current: the promotion reads (almost) no row; a
/// secondary whose index was built under other snapshot cuts, or that
/// kept none, recovers as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_commits_keep_the_secondary_index_current() {
    let size_blocks = 1024u64;
    let mut unit = Unit::new(size_blocks).await;
    let mut model = Model::zeroed(size_blocks);
    let mut rng = StdRng::seed_from_u64(72);
    for _ in 0..6 {
        random_ops(&unit, &mut model, &mut rng, 40).await;
        unit.primary.flush_now().await.unwrap();
    }
    // No checkpoint yet (every 32 flush commits): every row holds data.
    let row_bytes = ROW_BYTES * u64::from(K + M);
    let flushed_rows: u64 = unit
        .primary
        .extent_usage()
        .iter()
        .map(|(_, bytes)| bytes / row_bytes)
        .sum();
    assert!(flushed_rows >= 6, "{flushed_rows} rows");
    // The refresh runs in the background: bounded wait for it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if unit
            .secondary
            .secondary_index_rows()
            .is_some_and(|rows| rows >= flushed_rows)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "secondary index at {:?} rows of {flushed_rows}",
            unit.secondary.secondary_index_rows()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    random_ops(&unit, &mut model, &mut rng, 30).await;
    let promoted = unit.take_over(true, 2).await;
    let report = promoted.recovery_report();
    assert!(report.held_index, "{report:?}");
    check_all(&unit, &model, "after a promotion from a current index").await;
}

/// A primary taken over in place at a new epoch (its secondary replaced)
/// starts from its own index of the flushed data: it reads no stripe
/// summary, and every acknowledged block reads back, GC moves included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_epoch_take_over_starts_from_the_primary_s_own_index() {
    let size_blocks = 1024u64;
    let mut unit = Unit::new(size_blocks).await;
    let mut model = Model::zeroed(size_blocks);
    let mut rng = StdRng::seed_from_u64(73);
    for _ in 0..6 {
        random_ops(&unit, &mut model, &mut rng, 40).await;
        unit.primary.flush_now().await.unwrap();
    }
    unit.primary.gc_pass().await.unwrap();
    random_ops(&unit, &mut model, &mut rng, 30).await;
    let before = unit.summary_reads();
    let taken = unit.take_over(false, 2).await;
    let report = taken.recovery_report();
    assert!(report.held_index, "{report:?}");
    assert_eq!(report.rows_scanned, 0, "{report:?}");
    assert_eq!(unit.summary_reads(), before);
    check_all(
        &unit,
        &model,
        "after a new-epoch take-over from its own index",
    )
    .await;
}

/// The promoted-secondary snapshot loss: a flush covers the cut marker, the
/// checkpoint that would hold the snapshot fails (its sled appends fail),
/// and the primary dies. Before the fix the flush commit reached the
/// secondary at once, which released the marker from its log: the node
/// that took over found the cut neither in its log nor in the sleds'
/// newest checkpoint and served no snapshot (`snapshots()` empty, reads
/// refused) although the control plane recorded it ready. Now the commit
/// is parked until a checkpoint holds the marker: the secondary's log still
/// has the cut, and the promoted node serves the snapshot as cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_a_flush_covered_before_any_checkpoint_survives_the_primary() {
    let size_blocks = 128u64;
    let mut unit = Unit::new_tuned(size_blocks, checkpoint_on_demand).await;
    let mut model = Model::zeroed(size_blocks);
    let mut rng = StdRng::seed_from_u64(41);
    for chunk in 0..size_blocks / 16 {
        write_chunk(&unit, &mut model, &mut rng, chunk).await;
    }
    unit.primary.flush_now().await.unwrap();
    unit.primary.write_checkpoint().await.unwrap();
    // The appends of one flush of four chunks (no checkpoint is due).
    let before = unit.access.appends.load(Ordering::SeqCst);
    for chunk in 0..4 {
        write_chunk(&unit, &mut model, &mut rng, chunk).await;
    }
    unit.primary.flush_now().await.unwrap();
    let per_flush = unit.access.appends.load(Ordering::SeqCst) - before;
    assert!(per_flush > 0);
    unit.primary
        .cut_snapshot(Some(unit.epoch), 4, false, Duration::from_secs(1))
        .await
        .unwrap();
    let at_cut = Model(model.0.clone());
    // The same flush again, now over the cut: its data appends go, every
    // append after them (the checkpoint's) fails.
    for chunk in 0..4 {
        write_chunk(&unit, &mut model, &mut rng, chunk).await;
    }
    let checkpoints = unit
        .primary
        .metrics()
        .checkpoints_written
        .load(Ordering::SeqCst);
    let from = unit.access.appends.load(Ordering::SeqCst) + per_flush + 1;
    unit.access.fail_appends_from.store(from, Ordering::SeqCst);
    unit.primary.flush_now().await.unwrap();
    assert_eq!(
        unit.primary
            .metrics()
            .checkpoints_written
            .load(Ordering::SeqCst),
        checkpoints,
        "the checkpoint after the flush must fail for this test"
    );
    unit.access.fail_appends_from.store(0, Ordering::SeqCst);
    // Time for a flush commit to reach the secondary and release its log.
    tokio::time::sleep(Duration::from_millis(300)).await;
    check_snapshot(&unit, 4, &at_cut, "before the primary dies").await;
    // The primary dies; the secondary's node opens the partition at epoch
    // 2 from its own log and the sleds.
    unit.primary.shutdown();
    unit.secondary.shutdown();
    *unit.peer.target.lock().unwrap() = None;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let promoted = open_partition(
        &unit.access,
        &unit.extents,
        &unit.logs[1],
        tuned(size_blocks, 2, checkpoint_on_demand),
        OpenRole::Primary,
        Some(Arc::new(Peer::default())),
    )
    .await;
    unit.primary = promoted;
    unit.epoch = 2;
    let ids: Vec<u64> = unit.primary.snapshots().iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![4], "snapshots on the promoted secondary");
    check_snapshot(&unit, 4, &at_cut, "on the promoted secondary").await;
    check_all(&unit, &model, "live on the promoted secondary").await;
    // Its own flush and checkpoint keep it.
    unit.primary.flush_now().await.unwrap();
    unit.primary.write_checkpoint().await.unwrap();
    check_snapshot(&unit, 4, &at_cut, "after the promoted node's checkpoint").await;
}

/// One acknowledged write of the causal property test, on a logical clock
/// shared by every writer and the coordinator (ticks taken before a write
/// is issued and after its acknowledgement arrived).
#[derive(Debug, Clone, Copy)]
struct ClockedWrite {
    id: u32,
    unit: usize,
    block: u64,
    issued: u64,
    acked: u64,
}

/// Causal consistency, property-tested: three partitions (three units),
/// four writer tasks each with its own blocks on every partition (so the
/// writes of a block are ordered), each issuing its next write (random
/// partition and block, seeded) only after the previous one's
/// acknowledgement: random dependency chains across partitions. The
/// partitions are two volumes, A (units 0 and 1) and B (unit 2), so the
/// chains cross volumes too. Snapshots are cut the coordinator's way
/// (every partition of the snapshot cut with a hold, in a random order
/// with random gaps, then all released): odd ids are a consistency
/// group's (A and B: every partition), even ids a plain snapshot of A
/// alone (its chains through B are not its concern). Every snapshot must
/// hold every write on its partitions acknowledged before its first cut
/// was sent, none issued after its last release, and be causally closed
/// over its partitions: no write acknowledged before another was issued
/// is missing while the later one is in (on the logical clock: max issue
/// of the writes in <= min ack of those out), for the group across both
/// volumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_cuts_over_random_dependent_writes_on_three_partitions_are_causally_closed() {
    use rand::seq::SliceRandom as _;
    const UNITS: usize = 3;
    const WRITERS: u64 = 4;
    const BLOCKS_PER_WRITER: u64 = 4;
    const SNAPSHOTS: u64 = 6;
    let seed = std::env::var("SNAPSHOT_CAUSAL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x005e_ed17_u64);
    println!("SNAPSHOT_CAUSAL_SEED={seed}");
    let mut units = Vec::new();
    for _ in 0..UNITS {
        units.push(Arc::new(Unit::new(64).await));
    }
    let units = Arc::new(units);
    let clock = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let next_id = Arc::new(AtomicU64::new(1));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (units, clock, stop, next_id) =
            (units.clone(), clock.clone(), stop.clone(), next_id.clone());
        let mut rng = StdRng::seed_from_u64(seed ^ (w + 1).wrapping_mul(0x9e37_79b9));
        writers.push(tokio::spawn(async move {
            let mut log = Vec::new();
            while !stop.load(Ordering::Relaxed) && log.len() < 100_000 {
                let unit = rng.random_range(0..UNITS);
                let block = w * BLOCKS_PER_WRITER + rng.random_range(0..BLOCKS_PER_WRITER);
                let id = next_id.fetch_add(1, Ordering::SeqCst) as u32;
                let mut data = vec![0u8; 4096];
                data[..4].copy_from_slice(&id.to_le_bytes());
                data[4..12].copy_from_slice(&block.to_le_bytes());
                let issued = clock.fetch_add(1, Ordering::SeqCst);
                units[unit].write(block, 0, data).await.unwrap();
                let acked = clock.fetch_add(1, Ordering::SeqCst);
                log.push(ClockedWrite {
                    id,
                    unit,
                    block,
                    issued,
                    acked,
                });
                if rng.random_bool(0.2) {
                    tokio::task::yield_now().await;
                }
            }
            log
        }));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    // The partitions each snapshot cuts: volume A's, or the group's.
    let covered = |id: u64| -> Vec<usize> {
        if id % 2 == 1 {
            (0..UNITS).collect()
        } else {
            vec![0, 1]
        }
    };
    // (snapshot id, first cut sent, last release done) on the clock.
    let mut spans = Vec::new();
    for id in 1..=SNAPSHOTS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(10..60))).await;
        let mut order = covered(id);
        order.shuffle(&mut rng);
        let start = clock.fetch_add(1, Ordering::SeqCst);
        for u in &order {
            let unit = &units[*u];
            unit.primary
                .cut_snapshot(Some(unit.epoch), id, true, Duration::from_secs(10))
                .await
                .unwrap();
            // The coordinator's round trips, of random length.
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..4))).await;
        }
        for u in &order {
            units[*u].primary.release_held_cut(id).unwrap();
        }
        let end = clock.fetch_add(1, Ordering::SeqCst);
        spans.push((id, start, end));
    }
    stop.store(true, Ordering::Relaxed);
    let mut writes = Vec::new();
    for writer in writers {
        writes.extend(writer.await.unwrap());
    }
    assert!(writes.len() > 100, "only {} writes", writes.len());
    // Each (unit, block)'s writes in order.
    let mut chains: BTreeMap<(usize, u64), Vec<ClockedWrite>> = BTreeMap::new();
    for w in &writes {
        chains.entry((w.unit, w.block)).or_default().push(*w);
    }
    for chain in chains.values_mut() {
        chain.sort_by_key(|w| w.issued);
    }
    let stamp = |data: &[u8], unit: usize, block: u64| -> Option<u32> {
        let id = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        if id == 0 {
            assert!(
                data.iter().all(|b| *b == 0),
                "unit {unit} block {block}: torn"
            );
            return None;
        }
        let mut at = [0u8; 8];
        at.copy_from_slice(&data[4..12]);
        assert_eq!(
            u64::from_le_bytes(at),
            block,
            "unit {unit}: misplaced write {id}"
        );
        Some(id)
    };
    let mut report = Vec::new();
    for (id, start, end) in spans {
        let mut inside = Vec::new();
        let mut outside = Vec::new();
        let partitions = covered(id);
        for ((u, block), chain) in chains.iter().filter(|((u, _), _)| partitions.contains(u)) {
            let unit = &units[*u];
            let data = unit
                .primary
                .read_snapshot(Some(unit.epoch), id, (FIRST_BLOCK + block) * 4096, 4096)
                .await
                .unwrap();
            let held = match stamp(&data, *u, *block) {
                None => 0,
                Some(w) => {
                    1 + chain.iter().position(|c| c.id == w).unwrap_or_else(|| {
                        panic!(
                        "snapshot {id}: unit {u} block {block} holds write {w}, never acked there"
                    )
                    })
                }
            };
            inside.extend_from_slice(&chain[..held]);
            outside.extend_from_slice(&chain[held..]);
        }
        for w in &outside {
            assert!(
                w.acked > start,
                "snapshot {id} (cut from {start}): misses {w:?}, acked before"
            );
        }
        for w in &inside {
            assert!(
                w.issued < end,
                "snapshot {id} (released at {end}): holds {w:?}, issued after"
            );
        }
        if let (Some(later), Some(earlier)) = (
            inside.iter().max_by_key(|w| w.issued),
            outside.iter().min_by_key(|w| w.acked),
        ) {
            assert!(
                earlier.acked > later.issued,
                "snapshot {id}: holds {later:?} but misses {earlier:?}, acknowledged before it was issued (seed {seed})"
            );
        }
        report.push((id, inside.len(), outside.len()));
    }
    // The writes go on during the cuts: at least one group snapshot and
    // one plain one split them.
    for kind in [1, 0] {
        assert!(
            report
                .iter()
                .any(|(id, i, o)| id % 2 == kind && *i > 0 && *o > 0),
            "no {} snapshot was taken mid-write: {report:?}",
            if kind == 1 { "group" } else { "plain" }
        );
    }
    println!(
        "{} writes; per snapshot (id, in, out): {report:?}",
        writes.len()
    );
}

/// A clone's parent snapshot for the tests: volume block `b` is filled with
/// `parent_byte(b)` (never zero), and every read is counted.
#[derive(Debug)]
struct PatternParent;

static PARENT_READS: AtomicU64 = AtomicU64::new(0);

fn parent_byte(volume_block: u64) -> u8 {
    (volume_block % 250) as u8 + 1
}

impl ParentSnapshot for PatternParent {
    fn read(
        &self,
        offset_bytes: u64,
        len_bytes: u32,
    ) -> BoxFuture<'static, Result<Bytes, PeerError>> {
        PARENT_READS.fetch_add(1, Ordering::Relaxed);
        assert_eq!(offset_bytes % BLOCK, 0, "a parent read at {offset_bytes}");
        assert_eq!(
            u64::from(len_bytes) % BLOCK,
            0,
            "a parent read of {len_bytes}"
        );
        let first = offset_bytes / BLOCK;
        let data: Vec<u8> = (first..first + u64::from(len_bytes) / BLOCK)
            .flat_map(|b| std::iter::repeat_n(parent_byte(b), BLOCK as usize))
            .collect();
        Box::pin(async move { Ok(Bytes::from(data)) })
    }
}

fn clone_of_pattern(c: &mut PartitionConfig) {
    c.parent = Some(Arc::new(PatternParent));
}

/// A clone's partition reads its parent where it never wrote, its own data
/// where it wrote (a partial block keeps the parent's rest), zeros where it
/// trimmed (a tombstone, not a hole), before and after a flush and after a
/// restart from the devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_reads_its_parent_where_it_never_wrote_and_zeros_where_it_trimmed() {
    let size = 64;
    let mut unit = Unit::new_tuned(size, clone_of_pattern).await;
    let mut model = Model::zeroed(size);
    for b in 0..size {
        let at = (b * BLOCK) as usize;
        model.0[at..at + BLOCK as usize].fill(parent_byte(FIRST_BLOCK + b));
    }
    check_all(&unit, &model, "untouched clone").await;
    let before = PARENT_READS.load(Ordering::Relaxed);
    // A whole block, a partial block (read-modify-write over the parent),
    // a trim of two blocks.
    unit.write(3, 0, vec![0xAA; BLOCK as usize]).await.unwrap();
    model.0[(3 * BLOCK) as usize..(4 * BLOCK) as usize].fill(0xAA);
    unit.write(5, 1024, vec![0xBB; 512]).await.unwrap();
    model.0[(5 * BLOCK + 1024) as usize..(5 * BLOCK + 1536) as usize].fill(0xBB);
    unit.primary
        .unmap(unit.epoch, (FIRST_BLOCK + 7) * BLOCK, (2 * BLOCK) as u32)
        .await
        .unwrap();
    model.0[(7 * BLOCK) as usize..(9 * BLOCK) as usize].fill(0);
    check_all(&unit, &model, "written clone").await;
    assert!(PARENT_READS.load(Ordering::Relaxed) > before);
    unit.primary.flush_now().await.unwrap();
    check_all(&unit, &model, "flushed clone").await;
    unit.write(9, 0, vec![0xCC; BLOCK as usize]).await.unwrap();
    model.0[(9 * BLOCK) as usize..(10 * BLOCK) as usize].fill(0xCC);
    unit.restart().await;
    check_all(&unit, &model, "clone after a restart").await;
    // A snapshot of the clone falls through to the parent as well.
    unit.primary
        .cut_snapshot(Some(unit.epoch), 1, false, Duration::from_secs(1))
        .await
        .unwrap();
    unit.write(0, 0, vec![0xDD; BLOCK as usize]).await.unwrap();
    let snap = unit
        .primary
        .read_snapshot(
            Some(unit.epoch),
            1,
            FIRST_BLOCK * BLOCK,
            (size * BLOCK) as u32,
        )
        .await
        .unwrap();
    model.check(&snap, 0, "snapshot of the clone");
}

/// A flatten copies every block a clone never wrote from its parent while
/// the host writes (one writer, random blocks, so the model knows each
/// block's last write): no host write is overwritten by the copy, a
/// trimmed block stays zeros, and afterwards the partition reads the same
/// without its parent (reopened from the devices with none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flatten_under_writes_copies_only_unwritten_blocks() {
    let size = 512;
    let unit = Unit::new_tuned(size, clone_of_pattern).await;
    let mut model = Model::zeroed(size);
    for b in 0..size {
        let at = (b * BLOCK) as usize;
        model.0[at..at + BLOCK as usize].fill(parent_byte(FIRST_BLOCK + b));
    }
    unit.primary
        .unmap(unit.epoch, (FIRST_BLOCK + 40) * BLOCK, (8 * BLOCK) as u32)
        .await
        .unwrap();
    model.0[(40 * BLOCK) as usize..(48 * BLOCK) as usize].fill(0);
    assert_eq!(unit.primary.parent_blocks(), size - 8);
    let unit = Arc::new(unit);
    let writer = {
        let unit = unit.clone();
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(17);
            let mut writes = Vec::new();
            for i in 0..300u32 {
                let block = rng.random_range(0..size);
                let fill = 0x80 | (i % 0x7f) as u8;
                unit.write(block, 0, vec![fill; BLOCK as usize])
                    .await
                    .unwrap();
                writes.push((block, fill));
            }
            writes
        })
    };
    // Small steps, so copies and host writes interleave.
    let mut cursor = 0;
    let mut copied = 0;
    let mut passes = 0;
    loop {
        let step = unit
            .primary
            .flatten_step(unit.epoch, cursor, 3)
            .await
            .unwrap();
        copied += step.copied_blocks;
        match step.next {
            Some(next) => cursor = next,
            None if unit.primary.parent_blocks() == 0 => break,
            None => {
                cursor = 0;
                passes += 1;
                assert!(passes < 10, "flatten does not converge");
            }
        }
    }
    let writes = writer.await.unwrap();
    for (block, fill) in writes {
        model.0[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize].fill(fill);
    }
    assert!(copied > 0 && copied <= size - 8, "copied {copied}");
    assert_eq!(unit.primary.parent_blocks(), 0);
    check_all(&unit, &model, "flattened clone").await;
    // A step with nothing left copies nothing.
    let idle = unit.primary.flatten_step(unit.epoch, 0, 64).await.unwrap();
    assert_eq!((idle.copied_blocks, idle.next), (0, None));
    // Without its parent, after a flush and a restart, the same content.
    unit.primary.flush_now().await.unwrap();
    let mut unit = Arc::into_inner(unit).unwrap();
    unit.tune = no_tuning;
    unit.restart().await;
    check_all(&unit, &model, "flattened clone without its parent").await;
}

/// Rolling a partition back to a snapshot: the live blocks read as the
/// snapshot (written blocks, a trim, never-written blocks), a later
/// snapshot keeps its content, a step resumed from an earlier cursor
/// changes nothing, and all of it survives a flush and a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_restores_a_snapshot_and_keeps_the_later_one() {
    let size = 96;
    let mut unit = Unit::new(size).await;
    let mut rng = StdRng::seed_from_u64(23);
    let mut a = Model::zeroed(size);
    // A: the first 64 blocks (the rest never written).
    let data = pattern(&mut rng, (64 * BLOCK) as usize);
    unit.write(0, 0, data.clone()).await.unwrap();
    a.0[..data.len()].copy_from_slice(&data);
    unit.primary
        .cut_snapshot(Some(unit.epoch), 1, false, Duration::from_secs(1))
        .await
        .unwrap();
    // B: overwrites, a write past A, a trim.
    let mut b = Model(a.0.clone());
    for (block, fill) in [(3u64, 0xb1u8), (70, 0xb2)] {
        unit.write(block, 0, vec![fill; BLOCK as usize])
            .await
            .unwrap();
        b.0[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize].fill(fill);
    }
    unit.primary
        .unmap(unit.epoch, (FIRST_BLOCK + 10) * BLOCK, (4 * BLOCK) as u32)
        .await
        .unwrap();
    b.0[(10 * BLOCK) as usize..(14 * BLOCK) as usize].fill(0);
    unit.primary.flush_now().await.unwrap();
    unit.primary
        .cut_snapshot(Some(unit.epoch), 2, false, Duration::from_secs(1))
        .await
        .unwrap();
    // C after the second snapshot.
    unit.write(20, 0, vec![0xc1; (8 * BLOCK) as usize])
        .await
        .unwrap();
    let read_snap = |unit: &Unit, id: u64| {
        let primary = unit.primary.clone();
        let epoch = unit.epoch;
        async move {
            primary
                .read_snapshot(Some(epoch), id, FIRST_BLOCK * BLOCK, (size * BLOCK) as u32)
                .await
                .unwrap()
        }
    };
    let mut cursor = Some(0);
    let mut steps = 0;
    while let Some(at) = cursor {
        cursor = unit
            .primary
            .rollback_step(unit.epoch, 1, at, 7)
            .await
            .unwrap()
            .next;
        steps += 1;
        assert!(steps < 100);
    }
    check_all(&unit, &a, "rolled back to snapshot 1").await;
    b.check(
        &read_snap(&unit, 2).await,
        0,
        "snapshot 2 after the rollback",
    );
    a.check(
        &read_snap(&unit, 1).await,
        0,
        "snapshot 1 after the rollback",
    );
    // Resumed from the start (a failover before the cursor was recorded):
    // the rolled-back blocks hold new versions (the rollback's writes),
    // so they differ from the snapshot by version and are rewritten
    // again, with the content they have.
    let redo = unit
        .primary
        .rollback_step(unit.epoch, 1, 0, 64)
        .await
        .unwrap();
    assert_eq!(redo.next, Some(64));
    assert!(
        redo.rewritten_blocks > 0 && redo.rewritten_blocks <= 64,
        "{redo:?}"
    );
    check_all(&unit, &a, "a resumed rollback").await;
    unit.primary.flush_now().await.unwrap();
    unit.restart().await;
    check_all(&unit, &a, "rolled back, after a restart").await;
    b.check(&read_snap(&unit, 2).await, 0, "snapshot 2 after a restart");
}
