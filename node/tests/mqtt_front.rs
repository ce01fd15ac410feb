//! The MQTT front end: PUBACK only after JetStream stored the message,
//! one session per client id, subscriptions through the embedded broker,
//! and hostile packets refused while the node keeps serving.

mod common;

use fluxmesh_node::internal_events::names;

use common::{counter, metrics, start_node, telemetry_messages, Device};
use fluxmesh_testkit::mqtt;
use fluxmesh_testkit::{wait_for, NatsServer};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_puback_until_jetstream_stored_it() {
    let mut nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| {
        c.nats.ack_timeout_ms = 300;
        c.nats.publish_attempts = 2;
        // The publish's own failure ends the connection here, not the node
        // finding itself cut off (tests/partition.rs).
        c.cluster.cut_off_grace_ms = 60_000;
    })
    .await;
    let device = Device::connect(node.mqtt_addr(), "strict-1").await;
    device.publish("devices/strict-1/v", b"{\"seq\":0}".to_vec()).await;
    device.wait_acked(1).await;

    nats.kill();
    device.publish("devices/strict-1/v", b"{\"seq\":1}".to_vec()).await;
    // The node gives up on the publish (2 attempts x 300 ms) and closes the
    // connection instead of acknowledging what it could not store.
    device.wait_closed().await;
    assert_eq!(device.acked(), vec![0], "a message JetStream did not store was PUBACKed");
    let text = metrics(&node).await;
    assert!(counter(&text, &format!("{}{{source=\"mqtt\"", names::INGEST_FAILED_TOTAL)) >= 1.0, "{text}");

    // Back up: a reconnecting device is served again. Until JetStream
    // answers again (and the node has noticed), a CONNECT may go
    // unanswered; devices retry, and so does this one.
    nats.restart().await.expect("restart");
    let again = Device::connect_retrying(node.mqtt_addr(), "strict-1", Duration::from_secs(60)).await;
    again.publish("devices/strict-1/v", b"{\"seq\":1}".to_vec()).await;
    again.wait_acked(1).await;
    node.shutdown().await;
}

/// While JetStream is stalled, a device's acks stop but its PINGREQs must
/// still be answered (they queue behind its publishes in the TCP stream, so
/// the node keeps parsing into a bounded backlog), and the node's own
/// keep-alive timer must not run while it holds the device back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_does_not_expire_keep_alive() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| {
        // 10 awaiting acks + 10 parsed: a 15-message burst fits.
        c.mqtt.max_inflight = 10;
        c.nats.ack_timeout_ms = 20_000;
        // A stall this long would otherwise cut the node off and close
        // the device (tests/partition.rs); here it must be held, not closed.
        c.cluster.cut_off_grace_ms = 60_000;
    })
    .await;
    // Keep-alive 1 s: the node gives up after 1.5 s without reading.
    let device = Device::connect_with_keep_alive(node.mqtt_addr(), "slow-1", Duration::from_secs(1)).await;
    device.publish("devices/slow-1/v", b"{\"seq\":0}".to_vec()).await;
    device.wait_acked(1).await;

    nats.pause().expect("pause nats-server");
    for seq in 1..=15u64 {
        device.publish("devices/slow-1/v", format!("{{\"seq\":{seq}}}").into_bytes()).await;
    }
    // Held back for longer than 1.5 x keep-alive, measured by polling the
    // node until its publish window has been full that long.
    let held_since = std::time::Instant::now();
    wait_for(Duration::from_secs(10), "3 s of backpressure", || {
        let held = held_since.elapsed();
        async move { (held >= Duration::from_secs(3)).then_some(()) }
    })
    .await
    .expect("time passes");
    assert_eq!(device.acked(), [0], "acks arrived while JetStream was paused (sequence numbers acked)");
    assert!(device.alive.load(Ordering::SeqCst), "device dropped during the stall (pings unanswered?)");
    nats.resume().expect("resume nats-server");

    device.wait_acked(16).await;
    assert!(device.alive.load(Ordering::SeqCst), "device was dropped while the node held it back");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_with_same_client_id_takes_over() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |_| {}).await;
    let first = Device::connect(node.mqtt_addr(), "twin").await;
    let second = Device::connect(node.mqtt_addr(), "twin").await;
    first.wait_closed().await;
    assert!(second.alive.load(Ordering::SeqCst), "the newer session stays");
    second.publish("devices/twin/v", b"{}".to_vec()).await;
    second.wait_acked(1).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_is_connected_to_one_node_at_a_time() {
    let nats = NatsServer::start().await.expect("nats-server");
    let a = start_node(&[nats.url()], |_| {}).await;
    let b = start_node(&[nats.url()], |_| {}).await;
    let on_a = Device::connect(a.mqtt_addr(), "roamer").await;
    on_a.publish("devices/roamer/v", b"{}".to_vec()).await;
    on_a.wait_acked(1).await;
    // The same client id on another node ends the session on the first.
    let on_b = Device::connect(b.mqtt_addr(), "roamer").await;
    on_a.wait_closed().await;
    assert!(on_b.alive.load(Ordering::SeqCst), "the newer session stays");
    on_b.publish("devices/roamer/v", b"{}".to_vec()).await;
    on_b.wait_acked(1).await;
    let m = common::metrics(&a).await;
    assert!(
        common::counter(&m, &common::series(names::MQTT_DISCONNECTS_TOTAL, &[("reason", "taken_over")])) >= 1.0,
        "{m}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// A subscription is served from the streams: what is stored reaches the
/// subscriber, at the QoS it was granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_receive_what_is_stored() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |_| {}).await;
    let watcher = Device::connect(node.mqtt_addr(), "watcher").await;
    watcher.client.subscribe("devices/+/env", rumqttc::QoS::AtLeastOnce).await.expect("subscribe");
    assert_eq!(
        watcher.wait_subacks(1).await[0],
        vec![rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce)]
    );
    let sensor = Device::connect(node.mqtt_addr(), "sensor-9").await;
    sensor.publish("devices/sensor-9/env", b"{\"t\":1}".to_vec()).await;
    let got = watcher.wait_received("devices/sensor-9/env", 1).await;
    assert_eq!(got, vec![(b"{\"t\":1}".to_vec(), rumqttc::QoS::AtLeastOnce)]);
    node.shutdown().await;
}

/// Subscribers are handed only what was stored: a publish the node
/// refuses (here: a plain topic outside `mqtt.plain_topics`) reaches no
/// subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_stored_messages_reach_subscribers() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| c.mqtt.plain_topics = vec!["public/#".to_owned()]).await;
    let watcher = Device::connect(node.mqtt_addr(), "fan-watcher").await;
    watcher.client.subscribe("alerts/#", rumqttc::QoS::AtMostOnce).await.expect("subscribe");
    watcher.client.subscribe("devices/+/t", rumqttc::QoS::AtMostOnce).await.expect("subscribe");
    watcher.wait_subacks(2).await;
    let sensor = Device::connect(node.mqtt_addr(), "fan-sensor").await;
    // A refused publish, then a stored one, in that order on one connection.
    sensor.publish("alerts/fire", b"refused".to_vec()).await;
    sensor.publish("devices/fan-sensor/t", b"{}".to_vec()).await;
    watcher.wait_received("devices/fan-sensor/t", 1).await;
    let refused: Vec<String> = watcher
        .received
        .lock()
        .expect("lock")
        .iter()
        .filter(|(t, _)| t.starts_with("alerts/"))
        .map(|(t, _)| t.clone())
        .collect();
    assert!(refused.is_empty(), "refused publishes reached a subscriber: {refused:?}");
    node.shutdown().await;
}

/// A connection that subscribed removes its subscriptions when it ends:
/// many subscribers can come and go, and the node holds none of theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_leave_take_their_subscriptions() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| c.mqtt.max_connections = 3).await;
    for i in 0..10 {
        let id = format!("visitor-{i}");
        let visitor = Device::connect(node.mqtt_addr(), &id).await;
        visitor.client.subscribe("devices/+/seen", rumqttc::QoS::AtMostOnce).await.expect("subscribe");
        visitor.client.subscribe(format!("visitors/{i}/#"), rumqttc::QoS::AtLeastOnce).await.expect("subscribe");
        let codes = visitor.wait_subacks(2).await;
        assert_eq!(codes[0], vec![rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtMostOnce)], "visitor {i}");
        visitor.client.disconnect().await.expect("disconnect");
        visitor.wait_closed().await;
    }
    let addr = node.http_addr();
    wait_for(Duration::from_secs(10), "no subscriptions left", || async move {
        let m = common::metrics_at(addr).await;
        (common::counter(&m, names::MQTT_SUBSCRIPTIONS) == 0.0).then_some(())
    })
    .await
    .expect("every subscription removed");
    node.shutdown().await;
}

/// A burst of publishes, more than a subscriber's queue holds, does not
/// end its subscription (what does not fit is read back from the stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_outlives_a_burst() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| c.mqtt.session_queue = 100).await;
    let watcher = Device::connect(node.mqtt_addr(), "burst-watcher").await;
    watcher.client.subscribe("devices/+/burst", rumqttc::QoS::AtMostOnce).await.expect("subscribe");
    let sensors = [
        Device::connect(node.mqtt_addr(), "burst-1").await,
        Device::connect(node.mqtt_addr(), "burst-2").await,
        Device::connect(node.mqtt_addr(), "burst-3").await,
    ];
    wait_for(Duration::from_secs(10), "the subscription is in place", || {
        let sensor = &sensors[0];
        let got = watcher.received.lock().expect("lock").len();
        async move {
            sensor.publish("devices/burst-1/burst", b"{}".to_vec()).await;
            (got > 0).then_some(())
        }
    })
    .await
    .expect("subscribed");
    for i in 0..400 {
        for (n, sensor) in sensors.iter().enumerate() {
            sensor.publish(&format!("devices/burst-{}/burst", n + 1), format!("{{\"i\":{i}}}").into_bytes()).await;
        }
    }
    for sensor in &sensors {
        sensor.wait_acked(400).await;
    }
    // After the burst, a marker still reaches the subscriber.
    wait_for(Duration::from_secs(15), "the subscription still delivers after the burst", || {
        let sensor = &sensors[1];
        let got = watcher.received.lock().expect("lock").iter().any(|(_, p)| p == b"marker");
        async move {
            sensor.publish("devices/burst-2/burst", b"marker".to_vec()).await;
            got.then_some(())
        }
    })
    .await
    .expect("still subscribed");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_packets_are_refused_and_the_node_keeps_serving() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| c.ingest.max_payload_bytes = 1024).await;
    let client = nats.client().await.expect("connect");
    let addr = node.mqtt_addr();

    // Garbage instead of CONNECT.
    let mut raw = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    raw.write_all(&[0xff; 64]).await.expect("write");
    let mut buf = [0u8; 16];
    let n =
        tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf)).await.expect("closed in time").unwrap_or(0);
    assert_eq!(n, 0, "connection closed without an answer");

    // A protocol level above 5 gets an MQTT 5 CONNACK, "unsupported
    // protocol version" (0x84), that newer clients can read.
    let mut v6 = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let connect_v6 =
        [0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x06, 0x02, 0x00, 0x3c, 0x00, 0x00, 0x03, b'v', b'6', b'c'];
    v6.write_all(&connect_v6[..]).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), v6.read_to_end(&mut answer)).await.expect("answered in time");
    assert_eq!(answer, [0x20, 0x03, 0x00, 0x84, 0x00], "CONNACK refused: {answer:?}");
    // MQTT 5 with properties (receive maximum 20), as real clients send:
    // accepted on the same listener.
    let mut v5 = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let connect_v5 = [
        0x10, 0x13, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x03, 0x21, 0x00, 0x14, 0x00, 0x03,
        b'v', b'5', b'p',
    ];
    v5.write_all(&connect_v5[..]).await.expect("write");
    let mut answer = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), v5.read_exact(&mut answer))
        .await
        .expect("answered in time")
        .expect("CONNACK");
    assert_eq!((answer[0], answer[2], answer[3]), (0x20, 0x00, 0x00), "CONNACK success: {answer:?}");
    drop(v5);

    // A truncated PUBLISH after a good CONNECT, then the socket is closed.
    let mut cut = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    cut.write_all(&mqtt::connect_packet("cut")).await.expect("write");
    cut.write_all(&[0x32, 0x7f, 0x00, 0x10, b'd']).await.expect("write");
    drop(cut);

    // An oversize publish closes that connection.
    let big = Device::connect(addr, "big-1").await;
    big.publish("devices/big-1/v", vec![b'x'; 4096]).await;
    big.wait_closed().await;

    // The node still serves a well-behaved device.
    let good = Device::connect(addr, "good-1").await;
    good.publish("devices/good-1/v", b"{}".to_vec()).await;
    good.wait_acked(1).await;
    assert_eq!(telemetry_messages(&client).await, 1, "only the good message is stored");
    let text = metrics(&node).await;
    for reason in ["malformed_packet", "protocol_version", "oversize"] {
        let line = common::series(names::MQTT_PROTOCOL_ERRORS_TOTAL, &[("reason", reason)]);
        assert!(counter(&text, &line) >= 1.0, "no {reason} counter in\n{text}");
    }
    node.shutdown().await;
}
