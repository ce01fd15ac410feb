//! Commands to devices: a NATS request to `fm.cmd.{device}` is delivered by
//! whichever node holds the device's session, answered with the delivery
//! status; kept for an offline device and delivered when it subscribes;
//! reported when it expires.

mod common;

use common::{next_frame_where, start_node, Device};
use fluxmesh_schemas::{Body, Frame};
use fluxmesh_testkit::{wait_for, NatsServer};
use serde_json::Value;
use std::time::Duration;

/// Sends a command until some node answers (shards may still be settling).
async fn command(client: &async_nats::Client, device: &str, payload: &'static [u8]) -> Value {
    wait_for(Duration::from_secs(30), "a node answers the command", || async move {
        let request = client.request(format!("fm.cmd.{device}"), payload.into());
        match tokio::time::timeout(Duration::from_secs(15), request).await {
            Ok(Ok(reply)) => serde_json::from_slice::<Value>(&reply.payload).ok(),
            _ => None,
        }
    })
    .await
    .expect("answered")
}

/// Waits for a `cmd` event frame of `device` with `status`.
async fn wait_event(events: &mut async_nats::Subscriber, device: &str, status: &str) -> Value {
    let event_json = |f: &Frame| match &f.body {
        Body::Event { json } => serde_json::from_slice::<Value>(json).ok(),
        _ => None,
    };
    let what = format!("a `{status}` event for {device}");
    let frame = next_frame_where(events, Duration::from_secs(30), &what, |f| {
        f.device == device && event_json(f).is_some_and(|v| v["status"] == status)
    })
    .await;
    event_json(&frame).expect("event JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_online_and_offline_devices_and_expiry_is_reported() {
    let nats = NatsServer::start().await.expect("nats-server");
    let a = start_node(&[nats.url()], |c| c.commands.ttl_ms = 60_000).await;
    let b = start_node(&[nats.url()], |c| c.commands.ttl_ms = 60_000).await;
    let client = nats.client().await.expect("client");
    let mut events = client.subscribe("fm.evt.*.*.cmd").await.expect("subscribe");
    client.flush().await.expect("flush");

    // Online: the device holds its session on b and subscribed to commands.
    let online = Device::connect(b.mqtt_addr(), "valve-1").await;
    online.client.subscribe("devices/valve-1/cmd", rumqttc::QoS::AtLeastOnce).await.expect("subscribe");
    let answer = wait_for(Duration::from_secs(30), "delivered to the online device", || {
        let client = &client;
        async move {
            let v = command(client, "valve-1", b"{\"open\":true}").await;
            (v["status"] == "delivered").then_some(v)
        }
    })
    .await
    .expect("delivered");
    assert!(answer["id"].is_string(), "{answer}");
    let got = online.received.lock().expect("lock").clone();
    assert!(got.iter().any(|(t, p)| t == "devices/valve-1/cmd" && p == b"{\"open\":true}"), "device got {got:?}");

    // GET /api/v1/devices/{id} on the other node says where it is connected.
    online.publish("devices/valve-1/temp", b"{\"c\":4}".to_vec()).await;
    online.wait_acked(1).await;
    let url = format!("http://{}/api/v1/devices/valve-1", a.http_addr());
    let device = wait_for(Duration::from_secs(30), "the device's state is checkpointed", || {
        let url = url.clone();
        async move {
            let resp = common::http().get(url).send().await.ok()?;
            if resp.status() != 200 {
                return None;
            }
            resp.json::<Value>().await.ok()
        }
    })
    .await
    .expect("device state");
    assert_eq!(device["connected_node"], b.node_id(), "{device}");
    assert_eq!(device["subscribed_to_commands"], true, "{device}");
    assert_eq!(device["state"]["count"], 1, "{device}");
    assert!([a.node_id(), b.node_id()].contains(&device["owner_node"].as_str().unwrap_or_default()), "{device}");

    // Offline: kept, then delivered when the device subscribes, and reported.
    let queued = command(&client, "valve-2", b"{\"close\":true}").await;
    assert_eq!(queued["status"], "queued", "{queued}");
    let later = Device::connect(a.mqtt_addr(), "valve-2").await;
    later.client.subscribe("devices/valve-2/cmd", rumqttc::QoS::AtLeastOnce).await.expect("subscribe");
    let report = wait_event(&mut events, "valve-2", "delivered").await;
    assert_eq!(report["id"], queued["id"]);
    wait_for(Duration::from_secs(10), "the queued command arrives", || {
        let got = later.received.lock().expect("lock").clone();
        async move { got.iter().any(|(t, p)| t == "devices/valve-2/cmd" && p == b"{\"close\":true}").then_some(()) }
    })
    .await
    .expect("delivered after reconnect");

    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_command_is_reported_and_a_full_queue_refuses() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| {
        c.commands.ttl_ms = 500;
        c.commands.max_queued_per_device = 2;
    })
    .await;
    let client = nats.client().await.expect("client");
    let mut events = client.subscribe("fm.evt.*.*.cmd").await.expect("subscribe");
    client.flush().await.expect("flush");

    let first = command(&client, "asleep", b"1").await;
    assert_eq!(first["status"], "queued", "{first}");
    assert_eq!(command(&client, "asleep", b"2").await["status"], "queued");
    let third = command(&client, "asleep", b"3").await;
    assert_eq!(third["status"], "rejected", "{third}");
    assert_eq!(third["reason"], "queue_full");

    // Nobody connects: after the TTL the owner reports both as expired.
    let report = wait_event(&mut events, "asleep", "expired").await;
    assert!(report["id"].is_string());
    node.shutdown().await;
}
