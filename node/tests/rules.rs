//! Rules through the HTTP API on two nodes sharing one NATS server: a rule
//! stored through one node runs on the shards of both; a script that does
//! not compile is refused with its line and column; a runaway rule becomes
//! an error frame and the node goes on; aggregates close by event time.

mod common;

use fluxmesh_node::internal_events::names;

use common::{next_frame_where, start_node};
use fluxmesh_schemas::{Body, Frame, Kind};
use fluxmesh_testkit::{wait_for, NatsServer};
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

async fn send(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut req = common::http().request(method, url);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.expect("HTTP request");
    let status = resp.status().as_u16();
    (status, resp.json::<Value>().await.unwrap_or(Value::Null))
}

async fn ingest(node: &fluxmesh_node::Node, device: &str, channel: &str, body: Value, device_time_us: Option<i64>) {
    let mut url = format!("http://{}/api/v1/devices/{device}/telemetry?channel={channel}", node.http_addr());
    if let Some(t) = device_time_us {
        url.push_str(&format!("&device_time_us={t}"));
    }
    let (status, answer) = send(reqwest::Method::POST, url, Some(body)).await;
    assert_eq!(status, 202, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_managed_over_http_and_run_on_every_node() {
    let nats = NatsServer::start().await.expect("nats-server");
    let a = start_node(&[nats.url()], |_| {}).await;
    let b = start_node(&[nats.url()], |_| {}).await;
    let client = nats.client().await.expect("client");
    let mut alerts = client.subscribe("fm.evt.*.*.alert").await.expect("subscribe");
    let mut errors = client.subscribe("fm.evt.*.*.error").await.expect("subscribe");
    client.flush().await.expect("flush");
    let rules_url = |node: &fluxmesh_node::Node, id: &str| format!("http://{}/api/v1/rules/{id}", node.http_addr());

    // A script that does not compile: 400 with where, nothing stored.
    let (status, err) = send(
        reqwest::Method::PUT,
        rules_url(&a, "hot"),
        Some(json!({"channel": "temp", "script": "let x = 1;\nif payload.c > { }"})),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["line"], 2, "{err}");
    assert!(err["column"].as_u64().unwrap_or(0) > 0, "{err}");
    let (status, _) = send(reqwest::Method::GET, rules_url(&b, "hot"), None).await;
    assert_eq!(status, 404);

    // A good one, stored through a.
    let script = r#"if payload.c > 30 { alert("critical", `hot: ${payload.c}`, #{ c: payload.c }); }"#;
    let (status, stored) =
        send(reqwest::Method::PUT, rules_url(&a, "hot"), Some(json!({"channel": "temp", "script": script}))).await;
    assert_eq!(status, 200, "{stored}");
    let (status, listed) = send(reqwest::Method::GET, format!("http://{}/api/v1/rules", b.http_addr()), None).await;
    assert_eq!(status, 200);
    assert_eq!(listed["rules"][0]["id"], "hot", "{listed}");

    // Both nodes own shards; devices spread over them all raise alerts once
    // the watch has brought the rule to every node. Resend until each has.
    let devices: Vec<String> = (0..12).map(|i| format!("oven-{i}")).collect();
    let mut alerted = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while alerted.len() < devices.len() {
        assert!(tokio::time::Instant::now() < deadline, "alerts from every device; got {alerted:?}");
        for d in devices.iter().filter(|d| !alerted.contains(*d)) {
            ingest(&a, d, "temp", json!({"c": 35}), None).await;
        }
        while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(300), alerts.next()).await {
            let f = Frame::decode(&msg.payload).expect("frame");
            assert_eq!(f.producer, "rule:hot");
            assert!(matches!(&f.body, Body::Alert { message, .. } if message == "hot: 35"), "{f:?}");
            alerted.insert(f.device.clone());
        }
    }
    let a_http = a.http_addr();
    let owners: BTreeSet<String> = futures::future::join_all(devices.iter().map(|d| async move {
        let (_, v) = send(reqwest::Method::GET, format!("http://{a_http}/api/v1/devices/{d}"), None).await;
        v["owner_node"].as_str().unwrap_or_default().to_owned()
    }))
    .await
    .into_iter()
    .collect();
    assert_eq!(owners.len(), 2, "the devices' shards are spread over both nodes: {owners:?}");

    // A runaway rule: an error frame, and the node keeps processing.
    let (status, _) =
        send(reqwest::Method::PUT, rules_url(&b, "spin"), Some(json!({"channel": "spin", "script": "loop {}"}))).await;
    assert_eq!(status, 200);
    let (status, _) =
        send(reqwest::Method::PUT, rules_url(&b, "spin-check"), Some(json!({"channel": "spin", "script": "emit(1);"})))
            .await;
    assert_eq!(status, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no error frame from the runaway rule");
        ingest(&a, "looper", "spin", json!({}), None).await;
        let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(500), errors.next()).await else { continue };
        let f = Frame::decode(&msg.payload).expect("frame");
        if f.producer == "rule:spin" && matches!(&f.body, Body::Error { message } if message.contains("budget")) {
            break;
        }
    }
    ingest(&a, "oven-0", "temp", json!({"c": 31}), None).await;
    next_frame_where(
        &mut alerts,
        Duration::from_secs(30),
        "an alert after the runaway rule",
        |f| matches!(&f.body, Body::Alert { message, .. } if message == "hot: 31"),
    )
    .await;
    let budget_errors: f64 = futures::future::join_all([&a, &b].map(|n| async move {
        common::counter(
            &common::metrics(n).await,
            &common::series(names::RULE_ERRORS_TOTAL, &[("rule", "spin"), ("reason", "budget")]),
        )
    }))
    .await
    .into_iter()
    .sum();
    assert!(budget_errors >= 1.0, "budget errors counted: {budget_errors}");

    // Delete: 204, then 404.
    let resp = common::http().delete(rules_url(&a, "spin")).send().await.expect("DELETE");
    assert_eq!(resp.status().as_u16(), 204);
    let (status, _) = send(reqwest::Method::GET, rules_url(&a, "spin"), None).await;
    assert_eq!(status, 404);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_close_by_event_time_and_late_values_are_counted() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| {
        c.aggregation.windows_ms = vec![10_000];
        c.aggregation.allowed_lateness_ms = 1_000;
    })
    .await;
    let client = nats.client().await.expect("client");
    let mut aggs = client.subscribe("fm.evt.*.meter-1.agg").await.expect("subscribe");
    client.flush().await.expect("flush");
    let s = 1_000_000i64;
    let base = 1_700_000_000 * s; // a multiple of 10 s
    for (t, v) in [(0, 1.0), (4, 3.0), (9, 5.0)] {
        ingest(&node, "meter-1", "power", json!({"watts": v, "label": "x"}), Some(base + t * s)).await;
    }
    // Past end + lateness: closes [0, 10 s); then a value too late for it.
    ingest(&node, "meter-1", "power", json!({"watts": 7.0}), Some(base + 11 * s)).await;
    ingest(&node, "meter-1", "power", json!({"watts": 100.0}), Some(base + 2 * s)).await;
    let f = &next_frame_where(&mut aggs, Duration::from_secs(30), "the first window's aggregate", |_| true).await;
    assert_eq!((f.kind(), f.producer.as_str(), f.channel.as_str(), f.seq), (Kind::Aggregate, "agg", "power", 1));
    let Body::Aggregate(a) = &f.body else { panic!("aggregate body") };
    assert_eq!((a.field.as_str(), a.window_start_us, a.window_end_us), ("watts", base, base + 10 * s));
    assert_eq!((a.count, a.sum, a.min, a.max, a.mean), (3, 9.0, 1.0, 5.0, 3.0));
    assert!((a.variance - 8.0 / 3.0).abs() < 1e-9, "{}", a.variance);
    let late = wait_for(Duration::from_secs(10), "the late value counted", || async {
        common::counter(&common::metrics(&node).await, names::AGG_LATE_TOTAL).ge(&1.0).then_some(())
    })
    .await;
    assert!(late.is_ok(), "late value not counted");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_commands_a_device_over_mqtt() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |_| {}).await;
    let rule = json!({
        "device": "pump-*",
        "channel": "pressure",
        "script": r#"if payload.bar > 8.0 { command(device, "open-valve"); }"#,
    });
    let url = format!("http://{}/api/v1/rules/relief", node.http_addr());
    let (status, answer) = send(reqwest::Method::PUT, url, Some(rule)).await;
    assert_eq!(status, 200, "{answer}");

    let pump = common::Device::connect(node.mqtt_addr(), "pump-7").await;
    pump.client.subscribe("devices/pump-7/cmd", rumqttc::QoS::AtLeastOnce).await.expect("subscribe");
    // Until the rule has reached the worker, readings raise nothing: resend.
    wait_for(Duration::from_secs(30), "the rule's command reaches the device", || {
        let (node, pump) = (&node, &pump);
        async move {
            ingest(node, "pump-7", "pressure", json!({"bar": 9.5}), None).await;
            let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
            while tokio::time::Instant::now() < deadline {
                let got = pump.received.lock().expect("lock").clone();
                if got.iter().any(|(t, p)| t == "devices/pump-7/cmd" && p == b"open-valve") {
                    return Some(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None
        }
    })
    .await
    .expect("command delivered");
    node.shutdown().await;
}
