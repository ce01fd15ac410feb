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

use super::insert;
use super::read::Server;
use super::rows::Rows;
use super::schema::{day_of, Maintenance, Table};
use super::{StorageConfig, StorageError};
use crate::internal_events::emit;
use crate::internal_events::storage::{RowStoredRaw, RowsExpired, WriteFailed, WriteRetry};
use crate::lifecycle::Lifecycle;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

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
                    let retry = match kind {
                        "duplicate" if !on_conflict => WriteRetry::OnConflict,
                        "data" if !isolate => WriteRetry::Isolate,
                        _ => WriteRetry::Backoff(backoff),
                    };
                    emit(WriteFailed { kind, error: &e, rows: rows.len(), retry });
                    match retry {
                        WriteRetry::OnConflict => {
                            on_conflict = true;
                            continue;
                        }
                        WriteRetry::Isolate => {
                            isolate = true;
                            continue;
                        }
                        WriteRetry::Backoff(_) if kind == "no_partition" => self.maintenance.forget(),
                        WriteRetry::Backoff(_) => {}
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
                        emit(RowStoredRaw { error: &e });
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
        let inserted = insert::insert(&tx, rows, raw_fallback, on_conflict, &err).await?;
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
            emit(RowsExpired { rows: expired });
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
