//! [`Mesh`]: the one handle to NATS that a node's parts share.

use crate::{Provisioned, Publisher};
use async_nats::jetstream;
use fluxmesh_schemas::Subjects;
use std::sync::Arc;

/// The node's connection, its pipelined JetStream publisher and the
/// cluster's layout (subjects, shard and partition counts, stream names).
/// Cheap to clone: ingest, commands, shard workers and the HTTP API each
/// hold one instead of their own copies of the parts.
#[derive(Debug, Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: async_nats::Client,
    publisher: Publisher,
    layout: Provisioned,
}

impl Mesh {
    pub fn new(client: async_nats::Client, publisher: Publisher, layout: Provisioned) -> Mesh {
        Mesh { inner: Arc::new(Inner { client, publisher, layout }) }
    }

    /// The data connection (telemetry, events, requests).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// JetStream on the data connection.
    pub fn js(&self) -> &jetstream::Context {
        self.inner.publisher.context()
    }

    /// Pipelined, acknowledged publishes.
    pub fn publisher(&self) -> &Publisher {
        &self.inner.publisher
    }

    pub fn subjects(&self) -> &Subjects {
        &self.inner.layout.subjects
    }

    /// What provisioning found: shard and partition counts, replicas,
    /// stream names.
    pub fn layout(&self) -> &Provisioned {
        &self.inner.layout
    }

    /// Every shard's checkpoint log.
    pub fn checkpoints(&self) -> crate::checkpoint::Checkpoints {
        crate::checkpoint::Checkpoints::new(self.js().clone(), self.subjects().clone())
    }

    /// The cluster's shard count.
    pub fn shards(&self) -> u32 {
        self.inner.layout.shards
    }
}
