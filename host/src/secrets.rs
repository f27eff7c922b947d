//! Upstream secrets at rest: the keys of channels created through the admin API are sealed with
//! ChaCha20-Poly1305 under a master key from `TOLLGATE_MASTER_KEY` (64 hex digits), so neither the
//! sled files nor a backup of them hold a usable secret. Secrets are opened only in memory, to be
//! injected into upstream requests; no API answer or log line ever holds one.

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

/// The environment variable holding the master key.
pub const MASTER_KEY_ENV: &str = "TOLLGATE_MASTER_KEY";

/// Why a secret could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The master key is not 32 bytes of hex.
    #[error("{MASTER_KEY_ENV} must be 64 hex digits (32 bytes)")]
    BadMasterKey,
    /// A sealed secret is damaged, or was sealed under another master key.
    #[error("a sealed secret cannot be opened (damaged, or sealed under another master key)")]
    Corrupt,
}

/// Seals and opens secrets under the master key.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
}

const NONCE_BYTES: usize = 12;

impl Sealer {
    /// The sealer of `TOLLGATE_MASTER_KEY`; `None` when the variable is unset.
    pub fn from_env() -> Result<Option<Self>, SealError> {
        match std::env::var(MASTER_KEY_ENV) {
            Ok(hex_key) if !hex_key.trim().is_empty() => Self::from_hex(hex_key.trim()).map(Some),
            _ => Ok(None),
        }
    }

    /// A sealer for a 32-byte key given as hex.
    pub fn from_hex(hex_key: &str) -> Result<Self, SealError> {
        let bytes = hex::decode(hex_key).map_err(|_| SealError::BadMasterKey)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| SealError::BadMasterKey)?;
        Ok(Self {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
        })
    }

    /// Seals a secret: hex of a fresh random nonce followed by the ciphertext and tag.
    pub fn seal(&self, secret: &str) -> String {
        let nonce: [u8; NONCE_BYTES] = rand::random();
        // Encryption fails only for inputs over 256 GiB, which no secret is.
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), secret.as_bytes())
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        hex::encode(out)
    }

    /// Opens a sealed secret.
    pub fn open(&self, sealed: &str) -> Result<String, SealError> {
        let bytes = hex::decode(sealed).map_err(|_| SealError::Corrupt)?;
        if bytes.len() < NONCE_BYTES {
            return Err(SealError::Corrupt);
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_BYTES);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), ciphertext)
            .map_err(|_| SealError::Corrupt)?;
        String::from_utf8(plain).map_err(|_| SealError::Corrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn sealed_secrets_open_only_under_their_key() {
        let sealer = Sealer::from_hex(KEY).unwrap();
        let sealed = sealer.seal("sk-upstream-secret");
        assert!(!sealed.contains(&hex::encode("sk-upstream-secret")));
        assert_ne!(
            sealed,
            sealer.seal("sk-upstream-secret"),
            "a fresh nonce each time"
        );
        assert_eq!(sealer.open(&sealed).unwrap(), "sk-upstream-secret");
        let other = Sealer::from_hex(&KEY.replace("00", "ff")).unwrap();
        assert!(matches!(other.open(&sealed), Err(SealError::Corrupt)));
        let mut tampered = sealed.clone();
        tampered.replace_range(30..32, if &sealed[30..32] == "00" { "01" } else { "00" });
        assert!(sealer.open(&tampered).is_err());
    }

    #[test]
    fn a_malformed_master_key_is_refused() {
        assert!(matches!(
            Sealer::from_hex("abcd"),
            Err(SealError::BadMasterKey)
        ));
        assert!(matches!(
            Sealer::from_hex(&"zz".repeat(32)),
            Err(SealError::BadMasterKey)
        ));
    }
}
