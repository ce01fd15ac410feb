//! Wills: published when a connection ends without DISCONNECT (the
//! socket drops, keep-alive expires), also when the node holding the
//! connection dies; discarded after DISCONNECT.

mod common;

use bytes::BytesMut;
use common::{start_node, Device, NodeProc};
use fluxmesh_testkit::NatsServer;
use rumqttc::{LastWill, MqttOptions, QoS};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

fn with_will(addr: std::net::SocketAddr, id: &str, topic: &str, body: &'static [u8]) -> MqttOptions {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_last_will(LastWill::new(topic, body.to_vec(), QoS::AtLeastOnce, false));
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_is_published_unless_the_client_says_disconnect() {
    let nats = NatsServer::start().await.expect("nats-server");
    let a = start_node(&[nats.url()], |_| {}).await;
    let b = start_node(&[nats.url()], |_| {}).await;
    let watcher = Device::connect(b.mqtt_addr(), "will-watcher").await;
    watcher.client.subscribe("wills/#", QoS::AtLeastOnce).await.expect("subscribe");
    watcher.client.subscribe("devices/+/status", QoS::AtLeastOnce).await.expect("subscribe");
    watcher.wait_subacks(2).await;

    // The socket drops: the will is published (on a plain topic).
    let lost = Device::connect_with(with_will(a.mqtt_addr(), "will-lost", "wills/lost", b"gone")).await;
    lost.sever();
    assert_eq!(watcher.wait_received("wills/lost", 1).await, vec![(b"gone".to_vec(), QoS::AtLeastOnce)]);

    // DISCONNECT: the will is discarded.
    let polite = Device::connect_with(with_will(a.mqtt_addr(), "will-polite", "wills/polite", b"bye")).await;
    polite.client.disconnect().await.expect("disconnect");
    polite.wait_closed().await;

    // Keep-alive expires (1 s, so the node waits 1.5 s): a raw client
    // that sends CONNECT with a will on its device topic and then nothing.
    let mut silent = tokio::net::TcpStream::connect(a.mqtt_addr()).await.expect("tcp");
    let mut connect = rumqttc::mqttbytes::v4::Connect::new("will-silent");
    connect.keep_alive = 1;
    connect.last_will = Some(LastWill::new("devices/will-silent/status", b"timeout".to_vec(), QoS::AtLeastOnce, false));
    let mut buf = BytesMut::new();
    rumqttc::Packet::Connect(connect).write(&mut buf, 1 << 20).expect("encode");
    silent.write_all(&buf).await.expect("write");
    assert_eq!(
        watcher.wait_received("devices/will-silent/status", 1).await,
        vec![(b"timeout".to_vec(), QoS::AtLeastOnce)]
    );

    // A marker published after the polite client left arrives; its will
    // never does.
    let marker = Device::connect(a.mqtt_addr(), "will-marker").await;
    marker.publish("wills/marker", b"m".to_vec()).await;
    watcher.wait_received("wills/marker", 1).await;
    assert!(watcher.received_on("wills/polite").is_empty(), "a will was published after DISCONNECT");
    assert_eq!(watcher.received_on("wills/lost").len(), 1, "published once");
    drop(silent);
    a.shutdown().await;
    b.shutdown().await;
}

/// The node holding the connection dies (its runtime is dropped, as SIGKILL
/// would): another node publishes the will. A client that disconnected
/// cleanly from the dead node leaves no will behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_is_published_when_its_node_dies() {
    let nats = NatsServer::start().await.expect("nats-server");
    let doomed = NodeProc::start(&[nats.url()], |_| {}).await;
    let survivor = start_node(&[nats.url()], |_| {}).await;
    let watcher = Device::connect(survivor.mqtt_addr(), "death-watcher").await;
    watcher.client.subscribe("wills/#", QoS::AtLeastOnce).await.expect("subscribe");
    watcher.wait_subacks(1).await;

    let addr = doomed.mqtt;
    let victim = Device::connect_with(with_will(addr, "death-victim", "wills/victim", b"node died")).await;
    let polite = Device::connect_with(with_will(addr, "death-polite", "wills/polite", b"bye")).await;
    polite.client.disconnect().await.expect("disconnect");
    polite.wait_closed().await;
    doomed.kill();
    assert_eq!(watcher.wait_received("wills/victim", 1).await, vec![(b"node died".to_vec(), QoS::AtLeastOnce)]);
    drop(victim);
    let marker = Device::connect(survivor.mqtt_addr(), "death-marker").await;
    marker.publish("wills/marker", b"m".to_vec()).await;
    watcher.wait_received("wills/marker", 1).await;
    assert!(watcher.received_on("wills/polite").is_empty(), "a will was published after DISCONNECT");
    assert_eq!(watcher.received_on("wills/victim").len(), 1, "published once");
    survivor.shutdown().await;
}
