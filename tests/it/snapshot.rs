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
fn qemu_io(flags: &[&str], uri: &str, commands: &[String]) -> ToolOutput {
    let mut args: Vec<&str> = flags.to_vec();
    args.extend(["-f", "raw", uri]);
    for command in commands {
        args.extend(["-c", command.as_str()]);
    }
    run_tool("qemu-io", &args, TOOL_TIMEOUT)
}

/// Succeeded and printed no complaint (qemu-io exits 0 on some failures).
fn clean(run: &ToolOutput) -> bool {
    let complaint = ["Pattern verification failed", "error", "Error", "failed"]
        .into_iter()
        .any(|needle| run.stdout.contains(needle) || run.stderr.contains(needle));
    run.status.success() && !complaint
}

fn cli_ok(unit: &RunningUnit, args: &[&str]) -> String {
    let out = unit.cli(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "rackblock {args:?}: {text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn random_bytes(len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .take(len)
        .read_to_end(&mut out)
        .unwrap();
    assert_eq!(out.len() as u64, len);
    out
}

fn copy_out(uri: &str, path: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(path);
    run_tool("nbdcopy", &[uri, path.to_str().unwrap()], TOOL_TIMEOUT).expect_success();
    std::fs::read(path).unwrap()
}

/// Index of the first differing byte (None: identical).
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
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
