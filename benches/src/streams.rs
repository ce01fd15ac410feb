//! Reading the telemetry streams back, for the tools that check what was
//! stored (the load generator's `--verify`, the connection storm).

use anyhow::Context as _;
use std::time::{Duration, Instant, SystemTime};

/// Waits (up to 30 s) until every stream has a leader and every replica is
/// current: a server that was cut off and healed catches up for a while,
/// and a read then could be served from a view that misses messages.
/// Reads anyway after 30 s, saying so.
pub async fn wait_until_replicas_current(js: &async_nats::jetstream::Context, streams: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let mut current = true;
        for name in streams {
            let info = match js.get_stream(name).await {
                Ok(mut stream) => stream.info().await.ok().cloned(),
                Err(_) => None,
            };
            let Some(info) = info else {
                current = false;
                break;
            };
            if let Some(cluster) = &info.cluster {
                if cluster.leader.is_none()
                    || cluster.replicas.iter().any(|r| !r.current || r.offline || r.lag.unwrap_or(0) > 0)
                {
                    current = false;
                    break;
                }
            }
        }
        if current {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("verify: the telemetry streams' replicas were not all current after 30 s; reading anyway");
}

/// Waits (up to 30 s) until the telemetry streams have stopped growing for
/// a second. Publishes the devices sent just before the end may still be
/// on their way into the stream (sent, not yet acknowledged); a read that
/// missed them would count fewer stored messages than the shard workers
/// then apply, and report them as applied twice.
pub async fn wait_until_stored_settles(js: &async_nats::jetstream::Context, streams: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut last, mut quiet_since) = (u64::MAX, Instant::now());
    while Instant::now() < deadline {
        let mut total = 0;
        for name in streams {
            let mut stream = js.get_stream(name).await.with_context(|| format!("stream {name}"))?;
            total += stream.info().await.with_context(|| format!("stream {name}"))?.state.last_sequence;
        }
        if total != last {
            (last, quiet_since) = (total, Instant::now());
        } else if quiet_since.elapsed() >= Duration::from_secs(1) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("verify: the telemetry streams were still growing after 30 s; reading them anyway");
    Ok(())
}

/// Hands `each` every valid frame stored in `stream` from a second before
/// `since` up to now (corrupt frames are skipped).
pub async fn for_each_frame_since(
    js: &async_nats::jetstream::Context,
    stream: &str,
    since: SystemTime,
    mut each: impl FnMut(&fluxmesh_schemas::frame::ArchivedFrame),
) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{pull, DeliverPolicy};
    let stream = js.get_stream(stream).await.with_context(|| format!("stream {stream}"))?;
    let start = time::OffsetDateTime::from(since - Duration::from_secs(1));
    let config = pull::Config {
        deliver_policy: DeliverPolicy::ByStartTime { start_time: start },
        inactive_threshold: Duration::from_secs(60),
        ..Default::default()
    };
    let mut scratch = fluxmesh_schemas::frame::AlignedVec::new();
    fluxmesh_mesh::read_pending(&stream, config, Duration::from_secs(10), |msg| {
        if let Ok(frame) = fluxmesh_schemas::frame::access(&msg.payload, &mut scratch) {
            each(frame);
        }
        Ok(())
    })
    .await?;
    Ok(())
}
