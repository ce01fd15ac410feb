//! The embedded MQTT broker (rumqttd) and the link that feeds ingress.
//!
//! rumqttd's router runs on its own thread; its TCP server and every device
//! connection run on a small runtime owned by [`MqttBroker`], so that
//! shutting that runtime down closes every device socket at once. Ingress
//! reads every publish through one local link subscribed to `#`.
//!
//! # What a QoS1 PUBACK means here
//!
//! rumqttd queues the PUBACK as soon as its router appends the publish to
//! its in-memory log, before our link reads it, and its public API has no
//! way to hold the PUBACK back. A PUBACK therefore means "in this node's
//! broker", not yet "in JetStream"; the JetStream ack follows about a
//! millisecond later. ARCHITECTURE.md gives the measured loss window on
//! SIGKILL and the options. On SIGTERM nothing is lost: sockets close first,
//! then the link drains the router up to a marker before the node exits.

use crate::config::MqttConfig;
use crate::ingress::{DeviceMessage, InFlight, Ingress};
use crate::telemetry;
use fluxmesh_schemas::DeviceTopic;
use futures::stream::{FuturesUnordered, StreamExt};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{ConnectionSettings, LinkType, Notification, RouterConfig, ServerSettings};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Topic prefix the node uses for its own control messages through the
/// broker; never ingested.
pub(crate) const INTERNAL_TOPIC: &str = "fluxmesh/internal/";

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the MQTT runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot attach to the MQTT router: {0}")]
    Link(String),
    #[error("the MQTT listener on {0} did not come up")]
    NotListening(SocketAddr),
}

/// The running broker. Dropping it without
/// [`MqttBroker::close_connections`] leaves the connections to die with the
/// process.
pub struct MqttBroker {
    runtime: Option<tokio::runtime::Runtime>,
    link_tx: LinkTx,
    listen: SocketAddr,
}

impl std::fmt::Debug for MqttBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttBroker").field("listen", &self.listen).field("open", &self.runtime.is_some()).finish()
    }
}

/// Starts the broker and returns it with the ingress link's receiving end.
pub async fn start(
    cfg: &MqttConfig,
    max_payload: usize,
    stop: CancellationToken,
    tasks: &TaskTracker,
) -> Result<(MqttBroker, LinkRx), MqttError> {
    // rumqttd binds inside its server task; try the address first so that a
    // port in use is a clear start-up error, not a log line.
    drop(std::net::TcpListener::bind(cfg.listen).map_err(|source| MqttError::Bind { addr: cfg.listen, source })?);

    let router = rumqttd::Router::new(
        0,
        RouterConfig {
            max_connections: cfg.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: cfg.buffer_segment_bytes,
            max_segment_count: cfg.buffer_segments,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
    );
    let router_tx = router.spawn();

    let (mut link_tx, link_rx, _connack) = rumqttd::local::LinkBuilder::new("fluxmesh-ingress", router_tx.clone())
        .build()
        .map_err(|e| MqttError::Link(e.to_string()))?;
    link_tx.subscribe("#").map_err(|e| MqttError::Link(e.to_string()))?;

    let alerts = rumqttd::alerts::AlertsLink::new(router_tx.clone()).map_err(|e| MqttError::Link(e.to_string()))?;
    tasks.spawn(watch_alerts(alerts, stop));

    let settings = ServerSettings {
        name: "mqtt-v4".to_owned(),
        listen: cfg.listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: cfg.connection_timeout_ms,
            max_payload_size: max_payload,
            max_inflight_count: cfg.max_inflight,
            auth: None,
            external_auth: None,
            dynamic_filters: false,
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fluxmesh-mqtt")
        .enable_all()
        .build()
        .map_err(MqttError::Runtime)?;
    let listen = cfg.listen;
    runtime.spawn(async move {
        let mut server = rumqttd::Server::new(settings, router_tx, rumqttd::protocol::v4::V4);
        if let Err(e) = server.start(LinkType::Remote).await {
            tracing::error!(error = %e, %listen, "MQTT listener stopped");
        }
    });
    wait_listening(listen).await?;
    tracing::info!(%listen, "MQTT listening");
    Ok((MqttBroker { runtime: Some(runtime), link_tx, listen }, link_rx))
}

async fn wait_listening(listen: SocketAddr) -> Result<(), MqttError> {
    let probe = if listen.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], listen.port())) } else { listen };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(probe).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(MqttError::NotListening(listen))
}

impl MqttBroker {
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Closes the listener and every device connection, then sends
    /// `marker` through the router: when the ingress link reads it, it has
    /// read everything the router accepted.
    pub fn close_connections(&mut self, marker: &str) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        if let Err(e) = self.link_tx.publish(marker.to_owned(), Vec::new()) {
            tracing::warn!(error = %e, "cannot send the drain marker; draining by deadline");
        }
    }
}

/// Counts the router's cursor jumps: messages it dropped because ingress
/// fell more than its buffer behind.
async fn watch_alerts(alerts: rumqttd::alerts::AlertsLink, stop: CancellationToken) {
    loop {
        let batch = tokio::select! {
            _ = stop.cancelled() => return,
            batch = alerts.next() => batch,
        };
        let Ok(batch) = batch else { return };
        for alert in batch {
            if alert.kind.name() == "cursor_jump" {
                metrics::counter!("fluxmesh_mqtt_buffer_overrun_total").increment(1);
                tracing::error!(client = %alert.client_id, detail = %alert.kind.description(),
                    "MQTT broker dropped buffered messages: ingress fell behind its buffer");
            }
        }
    }
}

/// Reads every publish from the link and hands it to ingress until `stop`
/// fires and the drain marker (or `drain_deadline`) is reached.
pub async fn run_ingress(
    mut link_rx: LinkRx,
    ingress: Ingress,
    stop: CancellationToken,
    drain: tokio::sync::watch::Receiver<Option<String>>,
    drain_deadline: Duration,
    window: usize,
) {
    let (acks_tx, acks_rx) = mpsc::channel::<InFlight>(window.max(1));
    let tracker = tokio::spawn(track_acks(acks_rx, ingress.clone()));
    let mut deadline: Option<Instant> = None;
    let mut read_after_stop = 0u64;
    let mut drain = drain;
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.cancelled(), if deadline.is_none() => {
                deadline = Some(Instant::now() + drain_deadline);
                continue;
            }
            _ = tokio::time::sleep_until(deadline.map(Into::into).unwrap_or_else(far_future)), if deadline.is_some() => {
                tracing::warn!("MQTT ingress drain deadline reached before the drain marker");
                break;
            }
            next = link_rx.next() => next,
        };
        let publish = match next {
            Ok(Some(Notification::Forward(forward))) => forward.publish,
            Ok(Some(Notification::Unschedule)) => {
                if let Err(e) = link_rx.wake().await {
                    tracing::error!(error = %e, "MQTT router gone");
                    break;
                }
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                tracing::error!(error = %e, "MQTT ingress link closed");
                break;
            }
        };
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            telemetry::rejected("mqtt", "bad_utf8", &"topic is not UTF-8");
            continue;
        };
        if let Some(internal) = topic.strip_prefix(INTERNAL_TOPIC) {
            let marker = drain.borrow_and_update().clone();
            if marker.as_deref().and_then(|m| m.strip_prefix(INTERNAL_TOPIC)) == Some(internal) {
                tracing::info!(after_stop = read_after_stop, "MQTT ingress drained");
                break;
            }
            continue;
        }
        if deadline.is_some() {
            read_after_stop += 1;
        }
        let topic = match DeviceTopic::parse(topic) {
            Ok(t) => t,
            Err(e) => {
                telemetry::rejected("mqtt", e.reason(), &e);
                continue;
            }
        };
        let message = DeviceMessage { topic, payload: publish.payload, idempotency_key: None, device_time_us: None };
        match ingress.submit(message).await {
            Ok(sent) => {
                if acks_tx.send(sent).await.is_err() {
                    tracing::error!("ack tracker stopped");
                    break;
                }
            }
            Err(e) => {
                telemetry::rejected("mqtt", e.reason(), &e);
                if matches!(e, crate::ingress::IngestError::Publish(fluxmesh_mesh::PublishError::Closed)) {
                    break;
                }
            }
        }
    }
    drop(acks_tx);
    if let Err(e) = tracker.await {
        tracing::error!(error = %e, "ack tracker panicked");
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400 * 365)
}

/// Awaits the acks of sent messages, many at once, and reports failures.
async fn track_acks(mut rx: mpsc::Receiver<InFlight>, ingress: Ingress) {
    let mut pending = FuturesUnordered::new();
    let mut open = true;
    while open || !pending.is_empty() {
        tokio::select! {
            sent = rx.recv(), if open => match sent {
                Some(sent) => pending.push(ingress.stored(sent, "mqtt")),
                None => open = false,
            },
            Some(result) = pending.next() => {
                if let Err(e) = result {
                    tracing::error!(error = %e, "MQTT message was PUBACKed but could not be stored in JetStream");
                }
            }
        }
    }
}
