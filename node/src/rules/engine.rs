//! The Rhai side of rules: one engine per node with its limits and the
//! functions a script can call, and running one compiled rule.
//!
//! A script runs synchronously inside its shard's worker. The functions it
//! calls (`emit`, `alert`, `set_state`, `command`, `plugin`, `drop`)
//! record actions in a per-thread buffer that [`RuleEngine::run`] empties
//! before and takes after each run, so one engine serves every worker
//! without locks. A run that fails (a runtime error, or the operation
//! budget or a size limit exceeded) yields only its error: actions it
//! recorded before failing are discarded.

use super::RulesConfig;
pub use crate::plugins::{PluginCallError, PluginCaller};
use rhai::{Dynamic, Engine, EvalAltResult, Position, Scope, AST};
use serde_json::Value;
use std::cell::RefCell;
use std::sync::Arc;

/// The variables a script sees (see `super::input_scope`).
pub const INPUTS: [&str; 8] =
    ["device", "channel", "payload", "is_json", "received_us", "device_time_us", "state", "frame_id"];

/// What a script asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// `emit(value)`: an event frame carrying `value` as JSON.
    Emit(Value),
    /// `alert(severity, message[, extra])`.
    Alert { severity: fluxmesh_schemas::frame::Severity, message: String, extra: Value },
    /// `set_state(key, value)`: a rule variable in the device's state
    /// (`()` removes it).
    SetState { key: String, value: Value },
    /// `command(device, payload)`: a command to a device.
    Command { device: String, payload: Value },
    /// `drop()`: the message updates neither state nor aggregates, and later
    /// rules do not see it.
    Drop,
}

/// Why a rule run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The operation budget ran out (a runaway loop).
    #[error("operation budget of {0} exhausted")]
    Budget(u64),
    /// A string, array or map grew past its limit, or calls nested too deep
    /// (`what` is Rhai's name for it).
    #[error("{what} too large ({at})")]
    TooLarge { what: String, at: Position },
    #[error("calls nested too deep ({at})")]
    TooDeep { at: Position },
    /// Any other runtime error (it says where it happened).
    #[error("script failed")]
    Runtime(#[source] Box<EvalAltResult>),
}

impl RunError {
    /// The `reason` label of `fluxmesh_rule_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            RunError::Budget(_) => "budget",
            RunError::TooLarge { .. } | RunError::TooDeep { .. } => "limit",
            RunError::Runtime(_) => "runtime",
        }
    }
}

/// A script that does not compile, with where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message} (line {line}, column {column})")]
pub struct CompileError {
    pub message: String,
    pub line: usize,
    pub column: usize,
}

struct RunState {
    actions: Vec<Action>,
    max_actions: usize,
    plugins: Option<Arc<dyn PluginCaller>>,
}

thread_local! {
    static RUN: RefCell<RunState> = const {
        RefCell::new(RunState { actions: Vec::new(), max_actions: 0, plugins: None })
    };
}

fn record(action: Action) -> Result<(), Box<EvalAltResult>> {
    RUN.with(|r| {
        let mut r = r.borrow_mut();
        if r.actions.len() >= r.max_actions {
            return Err(format!("a rule run may record at most {} actions", r.max_actions).into());
        }
        r.actions.push(action);
        Ok(())
    })
}

/// A JSON value as a script value: objects become maps, arrays arrays,
/// integers `i64` (or `f64` past its range), other numbers `f64`, `null`
/// `()`. A direct walk: about three times faster than going through serde.
pub fn to_dynamic(v: &Value) -> Dynamic {
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Dynamic::from(s.clone()),
        Value::Array(a) => Dynamic::from_array(a.iter().map(to_dynamic).collect()),
        Value::Object(o) => {
            let mut map = rhai::Map::new();
            for (k, v) in o {
                map.insert(k.as_str().into(), to_dynamic(v));
            }
            Dynamic::from_map(map)
        }
    }
}

fn to_json(v: &Dynamic) -> Result<Value, Box<EvalAltResult>> {
    rhai::serde::from_dynamic::<Value>(v).map_err(|e| format!("value cannot be written as JSON: {e}").into())
}

fn severity(s: &str) -> Result<fluxmesh_schemas::frame::Severity, Box<EvalAltResult>> {
    use fluxmesh_schemas::frame::Severity;
    match s {
        "info" => Ok(Severity::Info),
        "warning" => Ok(Severity::Warning),
        "critical" => Ok(Severity::Critical),
        other => Err(format!("unknown severity `{other}`: use \"info\", \"warning\" or \"critical\"").into()),
    }
}

/// The node's Rhai engine and its limits.
#[derive(Debug)]
pub struct RuleEngine {
    engine: Engine,
    max_operations: u64,
    max_actions: usize,
}

impl RuleEngine {
    pub fn new(cfg: &RulesConfig) -> Self {
        let mut engine = Engine::new();
        engine
            .set_max_operations(cfg.max_operations)
            .set_max_string_size(cfg.max_string_bytes)
            .set_max_array_size(cfg.max_array_len)
            .set_max_map_size(cfg.max_map_len)
            .set_max_call_levels(32)
            .set_max_expr_depths(64, 32)
            .set_strict_variables(true);
        // Scripts cannot reach files or other modules.
        engine.set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
        engine.on_print(|s| tracing::debug!(target: "fluxmesh_node::rules::script", "{s}"));
        engine.on_debug(|s, _, pos| tracing::debug!(target: "fluxmesh_node::rules::script", %pos, "{s}"));

        engine.register_fn("emit", |v: Dynamic| record(Action::Emit(to_json(&v)?)));
        engine.register_fn("alert", |sev: &str, message: &str| {
            record(Action::Alert { severity: severity(sev)?, message: message.to_owned(), extra: Value::Null })
        });
        engine.register_fn("alert", |sev: &str, message: &str, extra: Dynamic| {
            record(Action::Alert { severity: severity(sev)?, message: message.to_owned(), extra: to_json(&extra)? })
        });
        engine.register_fn("set_state", |key: &str, v: Dynamic| {
            record(Action::SetState { key: key.to_owned(), value: to_json(&v)? })
        });
        engine.register_fn("command", |device: &str, payload: Dynamic| {
            if device.is_empty() {
                return Err("command: the device id is empty".into());
            }
            record(Action::Command { device: device.to_owned(), payload: to_json(&payload)? })
        });
        engine.register_fn("drop", || record(Action::Drop));
        engine.register_fn("plugin", |name: &str, input: Dynamic| -> Result<Dynamic, Box<EvalAltResult>> {
            let input = serde_json::to_vec(&input)
                .map_err(|e| format!("plugin `{name}`: input cannot be written as JSON: {e}"))?;
            let plugins = RUN.with(|r| r.borrow().plugins.clone());
            let Some(plugins) = plugins else {
                return Err(format!("plugin `{name}`: plugins are not available").into());
            };
            let output = plugins.call(name, &input).map_err(|e| fluxmesh_mesh::error_chain(&e))?;
            let value: Value =
                serde_json::from_slice(&output).map_err(|e| format!("plugin `{name}` returned invalid JSON: {e}"))?;
            Ok(to_dynamic(&value))
        });
        RuleEngine { engine, max_operations: cfg.max_operations, max_actions: cfg.max_actions_per_run }
    }

    /// Compiles `script`, or says where it is wrong. Variables are strict:
    /// a name that is neither an input ([`INPUTS`]) nor defined by the
    /// script is a compile error, so a typo is refused at upload.
    pub fn compile(&self, script: &str) -> Result<AST, CompileError> {
        let mut inputs = Scope::new();
        for name in INPUTS {
            inputs.push(name, ());
        }
        self.engine.compile_with_scope(&inputs, script).map_err(|e| {
            let pos = e.position();
            CompileError {
                message: e.err_type().to_string(),
                line: pos.line().unwrap_or(0),
                column: pos.position().unwrap_or(0),
            }
        })
    }

    /// Runs `ast` with `scope` (the message, the device's state); returns
    /// the actions it recorded.
    pub fn run(
        &self,
        ast: &AST,
        scope: &mut Scope<'static>,
        plugins: Option<&Arc<dyn PluginCaller>>,
    ) -> Result<Vec<Action>, RunError> {
        RUN.with(|r| {
            let mut r = r.borrow_mut();
            r.actions.clear();
            r.max_actions = self.max_actions;
            r.plugins = plugins.cloned();
        });
        let result = self.engine.run_ast_with_scope(scope, ast);
        let actions = RUN.with(|r| {
            let mut r = r.borrow_mut();
            r.plugins = None;
            std::mem::take(&mut r.actions)
        });
        match result {
            Ok(()) => Ok(actions),
            Err(e) => Err(self.classify(*e)),
        }
    }

    fn classify(&self, e: EvalAltResult) -> RunError {
        match e.unwrap_inner() {
            EvalAltResult::ErrorTooManyOperations(_) => RunError::Budget(self.max_operations),
            EvalAltResult::ErrorDataTooLarge(what, at) => RunError::TooLarge { what: what.clone(), at: *at },
            EvalAltResult::ErrorStackOverflow(at) => RunError::TooDeep { at: *at },
            _ => RunError::Runtime(Box::new(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> RuleEngine {
        RuleEngine::new(&RulesConfig { max_operations: 10_000, ..Default::default() })
    }

    fn run(e: &RuleEngine, script: &str, payload: Value) -> Result<Vec<Action>, RunError> {
        let ast = e.compile(script).expect("compiles");
        let mut scope = Scope::new();
        for name in INPUTS {
            scope.push(name, ());
        }
        scope.set_value("payload", to_dynamic(&payload));
        scope.set_value("device", "d1".to_owned());
        e.run(&ast, &mut scope, None)
    }

    #[test]
    fn a_threshold_rule_raises_an_alert_with_extra_fields() {
        let e = engine();
        let script = r#"if payload.temp > 30.0 { alert("critical", `too hot: ${payload.temp}`, #{ limit: 30 }); }"#;
        let got = run(&e, script, serde_json::json!({"temp": 31.5})).expect("runs");
        assert_eq!(
            got,
            [Action::Alert {
                severity: fluxmesh_schemas::frame::Severity::Critical,
                message: "too hot: 31.5".into(),
                extra: serde_json::json!({"limit": 30}),
            }]
        );
        assert_eq!(run(&e, script, serde_json::json!({"temp": 20.0})).expect("runs"), []);
    }

    #[test]
    fn every_action_is_recorded_in_order() {
        let e = engine();
        let script = r#"emit(#{ x: payload.x }); set_state("last_x", payload.x); command(device, "reset"); drop();"#;
        let got = run(&e, script, serde_json::json!({"x": 2})).expect("runs");
        assert_eq!(
            got,
            [
                Action::Emit(serde_json::json!({"x": 2})),
                Action::SetState { key: "last_x".into(), value: serde_json::json!(2) },
                Action::Command { device: "d1".into(), payload: serde_json::json!("reset") },
                Action::Drop,
            ]
        );
    }

    #[test]
    fn a_runaway_loop_is_stopped_by_the_budget() {
        let e = engine();
        assert!(matches!(run(&e, "loop {}", Value::Null), Err(RunError::Budget(10_000))));
        // The engine keeps working after it.
        assert_eq!(run(&e, "emit(1);", Value::Null).expect("runs"), [Action::Emit(serde_json::json!(1))]);
    }

    #[test]
    fn unbounded_growth_hits_a_size_limit() {
        let e = RuleEngine::new(&RulesConfig { max_string_bytes: 1000, ..Default::default() });
        let got = run(&e, r#"let s = "x"; loop { s += s; }"#, Value::Null);
        assert!(matches!(got, Err(RunError::TooLarge { .. } | RunError::TooDeep { .. })), "{got:?}");
    }

    #[test]
    fn a_failed_run_discards_what_it_recorded() {
        let e = engine();
        let got = run(&e, r#"emit(1); alert("loud", "x");"#, Value::Null);
        assert!(matches!(&got, Err(RunError::Runtime(m)) if m.to_string().contains("unknown severity")), "{got:?}");
        assert_eq!(run(&e, "", Value::Null).expect("runs"), []);
    }

    #[test]
    fn json_becomes_the_same_script_value_as_through_serde() {
        let v = serde_json::json!({"a": [1, 2.5, "x", null, true], "b": {"c": -7}, "big": 1e300, "u": u64::MAX});
        assert_eq!(format!("{:?}", to_dynamic(&v)), format!("{:?}", rhai::serde::to_dynamic(&v).expect("serde")));
    }

    #[test]
    fn compile_errors_say_where() {
        let e = engine();
        let err = e.compile("let x = 1;\nif x > { }").expect_err("does not compile");
        assert_eq!(err.line, 2, "{err}");
        assert!(err.column > 0, "{err}");
    }

    #[test]
    fn undefined_variables_are_errors_at_compile_time() {
        let e = engine();
        assert!(e.compile("emit(nope);").is_err());
    }

    #[test]
    fn actions_per_run_are_bounded() {
        let e = RuleEngine::new(&RulesConfig { max_actions_per_run: 3, ..Default::default() });
        let got = run(&e, "for i in 0..10 { emit(i); }", Value::Null);
        assert!(matches!(&got, Err(RunError::Runtime(m)) if m.to_string().contains("at most 3")), "{got:?}");
    }
}
