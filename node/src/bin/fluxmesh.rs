//! The `fluxmesh` binary: parses arguments, sets up logging, runs a node
//! until SIGTERM or Ctrl-C.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use fluxmesh_node::{Config, Node};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// The hot path allocates a few small buffers per message (frame, headers,
/// futures); glibc's malloc took ~30% of a node's CPU under load, mimalloc
/// far less (see README, Performance).
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
    /// Print the effective config as TOML.
    PrintConfig {
        #[arg(long, short, env = "FLUXMESH_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Run { config: None }) {
        Command::Run { config } => run(config),
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
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fluxmesh: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn print_config(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    print!("{}", toml::to_string_pretty(&config)?);
    Ok(())
}

fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    init_logging(&config);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.runtime.worker_threads > 0 {
        builder.worker_threads(config.runtime.worker_threads);
    }
    let runtime = builder.enable_all().build().context("starting the runtime")?;
    runtime.block_on(async move {
        let cancel = CancellationToken::new();
        let signals = tokio::spawn(wait_for_signal(cancel.clone()));
        let node = Node::start(config, cancel.clone()).await?;
        cancel.cancelled().await;
        node.shutdown().await;
        signals.abort();
        Ok(())
    })
}

async fn wait_for_signal(cancel: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
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
