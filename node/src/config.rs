//! Node configuration: built-in defaults, then a TOML file, then
//! `FLUXMESH_{SECTION}_{KEY}` environment variables. Unknown keys are
//! errors, and every problem is reported at once.

use crate::auth::AuthConfig;
use crate::commands::CommandsConfig;
pub use crate::http::HttpConfig;
pub use crate::ingress::IngestConfig;
pub use crate::mqtt::MqttConfig;
use crate::plugins::PluginsConfig;
use crate::processing::aggregate::AggregationConfig;
use crate::rules::RulesConfig;
use crate::shards::ShardsConfig;
use crate::storage::StorageConfig;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use fluxmesh_mesh::cluster::ClusterConfig;
use fluxmesh_mesh::NatsConfig;
use fluxmesh_schemas::subject::Family;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The whole node config. `configs/node.toml` is this with every default
/// written out and commented.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's name in the cluster; empty picks `node-{random}` at start.
    pub node_id: String,
    pub nats: NatsConfig,
    pub cluster: ClusterConfig,
    pub shards: ShardsConfig,
    pub commands: CommandsConfig,
    pub rules: RulesConfig,
    pub plugins: PluginsConfig,
    pub aggregation: AggregationConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub ingest: IngestConfig,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
}

/// The async runtime the binary runs the node on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Worker threads; 0 = one per CPU core. When several nodes share a
    /// machine (the local cluster), fewer threads per node mean fewer
    /// context switches: on 2 cores, 1 thread used ~10% less CPU per
    /// message than 2.
    pub worker_threads: usize,
    /// Let the kernel back the node's heap with transparent huge pages.
    /// Off (the default), the node turns them off for its own process at
    /// start (`prctl(PR_SET_THP_DISABLE)`): with them, each node held
    /// 15-20 MiB more, and its RSS climbed 2 MiB at a time after every
    /// burst (a catch-up after a NATS failover) as the kernel refilled
    /// partly freed huge pages; they bought at most a few percent of
    /// throughput.
    pub transparent_huge_pages: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `fluxmesh_node=debug,info`;
    /// `RUST_LOG` overrides it.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".to_owned(), format: "text".to_owned() }
    }
}

/// Everything wrong with a config, one problem per line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {} does not exist", path.display())]
    Missing { path: std::path::PathBuf },
    #[error(transparent)]
    Parse(#[from] Box<figment::Error>),
    #[error("invalid config:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

/// Top-level sections; `FLUXMESH_{SECTION}_{KEY}` sets `section.key`.
const SECTIONS: [&str; 14] = [
    "nats",
    "cluster",
    "shards",
    "commands",
    "rules",
    "plugins",
    "aggregation",
    "storage",
    "auth",
    "mqtt",
    "http",
    "ingest",
    "log",
    "runtime",
];
const TOP_LEVEL: [&str; 1] = ["node_id"];

impl Config {
    /// Loads defaults, then `file` (which must exist if given), then the
    /// environment, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(file, Env::prefixed("FLUXMESH_"))
    }

    fn load_with_env(file: Option<&Path>, env: Env) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError::Missing { path: file.to_owned() });
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        let env = env
            .filter(|key| {
                let key = key.as_str().to_ascii_lowercase();
                let key = key.as_str();
                TOP_LEVEL.contains(&key)
                    || SECTIONS.iter().any(|s| key.strip_prefix(s).is_some_and(|r| r.starts_with('_')))
            })
            .map(|key| {
                let key = key.as_str().to_ascii_lowercase();
                let key = key.as_str();
                match SECTIONS.iter().find(|s| key.strip_prefix(**s).is_some_and(|r| r.starts_with('_'))) {
                    Some(section) => format!("{section}.{}", &key[section.len() + 1..]).into(),
                    None => key.to_owned().into(),
                }
            })
            .split(".");
        let config: Config = figment.merge(env).extract().map_err(|e| ConfigError::Parse(Box::new(e)))?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Every problem with this config.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = self.nats.problems();
        problems.extend(self.cluster.problems());
        problems.extend(self.shards.problems());
        problems.extend(self.commands.problems());
        problems.extend(self.rules.problems());
        problems.extend(self.plugins.problems());
        problems.extend(self.aggregation.problems());
        problems.extend(self.storage.problems());
        problems.extend(self.auth.problems());
        if !self.mqtt.tcp_enabled && !self.mqtt.tls_enabled && !self.mqtt.ws_enabled && !self.mqtt.wss_enabled {
            problems.push(
                "mqtt: tcp_enabled, tls_enabled, ws_enabled and wss_enabled are all off; devices could not connect"
                    .to_owned(),
            );
        }
        if self.mqtt.wss_enabled && !self.mqtt.tls_enabled {
            problems.push("mqtt.wss_enabled needs mqtt.tls_enabled (and its certificate and key)".to_owned());
        }
        if self.mqtt.tls_enabled {
            if self.mqtt.tls_cert_file.is_empty() || self.mqtt.tls_key_file.is_empty() {
                problems.push("mqtt.tls_enabled needs mqtt.tls_cert_file and mqtt.tls_key_file".to_owned());
            } else if let Err(e) = crate::tls::server_config(
                &self.mqtt.tls_cert_file,
                &self.mqtt.tls_key_file,
                &self.mqtt.tls_client_ca_file,
            ) {
                problems.push(e.to_string());
            }
        }
        if self.node_id.len() > 64 || self.node_id.contains(|c: char| c.is_whitespace() || c.is_control()) {
            problems.push("node_id: at most 64 characters, no whitespace".to_owned());
        }
        for family in &self.ingest.json_mirror {
            if parse_family(family).is_none() {
                problems.push(format!("ingest.json_mirror: unknown family `{family}` (use \"tel\" or \"evt\")"));
            }
        }
        if self.ingest.max_payload_bytes == 0 || self.ingest.max_payload_bytes > 8 * 1024 * 1024 {
            problems.push("ingest.max_payload_bytes: must be between 1 and 8388608".to_owned());
        }
        if self.mqtt.max_connections == 0 {
            problems.push("mqtt.max_connections: must be at least 1".to_owned());
        }
        if !(10..=60_000).contains(&self.mqtt.session_save_interval_ms) {
            problems.push("mqtt.session_save_interval_ms: must be between 10 and 60000".to_owned());
        }
        if self.mqtt.session_queue == 0 {
            problems.push("mqtt.session_queue: must be at least 1".to_owned());
        }
        if self.mqtt.max_inflight_out == 0 {
            problems.push("mqtt.max_inflight_out: must be between 1 and 65535".to_owned());
        }
        for (key, filters) in [("plain_topics", &self.mqtt.plain_topics), ("deny_topics", &self.mqtt.deny_topics)] {
            for filter in filters {
                if !rumqttc::mqttbytes::valid_filter(filter) {
                    problems.push(format!("mqtt.{key}: `{filter}` is not an MQTT topic filter"));
                }
            }
        }
        if self.mqtt.max_inflight == 0 {
            problems.push("mqtt.max_inflight: must be at least 1".to_owned());
        }
        if self.runtime.worker_threads > 1024 {
            problems.push("runtime.worker_threads: at most 1024 (0 = one per core)".to_owned());
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            problems.push(format!("log.format: `{}` is neither \"text\" nor \"json\"", self.log.format));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            problems.push(format!("log.level: `{}` is not a valid tracing filter", self.log.level));
        }
        problems
    }

    /// The families whose JSON mirror is on.
    pub fn mirrored(&self, family: Family) -> bool {
        self.ingest.json_mirror.iter().any(|f| parse_family(f) == Some(family))
    }
}

fn parse_family(s: &str) -> Option<Family> {
    match s {
        "tel" => Some(Family::Telemetry),
        "evt" => Some(Family::Event),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_with(vars: &[(&str, &str)]) -> Env {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        // Figment reads the process environment; a unique prefix per test
        // keeps parallel tests apart.
        let prefix = format!("FMTEST{}_", std::process::id() ^ (vars.len() as u32) << 20);
        for (k, v) in &vars {
            std::env::set_var(format!("{prefix}{k}"), v);
        }
        Env::prefixed(&prefix)
    }

    fn write(toml: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(&mut f, toml.as_bytes()).expect("write");
        f
    }

    #[test]
    fn shipped_config_equals_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/node.toml");
        let shipped: Config = toml::from_str(&std::fs::read_to_string(&path).expect("configs/node.toml exists"))
            .expect("configs/node.toml parses with no unknown keys");
        assert_eq!(shipped, Config::default());
        assert!(Config::default().problems().is_empty());
    }

    #[test]
    fn secrets_are_never_printed() {
        let f = write(
            "[nats]\nuser = \"u\"\npassword = \"nats-pass-123\"\n[auth]\nadmin_token = \"admin-token-0123456789\"\n",
        );
        let cfg = Config::load_with_env(Some(f.path()), env_with(&[])).expect("loads");
        assert_eq!(cfg.nats.password.expose(), "nats-pass-123");
        let printed = format!("{}\n{cfg:?}", toml::to_string_pretty(&cfg).expect("toml"));
        assert!(!printed.contains("nats-pass-123") && !printed.contains("admin-token-0123456789"), "{printed}");
        assert!(printed.contains(fluxmesh_mesh::secret::REDACTED));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let f = write("[nats]\nurlz = [\"nats://x\"]\n");
        let err = Config::load_with_env(Some(f.path()), env_with(&[])).expect_err("unknown key");
        assert!(err.to_string().contains("urlz"), "{err}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let err =
            Config::load_with_env(Some(Path::new("/nonexistent/fluxmesh.toml")), env_with(&[])).expect_err("missing");
        assert!(matches!(err, ConfigError::Missing { .. }));
    }

    #[test]
    fn file_then_env_override() {
        let f = write("node_id = \"from-file\"\n[nats]\nprefix = \"acme\"\n[http]\nlisten = \"127.0.0.1:9000\"\n");
        let env = env_with(&[
            ("NODE_ID", "from-env"),
            ("NATS_URLS", "nats://127.0.0.1:1,nats://127.0.0.1:2"),
            ("NATS_PUBLISH_WINDOW", "64"),
            ("NODES", "3"),
        ]);
        let cfg = Config::load_with_env(Some(f.path()), env).expect("loads");
        assert_eq!(cfg.node_id, "from-env");
        assert_eq!(cfg.nats.prefix, "acme");
        assert_eq!(cfg.nats.urls, vec!["nats://127.0.0.1:1", "nats://127.0.0.1:2"]);
        assert_eq!(cfg.nats.publish_window, 64);
        assert_eq!(cfg.http.listen.port(), 9000);
    }

    #[test]
    fn all_problems_reported_at_once() {
        let f = write(
            "[nats]\nshards = 0\nprefix = \"a.b\"\n[ingest]\njson_mirror = [\"bogus\"]\n[log]\nformat = \"xml\"\n",
        );
        let err = Config::load_with_env(Some(f.path()), env_with(&[])).expect_err("invalid");
        let text = err.to_string();
        for needle in ["nats.shards", "nats.prefix", "json_mirror", "log.format"] {
            assert!(text.contains(needle), "missing {needle} in {text}");
        }
    }
}
