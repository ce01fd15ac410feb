//! The history writer: one task per node.
//!
//! Shard workers [`Writer::submit`] the rows of each batch and get a
//! [`Commit`] to wait on; they wait for it before they checkpoint and ack,
//! so a message is acked only once its rows are committed. The queue holds
//! `queue_depth` requests; when it is full `submit` waits (the workers stop
//! pulling, and JetStream holds the backlog).
//!
//! The task runs `writer_connections` lanes; each takes every request
//! queued, and those that arrive within `writer_linger_ms` of the first
//! (group commit; up to `batch_rows` rows), into one transaction: one
//! `INSERT … SELECT FROM unnest(…)` per table, the whole columns sent as
//! binary arrays. Plain inserts first; a batch that meets a row already
//! stored (a replay) is written again with `ON CONFLICT DO NOTHING`. A failed transaction
//! is retried with backoff (100 ms doubling to 5 s) until it commits: a
//! Postgres restart costs a pause, never a row, and a commit whose answer
//! was lost is simply written again and ignored as a duplicate. A request
//! whose worker has given up (its [`Commit`] dropped) is skipped: that
//! worker restarts from its checkpoint and sends the rows again.
//!
//! A payload Postgres refuses as `jsonb` (say `\u0000` in a string) is
//! stored as bytes in `raw` instead; nothing is ever refused for its shape.

use super::read::Server;
use super::schema::{day_of, Maintenance, Table};
use super::{StorageConfig, StorageError};
use crate::lifecycle::Lifecycle;
use fluxmesh_schemas::frame::{ArchivedBody, ArchivedFrame, Body, Frame, Severity};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{IsNull, ToSql, Type};
use uuid::Uuid;

/// One telemetry message.
#[derive(Debug, Clone)]
pub struct TelemetryRow {
    pub device: String,
    pub received_us: i64,
    pub id: Uuid,
    pub channel: String,
    pub device_time_us: Option<i64>,
    pub origin: String,
    pub payload: Vec<u8>,
    /// The payload is JSON that `jsonb` takes.
    pub json: bool,
}

/// One derived frame other than an aggregate.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub device: String,
    pub received_us: i64,
    pub id: Uuid,
    pub kind: &'static str,
    pub channel: String,
    pub producer: String,
    pub seq: i64,
    pub device_time_us: Option<i64>,
    pub origin: String,
    pub severity: Option<&'static str>,
    pub message: Option<String>,
    /// A JSON document (state, alert extras, event), or empty.
    pub body: Vec<u8>,
    pub json: bool,
}

/// One closed aggregation window.
#[derive(Debug, Clone)]
pub struct AggregateRow {
    pub device: String,
    /// When the mesh received the message that closed the window.
    pub received_us: i64,
    pub channel: String,
    pub field: String,
    pub start_us: i64,
    pub end_us: i64,
    pub count: i64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub variance: f64,
    pub id: Uuid,
    pub origin: String,
}

/// The rows of one shard batch.
#[derive(Debug, Default, Clone)]
pub struct Rows {
    pub telemetry: Vec<TelemetryRow>,
    pub events: Vec<EventRow>,
    pub aggregates: Vec<AggregateRow>,
}

/// JSON that `jsonb` accepts: valid JSON (checked without building a
/// value) with no `\u0000` escape, which `jsonb` refuses.
pub fn jsonb_ok(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && !bytes.windows(6).any(|w| w == b"\\u0000")
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

impl Rows {
    pub fn len(&self) -> usize {
        self.telemetry.len() + self.events.len() + self.aggregates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a telemetry frame as it was stored in the stream.
    pub fn telemetry(&mut self, frame: &ArchivedFrame) {
        let payload = match &frame.body {
            ArchivedBody::Telemetry { payload } => payload.as_slice().to_vec(),
            _ => return,
        };
        self.telemetry.push(TelemetryRow {
            device: frame.device.as_str().to_owned(),
            received_us: frame.received_time_us.to_native(),
            id: Uuid::from_bytes(frame.id.0),
            channel: frame.channel.as_str().to_owned(),
            device_time_us: frame.device_time_us(),
            origin: frame.origin.as_str().to_owned(),
            json: jsonb_ok(&payload),
            payload,
        });
    }

    /// Adds a derived frame.
    pub fn derived(&mut self, frame: &Frame) {
        let id = Uuid::from_bytes(frame.id.0);
        let (severity, message, body) = match &frame.body {
            Body::Telemetry { .. } => return,
            Body::Aggregate(a) => {
                self.aggregates.push(AggregateRow {
                    device: frame.device.clone(),
                    received_us: frame.received_time_us,
                    channel: frame.channel.clone(),
                    field: a.field.clone(),
                    start_us: a.window_start_us,
                    end_us: a.window_end_us,
                    count: i64::try_from(a.count).unwrap_or(i64::MAX),
                    sum: a.sum,
                    min: a.min,
                    max: a.max,
                    mean: a.mean,
                    variance: a.variance,
                    id,
                    origin: frame.origin.clone(),
                });
                return;
            }
            Body::State { json } | Body::Event { json } => (None, None, json.clone()),
            Body::Alert { severity, message, json } => {
                let severity = match severity {
                    Severity::Info => "info",
                    Severity::Warning => "warning",
                    Severity::Critical => "critical",
                };
                (Some(severity), Some(message.clone()), json.clone())
            }
            Body::Error { message } => (None, Some(message.clone()), Vec::new()),
        };
        self.events.push(EventRow {
            device: frame.device.clone(),
            received_us: frame.received_time_us,
            id,
            kind: frame.kind().as_str(),
            channel: frame.channel.clone(),
            producer: frame.producer.clone(),
            seq: i64::try_from(frame.seq).unwrap_or(i64::MAX),
            device_time_us: frame.device_time_us,
            origin: frame.origin.clone(),
            severity,
            message,
            json: jsonb_ok(&body),
            body,
        });
    }

    /// The first and second halves of each table's rows.
    fn halves(&self) -> (Rows, Rows) {
        let (t1, t2) = self.telemetry.split_at(self.telemetry.len() / 2);
        let (e1, e2) = self.events.split_at(self.events.len() / 2);
        let (a1, a2) = self.aggregates.split_at(self.aggregates.len() / 2);
        (
            Rows { telemetry: t1.to_vec(), events: e1.to_vec(), aggregates: a1.to_vec() },
            Rows { telemetry: t2.to_vec(), events: e2.to_vec(), aggregates: a2.to_vec() },
        )
    }

    fn append(&mut self, other: Rows) {
        self.telemetry.extend(other.telemetry);
        self.events.extend(other.events);
        self.aggregates.extend(other.aggregates);
    }
}

/// The writer's queue.
#[derive(Debug, Clone)]
pub struct Writer {
    tx: mpsc::Sender<Request>,
}

#[derive(Debug)]
struct Request {
    rows: Rows,
    done: oneshot::Sender<()>,
    queued: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the history writer has stopped")]
    Stopped,
}

/// Resolves once the submitted rows are committed.
#[derive(Debug)]
pub struct Commit(oneshot::Receiver<()>);

impl Commit {
    pub async fn wait(self) -> Result<(), WriteError> {
        self.0.await.map_err(|_| WriteError::Stopped)
    }
}

impl Writer {
    pub fn spawn(cfg: &StorageConfig, primary: Server, maintenance: Maintenance, life: &Lifecycle) -> Writer {
        let (tx, rx) = mpsc::channel(cfg.queue_depth);
        let task = Task {
            primary,
            maintenance,
            batch_rows: cfg.batch_rows,
            linger: Duration::from_millis(cfg.writer_linger_ms),
            timeout: cfg.query_timeout(),
        };
        life.spawn(task.run(rx, cfg.writer_connections, life.clone()));
        Writer { tx }
    }

    /// Queues `rows`; waits while the queue is full.
    pub async fn submit(&self, rows: Rows) -> Result<Commit, WriteError> {
        let (done, commit) = oneshot::channel();
        self.tx.send(Request { rows, done, queued: Instant::now() }).await.map_err(|_| WriteError::Stopped)?;
        metrics::gauge!(crate::internal_events::names::PG_WRITER_QUEUE)
            .set((self.tx.max_capacity() - self.tx.capacity()) as f64);
        Ok(Commit(commit))
    }
}

/// After the stop signal, the writer writes what is queued (no more comes:
/// the node stops it after its shard workers), taking at most this long.
const STOP_DEADLINE: Duration = crate::lifecycle::deadline::HISTORY_WRITER;

struct Task {
    primary: Server,
    maintenance: Maintenance,
    batch_rows: usize,
    linger: Duration,
    timeout: Duration,
}

impl Task {
    /// `lanes` loops share the queue, each with one transaction in flight.
    async fn run(self, rx: mpsc::Receiver<Request>, lanes: usize, life: Lifecycle) {
        let rx = tokio::sync::Mutex::new(rx);
        futures::future::join_all((0..lanes).map(|_| self.lane(&rx, &life))).await;
        tracing::debug!("history writer stopped");
    }

    async fn lane(&self, rx: &tokio::sync::Mutex<mpsc::Receiver<Request>>, life: &Lifecycle) {
        let mut deadline: Option<Instant> = None;
        loop {
            let mut group = Vec::new();
            {
                let mut rx = rx.lock().await;
                let first = match deadline {
                    None => tokio::select! {
                        r = rx.recv() => r,
                        _ = life.stopped() => {
                            deadline = Some(Instant::now() + STOP_DEADLINE);
                            continue;
                        }
                    },
                    // Stopping: what is queued, then done.
                    Some(_) => rx.try_recv().ok(),
                };
                let Some(first) = first else { break };
                let mut rows = first.rows.len();
                group.push(first);
                // Group commit: more rows for up to `linger`, not once
                // stopping.
                let linger_until = tokio::time::Instant::now() + self.linger;
                while rows < self.batch_rows {
                    let next = match rx.try_recv() {
                        Ok(r) => Some(r),
                        Err(_) if deadline.is_none() && !life.is_stopping() && !self.linger.is_zero() => {
                            tokio::time::timeout_at(linger_until, rx.recv()).await.ok().flatten()
                        }
                        Err(_) => None,
                    };
                    let Some(r) = next else { break };
                    rows += r.rows.len();
                    group.push(r);
                }
                metrics::gauge!(crate::internal_events::names::PG_WRITER_QUEUE).set(rx.len() as f64);
            }
            // A worker that gave up resends its rows after its restart.
            group.retain(|r| !r.done.is_closed());
            if group.is_empty() {
                continue;
            }
            let oldest = group.iter().map(|r| r.queued).min().unwrap_or_else(Instant::now);
            let mut all = Rows::default();
            let mut senders = Vec::with_capacity(group.len());
            for r in group {
                all.append(r.rows);
                senders.push(r.done);
            }
            self.expire(&mut all);
            if !self.write_until_committed(&all, life, deadline).await {
                tracing::error!(
                    rows = all.len(),
                    "history writer stopped before these rows committed; their messages stay unacked"
                );
                break;
            }
            metrics::histogram!(crate::internal_events::names::PG_WRITE_LAG_SECONDS)
                .record(oldest.elapsed().as_secs_f64());
            for done in senders {
                let _ = done.send(());
            }
        }
    }

    /// Retries until the rows commit; false if the stop deadline passed.
    async fn write_until_committed(&self, rows: &Rows, life: &Lifecycle, deadline: Option<Instant>) -> bool {
        let mut backoff = Duration::from_millis(100);
        let mut isolate = false;
        // Plain inserts first: `ON CONFLICT DO NOTHING` costs about 1.6x
        // per row (speculative insertion), and duplicates only come with
        // replays. A batch that meets one is written again with it.
        let mut on_conflict = false;
        loop {
            let started = Instant::now();
            let result = if isolate {
                self.write_isolating(rows.clone()).await
            } else {
                self.write(rows, false, on_conflict).await
            };
            match result {
                Ok(()) => {
                    metrics::histogram!(crate::internal_events::names::PG_BATCH_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    metrics::histogram!(crate::internal_events::names::PG_BATCH_ROWS).record(rows.len() as f64);
                    return true;
                }
                Err(e) => {
                    let kind = classify(&e);
                    metrics::counter!(crate::internal_events::names::PG_WRITE_ERRORS_TOTAL, "kind" => kind)
                        .increment(1);
                    match kind {
                        "duplicate" if !on_conflict => {
                            on_conflict = true;
                            continue;
                        }
                        "data" if !isolate => {
                            tracing::warn!(error = %fluxmesh_mesh::error_chain(&e), rows = rows.len(), "Postgres refused a value; finding the row and storing its JSON as bytes");
                            isolate = true;
                            continue;
                        }
                        "no_partition" => self.maintenance.forget(),
                        "transient" => {
                            tracing::warn!(error = %fluxmesh_mesh::error_chain(&e), retry_in = ?backoff, "history write failed; retrying")
                        }
                        _ => {
                            tracing::error!(error = %fluxmesh_mesh::error_chain(&e), retry_in = ?backoff, "history write failed; retrying (shards wait, nothing is acked)")
                        }
                    }
                }
            }
            let past_deadline = deadline.or_else(|| life.is_stopping().then(|| Instant::now() + STOP_DEADLINE));
            if past_deadline.is_some_and(|d| Instant::now() + backoff > d) {
                return false;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Writes `rows`, halving every part Postgres refuses a value in, until
    /// the refused rows are alone; those are stored with their JSON as
    /// bytes (`raw`). About 2·log2(n) transactions per refused row.
    fn write_isolating(&self, rows: Rows) -> futures::future::BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            match self.write(&rows, false, true).await {
                Err(e) if classify(&e) == "data" => {
                    if rows.len() <= 1 {
                        tracing::warn!(error = %fluxmesh_mesh::error_chain(&e), "a row's JSON was refused; stored as bytes");
                        metrics::counter!(crate::internal_events::names::PG_ROWS_RAW_FALLBACK_TOTAL).increment(1);
                        return self.write(&rows, true, true).await;
                    }
                    let (a, b) = rows.halves();
                    self.write_isolating(a).await?;
                    self.write_isolating(b).await
                }
                other => other,
            }
        })
    }

    /// One transaction with every row.
    async fn write(&self, rows: &Rows, raw_fallback: bool, on_conflict: bool) -> Result<(), StorageError> {
        let err = |e| self.primary.error(e);
        let mut client = self.primary.client(self.timeout).await?;
        for (table, days) in self.days(rows) {
            for day in days {
                self.maintenance.ensure(&mut client, &self.primary.name, table, day).await?;
            }
        }
        let tx = client.transaction().await.map_err(err)?;
        let mut inserted = [0u64; 3];
        if !rows.telemetry.is_empty() {
            let t = &rows.telemetry;
            if on_conflict {
                let device: Vec<&str> = t.iter().map(|r| r.device.as_str()).collect();
                let received: Vec<SystemTime> = t.iter().map(|r| system_time(r.received_us)).collect();
                let id: Vec<Uuid> = t.iter().map(|r| r.id).collect();
                let channel: Vec<&str> = t.iter().map(|r| r.channel.as_str()).collect();
                let device_time: Vec<Option<SystemTime>> =
                    t.iter().map(|r| r.device_time_us.map(system_time)).collect();
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
        tx.commit().await.map_err(err)?;
        let sent = [rows.telemetry.len(), rows.events.len(), rows.aggregates.len()];
        for (i, table) in Table::ALL.iter().enumerate() {
            if sent[i] > 0 {
                metrics::counter!(crate::internal_events::names::PG_ROWS_WRITTEN_TOTAL, "table" => table.name())
                    .increment(inserted[i]);
                let duplicates = (sent[i] as u64).saturating_sub(inserted[i]);
                if duplicates > 0 {
                    metrics::counter!(crate::internal_events::names::PG_ROWS_DUPLICATE_TOTAL, "table" => table.name())
                        .increment(duplicates);
                }
            }
        }
        Ok(())
    }

    /// Leaves out rows already past retention (their partition is, or is
    /// about to be, dropped), counted in `fluxmesh_pg_rows_expired_total`.
    fn expire(&self, rows: &mut Rows) {
        let mut expired = 0;
        if let Some(first) = self.maintenance.first_kept_day(Table::Telemetry) {
            let before = rows.telemetry.len();
            rows.telemetry.retain(|r| day_of(r.received_us) >= first);
            expired += before - rows.telemetry.len();
        }
        if let Some(first) = self.maintenance.first_kept_day(Table::Events) {
            let before = rows.events.len();
            rows.events.retain(|r| day_of(r.received_us) >= first);
            expired += before - rows.events.len();
        }
        if let Some(first) = self.maintenance.first_kept_day(Table::Aggregates) {
            let before = rows.aggregates.len();
            rows.aggregates.retain(|r| day_of(r.received_us) >= first);
            expired += before - rows.aggregates.len();
        }
        if expired > 0 {
            metrics::counter!(crate::internal_events::names::PG_ROWS_EXPIRED_TOTAL).increment(expired as u64);
            tracing::debug!(expired, "rows past retention not stored");
        }
    }

    /// The days each table's rows fall on.
    fn days(&self, rows: &Rows) -> Vec<(Table, Vec<i64>)> {
        let mut out = Vec::with_capacity(3);
        let mut collect = |table, us: &mut dyn Iterator<Item = i64>| {
            let mut days: Vec<i64> = us.map(day_of).collect();
            days.sort_unstable();
            days.dedup();
            if !days.is_empty() {
                out.push((table, days));
            }
        };
        collect(Table::Telemetry, &mut rows.telemetry.iter().map(|r| r.received_us));
        collect(Table::Events, &mut rows.events.iter().map(|r| r.received_us));
        collect(Table::Aggregates, &mut rows.aggregates.iter().map(|r| r.received_us));
        out
    }
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

pub fn system_time(us: i64) -> SystemTime {
    if us >= 0 {
        UNIX_EPOCH + Duration::from_micros(us.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
    }
}

/// Whether a Postgres error is worth retrying as it is.
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    match e.code() {
        None => true, // the connection: closed, refused, timed out
        Some(code) => {
            let c = code.code();
            c.starts_with("08") // connection exception
                || c.starts_with("53") // insufficient resources
                || c.starts_with("57P") // shutting down, cannot connect now
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::READ_ONLY_SQL_TRANSACTION
        }
    }
}

/// `transient`, `duplicate` (a row already stored: a replay), `data` (a
/// value Postgres refuses), `no_partition`, or `other` (retried too, but
/// logged as an error).
fn classify(e: &StorageError) -> &'static str {
    match e {
        StorageError::Postgres { source, .. } => match source.code() {
            _ if is_transient(source) => "transient",
            Some(code) if *code == tokio_postgres::error::SqlState::UNIQUE_VIOLATION => "duplicate",
            Some(code) if code.code().starts_with("22") => "data",
            Some(code) if *code == tokio_postgres::error::SqlState::CHECK_VIOLATION => "no_partition",
            _ => "other",
        },
        other if other.is_transient() => "transient",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonb_takes_json_without_nul_escapes() {
        assert!(jsonb_ok(br#"{"t":21.5}"#));
        assert!(jsonb_ok(b"[1,2]"));
        assert!(!jsonb_ok(br#"{"s":"a\u0000b"}"#));
        assert!(!jsonb_ok(b"\x01\x02binary"));
        assert!(!jsonb_ok(b""));
        assert!(!jsonb_ok(b"{\"t\":1} trailing"));
    }

    #[test]
    fn plain_inserts_have_no_on_conflict() {
        for sql in [INSERT_TELEMETRY, INSERT_EVENTS, INSERT_AGGREGATES] {
            assert!(sql.ends_with(" ON CONFLICT DO NOTHING"), "{sql}");
            assert_eq!(insert_sql(sql, true), sql);
            assert!(!insert_sql(sql, false).contains("ON CONFLICT"), "{sql}");
        }
    }

    #[test]
    fn system_time_round_trips_microseconds() {
        for us in [0i64, 1, -1, 1_763_800_000_123_456, -86_400_000_000] {
            let t = system_time(us);
            let back = match t.duration_since(UNIX_EPOCH) {
                Ok(d) => d.as_micros() as i64,
                Err(e) => -(e.duration().as_micros() as i64),
            };
            assert_eq!(back, us);
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
