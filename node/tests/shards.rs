//! Shard ownership against a real 3-server JetStream cluster, with nodes
//! that join, leave gracefully, are killed (their runtime dropped: no
//! drain, no lease release, no goodbye) and are paused (their only runtime
//! thread blocked, as SIGSTOP would), all while devices send telemetry.
//!
//! Checked (ARCHITECTURE.md, guarantees 2, 4 and 5):
//! - invariant 1: every message a node acknowledged (HTTP 202) is in the telemetry streams;
//! - invariant 2: every stored message is applied to its device's state
//!   exactly once, and every derived state frame exists exactly once, with
//!   per-device `seq` 1, 2, 3, … and no gap;
//! - invariant 4: one valid lease per shard, held by its desired owner;
//! - invariant 5: after a kill, every shard is owned again within a bound.
//!
//! Two busy loops run beside the whole scenario: fencing must hold on a
//! machine whose cores are taken, where every race window is wider.

mod common;

use common::{get_json, wait_settled, NodeProc};

use fluxmesh_node::Config;
use fluxmesh_schemas::{Body, Frame};
use fluxmesh_testkit::{wait_for, CpuHog, NatsCluster};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Devices posting numbered telemetry over HTTP to whichever node is up,
/// with an Idempotency-Key so that a retry on another node is stored once.
struct Load {
    acked: Arc<Mutex<BTreeMap<String, Vec<u64>>>>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(devices: usize, per_device: u64, targets: Arc<Mutex<Vec<SocketAddr>>>) -> Load {
        let acked: Arc<Mutex<BTreeMap<String, Vec<u64>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let http = common::http_builder().timeout(Duration::from_secs(15)).build().expect("client");
        let tasks = (0..devices)
            .map(|d| {
                let (acked, stop, sent, targets, http) =
                    (acked.clone(), stop.clone(), sent.clone(), targets.clone(), http.clone());
                tokio::spawn(async move {
                    let device = format!("shard-dev-{d}");
                    let mut attempt = d;
                    for seq in 0..per_device {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        // Retry until some node stores it (bounded).
                        let deadline = Instant::now() + Duration::from_secs(60);
                        loop {
                            let target = {
                                let t = targets.lock().expect("targets");
                                t[attempt % t.len()]
                            };
                            let r = http
                                .post(format!("http://{target}/api/v1/devices/{device}/telemetry?channel=temp"))
                                .header("content-type", "application/json")
                                .header("idempotency-key", format!("{device}-{seq}"))
                                .body(format!("{{\"seq\":{seq}}}"))
                                .send()
                                .await;
                            if r.is_ok_and(|r| r.status().as_u16() == 202) {
                                acked.lock().expect("acked").entry(device.clone()).or_default().push(seq);
                                sent.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            attempt += 1;
                            assert!(Instant::now() < deadline, "{device} seq {seq} not stored within 60 s");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        tokio::time::sleep(Duration::from_millis(4)).await;
                    }
                })
            })
            .collect();
        Load { acked, stop, sent, tasks }
    }

    async fn finish(self) -> BTreeMap<String, Vec<u64>> {
        for t in self.tasks {
            t.await.expect("device task");
        }
        let _ = self.stop;
        Arc::try_unwrap(self.acked).expect("tasks done").into_inner().expect("acked")
    }
}

#[test]
fn ownership_survives_join_leave_kill_and_pause() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(scenario());
}

async fn scenario() {
    common::init_logging();
    let _hog = CpuHog::start(2, Duration::from_secs(600));
    let cluster = NatsCluster::start(3).await.expect("3-server cluster");
    let urls = cluster.urls();
    // A state frame for every change: the most frames to get right. No
    // aggregation: its windows (by receive time here) would close on a
    // wall-clock minute boundary and add frames this test does not count.
    let every = |c: &mut Config| {
        c.shards.state_min_interval_ms = 0;
        c.aggregation.windows_ms = Vec::new();
    };
    let a = NodeProc::start(&urls, every).await;
    let b = NodeProc::start(&urls, every).await;
    let c = NodeProc::start(&urls, every).await;
    let took = wait_settled(&[a.http, b.http, c.http], 3, "3 nodes own all 64 shards").await;
    eprintln!("3 nodes settled in {took:?}");

    let targets = Arc::new(Mutex::new(vec![a.http, b.http, c.http]));
    let load = Load::start(12, 400, targets.clone());
    let progress = |n: u64| {
        let sent = load.sent.clone();
        async move {
            wait_for(Duration::from_secs(60), "load progresses", || {
                let sent = sent.clone();
                async move { (sent.load(Ordering::Relaxed) >= n).then_some(()) }
            })
            .await
            .expect("load progresses")
        }
    };

    // Join: a fourth node takes its share, handed over gracefully.
    progress(600).await;
    let d = NodeProc::start(&urls, every).await;
    targets.lock().expect("targets").push(d.http);
    let handoff = wait_settled(&[a.http, b.http, c.http, d.http], 4, "join settles").await;
    eprintln!("join: settled {handoff:?} after the new node was ready");

    // Graceful leave.
    progress(1500).await;
    targets.lock().expect("targets").retain(|t| *t != b.http);
    let left_at = Instant::now();
    b.shutdown().await;
    wait_settled(&[a.http, c.http, d.http], 3, "leave settles").await;
    eprintln!("leave: settled {:?} after SIGTERM", left_at.elapsed());

    // Kill: no release, no goodbye; the others wait out the heartbeats.
    progress(2400).await;
    targets.lock().expect("targets").retain(|t| *t != c.http);
    let killed_at = Instant::now();
    c.kill();
    wait_settled(&[a.http, d.http], 2, "kill settles").await;
    let failover = killed_at.elapsed();
    eprintln!("kill: every shard owned again {failover:?} after the kill");
    assert!(failover < Duration::from_secs(5), "failover took {failover:?}");

    // Pause: d is frozen past its liveness timeout, then wakes up. Its
    // shards go to a; when d wakes it must find its leases gone.
    progress(3300).await;
    d.pause(Duration::from_secs(3));
    wait_settled(&[a.http], 1, "pause: the other node takes everything").await;
    wait_settled(&[a.http, d.http], 2, "paused node is back and gets its share again").await;

    let acked = load.finish().await;
    let total_acked: usize = acked.values().map(Vec::len).sum();
    assert_eq!(total_acked, 12 * 400);

    // Invariant 1: everything acknowledged is stored, once.
    let client = cluster.servers[0].client().await.expect("client");
    let tel = common::read_telemetry(&client).await;
    let mut stored: HashMap<String, Vec<u64>> = HashMap::new();
    for f in &tel {
        stored.entry(f.device.clone()).or_default().push(common::payload_seq(f));
    }
    for (device, seqs) in &acked {
        let have: HashSet<u64> = stored.get(device).map(|s| s.iter().copied().collect()).unwrap_or_default();
        let missing: Vec<&u64> = seqs.iter().filter(|s| !have.contains(s)).collect();
        assert!(missing.is_empty(), "{device}: acknowledged but not stored: {missing:?}");
        assert_eq!(stored[device].len(), have.len(), "{device}: stored twice");
    }

    // Invariant 2: each stored message applied exactly once.
    let states: BTreeMap<String, Value> = wait_for(Duration::from_secs(30), "every stored message is applied", || {
        let (acked, a) = (&acked, a.http);
        async move {
            let mut states = BTreeMap::new();
            for (device, seqs) in acked {
                let v = get_json(format!("http://{a}/api/v1/devices/{device}")).await?;
                let count = v["state"]["count"].as_u64()?;
                assert!(count <= seqs.len() as u64, "{device}: applied {count} of {} (double counting)", seqs.len());
                if count != seqs.len() as u64 {
                    return None;
                }
                states.insert(device.clone(), v["state"].clone());
            }
            Some(states)
        }
    })
    .await
    .expect("all applied");

    // Derived frames: each exactly once, seq 1..=n per device, no gap.
    let evt = common::read_stream(&client, "FM_EVT").await;
    let mut by_device: HashMap<String, Vec<u64>> = HashMap::new();
    let mut ids = HashSet::new();
    for f in &evt {
        assert!(ids.insert(f.id), "derived frame {} stored twice", f.id);
        assert!(matches!(f.body, Body::State { .. }), "{f:?}");
        by_device.entry(f.device.clone()).or_default().push(f.seq);
    }
    for (device, state) in &states {
        let mut seqs = by_device.remove(device).unwrap_or_default();
        seqs.sort_unstable();
        let n = state["seq"].as_u64().expect("seq");
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "{device}: state frame seqs");
        // Every message carried a new value, so every one derived a frame.
        assert_eq!(n, 400, "{device}: one state frame per changed value");
    }
    check_last_state_frame(&evt, &states);

    a.shutdown().await;
    d.shutdown().await;
}

/// The last state frame of each device carries its final state (all of
/// the checkpoint but the open aggregation windows, which frames leave out).
fn check_last_state_frame(evt: &[Frame], states: &BTreeMap<String, Value>) {
    for (device, state) in states {
        let last = evt.iter().filter(|f| &f.device == device).max_by_key(|f| f.seq).expect("a state frame");
        let Body::State { json } = &last.body else { panic!("not a state frame") };
        let v: Value = serde_json::from_slice(json).expect("state JSON");
        assert!(v.get("windows").is_none(), "{device}: a state frame carries no aggregation windows");
        let mut checkpoint = state.clone();
        checkpoint.as_object_mut().expect("state object").remove("windows");
        assert_eq!(v, checkpoint, "{device}: last state frame vs checkpoint");
    }
}
