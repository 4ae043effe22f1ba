//! The `rackblock sled-controller` process.
//!
//! Startup: load and validate the rack file, find this sled, open each
//! device (a device that fails to open is marked failed and the sled starts
//! without it; a foreign or unreadable-but-not-blank device is a fatal
//! configuration error), format blank devices, recover, then serve the
//! protocol on network A and network B and HTTP on the admin address, and
//! start the scrubber. A network address that cannot be bound is retried
//! every second in the background while the other serves (its
//! `rackblock_sled_listener_up` gauge stays 0 until then). Shutdown (the
//! token) stops accepting, closes connections and returns.
//!
//! The protocol port is the unit port only (SECURITY.md): every connection
//! is authenticated with this sled's key (`sled.<id>.key` in
//! `credentials_dir`, [`proto::auth`]) before a frame is read, and only the
//! unit's head nodes can prove that key: a claim, append, free or read
//! from anyone else is never handled.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hardware::rack::{Rack, RackError};
use hardware::{open_device, FaultyDevice, OpenOptions, SharedDevice, TimedDevice};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::{ConfigError, SledControllerConfig};
use crate::metrics::{Metrics, Network};
use crate::service::{DeviceSlot, FailedDevice, Sled, SledHandler};
use crate::store::{DeviceIdentity, Store, StoreOpenError, StoreOptions};

/// Pause between attempts to bind a network address that failed.
const BIND_RETRY_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum SledControllerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("rack file {}: {source}", path.display())]
    Rack { path: PathBuf, source: RackError },
    /// No sled key: `rackblock rack init-credentials` makes it.
    #[error("sled credentials in {}: {source} (run `rackblock rack init-credentials`)", dir.display())]
    Credentials {
        dir: PathBuf,
        source: proto::auth::AuthError,
    },
    #[error("sled_id {sled_id:?} is not a [[sled]] of rack file {}", rack_file.display())]
    UnknownSled { sled_id: String, rack_file: PathBuf },
    #[error("device {device} of sled {sled_id:?}: {source}")]
    Device {
        sled_id: String,
        device: u16,
        source: StoreOpenError,
    },
    #[error("sled {sled_id:?} has more than 65536 devices")]
    TooManyDevices { sled_id: String },
    #[error("cannot bind admin address {address}: {source}")]
    BindAdmin {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Opens the sled's devices as described by the rack (see module docs).
pub async fn open_sled(
    config: &SledControllerConfig,
    rack: &Rack,
    metrics: Arc<Metrics>,
) -> Result<Sled, SledControllerError> {
    let spec = rack
        .sled(&config.sled_id)
        .ok_or_else(|| SledControllerError::UnknownSled {
            sled_id: config.sled_id.clone(),
            rack_file: config.rack_file.clone(),
        })?;
    let engine = config.engine()?;
    let options = OpenOptions {
        engine,
        ..OpenOptions::default()
    };
    let store_options = StoreOptions::new(rack.unit.column_size_bytes);
    let mut devices = Vec::with_capacity(spec.device.len());
    for (i, device) in spec.device.iter().enumerate() {
        let index = u16::try_from(i).map_err(|_| SledControllerError::TooManyDevices {
            sled_id: config.sled_id.clone(),
        })?;
        let path = device.path.display().to_string();
        let failed = |reason: String| {
            error!(device = index, %path, %reason, "device failed to open; the sled starts without it");
            metrics.set_device_up(index, false);
            DeviceSlot::Failed(FailedDevice {
                device: index,
                path: path.clone(),
                size_bytes: device.size_bytes,
                reason,
            })
        };
        let opened = match open_device(&device.path, &options).and_then(|d| {
            let d = match &config.fault_control_file {
                Some(file) => fault_device(d, file),
                None => d,
            };
            TimedDevice::new(d, config.device_timeout())
                .map(|timed| Arc::new(timed) as Arc<dyn hardware::BlockDevice>)
        }) {
            Ok(opened) => opened,
            Err(e) => {
                devices.push(failed(e.to_string()));
                continue;
            }
        };
        let identity = DeviceIdentity {
            unit_name: rack.unit.name.clone(),
            sled_id: config.sled_id.clone(),
            device_index: index,
        };
        match Store::open(opened, &identity, &store_options, metrics.clone()).await {
            Ok(store) => devices.push(DeviceSlot::Open(Arc::new(store))),
            Err(e) if e.is_fatal() => {
                return Err(SledControllerError::Device {
                    sled_id: config.sled_id.clone(),
                    device: index,
                    source: e,
                })
            }
            Err(e) => devices.push(failed(e.to_string())),
        }
    }
    Ok(Sled::new(
        config.sled_id.clone(),
        rack.unit.column_size_bytes,
        devices,
        metrics,
    ))
}

/// `fault_control_file` (tests only, see the config): `device` behind a
/// fault-injection device that follows `file`.
fn fault_device(device: SharedDevice, file: &std::path::Path) -> SharedDevice {
    tracing::warn!(control = %file.display(), "device on a fault-injection device (fault_control_file)");
    let size_bytes = device.info().size_bytes;
    let faulty = Arc::new(FaultyDevice::new(device));
    faulty.control().follow_file(file.to_path_buf(), size_bytes);
    faulty
}

/// Runs the sled controller until `shutdown` is cancelled.
pub async fn run(
    config: SledControllerConfig,
    shutdown: CancellationToken,
) -> Result<(), SledControllerError> {
    config.validate()?;
    let rack_err = |source| SledControllerError::Rack {
        path: config.rack_file.clone(),
        source,
    };
    let rack = Rack::load(&config.rack_file).map_err(rack_err)?;
    rack.validate_devices().map_err(rack_err)?;
    let spec = rack
        .sled(&config.sled_id)
        .ok_or_else(|| SledControllerError::UnknownSled {
            sled_id: config.sled_id.clone(),
            rack_file: config.rack_file.clone(),
        })?
        .clone();
    let metrics = Arc::new(Metrics::new());
    let credentials_dir = config.credentials_dir();
    let credential = Arc::new(
        proto::auth::load_credential(&credentials_dir, proto::auth::Role::Sled, &config.sled_id)
            .map_err(|source| SledControllerError::Credentials {
                dir: credentials_dir.clone(),
                source,
            })?,
    );
    let sled = Arc::new(open_sled(&config, &rack, metrics.clone()).await?);

    let admin =
        TcpListener::bind(spec.admin)
            .await
            .map_err(|source| SledControllerError::BindAdmin {
                address: spec.admin,
                source,
            })?;

    let mut tasks = JoinSet::new();
    for (network, address) in [(Network::A, spec.address_a), (Network::B, spec.address_b)] {
        metrics.set_listener_up(network, false);
        tasks.spawn(serve_network(
            sled.clone(),
            credential.clone(),
            network,
            address,
            shutdown.clone(),
        ));
    }
    {
        let router = crate::admin::router(sled.clone());
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = proto::http::serve(
                admin,
                router,
                proto::http::HttpLimits::default(),
                shutdown.cancelled_owned(),
            )
            .await
            {
                error!(error = %e, "admin server failed");
            }
        });
    }
    if config.scrub_bytes_per_second > 0 {
        let sled = sled.clone();
        let shutdown = shutdown.clone();
        let interval = Duration::from_millis(config.scrub_pass_interval_ms);
        let rate = config.scrub_bytes_per_second;
        tasks.spawn(async move { sled.run_scrubber(rate, interval, shutdown).await });
    }
    if proto::auth::frame_macs_off() {
        tracing::warn!(
            env = proto::auth::BENCH_NO_FRAME_MAC_ENV,
            "BENCH SWITCH: unit-port frames carry no MAC (handshake still required); never in production"
        );
    }
    info!(
        sled_id = %config.sled_id,
        address_a = %spec.address_a,
        address_b = %spec.address_b,
        admin = %spec.admin,
        devices = sled.devices().len(),
        healthy_devices = sled.healthy_device_count(),
        "sled controller ready"
    );
    shutdown.cancelled().await;
    proto::server::drain_tasks(&mut tasks, SHUTDOWN_DRAIN_BOUND).await;
    info!(sled_id = %config.sled_id, "sled controller stopped");
    Ok(())
}

/// Only head nodes reach a sled (module docs); the key already says so,
/// and this says it again should another role ever get a sled key.
pub fn sled_port_allows(peer: &proto::auth::Peer, _kind: u16) -> bool {
    peer.role == proto::auth::Role::HeadNode
}

/// How long shutdown waits for the daemon's tasks before aborting them.
const SHUTDOWN_DRAIN_BOUND: Duration = Duration::from_secs(10);

/// Binds `address` (retrying every second until bound or shutdown) and
/// serves the protocol on it.
async fn serve_network(
    sled: Arc<Sled>,
    credential: Arc<proto::auth::Credential>,
    network: Network,
    address: SocketAddr,
    shutdown: CancellationToken,
) {
    let metrics = sled.metrics().clone();
    let Some(listener) =
        proto::server::bind_with_retry(network.name(), address, BIND_RETRY_INTERVAL, &shutdown)
            .await
    else {
        return;
    };
    metrics.set_listener_up(network, true);
    let handler = Arc::new(SledHandler {
        sled: sled.clone(),
        network: Some(network),
    });
    let result = proto::server::serve_with_metrics(
        listener,
        handler,
        proto::server::ServerConfig {
            // See `SledHandler`: mutations run to completion.
            finish_abandoned_requests: true,
            access: proto::server::Access::Authenticated {
                credential,
                allow: sled_port_allows,
            },
            ..proto::server::ServerConfig::default()
        },
        shutdown,
        metrics.server.clone(),
    )
    .await;
    metrics.set_listener_up(network, false);
    if let Err(e) = result {
        error!(network = network.name(), %address, error = %e, "protocol server failed");
    }
}
