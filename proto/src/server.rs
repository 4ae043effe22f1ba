//! Accepting side of the protocol: one task per connection, requests
//! answered concurrently, responses possibly out of order.
//!
//! ```text
//! socket ─read─▶ reader loop ──decode──▶ Ping? ──▶ Pong ─────────┐
//!                    │                    request: acquire permit │
//!                    │                    spawn handler task ─────┤
//!                    ▼                                            ▼
//!            bad frame / response-kind            bounded channel of encoded frames
//!            ⇒ warn, count, close                  ▶ writer task ─write─▶ socket
//! ```
//!
//! * At most `max_in_flight_per_connection` handler calls run per
//!   connection; when they are all busy the reader stops reading, so TCP
//!   flow control pushes back on the peer instead of memory growing.
//! * Every response carries the RESPONSE flag and the request's id.
//! * Any [`FrameError`] (bad magic, checksum, unknown kind, ...) or a
//!   response-kind message sent as a request means the peer is broken or
//!   the stream is corrupt: the connection is logged, counted and closed
//!   (in-flight handler calls are abandoned, the socket is shut down). Other
//!   connections are unaffected.
//! * `idle_timeout`: a connection with no frames received and nothing in
//!   flight for that long is closed.
//! * `shutdown` stops accepting and closes every connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::frame::{FrameCodec, FrameError};
use crate::message::Message;

/// Application side of a server.
pub trait Handler: Send + Sync + 'static {
    /// Answer one request. Never called for Ping (the server answers Pong
    /// itself). Must return a response-kind message.
    fn handle(&self, request: Message) -> BoxFuture<'static, Message>;
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Handler calls running at once per connection (default 256).
    pub max_in_flight_per_connection: usize,
    /// Close a connection idle for this long (default: never).
    pub idle_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_in_flight_per_connection: 256,
            idle_timeout: None,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Server counters. Cheap to clone (shared handles).
#[derive(Debug, Clone, Default)]
pub struct ServerMetrics {
    connections_accepted: Counter,
    connections_open: Gauge,
    requests: Counter,
    bad_frames: Family<ReasonLabels, Counter>,
}

impl ServerMetrics {
    /// Register `rackblock_server_connections_accepted_total`,
    /// `rackblock_server_connections_open`, `rackblock_server_requests_total`
    /// and `rackblock_server_bad_frames_total{reason}`.
    pub fn new(registry: &mut Registry) -> ServerMetrics {
        let metrics = ServerMetrics::unregistered();
        registry.register(
            "rackblock_server_connections_accepted",
            "Connections accepted",
            metrics.connections_accepted.clone(),
        );
        registry.register(
            "rackblock_server_connections_open",
            "Connections open",
            metrics.connections_open.clone(),
        );
        registry.register(
            "rackblock_server_requests",
            "Requests dispatched to the handler",
            metrics.requests.clone(),
        );
        registry.register(
            "rackblock_server_bad_frames",
            "Connections closed for a bad frame or a misdirected message",
            metrics.bad_frames.clone(),
        );
        metrics
    }

    /// Not registered anywhere (tests).
    pub fn unregistered() -> ServerMetrics {
        ServerMetrics::default()
    }

    /// Connections closed for a bad frame so far (all reasons).
    pub fn bad_frames_total(&self) -> u64 {
        let mut total = 0;
        for reason in BAD_FRAME_REASONS {
            total += self
                .bad_frames
                .get_or_create(&ReasonLabels { reason })
                .get();
        }
        total
    }
}

const BAD_FRAME_REASONS: [&str; 12] = [
    "bad_magic",
    "unsupported_version",
    "reserved_bits",
    "too_large",
    "checksum",
    "truncated",
    "trailing_bytes",
    "unknown_kind",
    "response_flag_mismatch",
    "body",
    "io",
    "response_as_request",
];

/// Serve until `shutdown` is cancelled. Returns once every connection task
/// has ended. Accept errors (e.g. out of file descriptors) are logged and
/// retried after a short pause.
pub async fn serve(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> io::Result<()> {
    serve_with_metrics(
        listener,
        handler,
        config,
        shutdown,
        ServerMetrics::unregistered(),
    )
    .await
}

/// [`serve`] with metrics.
pub async fn serve_with_metrics(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    config: ServerConfig,
    shutdown: CancellationToken,
    metrics: ServerMetrics,
) -> io::Result<()> {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        match accepted {
            Ok((stream, peer)) => {
                metrics.connections_accepted.inc();
                let connection = Connection {
                    handler: handler.clone(),
                    config: config.clone(),
                    shutdown: shutdown.child_token(),
                    metrics: metrics.clone(),
                    peer: peer.to_string(),
                };
                connections.spawn(connection.run(stream));
            }
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    while connections.join_next().await.is_some() {}
    Ok(())
}

struct Connection {
    handler: Arc<dyn Handler>,
    config: ServerConfig,
    shutdown: CancellationToken,
    metrics: ServerMetrics,
    peer: String,
}

/// Why the reader loop stopped.
enum End {
    /// Peer closed or shutdown: let in-flight requests finish.
    Graceful,
    /// Broken peer: abandon in-flight requests.
    Abort,
}

impl Connection {
    async fn run(self, stream: TcpStream) {
        self.metrics.connections_open.inc();
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(peer = %self.peer, %error, "set_nodelay failed");
        }
        let (read_half, write_half) = stream.into_split();
        let max_in_flight = self.config.max_in_flight_per_connection.max(1);
        // Room for every in-flight response plus pongs.
        let (tx, rx) = mpsc::channel::<Bytes>(max_in_flight + 16);
        let writer = tokio::spawn(write_frames(write_half, rx));
        let permits = Arc::new(Semaphore::new(max_in_flight));
        let mut handlers = JoinSet::new();
        let mut frames = FramedRead::new(read_half, FrameCodec);

        let end = loop {
            // Reap finished handler tasks so the set stays bounded.
            while handlers.try_join_next().is_some() {}
            let next = tokio::select! {
                () = self.shutdown.cancelled() => break End::Abort,
                next = next_frame(&mut frames, self.config.idle_timeout) => next,
            };
            let frame = match next {
                Next::Frame(frame) => frame,
                Next::Eof => break End::Graceful,
                Next::Idle => {
                    if permits.available_permits() == max_in_flight {
                        tracing::debug!(peer = %self.peer, "closing idle connection");
                        break End::Graceful;
                    }
                    continue;
                }
                Next::Error(FrameError::Io(error)) => {
                    tracing::debug!(peer = %self.peer, %error, "connection read failed");
                    break End::Abort;
                }
                Next::Error(error) => {
                    self.bad_frame(error.label(), &error.to_string());
                    break End::Abort;
                }
            };
            let request_id = frame.header.request_id;
            let request = match Message::from_frame(&frame) {
                Ok(message) => message,
                Err(error) => {
                    self.bad_frame(error.label(), &error.to_string());
                    break End::Abort;
                }
            };
            if request.is_response() {
                self.bad_frame(
                    "response_as_request",
                    &format!("kind {:#06x} sent as a request", request.kind()),
                );
                break End::Abort;
            }
            if let Message::Ping { nonce } = request {
                if tx
                    .send(Message::Pong { nonce }.to_frame(request_id, true))
                    .await
                    .is_err()
                {
                    break End::Abort;
                }
                continue;
            }
            let permit = tokio::select! {
                () = self.shutdown.cancelled() => break End::Abort,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break End::Abort, // never closed
                },
            };
            self.metrics.requests.inc();
            let response = self.handler.handle(request);
            let tx = tx.clone();
            let peer = self.peer.clone();
            handlers.spawn(async move {
                let response = response.await;
                drop(permit);
                if !response.is_response() {
                    tracing::error!(%peer, kind = response.kind(), "handler returned a request-kind message; dropped");
                    return;
                }
                match response.try_to_frame(request_id, true) {
                    Ok(frame) => {
                        let _ = tx.send(frame).await;
                    }
                    Err(error) => tracing::error!(%peer, %error, "response does not fit a frame; dropped"),
                }
            });
        };
        drop(frames);
        match end {
            End::Graceful => {
                // Bounded by the handlers themselves; shutdown cuts it short.
                tokio::select! {
                    () = async { while handlers.join_next().await.is_some() {} } => {}
                    () = self.shutdown.cancelled() => handlers.abort_all(),
                }
            }
            End::Abort => handlers.abort_all(),
        }
        drop(handlers);
        drop(tx);
        // The writer drains what is queued, then shuts the socket down.
        let _ = writer.await;
        self.metrics.connections_open.dec();
    }

    fn bad_frame(&self, reason: &'static str, detail: &str) {
        tracing::warn!(peer = %self.peer, reason, detail, "closing connection after a bad frame");
        self.metrics
            .bad_frames
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

enum Next {
    Frame(crate::frame::Frame),
    Eof,
    Idle,
    Error(FrameError),
}

async fn next_frame(
    frames: &mut FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
    idle_timeout: Option<Duration>,
) -> Next {
    let next = match idle_timeout {
        None => frames.next().await,
        Some(timeout) => match tokio::time::timeout(timeout, frames.next()).await {
            Ok(next) => next,
            Err(_) => return Next::Idle,
        },
    };
    match next {
        None => Next::Eof,
        Some(Ok(frame)) => Next::Frame(frame),
        Some(Err(error)) => Next::Error(error),
    }
}

/// Write encoded frames, batching small ones: flush only when the queue is
/// momentarily empty. Large frames bypass the buffer (no extra copy).
pub(crate) async fn write_frames(
    write_half: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Bytes>,
) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(64 * 1024, write_half);
    while let Some(frame) = rx.recv().await {
        out.write_all(&frame).await?;
        if rx.is_empty() {
            out.flush().await?;
        }
    }
    out.flush().await?;
    out.shutdown().await
}

/// Waits up to `bound` for a daemon's tasks to end after its shutdown token
/// fired (every task watches it), then aborts the stragglers with a warning.
/// Returns whether they all ended by themselves.
pub async fn drain_tasks<T: 'static>(tasks: &mut tokio::task::JoinSet<T>, bound: Duration) -> bool {
    let drained = tokio::time::timeout(bound, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_ok();
    if !drained {
        tracing::warn!(
            ?bound,
            left = tasks.len(),
            "tasks still running after shutdown; abandoning them"
        );
        tasks.abort_all();
    }
    drained
}

/// Binds `address` for one network, retrying every `retry_interval` until it
/// is bound or `shutdown` fires (then `None`). A daemon runs one of these per
/// network, so an address that cannot be bound yet (interface not up, port
/// still held) costs that network only: the other keeps serving. The first
/// failure is logged, and so is the eventual success.
pub async fn bind_with_retry(
    network: &str,
    address: SocketAddr,
    retry_interval: Duration,
    shutdown: &CancellationToken,
) -> Option<TcpListener> {
    let mut logged = false;
    loop {
        match TcpListener::bind(address).await {
            Ok(listener) => {
                if logged {
                    tracing::info!(network, %address, "network address bound after retrying");
                }
                return Some(listener);
            }
            Err(error) => {
                if !logged {
                    tracing::error!(network, %address, %error, "cannot bind network address; serving on the other network and retrying");
                    logged = true;
                }
                tokio::select! {
                    () = tokio::time::sleep(retry_interval) => {}
                    () = shutdown.cancelled() => return None,
                }
            }
        }
    }
}
