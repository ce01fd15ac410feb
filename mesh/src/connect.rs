//! The node's NATS connection.

use crate::NatsConfig;
use async_nats::{Client, ConnectOptions, Event};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to NATS at {urls}: {source}")]
    Connect {
        urls: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("bad NATS server URL `{url}`: {source}")]
    BadUrl {
        url: String,
        #[source]
        source: std::io::Error,
    },
}

impl ConnectError {
    /// Whether trying again may help: an unreachable server may come up, a
    /// malformed URL never parses.
    pub fn is_transient(&self) -> bool {
        matches!(self, ConnectError::Connect { .. })
    }
}

/// Connects to the first reachable server of `cfg.urls`. After the first
/// connection the client reconnects by itself, forever, and logs every
/// change; `fluxmesh_nats_connected` is 1 while connected.
pub async fn connect(cfg: &NatsConfig, name: &str) -> Result<Client, ConnectError> {
    let urls = cfg
        .urls
        .iter()
        .map(|u| u.parse::<async_nats::ServerAddr>().map_err(|source| ConnectError::BadUrl { url: u.clone(), source }))
        .collect::<Result<Vec<_>, _>>()?;
    let client = ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
        // Publishes made while disconnected wait in the client's buffer and
        // go out on reconnect; their acks are bounded by the ack timeout.
        .client_capacity(65_536)
        .event_callback(|event| async move {
            match event {
                Event::Connected => {
                    metrics::gauge!("fluxmesh_nats_connected").set(1.0);
                    tracing::info!("connected to NATS");
                }
                Event::Disconnected => {
                    metrics::gauge!("fluxmesh_nats_connected").set(0.0);
                    tracing::warn!("disconnected from NATS; reconnecting");
                }
                other => tracing::warn!(event = %other, "NATS connection event"),
            }
        })
        .connect(urls)
        .await
        .map_err(|source| ConnectError::Connect { urls: cfg.urls.join(","), source })?;
    metrics::gauge!("fluxmesh_nats_connected").set(1.0);
    Ok(client)
}
