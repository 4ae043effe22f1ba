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
//! * [`Access`] says who may send what. `Authenticated` (the unit port)
//!   runs the [`crate::auth`] handshake before reading any frame (a peer
//!   that fails it is counted under `unauthenticated` and closed, no
//!   request handled), then checks the tag of every frame and seals every
//!   response; `Kinds` (a head node's host port) takes no handshake. Either
//!   refuses a request kind its policy does not allow for the peer: counted
//!   under `refused_kind`, connection closed, nothing handled.
//! * **Handshake caps** (unit port): at most `max_handshakes` connections
//!   of a listener are in their handshake at once, and at most
//!   `max_handshakes_per_peer` from one IP address; a connection beyond
//!   either is closed on accept, before a byte is read, and counted in
//!   `rackblock_server_handshakes_refused_total{reason="listener_cap"|"peer_cap"}`.
//!   The handshake itself is bounded by [`crate::auth::HANDSHAKE_TIMEOUT`],
//!   so a peer that opens connections and stays silent holds at most
//!   `max_handshakes_per_peer` slots for that long: members on other
//!   addresses still get in, and the unit's own links retry.
//! * **Connection caps** (`max_connections`, a head node's host port): at
//!   most `total` connections of a listener open at once, and `per_peer`
//!   from one IP address, whatever their state; one beyond either is
//!   closed on accept and counted in
//!   `rackblock_server_connections_refused_total{reason="listener_cap"|"peer_cap"}`.
//!   With `idle_timeout`, a host that opens connections and leaves them
//!   silent holds its share of the cap for that long, and no other
//!   address's. (A control connection handed off to `control_runtime`
//!   leaves the count; unit ports set no cap: their peers are members.)
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
//! * **TLS** (`tls`, a head node's host port): the connection's first byte
//!   says which it is (a TLS record starts with 0x16, a frame with the
//!   magic's 0x31): a TLS client gets a rustls handshake (bounded by
//!   [`TLS_HANDSHAKE_TIMEOUT`], under the same handshake caps as the unit
//!   port's), then frames flow inside TLS exactly as on plain TCP; a plain
//!   client is sent a TLS alert ([`TLS_REQUIRED_ALERT`], so a rackblock
//!   client can say "this port requires TLS") and closed, nothing of it
//!   decoded, when TLS is `required`, and
//!   served as before otherwise (a unit moving to TLS host by host). Every
//!   refusal is counted in
//!   `rackblock_server_tls_handshake_failures_total{reason="plaintext"|"handshake"|"timeout"}`.
//!   The connection code is generic over its stream ([`Transport`]): the
//!   plain-TCP path is the same monomorphic code as before TLS existed (no
//!   boxing, no dynamic dispatch per frame); a TLS stream is split with
//!   `tokio::io::split`, and never moves to the control runtime (only
//!   unit-port connections do, and those are not TLS).

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
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthCodec, Credential, FrameMac, Peer};
use crate::frame::FrameError;
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
    /// Who may connect and which request kinds each may send (default:
    /// anyone, anything).
    pub access: Access,
    /// Where control connections are served (module docs; default: the
    /// accepting runtime, like every other connection).
    pub control_runtime: Option<tokio::runtime::Handle>,
    /// `Authenticated` access: connections in their handshake at once
    /// (module docs: handshake caps; default 64).
    pub max_handshakes: usize,
    /// `Authenticated` access: of those, from one IP address (default 8).
    pub max_handshakes_per_peer: usize,
    /// TLS on this listener (module docs; default: none, plain TCP).
    pub tls: Option<ServerTls>,
    /// Connections open at once on this listener, and of those from one
    /// IP address (module docs: connection caps; default: no cap).
    pub max_connections: Option<ConnectionCaps>,
}

/// [`ServerConfig::max_connections`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCaps {
    pub total: usize,
    pub per_peer: usize,
}

/// TLS on a listener (module docs).
#[derive(Clone)]
pub struct ServerTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// Close plain-TCP connections instead of serving them.
    pub required: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

/// Bound of a server-side TLS handshake, from accept to its end (module
/// docs).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The first byte of a TLS record carrying a handshake message.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Default [`ServerConfig::max_handshakes`].
pub const DEFAULT_MAX_HANDSHAKES: usize = 64;
/// Default [`ServerConfig::max_handshakes_per_peer`].
pub const DEFAULT_MAX_HANDSHAKES_PER_PEER: usize = 8;

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_in_flight_per_connection: 256,
            idle_timeout: None,
            finish_abandoned_requests: false,
            control_runtime: None,
            access: Access::Open,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_peer: DEFAULT_MAX_HANDSHAKES_PER_PEER,
            tls: None,
            max_connections: None,
        }
    }
}

/// Who may send what to a server (module docs).
#[derive(Clone, Default)]
pub enum Access {
    /// No handshake, every request kind (tests and in-process tools).
    #[default]
    Open,
    /// No handshake; only the request kinds `allow` accepts (a head node's
    /// host port: host I/O and the attachment's partition map).
    Kinds(fn(u16) -> bool),
    /// The unit port: mutual authentication with `credential` before any
    /// frame, a MAC on every frame, and only the kinds `allow` accepts for
    /// the authenticated peer.
    Authenticated {
        credential: Arc<Credential>,
        allow: fn(&Peer, u16) -> bool,
    },
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Access::Open => f.write_str("Open"),
            Access::Kinds(_) => f.write_str("Kinds(..)"),
            Access::Authenticated { credential, .. } => f
                .debug_struct("Authenticated")
                .field("role", &credential.role())
                .field("id", &credential.id())
                .finish_non_exhaustive(),
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
    handshakes_refused: Family<ReasonLabels, Counter>,
    connections_refused: Family<ReasonLabels, Counter>,
    tls_failures: Family<ReasonLabels, Counter>,
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
        registry.register(
            "rackblock_server_handshakes_refused",
            "Unit-port connections closed on accept: too many in their handshake (listener_cap, peer_cap)",
            metrics.handshakes_refused.clone(),
        );
        registry.register(
            "rackblock_server_connections_refused",
            "Connections closed on accept by a connection cap: too many open on the listener (listener_cap) or from the peer's address (peer_cap)",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "rackblock_server_tls_handshake_failures",
            "Connections closed before TLS was up: a plain-TCP client where TLS is required (plaintext), a failed (handshake) or slow (timeout) TLS handshake",
            metrics.tls_failures.clone(),
        );
        metrics
    }

    /// Connections closed before TLS was up for `reason` (`plaintext`,
    /// `handshake`, `timeout`) so far.
    pub fn tls_handshake_failures(&self, reason: &'static str) -> u64 {
        self.tls_failures
            .get_or_create(&ReasonLabels { reason })
            .get()
    }

    /// Connections closed on accept by a handshake cap (`listener_cap`,
    /// `peer_cap`) so far.
    pub fn handshakes_refused(&self, reason: &'static str) -> u64 {
        self.handshakes_refused
            .get_or_create(&ReasonLabels { reason })
            .get()
    }

    /// Connections closed on accept by a connection cap (`listener_cap`,
    /// `peer_cap`) so far.
    pub fn connections_refused(&self, reason: &'static str) -> u64 {
        self.connections_refused
            .get_or_create(&ReasonLabels { reason })
            .get()
    }

    /// Not registered anywhere (tests).
    pub fn unregistered() -> ServerMetrics {
        ServerMetrics::default()
    }

    /// Connections closed for `reason` so far.
    pub fn bad_frames(&self, reason: &'static str) -> u64 {
        self.bad_frames
            .get_or_create(&ReasonLabels { reason })
            .get()
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

const BAD_FRAME_REASONS: [&str; 15] = [
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
    "mac",
    "unauthenticated",
    "refused_kind",
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
    let handshakes = HandshakeSlots::new(config.max_handshakes, config.max_handshakes_per_peer);
    let open_caps = config
        .max_connections
        .map(|caps| HandshakeSlots::new(caps.total, caps.per_peer));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        match accepted {
            Ok((stream, peer)) => {
                metrics.connections_accepted.inc();
                // Held until the connection's task ends (module docs).
                let open_slot = match open_caps.as_ref().map(|caps| caps.take(peer)) {
                    None => None,
                    Some(Ok(slot)) => Some(slot),
                    Some(Err(reason)) => {
                        metrics
                            .connections_refused
                            .get_or_create(&ReasonLabels { reason })
                            .inc();
                        tracing::debug!(%peer, reason, "too many connections open; closed");
                        drop(stream);
                        continue;
                    }
                };
                let handshaking =
                    matches!(config.access, Access::Authenticated { .. }) || config.tls.is_some();
                let slot = match handshaking {
                    true => match handshakes.take(peer) {
                        Ok(slot) => Some(slot),
                        Err(reason) => {
                            metrics
                                .handshakes_refused
                                .get_or_create(&ReasonLabels { reason })
                                .inc();
                            tracing::debug!(%peer, reason, "too many connections in their handshake; closed");
                            drop(stream);
                            continue;
                        }
                    },
                    false => None,
                };
                let connection = Connection {
                    handler: handler.clone(),
                    config: config.clone(),
                    shutdown: shutdown.child_token(),
                    metrics: metrics.clone(),
                    peer: peer.to_string(),
                };
                connections.spawn(async move {
                    connection.run(stream, slot).await;
                    drop(open_slot);
                });
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

/// The handshake caps of one listener (module docs).
struct HandshakeSlots {
    listener: Arc<tokio::sync::Semaphore>,
    per_peer: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    max_per_peer: usize,
}

/// A connection's place in its handshake; released on drop.
struct HandshakeSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    peer: std::net::IpAddr,
    per_peer: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

impl HandshakeSlots {
    /// At most `total` slots taken at once, `per_peer` of them by one IP
    /// address (the handshake caps, and the connection caps).
    fn new(total: usize, per_peer: usize) -> HandshakeSlots {
        HandshakeSlots {
            listener: Arc::new(tokio::sync::Semaphore::new(total.max(1))),
            per_peer: Arc::default(),
            max_per_peer: per_peer.max(1),
        }
    }

    /// A slot for a connection from `peer`, or the cap that refuses it.
    fn take(&self, peer: SocketAddr) -> Result<HandshakeSlot, &'static str> {
        let ip = peer.ip();
        let mut per_peer = self
            .per_peer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = per_peer.entry(ip).or_insert(0);
        if *count >= self.max_per_peer {
            return Err("peer_cap");
        }
        let Ok(permit) = self.listener.clone().try_acquire_owned() else {
            if *count == 0 {
                per_peer.remove(&ip);
            }
            return Err("listener_cap");
        };
        *count += 1;
        Ok(HandshakeSlot {
            _permit: permit,
            peer: ip,
            per_peer: self.per_peer.clone(),
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut per_peer = self
            .per_peer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = per_peer.get_mut(&self.peer) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                per_peer.remove(&self.peer);
            }
        }
    }
}

struct Connection {
    handler: Arc<dyn Handler>,
    config: ServerConfig,
    shutdown: CancellationToken,
    metrics: ServerMetrics,
    peer: String,
}

/// What a connection carries from its handshake (and, after a hand-off,
/// from the runtime it was first served on) into [`Connection::serve`].
struct Session {
    /// The peer the handshake authenticated (unit port only).
    authenticated: Option<Peer>,
    /// The response queue, with the MAC state of the sending direction.
    out: Outgoing,
    /// The frame decoder, with the MAC state of the receiving direction.
    codec: AuthCodec,
    /// Bytes read but not decoded yet.
    buffered: bytes::BytesMut,
    /// Requests decoded already, answered first.
    first: Vec<(Message, u64)>,
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
    async fn run(self, stream: TcpStream, handshake_slot: Option<HandshakeSlot>) {
        self.metrics.connections_open.inc();
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(peer = %self.peer, %error, "set_nodelay failed");
        }
        let Some(tls) = self.config.tls.clone() else {
            return self.start(stream, handshake_slot).await;
        };
        let accepted = tokio::select! {
            () = self.shutdown.cancelled() => None,
            accepted = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, accept_tls(&tls, stream)) => Some(accepted),
        };
        match accepted {
            None => {
                self.metrics.connections_open.dec();
            }
            Some(Ok(Ok(Accepted::Tls(stream)))) => self.start(*stream, handshake_slot).await,
            Some(Ok(Ok(Accepted::Plain(stream)))) => self.start(stream, handshake_slot).await,
            Some(Ok(Ok(Accepted::Closed))) => {
                self.metrics.connections_open.dec();
            }
            Some(Ok(Err(failure))) => {
                self.tls_failure(failure.reason, &failure.detail);
                self.metrics.connections_open.dec();
            }
            Some(Err(_)) => {
                self.tls_failure(
                    "timeout",
                    &format!("no TLS handshake within {TLS_HANDSHAKE_TIMEOUT:?}"),
                );
                self.metrics.connections_open.dec();
            }
        }
    }

    fn tls_failure(&self, reason: &'static str, detail: &str) {
        tracing::warn!(peer = %self.peer, reason, detail, "closing connection before TLS was up");
        self.metrics
            .tls_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// The unit-port handshake if any, then [`Connection::serve`]
    /// (`connections_open` is already counted).
    async fn start<S: Transport>(self, mut stream: S, handshake_slot: Option<HandshakeSlot>) {
        // The handshake, before any frame is read (module docs).
        let (authenticated, macs) = match &self.config.access {
            Access::Authenticated { credential, .. } => {
                let handshake = tokio::select! {
                    () = self.shutdown.cancelled() => None,
                    result = crate::auth::server_handshake(&mut stream, credential) => Some(result),
                };
                // The slot is held through the handshake only.
                drop(handshake_slot);
                match handshake {
                    Some(Ok(done)) => (Some(done.peer.clone()), done.macs()),
                    Some(Err(error)) => {
                        self.bad_frame("unauthenticated", &error.to_string());
                        self.metrics.connections_open.dec();
                        return;
                    }
                    None => {
                        self.metrics.connections_open.dec();
                        return;
                    }
                }
            }
            Access::Open | Access::Kinds(_) => {
                // Held through the TLS handshake, if any, only.
                drop(handshake_slot);
                (None, (None, None))
            }
        };
        let (send_mac, receive_mac) = macs;
        let session = Session {
            authenticated,
            out: Outgoing::new(send_mac),
            codec: AuthCodec::new(receive_mac),
            buffered: bytes::BytesMut::new(),
            first: Vec::new(),
        };
        self.serve(stream, session).await;
    }

    /// The request a frame carries, if this connection may send it: a kind
    /// its access policy refuses, an undecodable body or a response sent as
    /// a request is counted and ends the connection (`None`).
    fn request_of(
        &self,
        frame: &crate::frame::Frame,
        authenticated: Option<&Peer>,
    ) -> Option<Message> {
        let kind = frame.header.kind;
        let allowed = match &self.config.access {
            Access::Open => true,
            Access::Kinds(allow) => allow(kind),
            Access::Authenticated { allow, .. } => {
                authenticated.is_some_and(|peer| allow(peer, kind))
            }
        };
        if !allowed {
            let who = authenticated.map_or_else(
                || "unauthenticated peer".to_owned(),
                |p| format!("{} {}", p.role.as_str(), p.id),
            );
            self.bad_frame(
                "refused_kind",
                &format!("kind {kind:#06x} not allowed here for {who}"),
            );
            return None;
        }
        match Message::from_frame(frame) {
            Ok(request) if !request.is_response() => Some(request),
            Ok(response) => {
                self.bad_frame(
                    "response_as_request",
                    &format!("kind {:#06x} sent as a request", response.kind()),
                );
                None
            }
            Err(error) => {
                self.bad_frame(error.label(), &error.to_string());
                None
            }
        }
    }

    /// Moves the connection to `runtime` (module docs): the socket, the
    /// frame codec and the response queue with their MAC state, the first
    /// request and those read behind it, and the bytes of a frame not read
    /// whole yet.
    fn hand_off<S: Transport>(
        self,
        runtime: tokio::runtime::Handle,
        frames: FramedRead<S::Read, AuthCodec>,
        write_half: S::Write,
        mut session: Session,
    ) {
        // Complete frames already read are decoded here: a new reader
        // decodes its buffer only after its next socket read, which may
        // never come (the peer waits for these answers).
        let parts = frames.into_parts();
        let (read_half, mut codec, mut buffered) = (parts.io, parts.codec, parts.read_buf);
        loop {
            let frame = match tokio_util::codec::Decoder::decode(&mut codec, &mut buffered) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(error) => {
                    self.bad_frame(error.label(), &error.to_string());
                    self.metrics.connections_open.dec();
                    return;
                }
            };
            let Some(request) = self.request_of(&frame, session.authenticated.as_ref()) else {
                self.metrics.connections_open.dec();
                return;
            };
            session.first.push((request, frame.header.request_id));
        }
        session.codec = codec;
        session.buffered = buffered;
        let stream = match S::into_std(read_half, write_half) {
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
                Ok(stream) => connection.serve(stream, session).await,
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

    async fn serve<S: Transport>(self, stream: S, session: Session) {
        let (read_half, mut write_half) = stream.split();
        let max_in_flight = self.config.max_in_flight_per_connection.max(1);
        let mut handlers: FuturesUnordered<BoxFuture<'static, Option<Bytes>>> =
            FuturesUnordered::new();
        let Session {
            authenticated,
            mut out,
            codec,
            buffered,
            first,
        } = session;
        let mut frames = FramedRead::with_capacity(read_half, codec, READ_BUFFER_BYTES);
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
        let mut placed = self.config.control_runtime.is_none() || !S::MOVABLE;

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
                written = out.write_to(&mut write_half), if out.wants_write() => {
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
            let Some(request) = self.request_of(&frame, authenticated.as_ref()) else {
                break End::Abort;
            };
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
                let session = Session {
                    authenticated,
                    out,
                    codec: AuthCodec::new(None),
                    buffered: bytes::BytesMut::new(),
                    first: vec![(request, request_id)],
                };
                self.hand_off::<S>(runtime, frames, write_half, session);
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

async fn next_frame<R: AsyncRead + Unpin>(
    frames: &mut FramedRead<R, AuthCodec>,
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

/// A link connection's writer: every frame queued while it slept leaves in
/// one vectored write (no copy into a staging buffer; see [`Outgoing`]),
/// so a burst of requests from many callers costs one `writev`, not one
/// per frame.
pub(crate) async fn write_frames<W: AsyncWrite + Unpin>(
    mut write_half: W,
    mut rx: mpsc::Receiver<Bytes>,
    mac: Option<FrameMac>,
) -> io::Result<()> {
    let mut out = Outgoing::new(mac);
    while let Some(frame) = rx.recv().await {
        out.push(frame);
        while out.len() < MAX_IOVECS {
            match rx.try_recv() {
                Ok(frame) => out.push(frame),
                Err(_) => break,
            }
        }
        out.write_all_to(&mut write_half).await?;
    }
    write_half.shutdown().await
}

/// Read buffer of a connection's frame reader: one `read` takes up to this
/// many bytes, about 15 frames of a 4 KiB write (the default 8 KiB took
/// one or two, so a burst of pipelined frames cost a syscall per frame).
/// Frames are zero-copy slices of it: the buffer is freed when the last
/// frame cut from it is.
pub(crate) const READ_BUFFER_BYTES: usize = 64 << 10;

/// Encoded responses waiting for the socket, written with vectored writes;
/// on an authenticated connection each frame is followed by its tag.
struct Outgoing {
    frames: VecDeque<Bytes>,
    mac: Option<FrameMac>,
    /// Written to a stream that may buffer (TLS) and not flushed since.
    unflushed: bool,
}

/// Frames per vectored write (well under IOV_MAX).
const MAX_IOVECS: usize = 64;

impl Outgoing {
    fn new(mac: Option<FrameMac>) -> Outgoing {
        Outgoing {
            frames: VecDeque::new(),
            mac,
            unflushed: false,
        }
    }

    /// Queues `frame` (and its tag: tags are sealed in queue order, which
    /// is the order they reach the socket).
    fn push(&mut self, frame: Bytes) {
        if frame.is_empty() {
            return;
        }
        if let Some(mac) = &mut self.mac {
            let tag = Bytes::copy_from_slice(&mac.seal(&frame));
            self.frames.push_back(frame);
            self.frames.push_back(tag);
        } else {
            self.frames.push_back(frame);
        }
    }

    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frames queued, or written into a buffer (TLS records) not flushed.
    fn wants_write(&self) -> bool {
        !self.frames.is_empty() || self.unflushed
    }

    /// Frames queued (a frame and its tag count once).
    fn len(&self) -> usize {
        if self.mac.is_some() {
            self.frames.len().div_ceil(2)
        } else {
            self.frames.len()
        }
    }

    /// One vectored write of the queued frames, then a flush once the queue
    /// is empty (cancel-safe: the queue only advances by what the stream
    /// took; a flush cut short is retried, `unflushed` stays set). A plain
    /// TCP socket's flush is a no-op that returns at once; a TLS stream's
    /// pushes the records it buffered.
    async fn write_to<W: AsyncWrite + Unpin>(&mut self, socket: &mut W) -> io::Result<()> {
        if !self.frames.is_empty() {
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
            self.unflushed = true;
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
        }
        if self.frames.is_empty() && self.unflushed {
            socket.flush().await?;
            self.unflushed = false;
        }
        Ok(())
    }

    async fn write_all_to<W: AsyncWrite + Unpin>(&mut self, socket: &mut W) -> io::Result<()> {
        while self.wants_write() {
            self.write_to(socket).await?;
        }
        Ok(())
    }
}

/// A connection's byte stream (module docs: TLS): split into halves that
/// one task reads and writes, and, for plain TCP only, joined back into
/// the socket to move it to another runtime.
trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    /// Whether [`Transport::into_std`] can give the socket back.
    const MOVABLE: bool;
    fn split(self) -> (Self::Read, Self::Write);
    fn into_std(read: Self::Read, write: Self::Write) -> io::Result<std::net::TcpStream>;
}

impl Transport for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    const MOVABLE: bool = true;

    fn split(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }

    fn into_std(read: Self::Read, write: Self::Write) -> io::Result<std::net::TcpStream> {
        read.reunite(write)
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(TcpStream::into_std)
    }
}

type ServerTlsStream = tokio_rustls::server::TlsStream<TcpStream>;

impl Transport for ServerTlsStream {
    type Read = tokio::io::ReadHalf<ServerTlsStream>;
    type Write = tokio::io::WriteHalf<ServerTlsStream>;
    const MOVABLE: bool = false;

    fn split(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }

    fn into_std(_: Self::Read, _: Self::Write) -> io::Result<std::net::TcpStream> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a TLS connection stays on its runtime",
        ))
    }
}

/// What came of a connection on a TLS listener.
enum Accepted {
    Tls(Box<ServerTlsStream>),
    /// A plain-TCP client where TLS is optional.
    Plain(TcpStream),
    /// Closed by the peer before its first byte.
    Closed,
}

/// Why a connection on a TLS listener was refused.
struct TlsFailure {
    reason: &'static str,
    detail: String,
}

/// Tells a TLS client from a plain one by the first byte (module docs) and
/// runs the TLS handshake for the former.
async fn accept_tls(tls: &ServerTls, stream: TcpStream) -> Result<Accepted, TlsFailure> {
    let mut first = [0u8; 1];
    let peeked = stream.peek(&mut first).await.map_err(|e| TlsFailure {
        reason: "handshake",
        detail: format!("reading the first byte: {e}"),
    })?;
    if peeked == 0 {
        return Ok(Accepted::Closed);
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        if tls.required {
            refuse_plaintext(stream).await;
            return Err(TlsFailure {
                reason: "plaintext",
                detail: format!(
                    "first byte {:#04x} is no TLS handshake, and this port requires TLS",
                    first[0]
                ),
            });
        }
        return Ok(Accepted::Plain(stream));
    }
    match tls.acceptor.accept(stream).await {
        Ok(stream) => Ok(Accepted::Tls(Box::new(stream))),
        Err(error) => Err(TlsFailure {
            reason: "handshake",
            detail: error.to_string(),
        }),
    }
}

/// What a TLS-only listener sends a plain-TCP client before closing: a TLS
/// alert record (fatal, `handshake_failure`). No frame starts with 0x15,
/// so a rackblock client that reads it knows the port wants TLS
/// ([`crate::link::TLS_REQUIRED`]) instead of seeing only a closed
/// connection; any other client sees a TLS server's refusal.
pub const TLS_REQUIRED_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];

/// Most bytes of a refused plain-TCP client read (and dropped) while it is
/// told that the port wants TLS.
const PLAINTEXT_DRAIN_BYTES: usize = 64 << 10;

/// Sends [`TLS_REQUIRED_ALERT`], ends the sending side, then reads and
/// drops what the client sent until it closes or [`PLAINTEXT_DRAIN_BYTES`]:
/// closing with its request unread would reset the connection, and a reset
/// can destroy the alert before the client reads it. Bounded by the
/// caller's TLS handshake timeout; nothing read is decoded.
async fn refuse_plaintext(mut stream: TcpStream) {
    use tokio::io::AsyncReadExt as _;
    if stream.write_all(&TLS_REQUIRED_ALERT).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let mut drained = 0;
    let mut buffer = [0u8; 4096];
    while drained < PLAINTEXT_DRAIN_BYTES {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
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
