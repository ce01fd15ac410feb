//! One shard's worker: runs only while this node holds the shard's lease.
//!
//! Start: make sure the shard's durable pull consumer exists (`shard-{n}`,
//! filtered to `{prefix}.tel.{n}.>`); if it has deliveries outstanding to
//! nobody (the previous owner died or dropped its pull), recreate it from
//! its ack floor so that delivery is strictly in stream order again; load
//! the shard's checkpointed device states.
//!
//! Then, batch after batch:
//! 1. pull up to `batch` messages;
//! 2. check the lease is still ours (a node that was paused stops here);
//! 3. apply each message to its device's state (redeliveries at or below a
//!    device's `last_stream_seq` are skipped), collecting derived frames;
//! 4. publish the derived frames and wait for their JetStream acks (their
//!    ids come from the input, so a replay is deduplicated); hand the
//!    batch's history rows to the Postgres writer (when storage is on);
//! 5. every `checkpoint_interval_ms` (and before a graceful stop): wait
//!    until the writer has committed every row handed to it, checkpoint the
//!    changed device states, each with compare-and-set on its
//!    KV revision (a node that lost the shard fails here and stops), then
//!    ack everything processed (explicit acks: see `checkpoint`).
//!
//! A crash anywhere before the ack means those messages are delivered again
//! and, from the last checkpoint, produce the same frames with the same ids.

use super::pipeline::{Outputs, Processed, RuleCommand};
use super::state::{state_key, DeviceState};
use super::ShardContext;
use crate::storage::writer::{Commit, Rows};
use async_nats::jetstream::consumer::{self, pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::kv;
use fluxmesh_mesh::cluster::Lease;
use fluxmesh_schemas::frame::AlignedVec;
use fluxmesh_schemas::subject::Family;
use futures::{FutureExt as _, StreamExt as _};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the lease is no longer ours")]
    Fenced,
    #[error("consumer: {0}")]
    Consumer(String),
    #[error("loading device states: {0}")]
    Load(String),
    #[error("publishing derived frames: {0}")]
    Output(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("history: {0}")]
    Storage(String),
}

impl WorkerError {
    /// The `reason` label of `fluxmesh_shard_worker_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            WorkerError::Fenced => "fenced",
            WorkerError::Consumer(_) => "consumer",
            WorkerError::Load(_) => "load",
            WorkerError::Output(_) => "output",
            WorkerError::Checkpoint(_) => "checkpoint",
            WorkerError::Storage(_) => "storage",
        }
    }
}

/// A device's state and the KV revision it was last written at.
#[derive(Debug)]
struct Slot {
    state: DeviceState,
    revision: Option<u64>,
}

/// Runs shard `shard` under `lease` until `stop` (graceful: finishes the
/// batch in hand) or an error.
pub async fn run(ctx: Arc<ShardContext>, shard: u32, lease: Lease, stop: CancellationToken) -> Result<(), WorkerError> {
    let started = Instant::now();
    let consumer = ensure_consumer(&ctx, shard).await?;
    // Deliveries are numbered 1, 2, 3, … per consumer (redeliveries too):
    // a jump means some were lost in flight (a pull request of a previous
    // owner, or a connection that dropped), and applying what follows would
    // put the device states past messages not yet applied.
    let mut next_delivery = consumer.cached_info().delivered.consumer_sequence + 1;
    let mut states = load_states(&ctx, shard).await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(ctx.cfg.batch)
        .expires(Duration::from_secs(5))
        .heartbeat(Duration::from_secs(2))
        .messages()
        .await
        .map_err(|e| WorkerError::Consumer(e.to_string()))?;
    metrics::histogram!("fluxmesh_shard_start_seconds").record(started.elapsed().as_secs_f64());
    tracing::debug!(shard, devices = states.len(), took = ?started.elapsed(), "shard worker started");
    let mut scratch = AlignedVec::new();
    // Processed but not yet checkpointed and acked.
    let mut dirty: BTreeSet<String> = BTreeSet::new();
    let mut unacked: Vec<async_nats::jetstream::Message> = Vec::new();
    // History rows handed to the writer, not yet known to be committed.
    let mut commits: Vec<Commit> = Vec::new();
    let interval = Duration::from_millis(ctx.cfg.checkpoint_interval_ms);
    let mut checkpoint_at = Instant::now() + interval;
    loop {
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => {
                // Graceful: what was processed is checkpointed and acked
                // before the lease is released.
                checkpoint(&ctx, shard, &lease, &mut states, &mut dirty, &mut unacked, &mut commits, &stop).await?;
                return Ok(());
            }
            _ = tokio::time::sleep_until(checkpoint_at.into()), if !unacked.is_empty() => {
                checkpoint(&ctx, shard, &lease, &mut states, &mut dirty, &mut unacked, &mut commits, &stop).await?;
                checkpoint_at = Instant::now() + interval;
                continue;
            }
            m = messages.next() => m,
        };
        let first = match first {
            Some(Ok(m)) => m,
            Some(Err(e)) => match e.kind() {
                pull::MessagesErrorKind::Pull => {
                    tracing::debug!(shard, error = %e, "pull hiccup");
                    continue;
                }
                // A silent consumer (its server went away, or it moved) does
                // not come back by itself: start over from the consumer info.
                _ => {
                    checkpoint(&ctx, shard, &lease, &mut states, &mut dirty, &mut unacked, &mut commits, &stop).await?;
                    return Err(WorkerError::Consumer(e.to_string()));
                }
            },
            None => return Err(WorkerError::Consumer("message stream ended".into())),
        };
        let mut batch = vec![first];
        while batch.len() < ctx.cfg.batch {
            match messages.next().now_or_never() {
                Some(Some(Ok(m))) => batch.push(m),
                _ => break,
            }
        }
        if !ctx.cluster.holds(&lease) {
            return Err(WorkerError::Fenced);
        }
        let mut gap = None;
        for (i, m) in batch.iter().enumerate() {
            let delivery = m.info().map(|info| info.consumer_sequence).unwrap_or(0);
            if delivery != next_delivery {
                gap = Some((i, delivery));
                break;
            }
            next_delivery += 1;
        }
        if let Some((i, _)) = gap {
            batch.truncate(i);
        }
        let took = Instant::now();
        process(&ctx, shard, &batch, &mut states, &mut dirty, &mut scratch, &mut commits).await?;
        metrics::counter!("fluxmesh_shard_messages_total").increment(batch.len() as u64);
        metrics::histogram!("fluxmesh_shard_batch_seconds").record(took.elapsed().as_secs_f64());
        unacked.extend(batch);
        if let Some((_, delivery)) = gap {
            // Keep what is applied, then start over from the ack floor: the
            // lost deliveries come again, in order.
            metrics::counter!("fluxmesh_shard_delivery_gaps_total").increment(1);
            checkpoint(&ctx, shard, &lease, &mut states, &mut dirty, &mut unacked, &mut commits, &stop).await?;
            return Err(WorkerError::Consumer(format!(
                "delivery gap: expected delivery {next_delivery}, got {delivery}; restarting from the ack floor"
            )));
        }
        // Never let unacknowledged deliveries reach the consumer's limit.
        if Instant::now() >= checkpoint_at || unacked.len() >= ctx.cfg.max_ack_pending / 2 {
            checkpoint(&ctx, shard, &lease, &mut states, &mut dirty, &mut unacked, &mut commits, &stop).await?;
            checkpoint_at = Instant::now() + interval;
        }
    }
}

/// Waits until the history rows of everything processed are committed,
/// writes the changed device states (CAS on each revision: a node that
/// lost the shard fails here), then acks everything processed so far.
#[allow(clippy::too_many_arguments)]
async fn checkpoint(
    ctx: &ShardContext,
    shard: u32,
    lease: &Lease,
    states: &mut HashMap<String, Slot>,
    dirty: &mut BTreeSet<String>,
    unacked: &mut Vec<async_nats::jetstream::Message>,
    commits: &mut Vec<Commit>,
    stop: &CancellationToken,
) -> Result<(), WorkerError> {
    if unacked.is_empty() {
        return Ok(());
    }
    let took = Instant::now();
    // Rows first: a checkpoint covering a message whose rows are not
    // stored would skip it on replay, and its rows would never be written.
    wait_commits(ctx, commits, stop).await?;
    if !ctx.cluster.holds(lease) {
        return Err(WorkerError::Fenced);
    }
    let writes = dirty.iter().filter_map(|device| {
        let slot = states.get(device)?;
        let value: bytes::Bytes = serde_json::to_vec(&slot.state).ok()?.into();
        let key = state_key(shard, device);
        let revision = slot.revision;
        let kv = &ctx.states;
        Some(async move {
            let result = match revision {
                None => kv.create(&key, value).await.map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => WorkerError::Fenced,
                    _ => WorkerError::Checkpoint(e.to_string()),
                }),
                Some(r) => kv.update(&key, value, r).await.map_err(|e| match e.kind() {
                    kv::UpdateErrorKind::WrongLastRevision => WorkerError::Fenced,
                    _ => WorkerError::Checkpoint(e.to_string()),
                }),
            };
            (device.clone(), result)
        })
    });
    for (device, result) in futures::future::join_all(writes).await {
        let revision = result?;
        if let Some(slot) = states.get_mut(&device) {
            slot.revision = Some(revision);
        }
    }
    metrics::counter!("fluxmesh_shard_checkpoint_writes_total").increment(dirty.len() as u64);
    dirty.clear();
    // Explicit acks, one per message. (AckPolicy::All would be one ack,
    // but a late ack from a previous owner, landing on the re-created
    // consumer of the same name, would move its ack floor past messages it
    // never delivered: found by chaos/kill-nats.)
    for m in unacked.drain(..) {
        if let Err(e) = m.ack().await {
            // Delivered again later and skipped as already applied.
            tracing::debug!(shard, error = %e, "ack failed");
        }
    }
    metrics::histogram!("fluxmesh_shard_checkpoint_seconds").record(took.elapsed().as_secs_f64());
    Ok(())
}

/// Waits for the writer to commit `commits`: at most
/// `storage.commit_timeout_ms`, and at most 5 s once the worker is asked to
/// stop. On failure nothing is acked; the worker restarts from its last
/// checkpoint and the rows are written again (idempotently).
async fn wait_commits(
    ctx: &ShardContext,
    commits: &mut Vec<Commit>,
    stop: &CancellationToken,
) -> Result<(), WorkerError> {
    let Some(storage) = &ctx.storage else { return Ok(()) };
    if commits.is_empty() {
        return Ok(());
    }
    let took = Instant::now();
    let all = futures::future::try_join_all(commits.drain(..).map(Commit::wait));
    let limit = Duration::from_millis(storage.cfg.commit_timeout_ms);
    let stopping = async {
        stop.cancelled().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    let result = tokio::select! {
        r = all => r.map(|_| ()).map_err(|e| WorkerError::Storage(e.to_string())),
        _ = tokio::time::sleep(limit) => Err(WorkerError::Storage(format!("rows not committed within {limit:?}"))),
        _ = stopping => Err(WorkerError::Storage("stopping before the rows were committed".to_owned())),
    };
    metrics::histogram!("fluxmesh_shard_commit_wait_seconds").record(took.elapsed().as_secs_f64());
    result
}

/// Runs a batch through the pipeline, stores the derived frames and hands
/// the history rows to the writer.
async fn process(
    ctx: &ShardContext,
    shard: u32,
    batch: &[async_nats::jetstream::Message],
    states: &mut HashMap<String, Slot>,
    dirty: &mut BTreeSet<String>,
    scratch: &mut AlignedVec,
    commits: &mut Vec<Commit>,
) -> Result<(), WorkerError> {
    let rules = ctx.rules.current();
    let mut outputs = Outputs::default();
    let mut rows = Rows::default();
    for m in batch {
        let Ok(info) = m.info() else {
            metrics::counter!("fluxmesh_shard_bad_messages_total", "reason" => "no_info").increment(1);
            continue;
        };
        let stream_seq = info.stream_sequence;
        let frame = match fluxmesh_schemas::frame::access(&m.payload, scratch) {
            Ok(f) => f,
            Err(e) => {
                // Counted and acked: a corrupt frame must not block its shard.
                metrics::counter!("fluxmesh_shard_bad_messages_total", "reason" => "corrupt_frame").increment(1);
                tracing::warn!(shard, stream_seq, subject = %m.subject, error = %e, "corrupt frame skipped");
                continue;
            }
        };
        let device = frame.device.as_str();
        if !states.contains_key(device) {
            states.insert(device.to_owned(), Slot { state: DeviceState::new(device), revision: None });
        }
        let Some(slot) = states.get_mut(device) else { continue };
        match ctx.pipeline.process(&rules, &mut slot.state, frame, stream_seq, &mut outputs) {
            Processed::Skipped => metrics::counter!("fluxmesh_shard_redeliveries_skipped_total").increment(1),
            Processed::Applied => {
                dirty.insert(device.to_owned());
                if ctx.storage.is_some() {
                    rows.telemetry(frame);
                }
            }
            Processed::Dropped => {
                metrics::counter!("fluxmesh_rule_dropped_total").increment(1);
                dirty.insert(device.to_owned());
            }
        }
    }

    // Derived frames: sent pipelined, then every ack awaited.
    let frames = &outputs.frames;
    let mut pending = Vec::with_capacity(frames.len());
    for frame in frames {
        let bytes = frame.encode().map_err(|e| WorkerError::Output(e.to_string()))?;
        let subject = ctx.subjects.event(shard, &frame.device, frame.kind().as_str());
        let sent = ctx.publisher.publish(subject, fluxmesh_mesh::frame_headers(frame), bytes.into()).await;
        pending.push(sent.map_err(|e| WorkerError::Output(e.to_string()))?);
    }
    for p in futures::future::join_all(pending.into_iter().map(|p| p.ack())).await {
        p.map_err(|e| WorkerError::Output(e.to_string()))?;
    }
    for frame in frames {
        metrics::counter!("fluxmesh_derived_frames_total", "kind" => frame.kind().as_str()).increment(1);
    }
    if ctx.mirror_events {
        for frame in frames {
            ctx.mirror(shard, frame).await;
        }
    }
    for command in outputs.commands {
        send_command(ctx, command).await;
    }
    if let Some(storage) = &ctx.storage {
        for frame in frames {
            rows.derived(frame);
        }
        if !rows.is_empty() {
            let commit = storage.writer.submit(rows).await.map_err(|e| WorkerError::Storage(e.to_string()))?;
            commits.push(commit);
        }
    }
    Ok(())
}

/// Sends a rule's command as a request on `{prefix}.cmd.{device}`, like any
/// client would, with the command's derived id as `Nats-Msg-Id` (a replay
/// is deduplicated if the command was queued). The answer is awaited in the
/// background and counted; at most `command_slots` are in flight, past that
/// the worker waits.
async fn send_command(ctx: &ShardContext, command: RuleCommand) {
    let Ok(slot) = ctx.command_slots.clone().acquire_owned().await else { return };
    let subject = ctx.subjects.command(&command.device);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", command.id.to_string().as_str());
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(command.payload.into())
        .timeout(Some(Duration::from_secs(15)));
    let client = ctx.client.clone();
    tokio::spawn(async move {
        let status = match client.send_request(subject, request).await {
            Ok(answer) => serde_json::from_slice::<serde_json::Value>(&answer.payload)
                .ok()
                .and_then(|v| v["status"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "unreadable".to_owned()),
            Err(e) => {
                tracing::warn!(device = %command.device, id = %command.id, error = %e, "command from a rule got no answer");
                "no_answer".to_owned()
            }
        };
        metrics::counter!("fluxmesh_rule_commands_total", "status" => status).increment(1);
        drop(slot);
    });
}

/// The shard's durable consumer, recreated from its ack floor when it has
/// deliveries outstanding (to a previous owner that is gone). Its cached
/// info is as of now: fetched by the get, or made by the create.
async fn ensure_consumer(ctx: &ShardContext, shard: u32) -> Result<consumer::PullConsumer, WorkerError> {
    let err = |e: &dyn std::fmt::Display| WorkerError::Consumer(e.to_string());
    let stream = ctx.js.get_stream(&ctx.telemetry_stream).await.map_err(|e| err(&e))?;
    let name = consumer_name(shard);
    let mut config = pull::Config {
        durable_name: Some(name.clone()),
        description: Some(format!("fluxmesh shard {shard}")),
        filter_subject: ctx.subjects.shard_filter(Family::Telemetry, shard),
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_millis(ctx.cfg.ack_wait_ms),
        max_ack_pending: i64::try_from(ctx.cfg.max_ack_pending).unwrap_or(i64::MAX),
        max_deliver: -1,
        deliver_policy: DeliverPolicy::All,
        ..Default::default()
    };
    let mut consumer: consumer::PullConsumer =
        stream.get_or_create_consumer(&name, config.clone()).await.map_err(|e| err(&e))?;
    let info = consumer.cached_info();
    if info.num_ack_pending > 0 {
        let floor = info.ack_floor.stream_sequence;
        tracing::info!(
            shard,
            outstanding = info.num_ack_pending,
            floor,
            "recreating shard consumer from its ack floor"
        );
        metrics::counter!("fluxmesh_shard_consumer_recreated_total").increment(1);
        stream.delete_consumer(&name).await.map_err(|e| err(&e))?;
        config.deliver_policy = DeliverPolicy::ByStartSequence { start_sequence: floor + 1 };
        consumer = stream.create_consumer(config).await.map_err(|e| err(&e))?;
    }
    Ok(consumer)
}

pub fn consumer_name(shard: u32) -> String {
    format!("shard-{shard}")
}

/// Reads the last checkpoint of every device in `shard`.
async fn load_states(ctx: &ShardContext, shard: u32) -> Result<HashMap<String, Slot>, WorkerError> {
    let err = |e: &dyn std::fmt::Display| WorkerError::Load(e.to_string());
    let stream_name = format!("KV_{}", ctx.states_bucket);
    let stream = ctx.js.get_stream(&stream_name).await.map_err(|e| err(&e))?;
    let config = pull::Config {
        filter_subject: format!("$KV.{}.{shard}.>", ctx.states_bucket),
        deliver_policy: DeliverPolicy::LastPerSubject,
        ..Default::default()
    };
    let mut states = HashMap::new();
    fluxmesh_mesh::read_pending(&stream, config, Duration::from_secs(10), |msg| {
        let deleted = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
        if deleted {
            return Ok(());
        }
        let revision = msg.info().map(|i| i.stream_sequence).map_err(|e| e.to_string())?;
        match serde_json::from_slice::<DeviceState>(&msg.payload) {
            Ok(state) => {
                states.insert(state.device.clone(), Slot { state, revision: Some(revision) });
            }
            Err(e) => {
                // Start that device afresh, but keep the revision so the
                // next checkpoint replaces the unreadable one.
                metrics::counter!("fluxmesh_shard_bad_messages_total", "reason" => "bad_checkpoint").increment(1);
                tracing::warn!(shard, subject = %msg.subject, error = %e, "unreadable device checkpoint; starting it afresh");
                let key = msg.subject.rsplit('.').next().unwrap_or_default();
                if let Some(device) = super::state::device_of_key(key) {
                    states.insert(device.clone(), Slot { state: DeviceState::new(&device), revision: Some(revision) });
                }
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| err(&e))?;
    Ok(states)
}
