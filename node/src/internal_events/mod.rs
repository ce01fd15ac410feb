//! The node's own metrics and logs. Metric names are part of fluxmesh's
//! interface: they live in [`names`] (and the mesh layer's in
//! `fluxmesh_mesh::metric_names`), and README.md lists them.
//!
//! What an operator should hear of is an event: a struct in one of the
//! modules here whose [`InternalEvent::emit`] both logs it (at the level it
//! deserves, with its causes) and counts it, so the log line and the metric
//! never drift apart. Call sites build the event and `emit` it.

pub mod ingest;
pub mod mqtt;
pub mod names;
pub mod processing;
pub mod reach;
pub mod storage;

/// Something that happened, told to the logs and the metrics at once.
pub trait InternalEvent: Sized {
    fn emit(self);
}

/// Emits `event`: `emit(mqtt::SessionRevoked { device })`.
pub fn emit(event: impl InternalEvent) {
    event.emit();
}

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use names::Kind;
use std::sync::OnceLock;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its
/// handle. Several nodes in one process (tests) share it. `None` if another
/// recorder was installed first.
pub fn prometheus() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &buckets)
                .map_err(|e| tracing::error!(error = %fluxmesh_mesh::error_chain(&e), "bad histogram buckets"))
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::error!(error = %fluxmesh_mesh::error_chain(&e), "cannot install the metrics recorder; /metrics will be empty");
                    None
                }
            }
        })
        .clone()
}

/// How often [`upkeep`] folds recorded histogram samples into buckets.
pub const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds the samples histograms recorded since the last time into their
/// buckets, every [`UPKEEP_EVERY`], until `life` stops. The recorder keeps
/// every sample until an upkeep runs: without this task a node nobody
/// scrapes grows by eight bytes per sample (megabytes a minute under load).
/// Rendering `/metrics` folds them too.
pub async fn upkeep(handle: PrometheusHandle, life: fluxmesh_mesh::Lifecycle) {
    let mut every = tokio::time::interval(UPKEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = life.stopped() => return,
            _ = every.tick() => handle.run_upkeep(),
        }
    }
}

/// Describes every metric the node and its mesh layer emit.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    for m in fluxmesh_mesh::metric_names::ALL.iter().chain(names::ALL) {
        match m.kind {
            Kind::Counter => describe_counter!(m.name, m.help),
            Kind::Gauge => describe_gauge!(m.name, m.help),
            Kind::Histogram if m.name.ends_with("_seconds") => describe_histogram!(m.name, Unit::Seconds, m.help),
            Kind::Histogram => describe_histogram!(m.name, Unit::Count, m.help),
        }
    }
}

/// Where a message came in; labels its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Mqtt,
    Http,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Mqtt => "mqtt",
            Source::Http => "http",
        }
    }
}

/// Counts and logs a refused device message.
pub fn rejected(source: Source, reason: &'static str, detail: &dyn std::fmt::Display) {
    let source = source.as_str();
    metrics::counter!(names::INGEST_REJECTED_TOTAL, "source" => source, "reason" => reason).increment(1);
    tracing::debug!(source, reason, %detail, "rejected device message");
}

#[cfg(test)]
mod tests {
    use super::names::{Kind, Metric};
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    fn all() -> Vec<&'static Metric> {
        fluxmesh_mesh::metric_names::ALL.iter().chain(super::names::ALL).collect()
    }

    /// The metric names in README.md's tables (rows that start with one).
    fn documented() -> BTreeSet<String> {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).expect("README");
        let mut out = BTreeSet::new();
        for row in readme.lines().filter(|l| l.starts_with("| `fluxmesh_")) {
            let first = row.trim_start_matches('|').split('|').next().unwrap_or_default();
            for part in first.split('`').skip(1).step_by(2) {
                let name: String = part.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                out.insert(name);
            }
        }
        out
    }

    #[test]
    fn every_metric_is_named_once_described_and_well_formed() {
        let mut seen = BTreeSet::new();
        for m in all() {
            assert!(seen.insert(m.name), "{} is registered twice", m.name);
            assert!(m.name.starts_with("fluxmesh_"), "{}", m.name);
            assert!(m.help.len() > 10, "{} has no real description", m.name);
            match m.kind {
                Kind::Counter => assert!(m.name.ends_with("_total"), "counter {} must end in _total", m.name),
                Kind::Histogram => assert!(
                    m.name.ends_with("_seconds") || m.name.ends_with("_rows"),
                    "histogram {} must end in its unit (_seconds, _rows)",
                    m.name
                ),
                Kind::Gauge => assert!(!m.name.ends_with("_total"), "gauge {} must not end in _total", m.name),
            }
        }
    }

    #[test]
    fn the_readme_lists_every_metric_and_no_other() {
        let registered: BTreeSet<String> = all().iter().map(|m| m.name.to_owned()).collect();
        let documented = documented();
        let missing: Vec<_> = registered.difference(&documented).collect();
        let stale: Vec<_> = documented.difference(&registered).collect();
        assert!(missing.is_empty(), "emitted but not in README.md's metrics tables: {missing:?}");
        assert!(stale.is_empty(), "in README.md's metrics tables but never emitted: {stale:?}");
    }

    /// The metric name `text` starts with: lower-case letters, digits and
    /// `_` (the caller has found `fluxmesh_` there).
    fn name_at(text: &str) -> &str {
        let len =
            text.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(text.len());
        &text[..len]
    }

    /// The string literals on `line` that look like a metric name:
    /// `"fluxmesh_` then lower-case letters, digits and `_`, then `"`.
    fn name_literals(line: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (i, _) in line.match_indices("\"fluxmesh_") {
            let rest = &line[i + 1..];
            let name = name_at(rest);
            if name.len() > "fluxmesh_".len() && rest[name.len()..].starts_with('"') {
                out.push(name.to_owned());
            }
        }
        out
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("source dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// Every metric is emitted through a registered name: a literal
    /// `"fluxmesh_…"` anywhere else in the node or mesh sources would be a
    /// metric nobody described or documented.
    #[test]
    fn metrics_are_emitted_only_through_registered_names() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        rust_files(&root.join("src"), &mut files);
        rust_files(&root.join("../mesh/src"), &mut files);
        let registries = ["internal_events/names.rs", "metric_names.rs"];
        // Not a metric: the table Postgres migrations are recorded in.
        let allowed = ["fluxmesh_schema_history"];
        let mut literals = Vec::new();
        for file in files {
            let path = file.to_string_lossy().replace('\\', "/");
            if registries.iter().any(|r| path.ends_with(r)) {
                continue;
            }
            let text = std::fs::read_to_string(&file).expect("source file");
            for (n, line) in text.lines().enumerate() {
                for name in name_literals(line) {
                    if !allowed.contains(&name.as_str()) {
                        literals.push(format!("{path}:{}: {name}", n + 1));
                    }
                }
            }
        }
        assert!(literals.is_empty(), "metric names outside the registries:\n{}", literals.join("\n"));
    }

    /// The metric names a text uses: `fluxmesh_` then lower-case letters,
    /// digits and `_`, wherever they stand (PromQL in JSON or YAML).
    fn names_used(text: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (i, _) in text.match_indices("fluxmesh_") {
            if text[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            out.insert(name_at(&text[i..]).to_owned());
        }
        out
    }

    /// Every metric the Grafana dashboards and the Prometheus alert rules
    /// use (and any manifest under `deploy/kubernetes/`) is one the node
    /// emits, a histogram's `_bucket`, `_sum` and `_count` series included.
    #[test]
    fn deployment_files_use_only_emitted_metrics() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let mut files = Vec::new();
        for (dir, ext) in [("grafana", "json"), ("prometheus", "yml"), ("kubernetes", "yaml")] {
            let Ok(entries) = std::fs::read_dir(root.join(dir)) else { continue };
            for entry in entries.flatten() {
                if entry.path().extension().is_some_and(|e| e == ext) {
                    files.push(entry.path());
                }
            }
        }
        let emitted: BTreeSet<&str> = all().iter().map(|m| m.name).collect();
        let histograms: BTreeSet<&str> = all().iter().filter(|m| m.kind == Kind::Histogram).map(|m| m.name).collect();
        let known = |name: &str| {
            emitted.contains(name)
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s).is_some_and(|base| histograms.contains(base)))
        };
        let mut used = 0;
        let mut unknown = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).expect("deployment file");
            for name in names_used(&text) {
                used += 1;
                if !known(&name) {
                    unknown.push(format!("{}: {name}", file.display()));
                }
            }
        }
        for needed in ["grafana/fluxmesh.json", "prometheus/alerts.yml"] {
            assert!(files.iter().any(|f| f.ends_with(needed)), "deploy/{needed} is missing");
        }
        assert!(used >= 40, "only {used} metric names found in {files:?}: is the scan broken?");
        assert!(unknown.is_empty(), "metrics the node does not emit:\n{}", unknown.join("\n"));
    }
}
