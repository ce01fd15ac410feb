//! Reading what a stream holds right now: the messages an ephemeral,
//! ack-less consumer has pending when it is created, in stream order.

use async_nats::jetstream::{self, consumer, consumer::pull, stream::Stream};
use futures::StreamExt as _;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot create the reading consumer")]
    Consumer(#[source] async_nats::jetstream::stream::ConsumerError),
    #[error("cannot start reading the stream")]
    Start(#[source] async_nats::jetstream::consumer::StreamError),
    #[error("stream read failed")]
    Read(#[source] pull::MessagesError),
    #[error("a read message has no JetStream metadata")]
    Info(#[source] async_nats::Error),
    #[error("stream read stalled with {left} messages left")]
    Stalled { left: u64 },
    #[error("a read message could not be taken")]
    Message(#[source] async_nats::Error),
}

/// The consumer config for [`read_pending`] that reads the last message of
/// each subject matching `filters` (which must not overlap), for streams
/// that keep one message per subject.
pub fn last_per_subject(filters: Vec<String>) -> consumer::pull::Config {
    consumer::pull::Config {
        filter_subjects: filters,
        deliver_policy: consumer::DeliverPolicy::LastPerSubject,
        memory_storage: true,
        num_replicas: 1,
        inactive_threshold: Duration::from_secs(10),
        ..Default::default()
    }
}

/// Hands `each` every message pending for a consumer made with `config`
/// (forced ack-less; idle consumers expire after 30 s unless `config` says
/// otherwise) at the moment it is created, in stream order; messages stored
/// later are not read. Fails if a read errors for good, nothing arrives for
/// `stall`, or `each` fails. The consumer is deleted once the read is over
/// (best effort: an idle one expires anyway), so that frequent reads do not
/// pile consumers up on the servers.
///
/// A busy or re-electing server can answer a pull with "no responders" or
/// miss a heartbeat; the pull is then not answered for a long while, and
/// with no acks what was in flight is not sent again. So the read starts
/// over with a new consumer right after the last message handed out, up to
/// the last sequence the first consumer had pending.
pub async fn read_pending(
    stream: &Stream,
    mut config: consumer::pull::Config,
    stall: Duration,
    mut each: impl FnMut(jetstream::Message) -> Result<(), async_nats::Error>,
) -> Result<(), ReadError> {
    config.ack_policy = consumer::AckPolicy::None;
    if config.inactive_threshold.is_zero() {
        config.inactive_threshold = Duration::from_secs(30);
    }
    let reader: consumer::PullConsumer = stream.create_consumer(config.clone()).await.map_err(ReadError::Consumer)?;
    let mut name = reader.cached_info().name.clone();
    let result = read_all(stream, reader, &config, &mut name, stall, &mut each).await;
    if let Err(e) = stream.delete_consumer(&name).await {
        tracing::debug!(consumer = %name, error = %crate::error_chain(&e), "reading consumer not deleted; it expires by itself");
    }
    result
}

async fn read_all(
    stream: &Stream,
    reader: consumer::PullConsumer,
    config: &consumer::pull::Config,
    name: &mut String,
    stall: Duration,
    each: &mut impl FnMut(jetstream::Message) -> Result<(), async_nats::Error>,
) -> Result<(), ReadError> {
    let mut left = reader.cached_info().num_pending;
    if left == 0 {
        return Ok(());
    }
    let mut messages = reader.messages().await.map_err(ReadError::Start)?;
    let mut progress = tokio::time::Instant::now();
    let mut last_seq = None;
    while left > 0 {
        match tokio::time::timeout_at(progress + stall, messages.next()).await {
            Ok(Some(Ok(m))) => {
                let seq = m.info().map_err(ReadError::Info)?.stream_sequence;
                // A message already handed out (a restarted read) is skipped.
                if last_seq.is_some_and(|last| seq <= last) {
                    continue;
                }
                last_seq = Some(seq);
                left -= 1;
                progress = tokio::time::Instant::now();
                each(m).map_err(ReadError::Message)?;
            }
            Ok(Some(Err(e)))
                if matches!(
                    e.kind(),
                    pull::MessagesErrorKind::NoResponders
                        | pull::MessagesErrorKind::MissingHeartbeat
                        | pull::MessagesErrorKind::Pull
                ) =>
            {
                tracing::debug!(error = %crate::error_chain(&e), left, "stream read hiccup; reading on with a new consumer");
                tokio::time::sleep(Duration::from_millis(100)).await;
                let mut again = config.clone();
                if let Some(last) = last_seq {
                    again.deliver_policy = consumer::DeliverPolicy::ByStartSequence { start_sequence: last + 1 };
                }
                let reader: consumer::PullConsumer = match stream.create_consumer(again).await {
                    Ok(r) => {
                        let _ = stream.delete_consumer(name.as_str()).await;
                        *name = r.cached_info().name.clone();
                        r
                    }
                    Err(e) => {
                        tracing::debug!(error = %crate::error_chain(&e), "cannot create the reading consumer yet");
                        continue;
                    }
                };
                messages = reader.messages().await.map_err(ReadError::Start)?;
            }
            Ok(Some(Err(e))) => return Err(ReadError::Read(e)),
            Ok(None) | Err(_) => return Err(ReadError::Stalled { left }),
        }
    }
    Ok(())
}
