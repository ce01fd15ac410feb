//! Nodes against a real 3-server JetStream cluster: streams are R3, and a
//! message published to any node reaches a subscriber on any server.

mod common;

use common::{start_node, Device};
use fluxmesh_testkit::{wait_for, NatsCluster};
use futures::StreamExt;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_server_cluster_with_two_nodes() {
    let cluster = NatsCluster::start(3).await.expect("3-server cluster");
    let urls = cluster.urls();
    // Each node knows only one server; it learns the rest from it.
    let a = start_node(&urls[0..1], |_| {}).await;
    let b = start_node(&urls[1..2], |_| {}).await;

    let watcher = cluster.servers[2].client().await.expect("connect");
    let mut sub = watcher.subscribe("fm.tel.>").await.expect("subscribe");
    watcher.flush().await.expect("flush");

    let js = async_nats::jetstream::new(watcher.clone());
    let streams = &a.provisioned().telemetry_streams;
    assert_eq!(streams.len(), 3, "three telemetry partitions by default");
    for name in streams {
        let mut stream = js.get_stream(name).await.expect("stream");
        assert_eq!(stream.info().await.expect("info").config.num_replicas, 3, "R3 in a 3-server cluster");
    }
    assert_eq!(a.provisioned().replicas, 3);

    let device = Device::connect(a.mqtt_addr(), "cluster-dev-1").await;
    device.publish("devices/via-a/temp", b"{\"v\":1}".to_vec()).await;
    let resp = common::http()
        .post(format!("http://{}/api/v1/devices/via-b/telemetry?channel=temp", b.http_addr()))
        .header("content-type", "application/json")
        .body("{\"v\":2}")
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status().as_u16(), 202);

    let mut devices = Vec::new();
    for _ in 0..2 {
        let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("message in time")
            .expect("subscription open");
        devices.push(fluxmesh_schemas::Frame::decode(&msg.payload).expect("frame").device);
    }
    devices.sort();
    assert_eq!(devices, ["via-a", "via-b"]);

    // Both count two live members; once b leaves, a counts one.
    let members = |node: std::net::SocketAddr| async move {
        common::counter(&common::metrics_at(node).await, fluxmesh_mesh::metric_names::CLUSTER_MEMBERS)
    };
    for node in [a.http_addr(), b.http_addr()] {
        wait_for(Duration::from_secs(20), "two live members in fluxmesh_cluster_members", || async move {
            (members(node).await == 2.0).then_some(())
        })
        .await
        .expect("membership gauge");
    }
    b.shutdown().await;
    let a_addr = a.http_addr();
    wait_for(Duration::from_secs(30), "one live member once b has left", || async move {
        (members(a_addr).await == 1.0).then_some(())
    })
    .await
    .expect("membership gauge after a leave");
    a.shutdown().await;
}
