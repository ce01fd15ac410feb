//! Membership and shard leases, both in JetStream KV.
//!
//! **Membership** (`{PREFIX}_NODES`): every node puts its [`Member`] entry
//! every `heartbeat_ms`; every node watches the bucket and counts a node as
//! live while its last heartbeat arrived less than `missed_heartbeats ×
//! heartbeat_ms` ago (judged by the watcher's own clock on arrival, so no
//! two clocks are compared). A node that leaves gracefully deletes its entry
//! and is gone at once. The bucket's `max_age` removes entries of dead nodes
//! later.
//!
//! **Leases** (`{PREFIX}_LEASES`, key = shard number): a [`Lease`] names the
//! node and the process incarnation that holds a shard. It is written only
//! with compare-and-set on the KV revision, and that revision is the lease's
//! epoch (fencing token). A lease is *valid* while its holder, with the same
//! incarnation, is live. A node claims a shard when placement says it should
//! own it and the lease is free or held by a node that is not live.
//!
//! **Fencing a paused node**: a node trusts its own leases only until
//! [`ClusterHandle::valid_until`]: the send time of its last acknowledged
//! heartbeat plus the liveness timeout minus a margin. Every other node
//! declares it dead no earlier than that (they count from when the
//! heartbeat *arrived*), so a node that was stopped (SIGSTOP) and wakes up
//! sees its deadline passed before anyone else could have claimed, and stops
//! processing before it emits anything more.

use crate::lifecycle::Lifecycle;
use crate::stores::Bucket;
use crate::watch::{KvHistory, Rewatch, Watched};
use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The `[cluster]` config section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// How often a node writes its membership heartbeat.
    pub heartbeat_ms: u64,
    /// Heartbeats a node may miss before the others count it dead and take
    /// its shards over. Dead after `heartbeat_ms × missed_heartbeats`.
    pub missed_heartbeats: u32,
    /// How long a node may stay cut off from the mesh (its own heartbeats
    /// unacknowledged past their validity, so its leases have lapsed, and
    /// unable to reach across the NATS cluster) before it stops serving
    /// devices: it closes its MQTT connections and
    /// refuses new ones, and `/readyz` fails, until it is back. Devices then
    /// reconnect to a node that can store what they send.
    pub cut_off_grace_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { heartbeat_ms: 200, missed_heartbeats: 4, cut_off_grace_ms: 800 }
    }
}

impl ClusterConfig {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    /// How long after its last heartbeat a node is counted dead.
    pub fn liveness_timeout(&self) -> Duration {
        self.heartbeat() * self.missed_heartbeats
    }

    pub fn cut_off_grace(&self) -> Duration {
        Duration::from_millis(self.cut_off_grace_ms)
    }

    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(20..=60_000).contains(&self.heartbeat_ms) {
            problems.push("cluster.heartbeat_ms: must be between 20 and 60000".to_owned());
        }
        if !(2..=100).contains(&self.missed_heartbeats) {
            problems.push("cluster.missed_heartbeats: must be between 2 and 100".to_owned());
        }
        if self.cut_off_grace_ms > 600_000 {
            problems.push("cluster.cut_off_grace_ms: must be at most 600000".to_owned());
        }
        problems
    }
}

/// What a node says about itself in the membership bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node_id: String,
    /// Random per process start: a restarted node is a new incarnation, and
    /// leases of its previous one are not valid.
    pub incarnation: String,
    /// Where the node serves HTTP and MQTT (for operators and redirects).
    pub http: String,
    pub mqtt: String,
    pub version: String,
    pub started_us: i64,
    /// Per shard this node runs: messages stored and not yet processed, as
    /// of its last heartbeat.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub lag: BTreeMap<u32, u64>,
}

/// Who holds a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub node_id: String,
    pub incarnation: String,
    /// When it was claimed (µs since the epoch), for operators.
    pub claimed_us: i64,
}

/// A lease as last seen in the bucket: its holder and revision (the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLease {
    pub lease: Lease,
    pub epoch: u64,
}

/// One consistent picture of the cluster, as this node sees it now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Live members by node id.
    pub live: BTreeMap<String, Member>,
    /// Current leases by shard. A shard absent here is free.
    pub leases: BTreeMap<u32, HeldLease>,
    /// The highest lease-bucket revision seen: every lease change up to it
    /// is reflected in `leases`. A lease we hold at an epoch at or below it
    /// that `leases` shows at another epoch (or not at all) was taken from
    /// us, even if the changes in between were never seen one by one.
    pub lease_revision: u64,
}

impl View {
    /// Whether `lease` is backed by a live holder of the same incarnation.
    pub fn is_valid(&self, lease: &Lease) -> bool {
        self.live.get(&lease.node_id).is_some_and(|m| m.incarnation == lease.incarnation)
    }

    /// Whether the lease we took on `shard` at `ours` has been overwritten
    /// or deleted since: the view has seen the bucket at or past our epoch,
    /// and the shard's lease is not at our epoch. Judged by revision, not by
    /// watching for the change itself: a view can move from our epoch
    /// straight past a takeover and a release (the changes in between are
    /// coalesced) and show no lease at all.
    pub fn lost(&self, shard: u32, ours: u64) -> bool {
        self.lease_revision >= ours && self.leases.get(&shard).map(|l| l.epoch) != Some(ours)
    }

    /// Live node ids, for placement.
    pub fn live_ids(&self) -> Vec<String> {
        self.live.keys().cloned().collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot create or open KV bucket {bucket}")]
    Bucket {
        bucket: String,
        #[source]
        source: async_nats::Error,
    },
    #[error(transparent)]
    Watch(#[from] crate::watch::WatchError),
    #[error("first heartbeat failed")]
    Heartbeat(#[source] async_nats::Error),
    #[error("shard {shard}: lease changed under us (another node claimed or released it first)")]
    LeaseConflict { shard: u32 },
    #[error("shard {shard}: lease write not answered in time")]
    Timeout { shard: u32 },
    #[error("shard {shard}: lease write failed")]
    Lease {
        shard: u32,
        #[source]
        source: async_nats::Error,
    },
}

impl ClusterError {
    /// Whether trying again may help.
    pub fn is_transient(&self) -> bool {
        !matches!(self, ClusterError::LeaseConflict { .. })
    }
}

/// Opens (creating if needed) the membership and lease buckets.
pub async fn open_buckets(
    js: &jetstream::Context,
    prefix: &str,
    replicas: usize,
    cfg: &ClusterConfig,
) -> Result<(kv::Store, kv::Store), ClusterError> {
    let open = |name: String, description: &str, max_age: Duration| {
        let config = kv::Config {
            bucket: name.clone(),
            description: description.to_owned(),
            history: 1,
            max_age,
            num_replicas: replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        async move {
            js.create_or_update_key_value(config)
                .await
                .map_err(|e| ClusterError::Bucket { bucket: name, source: e.into() })
        }
    };
    // Dead members' entries disappear after a while; liveness itself is
    // judged by heartbeat arrival, not by this.
    let members_max_age = (cfg.liveness_timeout() * 10).max(Duration::from_secs(60));
    let members = open(Bucket::Nodes.name(prefix), "fluxmesh live nodes (heartbeats)", members_max_age).await?;
    let leases = open(Bucket::Leases.name(prefix), "fluxmesh shard leases (revision = epoch)", Duration::ZERO).await?;
    Ok((members, leases))
}

/// This node's handle on membership and leases. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ClusterHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    me: Member,
    cfg: ClusterConfig,
    members: kv::Store,
    leases: kv::Store,
    view: watch::Receiver<View>,
    /// Send time of the last acknowledged heartbeat.
    last_heartbeat: Mutex<Instant>,
    /// What the next heartbeat says about each running shard's lag.
    lags: Mutex<BTreeMap<u32, u64>>,
}

impl ClusterHandle {
    /// Joins: writes the first heartbeat, then starts the heartbeat and the
    /// two watchers on `life`; all stop on its stop signal. Returns
    /// once this node sees the current membership and leases.
    pub async fn join(
        members: kv::Store,
        leases: kv::Store,
        me: Member,
        cfg: ClusterConfig,
        life: &Lifecycle,
    ) -> Result<ClusterHandle, ClusterError> {
        let stop = life.token().clone();
        let value = serde_json::to_vec(&me).map_err(|e| ClusterError::Heartbeat(e.into()))?;
        let sent = Instant::now();
        members.put(&me.node_id, value.into()).await.map_err(|e| ClusterError::Heartbeat(e.into()))?;

        let (view_tx, view_rx) = watch::channel(View::default());
        let view_tx = Arc::new(view_tx);
        let (members_ready, leases_ready) = (CancellationToken::new(), CancellationToken::new());
        let member_watch = Rewatch::open(KvHistory(members.clone()), "membership", 0).await?.spawn(life);
        let lease_watch = Rewatch::open(KvHistory(leases.clone()), "lease", 0).await?.spawn(life);
        let inner = Arc::new(Inner {
            me,
            cfg,
            members,
            leases,
            view: view_rx,
            last_heartbeat: Mutex::new(sent),
            lags: Mutex::new(BTreeMap::new()),
        });
        life.spawn(watch_members(
            member_watch,
            inner.cfg.liveness_timeout(),
            view_tx.clone(),
            members_ready.clone(),
            stop.clone(),
        ));
        life.spawn(watch_leases(lease_watch, view_tx, leases_ready.clone(), stop.clone()));
        life.spawn(heartbeat(inner.clone(), stop.clone()));
        let handle = ClusterHandle { inner };
        tokio::select! {
            _ = async { members_ready.cancelled().await; leases_ready.cancelled().await } => {}
            _ = stop.cancelled() => {}
        }
        Ok(handle)
    }

    pub fn me(&self) -> &Member {
        &self.inner.me
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.inner.cfg
    }

    /// The current view.
    pub fn view(&self) -> View {
        self.inner.view.borrow().clone()
    }

    /// A receiver that changes whenever membership or leases change.
    pub fn subscribe(&self) -> watch::Receiver<View> {
        self.inner.view.clone()
    }

    /// Until when this node may trust the leases it holds (see the module
    /// docs). Past it, stop processing: others may have taken over.
    pub fn valid_until(&self) -> Instant {
        let sent = *self.inner.last_heartbeat.lock().unwrap_or_else(|p| p.into_inner());
        let timeout = self.inner.cfg.liveness_timeout();
        // One heartbeat of margin for the watchers' tick and clock drift.
        sent + timeout.saturating_sub(self.inner.cfg.heartbeat())
    }

    /// Since when this node has been cut off from the mesh: its last
    /// acknowledged heartbeat is too old for its leases to be trusted (see
    /// [`ClusterHandle::valid_until`]). `None` while it is in touch.
    pub fn cut_off_since(&self) -> Option<Instant> {
        let until = self.valid_until();
        (Instant::now() >= until).then_some(until)
    }

    /// Whether a lease held by this process is still trustworthy now.
    pub fn holds(&self, lease: &Lease) -> bool {
        self.is_mine(lease) && Instant::now() < self.valid_until()
    }

    /// Claims `shard`: creates the lease if `expected` is `None`, else
    /// replaces revision `expected`. Returns the lease with its new epoch.
    pub async fn claim(&self, shard: u32, expected: Option<u64>) -> Result<HeldLease, ClusterError> {
        let lease = Lease {
            node_id: self.inner.me.node_id.clone(),
            incarnation: self.inner.me.incarnation.clone(),
            claimed_us: fluxmesh_schemas::frame::now_us(),
        };
        let value: bytes::Bytes =
            serde_json::to_vec(&lease).map_err(|e| ClusterError::Lease { shard, source: e.into() })?.into();
        let key = shard.to_string();
        let value_for_result = lease.clone();
        let result = match expected {
            None => self.inner.leases.create(&key, value).await.map_err(|e| match e.kind() {
                kv::CreateErrorKind::AlreadyExists => ClusterError::LeaseConflict { shard },
                _ => ClusterError::Lease { shard, source: e.into() },
            }),
            Some(revision) => self.inner.leases.update(&key, value, revision).await.map_err(|e| match e.kind() {
                kv::UpdateErrorKind::WrongLastRevision => ClusterError::LeaseConflict { shard },
                _ => ClusterError::Lease { shard, source: e.into() },
            }),
        };
        let epoch = result?;
        metrics::counter!(crate::metric_names::LEASE_CLAIMS_TOTAL).increment(1);
        Ok(HeldLease { lease: value_for_result, epoch })
    }

    /// Sets what the next heartbeats say about `shard`'s lag (forgotten by
    /// [`ClusterHandle::retain_lags`] once this node no longer runs it).
    pub fn report_lag(&self, shard: u32, pending: u64) {
        self.inner.lags.lock().unwrap_or_else(|p| p.into_inner()).insert(shard, pending);
    }

    /// Forgets the lag of every shard for which `keep` is false; returns
    /// the sum of the others.
    pub fn retain_lags(&self, mut keep: impl FnMut(u32) -> bool) -> u64 {
        let mut lags = self.inner.lags.lock().unwrap_or_else(|p| p.into_inner());
        lags.retain(|shard, _| keep(*shard));
        lags.values().sum()
    }

    /// Whether `lease` names this process (whether or not still valid).
    pub fn is_mine(&self, lease: &Lease) -> bool {
        lease.node_id == self.inner.me.node_id && lease.incarnation == self.inner.me.incarnation
    }

    /// Releases `shard` if its lease is still at `epoch` (ours).
    pub async fn release(&self, shard: u32, epoch: u64) -> Result<(), ClusterError> {
        self.inner.leases.delete_expect_revision(shard.to_string(), Some(epoch)).await.map_err(|e| match e.kind() {
            kv::DeleteErrorKind::WrongLastRevision => ClusterError::LeaseConflict { shard },
            _ => ClusterError::Lease { shard, source: e.into() },
        })
    }

    /// Leaves the cluster: deletes this node's membership entry, so that the
    /// others see it gone at once rather than after the liveness timeout.
    pub async fn leave(&self) {
        if let Err(e) = self.inner.members.delete(&self.inner.me.node_id).await {
            tracing::warn!(error = %crate::error_chain(&e), "could not delete membership entry; others will time it out");
        }
    }
}

/// Puts this node's entry (with its shards' lags) every heartbeat until
/// `stop`.
async fn heartbeat(inner: Arc<Inner>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(inner.cfg.heartbeat());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut me = inner.me.clone();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        me.lag.clone_from(&inner.lags.lock().unwrap_or_else(|p| p.into_inner()));
        let value = match serde_json::to_vec(&me) {
            Ok(v) => bytes::Bytes::from(v),
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "cannot encode the heartbeat");
                continue;
            }
        };
        let sent = Instant::now();
        // A heartbeat that takes longer than the liveness timeout is as good
        // as missed; do not let a stuck put hold the loop.
        match tokio::time::timeout(inner.cfg.liveness_timeout(), inner.members.put(&inner.me.node_id, value)).await {
            Ok(Ok(_)) => {
                let mut last = inner.last_heartbeat.lock().unwrap_or_else(|p| p.into_inner());
                *last = (*last).max(sent);
            }
            Ok(Err(e)) => {
                metrics::counter!(crate::metric_names::HEARTBEAT_FAILURES_TOTAL).increment(1);
                tracing::warn!(error = %crate::error_chain(&e), "heartbeat failed");
            }
            Err(_) => {
                metrics::counter!(crate::metric_names::HEARTBEAT_FAILURES_TOTAL).increment(1);
                tracing::warn!("heartbeat timed out");
            }
        }
    }
}

/// Keeps `view.live` current: adds or refreshes members on every heartbeat,
/// drops them on delete or when their heartbeats stop.
async fn watch_members(
    mut watch: mpsc::Receiver<Watched<kv::Entry>>,
    timeout: Duration,
    view: Arc<watch::Sender<View>>,
    ready: CancellationToken,
    stop: CancellationToken,
) {
    let mut seen: BTreeMap<String, (Member, Instant)> = BTreeMap::new();
    let mut tick = tokio::time::interval(timeout / 8);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // An empty bucket has no history to replay.
    let mut replaying = true;
    let mut first_tick = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            watched = watch.recv() => {
                let entry = match watched {
                    Some(Watched::Item(entry)) => entry,
                    Some(Watched::Restarted) => {
                        // Replayed entries are as old as their server timestamps.
                        replaying = true;
                        continue;
                    }
                    None => return,
                };
                {
                    match entry.operation {
                        kv::Operation::Put => match serde_json::from_slice::<Member>(&entry.value) {
                            Ok(member) => {
                                // A replayed entry is as old as its server timestamp says.
                                let age = if replaying { entry_age(&entry) } else { Duration::ZERO };
                                let arrived = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                                seen.insert(entry.key.clone(), (member, arrived));
                            }
                            Err(e) => {
                                metrics::counter!(crate::metric_names::CLUSTER_BAD_ENTRIES_TOTAL).increment(1);
                                tracing::warn!(key = %entry.key, error = %crate::error_chain(&e), "unreadable membership entry ignored");
                            }
                        },
                        kv::Operation::Delete | kv::Operation::Purge => {
                            seen.remove(&entry.key);
                        }
                    }
                    if entry.delta == 0 && replaying {
                        replaying = false;
                        ready.cancel();
                    }
                }
            },
            _ = tick.tick() => {
                if first_tick {
                    first_tick = false;
                } else if replaying {
                    // Nothing to replay (empty bucket): the watch is current.
                    replaying = false;
                    ready.cancel();
                }
            }
        }
        let now = Instant::now();
        let live: BTreeMap<String, Member> = seen
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) < timeout)
            .map(|(id, (m, _))| (id.clone(), m.clone()))
            .collect();
        metrics::gauge!(crate::metric_names::CLUSTER_MEMBERS).set(live.len() as f64);
        view.send_if_modified(|v| {
            if v.live != live {
                v.live = live;
                true
            } else {
                false
            }
        });
    }
}

/// How long ago the server stored `entry`, by the wall clock.
fn entry_age(entry: &kv::Entry) -> Duration {
    let now = time::OffsetDateTime::now_utc();
    let age = now - entry.created;
    Duration::try_from(age).unwrap_or(Duration::ZERO)
}

/// Keeps `view.leases` current.
async fn watch_leases(
    mut watch: mpsc::Receiver<Watched<kv::Entry>>,
    view: Arc<watch::Sender<View>>,
    ready: CancellationToken,
    stop: CancellationToken,
) {
    let mut replaying = true;
    let mut empty_check = tokio::time::interval(Duration::from_millis(100));
    empty_check.tick().await;
    loop {
        let entry = tokio::select! {
            _ = stop.cancelled() => return,
            _ = empty_check.tick(), if replaying => {
                replaying = false;
                ready.cancel();
                continue;
            }
            watched = watch.recv() => match watched {
                Some(Watched::Item(entry)) => entry,
                Some(Watched::Restarted) => continue,
                None => return,
            },
        };
        let Ok(shard) = entry.key.parse::<u32>() else {
            metrics::counter!(crate::metric_names::CLUSTER_BAD_ENTRIES_TOTAL).increment(1);
            tracing::warn!(key = %entry.key, "lease key is not a shard number; ignored");
            continue;
        };
        let held = match entry.operation {
            kv::Operation::Put => match serde_json::from_slice::<Lease>(&entry.value) {
                Ok(lease) => Some(HeldLease { lease, epoch: entry.revision }),
                Err(e) => {
                    // Held by nobody valid; claimable by CAS on its revision.
                    metrics::counter!(crate::metric_names::CLUSTER_BAD_ENTRIES_TOTAL).increment(1);
                    tracing::warn!(shard, error = %crate::error_chain(&e), "unreadable lease; treating it as held by a dead node");
                    let nobody = Lease { node_id: String::new(), incarnation: String::new(), claimed_us: 0 };
                    Some(HeldLease { lease: nobody, epoch: entry.revision })
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => None,
        };
        view.send_modify(|v| {
            v.lease_revision = v.lease_revision.max(entry.revision);
            match held {
                Some(h) => {
                    v.leases.insert(shard, h);
                }
                None => {
                    v.leases.remove(&shard);
                }
            }
        });
        if entry.delta == 0 && replaying {
            replaying = false;
            ready.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(node: &str, epoch: u64) -> HeldLease {
        HeldLease { lease: Lease { node_id: node.into(), incarnation: "i".into(), claimed_us: 0 }, epoch }
    }

    /// The trace behind the double apply after a pause: node-3 claimed
    /// shard 0 at epoch 382; node-2 took it over (443) and later released
    /// it (delete at 457). Node-3's view went from 382 straight to "no
    /// lease" and it kept processing.
    #[test]
    fn a_lease_taken_and_released_behind_our_back_is_lost() {
        let mut view = View::default();
        view.leases.insert(0, held("node-3", 382));
        view.lease_revision = 382;
        assert!(!view.lost(0, 382), "our own lease, current");

        view.leases.remove(&0);
        view.lease_revision = 457;
        assert!(view.lost(0, 382), "deleted after a takeover we never saw");

        view.leases.insert(0, held("node-2", 443));
        view.lease_revision = 443;
        assert!(view.lost(0, 382), "taken over");
    }

    #[test]
    fn a_claim_the_view_has_not_caught_up_with_is_not_lost() {
        let mut view = View { lease_revision: 500, ..View::default() };
        // We claimed at 501; the watch has not delivered it yet.
        assert!(!view.lost(0, 501));
        view.leases.insert(0, held("me", 501));
        view.lease_revision = 501;
        assert!(!view.lost(0, 501));
    }
}
