//! Network A's switch dies for 30 s during I/O (issue 6, "what it must
//! show" 5): no I/O error, no failover, no re-mirroring.
//!
//! Two switches as in a rack: [`tests::netns::NetLab`] builds one network
//! namespace per daemon (3 head nodes, 6 sleds) and one for the client,
//! each plugged into bridge A (127.0.1.0/24), bridge B (127.0.2.0/24) and
//! an admin bridge (127.0.3.0/24, HTTP only). The daemons run under
//! `ip netns exec`; the test's client is a thread that entered its own
//! namespace. Code 4+2, a 64 MiB volume in four partitions.
//!
//! A verifying workload through `client::VolumeClient` (one request at a
//! time: random 4 KiB-aligned writes of 4–64 KiB recorded in a byte model
//! once acknowledged, and reads of written ranges compared with it) runs
//! while `ip link set brA down` holds for `NETWORK_CUT_SECONDS` (default
//! 30). Asserted: not one I/O error; every partition keeps its primary,
//! secondary and epoch in the LCP map (no failover, no re-mirroring); the
//! Raft leader and term stay; the leader's detector reports network A down
//! (and B up) for every other head node and every sled, with no node or
//! sled Down; after brA comes back every path is reported up again; the
//! whole volume matches the model. The longest gap between two
//! completions (the I/O pause) is printed, during the cut and outside it.
//!
//! Needs root and iproute2 (CI has both); fails with a clear message
//! otherwise.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use client::{ClientConfig, VolumeClient};
use local_control_plane::client::LcpClient;
use local_control_plane::state::PartitionMap;
use local_control_plane::{Command, Health};
use tests::netns::{self, NetLab, Switch};
use tests::{rackblock_bin, wait_healthy, Daemon, HeadNodeOptions, Rng, TestUnit};

const MIB: u64 = 1 << 20;
const VOLUME: u64 = 61;
const VOLUME_BYTES: u64 = 64 * MIB;
const PARTITION_BYTES: u64 = 16 * MIB;
const BLOCK: u64 = proto::BLOCK_SIZE_BYTES;
/// Bounds of the workload loop, whatever the clock says.
const MAX_OPS: usize = 200_000;

fn cut_seconds() -> u64 {
    std::env::var("NETWORK_CUT_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
        .clamp(5, 120)
}

/// Puts every admin (HTTP) address on the admin switch: 127.0.3.N with the
/// port the harness chose, N the host's number (head node h: h; sled s:
/// 100 + s), in the rack file and in the harness's view.
fn admin_on_admin_switch(unit: &mut TestUnit) {
    let mut rack = std::fs::read_to_string(&unit.rack_path).unwrap();
    let mut moves = Vec::new();
    for (h, head) in unit.head_nodes.iter_mut().enumerate() {
        let new = (Switch::Admin.address(h as u8 + 1), head.admin.port()).into();
        moves.push((head.admin, new));
        head.admin = new;
    }
    for (s, sled) in unit.sleds.iter_mut().enumerate() {
        let new = (Switch::Admin.address(101 + s as u8), sled.admin.port()).into();
        moves.push((sled.admin, new));
        sled.admin = new;
    }
    for (old, new) in moves {
        let (from, to) = (format!("admin = \"{old}\""), format!("admin = \"{new}\""));
        assert_eq!(rack.matches(&from).count(), 1, "{from} in the rack file");
        rack = rack.replace(&from, &to);
    }
    std::fs::write(&unit.rack_path, rack).unwrap();
}

/// `rackblock ARGS` in namespace `ns`, killed by pid when dropped.
fn spawn_in(ns: &str, name: &str, args: &[&str], unit: &TestUnit) -> Daemon {
    let mut command = NetLab::command(ns, &rackblock_bin());
    command.args(args);
    let log = unit.dir.path().join(format!("{name}.log"));
    Daemon::spawn_command(name, command, log)
}

async fn register(lcp: &LcpClient) {
    tests::register_volume(
        lcp,
        Command::RegisterVolume {
            volume: VOLUME,
            name: "network".into(),
            size_bytes: VOLUME_BYTES,
            partition_size_bytes: PARTITION_BYTES,
            k: 4,
            m: 2,
        },
        Duration::from_secs(30),
    )
    .await;
}

/// (partition, primary, secondary, epoch) of every partition.
fn placement(map: &PartitionMap) -> Vec<(u32, String, String, u64)> {
    map.partitions
        .iter()
        .map(|p| {
            (
                p.index,
                p.primary.id.0.clone(),
                p.secondary.id.0.clone(),
                p.epoch,
            )
        })
        .collect()
}

/// What the workload saw.
#[derive(Debug, Default)]
struct Record {
    /// When each request completed (successfully or not).
    completions: Vec<Instant>,
    errors: Vec<String>,
    writes: u64,
    reads: u64,
    bytes_written: u64,
}

/// One request at a time until `stop` (bounded by [`MAX_OPS`]): 2 of 3 a
/// write recorded in `model` once acknowledged, 1 of 3 a read of a range
/// compared with the model.
async fn workload(
    client: VolumeClient,
    model: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> Record {
    let mut rng = Rng::new(seed);
    let mut record = Record::default();
    let blocks = VOLUME_BYTES / BLOCK;
    while !stop.load(Ordering::SeqCst) && record.completions.len() < MAX_OPS {
        let start = rng.below(blocks);
        let len = (1 + rng.below(16)).min(blocks - start) * BLOCK;
        let offset = start * BLOCK;
        let range = offset as usize..(offset + len) as usize;
        if rng.below(3) < 2 {
            let data = rng.bytes(len);
            match client.write(offset, Bytes::from(data.clone()), false).await {
                Ok(()) => {
                    model.lock().unwrap()[range].copy_from_slice(&data);
                    record.writes += 1;
                    record.bytes_written += len;
                }
                Err(e) => record.errors.push(format!("write {offset}+{len}: {e}")),
            }
        } else {
            match client.read(offset, len).await {
                Ok(data) => {
                    let model = model.lock().unwrap();
                    if data[..] != model[range] {
                        record
                            .errors
                            .push(format!("read {offset}+{len}: differs from the model"));
                    }
                    record.reads += 1;
                }
                Err(e) => record.errors.push(format!("read {offset}+{len}: {e}")),
            }
        }
        record.completions.push(Instant::now());
    }
    record
}

/// Longest gap between consecutive completions whose end lies in
/// `from..to`, and where it ended.
fn max_pause(completions: &[Instant], from: Instant, to: Instant) -> (Duration, Option<Instant>) {
    completions
        .windows(2)
        .filter(|w| w[1] > from && w[1] <= to)
        .map(|w| (w[1] - w[0], Some(w[1])))
        .max_by_key(|(gap, _)| *gap)
        .unwrap_or((Duration::ZERO, None))
}

/// The daemons, then the unit's files; the namespaces outlive both (the
/// lab is owned by the caller's thread).
struct Rack {
    heads: Vec<Daemon>,
    sleds: Vec<Daemon>,
    unit: TestUnit,
}

impl Rack {
    fn log_tails(&self) -> String {
        let mut out = String::new();
        for daemon in self.heads.iter().chain(&self.sleds) {
            let text = daemon.log_text();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {} ---\n", daemon.name));
            out.push_str(&lines[lines.len().saturating_sub(15)..].join("\n"));
            out.push('\n');
        }
        out
    }
}

#[test]
fn network_a_switch_down_during_io_is_no_error_no_failover_no_remirror() {
    let started = Instant::now();
    let cut = Duration::from_secs(cut_seconds());
    let seed = tests::seed_from_env("NETWORK_SEED");
    eprintln!("network: seed {seed} (NETWORK_SEED), cut {cut:?} (NETWORK_CUT_SECONDS)");

    let mut lab = NetLab::new("net");
    let mut unit = TestUnit::build(
        HeadNodeOptions {
            count: 3,
            ..HeadNodeOptions::default()
        },
        6,
        "4+2",
        48 * MIB,
        MIB,
    );
    unit.append_head_node_config(&format!(
        "wal_size_bytes = {}\nio_engine = \"sync\"\n",
        64 * MIB
    ));
    admin_on_admin_switch(&mut unit);
    let head_ns: Vec<String> = (1..=3)
        .map(|h| lab.add_host(&format!("hn{h}"), h))
        .collect();
    let sled_ns: Vec<String> = (1..=6)
        .map(|s| lab.add_host(&format!("sled{s}"), 100 + s))
        .collect();
    let client_ns = lab.add_host("client", 200);
    let switch_ns = lab.switch_namespace();
    eprintln!(
        "network: 10 namespaces and 3 bridges in {:?}",
        started.elapsed()
    );

    netns::run_in(&client_ns, move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let sleds: Vec<Daemon> = unit
            .sleds
            .iter()
            .zip(&sled_ns)
            .map(|(sled, ns)| {
                let config = sled.config.to_str().unwrap();
                spawn_in(
                    ns,
                    &sled.id,
                    &["sled-controller", "--config", config],
                    &unit,
                )
            })
            .collect();
        for (sled, daemon) in unit.sleds.iter().zip(&sleds) {
            wait_healthy(sled.admin, daemon, Duration::from_secs(30));
        }
        let heads: Vec<Daemon> = unit
            .head_nodes
            .iter()
            .zip(&head_ns)
            .map(|(head, ns)| {
                let config = head.config.to_str().unwrap();
                spawn_in(ns, &head.id, &["head-node", "--config", config], &unit)
            })
            .collect();
        for (head, daemon) in unit.head_nodes.iter().zip(&heads) {
            wait_healthy(head.admin, daemon, Duration::from_secs(30));
        }
        let rack = Rack { heads, sleds, unit };
        runtime.block_on(scenario(rack, switch_ns, cut, seed, started));
    });
    drop(lab);
    eprintln!("network: done in {:?}", started.elapsed());
}

async fn scenario(rack: Rack, switch_ns: String, cut: Duration, seed: u64, started: Instant) {
    let unit = &rack.unit;
    let lcp = unit.lcp_client();
    register(&lcp).await;
    unit.wait_datapaths_ready(&rack.heads, Duration::from_secs(30));
    let client = tests::connect_client(
        unit,
        VOLUME,
        ClientConfig {
            failover_timeout: Duration::from_secs(60),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    // The baseline: every path recorded up. Right after start-up a probe
    // may have timed out on a loaded machine (a path fault the detector
    // records and clears a poll later), so wait for it, bounded.
    let settle_deadline = Instant::now() + Duration::from_secs(30);
    let (raft_before, status_before) = loop {
        let (raft, status) = lcp.unit_status().await.unwrap();
        let all_up = status
            .nodes
            .iter()
            .map(|n| n.paths)
            .chain(status.sleds.iter().map(|s| s.paths))
            .all(|p| p.network_a_up && p.network_b_up);
        if all_up && raft.leader_name.is_some() {
            break (raft, status);
        }
        assert!(
            Instant::now() < settle_deadline,
            "a path is still down 30 s after start-up: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let map_before = placement(&lcp.partition_map(VOLUME).await.unwrap());
    let leader = raft_before.leader_name.clone().expect("a leader");
    eprintln!(
        "network: unit up, volume registered at {:?}; leader {leader} term {}; placement {map_before:?}",
        started.elapsed(),
        raft_before.term
    );

    let model = Arc::new(Mutex::new(vec![0u8; VOLUME_BYTES as usize]));
    let stop = Arc::new(AtomicBool::new(false));
    let io = tokio::spawn(workload(client.clone(), model.clone(), stop.clone(), seed));
    tokio::time::sleep(Duration::from_secs(3)).await;

    // ---- network A's switch dies ----
    netns::set_switch(&switch_ns, Switch::A, false);
    let cut_at = Instant::now();
    eprintln!("network: brA down at {:?}", started.elapsed());
    let mut fault_seen_after = None;
    let mut last_status = None;
    while cut_at.elapsed() < cut {
        let (raft, status) = lcp
            .unit_status()
            .await
            .unwrap_or_else(|e| panic!("unit status with A down: {e}\n{}", rack.log_tails()));
        assert_eq!(
            (raft.leader_name.as_deref(), raft.term),
            (Some(leader.as_str()), raft_before.term),
            "leadership changed with network A down"
        );
        let map = placement(&lcp.partition_map(VOLUME).await.unwrap());
        assert_eq!(
            map, map_before,
            "partition map changed with network A down (failover or re-mirroring)"
        );
        for node in &status.nodes {
            assert_eq!(node.health, Health::Up, "node with A down: {node:?}");
        }
        for sled in &status.sleds {
            assert_eq!(sled.health, Health::Up, "sled with A down: {sled:?}");
        }
        let others = status.nodes.iter().filter(|n| n.id.0 != leader);
        let a_faults = others
            .map(|n| n.paths)
            .chain(status.sleds.iter().map(|s| s.paths))
            .all(|p| !p.network_a_up && p.network_b_up);
        if a_faults && fault_seen_after.is_none() {
            fault_seen_after = Some(cut_at.elapsed());
            eprintln!(
                "network: path faults on A reported for every other head node and sled after {:?}",
                cut_at.elapsed()
            );
        }
        last_status = Some(status);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        fault_seen_after.is_some(),
        "no path fault on network A reported within {cut:?}: {last_status:?}"
    );

    // ---- brA back ----
    netns::set_switch(&switch_ns, Switch::A, true);
    let restored_at = Instant::now();
    eprintln!("network: brA up at {:?}", started.elapsed());
    let deadline = restored_at + Duration::from_secs(30);
    loop {
        let (_, status) = lcp.unit_status().await.unwrap();
        let all_up = status
            .nodes
            .iter()
            .map(|n| n.paths)
            .chain(status.sleds.iter().map(|s| s.paths))
            .all(|p| p.network_a_up && p.network_b_up);
        if all_up {
            eprintln!(
                "network: every path up again {:?} after brA came back",
                restored_at.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "paths on A not reported up 30 s after brA came back: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let record = tokio::time::timeout(Duration::from_secs(60), io)
        .await
        .expect("the workload stops within 60 s")
        .unwrap();

    let (pause_cut, pause_cut_at) = max_pause(
        &record.completions,
        cut_at,
        restored_at + Duration::from_secs(1),
    );
    let (pause_before, _) = max_pause(&record.completions, started, cut_at);
    let (pause_after, _) = max_pause(
        &record.completions,
        restored_at + Duration::from_secs(1),
        Instant::now(),
    );
    let done_in_cut = record
        .completions
        .iter()
        .filter(|t| **t > cut_at && **t <= restored_at)
        .count();
    eprintln!(
        "network: {} writes ({} MiB), {} reads, {done_in_cut} completed while A was down; \
         max I/O pause: {pause_cut:?} during the cut (ended {:?} after brA down), \
         {pause_before:?} before, {pause_after:?} after",
        record.writes,
        record.bytes_written / MIB,
        record.reads,
        pause_cut_at.map(|t| t - cut_at),
    );
    assert!(
        record.errors.is_empty(),
        "{} I/O errors, first: {:?}\n{}",
        record.errors.len(),
        &record.errors[..record.errors.len().min(5)],
        rack.log_tails()
    );
    assert!(done_in_cut > 0, "no I/O completed while network A was down");

    // No failover, no re-mirroring, same leader.
    let map_after = placement(&lcp.partition_map(VOLUME).await.unwrap());
    assert_eq!(map_after, map_before, "placement or epochs changed");
    let (raft_after, status_after) = lcp.unit_status().await.unwrap();
    assert_eq!(
        (raft_after.leader_name.as_deref(), raft_after.term),
        (Some(leader.as_str()), raft_before.term),
        "leadership changed"
    );
    for (before, after) in status_before.nodes.iter().zip(&status_after.nodes) {
        assert_eq!(
            (&before.id, before.primaries, before.secondaries),
            (&after.id, after.primaries, after.secondaries),
            "roles moved"
        );
    }

    // Every acknowledged write reads back.
    let model = model.lock().unwrap().clone();
    for offset in (0..VOLUME_BYTES).step_by(MIB as usize) {
        let data = client
            .read(offset, MIB)
            .await
            .unwrap_or_else(|e| panic!("final read at {offset}: {e}"));
        let want = &model[offset as usize..(offset + MIB) as usize];
        if data[..] != *want {
            let at = data.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            panic!("final check: volume byte {} differs", offset + at as u64);
        }
    }
    eprintln!(
        "network: whole volume matches the model at {:?}",
        started.elapsed()
    );
    client.close();
    lcp.close();
    drop(rack);
}
