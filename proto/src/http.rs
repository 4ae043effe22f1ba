//! HTTP/1 serving for the daemons' admin and API endpoints (metrics,
//! health, the zonal API), with the bounds `axum::serve` does not have.
//!
//! ```text
//! accept ─▶ permit? (max_connections; none ⇒ close at once, counted by the caller's log)
//!        └▶ one task: hyper http1, header_read_timeout (slow or idle headers ⇒ close)
//! shutdown ─▶ stop accepting; each connection finishes its request in
//!             flight and closes (graceful); after `shutdown_grace`, the rest
//!             are aborted: a client cannot hold a daemon's exit.
//! ```
//!
//! Bodies are read by the handlers' extractors as they arrive (axum's
//! default body limit applies), never reserved ahead from a header.
//!
//! **HTTPS** ([`serve_tls`]): the same, with a TLS handshake first inside
//! the connection's permit and bounded by `header_read_timeout`, so slow or
//! silent TLS clients count against the cap and time out like slow HTTP
//! ones. Such a server speaks only TLS: a plain HTTP request fails the
//! handshake and is closed without an answer. Every failed or timed-out
//! handshake counts in [`HttpTls::handshake_failures`] (the daemon
//! registers it as a metric).

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// Content type of a Prometheus/OpenMetrics text exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A `/metrics` answer: `registry` in the OpenMetrics text format, or 500
/// with the reason if it cannot be encoded.
pub fn metrics_response(
    registry: &prometheus_client::registry::Registry,
) -> axum::response::Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, registry) {
        Ok(()) => text_response(text),
        Err(e) => axum::response::IntoResponse::into_response((
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {e}"),
        )),
    }
}

/// An already encoded exposition, with its content type.
pub fn text_response(text: String) -> axum::response::Response {
    axum::response::IntoResponse::into_response((
        [(axum::http::header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        text,
    ))
}

/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Bounds of one HTTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// A request's headers (the first, or the next on a kept-alive
    /// connection) must arrive within this.
    pub header_read_timeout: Duration,
    /// How long connections may take to finish at shutdown.
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> HttpLimits {
        HttpLimits {
            max_connections: 256,
            header_read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// TLS of an HTTPS server ([`serve_tls`]).
#[derive(Clone)]
pub struct HttpTls {
    pub acceptor: TlsAcceptor,
    /// Handshakes that failed or timed out (plain HTTP, bad clients).
    pub handshake_failures: Counter,
}

impl std::fmt::Debug for HttpTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTls")
            .field("handshake_failures", &self.handshake_failures.get())
            .finish_non_exhaustive()
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown`
/// completes (see the module docs). Errors only if the listener fails
/// for good (never for one connection).
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    serve_maybe_tls(listener, router, limits, None, shutdown).await
}

/// [`serve`] over TLS only (module docs: HTTPS).
pub async fn serve_tls(
    listener: TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    tls: HttpTls,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    serve_maybe_tls(listener, router, limits, Some(tls), shutdown).await
}

async fn serve_maybe_tls(
    listener: TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    tls: Option<HttpTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "http: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(
                max = limits.max_connections,
                "http: too many connections, closing a new one"
            );
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop_rx.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let _permit = permit;
            let Some(tls) = tls else {
                serve_connection(stream, service, limits, &mut stop).await;
                return;
            };
            let handshake = tokio::select! {
                handshake = tokio::time::timeout(
                    limits.header_read_timeout,
                    tls.acceptor.accept(stream),
                ) => handshake,
                () = stopped(&mut stop) => return,
            };
            match handshake {
                Ok(Ok(stream)) => serve_connection(stream, service, limits, &mut stop).await,
                Ok(Err(error)) => {
                    tls.handshake_failures.inc();
                    tracing::debug!(%error, "https: TLS handshake failed");
                }
                Err(_) => {
                    tls.handshake_failures.inc();
                    tracing::debug!("https: TLS handshake timed out");
                }
            }
        });
    }
    let _ = stop_tx.send(true);
    let joined = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(limits.shutdown_grace, joined)
        .await
        .is_err()
    {
        tracing::warn!(
            left = connections.len(),
            "http: connections still open after the shutdown grace; closing them"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
    Ok(())
}

/// One connection's HTTP/1 exchanges until it ends or the server stops
/// (then it finishes its request in flight).
async fn serve_connection<IO>(
    io: IO,
    service: TowerToHyperService<axum::Router>,
    limits: HttpLimits,
    stop: &mut watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        served = connection.as_mut() => {
            if let Err(error) = served {
                tracing::debug!(%error, "http: connection ended");
            }
        }
        () = stopped(stop) => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// Resolves once the server stops (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
