//! Provisioning against a real nats-server: telemetry is spread over P
//! streams holding contiguous shard ranges, subjects unchanged; a node with
//! another partition or shard count is refused; a cluster made before
//! partitioning is reported plainly instead of retried forever.

use async_nats::jetstream::{self, stream};
use fluxmesh_mesh::{provision, NatsConfig, ProvisionError};
use fluxmesh_schemas::{partition_of, Subjects};
use fluxmesh_testkit::NatsServer;

fn config(server: &NatsServer, prefix: &str, partitions: u32) -> NatsConfig {
    NatsConfig { urls: vec![server.url()], prefix: prefix.to_owned(), partitions, ..NatsConfig::default() }
}

#[tokio::test]
async fn telemetry_is_partitioned_and_the_cluster_agrees_on_it() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let client = server.client().await?;
    let js = jetstream::new(client.clone());
    let p = provision(&client, &js, &config(&server, "fm", 3)).await?;
    assert_eq!(p.telemetry_streams, ["FM_TEL_0", "FM_TEL_1", "FM_TEL_2"]);
    assert_eq!(fluxmesh_mesh::telemetry_streams(&js, &Subjects::new("fm")?).await?, p.telemetry_streams);

    // Every shard's subject lands in its partition's stream.
    for shard in [0u32, 21, 22, 42, 43, 63] {
        let ack = js.publish(format!("fm.tel.{shard}.dev.t"), "x".into()).await?.await?;
        let expected = format!("FM_TEL_{}", partition_of(shard, 64, 3));
        assert_eq!(ack.stream, expected, "shard {shard}");
        assert_eq!(p.telemetry_stream_of(shard), expected);
    }
    // Any NATS client still reads fm.tel.> as one family: nothing else
    // claims those subjects.
    let named = js.stream_by_subject("fm.tel.17.dev.t").await?;
    assert_eq!(named, "FM_TEL_0");

    // The same layout again is fine; another is refused, not adopted.
    provision(&client, &js, &config(&server, "fm", 3)).await?;
    let other = provision(&client, &js, &config(&server, "fm", 4)).await;
    match other {
        Err(e @ ProvisionError::ClusterMismatch { key: "partitions", .. }) => assert!(!e.is_transient()),
        other => panic!("a node with 4 partitions joined a 3-partition cluster: {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_cluster_made_before_partitioning_is_reported_not_retried() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let client = server.client().await?;
    let js = jetstream::new(client.clone());
    // One stream for the whole telemetry family, as clusters used to have.
    js.create_stream(stream::Config {
        name: "OLD_TEL".into(),
        subjects: vec!["old.tel.>".into()],
        ..Default::default()
    })
    .await?;
    let result = provision(&client, &js, &config(&server, "old", 3)).await;
    match result {
        Err(e @ ProvisionError::Overlap { .. }) => {
            assert!(!e.is_transient(), "an overlap never resolves by waiting");
            assert!(e.to_string().contains("partitioned"), "{e}");
        }
        other => panic!("expected an overlap error, got {other:?}"),
    }
    Ok(())
}
