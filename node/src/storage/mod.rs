//! History in PostgreSQL: writes on the primary, reads on
//! replicas.
//!
//! - [`schema`]: embedded migrations, run once per cluster under an advisory
//!   lock, and the daily partitions (created ahead, dropped by retention).
//! - [`writer`]: one task per node; shard workers hand it the rows of a
//!   batch through a bounded queue and wait for the commit before they
//!   checkpoint and ack. Every row is keyed by its frame, so a replay after
//!   a failover or a retry after a lost commit stores nothing twice.
//! - [`read`]: the read pools; a replica is used only while it answers and
//!   its replay lag is within `max_replica_lag_ms`, else the primary.
//! - [`http`]: `GET /api/v1/devices/{id}/{telemetry,aggregates,events}`.
//!
//! With `storage.primary` empty the node runs without any of this.

pub mod http;
mod insert;
pub mod read;
pub mod rows;
pub mod schema;
pub mod writer;

use crate::lifecycle::Lifecycle;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

pub use rows::Rows;
pub use writer::{WriteError, Writer};

/// The `[storage]` config section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Connection string of the primary (`postgres://user:pass@host:port/db`
    /// or `host=… user=…`); empty turns storage off.
    pub primary: String,
    /// Connection strings of read replicas (hot standbys); empty reads
    /// from the primary.
    pub replicas: Vec<String>,
    /// Connections per pool (one pool per server), at most.
    pub pool_size: usize,
    /// A replica whose replay lags more than this is skipped.
    pub max_replica_lag_ms: u64,
    /// How often each replica's health and lag are checked.
    pub replica_check_interval_ms: u64,
    /// Connecting, and each query, give up after this long.
    pub connect_timeout_ms: u64,
    pub query_timeout_ms: u64,
    /// Rows the writer puts in one transaction, at most.
    pub batch_rows: usize,
    /// How long the writer keeps a transaction open for more rows once it
    /// has some (group commit), unless `batch_rows` fill it first. Nothing
    /// but a shard's checkpoint waits for the commit, so this trades a
    /// little history freshness for far fewer commits at low rates.
    pub writer_linger_ms: u64,
    /// Write transactions in flight at once (one connection each): Postgres
    /// runs one core per connection.
    pub writer_connections: usize,
    /// Write requests (one per shard batch) queued for the writer, at most;
    /// when full, shard workers wait (backpressure onto the consumers).
    pub queue_depth: usize,
    /// A shard worker waits this long for its rows to commit before it
    /// gives up and restarts from its last checkpoint (nothing is acked
    /// before the commit, so nothing is lost).
    pub commit_timeout_ms: u64,
    /// Telemetry and events older than this (by received time) are
    /// dropped, a day's partition at a time; 0 keeps everything.
    pub retention_days: u32,
    /// The same for aggregates (by the received time of the message that
    /// closed the window).
    pub aggregate_retention_days: u32,
    /// Daily partitions created ahead of today.
    pub partitions_ahead_days: u32,
    /// How often a node checks partitions and retention.
    pub maintenance_interval_s: u64,
    /// Rows one history request returns by default and at most.
    pub default_limit: usize,
    pub max_limit: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            primary: String::new(),
            replicas: Vec::new(),
            pool_size: 8,
            max_replica_lag_ms: 5000,
            replica_check_interval_ms: 1000,
            connect_timeout_ms: 5000,
            query_timeout_ms: 5000,
            batch_rows: 5000,
            writer_linger_ms: 50,
            writer_connections: 2,
            queue_depth: 64,
            commit_timeout_ms: 20_000,
            retention_days: 30,
            aggregate_retention_days: 400,
            partitions_ahead_days: 3,
            maintenance_interval_s: 3600,
            default_limit: 1000,
            max_limit: 10_000,
        }
    }
}

impl StorageConfig {
    pub fn enabled(&self) -> bool {
        !self.primary.is_empty()
    }

    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.primary.is_empty() && !self.replicas.is_empty() {
            problems.push("storage.replicas: set storage.primary too (replicas are only read from)".to_owned());
        }
        if self.enabled() {
            if let Err(e) = self.primary.parse::<tokio_postgres::Config>() {
                problems.push(format!("storage.primary: not a Postgres connection string: {e}"));
            }
            for (i, r) in self.replicas.iter().enumerate() {
                if let Err(e) = r.parse::<tokio_postgres::Config>() {
                    problems.push(format!("storage.replicas[{i}]: not a Postgres connection string: {e}"));
                }
            }
        }
        if !(1..=1000).contains(&self.pool_size) {
            problems.push("storage.pool_size: must be between 1 and 1000".to_owned());
        }
        if !(1..=1_000_000).contains(&self.batch_rows) {
            problems.push("storage.batch_rows: must be between 1 and 1000000".to_owned());
        }
        if self.writer_linger_ms > 1000 || self.writer_linger_ms >= self.commit_timeout_ms {
            problems
                .push("storage.writer_linger_ms: must be at most 1000 and below storage.commit_timeout_ms".to_owned());
        }
        if self.writer_connections == 0 || self.writer_connections >= self.pool_size {
            problems.push("storage.writer_connections: must be at least 1 and below storage.pool_size".to_owned());
        }
        if self.queue_depth == 0 {
            problems.push("storage.queue_depth: must be at least 1".to_owned());
        }
        if self.replica_check_interval_ms == 0 || self.connect_timeout_ms == 0 || self.query_timeout_ms == 0 {
            problems.push(
                "storage.replica_check_interval_ms, connect_timeout_ms and query_timeout_ms must be at least 1"
                    .to_owned(),
            );
        }
        if self.commit_timeout_ms < 1000 {
            problems.push("storage.commit_timeout_ms: must be at least 1000".to_owned());
        }
        if self.partitions_ahead_days > 366 {
            problems.push("storage.partitions_ahead_days: at most 366".to_owned());
        }
        if self.maintenance_interval_s == 0 {
            problems.push("storage.maintenance_interval_s: must be at least 1".to_owned());
        }
        if self.default_limit == 0 || self.default_limit > self.max_limit {
            problems.push("storage.default_limit: must be between 1 and storage.max_limit".to_owned());
        }
        problems
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub(crate) fn query_timeout(&self) -> Duration {
        Duration::from_millis(self.query_timeout_ms)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage.{what}")]
    Config {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("pool for {server}")]
    Pool {
        server: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("Postgres {server}")]
    Postgres {
        server: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("migrations")]
    Migrate(#[source] refinery::Error),
    #[error("day {day} is out of range for a partition")]
    PartitionDay { day: i64 },
    #[error("Postgres {server} did not answer within {timeout:?}")]
    Timeout { server: String, timeout: Duration },
}

impl StorageError {
    /// Worth retrying: the server was unreachable or went away.
    pub fn is_transient(&self) -> bool {
        match self {
            StorageError::Config { .. } | StorageError::Migrate(_) | StorageError::PartitionDay { .. } => false,
            StorageError::Pool { .. } | StorageError::Timeout { .. } => true,
            StorageError::Postgres { source, .. } => writer::is_transient(source),
        }
    }
}

/// Storage on a node: the writer's queue and the read routes.
#[derive(Debug)]
pub struct Storage {
    pub writer: Writer,
    pub reads: Arc<read::Reads>,
    pub cfg: StorageConfig,
}

impl Storage {
    /// Connects, migrates (once per cluster) and starts the writer, the
    /// replica checks and the partition maintenance. Returns `None` when
    /// storage is off.
    /// Starts the history writer, replica checks and maintenance. `life`'s
    /// stop signal ends the checks and maintenance; `history`'s makes the
    /// writer write what is queued and stop. The node gives `history`'s
    /// only once its shard workers are done, since their last checkpoints
    /// wait for their rows.
    pub async fn start(
        cfg: &StorageConfig,
        node_id: &str,
        life: &Lifecycle,
        history: &Lifecycle,
    ) -> Result<Option<Arc<Storage>>, StorageError> {
        if !cfg.enabled() {
            tracing::info!("storage is off (storage.primary is empty)");
            return Ok(None);
        }
        let primary = read::Server::primary(cfg, node_id)?;
        schema::migrate(&primary.config, &primary.name, cfg.connect_timeout()).await?;
        let maintenance = schema::Maintenance::new(cfg);
        {
            let mut client = primary.client(cfg.query_timeout()).await?;
            maintenance.maintain(&mut client, &primary.name).await?;
        }
        let reads = Arc::new(read::Reads::new(cfg, node_id, primary.clone())?);
        reads.clone().spawn_checks(cfg, life);
        let writer = Writer::spawn(cfg, primary.clone(), maintenance.clone(), history);
        life.spawn(schema::maintain(
            maintenance,
            primary,
            Duration::from_secs(cfg.maintenance_interval_s),
            life.clone(),
        ));
        tracing::info!(replicas = cfg.replicas.len(), "storage on");
        Ok(Some(Arc::new(Storage { writer, reads, cfg: cfg.clone() })))
    }
}

/// `host:port/db` of a connection config, for logs and metric labels:
/// never the password.
pub fn describe(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".to_owned());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or("postgres"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_leaves_out_the_password() {
        let config: tokio_postgres::Config =
            "postgres://fluxmesh:s3cret@127.0.0.1:5433/history".parse().expect("parses");
        assert_eq!(describe(&config), "127.0.0.1:5433/history");
    }

    #[test]
    fn problems_name_the_setting() {
        let cfg = StorageConfig { primary: "postgres://x:y@[bad".to_owned(), ..Default::default() };
        assert!(cfg.problems().iter().any(|p| p.starts_with("storage.primary")), "{:?}", cfg.problems());
        let cfg = StorageConfig { replicas: vec!["postgres://r".to_owned()], ..Default::default() };
        assert!(cfg.problems().iter().any(|p| p.starts_with("storage.replicas")));
        assert!(StorageConfig::default().problems().is_empty());
    }
}
