//! The fluxmesh node as a library: [`Node::start`] takes a [`Config`] and
//! returns a running node; [`Node::shutdown`] drains it. The `fluxmesh`
//! binary only parses arguments and waits for a signal, so tests and benches
//! run real nodes in-process.

pub mod api;
pub mod auth;
pub mod cli;
pub mod commands;
pub mod config;
pub mod console;
pub mod http;
pub mod ingress;
pub mod internal_events;
pub mod lifecycle;
pub mod limits;
pub mod mqtt;
pub mod node;
pub mod plugins;
pub mod processing;
pub mod reach;
pub mod rules;
pub mod shards;
pub mod storage;
pub mod tail;
pub mod tls;

pub use config::{Config, ConfigError};
pub use node::{Node, NodeError};
