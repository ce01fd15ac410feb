//! One node's life: start in order, serve, drain in order.
//!
//! Start: HTTP (so `/healthz` answers and `/readyz` says 503 while the rest
//! comes up) → NATS (retried until it answers or the node is stopped) →
//! streams and buckets → MQTT broker and its ingress link → ready.
//!
//! Shutdown (SIGTERM), in this order so that nothing acknowledged is lost:
//! 1. not ready; stop accepting MQTT and HTTP connections;
//! 2. every MQTT connection stops reading, waits for the JetStream acks of
//!    what it already read, sends those PUBACKs and closes; HTTP requests in
//!    progress finish;
//! 3. wait for every JetStream ack still outstanding;
//! 4. flush the NATS connection.
//!
//! Each step has a deadline (`shutdown_deadline`), logged when it is hit.

use crate::config::Config;
use crate::http::{self, AppState};
use crate::ingress::Ingress;
use crate::mqtt::{self, MqttServer};
use fluxmesh_mesh::{provision, Provisioned, Publisher};
use fluxmesh_schemas::subject::Family;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long each shutdown step may take.
const SHUTDOWN_STEP: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot listen for HTTP on {addr}: {source}")]
    HttpBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Connect(#[from] fluxmesh_mesh::ConnectError),
    #[error(transparent)]
    Provision(#[from] fluxmesh_mesh::ProvisionError),
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttError),
    #[error("stopped before the node was ready")]
    Cancelled,
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    node_id: String,
    http_addr: SocketAddr,
    mqtt: MqttServer,
    ingress: Ingress,
    client: async_nats::Client,
    provisioned: Provisioned,
    ready: Arc<AtomicBool>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Node {
    /// Starts a node. `cancel` aborts a start that is still waiting for NATS.
    pub async fn start(mut config: Config, cancel: CancellationToken) -> Result<Node, NodeError> {
        if config.node_id.is_empty() {
            config.node_id = format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        }
        let node_id = config.node_id.clone();
        let prometheus = crate::telemetry::prometheus();
        let ready = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();

        let listener = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .map_err(|source| NodeError::HttpBind { addr: config.http.listen, source })?;
        let http_addr =
            listener.local_addr().map_err(|source| NodeError::HttpBind { addr: config.http.listen, source })?;
        let ingress_slot: Arc<std::sync::OnceLock<Ingress>> = Arc::default();
        let state = AppState {
            ingress: ingress_slot.clone(),
            ready: ready.clone(),
            node_id: node_id.as_str().into(),
            prometheus,
        };
        let app = http::router(state, config.ingest.max_payload_bytes);
        let http_stop = stop.clone();
        tasks.spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(http_stop.cancelled_owned());
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        tracing::info!(node = %node_id, %http_addr, "HTTP listening");

        let started = Self::start_mesh(&config, &node_id, &cancel, &stop, &tasks).await;
        let (client, provisioned, ingress, mqtt) = match started {
            Ok(parts) => parts,
            Err(e) => {
                stop.cancel();
                tasks.close();
                tasks.wait().await;
                return Err(e);
            }
        };
        // Set once, here; the slot was empty until now.
        let _ = ingress_slot.set(ingress.clone());

        ready.store(true, Ordering::Release);
        tracing::info!(node = %node_id, mqtt = %mqtt.listen(), %http_addr, shards = provisioned.shards,
            replicas = provisioned.replicas, "node ready");
        Ok(Node { node_id, http_addr, mqtt, ingress, client, provisioned, ready, stop, tasks })
    }

    #[allow(clippy::type_complexity)]
    async fn start_mesh(
        config: &Config,
        node_id: &str,
        cancel: &CancellationToken,
        stop: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<(async_nats::Client, Provisioned, Ingress, MqttServer), NodeError> {
        let client = retry_until(
            cancel,
            "NATS not reachable yet",
            Duration::from_millis(100),
            || fluxmesh_mesh::connect(&config.nats, node_id),
            fluxmesh_mesh::ConnectError::is_transient,
        )
        .await?;
        let publisher = Publisher::new(client.clone(), &config.nats);
        // JetStream may still be electing its leaders.
        let provisioned = retry_until(
            cancel,
            "JetStream not ready yet",
            Duration::from_millis(200),
            || provision(&client, publisher.context(), &config.nats),
            fluxmesh_mesh::ProvisionError::is_transient,
        )
        .await?;
        let ingress = Ingress::new(
            publisher,
            client.clone(),
            provisioned.subjects.clone(),
            provisioned.shards,
            node_id,
            config.ingest.max_payload_bytes,
            config.mirrored(Family::Telemetry),
        );
        let mqtt =
            mqtt::start(&config.mqtt, config.ingest.max_payload_bytes, ingress.clone(), stop.clone(), tasks).await?;
        Ok((client, provisioned, ingress, mqtt))
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The bound HTTP address (useful when the config asked for port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt.listen()
    }

    pub fn provisioned(&self) -> &Provisioned {
        &self.provisioned
    }

    /// Drains and stops the node; see the module docs for the order.
    pub async fn shutdown(self) {
        tracing::info!(node = %self.node_id, "shutting down");
        self.ready.store(false, Ordering::Release);
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_STEP * 2, self.tasks.wait()).await.is_err() {
            tracing::warn!("tasks did not stop within the deadline");
        }
        self.ingress.close();
        let left = self.ingress.publisher().drain(SHUTDOWN_STEP).await;
        if left > 0 {
            tracing::error!(left, "publishes still unacknowledged at shutdown");
        }
        if let Err(e) = self.client.flush().await {
            tracing::warn!(error = %e, "NATS flush at shutdown failed");
        }
        tracing::info!(node = %self.node_id, "stopped");
    }
}

/// Runs `attempt` until it succeeds, fails for good (`transient` says no),
/// or `cancel` fires; waits between attempts with doubling backoff, capped
/// at 5 s, logging each failure as `what`.
async fn retry_until<T, E, Fut>(
    cancel: &CancellationToken,
    what: &str,
    mut delay: Duration,
    mut attempt: impl FnMut() -> Fut,
    transient: impl Fn(&E) -> bool,
) -> Result<T, NodeError>
where
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display + Into<NodeError>,
{
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if transient(&e) => tracing::warn!(error = %e, retry_in = ?delay, "{what}"),
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(NodeError::Cancelled),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
