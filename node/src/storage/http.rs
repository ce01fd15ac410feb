//! History reads over HTTP, served from a replica when one is usable.
//!
//! | route | rows |
//! |---|---|
//! | `GET /api/v1/devices/{id}/telemetry` | telemetry; `channel=` filters |
//! | `GET /api/v1/devices/{id}/aggregates` | closed windows, by window start; `channel=`, `field=` filter |
//! | `GET /api/v1/devices/{id}/events` | state, alert, event and error frames; `kind=` filters |
//!
//! Common parameters: `from` (inclusive) and `to` (exclusive), each an RFC
//! 3339 time or Unix milliseconds; `limit` (default `storage.default_limit`,
//! at most `storage.max_limit`); `order=asc|desc` (default `desc`, newest
//! first); `cursor`, the `next` of the previous page. A page is
//! `{"device", "items": […], "next": cursor or null}`; the
//! `Fluxmesh-Read-Source` header says which server answered (`primary` or
//! `replica:{host:port/db}`). A bad parameter is a 400 naming it.

use super::read::Source;
use super::rows::system_time;
use super::Storage;
use crate::api::{ApiError, ErrorBody, Slot};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

/// The refusals every route here can answer with, for the OpenAPI
/// document (the handlers answer them through [`ApiError`]).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // describes responses; never built
enum Refusals {
    #[response(status = 400, description = "a bad parameter, named in `param`")]
    BadParam(ErrorBody),
    #[response(status = 401, description = "no or wrong admin token")]
    Unauthorized(ErrorBody),
    #[response(status = 503, description = "storage off on this node, or no database answering")]
    Unavailable(ErrorBody),
}

pub const READ_SOURCE_HEADER: &str = "fluxmesh-read-source";

/// This node's storage once the node is up: `None` when it is off.
pub type StorageSlot = Slot<Option<Arc<Storage>>>;

pub fn routes(storage: StorageSlot) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(telemetry))
        .routes(routes!(aggregates))
        .routes(routes!(events))
        .with_state(storage)
}

/// The query of a history read. Each route takes only its own filters
/// (`channel`, `field`, `kind`); another is a 400.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct Params {
    /// Inclusive start: an RFC 3339 time or Unix milliseconds.
    from: Option<String>,
    /// Exclusive end: an RFC 3339 time or Unix milliseconds.
    to: Option<String>,
    /// Items per page: default `storage.default_limit`, at most `storage.max_limit`.
    limit: Option<String>,
    /// `asc` or `desc` (default, newest first).
    order: Option<String>,
    /// The `next` of the previous page.
    cursor: Option<String>,
    /// Telemetry and aggregates: only this channel.
    channel: Option<String>,
    /// Aggregates: only this field.
    field: Option<String>,
    /// Events: only `state`, `alert`, `event` or `error` frames.
    kind: Option<String>,
}

/// One page of history.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct HistoryPage {
    device: String,
    /// Rows, in the requested order.
    #[schema(value_type = Vec<Object>)]
    items: Vec<Value>,
    /// The cursor of the next page; null on the last one.
    next: Option<String>,
}

/// The checked parameters of one request.
#[derive(Debug)]
struct Page {
    from: SystemTime,
    to: SystemTime,
    limit: i64,
    desc: bool,
    after: Option<(SystemTime, Uuid)>,
}

fn bad(param: &str, message: impl std::fmt::Display) -> ApiError {
    metrics::counter!(crate::internal_events::names::HISTORY_BAD_REQUESTS_TOTAL, "param" => param.to_owned())
        .increment(1);
    ApiError(
        StatusCode::BAD_REQUEST,
        json!({"error": format!("{param}: {message}"), "reason": "bad_query", "param": param}),
    )
}

/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z in µs: the times a
/// request may name (and the defaults of `from` and `to`).
const EARLIEST_US: i64 = -62_135_596_800_000_000;
const LATEST_US: i64 = 253_402_300_799_000_000;

/// RFC 3339, or integer Unix milliseconds, between years 1 and 9999.
fn parse_time(param: &str, s: &str) -> Result<SystemTime, ApiError> {
    let us = match s.parse::<i64>() {
        Ok(ms) => ms.checked_mul(1000),
        Err(_) => {
            let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|e| bad(param, format!("`{s}` is neither an RFC 3339 time nor Unix milliseconds ({e})")))?;
            i64::try_from(t.unix_timestamp_nanos() / 1000).ok()
        }
    };
    match us {
        Some(us) if (EARLIEST_US..=LATEST_US).contains(&us) => Ok(system_time(us)),
        _ => Err(bad(param, "must be between the years 1 and 9999")),
    }
}

fn us_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

fn rfc3339(us: i64) -> Value {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .map_or(Value::Null, Value::String)
}

/// `{µs}.{frame id hex}`, base64url: the position after the last item.
fn encode_cursor(t: SystemTime, id: Uuid) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}.{}", us_of(t), id.simple()))
}

fn decode_cursor(s: &str) -> Result<(SystemTime, Uuid), ApiError> {
    let invalid = || bad("cursor", "not a cursor this API returned");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).map_err(|_| invalid())?;
    let text = std::str::from_utf8(&bytes).map_err(|_| invalid())?;
    let (us, id) = text.split_once('.').ok_or_else(invalid)?;
    let us: i64 = us.parse().map_err(|_| invalid())?;
    let id = Uuid::try_parse(id).map_err(|_| invalid())?;
    Ok((system_time(us), id))
}

impl Params {
    fn page(&self, storage: &Storage) -> Result<Page, ApiError> {
        let from = match &self.from {
            Some(s) => parse_time("from", s)?,
            None => system_time(EARLIEST_US),
        };
        let to = match &self.to {
            Some(s) => parse_time("to", s)?,
            None => system_time(LATEST_US),
        };
        if to < from {
            return Err(bad("to", "is before `from`"));
        }
        let limit = match &self.limit {
            None => storage.cfg.default_limit,
            Some(s) => match s.parse::<usize>() {
                Ok(n) if (1..=storage.cfg.max_limit).contains(&n) => n,
                _ => return Err(bad("limit", format!("must be a number from 1 to {}", storage.cfg.max_limit))),
            },
        };
        let desc = match self.order.as_deref() {
            None | Some("desc") => true,
            Some("asc") => false,
            Some(other) => return Err(bad("order", format!("`{other}` is neither asc nor desc"))),
        };
        let after = self.cursor.as_deref().map(decode_cursor).transpose()?;
        Ok(Page { from, to, limit: i64::try_from(limit).unwrap_or(i64::MAX), desc, after })
    }
}

/// The storage of this node, or why there is none.
fn storage(state: &StorageSlot) -> Result<Arc<Storage>, ApiError> {
    state.get()?.clone().ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "history storage is off on this node (storage.primary is not set)", "reason": "storage_off"}),
        )
    })
}

fn params(params: Result<Query<Params>, axum::extract::rejection::QueryRejection>) -> Result<Params, ApiError> {
    params.map(|Query(p)| p).map_err(|e| bad("query", e.body_text()))
}

/// Builds `SELECT {columns} FROM {table} WHERE device = $1 AND {time} in
/// [$2, $3) {filters} {keyset} ORDER BY {time}, frame_id LIMIT n`, in the
/// parameter order of [`run`].
fn select(columns: &str, table: &str, time: &str, filters: &[&str], page: &Page) -> String {
    let mut sql = format!("SELECT {columns} FROM {table} WHERE device = $1 AND {time} >= $2 AND {time} < $3");
    let mut n = 4;
    for f in filters {
        sql.push_str(&format!(" AND {f} = ${n}"));
        n += 1;
    }
    let (cmp, dir) = if page.desc { ("<", "DESC") } else { (">", "ASC") };
    if page.after.is_some() {
        sql.push_str(&format!(" AND ({time}, frame_id) {cmp} (${n}, ${})", n + 1));
        n += 2;
    }
    sql.push_str(&format!(" ORDER BY {time} {dir}, frame_id {dir} LIMIT ${n}"));
    sql
}

async fn run(
    storage: &Storage,
    device: &str,
    sql: &str,
    page: &Page,
    filters: &[&(dyn ToSql + Sync)],
) -> Result<(Vec<Row>, Source), ApiError> {
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&device, &page.from, &page.to];
    params.extend_from_slice(filters);
    if let Some((t, id)) = &page.after {
        params.push(t);
        params.push(id);
    }
    params.push(&page.limit);
    storage.reads.query(sql, &params).await.map_err(|e| {
        crate::internal_events::emit(crate::internal_events::storage::HistoryReadFailed { error: &e });
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": format!("history is not readable now: {}", fluxmesh_mesh::error_chain(&e)), "reason": "storage_unavailable"}),
        )
    })
}

/// The page answer, with the next cursor when the page is full.
fn answer(device: &str, items: Vec<Value>, last: Option<(SystemTime, Uuid)>, page: &Page, source: Source) -> Response {
    let full = i64::try_from(items.len()).unwrap_or(i64::MAX) >= page.limit;
    let next = if full { last.map(|(t, id)| encode_cursor(t, id)) } else { None };
    let mut response = Json(HistoryPage { device: device.to_owned(), items, next }).into_response();
    if let Ok(v) = HeaderValue::from_str(&source.label()) {
        response.headers_mut().insert(READ_SOURCE_HEADER, v);
    }
    response
}

fn opt_us(row: &Row, col: &str) -> Option<i64> {
    row.try_get::<_, Option<SystemTime>>(col).ok().flatten().map(us_of)
}

/// The payload as JSON, or base64 of the bytes.
fn payload(row: &Row, into: &mut serde_json::Map<String, Value>, json_key: &str) {
    if let Ok(Some(v)) = row.try_get::<_, Option<Value>>("json") {
        into.insert(json_key.to_owned(), v);
    } else if let Ok(Some(b)) = row.try_get::<_, Option<Vec<u8>>>("raw") {
        into.insert(format!("{json_key}_base64"), Value::String(base64::engine::general_purpose::STANDARD.encode(b)));
    }
}

fn key(row: &Row, time: &str) -> Option<(SystemTime, Uuid)> {
    Some((row.try_get(time).ok()?, row.try_get("frame_id").ok()?))
}

/// One history route: its table, its time column, the columns it reads,
/// the filter parameters it takes (SQL columns of the same name), what it
/// answers to a filter it does not take, and how a row becomes an item.
struct Route {
    table: &'static str,
    time: &'static str,
    columns: &'static str,
    filters: &'static [&'static str],
    refuse: (&'static str, &'static str),
    item: fn(&Row) -> Value,
}

const TELEMETRY: Route = Route {
    table: "telemetry",
    time: "received_at",
    columns: "frame_id, received_at, channel, device_time, origin, json, raw",
    filters: &["channel"],
    refuse: ("query", "telemetry takes from, to, limit, order, cursor and channel"),
    item: telemetry_item,
};

const AGGREGATES: Route = Route {
    table: "aggregates",
    time: "window_start",
    columns: "frame_id, channel, field, window_start, window_end, count, sum, min, max, mean, variance, origin",
    filters: &["channel", "field"],
    refuse: ("kind", "aggregates take channel and field, not kind"),
    item: aggregate_item,
};

const EVENTS: Route = Route {
    table: "events",
    time: "received_at",
    columns: "frame_id, received_at, kind, channel, producer, seq, device_time, origin, severity, message, json, raw",
    filters: &["channel", "kind"],
    refuse: ("field", "events take channel and kind, not field"),
    item: event_item,
};

impl Params {
    /// The value of filter parameter `name`.
    fn filter(&self, name: &str) -> Option<&String> {
        match name {
            "channel" => self.channel.as_ref(),
            "field" => self.field.as_ref(),
            "kind" => self.kind.as_ref(),
            _ => None,
        }
    }
}

/// Stored telemetry of a device; `channel=` filters.
#[utoipa::path(get, path = "/api/v1/devices/{id}/telemetry", operation_id = "getTelemetry", tag = "history",
    params(("id" = String, Path, description = "device id"), Params),
    responses(
        (status = 200, description = "one page; the Fluxmesh-Read-Source header names the server that answered", body = HistoryPage),
        Refusals,
    ),
    security(("admin" = [])),
)]
async fn telemetry(
    State(state): State<StorageSlot>,
    Path(device): Path<String>,
    query: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    history(&state, &device, query, &TELEMETRY).await
}

/// Closed aggregation windows of a device, by window start; `channel=` and
/// `field=` filter.
#[utoipa::path(get, path = "/api/v1/devices/{id}/aggregates", operation_id = "getAggregates", tag = "history",
    params(("id" = String, Path, description = "device id"), Params),
    responses(
        (status = 200, description = "one page; the Fluxmesh-Read-Source header names the server that answered", body = HistoryPage),
        Refusals,
    ),
    security(("admin" = [])),
)]
async fn aggregates(
    State(state): State<StorageSlot>,
    Path(device): Path<String>,
    query: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    history(&state, &device, query, &AGGREGATES).await
}

/// State, alert, event and error frames of a device; `kind=` filters.
#[utoipa::path(get, path = "/api/v1/devices/{id}/events", operation_id = "getEvents", tag = "history",
    params(("id" = String, Path, description = "device id"), Params),
    responses(
        (status = 200, description = "one page; the Fluxmesh-Read-Source header names the server that answered", body = HistoryPage),
        Refusals,
    ),
    security(("admin" = [])),
)]
async fn events(
    State(state): State<StorageSlot>,
    Path(device): Path<String>,
    query: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    history(&state, &device, query, &EVENTS).await
}

/// One page of `route` for `device`.
async fn history(
    state: &StorageSlot,
    device: &str,
    query: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
    route: &Route,
) -> Result<Response, ApiError> {
    let storage = storage(state)?;
    let p = params(query)?;
    let taken = |name: &str| route.filters.contains(&name);
    if ["channel", "field", "kind"].iter().any(|name| !taken(name) && p.filter(name).is_some()) {
        return Err(bad(route.refuse.0, route.refuse.1));
    }
    if let Some(k) = &p.kind {
        if !matches!(k.as_str(), "state" | "alert" | "event" | "error") {
            return Err(bad("kind", format!("`{k}` is not one of state, alert, event, error")));
        }
    }
    let page = p.page(&storage)?;
    let mut filters: Vec<&(dyn ToSql + Sync)> = Vec::new();
    let mut names = Vec::new();
    for name in route.filters {
        if let Some(value) = p.filter(name) {
            filters.push(value);
            names.push(*name);
        }
    }
    let sql = select(route.columns, route.table, route.time, &names, &page);
    let (rows, source) = run(&storage, device, &sql, &page, &filters).await?;
    let last = rows.last().and_then(|r| key(r, route.time));
    let items = rows.iter().map(route.item).collect();
    Ok(answer(device, items, last, &page, source))
}

fn frame_id(row: &Row) -> Value {
    json!(row.try_get::<_, Uuid>("frame_id").ok().map(|u| u.simple().to_string()))
}

fn telemetry_item(row: &Row) -> Value {
    let received = opt_us(row, "received_at").unwrap_or_default();
    let mut item = serde_json::Map::new();
    item.insert("id".into(), frame_id(row));
    item.insert("channel".into(), json!(row.try_get::<_, String>("channel").ok()));
    item.insert("received_us".into(), json!(received));
    item.insert("received_at".into(), rfc3339(received));
    item.insert("device_time_us".into(), json!(opt_us(row, "device_time")));
    item.insert("origin".into(), json!(row.try_get::<_, String>("origin").ok()));
    payload(row, &mut item, "payload");
    Value::Object(item)
}

fn aggregate_item(row: &Row) -> Value {
    let start = opt_us(row, "window_start").unwrap_or_default();
    json!({
        "id": frame_id(row),
        "channel": row.try_get::<_, String>("channel").ok(),
        "field": row.try_get::<_, String>("field").ok(),
        "window_start_us": start,
        "window_start": rfc3339(start),
        "window_end_us": opt_us(row, "window_end"),
        "count": row.try_get::<_, i64>("count").ok(),
        "sum": row.try_get::<_, f64>("sum").ok(),
        "min": row.try_get::<_, f64>("min").ok(),
        "max": row.try_get::<_, f64>("max").ok(),
        "mean": row.try_get::<_, f64>("mean").ok(),
        "variance": row.try_get::<_, f64>("variance").ok(),
        "origin": row.try_get::<_, String>("origin").ok(),
    })
}

fn event_item(row: &Row) -> Value {
    let received = opt_us(row, "received_at").unwrap_or_default();
    let mut item = serde_json::Map::new();
    item.insert("id".into(), frame_id(row));
    item.insert("kind".into(), json!(row.try_get::<_, String>("kind").ok()));
    item.insert("channel".into(), json!(row.try_get::<_, String>("channel").ok()));
    item.insert("producer".into(), json!(row.try_get::<_, String>("producer").ok()));
    item.insert("seq".into(), json!(row.try_get::<_, i64>("seq").ok()));
    item.insert("received_us".into(), json!(received));
    item.insert("received_at".into(), rfc3339(received));
    item.insert("device_time_us".into(), json!(opt_us(row, "device_time")));
    item.insert("origin".into(), json!(row.try_get::<_, String>("origin").ok()));
    if let Ok(Some(s)) = row.try_get::<_, Option<String>>("severity") {
        item.insert("severity".into(), json!(s));
    }
    if let Ok(Some(m)) = row.try_get::<_, Option<String>>("message") {
        item.insert("message".into(), json!(m));
    }
    payload(row, &mut item, "body");
    Value::Object(item)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let t = system_time(1_763_800_000_123_456);
        let id = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(decode_cursor(&encode_cursor(t, id)).ok(), Some((t, id)));
        for bad in ["", "!!", "bm90LWEtY3Vyc29y", &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("1.xyz")] {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn times_are_rfc3339_or_milliseconds() {
        assert_eq!(parse_time("from", "1000").ok(), Some(system_time(1_000_000)));
        assert_eq!(parse_time("from", "1970-01-01T00:00:01Z").ok(), Some(system_time(1_000_000)));
        assert_eq!(parse_time("from", "1970-01-01T01:00:01.5+01:00").ok(), Some(system_time(1_500_000)));
        let err = parse_time("from", "yesterday").expect_err("not a time");
        assert_eq!(err.0, StatusCode::BAD_REQUEST);
        assert!(err.1["error"].as_str().is_some_and(|e| e.starts_with("from:")), "{}", err.1);
        assert!(parse_time("to", &i64::MAX.to_string()).is_err());
    }

    #[test]
    fn select_numbers_its_parameters() {
        let page =
            Page { from: UNIX_EPOCH, to: UNIX_EPOCH, limit: 10, desc: true, after: Some((UNIX_EPOCH, Uuid::nil())) };
        let sql = select("x", "t", "ts", &["channel", "kind"], &page);
        assert_eq!(
            sql,
            "SELECT x FROM t WHERE device = $1 AND ts >= $2 AND ts < $3 AND channel = $4 AND kind = $5 \
             AND (ts, frame_id) < ($6, $7) ORDER BY ts DESC, frame_id DESC LIMIT $8"
        );
    }
}
