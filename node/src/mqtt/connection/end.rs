//! How a connection ends: why ([`End`], with the protocol [`Violation`]s),
//! what an MQTT 5 client is told (the server's DISCONNECT, with a lingering
//! close), and how it is logged and counted.

use super::*;
use crate::internal_events::{emit, mqtt};

/// Why a connection ended.
#[derive(Debug)]
pub(super) enum End {
    Disconnect,
    /// An MQTT 5 DISCONNECT asking for the will to be published.
    DisconnectWithWill,
    PeerClosed,
    Io(std::io::Error),
    /// The client broke the protocol (or a limit): what, and the detail.
    Protocol(Violation, String),
    KeepAlive,
    TakenOver,
    Revoked,
    Stopped,
    /// The node is cut off from the mesh (`crate::reach`).
    CutOff,
    NotStored(IngestError),
    Denied(Denied),
    WillNotKept(crate::mqtt::wills::WillError),
    Session(crate::mqtt::sessions::SessionError),
}

impl End {
    pub(super) fn reason(&self) -> &'static str {
        match self {
            End::Disconnect => "disconnect",
            End::DisconnectWithWill => "disconnect_with_will",
            End::PeerClosed => "peer_closed",
            End::Io(_) => "io_error",
            End::Protocol(violation, _) => violation.reason(),
            End::KeepAlive => "keep_alive",
            End::TakenOver => "taken_over",
            End::Revoked => "credentials_changed",
            End::Denied(d) => d.reason(),
            End::Stopped => "node_stopping",
            End::CutOff => "node_cut_off",
            End::NotStored(_) => "not_stored",
            End::WillNotKept(_) => "will_not_kept",
            End::Session(_) => "session_unavailable",
        }
    }

    /// The reason an MQTT 5 client is told in the server's DISCONNECT;
    /// `None`: the client ended it, or the socket is gone.
    pub(super) fn disconnect_code(&self) -> Option<u8> {
        Some(match self {
            End::Disconnect | End::DisconnectWithWill | End::PeerClosed | End::Io(_) => return None,
            End::Protocol(violation, _) => return violation.disconnect_code(),
            End::KeepAlive => reason::KEEP_ALIVE_TIMEOUT,
            End::TakenOver => reason::SESSION_TAKEN_OVER,
            End::Revoked => reason::ADMINISTRATIVE_ACTION,
            End::Stopped => reason::SERVER_SHUTTING_DOWN,
            End::CutOff => reason::SERVER_UNAVAILABLE,
            End::NotStored(_) => reason::UNSPECIFIED,
            End::Denied(_) | End::WillNotKept(_) | End::Session(_) => return None,
        })
    }
}

/// A way a client broke the protocol or one of the node's limits; its
/// `reason()` labels `fluxmesh_mqtt_protocol_errors_total` and
/// `fluxmesh_mqtt_disconnects_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Violation {
    AclDenied,
    AuthMethod,
    BadClientId,
    ConnectTimeout,
    EmptyTopic,
    ExpectedConnect,
    MalformedPacket,
    NullInTopic,
    Oversize,
    ProtocolVersion,
    ReceiveMaximum,
    SecondConnect,
    SessionExpiry,
    TopicAliasInvalid,
    TopicAliasUnknown,
    UnexpectedPacket,
    WillRefused,
    WriteTimeout,
}

impl Violation {
    pub(super) fn reason(self) -> &'static str {
        match self {
            Violation::AclDenied => "acl_denied",
            Violation::AuthMethod => "auth_method",
            Violation::BadClientId => "bad_client_id",
            Violation::ConnectTimeout => "connect_timeout",
            Violation::EmptyTopic => "empty_topic",
            Violation::ExpectedConnect => "expected_connect",
            Violation::MalformedPacket => "malformed_packet",
            Violation::NullInTopic => "null_in_topic",
            Violation::Oversize => "oversize",
            Violation::ProtocolVersion => "protocol_version",
            Violation::ReceiveMaximum => "receive_maximum",
            Violation::SecondConnect => "second_connect",
            Violation::SessionExpiry => "session_expiry",
            Violation::TopicAliasInvalid => "topic_alias_invalid",
            Violation::TopicAliasUnknown => "topic_alias_unknown",
            Violation::UnexpectedPacket => "unexpected_packet",
            Violation::WillRefused => "will_refused",
            Violation::WriteTimeout => "write_timeout",
        }
    }

    /// What an MQTT 5 client is told; `None` when it cannot be told
    /// (it does not read what we write).
    fn disconnect_code(self) -> Option<u8> {
        Some(match self {
            Violation::Oversize => reason::PACKET_TOO_LARGE,
            Violation::ReceiveMaximum => reason::RECEIVE_MAXIMUM_EXCEEDED,
            Violation::TopicAliasInvalid => reason::TOPIC_ALIAS_INVALID,
            Violation::AclDenied => reason::NOT_AUTHORIZED,
            Violation::MalformedPacket => reason::MALFORMED,
            Violation::WriteTimeout => return None,
            _ => reason::PROTOCOL_ERROR,
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    /// Tells an MQTT 5 client why the server ends the connection.
    pub(super) async fn say_disconnect(&mut self, end: &End) {
        let Some(code) = end.disconnect_code() else { return };
        if self.codec.version != Version::V5 {
            // An MQTT 3.1.1 client learns it from the socket closing, which
            // must not wait for the session's teardown (NATS is out of
            // reach): it reconnects elsewhere now.
            if matches!(end, End::CutOff) {
                let _ = self.socket.shutdown().await;
            }
            return;
        }
        self.codec.disconnect(&mut self.wbuf, code);
        // A lingering close: send FIN after the DISCONNECT, then read what
        // the client still sends until it closes too. Closing with unread
        // bytes would make the kernel send RST, and a client that gets RST
        // may never read the DISCONNECT.
        let linger = async {
            self.flush().await.ok()?;
            self.socket.shutdown().await.ok()?;
            let mut sink = [0u8; 4096];
            while self.socket.read(&mut sink).await.ok()? > 0 {}
            Some(())
        };
        let _ = tokio::time::timeout(LINGER, linger).await;
    }

    /// Logs and counts how the connection ended.
    pub(super) fn closed(&self, end: &End) {
        match end {
            End::Disconnect
            | End::DisconnectWithWill
            | End::PeerClosed
            | End::Stopped
            | End::CutOff
            | End::TakenOver
            | End::Revoked => {
                tracing::debug!(client = %self.client_id, peer = %self.peer, reason = end.reason(), "MQTT connection closed");
            }
            End::Protocol(violation, detail) => emit(mqtt::ProtocolViolated {
                client: &self.client_id,
                peer: self.peer,
                reason: violation.reason(),
                detail,
            }),
            End::Session(e) => {
                tracing::warn!(client = %self.client_id, peer = %self.peer, error = %fluxmesh_mesh::error_chain(e),
                    "MQTT connection refused: its session could not be read or stored");
            }
            End::WillNotKept(e) => {
                tracing::warn!(client = %self.client_id, peer = %self.peer, error = %fluxmesh_mesh::error_chain(e),
                    "MQTT connection refused: its will could not be kept");
            }
            End::NotStored(e) => {
                tracing::error!(client = %self.client_id, peer = %self.peer, error = %fluxmesh_mesh::error_chain(&e),
                    "MQTT message could not be stored; closing without PUBACK so the device resends it");
            }
            End::Io(e) => {
                tracing::debug!(client = %self.client_id, peer = %self.peer, error = %fluxmesh_mesh::error_chain(&e), "MQTT connection I/O error")
            }
            End::KeepAlive => tracing::info!(client = %self.client_id, peer = %self.peer, "MQTT keep-alive expired"),
            // Counted and logged by the authenticator.
            End::Denied(_) => {}
        }
        emit(mqtt::Disconnected { reason: end.reason() });
    }
}
