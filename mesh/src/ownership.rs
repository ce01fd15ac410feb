//! Shard ownership: which shards this node should own, claiming and
//! releasing their leases, and running the node's [`ShardWorker`] on each
//! shard it owns, handed an [`OwnedShard`] whose checkpoint is claimed and
//! whose reader is open.
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
//! | no | no | nothing; but a lease in our name that we do not run (given up while NATS was out of reach) is released |
//!
//! A lease someone else overwrote (a newer epoch) stops our worker at once.
//! Past [`ClusterHandle::valid_until`] (we were paused, or NATS did not take
//! our heartbeats) every worker is aborted at once and every lease
//! forgotten: others may already own those shards.
//!
//! Fencing does not rest on the coordinator noticing in time: every
//! checkpoint append is compare-and-set on the shard's log, and a new owner
//! appends a claim record first (`crate::checkpoint`), so an old owner's
//! next checkpoint fails however late its view is.

use crate::checkpoint::{CheckpointError, Checkpoints, Fence, Loaded};
use crate::cluster::{ClusterError, ClusterHandle, HeldLease, Lease};
use crate::shard_reader::{ReaderError, ShardReader};
use crate::{error_chain, placement, Mesh};
use fluxmesh_schemas::subject::Family;
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the node runs on each shard it owns.
pub trait ShardWorker: Send + Sync + 'static {
    type Error: WorkerFailure;

    /// Processes `shard` until `stop` (graceful: finish the batch in hand
    /// and checkpoint it) or an error. The coordinator restarts a worker
    /// that failed, after `restart_backoff`, from the last checkpoint.
    fn run(
        self: Arc<Self>,
        shard: OwnedShard,
        stop: CancellationToken,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// How a worker's error reads to the coordinator.
pub trait WorkerFailure: std::error::Error + Send + Sync + 'static {
    /// The shard is no longer ours: forget the lease, do not restart.
    fn is_fenced(&self) -> bool;
    /// The `reason` label of `fluxmesh_shard_worker_failures_total`.
    fn reason(&self) -> &'static str;
}

/// Why a shard could not be opened for its worker.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("shard {shard}: the lease is no longer ours")]
    Fenced { shard: u32 },
    // The checkpoint error names the shard.
    #[error("claiming the checkpoint log")]
    Checkpoint {
        shard: u32,
        #[source]
        source: CheckpointError,
    },
    #[error("shard {shard}: opening the reader")]
    Reader {
        shard: u32,
        #[source]
        source: ReaderError,
    },
}

impl WorkerFailure for OpenError {
    fn is_fenced(&self) -> bool {
        matches!(self, OpenError::Fenced { .. } | OpenError::Checkpoint { source: CheckpointError::Fenced { .. }, .. })
    }

    fn reason(&self) -> &'static str {
        match self {
            OpenError::Fenced { .. } => "fenced",
            OpenError::Checkpoint { .. } => "checkpoint",
            OpenError::Reader { .. } => "consumer",
        }
    }
}

/// Ownership settings the coordinator takes from the node's config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Messages a reader pulls at a time.
    pub batch: usize,
    /// Wait before restarting a worker that failed.
    pub restart_backoff: Duration,
    /// At shutdown, how long the workers may take to finish their batches
    /// before they are aborted (their leases are released either way).
    pub stop_deadline: Duration,
}

/// A shard this node holds the lease of, with its checkpoint log claimed
/// (earlier owners are fenced off) and a reader of its telemetry open right
/// after the sequence the checkpoint covers.
#[derive(Debug)]
pub struct OwnedShard {
    shard: u32,
    epoch: u64,
    lease: Lease,
    cluster: ClusterHandle,
    checkpoints: Checkpoints,
    fence: Fence,
    reader: ShardReader,
    loaded: Loaded,
}

impl OwnedShard {
    /// Claims `shard`'s checkpoint log under `held` and opens its reader.
    pub async fn open(
        mesh: &Mesh,
        cluster: &ClusterHandle,
        shard: u32,
        held: &HeldLease,
        batch: usize,
    ) -> Result<OwnedShard, OpenError> {
        let started = std::time::Instant::now();
        if !cluster.holds(&held.lease) {
            return Err(OpenError::Fenced { shard });
        }
        let node = &cluster.me().node_id;
        let checkpoints = mesh.checkpoints();
        let (loaded, fence) = checkpoints
            .claim(shard, node, held.epoch)
            .await
            .map_err(|source| OpenError::Checkpoint { shard, source })?;
        let covered = fence.covered();
        // Consumer names allow fewer characters than node ids.
        let safe: String = node.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        let reader = ShardReader::open(
            mesh.js(),
            mesh.layout().telemetry_stream_of(shard),
            mesh.subjects().shard_filter(Family::Telemetry, shard),
            format!("{safe}-shard-{shard}-{}", held.epoch),
            covered + 1,
            batch,
        )
        .await
        .map_err(|source| OpenError::Reader { shard, source })?;
        metrics::histogram!(crate::metric_names::SHARD_START_SECONDS).record(started.elapsed().as_secs_f64());
        tracing::debug!(shard, devices = loaded.states.len(), covered, took = ?started.elapsed(), "shard opened");
        Ok(OwnedShard {
            shard,
            epoch: held.epoch,
            lease: held.lease.clone(),
            cluster: cluster.clone(),
            checkpoints,
            fence,
            reader,
            loaded,
        })
    }

    pub fn shard(&self) -> u32 {
        self.shard
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// What the checkpoint log held at the claim (taken once; empty after).
    pub fn take_loaded(&mut self) -> Loaded {
        std::mem::take(&mut self.loaded)
    }

    /// The stream sequence up to which everything is checkpointed.
    pub fn covered(&self) -> u64 {
        self.fence.covered()
    }

    /// Whether this node's view still backs the lease. Cheap; a paused node
    /// that wakes sees `false` here before it processes anything.
    pub fn holds(&self) -> bool {
        self.cluster.holds(&self.lease)
    }

    /// The next message of the shard in stream order (cancel-safe).
    pub async fn next(&mut self) -> Result<async_nats::jetstream::Message, ReaderError> {
        self.reader.next().await
    }

    /// The next message if one is already here.
    pub fn try_next(&mut self) -> Option<async_nats::jetstream::Message> {
        self.reader.try_next()
    }

    /// Publishes the shard's lag (messages stored and not yet handed out)
    /// in this node's heartbeat.
    pub fn report_lag(&self) {
        self.cluster.report_lag(self.shard, self.reader.pending());
    }

    /// Appends the `changed` device states and the sequence now `covered`
    /// to the shard's log, compare-and-set: a node that lost the shard gets
    /// [`CheckpointError::Fenced`]. Everything up to `covered` must be
    /// applied and its outputs durable.
    pub async fn checkpoint<'a, S: Serialize + 'a>(
        &mut self,
        covered: u64,
        changed: impl IntoIterator<Item = (&'a str, &'a S)>,
    ) -> Result<(), CheckpointError> {
        if !self.holds() {
            return Err(CheckpointError::Fenced { shard: self.shard });
        }
        self.checkpoints.append(&mut self.fence, covered, changed).await
    }

    /// Whether the log has grown enough to be rewritten as a snapshot.
    pub fn wants_snapshot(&self) -> bool {
        self.fence.wants_snapshot()
    }

    /// Writes every device's state again and drops the log before it.
    pub async fn snapshot<'a, S: Serialize + 'a>(
        &mut self,
        states: impl IntoIterator<Item = (&'a str, &'a S)>,
    ) -> Result<(), CheckpointError> {
        self.checkpoints.snapshot(&mut self.fence, states).await
    }

    /// Deletes the reader's consumer.
    pub async fn close(self) {
        self.reader.close().await;
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

/// How a worker ended.
enum Ended {
    Done,
    Fenced,
    Failed { reason: &'static str, error: String },
}

impl Ended {
    fn of<E: WorkerFailure>(result: Result<(), E>) -> Ended {
        match result {
            Ok(()) => Ended::Done,
            Err(e) if e.is_fenced() => Ended::Fenced,
            Err(e) => Ended::Failed { reason: e.reason(), error: error_chain(&e) },
        }
    }
}

type Finished = (u32, u64, Ended);

/// Runs the coordinator until `stop`; then stops every worker gracefully,
/// releases every lease, leaves the membership and cancels `cluster_stop`.
pub async fn coordinate<W: ShardWorker>(
    mesh: Mesh,
    cluster: ClusterHandle,
    worker: Arc<W>,
    settings: Settings,
    stop: CancellationToken,
    cluster_stop: CancellationToken,
) {
    let mut c = Coordinator {
        mesh,
        cluster: cluster.clone(),
        worker,
        settings,
        held: HashMap::new(),
        running: HashMap::new(),
        workers: JoinSet::new(),
        retry_at: HashMap::new(),
        stalled: None,
    };
    let mut changes = cluster.subscribe();
    let mut tick = tokio::time::interval(cluster.config().heartbeat() / 2);
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
    cluster.leave().await;
    cluster_stop.cancel();
}

struct Coordinator<W> {
    mesh: Mesh,
    cluster: ClusterHandle,
    worker: Arc<W>,
    settings: Settings,
    /// Leases this process holds, by shard.
    held: HashMap<u32, HeldLease>,
    running: HashMap<u32, Running>,
    workers: JoinSet<Finished>,
    /// Earliest restart of a worker that failed.
    retry_at: HashMap<u32, Instant>,
    /// Why the last pass could not act, if it could not (logged on change).
    stalled: Option<&'static str>,
}

impl<W: ShardWorker> Coordinator<W> {
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
        let cluster = self.cluster.clone();
        if Instant::now() >= cluster.valid_until() {
            if !self.held.is_empty() {
                tracing::warn!(shards = self.held.len(), "heartbeats not confirmed in time; giving up every shard");
                metrics::counter!(crate::metric_names::SHARDS_FENCED_TOTAL).increment(self.held.len() as u64);
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
        let mut orphans = Vec::new();
        for shard in 0..self.mesh.shards() {
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
                    metrics::counter!(crate::metric_names::SHARDS_FENCED_TOTAL).increment(1);
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
            } else if let Some(cur) = current.filter(|c| desired.is_some() && cluster.is_mine(&c.lease)) {
                // A lease in our name that we do not run: we gave every shard
                // up (fenced) and could not delete their leases then, or a
                // claim landed after we stopped waiting for it. It looks
                // valid while we are live, so its desired owner would wait
                // for it forever: release it.
                orphans.push((shard, cur.epoch));
            }
        }
        if !orphans.is_empty() {
            tracing::info!(shards = orphans.len(), "releasing leases in this node's name that it does not run");
            let released =
                bounded_each(lease_op_limit(&cluster), orphans, |shard, epoch| cluster.release(shard, epoch)).await;
            for (shard, result) in released {
                match result {
                    Ok(()) => metrics::counter!(crate::metric_names::LEASE_RELEASES_TOTAL).increment(1),
                    Err(e) => {
                        tracing::warn!(shard, error = %crate::error_chain(&e), "could not release a lease in this node's name; trying again next pass")
                    }
                }
            }
        }
        if !claims.is_empty() {
            // A claim that lands after we gave up on it is ours: the next
            // pass adopts it, or releases it if the shard is not ours.
            let results =
                bounded_each(lease_op_limit(&cluster), claims, |shard, expected| cluster.claim(shard, expected)).await;
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
                    Err(e) => tracing::warn!(shard, error = %crate::error_chain(&e), "claim failed"),
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
        let (mesh, cluster, worker, held) =
            (self.mesh.clone(), self.cluster.clone(), self.worker.clone(), lease.clone());
        let (worker_stop, batch, epoch) = (stop.clone(), self.settings.batch, lease.epoch);
        let abort = self.workers.spawn(async move {
            let ended = match OwnedShard::open(&mesh, &cluster, shard, &held, batch).await {
                Ok(owned) => Ended::of(worker.run(owned, worker_stop).await),
                Err(e) => Ended::of(Err(e)),
            };
            (shard, epoch, ended)
        });
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
        let limit = lease_op_limit(&self.cluster);
        let released = tokio::time::timeout(limit, self.cluster.release(shard, epoch))
            .await
            .unwrap_or(Err(ClusterError::Timeout { shard }));
        match released {
            Ok(()) => {
                metrics::counter!(crate::metric_names::LEASE_RELEASES_TOTAL).increment(1);
                tracing::info!(shard, epoch, "released shard");
            }
            Err(e) => {
                tracing::warn!(shard, error = %crate::error_chain(&e), "release failed; the lease will be taken over when it is judged dead")
            }
        }
    }

    async fn finished(&mut self, done: Result<Finished, tokio::task::JoinError>) {
        let (shard, epoch, ended) = match done {
            Ok(done) => done,
            Err(e) if e.is_cancelled() => return,
            Err(e) => {
                // A panic in a worker: find which one by its task id.
                let id = e.id();
                let Some(shard) = self.running.iter().find(|(_, r)| r.abort.id() == id).map(|(s, _)| *s) else {
                    return;
                };
                tracing::error!(shard, error = %crate::error_chain(&e), "shard worker panicked");
                let epoch = self.running.get(&shard).map(|r| r.epoch).unwrap_or_default();
                (shard, epoch, Ended::Failed { reason: "panic", error: e.to_string() })
            }
        };
        // Only act on the worker we know for this shard and epoch.
        if self.running.get(&shard).is_none_or(|r| r.epoch != epoch) {
            return;
        }
        let Some(r) = self.running.remove(&shard) else { return };
        match ended {
            Ended::Done if r.handing_over => self.release(shard, epoch).await,
            Ended::Done => {}
            Ended::Fenced => {
                tracing::warn!(shard, "lease lost; worker stopped");
                metrics::counter!(crate::metric_names::SHARDS_FENCED_TOTAL).increment(1);
                self.held.remove(&shard);
            }
            Ended::Failed { reason, error } => {
                metrics::counter!(crate::metric_names::SHARD_WORKER_FAILURES_TOTAL, "reason" => reason).increment(1);
                tracing::warn!(shard, error, "shard worker failed; restarting it");
                self.retry_at.insert(shard, Instant::now() + self.settings.restart_backoff);
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
        let deadline = Instant::now() + self.settings.stop_deadline;
        while !self.workers.is_empty() {
            match tokio::time::timeout_at(deadline, self.workers.join_next()).await {
                Ok(Some(Ok((shard, _, Ended::Failed { error, .. })))) => {
                    tracing::warn!(shard, error, "worker ended with an error")
                }
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
        let cluster = &self.cluster;
        futures::future::join_all(held.into_iter().map(|(shard, epoch)| async move {
            if let Err(e) = cluster.release(shard, epoch).await {
                tracing::warn!(shard, error = %crate::error_chain(&e), "release at shutdown failed");
            }
        }))
        .await;
        self.held.clear();
        self.publish_gauge();
    }

    fn publish_gauge(&self) {
        let lag = self.cluster.retain_lags(|shard| self.running.contains_key(&shard));
        metrics::gauge!(crate::metric_names::SHARD_LAG_MESSAGES).set(lag as f64);
        metrics::gauge!(crate::metric_names::SHARDS_OWNED).set(self.held.len() as f64);
        metrics::gauge!(crate::metric_names::SHARDS_RUNNING).set(self.running.len() as f64);
    }
}

/// How long one lease operation (claim, release) may hold the coordinator:
/// five heartbeats. One sent while the lease bucket has no leader would
/// otherwise wait for the whole request timeout (5 s).
fn lease_op_limit(cluster: &ClusterHandle) -> Duration {
    cluster.config().heartbeat() * 5
}

/// Runs `op` for every `(shard, item)` at once, each bounded to `limit`.
async fn bounded_each<T, R, Fut>(
    limit: Duration,
    items: Vec<(u32, T)>,
    op: impl Fn(u32, T) -> Fut,
) -> Vec<(u32, Result<R, ClusterError>)>
where
    Fut: Future<Output = Result<R, ClusterError>>,
{
    futures::future::join_all(items.into_iter().map(|(shard, item)| {
        let done = tokio::time::timeout(limit, op(shard, item));
        async move { (shard, done.await.unwrap_or(Err(ClusterError::Timeout { shard }))) }
    }))
    .await
}
