//! Everything fluxmesh says to NATS.
//!
//! - [`checkpoint`]: each shard's checkpoint log (device states and the
//!   sequence covered), fenced by compare-and-set on the log.
//! - [`cluster`]: membership heartbeats and fenced shard leases in KV.
//! - [`config`]: the `[nats]` section of the node config.
//! - [`connect`]: one client per node, with reconnect and connection events.
//! - [`handle`]: [`Mesh`], the one cheap handle (connection, publisher,
//!   layout) that a node's parts share.
//! - [`lifecycle`]: [`Lifecycle`], the one controller that spawns and
//!   tracks a node's tasks and tells them when to stop.
//! - [`ownership`]: the shard coordinator (leases claimed, handed over and
//!   fenced) and the narrow interface through which it runs the node's
//!   worker on each shard it owns.
//! - [`provision`]: idempotent creation of the streams and KV buckets, and the
//!   check that this node agrees with the cluster on shard count and schema.
//! - [`placement`]: rendezvous hashing of shards over the live nodes.
//! - [`publisher`]: JetStream publishes pipelined through a bounded window of
//!   outstanding acks, retried with the same `Nats-Msg-Id`, every failure
//!   returned to the caller.
//! - [`read`]: reading what a stream holds right now.
//! - [`secret`]: config values that are never printed.
//! - [`shard_reader`]: one shard's telemetry in stream order, with no acks.
//! - [`stores`]: every other stream and bucket, each named by one function
//!   and opened by one function.
//! - [`watch`]: [`watch::Rewatch`], the watch on a bucket that re-creates
//!   itself when NATS ends it or lets it fall silent.

pub mod checkpoint;
pub mod cluster;
pub mod config;
pub mod connect;
pub mod handle;
pub mod lifecycle;
pub mod metric_names;
pub mod ownership;
pub mod placement;
pub mod provision;
pub mod publisher;
pub mod read;
pub mod secret;
pub mod shard_reader;
pub mod stores;
pub mod watch;

pub use config::NatsConfig;
pub use connect::{connect, ConnectError};
pub use handle::Mesh;
pub use lifecycle::Lifecycle;
pub use provision::{provision, telemetry_streams, ProvisionError, Provisioned};
pub use publisher::{frame_headers, Pending, PublishError, Publisher};
pub use read::{read_pending, ReadError};
pub use secret::Secret;

/// An error and each of its causes, joined by ": ", for logs and API
/// answers.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
