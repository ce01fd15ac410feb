//! `/api/v1/rules`: list, read, create or replace, delete.
//!
//! | route | what |
//! |---|---|
//! | `GET /api/v1/rules` | every stored rule |
//! | `POST /api/v1/rules` | store the rule in the body (`id` required); 201 |
//! | `GET /api/v1/rules/{id}` | one rule; 404 if none |
//! | `PUT /api/v1/rules/{id}` | create or replace rule `id`; 200 |
//! | `DELETE /api/v1/rules/{id}` | 204; 404 if none |
//!
//! A script that does not compile is refused with 400 and
//! `{"error":…,"line":…,"column":…}`; nothing is stored.

use super::{RuleError, RuleSpec, Rules, RulesError};
use crate::api::{ApiError, ErrorBody, Slot};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
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
    #[response(status = 503, description = "node not ready or the rules store not answering")]
    Unavailable(ErrorBody),
}

/// The rules of this node, once it has them.
type RulesSlot = Slot<Arc<Rules>>;

pub fn routes(rules: RulesSlot) -> OpenApiRouter {
    OpenApiRouter::new().routes(routes!(list, create)).routes(routes!(read, replace, remove)).with_state(rules)
}

fn rules(state: &RulesSlot) -> Result<Arc<Rules>, ApiError> {
    state.get().cloned()
}

fn refused(e: RulesError) -> ApiError {
    match e {
        RulesError::Invalid(RuleError::Compile(c)) => {
            metrics::counter!(crate::internal_events::names::RULE_UPLOADS_REFUSED_TOTAL).increment(1);
            ApiError(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("script does not compile: {}", c.message), "line": c.line, "column": c.column}),
            )
        }
        RulesError::Invalid(e) => {
            metrics::counter!(crate::internal_events::names::RULE_UPLOADS_REFUSED_TOTAL).increment(1);
            ApiError::new(StatusCode::BAD_REQUEST, fluxmesh_mesh::error_chain(&e))
        }
        e => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, fluxmesh_mesh::error_chain(&e)),
    }
}

/// A rule in a request body; for `PUT`, `id` may be left out.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = RuleBody)]
struct Body {
    /// Required on `POST`; on `PUT`, the path's id (if given, it must match).
    id: Option<String>,
    /// Devices it runs for: a glob over the device id; default `*`.
    device: Option<String>,
    /// Channels it runs for: a glob over the channel; default `*`.
    channel: Option<String>,
    /// The Rhai script.
    script: String,
    #[serde(default)]
    description: String,
    /// Default true.
    enabled: Option<bool>,
}

/// `GET /api/v1/rules`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct RuleList {
    rules: Vec<RuleSpec>,
}

/// A stored rule and the revision it was stored at.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct StoredRule {
    rule: RuleSpec,
    revision: u64,
}

fn parse(body: &Bytes, id: Option<&str>) -> Result<RuleSpec, ApiError> {
    let b: Body = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid rule: {e}")))?;
    let id = match (id, b.id) {
        (Some(path), Some(body)) if path != body => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("id `{body}` in the body differs from `{path}` in the path"),
            ))
        }
        (Some(path), _) => path.to_owned(),
        (None, Some(body)) => body,
        (None, None) => return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid rule: missing field `id`")),
    };
    Ok(RuleSpec {
        id,
        device: b.device.unwrap_or_else(|| "*".to_owned()),
        channel: b.channel.unwrap_or_else(|| "*".to_owned()),
        script: b.script,
        description: b.description,
        enabled: b.enabled.unwrap_or(true),
    })
}

/// Every stored rule.
#[utoipa::path(get, path = "/api/v1/rules", operation_id = "listRules", tag = "rules",
    responses(
        (status = 200, description = "the rules", body = RuleList),
        Refusals,
    ),
    security(("admin" = [])),
)]
async fn list(State(state): State<RulesSlot>) -> Result<Response, ApiError> {
    let rules = rules(&state)?.list().await.map_err(refused)?;
    Ok(Json(RuleList { rules }).into_response())
}

async fn store(state: RulesSlot, spec: RuleSpec, status: StatusCode) -> Result<Response, ApiError> {
    let revision = rules(&state)?.put(spec.clone()).await.map_err(refused)?;
    Ok((status, Json(StoredRule { rule: spec, revision })).into_response())
}

/// Store the rule in the body (`id` required).
#[utoipa::path(post, path = "/api/v1/rules", operation_id = "createRule", tag = "rules",
    request_body = Body,
    responses(
        (status = 201, description = "stored", body = StoredRule),
        (status = 400, description = "invalid rule, or a script that does not compile (with `line` and `column`)", body = ErrorBody),
        Refusals,
    ),
    security(("admin" = [])),
)]
async fn create(State(state): State<RulesSlot>, body: Bytes) -> Result<Response, ApiError> {
    store(state, parse(&body, None)?, StatusCode::CREATED).await
}

/// Create or replace rule `id`.
#[utoipa::path(put, path = "/api/v1/rules/{id}", operation_id = "putRule", tag = "rules",
    params(("id" = String, Path, description = "rule id")),
    request_body = Body,
    responses(
        (status = 200, description = "stored", body = StoredRule),
        (status = 400, description = "invalid rule, or a script that does not compile (with `line` and `column`)", body = ErrorBody),
        Refusals,
    ),
    security(("admin" = [])),
)]
async fn replace(State(state): State<RulesSlot>, Path(id): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    store(state, parse(&body, Some(&id))?, StatusCode::OK).await
}

/// One rule.
#[utoipa::path(get, path = "/api/v1/rules/{id}", operation_id = "getRule", tag = "rules",
    params(("id" = String, Path, description = "rule id")),
    responses(
        (status = 200, description = "the rule", body = RuleSpec),
        (status = 404, description = "no such rule", body = ErrorBody),
        Refusals,
    ),
    security(("admin" = [])),
)]
async fn read(State(state): State<RulesSlot>, Path(id): Path<String>) -> Result<Response, ApiError> {
    match rules(&state)?.get(&id).await.map_err(refused)? {
        Some(spec) => Ok(Json(spec).into_response()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no rule `{id}`"))),
    }
}

/// Delete rule `id`.
#[utoipa::path(delete, path = "/api/v1/rules/{id}", operation_id = "deleteRule", tag = "rules",
    params(("id" = String, Path, description = "rule id")),
    responses(
        (status = 204, description = "deleted"),
        (status = 404, description = "no such rule", body = ErrorBody),
        Refusals,
    ),
    security(("admin" = [])),
)]
async fn remove(State(state): State<RulesSlot>, Path(id): Path<String>) -> Result<Response, ApiError> {
    if rules(&state)?.delete(&id).await.map_err(refused)? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::new(StatusCode::NOT_FOUND, format!("no rule `{id}`")))
    }
}
