//! Commands to devices.
//!
//! Anyone sends a NATS request to `{prefix}.cmd.{device}` (escaped device id)
//! with the command as the payload. Every node hears it; only the owner of
//! the device's shard answers, so each request is handled once:
//!
//! 1. The owner asks `{prefix}.sessq.{device}` which node holds the device's
//!    MQTT session (subscribed to `devices/{device}/cmd`). That node writes
//!    the command at QoS1 on `devices/{device}/cmd` and, on the device's
//!    PUBACK, the answer is `{"status":"delivered","node":…}`.
//! 2. If no node holds the session, the command is kept in the `{PREFIX}_CMDQ`
//!    stream on `{prefix}.cmdq.{shard}.{device}` (at most
//!    `commands.max_queued_per_device`; past that the answer is
//!    `{"status":"rejected","reason":"queue_full"}`), and the answer is
//!    `{"status":"queued","id":…,"expires_us":…}`.
//! 3. When the device subscribes to its command topic, on any node, that
//!    node delivers what is queued for it, oldest first. Every queued
//!    command ends in an event frame on `{prefix}.evt.{shard}.{device}.cmd`
//!    (`{"id":…,"status":"delivered"|"expired"}`): a command that outlives
//!    `commands.ttl_ms` is reported expired, never silently dropped.
//!
//! While a shard has no owner (a failover in progress), nobody answers and
//! the requester's own timeout fires: send again.

use crate::lifecycle::Lifecycle;
use crate::mqtt::LocalSessions;
use async_nats::jetstream::consumer;
use bytes::Bytes;
use fluxmesh_mesh::cluster::ClusterHandle;
use fluxmesh_mesh::Mesh;
use fluxmesh_schemas::subject::unescape_token;
use fluxmesh_schemas::{shard_of, Body, Frame, FrameId, Subjects};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// The `[commands]` config section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// How long a command for an offline device is kept.
    pub ttl_ms: u64,
    /// Commands kept per offline device, at most; more are refused.
    pub max_queued_per_device: i64,
    /// How long to wait for the device's PUBACK.
    pub deliver_timeout_ms: u64,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig { ttl_ms: 3_600_000, max_queued_per_device: 100, deliver_timeout_ms: 10_000 }
    }
}

impl CommandsConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.ttl_ms < 100 {
            problems.push("commands.ttl_ms: must be at least 100".to_owned());
        }
        if !(1..=100_000).contains(&self.max_queued_per_device) {
            problems.push("commands.max_queued_per_device: must be between 1 and 100000".to_owned());
        }
        if !(100..=600_000).contains(&self.deliver_timeout_ms) {
            problems.push("commands.deliver_timeout_ms: must be between 100 and 600000".to_owned());
        }
        problems
    }
}

/// Header naming when a queued command expires (µs since the epoch).
const EXPIRES: &str = "Fm-Expires-Us";
/// Header with the command's id.
const COMMAND_ID: &str = "Fm-Command-Id";

/// What the command service needs.
#[derive(Debug)]
pub struct Commands {
    pub mesh: Mesh,
    pub node_id: String,
    pub cluster: ClusterHandle,
    pub sessions: LocalSessions,
    pub cfg: CommandsConfig,
}

impl Commands {
    fn queue_stream(&self) -> String {
        self.mesh.subjects().command_queue_stream()
    }

    fn queue_subject(&self, device: &str) -> String {
        self.mesh.subjects().command_queue(shard_of(device, self.mesh.shards()), device)
    }

    /// Whether this node owns `device`'s shard right now.
    fn owns(&self, device: &str) -> bool {
        let view = self.cluster.view();
        view.leases.get(&shard_of(device, self.mesh.shards())).is_some_and(|l| self.cluster.holds(&l.lease))
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.deliver_timeout_ms)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommandsError {
    #[error("cannot set up commands: the queue stream")]
    Queue(#[source] fluxmesh_mesh::stores::StoreError),
    #[error("cannot set up commands: subscribing to {subject}")]
    Subscribe {
        subject: String,
        #[source]
        source: async_nats::SubscribeError,
    },
}

/// Creates (or opens) the queue stream: before [`start`]; JetStream may
/// be slow to answer while it recovers, so the node retries it.
pub async fn open_queue(commands: &Commands) -> Result<(), CommandsError> {
    let limits = fluxmesh_mesh::stores::QueueLimits {
        per_device: commands.cfg.max_queued_per_device,
        // A backstop only: expiry is reported by `sweep` before this.
        max_age: Duration::from_millis(commands.cfg.ttl_ms) * 2 + Duration::from_secs(60),
    };
    fluxmesh_mesh::stores::open_command_queue(
        commands.mesh.js(),
        commands.mesh.subjects(),
        commands.mesh.layout().replicas,
        limits,
    )
    .await
    .map(|_| ())
    .map_err(CommandsError::Queue)
}

/// Starts the service's tasks on `life` (the queue stream is open).
pub async fn start(
    commands: Arc<Commands>,
    cmd_ready: tokio::sync::mpsc::Receiver<String>,
    life: &Lifecycle,
) -> Result<(), CommandsError> {
    let prefix = commands.mesh.subjects().prefix().to_owned();
    let subscribe = |subject: String| {
        let client = commands.mesh.client().clone();
        async move { client.subscribe(subject.clone()).await.map_err(|source| CommandsError::Subscribe { subject, source }) }
    };
    let requests = subscribe(format!("{prefix}.cmd.>")).await?;
    let locate = subscribe(format!("{prefix}.sessq.>")).await?;
    let deliver = subscribe(format!("{prefix}.node.{}.deliver", escape(&commands.node_id))).await?;
    life.spawn(serve_requests(commands.clone(), requests, life.clone()));
    life.spawn(serve_locate(commands.clone(), locate, life.clone()));
    life.spawn(serve_deliver(commands.clone(), deliver, life.clone()));
    life.spawn(drain_ready(commands, cmd_ready, life.clone()));
    Ok(())
}

fn escape(s: &str) -> String {
    fluxmesh_schemas::subject::escape_token(s).into_owned()
}

/// The device named by the last token of `subject`.
fn device_of(subject: &str) -> Option<String> {
    unescape_token(subject.rsplit('.').next()?).ok().map(|d| d.into_owned())
}

async fn reply(client: &async_nats::Client, to: Option<async_nats::Subject>, body: serde_json::Value) {
    if let Some(to) = to {
        let _ = client.publish(to, body.to_string().into()).await;
    }
}

/// Handles `{prefix}.cmd.{device}` requests for the shards this node owns.
async fn serve_requests(c: Arc<Commands>, mut sub: async_nats::Subscriber, life: Lifecycle) {
    // Bounded: at most this many commands in progress on this node.
    let slots = Arc::new(tokio::sync::Semaphore::new(256));
    loop {
        let msg = tokio::select! {
            _ = life.stopped() => return,
            m = sub.next() => match m { Some(m) => m, None => return },
        };
        let Some(device) = device_of(&msg.subject) else {
            metrics::counter!(crate::internal_events::names::COMMANDS_TOTAL, "status" => "bad_subject").increment(1);
            reply(c.mesh.client(), msg.reply, json!({"status": "rejected", "reason": "bad_subject"})).await;
            continue;
        };
        if !c.owns(&device) {
            continue;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let c = c.clone();
        // Tracked: the node's shutdown waits for it (bounded by the
        // delivery timeout).
        life.spawn(async move {
            let answer = handle(&c, &device, msg.payload.clone(), msg.headers.as_ref()).await;
            let status = answer["status"].as_str().unwrap_or("?").to_owned();
            metrics::counter!(crate::internal_events::names::COMMANDS_TOTAL, "status" => status).increment(1);
            reply(c.mesh.client(), msg.reply, answer).await;
            drop(slot);
        });
    }
}

async fn handle(
    c: &Commands,
    device: &str,
    payload: Bytes,
    headers: Option<&async_nats::HeaderMap>,
) -> serde_json::Value {
    let id = headers
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
    // Who holds the session (subscribed to its commands)?
    let located = locate(c.mesh.client(), c.mesh.subjects(), device, Duration::from_millis(500)).await;
    if let Some(Located { node, commands: true }) = located {
        let subject = format!("{}.node.{}.deliver", c.mesh.subjects().prefix(), escape(&node));
        let mut h = async_nats::HeaderMap::new();
        h.insert("Fm-Device", escape(device).as_str());
        let forwarded = c.mesh.client().request_with_headers(subject, h, payload.clone());
        match tokio::time::timeout(c.timeout() + Duration::from_secs(1), forwarded).await {
            Ok(Ok(answer)) => {
                if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&answer.payload) {
                    v["id"] = json!(id);
                    if v["status"] == "delivered" {
                        return v;
                    }
                }
            }
            _ => tracing::debug!(%device, %node, "delivery through the session's node failed; queueing"),
        }
    }
    // Nobody has it (or delivery failed): keep it for when it connects.
    let expires_us = fluxmesh_schemas::frame::now_us()
        .saturating_add(i64::try_from(c.cfg.ttl_ms.saturating_mul(1000)).unwrap_or(i64::MAX));
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", id.as_str());
    h.insert(COMMAND_ID, id.as_str());
    h.insert(EXPIRES, expires_us.to_string().as_str());
    match c.mesh.js().publish_with_headers(c.queue_subject(device), h, payload).await {
        Ok(ack) => match ack.await {
            Ok(_) => json!({"status": "queued", "id": id, "expires_us": expires_us}),
            Err(e) if queue_full(&e) => json!({"status": "rejected", "reason": "queue_full", "id": id}),
            Err(e) => json!({"status": "failed", "reason": fluxmesh_mesh::error_chain(&e), "id": id}),
        },
        Err(e) => json!({"status": "failed", "reason": fluxmesh_mesh::error_chain(&e), "id": id}),
    }
}

/// The queue refused the command because the device's queue is full. The
/// queue stream's only store limit is the per-device count (discard new
/// per subject), so a "store failed" answer (JetStream error 10077) means
/// that limit; its text ("maximum messages per subject exceeded") is not
/// matched.
fn queue_full(e: &async_nats::jetstream::context::PublishError) -> bool {
    use std::error::Error as _;
    e.source()
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|js| js.error_code() == async_nats::jetstream::ErrorCode::STREAM_STORE_FAILED)
}

/// Why queued commands could not be delivered or settled.
#[derive(Debug, thiserror::Error)]
enum QueueError {
    #[error("cannot open the command queue stream")]
    Stream(#[source] async_nats::jetstream::context::GetStreamError),
    #[error("cannot read the command queue")]
    Read(#[source] fluxmesh_mesh::ReadError),
    #[error("cannot encode the command report")]
    Encode(#[source] fluxmesh_schemas::frame::FrameError),
    #[error("cannot store the command report")]
    Report(#[source] fluxmesh_mesh::PublishError),
    #[error("the device did not take the command")]
    NotDelivered(#[source] crate::mqtt::DeliverError),
}

/// Where a device's MQTT session is, as `{prefix}.sessq.{device}` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Located {
    pub node: String,
    /// The device subscribed to its command topic.
    pub commands: bool,
}

/// Asks the cluster which node holds `device`'s session (nodes that do
/// not stay silent, so no answer within `wait` means nowhere).
pub async fn locate(client: &async_nats::Client, subjects: &Subjects, device: &str, wait: Duration) -> Option<Located> {
    let request = client.request(format!("{}.sessq.{}", subjects.prefix(), escape(device)), Bytes::new());
    let answer = tokio::time::timeout(wait, request).await.ok()?.ok()?;
    serde_json::from_slice(&answer.payload).ok()
}

/// Answers "who holds this device's session?" when this node does.
async fn serve_locate(c: Arc<Commands>, mut sub: async_nats::Subscriber, life: Lifecycle) {
    loop {
        let msg = tokio::select! {
            _ = life.stopped() => return,
            m = sub.next() => match m { Some(m) => m, None => return },
        };
        if let (Some(device), Some(to)) = (device_of(&msg.subject), msg.reply) {
            if c.sessions.connected(&device) {
                let here = Located { node: c.node_id.clone(), commands: c.sessions.ready(&device) };
                if let Ok(body) = serde_json::to_vec(&here) {
                    let _ = c.mesh.client().publish(to, body.into()).await;
                }
            }
        }
    }
}

/// Writes forwarded commands to local sessions.
async fn serve_deliver(c: Arc<Commands>, mut sub: async_nats::Subscriber, life: Lifecycle) {
    // Bounded like requests: at most this many deliveries in progress.
    let slots = Arc::new(tokio::sync::Semaphore::new(256));
    loop {
        let msg = tokio::select! {
            _ = life.stopped() => return,
            m = sub.next() => match m { Some(m) => m, None => return },
        };
        let device =
            msg.headers.as_ref().and_then(|h| h.get("Fm-Device")).and_then(|d| unescape_token(d.as_str()).ok());
        let Some(device) = device.map(|d| d.into_owned()) else { continue };
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let c = c.clone();
        life.spawn(async move {
            let answer = match c.sessions.deliver(&device, msg.payload, c.timeout()).await {
                Ok(()) => json!({"status": "delivered", "node": c.node_id}),
                Err(e) => json!({"status": "not_delivered", "reason": e.reason(), "node": c.node_id}),
            };
            reply(c.mesh.client(), msg.reply, answer).await;
            drop(slot);
        });
    }
}

/// Delivers queued commands to devices that subscribed to their command
/// topic here; every few seconds also to every such device (a notice that
/// did not fit in the channel is not lost), and reports expired commands
/// of the shards this node owns.
async fn drain_ready(c: Arc<Commands>, mut ready: tokio::sync::mpsc::Receiver<String>, life: Lifecycle) {
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = life.stopped() => return,
            Some(device) = ready.recv() => {
                if let Err(e) = drain_device(&c, &device).await {
                    tracing::warn!(%device, error = %fluxmesh_mesh::error_chain(&e), "delivering queued commands failed; retried on the next sweep");
                }
            }
            _ = sweep.tick() => {
                for device in c.sessions.ready_devices() {
                    let _ = drain_device(&c, &device).await;
                }
                if let Err(e) = report_expired(&c).await {
                    tracing::warn!(error = %fluxmesh_mesh::error_chain(&e), "sweeping expired commands failed");
                }
            }
        }
    }
}

/// Delivers what is queued for `device`, oldest first; stops at the first
/// failure (the rest stays queued).
async fn drain_device(c: &Commands, device: &str) -> Result<(), QueueError> {
    for (seq, msg) in read_queue(c, c.queue_subject(device)).await? {
        let (id, expires) = meta(&msg);
        if expires <= fluxmesh_schemas::frame::now_us() {
            settle(c, device, seq, &id, "expired").await?;
            continue;
        }
        c.sessions.deliver(device, msg.payload.clone(), c.timeout()).await.map_err(QueueError::NotDelivered)?;
        settle(c, device, seq, &id, "delivered").await?;
    }
    Ok(())
}

/// Reports and removes expired commands of the shards this node owns.
async fn report_expired(c: &Commands) -> Result<(), QueueError> {
    let now = fluxmesh_schemas::frame::now_us();
    for (seq, msg) in read_queue(c, c.mesh.subjects().command_queue_filter()).await? {
        let Some(device) = device_of(&msg.subject) else { continue };
        let (id, expires) = meta(&msg);
        if expires <= now && c.owns(&device) {
            settle(c, &device, seq, &id, "expired").await?;
        }
    }
    Ok(())
}

fn meta(msg: &async_nats::Message) -> (String, i64) {
    let h = msg.headers.as_ref();
    let id = h.and_then(|h| h.get(COMMAND_ID)).map(|v| v.as_str().to_owned()).unwrap_or_default();
    let expires = h.and_then(|h| h.get(EXPIRES)).and_then(|v| v.as_str().parse().ok()).unwrap_or(0);
    (id, expires)
}

/// The queued commands on `filter`, with their stream sequences.
async fn read_queue(c: &Commands, filter: String) -> Result<Vec<(u64, async_nats::Message)>, QueueError> {
    let stream = c.mesh.js().get_stream(c.queue_stream()).await.map_err(QueueError::Stream)?;
    let config = consumer::pull::Config { filter_subject: filter, ..Default::default() };
    let mut out = Vec::new();
    fluxmesh_mesh::read_pending(&stream, config, Duration::from_secs(5), |m| {
        let seq = m.info()?.stream_sequence;
        out.push((seq, m.message));
        Ok(())
    })
    .await
    .map_err(QueueError::Read)?;
    Ok(out)
}

/// Reports what became of a queued command, then removes it. The report's
/// id comes from the command's, so reporting twice stores it once.
async fn settle(c: &Commands, device: &str, seq: u64, id: &str, status: &str) -> Result<(), QueueError> {
    let shard = shard_of(device, c.mesh.shards());
    let body = json!({"id": id, "status": status}).to_string().into_bytes();
    let mut frame = Frame::telemetry(device, "cmd", &c.node_id, Vec::new());
    frame.id = FrameId::from_key(format!("cmd\0{id}\0{status}").as_bytes());
    frame.producer = "commands".to_owned();
    frame.body = Body::Event { json: body };
    let bytes = frame.encode().map_err(QueueError::Encode)?;
    let pending = c
        .mesh
        .publisher()
        .publish(c.mesh.subjects().event(shard, device, "cmd"), fluxmesh_mesh::frame_headers(&frame), bytes.into())
        .await
        .map_err(QueueError::Report)?;
    pending.ack().await.map_err(QueueError::Report)?;
    metrics::counter!(crate::internal_events::names::COMMANDS_SETTLED_TOTAL, "status" => status.to_owned())
        .increment(1);
    let stream = c.mesh.js().get_stream(c.queue_stream()).await.map_err(QueueError::Stream)?;
    // Already gone (another node settled it first) is fine.
    let _ = stream.delete_message(seq).await;
    Ok(())
}
