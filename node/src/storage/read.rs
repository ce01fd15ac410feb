//! Connection pools and read routing.
//!
//! One pool per server. Reads go round-robin to the replicas that are
//! *usable*: their last check answered within the query timeout and showed
//! a replay lag within `max_replica_lag_ms`. With none usable, or when the
//! chosen replica fails, a read goes to the primary. Every replica is
//! checked every `replica_check_interval_ms`; a replica starts unusable
//! until its first check passes.
//!
//! Lag is `now() - pg_last_xact_replay_timestamp()` while the standby has
//! received WAL it has not replayed, else 0 (an idle primary sends nothing,
//! which is not lag).

use super::{describe, StorageConfig, StorageError};
use crate::lifecycle::Lifecycle;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

/// One Postgres server and its pool.
#[derive(Clone)]
pub struct Server {
    /// `host:port/db`: for logs and metric labels (no password).
    pub name: String,
    pub config: tokio_postgres::Config,
    pub pool: Pool,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Server {
    /// The primary: sessions must be read-write, so a standby given by
    /// mistake (or a demoted primary) is refused rather than written to.
    pub fn primary(cfg: &StorageConfig, node_id: &str) -> Result<Server, StorageError> {
        Self::new(&cfg.primary, "primary", cfg, node_id, true)
    }

    fn new(
        conn: &str,
        what: &str,
        cfg: &StorageConfig,
        node_id: &str,
        read_write: bool,
    ) -> Result<Server, StorageError> {
        let mut config: tokio_postgres::Config =
            conn.parse().map_err(|source| StorageError::Config { what: what.to_owned(), source })?;
        if config.get_application_name().is_none() {
            config.application_name(format!("fluxmesh {node_id}"));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(cfg.connect_timeout());
        }
        config.keepalives(true).keepalives_idle(Duration::from_secs(30));
        if read_write {
            config.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        }
        let name = describe(&config);
        let manager =
            Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(cfg.query_timeout()))
            .create_timeout(Some(cfg.connect_timeout()))
            .recycle_timeout(Some(cfg.connect_timeout()))
            .build()
            .map_err(|e| StorageError::Pool { server: name.clone(), source: Box::new(e) })?;
        Ok(Server { name, config, pool })
    }

    /// A pooled connection, or why there is none within `timeout`.
    pub async fn client(&self, timeout: Duration) -> Result<deadpool_postgres::Object, StorageError> {
        match tokio::time::timeout(timeout, self.pool.get()).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(deadpool_postgres::PoolError::Backend(source))) => {
                Err(StorageError::Postgres { server: self.name.clone(), source })
            }
            Ok(Err(e)) => Err(StorageError::Pool { server: self.name.clone(), source: Box::new(e) }),
            Err(_) => Err(StorageError::Timeout { server: self.name.clone(), timeout }),
        }
    }

    /// Runs one read query (a cached prepared statement) within `timeout`.
    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        timeout: Duration,
    ) -> Result<Vec<Row>, StorageError> {
        let run = async {
            let client = self.client(timeout).await?;
            let statement = client.prepare_cached(sql).await.map_err(|e| self.error(e))?;
            client.query(&statement, params).await.map_err(|e| self.error(e))
        };
        tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| StorageError::Timeout { server: self.name.clone(), timeout })?
    }

    pub fn error(&self, source: tokio_postgres::Error) -> StorageError {
        StorageError::Postgres { server: self.name.clone(), source }
    }

    fn record_pool(&self, role: &'static str) {
        let status = self.pool.status();
        for (state, value) in [("size", status.size), ("available", status.available), ("waiting", status.waiting)] {
            metrics::gauge!(crate::internal_events::names::PG_POOL_CONNECTIONS, "server" => self.name.clone(), "role" => role, "state" => state)
                .set(value as f64);
        }
    }
}

/// A replica and what its last check saw.
#[derive(Debug)]
struct Replica {
    server: Server,
    usable: AtomicBool,
    lag_us: AtomicU64,
}

/// Where a read was served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Primary,
    Replica(String),
}

impl Source {
    /// `primary` or `replica:{host:port/db}`: the `Fluxmesh-Read-Source`
    /// header of history answers.
    pub fn label(&self) -> String {
        match self {
            Source::Primary => "primary".to_owned(),
            Source::Replica(name) => format!("replica:{name}"),
        }
    }
}

/// The read side: the primary and the replicas.
#[derive(Debug)]
pub struct Reads {
    primary: Server,
    replicas: Vec<Replica>,
    next: AtomicUsize,
    max_lag_us: u64,
    timeout: Duration,
}

impl Reads {
    pub fn new(cfg: &StorageConfig, node_id: &str, primary: Server) -> Result<Reads, StorageError> {
        let replicas = cfg
            .replicas
            .iter()
            .enumerate()
            .map(|(i, conn)| {
                let server = Server::new(conn, &format!("replicas[{i}]"), cfg, node_id, false)?;
                Ok(Replica { server, usable: AtomicBool::new(false), lag_us: AtomicU64::new(u64::MAX) })
            })
            .collect::<Result<Vec<_>, StorageError>>()?;
        Ok(Reads {
            primary,
            replicas,
            next: AtomicUsize::new(0),
            max_lag_us: cfg.max_replica_lag_ms.saturating_mul(1000),
            timeout: cfg.query_timeout(),
        })
    }

    /// Runs a read on a usable replica, or on the primary when none is
    /// usable or the replica fails to answer. SQL errors (bad input) are
    /// returned as they are, not retried elsewhere.
    pub async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<(Vec<Row>, Source), StorageError> {
        if let Some(replica) = self.pick() {
            match replica.server.query(sql, params, self.timeout).await {
                Ok(rows) => {
                    metrics::counter!(crate::internal_events::names::PG_READS_TOTAL, "target" => "replica")
                        .increment(1);
                    return Ok((rows, Source::Replica(replica.server.name.clone())));
                }
                Err(e) if e.is_transient() => {
                    // Until its next check passes.
                    replica.usable.store(false, Ordering::Release);
                    crate::internal_events::emit(crate::internal_events::storage::ReplicaReadFailed {
                        replica: &replica.server.name,
                        error: &e,
                    });
                }
                Err(e) => return Err(e),
            }
        } else if !self.replicas.is_empty() {
            metrics::counter!(crate::internal_events::names::PG_READ_FALLBACKS_TOTAL, "reason" => "no_usable_replica")
                .increment(1);
        }
        let rows = self.primary.query(sql, params, self.timeout).await?;
        metrics::counter!(crate::internal_events::names::PG_READS_TOTAL, "target" => "primary").increment(1);
        Ok((rows, Source::Primary))
    }

    /// The next usable replica, round-robin.
    fn pick(&self) -> Option<&Replica> {
        let n = self.replicas.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).map(|i| &self.replicas[(start + i) % n]).find(|r| r.usable.load(Ordering::Acquire))
    }

    /// Starts one check loop per replica, and the pool gauges.
    pub fn spawn_checks(self: Arc<Self>, cfg: &StorageConfig, life: &Lifecycle) {
        let interval = Duration::from_millis(cfg.replica_check_interval_ms);
        for i in 0..self.replicas.len() {
            let reads = self.clone();
            let task_life = life.clone();
            life.spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = task_life.stopped() => return,
                        _ = tick.tick() => reads.check(i).await,
                    }
                }
            });
        }
        let reads = self;
        let task_life = life.clone();
        life.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = task_life.stopped() => return,
                    _ = tick.tick() => {
                        reads.primary.record_pool("primary");
                        for r in &reads.replicas {
                            r.server.record_pool("replica");
                        }
                    }
                }
            }
        });
    }

    async fn check(&self, i: usize) {
        let Some(replica) = self.replicas.get(i) else { return };
        const LAG: &str = "SELECT CASE WHEN NOT pg_is_in_recovery() THEN 0::float8 \
             WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0::float8 \
             ELSE COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8, 1e9) END";
        let lag = match replica.server.query(LAG, &[], self.timeout).await {
            Ok(rows) => rows.first().and_then(|r| r.try_get::<_, f64>(0).ok()),
            Err(e) => {
                if replica.usable.load(Ordering::Acquire) {
                    tracing::warn!(replica = %replica.server.name, error = %fluxmesh_mesh::error_chain(&e), "replica check failed; reading from others");
                }
                None
            }
        };
        let lag_us = lag.map(|s| (s.max(0.0) * 1e6) as u64).unwrap_or(u64::MAX);
        let usable = lag_us <= self.max_lag_us;
        let was = replica.usable.swap(usable, Ordering::AcqRel);
        replica.lag_us.store(lag_us, Ordering::Relaxed);
        let name = replica.server.name.clone();
        if let Some(s) = lag {
            metrics::gauge!(crate::internal_events::names::PG_REPLICA_LAG_SECONDS, "server" => name.clone()).set(s);
        }
        metrics::gauge!(crate::internal_events::names::PG_REPLICA_USABLE, "server" => name.clone()).set(if usable {
            1.0
        } else {
            0.0
        });
        if was != usable {
            match lag {
                Some(s) if usable => tracing::info!(replica = %name, lag_s = s, "replica usable for reads"),
                Some(s) => tracing::warn!(replica = %name, lag_s = s, "replica lags too far; reading from others"),
                None => {}
            }
        }
    }

    /// Per replica: its name, usable now, last lag seen (None: no answer).
    pub fn replicas(&self) -> Vec<(String, bool, Option<Duration>)> {
        self.replicas
            .iter()
            .map(|r| {
                let lag = r.lag_us.load(Ordering::Relaxed);
                (
                    r.server.name.clone(),
                    r.usable.load(Ordering::Acquire),
                    (lag != u64::MAX).then(|| Duration::from_micros(lag)),
                )
            })
            .collect()
    }
}
