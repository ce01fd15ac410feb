//! Real PostgreSQL servers for tests: a primary, and hot standbys streaming
//! from it (`pg_basebackup -R`), each in its own temporary data dir on a
//! free loopback port, with trust auth for loopback only. Stopped (SIGQUIT,
//! then SIGKILL) and removed on drop.
//!
//! The binaries are found in `$FM_PG_BIN` (a `bin/` dir), else in the newest
//! `/usr/lib/postgresql/*/bin`. `initdb` and the server refuse to run as
//! root, so when the tests run as root they run as the `postgres` user,
//! which then owns the data dirs.

use crate::{free_port, wait_for, START_ATTEMPTS};
use anyhow::{bail, Context as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The directory with `initdb`, `postgres` and `pg_basebackup`.
pub fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("FM_PG_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).context(
        "PostgreSQL server binaries not found: run deploy/local/test (it installs postgresql), or set FM_PG_BIN",
    )
}

/// The uid and gid to run Postgres as: the `postgres` user when we are
/// root, else ourselves (`None`).
fn run_as() -> anyhow::Result<Option<(u32, u32)>> {
    let uid = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .context("effective uid not in /proc/self/status")?;
    if uid != "0" {
        return Ok(None);
    }
    let id = |flag: &str| -> anyhow::Result<u32> {
        let out = Command::new("id").arg(flag).arg("postgres").output()?;
        anyhow::ensure!(out.status.success(), "no `postgres` user to run PostgreSQL as (it refuses root)");
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok(Some((id("-u")?, id("-g")?)))
}

/// One running PostgreSQL server.
#[derive(Debug)]
pub struct Postgres {
    child: Option<Child>,
    pub port: u16,
    /// Extra `-c name=value` settings, after the defaults.
    settings: Vec<String>,
    bin: PathBuf,
    data: PathBuf,
    user: Option<(u32, u32)>,
    dir: tempfile::TempDir,
}

impl Postgres {
    /// A primary that standbys can stream from.
    pub async fn start_primary() -> anyhow::Result<Postgres> {
        Self::start_primary_with(&[]).await
    }

    /// A primary with extra `name=value` settings (they win over the
    /// test defaults: `fsync=on` for a benchmark, say).
    pub async fn start_primary_with(settings: &[&str]) -> anyhow::Result<Postgres> {
        let bin = postgres_bin_dir()?;
        let user = run_as()?;
        let dir = tempfile::tempdir()?;
        chown(dir.path(), user)?;
        let data = dir.path().join("data");
        let status = command(&bin.join("initdb"), user)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("initdb.log"))?)
            .status()
            .context("running initdb")?;
        if !status.success() {
            bail!("initdb failed: {}", std::fs::read_to_string(dir.path().join("initdb.log")).unwrap_or_default());
        }
        let settings = settings.iter().map(|s| s.to_string()).collect();
        Self::launch_new(bin, data, user, dir, settings).await
    }

    /// A hot standby of `primary`, streaming from it.
    pub async fn start_standby(primary: &Postgres) -> anyhow::Result<Postgres> {
        let dir = tempfile::tempdir()?;
        chown(dir.path(), primary.user)?;
        let data = dir.path().join("data");
        let status = command(&primary.bin.join("pg_basebackup"), primary.user)
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string(), "-U", "postgres", "-R", "-X", "stream", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("basebackup.log"))?)
            .status()
            .context("running pg_basebackup")?;
        if !status.success() {
            bail!(
                "pg_basebackup failed: {}",
                std::fs::read_to_string(dir.path().join("basebackup.log")).unwrap_or_default()
            );
        }
        Self::launch_new(primary.bin.clone(), data, primary.user, dir, primary.settings.clone()).await
    }

    async fn launch_new(
        bin: PathBuf,
        data: PathBuf,
        user: Option<(u32, u32)>,
        dir: tempfile::TempDir,
        settings: Vec<String>,
    ) -> anyhow::Result<Postgres> {
        let mut pg = Postgres { child: None, port: free_port()?, settings, bin, data, user, dir };
        let mut attempt = 1;
        loop {
            pg.launch()?;
            match pg.wait_ready().await {
                Ok(()) => return Ok(pg),
                Err(_) if attempt < START_ATTEMPTS && pg.log().contains("could not bind") => {
                    attempt += 1;
                    pg.stop();
                    pg.port = free_port()?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("postgres.log"))?;
        chown(&self.dir.path().join("postgres.log"), self.user)?;
        let child = command(&self.bin.join("postgres"), self.user)
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.path().display()))
            // Tests want speed; a crash of the process (not of the machine)
            // loses nothing with fsync off.
            .args(["-c", "fsync=off", "-c", "full_page_writes=off", "-c", "shared_buffers=64MB"])
            .args(["-c", "wal_level=replica", "-c", "max_wal_senders=8", "-c", "hot_standby=on"])
            .args(["-c", "hot_standby_feedback=on", "-c", "wal_receiver_status_interval=1s"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        self.child = Some(child);
        Ok(())
    }

    /// Polls until the server takes connections (a standby: read-only
    /// ones); fails at once if it exited.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let url = self.url();
        let child = &mut self.child;
        let ready = wait_for(Duration::from_secs(30), "postgres accepting connections", || {
            let exited = child.as_mut().is_none_or(|c| !matches!(c.try_wait(), Ok(None)));
            let url = url.clone();
            async move {
                if exited {
                    return Some(false);
                }
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.ok()?;
                tokio::spawn(conn);
                client.simple_query("SELECT 1").await.ok().map(|_| true)
            }
        })
        .await
        .with_context(|| format!("postgres log:\n{}", self.log()))?;
        anyhow::ensure!(ready, "postgres exited; its log:\n{}", self.log());
        Ok(())
    }

    /// `postgres://postgres@127.0.0.1:{port}/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's log so far (for failing tests).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// A client connection (its connection task runs on the current runtime).
    pub async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// Crashes the server: SIGQUIT (immediate shutdown, no checkpoint; the
    /// next start recovers from WAL) and waits for it to exit.
    pub fn crash(&mut self) {
        self.stop();
    }

    /// Promotes a standby to primary (`pg_ctl promote`, waiting until it
    /// takes writes).
    pub async fn promote(&self) -> anyhow::Result<()> {
        let status = command(&self.bin.join("pg_ctl"), self.user)
            .arg("promote")
            .arg("-w")
            .arg("-D")
            .arg(&self.data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running pg_ctl promote")?;
        anyhow::ensure!(status.success(), "pg_ctl promote failed; postgres log:\n{}", self.log());
        let client = self.client().await?;
        wait_for(Duration::from_secs(30), "the promoted server takes writes", || {
            let query = client.query_one("SELECT pg_is_in_recovery()", &[]);
            async move { query.await.ok().filter(|row| !row.get::<_, bool>(0)).map(|_| ()) }
        })
        .await
    }

    /// Starts the server again on the same port and data dir.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.launch()?;
        self.wait_ready().await
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = Command::new("kill").arg("-QUIT").arg(child.id().to_string()).status();
        for _ in 0..500 {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn command(program: &Path, user: Option<(u32, u32)>) -> Command {
    let mut c = Command::new(program);
    if let Some((uid, gid)) = user {
        c.uid(uid).gid(gid);
        // Its own HOME, so tools never look in root's.
        c.env("HOME", "/tmp");
    }
    c
}

fn chown(path: &Path, user: Option<(u32, u32)>) -> anyhow::Result<()> {
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}
