//! The head-node data path across real processes (issue 4, "what it must
//! show" 1–3): 3 head nodes and 6 sleds (code 4+2, 1 MiB columns) on
//! loopback, a volume registered through the local control plane and driven
//! through `client::VolumeClient`.
//!
//! * `random_ops_match_a_byte_model_across_flush_restarts_and_two_sleds_down`:
//!   aligned and 512-byte writes, overlapping, trims and write-zeroes against
//!   a byte model; checked in the log, after `POST /flush`, after SIGTERM of
//!   every process, after `kill -9` of every process, and with two sleds
//!   stopped (degraded reads).
//! * `corrupt_sled_bytes_are_decoded_and_reported`: a byte of a flushed
//!   block flipped in a sled's device file; reads stay correct and the
//!   corruption shows in the head node's status or the sled's metrics.
//! * `write_stalls_while_the_secondary_is_stopped`: SIGSTOP the
//!   secondary head node (failure detection off, so no re-mirroring); a
//!   write must not acknowledge on one copy; after SIGCONT writes proceed
//!   and every acknowledged write reads back.
//! * `write_acknowledges_only_once_a_new_secondary_is_named`: the same with
//!   the failover controller on: the write acknowledges only once the
//!   control plane named a new secondary (epoch + 1).
//! * `gc_returns_sled_space_to_about_k_plus_m_over_k_of_live_data`: the
//!   volume written twice over; once GC ran, the columns claimed on the sleds
//!   are ≈ (k+m)/k × live data.
//!
//! The tests of this module run one at a time (a unit is nine debug-build
//! processes on two cores); each bounds its own duration.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use client::{ClientConfig, VolumeClient};
use local_control_plane::client::LcpClient;
use local_control_plane::Command;
use proto::link::{LinkConfig, LinkMetrics, PeerLink};
use proto::sled::{SledRequest, SledResponse};
use proto::Message;
use tests::{http_get, Daemon, HeadNodeOptions, Rng, TestUnit};

const MIB: u64 = 1 << 20;
const K: u64 = 4;
const M: u64 = 2;
const COLUMN_BYTES: u64 = MIB;
const DEVICE_BYTES: u64 = 48 * MIB;
const SECTOR: u64 = 512;
/// One stripe chunk and one row of a column (head-node partition/layout.rs).
const CHUNK_BYTES: u64 = 64 * 1024;
const ROW_BYTES: u64 = CHUNK_BYTES + proto::BLOCK_SIZE_BYTES;

/// One data-path unit at a time in this test binary.
static ONE_UNIT_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn client_config() -> ClientConfig {
    ClientConfig {
        // Long enough for a restart of every process, short enough to
        // fail a test well inside its bound.
        failover_timeout: Duration::from_secs(30),
        link: LinkConfig {
            connect_timeout: Duration::from_millis(300),
            ..LinkConfig::default()
        },
        ..ClientConfig::default()
    }
}

/// How to stop every process of the unit.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Term,
    Kill,
}

/// A running unit with one registered volume and a client of it.
struct Cluster {
    unit: TestUnit,
    heads: Vec<Daemon>,
    /// `None` while stopped.
    sleds: Vec<Option<Daemon>>,
    client: VolumeClient,
    volume: u64,
    volume_bytes: u64,
    started: Instant,
    name: &'static str,
}

impl Cluster {
    /// Builds and starts a unit, registers `volume` and connects a client.
    /// `config` is appended to every head node's config.
    async fn start(
        name: &'static str,
        volume: u64,
        volume_bytes: u64,
        partition_bytes: u64,
        config: &str,
    ) -> Cluster {
        let options = HeadNodeOptions {
            count: 3,
            ..HeadNodeOptions::default()
        };
        Cluster::start_with(options, name, volume, volume_bytes, partition_bytes, config).await
    }

    async fn start_with(
        options: HeadNodeOptions,
        name: &'static str,
        volume: u64,
        volume_bytes: u64,
        partition_bytes: u64,
        config: &str,
    ) -> Cluster {
        let started = Instant::now();
        let unit = TestUnit::build(options, 6, &format!("{K}+{M}"), DEVICE_BYTES, COLUMN_BYTES);
        unit.append_head_node_config(&format!(
            "wal_size_bytes = {}\nio_engine = \"sync\"\n{config}",
            64 * MIB
        ));
        let sleds = unit.start_sleds().into_iter().map(Some).collect();
        let heads = unit.start_head_nodes();
        let lcp = unit.lcp_client();
        register(&lcp, volume, volume_bytes, partition_bytes).await;
        // The tests flush at once: every sled's columns must be known.
        let free = unit
            .wait_sled_columns_registered(&lcp, Duration::from_secs(20))
            .await;
        eprintln!("{name}: free columns per sled {free:?}");
        lcp.close();
        unit.wait_datapaths_ready(&heads, Duration::from_secs(20));
        let client = tests::connect_client(&unit, volume, client_config())
            .await
            .unwrap();
        let cluster = Cluster {
            unit,
            heads,
            sleds,
            client,
            volume,
            volume_bytes,
            started,
            name,
        };
        cluster.note("unit up, volume registered");
        cluster
    }

    fn note(&self, what: &str) {
        eprintln!("{}: {what} at {:?}", self.name, self.started.elapsed());
    }

    /// Stops every process (sleds and head nodes), starts them again and
    /// waits until every head node's data path is ready.
    fn restart_all(&mut self, how: Stop) {
        for daemon in self.heads.iter_mut().chain(self.sleds.iter_mut().flatten()) {
            match how {
                Stop::Term => assert!(
                    daemon.terminate(),
                    "{} did not exit 0 within 10 s of SIGTERM; log tail:\n{}",
                    daemon.name,
                    tail(&daemon.log_text())
                ),
                Stop::Kill => daemon.kill9(),
            }
        }
        self.heads.clear();
        self.sleds.clear();
        self.sleds = self.unit.start_sleds().into_iter().map(Some).collect();
        self.heads = self.unit.start_head_nodes();
        self.unit
            .wait_datapaths_ready(&self.heads, Duration::from_secs(30));
        self.note(&format!("every process restarted ({how:?})"));
    }

    /// `POST /flush` on every head node; every primary's log is empty after.
    fn flush(&self) {
        for (i, answer) in self.unit.flush_all().into_iter().enumerate() {
            let (status, body) = answer.unwrap_or_else(|| panic!("POST /flush on head node {i}"));
            assert_eq!(status, 200, "flush on head node {i}: {body}");
        }
        for p in self.partitions() {
            if p["role"] == "primary" && p["volume"] == self.volume {
                assert_eq!(p["log_resident_blocks"], 0, "after flush: {p}");
            }
        }
    }

    /// Every partition every running head node hosts (`/partitions`).
    fn partitions(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for head in &self.unit.head_nodes {
            let Some((200, body)) = http_get(head.admin, "/partitions") else {
                continue;
            };
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            out.extend(json["partitions"].as_array().cloned().unwrap_or_default());
        }
        out
    }

    /// Sum of a numeric field over the primaries of the volume.
    fn primaries_sum(&self, field: &str) -> u64 {
        self.partitions()
            .iter()
            .filter(|p| p["role"] == "primary" && p["volume"] == self.volume)
            .map(|p| p[field].as_u64().unwrap_or(0))
            .sum()
    }

    /// Reads the whole volume in 1 MiB pieces and compares with the model.
    async fn check(&self, model: &[u8], when: &str) {
        assert_eq!(model.len() as u64, self.volume_bytes);
        for offset in (0..self.volume_bytes).step_by(MIB as usize) {
            let len = MIB.min(self.volume_bytes - offset);
            let data = self
                .client
                .read(offset, len)
                .await
                .unwrap_or_else(|e| panic!("{when}: read at {offset}: {e}"));
            compare(
                &data,
                &model[offset as usize..(offset + len) as usize],
                offset,
                when,
            );
        }
        self.note(&format!("volume matches the model {when}"));
    }

    /// Bytes of sled space claimed: non-free columns × column size, from
    /// every running sled's inventory.
    async fn sled_bytes_claimed(&self) -> u64 {
        let mut total = 0;
        for sled in &self.unit.sleds {
            let link = sled_link(sled);
            let reply = link.call(Message::Sled(SledRequest::Inventory), true).await;
            link.close();
            let Ok(Message::SledReply(SledResponse::Inventory(inventory))) = reply else {
                panic!("{}: inventory: {reply:?}", sled.id)
            };
            for device in &inventory.devices {
                total += u64::from(device.column_count - device.free_columns)
                    * inventory.column_size_bytes;
            }
        }
        total
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.client.close();
    }
}

fn sled_link(sled: &tests::TestSled) -> Arc<PeerLink> {
    PeerLink::new(
        sled.id.clone(),
        sled.address_a,
        sled.address_b,
        LinkConfig {
            connect_timeout: Duration::from_millis(300),
            auth: Some(sled.member()),
            ..LinkConfig::default()
        },
        LinkMetrics::unregistered(),
    )
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn compare(got: &[u8], want: &[u8], offset: u64, when: &str) {
    assert_eq!(got.len(), want.len(), "{when}: read at {offset}: length");
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
        let end = (at + 16).min(got.len());
        panic!(
            "{when}: volume byte {} differs: got {:02x?}, want {:02x?}",
            offset + at as u64,
            &got[at..end],
            &want[at..end]
        );
    }
}

/// Registers the volume, retrying while the leader still registers the
/// rack inventory and the sleds' columns (bounded).
async fn register(lcp: &LcpClient, volume: u64, size_bytes: u64, partition_size_bytes: u64) {
    let partitions = size_bytes.div_ceil(partition_size_bytes) as usize;
    let placement = tests::register_volume(
        lcp,
        Command::RegisterVolume {
            volume,
            name: format!("datapath-{volume}"),
            size_bytes,
            partition_size_bytes,
            k: K as u8,
            m: M as u8,
        },
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(placement.len(), partitions);
}

/// `ops` random operations on the volume and the model: writes of 1 to 64
/// sectors at any sector (so partial blocks, block-aligned runs and ranges
/// across partition boundaries all happen, and later ones overlap earlier
/// ones), one in ten a trim, one in ten a write-zeroes.
async fn random_ops(cluster: &Cluster, model: &mut [u8], rng: &mut Rng, ops: usize) {
    let sectors = cluster.volume_bytes / SECTOR;
    let (mut writes, mut trims, mut zeroes, mut unaligned) = (0, 0, 0, 0);
    for _ in 0..ops {
        // Half the writes block-aligned, half at any sector.
        let aligned = rng.below(2) == 0;
        let (start, len) = if aligned {
            let blocks = cluster.volume_bytes / 4096;
            let start = rng.below(blocks);
            let len = 1 + rng.below((blocks - start).min(16));
            (start * 8, len * 8)
        } else {
            let start = rng.below(sectors);
            let len = 1 + rng.below((sectors - start).min(64));
            (start, len)
        };
        let (offset, len) = (start * SECTOR, len * SECTOR);
        if offset % 4096 != 0 || len % 4096 != 0 {
            unaligned += 1;
        }
        let range = offset as usize..(offset + len) as usize;
        match rng.below(10) {
            0 => {
                cluster
                    .client
                    .trim(offset, len)
                    .await
                    .unwrap_or_else(|e| panic!("trim {offset}+{len}: {e}"));
                model[range].fill(0);
                trims += 1;
            }
            1 => {
                cluster
                    .client
                    .write_zeroes(offset, len)
                    .await
                    .unwrap_or_else(|e| panic!("write-zeroes {offset}+{len}: {e}"));
                model[range].fill(0);
                zeroes += 1;
            }
            _ => {
                let data = rng.bytes(len);
                cluster
                    .client
                    .write(offset, Bytes::from(data.clone()), false)
                    .await
                    .unwrap_or_else(|e| panic!("write {offset}+{len}: {e}"));
                model[range].copy_from_slice(&data);
                writes += 1;
            }
        }
    }
    cluster.note(&format!(
        "{ops} ops: {writes} writes, {trims} trims, {zeroes} write-zeroes, {unaligned} not 4 KiB aligned"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_ops_match_a_byte_model_across_flush_restarts_and_two_sleds_down() {
    let _one = ONE_UNIT_AT_A_TIME.lock().await;
    let seed = tests::seed_from_env("DATAPATH_SEED");
    eprintln!("DATAPATH_SEED={seed}");
    let mut rng = Rng::new(seed);
    // 4 partitions of 2 MiB over 3 head nodes; no background flush or GC,
    // so each phase knows where the data is.
    let mut cluster = Cluster::start(
        "model",
        51,
        8 * MIB,
        2 * MIB,
        "flush_age_ms = 600000\ngc_interval_ms = 600000\n",
    )
    .await;
    let mut model = vec![0u8; cluster.volume_bytes as usize];

    random_ops(&cluster, &mut model, &mut rng, 300).await;
    assert!(cluster.primaries_sum("log_resident_blocks") > 0);
    cluster.check(&model, "in the logs").await;

    cluster.flush();
    assert!(cluster.primaries_sum("flushed_blocks") > 0);
    cluster.check(&model, "after a flush").await;

    // Half on the sleds, half in the logs, then a clean stop of everything.
    random_ops(&cluster, &mut model, &mut rng, 150).await;
    cluster.check(&model, "flushed and logged").await;
    cluster.restart_all(Stop::Term);
    cluster
        .check(&model, "after SIGTERM of every process")
        .await;

    random_ops(&cluster, &mut model, &mut rng, 100).await;
    cluster.flush();
    random_ops(&cluster, &mut model, &mut rng, 100).await;
    cluster.restart_all(Stop::Kill);
    cluster
        .check(&model, "after kill -9 of every process")
        .await;

    // Two sleds down: every extent spans all six sleds, so every flushed
    // block either sits on a live sled or is decoded from four others.
    cluster.flush();
    random_ops(&cluster, &mut model, &mut rng, 50).await;
    // One of the two must hold data columns, or nothing needs decoding:
    // placement may put every extent's parity on the same two sleds. A
    // whole-volume read shows which sleds serve data (parity is not read).
    let read_bytes = |cluster: &Cluster| -> Vec<u64> {
        cluster
            .unit
            .sleds
            .iter()
            .map(|sled| {
                let (_, metrics) = http_get(sled.admin, "/metrics").unwrap();
                metric(&metrics, "rackblock_sled_read_bytes_total")
            })
            .collect()
    };
    let before = read_bytes(&cluster);
    cluster.check(&model, "before stopping two sleds").await;
    let data_sleds: Vec<usize> = read_bytes(&cluster)
        .iter()
        .zip(&before)
        .enumerate()
        .filter(|(_, (after, before))| after > before)
        .map(|(i, _)| i)
        .collect();
    assert!(!data_sleds.is_empty(), "no sled served a read");
    let first = data_sleds[rng.below(data_sleds.len() as u64) as usize];
    let second = (first + 1 + rng.below(5) as usize) % 6;
    for i in [first, second] {
        let mut sled = cluster.sleds[i].take().unwrap();
        assert!(sled.terminate(), "{} did not stop cleanly", sled.name);
    }
    cluster.note(&format!("sleds {} and {} stopped", first + 1, second + 1));
    cluster.check(&model, "with two sleds stopped").await;
    let degraded = cluster.primaries_sum("degraded_reads");
    assert!(
        degraded > 0,
        "no degraded read counted: {:?}",
        cluster.partitions()
    );
    cluster.note(&format!("{degraded} degraded reads"));
}

/// Every 512-byte-aligned offset of `path` where `needle` starts.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_sled_bytes_are_decoded_and_reported() {
    let _one = ONE_UNIT_AT_A_TIME.lock().await;
    let cluster = Cluster::start(
        "corrupt",
        52,
        4 * MIB,
        2 * MIB,
        "flush_age_ms = 600000\ngc_interval_ms = 600000\n",
    )
    .await;
    // 64 blocks, each stamped so it can be found in a device file.
    let mut rng = Rng::new(52);
    let mut data = rng.bytes(64 * 4096);
    for (i, block) in data.chunks_mut(4096).enumerate() {
        block[..16].copy_from_slice(format!("rb-corrupt-{i:05}").as_bytes());
    }
    cluster
        .client
        .write(0, Bytes::from(data.clone()), false)
        .await
        .unwrap();
    cluster.flush();

    let needle = b"rb-corrupt-00005";
    let (sled_index, path, at) = cluster.unit.flip_bit_in_stamped_block(needle);
    cluster.note(&format!("flipped a bit at {}+{}", path.display(), at + 100));

    let got = cluster.client.read(0, 64 * 4096).await.unwrap();
    compare(&got, &data, 0, "after the flip");
    let got = cluster.client.read(5 * 4096, 4096).await.unwrap();
    compare(&got, &data[5 * 4096..6 * 4096], 5 * 4096, "block 5 alone");

    let degraded = cluster.primaries_sum("degraded_reads");
    let repairs = cluster.primaries_sum("repair_queue");
    let sled = &cluster.unit.sleds[sled_index];
    let (_, metrics) = http_get(sled.admin, "/metrics").unwrap();
    let sled_checksum_errors = metric(&metrics, "rackblock_sled_checksum_errors");
    cluster.note(&format!(
        "reported: head-node degraded_reads={degraded} repair_queue={repairs}, {} checksum_errors={sled_checksum_errors}",
        sled.id
    ));
    assert!(
        repairs > 0 || sled_checksum_errors > 0,
        "the corruption was not reported: {:?}",
        cluster.partitions()
    );
    // The head node's repair worker takes the queue (and has the column
    // rebuilt, tests/it/repair.rs), so the item may already be gone.
    assert!(
        repairs > 0 || degraded > 0,
        "head node queued no repair: {:?}",
        cluster.partitions()
    );
    cluster.note("done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_stalls_while_the_secondary_is_stopped() {
    let _one = ONE_UNIT_AT_A_TIME.lock().await;
    // The detector never declares the stopped node Down, so the failover
    // controller names no new secondary: the write has one copy only and
    // must stall (see the next test for the re-mirrored case).
    let options = HeadNodeOptions {
        count: 3,
        node_down_after_ms: 600_000,
        ..HeadNodeOptions::default()
    };
    let cluster = Cluster::start_with(
        options,
        "secondary",
        53,
        4 * MIB,
        2 * MIB,
        "flush_age_ms = 600000\ngc_interval_ms = 600000\n",
    )
    .await;
    let map = cluster.client.partition_map();
    let entry = map.partitions.iter().find(|p| p.index == 0).unwrap();
    let secondary = cluster.unit.head_node_index(&entry.secondary.id.0);
    let acknowledged = vec![0xA1u8; 8192];
    cluster
        .client
        .write(0, Bytes::from(acknowledged.clone()), false)
        .await
        .unwrap();

    // Attached before the stop: attaching goes through the Raft leader,
    // which may be the node about to be stopped.
    let stall_client = tests::connect_client(
        &cluster.unit,
        cluster.volume,
        ClientConfig {
            failover_timeout: Duration::from_secs(6),
            ..client_config()
        },
    )
    .await
    .unwrap();

    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(cluster.heads[secondary].pid(), libc::SIGSTOP) };
    cluster.note(&format!(
        "secondary {} stopped (SIGSTOP)",
        entry.secondary.id.0
    ));
    // Reads need only the primary.
    let got = cluster.client.read(0, 8192).await.unwrap();
    compare(&got, &acknowledged, 0, "secondary stopped");
    // A write must not acknowledge with one copy: it fails retryably or is
    // still waiting after the bound.
    let stalled = vec![0xB2u8; 4096];
    let bound = Duration::from_secs(8);
    let t = Instant::now();
    let outcome = tokio::time::timeout(
        bound,
        stall_client.write(8192, Bytes::from(stalled.clone()), false),
    )
    .await;
    match &outcome {
        Err(_) => cluster.note(&format!("write still pending after {bound:?}")),
        Ok(Err(e)) if e.is_retryable() => {
            cluster.note(&format!(
                "write failed retryably after {:?}: {e}",
                t.elapsed()
            ));
        }
        Ok(Err(e)) => panic!("write failed with a non-retryable error: {e}"),
        Ok(Ok(())) => panic!(
            "write acknowledged after {:?} with the secondary stopped",
            t.elapsed()
        ),
    }
    stall_client.close();

    // SAFETY: as above.
    unsafe { libc::kill(cluster.heads[secondary].pid(), libc::SIGCONT) };
    cluster.note("secondary resumed (SIGCONT)");
    let after = vec![0xC3u8; 4096];
    let t = Instant::now();
    cluster
        .client
        .write(12288, Bytes::from(after.clone()), false)
        .await
        .unwrap_or_else(|e| panic!("write after SIGCONT: {e}"));
    cluster.note(&format!(
        "write after resume acknowledged in {:?}",
        t.elapsed()
    ));
    let got = cluster.client.read(0, 16384).await.unwrap();
    compare(&got[..8192], &acknowledged, 0, "after resume");
    compare(&got[12288..], &after, 12288, "after resume");
    // The unacknowledged write may or may not have landed, but never torn.
    let middle = &got[8192..12288];
    assert!(
        middle.iter().all(|b| *b == 0) || middle == &stalled[..],
        "the unacknowledged write reads back torn: {:02x?}",
        &middle[..16]
    );
    cluster.note("done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_returns_sled_space_to_about_k_plus_m_over_k_of_live_data() {
    let _one = ONE_UNIT_AT_A_TIME.lock().await;
    // One partition of 48 MiB: about thirteen extents' worth of data (an
    // extent holds 3.75 MiB), so the partly filled last one is a small error.
    let partitions = 1;
    const FLUSH_EVERY: u64 = 16 * MIB;
    let cluster = Cluster::start(
        "gc",
        54,
        48 * MIB,
        48 * MIB,
        "flush_age_ms = 600000\ngc_interval_ms = 300\n",
    )
    .await;
    let mut model = vec![0u8; cluster.volume_bytes as usize];
    let mut rng = Rng::new(54);
    // GC may already run between flushes: the peak is sampled at each one.
    let mut peak = 0;
    let mut flushes = 0;
    for round in 0..2 {
        for offset in (0..cluster.volume_bytes).step_by(MIB as usize) {
            let data = rng.bytes(MIB);
            model[offset as usize..(offset + MIB) as usize].copy_from_slice(&data);
            cluster
                .client
                .write(offset, Bytes::from(data), false)
                .await
                .unwrap_or_else(|e| panic!("round {round}: write at {offset}: {e}"));
            // Flush every 16 MiB: extents fill in order of writing, and
            // each flush pads at most one stripe row.
            if offset % FLUSH_EVERY == FLUSH_EVERY - MIB {
                flushes += 1;
                cluster.flush();
                peak = peak.max(cluster.sled_bytes_claimed().await);
            }
        }
        cluster.note(&format!("volume written (round {round})"));
    }
    let live = cluster.volume_bytes;
    let ideal = live * (K + M) / K;
    // The layout's granularity (head-node partition/layout.rs): a column
    // holds whole rows of a 64 KiB chunk + a 4 KiB summary, so an extent
    // holds ⌊column / 68 KiB⌋ × k × 64 KiB of data (3.75 MiB here). Bound:
    // the extents the live data fills, plus the padding of at most one row
    // per flush, plus one partly filled extent per partition.
    let extent_data = COLUMN_BYTES / ROW_BYTES * K * CHUNK_BYTES;
    let extents = (live + flushes * K * CHUNK_BYTES).div_ceil(extent_data) + partitions;
    let bound = extents * (K + M) * COLUMN_BYTES;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut used = cluster.sled_bytes_claimed().await;
    while used > bound && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        used = cluster.sled_bytes_claimed().await;
    }
    cluster.note(&format!(
        "sled space claimed: peak {peak} bytes while writing, {used} after GC; live {live}, (k+m)/k x live = {ideal}, bound {bound} ({extents} extents); ratio used/live {:.2} (gc passes {}, extents freed {})",
        used as f64 / live as f64,
        cluster.primaries_sum("gc_passes"),
        cluster.primaries_sum("extents_freed"),
    ));
    assert!(
        used <= bound,
        "after GC {used} bytes claimed on the sleds, bound {bound}"
    );
    assert!(
        used >= ideal,
        "{used} bytes claimed hold {live} live bytes at {K}+{M}?"
    );
    assert!(cluster.primaries_sum("extents_freed") > 0);
    cluster.check(&model, "after GC").await;
    cluster.note("done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_acknowledges_only_once_a_new_secondary_is_named() {
    let _one = ONE_UNIT_AT_A_TIME.lock().await;
    // Default detector (Down after 3 s on both paths): the failover
    // controller re-mirrors the partition to a new secondary, and only
    // then may the write be acknowledged (two copies again).
    let cluster = Cluster::start(
        "re-mirror",
        55,
        4 * MIB,
        2 * MIB,
        "flush_age_ms = 600000\ngc_interval_ms = 600000\n",
    )
    .await;
    let before = cluster.client.partition_map();
    let entry = before
        .partitions
        .iter()
        .find(|p| p.index == 0)
        .unwrap()
        .clone();
    let stopped = cluster.unit.head_node_index(&entry.secondary.id.0);
    let first = vec![0xD4u8; 8192];
    cluster
        .client
        .write(0, Bytes::from(first.clone()), false)
        .await
        .unwrap();
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(cluster.heads[stopped].pid(), libc::SIGSTOP) };
    let t = Instant::now();
    let second = vec![0xE5u8; 4096];
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        cluster
            .client
            .write(8192, Bytes::from(second.clone()), false),
    )
    .await;
    let acked_after = t.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(cluster.heads[stopped].pid(), libc::SIGCONT) };
    outcome
        .unwrap_or_else(|_| panic!("no acknowledgment within 30 s of stopping the secondary"))
        .unwrap_or_else(|e| panic!("write with the secondary stopped: {e}"));
    let lcp = cluster.unit.lcp_client();
    let after = lcp.partition_map(cluster.volume).await.unwrap();
    lcp.close();
    let now = after.partitions.iter().find(|p| p.index == 0).unwrap();
    cluster.note(&format!(
        "acknowledged after {acked_after:?}; partition 0: secondary {} epoch {} -> secondary {} epoch {}",
        entry.secondary.id.0, entry.epoch, now.secondary.id.0, now.epoch
    ));
    assert_ne!(
        now.secondary.id, entry.secondary.id,
        "acknowledged while the stopped node is still the secondary"
    );
    assert!(now.epoch > entry.epoch);
    assert_eq!(
        now.primary.id, entry.primary.id,
        "no failover of the primary expected"
    );
    let got = cluster.client.read(0, 12288).await.unwrap();
    compare(&got[..8192], &first, 0, "after re-mirror");
    compare(&got[8192..], &second, 8192, "after re-mirror");
    cluster.note("done");
}
