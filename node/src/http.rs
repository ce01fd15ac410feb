//! The HTTP API: device ingest, health, readiness and Prometheus metrics.
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 once connected to NATS with streams provisioned and MQTT listening; 503 otherwise |
//! | `GET /metrics` | Prometheus text format |
//! | `POST /api/v1/devices/{id}/telemetry` | ingest one message; 202 only after JetStream stored it |

use crate::ingress::{DeviceMessage, IngestError, Ingress, Source};
use crate::telemetry;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use fluxmesh_schemas::DeviceTopic;
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Empty until the node is connected to NATS.
    pub ingress: Arc<std::sync::OnceLock<Ingress>>,
    pub ready: Arc<AtomicBool>,
    pub node_id: Arc<str>,
    pub prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

pub fn router(state: AppState, max_payload: usize) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/devices/{id}/telemetry", post(ingest))
        // Leave room above the payload limit so that an oversize body is
        // answered by our own 413 with a reason, not a bare one.
        .layer(DefaultBodyLimit::max(max_payload.saturating_add(1)))
        .with_state(state)
}

async fn healthz(State(state): State<AppState>) -> Response {
    Json(json!({"status": "ok", "node": &*state.node_id})).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        Json(json!({"status": "ready", "node": &*state.node_id})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not ready", "node": &*state.node_id}))).into_response()
    }
}

async fn metrics_text(State(state): State<AppState>) -> Response {
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
fn refuse(status: StatusCode, reason: &'static str, message: impl std::fmt::Display) -> Response {
    telemetry::rejected(Source::Http, reason, &message);
    (status, Json(json!({"error": message.to_string(), "reason": reason}))).into_response()
}

async fn ingest(
    State(state): State<AppState>,
    Path(device): Path<String>,
    params: Result<Query<IngestParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let Some(ingress) = state.ingress.get() else {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "node is not ready", "reason": "not_ready"})))
            .into_response();
    };
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
    let message = DeviceMessage { topic, payload: body, idempotency_key, device_time_us: params.device_time_us };
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
