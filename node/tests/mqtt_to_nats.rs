//! A device's MQTT publish reaches a NATS subscriber as a valid frame, with
//! the right subject and headers, and as JSON on the mirror.

mod common;

use fluxmesh_node::internal_events::names;

use common::{counter, metrics, start_node, Device};
use fluxmesh_schemas::{headers, shard_of, Frame, Kind};
use fluxmesh_testkit::NatsServer;
use futures::StreamExt;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_publish_arrives_as_frame_with_headers_and_json() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| c.ingest.json_mirror = vec!["tel".into()]).await;
    let client = nats.client().await.expect("connect");
    let mut frames = client.subscribe("fm.tel.>").await.expect("subscribe");
    let mut json = client.subscribe("fm.json.tel.>").await.expect("subscribe");
    client.flush().await.expect("flush");

    let device_id = "d.1 x>*%";
    let device = Device::connect(node.mqtt_addr(), "dev-client-1").await;
    let payload = br#"{"t":21.5}"#.to_vec();
    device.publish(&format!("devices/{device_id}/env/temp"), payload.clone()).await;

    let msg = tokio::time::timeout(Duration::from_secs(10), frames.next())
        .await
        .expect("frame arrives in time")
        .expect("subscription open");
    let shard = shard_of(device_id, 64);
    assert_eq!(msg.subject.as_str(), format!("fm.tel.{shard}.d%2E1%20x%3E%2A%25.env.temp"));

    let h = msg.headers.as_ref().expect("headers");
    let frame = Frame::decode(&msg.payload).expect("valid frame");
    assert_eq!(frame.device, device_id);
    assert_eq!(frame.channel, "env/temp");
    assert_eq!(frame.kind(), Kind::Telemetry);
    assert_eq!(frame.origin, node.node_id());
    assert_eq!(frame.body, fluxmesh_schemas::Body::Telemetry { payload: payload.clone() });
    assert_eq!(h.get(headers::MSG_ID).map(|v| v.as_str()), Some(frame.id.to_string().as_str()));
    assert_eq!(h.get(headers::DEVICE).map(|v| v.as_str()), Some("d%2E1%20x%3E%2A%25"));
    assert_eq!(h.get(headers::CHANNEL).map(|v| v.as_str()), Some("env/temp"));
    assert_eq!(h.get(headers::KIND).map(|v| v.as_str()), Some("telemetry"));
    assert_eq!(h.get(headers::CONTENT_TYPE_HEADER).map(|v| v.as_str()), Some(fluxmesh_schemas::frame::CONTENT_TYPE));
    let time: i64 = h.get(headers::TIME_US).expect("time header").as_str().parse().expect("integer");
    assert_eq!(time, frame.received_time_us);

    let mirrored = tokio::time::timeout(Duration::from_secs(10), json.next())
        .await
        .expect("JSON arrives in time")
        .expect("subscription open");
    assert_eq!(mirrored.subject.as_str(), format!("fm.json.tel.{shard}.d%2E1%20x%3E%2A%25.env.temp"));
    let v: serde_json::Value = serde_json::from_slice(&mirrored.payload).expect("JSON");
    assert_eq!(v["device"], device_id);
    assert_eq!(v["id"], frame.id.to_string());
    assert_eq!(v["body"]["payload"]["t"], 21.5);

    node.shutdown().await;
}

/// Topics outside `devices/` are plain messages: stored in `FM_MSG` as
/// published, not as telemetry. Malformed device topics are counted and
/// stored nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_topics_are_stored_apart_and_bad_device_topics_are_counted() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |_| {}).await;
    let client = nats.client().await.expect("connect");
    let device = Device::connect(node.mqtt_addr(), "dev-client-2").await;
    let before = counter(
        &metrics(&node).await,
        &common::series(names::INGEST_REJECTED_TOTAL, &[("source", "mqtt"), ("reason", "not_device_topic")]),
    );
    device.publish("weather/today", b"sunny".to_vec()).await;
    device.publish("devices", b"{}".to_vec()).await;
    device.publish("devices/only-id", b"{}".to_vec()).await;
    device.publish("devices/d2/cmd", b"{}".to_vec()).await;
    device.publish("devices/d2/ok", b"{}".to_vec()).await;
    fluxmesh_testkit::wait_for(Duration::from_secs(10), "the good message stored", || {
        let client = client.clone();
        async move { (common::telemetry_messages(&client).await == 1).then_some(()) }
    })
    .await
    .expect("one message stored");
    let text = metrics(&node).await;
    assert!(
        counter(
            &text,
            &common::series(names::INGEST_REJECTED_TOTAL, &[("source", "mqtt"), ("reason", "not_device_topic")])
        ) > before
    );
    assert!(
        counter(
            &text,
            &common::series(names::INGEST_REJECTED_TOTAL, &[("source", "mqtt"), ("reason", "missing_channel")])
        ) >= 1.0
    );
    assert!(
        counter(
            &text,
            &common::series(names::INGEST_REJECTED_TOTAL, &[("source", "mqtt"), ("reason", "reserved_channel")])
        ) >= 1.0
    );
    assert_eq!(common::telemetry_messages(&client).await, 1);
    let js = async_nats::jetstream::new(client.clone());
    let mut plain = js.get_stream("FM_MSG").await.expect("FM_MSG");
    let stored =
        plain.get_last_raw_message_by_subject("fm.msg.weather.today").await.expect("stored as a plain message");
    assert_eq!(stored.payload.as_ref(), b"sunny", "the payload as published");
    assert_eq!(plain.info().await.expect("info").state.messages, 1, "only the plain topic");
    node.shutdown().await;
}

/// SIGTERM-style shutdown while devices publish: every PUBACKed message is
/// in the stream afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_keeps_every_acknowledged_message() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |_| {}).await;
    let client = nats.client().await.expect("connect");
    let device = Device::connect(node.mqtt_addr(), "dev-client-3").await;
    let total = 5000u64;
    let publisher = {
        let client = device.client.clone();
        tokio::spawn(async move {
            for seq in 0..total {
                let payload = format!("{{\"seq\":{seq}}}").into_bytes();
                if client.publish("devices/drain-1/seq", rumqttc::QoS::AtLeastOnce, false, payload).await.is_err() {
                    return;
                }
            }
        })
    };
    fluxmesh_testkit::wait_for(Duration::from_secs(20), "1000 PUBACKs", || {
        let n = device.acked().len();
        async move { (n >= 1000).then_some(()) }
    })
    .await
    .expect("PUBACKs flow");
    node.shutdown().await;
    publisher.abort();
    let acked = device.acked();
    assert!(acked.len() >= 1000);

    // Every PUBACKed sequence must be in the stream, once.
    let frames = common::read_telemetry(&client).await;
    let stored: std::collections::HashSet<u64> = frames.iter().map(common::payload_seq).collect();
    let stored_count = frames.len();
    let lost: Vec<_> = acked.iter().filter(|s| !stored.contains(s)).collect();
    assert!(
        lost.is_empty(),
        "{} PUBACKed messages missing from the stream, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert_eq!(stored.len(), stored_count, "no message stored twice");
}
