//! The rows a shard batch writes to history: one per telemetry message,
//! per derived frame (`events`) and per closed aggregation window, built
//! from the frames as they were stored.

use fluxmesh_schemas::frame::{ArchivedBody, ArchivedFrame, Body, Frame, Severity};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// One telemetry message.
#[derive(Debug, Clone)]
pub struct TelemetryRow {
    pub device: String,
    pub received_us: i64,
    pub id: Uuid,
    pub channel: String,
    pub device_time_us: Option<i64>,
    pub origin: String,
    pub payload: Vec<u8>,
    /// The payload is JSON that `jsonb` takes.
    pub json: bool,
}

/// One derived frame other than an aggregate.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub device: String,
    pub received_us: i64,
    pub id: Uuid,
    pub kind: &'static str,
    pub channel: String,
    pub producer: String,
    pub seq: i64,
    pub device_time_us: Option<i64>,
    pub origin: String,
    pub severity: Option<&'static str>,
    pub message: Option<String>,
    /// A JSON document (state, alert extras, event), or empty.
    pub body: Vec<u8>,
    pub json: bool,
}

/// One closed aggregation window.
#[derive(Debug, Clone)]
pub struct AggregateRow {
    pub device: String,
    /// When the mesh received the message that closed the window.
    pub received_us: i64,
    pub channel: String,
    pub field: String,
    pub start_us: i64,
    pub end_us: i64,
    pub count: i64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub variance: f64,
    pub id: Uuid,
    pub origin: String,
}

/// The rows of one shard batch.
#[derive(Debug, Default, Clone)]
pub struct Rows {
    pub telemetry: Vec<TelemetryRow>,
    pub events: Vec<EventRow>,
    pub aggregates: Vec<AggregateRow>,
}

/// JSON that `jsonb` accepts: valid JSON (checked without building a
/// value) with no `\u0000` escape, which `jsonb` refuses.
pub fn jsonb_ok(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && !bytes.windows(6).any(|w| w == b"\\u0000")
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

impl Rows {
    pub fn len(&self) -> usize {
        self.telemetry.len() + self.events.len() + self.aggregates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a telemetry frame as it was stored in the stream.
    pub fn telemetry(&mut self, frame: &ArchivedFrame) {
        let payload = match &frame.body {
            ArchivedBody::Telemetry { payload } => payload.as_slice().to_vec(),
            _ => return,
        };
        self.telemetry.push(TelemetryRow {
            device: frame.device.as_str().to_owned(),
            received_us: frame.received_time_us.to_native(),
            id: Uuid::from_bytes(frame.id.0),
            channel: frame.channel.as_str().to_owned(),
            device_time_us: frame.device_time_us(),
            origin: frame.origin.as_str().to_owned(),
            json: jsonb_ok(&payload),
            payload,
        });
    }

    /// Adds a derived frame.
    pub fn derived(&mut self, frame: &Frame) {
        let id = Uuid::from_bytes(frame.id.0);
        let (severity, message, body) = match &frame.body {
            Body::Telemetry { .. } => return,
            Body::Aggregate(a) => {
                self.aggregates.push(AggregateRow {
                    device: frame.device.clone(),
                    received_us: frame.received_time_us,
                    channel: frame.channel.clone(),
                    field: a.field.clone(),
                    start_us: a.window_start_us,
                    end_us: a.window_end_us,
                    count: i64::try_from(a.count).unwrap_or(i64::MAX),
                    sum: a.sum,
                    min: a.min,
                    max: a.max,
                    mean: a.mean,
                    variance: a.variance,
                    id,
                    origin: frame.origin.clone(),
                });
                return;
            }
            Body::State { json } | Body::Event { json } => (None, None, json.clone()),
            Body::Alert { severity, message, json } => {
                let severity = match severity {
                    Severity::Info => "info",
                    Severity::Warning => "warning",
                    Severity::Critical => "critical",
                };
                (Some(severity), Some(message.clone()), json.clone())
            }
            Body::Error { message } => (None, Some(message.clone()), Vec::new()),
        };
        self.events.push(EventRow {
            device: frame.device.clone(),
            received_us: frame.received_time_us,
            id,
            kind: frame.kind().as_str(),
            channel: frame.channel.clone(),
            producer: frame.producer.clone(),
            seq: i64::try_from(frame.seq).unwrap_or(i64::MAX),
            device_time_us: frame.device_time_us,
            origin: frame.origin.clone(),
            severity,
            message,
            json: jsonb_ok(&body),
            body,
        });
    }

    /// The first and second halves of each table's rows.
    pub(super) fn halves(&self) -> (Rows, Rows) {
        let (t1, t2) = self.telemetry.split_at(self.telemetry.len() / 2);
        let (e1, e2) = self.events.split_at(self.events.len() / 2);
        let (a1, a2) = self.aggregates.split_at(self.aggregates.len() / 2);
        (
            Rows { telemetry: t1.to_vec(), events: e1.to_vec(), aggregates: a1.to_vec() },
            Rows { telemetry: t2.to_vec(), events: e2.to_vec(), aggregates: a2.to_vec() },
        )
    }

    pub(super) fn append(&mut self, other: Rows) {
        self.telemetry.extend(other.telemetry);
        self.events.extend(other.events);
        self.aggregates.extend(other.aggregates);
    }
}

/// A time in µs since the Unix epoch (negative: before it).
pub fn system_time(us: i64) -> SystemTime {
    if us >= 0 {
        UNIX_EPOCH + Duration::from_micros(us.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonb_takes_json_without_nul_escapes() {
        assert!(jsonb_ok(br#"{"t":21.5}"#));
        assert!(jsonb_ok(b"[1,2]"));
        assert!(!jsonb_ok(br#"{"s":"a\u0000b"}"#));
        assert!(!jsonb_ok(b"\x01\x02binary"));
        assert!(!jsonb_ok(b""));
        assert!(!jsonb_ok(b"{\"t\":1} trailing"));
    }

    #[test]
    fn system_time_round_trips_microseconds() {
        for us in [0i64, 1, -1, 1_763_800_000_123_456, -86_400_000_000] {
            let t = system_time(us);
            let back = match t.duration_since(UNIX_EPOCH) {
                Ok(d) => d.as_micros() as i64,
                Err(e) => -(e.duration().as_micros() as i64),
            };
            assert_eq!(back, us);
        }
    }
}
