//! Sled loss and drain with real processes (issue 6, "What it must show"
//! item 3): a verifying workload runs while two sleds are killed; once they
//! are declared Failed, the repair controller reserves replacement columns
//! and the primaries rebuild them; full redundancy is checked through the
//! control plane's unit status, and every acknowledged write is read back,
//! also after two *other* sleds are killed (the rebuilt columns are real).
//!
//! The unit has **8 sleds** for a 4+2 code: an extent's six columns live on
//! six different sleds, so after losing two of six sleds there is no sled
//! left to put a replacement on (invariant 3 forbids two columns of an
//! extent on one sled). Two spare sleds are what makes full redundancy
//! reachable again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use client::{ClientConfig, VolumeClient};
use local_control_plane::client::LcpClient;
use local_control_plane::{Command, Health, Outcome, UnitStatus};
use proto::link::LinkConfig;
use tests::{Daemon, HeadNodeOptions, TestUnit};
use tokio::sync::Mutex;

const MIB: u64 = 1 << 20;
const K: u8 = 4;
const M: u8 = 2;
const SLEDS: u32 = 8;
const COLUMN_BYTES: u64 = MIB;
const DEVICE_BYTES: u64 = 48 * MIB;
const VOLUME_BYTES: u64 = 32 * MIB;
const PARTITION_BYTES: u64 = 8 * MIB;
const BLOCK: u64 = 4096;

/// One unit at a time in this module (2 shared cores).
static ONE_UNIT_AT_A_TIME: Mutex<()> = Mutex::const_new(());

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: u64) -> Vec<u8> {
        (0..len.div_ceil(8))
            .flat_map(|_| self.next().to_le_bytes())
            .take(len as usize)
            .collect()
    }
}

fn lcp_client(unit: &TestUnit) -> LcpClient {
    LcpClient::with_config(
        &unit.rack(),
        LinkConfig {
            connect_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_secs(3),
            probe_interval: Duration::from_millis(200),
            probe_timeout: Duration::from_millis(300),
            failures_before_down: 2,
        },
    )
    .with_retries(10, Duration::from_millis(300))
}

fn client_config() -> ClientConfig {
    ClientConfig {
        failover_timeout: Duration::from_secs(30),
        link: LinkConfig {
            connect_timeout: Duration::from_millis(300),
            ..LinkConfig::default()
        },
        ..ClientConfig::default()
    }
}

struct Unit {
    unit: TestUnit,
    _heads: Vec<Daemon>,
    sleds: Vec<Option<Daemon>>,
    lcp: LcpClient,
    client: Arc<VolumeClient>,
    started: Instant,
    name: &'static str,
}

impl Unit {
    async fn start(name: &'static str, volume: u64, config: &str) -> Unit {
        let started = Instant::now();
        let unit = TestUnit::build(
            HeadNodeOptions {
                count: 3,
                ..HeadNodeOptions::default()
            },
            SLEDS,
            &format!("{K}+{M}"),
            DEVICE_BYTES,
            COLUMN_BYTES,
        );
        unit.append_head_node_config(&format!(
            "wal_size_bytes = {}\nio_engine = \"sync\"\nflush_age_ms = 300\n\
             repair_max_concurrent = 8\nrepair_bytes_per_second = {}\n\
             repair_poll_interval_ms = 100\n{config}",
            64 * MIB,
            200 * MIB
        ));
        let sleds = unit.start_sleds().into_iter().map(Some).collect();
        let heads = unit.start_head_nodes();
        let lcp = lcp_client(&unit);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let command = Command::RegisterVolume {
                volume,
                name: format!("repair-{volume}"),
                size_bytes: VOLUME_BYTES,
                partition_size_bytes: PARTITION_BYTES,
                k: K,
                m: M,
            };
            match lcp.command(command).await {
                Ok(Ok(Outcome::VolumeRegistered { .. })) => break,
                Ok(Err(e)) if e.is_retryable() && Instant::now() < deadline => {}
                Err(e) if Instant::now() < deadline => eprintln!("register: {e}"),
                other => panic!("register volume {volume}: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for (i, head) in heads.iter().enumerate() {
            unit.wait_datapath_ready(i, head, Duration::from_secs(30));
        }
        let client = VolumeClient::connect(lcp_client(&unit), volume, client_config())
            .await
            .unwrap();
        let this = Unit {
            unit,
            _heads: heads,
            sleds,
            lcp,
            client: Arc::new(client),
            started,
            name,
        };
        this.note("unit up, volume registered");
        this
    }

    fn note(&self, what: &str) {
        eprintln!("{}: {what} at {:?}", self.name, self.started.elapsed());
    }

    fn kill_sled(&mut self, i: usize) {
        let mut sled = self.sleds[i].take().unwrap();
        sled.kill9();
        self.note(&format!("kill -9 {}", sled.name));
    }

    async fn status(&self) -> UnitStatus {
        self.lcp.unit_status().await.unwrap().1
    }

    fn head_logs(&self) -> String {
        self._heads
            .iter()
            .map(|h| {
                let text = h.log_text();
                let start = text.len().saturating_sub(6000);
                format!("---- {} ----\n{}", h.name, &text[start..])
            })
            .collect()
    }

    /// Waits until no column is on a sled in `gone` (and none is being
    /// repaired or waiting), then checks full redundancy from the status:
    /// every extent's k+m columns are on Up sleds (used columns on Up sleds
    /// add up to extents × (k+m), nothing used on the others).
    async fn wait_full_redundancy(&self, gone: &[&str], timeout: Duration) -> UnitStatus {
        let deadline = Instant::now() + timeout;
        let mut last_note = Instant::now();
        loop {
            let s = self.status().await;
            let used_on = |f: &dyn Fn(&local_control_plane::state::SledStatus) -> bool| -> usize {
                s.sleds
                    .iter()
                    .filter(|sled| f(sled))
                    .flat_map(|sled| sled.devices.iter())
                    .map(|d| d.used_columns)
                    .sum()
            };
            let on_gone = used_on(&|sled| gone.contains(&sled.id.0.as_str()));
            let on_up = used_on(&|sled| sled.health == Health::Up);
            let done = on_gone == 0
                && s.repair.tasks.is_empty()
                && s.repair.columns_waiting == 0
                && on_up == s.extents * usize::from(K + M);
            if done {
                return s;
            }
            if last_note.elapsed() > Duration::from_secs(3) {
                last_note = Instant::now();
                self.note(&format!(
                    "waiting: {on_gone} columns on {gone:?}, repair {} pending {} running {} waiting, {} B left at {} B/s, {} done",
                    s.repair.pending,
                    s.repair.running,
                    s.repair.columns_waiting,
                    s.repair.bytes_remaining,
                    s.repair.rate_bytes_per_second,
                    s.repair.completed
                ));
            }
            assert!(
                Instant::now() < deadline,
                "no full redundancy after {timeout:?}: {:?}\n{}",
                s.repair,
                self.head_logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn wait_health(&self, sleds: &[&str], health: Health, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status().await;
            if sleds.iter().all(|id| {
                s.sleds
                    .iter()
                    .any(|sled| sled.id.0 == *id && sled.health == health)
            }) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{sleds:?} not {health:?} after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Reads the whole volume and compares with the model.
    async fn check(&self, model: &[u8], when: &str) {
        for offset in (0..VOLUME_BYTES).step_by(MIB as usize) {
            let data = self
                .client
                .read(offset, MIB)
                .await
                .unwrap_or_else(|e| panic!("{when}: read at {offset}: {e}"));
            let want = &model[offset as usize..(offset + MIB) as usize];
            if data.as_ref() != want {
                let at = data.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                panic!(
                    "{when}: volume differs from the model at byte {}",
                    offset + at as u64
                );
            }
        }
        self.note(&format!("every acknowledged write reads back {when}"));
    }
}

/// Writer + reader: each step writes 4..64 KiB at a random block, records
/// it once acknowledged, then reads a random range and compares it with the
/// model. Returns (operations, errors found).
async fn workload(
    client: Arc<VolumeClient>,
    model: Arc<Mutex<Vec<u8>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    seed: u64,
) -> (u64, Vec<String>) {
    let mut rng = Rng::new(seed);
    let mut ops = 0u64;
    let mut errors = Vec::new();
    let blocks = VOLUME_BYTES / BLOCK;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && errors.len() < 10 {
        let start = rng.below(blocks);
        let count = 1 + rng.below(16.min(blocks - start));
        let (offset, len) = (start * BLOCK, count * BLOCK);
        let data = rng.bytes(len);
        let mut model_guard = model.lock().await;
        match client.write(offset, Bytes::from(data.clone()), false).await {
            Ok(()) => model_guard[offset as usize..(offset + len) as usize].copy_from_slice(&data),
            Err(e) => errors.push(format!("write {offset}+{len}: {e}")),
        }
        drop(model_guard);
        let start = rng.below(blocks);
        let count = 1 + rng.below(64.min(blocks - start));
        let (offset, len) = (start * BLOCK, count * BLOCK);
        let model_guard = model.lock().await;
        match client.read(offset, len).await {
            Ok(got) => {
                if got.as_ref() != &model_guard[offset as usize..(offset + len) as usize] {
                    errors.push(format!("read {offset}+{len}: wrong data"));
                }
            }
            Err(e) => errors.push(format!("read {offset}+{len}: {e}")),
        }
        drop(model_guard);
        ops += 1;
    }
    (ops, errors)
}

/// Fills the volume in 256 KiB writes (every block holds data).
async fn fill(unit: &Unit, model: &Mutex<Vec<u8>>, rng: &mut Rng) {
    let mut model = model.lock().await;
    for offset in (0..VOLUME_BYTES).step_by(256 * 1024) {
        let data = rng.bytes(256 * 1024);
        unit.client
            .write(offset, Bytes::from(data.clone()), false)
            .await
            .unwrap_or_else(|e| panic!("fill at {offset}: {e}"));
        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    }
    unit.note("volume filled");
}

fn flush(unit: &Unit) {
    for (i, answer) in unit.unit.flush_all().into_iter().enumerate() {
        let (status, body) = answer.unwrap_or_else(|| panic!("POST /flush on head node {i}"));
        assert_eq!(status, 200, "flush on head node {i}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sleds_lost_during_io_are_rebuilt_elsewhere_and_survive_two_more_losses() {
    let _one = ONE_UNIT_AT_A_TIME.lock().await;
    let mut unit = Unit::start("sled-loss", 61, "sled_failed_after_ms = 1000\n").await;
    let mut rng = Rng::new(61);
    let model = Arc::new(Mutex::new(vec![0u8; VOLUME_BYTES as usize]));
    fill(&unit, &model, &mut rng).await;
    flush(&unit);
    let before = unit.status().await;
    unit.note(&format!("{} extents before the failure", before.extents));

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(workload(
        unit.client.clone(),
        model.clone(),
        stop.clone(),
        rng.next(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    unit.kill_sled(0);
    unit.kill_sled(1);
    let killed_at = Instant::now();
    unit.wait_health(
        &["sled-1", "sled-2"],
        Health::Failed,
        Duration::from_secs(30),
    )
    .await;
    let failed_at = Instant::now();
    unit.note(&format!(
        "sled-1 and sled-2 declared Failed {:?} after the kill",
        failed_at - killed_at
    ));
    let after = unit
        .wait_full_redundancy(&["sled-1", "sled-2"], Duration::from_secs(60))
        .await;
    let rebuild_seconds = failed_at.elapsed().as_secs_f64();
    let rebuilt = after.repair.completed_bytes;
    println!(
        "REBUILD: {} columns, {:.1} MB in {:.2} s = {:.1} MB/s (unit limit {} MB/s, 8 concurrent)",
        after.repair.completed,
        rebuilt as f64 / 1e6,
        rebuild_seconds,
        rebuilt as f64 / 1e6 / rebuild_seconds,
        200 * MIB / 1_000_000
    );
    assert!(after.repair.completed > 0, "nothing was rebuilt");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ops, errors) = load.await.unwrap();
    unit.note(&format!(
        "workload: {ops} write+read steps during the loss and rebuild"
    ));
    assert!(errors.is_empty(), "workload errors: {errors:?}");
    assert!(ops > 0);

    let model = model.lock().await.clone();
    flush(&unit);
    unit.check(&model, "after the rebuild").await;

    // The rebuilt columns are real: lose two sleds that held survivors.
    unit.kill_sled(2);
    unit.kill_sled(3);
    unit.check(&model, "with two other sleds killed").await;
    assert!(
        unit.started.elapsed() < Duration::from_secs(120),
        "took {:?}",
        unit.started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_sled_ends_with_no_column_and_data_intact() {
    let _one = ONE_UNIT_AT_A_TIME.lock().await;
    let mut unit = Unit::start("drain", 62, "").await;
    let mut rng = Rng::new(62);
    let model = Arc::new(Mutex::new(vec![0u8; VOLUME_BYTES as usize]));
    fill(&unit, &model, &mut rng).await;
    flush(&unit);
    let command = Command::SetSledHealth {
        sled: local_control_plane::SledId::new("sled-5"),
        health: Health::Draining,
    };
    assert!(matches!(unit.lcp.command(command).await, Ok(Ok(_))));
    unit.note("sled-5 Draining");
    let after = unit
        .wait_full_redundancy(&["sled-5"], Duration::from_secs(60))
        .await;
    assert!(after.repair.completed > 0);
    let model = model.lock().await.clone();
    unit.check(&model, "after the drain").await;
    // Its columns are really elsewhere: stop it and two more.
    unit.kill_sled(4);
    unit.kill_sled(5);
    unit.kill_sled(6);
    unit.check(&model, "with the drained sled and two others killed")
        .await;
}
