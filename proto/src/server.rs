//! Accepting side of the protocol: one task per connection, requests
//! answered concurrently, responses possibly out of order.
//!
//! ```text
//!            connection task (the only task a request runs in)
//! socket ─read─▶ decode ─▶ Ping? ─▶ Pong ───────────────────────┐
//!                  │       request: handler future ─▶ in-flight set
//!                  │                (FuturesUnordered, polled here)
//!                  │                      │ done: encode ─▶ outgoing queue
//!                  ▼                                              ▼
//!         bad frame / response-kind         one vectored write of every
//!         ⇒ warn, count, close              response ready ─▶ socket
//! ```
//!
//! * Run to completion: a request is read, decoded, handled (down to the
//!   device submit) and its response encoded and written by the
//!   connection's task, with no spawn and no channel on its way (each
//!   hand-off between tasks or threads cost a wake-up, which dominated the
//!   CPU per request on few shared cores). Pipelined requests of one
//!   connection still proceed concurrently inside the in-flight set, and
//!   responses leave as they complete.
//! * At most `max_in_flight_per_connection` requests are handled or
//!   waiting for the socket per connection; beyond that the task stops
//!   reading, so TCP flow control pushes back on the peer instead of
//!   memory growing.
//! * Every response carries the RESPONSE flag and the request's id.
//! * Any [`FrameError`] (bad magic, checksum, unknown kind, ...) or a
//!   response-kind message sent as a request means the peer is broken or
//!   the stream is corrupt: the connection is logged, counted and closed
//!   (in-flight handler calls are dropped, or finished with their
//!   responses discarded under `finish_abandoned_requests`; the socket is
//!   shut down). Other connections are unaffected.
//! * `idle_timeout`: a connection with no frames received and nothing in
//!   flight for that long is closed.
//! * `shutdown` stops accepting and closes every connection.
//! * **Control connections** (`control_runtime`): a connection whose first
//!   request (Pings aside) is a control-plane one ([`Message::is_control`]:
//!   Raft RPCs, LCP requests) moves, socket and read buffer, to that
//!   runtime and is served there from then on. A head node gives its
//!   control plane's runtime (threads of their own, at a higher priority),
//!   so heartbeats and votes are read and answered even while the data
//!   path's workers are saturated: read on the data runtime, they waited
//!   behind data-path tasks for more than an election timeout on a loaded
//!   box (measured: `bench/raft-term.sh`). Raft links carry only control
//!   requests, so the first one decides for the connection's lifetime.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
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
    /// When a connection breaks (I/O error, bad frame), let its in-flight
    /// handler calls run to completion (responses discarded) instead of
    /// dropping them, for handlers whose mutations must not stop halfway
    /// (default: drop them). Shutdown drops them either way.
    pub finish_abandoned_requests: bool,
    /// Where control connections are served (module docs; default: the
    /// accepting runtime, like every other connection).
    pub control_runtime: Option<tokio::runtime::Handle>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_in_flight_per_connection: 256,
            idle_timeout: None,
            finish_abandoned_requests: false,
            control_runtime: None,
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
    /// A control connection: continue on the control runtime with this
    /// first request (module docs).
    Handoff(tokio::runtime::Handle, Message, u64),
}

impl Connection {
    async fn run(self, stream: TcpStream) {
        self.metrics.connections_open.inc();
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(peer = %self.peer, %error, "set_nodelay failed");
        }
        self.serve(stream, bytes::BytesMut::new(), Vec::new()).await;
    }

    /// Moves the connection to `runtime` (module docs): the socket, the
    /// first request and those read behind it, and the bytes of a frame
    /// not read whole yet.
    fn hand_off(
        self,
        runtime: tokio::runtime::Handle,
        frames: FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
        write_half: OwnedWriteHalf,
        first: (Message, u64),
    ) {
        // Complete frames already read are decoded here: a new reader
        // decodes its buffer only after its next socket read, which may
        // never come (the peer waits for these answers).
        let mut buffered = frames.read_buffer().clone();
        let mut requests = vec![first];
        loop {
            let frame = match tokio_util::codec::Decoder::decode(&mut FrameCodec, &mut buffered) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(error) => {
                    self.bad_frame(error.label(), &error.to_string());
                    self.metrics.connections_open.dec();
                    return;
                }
            };
            match Message::from_frame(&frame) {
                Ok(request) if !request.is_response() => {
                    requests.push((request, frame.header.request_id));
                }
                Ok(response) => {
                    self.bad_frame(
                        "response_as_request",
                        &format!("kind {:#06x} sent as a request", response.kind()),
                    );
                    self.metrics.connections_open.dec();
                    return;
                }
                Err(error) => {
                    self.bad_frame(error.label(), &error.to_string());
                    self.metrics.connections_open.dec();
                    return;
                }
            }
        }
        let stream = frames
            .into_inner()
            .reunite(write_half)
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|stream| stream.into_std());
        let stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(peer = %self.peer, %error, "cannot move a control connection");
                self.metrics.connections_open.dec();
                return;
            }
        };
        let mut config = self.config.clone();
        config.control_runtime = None;
        let connection = Connection { config, ..self };
        runtime.spawn(async move {
            // Registered with this runtime's reactor from here on.
            match TcpStream::from_std(stream) {
                Ok(stream) => connection.serve(stream, buffered, requests).await,
                Err(error) => {
                    tracing::debug!(peer = %connection.peer, %error, "cannot move a control connection");
                    connection.metrics.connections_open.dec();
                }
            }
        });
    }

    /// The handler's future for one request, answering with its frame.
    fn dispatch(&self, request: Message, request_id: u64) -> BoxFuture<'static, Option<Bytes>> {
        self.metrics.requests.inc();
        let response = self.handler.handle(request);
        let peer = self.peer.clone();
        Box::pin(async move {
            let response = response.await;
            if !response.is_response() {
                tracing::error!(%peer, kind = response.kind(), "handler returned a request-kind message; dropped");
                return None;
            }
            match response.try_to_frame(request_id, true) {
                Ok(frame) => Some(frame),
                Err(error) => {
                    tracing::error!(%peer, %error, "response does not fit a frame; dropped");
                    None
                }
            }
        })
    }

    async fn serve(self, stream: TcpStream, buffered: bytes::BytesMut, first: Vec<(Message, u64)>) {
        let (read_half, mut write_half) = stream.into_split();
        let max_in_flight = self.config.max_in_flight_per_connection.max(1);
        let mut handlers: FuturesUnordered<BoxFuture<'static, Option<Bytes>>> =
            FuturesUnordered::new();
        let mut out = Outgoing::default();
        let mut frames = FramedRead::new(read_half, FrameCodec);
        if !buffered.is_empty() {
            *frames.read_buffer_mut() = buffered;
        }
        for (request, request_id) in first {
            match request {
                Message::Ping { nonce } => {
                    out.push(Message::Pong { nonce }.to_frame(request_id, true))
                }
                request => handlers.push(self.dispatch(request, request_id)),
            }
        }
        // Whether the connection's first request (Pings aside) was seen:
        // only it can move the connection.
        let mut placed = self.config.control_runtime.is_none();

        let end = loop {
            let next = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break End::Abort,
                // Every response that is ready is collected before the write
                // branch runs, so they leave in one vectored write.
                Some(response) = handlers.next(), if !handlers.is_empty() => {
                    if let Some(frame) = response {
                        out.push(frame);
                    }
                    continue;
                }
                written = out.write_to(&mut write_half), if !out.is_empty() => {
                    if let Err(error) = written {
                        tracing::debug!(peer = %self.peer, %error, "connection write failed");
                        break End::Abort;
                    }
                    continue;
                }
                next = next_frame(&mut frames, self.config.idle_timeout), if handlers.len() + out.len() < max_in_flight => next,
            };
            let frame = match next {
                Next::Frame(frame) => frame,
                Next::Eof => break End::Graceful,
                Next::Idle => {
                    if handlers.is_empty() && out.is_empty() {
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
                out.push(Message::Pong { nonce }.to_frame(request_id, true));
                continue;
            }
            if !placed {
                placed = true;
                if let Some(runtime) = self.config.control_runtime.clone() {
                    if request.is_control() && handlers.is_empty() {
                        break End::Handoff(runtime, request, request_id);
                    }
                }
            }
            // Run to completion: the handler's future is polled by this task
            // (decode, handle, device submit, encode, write without a hand-off
            // to another task); requests of one connection still proceed
            // concurrently inside `handlers`.
            handlers.push(self.dispatch(request, request_id));
        };
        let end = match end {
            End::Handoff(runtime, request, request_id) => {
                // Pongs already queued leave first, from here.
                if out.write_all_to(&mut write_half).await.is_err() {
                    self.metrics.connections_open.dec();
                    return;
                }
                self.hand_off(runtime, frames, write_half, (request, request_id));
                return;
            }
            end => end,
        };
        drop(frames);
        let finish = match end {
            End::Graceful => true,
            End::Abort => self.config.finish_abandoned_requests && !self.shutdown.is_cancelled(),
            End::Handoff(..) => false,
        };
        if finish {
            // Bounded by the handlers themselves; shutdown cuts it short.
            // After an abort the responses have nowhere to go: dropped.
            let keep = matches!(end, End::Graceful);
            tokio::select! {
                () = async {
                    while let Some(response) = handlers.next().await {
                        if let (true, Some(frame)) = (keep, response) {
                            out.push(frame);
                        }
                    }
                } => {}
                () = self.shutdown.cancelled() => {}
            }
            if keep {
                let _ = out.write_all_to(&mut write_half).await;
            }
        }
        drop(handlers);
        let _ = write_half.shutdown().await;
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

/// Encoded responses waiting for the socket, written with vectored writes.
#[derive(Default)]
struct Outgoing {
    frames: VecDeque<Bytes>,
}

/// Frames per vectored write (well under IOV_MAX).
const MAX_IOVECS: usize = 64;

impl Outgoing {
    fn push(&mut self, frame: Bytes) {
        if !frame.is_empty() {
            self.frames.push_back(frame);
        }
    }

    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    fn len(&self) -> usize {
        self.frames.len()
    }

    /// One vectored write of the queued frames (cancel-safe: the queue only
    /// advances by what the kernel took).
    async fn write_to(&mut self, socket: &mut OwnedWriteHalf) -> io::Result<()> {
        let slices: Vec<IoSlice<'_>> = self
            .frames
            .iter()
            .take(MAX_IOVECS)
            .map(|frame| IoSlice::new(frame))
            .collect();
        let mut written = socket.write_vectored(&slices).await?;
        drop(slices);
        if written == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        while written > 0 {
            let Some(front) = self.frames.front_mut() else {
                break;
            };
            if written >= front.len() {
                written -= front.len();
                self.frames.pop_front();
            } else {
                let _ = front.split_to(written);
                written = 0;
            }
        }
        Ok(())
    }

    async fn write_all_to(&mut self, socket: &mut OwnedWriteHalf) -> io::Result<()> {
        while !self.is_empty() {
            self.write_to(socket).await?;
        }
        Ok(())
    }
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
