//! Per-device tumbling-window aggregation of numeric fields.
//!
//! For every telemetry message whose payload is JSON, each numeric field
//! (the top-level numbers of an object, or the payload itself if it is a
//! number, as field `value`) goes into one window per configured size:
//! `[start, start + size)` with `start = floor(t / size) * size`, where `t`
//! is the message's event time (the device's timestamp if it sent one, else
//! the time the mesh received it). A window keeps count, sum, min, max, and
//! mean and variance by Welford's method.
//!
//! Windows close by event time. Each device has a watermark, the largest
//! event time it has sent; a window closes once the watermark reaches its
//! end plus the allowed lateness, and is emitted as an aggregate frame. A
//! value whose window has already closed is late: it is counted (in the
//! device's `late` count and `fluxmesh_agg_late_total`), never added to a
//! window that was already emitted. A device that stops sending keeps its
//! last windows open until it sends again.
//!
//! Everything here depends only on the messages and their order, never on
//! the clock, and the open windows are part of the device's checkpoint: a
//! new owner that replays from the checkpoint closes the same windows with
//! the same values, and the aggregate frame's id is computed from the
//! window itself (device, channel, field, start, end), so a replayed
//! aggregate is deduplicated by JetStream.

use fluxmesh_schemas::frame::Aggregate;
use fluxmesh_schemas::{Body, Frame, FrameId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The producer name on aggregate frames.
pub const PRODUCER: &str = "agg";

/// The `[aggregation]` config section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregationConfig {
    /// Tumbling window sizes, in milliseconds; each numeric field is
    /// aggregated once per size. Empty turns aggregation off.
    pub windows_ms: Vec<u64>,
    /// How far behind a device's newest event time a value may arrive and
    /// still count in its window.
    pub allowed_lateness_ms: u64,
    /// Open windows one device may have (channels x fields x sizes x
    /// windows not yet closed); values that would open more are counted as
    /// `overflow` and not aggregated.
    pub max_open_windows_per_device: usize,
}

impl Default for AggregationConfig {
    fn default() -> Self {
        AggregationConfig { windows_ms: vec![60_000], allowed_lateness_ms: 5_000, max_open_windows_per_device: 256 }
    }
}

impl AggregationConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.windows_ms.iter().any(|&w| !(10..=86_400_000 * 31).contains(&w)) {
            problems.push("aggregation.windows_ms: each size must be between 10 ms and 31 days".to_owned());
        }
        if self.max_open_windows_per_device == 0 {
            problems.push("aggregation.max_open_windows_per_device: must be at least 1".to_owned());
        }
        problems
    }

    /// The window sizes in microseconds, sorted and without repeats.
    pub fn sizes_us(&self) -> Vec<i64> {
        let mut sizes: Vec<i64> =
            self.windows_ms.iter().map(|&ms| i64::try_from(ms * 1000).unwrap_or(i64::MAX)).collect();
        sizes.sort_unstable();
        sizes.dedup();
        sizes
    }
}

/// The aggregation settings a worker runs with (sizes pre-converted).
#[derive(Debug, Clone)]
pub struct Aggregation {
    pub sizes_us: Vec<i64>,
    pub lateness_us: i64,
    pub max_open: usize,
}

impl From<&AggregationConfig> for Aggregation {
    fn from(cfg: &AggregationConfig) -> Self {
        Aggregation {
            sizes_us: cfg.sizes_us(),
            lateness_us: i64::try_from(cfg.allowed_lateness_ms.saturating_mul(1000)).unwrap_or(i64::MAX),
            max_open: cfg.max_open_windows_per_device,
        }
    }
}

/// A device's open windows and watermark: part of its checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Windows {
    /// The largest event time seen (µs); `i64::MIN` before the first value.
    #[serde(default = "min_time")]
    pub watermark_us: i64,
    /// Values that arrived after their window had closed.
    #[serde(default)]
    pub late: u64,
    /// Values not aggregated because the device had too many open windows.
    #[serde(default)]
    pub overflow: u64,
    /// Open windows, in no particular order.
    #[serde(default)]
    pub open: Vec<Window>,
}

fn min_time() -> i64 {
    i64::MIN
}

impl Default for Windows {
    fn default() -> Self {
        Windows { watermark_us: i64::MIN, late: 0, overflow: 0, open: Vec::new() }
    }
}

/// One open window of one field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub channel: String,
    pub field: String,
    pub start_us: i64,
    pub size_us: i64,
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    /// Sum of squared differences from the mean (Welford's M2).
    pub m2: f64,
}

impl Window {
    fn new(channel: &str, field: &str, start_us: i64, size_us: i64) -> Self {
        Window {
            channel: channel.to_owned(),
            field: field.to_owned(),
            start_us,
            size_us,
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            mean: 0.0,
            m2: 0.0,
        }
    }

    pub fn end_us(&self) -> i64 {
        self.start_us.saturating_add(self.size_us)
    }

    /// Welford's update.
    #[inline]
    pub fn add(&mut self, x: f64) {
        self.count += 1;
        self.sum += x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        let delta = x - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (x - self.mean);
    }

    fn is(&self, channel: &str, field: &str, start_us: i64, size_us: i64) -> bool {
        self.start_us == start_us && self.size_us == size_us && self.field == field && self.channel == channel
    }

    fn sort_key(&self) -> (i64, i64, &str, &str) {
        (self.start_us, self.size_us, self.channel.as_str(), self.field.as_str())
    }

    /// The closed window as a frame body.
    pub fn aggregate(&self) -> Aggregate {
        Aggregate {
            field: self.field.clone(),
            window_start_us: self.start_us,
            window_end_us: self.end_us(),
            count: self.count,
            sum: self.sum,
            min: self.min,
            max: self.max,
            mean: self.mean,
            variance: if self.count == 0 { 0.0 } else { self.m2 / self.count as f64 },
        }
    }
}

/// The start of the `size_us` window holding `t` (floor, also for times
/// before the epoch).
fn window_start(t: i64, size_us: i64) -> i64 {
    t.div_euclid(size_us).saturating_mul(size_us)
}

/// The numeric fields of a JSON payload: top-level numbers of an object,
/// or the payload itself as `value`.
pub fn numeric_fields(payload: &Value) -> Vec<(&str, f64)> {
    match payload {
        Value::Object(map) => map.iter().filter_map(|(k, v)| v.as_f64().map(|x| (k.as_str(), x))).collect(),
        Value::Number(n) => n.as_f64().map(|x| vec![("value", x)]).unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// What one message did to a device's windows.
#[derive(Debug, Default, PartialEq)]
pub struct Update {
    pub added: u64,
    pub late: u64,
    pub overflow: u64,
    /// Windows closed by this message, in (start, size, channel, field)
    /// order.
    pub closed: Vec<Window>,
}

impl Windows {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `fields` of a message on `channel` with event time `t`, then
    /// closes the windows the (possibly advanced) watermark has passed.
    pub fn update(&mut self, cfg: &Aggregation, channel: &str, fields: &[(&str, f64)], t: i64) -> Update {
        let mut update = Update::default();
        for &size in &cfg.sizes_us {
            let start = window_start(t, size);
            let end = start.saturating_add(size);
            if self.watermark_us != i64::MIN && end.saturating_add(cfg.lateness_us) <= self.watermark_us {
                update.late += fields.len() as u64;
                continue;
            }
            for &(field, x) in fields {
                if let Some(w) = self.open.iter_mut().find(|w| w.is(channel, field, start, size)) {
                    w.add(x);
                    update.added += 1;
                } else if self.open.len() < cfg.max_open {
                    let mut w = Window::new(channel, field, start, size);
                    w.add(x);
                    self.open.push(w);
                    update.added += 1;
                } else {
                    update.overflow += 1;
                }
            }
        }
        self.late += update.late;
        self.overflow += update.overflow;
        if t > self.watermark_us {
            self.watermark_us = t;
            update.closed = self.close(cfg.lateness_us);
        }
        update
    }

    /// Removes and returns the windows whose end plus `lateness_us` the
    /// watermark has reached.
    fn close(&mut self, lateness_us: i64) -> Vec<Window> {
        let watermark = self.watermark_us;
        if !self.open.iter().any(|w| w.end_us().saturating_add(lateness_us) <= watermark) {
            return Vec::new();
        }
        let (mut closed, open): (Vec<Window>, Vec<Window>) =
            self.open.drain(..).partition(|w| w.end_us().saturating_add(lateness_us) <= watermark);
        self.open = open;
        closed.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        closed
    }
}

/// The aggregate frame of a closed window. Its id names the window, so
/// closing it again after a replay gives the same id.
pub fn frame(device: &str, window: &Window, received_time_us: i64, origin: &str, seq: u64) -> Frame {
    let mut key = Vec::with_capacity(64 + device.len() + window.channel.len() + window.field.len());
    for part in [PRODUCER, device, window.channel.as_str(), window.field.as_str()] {
        key.extend_from_slice(&(part.len() as u64).to_le_bytes());
        key.extend_from_slice(part.as_bytes());
    }
    key.extend_from_slice(&window.start_us.to_le_bytes());
    key.extend_from_slice(&window.end_us().to_le_bytes());
    Frame {
        id: FrameId::from_key(&key),
        device: device.to_owned(),
        channel: window.channel.clone(),
        device_time_us: None,
        received_time_us,
        origin: origin.to_owned(),
        producer: PRODUCER.to_owned(),
        seq,
        body: Body::Aggregate(window.aggregate()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(sizes_ms: &[u64], lateness_ms: u64) -> Aggregation {
        Aggregation::from(&AggregationConfig {
            windows_ms: sizes_ms.to_vec(),
            allowed_lateness_ms: lateness_ms,
            max_open_windows_per_device: 16,
        })
    }

    const S: i64 = 1_000_000;

    #[test]
    fn welford_matches_the_two_pass_figures() {
        let xs = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        let mut w = Window::new("c", "f", 0, 1);
        xs.iter().for_each(|&x| w.add(x));
        let a = w.aggregate();
        assert_eq!((a.count, a.sum, a.min, a.max, a.mean), (8, 40.0, 2.0, 9.0, 5.0));
        assert!((a.variance - 4.0).abs() < 1e-12, "population variance {}", a.variance);
    }

    #[test]
    fn a_window_closes_once_the_watermark_passes_end_plus_lateness() {
        let c = cfg(&[10_000], 2_000);
        let mut w = Windows::new();
        assert!(w.update(&c, "t", &[("v", 1.0)], 0).closed.is_empty());
        assert!(w.update(&c, "t", &[("v", 3.0)], 9 * S).closed.is_empty());
        // Next window, but within the lateness of the first: still open.
        assert!(w.update(&c, "t", &[("v", 10.0)], 11 * S).closed.is_empty());
        // A late value for the first window, inside the lateness: counted.
        assert_eq!(w.update(&c, "t", &[("v", 5.0)], 8 * S).added, 1);
        let u = w.update(&c, "t", &[("v", 10.0)], 12 * S);
        assert_eq!(u.closed.len(), 1);
        let a = u.closed[0].aggregate();
        assert_eq!((a.window_start_us, a.window_end_us, a.count, a.sum), (0, 10 * S, 3, 9.0));
        // Too late now: counted as late, not aggregated.
        let u = w.update(&c, "t", &[("v", 100.0)], 5 * S);
        assert_eq!((u.added, u.late), (0, 1));
        assert_eq!(w.late, 1);
    }

    #[test]
    fn several_sizes_and_fields_close_in_a_stable_order() {
        let c = cfg(&[1_000, 2_000], 0);
        let mut w = Windows::new();
        w.update(&c, "t", &[("b", 1.0), ("a", 2.0)], 0);
        let u = w.update(&c, "t", &[("a", 1.0)], 2 * S);
        let order: Vec<_> = u.closed.iter().map(|w| (w.start_us, w.size_us, w.field.as_str())).collect();
        assert_eq!(order, [(0, S, "a"), (0, S, "b"), (0, 2 * S, "a"), (0, 2 * S, "b")]);
    }

    #[test]
    fn too_many_open_windows_overflow_and_are_counted() {
        let c = Aggregation { sizes_us: vec![S], lateness_us: 0, max_open: 2 };
        let mut w = Windows::new();
        let u = w.update(&c, "t", &[("a", 1.0), ("b", 1.0), ("c", 1.0)], 0);
        assert_eq!((u.added, u.overflow), (2, 1));
    }

    #[test]
    fn a_checkpoint_round_trip_keeps_every_bit() {
        // Means and M2s are not short decimals; JSON must still give back
        // the same f64s, or a new owner's aggregates drift by an ULP
        // (serde_json's `float_roundtrip`).
        let c = Aggregation { sizes_us: vec![S], lateness_us: 0, max_open: 1000 };
        let mut w = Windows::new();
        for i in 0..500 {
            let field = format!("f{}", i % 50);
            w.update(&c, "t", &[(field.as_str(), (i as f64 * 0.7311).sin() * 1e3 / 7.0)], 0);
        }
        let json = serde_json::to_vec(&w).expect("serialize");
        let back: Windows = serde_json::from_slice(&json).expect("deserialize");
        for (a, b) in w.open.iter().zip(&back.open) {
            assert_eq!(
                (a.mean.to_bits(), a.m2.to_bits(), a.sum.to_bits()),
                (b.mean.to_bits(), b.m2.to_bits(), b.sum.to_bits())
            );
        }
        assert_eq!(back, w);
    }

    #[test]
    fn negative_times_floor_to_their_window() {
        assert_eq!(window_start(-1, 10), -10);
        assert_eq!(window_start(10, 10), 10);
    }

    #[test]
    fn the_frame_id_names_the_window_not_the_input() {
        let mut w = Window::new("t", "v", 0, S);
        w.add(1.0);
        assert_eq!(frame("d", &w, 5, "n1", 1).id, frame("d", &w, 9, "n2", 3).id);
        let other = Window::new("t", "v", S, S);
        assert_ne!(frame("d", &w, 5, "n", 1).id, frame("d", &other, 5, "n", 1).id);
    }

    #[test]
    fn fields_are_top_level_numbers() {
        let v: Value = serde_json::json!({"t": 21.5, "h": 40, "s": "x", "n": {"x": 1}});
        let mut f = numeric_fields(&v);
        f.sort_by(|a, b| a.0.cmp(b.0));
        assert_eq!(f, [("h", 40.0), ("t", 21.5)]);
        assert_eq!(numeric_fields(&serde_json::json!(3)), [("value", 3.0)]);
    }
}
