//! The load generator's command line and the checks on it: every target a
//! loopback address, sizes and durations in bounds, and the NATS client
//! options the flags ask for.

use crate::devices::JSON_MIN;
use crate::report::ReportFormat;
use anyhow::bail;
use clap::Parser;
use rumqttc::QoS;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(about = "Simulated MQTT devices; measures delivery to a NATS subscriber")]
pub struct Args {
    /// Node MQTT listeners (host:port); devices are spread over them.
    #[arg(long, required = true, value_delimiter = ',')]
    pub mqtt: Vec<SocketAddr>,
    /// NATS servers for the measuring subscriber.
    #[arg(long, default_value = "nats://127.0.0.1:4222", value_delimiter = ',')]
    pub nats: Vec<String>,
    /// Devices connect with MQTT over TLS, checking the nodes' certificate
    /// against this PEM CA bundle (server name: the --mqtt host).
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// MQTT password of every device (its user name is its client id).
    #[arg(long, env = "FLUXMESH_DEVICE_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// NATS user of the subscriber (and verifier), with --nats-password.
    #[arg(long, env = "FLUXMESH_NATS_USER")]
    nats_user: Option<String>,
    #[arg(long, env = "FLUXMESH_NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// Connect to NATS over TLS only, checking the servers' certificate
    /// against this PEM CA bundle.
    #[arg(long, value_name = "PEM")]
    nats_ca: Option<PathBuf>,
    /// Subject the subscriber measures.
    #[arg(long, default_value = "fm.tel.>")]
    pub subject: String,
    /// Simulated devices (one MQTT connection each).
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Target total publish rate in msg/s; 0 publishes as fast as the
    /// broker accepts.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// MQTT QoS: 0 or 1.
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// Payload size in bytes (at least 16).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Send JSON payloads, `{"sent_us":"…","seq":"…","t":…,"pad":"…"}`,
    /// padded to --payload bytes (at least 80), instead of binary ones: so
    /// rules and aggregation have fields to work on. `t` cycles 0.5 … 59.5.
    #[arg(long)]
    pub json: bool,
    /// Seconds of publishing (at most 600).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Device id prefix.
    #[arg(long, default_value = "load")]
    pub prefix: String,
    /// After the run, read the telemetry stream back and count PUBACKed
    /// messages that are not in it (QoS1 only).
    #[arg(long)]
    pub verify: bool,
    /// The telemetry stream to read for --verify; by default every
    /// partition's stream (`{PREFIX}_TEL_{p}`, as the cluster agreed).
    #[arg(long)]
    pub stream: Option<String>,
    /// With --verify: also check that the shard workers applied every
    /// stored message exactly once (device states in the shards'
    /// checkpoint logs, `{PREFIX}_CKPT`) and
    /// derived every state frame exactly once (`{PREFIX}_EVT`, seq 1..n).
    #[arg(long)]
    pub verify_processing: bool,
    /// Shards in the cluster (for the state keys).
    #[arg(long, default_value_t = 64)]
    pub shards: u32,
    /// Subject prefix the nodes publish under (for --peer jetstream).
    #[arg(long, default_value = "fm")]
    pub subject_prefix: String,
    /// After the mesh run, run the same load against a peer in the same
    /// process and print the ratio. `jetstream`: every simulated device
    /// publishes its frames straight to JetStream with async-nats (same
    /// subjects, headers and ack window as a node), with no MQTT and no
    /// node: the floor the mesh's latency and ceiling its rate can reach.
    #[arg(long, value_parser = ["jetstream"], conflicts_with = "no_subscriber")]
    pub peer: Option<String>,
    /// Run no measuring subscriber: only the devices' PUBACKs are counted
    /// (`acked_rate`, QoS1 only), so the measuring tool takes no share of
    /// the machine's CPU or of the mesh's NATS traffic. --verify still
    /// checks the stream after the run.
    #[arg(long)]
    pub no_subscriber: bool,
    /// What goes to stdout at the end: `text`, lines for people; or
    /// `json`, one JSON object with every figure of the text, for scripts
    /// (the text then goes to stderr; field names: report.rs, README).
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    pub report: ReportFormat,
}

/// Where load may go: loopback, or a local cluster in network namespaces
/// (`deploy/local/cluster up --netns`: 10.213.0.0/24 behind the bridge
/// `fm-br0`, which must exist here, so the addresses are this machine's).
fn local_target(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) if v4.octets()[..3] == [10, 213, 0] => {
            std::path::Path::new("/sys/class/net/fm-br0").exists()
        }
        other => other.is_loopback(),
    }
}

impl Args {
    /// Checks what clap cannot; the QoS the devices publish at.
    pub fn check(&self) -> anyhow::Result<QoS> {
        if let Some(a) = self.mqtt.iter().find(|a| !local_target(a.ip())) {
            bail!("{a}: load goes to loopback addresses (or a namespaced local cluster's) only");
        }
        for url in &self.nats {
            let host = nats_host(url);
            if !(host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(local_target)) {
                bail!("{url}: load goes to loopback addresses (or a namespaced local cluster's) only");
            }
        }
        if self.duration == 0 || self.duration > 600 {
            bail!("--duration must be 1..=600 seconds");
        }
        if self.json && self.payload < JSON_MIN {
            bail!("--json needs --payload of at least {JSON_MIN} bytes");
        }
        if self.payload < 16 || self.payload > 1024 * 1024 {
            bail!("--payload must be 16..=1048576 bytes");
        }
        if self.devices == 0 {
            bail!("--devices must be at least 1");
        }
        let qos = match self.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => bail!("--qos must be 0 or 1"),
        };
        if self.no_subscriber && qos != QoS::AtLeastOnce {
            bail!("--no-subscriber measures PUBACKs: it needs --qos 1");
        }
        Ok(qos)
    }

    /// The devices' secret, if one is set (an empty one is none).
    pub fn secret(&self) -> Option<String> {
        non_empty(&self.secret)
    }

    /// The NATS servers, and the options for the subscriber's (and
    /// verifier's) connection to them: user, TLS.
    pub fn nats_options(&self) -> anyhow::Result<(Vec<async_nats::ServerAddr>, async_nats::ConnectOptions)> {
        let addrs = self.nats.iter().map(|u| u.parse::<async_nats::ServerAddr>()).collect::<Result<Vec<_>, _>>()?;
        let mut options = async_nats::ConnectOptions::new().subscription_capacity(1 << 20);
        match (non_empty(&self.nats_user), non_empty(&self.nats_password)) {
            (Some(user), password) => options = options.user_and_password(user, password.unwrap_or_default()),
            (None, Some(_)) => bail!("--nats-password needs --nats-user"),
            (None, None) => {}
        }
        if let Some(ca) = &self.nats_ca {
            if !ca.is_file() {
                bail!("--nats-ca {}: not a file", ca.display());
            }
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        Ok((addrs, options))
    }
}

fn non_empty(s: &Option<String>) -> Option<String> {
    s.clone().filter(|s| !s.is_empty())
}

/// The host of a NATS URL (`[scheme://][user:pass@]host[:port]`).
fn nats_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host = match rest.rsplit_once(':') {
        Some((h, port)) if !port.contains(']') => h,
        _ => rest,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_hosts() {
        assert_eq!(nats_host("nats://127.0.0.1:4222"), "127.0.0.1");
        assert_eq!(nats_host("tls://localhost:4222"), "localhost");
        assert_eq!(nats_host("nats://u:p@127.0.0.1:4222"), "127.0.0.1");
        assert_eq!(nats_host("127.0.0.1"), "127.0.0.1");
        assert_eq!(nats_host("tls://[::1]:4222"), "::1");
        assert_eq!(nats_host("10.0.0.1:4222"), "10.0.0.1");
    }
}
