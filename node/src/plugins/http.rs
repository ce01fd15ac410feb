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

use super::{PluginInfo, Plugins, PluginsError};
use crate::api::{ApiError, ErrorBody, Slot};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Serialize;
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The refusals every route here can answer with, for the OpenAPI
/// document (the handlers answer them through [`ApiError`]).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // describes responses; never built
enum Refusals {
    #[response(status = 401, description = "no or wrong admin token")]
    Unauthorized(ErrorBody),
    #[response(status = 503, description = "node not ready or the plugin store not answering")]
    Unavailable(ErrorBody),
}

/// The plugins of this node, once it has them.
type PluginsSlot = Slot<Arc<Plugins>>;

pub fn routes(plugins: PluginsSlot, max_module_bytes: usize) -> OpenApiRouter {
    let (schemas, paths, one) = routes!(upload, remove);
    let one = one.layer(DefaultBodyLimit::max(max_module_bytes.saturating_add(1)));
    OpenApiRouter::new().routes(routes!(list)).routes((schemas, paths, one)).with_state(plugins)
}

/// `GET /api/v1/plugins`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct PluginList {
    plugins: Vec<PluginInfo>,
}

/// `PUT /api/v1/plugins/{name}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct StoredPlugin {
    plugin: PluginInfo,
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

/// Every stored plugin, and whether this node has it loaded.
#[utoipa::path(get, path = "/api/v1/plugins", operation_id = "listPlugins", tag = "plugins",
    responses(
        (status = 200, description = "the plugins", body = PluginList),
        Refusals,
    ),
    security(("admin" = [])),
)]
async fn list(State(state): State<PluginsSlot>) -> Result<Response, ApiError> {
    let plugins = plugins(&state)?.list().await?;
    Ok(Json(PluginList { plugins }).into_response())
}

/// Upload a module, binary `.wasm` or text `.wat`; it is compiled and its
/// exports checked before it is stored.
#[utoipa::path(put, path = "/api/v1/plugins/{name}", operation_id = "putPlugin", tag = "plugins",
    params(("name" = String, Path, description = "plugin name")),
    request_body(description = "the module", content(("application/wasm"), ("application/octet-stream"), ("text/plain"))),
    responses(
        (status = 200, description = "stored", body = StoredPlugin),
        (status = 400, description = "bad name, or a module that does not compile or lacks the ABI's exports", body = ErrorBody),
        (status = 413, description = "larger than plugins.max_module_bytes", body = ErrorBody),
        Refusals,
    ),
    security(("admin" = [])),
)]
async fn upload(State(state): State<PluginsSlot>, Path(name): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let plugin = plugins(&state)?.put(&name, &body).await?;
    Ok(Json(StoredPlugin { plugin }).into_response())
}

/// Delete plugin `name`.
#[utoipa::path(delete, path = "/api/v1/plugins/{name}", operation_id = "deletePlugin", tag = "plugins",
    params(("name" = String, Path, description = "plugin name")),
    responses(
        (status = 204, description = "deleted"),
        (status = 404, description = "no such plugin", body = ErrorBody),
        Refusals,
    ),
    security(("admin" = [])),
)]
async fn remove(State(state): State<PluginsSlot>, Path(name): Path<String>) -> Result<Response, ApiError> {
    if plugins(&state)?.delete(&name).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::new(StatusCode::NOT_FOUND, format!("no plugin `{name}`")))
    }
}
