//! The `[nats]` config section.

use crate::Secret;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How a node reaches NATS and how the mesh's streams are shaped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Servers to connect to; the client also learns the rest of the cluster
    /// from them. A single string is split at commas, so that
    /// `FLUXMESH_NATS_URLS=nats://a:4222,nats://b:4222` works.
    #[serde(deserialize_with = "list_or_comma_string")]
    pub urls: Vec<String>,
    /// First token of every subject, and the stream name prefix.
    pub prefix: String,
    /// Shards per cluster. Fixed for the life of a cluster: every node must
    /// agree, and a node with another value refuses to start.
    pub shards: u32,
    /// Telemetry streams per cluster (`{PREFIX}_TEL_0` …), each holding a
    /// contiguous range of shards, so that their leaders spread over the
    /// NATS servers. Fixed for the life of a cluster, like `shards`.
    pub partitions: u32,
    /// Stream and KV replicas; 0 picks min(3, servers in the NATS cluster).
    pub replicas: usize,
    /// JetStream dedupe window: a frame re-published within it with the same
    /// id is stored once.
    pub duplicate_window_secs: u64,
    /// How long telemetry stays in the `{PREFIX}_TEL_{p}` streams.
    pub telemetry_max_age_secs: u64,
    /// How long derived events stay in `{PREFIX}_EVT`.
    pub events_max_age_secs: u64,
    /// How long messages on plain MQTT topics stay in `{PREFIX}_MSG`: the
    /// longest an offline persistent session can be away and still get
    /// them.
    pub messages_max_age_secs: u64,
    /// How long a persistent MQTT session is kept after it last changed
    /// (its client connected, subscribed or received).
    pub sessions_max_age_secs: u64,
    /// Publishes awaiting their JetStream ack, at most, per node. When full,
    /// ingress waits (backpressure); nothing is dropped.
    pub publish_window: usize,
    /// How long to wait for one JetStream ack before retrying.
    pub ack_timeout_ms: u64,
    /// Attempts per publish (same `Nats-Msg-Id`, so retries never store
    /// twice) before the failure is reported to the sender.
    pub publish_attempts: u32,
    /// Timeout for one connection attempt.
    pub connect_timeout_ms: u64,
    /// User and password for the servers' `authorization` block.
    pub user: String,
    pub password: Secret,
    /// A bare token (`authorization { token: ... }`).
    pub token: Secret,
    /// A `.creds` file (JWT and nkey seed) of an operator-mode account.
    pub creds_file: String,
    /// A file holding an nkey seed (`SU...`).
    pub nkey_seed_file: String,
    /// Refuse to talk to a server that does not offer TLS. `tls://` URLs
    /// and a `tls_ca_file` imply it.
    pub tls_required: bool,
    /// PEM CA bundle the servers' certificates are checked against (the
    /// system roots are used as well).
    pub tls_ca_file: String,
    /// PEM client certificate and key, for servers that verify clients.
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            urls: vec!["nats://127.0.0.1:4222".to_owned()],
            prefix: "fm".to_owned(),
            shards: fluxmesh_schemas::DEFAULT_SHARDS,
            partitions: fluxmesh_schemas::DEFAULT_PARTITIONS,
            replicas: 0,
            duplicate_window_secs: 120,
            telemetry_max_age_secs: 7 * 24 * 3600,
            events_max_age_secs: 7 * 24 * 3600,
            messages_max_age_secs: 24 * 3600,
            sessions_max_age_secs: 7 * 24 * 3600,
            publish_window: 2048,
            ack_timeout_ms: 5000,
            publish_attempts: 5,
            connect_timeout_ms: 2000,
            user: String::new(),
            password: Secret::default(),
            token: Secret::default(),
            creds_file: String::new(),
            nkey_seed_file: String::new(),
            tls_required: false,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

impl NatsConfig {
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }

    /// Every problem with this section, so they can be reported at once.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.urls.is_empty() {
            problems.push("nats.urls: at least one server URL is needed".to_owned());
        }
        if let Err(e) = fluxmesh_schemas::Subjects::new(&self.prefix) {
            problems.push(format!("nats.prefix: {e}"));
        }
        if !(1..=65_536).contains(&self.shards) {
            problems.push("nats.shards: must be between 1 and 65536".to_owned());
        }
        if !(1..=self.shards.clamp(1, 256)).contains(&self.partitions) {
            problems.push("nats.partitions: must be between 1 and min(256, nats.shards)".to_owned());
        }
        if self.replicas > 5 {
            problems.push("nats.replicas: JetStream allows at most 5 (0 = auto)".to_owned());
        }
        if !(1..=5000).contains(&self.publish_window) {
            problems.push(
                "nats.publish_window: must be between 1 and 5000 (async-nats stalls past 5000 pending acks)".to_owned(),
            );
        }
        if self.publish_attempts == 0 {
            problems.push("nats.publish_attempts: must be at least 1".to_owned());
        }
        if self.ack_timeout_ms == 0 || self.connect_timeout_ms == 0 {
            problems.push("nats.ack_timeout_ms and nats.connect_timeout_ms must be positive".to_owned());
        }
        let methods = [
            !self.user.is_empty(),
            !self.token.is_empty(),
            !self.creds_file.is_empty(),
            !self.nkey_seed_file.is_empty(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            problems
                .push("nats: set at most one of user (with password), token, creds_file and nkey_seed_file".to_owned());
        }
        if self.user.is_empty() != self.password.is_empty() {
            problems.push("nats.user and nats.password go together".to_owned());
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            problems.push("nats.tls_cert_file and nats.tls_key_file go together".to_owned());
        }
        for (key, path) in [
            ("creds_file", &self.creds_file),
            ("nkey_seed_file", &self.nkey_seed_file),
            ("tls_ca_file", &self.tls_ca_file),
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
        ] {
            if !path.is_empty() && !std::path::Path::new(path).is_file() {
                problems.push(format!("nats.{key}: {path} is not a readable file"));
            }
        }
        if self.duplicate_window_secs == 0 {
            problems.push("nats.duplicate_window_secs: must be positive (it is what makes retries safe)".to_owned());
        }
        problems
    }
}

fn list_or_comma_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Urls {
        List(Vec<String>),
        One(String),
    }
    let urls = match Urls::deserialize(d)? {
        Urls::List(list) => list,
        Urls::One(one) => vec![one],
    };
    Ok(urls.iter().flat_map(|u| u.split(',')).map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect())
}
