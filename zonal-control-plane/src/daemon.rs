//! The `rackblock zonal` process.
//!
//! Startup: validate the config, read the admin token, load every unit's
//! rack file (a broken one is a fatal configuration error; a unit that does
//! not answer is not), open the store, bind the listen address, then serve
//! the API and run the report loop until the token is cancelled. Shutdown
//! stops accepting, lets in-flight requests finish, stops the report loop,
//! closes the links to the units and returns (the store is closed when the
//! last reference drops, so a restart on the same `data_dir` can open it).

use std::sync::Arc;
use std::time::Duration;

use hardware::rack::Rack;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::ZonalConfig;
use crate::error::ZonalError;
use crate::metrics::Metrics;
use crate::service::{Unit, Zonal};
use crate::store::Store;

/// File name of the store inside `data_dir`.
pub const STORE_FILE: &str = "zonal.redb";

/// Runs the zonal control plane on `config.listen` until `shutdown` is
/// cancelled.
pub async fn run(config: ZonalConfig, shutdown: CancellationToken) -> Result<(), ZonalError> {
    config.validate()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ZonalError::Bind {
            address: config.listen,
            source,
        })?;
    serve(config, listener, shutdown).await
}

/// Like [`run`], on a listener the caller bound (tests bind port 0).
pub async fn serve(
    config: ZonalConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ZonalError> {
    config.validate()?;
    let tokens = config.token_digests()?;
    // TLS material is loaded before anything else starts: a bad file is a
    // configuration error, not a plane that silently serves plain HTTP.
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(proto::tls::acceptor(cert, key)?),
        _ => None,
    };
    let mut units = Vec::with_capacity(config.units.len());
    for unit in &config.units {
        let rack = Rack::load(&unit.rack_file).map_err(|source| ZonalError::Rack {
            unit: unit.name.clone(),
            path: unit.rack_file.clone(),
            source,
        })?;
        if rack.unit.name != unit.name {
            warn!(unit = %unit.name, rack_unit = %rack.unit.name, "unit name differs from the rack file's [unit] name");
        }
        let credentials_dir = unit
            .credentials_dir
            .clone()
            .unwrap_or_else(|| proto::auth::default_credentials_dir(&unit.rack_file));
        let credential =
            proto::auth::operator_credential(&credentials_dir, crate::config::ZONAL_OPERATOR);
        if credential.is_none() {
            warn!(unit = %unit.name, dir = %credentials_dir.display(), "no operator credential for the unit: its head nodes will refuse this zonal plane");
        }
        let mut configured =
            Unit::new(unit.name.clone(), rack, credential.map(std::sync::Arc::new));
        if let Some(path) = unit.host_ca.clone() {
            let pem = std::fs::read(&path)
                .map_err(|source| proto::tls::TlsError::Io {
                    path: path.clone(),
                    source,
                })
                .and_then(|pem| {
                    proto::tls::certs_from_pem(&pem, &path)?;
                    String::from_utf8(pem).map_err(|_| proto::tls::TlsError::Missing {
                        path: path.clone(),
                        what: "UTF-8 PEM text",
                    })
                })?;
            info!(unit = %unit.name, host_ca = %path.display(), "attach answers carry the unit's host-port CA");
            configured = configured.with_host_ca(pem);
        }
        units.push(configured);
    }
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ZonalError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let path = config.data_dir.join(STORE_FILE);
    let store = tokio::task::spawn_blocking({
        let path = path.clone();
        move || Store::open(&path)
    })
    .await
    .map_err(|e| ZonalError::DataDir {
        path: path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?
    .map_err(|source| ZonalError::Store {
        path: path.clone(),
        source,
    })?;

    let zonal = Arc::new(
        Zonal::new(store, units, Arc::new(Metrics::new()))
            .with_attachment_ttl(config.attachment_ttl_ms),
    );
    let reporter = tokio::spawn(zonal.clone().report_loop(
        Duration::from_millis(config.report_interval_ms),
        shutdown.clone(),
    ));
    let address = listener.local_addr().map_err(ZonalError::Serve)?;
    info!(%address, https = tls.is_some(), units = config.units.len(), data_dir = %config.data_dir.display(), "zonal control plane ready");
    let router = crate::api::router(zonal.clone(), tokens);
    let limits = proto::http::HttpLimits::default();
    let stop = shutdown.clone().cancelled_owned();
    let served = match tls {
        Some(acceptor) => {
            let tls = proto::http::HttpTls {
                acceptor,
                handshake_failures: zonal.metrics.tls_handshake_failures.clone(),
            };
            proto::http::serve_tls(listener, router, limits, tls, stop).await
        }
        None => proto::http::serve(listener, router, limits, stop).await,
    };
    // The server may also end on its own (an accept error): stop the rest.
    shutdown.cancel();
    if let Err(e) = reporter.await {
        warn!(error = %e, "report loop ended abnormally");
    }
    zonal.close();
    info!("zonal control plane stopped");
    served.map_err(ZonalError::Serve)
}
