//! Smoke test of the head-node data path across real processes: 3 head
//! nodes and 6 sleds (code 4+2). A volume is registered through the local
//! control plane, written and read through `client::VolumeClient` (aligned
//! writes across a partition boundary and one 512-byte write), flushed to
//! the sleds (`POST /flush`), written again (log-resident), and read back
//! after every head node was killed (-9) and restarted — both the flushed
//! data (sled summaries) and the logged tail (WAL recovery) must survive.

use std::time::{Duration, Instant};

use bytes::Bytes;
use client::{ClientConfig, VolumeClient};
use local_control_plane::client::LcpClient;
use local_control_plane::Command;
use tests::{http_get, pattern, HeadNodeOptions, TestUnit};

const MIB: u64 = 1 << 20;
const VOLUME: u64 = 41;
const VOLUME_BYTES: u64 = 64 * MIB;
const PARTITION_BYTES: u64 = 16 * MIB;

/// Registers the volume, retrying while the leader still registers the
/// rack inventory and the sleds' columns.
async fn register(lcp: &LcpClient) {
    let placement = tests::register_volume(
        lcp,
        Command::RegisterVolume {
            volume: VOLUME,
            name: "smoke".into(),
            size_bytes: VOLUME_BYTES,
            partition_size_bytes: PARTITION_BYTES,
            k: 4,
            m: 2,
        },
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(placement.len(), 4);
}

async fn write(client: &VolumeClient, model: &mut [u8], offset: u64, data: Vec<u8>) {
    model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    client
        .write(offset, Bytes::from(data), false)
        .await
        .unwrap_or_else(|e| panic!("write at {offset}: {e}"));
}

/// Reads the whole volume in 4 MiB pieces and compares with the model;
/// on a difference, panics with the head nodes' log tails.
async fn check(unit: &TestUnit, client: &VolumeClient, model: &[u8], when: &str) {
    if let Err(error) = compare(client, model, when).await {
        let mut logs = String::new();
        for head in &unit.head_nodes {
            let path = unit.dir.path().join(format!("{}.log", head.id));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            logs.push_str(&format!("--- {} ---\n", head.id));
            for line in tail.into_iter().rev() {
                logs.push_str(line);
                logs.push('\n');
            }
        }
        panic!("{error}\n{logs}");
    }
}

async fn compare(client: &VolumeClient, model: &[u8], when: &str) -> Result<(), String> {
    tests::check_volume_in_pieces(client, VOLUME_BYTES, 4 * MIB, when, |offset, data| {
        let expected = &model[offset as usize..offset as usize + data.len()];
        if data == expected {
            return Ok(());
        }
        let at = data
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        Err(format!(
            "{when}: volume bytes at {} differ: got {:?}, expected {:?}",
            offset + at as u64,
            &data[at..(at + 16).min(data.len())],
            &expected[at..(at + 16).min(expected.len())],
        ))
    })
    .await
}

fn partitions_json(unit: &TestUnit, i: usize) -> serde_json::Value {
    let (status, body) = http_get(unit.head_nodes[i].admin, "/partitions").expect("/partitions");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_flush_restart_read_back() {
    let started = Instant::now();
    let unit = TestUnit::build(
        HeadNodeOptions {
            count: 3,
            ..HeadNodeOptions::default()
        },
        6,
        "4+2",
        128 * MIB,
        16 * MIB,
    );
    unit.append_head_node_config(&format!(
        "wal_size_bytes = {}\nflush_age_ms = 60000\n",
        64 * MIB
    ));
    let _sleds = unit.start_sleds();
    let mut heads = unit.start_head_nodes();
    let lcp = unit.lcp_client();
    register(&lcp).await;
    unit.wait_datapaths_ready(&heads, Duration::from_secs(20));
    eprintln!("unit up, volume registered: {:?}", started.elapsed());

    let client = tests::connect_client(&unit, VOLUME, ClientConfig::default())
        .await
        .unwrap();
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    // 4 MiB across the boundary of partitions 0 and 1, 1 MiB in partition
    // 2, 512 KiB at the very end, one 512-byte write inside a block.
    write(&client, &mut model, 14 * MIB, pattern(1, 4 * MIB)).await;
    write(&client, &mut model, 40 * MIB, pattern(2, MIB)).await;
    write(
        &client,
        &mut model,
        VOLUME_BYTES - MIB / 2,
        pattern(3, MIB / 2),
    )
    .await;
    write(&client, &mut model, 3 * 4096 + 512, pattern(4, 512)).await;
    check(&unit, &client, &model, "before flush").await;
    eprintln!("written and read back: {:?}", started.elapsed());

    for (i, answer) in unit.flush_all().into_iter().enumerate() {
        let (status, body) = answer.unwrap_or_else(|| panic!("POST /flush on head node {i}"));
        assert_eq!(status, 200, "flush on head node {i}: {body}");
    }
    let mut flushed_blocks = 0;
    for i in 0..unit.head_nodes.len() {
        for p in partitions_json(&unit, i)["partitions"].as_array().unwrap() {
            if p["role"] == "primary" {
                assert_eq!(p["log_resident_blocks"], 0, "after flush: {p}");
                flushed_blocks += p["flushed_blocks"].as_u64().unwrap();
            }
        }
    }
    assert!(
        flushed_blocks >= (5 * MIB + MIB / 2) / 4096,
        "{flushed_blocks}"
    );
    check(&unit, &client, &model, "after flush").await;
    eprintln!("flushed and read back: {:?}", started.elapsed());
    assert!(
        primary_location(&unit, 40 * MIB / 4096).starts_with("Sled"),
        "a flushed block is on the sleds"
    );

    // A tail that lives only in the logs when the head nodes die.
    write(&client, &mut model, 20 * MIB, pattern(5, MIB)).await;
    write(&client, &mut model, 14 * MIB + 4096, pattern(6, 8192)).await;
    check(&unit, &client, &model, "before restart").await;
    assert!(
        primary_location(&unit, 20 * MIB / 4096).starts_with("Log"),
        "an unflushed block is in the log"
    );

    for head in &mut heads {
        head.kill9();
    }
    drop(heads);
    let heads = unit.start_head_nodes();
    unit.wait_datapaths_ready(&heads, Duration::from_secs(30));
    eprintln!("head nodes restarted: {:?}", started.elapsed());
    check(&unit, &client, &model, "after restarting every head node").await;
    eprintln!("read back after restart: {:?}", started.elapsed());
    client.close();
}

/// Where the primary of volume block `block` says it is
/// (`GET /volumes/{id}/blocks/{block}` on every head node): exactly one
/// primary and one secondary answer, with the block's sequence.
fn primary_location(unit: &TestUnit, block: u64) -> String {
    let mut primaries = Vec::new();
    let mut secondaries = 0;
    for head in &unit.head_nodes {
        let (status, body) = http_get(head.admin, &format!("/volumes/{VOLUME}/blocks/{block}"))
            .expect("block endpoint");
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        for hosted in json["hosted"].as_array().unwrap() {
            match hosted["role"].as_str().unwrap() {
                "Primary" => {
                    assert!(hosted["sequence"].as_u64().is_some(), "{hosted}");
                    primaries.push(hosted["location"].as_str().unwrap().to_string());
                }
                "Secondary" => secondaries += 1,
                other => panic!("role {other}: {hosted}"),
            }
        }
    }
    assert_eq!(primaries.len(), 1, "{primaries:?}");
    assert_eq!(secondaries, 1);
    primaries.remove(0)
}

/// Sum of one numeric field over the primaries of every head node.
fn primaries_sum(unit: &TestUnit, field: &str) -> u64 {
    (0..unit.head_nodes.len())
        .flat_map(|i| {
            partitions_json(unit, i)["partitions"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter(|p| p["role"] == "primary")
        .map(|p| p[field].as_u64().unwrap_or(0))
        .sum()
}

/// The background duties without any admin trigger: the age trigger
/// flushes, GC passes run, the metrics show both; a trim reads back zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_flush_by_age_and_metrics() {
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
    unit.append_head_node_config(&format!(
        "wal_size_bytes = {}\nflush_age_ms = 500\ngc_interval_ms = 1000\n",
        32 * MIB
    ));
    let _sleds = unit.start_sleds();
    let heads = unit.start_head_nodes();
    let lcp = unit.lcp_client();
    tests::register_volume(
        &lcp,
        Command::RegisterVolume {
            volume: VOLUME,
            name: "age".into(),
            size_bytes: 8 * MIB,
            partition_size_bytes: 4 * MIB,
            k: 2,
            m: 1,
        },
        Duration::from_secs(20),
    )
    .await;
    unit.wait_datapaths_ready(&heads, Duration::from_secs(20));
    let client = tests::connect_client(&unit, VOLUME, ClientConfig::default())
        .await
        .unwrap();
    let data = pattern(7, 3 * MIB);
    client
        .write(2 * MIB, Bytes::from(data.clone()), false)
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    while primaries_sum(&unit, "flushed_blocks") < 3 * MIB / 4096
        || primaries_sum(&unit, "log_resident_blocks") > 0
        || primaries_sum(&unit, "gc_passes") == 0
    {
        assert!(
            Instant::now() < deadline,
            "no age-triggered flush and GC pass: {:?}",
            (0..2)
                .map(|i| partitions_json(&unit, i))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let read = client.read(2 * MIB, 3 * MIB).await.unwrap();
    assert!(read[..] == data[..], "flushed data differs");

    let (status, metrics) = http_get(unit.head_nodes[0].admin, "/metrics").unwrap();
    assert_eq!(status, 200);
    for name in [
        "rackblock_partition_role",
        "rackblock_partition_epoch",
        "rackblock_partition_lease_valid",
        "rackblock_partition_flushes",
        "rackblock_partition_repair_queue",
        "rackblock_wal_fill_ratio",
        "rackblock_wal_records",
        "rackblock_wal_writes",
        "rackblock_datapath_ready 1",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    let (status, body) = http_get(unit.head_nodes[0].admin, "/status").unwrap();
    assert_eq!(status, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(!status["partitions"].as_array().unwrap().is_empty());

    client.trim(2 * MIB, 3 * MIB).await.unwrap();
    let read = client.read(2 * MIB, 3 * MIB).await.unwrap();
    assert!(read.iter().all(|b| *b == 0), "trimmed range is not zeros");
    client.close();
}
