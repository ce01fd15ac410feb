//! fluxmesh-js-ceiling: the JetStream ceiling for fluxmesh-shaped messages.
//!
//! Publishes real telemetry frames (64-byte payloads, the same subjects and
//! headers a node sends) straight to JetStream with async-nats, pipelined
//! through a window of outstanding acks, from one process and with no MQTT
//! or node in the way. Compare its msg/s with fluxmesh-loadgen's on the same
//! cluster: the ratio is how much of JetStream's capacity the mesh delivers.
//! Bounded in count and time; loopback NATS only.
//!
//! `fluxmesh-js-ceiling --nats $FLUXMESH_NATS_URLS --messages 400000`

use anyhow::{bail, Context as _};
use clap::Parser;
use fluxmesh_schemas::{shard_of, DeviceTopic, Frame, Subjects};
use futures::stream::{FuturesUnordered, StreamExt};
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "nats://127.0.0.1:4222", value_delimiter = ',')]
    nats: Vec<String>,
    /// Messages to publish (at most 5,000,000).
    #[arg(long, default_value_t = 400_000)]
    messages: u64,
    /// Outstanding acks at most.
    #[arg(long, default_value_t = 2048)]
    window: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Devices to spread the messages over.
    #[arg(long, default_value_t = 10)]
    devices: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.messages == 0 || args.messages > 5_000_000 {
        bail!("--messages must be 1..=5000000");
    }
    for url in &args.nats {
        let host = url.trim_start_matches("nats://").split(':').next().unwrap_or_default();
        if !(host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())) {
            bail!("{url}: load goes to loopback addresses only");
        }
    }
    let addrs = args.nats.iter().map(|u| u.parse::<async_nats::ServerAddr>()).collect::<Result<Vec<_>, _>>()?;
    let client = async_nats::connect(addrs).await.context("NATS")?;
    let js = async_nats::jetstream::context::ContextBuilder::new().max_ack_inflight(args.window + 64).build(client);
    let subjects = Subjects::new("fm")?;
    let devices: Vec<String> = (0..args.devices).map(|d| format!("ceiling-{d}")).collect();
    let mut pending = FuturesUnordered::new();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(300);
    let mut acked = 0u64;
    for i in 0..args.messages {
        if Instant::now() > deadline {
            bail!("ran past 300 s");
        }
        while pending.len() >= args.window {
            if let Some(r) = pending.next().await {
                let _: async_nats::jetstream::publish::PublishAck = r?;
                acked += 1;
            }
        }
        let device = &devices[(i % args.devices as u64) as usize];
        let topic = DeviceTopic::new(device, "load")?;
        let frame = Frame::telemetry(device, "load", "ceiling", vec![7; args.payload]);
        let subject = subjects.telemetry(shard_of(device, 64), &topic);
        let ack =
            js.publish_with_headers(subject, fluxmesh_mesh::frame_headers(&frame), frame.encode()?.into()).await?;
        pending.push(std::future::IntoFuture::into_future(ack));
    }
    while let Some(r) = pending.next().await {
        r?;
        acked += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "published and acked {acked} frames in {secs:.2} s: {:.0} msg/s (window {})",
        acked as f64 / secs,
        args.window
    );
    Ok(())
}
