//! Processing micro-benchmarks: rule evaluation, plugin calls, aggregation
//! updates, and the whole per-message pipeline with and without rules.
//! `cargo bench -p fluxmesh-node --bench processing`
//!
//! The pipeline comparison runs both variants in the same run and prints
//! their ratio at the end.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fluxmesh_node::plugins::runtime::{self, Compiled, Limits};
use fluxmesh_node::processing::aggregate::{Aggregation, AggregationConfig, Windows};
use fluxmesh_node::processing::pipeline::{Outputs, Pipeline};
use fluxmesh_node::processing::state::DeviceState;
use fluxmesh_node::rules::engine::{PluginCallError, INPUTS};
use fluxmesh_node::rules::{compile, parse_seed, PluginCaller, RuleEngine, RuleSet, RulesConfig};
use fluxmesh_schemas::frame::{access, AlignedVec, Frame};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

// As in the `fluxmesh` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const LIMITS: Limits = Limits { fuel: 10_000_000, max_memory_bytes: 16 << 20, max_output_bytes: 1 << 20, pool_size: 4 };

struct OnePlugin(Compiled);

impl PluginCaller for OnePlugin {
    fn call(&self, name: &str, input: &[u8]) -> Result<Vec<u8>, PluginCallError> {
        self.0.call(input).map_err(|source| PluginCallError::Failed { name: name.to_owned(), source })
    }
}

fn echo() -> Compiled {
    let wat = include_bytes!("../../configs/plugins/echo.wat");
    Compiled::new(&runtime::engine().expect("engine"), "echo", wat, LIMITS).expect("echo compiles")
}

/// A 100-byte JSON payload.
fn payload() -> Vec<u8> {
    let p = br#"{"t":21.5,"h":40.25,"p":1013.2,"battery":3.71,"rssi":-67,"fw":"1.4.2","door":false,"n":123456}"#;
    let mut v = p.to_vec();
    v.resize(100, b' ');
    v
}

fn rules(engine: &RuleEngine, with_plugin: bool) -> RuleSet {
    let mut scripts: Vec<(String, String)> = (0..10)
        .map(|i| {
            (format!("r{i}"), format!(r#"if payload.t > {} {{ alert("warning", "t above {}"); }}"#, 50 + i, 50 + i))
        })
        .collect();
    if with_plugin {
        scripts[9].1 = r#"let out = plugin("echo", payload); if out.echo.t > 100.0 { emit(out); }"#.to_owned();
    }
    let rules = scripts
        .iter()
        .map(|(id, s)| Arc::new(compile(engine, &RulesConfig::default(), parse_seed(id, s)).expect("compiles")))
        .collect();
    RuleSet { rules, revision: 1 }
}

/// Messages per second through `Pipeline::process` over `n` messages.
fn pipeline_rate(p: &Pipeline, set: &RuleSet, n: u64) -> f64 {
    let frame = Frame::telemetry("sensor-1", "env", "node-1", payload());
    let bytes = frame.encode().expect("encode");
    let mut scratch = AlignedVec::new();
    let archived = access(&bytes, &mut scratch).expect("access");
    let mut st = DeviceState::new("sensor-1");
    let mut out = Outputs::default();
    let started = Instant::now();
    for seq in 1..=n {
        p.process(set, &mut st, archived, seq, &mut out);
        out.frames.clear();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn benches(c: &mut Criterion) {
    let cfg = RulesConfig::default();
    let engine = Arc::new(RuleEngine::new(&cfg));

    // 1. A threshold rule from its cached AST.
    let ast = engine.compile(r#"if payload.t > 30.0 { alert("warning", "hot"); }"#).expect("compiles");
    let mut scope = rhai::Scope::new();
    for name in INPUTS {
        scope.push(name, ());
    }
    let value: serde_json::Value = serde_json::from_slice(&payload()).expect("JSON");
    scope.set_value("payload", fluxmesh_node::rules::engine::to_dynamic(&value));
    c.bench_function("rule: threshold from cached AST (not firing)", |b| {
        b.iter(|| engine.run(black_box(&ast), &mut scope, None).map(|a| a.len()))
    });
    c.bench_function("rule: payload JSON -> script value (per message, shared by all rules)", |b| {
        b.iter(|| fluxmesh_node::rules::engine::to_dynamic(black_box(&value)))
    });

    // 2. A plugin call on a 100-byte payload from the warm pool.
    let plugin = echo();
    let input = payload();
    c.bench_function("plugin: echo on 100 bytes, warm instance", |b| b.iter(|| plugin.call(black_box(&input))));

    // 3. Aggregation: one field update in an open window.
    let agg = Aggregation::from(&AggregationConfig::default());
    let mut windows = Windows::new();
    let mut group = c.benchmark_group("aggregation");
    group.throughput(Throughput::Elements(4));
    let fields = [("t", 21.5), ("h", 40.25), ("p", 1013.2), ("battery", 3.71)];
    let mut t = 0i64;
    group.bench_function("4 field updates (one message)", |b| {
        b.iter(|| {
            t += 1;
            windows.update(&agg, "env", black_box(&fields), t).added
        })
    });
    group.finish();

    // 4. The whole per-message pipeline, none vs 10 rules + 1 plugin.
    let none = RuleSet::default();
    let loaded = rules(&engine, true);
    let pipeline = Pipeline {
        origin: "node-1".into(),
        state_min_interval_us: 1_000_000,
        aggregation: agg.clone(),
        engine: engine.clone(),
        plugins: Some(Arc::new(OnePlugin(echo())) as Arc<dyn PluginCaller>),
    };
    // Same run, side by side: sustained rates and their ratio.
    let n = 200_000;
    let one = RuleSet { rules: loaded.rules[..1].to_vec(), revision: 1 };
    let ten_no_plugin = rules(&engine, false);
    let variants =
        [("no rules", &none), ("1 rule", &one), ("10 rules", &ten_no_plugin), ("10 rules + 1 plugin", &loaded)];
    for (_, set) in variants {
        pipeline_rate(&pipeline, set, 10_000);
    }
    let rates: Vec<(&str, f64)> =
        variants.iter().map(|(name, set)| (*name, pipeline_rate(&pipeline, set, n))).collect();
    println!();
    for (name, rate) in &rates {
        println!(
            "pipeline, one core, {n} messages: {name:<20} {rate:>10.0} msg/s  ({:.2} of no rules)",
            rate / rates[0].1
        );
    }
}

/// What a CONNECT with a secret costs: one argon2id check at the default
/// cost (the first connect of a device on a node), against the remembered
/// HMAC (every reconnect after that).
fn auth(c: &mut Criterion) {
    use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
    use hmac::Mac;
    let defaults = fluxmesh_node::auth::AuthConfig::default();
    let params = argon2::Params::new(defaults.hash_memory_kib, defaults.hash_iterations, 1, None).expect("params");
    let hasher = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let secret = b"a-device-secret-0123456789";
    let phc = hasher.hash_password(secret, &SaltString::generate(&mut OsRng)).expect("hash").to_string();
    let mut group = c.benchmark_group("auth");
    group.sample_size(10);
    group.bench_function("argon2id verify, default cost (first connect)", |b| {
        b.iter(|| {
            let parsed = PasswordHash::new(&phc).expect("phc");
            argon2::Argon2::default().verify_password(black_box(secret), &parsed).is_ok()
        })
    });
    group.finish();
    let key = [7u8; 32];
    c.bench_function("auth: HMAC-SHA256 of a remembered secret (reconnect)", |b| {
        b.iter(|| {
            let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).expect("key");
            mac.update(b"device-1");
            mac.update(black_box(secret));
            mac.finalize().into_bytes()
        })
    });
}

criterion_group! {
    name = processing;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = benches, auth
}
criterion_main!(processing);
