//! The names of the metrics the mesh layer emits, in one place: call sites
//! use these constants, and the node describes every one when it installs
//! its recorder (`ALL`). README.md lists them all; a test keeps it so.

/// What a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Histograms are in seconds.
    Histogram,
}

/// One metric: its name, kind and help text.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

pub const CLUSTER_BAD_ENTRIES_TOTAL: &str = "fluxmesh_cluster_bad_entries_total";
pub const CLUSTER_MEMBERS: &str = "fluxmesh_cluster_members";
pub const WATCH_RESTARTS_TOTAL: &str = "fluxmesh_watch_restarts_total";
pub const HEARTBEAT_FAILURES_TOTAL: &str = "fluxmesh_heartbeat_failures_total";
pub const LEASE_CLAIMS_TOTAL: &str = "fluxmesh_lease_claims_total";
pub const LEASE_RELEASES_TOTAL: &str = "fluxmesh_lease_releases_total";
pub const NATS_CONNECTED: &str = "fluxmesh_nats_connected";
pub const PUBLISH_ACK_SECONDS: &str = "fluxmesh_publish_ack_seconds";
pub const PUBLISH_RETRIES_TOTAL: &str = "fluxmesh_publish_retries_total";
pub const SHARD_CONSUMER_RECREATED_TOTAL: &str = "fluxmesh_shard_consumer_recreated_total";
pub const SHARD_DELIVERY_GAPS_TOTAL: &str = "fluxmesh_shard_delivery_gaps_total";
pub const SHARD_LAG_MESSAGES: &str = "fluxmesh_shard_lag_messages";
pub const SHARD_START_SECONDS: &str = "fluxmesh_shard_start_seconds";
pub const SHARD_WORKER_FAILURES_TOTAL: &str = "fluxmesh_shard_worker_failures_total";
pub const SHARDS_FENCED_TOTAL: &str = "fluxmesh_shards_fenced_total";
pub const SHARDS_OWNED: &str = "fluxmesh_shards_owned";
pub const SHARDS_RUNNING: &str = "fluxmesh_shards_running";

/// Every metric above, with its kind and help text.
pub const ALL: &[Metric] = &[
    Metric { name: CLUSTER_BAD_ENTRIES_TOTAL, kind: Kind::Counter, help: "Cluster KV entries (members, leases) that could not be read and were skipped." },
    Metric { name: CLUSTER_MEMBERS, kind: Kind::Gauge, help: "Live nodes this node sees in the membership, itself included (a node whose heartbeats stop drops out)." },
    Metric { name: WATCH_RESTARTS_TOTAL, kind: Kind::Counter, help: "Watches on a bucket (membership, lease, rules, plugins, credentials) re-created after NATS ended, failed or silenced them." },
    Metric { name: HEARTBEAT_FAILURES_TOTAL, kind: Kind::Counter, help: "Membership heartbeats not acknowledged in time." },
    Metric { name: LEASE_CLAIMS_TOTAL, kind: Kind::Counter, help: "Leases claimed, released, given up (past the fencing deadline, or found taken over)." },
    Metric { name: LEASE_RELEASES_TOTAL, kind: Kind::Counter, help: "Leases claimed, released, given up (past the fencing deadline, or found taken over)." },
    Metric { name: NATS_CONNECTED, kind: Kind::Gauge, help: "1 while the node is connected to NATS." },
    Metric { name: PUBLISH_ACK_SECONDS, kind: Kind::Histogram, help: "Time from sending a JetStream publish to its ack." },
    Metric { name: PUBLISH_RETRIES_TOTAL, kind: Kind::Counter, help: "JetStream publishes sent again after a timeout or refusal." },
    Metric { name: SHARD_CONSUMER_RECREATED_TOTAL, kind: Kind::Counter, help: "Shard readers re-created (a delivery gap or a silent consumer) from the next message wanted; workers restarted after an error (consumer, output, checkpoint, storage, panic, …)." },
    Metric { name: SHARD_DELIVERY_GAPS_TOTAL, kind: Kind::Counter, help: "Delivery gaps a shard reader found (it starts over right after the last message it handed out)." },
    Metric { name: SHARD_LAG_MESSAGES, kind: Kind::Gauge, help: "Messages stored and not yet processed, summed over the shards this node runs." },
    Metric { name: SHARD_START_SECONDS, kind: Kind::Histogram, help: "Batch processing, checkpoint (commit wait and append), worker start (claim and log load)." },
    Metric { name: SHARD_WORKER_FAILURES_TOTAL, kind: Kind::Counter, help: "Shard readers re-created (a delivery gap or a silent consumer) from the next message wanted; workers restarted after an error (consumer, output, checkpoint, storage, panic, …)." },
    Metric { name: SHARDS_FENCED_TOTAL, kind: Kind::Counter, help: "Leases claimed, released, given up (past the fencing deadline, or found taken over)." },
    Metric { name: SHARDS_OWNED, kind: Kind::Gauge, help: "Leases this node holds; shard workers running." },
    Metric { name: SHARDS_RUNNING, kind: Kind::Gauge, help: "Leases this node holds; shard workers running." },
];
