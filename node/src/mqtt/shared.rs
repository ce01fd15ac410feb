//! Shared subscriptions: `$share/{group}/{filter}`. Each matching message
//! goes to one member of the group, whichever node the members are on.
//!
//! A group is a durable JetStream consumer per stream the filter can match,
//! named after the group and the filter, so every node with members pulls
//! from the same consumer and JetStream spreads the messages over the
//! pullers. A node hands what it pulls to its own members in turn. The
//! consumer acknowledges a message once the member has: at PUBACK (QoS 1),
//! PUBREC (QoS 2) or the write (QoS 0). A message a member did not
//! acknowledge when it left (its connection ended, or its node died) is
//! sent again by JetStream to any member after `ack_wait`; one a node could
//! not hand to any member (every queue full) is sent back at once. Shared
//! subscriptions cost the servers an ack per message, unlike plain ones:
//! that is what lets a message move to another member.

use super::broker::{Broker, FeedError};
use super::outbox::{Outbox, Outgoing, ShareAck};
use crate::lifecycle::Lifecycle;
use async_nats::jetstream::consumer::{self, pull};
use futures::StreamExt as _;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long JetStream waits for a member's ack before sending the message
/// again (to any member).
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Messages of one group pulled and not yet acknowledged, at most.
const MAX_ACK_PENDING: i64 = 1000;
/// A group's consumer with no puller for this long is deleted.
const IDLE: Duration = Duration::from_secs(3600);
/// Messages asked for per pull request.
const PULL_BATCH: usize = 64;
/// How long one pull request waits for messages: also how long a node
/// whose last member left may still receive (and gives back) the group's
/// messages.
const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// Splits `$share/{group}/{filter}`; `None` if it is not one (or the
/// group name is empty or holds a wildcard).
pub(crate) fn parse(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    let (group, inner) = rest.split_once('/')?;
    let valid = !group.is_empty() && !group.contains(['+', '#']) && !inner.is_empty();
    valid.then_some((group, inner))
}

#[derive(Debug, Clone)]
struct Member {
    session: u64,
    qos: u8,
    outbox: Outbox,
}

#[derive(Debug)]
struct Group {
    inner: String,
    members: Mutex<Vec<Member>>,
    turn: AtomicUsize,
    /// Stops this group's pullers on this node.
    life: Lifecycle,
}

/// This node's members of shared subscriptions, by (group, filter).
#[derive(Debug)]
pub(crate) struct Shares {
    broker: Arc<Broker>,
    groups: tokio::sync::Mutex<HashMap<(String, String), Arc<Group>>>,
    life: Lifecycle,
}

impl Shares {
    pub fn new(broker: Arc<Broker>, life: Lifecycle) -> Arc<Shares> {
        Arc::new(Shares { broker, groups: Default::default(), life })
    }

    /// Adds `session` to `group` on `filter`; the group's pullers start on
    /// this node with its first member here.
    pub async fn join(
        self: &Arc<Self>,
        session: u64,
        group: &str,
        filter: &str,
        qos: u8,
        outbox: Outbox,
    ) -> Result<(), FeedError> {
        let mut groups = self.groups.lock().await;
        let key = (group.to_owned(), filter.to_owned());
        if let Some(existing) = groups.get(&key) {
            let mut members = existing.members.lock().unwrap_or_else(|e| e.into_inner());
            members.retain(|m| m.session != session);
            members.push(Member { session, qos, outbox });
            return Ok(());
        }
        let state = Arc::new(Group {
            inner: filter.to_owned(),
            members: Mutex::new(vec![Member { session, qos, outbox }]),
            turn: AtomicUsize::new(0),
            life: self.life.child(),
        });
        let name = consumer_name(group, filter);
        let mut pullers = Vec::new();
        for stream in self.broker.streams_for(filter) {
            pullers.push((stream.clone(), self.open(&stream, &name).await?));
        }
        for (stream, messages) in pullers {
            state.life.spawn(self.clone().pull(state.clone(), stream, messages));
        }
        tracing::info!(%group, %filter, consumer = %name, "pulling a shared subscription group for members here");
        groups.insert(key, state);
        Ok(())
    }

    /// Removes `session` from `group` on `filter`; with its last member
    /// here, this node stops pulling for the group.
    pub async fn leave(&self, session: u64, group: &str, filter: &str) {
        let mut groups = self.groups.lock().await;
        let key = (group.to_owned(), filter.to_owned());
        let Some(state) = groups.get(&key) else { return };
        let empty = {
            let mut members = state.members.lock().unwrap_or_else(|e| e.into_inner());
            members.retain(|m| m.session != session);
            members.is_empty()
        };
        if empty {
            state.life.stop();
            groups.remove(&key);
        }
    }

    async fn open(&self, stream: &str, name: &str) -> Result<consumer::PullConsumer, FeedError> {
        let err = |e: async_nats::Error| FeedError::Stream { stream: stream.to_owned(), source: e };
        let js = self.broker.js();
        let handle = js.get_stream(stream).await.map_err(|e| err(e.into()))?;
        let config = pull::Config {
            durable_name: Some(name.to_owned()),
            description: Some("fluxmesh shared MQTT subscription group".to_owned()),
            deliver_policy: consumer::DeliverPolicy::New,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_ack_pending: MAX_ACK_PENDING,
            inactive_threshold: IDLE,
            ..Default::default()
        };
        handle.get_or_create_consumer(name, config).await.map_err(|e| err(e.into()))
    }

    /// Pulls one stream for one group until it has no member here, handing
    /// each matching message to the next member with room. It pulls in
    /// short batches, so that once the last member here leaves no pull
    /// request is left on the server after the current batch ends: what
    /// still arrives in it is given back at once, never stranded in a
    /// request nobody reads (the group would get it only after `ack_wait`).
    async fn pull(self: Arc<Self>, group: Arc<Group>, stream: String, consumer: consumer::PullConsumer) {
        let stream_name: Arc<str> = stream.as_str().into();
        let mut scratch = fluxmesh_schemas::frame::AlignedVec::new();
        while !group.life.is_stopping() {
            let mut batch = match consumer.batch().max_messages(PULL_BATCH).expires(PULL_EXPIRES).messages().await {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::debug!(%stream, error = %fluxmesh_mesh::error_chain(&e), "shared subscription pull failed; retrying");
                    tokio::select! {
                        _ = group.life.stopped() => break,
                        _ = tokio::time::sleep(PULL_EXPIRES) => continue,
                    }
                }
            };
            while let Some(next) = batch.next().await {
                let stored = match next {
                    Ok(stored) => stored,
                    Err(e) => {
                        tracing::debug!(%stream, error = %fluxmesh_mesh::error_chain(e.as_ref()), "shared subscription pull hiccup");
                        continue;
                    }
                };
                if group.life.is_stopping() {
                    let (_, acker) = stored.split();
                    ShareAck::new(acker).give_back().await;
                    continue;
                }
                self.hand_out(&group, &stream, &stream_name, stored, &mut scratch).await;
            }
        }
    }

    /// Gives one pulled message to the next member with room, or back to
    /// the group if none has one.
    async fn hand_out(
        &self,
        group: &Group,
        stream: &str,
        stream_name: &Arc<str>,
        stored: async_nats::jetstream::Message,
        scratch: &mut fluxmesh_schemas::frame::AlignedVec,
    ) {
        let seq = stored.info().map(|i| i.stream_sequence).ok();
        let message = self.broker.decode_from(stream, &stored, scratch);
        let (_, acker) = stored.split();
        let ack = ShareAck::new(acker);
        let Some(message) = message.filter(|m| super::topics::matches(&m.topic, &group.inner)) else {
            // Not for this group: nobody needs it.
            ack.done().await;
            return;
        };
        let message = Arc::new(message);
        let members = group.members.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let start = group.turn.fetch_add(1, Ordering::Relaxed);
        let mut handed = false;
        for i in 0..members.len() {
            let member = &members[(start + i) % members.len()];
            let out = Outgoing {
                message: message.clone(),
                qos: member.qos.min(message.qos),
                retain: false,
                origin: seq.map(|s| (stream_name.clone(), s)),
                share: Some(ack.clone()),
            };
            if member.outbox.try_send(out).is_ok() {
                handed = true;
                break;
            }
        }
        if handed {
            metrics::counter!(crate::internal_events::names::MQTT_SHARED_DELIVERIES_TOTAL).increment(1);
        } else {
            metrics::counter!(crate::internal_events::names::MQTT_SHARED_GIVEN_BACK_TOTAL).increment(1);
            ack.give_back().await;
        }
    }
}

/// The durable consumer of a group: the same on every node.
fn consumer_name(group: &str, filter: &str) -> String {
    let mut key = Vec::with_capacity(group.len() + filter.len() + 1);
    key.extend_from_slice(group.as_bytes());
    key.push(0);
    key.extend_from_slice(filter.as_bytes());
    let safe: String =
        group.chars().take(32).map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    format!("share-{safe}-{:016x}", fluxmesh_schemas::shard::fnv1a64(&key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_filters() {
        assert_eq!(parse("$share/g1/a/+/c"), Some(("g1", "a/+/c")));
        assert_eq!(parse("$share/g1/#"), Some(("g1", "#")));
        assert_eq!(parse("$share//a"), None);
        assert_eq!(parse("$share/g+/a"), None);
        assert_eq!(parse("$share/g1"), None);
        assert_eq!(parse("a/b"), None);
        assert_eq!(consumer_name("g.1", "a/#"), consumer_name("g.1", "a/#"));
        assert_ne!(consumer_name("g1", "a/#"), consumer_name("g1", "a/+"));
        assert!(consumer_name("g.1 x", "a").starts_with("share-g_1_x-"));
    }
}
