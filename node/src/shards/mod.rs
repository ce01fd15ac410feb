//! Shard ownership on this node: which shards it should own, claiming and
//! releasing their leases, and running one worker per owned shard.
//!
//! The coordinator re-decides whenever membership or leases change, and on
//! a tick. For each shard, with `desired` = the rendezvous owner among the
//! live nodes:
//!
//! | we hold the lease | desired is us | action |
//! |---|---|---|
//! | yes | yes | keep (re)starting its worker |
//! | yes | no | graceful handoff: stop the worker after its batch, release |
//! | no | yes | claim by CAS if the lease is free or its holder is not live |
//! | no | no | nothing |
//!
//! A lease someone else overwrote (a newer epoch) stops our worker at once.
//! Past [`ClusterHandle::valid_until`] (we were paused, or NATS did not take
//! our heartbeats) every worker is aborted at once and every lease
//! forgotten: others may already own those shards.

pub mod aggregate;
pub mod pipeline;
pub mod state;
pub mod worker;

use fluxmesh_mesh::cluster::{ClusterError, ClusterHandle, HeldLease};
use fluxmesh_mesh::{placement, Publisher};
use fluxmesh_schemas::{Frame, Subjects};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
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
    pub js: async_nats::jetstream::Context,
    pub client: async_nats::Client,
    pub publisher: Publisher,
    pub subjects: Subjects,
    pub shards: u32,
    /// The cluster's streams and partitions.
    pub layout: fluxmesh_mesh::Provisioned,
    /// Every shard's checkpoint log.
    pub checkpoints: fluxmesh_mesh::checkpoint::Checkpoints,
    pub node_id: String,
    pub cfg: ShardsConfig,
    pub cluster: ClusterHandle,
    /// Mirror derived frames as JSON on `{prefix}.json.evt.…`.
    pub mirror_events: bool,
    /// Rules, aggregation and state settings.
    pub pipeline: pipeline::Pipeline,
    /// The rules (their current compiled set is taken per batch).
    pub rules: Arc<crate::rules::Rules>,
    /// The node's WebAssembly plugins.
    pub plugins: Arc<crate::plugins::Plugins>,
    /// History in Postgres; `None` when storage is off.
    pub storage: Option<Arc<crate::storage::Storage>>,
    /// Commands rules send that are still in flight (bounded: a worker
    /// waits for a slot).
    pub command_slots: Arc<tokio::sync::Semaphore>,
}

impl ShardContext {
    /// Best-effort JSON mirror of a derived frame (the stream is the record).
    async fn mirror(&self, shard: u32, frame: &Frame) {
        let Ok(bytes) = frame.encode() else { return };
        let Ok(view) = fluxmesh_schemas::FrameView::new(&bytes) else { return };
        let subject = self.subjects.event(shard, &frame.device, frame.kind().as_str());
        let Some(mirror) = self.subjects.json_mirror(&subject) else { return };
        let json = fluxmesh_schemas::json::to_vec(view.get());
        if self.client.publish(mirror, json.into()).await.is_err() {
            metrics::counter!("fluxmesh_json_mirror_failed_total").increment(1);
        }
    }
}

#[derive(Debug)]
struct Running {
    epoch: u64,
    stop: CancellationToken,
    abort: AbortHandle,
    /// Stopping to hand the shard over: release when the worker is done.
    handing_over: bool,
}

type Finished = (u32, u64, Result<(), WorkerError>);

/// Runs the coordinator until `stop`; then stops every worker gracefully,
/// releases every lease, leaves the membership and cancels `cluster_stop`.
pub async fn coordinate(ctx: Arc<ShardContext>, stop: CancellationToken, cluster_stop: CancellationToken) {
    let mut c = Coordinator {
        ctx: ctx.clone(),
        held: HashMap::new(),
        running: HashMap::new(),
        workers: JoinSet::new(),
        retry_at: HashMap::new(),
        stalled: None,
    };
    let mut changes = ctx.cluster.subscribe();
    let mut tick = tokio::time::interval(ctx.cluster.config().heartbeat() / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            Some(done) = c.workers.join_next(), if !c.workers.is_empty() => c.finished(done).await,
            changed = changes.changed() => if changed.is_err() { break },
            _ = tick.tick() => {}
        }
        c.reconcile().await;
    }
    c.shutdown().await;
    ctx.cluster.leave().await;
    cluster_stop.cancel();
}

struct Coordinator {
    ctx: Arc<ShardContext>,
    /// Leases this process holds, by shard.
    held: HashMap<u32, HeldLease>,
    running: HashMap<u32, Running>,
    workers: JoinSet<Finished>,
    /// Earliest restart of a worker that failed.
    retry_at: HashMap<u32, Instant>,
    /// Why the last pass could not act, if it could not (logged on change).
    stalled: Option<&'static str>,
}

impl Coordinator {
    /// Logs when the coordinator starts or stops being able to act.
    fn stalled(&mut self, why: Option<&'static str>) {
        if self.stalled != why {
            match why {
                Some(why) => tracing::warn!(why, "shard coordinator cannot act"),
                None => tracing::info!(after = self.stalled.unwrap_or_default(), "shard coordinator acting again"),
            }
            self.stalled = why;
        }
    }

    async fn reconcile(&mut self) {
        let ctx = self.ctx.clone();
        let cluster = &ctx.cluster;
        if Instant::now() >= cluster.valid_until() {
            if !self.held.is_empty() {
                tracing::warn!(shards = self.held.len(), "heartbeats not confirmed in time; giving up every shard");
                metrics::counter!("fluxmesh_shards_fenced_total").increment(self.held.len() as u64);
            }
            for (_, r) in self.running.drain() {
                r.abort.abort();
            }
            self.held.clear();
            self.publish_gauge();
            self.stalled(Some("heartbeats not confirmed"));
            return;
        }
        let view = cluster.view();
        let me = cluster.me().node_id.clone();
        if !view.live.contains_key(&me) {
            // Our own heartbeat has not come back through the watch yet.
            self.stalled(Some("own heartbeat not seen through the membership watch"));
            return;
        }
        self.stalled(None);
        let live = view.live_ids();
        let mut claims = Vec::new();
        for shard in 0..self.ctx.shards {
            let desired = placement::owner(shard, &live);
            let current = view.leases.get(&shard);
            // Our lease was overwritten or deleted since we took it: stop
            // at once.
            if let Some(ours) = self.held.get(&shard) {
                if view.lost(shard, ours.epoch) {
                    tracing::warn!(
                        shard,
                        epoch = ours.epoch,
                        now = ?current.map(|c| (c.lease.node_id.as_str(), c.epoch)),
                        "lease taken over; stopping the worker"
                    );
                    metrics::counter!("fluxmesh_shards_fenced_total").increment(1);
                    if let Some(r) = self.running.remove(&shard) {
                        r.abort.abort();
                    }
                    self.held.remove(&shard);
                }
            }
            if let Some(ours) = self.held.get(&shard).cloned() {
                if desired == Some(me.as_str()) {
                    self.ensure_running(shard, &ours);
                } else if desired.is_some() {
                    self.hand_over(shard, ours.epoch).await;
                }
            } else if desired == Some(me.as_str()) {
                let expected = match current {
                    None => Some(None),
                    // Ours from before (a worker was fenced but nobody took
                    // it), or its holder is gone: take it by CAS.
                    Some(cur) if cluster.is_mine(&cur.lease) || !view.is_valid(&cur.lease) => Some(Some(cur.epoch)),
                    Some(_) => None,
                };
                if let Some(expected) = expected {
                    claims.push((shard, expected));
                }
            }
        }
        if !claims.is_empty() {
            // Bounded: a claim sent while the lease bucket has no leader
            // would otherwise hold the coordinator for the whole request
            // timeout (5 s). A claim that lands after we gave up on it is
            // ours, and the next pass adopts it.
            let limit = cluster.config().heartbeat() * 5;
            let results = futures::future::join_all(claims.into_iter().map(|(shard, expected)| async move {
                let claimed = tokio::time::timeout(limit, cluster.claim(shard, expected)).await;
                (shard, claimed.unwrap_or(Err(ClusterError::Timeout { shard })))
            }))
            .await;
            for (shard, result) in results {
                match result {
                    Ok(lease) => {
                        tracing::info!(shard, epoch = lease.epoch, "claimed shard");
                        self.held.insert(shard, lease.clone());
                        self.ensure_running(shard, &lease);
                    }
                    Err(ClusterError::LeaseConflict { .. }) => {
                        tracing::debug!(shard, "lost a claim race");
                    }
                    Err(e) => tracing::warn!(shard, error = %e, "claim failed"),
                }
            }
        }
        self.publish_gauge();
    }

    fn ensure_running(&mut self, shard: u32, lease: &HeldLease) {
        if self.running.contains_key(&shard) {
            return;
        }
        if self.retry_at.get(&shard).is_some_and(|at| Instant::now() < *at) {
            return;
        }
        let stop = CancellationToken::new();
        let (ctx, worker_stop, epoch, l) = (self.ctx.clone(), stop.clone(), lease.epoch, lease.lease.clone());
        let abort =
            self.workers.spawn(async move { (shard, epoch, worker::run(ctx, shard, l, epoch, worker_stop).await) });
        self.running.insert(shard, Running { epoch, stop, abort, handing_over: false });
    }

    async fn hand_over(&mut self, shard: u32, epoch: u64) {
        match self.running.get_mut(&shard) {
            Some(r) if !r.handing_over => {
                tracing::info!(shard, "handing shard over");
                r.handing_over = true;
                r.stop.cancel();
            }
            Some(_) => {}
            None => self.release(shard, epoch).await,
        }
    }

    async fn release(&mut self, shard: u32, epoch: u64) {
        self.held.remove(&shard);
        let limit = self.ctx.cluster.config().heartbeat() * 5;
        let released = tokio::time::timeout(limit, self.ctx.cluster.release(shard, epoch))
            .await
            .unwrap_or(Err(ClusterError::Timeout { shard }));
        match released {
            Ok(()) => {
                metrics::counter!("fluxmesh_lease_releases_total").increment(1);
                tracing::info!(shard, epoch, "released shard");
            }
            Err(e) => {
                tracing::warn!(shard, error = %e, "release failed; the lease will be taken over when it is judged dead")
            }
        }
    }

    async fn finished(&mut self, done: Result<Finished, tokio::task::JoinError>) {
        let (shard, epoch, result) = match done {
            Ok(done) => done,
            Err(e) if e.is_cancelled() => return,
            Err(e) => {
                // A panic in a worker: find which one by its task id.
                let id = e.id();
                let Some(shard) = self.running.iter().find(|(_, r)| r.abort.id() == id).map(|(s, _)| *s) else {
                    return;
                };
                tracing::error!(shard, error = %e, "shard worker panicked");
                let epoch = self.running.get(&shard).map(|r| r.epoch).unwrap_or_default();
                (shard, epoch, Err(WorkerError::Panicked(e.to_string())))
            }
        };
        // Only act on the worker we know for this shard and epoch.
        if self.running.get(&shard).is_none_or(|r| r.epoch != epoch) {
            return;
        }
        let Some(r) = self.running.remove(&shard) else { return };
        match result {
            Ok(()) if r.handing_over => self.release(shard, epoch).await,
            Ok(()) => {}
            Err(WorkerError::Fenced) => {
                tracing::warn!(shard, "lease lost; worker stopped");
                metrics::counter!("fluxmesh_shards_fenced_total").increment(1);
                self.held.remove(&shard);
            }
            Err(e) => {
                metrics::counter!("fluxmesh_shard_worker_failures_total", "reason" => e.reason()).increment(1);
                tracing::warn!(shard, error = %e, "shard worker failed; restarting it");
                let backoff = Duration::from_millis(self.ctx.cfg.restart_backoff_ms);
                self.retry_at.insert(shard, Instant::now() + backoff);
                if r.handing_over {
                    self.release(shard, epoch).await;
                }
            }
        }
    }

    /// Stops every worker after its batch and releases every lease.
    async fn shutdown(&mut self) {
        for r in self.running.values() {
            r.stop.cancel();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.workers.is_empty() {
            match tokio::time::timeout_at(deadline, self.workers.join_next()).await {
                Ok(Some(Ok((shard, _, Err(e))))) => tracing::warn!(shard, error = %e, "worker ended with an error"),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!("shard workers did not stop in time; aborting them");
                    self.workers.abort_all();
                    break;
                }
            }
        }
        self.running.clear();
        let held: Vec<(u32, u64)> = self.held.iter().map(|(s, l)| (*s, l.epoch)).collect();
        let cluster = &self.ctx.cluster;
        futures::future::join_all(held.into_iter().map(|(shard, epoch)| async move {
            if let Err(e) = cluster.release(shard, epoch).await {
                tracing::warn!(shard, error = %e, "release at shutdown failed");
            }
        }))
        .await;
        self.held.clear();
        self.publish_gauge();
    }

    fn publish_gauge(&self) {
        let lag = self.ctx.cluster.retain_lags(|shard| self.running.contains_key(&shard));
        metrics::gauge!("fluxmesh_shard_lag_messages").set(lag as f64);
        metrics::gauge!("fluxmesh_shards_owned").set(self.held.len() as f64);
        metrics::gauge!("fluxmesh_shards_running").set(self.running.len() as f64);
    }
}
