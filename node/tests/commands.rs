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

/// The QoS `payload` arrived at on `device`, if it has arrived.
fn qos_of(device: &Device, payload: &[u8]) -> Option<rumqttc::QoS> {
    let received = device.received.lock().expect("lock");
    let qos = device.received_qos.lock().expect("lock");
    received.iter().zip(qos.iter()).find(|((_, p), _)| p == payload).map(|(_, q)| *q)
}

/// Waits (10 s at most) for `payload` to arrive on `device`; its QoS.
async fn arrival_qos(device: &Device, payload: &[u8]) -> rumqttc::QoS {
    wait_for(Duration::from_secs(10), "the command arrives", || {
        let got = qos_of(device, payload);
        async move { got }
    })
    .await
    .expect("the command arrives")
}

/// Commands follow the device's command subscriptions: sent at the QoS the
/// SUBACK granted, also through a wildcard filter that matches the command
/// topic (which still serves other topics), and no longer once every such
/// filter is unsubscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_follow_the_granted_qos_wildcards_and_unsubscribe() {
    use rumqttc::{QoS, SubscribeReasonCode};
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| c.commands.ttl_ms = 60_000).await;
    let client = nats.client().await.expect("client");
    let delivered = |device: &'static str, payload: &'static [u8]| {
        let client = &client;
        wait_for(Duration::from_secs(30), "the command is delivered", move || async move {
            let v = command(client, device, payload).await;
            (v["status"] == "delivered").then_some(v)
        })
    };

    // Granted QoS 0 on the command topic: the command comes at QoS 0.
    let q0 = Device::connect(node.mqtt_addr(), "valve-q0").await;
    q0.client.subscribe("devices/valve-q0/cmd", QoS::AtMostOnce).await.expect("subscribe");
    delivered("valve-q0", b"zero").await.expect("delivered");
    assert_eq!(arrival_qos(&q0, b"zero").await, QoS::AtMostOnce, "granted QoS 0, so sent at QoS 0");
    assert_eq!(q0.subacks.lock().expect("lock")[0], vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]);

    // QoS 1 asked and granted: sent at QoS 1.
    let q1 = Device::connect(node.mqtt_addr(), "valve-q1").await;
    // A message, so that the device API has its state to answer with.
    q1.publish("devices/valve-q1/temp", b"{\"c\":1}".to_vec()).await;
    q1.wait_acked(1).await;
    q1.client.subscribe("devices/valve-q1/cmd", QoS::AtLeastOnce).await.expect("subscribe");
    delivered("valve-q1", b"one").await.expect("delivered");
    assert_eq!(arrival_qos(&q1, b"one").await, QoS::AtLeastOnce);
    assert_eq!(q1.subacks.lock().expect("lock")[0], vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);

    // A wildcard that matches the command topic carries commands, and is
    // still a subscription like any other: it sees other devices' messages.
    let wild = Device::connect(node.mqtt_addr(), "valve-wild").await;
    wild.client.subscribe("devices/+/#", QoS::AtLeastOnce).await.expect("subscribe");
    delivered("valve-wild", b"wild").await.expect("delivered");
    arrival_qos(&wild, b"wild").await;
    q0.publish("devices/valve-q0/temp", b"{\"c\":2}".to_vec()).await;
    wait_for(Duration::from_secs(10), "the wildcard subscriber sees another device's message", || {
        let got = wild.received.lock().expect("lock").iter().any(|(t, _)| t == "devices/valve-q0/temp");
        async move { got.then_some(()) }
    })
    .await
    .expect("routed");

    // Unsubscribed from its only command filter: commands are kept, not sent.
    q1.client.unsubscribe("devices/valve-q1/cmd").await.expect("unsubscribe");
    let url = format!("http://{}/api/v1/devices/valve-q1", node.http_addr());
    let node_id = node.node_id().to_owned();
    wait_for(Duration::from_secs(30), "the node sees the device take no commands", || {
        let (url, node_id) = (url.clone(), node_id.clone());
        async move {
            let v = common::http().get(url).send().await.ok()?.json::<Value>().await.ok()?;
            (v["subscribed_to_commands"] == false && v["connected_node"] == node_id.as_str()).then_some(())
        }
    })
    .await
    .expect("unsubscribed");
    let queued = command(&client, "valve-q1", b"after").await;
    assert_eq!(queued["status"], "queued", "{queued}");
    assert!(qos_of(&q1, b"after").is_none(), "a command reached the device after it unsubscribed");
    node.shutdown().await;
}
