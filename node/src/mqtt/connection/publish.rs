//! The publish path: a PUBLISH from the client (topic alias, receive
//! maximum), the checks it passes, submitting it to JetStream, and the
//! PUBACK or PUBREC once it is settled.

use super::*;

/// What to answer once a publish is settled.
#[derive(Debug, Clone, Copy)]
pub(super) enum Reply {
    Nothing,
    PubAck(u16),
    PubRec(u16),
}

/// How a publish was settled.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Stored in JetStream.
    Stored,
    /// Refused for good (bad topic, too large, not allowed): acknowledged
    /// so that the device does not resend it forever (MQTT 5: with this
    /// reason code), and counted.
    Refused(u8),
    /// A QoS2 resend of a message already stored in this session.
    Duplicate,
    /// Not stored after every retry: no ack, the connection closes, and the
    /// device sends it again after reconnecting.
    Failed(IngestError),
}

pub(super) type Settle = Pin<Box<dyn Future<Output = (Reply, Outcome)> + Send>>;
/// A publish that has been sent (or refused) and whose ack is still to
/// come: what submitting resolves to.
pub(super) struct Submitted(pub(super) Settle);
pub(super) type Submit = Pin<Box<dyn Future<Output = Submitted> + Send>>;

pub(super) fn settled(reply: Reply, outcome: Outcome) -> Settle {
    Box::pin(std::future::ready((reply, outcome)))
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    /// Starts submitting backlogged publishes while there is room and the
    /// device has rate tokens. Out of tokens, the backlog waits (and, once
    /// full, the socket is not read: the device is slowed, not refused).
    pub(super) fn start_next(&mut self) -> Result<(), End> {
        while self.submitting.is_none() && self.has_room() && self.throttled_until.is_none() {
            if self.backlog.is_empty() {
                // Drained: give its buffer back, so an idle connection
                // does not keep room for a burst it had once.
                if self.backlog.capacity() > 0 {
                    self.backlog = VecDeque::new();
                }
                return Ok(());
            }
            if let Some(limiter) = &self.limiter {
                if let Err(wait) = limiter.check() {
                    metrics::counter!(crate::internal_events::names::INGEST_THROTTLED_TOTAL, "source" => "mqtt")
                        .increment(1);
                    self.throttled_until = Some(Instant::now() + wait);
                    return Ok(());
                }
            }
            let Some(publish) = self.backlog.pop_front() else { return Ok(()) };
            self.backlog_bytes -= publish.payload.len() + publish.topic.len();
            self.publish(publish)?;
        }
        Ok(())
    }

    /// A PUBLISH from the client: its topic alias resolved, counted against
    /// the receive maximum, then queued for submitting.
    pub(super) fn received(&mut self, mut publish: PublishIn) -> Result<(), End> {
        if publish.topic.contains('\0') {
            // MQTT 3.1.1 section 1.5.3: a string with U+0000 closes the
            // connection.
            return Err(End::Protocol(Violation::NullInTopic, "topic contains U+0000".into()));
        }
        if let Some(alias) = publish.alias {
            if alias == 0 || alias > self.shared.config.topic_alias_max {
                return Err(End::Protocol(
                    Violation::TopicAliasInvalid,
                    format!("topic alias {alias} is out of range"),
                ));
            }
            if publish.topic.is_empty() {
                match self.limits.in_aliases.get(&alias) {
                    Some(topic) => publish.topic.clone_from(topic),
                    None => {
                        return Err(End::Protocol(
                            Violation::TopicAliasUnknown,
                            format!("topic alias {alias} was never set"),
                        ))
                    }
                }
            } else {
                self.limits.in_aliases.insert(alias, publish.topic.clone());
            }
        } else if publish.topic.is_empty() && self.codec.version == Version::V5 {
            return Err(End::Protocol(Violation::EmptyTopic, "PUBLISH without a topic or a topic alias".into()));
        }
        if publish.qos != QoS::AtMostOnce
            && !self.awaiting_rel.contains(&publish.pkid)
            && self.in_flows.insert(publish.pkid)
            && self.codec.version == Version::V5
            && self.in_flows.len() > self.shared.config.max_inflight
        {
            return Err(End::Protocol(
                Violation::ReceiveMaximum,
                format!("more than {} QoS 1/2 publishes unacknowledged", self.shared.config.max_inflight),
            ));
        }
        self.backlog_bytes += publish.payload.len() + publish.topic.len();
        self.backlog.push_back(publish);
        Ok(())
    }

    pub(super) fn publish(&mut self, publish: PublishIn) -> Result<(), End> {
        let reply = match publish.qos {
            QoS::AtMostOnce => Reply::Nothing,
            QoS::AtLeastOnce => Reply::PubAck(publish.pkid),
            QoS::ExactlyOnce => {
                if !self.awaiting_rel.insert(publish.pkid) {
                    // A resend of a QoS2 message this session already stored.
                    self.pending.push_back(settled(Reply::PubRec(publish.pkid), Outcome::Duplicate));
                    return Ok(());
                }
                Reply::PubRec(publish.pkid)
            }
        };
        // Malformed topics are refused (and counted by reason) when
        // submitted; the ACL and `mqtt.plain_topics` judge the others.
        let device = DeviceTopic::parse(&publish.topic).is_ok();
        let plain = !device && PlainTopic::parse(&publish.topic).is_ok();
        if self.topic_denied(&publish.topic) {
            internal_events::emit(internal_events::mqtt::TopicDenied {
                client: &self.client_id,
                action: "publish",
                topic: &publish.topic,
            });
            self.pending.push_back(settled(reply, Outcome::Refused(reason::NOT_AUTHORIZED)));
            return Ok(());
        }
        if plain && !self.plain_allowed(&publish.topic) {
            internal_events::rejected(
                Source::Mqtt,
                "plain_topic_off",
                &format_args!("plain topic `{}` refused by mqtt.plain_topics", publish.topic),
            );
            self.pending.push_back(settled(reply, Outcome::Refused(reason::TOPIC_NAME_INVALID)));
            return Ok(());
        }
        if (device || plain) && !self.grant.may_publish(&publish.topic) {
            self.acl_denied("publish", &publish.topic);
            if self.shared.auth.cfg.disconnect_on_deny() {
                return Err(End::Protocol(
                    Violation::AclDenied,
                    format!("publish to `{}` is outside its ACL", publish.topic),
                ));
            }
            self.pending.push_back(settled(reply, Outcome::Refused(reason::NOT_AUTHORIZED)));
            return Ok(());
        }
        if publish.props.as_ref().is_some_and(|p| p.payload_format_invalid(&publish.payload)) {
            internal_events::rejected(
                Source::Mqtt,
                "payload_format",
                &"payload format 1 (UTF-8) but the payload is not",
            );
            self.pending.push_back(settled(reply, Outcome::Refused(reason::PAYLOAD_FORMAT_INVALID)));
            return Ok(());
        }
        let meta = crate::ingress::MqttMeta {
            props: publish.props.as_ref().map(super::super::props::MessageProps::to_header),
            expires_ms: publish.expiry.map(|s| super::super::props::now_ms() + u64::from(s) * 1000),
            // Stamped while the client could receive its own message on a
            // no-local subscription.
            client: (self.sub_extras && self.subscriptions.values().any(|o| o.no_local))
                .then(|| self.client_id.clone()),
        };
        let ingress = self.shared.ingress.clone();
        let qos = publish.qos as u8;
        let PublishIn { topic, payload, retain, .. } = publish;
        let meta = (!meta.is_empty()).then_some(meta);
        self.submitting = Some(Box::pin(submit(ingress, topic, payload, qos, retain, meta, reply)));
        Ok(())
    }

    pub(super) fn settle(&mut self, reply: Reply, outcome: Outcome) -> Result<(), End> {
        let code = match outcome {
            Outcome::Stored | Outcome::Duplicate => reason::SUCCESS,
            Outcome::Refused(code) => code,
            Outcome::Failed(e) => return Err(End::NotStored(e)),
        };
        match reply {
            Reply::Nothing => {}
            Reply::PubAck(pkid) => {
                self.in_flows.remove(&pkid);
                self.codec.puback(&mut self.wbuf, pkid, code);
            }
            Reply::PubRec(pkid) => {
                if code >= 0x80 && self.codec.version == Version::V5 {
                    // MQTT 5 4.3.3: a refused QoS 2 message ends at its
                    // PUBREC; no PUBREL follows.
                    self.awaiting_rel.remove(&pkid);
                    self.in_flows.remove(&pkid);
                }
                self.codec.pubrec(&mut self.wbuf, pkid, code);
            }
        }
        Ok(())
    }
}

/// Sends the message: a device topic as telemetry, any other topic as a
/// plain message, and a retained one also as the topic's retained message.
/// What it settles to once stored; a message that is refused (malformed
/// topic, too large) is acknowledged and counted.
pub(super) async fn submit(
    ingress: crate::ingress::Ingress,
    topic: String,
    payload: Bytes,
    qos: u8,
    retain: bool,
    meta: Option<crate::ingress::MqttMeta>,
    reply: Reply,
) -> Submitted {
    let publish = MqttPublish { topic: &topic, payload, qos, retain, key: None, meta: meta.as_ref() };
    Submitted(match ingress.submit_mqtt(publish).await {
        Ok(sent) => Box::pin(async move {
            match ingress.stored_mqtt(sent).await {
                Ok(_) => (reply, Outcome::Stored),
                Err(e) => (reply, Outcome::Failed(e)),
            }
        }),
        Err(e @ IngestError::Topic(_)) => {
            internal_events::rejected(Source::Mqtt, e.reason(), &e);
            settled(reply, Outcome::Refused(reason::TOPIC_NAME_INVALID))
        }
        Err(e @ IngestError::TooLarge { .. }) => {
            internal_events::rejected(Source::Mqtt, e.reason(), &e);
            settled(reply, Outcome::Refused(reason::QUOTA_EXCEEDED))
        }
        Err(e) => settled(reply, Outcome::Failed(e)),
    })
}
