//! The local control plane across real head-node processes: leader
//! election from the rack file, partition maps from every member, leader
//! kill -9 and rejoin, full restart, and a cut network A.

use std::time::{Duration, Instant};

use local_control_plane::client::{LcpClient, LcpRequest, LcpResponse};
use local_control_plane::{Command, Outcome};
use proto::link::LinkConfig;
use tests::proxy::{FaultProxy, ProxyMode};
use tests::{http_get, Daemon, HeadNodeOptions, TestUnit};

const DEVICE_BYTES: u64 = 64 << 20;
const COLUMN_BYTES: u64 = 4 << 20;

fn unit(proxied_a: bool) -> TestUnit {
    TestUnit::build(
        HeadNodeOptions {
            count: 3,
            proxied_a,
            ..HeadNodeOptions::default()
        },
        2,
        "1+1",
        DEVICE_BYTES,
        COLUMN_BYTES,
    )
}

fn client(unit: &TestUnit) -> LcpClient {
    LcpClient::with_config(
        &unit.rack(),
        LinkConfig {
            connect_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_secs(2),
            probe_interval: Duration::from_millis(200),
            probe_timeout: Duration::from_millis(300),
            failures_before_down: 2,
            auth: Some(unit.member()),
            tls: None,
        },
    )
    .with_retries(5, Duration::from_millis(300))
}

/// (leader name, term) from a head node's `/health`.
fn health(unit: &TestUnit, i: usize) -> Option<(Option<String>, u64)> {
    let (_, body) = http_get(unit.head_nodes[i].admin, "/health")?;
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some((
        json["leader"].as_str().map(str::to_owned),
        json["term"].as_u64()?,
    ))
}

fn register_volume(volume: u64) -> Command {
    Command::RegisterVolume {
        volume,
        name: format!("vol-{volume}"),
        size_bytes: 3 << 30,
        partition_size_bytes: 1 << 30,
        k: 1,
        m: 1,
    }
}

/// Registers a volume, retrying while the leader is still registering the
/// rack inventory (NotEnoughSleds/Nodes are retryable refusals).
async fn register(client: &LcpClient, volume: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match client.command(register_volume(volume)).await {
            Ok(Ok(Outcome::VolumeRegistered { placement, .. })) => {
                assert_eq!(placement.len(), 3);
                return;
            }
            Ok(Err(e)) if e.is_retryable() && Instant::now() < deadline => {}
            other => panic!("register volume {volume}: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn start_sleds(unit: &TestUnit) -> Vec<Daemon> {
    (0..unit.sleds.len()).map(|i| unit.start_sled(i)).collect()
}

/// Every member answers the partition map (followers via the leader),
/// with epoch 1 and both rack addresses of primary and secondary. A member
/// that has not heard from the leader yet (it learns of it with the first
/// AppendEntries that reaches it) answers `NotLeader` with no leader: asked
/// again, for up to 10 s.
async fn check_partition_map_everywhere(unit: &TestUnit, client: &LcpClient, volume: u64) {
    for head in &unit.head_nodes {
        let deadline = Instant::now() + Duration::from_secs(10);
        let map = loop {
            let response = client
                .call_node(&head.id, &LcpRequest::PartitionMap { volume })
                .await
                .unwrap();
            match response {
                LcpResponse::PartitionMap(map) => break map,
                LcpResponse::NotLeader { leader: None, .. } if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => panic!("{}: {other:?}", head.id),
            }
        };
        assert_eq!(map.partitions.len(), 3);
        for p in &map.partitions {
            assert!(p.epoch >= 1);
            assert_ne!(p.primary.id, p.secondary.id);
            for node in [&p.primary, &p.secondary] {
                let rack = unit.head_nodes.iter().find(|h| h.id == node.id.0).unwrap();
                assert_eq!(node.address_a, rack.address_a.to_string());
                assert_eq!(node.address_b, rack.address_b.to_string());
            }
        }
        let (status, body) =
            http_get(head.admin, &format!("/volumes/{volume}/partition-map")).unwrap();
        assert_eq!(status, 200, "{}: {body}", head.id);
        assert!(body.contains("\"epoch\":1"), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_head_nodes_elect_a_leader_and_serve_partition_maps() {
    let unit = unit(false);
    let _sleds = start_sleds(&unit);
    let _heads = unit.start_head_nodes();
    let client = client(&unit);
    register(&client, 1).await;
    check_partition_map_everywhere(&unit, &client, 1).await;

    let (raft, status) = client.unit_status().await.unwrap();
    assert!(raft.leader.is_some());
    assert_eq!(raft.voters, vec![1, 2, 3]);
    assert_eq!(status.nodes.len(), 3);
    assert_eq!(status.sleds.len(), 2);
    assert!(status.capacity.free_columns > 0);
    // An unknown volume is an answer, not an error of the transport.
    assert!(matches!(
        client.partition_map(99).await,
        Err(local_control_plane::client::ClientError::Lcp(
            local_control_plane::LcpError::UnknownVolume { volume: 99 }
        ))
    ));
    // The admin port exposes Raft metrics.
    let (_, metrics) = http_get(unit.head_nodes[0].admin, "/metrics").unwrap();
    for name in [
        "rackblock_lcp_is_leader",
        "rackblock_lcp_term",
        "rackblock_lcp_last_applied",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    client.close();
}

async fn raft_status(client: &LcpClient, node: &str) -> Option<local_control_plane::RaftStatus> {
    match client.call_node(node, &LcpRequest::RaftStatus).await {
        Ok(LcpResponse::RaftStatus(status)) => Some(status),
        _ => None,
    }
}

async fn wait_node_health(client: &LcpClient, node: &str, health: local_control_plane::Health) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok((_, status)) = client.unit_status().await {
            if status
                .nodes
                .iter()
                .any(|n| n.id.0 == node && n.health == health)
            {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{node} never became {health:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The map without lease expiries: primaries renew their leases (the head
/// nodes' data path), so only placement and epochs must be preserved.
fn without_leases(
    mut map: local_control_plane::state::PartitionMap,
) -> local_control_plane::state::PartitionMap {
    for partition in &mut map.partitions {
        partition.lease_expires_at_ms = None;
    }
    map
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_failover_rejoin_and_full_restart() {
    let unit = unit(false);
    let _sleds = start_sleds(&unit);
    let mut heads = unit.start_head_nodes();
    let client = client(&unit);
    register(&client, 7).await;
    let map_before = without_leases(client.partition_map(7).await.unwrap());

    // kill -9 the leader.
    let (raft, _) = client.unit_status().await.unwrap();
    let old_leader = raft.leader_name.clone().unwrap();
    let old_term = raft.term;
    let index = unit
        .head_nodes
        .iter()
        .position(|h| h.id == old_leader)
        .unwrap();
    heads[index].kill9();
    let killed_at = Instant::now();
    let new_leader = loop {
        if let Ok((raft, _)) = client.unit_status().await {
            if let Some(leader) = raft.leader_name.filter(|l| *l != old_leader) {
                assert!(raft.term > old_term);
                break leader;
            }
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "no new leader 20 s after killing {old_leader}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let failover = killed_at.elapsed();
    // Committed state survived, and the new leader commits. The failover
    // controller may already have promoted the secondaries of the dead
    // leader's partitions (its connections were refused, so it is Down
    // quickly): those may have moved on, at a higher epoch; every other
    // partition is exactly as before.
    let map_after = without_leases(client.partition_map(7).await.unwrap());
    assert_eq!(map_after.size_bytes, map_before.size_bytes);
    assert_eq!(map_after.partitions.len(), map_before.partitions.len());
    for (before, after) in map_before.partitions.iter().zip(&map_after.partitions) {
        let touched = before.primary.id.0 == old_leader || before.secondary.id.0 == old_leader;
        if touched {
            assert!(after.epoch >= before.epoch, "{before:?} -> {after:?}");
            if before.primary.id.0 == old_leader && after.epoch > before.epoch {
                assert_eq!(after.primary, before.secondary, "promoted the secondary");
            }
        } else {
            assert_eq!(after, before, "a partition the dead leader did not serve");
        }
    }
    register(&client, 8).await;
    eprintln!("new leader {new_leader} serving {failover:?} after kill -9 of {old_leader}");
    assert!(failover < Duration::from_secs(10));
    // The dead leader's host refused connections on both networks, so a
    // survivor campaigned as soon as the other's openraft lease on it ended
    // (3 s after its last heartbeat with these timings) instead of after its
    // own election timer (3 s + at least 1.5 s): local_control_plane::
    // quick_election.
    let quick_elections: usize = unit
        .head_nodes
        .iter()
        .filter(|h| h.id != old_leader)
        .map(|h| {
            let log = std::fs::read_to_string(unit.dir.path().join(format!("{}.log", h.id)))
                .unwrap_or_default();
            log.lines()
                .filter(|l| {
                    l.contains("refuses connections on both networks: starting an election")
                })
                .count()
        })
        .sum();
    assert!(
        quick_elections >= 1,
        "no survivor started a quick election after the leader's kill -9"
    );

    // Both paths of the killed node are silent: after node_down_after the
    // new leader's detector records it Down (a node fault, this time).
    wait_node_health(&client, &old_leader, local_control_plane::Health::Down).await;

    // Restart the killed node: it rejoins with no manual step.
    heads[index] = unit.start_head_node(index);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leader = raft_status(&client, &new_leader).await;
        let rejoined = raft_status(&client, &old_leader).await;
        if let (Some(leader), Some(rejoined)) = (leader, rejoined) {
            if rejoined.leader_name.as_deref() == Some(new_leader.as_str())
                && rejoined.last_applied == leader.last_applied
                && leader.members.iter().any(|m| m.id == old_leader)
            {
                break;
            }
        }
        assert!(Instant::now() < deadline, "{old_leader} did not rejoin");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_node_health(&client, &old_leader, local_control_plane::Health::Up).await;
    // The rejoined follower serves reads (it forwards them to the leader).
    // A heartbeat delayed on a loaded box can start an election right after
    // the rejoin; during it any node answers NotLeader, which clients follow.
    // So the read must succeed within a bound, not at the first try.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = client
            .call_node(&old_leader, &LcpRequest::PartitionMap { volume: 8 })
            .await;
        match answer {
            Ok(LcpResponse::PartitionMap(_)) => break,
            other => assert!(
                Instant::now() < deadline,
                "{old_leader} serves no partition map 20 s after rejoining: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The failover controller may have moved the dead leader's partitions
    // (epoch + 1) meanwhile: what must survive the full restart is the map
    // as it stands now.
    let map_before_restart = without_leases(client.partition_map(7).await.unwrap());
    assert_eq!(map_before_restart.size_bytes, map_before.size_bytes);
    assert_eq!(
        map_before_restart.partitions.len(),
        map_before.partitions.len()
    );

    // Stop all three (SIGTERM: clean exit) and restart: state preserved.
    for head in heads.iter_mut() {
        assert!(head.terminate(), "{} did not exit cleanly", head.name);
    }
    drop(heads);
    let _heads = unit.start_head_nodes();
    // Preserved: every partition is where it was, or — if a node was still
    // starting when the new leader's detector gave up on it — failed over
    // to its secondary at a higher epoch. Nothing is reset or forgotten.
    let map_after_restart = without_leases(client.partition_map(7).await.unwrap());
    assert_eq!(map_after_restart.size_bytes, map_before_restart.size_bytes);
    assert_eq!(
        map_after_restart.partitions.len(),
        map_before_restart.partitions.len()
    );
    for (before, after) in map_before_restart
        .partitions
        .iter()
        .zip(&map_after_restart.partitions)
    {
        if after.epoch == before.epoch {
            assert_eq!(after, before, "same epoch, same roles");
        } else {
            assert!(after.epoch > before.epoch, "{before:?} -> {after:?}");
        }
    }
    client.partition_map(8).await.unwrap();
    client.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_network_a_between_members_is_a_path_fault_not_a_failover() {
    let unit = unit(true);
    let mut proxies = Vec::new();
    for head in &unit.head_nodes {
        proxies.push(FaultProxy::start(head.address_a, head.listen_a).await);
    }
    let _sleds = start_sleds(&unit);
    let _heads = unit.start_head_nodes();
    let client = client(&unit);
    register(&client, 1).await;
    let (leader, term) = health(&unit, 0).unwrap();
    let leader = leader.unwrap();

    for proxy in &proxies {
        proxy.set_mode(ProxyMode::Blackhole).await;
    }
    let cut_at = Instant::now();
    while cut_at.elapsed() < Duration::from_secs(5) {
        for i in 0..unit.head_nodes.len() {
            let (seen_leader, seen_term) = health(&unit, i).unwrap();
            assert_eq!(
                (seen_leader.as_deref(), seen_term),
                (Some(leader.as_str()), term),
                "{} saw a leadership change after network A was cut",
                unit.head_nodes[i].id
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Writes still commit (over network B).
    register(&client, 2).await;
    // The detector recorded a path fault on A for both followers, and no
    // node fault.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (raft, status) = client.unit_status().await.unwrap();
        assert_eq!(raft.leader_name.as_deref(), Some(leader.as_str()));
        assert_eq!(raft.term, term);
        let followers: Vec<_> = status.nodes.iter().filter(|n| n.id.0 != leader).collect();
        assert!(followers
            .iter()
            .all(|n| n.health == local_control_plane::Health::Up));
        if followers
            .iter()
            .all(|n| !n.paths.network_a_up && n.paths.network_b_up)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no path fault recorded: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Network A back: the fault clears.
    for proxy in &proxies {
        proxy.set_mode(ProxyMode::Forward).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, status) = client.unit_status().await.unwrap();
        if status.nodes.iter().all(|n| n.paths.network_a_up) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "path A not recovered: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    client.close();
}

/// Issue 14, item 7: a fresh unit with the production timings elects once.
/// Only the first voter initialises the group, once a majority answers, so
/// it serves at term 1 (≤ 2 allowed for a timer that fires during the one
/// campaign on a loaded box), and the term stays there while it works.
///
/// Run alone (`scripts/test.sh`'s `serial` stage): beside another unit on 2
/// cores, openraft's 100 ms AppendEntries timeout fails for seconds and
/// the term moves (the open part of issue 14 item 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run alone: the serial stage of scripts/test.sh"]
async fn a_fresh_unit_serves_at_term_at_most_two() {
    let unit = TestUnit::build(
        HeadNodeOptions::production_timings(3),
        2,
        "1+1",
        DEVICE_BYTES,
        COLUMN_BYTES,
    );
    let _sleds = start_sleds(&unit);
    let _heads = unit.start_head_nodes();
    let client = client(&unit);
    register(&client, 1).await;
    check_partition_map_everywhere(&unit, &client, 1).await;
    let (raft, _) = client.unit_status().await.unwrap();
    eprintln!(
        "fresh unit serves: leader {:?}, term {}",
        raft.leader_name, raft.term
    );
    if raft.term > 1 {
        for head in &unit.head_nodes {
            let log = std::fs::read_to_string(unit.dir.path().join(format!("{}.log", head.id)))
                .unwrap_or_default();
            for line in log
                .lines()
                .filter(|l| l.contains("initialis") || l.contains("vote") || l.contains("leader"))
            {
                eprintln!("{}: {line}", head.id);
            }
        }
    }
    assert!(raft.term <= 2, "a fresh unit serves at term {}", raft.term);
    // Ten seconds of control-plane work (maps from every member, through
    // the leader) leave the term where it was.
    let started = Instant::now();
    let mut refusals = Vec::new();
    while started.elapsed() < Duration::from_secs(10) {
        for head in &unit.head_nodes {
            match client
                .call_node(&head.id, &LcpRequest::PartitionMap { volume: 1 })
                .await
            {
                Ok(LcpResponse::PartitionMap(_)) => {}
                other => refusals.push(format!("{}: {other:?}", head.id)),
            }
        }
    }
    // A linearizable read can still fail its quorum round when the box is
    // saturated (other units' tests in parallel): reported, not a failure;
    // what must not happen is a new term.
    if !refusals.is_empty() {
        eprintln!(
            "{} map reads refused during 10 s, first: {}",
            refusals.len(),
            refusals[0].chars().take(200).collect::<String>()
        );
    }
    let (later, _) = client.unit_status().await.unwrap();
    eprintln!(
        "after 10 s: leader {:?}, term {}",
        later.leader_name, later.term
    );
    assert_eq!(later.term, raft.term);
    client.close();
}
