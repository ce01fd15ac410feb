//! A node nobody scrapes does not keep its histogram samples: the recorder
//! holds every sample until an upkeep folds it into buckets, and the node
//! runs one every few seconds by itself.
//!
//! This test binary counts the heap bytes it holds (its own global
//! allocator), records a burst of samples into one of the node's
//! histograms, and waits for those bytes to be given back without any
//! request to `/metrics`, while a trickle of samples goes on as it would
//! on a live node.

mod common;

use common::start_node;
use fluxmesh_node::internal_events::{names, UPKEEP_EVERY};
use fluxmesh_testkit::{wait_for, NatsServer};
use std::alloc::System;
use std::time::Duration;

/// The system allocator, counting the bytes currently allocated.
#[global_allocator]
static ALLOC: cap::Cap<System> = cap::Cap::new(System, usize::MAX);

fn live() -> isize {
    ALLOC.allocated() as isize
}

const MIB: isize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histogram_samples_are_folded_without_a_scrape() {
    let nats = NatsServer::start().await.expect("nats-server");
    let node = start_node(&[nats.url()], |_| {}).await;
    // What the node holds once started; it allocates and frees as it runs,
    // a few hundred KiB either way.
    let baseline = live();

    // Two million samples: 8 bytes each in the recorder until an upkeep.
    let histogram = metrics::histogram!(names::PG_BATCH_SECONDS);
    for i in 0..2_000_000u32 {
        histogram.record(f64::from(i % 1000) / 1e4);
    }
    let held = live() - baseline;
    assert!(held >= 12 * MIB, "the burst should hold its samples until an upkeep; it holds {} KiB", held / 1024);

    // The recorder frees drained blocks once its epoch moves on, which
    // the samples of a live node drive; a trickle of them stands in here.
    let back = wait_for(UPKEEP_EVERY * 4, "the node to fold the samples without a scrape", || async {
        for i in 0..200u32 {
            histogram.record(f64::from(i) / 1e4);
        }
        let now = live() - baseline;
        (now < 4 * MIB).then_some(now)
    })
    .await;
    let back = match back {
        Ok(b) => b,
        Err(e) => panic!("{e}: {} KiB still held", (live() - baseline) / 1024),
    };
    println!("held {} KiB after the burst, {} KiB after the upkeep", held / 1024, back / 1024);

    tokio::time::timeout(Duration::from_secs(30), node.shutdown()).await.expect("shutdown");
}
