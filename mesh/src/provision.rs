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
    #[error("invalid subject prefix")]
    Prefix(#[from] fluxmesh_schemas::TopicError),
    #[error("cannot create or read stream {stream}")]
    Stream {
        stream: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("stream {stream} exists with subjects {found:?}, expected {expected:?}; another cluster may use prefix `{prefix}`")]
    StreamSubjects { stream: String, prefix: String, found: Vec<String>, expected: Vec<String> },
    #[error(
        "stream {stream} cannot be created: its subjects overlap another stream's; a cluster made before \
         telemetry was partitioned has one stream for fm.tel.> (delete it, or use another prefix)"
    )]
    Overlap {
        stream: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("stream {stream} has no leader yet")]
    Leaderless { stream: String },
    #[error("cannot create or read KV bucket {bucket}")]
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
    pub partitions: u32,
    /// One telemetry stream per partition, in partition order.
    pub telemetry_streams: Vec<String>,
    pub event_stream: String,
    /// Messages on plain MQTT topics (outside `devices/`).
    pub message_stream: String,
    /// The last retained message of each topic.
    pub retained_stream: String,
    /// The wills of live MQTT sessions.
    pub will_stream: String,
    /// Persistent MQTT sessions.
    pub session_stream: String,
}

impl Provisioned {
    /// The telemetry stream that holds `shard`.
    pub fn telemetry_stream_of(&self, shard: u32) -> &str {
        let p = fluxmesh_schemas::partition_of(shard, self.shards, self.partitions) as usize;
        self.telemetry_streams.get(p).map_or("", String::as_str)
    }
}

/// Creates (or finds) the streams and buckets and checks cluster agreement.
pub async fn provision(
    client: &async_nats::Client,
    js: &jetstream::Context,
    cfg: &NatsConfig,
) -> Result<Provisioned, ProvisionError> {
    let subjects = Subjects::new(&cfg.prefix)?;
    let replicas = if cfg.replicas > 0 { cfg.replicas } else { auto_replicas(client) };

    let event_stream = subjects.event_stream();
    let telemetry_streams: Vec<String> = (0..cfg.partitions).map(|p| subjects.telemetry_stream(p)).collect();
    let mut streams: Vec<(&String, Vec<String>, u64)> = telemetry_streams
        .iter()
        .enumerate()
        .map(|(p, name)| {
            let shards = fluxmesh_schemas::shard::partition_shards(p as u32, cfg.shards, cfg.partitions);
            let filters = shards.map(|s| subjects.shard_filter(Family::Telemetry, s)).collect();
            (name, filters, cfg.telemetry_max_age_secs)
        })
        .collect();
    streams.push((&event_stream, vec![subjects.family_filter(Family::Event)], cfg.events_max_age_secs));
    let message_stream = subjects.message_stream();
    streams.push((&message_stream, vec![subjects.message_filter()], cfg.messages_max_age_secs));
    // Agree first: a node with another shard count or partition count must
    // not create streams for its own layout.
    let bucket = crate::stores::Bucket::Cluster.name(subjects.prefix());
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
    agree(&store, &bucket, "partitions", cfg.partitions.to_string()).await?;
    agree(&store, &bucket, "schema_version", SCHEMA_VERSION.to_string()).await?;

    for (name, filters, max_age) in streams {
        let config = stream::Config {
            name: name.clone(),
            subjects: filters,
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
    ensure_stream(js, crate::checkpoint::Checkpoints::stream_config(&subjects, replicas), &subjects).await?;
    let retained_stream = subjects.retained_stream();
    let retained = stream::Config {
        duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
        ..last_per_subject(
            &retained_stream,
            "the last retained MQTT message of each topic (empty: cleared)",
            subjects.retained_all(),
            replicas,
        )
    };
    ensure_stream(js, retained, &subjects).await?;
    let will_stream = subjects.will_stream();
    let wills = last_per_subject(
        &will_stream,
        "the MQTT will of each live session (empty: none), published by another node if its node dies",
        subjects.will_filter(None),
        replicas,
    );
    ensure_stream(js, wills, &subjects).await?;
    let session_stream = subjects.session_stream();
    let sessions = stream::Config {
        // A session untouched this long is gone (its client never came back).
        max_age: Duration::from_secs(cfg.sessions_max_age_secs),
        ..last_per_subject(
            &session_stream,
            "persistent MQTT sessions (subscriptions and stream positions; empty: none)",
            subjects.sessions_all(),
            replicas,
        )
    };
    ensure_stream(js, sessions, &subjects).await?;

    Ok(Provisioned {
        subjects,
        shards: cfg.shards,
        partitions: cfg.partitions,
        replicas,
        telemetry_streams,
        event_stream,
        message_stream,
        retained_stream,
        will_stream,
        session_stream,
    })
}

/// The telemetry streams of the cluster with `subjects`' prefix, one per
/// partition in partition order, as the cluster agreed on them (for
/// readers outside the nodes: a verifier, a test, a backup job).
pub async fn telemetry_streams(js: &jetstream::Context, subjects: &Subjects) -> Result<Vec<String>, ProvisionError> {
    let bucket = crate::stores::Bucket::Cluster.name(subjects.prefix());
    let bucket_err = |e: async_nats::Error| ProvisionError::Bucket { bucket: bucket.clone(), source: e };
    let store = js.get_key_value(&bucket).await.map_err(|e| bucket_err(e.into()))?;
    let value = store.get("partitions").await.map_err(|e| bucket_err(e.into()))?;
    let text = value.map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default();
    let partitions: u32 = text.parse().map_err(|e: std::num::ParseIntError| bucket_err(e.into()))?;
    Ok((0..partitions).map(|p| subjects.telemetry_stream(p)).collect())
}

/// A stream that keeps the last message of each subject (a key-value map
/// on our own subjects; an empty message is a deletion), on file, read
/// directly from any replica.
fn last_per_subject(name: &str, what: &str, subject: String, replicas: usize) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        description: Some(format!("fluxmesh: {what}")),
        subjects: vec![subject],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_messages_per_subject: 1,
        discard: stream::DiscardPolicy::Old,
        allow_direct: true,
        ..Default::default()
    }
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
    let mut stream = js.get_or_create_stream(config).await.map_err(|e| {
        // JetStream's "subjects overlap with an existing stream".
        let overlap = matches!(e.kind(), jetstream::context::CreateStreamErrorKind::JetStream(ref j)
            if j.error_code() == jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP);
        if overlap {
            ProvisionError::Overlap { stream: name.clone(), source: e.into() }
        } else {
            ProvisionError::Stream { stream: name.clone(), source: e.into() }
        }
    })?;
    let info = stream.info().await.map_err(|e| ProvisionError::Stream { stream: name.clone(), source: e.into() })?;
    if info.config.subjects != expected {
        return Err(ProvisionError::StreamSubjects {
            stream: name,
            prefix: subjects.prefix().to_owned(),
            found: info.config.subjects.clone(),
            expected,
        });
    }
    if info.config.num_replicas < replicas {
        // Made while the cluster was still forming: a node that saw fewer
        // servers than there are (routes not all up yet) picked fewer
        // replicas. Raise it; JetStream copies the data over.
        tracing::info!(stream = %name, existing = info.config.num_replicas, wanted = replicas, "raising the stream's replicas");
        let mut config = info.config.clone();
        config.num_replicas = replicas;
        js.update_stream(config)
            .await
            .map_err(|e| ProvisionError::Stream { stream: name.clone(), source: e.into() })?;
        return Err(ProvisionError::Leaderless { stream: name });
    } else if info.config.num_replicas > replicas {
        tracing::warn!(
            stream = %name,
            existing = info.config.num_replicas,
            wanted = replicas,
            "stream exists with more replicas than this node would pick; leaving it as it is"
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
