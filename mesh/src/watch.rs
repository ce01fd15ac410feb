//! Watches that outlive the server: every watch a node keeps on a bucket
//! (membership, leases, rules, plugins, device credentials) is a
//! [`Rewatch`], which starts over when NATS ends it, fails it, or lets it
//! fall silent.
//!
//! A NATS server restart can end an async-nats watch, or leave it silent
//! for tens of seconds before it reports a missed heartbeat. So once a
//! second the bucket's last revision is compared with what the watch
//! delivered, and a watch that stays behind for a whole second is
//! re-created. What a re-created watch delivers depends on its [`Source`]:
//! the current values again ([`KvHistory`], [`ObjectMetas`]), or the
//! changes after the last revision delivered ([`KvChanges`]).

use crate::lifecycle::Lifecycle;
use async_nats::jetstream::{self, kv, object_store};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{StreamExt as _, TryStreamExt as _};
use std::time::Duration;
use tokio::sync::mpsc;

/// How often a watch is checked against its bucket.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How many watched items wait for a slow reader (then the watch waits).
const QUEUE: usize = 256;

/// What a watch's stream yields: an item and the revision (stream
/// sequence) it was stored at.
pub type Revisioned<T> = (u64, T);

type Items<T> = BoxStream<'static, Result<Revisioned<T>, async_nats::Error>>;
type Opened<T> = (Items<T>, u64);

/// Something a [`Rewatch`] can watch and re-open.
pub trait Source: Send + Sync + 'static {
    type Item: Send + 'static;

    /// Opens a watch. `after`: the last revision a previous watch
    /// delivered (0: none yet). Returns the items and the revision the
    /// watch starts after.
    fn open(&self, after: u64) -> BoxFuture<'_, Result<Opened<Self::Item>, async_nats::Error>>;

    /// The last revision the bucket holds.
    fn last_revision(&self) -> BoxFuture<'_, Result<u64, async_nats::Error>>;

    /// The bucket's name, for errors.
    fn bucket(&self) -> &str;
}

/// A KV bucket's current value of every key, then every change; a
/// re-created watch replays the current values.
#[derive(Debug, Clone)]
pub struct KvHistory(pub kv::Store);

impl Source for KvHistory {
    type Item = kv::Entry;

    fn open(&self, _after: u64) -> BoxFuture<'_, Result<Opened<kv::Entry>, async_nats::Error>> {
        Box::pin(async move {
            let watch = self.0.watch_with_history(">").await?;
            Ok((watch.map_ok(|e| (e.revision, e)).map_err(Into::into).boxed(), 0))
        })
    }

    fn last_revision(&self) -> BoxFuture<'_, Result<u64, async_nats::Error>> {
        // Not `Store::status`: it answers the info cached when the store
        // was opened, so a silent watch would never look behind.
        Box::pin(async move { Ok(self.0.stream.get_info().await?.state.last_sequence) })
    }

    fn bucket(&self) -> &str {
        &self.0.name
    }
}

/// A KV bucket's changes after a revision (0: after the bucket's last one
/// when the watch first opens); a re-created watch goes on from the last
/// revision delivered, so nothing is replayed and nothing missed.
#[derive(Debug, Clone)]
pub struct KvChanges(pub kv::Store);

impl Source for KvChanges {
    type Item = kv::Entry;

    fn open(&self, after: u64) -> BoxFuture<'_, Result<Opened<kv::Entry>, async_nats::Error>> {
        Box::pin(async move {
            let after = if after == 0 { self.last_revision().await? } else { after };
            let watch = self.0.watch_all_from_revision(after + 1).await?;
            Ok((watch.map_ok(|e| (e.revision, e)).map_err(Into::into).boxed(), after))
        })
    }

    fn last_revision(&self) -> BoxFuture<'_, Result<u64, async_nats::Error>> {
        Box::pin(async move { Ok(self.0.stream.get_info().await?.state.last_sequence) })
    }

    fn bucket(&self) -> &str {
        &self.0.name
    }
}

/// An object store's current objects (their metadata), then every change;
/// a re-created watch replays the current objects. An unreadable metadata
/// entry is handed on as an error for the reader to count.
///
/// The store's stream also holds the objects' chunks, so its last revision
/// can run ahead of the last metadata entry while an upload is in
/// progress; a watch re-created then replays what it had already seen,
/// which readers skip.
#[derive(Debug, Clone)]
pub struct ObjectMetas {
    stream: jetstream::stream::Stream,
    client: async_nats::Client,
    bucket: String,
}

impl ObjectMetas {
    /// Opens the object store `bucket`'s stream.
    pub async fn open(js: &jetstream::Context, bucket: &str) -> Result<ObjectMetas, async_nats::Error> {
        let stream = js.get_stream(format!("OBJ_{bucket}")).await?;
        Ok(ObjectMetas { stream, client: js.client(), bucket: bucket.to_owned() })
    }
}

impl Source for ObjectMetas {
    type Item = Result<object_store::ObjectInfo, serde_json::Error>;

    fn open(&self, _after: u64) -> BoxFuture<'_, Result<Opened<Self::Item>, async_nats::Error>> {
        Box::pin(async move {
            let consumer = self
                .stream
                .create_consumer(jetstream::consumer::push::OrderedConfig {
                    deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
                    deliver_subject: self.client.new_inbox(),
                    description: Some("fluxmesh object store watch".to_owned()),
                    filter_subject: format!("$O.{}.M.>", self.bucket),
                    ..Default::default()
                })
                .await?;
            let messages = consumer.messages().await?;
            let items = messages.map_err(async_nats::Error::from).and_then(|message| async move {
                let revision = message.info()?.stream_sequence;
                Ok((revision, serde_json::from_slice(&message.payload)))
            });
            Ok((items.boxed(), 0))
        })
    }

    fn last_revision(&self) -> BoxFuture<'_, Result<u64, async_nats::Error>> {
        Box::pin(async move { Ok(self.stream.get_info().await?.state.last_sequence) })
    }

    fn bucket(&self) -> &str {
        &self.bucket
    }
}

/// What a [`Rewatch`] hands its reader.
#[derive(Debug)]
pub enum Watched<T> {
    Item(T),
    /// The watch was re-created: for a source that replays, its current
    /// values come next.
    Restarted,
}

/// The first watch could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch bucket {bucket}")]
pub struct WatchError {
    pub bucket: String,
    #[source]
    pub source: async_nats::Error,
}

/// A watch that re-creates itself; see the module docs.
pub struct Rewatch<S: Source> {
    source: S,
    items: Option<Items<S::Item>>,
    what: &'static str,
    /// Set when a new watch starts.
    restarted: bool,
    /// How many times the watch was re-created.
    restarts: u64,
    /// Highest revision delivered.
    seen: u64,
    /// The bucket's last revision at the previous check.
    last_at_check: u64,
    check: tokio::time::Interval,
}

impl<S: Source> std::fmt::Debug for Rewatch<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewatch")
            .field("bucket", &self.source.bucket())
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl<S: Source> Rewatch<S> {
    /// Opens the first watch now; `after` as in [`Source::open`]. `what`
    /// names the watch in logs and in `fluxmesh_watch_restarts_total{watch}`.
    pub async fn open(source: S, what: &'static str, after: u64) -> Result<Rewatch<S>, WatchError> {
        let (items, after) = match source.open(after).await {
            Ok(opened) => opened,
            Err(e) => return Err(WatchError { bucket: source.bucket().to_owned(), source: e }),
        };
        let mut watch = Rewatch::lazy(source, what, after);
        watch.items = Some(items);
        Ok(watch)
    }

    /// A watch whose first open happens in its task, retried until it
    /// succeeds.
    pub fn lazy(source: S, what: &'static str, after: u64) -> Rewatch<S> {
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Rewatch { source, items: None, what, restarted: false, restarts: 0, seen: after, last_at_check: 0, check }
    }

    /// Runs the watch in a task of its own (so that nothing cancels it
    /// halfway through a check) until the stop signal or until the
    /// receiver is gone. A slow reader makes the watch wait: nothing is
    /// dropped.
    pub fn spawn(mut self, life: &Lifecycle) -> mpsc::Receiver<Watched<S::Item>> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task_life = life.clone();
        life.spawn(async move {
            loop {
                let item = tokio::select! {
                    _ = task_life.stopped() => return,
                    item = self.next() => item,
                };
                if std::mem::take(&mut self.restarted) && tx.send(Watched::Restarted).await.is_err() {
                    return;
                }
                if tx.send(Watched::Item(item)).await.is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// The next item, re-creating the watch as often as needed.
    async fn next(&mut self) -> S::Item {
        loop {
            let Some(items) = self.items.as_mut() else {
                match self.source.open(self.seen).await {
                    Ok((items, after)) => {
                        tracing::info!(watch = self.what, "watch opened");
                        self.items = Some(items);
                        self.seen = self.seen.max(after);
                        // A lazy watch's first open is no restart.
                        self.restarted = self.restarts > 0;
                        self.last_at_check = 0;
                    }
                    Err(e) => {
                        tracing::warn!(watch = self.what, error = %crate::error_chain(e.as_ref()), "cannot re-create the watch yet");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
                continue;
            };
            tokio::select! {
                next = items.next() => match next {
                    Some(Ok((revision, item))) => {
                        self.seen = self.seen.max(revision);
                        return item;
                    }
                    Some(Err(e)) => tracing::warn!(watch = self.what, error = %crate::error_chain(e.as_ref()), "watch failed; re-creating it"),
                    None => tracing::warn!(watch = self.what, "watch ended; re-creating it"),
                },
                _ = self.check.tick() => {
                    let last = match tokio::time::timeout(CHECK_EVERY, self.source.last_revision()).await {
                        Ok(Ok(last)) => last,
                        _ => continue,
                    };
                    let behind = self.last_at_check > 0 && self.seen < self.last_at_check;
                    self.last_at_check = last;
                    if !behind {
                        continue;
                    }
                    tracing::warn!(watch = self.what, seen = self.seen, bucket = last, "watch fell silent; re-creating it");
                }
            }
            metrics::counter!(crate::metric_names::WATCH_RESTARTS_TOTAL, "watch" => self.what).increment(1);
            self.restarts += 1;
            self.items = None;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
