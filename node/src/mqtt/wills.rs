//! MQTT wills: published when a connection ends without DISCONNECT, also
//! when the node that held the connection dies.
//!
//! A CONNECT with a will is answered only once the will is kept in the
//! `{PREFIX}_WILLS` stream, on `{prefix}.will.{node}.{incarnation}.{client}`
//! (one message per subject; empty: no will). When the connection ends:
//! - with DISCONNECT, the record is cleared and nothing is published;
//! - any other way (the socket closes, keep-alive expires, a protocol
//!   error, takeover, revoked credentials, the node stopping), this node
//!   publishes the will as the client would have, then clears the record.
//!
//! When a node dies, its records stay. Every node watches the live set;
//! when a run of a node (its id and incarnation) leaves it, the desired
//! owner (rendezvous over the live nodes) of each record's client shard
//! publishes that will and clears the record. A node that starts sweeps
//! every record of a run that is not live, once its view of the cluster has
//! settled: that covers its own previous run, and a cluster that died
//! whole. Each will carries an id made at CONNECT, so when two nodes fire
//! the same will (views that differ for a moment, a node dying between
//! publishing and clearing) JetStream stores it once.

use crate::ingress::{IngestError, Ingress, MqttPublish};
use crate::internal_events::{emit, mqtt};
use crate::lifecycle::Lifecycle;
use bytes::{BufMut, Bytes, BytesMut};
use fluxmesh_mesh::cluster::View;
use fluxmesh_schemas::FrameId;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Record format version (first byte). Version 1 records (no MQTT 5
/// properties) are still read.
const VERSION: u8 = 2;

/// A will, as kept and as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// Made at CONNECT; names what the will is stored as.
    pub id: FrameId,
    /// MQTT 5 properties for its subscribers (JSON, as the
    /// `Fm-Mqtt-Props` header).
    pub props: Option<String>,
    /// MQTT 5 message expiry, in seconds from when it is published.
    pub expiry: Option<u32>,
}

/// The part of a record after the topic that version 1 lacked.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Extra {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    props: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expiry: Option<u32>,
}

impl Will {
    /// `[version][qos][retain][id: 16][topic length: u16 BE][topic]
    /// [extra length: u16 BE][extra: JSON][payload]`.
    fn encode(&self) -> Bytes {
        let extra = Extra { props: self.props.clone(), expiry: self.expiry };
        // Strings and numbers always serialize.
        let extra = serde_json::to_vec(&extra).unwrap_or_default();
        let mut out = BytesMut::with_capacity(23 + self.topic.len() + extra.len() + self.payload.len());
        out.put_u8(VERSION);
        out.put_u8(self.qos);
        out.put_u8(u8::from(self.retain));
        out.put_slice(&self.id.0);
        // Topics are at most MAX_TOPIC_LEN (1024) bytes, checked at CONNECT;
        // the properties are bounded by the CONNECT's size.
        out.put_u16(u16::try_from(self.topic.len()).unwrap_or(u16::MAX));
        out.put_slice(self.topic.as_bytes());
        out.put_u16(u16::try_from(extra.len()).unwrap_or(u16::MAX));
        out.put_slice(&extra);
        out.put_slice(&self.payload);
        out.freeze()
    }

    fn decode(bytes: &Bytes) -> Option<Will> {
        let (&version, rest) = bytes.split_first()?;
        if !(1..=VERSION).contains(&version) || rest.len() < 20 {
            return None;
        }
        let (qos, retain) = (rest[0], rest[1] == 1);
        let id = FrameId(rest.get(2..18)?.try_into().ok()?);
        let len = usize::from(u16::from_be_bytes([rest[18], rest[19]]));
        let topic = std::str::from_utf8(rest.get(20..20 + len)?).ok()?.to_owned();
        let mut start = 1 + 20 + len;
        let mut extra = Extra::default();
        if version >= 2 {
            let at = start - 1;
            let extra_len = usize::from(u16::from_be_bytes([*rest.get(at)?, *rest.get(at + 1)?]));
            extra = serde_json::from_slice(rest.get(at + 2..at + 2 + extra_len)?).ok()?;
            start += 2 + extra_len;
        }
        let payload = bytes.get(start..).map(|_| bytes.slice(start..))?;
        Some(Will { topic, payload, qos: qos.min(2), retain, id, props: extra.props, expiry: extra.expiry })
    }

    /// The key its stored ids derive from.
    fn key(&self) -> String {
        format!("will:{}", self.id)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WillError {
    #[error("cannot keep the will")]
    Keep(#[source] IngestError),
    #[error("cannot publish the will")]
    Publish(#[source] IngestError),
    #[error("cannot read the wills of nodes that left")]
    Read(#[source] fluxmesh_mesh::ReadError),
    #[error("cannot open the wills stream")]
    Stream(#[source] async_nats::Error),
}

/// Keeps, clears and publishes the wills of this node's sessions, and of
/// nodes that died.
#[derive(Debug)]
pub struct Wills {
    ingress: Ingress,
    node_id: String,
    incarnation: String,
}

impl Wills {
    pub fn new(ingress: Ingress, node_id: &str, incarnation: &str) -> Arc<Wills> {
        Arc::new(Wills { ingress, node_id: node_id.to_owned(), incarnation: incarnation.to_owned() })
    }

    fn subject(&self, client: &str) -> String {
        self.ingress.subjects().will(&self.node_id, &self.incarnation, client)
    }

    /// Keeps `will` for `client`'s session here; returns once stored, with
    /// the record's stream sequence (for [`Wills::clear`]).
    pub async fn keep(&self, client: &str, will: &Will) -> Result<u64, WillError> {
        self.put(self.subject(client), will.encode(), None).await.map_err(WillError::Keep)
    }

    /// Clears `client`'s will record at stream sequence `seq` (it said
    /// DISCONNECT, or its will was published), unless a newer session with
    /// the same client id has replaced it. Best effort: a record left
    /// behind is published only if this node dies, and stored once by its
    /// id if it was published already.
    pub async fn clear(&self, client: &str, seq: u64) {
        if let Err(e) = self.put(self.subject(client), Bytes::new(), Some(seq)).await {
            emit(mqtt::WillClearFailed { client, error: &e });
        }
    }

    /// Stores `body` on `subject`, only if the subject's last message is at
    /// `expected` when given.
    async fn put(&self, subject: String, body: Bytes, expected: Option<u64>) -> Result<u64, IngestError> {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(seq) = expected {
            headers.insert("Nats-Expected-Last-Subject-Sequence", seq.to_string().as_str());
        }
        let pending = self.ingress.mesh().publisher().publish(subject, headers, body).await?;
        Ok(pending.ack().await?.sequence)
    }

    /// Publishes `will` as its client would have: stored before this
    /// returns, retained if it says so.
    pub async fn publish(&self, client: &str, will: &Will, why: &'static str) -> Result<(), WillError> {
        let key = will.key();
        let meta = crate::ingress::MqttMeta {
            props: will.props.clone(),
            expires_ms: will.expiry.map(|s| super::props::now_ms() + u64::from(s) * 1000),
            client: None,
        };
        let publish = MqttPublish {
            topic: &will.topic,
            payload: will.payload.clone(),
            qos: will.qos,
            retain: will.retain,
            key: Some(&key),
            meta: (!meta.is_empty()).then_some(&meta),
        };
        let sent = self.ingress.submit_mqtt(publish).await.map_err(WillError::Publish)?;
        self.ingress.stored_mqtt(sent).await.map_err(WillError::Publish)?;
        emit(mqtt::WillPublished { client, topic: &will.topic, why });
        Ok(())
    }

    /// Publishes and clears the wills of every run of a node that is not in
    /// `view` (of `node` only, if given) whose client shard this node is
    /// the desired owner of. Returns how many it published.
    pub async fn sweep(&self, view: &View, node: Option<&str>) -> Result<usize, WillError> {
        let subjects = self.ingress.subjects();
        let mesh = self.ingress.mesh();
        let name = &mesh.layout().will_stream;
        let stream = mesh.js().get_stream(name).await.map_err(|e| WillError::Stream(e.into()))?;
        let config = fluxmesh_mesh::read::last_per_subject(vec![subjects.will_filter(node)]);
        let mut found: Vec<(String, u64, String, Will)> = Vec::new();
        fluxmesh_mesh::read_pending(&stream, config, Duration::from_secs(5), |stored| {
            if stored.payload.is_empty() {
                return Ok(());
            }
            let Ok((node, incarnation, client)) = subjects.parse_will(&stored.subject) else {
                metrics::counter!(crate::internal_events::names::MQTT_WILL_RECORDS_BAD_TOTAL).increment(1);
                return Ok(());
            };
            if view.live.get(&node).is_some_and(|m| m.incarnation == incarnation) {
                return Ok(());
            }
            let seq = stored.info()?.stream_sequence;
            match Will::decode(&stored.payload) {
                Some(will) => found.push((stored.subject.to_string(), seq, client, will)),
                None => metrics::counter!(crate::internal_events::names::MQTT_WILL_RECORDS_BAD_TOTAL).increment(1),
            }
            Ok(())
        })
        .await
        .map_err(WillError::Read)?;
        let live = view.live_ids();
        let shards = mesh.shards();
        let mut published = 0;
        for (subject, seq, client, will) in found {
            let shard = fluxmesh_schemas::shard_of(&client, shards);
            if fluxmesh_mesh::placement::owner(shard, &live) != Some(self.node_id.as_str()) {
                continue;
            }
            self.publish(&client, &will, "node_gone").await?;
            if let Err(e) = self.put(subject, Bytes::new(), Some(seq)).await {
                tracing::warn!(%client, error = %fluxmesh_mesh::error_chain(&e), "cannot clear a will record after publishing it");
            }
            published += 1;
        }
        Ok(published)
    }
}

/// Publishes the wills of node runs that leave the live set, until the
/// stop signal.
/// First, once the view has had a liveness timeout to fill, sweeps every
/// run that is not live.
pub async fn watch_departures(
    wills: Arc<Wills>,
    mut views: tokio::sync::watch::Receiver<View>,
    settle: Duration,
    life: Lifecycle,
) {
    tokio::select! {
        _ = life.stopped() => return,
        _ = tokio::time::sleep(settle) => {}
    }
    let runs = |view: &View| -> BTreeMap<String, String> {
        view.live.iter().map(|(id, m)| (id.clone(), m.incarnation.clone())).collect()
    };
    let view = views.borrow_and_update().clone();
    let mut known = runs(&view);
    sweep_logged(&wills, &view, None).await;
    loop {
        tokio::select! {
            _ = life.stopped() => return,
            changed = views.changed() => if changed.is_err() { return },
        }
        let view = views.borrow_and_update().clone();
        let now = runs(&view);
        let gone: Vec<String> = known
            .iter()
            .filter(|(id, incarnation)| now.get(*id) != Some(*incarnation) && **id != wills.node_id)
            .map(|(id, _)| id.clone())
            .collect();
        known = now;
        for node in gone {
            sweep_logged(&wills, &view, Some(&node)).await;
        }
    }
}

async fn sweep_logged(wills: &Wills, view: &View, node: Option<&str>) {
    match wills.sweep(view, node).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(node = node.unwrap_or("any"), published = n, "published the wills of a node that left"),
        Err(e) => {
            emit(mqtt::WillSweepFailed { node: node.unwrap_or("any"), error: &e });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let will = Will {
            topic: "devices/d1/status".into(),
            payload: Bytes::from_static(b"offline"),
            qos: 2,
            retain: true,
            id: FrameId::new_v7(),
            props: Some(r#"{"up":[["a","2"]]}"#.into()),
            expiry: Some(30),
        };
        assert_eq!(Will::decode(&will.encode()), Some(will.clone()));
        // A version 1 record: no properties.
        let mut v1 = vec![1u8, 1, 0];
        v1.extend_from_slice(&will.id.0);
        v1.extend_from_slice(&[0, 1, b't']);
        v1.extend_from_slice(b"gone");
        let old = Will::decode(&Bytes::from(v1)).expect("version 1 record");
        assert_eq!((old.topic.as_str(), &old.payload[..], old.props, old.qos), ("t", &b"gone"[..], None, 1));
        let empty = Will { payload: Bytes::new(), retain: false, ..will };
        assert_eq!(Will::decode(&empty.encode()), Some(empty));
        assert_eq!(Will::decode(&Bytes::from_static(b"\x03junk")), None);
        assert_eq!(Will::decode(&Bytes::new()), None);
        assert_eq!(Will::decode(&Bytes::from_static(&[1, 0, 0, 1, 2])), None);
    }
}
