//! The attach agent's admin HTTP endpoint (axum), like the daemons':
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` | OpenMetrics text (`metrics.rs`; the README's table) |
//! | `GET /health` | JSON; 200 when the volume client has a usable map and no partition's primary is down on both networks, else 503 with a `reason`; also the QoS limits in force, the volume record's and the host's |
//!
//! Before each `/metrics` answer the QoS buckets' tokens are published
//! (`rackblock_agent_qos_tokens`), so the gauge is the value at the
//! scrape, not at the last request.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::metrics::{AgentMetrics, NbdMetrics};
use crate::qos::{QosHandle, QosLimits};
use crate::VolumeClient;

/// What the admin endpoint reads.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub export: String,
    pub registry: Arc<Registry>,
    /// `None` for an in-memory export (always healthy).
    pub client: Option<VolumeClient>,
    pub nbd: NbdMetrics,
    pub metrics: AgentMetrics,
    /// The throttle in the path (`None`: no QoS layer).
    pub qos: Option<QosHandle>,
    /// The attach flags' limits (`--qos-*`).
    pub host_qos: QosLimits,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .with_state(state)
}

async fn metrics(State(state): State<AdminState>) -> Response {
    if let Some(qos) = &state.qos {
        state.metrics.publish_qos_tokens(&qos.tokens());
    }
    proto::http::metrics_response(&state.registry)
}

fn qos_json(limits: &QosLimits) -> serde_json::Value {
    let limit = |limit: &Option<crate::qos::Limit>| {
        limit.map(|l| {
            json!({
                "rate": l.rate,
                "burst": l.burst,
                "burst_length_s": l.burst_length.as_secs_f64(),
            })
        })
    };
    json!({
        "iops": limit(&limits.iops),
        "read_iops": limit(&limits.read_iops),
        "write_iops": limit(&limits.write_iops),
        "bps": limit(&limits.bps),
        "read_bps": limit(&limits.read_bps),
        "write_bps": limit(&limits.write_bps),
    })
}

async fn health(State(state): State<AdminState>) -> Response {
    let Some(client) = &state.client else {
        return Json(json!({
            "status": "ok",
            "export": state.export,
            "backend": "memory",
            "nbd_connections_open": state.nbd.open(),
        }))
        .into_response();
    };
    let health = client.health();
    let (code, status) = match &health.unusable {
        None => (StatusCode::OK, "ok"),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    (
        code,
        Json(json!({
            "status": status,
            "reason": health.unusable,
            "export": state.export,
            "volume": health.volume,
            "size_bytes": health.size_bytes,
            "map_generation": health.map_generation,
            "map_error": health.map_error,
            "partitions": health.partitions,
            "primaries": health.primaries,
            "requests_retrying": health.requests_retrying,
            "nbd_connections_open": state.nbd.open(),
            "qos": qos_json(&state.qos.as_ref().map_or(state.host_qos, QosHandle::limits)),
            "qos_host": qos_json(&state.host_qos),
            "qos_volume": client.partition_map().qos,
        })),
    )
        .into_response()
}

/// Serve the admin endpoint on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    proto::http::serve(
        listener,
        router(state),
        proto::http::HttpLimits::default(),
        shutdown,
    )
    .await
}
