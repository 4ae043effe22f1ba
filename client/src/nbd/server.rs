//! The async shell: listeners, one task per connection, the handshake
//! driver and the transmission phase (reader loop, request tasks, one
//! reply writer). Protocol decisions live in `handshake.rs` and
//! `request.rs`.
//!
//! **Bounds** (all in [`NbdConfig`]): at most `max_connections` at once
//! (more are closed on accept); at most `max_handshaking` of them in their
//! handshake, a new one closing the oldest, and none for longer than
//! `handshake_timeout_ms` — so idle or slow connections can never keep a
//! real client out; per connection, `max_requests_per_connection` requests
//! and `max_in_flight_bytes_per_connection` payload bytes (the reader stops
//! reading when either is taken, so replies a client does not read pile up
//! to that bound and no further); a reply write that makes no progress for
//! `reply_stall_timeout_ms` closes the connection. At shutdown the reader
//! stops at once, what was started is answered within `shutdown_grace_ms`,
//! and then replies are dropped: a client that never reads cannot hold
//! the agent (and the detach that follows its shutdown).
//!
//! **TLS** ([`NbdTls`]): the connection is a boxed stream behind one read
//! buffer for its whole life. On `NBD_OPT_STARTTLS` the shell sends the
//! ACK, refuses a client that already sent more (the spec has it wait for
//! the reply; bytes read ahead would otherwise be taken as TLS), and runs
//! the rustls server handshake on the plain stream, within the same
//! handshake timeout and eviction as the option haggling: a client that
//! sends garbage there loses its own connection and nothing else.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::{join_all, BoxFuture, Shared};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::backend::{BackendError, NbdBackend};
use super::handshake::{
    BlockSizes, ExportInfo, ExportLookup, Handshake, Negotiated, Step, TlsMode,
};
use super::request::{validate, Command, Limits};
use super::wire::*;
use crate::metrics::NbdMetrics;

/// Smallest I/O unit; also the volume's sector.
pub const MINIMUM_BLOCK_BYTES: u32 = 512;
/// Option data longer than this is not drained but answered by hanging up.
const MAX_OPTION_DRAIN_BYTES: u32 = 1 << 20;
/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Tuning of an [`NbdServer`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdConfig {
    /// Preferred I/O size advertised in `NBD_INFO_BLOCK_SIZE` (a power of
    /// two, at least 512; default the volume block size, 4096: smaller
    /// writes cost the primary a read-modify-write).
    pub preferred_block_bytes: u32,
    /// Largest `READ`/`WRITE` payload, advertised as the maximum block
    /// size (a multiple of 512; default 32 MiB). Longer requests get
    /// `EOVERFLOW` (a write's payload is discarded unread).
    pub max_payload_bytes: u32,
    /// Requests in flight per connection; the connection stops reading
    /// when they are all taken (default 64).
    pub max_requests_per_connection: u32,
    /// Payload bytes (write data, read replies) held per connection
    /// (default 128 MiB; at least `max_payload_bytes`).
    pub max_in_flight_bytes_per_connection: u32,
    /// Connections served at once across all listeners; more are closed
    /// on accept (default 128).
    pub max_connections: u32,
    /// Longest option data buffered during the handshake (default 16 KiB).
    /// Longer data is discarded and refused; beyond 1 MiB the server
    /// hangs up.
    pub max_option_bytes: u32,
    /// Options answered in one handshake before hanging up (default 256).
    pub max_options_per_handshake: u32,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN` (default true; see the module
    /// docs for why it is safe).
    pub multi_conn: bool,
    /// Advertise the export read-only (`NBD_FLAG_READ_ONLY`; default
    /// false). The backend must refuse writes itself (`EPERM`): a client
    /// may ignore the flag.
    pub read_only: bool,
    /// A connection that has not finished its handshake this long after
    /// it was accepted is closed (default 10 s; clients take milliseconds).
    pub handshake_timeout_ms: u64,
    /// Connections in their handshake at once; a new one closes the
    /// oldest (default 16), so idle or slow-loris connections can never
    /// keep a real client out.
    pub max_handshaking: u32,
    /// A reply the client does not take (the socket write makes no
    /// progress) for this long closes the connection (default 60 s).
    pub reply_stall_timeout_ms: u64,
    /// At shutdown, how long connections may take to answer what they
    /// started; then replies are dropped and the connections closed, so a
    /// client that never reads cannot hold the agent (default 5 s).
    pub shutdown_grace_ms: u64,
}

impl Default for NbdConfig {
    fn default() -> NbdConfig {
        NbdConfig {
            preferred_block_bytes: proto::BLOCK_SIZE_BYTES as u32,
            max_payload_bytes: 32 << 20,
            max_requests_per_connection: 64,
            max_in_flight_bytes_per_connection: 128 << 20,
            max_connections: 128,
            max_option_bytes: 16 << 10,
            max_options_per_handshake: 256,
            multi_conn: true,
            read_only: false,
            handshake_timeout_ms: 10_000,
            max_handshaking: 16,
            reply_stall_timeout_ms: 60_000,
            shutdown_grace_ms: 5_000,
        }
    }
}

impl NbdConfig {
    fn validate(&self) -> Result<(), NbdError> {
        let bad = |reason: &str| Err(NbdError::Config(reason.to_owned()));
        if !self.preferred_block_bytes.is_power_of_two()
            || self.preferred_block_bytes < MINIMUM_BLOCK_BYTES
        {
            return bad("preferred_block_bytes must be a power of two ≥ 512");
        }
        if self.max_payload_bytes < self.preferred_block_bytes
            || self.max_payload_bytes % MINIMUM_BLOCK_BYTES != 0
            || self.max_payload_bytes > u32::MAX - 8
        {
            return bad("max_payload_bytes must be a multiple of 512, ≥ preferred_block_bytes");
        }
        if self.max_in_flight_bytes_per_connection < self.max_payload_bytes {
            return bad("max_in_flight_bytes_per_connection must be ≥ max_payload_bytes");
        }
        if self.max_requests_per_connection == 0 || self.max_connections == 0 {
            return bad("max_requests_per_connection and max_connections must be > 0");
        }
        if self.max_handshaking == 0 || self.max_handshaking > self.max_connections {
            return bad("max_handshaking must be > 0 and ≤ max_connections");
        }
        if self.handshake_timeout_ms == 0
            || self.reply_stall_timeout_ms == 0
            || self.shutdown_grace_ms == 0
        {
            return bad(
                "handshake_timeout_ms, reply_stall_timeout_ms and shutdown_grace_ms must be > 0",
            );
        }
        if (self.max_option_bytes as usize) < 4 + MAX_STRING_BYTES + 2 {
            return bad("max_option_bytes must hold an NBD_OPT_GO with a 4096-byte name");
        }
        Ok(())
    }
}

/// Setting up or running a server failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("invalid NBD configuration: {0}")]
    Config(String),
    #[error("invalid export name {name:?}: {reason}")]
    ExportName { name: String, reason: &'static str },
    #[error("export {name:?}: size {size_bytes} is not a multiple of 512")]
    ExportSize { name: String, size_bytes: u64 },
}

/// Why one connection ended abnormally (logged; other connections are not
/// affected).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("connection I/O: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("closed during its handshake: a newer connection needed the slot")]
    Evicted,
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
}

/// TLS for an [`NbdServer`]: `NBD_OPT_STARTTLS` is offered to every
/// client, and with `required` nothing else is served before it.
#[derive(Clone)]
pub struct NbdTls {
    pub acceptor: TlsAcceptor,
    pub required: bool,
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdTls")
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

/// Any byte stream a connection runs on (plain socket or TLS over it).
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A connection: its stream behind its one read buffer (writes pass
/// through it).
type Conn = BufReader<Box<dyn Io>>;

const READ_BUFFER_BYTES: usize = 64 << 10;

/// Connections in their handshake, oldest first: a new one beyond
/// `max_handshaking` cancels the oldest.
#[derive(Default)]
struct Handshaking {
    next_id: u64,
    open: std::collections::VecDeque<(u64, CancellationToken)>,
}

/// Removes its connection from [`Handshaking`] when the handshake ends.
struct HandshakeSlot {
    id: u64,
    token: CancellationToken,
    inner: Arc<ServerInner>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        lock(&self.inner.handshaking)
            .open
            .retain(|(id, _)| *id != self.id);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ServerInner {
    /// Registers a connection entering its handshake, closing the oldest
    /// one in handshake if there are too many.
    fn admit_handshake(self: &Arc<Self>) -> HandshakeSlot {
        let mut handshaking = lock(&self.handshaking);
        while handshaking.open.len() >= self.config.max_handshaking as usize {
            let Some((_, oldest)) = handshaking.open.pop_front() else {
                break;
            };
            oldest.cancel();
            self.metrics.handshake_evicted();
        }
        let id = handshaking.next_id;
        handshaking.next_id += 1;
        let token = CancellationToken::new();
        handshaking.open.push_back((id, token.clone()));
        HandshakeSlot {
            id,
            token,
            inner: self.clone(),
        }
    }
}

/// An NBD server for a fixed set of exports (see the module docs).
#[derive(Clone)]
pub struct NbdServer {
    inner: Arc<ServerInner>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("exports", &self.inner.exports.0.keys().collect::<Vec<_>>())
            .field("config", &self.inner.config)
            .finish()
    }
}

struct ServerInner {
    exports: ExportTable,
    config: NbdConfig,
    connections: Arc<Semaphore>,
    handshaking: Mutex<Handshaking>,
    metrics: NbdMetrics,
    tls: Option<NbdTls>,
}

struct ExportTable(BTreeMap<String, Arc<dyn NbdBackend>>);

impl ExportTable {
    fn info(name: &str, backend: &Arc<dyn NbdBackend>) -> ExportInfo {
        ExportInfo {
            name: name.to_owned(),
            description: backend.description(),
            size_bytes: backend.size_bytes(),
        }
    }

    fn backend(&self, name: &str) -> Option<Arc<dyn NbdBackend>> {
        self.0.get(name).cloned()
    }
}

impl ExportLookup for ExportTable {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        if name.is_empty() && self.0.len() == 1 {
            return self.0.iter().next().map(|(n, b)| ExportTable::info(n, b));
        }
        self.0.get(name).map(|b| ExportTable::info(name, b))
    }

    fn list(&self) -> Vec<ExportInfo> {
        self.0
            .iter()
            .map(|(n, b)| ExportTable::info(n, b))
            .collect()
    }
}

/// Counts one accepted connection as open until dropped.
struct ConnectionCounted(NbdMetrics);

impl ConnectionCounted {
    fn new(metrics: &NbdMetrics) -> ConnectionCounted {
        metrics.accepted();
        ConnectionCounted(metrics.clone())
    }
}

impl Drop for ConnectionCounted {
    fn drop(&mut self) {
        self.0.closed();
    }
}

/// A listener the accept loop can drive.
trait Acceptor: Send {
    type Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    fn accept_stream(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Acceptor for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&self) -> io::Result<Self::Stream> {
        let (stream, _) = self.accept().await?;
        // Replies are small and latency-bound; never wait for Nagle.
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Acceptor for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> io::Result<Self::Stream> {
        Ok(self.accept().await?.0)
    }
}

impl NbdServer {
    /// A server for `exports` (name → backend). Names must be non-empty
    /// UTF-8 without NUL, at most 4096 bytes; sizes multiples of 512.
    pub fn new(
        exports: BTreeMap<String, Arc<dyn NbdBackend>>,
        config: NbdConfig,
    ) -> Result<NbdServer, NbdError> {
        NbdServer::with_metrics(exports, config, NbdMetrics::default())
    }

    /// [`NbdServer::new`], counting connections (accepted, open) in
    /// `metrics`.
    pub fn with_metrics(
        exports: BTreeMap<String, Arc<dyn NbdBackend>>,
        config: NbdConfig,
        metrics: NbdMetrics,
    ) -> Result<NbdServer, NbdError> {
        NbdServer::with_tls(exports, config, metrics, None)
    }

    /// [`NbdServer::with_metrics`], offering (or requiring) TLS when
    /// `tls` is given.
    pub fn with_tls(
        exports: BTreeMap<String, Arc<dyn NbdBackend>>,
        config: NbdConfig,
        metrics: NbdMetrics,
        tls: Option<NbdTls>,
    ) -> Result<NbdServer, NbdError> {
        config.validate()?;
        for (name, backend) in &exports {
            let reason = if name.is_empty() {
                Some("empty (the empty name selects the default export)")
            } else if name.len() > MAX_STRING_BYTES {
                Some("longer than 4096 bytes")
            } else if name.contains('\0') {
                Some("contains NUL")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(NbdError::ExportName {
                    name: name.clone(),
                    reason,
                });
            }
            let size_bytes = backend.size_bytes();
            if size_bytes % u64::from(MINIMUM_BLOCK_BYTES) != 0 {
                return Err(NbdError::ExportSize {
                    name: name.clone(),
                    size_bytes,
                });
            }
        }
        let connections = Arc::new(Semaphore::new(config.max_connections as usize));
        Ok(NbdServer {
            inner: Arc::new(ServerInner {
                exports: ExportTable(exports),
                config,
                connections,
                handshaking: Mutex::new(Handshaking::default()),
                metrics,
                tls,
            }),
        })
    }

    /// Serve TCP connections until `shutdown` completes; then stop reading
    /// new requests, answer those in flight, close every connection and
    /// return.
    pub async fn serve_tcp(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), NbdError> {
        self.serve(listener, shutdown).await
    }

    /// [`NbdServer::serve_tcp`] on a unix socket.
    pub async fn serve_unix(
        &self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), NbdError> {
        self.serve(listener, shutdown).await
    }

    /// Serve one already-connected stream to completion (embedding,
    /// tests). Not counted against `max_connections`.
    pub async fn serve_stream<S>(&self, stream: S) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (_stop_tx, stop_rx) = watch::channel(false);
        serve_connection(self.inner.clone(), stream, stop_rx).await
    }

    async fn serve<A: Acceptor>(
        &self,
        listener: A,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), NbdError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            while connections.try_join_next().is_some() {}
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept_stream() => match accepted {
                    Ok(stream) => {
                        let Ok(permit) = self.inner.connections.clone().try_acquire_owned() else {
                            tracing::warn!(
                                max = self.inner.config.max_connections,
                                "nbd: too many connections, closing a new one"
                            );
                            self.inner.metrics.refused_at_cap();
                            continue;
                        };
                        let inner = self.inner.clone();
                        let stop = stop_rx.clone();
                        let counted = ConnectionCounted::new(&self.inner.metrics);
                        connections.spawn(async move {
                            let _permit = permit;
                            let _counted = counted;
                            match serve_connection(inner, stream, stop).await {
                                Ok(()) => tracing::debug!("nbd: connection closed"),
                                Err(error) => tracing::info!(%error, "nbd: connection ended"),
                            }
                        });
                    }
                    Err(error) => {
                        tracing::warn!(%error, "nbd: accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
            }
        }
        // Connections stop reading, finish what they started, and close.
        // Each drops its replies after `shutdown_grace` (a client that does
        // not read cannot hold us); backend work still in flight after
        // twice that is abandoned (never acknowledged to anyone).
        let _ = stop_tx.send(true);
        let grace = Duration::from_millis(self.inner.config.shutdown_grace_ms);
        let joined = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(grace * 2, joined).await.is_err() {
            tracing::warn!(
                left = connections.len(),
                "nbd: connections still busy after the shutdown grace; closing them"
            );
            connections.abort_all();
            while connections.join_next().await.is_some() {}
        }
        Ok(())
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // A dropped sender also means stop.
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn serve_connection<S>(
    inner: Arc<ServerInner>,
    stream: S,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let conn: Conn = BufReader::with_capacity(READ_BUFFER_BYTES, Box::new(stream));
    let slot = inner.admit_handshake();
    let limit = Duration::from_millis(inner.config.handshake_timeout_ms);
    let negotiated = tokio::select! {
        biased;
        _ = stopped(&mut stop) => return Ok(()),
        _ = slot.token.cancelled() => return Err(ConnectionError::Evicted),
        negotiated = tokio::time::timeout(limit, handshake(&inner, conn)) => {
            match negotiated {
                Ok(negotiated) => negotiated?,
                Err(_) => {
                    inner.metrics.handshake_timed_out();
                    return Err(ConnectionError::HandshakeTimeout(limit));
                }
            }
        }
    };
    drop(slot);
    let Some((conn, negotiated)) = negotiated else {
        return Ok(());
    };
    let Some(backend) = inner.exports.backend(&negotiated.export.name) else {
        return Err(ConnectionError::Protocol(
            "export vanished during handshake",
        ));
    };
    tracing::debug!(
        export = %negotiated.export.name,
        structured = negotiated.structured_replies,
        tls = negotiated.tls,
        "nbd: transmission phase"
    );
    let (reader, writer) = tokio::io::split(conn);
    transmission(&inner.config, negotiated, backend, reader, writer, stop).await
}

/// Drive the sans-IO handshake. `None`: the session ended during option
/// haggling (abort, unknown `EXPORT_NAME`); otherwise the connection
/// (upgraded to TLS if the client asked) and what was negotiated.
async fn handshake(
    inner: &ServerInner,
    mut conn: Conn,
) -> Result<Option<(Conn, Negotiated)>, ConnectionError> {
    let config = &inner.config;
    let tls_mode = match &inner.tls {
        None => TlsMode::Off,
        Some(tls) if tls.required => TlsMode::Required,
        Some(_) => TlsMode::Offered,
    };
    let mut core = Handshake::new(
        BlockSizes {
            minimum_bytes: MINIMUM_BLOCK_BYTES,
            preferred_bytes: config.preferred_block_bytes,
            maximum_bytes: config.max_payload_bytes,
        },
        config.multi_conn,
        config.max_options_per_handshake,
    )
    .with_tls(tls_mode)
    .with_read_only(config.read_only);
    conn.write_all(&greeting()).await?;
    conn.flush().await?;
    let client_flags = conn.read_u32().await?;
    core.on_client_flags(client_flags)
        .map_err(ConnectionError::Protocol)?;
    loop {
        let mut raw = [0u8; OPTION_HEADER_BYTES];
        conn.read_exact(&mut raw).await?;
        let header =
            parse_option_header(&raw).ok_or(ConnectionError::Protocol("bad option magic"))?;
        let step = if header.length_bytes > config.max_option_bytes {
            if header.length_bytes > MAX_OPTION_DRAIN_BYTES {
                return Err(ConnectionError::Protocol("option data far too long"));
            }
            drain(&mut conn, header.length_bytes).await?;
            core.on_oversized_option(header.option)
        } else {
            // Bounded by max_option_bytes above.
            let mut data = vec![0u8; header.length_bytes as usize];
            conn.read_exact(&mut data).await?;
            core.on_option(header.option, &data, &inner.exports)
        };
        match step {
            Step::Continue { reply } => {
                conn.write_all(&reply).await?;
                conn.flush().await?;
            }
            Step::Close { reply, reason } => {
                if !reply.is_empty() {
                    conn.write_all(&reply).await?;
                    conn.flush().await?;
                }
                tracing::debug!(reason, "nbd: handshake ended");
                return Ok(None);
            }
            Step::StartTls { reply } => {
                let Some(tls) = &inner.tls else {
                    return Err(ConnectionError::Protocol("STARTTLS without TLS configured"));
                };
                conn.write_all(&reply).await?;
                conn.flush().await?;
                if !conn.buffer().is_empty() {
                    return Err(ConnectionError::Protocol(
                        "data sent before the STARTTLS reply",
                    ));
                }
                let stream = match tls.acceptor.accept(conn.into_inner()).await {
                    Ok(stream) => stream,
                    Err(error) => {
                        inner.metrics.tls_handshake_failed();
                        return Err(ConnectionError::Tls(error));
                    }
                };
                conn = BufReader::with_capacity(READ_BUFFER_BYTES, Box::new(stream));
                core.on_tls_established();
                tracing::debug!("nbd: TLS established");
            }
            Step::Transmission { reply, negotiated } => {
                conn.write_all(&reply).await?;
                conn.flush().await?;
                return Ok(Some((conn, negotiated)));
            }
        }
    }
}

/// Read and discard `len` bytes without buffering them.
async fn drain<R: AsyncRead + Unpin>(reader: &mut R, len: u32) -> io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(u64::from(len)), &mut tokio::io::sink()).await?;
    if copied != u64::from(len) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// What a reply carries.
#[derive(Debug)]
enum Body {
    Done,
    Data(Bytes),
    Error(BackendError),
}

/// One reply on its way to the writer. It holds the request's slot and
/// byte budget until it is written, which bounds buffered replies too.
struct Reply {
    handle: u64,
    is_read: bool,
    offset_bytes: u64,
    body: Body,
    _slot: OwnedSemaphorePermit,
    _budget: Option<OwnedSemaphorePermit>,
}

/// Writes received (and not yet completed) on one connection, so that a
/// FLUSH can wait for exactly those received before it.
#[derive(Default, Clone)]
struct PendingWrites {
    inner: Arc<Mutex<PendingState>>,
}

#[derive(Default)]
struct PendingState {
    next_id: u64,
    writes: BTreeMap<u64, Shared<oneshot::Receiver<()>>>,
}

/// Dropped when a write completes (or its task dies): wakes flushes and
/// forgets the write.
struct PendingGuard {
    id: u64,
    _done: oneshot::Sender<()>,
    pending: PendingWrites,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.pending.lock().writes.remove(&self.id);
    }
}

impl PendingWrites {
    fn lock(&self) -> std::sync::MutexGuard<'_, PendingState> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self) -> PendingGuard {
        let (done, waiter) = oneshot::channel();
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.writes.insert(id, waiter.shared());
        PendingGuard {
            id,
            _done: done,
            pending: self.clone(),
        }
    }

    /// Completion futures of every write received so far.
    fn snapshot(&self) -> Vec<Shared<oneshot::Receiver<()>>> {
        self.lock().writes.values().cloned().collect()
    }
}

/// How the reader loop ended.
enum ReaderEnd {
    Disconnect,
    Eof,
    Shutdown,
    WriterGone,
}

async fn transmission<R, W>(
    config: &NbdConfig,
    negotiated: Negotiated,
    backend: Arc<dyn NbdBackend>,
    mut reader: R,
    writer: W,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnectionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let limits = Limits {
        size_bytes: negotiated.export.size_bytes,
        minimum_block_bytes: MINIMUM_BLOCK_BYTES,
        max_payload_bytes: config.max_payload_bytes,
        structured_replies: negotiated.structured_replies,
    };
    let slots = Arc::new(Semaphore::new(config.max_requests_per_connection as usize));
    let budget = Arc::new(Semaphore::new(
        config.max_in_flight_bytes_per_connection as usize,
    ));
    let (reply_tx, reply_rx) = mpsc::channel::<Reply>(config.max_requests_per_connection as usize);
    let mut reply_writer = tokio::spawn(write_replies(
        writer,
        reply_rx,
        negotiated.structured_replies,
        Duration::from_millis(config.reply_stall_timeout_ms),
    ));
    let pending = PendingWrites::default();
    let mut tasks = JoinSet::new();

    let end: Result<ReaderEnd, ConnectionError> = loop {
        while tasks.try_join_next().is_some() {}
        // Waiting for a slot (every request of this connection in flight,
        // e.g. a client not taking its replies) must not hide a shutdown.
        let slot = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break Ok(ReaderEnd::Shutdown),
            slot = slots.clone().acquire_owned() => slot,
        };
        let Ok(slot) = slot else {
            break Err(ConnectionError::Protocol("request slots closed"));
        };
        let next = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break Ok(ReaderEnd::Shutdown),
            _ = reply_tx.closed() => break Ok(ReaderEnd::WriterGone),
            next = read_request(&mut reader, &budget, limits.max_payload_bytes) => next,
        };
        let (header, payload) = match next {
            Ok(Some(request)) => request,
            Ok(None) => break Ok(ReaderEnd::Eof),
            Err(error) => break Err(error),
        };
        let command = match validate(&header, &limits) {
            Ok(command) => command,
            Err(rejection) => {
                let reply = Reply {
                    handle: header.handle,
                    is_read: header.command == CMD_READ,
                    offset_bytes: header.offset_bytes,
                    body: Body::Error(BackendError::new(rejection.errno, rejection.message)),
                    _slot: slot,
                    _budget: None,
                };
                let _ = reply_tx.send(reply).await;
                continue;
            }
        };
        let handle = header.handle;
        let tx = reply_tx.clone();
        let backend = backend.clone();
        // Writes, trims and zeroes: run below, counted as pending so that a
        // later FLUSH waits for them.
        let (offset_bytes, work, write_budget): (u64, BoxFuture<'static, _>, _) = match command {
            Command::Disconnect => break Ok(ReaderEnd::Disconnect),
            Command::Flush => {
                // Writes received before this FLUSH; later ones are not
                // waited for.
                let earlier = pending.snapshot();
                tasks.spawn(async move {
                    join_all(earlier).await;
                    let body = to_body(backend.flush().await);
                    send(&tx, handle, false, 0, body, slot, None).await;
                });
                continue;
            }
            Command::Read { offset_bytes, len } => {
                let Ok(read_budget) = budget.clone().acquire_many_owned(len).await else {
                    break Err(ConnectionError::Protocol("byte budget closed"));
                };
                tasks.spawn(async move {
                    let body = match backend.read(offset_bytes, u64::from(len)).await {
                        Ok(data) if data.len() == len as usize => Body::Data(data),
                        Ok(data) => Body::Error(BackendError::io(format!(
                            "backend returned {} bytes for a read of {len}",
                            data.len()
                        ))),
                        Err(error) => Body::Error(error),
                    };
                    send(
                        &tx,
                        handle,
                        true,
                        offset_bytes,
                        body,
                        slot,
                        Some(read_budget),
                    )
                    .await;
                });
                continue;
            }
            Command::Write {
                offset_bytes, fua, ..
            } => {
                let Some((data, write_budget)) = payload else {
                    break Err(ConnectionError::Protocol("write without payload"));
                };
                let work = async move { backend.write(offset_bytes, data, fua).await };
                (offset_bytes, Box::pin(work), Some(write_budget))
            }
            Command::Trim {
                offset_bytes,
                len,
                fua,
            }
            | Command::WriteZeroes {
                offset_bytes,
                len,
                fua,
            } => {
                let zeroes = matches!(command, Command::WriteZeroes { .. });
                let work = async move {
                    let len = u64::from(len);
                    let result = if zeroes {
                        backend.write_zeroes(offset_bytes, len).await
                    } else {
                        backend.trim(offset_bytes, len).await
                    };
                    // The backend API has FUA on writes only; a flush gives
                    // the same guarantee here.
                    if fua && result.is_ok() {
                        return backend.flush().await;
                    }
                    result
                };
                (offset_bytes, Box::pin(work), None)
            }
        };
        let guard = pending.register();
        tasks.spawn(async move {
            let result = work.await;
            drop(guard);
            let body = to_body(result);
            send(&tx, handle, false, offset_bytes, body, slot, write_budget).await;
        });
    };

    // Finish everything in flight (even on error: writes already started
    // complete on the backend), then let the writer drain and close. At
    // shutdown, replies not taken within the grace are dropped: the
    // writer goes, `send` fails at once, and only backend work is awaited.
    let shutdown = matches!(end, Ok(ReaderEnd::Shutdown));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(config.shutdown_grace_ms);
    let finished = async { while tasks.join_next().await.is_some() {} };
    if !shutdown {
        finished.await;
    } else if tokio::time::timeout_at(deadline, finished).await.is_err() {
        tracing::warn!("nbd: client not taking replies at shutdown; dropping them");
        reply_writer.abort();
        while tasks.join_next().await.is_some() {}
    }
    drop(reply_tx);
    let written = if shutdown {
        match tokio::time::timeout_at(deadline, &mut reply_writer).await {
            Ok(written) => written,
            Err(_) => {
                tracing::warn!("nbd: client not taking replies at shutdown; closing");
                reply_writer.abort();
                (&mut reply_writer).await
            }
        }
    } else {
        (&mut reply_writer).await
    };
    match end {
        Ok(ReaderEnd::Disconnect | ReaderEnd::Eof | ReaderEnd::Shutdown) => match written {
            Ok(Ok(())) | Err(_) => Ok(()),
            Ok(Err(error)) => Err(error.into()),
        },
        Ok(ReaderEnd::WriterGone) => match written {
            Ok(Err(error)) => Err(error.into()),
            _ => Ok(()),
        },
        Err(error) => Err(error),
    }
}

type Payload = Option<(Bytes, OwnedSemaphorePermit)>;

/// Read one request header and, for a write, its payload (buffered under
/// the byte budget, or discarded unread when longer than the maximum so
/// that validation answers `EOVERFLOW`). `None` on a clean EOF between
/// requests.
async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut R,
    budget: &Arc<Semaphore>,
    max_payload_bytes: u32,
) -> Result<Option<(RequestHeader, Payload)>, ConnectionError> {
    let mut raw = [0u8; REQUEST_HEADER_BYTES];
    match reader.read_exact(&mut raw).await {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error.into()),
    }
    let header =
        parse_request_header(&raw).ok_or(ConnectionError::Protocol("bad request magic"))?;
    let payload_len = header.payload_bytes();
    if payload_len == 0 {
        return Ok(Some((header, None)));
    }
    if payload_len > max_payload_bytes {
        drain(reader, payload_len).await?;
        return Ok(Some((header, None)));
    }
    let permit = budget
        .clone()
        .acquire_many_owned(payload_len)
        .await
        .map_err(|_| ConnectionError::Protocol("byte budget closed"))?;
    let mut data = BytesMut::zeroed(payload_len as usize);
    reader.read_exact(&mut data).await?;
    Ok(Some((header, Some((data.freeze(), permit)))))
}

fn to_body(result: Result<(), BackendError>) -> Body {
    match result {
        Ok(()) => Body::Done,
        Err(error) => Body::Error(error),
    }
}

async fn send(
    tx: &mpsc::Sender<Reply>,
    handle: u64,
    is_read: bool,
    offset_bytes: u64,
    body: Body,
    slot: OwnedSemaphorePermit,
    budget: Option<OwnedSemaphorePermit>,
) {
    if let Body::Error(error) = &body {
        tracing::debug!(handle, offset_bytes, %error, "nbd: request failed");
    }
    // The writer is gone only when the connection is: nothing to tell.
    let _ = tx
        .send(Reply {
            handle,
            is_read,
            offset_bytes,
            body,
            _slot: slot,
            _budget: budget,
        })
        .await;
}

/// The one task that writes replies, in completion order, batching
/// whatever is ready into one flush.
/// Writes replies as they come, batching what is ready into one flush. A
/// write that makes no progress for `stall` (the client stopped reading)
/// ends the writer, which ends the connection.
async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut replies: mpsc::Receiver<Reply>,
    structured: bool,
    stall: Duration,
) -> io::Result<()> {
    let stalled = || io::Error::new(io::ErrorKind::TimedOut, "client stopped reading replies");
    let mut out = BufWriter::with_capacity(256 << 10, writer);
    let mut header = BytesMut::with_capacity(128 + MAX_STRING_BYTES);
    while let Some(reply) = replies.recv().await {
        let batch = async {
            write_reply(&mut out, &mut header, reply, structured).await?;
            while let Ok(reply) = replies.try_recv() {
                write_reply(&mut out, &mut header, reply, structured).await?;
            }
            out.flush().await
        };
        tokio::time::timeout(stall, batch)
            .await
            .map_err(|_| stalled())??;
    }
    out.shutdown().await
}

async fn write_reply<W: AsyncWrite + Unpin>(
    out: &mut BufWriter<W>,
    header: &mut BytesMut,
    reply: Reply,
    structured: bool,
) -> io::Result<()> {
    header.clear();
    let mut data = None;
    match reply.body {
        Body::Data(bytes) => {
            if structured {
                // Read lengths are bounded by max_payload_bytes < u32::MAX - 8.
                let len = u32::try_from(bytes.len()).map_err(|_| io::ErrorKind::InvalidData)?;
                put_offset_data_header(header, reply.handle, reply.offset_bytes, len);
            } else {
                put_simple_reply(header, reply.handle, 0);
            }
            data = Some(bytes);
        }
        Body::Done => put_simple_reply(header, reply.handle, 0),
        Body::Error(error) => {
            // With structured replies a READ must get a structured reply,
            // and the others may: use it everywhere for the message.
            if structured {
                put_structured_error(header, reply.handle, error.errno, &error.message, None);
            } else {
                put_simple_reply(header, reply.handle, error.errno.code());
            }
        }
    }
    debug_assert!(data.is_none() || reply.is_read);
    out.write_all(header).await?;
    if let Some(data) = data {
        out.write_all(&data).await?;
    }
    Ok(())
}
