//! The web console in a real browser: headless Chromium, driven by
//! Selenium (`console_browser.py`), against a node with NATS and Postgres.
//! Each page must render its data within a second of being loaded; a
//! screenshot of each is saved under the test's target temp dir
//! (`console/*.png`). `deploy/local/test` installs chromium,
//! chromium-driver and selenium.

mod common;

use common::{start_node, ADMIN_TOKEN};
use fluxmesh_testkit::{wait_for, NatsServer, Postgres};
use serde_json::Value;
use std::time::Duration;

const DEVICE: &str = "console-dev";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_console_page_renders_its_data_in_chromium() {
    let nats = NatsServer::start().await.expect("nats-server");
    let pg = Postgres::start_primary().await.expect("postgres");
    let url = pg.url();
    let node = start_node(&[nats.url()], move |c| {
        c.storage.primary = url;
        c.shards.checkpoint_interval_ms = 50;
    })
    .await;
    let base = format!("http://{}", node.http_addr());
    let http = common::http();

    // The console is open; its data is not.
    let page = reqwest::get(format!("{base}/console")).await.expect("GET /console");
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.expect("body").contains("/console/app.js"));
    let tail = reqwest::get(format!("{base}/api/v1/tail")).await.expect("GET tail");
    assert_eq!(tail.status().as_u16(), 401, "the tail needs the admin token");

    for t in [20.5, 21.0, 22.5, 21.5, 23.0] {
        let resp = http
            .post(format!("{base}/api/v1/devices/{DEVICE}/telemetry?channel=env/temp"))
            .header("content-type", "application/json")
            .body(format!("{{\"t\":{t},\"rh\":40}}"))
            .send()
            .await
            .expect("POST");
        assert_eq!(resp.status().as_u16(), 202);
    }
    wait_for(Duration::from_secs(30), "history rows and state", || {
        let (http, base) = (&http, &base);
        async move {
            let rows: Value =
                http.get(format!("{base}/api/v1/devices/{DEVICE}/telemetry")).send().await.ok()?.json().await.ok()?;
            let state = http.get(format!("{base}/api/v1/devices/{DEVICE}")).send().await.ok()?;
            (rows["items"].as_array()?.len() == 5 && state.status().is_success()).then_some(())
        }
    })
    .await
    .expect("stored");

    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let seen = common::run_python_json(
        include_str!("console_browser.py"),
        vec![
            base.clone(),
            ADMIN_TOKEN.to_owned(),
            DEVICE.to_owned(),
            shots.display().to_string(),
            fluxmesh_testkit::workspace_root().join("configs/plugins/echo.wat").display().to_string(),
        ],
    )
    .await;

    let anonymous = &seen["anonymous"];
    assert_eq!(anonymous["login_shown"], true, "{anonymous}");
    assert_eq!(anonymous["main"], "", "no data without a token: {anonymous}");

    let pages = &seen["pages"];
    for name in ["cluster", "device", "rules", "tail"] {
        let ms = pages[name]["ms"].as_u64().expect("render time");
        assert!(ms <= 1000, "{name} rendered in {ms} ms (> 1 s)");
        assert!(!pages[name]["address"].as_str().unwrap_or("token=").contains("token="), "the token left the address");
        assert!(shots.join(format!("{name}.png")).is_file(), "{name}: no screenshot");
    }

    let cluster = &pages["cluster"];
    let shards = u64::from(node.provisioned().shards);
    assert_eq!(cluster["shard_cells"].as_u64(), Some(shards), "{cluster}");
    assert_eq!(cluster["owned_cells"].as_u64(), Some(shards), "one node owns every shard: {cluster}");
    assert!(cluster["text"].as_str().unwrap_or_default().contains(node.node_id()), "{cluster}");
    assert!(cluster["rate"].as_str().unwrap_or_default().parse::<f64>().is_ok(), "{cluster}");

    let device = &pages["device"];
    let text = device["text"].as_str().unwrap_or_default();
    assert!(text.contains("env/temp") && text.contains("23"), "last value shown: {text}");
    let charts: Vec<&str> = device["charts"].as_array().expect("charts").iter().filter_map(Value::as_str).collect();
    assert_eq!(charts, ["env/temp rh", "env/temp t"], "one chart per numeric field from history");

    let rules = &pages["rules"];
    assert!(rules["error"].as_str().unwrap_or_default().starts_with("line 2"), "{rules}");
    assert_eq!(rules["marked_lines"], serde_json::json!(["2"]), "the failing line is marked: {rules}");
    assert!(rules["stored"].as_str().unwrap_or_default().contains("Stored rule console-rule"), "{rules}");
    let rule: Value =
        http.get(format!("{base}/api/v1/rules/console-rule")).send().await.expect("GET").json().await.expect("JSON");
    assert_eq!(rule["script"], "emit(payload);\n", "the page stored what was typed");

    assert!(rules["plugins"].as_str().unwrap_or_default().contains("console-echo"), "{rules}");
    let plugins: Value =
        http.get(format!("{base}/api/v1/plugins")).send().await.expect("GET").json().await.expect("JSON");
    assert!(plugins["plugins"].as_array().is_some_and(|p| p.iter().any(|p| p["name"] == "console-echo")), "{plugins}");

    let tail = &pages["tail"];
    assert!(tail["tail"].as_str().unwrap_or_default().contains(DEVICE), "{tail}");

    let times: Vec<String> =
        ["cluster", "device", "rules", "tail"].iter().map(|name| format!("{name} {} ms", pages[*name]["ms"])).collect();
    eprintln!("console pages rendered with their data: {}", times.join(", "));

    // An open tail does not hold the node's shutdown up: it ends with the
    // stop signal (were it left open, HTTP would wait for it until the
    // 20 s task deadline).
    let open = http.get(format!("{base}/api/v1/tail")).send().await.expect("open a tail");
    assert_eq!(open.status().as_u16(), 200);
    let started = std::time::Instant::now();
    node.shutdown().await;
    let took = started.elapsed();
    eprintln!("shutdown with a tail open: {took:?}");
    assert!(took < Duration::from_secs(10), "shutdown waited {took:?} for an open tail");
    drop(open);
}
