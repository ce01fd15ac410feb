//! The `fluxmesh` CLI against a real node and NATS: rules, plugins,
//! cluster status and tail, with the exit codes scripts rely on.

mod common;

use common::{start_node, ADMIN_TOKEN};
use fluxmesh_testkit::{wait_for, NatsServer};
use serde_json::Value;
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Runs `fluxmesh ARGS` (blocking, on a thread of its own) with the
/// token and node URL in the environment unless `env` overrides them.
async fn fluxmesh(args: &[&str], env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fluxmesh"));
        cmd.args(&args).env_remove("FLUXMESH_ADMIN_TOKEN").env_remove("FLUXMESH_URL");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run fluxmesh")
    })
    .await
    .expect("join")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(out.status.code(), Some(code), "{what}: stdout {} stderr {}", stdout(out), stderr(out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_rules_and_plugins_and_shows_the_cluster() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |_| {}).await;
    let url = node.http_addr().to_string();
    let env = [("FLUXMESH_URL", url.as_str()), ("FLUXMESH_ADMIN_TOKEN", ADMIN_TOKEN)];
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("hot.rhai");
    std::fs::write(&good, "if payload.t > 30.0 { alert(\"warning\", \"hot\"); }\n").expect("write");
    let bad = dir.path().join("bad.rhai");
    std::fs::write(&bad, "let x = 1;\nlet y = ;\n").expect("write");

    // Rules: put, list, get, a script that does not compile, rm.
    let out = fluxmesh(&["rules", "put", "hot", good.to_str().expect("utf-8"), "--channel", "env/*"], &env).await;
    assert_exit(&out, 0, "rules put");
    assert!(stdout(&out).contains("stored rule `hot`"), "{}", stdout(&out));
    let out = fluxmesh(&["rules", "list"], &env).await;
    assert_exit(&out, 0, "rules list");
    let listed = stdout(&out);
    assert!(
        listed.starts_with("ID") && listed.lines().any(|l| l.starts_with("hot ") && l.contains("env/*")),
        "{listed}"
    );
    let out = fluxmesh(&["rules", "get", "hot"], &env).await;
    assert_exit(&out, 0, "rules get");
    let rule: Value = serde_json::from_slice(&out.stdout).expect("rule JSON");
    assert_eq!(rule["channel"], "env/*");
    assert!(rule["script"].as_str().unwrap_or_default().contains("alert"), "{rule}");
    let out = fluxmesh(&["rules", "put", "broken", bad.to_str().expect("utf-8")], &env).await;
    assert_exit(&out, 4, "a script that does not compile");
    assert!(stderr(&out).contains(&format!("{}:2:", bad.display())), "names the file and line: {}", stderr(&out));
    let out = fluxmesh(&["rules", "get", "broken"], &env).await;
    assert_exit(&out, 3, "nothing was stored");
    let out = fluxmesh(&["rules", "rm", "hot"], &env).await;
    assert_exit(&out, 0, "rules rm");
    let out = fluxmesh(&["rules", "rm", "hot"], &env).await;
    assert_exit(&out, 3, "rules rm twice");
    let out = fluxmesh(&["rules", "list", "--json"], &env).await;
    let listed: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(listed["rules"].as_array().map(Vec::len), Some(0), "{listed}");

    // Plugins: put, list, a module that is not WebAssembly, rm.
    let echo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/plugins/echo.wat");
    let out = fluxmesh(&["plugins", "put", "echo", echo.to_str().expect("utf-8")], &env).await;
    assert_exit(&out, 0, "plugins put");
    wait_for(Duration::from_secs(20), "echo loaded", || async {
        let out = fluxmesh(&["plugins", "list"], &env).await;
        stdout(&out).lines().any(|l| l.starts_with("echo ") && l.trim_end().ends_with("yes")).then_some(())
    })
    .await
    .expect("plugin listed and loaded");
    let junk = dir.path().join("junk.wat");
    std::fs::write(&junk, "(module (func").expect("write");
    let out = fluxmesh(&["plugins", "put", "junk", junk.to_str().expect("utf-8")], &env).await;
    assert_exit(&out, 4, "not WebAssembly");
    let out = fluxmesh(&["plugins", "rm", "echo"], &env).await;
    assert_exit(&out, 0, "plugins rm");
    let out = fluxmesh(&["plugins", "rm", "echo"], &env).await;
    assert_exit(&out, 3, "plugins rm twice");

    // Cluster status: this node holds every shard once it has claimed them.
    let shards = node.provisioned().shards;
    wait_for(Duration::from_secs(20), "the node holds every shard", || async {
        let out = fluxmesh(&["cluster", "status"], &env).await;
        let text = stdout(&out);
        let row = text.lines().find(|l| l.starts_with(node.node_id()))?.to_owned();
        let held: u32 = row.split_whitespace().nth(1)?.parse().ok()?;
        (held == shards && text.contains("without an owner: 0")).then_some(())
    })
    .await
    .expect("cluster status");

    // Errors: no token, a wrong token, no node there, a missing file.
    let out = fluxmesh(&["rules", "list"], &[("FLUXMESH_URL", url.as_str())]).await;
    assert_exit(&out, 4, "no token");
    assert!(stderr(&out).contains("FLUXMESH_ADMIN_TOKEN"), "{}", stderr(&out));
    let out = fluxmesh(&["rules", "list", "--token", "wrong"], &[("FLUXMESH_URL", url.as_str())]).await;
    assert_exit(&out, 4, "wrong token");
    assert!(stderr(&out).contains("401"), "{}", stderr(&out));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let out = fluxmesh(&["cluster", "status", "--url", &closed.to_string()], &env).await;
    assert_exit(&out, 1, "no node there");
    assert!(stderr(&out).contains("cannot reach the node"), "{}", stderr(&out));
    let out = fluxmesh(&["plugins", "put", "x", "/nonexistent/x.wasm"], &env).await;
    assert_exit(&out, 2, "missing file");

    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_frames_and_json_as_json_lines() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |_| {}).await;
    let base = format!("http://{}", node.http_addr());

    let mut tail = Command::new(env!("CARGO_BIN_EXE_fluxmesh"))
        .args(["tail", "fm.tel.>", "--nats", &nats.url(), "--count", "2", "--seconds", "60"])
        .env_remove("FLUXMESH_NATS_URLS")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fluxmesh tail");
    // Publish only once it says it is subscribed.
    let mut err = BufReader::new(tail.stderr.take().expect("stderr"));
    let mut line = String::new();
    let said = tokio::task::spawn_blocking(move || err.read_line(&mut line).map(|_| line)).await.expect("join");
    assert!(said.as_deref().unwrap_or_default().starts_with("# tailing fm.tel.>"), "{said:?}");

    let http = common::http();
    for (device, t) in [("tail-1", 1), ("tail-2", 2)] {
        let resp = http
            .post(format!("{base}/api/v1/devices/{device}/telemetry?channel=env/temp"))
            .header("content-type", "application/json")
            .body(format!("{{\"t\":{t}}}"))
            .send()
            .await
            .expect("POST");
        assert_eq!(resp.status().as_u16(), 202);
    }
    let out = tokio::task::spawn_blocking(move || tail.wait_with_output()).await.expect("join").expect("tail output");
    assert!(out.status.success(), "tail exits 0 after --count: {out:?}");
    let lines: Vec<Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).expect("each line is JSON")).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let mut devices: Vec<&str> = lines.iter().filter_map(|l| l["frame"]["device"].as_str()).collect();
    devices.sort_unstable();
    assert_eq!(devices, ["tail-1", "tail-2"], "{lines:?}");
    assert!(lines.iter().all(|l| l["frame"]["kind"] == "telemetry" && l["subject"].is_string()), "{lines:?}");

    node.shutdown().await;
}
