//! Helpers shared by the node's integration tests: in-process nodes and a
//! real MQTT client.
#![allow(dead_code)]

use fluxmesh_node::{Config, Node};
use fluxmesh_testkit::wait_for;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Messages a device received on its subscriptions: (topic, payload).
pub type Inbox = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

static NODES: AtomicUsize = AtomicUsize::new(1);

/// Logs to the test's output, filtered by `RUST_LOG` (default: warnings).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// Starts a node on free loopback ports against `urls`.
pub async fn start_node(urls: &[String], tweak: impl FnOnce(&mut Config)) -> Node {
    init_logging();
    let mut cfg =
        Config { node_id: format!("test-node-{}", NODES.fetch_add(1, Ordering::Relaxed)), ..Default::default() };
    cfg.nats.urls = urls.to_vec();
    cfg.mqtt.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    tweak(&mut cfg);
    Node::start(cfg, CancellationToken::new()).await.expect("node starts")
}

/// A real MQTT client (rumqttc) that records which of its QoS1 publishes
/// were PUBACKed, by the sequence number in their payload.
pub struct Device {
    pub client: AsyncClient,
    /// Payload sequence numbers PUBACKed by the broker.
    pub acked: Arc<Mutex<Vec<u64>>>,
    pub connected: Arc<AtomicUsize>,
    /// Messages received on subscriptions: (topic, payload).
    pub received: Inbox,
    /// False once the connection has failed or been closed.
    pub alive: Arc<std::sync::atomic::AtomicBool>,
    _task: tokio::task::JoinHandle<()>,
}

impl Device {
    pub async fn connect(addr: SocketAddr, client_id: &str) -> Device {
        Self::connect_with_keep_alive(addr, client_id, Duration::from_secs(30)).await
    }

    pub async fn connect_with_keep_alive(addr: SocketAddr, client_id: &str, keep_alive: Duration) -> Device {
        let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(keep_alive);
        opts.set_inflight(100);
        let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
        let acked = Arc::new(Mutex::new(Vec::new()));
        let connected = Arc::new(AtomicUsize::new(0));
        let received: Inbox = Arc::default();
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (acked2, connected2, received2, alive2) =
            (acked.clone(), connected.clone(), received.clone(), alive.clone());
        let task = tokio::spawn(async move {
            // Publishes leave in the order they were queued, so the n-th
            // outgoing publish carries sequence n.
            let mut by_pkid: HashMap<u16, u64> = HashMap::new();
            let mut next_seq = 0u64;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected2.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        by_pkid.insert(pkid, next_seq);
                        next_seq += 1;
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(seq) = by_pkid.remove(&ack.pkid) {
                            acked2.lock().expect("lock").push(seq);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        received2.lock().expect("lock").push((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(_) => {
                        alive2.store(false, Ordering::SeqCst);
                        return;
                    }
                }
            }
        });
        let device = Device { client, acked, connected, received, alive, _task: task };
        let connected = device.connected.clone();
        wait_for(Duration::from_secs(10), "MQTT CONNACK", || {
            let c = connected.load(Ordering::SeqCst);
            async move { (c > 0).then_some(()) }
        })
        .await
        .expect("device connects");
        device
    }

    /// Waits until at least `n` publishes were PUBACKed.
    pub async fn wait_acked(&self, n: usize) {
        let acked = self.acked.clone();
        wait_for(Duration::from_secs(30), &format!("{n} PUBACKs"), || {
            let count = acked.lock().expect("lock").len();
            async move { (count >= n).then_some(()) }
        })
        .await
        .expect("PUBACKs arrive");
    }

    /// Waits until the broker has closed this device's connection.
    pub async fn wait_closed(&self) {
        let alive = self.alive.clone();
        wait_for(Duration::from_secs(30), "connection closed by the node", || {
            let open = alive.load(Ordering::SeqCst);
            async move { (!open).then_some(()) }
        })
        .await
        .expect("the node closes the connection");
    }

    pub fn acked(&self) -> Vec<u64> {
        self.acked.lock().expect("lock").clone()
    }

    /// Publishes `payload` at QoS1; the payload's sequence is its order.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload).await.expect("queue publish");
    }
}

/// Number of messages stored in a stream.
pub async fn stream_messages(client: &async_nats::Client, stream: &str) -> u64 {
    let js = async_nats::jetstream::new(client.clone());
    let mut s = js.get_stream(stream).await.expect("stream exists");
    s.info().await.expect("stream info").state.messages
}

/// The node's /metrics text.
pub async fn metrics(node: &Node) -> String {
    reqwest::get(format!("http://{}/metrics", node.http_addr()))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body")
}

/// The value of one counter line of /metrics (0 if absent).
pub fn counter(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name_and_labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every frame in `stream`, read with a consumer that is deleted afterwards.
pub async fn read_stream(client: &async_nats::Client, stream: &str) -> Vec<fluxmesh_schemas::Frame> {
    use futures::StreamExt;
    let total = stream_messages(client, stream).await as usize;
    let js = async_nats::jetstream::new(client.clone());
    let s = js.get_stream(stream).await.expect("stream");
    let consumer: async_nats::jetstream::consumer::PullConsumer = s
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut frames = Vec::with_capacity(total);
    while frames.len() < total {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("stream read in time")
            .expect("stream open")
            .expect("message");
        frames.push(fluxmesh_schemas::Frame::decode(&m.payload).expect("valid frame"));
    }
    frames
}

/// The `seq` field of a telemetry frame's JSON payload.
pub fn payload_seq(frame: &fluxmesh_schemas::Frame) -> u64 {
    let fluxmesh_schemas::Body::Telemetry { payload } = &frame.body else { panic!("not telemetry: {frame:?}") };
    let v: serde_json::Value = serde_json::from_slice(payload).expect("JSON payload");
    v["seq"].as_u64().expect("seq field")
}
