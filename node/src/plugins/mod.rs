//! WebAssembly plugins (wasmtime), called by rules with
//! `plugin("name", input)`.
//!
//! Modules live in the `{PREFIX}_PLUGINS` JetStream object store, one
//! object per plugin name, uploaded through `PUT /api/v1/plugins/{name}`
//! (binary or text format; a module that does not compile or lacks the
//! ABI's exports is refused with 400). Every node has one wasmtime engine,
//! watches the object store, and compiles each module once, off the async
//! threads, into a pre-linked template with a bounded pool of warm
//! instances ([`runtime`]). The ABI is in `fluxmesh_schemas::plugin_abi`.

pub mod http;
pub mod runtime;

use crate::internal_events::emit;
use crate::internal_events::processing::PluginNotLoaded;
use crate::lifecycle::Lifecycle;
use async_nats::jetstream::{self, object_store};
use fluxmesh_mesh::watch::{ObjectMetas, Rewatch, WatchError, Watched};
use futures::StreamExt as _;
use runtime::{CallError, Compiled, Limits};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;

/// One entry of the plugin store's watch: an object's metadata, or why it
/// could not be read.
type ObjectMeta = Result<object_store::ObjectInfo, serde_json::Error>;

/// The `[plugins]` config section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Warm instances kept per plugin; calls beyond them instantiate anew.
    pub pool_size: usize,
    /// Fuel per call (about one unit per WebAssembly instruction); a call
    /// that runs out fails with `timeout`.
    pub fuel_per_call: u64,
    /// Linear memory one instance may have, in bytes.
    pub max_memory_bytes: usize,
    /// Largest output a call may return, in bytes.
    pub max_output_bytes: usize,
    /// Largest module accepted at upload, in bytes.
    pub max_module_bytes: usize,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            pool_size: 4,
            fuel_per_call: 10_000_000,
            max_memory_bytes: 16 * 1024 * 1024,
            max_output_bytes: 1024 * 1024,
            max_module_bytes: 16 * 1024 * 1024,
        }
    }
}

impl PluginsConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.fuel_per_call == 0 {
            problems.push("plugins.fuel_per_call: must be at least 1".to_owned());
        }
        if self.max_memory_bytes < 65_536 {
            problems.push("plugins.max_memory_bytes: must be at least 65536 (one WebAssembly page)".to_owned());
        }
        problems
    }

    fn limits(&self) -> Limits {
        Limits {
            fuel: self.fuel_per_call,
            max_memory_bytes: self.max_memory_bytes,
            max_output_bytes: self.max_output_bytes,
            pool_size: self.pool_size,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PluginsError {
    #[error("invalid plugin name `{name}`: use 1-64 letters, digits, `-` or `_`")]
    BadName { name: String },
    #[error("module is {size} bytes; at most {max} are accepted")]
    TooLarge { size: usize, max: usize },
    #[error("module refused")]
    Invalid(#[source] runtime::ModuleError),
    #[error("cannot set up the WebAssembly engine")]
    Engine(#[source] runtime::WasmError),
    #[error("plugin store: cannot {op}")]
    Store {
        op: &'static str,
        #[source]
        source: async_nats::Error,
    },
    #[error("the compiler task failed")]
    CompileTask(#[source] tokio::task::JoinError),
    #[error("plugin store")]
    Open(#[source] fluxmesh_mesh::stores::StoreError),
    #[error("plugin store: cannot watch it")]
    Watch(#[source] WatchError),
}

impl PluginsError {
    pub fn is_transient(&self) -> bool {
        matches!(self, PluginsError::Store { .. } | PluginsError::Open(_) | PluginsError::Watch(_))
    }
}

/// Maps an object store error to [`PluginsError::Store`], keeping it.
fn store_err<E: std::error::Error + Send + Sync + 'static>(op: &'static str) -> impl FnOnce(E) -> PluginsError {
    move |e| PluginsError::Store { op, source: Box::new(e) }
}

/// What `GET /api/v1/plugins` lists.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PluginInfo {
    pub name: String,
    pub size: usize,
    pub digest: Option<String>,
    /// Compiled and callable on this node.
    pub loaded: bool,
}

/// This node's plugins.
pub struct Plugins {
    engine: wasmtime::Engine,
    cfg: PluginsConfig,
    store: object_store::ObjectStore,
    loaded: RwLock<HashMap<String, Loaded>>,
}

/// A compiled plugin and the digest of the stored module it was compiled
/// from.
struct Loaded {
    digest: Option<String>,
    plugin: Arc<Compiled>,
}

impl std::fmt::Debug for Plugins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugins").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

/// 1-64 letters, digits, `-` or `_` (as rule ids).
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Calls WebAssembly plugins for scripts (`plugin(name, input)`).
pub trait PluginCaller: Send + Sync {
    /// Runs plugin `name` on `input` (JSON) and returns its JSON output.
    fn call(&self, name: &str, input: &[u8]) -> Result<Vec<u8>, PluginCallError>;
}

/// Why a script's plugin call failed (the script sees it as a runtime
/// error, with its causes).
#[derive(Debug, thiserror::Error)]
pub enum PluginCallError {
    #[error("no plugin named `{0}` is loaded")]
    NotLoaded(String),
    #[error("plugin `{name}` failed")]
    Failed {
        name: String,
        #[source]
        source: runtime::CallError,
    },
}

impl std::fmt::Debug for dyn PluginCaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PluginCaller")
    }
}

impl Plugins {
    /// Opens the object store and keeps this node's compiled plugins in
    /// step with it until `life`'s stop signal.
    pub async fn start(
        js: &jetstream::Context,
        subjects: &fluxmesh_schemas::Subjects,
        replicas: usize,
        cfg: &PluginsConfig,
        life: &Lifecycle,
    ) -> Result<Arc<Plugins>, PluginsError> {
        let store = fluxmesh_mesh::stores::open_plugins(js, subjects, replicas).await.map_err(PluginsError::Open)?;
        let bucket = fluxmesh_mesh::stores::Bucket::Plugins.name(subjects.prefix());
        let source = ObjectMetas::open(js, &bucket)
            .await
            .map_err(|source| PluginsError::Watch(WatchError { bucket: bucket.clone(), source }))?;
        let changes = Rewatch::open(source, "plugins", 0).await.map_err(PluginsError::Watch)?.spawn(life);
        let engine = runtime::engine().map_err(PluginsError::Engine)?;
        let plugins = Arc::new(Plugins { engine, cfg: cfg.clone(), store, loaded: RwLock::new(HashMap::new()) });
        life.spawn(plugins.clone().follow(changes, life.clone()));
        Ok(plugins)
    }

    /// Loads every stored plugin, then every change. A re-created watch
    /// replays every stored module; those compiled already are skipped.
    async fn follow(self: Arc<Self>, mut changes: mpsc::Receiver<Watched<ObjectMeta>>, life: Lifecycle) {
        loop {
            let info = tokio::select! {
                _ = life.stopped() => return,
                next = changes.recv() => match next {
                    Some(Watched::Item(Ok(info))) => info,
                    Some(Watched::Item(Err(e))) => {
                        emit(PluginNotLoaded { plugin: None, error: &e });
                        continue;
                    }
                    Some(Watched::Restarted) => continue,
                    None => return,
                },
            };
            if info.deleted {
                self.write().remove(&info.name);
                tracing::info!(plugin = %info.name, "plugin removed");
            } else if self.is_current(&info) {
                // Compiled already.
            } else if let Err(e) = self.load(&info.name).await {
                emit(PluginNotLoaded { plugin: Some(&info.name), error: &e });
            }
            metrics::gauge!(crate::internal_events::names::PLUGINS_LOADED).set(self.read().len() as f64);
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Loaded>> {
        self.loaded.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Loaded>> {
        self.loaded.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the module `info` describes is the one compiled here.
    fn is_current(&self, info: &object_store::ObjectInfo) -> bool {
        info.digest.is_some() && self.read().get(&info.name).is_some_and(|l| l.digest == info.digest)
    }

    async fn load(&self, name: &str) -> Result<(), PluginsError> {
        let mut object = self.store.get(name).await.map_err(store_err("read a plugin"))?;
        let digest = object.info().digest.clone();
        let mut bytes = Vec::with_capacity(object.info().size);
        object.read_to_end(&mut bytes).await.map_err(store_err("read a plugin"))?;
        let compiled = self.compile(name, bytes).await?;
        tracing::info!(plugin = %name, size = compiled.size, "plugin loaded");
        self.write().insert(name.to_owned(), Loaded { digest, plugin: Arc::new(compiled) });
        Ok(())
    }

    async fn compile(&self, name: &str, bytes: Vec<u8>) -> Result<Compiled, PluginsError> {
        let (engine, limits, name) = (self.engine.clone(), self.cfg.limits(), name.to_owned());
        tokio::task::spawn_blocking(move || Compiled::new(&engine, &name, &bytes, limits))
            .await
            .map_err(PluginsError::CompileTask)?
            .map_err(PluginsError::Invalid)
    }

    /// Checks `bytes` (binary or text) compile and have the ABI, then stores
    /// them in binary form. Every node (this one too) loads it through the
    /// watch.
    pub async fn put(&self, name: &str, bytes: &[u8]) -> Result<PluginInfo, PluginsError> {
        if !valid_name(name) {
            return Err(PluginsError::BadName { name: name.to_owned() });
        }
        if bytes.len() > self.cfg.max_module_bytes {
            return Err(PluginsError::TooLarge { size: bytes.len(), max: self.cfg.max_module_bytes });
        }
        let binary = Compiled::to_binary(bytes).map_err(PluginsError::Invalid)?;
        self.compile(name, binary.clone()).await?;
        let info = self.store.put(name, &mut binary.as_slice()).await.map_err(store_err("store a plugin"))?;
        Ok(PluginInfo { name: info.name, size: info.size, digest: info.digest, loaded: false })
    }

    /// Every stored plugin, and whether this node has it compiled.
    pub async fn list(&self) -> Result<Vec<PluginInfo>, PluginsError> {
        let mut list = self.store.list().await.map_err(store_err("list the plugins"))?;
        let mut out = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.map_err(store_err("list the plugins"))?;
            let loaded = self.read().contains_key(&info.name);
            out.push(PluginInfo { name: info.name, size: info.size, digest: info.digest, loaded });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Deletes plugin `name`; `Ok(false)` if there was none.
    pub async fn delete(&self, name: &str) -> Result<bool, PluginsError> {
        if !valid_name(name) {
            return Err(PluginsError::BadName { name: name.to_owned() });
        }
        match self.store.info(name).await {
            Ok(info) if !info.deleted => {}
            _ => return Ok(false),
        }
        self.store.delete(name).await.map_err(store_err("delete a plugin"))?;
        Ok(true)
    }
}

impl PluginCaller for Plugins {
    fn call(&self, name: &str, input: &[u8]) -> Result<Vec<u8>, PluginCallError> {
        let plugin = self
            .read()
            .get(name)
            .map(|l| l.plugin.clone())
            .ok_or_else(|| PluginCallError::NotLoaded(name.to_owned()))?;
        let started = std::time::Instant::now();
        let result = plugin.call(input);
        metrics::histogram!(crate::internal_events::names::PLUGIN_CALL_SECONDS).record(started.elapsed().as_secs_f64());
        result.map_err(|e: CallError| {
            metrics::counter!(crate::internal_events::names::PLUGIN_ERRORS_TOTAL, "plugin" => name.to_owned(), "reason" => e.reason())
                .increment(1);
            PluginCallError::Failed { name: name.to_owned(), source: e }
        })
    }
}
