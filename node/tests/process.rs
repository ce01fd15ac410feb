//! What the `fluxmesh run` process sets for itself at start, read from
//! `/proc` of the real binary: transparent huge pages off unless
//! `runtime.transparent_huge_pages` asks for them.
//!
//! The node is pointed at a NATS port nobody listens on, so it stays in
//! its start, retrying, with its config loaded and its process set up;
//! its "NATS not reachable yet" line says it got that far.

use fluxmesh_testkit::free_port;
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A `fluxmesh run` child, killed (by its own handle) when dropped.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `fluxmesh run` on loopback ports with `env` on top, and waits
/// (at most 30 s) until it logs that it is retrying NATS.
fn start_waiting_for_nats(env: &[(&str, &str)]) -> Node {
    let nobody = free_port().expect("free port");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fluxmesh"));
    cmd.arg("run")
        .env("FLUXMESH_NATS_URLS", format!("nats://127.0.0.1:{nobody}"))
        .env("FLUXMESH_NATS_CONNECT_TIMEOUT_MS", "200")
        .env("FLUXMESH_HTTP_LISTEN", format!("127.0.0.1:{}", free_port().expect("free port")))
        .env("FLUXMESH_MQTT_LISTEN", format!("127.0.0.1:{}", free_port().expect("free port")))
        .env("FLUXMESH_LOG_FORMAT", "text")
        .env("RUST_LOG", "warn")
        .env_remove("FLUXMESH_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn fluxmesh run");
    let stderr = child.stderr.take().expect("stderr");
    let node = Node(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("NATS not reachable yet") => return node,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no \"NATS not reachable yet\" within 30 s; the node said:\n{}", seen.join("\n")),
        }
    }
}

/// `THP_enabled` of the process, or `None` where the kernel does not show it.
fn thp_enabled(node: &Node) -> Option<u8> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.0.id())).expect("read /proc status");
    status.lines().find_map(|l| l.strip_prefix("THP_enabled:")).map(|v| v.trim().parse().expect("0 or 1"))
}

#[test]
fn the_node_turns_transparent_huge_pages_off_for_itself_unless_configured() {
    let default = start_waiting_for_nats(&[]);
    let Some(off) = thp_enabled(&default) else {
        eprintln!("this kernel does not show THP_enabled in /proc/PID/status; nothing to check");
        return;
    };
    assert_eq!(off, 0, "by default the node runs without transparent huge pages");
    drop(default);

    let wanted = start_waiting_for_nats(&[("FLUXMESH_RUNTIME_TRANSPARENT_HUGE_PAGES", "true")]);
    assert_eq!(thp_enabled(&wanted), Some(1), "runtime.transparent_huge_pages = true leaves them on");
}
