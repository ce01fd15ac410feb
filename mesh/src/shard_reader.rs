//! Reading one shard's telemetry in stream order, with no acknowledgements.
//!
//! The owner of a shard tracks its own progress (see [`crate::checkpoint`]),
//! so the server keeps no per-message state for it: the reader is an
//! ephemeral, ack-less, in-memory, single-replica consumer filtered to the
//! shard's subjects, starting at a given stream sequence. Deliveries are
//! numbered 1, 2, 3, … per consumer; a jump (deliveries lost in flight) or a
//! silent consumer (its server went away) makes the reader delete it and
//! create a new one starting right after the last message it handed out, so
//! the worker sees every message once and in order.
//!
//! Every reader names its consumers afresh: `{name}-{token}-{serial}`, with
//! a random token per reader. Creating a consumer is create-or-update, and a
//! consumer of the same name and config that a failed reader left behind
//! (its delete lost while JetStream had no leader; it lingers until its
//! inactivity threshold) would come back with its cursor past the messages
//! it already delivered: the new reader would wait for them forever. A
//! created consumer that has delivered anything is replaced all the same.
//!
//! async-nats's ordered consumer does the same, but when it has to start
//! over before its first message it starts from the beginning of the
//! stream instead of the requested sequence: a whole re-read for a shard
//! whose checkpoint is far along.

use async_nats::jetstream::{self, consumer, consumer::pull};
use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    #[error("cannot open stream {stream}")]
    Stream {
        stream: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("consumer {name} on {stream} exists and has delivered {delivered} messages already")]
    NotFresh { stream: String, name: String, delivered: u64 },
    #[error("cannot create the shard consumer on {stream} (tried {attempts} times)")]
    Create {
        stream: String,
        attempts: u32,
        #[source]
        source: async_nats::Error,
    },
}

/// How long a consumer may stay silent (no message, no idle heartbeat)
/// before it is replaced.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// Attempts to create a consumer before giving up (about 10 s).
const CREATE_ATTEMPTS: u32 = 20;

type Messages = pull::Stream;

/// One shard's reader. `next` is cancel-safe: a consumer being created
/// when the caller stops waiting is kept and finished on the next call.
pub struct ShardReader {
    stream: jetstream::stream::Stream,
    filter: String,
    name: String,
    serial: u64,
    batch: usize,
    /// The stream sequence to start from when (re)creating.
    next_seq: u64,
    /// The consumer sequence the next delivery must have.
    next_delivery: u64,
    /// Messages matching the filter after the last one handed out, as of
    /// its delivery.
    pending: u64,
    messages: Option<Messages>,
    creating: Option<BoxFuture<'static, Result<Messages, ReaderError>>>,
}

impl std::fmt::Debug for ShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReader")
            .field("filter", &self.filter)
            .field("next_seq", &self.next_seq)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl ShardReader {
    /// A reader of `filter` in stream `stream_name` from sequence `start`
    /// on, pulling up to `batch` at a time. `name` identifies it on the
    /// server (a random token and a serial are appended per consumer).
    pub async fn open(
        js: &jetstream::Context,
        stream_name: &str,
        filter: String,
        name: String,
        start: u64,
        batch: usize,
    ) -> Result<ShardReader, ReaderError> {
        let stream = js
            .get_stream(stream_name)
            .await
            .map_err(|e| ReaderError::Stream { stream: stream_name.to_owned(), source: e.into() })?;
        Ok(ShardReader {
            stream,
            filter,
            name: format!("{name}-{:08x}", rand::random::<u32>()),
            serial: 0,
            batch,
            next_seq: start.max(1),
            next_delivery: 1,
            pending: 0,
            messages: None,
            creating: None,
        })
    }

    /// Messages of the shard stored after the last one handed out, as the
    /// server counted at its delivery (0 when caught up).
    pub fn pending(&self) -> u64 {
        self.pending
    }

    /// The stream sequence of the next message wanted.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The next message in stream order. Errors only when no consumer can
    /// be created for about 10 s.
    pub async fn next(&mut self) -> Result<jetstream::Message, ReaderError> {
        loop {
            let Some(messages) = self.messages.as_mut() else {
                if self.creating.is_none() {
                    let old = self.old_name();
                    let config = self.config();
                    self.creating = Some(create(self.stream.clone(), config, old, self.batch).boxed());
                }
                let Some(creating) = self.creating.as_mut() else { continue };
                let created = creating.await;
                self.creating = None;
                self.messages = Some(created?);
                self.next_delivery = 1;
                continue;
            };
            match messages.next().await {
                Some(Ok(m)) => {
                    let Ok(info) = m.info() else {
                        self.restart("a delivery without JetStream metadata");
                        continue;
                    };
                    if info.consumer_sequence != self.next_delivery {
                        metrics::counter!(crate::metric_names::SHARD_DELIVERY_GAPS_TOTAL).increment(1);
                        self.restart("delivery gap");
                        continue;
                    }
                    self.next_delivery += 1;
                    self.next_seq = info.stream_sequence + 1;
                    self.pending = info.pending;
                    return Ok(m);
                }
                Some(Err(e)) if e.kind() == pull::MessagesErrorKind::Pull => {
                    tracing::debug!(filter = %self.filter, error = %crate::error_chain(&e), "pull hiccup");
                }
                Some(Err(e)) => {
                    tracing::info!(filter = %self.filter, error = %crate::error_chain(&e), "shard consumer failed; creating a new one");
                    self.restart("consumer failed");
                }
                None => self.restart("message stream ended"),
            }
        }
    }

    /// The next message if one is already here, without waiting.
    pub fn try_next(&mut self) -> Option<jetstream::Message> {
        self.messages.as_ref()?;
        self.next().now_or_never().and_then(Result::ok)
    }

    /// Deletes the current consumer (best effort; it expires by itself too).
    pub async fn close(mut self) {
        self.messages = None;
        if self.serial > 0 {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), self.stream.delete_consumer(&self.current_name())).await;
        }
    }

    fn restart(&mut self, why: &'static str) {
        tracing::debug!(filter = %self.filter, why, from = self.next_seq, "re-creating the shard consumer");
        metrics::counter!(crate::metric_names::SHARD_CONSUMER_RECREATED_TOTAL).increment(1);
        self.messages = None;
    }

    /// The name of the consumer the reader reads through now, if any.
    pub fn consumer_name(&self) -> Option<String> {
        self.messages.is_some().then(|| self.current_name())
    }

    fn current_name(&self) -> String {
        format!("{}-{}", self.name, self.serial)
    }

    fn old_name(&self) -> Option<String> {
        (self.serial > 0).then(|| self.current_name())
    }

    /// The next consumer's config (advances the serial).
    fn config(&mut self) -> pull::Config {
        self.serial += 1;
        pull::Config {
            name: Some(self.current_name()),
            filter_subject: self.filter.clone(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: self.next_seq },
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(10),
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        }
    }
}

/// Deletes `old` (best effort), creates the consumer and starts pulling,
/// retrying for about 10 s.
async fn create(
    stream: jetstream::stream::Stream,
    config: pull::Config,
    old: Option<String>,
    batch: usize,
) -> Result<Messages, ReaderError> {
    if let Some(old) = old {
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.delete_consumer(&old)).await;
    }
    let mut backoff = Duration::from_millis(100);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let made = async {
            let consumer: consumer::PullConsumer = stream.create_consumer(config.clone()).await?;
            let delivered = consumer.cached_info().delivered.consumer_sequence;
            if delivered > 0 {
                // Not ours: delete it; the next attempt makes a fresh one.
                let name = consumer.cached_info().name.clone();
                let _ = stream.delete_consumer(&name).await;
                let stream = stream.cached_info().config.name.clone();
                return Err(Box::new(ReaderError::NotFresh { stream, name, delivered }) as async_nats::Error);
            }
            let messages = consumer
                .stream()
                .max_messages_per_batch(batch)
                .expires(Duration::from_secs(5))
                .heartbeat(HEARTBEAT)
                .messages()
                .await?;
            Ok::<_, async_nats::Error>(messages)
        };
        match made.await {
            Ok(messages) => return Ok(messages),
            Err(e) if attempt >= CREATE_ATTEMPTS => {
                return Err(ReaderError::Create {
                    stream: stream.cached_info().config.name.clone(),
                    attempts: attempt,
                    source: e,
                })
            }
            Err(e) => {
                tracing::debug!(error = %crate::error_chain(e.as_ref()), attempt, "cannot create the shard consumer yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
