//! The Grafana dashboard (`deploy/grafana/rackblock-unit.json`) queries
//! only metrics the daemons export: a unit from `rackblock up` (3 head
//! nodes, 6 sleds, the zonal plane, vol0's attach agent with a QoS limit
//! so its bucket gauges exist) is scraped, and every `rackblock_*` name
//! in every panel's PromQL must be a family some daemon declares (with
//! the suffixes Prometheus derives: `_total`, `_bucket`, `_sum`,
//! `_count`). A renamed metric fails here instead of leaving a panel
//! silently empty.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::{http_get, metric_sample, RunningUnit};

/// The `rackblock_*` names a `/metrics` answer declares or samples.
fn exported_names(text: &str, names: &mut BTreeSet<String>) {
    for line in text.lines() {
        let name = if let Some(rest) = line.strip_prefix("# TYPE ") {
            rest.split_whitespace().next()
        } else if line.starts_with('#') {
            None
        } else {
            line.split(['{', ' ']).next()
        };
        let Some(name) = name.filter(|n| n.starts_with("rackblock_")) else {
            continue;
        };
        for suffix in ["", "_total", "_bucket", "_sum", "_count"] {
            names.insert(format!("{name}{suffix}"));
        }
    }
}

/// The `rackblock_*` identifiers in a PromQL expression.
fn queried_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("rackblock_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

fn scrape(address: SocketAddr, what: &str) -> String {
    match http_get(address, "/metrics") {
        Some((200, body)) => body,
        other => panic!("GET /metrics of {what} at {address}: {other:?}"),
    }
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/grafana/rackblock-unit.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut queried = BTreeSet::new();
    let mut targets = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let names = queried_names(expr);
            assert!(
                !names.is_empty(),
                "a query without a rackblock metric: {expr}"
            );
            queried.extend(names);
            targets += 1;
        }
    }
    assert!(targets >= 30, "only {targets} queries in the dashboard");

    let unit = RunningUnit::start("1GiB");
    // A limit on vol0, so that its agent's bucket gauges have samples.
    let modified = unit.cli(&["volume", "modify", "vol0", "--iops", "100000"]);
    assert!(
        modified.status.success(),
        "{}",
        String::from_utf8_lossy(&modified.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(unit.ports.attach_admin, "the attach agent");
        let limit = metric_sample(&text, r#"rackblock_agent_qos_limit{dimension="iops"}"#);
        if limit == Some(100_000.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "vol0's agent never took the limit:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut exported = BTreeSet::new();
    for (h, admin) in unit.head_admins().into_iter().enumerate() {
        exported_names(&scrape(admin, &format!("hn-{}", h + 1)), &mut exported);
    }
    for s in 1..=6u16 {
        let admin = SocketAddr::from(([127, 0, 0, 1], unit.ports.admin_base + 100 + s));
        exported_names(&scrape(admin, &format!("sled-{s}")), &mut exported);
    }
    // The zonal plane serves HTTPS only under `up`.
    let (status, zonal_metrics) = unit.zonal_https_get("/metrics", false);
    assert_eq!(
        status, 200,
        "GET /metrics of the zonal plane: {zonal_metrics}"
    );
    exported_names(&zonal_metrics, &mut exported);
    exported_names(
        &scrape(unit.ports.attach_admin, "the attach agent"),
        &mut exported,
    );
    let missing: Vec<&String> = queried.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics no daemon exports: {missing:?}"
    );
    eprintln!(
        "[dashboard] {targets} queries over {} metric names, all exported",
        queried.len()
    );
}

#[test]
fn queried_names_are_found_in_promql() {
    assert_eq!(
        queried_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(rackblock_agent_request_seconds_bucket{op="read"}[1m]))) / rackblock_x"#
        ),
        vec!["rackblock_agent_request_seconds_bucket", "rackblock_x"]
    );
    let mut names = BTreeSet::new();
    exported_names(
        "# TYPE rackblock_a counter\nrackblock_a_total 1\nrackblock_b{x=\"1\"} 2\n# HELP rackblock_c x\n",
        &mut names,
    );
    assert!(names.contains("rackblock_a_total"));
    assert!(names.contains("rackblock_b"));
    assert!(!names.contains("rackblock_c"));
}
