//! What a shard's worker does with one telemetry message, in order:
//!
//! 1. skip it if its device has applied it before (a redelivery);
//! 2. run the rules that match its device and channel, in id order; each
//!    run's actions become derived frames (`event`, `alert`, `error`),
//!    device variables, or commands; `drop()` ends here;
//! 3. update the device's state (a `state` frame when it changed);
//! 4. add its numeric fields to the device's aggregation windows (an `agg`
//!    frame for each window that closes).
//!
//! All of it is synchronous and touches only the shard's own state, so it
//! needs no locks. Ids of derived frames come from the input frame and the
//! producer (aggregates: from the window), so a replay after failover
//! derives the same ids and JetStream drops the copies.

use super::aggregate::{self, Aggregation};
use super::state::{Applied, DeviceState};
use crate::rules::{Action, PluginCaller, Rule, RuleEngine, RuleSet};
use fluxmesh_schemas::frame::{ArchivedBody, ArchivedFrame, Kind};
use fluxmesh_schemas::{Body, Frame, FrameId};
use rhai::{Dynamic, Scope};
use serde_json::Value;
use std::sync::Arc;

/// The settings and shared parts one worker processes with.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub origin: String,
    pub state_min_interval_us: i64,
    pub aggregation: Aggregation,
    pub engine: Arc<RuleEngine>,
    pub plugins: Option<Arc<dyn PluginCaller>>,
}

/// A command a rule sent.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleCommand {
    pub id: FrameId,
    pub device: String,
    pub payload: Vec<u8>,
}

/// Everything a batch derived.
#[derive(Debug, Default)]
pub struct Outputs {
    pub frames: Vec<Frame>,
    pub commands: Vec<RuleCommand>,
}

/// What happened to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processed {
    Skipped,
    Applied,
    Dropped,
}

/// The id of the `n`-th frame `producer` derived from input `input`.
pub fn derived_id(input: &FrameId, producer: &str, n: u32) -> FrameId {
    let mut key = Vec::with_capacity(24 + producer.len());
    key.extend_from_slice(&input.0);
    key.extend_from_slice(producer.as_bytes());
    key.push(0);
    key.extend_from_slice(&n.to_le_bytes());
    FrameId::from_key(&key)
}

impl Pipeline {
    /// Processes the telemetry message at `stream_seq` for its device's
    /// state `st` under the rules `rules`.
    pub fn process(
        &self,
        rules: &RuleSet,
        st: &mut DeviceState,
        frame: &ArchivedFrame,
        stream_seq: u64,
        out: &mut Outputs,
    ) -> Processed {
        if st.is_redelivery(stream_seq) {
            return Processed::Skipped;
        }
        let payload: &[u8] = match &frame.body {
            ArchivedBody::Telemetry { payload } => payload.as_slice(),
            _ => &[],
        };
        let json: Option<Value> = serde_json::from_slice(payload).ok();
        let device = frame.device.as_str();
        let channel = frame.channel.as_str();

        let mut matching = rules.matching(device, channel).peekable();
        if matching.peek().is_some() {
            let started = std::time::Instant::now();
            let mut scope = input_scope(frame, json.as_ref(), payload, st);
            let mut dropped = false;
            for rule in matching {
                if self.run_rule(&self.engine, rule, &mut scope, st, frame, out) {
                    dropped = true;
                    break;
                }
            }
            metrics::histogram!(crate::internal_events::names::RULES_SECONDS).record(started.elapsed().as_secs_f64());
            if dropped {
                st.last_stream_seq = stream_seq;
                st.dropped += 1;
                return Processed::Dropped;
            }
        }

        if let Applied::Changed(f) =
            st.apply(frame, stream_seq, &self.origin, self.state_min_interval_us, json.as_ref())
        {
            out.frames.push(*f);
        }
        if let Some(v) = &json {
            if !self.aggregation.sizes_us.is_empty() {
                let fields = aggregate::numeric_fields(v);
                if !fields.is_empty() {
                    let t = frame.device_time_us().unwrap_or(frame.received_time_us.to_native());
                    let update = st.windows.update(&self.aggregation, channel, &fields, t);
                    metrics::counter!(crate::internal_events::names::AGG_UPDATES_TOTAL).increment(update.added);
                    if update.late > 0 {
                        metrics::counter!(crate::internal_events::names::AGG_LATE_TOTAL).increment(update.late);
                    }
                    if update.overflow > 0 {
                        metrics::counter!(crate::internal_events::names::AGG_OVERFLOW_TOTAL).increment(update.overflow);
                    }
                    for w in update.closed {
                        let seq = st.next_seq(Kind::Aggregate);
                        out.frames.push(aggregate::frame(
                            device,
                            &w,
                            frame.received_time_us.to_native(),
                            &self.origin,
                            seq,
                        ));
                    }
                }
            }
        }
        Processed::Applied
    }

    /// Runs one rule and turns its actions into outputs; true if it
    /// dropped the message.
    fn run_rule(
        &self,
        engine: &RuleEngine,
        rule: &Rule,
        scope: &mut Scope<'static>,
        st: &mut DeviceState,
        input: &ArchivedFrame,
        out: &mut Outputs,
    ) -> bool {
        let input_id = FrameId(input.id.0);
        let result = engine.run(&rule.ast, scope, self.plugins.as_ref());
        let actions = match result {
            Ok(actions) => actions,
            Err(e) => {
                crate::internal_events::emit(crate::internal_events::processing::RuleFailed {
                    rule: &rule.spec.id,
                    input: input_id,
                    reason: e.reason(),
                    error: &e,
                });
                let seq = st.next_seq(Kind::Error);
                out.frames.push(self.derived(
                    input,
                    &rule.producer,
                    u32::MAX,
                    seq,
                    Body::Error {
                        message: format!(
                            "rule {} failed on frame {input_id}: {}",
                            rule.spec.id,
                            fluxmesh_mesh::error_chain(&e)
                        ),
                    },
                ));
                return false;
            }
        };
        let mut n = 0u32;
        for action in actions {
            let body = match action {
                Action::Emit(v) => Body::Event { json: serde_json::to_vec(&v).unwrap_or_default() },
                Action::Alert { severity, message, extra } => {
                    Body::Alert { severity, message, json: serde_json::to_vec(&extra).unwrap_or_default() }
                }
                Action::SetState { key, value } => {
                    if value.is_null() {
                        st.vars.remove(&key);
                    } else {
                        st.vars.insert(key, value);
                    }
                    continue;
                }
                Action::Command { device, payload } => {
                    let payload = match payload {
                        Value::String(s) => s.into_bytes(),
                        other => serde_json::to_vec(&other).unwrap_or_default(),
                    };
                    out.commands.push(RuleCommand { id: derived_id(&input_id, &rule.producer, n), device, payload });
                    n += 1;
                    continue;
                }
                Action::Drop => return true,
            };
            let seq = st.next_seq(body.kind());
            out.frames.push(self.derived(input, &rule.producer, n, seq, body));
            n += 1;
        }
        false
    }

    fn derived(&self, input: &ArchivedFrame, producer: &str, n: u32, seq: u64, body: Body) -> Frame {
        Frame {
            id: derived_id(&FrameId(input.id.0), producer, n),
            device: input.device.as_str().to_owned(),
            channel: input.channel.as_str().to_owned(),
            device_time_us: input.device_time_us(),
            received_time_us: input.received_time_us.to_native(),
            origin: self.origin.clone(),
            producer: producer.to_owned(),
            seq,
            body,
        }
    }
}

/// The variables a rule sees (`crate::rules::engine::INPUTS`).
fn input_scope(frame: &ArchivedFrame, json: Option<&Value>, payload: &[u8], st: &DeviceState) -> Scope<'static> {
    let mut scope = Scope::new();
    scope.push_constant("device", frame.device.as_str().to_owned());
    scope.push_constant("channel", frame.channel.as_str().to_owned());
    let payload = match json {
        Some(v) => crate::rules::engine::to_dynamic(v),
        None => Dynamic::from_blob(payload.to_vec()),
    };
    scope.push("payload", payload);
    scope.push_constant("is_json", json.is_some());
    scope.push_constant("received_us", frame.received_time_us.to_native());
    scope.push_constant("device_time_us", frame.device_time_us().map_or(Dynamic::UNIT, Dynamic::from));
    let mut state = rhai::Map::new();
    state.insert("count".into(), Dynamic::from(i64::try_from(st.count).unwrap_or(i64::MAX)));
    state.insert("first_seen_us".into(), Dynamic::from(st.first_seen_us));
    state.insert("last_seen_us".into(), Dynamic::from(st.last_seen_us));
    let mut vars = rhai::Map::new();
    for (k, v) in &st.vars {
        vars.insert(k.as_str().into(), crate::rules::engine::to_dynamic(v));
    }
    let vars = Dynamic::from_map(vars);
    state.insert("vars".into(), vars);
    scope.push_constant("state", state);
    scope.push_constant("frame_id", FrameId(frame.id.0).to_string());
    scope
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processing::aggregate::AggregationConfig;
    use crate::rules::{compile, parse_seed, RulesConfig};
    use fluxmesh_schemas::frame::{access, AlignedVec, Severity};

    fn pipeline(agg_ms: &[u64]) -> Pipeline {
        let engine = Arc::new(RuleEngine::new(&RulesConfig::default()));
        Pipeline {
            origin: "n1".into(),
            state_min_interval_us: 0,
            aggregation: Aggregation::from(&AggregationConfig { windows_ms: agg_ms.to_vec(), ..Default::default() }),
            engine,
            plugins: None,
        }
    }

    fn rules(p: &Pipeline, scripts: &[(&str, &str)]) -> RuleSet {
        let engine = &p.engine;
        let rules = scripts
            .iter()
            .map(|(id, s)| Arc::new(compile(engine, &RulesConfig::default(), parse_seed(id, s)).expect("compiles")))
            .collect();
        RuleSet { rules, revision: 1 }
    }

    fn run(p: &Pipeline, set: &RuleSet, st: &mut DeviceState, f: &Frame, seq: u64) -> (Processed, Outputs) {
        let bytes = f.encode().expect("encode");
        let mut scratch = AlignedVec::new();
        let frame = access(&bytes, &mut scratch).expect("access");
        let mut out = Outputs::default();
        (p.process(set, st, frame, seq, &mut out), out)
    }

    fn at(t_s: i64, payload: &str) -> Frame {
        let mut f = Frame::telemetry("d1", "env", "n0", payload.as_bytes().to_vec());
        f.received_time_us = t_s * 1_000_000;
        f
    }

    #[test]
    fn rules_alert_emit_and_set_state_with_ids_from_the_input() {
        let p = pipeline(&[]);
        let set = rules(
            &p,
            &[
                ("a-hot", r#"if payload.t > 30 { alert("warning", "hot"); }"#),
                ("b-count", r#"set_state("seen", state.count + 1); emit(#{ seen: state.count + 1 });"#),
            ],
        );
        let mut st = DeviceState::new("d1");
        let input = at(1, r#"{"t": 31}"#);
        let (done, out) = run(&p, &set, &mut st, &input, 1);
        assert_eq!(done, Processed::Applied);
        let kinds: Vec<_> = out.frames.iter().map(|f| (f.kind(), f.producer.as_str(), f.seq)).collect();
        assert_eq!(
            kinds,
            [(Kind::Alert, "rule:a-hot", 1), (Kind::Event, "rule:b-count", 1), (Kind::State, "state", 1)]
        );
        assert!(
            matches!(&out.frames[0].body, Body::Alert { severity: Severity::Warning, message, .. } if message == "hot")
        );
        assert_eq!(out.frames[0].id, derived_id(&input.id, "rule:a-hot", 0));
        assert_eq!(st.vars["seen"], serde_json::json!(1));
        // A redelivery derives nothing.
        let (done, out) = run(&p, &set, &mut st, &input, 1);
        assert_eq!((done, out.frames.len()), (Processed::Skipped, 0));
    }

    #[test]
    fn a_failing_rule_emits_an_error_frame_and_the_rest_still_run() {
        let p = pipeline(&[]);
        let set = rules(&p, &[("a-loop", "loop {}"), ("b-ok", "emit(1);")]);
        let mut st = DeviceState::new("d1");
        let (_, out) = run(&p, &set, &mut st, &at(1, "{}"), 1);
        let kinds: Vec<_> = out.frames.iter().map(|f| f.kind()).collect();
        assert_eq!(kinds, [Kind::Error, Kind::Event, Kind::State]);
        assert!(matches!(&out.frames[0].body, Body::Error { message } if message.contains("budget")));
    }

    #[test]
    fn drop_stops_later_rules_state_and_aggregation() {
        let p = pipeline(&[1000]);
        let set = rules(&p, &[("a", "if payload.t < 0 { drop(); }"), ("b", "emit(1);")]);
        let mut st = DeviceState::new("d1");
        let (done, out) = run(&p, &set, &mut st, &at(1, r#"{"t": -5}"#), 1);
        assert_eq!((done, out.frames.len()), (Processed::Dropped, 0));
        assert_eq!((st.count, st.dropped, st.last_stream_seq), (0, 1, 1));
        assert!(st.windows.open.is_empty());
    }

    #[test]
    fn commands_carry_a_derived_id_and_raw_strings() {
        let p = pipeline(&[]);
        let set = rules(&p, &[("c", r#"command("valve-1", "close"); command(device, #{ x: 1 });"#)]);
        let mut st = DeviceState::new("d1");
        let input = at(1, "{}");
        let (_, out) = run(&p, &set, &mut st, &input, 1);
        assert_eq!(
            out.commands,
            [
                RuleCommand {
                    id: derived_id(&input.id, "rule:c", 0),
                    device: "valve-1".into(),
                    payload: b"close".to_vec()
                },
                RuleCommand {
                    id: derived_id(&input.id, "rule:c", 1),
                    device: "d1".into(),
                    payload: br#"{"x":1}"#.to_vec()
                },
            ]
        );
    }

    #[test]
    fn closed_windows_become_aggregate_frames() {
        let p = pipeline(&[10_000]);
        let set = RuleSet::default();
        let mut st = DeviceState::new("d1");
        for (i, t) in [0, 3, 9].into_iter().enumerate() {
            run(&p, &set, &mut st, &at(t, &format!(r#"{{"v": {t}}}"#)), i as u64 + 1);
        }
        // 10 s window + 5 s default lateness: closes at 15 s.
        let (_, out) = run(&p, &set, &mut st, &at(15, r#"{"v": 1}"#), 4);
        let aggs: Vec<_> = out.frames.iter().filter(|f| f.kind() == Kind::Aggregate).collect();
        assert_eq!(aggs.len(), 1);
        let Body::Aggregate(a) = &aggs[0].body else { panic!("aggregate body") };
        assert_eq!((a.field.as_str(), a.count, a.sum, a.min, a.max), ("v", 3, 12.0, 0.0, 9.0));
        assert_eq!(aggs[0].seq, 1);
    }
}
