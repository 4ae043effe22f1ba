//! [`PeerLink`]: one peer reached over network A and network B.
//!
//! ```text
//! call(request) ─▶ pick path (A unless A is Down) ─▶ attempt ─ok─▶ response
//!                                                      │fail: mark path failure
//!                        not sent (connect failed) or idempotent?
//!                              yes ─▶ attempt on the other path (once)
//!                              no  ─▶ Uncertain (outcome unknown)
//! prober: every probe_interval, Ping each path (probe_timeout) that
//!         answered no request within the last probe_interval;
//!         Down after failures_before_down consecutive failures, Up on one success.
//! ```
//!
//! * Each path has at most one multiplexed TCP connection, connected lazily
//!   on first use and again on the next use after it failed. Requests get
//!   a link-wide unique id; a pending map `request_id -> oneshot` is
//!   completed by the connection's reader task. When the connection fails
//!   (I/O error, EOF, bad frame) every pending request on it fails at once.
//! * **Syscalls per wake-up, not per frame.** The connection's writer task
//!   sends every frame queued while it slept in one `writev` (frames are
//!   not copied into a staging buffer), and its reader takes up to 64 KiB
//!   per `read` ([`crate::server`] does the same on the accepting side):
//!   a burst of pipelined 4 KiB requests or answers costs one syscall each
//!   way, not one per frame.
//! * A path failure is not a peer failure: [`LinkError::Unreachable`] is
//!   returned only when both paths failed. Callers (failure detectors)
//!   must treat the peer as down only on `Unreachable`.
//! * A request that may have reached the peer (sent, then I/O error or
//!   timeout) is retried on the other path only if it is idempotent;
//!   otherwise the caller gets [`LinkError::Uncertain`] and must reconcile.
//! * A probe timeout (or a probe failure that marks the path Down) drops
//!   the path's connection and fails the requests waiting on it: a half-dead
//!   (blackholed) connection is replaced rather than trusted, and its
//!   idempotent requests move to the other path within a probe timeout
//!   instead of each waiting out its request timeout. A single request
//!   timeout does not drop the connection: one slow request says little.
//! * With [`LinkConfig::tls`] (a head node's host port) every connection
//!   runs a TLS handshake right after connect, checking the server's
//!   certificate against the CA given and the path's IP address, before any
//!   frame is sent: a failed one is "not sent" like a failed connect, and
//!   the link never falls back to plain TCP. Frames then flow inside TLS;
//!   the reader and writer tasks are the same generic code as on plain TCP
//!   (whose halves stay `TcpStream::into_split`'s).
//! * **Probes only where traffic is silent.** An answered request shows as
//!   much as a Pong, so a path that answered a request within the last
//!   probe interval is not pinged at that tick (a busy link sends no pings;
//!   an idle one pings as before). Detection does not wait longer: a
//!   refused or failed request marks the path at once, as before, and a
//!   path whose requests stop being answered (black-holed, a stalled peer)
//!   is pinged again at most one interval after its last answer. Probes
//!   themselves do not count as traffic, so an idle link pings every
//!   interval.
//! * The prober holds only a weak reference: it stops when the last
//!   `Arc<PeerLink>` is dropped, or on [`PeerLink::close`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthCodec, Credential, FrameMac};
use crate::message::Message;
use crate::server::{write_frames, READ_BUFFER_BYTES};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PathId {
    A,
    B,
}

impl PathId {
    pub fn other(self) -> PathId {
        match self {
            PathId::A => PathId::B,
            PathId::B => PathId::A,
        }
    }

    fn index(self) -> usize {
        match self {
            PathId::A => 0,
            PathId::B => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PathId::A => "a",
            PathId::B => "b",
        }
    }
}

impl std::fmt::Display for PathId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// TCP connect timeout per attempt (default 1 s).
    pub connect_timeout: Duration,
    /// Wait for one response on one path (default 5 s).
    pub request_timeout: Duration,
    /// Time between probes of each path (default 500 ms).
    pub probe_interval: Duration,
    /// Wait for a probe's Pong (default 1 s).
    pub probe_timeout: Duration,
    /// Consecutive failures that mark a path Down (default 2).
    pub failures_before_down: u32,
    /// Authenticate every connection with this credential ([`crate::auth`];
    /// the unit port requires it). `None`: plain frames (a head node's host
    /// port, tests).
    pub auth: Option<Arc<Credential>>,
    /// TLS on every connection (module docs; a head node's host port when
    /// it has a certificate). `None`: plain TCP.
    pub tls: Option<LinkTls>,
}

/// TLS on a link's connections: the server's certificate must chain to a
/// CA the connector trusts and name the IP address of the path.
#[derive(Clone)]
pub struct LinkTls {
    pub connector: tokio_rustls::TlsConnector,
}

impl LinkTls {
    /// Trusting the CA certificates of the PEM file `ca`.
    pub fn from_ca_file(ca: &std::path::Path) -> Result<LinkTls, crate::tls::TlsError> {
        Ok(LinkTls {
            connector: crate::tls::connector(ca)?,
        })
    }

    /// Trusting the CA certificates of PEM text (the unit CA an attachment
    /// carries); `origin` names it in errors.
    pub fn from_ca_pem(
        pem: &[u8],
        origin: &std::path::Path,
    ) -> Result<LinkTls, crate::tls::TlsError> {
        Ok(LinkTls {
            connector: crate::tls::connector_from_pem(pem, origin)?,
        })
    }
}

impl std::fmt::Debug for LinkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkTls").finish_non_exhaustive()
    }
}

impl Default for LinkConfig {
    fn default() -> LinkConfig {
        LinkConfig {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            probe_interval: Duration::from_millis(500),
            probe_timeout: Duration::from_secs(1),
            failures_before_down: 2,
            auth: None,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathState {
    Up,
    Down,
    /// No probe or request has completed yet.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathStatus {
    pub path: PathId,
    pub address: SocketAddr,
    pub state: PathState,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub last_rtt_us: Option<u64>,
    /// Since when the path is Down (`None` unless Down). Kept by the link,
    /// which lives as long as the process: a failure detector that starts
    /// late (a new Raft leader) sees how long the silence already lasts.
    pub down_since: Option<Instant>,
    /// Since when every failure of this path was an actively refused
    /// connection (`ECONNREFUSED`: the peer's host answers, but nothing
    /// listens — the process is gone). `None` after any success or any other
    /// kind of failure (timeouts, resets). A stalled but live process still
    /// accepts connections (its kernel does), so it is never "refused".
    pub refused_since: Option<Instant>,
    /// Whether this path has ever been Up since the link was made. A path
    /// that never was says nothing about a peer going away — the peer may
    /// simply not have started yet (a whole unit restarting).
    pub ever_up: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// Both paths failed; `errors` holds each path's last error.
    #[error("peer {peer} unreachable on both paths: {errors:?}")]
    Unreachable {
        peer: String,
        errors: Vec<(PathId, String)>,
    },
    /// The last attempt (on `path`) got no answer in time. Only for
    /// idempotent requests, which are safe to send again.
    #[error("peer {peer}: request timed out on path {path}")]
    Timeout { peer: String, path: PathId },
    /// A non-idempotent request may or may not have been executed.
    #[error("peer {peer}: outcome unknown after failure on path {path}: {reason}")]
    Uncertain {
        peer: String,
        path: PathId,
        reason: String,
    },
    /// The peer answered something that is not a valid answer, or the
    /// request cannot be sent (not a request, too large).
    #[error("peer {peer}: protocol error: {reason}")]
    Protocol { peer: String, reason: String },
    /// A plain-TCP connection got the TLS alert a TLS-only listener sends
    /// ([`crate::server::TLS_REQUIRED_ALERT`]): this link has no TLS
    /// ([`LinkConfig::tls`]) and the peer requires it.
    #[error("peer {peer}: {}", TLS_REQUIRED)]
    TlsRequired { peer: String },
    #[error("link closed")]
    Closed,
}

/// What a link without TLS says of a peer that requires it (a head node's
/// host port under `host_tls_required`, as `rackblock up` runs it).
pub const TLS_REQUIRED: &str =
    "host port requires TLS: pass --unit-ca FILE (or RACKBLOCK_UNIT_CA), \
     or use an attachment that carries the unit CA";

impl LinkError {
    /// Sending the same request again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            LinkError::Unreachable { .. } | LinkError::Timeout { .. }
        )
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    peer: String,
    path: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

type HistogramFamily = Family<PathLabels, Histogram, fn() -> Histogram>;

fn request_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Link metrics, shared by every `PeerLink` of a process (labelled by peer
/// and path). Cheap to clone.
#[derive(Debug, Clone)]
pub struct LinkMetrics {
    path_up: Family<PathLabels, Gauge>,
    path_failures: Family<PathLabels, Counter>,
    failovers: Family<PeerLabels, Counter>,
    request_seconds: HistogramFamily,
}

impl LinkMetrics {
    /// Register `rackblock_link_path_up{peer,path}`,
    /// `rackblock_link_path_failures_total{peer,path}`,
    /// `rackblock_link_failovers_total{peer}` and
    /// `rackblock_link_request_seconds{peer,path}`.
    pub fn new(registry: &mut Registry) -> LinkMetrics {
        let metrics = LinkMetrics::unregistered();
        registry.register(
            "rackblock_link_path_up",
            "1 if the path is up, else 0",
            metrics.path_up.clone(),
        );
        registry.register(
            "rackblock_link_path_failures",
            "Failed requests and probes per path",
            metrics.path_failures.clone(),
        );
        registry.register(
            "rackblock_link_failovers",
            "Requests retried on the other path",
            metrics.failovers.clone(),
        );
        registry.register(
            "rackblock_link_request_seconds",
            "Latency of successful requests per path",
            metrics.request_seconds.clone(),
        );
        metrics
    }

    /// Not registered anywhere (tests).
    pub fn unregistered() -> LinkMetrics {
        LinkMetrics {
            path_up: Family::default(),
            path_failures: Family::default(),
            failovers: Family::default(),
            request_seconds: Family::new_with_constructor(request_histogram as fn() -> Histogram),
        }
    }

    pub fn failovers_total(&self, peer: &str) -> u64 {
        self.failovers
            .get_or_create(&PeerLabels {
                peer: peer.to_owned(),
            })
            .get()
    }

    pub fn path_failures_total(&self, peer: &str, path: PathId) -> u64 {
        self.path_failures
            .get_or_create(&PathLabels {
                peer: peer.to_owned(),
                path: path.as_str(),
            })
            .get()
    }
}

/// Why one attempt on one path failed.
#[derive(Debug)]
enum AttemptError {
    /// The request never left this process (connect failed, connection
    /// already dead before sending): safe to send elsewhere.
    NotSent(String),
    /// The connection was actively refused (nothing listens at the
    /// address): not sent, like `NotSent`, and evidence the peer is gone.
    Refused(String),
    /// Sent (or possibly sent), then the connection failed.
    Lost(String),
    Timeout,
    Protocol(String),
    /// The peer answered plain TCP with a TLS alert: it requires TLS
    /// ([`TLS_REQUIRED`]). Not worth retrying on either path.
    TlsRequired,
}

impl AttemptError {
    fn describe(&self) -> String {
        match self {
            AttemptError::NotSent(reason)
            | AttemptError::Refused(reason)
            | AttemptError::Lost(reason)
            | AttemptError::Protocol(reason) => reason.clone(),
            AttemptError::Timeout => "timeout".to_owned(),
            AttemptError::TlsRequired => TLS_REQUIRED.to_owned(),
        }
    }
}

/// Why a connect attempt failed.
#[derive(Debug, Clone)]
struct ConnectError {
    reason: String,
    /// `ECONNREFUSED`: nothing listens at the address.
    refused: bool,
}

impl ConnectError {
    fn to_attempt_error(&self) -> AttemptError {
        if self.refused {
            AttemptError::Refused(self.reason.clone())
        } else {
            AttemptError::NotSent(self.reason.clone())
        }
    }
}

type Waiter = oneshot::Sender<Result<Message, AttemptError>>;

/// The first bytes of [`crate::server::TLS_REQUIRED_ALERT`] (an alert
/// record of TLS 1.2/1.3).
const TLS_ALERT_PREFIX: [u8; 3] = [0x15, 0x03, 0x03];

/// Pending requests of one connection; `None` once the connection failed.
#[derive(Debug, Default)]
struct ConnectionShared {
    pending: Mutex<Option<HashMap<u64, Waiter>>>,
    dead: AtomicBool,
}

impl ConnectionShared {
    fn fail(&self, reason: &str) {
        self.fail_with(|| AttemptError::Lost(reason.to_owned()));
    }

    fn fail_with(&self, error: impl Fn() -> AttemptError) {
        self.dead.store(true, Ordering::Release);
        let pending = lock(&self.pending).take();
        for (_, waiter) in pending.into_iter().flatten() {
            let _ = waiter.send(Err(error()));
        }
    }

    fn forget(&self, request_id: u64) {
        if let Some(map) = lock(&self.pending).as_mut() {
            map.remove(&request_id);
        }
    }
}

#[derive(Debug)]
struct Connection {
    shared: Arc<ConnectionShared>,
    tx: mpsc::Sender<Bytes>,
    tasks: [AbortHandle; 2],
}

impl Drop for Connection {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.shared.fail("connection dropped");
    }
}

impl Connection {
    async fn open(
        address: SocketAddr,
        timeout: Duration,
        auth: Option<&Credential>,
        tls: Option<&LinkTls>,
    ) -> Result<Connection, ConnectError> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                return Err(ConnectError {
                    reason: format!("connect {address}: {error}"),
                    refused: error.kind() == std::io::ErrorKind::ConnectionRefused,
                })
            }
            Err(_) => {
                return Err(ConnectError {
                    reason: format!("connect {address}: timed out after {timeout:?}"),
                    refused: false,
                })
            }
        };
        let _ = stream.set_nodelay(true);
        // Closing a connection aborts it (RST) and discards unsent bytes: a
        // request we gave up on (and maybe resent on the other path) must not
        // trickle out later when a blackholed path heals.
        let _ = stream.set_zero_linger();
        match tls {
            None => {
                let mut stream = stream;
                let macs = Connection::authenticate(&mut stream, address, timeout, auth).await?;
                let (read_half, write_half) = stream.into_split();
                Ok(Connection::spawn(read_half, write_half, macs))
            }
            Some(tls) => {
                // Bounded like the connect; no frame before it is done, and
                // no plain-TCP fallback (module docs).
                let name = address.ip().to_string();
                let handshake = crate::tls::connect(&tls.connector, &name, stream);
                let mut stream = match tokio::time::timeout(timeout, handshake).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        return Err(ConnectError {
                            reason: format!("TLS with {address}: {error}"),
                            refused: false,
                        })
                    }
                    Err(_) => {
                        return Err(ConnectError {
                            reason: format!("TLS with {address}: no handshake within {timeout:?}"),
                            refused: false,
                        })
                    }
                };
                let macs = Connection::authenticate(&mut stream, address, timeout, auth).await?;
                let (read_half, write_half) = tokio::io::split(stream);
                Ok(Connection::spawn(read_half, write_half, macs))
            }
        }
    }

    /// The unit-port handshake when `auth` is given: the MAC states of
    /// both directions.
    async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
        stream: &mut S,
        address: SocketAddr,
        timeout: Duration,
        auth: Option<&Credential>,
    ) -> Result<(Option<FrameMac>, Option<FrameMac>), ConnectError> {
        // Nothing is sent before the handshake: a refused one is "not sent".
        match auth {
            None => Ok((None, None)),
            // Bounded like the connect: a peer that accepts and then stays
            // silent must not hold the path for the handshake's own bound.
            Some(credential) => match tokio::time::timeout(
                timeout,
                crate::auth::client_handshake(stream, credential),
            )
            .await
            .unwrap_or(Err(crate::auth::AuthError::Timeout(timeout)))
            {
                Ok(done) => Ok(done.macs()),
                Err(error) => Err(ConnectError {
                    reason: format!("authenticate with {address}: {error}"),
                    refused: false,
                }),
            },
        }
    }

    /// The reader and writer tasks of a connection over these halves.
    fn spawn<R, W>(
        read_half: R,
        write_half: W,
        (send_mac, receive_mac): (Option<FrameMac>, Option<FrameMac>),
    ) -> Connection
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(ConnectionShared {
            pending: Mutex::new(Some(HashMap::new())),
            dead: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel::<Bytes>(1024);
        let writer_shared = shared.clone();
        let writer = tokio::spawn(async move {
            let result = write_frames(write_half, rx, send_mac).await;
            let reason = match result {
                Ok(()) => "connection closed".to_owned(),
                Err(error) => format!("write: {error}"),
            };
            writer_shared.fail(&reason);
        });
        let reader_shared = shared.clone();
        let reader = tokio::spawn(async move {
            let mut frames = FramedRead::with_capacity(
                read_half,
                AuthCodec::new(receive_mac),
                READ_BUFFER_BYTES,
            );
            let reason = loop {
                let frame = match frames.next().await {
                    None => break "connection closed by peer".to_owned(),
                    Some(Err(_)) if frames.read_buffer().starts_with(&TLS_ALERT_PREFIX) => {
                        // A TLS-only listener's refusal of plain TCP (no
                        // frame starts with 0x15): say so, not "closed".
                        reader_shared.fail_with(|| AttemptError::TlsRequired);
                        return;
                    }
                    Some(Err(error)) => break format!("read: {error}"),
                    Some(Ok(frame)) => frame,
                };
                let request_id = frame.header.request_id;
                let waiter = lock(&reader_shared.pending)
                    .as_mut()
                    .and_then(|map| map.remove(&request_id));
                let result = match Message::from_frame(&frame) {
                    Ok(message) if message.is_response() => Ok(message),
                    Ok(message) => Err(format!(
                        "peer sent request kind {:#06x} on a client connection",
                        message.kind()
                    )),
                    Err(error) => Err(format!("bad frame from peer: {error}")),
                };
                match result {
                    Ok(message) => {
                        // No waiter: it timed out already; drop the late answer.
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(Ok(message));
                        }
                    }
                    Err(reason) => {
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(Err(AttemptError::Protocol(reason.clone())));
                        }
                        break reason;
                    }
                }
            };
            reader_shared.fail(&reason);
        });
        Connection {
            shared,
            tx,
            tasks: [reader.abort_handle(), writer.abort_handle()],
        }
    }

    fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::Acquire)
    }

    /// Send one request frame and wait for its response.
    async fn request(
        &self,
        request_id: u64,
        frame: Bytes,
        timeout: Duration,
    ) -> Result<Message, AttemptError> {
        let (waiter, response) = oneshot::channel();
        match lock(&self.shared.pending).as_mut() {
            Some(map) => {
                map.insert(request_id, waiter);
            }
            None => {
                return Err(AttemptError::NotSent(
                    "connection already failed".to_owned(),
                ))
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let sent = tokio::time::timeout_at(deadline, self.tx.send(frame)).await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                self.shared.forget(request_id);
                return Err(AttemptError::NotSent(
                    "connection writer stopped".to_owned(),
                ));
            }
            Err(_) => {
                // Still queued locally, never written: not sent. Dropping
                // the send future removed it from the queue.
                self.shared.forget(request_id);
                return Err(AttemptError::Timeout);
            }
        }
        match tokio::time::timeout_at(deadline, response).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AttemptError::Lost("connection dropped".to_owned())),
            Err(_) => {
                self.shared.forget(request_id);
                Err(AttemptError::Timeout)
            }
        }
    }
}

#[derive(Debug)]
struct Health {
    state: PathState,
    last_error: Option<String>,
    consecutive_failures: u32,
    last_rtt_us: Option<u64>,
    down_since: Option<Instant>,
    refused_since: Option<Instant>,
    ever_up: bool,
    /// When a request (not a probe) on this path was last answered: the
    /// prober skips a path that answered traffic within the last probe
    /// interval (module docs).
    last_answer: Option<Instant>,
}

#[derive(Debug)]
struct Path {
    id: PathId,
    address: SocketAddr,
    /// Held across connect so concurrent callers share one attempt.
    connection: tokio::sync::Mutex<ConnectionSlot>,
    health: Mutex<Health>,
    labels: PathLabels,
}

#[derive(Debug, Default)]
struct ConnectionSlot {
    connection: Option<Arc<Connection>>,
    /// When the last connect attempt failed, and why: callers that queued
    /// behind that attempt fail fast instead of each waiting a timeout.
    last_connect_failure: Option<(Instant, ConnectError)>,
}

/// Connections to one peer over network A and network B.
#[derive(Debug)]
pub struct PeerLink {
    peer: String,
    paths: [Path; 2],
    config: LinkConfig,
    metrics: LinkMetrics,
    next_request_id: AtomicU64,
    closed: CancellationToken,
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

impl PeerLink {
    /// Create the link and spawn its prober (needs a tokio runtime). No
    /// connection is made until a call or probe needs one.
    pub fn new(
        peer: String,
        address_a: SocketAddr,
        address_b: SocketAddr,
        config: LinkConfig,
        metrics: LinkMetrics,
    ) -> Arc<PeerLink> {
        let path = |id: PathId, address| Path {
            id,
            address,
            connection: tokio::sync::Mutex::new(ConnectionSlot::default()),
            health: Mutex::new(Health {
                state: PathState::Unknown,
                last_error: None,
                consecutive_failures: 0,
                last_rtt_us: None,
                down_since: None,
                refused_since: None,
                ever_up: false,
                last_answer: None,
            }),
            labels: PathLabels {
                peer: peer.clone(),
                path: id.as_str(),
            },
        };
        let link = Arc::new(PeerLink {
            paths: [path(PathId::A, address_a), path(PathId::B, address_b)],
            peer,
            config,
            metrics,
            next_request_id: AtomicU64::new(1),
            closed: CancellationToken::new(),
        });
        for path in &link.paths {
            link.metrics.path_up.get_or_create(&path.labels).set(0);
            drop(link.metrics.path_failures.get_or_create(&path.labels));
        }
        // Every series of this peer shows from the start, at zero (a
        // dashboard's rate() over it has data before the first failover).
        drop(link.metrics.failovers.get_or_create(&PeerLabels {
            peer: link.peer.clone(),
        }));
        tokio::spawn(probe_loop(
            Arc::downgrade(&link),
            link.closed.clone(),
            link.config.probe_interval,
        ));
        link
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Send `request` and wait for its response, failing over to the other
    /// path as described in the module docs. `idempotent` says whether the
    /// request may be executed twice (see [`Message::is_idempotent`]).
    pub async fn call(&self, request: Message, idempotent: bool) -> Result<Message, LinkError> {
        if self.closed.is_cancelled() {
            return Err(LinkError::Closed);
        }
        if request.is_response() {
            return Err(self.protocol(format!("kind {:#06x} is not a request", request.kind())));
        }
        let first = if self.path(PathId::A).state() != PathState::Down {
            PathId::A
        } else {
            PathId::B
        };
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let frame = request
            .try_to_frame(request_id, false)
            .map_err(|error| self.protocol(error.to_string()))?;

        let first_error = match self
            .attempt(
                first,
                request_id,
                frame.clone(),
                self.config.request_timeout,
            )
            .await
        {
            Ok(response) => return Ok(response),
            Err(error) => error,
        };
        let retry = match &first_error {
            AttemptError::Protocol(reason) => return Err(self.protocol(reason.clone())),
            AttemptError::TlsRequired => return Err(self.tls_required()),
            AttemptError::NotSent(_) | AttemptError::Refused(_) => true,
            AttemptError::Lost(_) | AttemptError::Timeout => idempotent,
        };
        if !retry {
            return Err(LinkError::Uncertain {
                peer: self.peer.clone(),
                path: first,
                reason: first_error.describe(),
            });
        }
        if self.closed.is_cancelled() {
            return Err(LinkError::Closed);
        }
        let second = first.other();
        // Every retry on the other path counts, including after a refused
        // connect (nothing was sent, but the traffic moved).
        self.metrics
            .failovers
            .get_or_create(&PeerLabels {
                peer: self.peer.clone(),
            })
            .inc();
        // A fresh id: a late answer on the first path must not be taken
        // for this one (ids are per connection anyway; this keeps logs clear).
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let frame = request
            .try_to_frame(request_id, false)
            .map_err(|error| self.protocol(error.to_string()))?;
        match self
            .attempt(second, request_id, frame, self.config.request_timeout)
            .await
        {
            Ok(response) => Ok(response),
            Err(AttemptError::Protocol(reason)) => Err(self.protocol(reason)),
            Err(AttemptError::TlsRequired) => Err(self.tls_required()),
            Err(AttemptError::Timeout) if idempotent => Err(LinkError::Timeout {
                peer: self.peer.clone(),
                path: second,
            }),
            Err(error @ (AttemptError::Lost(_) | AttemptError::Timeout)) if !idempotent => {
                Err(LinkError::Uncertain {
                    peer: self.peer.clone(),
                    path: second,
                    reason: error.describe(),
                })
            }
            Err(second_error) => Err(LinkError::Unreachable {
                peer: self.peer.clone(),
                errors: vec![
                    (first, first_error.describe()),
                    (second, second_error.describe()),
                ],
            }),
        }
    }

    /// Current health of both paths.
    pub fn paths(&self) -> [PathStatus; 2] {
        [self.paths[0].status(), self.paths[1].status()]
    }

    /// Stop the prober and drop both connections; later calls fail with
    /// [`LinkError::Closed`].
    pub fn close(&self) {
        self.closed.cancel();
        for path in &self.paths {
            if let Ok(mut slot) = path.connection.try_lock() {
                slot.connection = None;
            }
        }
    }

    fn path(&self, id: PathId) -> &Path {
        &self.paths[id.index()]
    }

    fn tls_required(&self) -> LinkError {
        LinkError::TlsRequired {
            peer: self.peer.clone(),
        }
    }

    fn protocol(&self, reason: String) -> LinkError {
        LinkError::Protocol {
            peer: self.peer.clone(),
            reason,
        }
    }

    /// One request on one path, with health and metrics bookkeeping.
    async fn attempt(
        &self,
        id: PathId,
        request_id: u64,
        frame: Bytes,
        timeout: Duration,
    ) -> Result<Message, AttemptError> {
        let path = self.path(id);
        let started = Instant::now();
        let result = self.exchange(path, request_id, frame, timeout);
        let result = tokio::select! {
            result = result => result,
            () = self.closed.cancelled() => return Err(AttemptError::NotSent("link closed".to_owned())),
        };
        match &result {
            Ok(_) => {
                let elapsed = started.elapsed();
                self.metrics
                    .request_seconds
                    .get_or_create(&path.labels)
                    .observe(elapsed.as_secs_f64());
                self.record_success(path, None);
                lock(&path.health).last_answer = Some(Instant::now());
            }
            Err(AttemptError::Timeout) => self.record_timeout(path),
            Err(error) => self.record_failure(path, error),
        }
        result
    }

    /// Connects `path` if need be and sends one request on it, all within
    /// `timeout`; no bookkeeping.
    async fn exchange(
        &self,
        path: &Path,
        request_id: u64,
        frame: Bytes,
        timeout: Duration,
    ) -> Result<Message, AttemptError> {
        let started = Instant::now();
        let connection = path
            .connect(
                self.config.connect_timeout.min(timeout),
                self.config.auth.as_deref(),
                self.config.tls.as_ref(),
            )
            .await?;
        let remaining = timeout.saturating_sub(started.elapsed());
        connection.request(request_id, frame, remaining).await
    }

    fn record_success(&self, path: &Path, rtt: Option<Duration>) {
        let mut health = lock(&path.health);
        health.consecutive_failures = 0;
        health.state = PathState::Up;
        health.down_since = None;
        health.refused_since = None;
        health.ever_up = true;
        if let Some(rtt) = rtt {
            health.last_rtt_us = Some(u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX));
        }
        self.metrics.path_up.get_or_create(&path.labels).set(1);
    }

    /// A request that timed out says the peer is slow, not that the path is
    /// broken (the prober decides that): it is counted, but does not move
    /// the path towards Down.
    fn record_timeout(&self, path: &Path) {
        lock(&path.health).last_error = Some("request timeout".to_owned());
        self.metrics.path_failures.get_or_create(&path.labels).inc();
    }

    fn record_failure(&self, path: &Path, error: &AttemptError) {
        let reason = error.describe();
        let now = Instant::now();
        let mut health = lock(&path.health);
        health.consecutive_failures = health.consecutive_failures.saturating_add(1);
        health.refused_since = match error {
            AttemptError::Refused(_) => Some(health.refused_since.unwrap_or(now)),
            _ => None,
        };
        if health.consecutive_failures >= self.config.failures_before_down.max(1) {
            if health.state != PathState::Down {
                tracing::warn!(peer = %self.peer, path = %path.id, %reason, "path down");
                health.down_since = Some(now);
            }
            health.state = PathState::Down;
            self.metrics.path_up.get_or_create(&path.labels).set(0);
        }
        health.last_error = Some(reason);
        self.metrics.path_failures.get_or_create(&path.labels).inc();
    }

    /// Ping one path; on timeout drop its connection (see module docs).
    /// A path whose traffic was answered within the last probe interval is
    /// not pinged: that answer already showed it works.
    async fn probe(&self, id: PathId) {
        let path = self.path(id);
        if path.answered_within(self.config.probe_interval) {
            return;
        }
        let timeout = self.config.probe_timeout;
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let nonce = request_id;
        let frame = Message::Ping { nonce }.to_frame(request_id, false);
        let started = Instant::now();
        let result = self.exchange(path, request_id, frame, timeout).await;
        match result {
            Ok(Message::Pong { nonce: echoed }) if echoed == nonce => {
                let was_down = path.state() == PathState::Down;
                self.record_success(path, Some(started.elapsed()));
                if was_down {
                    tracing::info!(peer = %self.peer, path = %id, "path up");
                }
            }
            Ok(other) => {
                self.record_failure(
                    path,
                    &AttemptError::Protocol(format!(
                        "probe answered with kind {:#06x}",
                        other.kind()
                    )),
                );
                path.drop_connection("probe answered with the wrong kind")
                    .await;
            }
            Err(error) => {
                self.record_failure(path, &error);
                // A probe that times out means the connection is silent
                // (blackholed network): requests in flight on it would each
                // wait out their own timeout before moving to the other path.
                if matches!(error, AttemptError::Timeout) || path.state() == PathState::Down {
                    path.drop_connection("path probe failed").await;
                }
            }
        }
    }
}

impl Path {
    fn state(&self) -> PathState {
        lock(&self.health).state
    }

    /// Whether a request on this path was answered within `interval`.
    fn answered_within(&self, interval: Duration) -> bool {
        lock(&self.health)
            .last_answer
            .is_some_and(|at| at.elapsed() < interval)
    }

    fn status(&self) -> PathStatus {
        let health = lock(&self.health);
        PathStatus {
            path: self.id,
            address: self.address,
            state: health.state,
            last_error: health.last_error.clone(),
            consecutive_failures: health.consecutive_failures,
            last_rtt_us: health.last_rtt_us,
            down_since: health.down_since,
            refused_since: health.refused_since,
            ever_up: health.ever_up,
        }
    }

    /// The live connection, connecting if there is none.
    async fn connect(
        &self,
        timeout: Duration,
        auth: Option<&Credential>,
        tls: Option<&LinkTls>,
    ) -> Result<Arc<Connection>, AttemptError> {
        let queued_at = Instant::now();
        let mut slot = self.connection.lock().await;
        if let Some(connection) = &slot.connection {
            if !connection.is_dead() {
                return Ok(connection.clone());
            }
            slot.connection = None;
        }
        if let Some((failed_at, error)) = &slot.last_connect_failure {
            if *failed_at >= queued_at {
                return Err(error.to_attempt_error());
            }
        }
        match Connection::open(self.address, timeout, auth, tls).await {
            Ok(connection) => {
                let connection = Arc::new(connection);
                slot.connection = Some(connection.clone());
                slot.last_connect_failure = None;
                Ok(connection)
            }
            Err(error) => {
                let attempt_error = error.to_attempt_error();
                slot.last_connect_failure = Some((Instant::now(), error));
                Err(attempt_error)
            }
        }
    }

    /// Forgets the path's connection and fails every request still waiting
    /// on it, so that idempotent ones move to the other path now instead of
    /// each waiting out its own request timeout.
    async fn drop_connection(&self, reason: &str) {
        let connection = self.connection.lock().await.connection.take();
        if let Some(connection) = connection {
            connection.shared.fail(reason);
        }
    }
}

async fn probe_loop(link: Weak<PeerLink>, closed: CancellationToken, interval: Duration) {
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = closed.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Some(link) = link.upgrade() else { return };
        tokio::select! {
            () = closed.cancelled() => return,
            _ = futures::future::join(link.probe(PathId::A), link.probe(PathId::B)) => {}
        }
    }
}

/// Lock a std mutex, tolerating poisoning (the data are plain counters and
/// maps that stay consistent across a panic elsewhere).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
