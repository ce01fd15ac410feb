//! Clients the project did not write: `mosquitto_pub` publishes over MQTT,
//! and a `nats-py` subscriber reads the JSON mirror.
//!
//! `deploy/local/test` installs both (Debian `mosquitto-clients`, PyPI
//! `nats-py` in `.local/venv`). Run outside it, the test fails and says
//! what is missing rather than passing without checking anything.

mod common;

use common::start_node;
use fluxmesh_testkit::{workspace_root, NatsServer};
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

fn python() -> std::path::PathBuf {
    std::env::var_os("FM_TEST_PYTHON")
        .map(Into::into)
        .unwrap_or_else(|| workspace_root().join(".local/venv/bin/python"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_to_nats_py_json_subscriber() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| c.ingest.json_mirror = vec!["tel".into()]).await;

    let mut sub = Command::new(python())
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
