//! Events of the MQTT front end: connections, sessions, subscriptions,
//! the feeds that deliver to them, and wills.

use super::{names, InternalEvent};
use fluxmesh_mesh::error_chain;
use metrics::counter;
use std::error::Error;
use std::net::SocketAddr;

/// A connection refused because the node holds `mqtt.max_connections`.
#[derive(Debug)]
pub struct ConnectionRefusedFull {
    pub peer: SocketAddr,
    pub max: usize,
}

impl InternalEvent for ConnectionRefusedFull {
    fn emit(self) {
        counter!(names::MQTT_REFUSED_TOTAL, "reason" => "max_connections").increment(1);
        tracing::warn!(peer = %self.peer, max = self.max, "MQTT connection refused: too many connections");
    }
}

/// Which handshake failed.
#[derive(Debug, Clone, Copy)]
pub enum Handshake {
    Tls,
    WebSocket,
}

/// A TLS or WebSocket handshake that failed (`error`) or timed out
/// (`None`).
#[derive(Debug)]
pub struct HandshakeFailed<'a> {
    pub kind: Handshake,
    pub peer: SocketAddr,
    pub error: Option<&'a dyn Error>,
}

impl InternalEvent for HandshakeFailed<'_> {
    fn emit(self) {
        let what = match self.kind {
            Handshake::Tls => {
                counter!(names::MQTT_TLS_HANDSHAKE_FAILURES_TOTAL).increment(1);
                "MQTT TLS handshake"
            }
            Handshake::WebSocket => {
                counter!(names::MQTT_WS_HANDSHAKE_FAILURES_TOTAL).increment(1);
                "MQTT WebSocket handshake"
            }
        };
        match self.error {
            Some(e) => tracing::info!(peer = %self.peer, error = %error_chain(e), "{what} failed"),
            None => tracing::info!(peer = %self.peer, "{what} timed out"),
        }
    }
}

/// A client broke the protocol or a limit; its connection is closed.
#[derive(Debug)]
pub struct ProtocolViolated<'a> {
    pub client: &'a str,
    pub peer: SocketAddr,
    pub reason: &'static str,
    pub detail: &'a str,
}

impl InternalEvent for ProtocolViolated<'_> {
    fn emit(self) {
        counter!(names::MQTT_PROTOCOL_ERRORS_TOTAL, "reason" => self.reason).increment(1);
        tracing::warn!(client = %self.client, peer = %self.peer, reason = self.reason, detail = %self.detail,
            "MQTT connection closed: protocol error");
    }
}

/// A connection ended, for whatever `reason` (logged where it ends).
#[derive(Debug)]
pub struct Disconnected {
    pub reason: &'static str,
}

impl InternalEvent for Disconnected {
    fn emit(self) {
        counter!(names::MQTT_DISCONNECTS_TOTAL, "reason" => self.reason).increment(1);
    }
}

/// A device's ACL refused a publish or subscription. The first refusal on
/// a connection is logged at warn, the rest at debug, so a misbehaving
/// device cannot flood the log.
#[derive(Debug)]
pub struct AclDenied<'a> {
    pub client: &'a str,
    pub peer: SocketAddr,
    pub action: &'static str,
    pub topic: &'a str,
    /// Refusals on this connection so far, this one included.
    pub count: u64,
}

impl InternalEvent for AclDenied<'_> {
    fn emit(self) {
        counter!(names::ACL_DENIED_TOTAL, "action" => self.action).increment(1);
        let (client, action, topic) = (self.client, self.action, self.topic);
        if self.count == 1 {
            tracing::warn!(%client, peer = %self.peer, action, topic, "refused by the device's ACL");
        } else {
            tracing::debug!(%client, action, topic, count = self.count, "refused by the device's ACL");
        }
    }
}

/// `mqtt.deny_topics` refused a publish or a subscription.
#[derive(Debug)]
pub struct TopicDenied<'a> {
    pub client: &'a str,
    pub action: &'static str,
    pub topic: &'a str,
}

impl InternalEvent for TopicDenied<'_> {
    fn emit(self) {
        counter!(names::MQTT_DENIED_TOPICS_TOTAL, "action" => self.action).increment(1);
        tracing::debug!(client = %self.client, action = self.action, topic = %self.topic, "refused by mqtt.deny_topics");
    }
}

/// What could not be done for a session or subscription.
#[derive(Debug, Clone, Copy)]
pub enum SessionFailure {
    /// Subscriptions refused: their streams or group cannot be read.
    Subscribe,
    /// The retained messages for a subscription could not be read (the
    /// subscription stands).
    RetainedRead,
    /// A resumed session's missed messages of a stream are not sent.
    Replay,
    /// The session could not be stored (or, at the end, forgotten).
    Save,
    /// The session could not be announced to the other nodes (takeover
    /// across nodes waits for the next announcement).
    Announce,
    /// A will could not be published now (its record stays: if this node
    /// dies, another publishes it).
    WillPublish,
}

impl SessionFailure {
    fn metric(self) -> &'static str {
        match self {
            SessionFailure::Subscribe => names::MQTT_SUBSCRIBE_FAILED_TOTAL,
            SessionFailure::RetainedRead => names::MQTT_RETAINED_READ_FAILED_TOTAL,
            SessionFailure::Replay => names::MQTT_REPLAY_FAILED_TOTAL,
            SessionFailure::Save => names::MQTT_SESSION_SAVE_FAILED_TOTAL,
            SessionFailure::Announce => names::MQTT_SESSION_ANNOUNCE_FAILED_TOTAL,
            SessionFailure::WillPublish => names::MQTT_WILL_PUBLISH_FAILED_TOTAL,
        }
    }
}

/// Something a session needed from NATS failed; `message` says what it
/// means for the client.
#[derive(Debug)]
pub struct SessionFailed<'a> {
    pub failure: SessionFailure,
    pub client: &'a str,
    /// The stream or filter concerned, if one.
    pub about: Option<&'a str>,
    pub error: &'a str,
    pub message: &'static str,
}

impl InternalEvent for SessionFailed<'_> {
    fn emit(self) {
        counter!(self.failure.metric()).increment(1);
        let about = self.about.unwrap_or("");
        if matches!(self.failure, SessionFailure::WillPublish) {
            tracing::error!(client = %self.client, about, error = %self.error, "{}", self.message);
        } else {
            tracing::warn!(client = %self.client, about, error = %self.error, "{}", self.message);
        }
    }
}

/// A stored session record that cannot be read; a new session starts.
#[derive(Debug)]
pub struct SessionCorrupt<'a> {
    pub client: &'a str,
    pub error: &'a dyn Error,
}

impl InternalEvent for SessionCorrupt<'_> {
    fn emit(self) {
        counter!(names::MQTT_SESSIONS_CORRUPT_TOTAL).increment(1);
        tracing::warn!(client = %self.client, error = %error_chain(self.error), "stored session unreadable; starting a new one");
    }
}

/// A device's credentials changed after it authenticated: its session
/// here ends.
#[derive(Debug)]
pub struct SessionRevoked<'a> {
    pub device: &'a str,
}

impl InternalEvent for SessionRevoked<'_> {
    fn emit(self) {
        counter!(names::MQTT_SESSIONS_REVOKED_TOTAL).increment(1);
        tracing::info!(device = %self.device, "device credentials changed; ending its session");
    }
}

/// A subscriber fell behind its outbox: it reads the stream back from
/// `start`.
#[derive(Debug)]
pub struct CaughtUp<'a> {
    pub client: &'a str,
    pub stream: &'a str,
    pub start: u64,
    pub end: u64,
}

impl InternalEvent for CaughtUp<'_> {
    fn emit(self) {
        counter!(names::MQTT_CATCH_UPS_TOTAL).increment(1);
        tracing::debug!(client = %self.client, stream = %self.stream, start = self.start, end = self.end,
            "subscriber fell behind; reading back from the stream");
    }
}

/// More retained messages match a new subscription than its session's
/// queue holds; the rest are not sent.
#[derive(Debug)]
pub struct RetainedOverQueue<'a> {
    pub filter: &'a str,
    pub over: u64,
    pub limit: usize,
}

impl InternalEvent for RetainedOverQueue<'_> {
    fn emit(self) {
        counter!(names::MQTT_DELIVERIES_DROPPED_TOTAL, "reason" => "retained_over_queue").increment(self.over);
        tracing::warn!(filter = %self.filter, over = self.over, limit = self.limit,
            "more retained messages match than a session queue holds; the rest were not sent");
    }
}

/// A subscriber feed cannot read its stream; it keeps its position and
/// tries again.
#[derive(Debug)]
pub struct FeedReadFailed<'a> {
    pub stream: &'a str,
    pub error: &'a dyn Error,
}

impl InternalEvent for FeedReadFailed<'_> {
    fn emit(self) {
        counter!(names::MQTT_FEED_FAILURES_TOTAL).increment(1);
        tracing::warn!(stream = %self.stream, error = %error_chain(self.error), "subscriber feed cannot read its stream; retrying");
    }
}

/// A stored message (or part of it) that subscribers cannot be sent.
#[derive(Debug)]
pub struct StoredUnreadable<'a> {
    /// `subject`, `frame`, … or `properties` (sent without them).
    pub what: &'static str,
    pub subject: &'a str,
    pub error: Option<&'a dyn Error>,
}

impl InternalEvent for StoredUnreadable<'_> {
    fn emit(self) {
        counter!(names::MQTT_FEED_UNREADABLE_TOTAL, "reason" => self.what).increment(1);
        match self.error {
            Some(e) => tracing::debug!(subject = %self.subject, what = self.what, error = %error_chain(e),
                "part of a stored message unreadable for subscribers"),
            None => {
                tracing::debug!(subject = %self.subject, what = self.what, "stored message not delivered to subscribers")
            }
        }
    }
}

/// A shared subscription's message could not be acknowledged to its
/// group; JetStream sends it again.
#[derive(Debug)]
pub struct SharedAckFailed<'a> {
    pub error: &'a dyn Error,
}

impl InternalEvent for SharedAckFailed<'_> {
    fn emit(self) {
        counter!(names::MQTT_SHARED_ACK_FAILED_TOTAL).increment(1);
        tracing::debug!(error = %error_chain(self.error), "cannot acknowledge a shared message; it will be sent again");
    }
}

/// A will was published (`why`: the connection's end or the node's).
#[derive(Debug)]
pub struct WillPublished<'a> {
    pub client: &'a str,
    pub topic: &'a str,
    pub why: &'static str,
}

impl InternalEvent for WillPublished<'_> {
    fn emit(self) {
        counter!(names::MQTT_WILLS_PUBLISHED_TOTAL, "why" => self.why).increment(1);
        tracing::debug!(client = %self.client, topic = %self.topic, why = self.why, "will published");
    }
}

/// The client came back within its will delay: no will.
#[derive(Debug)]
pub struct WillCancelled<'a> {
    pub client: &'a str,
}

impl InternalEvent for WillCancelled<'_> {
    fn emit(self) {
        counter!(names::MQTT_WILLS_CANCELLED_TOTAL).increment(1);
        tracing::debug!(client = %self.client, "client connected again within its will delay; will not sent");
    }
}

/// A will record not cleared (replaced by a newer session, or NATS
/// unreachable): it is published only if this node dies, and stored once.
#[derive(Debug)]
pub struct WillClearFailed<'a> {
    pub client: &'a str,
    pub error: &'a dyn Error,
}

impl InternalEvent for WillClearFailed<'_> {
    fn emit(self) {
        counter!(names::MQTT_WILL_CLEAR_FAILED_TOTAL).increment(1);
        tracing::debug!(client = %self.client, error = %error_chain(self.error),
            "will record not cleared (replaced by a newer session, or NATS unreachable)");
    }
}

/// The wills of a node that left could not be published now; the next
/// node to start will.
#[derive(Debug)]
pub struct WillSweepFailed<'a> {
    pub node: &'a str,
    pub error: &'a dyn Error,
}

impl InternalEvent for WillSweepFailed<'_> {
    fn emit(self) {
        counter!(names::MQTT_WILL_SWEEP_FAILED_TOTAL).increment(1);
        tracing::warn!(node = %self.node, error = %error_chain(self.error),
            "cannot publish the wills of a node that left; the next node to start will");
    }
}

/// A persistent session's progress could not be stored. The final save
/// of a session a newer one took over is refused by design: logged at
/// debug.
#[derive(Debug)]
pub struct SessionSaveFailed<'a> {
    pub client: &'a str,
    pub error: &'a dyn Error,
    pub last: bool,
}

impl InternalEvent for SessionSaveFailed<'_> {
    fn emit(self) {
        counter!(names::MQTT_SESSION_SAVE_FAILED_TOTAL).increment(1);
        let error = error_chain(self.error);
        if self.last {
            tracing::debug!(client = %self.client, %error, "final session save refused (a newer session took over?)");
        } else {
            tracing::warn!(client = %self.client, %error, "cannot store the session; retrying");
        }
    }
}
