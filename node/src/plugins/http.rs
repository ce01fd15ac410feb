//! `/api/v1/plugins`: list, upload, delete.
//!
//! | route | what |
//! |---|---|
//! | `GET /api/v1/plugins` | every stored plugin, and whether this node has it loaded |
//! | `PUT /api/v1/plugins/{name}` | upload a module (binary `.wasm` or text `.wat`); 200 |
//! | `DELETE /api/v1/plugins/{name}` | 204; 404 if none |
//!
//! A module that does not compile, or lacks the ABI's exports, is refused
//! with 400 and the compiler's message; nothing is stored.

use super::{Plugins, PluginsError};
use crate::api::{ApiError, Slot};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::json;
use std::sync::Arc;

/// The plugins of this node, once it has them.
type PluginsSlot = Slot<Arc<Plugins>>;

pub fn routes(plugins: PluginsSlot, max_module_bytes: usize) -> Router {
    Router::new()
        .route("/api/v1/plugins", get(list))
        .route(
            "/api/v1/plugins/{name}",
            put(upload).delete(remove).layer(DefaultBodyLimit::max(max_module_bytes.saturating_add(1))),
        )
        .with_state(plugins)
}

impl From<PluginsError> for ApiError {
    fn from(e: PluginsError) -> Self {
        let status = match e {
            PluginsError::Store { .. }
            | PluginsError::Open(_)
            | PluginsError::Watch(_)
            | PluginsError::CompileTask(_)
            | PluginsError::Engine(_) => StatusCode::SERVICE_UNAVAILABLE,
            PluginsError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            PluginsError::BadName { .. } | PluginsError::Invalid(_) => {
                metrics::counter!(crate::internal_events::names::PLUGIN_UPLOADS_REFUSED_TOTAL).increment(1);
                StatusCode::BAD_REQUEST
            }
        };
        ApiError::new(status, fluxmesh_mesh::error_chain(&e))
    }
}

fn plugins(state: &PluginsSlot) -> Result<Arc<Plugins>, ApiError> {
    state.get().cloned()
}

async fn list(State(state): State<PluginsSlot>) -> Result<Response, ApiError> {
    let list = plugins(&state)?.list().await?;
    Ok(Json(json!({"plugins": list})).into_response())
}

async fn upload(State(state): State<PluginsSlot>, Path(name): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let info = plugins(&state)?.put(&name, &body).await?;
    Ok(Json(json!({"plugin": info})).into_response())
}

async fn remove(State(state): State<PluginsSlot>, Path(name): Path<String>) -> Result<Response, ApiError> {
    if plugins(&state)?.delete(&name).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::new(StatusCode::NOT_FOUND, format!("no plugin `{name}`")))
    }
}
