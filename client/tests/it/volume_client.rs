//! The volume client against fake head nodes: routing, map refresh,
//! retries, checksums, refusals.

use std::time::Duration;

use bytes::Bytes;
use client::ClientError;
use proto::volume::HostError;

use crate::fake::{Unit, VOLUME};

const PARTITION: u64 = 64 * 1024;

fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test]
async fn routes_pieces_to_each_partitions_primary() {
    let unit = Unit::start(3, 4, PARTITION).await;
    let client = unit.client(Unit::config()).await;
    assert_eq!(client.size_bytes(), 4 * PARTITION);
    assert_eq!(client.partition_map().partitions.len(), 4);

    // 100 KiB from 60 KiB: partitions 0, 1 and 2.
    let data = pattern(100 * 1024, 1);
    client.write(60 * 1024, data.clone(), false).await.unwrap();
    assert_eq!(client.read(60 * 1024, 100 * 1024).await.unwrap(), data);
    // Unwritten space reads as zeros; a sub-4K sector write lands exactly.
    client
        .write(PARTITION - 512, pattern(1024, 9), true)
        .await
        .unwrap();
    let around = client.read(PARTITION - 1024, 2048).await.unwrap();
    assert_eq!(&around[512..1536], &pattern(1024, 9)[..]);
    assert_eq!(&around[..512], &data[3 * 1024..3 * 1024 + 512]);
    let tail = client.read(3 * PARTITION, 4096).await.unwrap();
    assert!(tail.iter().all(|b| *b == 0));
    client.flush().await.unwrap();

    for (index, node) in unit.nodes.iter().enumerate() {
        let seen = node.seen();
        assert!(!seen.is_empty(), "node {index} got nothing");
        for request in &seen {
            assert_eq!(unit.primary(request.partition), index, "{request:?}");
            assert_eq!(request.epoch, 1);
            let start = u64::from(request.partition) * PARTITION;
            if request.op != "flush" {
                assert!(request.offset_bytes >= start && request.offset_bytes < start + PARTITION);
            }
        }
    }
    // flush reached every partition's primary once.
    let flushes: Vec<u32> = unit
        .nodes
        .iter()
        .flat_map(|n| n.seen())
        .filter(|s| s.op == "flush")
        .map(|s| s.partition)
        .collect();
    let mut sorted = flushes.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![0, 1, 2, 3]);
}

#[tokio::test]
async fn trim_and_write_zeroes_read_back_as_zeros() {
    let unit = Unit::start(2, 3, PARTITION).await;
    let client = unit.client(Unit::config()).await;
    let data = pattern(3 * PARTITION as usize, 3);
    client.write(0, data.clone(), false).await.unwrap();
    client.trim(PARTITION - 4096, 8192).await.unwrap();
    client
        .write_zeroes(2 * PARTITION - 512, 1024)
        .await
        .unwrap();
    let back = client.read(0, 3 * PARTITION).await.unwrap();
    let mut expected = data.to_vec();
    expected[(PARTITION - 4096) as usize..(PARTITION + 4096) as usize].fill(0);
    expected[(2 * PARTITION - 512) as usize..(2 * PARTITION + 512) as usize].fill(0);
    assert_eq!(&back[..], &expected[..]);
}

#[tokio::test]
async fn not_primary_refreshes_the_map() {
    let unit = Unit::start(3, 3, PARTITION).await;
    let client = unit.client(Unit::config()).await;
    // Failover of partition 0 to node 2; the old primary says so (no hint).
    let epoch = unit.move_partition(0, 2);
    unit.nodes[0].behaviour.lock().unwrap().not_primary = Some(None);
    unit.nodes[2].behaviour.lock().unwrap().min_epoch = epoch;

    client.write(0, pattern(8192, 4), false).await.unwrap();
    assert_eq!(client.read(0, 8192).await.unwrap(), pattern(8192, 4));
    assert_eq!(client.partition_map().partitions[0].epoch, epoch);
    let seen = unit.nodes[2].seen();
    assert!(seen.iter().all(|s| s.partition == 0 && s.epoch == epoch));
    assert_eq!(seen.len(), 2);
    assert_eq!(
        unit.nodes[0].seen().len(),
        1,
        "one refusal, then the new map"
    );
}

#[tokio::test]
async fn not_primary_hint_is_followed_before_the_map_catches_up() {
    let unit = Unit::start(3, 3, PARTITION).await;
    let client = unit.client(Unit::config()).await;
    let hint = unit.nodes[1].hint();
    unit.nodes[0].behaviour.lock().unwrap().not_primary = Some(Some(hint));

    client.write(4096, pattern(4096, 5), false).await.unwrap();
    assert_eq!(client.read(4096, 4096).await.unwrap(), pattern(4096, 5));
    let on_hinted: Vec<_> = unit.nodes[1]
        .seen()
        .into_iter()
        .filter(|s| s.partition == 0)
        .collect();
    assert_eq!(on_hinted.len(), 2, "{on_hinted:?}");
    // The map still names node 0: the client used the hint, after one
    // refusal (the read went straight to the hinted node).
    assert_eq!(unit.nodes[0].seen().len(), 1);
}

#[tokio::test]
async fn stale_epoch_refreshes_and_resends_with_the_new_epoch() {
    let unit = Unit::start(2, 2, PARTITION).await;
    let client = unit.client(Unit::config()).await;
    let epoch = unit.move_partition(1, 1); // same node, new epoch
    unit.nodes[1].behaviour.lock().unwrap().stale_epoch_once = Some(epoch);
    client
        .write(PARTITION, pattern(4096, 6), false)
        .await
        .unwrap();
    let epochs: Vec<u64> = unit.nodes[1].seen().iter().map(|s| s.epoch).collect();
    assert_eq!(epochs, vec![1, epoch]);
}

#[tokio::test]
async fn retries_through_unavailable() {
    let unit = Unit::start(1, 1, PARTITION).await;
    let client = unit.client(Unit::config()).await;
    unit.nodes[0].behaviour.lock().unwrap().unavailable = 5;
    client.write(0, pattern(4096, 7), false).await.unwrap();
    assert_eq!(unit.nodes[0].seen().len(), 6);
}

#[tokio::test]
async fn unavailable_forever_fails_after_the_failover_timeout() {
    let unit = Unit::start(1, 1, PARTITION).await;
    let mut config = Unit::config();
    config.failover_timeout = Duration::from_millis(300);
    let max_attempts = config.max_attempts;
    let client = unit.client(config).await;
    unit.nodes[0].behaviour.lock().unwrap().unavailable = u32::MAX;
    let error = client.read(0, 4096).await.unwrap_err();
    let ClientError::Unavailable {
        volume: VOLUME,
        partition: 0,
        attempts,
        elapsed_ms,
        ..
    } = error
    else {
        panic!("{error}")
    };
    assert!(error.is_retryable());
    // It retried, and it was the 300 ms timeout that ended it: not the
    // attempt bound, not the harness's 10 s default (the upper bound only
    // has to tell 0.3 s from 10 s on a loaded box).
    assert!(attempts >= 2 && attempts < max_attempts, "{error}");
    assert!((300..5_000).contains(&elapsed_ms), "{error}");
}

#[tokio::test]
async fn attempts_are_bounded_by_count() {
    let unit = Unit::start(1, 1, PARTITION).await;
    let mut config = Unit::config();
    config.max_attempts = 4;
    let client = unit.client(config).await;
    unit.nodes[0].behaviour.lock().unwrap().unavailable = u32::MAX;
    let error = client.flush().await.unwrap_err();
    assert!(
        matches!(error, ClientError::Unavailable { attempts: 4, .. }),
        "{error}"
    );
    assert_eq!(unit.nodes[0].seen().len(), 4);
}

#[tokio::test]
async fn a_bad_checksum_is_retried_once_and_never_returned() {
    let unit = Unit::start(1, 2, PARTITION).await;
    let client = unit.client(Unit::config()).await;
    client.write(0, pattern(8192, 8), false).await.unwrap();

    unit.nodes[0].behaviour.lock().unwrap().corrupt_reads = 1;
    assert_eq!(client.read(0, 8192).await.unwrap(), pattern(8192, 8));

    unit.nodes[0].behaviour.lock().unwrap().corrupt_reads = 2;
    let error = client.read(0, 8192).await.unwrap_err();
    assert!(
        matches!(
            error,
            ClientError::ChecksumMismatch {
                volume: VOLUME,
                partition: 0,
                offset_bytes: 0,
                ..
            }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn out_of_range_fails_at_once() {
    let unit = Unit::start(1, 2, PARTITION).await;
    let client = unit.client(Unit::config()).await;
    unit.nodes[0].behaviour.lock().unwrap().out_of_range = true;
    let error = client.read(4096, 4096).await.unwrap_err();
    match &error {
        ClientError::Refused {
            partition: 0,
            offset_bytes: 4096,
            error: refusal,
            ..
        } => assert!(matches!(**refusal, HostError::OutOfRange { .. }), "{error}"),
        other => panic!("{other}"),
    }
    assert!(!error.is_retryable());
    assert_eq!(unit.nodes[0].seen().len(), 1);

    // Caught before sending: past the volume's end, misaligned.
    let seen = unit.nodes[0].seen().len();
    assert!(matches!(
        client.read(2 * PARTITION - 4096, 8192).await,
        Err(ClientError::OutOfRange { .. })
    ));
    assert!(matches!(
        client.write(100, Bytes::from(vec![0u8; 512]), false).await,
        Err(ClientError::Misaligned {
            offset_bytes: 100,
            ..
        })
    ));
    assert!(matches!(
        client.trim(0, 100).await,
        Err(ClientError::Misaligned { .. })
    ));
    assert_eq!(unit.nodes[0].seen().len(), seen);
}

#[tokio::test]
async fn an_unreachable_primary_is_replaced_after_the_map_changes() {
    let unit = Unit::start(2, 2, PARTITION).await;
    let client = unit.client(Unit::config()).await;
    client.write(0, pattern(4096, 10), false).await.unwrap();
    unit.nodes[0].stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let writer = {
        let client = client.clone();
        tokio::spawn(async move { client.read(0, 4096).await })
    };
    // The control plane promotes node 1 a little later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let epoch = unit.move_partition(0, 1);
    let data = tokio::time::timeout(Duration::from_secs(8), writer)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(data, pattern(4096, 10));
    assert!(unit.nodes[1]
        .seen()
        .iter()
        .any(|s| s.partition == 0 && s.epoch == epoch));
}

#[tokio::test]
async fn large_requests_split_at_16_mib() {
    let unit = Unit::start(1, 1, 40 << 20).await;
    let client = unit.client(Unit::config()).await;
    let data = pattern(20 << 20, 11);
    client.write(4096, data.clone(), false).await.unwrap();
    assert_eq!(client.read(4096, 20 << 20).await.unwrap(), data);
    let sizes: Vec<&'static str> = unit.nodes[0].seen().iter().map(|s| s.op).collect();
    assert_eq!(sizes, vec!["write", "write", "read", "read"]);
}

/// The NBD backend's FLUSH needs no head node: a volume write is
/// acknowledged only once durable on two logs, so it sends nothing (the
/// NBD connection's own barrier covers writes still in flight). A closed
/// client refuses it.
#[tokio::test]
async fn nbd_flush_of_acknowledged_writes_sends_nothing() {
    use client::nbd::{NbdBackend, NbdErrno};

    let unit = Unit::start(3, 4, PARTITION).await;
    let client = unit.client(Unit::config()).await;
    NbdBackend::write(&client, 0, pattern(4 * PARTITION as usize, 3), false)
        .await
        .unwrap();
    let before: usize = unit.nodes.iter().map(|n| n.seen().len()).sum();
    NbdBackend::flush(&client).await.unwrap();
    let after: usize = unit.nodes.iter().map(|n| n.seen().len()).sum();
    assert_eq!(after, before, "flush sent requests");
    assert_eq!(
        client.read(0, 4 * PARTITION).await.unwrap(),
        pattern(4 * PARTITION as usize, 3)
    );
    client.close();
    let error = NbdBackend::flush(&client).await.unwrap_err();
    assert_eq!(error.errno, NbdErrno::Shutdown);
}

#[tokio::test]
async fn retries_and_failover_pauses_are_counted() {
    let unit = Unit::start(1, 1, PARTITION).await;
    let config = Unit::config();
    let metrics = config.metrics.clone();
    let client = unit.client(config).await;
    client.write(0, pattern(4096, 7), false).await.unwrap();
    assert_eq!(metrics.retries_total(), 0);
    assert_eq!(metrics.failover_pauses_total(), 0);
    unit.nodes[0].behaviour.lock().unwrap().unavailable = 5;
    client.write(0, pattern(4096, 8), false).await.unwrap();
    assert_eq!(metrics.retries_total(), 5);
    assert_eq!(metrics.failover_pauses_total(), 1);
    assert_eq!(metrics.retrying(), 0);
    // Five backoffs of 5, 10, 20, 40, 50 ms.
    assert!(metrics.longest_pause() >= Duration::from_millis(100));
    let health = client.health();
    assert_eq!(health.unusable, None, "{health:?}");
    assert_eq!(health.primaries[0].state, "connected");
}

#[tokio::test]
async fn health_reports_a_primary_down_on_both_networks() {
    let unit = Unit::start(2, 2, PARTITION).await;
    let client = unit.client(Unit::config()).await;
    client.write(0, pattern(4096, 10), false).await.unwrap();
    assert_eq!(client.health().unusable, None);
    unit.nodes[0].stop();
    // The link's probes notice within a few probe intervals.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let health = client.health();
        if let Some(reason) = &health.unusable {
            assert!(reason.contains("down on both networks"), "{reason}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{health:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.close();
    assert_eq!(
        client.health().unusable.as_deref(),
        Some("the volume client is closed")
    );
}
