//! What this node does with the shards it owns: the worker that runs each
//! one's messages through rules, plugins, state and aggregation, and stores
//! what they derive.
//!
//! Which shards the node owns, and when a worker starts and stops, is
//! decided in `fluxmesh_mesh::ownership`; the coordinator there hands
//! [`ShardContext`] (a `ShardWorker`) each shard it owns, with the shard's
//! checkpoint claimed and its reader open.

pub mod worker;

use fluxmesh_mesh::cluster::ClusterHandle;
use fluxmesh_mesh::ownership::{OwnedShard, ShardWorker};
use fluxmesh_mesh::Mesh;
use fluxmesh_schemas::Frame;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use worker::WorkerError;

/// The `[shards]` config section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardsConfig {
    /// Messages a shard worker takes per batch, at most.
    pub batch: usize,
    /// Wait before restarting a worker that failed (NATS trouble).
    pub restart_backoff_ms: u64,
    /// A device derives at most one state frame per this much received
    /// time; changes in between ride on the next frame. 0 = a frame for
    /// every change.
    pub state_min_interval_ms: u64,
    /// How often a busy worker appends a checkpoint record (the changed
    /// device states and the sequence covered) to its shard's log. Longer:
    /// fewer writes; more to replay after a kill. A quiet shard writes
    /// nothing.
    pub checkpoint_interval_ms: u64,
}

impl Default for ShardsConfig {
    fn default() -> Self {
        ShardsConfig { batch: 256, restart_backoff_ms: 500, state_min_interval_ms: 1000, checkpoint_interval_ms: 500 }
    }
}

impl ShardsConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(1..=10_000).contains(&self.batch) {
            problems.push("shards.batch: must be between 1 and 10000".to_owned());
        }
        if !(1..=10_000).contains(&self.checkpoint_interval_ms) {
            problems.push("shards.checkpoint_interval_ms: must be between 1 and 10000".to_owned());
        }
        problems
    }
}

/// What every shard worker on this node shares.
#[derive(Debug)]
pub struct ShardContext {
    pub mesh: Mesh,
    /// Every shard's checkpoint log (read by the device API).
    pub checkpoints: fluxmesh_mesh::checkpoint::Checkpoints,
    pub cfg: ShardsConfig,
    pub cluster: ClusterHandle,
    /// Mirror derived frames as JSON on `{prefix}.json.evt.…`.
    pub mirror_events: bool,
    /// Rules, aggregation and state settings.
    pub pipeline: crate::processing::pipeline::Pipeline,
    /// The rules (their current compiled set is taken per batch).
    pub rules: Arc<crate::rules::Rules>,
    /// The node's WebAssembly plugins.
    pub plugins: Arc<crate::plugins::Plugins>,
    /// History in Postgres; `None` when storage is off.
    pub storage: Option<Arc<crate::storage::Storage>>,
    /// Commands rules send that are still in flight (bounded: a worker
    /// waits for a slot).
    pub command_slots: Arc<tokio::sync::Semaphore>,
    /// The node's task tracker: commands in flight are its tasks, so the
    /// node's shutdown waits for them (each ends within its 15 s timeout).
    pub life: crate::lifecycle::Lifecycle,
}

impl ShardContext {
    /// Best-effort JSON mirror of a derived frame (the stream is the record).
    async fn mirror(&self, shard: u32, frame: &Frame) {
        let Ok(bytes) = frame.encode() else { return };
        let Ok(view) = fluxmesh_schemas::FrameView::new(&bytes) else { return };
        let subjects = self.mesh.subjects();
        let subject = subjects.event(shard, &frame.device, frame.kind().as_str());
        let Some(mirror) = subjects.json_mirror(&subject) else { return };
        let json = fluxmesh_schemas::json::to_vec(view.get());
        if self.mesh.client().publish(mirror, json.into()).await.is_err() {
            metrics::counter!(crate::internal_events::names::JSON_MIRROR_FAILED_TOTAL).increment(1);
        }
    }
}

impl ShardWorker for ShardContext {
    type Error = WorkerError;

    async fn run(self: Arc<Self>, shard: OwnedShard, stop: CancellationToken) -> Result<(), WorkerError> {
        worker::run(&self, shard, &stop).await
    }
}

impl ShardsConfig {
    /// What the ownership coordinator takes from this section.
    pub fn ownership(&self) -> fluxmesh_mesh::ownership::Settings {
        fluxmesh_mesh::ownership::Settings {
            batch: self.batch,
            restart_backoff: Duration::from_millis(self.restart_backoff_ms),
            stop_deadline: crate::lifecycle::deadline::SHARD_WORKERS,
        }
    }
}
