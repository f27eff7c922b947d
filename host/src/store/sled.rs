//! The sled backend. Keyspaces are sled trees; values are JSON; balances are i128 big-endian.

use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use super::{
    ApiKey, MILLIS_PER_DAY, Reconciliation, Settlement, Store, StoreError, StoredBindingSlot,
    StoredChannel, StoredPlugin, Tenant, TopUp, UsageRecord, UsageRecords,
};

/// The default store: an embedded sled database in the data directory.
pub struct SledStore {
    db: sled::Db,
    tenants: sled::Tree,
    keys: sled::Tree,
    /// Key id → SHA-256 of its secret.
    key_ids: sled::Tree,
    balances: sled::Tree,
    ledger: sled::Tree,
    /// Request id → ledger key, for trace look-ups.
    ledger_by_request: sled::Tree,
    /// Holds of the requests in flight. In memory: none survives a restart (no request does), and
    /// writing them made two sled transactions per request, each sealing and writing a log buffer.
    /// The lock also orders a hold against a commit's debit, so a decision never sees half of one.
    holds: std::sync::Mutex<Holds>,
    /// Top-up records, time-ordered.
    top_ups: sled::Tree,
    /// (key id, UTC day) → what the key was charged that day (i128 big-endian).
    key_spend: sled::Tree,
    /// Tenant → charges of pruned ledger records (i128 big-endian), for reconcile.
    archived_charges: sled::Tree,
    /// Channel name → channel created through the admin API (keys sealed).
    api_channels: sled::Tree,
    /// Plugin hash → its metadata.
    plugins: sled::Tree,
    /// Plugin hash → its component bytes.
    plugin_bytes: sled::Tree,
    /// Scope key → binding slot.
    bindings: sled::Tree,
}

impl SledStore {
    /// Opens (or creates) the database under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join("sled");
        let db = sled::Config::new()
            .path(&path)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|error| match error {
                sled::Error::Io(io) if is_lock_conflict(&io) => StoreError::Locked {
                    path: data_dir.display().to_string(),
                },
                other => StoreError::Backend(other.to_string()),
            })?;
        let tree = |name: &str| db.open_tree(name).map_err(backend);
        // Data directories of 0.1 before holds moved to memory kept them in these trees.
        for retired in ["held", "holds"] {
            db.drop_tree(retired).map_err(backend)?;
        }
        Ok(Self {
            tenants: tree("tenants")?,
            keys: tree("api_keys")?,
            key_ids: tree("api_key_ids")?,
            balances: tree("balances")?,
            ledger: tree("ledger")?,
            ledger_by_request: tree("ledger_by_request")?,
            holds: std::sync::Mutex::new(Holds::default()),
            top_ups: tree("top_ups")?,
            key_spend: tree("key_spend")?,
            archived_charges: tree("archived_charges")?,
            api_channels: tree("api_channels")?,
            plugins: tree("plugins")?,
            plugin_bytes: tree("plugin_bytes")?,
            bindings: tree("bindings")?,
            db,
        })
    }
}

/// Holds of the requests in flight.
#[derive(Default)]
struct Holds {
    /// Hold id → tenant and amount, until the request settles.
    by_id: std::collections::HashMap<String, (String, u64)>,
    /// Tenant → the sum of its holds.
    held: std::collections::HashMap<String, i128>,
}

impl SledStore {
    fn holds(&self) -> std::sync::MutexGuard<'_, Holds> {
        // Every update below is complete before the guard drops: a panicking holder cannot leave
        // the two maps disagreeing.
        self.holds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// sled reports a held lock as an I/O error wrapping the `WouldBlock` of `flock`.
fn is_lock_conflict(error: &std::io::Error) -> bool {
    let inner_kind = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind);
    error.kind() == std::io::ErrorKind::WouldBlock
        || inner_kind == Some(std::io::ErrorKind::WouldBlock)
        || error.to_string().contains("could not acquire lock")
}

fn transaction_error(error: TransactionError<StoreError>) -> StoreError {
    match error {
        TransactionError::Abort(error) => error,
        TransactionError::Storage(error) => backend(error),
    }
}

fn backend(error: sled::Error) -> StoreError {
    StoreError::Backend(error.to_string())
}

fn decode<T: serde::de::DeserializeOwned>(
    keyspace: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|error| StoreError::Corrupt {
        keyspace,
        reason: error.to_string(),
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|error| StoreError::Backend(error.to_string()))
}

fn decode_balance(bytes: Option<sled::IVec>) -> Result<i128, StoreError> {
    let Some(bytes) = bytes else { return Ok(0) };
    let raw: [u8; 16] = bytes.as_ref().try_into().map_err(|_| StoreError::Corrupt {
        keyspace: "balances",
        reason: format!("{} bytes, expected 16", bytes.len()),
    })?;
    Ok(i128::from_be_bytes(raw))
}

fn spend_key(key_id: &str, day: u64) -> Vec<u8> {
    let mut key = key_id.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&day.to_be_bytes());
    key
}

/// Ledger keys sort by time: arrival millis (big-endian) then the request id, unique per request.
fn ledger_key(record: &UsageRecord) -> Vec<u8> {
    let mut key = record.unix_ms.to_be_bytes().to_vec();
    key.extend_from_slice(record.request_id.as_bytes());
    key
}

impl Store for SledStore {
    fn create_tenant(&self, tenant: &Tenant) -> Result<(), StoreError> {
        let swapped = self
            .tenants
            .compare_and_swap(tenant.name.as_str(), None::<&[u8]>, Some(encode(tenant)?))
            .map_err(backend)?;
        if swapped.is_err() {
            return Err(StoreError::Exists {
                what: "tenant",
                name: tenant.name.clone(),
            });
        }
        Ok(())
    }

    fn key_by_id(&self, key_id: &str) -> Result<Option<ApiKey>, StoreError> {
        let Some(hash) = self.key_ids.get(key_id).map_err(backend)? else {
            return Ok(None);
        };
        self.keys
            .get(hash)
            .map_err(backend)?
            .map(|bytes| decode("api_keys", &bytes))
            .transpose()
    }

    fn keys_of(&self, tenant: &str) -> Result<Vec<ApiKey>, StoreError> {
        let mut keys = Vec::new();
        for bytes in self.keys.iter().values() {
            let key: ApiKey = decode("api_keys", &bytes.map_err(backend)?)?;
            if key.tenant == tenant {
                keys.push(key);
            }
        }
        keys.sort_by_key(|key| key.created_unix_ms);
        Ok(keys)
    }

    fn revoke_key(&self, key_id: &str) -> Result<bool, StoreError> {
        let Some(hash) = self.key_ids.get(key_id).map_err(backend)? else {
            return Ok(false);
        };
        let Some(bytes) = self.keys.get(&hash).map_err(backend)? else {
            return Ok(false);
        };
        let mut key: ApiKey = decode("api_keys", &bytes)?;
        key.revoked = true;
        self.keys.insert(hash, encode(&key)?).map_err(backend)?;
        Ok(true)
    }

    fn disable_tenant(&self, name: &str) -> Result<bool, StoreError> {
        let Some(mut tenant) = self.tenant(name)? else {
            return Ok(false);
        };
        tenant.disabled = true;
        self.tenants
            .insert(name, encode(&tenant)?)
            .map_err(backend)?;
        Ok(true)
    }

    fn tenant(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        self.tenants
            .get(name)
            .map_err(backend)?
            .map(|bytes| decode("tenants", &bytes))
            .transpose()
    }

    fn tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        self.tenants
            .iter()
            .values()
            .map(|bytes| decode("tenants", &bytes.map_err(backend)?))
            .collect()
    }

    fn insert_key(&self, secret_sha256: &[u8; 32], key: &ApiKey) -> Result<(), StoreError> {
        if self.tenant(&key.tenant)?.is_none() {
            return Err(StoreError::Missing {
                what: "tenant",
                name: key.tenant.clone(),
            });
        }
        (&self.keys, &self.key_ids)
            .transaction(|(keys, key_ids)| {
                keys.insert(
                    secret_sha256.as_slice(),
                    encode(key).map_err(ConflictableTransactionError::Abort)?,
                )?;
                key_ids.insert(key.id.as_bytes(), secret_sha256.as_slice())?;
                Ok(())
            })
            .map_err(transaction_error)
    }

    fn key_by_secret_sha256(&self, secret_sha256: &[u8; 32]) -> Result<Option<ApiKey>, StoreError> {
        self.keys
            .get(secret_sha256)
            .map_err(backend)?
            .map(|bytes| decode("api_keys", &bytes))
            .transpose()
    }

    fn balance_picos(&self, tenant: &str) -> Result<i128, StoreError> {
        decode_balance(self.balances.get(tenant).map_err(backend)?)
    }

    fn available_picos(&self, tenant: &str) -> Result<i128, StoreError> {
        let holds = self.holds();
        let balance = self.balance_picos(tenant)?;
        Ok(balance - holds.held.get(tenant).copied().unwrap_or(0))
    }

    fn top_up(&self, top_up: &TopUp) -> Result<i128, StoreError> {
        if self.tenant(&top_up.tenant)?.is_none() {
            return Err(StoreError::Missing {
                what: "tenant",
                name: top_up.tenant.clone(),
            });
        }
        let value = encode(top_up)?;
        let mut key = top_up.unix_ms.to_be_bytes().to_vec();
        key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        (&self.top_ups, &self.balances)
            .transaction(|(top_ups, balances)| {
                top_ups.insert(key.as_slice(), value.as_slice())?;
                let current = decode_balance(balances.get(top_up.tenant.as_bytes())?)
                    .map_err(ConflictableTransactionError::Abort)?;
                let updated = current + top_up.amount_picos;
                balances.insert(top_up.tenant.as_bytes(), updated.to_be_bytes().to_vec())?;
                Ok(updated)
            })
            .map_err(transaction_error)
    }

    fn place_hold(
        &self,
        tenant: &str,
        hold_id: &str,
        amount_picos: u64,
        seen_available: i128,
    ) -> Result<bool, StoreError> {
        let mut holds = self.holds();
        let balance = self.balance_picos(tenant)?;
        let held = holds.held.get(tenant).copied().unwrap_or(0);
        if balance - held != seen_available {
            return Ok(false);
        }
        holds
            .held
            .insert(tenant.to_owned(), held + i128::from(amount_picos));
        holds
            .by_id
            .insert(hold_id.to_owned(), (tenant.to_owned(), amount_picos));
        Ok(true)
    }

    fn clear_holds(&self) -> Result<(), StoreError> {
        *self.holds() = Holds::default();
        Ok(())
    }

    fn commit_usages(&self, settlements: &[Settlement]) -> Result<(), StoreError> {
        let entries = settlements
            .iter()
            .map(|settlement| {
                let record = &settlement.record;
                Ok((
                    ledger_key(record),
                    encode(record)?,
                    i128::from(record.cost_picos.unwrap_or(0)),
                    spend_key(&record.key_id, record.unix_ms / MILLIS_PER_DAY),
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        // The debits and the release of the holds happen under the holds' lock, so a concurrent
        // `place_hold` sees both or neither.
        let mut holds = self.holds();
        (
            &self.ledger,
            &self.ledger_by_request,
            &self.balances,
            &self.key_spend,
        )
            .transaction(|(ledger, by_request, balances, key_spend)| {
                for (settlement, (key, value, cost, spend_key)) in settlements.iter().zip(&entries)
                {
                    let record = &settlement.record;
                    ledger.insert(key.as_slice(), value.as_slice())?;
                    by_request.insert(record.request_id.as_bytes(), key.as_slice())?;
                    if *cost != 0 {
                        let current = decode_balance(balances.get(record.tenant.as_bytes())?)
                            .map_err(ConflictableTransactionError::Abort)?;
                        balances.insert(
                            record.tenant.as_bytes(),
                            (current - cost).to_be_bytes().to_vec(),
                        )?;
                        let spent = decode_balance(key_spend.get(spend_key.as_slice())?)
                            .map_err(ConflictableTransactionError::Abort)?;
                        key_spend
                            .insert(spend_key.as_slice(), (spent + cost).to_be_bytes().to_vec())?;
                    }
                }
                Ok(())
            })
            .map_err(transaction_error)?;
        for hold_id in settlements
            .iter()
            .filter_map(|settlement| settlement.hold_id.as_deref())
        {
            if let Some((tenant, amount)) = holds.by_id.remove(hold_id)
                && let Some(held) = holds.held.get_mut(&tenant)
            {
                *held -= i128::from(amount);
                if *held == 0 {
                    holds.held.remove(&tenant);
                }
            }
        }
        Ok(())
    }

    fn key_spend_picos(&self, key_id: &str, day: u64) -> Result<i128, StoreError> {
        decode_balance(
            self.key_spend
                .get(spend_key(key_id, day))
                .map_err(backend)?,
        )
    }

    fn prune_usage(&self, before_unix_ms: u64) -> Result<u64, StoreError> {
        let mut pruned = 0;
        for entry in self.ledger.range(..before_unix_ms.to_be_bytes()) {
            let (key, value) = entry.map_err(backend)?;
            let record: UsageRecord = decode("ledger", &value)?;
            let cost = i128::from(record.cost_picos.unwrap_or(0));
            (
                &self.ledger,
                &self.ledger_by_request,
                &self.archived_charges,
            )
                .transaction(|(ledger, by_request, archived)| {
                    if ledger.remove(&key)?.is_none() {
                        return Ok(());
                    }
                    if by_request.get(record.request_id.as_bytes())?.as_deref() == Some(&key[..]) {
                        by_request.remove(record.request_id.as_bytes())?;
                    }
                    let total = decode_balance(archived.get(record.tenant.as_bytes())?)
                        .map_err(ConflictableTransactionError::Abort)?;
                    archived.insert(
                        record.tenant.as_bytes(),
                        (total + cost).to_be_bytes().to_vec(),
                    )?;
                    Ok(())
                })
                .map_err(transaction_error)?;
            pruned += 1;
        }
        Ok(pruned)
    }

    fn api_channels(&self) -> Result<Vec<StoredChannel>, StoreError> {
        self.api_channels
            .iter()
            .values()
            .map(|bytes| decode("api_channels", &bytes.map_err(backend)?))
            .collect()
    }

    fn put_api_channel(&self, channel: &StoredChannel) -> Result<(), StoreError> {
        self.api_channels
            .insert(channel.config.name.as_bytes(), encode(channel)?)
            .map_err(backend)?;
        Ok(())
    }

    fn delete_api_channel(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.api_channels.remove(name).map_err(backend)?.is_some())
    }

    fn plugins(&self) -> Result<Vec<StoredPlugin>, StoreError> {
        self.plugins
            .iter()
            .values()
            .map(|bytes| decode("plugins", &bytes.map_err(backend)?))
            .collect()
    }

    fn plugin(&self, sha256: &str) -> Result<Option<StoredPlugin>, StoreError> {
        self.plugins
            .get(sha256)
            .map_err(backend)?
            .map(|bytes| decode("plugins", &bytes))
            .transpose()
    }

    fn plugin_bytes(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .plugin_bytes
            .get(sha256)
            .map_err(backend)?
            .map(|bytes| bytes.to_vec()))
    }

    fn put_plugin(&self, plugin: &StoredPlugin, bytes: &[u8]) -> Result<(), StoreError> {
        let metadata = encode(plugin)?;
        (&self.plugins, &self.plugin_bytes)
            .transaction(|(plugins, plugin_bytes)| {
                plugin_bytes.insert(plugin.sha256.as_bytes(), bytes)?;
                plugins.insert(plugin.sha256.as_bytes(), metadata.as_slice())?;
                Ok(())
            })
            .map_err(transaction_error)
    }

    fn delete_plugin(&self, sha256: &str) -> Result<bool, StoreError> {
        (&self.plugins, &self.plugin_bytes)
            .transaction(|(plugins, plugin_bytes)| {
                plugin_bytes.remove(sha256.as_bytes())?;
                Ok(plugins.remove(sha256.as_bytes())?.is_some())
            })
            .map_err(transaction_error)
    }

    fn binding_slots(&self) -> Result<Vec<(String, StoredBindingSlot)>, StoreError> {
        self.bindings
            .iter()
            .map(|entry| {
                let (key, value) = entry.map_err(backend)?;
                Ok((
                    String::from_utf8_lossy(&key).into_owned(),
                    decode("bindings", &value)?,
                ))
            })
            .collect()
    }

    fn put_binding_slot(&self, scope: &str, slot: &StoredBindingSlot) -> Result<(), StoreError> {
        self.bindings
            .insert(scope.as_bytes(), encode(slot)?)
            .map_err(backend)?;
        Ok(())
    }

    fn reconcile(&self) -> Result<Vec<Reconciliation>, StoreError> {
        let mut books: std::collections::BTreeMap<String, Reconciliation> = self
            .tenants()?
            .into_iter()
            .map(|tenant| {
                let entry = Reconciliation {
                    tenant: tenant.name.clone(),
                    balance_picos: 0,
                    top_ups_picos: 0,
                    charges_picos: 0,
                    difference_picos: 0,
                    unpriced_records: 0,
                };
                (tenant.name, entry)
            })
            .collect();
        for top_up in self.top_ups.iter().values() {
            let top_up: TopUp = decode("top_ups", &top_up.map_err(backend)?)?;
            if let Some(entry) = books.get_mut(&top_up.tenant) {
                entry.top_ups_picos += top_up.amount_picos;
            }
        }
        for record in self.usage_between(0, u64::MAX) {
            let record = record?;
            if let Some(entry) = books.get_mut(&record.tenant) {
                match record.cost_picos {
                    Some(cost) => entry.charges_picos += i128::from(cost),
                    None if record.status == 200 => entry.unpriced_records += 1,
                    None => {}
                }
            }
        }
        for entry in books.values_mut() {
            entry.charges_picos +=
                decode_balance(self.archived_charges.get(&entry.tenant).map_err(backend)?)?;
            entry.balance_picos = self.balance_picos(&entry.tenant)?;
            entry.difference_picos =
                entry.balance_picos - (entry.top_ups_picos - entry.charges_picos);
        }
        Ok(books.into_values().collect())
    }

    fn usage_between(&self, from_unix_ms: u64, to_unix_ms: u64) -> UsageRecords {
        let range = self
            .ledger
            .range(from_unix_ms.to_be_bytes()..to_unix_ms.to_be_bytes());
        Box::new(
            range
                .values()
                .map(|bytes| decode("ledger", &bytes.map_err(backend)?)),
        )
    }

    fn usage_by_request(&self, request_id: &str) -> Result<Option<UsageRecord>, StoreError> {
        let Some(key) = self.ledger_by_request.get(request_id).map_err(backend)? else {
            return Ok(None);
        };
        self.ledger
            .get(key)
            .map_err(backend)?
            .map(|bytes| decode("ledger", &bytes))
            .transpose()
    }

    fn check(&self) -> Result<(), StoreError> {
        self.tenants.first().map_err(backend).map(drop)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(backend).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RecordedUsage;

    fn record(request_id: &str, cost_picos: u64) -> UsageRecord {
        serde_json::from_value(serde_json::json!({
            "unix_ms": 86_400_000u64 * 20_000,
            "request_id": request_id,
            "tenant": "acme",
            "key_id": "key_1",
            "operation": "chat",
            "model_asked": "m",
            "degraded_to": null,
            "model_served": "m",
            "channel": "c",
            "model_mismatch": false,
            "stream": false,
            "attempts": [],
            "usage": RecordedUsage::default(),
            "cost_picos": cost_picos,
            "line_items": [],
            "latency_ms": 1,
            "status": 200,
            "error_class": null,
            "plugins": [],
        }))
        .expect("a well-formed record")
    }

    #[test]
    fn a_group_commit_records_debits_and_releases_every_hold_at_once() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = SledStore::open(dir.path()).expect("the store opens");
        store
            .create_tenant(&Tenant {
                name: "acme".into(),
                created_unix_ms: 0,
                disabled: false,
                max_concurrency: None,
            })
            .expect("a tenant");
        store
            .top_up(&TopUp {
                tenant: "acme".into(),
                amount_picos: 1_000,
                reason: "test".into(),
                unix_ms: 0,
            })
            .expect("a top-up");
        assert!(store.place_hold("acme", "h1", 300, 1_000).expect("placed"));
        assert!(
            !store.place_hold("acme", "h2", 200, 1_000).expect("checked"),
            "a decision on a stale available amount is refused"
        );
        assert!(store.place_hold("acme", "h2", 200, 700).expect("placed"));
        assert_eq!(store.available_picos("acme").expect("read"), 500);

        store
            .commit_usages(&[
                Settlement {
                    record: record("r1", 250),
                    hold_id: Some("h1".into()),
                },
                Settlement {
                    record: record("r2", 100),
                    hold_id: Some("h2".into()),
                },
            ])
            .expect("committed");
        assert_eq!(store.balance_picos("acme").expect("read"), 650);
        assert_eq!(
            store.available_picos("acme").expect("read"),
            650,
            "holds released"
        );
        for id in ["r1", "r2"] {
            assert!(store.usage_by_request(id).expect("read").is_some(), "{id}");
        }
        assert_eq!(store.key_spend_picos("key_1", 20_000).expect("read"), 350);
        assert!(store.holds().by_id.is_empty() && store.holds().held.is_empty());
    }
}
