//! Compiling and calling one plugin: a module compiled once, pre-linked
//! (`InstancePre`), and a bounded pool of warm instances.
//!
//! A call takes a warm instance from the pool (a hit) or instantiates a
//! new one from the pre-linked template (a miss), runs it with a fresh fuel
//! budget, and gives it back if the call succeeded and the pool has room.
//! An instance whose call failed in any way is dropped: its memory may be
//! in any state. See `fluxmesh_schemas::plugin_abi` for the ABI.

use fluxmesh_schemas::plugin_abi;
use std::sync::{Mutex, MutexGuard};
use wasmtime::{Engine, InstancePre, Linker, Memory, Module, Store, Trap, TypedFunc};

/// Per-call limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub fuel: u64,
    pub max_memory_bytes: usize,
    pub max_output_bytes: usize,
    pub pool_size: usize,
}

/// A wasmtime error (an `anyhow::Error`), kept as the cause.
pub type WasmError = Box<dyn std::error::Error + Send + Sync>;

/// Why a call failed; [`CallError::reason`] is the metrics label.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("ran out of fuel (the call's time budget)")]
    Timeout,
    #[error("memory limit reached")]
    Memory,
    #[error("trapped")]
    Trap(#[source] WasmError),
    #[error("bad output: {0}")]
    BadOutput(#[source] BadOutput),
    #[error("returned error code {0}")]
    GuestError(i64),
    #[error("cannot instantiate")]
    Instantiate(#[source] WasmError),
    #[error("cannot instantiate: no `{0}` export")]
    MissingExport(&'static str),
}

/// What was wrong with a plugin's output (or with its allocation of room
/// for the input).
#[derive(Debug, thiserror::Error)]
pub enum BadOutput {
    #[error("input larger than 2 GiB")]
    InputTooLarge,
    #[error("fm_alloc returned {ptr}, outside memory")]
    BadAlloc { ptr: i32 },
    #[error("{size} bytes of output; at most {max} allowed")]
    TooLarge { size: usize, max: usize },
    #[error("output at {start}+{len} is outside memory")]
    OutsideMemory { start: usize, len: usize },
    #[error("output is not JSON")]
    NotJson(#[source] serde_json::Error),
}

impl CallError {
    pub fn reason(&self) -> &'static str {
        match self {
            CallError::Timeout => "timeout",
            CallError::Memory => "memory",
            CallError::Trap(_) => "trap",
            CallError::BadOutput(_) => "bad_output",
            CallError::GuestError(_) => "guest_error",
            CallError::Instantiate(_) | CallError::MissingExport(_) => "instantiate",
        }
    }
}

/// Why a module was refused.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("not WebAssembly")]
    NotWasm(#[source] wat::Error),
    #[error("does not compile")]
    Compile(#[source] WasmError),
    #[error("cannot be linked (no imports are offered)")]
    Link(#[source] WasmError),
    #[error("its first instance failed")]
    Abi(#[source] CallError),
}

/// The engine every plugin of a node is compiled with: fuel metering on.
pub fn engine() -> Result<Engine, WasmError> {
    let mut config = wasmtime::Config::new();
    config.consume_fuel(true);
    Engine::new(&config).map_err(WasmError::from)
}

/// The store's data: enforces the memory limit and remembers that it did.
struct Host {
    max_memory: usize,
    memory_denied: bool,
}

impl wasmtime::ResourceLimiter for Host {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.memory_denied = true;
            // An error (not `Ok(false)`) makes the grow trap, so a guest
            // that ignores a failed grow cannot spin on it.
            return Err(wasmtime::Error::msg(format!("plugin memory limit of {} bytes reached", self.max_memory)));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// A warm instance.
struct Warm {
    store: Store<Host>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    process: TypedFunc<(i32, i32), i64>,
}

/// One compiled plugin and its pool.
pub struct Compiled {
    pub name: String,
    pub size: usize,
    pre: InstancePre<Host>,
    limits: Limits,
    pool: Mutex<Vec<Warm>>,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled").field("name", &self.name).field("size", &self.size).finish_non_exhaustive()
    }
}

impl Compiled {
    /// Compiles `bytes` (binary or text format), pre-links it, and checks
    /// that a first instance has the ABI's exports. Slow (milliseconds):
    /// call it off the async threads.
    pub fn new(engine: &Engine, name: &str, bytes: &[u8], limits: Limits) -> Result<Compiled, ModuleError> {
        let module = Module::new(engine, bytes).map_err(|e| ModuleError::Compile(e.into()))?;
        let linker: Linker<Host> = Linker::new(engine);
        let pre = linker.instantiate_pre(&module).map_err(|e| ModuleError::Link(e.into()))?;
        let compiled = Compiled { name: name.to_owned(), size: bytes.len(), pre, limits, pool: Mutex::new(Vec::new()) };
        let first = compiled.instantiate().map_err(ModuleError::Abi)?;
        compiled.pool().push(first);
        Ok(compiled)
    }

    /// Compiles text or binary into the binary form stored in the bucket.
    pub fn to_binary(bytes: &[u8]) -> Result<Vec<u8>, ModuleError> {
        wat::parse_bytes(bytes).map(|b| b.into_owned()).map_err(ModuleError::NotWasm)
    }

    fn instantiate(&self) -> Result<Warm, CallError> {
        let err = |e: wasmtime::Error| CallError::Instantiate(e.into());
        let mut store = Store::new(
            self.pre.module().engine(),
            Host { max_memory: self.limits.max_memory_bytes, memory_denied: false },
        );
        store.limiter(|h| h as &mut dyn wasmtime::ResourceLimiter);
        store.set_fuel(self.limits.fuel).map_err(err)?;
        let instance = self.pre.instantiate(&mut store).map_err(err)?;
        let memory =
            instance.get_memory(&mut store, plugin_abi::MEMORY).ok_or(CallError::MissingExport(plugin_abi::MEMORY))?;
        let alloc = instance.get_typed_func::<i32, i32>(&mut store, plugin_abi::ALLOC).map_err(err)?;
        let process = instance.get_typed_func::<(i32, i32), i64>(&mut store, plugin_abi::PROCESS).map_err(err)?;
        Ok(Warm { store, memory, alloc, process })
    }

    /// The pool (a panic elsewhere while holding it leaves it usable).
    fn pool(&self) -> MutexGuard<'_, Vec<Warm>> {
        self.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs the plugin on `input`; returns its output bytes (checked to be
    /// JSON).
    pub fn call(&self, input: &[u8]) -> Result<Vec<u8>, CallError> {
        let pooled = self.pool().pop();
        let mut warm = match pooled {
            Some(w) => {
                metrics::counter!(crate::internal_events::names::PLUGIN_POOL_HITS_TOTAL, "plugin" => self.name.clone())
                    .increment(1);
                w
            }
            None => {
                metrics::counter!(crate::internal_events::names::PLUGIN_POOL_MISSES_TOTAL, "plugin" => self.name.clone()).increment(1);
                self.instantiate()?
            }
        };
        let output = warm.call(input, &self.limits)?;
        let mut pool = self.pool();
        if pool.len() < self.limits.pool_size {
            pool.push(warm);
        }
        Ok(output)
    }
}

/// A failed call before classification.
enum Failed {
    Wasm(wasmtime::Error),
    Call(CallError),
}

impl From<CallError> for Failed {
    fn from(e: CallError) -> Self {
        Failed::Call(e)
    }
}

impl Warm {
    fn call(&mut self, input: &[u8], limits: &Limits) -> Result<Vec<u8>, CallError> {
        self.store.set_fuel(limits.fuel).map_err(|e| CallError::Trap(e.into()))?;
        self.run(input, limits).map_err(|e| match e {
            Failed::Wasm(e) if self.store.data().memory_denied => {
                drop(e);
                CallError::Memory
            }
            Failed::Wasm(e) => match e.downcast_ref::<Trap>() {
                Some(Trap::OutOfFuel) => CallError::Timeout,
                _ => CallError::Trap(e.into()),
            },
            Failed::Call(e) => e,
        })
    }

    fn run(&mut self, input: &[u8], limits: &Limits) -> Result<Vec<u8>, Failed> {
        let classify = Failed::Wasm;
        let len = i32::try_from(input.len()).map_err(|_| CallError::BadOutput(BadOutput::InputTooLarge))?;
        let ptr = self.alloc.call(&mut self.store, len).map_err(classify)?;
        let bad_alloc = || CallError::BadOutput(BadOutput::BadAlloc { ptr });
        let at = usize::try_from(ptr).map_err(|_| bad_alloc())?;
        self.memory.write(&mut self.store, at, input).map_err(|_| bad_alloc())?;
        let packed = self.process.call(&mut self.store, (ptr, len)).map_err(classify)?;
        let (out_ptr, out_len) = plugin_abi::unpack(packed).map_err(CallError::GuestError)?;
        let (start, n) = (out_ptr as usize, out_len as usize);
        if n > limits.max_output_bytes {
            return Err(CallError::BadOutput(BadOutput::TooLarge { size: n, max: limits.max_output_bytes }).into());
        }
        let data = self.memory.data(&self.store);
        let output = data
            .get(start..start.saturating_add(n))
            .ok_or(CallError::BadOutput(BadOutput::OutsideMemory { start, len: n }))?
            .to_vec();
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&output) {
            return Err(CallError::BadOutput(BadOutput::NotJson(e)).into());
        }
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { fuel: 1_000_000, max_memory_bytes: 1 << 20, max_output_bytes: 4096, pool_size: 2 };

    fn plugin(file: &str) -> Compiled {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/plugins").join(file);
        let text = std::fs::read(&path).expect("example plugin");
        Compiled::new(&engine().expect("engine"), file, &text, LIMITS).expect("compiles")
    }

    #[test]
    fn the_echo_plugin_wraps_its_input_and_reuses_its_instance() {
        let p = plugin("echo.wat");
        for _ in 0..3 {
            let out = p.call(br#"{"t":21.5}"#).expect("call");
            let v: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
            assert_eq!(v, serde_json::json!({"echo": {"t": 21.5}}));
        }
        assert_eq!(p.pool().len(), 1, "one warm instance, reused");
    }

    #[test]
    fn a_loop_runs_out_of_fuel_and_the_plugin_recovers() {
        let p = plugin("spin.wat");
        assert!(matches!(p.call(b"{}"), Err(CallError::Timeout)));
        assert!(p.pool().is_empty(), "a failed instance is discarded");
        assert!(matches!(p.call(b"{}"), Err(CallError::Timeout)), "a fresh instance fails the same way");
    }

    #[test]
    fn unbounded_memory_growth_hits_the_limit() {
        let p = plugin("hog.wat");
        let got = p.call(b"{}");
        assert!(matches!(got, Err(CallError::Memory)), "{got:?}");
    }

    #[test]
    fn a_trap_is_an_error_not_a_crash() {
        let p = plugin("crash.wat");
        let got = p.call(b"{}");
        assert!(matches!(got, Err(CallError::Trap(_))), "{got:?}");
    }

    #[test]
    fn malformed_output_is_an_error_and_the_instance_is_discarded() {
        let engine = engine().expect("engine");
        // Returns 5 bytes at 0 ("nope!"), or a range past the end of memory.
        let module = |ptr_len: &str| {
            format!(
                r#"(module (memory (export "memory") 1) (data (i32.const 0) "nope!")
                   (func (export "fm_alloc") (param i32) (result i32) (i32.const 1024))
                   (func (export "fm_process") (param i32 i32) (result i64) (i64.const {ptr_len})))"#
            )
        };
        let not_json = Compiled::new(&engine, "not-json", module("5").as_bytes(), LIMITS).expect("compiles");
        assert!(matches!(not_json.call(b"{}"), Err(CallError::BadOutput(BadOutput::NotJson(_)))));
        assert!(not_json.pool().is_empty());
        let outside =
            Compiled::new(&engine, "outside", module("0x0000FFFF00000010").as_bytes(), LIMITS).expect("compiles");
        assert!(matches!(outside.call(b"{}"), Err(CallError::BadOutput(BadOutput::OutsideMemory { .. }))));
        let negative = Compiled::new(&engine, "negative", module("-2").as_bytes(), LIMITS).expect("compiles");
        assert!(matches!(negative.call(b"{}"), Err(CallError::GuestError(-2))));
    }

    #[test]
    fn modules_without_the_abi_are_refused() {
        let engine = engine().expect("engine");
        let err = Compiled::new(&engine, "empty", b"(module)", LIMITS).expect_err("no exports");
        assert!(matches!(err, ModuleError::Abi(CallError::MissingExport("memory"))), "{err:?}");
        let err = Compiled::new(&engine, "bad", b"not wasm", LIMITS).expect_err("not wasm");
        assert!(matches!(err, ModuleError::Compile(_)), "{err:?}");
    }
}
