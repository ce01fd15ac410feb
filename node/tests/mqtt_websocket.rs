//! MQTT over WebSocket, plain and TLS, with clients the project did not
//! write (paho-mqtt's WebSocket transport) and raw frames that split and
//! join packets.

mod common;

use common::start_node;
use fluxmesh_testkit::mqtt;
use fluxmesh_testkit::tls::TestCerts;
use fluxmesh_testkit::NatsServer;
use futures::{SinkExt as _, StreamExt as _};
use std::net::SocketAddr;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;

const PAHO_WS: &str = r#"
import sys, time, json, ssl
import paho.mqtt.client as mqtt

host, ws_port, wss_port, tcp_port, ca = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
got = {"ws": [], "wss": [], "tcp": []}

def client(cid, kind, port):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, transport="tcp" if kind == "tcp" else "websockets",
                    protocol=mqtt.MQTTv311)
    if kind != "tcp":
        c.ws_set_options(path="/mqtt")
    if kind == "wss":
        c.tls_set(ca_certs=ca)
        c.tls_insecure_set(True)
    c.on_message = lambda cl, u, m: got[kind].append({"topic": m.topic, "payload": m.payload.decode(), "qos": m.qos})
    subscribed = []
    c.on_subscribe = lambda *a: subscribed.append(1)
    c.connect(host, port)
    c.loop_start()
    return c, subscribed

def wait(cond, secs=30):
    deadline = time.time() + secs
    while not cond() and time.time() < deadline:
        time.sleep(0.02)

ws, ws_sub = client("paho-ws", "ws", ws_port)
wss, wss_sub = client("paho-wss", "wss", wss_port)
tcp, tcp_sub = client("paho-tcp", "tcp", tcp_port)
ws.subscribe("web/#", qos=1)
wss.subscribe("web/#", qos=1)
tcp.subscribe("web/#", qos=1)
wait(lambda: ws_sub and wss_sub and tcp_sub)
# A payload larger than one WebSocket frame's worth of small writes.
big = "x" * 100000
ws.publish("web/from-ws", "hello", qos=1).wait_for_publish(30)
wss.publish("web/from-wss", big, qos=1).wait_for_publish(30)
tcp.publish("web/from-tcp", "plain", qos=2).wait_for_publish(30)
wait(lambda: all(len(v) >= 3 for v in got.values()))
for c in (ws, wss, tcp):
    c.disconnect()
    c.loop_stop()
print(json.dumps({k: [(m["topic"], len(m["payload"]), m["qos"]) for m in v] for k, v in got.items()}))
"#;

/// paho-mqtt over `ws://` and `wss://` and over TCP, on one node: each
/// receives what the others publish, large payloads included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_over_websocket_and_secure_websocket() {
    let certs = TestCerts::new().expect("test certificates");
    let nats = NatsServer::start().await.expect("nats-server");
    let (cert, key) = (certs.cert_file.display().to_string(), certs.key_file.display().to_string());
    let node = start_node(&[nats.url()], move |c| {
        c.mqtt.ws_enabled = true;
        c.mqtt.ws_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c.mqtt.tls_enabled = true;
        c.mqtt.tls_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c.mqtt.wss_enabled = true;
        c.mqtt.wss_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c.mqtt.tls_cert_file = cert;
        c.mqtt.tls_key_file = key;
    })
    .await;
    let ws = node.mqtt_ws_addr().expect("ws listener");
    let wss = node.mqtt_wss_addr().expect("wss listener");
    let tcp = node.mqtt_addr();
    let ca = certs.ca_file.display().to_string();
    let args = vec!["127.0.0.1".to_owned(), ws.port().to_string(), wss.port().to_string(), tcp.port().to_string(), ca];
    let got = common::run_python_json(PAHO_WS, args).await;
    let expected = serde_json::json!([["web/from-ws", 5, 1], ["web/from-wss", 100000, 1], ["web/from-tcp", 5, 1]]);
    for kind in ["ws", "wss", "tcp"] {
        let mut seen: Vec<serde_json::Value> = got[kind].as_array().expect("messages").clone();
        seen.sort_by_key(|m| m[0].as_str().map(str::to_owned));
        let mut want: Vec<serde_json::Value> = expected.as_array().expect("list").clone();
        want.sort_by_key(|m| m[0].as_str().map(str::to_owned));
        assert_eq!(seen, want, "{kind} subscriber");
    }
    node.shutdown().await;
}

/// Packets split over WebSocket messages and several packets in one
/// message are read as a byte stream; a text message ends the connection;
/// a client offering only other subprotocols is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_may_span_websocket_messages() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| {
        c.mqtt.ws_enabled = true;
        c.mqtt.ws_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    })
    .await;
    let addr = node.mqtt_ws_addr().expect("ws listener");
    let open = |protocol: &'static str| async move {
        let mut request = format!("ws://{addr}/mqtt").into_client_request().expect("request");
        request.headers_mut().insert("Sec-WebSocket-Protocol", protocol.parse().expect("header"));
        let socket = tokio::net::TcpStream::connect(addr).await.expect("tcp");
        tokio_tungstenite::client_async(request, socket).await
    };
    let (mut ws, response) = open("mqtt").await.expect("handshake");
    assert_eq!(response.headers().get("Sec-WebSocket-Protocol").and_then(|v| v.to_str().ok()), Some("mqtt"));
    let connect = mqtt::connect_packet("ws-raw");
    let (head, tail) = connect.split_at(5);
    ws.send(Message::Binary(head.to_vec().into())).await.expect("send");
    ws.send(Message::Binary(tail.to_vec().into())).await.expect("send");
    // SUBSCRIBE (id 1, `a/b` at QoS 1) and PINGREQ in one message.
    let mut both = mqtt::packet(0x82, &[0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0x01]);
    both.extend([0xc0, 0x00]);
    ws.send(Message::Binary(both.into())).await.expect("send");
    let mut got = Vec::new();
    let want = [0x20, 0x02, 0x00, 0x00, 0x90, 0x03, 0x00, 0x01, 0x01, 0xd0, 0x00];
    while got.len() < want.len() {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("answer in time") {
            Some(Ok(Message::Binary(data))) => got.extend_from_slice(&data),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, want, "CONNACK, SUBACK (QoS 1), PINGRESP");
    ws.send(Message::Text("hello".into())).await.expect("send");
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a text message closes the connection");

    let refused = open("chat").await;
    assert!(refused.is_err(), "a client offering only another subprotocol is refused: {refused:?}");
    node.shutdown().await;
}
