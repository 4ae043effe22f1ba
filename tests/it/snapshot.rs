//! Snapshots end to end: a unit started by `rackblock up` with a 4-partition volume vol1, the CLI's
//! `snapshot create|list|delete`, a read-only NBD export of a snapshot
//! (`rackblock attach vol1@snap1 --read-only`), read by programs nobody
//! here wrote (`nbdcopy`, `qemu-io`, `qemu-img`). Every tool runs under a
//! deadline; the unit and the agents are stopped by pid.

use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tests::{require_tool, run_tool, RunningUnit, ToolOutput};

const MIB: u64 = 1 << 20;
const TOOL_TIMEOUT: Duration = Duration::from_secs(90);
const VOLUME_BYTES: u64 = 256 * MIB;

fn log_step(unit: &RunningUnit, step: &str) {
    eprintln!(
        "[snapshot +{:.1}s] {step}",
        unit.started.elapsed().as_secs_f64()
    );
}

/// `qemu-io -f raw URI -c CMD...` (extra flags first).
pub(crate) fn qemu_io(flags: &[&str], uri: &str, commands: &[String]) -> ToolOutput {
    let mut args: Vec<&str> = flags.to_vec();
    args.extend(["-f", "raw", uri]);
    for command in commands {
        args.extend(["-c", command.as_str()]);
    }
    run_tool("qemu-io", &args, TOOL_TIMEOUT)
}

/// Succeeded and printed no complaint (qemu-io exits 0 on some failures).
pub(crate) fn clean(run: &ToolOutput) -> bool {
    let complaint = ["Pattern verification failed", "error", "Error", "failed"]
        .into_iter()
        .any(|needle| run.stdout.contains(needle) || run.stderr.contains(needle));
    run.status.success() && !complaint
}

pub(crate) fn cli_ok(unit: &RunningUnit, args: &[&str]) -> String {
    let out = unit.cli(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "rackblock {args:?}: {text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn random_bytes(len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .take(len)
        .read_to_end(&mut out)
        .unwrap();
    assert_eq!(out.len() as u64, len);
    out
}

pub(crate) fn copy_out(uri: &str, path: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(path);
    run_tool("nbdcopy", &[uri, path.to_str().unwrap()], TOOL_TIMEOUT).expect_success();
    std::fs::read(path).unwrap()
}

/// Index of the first differing byte (None: identical).
pub(crate) fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Image A (random, every partition) written over NBD; `snapshot create`;
/// overwrites B; the snapshot's read-only export reads exactly A (before
/// and after the head nodes flush to the sleds) while vol1 reads A with B
/// applied; writes to the snapshot are refused; attaching it without
/// --read-only is refused; `snapshot delete` removes it.
#[test]
fn snapshot_export_reads_the_cut_while_the_volume_moves_on() {
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("qemu-io", "qemu-utils");
    require_tool("qemu-img", "qemu-utils");
    let unit = RunningUnit::start("256MiB");
    log_step(&unit, "unit up");
    // Four partitions (their primaries spread over the head nodes): the
    // coordinator cuts, holds and releases each.
    cli_ok(
        &unit,
        &[
            "volume",
            "create",
            "vol1",
            "--size",
            "256MiB",
            "--partition-size",
            "64MiB",
        ],
    );
    let (mut vol1_agent, vol1) = unit.attach("vol1");
    let dir = unit.dir.path();

    // A: random bytes over the whole volume.
    let image_a = random_bytes(VOLUME_BYTES);
    let a_path = dir.join("a.raw");
    std::fs::write(&a_path, &image_a).unwrap();
    run_tool(
        "nbdcopy",
        &["--flush", a_path.to_str().unwrap(), &vol1],
        TOOL_TIMEOUT,
    )
    .expect_success();
    log_step(&unit, "image A written");

    let created = cli_ok(
        &unit,
        &["snapshot", "create", "vol1", "snap1", "--output", "json"],
    );
    let created: Value = serde_json::from_str(&created).unwrap();
    assert_eq!(created["state"], "ready", "{created}");
    let pause_us = created["pause_us"].as_u64().expect("a measured pause");
    assert_eq!(created["cuts"], 4, "one cut per partition: {created}");
    log_step(
        &unit,
        &format!(
            "snapshot ready: {} cuts, pause {:.1} ms",
            created["cuts"],
            pause_us as f64 / 1000.0
        ),
    );
    // A second snapshot of the same name is refused.
    assert!(!unit
        .cli(&["snapshot", "create", "vol1", "snap1"])
        .status
        .success());

    // B: patterns over A at the start, across a partition boundary of the
    // default layout's 64 MiB partitions and 1 MiB at the very end.
    let overwrites: [(u8, u64, u64); 3] = [
        (0xb1, 0, 4 * MIB),
        (0xb2, 64 * MIB - 2 * MIB, 4 * MIB),
        (0xb3, VOLUME_BYTES - MIB, MIB),
    ];
    let commands: Vec<String> = overwrites
        .iter()
        .map(|(p, at, len)| format!("write -P {p:#04x} {at} {len}"))
        .collect();
    let run = qemu_io(&[], &vol1, &commands);
    assert!(clean(&run), "{run}");
    let mut image_b = image_a.clone();
    for (pattern, at, len) in overwrites {
        image_b[at as usize..(at + len) as usize].fill(pattern);
    }
    log_step(&unit, "overwrites B written");

    // Without --read-only the snapshot is refused, with a reason.
    let refused = unit.cli(&["attach", "vol1@snap1"]);
    assert!(!refused.status.success());
    let reason = String::from_utf8_lossy(&refused.stderr);
    assert!(reason.contains("--read-only"), "{reason}");

    let (mut agent, snap_uri) = unit.attach_with("vol1@snap1", &["--read-only"]);
    log_step(&unit, "vol1@snap1 attached read-only");
    let snap = copy_out(&snap_uri, &dir.join("snap.raw"));
    assert_eq!(first_difference(&snap, &image_a), None, "snapshot != A");
    let live = copy_out(&vol1, &dir.join("live.raw"));
    assert_eq!(first_difference(&live, &image_b), None, "vol1 != B");
    log_step(&unit, "snapshot reads A, vol1 reads B");

    // qemu-img agrees; the snapshot export advertises read-only and a
    // write to it fails.
    run_tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &snap_uri,
            a_path.to_str().unwrap(),
        ],
        TOOL_TIMEOUT,
    )
    .expect_success();
    let write = qemu_io(&[], &snap_uri, &["write -P 0xee 0 4096".to_string()]);
    assert!(
        !clean(&write),
        "a write to the snapshot went through: {write}"
    );
    let still = qemu_io(&["-r"], &snap_uri, &["read -v 0 512".to_string()]);
    assert!(still.status.success(), "{still}");

    // The head nodes move everything to the sleds (layer blocks too):
    // the snapshot still reads A.
    unit.flush_all();
    let snap = copy_out(&snap_uri, &dir.join("snap2.raw"));
    assert_eq!(
        first_difference(&snap, &image_a),
        None,
        "snapshot after flush"
    );
    log_step(&unit, "snapshot reads A after a flush to the sleds");

    let listed: Value = serde_json::from_str(&cli_ok(
        &unit,
        &["snapshot", "list", "vol1", "--output", "json"],
    ))
    .unwrap();
    let names: Vec<&str> = listed["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["snap1"], "{listed}");

    assert!(
        agent.terminate(),
        "attach vol1@snap1:\n{}",
        agent.log_text()
    );
    cli_ok(&unit, &["snapshot", "delete", "vol1", "snap1"]);
    let listed: Value = serde_json::from_str(&cli_ok(
        &unit,
        &["snapshot", "list", "vol1", "--output", "json"],
    ))
    .unwrap();
    assert_eq!(listed["snapshots"], Value::Array(vec![]), "{listed}");
    // The live volume is unchanged by the delete.
    let live = copy_out(&vol1, &dir.join("live2.raw"));
    assert_eq!(first_difference(&live, &image_b), None, "vol1 after delete");
    log_step(&unit, "snapshot deleted; vol1 still B");

    assert!(
        vol1_agent.terminate(),
        "attach vol1:\n{}",
        vol1_agent.log_text()
    );
    let mut unit = unit;
    assert!(unit.stop(), "rackblock up did not stop cleanly");
}

/// `curl -X METHOD https://ZONAL/PATH [-d BODY]` with the admin token:
/// (status, JSON body).
pub(crate) fn zonal_call(
    unit: &RunningUnit,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let url = format!("https://{}{path}", unit.ports.zonal);
    let ca = unit.ca_cert();
    let auth = format!("Authorization: Bearer {}", unit.token);
    let mut args = vec![
        "-sS",
        "--max-time",
        "60",
        "--cacert",
        ca.to_str().unwrap(),
        "-w",
        "\n%{http_code}",
        "-X",
        method,
        "-H",
        &auth,
    ];
    if let Some(body) = body {
        args.extend(["-H", "Content-Type: application/json", "-d", body]);
    }
    args.push(&url);
    let out = run_tool("curl", &args, Duration::from_secs(70)).expect_success();
    let (text, status) = out.stdout.rsplit_once('\n').unwrap_or(("", &out.stdout));
    let status = status.trim().parse().unwrap_or_else(|_| panic!("{out}"));
    let value = serde_json::from_str(text).unwrap_or(Value::Null);
    (status, value)
}

/// A small deterministic generator (the seed is logged).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Where the random writes go: 2 MiB windows at the start, across each
/// boundary of the 32 MiB partitions and at the end of the 128 MiB volume
/// (small enough that later writes overwrite earlier ones often).
const HOT_WINDOWS: [u64; 5] = [0, 31 * MIB, 63 * MIB, 95 * MIB, 126 * MIB];
const HOT_WINDOW_BYTES: u64 = 2 * MIB;

/// qemu-io commands at random 4 KiB-aligned places of the
/// [`HOT_WINDOWS`]: data writes with the unique patterns `patterns`
/// (never 0, one each), some write-zeroes and discards.
fn random_writes(rng: &mut XorShift, patterns: std::ops::Range<u8>) -> Vec<String> {
    patterns
        .map(|pattern| {
            let len = (1 + rng.next() % 48) * 4096;
            let window = HOT_WINDOWS[(rng.next() % HOT_WINDOWS.len() as u64) as usize];
            let at = window + (rng.next() % ((HOT_WINDOW_BYTES - len) / 4096 + 1)) * 4096;
            match rng.next() % 8 {
                0 => format!("write -z {at} {len}"),
                1 => format!("discard {at} {len}"),
                _ => format!("write -P {pattern:#04x} {at} {len}"),
            }
        })
        .collect()
}

/// The 4 KiB blocks where two images differ, brute force.
fn differing_blocks(a: &[u8], b: &[u8]) -> Vec<u64> {
    assert_eq!(a.len(), b.len());
    a.chunks(4096)
        .zip(b.chunks(4096))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

/// The blocks of a diff's JSON ranges, each with its zero mark.
fn diff_blocks(diff: &Value) -> Vec<(u64, bool)> {
    let mut out = Vec::new();
    for r in diff["ranges"].as_array().expect("ranges") {
        let (offset, length) = (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap());
        assert_eq!(offset % 4096, 0, "{r}");
        assert_eq!(length % 4096, 0, "{r}");
        let zero = r["zero"].as_bool().unwrap();
        out.extend((offset / 4096..(offset + length) / 4096).map(|b| (b, zero)));
    }
    out
}

/// Checks a diff's JSON against the brute-force comparison of the two
/// images: the same blocks, marked zero exactly where the newer image
/// reads zeros.
fn assert_diff_matches(what: &str, diff: &Value, older: &[u8], newer: &[u8]) {
    let from_index = diff_blocks(diff);
    let blocks: Vec<u64> = from_index.iter().map(|(b, _)| *b).collect();
    let brute = differing_blocks(older, newer);
    assert_eq!(
        blocks.len(),
        brute.len(),
        "{what}: the index diff has {} blocks, the images differ in {}",
        blocks.len(),
        brute.len()
    );
    assert_eq!(blocks, brute, "{what}: the index diff's blocks");
    for (block, zero) in from_index {
        let at = (block * 4096) as usize;
        let reads_zero = newer[at..at + 4096].iter().all(|b| *b == 0);
        assert_eq!(zero, reads_zero, "{what}: block {block}'s zero mark");
    }
    assert!(
        !brute.is_empty(),
        "{what}: nothing changed (the test wrote nothing?)"
    );
}

/// Blocks whose version in `mine` neither `other` nor `live` holds (each
/// write has its own pattern, so equal bytes are the same version).
fn exclusive_bytes(mine: &[u8], other: &[u8], live: &[u8]) -> u64 {
    let mut n = 0;
    for (i, block) in mine.chunks(4096).enumerate() {
        let at = i * 4096;
        if block.iter().any(|b| *b != 0)
            && block != &other[at..at + 4096]
            && block != &live[at..at + 4096]
        {
            n += 4096;
        }
    }
    n
}

/// Random writes (data, write-zeroes, discards) over a 4-partition volume
/// before snapshot s1 (taken through the zonal API), between s1 and s2
/// (the CLI) and after s2: `snapshot diff s1 s2` and `snapshot diff s2
/// --live` are exactly the blocks where the exported raw images (and the
/// live volume) differ, zero ranges marked; the incremental export s1→s2
/// applied onto s1's raw image is s2's; a full incremental export of s1
/// applied onto zeros is s1's; each snapshot's exclusive bytes are the
/// blocks only it holds; the zonal snapshot routes list, describe and
/// delete.
#[test]
fn snapshot_diff_equals_the_exported_images_and_incremental_export_applies() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("curl", "curl");
    const SIZE: u64 = 128 * MIB;
    let unit = RunningUnit::start("64MiB");
    log_step(&unit, "unit up");
    cli_ok(
        &unit,
        &[
            "volume",
            "create",
            "vol2",
            "--size",
            "128MiB",
            "--partition-size",
            "32MiB",
        ],
    );
    let (mut agent, vol2) = unit.attach("vol2");
    let dir = unit.dir.path();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("random writes seed {seed:#x}");
    let mut rng = XorShift(seed);

    let write = |commands: Vec<String>| {
        let run = qemu_io(&[], &vol2, &commands);
        assert!(clean(&run), "{run}");
    };
    write(random_writes(&mut rng, 1..40));
    // s1 through the zonal API (201 once ready).
    let (status, s1) = zonal_call(
        &unit,
        "POST",
        "/v1/volumes/vol2/snapshots",
        Some(r#"{"name":"s1"}"#),
    );
    assert_eq!(status, 201, "{s1}");
    assert_eq!(s1["state"], "ready", "{s1}");
    assert_eq!(s1["cuts"], 4, "{s1}");
    let (status, taken) = zonal_call(
        &unit,
        "POST",
        "/v1/volumes/vol2/snapshots",
        Some(r#"{"name":"s1"}"#),
    );
    assert_eq!(status, 409, "a second s1: {taken}");
    log_step(&unit, "s1 taken through the zonal API");

    write(random_writes(&mut rng, 40..80));
    let s2: Value = serde_json::from_str(&cli_ok(
        &unit,
        &["snapshot", "create", "vol2", "s2", "--output", "json"],
    ))
    .unwrap();
    assert_eq!(s2["state"], "ready", "{s2}");
    write(random_writes(&mut rng, 80..100));
    log_step(&unit, "s2 taken; more writes after it");

    // Both snapshots exported raw, the live volume copied.
    let a_path = dir.join("s1.raw");
    let b_path = dir.join("s2.raw");
    for (snap, path) in [("s1", &a_path), ("s2", &b_path)] {
        let out = unit.cli(&[
            "snapshot",
            "export",
            "vol2",
            snap,
            "-o",
            path.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "export {snap}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("exported"),
            "progress on stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let a = std::fs::read(&a_path).unwrap();
    let b = std::fs::read(&b_path).unwrap();
    assert_eq!(a.len() as u64, SIZE);
    let live = copy_out(&vol2, &dir.join("live.raw"));
    log_step(&unit, "s1 and s2 exported raw, vol2 copied");

    let diff: Value = serde_json::from_str(&cli_ok(
        &unit,
        &["snapshot", "diff", "vol2", "s1", "s2", "--output", "json"],
    ))
    .unwrap();
    assert_diff_matches("s1 → s2", &diff, &a, &b);
    let live_diff: Value = serde_json::from_str(&cli_ok(
        &unit,
        &[
            "snapshot", "diff", "vol2", "s2", "--live", "--output", "json",
        ],
    ))
    .unwrap();
    assert_diff_matches("s2 → live", &live_diff, &b, &live);
    let text = cli_ok(&unit, &["snapshot", "diff", "vol2", "s1", "s2"]);
    assert!(text.contains("s1 → s2:"), "{text}");
    log_step(
        &unit,
        &format!(
            "diffs equal the images: s1→s2 {} ranges, s2→live {} ranges",
            diff["ranges"].as_array().unwrap().len(),
            live_diff["ranges"].as_array().unwrap().len()
        ),
    );

    // Incremental s1 → s2 applied onto s1's image is s2's.
    let inc = dir.join("s1-s2.inc");
    cli_ok(
        &unit,
        &[
            "snapshot",
            "export",
            "vol2",
            "s2",
            "--since",
            "s1",
            "--format",
            "incremental",
            "-o",
            inc.to_str().unwrap(),
        ],
    );
    let c_path = dir.join("applied.raw");
    std::fs::copy(&a_path, &c_path).unwrap();
    cli_ok(
        &unit,
        &[
            "snapshot",
            "apply",
            "-i",
            inc.to_str().unwrap(),
            "--to",
            c_path.to_str().unwrap(),
        ],
    );
    let c = std::fs::read(&c_path).unwrap();
    assert_eq!(first_difference(&c, &b), None, "s1 + incremental != s2");
    // The stream holds only the diff's data (plus headers), not the volume.
    let changed: u64 = diff["changed_bytes"].as_u64().unwrap();
    let inc_len = std::fs::metadata(&inc).unwrap().len();
    assert!(
        inc_len < changed + 64 * 1024 + 64,
        "stream {inc_len} bytes for {changed} changed"
    );
    // A full incremental stream of s1 applied onto zeros is s1's image.
    let full = dir.join("s1.inc");
    cli_ok(
        &unit,
        &[
            "snapshot",
            "export",
            "vol2",
            "s1",
            "--format",
            "incremental",
            "-o",
            full.to_str().unwrap(),
        ],
    );
    let d_path = dir.join("from-zero.raw");
    std::fs::File::create(&d_path)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    cli_ok(
        &unit,
        &[
            "snapshot",
            "apply",
            "-i",
            full.to_str().unwrap(),
            "--to",
            d_path.to_str().unwrap(),
        ],
    );
    assert_eq!(
        first_difference(&std::fs::read(&d_path).unwrap(), &a),
        None,
        "zeros + full stream != s1"
    );
    // --since with a raw export is refused.
    assert!(!unit
        .cli(&["snapshot", "export", "vol2", "s2", "--since", "s1", "-o", "-"])
        .status
        .success());
    log_step(&unit, "incremental streams apply");

    // Exclusive bytes: what only each snapshot holds.
    unit.flush_all();
    let described: Value = serde_json::from_str(&cli_ok(
        &unit,
        &["snapshot", "describe", "vol2", "s1", "--output", "json"],
    ))
    .unwrap();
    assert_eq!(
        described["exclusive_bytes"].as_u64(),
        Some(exclusive_bytes(&a, &b, &live)),
        "s1: {described}"
    );
    assert_eq!(described["partition_cuts"].as_array().unwrap().len(), 4);
    assert!(
        described["exclusive_bytes"].as_u64() > Some(0),
        "s1 holds nothing alone (seed {seed:#x}): the check above checked nothing"
    );
    let listed: Value = serde_json::from_str(&cli_ok(
        &unit,
        &["snapshot", "list", "vol2", "--output", "json"],
    ))
    .unwrap();
    let s2_listed = listed["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "s2")
        .cloned()
        .unwrap();
    assert_eq!(
        s2_listed["exclusive_bytes"].as_u64(),
        Some(exclusive_bytes(&b, &a, &live)),
        "s2: {s2_listed}"
    );
    log_step(
        &unit,
        &format!(
            "exclusive bytes: s1 {}, s2 {}",
            described["exclusive_bytes"], s2_listed["exclusive_bytes"]
        ),
    );

    // The zonal routes: list, describe, the volume's view, delete.
    let (status, listed) = zonal_call(&unit, "GET", "/v1/volumes/vol2/snapshots", None);
    assert_eq!(status, 200, "{listed}");
    let names: Vec<&str> = listed["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["s1", "s2"], "{listed}");
    let (status, one) = zonal_call(&unit, "GET", "/v1/volumes/vol2/snapshots/s1", None);
    assert_eq!(status, 200, "{one}");
    assert_eq!(
        one["exclusive_bytes"], described["exclusive_bytes"],
        "{one}"
    );
    let (status, volume) = zonal_call(&unit, "GET", "/v1/volumes/vol2", None);
    assert_eq!(status, 200);
    assert_eq!(
        volume["snapshots"].as_array().map(Vec::len),
        Some(2),
        "{volume}"
    );
    let (status, missing) = zonal_call(&unit, "GET", "/v1/volumes/vol2/snapshots/nope", None);
    assert_eq!(status, 404, "{missing}");
    assert_eq!(missing["error"]["code"], "snapshot_not_found");
    let (status, deleting) = zonal_call(&unit, "DELETE", "/v1/volumes/vol2/snapshots/s1", None);
    assert_eq!(status, 202, "{deleting}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _) = zonal_call(&unit, "GET", "/v1/volumes/vol2/snapshots/s1", None);
        if status == 404 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "s1 not purged after 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // s2 still exports its image after s1 went.
    let b2 = dir.join("s2-again.raw");
    cli_ok(
        &unit,
        &[
            "snapshot",
            "export",
            "vol2",
            "s2",
            "-o",
            b2.to_str().unwrap(),
        ],
    );
    assert_eq!(
        first_difference(&std::fs::read(&b2).unwrap(), &b),
        None,
        "s2 after s1's delete"
    );
    log_step(&unit, "zonal routes; s1 deleted; s2 unchanged");

    assert!(agent.terminate(), "attach vol2:\n{}", agent.log_text());
    let mut unit = unit;
    assert!(unit.stop(), "rackblock up did not stop cleanly");
}

/// Host reads the primaries of volume `volume` answered (`/partitions`'
/// `reads`, `sled_reads`), summed over the head nodes.
fn primary_reads(unit: &RunningUnit, volume: u64) -> (u64, u64) {
    let (mut reads, mut sled_reads) = (0, 0);
    for admin in unit.head_admins() {
        let Some((200, body)) = tests::http_get(admin, "/partitions") else {
            panic!("{admin}: no /partitions");
        };
        let v: Value = serde_json::from_str(&body).unwrap();
        for p in v["partitions"].as_array().unwrap() {
            if p["volume"] == volume && p["role"] == "primary" {
                reads += p["reads"].as_u64().unwrap();
                sled_reads += p["sled_reads"].as_u64().unwrap();
            }
        }
    }
    (reads, sled_reads)
}

/// `rackblock ARGS` with stdout to `path`, under a deadline.
fn cli_to_file(unit: &RunningUnit, args: &[&str], path: &Path) {
    let file = std::fs::File::create(path).unwrap();
    let mut child = unit
        .cli_command()
        .args(args)
        .stdout(file)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            // SAFETY: our own child, by pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
            panic!("rackblock {args:?} still running after {TOOL_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    assert!(status.success(), "rackblock {args:?}: {status} {err}");
}

/// `snapshot export` of a 1 GiB volume with a few written ranges reads
/// only what the snapshot's allocation map (from the partitions' indexes)
/// says holds data: the primaries answer a handful of reads where the
/// snapshot's read-only NBD export, copied whole by nbdcopy in the same
/// run, answers thousands. The file is sparse (its unwritten ranges,
/// trimmed ranges and written zeros are holes: `qemu-img map`, the file's
/// allocated blocks) and byte-equal to the expected image, and so is the
/// export to a pipe (zeros written for the gaps) and the NBD copy. Writes
/// after the snapshot are in none of them.
#[test]
fn snapshot_export_reads_only_the_allocated_ranges() {
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("qemu-io", "qemu-utils");
    require_tool("qemu-img", "qemu-utils");
    require_tool("cmp", "diffutils");
    require_tool("curl", "curl");
    use std::os::unix::fs::{FileExt as _, MetadataExt as _};
    const SIZE: u64 = 1024 * MIB;
    const PARTITION: u64 = 256 * MIB;
    let unit = RunningUnit::start("64MiB");
    cli_ok(
        &unit,
        &[
            "volume",
            "create",
            "vol3",
            "--size",
            "1GiB",
            "--partition-size",
            "256MiB",
        ],
    );
    let (status, described) = zonal_call(&unit, "GET", "/v1/volumes/vol3", None);
    assert_eq!(status, 200, "{described}");
    let vol3 = described["id"].as_u64().expect("vol3's id");
    let (mut agent, uri) = unit.attach("vol3");
    let dir = unit.dir.path();
    log_step(&unit, "unit up, 1 GiB vol3 attached");

    // (offset, length, pattern); pattern 0: written zeros (data, not a
    // trim: allocated, read, left a hole in the file).
    let writes: [(u64, u64, u8); 5] = [
        (5 * MIB + 4096, 3 * MIB, 0x51),
        (PARTITION - MIB, 2 * MIB, 0x52),
        (600 * MIB, 64 * 1024, 0),
        (900 * MIB, 8 * MIB, 0x53),
        (SIZE - 4096, 4096, 0x54),
    ];
    let trim = (902 * MIB, 2 * MIB);
    let mut commands: Vec<String> = writes
        .iter()
        .map(|(at, len, fill)| format!("write -P {fill:#04x} {at} {len}"))
        .collect();
    commands.push(format!("discard {} {}", trim.0, trim.1));
    let run = qemu_io(&[], &uri, &commands);
    assert!(clean(&run), "writes: {run}");
    let created: Value = serde_json::from_str(&cli_ok(
        &unit,
        &["snapshot", "create", "vol3", "s", "--output", "json"],
    ))
    .unwrap();
    assert_eq!(created["state"], "ready", "{created}");
    // After the cut: an overwrite and a new range, in no export of s.
    let run = qemu_io(
        &[],
        &uri,
        &[
            format!("write -P 0x61 {} {}", 5 * MIB, MIB),
            format!("write -P 0x62 {} {}", 400 * MIB, 4 * MIB),
        ],
    );
    assert!(clean(&run), "writes after the cut: {run}");
    assert!(agent.terminate(), "{}", agent.log_text());
    unit.flush_all();
    // The expected image of s, sparse.
    let want = dir.join("want.raw");
    {
        let file = std::fs::File::create(&want).unwrap();
        file.set_len(SIZE).unwrap();
        for (at, len, fill) in writes {
            file.write_all_at(&vec![fill; len as usize], at).unwrap();
        }
        file.write_all_at(&vec![0; trim.1 as usize], trim.0)
            .unwrap();
    }
    let data_bytes: u64 = writes.iter().filter(|w| w.2 != 0).map(|w| w.1).sum::<u64>() - trim.1;
    log_step(
        &unit,
        "5 ranges and a trim written, snapshot s, 2 more after",
    );

    // A raw export to a file.
    let before = primary_reads(&unit, vol3);
    let file = dir.join("s.raw");
    let out = unit.cli(&[
        "snapshot",
        "export",
        "vol3",
        "s",
        "-o",
        file.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "export: {stderr}");
    let after_file = primary_reads(&unit, vol3);
    // To a pipe.
    let piped = dir.join("s-pipe.raw");
    cli_to_file(
        &unit,
        &["snapshot", "export", "vol3", "s", "-o", "-"],
        &piped,
    );
    let after_pipe = primary_reads(&unit, vol3);
    // The baseline: the snapshot's read-only NBD export copied whole.
    let (mut snap_agent, snap_uri) = unit.attach_with("vol3@s", &["--read-only"]);
    let nbd = dir.join("s-nbd.raw");
    run_tool("nbdcopy", &[&snap_uri, nbd.to_str().unwrap()], TOOL_TIMEOUT).expect_success();
    let after_nbd = primary_reads(&unit, vol3);
    assert!(snap_agent.terminate(), "{}", snap_agent.log_text());
    let reads = |a: (u64, u64), b: (u64, u64)| (b.0 - a.0, b.1 - a.1);
    let (file_reads, pipe_reads, nbd_reads) = (
        reads(before, after_file),
        reads(after_file, after_pipe),
        reads(after_pipe, after_nbd),
    );
    log_step(
        &unit,
        &format!(
            "primary reads (host, sled): export to a file {file_reads:?}, to a pipe \
             {pipe_reads:?}, nbdcopy of the NBD export {nbd_reads:?}; export said: {}",
            stderr.lines().last().unwrap_or("").trim()
        ),
    );

    for (what, path) in [("file", &file), ("pipe", &piped), ("nbdcopy", &nbd)] {
        run_tool(
            "cmp",
            &[want.to_str().unwrap(), path.to_str().unwrap()],
            TOOL_TIMEOUT,
        )
        .expect_success();
        log_step(&unit, &format!("the {what} image equals s"));
    }
    // Reads: the export's chunks (4 MiB) of the allocated ranges, split
    // at partition boundaries (and by the client's own request bound):
    // a handful, where a whole read takes at least 1 GiB / 4 MiB.
    for (what, (host, _)) in [("file", file_reads), ("pipe", pipe_reads)] {
        assert!(
            host > 0 && host <= 16,
            "the export to a {what} read {host} times (nbdcopy: {})",
            nbd_reads.0
        );
        assert!(
            nbd_reads.0 >= SIZE / (4 * MIB) && nbd_reads.0 > 10 * host,
            "baseline: nbdcopy read {} times, the export {host}",
            nbd_reads.0
        );
    }
    // Sparse: the file holds (about) the written data only.
    let allocated = std::fs::metadata(&file).unwrap().blocks() * 512;
    let map = run_tool(
        "qemu-img",
        &[
            "map",
            "-f",
            "raw",
            "--output",
            "json",
            file.to_str().unwrap(),
        ],
        TOOL_TIMEOUT,
    )
    .expect_success();
    let map: Value = serde_json::from_str(&map.stdout).unwrap();
    let mapped_data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    log_step(
        &unit,
        &format!(
            "s.raw: {} KiB allocated, qemu-img map: {} KiB data, of {} KiB written",
            allocated / 1024,
            mapped_data / 1024,
            data_bytes / 1024
        ),
    );
    // Slack: a 64 KiB grain at each end of each range.
    let slack = 2 * 64 * 1024 * writes.len() as u64 + 2 * 64 * 1024;
    assert!(
        allocated <= data_bytes + slack && mapped_data <= data_bytes + slack,
        "s.raw is not sparse: {allocated} bytes allocated, {mapped_data} mapped as data, \
         {data_bytes} written"
    );
    let mut unit = unit;
    assert!(unit.stop(), "rackblock up did not stop cleanly");
}
