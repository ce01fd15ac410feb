//! The README's tour, run as written: `deploy/local/cluster up` (the
//! README's first command) brings up a local cluster of its own, and every
//! command of the tour's `sh` blocks runs, in order, in one bash session
//! in the checkout's place. What the README says they print is checked
//! against what they print, so the README cannot drift from the product.
//!
//! The cluster lives in a scratch copy of the checkout's layout (links to
//! its folders, a `.local` of its own), runs this build's `fluxmesh`
//! binary (FLUXMESH_BIN: nothing is built) and is taken down by its PIDs
//! (`cluster down --purge`) however the test ends. A command is typed only
//! once the one before it has finished, or, for a subscriber started with
//! `&`, once it has subscribed (what a person typing the tour does
//! without thinking).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the tour prints, as the README quotes it (each must be in the
/// README too). The JSON mirror's line is quoted up to its `…`.
const EXPECTED: &[&str] = &[
    r#"fm.json.tel.41.sensor-1.env.temp {"body":{"payload":{"t":21.5}},"channel":"env/temp","device":"sensor-1","#,
    "site/7/alarm smoke",
    r#"devices/sensor-3/env/temp {"t":4}"#,
    "site/7/door open text/plain floor:3",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("repository root")
}

/// The commands of the `sh` blocks between `## A five-line tour` and the
/// next `## ` heading.
fn tour_commands(readme: &str) -> Vec<String> {
    let start = readme.find("\n## A five-line tour").expect("the README's tour section");
    let section = &readme[start + 1..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    let mut commands = Vec::new();
    let mut in_sh = false;
    for line in section[..end].lines() {
        match line.trim() {
            "```sh" => in_sh = true,
            "```" => in_sh = false,
            l if in_sh && !l.is_empty() && !l.starts_with('#') => commands.push(line.to_owned()),
            _ => {}
        }
    }
    commands
}

/// Whether `command` runs in the background: `&` at its end, before any
/// trailing comment.
fn in_background(command: &str) -> bool {
    let code = match command.rfind(" # ") {
        Some(i) if command[..i].trim_end().ends_with('&') => &command[..i],
        _ => command,
    };
    code.trim_end().ends_with('&')
}

/// The local cluster of a scratch checkout; down (by PIDs) on drop.
struct LocalCluster {
    root: tempfile::TempDir,
}

impl LocalCluster {
    fn up() -> LocalCluster {
        let repo = repo();
        let root = tempfile::Builder::new().prefix("fluxmesh-tour-").tempdir().expect("scratch dir");
        // Postgres runs as its own user when this runs as root: it must be
        // able to reach its data dir.
        std::fs::set_permissions(root.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod scratch dir");
        for entry in std::fs::read_dir(&repo).expect("read repository").flatten() {
            let name = entry.file_name();
            if name == ".local" || name == "target" || name == ".git" {
                continue;
            }
            std::os::unix::fs::symlink(entry.path(), root.path().join(&name)).expect("link checkout entry");
        }
        // The Python environment deploy/local/test made (nats-py, nats-server).
        std::fs::create_dir_all(root.path().join(".local")).expect(".local");
        let venv = repo.join(".local/venv");
        if venv.exists() {
            std::os::unix::fs::symlink(&venv, root.path().join(".local/venv")).expect("link venv");
        }
        let cluster = LocalCluster { root };
        let out = cluster.script(&["up"]).output().expect("run deploy/local/cluster up");
        assert!(
            out.status.success(),
            "deploy/local/cluster up failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster
    }

    fn path(&self) -> &Path {
        self.root.path()
    }

    fn script(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.path().join("deploy/local/cluster"));
        cmd.args(args).current_dir(self.path()).env("FLUXMESH_BIN", env!("CARGO_BIN_EXE_fluxmesh"));
        cmd
    }

    /// `KEY=value` from the cluster's endpoints.env.
    fn endpoint(&self, key: &str) -> String {
        let env = std::fs::read_to_string(self.path().join(".local/cluster/endpoints.env")).expect("endpoints.env");
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_owned())
            .unwrap_or_else(|| panic!("{key} not in endpoints.env"))
    }

    /// MQTT subscriptions (filters) held by the nodes, summed.
    fn subscriptions(&self) -> f64 {
        let mut sum = 0.0;
        for i in 1..=3 {
            let addr = self.endpoint(&format!("FLUXMESH_NODE{i}_HTTP"));
            let Ok(body) = get_metrics(&addr) else { continue };
            sum += common::counter(&body, fluxmesh_node::internal_events::names::MQTT_SUBSCRIPTIONS);
        }
        sum
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        match self.script(&["down", "--purge"]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("cluster down failed: {}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => eprintln!("cluster down did not run: {e}"),
        }
    }
}

/// GET /metrics over a plain socket, so this test needs no runtime.
fn get_metrics(addr: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// One bash session the tour is typed into; its output, line by line.
struct Session {
    child: Child,
    stdin: ChildStdin,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Session {
    fn start(dir: &Path) -> Session {
        let mut child = Command::new("bash")
            .args(["--noprofile", "--norc"])
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bash");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        for (pipe, lines) in [
            (Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>, stdout.clone()),
            (Box::new(child.stderr.take().expect("stderr")), stderr.clone()),
        ] {
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    lines.lock().expect("output lock").push(line);
                }
            });
        }
        Session { child, stdin, stdout, stderr }
    }

    fn type_line(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to bash");
        self.stdin.flush().expect("flush to bash");
    }

    fn output(&self) -> String {
        self.stdout.lock().expect("output lock").join("\n")
    }

    fn errors(&self) -> String {
        self.stderr.lock().expect("output lock").join("\n")
    }

    /// Polls `check` until it holds or `timeout` passes.
    fn wait_until(&self, timeout: Duration, what: &str, mut check: impl FnMut(&Session) -> bool) {
        let deadline = Instant::now() + timeout;
        while !check(self) {
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}\nstdout:\n{}\nstderr:\n{}",
                self.output(),
                self.errors()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Background jobs (the NATS subscriber runs until stopped), then bash.
        let _ = writeln!(self.stdin, "kill $(jobs -p) 2>/dev/null; exit 0");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_readme_tour_works_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    // Prose wraps: compare with every run of whitespace as one space.
    let prose = readme.split_whitespace().collect::<Vec<_>>().join(" ");
    for quoted in EXPECTED {
        assert!(prose.contains(quoted), "the README no longer says the tour prints {quoted:?}: update this test");
    }
    let commands = tour_commands(&readme);
    assert!(commands.len() >= 8, "the tour's commands were not found: {commands:?}");
    assert!(commands[0].starts_with("source .local/cluster/endpoints.env"), "{commands:?}");

    let cluster = LocalCluster::up();
    let mut bash = Session::start(cluster.path());
    for (i, command) in commands.iter().enumerate() {
        let subscriptions = cluster.subscriptions();
        bash.type_line(command);
        // On a line of its own: curl's answer ends without a newline.
        bash.type_line(&format!("__rc=$?; printf '\\n@@step {i} rc=%s\\n' \"$__rc\""));
        let marker = format!("@@step {i} rc=");
        bash.wait_until(Duration::from_secs(60), &format!("`{command}` to finish"), |s| s.output().contains(&marker));
        let out = bash.output();
        let rc = out.lines().find_map(|l| l.strip_prefix(marker.as_str())).unwrap_or_default().to_owned();
        assert_eq!(rc, "0", "`{command}` failed (exit {rc})\nstdout:\n{out}\nstderr:\n{}", bash.errors());

        if in_background(command) && command.contains("nats-sub") {
            bash.wait_until(Duration::from_secs(60), "the NATS subscriber to subscribe", |s| {
                s.errors().contains("# subscribed to")
            });
        } else if in_background(command) && command.contains("mosquitto_sub") {
            let filters = command.matches(" -t ").count() as f64;
            bash.wait_until(Duration::from_secs(30), "the MQTT subscriber's subscriptions", |_| {
                cluster.subscriptions() >= subscriptions + filters
            });
        }
    }
    for expected in EXPECTED {
        bash.wait_until(Duration::from_secs(30), &format!("the tour to print {expected:?}"), |s| {
            s.output().lines().any(|l| l.starts_with(expected))
        });
    }
    let out = bash.output();
    // The HTTP ingest answered that it stored the message, and node 1's
    // metrics counted the MQTT one.
    assert!(out.contains(r#""duplicate":false"#), "the HTTP ingest's answer:\n{out}");
    assert!(
        out.lines().any(|l| l.starts_with(r#"fluxmesh_ingest_messages_total{source="mqtt"}"#)),
        "node 1's ingest metrics:\n{out}"
    );
}
