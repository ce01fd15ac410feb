//! The SQL of one history transaction: each table's rows in one statement,
//! the whole columns sent as binary arrays (`INSERT … SELECT FROM
//! unnest(…)`), telemetry by `COPY … BINARY` unless a replay makes the
//! writer ask for `ON CONFLICT DO NOTHING`. A payload goes to the `json`
//! column (as text, checked by Postgres) or to `raw` (bytes).

use super::rows::{system_time, Rows};
use super::StorageError;
use deadpool_postgres::Transaction;
use std::time::SystemTime;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{IsNull, ToSql, Type};
use uuid::Uuid;

/// Inserts every row in `tx`; returns how many rows each table took
/// (telemetry, events, aggregates: fewer than sent are duplicates).
/// `raw_fallback` stores every payload as bytes; `on_conflict` skips rows
/// already stored.
pub(super) async fn insert(
    tx: &Transaction<'_>,
    rows: &Rows,
    raw_fallback: bool,
    on_conflict: bool,
    err: &(dyn Fn(tokio_postgres::Error) -> StorageError + Sync),
) -> Result<[u64; 3], StorageError> {
    let mut inserted = [0u64; 3];
    if !rows.telemetry.is_empty() {
        let t = &rows.telemetry;
        if on_conflict {
            let device: Vec<&str> = t.iter().map(|r| r.device.as_str()).collect();
            let received: Vec<SystemTime> = t.iter().map(|r| system_time(r.received_us)).collect();
            let id: Vec<Uuid> = t.iter().map(|r| r.id).collect();
            let channel: Vec<&str> = t.iter().map(|r| r.channel.as_str()).collect();
            let device_time: Vec<Option<SystemTime>> = t.iter().map(|r| r.device_time_us.map(system_time)).collect();
            let origin: Vec<&str> = t.iter().map(|r| r.origin.as_str()).collect();
            let (json, raw) = split_json(t.iter().map(|r| (r.payload.as_slice(), r.json && !raw_fallback)));
            let statement = tx.prepare_cached(INSERT_TELEMETRY).await.map_err(err)?;
            inserted[0] = tx
                .execute(&statement, &[&device, &received, &id, &channel, &device_time, &origin, &json, &raw])
                .await
                .map_err(err)?;
        } else {
            // The bulk of the rows: COPY BINARY, which inserts in
            // batches (a row already there fails it: see on_conflict).
            let sink = tx.copy_in(COPY_TELEMETRY).await.map_err(err)?;
            let writer = BinaryCopyInWriter::new(sink, &TELEMETRY_TYPES);
            futures::pin_mut!(writer);
            for r in t {
                let (json, raw) = json_or_raw(&r.payload, r.json && !raw_fallback);
                let json = json.map(JsonText);
                let received = system_time(r.received_us);
                let device_time = r.device_time_us.map(system_time);
                writer
                    .as_mut()
                    .write(&[&r.device, &received, &r.id, &r.channel, &device_time, &r.origin, &json, &raw])
                    .await
                    .map_err(err)?;
            }
            inserted[0] = writer.finish().await.map_err(err)?;
        }
    }
    if !rows.events.is_empty() {
        let e = &rows.events;
        let device: Vec<&str> = e.iter().map(|r| r.device.as_str()).collect();
        let received: Vec<SystemTime> = e.iter().map(|r| system_time(r.received_us)).collect();
        let id: Vec<Uuid> = e.iter().map(|r| r.id).collect();
        let kind: Vec<&str> = e.iter().map(|r| r.kind).collect();
        let channel: Vec<&str> = e.iter().map(|r| r.channel.as_str()).collect();
        let producer: Vec<&str> = e.iter().map(|r| r.producer.as_str()).collect();
        let seq: Vec<i64> = e.iter().map(|r| r.seq).collect();
        let device_time: Vec<Option<SystemTime>> = e.iter().map(|r| r.device_time_us.map(system_time)).collect();
        let origin: Vec<&str> = e.iter().map(|r| r.origin.as_str()).collect();
        let severity: Vec<Option<&str>> = e.iter().map(|r| r.severity).collect();
        let message: Vec<Option<&str>> = e.iter().map(|r| r.message.as_deref()).collect();
        let (json, raw) = split_json(e.iter().map(|r| (r.body.as_slice(), r.json && !raw_fallback)));
        let statement = tx.prepare_cached(insert_sql(INSERT_EVENTS, on_conflict)).await.map_err(err)?;
        inserted[1] = tx
            .execute(
                &statement,
                &[
                    &device,
                    &received,
                    &id,
                    &kind,
                    &channel,
                    &producer,
                    &seq,
                    &device_time,
                    &origin,
                    &severity,
                    &message,
                    &json,
                    &raw,
                ],
            )
            .await
            .map_err(err)?;
    }
    if !rows.aggregates.is_empty() {
        let a = &rows.aggregates;
        let device: Vec<&str> = a.iter().map(|r| r.device.as_str()).collect();
        let received: Vec<SystemTime> = a.iter().map(|r| system_time(r.received_us)).collect();
        let id: Vec<Uuid> = a.iter().map(|r| r.id).collect();
        let channel: Vec<&str> = a.iter().map(|r| r.channel.as_str()).collect();
        let field: Vec<&str> = a.iter().map(|r| r.field.as_str()).collect();
        let start: Vec<SystemTime> = a.iter().map(|r| system_time(r.start_us)).collect();
        let end: Vec<SystemTime> = a.iter().map(|r| system_time(r.end_us)).collect();
        let count: Vec<i64> = a.iter().map(|r| r.count).collect();
        let sum: Vec<f64> = a.iter().map(|r| r.sum).collect();
        let min: Vec<f64> = a.iter().map(|r| r.min).collect();
        let max: Vec<f64> = a.iter().map(|r| r.max).collect();
        let mean: Vec<f64> = a.iter().map(|r| r.mean).collect();
        let variance: Vec<f64> = a.iter().map(|r| r.variance).collect();
        let origin: Vec<&str> = a.iter().map(|r| r.origin.as_str()).collect();
        let statement = tx.prepare_cached(insert_sql(INSERT_AGGREGATES, on_conflict)).await.map_err(err)?;
        inserted[2] = tx
            .execute(
                &statement,
                &[
                    &device, &received, &id, &channel, &field, &start, &end, &count, &sum, &min, &max, &mean,
                    &variance, &origin,
                ],
            )
            .await
            .map_err(err)?;
    }
    Ok(inserted)
}

const COPY_TELEMETRY: &str =
    "COPY telemetry (device, received_at, frame_id, channel, device_time, origin, json, raw) FROM STDIN BINARY";
const TELEMETRY_TYPES: [Type; 8] =
    [Type::TEXT, Type::TIMESTAMPTZ, Type::UUID, Type::TEXT, Type::TIMESTAMPTZ, Type::TEXT, Type::JSONB, Type::BYTEA];

/// JSON text sent as `jsonb` without parsing it here (binary format:
/// version 1, then the text); Postgres checks it.
#[derive(Debug)]
struct JsonText<'a>(&'a str);

impl ToSql for JsonText<'_> {
    fn to_sql(&self, _: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&[1]);
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    tokio_postgres::types::to_sql_checked!();
}

const INSERT_TELEMETRY: &str = "INSERT INTO telemetry (device, received_at, frame_id, channel, device_time, origin, json, raw) \
     SELECT d, r, f, c, t, o, j::jsonb, b \
     FROM unnest($1::text[], $2::timestamptz[], $3::uuid[], $4::text[], $5::timestamptz[], $6::text[], $7::text[], $8::bytea[]) \
     AS u(d, r, f, c, t, o, j, b) \
     ON CONFLICT DO NOTHING";

const INSERT_EVENTS: &str = "INSERT INTO events (device, received_at, frame_id, kind, channel, producer, seq, device_time, origin, severity, message, json, raw) \
     SELECT d, r, f, k, c, p, s, t, o, sv, m, j::jsonb, b \
     FROM unnest($1::text[], $2::timestamptz[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::int8[], $8::timestamptz[], $9::text[], $10::text[], $11::text[], $12::text[], $13::bytea[]) \
     AS u(d, r, f, k, c, p, s, t, o, sv, m, j, b) \
     ON CONFLICT DO NOTHING";

const INSERT_AGGREGATES: &str = "INSERT INTO aggregates (device, received_at, frame_id, channel, field, window_start, window_end, count, sum, min, max, mean, variance, origin) \
     SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[], $7::timestamptz[], $8::int8[], $9::float8[], $10::float8[], $11::float8[], $12::float8[], $13::float8[], $14::text[]) \
     ON CONFLICT DO NOTHING";

/// `sql` as it is with `on_conflict`, else without its
/// `ON CONFLICT DO NOTHING` (the plain insert tried first).
fn insert_sql(sql: &'static str, on_conflict: bool) -> &'static str {
    if on_conflict {
        sql
    } else {
        sql.strip_suffix(" ON CONFLICT DO NOTHING").unwrap_or(sql)
    }
}

/// A payload for the `json` column (as text) or the `raw` column (as
/// bytes), the other null; both null when it is empty.
fn json_or_raw(bytes: &[u8], json: bool) -> (Option<&str>, Option<&[u8]>) {
    match json.then(|| std::str::from_utf8(bytes).ok()).flatten() {
        Some(text) => (Some(text), None),
        None if bytes.is_empty() => (None, None),
        None => (None, Some(bytes)),
    }
}

/// Each payload to `json` or `raw` ([`json_or_raw`]), as two columns.
fn split_json<'a>(items: impl Iterator<Item = (&'a [u8], bool)>) -> (Vec<Option<&'a str>>, Vec<Option<&'a [u8]>>) {
    items.map(|(bytes, json)| json_or_raw(bytes, json)).unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_inserts_have_no_on_conflict() {
        for sql in [INSERT_TELEMETRY, INSERT_EVENTS, INSERT_AGGREGATES] {
            assert!(sql.ends_with(" ON CONFLICT DO NOTHING"), "{sql}");
            assert_eq!(insert_sql(sql, true), sql);
            assert!(!insert_sql(sql, false).contains("ON CONFLICT"), "{sql}");
        }
    }

    #[test]
    fn split_json_puts_each_payload_in_one_column() {
        let items = [(&b"{}"[..], true), (&b"\xff"[..], false), (&b""[..], false)];
        let (json, raw) = split_json(items.into_iter());
        assert_eq!(json, vec![Some("{}"), None, None]);
        assert_eq!(raw, vec![None, Some(&b"\xff"[..]), None]);
    }
}
