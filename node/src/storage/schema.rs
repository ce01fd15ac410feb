//! The schema: embedded migrations (`node/migrations/V{n}__{name}.sql`,
//! applied by refinery, recorded in `fluxmesh_schema_history`) and the daily
//! partitions of the history tables.
//!
//! Migrations run at node start under a session advisory lock, so when
//! several nodes start at once one applies them and the others wait, then
//! find nothing left to do. Partitions are created (and dropped) under a
//! transaction advisory lock, so concurrent nodes never race on the catalog.

use super::read::Server;
use super::{StorageConfig, StorageError};
use crate::internal_events::emit;
use crate::internal_events::storage::{MaintenanceFailed, PartitionDropped};
use crate::lifecycle::Lifecycle;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_postgres::NoTls;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The table refinery records applied migrations in.
pub const HISTORY_TABLE: &str = "fluxmesh_schema_history";
/// Advisory lock keys ("fluxmesh" in ASCII, and the next one).
const MIGRATION_LOCK: i64 = 0x666c_7578_6d65_7368;
const PARTITION_LOCK: i64 = MIGRATION_LOCK + 1;
const DAY_US: i64 = 86_400_000_000;

/// Applies the migrations not yet applied, once per cluster.
pub async fn migrate(config: &tokio_postgres::Config, server: &str, timeout: Duration) -> Result<(), StorageError> {
    let err = |source| StorageError::Postgres { server: server.to_owned(), source };
    let (mut client, connection) = tokio::time::timeout(timeout, config.connect(NoTls))
        .await
        .map_err(|_| StorageError::Timeout { server: server.to_owned(), timeout })?
        .map_err(err)?;
    // The connection is driven beside the work below, not spawned: it ends
    // once the work drops the client.
    let connection = async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %fluxmesh_mesh::error_chain(&e), "migration connection ended");
        }
    };
    let work = async move {
        let result = async {
            client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.map_err(err)?;
            let mut runner = embedded::migrations::runner();
            runner.set_migration_table_name(HISTORY_TABLE);
            let report = runner.run_async(&mut client).await.map_err(StorageError::Migrate)?;
            for m in report.applied_migrations() {
                tracing::info!(%server, migration = %m, "migration applied");
            }
            Ok(())
        }
        .await;
        // The lock goes with the session anyway; unlocking is a courtesy.
        let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
        result
    };
    let (result, ()) = tokio::join!(work, connection);
    result
}

/// The partitioned history tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    Telemetry,
    Events,
    Aggregates,
}

impl Table {
    pub const ALL: [Table; 3] = [Table::Telemetry, Table::Events, Table::Aggregates];

    pub fn name(self) -> &'static str {
        match self {
            Table::Telemetry => "telemetry",
            Table::Events => "events",
            Table::Aggregates => "aggregates",
        }
    }
}

/// The UTC day (days since the Unix epoch) of a µs timestamp.
pub fn day_of(us: i64) -> i64 {
    us.div_euclid(DAY_US)
}

fn date_of(day: i64) -> Option<time::Date> {
    let julian = i32::try_from(day + i64::from(time::OffsetDateTime::UNIX_EPOCH.date().to_julian_day())).ok()?;
    time::Date::from_julian_day(julian).ok()
}

/// `{table}_p{YYYYMMDD}`.
pub fn partition_name(table: Table, day: i64) -> Option<String> {
    let d = date_of(day)?;
    Some(format!("{}_p{:04}{:02}{:02}", table.name(), d.year(), u8::from(d.month()), d.day()))
}

/// The day of a partition name of `table`, if it is one of ours.
pub fn partition_day(table: Table, name: &str) -> Option<i64> {
    let digits = name.strip_prefix(table.name())?.strip_prefix("_p")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let year: i32 = digits[..4].parse().ok()?;
    let month: u8 = digits[4..6].parse().ok()?;
    let day: u8 = digits[6..].parse().ok()?;
    let date = time::Date::from_calendar_date(year, time::Month::try_from(month).ok()?, day).ok()?;
    Some(i64::from(date.to_julian_day() - time::OffsetDateTime::UNIX_EPOCH.date().to_julian_day()))
}

/// Creates partitions ahead, drops them past retention, and remembers which
/// exist so the writer asks Postgres only for days it has not seen.
#[derive(Debug, Clone)]
pub struct Maintenance {
    ahead: i64,
    retention_days: [u32; 3],
    known: Arc<Mutex<HashSet<(Table, i64)>>>,
}

impl Maintenance {
    pub fn new(cfg: &StorageConfig) -> Maintenance {
        Maintenance {
            ahead: i64::from(cfg.partitions_ahead_days),
            retention_days: [cfg.retention_days, cfg.retention_days, cfg.aggregate_retention_days],
            known: Arc::default(),
        }
    }

    fn retention(&self, table: Table) -> u32 {
        match table {
            Table::Telemetry => self.retention_days[0],
            Table::Events => self.retention_days[1],
            Table::Aggregates => self.retention_days[2],
        }
    }

    /// The first day `table` keeps, as of now; `None` keeps everything.
    pub fn first_kept_day(&self, table: Table) -> Option<i64> {
        let days = self.retention(table);
        (days > 0).then(|| day_of(fluxmesh_schemas::frame::now_us()) - i64::from(days) + 1)
    }

    /// Forget what is known (after an insert found a partition missing).
    pub fn forget(&self) {
        if let Ok(mut known) = self.known.lock() {
            known.clear();
        }
    }

    /// Makes sure the partition of `day` exists.
    pub async fn ensure(
        &self,
        client: &mut deadpool_postgres::Object,
        server: &str,
        table: Table,
        day: i64,
    ) -> Result<(), StorageError> {
        if self.known.lock().is_ok_and(|k| k.contains(&(table, day))) {
            return Ok(());
        }
        let err = |source| StorageError::Postgres { server: server.to_owned(), source };
        let (Some(name), Some(from), Some(to)) = (partition_name(table, day), date_of(day), date_of(day + 1)) else {
            return Err(StorageError::PartitionDay { day });
        };
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} FOR VALUES FROM ('{from} 00:00:00+00') TO ('{to} 00:00:00+00')",
            table = table.name()
        );
        let tx = client.transaction().await.map_err(err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK]).await.map_err(err)?;
        tx.batch_execute(&sql).await.map_err(err)?;
        tx.commit().await.map_err(err)?;
        tracing::debug!(partition = %name, "partition ready");
        if let Ok(mut known) = self.known.lock() {
            known.insert((table, day));
        }
        Ok(())
    }

    /// Creates today's partitions (and yesterday's, and `ahead` more) and
    /// drops those wholly before retention.
    pub async fn maintain(&self, client: &mut deadpool_postgres::Object, server: &str) -> Result<(), StorageError> {
        let today = day_of(fluxmesh_schemas::frame::now_us());
        let err = |source| StorageError::Postgres { server: server.to_owned(), source };
        for table in Table::ALL {
            for day in today - 1..=today + self.ahead {
                self.ensure(client, server, table, day).await?;
            }
            let Some(first_kept) = self.first_kept_day(table) else { continue };
            let children = client
                .query(
                    "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                     JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = $1",
                    &[&table.name()],
                )
                .await
                .map_err(err)?;
            for row in children {
                let name: String = row.try_get(0).map_err(err)?;
                let Some(day) = partition_day(table, &name) else { continue };
                if day >= first_kept {
                    continue;
                }
                let tx = client.transaction().await.map_err(err)?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK]).await.map_err(err)?;
                tx.batch_execute(&format!("DROP TABLE IF EXISTS {name}")).await.map_err(err)?;
                tx.commit().await.map_err(err)?;
                if let Ok(mut known) = self.known.lock() {
                    known.remove(&(table, day));
                }
                emit(PartitionDropped { table: table.name(), partition: &name });
            }
        }
        Ok(())
    }
}

/// Runs partition maintenance every `every` until `stop`.
pub async fn maintain(maintenance: Maintenance, primary: Server, every: Duration, life: Lifecycle) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // start-up already ran it
    loop {
        tokio::select! {
            _ = life.stopped() => return,
            _ = tick.tick() => {}
        }
        let result = async {
            let mut client = primary.client(Duration::from_secs(10)).await?;
            maintenance.maintain(&mut client, &primary.name).await
        }
        .await;
        if let Err(e) = result {
            emit(MaintenanceFailed { error: &e, next_in: every });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_round_trip() {
        for day in [-1, 0, 1, 20_414, 40_000] {
            let name = partition_name(Table::Telemetry, day).expect("in range");
            assert_eq!(partition_day(Table::Telemetry, &name), Some(day), "{name}");
        }
        assert_eq!(partition_name(Table::Events, 0).as_deref(), Some("events_p19700101"));
        assert_eq!(partition_day(Table::Events, "telemetry_p19700101"), None);
        assert_eq!(partition_day(Table::Telemetry, "telemetry_p1970010"), None);
        assert_eq!(partition_day(Table::Telemetry, "telemetry_p19701301"), None);
        assert_eq!(day_of(-1), -1);
        assert_eq!(day_of(DAY_US), 1);
    }
}
