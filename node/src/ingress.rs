//! The one path every device message takes into the mesh, whatever it came
//! in over (MQTT, HTTP): check it, frame it, publish it to its shard's
//! telemetry subject, and mirror it as JSON once stored.

pub use crate::internal_events::Source;
use bytes::Bytes;
use fluxmesh_mesh::{Mesh, Pending, PublishError};
use fluxmesh_schemas::frame::{self, Frame, FrameId};
use fluxmesh_schemas::{shard_of, DeviceTopic, PlainTopic, Subjects, TopicError};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Rules shared by MQTT and HTTP ingest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Largest device payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// Subject families to mirror as JSON on `{prefix}.json.…`:
    /// any of `"tel"`, `"evt"`.
    pub json_mirror: Vec<String>,
    /// Messages a second one device may send (token bucket); 0 = no limit.
    /// MQTT devices over it are slowed down (backpressure), HTTP requests
    /// get 429 with Retry-After.
    pub device_rate_per_sec: u32,
    /// Bucket size: messages a device may send at once after being quiet;
    /// 0 = the same as the rate.
    pub device_burst: u32,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig { max_payload_bytes: 256 * 1024, json_mirror: Vec::new(), device_rate_per_sec: 0, device_burst: 0 }
    }
}

/// Why a device message was not taken.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error("payload of {size} bytes is larger than the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("frame could not be encoded")]
    Encode(#[from] frame::FrameError),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl IngestError {
    pub fn reason(&self) -> &'static str {
        match self {
            IngestError::Topic(e) => e.reason(),
            IngestError::TooLarge { .. } => "oversize",
            IngestError::Encode(_) => "encode",
            IngestError::Publish(e) => e.reason(),
        }
    }
}

/// A device message, as it arrived.
#[derive(Debug)]
pub struct DeviceMessage<'a> {
    pub topic: DeviceTopic<'a>,
    pub payload: Bytes,
    /// Given by HTTP callers; derives the frame id so a retried request is
    /// stored once.
    pub idempotency_key: Option<&'a str>,
    pub device_time_us: Option<i64>,
    /// The MQTT QoS it was published with (HTTP: 1).
    pub qos: u8,
    /// What an MQTT publish adds to the stored message.
    pub meta: Option<&'a MqttMeta>,
    /// Published with the MQTT retain flag (`Fm-Retain`).
    pub retain: bool,
}

/// A message on a plain MQTT topic (outside `devices/`): stored in the
/// message stream as it came, for subscribers only.
#[derive(Debug)]
pub struct PlainMessage<'a> {
    pub topic: PlainTopic<'a>,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// The id to store it under (deterministic for a will, so that a will
    /// fired twice is stored once); a new one if `None`.
    pub id: Option<FrameId>,
    pub meta: Option<&'a MqttMeta>,
}

/// What an MQTT publish adds to the stored message, as headers: its MQTT 5
/// properties, when it expires, and who published it (for no-local
/// subscriptions). See `fluxmesh_schemas::headers`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MqttMeta {
    pub props: Option<String>,
    pub expires_ms: Option<u64>,
    pub client: Option<String>,
}

impl MqttMeta {
    pub fn is_empty(&self) -> bool {
        *self == MqttMeta::default()
    }

    fn apply(&self, headers: &mut async_nats::HeaderMap) {
        use fluxmesh_schemas::headers as h;
        if let Some(props) = &self.props {
            headers.insert(h::MQTT_PROPS, props.as_str());
        }
        if let Some(at) = self.expires_ms {
            headers.insert(h::EXPIRES_MS, at.to_string().as_str());
        }
        if let Some(client) = &self.client {
            headers.insert(h::CLIENT, fluxmesh_schemas::subject::escape_token(client).as_ref());
        }
    }
}

/// A PUBLISH as an MQTT client sent it (or its will), on a device topic or
/// a plain one.
#[derive(Debug)]
pub struct MqttPublish<'a> {
    pub topic: &'a str,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// Derives the stored ids, so that sending it again stores it once.
    pub key: Option<&'a str>,
    pub meta: Option<&'a MqttMeta>,
}

/// A sent MQTT publish: the message and, if retained, its retained copy.
#[derive(Debug)]
#[must_use = "await `Ingress::stored_mqtt` to learn whether the message was stored"]
pub struct MqttInFlight {
    sent: InFlight,
    retained: Option<Pending>,
}

/// The result of a stored message.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: FrameId,
    pub subject: String,
    pub stream: String,
    pub sequence: u64,
    pub duplicate: bool,
}

/// Metric handles registered once, so the hot path does no label lookups.
#[derive(Debug, Clone)]
struct IngressMetrics {
    stored_mqtt: metrics::Counter,
    stored_http: metrics::Counter,
    ingest_seconds: metrics::Histogram,
    duplicates: metrics::Counter,
    in_flight: metrics::Gauge,
}

impl IngressMetrics {
    fn new() -> Self {
        let stored =
            |s: Source| metrics::counter!(crate::internal_events::names::INGEST_MESSAGES_TOTAL, "source" => s.as_str());
        IngressMetrics {
            stored_mqtt: stored(Source::Mqtt),
            stored_http: stored(Source::Http),
            ingest_seconds: metrics::histogram!(crate::internal_events::names::INGEST_SECONDS),
            duplicates: metrics::counter!(crate::internal_events::names::PUBLISH_DUPLICATES_TOTAL),
            in_flight: metrics::gauge!(crate::internal_events::names::PUBLISH_IN_FLIGHT),
        }
    }

    fn stored(&self, s: Source) -> &metrics::Counter {
        match s {
            Source::Mqtt => &self.stored_mqtt,
            Source::Http => &self.stored_http,
        }
    }
}

/// A cheap, clonable handle shared by every ingress source.
#[derive(Debug, Clone)]
pub struct Ingress {
    mesh: Mesh,
    node_id: std::sync::Arc<str>,
    max_payload: usize,
    mirror_json: bool,
    metrics: IngressMetrics,
}

/// A sent message whose ack is still to come.
#[derive(Debug)]
#[must_use = "await `stored` to learn whether the message was stored"]
pub struct InFlight {
    pending: Pending,
    id: FrameId,
    subject: String,
    received: Instant,
    /// The encoded frame, kept only when the JSON mirror needs it.
    mirror: Option<Bytes>,
}

impl InFlight {
    /// The id the message is stored under.
    pub fn id(&self) -> FrameId {
        self.id
    }
}

impl Ingress {
    pub fn new(mesh: Mesh, node_id: &str, max_payload: usize, mirror_json: bool) -> Self {
        Ingress { mesh, node_id: node_id.into(), max_payload, mirror_json, metrics: IngressMetrics::new() }
    }

    pub fn subjects(&self) -> &Subjects {
        self.mesh.subjects()
    }

    /// Checks, frames and sends one message. Waits while the publish window
    /// is full: that wait is the backpressure every source feels.
    pub async fn submit(&self, msg: DeviceMessage<'_>) -> Result<InFlight, IngestError> {
        let received = Instant::now();
        if msg.payload.len() > self.max_payload {
            return Err(IngestError::TooLarge { size: msg.payload.len(), limit: self.max_payload });
        }
        let shard = shard_of(msg.topic.device, self.mesh.shards());
        let subject = self.mesh.subjects().telemetry(shard, &msg.topic);
        let mut frame = Frame::telemetry(msg.topic.device, msg.topic.channel, &self.node_id, msg.payload.to_vec());
        frame.device_time_us = msg.device_time_us;
        if let Some(key) = msg.idempotency_key {
            let mut k = Vec::with_capacity(msg.topic.device.len() + key.len() + 1);
            k.extend_from_slice(msg.topic.device.as_bytes());
            k.push(0);
            k.extend_from_slice(key.as_bytes());
            frame.id = FrameId::from_key(&k);
        }
        let mut header_map = fluxmesh_mesh::frame_headers(&frame);
        if msg.qos != 1 {
            header_map.insert(fluxmesh_schemas::headers::QOS, qos_token(msg.qos));
        }
        if msg.retain {
            header_map.insert(fluxmesh_schemas::headers::RETAIN, "1");
        }
        if let Some(meta) = msg.meta {
            meta.apply(&mut header_map);
        }
        let bytes = Bytes::from(frame.encode()?);
        let mirror = self.mirror_json.then(|| bytes.clone());
        let publisher = self.mesh.publisher();
        let pending = publisher.publish(subject.clone(), header_map, bytes).await?;
        self.metrics.in_flight.set(publisher.in_flight() as f64);
        Ok(InFlight { pending, id: frame.id, subject, received, mirror })
    }

    /// Sends one message on a plain topic, as it came: the payload is the
    /// NATS message's body, so any NATS client reads it as published.
    pub async fn submit_plain(&self, msg: PlainMessage<'_>) -> Result<InFlight, IngestError> {
        let received = Instant::now();
        if msg.payload.len() > self.max_payload {
            return Err(IngestError::TooLarge { size: msg.payload.len(), limit: self.max_payload });
        }
        let subject = self.mesh.subjects().message(&msg.topic);
        let id = msg.id.unwrap_or_else(FrameId::new_v7);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(fluxmesh_schemas::headers::MSG_ID, id.to_string().as_str());
        if msg.qos != 1 {
            headers.insert(fluxmesh_schemas::headers::QOS, qos_token(msg.qos));
        }
        if msg.retain {
            headers.insert(fluxmesh_schemas::headers::RETAIN, "1");
        }
        if let Some(meta) = msg.meta {
            meta.apply(&mut headers);
        }
        let publisher = self.mesh.publisher();
        let pending = publisher.publish(subject.clone(), headers, msg.payload).await?;
        self.metrics.in_flight.set(publisher.in_flight() as f64);
        Ok(InFlight { pending, id, subject, received, mirror: None })
    }

    /// Sends an MQTT publish: a device topic as telemetry, any other topic
    /// as a plain message, and, if it is retained, right after it its
    /// retained copy (on the same connection, so retained messages are
    /// kept in publish order).
    pub async fn submit_mqtt(&self, publish: MqttPublish<'_>) -> Result<MqttInFlight, IngestError> {
        let MqttPublish { topic, payload, qos, retain, key, meta } = publish;
        let retained = retain.then(|| payload.clone());
        let sent = match DeviceTopic::parse(topic) {
            Ok(device_topic) => {
                let message = DeviceMessage {
                    topic: device_topic,
                    payload,
                    idempotency_key: key,
                    device_time_us: None,
                    qos,
                    meta,
                    retain,
                };
                self.submit(message).await?
            }
            Err(device_err) => match PlainTopic::parse(topic) {
                Ok(plain) => {
                    let id = key.map(|k| FrameId::from_key(k.as_bytes()));
                    self.submit_plain(PlainMessage { topic: plain, payload, qos, retain, id, meta }).await?
                }
                // A topic under `devices/` that is not a device topic says
                // more than "not a plain topic".
                Err(TopicError::NotDeviceTopic) => return Err(device_err.into()),
                Err(e) => return Err(e.into()),
            },
        };
        let retained = match retained {
            Some(payload) => Some(self.send_retained(topic, qos, payload, sent.id, meta).await?),
            None => None,
        };
        Ok(MqttInFlight { sent, retained })
    }

    /// Waits until an MQTT publish (and its retained copy) is stored.
    pub async fn stored_mqtt(&self, sent: MqttInFlight) -> Result<Stored, IngestError> {
        let stored = self.stored(sent.sent, Source::Mqtt).await?;
        if let Some(retained) = sent.retained {
            retained.ack().await?;
        }
        Ok(stored)
    }

    /// Sends `payload` as the retained message of `topic` (any valid topic
    /// name), to replace the one before; an empty payload clears it. Sent
    /// right after the message itself (`id` is its id), on the same
    /// connection, so retained messages are kept in publish order; the
    /// returned ack says when it is stored.
    pub async fn send_retained(
        &self,
        topic: &str,
        qos: u8,
        payload: Bytes,
        id: FrameId,
        meta: Option<&MqttMeta>,
    ) -> Result<Pending, IngestError> {
        let subject = self.mesh.subjects().retained(topic);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(fluxmesh_schemas::headers::MSG_ID, format!("{id}-r").as_str());
        if qos != 1 {
            headers.insert(fluxmesh_schemas::headers::QOS, qos_token(qos));
        }
        if let Some(meta) = meta.filter(|_| !payload.is_empty()) {
            meta.apply(&mut headers);
        }
        let op = if payload.is_empty() { "clear" } else { "set" };
        let pending = self.mesh.publisher().publish(subject, headers, payload).await?;
        metrics::counter!(crate::internal_events::names::MQTT_RETAINED_TOTAL, "op" => op).increment(1);
        Ok(pending)
    }

    /// Waits for the ack of `sent` (with retries), then mirrors it as JSON.
    pub async fn stored(&self, sent: InFlight, source: Source) -> Result<Stored, IngestError> {
        let result = sent.pending.ack().await;
        // Its window slot is free again: the gauge must not keep the count
        // from its send once the node goes quiet.
        self.metrics.in_flight.set(self.mesh.publisher().in_flight() as f64);
        let ack = match result {
            Ok(ack) => ack,
            Err(e) => {
                metrics::counter!(crate::internal_events::names::INGEST_FAILED_TOTAL, "source" => source.as_str(), "reason" => e.reason())
                    .increment(1);
                return Err(e.into());
            }
        };
        self.metrics.stored(source).increment(1);
        self.metrics.ingest_seconds.record(sent.received.elapsed().as_secs_f64());
        if ack.duplicate {
            self.metrics.duplicates.increment(1);
        }
        if let Some(bytes) = sent.mirror {
            self.mirror(&sent.subject, &bytes).await;
        }
        Ok(Stored {
            id: sent.id,
            subject: sent.subject,
            stream: ack.stream,
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// Submits and waits for the ack: the strict path HTTP uses.
    pub async fn ingest(&self, msg: DeviceMessage<'_>, source: Source) -> Result<Stored, IngestError> {
        let sent = self.submit(msg).await?;
        self.stored(sent, source).await
    }

    async fn mirror(&self, subject: &str, bytes: &[u8]) {
        let Some(json_subject) = self.mesh.subjects().json_mirror(subject) else { return };
        let mut scratch = frame::AlignedVec::new();
        let json = match frame::access(bytes, &mut scratch) {
            Ok(frame) => fluxmesh_schemas::json::to_vec(frame),
            Err(e) => {
                tracing::error!(error = %fluxmesh_mesh::error_chain(&e), "frame we encoded does not validate");
                return;
            }
        };
        if let Err(e) = self.mesh.client().publish(json_subject, json.into()).await {
            crate::internal_events::emit(crate::internal_events::ingest::JsonMirrorFailed { error: &e });
        }
    }

    /// Stops taking new messages; those already sent still complete.
    pub fn close(&self) {
        self.mesh.publisher().close();
    }

    /// The mesh this ingress publishes to.
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }
}

fn qos_token(qos: u8) -> &'static str {
    match qos {
        0 => "0",
        1 => "1",
        _ => "2",
    }
}
