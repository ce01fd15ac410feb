//! Clients the project did not write: `mosquitto_pub` publishes over MQTT,
//! and a `nats-py` subscriber reads the JSON mirror.
//!
//! `deploy/local/test` installs both (Debian `mosquitto-clients`, PyPI
//! `nats-py` in `.local/venv`). Run outside it, the test fails and says
//! what is missing rather than passing without checking anything.

mod common;

use fluxmesh_node::internal_events::names;

use common::start_node;
use fluxmesh_testkit::NatsServer;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const SUBSCRIBER: &str = r#"
import asyncio, json, sys
import nats

async def main():
    nc = await nats.connect(sys.argv[1])
    sub = await nc.subscribe("fm.json.tel.>")
    await nc.flush()
    print("ready", flush=True)
    msg = await sub.next_msg(timeout=30)
    print(json.dumps({"subject": msg.subject, "view": json.loads(msg.data)}), flush=True)
    await nc.close()

asyncio.run(main())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_to_nats_py_json_subscriber() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| c.ingest.json_mirror = vec!["tel".into()]).await;

    let mut sub = Command::new(common::python())
        .arg("-c")
        .arg(SUBSCRIBER)
        .arg(nats.url())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python with nats-py (run deploy/local/test, or set FM_TEST_PYTHON)");
    let mut lines = BufReader::new(sub.stdout.take().expect("stdout")).lines();
    let ready = tokio::task::spawn_blocking(move || {
        let first = lines.next();
        (first, lines)
    });
    let (first, mut lines) =
        tokio::time::timeout(Duration::from_secs(30), ready).await.expect("subscriber ready in time").expect("reader");
    assert_eq!(first.and_then(Result::ok).as_deref(), Some("ready"), "nats-py subscriber did not start");

    let addr = node.mqtt_addr();
    let status = Command::new("mosquitto_pub")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-i", "ext-1", "-q", "1", "-t", "devices/ext-1/env/temp", "-m", r#"{"t":19.25}"#])
        .status()
        .expect("mosquitto_pub (apt-get install mosquitto-clients, or run deploy/local/test)");
    assert!(status.success(), "mosquitto_pub failed: {status}");

    let line = tokio::time::timeout(Duration::from_secs(30), tokio::task::spawn_blocking(move || lines.next()))
        .await
        .expect("JSON view in time")
        .expect("reader")
        .expect("a line")
        .expect("utf-8");
    let got: serde_json::Value = serde_json::from_str(&line).expect("JSON from the subscriber");
    let shard = fluxmesh_schemas::shard_of("ext-1", 64);
    assert_eq!(got["subject"], format!("fm.json.tel.{shard}.ext-1.env.temp"));
    assert_eq!(got["view"]["device"], "ext-1");
    assert_eq!(got["view"]["channel"], "env/temp");
    assert_eq!(got["view"]["kind"], "telemetry");
    assert_eq!(got["view"]["body"]["payload"]["t"], 19.25);
    let _ = sub.wait();
    node.shutdown().await;
}

/// Waits until node `http` holds at least `n` MQTT subscriptions: an
/// external subscriber has no other way to say it is ready.
async fn wait_subscriptions(http: std::net::SocketAddr, n: f64) {
    fluxmesh_testkit::wait_for(Duration::from_secs(30), "the subscriptions are in place", || async move {
        let m = common::metrics_at(http).await;
        (common::counter(&m, names::MQTT_SUBSCRIPTIONS) >= n).then_some(())
    })
    .await
    .expect("subscribed");
}

/// `mosquitto_sub` on one node receives what `mosquitto_pub` published on
/// another, device telemetry and plain topics, at the QoS asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_on_one_node_receives_mosquitto_pub_on_another() {
    let nats = NatsServer::start().await.expect("nats-server");
    let a = start_node(&[nats.url()], |_| {}).await;
    let b = start_node(&[nats.url()], |_| {}).await;
    let (host, port_b) = (b.mqtt_addr().ip().to_string(), b.mqtt_addr().port().to_string());
    let sub = Command::new("mosquitto_sub")
        .args(["-V", "mqttv311", "-h", &host, "-p", &port_b, "-i", "ext-watcher", "-q", "1"])
        .args(["-t", "devices/ext-dev/#", "-t", "site/+/alarm", "-C", "3", "-W", "60", "-v"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients, or run deploy/local/test)");
    wait_subscriptions(b.http_addr(), 2.0).await;

    let port_a = a.mqtt_addr().port().to_string();
    for (id, topic, body) in [
        ("ext-dev", "devices/ext-dev/env/temp", "21.5"),
        ("ext-app", "site/7/alarm", "smoke"),
        ("ext-app", "site/7/other", "not matched"),
        ("ext-dev", "devices/ext-dev/env/temp", "22.0"),
    ] {
        let status = Command::new("mosquitto_pub")
            .args(["-V", "mqttv311", "-h", &host, "-p", &port_a, "-i", id, "-q", "1", "-t", topic, "-m", body])
            .status()
            .expect("mosquitto_pub");
        assert!(status.success(), "mosquitto_pub {topic} failed: {status}");
    }
    let out =
        tokio::time::timeout(Duration::from_secs(60), tokio::task::spawn_blocking(move || sub.wait_with_output()))
            .await
            .expect("mosquitto_sub ends after 3 messages")
            .expect("join")
            .expect("output");
    assert!(out.status.success(), "mosquitto_sub: {:?}", out.status);
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(
        lines,
        vec!["devices/ext-dev/env/temp 21.5", "site/7/alarm smoke", "devices/ext-dev/env/temp 22.0"],
        "in publish order, nothing unmatched"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// The same across nodes with MQTT 5 clients: mosquitto's `-V mqttv5`
/// (the first thing many users try) connects, and user properties, content
/// type and message expiry reach the subscriber on the other node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_mqtt5_properties_across_two_nodes() {
    let nats = NatsServer::start().await.expect("nats-server");
    let a = start_node(&[nats.url()], |_| {}).await;
    let b = start_node(&[nats.url()], |_| {}).await;
    let (host, port_b) = (b.mqtt_addr().ip().to_string(), b.mqtt_addr().port().to_string());
    let sub = Command::new("mosquitto_sub")
        .args(["-V", "mqttv5", "-h", &host, "-p", &port_b, "-i", "ext5-watcher", "-q", "2"])
        .args(["-t", "site5/#", "-C", "2", "-W", "60", "-F", "%t %p %q %C %P %E"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients, or run deploy/local/test)");
    wait_subscriptions(b.http_addr(), 1.0).await;
    let port_a = a.mqtt_addr().port().to_string();
    let status = Command::new("mosquitto_pub")
        .args(["-V", "mqttv5", "-h", &host, "-p", &port_a, "-i", "ext5-app", "-q", "2", "-t", "site5/a", "-m", "one"])
        .args(["-D", "publish", "user-property", "shift", "night", "-D", "publish", "content-type", "text/plain"])
        .args(["-D", "publish", "message-expiry-interval", "3600"])
        .status()
        .expect("mosquitto_pub");
    assert!(status.success(), "mosquitto_pub -V mqttv5 failed: {status}");
    let status = Command::new("mosquitto_pub")
        .args(["-V", "mqttv5", "-h", &host, "-p", &port_a, "-i", "ext5-app", "-q", "1", "-t", "site5/b", "-m", "two"])
        .status()
        .expect("mosquitto_pub");
    assert!(status.success(), "mosquitto_pub -V mqttv5 failed: {status}");
    let out =
        tokio::time::timeout(Duration::from_secs(60), tokio::task::spawn_blocking(move || sub.wait_with_output()))
            .await
            .expect("mosquitto_sub ends after 2 messages")
            .expect("join")
            .expect("output");
    assert!(out.status.success(), "mosquitto_sub: {:?}", out.status);
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim_end().to_owned()).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let first: Vec<&str> = lines[0].split(' ').collect();
    assert_eq!(first[..5], ["site5/a", "one", "2", "text/plain", "shift:night"], "{lines:?}");
    let expiry: u32 = first[5].parse().expect("expiry left");
    assert!((3590..=3600).contains(&expiry), "{lines:?}");
    assert_eq!(lines[1], "site5/b two 1", "no properties on a message published without them");
    a.shutdown().await;
    b.shutdown().await;
}

const PAHO_QOS2: &str = r#"
import sys, time, json
import paho.mqtt.client as mqtt

host, sub_port, pub_port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
got = []
subscribed = []

def on_subscribe(client, userdata, mid, reason_codes, properties):
    subscribed.append([rc.value for rc in reason_codes])

def on_message(client, userdata, msg):
    got.append({"topic": msg.topic, "payload": msg.payload.decode(), "qos": msg.qos})

sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-sub", protocol=mqtt.MQTTv311)
sub.on_subscribe = on_subscribe
sub.on_message = on_message
sub.connect(host, sub_port)
sub.loop_start()
sub.subscribe("paho/#", qos=2)
deadline = time.time() + 30
while not subscribed and time.time() < deadline:
    time.sleep(0.02)

pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-pub", protocol=mqtt.MQTTv311)
pub.connect(host, pub_port)
pub.loop_start()
for i in range(count):
    pub.publish("paho/q2", str(i), qos=2).wait_for_publish(30)
while len(got) < count and time.time() < deadline + 30:
    time.sleep(0.02)
time.sleep(0.5)  # a duplicate would arrive now
pub.disconnect()
sub.disconnect()
print(json.dumps({"subscribed": subscribed, "got": got}))
"#;

/// paho-mqtt (Python) publishes at QoS 2 on one node and a paho subscriber
/// granted QoS 2 on another receives each message once, at QoS 2, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_qos2_across_two_nodes() {
    let nats = NatsServer::start().await.expect("nats-server");
    let a = start_node(&[nats.url()], |_| {}).await;
    let b = start_node(&[nats.url()], |_| {}).await;
    let host = a.mqtt_addr().ip().to_string();
    let (sub_port, pub_port) = (b.mqtt_addr().port().to_string(), a.mqtt_addr().port().to_string());
    let result = common::run_python_json(PAHO_QOS2, vec![host, sub_port, pub_port, "20".into()]).await;
    assert_eq!(result["subscribed"], serde_json::json!([[2]]), "granted QoS 2");
    let got = result["got"].as_array().expect("messages");
    let payloads: Vec<&str> = got.iter().filter_map(|m| m["payload"].as_str()).collect();
    let expected: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    assert_eq!(payloads, expected, "each message once, in order");
    assert!(got.iter().all(|m| m["qos"] == 2), "{got:?}");
    a.shutdown().await;
    b.shutdown().await;
}

const PAHO_SESSION_AND_WILL: &str = r#"
import sys, time, json
import paho.mqtt.client as mqtt

host, port_a, port_b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
got, flags = [], []

def client(cid, clean):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=clean, protocol=mqtt.MQTTv311)
    c.on_message = lambda cl, u, m: got.append({"topic": m.topic, "payload": m.payload.decode(), "qos": m.qos})
    c.on_connect = lambda cl, u, f, rc, p: flags.append(f.session_present)
    return c

def wait(cond, secs=30):
    deadline = time.time() + secs
    while not cond() and time.time() < deadline:
        time.sleep(0.02)

# A persistent subscriber on node b subscribes, then leaves.
sub = client("paho-persist", False)
done = []
sub.on_subscribe = lambda *a: done.append(1)
sub.connect(host, port_b); sub.loop_start()
sub.subscribe("paho-sess/#", qos=1)
wait(lambda: done)
sub.disconnect(); sub.loop_stop()

# On node a, a client with a will publishes five messages, then its
# connection drops without DISCONNECT.
pub = client("paho-dies", True)
pub.will_set("paho-sess/will", "died", qos=1)
pub.connect(host, port_a); pub.loop_start()
for i in range(5):
    pub.publish("paho-sess/x", str(i), qos=1).wait_for_publish(30)
pub.loop_stop()
pub.socket().close()

# The subscriber comes back on node a: the five and the will.
sub = client("paho-persist", False)
sub.connect(host, port_a); sub.loop_start()
wait(lambda: len(got) >= 6)
time.sleep(0.5)
sub.disconnect(); sub.loop_stop()
print(json.dumps({"session_present": flags, "got": got}))
"#;

/// paho-mqtt (Python): a persistent session made on one node gets, on the
/// other, what was published while it was away, and the will of a client
/// whose connection dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_persistent_session_and_will_across_two_nodes() {
    let nats = NatsServer::start().await.expect("nats-server");
    let a = start_node(&[nats.url()], |_| {}).await;
    let b = start_node(&[nats.url()], |_| {}).await;
    let host = a.mqtt_addr().ip().to_string();
    let (port_a, port_b) = (a.mqtt_addr().port().to_string(), b.mqtt_addr().port().to_string());
    let result = common::run_python_json(PAHO_SESSION_AND_WILL, vec![host, port_a, port_b]).await;
    assert_eq!(
        result["session_present"],
        serde_json::json!([false, false, true]),
        "the subscriber's new session, the publisher's clean one, the subscriber's found again"
    );
    let got: Vec<(String, String)> = result["got"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| (m["topic"].as_str().unwrap_or("").to_owned(), m["payload"].as_str().unwrap_or("").to_owned()))
        .collect();
    let mut expected: Vec<(String, String)> = (0..5).map(|i| ("paho-sess/x".to_owned(), i.to_string())).collect();
    expected.push(("paho-sess/will".to_owned(), "died".to_owned()));
    assert_eq!(got, expected, "what it missed, in order, then the will");
    a.shutdown().await;
    b.shutdown().await;
}
