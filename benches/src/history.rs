//! The history writer in isolation, against a real PostgreSQL primary
//! (fsync on) started for the run:
//!
//! 1. **write**: `--submitters` tasks hand the node's writer batches of
//!    `--batch` telemetry rows (as shard workers do) until `--rows` are
//!    committed over `--connections` writer connections; meanwhile
//!    `--readers` tasks query, 20 times a second each, "the last hour of one
//!    device" (the history API's statement, newest first, 1000 rows) on a
//!    random device, and their latencies are recorded;
//! 2. **replay**: the same rows again, all duplicates (a failover replay);
//!    the table must still hold `--rows` rows;
//! 3. **peer**: plain `COPY … FROM STDIN BINARY` of the same rows into an
//!    unindexed, unpartitioned table, the floor any idempotent writer pays
//!    on top of; the ratio is printed.
//!
//!   fluxmesh-history-bench [--rows 1000000] [--devices 1000] [--batch 256]
//!                          [--submitters 16] [--readers 2] [--connections 2]

use anyhow::Context as _;
use clap::Parser;
use fluxmesh_node::lifecycle::Lifecycle;
use fluxmesh_node::storage::rows::{Rows, TelemetryRow};
use fluxmesh_node::storage::{Storage, StorageConfig};
use fluxmesh_schemas::frame::{now_us, FrameId};
use fluxmesh_testkit::Postgres;
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::types::{ToSql, Type};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 1_000_000)]
    rows: usize,
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    #[arg(long, default_value_t = 256)]
    batch: usize,
    #[arg(long, default_value_t = 16)]
    submitters: usize,
    #[arg(long, default_value_t = 2)]
    readers: usize,
    /// storage.writer_connections
    #[arg(long, default_value_t = 2)]
    connections: usize,
}

/// The history API's "newest first" telemetry statement, for one hour.
const LAST_HOUR: &str = "SELECT frame_id, received_at, channel, device_time, origin, json, raw FROM telemetry \
     WHERE device = $1 AND received_at >= $2 AND received_at < $3 \
     ORDER BY received_at DESC, frame_id DESC LIMIT $4";

fn rows(args: &Args) -> Vec<TelemetryRow> {
    let start = now_us();
    (0..args.rows)
        .map(|i| {
            let payload = format!(
                r#"{{"t":{:.2},"h":{},"seq":{i},"ok":true,"fw":"1.4.2"}}"#,
                20.0 + (i % 97) as f64 / 10.0,
                i % 100
            );
            TelemetryRow {
                device: format!("device-{:05}", i % args.devices),
                received_us: start + i as i64,
                id: uuid::Uuid::from_bytes(FrameId::new_v7().0),
                channel: "env/temp".to_owned(),
                device_time_us: Some(start + i as i64 - 1000),
                origin: "bench".to_owned(),
                payload: payload.into_bytes(),
                json: true,
            }
        })
        .collect()
}

/// Submits every row in batches from `submitters` tasks; the time until
/// all are committed.
async fn write_all(storage: &Arc<Storage>, all: &Arc<Vec<TelemetryRow>>, args: &Args) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let chunks: Vec<(usize, usize)> =
        (0..all.len()).step_by(args.batch).map(|s| (s, (s + args.batch).min(all.len()))).collect();
    let chunks = Arc::new(chunks);
    let mut tasks = Vec::new();
    for k in 0..args.submitters {
        let (storage, all, chunks, n) = (storage.clone(), all.clone(), chunks.clone(), args.submitters);
        tasks.push(tokio::spawn(async move {
            let mut commits = Vec::new();
            for &(from, to) in chunks.iter().skip(k).step_by(n) {
                let batch = Rows { telemetry: all[from..to].to_vec(), ..Default::default() };
                commits.push(storage.writer.submit(batch).await?);
                // Like a shard worker: at most a few batches in flight.
                if commits.len() >= 4 {
                    commits.remove(0).wait().await?;
                }
            }
            for c in commits {
                c.wait().await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.rows > 0 && args.devices > 0 && args.batch > 0 && args.submitters > 0,
        "all counts must be > 0"
    );
    let pg =
        Postgres::start_primary_with(&["fsync=on", "full_page_writes=on", "shared_buffers=256MB", "max_wal_size=4GB"])
            .await
            .context("starting PostgreSQL")?;
    let cfg = StorageConfig { primary: pg.url(), writer_connections: args.connections, ..Default::default() };
    let life = Lifecycle::new();
    let storage = Storage::start(&cfg, "bench", &life, &life).await?.context("storage is on")?;
    let all = Arc::new(rows(&args));
    println!(
        "history writer: {} rows, {} devices, batches of {}, {} submitters, {} writer connections, {} readers at 20/s; PostgreSQL with fsync on",
        args.rows, args.devices, args.batch, args.submitters, args.connections, args.readers
    );

    // 1. write, with readers.
    let writing = Arc::new(AtomicBool::new(true));
    let mut readers = Vec::new();
    for r in 0..args.readers {
        let (storage, writing, devices) = (storage.clone(), writing.clone(), args.devices);
        readers.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut i = r * 7919;
            // 20 queries a second each: a dashboard's load, not a second
            // write-sized load competing for the two cores.
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while writing.load(Ordering::Relaxed) {
                tick.tick().await;
                i += 104_729;
                let device = format!("device-{:05}", i % devices);
                let now = std::time::SystemTime::now() + Duration::from_secs(60);
                let hour_ago = now - Duration::from_secs(3600);
                let limit = 1000i64;
                let params: [&(dyn ToSql + Sync); 4] = [&device, &hour_ago, &now, &limit];
                let t = Instant::now();
                storage.reads.query(LAST_HOUR, &params).await?;
                h.record(t.elapsed().as_micros() as u64)?;
            }
            anyhow::Ok(h)
        }));
    }
    let took = write_all(&storage, &all, &args).await?;
    writing.store(false, Ordering::Relaxed);
    let mut reads = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for r in readers {
        reads.add(r.await??)?;
    }
    let write_rate = args.rows as f64 / took.as_secs_f64();
    println!("write:  {:>9.0} rows/s ({} rows in {:.2} s)", write_rate, args.rows, took.as_secs_f64());
    println!(
        "reads under write load (last hour of one device, ≤1000 rows): {} queries, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        reads.len(),
        reads.value_at_quantile(0.5) as f64 / 1000.0,
        reads.value_at_quantile(0.99) as f64 / 1000.0,
        reads.max() as f64 / 1000.0
    );

    // 2. replay: every row again.
    let took = write_all(&storage, &all, &args).await?;
    let client = pg.client().await?;
    let stored: i64 = client.query_one("SELECT count(*) FROM telemetry", &[]).await?.get(0);
    println!(
        "replay: {:>9.0} rows/s (all duplicates); rows stored: {stored} (expected {})",
        args.rows as f64 / took.as_secs_f64(),
        args.rows
    );
    anyhow::ensure!(stored == args.rows as i64, "replay changed the row count: {stored} != {}", args.rows);

    // 3. peer: plain COPY BINARY, no keys, no partitions.
    client
        .batch_execute(
            "CREATE TABLE copy_peer (device text, received_at timestamptz, frame_id uuid, channel text, \
             device_time timestamptz, origin text, json jsonb, raw bytea)",
        )
        .await?;
    let started = Instant::now();
    let sink = client.copy_in("COPY copy_peer FROM STDIN BINARY").await?;
    let types = [
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::UUID,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::JSONB,
        Type::BYTEA,
    ];
    let writer = tokio_postgres::binary_copy::BinaryCopyInWriter::new(sink, &types);
    tokio::pin!(writer);
    for r in all.iter() {
        let received = fluxmesh_node::storage::rows::system_time(r.received_us);
        let device_time = r.device_time_us.map(fluxmesh_node::storage::rows::system_time);
        let json: serde_json::Value = serde_json::from_slice(&r.payload)?;
        let raw: Option<Vec<u8>> = None;
        writer.as_mut().write(&[&r.device, &received, &r.id, &r.channel, &device_time, &r.origin, &json, &raw]).await?;
    }
    writer.finish().await?;
    let copy_rate = args.rows as f64 / started.elapsed().as_secs_f64();
    println!("peer:   {:>9.0} rows/s plain COPY BINARY (no key, no partitions, not idempotent)", copy_rate);
    println!("ratio writer / plain COPY: {:.2}", write_rate / copy_rate);

    life.stop();
    life.close_and_wait(Duration::from_secs(30)).await;
    Ok(())
}
