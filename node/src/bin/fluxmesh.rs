//! The `fluxmesh` binary: parses arguments, sets up logging, runs a node
//! until SIGTERM or Ctrl-C.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use fluxmesh_node::{cli, Config, Node};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// The hot path allocates a few small buffers per message (frame, headers,
/// futures); glibc's malloc took ~30% of a node's CPU under load, mimalloc
/// far less (see README, Performance). The `system-allocator` feature
/// keeps the system's, for heap profilers that hook malloc.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "fluxmesh", version, about = "fluxmesh event mesh node")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node (the default).
    Run {
        /// TOML config file; defaults and FLUXMESH_* environment variables
        /// apply around it.
        #[arg(long, short, env = "FLUXMESH_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a config (file, then environment) and exit: 0 if valid, 2 if not.
    CheckConfig { file: Option<PathBuf> },
    /// Print the effective config as TOML (secrets shown as <redacted>).
    PrintConfig {
        #[arg(long, short, env = "FLUXMESH_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Rhai rules, through a node's admin API.
    Rules {
        #[command(flatten)]
        node: cli::NodeArgs,
        #[command(subcommand)]
        action: cli::RulesAction,
    },
    /// WebAssembly plugins, through a node's admin API.
    Plugins {
        #[command(flatten)]
        node: cli::NodeArgs,
        #[command(subcommand)]
        action: cli::PluginsAction,
    },
    /// The cluster as a node sees it, through its admin API.
    Cluster {
        #[command(flatten)]
        node: cli::NodeArgs,
        #[command(subcommand)]
        action: cli::ClusterAction,
    },
    /// Print what is published on a NATS subject as JSON lines: frames in
    /// their JSON view, JSON payloads as they are, other bytes as base64.
    Tail {
        #[arg(long, short, env = "FLUXMESH_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        args: cli::TailArgs,
    },
    /// Print the HTTP API's OpenAPI 3.1 document (what every node serves at
    /// /api/v1/openapi.json).
    Openapi,
    /// Manage device credentials and ACL grants, straight in the cluster's
    /// NATS KV (works before any node runs; uses the config's [nats] and
    /// [auth] sections).
    Devices {
        #[arg(long, short, env = "FLUXMESH_CONFIG")]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: DevicesAction,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesAction {
    /// Set a device's secret (read from stdin, or generated and printed
    /// once) and, optionally, its grants.
    Set {
        device: String,
        /// Read the secret from the first line of stdin instead of
        /// generating one.
        #[arg(long)]
        secret_stdin: bool,
        /// Keep the device's other secrets (rotation).
        #[arg(long)]
        keep_existing: bool,
        /// Extra topic filter the device may publish to (repeatable;
        /// replaces the stored list when given).
        #[arg(long)]
        publish: Vec<String>,
        /// Extra topic filter the device may subscribe within (repeatable).
        #[arg(long)]
        subscribe: Vec<String>,
        /// Refuse the device (true) or let it in again (false).
        #[arg(long)]
        disabled: Option<bool>,
    },
    /// Show a device's record (no hashes).
    Show { device: String },
    /// Remove a device's credentials; its sessions end.
    Remove { device: String },
}

fn main() -> std::process::ExitCode {
    // First, before the allocator's arena takes more pages: the kernel
    // backs the pages touched while huge pages are on with huge pages,
    // and keeps them. `run` turns them back on if the config asks.
    let huge_pages_off = rustix::thread::disable_transparent_huge_pages(true);
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Run { config: None }) {
        Command::Run { config } => run(config, huge_pages_off),
        Command::CheckConfig { file } => match Config::load(file.as_deref()) {
            Ok(_) => {
                println!("config is valid");
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                return std::process::ExitCode::from(2);
            }
        },
        Command::PrintConfig { config } => print_config(config),
        Command::Devices { config, action } => devices(config, action),
        Command::Rules { node, action } => return client(cli::rules(node, action)),
        Command::Plugins { node, action } => return client(cli::plugins(node, action)),
        Command::Cluster { node, action } => return client(cli::cluster(node, action)),
        Command::Tail { config, args } => return client(cli::tail(config, args)),
        Command::Openapi => fluxmesh_node::http::openapi()
            .to_pretty_json()
            .map(|json| println!("{json}"))
            .context("rendering the OpenAPI document"),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fluxmesh: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a client command; its error on stderr, with its causes, and the
/// exit code `fluxmesh_node::cli` documents.
fn client(command: impl std::future::Future<Output = Result<(), cli::CliError>>) -> std::process::ExitCode {
    fluxmesh_node::tls::install_provider();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fluxmesh: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fluxmesh: {}", fluxmesh_mesh::error_chain(&e));
            std::process::ExitCode::from(e.exit_code())
        }
    }
}

fn print_config(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    print!("{}", toml::to_string_pretty(&config)?);
    Ok(())
}

fn devices(config: Option<PathBuf>, action: DevicesAction) -> anyhow::Result<()> {
    use fluxmesh_node::auth;
    let config = Config::load(config.as_deref())?;
    fluxmesh_node::tls::install_provider();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async move {
        let client = fluxmesh_mesh::connect(&config.nats, "fluxmesh-devices-cli").await?;
        let publisher = fluxmesh_mesh::Publisher::new(client.clone(), &config.nats);
        let provisioned = fluxmesh_mesh::provision(&client, publisher.context(), &config.nats).await?;
        let store = auth::open_store(publisher.context(), &provisioned.subjects, provisioned.replicas).await?;
        match action {
            DevicesAction::Set { device, secret_stdin, keep_existing, publish, subscribe, disabled } => {
                let secret = if secret_stdin {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line).context("reading the secret from stdin")?;
                    Some(fluxmesh_mesh::Secret::new(line.trim_end_matches(['\r', '\n'])))
                } else {
                    None
                };
                let update = auth::Update {
                    secret,
                    keep_existing,
                    publish: (!publish.is_empty()).then_some(publish),
                    subscribe: (!subscribe.is_empty()).then_some(subscribe),
                    disabled,
                };
                let (view, generated) = auth::set(&store, &config.auth, &device, update).await?;
                println!("{}", serde_json::to_string_pretty(&view)?);
                if let Some(secret) = generated {
                    eprintln!("generated secret (shown once; the cluster keeps only its hash):");
                    println!("{secret}");
                }
            }
            DevicesAction::Show { device } => match auth::show(&store, &device).await? {
                Some(view) => println!("{}", serde_json::to_string_pretty(&view)?),
                None => anyhow::bail!("device `{device}` has no credentials"),
            },
            DevicesAction::Remove { device } => {
                if !auth::remove(&store, &device).await? {
                    anyhow::bail!("device `{device}` has no credentials");
                }
                println!("removed the credentials of `{device}`");
            }
        }
        client.flush().await.context("flushing to NATS")?;
        Ok(())
    })
}

fn run(config: Option<PathBuf>, huge_pages_off: rustix::io::Result<()>) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    init_logging(&config);
    raise_open_files(config.mqtt.max_connections);
    huge_pages(config.runtime.transparent_huge_pages, huge_pages_off);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.runtime.worker_threads > 0 {
        builder.worker_threads(config.runtime.worker_threads);
    }
    let runtime = builder.enable_all().build().context("starting the runtime")?;
    runtime.block_on(async move {
        let cancel = CancellationToken::new();
        // Signals are watched beside the node's life, not in a task: the
        // first one stops a start still waiting for NATS, or the node.
        let signals = async {
            wait_for_signal(cancel.clone()).await;
            std::future::pending::<()>().await
        };
        let life = async {
            let node = Node::start(config, cancel.clone()).await?;
            cancel.cancelled().await;
            node.shutdown().await;
            anyhow::Ok(())
        };
        tokio::select! {
            result = life => result,
            () = signals => Ok(()),
        }
    })
}

/// Files a node keeps open besides its MQTT connections: NATS, Postgres,
/// HTTP clients, listeners, logs.
const FILES_BESIDES_MQTT: u64 = 1024;

/// Raises this process's open-files limit to the most the system allows
/// (the soft limit is often 1024), and warns when `mqtt.max_connections`
/// does not fit in it: connections past it would fail at accept.
fn raise_open_files(max_connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            let usable = limit.saturating_sub(FILES_BESIDES_MQTT);
            if (max_connections as u64) > usable {
                tracing::warn!(
                    open_files = limit,
                    max_connections,
                    "this process may open {limit} files: MQTT connections past about {usable} will fail at accept; \
                     raise its limit (LimitNOFILE, ulimit -n) or lower mqtt.max_connections"
                );
            }
        }
        Err(e) => tracing::warn!(error = %fluxmesh_mesh::error_chain(&e), "cannot read or raise the open-files limit"),
    }
}

/// Says whether turning transparent huge pages off at start worked, or
/// turns them back on when `wanted`. Neither is fatal: a kernel without
/// the setting leaves the node as it was.
fn huge_pages(wanted: bool, turned_off: rustix::io::Result<()>) {
    let result = if wanted { rustix::thread::disable_transparent_huge_pages(false) } else { turned_off };
    match result {
        Ok(()) => tracing::debug!(on = wanted, "transparent huge pages set for this process"),
        Err(e) => tracing::warn!(
            error = %fluxmesh_mesh::error_chain(&e),
            wanted,
            "cannot set transparent huge pages for this process (runtime.transparent_huge_pages); they stay as the system has them"
        ),
    }
}

async fn wait_for_signal(cancel: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %fluxmesh_mesh::error_chain(&e), "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt"),
    }
    cancel.cancel();
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
