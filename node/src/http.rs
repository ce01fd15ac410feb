//! The HTTP API: device ingest, health, readiness and Prometheus metrics.
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 once connected to NATS with streams provisioned and MQTT listening, and while not cut off from the mesh; 503 otherwise |
//! | `GET /metrics` | Prometheus text format |
//! | `POST /api/v1/devices/{id}/telemetry` | ingest one message; 202 only after JetStream stored it |
//! | `GET /api/v1/cluster[?lag=false]` | live nodes; per shard: desired owner, lease holder and epoch, messages not yet processed (from the holder's heartbeat) |
//! | `GET /api/v1/devices/{id}` | the device's shard, owner node, connected node and last checkpointed state |
//! | `/api/v1/rules[/{id}]` | rules: see [`crate::rules::http`] |
//! | `/api/v1/plugins[/{name}]` | WebAssembly plugins: see [`crate::plugins::http`] |
//! | `GET /api/v1/devices/{id}/{telemetry,aggregates,events}` | history: see [`crate::storage::http`] |
//! | `/api/v1/devices/{id}/credentials` | device credentials: see [`crate::auth::http`] |
//!
//! `/healthz`, `/readyz` and `/metrics` are open. Ingest takes the device's
//! own credentials (Basic), the admin token, or nobody if anonymous devices
//! are allowed. Every other route needs `Authorization: Bearer
//! <auth.admin_token>`.

use crate::api::{ApiError, Slot};
use crate::auth::http::AuthApi;
use crate::ingress::{DeviceMessage, IngestError, Ingress, Source};
use crate::internal_events;
use crate::shards::ShardContext;
use crate::storage::http::StorageSlot;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use fluxmesh_schemas::DeviceTopic;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The HTTP API (ingest, health, metrics).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: SocketAddr::from(([0, 0, 0, 0], 8080)) }
    }
}

/// The parts of the node HTTP serves, each filled once it is up.
#[derive(Debug, Clone, Default)]
pub struct Slots {
    pub ingress: Slot<Ingress>,
    pub shards: Slot<Arc<ShardContext>>,
    pub auth: Slot<Arc<crate::auth::Authenticator>>,
    pub rules: Slot<Arc<crate::rules::Rules>>,
    pub plugins: Slot<Arc<crate::plugins::Plugins>>,
    pub storage: StorageSlot,
}

/// What the router is built from.
#[derive(Debug)]
pub struct Settings {
    pub node_id: Arc<str>,
    pub ready: Arc<AtomicBool>,
    /// True while the node is cut off from the mesh (`crate::reach`).
    pub unavailable: tokio::sync::watch::Receiver<bool>,
    pub prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub admin_token: fluxmesh_mesh::Secret,
    /// Per-device message rate on HTTP ingest (`ingest.device_rate_per_sec`).
    pub limiter: Option<Arc<crate::limits::DeviceLimiter>>,
    pub max_payload: usize,
    pub max_module: usize,
}

/// What the routes of this module share.
#[derive(Debug, Clone)]
struct NodeApi {
    ingress: Slot<Ingress>,
    shards: Slot<Arc<ShardContext>>,
    ready: Arc<AtomicBool>,
    unavailable: tokio::sync::watch::Receiver<bool>,
    node_id: Arc<str>,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    auth: AuthApi,
    limiter: Option<Arc<crate::limits::DeviceLimiter>>,
}

pub fn router(slots: &Slots, settings: Settings) -> Router {
    let auth = AuthApi { admin_token: settings.admin_token, auth: slots.auth.clone() };
    let state = NodeApi {
        ingress: slots.ingress.clone(),
        shards: slots.shards.clone(),
        ready: settings.ready,
        unavailable: settings.unavailable,
        node_id: settings.node_id,
        prometheus: settings.prometheus,
        auth: auth.clone(),
        limiter: settings.limiter,
    };
    let admin = Router::new()
        .route("/api/v1/devices/{id}", get(device))
        .route("/api/v1/cluster", get(cluster))
        .with_state(state.clone())
        .merge(crate::rules::http::routes(slots.rules.clone()))
        .merge(crate::plugins::http::routes(slots.plugins.clone(), settings.max_module))
        .merge(crate::storage::http::routes(slots.storage.clone()))
        .merge(crate::auth::http::routes(auth.clone()))
        .route_layer(axum::middleware::from_fn_with_state(auth, crate::auth::http::require_admin));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/devices/{id}/telemetry", post(ingest))
        .with_state(state)
        .merge(admin)
        // Leave room above the payload limit so that an oversize body is
        // answered by our own 413 with a reason, not a bare one.
        .layer(DefaultBodyLimit::max(settings.max_payload.saturating_add(1)))
}

async fn healthz(State(state): State<NodeApi>) -> Response {
    Json(json!({"status": "ok", "node": &*state.node_id})).into_response()
}

async fn readyz(State(state): State<NodeApi>) -> Response {
    if *state.unavailable.borrow() {
        let body = json!({"status": "cut off from the mesh", "node": &*state.node_id});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    if state.ready.load(Ordering::Acquire) {
        Json(json!({"status": "ready", "node": &*state.node_id})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not ready", "node": &*state.node_id}))).into_response()
    }
}

async fn metrics_text(State(state): State<NodeApi>) -> Response {
    match &state.prometheus {
        Some(handle) => {
            handle.run_upkeep();
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
        }
        None => (StatusCode::SERVICE_UNAVAILABLE, "metrics recorder not installed\n").into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IngestParams {
    /// Channel levels joined by `/`; default `telemetry`.
    channel: Option<String>,
    /// Device time, µs since the Unix epoch.
    device_time_us: Option<i64>,
}

/// An error answer: `{"error": "...", "reason": "..."}`.
/// An error and its causes, outermost first: "a: b: c".
fn refuse(status: StatusCode, reason: &'static str, message: impl std::fmt::Display) -> Response {
    internal_events::rejected(Source::Http, reason, &message);
    (status, Json(json!({"error": message.to_string(), "reason": reason}))).into_response()
}

async fn ingest(
    State(state): State<NodeApi>,
    Path(device): Path<String>,
    params: Result<Query<IngestParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let Ok(ingress) = state.ingress.get() else { return not_ready() };
    if *state.unavailable.borrow() {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "cut_off", "this node is cut off from the mesh; try another");
    }
    let grant = match crate::auth::http::ingest_grant(&state.auth, &headers, &device).await {
        Ok(g) => g,
        Err(response) => return response,
    };
    if let Some(limiter) = &state.limiter {
        if let Err(wait) = limiter.check(&grant.device) {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut response = refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("device `{device}` is over ingest.device_rate_per_sec; retry in {secs} s"),
            );
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
            return response;
        }
    }
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "bad_query", e.body_text()),
    };
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return refuse(StatusCode::PAYLOAD_TOO_LARGE, "oversize", "payload is larger than ingest.max_payload_bytes")
        }
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "bad_body", e.body_text()),
    };
    let channel = params.channel.as_deref().unwrap_or("telemetry");
    let topic = match DeviceTopic::new(&device, channel) {
        Ok(t) => t,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.reason(), e),
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/json");
    let raw = content_type.starts_with("application/octet-stream");
    if !raw {
        if !content_type.starts_with("application/json") {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "bad_content_type",
                format!("content type `{content_type}` is not application/json or application/octet-stream"),
            );
        }
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
            return refuse(StatusCode::BAD_REQUEST, "bad_json", format!("body is not valid JSON: {e}"));
        }
    }
    let idempotency_key = headers.get("idempotency-key").and_then(|v| v.to_str().ok());
    let message = DeviceMessage {
        topic,
        payload: body,
        idempotency_key,
        device_time_us: params.device_time_us,
        qos: 1,
        meta: None,
        retain: false,
    };
    match ingress.ingest(message, Source::Http).await {
        Ok(stored) => (
            StatusCode::ACCEPTED,
            Json(json!({
                "id": stored.id.to_string(),
                "subject": stored.subject,
                "stream": stored.stream,
                "seq": stored.sequence,
                "duplicate": stored.duplicate,
            })),
        )
            .into_response(),
        Err(e @ IngestError::TooLarge { .. }) => refuse(StatusCode::PAYLOAD_TOO_LARGE, e.reason(), e),
        Err(e @ IngestError::Topic(_)) => refuse(StatusCode::BAD_REQUEST, e.reason(), e),
        Err(e @ IngestError::Publish(fluxmesh_mesh::PublishError::TooLarge { .. })) => {
            refuse(StatusCode::PAYLOAD_TOO_LARGE, e.reason(), e)
        }
        Err(e) => {
            // Not stored: the client must retry (with the same
            // Idempotency-Key to be safe against double storage).
            let status = StatusCode::SERVICE_UNAVAILABLE;
            (status, Json(json!({"error": e.to_string(), "reason": e.reason()}))).into_response()
        }
    }
}

fn not_ready() -> Response {
    ApiError::not_ready().into_response()
}

/// Live nodes and, per shard, who should own it, who holds its lease (and
/// at which epoch) and how far its consumer is behind.
async fn cluster(
    State(state): State<NodeApi>,
    params: Result<Query<ClusterParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "bad_query", e.body_text()),
    };
    let Ok(ctx) = state.shards.get() else { return not_ready() };
    let view = ctx.cluster.view();
    let live = view.live_ids();
    let with_lag = params.lag.unwrap_or(true);
    let shards: Vec<serde_json::Value> = (0..ctx.mesh.shards())
        .map(|shard| {
            let lease = view.leases.get(&shard);
            // The holder's own count, from its last heartbeat.
            let pending = lease
                .filter(|_| with_lag)
                .and_then(|l| view.live.get(&l.lease.node_id))
                .and_then(|m| m.lag.get(&shard).copied());
            json!({
                "shard": shard,
                "desired_owner": fluxmesh_mesh::placement::owner(shard, &live),
                "holder": lease.map(|l| l.lease.node_id.as_str()),
                "epoch": lease.map(|l| l.epoch),
                "lease_valid": lease.is_some_and(|l| view.is_valid(&l.lease)),
                "pending": pending,
            })
        })
        .collect();
    Json(json!({
        "node": &*state.node_id,
        "shard_count": ctx.mesh.shards(),
        "nodes": view.live.values().collect::<Vec<_>>(),
        "shards": shards,
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterParams {
    /// `false` leaves each shard's lag out.
    lag: Option<bool>,
}

/// A device's shard, the node that owns the shard and its last
/// checkpointed state (404 if the mesh has never processed a message of it).
async fn device(State(state): State<NodeApi>, Path(device): Path<String>) -> Response {
    let Ok(ctx) = state.shards.get() else { return not_ready() };
    if let Err(e) = DeviceTopic::new(&device, "x") {
        return refuse(StatusCode::BAD_REQUEST, e.reason(), e);
    }
    let shard = fluxmesh_schemas::shard_of(&device, ctx.mesh.shards());
    let view = ctx.cluster.view();
    let owner = view.leases.get(&shard).filter(|l| view.is_valid(&l.lease)).map(|l| l.lease.node_id.clone());
    // Nodes answer only for sessions they hold; 300 ms of silence: offline.
    let located =
        crate::commands::locate(ctx.mesh.client(), ctx.mesh.subjects(), &device, std::time::Duration::from_millis(300))
            .await;
    let connected = located.as_ref().map(|l| l.node.as_str());
    let commands = located.as_ref().is_some_and(|l| l.commands);
    let loaded = ctx.checkpoints.load(shard).await.map(|mut l| l.states.remove(&device));
    match loaded {
        Ok(Some(value)) => match serde_json::from_value::<crate::processing::state::DeviceState>(value) {
            Ok(st) => Json(json!({
                "device": device,
                "shard": shard,
                "owner_node": owner,
                "connected_node": connected,
                "subscribed_to_commands": commands,
                "state": st,
            }))
            .into_response(),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": format!("unreadable checkpoint: {}", fluxmesh_mesh::error_chain(&e)), "reason": "bad_checkpoint"})),
            )
                .into_response(),
        },
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(json!({
                "error": "no state for this device yet",
                "reason": "unknown_device",
                "device": device,
                "shard": shard,
                "owner_node": owner,
                "connected_node": connected,
            })),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": fluxmesh_mesh::error_chain(&e), "reason": "checkpoints_unavailable"})),
        )
            .into_response(),
    }
}
