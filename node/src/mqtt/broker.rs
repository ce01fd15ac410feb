//! Subscriptions across the mesh: every MQTT subscriber on this node
//! receives what was stored on any node.
//!
//! Nodes never talk to each other: what a subscriber receives is read back
//! from the streams, so it was stored before anyone sees it, arrives in
//! stream order (one device's telemetry is in one partition; plain topics
//! are in one stream), and is the same whichever node it was published on.
//!
//! The node reads each stream it needs once, whatever its number of
//! subscribers: a *feed* is one ack-less reader
//! ([`fluxmesh_mesh::shard_reader::ShardReader`]) of one telemetry partition
//! or of the plain-message stream, started by the first subscription that
//! can match it (`devices/d1/#` needs only d1's partition; `#` needs them
//! all) at the stream's end, before that subscription's SUBACK. Feeds run
//! until the node stops. Each message read is matched against the node's
//! [`FilterTree`] and queued once per matching session, at the lower of the
//! QoS it was published with and the highest QoS the session was granted
//! for a matching filter. A session's queue holds `mqtt.session_queue`
//! messages; what does not fit is dropped for that session and counted,
//! and the feed never waits for a slow subscriber.

use super::outbox::{Message, Outgoing, Sub};
use super::topics::FilterTree;
use crate::internal_events::{emit, mqtt};
use crate::lifecycle::Lifecycle;
use bytes::Bytes;
use fluxmesh_mesh::shard_reader::ShardReader;
use fluxmesh_mesh::Mesh;
use fluxmesh_schemas::frame::{self, ArchivedBody};
use fluxmesh_schemas::subject::DEVICE_TOPIC_ROOT;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::mpsc::error::TrySendError;

/// Messages pulled from a stream per request.
const FEED_BATCH: usize = 256;

/// A stream the node reads for its subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Feed {
    Telemetry(u32),
    Messages,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum FeedError {
    #[error("cannot read stream {stream} for subscribers")]
    Stream {
        stream: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("cannot read the retained messages from {stream}")]
    Retained {
        stream: String,
        #[source]
        source: fluxmesh_mesh::ReadError,
    },
    #[error("cannot open a reader of stream {stream} for subscribers")]
    Reader {
        stream: String,
        #[source]
        source: fluxmesh_mesh::shard_reader::ReaderError,
    },
}

/// Metric handles registered once: the feeds touch them per message.
#[derive(Debug)]
struct BrokerMetrics {
    read: metrics::Counter,
    queued: metrics::Counter,
    dropped: metrics::Counter,
    deferred: metrics::Counter,
    subscriptions: metrics::Gauge,
}

/// The node's subscriptions and the feeds that serve them.
#[derive(Debug)]
pub(crate) struct Broker {
    mesh: Mesh,
    /// Names this node's feed consumers on the servers.
    node_id: String,
    tree: RwLock<FilterTree<u64, Sub>>,
    feeds: tokio::sync::Mutex<HashSet<Feed>>,
    /// Per stream read by a feed: the sequence of the last message it
    /// handed to the sessions.
    positions: std::sync::Mutex<std::collections::HashMap<String, Arc<AtomicU64>>>,
    life: Lifecycle,
    metrics: BrokerMetrics,
}

impl Broker {
    pub fn new(mesh: Mesh, node_id: &str, life: Lifecycle) -> Arc<Broker> {
        let node_id = node_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        Arc::new(Broker {
            mesh,
            node_id,
            tree: RwLock::new(FilterTree::default()),
            feeds: tokio::sync::Mutex::new(HashSet::new()),
            positions: std::sync::Mutex::new(std::collections::HashMap::new()),
            life,
            metrics: BrokerMetrics {
                read: metrics::counter!(crate::internal_events::names::MQTT_FEED_MESSAGES_TOTAL),
                queued: metrics::counter!(crate::internal_events::names::MQTT_DELIVERIES_QUEUED_TOTAL),
                dropped: metrics::counter!(crate::internal_events::names::MQTT_DELIVERIES_DROPPED_TOTAL, "reason" => "queue_full"),
                deferred: metrics::counter!(crate::internal_events::names::MQTT_DELIVERIES_DEFERRED_TOTAL),
                subscriptions: metrics::gauge!(crate::internal_events::names::MQTT_SUBSCRIPTIONS),
            },
        })
    }

    /// Adds `session`'s subscription to `filter` (a valid filter), once the
    /// streams it can match are being read: every message stored after
    /// this returns reaches the session.
    pub async fn subscribe(self: &Arc<Self>, session: u64, filter: &str, sub: Sub) -> Result<(), FeedError> {
        self.ensure_feeds(filter).await?;
        let mut tree = self.tree.write().unwrap_or_else(|e| e.into_inner());
        tree.insert(filter, session, sub);
        self.metrics.subscriptions.set(tree.len() as f64);
        Ok(())
    }

    /// Removes `session`'s subscription to `filter`; whether it had one.
    pub fn unsubscribe(&self, session: u64, filter: &str) -> bool {
        let mut tree = self.tree.write().unwrap_or_else(|e| e.into_inner());
        let removed = tree.remove(filter, &session).is_some();
        self.metrics.subscriptions.set(tree.len() as f64);
        removed
    }

    /// The retained messages `filter` matches, at most `limit` (the rest
    /// are counted as dropped), each at min(its QoS, `granted`).
    pub async fn retained(&self, filter: &str, granted: u8, limit: usize) -> Result<Vec<Outgoing>, FeedError> {
        // Nobody can publish, so retain, on a `$` topic.
        if filter.starts_with('$') {
            return Ok(Vec::new());
        }
        let name = &self.mesh.layout().retained_stream;
        let stream = self
            .mesh
            .js()
            .get_stream(name)
            .await
            .map_err(|e| FeedError::Stream { stream: name.clone(), source: e.into() })?;
        let config = fluxmesh_mesh::read::last_per_subject(self.mesh.subjects().retained_filters(filter));
        let mut found = Vec::new();
        let mut over = 0u64;
        let read = fluxmesh_mesh::read_pending(&stream, config, Duration::from_secs(5), |stored| {
            // An empty message is a cleared one.
            if stored.payload.is_empty() {
                return Ok(());
            }
            let Ok(topic) = self.mesh.subjects().mqtt_topic(&stored.subject) else {
                metrics::counter!(crate::internal_events::names::MQTT_FEED_UNREADABLE_TOTAL, "reason" => "retained_subject").increment(1);
                return Ok(());
            };
            if found.len() >= limit {
                over += 1;
                return Ok(());
            }
            let message = Message::new(topic, stored.payload.clone(), stored.headers.as_ref());
            if message.expired(super::props::now_ms()) {
                return Ok(());
            }
            let qos = granted.min(message.qos);
            found.push(Outgoing { message: Arc::new(message), qos, retain: true, origin: None, share: None });
            Ok(())
        })
        .await;
        read.map_err(|source| FeedError::Retained { stream: name.clone(), source })?;
        if over > 0 {
            emit(mqtt::RetainedOverQueue { filter, over, limit });
        }
        Ok(found)
    }

    /// The streams a subscription to `filter` can receive from, by name.
    pub fn streams_for(&self, filter: &str) -> Vec<String> {
        self.feeds_for(filter).into_iter().map(|f| self.stream_of(f).to_owned()).collect()
    }

    /// The sequence of the last message of `stream` this node's feed has
    /// handed to its sessions, if it reads that stream.
    pub fn position(&self, stream: &str) -> Option<u64> {
        let positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        positions.get(stream).map(|p| p.load(Ordering::Acquire))
    }

    /// The JetStream context the broker reads with.
    pub fn js(&self) -> &async_nats::jetstream::Context {
        self.mesh.js()
    }

    /// The sequence of the last message stored in `stream`.
    pub async fn last_seq(&self, stream: &str) -> Result<u64, FeedError> {
        let err = |e: async_nats::Error| FeedError::Stream { stream: stream.to_owned(), source: e };
        let mut s = self.mesh.js().get_stream(stream).await.map_err(|e| err(e.into()))?;
        Ok(s.info().await.map_err(|e| err(e.into()))?.state.last_sequence)
    }

    /// A reader of `stream` from sequence `from` on, for one session's
    /// replay (named after it).
    pub async fn replay_reader(&self, stream: &str, from: u64, session: u64) -> Result<ShardReader, FeedError> {
        let consumer = format!("replay-{}-{session}", self.node_id);
        ShardReader::open(self.mesh.js(), stream, String::new(), consumer, from, FEED_BATCH)
            .await
            .map_err(|source| FeedError::Reader { stream: stream.to_owned(), source })
    }

    /// The MQTT message a message read from `stream` carries.
    pub fn decode_from(
        &self,
        stream: &str,
        stored: &async_nats::jetstream::Message,
        scratch: &mut frame::AlignedVec,
    ) -> Option<Message> {
        let telemetry = stream != self.mesh.layout().message_stream;
        self.decode(telemetry, stored, scratch)
    }

    /// The streams a subscription to `filter` can receive from.
    fn feeds_for(&self, filter: &str) -> Vec<Feed> {
        let layout = self.mesh.layout();
        let all_partitions = || (0..layout.partitions).map(Feed::Telemetry);
        let mut levels = filter.split('/');
        match levels.next() {
            Some("+" | "#") => all_partitions().chain([Feed::Messages]).collect(),
            Some(DEVICE_TOPIC_ROOT) => match levels.next() {
                None | Some("+" | "#") => all_partitions().collect(),
                Some(device) => {
                    let shard = fluxmesh_schemas::shard_of(device, layout.shards);
                    vec![Feed::Telemetry(fluxmesh_schemas::partition_of(shard, layout.shards, layout.partitions))]
                }
            },
            // Nobody can publish on a `$` topic.
            Some(first) if first.starts_with('$') => Vec::new(),
            _ => vec![Feed::Messages],
        }
    }

    async fn ensure_feeds(self: &Arc<Self>, filter: &str) -> Result<(), FeedError> {
        let wanted = self.feeds_for(filter);
        let mut running = self.feeds.lock().await;
        for feed in wanted {
            if running.contains(&feed) {
                continue;
            }
            let reader = self.open(feed).await?;
            running.insert(feed);
            let start = reader.next_seq().saturating_sub(1);
            self.positions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(self.stream_of(feed).to_owned(), Arc::new(AtomicU64::new(start)));
            tracing::info!(stream = %self.stream_of(feed), "reading the stream for this node's MQTT subscribers");
            self.life.spawn(self.clone().run(feed, reader));
        }
        Ok(())
    }

    fn stream_of(&self, feed: Feed) -> &str {
        let layout = self.mesh.layout();
        match feed {
            Feed::Telemetry(p) => layout.telemetry_streams.get(p as usize).map_or("", String::as_str),
            Feed::Messages => &layout.message_stream,
        }
    }

    /// A reader positioned after the stream's last message.
    async fn open(&self, feed: Feed) -> Result<ShardReader, FeedError> {
        let name = self.stream_of(feed).to_owned();
        let stream_err = |e: async_nats::Error| FeedError::Stream { stream: name.clone(), source: e };
        let mut stream = self.mesh.js().get_stream(&name).await.map_err(|e| stream_err(e.into()))?;
        let last = stream.info().await.map_err(|e| stream_err(e.into()))?.state.last_sequence;
        let consumer = format!("feed-{}-{}", self.node_id, name);
        ShardReader::open(self.mesh.js(), &name, String::new(), consumer, last + 1, FEED_BATCH)
            .await
            .map_err(|source| FeedError::Reader { stream: name.clone(), source })
    }

    /// Reads one stream until the node stops, handing each message to the
    /// sessions it matches.
    async fn run(self: Arc<Self>, feed: Feed, mut reader: ShardReader) {
        let mut scratch = frame::AlignedVec::new();
        let stream: Arc<str> = self.stream_of(feed).into();
        let position = {
            let positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
            positions.get(&*stream).cloned().unwrap_or_default()
        };
        loop {
            let next = tokio::select! {
                _ = self.life.stopped() => break,
                next = reader.next() => next,
            };
            match next {
                Ok(stored) => {
                    self.metrics.read.increment(1);
                    let seq = stored.info().map(|i| i.stream_sequence).ok();
                    let telemetry = matches!(feed, Feed::Telemetry(_));
                    if let Some(message) = self.decode(telemetry, &stored, &mut scratch) {
                        self.dispatch(message, seq.map(|s| (stream.clone(), s)));
                    }
                    // After the dispatch: a session that sees this position
                    // and an empty queue has been sent all it matched.
                    if let Some(seq) = seq {
                        position.store(seq, Ordering::Release);
                    }
                }
                Err(e) => {
                    // The reader keeps its position and tries again.
                    emit(mqtt::FeedReadFailed { stream: self.stream_of(feed), error: &e });
                    tokio::select! {
                        _ = self.life.stopped() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        reader.close().await;
    }

    /// The MQTT message a stored one carries, or `None` (counted) if it is
    /// not one this node can read.
    fn decode(
        &self,
        telemetry: bool,
        stored: &async_nats::jetstream::Message,
        scratch: &mut frame::AlignedVec,
    ) -> Option<Message> {
        let bad = |what: &'static str| {
            emit(mqtt::StoredUnreadable { what, subject: &stored.subject, error: None });
            None
        };
        let Ok(topic) = self.mesh.subjects().mqtt_topic(&stored.subject) else { return bad("subject") };
        let payload = if telemetry {
            match frame::access(&stored.payload, scratch) {
                Ok(f) => match &f.body {
                    ArchivedBody::Telemetry { payload } => Bytes::copy_from_slice(payload.as_slice()),
                    _ => return bad("not_telemetry"),
                },
                Err(_) => return bad("frame"),
            }
        } else {
            stored.payload.clone()
        };
        Some(Message::new(topic, payload, stored.headers.as_ref()))
    }

    /// Queues `message` once for every session with a matching
    /// subscription, at the highest QoS among them.
    fn dispatch(&self, message: Message, origin: Option<(Arc<str>, u64)>) {
        let message = Arc::new(message);
        let tree = self.tree.read().unwrap_or_else(|e| e.into_inner());
        let mut targets: Vec<(u64, u8, &Sub)> = Vec::new();
        tree.for_each_match(&message.topic, |session, sub| targets.push((*session, sub.qos, sub)));
        // Overlapping subscriptions of one session: one copy, at the
        // highest QoS granted (MQTT 3.1.1 section 3.3.5).
        targets.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        targets.dedup_by_key(|t| t.0);
        for (_, granted, sub) in targets {
            let out = Outgoing {
                message: message.clone(),
                qos: granted.min(message.qos),
                retain: false,
                origin: origin.clone(),
                share: None,
            };
            match sub.outbox.try_send(out) {
                Ok(()) => self.metrics.queued.increment(1),
                Err(TrySendError::Full(out)) => match &out.origin {
                    // The session reads it back from the stream.
                    Some((stream, seq)) => {
                        self.metrics.deferred.increment(1);
                        sub.overflow.record(stream, *seq);
                    }
                    None => self.metrics.dropped.increment(1),
                },
                // The session is ending; it unsubscribes as it goes.
                Err(TrySendError::Closed(_)) => {}
            }
        }
    }
}
