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

struct Started {
    unit: TestUnit,
    sleds: Vec<Option<Daemon>>,
    heads: Vec<Daemon>,
    lcp: local_control_plane::LcpClient,
    client: client::VolumeClient,
}

/// Six sleds, 4+2, three head nodes with 16 MiB write logs, volume `volume`.
async fn start(volume: u64) -> Started {
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
    // A killed sled stays Down (not Failed: a Failed sled holding columns
    // of full extents could not return on a six-sled unit).
    unit.append_head_node_config(&format!(
        "wal_size_bytes = {WAL_BYTES}\nio_engine = \"sync\"\nflush_age_ms = 300\n\
         sled_failed_after_ms = 600000\nrepair_max_concurrent = 8\n\
         repair_bytes_per_second = {}\nrepair_poll_interval_ms = 100\n",
        200 * MIB
    ));
    let sleds: Vec<Option<Daemon>> = unit.start_sleds().into_iter().map(Some).collect();
    let heads = unit.start_head_nodes();
    let lcp = unit.lcp_client();
    tests::register_volume(
        &lcp,
        Command::RegisterVolume {
            volume,
            name: format!("degraded-{volume}"),
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
    let client = tests::connect_client(&unit, volume, config).await.unwrap();
    Started {
        unit,
        sleds,
        heads,
        lcp,
        client,
    }
}

/// Reads the whole volume and compares it with `model`.
async fn check(client: &client::VolumeClient, model: &[u8], what: &str) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sled_killed_writes_of_three_logs_succeed_and_owed_columns_are_repaired() {
    let started = Instant::now();
    let note = |what: &str| eprintln!("degraded: {what} at {:?}", started.elapsed());
    let Started {
        unit,
        mut sleds,
        heads,
        lcp,
        client,
    } = start(141).await;
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
    check(&client, &model, "with sled-6 down").await;
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
    check(&client, &model, "after the owed columns were written").await;
    // The repaired columns are real: two other sleds gone, still readable.
    sleds[0].take().unwrap().kill9();
    sleds[1].take().unwrap().kill9();
    note("kill -9 sled-1 and sled-2");
    check(&client, &model, "with sled-1 and sled-2 killed").await;
    note("done");
}

/// Two of six sleds killed: four left, fewer than the default minimum of
/// k+1 columns, so no extent can be allocated and flushes wait. Writes of
/// more than the logs hold wait too (the client retries `Unavailable`
/// within its failover timeout) instead of failing, the unit status says
/// why, and once one sled returns they all complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_minimum_writes_wait_for_a_sled_instead_of_failing() {
    let started = Instant::now();
    let note = |what: &str| eprintln!("below-min: {what} at {:?}", started.elapsed());
    let Started {
        unit,
        mut sleds,
        heads,
        lcp,
        client,
    } = start(142).await;
    note("unit up");
    sleds[4].take().unwrap().kill9();
    sleds[5].take().unwrap().kill9();
    note("kill -9 sled-5 and sled-6");
    wait_sled(&lcp, "sled-5", Health::Down).await;
    wait_sled(&lcp, "sled-6", Health::Down).await;
    let client = std::sync::Arc::new(client);
    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut rng = Rng::new(142);
            let mut model = vec![0u8; VOLUME_BYTES as usize];
            let mut errors = Vec::new();
            let mut longest = Duration::ZERO;
            for i in 0..2 * WAL_BYTES / WRITE_BYTES {
                let offset = (i * WRITE_BYTES) % VOLUME_BYTES;
                let data = rng.bytes(WRITE_BYTES);
                let t = Instant::now();
                match client.write(offset, Bytes::from(data.clone()), false).await {
                    Ok(()) => model[offset as usize..(offset + WRITE_BYTES) as usize]
                        .copy_from_slice(&data),
                    Err(e) => errors.push(format!("write at {offset}: {e}")),
                }
                longest = longest.max(t.elapsed());
            }
            (model, errors, longest)
        })
    };
    // The logs fill; the status says why nothing is flushed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(&lcp).await;
        if s.allocation
            .reasons
            .iter()
            .any(|r| r.contains("flushes wait"))
        {
            note(&format!("status: {:?}", s.allocation.reasons));
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", s.allocation);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        !writer.is_finished(),
        "twice a log's capacity was written with no flush"
    );
    sleds[4] = Some(unit.start_sled(4));
    note("restarted sled-5");
    let (model, errors, longest) = writer.await.unwrap();
    note(&format!("writes done, longest {longest:?}"));
    assert!(errors.is_empty(), "{errors:?}\n{}", head_logs(&heads));
    assert!(
        longest > Duration::from_secs(2),
        "no write waited: {longest:?}"
    );
    check(&client, &model, "after sled-5 returned").await;
    let s = status(&lcp).await;
    assert!(s.allocation.degraded_extents > 0, "{:?}", s.allocation);
    note("done");
}
