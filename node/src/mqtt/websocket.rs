//! MQTT over WebSocket (`mqtt.ws_listen`, and `mqtt.wss_listen` with the
//! MQTT TLS certificate): the same connection task as TCP, behind a pump
//! that turns binary WebSocket messages into a byte stream and back.
//!
//! MQTT over WebSocket (MQTT 3.1.1 section 6) sends packets in binary
//! messages; one packet may span messages and one message may hold several
//! packets, so the connection task reads the concatenated bytes as it reads
//! a socket. The handshake selects the subprotocol `mqtt` (or the older
//! `mqttv3.1`) when the client offers it; a client that offers only other
//! subprotocols is refused with 400. A text message ends the connection.
//! Auth, ACLs, limits and the PUBACK rule are the TCP connection's.

use super::Shared;
use crate::internal_events::emit;
use crate::internal_events::mqtt::{Handshake, HandshakeFailed, ProtocolViolated};
use bytes::BytesMut;
use futures::{SinkExt as _, StreamExt as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Bytes buffered between the WebSocket and the connection task, each way.
const PIPE_BYTES: usize = 64 * 1024;

/// The subprotocol to answer with, from what the client offered:
/// `Ok(None)` when it offered none, `Err` when it offered only others.
fn choose_subprotocol(offered: &[&str]) -> Result<Option<&'static str>, ()> {
    if offered.is_empty() {
        return Ok(None);
    }
    for wanted in ["mqtt", "mqttv3.1"] {
        if offered.iter().any(|p| p.eq_ignore_ascii_case(wanted)) {
            return Ok(Some(wanted));
        }
    }
    Err(())
}

/// Serves one WebSocket connection (TLS already done, if any).
// The handshake callback's error type is tungstenite's HTTP response.
#[allow(clippy::result_large_err)]
pub(super) async fn serve<S>(stream: S, peer: SocketAddr, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let select = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        let offered: Vec<&str> = request
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        match choose_subprotocol(&offered) {
            Ok(Some(chosen)) => {
                response.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(chosen));
                Ok(response)
            }
            Ok(None) => Ok(response),
            Err(()) => {
                let mut refused = ErrorResponse::new(Some("MQTT over WebSocket needs the subprotocol `mqtt`".into()));
                *refused.status_mut() = StatusCode::BAD_REQUEST;
                Err(refused)
            }
        }
    };
    // A message may carry at most one largest packet, plus slack.
    let max = shared.max_payload + fluxmesh_schemas::subject::MAX_TOPIC_LEN + 1024;
    let config = WebSocketConfig::default().max_message_size(Some(max)).max_frame_size(Some(max));
    let timeout = Duration::from_millis(u64::from(shared.config.connection_timeout_ms));
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(stream, select, Some(config));
    let ws = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            emit(HandshakeFailed { kind: Handshake::WebSocket, peer, error: Some(&e) });
            return;
        }
        Err(_) => {
            emit(HandshakeFailed { kind: Handshake::WebSocket, peer, error: None });
            return;
        }
    };
    let (app, pipe) = tokio::io::duplex(PIPE_BYTES);
    tokio::join!(super::connection::serve(app, peer, shared), pump(ws, pipe, peer));
}

/// Moves bytes between the WebSocket and the connection task until either
/// side ends: the client's close (or a broken socket) reaches the task as
/// end of stream, and the task ending closes the WebSocket.
async fn pump<S>(mut ws: tokio_tungstenite::WebSocketStream<S>, mut pipe: tokio::io::DuplexStream, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut buf = BytesMut::with_capacity(8 * 1024);
    loop {
        tokio::select! {
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Binary(data))) => {
                    if pipe.write_all(&data).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Text(_))) => {
                    emit(ProtocolViolated {
                        client: "",
                        peer,
                        reason: "ws_text_frame",
                        detail: "MQTT over WebSocket takes binary messages only",
                    });
                    break;
                }
                // Pings are answered by the library on the next write.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                    if ws.flush().await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %fluxmesh_mesh::error_chain(&e), "MQTT WebSocket read failed");
                    break;
                }
            },
            read = pipe.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if ws.send(Message::Binary(buf.split().freeze())).await.is_err() {
                        break;
                    }
                }
            },
        }
    }
    // The task sees end of stream; the client sees a close.
    let _ = pipe.shutdown().await;
    drop(pipe);
    let _ = ws.close(None).await;
}

#[cfg(test)]
mod tests {
    use super::choose_subprotocol;

    #[test]
    fn the_mqtt_subprotocol_is_chosen() {
        assert_eq!(choose_subprotocol(&["mqtt"]), Ok(Some("mqtt")));
        assert_eq!(choose_subprotocol(&["chat", "MQTT"]), Ok(Some("mqtt")));
        assert_eq!(choose_subprotocol(&["mqttv3.1"]), Ok(Some("mqttv3.1")));
        assert_eq!(choose_subprotocol(&[]), Ok(None));
        assert_eq!(choose_subprotocol(&["chat"]), Err(()));
    }
}
