//! Admin HTTP endpoint (axum): `GET /metrics` (OpenMetrics text) and
//! `GET /health` (JSON; 200 "ok" when every device is healthy, 200
//! "degraded" when some are, 503 "failed" when none is).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use proto::sled::DeviceState;
use serde_json::json;

use crate::service::Sled;

pub fn router(sled: Arc<Sled>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .with_state(sled)
}

async fn metrics(State(sled): State<Arc<Sled>>) -> Response {
    match sled.metrics().encode() {
        Ok(text) => proto::http::text_response(text),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {e}"),
        )
            .into_response(),
    }
}

/// Health document and HTTP status of a sled.
pub fn health_of(sled: &Sled) -> (StatusCode, serde_json::Value) {
    let inventory = sled.inventory();
    let healthy = inventory
        .devices
        .iter()
        .filter(|d| d.state == DeviceState::Healthy)
        .count();
    let (code, status) = if healthy == 0 {
        (StatusCode::SERVICE_UNAVAILABLE, "failed")
    } else if healthy < inventory.devices.len() {
        (StatusCode::OK, "degraded")
    } else {
        (StatusCode::OK, "ok")
    };
    let devices: Vec<_> = inventory
        .devices
        .iter()
        .map(|d| {
            json!({
                "device": d.device,
                "path": d.path,
                "state": if d.state == DeviceState::Healthy { "healthy" } else { "failed" },
                "size_bytes": d.size_bytes,
                "column_count": d.column_count,
                "free_columns": d.free_columns,
            })
        })
        .collect();
    (
        code,
        json!({ "status": status, "sled_id": inventory.sled_id, "devices": devices }),
    )
}

async fn health(State(sled): State<Arc<Sled>>) -> Response {
    let (code, body) = health_of(&sled);
    (code, Json(body)).into_response()
}
