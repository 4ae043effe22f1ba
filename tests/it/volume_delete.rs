//! Deleting a volume across a crash of the LCP leader: 3 head nodes, 6
//! sleds (4+2). A volume is written and flushed to the sleds, deleted
//! (forced, while a client is attached), and the Raft leader is killed (-9)
//! right after the delete committed, before its deleter could free
//! anything (it first waits for the old primaries' leases). The next
//! leader's deleter must finish: the attached client is refused, every
//! column is back in the free pool of the LCP and free on the sleds, and
//! the volume record is purged.

use std::time::{Duration, Instant};

use bytes::Bytes;
use client::{ClientConfig, ClientError};
use local_control_plane::{Command, Outcome};
use tests::{HeadNodeOptions, TestUnit};

const MIB: u64 = 1 << 20;
const VOLUME: u64 = 71;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_finishes_after_the_leader_is_killed() {
    let unit = TestUnit::build(
        HeadNodeOptions {
            count: 3,
            ..HeadNodeOptions::default()
        },
        6,
        "4+2",
        128 * MIB,
        8 * MIB,
    );
    unit.append_head_node_config(&format!("wal_size_bytes = {}\n", 64 * MIB));
    let _sleds = unit.start_sleds();
    let mut heads = unit.start_head_nodes();
    let lcp = unit.lcp_client();
    // Wait for the sleds' columns, then note the free counts.
    let deadline = Instant::now() + Duration::from_secs(30);
    let lcp_free_before = loop {
        if let Ok((_, status)) = lcp.unit_status().await {
            if status.capacity.free_columns > 0
                && status
                    .sleds
                    .iter()
                    .all(|s| s.devices.iter().all(|d| d.free_columns > 0))
            {
                break status.capacity.free_columns;
            }
        }
        assert!(Instant::now() < deadline, "sled columns never registered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let sled_free_before = unit.sled_free_columns();
    match lcp
        .command(Command::RegisterVolume {
            volume: VOLUME,
            name: "doomed".into(),
            size_bytes: 32 * MIB,
            partition_size_bytes: 8 * MIB,
            k: 4,
            m: 2,
        })
        .await
    {
        Ok(Ok(Outcome::VolumeRegistered { .. })) => {}
        other => panic!("register: {other:?}"),
    }
    unit.wait_datapaths_ready(&heads, Duration::from_secs(20));
    let client = tests::connect_client(&unit, VOLUME, ClientConfig::default())
        .await
        .unwrap();
    client
        .write(0, Bytes::from(vec![0x42u8; 32 * MIB as usize]), false)
        .await
        .unwrap();
    for answer in unit.flush_all() {
        assert_eq!(answer.map(|a| a.0), Some(200));
    }
    assert!(
        unit.sled_free_columns() < sled_free_before,
        "nothing reached the sleds"
    );

    // Delete (forced: the client is attached), then kill the leader.
    match lcp
        .command(Command::DeleteVolume {
            volume: VOLUME,
            force: true,
            now_ms: 0,
        })
        .await
    {
        Ok(Ok(Outcome::DeleteStarted {
            revoked_attachments,
            extents,
            ..
        })) => {
            assert_eq!(revoked_attachments, 1);
            assert!(extents > 0);
        }
        other => panic!("delete: {other:?}"),
    }
    let (raft, _) = lcp.unit_status().await.unwrap();
    let leader = raft.leader_name.expect("a leader");
    let victim = unit.head_node_index(&leader);
    heads[victim].kill9();
    eprintln!("killed the leader {leader} right after the delete");

    // The attached client is refused at once: by a head node (its
    // credential went with the volume), or — when the partition's primary
    // was the killed leader — by the control plane, which no longer knows
    // the volume.
    let started = Instant::now();
    let error = client.read(0, 4096).await.unwrap_err();
    assert!(
        matches!(
            error,
            ClientError::Unauthorized { .. } | ClientError::VolumeGone { .. }
        ),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "refused only after {:?}",
        started.elapsed()
    );
    client.close();

    // The next leader frees every column and purges the record.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = lcp.unit_status().await.ok().map(|(_, s)| s);
        let sled_free = unit.sled_free_columns();
        if let Some(s) = &status {
            if s.capacity.free_columns == lcp_free_before
                && s.deleting_volumes == 0
                && s.extents == 0
                && sled_free == sled_free_before
            {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "delete not finished: {:?}, sleds {sled_free}/{sled_free_before}, LCP before {lcp_free_before}",
            status.map(|s| (s.capacity.free_columns, s.deleting_volumes, s.extents))
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    lcp.close();
}
