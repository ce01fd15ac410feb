//! JetStream publishing with a bounded window of outstanding acks.
//!
//! [`Publisher::publish`] waits for a slot in the window (this is where
//! backpressure reaches ingress), sends, and returns a [`Pending`] that the
//! caller awaits for the ack. The slot is held until the ack arrives or the
//! publish finally fails, so at most `publish_window` publishes are ever
//! unacknowledged. A publish that times out or is refused is sent again with
//! the same headers, and so the same `Nats-Msg-Id`: JetStream's dedupe
//! window makes a retry of a message that was in fact stored a no-op.

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::{self, publish::PublishAck};
use async_nats::HeaderMap;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::NatsConfig;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publisher is closed")]
    Closed,
    #[error("JetStream did not store the message after {attempts} attempts")]
    NotStored {
        attempts: u32,
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
    #[error("message of {size} bytes is larger than the server allows")]
    TooLarge { size: usize },
}

impl PublishError {
    /// A stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::Closed => "closed",
            PublishError::NotStored { .. } => "not_stored",
            PublishError::TooLarge { .. } => "too_large",
        }
    }
}

/// A cheap, clonable handle for publishing to JetStream.
#[derive(Debug, Clone)]
pub struct Publisher {
    js: jetstream::Context,
    window: Arc<Semaphore>,
    capacity: usize,
    attempts: u32,
    closed: Arc<AtomicBool>,
    ack_seconds: metrics::Histogram,
    health: Arc<AckHealth>,
}

/// Whether acks are coming back: since when attempts have failed with no
/// ack in between. A server that cannot reach JetStream (cut off from its
/// peers, a minority) fails every publish while the connection to it looks
/// fine; this is how the node notices and moves to another server.
#[derive(Debug)]
struct AckHealth {
    /// What the times below count from.
    origin: Instant,
    /// Milliseconds from `origin` to the first failed attempt after the
    /// last ack, plus one; 0 while acks are coming.
    failing_since: AtomicU64,
}

impl AckHealth {
    fn acked(&self) {
        // A load first: the hot path writes nothing while all is well.
        if self.failing_since.load(Ordering::Relaxed) != 0 {
            self.failing_since.store(0, Ordering::Relaxed);
        }
    }

    fn failed(&self) {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        let _ = self.failing_since.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn failing_for(&self) -> Option<Duration> {
        match self.failing_since.load(Ordering::Relaxed) {
            0 => None,
            since => Some(self.origin.elapsed().saturating_sub(Duration::from_millis(since - 1))),
        }
    }
}

/// One message the caller wants stored.
#[derive(Debug, Clone)]
struct Message {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

/// A sent publish whose ack has not been awaited yet. Holds one slot of the
/// window until it is awaited or dropped.
#[derive(Debug)]
#[must_use = "a publish is only known to be stored once its Pending is awaited"]
pub struct Pending {
    js: jetstream::Context,
    ack: PublishAckFuture,
    message: Message,
    attempts: u32,
    max_attempts: u32,
    ack_seconds: metrics::Histogram,
    health: Arc<AckHealth>,
    sent_at: Instant,
    _slot: OwnedSemaphorePermit,
}

impl Publisher {
    /// A publisher over `client` with the window, ack timeout and attempts
    /// of `cfg`.
    pub fn new(client: async_nats::Client, cfg: &NatsConfig) -> Self {
        let js = jetstream::context::ContextBuilder::new()
            .ack_timeout(cfg.ack_timeout())
            // Our own window is the bound; keep the client's above it.
            .max_ack_inflight(cfg.publish_window + 64)
            .build(client);
        Publisher {
            js,
            window: Arc::new(Semaphore::new(cfg.publish_window)),
            capacity: cfg.publish_window,
            attempts: cfg.publish_attempts,
            closed: Arc::new(AtomicBool::new(false)),
            ack_seconds: metrics::histogram!(crate::metric_names::PUBLISH_ACK_SECONDS),
            health: Arc::new(AckHealth { origin: Instant::now(), failing_since: AtomicU64::new(0) }),
        }
    }

    /// How long publishes have been failing with no ack in between;
    /// `None` while acks are coming (or nothing was published).
    pub fn failing_for(&self) -> Option<Duration> {
        self.health.failing_for()
    }

    /// The JetStream context this publisher uses.
    pub fn context(&self) -> &jetstream::Context {
        &self.js
    }

    /// Publishes awaiting their ack right now.
    pub fn in_flight(&self) -> usize {
        self.capacity - self.window.available_permits()
    }

    /// Waits for a slot in the window, then sends. Await the returned
    /// [`Pending`] to learn whether the message was stored.
    pub async fn publish(&self, subject: String, headers: HeaderMap, payload: Bytes) -> Result<Pending, PublishError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PublishError::Closed);
        }
        let slot = self.window.clone().acquire_owned().await.map_err(|_| PublishError::Closed)?;
        let message = Message { subject, headers, payload };
        let ack = send(&self.js, &message).await;
        let ack = match ack {
            Ok(ack) => ack,
            // Sending only fails when the client is closed or the message
            // is too large; neither gets better by retrying.
            Err(e) => return Err(classify(e, &message, 1)),
        };
        Ok(Pending {
            js: self.js.clone(),
            ack,
            message,
            attempts: 1,
            max_attempts: self.attempts,
            ack_seconds: self.ack_seconds.clone(),
            health: self.health.clone(),
            sent_at: Instant::now(),
            _slot: slot,
        })
    }

    /// Refuses new publishes with [`PublishError::Closed`]; those already
    /// sent still complete.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Waits until every sent publish has been acked or has failed (their
    /// [`Pending`]s awaited or dropped), or until `deadline`. Returns how
    /// many were still outstanding then.
    pub async fn drain(&self, deadline: Duration) -> usize {
        let all = u32::try_from(self.capacity).unwrap_or(u32::MAX);
        match tokio::time::timeout(deadline, self.window.acquire_many(all)).await {
            Ok(Ok(_all_slots)) => 0,
            _ => self.in_flight(),
        }
    }
}

impl Pending {
    /// Waits for the ack, re-sending on timeout or refusal up to the
    /// configured attempts.
    pub async fn ack(mut self) -> Result<PublishAck, PublishError> {
        loop {
            match self.ack.await {
                Ok(ack) => {
                    self.health.acked();
                    self.ack_seconds.record(self.sent_at.elapsed().as_secs_f64());
                    return Ok(ack);
                }
                Err(e) if self.attempts < self.max_attempts && retryable(e.kind()) => {
                    self.health.failed();
                    metrics::counter!(crate::metric_names::PUBLISH_RETRIES_TOTAL).increment(1);
                    tracing::debug!(error = %crate::error_chain(&e), attempt = self.attempts, subject = %self.message.subject, "retrying publish");
                    tokio::time::sleep(backoff(self.attempts)).await;
                    self.attempts += 1;
                    self.ack = match send(&self.js, &self.message).await {
                        Ok(ack) => ack,
                        Err(e) => return Err(classify(e, &self.message, self.attempts)),
                    };
                }
                Err(e) => {
                    if retryable(e.kind()) {
                        self.health.failed();
                    }
                    return Err(classify(e, &self.message, self.attempts));
                }
            }
        }
    }
}

/// The NATS headers of `frame` (`fluxmesh_schemas::headers::for_frame`).
pub fn frame_headers(frame: &fluxmesh_schemas::Frame) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in fluxmesh_schemas::headers::for_frame(frame) {
        map.insert(name, value.as_str());
    }
    map
}

async fn send(
    js: &jetstream::Context,
    m: &Message,
) -> Result<PublishAckFuture, async_nats::jetstream::context::PublishError> {
    js.publish_with_headers(m.subject.clone(), m.headers.clone(), m.payload.clone()).await
}

/// Errors that a later attempt may not see. `StreamNotFound` is how the
/// client reports NATS's "no responders": nobody answered for the subject,
/// which is also what a stream without a leader (just created, or its
/// leader's server restarting) looks like. A stream that really is missing
/// still fails, after the configured attempts.
fn retryable(kind: PublishErrorKind) -> bool {
    matches!(
        kind,
        PublishErrorKind::TimedOut
            | PublishErrorKind::StreamNotFound
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::MaxAckPending
            | PublishErrorKind::Other
    )
}

fn classify(e: async_nats::jetstream::context::PublishError, m: &Message, attempts: u32) -> PublishError {
    if e.kind() == PublishErrorKind::MaxPayloadExceeded {
        return PublishError::TooLarge { size: m.payload.len() };
    }
    PublishError::NotStored { attempts, source: e }
}

/// 50 ms, 100 ms, 200 ms, … capped at 1 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((50u64 << attempt.min(5)).min(1000))
}
