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
use crate::api::{ApiError, Slot};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

/// The rules of this node, once it has them.
type RulesSlot = Slot<Arc<Rules>>;

pub fn routes(rules: RulesSlot) -> Router {
    Router::new()
        .route("/api/v1/rules", get(list).post(create))
        .route("/api/v1/rules/{id}", get(read).put(replace).delete(remove))
        .with_state(rules)
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    id: Option<String>,
    device: Option<String>,
    channel: Option<String>,
    script: String,
    #[serde(default)]
    description: String,
    enabled: Option<bool>,
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

async fn list(State(state): State<RulesSlot>) -> Result<Response, ApiError> {
    let list = rules(&state)?.list().await.map_err(refused)?;
    Ok(Json(json!({"rules": list})).into_response())
}

async fn store(state: RulesSlot, spec: RuleSpec, status: StatusCode) -> Result<Response, ApiError> {
    let revision = rules(&state)?.put(spec.clone()).await.map_err(refused)?;
    Ok((status, Json(json!({"rule": spec, "revision": revision}))).into_response())
}

async fn create(State(state): State<RulesSlot>, body: Bytes) -> Result<Response, ApiError> {
    store(state, parse(&body, None)?, StatusCode::CREATED).await
}

async fn replace(State(state): State<RulesSlot>, Path(id): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    store(state, parse(&body, Some(&id))?, StatusCode::OK).await
}

async fn read(State(state): State<RulesSlot>, Path(id): Path<String>) -> Result<Response, ApiError> {
    match rules(&state)?.get(&id).await.map_err(refused)? {
        Some(spec) => Ok(Json(spec).into_response()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no rule `{id}`"))),
    }
}

async fn remove(State(state): State<RulesSlot>, Path(id): Path<String>) -> Result<Response, ApiError> {
    if rules(&state)?.delete(&id).await.map_err(refused)? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::new(StatusCode::NOT_FOUND, format!("no rule `{id}`")))
    }
}
