//! The run's report. `--report text` (the default) prints lines for people
//! on stdout as the run goes. `--report json` prints the same lines on
//! stderr instead, and at the end ONE JSON object on stdout with every
//! figure of the text, for scripts: [`Report`], whose field names (and
//! those of the types it holds) are the JSON's. What a run did not measure
//! is `null`, not left out. A run that fails prints no JSON and exits
//! non-zero.

use crate::measurement::Outcome;
use crate::verification::{ProcessingVerified, Verified};
use serde::Serialize;

/// `--report`: what goes to stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Text,
    Json,
}

impl ReportFormat {
    /// Where the text lines go: stdout, unless the JSON has it.
    pub fn text_out(self) -> TextOut {
        match self {
            ReportFormat::Text => TextOut::Stdout,
            ReportFormat::Json => TextOut::Stderr,
        }
    }
}

/// Where the text report's lines go.
#[derive(Clone, Copy, Debug)]
pub enum TextOut {
    Stdout,
    Stderr,
}

impl TextOut {
    pub fn line(self, line: std::fmt::Arguments<'_>) {
        match self {
            TextOut::Stdout => println!("{line}"),
            TextOut::Stderr => eprintln!("{line}"),
        }
    }
}

/// `--report json`: the whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The run as asked for (the text's first line).
    pub run: RunInfo,
    /// Devices over MQTT to the nodes (the text's `[mesh]` lines).
    pub mesh: Outcome,
    /// With `--verify` (`verify:` lines).
    pub verify: Option<Verified>,
    /// With `--verify-processing` (the `verify_processing:` line).
    pub verify_processing: Option<ProcessingVerified>,
    /// With `--peer jetstream`: the same load straight to JetStream
    /// (`[jetstream]` lines).
    pub jetstream: Option<Outcome>,
    /// With `--peer jetstream`: mesh / jetstream (`[ratio]` lines).
    pub ratio: Option<Ratio>,
}

/// The load asked for.
#[derive(Debug, Serialize)]
pub struct RunInfo {
    pub devices: usize,
    pub qos: u8,
    pub payload_bytes: usize,
    /// msg/s over all devices; 0: as fast as accepted.
    pub target_rate: u64,
    pub duration_s: u64,
    /// Devices connect over TLS.
    pub mqtt_tls: bool,
    /// `secret` (every device logs in) or `anonymous`.
    pub device_auth: &'static str,
}

impl RunInfo {
    pub fn print(&self, out: TextOut) {
        out.line(format_args!(
            "devices={} qos={} payload={}B target_rate={}/s duration={}s mqtt_tls={} device_auth={}",
            self.devices,
            self.qos,
            self.payload_bytes,
            self.target_rate,
            self.duration_s,
            if self.mqtt_tls { "on" } else { "off" },
            self.device_auth,
        ));
    }
}

/// The mesh's figures over the peer's; each null where either side did
/// not measure it.
#[derive(Debug, Serialize)]
pub struct Ratio {
    pub delivered_rate: Option<f64>,
    pub latency_p50: Option<f64>,
    pub latency_p99: Option<f64>,
}

impl Ratio {
    pub fn new(mesh: &Outcome, peer: &Outcome) -> Self {
        let latency = mesh.latency_us.as_ref().zip(peer.latency_us.as_ref());
        Ratio {
            delivered_rate: mesh.delivered_rate.zip(peer.delivered_rate).map(|(m, p)| m / p.max(1.0)),
            latency_p50: latency.map(|(m, p)| m.p50 as f64 / p.p50.max(1) as f64),
            latency_p99: latency.map(|(m, p)| m.p99 as f64 / p.p99.max(1) as f64),
        }
    }

    pub fn print(&self, out: TextOut) {
        if let Some(rate) = self.delivered_rate {
            out.line(format_args!("[ratio] mesh/jetstream delivered_rate={rate:.2}"));
        }
        if let (Some(p50), Some(p99)) = (self.latency_p50, self.latency_p99) {
            out.line(format_args!("[ratio] mesh/jetstream p50={p50:.2} p99={p99:.2}"));
        }
    }
}
