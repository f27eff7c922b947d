//! Auth: the client's key → tenant and key id.
//!
//! In: the `Authorization: Bearer <key>` header (or `x-api-key`, as Anthropic SDKs send it).
//! Out: a [`Caller`], or an [`AuthError`] (401 `invalid_api_key`). Next: route.
//! Secrets are looked up by their SHA-256; the secret itself is never stored or logged.

use rand::Rng;
use sha2::{Digest, Sha256};

use crate::store::{ApiKey, Store, StoreError};

/// Who is calling, with the limits of its key and tenant.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Tenant name.
    pub tenant: String,
    /// API key id (not the secret).
    pub key_id: String,
    /// Public models the key may use; empty: every model.
    pub allowed_models: Vec<String>,
    /// The key's requests per minute.
    pub rpm: Option<u32>,
    /// The key's tokens per minute.
    pub tpm: Option<u64>,
    /// The tenant's cap on requests in flight.
    pub max_concurrency: Option<u32>,
    /// The key's spend per UTC day, at most, in micro-units.
    pub daily_spend_cap_micros: Option<u64>,
}

/// Why a request is not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No key in the request.
    #[error(
        "You didn't provide an API key. Send it in the Authorization header as `Bearer <key>`."
    )]
    Missing,
    /// The key is unknown, revoked, or its tenant disabled.
    #[error("Incorrect API key provided.")]
    Invalid,
    /// The key has expired.
    #[error("The API key has expired.")]
    Expired,
    /// The key store failed.
    #[error("the key store failed")]
    Store(#[from] StoreError),
}

/// Where a key's secret begins; lets leak scanners recognise Tollgate keys.
const SECRET_PREFIX: &str = "tg-";

/// Finds the caller of a request from its credential header values.
pub fn authenticate(
    store: &dyn Store,
    authorization: Option<&str>,
    x_api_key: Option<&str>,
    now_unix_ms: u64,
) -> Result<Caller, AuthError> {
    let secret = authorization
        .and_then(|value| {
            value
                .strip_prefix("Bearer ")
                .or(value.strip_prefix("bearer "))
        })
        .or(x_api_key)
        .map(str::trim)
        .filter(|secret| !secret.is_empty())
        .ok_or(AuthError::Missing)?;
    let key = store
        .key_by_secret_sha256(&secret_sha256(secret))?
        .ok_or(AuthError::Invalid)?;
    if key.revoked {
        return Err(AuthError::Invalid);
    }
    if key
        .expires_unix_ms
        .is_some_and(|expiry| now_unix_ms >= expiry)
    {
        return Err(AuthError::Expired);
    }
    let tenant = store.tenant(&key.tenant)?.ok_or(AuthError::Invalid)?;
    if tenant.disabled {
        return Err(AuthError::Invalid);
    }
    Ok(Caller {
        tenant: key.tenant,
        key_id: key.id,
        allowed_models: key.allowed_models,
        rpm: key.rpm,
        tpm: key.tpm,
        max_concurrency: tenant.max_concurrency,
        daily_spend_cap_micros: key.daily_spend_cap_micros,
    })
}

/// The lookup key of a secret.
pub fn secret_sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// What a new key may do.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyTerms {
    /// Expiry, milliseconds since the Unix epoch.
    pub expires_unix_ms: Option<u64>,
    /// Public models the key may use; empty: every model.
    pub allowed_models: Vec<String>,
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
    /// Spend per UTC day, at most, in micro-units.
    pub daily_spend_cap_micros: Option<u64>,
}

/// Creates a key for a tenant and returns it with its secret, which is shown once and never again.
pub fn issue_key(
    store: &dyn Store,
    tenant: &str,
    terms: KeyTerms,
    now_unix_ms: u64,
) -> Result<(ApiKey, String), StoreError> {
    let mut rng = rand::rng();
    let secret_bytes: [u8; 24] = rng.random();
    let id_bytes: [u8; 6] = rng.random();
    let secret = format!("{SECRET_PREFIX}{}", hex::encode(secret_bytes));
    let key = ApiKey {
        id: format!("key_{}", hex::encode(id_bytes)),
        tenant: tenant.to_owned(),
        prefix: secret[..SECRET_PREFIX.len() + 6].to_owned(),
        created_unix_ms: now_unix_ms,
        revoked: false,
        expires_unix_ms: terms.expires_unix_ms,
        allowed_models: terms.allowed_models,
        rpm: terms.rpm,
        tpm: terms.tpm,
        daily_spend_cap_micros: terms.daily_spend_cap_micros,
    };
    store.insert_key(&secret_sha256(&secret), &key)?;
    Ok((key, secret))
}
