//! Head-node failover with real processes (issue 6, items 1, 2 and 4):
//! 3 head nodes, 6 sleds (4+2), a 64 MiB volume in 4 partitions.
//!
//! A verifying writer ([`Writer`]) runs through `client::VolumeClient`:
//! workers write 8 KiB slots (each slot owned by one worker, so the
//! acknowledged content of every slot is known), read back acknowledged
//! slots now and then, record every error and the longest gap between two
//! completions. The checker reads the whole volume and compares every slot
//! with the last acknowledged content (zeros if never written).
//!
//! * `primary_kill9_fails_over_without_errors` — `kill -9` of a partition's
//!   primary, repeated (`FAILOVER_REPS`, default 3); each time the dead
//!   node's partitions get a new primary (its old secondary) and a new
//!   secondary, a write to every partition is acknowledged afterwards (so
//!   the new secondary is caught up: acks need both copies), and the node
//!   is restarted. Later repetitions kill primaries whose secondary was
//!   re-mirrored by an earlier one, so the final check also proves the
//!   re-mirrored copies held the log tail. Prints every pause and p50/p99.
//! * `secondary_and_mixed_node_kill9` — `kill -9` of a node that is the
//!   secondary of some partitions and the primary of others.
//! * `paused_primary_is_fenced_on_resume` — SIGSTOP of a primary, failover,
//!   SIGCONT: a write with the old epoch sent straight to it is not
//!   acknowledged and never becomes visible through the new primary.
//!
//! * `failover_pause_bench` (`#[ignore]`d; `bench/failover.sh` runs it in
//!   release) — `FAILOVER_REPS` (default 20) kill -9 repetitions
//!   alternating between a primary that does not lead Raft and the Raft
//!   leader (a primary too when it is one), printing one `FAILOVER_PAUSE`
//!   line per repetition for the script to summarise.
//!
//! The units run with the head node's production timings (lease 600 ms,
//! election 0.35–0.42 s with the quick election on a dead leader,
//! refused-connection detection 300 ms), so the pauses printed are what a
//! deployment gets. `FAILOVER_TRACE=1` prints the head nodes' log lines of
//! each failover's steps (election, Down, promotions, take-overs, leases). The tests other than the benchmark
//! do not kill the Raft leader on purpose: that adds an election before
//! the detector runs (see ARCHITECTURE.md, "Failover in one paragraph").

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use client::{ClientConfig, VolumeClient};
use local_control_plane::client::LcpClient;
use local_control_plane::{Command, PartitionMap};
use proto::link::{LinkConfig, LinkMetrics, PeerLink};
use proto::volume::{HostOp, HostReply, HostRequest};
use proto::Message;
use tests::{http_get, pattern, Daemon, HeadNodeOptions, TestUnit};

const MIB: u64 = 1 << 20;
const VOLUME: u64 = 61;
const VOLUME_BYTES: u64 = 64 * MIB;
const PARTITION_BYTES: u64 = 16 * MIB;
const SLOT_BYTES: u64 = 8192;
const SLOTS: u64 = VOLUME_BYTES / SLOT_BYTES;
const WORKERS: u64 = 4;
const PARTITIONS: usize = (VOLUME_BYTES / PARTITION_BYTES) as usize;

/// What `rackblock attach` uses: the pauses printed are the product's.
fn client_config() -> ClientConfig {
    ClientConfig::default()
}

struct Cluster {
    unit: TestUnit,
    _sleds: Vec<Daemon>,
    heads: Vec<Option<Daemon>>,
    lcp: LcpClient,
}

impl Cluster {
    async fn start() -> Cluster {
        Self::start_with_flush_age(Duration::from_secs(2)).await
    }

    /// [`Cluster::start`] with the head nodes' `flush_age_ms` (a long one
    /// keeps acknowledged writes in the primaries' logs only).
    async fn start_with_flush_age(flush_age: Duration) -> Cluster {
        let started = Instant::now();
        // FAILOVER_TIMINGS=legacy: the timings before issue 6's pause work
        // (lease 2 s / 500 ms / margin 500 ms, election 1.5–3 s, no
        // refused-connection detection): bench/failover.sh's baseline.
        // FAILOVER_TIMINGS=previous: the production timings before the
        // quick election on a dead leader (election 0.5–1 s, openraft's
        // timers alone): the baseline of the leader-kill work.
        let timings = std::env::var("FAILOVER_TIMINGS").unwrap_or_default();
        let legacy = timings == "legacy";
        let previous = timings == "previous";
        let options = if legacy {
            HeadNodeOptions {
                count: 3,
                election_timeout_min_ms: 1500,
                election_timeout_max_ms: 3000,
                node_down_after_ms: 1500,
                node_refused_down_after_ms: 1500,
                ..HeadNodeOptions::default()
            }
        } else if previous {
            HeadNodeOptions {
                election_timeout_min_ms: 500,
                election_timeout_max_ms: 1000,
                ..HeadNodeOptions::production_timings(3)
            }
        } else {
            HeadNodeOptions::production_timings(3)
        };
        // FAILOVER_ELECTION_TIMEOUT_MS=min,max: other election timeouts
        // (benchmarks that tune the defaults).
        let options = match std::env::var("FAILOVER_ELECTION_TIMEOUT_MS")
            .ok()
            .and_then(|v| {
                let (min, max) = v.split_once(',')?;
                Some((min.trim().parse().ok()?, max.trim().parse().ok()?))
            }) {
            Some((min, max)) => HeadNodeOptions {
                election_timeout_min_ms: min,
                election_timeout_max_ms: max,
                ..options
            },
            None => options,
        };
        // Every take-over opens new extents: long benchmark runs need more
        // columns than the tests' 8 per sled.
        let device_mib = std::env::var("FAILOVER_DEVICE_MIB")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(128);
        let unit = TestUnit::build(options, 6, "4+2", device_mib * MIB, 16 * MIB);
        // Flushes during the run: take-overs see flushed and logged data,
        // and an index checkpoint after every flush commit, so take-overs
        // start from one.
        unit.append_head_node_config(&format!(
            "wal_size_bytes = {}\nflush_age_ms = {}\ncheckpoint_every_flushes = 1\n",
            64 * MIB,
            flush_age.as_millis()
        ));
        if legacy {
            unit.append_head_node_config(
                "lease_duration_ms = 2000\nlease_renew_interval_ms = 500\n\
                 failover_lease_margin_ms = 500\nquick_election = false\n",
            );
        }
        if previous {
            unit.append_head_node_config("quick_election = false\n");
        }
        let sleds = unit.start_sleds();
        let heads = unit.start_head_nodes();
        let lcp = unit.lcp_client();
        tests::register_volume(
            &lcp,
            Command::RegisterVolume {
                volume: VOLUME,
                name: "failover".into(),
                size_bytes: VOLUME_BYTES,
                partition_size_bytes: PARTITION_BYTES,
                k: 4,
                m: 2,
            },
            Duration::from_secs(30),
        )
        .await;
        unit.wait_datapaths_ready(&heads, Duration::from_secs(30));
        eprintln!("unit up, volume registered: {:?}", started.elapsed());
        Cluster {
            unit,
            _sleds: sleds,
            heads: heads.into_iter().map(Some).collect(),
            lcp,
        }
    }

    async fn map(&self) -> PartitionMap {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.lcp.partition_map(VOLUME).await {
                Ok(map) => return map,
                Err(e) if Instant::now() < deadline => eprintln!("partition map: {e}"),
                Err(e) => panic!("partition map: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn leader(&self) -> Option<String> {
        for _ in 0..50 {
            if let Ok((raft, _)) = self.lcp.unit_status().await {
                if raft.leader_name.is_some() {
                    return raft.leader_name;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Waits until no partition has a role on a node of `dead` and every
    /// partition listed in `moved` has an epoch above the one given.
    async fn wait_two_live_copies(
        &self,
        dead: &BTreeSet<String>,
        moved: &BTreeMap<u32, u64>,
        timeout: Duration,
    ) -> PartitionMap {
        let deadline = Instant::now() + timeout;
        loop {
            let map = self.map().await;
            let healthy = map.partitions.iter().all(|p| {
                !dead.contains(&p.primary.id.0)
                    && !dead.contains(&p.secondary.id.0)
                    && p.primary.id != p.secondary.id
                    && moved.get(&p.index).is_none_or(|e| p.epoch > *e)
            });
            if healthy {
                return map;
            }
            assert!(
                Instant::now() < deadline,
                "partitions not back to two live copies after {timeout:?}: {map:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until no secondary is catching up (`unit status`): every
    /// partition has a secondary the control plane may promote. A primary
    /// killed while its secondary catches up (since issue 14 item 6: until
    /// the flush commit of the tail it was jumped over is confirmed) is
    /// not failed over by design: the partition waits for that node's log.
    async fn wait_secondaries_in_sync(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let catching_up = match self.lcp.unit_status().await {
                Ok((_, unit)) => unit.failover.secondary_catching_up,
                Err(e) => {
                    eprintln!("unit status: {e}");
                    usize::MAX
                }
            };
            if catching_up == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{catching_up} secondaries still catching up after {timeout:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn restart(&mut self, i: usize) {
        let daemon = self.unit.start_head_node(i);
        self.unit
            .wait_datapath_ready(i, &daemon, Duration::from_secs(40));
        self.heads[i] = Some(daemon);
    }

    /// Lines of every head node's log that contain `needle`.
    fn count_log_lines(&self, needle: &str) -> usize {
        self.unit
            .head_nodes
            .iter()
            .map(|head| {
                let path = self.unit.dir.path().join(format!("{}.log", head.id));
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                text.lines().filter(|l| l.contains(needle)).count()
            })
            .sum()
    }

    /// Every head node's log length now (see `trace_since`).
    fn log_lengths(&self) -> Vec<usize> {
        self.unit
            .head_nodes
            .iter()
            .map(|head| {
                let path = self.unit.dir.path().join(format!("{}.log", head.id));
                std::fs::metadata(&path).map_or(0, |m| m.len() as usize)
            })
            .collect()
    }

    /// FAILOVER_TRACE=1: the head nodes' log lines written since
    /// `lengths` that mark a failover's steps (elections, Down records,
    /// promotions, leases), to see where a pause goes.
    fn trace_since(&self, lengths: &[usize]) {
        if std::env::var("FAILOVER_TRACE").map_or(true, |v| v != "1") {
            return;
        }
        const NEEDLES: [&str; 8] = [
            "starting an election",
            "became leader",
            "recording the endpoint Down",
            "failover",
            "lease granted",
            "taking the partition over",
            "lease refused",
            "no longer leader",
        ];
        for (head, from) in self.unit.head_nodes.iter().zip(lengths) {
            let path = self.unit.dir.path().join(format!("{}.log", head.id));
            let text = std::fs::read(&path).unwrap_or_default();
            let new = String::from_utf8_lossy(text.get(*from..).unwrap_or_default());
            for line in new
                .lines()
                .filter(|l| NEEDLES.iter().any(|n| l.contains(n)))
            {
                eprintln!("TRACE {}: {}", head.id, line);
            }
        }
    }

    fn logs(&self) -> String {
        // FAILOVER_KEEP_LOGS=dir: keep every daemon's whole log there.
        if let Ok(keep) = std::env::var("FAILOVER_KEEP_LOGS") {
            let _ = std::fs::create_dir_all(&keep);
            if let Ok(entries) = std::fs::read_dir(self.unit.dir.path()) {
                for entry in entries.flatten() {
                    let path = entry.path();
                    if path.extension().is_some_and(|e| e == "log") {
                        let _ = std::fs::copy(
                            &path,
                            std::path::Path::new(&keep).join(entry.file_name()),
                        );
                    }
                }
            }
        }
        let mut logs = String::new();
        for head in &self.unit.head_nodes {
            let path = self.unit.dir.path().join(format!("{}.log", head.id));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            logs.push_str(&format!("--- {} ---\n", head.id));
            for line in tail.into_iter().rev() {
                logs.push_str(line);
                logs.push('\n');
            }
        }
        logs
    }
}

/// The verifying workload (see the module docs).
#[derive(Default)]
struct Writer {
    /// Last acknowledged content per slot.
    model: Mutex<BTreeMap<u64, Vec<u8>>>,
    /// Slots whose content is unknown (a write failed).
    unknown: Mutex<BTreeSet<u64>>,
    errors: Mutex<Vec<String>>,
    stop: AtomicBool,
    completions: AtomicU64,
    /// Acknowledged writes per partition.
    per_partition: [AtomicU64; PARTITIONS],
    gap: Mutex<Option<(Instant, Duration)>>,
    /// Every version written per slot, in order: (pattern seed, acknowledged).
    history: Mutex<BTreeMap<u64, Vec<(u64, bool)>>>,
    /// Writers hold it shared per operation; [`Writer::check_paused`] takes
    /// it exclusively to compare every slot with the model at rest.
    gate: tokio::sync::RwLock<()>,
    /// Head nodes' admin addresses, for diagnosing a wrong read.
    admins: Mutex<Vec<(String, std::net::SocketAddr)>>,
}

impl Writer {
    fn completed(&self) {
        self.completions.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut gap = self.gap.lock().unwrap();
        *gap = Some(match *gap {
            Some((last, longest)) => (now, longest.max(now - last)),
            None => (now, Duration::ZERO),
        });
    }

    /// Longest gap since the last reset, and resets it.
    fn take_gap(&self) -> Duration {
        let mut gap = self.gap.lock().unwrap();
        let longest = gap.map_or(Duration::ZERO, |g| g.1);
        *gap = Some((Instant::now(), Duration::ZERO));
        longest
    }

    async fn run(self: Arc<Self>, client: Arc<VolumeClient>, worker: u64) {
        let mut x = 0x2545_F491_4F6C_DD1D_u64 ^ (worker + 1);
        let mut version = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let slot = worker + WORKERS * (x % (SLOTS / WORKERS));
            let offset = slot * SLOT_BYTES;
            let _op = self.gate.read().await;
            if version % 8 == 7 {
                let expected = self.model.lock().unwrap().get(&slot).cloned();
                if let Some(expected) = expected {
                    match client.read(offset, SLOT_BYTES).await {
                        Ok(data) if data[..] == expected[..] => self.completed(),
                        Ok(data) => {
                            let why = self.explain(slot, &data);
                            self.errors
                                .lock()
                                .unwrap()
                                .push(format!("slot {slot}: read back differs: {why}"))
                        }
                        Err(e) => self
                            .errors
                            .lock()
                            .unwrap()
                            .push(format!("read slot {slot}: {e}")),
                    }
                }
            }
            version += 1;
            let seed = (slot << 24) ^ (version << 2) ^ worker;
            let data = pattern(seed, SLOT_BYTES);
            self.history
                .lock()
                .unwrap()
                .entry(slot)
                .or_default()
                .push((seed, false));
            match client.write(offset, Bytes::from(data.clone()), false).await {
                Ok(()) => {
                    if let Some(last) = self
                        .history
                        .lock()
                        .unwrap()
                        .get_mut(&slot)
                        .and_then(|h| h.last_mut())
                    {
                        last.1 = true;
                    }
                    self.model.lock().unwrap().insert(slot, data);
                    self.per_partition[(offset / PARTITION_BYTES) as usize]
                        .fetch_add(1, Ordering::Relaxed);
                    self.completed();
                }
                Err(e) => {
                    self.unknown.lock().unwrap().insert(slot);
                    self.model.lock().unwrap().remove(&slot);
                    self.errors
                        .lock()
                        .unwrap()
                        .push(format!("write slot {slot}: {e}"));
                }
            }
        }
    }

    /// Which version of `slot` `data` is (position in its history, out of
    /// how many, acknowledged or not), and what each head node's index says
    /// of the slot's blocks.
    fn explain(&self, slot: u64, data: &[u8]) -> String {
        let history = self
            .history
            .lock()
            .unwrap()
            .get(&slot)
            .cloned()
            .unwrap_or_default();
        let found = if data.iter().all(|b| *b == 0) {
            "zeros".to_string()
        } else {
            match history
                .iter()
                .rposition(|(seed, _)| pattern(*seed, SLOT_BYTES)[..] == data[..])
            {
                Some(i) => format!(
                    "version {} of {} (acknowledged: {})",
                    i + 1,
                    history.len(),
                    history[i].1
                ),
                None => "no version ever written to this slot".to_string(),
            }
        };
        let mut where_ = Vec::new();
        for (name, admin) in self.admins.lock().unwrap().iter() {
            for block in [slot * 2, slot * 2 + 1] {
                let answer = http_get(*admin, &format!("/volumes/{VOLUME}/blocks/{block}"))
                    .map(|(_, body)| body)
                    .unwrap_or_else(|| "unreachable".to_string());
                where_.push(format!("{name} block {block}: {answer}"));
            }
        }
        format!("got {found}; index: {}", where_.join(" | "))
    }

    /// Pauses the writers and compares every slot with the model.
    async fn check_paused(&self, client: &VolumeClient, when: &str) -> Result<(), String> {
        let _quiet = self.gate.write().await;
        let model = self.model.lock().unwrap().clone();
        let unknown = self.unknown.lock().unwrap().clone();
        let zeros = vec![0u8; SLOT_BYTES as usize];
        tests::check_volume_in_pieces(client, VOLUME_BYTES, 4 * MIB, when, |offset, data| {
            for (i, got) in data.chunks(SLOT_BYTES as usize).enumerate() {
                let slot = offset / SLOT_BYTES + i as u64;
                let expected = model.get(&slot).unwrap_or(&zeros);
                if !unknown.contains(&slot) && got != &expected[..] {
                    return Err(format!(
                        "{when}: slot {slot} differs from its last acknowledged write: {}",
                        self.explain(slot, got)
                    ));
                }
            }
            Ok(())
        })
        .await
    }

    fn assert_no_errors(&self, cluster: &Cluster) {
        let errors = self.errors.lock().unwrap();
        assert!(
            errors.is_empty(),
            "{} I/O errors at the client, first: {:?}\n{}",
            errors.len(),
            errors.iter().take(5).collect::<Vec<_>>(),
            cluster.logs()
        );
    }

    /// Reads the whole volume and compares every slot with the model.
    async fn check(&self, cluster: &Cluster, client: &VolumeClient, when: &str) {
        let model = self.model.lock().unwrap().clone();
        let unknown = self.unknown.lock().unwrap().clone();
        let piece = 4 * MIB;
        let zeros = vec![0u8; SLOT_BYTES as usize];
        let mut checked = 0;
        for offset in (0..VOLUME_BYTES).step_by(piece as usize) {
            let data = client
                .read(offset, piece)
                .await
                .unwrap_or_else(|e| panic!("{when}: read at {offset}: {e}"));
            for at in (0..piece).step_by(SLOT_BYTES as usize) {
                let slot = (offset + at) / SLOT_BYTES;
                if unknown.contains(&slot) {
                    continue;
                }
                let expected = model.get(&slot).unwrap_or(&zeros);
                let got = &data[at as usize..(at + SLOT_BYTES) as usize];
                assert!(
                    got == &expected[..],
                    "{when}: slot {slot} (volume byte {}) differs from its last acknowledged write\n{}",
                    offset + at,
                    cluster.logs()
                );
                checked += 1;
            }
        }
        eprintln!(
            "{when}: {} acknowledged slots (of {checked}) read back intact",
            model.len()
        );
    }
}

struct Workload {
    writer: Arc<Writer>,
    client: Arc<VolumeClient>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Workload {
    async fn start(cluster: &Cluster) -> Workload {
        let client = Arc::new(
            tests::connect_client(&cluster.unit, VOLUME, client_config())
                .await
                .unwrap(),
        );
        let writer = Arc::new(Writer::default());
        *writer.admins.lock().unwrap() = cluster
            .unit
            .head_nodes
            .iter()
            .map(|h| (h.id.clone(), h.admin))
            .collect();
        let tasks = (0..WORKERS)
            .map(|w| tokio::spawn(writer.clone().run(client.clone(), w)))
            .collect();
        // Some traffic before the first fault (bounded as in `progress`).
        let until = writer.completions.load(Ordering::Relaxed) + 200;
        let deadline = Instant::now() + Duration::from_secs(90);
        while writer.completions.load(Ordering::Relaxed) < until {
            assert!(
                Instant::now() < deadline,
                "writer makes no progress at start\n{}",
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Workload {
            writer,
            client,
            tasks,
        }
    }

    /// Waits until `count` more operations completed.
    async fn progress(&self, count: u64, cluster: &Cluster) {
        let until = self.writer.completions.load(Ordering::Relaxed) + count;
        // Bounds only a stall that never ends: beside another unit on 2
        // cores, Raft heartbeats (a 100 ms AppendEntries timeout) have
        // failed for seconds, holding lease renewals and so the writes.
        let deadline = Instant::now() + Duration::from_secs(90);
        while self.writer.completions.load(Ordering::Relaxed) < until {
            assert!(
                Instant::now() < deadline,
                "writer makes no progress; errors {:?}\n{}",
                self.writer
                    .errors
                    .lock()
                    .unwrap()
                    .iter()
                    .take(3)
                    .collect::<Vec<_>>(),
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every partition acknowledged two more writes: both of
    /// its copies exist and confirm (an ack needs both).
    async fn write_every_partition(&self, cluster: &Cluster) {
        let counts = |w: &Writer| -> Vec<u64> {
            w.per_partition
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect()
        };
        let before = counts(&self.writer);
        // As in `progress`: a bound on a stall, not a latency goal.
        let deadline = Instant::now() + Duration::from_secs(90);
        while counts(&self.writer)
            .iter()
            .zip(&before)
            .any(|(now, then)| *now < then + 2)
        {
            assert!(
                Instant::now() < deadline,
                "a partition acknowledges no write: {:?} -> {:?}\n{}",
                before,
                counts(&self.writer),
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self, cluster: &Cluster, when: &str) {
        self.writer.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
        self.writer.assert_no_errors(cluster);
        self.writer.check(cluster, &self.client, when).await;
        self.client.close();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Partition index -> epoch of every partition `name` holds a copy of.
fn epochs_of_partitions_on(map: &PartitionMap, name: &str) -> BTreeMap<u32, u64> {
    map.partitions
        .iter()
        .filter(|p| p.primary.id.0 == name || p.secondary.id.0 == name)
        .map(|p| (p.index, p.epoch))
        .collect()
}

/// Kills (-9) head node `victim`, waits for its partitions to have two live
/// copies again and for the writer to progress; returns the pause.
async fn kill_and_recover(cluster: &mut Cluster, work: &Workload, victim: usize) -> Duration {
    let name = cluster.unit.head_nodes[victim].id.clone();
    let map = cluster.map().await;
    let moved = epochs_of_partitions_on(&map, &name);
    let roles: Vec<String> = map
        .partitions
        .iter()
        .filter_map(|p| {
            if p.primary.id.0 == name {
                Some(format!("primary of {}", p.index))
            } else if p.secondary.id.0 == name {
                Some(format!("secondary of {}", p.index))
            } else {
                None
            }
        })
        .collect();
    // Only a pair in sync fails over (see `wait_secondaries_in_sync`).
    cluster
        .wait_secondaries_in_sync(Duration::from_secs(60))
        .await;
    let _ = work.writer.take_gap();
    let lengths = cluster.log_lengths();
    let killed = Instant::now();
    if let Some(mut daemon) = cluster.heads[victim].take() {
        daemon.kill9();
    }
    let dead = BTreeSet::from([name.clone()]);
    let healed = cluster
        .wait_two_live_copies(&dead, &moved, Duration::from_secs(40))
        .await;
    let remapped = killed.elapsed();
    work.write_every_partition(cluster).await;
    work.progress(100, cluster).await;
    let pause = work.writer.take_gap();
    eprintln!(
        "killed {name} ({}): map healed after {remapped:?}, longest gap between completions {pause:?}; map {:?}",
        roles.join(", "),
        healed
            .partitions
            .iter()
            .map(|p| format!("{}:{}/{}@{}", p.index, p.primary.id, p.secondary.id, p.epoch))
            .collect::<Vec<_>>()
    );
    cluster.trace_since(&lengths);
    work.writer.assert_no_errors(cluster);
    pause
}

/// A primary of some partition that does not lead the Raft group (the
/// leader if it is the only primary left).
async fn non_leader_primary(cluster: &Cluster, prefer_secondary_too: bool) -> usize {
    let leader = cluster.leader().await;
    let map = cluster.map().await;
    let mut candidates: Vec<(String, bool)> = map
        .partitions
        .iter()
        .map(|p| p.primary.id.0.clone())
        .filter(|n| Some(n) != leader.as_ref())
        .map(|n| {
            let also_secondary = map.partitions.iter().any(|p| p.secondary.id.0 == n);
            (n, also_secondary)
        })
        .collect();
    candidates.sort_by_key(|(n, s)| (prefer_secondary_too && !s, n.clone()));
    // Failovers concentrate primaries (no rebalancing yet): when only the
    // leader is left as a primary, it is the victim (an election first).
    let name = match candidates.first() {
        Some((name, _)) => name.clone(),
        None => {
            let name = map.partitions[0].primary.id.0.clone();
            eprintln!("only the raft leader {name} is a primary: killing it");
            name
        }
    };
    cluster.unit.head_node_index(&name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_kill9_fails_over_without_errors() {
    let started = Instant::now();
    let reps: usize = std::env::var("FAILOVER_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut cluster = Cluster::start().await;
    let work = Workload::start(&cluster).await;
    let mut pauses = Vec::new();
    let mut leader_pauses = Vec::new();
    for rep in 0..reps {
        // A flush commit now writes an index checkpoint
        // (`checkpoint_every_flushes = 1`), so this take-over can start from
        // one whatever the flush timer did (answers do not matter here),
        // if the secondary holds no index of the flushed data.
        let _ = tokio::task::block_in_place(|| cluster.unit.flush_all());
        let victim = non_leader_primary(&cluster, false).await;
        let was_leader =
            cluster.leader().await.as_deref() == Some(cluster.unit.head_nodes[victim].id.as_str());
        let pause = kill_and_recover(&mut cluster, &work, victim).await;
        eprintln!(
            "repetition {}: pause {pause:?}{}",
            rep + 1,
            if was_leader {
                " (raft leader killed)"
            } else {
                ""
            }
        );
        if was_leader {
            leader_pauses.push(pause);
        } else {
            pauses.push(pause);
        }
        cluster.restart(victim);
        work.progress(50, &cluster).await;
    }
    for (what, pauses) in [
        ("a primary (not the raft leader)", &mut pauses),
        ("a primary that also led raft", &mut leader_pauses),
    ] {
        pauses.sort();
        eprintln!(
            "failover pauses over {} kill -9 of {what}: p50 {:?}, p99 {:?}, max {:?}",
            pauses.len(),
            percentile(pauses, 0.50),
            percentile(pauses, 0.99),
            pauses.last().copied().unwrap_or_default(),
        );
    }
    eprintln!("{reps} repetitions in {:?}", started.elapsed());
    work.finish(&cluster, "after every failover").await;
    let from_checkpoint = cluster.count_log_lines("recovered from an index checkpoint");
    let from_held = cluster.count_log_lines("recovered from the index this node held");
    let full_scans = cluster.count_log_lines("recovered by the full summary scan");
    eprintln!(
        "recoveries from the sleds: {from_held} from the index the node held, \
         {from_checkpoint} from an index checkpoint, {full_scans} by the full scan"
    );
    // A promoted secondary starts from the index it kept of the flushed
    // data (its first pass after joining came from a checkpoint); only
    // when that index is refused or missing does the take-over load one.
    assert!(
        from_held + from_checkpoint >= 1,
        "no take-over started from a held index or an index checkpoint\n{}",
        cluster.logs()
    );
}

/// The Raft leader's index once it is known.
async fn leader_index(cluster: &Cluster) -> Option<usize> {
    let leader = cluster.leader().await?;
    Some(cluster.unit.head_node_index(&leader))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: bench/failover.sh runs it in release"]
async fn failover_pause_bench() {
    let started = Instant::now();
    let reps: usize = std::env::var("FAILOVER_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut cluster = Cluster::start().await;
    let work = Workload::start(&cluster).await;
    for rep in 0..reps {
        // Odd repetitions kill the Raft leader, even ones a primary that
        // does not lead.
        let victim = match (rep % 2 == 1, leader_index(&cluster).await) {
            (true, Some(leader)) => leader,
            _ => non_leader_primary(&cluster, false).await,
        };
        let name = cluster.unit.head_nodes[victim].id.clone();
        let map = cluster.map().await;
        let primary = map.partitions.iter().any(|p| p.primary.id.0 == name);
        let was_leader = cluster.leader().await.as_deref() == Some(name.as_str());
        let case = match (was_leader, primary) {
            (true, true) => "leader_primary",
            (true, false) => "leader_not_primary",
            (false, _) => "nonleader_primary",
        };
        let pause = kill_and_recover(&mut cluster, &work, victim).await;
        println!(
            "FAILOVER_PAUSE rep={} case={case} pause_ms={:.1}",
            rep + 1,
            pause.as_secs_f64() * 1000.0
        );
        cluster.restart(victim);
        work.progress(50, &cluster).await;
        if let Err(e) = work
            .writer
            .check_paused(&work.client, &format!("after repetition {}", rep + 1))
            .await
        {
            panic!("{e}\n{}", cluster.logs());
        }
    }
    eprintln!(
        "{reps} repetitions in {:?}; quick elections started: {}",
        started.elapsed(),
        cluster.count_log_lines("refuses connections on both networks: starting an election")
    );
    work.finish(&cluster, "after every failover").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_and_mixed_node_kill9() {
    let mut cluster = Cluster::start().await;
    let work = Workload::start(&cluster).await;
    let victim = non_leader_primary(&cluster, true).await;
    let name = cluster.unit.head_nodes[victim].id.clone();
    let map = cluster.map().await;
    assert!(
        map.partitions.iter().any(|p| p.secondary.id.0 == name)
            && map.partitions.iter().any(|p| p.primary.id.0 == name),
        "{name} should hold both roles: {map:?}"
    );
    let pause = kill_and_recover(&mut cluster, &work, victim).await;
    eprintln!("mixed-role node killed: pause {pause:?}");
    // The re-mirrored secondaries hold everything: restart the victim (it
    // comes back with no role), then kill the other non-leader node, whose
    // partitions now fail over onto copies built by re-mirroring.
    cluster.restart(victim);
    work.progress(50, &cluster).await;
    let leader = cluster.leader().await;
    let second = (0..cluster.unit.head_nodes.len())
        .find(|i| *i != victim && Some(&cluster.unit.head_nodes[*i].id) != leader.as_ref())
        .unwrap();
    let pause = kill_and_recover(&mut cluster, &work, second).await;
    eprintln!("second node killed: pause {pause:?}");
    work.finish(&cluster, "after secondary and mixed failures")
        .await;
}

fn signal(daemon: &Daemon, signal: libc::c_int) {
    // SAFETY: kill(2) on a child process id we own.
    let rc = unsafe { libc::kill(daemon.pid(), signal) };
    assert_eq!(rc, 0, "kill({}, {signal})", daemon.pid());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_primary_is_fenced_on_resume() {
    let cluster = Cluster::start().await;
    let work = Workload::start(&cluster).await;
    let victim = non_leader_primary(&cluster, false).await;
    let head = cluster.unit.head_nodes[victim].clone();
    let map = cluster.map().await;
    let old = map
        .partitions
        .iter()
        .find(|p| p.primary.id.0 == head.id)
        .cloned()
        .unwrap();
    let moved: BTreeMap<u32, u64> = map
        .partitions
        .iter()
        .filter(|p| p.primary.id.0 == head.id || p.secondary.id.0 == head.id)
        .map(|p| (p.index, p.epoch))
        .collect();
    let daemon = cluster.heads[victim].as_ref().unwrap();
    signal(daemon, libc::SIGSTOP);
    let stopped = Instant::now();
    let dead = BTreeSet::from([head.id.clone()]);
    let healed = cluster
        .wait_two_live_copies(&dead, &moved, Duration::from_secs(40))
        .await;
    work.progress(100, &cluster).await;
    eprintln!(
        "{} paused: partition {} failed over after {:?} to {}",
        head.id,
        old.index,
        stopped.elapsed(),
        healed.partitions[old.index as usize].primary.id
    );
    signal(daemon, libc::SIGCONT);

    // Writes with the old epoch straight to the resumed node, for ~3 s
    // while it notices: none may be acknowledged.
    let link = PeerLink::new(
        head.id.clone(),
        head.address_a,
        head.address_b,
        LinkConfig {
            connect_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_secs(8),
            probe_interval: Duration::from_millis(200),
            probe_timeout: Duration::from_millis(500),
            failures_before_down: 2,
            auth: Some(head.member()),
            tls: None,
        },
        LinkMetrics::unregistered(),
    );
    let slot = u64::from(old.index) * PARTITION_BYTES / SLOT_BYTES + 1;
    let offset = slot * SLOT_BYTES;
    let fenced_data = pattern(0xDEAD_BEEF, SLOT_BYTES);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut answers = Vec::new();
    while Instant::now() < deadline {
        let request = HostRequest {
            volume: VOLUME,
            partition: old.index,
            epoch: old.epoch,
            // A valid credential: the refusal must come from the fencing.
            credential: work.client.credential(),
            op: HostOp::Write {
                write_id: 0,
                offset_bytes: offset,
                data: Bytes::from(fenced_data.clone()),
                crcs: proto::volume::chunk_crcs(&fenced_data),
                fua: false,
            },
        };
        let answer = link.call(Message::Host(request), false).await;
        assert!(
            !matches!(answer, Ok(Message::HostReply(HostReply::Done))),
            "the fenced primary acknowledged a write with epoch {}\n{}",
            old.epoch,
            cluster.logs()
        );
        answers.push(format!("{answer:?}"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    link.close();
    answers.dedup();
    eprintln!("old primary answered old-epoch writes with: {answers:?}");
    // Never visible through the new primary.
    work.progress(50, &cluster).await;
    let seen = work.client.read(offset, SLOT_BYTES).await.unwrap();
    assert!(
        seen[..] != fenced_data[..],
        "a write sent to the fenced primary is visible"
    );
    // The resumed node no longer serves the partition as primary.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = http_get(head.admin, "/partitions").map(|(_, b)| b);
        let json: serde_json::Value = body
            .as_deref()
            .and_then(|b| serde_json::from_str(b).ok())
            .unwrap_or(serde_json::Value::Null);
        let still_primary = json["partitions"].as_array().is_some_and(|ps| {
            ps.iter()
                .any(|p| p["partition"] == old.index && p["role"] == "primary")
        });
        if !still_primary && !json.is_null() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} still serves partition {} as primary: {json}",
            head.id,
            old.index
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    work.finish(&cluster, "after the paused primary resumed")
        .await;
}

/// Puts head node `victim`'s write log on a fault device (restarted with
/// the test hook), arms `fault` under load, and checks that the node takes
/// itself out of service: its partitions get two live copies elsewhere,
/// the writer sees no error, `/status` and `/metrics` name the failed log,
/// and the control plane records the node Failed with the reason.
async fn fail_log_and_recover(cluster: &mut Cluster, work: &Workload, victim: usize, fault: &str) {
    let name = cluster.unit.head_nodes[victim].id.clone();
    let map = cluster.map().await;
    let moved = epochs_of_partitions_on(&map, &name);
    let control = cluster.unit.dir.path().join(format!("{name}.wal-fault"));
    std::fs::write(&control, fault).unwrap();
    let armed = Instant::now();
    let dead = BTreeSet::from([name.clone()]);
    cluster
        .wait_two_live_copies(&dead, &moved, Duration::from_secs(40))
        .await;
    let remapped = armed.elapsed();
    work.write_every_partition(cluster).await;
    work.progress(100, cluster).await;
    let pause = work.writer.take_gap();
    eprintln!(
        "{fault} on {name}'s write log ({} partitions moved): map healed after {remapped:?}, longest gap {pause:?}",
        moved.len()
    );
    work.writer.assert_no_errors(cluster);
    let admin = cluster.unit.head_nodes[victim].admin;
    let (_, status) = http_get(admin, "/partitions").unwrap();
    assert!(status.contains("\"write_log_failure\":{"), "{status}");
    let (_, metrics) = http_get(admin, "/metrics").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rackblock_wal_failed{") && l.ends_with(" 1")),
        "{metrics}"
    );
    let (_, unit) = cluster.lcp.unit_status().await.unwrap();
    let node = unit.nodes.iter().find(|n| n.id.0 == name).unwrap();
    assert_eq!(node.health, local_control_plane::Health::Failed);
    assert!(
        node.failure
            .as_deref()
            .is_some_and(|f| f.contains("write log")),
        "{node:?}"
    );
}

/// Issue 14, item 2: a head node's log device failing under load (EIO on
/// one node, then a hang on another) takes that node out of service; its
/// partitions fail over with no error at the client, and a restart with a
/// working log brings the node back Up.
///
/// Two problems kept it ignored before: after the EIO the map healed, yet
/// no partition acknowledged a write for 90 s in about half of the runs
/// (the client retried `Unavailable` on the out-of-service node without
/// reading the map again: fixed in `client::volume`, a second retryable
/// refusal refreshes the map); and the victim could hold no partition when
/// its log was failed (its restart onto the fault device had moved its
/// roles away; an idle log never fails): the first victim is now one that
/// holds roles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_write_log_takes_the_head_node_out_of_service() {
    let mut cluster = Cluster::start().await;
    // The victims' logs go on the fault device (a clean restart each).
    let leader = cluster.leader().await;
    let victims: Vec<usize> = (0..cluster.unit.head_nodes.len())
        .filter(|i| Some(&cluster.unit.head_nodes[*i].id) != leader.as_ref())
        .collect();
    for &i in &victims {
        let control = cluster
            .unit
            .dir
            .path()
            .join(format!("{}.wal-fault", cluster.unit.head_nodes[i].id));
        std::fs::write(&control, "").unwrap();
        assert!(cluster.heads[i].take().unwrap().terminate());
        let daemon = cluster.unit.start_head_node_with_wal_faults(i, &control);
        cluster
            .unit
            .wait_datapath_ready(i, &daemon, Duration::from_secs(40));
        cluster.heads[i] = Some(daemon);
    }
    let work = Workload::start(&cluster).await;
    // An idle log never fails: the first victim is one that holds roles
    // now (the restarts above may have moved every role off one of them;
    // the two together hold at least the four roles the leader cannot).
    let map = cluster.map().await;
    let roles = |i: usize| epochs_of_partitions_on(&map, &cluster.unit.head_nodes[i].id).len();
    let (first, second) = if roles(victims[0]) >= roles(victims[1]) {
        (victims[0], victims[1])
    } else {
        (victims[1], victims[0])
    };
    assert!(roles(first) > 0, "no victim holds a partition: {map:?}");
    fail_log_and_recover(&mut cluster, &work, first, "eio").await;
    // A restart with a working log: back Up, and takes roles again.
    assert!(cluster.heads[first].take().unwrap().terminate());
    cluster.restart(first);
    let name = cluster.unit.head_nodes[first].id.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, unit) = cluster.lcp.unit_status().await.unwrap();
        let node = unit.nodes.iter().find(|n| n.id.0 == name).unwrap();
        if node.health == local_control_plane::Health::Up && node.failure.is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "{name} not Up again: {node:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    work.progress(50, &cluster).await;
    // The other victim's log hangs: the deadline (wal_timeout_ms) fails it.
    // It holds every partition now (the only Up node beside the leader
    // while the first was out of service).
    fail_log_and_recover(&mut cluster, &work, second, "hang").await;
    work.finish(&cluster, "after a failed and a hung write log")
        .await;
}

/// Issue 14, item 7: the Raft term of a fresh unit (production timings),
/// and after `LOAD_SECONDS` (default 60) of verifying writes through
/// `VolumeClient` from `WORKERS` writers; a leader change under load fails
/// the test. Prints both terms.
///
/// Once ignored: beside the rest of the end-to-end suite on 2 cores the
/// term went from 1 to 17 (AppendEntries timing out after 100 ms). Raft
/// connections are now served on the control plane's runtime, whose
/// threads run at a higher priority, and proposals are batched: beside a
/// second unit and 8 fsync-bound fio jobs (load average 39) the term held
/// where the code before went from 1 to 7-15 (bench/README.md).
/// `bench/raft-term.sh` runs it for 10 minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_term_holds_under_write_load() {
    let seconds: u64 = std::env::var("LOAD_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let cluster = Cluster::start().await;
    let (before, _) = cluster.lcp.unit_status().await.unwrap();
    let work = Workload::start(&cluster).await;
    let started = Instant::now();
    let completions = work.writer.completions.load(Ordering::Relaxed);
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let done = work.writer.completions.load(Ordering::Relaxed) - completions;
    let (after, _) = cluster.lcp.unit_status().await.unwrap();
    eprintln!(
        "raft term {} (leader {:?}) at start, {} (leader {:?}) after {seconds} s of writes ({done} operations, longest gap {:?})",
        before.term,
        before.leader_name,
        after.term,
        after.leader_name,
        work.writer.take_gap()
    );
    work.finish(&cluster, "after the load").await;
    if std::env::var_os("FAILOVER_KEEP_LOGS").is_some() {
        // Keeps the daemons' logs (bench/raft-term.sh) whatever the outcome.
        let _ = cluster.logs();
    }
    assert!(
        before.term <= 2,
        "a fresh unit serves at term {}",
        before.term
    );
    assert_eq!(
        after.term,
        before.term,
        "the leader changed under load\n{}",
        cluster.logs()
    );
}

/// The kernel-NBD VM test's data loss, end to end. Acknowledged writes sit
/// only in the logs (no flush); the secondary of a partition is killed and
/// a new, empty secondary is named; **nothing is written**; the primary is
/// killed. Before the fix the new secondary was only caught up by the next
/// host write, and was promoted empty: every unflushed write was lost.
/// Now the primary catches it up at once and reports it in sync (the unit
/// shows no secondary catching up), the promotion happens, and every
/// acknowledged byte reads back, also after the old primary returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remirrored_secondary_is_caught_up_without_writes_before_the_primary_dies() {
    let mut cluster = Cluster::start_with_flush_age(Duration::from_secs(600)).await;
    let client = tests::connect_client(&cluster.unit, VOLUME, client_config())
        .await
        .unwrap();
    // 1 MiB at the start of every partition, in 64 KiB writes.
    const WRITTEN: u64 = MIB;
    const CHUNK: u64 = 64 * 1024;
    let mut expected = BTreeMap::new();
    for partition in 0..PARTITIONS as u64 {
        for chunk in 0..WRITTEN / CHUNK {
            let offset = partition * PARTITION_BYTES + chunk * CHUNK;
            let data = Bytes::from(pattern(offset ^ 0x5eed, CHUNK));
            client.write(offset, data.clone(), false).await.unwrap();
            expected.insert(offset, data);
        }
    }
    let check = |what: &'static str| {
        let client = &client;
        let expected = &expected;
        async move {
            for (offset, data) in expected {
                let got = client.read(*offset, CHUNK).await.unwrap();
                assert!(got == *data, "{what}: bytes at {offset} lost");
            }
        }
    };
    check("before any failure").await;

    // A partition whose secondary is not the Raft leader (its primary
    // neither, when there is one).
    let leader = cluster.leader().await;
    let map = cluster.map().await;
    let not_leader = |n: &str| Some(n) != leader.as_deref();
    let target = map
        .partitions
        .iter()
        .filter(|p| not_leader(&p.secondary.id.0))
        .min_by_key(|p| !not_leader(&p.primary.id.0))
        .expect("a partition whose secondary does not lead raft")
        .clone();
    let primary_name = target.primary.id.0.clone();
    let secondary_name = target.secondary.id.0.clone();
    let primary = cluster.unit.head_node_index(&primary_name);
    let secondary = cluster.unit.head_node_index(&secondary_name);
    eprintln!(
        "partition {}: primary {primary_name}, secondary {secondary_name} (killed first)",
        target.index
    );

    // 1. The secondary dies; its partitions get new (empty) secondaries.
    if let Some(mut daemon) = cluster.heads[secondary].take() {
        daemon.kill9();
    }
    let moved = epochs_of_partitions_on(&map, &secondary_name);
    let remirrored = cluster
        .wait_two_live_copies(
            &BTreeSet::from([secondary_name.clone()]),
            &moved,
            Duration::from_secs(40),
        )
        .await;
    let new_secondary = remirrored
        .partitions
        .iter()
        .find(|p| p.index == target.index)
        .map(|p| p.secondary.id.0.clone())
        .unwrap();
    eprintln!("partition {}: new secondary {new_secondary}", target.index);

    // 2. No write. The primaries catch their new secondaries up on their
    // own and say so: the unit shows none catching up.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let catching_up = match cluster.lcp.unit_status().await {
            Ok((_, unit)) => unit.failover.secondary_catching_up,
            Err(e) => {
                eprintln!("unit status: {e}");
                usize::MAX
            }
        };
        if catching_up == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{catching_up} secondaries still catching up without host writes\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        cluster.count_log_lines("secondary in sync, reported to the control plane") >= 1,
        "{}",
        cluster.logs()
    );
    // The killed node returns (no roles): the promotion below names it
    // the new secondary.
    cluster.restart(secondary);

    // 3. The primary dies; the caught-up secondary is promoted.
    let map = cluster.map().await;
    let moved = epochs_of_partitions_on(&map, &primary_name);
    if let Some(mut daemon) = cluster.heads[primary].take() {
        daemon.kill9();
    }
    let promoted = cluster
        .wait_two_live_copies(
            &BTreeSet::from([primary_name.clone()]),
            &moved,
            Duration::from_secs(40),
        )
        .await;
    let now_primary = promoted
        .partitions
        .iter()
        .find(|p| p.index == target.index)
        .map(|p| p.primary.id.0.clone())
        .unwrap();
    assert_eq!(now_primary, new_secondary, "{promoted:?}");
    check("after the re-mirrored secondary was promoted").await;

    // 4. The old primary returns: nothing changes what reads return.
    cluster.restart(primary);
    check("after the old primary returned").await;
    client.close();
}
