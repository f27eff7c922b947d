//! Upstream secrets at rest: the keys of channels created through the admin API are sealed with
//! ChaCha20-Poly1305 under a master key from `TOLLGATE_MASTER_KEY` (64 hex digits), so neither the
//! sled files nor a backup of them hold a usable secret. Secrets are opened only in memory, to be
//! injected into upstream requests; no API answer or log line ever holds one.

use std::borrow::Cow;
use std::collections::HashSet;

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

/// A secret read from the configuration (a bearer token): its `Debug` shows `[redacted]`, so a
/// logged configuration never holds it.
#[derive(Clone, serde::Deserialize)]
#[serde(transparent)]
pub struct Redacted(String);

impl Redacted {
    /// The secret itself, for the one place that compares it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Redacted {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(REDACTED)
    }
}

/// The shortest run of a secret that is scrubbed: any 8 bytes of a key in a row.
const SCRUBBED_RUN: usize = 8;

/// What replaces a run of secret text.
const REDACTED: &str = "[redacted]";

/// Removes a channel's upstream secrets from text an upstream wrote (error bodies and in-stream
/// error events) before it reaches a client, a log line, a trace or a record: an upstream may echo
/// the key it was sent, in full or in part. Every run of 8 or more bytes that also occurs in one of
/// the keys is replaced. Answer content is not scanned.
#[derive(Debug, Default)]
pub struct SecretScrubber {
    /// Every 8-byte window of every key: a text holds a run of 8 or more bytes of a key exactly
    /// when one of its own 8-byte windows is in here.
    windows: HashSet<[u8; SCRUBBED_RUN]>,
}

impl SecretScrubber {
    /// A scrubber for these secrets.
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        let windows = secrets
            .into_iter()
            .flat_map(|secret| {
                secret
                    .as_bytes()
                    .windows(SCRUBBED_RUN)
                    .filter_map(|window| window.try_into().ok())
            })
            .collect();
        Self { windows }
    }

    /// `text` with every run of secret bytes replaced by `[redacted]`.
    pub fn scrub<'t>(&self, text: &'t str) -> Cow<'t, str> {
        match self.scrub_bytes(text.as_bytes()) {
            Cow::Borrowed(_) => Cow::Borrowed(text),
            // Runs are cut where a key's bytes are, which may split a character: say so lossily.
            Cow::Owned(bytes) => Cow::Owned(String::from_utf8_lossy(&bytes).into_owned()),
        }
    }

    /// The same for bytes.
    pub fn scrub_bytes<'t>(&self, text: &'t [u8]) -> Cow<'t, [u8]> {
        if self.windows.is_empty() || text.len() < SCRUBBED_RUN {
            return Cow::Borrowed(text);
        }
        // Each byte covered by a window found among the keys.
        let mut secret = vec![false; text.len()];
        let mut found = false;
        for (start, window) in text.windows(SCRUBBED_RUN).enumerate() {
            if window
                .try_into()
                .is_ok_and(|window: [u8; SCRUBBED_RUN]| self.windows.contains(&window))
            {
                secret[start..start + SCRUBBED_RUN].fill(true);
                found = true;
            }
        }
        if !found {
            return Cow::Borrowed(text);
        }
        let mut scrubbed = Vec::with_capacity(text.len());
        let mut index = 0;
        while index < text.len() {
            if secret[index] {
                scrubbed.extend_from_slice(REDACTED.as_bytes());
                while index < text.len() && secret[index] {
                    index += 1;
                }
            } else {
                scrubbed.push(text[index]);
                index += 1;
            }
        }
        Cow::Owned(scrubbed)
    }
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

    #[test]
    fn every_run_of_eight_bytes_of_a_key_is_scrubbed_and_nothing_else() {
        let key = "sk-live-0123456789abcdefghij";
        let scrubber = SecretScrubber::new([key, "short"]);
        let echoed = format!(
            "Incorrect API key provided: {key}. Yours ends in {}.",
            &key[14..24]
        );
        let scrubbed = scrubber.scrub(&echoed);
        assert_eq!(
            scrubbed,
            "Incorrect API key provided: [redacted]. Yours ends in [redacted]."
        );
        for start in 0..key.len() - 8 {
            assert!(!scrubbed.contains(&key[start..start + 8]), "{scrubbed}");
        }
        // Seven bytes of a key, and keys shorter than eight bytes, are not secrets here.
        assert_eq!(
            scrubber.scrub("key sk-live and short"),
            "key sk-live and short"
        );
        assert!(matches!(scrubber.scrub("nothing secret"), Cow::Borrowed(_)));
    }

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
