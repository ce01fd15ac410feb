//! Micro-benchmarks of the wire contract's hot operations.
//! `cargo bench -p fluxmesh-schemas`

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use fluxmesh_schemas::frame::{access, AlignedVec, Frame};
use fluxmesh_schemas::{shard_of, DeviceTopic, Subjects};
use std::hint::black_box;

fn frame(payload: usize) -> Frame {
    Frame::telemetry("sensor-000042", "env/temp", "node-1", vec![7; payload])
}

fn benches(c: &mut Criterion) {
    let f = frame(200);
    c.bench_function("encode 200B telemetry frame", |b| b.iter(|| black_box(&f).encode()));

    let bytes = f.encode().expect("encodes");
    let mut aligned: AlignedVec = AlignedVec::new();
    aligned.extend_from_slice(&bytes);
    let mut scratch = AlignedVec::new();
    c.bench_function("validated access, aligned buffer", |b| {
        b.iter(|| access(black_box(&aligned), &mut scratch).map(|f| f.received_time_us.to_native()))
    });
    let mut shifted = vec![0u8; 1];
    shifted.extend_from_slice(&bytes);
    c.bench_function("validated access, unaligned buffer (copy + validate)", |b| {
        b.iter(|| access(black_box(&shifted[1..]), &mut scratch).map(|f| f.received_time_us.to_native()))
    });
    c.bench_function("decode to owned Frame", |b| b.iter(|| Frame::decode(black_box(&bytes))));

    let subjects = Subjects::new("fm").expect("prefix");
    c.bench_function("topic parse + shard + subject", |b| {
        b.iter(|| {
            let topic = DeviceTopic::parse(black_box("devices/sensor-000042/env/temp")).expect("valid");
            subjects.telemetry(shard_of(topic.device, 64), &topic)
        })
    });
    c.bench_function("JSON view of 200B frame", |b| {
        b.iter_batched(
            AlignedVec::<16>::new,
            |mut s| fluxmesh_schemas::json::to_vec(access(&aligned, &mut s).expect("valid")),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(frame_benches, benches);
criterion_main!(frame_benches);
