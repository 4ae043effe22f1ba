//! Degraded extents with real processes (issue 14, item 1): six sleds and a
//! 4+2 code, so one dead sled leaves five, fewer than an extent's width.
//! New extents are allocated on the five (the sixth column owed), flushes
//! go on, and writes of several times the write logs' capacity through the
//! volume client all succeed; once the sled returns, repair writes every
//! owed column on it, and the data survives two *other* sleds killed.

use std::time::{Duration, Instant};

use bytes::Bytes;
use client::ClientConfig;
use local_control_plane::{Command, Health, UnitStatus};
use proto::link::LinkConfig;
use tests::{Daemon, HeadNodeOptions, Rng, TestUnit};

const MIB: u64 = 1 << 20;
const K: u8 = 4;
const M: u8 = 2;
const SLEDS: u32 = 6;
const COLUMN_BYTES: u64 = 2 * MIB;
const DEVICE_BYTES: u64 = 96 * MIB;
const VOLUME_BYTES: u64 = 32 * MIB;
const PARTITION_BYTES: u64 = 8 * MIB;
const WAL_BYTES: u64 = 16 * MIB;
const WRITE_BYTES: u64 = 256 * 1024;

async fn status(lcp: &local_control_plane::LcpClient) -> UnitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match lcp.unit_status().await {
            Ok((_, status)) => return status,
            Err(e) if Instant::now() < deadline => {
                eprintln!("unit status: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => panic!("unit status: {e}"),
        }
    }
}

async fn wait_sled(lcp: &local_control_plane::LcpClient, sled: &str, health: Health) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(lcp).await;
        if s.sleds.iter().any(|x| x.id.0 == sled && x.health == health) {
            return;
        }
        assert!(Instant::now() < deadline, "{sled} not {health:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn head_logs(heads: &[Daemon]) -> String {
    heads
        .iter()
        .map(|h| {
            let text = h.log_text();
            let start = text.len().saturating_sub(6000);
            format!("---- {} ----\n{}", h.name, &text[start..])
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sled_killed_writes_of_three_logs_succeed_and_owed_columns_are_repaired() {
    let started = Instant::now();
    let note = |what: &str| eprintln!("degraded: {what} at {:?}", started.elapsed());
    let unit = TestUnit::build(
        HeadNodeOptions {
            count: 3,
            ..HeadNodeOptions::default()
        },
        SLEDS,
        &format!("{K}+{M}"),
        DEVICE_BYTES,
        COLUMN_BYTES,
    );
    // The killed sled stays Down (not Failed: a Failed sled holding columns
    // of full extents could not return on a six-sled unit).
    unit.append_head_node_config(&format!(
        "wal_size_bytes = {WAL_BYTES}\nio_engine = \"sync\"\nflush_age_ms = 300\n\
         sled_failed_after_ms = 600000\nrepair_max_concurrent = 8\n\
         repair_bytes_per_second = {}\nrepair_poll_interval_ms = 100\n",
        200 * MIB
    ));
    let mut sleds: Vec<Option<Daemon>> = unit.start_sleds().into_iter().map(Some).collect();
    let heads = unit.start_head_nodes();
    let lcp = unit.lcp_client();
    tests::register_volume(
        &lcp,
        Command::RegisterVolume {
            volume: 141,
            name: "degraded".into(),
            size_bytes: VOLUME_BYTES,
            partition_size_bytes: PARTITION_BYTES,
            k: K,
            m: M,
        },
        Duration::from_secs(30),
    )
    .await;
    unit.wait_datapaths_ready(&heads, Duration::from_secs(30));
    let config = ClientConfig {
        failover_timeout: Duration::from_secs(60),
        link: LinkConfig {
            connect_timeout: Duration::from_millis(300),
            ..LinkConfig::default()
        },
        ..ClientConfig::default()
    };
    let client = tests::connect_client(unit.lcp_client(), 141, config)
        .await
        .unwrap();
    note("unit up");

    sleds[5].take().unwrap().kill9();
    note("kill -9 sled-6");
    wait_sled(&lcp, "sled-6", Health::Down).await;

    // Three times one log's capacity, sequentially over the volume.
    let mut rng = Rng::new(141);
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    let total = 3 * WAL_BYTES;
    let mut errors = Vec::new();
    let mut longest = Duration::ZERO;
    for i in 0..total / WRITE_BYTES {
        let offset = (i * WRITE_BYTES) % VOLUME_BYTES;
        let data = rng.bytes(WRITE_BYTES);
        let t = Instant::now();
        match client.write(offset, Bytes::from(data.clone()), false).await {
            Ok(()) => {
                model[offset as usize..(offset + WRITE_BYTES) as usize].copy_from_slice(&data)
            }
            Err(e) => errors.push(format!("write at {offset}: {e}")),
        }
        longest = longest.max(t.elapsed());
    }
    note(&format!(
        "{} MiB written with sled-6 down, longest write {longest:?}",
        total / MIB
    ));
    assert!(errors.is_empty(), "{errors:?}\n{}", head_logs(&heads));
    let check = |what: &'static str| {
        let client = &client;
        let model = &model;
        async move {
            for offset in (0..VOLUME_BYTES).step_by(MIB as usize) {
                let data = client
                    .read(offset, MIB)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: read at {offset}: {e}"));
                assert!(
                    data.as_ref() == &model[offset as usize..(offset + MIB) as usize],
                    "{what}: wrong data in the MiB at {offset}"
                );
            }
        }
    };
    check("with sled-6 down").await;
    let s = status(&lcp).await;
    note(&format!("allocation: {:?}", s.allocation));
    assert!(s.allocation.degraded_extents > 0, "{:?}", s.allocation);
    assert!(s.allocation.reasons.iter().any(|r| r.contains("degraded")));

    // sled-6 returns: every owed column is written on it.
    sleds[5] = Some(unit.start_sled(5));
    note("restarted sled-6");
    wait_sled(&lcp, "sled-6", Health::Up).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let repaired = loop {
        let s = status(&lcp).await;
        if s.allocation.owed_columns == 0 && s.repair.tasks.is_empty() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "owed columns not repaired: {:?} {:?}\n{}",
            s.allocation,
            s.repair,
            head_logs(&heads)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "OWED REPAIR: {} columns, {} bytes rebuilt in total ({seconds:.1} s into the test)",
        repaired.repair.completed, repaired.repair.completed_bytes
    );
    assert!(repaired.repair.completed > 0);
    check("after the owed columns were written").await;
    // The repaired columns are real: two other sleds gone, still readable.
    sleds[0].take().unwrap().kill9();
    sleds[1].take().unwrap().kill9();
    note("kill -9 sled-1 and sled-2");
    check("with sled-1 and sled-2 killed").await;
    note("done");
}
