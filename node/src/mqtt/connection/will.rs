//! A connection's will: kept at CONNECT, published (after its MQTT 5
//! delay) or cleared when the connection ends.

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    /// Checks a CONNECT's will like a publish (topic, plain topics, ACL,
    /// size) and keeps it in NATS, so that it is published even if this
    /// node dies. Refused: CONNACK "not authorized"; not kept: "server
    /// unavailable".
    pub(super) async fn accept_will(&mut self, will: codec::WillIn) -> Result<(super::super::wills::Will, u64), End> {
        let topic_ok = DeviceTopic::parse(&will.topic).is_ok()
            || (PlainTopic::parse(&will.topic).is_ok() && self.plain_allowed(&will.topic));
        let allowed = topic_ok
            && !self.topic_denied(&will.topic)
            && self.grant.may_publish(&will.topic)
            && will.payload.len() <= self.shared.max_payload;
        if !allowed {
            if topic_ok {
                self.acl_denied("will", &will.topic);
            }
            self.refuse(reason::NOT_AUTHORIZED).await;
            return Err(End::Protocol(Violation::WillRefused, format!("will on `{}` is not allowed", will.topic)));
        }
        let will = super::super::wills::Will {
            topic: will.topic,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            id: fluxmesh_schemas::FrameId::new_v7(),
            props: will.props.map(|p| p.to_header()),
            expiry: will.expiry,
        };
        match self.shared.wills.keep(&self.client_id, &will).await {
            Ok(seq) => Ok((will, seq)),
            Err(e) => {
                self.refuse(reason::SERVER_UNAVAILABLE).await;
                Err(End::WillNotKept(e))
            }
        }
    }

    /// After the connection: a DISCONNECT discards the will; any other end
    /// publishes it, after its MQTT 5 delay (at most the session's
    /// expiry) unless the client connects again meanwhile. Then its record
    /// is cleared.
    pub(super) async fn end_will(&mut self, end: &End) {
        let Some((will, seq)) = self.will.take() else { return };
        let delay = self.will_delay.min(self.session_expiry);
        let publish = match end {
            End::Disconnect => false,
            // The client is back already, and its session with it.
            End::TakenOver => delay == 0,
            _ => true,
        };
        let publish = publish
            && (delay == 0 || matches!(end, End::Stopped) || {
                let (shared, client) = (self.shared.clone(), self.client_id.clone());
                wait_will_delay(shared, client, self.session_id, delay).await
            });
        if publish {
            let published =
                tokio::time::timeout(DRAIN_TIMEOUT, self.shared.wills.publish(&self.client_id, &will, end.reason()))
                    .await;
            let failed = match published {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(fluxmesh_mesh::error_chain(&e)),
                Err(_) => Some(format!("not stored within {DRAIN_TIMEOUT:?}")),
            };
            if let Some(error) = failed {
                // The record stays: if this node dies, another publishes it.
                internal_events::emit(internal_events::mqtt::SessionFailed {
                    failure: internal_events::mqtt::SessionFailure::WillPublish,
                    client: &self.client_id,
                    about: Some(&will.topic),
                    error: &error,
                    message: "cannot publish a will",
                });
                return;
            }
        }
        self.shared.wills.clear(&self.client_id, seq).await;
    }
}

/// Waits out a will's delay; `false` if the client connected again
/// meanwhile (on any node). The node stopping ends the wait: the will goes
/// out now rather than never.
async fn wait_will_delay(shared: Arc<Shared>, client: String, session: u64, secs: u32) -> bool {
    let back = shared.delay_will(&client, session);
    let sleep = tokio::time::sleep(Duration::from_secs(u64::from(secs)));
    let publish = tokio::select! {
        _ = sleep => true,
        _ = shared.life.stopped() => true,
        _ = back.cancelled() => false,
    };
    shared.will_delay_over(&client, session);
    if !publish {
        internal_events::emit(internal_events::mqtt::WillCancelled { client: &client });
    }
    publish
}
