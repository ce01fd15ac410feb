//! HTTP ingest answers 2xx only for stored messages, dedupes by
//! Idempotency-Key, and refuses bad input with a reason and a counter.

mod common;

use fluxmesh_node::internal_events::names;

use common::{counter, metrics, start_node, telemetry_messages};
use fluxmesh_testkit::{wait_for, NatsServer};
use serde_json::Value;
use std::time::Duration;

async fn post(node: &fluxmesh_node::Node, path: &str, body: &'static [u8], headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = common::http()
        .post(format!("http://{}{path}", node.http_addr()))
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("HTTP request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_dedupes_through_jetstream() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |_| {}).await;
    let client = nats.client().await.expect("connect");
    let path = "/api/v1/devices/meter-7/telemetry?channel=power/kw";
    let (s1, first) = post(&node, path, br#"{"kw":3.2}"#, &[("idempotency-key", "reading-1")]).await;
    let (s2, second) = post(&node, path, br#"{"kw":3.2}"#, &[("idempotency-key", "reading-1")]).await;
    let (s3, third) = post(&node, path, br#"{"kw":3.3}"#, &[("idempotency-key", "reading-2")]).await;
    assert_eq!((s1, s2, s3), (202, 202, 202), "{first} {second} {third}");
    assert_eq!(first["duplicate"], false);
    assert_eq!(second["duplicate"], true, "same key is a duplicate: {second}");
    assert_eq!(first["id"], second["id"]);
    assert_eq!(first["seq"], second["seq"]);
    assert_eq!(third["duplicate"], false);
    assert_eq!(telemetry_messages(&client).await, 2);
    let frames = common::read_telemetry(&client).await;
    assert_eq!(frames[0].channel, "power/kw");
    assert_eq!(frames[0].id.to_string(), first["id"].as_str().expect("id"));
    // Quiet again: nothing is awaiting its ack, and the gauge says so.
    // The gauge's line: its name and a space (no labels).
    let in_flight = format!("{} ", names::PUBLISH_IN_FLIGHT);
    wait_for(Duration::from_secs(10), "the publishes in flight back to 0", || {
        let (node, in_flight) = (&node, &in_flight);
        async move {
            let text = metrics(node).await;
            (text.contains(in_flight.as_str()) && counter(&text, in_flight) == 0.0).then_some(())
        }
    })
    .await
    .expect("the gauge follows the acks");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_reason_and_a_counter() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| c.ingest.max_payload_bytes = 64).await;
    let client = nats.client().await.expect("connect");
    let cases: [(&str, &'static [u8], u16, &str); 5] = [
        ("/api/v1/devices/d1/telemetry", b"{not json", 400, "bad_json"),
        ("/api/v1/devices/d1/telemetry", &[b'1'; 200], 413, "oversize"),
        ("/api/v1/devices/a+b/telemetry", b"{}", 400, "wildcard"),
        ("/api/v1/devices/d1/telemetry?channel=cmd", b"{}", 400, "reserved_channel"),
        ("/api/v1/devices/d1/telemetry?bogus=1", b"{}", 400, "bad_query"),
    ];
    for (path, body, status, reason) in cases {
        let (s, v) = post(&node, path, body, &[]).await;
        assert_eq!(s, status, "{path}: {v}");
        assert_eq!(v["reason"], reason, "{path}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let text = metrics(&node).await;
    for reason in ["bad_json", "oversize", "wildcard", "reserved_channel", "bad_query"] {
        let line = common::series(names::INGEST_REJECTED_TOTAL, &[("source", "http"), ("reason", reason)]);
        assert!(counter(&text, &line) >= 1.0, "no counter for {reason}");
    }
    // The node still serves, and nothing bad was stored.
    let (s, _) = post(&node, "/api/v1/devices/d1/telemetry", b"{\"ok\":1}", &[]).await;
    assert_eq!(s, 202);
    assert_eq!(telemetry_messages(&client).await, 1);
    node.shutdown().await;
}

/// With JetStream unreachable, HTTP ingest answers 503, never 2xx; once it
/// is back, ingest answers 202 again, and every 202 is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_2xx_only_for_stored_messages() {
    let mut nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| {
        c.nats.ack_timeout_ms = 300;
        c.nats.publish_attempts = 2;
    })
    .await;
    let (s, ok) = post(&node, "/api/v1/devices/d1/telemetry", b"{\"n\":1}", &[]).await;
    assert_eq!(s, 202, "{ok}");

    nats.kill();
    let (s, down) = post(&node, "/api/v1/devices/d1/telemetry", b"{\"n\":2}", &[]).await;
    assert_eq!(s, 503, "must not acknowledge while JetStream is down: {down}");
    assert_eq!(down["reason"], "not_stored");
    let text = metrics(&node).await;
    assert!(
        counter(&text, &common::series(names::INGEST_FAILED_TOTAL, &[("source", "http"), ("reason", "not_stored")]))
            >= 1.0
    );

    nats.restart().await.expect("restart nats");
    let accepted = wait_for(Duration::from_secs(30), "ingest to recover", || {
        let node = &node;
        async move {
            let (s, v) = post(node, "/api/v1/devices/d1/telemetry", b"{\"n\":3}", &[]).await;
            (s == 202).then_some(v)
        }
    })
    .await
    .expect("ingest recovers after NATS restarts");
    let client = nats.client().await.expect("connect");
    let frames = common::read_telemetry(&client).await;
    let ids: Vec<String> = frames.iter().map(|f| f.id.to_string()).collect();
    assert!(ids.contains(&ok["id"].as_str().expect("id").to_owned()), "first 202 stored");
    assert!(ids.contains(&accepted["id"].as_str().expect("id").to_owned()), "202 after restart stored");
    node.shutdown().await;
}
