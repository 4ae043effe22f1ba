//! Degraded extents as a host sees them (issue 14, "What it must show"):
//! real sled-controller and head-node processes, the volume attached by
//! `rackblock attach` (its own process, no zonal plane: `--rack` and an
//! attachment file), and fio's nbd engine writing with `verify=crc32c`.
//!
//! ```text
//! unit      6 sleds, 4+2, min_flush_columns = 4 (= k), 3 head nodes with
//!           16 MiB write logs, a 48 MiB volume (6 partitions of 8 MiB)
//! kill -9   sled-6 ─▶ fio writes 48 MiB (3× a log) and verifies: 0 errors
//! kill -9   sled-5 while fio writes another 48 MiB: 0 errors (4 sleds
//!           left: new extents have k columns, owed columns recorded)
//! restart   both ─▶ repair writes every owed column; every extent has its
//!           k+m columns on Up sleds, none on two of one sled's devices;
//!           the repair rate is printed
//! verify    fio --verify_only of the last pass, then again with two
//!           *other* sleds killed (the repaired columns are real)
//! ```
//!
//! `min_flush_columns = k` is what lets writes continue with two of six
//! sleds gone (the default, k+1, makes flushes wait instead:
//! `degraded::below_the_minimum_writes_wait_for_a_sled_instead_of_failing`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use local_control_plane::{Command, Health, UnitStatus};
use serde_json::Value;
use tests::{require_tool, run_tool, Daemon, HeadNodeOptions, TestUnit};

const MIB: u64 = 1 << 20;
const K: u8 = 4;
const M: u8 = 2;
const SLEDS: u32 = 6;
const COLUMN_BYTES: u64 = 2 * MIB;
const DEVICE_BYTES: u64 = 128 * MIB;
const VOLUME_BYTES: u64 = 48 * MIB;
const PARTITION_BYTES: u64 = 8 * MIB;
const WAL_BYTES: u64 = 16 * MIB;
/// Each fio pass writes the whole volume: three logs' worth.
const PASS_BYTES: u64 = VOLUME_BYTES;
const FIO_TIMEOUT: Duration = Duration::from_secs(240);

struct Unit {
    unit: TestUnit,
    sleds: Vec<Option<Daemon>>,
    heads: Vec<Daemon>,
    lcp: local_control_plane::LcpClient,
    _agent: Daemon,
    uri: String,
    started: Instant,
}

impl Unit {
    async fn start(volume: u64) -> Unit {
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
        // Extents of k columns while only k sleds are Up (see the module
        // docs): a rack-file setting of the unit.
        let rack = std::fs::read_to_string(&unit.rack_path).unwrap();
        let rack = rack.replacen("[unit]\n", &format!("[unit]\nmin_flush_columns = {K}\n"), 1);
        std::fs::write(&unit.rack_path, rack).unwrap();
        // A killed sled stays Down (not Failed) so that it can return.
        unit.append_head_node_config(&format!(
            "wal_size_bytes = {WAL_BYTES}\nio_engine = \"sync\"\nflush_age_ms = 300\n\
             sled_failed_after_ms = 600000\nrepair_max_concurrent = 8\n\
             repair_bytes_per_second = {}\nrepair_poll_interval_ms = 100\n",
            200 * MIB
        ));
        let sleds: Vec<Option<Daemon>> = unit.start_sleds().into_iter().map(Some).collect();
        let heads = unit.start_head_nodes();
        let lcp = unit.lcp_client();
        let name = format!("degraded-nbd-{volume}");
        tests::register_volume(
            &lcp,
            Command::RegisterVolume {
                volume,
                name: name.clone(),
                size_bytes: VOLUME_BYTES,
                partition_size_bytes: PARTITION_BYTES,
                k: K,
                m: M,
            },
            Duration::from_secs(30),
        )
        .await;
        unit.wait_datapaths_ready(&heads, Duration::from_secs(30));
        let (agent, uri) = attach(&unit, volume, &name);
        Unit {
            unit,
            sleds,
            heads,
            lcp,
            _agent: agent,
            uri,
            started,
        }
    }

    fn note(&self, what: &str) {
        eprintln!("[degraded-nbd] {what} at {:.1?}", self.started.elapsed());
    }

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

    async fn wait_sleds(&self, sleds: &[&str], health: Health) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status().await;
            let ok = sleds
                .iter()
                .all(|id| s.sleds.iter().any(|x| x.id.0 == *id && x.health == health));
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "{sleds:?} not {health:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn kill_sled(&mut self, i: usize) {
        self.sleds[i].take().expect("sled running").kill9();
        self.note(&format!("kill -9 sled-{}", i + 1));
    }

    fn logs(&self) -> String {
        self.heads
            .iter()
            .map(|h| {
                let text = h.log_text();
                let start = text.len().saturating_sub(6000);
                format!("---- {} ----\n{}", h.name, &text[start..])
            })
            .collect()
    }

    /// Waits until no column is owed, no repair runs or waits, and every
    /// extent's k+m columns are on Up sleds with no sled holding more
    /// columns than there are extents; returns the status.
    async fn wait_full_width(&self, timeout: Duration) -> UnitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status().await;
            let used = |sled: &local_control_plane::state::SledStatus| -> usize {
                sled.devices.iter().map(|d| d.used_columns).sum()
            };
            let on_up: usize = s
                .sleds
                .iter()
                .filter(|x| x.health == Health::Up)
                .map(used)
                .sum();
            let done = s.allocation.owed_columns == 0
                && s.repair.tasks.is_empty()
                && s.repair.columns_waiting == 0
                && s.sleds.iter().all(|x| x.health == Health::Up)
                && on_up == s.extents * usize::from(K + M);
            if done {
                // Distinct sleds: k+m columns per extent on six sleds, none
                // holding more than one column per extent.
                for sled in &s.sleds {
                    assert!(
                        used(sled) <= s.extents,
                        "{} holds {} columns of {} extents",
                        sled.id.0,
                        used(sled),
                        s.extents
                    );
                }
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "extents not back to {K}+{M} after {timeout:?}: {:?} {:?}, {on_up} columns on Up sleds for {} extents\n{}",
                s.allocation,
                s.repair,
                s.extents,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// `rackblock attachment create` then `rackblock attach --rack` (no zonal
/// plane), waited until it answers NBD; returns the agent and the URI.
fn attach(unit: &TestUnit, volume: u64, name: &str) -> (Daemon, String) {
    let rack = unit.rack_path.to_str().unwrap();
    let file = unit.dir.path().join(format!("{name}.attachment"));
    let created = run_tool(
        tests::rackblock_bin().to_str().unwrap(),
        &[
            "attachment",
            "create",
            "--rack",
            rack,
            &volume.to_string(),
            "--out",
            file.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    let created = created.expect_success();
    drop(created);
    let listen = SocketAddr::from(([127, 0, 0, 1], tests::next_port()));
    let mut command = std::process::Command::new(tests::rackblock_bin());
    command.args([
        "attach",
        name,
        "--rack",
        rack,
        "--attachment-file",
        file.to_str().unwrap(),
        "--listen",
        &listen.to_string(),
        "--failover-timeout",
        "120s",
    ]);
    let mut agent = Daemon::spawn_command(
        &format!("attach {name}"),
        command,
        unit.dir.path().join(format!("attach-{name}.log")),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client::nbd::server_greets(listen) {
        if let Ok(Some(status)) = agent.child.try_wait() {
            panic!("attach exited ({status}):\n{}", agent.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "attach not serving NBD:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (agent, format!("nbd://{listen}/{name}"))
}

/// One fio pass over the whole volume: sequential 256 KiB writes at QD4
/// with crc32c headers seeded by `seed`, then the read-back (or, with
/// `verify_only`, only the read-back of a pass written with `seed`).
/// Returns fio's JSON job; panics on any error.
fn fio_pass(uri: &str, dir: &Path, seed: u64, verify_only: bool) -> Value {
    let output: PathBuf = dir.join(format!("fio-{seed}-{verify_only}.json"));
    let mut args = vec![
        "--name=degraded".to_string(),
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        "--rw=write".to_string(),
        "--bs=256k".to_string(),
        "--iodepth=4".to_string(),
        format!("--size={PASS_BYTES}"),
        "--verify=crc32c".to_string(),
        "--verify_fatal=1".to_string(),
        "--verify_state_save=0".to_string(),
        format!("--randseed={seed}"),
        "--output-format=json".to_string(),
        format!("--output={}", output.display()),
    ];
    if verify_only {
        args.push("--verify_only".to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = run_tool("fio", &args, FIO_TIMEOUT);
    let text = std::fs::read_to_string(&output).unwrap_or_default();
    assert!(run.status.success(), "{run}\n{text}");
    let report: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("fio JSON ({e}):\n{text}\n{run}"));
    let job = report["jobs"][0].clone();
    assert_eq!(job["error"], 0, "{job:#}");
    assert_eq!(
        job["read"]["io_bytes"].as_u64(),
        Some(PASS_BYTES),
        "every block read back and verified: {job:#}"
    );
    if !verify_only {
        assert_eq!(
            job["write"]["io_bytes"].as_u64(),
            Some(PASS_BYTES),
            "{job:#}"
        );
    }
    job
}

fn longest_write_ms(job: &Value) -> f64 {
    job["write"]["clat_ns"]["max"].as_f64().unwrap_or(0.0) / 1e6
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_writes_survive_two_sleds_killed_and_repair_restores_full_width() {
    require_tool("fio", "fio");
    let mut u = Unit::start(151).await;
    let dir = u.unit.dir.path().to_path_buf();
    u.note("unit up, volume attached over NBD");

    u.kill_sled(5);
    u.wait_sleds(&["sled-6"], Health::Down).await;
    let first = fio_pass(&u.uri, &dir, 1511, false);
    let first_ms = longest_write_ms(&first);
    u.note(&format!(
        "fio: {} MiB written (3× a log) and verified with sled-6 down, longest write {first_ms:.0} ms",
        PASS_BYTES / MIB
    ));
    let s = u.status().await;
    assert!(s.allocation.degraded_extents > 0, "{:?}", s.allocation);

    // The second sled dies while fio writes.
    let writer = {
        let (uri, dir) = (u.uri.clone(), dir.clone());
        std::thread::spawn(move || fio_pass(&uri, &dir, 1512, false))
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!writer.is_finished(), "fio ended before the second kill");
    u.kill_sled(4);
    let second = match writer.join() {
        Ok(job) => job,
        Err(panic) => panic!("fio with sled-5 killed: {panic:?}\n{}", u.logs()),
    };
    let second_ms = longest_write_ms(&second);
    u.note(&format!(
        "fio: {} MiB written and verified, sled-5 killed during it, longest write {second_ms:.0} ms",
        PASS_BYTES / MIB
    ));
    let s = u.status().await;
    u.note(&format!(
        "allocation with two sleds down: {:?}",
        s.allocation
    ));
    assert!(s.allocation.owed_columns > 0, "{:?}", s.allocation);

    // Both return: repair writes every owed column on them.
    let before = s.repair.completed_bytes;
    let repair_started = Instant::now();
    u.sleds[4] = Some(u.unit.start_sled(4));
    u.sleds[5] = Some(u.unit.start_sled(5));
    u.note("restarted sled-5 and sled-6");
    u.wait_sleds(&["sled-5", "sled-6"], Health::Up).await;
    let s = u.wait_full_width(Duration::from_secs(120)).await;
    let seconds = repair_started.elapsed().as_secs_f64();
    let bytes = s.repair.completed_bytes - before;
    println!(
        "DEGRADED NBD REPAIR: {} extents at {K}+{M} again; {bytes} bytes of owed columns written in \
         {seconds:.1} s since the restarts: {:.1} MiB/s (limit 200 MiB/s); longest fio write \
         {first_ms:.0} ms with one sled down, {second_ms:.0} ms across the second kill",
        s.extents,
        bytes as f64 / MIB as f64 / seconds
    );
    assert!(bytes > 0, "nothing repaired: {:?}", s.repair);

    fio_pass(&u.uri, &dir, 1512, true);
    u.note("fio --verify_only after the repair: identical");
    u.kill_sled(0);
    u.kill_sled(1);
    fio_pass(&u.uri, &dir, 1512, true);
    u.note("fio --verify_only with sled-1 and sled-2 killed: identical");
}
