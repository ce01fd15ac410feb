//! A connection's persistent session: opening, resuming and replaying
//! it, catching up after an overflow, and storing its progress.

use super::*;
use crate::internal_events::mqtt::{SessionFailed, SessionFailure};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    /// Clean session: forgets any stored session of the client id.
    /// Persistent: loads it (CONNACK's session present tells whether there
    /// was one). Unreadable: CONNACK "server unavailable".
    pub(super) async fn open_session(&mut self) -> Result<(), End> {
        use super::super::sessions::{Persist, SessionError, SessionRecord};
        let store = self.shared.session_store.clone();
        let loaded = match store.load(&self.client_id).await {
            Ok(loaded) => loaded,
            Err(SessionError::Corrupt { client, source }) => {
                internal_events::emit(internal_events::mqtt::SessionCorrupt { client: &client, error: &source });
                None
            }
            Err(e) => {
                self.refuse(reason::SERVER_UNAVAILABLE).await;
                return Err(End::Session(e));
            }
        };
        let now = fluxmesh_schemas::frame::now_us();
        let (stale, live) = match loaded {
            Some((record, _)) if self.clean || record.expired(now) => (true, None),
            other => (false, other),
        };
        if stale {
            if let Err(e) = store.discard(&self.client_id).await {
                self.refuse(reason::SERVER_UNAVAILABLE).await;
                return Err(End::Session(e));
            }
        }
        let expiry = (self.session_expiry != u32::MAX).then_some(self.session_expiry);
        self.persist = match live {
            // Resumed, even when it ends with this connection (MQTT 5
            // session expiry 0).
            Some((mut record, seq)) => {
                record.ended_us = None;
                record.expiry_secs = expiry;
                Some(Persist::new(record, Some(seq)))
            }
            None if self.session_expiry == 0 => None,
            None => {
                // Stored now, so that the next CONNECT finds the session
                // even if this one subscribes to nothing.
                let mut record = SessionRecord { expiry_secs: expiry, ..SessionRecord::default() };
                match store.save(&self.client_id, &mut record, None).await {
                    Ok(seq) => Some(Persist { present: false, ..Persist::new(record, Some(seq)) }),
                    Err(e) => {
                        self.refuse(reason::SERVER_UNAVAILABLE).await;
                        return Err(End::Session(e));
                    }
                }
            }
        };
        Ok(())
    }

    /// After the connection: a session that outlives it is stored with
    /// the time it ended (its expiry counts from then); one that does not
    /// is forgotten.
    pub(super) async fn finish_session(&mut self) {
        let Some(persist) = &mut self.persist else { return };
        if self.session_expiry == 0 {
            if let Err(e) = self.shared.session_store.discard(&self.client_id).await {
                internal_events::emit(SessionFailed {
                    failure: SessionFailure::Save,
                    client: &self.client_id,
                    about: None,
                    error: &fluxmesh_mesh::error_chain(&e),
                    message: "cannot forget an ended session",
                });
            }
            return;
        }
        persist.record.expiry_secs = (self.session_expiry != u32::MAX).then_some(self.session_expiry);
        persist.record.ended_us = Some(fluxmesh_schemas::frame::now_us());
        persist.subs_changed = true;
        self.save_session(true).await;
    }

    /// A persistent session comes back: its subscriptions go into the
    /// broker again (live messages flow from now on), and each stream is
    /// replayed from the session's cursor up to where the stream ends now.
    /// Live messages wait in the outbox until the replay is done; those the
    /// replay covered are skipped.
    pub(super) async fn resume(&mut self) {
        let Some(persist) = &self.persist else { return };
        let subs = persist.record.subs.clone();
        let stored_opts = persist.record.opts.clone();
        let cursors = persist.record.cursors.clone();
        metrics::counter!(crate::internal_events::names::MQTT_SESSIONS_RESUMED_TOTAL).increment(1);
        let mut streams = std::collections::BTreeSet::new();
        for (filter, qos) in subs {
            let extra = stored_opts.get(&filter).copied().unwrap_or_default();
            let opts = SubOpts { qos: qos_of(qos), no_local: extra.nl, retain_as_published: extra.rap, id: extra.id };
            // Rights can change while a session is away.
            let denied = self.shared.config.deny_topics.iter().any(|d| crate::auth::acl::within(&filter, d));
            if denied || !self.grant.may_subscribe(&filter) {
                tracing::info!(client = %self.client_id, %filter, "a stored subscription is no longer allowed; dropped");
                if let Some(p) = &mut self.persist {
                    p.record.subs.remove(&filter);
                    p.record.opts.remove(&filter);
                    p.subs_changed = true;
                }
                continue;
            }
            if self.activate(&filter, opts).await.is_none() {
                continue;
            }
            streams.extend(self.shared.broker.streams_for(&filter));
        }
        for stream in streams {
            let Some(&cursor) = cursors.get(&stream) else { continue };
            let end = match self.shared.broker.last_seq(&stream).await {
                Ok(end) => end,
                Err(e) => {
                    internal_events::emit(SessionFailed {
                        failure: SessionFailure::Replay,
                        client: &self.client_id,
                        about: Some(&stream),
                        error: &fluxmesh_mesh::error_chain(&e),
                        message: "cannot replay a stream for a resumed session; its missed messages are not sent",
                    });
                    continue;
                }
            };
            tracing::debug!(client = %self.client_id, %stream, cursor, end, "resuming a persistent session");
            if cursor < end {
                let stream: Arc<str> = stream.into();
                self.replay_floor.insert(stream.clone(), end);
                self.replay.push_back(super::super::sessions::Replay { stream, reader: None, next: cursor + 1, end });
            }
        }
    }

    /// Takes one message the replay read: queued if a subscription of the
    /// session matches it, at the highest QoS granted among them.
    pub(super) async fn replayed(
        &mut self,
        read: Result<Option<async_nats::jetstream::Message>, super::super::broker::FeedError>,
    ) {
        let stored = match read {
            Ok(Some(stored)) => stored,
            Ok(None) => return,
            Err(e) => {
                internal_events::emit(SessionFailed {
                    failure: SessionFailure::Replay,
                    client: &self.client_id,
                    about: self.replay.front().map(|r| &*r.stream),
                    error: &fluxmesh_mesh::error_chain(&e),
                    message:
                        "a resumed session's replay failed; the rest of that stream's missed messages are not sent",
                });
                if let Some(replay) = self.replay.pop_front() {
                    self.replay_floor.remove(&replay.stream);
                    if let Some(reader) = replay.reader {
                        reader.close().await;
                    }
                }
                self.start_catch_ups();
                return;
            }
        };
        let Some(replay) = self.replay.front() else { return };
        let stream = replay.stream.clone();
        let end = replay.end;
        let seq = stored.info().map(|i| i.stream_sequence).unwrap_or(end);
        if seq <= end {
            let mut scratch = fluxmesh_schemas::frame::AlignedVec::new();
            let message = self.shared.broker.decode_from(&stream, &stored, &mut scratch);
            let granted = message.as_ref().and_then(|m| {
                self.subscriptions
                    .iter()
                    .filter(|(filter, _)| super::super::topics::matches(&m.topic, filter))
                    .map(|(_, opts)| opts.qos as u8)
                    .max()
            });
            match (message, granted) {
                (Some(message), Some(granted)) => {
                    metrics::counter!(crate::internal_events::names::MQTT_REPLAYED_TOTAL).increment(1);
                    let qos = granted.min(message.qos);
                    let origin = Some((stream.clone(), seq));
                    self.ready.push_back(Outgoing {
                        message: Arc::new(message),
                        qos,
                        retain: false,
                        origin,
                        share: None,
                    });
                }
                _ => {
                    if let Some(p) = &mut self.persist {
                        p.scanned.insert(stream.clone(), seq);
                    }
                }
            }
        }
        if let Some(current) = self.replay.front_mut() {
            current.next = seq + 1;
        }
        if seq >= end {
            if let Some(done) = self.replay.pop_front() {
                if let Some(reader) = done.reader {
                    reader.close().await;
                }
            }
            self.start_catch_ups();
        }
    }

    /// The broker could not queue some messages for this session: it
    /// reads them back from their streams (a catch-up) instead.
    pub(super) fn overflowed_again(&mut self) {
        for (stream, first) in self.overflow.take() {
            let entry = self.overflowed.entry(stream).or_insert(first);
            *entry = (*entry).min(first);
        }
        self.start_catch_ups();
    }

    /// Starts a replay for each overflowed stream that has none running:
    /// from after the last message written on it to the feed's position
    /// (every message dropped for the session is at or below it). Live
    /// messages wait until it is done; those it covered are skipped.
    pub(super) fn start_catch_ups(&mut self) {
        let ready: Vec<(Arc<str>, u64)> = self
            .overflowed
            .iter()
            .filter(|(stream, _)| !self.replay.iter().any(|r| &r.stream == *stream))
            .map(|(s, q)| (s.clone(), *q))
            .collect();
        for (stream, first) in ready {
            self.overflowed.remove(&stream);
            let start = self.written_live.get(&stream).map_or(first, |w| (w + 1).min(first));
            let end = self.shared.broker.position(&stream).unwrap_or(first).max(first);
            internal_events::emit(internal_events::mqtt::CaughtUp {
                client: &self.client_id,
                stream: &stream,
                start,
                end,
            });
            let floor = self.replay_floor.entry(stream.clone()).or_insert(end);
            *floor = (*floor).max(end);
            self.replay.push_back(super::super::sessions::Replay { stream, reader: None, next: start, end });
        }
    }

    /// Deletes the replay's readers (best effort; they expire anyway).
    pub(super) async fn close_replay(&mut self) {
        while let Some(replay) = self.replay.pop_front() {
            if let Some(reader) = replay.reader {
                reader.close().await;
            }
        }
    }

    /// Stores a persistent session's subscriptions and cursors if they
    /// changed. `last`: the connection is ending, and a newer session with
    /// the same client id may have written since (then this one's write is
    /// refused, as it should be). While connected, a refused write means
    /// another node wrote after this session loaded (an older session
    /// ending): this one reloads the position and writes again.
    pub(super) async fn save_session(&mut self, last: bool) {
        let Some(persist) = &self.persist else { return };
        // Not yet had: unacknowledged, queued to write, still to be read
        // back by a replay, or dropped from the outbox and not yet replayed.
        let replaying: Vec<(Arc<str>, u64)> = self
            .replay
            .iter()
            .map(|r| (r.stream.clone(), r.next))
            .chain(self.overflowed.iter().map(|(s, q)| (s.clone(), *q)))
            .chain(self.overflow.pending())
            .collect();
        let pending = self
            .out_inflight
            .values()
            .filter(|o| !o.released)
            .filter_map(|o| o.origin.as_ref())
            .chain(self.ready.iter().filter_map(|o| o.origin.as_ref()))
            .chain(replaying.iter());
        // Positions first, then the queue: what a position covers was
        // queued before it was published.
        let positions: std::collections::HashMap<String, u64> = persist
            .record
            .cursors
            .keys()
            .filter_map(|s| self.shared.broker.position(s).map(|p| (s.clone(), p)))
            .collect();
        let pending: Vec<_> = pending.collect();
        let idle = self.replay.is_empty() && self.outbox.as_ref().is_none_or(|o| o.is_empty());
        let delivered = persist.cursors(pending.iter().copied(), |_| None);
        let cursors = persist.cursors(pending.into_iter(), |s| if idle { positions.get(s).copied() } else { None });
        // Messages the session never matched move its cursors only now and
        // then (and at the end): a session that receives nothing costs no
        // writes, however busy the streams.
        let far =
            cursors.iter().any(|(s, c)| *c >= persist.record.cursors.get(s).copied().unwrap_or(0) + IDLE_SAVE_GAP);
        let changed = delivered != persist.record.cursors || far || (last && cursors != persist.record.cursors);
        if !changed && !persist.subs_changed && persist.seq.is_some() {
            return;
        }
        let store = self.shared.session_store.clone();
        let client = self.client_id.clone();
        let Some(persist) = &mut self.persist else { return };
        persist.record.cursors = cursors;
        let mut result = store.save(&client, &mut persist.record, persist.seq).await;
        if result.is_err() && !last {
            if let Ok(current) = store.load(&client).await {
                let expected = current.map(|(_, seq)| seq);
                result = store.save(&client, &mut persist.record, expected).await;
            }
        }
        match result {
            Ok(seq) => {
                persist.seq = Some(seq);
                persist.subs_changed = false;
                metrics::counter!(crate::internal_events::names::MQTT_SESSION_SAVES_TOTAL).increment(1);
            }
            Err(e) => {
                internal_events::emit(internal_events::mqtt::SessionSaveFailed { client: &client, error: &e, last });
            }
        }
    }

    /// A persistent session stores a new subscription before its SUBACK,
    /// with a cursor at the end of each stream it can match that the
    /// session did not read yet: what is stored from now on is owed to it.
    pub(super) async fn remember(&mut self, filters: &[(String, SubOpts)]) -> bool {
        let cmd_topic = format!("devices/{}/{}", self.client_id, fluxmesh_schemas::subject::COMMAND_CHANNEL);
        let mut streams = std::collections::BTreeSet::new();
        for (filter, _) in filters {
            streams.extend(self.shared.broker.streams_for(filter));
        }
        let mut ends = Vec::new();
        for stream in streams {
            if self.persist.as_ref().is_some_and(|p| p.record.cursors.contains_key(&stream)) {
                continue;
            }
            match self.shared.broker.last_seq(&stream).await {
                Ok(end) => ends.push((stream, end)),
                Err(e) => {
                    internal_events::emit(SessionFailed {
                        failure: SessionFailure::Subscribe,
                        client: &self.client_id,
                        about: Some(&stream),
                        error: &fluxmesh_mesh::error_chain(&e),
                        message: "subscriptions refused: their streams cannot be read",
                    });
                    return false;
                }
            }
        }
        if let Some(persist) = &mut self.persist {
            for (filter, opts) in filters {
                // The command topic is granted at most QoS 1.
                let qos = if *filter == cmd_topic { (opts.qos as u8).min(1) } else { opts.qos as u8 };
                persist.record.subs.insert(filter.clone(), qos);
                if opts.has_extras() {
                    let stored = super::super::sessions::StoredOpts {
                        nl: opts.no_local,
                        rap: opts.retain_as_published,
                        id: opts.id,
                    };
                    persist.record.opts.insert(filter.clone(), stored);
                } else {
                    persist.record.opts.remove(filter);
                }
            }
            persist.record.cursors.extend(ends);
            persist.subs_changed = true;
        }
        self.save_session(false).await;
        self.persist.as_ref().is_some_and(|p| !p.subs_changed)
    }
}
