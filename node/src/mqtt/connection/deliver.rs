//! Writing messages to the client: deliveries from the broker (with
//! their MQTT 5 options) and commands.

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    /// Writes a command as a PUBLISH on `devices/{id}/cmd`, at the highest
    /// QoS its subscriptions were granted. At QoS 0 the command counts as
    /// delivered once written: the device acknowledges nothing.
    pub(super) fn write_command(&mut self, command: OutCommand) {
        let topic = format!("devices/{}/{}", self.client_id, fluxmesh_schemas::subject::COMMAND_CHANNEL);
        let qos = self.cmd_filters.values().fold(QoS::AtMostOnce, |a, b| if *b > a { *b } else { a });
        let pkid = if qos == QoS::AtMostOnce { 0 } else { self.next_packet_id() };
        let out = PublishOut {
            topic: &topic,
            payload: command.payload,
            qos,
            retain: false,
            pkid,
            alias: None,
            props: None,
            expiry: None,
            subscription_ids: Vec::new(),
        };
        self.codec.publish(&mut self.wbuf, out);
        if qos == QoS::AtMostOnce {
            let _ = command.done.send(Ok(()));
        } else {
            self.awaiting_puback.insert(pkid, command.done);
        }
    }

    /// A packet id no message to the client is using.
    pub(super) fn next_packet_id(&mut self) -> u16 {
        let mut pkid = self.next_pkid;
        while pkid == 0 || self.awaiting_puback.contains_key(&pkid) || self.out_inflight.contains_key(&pkid) {
            pkid = pkid.wrapping_add(1);
        }
        self.next_pkid = pkid.wrapping_add(1);
        pkid
    }

    /// Writes one message from the outbox, unless a resumed session's
    /// replay already sent it.
    pub(super) fn write_live(&mut self, out: Outgoing) {
        if let Some((stream, seq)) = &out.origin {
            if self.replay_floor.get(stream).is_some_and(|floor| seq <= floor) {
                return;
            }
        }
        self.write_delivery(out);
    }

    /// Writes one message at the QoS it was given; for MQTT 5, with what
    /// the matching subscriptions' options make of it. Whatever is not
    /// written (expired, no-local, over the client's maximum packet size)
    /// still counts as had, for a persistent session's cursors.
    pub(super) fn write_delivery(&mut self, out: Outgoing) {
        if let Some((stream, seq)) = &out.origin {
            let written = self.written_live.entry(stream.clone()).or_insert(0);
            *written = (*written).max(*seq);
            if let Some(persist) = &mut self.persist {
                let written = persist.written.entry(stream.clone()).or_insert(0);
                *written = (*written).max(*seq);
            }
        }
        let message = out.message.clone();
        let now = super::super::props::now_ms();
        let mut qos = qos_of(out.qos);
        let mut retain = out.retain;
        let mut subscription_ids = Vec::new();
        let skip = if message.expired(now) {
            Some("expired")
        } else if self.sub_extras && out.share.is_none() {
            // Escaping the client id only for a message that names a publisher.
            let own = message
                .client
                .as_deref()
                .is_some_and(|c| c == fluxmesh_schemas::subject::escape_token(&self.client_id).as_ref());
            let mut best: Option<QoS> = None;
            for (filter, opts) in &self.subscriptions {
                if (own && opts.no_local) || !super::super::topics::matches(&message.topic, filter) {
                    continue;
                }
                best = Some(best.map_or(opts.qos, |b| if opts.qos > b { opts.qos } else { b }));
                retain |= opts.retain_as_published && message.retain;
                subscription_ids.extend(opts.id.map(|id| id as usize));
            }
            match best {
                Some(best) => {
                    qos = qos_of(message.qos.min(best as u8));
                    None
                }
                // Only matched by no-local subscriptions, or no longer.
                None if own => Some("no_local"),
                None => Some("unsubscribed"),
            }
        } else {
            None
        };
        let expiry =
            message.expires_ms.map(|at| u32::try_from(at.saturating_sub(now).div_ceil(1000)).unwrap_or(u32::MAX));
        let mut publish = PublishOut {
            topic: &message.topic,
            payload: message.payload.clone(),
            qos,
            retain,
            pkid: 0,
            alias: None,
            props: message.props.as_ref(),
            expiry,
            subscription_ids,
        };
        let skip = skip.or_else(|| {
            (self.limits.max_packet != usize::MAX && self.codec.publish_size(&publish) > self.limits.max_packet)
                .then_some("too_large_for_client")
        });
        if let Some(why) = skip {
            metrics::counter!(crate::internal_events::names::MQTT_DELIVERIES_SKIPPED_TOTAL, "reason" => why)
                .increment(1);
            if let Some(share) = out.share {
                self.shares_done.push(share);
            }
            return;
        }
        // MQTT 5 topic aliases, while the client takes more.
        if self.limits.alias_max > 0 {
            match self.limits.out_aliases.get(&message.topic) {
                Some(alias) => {
                    publish.alias = Some(*alias);
                    publish.topic = "";
                }
                None if self.limits.out_aliases.len() < usize::from(self.limits.alias_max) => {
                    let alias = u16::try_from(self.limits.out_aliases.len() + 1).unwrap_or(u16::MAX);
                    self.limits.out_aliases.insert(message.topic.clone(), alias);
                    publish.alias = Some(alias);
                }
                None => {}
            }
        }
        if qos != QoS::AtMostOnce {
            publish.pkid = self.next_packet_id();
            let flight = OutFlight { qos, released: false, origin: out.origin, share: out.share };
            self.out_inflight.insert(publish.pkid, flight);
        } else if let Some(share) = out.share {
            self.shares_done.push(share);
        }
        self.codec.publish(&mut self.wbuf, publish);
        metrics::counter!(crate::internal_events::names::MQTT_DELIVERIES_TOTAL, "qos" => qos_label(qos)).increment(1);
    }
}

pub(super) async fn next_command(commands: &mut Option<tokio::sync::mpsc::Receiver<OutCommand>>) -> Option<OutCommand> {
    match commands {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

pub(super) async fn next_outgoing(outbox: &mut Option<tokio::sync::mpsc::Receiver<Outgoing>>) -> Option<Outgoing> {
    match outbox {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

pub(super) fn qos_of(qos: u8) -> QoS {
    match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

type Replayed = Result<Option<async_nats::jetstream::Message>, crate::mqtt::broker::FeedError>;

/// The next message of a resumed session's replay, opening the current
/// stream's reader first if needed. Cancel-safe: the reader is kept. The
/// reading is boxed when first polled: the run loop makes this future on
/// every turn, replaying or not, and keeps only a pointer for it.
pub(super) async fn next_replayed(
    replay: &mut VecDeque<crate::mqtt::sessions::Replay>,
    broker: &crate::mqtt::broker::Broker,
    session: u64,
) -> Replayed {
    Box::pin(read_replayed(replay, broker, session)).await
}

async fn read_replayed(
    replay: &mut VecDeque<crate::mqtt::sessions::Replay>,
    broker: &crate::mqtt::broker::Broker,
    session: u64,
) -> Replayed {
    let Some(current) = replay.front_mut() else { return Ok(None) };
    if current.reader.is_none() {
        current.reader = Some(broker.replay_reader(&current.stream, current.next, session).await?);
    }
    let Some(reader) = current.reader.as_mut() else { return Ok(None) };
    match reader.next().await {
        Ok(message) => Ok(Some(message)),
        Err(source) => Err(crate::mqtt::broker::FeedError::Reader { stream: current.stream.to_string(), source }),
    }
}

pub(super) fn qos_label(qos: QoS) -> &'static str {
    match qos {
        QoS::AtMostOnce => "0",
        QoS::AtLeastOnce => "1",
        QoS::ExactlyOnce => "2",
    }
}
