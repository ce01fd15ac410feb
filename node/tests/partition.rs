//! Network partitions between a node and NATS: a node cut off stops serving
//! devices (they move to a node that can store what they send) and its
//! shards move; a node left on a server that cannot reach JetStream moves
//! to another server; both serve again once they are back.
//!
//! The cut is a relay (`fluxmesh_testkit::Blackhole`) between the node and
//! nats-server that stops carrying bytes without closing anything, as a
//! dropped link does.

mod common;

use common::{counter, metrics_at, series, start_node, wait_settled};
use fluxmesh_testkit::mqtt::RawClient;
use fluxmesh_testkit::{wait_for, Blackhole, NatsServer};
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::ConnectReturnCode;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// A raw MQTT 3.1.1 device connected to `node`; if refused, the CONNACK's
/// code (`None`: the connection closed without one).
async fn device(node: SocketAddr, id: &str) -> Result<RawClient<TcpStream>, Option<ConnectReturnCode>> {
    let socket = TcpStream::connect(node).await.map_err(|_| None)?;
    let mut client = RawClient::new(socket);
    client.send_connect(id, 30, None).await.map_err(|_| None)?;
    let ack = client.connack(Duration::from_secs(10)).await.map_err(|_| None)?;
    match ack.code {
        ConnectReturnCode::Success => Ok(client),
        code => Err(Some(code)),
    }
}

/// Publishes one QoS1 message and waits for its PUBACK.
async fn publish_acked(client: &mut RawClient<TcpStream>, id: &str, pkid: u16) {
    client.queue_publish(&format!("devices/{id}/t"), pkid, false, b"{\"t\":1}").expect("queued");
    client.flush().await.expect("sent");
    loop {
        match client.read_packet_within(Duration::from_secs(15)).await.expect("PUBACK") {
            Packet::PubAck(ack) if ack.pkid == pkid => return,
            _ => {}
        }
    }
}

async fn readyz(http: SocketAddr) -> u16 {
    match common::http().get(format!("http://{http}/readyz")).timeout(Duration::from_secs(5)).send().await {
        Ok(resp) => resp.status().as_u16(),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_nats_stops_serving_until_it_is_back() {
    let nats = NatsServer::start().await.expect("nats-server");
    let link = Blackhole::start(SocketAddr::from(([127, 0, 0, 1], nats.port))).await.expect("relay");
    let cut_node = start_node(&[link.nats_url()], |_| {}).await;
    let other = start_node(&[nats.url()], |_| {}).await;
    wait_settled(&[cut_node.http_addr(), other.http_addr()], 2, "two nodes share the shards").await;

    let mut dev = device(cut_node.mqtt_addr(), "d-cut").await.expect("connects to the node");
    publish_acked(&mut dev, "d-cut", 1).await;

    link.cut();
    let cut_at = Instant::now();
    // The node closes the device's connection: it could not store what
    // the device sends, and holding it would only keep the device waiting.
    loop {
        match dev.read_packet_within(Duration::from_secs(20)).await {
            Ok(_) => continue,
            Err(e) => {
                assert_ne!(e.kind(), std::io::ErrorKind::TimedOut, "the cut-off node kept the device connected");
                break;
            }
        }
    }
    let closed_after = cut_at.elapsed();
    eprintln!("device disconnected {} ms after the cut", closed_after.as_millis());
    assert_eq!(readyz(cut_node.http_addr()).await, 503, "/readyz of a cut-off node");
    let refused = device(cut_node.mqtt_addr(), "d-cut").await.err();
    assert_eq!(refused, Some(Some(ConnectReturnCode::ServiceUnavailable)), "a cut-off node refuses new devices");

    // The other node took every shard, and the device is served there.
    wait_settled(&[other.http_addr()], 1, "the other node holds every shard").await;
    let mut moved = device(other.mqtt_addr(), "d-cut").await.expect("connects to the other node");
    publish_acked(&mut moved, "d-cut", 2).await;
    eprintln!("device served again {} ms after the cut", cut_at.elapsed().as_millis());

    link.heal();
    let healed_at = Instant::now();
    wait_for(Duration::from_secs(30), "the healed node is ready again", || async {
        (readyz(cut_node.http_addr()).await == 200).then_some(())
    })
    .await
    .expect("ready after the heal");
    eprintln!("ready again {} ms after the heal", healed_at.elapsed().as_millis());
    let mut back = device(cut_node.mqtt_addr(), "d-back").await.expect("the healed node takes devices");
    publish_acked(&mut back, "d-back", 1).await;
    wait_settled(&[cut_node.http_addr(), other.http_addr()], 2, "shards shared again").await;
    let m = metrics_at(cut_node.http_addr()).await;
    assert!(counter(&m, "fluxmesh_node_cut_offs_total") >= 1.0, "the cut-off was counted");

    cut_node.shutdown().await;
    other.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_moves_off_a_server_that_does_not_answer() {
    // Two ways to the same server; the node is given both.
    let nats = NatsServer::start().await.expect("nats-server");
    let target = SocketAddr::from(([127, 0, 0, 1], nats.port));
    let (one, two) = (Blackhole::start(target).await.expect("relay"), Blackhole::start(target).await.expect("relay"));
    let node = start_node(&[one.nats_url(), two.nats_url()], |_| {}).await;
    wait_settled(&[node.http_addr()], 1, "the node holds every shard").await;

    // Cut the way that carries more of its connections (control and data
    // each pick one): as a server left in a minority would, it keeps them
    // open and answers nothing. The node must move what was there to the
    // other way. Then heal it and cut the other way, which by then carries
    // both connections: both must move.
    let first = if one.open_connections() >= two.open_connections() { &one } else { &two };
    let second = if std::ptr::eq(first, &one) { &two } else { &one };
    for (round, (bad, good)) in [(first, second), (second, first)].into_iter().enumerate() {
        bad.cut();
        let cut_at = Instant::now();
        // Served: ready (heartbeats through the control connection) and a
        // device's message stored and acknowledged (the data connection),
        // while the cut way stays cut. Looked at only after the node has
        // had time to notice the cut, so nothing passes on the old
        // connections by luck.
        let id = format!("d-move-{round}");
        wait_for(Duration::from_secs(40), "the node serves through the other way", || async {
            if cut_at.elapsed() < Duration::from_millis(2500) || readyz(node.http_addr()).await != 200 {
                return None;
            }
            let mut dev = device(node.mqtt_addr(), &id).await.ok()?;
            tokio::time::timeout(Duration::from_secs(5), publish_acked(&mut dev, &id, 1)).await.ok()
        })
        .await
        .expect("the node serves again while one way stays cut");
        eprintln!("round {round}: served again {} ms after the cut", cut_at.elapsed().as_millis());
        bad.heal();
        let _ = good;
    }
    let m = metrics_at(node.http_addr()).await;
    for connection in ["control", "data"] {
        let forced = counter(&m, &series("fluxmesh_nats_forced_reconnects_total", &[("connection", connection)]));
        assert!(forced >= 1.0, "the {connection} connection was moved");
    }
    node.shutdown().await;
}
