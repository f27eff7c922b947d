//! The sled backend. Keyspaces are sled trees; values are JSON; balances are i128 big-endian.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::path::Path;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, PoisonError, RwLock, RwLockWriteGuard};

use sled::transaction::{ConflictableTransactionError, Transactional};

use super::codec::{
    backend, decode, decode_balance, decode_record, encode, get_decoded, spend_key,
    transaction_error,
};
use super::ledger_books::{self, Backlog, Ledger, PlacedHold};
use super::{
    ApiKey, Durable, HoldOutcome, HoldRequest, LedgerSync, OpenedRequest, Reconciliation,
    Settlement, Store, StoreError, StoredBindingSlot, StoredChannel, StoredPlugin, Tenant, TopUp,
    UsageRecord, UsageRecords,
};

/// The default store: an embedded sled database in the data directory.
pub struct SledStore {
    db: sled::Db,
    tenants: sled::Tree,
    /// Tenants read so far, for the request path.
    tenants_read: ReadThrough<String, Tenant>,
    keys: sled::Tree,
    /// Keys read so far by the SHA-256 of their secret, for the request path.
    keys_read: ReadThrough<[u8; 32], ApiKey>,
    /// Key id → SHA-256 of its secret.
    key_ids: sled::Tree,
    /// Balances, the usage ledger, key spend, and the books of holds and of committed records
    /// on their way into those trees.
    ledger: Arc<Ledger>,
    /// Wakes the thread that moves committed records into the ledger's trees.
    applier: SyncSender<()>,
    /// Top-up records, time-ordered.
    top_ups: sled::Tree,
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

/// sled's page cache. With its default (1 GiB) a gateway under load grows toward it with ledger
/// pages it wrote and rarely reads again: after 30 s at concurrency 32, peak RSS 317 MiB and 351 µs
/// of CPU per request, against 198 MiB and 307 µs with this. What the request path reads is small
/// (balances; keys and tenants are kept decoded below); usage queries over old records read
/// through the operating system's file cache.
const CACHE_BYTES: u64 = 64 << 20;

/// Entries of a tree that every request reads (its key, its tenant), kept decoded in memory: a tree
/// read and a JSON decode per request cost ~2 % of the gateway's CPU. This process is the store's
/// only writer, and a write replaces the tree's entry and drops the cached one under the same lock
/// a miss is filled under, so what is cached is never older than the tree. Only entries that exist
/// are kept: guessed keys cannot grow it.
struct ReadThrough<K, V> {
    entries: RwLock<HashMap<K, V>>,
}

impl<K: Eq + Hash, V: Clone> ReadThrough<K, V> {
    fn new() -> Self {
        Self {
            entries: RwLock::new(HashMap::new()),
        }
    }

    /// The cached value, or `read`'s from the tree (then cached).
    fn get<Q>(
        &self,
        key: &Q,
        read: impl FnOnce() -> Result<Option<V>, StoreError>,
    ) -> Result<Option<V>, StoreError>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ToOwned<Owned = K> + ?Sized,
    {
        let cached = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(value) = cached.get(key) {
            return Ok(Some(value.clone()));
        }
        drop(cached);
        let mut entries = self.writing();
        if let Some(value) = entries.get(key) {
            return Ok(Some(value.clone()));
        }
        let value = read()?;
        if let Some(value) = &value {
            entries.insert(key.to_owned(), value.clone());
        }
        Ok(value)
    }

    /// Held across a write of the tree, which then drops the entry it changed.
    fn writing(&self) -> RwLockWriteGuard<'_, HashMap<K, V>> {
        self.entries.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl SledStore {
    /// Opens (or creates) the database under `data_dir`, its ledger log synced as `sync` says.
    pub fn open(data_dir: &Path, sync: LedgerSync) -> Result<Self, StoreError> {
        let path = data_dir.join("sled");
        let db = sled::Config::new()
            .path(&path)
            .flush_every_ms(Some(500))
            .cache_capacity(CACHE_BYTES)
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
        // Records committed before a crash (or an unclean stop) that the trees may lack are
        // applied here.
        let ledger = Ledger::open(&db, data_dir.join("ledger.log"), sync)?;
        let applier = ledger_books::start_applier(&ledger)?;
        Ok(Self {
            tenants: tree("tenants")?,
            tenants_read: ReadThrough::new(),
            keys: tree("api_keys")?,
            keys_read: ReadThrough::new(),
            key_ids: tree("api_key_ids")?,
            ledger,
            applier,
            top_ups: tree("top_ups")?,
            archived_charges: tree("archived_charges")?,
            api_channels: tree("api_channels")?,
            plugins: tree("plugins")?,
            plugin_bytes: tree("plugin_bytes")?,
            bindings: tree("bindings")?,
            db,
        })
    }
}

impl SledStore {
    /// Runs an operator's change and flushes it: what the admin API acknowledges survives a
    /// crash. (Commits of usage records have their own log and never wait for a flush.)
    fn durable<T>(&self, change: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let value = change()?;
        self.db.flush().map_err(backend)?;
        Ok(value)
    }

    /// Brings the trees up to date before a read of the ledger or the balances.
    fn applied(&self) -> Result<(), StoreError> {
        self.ledger.apply_pending(None)
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

impl Store for SledStore {
    fn create_tenant(&self, tenant: &Tenant) -> Result<(), StoreError> {
        self.durable(|| {
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
        })
    }

    fn key_by_id(&self, key_id: &str) -> Result<Option<ApiKey>, StoreError> {
        let Some(hash) = self.key_ids.get(key_id).map_err(backend)? else {
            return Ok(None);
        };
        get_decoded(&self.keys, "api_keys", hash)
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

    fn update_key(
        &self,
        key_id: &str,
        change: &mut dyn FnMut(&mut ApiKey),
    ) -> Result<Option<ApiKey>, StoreError> {
        self.durable(|| {
            let Some(hash) = self.key_ids.get(key_id).map_err(backend)? else {
                return Ok(None);
            };
            let Some(bytes) = self.keys.get(&hash).map_err(backend)? else {
                return Ok(None);
            };
            let mut key: ApiKey = decode("api_keys", &bytes)?;
            change(&mut key);
            let mut cached = self.keys_read.writing();
            self.keys.insert(&hash, encode(&key)?).map_err(backend)?;
            if let Ok(sha256) = <[u8; 32]>::try_from(&hash[..]) {
                cached.remove(&sha256);
            }
            Ok(Some(key))
        })
    }

    fn set_tenant_disabled(&self, name: &str, disabled: bool) -> Result<bool, StoreError> {
        self.durable(|| {
            let Some(mut tenant) = self.tenant(name)? else {
                return Ok(false);
            };
            tenant.disabled = disabled;
            let mut cached = self.tenants_read.writing();
            self.tenants
                .insert(name, encode(&tenant)?)
                .map_err(backend)?;
            cached.remove(name);
            Ok(true)
        })
    }

    fn tenant(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        self.tenants_read
            .get(name, || get_decoded(&self.tenants, "tenants", name))
    }

    fn tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        self.tenants
            .iter()
            .values()
            .map(|bytes| decode("tenants", &bytes.map_err(backend)?))
            .collect()
    }

    fn insert_key(&self, secret_sha256: &[u8; 32], key: &ApiKey) -> Result<(), StoreError> {
        self.durable(|| {
            if self.tenant(&key.tenant)?.is_none() {
                return Err(StoreError::Missing {
                    what: "tenant",
                    name: key.tenant.clone(),
                });
            }
            let mut cached = self.keys_read.writing();
            cached.remove(secret_sha256);
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
        })
    }

    fn key_by_secret_sha256(&self, secret_sha256: &[u8; 32]) -> Result<Option<ApiKey>, StoreError> {
        self.keys_read.get(secret_sha256, || {
            get_decoded(&self.keys, "api_keys", secret_sha256)
        })
    }

    fn balance_picos(&self, tenant: &str) -> Result<i128, StoreError> {
        Ok(self.ledger.books().balance(tenant))
    }

    fn available_picos(&self, tenant: &str) -> Result<i128, StoreError> {
        let books = self.ledger.books();
        Ok(books.balance(tenant) - books.held.get(tenant).copied().unwrap_or(0))
    }

    fn top_up(&self, top_up: &TopUp) -> Result<i128, StoreError> {
        self.durable(|| {
            if self.tenant(&top_up.tenant)?.is_none() {
                return Err(StoreError::Missing {
                    what: "tenant",
                    name: top_up.tenant.clone(),
                });
            }
            self.applied()?;
            let value = encode(top_up)?;
            let mut key = top_up.unix_ms.to_be_bytes().to_vec();
            key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
            let updated = (&self.top_ups, &self.ledger.balances)
                .transaction(|(top_ups, balances)| {
                    top_ups.insert(key.as_slice(), value.as_slice())?;
                    let current = decode_balance(balances.get(top_up.tenant.as_bytes())?)
                        .map_err(ConflictableTransactionError::Abort)?;
                    let updated = current + top_up.amount_picos;
                    balances.insert(top_up.tenant.as_bytes(), updated.to_be_bytes().to_vec())?;
                    Ok(updated)
                })
                .map_err(transaction_error)?;
            self.ledger.credited(&top_up.tenant, top_up.amount_picos);
            Ok(updated)
        })
    }

    fn place_hold(&self, hold: &HoldRequest<'_>) -> Result<HoldOutcome, StoreError> {
        let mut books = self.ledger.books();
        let balance = books.balance(hold.tenant);
        let held = books.held.get(hold.tenant).copied().unwrap_or(0);
        if balance - held != hold.seen_available {
            return Ok(HoldOutcome::BalanceChanged);
        }
        if let Some((cap_picos, day)) = hold.key_cap {
            let spent = self
                .ledger
                .key_spend(&mut books, &spend_key(hold.key_id, day))?;
            let key_held = books.held_by_key.get(hold.key_id).copied().unwrap_or(0);
            if spent + key_held + i128::from(hold.amount_picos) > cap_picos {
                return Ok(HoldOutcome::OverKeyCap);
            }
        }
        books.hold(
            hold.hold_id,
            PlacedHold {
                tenant: hold.tenant.to_owned(),
                key_id: hold.key_id.to_owned(),
                amount: hold.amount_picos,
            },
        );
        Ok(HoldOutcome::Placed)
    }

    fn clear_holds(&self) -> Result<(), StoreError> {
        self.ledger.books().clear_holds();
        Ok(())
    }

    fn commit_usages(&self, settlements: &[Settlement]) -> Result<Durable, StoreError> {
        // Committed once logged: the trees take the records later, in a batch.
        let (backlog, durable) = self.ledger.commit(settlements)?;
        match backlog {
            Backlog::Small => {}
            Backlog::Due => ledger_books::wake(&self.applier),
            Backlog::Full => {
                if let Err(error) = self.ledger.apply_pending(None) {
                    // The records stay committed (logged and counted); a later batch retries.
                    tracing::warn!(%error, "applying the ledger backlog failed");
                }
            }
        }
        Ok(durable)
    }

    fn open_request(&self, opened: &OpenedRequest) -> Result<(), StoreError> {
        self.ledger.open_request(opened)
    }

    fn mark_progress(&self, hold_id: &str, delivered_text_bytes: u64) -> Result<(), StoreError> {
        self.ledger.mark_progress(hold_id, delivered_text_bytes)
    }

    fn unsettled_requests(&self) -> Result<Vec<(OpenedRequest, u64)>, StoreError> {
        Ok(self.ledger.take_unsettled())
    }

    fn key_committed_picos(&self, key_id: &str, day: u64) -> Result<i128, StoreError> {
        let mut books = self.ledger.books();
        let spent = self.ledger.key_spend(&mut books, &spend_key(key_id, day))?;
        Ok(spent + books.held_by_key.get(key_id).copied().unwrap_or(0))
    }

    fn prune_usage(&self, before_unix_ms: u64) -> Result<u64, StoreError> {
        self.durable(|| {
            self.applied()?;
            let mut pruned = 0;
            for entry in self.ledger.records.range(..before_unix_ms.to_be_bytes()) {
                let (key, value) = entry.map_err(backend)?;
                let record = decode_record(&value)?;
                let cost = i128::from(record.cost_picos.unwrap_or(0));
                (
                    &self.ledger.records,
                    &self.ledger.by_request,
                    &self.archived_charges,
                )
                    .transaction(|(ledger, by_request, archived)| {
                        if ledger.remove(&key)?.is_none() {
                            return Ok(());
                        }
                        if by_request.get(record.request_id.as_bytes())?.as_deref()
                            == Some(&key[..])
                        {
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
        })
    }

    fn api_channels(&self) -> Result<Vec<StoredChannel>, StoreError> {
        self.api_channels
            .iter()
            .values()
            .map(|bytes| decode("api_channels", &bytes.map_err(backend)?))
            .collect()
    }

    fn put_api_channel(&self, channel: &StoredChannel) -> Result<(), StoreError> {
        self.durable(|| {
            self.api_channels
                .insert(channel.config.name.as_bytes(), encode(channel)?)
                .map_err(backend)?;
            Ok(())
        })
    }

    fn delete_api_channel(&self, name: &str) -> Result<bool, StoreError> {
        self.durable(|| Ok(self.api_channels.remove(name).map_err(backend)?.is_some()))
    }

    fn plugins(&self) -> Result<Vec<StoredPlugin>, StoreError> {
        self.plugins
            .iter()
            .values()
            .map(|bytes| decode("plugins", &bytes.map_err(backend)?))
            .collect()
    }

    fn plugin(&self, sha256: &str) -> Result<Option<StoredPlugin>, StoreError> {
        get_decoded(&self.plugins, "plugins", sha256)
    }

    fn plugin_bytes(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .plugin_bytes
            .get(sha256)
            .map_err(backend)?
            .map(|bytes| bytes.to_vec()))
    }

    fn put_plugin(&self, plugin: &StoredPlugin, bytes: &[u8]) -> Result<(), StoreError> {
        self.durable(|| {
            let metadata = encode(plugin)?;
            (&self.plugins, &self.plugin_bytes)
                .transaction(|(plugins, plugin_bytes)| {
                    plugin_bytes.insert(plugin.sha256.as_bytes(), bytes)?;
                    plugins.insert(plugin.sha256.as_bytes(), metadata.as_slice())?;
                    Ok(())
                })
                .map_err(transaction_error)
        })
    }

    fn delete_plugin(&self, sha256: &str) -> Result<bool, StoreError> {
        self.durable(|| {
            (&self.plugins, &self.plugin_bytes)
                .transaction(|(plugins, plugin_bytes)| {
                    plugin_bytes.remove(sha256.as_bytes())?;
                    Ok(plugins.remove(sha256.as_bytes())?.is_some())
                })
                .map_err(transaction_error)
        })
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
        self.durable(|| {
            self.bindings
                .insert(scope.as_bytes(), encode(slot)?)
                .map_err(backend)?;
            Ok(())
        })
    }

    fn reconcile(&self) -> Result<Vec<Reconciliation>, StoreError> {
        self.applied()?;
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
                    written_off_picos: 0,
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
                entry.written_off_picos += i128::from(record.written_off_picos);
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
        if let Err(error) = self.applied() {
            return Box::new(std::iter::once(Err(error)));
        }
        let range = self
            .ledger
            .records
            .range(from_unix_ms.to_be_bytes()..to_unix_ms.to_be_bytes());
        Box::new(
            range
                .values()
                .map(|bytes| decode_record(&bytes.map_err(backend)?)),
        )
    }

    fn usage_by_request(&self, request_id: &str) -> Result<Option<UsageRecord>, StoreError> {
        self.applied()?;
        let Some(key) = self.ledger.by_request.get(request_id).map_err(backend)? else {
            return Ok(None);
        };
        self.ledger
            .records
            .get(key)
            .map_err(backend)?
            .map(|bytes| decode_record(&bytes))
            .transpose()
    }

    fn check(&self) -> Result<(), StoreError> {
        self.tenants.first().map_err(backend).map(drop)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.ledger.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RecordedUsage;
    use crate::store::codec::{COMPACT_RECORD, encode_record};
    use crate::store::ledger_books::{APPLY_BATCH, Ledger, SEAL_RECORDS};
    use crate::store::ledger_log::LedgerLog;

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

    /// Commits one record with no hold.
    fn commit(store: &SledStore, request_id: &str, cost_picos: u64) {
        let _durable = store
            .commit_usages(&[Settlement {
                record: record(request_id, cost_picos),
                hold_id: None,
            }])
            .expect("committed");
    }

    /// A ledger with no applier thread: the test plays it.
    fn ledger_without_applier(dir: &Path) -> std::sync::Arc<Ledger> {
        let db = sled::Config::new()
            .path(dir.join("db"))
            .open()
            .expect("sled opens");
        Ledger::open(&db, dir.join("ledger.log"), LedgerSync::None).expect("the ledger opens")
    }

    /// Commits one record with no hold to a bare ledger.
    fn commit_to(ledger: &Ledger, request_id: &str, cost_picos: u64) {
        let _durable = ledger
            .commit(&[Settlement {
                record: record(request_id, cost_picos),
                hold_id: None,
            }])
            .expect("committed");
    }

    /// `acme`'s balance is `picos`, and its books balance.
    fn assert_books(store: &SledStore, picos: i128) {
        assert_eq!(store.balance_picos("acme").expect("read"), picos);
        let reconciled = store.reconcile().expect("reconciles");
        assert_eq!(reconciled[0].difference_picos, 0, "{reconciled:?}");
    }

    /// Tops `acme` up by `picos`.
    fn credit(store: &SledStore, picos: i128) {
        store
            .top_up(&TopUp {
                tenant: "acme".into(),
                amount_picos: picos,
                reason: "test".into(),
                unix_ms: 0,
            })
            .expect("a top-up");
    }

    /// A store with tenant `acme` holding 1,000 picos.
    fn store_with_credit(dir: &Path) -> SledStore {
        let store = SledStore::open(dir, LedgerSync::None).expect("the store opens");
        store
            .create_tenant(&Tenant {
                name: "acme".into(),
                created_unix_ms: 0,
                disabled: false,
                max_concurrency: None,
            })
            .expect("a tenant");
        credit(&store, 1_000);
        store
    }

    #[test]
    fn a_group_commit_records_debits_and_releases_every_hold_at_once() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = store_with_credit(dir.path());
        assert_eq!(hold(&store, "h1", 300, 1_000, None), HoldOutcome::Placed);
        assert_eq!(
            hold(&store, "h2", 200, 1_000, None),
            HoldOutcome::BalanceChanged,
            "a decision on a stale available amount is refused"
        );
        assert_eq!(hold(&store, "h2", 200, 700, None), HoldOutcome::Placed);
        assert_eq!(store.available_picos("acme").expect("read"), 500);

        let _durable = store
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
        assert_eq!(
            store.key_committed_picos("key_1", 20_000).expect("read"),
            350
        );
        let books = store.ledger.books();
        assert!(books.by_id.is_empty() && books.held.is_empty() && books.held_by_key.is_empty());
    }

    fn hold(
        store: &SledStore,
        hold_id: &str,
        amount_picos: u64,
        seen_available: i128,
        key_cap: Option<(i128, u64)>,
    ) -> HoldOutcome {
        store
            .place_hold(&HoldRequest {
                tenant: "acme",
                key_id: "key_1",
                hold_id,
                amount_picos,
                seen_available,
                key_cap,
            })
            .expect("the books answer")
    }

    #[test]
    fn a_key_cap_counts_the_holds_in_flight_with_the_day_charges() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = store_with_credit(dir.path());
        commit(&store, "r0", 100);
        let cap = Some((400, 20_000));
        assert_eq!(hold(&store, "h1", 200, 900, cap), HoldOutcome::Placed);
        assert_eq!(
            hold(&store, "h2", 101, 700, cap),
            HoldOutcome::OverKeyCap,
            "100 charged and 200 held leave 100 of the cap"
        );
        assert_eq!(hold(&store, "h2", 100, 700, cap), HoldOutcome::Placed);
        assert_eq!(
            store.key_committed_picos("key_1", 20_000).expect("read"),
            400
        );
        let _durable = store
            .commit_usages(&[Settlement {
                record: record("r1", 50),
                hold_id: Some("h1".into()),
            }])
            .expect("committed");
        assert_eq!(
            store.key_committed_picos("key_1", 20_000).expect("read"),
            250,
            "the settled request counts its cost, not its hold"
        );
    }

    /// Opens the store again once the last one let go of its files (sled's threads release the
    /// lock shortly after the drop).
    fn reopen(dir: &Path) -> SledStore {
        for _ in 0..100 {
            match SledStore::open(dir, LedgerSync::None) {
                Err(StoreError::Locked { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                opened => return opened.expect("the store reopens"),
            }
        }
        panic!("the store stayed locked for 2 s after its drop");
    }

    #[test]
    fn a_record_committed_only_to_the_log_is_applied_at_the_next_open_exactly_once() {
        let dir = tempfile::tempdir().expect("a temp dir");
        {
            let store = store_with_credit(dir.path());
            commit(&store, "logged-only", 300);
            assert_eq!(store.balance_picos("acme").expect("read"), 700);
            assert!(
                store.ledger.books().log.len() == 1 && store.ledger.books().unapplied.len() == 1
            );
            // Dropped without a flush: the trees never saw the record, only the log did.
        }
        {
            let store = reopen(dir.path());
            assert!(
                store
                    .usage_by_request("logged-only")
                    .expect("read")
                    .is_some()
            );
            assert_eq!(store.balance_picos("acme").expect("read"), 700);
            assert_eq!(
                store.key_committed_picos("key_1", 20_000).expect("read"),
                300
            );
            // Applied to the trees (a read does that) but still in the log, as after a crash
            // between the two: the next open must not debit it again.
            commit(&store, "applied-and-logged", 100);
            store.applied().expect("applied");
            assert_eq!(store.ledger.books().log.len(), 1);
        }
        for _ in 0..2 {
            let store = reopen(dir.path());
            assert_books(&store, 600);
            assert!(
                !dir.path().join("ledger.log.sealed").exists(),
                "dropped at open: the trees hold its records"
            );
        }
    }

    #[test]
    fn requests_that_reuse_an_id_are_each_debited_and_recorded_once() {
        let dir = tempfile::tempdir().expect("a temp dir");
        {
            let store = store_with_credit(dir.path());
            // A client may send its own `x-request-id`, the same one twice; both records carry
            // the same time here too.
            for cost in [100, 50] {
                commit(&store, "reused", cost);
            }
            store.applied().expect("applied");
            assert_eq!(store.balance_picos("acme").expect("read"), 850);
            assert_eq!(
                store.ledger.records.len(),
                2,
                "two records, neither overwritten"
            );
            // Dropped without a flush: both records are in the trees and still in the log.
        }
        // Replayed once.
        let store = reopen(dir.path());
        assert_books(&store, 850);
        assert_eq!(store.ledger.records.len(), 2);
        assert_eq!(
            store.key_committed_picos("key_1", 20_000).expect("read"),
            150
        );
    }

    #[test]
    fn the_ledger_tree_keeps_records_compact_and_still_reads_json_ones() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = store_with_credit(dir.path());
        let mut value = serde_json::to_value(record("rich", 300)).expect("encodes");
        value["attempts"] = serde_json::json!([{"channel": "c", "key": "k1", "upstream_model": "m",
            "status": 429, "error_class": "rate_limited", "latency_ms": 7, "ttfb_ms": null}]);
        value["line_items"] = serde_json::json!([{"kind": "input", "tokens": 191,
            "price_per_million_micros": 150_000, "amount_picos": 28_650_000}]);
        value["degraded_to"] = "fallback".into();
        value["plugins"] = serde_json::json!(["failover@a472551c98a7"]);
        value["protocol_out"] = "anthropic".into();
        value["cost_picos"] = serde_json::Value::Null;
        let rich: UsageRecord = serde_json::from_value(value).expect("a well-formed record");
        let _durable = store
            .commit_usages(&[Settlement {
                record: rich.clone(),
                hold_id: None,
            }])
            .expect("committed");
        let read = store
            .usage_by_request("rich")
            .expect("read")
            .expect("found");
        assert_eq!(read, rich, "a record reads back as it was committed");
        let key = store
            .ledger
            .by_request
            .get("rich")
            .expect("read")
            .expect("indexed");
        let stored = store
            .ledger
            .records
            .get(key)
            .expect("read")
            .expect("stored");
        let json = encode(&rich).expect("encodes");
        assert_eq!(stored[0], COMPACT_RECORD);
        assert!(
            stored.len() * 2 < json.len(),
            "{} bytes stored against {} of JSON",
            stored.len(),
            json.len()
        );

        // A record written by an earlier version, as JSON.
        let legacy = record("legacy", 100);
        store
            .ledger
            .records
            .insert(b"legacy-key", encode(&legacy).expect("encodes"))
            .expect("written");
        store
            .ledger
            .by_request
            .insert("legacy", b"legacy-key".as_slice())
            .expect("written");
        let read = store
            .usage_by_request("legacy")
            .expect("read")
            .expect("found");
        assert_eq!(read.cost_picos, Some(100));
        let everything: Vec<UsageRecord> = store
            .usage_between(0, u64::MAX)
            .collect::<Result<_, _>>()
            .expect("every record decodes");
        assert!(
            everything
                .iter()
                .any(|record| record.request_id == "legacy")
        );
        assert!(everything.iter().any(|record| record.request_id == "rich"));
    }

    /// The compact form has no field names: a record stored today must decode in every later
    /// version. Changing `UsageRecord` (a field added, removed or retyped) breaks this test, and
    /// needs a new `COMPACT_RECORD` byte with the old layout still decoded under the old one.
    #[test]
    fn ledger_keys_are_time_and_number_and_records_under_longer_keys_still_read_and_prune() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = store_with_credit(dir.path());
        commit(&store, "new", 10);
        store.applied().expect("applied");
        let at = record("new", 10).unix_ms;
        let key = store
            .ledger
            .by_request
            .get("new")
            .expect("read")
            .expect("indexed");
        let number = u64::from_be_bytes(key[8..].try_into().expect("16 bytes"));
        assert_eq!(&key[..8], at.to_be_bytes().as_slice(), "time first");
        assert!(number > 0, "then the record's number");
        // A record stored by the version whose keys ended with the request id.
        let mut older = at.to_be_bytes().to_vec();
        older.extend_from_slice(&number.to_be_bytes());
        older.extend_from_slice(b"old");
        store
            .ledger
            .records
            .insert(
                older.as_slice(),
                encode_record(&record("old", 40)).expect("encodes"),
            )
            .expect("written");
        store
            .ledger
            .by_request
            .insert("old", older.as_slice())
            .expect("written");
        assert!(store.usage_by_request("old").expect("read").is_some());
        let listed: Vec<String> = store
            .usage_between(at, at + 1)
            .map(|record| record.map(|record| record.request_id))
            .collect::<Result<_, _>>()
            .expect("every record decodes");
        assert_eq!(listed, ["new", "old"], "in time, then number, order");
        assert_eq!(store.prune_usage(at + 1).expect("pruned"), 2);
        assert!(store.usage_by_request("old").expect("read").is_none());
        assert!(store.usage_by_request("new").expect("read").is_none());
    }

    #[test]
    fn a_compact_record_stored_by_this_version_still_decodes() {
        const STORED: &str = "028080cea6a53206676f6c64656e0461636d65056b65795f310463686174016d00016d0163000000000000000000017b0001c8010000066f70656e6169004d";
        let mut golden = record("golden", 123);
        golden.written_off_picos = 77;
        let now = hex::encode(encode_record(&golden).expect("encodes"));
        let bytes = hex::decode(STORED).expect("hex");
        let decoded = decode_record(&bytes)
            .unwrap_or_else(|error| panic!("{error}; this version stores {now}"));
        assert_eq!(decoded, golden, "this version stores {now}");
    }

    #[test]
    fn a_compact_record_stored_before_write_offs_still_decodes() {
        const STORED: &str = "018080cea6a53206676f6c64656e0461636d65056b65795f310463686174016d00016d0163000000000000000000017b0001c8010000066f70656e616900";
        let now = hex::encode(encode_record(&record("golden", 123)).expect("encodes"));
        let bytes = hex::decode(STORED).expect("hex");
        let decoded = decode_record(&bytes)
            .unwrap_or_else(|error| panic!("{error}; this version stores {now}"));
        assert_eq!(decoded, record("golden", 123), "this version stores {now}");
    }

    #[test]
    fn a_log_line_written_before_records_were_numbered_is_applied_once() {
        let dir = tempfile::tempdir().expect("a temp dir");
        {
            let store = store_with_credit(dir.path());
            store.flush().expect("flushed");
        }
        let legacy = serde_json::to_string(&record("legacy", 200)).expect("encodes");
        std::fs::write(dir.path().join("ledger.log"), format!("{legacy}\n")).expect("written");
        for _ in 0..2 {
            let store = reopen(dir.path());
            assert_eq!(store.balance_picos("acme").expect("read"), 800);
            assert!(store.usage_by_request("legacy").expect("read").is_some());
        }
    }

    #[test]
    fn balances_read_while_batches_go_into_the_trees_never_count_a_debit_twice() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = store_with_credit(dir.path());
        let commits = 3_000;
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| {
                for index in 0..commits {
                    commit(&store, &format!("r{index}"), 1);
                }
            });
            // Each commit debits 1 and adds 1 to the key's spend: a read that counted a batch
            // twice, or not at all, would see a figure dip, then come back.
            let mut last = 1_000;
            let mut last_spent = 0;
            while !writer.is_finished() {
                let balance = store.balance_picos("acme").expect("read");
                assert!(balance <= last, "the balance rose from {last} to {balance}");
                assert!(balance >= 1_000 - commits as i128, "{balance}");
                last = balance;
                let spent = store.key_committed_picos("key_1", 20_000).expect("read");
                assert!(
                    spent >= last_spent,
                    "the spend fell from {last_spent} to {spent}"
                );
                assert!(spent <= commits as i128, "{spent}");
                last_spent = spent;
            }
        });
        assert_eq!(
            store.balance_picos("acme").expect("read"),
            1_000 - commits as i128
        );
        assert_eq!(
            store.key_committed_picos("key_1", 20_000).expect("read"),
            commits as i128
        );
        store.flush().expect("flushed");
        assert_eq!(
            decode_balance(store.ledger.balances.get("acme").expect("read")).expect("decodes"),
            1_000 - commits as i128
        );
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(
            store.balance_picos("acme").expect("read"),
            1_000 - commits as i128
        );
        assert_eq!(
            store.key_committed_picos("key_1", 20_000).expect("read"),
            commits as i128
        );
    }

    fn key_spend(ledger: &Ledger, key: &[u8]) -> i128 {
        let mut books = ledger.books();
        ledger.key_spend(&mut books, key).expect("read")
    }

    #[test]
    fn a_read_between_a_batch_transaction_and_the_books_counts_its_charges_once() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let ledger = ledger_without_applier(dir.path());
        commit_to(&ledger, "r1", 7);
        // The applier's steps, with reads where another thread's could fall.
        let batch = std::mem::take(&mut ledger.books().unapplied);
        let charges = ledger.write_records(&batch).expect("written");
        ledger.pin_key_spend(&charges).expect("pinned");
        let spend_written = ledger.write_balances(&charges).expect("transaction");
        let spend = spend_key("key_1", 20_000);
        assert_eq!(
            decode_balance(ledger.key_spend.get(&spend).expect("read")).expect("decodes"),
            7,
            "the tree holds the charge"
        );
        // A key read for the first time now is not read from the tree, which holds the charge
        // that the books still count as unapplied.
        assert_eq!(key_spend(&ledger, &spend), 7);
        assert_eq!(ledger.books().balance("acme"), -7);
        ledger.settle(&charges, &spend_written);
        assert_eq!(key_spend(&ledger, &spend), 7);
        assert_eq!(ledger.books().balance("acme"), -7);
    }

    #[test]
    fn the_books_keep_key_spend_of_two_days_and_read_older_days_from_the_tree() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = store_with_credit(dir.path());
        let charge_on = |day: u64, key_id: &str| {
            let mut record = record(&format!("{key_id}-{day}"), 5);
            record.unix_ms = day * crate::store::MILLIS_PER_DAY;
            record.key_id = key_id.to_owned();
            let _durable = store
                .commit_usages(&[Settlement {
                    record,
                    hold_id: None,
                }])
                .expect("committed");
            store.applied().expect("applied");
        };
        charge_on(20_000, "old");
        charge_on(20_001, "yesterday");
        let kept = || store.ledger.books().stored_spend.len();
        assert_eq!(kept(), 2);
        charge_on(20_002, "today");
        assert_eq!(kept(), 2, "day 20,000 left the books");
        assert_eq!(store.key_committed_picos("old", 20_000).expect("read"), 5);
        assert_eq!(
            store
                .key_committed_picos("yesterday", 20_001)
                .expect("read"),
            5
        );
        assert_eq!(store.key_committed_picos("today", 20_002).expect("read"), 5);
    }

    #[test]
    fn top_ups_between_batches_are_each_counted_once() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = store_with_credit(dir.path());
        let (commits, top_ups) = (3_000, 60);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for index in 0..commits {
                    commit(&store, &format!("r{index}"), 1);
                }
            });
            for _ in 0..top_ups {
                credit(&store, 1_000);
            }
        });
        let expected = 1_000 + top_ups * 1_000 - commits;
        assert_books(&store, expected);
        drop(store);
        assert_books(&reopen(dir.path()), expected);
    }

    #[test]
    fn balances_and_a_known_key_spend_are_read_while_a_sled_transaction_runs() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = store_with_credit(dir.path());
        commit(&store, "r1", 10);
        store.applied().expect("applied");
        assert_eq!(
            store.key_committed_picos("key_1", 20_000).expect("read"),
            10
        );
        let (started, running) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let store = &store;
        std::thread::scope(|scope| {
            // Any sled transaction stops every reader of every tree until it ends.
            scope.spawn(move || {
                store
                    .bindings
                    .transaction(|_| {
                        let _ = started.send(());
                        let _ = released.recv_timeout(std::time::Duration::from_secs(10));
                        Ok::<_, ConflictableTransactionError<()>>(())
                    })
                    .expect("the transaction commits");
            });
            running
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("the transaction runs");
            let (read, reads) = std::sync::mpsc::channel();
            scope.spawn(move || {
                let _ = read.send((
                    store.available_picos("acme").expect("read"),
                    hold(store, "h1", 5, 990, Some((1_000, 20_000))),
                    store.key_committed_picos("key_1", 20_000).expect("read"),
                ));
            });
            let answered = reads.recv_timeout(std::time::Duration::from_secs(5));
            let _ = release.send(());
            assert_eq!(
                answered.expect("answered while the transaction runs"),
                (990, HoldOutcome::Placed, 15)
            );
        });
    }

    fn opened(hold_id: &str) -> OpenedRequest {
        OpenedRequest {
            hold_id: hold_id.to_owned(),
            hold_picos: 1_000,
            unix_ms: 86_400_000 * 20_000,
            request_id: format!("request-{hold_id}"),
            tenant: "acme".to_owned(),
            key_id: "key_1".to_owned(),
            operation: "chat".to_owned(),
            model_asked: "m".to_owned(),
            channel: "c".to_owned(),
            upstream_model: "u".to_owned(),
            protocol_in: "openai".to_owned(),
            protocol_out: "openai".to_owned(),
            stream: true,
            prompt_tokens: 7,
            plugins: Vec::new(),
        }
    }

    #[test]
    fn requests_opened_and_never_settled_are_found_at_the_next_open_with_their_progress() {
        let dir = tempfile::tempdir().expect("a temp dir");
        {
            let store = store_with_credit(dir.path());
            for hold in ["h1", "h2", "h3"] {
                store.open_request(&opened(hold)).expect("noted");
            }
            store.mark_progress("h1", 4096).expect("marked");
            store.mark_progress("h1", 9000).expect("marked");
            drop(
                store
                    .commit_usages(&[Settlement {
                        record: record("request-h2", 5),
                        hold_id: Some("h2".into()),
                    }])
                    .expect("committed"),
            );
            // A mark after the record changes nothing.
            store.mark_progress("h2", 50).expect("ignored");
            assert!(store.unsettled_requests().expect("read").is_empty());
        }
        let store = reopen(dir.path());
        let mut unsettled = store.unsettled_requests().expect("read");
        unsettled.sort_by(|a, b| a.0.hold_id.cmp(&b.0.hold_id));
        assert_eq!(
            unsettled,
            vec![(opened("h1"), 9000), (opened("h3"), 0)],
            "h2 was settled"
        );
        assert!(
            store.unsettled_requests().expect("read").is_empty(),
            "taken once"
        );
        // Not settled yet: the next start finds them again, even after the log was sealed.
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(store.unsettled_requests().expect("read").len(), 2);
        drop(
            store
                .commit_usages(&[Settlement {
                    record: record("request-h1", 5),
                    hold_id: Some("h1".into()),
                }])
                .expect("committed"),
        );
        drop(store);
        let store = reopen(dir.path());
        let unsettled = store.unsettled_requests().expect("read");
        assert_eq!(unsettled, vec![(opened("h3"), 0)]);
    }

    #[test]
    fn opened_requests_are_noted_again_when_the_log_is_sealed() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let ledger = ledger_without_applier(dir.path());
        ledger.open_request(&opened("h1")).expect("noted");
        ledger.mark_progress("h1", 100).expect("marked");
        commit_to(&ledger, "r1", 1);
        ledger.apply_pending(Some(1)).expect("applied and sealed");
        ledger.flush().expect("flushed: the sealed part is dropped");
        assert!(!LedgerLog::has_sealed(&dir.path().join("ledger.log")));
        let (_, contents) = LedgerLog::open(&dir.path().join("ledger.log")).expect("reads");
        assert_eq!(contents.unsettled(), vec![(opened("h1"), 100)]);
    }

    #[test]
    fn batch_sync_resolves_every_commit_and_the_records_survive() {
        let dir = tempfile::tempdir().expect("a temp dir");
        {
            let store = std::sync::Arc::new(
                SledStore::open(dir.path(), LedgerSync::Batch).expect("the store opens"),
            );
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            let commits = (0..64).map(|index| {
                let store = store.clone();
                std::thread::spawn(move || {
                    store
                        .commit_usages(&[Settlement {
                            record: record(&format!("r{index}"), 1),
                            hold_id: None,
                        }])
                        .expect("committed")
                })
            });
            let durables: Vec<Durable> = commits
                .collect::<Vec<_>>()
                .into_iter()
                .map(|commit| commit.join().expect("the thread ends"))
                .collect();
            runtime.block_on(async {
                tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    futures::future::join_all(durables.into_iter().map(Durable::wait)),
                )
                .await
                .expect("every commit is synced within 10 s");
            });
        }
        let store = reopen(dir.path());
        for index in 0..64 {
            assert!(
                store
                    .usage_by_request(&format!("r{index}"))
                    .expect("read")
                    .is_some()
            );
        }
    }

    #[test]
    fn a_long_log_is_sealed_even_when_a_commit_applied_all_its_records() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let ledger = ledger_without_applier(dir.path());
        let sealed = dir.path().join("ledger.log.sealed");
        for index in 0..SEAL_RECORDS {
            commit_to(&ledger, &format!("r{index}"), 1);
        }
        // A commit that met a full backlog applies it all itself, never sealing.
        ledger.apply_pending(None).expect("applied");
        assert!(!sealed.exists());
        // The applier, woken by an earlier batch, finds nothing left to apply.
        ledger
            .apply_pending(Some(SEAL_RECORDS))
            .expect("nothing to apply");
        assert!(sealed.exists(), "the long log is sealed");
        ledger.flush().expect("flushed");
        assert!(
            !sealed.exists(),
            "dropped: every record of it is in the trees"
        );
    }

    #[test]
    fn batches_go_into_the_trees_in_the_background_and_a_long_log_is_sealed_then_dropped() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = store_with_credit(dir.path());
        credit(&store, 1_000_000);
        let commit = |index: usize| {
            commit(&store, &format!("r{index}"), 1);
        };
        let stored =
            || decode_balance(store.ledger.balances.get("acme").expect("read")).expect("decodes");
        let eventually = |done: &dyn Fn() -> bool, what: &str| {
            for _ in 0..500 {
                if done() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            panic!("not within 10 s: {what}");
        };
        (0..APPLY_BATCH).for_each(commit);
        // No read asks for it: the applier thread takes the batch on its own.
        eventually(
            &|| stored() == 1_001_000 - APPLY_BATCH as i128,
            "the batch in the trees",
        );
        assert_eq!(
            store.balance_picos("acme").expect("read"),
            stored(),
            "counted once"
        );
        // A batch more than the seal needs: the applier looks at the log's length when woken.
        (APPLY_BATCH..SEAL_RECORDS + APPLY_BATCH).for_each(commit);
        eventually(
            &|| dir.path().join("ledger.log.sealed").exists(),
            "the log sealed",
        );
        // The last records may be fewer than a batch: a read takes them.
        let spent = (SEAL_RECORDS + APPLY_BATCH) as i128;
        assert_eq!(
            store.balance_picos("acme").expect("read"),
            1_001_000 - spent
        );
        store.applied().expect("applied");
        assert_eq!(stored(), 1_001_000 - spent);
        store.flush().expect("flushed");
        assert!(
            !dir.path().join("ledger.log.sealed").exists(),
            "dropped once the trees are durable"
        );
    }
}
