//! PeerLink over real loopback sockets: network A on 127.0.1.x, network B
//! on 127.0.2.x.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::link::{LinkConfig, LinkError, LinkMetrics, PathId, PathState, PeerLink};
use proto::sled::{SledRequest, SledResponse};
use proto::Message;

use crate::net::{
    blackhole, data_offset, read, refusing, start_server, start_server_on, wait_until,
};

fn config() -> LinkConfig {
    LinkConfig {
        connect_timeout: Duration::from_millis(200),
        request_timeout: Duration::from_millis(200),
        probe_interval: Duration::from_millis(50),
        probe_timeout: Duration::from_millis(100),
        failures_before_down: 2,
        auth: None,
        tls: None,
    }
}

fn link(a: std::net::SocketAddr, b: std::net::SocketAddr, metrics: LinkMetrics) -> Arc<PeerLink> {
    PeerLink::new("peer-1".to_owned(), a, b, config(), metrics)
}

const SETTLE: Duration = Duration::from_secs(3);

#[tokio::test]
async fn call_works_on_path_a() {
    let a = start_server("127.0.1.50").await;
    let b = start_server("127.0.2.50").await;
    let link = link(a.address, b.address, LinkMetrics::unregistered());
    let response = link.call(read(42, 0), true).await.unwrap();
    assert_eq!(data_offset(&response), 42);
    assert!(
        wait_until(SETTLE, || link
            .paths()
            .iter()
            .all(|p| p.state == PathState::Up))
        .await
    );
    let [path_a, path_b] = link.paths();
    assert_eq!((path_a.path, path_a.address), (PathId::A, a.address));
    assert_eq!((path_b.path, path_b.address), (PathId::B, b.address));
    assert!(path_a.last_rtt_us.is_some());
}

#[tokio::test]
async fn refused_a_fails_over_to_b() {
    let a = refusing("127.0.1.51").await;
    let b = start_server("127.0.2.51").await;
    let metrics = LinkMetrics::unregistered();
    let link = link(a, b.address, metrics.clone());
    for offset in 0..5 {
        assert_eq!(
            data_offset(&link.call(read(offset, 0), true).await.unwrap()),
            offset
        );
    }
    // Non-idempotent requests too: a refused connect never sent anything.
    let allocated = link
        .call(
            Message::Sled(SledRequest::AllocateColumns {
                column_count: 2,
                device: None,
            }),
            false,
        )
        .await
        .unwrap();
    assert!(
        matches!(allocated, Message::SledReply(SledResponse::Allocated(ref c)) if c.len() == 2)
    );
    assert!(
        wait_until(SETTLE, || {
            let [path_a, path_b] = link.paths();
            path_a.state == PathState::Down && path_b.state == PathState::Up
        })
        .await
    );
    let [path_a, path_b] = link.paths();
    assert!(path_a.consecutive_failures >= 2);
    assert!(path_a.last_error.is_some());
    // Refused connects are evidence that nothing listens (a dead process),
    // and the link remembers since when (the failure detector reads both).
    let down_since = path_a.down_since.expect("a Down path knows since when");
    let refused_since = path_a.refused_since.expect("refused connects");
    assert!(refused_since <= down_since);
    assert_eq!((path_b.down_since, path_b.refused_since), (None, None));
    assert!(metrics.path_failures_total("peer-1", PathId::A) >= 2);
    // Once A is Down, calls go straight to B.
    let failovers = metrics.failovers_total("peer-1");
    link.call(read(9, 0), true).await.unwrap();
    assert_eq!(metrics.failovers_total("peer-1"), failovers);
}

#[tokio::test]
async fn blackholed_a_idempotent_retries_on_b_and_non_idempotent_is_uncertain() {
    let (a, _hole) = blackhole("127.0.1.52").await;
    let b = start_server("127.0.2.52").await;
    let metrics = LinkMetrics::unregistered();

    let idempotent_link = link(a, b.address, metrics.clone());
    let started = Instant::now();
    let response = idempotent_link.call(read(7, 0), true).await.unwrap();
    assert_eq!(data_offset(&response), 7);
    assert!(
        started.elapsed() >= Duration::from_millis(90),
        "waited for A's probe or request timeout"
    );
    assert_eq!(metrics.failovers_total("peer-1"), 1);

    let other = LinkMetrics::unregistered();
    let uncertain_link = link(a, b.address, other);
    let error = uncertain_link
        .call(
            Message::Sled(SledRequest::AllocateColumns {
                column_count: 1,
                device: None,
            }),
            false,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            LinkError::Uncertain {
                path: PathId::A,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(!error.is_retryable());

    // The prober notices the black hole.
    assert!(
        wait_until(SETTLE, || idempotent_link.paths()[0].state
            == PathState::Down)
        .await
    );
    assert_eq!(idempotent_link.paths()[1].state, PathState::Up);
    // Silence is not refusal: a stalled peer's kernel still accepts.
    let [path_a, _] = idempotent_link.paths();
    assert!(path_a.down_since.is_some());
    assert_eq!(path_a.refused_since, None);
}

#[tokio::test]
async fn both_paths_down_is_unreachable() {
    let a = refusing("127.0.1.53").await;
    let b = refusing("127.0.2.53").await;
    let link = link(a, b, LinkMetrics::unregistered());
    for idempotent in [true, false] {
        let error = link.call(read(1, 0), idempotent).await.unwrap_err();
        match &error {
            LinkError::Unreachable { peer, errors } => {
                assert_eq!(peer, "peer-1");
                assert_eq!(errors.len(), 2);
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }
        assert!(error.is_retryable());
    }
    assert!(
        wait_until(SETTLE, || link
            .paths()
            .iter()
            .all(|p| p.state == PathState::Down))
        .await
    );
    link.close();
    assert_eq!(
        link.call(read(1, 0), true).await.unwrap_err(),
        LinkError::Closed
    );
}

#[tokio::test]
async fn recovered_path_comes_back_up() {
    let a = refusing("127.0.1.54").await;
    let b = start_server("127.0.2.54").await;
    let link = link(a, b.address, LinkMetrics::unregistered());
    assert!(wait_until(SETTLE, || link.paths()[0].state == PathState::Down).await);
    let _a_server = start_server_on(a).await;
    assert!(wait_until(SETTLE, || link.paths()[0].state == PathState::Up).await);
    assert_eq!(link.paths()[0].consecutive_failures, 0);
    assert_eq!(
        (link.paths()[0].down_since, link.paths()[0].refused_since),
        (None, None)
    );
    assert_eq!(data_offset(&link.call(read(3, 0), true).await.unwrap()), 3);
}

#[tokio::test]
async fn a_thousand_concurrent_calls_over_one_link() {
    let a = start_server("127.0.1.55").await;
    let b = start_server("127.0.2.55").await;
    let link = link(a.address, b.address, LinkMetrics::unregistered());
    let calls = (0..1000u64).map(|offset| {
        let link = link.clone();
        // Varying delays: responses return out of order.
        async move {
            (
                offset,
                link.call(read(offset, (offset % 7) as u32 * 300), true)
                    .await,
            )
        }
    });
    let results = futures::future::join_all(calls).await;
    for (offset, result) in results {
        assert_eq!(data_offset(&result.unwrap()), offset);
    }
}

#[tokio::test]
async fn dropping_the_link_stops_the_prober() {
    let a = start_server("127.0.1.56").await;
    let b = start_server("127.0.2.56").await;
    let link = link(a.address, b.address, LinkMetrics::unregistered());
    let weak = Arc::downgrade(&link);
    link.call(read(1, 0), true).await.unwrap();
    drop(link);
    assert!(wait_until(SETTLE, || weak.strong_count() == 0).await);
}

/// A request in flight on a path that goes silent moves to the other path
/// once a probe of the silent path times out, long before its own (here
/// 10 s) request timeout.
#[tokio::test]
async fn blackholed_path_moves_in_flight_requests_within_a_probe_timeout() {
    let (a, _hole) = blackhole("127.0.1.53").await;
    let b = start_server("127.0.2.53").await;
    let config = LinkConfig {
        request_timeout: Duration::from_secs(10),
        ..config()
    };
    let link = PeerLink::new(
        "peer-1".to_owned(),
        a,
        b.address,
        config,
        LinkMetrics::unregistered(),
    );
    let started = Instant::now();
    let response = link.call(read(11, 0), true).await.unwrap();
    assert_eq!(data_offset(&response), 11);
    // It moved because the probes declared path A down (not because some
    // other timer fired), and well before its own 10 s timeout (the probes
    // need ~0.3 s; the bound only has to tell the two apart on a loaded box).
    let [path_a, path_b] = link.paths();
    assert_eq!(path_a.state, PathState::Down, "{path_a:?}");
    assert_eq!(path_b.state, PathState::Up, "{path_b:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}: the request waited for its own timeout",
        started.elapsed()
    );
}
