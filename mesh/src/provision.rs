//! Idempotent provisioning of the mesh's streams and KV buckets.
//!
//! Every node runs this at start-up; the first one creates, the others find
//! what exists. The cluster's shard count and schema version live in the
//! `{PREFIX}_CLUSTER` KV bucket; a node whose own values differ refuses to
//! start rather than publish to the wrong shards.

use crate::NatsConfig;
use async_nats::jetstream::{self, kv, stream};
use fluxmesh_schemas::subject::Family;
use fluxmesh_schemas::{Subjects, SCHEMA_VERSION};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("invalid subject prefix: {0}")]
    Prefix(#[from] fluxmesh_schemas::TopicError),
    #[error("cannot create or read stream {stream}: {source}")]
    Stream {
        stream: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("stream {stream} exists with subjects {found:?}, expected {expected:?}; another cluster may use prefix `{prefix}`")]
    StreamSubjects { stream: String, prefix: String, found: Vec<String>, expected: Vec<String> },
    #[error("stream {stream} has no leader yet")]
    Leaderless { stream: String },
    #[error("cannot create or read KV bucket {bucket}: {source}")]
    Bucket {
        bucket: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("this node has {key} = {ours} but the cluster was created with {key} = {cluster}; refusing to join")]
    ClusterMismatch { key: &'static str, ours: String, cluster: String },
}

impl ProvisionError {
    /// Whether trying again may help: JetStream not answering yet (a
    /// cluster still electing leaders) may; a disagreement never does.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ProvisionError::Stream { .. } | ProvisionError::Leaderless { .. } | ProvisionError::Bucket { .. }
        )
    }
}

/// What provisioning found or made.
#[derive(Debug, Clone)]
pub struct Provisioned {
    pub subjects: Subjects,
    pub shards: u32,
    pub replicas: usize,
    pub telemetry_stream: String,
    pub event_stream: String,
    pub checkpoint_stream: String,
}

/// Creates (or finds) the streams and buckets and checks cluster agreement.
pub async fn provision(
    client: &async_nats::Client,
    js: &jetstream::Context,
    cfg: &NatsConfig,
) -> Result<Provisioned, ProvisionError> {
    let subjects = Subjects::new(&cfg.prefix)?;
    let replicas = if cfg.replicas > 0 { cfg.replicas } else { auto_replicas(client) };

    let telemetry_stream = subjects.telemetry_stream();
    let event_stream = subjects.event_stream();
    for (name, family, max_age) in [
        (&telemetry_stream, Family::Telemetry, cfg.telemetry_max_age_secs),
        (&event_stream, Family::Event, cfg.events_max_age_secs),
    ] {
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![subjects.family_filter(family)],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
            max_age: Duration::from_secs(max_age),
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            ..Default::default()
        };
        ensure_stream(js, config, &subjects).await?;
    }
    let checkpoint_stream = subjects.checkpoint_stream();
    ensure_stream(js, crate::checkpoint::Checkpoints::stream_config(&subjects, replicas), &subjects).await?;

    let bucket = format!("{}_CLUSTER", subjects.prefix().to_ascii_uppercase().replace('-', "_"));
    let store = js
        .create_or_update_key_value(kv::Config {
            bucket: bucket.clone(),
            description: "fluxmesh cluster-wide settings that every node must share".to_owned(),
            history: 1,
            num_replicas: replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| ProvisionError::Bucket { bucket: bucket.clone(), source: e.into() })?;
    agree(&store, &bucket, "shards", cfg.shards.to_string()).await?;
    agree(&store, &bucket, "schema_version", SCHEMA_VERSION.to_string()).await?;

    Ok(Provisioned { subjects, shards: cfg.shards, replicas, telemetry_stream, event_stream, checkpoint_stream })
}

/// min(3, servers in the NATS cluster), counting the servers the connected
/// server gossips to its clients.
fn auto_replicas(client: &async_nats::Client) -> usize {
    let info = client.server_info();
    let mut urls = info.connect_urls.clone();
    urls.sort();
    urls.dedup();
    urls.len().clamp(1, 3)
}

async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
    subjects: &Subjects,
) -> Result<(), ProvisionError> {
    let name = config.name.clone();
    let expected = config.subjects.clone();
    let replicas = config.num_replicas;
    let mut stream = js
        .get_or_create_stream(config)
        .await
        .map_err(|e| ProvisionError::Stream { stream: name.clone(), source: e.into() })?;
    let info = stream.info().await.map_err(|e| ProvisionError::Stream { stream: name.clone(), source: e.into() })?;
    if info.config.subjects != expected {
        return Err(ProvisionError::StreamSubjects {
            stream: name,
            prefix: subjects.prefix().to_owned(),
            found: info.config.subjects.clone(),
            expected,
        });
    }
    if info.config.num_replicas != replicas {
        tracing::warn!(
            stream = %name,
            existing = info.config.num_replicas,
            wanted = replicas,
            "stream exists with another replica count; leaving it as it is"
        );
    }
    // A replicated stream answers publishes only once it has elected a
    // leader; the node is not ready before that.
    if info.cluster.as_ref().is_some_and(|c| c.leader.is_none()) {
        return Err(ProvisionError::Leaderless { stream: name });
    }
    Ok(())
}

/// Writes `key = ours` if the bucket has no value yet, then insists that the
/// stored value is ours.
async fn agree(store: &kv::Store, bucket: &str, key: &'static str, ours: String) -> Result<(), ProvisionError> {
    let bucket_err = |e: async_nats::Error| ProvisionError::Bucket { bucket: bucket.to_owned(), source: e };
    // `create` fails if the key exists; losing that race is fine.
    if let Err(e) = store.create(key, ours.clone().into()).await {
        if e.kind() != kv::CreateErrorKind::AlreadyExists {
            return Err(bucket_err(e.into()));
        }
    }
    let stored = store.get(key).await.map_err(|e| bucket_err(e.into()))?;
    let cluster = stored.map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default();
    if cluster != ours {
        return Err(ProvisionError::ClusterMismatch { key, ours, cluster });
    }
    Ok(())
}
