//! Postgres history against a real primary and a real hot
//! standby (`pg_basebackup -R`), started by the testkit: rows are written on
//! the primary and read from the standby; with the standby's replay paused
//! reads fall back to the primary; a primary crash during load loses and
//! duplicates nothing, and so does its loss with the standby promoted; migrations run once however many nodes start; the
//! writer groups requests that arrive within its linger into one commit.

mod common;

use fluxmesh_mesh::metric_names as mesh_names;
use fluxmesh_node::internal_events::names;

use common::{counter, metrics, start_node, Device};
use fluxmesh_node::storage::read::Server;
use fluxmesh_node::storage::schema::{self, Maintenance, Table};
use fluxmesh_node::storage::StorageConfig;
use fluxmesh_node::Node;
use fluxmesh_testkit::{wait_for, NatsServer, Postgres};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

fn storage_on(primary: &Postgres, replicas: &[&Postgres]) -> impl FnOnce(&mut fluxmesh_node::Config) {
    let primary = primary.url();
    let replicas: Vec<String> = replicas.iter().map(|r| r.url()).collect();
    move |c| {
        c.storage.primary = primary;
        c.storage.replicas = replicas;
        c.storage.replica_check_interval_ms = 100;
        c.storage.max_replica_lag_ms = 1000;
        c.shards.checkpoint_interval_ms = 50;
    }
}

async fn post(node: &Node, device: &str, query: &str, content_type: &str, body: Vec<u8>) {
    let url = format!("http://{}/api/v1/devices/{device}/telemetry?{query}", node.http_addr());
    let response =
        common::http().post(url).header("content-type", content_type).body(body).send().await.expect("POST telemetry");
    assert_eq!(response.status().as_u16(), 202, "{}", response.text().await.unwrap_or_default());
}

/// GET a history route: (status, read source header, body).
async fn history(node: &Node, path_and_query: &str) -> (u16, String, Value) {
    let response =
        common::http().get(format!("http://{}{path_and_query}", node.http_addr())).send().await.expect("GET history");
    let status = response.status().as_u16();
    let source =
        response.headers().get("fluxmesh-read-source").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    (status, source, response.json().await.unwrap_or(Value::Null))
}

async fn count(pg: &Postgres, sql: &str) -> i64 {
    let client = pg.client().await.expect("connect");
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_written_to_the_primary_and_read_from_the_standby() {
    let nats = NatsServer::start().await.expect("nats-server");
    let primary = Postgres::start_primary().await.expect("primary");
    let standby = Postgres::start_standby(&primary).await.expect("standby");
    let node = start_node(&[nats.url()], |c| {
        storage_on(&primary, &[&standby])(c);
        c.aggregation.windows_ms = vec![1000];
        c.aggregation.allowed_lateness_ms = 0;
    })
    .await;

    // 120 JSON readings 100 ms apart in device time (12 one-second windows),
    // one binary payload, one JSON payload jsonb refuses (\u0000).
    let base_us = 1_763_800_000_000_000i64;
    for i in 0..120i64 {
        let query = format!("channel=env&device_time_us={}", base_us + i * 100_000);
        post(&node, "d1", &query, "application/json", json!({"t": i, "h": 2 * i}).to_string().into_bytes()).await;
    }
    post(&node, "d1", "channel=raw", "application/octet-stream", vec![0, 159, 146, 150, 255]).await;
    post(&node, "d1", "channel=nul", "application/json", br#"{"s":"a\u0000b"}"#.to_vec()).await;
    // Valid JSON to serde, refused by jsonb (a lone surrogate), sent among
    // others so that it shares a batch: only it goes to `raw`.
    for i in 0..5 {
        let body = if i == 2 { br#"{"s":"\ud800"}"#.to_vec() } else { json!({"n": i}).to_string().into_bytes() };
        post(&node, "d1", "channel=mixed", "application/json", body).await;
    }
    let expected = 127;

    let (source, page) = wait_for(Duration::from_secs(30), "every row readable from the standby", || async {
        let (status, source, body) = history(&node, "/api/v1/devices/d1/telemetry?order=asc&limit=1000").await;
        let n = body["items"].as_array().map_or(0, Vec::len);
        (status == 200 && n == expected && source.starts_with("replica:")).then_some((source, body))
    })
    .await
    .expect("history from the standby");
    assert_eq!(source, format!("replica:127.0.0.1:{}/postgres", standby.port));
    assert_eq!(count(&primary, "SELECT count(*) FROM telemetry WHERE device = 'd1'").await, expected as i64);
    assert_eq!(count(&standby, "SELECT count(*) FROM telemetry WHERE device = 'd1'").await, expected as i64);

    let items = page["items"].as_array().expect("items");
    assert_eq!(items[0]["payload"], json!({"t": 0, "h": 0}));
    assert_eq!(items[0]["channel"], "env");
    assert_eq!(items[0]["device_time_us"], base_us);
    assert!(items[0]["received_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{}", items[0]);
    let raw = items.iter().find(|i| i["channel"] == "raw").expect("binary payload row");
    assert_eq!(raw["payload_base64"], "AJ+Slv8=");
    let nul = items.iter().find(|i| i["channel"] == "nul").expect("\\u0000 payload row");
    assert_eq!(nul["payload_base64"], "eyJzIjoiYVx1MDAwMGIifQ==", "kept byte for byte as raw");
    let mixed: Vec<&Value> = items.iter().filter(|i| i["channel"] == "mixed").collect();
    assert_eq!(mixed.iter().filter(|i| i.get("payload_base64").is_some()).count(), 1, "{mixed:?}");
    assert_eq!(mixed.iter().filter(|i| i["payload"].get("n").is_some()).count(), 4, "{mixed:?}");

    // Pages of 50, newest first, cover every row once.
    let mut ids = BTreeSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("/api/v1/devices/d1/telemetry?limit=50&cursor={c}"),
            None => "/api/v1/devices/d1/telemetry?limit=50".to_owned(),
        };
        let (status, _, body) = history(&node, &q).await;
        assert_eq!(status, 200, "{body}");
        let items = body["items"].as_array().expect("items");
        let times: Vec<i64> = items.iter().filter_map(|i| i["received_us"].as_i64()).collect();
        assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first: {times:?}");
        for i in items {
            assert!(ids.insert(i["id"].as_str().expect("id").to_owned()), "{} twice", i["id"]);
        }
        pages += 1;
        match body["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!((ids.len(), pages), (expected, 3));
    let (_, _, env) =
        history(&node, "/api/v1/devices/d1/telemetry?channel=env&from=0&to=2100-01-01T00:00:00Z&limit=1000").await;
    assert_eq!(env["items"].as_array().map(Vec::len), Some(120), "{env}");
    let (_, _, none) = history(&node, "/api/v1/devices/d1/telemetry?to=1000").await;
    assert_eq!(none["items"].as_array().map(Vec::len), Some(0), "{none}");

    // Closed windows and state frames are stored and readable too.
    let aggregates = wait_for(Duration::from_secs(30), "aggregates stored", || async {
        let (_, _, body) = history(&node, "/api/v1/devices/d1/aggregates?field=t&order=asc").await;
        let n = body["items"].as_array().map_or(0, Vec::len);
        (n >= 11).then_some(body)
    })
    .await
    .expect("aggregates");
    let first = &aggregates["items"][0];
    assert_eq!(
        (first["count"].as_i64(), first["min"].as_f64(), first["max"].as_f64()),
        (Some(10), Some(0.0), Some(9.0))
    );
    assert_eq!(first["mean"].as_f64(), Some(4.5));
    let (_, _, events) = history(&node, "/api/v1/devices/d1/events?kind=state").await;
    assert!(events["items"].as_array().is_some_and(|e| !e.is_empty()), "{events}");

    // Bad parameters: a 400 that names the parameter.
    for (query, param) in [
        ("telemetry?from=yesterday", "from"),
        ("telemetry?to=99999999999999999", "to"),
        ("telemetry?limit=0", "limit"),
        ("telemetry?limit=ten", "limit"),
        ("telemetry?order=sideways", "order"),
        ("telemetry?cursor=not-a-cursor", "cursor"),
        ("telemetry?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z", "to"),
        ("telemetry?bogus=1", "query"),
        ("events?kind=bogus", "kind"),
        ("aggregates?kind=alert", "kind"),
    ] {
        let (status, _, body) = history(&node, &format!("/api/v1/devices/d1/{query}")).await;
        assert_eq!((status, body["param"].as_str()), (400, Some(param)), "{query}: {body}");
    }
    let m = metrics(&node).await;
    assert!(counter(&m, names::HISTORY_BAD_REQUESTS_TOTAL) >= 10.0);
    assert!(counter(&m, names::PG_ROWS_RAW_FALLBACK_TOTAL) >= 1.0, "{m}");
    assert!(
        counter(&m, &common::series(names::PG_ROWS_WRITTEN_TOTAL, &[("table", "telemetry")])) >= expected as f64,
        "{m}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fall_back_to_the_primary_while_replay_is_paused() {
    let nats = NatsServer::start().await.expect("nats-server");
    let primary = Postgres::start_primary().await.expect("primary");
    let standby = Postgres::start_standby(&primary).await.expect("standby");
    let node = start_node(&[nats.url()], |c| {
        storage_on(&primary, &[&standby])(c);
        c.storage.max_replica_lag_ms = 300;
    })
    .await;
    let read = |n: usize| {
        let node = &node;
        async move {
            let (status, source, body) = history(node, "/api/v1/devices/d2/telemetry?limit=100").await;
            let got = body["items"].as_array().map_or(0, Vec::len);
            (status == 200 && got == n).then_some(source)
        }
    };
    for i in 0..10 {
        post(&node, "d2", "", "application/json", json!({"i": i}).to_string().into_bytes()).await;
    }
    wait_for(Duration::from_secs(30), "10 rows from the standby", || async {
        read(10).await.filter(|s| s.starts_with("replica:"))
    })
    .await
    .expect("replica serves");

    let standby_client = standby.client().await.expect("standby client");
    standby_client.execute("SELECT pg_wal_replay_pause()", &[]).await.expect("pause replay");
    for i in 10..20 {
        post(&node, "d2", "", "application/json", json!({"i": i}).to_string().into_bytes()).await;
    }
    // All 20 can only come from the primary: the standby stopped at 10.
    let source = wait_for(Duration::from_secs(30), "20 rows", || read(20)).await.expect("20 rows readable");
    assert_eq!(source, "primary");
    assert_eq!(count(&standby, "SELECT count(*) FROM telemetry WHERE device = 'd2'").await, 10);
    let m = metrics(&node).await;
    assert!(counter(&m, names::PG_READ_FALLBACKS_TOTAL) >= 1.0, "{m}");
    let usable =
        common::series(names::PG_REPLICA_USABLE, &[("server", &format!("127.0.0.1:{}/postgres", standby.port))]);
    assert!(m.lines().any(|l| l.starts_with(&usable) && l.ends_with(" 0")), "{usable} 0 in {m}");

    standby_client.execute("SELECT pg_wal_replay_resume()", &[]).await.expect("resume replay");
    wait_for(Duration::from_secs(30), "reads back on the standby", || async {
        read(20).await.filter(|s| s.starts_with("replica:"))
    })
    .await
    .expect("replica serves again");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_crash_during_load_loses_and_duplicates_nothing() {
    let nats = NatsServer::start().await.expect("nats-server");
    let mut primary = Postgres::start_primary().await.expect("primary");
    let node = start_node(&[nats.url()], |c| {
        storage_on(&primary, &[])(c);
        // Short enough that workers also give up and restart from their
        // checkpoints while Postgres is down.
        c.storage.commit_timeout_ms = 1000;
        c.storage.connect_timeout_ms = 500;
        c.storage.query_timeout_ms = 1000;
    })
    .await;
    let devices: Vec<Device> = connect_devices(&node).await;
    let publish = |from: u64, to: u64| publish_seqs(&devices, from, to);
    let per_device = 300u64;
    publish(0, 100).await;
    wait_rows(&primary, 1, Duration::from_secs(30), "rows stored before the crash").await;
    primary.crash();
    publish(100, 200).await;
    for d in &devices {
        d.wait_acked(200).await;
    }
    // Down long enough for workers to give up waiting for their commits
    // and restart from their checkpoints.
    wait_for(Duration::from_secs(30), "a worker giving up on its commit", || async {
        let m = metrics(&node).await;
        (counter(&m, &common::series(mesh_names::SHARD_WORKER_FAILURES_TOTAL, &[("reason", "storage")])) >= 1.0)
            .then_some(())
    })
    .await
    .expect("workers waited for Postgres");
    primary.restart().await.expect("primary back");
    publish(200, per_device).await;
    for d in &devices {
        d.wait_acked(per_device as usize).await;
    }

    let total = per_device as i64 * devices.len() as i64;
    assert_each_message_once(&primary, total).await;
    let client = primary.client().await.expect("client");
    let duplicated_events: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT device, kind, seq FROM events GROUP BY 1, 2, 3 HAVING count(*) > 1) d",
            &[],
        )
        .await
        .expect("events")
        .get(0);
    assert_eq!(duplicated_events, 0, "derived rows once each");
    let m = metrics(&node).await;
    assert!(counter(&m, names::PG_WRITE_ERRORS_TOTAL) >= 1.0, "the crash reached the writer: {m}");
    node.shutdown().await;
}

/// The primary dies under load and its synchronous standby is promoted:
/// the node, given both hosts with `target_session_attrs=read-write`,
/// follows the new primary by itself; every acknowledged message has its
/// row there, once; history reads keep answering throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_takes_over_with_every_row() {
    let nats = NatsServer::start().await.expect("nats-server");
    // Synchronous replication: a commit is on the standby before the
    // writer hears of it, so promotion loses none.
    // (Set with ALTER SYSTEM, as an operator would, so that the standby's
    // copy can be changed after promotion.)
    let mut primary = Postgres::start_primary().await.expect("primary");
    let admin = primary.client().await.expect("client");
    admin.batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'").await.expect("sync on");
    admin.batch_execute("SELECT pg_reload_conf()").await.expect("reload");
    let standby = Postgres::start_standby(&primary).await.expect("standby");
    wait_for(Duration::from_secs(30), "the standby replicating synchronously", || async {
        let row = admin.query_opt("SELECT sync_state FROM pg_stat_replication", &[]).await.ok()??;
        (row.get::<_, String>(0) == "sync").then_some(())
    })
    .await
    .expect("synchronous standby");
    let both = format!("postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres", primary.port, standby.port);
    let node = start_node(&[nats.url()], |c| {
        storage_on(&primary, &[&standby])(c);
        c.storage.primary = both;
        c.storage.connect_timeout_ms = 500;
        c.storage.query_timeout_ms = 1000;
    })
    .await;
    let devices: Vec<Device> = connect_devices(&node).await;
    let publish = |from: u64, to: u64| publish_seqs(&devices, from, to);
    let per_device = 300u64;
    publish(0, 100).await;
    wait_rows(&primary, 1, Duration::from_secs(30), "rows stored before the crash").await;
    primary.crash();
    publish(100, 200).await;
    let (status, _, _) = history(&node, "/api/v1/devices/crash-0/telemetry?limit=5").await;
    assert_eq!(status, 200, "reads go on from the standby while the primary is down");
    standby.promote().await.expect("promote the standby");
    // The new primary has no standby yet: it must not wait for one (the
    // failover procedure, as chaos/kill-pg-primary does it), or every
    // commit would wait until a new standby is attached.
    let admin = standby.client().await.expect("client");
    admin.batch_execute("ALTER SYSTEM SET synchronous_standby_names = ''").await.expect("sync off");
    admin.batch_execute("SELECT pg_reload_conf()").await.expect("reload");
    publish(200, per_device).await;
    for d in &devices {
        d.wait_acked(per_device as usize).await;
    }

    let total = per_device as i64 * devices.len() as i64;
    assert_each_message_once(&standby, total).await;
    let (status, _, body) = history(&node, "/api/v1/devices/crash-0/telemetry?limit=1000").await;
    assert_eq!(status, 200, "reads after the promotion: {body}");
    assert_eq!(body["items"].as_array().map(Vec::len), Some(per_device as usize), "{body}");
    node.shutdown().await;
}

/// Publishes `{"d", "seq"}` for every seq in `from..to` from each device
/// `crash-{d}`.
async fn publish_seqs(devices: &[Device], from: u64, to: u64) {
    for seq in from..to {
        for (d, device) in devices.iter().enumerate() {
            let payload = json!({"d": d, "seq": seq}).to_string().into_bytes();
            device.publish(&format!("devices/crash-{d}/env"), payload).await;
        }
    }
}

/// Waits up to `within` until `pg` holds at least `n` telemetry rows;
/// returns how many.
async fn wait_rows(pg: &Postgres, n: i64, within: Duration, what: &str) -> i64 {
    wait_for(within, what, || async {
        let client = pg.client().await.ok()?;
        let rows: i64 = client.query_one("SELECT count(*) FROM telemetry", &[]).await.ok()?.get(0);
        (rows >= n).then_some(rows)
    })
    .await
    .expect(what)
}

/// `pg` holds one row for each of the `total` messages [`publish_seqs`]
/// sent, and no more.
async fn assert_each_message_once(pg: &Postgres, total: i64) {
    let stored = wait_rows(pg, total, Duration::from_secs(60), "every acked message stored").await;
    assert_eq!(stored, total, "no more rows than messages");
    let client = pg.client().await.expect("client");
    let per_message: i64 = client
        .query_one("SELECT count(DISTINCT (json->>'d', json->>'seq')) FROM telemetry", &[])
        .await
        .expect("distinct")
        .get(0);
    assert_eq!(per_message, total, "each acked message exactly once");
}

async fn connect_devices(node: &Node) -> Vec<Device> {
    let mut devices = Vec::new();
    for d in 0..4 {
        devices.push(Device::connect(node.mqtt_addr(), &format!("crash-{d}")).await);
    }
    devices
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_once_and_partitions_follow_retention() {
    let primary = Postgres::start_primary().await.expect("primary");
    let config: tokio_postgres::Config = primary.url().parse().expect("url");
    let runs = (0..4).map(|_| schema::migrate(&config, "primary", Duration::from_secs(10)));
    for result in futures::future::join_all(runs).await {
        result.expect("migrates");
    }
    assert_eq!(count(&primary, "SELECT count(*) FROM fluxmesh_schema_history").await, 1);

    let cfg =
        StorageConfig { primary: primary.url(), retention_days: 2, partitions_ahead_days: 3, ..Default::default() };
    let server = Server::primary(&cfg, "test").expect("pool");
    let client = primary.client().await.expect("client");
    client
        .batch_execute(
            "CREATE TABLE telemetry_p20200101 PARTITION OF telemetry \
             FOR VALUES FROM ('2020-01-01 00:00:00+00') TO ('2020-01-02 00:00:00+00')",
        )
        .await
        .expect("an old partition");
    let maintenance = Maintenance::new(&cfg);
    let mut pooled = server.client(Duration::from_secs(5)).await.expect("pooled");
    maintenance.maintain(&mut pooled, &server.name).await.expect("maintenance");
    let today = schema::day_of(fluxmesh_schemas::frame::now_us());
    let partitions: BTreeSet<String> = client
        .query("SELECT relname::text FROM pg_class WHERE relname LIKE 'telemetry_p%' AND relkind = 'r'", &[])
        .await
        .expect("partitions")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected: BTreeSet<String> =
        (today - 1..=today + 3).filter_map(|d| schema::partition_name(Table::Telemetry, d)).collect();
    assert_eq!(partitions, expected, "yesterday, today and 3 ahead; the 2020 one dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_says_when_storage_is_off() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |_| {}).await;
    let (status, _, body) = history(&node, "/api/v1/devices/d1/telemetry").await;
    assert_eq!((status, body["reason"].as_str()), (503, Some("storage_off")), "{body}");
    node.shutdown().await;
}

/// Requests that reach the writer within `storage.writer_linger_ms` of
/// the first share one transaction (group commit); the linger runs from
/// the first request, so a steady trickle still commits; with no linger,
/// requests apart in time get their own transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_groups_requests_that_arrive_within_its_linger() {
    let primary = Postgres::start_primary().await.expect("primary");
    // Transactions that `requests` requests, `apart` from each other, end up in.
    let transactions = |linger_ms: u64, device: &'static str, requests: usize, apart: Duration| {
        let primary = &primary;
        async move {
            let cfg = StorageConfig {
                primary: primary.url(),
                writer_connections: 1,
                writer_linger_ms: linger_ms,
                ..Default::default()
            };
            let life = fluxmesh_node::lifecycle::Lifecycle::new();
            let storage = fluxmesh_node::storage::Storage::start(&cfg, "test", &life, &life)
                .await
                .expect("storage starts")
                .expect("storage is on");
            let mut commits = Vec::new();
            let mut scratch = fluxmesh_schemas::frame::AlignedVec::new();
            for i in 0..requests {
                let frame = fluxmesh_schemas::Frame::telemetry(device, "t", "test", format!("{{\"i\":{i}}}").into());
                let bytes = frame.encode().expect("encodes");
                let mut rows = fluxmesh_node::storage::Rows::default();
                rows.telemetry(fluxmesh_schemas::frame::access(&bytes, &mut scratch).expect("valid frame"));
                commits.push(storage.writer.submit(rows).await.expect("queued"));
                tokio::time::sleep(apart).await;
            }
            for commit in commits {
                tokio::time::timeout(Duration::from_secs(10), commit.wait())
                    .await
                    .expect("committed within 10 s")
                    .expect("committed");
            }
            life.stop();
            assert_eq!(life.close_and_wait(Duration::from_secs(30)).await, 0, "the storage tasks stop");
            let sql = format!("SELECT count(DISTINCT xmin::text) FROM telemetry WHERE device = '{device}'");
            count(primary, &sql).await
        }
    };
    let apart = Duration::from_millis(100);
    assert_eq!(transactions(1000, "grouped", 5, apart).await, 1, "five requests within the linger: one transaction");
    // 12 requests over 1.2 s with a 300 ms linger: the window does not
    // restart with each request.
    let trickle = transactions(300, "trickle", 12, apart).await;
    assert!((2..=6).contains(&trickle), "a trickle longer than the linger commits every linger: {trickle}");
    let alone = transactions(0, "alone", 5, apart).await;
    assert!(alone >= 3, "no linger: requests 100 ms apart mostly commit alone: {alone}");
}
