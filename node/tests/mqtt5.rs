//! MQTT 5 on the same listeners as 3.1.1, driven by `rumqttc`'s MQTT 5
//! client (and raw packets where a client would not misbehave): properties
//! that cross the mesh, subscription options, reason codes, session expiry,
//! will delay and flow control.

mod common;

use bytes::{Bytes, BytesMut};
use common::start_node;
use fluxmesh_testkit::{wait_for, NatsServer};
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Filter, LastWill, LastWillProperties, Packet, PubAckReason, Publish, PublishProperties,
    RetainForwardRule, SubscribeProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(15);

/// An MQTT 5 client whose incoming packets are kept, in order.
struct Client {
    client: AsyncClient,
    seen: Arc<Mutex<Vec<Packet>>>,
    closed: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    fn options(addr: SocketAddr, id: &str) -> MqttOptions {
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        opts
    }

    async fn connect(opts: MqttOptions) -> Client {
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(Mutex::new(None));
        let (s, c) = (seen.clone(), closed.clone());
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(packet)) => s.lock().expect("lock").push(packet),
                    Ok(Event::Outgoing(_)) => {}
                    // One connection per client: no reconnecting.
                    Err(e) => {
                        *c.lock().expect("lock") = Some(e.to_string());
                        return;
                    }
                }
            }
        });
        let me = Client { client, seen, closed, task };
        me.wait(|p| matches!(p, Packet::ConnAck(_)), 1).await;
        me
    }

    fn packets(&self, pick: impl Fn(&Packet) -> bool) -> Vec<Packet> {
        self.seen.lock().expect("lock").iter().filter(|p| pick(p)).cloned().collect()
    }

    async fn wait(&self, pick: impl Fn(&Packet) -> bool, count: usize) -> Vec<Packet> {
        let what = format!("{count} packets");
        wait_for(WAIT, &what, || {
            let found = self.packets(&pick);
            async move { (found.len() >= count).then_some(found) }
        })
        .await
        .unwrap_or_else(|e| {
            panic!("{e}; seen {:?}, closed {:?}", self.seen.lock().expect("lock"), self.closed.lock().expect("lock"))
        })
    }

    fn connack(&self) -> (bool, ConnectReturnCode) {
        match self.packets(|p| matches!(p, Packet::ConnAck(_))).first() {
            Some(Packet::ConnAck(a)) => (a.session_present, a.code),
            _ => panic!("no CONNACK"),
        }
    }

    fn publishes_on(&self, topic: &str) -> Vec<Publish> {
        self.packets(|p| matches!(p, Packet::Publish(p) if p.topic == topic.as_bytes()))
            .into_iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    async fn wait_publishes(&self, topic: &str, count: usize) -> Vec<Publish> {
        let t = topic.as_bytes().to_vec();
        self.wait(move |p| matches!(p, Packet::Publish(p) if p.topic == t), count).await;
        self.publishes_on(topic)
    }

    async fn subscribe(&self, filter: Filter, id: Option<usize>) -> Vec<SubscribeReasonCode> {
        let before = self.packets(|p| matches!(p, Packet::SubAck(_))).len();
        let props = SubscribeProperties { id, user_properties: Vec::new() };
        self.client.subscribe_many_with_properties([filter], props).await.expect("subscribe");
        match self.wait(|p| matches!(p, Packet::SubAck(_)), before + 1).await.pop() {
            Some(Packet::SubAck(ack)) => ack.return_codes,
            other => panic!("not a SUBACK: {other:?}"),
        }
    }

    /// Drops the socket without DISCONNECT, as a dying client would.
    fn sever(self) {
        self.task.abort();
    }

    async fn disconnect(&self) {
        self.client.disconnect().await.expect("disconnect");
        wait_for(WAIT, "the client to close", || {
            let closed = self.closed.lock().expect("lock").is_some();
            async move { closed.then_some(()) }
        })
        .await
        .expect("closed");
    }
}

fn filter(path: &str, qos: QoS) -> Filter {
    Filter::new(path, qos)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_and_subscription_ids_cross_the_mesh() {
    let nats = NatsServer::start().await.expect("nats-server");
    let a = start_node(&[nats.url()], |_| {}).await;
    let b = start_node(&[nats.url()], |_| {}).await;

    let sub = Client::connect(Client::options(b.mqtt_addr(), "v5-sub")).await;
    assert_eq!(sub.connack(), (false, ConnectReturnCode::Success));
    sub.subscribe(filter("props/+/x", QoS::AtLeastOnce), Some(7)).await;
    sub.subscribe(filter("props/#", QoS::ExactlyOnce), Some(9)).await;
    sub.subscribe(filter("devices/v5-dev/#", QoS::AtLeastOnce), Some(11)).await;

    let publisher = Client::connect(Client::options(a.mqtt_addr(), "v5-dev")).await;
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(600),
        content_type: Some("application/json".into()),
        response_topic: Some("replies/v5-dev".into()),
        correlation_data: Some(Bytes::from_static(b"\x00corr\xff")),
        user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into()), ("b".into(), "3".into())],
        ..PublishProperties::default()
    };
    publisher
        .client
        .publish_with_properties("props/1/x", QoS::ExactlyOnce, false, "{}", props.clone())
        .await
        .expect("publish");
    // A device topic carries them too (through the telemetry stream).
    publisher
        .client
        .publish_with_properties("devices/v5-dev/temp", QoS::AtLeastOnce, false, "{\"t\":1}", props.clone())
        .await
        .expect("publish");

    for (topic, qos, ids) in
        [("props/1/x", QoS::ExactlyOnce, vec![7, 9]), ("devices/v5-dev/temp", QoS::AtLeastOnce, vec![11])]
    {
        let got = sub.wait_publishes(topic, 1).await;
        assert_eq!(got.len(), 1, "one copy for the session however many filters match");
        let got_props = got[0].properties.clone().expect("properties");
        assert_eq!(got[0].qos, qos);
        assert_eq!(got_props.payload_format_indicator, Some(1));
        assert_eq!(got_props.content_type.as_deref(), Some("application/json"));
        assert_eq!(got_props.response_topic.as_deref(), Some("replies/v5-dev"));
        assert_eq!(got_props.correlation_data.as_deref(), Some(&b"\x00corr\xff"[..]));
        assert_eq!(got_props.user_properties, props.user_properties, "user properties in order, repeats kept");
        let left = got_props.message_expiry_interval.expect("expiry sent on");
        assert!((590..=600).contains(&left), "what is left of the expiry: {left}");
        let mut got_ids = got_props.subscription_identifiers.clone();
        got_ids.sort_unstable();
        assert_eq!(got_ids, ids, "the identifiers of every matching subscription");
    }

    // A message that expired before the subscriber came is not sent.
    let expiring = PublishProperties { message_expiry_interval: Some(1), ..PublishProperties::default() };
    publisher.client.publish_with_properties("late/x", QoS::AtLeastOnce, true, "old", expiring).await.expect("publish");
    publisher.wait(|p| matches!(p, Packet::PubAck(_)), 2).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    publisher.client.publish("late/y", QoS::AtLeastOnce, true, "fresh").await.expect("publish");
    publisher.wait(|p| matches!(p, Packet::PubAck(_)), 3).await;
    let late = Client::connect(Client::options(b.mqtt_addr(), "v5-late")).await;
    late.subscribe(filter("late/+", QoS::AtLeastOnce), None).await;
    late.wait_publishes("late/y", 1).await;
    assert!(late.publishes_on("late/x").is_empty(), "an expired retained message was sent");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_options_no_local_retain_as_published_retain_handling() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |_| {}).await;
    let me = Client::connect(Client::options(node.mqtt_addr(), "v5-opts")).await;
    let other = Client::connect(Client::options(node.mqtt_addr(), "v5-other")).await;

    let mut no_local = filter("chat/room", QoS::AtLeastOnce);
    no_local.nolocal = true;
    me.subscribe(no_local, None).await;
    other.subscribe(filter("chat/room", QoS::AtLeastOnce), None).await;
    me.client.publish("chat/room", QoS::AtLeastOnce, false, "mine").await.expect("publish");
    other.client.publish("chat/room", QoS::AtLeastOnce, false, "theirs").await.expect("publish");
    let seen = me.wait_publishes("chat/room", 1).await;
    other.wait_publishes("chat/room", 2).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(&seen[0].payload[..], b"theirs", "no-local: a client's own message is not sent back to it");

    // Retain-as-published keeps the flag on live messages; without it the
    // flag is cleared.
    let mut rap = filter("flags/rap", QoS::AtLeastOnce);
    rap.preserve_retain = true;
    me.subscribe(rap, None).await;
    other.subscribe(filter("flags/rap", QoS::AtLeastOnce), None).await;
    other.client.publish("flags/rap", QoS::AtLeastOnce, true, "kept").await.expect("publish");
    assert!(me.wait_publishes("flags/rap", 1).await[0].retain, "retain as published");
    assert!(!other.wait_publishes("flags/rap", 1).await[0].retain, "live messages lose the flag by default");

    // Retain handling: 1 sends retained messages only for a new
    // subscription, 2 never.
    let mut once = filter("flags/#", QoS::AtLeastOnce);
    once.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
    let fresh = Client::connect(Client::options(node.mqtt_addr(), "v5-fresh")).await;
    fresh.subscribe(once.clone(), None).await;
    fresh.wait_publishes("flags/rap", 1).await;
    fresh.subscribe(once, None).await;
    let mut never = filter("flags/+", QoS::AtLeastOnce);
    never.retain_forward_rule = RetainForwardRule::Never;
    fresh.subscribe(never, None).await;
    // A marker after both SUBACKs: had any retained message been sent for
    // them, it would have come before it.
    other.client.publish("flags/marker", QoS::AtLeastOnce, false, "m").await.expect("publish");
    fresh.wait_publishes("flags/marker", 1).await;
    assert_eq!(fresh.publishes_on("flags/rap").len(), 1, "retain handling 1 and 2 sent the retained message again");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_reason_codes() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| {
        c.ingest.max_payload_bytes = 1024;
        c.mqtt.deny_topics = vec!["secret/#".to_owned()];
        c.mqtt.plain_topics = vec!["open/#".to_owned()];
    })
    .await;
    let client = Client::connect(Client::options(node.mqtt_addr(), "v5-refused")).await;
    client.client.publish("secret/x", QoS::AtLeastOnce, false, "no").await.expect("publish");
    client.client.publish("elsewhere/x", QoS::AtLeastOnce, false, "no").await.expect("publish");
    client.client.publish("open/big", QoS::AtLeastOnce, false, vec![b'x'; 2048]).await.expect("publish");
    client.client.publish("open/ok", QoS::AtLeastOnce, false, "yes").await.expect("publish");
    let acks: Vec<PubAckReason> = client
        .wait(|p| matches!(p, Packet::PubAck(_)), 4)
        .await
        .into_iter()
        .filter_map(|p| match p {
            Packet::PubAck(a) => Some(a.reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        acks,
        [
            PubAckReason::NotAuthorized,
            PubAckReason::TopicNameInvalid,
            PubAckReason::QuotaExceeded,
            PubAckReason::Success
        ],
        "denied topic, plain topic not allowed, payload over the limit, stored"
    );
    assert_eq!(client.subscribe(filter("secret/#", QoS::AtLeastOnce), None).await, [SubscribeReasonCode::Unspecified]);
    // No-local on a shared subscription is not allowed (MQTT 5 3.8.3.1).
    let mut shared = filter("$share/g/open/x", QoS::AtLeastOnce);
    shared.nolocal = true;
    assert_eq!(client.subscribe(shared, None).await, [SubscribeReasonCode::TopicFilterInvalid]);

    // A protocol level the node does not speak gets a CONNACK it can read.
    for (level, expected) in [(6u8, vec![0x20, 0x03, 0x00, 0x84, 0x00]), (3, vec![0x20, 0x02, 0x00, 0x01])] {
        let mut socket = tokio::net::TcpStream::connect(node.mqtt_addr()).await.expect("tcp");
        let name: &[u8] = if level == 3 { b"\x00\x06MQIsdp" } else { b"\x00\x04MQTT" };
        let mut body = name.to_vec();
        body.extend_from_slice(&[level, 0x02, 0x00, 0x3C]);
        if level >= 5 {
            body.push(0);
        }
        body.extend_from_slice(b"\x00\x01c");
        let mut packet = vec![0x10, u8::try_from(body.len()).expect("short")];
        packet.extend_from_slice(&body);
        socket.write_all(&packet).await.expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, socket.read_to_end(&mut answer)).await.expect("closed in time").expect("read");
        assert_eq!(answer, expected, "level {level}");
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_expire_and_wills_wait_their_delay() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |_| {}).await;
    let watcher = Client::connect(Client::options(node.mqtt_addr(), "v5-watcher")).await;
    watcher.subscribe(filter("wills/#", QoS::AtLeastOnce), None).await;

    // Session expiry 2 s: back within it, the session is there; after it,
    // gone.
    let mut opts = Client::options(node.mqtt_addr(), "v5-expiring");
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(2));
    let first = Client::connect(opts.clone()).await;
    assert!(!first.connack().0);
    first.disconnect().await;
    let again = Client::connect(opts.clone()).await;
    assert!(again.connack().0, "resumed within its expiry");
    again.disconnect().await;
    let ended = Instant::now();
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let late = Client::connect(opts).await;
    assert!(ended.elapsed() >= Duration::from_secs(2));
    assert!(!late.connack().0, "expired");
    late.disconnect().await;

    // Will delay 2 s (session expiry 30 s): the will waits for it.
    let with_will = |id: &str, topic: &str| {
        let mut opts = Client::options(node.mqtt_addr(), id);
        opts.set_session_expiry_interval(Some(30));
        let props = LastWillProperties {
            delay_interval: Some(2),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: None,
            user_properties: vec![("why".into(), "gone".into())],
        };
        opts.set_last_will(LastWill::new(topic, "bye", QoS::AtLeastOnce, false, Some(props)));
        opts
    };
    let dropped = Client::connect(with_will("v5-dropped", "wills/dropped")).await;
    let lost_at = Instant::now();
    dropped.sever();
    let will = watcher.wait_publishes("wills/dropped", 1).await;
    assert!(lost_at.elapsed() >= Duration::from_millis(1900), "will sent after {:?}", lost_at.elapsed());
    let props = will[0].properties.clone().expect("will properties");
    assert_eq!(props.user_properties, [("why".to_owned(), "gone".to_owned())]);
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));

    // Back within the delay: no will.
    let flaky = Client::connect(with_will("v5-flaky", "wills/flaky")).await;
    flaky.sever();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let back = Client::connect(with_will("v5-flaky", "wills/flaky")).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let marker = Client::connect(Client::options(node.mqtt_addr(), "v5-marker")).await;
    marker.client.publish("wills/marker", QoS::AtLeastOnce, false, "m").await.expect("publish");
    watcher.wait_publishes("wills/marker", 1).await;
    assert!(watcher.publishes_on("wills/flaky").is_empty(), "a will was sent though its client came back");
    back.disconnect().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_control_both_ways() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| c.mqtt.max_inflight = 10).await;

    // The client takes 2 unacknowledged messages: the third waits for an ack.
    let mut opts = Client::options(node.mqtt_addr(), "v5-slow");
    opts.set_receive_maximum(Some(2));
    opts.set_manual_acks(true);
    let slow = Client::connect(opts).await;
    slow.subscribe(filter("flow/x", QoS::AtLeastOnce), None).await;
    let publisher = Client::connect(Client::options(node.mqtt_addr(), "v5-fast")).await;
    for i in 0..3 {
        publisher.client.publish("flow/x", QoS::AtLeastOnce, false, format!("{i}")).await.expect("publish");
    }
    publisher.wait(|p| matches!(p, Packet::PubAck(_)), 3).await;
    let first = slow.wait_publishes("flow/x", 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(slow.publishes_on("flow/x").len(), 2, "more than the client's receive maximum in flight");
    slow.client.ack(&first[0]).await.expect("ack");
    let all = slow.wait_publishes("flow/x", 3).await;
    assert_eq!(&all[2].payload[..], b"2");

    // A client that sends more unacknowledged QoS 2 publishes than the
    // node's receive maximum (mqtt.max_inflight) is told so and dropped.
    let mut socket = tokio::net::TcpStream::connect(node.mqtt_addr()).await.expect("tcp");
    let mut out = BytesMut::new();
    let connect = rumqttc::v5::mqttbytes::v5::Connect {
        keep_alive: 30,
        client_id: "v5-flood".into(),
        clean_start: true,
        properties: None,
    };
    Packet::Connect(connect, None, None).write(&mut out, None).expect("encode");
    for pkid in 1..=11u16 {
        let mut publish = Publish::new("flow/flood", QoS::ExactlyOnce, "x", None);
        publish.pkid = pkid;
        Packet::Publish(publish).write(&mut out, None).expect("encode");
    }
    socket.write_all(&out).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, socket.read_to_end(&mut answer)).await.expect("closed in time").expect("read");
    assert!(answer.ends_with(&[0xE0, 0x01, 0x93]), "DISCONNECT 0x93 last: {answer:02x?}");
    node.shutdown().await;
}
