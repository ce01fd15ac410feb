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

use anyhow::{bail, Context as _};
use clap::Parser;
use futures::StreamExt;
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
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
    /// The telemetry stream, for --verify.
    #[arg(long, default_value = "FM_TEL")]
    stream: String,
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    received: AtomicU64,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.mqtt.iter().any(|a| !a.ip().is_loopback()) {
        bail!("load goes to loopback addresses only");
    }
    if args.duration == 0 || args.duration > 600 {
        bail!("--duration must be 1..=600 seconds");
    }
    if args.payload < 16 || args.payload > 1024 * 1024 {
        bail!("--payload must be 16..=1048576 bytes");
    }
    let qos = match args.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => bail!("--qos must be 0 or 1"),
    };
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));

    // The measuring subscriber.
    let addrs = args.nats.iter().map(|u| u.parse::<async_nats::ServerAddr>()).collect::<Result<Vec<_>, _>>()?;
    let nats = async_nats::ConnectOptions::new().subscription_capacity(1 << 20).connect(addrs).await.context("NATS")?;
    let mut sub = nats.subscribe(args.subject.clone()).await?;
    nats.flush().await?;
    let prefix = format!("{}-", args.prefix);
    let sub_counters = counters.clone();
    let (stop_sub, mut sub_stopped) = tokio::sync::oneshot::channel::<()>();
    let subscriber = tokio::spawn(async move {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
        let mut scratch = fluxmesh_schemas::frame::AlignedVec::new();
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
                if let Some(sent) = payload.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                    let latency = now_us().saturating_sub(u64::from_le_bytes(sent));
                    let _ = hist.record(latency.max(1));
                }
            }
            sub_counters.received.fetch_add(1, Ordering::Relaxed);
        }
        hist
    });

    // Devices.
    let per_device = if args.rate == 0 { 0.0 } else { args.rate as f64 / args.devices as f64 };
    let mut devices = Vec::new();
    let mut acked_by_device = Vec::new();
    let run_started = SystemTime::now();
    for d in 0..args.devices {
        let addr = args.mqtt[d % args.mqtt.len()];
        let id = format!("{}-{d}", args.prefix);
        let mut opts = MqttOptions::new(id.clone(), addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_inflight(100);
        opts.set_max_packet_size(args.payload + 1024, args.payload + 1024);
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let c = counters.clone();
        let acked_seqs = Arc::new(Mutex::new(Vec::<u64>::new()));
        acked_by_device.push((id.clone(), acked_seqs.clone()));
        let verify = args.verify;
        let events = tokio::spawn(async move {
            // Publishes leave in the order queued: the n-th carries seq n.
            let mut by_pkid: HashMap<u16, u64> = HashMap::new();
            let mut next_seq = 0u64;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) if verify => {
                        by_pkid.insert(pkid, next_seq);
                        next_seq += 1;
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        c.acked.fetch_add(1, Ordering::Relaxed);
                        if let Some(seq) = by_pkid.remove(&ack.pkid) {
                            if let Ok(mut seqs) = acked_seqs.lock() {
                                seqs.push(seq);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return Some(e.to_string()),
                }
            }
        });
        let (c, stop, size) = (counters.clone(), stop.clone(), args.payload);
        let topic = format!("devices/{id}/load");
        let publisher = tokio::spawn(async move {
            let start = Instant::now();
            let mut seq = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            while !stop.load(Ordering::Relaxed) {
                let due =
                    if per_device == 0.0 { seq + 64 } else { (start.elapsed().as_secs_f64() * per_device) as u64 };
                while seq < due && !stop.load(Ordering::Relaxed) {
                    let mut payload = vec![0u8; size];
                    payload[..8].copy_from_slice(&now_us().to_le_bytes());
                    payload[8..16].copy_from_slice(&seq.to_le_bytes());
                    if client.publish(topic.as_str(), qos, false, payload).await.is_err() {
                        return;
                    }
                    seq += 1;
                    c.sent.fetch_add(1, Ordering::Relaxed);
                }
                if per_device > 0.0 {
                    tick.tick().await;
                }
            }
            let _ = client.disconnect().await;
        });
        devices.push((publisher, events));
    }

    // Progress, once a second, for the bounded duration.
    let started = Instant::now();
    let mut last = (0u64, 0u64);
    let mut peak = 0u64;
    while started.elapsed() < Duration::from_secs(args.duration) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (sent, received) = (counters.sent.load(Ordering::Relaxed), counters.received.load(Ordering::Relaxed));
        peak = peak.max(received - last.1);
        eprint!(
            "\r{:>4}s  sent {:>9} ({:>7}/s)  acked {:>9}  received {:>9} ({:>7}/s)   ",
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
    let received_at_stop = counters.received.load(Ordering::Relaxed);

    // Let the tail arrive: until everything sent is received, or 10 s.
    let drain_until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < drain_until
        && counters.received.load(Ordering::Relaxed) < counters.sent.load(Ordering::Relaxed)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!();
    for (publisher, events) in devices {
        let _ = publisher.await;
        events.abort();
    }
    let (sent, acked, received) = (
        counters.sent.load(Ordering::Relaxed),
        counters.acked.load(Ordering::Relaxed),
        counters.received.load(Ordering::Relaxed),
    );
    let _ = stop_sub.send(());
    let hist = subscriber.await.ok();
    println!(
        "devices={} qos={} payload={}B target_rate={}/s duration={}s",
        args.devices, args.qos, args.payload, args.rate, args.duration
    );
    println!("sent={sent} acked={acked} received={received} missing={}", sent.saturating_sub(received));
    println!(
        "delivered_rate={:.0} msg/s (received during publishing / publishing time), peak_second={peak} msg/s",
        received_at_stop as f64 / publish_secs
    );
    if let Some(h) = hist.filter(|h| !h.is_empty()) {
        println!("latency_us p50={} p99={} max={}", h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max());
    }
    if args.verify {
        verify(&nats, &args, run_started, &acked_by_device).await?;
    }
    Ok(())
}

/// Reads the stream from the run's start and reports PUBACKed messages
/// that are not in it, and messages stored more than once.
async fn verify(
    nats: &async_nats::Client,
    args: &Args,
    since: SystemTime,
    acked_by_device: &[(String, Arc<Mutex<Vec<u64>>>)],
) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{self, DeliverPolicy};
    let js = async_nats::jetstream::new(nats.clone());
    let stream = js.get_stream(&args.stream).await.context("stream for --verify")?;
    let start = time::OffsetDateTime::from(since - Duration::from_secs(1));
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: DeliverPolicy::ByStartTime { start_time: start },
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await?;
    let mut stored: HashMap<String, HashSet<u64>> = HashMap::new();
    let mut duplicates = 0u64;
    let mut scratch = fluxmesh_schemas::frame::AlignedVec::new();
    let mut messages = consumer.messages().await?;
    let prefix = format!("{}-", args.prefix);
    loop {
        let next = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
        let Ok(Some(Ok(msg))) = next else { break };
        let Ok(frame) = fluxmesh_schemas::frame::access(&msg.payload, &mut scratch) else { continue };
        if !frame.device.as_str().starts_with(&prefix) {
            continue;
        }
        if let fluxmesh_schemas::frame::ArchivedBody::Telemetry { payload } = &frame.body {
            if let Some(seq) = payload.get(8..16).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                if !stored.entry(frame.device.as_str().to_owned()).or_default().insert(u64::from_le_bytes(seq)) {
                    duplicates += 1;
                }
            }
        }
    }
    let (mut acked, mut lost) = (0u64, 0u64);
    for (device, seqs) in acked_by_device {
        let seqs = seqs.lock().map(|s| s.clone()).unwrap_or_default();
        let have = stored.get(device);
        acked += seqs.len() as u64;
        lost += seqs.iter().filter(|s| !have.is_some_and(|h| h.contains(s))).count() as u64;
    }
    let stored_total: usize = stored.values().map(HashSet::len).sum();
    println!("verify: acked={acked} stored={stored_total} acked_but_missing={lost} stored_twice={duplicates}");
    Ok(())
}
