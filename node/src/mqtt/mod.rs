//! The MQTT front end: our own listener, per-connection state machine and
//! mesh-wide subscriptions.
//!
//! Each connection is served by one task ([`connection`]) that reads
//! packets with rumqttc's MQTT 3.1.1 codec. Every PUBLISH goes to
//! [`crate::ingress::Ingress`]: device topics (`devices/{id}/…`) to their
//! shard's telemetry stream, other topics (plain pub/sub, where
//! `mqtt.plain_topics` allows) to the message stream. The PUBACK (QoS1) or
//! PUBREC (QoS2) is sent only after JetStream has acknowledged the message,
//! and in the order the publishes arrived. While a connection has
//! `mqtt.max_inflight` messages waiting for their acks, or the node's
//! publish window is full, the task stops reading its socket: devices feel
//! TCP backpressure, and nothing piles up unacknowledged in memory.
//!
//! A device authenticates in its CONNECT ([`crate::auth`]), and every
//! PUBLISH and SUBSCRIBE is checked against its ACL before anything else
//! happens to it. Plain TCP (`mqtt.listen`) and TLS (`mqtt.tls_listen`,
//! rustls) listeners share one connection limit (`mqtt.max_connections`).
//!
//! Subscriptions span the mesh ([`broker`]): the node reads back from the
//! streams what any node stored and sends each subscriber what matches its
//! filters, at the QoS it was granted (0, 1 or 2). rumqttd's router is not
//! used for this: its deliveries come from its own in-memory log, which
//! holds only this node's publishes, acknowledges before storing, and has
//! no stream positions a session could resume from on another node.

mod broker;
mod codec;
mod config;
mod connection;
mod outbox;
mod props;
mod sessions;
mod shared;
mod topics;
mod websocket;
pub mod wills;

use crate::auth::Authenticator;
use crate::ingress::IngestConfig;
use crate::ingress::Ingress;
use crate::internal_events::emit;
use crate::internal_events::mqtt::{self as mqtt_events, Handshake};
use crate::lifecycle::Lifecycle;
use async_nats::jetstream::kv;
use fluxmesh_mesh::watch::{KvChanges, Rewatch, Watched};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use config::MqttConfig;
pub use connection::Session;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("cannot listen for MQTT on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// What every connection task shares.
pub(crate) struct Shared {
    pub ingress: Ingress,
    pub config: MqttConfig,
    pub max_payload: usize,
    pub auth: Arc<Authenticator>,
    /// Each connection's message rate (`ingest.device_rate_per_sec`).
    pub quota: Option<governor::Quota>,
    /// The node's subscriptions, served from the streams.
    pub broker: Arc<broker::Broker>,
    /// Keeps and publishes the sessions' wills.
    pub wills: Arc<wills::Wills>,
    /// Persistent sessions' stored state.
    pub session_store: Arc<sessions::SessionStore>,
    /// This node's members of shared subscriptions.
    pub shares: Arc<shared::Shares>,
    /// Live sessions on this node by client id, for takeover.
    pub sessions: Mutex<HashMap<String, Session>>,
    /// Wills waiting out their MQTT 5 delay, by client id: cancelled when
    /// the client connects again, here or on another node.
    pub delayed_wills: Mutex<HashMap<String, (u64, CancellationToken)>>,
    /// Ends every connection (graceful: pending acks are still sent) and
    /// spawns the connections' tasks.
    pub life: Lifecycle,
    /// Where this node announces new sessions, for cluster-wide takeover.
    pub sessions_bus: SessionBus,
    /// Client ids that just subscribed to their command topic (queued
    /// commands for them can be delivered now). Full: the command service's
    /// periodic pass finds them instead.
    pub cmd_ready: tokio::sync::mpsc::Sender<String>,
    /// True while the node is cut off from the mesh (`crate::reach`): new
    /// connections are refused, live ones closed.
    pub unavailable: tokio::sync::watch::Receiver<bool>,
}

impl Shared {
    /// Registers a will waiting out its delay; the token is cancelled if
    /// the client connects again meanwhile.
    pub fn delay_will(&self, client: &str, serial: u64) -> CancellationToken {
        let token = CancellationToken::new();
        let mut wills = self.delayed_wills.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, older)) = wills.insert(client.to_owned(), (serial, token.clone())) {
            older.cancel();
        }
        token
    }

    /// The delay of the will registered by session `serial` is over.
    pub fn will_delay_over(&self, client: &str, serial: u64) {
        let mut wills = self.delayed_wills.lock().unwrap_or_else(|e| e.into_inner());
        if wills.get(client).is_some_and(|(s, _)| *s == serial) {
            wills.remove(client);
        }
    }

    /// `client` connected: a will of its waiting out a delay is not sent.
    pub fn cancel_delayed_will(&self, client: &str) {
        if let Some((_, token)) = self.delayed_wills.lock().unwrap_or_else(|e| e.into_inner()).remove(client) {
            token.cancel();
        }
    }
}

/// The node's live MQTT sessions, for the command service.
#[derive(Clone)]
pub struct LocalSessions {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LocalSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSessions").finish_non_exhaustive()
    }
}

impl LocalSessions {
    /// Whether `device` is connected here and subscribed to its commands.
    pub fn ready(&self, device: &str) -> bool {
        let sessions = self.shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.get(device).is_some_and(|s| s.commands.ready())
    }

    /// Whether `device` has a live MQTT session on this node.
    pub fn connected(&self, device: &str) -> bool {
        self.shared.sessions.lock().unwrap_or_else(|e| e.into_inner()).contains_key(device)
    }

    /// Live MQTT sessions on this node.
    pub fn count(&self) -> usize {
        self.shared.sessions.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Devices connected here and subscribed to their commands.
    pub fn ready_devices(&self) -> Vec<String> {
        let sessions = self.shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.iter().filter(|(_, s)| s.commands.ready()).map(|(id, _)| id.clone()).collect()
    }

    /// Writes `payload` to `device` at QoS1 and waits for its PUBACK.
    pub async fn deliver(&self, device: &str, payload: bytes::Bytes, timeout: Duration) -> Result<(), DeliverError> {
        let sender = {
            let sessions = self.shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
            match sessions.get(device) {
                Some(s) => s.commands.sender().ok_or(DeliverError::NotSubscribed)?,
                None => return Err(DeliverError::NotConnected),
            }
        };
        let (done, acked) = tokio::sync::oneshot::channel();
        let attempt = async {
            sender.send(connection::OutCommand { payload, done }).await.map_err(|_| DeliverError::Disconnected)?;
            acked.await.map_err(|_| DeliverError::Disconnected)?
        };
        tokio::time::timeout(timeout, attempt).await.map_err(|_| DeliverError::NoPuback)?
    }
}

/// Why a command did not reach a device connected here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    #[error("the device is not subscribed to its command topic")]
    NotSubscribed,
    #[error("the device is not connected here")]
    NotConnected,
    #[error("the device disconnected before acknowledging")]
    Disconnected,
    #[error("the device did not acknowledge in time")]
    NoPuback,
}

impl DeliverError {
    /// The `reason` a command's answer carries.
    pub fn reason(self) -> &'static str {
        match self {
            DeliverError::NotSubscribed => "not_subscribed",
            DeliverError::NotConnected => "not_connected",
            DeliverError::Disconnected => "disconnected",
            DeliverError::NoPuback => "no_puback",
        }
    }
}

/// Cluster-wide takeover: every node announces each new MQTT session on
/// `{prefix}.session.{client id}` (core NATS), and a node that holds an
/// older session with that client id ends it. "Older" compares (connect
/// time in µs, node id), so two nodes never end each other's sessions.
/// Best effort by nature: while NATS is unreachable, a client id can be
/// connected to two nodes until the next announcement.
#[derive(Debug, Clone)]
pub struct SessionBus {
    pub client: async_nats::Client,
    pub prefix: String,
    pub node_id: String,
}

/// A session announcement.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Announced {
    node: String,
    client_id: String,
    connected_us: i64,
}

impl SessionBus {
    fn subject(&self, client_id: &str) -> String {
        format!("{}.session.{}", self.prefix, fluxmesh_schemas::subject::escape_token(client_id))
    }

    /// Tells the other nodes that `client_id` connected here at `connected_us`.
    pub(crate) async fn announce(&self, client_id: &str, connected_us: i64) {
        let body = Announced { node: self.node_id.clone(), client_id: client_id.to_owned(), connected_us };
        let Ok(bytes) = serde_json::to_vec(&body) else { return };
        if let Err(e) = self.client.publish(self.subject(client_id), bytes.into()).await {
            emit(mqtt_events::SessionFailed {
                failure: mqtt_events::SessionFailure::Announce,
                client: client_id,
                about: None,
                error: &fluxmesh_mesh::error_chain(&e),
                message: "could not announce the session to other nodes",
            });
        }
    }
}

/// Ends local sessions that a newer connection on another node took over.
async fn watch_sessions(shared: Arc<Shared>) {
    use futures::StreamExt as _;
    let bus = &shared.sessions_bus;
    let mut sub = match bus.client.subscribe(format!("{}.session.>", bus.prefix)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %fluxmesh_mesh::error_chain(&e), "cannot watch session announcements; takeover is node-local only");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            _ = shared.life.stopped() => return,
            msg = sub.next() => match msg { Some(m) => m, None => return },
        };
        let Ok(a) = serde_json::from_slice::<Announced>(&msg.payload) else {
            metrics::counter!(crate::internal_events::names::MQTT_SESSION_ANNOUNCE_BAD_TOTAL).increment(1);
            continue;
        };
        if a.node == bus.node_id {
            continue;
        }
        shared.cancel_delayed_will(&a.client_id);
        let sessions = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(local) = sessions.get(&a.client_id) {
            let theirs = (a.connected_us, a.node.as_str());
            let ours = (local.connected_us, bus.node_id.as_str());
            if theirs > ours {
                tracing::info!(client = %a.client_id, node = %a.node, "client id connected to another node; ending the session here");
                local.end.cancel();
            }
        }
    }
}

/// The running front end.
#[derive(Debug)]
pub struct MqttServer {
    tcp: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    ws: Option<SocketAddr>,
    wss: Option<SocketAddr>,
    sessions: LocalSessions,
}

impl MqttServer {
    /// The plain listener's address, or else the TLS, WebSocket or secure
    /// WebSocket one's.
    pub fn listen(&self) -> SocketAddr {
        self.tcp.or(self.tls).or(self.ws).or(self.wss).expect("config validation keeps one listener on")
    }

    /// The TLS listener's address, if it is on.
    pub fn tls_listen(&self) -> Option<SocketAddr> {
        self.tls
    }

    /// The WebSocket listener's address, if it is on.
    pub fn ws_listen(&self) -> Option<SocketAddr> {
        self.ws
    }

    /// The secure WebSocket listener's address, if it is on.
    pub fn wss_listen(&self) -> Option<SocketAddr> {
        self.wss
    }

    pub fn sessions(&self) -> &LocalSessions {
        &self.sessions
    }
}

/// Binds the listeners and starts the accept loops. Every task is spawned
/// on `life` and ends on its stop signal; connections finish sending the
/// acks they owe first.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    cfg: &MqttConfig,
    ingest: &IngestConfig,
    auth: Arc<Authenticator>,
    ingress: Ingress,
    wills: Arc<wills::Wills>,
    sessions_bus: SessionBus,
    cmd_ready: tokio::sync::mpsc::Sender<String>,
    unavailable: tokio::sync::watch::Receiver<bool>,
    life: &Lifecycle,
) -> Result<MqttServer, MqttError> {
    let tls = if cfg.tls_enabled {
        let config = crate::tls::server_config(&cfg.tls_cert_file, &cfg.tls_key_file, &cfg.tls_client_ca_file)?;
        Some((bind(cfg.tls_listen).await?, tokio_rustls::TlsAcceptor::from(config)))
    } else {
        None
    };
    let tcp = if cfg.tcp_enabled { Some(bind(cfg.listen).await?) } else { None };
    let ws = if cfg.ws_enabled { Some(bind(cfg.ws_listen).await?) } else { None };
    let wss = if cfg.wss_enabled {
        let config = crate::tls::server_config(&cfg.tls_cert_file, &cfg.tls_key_file, &cfg.tls_client_ca_file)?;
        Some((bind(cfg.wss_listen).await?, tokio_rustls::TlsAcceptor::from(config)))
    } else {
        None
    };

    let broker = broker::Broker::new(ingress.mesh().clone(), &sessions_bus.node_id, life.clone());
    let shares = shared::Shares::new(broker.clone(), life.clone());
    let session_store = Arc::new(sessions::SessionStore::new(ingress.mesh().clone(), &sessions_bus.node_id));
    let shared = Arc::new(Shared {
        ingress,
        config: cfg.clone(),
        max_payload: ingest.max_payload_bytes,
        auth,
        quota: crate::limits::quota(ingest.device_rate_per_sec, ingest.device_burst),
        broker,
        wills,
        session_store,
        shares,
        sessions: Mutex::new(HashMap::new()),
        delayed_wills: Mutex::new(HashMap::new()),
        life: life.clone(),
        sessions_bus,
        cmd_ready,
        unavailable,
    });
    life.spawn(watch_sessions(shared.clone()));
    // The credentials watch opens before any device can connect, so no
    // change after a device's check can be missed. If it cannot open now,
    // it opens (from the bucket's position then) in its task.
    let source = KvChanges(shared.auth.store().clone());
    let credentials = match Rewatch::open(source.clone(), "credentials", 0).await {
        Ok(watch) => watch,
        Err(e) => {
            tracing::warn!(error = %fluxmesh_mesh::error_chain(&e), "cannot watch device credentials yet; retrying");
            Rewatch::lazy(source, "credentials", 0)
        }
    };
    life.spawn(watch_credentials(shared.clone(), credentials.spawn(life)));
    let slots = Arc::new(Semaphore::new(shared.config.max_connections));
    let (mut tcp_addr, mut tls_addr, mut ws_addr, mut wss_addr) = (None, None, None, None);
    if let Some((listener, addr)) = tcp {
        tracing::info!(listen = %addr, "MQTT listening");
        tcp_addr = Some(addr);
        life.spawn(accept(listener, None, Transport::Tcp, shared.clone(), slots.clone()));
    }
    if let Some(((listener, addr), acceptor)) = tls {
        tracing::info!(listen = %addr, "MQTT over TLS listening");
        tls_addr = Some(addr);
        life.spawn(accept(listener, Some(acceptor), Transport::Tcp, shared.clone(), slots.clone()));
    }
    if let Some((listener, addr)) = ws {
        tracing::info!(listen = %addr, "MQTT over WebSocket listening");
        ws_addr = Some(addr);
        life.spawn(accept(listener, None, Transport::WebSocket, shared.clone(), slots.clone()));
    }
    if let Some(((listener, addr), acceptor)) = wss {
        tracing::info!(listen = %addr, "MQTT over secure WebSocket listening");
        wss_addr = Some(addr);
        life.spawn(accept(listener, Some(acceptor), Transport::WebSocket, shared.clone(), slots));
    }
    Ok(MqttServer { tcp: tcp_addr, tls: tls_addr, ws: ws_addr, wss: wss_addr, sessions: LocalSessions { shared } })
}

/// Connections the kernel queues for `accept` (capped by the system's
/// `net.core.somaxconn`): when a fleet reconnects at once, those past it
/// wait for their SYN to be sent again, a second or more.
const LISTEN_BACKLOG: u32 = 8192;

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), MqttError> {
    let bound = || {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    let listener = bound().map_err(|source| MqttError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| MqttError::Bind { addr, source })?;
    Ok((listener, bound))
}

/// Ends the local session of a device whose credentials changed or were
/// removed, so that it must authenticate again (with its new rights, or
/// not at all), and forgets what was verified for it. The watch resumes
/// from the revision after the last one it saw, so a change made while it
/// is being re-established (NATS restarting, say) still ends the session.
async fn watch_credentials(shared: Arc<Shared>, mut changes: mpsc::Receiver<Watched<kv::Entry>>) {
    loop {
        let entry = tokio::select! {
            _ = shared.life.stopped() => return,
            entry = changes.recv() => match entry {
                Some(Watched::Item(entry)) => entry,
                // Resumed where it was: nothing is replayed.
                Some(Watched::Restarted) => continue,
                None => return,
            },
        };
        let Some(device) = crate::auth::device_of_key(&entry.key) else { continue };
        shared.auth.forget(&device);
        let sessions = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
        // A change the session already authenticated against (the watch can
        // deliver it after the device connected) ends nothing.
        if let Some(session) = sessions.get(&device).filter(|s| entry.revision > s.auth_revision) {
            emit(mqtt_events::SessionRevoked { device: &device });
            session.end_revoked();
        }
    }
}

/// What a listener speaks over its sockets.
#[derive(Debug, Clone, Copy)]
enum Transport {
    Tcp,
    WebSocket,
}

/// One accepted (and, if TLS, handshaken) stream's connection, boxed: a
/// connection task holds the state of its own transport only, not of the
/// largest of them.
fn connection_of<S>(stream: S, peer: SocketAddr, transport: Transport, shared: Arc<Shared>) -> Connection
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match transport {
        Transport::Tcp => Box::pin(connection::serve(stream, peer, shared)),
        Transport::WebSocket => Box::pin(websocket::serve(stream, peer, shared)),
    }
}

/// A connection's task body.
type Connection = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves one accepted stream over TLS, once its handshake is done.
async fn serve_tls(
    acceptor: tokio_rustls::TlsAcceptor,
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    transport: Transport,
    shared: Arc<Shared>,
) {
    let timeout = Duration::from_millis(u64::from(shared.config.connection_timeout_ms));
    match tokio::time::timeout(timeout, acceptor.accept(socket)).await {
        Ok(Ok(stream)) => connection_of(stream, peer, transport, shared).await,
        Ok(Err(e)) => emit(mqtt_events::HandshakeFailed { kind: Handshake::Tls, peer, error: Some(&e) }),
        Err(_) => emit(mqtt_events::HandshakeFailed { kind: Handshake::Tls, peer, error: None }),
    }
}

async fn accept(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    transport: Transport,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shared.life.stopped() => break,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: keep serving.
                tracing::warn!(error = %fluxmesh_mesh::error_chain(&e), "MQTT accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            emit(mqtt_events::ConnectionRefusedFull { peer, max: shared.config.max_connections });
            drop(socket);
            continue;
        };
        let _ = socket.set_nodelay(true);
        // Boxed, so that a plain connection's task does not hold room for
        // a TLS session's state.
        let connection: Connection = match tls.clone() {
            None => connection_of(socket, peer, transport, shared.clone()),
            Some(acceptor) => Box::pin(serve_tls(acceptor, socket, peer, transport, shared.clone())),
        };
        shared.life.clone().spawn(async move {
            metrics::gauge!(crate::internal_events::names::MQTT_CONNECTIONS).increment(1.0);
            connection.await;
            metrics::gauge!(crate::internal_events::names::MQTT_CONNECTIONS).decrement(1.0);
            drop(slot);
        });
    }
    tracing::info!("MQTT listener closed");
}
