//! One shard's worker: runs only while this node holds the shard's lease.
//!
//! It is handed an [`OwnedShard`] by the ownership coordinator
//! (`fluxmesh_mesh::ownership`): the shard's checkpoint log is claimed (a
//! claim record fences off every earlier owner) and an ack-less reader of
//! its telemetry is open right after the sequence the checkpoint covers.
//! The worker starts from the device states the log held.
//!
//! Then, batch after batch:
//! 1. read up to `batch` messages, in stream order;
//! 2. check the lease is still ours (a node that was paused stops here);
//! 3. apply each message to its device's state (messages at or below a
//!    device's `last_stream_seq` were applied before and are skipped),
//!    collecting derived frames;
//! 4. publish the derived frames and wait for their JetStream acks (their
//!    ids come from the input, so a replay is deduplicated); hand the
//!    batch's history rows to the Postgres writer (when storage is on);
//! 5. every `checkpoint_interval_ms` (and before a graceful stop): wait
//!    until the writer has committed every row handed to it, then append
//!    one checkpoint record with the changed device states and the
//!    sequence now covered. The append is compare-and-set on the log's
//!    last sequence: a node that lost the shard fails here and stops.
//!
//! The server keeps no per-message state for the worker: nothing is acked.
//! A crash anywhere before a checkpoint means the next owner reads those
//! messages again from the last checkpoint and derives the same frames
//! with the same ids.

use super::ShardContext;
use crate::internal_events::emit;
use crate::internal_events::processing::{RuleCommandSettled, ShardInputSkipped};
use crate::processing::pipeline::{Outputs, Processed, RuleCommand};
use crate::processing::state::DeviceState;
use crate::storage::writer::Commit;
use crate::storage::Rows;
use fluxmesh_mesh::checkpoint::CheckpointError;
use fluxmesh_mesh::ownership::{OwnedShard, WorkerFailure};
use fluxmesh_mesh::shard_reader::ReaderError;
use fluxmesh_schemas::frame::AlignedVec;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the lease is no longer ours")]
    Fenced,
    #[error("reading the shard")]
    Reader(#[source] ReaderError),
    #[error("checkpoint")]
    Checkpoint(#[source] CheckpointError),
    #[error("encoding a derived frame")]
    Encode(#[source] fluxmesh_schemas::frame::FrameError),
    #[error("publishing derived frames")]
    Output(#[source] fluxmesh_mesh::PublishError),
    #[error("history: cannot write the rows")]
    Storage(#[source] crate::storage::writer::WriteError),
    #[error("history: rows not committed within {0:?}")]
    CommitTimeout(Duration),
    #[error("history: stopping before the rows were committed")]
    CommitStopped,
}

impl WorkerFailure for WorkerError {
    fn is_fenced(&self) -> bool {
        matches!(self, WorkerError::Fenced)
    }

    fn reason(&self) -> &'static str {
        match self {
            WorkerError::Fenced => "fenced",
            WorkerError::Reader(_) => "consumer",
            WorkerError::Checkpoint(_) => "checkpoint",
            WorkerError::Encode(_) | WorkerError::Output(_) => "output",
            WorkerError::Storage(_) | WorkerError::CommitTimeout(_) | WorkerError::CommitStopped => "storage",
        }
    }
}

impl From<CheckpointError> for WorkerError {
    fn from(e: CheckpointError) -> Self {
        match e {
            CheckpointError::Fenced { .. } => WorkerError::Fenced,
            e => WorkerError::Checkpoint(e),
        }
    }
}

/// What a worker has processed and not yet checkpointed.
#[derive(Debug)]
struct Progress {
    states: HashMap<String, DeviceState>,
    /// Devices whose state changed since the last checkpoint.
    dirty: BTreeSet<String>,
    /// Stream sequence of the last message processed.
    applied: u64,
    /// History rows handed to the writer, not yet known to be committed.
    commits: Vec<Commit>,
}

/// Runs `owned` until `stop` (graceful: finishes the batch in hand and
/// checkpoints) or an error.
pub async fn run(ctx: &ShardContext, mut owned: OwnedShard, stop: &CancellationToken) -> Result<(), WorkerError> {
    let shard = owned.shard();
    let loaded = owned.take_loaded();
    if loaded.unreadable > 0 {
        metrics::counter!(crate::internal_events::names::SHARD_BAD_MESSAGES_TOTAL, "reason" => "bad_checkpoint")
            .increment(loaded.unreadable);
    }
    let mut states = HashMap::with_capacity(loaded.states.len());
    for (device, value) in loaded.states {
        let state = serde_json::from_value::<DeviceState>(value).unwrap_or_else(|e| {
            // Start that device afresh; its next checkpoint replaces the
            // unreadable one.
            emit(ShardInputSkipped { shard, reason: "bad_checkpoint", what: &device, error: &e });
            DeviceState::new(&device)
        });
        states.insert(device, state);
    }
    let mut p = Progress { states, dirty: BTreeSet::new(), applied: owned.covered(), commits: Vec::new() };
    let result = async {
        if owned.wants_snapshot() {
            snapshot(&mut owned, &p).await?;
        }
        consume(ctx, &mut owned, &mut p, stop).await
    }
    .await;
    owned.close().await;
    result
}

async fn consume(
    ctx: &ShardContext,
    owned: &mut OwnedShard,
    p: &mut Progress,
    stop: &CancellationToken,
) -> Result<(), WorkerError> {
    let mut scratch = AlignedVec::new();
    let interval = Duration::from_millis(ctx.cfg.checkpoint_interval_ms);
    let mut checkpoint_at = Instant::now() + interval;
    loop {
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => {
                // Graceful: what was processed is checkpointed before the
                // lease is released.
                return checkpoint(ctx, owned, p, stop).await;
            }
            _ = tokio::time::sleep_until(checkpoint_at.into()), if p.applied > owned.covered() => {
                checkpoint(ctx, owned, p, stop).await?;
                checkpoint_at = Instant::now() + interval;
                continue;
            }
            m = owned.next() => m.map_err(WorkerError::Reader)?,
        };
        let mut batch = vec![first];
        while batch.len() < ctx.cfg.batch {
            match owned.try_next() {
                Some(m) => batch.push(m),
                None => break,
            }
        }
        if !owned.holds() {
            return Err(WorkerError::Fenced);
        }
        let took = Instant::now();
        process(ctx, owned.shard(), &batch, p, &mut scratch).await?;
        metrics::counter!(crate::internal_events::names::SHARD_MESSAGES_TOTAL).increment(batch.len() as u64);
        metrics::histogram!(crate::internal_events::names::SHARD_BATCH_SECONDS).record(took.elapsed().as_secs_f64());
        owned.report_lag();
        if Instant::now() >= checkpoint_at {
            checkpoint(ctx, owned, p, stop).await?;
            checkpoint_at = Instant::now() + interval;
        }
    }
}

/// Waits until the history rows of everything processed are committed,
/// then appends the changed device states and the sequence now covered (a
/// node that lost the shard fails here). Now and then the log is compacted
/// into a snapshot.
async fn checkpoint(
    ctx: &ShardContext,
    owned: &mut OwnedShard,
    p: &mut Progress,
    stop: &CancellationToken,
) -> Result<(), WorkerError> {
    if p.applied <= owned.covered() {
        return Ok(());
    }
    let took = Instant::now();
    // Rows first: a checkpoint covering a message whose rows are not
    // stored would skip it on replay, and its rows would never be written.
    wait_commits(ctx, &mut p.commits, stop).await?;
    // Fenced here if the lease is no longer ours.
    let changed = p.dirty.iter().filter_map(|d| p.states.get(d).map(|s| (d.as_str(), s)));
    owned.checkpoint(p.applied, changed).await?;
    metrics::counter!(crate::internal_events::names::SHARD_CHECKPOINT_WRITES_TOTAL).increment(1);
    metrics::counter!(crate::internal_events::names::SHARD_CHECKPOINT_DEVICES_TOTAL).increment(p.dirty.len() as u64);
    p.dirty.clear();
    if owned.wants_snapshot() {
        snapshot(owned, p).await?;
    }
    metrics::histogram!(crate::internal_events::names::SHARD_CHECKPOINT_SECONDS).record(took.elapsed().as_secs_f64());
    Ok(())
}

/// Writes every device's state again and drops the log before it.
async fn snapshot(owned: &mut OwnedShard, p: &Progress) -> Result<(), WorkerError> {
    owned.snapshot(p.states.iter().map(|(d, s)| (d.as_str(), s))).await?;
    metrics::counter!(crate::internal_events::names::SHARD_CHECKPOINT_SNAPSHOTS_TOTAL).increment(1);
    Ok(())
}

/// Waits for the writer to commit `commits`: at most
/// `storage.commit_timeout_ms`, and at most 5 s once the worker is asked to
/// stop. On failure nothing is checkpointed; the worker restarts from its
/// last checkpoint and the rows are written again (idempotently).
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
        r = all => r.map(|_| ()).map_err(WorkerError::Storage),
        _ = tokio::time::sleep(limit) => Err(WorkerError::CommitTimeout(limit)),
        _ = stopping => Err(WorkerError::CommitStopped),
    };
    metrics::histogram!(crate::internal_events::names::SHARD_COMMIT_WAIT_SECONDS).record(took.elapsed().as_secs_f64());
    result
}

/// Runs a batch through the pipeline, stores the derived frames and hands
/// the history rows to the writer.
async fn process(
    ctx: &ShardContext,
    shard: u32,
    batch: &[async_nats::jetstream::Message],
    p: &mut Progress,
    scratch: &mut AlignedVec,
) -> Result<(), WorkerError> {
    let rules = ctx.rules.current();
    let mut outputs = Outputs::default();
    let mut rows = Rows::default();
    for m in batch {
        // The reader hands out only messages with their metadata.
        let Ok(info) = m.info() else { continue };
        let stream_seq = info.stream_sequence;
        p.applied = p.applied.max(stream_seq);
        let frame = match fluxmesh_schemas::frame::access(&m.payload, scratch) {
            Ok(f) => f,
            Err(e) => {
                // Counted and passed: a corrupt frame must not block its shard.
                emit(ShardInputSkipped { shard, reason: "corrupt_frame", what: &m.subject, error: &e });
                continue;
            }
        };
        let device = frame.device.as_str();
        if !p.states.contains_key(device) {
            p.states.insert(device.to_owned(), DeviceState::new(device));
        }
        let Some(state) = p.states.get_mut(device) else { continue };
        match ctx.pipeline.process(&rules, state, frame, stream_seq, &mut outputs) {
            Processed::Skipped => {
                metrics::counter!(crate::internal_events::names::SHARD_REDELIVERIES_SKIPPED_TOTAL).increment(1)
            }
            Processed::Applied => {
                p.dirty.insert(device.to_owned());
                if ctx.storage.is_some() {
                    rows.telemetry(frame);
                }
            }
            Processed::Dropped => {
                metrics::counter!(crate::internal_events::names::RULE_DROPPED_TOTAL).increment(1);
                p.dirty.insert(device.to_owned());
            }
        }
    }

    // Derived frames: sent pipelined, then every ack awaited.
    let frames = &outputs.frames;
    let mut pending = Vec::with_capacity(frames.len());
    for frame in frames {
        let bytes = frame.encode().map_err(WorkerError::Encode)?;
        let subject = ctx.mesh.subjects().event(shard, &frame.device, frame.kind().as_str());
        let sent = ctx.mesh.publisher().publish(subject, fluxmesh_mesh::frame_headers(frame), bytes.into()).await;
        pending.push(sent.map_err(WorkerError::Output)?);
    }
    for p in futures::future::join_all(pending.into_iter().map(|p| p.ack())).await {
        p.map_err(WorkerError::Output)?;
    }
    for frame in frames {
        metrics::counter!(crate::internal_events::names::DERIVED_FRAMES_TOTAL, "kind" => frame.kind().as_str())
            .increment(1);
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
            let commit = storage.writer.submit(rows).await.map_err(WorkerError::Storage)?;
            p.commits.push(commit);
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
    let subject = ctx.mesh.subjects().command(&command.device);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", command.id.to_string().as_str());
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(command.payload.into())
        .timeout(Some(Duration::from_secs(15)));
    let client = ctx.mesh.client().clone();
    ctx.life.spawn(async move {
        let (status, error) = match client.send_request(subject, request).await {
            Ok(answer) => (
                serde_json::from_slice::<serde_json::Value>(&answer.payload)
                    .ok()
                    .and_then(|v| v["status"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| "unreadable".to_owned()),
                None,
            ),
            Err(e) => ("no_answer".to_owned(), Some(e)),
        };
        emit(RuleCommandSettled {
            device: &command.device,
            id: command.id,
            status,
            error: error.as_ref().map(|e| e as &dyn std::error::Error),
        });
        drop(slot);
    });
}
