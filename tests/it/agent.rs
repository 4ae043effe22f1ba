//! The attach agent as a host sees it: its admin port (metrics, health)
//! and per-volume QoS, driven by fio's nbd engine against a unit from
//! `rackblock up`.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tests::{http_get, metric_sample as sample, require_tool, run_tool, RunningUnit};

fn get_ok(admin: SocketAddr, path: &str) -> String {
    match http_get(admin, path) {
        Some((200, body)) => body,
        other => panic!("GET {path} on {admin}: {other:?}"),
    }
}

/// vol0's agent (started by `up`) answers `/health` 200 and `/metrics`
/// with its metric families. A second volume attached with
/// `--qos-iops 500` holds the limit under fio's nbd engine (4 KiB random
/// writes, QD16, 5 s): fio measures well under 1.5× the limit, no request
/// fails, and the agent counts throttled requests. (The tight ±15 %
/// measurement is `bench/qos.sh`.)
#[test]
fn agent_admin_port_and_qos_iops_limit_under_fio() {
    require_tool("fio", "fio");
    let unit = RunningUnit::start("1GiB");

    let health = get_ok(unit.ports.attach_admin, "/health");
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "ok", "{health:#}");
    assert!(health["partitions"].as_u64().unwrap() >= 1, "{health:#}");
    let metrics = get_ok(unit.ports.attach_admin, "/metrics");
    for family in [
        "rackblock_agent_nbd_connections_accepted_total",
        "rackblock_agent_nbd_connections_open",
        "rackblock_agent_retries_total",
        "rackblock_agent_failover_pause_seconds",
        "rackblock_agent_failover_pause_longest_seconds",
        "rackblock_agent_qos_wait_seconds",
        "rackblock_agent_requests_in_flight",
    ] {
        assert!(metrics.contains(family), "{family} missing:\n{metrics}");
    }
    // up's readiness probe made at least one NBD handshake.
    let accepted = sample(&metrics, "rackblock_agent_nbd_connections_accepted_total").unwrap();
    assert!(accepted >= 1.0, "{metrics}");

    let created = unit.cli(&["volume", "create", "volq", "--size", "1GiB"]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let admin = SocketAddr::from(([127, 0, 0, 1], unit.spare_port()));
    let admin_arg = admin.to_string();
    let (agent, uri) = unit.attach_with(
        "volq",
        &["--qos-iops", "500", "--admin", admin_arg.as_str()],
    );
    let output = unit.dir.path().join("fio-qos.json");
    let output_arg = format!("--output={}", output.display());
    let uri_arg = format!("--uri={uri}");
    let run = run_tool(
        "fio",
        &[
            "--name=qos",
            "--ioengine=nbd",
            &uri_arg,
            "--rw=randwrite",
            "--bs=4k",
            "--size=256M",
            "--iodepth=16",
            "--time_based",
            "--runtime=5",
            "--output-format=json",
            &output_arg,
        ],
        Duration::from_secs(60),
    );
    let text = std::fs::read_to_string(&output).unwrap_or_default();
    assert!(run.status.success(), "{run}\n{text}\n{}", agent.log_text());
    let report: Value = serde_json::from_str(&text).unwrap();
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "{job:#}");
    let iops = job["write"]["iops"].as_f64().unwrap();
    eprintln!("[agent] fio randwrite QD16 with --qos-iops 500: {iops:.0} IOPS");
    assert!(
        iops < 750.0,
        "the limit of 500 IOPS did not hold: {iops:.0}"
    );
    assert!(iops > 100.0, "throttled far below the limit: {iops:.0}");

    let metrics = get_ok(admin, "/metrics");
    let ok = sample(
        &metrics,
        r#"rackblock_agent_requests_total{op="write",outcome="ok"}"#,
    )
    .unwrap();
    let failed = sample(
        &metrics,
        r#"rackblock_agent_requests_total{op="write",outcome="error"}"#,
    )
    .unwrap_or(0.0);
    let throttled = sample(&metrics, "rackblock_agent_qos_throttled_total").unwrap();
    assert!(ok >= 1000.0, "{metrics}");
    assert_eq!(failed, 0.0, "{metrics}");
    assert!(throttled > ok / 2.0, "{metrics}");
    let health = get_ok(admin, "/health");
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["qos"]["iops"]["rate"], 500.0, "{health:#}");
    drop(agent);
}

/// An attach agent killed by pid when the test ends.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `rackblock attach --list` and `rackblock detach` on one host, with
/// in-memory exports (no unit): two agents are listed with their pids and
/// addresses, `detach` stops one (which exits 0) and a second `detach`
/// finds nothing (exit 3); an agent killed with SIGKILL leaves a stale
/// record that the next listing drops.
#[test]
fn attach_list_and_detach_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let rackblock = |args: &[&str]| {
        std::process::Command::new(tests::rackblock_bin())
            .args(args)
            .env("RACKBLOCK_RUN_DIR", &run_dir)
            .output()
            .unwrap()
    };
    let spawn = |volume: &str, extra: &[&str]| {
        let listen = SocketAddr::from(([127, 0, 0, 1], tests::next_port()));
        let log = std::fs::File::create(dir.path().join(format!("{volume}.log"))).unwrap();
        let child = std::process::Command::new(tests::rackblock_bin())
            .args(["attach", volume, "--memory", "64MiB", "--listen"])
            .arg(listen.to_string())
            .args(extra)
            .env("RACKBLOCK_RUN_DIR", &run_dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        (Agent(child), listen)
    };
    let list = || -> Vec<Value> {
        let out = rackblock(&["--output", "json", "attach", "--list"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    let admin = SocketAddr::from(([127, 0, 0, 1], tests::next_port()));
    let (mut first, first_listen) = spawn("mem1", &["--admin", &admin.to_string()]);
    let (mut second, _) = spawn("mem2", &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while list().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "{:?}", list());
        std::thread::sleep(Duration::from_millis(100));
    }
    let agents = list();
    assert_eq!(agents[0]["volume"], "mem1");
    assert_eq!(agents[0]["pid"], first.0.id());
    assert_eq!(agents[0]["uri"], format!("nbd://{first_listen}/mem1"));
    assert_eq!(agents[0]["admin"], format!("http://{admin}"));
    assert_eq!(agents[1]["volume"], "mem2");
    assert!(agents[1]["admin"].is_null());
    // The memory agent is healthy and counts its connections.
    let health: Value = serde_json::from_str(&get_ok(admin, "/health")).unwrap();
    assert_eq!(health["status"], "ok", "{health:#}");

    let out = rackblock(&["detach", "mem1"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("detached mem1"));
    let status = first.0.wait().unwrap();
    assert!(status.success(), "{status}");
    let agents = list();
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert_eq!(agents[0]["volume"], "mem2");
    let out = rackblock(&["detach", "mem1"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    second.0.kill().unwrap();
    second.0.wait().unwrap();
    assert!(list().is_empty());
    let left: Vec<_> = std::fs::read_dir(&run_dir).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}
