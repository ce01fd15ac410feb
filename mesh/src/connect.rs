//! The node's NATS connection.

use crate::NatsConfig;
use async_nats::{Client, ConnectOptions, Event};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to NATS at {urls}")]
    Connect {
        urls: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("cannot read {what} {path}")]
    File {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bad NATS server URL `{url}`")]
    BadUrl {
        url: String,
        #[source]
        source: std::io::Error,
    },
}

impl ConnectError {
    /// Whether trying again may help: an unreachable server may come up; a
    /// malformed URL, refused credentials or a failed TLS check will not
    /// change by waiting.
    pub fn is_transient(&self) -> bool {
        use async_nats::ConnectErrorKind as K;
        match self {
            ConnectError::Connect { source, .. } => {
                !matches!(source.kind(), K::AuthorizationViolation | K::Authentication | K::Tls)
            }
            ConnectError::File { .. } | ConnectError::BadUrl { .. } => false,
        }
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
    let client = with_credentials(ConnectOptions::new(), cfg)
        .await?
        .name(name)
        .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
        // Publishes made while disconnected wait in the client's buffer and
        // go out on reconnect; their acks are bounded by the ack timeout.
        .client_capacity(65_536)
        .event_callback(|event| async move {
            match event {
                Event::Connected => {
                    metrics::gauge!(crate::metric_names::NATS_CONNECTED).set(1.0);
                    tracing::info!("connected to NATS");
                }
                Event::Disconnected => {
                    metrics::gauge!(crate::metric_names::NATS_CONNECTED).set(0.0);
                    tracing::warn!("disconnected from NATS; reconnecting");
                }
                other => tracing::warn!(event = %other, "NATS connection event"),
            }
        })
        .connect(urls)
        .await
        .map_err(|source| ConnectError::Connect { urls: cfg.urls.join(","), source })?;
    metrics::gauge!(crate::metric_names::NATS_CONNECTED).set(1.0);
    Ok(client)
}

/// Adds `cfg`'s credentials and TLS settings to `options`.
pub async fn with_credentials(mut options: ConnectOptions, cfg: &NatsConfig) -> Result<ConnectOptions, ConnectError> {
    if !cfg.user.is_empty() {
        options = options.user_and_password(cfg.user.clone(), cfg.password.expose().to_owned());
    }
    if !cfg.token.is_empty() {
        options = options.token(cfg.token.expose().to_owned());
    }
    if !cfg.nkey_seed_file.is_empty() {
        let seed = tokio::fs::read_to_string(&cfg.nkey_seed_file).await.map_err(|source| ConnectError::File {
            what: "nats.nkey_seed_file",
            path: cfg.nkey_seed_file.clone(),
            source,
        })?;
        options = options.nkey(seed.trim().to_owned());
    }
    if !cfg.creds_file.is_empty() {
        options = options.credentials_file(&cfg.creds_file).await.map_err(|source| ConnectError::File {
            what: "nats.creds_file",
            path: cfg.creds_file.clone(),
            source,
        })?;
    }
    if !cfg.tls_ca_file.is_empty() {
        options = options.add_root_certificates(cfg.tls_ca_file.clone().into());
    }
    if !cfg.tls_cert_file.is_empty() {
        options = options.add_client_certificate(cfg.tls_cert_file.clone().into(), cfg.tls_key_file.clone().into());
    }
    let tls_urls = cfg.urls.iter().any(|u| u.starts_with("tls://"));
    if cfg.tls_required || tls_urls || !cfg.tls_ca_file.is_empty() {
        options = options.require_tls(true);
    }
    Ok(options)
}
