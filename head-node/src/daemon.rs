//! The `rackblock head-node` process.
//!
//! Startup: load and validate the rack file (structure only: a head node
//! opens no sled device), find this head node, start its local-control-
//! plane member ([`LcpNode`]: Raft storage under `<data_dir>/raft`,
//! bootstrap from the rack with no manual step), open and recover the write
//! log and start the [`PartitionManager`] (it opens the partitions the
//! control plane assigns here once a leader is known), then serve the
//! protocol on network A and network B and HTTP on the admin address. A
//! network address that cannot be bound is retried every second in the
//! background while the other serves (its `rackblock_head_node_listener_up`
//! gauge stays 0 until then): Raft and clients reach the node over
//! whichever network works.
//!
//! **Two kinds of port** (SECURITY.md). The *unit port* (the rack's
//! `address_a` and `address_b`) serves the unit's members: every
//! connection is authenticated first ([`proto::auth`], with this node's
//! unit credential from `credentials_dir`), and [`unit_port_allows`] says
//! what each kind of peer may send: head nodes anything, operators only
//! control-plane requests (and Ping), sleds nothing. The *host port* (the
//! rack's `host`, when set) takes no handshake and only host messages
//! ([`proto::message::kind::is_host_request`]): I/O checked against the
//! attachment credential, and `HostMap`, the partition map of the volume
//! of a valid attachment, with every address in it (and in `NotPrimary`
//! hints) replaced by the head nodes' host ports, and `HostReservations`,
//! the read or compare-and-set of that volume's SCSI persistent
//! reservations (`local_control_plane::state::reservations`). Anything else on the
//! host port closes the connection and counts in
//! `rackblock_server_bad_frames_total{port="host",reason="refused_kind"}`.
//! With `host_tls_cert`/`host_tls_key` the host port speaks TLS (rustls;
//! `proto::server` module docs), and with `host_tls_required` only TLS:
//! a plain-TCP host is closed before a frame is read and counted in
//! `rackblock_server_tls_handshake_failures_total{port="host",reason="plaintext"}`.
//!
//! Routing of proto requests: `Host` → the partition's primary here
//! ([`PartitionManager::handle_host`]; `NotPrimary{hint}` otherwise),
//! `Replica` → the partition's secondary here
//! ([`PartitionManager::handle_replica`]; `NotSecondary` otherwise),
//! everything else (Raft, control-plane requests) → the [`LcpNode`].
//!
//! **The control plane has threads of its own.** The [`LcpNode`] (openraft's
//! core, its replication streams and Raft links, the leader's controllers,
//! the quick election) is started on a dedicated two-thread runtime, and
//! every incoming Raft or control-plane request is handled there: on a
//! busy box, heartbeats, votes and lease renewals no longer queue behind
//! data-path tasks on the main runtime's workers (a leader that looked
//! dead for an election timeout raised the term under load). Connections
//! whose first request is a Raft or control-plane one are moved to that
//! runtime too (`proto::server`'s control connections), so the frames of
//! heartbeats are read and answered there, and its threads run at a
//! higher priority ([`LCP_THREAD_NICE`]): measured on a loaded 2-core box
//! (`bench/raft-term.sh` beside a second unit and a disk-bound load), the
//! data runtime read a heartbeat or a probe more than 100 ms late, Raft log
//! syncs waited for CPU, and followers' election timers ran out.
//!
//! Shutdown (the token) stops accepting, stops the partitions, stops Raft
//! and returns. A fatal stop of the Raft core ([`LcpNode::fatal`]) does the
//! same and returns [`HeadNodeError::RaftStopped`]: the process exits
//! non-zero and its supervisor restarts it from its data directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use hardware::rack::{Rack, RackError};
use local_control_plane::client::{
    HostReservationReply, HostReservationRequest, LcpRequest, LcpResponse,
};
use local_control_plane::node::StartError;
use local_control_plane::{LcpConfig, LcpNode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::auth::{Peer, Role};
use proto::message::kind;
use proto::server::{Access, Handler, ServerMetrics};
use proto::volume::{HostError, HostReply};
use proto::Message;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::admin::{self, AdminState};
use crate::config::{ConfigError, HeadNodeConfig};
use crate::manager::{ManagerConfig, ManagerError, PartitionManager};

/// Pause between attempts to bind a network address that failed.
const BIND_RETRY_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum HeadNodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("rack file {}: {source}", path.display())]
    Rack { path: PathBuf, source: RackError },
    #[error("head_node_id {head_node_id:?} is not a [[head_node]] of rack file {}", rack_file.display())]
    UnknownHeadNode {
        head_node_id: String,
        rack_file: PathBuf,
    },
    #[error("local control plane: {0}")]
    ControlPlane(#[from] StartError),
    #[error("data path: {0}")]
    DataPath(#[from] ManagerError),
    /// The Raft core stopped on a fatal error; the process must restart
    /// from its data directory (its supervisor starts it again).
    #[error("local control plane stopped: {reason}")]
    RaftStopped { reason: String },
    #[error("cannot start the control plane's runtime: {reason}")]
    RaftRuntime { reason: String },
    /// No unit credential: `rackblock rack init-credentials` makes them.
    #[error("unit credentials in {}: {source} (run `rackblock rack init-credentials`)", dir.display())]
    Credentials {
        dir: PathBuf,
        source: proto::auth::AuthError,
    },
    /// The host port's certificate or key cannot be used.
    #[error("host port TLS: {0}")]
    HostTls(#[from] proto::tls::TlsError),
    /// Some head nodes of the rack have a host port and others not.
    #[error("rack file {}: either every head node has a `host` port or none", path.display())]
    PartialHostPorts { path: PathBuf },
    #[error("cannot bind admin address {address}: {source}")]
    BindAdmin {
        address: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NetworkLabels {
    network: &'static str,
}

/// Proto requests → the partitions or the control-plane member.
#[derive(Debug)]
struct HeadNodeHandler {
    node: LcpNode,
    manager: PartitionManager,
    /// The control plane's runtime (module docs).
    lcp_runtime: tokio::runtime::Handle,
}

impl Handler for HeadNodeHandler {
    fn handle(&self, request: Message) -> BoxFuture<'static, Message> {
        let node = self.node.clone();
        let manager = self.manager.clone();
        let lcp_runtime = self.lcp_runtime.clone();
        Box::pin(async move {
            match request {
                Message::Host(request)
                    if matches!(request.op, proto::volume::HostOp::SnapshotControl { .. }) =>
                {
                    // unit_port_allows: only head nodes send this kind here.
                    Message::HostReply(manager.handle_snapshot_control(request).await)
                }
                Message::Host(request)
                    if matches!(
                        request.op,
                        proto::volume::HostOp::SnapshotDiff { .. }
                            | proto::volume::HostOp::SnapshotUsage
                            | proto::volume::HostOp::SnapshotMap { .. }
                    ) =>
                {
                    // unit_port_allows: operators and head nodes.
                    Message::HostReply(manager.handle_snapshot_query(request).await)
                }
                Message::Host(request)
                    if matches!(request.op, proto::volume::HostOp::ReadSnapshot { .. })
                        && request.credential.attachment == 0 =>
                {
                    // A clone's primary reading its parent snapshot
                    // (manager::ParentReader); unit_port_allows: only head
                    // nodes send host kinds here.
                    Message::HostReply(manager.handle_parent_read(request).await)
                }
                Message::Host(request) => Message::HostReply(manager.handle_host(request).await),
                Message::Replica(request) => {
                    Message::ReplicaReply(manager.handle_replica(request).await)
                }
                other => {
                    let answer = lcp_runtime.spawn(async move { node.handle(other).await });
                    match answer.await {
                        Ok(reply) => reply,
                        // Only when the runtime shuts down: no reply, the
                        // peer times out and retries elsewhere.
                        Err(error) => {
                            warn!(%error, "control-plane request dropped at shutdown");
                            std::future::pending().await
                        }
                    }
                }
            }
        })
    }
}

/// What a peer authenticated on the unit port may send (module docs).
pub fn unit_port_allows(peer: &Peer, kind: u16) -> bool {
    match peer.role {
        Role::HeadNode => true,
        Role::Operator => matches!(
            kind,
            kind::PING
                | kind::LCP_CLIENT
                | kind::HOST_SNAPSHOT_DIFF
                | kind::HOST_SNAPSHOT_USAGE
                | kind::HOST_SNAPSHOT_MAP
        ),
        Role::Sled => kind == kind::PING,
    }
}

/// The host port's handler: host I/O and the attachment's partition map
/// (module docs); every address a host sees is a host port.
#[derive(Debug)]
struct HostPortHandler {
    node: LcpNode,
    manager: PartitionManager,
    lcp_runtime: tokio::runtime::Handle,
    /// Head node id → its host port.
    host_ports: Arc<std::collections::HashMap<String, SocketAddr>>,
    /// Attachments whose renewal this node is proposing now (one at a time
    /// each).
    renewing: Arc<std::sync::Mutex<std::collections::HashSet<(u64, u64)>>>,
}

/// Most renewals one head node proposes at once; a map read past it
/// renews nothing (the next one, 2 s later, tries again).
const MAX_RENEWALS_IN_FLIGHT: usize = 256;

/// Renews an expiring attachment whose host just read its map, once half
/// its TTL has passed (state machine `volumes` module docs: expiry): one
/// `RenewAttachment` in the background, at most one per attachment at a
/// time on this node, so a host's map reads cost the unit at most one
/// Raft entry per half TTL.
fn renew_if_due(
    node: &LcpNode,
    lcp_runtime: &tokio::runtime::Handle,
    renewing: &Arc<std::sync::Mutex<std::collections::HashSet<(u64, u64)>>>,
    volume: u64,
    attachment: u64,
) {
    let Some((ttl_ms, expires_at_ms)) = node.attachment_expiry(volume, attachment) else {
        return;
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    if expires_at_ms.saturating_sub(now_ms) > ttl_ms / 2 {
        return;
    }
    {
        let mut set = renewing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if set.len() >= MAX_RENEWALS_IN_FLIGHT || !set.insert((volume, attachment)) {
            return;
        }
    }
    let (node, renewing) = (node.clone(), renewing.clone());
    lcp_runtime.spawn(async move {
        let command = local_control_plane::Command::RenewAttachment {
            volume,
            attachment,
            now_ms,
        };
        match node.serve(LcpRequest::Command(command)).await {
            LcpResponse::Applied(Ok(_)) => {
                debug!(volume, attachment, "attachment renewed")
            }
            other => debug!(volume, attachment, ?other, "attachment renewal failed"),
        }
        renewing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(volume, attachment));
    });
}

impl Handler for HostPortHandler {
    fn handle(&self, request: Message) -> BoxFuture<'static, Message> {
        let node = self.node.clone();
        let manager = self.manager.clone();
        let lcp_runtime = self.lcp_runtime.clone();
        let host_ports = self.host_ports.clone();
        let renewing = self.renewing.clone();
        Box::pin(async move {
            match request {
                Message::Host(request) => {
                    let reply = manager.handle_host(request).await;
                    Message::HostReply(host_hint(reply, &host_ports))
                }
                Message::HostMap { volume, credential } => {
                    if let Err(error) = manager.check_attachment(volume, &credential).await {
                        return Message::HostReply(HostReply::Error(error));
                    }
                    renew_if_due(
                        &node,
                        &lcp_runtime,
                        &renewing,
                        volume,
                        credential.attachment,
                    );
                    let read = lcp_runtime.spawn(async move {
                        node.serve(LcpRequest::PartitionMap { volume }).await
                    });
                    let map = match read.await {
                        Ok(LcpResponse::PartitionMap(map)) => map,
                        // No leader yet, a deleted volume, a runtime going
                        // down: the host retries (its credential was valid).
                        Ok(other) => {
                            return Message::HostReply(HostReply::Error(HostError::Unavailable {
                                reason: format!("partition map: {other:?}"),
                            }))
                        }
                        Err(error) => {
                            return Message::HostReply(HostReply::Error(HostError::Unavailable {
                                reason: error.to_string(),
                            }))
                        }
                    };
                    let map = host_map(map, &host_ports);
                    match serde_json::to_vec(&map) {
                        Ok(payload) => Message::HostMapReply {
                            payload: payload.into(),
                        },
                        Err(error) => Message::HostReply(HostReply::Error(HostError::Io {
                            reason: error.to_string(),
                        })),
                    }
                }
                Message::HostReservations {
                    volume,
                    credential,
                    payload,
                } => {
                    if let Err(error) = manager.check_attachment(volume, &credential).await {
                        return Message::HostReply(HostReply::Error(error));
                    }
                    let request = match serde_json::from_slice::<HostReservationRequest>(&payload) {
                        Ok(request) => request,
                        Err(error) => {
                            return Message::HostReply(HostReply::Error(HostError::BadRequest {
                                reason: format!("undecodable reservation request: {error}"),
                            }))
                        }
                    };
                    let answer = lcp_runtime
                        .spawn(async move { host_reservations(&node, volume, request).await })
                        .await
                        .unwrap_or_else(|error| {
                            Err(HostError::Unavailable {
                                reason: error.to_string(),
                            })
                        });
                    match answer.and_then(|reply| {
                        serde_json::to_vec(&reply).map_err(|error| HostError::Io {
                            reason: error.to_string(),
                        })
                    }) {
                        Ok(payload) => Message::HostReservationsReply {
                            payload: payload.into(),
                        },
                        Err(error) => Message::HostReply(HostReply::Error(error)),
                    }
                }
                // The server's policy lets nothing else through.
                other => Message::HostReply(HostReply::Error(HostError::BadRequest {
                    reason: format!("kind {:#06x} is not served on the host port", other.kind()),
                })),
            }
        })
    }
}

/// A host's read or compare-and-set of its volume's persistent
/// reservations (the credential was checked): a linearizable read, or a
/// `SetReservations` command; a lost compare-and-set answers the current
/// record. No leader, a forward that failed: `Unavailable`, the host
/// retries (a compare-and-set whose outcome is unknown then finds the
/// version moved, and compares the record it reads with its own).
async fn host_reservations(
    node: &LcpNode,
    volume: u64,
    request: HostReservationRequest,
) -> Result<HostReservationReply, HostError> {
    let unavailable = |what: &str, response: &LcpResponse| HostError::Unavailable {
        reason: format!("reservations {what}: {response:?}"),
    };
    let read = || async {
        match node.serve(LcpRequest::Reservations { volume }).await {
            LcpResponse::Reservations(record) => Ok(record),
            other => Err(unavailable("read", &other)),
        }
    };
    match request {
        HostReservationRequest::Read => Ok(HostReservationReply {
            applied: false,
            record: read().await?,
        }),
        HostReservationRequest::Set {
            expected_version,
            record,
        } => {
            let command = local_control_plane::Command::SetReservations {
                volume,
                expected_version,
                record: record.clone(),
            };
            match node.serve(LcpRequest::Command(command)).await {
                LcpResponse::Applied(Ok(local_control_plane::Outcome::ReservationsSet {
                    version,
                    ..
                })) => Ok(HostReservationReply {
                    applied: true,
                    record: local_control_plane::state::PersistentReservations {
                        version,
                        ..record
                    },
                }),
                LcpResponse::Applied(Err(
                    local_control_plane::CommandError::ReservationVersion { .. },
                )) => Ok(HostReservationReply {
                    applied: false,
                    record: read().await?,
                }),
                LcpResponse::Applied(Err(error)) => Err(HostError::BadRequest {
                    reason: error.to_string(),
                }),
                other => Err(unavailable("update", &other)),
            }
        }
    }
}

/// A `NotPrimary` hint names the primary's host port (both paths).
fn host_hint(
    reply: HostReply,
    host_ports: &std::collections::HashMap<String, SocketAddr>,
) -> HostReply {
    match reply {
        HostReply::Error(HostError::NotPrimary { hint: Some(hint) }) => {
            let hint = host_ports
                .get(&hint.node_id)
                .map(|host| proto::volume::NodeHint {
                    node_id: hint.node_id.clone(),
                    address_a: *host,
                    address_b: *host,
                });
            HostReply::Error(HostError::NotPrimary { hint })
        }
        other => other,
    }
}

/// The map with each node's host port in place of its unit addresses.
fn host_map(
    mut map: local_control_plane::state::PartitionMap,
    host_ports: &std::collections::HashMap<String, SocketAddr>,
) -> local_control_plane::state::PartitionMap {
    for entry in &mut map.partitions {
        for node in [&mut entry.primary, &mut entry.secondary] {
            let host = host_ports
                .get(&node.id.0)
                .map_or_else(String::new, |address| address.to_string());
            node.address_a = host.clone();
            node.address_b = host;
        }
    }
    map
}

/// Runs the head node until `shutdown` is cancelled.
pub async fn run(config: HeadNodeConfig, shutdown: CancellationToken) -> Result<(), HeadNodeError> {
    config.validate()?;
    let rack = Rack::load(&config.rack_file).map_err(|source| HeadNodeError::Rack {
        path: config.rack_file.clone(),
        source,
    })?;
    let spec = rack
        .head_node(&config.head_node_id)
        .ok_or_else(|| HeadNodeError::UnknownHeadNode {
            head_node_id: config.head_node_id.clone(),
            rack_file: config.rack_file.clone(),
        })?
        .clone();
    let credentials_dir = config.credentials_dir();
    let credential = Arc::new(
        proto::auth::load_credential(&credentials_dir, Role::HeadNode, &config.head_node_id)
            .map_err(|source| HeadNodeError::Credentials {
                dir: credentials_dir.clone(),
                source,
            })?,
    );
    let host_ports: std::collections::HashMap<String, SocketAddr> = rack
        .head_node
        .iter()
        .filter_map(|h| Some((h.id.clone(), h.host?)))
        .collect();
    if !host_ports.is_empty() && host_ports.len() != rack.head_node.len() {
        return Err(HeadNodeError::PartialHostPorts {
            path: config.rack_file.clone(),
        });
    }
    let host_ports = Arc::new(host_ports);
    let host_tls = match (&config.host_tls_cert, &config.host_tls_key) {
        (Some(cert), Some(key)) => Some(proto::server::ServerTls {
            acceptor: proto::tls::acceptor(cert, key)?,
            required: config.host_tls_required(),
        }),
        _ => None,
    };
    // Bind admin first: a taken admin port is a configuration error worth
    // failing on before Raft starts.
    let admin_listener =
        TcpListener::bind(spec.admin)
            .await
            .map_err(|source| HeadNodeError::BindAdmin {
                address: spec.admin,
                source,
            })?;

    let mut registry = Registry::default();
    let server_metrics =
        ServerMetrics::new(registry.sub_registry_with_label(("port".into(), "unit".into())));
    let host_server_metrics =
        ServerMetrics::new(registry.sub_registry_with_label(("port".into(), "host".into())));
    let listener_up = Family::<NetworkLabels, Gauge>::default();
    registry.register(
        "rackblock_head_node_listener_up",
        "1 while the head node serves on the network",
        listener_up.clone(),
    );
    let lcp_config = LcpConfig {
        rack: rack.clone(),
        node_id: config.head_node_id.clone(),
        data_dir: config.data_dir.join("raft"),
        heartbeat_interval: config.heartbeat_interval(),
        election_timeout_min: config.election_timeout_min(),
        election_timeout_max: config.election_timeout_max(),
        node_down_after: config.node_down_after(),
        node_refused_down_after: config.node_refused_down_after(),
        quick_election: config.quick_election(),
        failover: config.failover(),
        repair: config.repair(),
        auth: Some(credential.clone()),
    };
    let lcp_runtime = LcpRuntime::start(shutdown.clone())?;
    let (started, mut registry) = lcp_runtime
        .handle
        .spawn(async move {
            let started = LcpNode::start(lcp_config, &mut registry).await;
            (started, registry)
        })
        .await
        .map_err(|e| HeadNodeError::RaftRuntime {
            reason: e.to_string(),
        })?;
    let node = started?;
    let manager_config = ManagerConfig {
        node_id: config.head_node_id.clone(),
        wal_path: config.wal_path(),
        wal_size_bytes: config.wal_size_bytes(),
        engine: config.engine()?,
        wal_timeout: config.wal_timeout(),
        wal_cache_bytes: config.wal_cache_bytes(),
        lease_duration: config.lease_duration(),
        lease_renew_interval: config.lease_renew_interval(),
        flush_age: config.flush_age(),
        flush_fill_ratio: config.flush_fill_ratio(),
        gc_interval: config.gc_interval(),
        checkpoint_every_flushes: config.checkpoint_every_flushes(),
        direct_write_min_bytes: config.direct_write_min_bytes(),
        checkpoint_interval: config.checkpoint_interval(),
        poll_interval: config.partition_poll_interval(),
        auth: Some(credential.clone()),
        rollback_bytes_per_second: config.rollback_bytes_per_second,
        test_cut_reply_delay: config.test_snapshot_cut_reply_delay(),
    };
    let manager =
        match PartitionManager::start(manager_config, node.clone(), &rack, &mut registry).await {
            Ok(manager) => manager,
            Err(error) => {
                node.shutdown().await;
                return Err(error.into());
            }
        };
    let rebuild_metrics = crate::repair::RebuildMetrics::register(&mut registry);
    let registry = Arc::new(registry);

    let mut tasks = JoinSet::new();
    let listen_a = config.listen_a.unwrap_or(spec.address_a);
    let listen_b = config.listen_b.unwrap_or(spec.address_b);
    for (network, address) in [("a", listen_a), ("b", listen_b)] {
        let gauge = listener_up
            .get_or_create(&NetworkLabels { network })
            .clone();
        gauge.set(0);
        let handler = Arc::new(HeadNodeHandler {
            node: node.clone(),
            manager: manager.clone(),
            lcp_runtime: lcp_runtime.handle.clone(),
        });
        let access = Access::Authenticated {
            credential: credential.clone(),
            allow: unit_port_allows,
        };
        tasks.spawn(serve_network(
            handler,
            proto::server::ServerConfig {
                access,
                // Raft and control-plane connections are read on the
                // control plane's runtime (proto::server module docs).
                control_runtime: Some(lcp_runtime.handle.clone()),
                ..proto::server::ServerConfig::default()
            },
            network,
            address,
            gauge,
            server_metrics.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(host) = spec.host {
        let gauge = listener_up
            .get_or_create(&NetworkLabels { network: "host" })
            .clone();
        gauge.set(0);
        let handler = Arc::new(HostPortHandler {
            node: node.clone(),
            manager: manager.clone(),
            lcp_runtime: lcp_runtime.handle.clone(),
            host_ports: host_ports.clone(),
            renewing: Arc::default(),
        });
        tasks.spawn(serve_network(
            handler,
            proto::server::ServerConfig {
                access: Access::Kinds(kind::is_host_request),
                tls: host_tls.clone(),
                max_connections: Some(config.host_connection_caps()),
                idle_timeout: Some(config.host_idle_timeout()),
                ..proto::server::ServerConfig::default()
            },
            "host",
            host,
            gauge,
            host_server_metrics,
            shutdown.clone(),
        ));
    }
    {
        let router = admin::router(AdminState {
            node: node.clone(),
            manager: manager.clone(),
            registry: registry.clone(),
        });
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = proto::http::serve(
                admin_listener,
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
    {
        // Column rebuilds of this node's primaries (crate::repair).
        let worker = crate::repair::RepairWorker::new(
            node.clone(),
            manager.clone(),
            &config.head_node_id,
            config.repair(),
            config.repair_poll_interval(),
            rebuild_metrics,
        );
        tasks.spawn(worker.run(shutdown.clone()));
    }
    let manager_task = {
        let manager = manager.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { manager.run(shutdown).await })
    };
    if proto::auth::frame_macs_off() {
        warn!(
            env = proto::auth::BENCH_NO_FRAME_MAC_ENV,
            "BENCH SWITCH: unit-port frames carry no MAC (handshake still required); never in production"
        );
    }
    info!(
        head_node_id = %config.head_node_id,
        raft_id = node.raft_id(),
        address_a = %spec.address_a,
        address_b = %spec.address_b,
        %listen_a,
        %listen_b,
        admin = %spec.admin,
        host = ?spec.host,
        host_tls = ?host_tls.as_ref().map(|tls| if tls.required { "required" } else { "offered" }),
        "head node ready"
    );
    let fatal = tokio::select! {
        () = shutdown.cancelled() => None,
        fatal = node.fatal() => fatal,
    };
    if let Some(reason) = &fatal {
        error!(%reason, "raft core stopped; shutting down so that the supervisor restarts this head node");
        shutdown.cancel();
    }
    if tokio::time::timeout(Duration::from_secs(5), manager_task)
        .await
        .is_err()
    {
        warn!("partition manager still running 5 s after shutdown");
        manager.stop();
    }
    node.shutdown().await;
    proto::server::drain_tasks(&mut tasks, SHUTDOWN_DRAIN_BOUND).await;
    info!(head_node_id = %config.head_node_id, "head node stopped");
    match fatal {
        Some(reason) => Err(HeadNodeError::RaftStopped { reason }),
        None => Ok(()),
    }
}

/// The control plane's runtime (module docs): two worker threads, so a
/// blocking Raft log sync on one never holds back heartbeats on the other.
/// It lives until the daemon's shutdown token is cancelled and the last
/// handle is gone.
struct LcpRuntime {
    handle: tokio::runtime::Handle,
}

/// Worker threads of the control plane's runtime.
const LCP_RUNTIME_THREADS: usize = 2;

impl LcpRuntime {
    fn start(shutdown: CancellationToken) -> Result<LcpRuntime, HeadNodeError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(LCP_RUNTIME_THREADS)
            .thread_name("lcp")
            .on_thread_start(raise_thread_priority)
            .enable_all()
            .build()
            .map_err(|e| HeadNodeError::RaftRuntime {
                reason: e.to_string(),
            })?;
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("lcp-runtime".into())
            .spawn(move || {
                runtime.block_on(shutdown.cancelled());
                // Dropped outside any async context; give Raft's shutdown
                // (awaited by `run` on the main runtime) time to finish.
                std::thread::sleep(SHUTDOWN_DRAIN_BOUND);
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| HeadNodeError::RaftRuntime {
                reason: e.to_string(),
            })?;
        Ok(LcpRuntime { handle })
    }
}

/// Nice value of the control plane's threads (workers and blocking pool):
/// under CPU contention the scheduler runs them first (weight ~9x a
/// default thread's), so heartbeats, votes and lease renewals are not held
/// up behind the data path's threads and other processes (module docs).
const LCP_THREAD_NICE: libc::c_int = -10;

/// Gives the calling thread [`LCP_THREAD_NICE`]. Without the privilege
/// (`CAP_SYS_NICE`) the thread keeps its priority: logged once, not fatal.
fn raise_thread_priority() {
    // SAFETY: gettid has no preconditions; setpriority changes only the
    // calling thread's nice value (on Linux, nice is per thread).
    let result = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, LCP_THREAD_NICE)
    };
    if result != 0 {
        static WARNED: std::sync::Once = std::sync::Once::new();
        let error = std::io::Error::last_os_error();
        WARNED.call_once(|| {
            warn!(%error, nice = LCP_THREAD_NICE, "cannot raise the control plane's thread priority");
        });
    }
}

/// How long shutdown waits for the daemon's tasks before aborting them.
const SHUTDOWN_DRAIN_BOUND: Duration = Duration::from_secs(10);

/// Binds `address` (retrying every second until bound or shutdown) and
/// serves the protocol on it.
async fn serve_network(
    handler: Arc<dyn Handler>,
    config: proto::server::ServerConfig,
    network: &'static str,
    address: SocketAddr,
    listener_up: Gauge,
    metrics: ServerMetrics,
    shutdown: CancellationToken,
) {
    let Some(listener) =
        proto::server::bind_with_retry(network, address, BIND_RETRY_INTERVAL, &shutdown).await
    else {
        return;
    };
    listener_up.set(1);
    let result =
        proto::server::serve_with_metrics(listener, handler, config, shutdown, metrics).await;
    listener_up.set(0);
    if let Err(e) = result {
        error!(network, %address, error = %e, "protocol server failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The snapshot coordinator's request reaches a head node's unit port
    /// from head nodes only, and never its host port; a host's snapshot
    /// read is a host request.
    #[test]
    fn snapshot_control_is_for_head_nodes_only() {
        let peer = |role| Peer {
            role,
            id: "x".into(),
        };
        assert!(unit_port_allows(
            &peer(Role::HeadNode),
            kind::HOST_SNAPSHOT_CONTROL
        ));
        assert!(!unit_port_allows(
            &peer(Role::Operator),
            kind::HOST_SNAPSHOT_CONTROL
        ));
        assert!(!unit_port_allows(
            &peer(Role::Sled),
            kind::HOST_SNAPSHOT_CONTROL
        ));
        assert!(!kind::is_host_request(kind::HOST_SNAPSHOT_CONTROL));
        assert!(kind::is_host_request(kind::HOST_READ_SNAPSHOT));
    }

    /// An operator (the CLI, the zonal plane) may query the snapshots'
    /// index (diff, usage) on the unit port; a sled may not, and a host
    /// port never serves them.
    #[test]
    fn snapshot_queries_are_for_operators_on_the_unit_port() {
        let peer = |role| Peer {
            role,
            id: "x".into(),
        };
        for query in [
            kind::HOST_SNAPSHOT_DIFF,
            kind::HOST_SNAPSHOT_USAGE,
            kind::HOST_SNAPSHOT_MAP,
        ] {
            assert!(unit_port_allows(&peer(Role::Operator), query));
            assert!(unit_port_allows(&peer(Role::HeadNode), query));
            assert!(!unit_port_allows(&peer(Role::Sled), query));
            assert!(!kind::is_host_request(query));
        }
        // Operators still may not read data or control cuts.
        assert!(!unit_port_allows(
            &peer(Role::Operator),
            kind::HOST_READ_SNAPSHOT
        ));
        assert!(!unit_port_allows(&peer(Role::Operator), kind::HOST_READ));
    }
}
