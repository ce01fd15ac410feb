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
//!
//! This file holds the connection's state and its loop; `handshake` the
//! CONNECT and CONNACK, `publish` the publish path, `subscribe` the
//! subscriptions, `deliver` what is written to the client, `session` a
//! persistent session, `will` the will, and `end` how it ends.

mod deliver;
mod end;
mod handshake;
mod publish;
mod session;
mod subscribe;
mod will;

use super::codec::{self, reason, Codec, FilterIn, Inbound, PublishIn, PublishOut, Version};
use super::outbox::{Outbox, Outgoing, Sub};
use super::Shared;
use crate::auth::acl::Grant;
use crate::auth::Denied;
use crate::ingress::{IngestError, MqttPublish, Source};
use crate::internal_events;
use bytes::{Bytes, BytesMut};
use deliver::{next_command, next_outgoing, next_replayed, qos_of};
use end::{End, Violation};
use fluxmesh_schemas::{DeviceTopic, PlainTopic};
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use publish::{Settle, Submit, Submitted};
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
const LINGER: Duration = crate::lifecycle::deadline::CONNECTION_LINGER;
/// How long a stopping connection may take to send the acks it owes.
const DRAIN_TIMEOUT: Duration = crate::lifecycle::deadline::CONNECTION_DRAIN;
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
    pub(super) commands: Arc<CommandInbox>,
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

/// Where the command service hands a device its commands. The queue is
/// made when the device first subscribes to its command topic, not at
/// CONNECT: most connections never do, and an idle one should not hold it.
#[derive(Debug, Default)]
pub struct CommandInbox {
    /// The device is subscribed to its command topic (and `sender` is set).
    ready: std::sync::atomic::AtomicBool,
    sender: std::sync::OnceLock<tokio::sync::mpsc::Sender<OutCommand>>,
}

impl CommandInbox {
    /// Whether the device takes commands now.
    pub(super) fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The queue to the device, while it takes commands.
    pub(super) fn sender(&self) -> Option<tokio::sync::mpsc::Sender<OutCommand>> {
        self.ready().then(|| self.sender.get().cloned()).flatten()
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
/// Room a read needs at least in the read buffer; with less, it makes
/// room: `READ_ROOM` between packets, `READ_CHUNK` in the middle of one. An
/// idle connection keeps `READ_ROOM` bytes, a busy one reads in chunks.
const READ_ROOM: usize = 512;
const READ_CHUNK: usize = 4096;
/// Commands written and not yet PUBACKed on one connection, at most.
const COMMANDS_IN_FLIGHT: usize = 32;

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
    share: Option<super::outbox::ShareAck>,
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
    /// with each subscription (both are made with the first one).
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
    shares_done: Vec<super::outbox::ShareAck>,
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
    overflow: Arc<super::outbox::Overflow>,
    /// Overflowed streams waiting for their catch-up (one replay per
    /// stream at a time): the first sequence dropped.
    overflowed: std::collections::HashMap<Arc<str>, u64>,
    /// Per stream: the highest sequence written to the client (or, before
    /// any, the feed's position when the session subscribed).
    written_live: std::collections::HashMap<Arc<str>, u64>,
    /// Commands for this device, from the node's command service (made
    /// with the first subscription to its command topic).
    commands: Option<tokio::sync::mpsc::Receiver<OutCommand>>,
    inbox: Arc<CommandInbox>,
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
    /// True while the node is cut off from the mesh: the connection ends.
    unavailable: tokio::sync::watch::Receiver<bool>,
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
    let unavailable = shared.unavailable.clone();
    let mut conn = Conn {
        socket,
        peer,
        shared,
        rbuf: BytesMut::with_capacity(READ_ROOM),
        wbuf: BytesMut::new(),
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
        inbox: Arc::default(),
        cmd_filters: Default::default(),
        awaiting_puback: Default::default(),
        next_pkid: 1,
        grant: Grant::own("", crate::auth::acl::Method::Anonymous),
        denied: 0,
        limiter: shared_quota.map(crate::limits::ConnectionLimiter::new),
        throttled_until: None,
        unavailable,
    };
    let timeout = Duration::from_millis(u64::from(conn.shared.config.connection_timeout_ms));
    // The handshake, the run and the ending are boxed, one at a time: a
    // connection holds only the state of the step it is in (an idle one,
    // its run loop's), not the largest step's.
    let session = match tokio::time::timeout(timeout, Box::pin(conn.handshake())).await {
        Ok(Ok(session)) => session,
        Ok(Err(end)) => {
            conn.closed(&end);
            return;
        }
        Err(_) => {
            conn.closed(&End::Protocol(Violation::ConnectTimeout, format!("no CONNECT within {timeout:?}")));
            return;
        }
    };
    let end = Box::pin(conn.run(&session)).await;
    conn.closed(&end);
    Box::pin(conn.say_disconnect(&end)).await;
    conn.leave_broker();
    Box::pin(conn.leave_shares()).await;
    Box::pin(conn.finish_session()).await;
    Box::pin(conn.close_replay()).await;
    {
        let mut sessions = conn.shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if sessions.get(&conn.client_id).is_some_and(|s| s.serial == session.serial) {
            sessions.remove(&conn.client_id);
        }
    }
    Box::pin(conn.end_will(&end)).await;
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    /// Whether `mqtt.deny_topics` keeps every client off `topic`.
    fn topic_denied(&self, topic: &str) -> bool {
        self.shared.config.deny_topics.iter().any(|f| rumqttc::mqttbytes::matches(topic, f))
    }

    /// Whether `mqtt.plain_topics` lets clients use plain topic `topic`.
    fn plain_allowed(&self, topic: &str) -> bool {
        self.shared.config.plain_topics.iter().any(|f| rumqttc::mqttbytes::matches(topic, f))
    }

    async fn run(&mut self, session: &Session) -> End {
        let mut draining: Option<(Instant, End)> = None;
        let mut keep_alive_at = self.keep_alive.map(|k| Instant::now() + k);
        let save_every = Duration::from_millis(self.shared.config.session_save_interval_ms);
        let mut save_at = Instant::now() + save_every;
        let mut unavailable = self.unavailable.clone();
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
                Box::pin(share.done()).await;
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
                _ = self.shared.life.stopped(), if draining.is_none() => {
                    draining = Some((Instant::now() + DRAIN_TIMEOUT, End::Stopped));
                }
                // Cut off: no ack is coming, so nothing to drain; the
                // device sends again what is unacknowledged, elsewhere.
                // (An error: the watch is gone, the node is stopping.)
                Ok(()) = async { unavailable.wait_for(|cut| *cut).await.map(|_| ()) }, if draining.is_none() => {
                    return End::CutOff;
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
                read = read_some(&mut self.socket, &mut self.rbuf), if can_read => match read {
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
                    Box::pin(self.replayed(read)).await;
                }
                _ = tokio::time::sleep_until(save_at), if self.persist.is_some() && draining.is_none() => {
                    Box::pin(self.save_session(false)).await;
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

    /// Counts and logs an ACL refusal.
    fn acl_denied(&mut self, action: &'static str, topic: &str) {
        self.denied += 1;
        internal_events::emit(internal_events::mqtt::AclDenied {
            client: &self.client_id,
            peer: self.peer,
            action,
            topic,
            count: self.denied,
        });
    }

    async fn read_more(&mut self) -> Result<(), End> {
        match read_some(&mut self.socket, &mut self.rbuf).await {
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
                    return Err(End::Protocol(
                        Violation::Oversize,
                        format!("packet of {size} bytes is over the limit"),
                    ));
                }
                Err(e) => return Err(End::Protocol(Violation::MalformedPacket, fluxmesh_mesh::error_chain(&e))),
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
            // Rare steps are boxed, so that the run loop's state stays
            // small (see `serve`).
            Inbound::Subscribe { pkid, filters, id } => Box::pin(self.subscribe_packet(pkid, filters, id)).await,
            Inbound::Unsubscribe { pkid, filters } => Box::pin(self.unsubscribe_packet(pkid, filters)).await,
            Inbound::PingReq => self.codec.pingresp(&mut self.wbuf),
            // Publishes read before it are still stored and acknowledged.
            Inbound::Disconnect { reason, session_expiry } => {
                if let Some(expiry) = session_expiry {
                    if self.session_expiry == 0 && expiry > 0 {
                        // MQTT 5 3.14.2.2.2: a session that was to end with
                        // its connection cannot be kept at DISCONNECT.
                        return Err(End::Protocol(
                            Violation::SessionExpiry,
                            "DISCONNECT set a session expiry after 0".into(),
                        ));
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
                        Box::pin(share.done()).await;
                    }
                }
            }
            Inbound::PubRec { pkid, failed } => {
                if let Some(out) = self.out_inflight.get_mut(&pkid).filter(|o| o.qos == QoS::ExactlyOnce) {
                    out.released = true;
                    if let Some(share) = out.share.take() {
                        Box::pin(share.done()).await;
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
                return Err(End::Protocol(Violation::SecondConnect, "CONNECT on a connected session".into()))
            }
            Inbound::Auth => {
                return Err(End::Protocol(
                    Violation::UnexpectedPacket,
                    "AUTH, but no authentication method was set".into(),
                ))
            }
            Inbound::Unexpected(what) => {
                return Err(End::Protocol(Violation::UnexpectedPacket, format!("{what} from a client")))
            }
        }
        Ok(())
    }

    async fn unsubscribe_packet(&mut self, pkid: u16, filters: Vec<String>) {
        let mut existed = Vec::with_capacity(filters.len());
        for topic in &filters {
            let mut found = false;
            if self.cmd_filters.remove(topic).is_some() {
                found = true;
                if self.cmd_filters.is_empty() {
                    // No more commands here: the command service
                    // queues them until the device subscribes again.
                    self.inbox.ready.store(false, Ordering::Release);
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
            Err(_) => Err(End::Protocol(
                Violation::WriteTimeout,
                format!("device left our writes unread for {WRITE_TIMEOUT:?}"),
            )),
        }
    }
}

/// Reads what the socket has into `buf`, first making room for at least
/// `READ_ROOM` bytes. Between packets (all an idle connection sees) that
/// room is all it reserves, which reuses the buffer's own allocation once
/// the packets parsed from it are gone; in the middle of a packet it
/// grows by `READ_CHUNK`, so a busy connection reads in chunks.
/// Cancel-safe, as `read_buf` is.
async fn read_some<S: AsyncRead + Unpin>(socket: &mut S, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < READ_ROOM {
        buf.reserve(if buf.is_empty() { READ_ROOM } else { READ_CHUNK });
    }
    socket.read_buf(buf).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_idle_connection_keeps_a_small_read_buffer() {
        let mut buf = BytesMut::with_capacity(READ_ROOM);
        // A CONNECT, then a PINGREQ at a time, each parsed and dropped.
        let connect = [0x10_u8; 60];
        let n = read_some(&mut &connect[..], &mut buf).await.expect("read");
        drop(buf.split_to(n));
        for _ in 0..100 {
            let n = read_some(&mut &[0xc0_u8, 0x00][..], &mut buf).await.expect("read");
            drop(buf.split_to(n));
            assert!(buf.capacity() <= READ_ROOM, "an idle buffer grew to {} bytes", buf.capacity());
        }
    }

    #[tokio::test]
    async fn a_packet_read_in_parts_grows_the_buffer_by_chunks() {
        let mut buf = BytesMut::with_capacity(READ_ROOM);
        let big = vec![0x30_u8; 3 * READ_CHUNK];
        let mut rest = &big[..];
        while !rest.is_empty() {
            let n = read_some(&mut rest, &mut buf).await.expect("read");
            assert!(n > 0);
        }
        assert_eq!(buf.len(), big.len(), "the whole packet, unconsumed, in one buffer");
        assert!(buf.capacity() >= big.len());
    }
}
