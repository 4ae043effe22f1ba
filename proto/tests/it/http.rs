//! The bounded HTTP server: slow headers are cut, connections are capped,
//! and shutdown is not held by a client.

use std::time::{Duration, Instant};

use axum::routing::get;
use proto::http::{serve, HttpLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

async fn start(
    limits: HttpLimits,
) -> (
    std::net::SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let router = axum::Router::new().route("/health", get(|| async { "ok" }));
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            serve(listener, router, limits, stop.cancelled_owned())
                .await
                .unwrap();
        }
    });
    (address, stop, task)
}

/// Reads until EOF or `limit`; true if the peer closed.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

async fn get_health(address: std::net::SocketAddr) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_and_the_cap_closes_extra_connections() {
    let limits = HttpLimits {
        max_connections: 2,
        header_read_timeout: Duration::from_millis(500),
        shutdown_grace: Duration::from_secs(2),
    };
    let (address, stop, task) = start(limits).await;
    assert!(get_health(address).await.ends_with("ok"));

    // Two slow-loris connections fill the cap: a third is closed at once.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
        slow.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(address).await.unwrap();
    assert!(closed_within(&mut third, Duration::from_millis(300)).await);
    // Their headers never finish: both are cut by the header timeout, and
    // the server serves again.
    for stream in &mut slow {
        assert!(closed_within(stream, Duration::from_secs(3)).await);
    }
    assert!(get_health(address).await.ends_with("ok"));
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_left_open_does_not_hold_shutdown() {
    let limits = HttpLimits {
        max_connections: 8,
        header_read_timeout: Duration::from_secs(60),
        shutdown_grace: Duration::from_millis(500),
    };
    let (address, stop, task) = start(limits).await;
    let mut open = TcpStream::connect(address).await.unwrap();
    open.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("shutdown held by an open connection")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(closed_within(&mut open, Duration::from_secs(1)).await);
}
