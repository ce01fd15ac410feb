//! What a session is sent: messages read back from the streams, queued
//! per session ([`Outbox`]) by the broker's feeds and by shared
//! subscription pullers, with what did not fit recorded in its
//! [`Overflow`].

use crate::internal_events::{emit, mqtt};
use async_nats::jetstream::message::{AckKind, Acker};
use bytes::Bytes;
use std::sync::Arc;

/// A message read back from a stream, for every subscriber it matches.
#[derive(Debug)]
pub(crate) struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// The QoS it was published with.
    pub qos: u8,
    /// Published with the retain flag (for retain-as-published).
    pub retain: bool,
    /// MQTT 5 properties for subscribers.
    pub props: Option<super::props::MessageProps>,
    /// When it expires, in ms since the Unix epoch.
    pub expires_ms: Option<u64>,
    /// The publishing client (escaped), when it asked for no-local.
    pub client: Option<String>,
}

impl Message {
    /// Reads what an MQTT publish stored with the message
    /// (`ingress::MqttMeta` and the flags).
    pub fn new(topic: String, payload: Bytes, headers: Option<&async_nats::HeaderMap>) -> Message {
        use fluxmesh_schemas::headers as h;
        let get = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
        let props = get(h::MQTT_PROPS).and_then(|v| match super::props::MessageProps::from_header(v) {
            Ok(p) => Some(p),
            Err(e) => {
                emit(mqtt::StoredUnreadable { what: "properties", subject: &topic, error: Some(&e) });
                None
            }
        });
        Message {
            qos: stored_qos(headers),
            retain: get(h::RETAIN) == Some("1"),
            props,
            expires_ms: get(h::EXPIRES_MS).and_then(|v| v.parse().ok()),
            client: get(h::CLIENT).map(str::to_owned),
            topic,
            payload,
        }
    }

    /// Expired at `now_ms`: not sent to anyone any more.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_ms.is_some_and(|at| at <= now_ms)
    }
}

/// One message for one session, at the QoS it is to be sent with.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub message: Arc<Message>,
    pub qos: u8,
    /// Sent with the retain flag: a retained message, on subscribe.
    pub retain: bool,
    /// The stream and sequence it was read from (not for retained
    /// messages): how a persistent session tracks what it was sent.
    pub origin: Option<(Arc<str>, u64)>,
    /// For a shared subscription's message: acknowledges it to the group.
    pub share: Option<ShareAck>,
}

/// A session's queue of messages to send.
pub(crate) type Outbox = tokio::sync::mpsc::Sender<Outgoing>;

/// One subscription of one session.
#[derive(Debug, Clone)]
pub(crate) struct Sub {
    pub qos: u8,
    pub outbox: Outbox,
    /// Where the session hears what did not fit in its outbox.
    pub overflow: Arc<Overflow>,
}

/// Messages that did not fit in a session's outbox: per stream, the first
/// sequence dropped. The session reads them back from the stream instead
/// (a catch-up), so a slow subscriber falls behind but loses nothing the
/// streams still hold.
#[derive(Debug, Default)]
pub(crate) struct Overflow {
    first: std::sync::Mutex<std::collections::HashMap<Arc<str>, u64>>,
    pub notify: tokio::sync::Notify,
}

impl Overflow {
    pub fn record(&self, stream: &Arc<str>, seq: u64) {
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        first.entry(stream.clone()).and_modify(|s| *s = (*s).min(seq)).or_insert(seq);
        drop(first);
        self.notify.notify_one();
    }

    /// The streams that overflowed since the last call, with the first
    /// sequence dropped.
    pub fn take(&self) -> std::collections::HashMap<Arc<str>, u64> {
        std::mem::take(&mut *self.first.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The first dropped sequence per stream, not yet taken.
    pub fn pending(&self) -> Vec<(Arc<str>, u64)> {
        let first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        first.iter().map(|(s, q)| (s.clone(), *q)).collect()
    }
}

/// Acknowledges a shared message to its group once the member has.
#[derive(Clone)]
pub(crate) struct ShareAck(Arc<Acker>);

impl std::fmt::Debug for ShareAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShareAck")
    }
}

impl ShareAck {
    pub fn new(acker: Acker) -> ShareAck {
        ShareAck(Arc::new(acker))
    }

    /// The member has it.
    pub async fn done(&self) {
        if let Err(e) = self.0.ack().await {
            emit(mqtt::SharedAckFailed { error: e.as_ref() });
        }
    }

    /// The member left without it: send it to another member now.
    pub async fn give_back(&self) {
        let _ = self.0.ack_with(AckKind::Nak(None)).await;
    }
}

/// The QoS a stored message was published with (`Fm-Qos`; absent: 1).
fn stored_qos(headers: Option<&async_nats::HeaderMap>) -> u8 {
    match headers.and_then(|h| h.get(fluxmesh_schemas::headers::QOS)).map(|v| v.as_str()) {
        Some("0") => 0,
        Some("2") => 2,
        _ => 1,
    }
}
