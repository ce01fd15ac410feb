//! Subscriptions across the mesh: a subscriber on one node receives what
//! was published on another, at the QoS it was granted, in order per
//! publisher, for device topics and plain topics alike.

mod common;

use fluxmesh_node::internal_events::names;

use common::{start_node, Device};
use fluxmesh_testkit::{wait_for, NatsServer};
use rumqttc::{QoS, SubscribeReasonCode};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_one_node_receives_what_another_node_stored() {
    common::init_logging();
    let nats = NatsServer::start().await.expect("nats-server");
    let a = start_node(&[nats.url()], |_| {}).await;
    let b = start_node(&[nats.url()], |_| {}).await;

    let watcher = Device::connect(b.mqtt_addr(), "mesh-watcher").await;
    watcher.client.subscribe("devices/mesh-pub/#", QoS::AtLeastOnce).await.expect("subscribe");
    watcher.client.subscribe("plain/+/x", QoS::ExactlyOnce).await.expect("subscribe");
    watcher.client.subscribe("$SYS/#", QoS::AtMostOnce).await.expect("subscribe");
    let codes = watcher.wait_subacks(3).await;
    assert_eq!(
        codes,
        vec![
            vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
            vec![SubscribeReasonCode::Success(QoS::ExactlyOnce)],
            vec![SubscribeReasonCode::Success(QoS::AtMostOnce)],
        ]
    );

    // Device telemetry published on node a, QoS 1: all of it, in order,
    // at QoS 1.
    let publisher = Device::connect(a.mqtt_addr(), "mesh-pub").await;
    for i in 0..50u32 {
        publisher.publish("devices/mesh-pub/env/temp", format!("{i}").into_bytes()).await;
    }
    let got = watcher.wait_received("devices/mesh-pub/env/temp", 50).await;
    let payloads: Vec<String> = got.iter().map(|(p, _)| String::from_utf8_lossy(p).into_owned()).collect();
    let expected: Vec<String> = (0..50).map(|i| i.to_string()).collect();
    assert_eq!(payloads, expected, "every message once, in publish order");
    assert!(got.iter().all(|(_, q)| *q == QoS::AtLeastOnce), "granted and published at QoS 1");

    // Plain topics: delivered at the lower of the publish QoS and the
    // granted QoS (2 here).
    let plain = |topic: &'static str, qos: QoS, body: &'static [u8]| {
        let publisher = &publisher;
        async move { publisher.client.publish(topic, qos, false, body.to_vec()).await.expect("publish") }
    };
    plain("plain/1/x", QoS::ExactlyOnce, b"two").await;
    plain("plain/2/x", QoS::AtMostOnce, b"zero").await;
    plain("plain/3/y", QoS::AtLeastOnce, b"not matched").await;
    plain("plain/4/x", QoS::AtLeastOnce, b"one").await;
    assert_eq!(watcher.wait_received("plain/1/x", 1).await, vec![(b"two".to_vec(), QoS::ExactlyOnce)]);
    assert_eq!(watcher.wait_received("plain/2/x", 1).await, vec![(b"zero".to_vec(), QoS::AtMostOnce)]);
    assert_eq!(watcher.wait_received("plain/4/x", 1).await, vec![(b"one".to_vec(), QoS::AtLeastOnce)]);
    assert!(watcher.received_on("plain/3/y").is_empty(), "a topic no filter matches");

    // HTTP ingest on node a reaches the MQTT subscriber on node b.
    let url = format!("http://{}/api/v1/devices/mesh-pub/telemetry?channel=http", a.http_addr());
    let resp = common::http()
        .post(url)
        .header("content-type", "application/json")
        .body("{\"via\":\"http\"}")
        .send()
        .await
        .expect("http");
    assert_eq!(resp.status(), 202);
    assert_eq!(watcher.wait_received("devices/mesh-pub/http", 1).await[0].0, b"{\"via\":\"http\"}");

    // Nothing was delivered on `$SYS/#`, and the node delivered every
    // message at most once per matching session.
    assert!(watcher.received.lock().expect("lock").iter().all(|(t, _)| !t.starts_with('$')));
    a.shutdown().await;
    b.shutdown().await;
}

/// Overlapping subscriptions get one copy at the highest QoS granted;
/// UNSUBSCRIBE stops delivery; `+` and `#` follow MQTT's rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_overlaps_and_unsubscribe() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |_| {}).await;
    let watcher = Device::connect(node.mqtt_addr(), "wild-watcher").await;
    watcher.client.subscribe("sport/#", QoS::AtMostOnce).await.expect("subscribe");
    watcher.client.subscribe("sport/+/player1", QoS::AtLeastOnce).await.expect("subscribe");
    watcher.client.subscribe("+", QoS::AtLeastOnce).await.expect("subscribe");
    watcher.wait_subacks(3).await;
    let publisher = Device::connect(node.mqtt_addr(), "wild-pub").await;
    for topic in ["sport", "sport/tennis/player1", "sport/tennis", "top", "other/x"] {
        publisher.client.publish(topic, QoS::AtLeastOnce, false, topic.as_bytes().to_vec()).await.expect("publish");
    }
    publisher.client.publish("marker", QoS::AtLeastOnce, false, b"m".to_vec()).await.expect("publish");
    watcher.wait_received("marker", 1).await;
    assert_eq!(
        watcher.received_on("sport"),
        vec![(b"sport".to_vec(), QoS::AtLeastOnce)],
        "`sport/#` (QoS 0) and `+` (QoS 1) both match `sport`: one copy, at QoS 1"
    );
    assert_eq!(
        watcher.received_on("sport/tennis/player1"),
        vec![(b"sport/tennis/player1".to_vec(), QoS::AtLeastOnce)],
        "one copy, at the highest granted QoS"
    );
    assert_eq!(watcher.received_on("sport/tennis").len(), 1);
    assert_eq!(watcher.received_on("top").len(), 1, "`+` matches one level");
    assert!(watcher.received_on("other/x").is_empty(), "`+` does not match two levels");

    watcher.client.unsubscribe("+").await.expect("unsubscribe");
    watcher.client.unsubscribe("sport/#").await.expect("unsubscribe");
    // The UNSUBACK is not recorded; a later subscription's SUBACK comes
    // after it on the same connection.
    watcher.client.subscribe("after/unsubscribe", QoS::AtLeastOnce).await.expect("subscribe");
    watcher.wait_subacks(4).await;
    for topic in ["sport", "top", "sport/tennis/player1", "after/unsubscribe"] {
        publisher.client.publish(topic, QoS::AtLeastOnce, false, b"later".to_vec()).await.expect("publish");
    }
    watcher.wait_received("after/unsubscribe", 1).await;
    assert_eq!(watcher.received_on("sport").len(), 1, "unsubscribed from `sport/#`");
    assert_eq!(watcher.received_on("top").len(), 1, "unsubscribed from `+`");
    assert_eq!(watcher.received_on("sport/tennis/player1").len(), 2, "`sport/+/player1` remains");
    node.shutdown().await;
}

/// An operator can keep plain topics to some filters and deny topics
/// outright: a publish outside them is refused (acknowledged, counted,
/// stored nowhere), and a subscription within a denied filter fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_topics_follow_config() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| {
        c.mqtt.plain_topics = vec!["public/#".to_owned()];
        c.mqtt.deny_topics = vec!["public/secret/#".to_owned()];
    })
    .await;
    let watcher = Device::connect(node.mqtt_addr(), "cfg-watcher").await;
    watcher.client.subscribe("#", QoS::AtLeastOnce).await.expect("subscribe");
    watcher.client.subscribe("public/secret/+", QoS::AtLeastOnce).await.expect("subscribe");
    let codes = watcher.wait_subacks(2).await;
    assert_eq!(codes[1], vec![SubscribeReasonCode::Failure], "a filter within mqtt.deny_topics is refused");
    let publisher = Device::connect(node.mqtt_addr(), "cfg-pub").await;
    publisher.publish("private/x", b"no".to_vec()).await;
    publisher.publish("public/secret/x", b"no".to_vec()).await;
    publisher.publish("public/x", b"yes".to_vec()).await;
    publisher.wait_acked(3).await;
    watcher.wait_received("public/x", 1).await;
    assert!(watcher.received_on("private/x").is_empty(), "a refused plain topic reached a subscriber");
    assert!(watcher.received_on("public/secret/x").is_empty(), "a denied topic reached a subscriber");
    let client = nats.client().await.expect("client");
    wait_for(Duration::from_secs(10), "one plain message stored", || {
        let client = client.clone();
        async move { (common::stream_messages(&client, "FM_MSG").await == 1).then_some(()) }
    })
    .await
    .expect("only the allowed topic is stored");
    let m = common::metrics(&node).await;
    assert_eq!(
        common::counter(
            &m,
            &common::series(names::INGEST_REJECTED_TOTAL, &[("source", "mqtt"), ("reason", "plain_topic_off")])
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        common::counter(&m, &common::series(names::MQTT_DENIED_TOPICS_TOTAL, &[("action", "publish")])),
        1.0,
        "{m}"
    );
    assert_eq!(
        common::counter(&m, &common::series(names::MQTT_DENIED_TOPICS_TOTAL, &[("action", "subscribe")])),
        1.0,
        "{m}"
    );
    node.shutdown().await;
}

/// Retained messages are kept cluster-wide: published on one node, they
/// reach a later subscriber on another with the retain flag, at min(their
/// QoS, the granted QoS). An empty retained publish clears the topic's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_span_the_mesh_and_clear() {
    let nats = NatsServer::start().await.expect("nats-server");
    let a = start_node(&[nats.url()], |_| {}).await;
    let b = start_node(&[nats.url()], |_| {}).await;
    let publisher = Device::connect(a.mqtt_addr(), "ret-pub").await;
    let retain = |topic: &'static str, qos: QoS, body: &'static [u8]| {
        let publisher = &publisher;
        async move { publisher.client.publish(topic, qos, true, body.to_vec()).await.expect("publish") }
    };
    retain("status/lamp", QoS::AtLeastOnce, b"on").await;
    retain("status/door", QoS::ExactlyOnce, b"shut").await;
    retain("devices/ret-pub/state", QoS::AtMostOnce, b"{\"ok\":true}").await;
    retain("status/lamp", QoS::AtLeastOnce, b"off").await;
    // Acks come in publish order, each once the message is stored and
    // retained: after the second PUBACK all four are in place.
    publisher.wait_acked(2).await;
    // A live subscriber on node b sees retained publishes as they happen,
    // without the retain flag (they are not from the store).
    let live = Device::connect(b.mqtt_addr(), "ret-live").await;
    live.client.subscribe("status/#", QoS::AtLeastOnce).await.expect("subscribe");
    let door = live.wait_received("status/door", 1).await;
    assert_eq!(door, vec![(b"shut".to_vec(), QoS::AtLeastOnce)], "QoS 2 retained, granted 1");
    assert_eq!(live.retain_flags_on("status/door"), vec![true]);
    assert_eq!(live.wait_received("status/lamp", 1).await[0].0, b"off", "the last retained message");

    retain("status/window", QoS::AtLeastOnce, b"open").await;
    assert_eq!(live.wait_received("status/window", 1).await[0].0, b"open");
    assert_eq!(live.retain_flags_on("status/window"), vec![false], "a live delivery has no retain flag");

    let later = Device::connect(b.mqtt_addr(), "ret-later").await;
    later.client.subscribe("status/+", QoS::ExactlyOnce).await.expect("subscribe");
    later.client.subscribe("devices/+/state", QoS::AtLeastOnce).await.expect("subscribe");
    assert_eq!(later.wait_received("status/door", 1).await, vec![(b"shut".to_vec(), QoS::ExactlyOnce)]);
    assert_eq!(later.wait_received("status/lamp", 1).await, vec![(b"off".to_vec(), QoS::AtLeastOnce)]);
    assert_eq!(later.wait_received("status/window", 1).await, vec![(b"open".to_vec(), QoS::AtLeastOnce)]);
    assert_eq!(
        later.wait_received("devices/ret-pub/state", 1).await,
        vec![(b"{\"ok\":true}".to_vec(), QoS::AtMostOnce)],
        "device topics are retained too"
    );

    // Clearing: an empty retained publish.
    retain("status/lamp", QoS::AtLeastOnce, b"").await;
    publisher.wait_acked(4).await;
    let cleared = Device::connect(b.mqtt_addr(), "ret-cleared").await;
    cleared.client.subscribe("status/#", QoS::AtLeastOnce).await.expect("subscribe");
    cleared.wait_received("status/window", 1).await;
    cleared.wait_received("status/door", 1).await;
    assert!(cleared.received_on("status/lamp").is_empty(), "a cleared retained message was sent");
    a.shutdown().await;
    b.shutdown().await;
}

/// `$share/{group}/{filter}`: each message goes to one member of the
/// group, across nodes; what a member leaves unacknowledged goes to
/// another member when it leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions_balance_across_nodes_and_hand_over_unacked_messages() {
    use std::collections::BTreeSet;
    let nats = NatsServer::start().await.expect("nats-server");
    let a = start_node(&[nats.url()], |_| {}).await;
    let b = start_node(&[nats.url()], |_| {}).await;
    let member_a = Device::connect(a.mqtt_addr(), "share-a").await;
    // This member never acknowledges what it gets.
    let mut opts = rumqttc::MqttOptions::new("share-b", b.mqtt_addr().ip().to_string(), b.mqtt_addr().port());
    opts.set_manual_acks(true);
    let member_b = Device::connect_with(opts).await;
    member_a.client.subscribe("$share/workers/jobs/#", QoS::AtLeastOnce).await.expect("subscribe");
    member_b.client.subscribe("$share/workers/jobs/#", QoS::AtLeastOnce).await.expect("subscribe");
    assert_eq!(member_a.wait_subacks(1).await[0], vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    member_b.wait_subacks(1).await;

    let publisher = Device::connect(a.mqtt_addr(), "share-pub").await;
    for i in 0..40 {
        publisher.publish("jobs/build", format!("{i}").into_bytes()).await;
    }
    publisher.wait_acked(40).await;
    let seen = |d: &Device| -> Vec<u32> {
        d.received_on("jobs/build").iter().filter_map(|(p, _)| String::from_utf8_lossy(p).parse().ok()).collect()
    };
    wait_for(Duration::from_secs(30), "all 40 handed out", || {
        let n = seen(&member_a).len() + seen(&member_b).len();
        async move { (n >= 40).then_some(()) }
    })
    .await
    .expect("every job delivered");
    let (got_a, got_b) = (seen(&member_a), seen(&member_b));
    assert!(!got_a.is_empty() && !got_b.is_empty(), "both members get work: {} and {}", got_a.len(), got_b.len());
    let set_a: BTreeSet<u32> = got_a.iter().copied().collect();
    assert!(got_b.iter().all(|j| !set_a.contains(j)), "a job went to two members");
    assert_eq!(got_a.len() + got_b.len(), 40, "each job once");

    // The member that acknowledged nothing leaves: its jobs go to the other.
    let unacked: BTreeSet<u32> = got_b.iter().copied().collect();
    member_b.client.disconnect().await.expect("disconnect");
    member_b.wait_closed().await;
    // Given back at once: well before JetStream's 30 s ack wait would
    // send them again by itself.
    wait_for(Duration::from_secs(10), "the unacknowledged jobs reach the other member", || {
        let now: BTreeSet<u32> = seen(&member_a).into_iter().collect();
        let done = unacked.iter().all(|j| now.contains(j));
        async move { done.then_some(()) }
    })
    .await
    .expect("handed over");
    a.shutdown().await;
    b.shutdown().await;
}

/// A subscriber slower than the publishers overflows its queue: what did
/// not fit is read back from the stream (a catch-up), so it loses nothing
/// and gets it in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_falls_behind_catches_up_from_the_stream() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| {
        c.mqtt.session_queue = 1;
        c.mqtt.max_inflight_out = 1;
    })
    .await;
    let watcher = Device::connect(node.mqtt_addr(), "slow-watcher").await;
    watcher.client.subscribe("burst/#", QoS::AtLeastOnce).await.expect("subscribe");
    watcher.wait_subacks(1).await;
    let publishers =
        [Device::connect(node.mqtt_addr(), "burst-a").await, Device::connect(node.mqtt_addr(), "burst-b").await];
    for i in 0..300 {
        for (n, p) in publishers.iter().enumerate() {
            p.publish(&format!("burst/{n}"), format!("{i}").into_bytes()).await;
        }
    }
    for (n, _) in publishers.iter().enumerate() {
        let topic = format!("burst/{n}");
        // Duplicates may come (what was sent when the queue overflowed),
        // so wait for 300 distinct messages, not 300 messages.
        let distinct = |d: &Device| {
            let mut seen: Vec<Vec<u8>> = d.received_on(&topic).into_iter().map(|(p, _)| p).collect();
            seen.sort();
            seen.dedup();
            seen.len()
        };
        wait_for(Duration::from_secs(30), "300 distinct messages", || {
            let n = distinct(&watcher);
            async move { (n >= 300).then_some(()) }
        })
        .await
        .unwrap_or_else(|_| panic!("{topic}: {} distinct messages of 300", distinct(&watcher)));
        let got = watcher.received_on(&topic);
        let mut firsts: Vec<u32> = Vec::new();
        for (p, _) in &got {
            let i: u32 = String::from_utf8_lossy(p).parse().expect("number");
            if !firsts.contains(&i) {
                firsts.push(i);
            }
        }
        assert_eq!(firsts, (0..300).collect::<Vec<_>>(), "burst/{n}: every message, in order");
    }
    let m = common::metrics(&node).await;
    assert!(common::counter(&m, names::MQTT_CATCH_UPS_TOTAL) >= 1.0, "the queue never overflowed:\n{m}");
    node.shutdown().await;
}
