//! The ownership coordinator against a real nats-server, with a worker
//! that records every message it is handed and checkpoints every tenth
//! message and when it is stopped:
//! every shard runs on exactly one node; a graceful leave hands its shards
//! over with nothing processed twice; a lease taken over by compare-and-set
//! stops the old holder's worker while its other shards keep running.

use fluxmesh_mesh::checkpoint::CheckpointError;
use fluxmesh_mesh::cluster::{open_buckets, ClusterConfig, ClusterHandle, Member};
use fluxmesh_mesh::ownership::{coordinate, OwnedShard, Settings, ShardWorker, WorkerFailure};
use fluxmesh_mesh::shard_reader::ReaderError;
use fluxmesh_mesh::Lifecycle;
use fluxmesh_mesh::{placement, provision, Mesh, NatsConfig, Publisher};
use fluxmesh_schemas::DeviceTopic;
use fluxmesh_testkit::{wait_for, CpuHog, NatsServer};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const SHARDS: u32 = 8;

/// A message: its stream and sequence there.
type Msg = (String, u64);

#[derive(Debug, thiserror::Error)]
enum RecorderError {
    #[error("reader")]
    Reader(#[from] ReaderError),
    #[error("checkpoint")]
    Checkpoint(#[from] CheckpointError),
    #[error("message without metadata")]
    Metadata,
}

impl WorkerFailure for RecorderError {
    fn is_fenced(&self) -> bool {
        matches!(self, RecorderError::Checkpoint(CheckpointError::Fenced { .. }))
    }
    fn reason(&self) -> &'static str {
        "test"
    }
}

/// Stream sequences handed to each node's workers, and the shards whose
/// worker is running now.
#[derive(Debug, Default)]
struct Record {
    /// (node, stream, sequence): sequences are per stream.
    seen: Vec<(String, Msg)>,
    running: BTreeMap<u32, String>,
    /// Shards found running on two nodes at once.
    doubly_run: Vec<(u32, String, String)>,
}

struct Recorder {
    node: String,
    record: Arc<Mutex<Record>>,
}

/// Takes the shard off `running` however the worker ends (aborts too).
struct Running(Arc<Mutex<Record>>, u32);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(mut r) = self.0.lock() {
            r.running.remove(&self.1);
        }
    }
}

impl ShardWorker for Recorder {
    type Error = RecorderError;

    async fn run(self: Arc<Self>, mut shard: OwnedShard, stop: CancellationToken) -> Result<(), RecorderError> {
        let id = shard.shard();
        {
            let mut r = self.record.lock().expect("record");
            if let Some(other) = r.running.insert(id, self.node.clone()) {
                r.doubly_run.push((id, other, self.node.clone()));
            }
        }
        let _running = Running(self.record.clone(), id);
        // Checkpointed only now and then, and when stopped: a stop that
        // did not let the worker checkpoint would show as replays.
        let mut applied = None;
        let mut unsaved = 0;
        loop {
            let m = tokio::select! {
                _ = stop.cancelled() => {
                    if let Some(seq) = applied.filter(|_| unsaved > 0) {
                        shard.checkpoint(seq, [("last", &seq)]).await?;
                    }
                    return Ok(());
                }
                m = shard.next() => m?,
            };
            let info = m.info().map_err(|_| RecorderError::Metadata)?;
            let (stream, seq) = (info.stream.to_owned(), info.stream_sequence);
            if !shard.holds() {
                return Err(CheckpointError::Fenced { shard: id }.into());
            }
            self.record.lock().expect("record").seen.push((self.node.clone(), (stream, seq)));
            applied = Some(seq);
            unsaved += 1;
            if unsaved >= 10 {
                shard.checkpoint(seq, [("last", &seq)]).await?;
                unsaved = 0;
            }
        }
    }
}

struct Node {
    /// Stops the coordinator (graceful: hand over, release, leave; it then
    /// stops the heartbeats).
    stop: CancellationToken,
    life: Lifecycle,
}

fn cluster_config() -> ClusterConfig {
    // Generous: a missed fencing deadline under the CPU hog would abort
    // workers and replay legitimately, which the test counts as a failure.
    ClusterConfig { heartbeat_ms: 250, missed_heartbeats: 8, ..Default::default() }
}

/// The mesh on `server`, its streams provisioned (SHARDS shards, 2
/// partitions).
async fn provisioned(server: &NatsServer) -> anyhow::Result<Mesh> {
    let client = server.client().await?;
    let cfg = NatsConfig { urls: vec![server.url()], shards: SHARDS, partitions: 2, ..NatsConfig::default() };
    let publisher = Publisher::new(client.clone(), &cfg);
    let layout = provision(&client, publisher.context(), &cfg).await?;
    Ok(Mesh::new(client, publisher, layout))
}

async fn join(mesh: &Mesh, node: &str) -> anyhow::Result<(ClusterHandle, Lifecycle)> {
    let cfg = cluster_config();
    let (members, leases) = open_buckets(mesh.js(), "fm", 1, &cfg).await?;
    let me = Member {
        node_id: node.to_owned(),
        incarnation: format!("{node}-1"),
        http: String::new(),
        mqtt: String::new(),
        version: "test".to_owned(),
        started_us: 0,
        lag: Default::default(),
    };
    let life = Lifecycle::new();
    let handle = ClusterHandle::join(members, leases, me, cfg, &life).await?;
    Ok((handle, life))
}

async fn start(mesh: &Mesh, node: &str, record: &Arc<Mutex<Record>>) -> anyhow::Result<Node> {
    let (handle, life) = join(mesh, node).await?;
    let stop = CancellationToken::new();
    let worker = Arc::new(Recorder { node: node.to_owned(), record: record.clone() });
    let settings =
        Settings { batch: 64, restart_backoff: Duration::from_millis(100), stop_deadline: Duration::from_secs(10) };
    life.spawn(coordinate(mesh.clone(), handle, worker, settings, stop.clone(), life.token().clone()));
    Ok(Node { stop, life })
}

impl Node {
    async fn stop(self) {
        self.stop.cancel();
        self.life.close_and_wait(Duration::from_secs(60)).await;
    }
}

/// Publishes `count` messages over 40 devices; their sequences by shard.
async fn publish(mesh: &Mesh, from: usize, count: usize) -> anyhow::Result<BTreeMap<Msg, u32>> {
    let mut seqs = BTreeMap::new();
    for i in from..from + count {
        let device = format!("dev-{}", i % 40);
        let shard = fluxmesh_schemas::shard_of(&device, SHARDS);
        let subject = mesh.subjects().telemetry(shard, &DeviceTopic { device: &device, channel: "t" });
        let ack = mesh.js().publish(subject, format!("{i}").into()).await?.await?;
        seqs.insert((ack.stream, ack.sequence), shard);
    }
    Ok(seqs)
}

fn running_on(record: &Mutex<Record>) -> BTreeMap<u32, String> {
    record.lock().expect("record").running.clone()
}

/// Waits until every sequence in `want` was handed to some worker.
async fn all_seen(record: &Arc<Mutex<Record>>, want: &BTreeSet<Msg>) -> anyhow::Result<()> {
    wait_for(Duration::from_secs(30), "every published message handed to a worker", || {
        let seen: BTreeSet<Msg> = record.lock().expect("record").seen.iter().map(|(_, m)| m.clone()).collect();
        let done = want.is_subset(&seen);
        async move { done.then_some(()) }
    })
    .await
}

fn seen_twice(record: &Mutex<Record>) -> Vec<Msg> {
    let r = record.lock().expect("record");
    let mut count: BTreeMap<&Msg, usize> = BTreeMap::new();
    for (_, m) in &r.seen {
        *count.entry(m).or_default() += 1;
    }
    count.into_iter().filter(|(_, n)| *n > 1).map(|(m, _)| m.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_run_once_move_on_leave_and_stop_when_their_lease_is_taken() -> anyhow::Result<()> {
    // A slower machine widens every window this test looks at.
    let _hog = CpuHog::start(2, Duration::from_secs(120));
    let server = NatsServer::start().await?;
    let mesh = provisioned(&server).await?;
    let record = Arc::new(Mutex::new(Record::default()));

    let a = start(&mesh, "node-a", &record).await?;
    let b = start(&mesh, "node-b", &record).await?;
    let both = ["node-a".to_owned(), "node-b".to_owned()];
    wait_for(Duration::from_secs(30), "every shard running on its rendezvous owner", || {
        let running = running_on(&record);
        let placed = (0..SHARDS).all(|s| running.get(&s).map(String::as_str) == placement::owner(s, &both));
        async move { placed.then_some(()) }
    })
    .await?;
    let on_a = running_on(&record).values().filter(|n| *n == "node-a").count();
    assert!(on_a > 0 && on_a < SHARDS as usize, "both nodes run shards: {:?}", running_on(&record));

    let mut want: BTreeSet<Msg> = publish(&mesh, 0, 300).await?.into_keys().collect();
    all_seen(&record, &want).await?;
    assert_eq!(seen_twice(&record), Vec::<Msg>::new(), "no message handed out twice");

    // A leaves gracefully: B takes every shard from A's checkpoints.
    a.stop().await;
    wait_for(Duration::from_secs(30), "node-b runs every shard", || {
        let running = running_on(&record);
        let all = (0..SHARDS).all(|s| running.get(&s).is_some_and(|n| n == "node-b"));
        async move { all.then_some(()) }
    })
    .await?;
    want.extend(publish(&mesh, 300, 300).await?.into_keys());
    all_seen(&record, &want).await?;
    assert_eq!(seen_twice(&record), Vec::<Msg>::new(), "a graceful handover replays nothing");

    // A thief takes one of B's shards by compare-and-set (as a node that
    // judged B dead would): B's worker on it stops; its others go on.
    let (thief, thief_life) = join(&mesh, "node-thief").await?;
    let live = ["node-b".to_owned(), "node-thief".to_owned()];
    let shard = (0..SHARDS)
        .find(|s| placement::owner(*s, &live) == Some("node-b"))
        .expect("node-b keeps some shard with the thief live");
    let epoch = wait_for(Duration::from_secs(30), "node-b holds the shard", || {
        let view = thief.view();
        async move { view.leases.get(&shard).filter(|l| l.lease.node_id == "node-b").map(|l| l.epoch) }
    })
    .await?;
    let taken = thief.claim(shard, Some(epoch)).await?;
    wait_for(Duration::from_secs(30), "node-b's worker on the taken shard stops", || {
        let stopped = !running_on(&record).contains_key(&shard);
        async move { stopped.then_some(()) }
    })
    .await?;
    let kept: Vec<u32> = running_on(&record).keys().copied().collect();
    assert!(
        (0..SHARDS).filter(|s| placement::owner(*s, &live) == Some("node-b") && *s != shard).all(|s| kept.contains(&s)),
        "node-b's other shards keep running: {kept:?}"
    );
    // Messages on the taken shard are no longer handed to node-b; those on
    // its other shards still are.
    let after = publish(&mesh, 600, 200).await?;
    let (on_taken, elsewhere): (Vec<_>, Vec<_>) = after.into_iter().partition(|(_, s)| *s == shard);
    assert!(!on_taken.is_empty(), "some probe landed on the taken shard");
    let elsewhere: BTreeSet<Msg> = elsewhere
        .into_iter()
        .filter(|(_, s)| placement::owner(*s, &live) == Some("node-b"))
        .map(|(seq, _)| seq)
        .collect();
    all_seen(&record, &elsewhere).await?;
    let handed: Vec<(String, Msg)> = record
        .lock()
        .expect("record")
        .seen
        .iter()
        .filter(|(_, m)| on_taken.iter().any(|(t, _)| t == m))
        .cloned()
        .collect();
    assert!(handed.is_empty(), "the taken shard's messages went to {handed:?}");

    thief.release(shard, taken.epoch).await?;
    thief_life.stop();
    thief_life.close_and_wait(Duration::from_secs(30)).await;
    b.stop().await;
    let doubly_run = record.lock().expect("record").doubly_run.clone();
    assert!(doubly_run.is_empty(), "shards ran on two nodes at once: {doubly_run:?}");
    Ok(())
}

/// A node that gave every shard up (its heartbeats went unacknowledged, a
/// NATS partition) could not delete their leases then; they still name it
/// and look valid while it is live. Their desired owners must get them: the
/// node releases leases in its name that it does not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_left_in_a_nodes_name_reach_their_desired_owner() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let mesh = provisioned(&server).await?;
    // Every shard's lease in node-a's name (this run of it), as a node
    // that was fenced leaves them.
    let (_, leases) = open_buckets(mesh.js(), "fm", 1, &cluster_config()).await?;
    for shard in 0..SHARDS {
        let lease = fluxmesh_mesh::cluster::Lease {
            node_id: "node-a".to_owned(),
            incarnation: "node-a-1".to_owned(),
            claimed_us: 0,
        };
        leases.put(shard.to_string(), serde_json::to_vec(&lease)?.into()).await?;
    }
    let record = Arc::new(Mutex::new(Record::default()));
    // Both members see each other before either coordinator acts, so
    // node-b finds node-a's leases valid (node-a is live) and must wait
    // for node-a to let go of them.
    let (a, a_life) = join(&mesh, "node-a").await?;
    let (b, b_life) = join(&mesh, "node-b").await?;
    for handle in [&a, &b] {
        wait_for(Duration::from_secs(30), "both members live", || {
            let live = handle.view().live.len();
            async move { (live == 2).then_some(()) }
        })
        .await?;
    }
    let mut nodes = Vec::new();
    for (handle, life, name) in [(a, a_life, "node-a"), (b, b_life, "node-b")] {
        let stop = CancellationToken::new();
        let worker = Arc::new(Recorder { node: name.to_owned(), record: record.clone() });
        let settings =
            Settings { batch: 64, restart_backoff: Duration::from_millis(100), stop_deadline: Duration::from_secs(10) };
        life.spawn(coordinate(mesh.clone(), handle, worker, settings, stop.clone(), life.token().clone()));
        nodes.push(Node { stop, life });
    }
    let both = ["node-a".to_owned(), "node-b".to_owned()];
    assert!((0..SHARDS).any(|s| placement::owner(s, &both) == Some("node-b")), "node-b should own some shard");
    wait_for(Duration::from_secs(30), "every shard running on its rendezvous owner", || {
        let running = running_on(&record);
        let placed = (0..SHARDS).all(|s| running.get(&s).map(String::as_str) == placement::owner(s, &both));
        async move { placed.then_some(()) }
    })
    .await?;
    for node in nodes {
        node.stop().await;
    }
    Ok(())
}
