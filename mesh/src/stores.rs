//! Every KV bucket, object store and side stream fluxmesh keeps: one
//! function names each, one function opens each (creating it if it is not
//! there yet; idempotent, so every node may call it at start).
//!
//! | name (prefix `fm`) | kind | holds | opened by |
//! |---|---|---|---|
//! | `FM_TEL_{p}` | stream | device telemetry, partition `p` | [`crate::provision`] |
//! | `FM_EVT` | stream | derived events | [`crate::provision`] |
//! | `FM_CKPT` | stream | each shard's checkpoint log | [`crate::provision`] |
//! | `FM_CMDQ` | stream | commands queued for offline devices | [`open_command_queue`] |
//! | `FM_CLUSTER` | KV | shard and partition counts, schema version | [`crate::provision`] |
//! | `FM_NODES` | KV | membership heartbeats | [`crate::cluster::open_buckets`] |
//! | `FM_LEASES` | KV | shard leases (revision = epoch) | [`crate::cluster::open_buckets`] |
//! | `FM_DEVICES` | KV | device credentials and ACL grants | [`open_devices`] |
//! | `FM_RULES` | KV | Rhai rules | [`open_rules`] |
//! | `FM_PLUGINS` | object store | WebAssembly plugins | [`open_plugins`] |
//!
//! Stream names come from `Subjects` (`telemetry_stream`, `event_stream`,
//! `checkpoint_stream`, `command_queue_stream`), bucket names from
//! [`Bucket::name`]; both are `fluxmesh_schemas::subject::resource_name`.

use async_nats::jetstream::{self, kv, object_store, stream};
use fluxmesh_schemas::Subjects;
use std::time::Duration;

/// The KV buckets and object stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Cluster,
    Nodes,
    Leases,
    Devices,
    Rules,
    Plugins,
}

impl Bucket {
    /// `{PREFIX}_{WHAT}`, for example `FM_LEASES`.
    pub fn name(self, prefix: &str) -> String {
        let what = match self {
            Bucket::Cluster => "CLUSTER",
            Bucket::Nodes => "NODES",
            Bucket::Leases => "LEASES",
            Bucket::Devices => "DEVICES",
            Bucket::Rules => "RULES",
            Bucket::Plugins => "PLUGINS",
        };
        fluxmesh_schemas::subject::resource_name(prefix, what)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot create or open {name}")]
pub struct StoreError {
    pub name: String,
    #[source]
    pub source: async_nats::Error,
}

fn kv_config(bucket: Bucket, subjects: &Subjects, replicas: usize, description: &str, history: i64) -> kv::Config {
    kv::Config {
        bucket: bucket.name(subjects.prefix()),
        description: description.to_owned(),
        history,
        num_replicas: replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

async fn open_kv(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, StoreError> {
    let name = config.bucket.clone();
    js.create_or_update_key_value(config).await.map_err(|e| StoreError { name, source: e.into() })
}

/// Device credentials (salted argon2id hashes) and ACL grants.
pub async fn open_devices(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
) -> Result<kv::Store, StoreError> {
    let description = "fluxmesh device credentials (salted argon2id hashes) and ACL grants";
    open_kv(js, kv_config(Bucket::Devices, subjects, replicas, description, 3)).await
}

/// Rules (Rhai), one key per rule id.
pub async fn open_rules(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
) -> Result<kv::Store, StoreError> {
    open_kv(js, kv_config(Bucket::Rules, subjects, replicas, "fluxmesh rules (Rhai), one key per rule id", 5)).await
}

/// WebAssembly plugins, one object per name.
pub async fn open_plugins(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
) -> Result<object_store::ObjectStore, StoreError> {
    let name = Bucket::Plugins.name(subjects.prefix());
    // Find it first: another node may have made it already, possibly with
    // another replica count (each node derives it from the servers it
    // sees), and creating it again would then be refused.
    if let Ok(store) = js.get_object_store(&name).await {
        return Ok(store);
    }
    let created = js
        .create_object_store(object_store::Config {
            bucket: name.clone(),
            description: Some("fluxmesh WebAssembly plugins, one object per name".to_owned()),
            num_replicas: replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        // Lost a race with another node: use theirs.
        Err(e) => js.get_object_store(&name).await.map_err(|_| StoreError { name, source: e.into() }),
    }
}

/// How much the command queue keeps.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Queued commands per device; past it a new one is refused.
    pub per_device: i64,
    /// A backstop age: expiry is normally reported before it.
    pub max_age: Duration,
}

/// The command queue: `{prefix}.cmdq.{shard}.{device}`, at most
/// `limits.per_device` per device (a new one past that is refused, not an
/// old one dropped).
pub async fn open_command_queue(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
    limits: QueueLimits,
) -> Result<stream::Stream, StoreError> {
    let name = subjects.command_queue_stream();
    js.get_or_create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![subjects.command_queue_filter()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_messages_per_subject: limits.per_device,
        discard: stream::DiscardPolicy::New,
        discard_new_per_subject: true,
        max_age: limits.max_age,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .map_err(|e| StoreError { name, source: e.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        assert_eq!(Bucket::Leases.name("fm"), "FM_LEASES");
        assert_eq!(Bucket::Plugins.name("my-mesh"), "MY_MESH_PLUGINS");
        let subjects = Subjects::new("my-mesh").expect("valid prefix");
        assert_eq!(subjects.command_queue_stream(), "MY_MESH_CMDQ");
    }
}
