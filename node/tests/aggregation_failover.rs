//! Guarantee 3 (ARCHITECTURE.md): aggregates after a node kill equal those of a run
//! with no fault.
//!
//! The same telemetry (fixed device times, some out of order, some too
//! late) goes twice through two nodes on a fresh NATS server each time. In
//! the second run one node is killed halfway (its runtime dropped: no
//! checkpoint, no ack, no lease release); the survivor takes its shards
//! over and replays from their last checkpoint. Both runs must emit exactly
//! the same aggregate frames (same ids, same figures), each once.

mod common;

use common::{get_json, wait_settled, NodeProc};
use fluxmesh_schemas::{Body, Frame, Kind};
use fluxmesh_testkit::{wait_for, NatsServer};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

const DEVICES: usize = 8;
const PER_DEVICE: usize = 240;
const MS: i64 = 1000;

/// The i-th reading of device d: (device time µs, value). Every 10th is
/// 150 ms behind (inside the lateness), every 37th is 3 s behind (late).
fn reading(d: usize, i: usize) -> (i64, f64) {
    let base = 1_700_000_000_000 * MS;
    let mut t = base + (i as i64) * 50 * MS + (d as i64) * 7 * MS;
    if i % 10 == 9 {
        t -= 150 * MS;
    }
    if i % 37 == 36 {
        t -= 3000 * MS;
    }
    (t, ((i * 7 + d * 3) % 23) as f64 - 5.5)
}

async fn post(client: &reqwest::Client, node: SocketAddr, device: &str, t: i64, v: f64) {
    let url = format!("http://{node}/api/v1/devices/{device}/telemetry?channel=env&device_time_us={t}");
    // A 202 means stored; anything else is retried (same Idempotency-Key).
    let key = format!("{device}-{t}-{v}");
    wait_for(Duration::from_secs(30), "telemetry stored", || {
        let request = client.post(&url).header("Idempotency-Key", &key).json(&json!({"x": v, "y": v * 2.0})).send();
        async move { request.await.ok().filter(|r| r.status().as_u16() == 202).map(|_| ()) }
    })
    .await
    .expect("stored");
}

/// Aggregate frames by id: (device, channel, field, start, end, count, and
/// the bits of sum, min, max, mean, variance).
type Rows = BTreeMap<String, (String, String, String, i64, i64, u64, [u64; 5])>;

async fn run(kill: bool) -> (Rows, usize) {
    let nats = NatsServer::start().await.expect("nats-server");
    let tweak = |c: &mut fluxmesh_node::Config| {
        c.aggregation.windows_ms = vec![1000];
        c.aggregation.allowed_lateness_ms = 200;
    };
    let a = NodeProc::start(&[nats.url()], tweak).await;
    let b = NodeProc::start(&[nats.url()], tweak).await;
    wait_settled(&[a.http, b.http], 2, "two nodes own all shards").await;

    let client = common::http();
    let devices: Vec<String> = (0..DEVICES).map(|d| format!("agg-dev-{d}")).collect();
    let feed = |from: usize, to: usize| {
        let (client, devices, node) = (&client, &devices, a.http);
        futures::future::join_all(devices.iter().enumerate().map(move |(d, device)| async move {
            for i in from..to {
                let (t, v) = reading(d, i);
                post(client, node, device, t, v).await;
            }
        }))
    };
    feed(0, PER_DEVICE / 2).await;
    let b = if kill {
        b.kill();
        None
    } else {
        Some(b)
    };
    feed(PER_DEVICE / 2, PER_DEVICE).await;
    // One last reading far ahead closes every window.
    futures::future::join_all(devices.iter().map(|device| post(&client, a.http, device, 1_800_000_000_000 * MS, 0.0)))
        .await;

    // Every message applied (or counted late) on every device: the
    // checkpointed state has them all, so their aggregates were stored.
    for device in &devices {
        let url = format!("http://{}/api/v1/devices/{device}", a.http);
        wait_for(Duration::from_secs(60), &format!("{device} fully processed"), || {
            let url = url.clone();
            async move { get_json(url).await.filter(|v| v["state"]["count"] == PER_DEVICE as u64 + 1).map(|_| ()) }
        })
        .await
        .expect("processed");
    }

    let nc = nats.client().await.expect("client");
    let frames: Vec<Frame> =
        common::read_stream(&nc, "FM_EVT").await.into_iter().filter(|f| f.kind() == Kind::Aggregate).collect();
    let total = frames.len();
    let rows = frames
        .into_iter()
        .map(|f| {
            let Body::Aggregate(a) = &f.body else { unreachable!("filtered to aggregates") };
            let bits = [a.sum, a.min, a.max, a.mean, a.variance].map(f64::to_bits);
            (
                f.id.to_string(),
                (
                    f.device.clone(),
                    f.channel.clone(),
                    a.field.clone(),
                    a.window_start_us,
                    a.window_end_us,
                    a.count,
                    bits,
                ),
            )
        })
        .collect();
    if let Some(b) = b {
        b.shutdown().await;
    }
    a.shutdown().await;
    (rows, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_after_a_kill_equal_those_without_one() {
    common::init_logging();
    let (clean, clean_total) = run(false).await;
    let (faulted, faulted_total) = run(true).await;
    // 240 readings 50 ms apart: 12 one-second windows per device, 2 fields.
    assert!(clean.len() >= DEVICES * 2 * 12, "aggregates in the clean run: {}", clean.len());
    assert_eq!(clean_total, clean.len(), "the clean run stored an aggregate twice");
    assert_eq!(faulted_total, faulted.len(), "the run with a kill stored an aggregate twice");
    let missing: BTreeSet<_> = clean.keys().filter(|k| !faulted.contains_key(*k)).collect();
    let extra: BTreeSet<_> = faulted.keys().filter(|k| !clean.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing after the kill: {missing:?}; extra: {extra:?}");
    for (id, row) in &clean {
        assert_eq!(Some(row), faulted.get(id), "aggregate {id} differs after the kill");
    }
}
