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
//! * `causal_closure_across_two_volumes_in_one_consistency_group`: the
//!   same writer over two volumes (vol1, vol2) whose writes form
//!   dependency chains alternating between them (each write issued only
//!   after a write to the other volume was acknowledged); `snapshot
//!   create --group g vol1 vol2` mid-write. Both exports (`vol1@g`,
//!   `vol2@g`) are checked together: every write whose dependency is
//!   missing from the group is missing too, and the real-time closure
//!   holds across the two volumes; the group is listed with its members
//!   (CLI and zonal `volumes`), one delete removes it from both.
//! * `kill9_of_a_primary_during_a_cut_aborts_it_and_a_ready_snapshot_survives`:
//!   a primary is `kill -9`ed while it holds a cut (head nodes answer cuts
//!   late: the test-only `test_snapshot_cut_reply_delay_ms`); the snapshot
//!   ends aborted and purged, no partition keeps its layer, writes flow;
//!   a snapshot made ready before reads back identical through its export
//!   after the take-over. `kill9_of_a_primary_during_a_group_cut_aborts_the_group`:
//!   the same for a consistency group over two volumes (aborted and
//!   purged on both members, no layer left on any partition of either).
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
//! * `kill9_of_a_primary_during_a_flatten_ends_flattened_with_the_clone_s_data`:
//!   the promoted primary starts the flatten over and it ends.
//! * `kill9_of_a_primary_during_a_rollback_resumes_it_to_the_snapshot` and
//!   `kill9_of_the_raft_leader_during_a_rollback_resumes_it_to_the_snapshot`:
//!   `volume rollback` paced by `rollback_bytes_per_second` (1 MiB/s), a
//!   head node killed once the victim's primaries rewrote blocks and the
//!   control plane recorded a cursor: the rollback resumes at the promoted
//!   primaries (some of their blocks rewritten, not all) and ends; the
//!   volume reads every block of the snapshot over NBD, a later snapshot
//!   keeps its content, and the volume takes writes after.
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
use tests::{http_get, require_tool, run_tool, Daemon, RunningUnit};

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

/// `volume create NAME --size SIZE --partition-size PART`, retried
/// (bounded) while the zonal plane answers 503: on a loaded box the unit
/// can be between leaders for a moment (CI: "hn-3 is not the leader
/// (leader: unknown)" right after the first volume was created). The
/// create is idempotent (the same volume again is 200).
fn create_volume(unit: &RunningUnit, name: &str, size: &str, partition: &str) {
    let args = [
        "volume",
        "create",
        name,
        "--size",
        size,
        "--partition-size",
        partition,
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = unit.cli(&args);
        if out.status.success() {
            return;
        }
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("HTTP 503") && Instant::now() < deadline,
            "rackblock {args:?}: {text}"
        );
        log_step(
            unit,
            &format!("volume create {name} retried: {}", text.trim()),
        );
        std::thread::sleep(Duration::from_millis(500));
    }
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

/// [`snapshot_ready`], retried (bounded) when the snapshot ends aborted
/// for a reason a loaded box gives for a moment (CI: "partition 2/2 on
/// hn-1: unavailable: primary holds no valid lease yet" right after the
/// volume was written): an aborted snapshot is purged, then the name is
/// free again. For tests about something else than the cut.
fn snapshot_ready_retried(unit: &RunningUnit, volume: &str, name: &str) -> Value {
    create_ready_retried(
        unit,
        &["snapshot", "create", volume, name, "--output", "json"],
        name,
    )
}

/// `rackblock ARGS` (a `snapshot create` of snapshot `name` with
/// `--output json`), retried like [`snapshot_ready_retried`].
fn create_ready_retried(unit: &RunningUnit, args: &[&str], name: &str) -> Value {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let out = unit.cli(args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            let created: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(created["state"], "ready", "{created}");
            return created;
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            text.contains("\"aborted\"") && attempt < 3,
            "rackblock {args:?} (attempt {attempt}): {text}{err}"
        );
        log_step(
            unit,
            &format!(
                "snapshot {name} aborted (attempt {attempt}): {}",
                err.trim()
            ),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while snapshot_records(unit).iter().any(|r| r["name"] == name) {
            assert!(
                Instant::now() < deadline,
                "aborted {name} not purged in 60 s"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
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
    /// Index of the writer's URI (the volume) it went to.
    volume: usize,
    block: u64,
    issue_ns: u64,
    ack_ns: u64,
    /// The write acknowledged before this one was issued (its chain's
    /// previous one, on the other volume when there are two), 0 if none.
    dep: u64,
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
            assert_eq!(f.len(), 6, "log line {line:?}");
            LoggedWrite {
                id: f[0],
                volume: f[1] as usize,
                block: f[2],
                issue_ns: f[3],
                ack_ns: f[4],
                dep: f[5],
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

/// Spawns `python3 snapshot_writer.py` (Debian's python: the nbd module)
/// over the volumes at `uris` (the log's volume index is the position).
fn spawn_writer(
    dir: &Path,
    uris: &[&str],
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
            &uris.join(","),
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

/// What [`check_cut`] found.
#[derive(Debug, Default)]
struct CutCheck {
    /// Writes in the snapshot, and after its cut.
    inside: usize,
    outside: usize,
    /// Writes in the snapshot whose dependency went to another volume
    /// (each checked to be in the snapshot too).
    cross_volume_deps_in: usize,
    /// Writes after the cut whose dependency (on another volume) is in:
    /// chains the cut went through between the two volumes.
    cross_volume_deps_straddling: usize,
}

/// The cut property of a snapshot (one image per volume of the writer,
/// all taken by one cut: a consistency group) against the writer's log,
/// with `[t0, t1]` the span of `snapshot create` on the same clock.
fn check_cut(writes: &[LoggedWrite], snaps: &[&[u8]], t0: u64, t1: u64) -> CutCheck {
    let mut chains: BTreeMap<(usize, u64), Vec<LoggedWrite>> = BTreeMap::new();
    for w in writes {
        chains.entry((w.volume, w.block)).or_default().push(*w);
    }
    let mut inside: Vec<LoggedWrite> = Vec::new();
    let mut outside: Vec<LoggedWrite> = Vec::new();
    for ((volume, block), chain) in chains.iter_mut() {
        // Never two in flight to one block: issue order is ack order.
        chain.sort_by_key(|w| w.issue_ns);
        let held = match stamp_of(snaps[*volume], *block) {
            None => 0,
            Some(id) => {
                1 + chain.iter().position(|w| w.id == id).unwrap_or_else(|| {
                    panic!(
                        "volume {volume}'s snapshot block {block} holds write {id}, \
                         never acknowledged there"
                    )
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
    // The explicit dependencies: a write in the snapshot has its
    // dependency in it too, whichever volume each went to.
    let by_id: BTreeMap<u64, &LoggedWrite> = writes.iter().map(|w| (w.id, w)).collect();
    let in_ids: std::collections::BTreeSet<u64> = inside.iter().map(|w| w.id).collect();
    let mut check = CutCheck {
        inside: inside.len(),
        outside: outside.len(),
        ..CutCheck::default()
    };
    for w in writes.iter().filter(|w| w.dep != 0) {
        let dep = by_id
            .get(&w.dep)
            .unwrap_or_else(|| panic!("write {w:?} depends on a write not in the log"));
        assert!(
            dep.ack_ns <= w.issue_ns,
            "write {w:?} issued before its dependency {dep:?} was acknowledged"
        );
        let cross = dep.volume != w.volume;
        match (in_ids.contains(&w.id), in_ids.contains(&dep.id)) {
            (true, false) => panic!(
                "write {w:?} is in the snapshot but the write it depends on, {dep:?}, \
                 acknowledged before it was issued, is not"
            ),
            (true, true) if cross => check.cross_volume_deps_in += 1,
            (false, true) if cross => check.cross_volume_deps_straddling += 1,
            _ => {}
        }
    }
    // Causal closure in real time: max issue of the writes in <= min ack
    // of those out (across every volume).
    let latest_in = inside.iter().max_by_key(|w| w.issue_ns);
    let earliest_out = outside.iter().min_by_key(|w| w.ack_ns);
    if let (Some(later), Some(earlier)) = (latest_in, earliest_out) {
        assert!(
            earlier.ack_ns >= later.issue_ns,
            "write {earlier:?} was acknowledged before write {later:?} was issued; \
             the snapshot holds the later one and misses the earlier one"
        );
    }
    check
}

/// Whether `image` has data outside the tracked `blocks`.
fn untracked_written(image: &[u8], blocks: &[u64]) -> bool {
    (0..image.len() as u64 / BLOCK)
        .filter(|b| !blocks.contains(b))
        .any(|b| {
            image[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize]
                .iter()
                .any(|x| *x != 0)
        })
}

/// Each live volume (one image per writer volume) holds every block's
/// last write.
fn assert_live_has_every_write(writes: &[LoggedWrite], lives: &[&[u8]], blocks: &[u64]) {
    let mut last: BTreeMap<(usize, u64), LoggedWrite> = BTreeMap::new();
    for w in writes {
        let e = last.entry((w.volume, w.block)).or_insert(*w);
        if w.issue_ns > e.issue_ns {
            *e = *w;
        }
    }
    for (volume, live) in lives.iter().enumerate() {
        for block in blocks {
            assert_eq!(
                stamp_of(live, *block),
                last.get(&(volume, *block)).map(|w| w.id),
                "live volume {volume} block {block}"
            );
        }
    }
}

/// The tracked blocks: 32 per 64 MiB partition of a volume of
/// `partitions` of them.
fn writer_blocks(partitions: u64) -> Vec<u64> {
    let per_partition = 64 * MIB / BLOCK;
    (0..partitions)
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

    let blocks = writer_blocks(4);
    let log = dir.join("writes.log");
    let writer = spawn_writer(dir, &[&uri], &blocks, 16, 8.0, &log);
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
    let CutCheck {
        inside, outside, ..
    } = check_cut(&writes, &[&snap], t0, t1);
    assert!(
        !untracked_written(&snap, &blocks),
        "the snapshot has data where nobody wrote"
    );
    log_step(
        &unit,
        &format!("snapshot: {inside} writes in, {outside} after the cut; cut property holds"),
    );
    assert!(inside > 0 && outside > 0, "not a mid-write snapshot");

    // The live volume has every write: each block its last one.
    let live = copy_out(&uri, &dir.join("live.raw"));
    assert_live_has_every_write(&writes, &[&live], &blocks);
    log_step(&unit, "live vol1 holds every write");

    assert!(snap_agent.terminate(), "{}", snap_agent.log_text());
    assert!(agent.terminate(), "{}", agent.log_text());
    let mut unit = unit;
    assert!(unit.stop(), "rackblock up did not stop cleanly");
}

/// The names a snapshot's JSON (CLI or zonal) gives as its group.
fn group_of(snapshot: &Value) -> Vec<String> {
    snapshot["group"]
        .as_array()
        .map(|g| {
            g.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The snapshot named `name` in `snapshot list VOL --output json`.
fn listed(unit: &RunningUnit, volume: &str, name: &str) -> Option<Value> {
    let out = cli_ok(unit, &["snapshot", "list", volume, "--output", "json"]);
    let list: Value = serde_json::from_str(&out).unwrap();
    list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
}

#[test]
fn causal_closure_across_two_volumes_in_one_consistency_group() {
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("/usr/bin/python3", "python3-libnbd");
    require_tool("curl", "curl");
    // vol1 and vol2: 128 MiB, two 64 MiB partitions each (up's own
    // vol0 stays out of it).
    let unit = RunningUnit::start("64MiB");
    create_volume(&unit, "vol1", "128MiB", "64MiB");
    create_volume(&unit, "vol2", "128MiB", "64MiB");
    let (mut agent1, vol1) = unit.attach("vol1");
    let (mut agent2, vol2) = unit.attach("vol2");
    let dir = unit.dir.path();
    log_step(&unit, "unit up, vol1 and vol2 attached");

    // QD16 chains alternating between the volumes: each write issued
    // after the chain's previous write, on the other volume, was acked.
    let blocks = writer_blocks(2);
    let log = dir.join("writes.log");
    let writer = spawn_writer(dir, &[&vol1, &vol2], &blocks, 16, 8.0, &log);
    std::thread::sleep(Duration::from_millis(2500));
    let t0 = monotonic_ns();
    let created = cli_ok(
        &unit,
        &[
            "snapshot", "create", "--group", "g", "vol1", "vol2", "--output", "json",
        ],
    );
    let t1 = monotonic_ns();
    let created: Value = serde_json::from_str(&created).unwrap();
    assert_eq!(created["state"], "ready", "{created}");
    assert_eq!(group_of(&created), ["vol1", "vol2"], "{created}");
    assert_eq!(created["cuts"], 4, "every partition of both: {created}");
    log_step(
        &unit,
        &format!(
            "group snapshot g ready in {:.1} ms (pause {} us)",
            (t1 - t0) as f64 / 1e6,
            created["pause_us"]
        ),
    );
    let summary = wait_bounded(writer, "snapshot_writer.py", Duration::from_secs(120));
    let writes = parse_log(&log);
    log_step(&unit, &format!("writer done: {}", summary.trim()));
    for volume in 0..2 {
        assert!(
            writes.iter().any(|w| w.volume == volume && w.ack_ns < t0),
            "no write to volume {volume} acknowledged before the snapshot"
        );
        assert!(
            writes.iter().any(|w| w.volume == volume && w.issue_ns > t1),
            "no write to volume {volume} issued after the snapshot"
        );
    }

    // Both members' images of the group, read over their read-only
    // exports, checked together against the log.
    let (mut snap1_agent, snap1_uri) = unit.attach_with("vol1@g", &["--read-only"]);
    let (mut snap2_agent, snap2_uri) = unit.attach_with("vol2@g", &["--read-only"]);
    let snap1 = copy_out(&snap1_uri, &dir.join("snap1.raw"));
    let snap2 = copy_out(&snap2_uri, &dir.join("snap2.raw"));
    let check = check_cut(&writes, &[&snap1, &snap2], t0, t1);
    for (name, image) in [("vol1@g", &snap1), ("vol2@g", &snap2)] {
        assert!(
            !untracked_written(image, &blocks),
            "{name} has data where nobody wrote"
        );
    }
    log_step(
        &unit,
        &format!(
            "group g: {} writes in, {} after the cut; {} writes in depend on a write \
             to the other volume (all in too), {} chains cross the cut between volumes",
            check.inside,
            check.outside,
            check.cross_volume_deps_in,
            check.cross_volume_deps_straddling
        ),
    );
    assert!(
        check.inside > 0 && check.outside > 0,
        "not a mid-write snapshot"
    );
    assert!(
        check.cross_volume_deps_in > 0,
        "no cross-volume dependency inside the group: the check checked nothing"
    );
    let live1 = copy_out(&vol1, &dir.join("live1.raw"));
    let live2 = copy_out(&vol2, &dir.join("live2.raw"));
    assert_live_has_every_write(&writes, &[&live1, &live2], &blocks);
    log_step(&unit, "live vol1 and vol2 hold every write");
    assert!(snap1_agent.terminate(), "{}", snap1_agent.log_text());
    assert!(snap2_agent.terminate(), "{}", snap2_agent.log_text());

    // Each member lists the group's snapshot with its members; a name
    // taken on one member refuses another group.
    for volume in ["vol1", "vol2"] {
        let g = listed(&unit, volume, "g").unwrap_or_else(|| panic!("{volume} lists no g"));
        assert_eq!(group_of(&g), ["vol1", "vol2"], "{volume}: {g}");
    }
    let out = unit.cli(&["snapshot", "create", "vol2", "g"]);
    assert!(!out.status.success(), "a second g on vol2");

    // The zonal API's group: `volumes` on the snapshot route.
    let (status, g2) = crate::snapshot::zonal_call(
        &unit,
        "POST",
        "/v1/volumes/vol1/snapshots",
        Some(r#"{"name":"g2","volumes":["vol2"]}"#),
    );
    assert_eq!(status, 201, "{g2}");
    assert_eq!(group_of(&g2), ["vol1", "vol2"], "{g2}");
    assert_eq!(g2["cuts"], 4, "{g2}");
    let (status, seen) =
        crate::snapshot::zonal_call(&unit, "GET", "/v1/volumes/vol2/snapshots/g2", None);
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["id"], g2["id"], "one record for both: {seen}");
    log_step(
        &unit,
        "group listed by both members (CLI, zonal); g2 through the API",
    );

    // One delete, through either member, removes it from both.
    cli_ok(&unit, &["snapshot", "delete", "vol2", "g"]);
    assert!(listed(&unit, "vol1", "g").is_none(), "vol1 still lists g");
    let (status, _) =
        crate::snapshot::zonal_call(&unit, "DELETE", "/v1/volumes/vol1/snapshots/g2", None);
    assert_eq!(status, 202);
    let deadline = Instant::now() + Duration::from_secs(60);
    while listed(&unit, "vol2", "g2").is_some() {
        assert!(Instant::now() < deadline, "g2 not purged after 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        snapshot_records(&unit).is_empty(),
        "records left: {:?}",
        snapshot_records(&unit)
    );
    log_step(
        &unit,
        "g deleted through vol2, g2 through vol1: both gone from both",
    );

    assert!(agent1.terminate(), "{}", agent1.log_text());
    assert!(agent2.terminate(), "{}", agent2.log_text());
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

/// `attach VOLUME EXTRA...` after a head node was killed: the agent looks
/// the partition map up once and exits if that fails, which a unit still
/// settling after the kill on a loaded box can make it do (CI: "peer hn-3
/// unreachable on both paths: TLS ... no handshake within 300ms" right
/// after a rollback ended); retried, bounded.
fn attach_after_kill(unit: &RunningUnit, volume: &str, extra: &[&str]) -> (Daemon, String) {
    let mut last = String::new();
    for attempt in 1..=5 {
        match unit.try_attach_with(volume, extra) {
            Ok(attached) => return attached,
            Err(error) => {
                log_step(
                    unit,
                    &format!(
                        "attach {volume} failed (attempt {attempt}): {}",
                        error.lines().last().unwrap_or("")
                    ),
                );
                last = error;
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    panic!("attach {volume} failed 5 times; last:\n{last}");
}

/// The volume ids of the snapshot record named `name` (a group's: every
/// member).
fn snapshot_volumes(unit: &RunningUnit, name: &str) -> Vec<u64> {
    snapshot_records(unit)
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["volumes"].as_array().cloned())
        .unwrap_or_else(|| panic!("no snapshot record {name}"))
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

#[test]
fn kill9_of_a_primary_during_a_cut_aborts_it_and_a_ready_snapshot_survives() {
    cut_under_kill9(false);
}

/// The same for a consistency group's cut (vol1 and vol2): the group
/// ends aborted and purged on both members, no partition of either keeps
/// its layer, and a group made ready before reads back on both.
#[test]
fn kill9_of_a_primary_during_a_group_cut_aborts_the_group() {
    cut_under_kill9(true);
}

/// `kill -9` of a head node holding a cut (`group`: of a consistency
/// group over vol1 and vol2; else of vol1 alone).
fn cut_under_kill9(group: bool) {
    require_tool("nbdcopy", "libnbd-bin");
    const DELAY_MS: u64 = 1000;
    let unit = RunningUnit::start_with(
        "64MiB",
        &[
            "--head-node-setting",
            &format!("test_snapshot_cut_reply_delay_ms = {DELAY_MS}"),
        ],
    );
    // (name, size, partitions of 64 MiB); a group's members are smaller
    // (their snapshot is read back whole over NBD on a loaded box).
    let volumes: &[(&str, u64, usize)] = if group {
        &[("vol1", 128 * MIB, 2), ("vol2", 128 * MIB, 2)]
    } else {
        &[("vol1", 256 * MIB, 4)]
    };
    let dir = unit.dir.path();
    let mut attached = Vec::new();
    for (name, size, _) in volumes {
        create_volume(&unit, name, &format!("{}MiB", size / MIB), "64MiB");
        let (agent, uri) = unit.attach(name);
        let image = random_bytes(*size);
        copy_in(&image, &dir.join(format!("{name}-a.raw")), &uri);
        attached.push((agent, uri, image));
    }
    log_step(&unit, "image A written to every volume");
    // `snapshot create` of `name` over the volumes (a group or one).
    let create_args = |name: &str| -> Vec<String> {
        let mut args: Vec<String> = vec!["snapshot".into(), "create".into()];
        if group {
            args.extend(["--group".into(), name.into()]);
            args.extend(volumes.iter().map(|(v, _, _)| v.to_string()));
        } else {
            args.extend(["vol1".into(), name.into()]);
        }
        args.extend(["--output".into(), "json".into()]);
        args
    };
    // The snapshots around the one under test, retried if a loaded box
    // aborts them (CI: "peer hn-3-forward: outcome unknown after failure
    // on path a" at load 66 on 2 cores).
    let create_ready = |name: &str| -> Value {
        let args = create_args(name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        create_ready_retried(&unit, &args, name)
    };
    let ready = create_ready("before");
    log_step(&unit, &format!("snapshot before ready: {ready}"));
    let ids = snapshot_volumes(&unit, "before");
    assert_eq!(ids.len(), volumes.len(), "{ids:?}");
    let partitions: usize = volumes.iter().map(|v| v.2).sum();

    // The victim: a head node serving a primary of the volumes, not the
    // Raft leader if another one does (that adds an election, not what
    // this tests).
    let status = unit_status(&unit);
    let leader = status["raft"]["leader_name"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let is_ours = |p: &Value| ids.iter().any(|id| p["volume"] == *id);
    let mut candidates: Vec<u16> = (1..=3u16)
        .filter(|h| {
            partitions_of(&unit, *h)
                .is_some_and(|ps| ps.iter().any(|p| is_ours(p) && p["role"] == "primary"))
        })
        .collect();
    candidates.sort_by_key(|h| format!("hn-{h}") == leader);
    let victim = *candidates.first().expect("a head node with a primary");
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
        .args(create_args("during"))
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

    // It ends aborted and purged: gone from the records and from every
    // member's list, no partition keeps a layer other than "before"'s.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = unit_status(&unit);
        let records: Vec<Value> = status["unit"]["snapshots"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let during: Vec<&Value> = records.iter().filter(|r| r["name"] == "during").collect();
        let listed: Vec<String> = volumes
            .iter()
            .map(|(v, _, _)| cli_ok(&unit, &["snapshot", "list", v, "--output", "json"]))
            .collect();
        let layers: Vec<(u16, u64, u64, u64)> = (1..=3u16)
            .filter(|h| *h != victim)
            .flat_map(|h| {
                partitions_of(&unit, h)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|p| is_ours(p) && p["role"] == "primary")
                    .map(move |p| {
                        (
                            h,
                            p["volume"].as_u64().unwrap(),
                            p["partition"].as_u64().unwrap(),
                            p["snapshots"].as_u64().unwrap(),
                        )
                    })
            })
            .collect();
        let clean = during.is_empty()
            && listed.iter().all(|l| !l.contains("during"))
            && layers.len() == partitions
            && layers.iter().all(|(_, _, _, n)| *n == 1);
        if clean {
            log_step(
                &unit,
                &format!(
                    "'during' purged; primaries (node, volume, partition, layers): {layers:?}"
                ),
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "'during' not cleanly aborted: records {during:?}, lists {listed:?}, layers {layers:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // No cut holds acknowledgements: a write goes through on every
    // volume; the ready snapshot reads back A through its exports after
    // the take-over.
    for (_, uri, _) in &attached {
        run_tool(
            "qemu-io",
            &["-f", "raw", uri, "-c", "write -P 0x5a 0 1M"],
            TOOL_TIMEOUT,
        )
        .expect_success();
    }
    for ((name, _, _), (_, _, image)) in volumes.iter().zip(&attached) {
        let (mut snap_agent, snap_uri) =
            attach_after_kill(&unit, &format!("{name}@before"), &["--read-only"]);
        let path = dir.join(format!("{name}-before.raw"));
        let started = Instant::now();
        let mut copy = Command::new("nbdcopy")
            .args([&snap_uri, path.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        loop {
            if let Some(status) = copy.try_wait().unwrap() {
                assert!(status.success(), "nbdcopy {name}@before: {status}");
                break;
            }
            if started.elapsed() > TOOL_TIMEOUT {
                // SAFETY: our own child, by pid.
                unsafe { libc::kill(copy.id() as i32, libc::SIGKILL) };
                let _ = copy.wait();
                let logs: Vec<String> = (1..=3)
                    .map(|h| {
                        let log = std::fs::read_to_string(
                            unit.data_dir.join("run").join(format!("hn-{h}.log")),
                        )
                        .unwrap_or_default();
                        let lines: Vec<&str> = log.lines().collect();
                        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                        format!("hn-{h}:\n{tail}")
                    })
                    .collect();
                panic!(
                    "nbdcopy {name}@before still running after {TOOL_TIMEOUT:?}\n\
                     agent:\n{}\n{}\n/partitions: {:?}",
                    snap_agent.log_text(),
                    logs.join("\n"),
                    (1..=3u16)
                        .map(|h| partitions_of(&unit, h))
                        .collect::<Vec<_>>()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        log_step(
            &unit,
            &format!(
                "{name}@before copied in {:.1} s",
                started.elapsed().as_secs_f64()
            ),
        );
        let snap = std::fs::read(&path).unwrap();
        assert_eq!(
            first_difference(&snap, image),
            None,
            "snapshot {name}@before after the take-over"
        );
        assert!(snap_agent.terminate(), "{}", snap_agent.log_text());
    }
    log_step(&unit, "'before' reads A after the take-over");
    // And the coordinator still takes snapshots.
    let after = create_ready("after");
    log_step(
        &unit,
        &format!("snapshot after ready: pause {} us", after["pause_us"]),
    );

    for (mut agent, _, _) in attached {
        assert!(agent.terminate(), "{}", agent.log_text());
    }
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

/// `kill -9` of a clone partition's primary during `volume flatten`: the
/// promoted primary starts the flatten over (it finds only the holes
/// left), the flatten ends, the clone reads its own writes (before and
/// after the kill) over the parent's image, and the parent snapshot can
/// then go.
#[test]
fn kill9_of_a_primary_during_a_flatten_ends_flattened_with_the_clone_s_data() {
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("qemu-io", "qemu-utils");
    require_tool("curl", "curl");
    const SIZE: u64 = 128 * MIB;
    let unit = RunningUnit::start("64MiB");
    create_volume(&unit, "vol1", "128MiB", "64MiB");
    let (mut agent, uri) = unit.attach("vol1");
    let dir = unit.dir.path();
    let image_a = random_bytes(SIZE);
    copy_in(&image_a, &dir.join("a.raw"), &uri);
    snapshot_ready(&unit, "vol1", "base");
    cli_ok(
        &unit,
        &["volume", "create", "c1", "--from-snapshot", "vol1@base"],
    );
    let (mut c1_agent, c1) = unit.attach("c1");
    let mut image_c = image_a.clone();
    let write = |image: &mut Vec<u8>, pattern: u8, at: u64, len: u64| {
        let run =
            crate::snapshot::qemu_io(&[], &c1, &[format!("write -P {pattern:#04x} {at} {len}")]);
        assert!(crate::snapshot::clean(&run), "{run}");
        image[at as usize..(at + len) as usize].fill(pattern);
    };
    // c1's own writes, one in each partition (the second across the
    // boundary).
    write(&mut image_c, 0xc1, 0, MIB);
    write(&mut image_c, 0xc2, 64 * MIB - MIB / 2, MIB);
    let (status, described) = crate::snapshot::zonal_call(&unit, "GET", "/v1/volumes/c1", None);
    assert_eq!(status, 200, "{described}");
    let c1_id = described["id"].as_u64().expect("c1's id");
    log_step(&unit, "vol1@base cloned to c1, c1 written");

    // Slow: 1 MiB/s per 64 MiB partition, so the kill lands mid-flatten.
    let started = cli_ok(&unit, &["volume", "flatten", "c1", "--rate", "1"]);
    assert!(started.contains("flattening"), "{started}");
    // The victim: a head node serving a c1 primary, not the Raft leader
    // if another one does; once its flatten task copied something.
    let status = unit_status(&unit);
    let leader = status["raft"]["leader_name"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let c1_primaries = |h: u16| -> Vec<Value> {
        partitions_of(&unit, h)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p["volume"] == c1_id && p["role"] == "primary")
            .collect()
    };
    let mut candidates: Vec<u16> = (1..=3u16)
        .filter(|h| !c1_primaries(*h).is_empty())
        .collect();
    candidates.sort_by_key(|h| format!("hn-{h}") == leader);
    let victim = *candidates.first().expect("a head node with a c1 primary");
    let victim_name = format!("hn-{victim}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let copied: u64 = c1_primaries(victim)
            .iter()
            .map(|p| p["flattened_blocks"].as_u64().unwrap_or(0))
            .sum();
        if copied > 0 {
            log_step(
                &unit,
                &format!("{victim_name}'s c1 primaries copied {copied} blocks"),
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{victim_name}'s c1 flatten copied nothing in 60 s: {:?}",
            c1_primaries(victim)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = daemon_pid(&unit, &victim_name);
    // SAFETY: a daemon `up` started for this test, by pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    log_step(
        &unit,
        &format!("kill -9 {victim_name} (pid {pid}) mid-flatten (leader {leader})"),
    );
    // c1 is written through the take-over, then the flatten is sped up
    // and waited for.
    write(&mut image_c, 0xc3, 32 * MIB, MIB);
    write(&mut image_c, 0xc4, 96 * MIB, MIB);
    let flattened: Value = serde_json::from_str(&cli_ok(
        &unit,
        &[
            "volume",
            "flatten",
            "c1",
            "--rate",
            "256",
            "--wait",
            "--wait-timeout",
            "180s",
            "--output",
            "json",
        ],
    ))
    .unwrap();
    assert_eq!(flattened["state"], "flattened", "{flattened}");
    log_step(&unit, &format!("c1 flattened after the kill: {flattened}"));
    let live = copy_out(&c1, &dir.join("c1.raw"));
    assert_eq!(
        first_difference(&live, &image_c),
        None,
        "c1 after the flatten"
    );
    // No longer a clone: the parent snapshot goes, c1 reads the same.
    cli_ok(&unit, &["snapshot", "delete", "vol1", "base"]);
    let live = copy_out(&c1, &dir.join("c1-end.raw"));
    assert_eq!(
        first_difference(&live, &image_c),
        None,
        "c1 after its parent snapshot was deleted"
    );
    log_step(&unit, "c1 reads its data; vol1@base deleted");

    assert!(c1_agent.terminate(), "{}", c1_agent.log_text());
    assert!(agent.terminate(), "{}", agent.log_text());
    let mut unit = unit;
    // `up` exits 0 with one daemon already gone.
    unit.stop();
}

/// `POST /flush` on every head node but `dead`; panics on a failed flush.
fn flush_survivors(unit: &RunningUnit, dead: u16) {
    for h in (1..=3u16).filter(|h| *h != dead) {
        let admin = unit.ports.head_admin(h);
        let reply = tests::http_post(admin, "/flush", Duration::from_secs(60));
        let Some((200, body)) = reply else {
            panic!("POST /flush on hn-{h}: {reply:?}");
        };
        let body: Value = serde_json::from_str(&body).unwrap();
        for outcome in body["flushed"].as_array().unwrap() {
            assert!(outcome["error"].is_null(), "flush on hn-{h}: {outcome}");
        }
    }
}

/// Which head node a rollback crash test kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RollbackVictim {
    /// A head node serving primaries of the volume, not the Raft leader
    /// if another one does.
    Primary,
    /// The Raft leader (the control plane that records the rollback's
    /// cursors), preferably one serving primaries of the volume too.
    Leader,
}

/// `kill -9` of a head node mid-`volume rollback` (paced by the head
/// nodes' `rollback_bytes_per_second`, 1 MiB/s, so that it is observably
/// mid-way: `/partitions`' `rolled_back_blocks` of the victim's
/// primaries above zero). The rollback resumes at the promoted primaries
/// (from the cursor the control plane recorded) and ends: `volume
/// rollback` (started before the kill) reports it rolled back, the volume
/// reads every block of the snapshot through NBD, a later snapshot keeps
/// its own content, and the volume takes writes after, which read back
/// (also after a flush to the sleds).
fn rollback_under_kill9(victim_kind: RollbackVictim) {
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("qemu-io", "qemu-utils");
    require_tool("curl", "curl");
    const SIZE: u64 = 128 * MIB;
    const PARTITION: u64 = 32 * MIB;
    let unit = RunningUnit::start_with(
        "64MiB",
        &[
            "--head-node-setting",
            &format!("rollback_bytes_per_second = {MIB}"),
        ],
    );
    create_volume(&unit, "vol1", "128MiB", "32MiB");
    let (mut agent, uri) = unit.attach("vol1");
    let dir = unit.dir.path();
    let image_a = random_bytes(SIZE);
    copy_in(&image_a, &dir.join("a.raw"), &uri);
    snapshot_ready_retried(&unit, "vol1", "s1");
    let vol1 = snapshot_volume(&unit, "s1");
    // B after s1: in every partition six 1 MiB writes, one per 1 MiB
    // rollback step (so each partition's rollback takes about 6 s at
    // 1 MiB/s), one of them across a partition boundary, and a trim.
    let mut image_b = image_a.clone();
    let mut commands = Vec::new();
    for p in 0..SIZE / PARTITION {
        for i in 0..6u64 {
            let at = p * PARTITION + i * 5 * MIB + 4096;
            let fill = 0xb0 + (p * 6 + i) as u8 % 16;
            commands.push(format!("write -P {fill:#04x} {at} {MIB}"));
            image_b[at as usize..(at + MIB) as usize].fill(fill);
        }
    }
    let boundary = PARTITION - MIB / 2;
    commands.push(format!("write -P 0xbb {boundary} {MIB}"));
    image_b[boundary as usize..(boundary + MIB) as usize].fill(0xbb);
    let trim = (2 * PARTITION + 27 * MIB, 2 * MIB);
    commands.push(format!("discard {} {}", trim.0, trim.1));
    image_b[trim.0 as usize..(trim.0 + trim.1) as usize].fill(0);
    let run = crate::snapshot::qemu_io(&[], &uri, &commands);
    assert!(crate::snapshot::clean(&run), "B: {run}");
    snapshot_ready_retried(&unit, "vol1", "s2");
    // C after s2, then detached.
    let mut image_c = image_b.clone();
    let c_writes = [
        (0xc1u8, 3 * MIB, 2 * MIB),
        (0xc2, 3 * PARTITION + 9 * MIB, MIB),
    ];
    let run = crate::snapshot::qemu_io(
        &[],
        &uri,
        &c_writes
            .iter()
            .map(|(fill, at, len)| format!("write -P {fill:#04x} {at} {len}"))
            .collect::<Vec<_>>(),
    );
    assert!(crate::snapshot::clean(&run), "C: {run}");
    for (fill, at, len) in c_writes {
        image_c[at as usize..(at + len) as usize].fill(fill);
    }
    // The blocks of partition `p` the rollback rewrites: every one
    // written after s1 (B and C never write A's bytes back).
    let to_rewrite = |p: u64| -> u64 {
        (p * PARTITION / BLOCK..(p + 1) * PARTITION / BLOCK)
            .filter(|b| {
                let r = (b * BLOCK) as usize..((b + 1) * BLOCK) as usize;
                image_c[r.clone()] != image_a[r]
            })
            .count() as u64
    };
    assert!(agent.terminate(), "{}", agent.log_text());
    log_step(&unit, "A, s1, B, s2, C written; vol1 detached");

    let create_rollback = unit
        .cli_command()
        .args([
            "volume",
            "rollback",
            "vol1",
            "s1",
            "--wait-timeout",
            "240s",
            "--output",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // The victim, once its vol1 primaries have rewritten something.
    let status = unit_status(&unit);
    let leader = status["raft"]["leader_name"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let vol1_primaries = |h: u16| -> Vec<Value> {
        partitions_of(&unit, h)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p["volume"] == vol1 && p["role"] == "primary")
            .collect()
    };
    let victim = match victim_kind {
        RollbackVictim::Primary => {
            let mut candidates: Vec<u16> = (1..=3u16)
                .filter(|h| !vol1_primaries(*h).is_empty())
                .collect();
            candidates.sort_by_key(|h| format!("hn-{h}") == leader);
            *candidates.first().expect("a head node with a vol1 primary")
        }
        RollbackVictim::Leader => (1..=3u16)
            .find(|h| format!("hn-{h}") == leader)
            .unwrap_or_else(|| panic!("no leader in {status}")),
    };
    let victim_name = format!("hn-{victim}");
    let victim_partitions: Vec<u64> = vol1_primaries(victim)
        .iter()
        .filter_map(|p| p["partition"].as_u64())
        .collect();
    let rewritten = |h: u16, partitions: &[u64]| -> u64 {
        vol1_primaries(h)
            .iter()
            .filter(|p| {
                p["partition"]
                    .as_u64()
                    .is_some_and(|i| partitions.contains(&i))
            })
            .map(|p| p["rolled_back_blocks"].as_u64().unwrap_or(0))
            .sum()
    };
    // Mid-way: the victim's partitions rewrote something and the control
    // plane recorded a cursor of one of them that is not done (or, a
    // leader without vol1 primaries: of any partition).
    let watched: Vec<(u16, Vec<u64>)> = if victim_partitions.is_empty() {
        (1..=3u16).map(|h| (h, vec![0, 1, 2, 3])).collect()
    } else {
        vec![(victim, victim_partitions.clone())]
    };
    let watched_partitions: Vec<u64> = watched.iter().flat_map(|(_, ps)| ps.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut started = false;
    let rolling = loop {
        let done: u64 = watched.iter().map(|(h, ps)| rewritten(*h, ps)).sum();
        let records = unit_status(&unit);
        let rolling = records["unit"]["rollbacks"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["volume"] == vol1).cloned());
        // Until `volume rollback` (spawned) proposed it, there is none;
        // once there, it is not over before the kill (paced).
        let Some(rolling) = rolling else {
            assert!(!started, "vol1's rollback ended before the kill: {records}");
            assert!(
                Instant::now() < deadline,
                "vol1's rollback did not start in 60 s: {records}"
            );
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        started = true;
        let recorded_mid_way = watched_partitions.iter().any(|p| {
            let cursor = rolling["rollback"]["cursors"][p.to_string()]
                .as_u64()
                .unwrap_or(0);
            let done = rolling["rollback"]["done"]
                .as_array()
                .is_some_and(|d| d.iter().any(|i| i == p));
            cursor > 0 && !done
        });
        if done > 0 && recorded_mid_way {
            log_step(
                &unit,
                &format!(
                    "rollback mid-way: {done} blocks rewritten by the watched primaries \
                     (victim {victim_name}, partitions {victim_partitions:?}, leader {leader})"
                ),
            );
            break rolling;
        }
        assert!(
            Instant::now() < deadline,
            "the rollback recorded no cursor in 60 s: {rolling}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let pid = daemon_pid(&unit, &victim_name);
    // SAFETY: a daemon `up` started for this test, by pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    log_step(
        &unit,
        &format!("kill -9 {victim_name} (pid {pid}) mid-rollback: {rolling}"),
    );

    let out = wait_bounded(
        create_rollback,
        "volume rollback vol1 s1",
        Duration::from_secs(300),
    );
    // Its (pretty) JSON object on stdout, first in `out` (stderr follows).
    let done: Value = out
        .find('{')
        .and_then(|at| {
            serde_json::Deserializer::from_str(&out[at..])
                .into_iter::<Value>()
                .next()?
                .ok()
        })
        .unwrap_or_else(|| panic!("no JSON from volume rollback: {out}"));
    assert_eq!(done["state"], "rolled_back", "{done}");
    log_step(
        &unit,
        &format!("vol1 rolled back to s1 after the kill: {done}"),
    );
    // The victim's partitions were finished by their new primaries,
    // resumed at the recorded cursors: they rewrote some of the blocks,
    // not all (each partition's first MiB has blocks to rewrite, and a
    // recorded cursor is past it).
    if !victim_partitions.is_empty() {
        let resumed: u64 = (1..=3u16)
            .filter(|h| *h != victim)
            .map(|h| rewritten(h, &victim_partitions))
            .sum();
        let total: u64 = victim_partitions.iter().map(|p| to_rewrite(*p)).sum();
        log_step(
            &unit,
            &format!(
                "the promoted primaries of {victim_partitions:?} rewrote {resumed} of their \
                 {total} blocks"
            ),
        );
        assert!(
            resumed > 0 && resumed < total,
            "the promoted primaries rewrote {resumed} of {total} blocks: not a resume"
        );
    }

    let (agent, uri) = attach_after_kill(&unit, "vol1", &[]);
    let (s1_agent, s1) = attach_after_kill(&unit, "vol1@s1", &["--read-only"]);
    let (s2_agent, s2) = attach_after_kill(&unit, "vol1@s2", &["--read-only"]);
    let live = copy_out(&uri, &dir.join("vol1.raw"));
    assert_eq!(
        first_difference(&live, &image_a),
        None,
        "vol1 after the rollback"
    );
    let s1_image = copy_out(&s1, &dir.join("s1.raw"));
    assert_eq!(first_difference(&s1_image, &image_a), None, "s1");
    let s2_image = copy_out(&s2, &dir.join("s2.raw"));
    assert_eq!(
        first_difference(&s2_image, &image_b),
        None,
        "s2 after the rollback"
    );
    log_step(&unit, "vol1 = s1 = A, s2 = B through NBD");

    // Writable after: D reads back, also after a flush to the sleds.
    let mut image_d = image_a;
    let run = crate::snapshot::qemu_io(
        &[],
        &uri,
        &[
            format!("write -P 0xd1 {} {}", MIB, MIB),
            format!("write -P 0xd2 {} {}", 2 * PARTITION - MIB, 2 * MIB),
        ],
    );
    assert!(crate::snapshot::clean(&run), "D: {run}");
    image_d[MIB as usize..(2 * MIB) as usize].fill(0xd1);
    image_d[(2 * PARTITION - MIB) as usize..(2 * PARTITION + MIB) as usize].fill(0xd2);
    flush_survivors(&unit, victim);
    let live = copy_out(&uri, &dir.join("vol1-d.raw"));
    assert_eq!(
        first_difference(&live, &image_d),
        None,
        "vol1 written after the rollback, flushed"
    );
    log_step(&unit, "vol1 takes writes after the rollback");

    for (name, mut a) in [
        ("vol1", agent),
        ("vol1@s1", s1_agent),
        ("vol1@s2", s2_agent),
    ] {
        assert!(a.terminate(), "attach {name}:\n{}", a.log_text());
    }
    let mut unit = unit;
    // `up` exits 0 with one daemon already gone.
    unit.stop();
}

#[test]
fn kill9_of_a_primary_during_a_rollback_resumes_it_to_the_snapshot() {
    rollback_under_kill9(RollbackVictim::Primary);
}

#[test]
fn kill9_of_the_raft_leader_during_a_rollback_resumes_it_to_the_snapshot() {
    rollback_under_kill9(RollbackVictim::Leader);
}
