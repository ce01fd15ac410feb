//! Events of history in Postgres: the writer, maintenance and reads.

use super::{names, InternalEvent};
use fluxmesh_mesh::error_chain;
use metrics::counter;
use std::error::Error;

/// What the writer does after a failed history transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteRetry {
    /// A replayed row was already stored: at once, with `ON CONFLICT DO
    /// NOTHING`.
    OnConflict,
    /// Postgres refused a value: at once, halving the batch until the row
    /// is alone, whose JSON is then stored as bytes.
    Isolate,
    /// After a backoff.
    Backoff(std::time::Duration),
}

/// A history transaction failed (`kind`: `transient`, `duplicate`,
/// `data`, `no_partition`, `other`); the writer retries it (`retry`).
#[derive(Debug)]
pub struct WriteFailed<'a> {
    pub kind: &'static str,
    pub error: &'a dyn Error,
    pub rows: usize,
    pub retry: WriteRetry,
}

impl InternalEvent for WriteFailed<'_> {
    fn emit(self) {
        counter!(names::PG_WRITE_ERRORS_TOTAL, "kind" => self.kind).increment(1);
        let (kind, error, rows) = (self.kind, error_chain(self.error), self.rows);
        match self.retry {
            WriteRetry::OnConflict => {
                tracing::debug!(%error, rows, "a replayed row is already stored; writing the batch with ON CONFLICT DO NOTHING")
            }
            WriteRetry::Isolate => {
                tracing::warn!(%error, rows, "Postgres refused a value; finding the row and storing its JSON as bytes")
            }
            // A partition made meanwhile: the next try makes it.
            WriteRetry::Backoff(retry_in) if kind == "no_partition" => {
                tracing::debug!(%error, ?retry_in, "history write found no partition; making it")
            }
            WriteRetry::Backoff(retry_in) if kind == "transient" => {
                tracing::warn!(%error, ?retry_in, "history write failed; retrying")
            }
            WriteRetry::Backoff(retry_in) => {
                tracing::error!(%error, ?retry_in, "history write failed; retrying (shards wait, nothing is acked)")
            }
        }
    }
}

/// A row whose JSON Postgres refused is stored as bytes in `raw`.
#[derive(Debug)]
pub struct RowStoredRaw<'a> {
    pub error: &'a dyn Error,
}

impl InternalEvent for RowStoredRaw<'_> {
    fn emit(self) {
        counter!(names::PG_ROWS_RAW_FALLBACK_TOTAL).increment(1);
        tracing::warn!(error = %error_chain(self.error), "a row's JSON was refused; stored as bytes");
    }
}

/// Rows past retention, not stored.
#[derive(Debug)]
pub struct RowsExpired {
    pub rows: usize,
}

impl InternalEvent for RowsExpired {
    fn emit(self) {
        counter!(names::PG_ROWS_EXPIRED_TOTAL).increment(self.rows as u64);
        tracing::debug!(expired = self.rows, "rows past retention not stored");
    }
}

/// A partition past retention was dropped.
#[derive(Debug)]
pub struct PartitionDropped<'a> {
    pub table: &'static str,
    pub partition: &'a str,
}

impl InternalEvent for PartitionDropped<'_> {
    fn emit(self) {
        counter!(names::PG_PARTITIONS_DROPPED_TOTAL, "table" => self.table).increment(1);
        tracing::info!(partition = %self.partition, "partition past retention dropped");
    }
}

/// Partition maintenance failed; it runs again after `next_in`.
#[derive(Debug)]
pub struct MaintenanceFailed<'a> {
    pub error: &'a dyn Error,
    pub next_in: std::time::Duration,
}

impl InternalEvent for MaintenanceFailed<'_> {
    fn emit(self) {
        counter!(names::PG_MAINTENANCE_ERRORS_TOTAL).increment(1);
        tracing::warn!(error = %error_chain(self.error), next_in = ?self.next_in, "partition maintenance failed");
    }
}

/// A replica read failed: the replica is set aside until its next check
/// passes, and this read goes to the primary.
#[derive(Debug)]
pub struct ReplicaReadFailed<'a> {
    pub replica: &'a str,
    pub error: &'a dyn Error,
}

impl InternalEvent for ReplicaReadFailed<'_> {
    fn emit(self) {
        counter!(names::PG_READ_FALLBACKS_TOTAL, "reason" => "replica_failed").increment(1);
        tracing::warn!(replica = %self.replica, error = %error_chain(self.error), "replica read failed; reading from the primary");
    }
}

/// A history read through the API failed (answered 503).
#[derive(Debug)]
pub struct HistoryReadFailed<'a> {
    pub error: &'a dyn Error,
}

impl InternalEvent for HistoryReadFailed<'_> {
    fn emit(self) {
        counter!(names::HISTORY_READ_ERRORS_TOTAL).increment(1);
        tracing::warn!(error = %error_chain(self.error), "history read failed");
    }
}
