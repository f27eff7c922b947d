//! How the store's values are written as bytes: JSON for what operators may read, postcard for
//! the ledger's records, big-endian fixed widths for numbers; and how backend errors read.

use sled::transaction::TransactionError;

use super::{StoreError, UsageRecord};

pub(super) fn transaction_error(error: TransactionError<StoreError>) -> StoreError {
    match error {
        TransactionError::Abort(error) => error,
        TransactionError::Storage(error) => backend(error),
    }
}

pub(super) fn backend(error: sled::Error) -> StoreError {
    StoreError::Backend(error.to_string())
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(
    keyspace: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|error| StoreError::Corrupt {
        keyspace,
        reason: error.to_string(),
    })
}

/// A tree's JSON value under `key`, decoded; `None` for an absent key.
pub(super) fn get_decoded<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    keyspace: &'static str,
    key: impl AsRef<[u8]>,
) -> Result<Option<T>, StoreError> {
    tree.get(key)
        .map_err(backend)?
        .map(|bytes| decode(keyspace, &bytes))
        .transpose()
}

pub(super) fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|error| StoreError::Backend(error.to_string()))
}

/// The first byte of a usage record stored compactly in the ledger tree. Records written before
/// are JSON, whose first byte is `{`. The compact form has no field names, so a change to
/// `UsageRecord`'s fields needs a new byte here, with records of the old one still decoded.
pub(super) const COMPACT_RECORD: u8 = 2;

/// The compact form before `written_off_picos`. postcard writes fields in order, so such a record
/// with a zero written-off (one byte, 0) appended is the same record in today's form.
const COMPACT_RECORD_BEFORE_WRITE_OFFS: u8 = 1;

/// A usage record as the ledger tree keeps it: the version byte, then postcard. Its JSON is several
/// times longer (~920 bytes for a one-attempt request) and sled's work per insert grows with the
/// bytes: A/B at concurrency 32, gateway CPU per request 273 -> 247 us and 343 -> 332 us in two runs.
pub(super) fn encode_record(record: &UsageRecord) -> Result<Vec<u8>, StoreError> {
    let mut stored = vec![COMPACT_RECORD];
    postcard::to_io(record, &mut stored).map_err(|error| StoreError::Backend(error.to_string()))?;
    Ok(stored)
}

/// Reads a ledger tree value, compact or JSON.
pub(super) fn decode_record(bytes: &[u8]) -> Result<UsageRecord, StoreError> {
    let corrupt = |error: postcard::Error| StoreError::Corrupt {
        keyspace: "ledger",
        reason: error.to_string(),
    };
    match bytes.split_first() {
        Some((&COMPACT_RECORD, compact)) => postcard::from_bytes(compact).map_err(corrupt),
        Some((&COMPACT_RECORD_BEFORE_WRITE_OFFS, compact)) => {
            let mut current = compact.to_vec();
            current.push(0);
            postcard::from_bytes(&current).map_err(corrupt)
        }
        _ => decode("ledger", bytes),
    }
}

pub(super) fn decode_balance(bytes: Option<sled::IVec>) -> Result<i128, StoreError> {
    Ok(fixed_width("balances", bytes)?.map_or(0, i128::from_be_bytes))
}

/// A fixed-width value of a tree (big-endian numbers); `None` for an absent key.
pub(super) fn fixed_width<const N: usize>(
    keyspace: &'static str,
    bytes: Option<sled::IVec>,
) -> Result<Option<[u8; N]>, StoreError> {
    bytes
        .map(|bytes| {
            bytes.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                keyspace,
                reason: format!("{} bytes, expected {N}", bytes.len()),
            })
        })
        .transpose()
}

pub(super) fn spend_key(key_id: &str, day: u64) -> Vec<u8> {
    let mut key = key_id.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&day.to_be_bytes());
    key
}
