//! Membership and shard leases against a real nats-server: a lease is
//! taken by compare-and-set only, a dead holder's lease is taken over, the
//! old holder then sees it lost, and a node whose heartbeats stop trusts
//! its leases no longer.

use async_nats::jetstream;
use fluxmesh_mesh::cluster::{open_buckets, ClusterConfig, ClusterError, ClusterHandle, Member};
use fluxmesh_mesh::Lifecycle;
use fluxmesh_testkit::{wait_for, NatsServer};
use std::time::Duration;

struct Joined {
    handle: ClusterHandle,
    life: Lifecycle,
}

impl Joined {
    async fn leave(self) {
        self.life.stop();
        self.life.close_and_wait(Duration::from_secs(30)).await;
    }
}

async fn join(js: &jetstream::Context, node: &str, cfg: &ClusterConfig) -> anyhow::Result<Joined> {
    let (members, leases) = open_buckets(js, "fm", 1, cfg).await?;
    let me = Member {
        node_id: node.to_owned(),
        incarnation: format!("{node}-incarnation"),
        http: String::new(),
        mqtt: String::new(),
        version: "test".to_owned(),
        started_us: 0,
        lag: Default::default(),
    };
    let life = Lifecycle::new();
    let handle = ClusterHandle::join(members, leases, me, cfg.clone(), &life).await?;
    Ok(Joined { handle, life })
}

#[tokio::test]
async fn leases_are_taken_by_cas_and_taken_over_from_a_dead_holder() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let js = jetstream::new(server.client().await?);
    let cfg = ClusterConfig { heartbeat_ms: 50, missed_heartbeats: 4, ..Default::default() };
    let a = join(&js, "node-a", &cfg).await?;
    let b = join(&js, "node-b", &cfg).await?;
    wait_for(Duration::from_secs(10), "both nodes see each other", || {
        let (va, vb) = (a.handle.view(), b.handle.view());
        async move { (va.live.len() == 2 && vb.live.len() == 2).then_some(()) }
    })
    .await?;

    // A claims shard 5; B's create loses, and so does a CAS on a stale epoch.
    let held = a.handle.claim(5, None).await?;
    assert!(a.handle.holds(&held.lease));
    assert!(matches!(b.handle.claim(5, None).await, Err(ClusterError::LeaseConflict { shard: 5 })));
    assert!(matches!(b.handle.claim(5, Some(held.epoch - 1)).await, Err(ClusterError::LeaseConflict { .. })));
    wait_for(Duration::from_secs(10), "B sees A's lease, valid", || {
        let view = b.handle.view();
        let epoch = held.epoch;
        async move { view.leases.get(&5).filter(|l| l.epoch == epoch && view.is_valid(&l.lease)).map(|_| ()) }
    })
    .await?;

    // A stops heartbeating (as if killed): B sees it dead after the
    // liveness timeout, and A itself stops trusting its lease first.
    let a_handle = a.handle.clone();
    a.life.stop();
    wait_for(Duration::from_secs(10), "A's own deadline passes", || {
        let ok = !a_handle.holds(&held.lease);
        async move { ok.then_some(()) }
    })
    .await?;
    wait_for(Duration::from_secs(10), "B counts A dead", || {
        let view = b.handle.view();
        async move { (!view.live.contains_key("node-a")).then_some(()) }
    })
    .await?;
    let view = b.handle.view();
    let lease = view.leases.get(&5).expect("the lease is still there");
    assert!(!view.is_valid(&lease.lease), "a dead holder's lease is not valid");
    let taken = b.handle.claim(5, Some(lease.epoch)).await?;
    assert!(taken.epoch > held.epoch);

    // B releases it; a view at A's epoch that then sees only the delete
    // still knows A's lease was lost.
    b.handle.release(5, taken.epoch).await?;
    wait_for(Duration::from_secs(10), "B's view shows the shard free", || {
        let view = b.handle.view();
        async move { (!view.leases.contains_key(&5)).then_some(view) }
    })
    .await
    .map(|view| assert!(view.lost(5, held.epoch), "A's epoch must count as lost after takeover and release"))?;
    // A release with a stale epoch is refused.
    assert!(matches!(b.handle.release(5, taken.epoch).await, Err(ClusterError::LeaseConflict { .. })));

    a.life.close_and_wait(Duration::from_secs(30)).await;
    b.leave().await;
    Ok(())
}
