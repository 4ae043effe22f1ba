//! What snapshots must show under load, crashes and overwrites (issue 17),
//! on a unit started by `rackblock up` with a 4-partition volume, real NBD
//! clients and real processes:
//!
//! * `a_snapshot_mid_write_holds_exactly_the_writes_before_its_cut`: a
//!   logging writer (libnbd's python binding, `snapshot_writer.py`) writes
//!   at QD16 over NBD, a snapshot is taken mid-write, more writes follow.
//!   The snapshot's read-only export is checked against the log: every
//!   write acknowledged before `snapshot create` started is in it, none
//!   issued after it returned is, and it is causally closed (no write
//!   acknowledged before another was issued is missing when the later one
//!   is in); the live volume has every write.
//! * `kill9_of_a_primary_during_a_cut_aborts_it_and_a_ready_snapshot_survives`:
//!   a primary is `kill -9`ed while it holds a cut (head nodes answer cuts
//!   late: the test-only `test_snapshot_cut_reply_delay_ms`); the snapshot
//!   ends aborted and purged, no partition keeps its layer, writes flow;
//!   a snapshot made ready before reads back identical through its export
//!   after the take-over.
//! * `overwrites_after_a_snapshot_and_gc_keep_it_and_its_delete_unpins_it`:
//!   the whole volume overwritten twice after a snapshot, GC every second:
//!   the snapshot is unchanged and pins exactly image A's blocks;
//!   deleting it unpins them all and GC returns A's extents: the unit's
//!   used bytes (`unit status`, whole extents) drop by at least half of
//!   A's raw footprint. The unit runs with 2 MiB columns (`up
//!   --column-size`: 8 MiB extents), so each 32 MiB partition writes each
//!   image over several extents; with the default 64 MiB columns A, B and
//!   C of a partition would share one 256 MiB extent and nothing could
//!   return.
//!
//! Every tool runs under a deadline; the unit and the agents are stopped
//! by pid.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::snapshot::{cli_ok, copy_out, first_difference, random_bytes};
use tests::{http_get, require_tool, run_tool, RunningUnit};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
const WRITER: &str = include_str!("snapshot_writer.py");
const WRITER_MAGIC: &[u8; 8] = b"RBLOGW01";

fn log_step(unit: &RunningUnit, step: &str) {
    eprintln!(
        "[snapshot_crash +{:.1}s] {step}",
        unit.started.elapsed().as_secs_f64()
    );
}

/// `volume create NAME --size SIZE --partition-size PART`.
fn create_volume(unit: &RunningUnit, name: &str, size: &str, partition: &str) {
    cli_ok(
        unit,
        &[
            "volume",
            "create",
            name,
            "--size",
            size,
            "--partition-size",
            partition,
        ],
    );
}

/// `snapshot create VOL NAME --output json`, which must end ready.
fn snapshot_ready(unit: &RunningUnit, volume: &str, name: &str) -> Value {
    let out = cli_ok(
        unit,
        &["snapshot", "create", volume, name, "--output", "json"],
    );
    let created: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["state"], "ready", "{created}");
    created
}

fn copy_in(image: &[u8], path: &Path, uri: &str) {
    std::fs::write(path, image).unwrap();
    run_tool(
        "nbdcopy",
        &["--flush", path.to_str().unwrap(), uri],
        TOOL_TIMEOUT,
    )
    .expect_success();
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the writer's log
/// (python's `time.monotonic_ns`).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One acknowledged write of the writer's log.
#[derive(Debug, Clone, Copy)]
struct LoggedWrite {
    id: u64,
    block: u64,
    issue_ns: u64,
    ack_ns: u64,
}

fn parse_log(path: &Path) -> Vec<LoggedWrite> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let f: Vec<u64> = line
                .split_whitespace()
                .map(|x| x.parse().unwrap())
                .collect();
            assert_eq!(f.len(), 4, "log line {line:?}");
            LoggedWrite {
                id: f[0],
                block: f[1],
                issue_ns: f[2],
                ack_ns: f[3],
            }
        })
        .collect()
}

/// The write id a block of an image holds: `None` for a block never
/// written (zeros). Panics on anything else than a whole stamp of the
/// writer for that block (a torn or misplaced write).
fn stamp_of(image: &[u8], block: u64) -> Option<u64> {
    let data = &image[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize];
    if data.iter().all(|b| *b == 0) {
        return None;
    }
    assert_eq!(&data[..8], WRITER_MAGIC, "block {block}: not a stamp");
    let word = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
    let id = word(8);
    assert_eq!(
        word(16),
        block,
        "block {block} holds write {id} of another block"
    );
    for at in (24..BLOCK as usize).step_by(8) {
        assert_eq!(word(at), id, "block {block}: write {id} torn at byte {at}");
    }
    Some(id)
}

/// Spawns `python3 snapshot_writer.py` (Debian's python: the nbd module).
fn spawn_writer(
    dir: &Path,
    uri: &str,
    blocks: &[u64],
    qd: u32,
    seconds: f64,
    log: &Path,
) -> std::process::Child {
    let script = dir.join("snapshot_writer.py");
    std::fs::write(&script, WRITER).unwrap();
    let blocks: Vec<String> = blocks.iter().map(|b| b.to_string()).collect();
    Command::new("/usr/bin/python3")
        .arg(&script)
        .args([
            uri,
            &blocks.join(","),
            &qd.to_string(),
            &seconds.to_string(),
            "17",
            log.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (bounded) for `child`; kills it by pid at the deadline.
fn wait_bounded(mut child: std::process::Child, what: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            if let Some(mut s) = child.stdout.take() {
                let _ = s.read_to_string(&mut out);
            }
            if let Some(mut s) = child.stderr.take() {
                let _ = s.read_to_string(&mut out);
            }
            assert!(status.success(), "{what} failed ({status}): {out}");
            return out;
        }
        if Instant::now() > deadline {
            // SAFETY: our own child, by pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
            panic!("{what} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The cut property of a snapshot image against the writer's log, with
/// `[t0, t1]` the span of `snapshot create` on the same clock. Returns
/// (writes in the snapshot, writes not in it).
fn check_cut(writes: &[LoggedWrite], snap: &[u8], t0: u64, t1: u64) -> (usize, usize) {
    let mut chains: BTreeMap<u64, Vec<LoggedWrite>> = BTreeMap::new();
    for w in writes {
        chains.entry(w.block).or_default().push(*w);
    }
    let mut inside: Vec<LoggedWrite> = Vec::new();
    let mut outside: Vec<LoggedWrite> = Vec::new();
    for (block, chain) in chains.iter_mut() {
        // Never two in flight to one block: issue order is ack order.
        chain.sort_by_key(|w| w.issue_ns);
        let held = match stamp_of(snap, *block) {
            None => 0,
            Some(id) => {
                1 + chain.iter().position(|w| w.id == id).unwrap_or_else(|| {
                    panic!("snapshot block {block} holds write {id}, never acknowledged there")
                })
            }
        };
        inside.extend_from_slice(&chain[..held]);
        outside.extend_from_slice(&chain[held..]);
    }
    for w in &outside {
        assert!(
            w.ack_ns >= t0,
            "write {w:?} was acknowledged before the snapshot started ({t0}) but is not in it"
        );
    }
    for w in &inside {
        assert!(
            w.issue_ns <= t1,
            "write {w:?} was issued after the snapshot was ready ({t1}) but is in it"
        );
    }
    // Causal closure: max issue of the writes in <= min ack of those out.
    let latest_in = inside.iter().max_by_key(|w| w.issue_ns);
    let earliest_out = outside.iter().min_by_key(|w| w.ack_ns);
    if let (Some(later), Some(earlier)) = (latest_in, earliest_out) {
        assert!(
            earlier.ack_ns >= later.issue_ns,
            "write {earlier:?} was acknowledged before write {later:?} was issued; \
             the snapshot holds the later one and misses the earlier one"
        );
    }
    (inside.len(), outside.len())
}

/// The tracked blocks: 32 per 64 MiB partition of a 256 MiB volume.
fn writer_blocks() -> Vec<u64> {
    let per_partition = 64 * MIB / BLOCK;
    (0..4)
        .flat_map(|p| (0..32).map(move |i| p * per_partition + 7 + i * 509))
        .collect()
}

#[test]
fn a_snapshot_mid_write_holds_exactly_the_writes_before_its_cut() {
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("/usr/bin/python3", "python3-libnbd");
    let unit = RunningUnit::start("256MiB");
    create_volume(&unit, "vol1", "256MiB", "64MiB");
    let (mut agent, uri) = unit.attach("vol1");
    let dir = unit.dir.path();
    log_step(&unit, "unit up, vol1 attached");

    let blocks = writer_blocks();
    let log = dir.join("writes.log");
    let writer = spawn_writer(dir, &uri, &blocks, 16, 8.0, &log);
    // Mid-write: the writer has run for a while and goes on after.
    std::thread::sleep(Duration::from_millis(2500));
    let t0 = monotonic_ns();
    let created = snapshot_ready(&unit, "vol1", "mid");
    let t1 = monotonic_ns();
    log_step(
        &unit,
        &format!(
            "snapshot mid ready in {:.1} ms (pause {} us)",
            (t1 - t0) as f64 / 1e6,
            created["pause_us"]
        ),
    );
    let summary = wait_bounded(writer, "snapshot_writer.py", Duration::from_secs(120));
    let writes = parse_log(&log);
    log_step(&unit, &format!("writer done: {}", summary.trim()));
    assert!(
        writes.iter().any(|w| w.ack_ns < t0),
        "no write acknowledged before the snapshot"
    );
    assert!(
        writes.iter().any(|w| w.issue_ns > t1),
        "no write issued after the snapshot"
    );

    let (mut snap_agent, snap_uri) = unit.attach_with("vol1@mid", &["--read-only"]);
    let snap = copy_out(&snap_uri, &dir.join("snap.raw"));
    let (inside, outside) = check_cut(&writes, &snap, t0, t1);
    let untracked_written = (0..snap.len() as u64 / BLOCK)
        .filter(|b| !blocks.contains(b))
        .any(|b| {
            snap[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize]
                .iter()
                .any(|x| *x != 0)
        });
    assert!(
        !untracked_written,
        "the snapshot has data where nobody wrote"
    );
    log_step(
        &unit,
        &format!("snapshot: {inside} writes in, {outside} after the cut; cut property holds"),
    );
    assert!(inside > 0 && outside > 0, "not a mid-write snapshot");

    // The live volume has every write: each block its last one.
    let live = copy_out(&uri, &dir.join("live.raw"));
    let mut last: BTreeMap<u64, LoggedWrite> = BTreeMap::new();
    for w in &writes {
        let e = last.entry(w.block).or_insert(*w);
        if w.issue_ns > e.issue_ns {
            *e = *w;
        }
    }
    for block in &blocks {
        assert_eq!(
            stamp_of(&live, *block),
            last.get(block).map(|w| w.id),
            "live block {block}"
        );
    }
    log_step(&unit, "live vol1 holds every write");

    assert!(snap_agent.terminate(), "{}", snap_agent.log_text());
    assert!(agent.terminate(), "{}", agent.log_text());
    let mut unit = unit;
    assert!(unit.stop(), "rackblock up did not stop cleanly");
}

/// Head node `h`'s (1..=3) /partitions, or None if it does not answer.
fn partitions_of(unit: &RunningUnit, h: u16) -> Option<Vec<Value>> {
    let (status, body) = http_get(unit.ports.head_admin(h), "/partitions")?;
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    v["partitions"].as_array().cloned()
}

/// The unit's status (from a head node that answers).
fn unit_status(unit: &RunningUnit) -> Value {
    for h in 1..=3 {
        if let Some((200, body)) = http_get(unit.ports.head_admin(h), "/status") {
            return serde_json::from_str(&body).unwrap();
        }
    }
    panic!("no head node answers /status");
}

/// The snapshot records of the unit's status.
fn snapshot_records(unit: &RunningUnit) -> Vec<Value> {
    unit_status(unit)["unit"]["snapshots"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The (first) volume id of the snapshot named `name`.
fn snapshot_volume(unit: &RunningUnit, name: &str) -> u64 {
    snapshot_records(unit)
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["volumes"][0].as_u64())
        .unwrap_or_else(|| panic!("no snapshot record {name}"))
}

/// The pid `up` recorded for daemon `name` (e.g. "hn-1").
fn daemon_pid(unit: &RunningUnit, name: &str) -> i32 {
    let path = unit.data_dir.join("run").join(format!("{name}.pid"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn kill9_of_a_primary_during_a_cut_aborts_it_and_a_ready_snapshot_survives() {
    require_tool("nbdcopy", "libnbd-bin");
    const DELAY_MS: u64 = 1000;
    let unit = RunningUnit::start_with(
        "256MiB",
        &[
            "--head-node-setting",
            &format!("test_snapshot_cut_reply_delay_ms = {DELAY_MS}"),
        ],
    );
    create_volume(&unit, "vol1", "256MiB", "64MiB");
    let (mut agent, uri) = unit.attach("vol1");
    let dir = unit.dir.path();
    let image = random_bytes(256 * MIB);
    copy_in(&image, &dir.join("a.raw"), &uri);
    log_step(&unit, "image A written to vol1");
    let ready = snapshot_ready(&unit, "vol1", "before");
    log_step(&unit, &format!("snapshot before ready: {ready}"));
    let vol1 = snapshot_volume(&unit, "before");

    // The victim: a head node serving a vol1 primary, not the Raft leader
    // if another one does (that adds an election, not what this tests).
    let status = unit_status(&unit);
    let leader = status["raft"]["leader_name"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let mut candidates: Vec<u16> = (1..=3u16)
        .filter(|h| {
            partitions_of(&unit, *h).is_some_and(|ps| {
                ps.iter()
                    .any(|p| p["volume"] == vol1 && p["role"] == "primary")
            })
        })
        .collect();
    candidates.sort_by_key(|h| format!("hn-{h}") == leader);
    let victim = *candidates.first().expect("a head node with a vol1 primary");
    let victim_name = format!("hn-{victim}");
    log_step(&unit, &format!("victim {victim_name} (leader {leader})"));

    // A snapshot whose cut the victim holds when it dies.
    let victim_log = unit.data_dir.join("run").join(format!("{victim_name}.log"));
    let late_before = std::fs::read_to_string(&victim_log)
        .unwrap_or_default()
        .matches("answering a cut late")
        .count();
    let create = unit
        .cli_command()
        .args(["snapshot", "create", "vol1", "during", "--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let late = std::fs::read_to_string(&victim_log)
            .unwrap_or_default()
            .matches("answering a cut late")
            .count();
        if late > late_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the victim took no cut of 'during'"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = daemon_pid(&unit, &victim_name);
    // SAFETY: a daemon of this unit, by the pid `up` recorded.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    log_step(
        &unit,
        &format!("kill -9 {victim_name} (pid {pid}) holding a cut"),
    );
    let out = create.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    log_step(
        &unit,
        &format!(
            "snapshot create during: {} {}{}",
            out.status,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    );
    assert!(
        !text.contains("\"ready\""),
        "a snapshot whose primary died during its cut became ready: {text}"
    );

    // It ends aborted and purged: gone from the records, no partition
    // keeps a layer other than "before"'s.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = unit_status(&unit);
        let records: Vec<Value> = status["unit"]["snapshots"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let during: Vec<&Value> = records.iter().filter(|r| r["name"] == "during").collect();
        let listed = cli_ok(&unit, &["snapshot", "list", "vol1", "--output", "json"]);
        let layers: Vec<(u16, u64, u64)> = (1..=3u16)
            .filter(|h| *h != victim)
            .flat_map(|h| {
                partitions_of(&unit, h)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|p| p["volume"] == vol1 && p["role"] == "primary")
                    .map(move |p| {
                        (
                            h,
                            p["partition"].as_u64().unwrap(),
                            p["snapshots"].as_u64().unwrap(),
                        )
                    })
            })
            .collect();
        let primaries = layers.len();
        let clean = during.is_empty()
            && !listed.contains("during")
            && primaries == 4
            && layers.iter().all(|(_, _, n)| *n == 1);
        if clean {
            log_step(
                &unit,
                &format!("'during' purged; vol1 primaries (node, partition, layers): {layers:?}"),
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "'during' not cleanly aborted: records {during:?}, list {listed}, layers {layers:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // No cut holds acknowledgements: a write goes through; the ready
    // snapshot reads back A through its export after the take-over.
    run_tool(
        "qemu-io",
        &["-f", "raw", &uri, "-c", "write -P 0x5a 0 1M"],
        TOOL_TIMEOUT,
    )
    .expect_success();
    let (mut snap_agent, snap_uri) = unit.attach_with("vol1@before", &["--read-only"]);
    let snap = copy_out(&snap_uri, &dir.join("before.raw"));
    assert_eq!(
        first_difference(&snap, &image),
        None,
        "snapshot 'before' after the take-over"
    );
    log_step(&unit, "'before' reads A after the take-over");
    // And the coordinator still takes snapshots.
    let after = snapshot_ready(&unit, "vol1", "after");
    log_step(
        &unit,
        &format!("snapshot after ready: pause {} us", after["pause_us"]),
    );

    assert!(snap_agent.terminate(), "{}", snap_agent.log_text());
    assert!(agent.terminate(), "{}", agent.log_text());
    let mut unit = unit;
    // `up` exits 0 with one daemon already gone.
    unit.stop();
}

/// The unit's used bytes (the control plane's allocated extents).
fn used_bytes(unit: &RunningUnit) -> u64 {
    unit_status(unit)["unit"]["capacity"]["used_bytes"]
        .as_u64()
        .unwrap()
}

/// Sum of a `/partitions` field over every primary of `volume`.
fn primaries_sum(unit: &RunningUnit, volume: u64, field: &str) -> u64 {
    (1..=3u16)
        .flat_map(|h| partitions_of(unit, h).unwrap_or_default())
        .filter(|p| p["volume"] == volume && p["role"] == "primary")
        .map(|p| p[field].as_u64().unwrap_or(0))
        .sum()
}

/// Flushes, then waits (bounded) for two more GC passes on every primary
/// of `volume` and for the used bytes to settle.
fn flush_and_gc(unit: &RunningUnit, volume: u64) -> u64 {
    unit.flush_all();
    let passes = primaries_sum(unit, volume, "gc_passes");
    let deadline = Instant::now() + Duration::from_secs(60);
    while primaries_sum(unit, volume, "gc_passes") < passes + 2 * 4 {
        assert!(Instant::now() < deadline, "GC passes do not run");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut used = used_bytes(unit);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(1500));
        let now = used_bytes(unit);
        if now == used {
            break;
        }
        used = now;
    }
    used
}

#[test]
fn overwrites_after_a_snapshot_and_gc_keep_it_and_its_delete_unpins_it() {
    require_tool("nbdcopy", "libnbd-bin");
    const SIZE: u64 = 128 * MIB;
    let unit = RunningUnit::start_with(
        "256MiB",
        &[
            "--head-node-setting",
            "gc_interval_ms = 1000",
            "--column-size",
            "2MiB",
        ],
    );
    create_volume(&unit, "vol2", "128MiB", "32MiB");
    let (mut agent, uri) = unit.attach("vol2");
    let dir = unit.dir.path();
    let image_a = random_bytes(SIZE);
    copy_in(&image_a, &dir.join("a.raw"), &uri);
    let created = snapshot_ready(&unit, "vol2", "s");
    let vol2 = snapshot_volume(&unit, "s");
    let with_a = flush_and_gc(&unit, vol2);
    log_step(
        &unit,
        &format!(
            "A written, snapshot s ready (pause {} us), flushed: used {} MiB",
            created["pause_us"],
            with_a / MIB
        ),
    );

    let image_b = random_bytes(SIZE);
    copy_in(&image_b, &dir.join("b.raw"), &uri);
    let after_b = flush_and_gc(&unit, vol2);
    let image_c = random_bytes(SIZE);
    copy_in(&image_c, &dir.join("c.raw"), &uri);
    let after_c = flush_and_gc(&unit, vol2);
    let pinned = primaries_sum(&unit, vol2, "snapshot_pinned_blocks");
    log_step(
        &unit,
        &format!(
            "overwritten twice, GC run: used {} MiB after B, {} MiB after C; snapshot pins {} MiB",
            after_b / MIB,
            after_c / MIB,
            pinned * BLOCK / MIB
        ),
    );
    assert_eq!(pinned * BLOCK, SIZE, "the snapshot pins the whole image A");

    let (mut snap_agent, snap_uri) = unit.attach_with("vol2@s", &["--read-only"]);
    let snap = copy_out(&snap_uri, &dir.join("s.raw"));
    assert_eq!(first_difference(&snap, &image_a), None, "snapshot after GC");
    let live = copy_out(&uri, &dir.join("live.raw"));
    assert_eq!(first_difference(&live, &image_c), None, "vol2 after GC");
    assert!(snap_agent.terminate(), "{}", snap_agent.log_text());
    log_step(&unit, "snapshot reads A, vol2 reads C");

    cli_ok(&unit, &["snapshot", "delete", "vol2", "s"]);
    let after_delete = flush_and_gc(&unit, vol2);
    let pinned = primaries_sum(&unit, vol2, "snapshot_pinned_blocks");
    log_step(
        &unit,
        &format!(
            "snapshot deleted, GC run: used {} MiB (was {} MiB); pinned {pinned} blocks",
            after_delete / MIB,
            after_c / MIB
        ),
    );
    assert_eq!(pinned, 0, "the deleted snapshot still pins blocks");
    // The unit's used bytes count allocated extents (2 MiB columns, 4+2:
    // 8 MiB of data, 12 MiB on the sleds each). A's blocks are dead once
    // the snapshot goes (B and C overwrote every one), so GC frees the
    // extents that held them: at least half of A's raw footprint returns
    // (extents shared with B's dead blocks go too; ones shared with C's
    // live blocks, at most one per flush boundary, may stay).
    let a_raw = SIZE / 4 * 6;
    // GC frees them pass by pass: wait for it (bounded), not one look.
    let mut after_delete = after_delete;
    let deadline = Instant::now() + Duration::from_secs(90);
    while after_delete + a_raw / 2 > after_c && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        after_delete = used_bytes(&unit);
    }
    log_step(
        &unit,
        &format!(
            "unit used bytes: {} MiB with A, {} MiB after B, {} MiB after C, {} MiB after the delete",
            with_a / MIB,
            after_b / MIB,
            after_c / MIB,
            after_delete / MIB
        ),
    );
    assert!(
        after_delete + a_raw / 2 <= after_c,
        "the space did not return: used {} MiB before the delete, {} MiB after (A takes {} MiB raw)",
        after_c / MIB,
        after_delete / MIB,
        a_raw / MIB
    );
    let live = copy_out(&uri, &dir.join("live2.raw"));
    assert_eq!(first_difference(&live, &image_c), None, "vol2 after delete");

    assert!(agent.terminate(), "{}", agent.log_text());
    let mut unit = unit;
    assert!(unit.stop(), "rackblock up did not stop cleanly");
}
