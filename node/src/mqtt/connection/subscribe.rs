//! SUBSCRIBE and the subscriptions a session holds: in the node's
//! broker, in share groups, and for commands.

use super::*;
use crate::internal_events::mqtt::{SessionFailed, SessionFailure};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    /// A SUBSCRIBE: each filter judged, a persistent session's new filters
    /// stored in one write, then served, then one SUBACK.
    pub(super) async fn subscribe_packet(&mut self, pkid: u16, filters: Vec<FilterIn>, id: Option<u32>) {
        let mut verdicts: Vec<Result<(), u8>> = Vec::with_capacity(filters.len());
        for filter in &filters {
            // A shared subscription is judged by its filter.
            let shared = super::super::shared::parse(&filter.path);
            let judged = shared.map_or(filter.path.as_str(), |(_, f)| f);
            let denied = self.shared.config.deny_topics.iter().any(|d| crate::auth::acl::within(judged, d));
            let verdict = if !valid_filter(&filter.path) || (shared.is_some() && filter.no_local) {
                Err(reason::TOPIC_FILTER_INVALID)
            } else if denied {
                internal_events::emit(internal_events::mqtt::TopicDenied {
                    client: &self.client_id,
                    action: "subscribe",
                    topic: &filter.path,
                });
                Err(reason::UNSPECIFIED)
            } else if !self.grant.may_subscribe(judged) {
                self.acl_denied("subscribe", &filter.path);
                Err(reason::NOT_AUTHORIZED)
            } else {
                Ok(())
            };
            verdicts.push(verdict);
        }
        let opts_of =
            |f: &FilterIn| SubOpts { qos: f.qos, no_local: f.no_local, retain_as_published: f.retain_as_published, id };
        // A persistent session stores the packet's new filters in one
        // write, before any of them is served or acknowledged.
        if self.persist.is_some() {
            let new: Vec<(String, SubOpts)> = filters
                .iter()
                .zip(&verdicts)
                .filter(|(_, ok)| ok.is_ok())
                .map(|(f, _)| (f.path.clone(), opts_of(f)))
                .collect();
            if !new.is_empty() && !self.remember(&new).await {
                verdicts.iter_mut().for_each(|v| *v = Err(reason::UNSPECIFIED));
            }
        }
        let mut results = Vec::with_capacity(filters.len());
        for (filter, verdict) in filters.iter().zip(verdicts) {
            let granted = match verdict {
                Ok(()) => self.subscribe(filter, opts_of(filter)).await.ok_or(reason::UNSPECIFIED),
                Err(code) => Err(code),
            };
            results.push(granted);
        }
        self.sub_extras = self.subscriptions.values().any(SubOpts::has_extras);
        self.codec.suback(&mut self.wbuf, pkid, &results);
    }

    /// Subscribes to `filter`; the QoS granted, or `None` if refused.
    ///
    /// A filter that matches the device's own command topic turns commands
    /// on: they go straight to this connection (commands are not in any
    /// stream), at QoS 1 unless the filter was granted QoS 0. The command
    /// topic itself is granted up to QoS 1 and serves nothing else; a wider
    /// filter (say `#`) is also a subscription in the node's broker.
    /// Retained messages follow the SUBACK as MQTT 5's retain handling says
    /// (3.1.1: always).
    pub(super) async fn subscribe(&mut self, filter: &FilterIn, opts: SubOpts) -> Option<QoS> {
        let path = filter.path.as_str();
        let cmd_topic = format!("devices/{}/{}", self.client_id, fluxmesh_schemas::subject::COMMAND_CHANNEL);
        if path == cmd_topic {
            let to_commands = if opts.qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
            self.commands_on(path, to_commands);
            return Some(to_commands);
        }
        let existed = self.subscriptions.contains_key(path) || self.share_subs.contains_key(path);
        self.activate(path, opts).await?;
        if super::super::shared::parse(path).is_some() {
            // Shared subscriptions get no retained messages (MQTT 5 4.8.2).
            return Some(opts.qos);
        }
        let send_retained = match filter.retain_handling {
            0 => true,
            1 => !existed,
            _ => false,
        };
        if !send_retained {
            return Some(opts.qos);
        }
        let room = self.shared.config.session_queue.saturating_sub(self.ready.len());
        match self.shared.broker.retained(path, opts.qos as u8, room).await {
            Ok(found) => self.ready.extend(found),
            Err(e) => {
                // The subscription stands; only its retained messages are
                // missing, and the operator hears of it.
                internal_events::emit(SessionFailed {
                    failure: SessionFailure::RetainedRead,
                    client: &self.client_id,
                    about: Some(path),
                    error: &fluxmesh_mesh::error_chain(&e),
                    message: "cannot read the retained messages for a subscription",
                });
            }
        }
        Some(opts.qos)
    }

    /// The session's outbox, opened with its first subscription: most
    /// devices never subscribe, and an idle connection keeps no queue.
    fn outbox_tx(&mut self) -> &Outbox {
        let queue = self.shared.config.session_queue;
        let outbox = &mut self.outbox;
        self.outbox_tx.get_or_insert_with(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(queue);
            *outbox = Some(rx);
            tx
        })
    }

    /// Puts `filter` into the node's broker for this session (and turns
    /// commands on if it matches the command topic); `None` if refused.
    pub(super) async fn activate(&mut self, filter: &str, opts: SubOpts) -> Option<()> {
        let qos = opts.qos;
        let cmd_topic = format!("devices/{}/{}", self.client_id, fluxmesh_schemas::subject::COMMAND_CHANNEL);
        let to_commands = if qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
        if filter == cmd_topic {
            self.commands_on(filter, to_commands);
            return Some(());
        }
        let outbox = self.outbox_tx().clone();
        if let Some((group, inner)) = super::super::shared::parse(filter) {
            if let Err(e) = self.shared.shares.join(self.session_id, group, inner, qos as u8, outbox).await {
                internal_events::emit(SessionFailed {
                    failure: SessionFailure::Subscribe,
                    client: &self.client_id,
                    about: Some(filter),
                    error: &fluxmesh_mesh::error_chain(&e),
                    message: "shared subscription refused: its group cannot be read",
                });
                return None;
            }
            self.share_subs.insert(filter.to_owned(), qos);
            return Some(());
        }
        let sub = Sub { qos: qos as u8, outbox, overflow: self.overflow.clone() };
        if let Err(e) = self.shared.broker.subscribe(self.session_id, filter, sub).await {
            internal_events::emit(SessionFailed {
                failure: SessionFailure::Subscribe,
                client: &self.client_id,
                about: Some(filter),
                error: &fluxmesh_mesh::error_chain(&e),
                message: "subscription refused: its streams cannot be read",
            });
            return None;
        }
        // What the feeds handed out before now was not for this session.
        for stream in self.shared.broker.streams_for(filter) {
            if let Some(position) = self.shared.broker.position(&stream) {
                self.written_live.entry(stream.into()).or_insert(position);
            }
        }
        self.subscriptions.insert(filter.to_owned(), opts);
        self.sub_extras |= opts.has_extras();
        if rumqttc::mqttbytes::matches(&cmd_topic, filter) {
            self.commands_on(filter, to_commands);
        }
        Some(())
    }

    /// Leaves this session's share groups, and gives back to them the
    /// messages the client did not acknowledge (or was never sent), so
    /// another member gets them now.
    pub(super) async fn leave_shares(&mut self) {
        for (filter, _) in std::mem::take(&mut self.share_subs) {
            if let Some((group, inner)) = super::super::shared::parse(&filter) {
                self.shared.shares.leave(self.session_id, group, inner).await;
            }
        }
        let unacked: Vec<_> = self.out_inflight.values_mut().filter_map(|o| o.share.take()).collect();
        for share in unacked {
            share.give_back().await;
        }
        if let Some(outbox) = &mut self.outbox {
            outbox.close();
            while let Ok(out) = outbox.try_recv() {
                if let Some(share) = out.share {
                    share.give_back().await;
                }
            }
        }
    }

    /// Removes this session's subscriptions from the node's broker.
    pub(super) fn leave_broker(&mut self) {
        for (filter, _) in self.subscriptions.drain() {
            self.shared.broker.unsubscribe(self.session_id, &filter);
        }
    }

    /// Commands flow through `filter` at `qos`; the command service hears
    /// that this device now takes commands here.
    pub(super) fn commands_on(&mut self, filter: &str, qos: QoS) {
        self.cmd_filters.insert(filter.to_owned(), qos);
        if self.commands.is_none() {
            let (tx, rx) = tokio::sync::mpsc::channel(super::COMMAND_QUEUE);
            // The only set: `commands` is `None` until this.
            let _ = self.inbox.sender.set(tx);
            self.commands = Some(rx);
        }
        self.inbox.ready.store(true, Ordering::Release);
        let _ = self.shared.cmd_ready.try_send(self.client_id.clone());
    }
}
