//! TLS for the MQTT listener (rustls, ring provider).

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path}: not PEM")]
    Pem {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path}: no {missing} in it")]
    Missing { what: &'static str, path: String, missing: &'static str },
    #[error("{what} {path}: refused")]
    Refused {
        what: &'static str,
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Installs ring as rustls's process-wide crypto provider. Two providers
/// are compiled in (ring and aws-lc-rs, through dependencies), and rustls
/// refuses to pick one by itself. Idempotent.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn certs(what: &'static str, path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_owned(), source })?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what, path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::Missing { what, path: path.to_owned(), missing: "PEM certificate" });
    }
    Ok(certs)
}

fn key(path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let what = "mqtt.tls_key_file";
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_owned(), source })?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|source| TlsError::Pem { what, path: path.to_owned(), source })?
        .ok_or_else(|| TlsError::Missing {
            what,
            path: path.to_owned(),
            missing: "PEM private key (PKCS#8, PKCS#1 or SEC1)",
        })
}

/// A server config from PEM files; with `client_ca` set, clients must
/// present a certificate signed by it.
pub fn server_config(cert: &str, key_file: &str, client_ca: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    install_provider();
    let chain = certs("mqtt.tls_cert_file", cert)?;
    let key = key(key_file)?;
    let builder = rustls::ServerConfig::builder();
    let builder = if client_ca.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs("mqtt.tls_client_ca_file", client_ca)? {
            roots.add(ca).map_err(|e| TlsError::Refused {
                what: "mqtt.tls_client_ca_file",
                path: client_ca.to_owned(),
                source: Box::new(e),
            })?;
        }
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots)).build().map_err(|e| TlsError::Refused {
            what: "mqtt.tls_client_ca_file",
            path: client_ca.to_owned(),
            source: Box::new(e),
        })?;
        builder.with_client_cert_verifier(verifier)
    };
    // Refused when the certificate does not go with the key.
    let config = builder.with_single_cert(chain, key).map_err(|e| TlsError::Refused {
        what: "mqtt.tls_cert_file",
        path: cert.to_owned(),
        source: Box::new(e),
    })?;
    Ok(Arc::new(config))
}
