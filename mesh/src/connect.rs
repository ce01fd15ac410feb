//! The node's NATS connection.

use crate::NatsConfig;
use async_nats::{Client, ConnectOptions, Event, ReconnectToServer, Server, ServerInfo};
use rand::seq::IndexedRandom;
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

/// Connects to a reachable server of `cfg.urls` (tried in random order).
/// After the first connection the client reconnects by itself, forever,
/// and logs every change; `fluxmesh_nats_connected` is 1 while connected.
///
/// A reconnect always goes to another server than the one the client
/// left ([`next_server`]): the node forces a reconnect when the server it
/// is on cannot reach its peers, and landing on that server again would
/// leave it cut off for another round.
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
        .reconnect_to_server_callback(|pool, last| async move { next_server(&pool, &last) })
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

/// Which server a reconnect goes to: one of those with the fewest failed
/// attempts in a row, at random, other than the server the client was on
/// (`last`, matched by host and port; a server that listens on every
/// address is matched by port alone) unless there is no other. `None` (the
/// client tries every server in turn) for the first connection.
fn next_server(pool: &[Server], last: &ServerInfo) -> Option<ReconnectToServer> {
    if last.server_id.is_empty() {
        return None;
    }
    let any_host = matches!(last.host.as_str(), "" | "0.0.0.0" | "::" | "[::]");
    let was_last = |s: &Server| {
        s.addr.port() == last.port
            && (any_host || s.addr.host().trim_matches(['[', ']']) == last.host.trim_matches(['[', ']']))
    };
    let others: Vec<&Server> = pool.iter().filter(|s| !was_last(s)).collect();
    let candidates = if others.is_empty() { pool.iter().collect() } else { others };
    let fewest = candidates.iter().map(|s| s.failed_attempts).min()?;
    let best: Vec<&Server> = candidates.into_iter().filter(|s| s.failed_attempts == fewest).collect();
    let pick = best.choose(&mut rand::rng())?;
    // No delay of our own: the client's backoff applies.
    Some(ReconnectToServer { addr: pick.addr.clone(), delay: None })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(urls: &[&str]) -> Vec<Server> {
        urls.iter()
            .map(|u| Server {
                addr: u.parse().expect("test URL"),
                failed_attempts: 0,
                did_connect: true,
                is_discovered: false,
                last_error: None,
            })
            .collect()
    }

    fn on(host: &str, port: u16) -> ServerInfo {
        ServerInfo { server_id: "N1".into(), host: host.into(), port, ..ServerInfo::default() }
    }

    fn picks(pool: &[Server], last: &ServerInfo) -> std::collections::BTreeSet<String> {
        (0..200).filter_map(|_| next_server(pool, last)).map(|r| r.addr.as_url_str().to_owned()).collect()
    }

    #[test]
    fn a_reconnect_leaves_the_server_it_was_on() {
        let servers = pool(&["nats://127.0.0.1:4222", "nats://127.0.0.1:4223", "nats://127.0.0.1:4224"]);
        let chosen = picks(&servers, &on("127.0.0.1", 4223));
        assert_eq!(chosen.len(), 2, "both others, at random: {chosen:?}");
        assert!(!chosen.iter().any(|u| u.ends_with(":4223")), "{chosen:?}");

        // Servers on their own addresses, one port (namespaces, hosts).
        let servers = pool(&["nats://10.1.0.1:4222", "nats://10.1.0.2:4222", "nats://10.1.0.3:4222"]);
        let chosen = picks(&servers, &on("10.1.0.2", 4222));
        assert!(!chosen.iter().any(|u| u.contains("10.1.0.2")), "{chosen:?}");
    }

    #[test]
    fn failing_servers_come_last_and_a_lone_server_is_kept() {
        let mut servers = pool(&["nats://127.0.0.1:4222", "nats://127.0.0.1:4223", "nats://127.0.0.1:4224"]);
        servers[2].failed_attempts = 3;
        let chosen = picks(&servers, &on("127.0.0.1", 4222));
        assert_eq!(chosen.into_iter().collect::<Vec<_>>(), ["nats://127.0.0.1:4223"]);

        let lone = pool(&["nats://127.0.0.1:4222"]);
        assert_eq!(picks(&lone, &on("0.0.0.0", 4222)).len(), 1);
        // The first connection tries every server.
        assert!(next_server(&lone, &ServerInfo::default()).is_none());
    }
}
