//! Whether this node can serve: in touch with the mesh, or cut off from it.
//!
//! A node is cut off when its own heartbeats stop being acknowledged past
//! their validity ([`ClusterHandle::cut_off_since`]): its leases have
//! lapsed and the others take its shards. That happens when the node's
//! link to NATS is cut, and also when the server it talks to is cut off
//! from its peers (a minority): then the connection looks fine, pings are
//! answered, and every JetStream request fails.
//!
//! While cut off, the node:
//! - moves its control connection (heartbeats, leases) to another server
//!   at once, and again every [`RECONNECT_EVERY`] while it stays cut off
//!   (a reconnect never lands on the server it left:
//!   [`fluxmesh_mesh::connect`]);
//! - after `cluster.cut_off_grace_ms`, if the probe below fails too (it
//!   cannot reach across the NATS cluster), stops serving devices: the
//!   `unavailable` signal closes its MQTT connections (MQTT 5 clients are
//!   told "server unavailable") and refuses new ones, and `/readyz` and
//!   HTTP ingest answer 503. Devices reconnect to a node that can store
//!   what they send; nothing they were not acknowledged is lost, they send
//!   it again. Heartbeats alone also fail while JetStream elects a new
//!   leader for the membership bucket, on every node at once: then the
//!   probe still answers and the devices stay (they wait for their PUBACKs,
//!   as they would on any broker).
//!
//! Its data connection (telemetry, sessions, watches) moves on its own
//! evidence, for a liveness timeout: publishes failing with no ack in
//! between, or no answer to a probe the control connection sends it every
//! [`PROBE_EVERY`] (a request to an inbox the data connection answers). The
//! probe crosses from one server to the other whenever the two connections
//! are on different servers, so a data connection left on a server cut off
//! from its peers fails it even while nothing is published. When both are
//! on one server cut off from every peer (no quorum anywhere), the probe is
//! answered until the control connection's first move, which takes it to
//! another server.
//!
//! It serves again as soon as a heartbeat is acknowledged.

use crate::internal_events::emit;
use crate::internal_events::reach::{BackInTouch, CutOff, ForcedReconnect};
use crate::lifecycle::Lifecycle;
use crate::mqtt::LocalSessions;
use fluxmesh_mesh::cluster::ClusterHandle;
use fluxmesh_mesh::publisher::Publisher;
use futures::StreamExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How often the node looks.
const TICK: Duration = Duration::from_millis(50);

/// How often the control connection probes the data connection.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);

/// The least time between two forced reconnects of one connection: a
/// reconnect that landed on another bad server (or on no server) gets
/// this long to show that it works.
pub const RECONNECT_EVERY: Duration = Duration::from_secs(3);

/// What the watch needs.
#[derive(Debug)]
pub struct Reach {
    pub cluster: ClusterHandle,
    /// Heartbeats and leases.
    pub control: async_nats::Client,
    /// Telemetry, sessions, derived frames.
    pub data: async_nats::Client,
    pub publisher: Publisher,
    pub sessions: LocalSessions,
    /// True while the node does not serve devices.
    pub unavailable: watch::Sender<bool>,
}

/// Watches until the node stops.
pub async fn watch(reach: Reach, life: Lifecycle) {
    let grace = reach.cluster.config().cut_off_grace();
    let liveness = reach.cluster.config().liveness_timeout();
    let probed = match Probe::start(&reach.data, &reach.control, liveness, &life).await {
        Ok(probed) => Some(probed),
        Err(e) => {
            tracing::warn!(error = %fluxmesh_mesh::error_chain(&e), "cannot probe the data connection; it moves only when publishes fail");
            None
        }
    };
    let mut control = Mover::new(reach.control, "control");
    let mut data = Mover::new(reach.data, "data");
    let mut out_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = life.stopped() => return,
            _ = tick.tick() => {}
        }
        let cut_since = reach.cluster.cut_off_since();
        if let Some(since) = cut_since {
            control.reconnect_if(since.elapsed()).await;
        }
        // `None`: the probe answers (or there is none).
        let unanswered = probed.as_ref().map(Probe::unanswered_for).filter(|u| *u >= liveness);
        // A control connection that is itself cut off cannot tell whether
        // the data connection answers.
        let data_unanswered = unanswered.filter(|_| cut_since.is_none());
        if let Some(failing) = reach.publisher.failing_for().filter(|f| *f >= liveness).or(data_unanswered) {
            data.reconnect_if(failing).await;
        }
        // Heartbeats also fail while JetStream elects a new leader for the
        // membership bucket, on every node at once; closing every device
        // in the mesh then would help no one. A node stops serving devices
        // only if the probe fails too: it cannot even reach across the
        // NATS cluster (or cannot probe at all).
        let probe_failing = probed.is_none() || unanswered.is_some();
        match (cut_since, out_since) {
            (Some(since), None) if since.elapsed() >= grace && probe_failing => {
                out_since = Some(Instant::now());
                // `since` is the last acknowledged heartbeat's send time
                // plus its validity.
                let validity = liveness.saturating_sub(reach.cluster.config().heartbeat());
                let silent_for = since.elapsed() + validity;
                emit(CutOff { silent_for, connections: reach.sessions.count() });
                reach.unavailable.send_replace(true);
            }
            (None, Some(since)) => {
                out_since = None;
                reach.unavailable.send_replace(false);
                emit(BackInTouch { out_for: since.elapsed() });
            }
            _ => {}
        }
    }
}

/// Moves one connection to another server when JetStream stops answering
/// through it, at most every [`RECONNECT_EVERY`].
struct Mover {
    client: async_nats::Client,
    name: &'static str,
    last: Option<Instant>,
}

impl Mover {
    fn new(client: async_nats::Client, name: &'static str) -> Self {
        Mover { client, name, last: None }
    }

    /// Reconnects if the connection is up (one that is down is already
    /// reconnecting) and the last forced reconnect was long enough ago.
    async fn reconnect_if(&mut self, failing_for: Duration) {
        if self.last.is_some_and(|at| at.elapsed() < RECONNECT_EVERY) {
            return;
        }
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return;
        }
        self.last = Some(Instant::now());
        emit(ForcedReconnect { connection: self.name, failing_for });
        if let Err(e) = self.client.force_reconnect().await {
            tracing::warn!(connection = self.name, error = %fluxmesh_mesh::error_chain(&e), "cannot reconnect to NATS");
        }
    }
}

/// The control connection's probe of the data connection: a request to an
/// inbox only the data connection answers.
struct Probe {
    /// When the last answer came (the start, before any).
    answered: Arc<Mutex<Instant>>,
}

impl Probe {
    /// Subscribes the data connection and starts asking, every
    /// [`PROBE_EVERY`], each ask waiting up to `wait`.
    async fn start(
        data: &async_nats::Client,
        control: &async_nats::Client,
        wait: Duration,
        life: &Lifecycle,
    ) -> Result<Probe, async_nats::SubscribeError> {
        let subject = data.new_inbox();
        let mut asks = data.subscribe(subject.clone()).await?;
        let (answerer, stop) = (data.clone(), life.clone());
        life.spawn(async move {
            loop {
                let ask = tokio::select! {
                    _ = stop.stopped() => return,
                    ask = asks.next() => ask,
                };
                let Some(ask) = ask else { return };
                if let Some(reply) = ask.reply {
                    // A lost answer is a failed probe; nothing else to do.
                    let _ = answerer.publish(reply, bytes::Bytes::new()).await;
                }
            }
        });
        let answered = Arc::new(Mutex::new(Instant::now()));
        let (asker, last, stop) = (control.clone(), answered.clone(), life.clone());
        life.spawn(async move {
            let mut every = tokio::time::interval(PROBE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.stopped() => return,
                    _ = every.tick() => {}
                }
                let ask = tokio::time::timeout(wait, asker.request(subject.clone(), bytes::Bytes::new()));
                let answer = tokio::select! {
                    _ = stop.stopped() => return,
                    answer = ask => answer,
                };
                if let Ok(Ok(_)) = answer {
                    *last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                }
            }
        });
        Ok(Probe { answered })
    }

    /// How long the probe has gone unanswered (less one probe period).
    fn unanswered_for(&self) -> Duration {
        let last = *self.answered.lock().unwrap_or_else(|p| p.into_inner());
        last.elapsed().saturating_sub(PROBE_EVERY)
    }
}
