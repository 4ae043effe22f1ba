//! The HTTP/JSON API (axum).
//!
//! | Method | Path | Body | Success |
//! |---|---|---|---|
//! | POST | `/v1/volumes` | `{name, size_bytes \| size_gib, erasure_code?, partition_size_bytes?, qos?}` | 201 volume (200 if the same volume exists) |
//! | GET | `/v1/volumes` | | 200 `{volumes: [volume]}` |
//! | GET | `/v1/volumes/{name}` | | 200 volume + `partition_map`, `snapshots` and `clone` (live from the unit) |
//! | PATCH | `/v1/volumes/{name}` | `{qos: {iops?, bandwidth_bytes_per_second?, burst_iops?, burst_bandwidth_bytes_per_second?, burst_length_ms?} \| null}` | 200 volume once the unit recorded the limits (a field set to null is removed, one left out kept; `qos: null` removes all); 400 names a bad field (`qos.burst_iops`) |
//! | POST, PUT | `/v1/volumes/{name}/resize` | `{size_bytes}` | 200 volume once the unit grew it (same size: no-op); smaller: 400 |
//! | DELETE | `/v1/volumes/{name}[?force=true]` | | 200 volume (`state: deleted`) once the unit took the delete (it frees the space in the background); 409 while attached unless `force` (revokes the attachments) |
//! | POST | `/v1/volumes/{name}/attach` | `{host}` | 201 attachment (id, token, unit, head nodes), registered with the unit |
//! | DELETE | `/v1/volumes/{name}/attachments/{id}` | | 200 volume; the unit revoked the token |
//! | POST | `/v1/volumes/{name}/snapshots` | `{name, volumes?, wait_ms?}` | 201 snapshot once ready (crash-consistent cut of every partition; `pause_us` measured); 202 snapshot (`state: creating`) if not ready within `wait_ms` (default 15000); 409 if aborted or the name is taken on any volume. `volumes`: the other volumes of a consistency group (same unit): one coordinated cut of every partition of all of them, one snapshot every member lists under `name` (with `group`) |
//! | GET | `/v1/volumes/{name}/snapshots` | | 200 `{volume, snapshots: [snapshot]}` |
//! | GET | `/v1/volumes/{name}/snapshots/{snap}` | | 200 snapshot |
//! | DELETE | `/v1/volumes/{name}/snapshots/{snap}` | | 202 snapshot (`state: deleting`); the unit drops every partition's layer, then the snapshot is gone from GET (a group's: from every member) |
//! | GET | `/v1/units` | | 200 `{units: [unit]}` |
//! | GET | `/v1/units/{name}` | | 200 unit |
//! | POST | `/v1/units/{name}/refresh` | | 200 unit (polled now) |
//! | GET | `/health` | | 200 `{status: "ok", ...}` (no token) |
//! | GET | `/metrics` | | 200 OpenMetrics text (no token) |
//!
//! Every `/v1` request needs `Authorization: Bearer <token>`: an admin
//! token for anything, a read-only token for GET (else 403), an
//! attach-scoped token (a host's) for `POST /v1/volumes/{name}/attach` and
//! `DELETE /v1/volumes/{name}/attachments/{id}` of the volumes its entry
//! lists and nothing else (else 403); with a `host` in its entry, the
//! attach body must name that host and only that host's attachments can be
//! detached (else 403). So a host holds no zone-wide credential: its token
//! attaches its own volumes, and the attachment (id + token, scoped to one
//! volume, expiring with `attachment_ttl_ms`) is what it does I/O with, on
//! the unit's host ports. Tokens are
//! checked by SHA-256 digest (`crate::config`'s module docs). Bodies
//! are parsed field by field so that a 400 names the field; unknown fields
//! are refused. `qos` is a volume's limits (`proto::qos::VolumeQos`: an
//! I/O of up to 256 KiB costs one; bursts need their limit and are at
//! least it), recorded by the unit and enforced by attach agents.
//! A snapshot is `{id, name, volume, group?, state (creating|ready|aborted|deleting),
//! created_ms, pause_us, cuts, reason, pinned_bytes, exclusive_bytes}`
//! (`group`: the member volumes' names, only for a consistency group;
//! `cuts` counts every member's partitions):
//! `exclusive_bytes` is what deleting it frees (blocks no other snapshot
//! and not the live volume references), `null` with a `space_error` when
//! the partitions could not be asked. A volume's `clone` is `null` (not a
//! clone, or flattened) or `{parent_volume, parent_snapshot, size_bytes,
//! flatten}`, `flatten` `null` until one starts, else `{rate_bytes_per_second,
//! remaining_bytes, copied_bytes, partitions_reported, partitions}` as the
//! primaries last reported (a partition not reported yet counts whole).
//! Errors: [`ApiError`] (one status mapping, one body shape).

use std::sync::Arc;

use crate::config::{token_digest, Scope, TokenGrant};

use axum::body::Bytes;
use axum::extract::{Extension, MatchedPath, Path, RawPathParams, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, RequestExt as _, Router};
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::metrics::RequestLabels;
use crate::model::{
    ErasureCode, QosPatch, SnapshotSource, UnitRecord, VolumeRecord, VolumeSpec,
    DEFAULT_ERASURE_CODE, DEFAULT_PARTITION_SIZE_BYTES,
};
use crate::service::Zonal;
use proto::qos::VolumeQos;

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 64 << 10;

#[derive(Debug)]
pub struct ApiState {
    pub zonal: Arc<Zonal>,
    /// SHA-256 of each accepted token, with what it may do.
    tokens: Vec<TokenGrant>,
}

/// The host an attach-scoped token binds its attachments to (a request
/// extension set by [`authenticate`]; absent for admin tokens).
#[derive(Debug, Clone)]
struct BoundHost(Option<String>);

/// The routes an attach-scoped token may use, by method and route.
const ATTACH_ROUTES: [(&str, &str); 2] = [
    ("POST", "/v1/volumes/{name}/attach"),
    ("DELETE", "/v1/volumes/{name}/attachments/{id}"),
];

/// `tokens`: [`crate::ZonalConfig::token_digests`].
pub fn router(zonal: Arc<Zonal>, tokens: Vec<TokenGrant>) -> Router {
    let state = Arc::new(ApiState { zonal, tokens });
    Router::new()
        .route("/v1/volumes", post(create_volume).get(list_volumes))
        .route(
            "/v1/volumes/{name}",
            get(describe_volume)
                .delete(delete_volume)
                .patch(modify_volume),
        )
        .route(
            "/v1/volumes/{name}/resize",
            post(resize_volume).put(resize_volume),
        )
        .route("/v1/volumes/{name}/attach", post(attach))
        .route("/v1/volumes/{name}/attachments/{id}", delete(detach))
        .route(
            "/v1/volumes/{name}/snapshots",
            post(create_snapshot).get(list_snapshots),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snapshot}",
            get(describe_snapshot).delete(delete_snapshot),
        )
        .route("/v1/units", get(list_units))
        .route("/v1/units/{name}", get(describe_unit))
        .route("/v1/units/{name}/refresh", post(refresh_unit))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), count_request))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

type ApiResult = Result<Response, ApiError>;
type Shared = State<Arc<ApiState>>;

async fn authenticate(State(state): Shared, mut request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented.map(token_digest) else {
        return ApiError::Unauthorized.into_response();
    };
    // Every digest is compared in full: the time says nothing about which
    // one (if any) matched.
    let grant = state.tokens.iter().fold(None, |found, grant| {
        if constant_time_eq(&grant.digest, &presented) {
            Some(grant)
        } else {
            found
        }
    });
    let Some(grant) = grant else {
        return ApiError::Unauthorized.into_response();
    };
    match grant.scope {
        Scope::Admin => {}
        Scope::ReadOnly if request.method() == axum::http::Method::GET => {}
        Scope::ReadOnly => return ApiError::Forbidden.into_response(),
        Scope::Attach => {
            let route = request
                .extensions()
                .get::<MatchedPath>()
                .map(|m| m.as_str().to_owned());
            let method = request.method().as_str().to_owned();
            let allowed_route = route.as_deref().is_some_and(|route| {
                ATTACH_ROUTES
                    .iter()
                    .any(|(m, r)| *m == method && *r == route)
            });
            if !allowed_route {
                return ApiError::Forbidden.into_response();
            }
            // The volume name as the route decoded it (percent-decoded).
            let volume = match request.extract_parts::<RawPathParams>().await {
                Ok(params) => params
                    .iter()
                    .find(|(key, _)| *key == "name")
                    .map(|(_, value)| value.to_owned()),
                Err(_) => None,
            };
            if !volume.is_some_and(|v| grant.volumes.contains(&v)) {
                return ApiError::Forbidden.into_response();
            }
            request
                .extensions_mut()
                .insert(BoundHost(grant.host.clone()));
        }
    }
    next.run(request).await
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn count_request(State(state): Shared, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    state
        .zonal
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            method,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

async fn not_found(State(state): Shared, request: Request) -> Response {
    state
        .zonal
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            route: "unmatched".into(),
            method: request.method().as_str().to_owned(),
            status: StatusCode::NOT_FOUND.as_u16(),
        })
        .inc();
    ApiError::RouteNotFound {
        path: request.uri().path().to_owned(),
    }
    .into_response()
}

async fn method_not_allowed(request: Request) -> Response {
    ApiError::MethodNotAllowed {
        method: request.method().as_str().to_owned(),
        path: request.uri().path().to_owned(),
    }
    .into_response()
}

// ---- request bodies ----

/// A JSON object body taken apart field by field.
struct Body(Map<String, Value>);

impl Body {
    fn parse(bytes: &[u8]) -> Result<Body, ApiError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Body(Map::new()));
        }
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(map)) => Ok(Body(map)),
            Ok(other) => Err(ApiError::BadBody {
                reason: format!("got {}", kind(&other)),
            }),
            Err(e) => Err(ApiError::BadBody {
                reason: e.to_string(),
            }),
        }
    }

    fn string(&mut self, field: &'static str) -> Result<Option<String>, ApiError> {
        match self.0.remove(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(ApiError::bad(
                field,
                format!("must be a string, got {}", kind(&other)),
            )),
        }
    }

    fn u64(&mut self, field: &'static str) -> Result<Option<u64>, ApiError> {
        match self.0.remove(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
                ApiError::bad(field, format!("must be a non-negative integer, got {n}"))
            }),
            Some(other) => Err(ApiError::bad(
                field,
                format!("must be a non-negative integer, got {}", kind(&other)),
            )),
        }
    }

    fn strings(&mut self, field: &'static str) -> Result<Option<Vec<String>>, ApiError> {
        match self.0.remove(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s),
                    other => Err(ApiError::bad(
                        field,
                        format!("must be an array of strings, got a {}", kind(&other)),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(other) => Err(ApiError::bad(
                field,
                format!("must be an array of strings, got {}", kind(&other)),
            )),
        }
    }

    fn required<T>(field: &'static str, value: Option<T>) -> Result<T, ApiError> {
        value.ok_or_else(|| ApiError::bad(field, "is required"))
    }

    /// Refuses any field no one took.
    fn finish(self) -> Result<(), ApiError> {
        match self.0.keys().next() {
            Some(field) => Err(ApiError::bad(field.clone(), "unknown field")),
            None => Ok(()),
        }
    }
}

/// `force=true|false` from a query string (no other parameter allowed).
fn force_flag(query: Option<&str>) -> Result<bool, ApiError> {
    let mut force = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
        if key != "force" {
            return Err(ApiError::bad(key.to_owned(), "unknown query parameter"));
        }
        force = match value {
            "true" | "1" => true,
            "false" | "0" => false,
            other => {
                return Err(ApiError::bad(
                    "force",
                    format!("must be true or false, got {other:?}"),
                ))
            }
        };
    }
    Ok(force)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A `qos` object of a create body: every field a non-negative integer.
fn qos_object(value: Value) -> Result<Option<VolumeQos>, ApiError> {
    match value {
        Value::Null => Ok(None),
        Value::Object(_) => serde_json::from_value::<VolumeQos>(value)
            .map(VolumeQos::normalized)
            .map_err(|e| ApiError::bad("qos", e.to_string())),
        other => Err(ApiError::bad(
            "qos",
            format!("must be an object, got {}", kind(&other)),
        )),
    }
}

/// The body of `PATCH /v1/volumes/{name}`: `{"qos": null}` removes every
/// limit; `{"qos": {FIELD: N | null, ...}}` sets or removes those fields
/// and keeps the others.
fn qos_patch(bytes: &[u8]) -> Result<QosPatch, ApiError> {
    let mut body = Body::parse(bytes)?;
    let qos = body
        .0
        .remove("qos")
        .ok_or_else(|| ApiError::bad("qos", "is required (null removes every limit)"))?;
    body.finish()?;
    let fields = match qos {
        Value::Null => {
            return Ok(QosPatch {
                clear_all: true,
                ..QosPatch::default()
            })
        }
        Value::Object(fields) => fields,
        other => {
            return Err(ApiError::bad(
                "qos",
                format!("must be an object or null, got {}", kind(&other)),
            ))
        }
    };
    let mut patch = QosPatch::default();
    for (field, value) in fields {
        let change = match &value {
            Value::Null => None,
            Value::Number(n) => Some(n.as_u64().ok_or_else(|| {
                ApiError::bad(
                    format!("qos.{field}"),
                    format!("must be a non-negative integer or null, got {n}"),
                )
            })?),
            other => {
                return Err(ApiError::bad(
                    format!("qos.{field}"),
                    format!(
                        "must be a non-negative integer or null, got {}",
                        kind(other)
                    ),
                ))
            }
        };
        let slot = match field.as_str() {
            "iops" => &mut patch.iops,
            "bandwidth_bytes_per_second" => &mut patch.bandwidth_bytes_per_second,
            "burst_iops" => &mut patch.burst_iops,
            "burst_bandwidth_bytes_per_second" => &mut patch.burst_bandwidth_bytes_per_second,
            "burst_length_ms" => &mut patch.burst_length_ms,
            _ => return Err(ApiError::bad(format!("qos.{field}"), "unknown field")),
        };
        *slot = Some(change);
    }
    Ok(patch)
}

fn create_spec(bytes: &[u8]) -> Result<VolumeSpec, ApiError> {
    let mut body = Body::parse(bytes)?;
    let name = Body::required("name", body.string("name")?)?;
    let from_snapshot = match body.string("from_snapshot")? {
        Some(text) => Some(SnapshotSource::parse(&text)?),
        None => None,
    };
    let size_bytes = match (body.u64("size_bytes")?, body.u64("size_gib")?) {
        // A clone: 0 is "the parent's" (checked against it otherwise).
        (None, None) if from_snapshot.is_some() => 0,
        (Some(_), Some(_)) => {
            return Err(ApiError::bad(
                "size_bytes",
                "give size_bytes or size_gib, not both",
            ))
        }
        (Some(bytes), None) => bytes,
        (None, Some(gib)) => gib
            .checked_mul(1 << 30)
            .ok_or_else(|| ApiError::bad("size_gib", "too large"))?,
        (None, None) => return Err(ApiError::bad("size_bytes", "is required (or size_gib)")),
    };
    let erasure_code = match body.string("erasure_code")? {
        Some(text) => ErasureCode::parse(&text).map_err(|e| ApiError::bad("erasure_code", e))?,
        None => DEFAULT_ERASURE_CODE,
    };
    let partition_size_bytes = match body.u64("partition_size_bytes")? {
        Some(bytes) => bytes,
        None if from_snapshot.is_some() => 0,
        None => DEFAULT_PARTITION_SIZE_BYTES,
    };
    let qos = match body.0.remove("qos") {
        Some(value) => qos_object(value)?,
        None => None,
    };
    body.finish()?;
    let spec = VolumeSpec {
        name,
        size_bytes,
        partition_size_bytes,
        erasure_code,
        qos,
        from_snapshot,
    };
    // A clone's size, partition size and code are its parent's: the
    // create fills them in, then validates.
    if spec.from_snapshot.is_none() {
        spec.validate()?;
    }
    Ok(spec)
}

// ---- views ----

fn volume_json(v: &VolumeRecord) -> Value {
    json!({
        "id": v.id,
        "name": v.spec.name,
        "size_bytes": v.spec.size_bytes,
        "partition_size_bytes": v.spec.partition_size_bytes,
        "erasure_code": v.spec.erasure_code.to_string(),
        "unit": v.unit,
        "state": v.state.name(),
        "created_at_ms": v.created_at_ms,
        "qos": v.spec.qos,
        "from_snapshot": v.spec.from_snapshot.as_ref().map(ToString::to_string),
        // Tokens are shown once, by the attach call.
        "attachments": v.attachments.iter().map(|a| json!({
            "id": a.id,
            "host": a.host,
            "created_at_ms": a.created_at_ms,
        })).collect::<Vec<_>>(),
    })
}

fn unit_json(state: &ApiState, u: &UnitRecord, volumes: usize) -> Value {
    let codes: Vec<String> = state
        .zonal
        .unit_codes(&u.name)
        .iter()
        .map(ToString::to_string)
        .collect();
    json!({
        "name": u.name,
        "reachable": u.reachable,
        "health": u.health,
        "leader": u.leader,
        "capacity": {
            "free_bytes": u.capacity.free_bytes,
            "used_bytes": u.capacity.used_bytes,
            "allocatable_bytes": u.capacity.allocatable_bytes,
        },
        "head_nodes": u.head_nodes,
        "head_nodes_up": u.head_nodes_up,
        "sleds": u.sleds,
        "sleds_up": u.sleds_up,
        "volumes": volumes,
        "lcp_volumes": u.lcp_volumes,
        "erasure_codes": codes,
        "reported_at_ms": u.reported_at_ms,
        "checked_at_ms": u.checked_at_ms,
        "last_error": u.last_error,
    })
}

// ---- handlers ----

async fn create_volume(State(state): Shared, body: Bytes) -> ApiResult {
    let spec = create_spec(&body)?;
    let (record, created) = state.zonal.create_volume(spec).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(volume_json(&record))).into_response())
}

async fn list_volumes(State(state): Shared) -> ApiResult {
    let volumes: Vec<Value> = state
        .zonal
        .list_volumes()
        .await?
        .iter()
        .map(volume_json)
        .collect();
    Ok(Json(json!({ "volumes": volumes })).into_response())
}

async fn describe_volume(State(state): Shared, Path(name): Path<String>) -> ApiResult {
    let (record, map) = state.zonal.describe_volume(&name).await?;
    let mut view = volume_json(&record);
    if let Value::Object(fields) = &mut view {
        let (map, error) = match map {
            Ok(map) => (
                serde_json::to_value(map).map_err(|e| ApiError::Internal(e.to_string()))?,
                Value::Null,
            ),
            Err(error) => (Value::Null, Value::String(error)),
        };
        let available = !map.is_null();
        fields.insert("partition_map".into(), map);
        fields.insert("partition_map_error".into(), error);
        // The volume's snapshots with the bytes each holds exclusively.
        if available {
            match state.zonal.list_snapshots(&name).await {
                Ok(snapshots) => {
                    let snapshots = serde_json::to_value(snapshots)
                        .map_err(|e| ApiError::Internal(e.to_string()))?;
                    fields.insert("snapshots".into(), snapshots);
                }
                Err(error) => {
                    fields.insert("snapshots".into(), Value::Null);
                    fields.insert("snapshots_error".into(), Value::String(error.to_string()));
                }
            }
            // A clone's parent and flatten progress (null: not a clone,
            // or flattened).
            match state.zonal.clone_view(&name).await {
                Ok(clone) => {
                    let clone = serde_json::to_value(clone)
                        .map_err(|e| ApiError::Internal(e.to_string()))?;
                    fields.insert("clone".into(), clone);
                }
                Err(error) => {
                    fields.insert("clone".into(), Value::Null);
                    fields.insert("clone_error".into(), Value::String(error.to_string()));
                }
            }
        }
    }
    Ok(Json(view).into_response())
}

async fn resize_volume(State(state): Shared, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let mut body = Body::parse(&body)?;
    let size_bytes = Body::required("size_bytes", body.u64("size_bytes")?)?;
    body.finish()?;
    let record = state.zonal.resize_volume(&name, size_bytes).await?;
    Ok(Json(volume_json(&record)).into_response())
}

async fn modify_volume(State(state): Shared, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let patch = qos_patch(&body)?;
    let record = state.zonal.modify_volume(&name, patch).await?;
    Ok(Json(volume_json(&record)).into_response())
}

async fn delete_volume(
    State(state): Shared,
    Path(name): Path<String>,
    uri: axum::http::Uri,
) -> ApiResult {
    let force = force_flag(uri.query())?;
    let record = state.zonal.delete_volume(&name, force).await?;
    Ok(Json(volume_json(&record)).into_response())
}

async fn attach(
    State(state): Shared,
    bound: Option<Extension<BoundHost>>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let mut body = Body::parse(&body)?;
    let host = Body::required("host", body.string("host")?)?;
    body.finish()?;
    if let Some(Extension(BoundHost(Some(bound)))) = &bound {
        if *bound != host {
            return Err(ApiError::Forbidden);
        }
    }
    let info = state.zonal.attach(&name, &host).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn detach(
    State(state): Shared,
    bound: Option<Extension<BoundHost>>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult {
    let only_host = match &bound {
        Some(Extension(BoundHost(host))) => host.as_deref(),
        None => None,
    };
    let record = state.zonal.detach(&name, &id, only_host).await?;
    Ok(Json(volume_json(&record)).into_response())
}

/// Longest `wait_ms` of a snapshot create.
const MAX_SNAPSHOT_WAIT_MS: u64 = 120_000;

async fn create_snapshot(State(state): Shared, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let mut body = Body::parse(&body)?;
    let snapshot = Body::required("name", body.string("name")?)?;
    let group = body.strings("volumes")?.unwrap_or_default();
    let wait_ms = body.u64("wait_ms")?.unwrap_or(15_000);
    body.finish()?;
    if wait_ms > MAX_SNAPSHOT_WAIT_MS {
        return Err(ApiError::bad(
            "wait_ms",
            format!("at most {MAX_SNAPSHOT_WAIT_MS}"),
        ));
    }
    let (view, ready) = state
        .zonal
        .create_snapshot(
            &name,
            &group,
            &snapshot,
            std::time::Duration::from_millis(wait_ms),
        )
        .await?;
    let status = if ready {
        StatusCode::CREATED
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(view)).into_response())
}

async fn list_snapshots(State(state): Shared, Path(name): Path<String>) -> ApiResult {
    let snapshots = state.zonal.list_snapshots(&name).await?;
    Ok(Json(json!({ "volume": name, "snapshots": snapshots })).into_response())
}

async fn describe_snapshot(
    State(state): Shared,
    Path((name, snapshot)): Path<(String, String)>,
) -> ApiResult {
    let view = state.zonal.describe_snapshot(&name, &snapshot).await?;
    Ok(Json(view).into_response())
}

async fn delete_snapshot(
    State(state): Shared,
    Path((name, snapshot)): Path<(String, String)>,
) -> ApiResult {
    let view = state.zonal.delete_snapshot(&name, &snapshot).await?;
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

async fn list_units(State(state): Shared) -> ApiResult {
    let units: Vec<Value> = state
        .zonal
        .units()
        .await?
        .iter()
        .map(|(u, volumes)| unit_json(&state, u, *volumes))
        .collect();
    Ok(Json(json!({ "units": units })).into_response())
}

async fn describe_unit(State(state): Shared, Path(name): Path<String>) -> ApiResult {
    let units = state.zonal.units().await?;
    let (unit, volumes) = units
        .iter()
        .find(|(u, _)| u.name == name)
        .ok_or(ApiError::UnitNotFound { name: name.clone() })?;
    Ok(Json(unit_json(&state, unit, *volumes)).into_response())
}

async fn refresh_unit(State(state): Shared, Path(name): Path<String>) -> ApiResult {
    state.zonal.poll_unit(&name).await?;
    describe_unit(State(state), Path(name)).await
}

async fn health(State(state): Shared) -> ApiResult {
    let units = state.zonal.units().await?;
    let reachable = units.iter().filter(|(u, _)| u.reachable).count();
    Ok(Json(json!({
        "status": "ok",
        "units": units.len(),
        "units_reachable": reachable,
    }))
    .into_response())
}

async fn metrics(State(state): Shared) -> ApiResult {
    state.zonal.refresh_gauges().await?;
    let text = state
        .zonal
        .metrics
        .encode()
        .map_err(|e| ApiError::Internal(format!("cannot encode metrics: {e}")))?;
    Ok(proto::http::text_response(text))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn field_of(body: &str) -> String {
        match create_spec(body.as_bytes()).unwrap_err() {
            ApiError::BadRequest { field, .. } => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn force_flags() {
        assert!(!force_flag(None).unwrap());
        assert!(force_flag(Some("force=true")).unwrap());
        assert!(force_flag(Some("force")).unwrap());
        assert!(!force_flag(Some("force=false")).unwrap());
        assert!(force_flag(Some("force=yes")).is_err());
        assert!(force_flag(Some("other=1")).is_err());
    }

    #[test]
    fn create_bodies() {
        let spec = create_spec(br#"{"name":"v","size_gib":2}"#).unwrap();
        assert_eq!(spec.size_bytes, 2 << 30);
        assert_eq!(spec.erasure_code, DEFAULT_ERASURE_CODE);
        assert_eq!(spec.partition_size_bytes, DEFAULT_PARTITION_SIZE_BYTES);
        let spec = create_spec(
            br#"{"name":"v","size_bytes":8192,"erasure_code":"2+1","partition_size_bytes":4096}"#,
        )
        .unwrap();
        assert_eq!(spec.erasure_code, ErasureCode { k: 2, m: 1 });
        assert_eq!(field_of(r#"{"size_gib":1}"#), "name");
        assert_eq!(field_of(r#"{"name":"v"}"#), "size_bytes");
        assert_eq!(field_of(r#"{"name":"v","size_bytes":-1}"#), "size_bytes");
        assert_eq!(field_of(r#"{"name":"v","size_bytes":"1"}"#), "size_bytes");
        assert_eq!(field_of(r#"{"name":"v","size_bytes":4097}"#), "size_bytes");
        assert_eq!(field_of(r#"{"name":"v","size_gib":1,"bogus":1}"#), "bogus");
        assert_eq!(
            field_of(r#"{"name":"v","size_gib":1,"erasure_code":"4"}"#),
            "erasure_code"
        );
        assert!(matches!(create_spec(b"[1]"), Err(ApiError::BadBody { .. })));
        assert!(matches!(create_spec(b"{"), Err(ApiError::BadBody { .. })));
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
