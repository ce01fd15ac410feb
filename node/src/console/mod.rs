//! The web console at `/console`: one page, its script and its style,
//! embedded in the binary (no CDN, no build step), and the live tail it
//! reads.
//!
//! | route | what |
//! |---|---|
//! | `GET /console` | the page; open, it holds no data |
//! | `GET /console/app.js`, `/console/app.css` | its script and style |
//! | `GET /api/v1/tail?subject=` | Server-Sent Events, one JSON line a message on `subject` (admin) |
//!
//! Every piece of data the page shows comes from the admin API with the
//! token the user enters (kept in the tab's `sessionStorage`, or given
//! once as `#token=` in the address, which the page then removes).
//!
//! A tail is a plain NATS subscription: live, not a replay. At most
//! [`MAX_TAILS`] are open per node (503 past that). One that cannot keep
//! up with its subject loses messages in the NATS client's bounded
//! subscription buffer; it never slows anything else down. Tails end when
//! the browser goes away or the node stops.

use crate::api::{ApiError, ErrorBody, Slot};
use crate::internal_events::names;
use crate::lifecycle::Lifecycle;
use crate::shards::ShardContext;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use tokio::sync::Semaphore;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Live tails open at once, per node.
pub const MAX_TAILS: usize = 16;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

/// The page and its assets (open).
pub fn page_routes() -> Router {
    let asset = |content_type: &'static str, body: &'static str| {
        get(move || async move {
            ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
        })
    };
    Router::new()
        .route("/console", asset("text/html; charset=utf-8", INDEX))
        .route("/console/", asset("text/html; charset=utf-8", INDEX))
        .route("/console/app.js", asset("text/javascript; charset=utf-8", SCRIPT))
        .route("/console/app.css", asset("text/css; charset=utf-8", STYLE))
}

/// What the tail route needs.
#[derive(Debug, Clone)]
pub struct TailApi {
    pub shards: Slot<Arc<ShardContext>>,
    /// Ends every tail when the node stops.
    pub life: Lifecycle,
    pub open: Arc<Semaphore>,
}

/// The tail route (admin).
pub fn api_routes(shards: Slot<Arc<ShardContext>>, life: Lifecycle) -> OpenApiRouter {
    let state = TailApi { shards, life, open: Arc::new(Semaphore::new(MAX_TAILS)) };
    OpenApiRouter::new().routes(routes!(tail)).with_state(state)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct TailParams {
    /// A NATS subject or wildcard; default `{prefix}.evt.>` (every derived
    /// frame).
    subject: Option<String>,
}

fn refuse(status: StatusCode, reason: &'static str, message: String) -> Response {
    metrics::counter!(names::CONSOLE_TAILS_REFUSED_TOTAL, "reason" => reason).increment(1);
    ApiError(status, json!({"error": message, "reason": reason})).into_response()
}

/// A NATS subject a client may name: tokens of printable characters
/// without spaces, `>` only last.
fn valid_subject(s: &str) -> bool {
    let tokens: Vec<&str> = s.split('.').collect();
    s.len() <= 256
        && tokens.iter().all(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_graphic()))
        && tokens.iter().rev().skip(1).all(|t| !t.contains('>'))
}

/// Every message on `subject`, live, as Server-Sent Events: each event's
/// data is one JSON object (`{"subject", "frame"}`, `{"subject", "json"}`
/// or `{"subject", "payload_base64"}`). The stream opens once the
/// subscription is in place.
#[utoipa::path(get, path = "/api/v1/tail", operation_id = "tail", tag = "cluster",
    params(TailParams),
    responses(
        (status = 200, description = "an event stream, one JSON object an event", content_type = "text/event-stream"),
        (status = 400, description = "not a NATS subject", body = ErrorBody),
        (status = 401, description = "no or wrong admin token", body = ErrorBody),
        (status = 503, description = "node not ready, NATS not answering, or too many tails open", body = ErrorBody),
    ),
    security(("admin" = [])),
)]
async fn tail(
    State(state): State<TailApi>,
    params: Result<Query<TailParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "bad_query", e.body_text()),
    };
    let ctx = match state.shards.get() {
        Ok(ctx) => ctx.clone(),
        Err(e) => return e.into_response(),
    };
    let subject = params.subject.unwrap_or_else(|| format!("{}.evt.>", ctx.mesh.subjects().prefix()));
    if !valid_subject(&subject) {
        return refuse(StatusCode::BAD_REQUEST, "bad_subject", format!("`{subject}` is not a NATS subject"));
    }
    let Ok(permit) = state.open.clone().try_acquire_owned() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many",
            format!("{MAX_TAILS} tails are open on this node; close one or use another node"),
        );
    };
    let client = ctx.mesh.client();
    let messages = match client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "nats",
                format!("cannot subscribe to `{subject}`: {}", fluxmesh_mesh::error_chain(&e)),
            )
        }
    };
    // The server has the interest before the client hears "open".
    crate::tail::round_trip(client).await;
    let open = metrics::gauge!(names::CONSOLE_TAILS);
    open.increment(1.0);
    let guard = TailGuard { _permit: permit, open };
    let events = messages
        .map(move |m| {
            let _held = &guard;
            Ok::<_, std::convert::Infallible>(
                Event::default().data(crate::tail::json_line(m.subject.as_str(), &m.payload).to_string()),
            )
        })
        .take_until(state.life.stopped_owned());
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// Held by an open tail: its slot among [`MAX_TAILS`] and its count in
/// the gauge, both given back when the stream is dropped.
#[derive(Debug)]
struct TailGuard {
    _permit: tokio::sync::OwnedSemaphorePermit,
    open: metrics::Gauge,
}

impl Drop for TailGuard {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        for ok in ["fm.evt.>", "fm.tel.*.dev-1.>", "a", "fm.json.tel.>"] {
            assert!(valid_subject(ok), "{ok}");
        }
        for bad in ["", "fm..x", "fm.>.x", "a b", "fm.evt.", &"x".repeat(300)] {
            assert!(!valid_subject(bad), "{bad}");
        }
    }
}
