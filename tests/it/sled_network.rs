//! Losing network A loses nothing: with the sled's network-A path refused
//! or blackholed, requests complete over network B with no error.

use std::time::Duration;

use proto::link::{LinkConfig, LinkMetrics, PathId, PathState, PeerLink};
use proto::sled::{PartitionId, SledRequest, SledResponse};
use tests::proxy::{FaultProxy, ProxyMode};
use tests::{next_port, TestUnit};

use crate::sled::{allocate_and_claim, block_data, call};

const P: PartitionId = PartitionId {
    volume: 11,
    index: 0,
};

async fn run(mode: ProxyMode) {
    let unit = TestUnit::new(2, "1+1", 256 << 20, 16 << 20);
    let _sled = unit.start_sled(0);
    let target = unit.sleds[0].address_a;
    let proxy_addr = format!("127.0.1.200:{}", next_port()).parse().unwrap();
    let proxy = FaultProxy::start(proxy_addr, target).await;
    let config = LinkConfig {
        request_timeout: Duration::from_secs(2),
        probe_interval: Duration::from_millis(100),
        probe_timeout: Duration::from_millis(300),
        auth: Some(unit.sleds[0].member()),
        ..LinkConfig::default()
    };
    let link = PeerLink::new(
        "sled-1".into(),
        proxy_addr,
        unit.sleds[0].address_b,
        config,
        LinkMetrics::unregistered(),
    );
    let column = allocate_and_claim(&link, P, 1).await;
    let mut offset = 0u64;
    for round in 0..3 {
        if round == 1 {
            proxy.set_mode(mode).await;
        }
        if round == 2 {
            // Wait for the probes to see the broken path.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while link.paths()[0].state != PathState::Down {
                assert!(
                    std::time::Instant::now() < deadline,
                    "path A never reported down"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        for i in 0..20u64 {
            let (data, block_crcs) = block_data(round * 100 + i, 2);
            let reply = call(
                &link,
                SledRequest::Append {
                    column,
                    partition: P,
                    epoch: 1,
                    offset_bytes: offset,
                    data: data.clone(),
                    block_crcs,
                },
            )
            .await;
            assert_eq!(
                reply,
                SledResponse::Appended {
                    length_bytes: offset + 8192
                },
                "round {round} i {i}"
            );
            let reply = call(
                &link,
                SledRequest::Read {
                    column,
                    offset_bytes: offset,
                    len_bytes: 8192,
                },
            )
            .await;
            assert!(
                matches!(&reply, SledResponse::Data { data: d, .. } if *d == data),
                "{reply:?}"
            );
            offset += 8192;
        }
    }
    let paths = link.paths();
    assert_eq!(paths[0].path, PathId::A);
    assert_eq!(paths[0].state, PathState::Down);
    assert_eq!(paths[1].state, PathState::Up);
    // Network A comes back: the link returns to it.
    proxy.set_mode(ProxyMode::Forward).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while link.paths()[0].state != PathState::Up {
        assert!(
            std::time::Instant::now() < deadline,
            "path A never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The sled counted requests on network B.
    let (_, metrics) = tests::http_get(unit.sleds[0].admin, "/metrics").unwrap();
    assert!(metrics.contains("network=\"b\""), "{metrics}");
    link.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_a_refusing_requests_complete_over_b() {
    run(ProxyMode::Refuse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_a_blackholed_requests_complete_over_b() {
    run(ProxyMode::Blackhole).await;
}
