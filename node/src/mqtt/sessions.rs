//! Persistent MQTT sessions (clean session 0): what survives the client's
//! absence, a reconnect to another node and the death of its node.
//!
//! A session is one message on `{prefix}.sess.{client}` in
//! `{PREFIX}_SESSIONS` (one per subject; empty: none): its subscriptions
//! with their granted QoS, and per stream the *cursor*, the sequence up to
//! which every message it matched has been delivered (acknowledged at QoS
//! 1 and 2). An offline session costs that message, nothing else: no
//! subscription in any node's broker, no consumer on any server. When the
//! client comes back, on any node, the node subscribes again and replays
//! each stream from the cursor (see `connection/session.rs`).
//!
//! The connection writes the record when its subscriptions change (before
//! the SUBACK), every `mqtt.session_save_interval_ms` while its cursors
//! move, and when it ends. A node killed between two writes loses at most
//! that interval of progress: those messages are sent again (QoS 1 and 2
//! are at least once across a node's death).

use bytes::Bytes;
use fluxmesh_mesh::Mesh;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const VERSION: u8 = 1;

/// What a persistent session keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SessionRecord {
    pub v: u8,
    /// Filter → granted QoS.
    pub subs: BTreeMap<String, u8>,
    /// Stream → the sequence up to which the session has had everything.
    pub cursors: BTreeMap<String, u64>,
    /// The node that wrote it last.
    pub node: String,
    pub updated_us: i64,
    /// MQTT 5 subscription options (no-local, retain-as-published,
    /// subscription identifier) of the filters that have any.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub opts: BTreeMap<String, StoredOpts>,
    /// MQTT 5 session expiry, in seconds from `ended_us`; absent: never
    /// (3.1.1, or the streams' `sessions_max_age_secs` ends it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_secs: Option<u32>,
    /// When the connection ended; absent while one holds the session (or
    /// its node died holding it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_us: Option<i64>,
}

/// A stored subscription's MQTT 5 options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredOpts {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nl: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rap: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
}

impl SessionRecord {
    /// The session expired: its connection ended more than its expiry ago.
    pub fn expired(&self, now_us: i64) -> bool {
        match (self.expiry_secs, self.ended_us) {
            (Some(secs), Some(ended)) => ended.saturating_add(i64::from(secs) * 1_000_000) <= now_us,
            _ => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("cannot read the session of `{client}`")]
    Load {
        client: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("the stored session of `{client}` is unreadable")]
    Corrupt {
        client: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot store the session of `{client}`")]
    Save {
        client: String,
        #[source]
        source: fluxmesh_mesh::PublishError,
    },
}

/// Reads and writes session records.
#[derive(Debug)]
pub(crate) struct SessionStore {
    mesh: Mesh,
    node_id: String,
    stream: tokio::sync::OnceCell<async_nats::jetstream::stream::Stream>,
}

impl SessionStore {
    pub fn new(mesh: Mesh, node_id: &str) -> SessionStore {
        SessionStore { mesh, node_id: node_id.to_owned(), stream: tokio::sync::OnceCell::new() }
    }

    async fn stream(&self) -> Result<&async_nats::jetstream::stream::Stream, async_nats::Error> {
        self.stream
            .get_or_try_init(|| async {
                self.mesh.js().get_stream(&self.mesh.layout().session_stream).await.map_err(async_nats::Error::from)
            })
            .await
    }

    /// The session stored for `client` and its stream sequence, if any.
    pub async fn load(&self, client: &str) -> Result<Option<(SessionRecord, u64)>, SessionError> {
        let load_err = |source| SessionError::Load { client: client.to_owned(), source };
        let stream = self.stream().await.map_err(load_err)?;
        let subject = self.mesh.subjects().session(client);
        let stored = match stream.direct_get_last_for_subject(subject).await {
            Ok(m) => m,
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(load_err(e.into())),
        };
        if stored.payload.is_empty() {
            return Ok(None);
        }
        let record: SessionRecord = serde_json::from_slice(&stored.payload)
            .map_err(|source| SessionError::Corrupt { client: client.to_owned(), source })?;
        Ok(Some((record, stored.sequence)))
    }

    /// Stores `record` for `client`; only if the stored one is still at
    /// `expected` when given. Returns the new record's sequence.
    pub async fn save(
        &self,
        client: &str,
        record: &mut SessionRecord,
        expected: Option<u64>,
    ) -> Result<u64, SessionError> {
        record.v = VERSION;
        record.node.clone_from(&self.node_id);
        record.updated_us = fluxmesh_schemas::frame::now_us();
        // Serializing maps of strings and numbers cannot fail.
        let body = serde_json::to_vec(record).unwrap_or_default();
        self.put(client, Bytes::from(body), expected).await
    }

    /// Forgets `client`'s session (a clean-session CONNECT).
    pub async fn discard(&self, client: &str) -> Result<(), SessionError> {
        self.put(client, Bytes::new(), None).await.map(|_| ())
    }

    async fn put(&self, client: &str, body: Bytes, expected: Option<u64>) -> Result<u64, SessionError> {
        let save_err = |source| SessionError::Save { client: client.to_owned(), source };
        let mut headers = async_nats::HeaderMap::new();
        if let Some(seq) = expected {
            headers.insert("Nats-Expected-Last-Subject-Sequence", seq.to_string().as_str());
        }
        let subject = self.mesh.subjects().session(client);
        let pending = self.mesh.publisher().publish(subject, headers, body).await.map_err(save_err)?;
        Ok(pending.ack().await.map_err(save_err)?.sequence)
    }
}

/// A connected persistent session's progress.
#[derive(Debug)]
pub(crate) struct Persist {
    /// As last loaded or saved, with the subscriptions as they are now.
    pub record: SessionRecord,
    /// The stored record's sequence, once there is one.
    pub seq: Option<u64>,
    /// Per stream: the highest sequence written to the client.
    pub written: std::collections::HashMap<std::sync::Arc<str>, u64>,
    /// Per stream: the highest sequence the replay read and the session
    /// did not match.
    pub scanned: std::collections::HashMap<std::sync::Arc<str>, u64>,
    /// The subscriptions changed since the last save.
    pub subs_changed: bool,
    /// A stored session was found at CONNECT (CONNACK's session present).
    pub present: bool,
}

impl Persist {
    pub fn new(record: SessionRecord, seq: Option<u64>) -> Persist {
        let present = seq.is_some();
        Persist { record, seq, written: Default::default(), scanned: Default::default(), subs_changed: false, present }
    }

    /// The cursors as of now. `pending` are the origins of messages sent
    /// but not yet acknowledged, or about to be sent; `idle` gives, for a
    /// stream with nothing queued for this session, the position up to
    /// which the node's feed has handed everything out.
    pub fn cursors<'a>(
        &self,
        pending: impl Iterator<Item = &'a (std::sync::Arc<str>, u64)>,
        idle: impl Fn(&str) -> Option<u64>,
    ) -> BTreeMap<String, u64> {
        let mut first_pending: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        for (stream, seq) in pending {
            let entry = first_pending.entry(stream.as_ref()).or_insert(*seq);
            *entry = (*entry).min(*seq);
        }
        let mut cursors = self.record.cursors.clone();
        for (stream, cursor) in cursors.iter_mut() {
            let key = stream.as_str();
            let mut done = (*cursor).max(self.written.get(key).copied().unwrap_or(0));
            done = done.max(self.scanned.get(key).copied().unwrap_or(0));
            match first_pending.get(key) {
                Some(first) => done = done.min(first.saturating_sub(1)),
                None => done = done.max(idle(key).unwrap_or(0)),
            }
            *cursor = done;
        }
        cursors
    }
}

/// Reading back one stream for a resumed session: from its cursor to the
/// stream's end when it resumed (later messages come live).
pub(crate) struct Replay {
    pub stream: std::sync::Arc<str>,
    pub reader: Option<fluxmesh_mesh::shard_reader::ShardReader>,
    pub next: u64,
    pub end: u64,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("stream", &self.stream)
            .field("next", &self.next)
            .field("end", &self.end)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn cursors_stop_before_the_first_unacknowledged_message() {
        let mut record = SessionRecord::default();
        record.cursors.insert("A".into(), 10);
        record.cursors.insert("B".into(), 5);
        record.cursors.insert("C".into(), 7);
        let mut p = Persist::new(record, Some(1));
        let (a, b): (Arc<str>, Arc<str>) = ("A".into(), "B".into());
        p.written.insert(a.clone(), 20);
        p.written.insert(b.clone(), 9);
        let pending = [(a.clone(), 15), (a.clone(), 12)];
        let cursors = p.cursors(pending.iter(), |s| (s == "C").then_some(30));
        assert_eq!(cursors["A"], 11, "everything before the first unacknowledged message");
        assert_eq!(cursors["B"], 9, "everything written, nothing pending");
        assert_eq!(cursors["C"], 30, "idle: as far as the feed has handed out");
        p.scanned.insert(b, 40);
        assert_eq!(p.cursors([].iter(), |_| None)["B"], 40, "the replay passed unmatched messages");
    }
}
