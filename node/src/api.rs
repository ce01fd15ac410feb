//! What every HTTP route module shares, and nothing else: the error answer
//! and the [`Slot`] through which a route reaches a part of the node that
//! comes up after HTTP does. A leaf: it uses no other module of the node,
//! so route modules (`auth::http`, `rules::http`, …) and the router that
//! merges them (`http`) do not depend on each other through it.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::sync::{Arc, OnceLock};

/// The body of an error answer, as the OpenAPI document describes it
/// (handlers build it as JSON; some add fields such as `param` or `line`).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, with its causes: "a: b: c".
    pub error: String,
    /// A stable, machine-readable reason (`not_ready`, `bad_query`, …),
    /// where there is one.
    pub reason: Option<String>,
    /// The query parameter at fault (history reads).
    pub param: Option<String>,
    /// Where a rule script fails to compile.
    pub line: Option<u64>,
    pub column: Option<u64>,
}

/// An error answer of the API handlers that return `Result`: a status and
/// a JSON body with at least `error`.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub serde_json::Value);

impl ApiError {
    /// `{"error": message}` with `status`.
    pub fn new(status: StatusCode, message: impl std::fmt::Display) -> Self {
        ApiError(status, json!({"error": message.to_string()}))
    }

    /// 503: the node is not connected or has not joined the cluster yet.
    pub fn not_ready() -> Self {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, json!({"error": "node is not ready", "reason": "not_ready"}))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

/// A part of the node that HTTP serves before it exists: HTTP starts first
/// (so `/healthz` answers while NATS is still coming), and the node fills
/// each slot once the part is up. Until then a route answers 503.
#[derive(Debug)]
pub struct Slot<T>(Arc<OnceLock<T>>);

impl<T> Clone for Slot<T> {
    fn clone(&self) -> Self {
        Slot(self.0.clone())
    }
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot(Arc::default())
    }
}

impl<T> Slot<T> {
    /// Fills the slot; a second fill is ignored (each is filled once).
    pub fn fill(&self, value: T) {
        let _ = self.0.set(value);
    }

    /// The part, or 503 "not ready".
    pub fn get(&self) -> Result<&T, ApiError> {
        self.0.get().ok_or_else(ApiError::not_ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_not_ready_until_filled_once() {
        let slot: Slot<u8> = Slot::default();
        let seen_by_route = slot.clone();
        assert_eq!(seen_by_route.get().map_err(|e| e.0).expect_err("empty"), StatusCode::SERVICE_UNAVAILABLE);
        slot.fill(1);
        slot.fill(2);
        assert_eq!(seen_by_route.get().ok(), Some(&1));
    }
}
