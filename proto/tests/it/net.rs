//! Shared fixtures: a test server, refusing and blackholed addresses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use proto::server::{serve_with_metrics, Handler, ServerConfig, ServerMetrics};
use proto::sled::{ColumnId, SledRequest, SledResponse};
use proto::Message;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Answers `Read { offset_bytes, len_bytes }` with `Data` whose bytes encode
/// `offset_bytes`, after `len_bytes` microseconds (so responses come back out
/// of order).
pub struct TestHandler;

impl Handler for TestHandler {
    fn handle(&self, request: Message) -> BoxFuture<'static, Message> {
        Box::pin(async move {
            match request {
                Message::Sled(SledRequest::Read {
                    offset_bytes: offset,
                    len_bytes: len,
                    ..
                }) => {
                    tokio::time::sleep(Duration::from_micros(len.into())).await;
                    Message::SledReply(SledResponse::Data {
                        data: Bytes::copy_from_slice(&offset.to_le_bytes()),
                        block_crcs: vec![],
                    })
                }
                Message::Sled(SledRequest::AllocateColumns {
                    column_count: count,
                    ..
                }) => Message::SledReply(SledResponse::Allocated(
                    (0..count)
                        .map(|index| ColumnId { device: 0, index })
                        .collect(),
                )),
                Message::Ping { .. } => panic!("the server answers pings itself"),
                _ => Message::SledReply(SledResponse::Freed),
            }
        })
    }
}

pub fn read(offset: u64, delay_us: u32) -> Message {
    Message::Sled(SledRequest::Read {
        column: ColumnId {
            device: 1,
            index: 2,
        },
        offset_bytes: offset,
        len_bytes: delay_us,
    })
}

pub fn data_offset(response: &Message) -> u64 {
    match response {
        Message::SledReply(SledResponse::Data { data, .. }) => {
            u64::from_le_bytes(data[..8].try_into().unwrap())
        }
        other => panic!("unexpected response {other:?}"),
    }
}

pub struct TestServer {
    pub address: SocketAddr,
    pub metrics: ServerMetrics,
    pub shutdown: CancellationToken,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn start_server(ip: &str) -> TestServer {
    start_server_on(format!("{ip}:0").parse().unwrap()).await
}

pub async fn start_server_on(address: SocketAddr) -> TestServer {
    let listener = TcpListener::bind(address).await.unwrap();
    let address = listener.local_addr().unwrap();
    let metrics = ServerMetrics::unregistered();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_with_metrics(
        listener,
        Arc::new(TestHandler),
        ServerConfig::default(),
        shutdown.clone(),
        metrics.clone(),
    ));
    TestServer {
        address,
        metrics,
        shutdown,
    }
}

/// An address where nothing listens (connections are refused).
pub async fn refusing(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind(format!("{ip}:0")).await.unwrap();
    listener.local_addr().unwrap()
}

/// Accepts connections and never reads from or answers them.
pub async fn blackhole(ip: &str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind(format!("{ip}:0")).await.unwrap();
    let address = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..64 {
            match listener.accept().await {
                Ok((stream, _)) => held.push(stream),
                Err(_) => break,
            }
        }
        std::future::pending::<()>().await;
    });
    (address, task)
}

/// Poll `condition` every 10 ms for at most `limit`.
pub async fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}
