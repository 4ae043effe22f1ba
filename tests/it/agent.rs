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
