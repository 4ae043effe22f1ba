//! The operator verbs against real processes: a small unit (2 head nodes,
//! 3 sleds, code 2+1), `rackblock zonal`, and `rackblock attach`. Every
//! verb, bad input with its exit code, nothing changed after a refusal,
//! `--output json`, and NBD I/O going on while the zonal plane is down.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use client::{ClientConfig, ClientError};
use proto::volume::{AttachmentCredential, AttachmentToken};
use serde_json::Value;
use tests::{http_get, next_port, rackblock_bin, wait_healthy, Daemon, HeadNodeOptions, TestUnit};

const MIB: u64 = 1 << 20;
const TOKEN: &str = "cli-verbs-test-token-0123456789";

/// One CLI run: exit code, stdout, stderr.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\n{}", self.stdout, self.stderr))
    }
}

struct Zone {
    unit: TestUnit,
    zonal_url: String,
    zonal_address: SocketAddr,
    _sleds: Vec<Daemon>,
    _heads: Vec<Daemon>,
    zonal: Daemon,
}

impl Zone {
    /// `rackblock --zonal URL [--token TOKEN] ARGS`, in the unit's directory
    /// (so no `rackblock-data/` default leaks in), with a clean environment.
    fn run_with(&self, token: Option<&str>, args: &[&str]) -> Run {
        let mut command = Command::new(rackblock_bin());
        command
            .current_dir(self.unit.dir.path())
            .env_remove("RACKBLOCK_TOKEN")
            .env_remove("RACKBLOCK_RACK")
            .env("RACKBLOCK_ZONAL", &self.zonal_url);
        if let Some(token) = token {
            command.args(["--token", token]);
        }
        let output = command.args(args).output().unwrap();
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    fn run(&self, args: &[&str]) -> Run {
        self.run_with(Some(TOKEN), args)
    }

    /// Runs and asserts the exit code; a failing exit must say why.
    fn expect(&self, code: i32, args: &[&str]) -> Run {
        let run = self.run(args);
        assert_eq!(
            run.code, code,
            "rackblock {args:?}\nstdout:\n{}\nstderr:\n{}",
            run.stdout, run.stderr
        );
        if code != 0 {
            assert!(
                run.stderr.starts_with("rackblock ") && run.stderr.trim().lines().count() == 1,
                "one clear line expected: {:?}",
                run.stderr
            );
        }
        run
    }

    fn rack(&self) -> String {
        self.unit.rack_path.display().to_string()
    }

    fn volumes(&self) -> Vec<Value> {
        self.expect(0, &["volume", "list", "--output", "json"])
            .json()["volumes"]
            .as_array()
            .unwrap()
            .clone()
    }
}

fn start_zone() -> Zone {
    start_zone_with("")
}

/// [`start_zone`] with `extra` in the zonal config (top-level keys and
/// `[[tokens]]` entries, before the unit).
fn start_zone_with(extra: &str) -> Zone {
    let unit = TestUnit::build(
        HeadNodeOptions {
            count: 2,
            ..HeadNodeOptions::default()
        },
        3,
        "2+1",
        64 * MIB,
        8 * MIB,
    );
    unit.append_head_node_config(&format!("wal_size_bytes = {}\n", 32 * MIB));
    let sleds = unit.start_sleds();
    let heads = unit.start_head_nodes();
    let listen = SocketAddr::from(([127, 0, 0, 1], next_port()));
    let config = unit.dir.path().join("zonal.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{listen}\"\ndata_dir = \"{}\"\nadmin_token = \"{TOKEN}\"\nreport_interval_ms = 500\n\
             {extra}\n[[units]]\nname = \"test\"\nrack_file = \"{}\"\n",
            unit.dir.path().join("zonal").display(),
            unit.rack_path.display()
        ),
    )
    .unwrap();
    let zonal = Daemon::spawn(
        "zonal",
        &["zonal", "--config", config.to_str().unwrap()],
        unit.dir.path(),
    );
    wait_healthy(listen, &zonal, Duration::from_secs(20));
    let zone = Zone {
        unit,
        zonal_url: format!("http://{listen}"),
        zonal_address: listen,
        _sleds: sleds,
        _heads: heads,
        zonal,
    };
    // The zonal plane places volumes only on units its last poll reached.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let units = zone.expect(0, &["unit", "list", "--output", "json"]).json();
        if units["units"][0]["reachable"] == true && units["units"][0]["sleds_up"] == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the zonal plane does not reach the unit: {units}\n{}",
            zone.zonal.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    zone
}

/// Creates a volume, retrying while the unit settles (503 → exit 1).
fn create(zone: &Zone, args: &[&str]) -> Run {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let run = zone.run(args);
        if run.code != 1 || Instant::now() >= deadline {
            return run;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `volume create NAME` of 8 MiB in two 4 MiB partitions at code 2+1 (what
/// this 3-sled unit can place).
fn small_volume(name: &str) -> [&str; 9] {
    [
        "volume",
        "create",
        name,
        "--size",
        "8MiB",
        "--code",
        "2+1",
        "--partition-size",
        "4MiB",
    ]
}

/// Spawns `rackblock attach VOLUME --listen ADDR --zonal URL --token TOKEN
/// EXTRA…` (killed by pid on drop) and waits (30 s at most) until it
/// answers NBD there; fails early if it exits. Returns it and its address.
fn attach(zone: &Zone, name: &str, volume: &str, extra: &[&str]) -> (Daemon, SocketAddr) {
    let nbd = SocketAddr::from(([127, 0, 0, 1], next_port()));
    let listen = nbd.to_string();
    let mut args = vec![
        "attach",
        volume,
        "--listen",
        &listen,
        "--zonal",
        &zone.zonal_url,
        "--token",
        TOKEN,
    ];
    args.extend_from_slice(extra);
    let mut attach = Daemon::spawn(name, &args, zone.unit.dir.path());
    wait_for_nbd(&mut attach, nbd);
    (attach, nbd)
}

/// Waits (30 s at most) until `attach` answers NBD at `nbd`; fails early if
/// it exits.
fn wait_for_nbd(attach: &mut Daemon, nbd: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client::nbd::server_greets(nbd) {
        assert!(
            Instant::now() < deadline,
            "attach never served NBD:\n{}",
            attach.log_text()
        );
        assert!(
            attach.child.try_wait().unwrap().is_none(),
            "attach exited:\n{}",
            attach.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits (10 s at most) until `client`'s reads are refused as unauthorized:
/// a detach reaches every primary once they applied the removal.
async fn refused_after_detach(client: &client::VolumeClient) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.read(0, 4096).await {
            Err(ClientError::Unauthorized { .. }) => break,
            other => assert!(
                Instant::now() < deadline,
                "still served after detach: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tool(name: &str) -> String {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{name} is not installed: install it (Debian: scripts/install-deps.sh installs qemu-utils and libnbd-bin)"
    );
    String::from_utf8_lossy(&found.stdout).trim().to_owned()
}

#[test]
fn every_verb_with_bad_input_and_exit_codes() {
    let zone = start_zone();
    let rack = zone.rack();

    // Authentication: missing and wrong token → 5, before anything else.
    let run = zone.run_with(None, &["volume", "list"]);
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(run.stderr.contains("token"), "{}", run.stderr);
    let run = zone.run_with(
        Some("wrong-token-wrong-token"),
        &["volume", "create", "v1", "--size", "8MiB"],
    );
    assert_eq!(run.code, 5, "{}", run.stderr);

    // Bad input the CLI checks itself → 2, nothing sent.
    let zero = zone.expect(2, &["volume", "create", "v1", "--size", "0"]);
    assert!(zero.stderr.contains("positive"), "{}", zero.stderr);
    let odd = zone.expect(2, &["volume", "create", "v1", "--size", "4097"]);
    assert!(odd.stderr.contains("multiple of 4096"), "{}", odd.stderr);
    zone.expect(2, &["volume", "create", "v1", "--size", "lots"]);
    zone.expect(
        2,
        &["volume", "create", "v1", "--size", "8MiB", "--code", "2"],
    );
    zone.expect(
        2,
        &[
            "volume",
            "create",
            "v1",
            "--size",
            "8MiB",
            "--partition-size",
            "100",
        ],
    );
    // Bad input only the API knows → its 400 → 2.
    let name = zone.expect(2, &["volume", "create", "bad name", "--size", "8MiB"]);
    assert!(name.stderr.contains("name"), "{}", name.stderr);
    assert!(zone.volumes().is_empty(), "a refused create left something");

    // Create, and the same create again (idempotent).
    let args = small_volume("v1");
    let run = create(&zone, &args);
    assert_eq!(run.code, 0, "{}\n{}", run.stderr, zone.zonal.log_text());
    assert!(run.stdout.starts_with("created"), "{}", run.stdout);
    let again = zone.expect(0, &args);
    assert!(again.stdout.contains("exists"), "{}", again.stdout);
    // Same name, another spec → 4; the volume is unchanged.
    let conflict = zone.expect(4, &["volume", "create", "v1", "--size", "16MiB"]);
    assert!(conflict.stderr.contains("v1"), "{}", conflict.stderr);
    let volumes = zone.volumes();
    assert_eq!(volumes.len(), 1);
    assert_eq!(volumes[0]["size_bytes"], 8 * MIB);
    assert_eq!(volumes[0]["state"], "available");

    // List and describe, table and JSON.
    let list = zone.expect(0, &["volume", "list"]);
    assert!(
        list.stdout.contains("v1") && list.stdout.contains("8.0 MiB"),
        "{}",
        list.stdout
    );
    let describe = zone.expect(0, &["volume", "describe", "v1"]);
    assert!(describe.stdout.contains("PARTITION"), "{}", describe.stdout);
    let map = zone
        .expect(0, &["volume", "describe", "v1", "--output", "json"])
        .json();
    assert_eq!(
        map["partition_map"]["partitions"].as_array().unwrap().len(),
        2
    );

    // Unknown volume → 3 for every verb naming one.
    zone.expect(3, &["volume", "describe", "nope"]);
    zone.expect(3, &["volume", "delete", "nope"]);
    zone.expect(3, &["volume", "resize", "nope", "--size", "8MiB"]);
    zone.expect(3, &["volume", "detach", "v1", "--attachment", "99"]);
    // Resize: bad size → 2; shrink → 2; same size → 0; grow → 0, and the
    // unit's map has the new partitions.
    zone.expect(2, &["volume", "resize", "v1", "--size", "0"]);
    zone.expect(2, &["volume", "resize", "v1", "--size", "4MiB"]);
    zone.expect(0, &["volume", "resize", "v1", "--size", "8MiB"]);
    zone.expect(0, &["volume", "resize", "v1", "--size", "16MiB"]);
    let grown = zone
        .expect(0, &["volume", "describe", "v1", "--output", "json"])
        .json();
    assert_eq!(grown["size_bytes"], 16 * MIB);
    assert_eq!(grown["partition_map"]["size_bytes"], 16 * MIB);
    assert_eq!(
        grown["partition_map"]["partitions"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    // Units: zonal view, live view, unknown unit.
    let units = zone.expect(0, &["unit", "list"]);
    assert!(units.stdout.contains("test"), "{}", units.stdout);
    let status = zone.expect(0, &["unit", "status", "--rack", &rack]);
    for needle in [
        "leader",
        "hn-1",
        "127.0.2.1",
        "sled-3",
        "DEVICE",
        "capacity",
    ] {
        assert!(
            status.stdout.contains(needle),
            "{needle}: {}",
            status.stdout
        );
    }
    let status = zone
        .expect(
            0,
            &[
                "unit", "status", "test", "--rack", &rack, "--output", "json",
            ],
        )
        .json();
    assert_eq!(status["zonal"][0]["name"], "test");
    assert_eq!(status["unit"]["sleds"].as_array().unwrap().len(), 3);
    zone.expect(3, &["unit", "status", "nope"]);

    // Sleds and head nodes (live, through the LCP).
    let sleds = zone.expect(0, &["sled", "list", "--rack", &rack]);
    assert!(sleds.stdout.contains("sled-3"), "{}", sleds.stdout);
    let heads = zone
        .expect(
            0,
            &["head-node", "list", "--rack", &rack, "--output", "json"],
        )
        .json();
    assert_eq!(heads["members"].as_array().unwrap().len(), 2);
    zone.expect(2, &["sled", "list", "--rack", "/nonexistent/rack.toml"]);
    zone.expect(3, &["sled", "drain", "sled-9", "--rack", &rack]);
    let drain = zone.expect(0, &["sled", "drain", "sled-3", "--rack", &rack]);
    assert!(
        drain.stdout.contains("Draining") && drain.stdout.contains("moves them to other sleds"),
        "{}",
        drain.stdout
    );
    let sleds = zone
        .expect(0, &["sled", "list", "--rack", &rack, "--output", "json"])
        .json();
    let sled3 = sleds["sleds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "sled-3")
        .unwrap()
        .clone();
    assert_eq!(sled3["health"], "Draining");
    zone.expect(0, &["sled", "drain", "sled-3", "--undo", "--rack", &rack]);

    // Delete: refused while attached (4), then done.
    let (mut attach, _) = attach(&zone, "attach", "v1", &[]);
    assert_eq!(
        zone.volumes()[0]["attachments"].as_array().unwrap().len(),
        1
    );
    let attached = zone.expect(4, &["volume", "delete", "v1"]);
    assert!(attached.stderr.contains("detach"), "{}", attached.stderr);
    assert!(
        attach.terminate(),
        "attach did not exit cleanly:\n{}",
        attach.log_text()
    );
    assert!(
        attach.log_text().contains("detached v1"),
        "{}",
        attach.log_text()
    );
    assert!(zone.volumes()[0]["attachments"]
        .as_array()
        .unwrap()
        .is_empty());
    let deleted = zone
        .expect(0, &["volume", "delete", "v1", "--output", "json"])
        .json();
    assert_eq!(deleted["state"], "deleted");
}

/// Once attached, the NBD export does not need the zonal plane: stop it,
/// write and read back through qemu-io.
#[test]
fn io_goes_on_while_the_zonal_plane_is_down() {
    let qemu_io_bin = tool("qemu-io");
    let mut zone = start_zone();
    let run = create(&zone, &small_volume("io"));
    assert_eq!(run.code, 0, "{}", run.stderr);
    let (_attach, nbd) = attach(&zone, "attach-io", "io", &["--failover-timeout", "60s"]);
    assert!(zone.zonal.terminate(), "zonal did not stop cleanly");
    let down = zone.run(&["volume", "list"]);
    assert_eq!(down.code, 1, "{}", down.stderr);
    assert!(down.stderr.contains("cannot reach"), "{}", down.stderr);
    let uri = format!("nbd://{nbd}/io");
    let (ok, text) = qemu_io(
        &qemu_io_bin,
        &uri,
        &[
            "write -P 0x5a 1M 2M",
            "flush",
            "read -P 0x5a 1M 2M",
            "read -P 0 0 1M",
        ],
    );
    assert!(ok, "{text}");
    assert!(Path::new(&zone.unit.rack_path).exists());

    // Flushed to the sleds, every 2+1 extent uses all three sleds: a drain
    // has nowhere to go, and says so up front instead of waiting forever.
    for reply in zone.unit.flush_all() {
        assert!(matches!(reply, Some((200, _))), "{reply:?}");
    }
    let rack = zone.rack();
    let refused = zone.expect(4, &["sled", "drain", "sled-2", "--wait", "--rack", &rack]);
    assert!(
        refused.stderr.contains("cannot be placed") && refused.stderr.contains("distinct sleds"),
        "{}",
        refused.stderr
    );
    let sleds = zone
        .expect(0, &["sled", "list", "--rack", &rack, "--output", "json"])
        .json();
    let sled2 = sleds["sleds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "sled-2")
        .unwrap()
        .clone();
    assert_eq!(sled2["health"], "Up", "a refused drain changed nothing");
    assert!(sled2["drain"]["blocked"][0]["columns"].as_u64().unwrap() > 0);
    // --force marks it Draining; the unit's status says why nothing moves,
    // and --wait gives up with the reason instead of waiting forever.
    // (--wait draws progress on stderr before the error line.)
    let forced = zone.run(&[
        "sled",
        "drain",
        "sled-2",
        "--force",
        "--wait",
        "--wait-timeout",
        "60s",
        "--rack",
        &rack,
    ]);
    assert!(
        forced.code == 1
            && forced.stdout.contains("cannot be placed now")
            && forced.stderr.contains("none can move"),
        "{}\n{}",
        forced.stdout,
        forced.stderr
    );
    let status = zone.expect(0, &["unit", "status", "--rack", &rack]);
    assert!(
        status
            .stdout
            .contains("columns cannot be placed: no sled left"),
        "{}",
        status.stdout
    );
    zone.expect(0, &["sled", "drain", "sled-2", "--undo", "--rack", &rack]);
}

/// (free columns, volumes being deleted) as the unit's LCP records them.
fn lcp_capacity(zone: &Zone) -> (u64, u64) {
    let status = zone
        .expect(
            0,
            &[
                "unit",
                "status",
                "test",
                "--rack",
                &zone.rack(),
                "--output",
                "json",
            ],
        )
        .json();
    (
        status["unit"]["capacity"]["free_columns"].as_u64().unwrap(),
        status["unit"]["deleting_volumes"].as_u64().unwrap_or(0),
    )
}

/// `qemu-io -f raw URI -c ...`: (success, stdout + stderr).
fn qemu_io(qemu_io: &str, uri: &str, commands: &[&str]) -> (bool, String) {
    let mut command = Command::new(qemu_io);
    command.args(["-f", "raw", uri]);
    for c in commands {
        command.args(["-c", c]);
    }
    let output = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let ok = output.status.success()
        && !text.contains("Pattern verification failed")
        && !text.contains("error");
    (ok, text)
}

/// Grow an attached volume (its last partition partial), write beyond the
/// old end over NBD, then force-delete it while attached: the host's next
/// write is refused with EPERM, and every column the volume used goes back
/// to the free pool, on the sleds and in the LCP.
#[test]
fn resize_then_io_past_the_old_end_and_forced_delete_frees_every_column() {
    let qemu_io_bin = tool("qemu-io");
    let zone = start_zone();
    let sled_free_before = zone.unit.sled_free_columns();
    let (lcp_free_before, _) = lcp_capacity(&zone);
    let run = create(&zone, &small_volume("grow"));
    assert_eq!(run.code, 0, "{}", run.stderr);
    let (mut attach, nbd) = attach(&zone, "attach-grow", "grow", &["--failover-timeout", "30s"]);
    let uri = format!("nbd://{nbd}/grow");
    let (ok, text) = qemu_io(&qemu_io_bin, &uri, &["write -P 0x11 0 1M", "flush"]);
    assert!(ok, "{text}");

    // 8 MiB → 14 MiB: two new partitions, the last one half full.
    zone.expect(0, &["volume", "resize", "grow", "--size", "14MiB"]);
    let described = zone
        .expect(0, &["volume", "describe", "grow", "--output", "json"])
        .json();
    assert_eq!(described["partition_map"]["size_bytes"], 14 * MIB);
    assert_eq!(
        described["partition_map"]["partitions"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    // NBD clients see the new size on a new connection once the agent's
    // map refresh (every 5 s) picked it up.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, text) = qemu_io(
            &qemu_io_bin,
            &uri,
            &[
                "write -P 0x22 12M 2M",
                "write -P 0x33 7M 2M",
                "flush",
                "read -P 0x22 12M 2M",
                "read -P 0x33 7M 2M",
                "read -P 0x11 0 1M",
            ],
        );
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "I/O past the old end never worked: {text}\n{}",
            attach.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The data reaches the sleds: their free columns go down.
    for answer in zone.unit.flush_all() {
        assert_eq!(answer.map(|a| a.0), Some(200));
    }
    assert!(zone.unit.sled_free_columns() < sled_free_before);

    // Delete: refused while attached, then forced.
    zone.expect(4, &["volume", "delete", "grow"]);
    let deleted = zone
        .expect(
            0,
            &["volume", "delete", "grow", "--force", "--output", "json"],
        )
        .json();
    assert_eq!(deleted["state"], "deleted");
    // The attached host's credential is revoked with the volume: EPERM,
    // at once (not after the failover timeout), and nothing was written.
    let started = Instant::now();
    let (ok, text) = qemu_io(&qemu_io_bin, &uri, &["write -P 0x44 0 4k"]);
    assert!(!ok, "a write to a deleted volume succeeded: {text}");
    assert!(text.contains("Operation not permitted"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    attach.terminate();

    // The unit frees every column: sleds and LCP back to where they were.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (lcp_free, deleting) = lcp_capacity(&zone);
        let sled_free = zone.unit.sled_free_columns();
        if lcp_free == lcp_free_before && sled_free == sled_free_before && deleting == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "columns not freed: LCP {lcp_free}/{lcp_free_before}, sleds {sled_free}/{sled_free_before}, {deleting} deleting"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The name is free again.
    let again = create(
        &zone,
        &[
            "volume", "create", "grow", "--size", "4MiB", "--code", "2+1",
        ],
    );
    assert_eq!(again.code, 0, "{}", again.stderr);
}

/// A host without a valid attachment credential is refused at once (not
/// retried) on the host port, and after a detach the old token can neither
/// read, write nor fetch its partition map: the data stays as it was.
#[test]
fn missing_wrong_and_detached_tokens_are_refused_and_write_nothing() {
    let zone = start_zone();
    let run = create(&zone, &small_volume("tok"));
    assert_eq!(run.code, 0, "{}", run.stderr);
    let volume = zone
        .expect(0, &["volume", "describe", "tok", "--output", "json"])
        .json()["id"]
        .as_u64()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let config = || ClientConfig {
            failover_timeout: Duration::from_secs(30),
            ..ClientConfig::default()
        };
        let lcp = zone.unit.lcp_client();
        let credential = client::register_attachment(&lcp, volume, "host-a")
            .await
            .unwrap();
        let attached = tests::connect_host_client(&zone.unit, volume, credential, config())
            .await
            .unwrap();
        let old = bytes::Bytes::from(vec![0xABu8; 65536]);
        attached.write(4096, old.clone(), false).await.unwrap();
        assert_eq!(attached.read(4096, 65536).await.unwrap(), old);

        // No credential, and the right id with a wrong token: refused at
        // once, never retried.
        let forged = AttachmentCredential {
            attachment: credential.attachment,
            token: AttachmentToken([7; 16]),
        };
        for bad in [AttachmentCredential::NONE, forged] {
            let started = Instant::now();
            let error = tests::connect_host_client(&zone.unit, volume, bad, config())
                .await
                .unwrap_err();
            assert!(matches!(error, ClientError::Unauthorized { .. }), "{error}");
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{:?}",
                started.elapsed()
            );
        }

        // Detach: the old token is refused on every partition from then on
        // (as soon as the primaries applied the removal).
        client::remove_attachment(&lcp, volume, credential.attachment)
            .await
            .unwrap();
        refused_after_detach(&attached).await;
        for offset in [4096, 4 * MIB] {
            let error = attached
                .write(offset, bytes::Bytes::from(vec![0x5Au8; 65536]), false)
                .await
                .unwrap_err();
            assert!(matches!(error, ClientError::Unauthorized { .. }), "{error}");
        }
        assert!(matches!(
            attached.refresh_map().await.unwrap_err(),
            ClientError::Unauthorized { .. }
        ));
        attached.close();

        // A new attachment reads what was there: the refused writes wrote nothing.
        let fresh = client::register_attachment(&lcp, volume, "host-b")
            .await
            .unwrap();
        let reader = tests::connect_host_client(&zone.unit, volume, fresh, config())
            .await
            .unwrap();
        assert_eq!(reader.read(4096, 65536).await.unwrap(), old);
        assert_eq!(
            reader.read(4 * MIB, 65536).await.unwrap(),
            bytes::Bytes::from(vec![0u8; 65536])
        );
        reader.close();
        lcp.close();
    });
    // The refusals were counted by the primaries.
    let refused: u64 = zone
        .unit
        .head_nodes
        .iter()
        .filter_map(|h| http_get(h.admin, "/metrics"))
        .flat_map(|(_, text)| {
            text.lines()
                .filter(|l| l.starts_with("rackblock_host_unauthorized_total "))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum();
    assert!(
        refused >= 3,
        "rackblock_host_unauthorized_total = {refused}"
    );
}

/// One zonal API request with `token` as the bearer: status and body.
fn zonal_request(
    zone: &Zone,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&str>,
) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(zone.zonal_address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: zonal\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// Sends `request` on a fresh plain connection to a host port and reads
/// its one answer (bounded).
async fn host_port_call(address: SocketAddr, request: proto::Message) -> proto::Message {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(&request.to_frame(1, false)).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(frame) = proto::frame::decode_frame(&mut buf).unwrap() {
            return proto::Message::from_frame(&frame).unwrap();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, stream.read_buf(&mut buf))
            .await
            .expect("no answer from the host port within 10 s")
            .unwrap();
        assert!(n > 0, "the host port closed without an answer");
    }
}

/// A fresh attach-scoped token from `rackblock zonal-token`: the token and
/// the `[[tokens]]` entry for the zonal config.
fn attach_scoped_token(volumes: &[&str], host: &str) -> (String, String) {
    let mut args = vec!["zonal-token", "--scope", "attach", "--host", host];
    for volume in volumes {
        args.extend(["--volume", volume]);
    }
    let output = Command::new(rackblock_bin()).args(&args).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .unwrap()
        .to_owned();
    let entry = text
        .split_once("# for the zonal config:\n")
        .unwrap()
        .1
        .to_owned();
    (token, entry)
}

/// A host that attaches through the zonal plane holds only an
/// attach-scoped token (its volumes, its host name) and the attachment it
/// gets: that credential reads and writes its volume and nothing else (not
/// another volume, not the zonal API, not a control-plane request on the
/// host port), expires unless the host keeps reading its map, and is cut
/// by a detach. The agent runs on the host token alone, past several TTLs
/// (its map reads renew the attachment), and detaches with it on exit.
#[test]
fn a_zonal_host_holds_only_its_expiring_attachment() {
    const TTL_MS: u64 = 10_000;
    let (host_token, entry) = attach_scoped_token(&["mine", "agent"], "host-a");
    let zone = start_zone_with(&format!("attachment_ttl_ms = {TTL_MS}\n{entry}"));
    for name in ["mine", "theirs", "agent"] {
        let run = create(&zone, &small_volume(name));
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
    let id_of = |name: &str| {
        zone.expect(0, &["volume", "describe", name, "--output", "json"])
            .json()["id"]
            .as_u64()
            .unwrap()
    };
    let (mine, theirs) = (id_of("mine"), id_of("theirs"));

    // The host token: its own volume, its own host name, nothing else.
    for (method, path, body) in [
        (
            "POST",
            "/v1/volumes/theirs/attach",
            Some(r#"{"host":"host-a"}"#),
        ),
        (
            "POST",
            "/v1/volumes/mine/attach",
            Some(r#"{"host":"host-b"}"#),
        ),
        (
            "POST",
            "/v1/volumes",
            Some(r#"{"name":"x","size_bytes":8388608}"#),
        ),
        ("GET", "/v1/volumes", None),
        ("DELETE", "/v1/volumes/mine?force=true", None),
    ] {
        let (status, body) = zonal_request(&zone, method, path, &host_token, body);
        assert_eq!(status, 403, "{method} {path}: {body}");
    }
    let attach_mine = || {
        let (status, body) = zonal_request(
            &zone,
            "POST",
            "/v1/volumes/mine/attach",
            &host_token,
            Some(r#"{"host":"host-a"}"#),
        );
        assert_eq!(status, 201, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["ttl_ms"], TTL_MS);
        assert!(answer["expires_at_ms"].as_u64().is_some(), "{answer}");
        AttachmentCredential {
            attachment: answer["attachment_id"].as_u64().unwrap(),
            token: AttachmentToken::parse_hex(answer["token"].as_str().unwrap()).unwrap(),
        }
    };
    let credential = attach_mine();
    // The attachment's token is no zonal API token.
    let (status, _) = zonal_request(
        &zone,
        "GET",
        "/v1/volumes",
        &credential.token.to_hex(),
        None,
    );
    assert_eq!(status, 401);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let config = || ClientConfig {
            failover_timeout: Duration::from_secs(30),
            ..ClientConfig::default()
        };
        let attached = tests::connect_host_client(&zone.unit, mine, credential, config())
            .await
            .unwrap();
        let data = bytes::Bytes::from(vec![0xC3u8; 65536]);
        attached.write(4096, data.clone(), false).await.unwrap();
        assert_eq!(attached.read(4096, 65536).await.unwrap(), data);
        // Not another volume's.
        let error = tests::connect_host_client(&zone.unit, theirs, credential, config())
            .await
            .unwrap_err();
        assert!(matches!(error, ClientError::Unauthorized { .. }), "{error}");
        // Nor its reads and writes, on any host port (the credential is
        // checked before anything else).
        let data_b = bytes::Bytes::from(vec![0x77u8; 4096]);
        for op in [
            proto::volume::HostOp::Read {
                offset_bytes: 0,
                len_bytes: 4096,
            },
            proto::volume::HostOp::Write {
                write_id: 1,
                offset_bytes: 0,
                crcs: proto::volume::chunk_crcs(&data_b),
                data: data_b.clone(),
                fua: false,
            },
        ] {
            for endpoint in zone.unit.host_endpoints() {
                let answer = host_port_call(
                    endpoint.address,
                    proto::Message::Host(proto::volume::HostRequest {
                        volume: theirs,
                        partition: 0,
                        epoch: 1,
                        credential,
                        op: op.clone(),
                    }),
                )
                .await;
                assert!(
                    matches!(
                        answer,
                        proto::Message::HostReply(proto::volume::HostReply::Error(
                            proto::volume::HostError::Unauthorized { .. }
                        ))
                    ),
                    "{} on another volume: {answer:?}",
                    op.name()
                );
            }
        }
        // No control-plane request on the host port: closed, unanswered.
        let lcp = local_control_plane::client::request_message(
            &local_control_plane::client::LcpRequest::UnitStatus,
        )
        .unwrap();
        for endpoint in zone.unit.host_endpoints() {
            let mut stream = tokio::net::TcpStream::connect(endpoint.address)
                .await
                .unwrap();
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            stream.write_all(&lcp.to_frame(1, false)).await.unwrap();
            let mut answer = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
                    .await
                    .expect("the host port kept a control-plane request open");
            assert!(read.is_err() || answer.is_empty(), "answered {answer:?}");
        }

        // Renewed while the host reads its map: alive past two TTLs.
        let renewing_until = Instant::now() + Duration::from_millis(2 * TTL_MS + 1_000);
        while Instant::now() < renewing_until {
            attached.refresh_map().await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert_eq!(attached.read(4096, 65536).await.unwrap(), data);
        // Left alone, it expires: reads and writes refused (bounded wait).
        let deadline = Instant::now() + Duration::from_millis(TTL_MS + 20_000);
        loop {
            match attached.read(0, 4096).await {
                Err(ClientError::Unauthorized { .. }) => break,
                other => assert!(
                    Instant::now() < deadline,
                    "still served after its TTL: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let error = attached
            .write(4096, bytes::Bytes::from(vec![0x11u8; 65536]), false)
            .await
            .unwrap_err();
        assert!(matches!(error, ClientError::Unauthorized { .. }), "{error}");
        assert!(matches!(
            attached.refresh_map().await.unwrap_err(),
            ClientError::Unauthorized { .. }
        ));
        attached.close();

        // A detach with the host token cuts a live attachment.
        let fresh = attach_mine();
        let reader = tests::connect_host_client(&zone.unit, mine, fresh, config())
            .await
            .unwrap();
        assert_eq!(
            reader.read(4096, 65536).await.unwrap(),
            data,
            "the refused write wrote"
        );
        let (status, body) = zonal_request(
            &zone,
            "DELETE",
            &format!("/v1/volumes/mine/attachments/{}", fresh.attachment),
            &host_token,
            None,
        );
        assert_eq!(status, 200, "{body}");
        refused_after_detach(&reader).await;
        reader.close();
    });

    // The agent with the host token only: serves past two TTLs, then
    // detaches with it on exit.
    let qemu_io_bin = tool("qemu-io");
    let nbd = SocketAddr::from(([127, 0, 0, 1], next_port()));
    let listen = nbd.to_string();
    let url = zone.zonal_url.clone();
    let mut agent = Daemon::spawn(
        "attach-host-token",
        &[
            "attach",
            "agent",
            "--listen",
            &listen,
            "--zonal",
            &url,
            "--token",
            &host_token,
            "--host",
            "host-a",
        ],
        zone.unit.dir.path(),
    );
    wait_for_nbd(&mut agent, nbd);
    std::thread::sleep(Duration::from_millis(2 * TTL_MS + 1_000));
    let (ok, text) = qemu_io(
        &qemu_io_bin,
        &format!("nbd://{nbd}/agent"),
        &["write -P 0x6b 0 1M", "flush", "read -P 0x6b 0 1M"],
    );
    assert!(ok, "{text}\n{}", agent.log_text());
    assert!(
        agent.terminate(),
        "the agent did not stop cleanly:\n{}",
        agent.log_text()
    );
    let described = zone
        .expect(0, &["volume", "describe", "agent", "--output", "json"])
        .json();
    assert_eq!(
        described["attachments"].as_array().map(Vec::len),
        Some(0),
        "the agent did not detach with its host token: {described}\n{}",
        agent.log_text()
    );
}
