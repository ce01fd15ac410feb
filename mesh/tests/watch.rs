//! Every kind of watch a node keeps goes on across a NATS server restart,
//! soon after it (well inside the tens of seconds an async-nats watch can
//! stay silent), with what its source promises: current values replayed
//! (`KvHistory`, `ObjectMetas`) or only the changes after the last one
//! delivered (`KvChanges`).

use async_nats::jetstream::{self, kv, object_store};
use fluxmesh_mesh::watch::{KvChanges, KvHistory, ObjectMetas, Rewatch, Watched};
use fluxmesh_mesh::Lifecycle;
use fluxmesh_testkit::NatsServer;
use futures::TryStreamExt as _;
use std::time::Duration;
use tokio::sync::mpsc;

/// How soon after the restart each change must arrive.
const SOON: Duration = Duration::from_secs(8);

/// The next item of `rx` that `pick` accepts within `within`, counting the
/// restarts passed on the way and keeping everything skipped.
async fn next_matching<T, R>(
    rx: &mut mpsc::Receiver<Watched<T>>,
    within: Duration,
    skipped: &mut Vec<String>,
    mut pick: impl FnMut(&T) -> Option<R>,
    describe: impl Fn(&T) -> String,
) -> anyhow::Result<R> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let item = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .map_err(|_| anyhow::anyhow!("nothing matching within {within:?}; skipped {skipped:?}"))?
            .ok_or_else(|| anyhow::anyhow!("the watch ended"))?;
        match item {
            Watched::Restarted => skipped.push("restarted".to_owned()),
            Watched::Item(item) => match pick(&item) {
                Some(found) => return Ok(found),
                None => skipped.push(describe(&item)),
            },
        }
    }
}

fn key(entry: &kv::Entry) -> String {
    entry.key.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_go_on_after_a_server_restart() -> anyhow::Result<()> {
    let mut server = NatsServer::start().await?;
    let js = jetstream::new(server.client().await?);
    let bucket = js.create_key_value(kv::Config { bucket: "w".to_owned(), ..Default::default() }).await?;
    let objects = js.create_object_store(object_store::Config { bucket: "o".to_owned(), ..Default::default() }).await?;
    bucket.put("before", "0".into()).await?;
    objects.put("m1", &mut &b"one"[..]).await?;

    let life = Lifecycle::new();
    let mut history = Rewatch::open(KvHistory(bucket.clone()), "test-history", 0).await?.spawn(&life);
    // From now: `before` is not a change it sees.
    let mut changes = Rewatch::open(KvChanges(bucket.clone()), "test-changes", 0).await?.spawn(&life);
    let mut metas =
        Rewatch::open(ObjectMetas::open(&js, "o").await.map_err(|e| anyhow::anyhow!(e))?, "test-objects", 0)
            .await?
            .spawn(&life);
    let meta_name = |m: &Result<object_store::ObjectInfo, serde_json::Error>| match m {
        Ok(info) => info.name.clone(),
        Err(e) => format!("unreadable: {e}"),
    };

    let (mut h_skipped, mut c_skipped, mut m_skipped) = (Vec::new(), Vec::new(), Vec::new());
    let wait = Duration::from_secs(10);
    next_matching(&mut history, wait, &mut h_skipped, |e| (e.key == "before").then_some(()), key).await?;
    next_matching(&mut metas, wait, &mut m_skipped, |m| (meta_name(m) == "m1").then_some(()), meta_name).await?;
    bucket.put("a", "1".into()).await?;
    next_matching(&mut changes, wait, &mut c_skipped, |e| (e.key == "a").then_some(()), key).await?;
    assert!(c_skipped.is_empty(), "a change watch opened from now saw older entries: {c_skipped:?}");
    next_matching(&mut history, wait, &mut h_skipped, |e| (e.key == "a").then_some(()), key).await?;

    server.restart().await?;
    // The client reconnects by itself; writes go through once it has.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while bucket.put("b", "2".into()).await.is_err() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no KV write within 20 s of the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    objects.put("m2", &mut &b"two"[..]).await?;
    let written = tokio::time::Instant::now();

    next_matching(&mut history, SOON, &mut h_skipped, |e| (e.key == "b").then_some(()), key).await?;
    next_matching(&mut changes, SOON, &mut c_skipped, |e| (e.key == "b").then_some(()), key).await?;
    next_matching(&mut metas, SOON, &mut m_skipped, |m| (meta_name(m) == "m2").then_some(()), meta_name).await?;
    eprintln!(
        "every watch delivered its change {:?} after the write; skipped: history {h_skipped:?}, \
         changes {c_skipped:?}, objects {m_skipped:?}",
        written.elapsed()
    );
    // A change watch resumes after what it delivered: nothing replayed.
    assert!(
        c_skipped.iter().all(|s| s == "restarted"),
        "the change watch replayed entries it had delivered: {c_skipped:?}"
    );

    // The servers forget the watches' consumers (as after losing their
    // state): no error reaches the watches, they just fall silent. Each is
    // re-created and goes on.
    for stream in ["KV_w", "OBJ_o"] {
        let stream = js.get_stream(stream).await?;
        let names: Vec<String> = stream.consumer_names().try_collect().await?;
        anyhow::ensure!(!names.is_empty(), "{} has no consumers to forget", stream.cached_info().config.name);
        for name in names {
            stream.delete_consumer(&name).await?;
        }
    }
    bucket.put("c", "3".into()).await?;
    objects.put("m3", &mut &b"three"[..]).await?;
    let written = tokio::time::Instant::now();
    next_matching(&mut history, SOON, &mut h_skipped, |e| (e.key == "c").then_some(()), key).await?;
    next_matching(&mut changes, SOON, &mut c_skipped, |e| (e.key == "c").then_some(()), key).await?;
    next_matching(&mut metas, SOON, &mut m_skipped, |m| (meta_name(m) == "m3").then_some(()), meta_name).await?;
    eprintln!(
        "after losing their consumers every watch delivered {:?} after the write; skipped: history {h_skipped:?}, \
         changes {c_skipped:?}, objects {m_skipped:?}",
        written.elapsed()
    );
    assert!(
        c_skipped.iter().all(|s| s == "restarted"),
        "the change watch replayed entries it had delivered: {c_skipped:?}"
    );

    life.stop();
    assert_eq!(life.close_and_wait(Duration::from_secs(10)).await, 0, "every watch task stops");
    Ok(())
}
