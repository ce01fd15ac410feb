//! What a run measures: the counters the devices and the subscriber share,
//! the NATS subscriber timing every frame of the run (publish → receipt
//! latency histograms), each device's longest wait for a PUBACK, and the
//! [`Outcome`] made of them, printed as text or serialised into the JSON
//! report (its field names are the JSON's).

use crate::devices::payload_meta;
use crate::report::TextOut;
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub received: AtomicU64,
    /// MQTT reconnects after a failed connection.
    pub reconnects: AtomicU64,
}

pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// The measuring subscriber: it counts every telemetry frame of this run's
/// devices and records, from the send time in its payload, the latency to
/// its arrival here and to the frame's making on a node.
pub struct Subscriber {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<(Histogram<u64>, Histogram<u64>)>,
}

impl Subscriber {
    /// Subscribes to `subject` (None: measures nothing) and counts frames
    /// from devices whose id starts with `{device_prefix}-`.
    pub async fn start(
        nats: &async_nats::Client,
        subject: Option<String>,
        device_prefix: &str,
        counters: Arc<Counters>,
    ) -> anyhow::Result<Self> {
        let mut sub = match subject {
            Some(subject) => Some(nats.subscribe(subject).await?),
            None => None,
        };
        nats.flush().await?;
        let prefix = format!("{device_prefix}-");
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let mut to_frame = hist.clone();
            let mut scratch = fluxmesh_schemas::frame::AlignedVec::new();
            let Some(sub) = sub.as_mut() else { return (hist, to_frame) };
            loop {
                let msg = tokio::select! {
                    _ = &mut stopped => break,
                    msg = sub.next() => match msg { Some(m) => m, None => break },
                };
                let Ok(frame) = fluxmesh_schemas::frame::access(&msg.payload, &mut scratch) else { continue };
                if !frame.device.as_str().starts_with(&prefix) {
                    continue;
                }
                if let fluxmesh_schemas::frame::ArchivedBody::Telemetry { payload } = &frame.body {
                    if let Some((sent, _)) = payload_meta(payload) {
                        let _ = hist.record(now_us().saturating_sub(sent).max(1));
                        let made = u64::try_from(frame.received_time_us.to_native()).unwrap_or(0);
                        let _ = to_frame.record(made.saturating_sub(sent).max(1));
                    }
                }
                counters.received.fetch_add(1, Ordering::Relaxed);
            }
            (hist, to_frame)
        });
        Ok(Subscriber { stop, task })
    }

    /// Stops it; (send → subscriber, send → frame made), None if it
    /// received nothing.
    pub async fn finish(self) -> (Option<Histogram<u64>>, Option<Histogram<u64>>) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok((h, t)) if !h.is_empty() => (Some(h), Some(t)),
            _ => (None, None),
        }
    }
}

/// What one measured run delivered. Serialised as is into the JSON report
/// (`mesh`, `jetstream`); what was not measured is `null`.
#[derive(Debug, Serialize)]
pub struct Outcome {
    /// Messages the devices sent.
    pub sent: u64,
    /// PUBACKs (JetStream acks for the peer) the devices received.
    pub acked: u64,
    /// Messages the subscriber received, the tail after publishing included.
    pub received: u64,
    /// sent - received (everything, without a subscriber).
    pub missing: u64,
    /// Connections that failed and were made again.
    pub reconnects: u64,
    /// Received by the subscriber during publishing / publishing time,
    /// msg/s (null without a subscriber).
    pub delivered_rate: Option<f64>,
    /// Most messages received in one second of publishing, msg/s (null
    /// without a subscriber).
    pub peak_second: Option<u64>,
    /// PUBACKs during publishing / publishing time, msg/s: QoS1 throughput
    /// as the devices see it.
    pub acked_rate: f64,
    /// QoS1 over MQTT: the longest PUBACK gap of any device (see
    /// [`AckGaps`]); null otherwise.
    pub puback_gap: Option<LongestGap>,
    /// Send → the subscriber, µs (null if it received nothing).
    pub latency_us: Option<Latency>,
    /// Send → the frame's `received_time_us` (set where the frame is made).
    pub send_to_frame_us: Option<Quantiles>,
    /// The difference of the two above, quantile by quantile: roughly the
    /// time from the frame's making to the subscriber.
    pub frame_to_subscriber_us: Option<Quantiles>,
    /// Send → the subscriber as a CDF: `[quantile, µs]` pairs from 0.01 to
    /// 1 (null if it received nothing), for plots.
    pub latency_cdf_us: Option<Vec<[f64; 2]>>,
    /// Each second of publishing: what was sent, acked and received in it,
    /// for throughput-over-time plots.
    pub per_second: Vec<Second>,
}

/// One second of a run's publishing (counts in that second).
#[derive(Debug, Clone, Serialize)]
pub struct Second {
    /// Seconds since publishing began, at the end of this one.
    pub t: u64,
    pub sent: u64,
    pub acked: u64,
    pub received: u64,
}

/// The quantiles a CDF is drawn from: every percent, then the tail.
fn cdf(h: &Histogram<u64>) -> Vec<[f64; 2]> {
    let mut qs: Vec<f64> = (1..100).map(|p| f64::from(p) / 100.0).collect();
    qs.extend([0.995, 0.999, 0.9999, 1.0]);
    qs.into_iter().map(|q| [q, h.value_at_quantile(q) as f64]).collect()
}

/// The longest PUBACK gap of a run, and how many devices had one over 1 s.
#[derive(Debug, Serialize)]
pub struct LongestGap {
    pub max_ms: u64,
    /// When it began, ms since the Unix epoch.
    pub from_unix_ms: u64,
    pub device: String,
    pub devices_over_1s: usize,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

#[derive(Debug, Serialize)]
pub struct Quantiles {
    pub p50: u64,
    pub p99: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        Latency { p50: h.value_at_quantile(0.5), p99: h.value_at_quantile(0.99), max: h.max() }
    }
}

impl Outcome {
    /// The figures of a run: `counters` at the end, `at_stop` (received,
    /// acked) when publishing stopped after `publish_secs`, the most
    /// received in one second (None without a subscriber), the
    /// subscriber's histograms (send → subscriber, send → frame).
    pub fn new(
        counters: &Counters,
        at_stop: (u64, u64),
        publish_secs: f64,
        peak: Option<u64>,
        hists: (Option<Histogram<u64>>, Option<Histogram<u64>>),
        puback_gap: Option<LongestGap>,
        per_second: Vec<Second>,
    ) -> Self {
        let (sent, received) = (counters.sent.load(Ordering::Relaxed), counters.received.load(Ordering::Relaxed));
        let latency_us = hists.0.as_ref().map(Latency::of);
        let send_to_frame_us =
            hists.1.as_ref().map(|t| Quantiles { p50: t.value_at_quantile(0.5), p99: t.value_at_quantile(0.99) });
        let frame_to_subscriber_us = match (&latency_us, &send_to_frame_us) {
            (Some(h), Some(t)) => {
                Some(Quantiles { p50: h.p50.saturating_sub(t.p50), p99: h.p99.saturating_sub(t.p99) })
            }
            _ => None,
        };
        Outcome {
            sent,
            acked: counters.acked.load(Ordering::Relaxed),
            received,
            missing: sent.saturating_sub(received),
            reconnects: counters.reconnects.load(Ordering::Relaxed),
            delivered_rate: peak.is_some().then(|| at_stop.0 as f64 / publish_secs),
            peak_second: peak,
            acked_rate: at_stop.1 as f64 / publish_secs,
            puback_gap,
            latency_us,
            send_to_frame_us,
            frame_to_subscriber_us,
            latency_cdf_us: hists.0.as_ref().map(cdf),
            per_second,
        }
    }

    /// The text report's `[label]` lines.
    pub fn print(&self, label: &str, out: TextOut) {
        out.line(format_args!(
            "[{label}] sent={} acked={} received={} missing={} reconnects={}",
            self.sent, self.acked, self.received, self.missing, self.reconnects
        ));
        match (self.delivered_rate, self.peak_second) {
            (Some(rate), Some(peak)) => out.line(format_args!(
                "[{label}] delivered_rate={rate:.0} msg/s (received during publishing / publishing time), peak_second={peak} msg/s"
            )),
            _ => out.line(format_args!("[{label}] delivered_rate: not measured (--no-subscriber)")),
        }
        out.line(format_args!(
            "[{label}] acked_rate={:.0} msg/s (PUBACKs during publishing / publishing time)",
            self.acked_rate
        ));
        if let Some(g) = &self.puback_gap {
            out.line(format_args!(
                "[{label}] max_puback_gap_ms={} device={} from_unix_ms={} devices_over_1s={} (longest time a device went without a PUBACK while publishing)",
                g.max_ms, g.device, g.from_unix_ms, g.devices_over_1s
            ));
        }
        if let Some(h) = &self.latency_us {
            out.line(format_args!("[{label}] latency_us p50={} p99={} max={}", h.p50, h.p99, h.max));
        }
        if let (Some(t), Some(f)) = (&self.send_to_frame_us, &self.frame_to_subscriber_us) {
            out.line(format_args!(
                "[{label}]   of which send->frame made p50={} p99={}; frame made->subscriber p50~{} p99~{}",
                t.p50, t.p99, f.p50, f.p99,
            ));
        }
    }
}

/// The longest gap over all devices.
pub fn longest_gap(gaps: &[(String, Arc<AckGaps>)]) -> Option<LongestGap> {
    let all: Vec<_> = gaps.iter().map(|(id, g)| (g.longest(), id)).collect();
    let devices_over_1s = all.iter().filter(|((gap, _), _)| *gap > 1_000_000).count();
    let ((gap_us, from_us), device) = all.into_iter().max_by_key(|((gap, _), _)| *gap)?;
    Some(LongestGap { max_ms: gap_us / 1000, from_unix_ms: from_us / 1000, device: device.clone(), devices_over_1s })
}

/// The longest time one QoS1 device went without a PUBACK while it was
/// publishing: from its first CONNACK to its first PUBACK, between
/// consecutive PUBACKs, and from its last PUBACK to the end of publishing
/// if none came since (a PUBACK after the end closes that gap at its full
/// length). Connecting and authenticating the first time, and gaps that
/// begin after publishing ended (the tail), do not count. A node that stalls ingest, or a device that must reconnect,
/// shows up here; the floor is the device's own interval between messages
/// (1 / its rate).
#[derive(Default)]
pub struct AckGaps(Mutex<GapState>);

#[derive(Default)]
struct GapState {
    /// The last PUBACK, or the first CONNACK (µs since the Unix epoch).
    last_us: Option<u64>,
    /// When publishing ended, once it has.
    ended_us: Option<u64>,
    /// The longest gap and when it began (µs).
    longest: (u64, u64),
}

impl GapState {
    fn close_at(&mut self, at_us: u64) {
        if let Some(last) = self.last_us {
            if self.ended_us.is_none_or(|end| last < end) && at_us.saturating_sub(last) > self.longest.0 {
                self.longest = (at_us - last, last);
            }
        }
    }
}

impl AckGaps {
    /// The device is connected (only its first CONNACK counts).
    pub fn connected(&self) {
        if let Ok(mut s) = self.0.lock() {
            s.last_us.get_or_insert_with(now_us);
        }
    }

    /// A PUBACK arrived.
    pub fn ack(&self) {
        if let Ok(mut s) = self.0.lock() {
            let now = now_us();
            s.close_at(now);
            s.last_us = Some(now);
        }
    }

    /// Publishing ended at `at_us`: a gap still open counts up to then.
    pub fn end(&self, at_us: u64) {
        if let Ok(mut s) = self.0.lock() {
            s.close_at(at_us);
            s.ended_us = Some(at_us);
        }
    }

    /// (longest gap, when it began), µs.
    fn longest(&self) -> (u64, u64) {
        self.0.lock().map(|s| s.longest).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn puback_gaps_count_while_publishing_only() {
        let mut s = GapState::default();
        // Nothing counts before the first CONNACK.
        s.close_at(1_000);
        assert_eq!(s.longest, (0, 0));
        s.last_us = Some(1_000);
        s.close_at(1_500);
        s.last_us = Some(1_500);
        s.close_at(4_000); // a 2.5 ms gap from 1.5 ms
        s.last_us = Some(4_000);
        assert_eq!(s.longest, (2_500, 1_500));
        // Publishing ends at 5 ms; the gap still open counts to then, and
        // the PUBACK that closes it later counts at its full length.
        s.ended_us = Some(5_000);
        s.close_at(7_000);
        assert_eq!(s.longest, (3_000, 4_000));
        s.last_us = Some(7_000);
        // After the end, new gaps do not count.
        s.close_at(20_000);
        assert_eq!(s.longest, (3_000, 4_000));
    }
}
