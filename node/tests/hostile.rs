//! Hostile input against a real node while a well-behaved device publishes:
//! forged topics, invalid UTF-8, malformed lengths, a few hundred mutated
//! packet streams, corrupt frames injected on the bus. Each is refused and
//! counted, the node keeps serving, and every message it acknowledged is
//! stored.

mod common;

use fluxmesh_node::internal_events::names;

use common::{counter, get_json, metrics, payload_seq, read_telemetry, start_node, Device};
use fluxmesh_testkit::mqtt::{connect_packet, packet, publish_packet};
use fluxmesh_testkit::{wait_for, NatsServer};
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `bytes`, closes the write side and reads until the node closes
/// the connection; returns what it answered.
async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut answer))
        .await
        .expect("the node answers or closes in time")
        .ok();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_counted_and_acknowledged_messages_survive() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |c| c.ingest.max_payload_bytes = 2048).await;
    let client = nats.client().await.expect("connect");
    let addr = node.mqtt_addr();

    // A well-behaved device keeps publishing through all of it.
    let good = Device::connect(addr, "good").await;
    let publisher = {
        let client = good.client.clone();
        tokio::spawn(async move {
            for i in 0..300u64 {
                let payload = format!("{{\"seq\":{i}}}").into_bytes();
                client.publish("devices/good/t", rumqttc::QoS::AtLeastOnce, false, payload).await.expect("queue");
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };

    // Forged topics: wildcards, empty levels, NUL, reserved channel, and a
    // topic outside `devices/`. Each is PUBACKed (so the device does not
    // resend it forever), counted by reason, and never stored.
    let mut forged = connect_packet("forger");
    for (i, topic) in [
        &b"devices/forger/+/x"[..],
        b"devices/forger/#",
        b"devices//x",
        b"devices/forger",
        b"devices/forger/cmd",
        b"devices",
        b"$SYS/forged",
        b"devices/forger/a b.c*>%",
    ]
    .iter()
    .enumerate()
    {
        forged.extend(publish_packet(topic, i as u16 + 1, b"{}"));
    }
    // DISCONNECT: the node answers what it read before closing.
    forged.extend([0xe0, 0x00]);
    let answer = send_raw(addr, &forged).await;
    assert_eq!(answer.get(..4), Some(&[0x20, 0x02, 0x00, 0x00][..]), "CONNACK accepted: {answer:?}");
    let pubacks = answer[4..].chunks(4).filter(|c| c.first() == Some(&0x40)).count();
    assert_eq!(pubacks, 8, "every forged publish is acknowledged: {answer:?}");
    // (The last one is a valid topic whose characters the subject escapes.)

    // U+0000 or invalid UTF-8 in a topic and a malformed remaining length
    // end the connection as protocol errors.
    let mut nul = connect_packet("nul");
    nul.extend(publish_packet(b"devices/nul/a\0b", 1, b"{}"));
    send_raw(addr, &nul).await;
    let mut bad_utf8 = connect_packet("utf8");
    bad_utf8.extend(publish_packet(b"devices/utf8/\xff\xfe", 1, b"{}"));
    send_raw(addr, &bad_utf8).await;
    let mut bad_len = connect_packet("len");
    bad_len.extend([0x32, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    send_raw(addr, &bad_len).await;

    // A few hundred mutated packet streams (seeded, so a failure repeats).
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut cases = Vec::new();
    for case in 0..300u32 {
        let id = format!("fz-{case}");
        let mut bytes = connect_packet(&id);
        bytes.extend(publish_packet(format!("devices/{id}/t").as_bytes(), 1, b"{\"v\":1}"));
        bytes.extend(packet(0x82, &[0x00, 0x02, 0x00, 0x01, b'#', 0x01]));
        bytes.extend([0xc0, 0x00]);
        match case % 4 {
            0 => {
                for _ in 0..rng.random_range(1..8) {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] = rng.random();
                }
            }
            1 => bytes.truncate(rng.random_range(0..bytes.len())),
            2 => {
                let at = rng.random_range(0..bytes.len());
                let junk: Vec<u8> = (0..rng.random_range(1..64)).map(|_| rng.random()).collect();
                bytes.splice(at..at, junk);
            }
            _ => bytes = (0..rng.random_range(1..256)).map(|_| rng.random()).collect(),
        }
        cases.push(bytes);
    }
    for batch in cases.chunks(20) {
        let sends = batch.iter().map(|b| send_raw(addr, b));
        futures::future::join_all(sends).await;
    }

    publisher.await.expect("publisher");
    good.wait_acked(300).await;
    assert!(good.alive.load(std::sync::atomic::Ordering::SeqCst), "the good device was never disconnected");

    // Every acknowledged message of the good device is stored, once.
    let frames = read_telemetry(&client).await;
    let stored: Vec<u64> = frames.iter().filter(|f| f.device == "good").map(payload_seq).collect();
    let acked: BTreeSet<u64> = good.acked().into_iter().collect();
    assert_eq!(stored.iter().copied().collect::<BTreeSet<_>>(), acked);
    assert_eq!(stored.len(), 300, "no duplicates");
    let forged_stored: Vec<&str> = frames
        .iter()
        .filter(|f| ["forger", "nul", "utf8", "len"].contains(&f.device.as_str()))
        .map(|f| f.channel.as_str())
        .collect();
    assert_eq!(forged_stored, ["a b.c*>%"], "only the escaped but valid forged topic is stored");

    let text = metrics(&node).await;
    for reason in
        ["wildcard", "empty_device", "missing_channel", "reserved_channel", "not_device_topic", "reserved_topic"]
    {
        let line = common::series(names::INGEST_REJECTED_TOTAL, &[("source", "mqtt"), ("reason", reason)]);
        assert!(counter(&text, &line) >= 1.0, "no {reason} counter in\n{text}");
    }
    assert!(
        counter(&text, &common::series(names::MQTT_PROTOCOL_ERRORS_TOTAL, &[("reason", "malformed_packet")])) >= 2.0
    );
    assert!(counter(&text, &common::series(names::MQTT_PROTOCOL_ERRORS_TOTAL, &[("reason", "null_in_topic")])) >= 1.0);

    // Corrupt frames injected on the bus, on the good device's shard, are
    // counted and skipped; the shard goes on to the next message.
    let shards = node.provisioned().shards;
    let shard = fluxmesh_schemas::shard_of("good", shards);
    let js = async_nats::jetstream::new(client.clone());
    for junk in [&b""[..], b"not a frame", &[0u8; 64]] {
        let subject = format!("fm.tel.{shard}.good.t");
        js.publish(subject, bytes::Bytes::copy_from_slice(junk)).await.expect("publish").await.expect("stored");
    }
    good.publish("devices/good/t", b"{\"seq\":300}".to_vec()).await;
    good.wait_acked(301).await;
    let stream = node.provisioned().telemetry_stream_of(shard).to_owned();
    let last = js.get_stream(stream).await.expect("stream").info().await.expect("info").state.last_sequence;
    let url = format!("http://{}/api/v1/devices/good", node.http_addr());
    wait_for(Duration::from_secs(30), "the shard past the corrupt frames", || {
        let url = url.clone();
        async move {
            let state = get_json(url).await?;
            (state["state"]["last_stream_seq"].as_u64() == Some(last)).then_some(())
        }
    })
    .await
    .expect("the shard worker processed the message after the corrupt frames");
    let text = metrics(&node).await;
    assert_eq!(counter(&text, &common::series(names::SHARD_BAD_MESSAGES_TOTAL, &[("reason", "corrupt_frame")])), 3.0);
    let health = get_json(format!("http://{}/healthz", node.http_addr())).await.expect("healthz");
    assert_eq!(health["status"], "ok");
    node.shutdown().await;
}
