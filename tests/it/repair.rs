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
use local_control_plane::{Command, Health, UnitStatus};
use proto::link::LinkConfig;
use tests::{Daemon, HeadNodeOptions, Rng, TestUnit};
use tokio::sync::Mutex;

const MIB: u64 = 1 << 20;
const K: u8 = 4;
const M: u8 = 2;
const SLEDS: u32 = 8;
const COLUMN_BYTES: u64 = 4 * MIB;
const DEVICE_BYTES: u64 = 64 * MIB;
const VOLUME_BYTES: u64 = 32 * MIB;
const PARTITION_BYTES: u64 = 8 * MIB;
const BLOCK: u64 = proto::BLOCK_SIZE_BYTES;

/// One unit at a time in this module (2 shared cores).
static ONE_UNIT_AT_A_TIME: Mutex<()> = Mutex::const_new(());

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
        Unit::start_with(name, volume, config, false).await
    }

    /// `scrub`: sleds scrub every 300 ms at 64 MiB/s.
    async fn start_with(name: &'static str, volume: u64, config: &str, scrub: bool) -> Unit {
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
        // Defaults for the keys `config` does not set (TOML keys are unique).
        let mut lines = config.to_string();
        for (key, value) in [
            ("wal_size_bytes", (64 * MIB).to_string()),
            ("io_engine", "\"sync\"".to_string()),
            ("flush_age_ms", "300".to_string()),
            ("repair_max_concurrent", "8".to_string()),
            ("repair_bytes_per_second", (200 * MIB).to_string()),
            ("repair_poll_interval_ms", "100".to_string()),
        ] {
            if !config.contains(key) {
                lines.push_str(&format!("{key} = {value}\n"));
            }
        }
        unit.append_head_node_config(&lines);
        if scrub {
            for sled in &unit.sleds {
                let text = std::fs::read_to_string(&sled.config).unwrap();
                let text = text
                    .replace(
                        "scrub_bytes_per_second = 0",
                        &format!("scrub_bytes_per_second = {}", 64 * MIB),
                    )
                    .replace(
                        "scrub_pass_interval_ms = 60000",
                        "scrub_pass_interval_ms = 300",
                    );
                std::fs::write(&sled.config, text).unwrap();
            }
        }
        let sleds = unit.start_sleds().into_iter().map(Some).collect();
        let heads = unit.start_head_nodes();
        let lcp = unit.lcp_client();
        tests::register_volume(
            &lcp,
            Command::RegisterVolume {
                volume,
                name: format!("repair-{volume}"),
                size_bytes: VOLUME_BYTES,
                partition_size_bytes: PARTITION_BYTES,
                k: K,
                m: M,
            },
            Duration::from_secs(30),
        )
        .await;
        unit.wait_datapaths_ready(&heads, Duration::from_secs(30));
        let client = tests::connect_client(&unit, volume, client_config())
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

    fn restart_sled(&self, i: usize) -> Daemon {
        let sled = self.unit.start_sled(i);
        self.note(&format!("restarted {}", sled.name));
        sled
    }

    /// Waits until `sleds` hold no retired column and no used one (their
    /// old columns were all reclaimed); returns their free column count.
    async fn wait_no_retired(&self, sleds: &[&str], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status().await;
            let devices: Vec<_> = s
                .sleds
                .iter()
                .filter(|sled| sleds.contains(&sled.id.0.as_str()))
                .flat_map(|sled| sled.devices.iter())
                .collect();
            let retired: usize = devices.iter().map(|d| d.retired_columns).sum();
            if retired == 0 {
                return devices.iter().map(|d| d.free_columns).sum();
            }
            assert!(
                Instant::now() < deadline,
                "{retired} retired columns left on {sleds:?} after {timeout:?}\n{}",
                self.head_logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The unit status (retried across a Raft leader change).
    async fn status(&self) -> UnitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.lcp.unit_status().await {
                Ok((_, status)) => return status,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("unit status: {e}");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => panic!("unit status: {e}"),
            }
        }
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
    // Per column, as the primaries measured it (copy only, no scheduling).
    let mut per_column: Vec<f64> = unit
        ._heads
        .iter()
        .flat_map(|h| {
            h.log_text()
                .lines()
                .filter(|l| l.contains("column rebuilt"))
                .filter_map(|l| {
                    let at = l.find("mb_per_second=")? + "mb_per_second=".len();
                    l[at..].split_whitespace().next()?.parse::<f64>().ok()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    // Empty columns (extents never written) say nothing about the rate.
    per_column.retain(|rate| *rate > 0.0);
    per_column.sort_by(|a, b| a.total_cmp(b));
    if let (Some(median), Some(max)) = (per_column.get(per_column.len() / 2), per_column.last()) {
        println!(
            "REBUILD per non-empty column (primaries' view, {} columns): median {median:.1} MB/s, max {max:.1} MB/s",
            per_column.len()
        );
    }
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

    // The two sleds come back (same devices, stale columns): with every
    // column rebuilt elsewhere they return to service, and the columns
    // they held are freed on the sleds and go back to the free pool.
    let returned = unit.restart_sled(0);
    unit.sleds[0] = Some(returned);
    let returned = unit.restart_sled(1);
    unit.sleds[1] = Some(returned);
    unit.wait_health(&["sled-1", "sled-2"], Health::Up, Duration::from_secs(30))
        .await;
    let reclaimed = unit
        .wait_no_retired(&["sled-1", "sled-2"], Duration::from_secs(30))
        .await;
    unit.note(&format!(
        "sled-1 and sled-2 back Up; their retired columns freed ({reclaimed} free columns on them)"
    ));
    unit.check(&model, "with the returned sleds").await;

    // The rebuilt columns are real: lose two sleds that held survivors.
    unit.kill_sled(2);
    unit.kill_sled(3);
    unit.check(&model, "with two other sleds killed").await;
    unit.note("done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_sled_ends_with_no_column_and_data_intact() {
    let _one = ONE_UNIT_AT_A_TIME.lock().await;
    let mut unit = Unit::start("drain", 62, "").await;
    let mut rng = Rng::new(62);
    let model = Arc::new(Mutex::new(vec![0u8; VOLUME_BYTES as usize]));
    fill(&unit, &model, &mut rng).await;
    flush(&unit);
    // The operator's verb: Draining, then a progress bar down to 0.
    let rack = unit.unit.rack_path.to_str().unwrap().to_string();
    let drain = tokio::task::spawn_blocking(move || {
        std::process::Command::new(tests::rackblock_bin())
            .args(["sled", "drain", "sled-5", "--wait", "--wait-timeout", "60s"])
            .args(["--rack", &rack])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&drain.stdout);
    assert!(
        drain.status.success() && stdout.contains("sled-5 holds no columns"),
        "sled drain --wait: {:?}\n{stdout}\n{}\n{}",
        drain.status,
        String::from_utf8_lossy(&drain.stderr),
        unit.head_logs()
    );
    unit.note("rackblock sled drain --wait returned: no column left on sled-5");
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

/// Every 512-byte-aligned offset of `path` where `needle` starts.
/// A bit flipped on a sled's device is found by the sled's scrubber (no
/// host read touches it), the leader turns the scrub report into a
/// `Corruption` replacement, the primary rebuilds the whole column
/// elsewhere at the configured rate, and the data then survives the loss
/// of two other sleds (which it could not with the corrupt column still in
/// the extent: 3 of 6 columns gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_found_corruption_is_rebuilt_into_a_new_column_at_the_configured_rate() {
    let _one = ONE_UNIT_AT_A_TIME.lock().await;
    // One task at a time at 512 KiB/s: the rate limit is visible.
    const RATE: u64 = 512 * 1024;
    let mut unit = Unit::start_with(
        "scrub",
        63,
        &format!(
            "repair_scrub_poll_interval_ms = 300\nrepair_max_concurrent = 1\n\
             repair_bytes_per_second = {RATE}\ngc_interval_ms = 600000\n"
        ),
        true,
    )
    .await;
    let mut rng = Rng::new(63);
    // 4 MiB at offset 0 (one partition): 16 stripes; every block stamped.
    let mut data = rng.bytes(4 * MIB);
    for (i, block) in data.chunks_mut(BLOCK as usize).enumerate() {
        block[..16].copy_from_slice(format!("rb-scrubbed-{i:04}").as_bytes());
    }
    unit.client
        .write(0, Bytes::from(data.clone()), false)
        .await
        .unwrap();
    flush(&unit);
    let needle = b"rb-scrubbed-0005";
    let (corrupt_sled, _, _) = unit.unit.flip_bit_in_stamped_block(needle);
    let flipped = Instant::now();
    unit.note(&format!("flipped a bit on sled-{}", corrupt_sled + 1));

    // Catch the task while it runs (rate-limited), then its completion.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut task = None;
    let done = loop {
        let s = unit.status().await;
        if let Some(t) = s
            .repair
            .tasks
            .iter()
            .find(|t| t.reason == local_control_plane::RepairReason::Corruption)
        {
            let old = t.old.as_ref().expect("a corrupt column is present");
            assert_eq!(old.sled.0, format!("sled-{}", corrupt_sled + 1));
            assert_ne!(t.new.sled, old.sled);
            task = Some(t.clone());
        }
        if task.is_some() && s.repair.tasks.is_empty() && s.repair.completed >= 1 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "corruption not repaired: {:?}\n{}",
            s.repair,
            unit.head_logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let task = task.unwrap();
    let seconds = flipped.elapsed().as_secs_f64();
    let bytes = done.repair.completed_bytes;
    println!(
        "SCRUB REPAIR: column {} of extent {} ({} -> {}), {bytes} bytes, {seconds:.2} s after the flip (limit {RATE} B/s)",
        task.column_index,
        task.extent,
        task.old.as_ref().expect("present"),
        task.new
    );
    // A full bucket (one second of rate) passes at once; the rest is paced.
    let floor = bytes.saturating_sub(RATE) as f64 / RATE as f64;
    assert!(
        seconds >= floor,
        "{bytes} bytes rebuilt in {seconds:.2} s, faster than {RATE} B/s allows"
    );
    let got = unit.client.read(0, 4 * MIB).await.unwrap();
    assert!(got.as_ref() == &data[..], "data differs after the repair");
    // Two sleds that are neither the corrupt one nor the new column's.
    let spare: Vec<usize> = (0..SLEDS as usize)
        .filter(|&i| i != corrupt_sled && format!("sled-{}", i + 1) != task.new.sled.0)
        .take(2)
        .collect();
    for i in spare {
        unit.kill_sled(i);
    }
    let got = unit.client.read(0, 4 * MIB).await.unwrap();
    assert!(
        got.as_ref() == &data[..],
        "data differs with two other sleds killed"
    );
    unit.note("every block reads back with two other sleds killed");
}

/// The primary running a rebuild is killed (`kill -9`) halfway: the
/// failover controller promotes its partitions' secondaries, and the new
/// primaries resume the tasks from where the new columns end (claimed at
/// the new epoch, which fences any append of the dead primary). Full
/// redundancy is reached and every acknowledged write reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_survives_the_death_of_its_primary() {
    let _one = ONE_UNIT_AT_A_TIME.lock().await;
    let mut unit = Unit::start(
        "rebuild-failover",
        64,
        &format!(
            "sled_failed_after_ms = 500\nrepair_max_concurrent = 2\nrepair_bytes_per_second = {}\n",
            4 * MIB
        ),
    )
    .await;
    let mut rng = Rng::new(64);
    let model = Arc::new(Mutex::new(vec![0u8; VOLUME_BYTES as usize]));
    fill(&unit, &model, &mut rng).await;
    flush(&unit);
    unit.kill_sled(0);
    unit.wait_health(&["sled-1"], Health::Failed, Duration::from_secs(30))
        .await;
    // A task with real progress, then its head node dies.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (node, task) = loop {
        let s = unit.status().await;
        let running = s.repair.tasks.iter().find(|t| {
            t.phase == local_control_plane::RepairPhase::Running
                && t.bytes_done > 0
                && t.bytes_done < t.bytes_total
        });
        if let Some(t) = running {
            break (t.node.clone().unwrap(), t.clone());
        }
        assert!(
            Instant::now() < deadline,
            "no rebuild in progress: {:?}",
            s.repair
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let index = unit.unit.head_node_index(&node.0);
    unit._heads[index].kill9();
    unit.note(&format!(
        "kill -9 {node} while it rebuilt column {} of extent {} ({} of {} bytes)",
        task.column_index, task.extent, task.bytes_done, task.bytes_total
    ));
    let after = unit
        .wait_full_redundancy(&["sled-1"], Duration::from_secs(90))
        .await;
    assert!(after.repair.completed > 0);
    let model = model.lock().await.clone();
    unit.check(&model, "after the rebuild moved to a new primary")
        .await;
    unit.kill_sled(1);
    unit.kill_sled(2);
    unit.check(&model, "with two more sleds killed").await;
}
