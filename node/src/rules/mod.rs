//! Rules: Rhai scripts that run on a device's messages in its shard's
//! worker.
//!
//! A rule has an id, a match (a device glob and a channel glob, `*` by
//! default) and a script. Rules live in the `{PREFIX}_RULES` KV bucket, one
//! key per id, as JSON ([`RuleSpec`]). Every node watches the bucket and
//! keeps a compiled [`RuleSet`]; a change made through any node's HTTP API
//! reaches every node's workers within a watch round trip. At start a node
//! seeds the bucket from `rules.seed_dir` (`*.rhai` files; a rule already
//! in the bucket is left as it is).
//!
//! Matching rules run in id order on each telemetry message, before the
//! device's state and aggregates are updated. What a script sees and can
//! do is in [`engine`] and the README.

pub mod engine;
pub mod http;

pub use engine::{Action, CompileError, PluginCaller, RuleEngine, RunError};

use crate::internal_events::emit;
use crate::internal_events::processing::RuleNotLoaded;
use crate::lifecycle::Lifecycle;
use async_nats::jetstream::{self, kv};
use fluxmesh_mesh::watch::{KvHistory, Rewatch, Watched};
use globset::{Glob, GlobMatcher};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;

/// The `[rules]` config section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// A folder of `*.rhai` files to seed the rules bucket from at start
    /// (relative to the working directory); empty seeds nothing.
    pub seed_dir: String,
    /// Operations one run of a rule may take; past it the run stops with a
    /// `budget` error (a runaway loop costs about a millisecond).
    pub max_operations: u64,
    /// Largest string a script may build, in bytes.
    pub max_string_bytes: usize,
    /// Largest array a script may build.
    pub max_array_len: usize,
    /// Largest map a script may build.
    pub max_map_len: usize,
    /// Actions (emit, alert, set_state, command, drop) one run may record.
    pub max_actions_per_run: usize,
    /// Largest script accepted, in bytes.
    pub max_script_bytes: usize,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            seed_dir: String::new(),
            max_operations: 100_000,
            max_string_bytes: 64 * 1024,
            max_array_len: 10_000,
            max_map_len: 10_000,
            max_actions_per_run: 64,
            max_script_bytes: 64 * 1024,
        }
    }
}

impl RulesConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.max_operations == 0 {
            problems.push("rules.max_operations: must be at least 1".to_owned());
        }
        if self.max_actions_per_run == 0 {
            problems.push("rules.max_actions_per_run: must be at least 1".to_owned());
        }
        problems
    }
}

/// A rule as stored and as the HTTP API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub id: String,
    /// Devices it runs for: a glob over the device id.
    #[serde(default = "any")]
    pub device: String,
    /// Channels it runs for: a glob over the channel (`*` also matches `/`).
    #[serde(default = "any")]
    pub channel: String,
    pub script: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn any() -> String {
    "*".to_owned()
}

fn yes() -> bool {
    true
}

/// Why a rule was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuleError {
    #[error("invalid rule id `{id}`: use 1-64 letters, digits, `-` or `_`")]
    BadId { id: String },
    #[error("invalid {field} glob `{glob}`")]
    BadGlob {
        field: &'static str,
        glob: String,
        #[source]
        source: globset::Error,
    },
    #[error("script is {size} bytes; at most {max} are accepted")]
    TooLarge { size: usize, max: usize },
    #[error("script does not compile: {0}")]
    Compile(CompileError),
}

pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    pub spec: RuleSpec,
    /// `rule:{id}`: the producer of its frames.
    pub producer: String,
    pub ast: rhai::AST,
    device: Matcher,
    channel: Matcher,
}

/// A compiled glob, with the common `*` answered without running it.
#[derive(Debug)]
enum Matcher {
    Any,
    Glob(GlobMatcher),
}

impl Matcher {
    fn new(glob: &str) -> Result<Matcher, globset::Error> {
        if glob == "*" {
            return Ok(Matcher::Any);
        }
        Glob::new(glob).map(|g| Matcher::Glob(g.compile_matcher()))
    }

    fn is_match(&self, s: &str) -> bool {
        match self {
            Matcher::Any => true,
            Matcher::Glob(g) => g.is_match(s),
        }
    }
}

impl Rule {
    pub fn matches(&self, device: &str, channel: &str) -> bool {
        self.device.is_match(device) && self.channel.is_match(channel)
    }
}

/// The enabled rules a node runs, in id order.
#[derive(Debug, Default)]
pub struct RuleSet {
    pub rules: Vec<Arc<Rule>>,
    /// The highest bucket revision this set reflects.
    pub revision: u64,
}

impl RuleSet {
    pub fn matching<'a>(&'a self, device: &'a str, channel: &'a str) -> impl Iterator<Item = &'a Arc<Rule>> + 'a {
        self.rules.iter().filter(move |r| r.matches(device, channel))
    }
}

/// Compiles `spec` with `engine`, checking id, globs and size first.
pub fn compile(engine: &RuleEngine, cfg: &RulesConfig, spec: RuleSpec) -> Result<Rule, RuleError> {
    if !valid_id(&spec.id) {
        return Err(RuleError::BadId { id: spec.id });
    }
    if spec.script.len() > cfg.max_script_bytes {
        return Err(RuleError::TooLarge { size: spec.script.len(), max: cfg.max_script_bytes });
    }
    let glob = |field: &'static str, g: &str| {
        Matcher::new(g).map_err(|source| RuleError::BadGlob { field, glob: g.to_owned(), source })
    };
    let device = glob("device", &spec.device)?;
    let channel = glob("channel", &spec.channel)?;
    let ast = engine.compile(&spec.script).map_err(RuleError::Compile)?;
    Ok(Rule { producer: format!("rule:{}", spec.id), spec, ast, device, channel })
}

/// Errors talking to the rules bucket.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error(transparent)]
    Invalid(#[from] RuleError),
    #[error("rules bucket: cannot {op}")]
    Store {
        op: &'static str,
        #[source]
        source: async_nats::Error,
    },
    #[error("rules bucket: rule `{id}` is unreadable")]
    Corrupt {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("rules bucket")]
    Open(#[source] fluxmesh_mesh::stores::StoreError),
    #[error("rules bucket: cannot watch it")]
    Watch(#[source] fluxmesh_mesh::watch::WatchError),
    /// A seed file is unreadable or does not compile: the node's own config.
    #[error("rules seed: cannot read {path}")]
    SeedRead {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rules seed {path}")]
    SeedRule {
        path: std::path::PathBuf,
        #[source]
        source: RuleError,
    },
}

impl RulesError {
    /// Whether trying again may help (NATS not answering yet).
    pub fn is_transient(&self) -> bool {
        matches!(self, RulesError::Store { .. } | RulesError::Open(_) | RulesError::Watch(_))
    }

    fn store(op: &'static str) -> impl FnOnce(async_nats::Error) -> RulesError {
        move |source| RulesError::Store { op, source }
    }
}

/// The node's rules: the engine, the bucket, and the current compiled set.
#[derive(Debug)]
pub struct Rules {
    pub engine: Arc<RuleEngine>,
    cfg: RulesConfig,
    store: kv::Store,
    current: watch::Receiver<Arc<RuleSet>>,
}

impl Rules {
    /// Opens the bucket, seeds it, loads it, and keeps the compiled set
    /// current through a watch until `life`'s stop signal.
    pub async fn start(
        js: &jetstream::Context,
        subjects: &fluxmesh_schemas::Subjects,
        replicas: usize,
        cfg: &RulesConfig,
        life: &Lifecycle,
    ) -> Result<Arc<Rules>, RulesError> {
        let store = fluxmesh_mesh::stores::open_rules(js, subjects, replicas).await.map_err(RulesError::Open)?;
        let engine = Arc::new(RuleEngine::new(cfg));
        if !cfg.seed_dir.is_empty() {
            seed(&store, &engine, cfg, Path::new(&cfg.seed_dir)).await?;
        }
        let watch = Rewatch::open(KvHistory(store.clone()), "rules", 0).await.map_err(RulesError::Watch)?;
        let mut entries = watch.spawn(life);
        let (tx, rx) = watch::channel(Arc::new(RuleSet::default()));
        let (engine2, cfg2) = (engine.clone(), cfg.clone());
        let task_life = life.clone();
        life.spawn(async move {
            // Per key: the revision last seen and what it compiled to (None:
            // deleted, disabled, unreadable or refused). A rule is compiled
            // when its entry changes, not again when another rule does or
            // when a re-created watch replays it.
            let mut compiled: BTreeMap<String, (u64, Option<Arc<Rule>>)> = BTreeMap::new();
            let mut changed = false;
            loop {
                let entry = tokio::select! {
                    _ = task_life.stopped() => return,
                    e = entries.recv() => match e {
                        Some(Watched::Item(entry)) => entry,
                        // Current values are replayed next; they replace ours.
                        Some(Watched::Restarted) => continue,
                        None => return,
                    },
                };
                if compiled.get(&entry.key).is_none_or(|(revision, _)| *revision != entry.revision) {
                    let rule = rule_of(&engine2, &cfg2, &entry).map(Arc::new);
                    compiled.insert(entry.key.clone(), (entry.revision, rule));
                    changed = true;
                }
                // Publish once the watch has nothing more queued right now.
                if !changed || !entries.is_empty() {
                    continue;
                }
                changed = false;
                let set = RuleSet {
                    rules: compiled.values().filter_map(|(_, rule)| rule.clone()).collect(),
                    revision: compiled.values().map(|(revision, _)| *revision).max().unwrap_or(0),
                };
                tracing::info!(rules = set.rules.len(), revision = set.revision, "rules loaded");
                metrics::gauge!(crate::internal_events::names::RULES_ACTIVE).set(set.rules.len() as f64);
                if tx.send(Arc::new(set)).is_err() {
                    return;
                }
            }
        });
        Ok(Arc::new(Rules { engine, cfg: cfg.clone(), store, current: rx }))
    }

    /// The compiled set as this node runs it now.
    pub fn current(&self) -> Arc<RuleSet> {
        self.current.borrow().clone()
    }

    /// Checks `spec` compiles, then stores it; returns the bucket revision.
    pub async fn put(&self, spec: RuleSpec) -> Result<u64, RulesError> {
        let rule = compile(&self.engine, &self.cfg, spec)?;
        // A spec of strings and numbers always serializes.
        let value = serde_json::to_vec(&rule.spec).unwrap_or_default();
        self.store.put(&rule.spec.id, value.into()).await.map_err(|e| RulesError::store("store a rule")(e.into()))
    }

    /// The stored rule `id`, if any.
    pub async fn get(&self, id: &str) -> Result<Option<RuleSpec>, RulesError> {
        if !valid_id(id) {
            return Err(RuleError::BadId { id: id.to_owned() }.into());
        }
        let value = self.store.get(id).await.map_err(|e| RulesError::store("read a rule")(e.into()))?;
        value
            .map(|v| serde_json::from_slice(&v).map_err(|source| RulesError::Corrupt { id: id.to_owned(), source }))
            .transpose()
    }

    /// Every stored rule, in id order (unreadable ones left out).
    pub async fn list(&self) -> Result<Vec<RuleSpec>, RulesError> {
        use futures::TryStreamExt as _;
        let keys: Vec<String> = match self.store.keys().await {
            Ok(keys) => keys.try_collect().await.map_err(|e| RulesError::store("list the rules")(e.into()))?,
            Err(e) => return Err(RulesError::store("list the rules")(e.into())),
        };
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(spec) = self.get(&key).await.ok().flatten() {
                out.push(spec);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Deletes rule `id`; `Ok(false)` if there was none.
    pub async fn delete(&self, id: &str) -> Result<bool, RulesError> {
        if self.get(id).await?.is_none() {
            return Ok(false);
        }
        self.store.delete(id).await.map_err(|e| RulesError::store("delete a rule")(e.into()))?;
        Ok(true)
    }
}

/// The rule a bucket entry holds, if it should run: `None` for a delete,
/// a disabled rule, or one that is unreadable or does not compile (written
/// around the API), the last two logged and counted.
fn rule_of(engine: &RuleEngine, cfg: &RulesConfig, entry: &kv::Entry) -> Option<Rule> {
    if entry.operation != kv::Operation::Put {
        return None;
    }
    let spec = match serde_json::from_slice::<RuleSpec>(&entry.value) {
        Ok(spec) if spec.id == entry.key => spec,
        Ok(spec) => {
            tracing::warn!(key = %entry.key, id = %spec.id, "rule stored under another key's name; ignored");
            return None;
        }
        Err(e) => {
            emit(RuleNotLoaded { rule: &entry.key, error: &e, message: "unreadable rule in the bucket; ignored" });
            return None;
        }
    };
    if !spec.enabled {
        return None;
    }
    let id = spec.id.clone();
    compile(engine, cfg, spec)
        .map_err(|e| {
            emit(RuleNotLoaded { rule: &id, error: &e, message: "stored rule refused; not running it" });
        })
        .ok()
}

/// Parses a seed file: `// device: GLOB`, `// channel: GLOB` and
/// `// description: TEXT` lines at the top, then the script. The id is the
/// file name without `.rhai`.
pub fn parse_seed(id: &str, text: &str) -> RuleSpec {
    let mut spec = RuleSpec {
        id: id.to_owned(),
        device: any(),
        channel: any(),
        script: text.to_owned(),
        description: String::new(),
        enabled: true,
    };
    for line in text.lines() {
        let Some(comment) = line.trim().strip_prefix("//") else { break };
        let Some((key, value)) = comment.split_once(':') else { continue };
        let value = value.trim().to_owned();
        match key.trim() {
            "device" => spec.device = value,
            "channel" => spec.channel = value,
            "description" => spec.description = value,
            _ => {}
        }
    }
    spec
}

async fn seed(store: &kv::Store, engine: &RuleEngine, cfg: &RulesConfig, dir: &Path) -> Result<(), RulesError> {
    let entries = std::fs::read_dir(dir).map_err(|source| RulesError::SeedRead { path: dir.to_owned(), source })?;
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rhai"))
        .collect();
    files.sort();
    for path in files {
        let Some(id) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else { continue };
        let text =
            std::fs::read_to_string(&path).map_err(|source| RulesError::SeedRead { path: path.clone(), source })?;
        let spec = parse_seed(&id, &text);
        // A seed that does not compile stops the node: it is our own config.
        let rule = compile(engine, cfg, spec).map_err(|source| RulesError::SeedRule { path: path.clone(), source })?;
        // A spec of strings and numbers always serializes.
        let value = serde_json::to_vec(&rule.spec).unwrap_or_default();
        match store.create(&id, value.into()).await {
            Ok(_) => tracing::info!(rule = %id, "rule seeded"),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(RulesError::store("seed a rule")(e.into())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_headers_set_the_match() {
        let spec = parse_seed("hot", "// device: sensor-*\n// channel: temp\n// description: too hot\nif true {}\n");
        assert_eq!(
            (spec.device.as_str(), spec.channel.as_str(), spec.description.as_str()),
            ("sensor-*", "temp", "too hot")
        );
        assert!(spec.enabled);
    }

    #[test]
    fn shipped_seed_rules_compile() {
        let engine = RuleEngine::new(&RulesConfig::default());
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/rules");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("configs/rules exists") {
            let path = entry.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("read");
            let id = path.file_stem().and_then(|s| s.to_str()).expect("name");
            compile(&engine, &RulesConfig::default(), parse_seed(id, &text)).unwrap_or_else(|e| panic!("{id}: {e}"));
            n += 1;
        }
        assert!(n >= 2, "seed rules found: {n}");
    }

    #[test]
    fn globs_match_device_and_channel() {
        let engine = RuleEngine::new(&RulesConfig::default());
        let spec = RuleSpec { device: "sensor-*".into(), channel: "env/*".into(), ..parse_seed("r", "") };
        let rule = compile(&engine, &RulesConfig::default(), spec).expect("compiles");
        assert!(rule.matches("sensor-1", "env/temp"));
        assert!(!rule.matches("pump-1", "env/temp"));
        assert!(!rule.matches("sensor-1", "power"));
    }

    #[test]
    fn bad_ids_globs_and_scripts_are_refused() {
        let engine = RuleEngine::new(&RulesConfig::default());
        let cfg = RulesConfig::default();
        let base = parse_seed("ok", "");
        let e = compile(&engine, &cfg, RuleSpec { id: "a.b".into(), ..base.clone() }).expect_err("bad id");
        assert!(matches!(e, RuleError::BadId { .. }));
        let e = compile(&engine, &cfg, RuleSpec { device: "[".into(), ..base.clone() }).expect_err("bad glob");
        assert!(matches!(e, RuleError::BadGlob { field: "device", .. }));
        let e = compile(&engine, &cfg, RuleSpec { script: "if {".into(), ..base }).expect_err("bad script");
        assert!(matches!(e, RuleError::Compile(CompileError { line: 1, .. })), "{e}");
    }
}
