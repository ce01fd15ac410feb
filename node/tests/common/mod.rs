//! Helpers shared by the node's integration tests: in-process nodes and a
//! real MQTT client. Hand-built MQTT packets are in `fluxmesh_testkit::mqtt`.
#![allow(dead_code)]

use fluxmesh_node::{Config, Node};
use fluxmesh_testkit::wait_for;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Messages a device received on its subscriptions: (topic, payload).
pub type Inbox = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

static NODES: AtomicUsize = AtomicUsize::new(1);

/// The admin token of every test node.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// An HTTP client that sends the test nodes' admin token.
pub fn http() -> reqwest::Client {
    http_builder().build().expect("HTTP client")
}

pub fn http_builder() -> reqwest::ClientBuilder {
    let mut headers = reqwest::header::HeaderMap::new();
    let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {ADMIN_TOKEN}")).expect("header value");
    headers.insert(reqwest::header::AUTHORIZATION, value);
    reqwest::Client::builder().default_headers(headers)
}

/// Logs to the test's output, filtered by `RUST_LOG` (default: warnings).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// Starts a node on free loopback ports against `urls`, with the admin
/// token [`ADMIN_TOKEN`], anonymous devices allowed (tests of auth turn it
/// off) and cheap password hashing (debug builds).
pub async fn start_node(urls: &[String], tweak: impl FnOnce(&mut Config)) -> Node {
    let mut cfg = test_config(urls);
    tweak(&mut cfg);
    Node::start(cfg, CancellationToken::new()).await.expect("node starts")
}

/// The config [`start_node`] starts from.
pub fn test_config(urls: &[String]) -> Config {
    init_logging();
    let mut cfg =
        Config { node_id: format!("test-node-{}", NODES.fetch_add(1, Ordering::Relaxed)), ..Default::default() };
    cfg.nats.urls = urls.to_vec();
    cfg.mqtt.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.auth.admin_token = fluxmesh_mesh::Secret::new(ADMIN_TOKEN);
    cfg.auth.allow_anonymous = true;
    cfg.auth.hash_memory_kib = 64;
    cfg.auth.hash_iterations = 1;
    cfg
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
    /// Return codes of every SUBACK, in order.
    pub subacks: Arc<Mutex<Vec<Vec<rumqttc::SubscribeReasonCode>>>>,
    /// The QoS of each message received, in the order of `received`.
    pub received_qos: Arc<Mutex<Vec<rumqttc::QoS>>>,
    /// The retain flag of each message received, in the order of `received`.
    pub received_retain: Arc<Mutex<Vec<bool>>>,
    /// The session-present flag of each CONNACK.
    pub session_present: Arc<Mutex<Vec<bool>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl Device {
    pub async fn connect(addr: SocketAddr, client_id: &str) -> Device {
        Self::connect_with_keep_alive(addr, client_id, Duration::from_secs(30)).await
    }

    pub async fn connect_with_keep_alive(addr: SocketAddr, client_id: &str, keep_alive: Duration) -> Device {
        let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(keep_alive);
        Self::connect_with(opts).await
    }

    /// Connects with `opts` (credentials, TLS); waits for a CONNACK.
    pub async fn connect_with(opts: MqttOptions) -> Device {
        Self::connect_within(opts, Duration::from_secs(10)).await.expect("device connects")
    }

    /// Like a device that retries: connects again until a CONNACK comes
    /// within 10 s, for up to `deadline` (a node whose NATS just came back
    /// may take a while to serve CONNECT).
    pub async fn connect_retrying(addr: SocketAddr, client_id: &str, deadline: Duration) -> Device {
        let until = Instant::now() + deadline;
        loop {
            let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
            opts.set_keep_alive(Duration::from_secs(30));
            match Self::connect_within(opts, Duration::from_secs(10)).await {
                Ok(device) => return device,
                Err(e) if Instant::now() < until => eprintln!("{client_id}: {e:#}; connecting again"),
                Err(e) => panic!("{client_id} was not served within {deadline:?}: {e:#}"),
            }
        }
    }

    /// Connects with `opts`; the device once a CONNACK has come within
    /// `within`.
    async fn connect_within(mut opts: MqttOptions, within: Duration) -> anyhow::Result<Device> {
        opts.set_inflight(100);
        let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
        let acked = Arc::new(Mutex::new(Vec::new()));
        let connected = Arc::new(AtomicUsize::new(0));
        let received: Inbox = Arc::default();
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let subacks: Arc<Mutex<Vec<Vec<rumqttc::SubscribeReasonCode>>>> = Arc::default();
        let received_qos: Arc<Mutex<Vec<rumqttc::QoS>>> = Arc::default();
        let received_retain: Arc<Mutex<Vec<bool>>> = Arc::default();
        let (acked2, connected2, received2, alive2, subacks2, received_qos2) =
            (acked.clone(), connected.clone(), received.clone(), alive.clone(), subacks.clone(), received_qos.clone());
        let received_retain2 = received_retain.clone();
        let session_present: Arc<Mutex<Vec<bool>>> = Arc::default();
        let session_present2 = session_present.clone();
        let task = tokio::spawn(async move {
            // Publishes leave in the order they were queued, so the n-th
            // outgoing publish carries sequence n.
            let mut by_pkid: HashMap<u16, u64> = HashMap::new();
            let mut next_seq = 0u64;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        session_present2.lock().expect("lock").push(ack.session_present);
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
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        subacks2.lock().expect("lock").push(ack.return_codes);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let mut received = received2.lock().expect("lock");
                        received.push((p.topic.clone(), p.payload.to_vec()));
                        received_qos2.lock().expect("lock").push(p.qos);
                        received_retain2.lock().expect("lock").push(p.retain);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        alive2.store(false, Ordering::SeqCst);
                        return;
                    }
                }
            }
        });
        let device = Device {
            client,
            acked,
            connected,
            received,
            alive,
            subacks,
            received_qos,
            received_retain,
            session_present,
            _task: task,
        };
        let connected = device.connected.clone();
        wait_for(within, "MQTT CONNACK", || {
            let c = connected.load(Ordering::SeqCst);
            async move { (c > 0).then_some(()) }
        })
        .await?;
        Ok(device)
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

    /// Waits until `n` SUBACKs have arrived; returns their codes.
    pub async fn wait_subacks(&self, n: usize) -> Vec<Vec<rumqttc::SubscribeReasonCode>> {
        let subacks = self.subacks.clone();
        wait_for(Duration::from_secs(30), &format!("{n} SUBACKs"), || {
            let got = subacks.lock().expect("lock").clone();
            async move { (got.len() >= n).then_some(got) }
        })
        .await
        .expect("SUBACKs arrive")
    }

    /// Messages received on `topic`, with the QoS each came at.
    pub fn received_on(&self, topic: &str) -> Vec<(Vec<u8>, rumqttc::QoS)> {
        let received = self.received.lock().expect("lock");
        let qos = self.received_qos.lock().expect("lock");
        received.iter().zip(qos.iter()).filter(|((t, _), _)| t == topic).map(|((_, p), q)| (p.clone(), *q)).collect()
    }

    /// The retain flags of the messages received on `topic`, in order.
    pub fn retain_flags_on(&self, topic: &str) -> Vec<bool> {
        let received = self.received.lock().expect("lock");
        let retain = self.received_retain.lock().expect("lock");
        received.iter().zip(retain.iter()).filter(|((t, _), _)| t == topic).map(|(_, r)| *r).collect()
    }

    /// Waits until `n` messages have arrived on `topic`; returns them.
    pub async fn wait_received(&self, topic: &str, n: usize) -> Vec<(Vec<u8>, rumqttc::QoS)> {
        wait_for(Duration::from_secs(30), &format!("{n} messages on {topic}"), || {
            let got = self.received_on(topic);
            async move { (got.len() >= n).then_some(got) }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} messages on {topic}; got {}", self.received_on(topic).len()))
    }

    /// Drops the connection without DISCONNECT, as a device that loses
    /// power or network would.
    pub fn sever(&self) {
        self._task.abort();
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

/// The cluster's telemetry streams (prefix `fm`), one per partition.
pub async fn telemetry_streams(client: &async_nats::Client) -> Vec<String> {
    let js = async_nats::jetstream::new(client.clone());
    let subjects = fluxmesh_schemas::Subjects::new("fm").expect("prefix");
    fluxmesh_mesh::telemetry_streams(&js, &subjects).await.expect("telemetry streams")
}

/// Messages in every telemetry stream.
pub async fn telemetry_messages(client: &async_nats::Client) -> u64 {
    let mut total = 0;
    for stream in telemetry_streams(client).await {
        total += stream_messages(client, &stream).await;
    }
    total
}

/// Every telemetry frame, partition after partition.
pub async fn read_telemetry(client: &async_nats::Client) -> Vec<fluxmesh_schemas::Frame> {
    let mut frames = Vec::new();
    for stream in telemetry_streams(client).await {
        frames.extend(read_stream(client, &stream).await);
    }
    frames
}

/// The node's /metrics text.
pub async fn metrics(node: &Node) -> String {
    metrics_at(node.http_addr()).await
}

/// /metrics of the node serving HTTP on `addr`.
pub async fn metrics_at(addr: SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics")).await.expect("GET /metrics").text().await.expect("metrics body")
}

/// The Prometheus series `name{k="v",…}` (just `name` without labels), as
/// the exporter writes it, for [`counter`]. Names come from
/// `fluxmesh_node::internal_events::names` and
/// `fluxmesh_mesh::metric_names`.
pub fn series(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

/// The value of one counter line of /metrics (0 if absent).
pub fn counter(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name_and_labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every frame in `stream`, read as the mesh's own readers do
/// (`fluxmesh_mesh::read_pending`: a busy server's "no responders" or a
/// missed heartbeat makes it read on with a new consumer, not fail).
pub async fn read_stream(client: &async_nats::Client, stream: &str) -> Vec<fluxmesh_schemas::Frame> {
    let js = async_nats::jetstream::new(client.clone());
    let s = js.get_stream(stream).await.expect("stream");
    let mut frames = Vec::new();
    fluxmesh_mesh::read_pending(&s, Default::default(), Duration::from_secs(10), |m| {
        frames.push(fluxmesh_schemas::Frame::decode(&m.payload)?);
        Ok(())
    })
    .await
    .expect("stream read in time");
    frames
}

/// The `seq` field of a telemetry frame's JSON payload.
/// Reads frames from `sub` until one satisfies `wanted` and returns it;
/// panics, naming `what`, if none does within `timeout`.
pub async fn next_frame_where(
    sub: &mut async_nats::Subscriber,
    timeout: Duration,
    what: &str,
    mut wanted: impl FnMut(&fluxmesh_schemas::Frame) -> bool,
) -> fluxmesh_schemas::Frame {
    use futures::StreamExt as _;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let msg = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| panic!("timed out after {timeout:?} waiting for {what}"))
            .expect("subscription open");
        let frame = fluxmesh_schemas::Frame::decode(&msg.payload).expect("frame");
        if wanted(&frame) {
            return frame;
        }
    }
}

pub fn payload_seq(frame: &fluxmesh_schemas::Frame) -> u64 {
    let fluxmesh_schemas::Body::Telemetry { payload } = &frame.body else { panic!("not telemetry: {frame:?}") };
    let v: serde_json::Value = serde_json::from_slice(payload).expect("JSON payload");
    v["seq"].as_u64().expect("seq field")
}

/// A node running on a runtime of its own, on its own thread, so it can be
/// killed (runtime dropped) or paused (its one worker thread blocked).
pub struct NodeProc {
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    handle: tokio::runtime::Handle,
    command: Option<tokio::sync::oneshot::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NodeProc {
    pub async fn start(urls: &[String], tweak: impl FnOnce(&mut Config) + Send + 'static) -> NodeProc {
        let urls = urls.to_vec();
        let (info_tx, info_rx) = tokio::sync::oneshot::channel();
        let (cmd_tx, cmd_rx) = tokio::sync::oneshot::channel::<bool>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("node runtime");
            let handle = rt.handle().clone();
            rt.block_on(async move {
                let node = start_node(&urls, tweak).await;
                let _ = info_tx.send((node.http_addr(), node.mqtt_addr(), handle));
                // true: graceful shutdown; false or dropped: kill.
                if let Ok(true) = cmd_rx.await {
                    node.shutdown().await;
                }
            });
            // Whatever is still running dies here, mid-flight.
            rt.shutdown_background();
        });
        let (http, mqtt, handle) = info_rx.await.expect("node started");
        NodeProc { http, mqtt, handle, command: Some(cmd_tx), thread: Some(thread) }
    }

    /// Stops the node as SIGKILL would, as far as the cluster can tell.
    pub fn kill(mut self) {
        if let Some(c) = self.command.take() {
            let _ = c.send(false);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// SIGTERM: drain, release leases, leave.
    pub async fn shutdown(mut self) {
        if let Some(c) = self.command.take() {
            let _ = c.send(true);
        }
        if let Some(t) = self.thread.take() {
            tokio::task::spawn_blocking(move || t.join()).await.expect("join").expect("node thread");
        }
    }

    /// Freezes the node for `d`, as SIGSTOP then SIGCONT would: its only
    /// worker thread is blocked, so none of its tasks runs.
    pub fn pause(&self, d: Duration) {
        self.handle.spawn(async move { std::thread::sleep(d) });
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Some(c) = self.command.take() {
            let _ = c.send(false);
        }
    }
}

pub async fn get_json(url: String) -> Option<Value> {
    let resp = http().get(url).timeout(Duration::from_secs(5)).send().await.ok()?;
    resp.json().await.ok()
}

/// Whether `node`'s view shows `expected` live nodes and every shard held,
/// validly, by its desired owner.
pub async fn settled(node: SocketAddr, expected: usize) -> bool {
    let Some(v) = get_json(format!("http://{node}/api/v1/cluster?lag=false")).await else { return false };
    let nodes = v["nodes"].as_array().map_or(0, Vec::len);
    let shards = v["shards"].as_array().cloned().unwrap_or_default();
    nodes == expected
        && shards.len() == 64
        && shards.iter().all(|s| s["lease_valid"] == true && s["holder"] == s["desired_owner"])
}

/// Waits until every listed node agrees the cluster has settled; returns
/// how long that took.
pub async fn wait_settled(nodes: &[SocketAddr], expected: usize, what: &str) -> Duration {
    let started = Instant::now();
    wait_for(Duration::from_secs(20), what, || async {
        for n in nodes {
            if !settled(*n, expected).await {
                return None;
            }
        }
        Some(())
    })
    .await
    .expect("cluster settles");
    started.elapsed()
}

/// The project's Python (`.local/venv`, with nats-py and paho-mqtt), or
/// `FM_TEST_PYTHON`.
#[allow(dead_code)]
pub fn python() -> std::path::PathBuf {
    std::env::var_os("FM_TEST_PYTHON")
        .map(Into::into)
        .unwrap_or_else(|| fluxmesh_testkit::workspace_root().join(".local/venv/bin/python"))
}

/// Runs a client script with [`python`] and `args`; what it prints, as JSON.
/// Fails the test, with the script's stderr, if it fails.
#[allow(dead_code)]
pub async fn run_python_json(script: &'static str, args: Vec<String>) -> Value {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python())
            .arg("-c")
            .arg(script)
            .args(&args)
            .output()
            .expect("python with paho-mqtt (run deploy/local/test, or set FM_TEST_PYTHON)")
    })
    .await
    .expect("join");
    assert!(out.status.success(), "client script failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON from the script")
}
