//! Writable clones end to end: a unit started by `rackblock up`, a
//! 4-partition volume vol1 (64 MiB partitions, so the parent's and the
//! clone's primaries are spread over the head nodes: a clone's primary
//! reads its parent snapshot both from its own node and over the unit
//! port), `volume create c1 --from-snapshot vol1@base`, both volumes
//! written at the same time by qemu-io over NBD, read back with nbdcopy.
//! Every tool runs under a deadline; the unit and the agents are stopped
//! by pid.

use std::time::Duration;

use serde_json::Value;

use crate::snapshot::{clean, cli_ok, copy_out, qemu_io, random_bytes};
use tests::{require_tool, run_tool, RunningUnit};

const MIB: u64 = 1 << 20;
const TOOL_TIMEOUT: Duration = Duration::from_secs(90);
const VOLUME_BYTES: u64 = 256 * MIB;

fn log_step(unit: &RunningUnit, step: &str) {
    eprintln!(
        "[clone +{:.1}s] {step}",
        unit.started.elapsed().as_secs_f64()
    );
}

/// Panics with the first differing byte unless `got == want`.
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(at) = got.iter().zip(want).position(|(x, y)| x != y) {
        panic!(
            "{what}: byte {at} (MiB {}) differs: got {:#04x}, want {:#04x}",
            at as u64 / MIB,
            got[at],
            want[at]
        );
    }
}

/// A writable clone reads its parent snapshot until written, and the
/// clone and its parent, written at the same time over NBD at the same
/// offsets, each read their own data: vol1 = A + B, c1 = A + C with a
/// partial-block write over the parent and a trim that reads zeros (not
/// the parent's data), before and after the head nodes flush to the
/// sleds. The parent snapshot cannot be deleted while c1 depends on it;
/// `volume flatten` copies the rest while c1 is written, then it can, and
/// c1 still reads the same.
#[test]
fn clone_and_parent_written_at_the_same_time_each_read_their_own() {
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("qemu-io", "qemu-utils");
    let unit = RunningUnit::start("256MiB");
    log_step(&unit, "unit up");
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

    // A: random bytes over the whole parent.
    let image_a = random_bytes(VOLUME_BYTES);
    let a_path = dir.join("a.raw");
    std::fs::write(&a_path, &image_a).unwrap();
    run_tool(
        "nbdcopy",
        &["--flush", a_path.to_str().unwrap(), &vol1],
        TOOL_TIMEOUT,
    )
    .expect_success();
    let created: Value = serde_json::from_str(&cli_ok(
        &unit,
        &["snapshot", "create", "vol1", "base", "--output", "json"],
    ))
    .unwrap();
    assert_eq!(created["state"], "ready", "{created}");
    log_step(&unit, "image A written, snapshot vol1@base ready");

    // The clone: the parent's geometry, named parent in the record.
    let clone: Value = serde_json::from_str(&cli_ok(
        &unit,
        &[
            "volume",
            "create",
            "c1",
            "--from-snapshot",
            "vol1@base",
            "--output",
            "json",
        ],
    ))
    .unwrap();
    assert_eq!(clone["from_snapshot"], "vol1@base", "{clone}");
    assert_eq!(clone["size_bytes"], VOLUME_BYTES, "{clone}");
    assert_eq!(clone["partition_size_bytes"], 64 * MIB, "{clone}");
    // A clone of a snapshot that does not exist is refused.
    assert!(!unit
        .cli(&["volume", "create", "c2", "--from-snapshot", "vol1@nope"])
        .status
        .success());
    let (mut c1_agent, c1) = unit.attach("c1");
    let untouched = copy_out(&c1, &dir.join("c1-0.raw"));
    same(&untouched, &image_a, "untouched clone");
    log_step(&unit, "c1 reads A");

    // B on vol1 and C on c1 at the same offsets (every partition, one
    // across a partition boundary), at the same time; c1 also gets a
    // partial-block write and a trim.
    let regions: [(u64, u64); 4] = [
        (0, 4 * MIB),
        (64 * MIB - 2 * MIB, 4 * MIB),
        (150 * MIB, MIB),
        (VOLUME_BYTES - MIB, MIB),
    ];
    let commands = |fill: u8| -> Vec<String> {
        regions
            .iter()
            .map(|(at, len)| format!("write -P {fill:#04x} {at} {len}"))
            .collect()
    };
    let (b_commands, mut c_commands) = (commands(0xb1), commands(0xc1));
    let partial = (200 * MIB + 1024, 512u64);
    let trim = (220 * MIB, 2 * MIB);
    c_commands.push(format!("write -P 0xc2 {} {}", partial.0, partial.1));
    c_commands.push(format!("discard {} {}", trim.0, trim.1));
    let (b_run, c_run) = std::thread::scope(|s| {
        let b = s.spawn(|| qemu_io(&[], &vol1, &b_commands));
        let c = s.spawn(|| qemu_io(&[], &c1, &c_commands));
        (b.join().unwrap(), c.join().unwrap())
    });
    assert!(clean(&b_run), "vol1 writes: {b_run}");
    assert!(clean(&c_run), "c1 writes: {c_run}");
    let (mut image_b, mut image_c) = (image_a.clone(), image_a.clone());
    for (at, len) in regions {
        image_b[at as usize..(at + len) as usize].fill(0xb1);
        image_c[at as usize..(at + len) as usize].fill(0xc1);
    }
    image_c[partial.0 as usize..(partial.0 + partial.1) as usize].fill(0xc2);
    image_c[trim.0 as usize..(trim.0 + trim.1) as usize].fill(0);
    log_step(&unit, "B on vol1 and C on c1 written at the same time");

    let check = |step: &str| {
        let live_b = copy_out(&vol1, &dir.join("vol1.raw"));
        same(&live_b, &image_b, &format!("vol1 {step}"));
        let live_c = copy_out(&c1, &dir.join("c1.raw"));
        same(&live_c, &image_c, &format!("c1 {step}"));
    };
    check("after the writes");
    unit.flush_all();
    check("after a flush to the sleds");
    log_step(&unit, "vol1 reads A+B, c1 reads A+C, also after a flush");

    // The parent snapshot is pinned by the clone (a typed refusal).
    let refused = unit.cli(&["snapshot", "delete", "vol1", "base"]);
    let reason = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        !refused.status.success(),
        "parent snapshot deleted: {reason}"
    );
    assert!(reason.contains("clone"), "{reason}");

    // Flatten under writes: the copy never overwrites what c1 writes
    // meanwhile; then the parent snapshot can go and c1 reads the same.
    let started = cli_ok(&unit, &["volume", "flatten", "c1", "--rate", "16"]);
    assert!(started.contains("flattening"), "{started}");
    let during: Vec<String> = (0..8u64)
        .map(|i| {
            format!(
                "write -P 0xd1 {} {}",
                i * 32 * MIB + 4 * MIB + 8192,
                64 * 1024
            )
        })
        .collect();
    let d_run = qemu_io(&[], &c1, &during);
    assert!(clean(&d_run), "c1 writes during the flatten: {d_run}");
    for i in 0..8u64 {
        let at = (i * 32 * MIB + 4 * MIB + 8192) as usize;
        image_c[at..at + 64 * 1024].fill(0xd1);
    }
    let flattened: Value = serde_json::from_str(&cli_ok(
        &unit,
        &[
            "volume", "flatten", "c1", "--rate", "256", "--wait", "--output", "json",
        ],
    ))
    .unwrap();
    assert_eq!(flattened["state"], "flattened", "{flattened}");
    log_step(
        &unit,
        &format!("c1 flattened under writes ({:.1} s)", flattened["seconds"]),
    );
    let live_c = copy_out(&c1, &dir.join("c1-flat.raw"));
    same(&live_c, &image_c, "c1 after the flatten");
    // A flattened clone is not flattened again.
    assert!(!unit.cli(&["volume", "flatten", "c1"]).status.success());
    cli_ok(&unit, &["snapshot", "delete", "vol1", "base"]);
    unit.flush_all();
    let live_c = copy_out(&c1, &dir.join("c1-end.raw"));
    same(
        &live_c,
        &image_c,
        "c1 after its parent snapshot was deleted",
    );
    let live_b = copy_out(&vol1, &dir.join("vol1-end.raw"));
    same(&live_b, &image_b, "vol1 after its snapshot was deleted");
    log_step(&unit, "vol1@base deleted; c1 and vol1 read the same");
    assert!(c1_agent.terminate(), "attach c1:\n{}", c1_agent.log_text());

    assert!(
        vol1_agent.terminate(),
        "attach vol1:\n{}",
        vol1_agent.log_text()
    );
    let mut unit = unit;
    assert!(unit.stop(), "rackblock up did not stop cleanly");
}

/// A detached volume rolled back to a snapshot reads as the snapshot
/// (`qemu-img compare` with the snapshot's read-only export) while a
/// later snapshot keeps its own content; the rollback is refused while
/// the volume is attached.
#[test]
fn rollback_of_a_detached_volume_restores_the_snapshot_and_keeps_later_ones() {
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("qemu-io", "qemu-utils");
    require_tool("qemu-img", "qemu-utils");
    const BYTES: u64 = 128 * MIB;
    let unit = RunningUnit::start("256MiB");
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
    let image_a = random_bytes(BYTES);
    let a_path = dir.join("a.raw");
    std::fs::write(&a_path, &image_a).unwrap();
    run_tool(
        "nbdcopy",
        &["--flush", a_path.to_str().unwrap(), &vol2],
        TOOL_TIMEOUT,
    )
    .expect_success();
    cli_ok(&unit, &["snapshot", "create", "vol2", "s1"]);
    // B after s1 (writes and a trim), then s2, then C.
    let run = qemu_io(
        &[],
        &vol2,
        &[
            "write -P 0xb1 0 4194304".to_string(),
            format!("write -P 0xb2 {} {}", 40 * MIB, MIB),
            format!("discard {} {}", 100 * MIB, 2 * MIB),
        ],
    );
    assert!(clean(&run), "B: {run}");
    let mut image_b = image_a.clone();
    image_b[..(4 * MIB) as usize].fill(0xb1);
    image_b[(40 * MIB) as usize..(41 * MIB) as usize].fill(0xb2);
    image_b[(100 * MIB) as usize..(102 * MIB) as usize].fill(0);
    cli_ok(&unit, &["snapshot", "create", "vol2", "s2"]);
    let run = qemu_io(
        &[],
        &vol2,
        &[
            format!("write -P 0xc1 {} {}", MIB, 2 * MIB),
            format!("write -P 0xc2 {} {}", 64 * MIB, 8 * MIB),
        ],
    );
    assert!(clean(&run), "C: {run}");
    log_step(&unit, "A, s1, B, s2, C written");

    // Refused while attached (typed: volume_attached).
    let refused = unit.cli(&["volume", "rollback", "vol2", "s1"]);
    let reason = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!refused.status.success(), "rolled back while attached");
    assert!(reason.contains("attach"), "{reason}");
    assert!(agent.terminate(), "attach vol2:\n{}", agent.log_text());

    let done: Value = serde_json::from_str(&cli_ok(
        &unit,
        &["volume", "rollback", "vol2", "s1", "--output", "json"],
    ))
    .unwrap();
    assert_eq!(done["state"], "rolled_back", "{done}");
    log_step(
        &unit,
        &format!("vol2 rolled back to s1 in {:.1} s", done["seconds"]),
    );

    let (agent, vol2) = unit.attach("vol2");
    let (s1_agent, s1) = unit.attach_with("vol2@s1", &["--read-only"]);
    let (s2_agent, s2) = unit.attach_with("vol2@s2", &["--read-only"]);
    same(
        &copy_out(&vol2, &dir.join("vol2.raw")),
        &image_a,
        "vol2 after the rollback",
    );
    run_tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &vol2, &s1],
        TOOL_TIMEOUT,
    )
    .expect_success();
    same(
        &copy_out(&s2, &dir.join("s2.raw")),
        &image_b,
        "s2 after the rollback",
    );
    unit.flush_all();
    same(
        &copy_out(&vol2, &dir.join("vol2-flushed.raw")),
        &image_a,
        "vol2 after a flush",
    );
    same(
        &copy_out(&s2, &dir.join("s2-flushed.raw")),
        &image_b,
        "s2 after a flush",
    );
    log_step(&unit, "vol2 = s1 (qemu-img compare), s2 intact");
    for (name, mut a) in [
        ("vol2", agent),
        ("vol2@s1", s1_agent),
        ("vol2@s2", s2_agent),
    ] {
        assert!(a.terminate(), "attach {name}:\n{}", a.log_text());
    }
    let mut unit = unit;
    assert!(unit.stop(), "rackblock up did not stop cleanly");
}
