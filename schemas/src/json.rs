//! The JSON view of a frame, for clients that do not read rkyv.
//!
//! ```json
//! {
//!   "v": 1,
//!   "id": "0193…",              // 32 hex digits, the Nats-Msg-Id
//!   "kind": "telemetry",        // telemetry | state | alert | agg | event | error
//!   "device": "sensor-1",       // unescaped
//!   "channel": "env/temp",
//!   "device_time_us": null,     // or µs since the Unix epoch
//!   "received_time_us": 1763774210123456,
//!   "origin": "node-1",
//!   "producer": "",             // rule:{id}, plugin:{id}, agg, state; empty for telemetry
//!   "seq": 0,
//!   "body": { … }
//! }
//! ```
//!
//! `body` by kind:
//! - `telemetry`: `{"payload": <the payload as JSON>}` when the payload is a
//!   JSON document, otherwise `{"payload_base64": "<standard base64>"}`.
//! - `state`, `event`: `{"data": <JSON>}` (or `data_base64` if not JSON).
//! - `alert`: `{"severity": "info"|"warning"|"critical", "message": "…", "data": <JSON>}`.
//! - `agg`: `{"field", "window_start_us", "window_end_us", "count", "sum", "min", "max", "mean", "variance"}`.
//! - `error`: `{"message": "…"}`.

use crate::frame::{ArchivedBody, ArchivedFrame, ArchivedSeverity, SCHEMA_VERSION};
use base64::Engine as _;
use serde_json::{json, Map, Value};

/// Builds the JSON view of a validated frame.
pub fn to_value(frame: &ArchivedFrame) -> Value {
    let body = match &frame.body {
        ArchivedBody::Telemetry { payload } => json_or_base64("payload", payload),
        ArchivedBody::State { json } | ArchivedBody::Event { json } => json_or_base64("data", json),
        ArchivedBody::Alert { severity, message, json } => {
            let mut body = json_or_base64("data", json);
            body.insert("severity".into(), severity_str(severity).into());
            body.insert("message".into(), message.as_str().into());
            body
        }
        ArchivedBody::Aggregate(a) => {
            let v = json!({
                "field": a.field.as_str(),
                "window_start_us": a.window_start_us.to_native(),
                "window_end_us": a.window_end_us.to_native(),
                "count": a.count.to_native(),
                "sum": a.sum.to_native(),
                "min": a.min.to_native(),
                "max": a.max.to_native(),
                "mean": a.mean.to_native(),
                "variance": a.variance.to_native(),
            });
            match v {
                Value::Object(m) => m,
                _ => Map::new(),
            }
        }
        ArchivedBody::Error { message } => {
            let mut m = Map::new();
            m.insert("message".into(), message.as_str().into());
            m
        }
    };
    json!({
        "v": SCHEMA_VERSION,
        "id": frame.id.to_string(),
        "kind": frame.kind().as_str(),
        "device": frame.device.as_str(),
        "channel": frame.channel.as_str(),
        "device_time_us": frame.device_time_us(),
        "received_time_us": frame.received_time_us.to_native(),
        "origin": frame.origin.as_str(),
        "producer": frame.producer.as_str(),
        "seq": frame.seq.to_native(),
        "body": body,
    })
}

/// The JSON view as bytes.
pub fn to_vec(frame: &ArchivedFrame) -> Vec<u8> {
    // Serializing a `Value` to a Vec cannot fail.
    serde_json::to_vec(&to_value(frame)).unwrap_or_default()
}

fn json_or_base64(key: &str, bytes: &[u8]) -> Map<String, Value> {
    let mut m = Map::new();
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => m.insert(key.to_owned(), v),
        Err(_) => m.insert(format!("{key}_base64"), base64::engine::general_purpose::STANDARD.encode(bytes).into()),
    };
    m
}

fn severity_str(s: &ArchivedSeverity) -> &'static str {
    match s {
        ArchivedSeverity::Info => "info",
        ArchivedSeverity::Warning => "warning",
        ArchivedSeverity::Critical => "critical",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{access, Frame};
    use rkyv::util::AlignedVec;

    fn view(frame: &Frame) -> Value {
        let bytes = frame.encode().expect("encodes");
        let mut scratch = AlignedVec::new();
        to_value(access(&bytes, &mut scratch).expect("valid"))
    }

    #[test]
    fn json_payload_is_embedded() {
        let v = view(&Frame::telemetry("d1", "env/temp", "n1", br#"{"t":21.5}"#.to_vec()));
        assert_eq!(v["body"]["payload"]["t"], 21.5);
        assert_eq!(v["device"], "d1");
        assert_eq!(v["kind"], "telemetry");
        assert_eq!(v["v"], 1);
    }

    #[test]
    fn binary_payload_is_base64() {
        let v = view(&Frame::telemetry("d1", "raw", "n1", vec![0xff, 0x00, 0x10]));
        assert_eq!(v["body"]["payload_base64"], "/wAQ");
        assert!(v["body"].get("payload").is_none());
    }
}
