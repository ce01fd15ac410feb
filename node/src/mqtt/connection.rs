//! One client connection: MQTT 3.1.1 or 5 over a socket, acks after
//! JetStream.
//!
//! The task owns the socket. Each loop turn it waits for whichever comes
//! first: the next ack in order, the end of the publish being submitted,
//! more bytes from the device, a message the router forwards, the keep-alive
//! deadline, or a stop.
//!
//! Publishes pass through two bounded stages: a backlog of parsed publishes
//! (so that PINGREQs behind them are still answered while JetStream is
//! slow) and up to `mqtt.max_inflight` publishes awaiting their JetStream
//! ack. When both are full the task stops reading the socket, so a slow
//! JetStream slows the device down instead of filling memory.

use super::broker::{Outbox, Outgoing, Sub};
use super::codec::{self, reason, Codec, FilterIn, Inbound, PublishIn, PublishOut, Version};
use super::Shared;
use crate::auth::acl::Grant;
use crate::auth::Denied;
use crate::ingress::{IngestError, MqttPublish, Source};
use crate::internal_events;
use bytes::{Bytes, BytesMut};
use fluxmesh_schemas::{DeviceTopic, PlainTopic};
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use rumqttc::mqttbytes::valid_filter;
use rumqttc::QoS;
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a device may leave our writes unread before it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection the server ends waits for the client to close
/// after its DISCONNECT.
const LINGER: Duration = Duration::from_secs(1);
/// How long a stopping connection may take to send the acks it owes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of parsed, not yet submitted publishes one connection may hold
/// (at least one packet is always allowed).
const BACKLOG_BYTES: usize = 1024 * 1024;

/// A live session on this node, so a second CONNECT with the same client id
/// can end the first (one session per client id).
#[derive(Debug, Clone)]
pub struct Session {
    serial: u64,
    pub(super) connected_us: i64,
    pub(super) end: CancellationToken,
    /// Commands to write to this device (QoS1 on `devices/{id}/cmd`).
    pub(super) commands: tokio::sync::mpsc::Sender<OutCommand>,
    /// The device subscribed to its command topic.
    pub(super) cmd_ready: Arc<std::sync::atomic::AtomicBool>,
    /// Set when the session is ended because its credentials changed.
    revoked: Arc<std::sync::atomic::AtomicBool>,
    /// The credentials entry revision the device authenticated against.
    pub(super) auth_revision: u64,
}

impl Session {
    /// Ends the session because the device's credentials changed.
    pub(super) fn end_revoked(&self) {
        self.revoked.store(true, Ordering::Release);
        self.end.cancel();
    }
}

/// A command for the device on this connection; `done` learns whether the
/// device PUBACKed it.
#[derive(Debug)]
pub struct OutCommand {
    pub payload: Bytes,
    pub done: tokio::sync::oneshot::Sender<Result<(), super::DeliverError>>,
}

static SERIALS: AtomicU64 = AtomicU64::new(1);

/// How far the streams may move past a persistent session's cursor, with
/// nothing for it, before the cursor is stored again (what a resume has to
/// read through).
const IDLE_SAVE_GAP: u64 = 10_000;

/// Commands waiting to be written to one connection, at most; the sender
/// waits when it is full.
const COMMAND_QUEUE: usize = 64;
/// Commands written and not yet PUBACKed on one connection, at most.
const COMMANDS_IN_FLIGHT: usize = 32;

/// What to answer once a publish is settled.
#[derive(Debug, Clone, Copy)]
enum Reply {
    Nothing,
    PubAck(u16),
    PubRec(u16),
}

/// How a publish was settled.
#[derive(Debug)]
enum Outcome {
    /// Stored in JetStream.
    Stored,
    /// Refused for good (bad topic, too large, not allowed): acknowledged
    /// so that the device does not resend it forever (MQTT 5: with this
    /// reason code), and counted.
    Refused(u8),
    /// A QoS2 resend of a message already stored in this session.
    Duplicate,
    /// Not stored after every retry: no ack, the connection closes, and the
    /// device sends it again after reconnecting.
    Failed(IngestError),
}

type Settle = Pin<Box<dyn Future<Output = (Reply, Outcome)> + Send>>;
/// A publish that has been sent (or refused) and whose ack is still to
/// come: what submitting resolves to.
struct Submitted(Settle);
type Submit = Pin<Box<dyn Future<Output = Submitted> + Send>>;

fn settled(reply: Reply, outcome: Outcome) -> Settle {
    Box::pin(std::future::ready((reply, outcome)))
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    Disconnect,
    /// An MQTT 5 DISCONNECT asking for the will to be published.
    DisconnectWithWill,
    PeerClosed,
    Io(std::io::Error),
    Protocol(&'static str, String),
    KeepAlive,
    TakenOver,
    Revoked,
    Stopped,
    NotStored(IngestError),
    Denied(Denied),
    WillNotKept(super::wills::WillError),
    Session(super::sessions::SessionError),
}

impl End {
    fn reason(&self) -> &'static str {
        match self {
            End::Disconnect => "disconnect",
            End::DisconnectWithWill => "disconnect_with_will",
            End::PeerClosed => "peer_closed",
            End::Io(_) => "io_error",
            End::Protocol(reason, _) => reason,
            End::KeepAlive => "keep_alive",
            End::TakenOver => "taken_over",
            End::Revoked => "credentials_changed",
            End::Denied(d) => d.reason(),
            End::Stopped => "node_stopping",
            End::NotStored(_) => "not_stored",
            End::WillNotKept(_) => "will_not_kept",
            End::Session(_) => "session_unavailable",
        }
    }

    /// The reason an MQTT 5 client is told in the server's DISCONNECT;
    /// `None`: the client ended it, or the socket is gone.
    fn disconnect_code(&self) -> Option<u8> {
        Some(match self {
            End::Disconnect | End::DisconnectWithWill | End::PeerClosed | End::Io(_) => return None,
            End::Protocol("oversize", _) => reason::PACKET_TOO_LARGE,
            End::Protocol("receive_maximum", _) => reason::RECEIVE_MAXIMUM_EXCEEDED,
            End::Protocol("topic_alias_invalid", _) => reason::TOPIC_ALIAS_INVALID,
            End::Protocol("acl_denied", _) => reason::NOT_AUTHORIZED,
            End::Protocol("malformed_packet", _) => reason::MALFORMED,
            End::Protocol("write_timeout", _) => return None,
            End::Protocol(..) => reason::PROTOCOL_ERROR,
            End::KeepAlive => reason::KEEP_ALIVE_TIMEOUT,
            End::TakenOver => reason::SESSION_TAKEN_OVER,
            End::Revoked => reason::ADMINISTRATIVE_ACTION,
            End::Stopped => reason::SERVER_SHUTTING_DOWN,
            End::NotStored(_) => reason::UNSPECIFIED,
            End::Denied(_) | End::WillNotKept(_) | End::Session(_) => return None,
        })
    }
}

/// A subscription's options: the QoS granted and, from MQTT 5, no-local,
/// retain-as-published and its subscription identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SubOpts {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub id: Option<u32>,
}

impl SubOpts {
    /// Options beyond the QoS, which make each delivery look at the
    /// session's filters.
    fn has_extras(&self) -> bool {
        self.no_local || self.retain_as_published || self.id.is_some()
    }
}

/// What an MQTT 5 CONNECT set for the connection (3.1.1: the defaults).
#[derive(Debug)]
struct V5Limits {
    /// QoS 1/2 messages the client takes unacknowledged.
    receive_maximum: usize,
    /// The largest packet the client takes.
    max_packet: usize,
    /// Topic aliases the client takes from us, and those given.
    alias_max: u16,
    out_aliases: std::collections::HashMap<String, u16>,
    /// Topic aliases the client set on this connection.
    in_aliases: std::collections::HashMap<u16, String>,
}

impl Default for V5Limits {
    fn default() -> V5Limits {
        V5Limits {
            receive_maximum: usize::from(u16::MAX),
            max_packet: usize::MAX,
            alias_max: 0,
            out_aliases: Default::default(),
            in_aliases: Default::default(),
        }
    }
}

/// A QoS 1 or 2 message sent to the client and not yet acknowledged.
#[derive(Debug)]
struct OutFlight {
    qos: QoS,
    /// QoS 2: PUBREC received and PUBREL sent; waiting for PUBCOMP.
    released: bool,
    /// Where it was read from, for a persistent session's cursors.
    origin: Option<(Arc<str>, u64)>,
    /// A shared subscription's message: acknowledged to its group when
    /// the client acknowledges it, given back if the client leaves first.
    share: Option<super::shared::ShareAck>,
}

struct Conn<S> {
    socket: S,
    peer: SocketAddr,
    shared: Arc<Shared>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    max_packet: usize,
    /// The protocol version the CONNECT chose (3.1.1 until then).
    codec: Codec,
    client_id: String,
    clean: bool,
    /// How long the session outlives the connection, in seconds: MQTT 5's
    /// session expiry; 3.1.1 clean session 0: `u32::MAX` (never).
    session_expiry: u32,
    keep_alive: Option<Duration>,
    /// What an MQTT 5 client said it takes.
    limits: V5Limits,
    /// QoS 1/2 packet ids received and not yet PUBACKed or PUBCOMPed
    /// (MQTT 5 receive maximum).
    in_flows: HashSet<u16>,
    /// QoS2 packet ids stored and PUBRECed, awaiting PUBREL.
    awaiting_rel: HashSet<u16>,
    /// Parsed publishes not yet submitted, in arrival order.
    backlog: VecDeque<PublishIn>,
    backlog_bytes: usize,
    /// DISCONNECT received (with its reason): finish what was read, then
    /// close.
    disconnecting: Option<u8>,
    /// The will's delay (MQTT 5), in seconds.
    will_delay: u32,
    pending: FuturesOrdered<Settle>,
    submitting: Option<Submit>,
    /// Identifies this session's subscriptions in the node's broker.
    session_id: u64,
    /// Messages for this session from the broker: the sender end is given
    /// with each subscription.
    outbox_tx: Option<Outbox>,
    outbox: Option<tokio::sync::mpsc::Receiver<Outgoing>>,
    /// Filters subscribed in the broker, with their options.
    subscriptions: std::collections::HashMap<String, SubOpts>,
    /// Some subscription has MQTT 5 options: each delivery looks at the
    /// matching filters.
    sub_extras: bool,
    /// Shared subscriptions (`$share/{group}/{filter}`), with the QoS granted.
    share_subs: std::collections::HashMap<String, QoS>,
    /// Shared messages written at QoS 0, to acknowledge to their groups.
    shares_done: Vec<super::shared::ShareAck>,
    /// Messages sent at QoS 1/2 and not yet acknowledged, by packet id.
    out_inflight: std::collections::HashMap<u16, OutFlight>,
    /// The will given at CONNECT and its record's stream sequence.
    will: Option<(super::wills::Will, u64)>,
    /// Messages to send before the outbox's: retained messages for new
    /// subscriptions (after the SUBACK, at most `mqtt.session_queue`) and
    /// what a resumed session's replay read.
    ready: VecDeque<Outgoing>,
    /// A persistent session's stored state and progress (clean session 0).
    persist: Option<super::sessions::Persist>,
    /// A resumed session's replay, one stream at a time.
    replay: VecDeque<super::sessions::Replay>,
    /// Live messages at or below these sequences came by the replay.
    replay_floor: std::collections::HashMap<Arc<str>, u64>,
    /// Where the broker says what did not fit in the outbox.
    overflow: Arc<super::broker::Overflow>,
    /// Overflowed streams waiting for their catch-up (one replay per
    /// stream at a time): the first sequence dropped.
    overflowed: std::collections::HashMap<Arc<str>, u64>,
    /// Per stream: the highest sequence written to the client (or, before
    /// any, the feed's position when the session subscribed).
    written_live: std::collections::HashMap<Arc<str>, u64>,
    /// Commands for this device, from the node's command service.
    commands: Option<tokio::sync::mpsc::Receiver<OutCommand>>,
    cmd_ready: Arc<std::sync::atomic::AtomicBool>,
    /// The device's subscriptions that match its own command topic, with
    /// the QoS each was granted. Commands flow while there is one, at the
    /// highest QoS granted.
    cmd_filters: std::collections::HashMap<String, QoS>,
    /// Commands written and awaiting the device's PUBACK, by packet id.
    awaiting_puback: std::collections::HashMap<u16, tokio::sync::oneshot::Sender<Result<(), super::DeliverError>>>,
    next_pkid: u16,
    /// What the device may publish and subscribe to (set by CONNECT).
    grant: Grant,
    /// ACL refusals on this connection (the first is logged at warn).
    denied: u64,
    limiter: Option<crate::limits::ConnectionLimiter>,
    /// No publish is submitted before this (out of rate tokens).
    throttled_until: Option<Instant>,
}

/// Serves one connection until the device leaves, breaks the protocol, is
/// taken over, or the node stops.
pub(super) async fn serve<S>(socket: S, peer: SocketAddr, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    // The largest packet: the payload limit plus room for the topic and
    // headers of a PUBLISH.
    let max_packet = shared.max_payload + fluxmesh_schemas::subject::MAX_TOPIC_LEN + 16;
    let shared_quota = shared.quota;
    let mut conn = Conn {
        socket,
        peer,
        shared,
        rbuf: BytesMut::with_capacity(4096),
        wbuf: BytesMut::with_capacity(1024),
        max_packet,
        codec: Codec { version: Version::V4 },
        client_id: String::new(),
        clean: true,
        session_expiry: 0,
        keep_alive: None,
        limits: V5Limits::default(),
        in_flows: HashSet::new(),
        awaiting_rel: HashSet::new(),
        backlog: VecDeque::new(),
        backlog_bytes: 0,
        disconnecting: None,
        will_delay: 0,
        pending: FuturesOrdered::new(),
        submitting: None,
        session_id: 0,
        outbox_tx: None,
        outbox: None,
        subscriptions: Default::default(),
        sub_extras: false,
        share_subs: Default::default(),
        shares_done: Vec::new(),
        out_inflight: Default::default(),
        ready: VecDeque::new(),
        persist: None,
        replay: VecDeque::new(),
        replay_floor: Default::default(),
        overflow: Arc::default(),
        overflowed: Default::default(),
        written_live: Default::default(),
        will: None,
        commands: None,
        cmd_ready: Arc::default(),
        cmd_filters: Default::default(),
        awaiting_puback: Default::default(),
        next_pkid: 1,
        grant: Grant::own("", crate::auth::acl::Method::Anonymous),
        denied: 0,
        limiter: shared_quota.map(crate::limits::ConnectionLimiter::new),
        throttled_until: None,
    };
    let timeout = Duration::from_millis(u64::from(conn.shared.config.connection_timeout_ms));
    let session = match tokio::time::timeout(timeout, conn.handshake()).await {
        Ok(Ok(session)) => session,
        Ok(Err(end)) => {
            conn.closed(&end);
            return;
        }
        Err(_) => {
            conn.closed(&End::Protocol("connect_timeout", format!("no CONNECT within {timeout:?}")));
            return;
        }
    };
    let end = conn.run(&session).await;
    conn.closed(&end);
    conn.say_disconnect(&end).await;
    conn.leave_broker();
    conn.leave_shares().await;
    conn.finish_session().await;
    conn.close_replay().await;
    {
        let mut sessions = conn.shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if sessions.get(&conn.client_id).is_some_and(|s| s.serial == session.serial) {
            sessions.remove(&conn.client_id);
        }
    }
    conn.end_will(&end).await;
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    /// Reads CONNECT, checks it, registers the session, answers CONNACK.
    async fn handshake(&mut self) -> Result<Session, End> {
        let connect = loop {
            // Read before the codec consumes the packet.
            let declared = codec::connect_level(&self.rbuf);
            match codec::read(None, &mut self.rbuf, self.max_packet) {
                Ok(Some(Inbound::Connect(c))) => break c,
                Ok(Some(other)) => {
                    return Err(End::Protocol("expected_connect", format!("first packet was {other:?}")))
                }
                Ok(None) => self.read_more().await?,
                Err(e @ (codec::DecodeError::Level(_) | codec::DecodeError::ProtocolName)) => {
                    // MQTT 5 clients read only an MQTT 5 CONNACK; older
                    // ones a 3.1.1 one.
                    let level = declared.unwrap_or(4);
                    self.codec = Codec { version: if level >= 5 { Version::V5 } else { Version::V4 } };
                    self.refuse(reason::UNSUPPORTED_PROTOCOL).await;
                    return Err(End::Protocol("protocol_version", fluxmesh_mesh::error_chain(&e)));
                }
                Err(e) => return Err(End::Protocol("malformed_packet", fluxmesh_mesh::error_chain(&e))),
            }
        };
        self.codec = Codec { version: connect.version };
        let v5 = connect.version == Version::V5;
        if connect.auth_method.is_some() {
            self.refuse(reason::BAD_AUTHENTICATION_METHOD).await;
            return Err(End::Protocol("auth_method", "enhanced authentication is not offered".into()));
        }
        self.clean = connect.clean_start;
        self.session_expiry = match connect.version {
            Version::V5 => connect.session_expiry.unwrap_or(0),
            Version::V4 if connect.clean_start => 0,
            Version::V4 => u32::MAX,
        };
        let mut assigned = None;
        self.client_id = if connect.client_id.is_empty() {
            if !v5 && !connect.clean_start {
                self.refuse(reason::CLIENT_ID_INVALID).await;
                return Err(End::Protocol("bad_client_id", "empty client id needs a clean session".into()));
            }
            let id = format!("auto-{}", uuid::Uuid::new_v4().simple());
            assigned = Some(id.clone());
            id
        } else {
            connect.client_id
        };
        let mut keep_alive = connect.keep_alive;
        let mut server_keep_alive = None;
        let cap = self.shared.config.server_keep_alive_secs;
        if v5 && cap > 0 && (keep_alive == 0 || keep_alive > cap) {
            keep_alive = cap;
            server_keep_alive = Some(cap);
        }
        self.keep_alive = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        if v5 {
            self.limits.receive_maximum = usize::from(connect.receive_maximum.unwrap_or(u16::MAX).max(1));
            self.limits.max_packet = connect.max_packet_size.map_or(usize::MAX, |m| m as usize);
            self.limits.alias_max = connect.topic_alias_max.unwrap_or(0);
        }
        self.grant = self.authenticate(connect.username.as_deref(), connect.password.as_deref()).await?;
        if let Some(will) = connect.will {
            self.will_delay = will.delay;
            self.will = Some(self.accept_will(will).await?);
        }
        self.open_session().await?;

        let (commands_tx, commands_rx) = tokio::sync::mpsc::channel(COMMAND_QUEUE);
        self.commands = Some(commands_rx);
        let (outbox_tx, outbox) = tokio::sync::mpsc::channel(self.shared.config.session_queue);
        (self.outbox_tx, self.outbox) = (Some(outbox_tx), Some(outbox));
        let session = Session {
            serial: SERIALS.fetch_add(1, Ordering::Relaxed),
            connected_us: fluxmesh_schemas::frame::now_us(),
            end: CancellationToken::new(),
            commands: commands_tx,
            cmd_ready: self.cmd_ready.clone(),
            revoked: Arc::default(),
            auth_revision: self.grant.revision,
        };
        self.session_id = session.serial;
        let previous = self
            .shared
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.client_id.clone(), session.clone());
        if let Some(previous) = previous {
            tracing::info!(client = %self.client_id, peer = %self.peer, "client id connected again; ending the older session");
            previous.end.cancel();
        }
        // The client is back: a will waiting out its delay is not sent.
        self.shared.cancel_delayed_will(&self.client_id);
        self.shared.sessions_bus.announce(&self.client_id, session.connected_us).await;
        let present = self.persist.as_ref().is_some_and(|p| p.present);
        let info = codec::ConnAckInfo {
            assigned_client_id: assigned,
            receive_maximum: u16::try_from(self.shared.config.max_inflight).unwrap_or(u16::MAX),
            max_packet_size: u32::try_from(self.max_packet).unwrap_or(u32::MAX),
            topic_alias_max: self.shared.config.topic_alias_max,
            server_keep_alive,
            session_expiry: None,
        };
        self.codec.connack(&mut self.wbuf, present, reason::SUCCESS, Some(&info));
        self.flush().await?;
        tracing::debug!(client = %self.client_id, peer = %self.peer, present, version = ?self.codec.version, "MQTT connected");
        if present {
            self.resume().await;
        }
        Ok(session)
    }

    /// Checks the CONNECT's credentials: the client id is the device id,
    /// the password its secret, the username empty or the client id.
    async fn authenticate(&mut self, username: Option<&str>, password: Option<&[u8]>) -> Result<Grant, End> {
        let username = username.filter(|u| !u.is_empty());
        let secret = password.filter(|p| !p.is_empty());
        let denied = match self.shared.auth.authenticate("mqtt", &self.client_id, username, secret).await {
            Ok(grant) => return Ok(grant),
            Err(denied) => denied,
        };
        let code = match denied {
            Denied::BadCredentials | Denied::UsernameMismatch => reason::BAD_USER_NAME_OR_PASSWORD,
            Denied::NoCredentials | Denied::Disabled => reason::NOT_AUTHORIZED,
            Denied::Unavailable => reason::SERVER_UNAVAILABLE,
        };
        self.refuse(code).await;
        Err(End::Denied(denied))
    }

    /// Clean session: forgets any stored session of the client id.
    /// Persistent: loads it (CONNACK's session present tells whether there
    /// was one). Unreadable: CONNACK "server unavailable".
    async fn open_session(&mut self) -> Result<(), End> {
        use super::sessions::{Persist, SessionError, SessionRecord};
        let store = self.shared.session_store.clone();
        let loaded = match store.load(&self.client_id).await {
            Ok(loaded) => loaded,
            Err(SessionError::Corrupt { client, source }) => {
                metrics::counter!(crate::internal_events::names::MQTT_SESSIONS_CORRUPT_TOTAL).increment(1);
                tracing::warn!(%client, error = %source, "stored session unreadable; starting a new one");
                None
            }
            Err(e) => {
                self.refuse(reason::SERVER_UNAVAILABLE).await;
                return Err(End::Session(e));
            }
        };
        let now = fluxmesh_schemas::frame::now_us();
        let (stale, live) = match loaded {
            Some((record, _)) if self.clean || record.expired(now) => (true, None),
            other => (false, other),
        };
        if stale {
            if let Err(e) = store.discard(&self.client_id).await {
                self.refuse(reason::SERVER_UNAVAILABLE).await;
                return Err(End::Session(e));
            }
        }
        let expiry = (self.session_expiry != u32::MAX).then_some(self.session_expiry);
        self.persist = match live {
            // Resumed, even when it ends with this connection (MQTT 5
            // session expiry 0).
            Some((mut record, seq)) => {
                record.ended_us = None;
                record.expiry_secs = expiry;
                Some(Persist::new(record, Some(seq)))
            }
            None if self.session_expiry == 0 => None,
            None => {
                // Stored now, so that the next CONNECT finds the session
                // even if this one subscribes to nothing.
                let mut record = SessionRecord { expiry_secs: expiry, ..SessionRecord::default() };
                match store.save(&self.client_id, &mut record, None).await {
                    Ok(seq) => Some(Persist { present: false, ..Persist::new(record, Some(seq)) }),
                    Err(e) => {
                        self.refuse(reason::SERVER_UNAVAILABLE).await;
                        return Err(End::Session(e));
                    }
                }
            }
        };
        Ok(())
    }

    /// After the connection: a session that outlives it is stored with
    /// the time it ended (its expiry counts from then); one that does not
    /// is forgotten.
    async fn finish_session(&mut self) {
        let Some(persist) = &mut self.persist else { return };
        if self.session_expiry == 0 {
            if let Err(e) = self.shared.session_store.discard(&self.client_id).await {
                metrics::counter!(crate::internal_events::names::MQTT_SESSION_SAVE_FAILED_TOTAL).increment(1);
                tracing::warn!(client = %self.client_id, error = %fluxmesh_mesh::error_chain(&e), "cannot forget an ended session");
            }
            return;
        }
        persist.record.expiry_secs = (self.session_expiry != u32::MAX).then_some(self.session_expiry);
        persist.record.ended_us = Some(fluxmesh_schemas::frame::now_us());
        persist.subs_changed = true;
        self.save_session(true).await;
    }

    /// A persistent session comes back: its subscriptions go into the
    /// broker again (live messages flow from now on), and each stream is
    /// replayed from the session's cursor up to where the stream ends now.
    /// Live messages wait in the outbox until the replay is done; those the
    /// replay covered are skipped.
    async fn resume(&mut self) {
        let Some(persist) = &self.persist else { return };
        let subs = persist.record.subs.clone();
        let stored_opts = persist.record.opts.clone();
        let cursors = persist.record.cursors.clone();
        metrics::counter!(crate::internal_events::names::MQTT_SESSIONS_RESUMED_TOTAL).increment(1);
        let mut streams = std::collections::BTreeSet::new();
        for (filter, qos) in subs {
            let extra = stored_opts.get(&filter).copied().unwrap_or_default();
            let opts = SubOpts { qos: qos_of(qos), no_local: extra.nl, retain_as_published: extra.rap, id: extra.id };
            // Rights can change while a session is away.
            let denied = self.shared.config.deny_topics.iter().any(|d| crate::auth::acl::within(&filter, d));
            if denied || !self.grant.may_subscribe(&filter) {
                tracing::info!(client = %self.client_id, %filter, "a stored subscription is no longer allowed; dropped");
                if let Some(p) = &mut self.persist {
                    p.record.subs.remove(&filter);
                    p.record.opts.remove(&filter);
                    p.subs_changed = true;
                }
                continue;
            }
            if self.activate(&filter, opts).await.is_none() {
                continue;
            }
            streams.extend(self.shared.broker.streams_for(&filter));
        }
        for stream in streams {
            let Some(&cursor) = cursors.get(&stream) else { continue };
            let end = match self.shared.broker.last_seq(&stream).await {
                Ok(end) => end,
                Err(e) => {
                    metrics::counter!(crate::internal_events::names::MQTT_REPLAY_FAILED_TOTAL).increment(1);
                    tracing::warn!(client = %self.client_id, %stream, error = %fluxmesh_mesh::error_chain(&e),
                        "cannot replay a stream for a resumed session; its missed messages are not sent");
                    continue;
                }
            };
            tracing::debug!(client = %self.client_id, %stream, cursor, end, "resuming a persistent session");
            if cursor < end {
                let stream: Arc<str> = stream.into();
                self.replay_floor.insert(stream.clone(), end);
                self.replay.push_back(super::sessions::Replay { stream, reader: None, next: cursor + 1, end });
            }
        }
    }

    /// Takes one message the replay read: queued if a subscription of the
    /// session matches it, at the highest QoS granted among them.
    async fn replayed(&mut self, read: Result<Option<async_nats::jetstream::Message>, super::broker::FeedError>) {
        let stored = match read {
            Ok(Some(stored)) => stored,
            Ok(None) => return,
            Err(e) => {
                metrics::counter!(crate::internal_events::names::MQTT_REPLAY_FAILED_TOTAL).increment(1);
                tracing::warn!(client = %self.client_id, error = %fluxmesh_mesh::error_chain(&e),
                    "a resumed session's replay failed; the rest of that stream's missed messages are not sent");
                if let Some(replay) = self.replay.pop_front() {
                    self.replay_floor.remove(&replay.stream);
                    if let Some(reader) = replay.reader {
                        reader.close().await;
                    }
                }
                self.start_catch_ups();
                return;
            }
        };
        let Some(replay) = self.replay.front() else { return };
        let stream = replay.stream.clone();
        let end = replay.end;
        let seq = stored.info().map(|i| i.stream_sequence).unwrap_or(end);
        if seq <= end {
            let mut scratch = fluxmesh_schemas::frame::AlignedVec::new();
            let message = self.shared.broker.decode_from(&stream, &stored, &mut scratch);
            let granted = message.as_ref().and_then(|m| {
                self.subscriptions
                    .iter()
                    .filter(|(filter, _)| super::topics::matches(&m.topic, filter))
                    .map(|(_, opts)| opts.qos as u8)
                    .max()
            });
            match (message, granted) {
                (Some(message), Some(granted)) => {
                    metrics::counter!(crate::internal_events::names::MQTT_REPLAYED_TOTAL).increment(1);
                    let qos = granted.min(message.qos);
                    let origin = Some((stream.clone(), seq));
                    self.ready.push_back(Outgoing {
                        message: Arc::new(message),
                        qos,
                        retain: false,
                        origin,
                        share: None,
                    });
                }
                _ => {
                    if let Some(p) = &mut self.persist {
                        p.scanned.insert(stream.clone(), seq);
                    }
                }
            }
        }
        if let Some(current) = self.replay.front_mut() {
            current.next = seq + 1;
        }
        if seq >= end {
            if let Some(done) = self.replay.pop_front() {
                if let Some(reader) = done.reader {
                    reader.close().await;
                }
            }
            self.start_catch_ups();
        }
    }

    /// The broker could not queue some messages for this session: it
    /// reads them back from their streams (a catch-up) instead.
    fn overflowed_again(&mut self) {
        for (stream, first) in self.overflow.take() {
            let entry = self.overflowed.entry(stream).or_insert(first);
            *entry = (*entry).min(first);
        }
        self.start_catch_ups();
    }

    /// Starts a replay for each overflowed stream that has none running:
    /// from after the last message written on it to the feed's position
    /// (every message dropped for the session is at or below it). Live
    /// messages wait until it is done; those it covered are skipped.
    fn start_catch_ups(&mut self) {
        let ready: Vec<(Arc<str>, u64)> = self
            .overflowed
            .iter()
            .filter(|(stream, _)| !self.replay.iter().any(|r| &r.stream == *stream))
            .map(|(s, q)| (s.clone(), *q))
            .collect();
        for (stream, first) in ready {
            self.overflowed.remove(&stream);
            let start = self.written_live.get(&stream).map_or(first, |w| (w + 1).min(first));
            let end = self.shared.broker.position(&stream).unwrap_or(first).max(first);
            metrics::counter!(crate::internal_events::names::MQTT_CATCH_UPS_TOTAL).increment(1);
            tracing::debug!(client = %self.client_id, %stream, start, end, "subscriber fell behind; reading back from the stream");
            let floor = self.replay_floor.entry(stream.clone()).or_insert(end);
            *floor = (*floor).max(end);
            self.replay.push_back(super::sessions::Replay { stream, reader: None, next: start, end });
        }
    }

    /// Deletes the replay's readers (best effort; they expire anyway).
    async fn close_replay(&mut self) {
        while let Some(replay) = self.replay.pop_front() {
            if let Some(reader) = replay.reader {
                reader.close().await;
            }
        }
    }

    /// Stores a persistent session's subscriptions and cursors if they
    /// changed. `last`: the connection is ending, and a newer session with
    /// the same client id may have written since (then this one's write is
    /// refused, as it should be). While connected, a refused write means
    /// another node wrote after this session loaded (an older session
    /// ending): this one reloads the position and writes again.
    async fn save_session(&mut self, last: bool) {
        let Some(persist) = &self.persist else { return };
        // Not yet had: unacknowledged, queued to write, still to be read
        // back by a replay, or dropped from the outbox and not yet replayed.
        let replaying: Vec<(Arc<str>, u64)> = self
            .replay
            .iter()
            .map(|r| (r.stream.clone(), r.next))
            .chain(self.overflowed.iter().map(|(s, q)| (s.clone(), *q)))
            .chain(self.overflow.pending())
            .collect();
        let pending = self
            .out_inflight
            .values()
            .filter(|o| !o.released)
            .filter_map(|o| o.origin.as_ref())
            .chain(self.ready.iter().filter_map(|o| o.origin.as_ref()))
            .chain(replaying.iter());
        // Positions first, then the queue: what a position covers was
        // queued before it was published.
        let positions: std::collections::HashMap<String, u64> = persist
            .record
            .cursors
            .keys()
            .filter_map(|s| self.shared.broker.position(s).map(|p| (s.clone(), p)))
            .collect();
        let pending: Vec<_> = pending.collect();
        let idle = self.replay.is_empty() && self.outbox.as_ref().is_some_and(|o| o.is_empty());
        let delivered = persist.cursors(pending.iter().copied(), |_| None);
        let cursors = persist.cursors(pending.into_iter(), |s| if idle { positions.get(s).copied() } else { None });
        // Messages the session never matched move its cursors only now and
        // then (and at the end): a session that receives nothing costs no
        // writes, however busy the streams.
        let far =
            cursors.iter().any(|(s, c)| *c >= persist.record.cursors.get(s).copied().unwrap_or(0) + IDLE_SAVE_GAP);
        let changed = delivered != persist.record.cursors || far || (last && cursors != persist.record.cursors);
        if !changed && !persist.subs_changed && persist.seq.is_some() {
            return;
        }
        let store = self.shared.session_store.clone();
        let client = self.client_id.clone();
        let Some(persist) = &mut self.persist else { return };
        persist.record.cursors = cursors;
        let mut result = store.save(&client, &mut persist.record, persist.seq).await;
        if result.is_err() && !last {
            if let Ok(current) = store.load(&client).await {
                let expected = current.map(|(_, seq)| seq);
                result = store.save(&client, &mut persist.record, expected).await;
            }
        }
        match result {
            Ok(seq) => {
                persist.seq = Some(seq);
                persist.subs_changed = false;
                metrics::counter!(crate::internal_events::names::MQTT_SESSION_SAVES_TOTAL).increment(1);
            }
            Err(e) => {
                metrics::counter!(crate::internal_events::names::MQTT_SESSION_SAVE_FAILED_TOTAL).increment(1);
                let level_debug = last;
                if level_debug {
                    tracing::debug!(%client, error = %fluxmesh_mesh::error_chain(&e), "final session save refused (a newer session took over?)");
                } else {
                    tracing::warn!(%client, error = %fluxmesh_mesh::error_chain(&e), "cannot store the session; retrying");
                }
            }
        }
    }

    /// Checks a CONNECT's will like a publish (topic, plain topics, ACL,
    /// size) and keeps it in NATS, so that it is published even if this
    /// node dies. Refused: CONNACK "not authorized"; not kept: "server
    /// unavailable".
    async fn accept_will(&mut self, will: codec::WillIn) -> Result<(super::wills::Will, u64), End> {
        let topic_ok = DeviceTopic::parse(&will.topic).is_ok()
            || (PlainTopic::parse(&will.topic).is_ok() && self.plain_allowed(&will.topic));
        let allowed = topic_ok
            && !self.topic_denied(&will.topic)
            && self.grant.may_publish(&will.topic)
            && will.payload.len() <= self.shared.max_payload;
        if !allowed {
            if topic_ok {
                self.acl_denied("will", &will.topic);
            }
            self.refuse(reason::NOT_AUTHORIZED).await;
            return Err(End::Protocol("will_refused", format!("will on `{}` is not allowed", will.topic)));
        }
        let will = super::wills::Will {
            topic: will.topic,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            id: fluxmesh_schemas::FrameId::new_v7(),
            props: will.props.map(|p| p.to_header()),
            expiry: will.expiry,
        };
        match self.shared.wills.keep(&self.client_id, &will).await {
            Ok(seq) => Ok((will, seq)),
            Err(e) => {
                self.refuse(reason::SERVER_UNAVAILABLE).await;
                Err(End::WillNotKept(e))
            }
        }
    }

    /// After the connection: a DISCONNECT discards the will; any other end
    /// publishes it, after its MQTT 5 delay (at most the session's
    /// expiry) unless the client connects again meanwhile. Then its record
    /// is cleared.
    async fn end_will(&mut self, end: &End) {
        let Some((will, seq)) = self.will.take() else { return };
        let delay = self.will_delay.min(self.session_expiry);
        let publish = match end {
            End::Disconnect => false,
            // The client is back already, and its session with it.
            End::TakenOver => delay == 0,
            _ => true,
        };
        let publish = publish
            && (delay == 0 || matches!(end, End::Stopped) || {
                let (shared, client) = (self.shared.clone(), self.client_id.clone());
                wait_will_delay(shared, client, self.session_id, delay).await
            });
        if publish {
            let published =
                tokio::time::timeout(DRAIN_TIMEOUT, self.shared.wills.publish(&self.client_id, &will, end.reason()))
                    .await;
            let failed = match published {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(fluxmesh_mesh::error_chain(&e)),
                Err(_) => Some(format!("not stored within {DRAIN_TIMEOUT:?}")),
            };
            if let Some(error) = failed {
                // The record stays: if this node dies, another publishes it.
                metrics::counter!(crate::internal_events::names::MQTT_WILL_PUBLISH_FAILED_TOTAL).increment(1);
                tracing::error!(client = %self.client_id, topic = %will.topic, %error, "cannot publish a will");
                return;
            }
        }
        self.shared.wills.clear(&self.client_id, seq).await;
    }

    /// Whether `mqtt.deny_topics` keeps every client off `topic`.
    fn topic_denied(&self, topic: &str) -> bool {
        self.shared.config.deny_topics.iter().any(|f| rumqttc::mqttbytes::matches(topic, f))
    }

    /// Whether `mqtt.plain_topics` lets clients use plain topic `topic`.
    fn plain_allowed(&self, topic: &str) -> bool {
        self.shared.config.plain_topics.iter().any(|f| rumqttc::mqttbytes::matches(topic, f))
    }

    /// Refuses the CONNECT with `code` (an MQTT 5 reason; 3.1.1 gets its
    /// nearest return code).
    async fn refuse(&mut self, code: u8) {
        self.codec.connack(&mut self.wbuf, false, code, None);
        let _ = self.flush().await;
    }

    /// Tells an MQTT 5 client why the server ends the connection.
    async fn say_disconnect(&mut self, end: &End) {
        let Some(code) = end.disconnect_code() else { return };
        if self.codec.version != Version::V5 {
            return;
        }
        self.codec.disconnect(&mut self.wbuf, code);
        // A lingering close: send FIN after the DISCONNECT, then read what
        // the client still sends until it closes too. Closing with unread
        // bytes would make the kernel send RST, and a client that gets RST
        // may never read the DISCONNECT.
        let linger = async {
            self.flush().await.ok()?;
            self.socket.shutdown().await.ok()?;
            let mut sink = [0u8; 4096];
            while self.socket.read(&mut sink).await.ok()? > 0 {}
            Some(())
        };
        let _ = tokio::time::timeout(LINGER, linger).await;
    }

    async fn run(&mut self, session: &Session) -> End {
        let mut draining: Option<(Instant, End)> = None;
        let mut keep_alive_at = self.keep_alive.map(|k| Instant::now() + k);
        let save_every = Duration::from_millis(self.shared.config.session_save_interval_ms);
        let mut save_at = Instant::now() + save_every;
        loop {
            if let Err(end) = self.parse_and_handle(draining.is_some()).await {
                return end;
            }
            if let Err(end) = self.start_next() {
                return end;
            }
            while draining.is_none() && self.out_room() {
                let Some(out) = self.ready.pop_front() else { break };
                self.write_delivery(out);
            }
            if let Err(end) = self.flush().await {
                return end;
            }
            for share in std::mem::take(&mut self.shares_done) {
                share.done().await;
            }
            let idle = self.backlog.is_empty() && self.submitting.is_none() && self.pending.is_empty();
            if idle {
                match self.disconnecting {
                    Some(reason::DISCONNECT_WITH_WILL) => return End::DisconnectWithWill,
                    Some(_) => return End::Disconnect,
                    None => {}
                }
            }
            if let Some((_, end)) = &draining {
                if idle {
                    return match end {
                        End::TakenOver => End::TakenOver,
                        End::Revoked => End::Revoked,
                        _ => End::Stopped,
                    };
                }
            }
            let can_read = draining.is_none() && self.disconnecting.is_none() && self.backlog_has_room();
            if !can_read {
                // We are holding the device back (backpressure), so its
                // PINGREQs sit unread: keep-alive counts only while we read.
                keep_alive_at = self.keep_alive.map(|k| Instant::now() + k);
            }
            let far = Instant::now() + Duration::from_secs(86_400);
            let ka_deadline = keep_alive_at.unwrap_or(far);
            let throttle_deadline = self.throttled_until.unwrap_or(far);
            let drain_deadline = draining.as_ref().map(|(at, _)| *at).unwrap_or(far);
            tokio::select! {
                biased;
                _ = self.shared.stop.cancelled(), if draining.is_none() => {
                    draining = Some((Instant::now() + DRAIN_TIMEOUT, End::Stopped));
                }
                _ = session.end.cancelled(), if draining.is_none() => {
                    let end = if session.revoked.load(Ordering::Acquire) { End::Revoked } else { End::TakenOver };
                    draining = Some((Instant::now() + DRAIN_TIMEOUT, end));
                }
                _ = tokio::time::sleep_until(throttle_deadline), if self.throttled_until.is_some() => {
                    self.throttled_until = None;
                }
                Some((reply, outcome)) = self.pending.next(), if !self.pending.is_empty() => {
                    if let Err(end) = self.settle(reply, outcome) {
                        return end;
                    }
                    // Take every ack that is already in, so they go out in
                    // one write rather than one syscall each.
                    while let Some(Some((reply, outcome))) = self.pending.next().now_or_never() {
                        if let Err(end) = self.settle(reply, outcome) {
                            return end;
                        }
                    }
                }
                Submitted(settle) = async { self.submitting.as_mut().expect("guarded by is_some").await }, if self.submitting.is_some() => {
                    self.submitting = None;
                    self.pending.push_back(settle);
                }
                read = self.socket.read_buf(&mut self.rbuf), if can_read => match read {
                    Ok(0) => return End::PeerClosed,
                    Ok(_) => keep_alive_at = self.keep_alive.map(|k| Instant::now() + k),
                    Err(e) => return End::Io(e),
                },
                _ = self.overflow.notify.notified(), if draining.is_none() => {
                    self.overflowed_again();
                }
                Some(out) = next_outgoing(&mut self.outbox), if draining.is_none() && self.replay.is_empty() && self.out_room() => {
                    self.write_live(out);
                    // Take what else is queued, so it goes out in one write.
                    while self.out_room() {
                        let Some(Some(out)) = next_outgoing(&mut self.outbox).now_or_never() else { break };
                        self.write_live(out);
                    }
                }
                read = next_replayed(&mut self.replay, &self.shared.broker, self.session_id), if draining.is_none() && !self.replay.is_empty() && self.ready.len() < usize::from(self.shared.config.max_inflight_out) => {
                    self.replayed(read).await;
                }
                _ = tokio::time::sleep_until(save_at), if self.persist.is_some() && draining.is_none() => {
                    self.save_session(false).await;
                    save_at = Instant::now() + save_every;
                }
                Some(command) = next_command(&mut self.commands), if draining.is_none() && !self.cmd_filters.is_empty() && self.awaiting_puback.len() < COMMANDS_IN_FLIGHT && self.out_room() => {
                    self.write_command(command);
                }
                _ = tokio::time::sleep_until(ka_deadline), if can_read && keep_alive_at.is_some() => {
                    return End::KeepAlive;
                }
                _ = tokio::time::sleep_until(drain_deadline), if draining.is_some() => {
                    tracing::warn!(client = %self.client_id, pending = self.pending.len(), "connection drain deadline reached");
                    return End::Stopped;
                }
            }
        }
    }

    /// Room for one more QoS 1/2 message to the client (commands included).
    fn out_room(&self) -> bool {
        let max = usize::from(self.shared.config.max_inflight_out).min(self.limits.receive_maximum);
        self.out_inflight.len() + self.awaiting_puback.len() < max
    }

    /// Room for one more publish awaiting its JetStream ack.
    fn has_room(&self) -> bool {
        self.pending.len() < self.shared.config.max_inflight
    }

    /// Room for one more parsed publish.
    fn backlog_has_room(&self) -> bool {
        self.backlog.is_empty()
            || (self.backlog.len() < self.shared.config.max_inflight && self.backlog_bytes < BACKLOG_BYTES)
    }

    /// Starts submitting backlogged publishes while there is room and the
    /// device has rate tokens. Out of tokens, the backlog waits (and, once
    /// full, the socket is not read: the device is slowed, not refused).
    fn start_next(&mut self) -> Result<(), End> {
        while self.submitting.is_none() && self.has_room() && self.throttled_until.is_none() {
            if self.backlog.is_empty() {
                return Ok(());
            }
            if let Some(limiter) = &self.limiter {
                if let Err(wait) = limiter.check() {
                    metrics::counter!(crate::internal_events::names::INGEST_THROTTLED_TOTAL, "source" => "mqtt")
                        .increment(1);
                    self.throttled_until = Some(Instant::now() + wait);
                    return Ok(());
                }
            }
            let Some(publish) = self.backlog.pop_front() else { return Ok(()) };
            self.backlog_bytes -= publish.payload.len() + publish.topic.len();
            self.publish(publish)?;
        }
        Ok(())
    }

    /// Counts and logs an ACL refusal (the first on a connection at warn,
    /// the rest at debug, so a misbehaving device cannot flood the log).
    fn acl_denied(&mut self, action: &'static str, topic: &str) {
        metrics::counter!(crate::internal_events::names::ACL_DENIED_TOTAL, "action" => action).increment(1);
        self.denied += 1;
        if self.denied == 1 {
            tracing::warn!(client = %self.client_id, peer = %self.peer, action, topic, "refused by the device's ACL");
        } else {
            tracing::debug!(client = %self.client_id, action, topic, count = self.denied, "refused by the device's ACL");
        }
    }

    async fn read_more(&mut self) -> Result<(), End> {
        match self.socket.read_buf(&mut self.rbuf).await {
            Ok(0) => Err(End::PeerClosed),
            Ok(_) => Ok(()),
            Err(e) => Err(End::Io(e)),
        }
    }

    /// Handles the complete packets already read: publishes join the
    /// backlog (while it has room), everything else is answered at once.
    async fn parse_and_handle(&mut self, draining: bool) -> Result<(), End> {
        while !draining && self.disconnecting.is_none() && self.backlog_has_room() {
            let packet = match codec::read(Some(self.codec.version), &mut self.rbuf, self.max_packet) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(codec::DecodeError::TooLarge(size)) => {
                    internal_events::rejected(Source::Mqtt, "oversize", &format!("packet of {size} bytes"));
                    return Err(End::Protocol("oversize", format!("packet of {size} bytes is over the limit")));
                }
                Err(e) => return Err(End::Protocol("malformed_packet", fluxmesh_mesh::error_chain(&e))),
            };
            self.handle(packet).await?;
        }
        Ok(())
    }

    async fn handle(&mut self, packet: Inbound) -> Result<(), End> {
        match packet {
            Inbound::Publish(publish) => self.received(publish)?,
            Inbound::PubRel(pkid) => {
                self.awaiting_rel.remove(&pkid);
                self.in_flows.remove(&pkid);
                self.codec.pubcomp(&mut self.wbuf, pkid);
            }
            Inbound::Subscribe { pkid, filters, id } => self.subscribe_packet(pkid, filters, id).await,
            Inbound::Unsubscribe { pkid, filters } => {
                let mut existed = Vec::with_capacity(filters.len());
                for topic in &filters {
                    let mut found = false;
                    if self.cmd_filters.remove(topic).is_some() {
                        found = true;
                        if self.cmd_filters.is_empty() {
                            // No more commands here: the command service
                            // queues them until the device subscribes again.
                            self.cmd_ready.store(false, Ordering::Release);
                        }
                    }
                    if self.subscriptions.remove(topic).is_some() {
                        found = true;
                        self.shared.broker.unsubscribe(self.session_id, topic);
                    }
                    if self.share_subs.remove(topic).is_some() {
                        found = true;
                        if let Some((group, filter)) = super::shared::parse(topic) {
                            self.shared.shares.leave(self.session_id, group, filter).await;
                        }
                    }
                    if let Some(persist) = &mut self.persist {
                        persist.record.opts.remove(topic);
                        persist.subs_changed |= persist.record.subs.remove(topic).is_some();
                    }
                    existed.push(found);
                }
                self.sub_extras = self.subscriptions.values().any(SubOpts::has_extras);
                // Stored before the UNSUBACK, like a subscription.
                self.save_session(false).await;
                self.codec.unsuback(&mut self.wbuf, pkid, &existed);
            }
            Inbound::PingReq => self.codec.pingresp(&mut self.wbuf),
            // Publishes read before it are still stored and acknowledged.
            Inbound::Disconnect { reason, session_expiry } => {
                if let Some(expiry) = session_expiry {
                    if self.session_expiry == 0 && expiry > 0 {
                        // MQTT 5 3.14.2.2.2: a session that was to end with
                        // its connection cannot be kept at DISCONNECT.
                        return Err(End::Protocol("session_expiry", "DISCONNECT set a session expiry after 0".into()));
                    }
                    self.session_expiry = expiry;
                }
                self.disconnecting = Some(reason);
            }
            Inbound::PubAck(pkid) => {
                if let Some(done) = self.awaiting_puback.remove(&pkid) {
                    let _ = done.send(Ok(()));
                } else if self.out_inflight.get(&pkid).is_some_and(|o| o.qos == QoS::AtLeastOnce) {
                    if let Some(share) = self.out_inflight.remove(&pkid).and_then(|o| o.share) {
                        share.done().await;
                    }
                }
            }
            Inbound::PubRec { pkid, failed } => {
                if let Some(out) = self.out_inflight.get_mut(&pkid).filter(|o| o.qos == QoS::ExactlyOnce) {
                    out.released = true;
                    if let Some(share) = out.share.take() {
                        share.done().await;
                    }
                }
                if failed {
                    // MQTT 5: the client refused it; the exchange ends here.
                    self.out_inflight.remove(&pkid);
                } else {
                    // Answered even for an id we do not know: the client
                    // may hold it from before a reconnect.
                    self.codec.pubrel(&mut self.wbuf, pkid);
                }
            }
            Inbound::PubComp(pkid) => {
                if self.out_inflight.get(&pkid).is_some_and(|o| o.released) {
                    self.out_inflight.remove(&pkid);
                }
            }
            Inbound::Connect(_) => {
                return Err(End::Protocol("second_connect", "CONNECT on a connected session".into()))
            }
            Inbound::Auth => {
                return Err(End::Protocol("unexpected_packet", "AUTH, but no authentication method was set".into()))
            }
            Inbound::Unexpected(what) => {
                return Err(End::Protocol("unexpected_packet", format!("{what} from a client")))
            }
        }
        Ok(())
    }

    /// A PUBLISH from the client: its topic alias resolved, counted against
    /// the receive maximum, then queued for submitting.
    fn received(&mut self, mut publish: PublishIn) -> Result<(), End> {
        if publish.topic.contains('\0') {
            // MQTT 3.1.1 section 1.5.3: a string with U+0000 closes the
            // connection.
            return Err(End::Protocol("null_in_topic", "topic contains U+0000".into()));
        }
        if let Some(alias) = publish.alias {
            if alias == 0 || alias > self.shared.config.topic_alias_max {
                return Err(End::Protocol("topic_alias_invalid", format!("topic alias {alias} is out of range")));
            }
            if publish.topic.is_empty() {
                match self.limits.in_aliases.get(&alias) {
                    Some(topic) => publish.topic.clone_from(topic),
                    None => {
                        return Err(End::Protocol("topic_alias_unknown", format!("topic alias {alias} was never set")))
                    }
                }
            } else {
                self.limits.in_aliases.insert(alias, publish.topic.clone());
            }
        } else if publish.topic.is_empty() && self.codec.version == Version::V5 {
            return Err(End::Protocol("empty_topic", "PUBLISH without a topic or a topic alias".into()));
        }
        if publish.qos != QoS::AtMostOnce
            && !self.awaiting_rel.contains(&publish.pkid)
            && self.in_flows.insert(publish.pkid)
            && self.codec.version == Version::V5
            && self.in_flows.len() > self.shared.config.max_inflight
        {
            return Err(End::Protocol(
                "receive_maximum",
                format!("more than {} QoS 1/2 publishes unacknowledged", self.shared.config.max_inflight),
            ));
        }
        self.backlog_bytes += publish.payload.len() + publish.topic.len();
        self.backlog.push_back(publish);
        Ok(())
    }

    /// A SUBSCRIBE: each filter judged, a persistent session's new filters
    /// stored in one write, then served, then one SUBACK.
    async fn subscribe_packet(&mut self, pkid: u16, filters: Vec<FilterIn>, id: Option<u32>) {
        let mut verdicts: Vec<Result<(), u8>> = Vec::with_capacity(filters.len());
        for filter in &filters {
            // A shared subscription is judged by its filter.
            let shared = super::shared::parse(&filter.path);
            let judged = shared.map_or(filter.path.as_str(), |(_, f)| f);
            let denied = self.shared.config.deny_topics.iter().any(|d| crate::auth::acl::within(judged, d));
            let verdict = if !valid_filter(&filter.path) || (shared.is_some() && filter.no_local) {
                Err(reason::TOPIC_FILTER_INVALID)
            } else if denied {
                metrics::counter!(crate::internal_events::names::MQTT_DENIED_TOPICS_TOTAL, "action" => "subscribe")
                    .increment(1);
                tracing::debug!(client = %self.client_id, filter = %filter.path, "subscription refused by mqtt.deny_topics");
                Err(reason::UNSPECIFIED)
            } else if !self.grant.may_subscribe(judged) {
                self.acl_denied("subscribe", &filter.path);
                Err(reason::NOT_AUTHORIZED)
            } else {
                Ok(())
            };
            verdicts.push(verdict);
        }
        let opts_of =
            |f: &FilterIn| SubOpts { qos: f.qos, no_local: f.no_local, retain_as_published: f.retain_as_published, id };
        // A persistent session stores the packet's new filters in one
        // write, before any of them is served or acknowledged.
        if self.persist.is_some() {
            let new: Vec<(String, SubOpts)> = filters
                .iter()
                .zip(&verdicts)
                .filter(|(_, ok)| ok.is_ok())
                .map(|(f, _)| (f.path.clone(), opts_of(f)))
                .collect();
            if !new.is_empty() && !self.remember(&new).await {
                verdicts.iter_mut().for_each(|v| *v = Err(reason::UNSPECIFIED));
            }
        }
        let mut results = Vec::with_capacity(filters.len());
        for (filter, verdict) in filters.iter().zip(verdicts) {
            let granted = match verdict {
                Ok(()) => self.subscribe(filter, opts_of(filter)).await.ok_or(reason::UNSPECIFIED),
                Err(code) => Err(code),
            };
            results.push(granted);
        }
        self.sub_extras = self.subscriptions.values().any(SubOpts::has_extras);
        self.codec.suback(&mut self.wbuf, pkid, &results);
    }

    fn publish(&mut self, publish: PublishIn) -> Result<(), End> {
        let reply = match publish.qos {
            QoS::AtMostOnce => Reply::Nothing,
            QoS::AtLeastOnce => Reply::PubAck(publish.pkid),
            QoS::ExactlyOnce => {
                if !self.awaiting_rel.insert(publish.pkid) {
                    // A resend of a QoS2 message this session already stored.
                    self.pending.push_back(settled(Reply::PubRec(publish.pkid), Outcome::Duplicate));
                    return Ok(());
                }
                Reply::PubRec(publish.pkid)
            }
        };
        // Malformed topics are refused (and counted by reason) when
        // submitted; the ACL and `mqtt.plain_topics` judge the others.
        let device = DeviceTopic::parse(&publish.topic).is_ok();
        let plain = !device && PlainTopic::parse(&publish.topic).is_ok();
        if self.topic_denied(&publish.topic) {
            metrics::counter!(crate::internal_events::names::MQTT_DENIED_TOPICS_TOTAL, "action" => "publish")
                .increment(1);
            tracing::debug!(client = %self.client_id, topic = %publish.topic, "publish refused by mqtt.deny_topics");
            self.pending.push_back(settled(reply, Outcome::Refused(reason::NOT_AUTHORIZED)));
            return Ok(());
        }
        if plain && !self.plain_allowed(&publish.topic) {
            metrics::counter!(crate::internal_events::names::INGEST_REJECTED_TOTAL, "source" => "mqtt", "reason" => "plain_topic_off")
                .increment(1);
            tracing::debug!(client = %self.client_id, topic = %publish.topic, "plain topic refused by mqtt.plain_topics");
            self.pending.push_back(settled(reply, Outcome::Refused(reason::TOPIC_NAME_INVALID)));
            return Ok(());
        }
        if (device || plain) && !self.grant.may_publish(&publish.topic) {
            self.acl_denied("publish", &publish.topic);
            if self.shared.auth.cfg.disconnect_on_deny() {
                return Err(End::Protocol("acl_denied", format!("publish to `{}` is outside its ACL", publish.topic)));
            }
            self.pending.push_back(settled(reply, Outcome::Refused(reason::NOT_AUTHORIZED)));
            return Ok(());
        }
        if publish.props.as_ref().is_some_and(|p| p.payload_format_invalid(&publish.payload)) {
            internal_events::rejected(
                Source::Mqtt,
                "payload_format",
                &"payload format 1 (UTF-8) but the payload is not",
            );
            self.pending.push_back(settled(reply, Outcome::Refused(reason::PAYLOAD_FORMAT_INVALID)));
            return Ok(());
        }
        let meta = crate::ingress::MqttMeta {
            props: publish.props.as_ref().map(super::props::MessageProps::to_header),
            expires_ms: publish.expiry.map(|s| super::props::now_ms() + u64::from(s) * 1000),
            // Stamped while the client could receive its own message on a
            // no-local subscription.
            client: (self.sub_extras && self.subscriptions.values().any(|o| o.no_local))
                .then(|| self.client_id.clone()),
        };
        let ingress = self.shared.ingress.clone();
        let qos = publish.qos as u8;
        let PublishIn { topic, payload, retain, .. } = publish;
        let meta = (!meta.is_empty()).then_some(meta);
        self.submitting = Some(Box::pin(submit(ingress, topic, payload, qos, retain, meta, reply)));
        Ok(())
    }

    fn settle(&mut self, reply: Reply, outcome: Outcome) -> Result<(), End> {
        let code = match outcome {
            Outcome::Stored | Outcome::Duplicate => reason::SUCCESS,
            Outcome::Refused(code) => code,
            Outcome::Failed(e) => return Err(End::NotStored(e)),
        };
        match reply {
            Reply::Nothing => {}
            Reply::PubAck(pkid) => {
                self.in_flows.remove(&pkid);
                self.codec.puback(&mut self.wbuf, pkid, code);
            }
            Reply::PubRec(pkid) => {
                if code >= 0x80 && self.codec.version == Version::V5 {
                    // MQTT 5 4.3.3: a refused QoS 2 message ends at its
                    // PUBREC; no PUBREL follows.
                    self.awaiting_rel.remove(&pkid);
                    self.in_flows.remove(&pkid);
                }
                self.codec.pubrec(&mut self.wbuf, pkid, code);
            }
        }
        Ok(())
    }

    /// Writes a command as a PUBLISH on `devices/{id}/cmd`, at the highest
    /// QoS its subscriptions were granted. At QoS 0 the command counts as
    /// delivered once written: the device acknowledges nothing.
    fn write_command(&mut self, command: OutCommand) {
        let topic = format!("devices/{}/{}", self.client_id, fluxmesh_schemas::subject::COMMAND_CHANNEL);
        let qos = self.cmd_filters.values().fold(QoS::AtMostOnce, |a, b| if *b > a { *b } else { a });
        let pkid = if qos == QoS::AtMostOnce { 0 } else { self.next_packet_id() };
        let out = PublishOut {
            topic: &topic,
            payload: command.payload,
            qos,
            retain: false,
            pkid,
            alias: None,
            props: None,
            expiry: None,
            subscription_ids: Vec::new(),
        };
        self.codec.publish(&mut self.wbuf, out);
        if qos == QoS::AtMostOnce {
            let _ = command.done.send(Ok(()));
        } else {
            self.awaiting_puback.insert(pkid, command.done);
        }
    }

    /// A packet id no message to the client is using.
    fn next_packet_id(&mut self) -> u16 {
        let mut pkid = self.next_pkid;
        while pkid == 0 || self.awaiting_puback.contains_key(&pkid) || self.out_inflight.contains_key(&pkid) {
            pkid = pkid.wrapping_add(1);
        }
        self.next_pkid = pkid.wrapping_add(1);
        pkid
    }

    /// Writes one message from the outbox, unless a resumed session's
    /// replay already sent it.
    fn write_live(&mut self, out: Outgoing) {
        if let Some((stream, seq)) = &out.origin {
            if self.replay_floor.get(stream).is_some_and(|floor| seq <= floor) {
                return;
            }
        }
        self.write_delivery(out);
    }

    /// Writes one message at the QoS it was given; for MQTT 5, with what
    /// the matching subscriptions' options make of it. Whatever is not
    /// written (expired, no-local, over the client's maximum packet size)
    /// still counts as had, for a persistent session's cursors.
    fn write_delivery(&mut self, out: Outgoing) {
        if let Some((stream, seq)) = &out.origin {
            let written = self.written_live.entry(stream.clone()).or_insert(0);
            *written = (*written).max(*seq);
            if let Some(persist) = &mut self.persist {
                let written = persist.written.entry(stream.clone()).or_insert(0);
                *written = (*written).max(*seq);
            }
        }
        let message = out.message.clone();
        let now = super::props::now_ms();
        let mut qos = qos_of(out.qos);
        let mut retain = out.retain;
        let mut subscription_ids = Vec::new();
        let skip = if message.expired(now) {
            Some("expired")
        } else if self.sub_extras && out.share.is_none() {
            let own =
                message.client.as_deref() == Some(fluxmesh_schemas::subject::escape_token(&self.client_id).as_ref());
            let mut best: Option<QoS> = None;
            for (filter, opts) in &self.subscriptions {
                if (own && opts.no_local) || !super::topics::matches(&message.topic, filter) {
                    continue;
                }
                best = Some(best.map_or(opts.qos, |b| if opts.qos > b { opts.qos } else { b }));
                retain |= opts.retain_as_published && message.retain;
                subscription_ids.extend(opts.id.map(|id| id as usize));
            }
            match best {
                Some(best) => {
                    qos = qos_of(message.qos.min(best as u8));
                    None
                }
                // Only matched by no-local subscriptions, or no longer.
                None if own => Some("no_local"),
                None => Some("unsubscribed"),
            }
        } else {
            None
        };
        let expiry =
            message.expires_ms.map(|at| u32::try_from(at.saturating_sub(now).div_ceil(1000)).unwrap_or(u32::MAX));
        let mut publish = PublishOut {
            topic: &message.topic,
            payload: message.payload.clone(),
            qos,
            retain,
            pkid: 0,
            alias: None,
            props: message.props.as_ref(),
            expiry,
            subscription_ids,
        };
        let skip = skip.or_else(|| {
            (self.limits.max_packet != usize::MAX && self.codec.publish_size(&publish) > self.limits.max_packet)
                .then_some("too_large_for_client")
        });
        if let Some(why) = skip {
            metrics::counter!(crate::internal_events::names::MQTT_DELIVERIES_SKIPPED_TOTAL, "reason" => why)
                .increment(1);
            if let Some(share) = out.share {
                self.shares_done.push(share);
            }
            return;
        }
        // MQTT 5 topic aliases, while the client takes more.
        if self.limits.alias_max > 0 {
            match self.limits.out_aliases.get(&message.topic) {
                Some(alias) => {
                    publish.alias = Some(*alias);
                    publish.topic = "";
                }
                None if self.limits.out_aliases.len() < usize::from(self.limits.alias_max) => {
                    let alias = u16::try_from(self.limits.out_aliases.len() + 1).unwrap_or(u16::MAX);
                    self.limits.out_aliases.insert(message.topic.clone(), alias);
                    publish.alias = Some(alias);
                }
                None => {}
            }
        }
        if qos != QoS::AtMostOnce {
            publish.pkid = self.next_packet_id();
            let flight = OutFlight { qos, released: false, origin: out.origin, share: out.share };
            self.out_inflight.insert(publish.pkid, flight);
        } else if let Some(share) = out.share {
            self.shares_done.push(share);
        }
        self.codec.publish(&mut self.wbuf, publish);
        metrics::counter!(crate::internal_events::names::MQTT_DELIVERIES_TOTAL, "qos" => qos_label(qos)).increment(1);
    }

    /// Subscribes to `filter`; the QoS granted, or `None` if refused.
    ///
    /// A filter that matches the device's own command topic turns commands
    /// on: they go straight to this connection (commands are not in any
    /// stream), at QoS 1 unless the filter was granted QoS 0. The command
    /// topic itself is granted up to QoS 1 and serves nothing else; a wider
    /// filter (say `#`) is also a subscription in the node's broker.
    /// Retained messages follow the SUBACK as MQTT 5's retain handling says
    /// (3.1.1: always).
    async fn subscribe(&mut self, filter: &FilterIn, opts: SubOpts) -> Option<QoS> {
        let path = filter.path.as_str();
        let cmd_topic = format!("devices/{}/{}", self.client_id, fluxmesh_schemas::subject::COMMAND_CHANNEL);
        if path == cmd_topic {
            let to_commands = if opts.qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
            self.commands_on(path, to_commands);
            return Some(to_commands);
        }
        let existed = self.subscriptions.contains_key(path) || self.share_subs.contains_key(path);
        self.activate(path, opts).await?;
        if super::shared::parse(path).is_some() {
            // Shared subscriptions get no retained messages (MQTT 5 4.8.2).
            return Some(opts.qos);
        }
        let send_retained = match filter.retain_handling {
            0 => true,
            1 => !existed,
            _ => false,
        };
        if !send_retained {
            return Some(opts.qos);
        }
        let room = self.shared.config.session_queue.saturating_sub(self.ready.len());
        match self.shared.broker.retained(path, opts.qos as u8, room).await {
            Ok(found) => self.ready.extend(found),
            Err(e) => {
                // The subscription stands; only its retained messages are
                // missing, and the operator hears of it.
                metrics::counter!(crate::internal_events::names::MQTT_RETAINED_READ_FAILED_TOTAL).increment(1);
                tracing::warn!(client = %self.client_id, filter = %path, error = %fluxmesh_mesh::error_chain(&e), "cannot read the retained messages for a subscription");
            }
        }
        Some(opts.qos)
    }

    /// Puts `filter` into the node's broker for this session (and turns
    /// commands on if it matches the command topic); `None` if refused.
    async fn activate(&mut self, filter: &str, opts: SubOpts) -> Option<()> {
        let qos = opts.qos;
        let cmd_topic = format!("devices/{}/{}", self.client_id, fluxmesh_schemas::subject::COMMAND_CHANNEL);
        let to_commands = if qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
        if filter == cmd_topic {
            self.commands_on(filter, to_commands);
            return Some(());
        }
        let outbox = self.outbox_tx.clone()?;
        if let Some((group, inner)) = super::shared::parse(filter) {
            if let Err(e) = self.shared.shares.join(self.session_id, group, inner, qos as u8, outbox).await {
                tracing::warn!(client = %self.client_id, %filter, error = %fluxmesh_mesh::error_chain(&e), "shared subscription refused: its group cannot be read");
                metrics::counter!(crate::internal_events::names::MQTT_SUBSCRIBE_FAILED_TOTAL).increment(1);
                return None;
            }
            self.share_subs.insert(filter.to_owned(), qos);
            return Some(());
        }
        let sub = Sub { qos: qos as u8, outbox, overflow: self.overflow.clone() };
        if let Err(e) = self.shared.broker.subscribe(self.session_id, filter, sub).await {
            tracing::warn!(client = %self.client_id, %filter, error = %fluxmesh_mesh::error_chain(&e), "subscription refused: its streams cannot be read");
            metrics::counter!(crate::internal_events::names::MQTT_SUBSCRIBE_FAILED_TOTAL).increment(1);
            return None;
        }
        // What the feeds handed out before now was not for this session.
        for stream in self.shared.broker.streams_for(filter) {
            if let Some(position) = self.shared.broker.position(&stream) {
                self.written_live.entry(stream.into()).or_insert(position);
            }
        }
        self.subscriptions.insert(filter.to_owned(), opts);
        self.sub_extras |= opts.has_extras();
        if rumqttc::mqttbytes::matches(&cmd_topic, filter) {
            self.commands_on(filter, to_commands);
        }
        Some(())
    }

    /// A persistent session stores a new subscription before its SUBACK,
    /// with a cursor at the end of each stream it can match that the
    /// session did not read yet: what is stored from now on is owed to it.
    async fn remember(&mut self, filters: &[(String, SubOpts)]) -> bool {
        let cmd_topic = format!("devices/{}/{}", self.client_id, fluxmesh_schemas::subject::COMMAND_CHANNEL);
        let mut streams = std::collections::BTreeSet::new();
        for (filter, _) in filters {
            streams.extend(self.shared.broker.streams_for(filter));
        }
        let mut ends = Vec::new();
        for stream in streams {
            if self.persist.as_ref().is_some_and(|p| p.record.cursors.contains_key(&stream)) {
                continue;
            }
            match self.shared.broker.last_seq(&stream).await {
                Ok(end) => ends.push((stream, end)),
                Err(e) => {
                    tracing::warn!(client = %self.client_id, error = %fluxmesh_mesh::error_chain(&e), "subscriptions refused: their streams cannot be read");
                    metrics::counter!(crate::internal_events::names::MQTT_SUBSCRIBE_FAILED_TOTAL).increment(1);
                    return false;
                }
            }
        }
        if let Some(persist) = &mut self.persist {
            for (filter, opts) in filters {
                // The command topic is granted at most QoS 1.
                let qos = if *filter == cmd_topic { (opts.qos as u8).min(1) } else { opts.qos as u8 };
                persist.record.subs.insert(filter.clone(), qos);
                if opts.has_extras() {
                    let stored =
                        super::sessions::StoredOpts { nl: opts.no_local, rap: opts.retain_as_published, id: opts.id };
                    persist.record.opts.insert(filter.clone(), stored);
                } else {
                    persist.record.opts.remove(filter);
                }
            }
            persist.record.cursors.extend(ends);
            persist.subs_changed = true;
        }
        self.save_session(false).await;
        self.persist.as_ref().is_some_and(|p| !p.subs_changed)
    }

    /// Leaves this session's share groups, and gives back to them the
    /// messages the client did not acknowledge (or was never sent), so
    /// another member gets them now.
    async fn leave_shares(&mut self) {
        for (filter, _) in std::mem::take(&mut self.share_subs) {
            if let Some((group, inner)) = super::shared::parse(&filter) {
                self.shared.shares.leave(self.session_id, group, inner).await;
            }
        }
        let unacked: Vec<_> = self.out_inflight.values_mut().filter_map(|o| o.share.take()).collect();
        for share in unacked {
            share.give_back().await;
        }
        if let Some(outbox) = &mut self.outbox {
            outbox.close();
            while let Ok(out) = outbox.try_recv() {
                if let Some(share) = out.share {
                    share.give_back().await;
                }
            }
        }
    }

    /// Removes this session's subscriptions from the node's broker.
    fn leave_broker(&mut self) {
        for (filter, _) in self.subscriptions.drain() {
            self.shared.broker.unsubscribe(self.session_id, &filter);
        }
    }

    /// Commands flow through `filter` at `qos`; the command service hears
    /// that this device now takes commands here.
    fn commands_on(&mut self, filter: &str, qos: QoS) {
        self.cmd_filters.insert(filter.to_owned(), qos);
        self.cmd_ready.store(true, Ordering::Release);
        let _ = self.shared.cmd_ready.try_send(self.client_id.clone());
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(WRITE_TIMEOUT, self.socket.write_all(&self.wbuf)).await {
            Ok(Ok(())) => {
                self.wbuf.clear();
                Ok(())
            }
            Ok(Err(e)) => Err(End::Io(e)),
            Err(_) => {
                Err(End::Protocol("write_timeout", format!("device left our writes unread for {WRITE_TIMEOUT:?}")))
            }
        }
    }

    fn closed(&self, end: &End) {
        match end {
            End::Disconnect
            | End::DisconnectWithWill
            | End::PeerClosed
            | End::Stopped
            | End::TakenOver
            | End::Revoked => {
                tracing::debug!(client = %self.client_id, peer = %self.peer, reason = end.reason(), "MQTT connection closed");
            }
            End::Protocol(reason, detail) => {
                metrics::counter!(crate::internal_events::names::MQTT_PROTOCOL_ERRORS_TOTAL, "reason" => *reason)
                    .increment(1);
                tracing::warn!(client = %self.client_id, peer = %self.peer, reason, %detail, "MQTT connection closed: protocol error");
            }
            End::Session(e) => {
                tracing::warn!(client = %self.client_id, peer = %self.peer, error = %fluxmesh_mesh::error_chain(e),
                    "MQTT connection refused: its session could not be read or stored");
            }
            End::WillNotKept(e) => {
                tracing::warn!(client = %self.client_id, peer = %self.peer, error = %fluxmesh_mesh::error_chain(e),
                    "MQTT connection refused: its will could not be kept");
            }
            End::NotStored(e) => {
                tracing::error!(client = %self.client_id, peer = %self.peer, error = %fluxmesh_mesh::error_chain(&e),
                    "MQTT message could not be stored; closing without PUBACK so the device resends it");
            }
            End::Io(e) => {
                tracing::debug!(client = %self.client_id, peer = %self.peer, error = %fluxmesh_mesh::error_chain(&e), "MQTT connection I/O error")
            }
            End::KeepAlive => tracing::info!(client = %self.client_id, peer = %self.peer, "MQTT keep-alive expired"),
            // Counted and logged by the authenticator.
            End::Denied(_) => {}
        }
        metrics::counter!(crate::internal_events::names::MQTT_DISCONNECTS_TOTAL, "reason" => end.reason()).increment(1);
    }
}

/// Waits out a will's delay; `false` if the client connected again
/// meanwhile (on any node). The node stopping ends the wait: the will goes
/// out now rather than never.
async fn wait_will_delay(shared: Arc<Shared>, client: String, session: u64, secs: u32) -> bool {
    let back = shared.delay_will(&client, session);
    let sleep = tokio::time::sleep(Duration::from_secs(u64::from(secs)));
    let publish = tokio::select! {
        _ = sleep => true,
        _ = shared.stop.cancelled() => true,
        _ = back.cancelled() => false,
    };
    shared.will_delay_over(&client, session);
    if !publish {
        metrics::counter!(crate::internal_events::names::MQTT_WILLS_CANCELLED_TOTAL).increment(1);
        tracing::debug!(%client, "client connected again within its will delay; will not sent");
    }
    publish
}

async fn next_command(commands: &mut Option<tokio::sync::mpsc::Receiver<OutCommand>>) -> Option<OutCommand> {
    match commands {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_outgoing(outbox: &mut Option<tokio::sync::mpsc::Receiver<Outgoing>>) -> Option<Outgoing> {
    match outbox {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn qos_of(qos: u8) -> QoS {
    match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// The next message of a resumed session's replay, opening the current
/// stream's reader first if needed. Cancel-safe: the reader is kept.
async fn next_replayed(
    replay: &mut VecDeque<super::sessions::Replay>,
    broker: &super::broker::Broker,
    session: u64,
) -> Result<Option<async_nats::jetstream::Message>, super::broker::FeedError> {
    let Some(current) = replay.front_mut() else { return Ok(None) };
    if current.reader.is_none() {
        current.reader = Some(broker.replay_reader(&current.stream, current.next, session).await?);
    }
    let Some(reader) = current.reader.as_mut() else { return Ok(None) };
    match reader.next().await {
        Ok(message) => Ok(Some(message)),
        Err(source) => Err(super::broker::FeedError::Reader { stream: current.stream.to_string(), source }),
    }
}

fn qos_label(qos: QoS) -> &'static str {
    match qos {
        QoS::AtMostOnce => "0",
        QoS::AtLeastOnce => "1",
        QoS::ExactlyOnce => "2",
    }
}

/// Sends the message: a device topic as telemetry, any other topic as a
/// plain message, and a retained one also as the topic's retained message.
/// What it settles to once stored; a message that is refused (malformed
/// topic, too large) is acknowledged and counted.
async fn submit(
    ingress: crate::ingress::Ingress,
    topic: String,
    payload: Bytes,
    qos: u8,
    retain: bool,
    meta: Option<crate::ingress::MqttMeta>,
    reply: Reply,
) -> Submitted {
    let publish = MqttPublish { topic: &topic, payload, qos, retain, key: None, meta: meta.as_ref() };
    Submitted(match ingress.submit_mqtt(publish).await {
        Ok(sent) => Box::pin(async move {
            match ingress.stored_mqtt(sent).await {
                Ok(_) => (reply, Outcome::Stored),
                Err(e) => (reply, Outcome::Failed(e)),
            }
        }),
        Err(e @ IngestError::Topic(_)) => {
            internal_events::rejected(Source::Mqtt, e.reason(), &e);
            settled(reply, Outcome::Refused(reason::TOPIC_NAME_INVALID))
        }
        Err(e @ IngestError::TooLarge { .. }) => {
            internal_events::rejected(Source::Mqtt, e.reason(), &e);
            settled(reply, Outcome::Refused(reason::QUOTA_EXCEEDED))
        }
        Err(e) => settled(reply, Outcome::Failed(e)),
    })
}
