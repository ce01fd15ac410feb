//! WebAssembly plugins through the HTTP API, called from rules: a normal
//! plugin's output reaches an event frame; plugins that loop forever, grow
//! memory without bound or trap become error frames and counters, and the
//! node goes on serving.

mod common;

use fluxmesh_node::internal_events::names;

use common::{next_frame_where, start_node};
use fluxmesh_schemas::{Body, Frame, Kind};
use fluxmesh_testkit::{wait_for, NatsServer};
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;

fn example(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/plugins").join(format!("{name}.wat"));
    std::fs::read(path).expect("example plugin")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_are_uploaded_called_from_rules_and_contained() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| c.plugins.fuel_per_call = 1_000_000).await;
    let base = format!("http://{}", node.http_addr());
    let http = common::http();

    // Not WebAssembly: 400, nothing stored.
    let resp = http.put(format!("{base}/api/v1/plugins/junk")).body("(module (func").send().await.expect("PUT");
    assert_eq!(resp.status().as_u16(), 400);
    let err: Value = resp.json().await.expect("JSON");
    assert!(err["error"].as_str().unwrap_or_default().contains("not WebAssembly"), "{err}");

    for name in ["echo", "spin", "hog", "crash"] {
        let resp = http.put(format!("{base}/api/v1/plugins/{name}")).body(example(name)).send().await.expect("PUT");
        assert_eq!(resp.status().as_u16(), 200, "{name}: {}", resp.text().await.unwrap_or_default());
    }
    wait_for(Duration::from_secs(20), "all four plugins loaded", || {
        let (http, base) = (&http, &base);
        async move {
            let v: Value = http.get(format!("{base}/api/v1/plugins")).send().await.ok()?.json().await.ok()?;
            let list = v["plugins"].as_array()?.clone();
            (list.len() == 4 && list.iter().all(|p| p["loaded"] == true)).then_some(())
        }
    })
    .await
    .expect("loaded");

    // One rule per plugin, on its own channel. The echo rule goes last:
    // the watch applies rules in order, so once the echo answers, the
    // others are in place too.
    for name in ["spin", "hog", "crash", "echo"] {
        let rule = json!({"channel": name, "script": format!("emit(plugin(\"{name}\", payload));")});
        let resp = http.put(format!("{base}/api/v1/rules/call-{name}")).json(&rule).send().await.expect("PUT");
        assert_eq!(resp.status().as_u16(), 200);
    }

    let client = nats.client().await.expect("client");
    let mut events = client.subscribe("fm.evt.*.wasm-dev.*").await.expect("subscribe");
    client.flush().await.expect("flush");
    let post = |channel: &'static str| {
        let (http, base) = (&http, &base);
        async move {
            let url = format!("{base}/api/v1/devices/wasm-dev/telemetry?channel={channel}");
            let resp = http.post(url).json(&json!({"t": 21.5})).send().await.expect("POST");
            assert_eq!(resp.status().as_u16(), 202);
        }
    };
    // Rules reach the worker through a watch: resend until the echo works.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    'echo: loop {
        assert!(tokio::time::Instant::now() < deadline, "no event from the echo plugin");
        post("echo").await;
        while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(300), events.next()).await {
            let f = Frame::decode(&msg.payload).expect("frame");
            if let (Kind::Event, Body::Event { json }) = (f.kind(), &f.body) {
                let v: Value = serde_json::from_slice(json).expect("JSON");
                assert_eq!(v, json!({"echo": {"t": 21.5}}));
                assert_eq!(f.producer, "rule:call-echo");
                break 'echo;
            }
        }
    }

    for (channel, expect) in [("spin", "fuel"), ("hog", "memory limit"), ("crash", "trapped")] {
        post(channel).await;
        let what = format!("an error frame from {channel}");
        let f = next_frame_where(&mut events, Duration::from_secs(20), &what, |f| f.kind() == Kind::Error).await;
        let Body::Error { message } = &f.body else { unreachable!("an error frame") };
        assert!(message.contains(expect), "{channel}: {message}");
        assert_eq!(f.producer, format!("rule:call-{channel}"));
    }

    // Still serving: the echo plugin answers again, and the failures were
    // counted by reason.
    post("echo").await;
    next_frame_where(&mut events, Duration::from_secs(20), "echo again", |f| f.kind() == Kind::Event).await;
    let text = common::metrics(&node).await;
    for (plugin, reason) in [("spin", "timeout"), ("hog", "memory"), ("crash", "trap")] {
        let name = common::series(names::PLUGIN_ERRORS_TOTAL, &[("plugin", plugin), ("reason", reason)]);
        assert!(common::counter(&text, &name) >= 1.0, "{name} not counted");
    }
    assert!(common::counter(&text, &common::series(names::PLUGIN_POOL_HITS_TOTAL, &[("plugin", "echo")])) >= 1.0);

    let resp = http.delete(format!("{base}/api/v1/plugins/crash")).send().await.expect("DELETE");
    assert_eq!(resp.status().as_u16(), 204);
    let resp = http.delete(format!("{base}/api/v1/plugins/crash")).send().await.expect("DELETE");
    assert_eq!(resp.status().as_u16(), 404);
    node.shutdown().await;
}
