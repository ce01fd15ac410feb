//! The admin token check, device authentication for HTTP ingest, and the
//! credentials API.
//!
//! | route | what |
//! |---|---|
//! | `PUT /api/v1/devices/{id}/credentials` | set a secret (`{"secret": …}`, or `{}` to have one generated and returned once), grants and `disabled` |
//! | `GET /api/v1/devices/{id}/credentials` | the record without hashes |
//! | `DELETE /api/v1/devices/{id}/credentials` | remove; the device's live sessions end |

use super::acl::{Grant, Method};
use super::Authenticator;
use super::{AuthError, Denied, Update};
use crate::api::{ApiError, ErrorBody, Slot};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
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
    #[response(status = 503, description = "node not ready or the credentials store not answering")]
    Unavailable(ErrorBody),
}

/// What the admin check, ingest authentication and the credentials API
/// need.
#[derive(Debug, Clone)]
pub struct AuthApi {
    pub admin_token: fluxmesh_mesh::Secret,
    /// The authenticator, once the node is connected to NATS.
    pub auth: Slot<Arc<Authenticator>>,
}

pub fn routes(api: AuthApi) -> OpenApiRouter {
    OpenApiRouter::new().routes(routes!(set, show, remove)).with_state(api)
}

fn unauthorized(reason: &'static str, message: &str) -> Response {
    metrics::counter!(crate::internal_events::names::HTTP_UNAUTHORIZED_TOTAL, "reason" => reason).increment(1);
    let mut response = (StatusCode::UNAUTHORIZED, Json(json!({"error": message, "reason": reason}))).into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    response
}

/// Whether the request carries the admin token.
pub fn is_admin(state: &AuthApi, headers: &HeaderMap) -> bool {
    let token = &state.admin_token;
    if token.is_empty() {
        return false;
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    subtle::ConstantTimeEq::ct_eq(given.trim().as_bytes(), token.expose().as_bytes()).into()
}

/// Middleware on every admin route: the bearer token or 401.
pub async fn require_admin(State(state): State<AuthApi>, request: Request, next: Next) -> Response {
    if is_admin(&state, request.headers()) {
        return next.run(request).await;
    }
    if state.admin_token.is_empty() {
        return unauthorized("admin_token_unset", "the admin API is off: set auth.admin_token");
    }
    let reason = if request.headers().contains_key(header::AUTHORIZATION) { "bad_token" } else { "no_token" };
    tracing::info!(path = %request.uri().path(), reason, "admin API request refused");
    unauthorized(reason, "admin API: send Authorization: Bearer <auth.admin_token>")
}

/// Who is posting for `device` on HTTP ingest: the admin token (a
/// backend, any device), the device's own Basic credentials, or nobody
/// (anonymous, if allowed). `Err` is the answer to send.
pub async fn ingest_grant(state: &AuthApi, headers: &HeaderMap, device: &str) -> Result<Grant, Response> {
    if is_admin(state, headers) {
        return Ok(Grant::own(device, Method::Admin));
    }
    let auth = state.auth.get().map_err(IntoResponse::into_response)?;
    let basic = match headers.get(header::AUTHORIZATION).map(|v| v.to_str().map(basic_credentials)) {
        None => None,
        Some(Ok(Some(pair))) => Some(pair),
        Some(_) => {
            metrics::counter!(crate::internal_events::names::AUTH_ATTEMPTS_TOTAL, "source" => "http", "result" => "malformed").increment(1);
            return Err(unauthorized("malformed_authorization", "Authorization: use Basic (device:secret) or Bearer"));
        }
    };
    let (user, secret) = match &basic {
        Some((user, secret)) => (Some(user.as_str()), Some(secret.as_bytes())),
        None => (None, None),
    };
    match auth.authenticate("http", device, user, secret).await {
        Ok(grant) => Ok(grant),
        Err(Denied::UsernameMismatch) => {
            Err(unauthorized("username_mismatch", "the Basic user must be the device id in the path"))
        }
        Err(Denied::Unavailable) => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "the credentials store is not answering", "reason": "auth_unavailable"})),
        )
            .into_response()),
        Err(denied) => Err(unauthorized(denied.reason(), "device credentials refused")),
    }
}

/// `Basic base64(user:secret)` → (user, secret).
fn basic_credentials(value: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, secret) = text.split_once(':')?;
    Some((user.to_owned(), secret.to_owned()))
}

fn store_error(e: AuthError) -> ApiError {
    let error = fluxmesh_mesh::error_chain(&e);
    match e {
        AuthError::Conflict => ApiError(StatusCode::CONFLICT, json!({"error": error, "reason": "conflict"})),
        e if e.is_invalid() => ApiError(StatusCode::BAD_REQUEST, json!({"error": error, "reason": "invalid"})),
        _ => ApiError(StatusCode::SERVICE_UNAVAILABLE, json!({"error": error, "reason": "store_unavailable"})),
    }
}

/// 404: the device has no credentials.
fn no_credentials() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, json!({"error": "this device has no credentials", "reason": "unknown_device"}))
}

/// Set a device's secret (`{"secret": …}`, or none to have one generated
/// and returned once in `secret`), its grants and `disabled`.
#[utoipa::path(put, path = "/api/v1/devices/{id}/credentials", operation_id = "putCredentials", tag = "credentials",
    params(("id" = String, Path, description = "device id")),
    request_body = super::Update,
    responses(
        (status = 200, description = "the record; `secret` only when one was generated", body = super::RecordView),
        (status = 400, description = "bad body, device id, secret or grant", body = ErrorBody),
        (status = 409, description = "changed concurrently: retry", body = ErrorBody),
        Refusals,
    ),
    security(("admin" = [])),
)]
async fn set(
    State(state): State<AuthApi>,
    Path(device): Path<String>,
    body: Result<Json<Update>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let auth = state.auth.get()?;
    let Json(update) =
        body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, json!({"error": e.body_text(), "reason": "bad_body"})))?;
    let (view, generated) = super::set(auth.store(), &auth.cfg, &device, update).await.map_err(store_error)?;
    tracing::info!(%device, secrets = view.secrets.len(), "device credentials set");
    let mut body = serde_json::to_value(&view).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    if let (Some(secret), Some(obj)) = (generated, body.as_object_mut()) {
        obj.insert("secret".to_owned(), secret.into());
    }
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// A device's credentials record, without hashes.
#[utoipa::path(get, path = "/api/v1/devices/{id}/credentials", operation_id = "getCredentials", tag = "credentials",
    params(("id" = String, Path, description = "device id")),
    responses(
        (status = 200, description = "the record", body = super::RecordView),
        (status = 404, description = "the device has no credentials", body = ErrorBody),
        Refusals,
    ),
    security(("admin" = [])),
)]
async fn show(State(state): State<AuthApi>, Path(device): Path<String>) -> Result<Response, ApiError> {
    let auth = state.auth.get()?;
    match super::show(auth.store(), &device).await.map_err(store_error)? {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(no_credentials()),
    }
}

/// Remove a device's credentials; its live sessions end.
#[utoipa::path(delete, path = "/api/v1/devices/{id}/credentials", operation_id = "deleteCredentials", tag = "credentials",
    params(("id" = String, Path, description = "device id")),
    responses(
        (status = 204, description = "removed"),
        (status = 404, description = "the device has no credentials", body = ErrorBody),
        Refusals,
    ),
    security(("admin" = [])),
)]
async fn remove(State(state): State<AuthApi>, Path(device): Path<String>) -> Result<Response, ApiError> {
    let auth = state.auth.get()?;
    if super::remove(auth.store(), &device).await.map_err(store_error)? {
        tracing::info!(%device, "device credentials removed");
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(no_credentials())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_header() {
        assert_eq!(basic_credentials("Basic ZGV2OnNlY3JldA=="), Some(("dev".into(), "secret".into())));
        assert_eq!(basic_credentials("Basic !!"), None);
        assert_eq!(basic_credentials("Bearer x"), None);
        assert_eq!(basic_credentials("Basic ZGV2"), None, "no colon");
    }
}
