//! The everyday commands of the `fluxmesh` binary that talk to a running
//! cluster: `rules`, `plugins` and `cluster status` through a node's admin
//! API, `tail` straight from NATS.
//!
//! Exit codes, for scripts:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | the node or NATS could not be reached, or failed (5xx): retrying may help |
//! | 2 | bad usage, or an input file or config that cannot be read |
//! | 3 | not found (no such rule, plugin or device) |
//! | 4 | refused: no or wrong admin token, or invalid input (a rule that does not compile, a bad module) |

use bytes::Bytes;
use futures::StreamExt as _;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the admin API is and how to authenticate to it.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// A node's HTTP address: `http://host:port` or `host:port`.
    #[arg(long, global = true, env = "FLUXMESH_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The admin token (`auth.admin_token` of the nodes).
    #[arg(long, global = true, env = "FLUXMESH_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the node's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum RulesAction {
    /// List every rule.
    List,
    /// Print one rule as JSON.
    Get { id: String },
    /// Create or replace a rule from a Rhai script file (`-`: stdin).
    Put {
        id: String,
        script: PathBuf,
        /// Devices it runs for: a glob over the device id.
        #[arg(long, default_value = "*")]
        device: String,
        /// Channels it runs for: a glob over the channel.
        #[arg(long, default_value = "*")]
        channel: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Store it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// Delete a rule.
    Rm { id: String },
}

#[derive(Debug, clap::Subcommand)]
pub enum PluginsAction {
    /// List every plugin and whether the answering node has it loaded.
    List,
    /// Upload a WebAssembly module (`.wasm` or `.wat`) as plugin NAME.
    Put { name: String, module: PathBuf },
    /// Delete a plugin.
    Rm { name: String },
}

#[derive(Debug, clap::Subcommand)]
pub enum ClusterAction {
    /// Live nodes, the shards each holds and their backlog.
    Status,
}

/// What `fluxmesh tail` reads.
#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    /// A NATS subject or wildcard (`fm.evt.>`, `fm.json.tel.>`).
    pub subject: String,
    /// NATS server URL(s), comma-separated; default: the config's
    /// `nats.urls` (file or FLUXMESH_NATS_URLS), with its credentials and
    /// TLS.
    #[arg(long, value_delimiter = ',')]
    pub nats: Vec<String>,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub seconds: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the node at {url}")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{method} {url}: {status}: {message}")]
    Status { method: &'static str, url: String, status: reqwest::StatusCode, message: String },
    #[error("no admin token: pass --token or set FLUXMESH_ADMIN_TOKEN")]
    NoToken,
    #[error("`{url}` is not an http:// address of a node")]
    BadUrl { url: String },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: the script does not compile: {message}")]
    Compile { path: PathBuf, line: u64, column: u64, message: String },
    #[error("the node's answer is not what this CLI understands")]
    Answer(#[source] reqwest::Error),
    #[error("cannot load the config")]
    Config(#[source] Box<crate::config::ConfigError>),
    #[error("cannot connect to NATS")]
    Nats(#[source] fluxmesh_mesh::ConnectError),
    #[error("cannot subscribe to `{subject}`")]
    Subscribe {
        subject: String,
        #[source]
        source: async_nats::SubscribeError,
    },
    #[error("cannot write to stdout")]
    Stdout(#[source] std::io::Error),
}

impl CliError {
    /// The process exit code for this error (see the module docs).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Status { status, .. } if *status == reqwest::StatusCode::NOT_FOUND => 3,
            CliError::Status { status, .. } if status.is_client_error() => 4,
            CliError::NoToken | CliError::Compile { .. } => 4,
            CliError::BadUrl { .. } | CliError::Read { .. } | CliError::Config(_) => 2,
            _ => 1,
        }
    }
}

/// A client of one node's admin API.
#[derive(Debug)]
struct Admin {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Admin {
    fn new(args: &NodeArgs) -> Result<Admin, CliError> {
        let token = args.token.clone().filter(|t| !t.is_empty()).ok_or(CliError::NoToken)?;
        let url = args.url.trim_end_matches('/');
        let base = if url.contains("://") { url.to_owned() } else { format!("http://{url}") };
        if !base.starts_with("http://") {
            return Err(CliError::BadUrl { url: args.url.clone() });
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|source| CliError::Connect { url: base.clone(), source })?;
        Ok(Admin { http, base, token })
    }

    /// Sends a request; the JSON answer (Null for 204), or the node's error.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Value, CliError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method.clone(), &url).bearer_auth(&self.token);
        if let Some((content_type, bytes)) = body {
            request = request.header(reqwest::header::CONTENT_TYPE, content_type).body(bytes);
        }
        let response = request.send().await.map_err(|source| CliError::Connect { url: self.base.clone(), source })?;
        let status = response.status();
        if status == reqwest::StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        let text = response.text().await.map_err(CliError::Answer)?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok(value);
        }
        let message = value.get("error").and_then(Value::as_str).map_or_else(|| value.to_string(), str::to_owned);
        Err(with_detail(CliError::Status { method: method_name(&method), url, status, message }, &value))
    }
}

fn method_name(method: &reqwest::Method) -> &'static str {
    match *method {
        reqwest::Method::GET => "GET",
        reqwest::Method::PUT => "PUT",
        reqwest::Method::POST => "POST",
        reqwest::Method::DELETE => "DELETE",
        _ => "request",
    }
}

/// A compile error of a rule carries its place: keep it for the caller.
fn with_detail(e: CliError, body: &Value) -> CliError {
    match (&e, body.get("line").and_then(Value::as_u64)) {
        (CliError::Status { message, .. }, Some(line)) => CliError::Compile {
            path: PathBuf::new(),
            line,
            column: body.get("column").and_then(Value::as_u64).unwrap_or(0),
            message: message.trim_start_matches("script does not compile: ").to_owned(),
        },
        _ => e,
    }
}

fn read_input(path: &Path) -> Result<Vec<u8>, CliError> {
    let read = if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).map(|_| buf)
    } else {
        std::fs::read(path)
    };
    read.map_err(|source| CliError::Read { path: path.to_owned(), source })
}

fn print(text: impl std::fmt::Display) -> Result<(), CliError> {
    use std::io::Write as _;
    writeln!(std::io::stdout().lock(), "{text}").map_err(CliError::Stdout)
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// A plain-text table: columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut out = vec![line(header.to_vec())];
    out.extend(rows.iter().map(|r| line(r.iter().map(String::as_str).collect())));
    out.join("\n")
}

fn text(value: &Value, key: &str) -> String {
    match value.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_owned(),
        Some(other) => other.to_string(),
    }
}

/// An id or name as one path segment.
fn segment(s: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    percent_encoding::utf8_percent_encode(s, RESERVED).to_string()
}

pub async fn rules(node: NodeArgs, action: RulesAction) -> Result<(), CliError> {
    let admin = Admin::new(&node)?;
    match action {
        RulesAction::List => {
            let answer = admin.send(reqwest::Method::GET, "/api/v1/rules", None).await?;
            if node.json {
                return print(pretty(&answer));
            }
            let rows: Vec<Vec<String>> = answer["rules"]
                .as_array()
                .map(|rules| {
                    rules
                        .iter()
                        .map(|r| {
                            let enabled = if r["enabled"].as_bool() == Some(false) { "no" } else { "yes" };
                            vec![
                                text(r, "id"),
                                text(r, "device"),
                                text(r, "channel"),
                                enabled.into(),
                                text(r, "description"),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print(table(&["ID", "DEVICE", "CHANNEL", "ENABLED", "DESCRIPTION"], &rows))
        }
        RulesAction::Get { id } => {
            let answer = admin.send(reqwest::Method::GET, &format!("/api/v1/rules/{}", segment(&id)), None).await?;
            print(pretty(&answer))
        }
        RulesAction::Put { id, script, device, channel, description, disabled } => {
            let source = read_input(&script)?;
            let body = json!({
                "script": String::from_utf8_lossy(&source),
                "device": device,
                "channel": channel,
                "description": description,
                "enabled": !disabled,
            });
            let sent = admin
                .send(
                    reqwest::Method::PUT,
                    &format!("/api/v1/rules/{}", segment(&id)),
                    Some(("application/json", Bytes::from(body.to_string()))),
                )
                .await;
            let answer = match sent {
                Err(CliError::Compile { line, column, message, .. }) => {
                    return Err(CliError::Compile { path: script, line, column, message })
                }
                other => other?,
            };
            if node.json {
                return print(pretty(&answer));
            }
            print(format!("stored rule `{id}` (revision {})", text(&answer, "revision")))
        }
        RulesAction::Rm { id } => {
            admin.send(reqwest::Method::DELETE, &format!("/api/v1/rules/{}", segment(&id)), None).await?;
            print(format!("deleted rule `{id}`"))
        }
    }
}

pub async fn plugins(node: NodeArgs, action: PluginsAction) -> Result<(), CliError> {
    let admin = Admin::new(&node)?;
    match action {
        PluginsAction::List => {
            let answer = admin.send(reqwest::Method::GET, "/api/v1/plugins", None).await?;
            if node.json {
                return print(pretty(&answer));
            }
            let rows: Vec<Vec<String>> = answer["plugins"]
                .as_array()
                .map(|plugins| {
                    plugins
                        .iter()
                        .map(|p| {
                            let loaded = if p["loaded"].as_bool() == Some(true) { "yes" } else { "no" };
                            let digest: String = text(p, "digest").chars().take(16).collect();
                            vec![text(p, "name"), text(p, "size"), digest, loaded.into()]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print(table(&["NAME", "BYTES", "DIGEST", "LOADED"], &rows))
        }
        PluginsAction::Put { name, module } => {
            let bytes = read_input(&module)?;
            let path = format!("/api/v1/plugins/{}", segment(&name));
            let answer =
                admin.send(reqwest::Method::PUT, &path, Some(("application/octet-stream", Bytes::from(bytes)))).await?;
            if node.json {
                return print(pretty(&answer));
            }
            print(format!("stored plugin `{name}` ({} bytes)", text(&answer["plugin"], "size")))
        }
        PluginsAction::Rm { name } => {
            admin.send(reqwest::Method::DELETE, &format!("/api/v1/plugins/{}", segment(&name)), None).await?;
            print(format!("deleted plugin `{name}`"))
        }
    }
}

pub async fn cluster(node: NodeArgs, action: ClusterAction) -> Result<(), CliError> {
    let admin = Admin::new(&node)?;
    match action {
        ClusterAction::Status => {
            let answer = admin.send(reqwest::Method::GET, "/api/v1/cluster", None).await?;
            if node.json {
                return print(pretty(&answer));
            }
            print(status_text(&answer))
        }
    }
}

/// `cluster status` as a table: per live node, the shards it holds (with
/// a valid lease) and the messages they have not processed yet.
fn status_text(answer: &Value) -> String {
    let empty = Vec::new();
    let nodes = answer["nodes"].as_array().unwrap_or(&empty);
    let shards = answer["shards"].as_array().unwrap_or(&empty);
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let id = n["node_id"].as_str().unwrap_or("?");
            let held: Vec<&Value> = shards
                .iter()
                .filter(|s| s["lease_valid"].as_bool() == Some(true) && s["holder"].as_str() == Some(id))
                .collect();
            let pending: u64 = held.iter().filter_map(|s| s["pending"].as_u64()).sum();
            let held = held.len();
            vec![
                id.to_owned(),
                held.to_string(),
                pending.to_string(),
                text(n, "http"),
                text(n, "mqtt"),
                text(n, "version"),
            ]
        })
        .collect();
    let unowned = shards.iter().filter(|s| s["lease_valid"].as_bool() != Some(true)).count();
    let misplaced =
        shards.iter().filter(|s| s["lease_valid"].as_bool() == Some(true) && s["holder"] != s["desired_owner"]).count();
    format!(
        "{} live nodes, {} shards (answered by {})\n{}\nshards without an owner: {unowned}; held by a node other than placement's choice (moving): {misplaced}",
        nodes.len(),
        text(answer, "shard_count"),
        text(answer, "node"),
        table(&["NODE", "SHARDS", "PENDING", "HTTP", "MQTT", "VERSION"], &rows)
    )
}

pub async fn tail(config: Option<PathBuf>, args: TailArgs) -> Result<(), CliError> {
    let mut config = crate::Config::load(config.as_deref()).map_err(|e| CliError::Config(Box::new(e)))?;
    if !args.nats.is_empty() {
        config.nats.urls = args.nats.clone();
    }
    let client = fluxmesh_mesh::connect(&config.nats, "fluxmesh-tail").await.map_err(CliError::Nats)?;
    let mut messages = client
        .subscribe(args.subject.clone())
        .await
        .map_err(|source| CliError::Subscribe { subject: args.subject.clone(), source })?;
    // Subscribed once the server has the interest: what is published
    // after this line is printed.
    crate::tail::round_trip(&client).await;
    eprintln!("# tailing {}", args.subject);
    let deadline = args.seconds.map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    let mut seen = 0u64;
    while args.count.is_none_or(|n| seen < n) {
        let next = match deadline {
            Some(at) => match tokio::time::timeout_at(at, messages.next()).await {
                Ok(m) => m,
                Err(_) => break,
            },
            None => messages.next().await,
        };
        let Some(message) = next else { break };
        seen += 1;
        match print(crate::tail::json_line(message.subject.as_str(), &message.payload)) {
            // A closed pipe (`| head`) ends the tail quietly.
            Err(CliError::Stdout(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
            other => other?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_counts_valid_leases_per_node() {
        let answer = json!({
            "node": "n1", "shard_count": 3,
            "nodes": [{"node_id": "n1", "http": "h1", "mqtt": "m1", "version": "v"}, {"node_id": "n2"}],
            "shards": [
                {"shard": 0, "holder": "n1", "desired_owner": "n1", "lease_valid": true, "pending": 5},
                {"shard": 1, "holder": "n1", "desired_owner": "n2", "lease_valid": true, "pending": 2},
                {"shard": 2, "holder": "n2", "desired_owner": "n2", "lease_valid": false, "pending": null},
            ],
        });
        let text = status_text(&answer);
        assert!(text.contains("n1    2       7"), "{text}");
        assert!(text.contains("n2    0       0"), "{text}");
        assert!(text.contains("without an owner: 1") && text.contains("(moving): 1"), "{text}");
    }

    #[test]
    fn exit_codes() {
        let status = |s: u16| CliError::Status {
            method: "GET",
            url: String::new(),
            status: reqwest::StatusCode::from_u16(s).expect("status"),
            message: String::new(),
        };
        assert_eq!(status(404).exit_code(), 3);
        assert_eq!(status(401).exit_code(), 4);
        assert_eq!(status(503).exit_code(), 1);
        assert_eq!(CliError::NoToken.exit_code(), 4);
    }
}
