//! fluxmesh-loadgen: simulated MQTT devices against one or more nodes, with
//! a NATS subscriber measuring what the mesh delivers.
//!
//! Each device is a real MQTT client (rumqttc) publishing to
//! `devices/{id}/load` at its share of the target rate. Payloads start with
//! the send time (µs since the epoch, u64 LE) and a sequence number, so the
//! subscriber on `fm.tel.>` measures publish → receipt latency. Runs for a
//! bounded time and stops by itself; targets must be loopback addresses.
//!
//! ```text
//! fluxmesh-loadgen --mqtt 127.0.0.1:1883 --nats nats://127.0.0.1:4222 \
//!     --devices 10 --rate 20000 --qos 1 --payload 64 --duration 20
//! ```
//!
//! Against a secured cluster (`deploy/local/cluster up --secure`), devices
//! connect over TLS with a secret, and the subscriber over TLS with a user:
//!
//! ```text
//! fluxmesh-loadgen --mqtt "$FLUXMESH_MQTT_TLS" --tls-ca "$FLUXMESH_CA_FILE" --secret "$SECRET" \
//!     --nats "$FLUXMESH_NATS_URLS" --nats-ca "$FLUXMESH_CA_FILE" ...   # user/password from env
//! ```

use anyhow::{bail, Context as _};
use clap::Parser;
use fluxmesh_schemas::{shard_of, DeviceTopic, Frame, Subjects};
use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::IntoFuture as _;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Parser)]
#[command(about = "Simulated MQTT devices; measures delivery to a NATS subscriber")]
struct Args {
    /// Node MQTT listeners (host:port); devices are spread over them.
    #[arg(long, required = true, value_delimiter = ',')]
    mqtt: Vec<SocketAddr>,
    /// NATS servers for the measuring subscriber.
    #[arg(long, default_value = "nats://127.0.0.1:4222", value_delimiter = ',')]
    nats: Vec<String>,
    /// Devices connect with MQTT over TLS, checking the nodes' certificate
    /// against this PEM CA bundle (server name: the --mqtt host).
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// MQTT password of every device (its user name is its client id).
    #[arg(long, env = "FLUXMESH_DEVICE_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// NATS user of the subscriber (and verifier), with --nats-password.
    #[arg(long, env = "FLUXMESH_NATS_USER")]
    nats_user: Option<String>,
    #[arg(long, env = "FLUXMESH_NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// Connect to NATS over TLS only, checking the servers' certificate
    /// against this PEM CA bundle.
    #[arg(long, value_name = "PEM")]
    nats_ca: Option<PathBuf>,
    /// Subject the subscriber measures.
    #[arg(long, default_value = "fm.tel.>")]
    subject: String,
    /// Simulated devices (one MQTT connection each).
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Target total publish rate in msg/s; 0 publishes as fast as the
    /// broker accepts.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// MQTT QoS: 0 or 1.
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Payload size in bytes (at least 16).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Send JSON payloads, `{"sent_us":"…","seq":"…","t":…,"pad":"…"}`,
    /// padded to --payload bytes (at least 80), instead of binary ones: so
    /// rules and aggregation have fields to work on. `t` cycles 0.5 … 59.5.
    #[arg(long)]
    json: bool,
    /// Seconds of publishing (at most 600).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Device id prefix.
    #[arg(long, default_value = "load")]
    prefix: String,
    /// After the run, read the telemetry stream back and count PUBACKed
    /// messages that are not in it (QoS1 only).
    #[arg(long)]
    verify: bool,
    /// The telemetry stream to read for --verify; by default every
    /// partition's stream (`{PREFIX}_TEL_{p}`, as the cluster agreed).
    #[arg(long)]
    stream: Option<String>,
    /// With --verify: also check that the shard workers applied every
    /// stored message exactly once (device states in the shards'
    /// checkpoint logs, `{PREFIX}_CKPT`) and
    /// derived every state frame exactly once (`{PREFIX}_EVT`, seq 1..n).
    #[arg(long)]
    verify_processing: bool,
    /// Shards in the cluster (for the state keys).
    #[arg(long, default_value_t = 64)]
    shards: u32,
    /// Subject prefix the nodes publish under (for --peer jetstream).
    #[arg(long, default_value = "fm")]
    subject_prefix: String,
    /// After the mesh run, run the same load against a peer in the same
    /// process and print the ratio. `jetstream`: every simulated device
    /// publishes its frames straight to JetStream with async-nats (same
    /// subjects, headers and ack window as a node), with no MQTT and no
    /// node: the floor the mesh's latency and ceiling its rate can reach.
    #[arg(long, value_parser = ["jetstream"], conflicts_with = "no_subscriber")]
    peer: Option<String>,
    /// Run no measuring subscriber: only the devices' PUBACKs are counted
    /// (`acked_rate`, QoS1 only), so the measuring tool takes no share of
    /// the machine's CPU or of the mesh's NATS traffic. --verify still
    /// checks the stream after the run.
    #[arg(long)]
    no_subscriber: bool,
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    received: AtomicU64,
    /// MQTT reconnects after a failed connection.
    reconnects: AtomicU64,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// What one measured run delivered.
struct Outcome {
    sent: u64,
    acked: u64,
    received: u64,
    /// Received by the subscriber during publishing / publishing time
    /// (None without a subscriber).
    rate: Option<f64>,
    /// PUBACKs during publishing / publishing time: QoS1 throughput as the
    /// devices see it.
    acked_rate: f64,
    peak: u64,
    reconnects: u64,
    hist: Option<Histogram<u64>>,
    /// Send → the frame's `received_time_us` (set where the frame is made).
    to_frame: Option<Histogram<u64>>,
    /// QoS1 over MQTT: the longest PUBACK gap of any device (see [`AckGaps`]).
    puback_gap: Option<LongestGap>,
}

/// The longest PUBACK gap of a run, and how many devices had one over 1 s.
struct LongestGap {
    gap_us: u64,
    from_us: u64,
    device: String,
    devices_over_1s: usize,
}

impl Outcome {
    fn print(&self, label: &str) {
        println!(
            "[{label}] sent={} acked={} received={} missing={} reconnects={}",
            self.sent,
            self.acked,
            self.received,
            self.sent.saturating_sub(self.received),
            self.reconnects
        );
        match self.rate {
            Some(rate) => println!(
                "[{label}] delivered_rate={rate:.0} msg/s (received during publishing / publishing time), peak_second={} msg/s",
                self.peak
            ),
            None => println!("[{label}] delivered_rate: not measured (--no-subscriber)"),
        }
        println!("[{label}] acked_rate={:.0} msg/s (PUBACKs during publishing / publishing time)", self.acked_rate);
        if let Some(g) = &self.puback_gap {
            println!(
                "[{label}] max_puback_gap_ms={} device={} from_unix_ms={} devices_over_1s={} (longest time a device went without a PUBACK while publishing)",
                g.gap_us / 1000,
                g.device,
                g.from_us / 1000,
                g.devices_over_1s
            );
        }
        if let Some(h) = &self.hist {
            println!(
                "[{label}] latency_us p50={} p99={} max={}",
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.max()
            );
        }
        if let (Some(h), Some(t)) = (&self.hist, &self.to_frame) {
            println!(
                "[{label}]   of which send->frame made p50={} p99={}; frame made->subscriber p50~{} p99~{}",
                t.value_at_quantile(0.5),
                t.value_at_quantile(0.99),
                h.value_at_quantile(0.5).saturating_sub(t.value_at_quantile(0.5)),
                h.value_at_quantile(0.99).saturating_sub(t.value_at_quantile(0.99)),
            );
        }
    }
}

/// How the simulated devices reach the mesh.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    /// MQTT to the nodes (the mesh under test).
    Mqtt,
    /// Straight to JetStream with async-nats (the peer).
    JetStream,
}

/// The host of a NATS URL (`[scheme://][user:pass@]host[:port]`).
fn nats_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host = match rest.rsplit_once(':') {
        Some((h, port)) if !port.contains(']') => h,
        _ => rest,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A rustls client config trusting the certificates in the PEM file `ca`.
fn tls_client_config(ca: &FsPath) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{pem::PemObject as _, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("{}", ca.display()))? {
        roots.add(cert.with_context(|| format!("{}", ca.display()))?)?;
    }
    if roots.is_empty() {
        bail!("{}: no certificate in it", ca.display());
    }
    Ok(Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth()))
}

/// How every simulated device connects: TLS or not, and its secret.
#[derive(Clone, Default)]
struct DeviceConn {
    tls: Option<Arc<rustls::ClientConfig>>,
    secret: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.mqtt.iter().any(|a| !a.ip().is_loopback()) {
        bail!("load goes to loopback addresses only");
    }
    for url in &args.nats {
        let host = nats_host(url);
        if !(host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())) {
            bail!("{url}: load goes to loopback addresses only");
        }
    }
    // Both ring and aws-lc-rs are linked in (rumqttc's tokio-rustls default
    // features): name the one to use, once. An error only means one is
    // already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    let conn = DeviceConn {
        tls: args.tls_ca.as_deref().map(tls_client_config).transpose().context("--tls-ca")?,
        secret: non_empty(&args.secret),
    };
    if args.duration == 0 || args.duration > 600 {
        bail!("--duration must be 1..=600 seconds");
    }
    if args.json && args.payload < JSON_MIN {
        anyhow::bail!("--json needs --payload of at least {JSON_MIN} bytes");
    }
    if args.payload < 16 || args.payload > 1024 * 1024 {
        bail!("--payload must be 16..=1048576 bytes");
    }
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let qos = match args.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => bail!("--qos must be 0 or 1"),
    };
    if args.no_subscriber && qos != QoS::AtLeastOnce {
        bail!("--no-subscriber measures PUBACKs: it needs --qos 1");
    }
    let addrs = args.nats.iter().map(|u| u.parse::<async_nats::ServerAddr>()).collect::<Result<Vec<_>, _>>()?;
    let mut options = async_nats::ConnectOptions::new().subscription_capacity(1 << 20);
    match (non_empty(&args.nats_user), non_empty(&args.nats_password)) {
        (Some(user), password) => options = options.user_and_password(user, password.unwrap_or_default()),
        (None, Some(_)) => bail!("--nats-password needs --nats-user"),
        (None, None) => {}
    }
    if let Some(ca) = &args.nats_ca {
        if !ca.is_file() {
            bail!("--nats-ca {}: not a file", ca.display());
        }
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    let nats =
        options.connect(addrs).await.with_context(|| format!("connecting to NATS at {}", args.nats.join(",")))?;
    println!(
        "devices={} qos={} payload={}B target_rate={}/s duration={}s mqtt_tls={} device_auth={}",
        args.devices,
        args.qos,
        args.payload,
        args.rate,
        args.duration,
        if conn.tls.is_some() { "on" } else { "off" },
        if conn.secret.is_some() { "secret" } else { "anonymous" },
    );
    let run_started = SystemTime::now();
    let (mesh, acked_by_device) = measure(&nats, &args, &conn, Path::Mqtt, qos, &args.prefix).await?;
    mesh.print("mesh");
    if args.verify {
        verify(&nats, &args, run_started, &acked_by_device).await?;
    }
    if args.peer.is_some() {
        let peer_prefix = format!("{}js", args.prefix);
        let (peer, _) = measure(&nats, &args, &conn, Path::JetStream, qos, &peer_prefix).await?;
        peer.print("jetstream");
        if let (Some(m), Some(p)) = (mesh.rate, peer.rate) {
            println!("[ratio] mesh/jetstream delivered_rate={:.2}", m / p.max(1.0));
        }
        if let (Some(m), Some(p)) = (&mesh.hist, &peer.hist) {
            println!(
                "[ratio] mesh/jetstream p50={:.2} p99={:.2}",
                m.value_at_quantile(0.5) as f64 / p.value_at_quantile(0.5).max(1) as f64,
                m.value_at_quantile(0.99) as f64 / p.value_at_quantile(0.99).max(1) as f64
            );
        }
    }
    Ok(())
}

type AckedByDevice = Vec<(String, Arc<Mutex<Vec<u64>>>)>;

/// Runs `args.devices` simulated devices over `path` for `args.duration`
/// seconds and measures what a NATS subscriber receives from them.
async fn measure(
    nats: &async_nats::Client,
    args: &Args,
    conn: &DeviceConn,
    path: Path,
    qos: QoS,
    device_prefix: &str,
) -> anyhow::Result<(Outcome, AckedByDevice)> {
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));

    // The measuring subscriber.
    let mut sub = if args.no_subscriber { None } else { Some(nats.subscribe(args.subject.clone()).await?) };
    nats.flush().await?;
    let prefix = format!("{device_prefix}-");
    let sub_counters = counters.clone();
    let (stop_sub, mut sub_stopped) = tokio::sync::oneshot::channel::<()>();
    let subscriber = tokio::spawn(async move {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
        let mut to_frame = hist.clone();
        let mut scratch = fluxmesh_schemas::frame::AlignedVec::new();
        let Some(sub) = sub.as_mut() else { return (hist, to_frame) };
        loop {
            let msg = tokio::select! {
                _ = &mut sub_stopped => break,
                msg = sub.next() => match msg { Some(m) => m, None => break },
            };
            let Ok(frame) = fluxmesh_schemas::frame::access(&msg.payload, &mut scratch) else { continue };
            if !frame.device.as_str().starts_with(&prefix) {
                continue;
            }
            if let fluxmesh_schemas::frame::ArchivedBody::Telemetry { payload } = &frame.body {
                if let Some((sent, _)) = payload_meta(payload) {
                    let _ = hist.record(now_us().saturating_sub(sent).max(1));
                    let made = u64::try_from(frame.received_time_us.to_native()).unwrap_or(0);
                    let _ = to_frame.record(made.saturating_sub(sent).max(1));
                }
            }
            sub_counters.received.fetch_add(1, Ordering::Relaxed);
        }
        (hist, to_frame)
    });

    // Devices.
    let per_device = if args.rate == 0 { 0.0 } else { args.rate as f64 / args.devices as f64 };
    let mut devices = Vec::new();
    let mut acked_by_device = Vec::new();
    let mut gaps = Vec::new();
    for d in 0..args.devices {
        let id = format!("{device_prefix}-{d}");
        let acked_seqs = Arc::new(Mutex::new(Vec::<u64>::new()));
        acked_by_device.push((id.clone(), acked_seqs.clone()));
        let device_gaps = Arc::new(AckGaps::default());
        gaps.push((id.clone(), device_gaps.clone()));
        let load = Load {
            counters: counters.clone(),
            stop: stop.clone(),
            size: args.payload,
            per_device,
            json: args.json,
            gaps: device_gaps,
        };
        match path {
            Path::Mqtt if args.verify && qos == QoS::AtLeastOnce => {
                devices.push(tokio::spawn(tracked_device(id, args.mqtt.clone(), d, conn.clone(), acked_seqs, load)));
            }
            Path::Mqtt => {
                let addr = args.mqtt[d % args.mqtt.len()];
                devices.extend(mqtt_device(id, addr, conn, qos, args.verify, acked_seqs, load));
            }
            Path::JetStream => {
                let subjects = Subjects::new(&args.subject_prefix)?;
                devices.push(tokio::spawn(jetstream_device(nats.clone(), subjects, id, load)));
            }
        }
    }

    // Progress, once a second, for the bounded duration.
    let label = if path == Path::Mqtt { "mesh" } else { "jetstream" };
    let started = Instant::now();
    let mut last = (0u64, 0u64);
    let mut peak = 0u64;
    while started.elapsed() < Duration::from_secs(args.duration) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (sent, received) = (counters.sent.load(Ordering::Relaxed), counters.received.load(Ordering::Relaxed));
        peak = peak.max(received - last.1);
        eprint!(
            "\r[{label}] {:>4}s  sent {:>9} ({:>7}/s)  acked {:>9}  received {:>9} ({:>7}/s)   ",
            started.elapsed().as_secs(),
            sent,
            sent - last.0,
            counters.acked.load(Ordering::Relaxed),
            received,
            received - last.1
        );
        last = (sent, received);
    }
    stop.store(true, Ordering::Relaxed);
    let publish_secs = started.elapsed().as_secs_f64();
    let ended_us = now_us();
    for (_, g) in &gaps {
        g.end(ended_us);
    }
    let received_at_stop = counters.received.load(Ordering::Relaxed);
    let acked_at_stop = counters.acked.load(Ordering::Relaxed);

    // Let the tail arrive: until everything sent is received, or 10 s.
    let drain_until = Instant::now() + Duration::from_secs(10);
    while !args.no_subscriber
        && Instant::now() < drain_until
        && counters.received.load(Ordering::Relaxed) < counters.sent.load(Ordering::Relaxed)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!();
    // Publishers have ended (`stop` is set); MQTT event loops would poll
    // their connections forever.
    for task in devices {
        task.abort();
    }
    let _ = stop_sub.send(());
    let (hist, to_frame) = match subscriber.await {
        Ok((h, t)) if !h.is_empty() => (Some(h), Some(t)),
        _ => (None, None),
    };
    let outcome = Outcome {
        sent: counters.sent.load(Ordering::Relaxed),
        acked: counters.acked.load(Ordering::Relaxed),
        received: counters.received.load(Ordering::Relaxed),
        rate: (!args.no_subscriber).then(|| received_at_stop as f64 / publish_secs),
        acked_rate: acked_at_stop as f64 / publish_secs,
        peak,
        reconnects: counters.reconnects.load(Ordering::Relaxed),
        hist,
        to_frame,
        puback_gap: (path == Path::Mqtt && qos == QoS::AtLeastOnce).then(|| longest_gap(&gaps)).flatten(),
    };
    Ok((outcome, acked_by_device))
}

/// The longest gap over all devices.
fn longest_gap(gaps: &[(String, Arc<AckGaps>)]) -> Option<LongestGap> {
    let all: Vec<_> = gaps.iter().map(|(id, g)| (g.longest(), id)).collect();
    let devices_over_1s = all.iter().filter(|((gap, _), _)| *gap > 1_000_000).count();
    let ((gap_us, from_us), device) = all.into_iter().max_by_key(|((gap, _), _)| *gap)?;
    Some(LongestGap { gap_us, from_us, device: device.clone(), devices_over_1s })
}

/// What every simulated device shares.
struct Load {
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    size: usize,
    /// Messages per second for this device; 0 means as fast as accepted.
    per_device: f64,
    json: bool,
    /// This device's PUBACK gaps (QoS1 over MQTT).
    gaps: Arc<AckGaps>,
}

/// The longest time one QoS1 device went without a PUBACK while it was
/// publishing: from its first CONNACK to its first PUBACK, between
/// consecutive PUBACKs, and from its last PUBACK to the end of publishing
/// if none came since (a PUBACK after the end closes that gap at its full
/// length). Connecting and authenticating the first time, and gaps that
/// begin after publishing ended (the tail), do not count. A node that stalls ingest, or a device that must reconnect,
/// shows up here; the floor is the device's own interval between messages
/// (1 / its rate).
#[derive(Default)]
struct AckGaps(Mutex<GapState>);

#[derive(Default)]
struct GapState {
    /// The last PUBACK, or the first CONNACK (µs since the Unix epoch).
    last_us: Option<u64>,
    /// When publishing ended, once it has.
    ended_us: Option<u64>,
    /// The longest gap and when it began (µs).
    longest: (u64, u64),
}

impl GapState {
    fn close_at(&mut self, at_us: u64) {
        if let Some(last) = self.last_us {
            if self.ended_us.is_none_or(|end| last < end) && at_us.saturating_sub(last) > self.longest.0 {
                self.longest = (at_us - last, last);
            }
        }
    }
}

impl AckGaps {
    /// The device is connected (only its first CONNACK counts).
    fn connected(&self) {
        if let Ok(mut s) = self.0.lock() {
            s.last_us.get_or_insert_with(now_us);
        }
    }

    /// A PUBACK arrived.
    fn ack(&self) {
        if let Ok(mut s) = self.0.lock() {
            let now = now_us();
            s.close_at(now);
            s.last_us = Some(now);
        }
    }

    /// Publishing ended at `at_us`: a gap still open counts up to then.
    fn end(&self, at_us: u64) {
        if let Ok(mut s) = self.0.lock() {
            s.close_at(at_us);
            s.ended_us = Some(at_us);
        }
    }

    /// (longest gap, when it began), µs.
    fn longest(&self) -> (u64, u64) {
        self.0.lock().map(|s| s.longest).unwrap_or_default()
    }
}

/// Smallest --json payload.
const JSON_MIN: usize = 80;

/// (send time µs, sequence number) of a payload this load generator made,
/// binary (first 16 bytes) or JSON (fixed offsets).
fn payload_meta(payload: &[u8]) -> Option<(u64, u64)> {
    let num = |r: std::ops::Range<usize>| std::str::from_utf8(payload.get(r)?).ok()?.parse::<u64>().ok();
    // Not just a leading `{`: one binary payload in 256 starts with that
    // byte (the low byte of its send time), and was then not recognised.
    if payload.starts_with(br#"{"sent_us":""#) {
        // {"sent_us":"<20 digits>","seq":"<20 digits>",...
        return Some((num(12..32)?, num(41..61)?));
    }
    let word =
        |r: std::ops::Range<usize>| payload.get(r).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_le_bytes);
    Some((word(0..8)?, word(8..16)?))
}

impl Load {
    /// How many messages this device should have sent by now.
    fn due(&self, start: Instant, seq: u64) -> u64 {
        if self.per_device == 0.0 {
            seq + 64
        } else {
            (start.elapsed().as_secs_f64() * self.per_device) as u64
        }
    }

    fn payload(&self, seq: u64) -> Vec<u8> {
        if self.json {
            let head = format!(r#"{{"sent_us":"{:020}","seq":"{:020}","t":{}.5,"pad":""#, now_us(), seq, seq % 60);
            let mut payload = head.into_bytes();
            payload.resize(self.size.saturating_sub(2).max(payload.len()), b'x');
            payload.extend_from_slice(b"\"}");
            return payload;
        }
        let mut payload = vec![0u8; self.size];
        payload[..8].copy_from_slice(&now_us().to_le_bytes());
        payload[8..16].copy_from_slice(&seq.to_le_bytes());
        payload
    }
}

/// One MQTT device: a publishing task and its event loop.
fn mqtt_device(
    id: String,
    addr: SocketAddr,
    conn: &DeviceConn,
    qos: QoS,
    verify: bool,
    acked_seqs: Arc<Mutex<Vec<u64>>>,
    load: Load,
) -> [tokio::task::JoinHandle<()>; 2] {
    let mut opts = MqttOptions::new(id.clone(), addr.ip().to_string(), addr.port());
    if let Some(tls) = &conn.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone())));
    }
    if let Some(secret) = &conn.secret {
        opts.set_credentials(id.clone(), secret.clone());
    }
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(100);
    opts.set_max_packet_size(load.size + 1024, load.size + 1024);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let c = load.counters.clone();
    let stop = load.stop.clone();
    let gaps = load.gaps.clone();
    let events = tokio::spawn(async move {
        // New publishes leave in the order queued: the n-th carries seq n.
        // After a reconnect, rumqttc resends the unacknowledged ones with
        // their old packet ids: those are not new sequence numbers.
        let mut by_pkid: HashMap<u16, u64> = HashMap::new();
        let mut next_seq = 0u64;
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) if verify => {
                    if let std::collections::hash_map::Entry::Vacant(slot) = by_pkid.entry(pkid) {
                        slot.insert(next_seq);
                        next_seq += 1;
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => gaps.connected(),
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    c.acked.fetch_add(1, Ordering::Relaxed);
                    gaps.ack();
                    if let Some(seq) = by_pkid.remove(&ack.pkid) {
                        if let Ok(mut seqs) = acked_seqs.lock() {
                            seqs.push(seq);
                        }
                    }
                }
                Ok(_) => {}
                // The connection failed (a node was killed, or the run's own
                // disconnect): like a real device, connect again and resend
                // what was not acknowledged, until the run is over.
                Err(_) if !stop.load(Ordering::Relaxed) => {
                    c.reconnects.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(_) => return,
            }
        }
    });
    let topic = format!("devices/{id}/load");
    let publisher = tokio::spawn(async move {
        let start = Instant::now();
        let mut seq = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        while !load.stop.load(Ordering::Relaxed) {
            let due = load.due(start, seq);
            while seq < due && !load.stop.load(Ordering::Relaxed) {
                if client.publish(topic.as_str(), qos, false, load.payload(seq)).await.is_err() {
                    return;
                }
                seq += 1;
                load.counters.sent.fetch_add(1, Ordering::Relaxed);
            }
            if load.per_device > 0.0 {
                tick.tick().await;
            }
        }
        let _ = client.disconnect().await;
    });
    [publisher, events]
}
/// [`verify_once`], tried up to three times: reading a stream right after a
/// fault can fail (a consumer placed on a server that is restarting).
async fn verify(
    nats: &async_nats::Client,
    args: &Args,
    since: SystemTime,
    acked_by_device: &[(String, Arc<Mutex<Vec<u64>>>)],
) -> anyhow::Result<()> {
    let mut attempt = 1;
    loop {
        match verify_once(nats, args, since, acked_by_device).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 3 => {
                eprintln!("verify: attempt {attempt} failed ({e:#}); reading again");
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads the stream from the run's start and reports PUBACKed messages
/// that are not in it, and messages stored more than once; with
/// `--verify-processing`, also what the shard workers made of them.
async fn verify_once(
    nats: &async_nats::Client,
    args: &Args,
    since: SystemTime,
    acked_by_device: &[(String, Arc<Mutex<Vec<u64>>>)],
) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(nats.clone());
    let mut stored: HashMap<String, HashSet<u64>> = HashMap::new();
    // Every stored copy counts for processing: a resent QoS1 message stored
    // twice is two messages to the shard worker.
    let mut stored_copies: HashMap<String, u64> = HashMap::new();
    let mut duplicates = 0u64;
    let prefix = format!("{}-", args.prefix);
    let streams = match &args.stream {
        Some(s) => vec![s.clone()],
        None => fluxmesh_mesh::telemetry_streams(&js, &Subjects::new(&args.subject_prefix)?)
            .await
            .context("finding the telemetry streams")?,
    };
    wait_until_stored_settles(&js, &streams).await?;
    for stream in &streams {
        for_each_frame_since(&js, stream, since, |frame| {
            if !frame.device.as_str().starts_with(&prefix) {
                return;
            }
            if let fluxmesh_schemas::frame::ArchivedBody::Telemetry { payload } = &frame.body {
                if let Some((_, seq)) = payload_meta(payload) {
                    *stored_copies.entry(frame.device.as_str().to_owned()).or_default() += 1;
                    if !stored.entry(frame.device.as_str().to_owned()).or_default().insert(seq) {
                        duplicates += 1;
                    }
                }
            }
        })
        .await
        .with_context(|| format!("reading telemetry stream {stream}"))?;
    }
    let (mut acked, mut lost) = (0u64, 0u64);
    let mut examples = Vec::new();
    for (device, seqs) in acked_by_device {
        let seqs = seqs.lock().map(|s| s.clone()).unwrap_or_default();
        let have = stored.get(device);
        acked += seqs.len() as u64;
        for s in seqs.iter().filter(|s| !have.is_some_and(|h| h.contains(s))) {
            lost += 1;
            if examples.len() < 10 {
                examples.push(format!("{device}#{s}"));
            }
        }
    }
    if !examples.is_empty() {
        println!("verify: acknowledged but not stored, e.g. {}", examples.join(" "));
    }
    let stored_total: usize = stored.values().map(HashSet::len).sum();
    println!("verify: acked={acked} stored={stored_total} acked_but_missing={lost} stored_twice={duplicates}");
    if args.verify_processing {
        verify_processing(&js, args, since, &stored_copies).await?;
    }
    Ok(())
}

/// Waits (up to 30 s) until the telemetry streams have stopped growing for
/// a second. Publishes the devices sent just before the end may still be
/// on their way into the stream (sent, not yet acknowledged); a read that
/// missed them would count fewer stored messages than the shard workers
/// then apply, and report them as applied twice.
async fn wait_until_stored_settles(js: &async_nats::jetstream::Context, streams: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut last, mut quiet_since) = (u64::MAX, Instant::now());
    while Instant::now() < deadline {
        let mut total = 0;
        for name in streams {
            let mut stream = js.get_stream(name).await.with_context(|| format!("stream {name}"))?;
            total += stream.info().await.with_context(|| format!("stream {name}"))?.state.last_sequence;
        }
        if total != last {
            (last, quiet_since) = (total, Instant::now());
        } else if quiet_since.elapsed() >= Duration::from_secs(1) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("verify: the telemetry streams were still growing after 30 s; reading them anyway");
    Ok(())
}

/// Waits (up to 60 s) until every device's checkpointed state has applied
/// as many messages as were stored for it, then checks the derived state
/// frames: one per seq, seq 1..n with n the state's seq.
async fn verify_processing(
    js: &async_nats::jetstream::Context,
    args: &Args,
    since: SystemTime,
    stored: &HashMap<String, u64>,
) -> anyhow::Result<()> {
    let subjects = Subjects::new(&args.subject_prefix)?;
    let event_stream = subjects.event_stream();
    let checkpoints = fluxmesh_mesh::checkpoint::Checkpoints::new(js.clone(), subjects);
    let shards: BTreeSet<u32> = stored.keys().map(|d| shard_of(d, args.shards)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut states, mut behind, mut over);
    loop {
        states = HashMap::new();
        (behind, over) = (0u64, 0u64);
        let mut checkpointed: HashMap<String, serde_json::Value> = HashMap::new();
        for shard in &shards {
            checkpointed.extend(checkpoints.load(*shard).await.context("reading a checkpoint log")?.states);
        }
        for (device, count) in stored {
            let state = checkpointed.remove(device);
            let applied = state.as_ref().and_then(|s| s["count"].as_u64()).unwrap_or(0);
            match applied.cmp(count) {
                std::cmp::Ordering::Less => behind += 1,
                std::cmp::Ordering::Greater => over += 1,
                std::cmp::Ordering::Equal => {}
            }
            if let Some(s) = state {
                states.insert(device.clone(), s["seq"].as_u64().unwrap_or(0));
            }
        }
        if behind == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut seqs: HashMap<String, HashSet<u64>> = HashMap::new();
    let (mut frames, mut dup_frames) = (0u64, 0u64);
    for_each_frame_since(js, &event_stream, since, |frame| {
        if !stored.contains_key(frame.device.as_str()) || frame.producer.as_str() != "state" {
            return;
        }
        frames += 1;
        if !seqs.entry(frame.device.as_str().to_owned()).or_default().insert(frame.seq.to_native()) {
            dup_frames += 1;
        }
    })
    .await
    .context("reading the event stream")?;
    let mut gaps = 0u64;
    for (device, n) in &states {
        let have = seqs.get(device).map_or(0, |s| s.iter().filter(|q| (1..=*n).contains(*q)).count() as u64);
        gaps += n - have.min(*n);
    }
    println!(
        "verify_processing: devices={} applied_behind={behind} applied_twice={over} state_frames={frames} duplicate_state_frames={dup_frames} missing_state_frames={gaps}",
        stored.len()
    );
    Ok(())
}

/// Hands `each` every valid frame stored in `stream` from a second before
/// `since` up to now (corrupt frames are skipped).
async fn for_each_frame_since(
    js: &async_nats::jetstream::Context,
    stream: &str,
    since: SystemTime,
    mut each: impl FnMut(&fluxmesh_schemas::frame::ArchivedFrame),
) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{pull, DeliverPolicy};
    let stream = js.get_stream(stream).await.with_context(|| format!("stream {stream}"))?;
    let start = time::OffsetDateTime::from(since - Duration::from_secs(1));
    let config = pull::Config {
        deliver_policy: DeliverPolicy::ByStartTime { start_time: start },
        inactive_threshold: Duration::from_secs(60),
        ..Default::default()
    };
    let mut scratch = fluxmesh_schemas::frame::AlignedVec::new();
    fluxmesh_mesh::read_pending(&stream, config, Duration::from_secs(10), |msg| {
        if let Ok(frame) = fluxmesh_schemas::frame::access(&msg.payload, &mut scratch) {
            each(frame);
        }
        Ok(())
    })
    .await?;
    Ok(())
}

/// One device publishing straight to JetStream, as a node would: the same
/// subject, headers and frame, with at most 100 acks outstanding (a node's
/// default `mqtt.max_inflight`).
async fn jetstream_device(nats: async_nats::Client, subjects: Subjects, id: String, load: Load) {
    let js = async_nats::jetstream::new(nats);
    let Ok(topic) = DeviceTopic::new(&id, "load") else { return };
    let subject = subjects.telemetry(shard_of(&id, 64), &topic);
    let mut pending = FuturesUnordered::new();
    let start = Instant::now();
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while !load.stop.load(Ordering::Relaxed) {
        let due = load.due(start, seq);
        while seq < due && !load.stop.load(Ordering::Relaxed) {
            while pending.len() >= 100 {
                if let Some(Ok(_)) = pending.next().await {
                    load.counters.acked.fetch_add(1, Ordering::Relaxed);
                }
            }
            let frame = Frame::telemetry(&id, "load", "loadgen", load.payload(seq));
            let Ok(bytes) = frame.encode() else { return };
            match js.publish_with_headers(subject.clone(), fluxmesh_mesh::frame_headers(&frame), bytes.into()).await {
                Ok(ack) => pending.push(ack.into_future()),
                Err(e) => {
                    eprintln!("\n{id}: {e}");
                    return;
                }
            }
            seq += 1;
            load.counters.sent.fetch_add(1, Ordering::Relaxed);
        }
        if load.per_device > 0.0 {
            tokio::select! {
                _ = tick.tick() => {}
                Some(r) = pending.next() => if r.is_ok() { load.counters.acked.fetch_add(1, Ordering::Relaxed); },
            }
        } else if let Some(Ok(_)) = pending.next().await {
            load.counters.acked.fetch_add(1, Ordering::Relaxed);
        }
    }
    while let Some(r) = pending.next().await {
        if r.is_ok() {
            load.counters.acked.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A QoS1 device for `--verify` runs, with exact bookkeeping: it assigns
/// its own packet ids, so it knows which payload each PUBACK acknowledges.
/// (rumqttc drops unacknowledged publishes when it reconnects to a broker
/// that has no session for it, which makes pkid→payload tracking across
/// reconnects guesswork.) When a connection fails it reconnects, to the
/// same node and, if that fails, to the next one, and resends every
/// unacknowledged message with DUP set, as a real device would.
async fn tracked_device(
    id: String,
    nodes: Vec<SocketAddr>,
    first: usize,
    conn: DeviceConn,
    acked_seqs: Arc<Mutex<Vec<u64>>>,
    load: Load,
) {
    use rumqttc::mqttbytes::v4::{Connect, Packet as P, Publish};
    use tokio::io::AsyncReadExt as _;
    let topic = format!("devices/{id}/load");
    let mut unacked: std::collections::BTreeMap<u16, (u64, Vec<u8>)> = Default::default();
    let (mut seq, mut next_pkid, mut attempt) = (0u64, 1u16, first);
    let start = Instant::now();
    while !load.stop.load(Ordering::Relaxed) {
        let addr = nodes[attempt % nodes.len()];
        let Some(mut socket) = connect_stream(addr, conn.tls.as_ref()).await else {
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut wbuf = bytes::BytesMut::new();
        let mut rbuf = bytes::BytesMut::with_capacity(4096);
        let mut connect = Connect::new(id.clone());
        connect.keep_alive = 30;
        if let Some(secret) = &conn.secret {
            connect.set_login(id.clone(), secret.clone());
        }
        if connect.write(&mut wbuf).is_err() || write_flush(&mut socket, &wbuf).await.is_err() {
            continue;
        }
        wbuf.clear();
        // CONNACK first.
        let connected = loop {
            match P::read(&mut rbuf, 1 << 20) {
                Ok(P::ConnAck(ack)) => break ack.code == rumqttc::ConnectReturnCode::Success,
                Ok(_) | Err(_) if rbuf.len() > 1 << 16 => break false,
                Ok(_) => continue,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    match tokio::time::timeout(Duration::from_secs(5), socket.read_buf(&mut rbuf)).await {
                        Ok(Ok(n)) if n > 0 => {}
                        _ => break false,
                    }
                }
                Err(_) => break false,
            }
        };
        if !connected {
            load.counters.reconnects.fetch_add(1, Ordering::Relaxed);
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        load.gaps.connected();
        // Resend what the last connection left unacknowledged.
        for (pkid, (_, payload)) in &unacked {
            let mut p = Publish::new(topic.as_str(), QoS::AtLeastOnce, payload.clone());
            p.pkid = *pkid;
            p.dup = true;
            let _ = p.write(&mut wbuf);
        }
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let failed = loop {
            if load.stop.load(Ordering::Relaxed) && unacked.is_empty() {
                let _ = P::Disconnect.write(&mut wbuf, usize::MAX);
                let _ = write_flush(&mut socket, &wbuf).await;
                return;
            }
            if !load.stop.load(Ordering::Relaxed) {
                let due = load.due(start, seq);
                while seq < due && unacked.len() < 100 {
                    let payload = load.payload(seq);
                    while unacked.contains_key(&next_pkid) || next_pkid == 0 {
                        next_pkid = next_pkid.wrapping_add(1);
                    }
                    let mut p = Publish::new(topic.as_str(), QoS::AtLeastOnce, payload.clone());
                    p.pkid = next_pkid;
                    let _ = p.write(&mut wbuf);
                    unacked.insert(next_pkid, (seq, payload));
                    next_pkid = next_pkid.wrapping_add(1);
                    seq += 1;
                    load.counters.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            if !wbuf.is_empty() {
                if write_flush(&mut socket, &wbuf).await.is_err() {
                    break true;
                }
                wbuf.clear();
            }
            tokio::select! {
                read = socket.read_buf(&mut rbuf) => match read {
                    Ok(n) if n > 0 => loop {
                        match P::read(&mut rbuf, 1 << 20) {
                            Ok(P::PubAck(ack)) => {
                                if let Some((acked, _)) = unacked.remove(&ack.pkid) {
                                    load.counters.acked.fetch_add(1, Ordering::Relaxed);
                                    load.gaps.ack();
                                    if let Ok(mut seqs) = acked_seqs.lock() {
                                        seqs.push(acked);
                                    }
                                }
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    },
                    _ => break true,
                },
                _ = tick.tick() => {}
            }
        };
        if failed {
            load.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A device's connection: plain TCP or TLS over it.
trait DeviceIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> DeviceIo for T {}

/// Connects to `addr` (1 s), then, with `tls`, does the TLS handshake (5 s)
/// with the address's IP as the server name.
async fn connect_stream(addr: SocketAddr, tls: Option<&Arc<rustls::ClientConfig>>) -> Option<Box<dyn DeviceIo>> {
    let socket = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await.ok()?.ok()?;
    let _ = socket.set_nodelay(true);
    let Some(tls) = tls else { return Some(Box::new(socket)) };
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let connector = rumqttc::tokio_rustls::TlsConnector::from(tls.clone());
    match tokio::time::timeout(Duration::from_secs(5), connector.connect(name, socket)).await {
        Ok(Ok(stream)) => Some(Box::new(stream)),
        Ok(Err(e)) => {
            eprintln!("\n{addr}: TLS: {e}");
            None
        }
        Err(_) => None,
    }
}

/// Writes `buf` and flushes (TLS keeps records buffered until flushed).
async fn write_flush(socket: &mut Box<dyn DeviceIo>, buf: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    socket.write_all(buf).await?;
    socket.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_payloads_are_json_and_carry_their_meta() {
        let load = Load {
            counters: Arc::default(),
            stop: Arc::default(),
            size: 100,
            per_device: 0.0,
            json: true,
            gaps: Arc::default(),
        };
        let p = load.payload(123_456);
        assert_eq!(p.len(), 100);
        let v: serde_json::Value = serde_json::from_slice(&p).expect("valid JSON");
        assert_eq!(v["t"], 36.5);
        let (sent, seq) = payload_meta(&p).expect("meta");
        assert_eq!(seq, 123_456);
        assert!(sent > 1_600_000_000_000_000);
        let binary = Load { json: false, ..load }.payload(7);
        assert_eq!(payload_meta(&binary).map(|m| m.1), Some(7));
        // A binary payload whose send time's low byte is `{`.
        let mut brace = binary.clone();
        brace[0] = b'{';
        assert_eq!(payload_meta(&brace).map(|m| m.1), Some(7));
    }

    #[test]
    fn puback_gaps_count_while_publishing_only() {
        let mut s = GapState::default();
        // Nothing counts before the first CONNACK.
        s.close_at(1_000);
        assert_eq!(s.longest, (0, 0));
        s.last_us = Some(1_000);
        s.close_at(1_500);
        s.last_us = Some(1_500);
        s.close_at(4_000); // a 2.5 ms gap from 1.5 ms
        s.last_us = Some(4_000);
        assert_eq!(s.longest, (2_500, 1_500));
        // Publishing ends at 5 ms; the gap still open counts to then, and
        // the PUBACK that closes it later counts at its full length.
        s.ended_us = Some(5_000);
        s.close_at(7_000);
        assert_eq!(s.longest, (3_000, 4_000));
        s.last_us = Some(7_000);
        // After the end, new gaps do not count.
        s.close_at(20_000);
        assert_eq!(s.longest, (3_000, 4_000));
    }

    #[test]
    fn nats_hosts() {
        assert_eq!(nats_host("nats://127.0.0.1:4222"), "127.0.0.1");
        assert_eq!(nats_host("tls://localhost:4222"), "localhost");
        assert_eq!(nats_host("nats://u:p@127.0.0.1:4222"), "127.0.0.1");
        assert_eq!(nats_host("127.0.0.1"), "127.0.0.1");
        assert_eq!(nats_host("tls://[::1]:4222"), "::1");
        assert_eq!(nats_host("10.0.0.1:4222"), "10.0.0.1");
    }
}
