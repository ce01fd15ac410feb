//! MQTT 3.1.1 and 5.0 on the wire, behind one set of packet types.
//!
//! The connection speaks whichever version the CONNECT declared; the rest
//! of the broker sees only [`Inbound`] packets and writes through
//! [`Codec`]. Parsing and encoding are `rumqttc`'s `mqttbytes` (v4 and v5),
//! with three gaps in its MQTT 5 codec closed here: a DISCONNECT with no
//! reason code or with a reason code and no properties is parsed here
//! (`rumqttc` fails on the first and loses the second), an AUTH packet is
//! recognised, and a DISCONNECT is written here (`rumqttc` writes one with
//! a reason and no properties as a normal disconnection).

use super::props::MessageProps;
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes as v4b;
use rumqttc::v5::mqttbytes as v5b;
use rumqttc::v5::mqttbytes::v5 as v5p;
use rumqttc::QoS;

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V4,
    V5,
}

/// MQTT 5 reason codes the broker sends (CONNACK, PUBACK, PUBREC, SUBACK,
/// UNSUBACK, DISCONNECT). MQTT 3.1.1 maps the few it has.
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const UNSPECIFIED: u8 = 0x80;
    pub const MALFORMED: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL: u8 = 0x84;
    pub const CLIENT_ID_INVALID: u8 = 0x85;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    /// A client's DISCONNECT asking for its will to be published.
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
}

/// A CONNECT, either version.
#[derive(Debug)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    /// 3.1.1 clean session; 5.0 clean start.
    pub clean_start: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub will: Option<WillIn>,
    /// MQTT 5: how long the session outlives the connection (absent: 0).
    pub session_expiry: Option<u32>,
    /// MQTT 5: QoS 1/2 messages the client takes unacknowledged at most.
    pub receive_maximum: Option<u16>,
    /// MQTT 5: the largest packet the client takes.
    pub max_packet_size: Option<u32>,
    /// MQTT 5: topic aliases the client takes from the server.
    pub topic_alias_max: Option<u16>,
    /// MQTT 5 enhanced authentication, which the broker does not offer.
    pub auth_method: Option<String>,
}

/// A CONNECT's will.
#[derive(Debug)]
pub struct WillIn {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 will delay interval, in seconds.
    pub delay: u32,
    pub props: Option<MessageProps>,
    pub expiry: Option<u32>,
}

/// A PUBLISH from the client.
#[derive(Debug)]
pub struct PublishIn {
    /// Empty when an MQTT 5 topic alias stands for it.
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub pkid: u16,
    pub alias: Option<u16>,
    pub props: Option<MessageProps>,
    /// MQTT 5 message expiry interval, in seconds.
    pub expiry: Option<u32>,
}

/// One filter of a SUBSCRIBE, with its MQTT 5 options (3.1.1: defaults).
#[derive(Debug, Clone)]
pub struct FilterIn {
    pub path: String,
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained messages; 1: only if the subscription is new; 2: never.
    pub retain_handling: u8,
}

#[derive(Debug)]
pub enum Inbound {
    Connect(Box<Connect>),
    Publish(PublishIn),
    PubAck(u16),
    PubRec {
        pkid: u16,
        failed: bool,
    },
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<FilterIn>,
        id: Option<u32>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        reason: u8,
        session_expiry: Option<u32>,
    },
    Auth,
    /// A packet only a server sends.
    Unexpected(&'static str),
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("packet of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("malformed MQTT 3.1.1 packet")]
    V4(#[source] v4b::Error),
    #[error("malformed MQTT 5 packet")]
    V5(#[source] v5b::Error),
    #[error("MQTT protocol level {0} is not supported (3.1.1 and 5 are)")]
    Level(u8),
    #[error("the protocol name is not `MQTT`")]
    ProtocolName,
}

/// The protocol level a CONNECT at the start of `buf` declares, once
/// enough of it has arrived: after the fixed header (type, then a
/// remaining length of 1-4 bytes) come the protocol name (2-byte length,
/// then the name) and the level.
pub fn connect_level(buf: &[u8]) -> Option<u8> {
    if buf.first()? >> 4 != 1 {
        return None;
    }
    let mut i = 1;
    while *buf.get(i)? & 0x80 != 0 {
        i += 1;
        if i > 4 {
            return None;
        }
    }
    let name = usize::from(u16::from_be_bytes([*buf.get(i + 1)?, *buf.get(i + 2)?]));
    buf.get(i + 3 + name).copied()
}

/// The fixed header at the start of `buf`: (first byte, header length,
/// remaining length), or `None` until it has all arrived.
fn fixed_header(buf: &[u8]) -> Option<(u8, usize, usize)> {
    let first = *buf.first()?;
    let mut len = 0usize;
    for i in 0..4 {
        let byte = *buf.get(1 + i)?;
        len |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((first, 2 + i, len));
        }
    }
    // A fifth length byte: malformed; let the codec say so.
    Some((first, 0, 0))
}

/// Reads the next complete packet from `buf`; `Ok(None)` until one has
/// arrived. `version` is `None` before the CONNECT.
pub fn read(version: Option<Version>, buf: &mut BytesMut, max_packet: usize) -> Result<Option<Inbound>, DecodeError> {
    let version = match version {
        Some(v) => v,
        None => match connect_level(buf) {
            None if buf.first().is_some_and(|b| b >> 4 == 1) => return Ok(None),
            Some(5) => Version::V5,
            // The 3.1.1 codec reads other packets and refuses other levels.
            _ => Version::V4,
        },
    };
    match version {
        Version::V4 => read_v4(buf, max_packet),
        Version::V5 => read_v5(buf, max_packet),
    }
}

fn read_v4(buf: &mut BytesMut, max_packet: usize) -> Result<Option<Inbound>, DecodeError> {
    let packet = match rumqttc::Packet::read(buf, max_packet) {
        Ok(p) => p,
        Err(v4b::Error::InsufficientBytes(_)) => return Ok(None),
        Err(v4b::Error::PayloadSizeLimitExceeded(size)) => return Err(DecodeError::TooLarge(size)),
        Err(v4b::Error::InvalidProtocolLevel(level)) => return Err(DecodeError::Level(level)),
        Err(v4b::Error::InvalidProtocol) => return Err(DecodeError::ProtocolName),
        Err(e) => return Err(DecodeError::V4(e)),
    };
    use rumqttc::Packet as P;
    Ok(Some(match packet {
        P::Connect(c) => {
            let (username, password) = match c.login {
                Some(l) => (Some(l.username), Some(Bytes::from(l.password.into_bytes()))),
                None => (None, None),
            };
            let will = c.last_will.map(|w| WillIn {
                topic: w.topic,
                payload: w.message,
                qos: w.qos as u8,
                retain: w.retain,
                delay: 0,
                props: None,
                expiry: None,
            });
            Inbound::Connect(Box::new(Connect {
                version: Version::V4,
                client_id: c.client_id,
                clean_start: c.clean_session,
                keep_alive: c.keep_alive,
                username,
                password,
                will,
                session_expiry: None,
                receive_maximum: None,
                max_packet_size: None,
                topic_alias_max: None,
                auth_method: None,
            }))
        }
        P::Publish(p) => Inbound::Publish(PublishIn {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            pkid: p.pkid,
            alias: None,
            props: None,
            expiry: None,
        }),
        P::PubAck(a) => Inbound::PubAck(a.pkid),
        P::PubRec(r) => Inbound::PubRec { pkid: r.pkid, failed: false },
        P::PubRel(r) => Inbound::PubRel(r.pkid),
        P::PubComp(c) => Inbound::PubComp(c.pkid),
        P::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| FilterIn {
                    path: f.path,
                    qos: f.qos,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                })
                .collect(),
            id: None,
        },
        P::Unsubscribe(u) => Inbound::Unsubscribe { pkid: u.pkid, filters: u.topics },
        P::PingReq => Inbound::PingReq,
        P::Disconnect => Inbound::Disconnect { reason: reason::SUCCESS, session_expiry: None },
        P::ConnAck(_) => Inbound::Unexpected("CONNACK"),
        P::SubAck(_) => Inbound::Unexpected("SUBACK"),
        P::UnsubAck(_) => Inbound::Unexpected("UNSUBACK"),
        P::PingResp => Inbound::Unexpected("PINGRESP"),
    }))
}

fn qos_of_v5(qos: v5b::QoS) -> QoS {
    match qos {
        v5b::QoS::AtMostOnce => QoS::AtMostOnce,
        v5b::QoS::AtLeastOnce => QoS::AtLeastOnce,
        v5b::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_to_v5(qos: QoS) -> v5b::QoS {
    match qos {
        QoS::AtMostOnce => v5b::QoS::AtMostOnce,
        QoS::AtLeastOnce => v5b::QoS::AtLeastOnce,
        QoS::ExactlyOnce => v5b::QoS::ExactlyOnce,
    }
}

fn read_v5(buf: &mut BytesMut, max_packet: usize) -> Result<Option<Inbound>, DecodeError> {
    let Some((first, header_len, remaining)) = fixed_header(buf) else { return Ok(None) };
    if header_len > 0 && header_len + remaining > max_packet {
        return Err(DecodeError::TooLarge(header_len + remaining));
    }
    // DISCONNECT without properties and AUTH are read here (see the
    // module's notes).
    if header_len > 0 && (first == 0xE0 && remaining < 2 || first >> 4 == 15) {
        if buf.len() < header_len + remaining {
            return Ok(None);
        }
        let frame = buf.split_to(header_len + remaining);
        if first >> 4 == 15 {
            return Ok(Some(Inbound::Auth));
        }
        let reason = frame.get(header_len).copied().unwrap_or(reason::SUCCESS);
        return Ok(Some(Inbound::Disconnect { reason, session_expiry: None }));
    }
    let max = u32::try_from(max_packet).unwrap_or(u32::MAX);
    let packet = match v5p::Packet::read(buf, Some(max)) {
        Ok(p) => p,
        Err(v5b::Error::InsufficientBytes(_)) => return Ok(None),
        Err(v5b::Error::PayloadSizeLimitExceeded { pkt_size, .. }) => return Err(DecodeError::TooLarge(pkt_size)),
        Err(v5b::Error::InvalidProtocolLevel(level)) => return Err(DecodeError::Level(level)),
        Err(v5b::Error::InvalidProtocol) => return Err(DecodeError::ProtocolName),
        Err(e) => return Err(DecodeError::V5(e)),
    };
    use v5p::Packet as P;
    Ok(Some(match packet {
        P::Connect(c, will, login) => {
            let props = c.properties.unwrap_or_default();
            let will = match will {
                Some(w) => Some(will_v5(w)?),
                None => None,
            };
            let (username, password) = match login {
                Some(l) => (Some(l.username), Some(Bytes::from(l.password.into_bytes()))),
                None => (None, None),
            };
            Inbound::Connect(Box::new(Connect {
                version: Version::V5,
                client_id: c.client_id,
                clean_start: c.clean_start,
                keep_alive: c.keep_alive,
                username,
                password,
                will,
                session_expiry: props.session_expiry_interval,
                receive_maximum: props.receive_maximum,
                max_packet_size: props.max_packet_size,
                topic_alias_max: props.topic_alias_max,
                auth_method: props.authentication_method,
            }))
        }
        P::Publish(p) => {
            let topic = String::from_utf8(p.topic.to_vec()).map_err(|_| DecodeError::V5(v5b::Error::TopicNotUtf8))?;
            let (props, alias, expiry) = match p.properties {
                Some(pp) => {
                    let alias = pp.topic_alias;
                    let expiry = pp.message_expiry_interval;
                    (MessageProps::from_v5(pp), alias, expiry)
                }
                None => (None, None, None),
            };
            Inbound::Publish(PublishIn {
                topic,
                payload: p.payload,
                qos: qos_of_v5(p.qos),
                retain: p.retain,
                pkid: p.pkid,
                alias,
                props,
                expiry,
            })
        }
        P::PubAck(a) => Inbound::PubAck(a.pkid),
        P::PubRec(r) => Inbound::PubRec { pkid: r.pkid, failed: is_failure_rec(r.reason) },
        P::PubRel(r) => Inbound::PubRel(r.pkid),
        P::PubComp(c) => Inbound::PubComp(c.pkid),
        P::Subscribe(s) => {
            let id = s.properties.as_ref().and_then(|p| p.id).map(|id| u32::try_from(id).unwrap_or(u32::MAX));
            let filters = s
                .filters
                .into_iter()
                .map(|f| FilterIn {
                    path: f.path,
                    qos: qos_of_v5(f.qos),
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    retain_handling: match f.retain_forward_rule {
                        v5p::RetainForwardRule::OnEverySubscribe => 0,
                        v5p::RetainForwardRule::OnNewSubscribe => 1,
                        v5p::RetainForwardRule::Never => 2,
                    },
                })
                .collect();
            Inbound::Subscribe { pkid: s.pkid, filters, id }
        }
        P::Unsubscribe(u) => Inbound::Unsubscribe { pkid: u.pkid, filters: u.filters },
        P::PingReq(_) => Inbound::PingReq,
        P::Disconnect(d) => Inbound::Disconnect {
            reason: d.reason_code as u8,
            session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
        },
        P::Auth(_) => Inbound::Auth,
        P::ConnAck(_) => Inbound::Unexpected("CONNACK"),
        P::SubAck(_) => Inbound::Unexpected("SUBACK"),
        P::UnsubAck(_) => Inbound::Unexpected("UNSUBACK"),
        P::PingResp(_) => Inbound::Unexpected("PINGRESP"),
    }))
}

fn is_failure_rec(reason: v5p::PubRecReason) -> bool {
    !matches!(reason, v5p::PubRecReason::Success | v5p::PubRecReason::NoMatchingSubscribers)
}

fn will_v5(w: v5p::LastWill) -> Result<WillIn, DecodeError> {
    let topic = String::from_utf8(w.topic.to_vec()).map_err(|_| DecodeError::V5(v5b::Error::TopicNotUtf8))?;
    let (delay, expiry, props) = match w.properties {
        Some(p) => {
            let (delay, expiry) = (p.delay_interval.unwrap_or(0), p.message_expiry_interval);
            (delay, expiry, MessageProps::from_will(p))
        }
        None => (0, None, None),
    };
    Ok(WillIn { topic, payload: w.message, qos: qos_of_v5(w.qos) as u8, retain: w.retain, delay, props, expiry })
}

/// What a CONNACK tells an MQTT 5 client about this server and session.
#[derive(Debug, Default)]
pub struct ConnAckInfo {
    pub assigned_client_id: Option<String>,
    pub receive_maximum: u16,
    pub max_packet_size: u32,
    pub topic_alias_max: u16,
    pub server_keep_alive: Option<u16>,
    pub session_expiry: Option<u32>,
}

/// A message to the client.
#[derive(Debug)]
pub struct PublishOut<'a> {
    pub topic: &'a str,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub pkid: u16,
    /// MQTT 5 only: the topic alias (with `topic` empty once it is set).
    pub alias: Option<u16>,
    pub props: Option<&'a MessageProps>,
    /// Seconds left before the message expires.
    pub expiry: Option<u32>,
    pub subscription_ids: Vec<usize>,
}

/// Writes packets for one connection's protocol version.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    pub version: Version,
}

impl Codec {
    fn put_v4(buf: &mut BytesMut, packet: &rumqttc::Packet) {
        if let Err(e) = packet.write(buf, usize::MAX) {
            tracing::error!(error = %fluxmesh_mesh::error_chain(&e), "cannot encode an MQTT packet");
        }
    }

    fn put_v5(buf: &mut BytesMut, packet: &v5p::Packet) {
        if let Err(e) = packet.write(buf, None) {
            tracing::error!(error = %fluxmesh_mesh::error_chain(&e), "cannot encode an MQTT 5 packet");
        }
    }

    /// CONNACK. `code` is an MQTT 5 reason; 3.1.1 gets its nearest return
    /// code.
    pub fn connack(self, buf: &mut BytesMut, present: bool, code: u8, info: Option<&ConnAckInfo>) {
        match self.version {
            Version::V4 => {
                use rumqttc::ConnectReturnCode as C;
                let code = match code {
                    reason::SUCCESS => C::Success,
                    reason::UNSUPPORTED_PROTOCOL => C::RefusedProtocolVersion,
                    reason::CLIENT_ID_INVALID => C::BadClientId,
                    reason::BAD_USER_NAME_OR_PASSWORD => C::BadUserNamePassword,
                    reason::NOT_AUTHORIZED => C::NotAuthorized,
                    _ => C::ServiceUnavailable,
                };
                Self::put_v4(buf, &rumqttc::Packet::ConnAck(rumqttc::ConnAck::new(code, present)));
            }
            Version::V5 => {
                let properties = info.map(|i| v5p::ConnAckProperties {
                    session_expiry_interval: i.session_expiry,
                    receive_max: Some(i.receive_maximum),
                    max_qos: None,
                    retain_available: None,
                    max_packet_size: Some(i.max_packet_size),
                    assigned_client_identifier: i.assigned_client_id.clone(),
                    topic_alias_max: Some(i.topic_alias_max),
                    reason_string: None,
                    user_properties: Vec::new(),
                    wildcard_subscription_available: None,
                    subscription_identifiers_available: None,
                    shared_subscription_available: None,
                    server_keep_alive: i.server_keep_alive,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                });
                let ack = v5p::ConnAck { session_present: present, code: connack_code_v5(code), properties };
                Self::put_v5(buf, &v5p::Packet::ConnAck(ack));
            }
        }
    }

    /// Encodes a PUBLISH; its size in bytes.
    pub fn publish(self, buf: &mut BytesMut, out: PublishOut<'_>) -> usize {
        let before = buf.len();
        match self.version {
            Version::V4 => {
                let mut p = rumqttc::Publish::from_bytes(out.topic, out.qos, out.payload);
                p.retain = out.retain;
                p.pkid = out.pkid;
                Self::put_v4(buf, &rumqttc::Packet::Publish(p));
            }
            Version::V5 => {
                let mut properties = out.props.map(MessageProps::to_v5).unwrap_or_default();
                properties.topic_alias = out.alias;
                properties.message_expiry_interval = out.expiry;
                properties.subscription_identifiers = out.subscription_ids;
                let empty = properties == v5p::PublishProperties::default();
                let p = v5p::Publish {
                    dup: false,
                    qos: qos_to_v5(out.qos),
                    retain: out.retain,
                    topic: Bytes::copy_from_slice(out.topic.as_bytes()),
                    pkid: out.pkid,
                    payload: out.payload,
                    properties: (!empty).then_some(properties),
                };
                Self::put_v5(buf, &v5p::Packet::Publish(p));
            }
        }
        buf.len() - before
    }

    /// The size a PUBLISH would have, to keep under a client's maximum.
    pub fn publish_size(self, out: &PublishOut<'_>) -> usize {
        let mut scratch = BytesMut::new();
        let copy = PublishOut {
            topic: out.topic,
            payload: out.payload.clone(),
            qos: out.qos,
            retain: out.retain,
            pkid: out.pkid.max(1),
            alias: out.alias,
            props: out.props,
            expiry: out.expiry,
            subscription_ids: out.subscription_ids.clone(),
        };
        self.publish(&mut scratch, copy)
    }

    pub fn puback(self, buf: &mut BytesMut, pkid: u16, code: u8) {
        match self.version {
            Version::V4 => Self::put_v4(buf, &rumqttc::Packet::PubAck(rumqttc::PubAck::new(pkid))),
            Version::V5 => {
                let mut ack = v5p::PubAck::new(pkid, None);
                ack.reason = puback_reason(code);
                Self::put_v5(buf, &v5p::Packet::PubAck(ack));
            }
        }
    }

    pub fn pubrec(self, buf: &mut BytesMut, pkid: u16, code: u8) {
        match self.version {
            Version::V4 => Self::put_v4(buf, &rumqttc::Packet::PubRec(rumqttc::PubRec::new(pkid))),
            Version::V5 => {
                let mut rec = v5p::PubRec::new(pkid, None);
                rec.reason = pubrec_reason(code);
                Self::put_v5(buf, &v5p::Packet::PubRec(rec));
            }
        }
    }

    pub fn pubrel(self, buf: &mut BytesMut, pkid: u16) {
        match self.version {
            Version::V4 => Self::put_v4(buf, &rumqttc::Packet::PubRel(rumqttc::PubRel::new(pkid))),
            Version::V5 => Self::put_v5(buf, &v5p::Packet::PubRel(v5p::PubRel::new(pkid, None))),
        }
    }

    pub fn pubcomp(self, buf: &mut BytesMut, pkid: u16) {
        match self.version {
            Version::V4 => Self::put_v4(buf, &rumqttc::Packet::PubComp(rumqttc::PubComp::new(pkid))),
            Version::V5 => Self::put_v5(buf, &v5p::Packet::PubComp(v5p::PubComp::new(pkid, None))),
        }
    }

    /// SUBACK: per filter, the QoS granted or an MQTT 5 failure reason
    /// (3.1.1: 0x80 for every failure).
    pub fn suback(self, buf: &mut BytesMut, pkid: u16, results: &[Result<QoS, u8>]) {
        match self.version {
            Version::V4 => {
                use rumqttc::SubscribeReasonCode as R;
                let codes = results.iter().map(|r| r.map_or(R::Failure, R::Success)).collect();
                Self::put_v4(buf, &rumqttc::Packet::SubAck(rumqttc::SubAck::new(pkid, codes)));
            }
            Version::V5 => {
                use v5p::SubscribeReasonCode as R;
                let codes = results
                    .iter()
                    .map(|r| match r {
                        Ok(qos) => R::Success(qos_to_v5(*qos)),
                        Err(reason::NOT_AUTHORIZED) => R::NotAuthorized,
                        Err(reason::TOPIC_FILTER_INVALID) => R::TopicFilterInvalid,
                        Err(reason::IMPLEMENTATION_SPECIFIC) => R::ImplementationSpecific,
                        Err(reason::QUOTA_EXCEEDED) => R::QuotaExceeded,
                        Err(_) => R::Unspecified,
                    })
                    .collect();
                Self::put_v5(buf, &v5p::Packet::SubAck(v5p::SubAck { pkid, return_codes: codes, properties: None }));
            }
        }
    }

    /// UNSUBACK: per filter, whether a subscription existed.
    pub fn unsuback(self, buf: &mut BytesMut, pkid: u16, existed: &[bool]) {
        match self.version {
            Version::V4 => Self::put_v4(buf, &rumqttc::Packet::UnsubAck(rumqttc::UnsubAck::new(pkid))),
            Version::V5 => {
                let reasons = existed
                    .iter()
                    .map(|e| if *e { v5p::UnsubAckReason::Success } else { v5p::UnsubAckReason::NoSubscriptionExisted })
                    .collect();
                Self::put_v5(buf, &v5p::Packet::UnsubAck(v5p::UnsubAck { pkid, reasons, properties: None }));
            }
        }
    }

    pub fn pingresp(self, buf: &mut BytesMut) {
        match self.version {
            Version::V4 => Self::put_v4(buf, &rumqttc::Packet::PingResp),
            Version::V5 => Self::put_v5(buf, &v5p::Packet::PingResp(v5p::PingResp)),
        }
    }

    /// MQTT 5: a DISCONNECT saying why the server closes the connection.
    /// 3.1.1 has none: nothing is written.
    pub fn disconnect(self, buf: &mut BytesMut, code: u8) {
        if self.version == Version::V4 {
            return;
        }
        // Type, remaining length 1, the reason (no property list: MQTT 5
        // 3.14.2.2.1). See the module's notes for why not `rumqttc`.
        buf.extend_from_slice(&[0xE0, 0x01, code]);
    }
}

fn connack_code_v5(code: u8) -> v5p::ConnectReturnCode {
    use v5p::ConnectReturnCode as C;
    match code {
        reason::SUCCESS => C::Success,
        reason::MALFORMED => C::MalformedPacket,
        reason::PROTOCOL_ERROR => C::ProtocolError,
        reason::IMPLEMENTATION_SPECIFIC => C::ImplementationSpecificError,
        reason::UNSUPPORTED_PROTOCOL => C::UnsupportedProtocolVersion,
        reason::CLIENT_ID_INVALID => C::ClientIdentifierNotValid,
        reason::BAD_USER_NAME_OR_PASSWORD => C::BadUserNamePassword,
        reason::NOT_AUTHORIZED => C::NotAuthorized,
        reason::SERVER_UNAVAILABLE => C::ServerUnavailable,
        reason::BAD_AUTHENTICATION_METHOD => C::BadAuthenticationMethod,
        reason::PACKET_TOO_LARGE => C::PacketTooLarge,
        reason::QUOTA_EXCEEDED => C::QuotaExceeded,
        _ => C::UnspecifiedError,
    }
}

fn puback_reason(code: u8) -> v5p::PubAckReason {
    use v5p::PubAckReason as R;
    match code {
        reason::SUCCESS => R::Success,
        reason::IMPLEMENTATION_SPECIFIC => R::ImplementationSpecificError,
        reason::NOT_AUTHORIZED => R::NotAuthorized,
        reason::TOPIC_NAME_INVALID => R::TopicNameInvalid,
        reason::QUOTA_EXCEEDED => R::QuotaExceeded,
        reason::PAYLOAD_FORMAT_INVALID => R::PayloadFormatInvalid,
        _ => R::UnspecifiedError,
    }
}

fn pubrec_reason(code: u8) -> v5p::PubRecReason {
    use v5p::PubRecReason as R;
    match code {
        reason::SUCCESS => R::Success,
        reason::IMPLEMENTATION_SPECIFIC => R::ImplementationSpecificError,
        reason::NOT_AUTHORIZED => R::NotAuthorized,
        reason::TOPIC_NAME_INVALID => R::TopicNameInvalid,
        reason::QUOTA_EXCEEDED => R::QuotaExceeded,
        reason::PAYLOAD_FORMAT_INVALID => R::PayloadFormatInvalid,
        _ => R::UnspecifiedError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v5_codec() -> Codec {
        Codec { version: Version::V5 }
    }

    #[test]
    fn a_bare_disconnect_and_a_reason_only_disconnect_are_read() {
        let mut buf = BytesMut::from(&[0xE0u8, 0x00, 0xE0, 0x01, 0x04][..]);
        let first = read(Some(Version::V5), &mut buf, 1024).expect("read");
        assert!(matches!(first, Some(Inbound::Disconnect { reason: 0, .. })), "{first:?}");
        let second = read(Some(Version::V5), &mut buf, 1024).expect("read");
        assert!(matches!(second, Some(Inbound::Disconnect { reason: 0x04, .. })), "{second:?}");
        assert!(buf.is_empty());
    }

    #[test]
    fn a_disconnect_carries_its_reason() {
        let mut buf = BytesMut::new();
        v5_codec().disconnect(&mut buf, reason::RECEIVE_MAXIMUM_EXCEEDED);
        assert_eq!(&buf[..], &[0xE0, 0x01, 0x93]);
        let read = read(Some(Version::V5), &mut buf, 1024).expect("read");
        assert!(matches!(read, Some(Inbound::Disconnect { reason: 0x93, .. })), "{read:?}");
    }

    #[test]
    fn a_v5_connect_is_told_apart_by_its_level() {
        // CONNECT, MQTT level 5, clean start, keep alive 60, no
        // properties, client id "c".
        let connect = [0x10, 0x0E, 0x00, 0x04, b'M', b'Q', b'T', b'T', 5, 0x02, 0x00, 0x3C, 0x00, 0x00, 0x01, b'c'];
        let mut buf = BytesMut::from(&connect[..]);
        let Some(Inbound::Connect(c)) = read(None, &mut buf, 1024).expect("read") else { panic!("not a CONNECT") };
        assert_eq!(c.version, Version::V5);
        assert_eq!(c.client_id, "c");
        let mut partial = BytesMut::from(&connect[..8]);
        assert!(read(None, &mut partial, 1024).expect("partial").is_none(), "waits for the level");
    }

    #[test]
    fn a_refused_v4_connack_and_v5_reasons_encode() {
        let mut buf = BytesMut::new();
        Codec { version: Version::V4 }.connack(&mut buf, false, reason::UNSUPPORTED_PROTOCOL, None);
        assert_eq!(&buf[..], &[0x20, 0x02, 0x00, 0x01]);
        let mut buf = BytesMut::new();
        v5_codec().connack(&mut buf, false, reason::SERVER_UNAVAILABLE, None);
        assert_eq!(&buf[..], &[0x20, 0x03, 0x00, 0x88, 0x00]);
        let mut buf = BytesMut::new();
        v5_codec().puback(&mut buf, 7, reason::NOT_AUTHORIZED);
        assert_eq!(&buf[..], &[0x40, 0x04, 0x00, 0x07, 0x87, 0x00]);
    }
}
