//! Security: device credentials and ACLs, the admin token, TLS on MQTT and
//! to NATS, NATS credentials, limits. Real nats-server, real MQTT clients.

mod common;

use fluxmesh_node::internal_events::names;

use common::{counter, metrics, read_telemetry, start_node, telemetry_messages, test_config, Device, ADMIN_TOKEN};
use fluxmesh_testkit::mqtt;
use fluxmesh_testkit::tls::TestCerts;
use fluxmesh_testkit::{wait_for, NatsServer};
use rumqttc::{ConnectReturnCode, MqttOptions, QoS, SubscribeReasonCode, TlsConfiguration, Transport};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET_A: &str = "dev-a-secret-0123456789";

fn opts(addr: SocketAddr, client_id: &str, login: Option<(&str, &str)>) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    if let Some((user, password)) = login {
        o.set_credentials(user, password);
    }
    o
}

/// Connects once and returns the CONNACK's verdict.
async fn connack(o: MqttOptions) -> Result<(), ConnectReturnCode> {
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(o, 10);
    let verdict = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return Err(code),
                Err(e) => panic!("no CONNACK: {e}"),
            }
        }
    });
    verdict.await.expect("CONNACK in time")
}

async fn api(node: &fluxmesh_node::Node, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = common::http().request(method, format!("http://{}{path}", node.http_addr()));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("HTTP request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Telemetry frames per device in the telemetry streams.
async fn stored_per_device(client: &async_nats::Client) -> BTreeMap<String, usize> {
    let mut per = BTreeMap::new();
    for f in read_telemetry(client).await {
        *per.entry(f.device).or_default() += 1;
    }
    per
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_need_credentials_and_stay_within_their_acl() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| {
        c.auth.allow_anonymous = false;
        c.auth.failure_delay_ms = 10;
    })
    .await;
    let client = nats.client().await.expect("connect");
    let addr = node.mqtt_addr();

    assert_eq!(connack(opts(addr, "dev-a", None)).await, Err(ConnectReturnCode::NotAuthorized), "anonymous");

    let put = reqwest::Method::PUT;
    let (status, body) =
        api(&node, put.clone(), "/api/v1/devices/dev-a/credentials", Some(json!({"secret": SECRET_A}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["secrets"].as_array().map(Vec::len), Some(1), "{body}");
    assert!(body.get("secret").is_none(), "a given secret is not echoed: {body}");
    assert!(!body.to_string().contains("argon2"), "no hashes in answers: {body}");
    let (status, body) = api(
        &node,
        put.clone(),
        "/api/v1/devices/gw/credentials",
        Some(json!({"publish": ["devices/child/#"], "subscribe": ["alerts/+"]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let gw_secret = body["secret"].as_str().expect("a generated secret is returned once").to_owned();
    assert!(gw_secret.len() >= 40, "{gw_secret}");
    let (status, _) =
        api(&node, put.clone(), "/api/v1/devices/weak/credentials", Some(json!({"secret": "short"}))).await;
    assert_eq!(status, 400, "short secrets are refused");
    let (status, _) = api(
        &node,
        put.clone(),
        "/api/v1/devices/weak/credentials",
        Some(json!({"secret": SECRET_A, "publish": ["a/#/b"]})),
    )
    .await;
    assert_eq!(status, 400, "bad filters are refused");

    let wrong = "wrong-secret-0123456789";
    assert_eq!(connack(opts(addr, "dev-a", Some(("dev-a", wrong)))).await, Err(ConnectReturnCode::BadUserNamePassword));
    assert_eq!(connack(opts(addr, "nobody", Some(("", SECRET_A)))).await, Err(ConnectReturnCode::BadUserNamePassword));
    assert_eq!(
        connack(opts(addr, "dev-a", Some(("gw", SECRET_A)))).await,
        Err(ConnectReturnCode::BadUserNamePassword),
        "username must be empty or the client id"
    );

    assert_eq!(
        connack(opts(addr, "gw", Some(("gw", SECRET_A)))).await,
        Err(ConnectReturnCode::BadUserNamePassword),
        "a generated secret is the only one that lets its device in"
    );

    let a = Device::connect_with(opts(addr, "dev-a", Some(("", SECRET_A)))).await;
    a.publish("devices/dev-a/t", b"{\"n\":1}".to_vec()).await;
    a.publish("devices/dev-b/t", b"{\"n\":2}".to_vec()).await;
    a.publish("devices/dev-a/t", b"{\"n\":3}".to_vec()).await;
    a.wait_acked(3).await;
    a.client.subscribe("#", QoS::AtLeastOnce).await.expect("queue");
    a.client.subscribe("devices/dev-a/cmd", QoS::AtLeastOnce).await.expect("queue");
    let gw = Device::connect_with(opts(addr, "gw", Some(("gw", &gw_secret)))).await;
    gw.publish("devices/child/t", b"{}".to_vec()).await;
    gw.publish("devices/gw/t", b"{}".to_vec()).await;
    gw.publish("devices/other/t", b"{}".to_vec()).await;
    gw.wait_acked(3).await;
    gw.client.subscribe("alerts/x", QoS::AtLeastOnce).await.expect("queue");
    gw.client.subscribe("alerts/#", QoS::AtLeastOnce).await.expect("queue");
    for (device, expected) in [(&a, 2usize), (&gw, 2)] {
        let subacks = device.subacks.clone();
        wait_for(Duration::from_secs(10), "SUBACKs", || {
            let n = subacks.lock().expect("lock").len();
            async move { (n >= expected).then_some(()) }
        })
        .await
        .expect("SUBACKs arrive");
    }
    let codes = |d: &Device| d.subacks.lock().expect("lock").iter().flatten().cloned().collect::<Vec<_>>();
    // Its own command topic, asked at QoS 1, is granted QoS 1.
    assert_eq!(codes(&a), [SubscribeReasonCode::Failure, SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    // A granted filter, asked at QoS 1, is granted QoS 1.
    assert_eq!(codes(&gw), [SubscribeReasonCode::Success(QoS::AtLeastOnce), SubscribeReasonCode::Failure]);

    // HTTP ingest: the device's own Basic credentials or the admin token.
    let url = |d: &str| format!("http://{}/api/v1/devices/{d}/telemetry", node.http_addr());
    let plain = reqwest::Client::new();
    let post = |d: &str| plain.post(url(d)).header("content-type", "application/json").body("{}");
    assert_eq!(post("dev-a").send().await.expect("POST").status(), 401);
    assert_eq!(post("dev-a").basic_auth("dev-a", Some(SECRET_A)).send().await.expect("POST").status(), 202);
    assert_eq!(post("dev-a").basic_auth("dev-a", Some(wrong)).send().await.expect("POST").status(), 401);
    assert_eq!(post("dev-b").basic_auth("dev-a", Some(SECRET_A)).send().await.expect("POST").status(), 401);
    assert_eq!(post("dev-z").bearer_auth(ADMIN_TOKEN).send().await.expect("POST").status(), 202);

    let expected: BTreeMap<String, usize> =
        [("child", 1), ("dev-a", 3), ("dev-z", 1), ("gw", 1)].into_iter().map(|(d, n)| (d.to_owned(), n)).collect();
    assert_eq!(stored_per_device(&client).await, expected, "nothing outside an ACL entered the mesh");
    let text = metrics(&node).await;
    assert_eq!(counter(&text, &common::series(names::ACL_DENIED_TOTAL, &[("action", "publish")])), 2.0);
    assert_eq!(counter(&text, &common::series(names::ACL_DENIED_TOTAL, &[("action", "subscribe")])), 2.0);
    assert!(
        counter(
            &text,
            &common::series(names::AUTH_ATTEMPTS_TOTAL, &[("source", "mqtt"), ("result", "no_credentials")])
        ) >= 1.0
    );
    assert!(
        counter(
            &text,
            &common::series(names::AUTH_ATTEMPTS_TOTAL, &[("source", "mqtt"), ("result", "bad_credentials")])
        ) >= 2.0
    );
    assert!(
        counter(
            &text,
            &common::series(names::AUTH_ATTEMPTS_TOTAL, &[("source", "http"), ("result", "bad_credentials")])
        ) >= 1.0
    );

    // Removing the credentials ends the live session, and the device is
    // refused from then on.
    let (status, _) = api(&node, reqwest::Method::DELETE, "/api/v1/devices/dev-a/credentials", None).await;
    assert_eq!(status, 204);
    a.wait_closed().await;
    assert_eq!(connack(opts(addr, "dev-a", Some(("", SECRET_A)))).await, Err(ConnectReturnCode::BadUserNamePassword));
    let (status, _) = api(&node, reqwest::Method::GET, "/api/v1/devices/dev-a/credentials", None).await;
    assert_eq!(status, 404);
    let (status, body) = api(&node, reqwest::Method::GET, "/api/v1/devices/gw/credentials", None).await;
    assert_eq!((status, &body["publish"]), (200, &json!(["devices/child/#"])), "{body}");
    assert!(counter(&metrics(&node).await, names::MQTT_SESSIONS_REVOKED_TOTAL) >= 1.0);
    assert!(gw.alive.load(std::sync::atomic::Ordering::SeqCst), "other sessions are untouched");
    node.shutdown().await;
}

/// A credentials change made just after the node's NATS server restarted
/// (while the node is still reconnecting and its watch on the credentials
/// is being re-established) still ends the device's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_while_nats_restarts_still_ends_the_session() {
    let mut nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| {
        c.auth.allow_anonymous = false;
        c.auth.failure_delay_ms = 10;
    })
    .await;
    let (status, body) =
        api(&node, reqwest::Method::PUT, "/api/v1/devices/dev-r/credentials", Some(json!({"secret": SECRET_A}))).await;
    assert_eq!(status, 200, "{body}");
    let device = Device::connect_with(opts(node.mqtt_addr(), "dev-r", Some(("", SECRET_A)))).await;
    device.publish("devices/dev-r/t", b"{}".to_vec()).await;
    device.wait_acked(1).await;

    nats.restart().await.expect("nats-server again");
    // At once, while the node is still reconnecting.
    let js = async_nats::jetstream::new(nats.client().await.expect("connect"));
    let store = fluxmesh_node::auth::open_store(&js, &fluxmesh_schemas::Subjects::new("fm").expect("prefix"), 1)
        .await
        .expect("credentials bucket");
    assert!(fluxmesh_node::auth::remove(&store, "dev-r").await.expect("remove"), "dev-r had credentials");
    device.wait_closed().await;
    assert!(counter(&metrics(&node).await, names::MQTT_SESSIONS_REVOKED_TOTAL) >= 1.0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_the_token() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |_| {}).await;
    let plain = reqwest::Client::new();
    let base = format!("http://{}", node.http_addr());
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(plain.get(format!("{base}{open}")).send().await.expect("GET").status(), 200, "{open} is open");
    }
    for admin in ["/api/v1/cluster", "/api/v1/rules", "/api/v1/plugins", "/api/v1/devices/d/credentials"] {
        let resp = plain.get(format!("{base}{admin}")).send().await.expect("GET");
        assert_eq!(resp.status(), 401, "{admin} without a token");
        assert_eq!(resp.headers().get("www-authenticate").map(|v| v.as_bytes()), Some(&b"Bearer"[..]));
        let resp = plain.get(format!("{base}{admin}")).bearer_auth("not-the-token-at-all").send().await.expect("GET");
        assert_eq!(resp.status(), 401, "{admin} with a wrong token");
    }
    let resp = plain.get(format!("{base}/api/v1/cluster")).bearer_auth(ADMIN_TOKEN).send().await.expect("GET");
    assert_eq!(resp.status(), 200);
    let text = metrics(&node).await;
    assert!(
        counter(&text, &common::series(names::HTTP_UNAUTHORIZED_TOTAL, &[("reason", "no_token")])) >= 4.0,
        "{text}"
    );
    assert!(counter(&text, &common::series(names::HTTP_UNAUTHORIZED_TOTAL, &[("reason", "bad_token")])) >= 4.0);
    node.shutdown().await;

    // No token configured: the admin API is closed to everyone.
    let closed = start_node(&[nats.url()], |c| c.auth.admin_token = Default::default()).await;
    let resp = plain.get(format!("http://{}/api/v1/cluster", closed.http_addr())).send().await.expect("GET");
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["reason"], "admin_token_unset");
    closed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_and_nats_with_tls_and_a_password() {
    // No TLS provider is installed in this process yet (nextest runs each
    // test in its own): the node must install one itself, also when only
    // its NATS connection uses TLS.
    let certs = TestCerts::new().expect("test certificates");
    let nats_password = "nats-password-0123456789";
    let nats = NatsServer::start_with(&format!(
        "authorization {{ user: fluxmesh, password: \"{nats_password}\" }}\n\
         tls {{ cert_file: \"{}\", key_file: \"{}\" }}",
        certs.cert_file.display(),
        certs.key_file.display()
    ))
    .await
    .expect("nats-server with TLS and a password");
    let secure = |c: &mut fluxmesh_node::Config, password: &str| {
        c.nats.user = "fluxmesh".into();
        c.nats.password = fluxmesh_mesh::Secret::new(password);
        c.nats.tls_ca_file = certs.ca_file.display().to_string();
        c.mqtt.tcp_enabled = false;
        c.mqtt.tls_enabled = true;
        c.mqtt.tls_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c.mqtt.tls_cert_file = certs.cert_file.display().to_string();
        c.mqtt.tls_key_file = certs.key_file.display().to_string();
    };

    // A wrong NATS password stops the node at start, with a clear error,
    // instead of retrying forever.
    let mut cfg = test_config(&[nats.url()]);
    secure(&mut cfg, "not-the-password");
    cfg.mqtt.tls_enabled = false;
    cfg.mqtt.tcp_enabled = true;
    cfg.mqtt.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let started = tokio::time::timeout(
        Duration::from_secs(30),
        fluxmesh_node::Node::start(cfg, tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("gives up in time");
    let err = fluxmesh_mesh::error_chain(&started.expect_err("wrong password refused"));
    assert!(err.to_lowercase().contains("authorization"), "{err}");

    let node = start_node(&[nats.url()], |c| secure(c, nats_password)).await;
    let tls_addr = node.mqtt_tls_addr().expect("TLS listener");
    assert_eq!(node.mqtt_addr(), tls_addr, "plain MQTT is off");

    let mut o = opts(tls_addr, "tls-dev", None);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca: certs.ca_pem.clone().into_bytes(),
        alpn: None,
        client_auth: None,
    }));
    let dev = Device::connect_with(o).await;
    for i in 0..20u64 {
        dev.publish("devices/tls-dev/t", format!("{{\"seq\":{i}}}").into_bytes()).await;
    }
    dev.wait_acked(20).await;

    // Plain MQTT on the TLS port: the handshake fails, counted.
    let mut raw = tokio::net::TcpStream::connect(tls_addr).await.expect("tcp");
    raw.write_all(&mqtt::connect_packet("cut")).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut buf)).await.expect("closed in time");
    assert!(!buf.starts_with(&[0x20]), "no CONNACK over plain text: {buf:?}");

    let client = async_nats::ConnectOptions::with_user_and_password("fluxmesh".into(), nats_password.into())
        .add_root_certificates(certs.ca_file.clone())
        .require_tls(true)
        .connect(nats.url())
        .await
        .expect("test client over TLS");
    assert_eq!(telemetry_messages(&client).await, 20);
    let text = metrics(&node).await;
    assert!(counter(&text, names::MQTT_TLS_HANDSHAKE_FAILURES_TOTAL) >= 1.0, "{text}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_over_its_rate_is_slowed_and_loses_nothing() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| {
        c.ingest.device_rate_per_sec = 20;
        c.ingest.device_burst = 2;
    })
    .await;
    let client = nats.client().await.expect("connect");

    // MQTT: 40 QoS1 publishes at once take at least (40 - 2) / 20 s, and
    // every one is stored.
    let dev = Device::connect(node.mqtt_addr(), "fast-1").await;
    let started = Instant::now();
    for i in 0..40u64 {
        dev.publish("devices/fast-1/t", format!("{{\"seq\":{i}}}").into_bytes()).await;
    }
    dev.wait_acked(40).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1800), "40 messages at 20/s took only {took:?}");
    assert!(dev.alive.load(std::sync::atomic::Ordering::SeqCst), "slowed, not disconnected");
    assert_eq!(telemetry_messages(&client).await, 40);

    // HTTP: over the rate is a 429 with Retry-After.
    let url = format!("http://{}/api/v1/devices/fast-2/telemetry", node.http_addr());
    let mut refused = None;
    for _ in 0..20 {
        let resp = common::http().post(&url).header("content-type", "application/json").body("{}").send().await;
        let resp = resp.expect("POST");
        if resp.status() == 429 {
            refused = Some(resp);
            break;
        }
        assert_eq!(resp.status(), 202);
    }
    let refused = refused.expect("a 429 within 20 quick requests at 20/s with a burst of 2");
    assert!(refused.headers().get("retry-after").is_some());
    let text = metrics(&node).await;
    assert!(counter(&text, &common::series(names::INGEST_THROTTLED_TOTAL, &[("source", "mqtt")])) >= 1.0, "{text}");
    assert!(
        counter(
            &text,
            &common::series(names::INGEST_REJECTED_TOTAL, &[("source", "http"), ("reason", "rate_limited")])
        ) >= 1.0
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_refused_and_counted() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| c.mqtt.max_connections = 2).await;
    let addr = node.mqtt_addr();
    let _one = Device::connect(addr, "c-1").await;
    let _two = Device::connect(addr, "c-2").await;
    let mut third = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let mut buf = [0u8; 4];
    let n = tokio::time::timeout(Duration::from_secs(10), third.read(&mut buf)).await.expect("closed in time");
    assert_eq!(n.unwrap_or(0), 0, "closed at once");
    let text = metrics(&node).await;
    assert_eq!(counter(&text, &common::series(names::MQTT_REFUSED_TOTAL, &[("reason", "max_connections")])), 1.0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_credentials_in_nats_before_any_node_runs() {
    let nats = NatsServer::start().await.expect("nats-server");
    let url = nats.url();
    let cli = move |args: &[&str], stdin: Option<String>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fluxmesh"));
        cmd.arg("devices").args(args).env("FLUXMESH_NATS_URLS", &url);
        cmd.env("FLUXMESH_AUTH_HASH_MEMORY_KIB", "64").env("FLUXMESH_AUTH_HASH_ITERATIONS", "1");
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("fluxmesh devices");
        if let Some(text) = stdin {
            std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), text.as_bytes()).expect("write stdin");
        }
        child.wait_with_output().expect("fluxmesh devices finishes")
    };
    let set = tokio::task::spawn_blocking({
        let cli = cli.clone();
        move || cli(&["set", "cli-dev", "--secret-stdin", "--subscribe", "alerts/#"], Some(format!("{SECRET_A}\n")))
    })
    .await
    .expect("join");
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    let shown: Value = serde_json::from_slice(&set.stdout).expect("JSON record");
    assert_eq!(shown["subscribe"], json!(["alerts/#"]));
    assert!(!String::from_utf8_lossy(&set.stdout).contains(SECRET_A), "the secret is not echoed");

    let node = start_node(&[nats.url()], |c| {
        c.auth.allow_anonymous = false;
        c.auth.failure_delay_ms = 10;
    })
    .await;
    let addr = node.mqtt_addr();
    assert_eq!(connack(opts(addr, "cli-dev", Some(("", SECRET_A)))).await, Ok(()));

    let removed = tokio::task::spawn_blocking({
        let cli = cli.clone();
        move || cli(&["remove", "cli-dev"], None)
    })
    .await
    .expect("join");
    assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));
    assert_eq!(connack(opts(addr, "cli-dev", Some(("", SECRET_A)))).await, Err(ConnectReturnCode::BadUserNamePassword));
    let missing = tokio::task::spawn_blocking(move || cli(&["show", "cli-dev"], None)).await.expect("join");
    assert!(!missing.status.success(), "show of a removed device fails");
    node.shutdown().await;
}
