//! The handshake: CONNECT read and checked, the client authenticated, its
//! session registered, and CONNACK (or the refusal) written.

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    /// Reads CONNECT, checks it, registers the session, answers CONNACK.
    pub(super) async fn handshake(&mut self) -> Result<Session, End> {
        let connect = loop {
            // Read before the codec consumes the packet.
            let declared = codec::connect_level(&self.rbuf);
            match codec::read(None, &mut self.rbuf, self.max_packet) {
                Ok(Some(Inbound::Connect(c))) => break c,
                Ok(Some(other)) => {
                    return Err(End::Protocol(Violation::ExpectedConnect, format!("first packet was {other:?}")))
                }
                Ok(None) => self.read_more().await?,
                Err(e @ (codec::DecodeError::Level(_) | codec::DecodeError::ProtocolName)) => {
                    // MQTT 5 clients read only an MQTT 5 CONNACK; older
                    // ones a 3.1.1 one.
                    let level = declared.unwrap_or(4);
                    self.codec = Codec { version: if level >= 5 { Version::V5 } else { Version::V4 } };
                    self.refuse(reason::UNSUPPORTED_PROTOCOL).await;
                    return Err(End::Protocol(Violation::ProtocolVersion, fluxmesh_mesh::error_chain(&e)));
                }
                Err(e) => return Err(End::Protocol(Violation::MalformedPacket, fluxmesh_mesh::error_chain(&e))),
            }
        };
        self.codec = Codec { version: connect.version };
        let v5 = connect.version == Version::V5;
        let cut_off = *self.unavailable.borrow();
        if cut_off {
            // Cut off from the mesh: whatever it sends could not be stored.
            self.refuse(reason::SERVER_UNAVAILABLE).await;
            return Err(End::CutOff);
        }
        if connect.auth_method.is_some() {
            self.refuse(reason::BAD_AUTHENTICATION_METHOD).await;
            return Err(End::Protocol(Violation::AuthMethod, "enhanced authentication is not offered".into()));
        }
        self.clean = connect.clean_start;
        self.session_expiry = match connect.version {
            Version::V5 => connect.session_expiry.unwrap_or(0),
            Version::V4 if connect.clean_start => 0,
            Version::V4 => u32::MAX,
        };
        let mut assigned = None;
        self.client_id = if connect.client_id.is_empty() {
            if !v5 && !connect.clean_start {
                self.refuse(reason::CLIENT_ID_INVALID).await;
                return Err(End::Protocol(Violation::BadClientId, "empty client id needs a clean session".into()));
            }
            let id = format!("auto-{}", uuid::Uuid::new_v4().simple());
            assigned = Some(id.clone());
            id
        } else {
            connect.client_id
        };
        let mut keep_alive = connect.keep_alive;
        let mut server_keep_alive = None;
        let cap = self.shared.config.server_keep_alive_secs;
        if v5 && cap > 0 && (keep_alive == 0 || keep_alive > cap) {
            keep_alive = cap;
            server_keep_alive = Some(cap);
        }
        self.keep_alive = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        if v5 {
            self.limits.receive_maximum = usize::from(connect.receive_maximum.unwrap_or(u16::MAX).max(1));
            self.limits.max_packet = connect.max_packet_size.map_or(usize::MAX, |m| m as usize);
            self.limits.alias_max = connect.topic_alias_max.unwrap_or(0);
        }
        self.grant = self.authenticate(connect.username.as_deref(), connect.password.as_deref()).await?;
        if let Some(will) = connect.will {
            self.will_delay = will.delay;
            self.will = Some(self.accept_will(will).await?);
        }
        self.open_session().await?;

        let session = Session {
            serial: SERIALS.fetch_add(1, Ordering::Relaxed),
            connected_us: fluxmesh_schemas::frame::now_us(),
            end: CancellationToken::new(),
            commands: self.inbox.clone(),
            revoked: Arc::default(),
            auth_revision: self.grant.revision,
        };
        self.session_id = session.serial;
        let previous = self
            .shared
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.client_id.clone(), session.clone());
        if let Some(previous) = previous {
            tracing::info!(client = %self.client_id, peer = %self.peer, "client id connected again; ending the older session");
            previous.end.cancel();
        }
        // The client is back: a will waiting out its delay is not sent.
        self.shared.cancel_delayed_will(&self.client_id);
        self.shared.sessions_bus.announce(&self.client_id, session.connected_us).await;
        let present = self.persist.as_ref().is_some_and(|p| p.present);
        let info = codec::ConnAckInfo {
            assigned_client_id: assigned,
            receive_maximum: u16::try_from(self.shared.config.max_inflight).unwrap_or(u16::MAX),
            max_packet_size: u32::try_from(self.max_packet).unwrap_or(u32::MAX),
            topic_alias_max: self.shared.config.topic_alias_max,
            server_keep_alive,
            session_expiry: None,
        };
        self.codec.connack(&mut self.wbuf, present, reason::SUCCESS, Some(&info));
        self.flush().await?;
        tracing::debug!(client = %self.client_id, peer = %self.peer, present, version = ?self.codec.version, "MQTT connected");
        if present {
            self.resume().await;
        }
        Ok(session)
    }

    /// Checks the CONNECT's credentials: the client id is the device id,
    /// the password its secret, the username empty or the client id.
    pub(super) async fn authenticate(&mut self, username: Option<&str>, password: Option<&[u8]>) -> Result<Grant, End> {
        let username = username.filter(|u| !u.is_empty());
        let secret = password.filter(|p| !p.is_empty());
        let denied = match self.shared.auth.authenticate("mqtt", &self.client_id, username, secret).await {
            Ok(grant) => return Ok(grant),
            Err(denied) => denied,
        };
        let code = match denied {
            Denied::BadCredentials | Denied::UsernameMismatch => reason::BAD_USER_NAME_OR_PASSWORD,
            Denied::NoCredentials | Denied::Disabled => reason::NOT_AUTHORIZED,
            Denied::Unavailable => reason::SERVER_UNAVAILABLE,
        };
        self.refuse(code).await;
        Err(End::Denied(denied))
    }

    /// Refuses the CONNECT with `code` (an MQTT 5 reason; 3.1.1 gets its
    /// nearest return code).
    pub(super) async fn refuse(&mut self, code: u8) {
        self.codec.connack(&mut self.wbuf, false, code, None);
        let _ = self.flush().await;
    }
}
