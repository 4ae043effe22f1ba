//! Admin HTTP endpoint of a head node (axum):
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` | OpenMetrics text: Raft (is_leader, term, last_log_index, last_applied), detector path states, links, listeners |
//! | `GET /health` | JSON; 200 when this node knows a leader (itself or another), else 503 |
//! | `GET /status` | JSON `{raft, this_node, unit, datapath_ready, write_log_failure, partitions}`: Raft status and unit status, linearizable (served via the leader), and the partitions hosted here |
//! | `GET /partitions` | JSON `{ready, partitions}`: the partitions hosted here (role, epoch, lease, log-resident blocks, flush/GC counters, repair queue), local |
//! | `POST /flush` | flushes every primary here to the sleds now; JSON per partition (tests, operators before maintenance) |
//! | `GET /volumes/{id}/partition-map` | JSON partition map, linearizable; 404 for an unknown volume |
//! | `GET /volumes/{id}/blocks/{block}` | JSON: what each partition hosted here says of 4 KiB volume block `block` (role, epoch, sequence of its last write or trim, location), local; for debugging |

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use local_control_plane::{LcpError, LcpNode, LcpRequest, LcpResponse};
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::manager::PartitionManager;

#[derive(Debug, Clone)]
pub struct AdminState {
    pub node: LcpNode,
    pub manager: PartitionManager,
    pub registry: Arc<Registry>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/status", get(status))
        .route("/partitions", get(partitions))
        .route("/flush", post(flush))
        .route("/volumes/{id}/partition-map", get(partition_map))
        .route("/volumes/{id}/blocks/{block}", get(describe_block))
        .with_state(state)
}

async fn metrics(State(state): State<AdminState>) -> Response {
    proto::http::metrics_response(&state.registry)
}

async fn health(State(state): State<AdminState>) -> Response {
    let raft = state.node.raft_status();
    let (code, status) = if raft.leader.is_some() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no_leader")
    };
    (
        code,
        Json(json!({
            "status": status,
            "head_node_id": raft.this_node_name,
            "raft_state": raft.state,
            "leader": raft.leader_name,
            "term": raft.term,
        })),
    )
        .into_response()
}

fn error_response(response: LcpResponse) -> Response {
    let code = match &response {
        LcpResponse::Error(LcpError::UnknownVolume { .. }) => StatusCode::NOT_FOUND,
        LcpResponse::Error(LcpError::BadRequest { .. }) => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, Json(json!({ "error": response }))).into_response()
}

async fn status(State(state): State<AdminState>) -> Response {
    match state.node.serve(LcpRequest::UnitStatus).await {
        LcpResponse::UnitStatus { raft, unit } => {
            // The unit comes from the leader; the Raft view is this node's.
            let local = state.node.raft_status();
            Json(json!({
                "raft": raft,
                "this_node": local,
                "unit": unit,
                "datapath_ready": state.manager.is_ready(),
                "write_log_failure": state.manager.log_failure(),
                "partitions": state.manager.status(),
            }))
            .into_response()
        }
        other => error_response(other),
    }
}

async fn partitions(State(state): State<AdminState>) -> Response {
    Json(json!({
        "ready": state.manager.is_ready(),
        "write_log_failure": state.manager.log_failure(),
        "partitions": state.manager.status(),
    }))
    .into_response()
}

async fn flush(State(state): State<AdminState>) -> Response {
    let outcomes = state.manager.flush_all().await;
    let code = if outcomes.iter().all(|o| o.error.is_none()) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(json!({ "flushed": outcomes }))).into_response()
}

async fn partition_map(State(state): State<AdminState>, Path(id): Path<u64>) -> Response {
    match state
        .node
        .serve(LcpRequest::PartitionMap { volume: id })
        .await
    {
        LcpResponse::PartitionMap(map) => Json(map).into_response(),
        other => error_response(other),
    }
}

async fn describe_block(
    State(state): State<AdminState>,
    Path((id, block)): Path<(u64, u64)>,
) -> Response {
    Json(json!({ "hosted": state.manager.describe_block(id, block) })).into_response()
}
