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
//! | `GET /api/v1/openapi.json` | this API's OpenAPI document |
//! | `/console`, `GET /api/v1/tail` | the web console: see [`crate::console`] |
//!
//! `/healthz`, `/readyz` and `/metrics` are open. Ingest takes the device's
//! own credentials (Basic), the admin token, or nobody if anonymous devices
//! are allowed. Every other route needs `Authorization: Bearer
//! <auth.admin_token>`.
//!
//! The OpenAPI 3.1 description of every route is generated from the handlers
//! ([`openapi`]) and served, open, at `GET /api/v1/openapi.json`; the CLI
//! prints it with `fluxmesh openapi`.

use crate::api::{ApiError, ErrorBody, Slot};
use crate::auth::http::AuthApi;
use crate::ingress::{DeviceMessage, IngestError, Ingress, Source};
use crate::internal_events;
use crate::shards::ShardContext;
use crate::storage::http::StorageSlot;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use fluxmesh_schemas::DeviceTopic;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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
    /// The node's lifecycle: long-lived answers (the console's tail) end
    /// when it stops.
    pub life: crate::lifecycle::Lifecycle,
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
    let (router, spec) = parts(slots, settings);
    let spec = match spec.to_json() {
        Ok(json) => Bytes::from(json),
        // Cannot happen for a document built from our own types; if it
        // does, the route says so rather than the node failing to start.
        Err(e) => Bytes::from(json!({"error": format!("cannot render the OpenAPI document: {e}")}).to_string()),
    };
    router.route(OPENAPI_PATH, get(move || openapi_json(spec.clone())))
}

/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

/// The OpenAPI document of the HTTP API, from the same handlers the
/// router serves: what `GET /api/v1/openapi.json` answers.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, unready) = tokio::sync::watch::channel(false);
    let settings = Settings {
        node_id: Arc::from("openapi"),
        ready: Arc::default(),
        unavailable: unready,
        prometheus: None,
        admin_token: fluxmesh_mesh::Secret::new(""),
        limiter: None,
        max_payload: 0,
        max_module: 0,
        life: crate::lifecycle::Lifecycle::new(),
    };
    parts(&Slots::default(), settings).1
}

/// The router without the OpenAPI route, and the document of its routes.
fn parts(slots: &Slots, settings: Settings) -> (Router, utoipa::openapi::OpenApi) {
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
    let admin = OpenApiRouter::new()
        .routes(routes!(device))
        .routes(routes!(cluster))
        .with_state(state.clone())
        .merge(crate::rules::http::routes(slots.rules.clone()))
        .merge(crate::plugins::http::routes(slots.plugins.clone(), settings.max_module))
        .merge(crate::storage::http::routes(slots.storage.clone()))
        .merge(crate::auth::http::routes(auth.clone()))
        .merge(crate::console::api_routes(slots.shards.clone(), settings.life))
        .route_layer(axum::middleware::from_fn_with_state(auth, crate::auth::http::require_admin));
    let (router, spec) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics_text))
        .routes(routes!(ingest))
        .with_state(state)
        .merge(admin)
        .split_for_parts();
    let router = router.merge(crate::console::page_routes());
    // Leave room above the payload limit so that an oversize body is
    // answered by our own 413 with a reason, not a bare one.
    (router.layer(DefaultBodyLimit::max(settings.max_payload.saturating_add(1))), spec)
}

/// The document's header, its security schemes and the one route the
/// router adds after it is built (the document itself).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "fluxmesh",
        description = "The HTTP API of a fluxmesh node. Every node serves the same API for the whole mesh.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(openapi_json),
    components(schemas(ErrorBody)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "operations", description = "Health, readiness, metrics and this document"),
        (name = "ingest", description = "Device messages over HTTP"),
        (name = "cluster", description = "Nodes, shards and devices"),
        (name = "rules", description = "Rhai rules"),
        (name = "plugins", description = "WebAssembly plugins"),
        (name = "history", description = "Stored history (Postgres)"),
        (name = "credentials", description = "Device credentials and grants"),
    ),
)]
struct ApiDoc;

/// `admin`: `Authorization: Bearer <auth.admin_token>`; `device`: Basic
/// with the device id and one of its secrets.
#[derive(Debug)]
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("the node's auth.admin_token"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "device",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Basic)
                    .description(Some("the device id as the user and one of the device's secrets"))
                    .build(),
            ),
        );
    }
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/api/v1/openapi.json", operation_id = "openapi", tag = "operations",
    responses((status = 200, description = "the OpenAPI document", content_type = "application/json")))]
async fn openapi_json(spec: Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], spec).into_response()
}

/// What `/healthz` and `/readyz` answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Health {
    /// `ok`, `ready`, `not ready` or `cut off from the mesh`.
    status: &'static str,
    node: String,
}

/// 200 while the process serves (liveness).
#[utoipa::path(get, path = "/healthz", operation_id = "healthz", tag = "operations",
    responses((status = 200, description = "the process serves", body = Health)))]
async fn healthz(State(state): State<NodeApi>) -> Response {
    Json(Health { status: "ok", node: state.node_id.to_string() }).into_response()
}

/// 200 once connected to NATS with streams provisioned and MQTT listening,
/// and while not cut off from the mesh (readiness).
#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "operations", responses(
    (status = 200, description = "ready to serve", body = Health),
    (status = 503, description = "not ready yet, or cut off from the mesh", body = Health),
))]
async fn readyz(State(state): State<NodeApi>) -> Response {
    let node = state.node_id.to_string();
    if *state.unavailable.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status: "cut off from the mesh", node }))
            .into_response();
    }
    if state.ready.load(Ordering::Acquire) {
        Json(Health { status: "ready", node }).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status: "not ready", node })).into_response()
    }
}

/// The node's metrics, in the Prometheus text format.
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "operations", responses(
    (status = 200, description = "Prometheus text exposition format 0.0.4", content_type = "text/plain"),
    (status = 503, description = "the metrics recorder is not installed", content_type = "text/plain"),
))]
async fn metrics_text(State(state): State<NodeApi>) -> Response {
    match &state.prometheus {
        // Rendering folds the histograms' pending samples into buckets.
        Some(handle) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "metrics recorder not installed\n").into_response(),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
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

/// Where an ingested message was stored.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Accepted {
    /// The message's frame id (UUID v7, or v5 of the Idempotency-Key).
    id: String,
    subject: String,
    stream: String,
    /// Its sequence in the stream.
    seq: u64,
    /// True if the Idempotency-Key was seen before: stored once, earlier.
    duplicate: bool,
}

/// Ingest one message; 202 only after JetStream stored it.
///
/// The body is JSON (`application/json`, the default) or raw bytes
/// (`application/octet-stream`). Send the same `Idempotency-Key` when
/// retrying so that a retry is stored once.
#[utoipa::path(post, path = "/api/v1/devices/{id}/telemetry", operation_id = "ingestMessage", tag = "ingest",
    params(
        ("id" = String, Path, description = "device id"),
        IngestParams,
        ("Idempotency-Key" = Option<String>, Header, description = "the same key on a retry stores the message once"),
    ),
    request_body(description = "the message", content(("application/json"), ("application/octet-stream"))),
    responses(
        (status = 202, description = "stored", body = Accepted),
        (status = 400, description = "bad device id, channel, query or JSON", body = ErrorBody),
        (status = 401, description = "credentials missing or refused", body = ErrorBody),
        (status = 413, description = "larger than ingest.max_payload_bytes", body = ErrorBody),
        (status = 415, description = "neither JSON nor octet-stream", body = ErrorBody),
        (status = 429, description = "over ingest.device_rate_per_sec; see Retry-After", body = ErrorBody),
        (status = 503, description = "not stored (not ready, cut off, NATS not answering): retry", body = ErrorBody),
    ),
    security((), ("device" = []), ("admin" = [])),
)]
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
            Json(Accepted {
                id: stored.id.to_string(),
                subject: stored.subject,
                stream: stored.stream,
                seq: stored.sequence,
                duplicate: stored.duplicate,
            }),
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
#[utoipa::path(get, path = "/api/v1/cluster", operation_id = "getCluster", tag = "cluster",
    params(ClusterParams),
    responses(
        (status = 200, description = "the cluster as this node sees it", body = ClusterView),
        (status = 400, description = "bad query", body = ErrorBody),
        (status = 401, description = "no or wrong admin token", body = ErrorBody),
        (status = 503, description = "node not ready", body = ErrorBody),
    ),
    security(("admin" = [])),
)]
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
    let shards = (0..ctx.mesh.shards())
        .map(|shard| {
            let lease = view.leases.get(&shard);
            // The holder's own count, from its last heartbeat.
            let pending = lease
                .filter(|_| with_lag)
                .and_then(|l| view.live.get(&l.lease.node_id))
                .and_then(|m| m.lag.get(&shard).copied());
            ShardView {
                shard,
                desired_owner: fluxmesh_mesh::placement::owner(shard, &live).map(str::to_owned),
                holder: lease.map(|l| l.lease.node_id.clone()),
                epoch: lease.map(|l| l.epoch),
                lease_valid: lease.is_some_and(|l| view.is_valid(&l.lease)),
                pending,
            }
        })
        .collect();
    Json(ClusterView {
        node: state.node_id.to_string(),
        shard_count: ctx.mesh.shards(),
        nodes: view.live.values().cloned().collect(),
        shards,
    })
    .into_response()
}

/// `GET /api/v1/cluster`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ClusterView {
    /// The node that answered.
    node: String,
    shard_count: u32,
    /// Live nodes, from their heartbeats.
    #[schema(value_type = Vec<Object>)]
    nodes: Vec<fluxmesh_mesh::cluster::Member>,
    shards: Vec<ShardView>,
}

/// One shard in [`ClusterView`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ShardView {
    shard: u32,
    /// The live node consistent hashing picks.
    desired_owner: Option<String>,
    /// The node holding the shard's lease.
    holder: Option<String>,
    epoch: Option<u64>,
    lease_valid: bool,
    /// Messages not yet processed, from the holder's last heartbeat.
    pending: Option<u64>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ClusterParams {
    /// `false` leaves each shard's lag out.
    lag: Option<bool>,
}

/// `GET /api/v1/devices/{id}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct DeviceView {
    device: String,
    shard: u32,
    /// The node holding the shard's valid lease, if any.
    owner_node: Option<String>,
    /// The node holding the device's MQTT session, if any.
    connected_node: Option<String>,
    /// The session is subscribed to `devices/{id}/cmd`.
    subscribed_to_commands: bool,
    state: crate::processing::state::DeviceState,
}

/// A device's shard, the node that owns the shard and its last
/// checkpointed state (404 if the mesh has never processed a message of it).
#[utoipa::path(get, path = "/api/v1/devices/{id}", operation_id = "getDevice", tag = "cluster",
    params(("id" = String, Path, description = "device id")),
    responses(
        (status = 200, description = "the device", body = DeviceView),
        (status = 400, description = "bad device id", body = ErrorBody),
        (status = 401, description = "no or wrong admin token", body = ErrorBody),
        (status = 404, description = "no state for this device yet (its shard and owner are still given)", body = ErrorBody),
        (status = 503, description = "node not ready or checkpoints unreadable", body = ErrorBody),
    ),
    security(("admin" = [])),
)]
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
            Ok(state) => Json(DeviceView {
                device,
                shard,
                owner_node: owner,
                connected_node: connected.map(str::to_owned),
                subscribed_to_commands: commands,
                state,
            })
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path as FsPath;

    /// Every `"/api/v1…"` string in the node's source outside comments: the
    /// paths a route could be registered at, and those the CLI calls.
    fn api_paths_in_source(dir: &FsPath, found: &mut Vec<(String, String)>) {
        let entries = std::fs::read_dir(dir).expect("read src");
        for entry in entries {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                api_paths_in_source(&path, found);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read source file");
            // Spelt so that this line itself is not a match.
            let needle = format!("\"/{}", "api/v1");
            for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (start, _) in line.match_indices(&needle) {
                    let rest = &line[start + 1..];
                    let end = rest.find('"').unwrap_or(rest.len());
                    found.push((rest[..end].to_owned(), path.display().to_string()));
                }
            }
        }
    }

    #[test]
    fn every_api_path_in_the_source_is_in_the_openapi_document() {
        let spec = openapi();
        let mut found = Vec::new();
        api_paths_in_source(&FsPath::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut found);
        assert!(found.len() >= 15, "the scan finds the routes: {found:?}");
        // `{id}` in a route, `{}` in a client's format string: the same.
        let shape = |p: &str| {
            let mut out = String::new();
            let mut inside = false;
            for c in p.chars() {
                match c {
                    '{' => inside = true,
                    '}' => {
                        inside = false;
                        out.push_str("{}");
                    }
                    _ if inside => {}
                    _ => out.push(c),
                }
            }
            out
        };
        let documented: std::collections::BTreeSet<String> = spec.paths.paths.keys().map(|p| shape(p)).collect();
        let missing: Vec<_> = found.iter().filter(|(p, _)| !documented.contains(&shape(p))).collect();
        assert!(missing.is_empty(), "paths in the source that the OpenAPI document lacks: {missing:?}");
    }

    /// Each operation of the document reaches a handler: no 404 or 405 from
    /// the router itself (a handler's own 404 has a JSON body).
    #[tokio::test]
    async fn every_documented_operation_is_served() {
        let (_, unavailable) = tokio::sync::watch::channel(false);
        let settings = Settings {
            node_id: Arc::from("t"),
            ready: Arc::default(),
            unavailable,
            prometheus: None,
            admin_token: fluxmesh_mesh::Secret::new("token"),
            limiter: None,
            max_payload: 1024,
            max_module: 1024,
            life: crate::lifecycle::Lifecycle::new(),
        };
        let app = router(&Slots::default(), settings);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let client = reqwest::Client::new();
        let spec = openapi();
        let mut operations = 0;
        for (path, item) in &spec.paths.paths {
            let url = format!("http://{addr}{}", path.replace("{id}", "dev-1").replace("{name}", "plug"));
            let methods = [
                (reqwest::Method::GET, &item.get),
                (reqwest::Method::POST, &item.post),
                (reqwest::Method::PUT, &item.put),
                (reqwest::Method::DELETE, &item.delete),
            ];
            for (method, op) in methods.into_iter().filter(|(_, op)| op.is_some()) {
                operations += 1;
                assert!(
                    op.as_ref().and_then(|o| o.operation_id.as_ref()).is_some(),
                    "{method} {path}: no operation id"
                );
                let response = client
                    .request(method.clone(), &url)
                    .bearer_auth("token")
                    .header(header::CONTENT_TYPE, "application/json")
                    .body("{}")
                    .send()
                    .await
                    .expect("request");
                let status = response.status();
                let body = response.bytes().await.expect("body");
                let handled = serde_json::from_slice::<serde_json::Value>(&body).is_ok() || status == StatusCode::OK;
                assert!(
                    status != StatusCode::METHOD_NOT_ALLOWED && (status != StatusCode::NOT_FOUND || handled),
                    "{method} {path} is in the document but not routed: {status}"
                );
            }
        }
        assert!(operations >= 21, "the document lists every operation: {operations}");
        server.abort();
    }
}
