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
//!
//! Two modes:
//! - `--mode pipelined` (default): one JetStream publish per message, each
//!   answered by its own PubAck, at most `--window` of them outstanding. This
//!   is what a node does today.
//! - `--mode fast-batch`: JetStream fast-ingest batch publishing (ADR-50,
//!   nats-server 2.14+, stream option `allow_batched`). The messages are plain
//!   core publishes whose reply subject carries the batch state,
//!   `{inbox}.{batch id}.{flow}.fail.{batch seq}.{op}.$FI`; the server stores
//!   each as it arrives and answers on `{inbox}.>` only with a flow ack
//!   (`{"type":"ack","seq":S,"msgs":N}`: with gap mode `fail`, every message
//!   of the batch up to S is stored; the next ack comes N messages later),
//!   plus one PubAck when the last message commits the batch. At most
//!   `--max-acks` × N messages are unacked. Any gap, error or unexpected
//!   reply fails the run.
//!
//! Without `--stream`, pipelined mode publishes to fluxmesh's own `fm.tel.…`
//! subjects, i.e. to whatever streams the cluster has (the historical
//! behaviour). With `--stream NAME` (always so in fast-batch mode, default
//! `CEILING`) the bench creates or updates that stream itself, subjects
//! `ceil.>`, `--replicas` replicas, `allow_batched` on, publishes to
//! `ceil.tel.…`, checks at the end that the stream's message count grew by
//! exactly `--messages`, and deletes the stream.
//!
//! `fluxmesh-js-ceiling --nats $URLS --mode fast-batch --replicas 3 --messages 200000`

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use fluxmesh_schemas::{shard_of, DeviceTopic, Frame, Subjects};
use futures::stream::{FuturesUnordered, StreamExt};
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// One JetStream PubAck per message, up to --window outstanding.
    Pipelined,
    /// ADR-50 fast-ingest batches: flow acks every N messages.
    FastBatch,
}

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "nats://127.0.0.1:4222", value_delimiter = ',')]
    nats: Vec<String>,
    /// Messages to publish (at most 5,000,000).
    #[arg(long, default_value_t = 400_000)]
    messages: u64,
    /// Outstanding acks at most (pipelined mode).
    #[arg(long, default_value_t = 2048)]
    window: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Devices to spread the messages over.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// How the messages are published.
    #[arg(long, value_enum, default_value_t = Mode::Pipelined)]
    mode: Mode,
    /// fast-batch: the most messages per flow ack the server may choose (the
    /// "initial flow" of the reply subject; the server caps it at 500, and
    /// lower when several fast batches share the stream).
    #[arg(long, default_value_t = 100)]
    flow: u16,
    /// fast-batch: flow acks outstanding at most; unacked messages are at
    /// most this times the server's current flow.
    #[arg(long, default_value_t = 2)]
    max_acks: u64,
    /// fast-batch: messages per batch; 0 sends the whole run as one batch.
    #[arg(long, default_value_t = 0)]
    batch: u64,
    /// Create or update this stream (subjects `ceil.>`), publish to it,
    /// check its message count and delete it at the end. fast-batch mode
    /// always does so, with `CEILING` unless named.
    #[arg(long)]
    stream: Option<String>,
    /// Replicas of the stream the bench creates.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Process ids (the nats-servers) whose CPU time to report per message.
    #[arg(long, value_delimiter = ',')]
    cpu_pids: Vec<u32>,
}

const DEADLINE: Duration = Duration::from_secs(300);
/// Subject prefix of the bench's own stream.
const OWN_PREFIX: &str = "ceil";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.messages == 0 || args.messages > 5_000_000 {
        bail!("--messages must be 1..=5000000");
    }
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if !(1..=5).contains(&args.replicas) {
        bail!("--replicas must be 1..=5");
    }
    if args.flow == 0 {
        bail!("--flow must be 1..=65535");
    }
    if args.max_acks == 0 {
        bail!("--max-acks must be at least 1");
    }
    for url in &args.nats {
        let host = url.trim_start_matches("nats://").split(':').next().unwrap_or_default();
        if !(host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())) {
            bail!("{url}: load goes to loopback addresses only");
        }
    }
    let own_stream = match (&args.stream, args.mode) {
        (Some(name), _) => Some(name.clone()),
        (None, Mode::FastBatch) => Some("CEILING".to_owned()),
        (None, Mode::Pipelined) => None,
    };
    let addrs = args.nats.iter().map(|u| u.parse::<async_nats::ServerAddr>()).collect::<Result<Vec<_>, _>>()?;
    let client = async_nats::connect(addrs).await.context("NATS")?;
    let js = jetstream::context::ContextBuilder::new().max_ack_inflight(args.window + 64).build(client.clone());

    let before = match &own_stream {
        Some(name) => Some(create_stream(&js, name, args.replicas).await?),
        None => None,
    };
    let prefix = if own_stream.is_some() { OWN_PREFIX } else { "fm" };
    let frames = Frames::new(prefix, args.devices, args.payload)?;

    let cpu_before = Cpu::sample(&args.cpu_pids)?;
    let started = Instant::now();
    let run = match args.mode {
        Mode::Pipelined => pipelined(&js, &frames, &args, started + DEADLINE).await.map(|acked| (acked, String::new())),
        Mode::FastBatch => fast_batch(&client, &frames, &args, started + DEADLINE).await.map(|o| {
            (o.messages, format!(", {} batch(es), flow asked {}, given up to {}", o.batches, args.flow, o.max_flow))
        }),
    };
    let secs = started.elapsed().as_secs_f64();
    let cpu_after = Cpu::sample(&args.cpu_pids);

    // Check the count, then delete the stream whatever happened.
    let checked = match (&own_stream, before, &run) {
        (Some(name), Some(before), Ok(_)) => stream_messages(&js, name).await.map(|after| Some(after - before)),
        _ => Ok(None),
    };
    if let Some(name) = &own_stream {
        if let Err(e) = js.delete_stream(name).await {
            eprintln!("could not delete stream {name}: {e}");
        }
    }
    let (acked, detail) = run?;
    let stored = checked?;
    if let Some(stored) = stored {
        if stored != args.messages {
            bail!("the stream grew by {stored} messages, but {} were published and acked", args.messages);
        }
    }
    let cpu_after = cpu_after?;

    let rate = acked as f64 / secs;
    match args.mode {
        Mode::Pipelined => {
            println!("published and acked {acked} frames in {secs:.2} s: {rate:.0} msg/s (window {})", args.window)
        }
        Mode::FastBatch => {
            println!("published and acked {acked} frames in {secs:.2} s: {rate:.0} msg/s (fast-batch{detail})")
        }
    }
    let per_msg = |ticks: u64| ticks as f64 * 1e6 / TICKS_PER_SEC / acked as f64;
    let servers = cpu_after.servers.saturating_sub(cpu_before.servers);
    println!(
        "result mode={:?} stream={} replicas={} devices={} messages={acked} stored={} secs={secs:.3} msg_per_s={rate:.0} \
         client_us_per_msg={:.2} servers_us_per_msg={}",
        args.mode,
        own_stream.as_deref().unwrap_or("-"),
        if own_stream.is_some() { args.replicas.to_string() } else { "-".to_owned() },
        args.devices,
        stored.map_or("unchecked".to_owned(), |s| s.to_string()),
        per_msg(cpu_after.own.saturating_sub(cpu_before.own)),
        if args.cpu_pids.is_empty() { "-".to_owned() } else { format!("{:.2}", per_msg(servers)) },
    );
    Ok(())
}

/// Creates (or updates) the bench's stream and returns its message count.
async fn create_stream(js: &jetstream::Context, name: &str, replicas: usize) -> anyhow::Result<u64> {
    let config = stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{OWN_PREFIX}.>")],
        num_replicas: replicas,
        storage: stream::StorageType::File,
        // Harmless for plain publishes; both modes run against the same config.
        allow_batch_publish: true,
        ..Default::default()
    };
    let info = js.create_or_update_stream(config).await.with_context(|| format!("creating stream {name}"))?;
    Ok(info.state.messages)
}

async fn stream_messages(js: &jetstream::Context, name: &str) -> anyhow::Result<u64> {
    let stream = js.get_stream(name).await.with_context(|| format!("stream {name}"))?;
    Ok(stream.get_info().await.with_context(|| format!("stream {name} info"))?.state.messages)
}

/// Builds the i-th message: the frame, subject and headers a node would send.
struct Frames {
    subjects: Subjects,
    devices: Vec<String>,
    payload: usize,
}

impl Frames {
    fn new(prefix: &str, devices: usize, payload: usize) -> anyhow::Result<Frames> {
        Ok(Frames {
            subjects: Subjects::new(prefix)?,
            devices: (0..devices).map(|d| format!("ceiling-{d}")).collect(),
            payload,
        })
    }

    fn get(&self, i: u64) -> anyhow::Result<(String, HeaderMap, Bytes)> {
        let device = &self.devices[(i % self.devices.len() as u64) as usize];
        let topic = DeviceTopic::new(device, "load")?;
        let frame = Frame::telemetry(device, "load", "ceiling", vec![7; self.payload]);
        let subject = self.subjects.telemetry(shard_of(device, 64), &topic);
        Ok((subject, fluxmesh_mesh::frame_headers(&frame), frame.encode()?.into()))
    }
}

/// One JetStream publish per message, at most `--window` acks outstanding.
async fn pipelined(js: &jetstream::Context, frames: &Frames, args: &Args, deadline: Instant) -> anyhow::Result<u64> {
    let mut pending = FuturesUnordered::new();
    let mut acked = 0u64;
    for i in 0..args.messages {
        if Instant::now() > deadline {
            bail!("ran past {} s", DEADLINE.as_secs());
        }
        while pending.len() >= args.window {
            if let Some(r) = pending.next().await {
                let _: jetstream::publish::PublishAck = r?;
                acked += 1;
            }
        }
        let (subject, headers, payload) = frames.get(i)?;
        let ack = js.publish_with_headers(subject, headers, payload).await?;
        pending.push(std::future::IntoFuture::into_future(ack));
    }
    while let Some(r) = pending.next().await {
        r?;
        acked += 1;
    }
    Ok(acked)
}

// Fast-ingest batch operations, the last but one token of the reply subject.
const OP_START: u8 = 0;
const OP_APPEND: u8 = 1;
const OP_COMMIT: u8 = 2;
const OP_PING: u8 = 4;

/// Silence while waiting for the server before the bench pings the batch
/// (which makes the server resend its last flow ack), and the pings after
/// which it gives up. The server drops a batch after 10 s without traffic.
const PING_AFTER: Duration = Duration::from_secs(1);
const MAX_PINGS: u32 = 8;

struct FastOutcome {
    messages: u64,
    batches: u64,
    max_flow: u64,
}

/// Publishes `--messages` as fast-ingest batches of `--batch` messages (one
/// batch at a time), each checked by its final PubAck.
async fn fast_batch(
    client: &async_nats::Client,
    frames: &Frames,
    args: &Args,
    deadline: Instant,
) -> anyhow::Result<FastOutcome> {
    let per_batch = if args.batch == 0 { args.messages } else { args.batch };
    let mut out = FastOutcome { messages: 0, batches: 0, max_flow: 0 };
    while out.messages < args.messages {
        let n = per_batch.min(args.messages - out.messages);
        let batch = Batch::open(client, args.flow).await?;
        out.max_flow = out.max_flow.max(batch.publish(frames, out.messages, n, args.max_acks, deadline).await?);
        out.messages += n;
        out.batches += 1;
    }
    Ok(out)
}

/// What the server has said so far about one batch.
#[derive(Debug, Default)]
struct FlowState {
    /// Replies received.
    replies: u64,
    /// Highest batch sequence acknowledged: with gap mode `fail`, every
    /// message of the batch up to it is stored.
    acked: u64,
    /// The server's current ack interval.
    msgs: u64,
    /// Batch id, stream sequence and count of the final PubAck.
    pub_ack: Option<(String, u64, u64)>,
    /// The first failure reported.
    error: Option<String>,
}

enum Reply {
    Flow { seq: u64, msgs: u64 },
    PubAck { batch: String, seq: u64, count: u64 },
    Fail(String),
}

struct Batch {
    client: async_nats::Client,
    inbox: String,
    id: String,
    flow: u16,
    state: watch::Receiver<FlowState>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Batch {
    fn drop(&mut self) {
        // Ends the subscription too: the server stops sending to a batch
        // nobody listens to.
        self.reader.abort();
    }
}

impl Batch {
    async fn open(client: &async_nats::Client, flow: u16) -> anyhow::Result<Batch> {
        // A plain (not the request-mux) inbox of its own, as ADR-50 asks.
        let inbox = client.new_inbox();
        let id = uuid::Uuid::now_v7().simple().to_string();
        let sub = client.subscribe(format!("{inbox}.>")).await.context("subscribing to the batch inbox")?;
        let (tx, state) = watch::channel(FlowState::default());
        let reader = tokio::spawn(read_replies(sub, tx));
        Ok(Batch { client: client.clone(), inbox, id, flow, state, reader })
    }

    fn reply(&self, seq: u64, op: u8) -> String {
        format!("{}.{}.{}.fail.{seq}.{op}.$FI", self.inbox, self.id, self.flow)
    }

    /// Sends frames `first..first + n` as this batch, the last one
    /// committing it, and returns the server's last flow value.
    async fn publish(
        mut self,
        frames: &Frames,
        first: u64,
        n: u64,
        max_acks: u64,
        deadline: Instant,
    ) -> anyhow::Result<u64> {
        let mut last_subject = String::new();
        for seq in 1..=n {
            if Instant::now() > deadline {
                bail!("ran past {} s", DEADLINE.as_secs());
            }
            // Sent so far: seq - 1. Wait while too many are unacked.
            if seq > 1 {
                let sent = seq - 1;
                if !self.may_send(sent, max_acks) {
                    self.wait(&last_subject, sent, deadline, |s| {
                        sent.saturating_sub(s.acked) < max_acks * s.msgs.max(1)
                    })
                    .await?;
                }
            }
            let op = if seq == n {
                OP_COMMIT
            } else if seq == 1 {
                OP_START
            } else {
                OP_APPEND
            };
            let (subject, headers, payload) = frames.get(first + seq - 1)?;
            self.client
                .publish_with_reply_and_headers(subject.clone(), self.reply(seq, op), headers, payload)
                .await
                .context("publishing a batch message")?;
            last_subject = subject;
            // The first reply tells whether the stream takes fast batches and
            // the flow to start at: wait for it before sending more.
            if seq == 1 && n > 1 {
                self.wait(&last_subject, seq, deadline, |s| s.replies > 0).await?;
            }
        }
        self.wait(&last_subject, n, deadline, |s| s.pub_ack.is_some()).await?;
        let (pub_ack, flow) = {
            let s = self.state.borrow();
            (s.pub_ack.clone(), s.msgs)
        };
        let Some((batch, stream_seq, count)) = pub_ack else { bail!("batch {}: no final PubAck", self.id) };
        if batch != self.id || count != n {
            bail!(
                "batch {}: the final PubAck says batch {batch:?} with {count} messages (last at stream seq \
                 {stream_seq}), but {n} were sent",
                self.id
            );
        }
        Ok(flow)
    }

    fn may_send(&self, sent: u64, max_acks: u64) -> bool {
        let s = self.state.borrow();
        s.error.is_none() && sent.saturating_sub(s.acked) < max_acks * s.msgs.max(1)
    }

    /// Waits until `done` holds, failing on any error the server reports.
    /// On silence it pings the batch; after `MAX_PINGS` silent pings it fails.
    async fn wait(
        &mut self,
        subject: &str,
        sent: u64,
        deadline: Instant,
        done: impl Fn(&FlowState) -> bool,
    ) -> anyhow::Result<()> {
        let mut pings = 0;
        loop {
            {
                let s = self.state.borrow_and_update();
                if let Some(e) = &s.error {
                    bail!("batch {} (sent {sent}, acked {}): {e}", self.id, s.acked);
                }
                if done(&s) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("ran past {} s", DEADLINE.as_secs());
            }
            match tokio::time::timeout(PING_AFTER, self.state.changed()).await {
                Ok(Ok(())) => pings = 0,
                Ok(Err(_)) => bail!("batch {}: the reply subscription ended", self.id),
                Err(_) => {
                    if pings == MAX_PINGS {
                        bail!(
                            "batch {}: no reply from the server for {} s (sent {sent}, acked {})",
                            self.id,
                            (PING_AFTER * (MAX_PINGS + 1)).as_secs(),
                            self.state.borrow().acked
                        );
                    }
                    pings += 1;
                    // A ping carries the highest sequence sent, not a new one.
                    self.client
                        .publish_with_reply(subject.to_owned(), self.reply(sent, OP_PING), Bytes::new())
                        .await
                        .context("pinging the batch")?;
                }
            }
        }
    }
}

/// Reads the batch's replies into `tx` until the final PubAck or a failure.
async fn read_replies(mut sub: async_nats::Subscriber, tx: watch::Sender<FlowState>) {
    while let Some(m) = sub.next().await {
        let reply = classify(&m);
        let mut end = false;
        tx.send_modify(|s| {
            s.replies += 1;
            match reply {
                Reply::Flow { seq, msgs } => {
                    // A later ack covers any lost earlier one.
                    s.acked = s.acked.max(seq);
                    s.msgs = msgs;
                }
                Reply::PubAck { batch, seq, count } => {
                    s.pub_ack = Some((batch, seq, count));
                    end = true;
                }
                Reply::Fail(e) => {
                    s.error.get_or_insert(e);
                    end = true;
                }
            }
        });
        if end {
            return;
        }
    }
}

fn classify(m: &async_nats::Message) -> Reply {
    if let Some(status) = m.status {
        return Reply::Fail(if status == StatusCode::NO_RESPONDERS {
            "no responders: no stream takes this subject".to_owned()
        } else {
            format!("status {status} {}", m.description.as_deref().unwrap_or_default())
        });
    }
    let v: serde_json::Value = match serde_json::from_slice(&m.payload) {
        Ok(v) => v,
        Err(_) => return Reply::Fail(format!("unreadable reply {:?}", String::from_utf8_lossy(&m.payload))),
    };
    let num = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
    match v.get("type").and_then(serde_json::Value::as_str) {
        Some("ack") => match (num("seq"), num("msgs")) {
            (Some(seq), Some(msgs)) => Reply::Flow { seq, msgs },
            _ => Reply::Fail(format!("malformed flow ack {v}")),
        },
        Some("gap") => Reply::Fail(format!(
            "the server saw a gap: it expected batch seq {}, got {}; the batch is ended",
            num("last_seq").unwrap_or_default(),
            num("seq").unwrap_or_default()
        )),
        Some("err") => Reply::Fail(format!(
            "the server refused batch message {}: {}",
            num("seq").unwrap_or_default(),
            describe(v.get("error"))
        )),
        Some(other) => Reply::Fail(format!("unknown reply type {other:?}: {v}")),
        None if v.get("error").is_some() => Reply::Fail(format!("the batch failed: {}", describe(v.get("error")))),
        None => match (v.get("batch").and_then(serde_json::Value::as_str), num("seq"), num("count")) {
            (Some(batch), Some(seq), Some(count)) => Reply::PubAck { batch: batch.to_owned(), seq, count },
            _ => Reply::Fail(format!("unexpected reply {v}")),
        },
    }
}

/// A JetStream API error, with a hint for the batch-specific codes.
fn describe(error: Option<&serde_json::Value>) -> String {
    let Some(e) = error else { return "no error details".to_owned() };
    let code = e.get("err_code").and_then(serde_json::Value::as_u64).unwrap_or_default();
    let text = e.get("description").and_then(serde_json::Value::as_str).unwrap_or("?");
    let hint = match code {
        10205 => " (the stream needs allow_batched, nats-server 2.14+)",
        10206 => " (malformed reply subject)",
        10207 => " (batch id over 64 characters)",
        10208 => " (the server no longer knows the batch: it timed out, or its start was lost)",
        10211 => " (too many fast batches in flight on the stream or server)",
        _ => "",
    };
    format!("{text} (err_code {code}){hint}")
}

/// USER_HZ: the unit of /proc/PID/stat's CPU times on Linux.
const TICKS_PER_SEC: f64 = 100.0;

struct Cpu {
    own: u64,
    servers: u64,
}

impl Cpu {
    fn sample(pids: &[u32]) -> anyhow::Result<Cpu> {
        let mut servers = 0;
        for pid in pids {
            servers += cpu_ticks(&format!("/proc/{pid}/stat"))?;
        }
        Ok(Cpu { own: cpu_ticks("/proc/self/stat")?, servers })
    }
}

/// utime + stime of a process, in ticks.
fn cpu_ticks(path: &str) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(path).with_context(|| path.to_owned())?;
    // Fields after "(comm)": state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    match (field(11), field(12)) {
        (Some(u), Some(s)) => Ok(u + s),
        _ => bail!("{path}: unexpected format"),
    }
}
