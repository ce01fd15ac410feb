//! One node's life: start in order, serve, drain in order.
//!
//! Start: HTTP (so `/healthz` answers and `/readyz` says 503 while the rest
//! comes up) → NATS (retried until it answers or the node is stopped; a
//! second connection for heartbeats and leases, so data-plane load cannot
//! delay them) → streams and buckets → MQTT front end → join the membership
//! → shard coordinator → ready.
//!
//! Shutdown (SIGTERM) drains in the order [`crate::lifecycle`] declares,
//! with its deadlines, so that nothing acknowledged is lost.

use crate::config::Config;
use crate::http;
use crate::ingress::Ingress;
use crate::lifecycle::{deadline, Phases};
use crate::mqtt::{self, MqttServer};
use crate::shards::ShardContext;
use fluxmesh_mesh::cluster::{self, ClusterHandle, Member};
use fluxmesh_mesh::{provision, Mesh, Provisioned, Publisher};
use fluxmesh_schemas::subject::Family;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot listen for HTTP on {addr}")]
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
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error(transparent)]
    Commands(#[from] crate::commands::CommandsError),
    #[error(transparent)]
    Rules(#[from] crate::rules::RulesError),
    #[error(transparent)]
    Plugins(#[from] crate::plugins::PluginsError),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
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
    control: async_nats::Client,
    provisioned: Provisioned,
    cluster: ClusterHandle,
    ready: Arc<AtomicBool>,
    phases: Phases,
    /// The shard coordinator's task: shutdown waits for it before it stops
    /// the history writer.
    coordinator: tokio::task::JoinHandle<()>,
}

impl Node {
    /// Starts a node. `cancel` aborts a start that is still waiting for NATS.
    pub async fn start(mut config: Config, cancel: CancellationToken) -> Result<Node, NodeError> {
        if config.node_id.is_empty() {
            config.node_id = format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        }
        let node_id = config.node_id.clone();
        // Before anything opens TLS (NATS, MQTT): rustls needs one provider.
        crate::tls::install_provider();
        let prometheus = crate::internal_events::prometheus();
        let ready = Arc::new(AtomicBool::new(false));
        // True while the node is cut off from the mesh (crate::reach).
        let (unavailable, unavailable_rx) = tokio::sync::watch::channel(false);
        let phases = Phases::default();
        let life = phases.front.clone();

        if let Some(handle) = prometheus.clone() {
            life.spawn(crate::internal_events::upkeep(handle, life.clone()));
        }

        let listener = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .map_err(|source| NodeError::HttpBind { addr: config.http.listen, source })?;
        let http_addr =
            listener.local_addr().map_err(|source| NodeError::HttpBind { addr: config.http.listen, source })?;
        let slots = http::Slots::default();
        let limiter = crate::limits::quota(config.ingest.device_rate_per_sec, config.ingest.device_burst)
            .map(|q| Arc::new(crate::limits::DeviceLimiter::new(q)));
        if let Some(limiter) = limiter.clone() {
            let prune_life = life.clone();
            life.spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tokio::select! {
                        _ = prune_life.stopped() => return,
                        _ = every.tick() => limiter.prune(),
                    }
                }
            });
        }
        if config.auth.admin_token.is_empty() {
            tracing::warn!(
                "auth.admin_token is not set: the admin API (/api/v1, but device ingest) refuses every request"
            );
        }
        if config.auth.allow_anonymous {
            tracing::warn!("auth.allow_anonymous is on: devices without credentials may connect and publish");
        }
        let app = http::router(
            &slots,
            http::Settings {
                node_id: node_id.as_str().into(),
                ready: ready.clone(),
                unavailable: unavailable_rx.clone(),
                prometheus,
                admin_token: config.auth.admin_token.clone(),
                limiter,
                max_payload: config.ingest.max_payload_bytes,
                max_module: config.plugins.max_module_bytes,
                life: life.clone(),
            },
        );
        let http_stopped = life.stopped_owned();
        life.spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(http_stopped);
            if let Err(e) = serve.await {
                tracing::error!(error = %fluxmesh_mesh::error_chain(&e), "HTTP server failed");
            }
        });
        tracing::info!(node = %node_id, %http_addr, "HTTP listening");

        let started = Self::start_mesh(&config, &node_id, http_addr, &slots.auth, &cancel, &phases, unavailable).await;
        let Started { client, control, provisioned, ingress, mqtt, shards, coordinator } = match started {
            Ok(parts) => parts,
            Err(e) => {
                phases.stop_all();
                phases.front.close_and_wait(deadline::TASKS).await;
                return Err(e);
            }
        };
        // Filled once, here; HTTP answered 503 until now.
        slots.ingress.fill(ingress.clone());
        slots.rules.fill(shards.rules.clone());
        slots.plugins.fill(shards.plugins.clone());
        slots.storage.fill(shards.storage.clone());
        let cluster = shards.cluster.clone();
        slots.shards.fill(shards);

        ready.store(true, Ordering::Release);
        tracing::info!(node = %node_id, mqtt = %mqtt.listen(), %http_addr, shards = provisioned.shards,
            replicas = provisioned.replicas, "node ready");
        Ok(Node {
            node_id,
            http_addr,
            mqtt,
            ingress,
            client,
            control,
            provisioned,
            cluster,
            ready,
            phases,
            coordinator,
        })
    }

    async fn start_mesh(
        config: &Config,
        node_id: &str,
        http_addr: SocketAddr,
        auth_slot: &crate::api::Slot<Arc<crate::auth::Authenticator>>,
        cancel: &CancellationToken,
        phases: &Phases,
        unavailable: tokio::sync::watch::Sender<bool>,
    ) -> Result<Started, NodeError> {
        let life = &phases.front;
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
        let mesh = Mesh::new(client.clone(), publisher, provisioned.clone());
        let ingress =
            Ingress::new(mesh.clone(), node_id, config.ingest.max_payload_bytes, config.mirrored(Family::Telemetry));
        let sessions_bus = mqtt::SessionBus {
            client: client.clone(),
            prefix: provisioned.subjects.prefix().to_owned(),
            node_id: node_id.to_owned(),
        };
        let credentials = retry_until(
            cancel,
            "credentials bucket not ready yet",
            Duration::from_millis(200),
            || crate::auth::open_store(mesh.js(), mesh.subjects(), provisioned.replicas),
            |_| true,
        )
        .await?;
        let auth = Arc::new(crate::auth::Authenticator::new(config.auth.clone(), credentials));
        auth_slot.fill(auth.clone());
        let (cmd_ready_tx, cmd_ready_rx) = tokio::sync::mpsc::channel(1024);
        // This run of the node: leases and will records of an earlier run
        // (same node id) are not valid.
        let incarnation = uuid::Uuid::new_v4().simple().to_string();
        let wills = mqtt::wills::Wills::new(ingress.clone(), node_id, &incarnation);
        let mqtt = mqtt::start(
            &config.mqtt,
            &config.ingest,
            auth,
            ingress.clone(),
            wills.clone(),
            sessions_bus,
            cmd_ready_tx,
            unavailable.subscribe(),
            life,
        )
        .await?;

        // Control plane: its own connection, so heartbeats never queue
        // behind telemetry.
        let control_name = format!("{node_id}-control");
        let control = retry_until(
            cancel,
            "NATS not reachable yet (control connection)",
            Duration::from_millis(100),
            || fluxmesh_mesh::connect(&config.nats, &control_name),
            fluxmesh_mesh::ConnectError::is_transient,
        )
        .await?;
        let control_js = async_nats::jetstream::new(control.clone());
        let prefix = provisioned.subjects.prefix().to_owned();
        let (members, leases) = retry_until(
            cancel,
            "cluster buckets not ready yet",
            Duration::from_millis(200),
            || cluster::open_buckets(&control_js, &prefix, provisioned.replicas, &config.cluster),
            cluster::ClusterError::is_transient,
        )
        .await?;
        let rules = retry_until(
            cancel,
            "rules bucket not ready yet",
            Duration::from_millis(200),
            || crate::rules::Rules::start(mesh.js(), mesh.subjects(), provisioned.replicas, &config.rules, life),
            crate::rules::RulesError::is_transient,
        )
        .await?;
        let plugins = retry_until(
            cancel,
            "plugin store not ready yet",
            Duration::from_millis(200),
            || crate::plugins::Plugins::start(mesh.js(), mesh.subjects(), provisioned.replicas, &config.plugins, life),
            crate::plugins::PluginsError::is_transient,
        )
        .await?;
        // Postgres may still be starting: wait for it like for NATS. A bad
        // connection string or a failed migration stops the node instead.
        let storage = retry_until(
            cancel,
            "Postgres not ready yet",
            Duration::from_millis(200),
            || crate::storage::Storage::start(&config.storage, node_id, life, &phases.history),
            crate::storage::StorageError::is_transient,
        )
        .await?;
        let me = Member {
            node_id: node_id.to_owned(),
            incarnation,
            http: http_addr.to_string(),
            mqtt: mqtt.listen().to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_us: fluxmesh_schemas::frame::now_us(),
            lag: Default::default(),
        };
        // Heartbeats and watches outlive the front: the coordinator ends
        // them after it has released its leases.
        let cluster = ClusterHandle::join(members, leases, me, config.cluster.clone(), &phases.cluster).await?;
        life.spawn(mqtt::wills::watch_departures(
            wills,
            cluster.subscribe(),
            config.cluster.liveness_timeout(),
            life.clone(),
        ));
        let shards = Arc::new(ShardContext {
            mesh: mesh.clone(),
            checkpoints: mesh.checkpoints(),
            cfg: config.shards.clone(),
            cluster,
            mirror_events: config.mirrored(Family::Event),
            pipeline: crate::processing::pipeline::Pipeline {
                origin: node_id.to_owned(),
                state_min_interval_us: i64::try_from(config.shards.state_min_interval_ms.saturating_mul(1000))
                    .unwrap_or(i64::MAX),
                aggregation: (&config.aggregation).into(),
                engine: rules.engine.clone(),
                plugins: Some(plugins.clone() as Arc<dyn crate::rules::PluginCaller>),
            },
            rules,
            plugins,
            storage,
            command_slots: Arc::new(tokio::sync::Semaphore::new(256)),
            life: life.clone(),
        });
        let commands = Arc::new(crate::commands::Commands {
            mesh: mesh.clone(),
            node_id: node_id.to_owned(),
            cluster: shards.cluster.clone(),
            sessions: mqtt.sessions().clone(),
            cfg: config.commands.clone(),
        });
        retry_until(
            cancel,
            "command queue stream not ready yet",
            Duration::from_millis(200),
            || crate::commands::open_queue(&commands),
            |_| true,
        )
        .await?;
        crate::commands::start(commands, cmd_ready_rx, life).await?;
        life.spawn(crate::reach::watch(
            crate::reach::Reach {
                cluster: shards.cluster.clone(),
                control: control.clone(),
                data: client.clone(),
                publisher: mesh.publisher().clone(),
                sessions: mqtt.sessions().clone(),
                unavailable,
            },
            life.clone(),
        ));
        let coordinator = life.spawn(fluxmesh_mesh::ownership::coordinate(
            mesh,
            shards.cluster.clone(),
            shards.clone(),
            config.shards.ownership(),
            life.token().clone(),
            phases.cluster.token().clone(),
        ));
        Ok(Started { client, control, provisioned, ingress, mqtt, shards, coordinator })
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

    /// The MQTT over TLS listener, if it is on.
    pub fn mqtt_tls_addr(&self) -> Option<SocketAddr> {
        self.mqtt.tls_listen()
    }

    /// The MQTT over WebSocket listener, if it is on.
    pub fn mqtt_ws_addr(&self) -> Option<SocketAddr> {
        self.mqtt.ws_listen()
    }

    /// The MQTT over secure WebSocket listener, if it is on.
    pub fn mqtt_wss_addr(&self) -> Option<SocketAddr> {
        self.mqtt.wss_listen()
    }

    pub fn provisioned(&self) -> &Provisioned {
        &self.provisioned
    }

    /// This node's view of membership and leases.
    pub fn cluster(&self) -> &ClusterHandle {
        &self.cluster
    }

    /// Drains and stops the node, in the order and with the deadlines
    /// that [`crate::lifecycle`] declares.
    pub async fn shutdown(self) {
        tracing::info!(node = %self.node_id, "shutting down");
        self.ready.store(false, Ordering::Release);
        self.phases.front.stop();
        if tokio::time::timeout(deadline::COORDINATOR, self.coordinator).await.is_err() {
            tracing::warn!(deadline = ?deadline::COORDINATOR, "the shard coordinator did not stop within the deadline");
            self.phases.cluster.stop();
        }
        self.phases.history.stop();
        let left = self.phases.front.close_and_wait(deadline::TASKS).await;
        if left > 0 {
            tracing::warn!(left, deadline = ?deadline::TASKS, "tasks did not stop within the deadline");
        }
        self.ingress.close();
        let left = self.ingress.mesh().publisher().drain(deadline::PUBLISH_ACKS).await;
        if left > 0 {
            tracing::error!(left, "publishes still unacknowledged at shutdown");
        }
        for client in [&self.client, &self.control] {
            match tokio::time::timeout(deadline::NATS_FLUSH, client.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %fluxmesh_mesh::error_chain(&e), "NATS flush at shutdown failed"),
                Err(_) => {
                    tracing::warn!(deadline = ?deadline::NATS_FLUSH, "NATS flush at shutdown did not finish; NATS is out of reach")
                }
            }
        }
        tracing::info!(node = %self.node_id, "stopped");
    }
}

/// What [`Node::start_mesh`] brings up.
struct Started {
    client: async_nats::Client,
    control: async_nats::Client,
    provisioned: Provisioned,
    ingress: Ingress,
    mqtt: MqttServer,
    shards: Arc<ShardContext>,
    coordinator: tokio::task::JoinHandle<()>,
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
    E: std::error::Error + Into<NodeError>,
{
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if transient(&e) => {
                tracing::warn!(error = fluxmesh_mesh::error_chain(&e), retry_in = ?delay, "{what}")
            }
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(NodeError::Cancelled),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
