//! The simulated devices and how they connect: a rumqttc device (the
//! usual one), a tracked raw-MQTT device (QoS1 with `--verify`: it knows
//! which payload every PUBACK acknowledges), and a JetStream device (the
//! `--peer jetstream` floor, no MQTT and no node). All of them publish the
//! payloads [`Load`] makes, at its rate, until its `stop` is set.

use crate::measurement::{now_us, AckGaps, Counters};
use anyhow::{bail, Context as _};
use fluxmesh_schemas::{shard_of, DeviceTopic, Frame, Subjects};
use fluxmesh_testkit::mqtt::RawClient;
use futures::stream::{FuturesUnordered, StreamExt};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::HashMap;
use std::future::IntoFuture as _;
use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the simulated devices reach the mesh.
#[derive(Clone, Copy, PartialEq)]
pub enum Path {
    /// MQTT to the nodes (the mesh under test).
    Mqtt,
    /// Straight to JetStream with async-nats (the peer).
    JetStream,
}

/// How every simulated device connects: TLS or not, and its secret.
#[derive(Clone, Default)]
pub struct DeviceConn {
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub secret: Option<String>,
}

impl DeviceConn {
    /// TLS trusting the PEM bundle `tls_ca`, if given; `secret` as every
    /// device's password.
    pub fn new(tls_ca: Option<&FsPath>, secret: Option<String>) -> anyhow::Result<Self> {
        Ok(DeviceConn { tls: tls_ca.map(tls_client_config).transpose().context("--tls-ca")?, secret })
    }
}

/// A rustls client config trusting the certificates in the PEM file `ca`.
fn tls_client_config(ca: &FsPath) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{pem::PemObject as _, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("{}", ca.display()))? {
        roots.add(cert.with_context(|| format!("{}", ca.display()))?)?;
    }
    if roots.is_empty() {
        bail!("{}: no certificate in it", ca.display());
    }
    Ok(Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth()))
}

/// What every simulated device shares.
pub struct Load {
    pub counters: Arc<Counters>,
    pub stop: Arc<AtomicBool>,
    pub size: usize,
    /// Messages per second for this device; 0 means as fast as accepted.
    pub per_device: f64,
    pub json: bool,
    /// This device's PUBACK gaps (QoS1 over MQTT).
    pub gaps: Arc<AckGaps>,
}

/// Smallest --json payload.
pub const JSON_MIN: usize = 80;

/// (send time µs, sequence number) of a payload this load generator made,
/// binary (first 16 bytes) or JSON (fixed offsets).
pub fn payload_meta(payload: &[u8]) -> Option<(u64, u64)> {
    let num = |r: std::ops::Range<usize>| std::str::from_utf8(payload.get(r)?).ok()?.parse::<u64>().ok();
    // Not just a leading `{`: one binary payload in 256 starts with that
    // byte (the low byte of its send time), and was then not recognised.
    if payload.starts_with(br#"{"sent_us":""#) {
        // {"sent_us":"<20 digits>","seq":"<20 digits>",...
        return Some((num(12..32)?, num(41..61)?));
    }
    let word =
        |r: std::ops::Range<usize>| payload.get(r).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_le_bytes);
    Some((word(0..8)?, word(8..16)?))
}

impl Load {
    /// How many messages this device should have sent by now.
    fn due(&self, start: Instant, seq: u64) -> u64 {
        if self.per_device == 0.0 {
            seq + 64
        } else {
            (start.elapsed().as_secs_f64() * self.per_device) as u64
        }
    }

    fn payload(&self, seq: u64) -> Vec<u8> {
        if self.json {
            let head = format!(r#"{{"sent_us":"{:020}","seq":"{:020}","t":{}.5,"pad":""#, now_us(), seq, seq % 60);
            let mut payload = head.into_bytes();
            payload.resize(self.size.saturating_sub(2).max(payload.len()), b'x');
            payload.extend_from_slice(b"\"}");
            return payload;
        }
        let mut payload = vec![0u8; self.size];
        payload[..8].copy_from_slice(&now_us().to_le_bytes());
        payload[8..16].copy_from_slice(&seq.to_le_bytes());
        payload
    }
}

/// One MQTT device: a publishing task and its event loop.
pub fn mqtt_device(
    id: String,
    addr: SocketAddr,
    conn: &DeviceConn,
    qos: QoS,
    verify: bool,
    acked_seqs: Arc<Mutex<Vec<u64>>>,
    load: Load,
) -> [tokio::task::JoinHandle<()>; 2] {
    let mut opts = MqttOptions::new(id.clone(), addr.ip().to_string(), addr.port());
    if let Some(tls) = &conn.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone())));
    }
    if let Some(secret) = &conn.secret {
        opts.set_credentials(id.clone(), secret.clone());
    }
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(100);
    opts.set_max_packet_size(load.size + 1024, load.size + 1024);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let c = load.counters.clone();
    let stop = load.stop.clone();
    let gaps = load.gaps.clone();
    let events = tokio::spawn(async move {
        // New publishes leave in the order queued: the n-th carries seq n.
        // After a reconnect, rumqttc resends the unacknowledged ones with
        // their old packet ids: those are not new sequence numbers.
        let mut by_pkid: HashMap<u16, u64> = HashMap::new();
        let mut next_seq = 0u64;
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) if verify => {
                    if let std::collections::hash_map::Entry::Vacant(slot) = by_pkid.entry(pkid) {
                        slot.insert(next_seq);
                        next_seq += 1;
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => gaps.connected(),
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    c.acked.fetch_add(1, Ordering::Relaxed);
                    gaps.ack();
                    if let Some(seq) = by_pkid.remove(&ack.pkid) {
                        if let Ok(mut seqs) = acked_seqs.lock() {
                            seqs.push(seq);
                        }
                    }
                }
                Ok(_) => {}
                // The connection failed (a node was killed, or the run's own
                // disconnect): like a real device, connect again and resend
                // what was not acknowledged, until the run is over.
                Err(_) if !stop.load(Ordering::Relaxed) => {
                    c.reconnects.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(_) => return,
            }
        }
    });
    let topic = format!("devices/{id}/load");
    let publisher = tokio::spawn(async move {
        let start = Instant::now();
        let mut seq = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        while !load.stop.load(Ordering::Relaxed) {
            let due = load.due(start, seq);
            while seq < due && !load.stop.load(Ordering::Relaxed) {
                if client.publish(topic.as_str(), qos, false, load.payload(seq)).await.is_err() {
                    return;
                }
                seq += 1;
                load.counters.sent.fetch_add(1, Ordering::Relaxed);
            }
            if load.per_device > 0.0 {
                tick.tick().await;
            }
        }
        let _ = client.disconnect().await;
    });
    [publisher, events]
}

/// One device publishing straight to JetStream, as a node would: the same
/// subject, headers and frame, with at most 100 acks outstanding (a node's
/// default `mqtt.max_inflight`).
pub async fn jetstream_device(nats: async_nats::Client, subjects: Subjects, id: String, load: Load) {
    let js = async_nats::jetstream::new(nats);
    let Ok(topic) = DeviceTopic::new(&id, "load") else { return };
    let subject = subjects.telemetry(shard_of(&id, 64), &topic);
    let mut pending = FuturesUnordered::new();
    let start = Instant::now();
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while !load.stop.load(Ordering::Relaxed) {
        let due = load.due(start, seq);
        while seq < due && !load.stop.load(Ordering::Relaxed) {
            while pending.len() >= 100 {
                if let Some(Ok(_)) = pending.next().await {
                    load.counters.acked.fetch_add(1, Ordering::Relaxed);
                }
            }
            let frame = Frame::telemetry(&id, "load", "loadgen", load.payload(seq));
            let Ok(bytes) = frame.encode() else { return };
            match js.publish_with_headers(subject.clone(), fluxmesh_mesh::frame_headers(&frame), bytes.into()).await {
                Ok(ack) => pending.push(ack.into_future()),
                Err(e) => {
                    eprintln!("\n{id}: {e}");
                    return;
                }
            }
            seq += 1;
            load.counters.sent.fetch_add(1, Ordering::Relaxed);
        }
        if load.per_device > 0.0 {
            tokio::select! {
                _ = tick.tick() => {}
                Some(r) = pending.next() => if r.is_ok() { load.counters.acked.fetch_add(1, Ordering::Relaxed); },
            }
        } else if let Some(Ok(_)) = pending.next().await {
            load.counters.acked.fetch_add(1, Ordering::Relaxed);
        }
    }
    while let Some(r) = pending.next().await {
        if r.is_ok() {
            load.counters.acked.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A QoS1 device for `--verify` runs, with exact bookkeeping: it assigns
/// its own packet ids, so it knows which payload each PUBACK acknowledges.
/// (rumqttc drops unacknowledged publishes when it reconnects to a broker
/// that has no session for it, which makes pkid→payload tracking across
/// reconnects guesswork.) When a connection fails it reconnects, to the
/// same node and, if that fails, to the next one, and resends every
/// unacknowledged message with DUP set, as a real device would.
pub async fn tracked_device(
    id: String,
    nodes: Vec<SocketAddr>,
    first: usize,
    conn: DeviceConn,
    acked_seqs: Arc<Mutex<Vec<u64>>>,
    load: Load,
) {
    let topic = format!("devices/{id}/load");
    let login = conn.secret.as_deref().map(|secret| (id.as_str(), secret));
    let mut unacked: std::collections::BTreeMap<u16, (u64, Vec<u8>)> = Default::default();
    let (mut seq, mut next_pkid, mut attempt) = (0u64, 1u16, first);
    let start = Instant::now();
    while !load.stop.load(Ordering::Relaxed) {
        let addr = nodes[attempt % nodes.len()];
        let Some(socket) = connect_stream(addr, conn.tls.as_ref()).await else {
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut client = RawClient::new(socket);
        if client.send_connect(&id, 30, login).await.is_err() {
            continue;
        }
        let connack = client.connack(Duration::from_secs(5)).await;
        if !connack.is_ok_and(|ack| ack.code == rumqttc::ConnectReturnCode::Success) {
            load.counters.reconnects.fetch_add(1, Ordering::Relaxed);
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        load.gaps.connected();
        // Resend what the last connection left unacknowledged.
        for (pkid, (_, payload)) in &unacked {
            let _ = client.queue_publish(&topic, *pkid, true, payload);
        }
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        loop {
            if load.stop.load(Ordering::Relaxed) && unacked.is_empty() {
                let _ = client.queue_disconnect();
                let _ = client.flush().await;
                return;
            }
            if !load.stop.load(Ordering::Relaxed) {
                let due = load.due(start, seq);
                while seq < due && unacked.len() < 100 {
                    let payload = load.payload(seq);
                    while unacked.contains_key(&next_pkid) || next_pkid == 0 {
                        next_pkid = next_pkid.wrapping_add(1);
                    }
                    let _ = client.queue_publish(&topic, next_pkid, false, &payload);
                    unacked.insert(next_pkid, (seq, payload));
                    next_pkid = next_pkid.wrapping_add(1);
                    seq += 1;
                    load.counters.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            if client.has_queued() && client.flush().await.is_err() {
                break;
            }
            tokio::select! {
                packet = client.read_packet() => match packet {
                    Ok(rumqttc::mqttbytes::v4::Packet::PubAck(ack)) => {
                        if let Some((acked, _)) = unacked.remove(&ack.pkid) {
                            load.counters.acked.fetch_add(1, Ordering::Relaxed);
                            load.gaps.ack();
                            if let Ok(mut seqs) = acked_seqs.lock() {
                                seqs.push(acked);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                },
                _ = tick.tick() => {}
            }
        }
        // The connection failed: try the same node again first.
        load.counters.reconnects.fetch_add(1, Ordering::Relaxed);
    }
}

/// A device's connection: plain TCP or TLS over it.
trait DeviceIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> DeviceIo for T {}

/// Connects to `addr` (1 s), then, with `tls`, does the TLS handshake (5 s)
/// with the address's IP as the server name.
async fn connect_stream(addr: SocketAddr, tls: Option<&Arc<rustls::ClientConfig>>) -> Option<Box<dyn DeviceIo>> {
    let socket = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await.ok()?.ok()?;
    let _ = socket.set_nodelay(true);
    let Some(tls) = tls else { return Some(Box::new(socket)) };
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let connector = rumqttc::tokio_rustls::TlsConnector::from(tls.clone());
    match tokio::time::timeout(Duration::from_secs(5), connector.connect(name, socket)).await {
        Ok(Ok(stream)) => Some(Box::new(stream)),
        Ok(Err(e)) => {
            eprintln!("\n{addr}: TLS: {e}");
            None
        }
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_payloads_are_json_and_carry_their_meta() {
        let load = Load {
            counters: Arc::default(),
            stop: Arc::default(),
            size: 100,
            per_device: 0.0,
            json: true,
            gaps: Arc::default(),
        };
        let p = load.payload(123_456);
        assert_eq!(p.len(), 100);
        let v: serde_json::Value = serde_json::from_slice(&p).expect("valid JSON");
        assert_eq!(v["t"], 36.5);
        let (sent, seq) = payload_meta(&p).expect("meta");
        assert_eq!(seq, 123_456);
        assert!(sent > 1_600_000_000_000_000);
        let binary = Load { json: false, ..load }.payload(7);
        assert_eq!(payload_meta(&binary).map(|m| m.1), Some(7));
        // A binary payload whose send time's low byte is `{`.
        let mut brace = binary.clone();
        brace[0] = b'{';
        assert_eq!(payload_meta(&brace).map(|m| m.1), Some(7));
    }
}
