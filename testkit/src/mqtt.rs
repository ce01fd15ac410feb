//! MQTT 3.1.1 on the wire, for tests and load that must control the bytes.
//!
//! Two levels: [`packet`], [`connect_packet`] and [`publish_packet`] build
//! packets by hand, so a test can also send what no client library would
//! (a topic that is not UTF-8, a length that lies); [`RawClient`] speaks
//! well-formed packets (rumqttc's `mqttbytes`) but leaves packet ids, DUP
//! and when to send to its caller, which a client library decides for
//! itself.

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, Packet, Publish};
use rumqttc::QoS;
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// A CONNECT (MQTT 3.1.1, clean session, keep-alive 60 s) for `client_id`.
pub fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    packet(0x10, &body)
}

/// A QoS1 PUBLISH of raw `topic` bytes (not necessarily UTF-8).
pub fn publish_packet(topic: &[u8], pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic);
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(payload);
    packet(0x32, &body)
}

/// A packet: the fixed header byte `header`, the remaining length of
/// `body` (variable-length encoded) and `body`, whatever it holds.
pub fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// Largest packet a [`RawClient`] reads (remaining length, bytes).
const MAX_INCOMING: usize = 1 << 20;

/// An MQTT 3.1.1 client over any byte stream (TCP, TLS) that does only
/// what it is told: it never reconnects, resends, pings or picks a packet
/// id. Writes are queued, then sent by [`RawClient::flush`], so a burst of
/// publishes leaves in one write.
pub struct RawClient<S> {
    stream: S,
    /// Queued, not yet written.
    out: BytesMut,
    /// Read, not yet decoded.
    read: BytesMut,
}

impl<S> std::fmt::Debug for RawClient<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawClient").field("queued", &self.out.len()).field("unread", &self.read.len()).finish()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    /// A client on `stream`, which is connected but has sent nothing yet.
    pub fn new(stream: S) -> Self {
        RawClient { stream, out: BytesMut::new(), read: BytesMut::with_capacity(4096) }
    }

    /// Writes a CONNECT (clean session) for `client_id`, with `login`
    /// (user name, password) if given; [`RawClient::connack`] reads the
    /// answer.
    pub async fn send_connect(
        &mut self,
        client_id: &str,
        keep_alive_s: u16,
        login: Option<(&str, &str)>,
    ) -> io::Result<()> {
        let mut connect = Connect::new(client_id);
        connect.keep_alive = keep_alive_s;
        if let Some((user, password)) = login {
            connect.set_login(user, password);
        }
        connect.write(&mut self.out).map_err(invalid)?;
        self.flush().await
    }

    /// Waits up to `timeout` for the CONNACK, which must be the first
    /// packet the server sends.
    pub async fn connack(&mut self, timeout: Duration) -> io::Result<ConnAck> {
        match self.read_packet_within(timeout).await? {
            Packet::ConnAck(ack) => Ok(ack),
            other => Err(invalid(format!("expected CONNACK, got {other:?}"))),
        }
    }

    /// Queues a QoS1 PUBLISH with packet id `pkid`, marked as a resend if
    /// `dup`.
    pub fn queue_publish(&mut self, topic: &str, pkid: u16, dup: bool, payload: &[u8]) -> io::Result<()> {
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload);
        publish.pkid = pkid;
        publish.dup = dup;
        publish.write(&mut self.out).map_err(invalid)?;
        Ok(())
    }

    /// Queues a PINGREQ.
    pub fn queue_ping(&mut self) -> io::Result<()> {
        Packet::PingReq.write(&mut self.out, usize::MAX).map_err(invalid)?;
        Ok(())
    }

    /// Queues a DISCONNECT.
    pub fn queue_disconnect(&mut self) -> io::Result<()> {
        Packet::Disconnect.write(&mut self.out, usize::MAX).map_err(invalid)?;
        Ok(())
    }

    /// Whether anything is queued.
    pub fn has_queued(&self) -> bool {
        !self.out.is_empty()
    }

    /// Writes what is queued and flushes the stream (TLS keeps records
    /// buffered until flushed).
    pub async fn flush(&mut self) -> io::Result<()> {
        self.stream.write_all(&self.out).await?;
        self.out.clear();
        self.stream.flush().await
    }

    /// The next packet from the server. Cancel-safe: bytes read before a
    /// cancellation stay for the next call, so it can race a timer in
    /// `select!`.
    pub async fn read_packet(&mut self) -> io::Result<Packet> {
        loop {
            match Packet::read(&mut self.read, MAX_INCOMING) {
                Ok(packet) => return Ok(packet),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(invalid(e)),
            }
            if self.stream.read_buf(&mut self.read).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// [`RawClient::read_packet`], failing with `TimedOut` if no whole
    /// packet arrives within `timeout`.
    pub async fn read_packet_within(&mut self, timeout: Duration) -> io::Result<Packet> {
        tokio::time::timeout(timeout, self.read_packet()).await.map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
    }
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_built_packets_decode_as_mqttbytes_reads_them() {
        let mut bytes = BytesMut::from(&connect_packet("dev-1")[..]);
        bytes.extend_from_slice(&publish_packet(b"devices/dev-1/t", 7, b"{}"));
        let Ok(Packet::Connect(connect)) = Packet::read(&mut bytes, MAX_INCOMING) else { panic!("CONNECT") };
        assert_eq!((connect.client_id.as_str(), connect.keep_alive, connect.clean_session), ("dev-1", 60, true));
        let Ok(Packet::Publish(publish)) = Packet::read(&mut bytes, MAX_INCOMING) else { panic!("PUBLISH") };
        assert_eq!((publish.topic.as_str(), publish.pkid, &publish.payload[..]), ("devices/dev-1/t", 7, &b"{}"[..]));
        // Remaining lengths over 127 take a second byte.
        assert_eq!(packet(0x30, &[0; 200])[..3], [0x30, 0xc8, 0x01]);
    }

    #[tokio::test]
    async fn the_client_connects_publishes_and_reads_acks() {
        let (client_end, mut server) = tokio::io::duplex(1 << 16);
        let mut client = RawClient::new(client_end);
        client.send_connect("dev", 30, Some(("dev", "secret"))).await.expect("CONNECT");
        let mut seen = BytesMut::new();
        let connect = loop {
            server.read_buf(&mut seen).await.expect("read");
            if let Ok(Packet::Connect(c)) = Packet::read(&mut seen, MAX_INCOMING) {
                break c;
            }
        };
        assert_eq!(connect.login.map(|l| (l.username, l.password)), Some(("dev".into(), "secret".into())));
        server.write_all(&[0x20, 0x02, 0x00, 0x00]).await.expect("CONNACK");
        let ack = client.connack(Duration::from_secs(5)).await.expect("CONNACK");
        assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);

        client.queue_publish("devices/dev/t", 9, true, b"x").expect("queue");
        assert!(client.has_queued());
        client.flush().await.expect("flush");
        assert!(!client.has_queued());
        let publish = loop {
            if let Ok(Packet::Publish(p)) = Packet::read(&mut seen, MAX_INCOMING) {
                break p;
            }
            server.read_buf(&mut seen).await.expect("read");
        };
        assert_eq!((publish.pkid, publish.dup, publish.qos), (9, true, QoS::AtLeastOnce));

        // A PUBACK split over two writes is one packet.
        server.write_all(&[0x40, 0x02]).await.expect("write");
        let timeout = client.read_packet_within(Duration::from_millis(50)).await;
        assert_eq!(timeout.map_err(|e| e.kind()).err(), Some(io::ErrorKind::TimedOut));
        server.write_all(&[0x00, 0x09]).await.expect("write");
        let Ok(Packet::PubAck(ack)) = client.read_packet_within(Duration::from_secs(5)).await else { panic!("PUBACK") };
        assert_eq!(ack.pkid, 9);
        drop(server);
        let closed = client.read_packet().await;
        assert_eq!(closed.map_err(|e| e.kind()).err(), Some(io::ErrorKind::UnexpectedEof));
    }
}
