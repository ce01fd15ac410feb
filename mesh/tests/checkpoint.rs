//! Shard checkpoint logs and shard readers against a real nats-server:
//! a claim fences off the previous owner, snapshots compact the log
//! without losing a state, large records are split, a reader whose
//! consumer vanishes goes on in order without a gap or a repeat, and a
//! reader opened again under the same name starts where it is told.

use async_nats::jetstream::{self, stream};
use fluxmesh_mesh::checkpoint::{CheckpointError, Checkpoints, COMPACT_RECORDS, MAX_RECORD_BYTES};
use fluxmesh_mesh::shard_reader::ShardReader;
use fluxmesh_schemas::Subjects;
use fluxmesh_testkit::NatsServer;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

async fn setup() -> anyhow::Result<(NatsServer, jetstream::Context, Checkpoints)> {
    let server = NatsServer::start().await?;
    let js = jetstream::new(server.client().await?);
    let subjects = Subjects::new("fm")?;
    js.create_stream(Checkpoints::stream_config(&subjects, 1)).await?;
    Ok((server, js.clone(), Checkpoints::new(js, subjects)))
}

fn state(count: u64) -> Value {
    json!({ "count": count })
}

async fn log_length(js: &jetstream::Context, shard: u32) -> anyhow::Result<u64> {
    let stream = js.get_stream("FM_CKPT").await?;
    let info = stream.info_with_subjects(format!("fm.ckpt.{shard}")).await?;
    use futures::TryStreamExt as _;
    let subjects: HashMap<String, usize> = info.try_collect().await?;
    Ok(subjects.get(&format!("fm.ckpt.{shard}")).copied().unwrap_or(0) as u64)
}

#[tokio::test]
async fn a_claim_fences_the_previous_owner() -> anyhow::Result<()> {
    let (_server, js, log) = setup().await?;
    let (loaded, mut a) = log.claim(3, "node-a", 10).await?;
    assert_eq!(loaded.covered, 0);
    assert!(loaded.states.is_empty());
    log.append(&mut a, 5, [("d1", &state(5))]).await?;

    // B takes over: it sees what A checkpointed.
    let (loaded, mut b) = log.claim(3, "node-b", 11).await?;
    assert_eq!(loaded.covered, 5);
    assert_eq!(loaded.states.get("d1"), Some(&state(5)));

    // A, paused through the takeover, wakes and tries to checkpoint.
    let stale = log.append(&mut a, 9, [("d1", &state(9))]).await;
    assert!(matches!(stale, Err(CheckpointError::Fenced { shard: 3 })), "stale append: {stale:?}");

    log.append(&mut b, 7, [("d1", &state(7)), ("d2", &state(1))]).await?;
    let now = log.load(3).await?;
    assert_eq!(now.covered, 7);
    assert_eq!(now.states.get("d1"), Some(&state(7)), "A's fenced state must not be in the log");
    assert_eq!(now.states.get("d2"), Some(&state(1)));
    // Other shards are untouched.
    assert_eq!(log.load(4).await?.covered, 0);
    // Every read deleted its consumer: claims and loads leave nothing on
    // the servers.
    let mut stream = js.get_stream("FM_CKPT").await?;
    assert_eq!(stream.info().await?.state.consumer_count, 0, "reading consumers left behind");
    Ok(())
}

#[tokio::test]
async fn a_snapshot_compacts_the_log_and_keeps_every_state() -> anyhow::Result<()> {
    let (_server, js, log) = setup().await?;
    let (_, mut fence) = log.claim(1, "node-a", 1).await?;
    let mut expected = HashMap::new();
    let mut covered = 0;
    while !fence.wants_snapshot() {
        covered += 1;
        let device = format!("d{}", covered % 50);
        log.append(&mut fence, covered, [(device.as_str(), &state(covered))]).await?;
        expected.insert(device, state(covered));
    }
    assert!(covered >= COMPACT_RECORDS - 1, "snapshot wanted after {covered} records");
    let before = log_length(&js, 1).await?;
    let all: Vec<(&str, &Value)> = expected.iter().map(|(d, s)| (d.as_str(), s)).collect();
    log.snapshot(&mut fence, all).await?;
    let after = log_length(&js, 1).await?;
    assert!(before > COMPACT_RECORDS / 2 && after == 1, "log length {before} -> {after}");
    assert!(!fence.wants_snapshot());

    let loaded = log.load(1).await?;
    assert_eq!(loaded.covered, covered);
    assert_eq!(loaded.states, expected);
    // The compacted log still fences: a new owner's claim lands after it.
    let (_, mut next) = log.claim(1, "node-b", 2).await?;
    assert!(matches!(
        log.append(&mut fence, covered + 1, [("d1", &state(0))]).await,
        Err(CheckpointError::Fenced { .. })
    ));
    log.append(&mut next, covered + 1, [("d1", &state(1))]).await?;
    Ok(())
}

#[tokio::test]
async fn a_large_record_is_split_into_parts() -> anyhow::Result<()> {
    let (_server, js, log) = setup().await?;
    let (_, mut fence) = log.claim(2, "node-a", 1).await?;
    log.append(&mut fence, 10, [("d0", &state(1))]).await?;
    // Enough devices that one record would pass the size limit four times.
    let blob = "x".repeat(1000);
    let states: HashMap<String, Value> =
        (0..MAX_RECORD_BYTES * 4 / 1000).map(|i| (format!("device-{i}"), json!({ "blob": blob, "i": i }))).collect();
    log.append(&mut fence, 20, states.iter().map(|(d, s)| (d.as_str(), s))).await?;
    let parts = log_length(&js, 2).await? - 2;
    assert!((4..=6).contains(&parts), "{parts} parts");
    let loaded = log.load(2).await?;
    assert_eq!(loaded.covered, 20);
    assert_eq!(loaded.states.len(), states.len() + 1);
    for (device, s) in &states {
        assert_eq!(loaded.states.get(device), Some(s), "{device}");
    }
    Ok(())
}

#[tokio::test]
async fn a_reader_goes_on_in_order_when_its_consumer_vanishes() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let js = jetstream::new(server.client().await?);
    js.create_stream(stream::Config { name: "T".into(), subjects: vec!["t.>".into()], ..Default::default() }).await?;
    // Shard 1 gets every other message; the reader starts at sequence 41.
    let mut wanted = Vec::new();
    for i in 1..=400u64 {
        let shard = i % 2;
        js.publish(format!("t.{shard}.d"), i.to_string().into()).await?.await?;
        if shard == 1 && i >= 41 {
            wanted.push(i);
        }
    }
    let mut reader = ShardReader::open(&js, "T", "t.1.>".into(), "r".into(), 41, 16).await?;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.len() < wanted.len() {
        let m = tokio::time::timeout_at(deadline, reader.next()).await??;
        got.push(m.info().map_err(|e| anyhow::anyhow!("{e}"))?.stream_sequence);
        if got.len() == 20 {
            // The server loses the consumer (a restart, an inactivity
            // timeout): the reader must carry on right after message 20.
            let name = reader.consumer_name().ok_or_else(|| anyhow::anyhow!("no consumer"))?;
            js.get_stream("T").await?.delete_consumer(&name).await?;
        }
    }
    assert_eq!(got, wanted);
    assert_eq!(reader.pending(), 0);
    Ok(())
}

#[tokio::test]
async fn a_reader_opened_again_under_its_name_reads_from_its_start() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let js = jetstream::new(server.client().await?);
    js.create_stream(stream::Config { name: "T".into(), subjects: vec!["t.>".into()], ..Default::default() }).await?;
    for i in 1..=30u64 {
        js.publish("t.1.d", i.to_string().into()).await?.await?;
    }
    // A shard worker reads, then fails without deleting its consumer (no
    // JetStream leader to take the delete), and is started again under the
    // same name from the same checkpoint, well within the consumer's
    // inactivity threshold.
    let mut first = ShardReader::open(&js, "T", "t.1.>".into(), "node-shard-1-7".into(), 11, 16).await?;
    for _ in 11..=30 {
        tokio::time::timeout(Duration::from_secs(10), first.next()).await??;
    }
    drop(first);
    let mut again = ShardReader::open(&js, "T", "t.1.>".into(), "node-shard-1-7".into(), 11, 16).await?;
    let m = tokio::time::timeout(Duration::from_secs(5), again.next())
        .await
        .map_err(|_| anyhow::anyhow!("the reader opened again got nothing: it reused the old consumer's cursor"))??;
    assert_eq!(m.info().map_err(|e| anyhow::anyhow!("{e}"))?.stream_sequence, 11);
    Ok(())
}
