//! Persistent sessions (clean session 0): subscriptions and undelivered
//! QoS 1/2 messages survive the client's absence, a reconnect to another
//! node, and the death of the node the client was on.

mod common;

use common::{start_node, Device, NodeProc};
use fluxmesh_testkit::{wait_for, NatsServer};
use rumqttc::{MqttOptions, QoS};
use std::collections::BTreeSet;
use std::time::Duration;

fn persistent(addr: std::net::SocketAddr, id: &str) -> MqttOptions {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(false);
    opts
}

fn payloads(got: &[(Vec<u8>, QoS)]) -> Vec<String> {
    got.iter().map(|(p, _)| String::from_utf8_lossy(p).into_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_gets_what_it_missed_on_another_node_and_a_clean_connect_ends_it() {
    let nats = NatsServer::start().await.expect("nats-server");
    let a = start_node(&[nats.url()], |_| {}).await;
    let b = start_node(&[nats.url()], |_| {}).await;

    let first = Device::connect_with(persistent(a.mqtt_addr(), "sess-1")).await;
    first.client.subscribe("offline/#", QoS::AtLeastOnce).await.expect("subscribe");
    first.client.subscribe("devices/sess-pub/#", QoS::ExactlyOnce).await.expect("subscribe");
    first.wait_subacks(2).await;
    first.client.disconnect().await.expect("disconnect");
    first.wait_closed().await;
    assert_eq!(*first.session_present.lock().expect("lock"), vec![false], "a new session");

    // While it is away, on another node: 20 plain messages, 5 device
    // messages, and one it does not match.
    let publisher = Device::connect(b.mqtt_addr(), "sess-pub").await;
    for i in 0..20 {
        publisher.publish("offline/x", format!("{i}").into_bytes()).await;
    }
    for i in 0..5 {
        publisher.publish("devices/sess-pub/t", format!("t{i}").into_bytes()).await;
    }
    publisher.publish("elsewhere/x", b"no".to_vec()).await;
    publisher.wait_acked(26).await;

    let back = Device::connect_with(persistent(b.mqtt_addr(), "sess-1")).await;
    assert_eq!(*back.session_present.lock().expect("lock"), vec![true], "the session is there, on another node");
    let missed = back.wait_received("offline/x", 20).await;
    assert_eq!(payloads(&missed), (0..20).map(|i| i.to_string()).collect::<Vec<_>>(), "in order, once");
    assert!(missed.iter().all(|(_, q)| *q == QoS::AtLeastOnce));
    let device = back.wait_received("devices/sess-pub/t", 5).await;
    assert_eq!(payloads(&device), (0..5).map(|i| format!("t{i}")).collect::<Vec<_>>());
    // Then live, with no repeat of what the replay sent.
    publisher.publish("offline/x", b"live".to_vec()).await;
    let all = back.wait_received("offline/x", 21).await;
    assert_eq!(payloads(&all).last().map(String::as_str), Some("live"));
    publisher.publish("offline/marker", b"m".to_vec()).await;
    back.wait_received("offline/marker", 1).await;
    assert_eq!(back.received_on("offline/x").len(), 21, "nothing twice");
    assert!(back.received_on("elsewhere/x").is_empty());
    back.client.disconnect().await.expect("disconnect");
    back.wait_closed().await;

    // A clean-session CONNECT ends the stored session.
    let clean = Device::connect(a.mqtt_addr(), "sess-1").await;
    assert_eq!(*clean.session_present.lock().expect("lock"), vec![false]);
    clean.client.disconnect().await.expect("disconnect");
    clean.wait_closed().await;
    let again = Device::connect_with(persistent(a.mqtt_addr(), "sess-1")).await;
    assert_eq!(*again.session_present.lock().expect("lock"), vec![false], "the clean connect ended it");
    a.shutdown().await;
    b.shutdown().await;
}

/// Messages sent to a persistent session and not acknowledged are sent
/// again when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_messages_are_sent_again_on_reconnect() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |_| {}).await;
    let mut opts = persistent(node.mqtt_addr(), "sess-noack");
    // rumqttc then acknowledges nothing on its own.
    opts.set_manual_acks(true);
    let silent = Device::connect_with(opts).await;
    silent.client.subscribe("redeliver/#", QoS::ExactlyOnce).await.expect("subscribe");
    silent.wait_subacks(1).await;
    let publisher = Device::connect(node.mqtt_addr(), "sess-noack-pub").await;
    publisher.client.publish("redeliver/1", QoS::AtLeastOnce, false, b"one".to_vec()).await.expect("publish");
    publisher.client.publish("redeliver/2", QoS::ExactlyOnce, false, b"two".to_vec()).await.expect("publish");
    silent.wait_received("redeliver/1", 1).await;
    silent.wait_received("redeliver/2", 1).await;
    silent.client.disconnect().await.expect("disconnect");
    silent.wait_closed().await;
    let back = Device::connect_with(persistent(node.mqtt_addr(), "sess-noack")).await;
    assert_eq!(back.wait_received("redeliver/1", 1).await, vec![(b"one".to_vec(), QoS::AtLeastOnce)]);
    assert_eq!(back.wait_received("redeliver/2", 1).await, vec![(b"two".to_vec(), QoS::ExactlyOnce)]);
    node.shutdown().await;
}

/// A persistent QoS 1 subscriber's node is killed mid-stream; the client
/// reconnects to another node and gets every message, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_when_the_subscribers_node_dies() {
    let nats = NatsServer::start().await.expect("nats-server");
    let doomed = NodeProc::start(&[nats.url()], |_| {}).await;
    let survivor = start_node(&[nats.url()], |_| {}).await;
    let sub = Device::connect_with(persistent(doomed.mqtt, "sess-kill")).await;
    sub.client.subscribe("kill/#", QoS::AtLeastOnce).await.expect("subscribe");
    sub.wait_subacks(1).await;
    let publisher = Device::connect(survivor.mqtt_addr(), "sess-kill-pub").await;
    for i in 0..200 {
        publisher.publish("kill/x", format!("{i}").into_bytes()).await;
    }
    sub.wait_received("kill/x", 50).await;
    doomed.kill();
    for i in 200..400 {
        publisher.publish("kill/x", format!("{i}").into_bytes()).await;
    }
    publisher.wait_acked(400).await;
    let back = Device::connect_with(persistent(survivor.mqtt_addr(), "sess-kill")).await;
    assert_eq!(*back.session_present.lock().expect("lock"), vec![true]);
    let seen = |d: &Device| -> BTreeSet<u32> {
        d.received_on("kill/x").iter().filter_map(|(p, _)| String::from_utf8_lossy(p).parse().ok()).collect()
    };
    let before = seen(&sub);
    wait_for(Duration::from_secs(30), "every message, before or after the kill", || {
        let all: BTreeSet<u32> = before.union(&seen(&back)).copied().collect();
        async move { (all.len() == 400).then_some(()) }
    })
    .await
    .unwrap_or_else(|_| {
        let all: BTreeSet<u32> = before.union(&seen(&back)).copied().collect();
        let missing: Vec<u32> = (0..400).filter(|i| !all.contains(i)).collect();
        panic!("lost across the kill: {missing:?}")
    });
    survivor.shutdown().await;
}
