//! Reading what a stream holds right now: the messages an ephemeral,
//! ack-less consumer has pending when it is created, in stream order.

use async_nats::jetstream::{self, consumer, consumer::pull, stream::Stream};
use futures::StreamExt as _;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot create the reading consumer: {0}")]
    Consumer(String),
    #[error("stream read failed: {0}")]
    Read(String),
    #[error("stream read stalled with {left} messages left")]
    Stalled { left: u64 },
    #[error("{0}")]
    Message(String),
}

/// Hands `each` every message pending for a consumer made with `config`
/// (forced ack-less; idle consumers expire after 30 s unless `config` says
/// otherwise) at the moment it is created; messages stored later are not
/// read. Fails if a read errors, nothing arrives for `stall`, or `each`
/// fails.
pub async fn read_pending(
    stream: &Stream,
    mut config: consumer::pull::Config,
    stall: Duration,
    mut each: impl FnMut(jetstream::Message) -> Result<(), String>,
) -> Result<(), ReadError> {
    config.ack_policy = consumer::AckPolicy::None;
    if config.inactive_threshold.is_zero() {
        config.inactive_threshold = Duration::from_secs(30);
    }
    let reader: consumer::PullConsumer =
        stream.create_consumer(config).await.map_err(|e| ReadError::Consumer(e.to_string()))?;
    let mut left = reader.cached_info().num_pending;
    if left == 0 {
        return Ok(());
    }
    let mut messages = reader.messages().await.map_err(|e| ReadError::Read(e.to_string()))?;
    let mut progress = tokio::time::Instant::now();
    while left > 0 {
        match tokio::time::timeout_at(progress + stall, messages.next()).await {
            Ok(Some(Ok(m))) => {
                left -= 1;
                progress = tokio::time::Instant::now();
                each(m).map_err(ReadError::Message)?;
            }
            // A busy or re-electing server answers a pull with "no
            // responders" or misses a heartbeat; the stream pulls again.
            // Only a read that makes no progress for `stall` fails.
            Ok(Some(Err(e)))
                if matches!(
                    e.kind(),
                    pull::MessagesErrorKind::NoResponders
                        | pull::MessagesErrorKind::MissingHeartbeat
                        | pull::MessagesErrorKind::Pull
                ) =>
            {
                tracing::debug!(error = %e, left, "stream read hiccup; pulling again");
            }
            Ok(Some(Err(e))) => return Err(ReadError::Read(e.to_string())),
            Ok(None) | Err(_) => return Err(ReadError::Stalled { left }),
        }
    }
    Ok(())
}
