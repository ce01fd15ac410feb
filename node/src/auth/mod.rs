//! Who may talk to the node: device credentials, per-device ACLs and the
//! admin token.
//!
//! Device credentials live in the `{PREFIX}_DEVICES` KV bucket, one entry
//! per device (key `d.{hex of the device id}`), holding salted argon2id
//! hashes of its secrets (several, so a secret can be rotated without a
//! gap), its extra publish and subscribe grants, and a `disabled` flag. A
//! device authenticates on MQTT with client id = device id and password =
//! secret (username empty or the device id), on HTTP with
//! `Authorization: Basic` (same pair).
//!
//! A secret the node generates (256 random bits) is stored as its SHA-256
//! digest: nothing can guess it, so stretching buys nothing, and checking
//! it costs microseconds, which lets a whole fleet reconnect at once. A
//! secret an operator chooses may be guessable, so it is stored as a
//! salted argon2id hash. Checking one costs tens of milliseconds of CPU on
//! purpose, so at most `auth.max_concurrent_verifications` run at once
//! (the rest wait), and a secret already verified against the entry's
//! current revision is remembered as an HMAC under a per-process key: a
//! device reconnecting costs one hash per node, not one per reconnect.
//! A failed attempt is answered only after `auth.failure_delay_ms`.

pub mod acl;
pub mod http;

use acl::{Grant, Method};
use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use async_nats::jetstream::{self, kv};
use fluxmesh_mesh::Secret;
use hmac::Mac;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Secrets shorter than this are refused when set.
pub const MIN_SECRET_LEN: usize = 16;
const MAX_SECRET_LEN: usize = 256;
/// Verified secrets remembered at most; the memory is cleared when full.
const CACHE_ENTRIES: usize = 200_000;
/// How the hash of a secret the node generated starts: `$fm-sha256$`,
/// then the digest in unpadded base64.
const GENERATED_HASH: &str = "$fm-sha256$";

/// `[auth]`: device authentication and the admin token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Let devices in without credentials (MQTT and HTTP ingest). A device
    /// that has credentials must still present them. Off by default.
    pub allow_anonymous: bool,
    /// Bearer token for the admin API (every `/api/v1` route but device
    /// ingest). Empty: the admin API refuses everyone. `/healthz`,
    /// `/readyz` and `/metrics` are always open.
    pub admin_token: Secret,
    /// argon2id cost of newly set secrets: memory (KiB) and passes.
    pub hash_memory_kib: u32,
    pub hash_iterations: u32,
    /// Hash checks running at once; more attempts wait their turn.
    pub max_concurrent_verifications: usize,
    /// How long a failed attempt waits before it is answered.
    pub failure_delay_ms: u64,
    /// What a publish outside the device's ACL gets: `"ack"` (acknowledged
    /// and dropped, as MQTT 3.1.1 allows) or `"disconnect"`. Either way it
    /// is counted, logged and never enters the mesh.
    pub acl_deny: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: false,
            admin_token: Secret::default(),
            hash_memory_kib: 19_456,
            hash_iterations: 2,
            max_concurrent_verifications: 2,
            failure_delay_ms: 1000,
            acl_deny: "ack".to_owned(),
        }
    }
}

impl AuthConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.hasher().is_err() {
            problems.push("auth.hash_memory_kib (at least 8) and auth.hash_iterations (at least 1)".to_owned());
        }
        if self.max_concurrent_verifications == 0 {
            problems.push("auth.max_concurrent_verifications: must be at least 1".to_owned());
        }
        if self.failure_delay_ms > 60_000 {
            problems.push("auth.failure_delay_ms: at most 60000".to_owned());
        }
        if !matches!(self.acl_deny.as_str(), "ack" | "disconnect") {
            problems.push(format!("auth.acl_deny: `{}` is neither \"ack\" nor \"disconnect\"", self.acl_deny));
        }
        if !self.admin_token.is_empty() && self.admin_token.expose().len() < MIN_SECRET_LEN {
            problems.push(format!("auth.admin_token: at least {MIN_SECRET_LEN} characters"));
        }
        problems
    }

    pub fn disconnect_on_deny(&self) -> bool {
        self.acl_deny == "disconnect"
    }

    fn hasher(&self) -> Result<argon2::Argon2<'static>, AuthError> {
        let params =
            argon2::Params::new(self.hash_memory_kib, self.hash_iterations, 1, None).map_err(AuthError::HashParams)?;
        Ok(argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params))
    }
}

/// One device's credentials, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device: String,
    pub secrets: Vec<StoredSecret>,
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub disabled: bool,
    pub updated_us: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSecret {
    /// A short random id, to tell secrets apart when rotating.
    pub id: String,
    /// argon2id PHC string (salt and parameters included), or, for a
    /// secret the node generated, `$fm-sha256$` and its digest.
    pub hash: String,
    pub created_us: i64,
}

/// What an operator sets for a device (admin API and CLI).
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CredentialsUpdate)]
pub struct Update {
    /// The new secret; absent: one is generated and returned once.
    #[schema(value_type = Option<String>)]
    pub secret: Option<Secret>,
    /// Keep the device's other secrets (rotation); default: replace them.
    #[serde(default)]
    pub keep_existing: bool,
    pub publish: Option<Vec<String>>,
    pub subscribe: Option<Vec<String>>,
    pub disabled: Option<bool>,
}

/// The record as shown to operators: no hashes.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = Credentials)]
pub struct RecordView {
    pub device: String,
    pub secrets: Vec<SecretView>,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    pub disabled: bool,
    pub updated_us: i64,
    pub revision: u64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SecretView {
    pub id: String,
    pub created_us: i64,
}

impl RecordView {
    fn of(record: &DeviceRecord, revision: u64) -> RecordView {
        RecordView {
            device: record.device.clone(),
            secrets: record.secrets.iter().map(|s| SecretView { id: s.id.clone(), created_us: s.created_us }).collect(),
            publish: record.publish.clone(),
            subscribe: record.subscribe.clone(),
            disabled: record.disabled,
            updated_us: record.updated_us,
            revision,
        }
    }
}

/// What went wrong with a credentials request. `DeviceId`, `Filters`,
/// `SecretLength` and `HashParams` are the caller's to fix (HTTP 400); the
/// store's are 503.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid device id")]
    DeviceId(#[source] fluxmesh_schemas::TopicError),
    #[error(transparent)]
    Filters(#[from] acl::BadFilters),
    #[error("secret: between {MIN_SECRET_LEN} and {MAX_SECRET_LEN} characters")]
    SecretLength,
    #[error("invalid hash parameters (auth.hash_*)")]
    HashParams(#[source] argon2::Error),
    #[error("cannot hash the secret")]
    Hash(#[source] argon2::password_hash::Error),
    #[error("the hashing task failed")]
    HashTask(#[source] tokio::task::JoinError),
    #[error("cannot read the credentials of `{device}`")]
    Read {
        device: String,
        #[source]
        source: kv::EntryError,
    },
    #[error("the stored credentials of `{device}` are unreadable")]
    Corrupt {
        device: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write the credentials of `{device}`")]
    Write {
        device: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("cannot delete the credentials of `{device}`")]
    Delete {
        device: String,
        #[source]
        source: kv::DeleteError,
    },
    #[error("credentials store")]
    Open(#[source] fluxmesh_mesh::stores::StoreError),
    #[error("the credentials of this device changed while they were updated; try again")]
    Conflict,
}

/// Why a device was not let in. The text is for logs; devices only get an
/// MQTT return code or an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No credentials, and anonymous access is off.
    NoCredentials,
    /// Unknown device or wrong secret (not told apart to the device).
    BadCredentials,
    /// The username (MQTT: if not empty; HTTP Basic: always) is not the
    /// device id.
    UsernameMismatch,
    Disabled,
    /// The credentials store did not answer.
    Unavailable,
}

impl Denied {
    pub fn reason(self) -> &'static str {
        match self {
            Denied::NoCredentials => "no_credentials",
            Denied::BadCredentials => "bad_credentials",
            Denied::UsernameMismatch => "username_mismatch",
            Denied::Disabled => "disabled",
            Denied::Unavailable => "store_unavailable",
        }
    }
}

/// The key of a device's entry: `d.{hex of the device id}`.
pub fn key(device: &str) -> String {
    fluxmesh_schemas::kv::device_key("d", device)
}

/// Opens (or creates) the credentials bucket.
pub async fn open_store(
    js: &jetstream::Context,
    subjects: &fluxmesh_schemas::Subjects,
    replicas: usize,
) -> Result<kv::Store, AuthError> {
    fluxmesh_mesh::stores::open_devices(js, subjects, replicas).await.map_err(AuthError::Open)
}

/// Reads a device's record and its revision.
pub async fn read(store: &kv::Store, device: &str) -> Result<Option<(DeviceRecord, u64)>, AuthError> {
    let (record, revision) = read_entry(store, device).await?;
    Ok(record.zip(revision))
}

/// The record (None if absent or deleted) and the entry's revision (also
/// for a deletion marker, which an update must name).
async fn read_entry(store: &kv::Store, device: &str) -> Result<(Option<DeviceRecord>, Option<u64>), AuthError> {
    let entry =
        store.entry(key(device)).await.map_err(|source| AuthError::Read { device: device.to_owned(), source })?;
    match entry {
        Some(e) if matches!(e.operation, kv::Operation::Put) => {
            let record = serde_json::from_slice::<DeviceRecord>(&e.value)
                .map_err(|source| AuthError::Corrupt { device: device.to_owned(), source })?;
            Ok((Some(record), Some(e.revision)))
        }
        Some(e) => Ok((None, Some(e.revision))),
        None => Ok((None, None)),
    }
}

/// Sets a device's credentials (compare-and-set on the entry's revision).
/// Returns the record as stored and the secret if one was generated.
pub async fn set(
    store: &kv::Store,
    cfg: &AuthConfig,
    device: &str,
    update: Update,
) -> Result<(RecordView, Option<String>), AuthError> {
    fluxmesh_schemas::DeviceTopic::new(device, "x").map_err(AuthError::DeviceId)?;
    if let Some(f) = &update.publish {
        acl::check_filters("publish", f)?;
    }
    if let Some(f) = &update.subscribe {
        acl::check_filters("subscribe", f)?;
    }
    let (secret, generated) = match &update.secret {
        Some(s) if s.expose().len() < MIN_SECRET_LEN || s.expose().len() > MAX_SECRET_LEN => {
            return Err(AuthError::SecretLength)
        }
        Some(s) => (s.expose().to_owned(), None),
        None => {
            let s = generate_secret();
            (s.clone(), Some(s))
        }
    };
    let hash = if generated.is_some() {
        digest_hash(secret.as_bytes())
    } else {
        let hasher = cfg.hasher()?;
        tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut OsRng);
            hasher.hash_password(secret.as_bytes(), &salt).map(|h| h.to_string())
        })
        .await
        .map_err(AuthError::HashTask)?
        .map_err(AuthError::Hash)?
    };
    let now = fluxmesh_schemas::frame::now_us();
    let new_secret = StoredSecret { id: format!("{:08x}", rand::random::<u32>()), hash, created_us: now };
    for _ in 0..5 {
        let (current, revision) = read_entry(store, device).await?;
        let mut record = current.unwrap_or_default();
        record.device = device.to_owned();
        if !update.keep_existing {
            record.secrets.clear();
        }
        record.secrets.push(new_secret.clone());
        // At most 4 secrets: the oldest go first.
        let excess = record.secrets.len().saturating_sub(4);
        record.secrets.drain(..excess);
        if let Some(f) = &update.publish {
            record.publish = f.clone();
        }
        if let Some(f) = &update.subscribe {
            record.subscribe = f.clone();
        }
        if let Some(d) = update.disabled {
            record.disabled = d;
        }
        record.updated_us = now;
        // A record of strings, numbers and lists always serializes.
        let bytes: bytes::Bytes = serde_json::to_vec(&record).unwrap_or_default().into();
        let written = match revision {
            Some(rev) => store
                .update(key(device), bytes, rev)
                .await
                .map_err(|e| (matches!(e.kind(), kv::UpdateErrorKind::WrongLastRevision), async_nats::Error::from(e))),
            None => store
                .create(key(device), bytes)
                .await
                .map_err(|e| (matches!(e.kind(), kv::CreateErrorKind::AlreadyExists), async_nats::Error::from(e))),
        };
        match written {
            Ok(rev) => return Ok((RecordView::of(&record, rev), generated)),
            Err((true, _)) => continue,
            Err((false, source)) => return Err(AuthError::Write { device: device.to_owned(), source }),
        }
    }
    Err(AuthError::Conflict)
}

/// Shows a device's record, without hashes.
pub async fn show(store: &kv::Store, device: &str) -> Result<Option<RecordView>, AuthError> {
    Ok(read(store, device).await?.map(|(r, rev)| RecordView::of(&r, rev)))
}

/// Removes a device's credentials; false if it had none.
pub async fn remove(store: &kv::Store, device: &str) -> Result<bool, AuthError> {
    if read(store, device).await?.is_none() {
        return Ok(false);
    }
    store.delete(key(device)).await.map_err(|source| AuthError::Delete { device: device.to_owned(), source })?;
    Ok(true)
}

/// The stored hash of a generated secret: `$fm-sha256$` and its digest.
fn digest_hash(secret: &[u8]) -> String {
    use base64::Engine as _;
    let digest = <sha2::Sha256 as sha2::Digest>::digest(secret);
    format!("{GENERATED_HASH}{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest))
}

/// Whether `hash` is that of a generated secret (else argon2).
fn is_digest(hash: &str) -> bool {
    hash.starts_with(GENERATED_HASH)
}

/// Whether `secret` is the generated secret whose hash is `hash`.
fn digest_matches(hash: &str, secret: &[u8]) -> bool {
    is_digest(hash) && subtle::ConstantTimeEq::ct_eq(digest_hash(secret).as_bytes(), hash.as_bytes()).into()
}

/// 32 random bytes, base64url.
pub fn generate_secret() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

/// A secret verified against an entry revision, remembered as an HMAC.
#[derive(Debug, Clone)]
struct Verified {
    revision: u64,
    mac: [u8; 32],
}

/// Checks device credentials for MQTT CONNECT and HTTP ingest.
pub struct Authenticator {
    pub cfg: AuthConfig,
    store: kv::Store,
    permits: tokio::sync::Semaphore,
    verified: Mutex<HashMap<String, Verified>>,
    mac_key: [u8; 32],
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").field("bucket", &self.store.name).finish_non_exhaustive()
    }
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

impl Authenticator {
    pub fn new(cfg: AuthConfig, store: kv::Store) -> Authenticator {
        let permits = tokio::sync::Semaphore::new(cfg.max_concurrent_verifications);
        Authenticator { cfg, store, permits, verified: Mutex::default(), mac_key: rand::random() }
    }

    pub fn store(&self) -> &kv::Store {
        &self.store
    }

    fn mac(&self, device: &str, secret: &[u8]) -> [u8; 32] {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.mac_key).expect("HMAC takes any key length");
        mac.update(device.as_bytes());
        mac.update(&[0]);
        mac.update(secret);
        mac.finalize().into_bytes().into()
    }

    /// Lets `device` in with `secret`, or anonymously when that is allowed
    /// and the device has no credentials. A `username`, when given, must be
    /// the device id. Counts and logs every outcome, and answers a refusal
    /// only after `auth.failure_delay_ms`.
    pub async fn authenticate(
        &self,
        source: &'static str,
        device: &str,
        username: Option<&str>,
        secret: Option<&[u8]>,
    ) -> Result<Grant, Denied> {
        let result = if username.is_some_and(|u| u != device) {
            Err(Denied::UsernameMismatch)
        } else {
            self.check(device, secret).await
        };
        let outcome = match &result {
            Ok(g) if g.method == Method::Anonymous => "anonymous",
            Ok(_) => "ok",
            Err(d) => d.reason(),
        };
        crate::internal_events::emit(crate::internal_events::ingest::AuthAttempted {
            source,
            device,
            result: outcome,
            refused: result.is_err(),
        });
        if let Err(denied) = &result {
            if *denied != Denied::Unavailable {
                tokio::time::sleep(Duration::from_millis(self.cfg.failure_delay_ms)).await;
            }
        }
        result
    }

    async fn check(&self, device: &str, secret: Option<&[u8]>) -> Result<Grant, Denied> {
        let record = match read(&self.store, device).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %fluxmesh_mesh::error_chain(&e), "cannot read device credentials");
                return Err(Denied::Unavailable);
            }
        };
        let Some((record, revision)) = record else {
            return match secret {
                None if self.cfg.allow_anonymous => Ok(Grant::own(device, Method::Anonymous)),
                None => Err(Denied::NoCredentials),
                Some(_) => Err(Denied::BadCredentials),
            };
        };
        let Some(secret) = secret else { return Err(Denied::NoCredentials) };
        if record.disabled {
            return Err(Denied::Disabled);
        }
        let grant = Grant {
            device: device.to_owned(),
            publish: record.publish.clone(),
            subscribe: record.subscribe.clone(),
            method: Method::Secret,
            revision,
        };
        // Generated secrets first: a digest each, no permit needed.
        if record.secrets.iter().any(|s| digest_matches(&s.hash, secret)) {
            return Ok(grant);
        }
        let hashes: Vec<String> =
            record.secrets.iter().filter(|s| !is_digest(&s.hash)).map(|s| s.hash.clone()).collect();
        if hashes.is_empty() {
            return Err(Denied::BadCredentials);
        }
        let mac = self.mac(device, secret);
        let remembered = self.verified.lock().unwrap_or_else(|e| e.into_inner()).get(device).cloned();
        if let Some(v) = remembered {
            if v.revision == revision && subtle::ConstantTimeEq::ct_eq(&v.mac[..], &mac[..]).into() {
                return Ok(grant);
            }
        }
        let permit = self.permits.acquire().await.map_err(|_| Denied::Unavailable)?;
        let secret = secret.to_vec();
        let ok = tokio::task::spawn_blocking(move || {
            hashes.iter().any(|h| {
                PasswordHash::new(h)
                    .is_ok_and(|parsed| argon2::Argon2::default().verify_password(&secret, &parsed).is_ok())
            })
        })
        .await
        .unwrap_or(false);
        drop(permit);
        if !ok {
            return Err(Denied::BadCredentials);
        }
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= CACHE_ENTRIES {
            verified.clear();
        }
        verified.insert(device.to_owned(), Verified { revision, mac });
        Ok(grant)
    }

    /// Forgets what was verified for `device` (its entry changed).
    pub fn forget(&self, device: &str) {
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).remove(device);
    }
}

/// The device id in a credentials key.
pub fn device_of_key(key: &str) -> Option<String> {
    fluxmesh_schemas::kv::device_of_key(key.strip_prefix("d.")?)
}

impl AuthError {
    /// The request itself is wrong (not the store).
    pub fn is_invalid(&self) -> bool {
        matches!(
            self,
            AuthError::DeviceId(_) | AuthError::Filters(_) | AuthError::SecretLength | AuthError::HashParams(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_secret_is_checked_by_its_digest_and_only_it_matches() {
        let secret = generate_secret();
        let hash = digest_hash(secret.as_bytes());
        assert!(hash.starts_with(GENERATED_HASH), "{hash}");
        assert!(!hash.contains(&secret), "the secret is not stored");
        assert!(digest_matches(&hash, secret.as_bytes()));
        assert!(!digest_matches(&hash, generate_secret().as_bytes()));
        assert!(!digest_matches(&hash, b""));
        // An argon2 hash is never taken for a digest, whatever it holds.
        let argon = AuthConfig::default()
            .hasher()
            .expect("default parameters")
            .hash_password(secret.as_bytes(), &SaltString::generate(&mut OsRng))
            .expect("hash")
            .to_string();
        assert!(!is_digest(&argon) && !digest_matches(&argon, secret.as_bytes()));
    }
}
