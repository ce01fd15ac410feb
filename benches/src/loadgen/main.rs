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
//!
//! Scripts pass `--report json` and read one JSON object from stdout
//! (report.rs). This file runs the load and puts the report together:
//! args.rs checks the flags, devices.rs holds the device kinds,
//! measurement.rs what a run measures, verification.rs the `--verify`
//! checks.

mod args;
mod devices;
mod measurement;
mod report;
#[path = "../streams.rs"]
mod streams;
mod verification;

use anyhow::Context as _;
use args::Args;
use clap::Parser;
use devices::{DeviceConn, Load, Path};
use fluxmesh_schemas::Subjects;
use measurement::{AckGaps, Counters, Outcome, Subscriber};
use report::{Ratio, Report, ReportFormat, RunInfo};
use rumqttc::QoS;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use verification::AckedByDevice;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let qos = args.check()?;
    // Both ring and aws-lc-rs are linked in (rumqttc's tokio-rustls default
    // features): name the one to use, once. An error only means one is
    // already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let conn = DeviceConn::new(args.tls_ca.as_deref(), args.secret())?;
    let (addrs, options) = args.nats_options()?;
    let nats =
        options.connect(addrs).await.with_context(|| format!("connecting to NATS at {}", args.nats.join(",")))?;
    let out = args.report.text_out();
    let run = RunInfo {
        devices: args.devices,
        qos: args.qos,
        payload_bytes: args.payload,
        target_rate: args.rate,
        duration_s: args.duration,
        mqtt_tls: conn.tls.is_some(),
        device_auth: if conn.secret.is_some() { "secret" } else { "anonymous" },
    };
    run.print(out);
    let run_started = SystemTime::now();
    let (mesh, acked_by_device) = measure(&nats, &args, &conn, Path::Mqtt, qos, &args.prefix).await?;
    mesh.print("mesh", out);
    let (verify, verify_processing) = if args.verify {
        let (verified, processing) = verification::verify(&nats, &args, run_started, &acked_by_device, out).await?;
        (Some(verified), processing)
    } else {
        (None, None)
    };
    let (mut jetstream, mut ratio) = (None, None);
    if args.peer.is_some() {
        let peer_prefix = format!("{}js", args.prefix);
        let (peer, _) = measure(&nats, &args, &conn, Path::JetStream, qos, &peer_prefix).await?;
        peer.print("jetstream", out);
        let r = Ratio::new(&mesh, &peer);
        r.print(out);
        (jetstream, ratio) = (Some(peer), Some(r));
    }
    if args.report == ReportFormat::Json {
        let report = Report { run, mesh, verify, verify_processing, jetstream, ratio };
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

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
    let subject = (!args.no_subscriber).then(|| args.subject.clone());
    let subscriber = Subscriber::start(nats, subject, device_prefix, counters.clone()).await?;

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
                let nodes = args.mqtt.clone();
                devices.push(tokio::spawn(devices::tracked_device(id, nodes, d, conn.clone(), acked_seqs, load)));
            }
            Path::Mqtt => {
                let addr = args.mqtt[d % args.mqtt.len()];
                devices.extend(devices::mqtt_device(id, addr, conn, qos, args.verify, acked_seqs, load));
            }
            Path::JetStream => {
                let subjects = Subjects::new(&args.subject_prefix)?;
                devices.push(tokio::spawn(devices::jetstream_device(nats.clone(), subjects, id, load)));
            }
        }
    }

    // Progress, once a second, for the bounded duration.
    let label = if path == Path::Mqtt { "mesh" } else { "jetstream" };
    let started = Instant::now();
    let mut last = (0u64, 0u64);
    let mut last_acked = 0u64;
    let mut peak = 0u64;
    let mut per_second = Vec::new();
    while started.elapsed() < Duration::from_secs(args.duration) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (sent, received) = (counters.sent.load(Ordering::Relaxed), counters.received.load(Ordering::Relaxed));
        let acked = counters.acked.load(Ordering::Relaxed);
        peak = peak.max(received - last.1);
        per_second.push(measurement::Second {
            t: started.elapsed().as_secs(),
            sent: sent - last.0,
            acked: acked - last_acked,
            received: received - last.1,
        });
        last_acked = acked;
        eprint!(
            "\r[{label}] {:>4}s  sent {:>9} ({:>7}/s)  acked {:>9}  received {:>9} ({:>7}/s)   ",
            started.elapsed().as_secs(),
            sent,
            sent - last.0,
            acked,
            received,
            received - last.1
        );
        last = (sent, received);
    }
    stop.store(true, Ordering::Relaxed);
    let publish_secs = started.elapsed().as_secs_f64();
    let ended_us = measurement::now_us();
    for (_, g) in &gaps {
        g.end(ended_us);
    }
    let at_stop = (counters.received.load(Ordering::Relaxed), counters.acked.load(Ordering::Relaxed));

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
    let hists = subscriber.finish().await;
    let puback_gap = (path == Path::Mqtt && qos == QoS::AtLeastOnce).then(|| measurement::longest_gap(&gaps)).flatten();
    let peak = (!args.no_subscriber).then_some(peak);
    let outcome = Outcome::new(&counters, at_stop, publish_secs, peak, hists, puback_gap, per_second);
    Ok((outcome, acked_by_device))
}
