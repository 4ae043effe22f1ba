//! Typed errors of the zonal control plane and their one mapping to HTTP.
//!
//! [`ApiError`] is what an API call can fail with; [`ApiError::status`] is
//! the single place that decides its HTTP status and [`ApiError::code`] its
//! stable wire name. Every error body is
//! `{"error": {"code": "...", "message": "..."}}`.
//! [`ZonalError`] is why the daemon as a whole could not run.

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use local_control_plane::CommandError;
use serde_json::json;
use thiserror::Error;

use crate::config::ConfigError;
use crate::model::{FieldError, VolumeState};
use crate::store::StoreError;

/// Why an API request failed.
#[derive(Debug, Error)]
pub enum ApiError {
    #[error("missing or wrong bearer token (send `Authorization: Bearer <admin token>`)")]
    Unauthorized,
    /// A read-only token asked for a change.
    #[error("this token is read-only: it may only GET")]
    Forbidden,
    #[error("{field}: {reason}")]
    BadRequest { field: String, reason: String },
    #[error("request body is not a JSON object: {reason}")]
    BadBody { reason: String },
    #[error("no volume named {name:?}")]
    VolumeNotFound { name: String },
    #[error("volume {volume:?} has no attachment {attachment}")]
    AttachmentNotFound { volume: String, attachment: String },
    #[error("no unit named {name:?}")]
    UnitNotFound { name: String },
    #[error("volume {volume:?} has no snapshot {snapshot:?}")]
    SnapshotNotFound { volume: String, snapshot: String },
    #[error("volume {volume:?} already has a snapshot {snapshot:?}")]
    SnapshotExists { volume: String, snapshot: String },
    #[error("snapshot {snapshot:?} was aborted: {reason}")]
    SnapshotAborted { snapshot: String, reason: String },
    #[error("no route {path}")]
    RouteNotFound { path: String },
    #[error("method {method} not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("volume {name:?} exists with a different spec ({existing})")]
    NameConflict { name: String, existing: String },
    #[error("volume {name:?} has {attachments} attachment(s); detach them first")]
    VolumeAttached { name: String, attachments: usize },
    #[error("volume {name:?} is {}, not available", state.name())]
    VolumeNotAvailable { name: String, state: VolumeState },
    #[error("no unit can place the volume: {reason}")]
    NoUnitFits { reason: String },
    #[error("unit {unit:?} is unreachable: {reason}")]
    UnitUnreachable { unit: String, reason: String },
    /// The unit may or may not have applied the command; repeating the
    /// same request is safe and settles it.
    #[error("unit {unit:?} did not confirm volume {volume}: {reason}; repeat the same request")]
    OutcomeUnknown {
        unit: String,
        volume: u64,
        reason: String,
    },
    #[error("unit {unit:?} refused: {error}")]
    UnitRefused { unit: String, error: CommandError },
    #[error("unit {unit:?} answered unexpectedly: {reason}")]
    UnitProtocol { unit: String, reason: String },
    #[error("{what} is not supported yet: {reason}")]
    NotImplemented { what: &'static str, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::BadRequest {
            field: e.field.to_owned(),
            reason: e.reason,
        }
    }
}

impl ApiError {
    pub fn bad(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ApiError::BadRequest {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The HTTP status of every error: the one place that decides it.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::BadRequest { .. } | ApiError::BadBody { .. } => StatusCode::BAD_REQUEST,
            ApiError::VolumeNotFound { .. }
            | ApiError::AttachmentNotFound { .. }
            | ApiError::UnitNotFound { .. }
            | ApiError::SnapshotNotFound { .. }
            | ApiError::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NameConflict { .. }
            | ApiError::VolumeAttached { .. }
            | ApiError::VolumeNotAvailable { .. }
            | ApiError::SnapshotExists { .. }
            | ApiError::SnapshotAborted { .. } => StatusCode::CONFLICT,
            ApiError::NoUnitFits { .. }
            | ApiError::UnitUnreachable { .. }
            | ApiError::OutcomeUnknown { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UnitRefused { error, .. } => match error {
                CommandError::InvalidArgument { .. }
                | CommandError::InvalidQos { .. }
                | CommandError::ShrinkRefused { .. } => StatusCode::BAD_REQUEST,
                CommandError::AlreadyExists { .. }
                | CommandError::VolumeAttached { .. }
                | CommandError::VolumeDeleting { .. } => StatusCode::CONFLICT,
                e if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_GATEWAY,
            },
            ApiError::UnitProtocol { .. } => StatusCode::BAD_GATEWAY,
            ApiError::NotImplemented { .. } => StatusCode::NOT_IMPLEMENTED,
            ApiError::Store(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable wire name of the error (the CLI keys exit codes on it).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::BadRequest { .. } | ApiError::BadBody { .. } => "bad_request",
            ApiError::VolumeNotFound { .. } => "volume_not_found",
            ApiError::AttachmentNotFound { .. } => "attachment_not_found",
            ApiError::UnitNotFound { .. } => "unit_not_found",
            ApiError::SnapshotNotFound { .. } => "snapshot_not_found",
            ApiError::SnapshotExists { .. } => "snapshot_exists",
            ApiError::SnapshotAborted { .. } => "snapshot_aborted",
            ApiError::RouteNotFound { .. } => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::NameConflict { .. } => "name_conflict",
            ApiError::VolumeAttached { .. } => "volume_attached",
            ApiError::VolumeNotAvailable { .. } => "volume_not_available",
            ApiError::NoUnitFits { .. } => "no_unit_fits",
            ApiError::UnitUnreachable { .. } => "unit_unreachable",
            ApiError::OutcomeUnknown { .. } => "outcome_unknown",
            ApiError::UnitRefused { error, .. } => error.code(),
            ApiError::UnitProtocol { .. } => "unit_protocol",
            ApiError::NotImplemented { .. } => "not_implemented",
            ApiError::Store(_) => "store",
            ApiError::Internal(_) => "internal",
        }
    }

    /// Repeating the same request later may succeed.
    pub fn is_retryable(&self) -> bool {
        self.status() == StatusCode::SERVICE_UNAVAILABLE
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = Json(json!({
            "error": { "code": self.code(), "message": self.to_string() }
        }));
        if status == StatusCode::UNAUTHORIZED {
            return (status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response();
        }
        (status, body).into_response()
    }
}

/// Why `rackblock zonal` could not run.
#[derive(Debug, Error)]
pub enum ZonalError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("unit {unit:?}: rack file {}: {source}", path.display())]
    Rack {
        unit: String,
        path: PathBuf,
        source: hardware::rack::RackError,
    },
    #[error("cannot create data_dir {}: {source}", path.display())]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store {}: {source}", path.display())]
    Store { path: PathBuf, source: StoreError },
    #[error("cannot bind listen address {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("TLS certificate or key (tls_cert, tls_key): {0}")]
    Tls(#[from] proto::tls::TlsError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use local_control_plane::{Entity, PartitionId};

    #[test]
    fn unit_refusals_map_by_kind() {
        let refused = |error| ApiError::UnitRefused {
            unit: "u".into(),
            error,
        };
        assert_eq!(
            refused(CommandError::NoSpace {
                needed: 6,
                available: 2
            })
            .status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            refused(CommandError::InvalidArgument { reason: "x".into() }).status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            refused(CommandError::AlreadyExists {
                entity: Entity::VolumeName,
                id: "v".into()
            })
            .status(),
            StatusCode::CONFLICT
        );
        let other = refused(CommandError::UnknownPartition {
            partition: PartitionId {
                volume: 1,
                index: 0,
            },
        });
        assert_eq!(other.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(other.code(), "unknown_partition");
        assert!(ApiError::NoUnitFits { reason: "x".into() }.is_retryable());
    }
}
