//! The sled backend. Keyspaces are sled trees; values are JSON; balances are i128 big-endian.

use std::collections::HashMap;
use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use super::ledger_log::LedgerLog;
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
    /// `applied_seq` → the sequence number of the last log record the trees took.
    ledger_meta: sled::Tree,
    /// Holds of the requests in flight and committed usage not yet in the trees, under one lock,
    /// so a balance decision never sees half of a hold or of a commit.
    books: std::sync::Mutex<Books>,
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
        let (log, logged) = LedgerLog::open(&data_dir.join("ledger.log"))?;
        let tree = |name: &str| db.open_tree(name).map_err(backend);
        // Data directories of 0.1 before holds moved to memory kept them in these trees.
        for retired in ["held", "holds"] {
            db.drop_tree(retired).map_err(backend)?;
        }
        let store = Self {
            tenants: tree("tenants")?,
            keys: tree("api_keys")?,
            key_ids: tree("api_key_ids")?,
            balances: tree("balances")?,
            ledger: tree("ledger")?,
            ledger_by_request: tree("ledger_by_request")?,
            ledger_meta: tree("ledger_meta")?,
            books: std::sync::Mutex::new(Books::new(log)),
            top_ups: tree("top_ups")?,
            key_spend: tree("key_spend")?,
            archived_charges: tree("archived_charges")?,
            api_channels: tree("api_channels")?,
            plugins: tree("plugins")?,
            plugin_bytes: tree("plugin_bytes")?,
            bindings: tree("bindings")?,
            db,
        };
        // Records committed before a crash (or an unclean stop) that the trees may lack.
        let applied_seq = decode_seq(store.ledger_meta.get(APPLIED_SEQ).map_err(backend)?)?;
        let mut books = store.books();
        books.next_seq = applied_seq + 1;
        for logged in &logged {
            let mut owed = Owed::new(&logged.record)?;
            owed.seq = logged.seq;
            books.next_seq = books.next_seq.max(logged.seq.map_or(0, |seq| seq + 1));
            books.owe(owed);
        }
        store.checkpoint(&mut books)?;
        drop(books);
        Ok(store)
    }
}

/// Committed records the trees take in one transaction once this many wait.
const APPLY_BATCH: usize = 1024;

/// Where the ledger meta tree keeps the sequence number of the last record applied.
const APPLIED_SEQ: &[u8] = b"applied_seq";

/// A committed record as the trees will take it: encoded once, for the log and the ledger alike.
struct Owed {
    /// Its place in the ledger log, given at commit; `None` for a record of a log written before
    /// records were numbered.
    seq: Option<u64>,
    unix_ms: u64,
    request_id: String,
    tenant: String,
    encoded: Vec<u8>,
    cost: i128,
    spend_key: Vec<u8>,
}

impl Owed {
    fn new(record: &UsageRecord) -> Result<Self, StoreError> {
        Ok(Self {
            seq: None,
            unix_ms: record.unix_ms,
            request_id: record.request_id.clone(),
            tenant: record.tenant.clone(),
            encoded: encode(record)?,
            cost: i128::from(record.cost_picos.unwrap_or(0)),
            spend_key: spend_key(&record.key_id, record.unix_ms / MILLIS_PER_DAY),
        })
    }

    /// Time first, so the ledger reads in time order; then the sequence number, so two requests
    /// a client sent with the same id in the same millisecond keep a record each.
    fn ledger_key(&self) -> Vec<u8> {
        let mut key = self.unix_ms.to_be_bytes().to_vec();
        if let Some(seq) = self.seq {
            key.extend_from_slice(&seq.to_be_bytes());
        }
        key.extend_from_slice(self.request_id.as_bytes());
        key
    }
}

/// What the books lock guards. Holds of the requests in flight live in memory (none survives a
/// restart; no request does). Committed records are in the ledger log at once and reach the trees
/// in batches, one transaction for many; until then their debits and key spend are counted here.
struct Books {
    /// Hold id → tenant and amount, until the request settles.
    by_id: HashMap<String, (String, u64)>,
    /// Tenant → the sum of its holds.
    held: HashMap<String, i128>,
    /// The write-ahead log of committed records.
    log: LedgerLog,
    /// Committed records not yet in the trees, oldest first.
    unapplied: Vec<Owed>,
    /// Tenant → the charges of `unapplied`.
    unapplied_debits: HashMap<String, i128>,
    /// Key-spend key → the charges of `unapplied`.
    unapplied_spend: HashMap<Vec<u8>, i128>,
    /// The sequence number the next committed record gets.
    next_seq: u64,
}

impl Books {
    fn new(log: LedgerLog) -> Self {
        Self {
            by_id: HashMap::new(),
            held: HashMap::new(),
            log,
            unapplied: Vec::new(),
            unapplied_debits: HashMap::new(),
            unapplied_spend: HashMap::new(),
            next_seq: 1,
        }
    }

    /// Counts a committed record until the trees hold it.
    fn owe(&mut self, owed: Owed) {
        if owed.cost != 0 {
            *self
                .unapplied_debits
                .entry(owed.tenant.clone())
                .or_default() += owed.cost;
            *self
                .unapplied_spend
                .entry(owed.spend_key.clone())
                .or_default() += owed.cost;
        }
        self.unapplied.push(owed);
    }

    /// Releases a settled request's hold.
    fn release(&mut self, hold_id: &str) {
        if let Some((tenant, amount)) = self.by_id.remove(hold_id)
            && let Some(held) = self.held.get_mut(&tenant)
        {
            *held -= i128::from(amount);
            if *held == 0 {
                self.held.remove(&tenant);
            }
        }
    }
}

impl SledStore {
    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        // Every update below is complete before the guard drops: a panicking holder cannot leave
        // the maps disagreeing.
        self.books
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The balance in the trees less the debits they do not hold yet.
    fn balance_with(&self, books: &Books, tenant: &str) -> Result<i128, StoreError> {
        let stored = decode_balance(self.balances.get(tenant).map_err(backend)?)?;
        Ok(stored - books.unapplied_debits.get(tenant).copied().unwrap_or(0))
    }

    /// Moves the committed records the trees lack into them, in one transaction that also notes
    /// the last sequence number applied: a record at or below it is skipped, so applying twice
    /// changes nothing. Each tenant's balance and each key's spend is written once per batch.
    fn apply(&self, books: &mut Books) -> Result<(), StoreError> {
        if books.unapplied.is_empty() {
            return Ok(());
        }
        (
            &self.ledger,
            &self.ledger_by_request,
            &self.balances,
            &self.key_spend,
            &self.ledger_meta,
        )
            .transaction(|(ledger, by_request, balances, key_spend, meta)| {
                let abort = ConflictableTransactionError::Abort;
                let applied_seq = decode_seq(meta.get(APPLIED_SEQ)?).map_err(abort)?;
                let mut last_seq = applied_seq;
                let mut debits = HashMap::<&str, i128>::new();
                let mut spend = HashMap::<&[u8], i128>::new();
                for owed in &books.unapplied {
                    let fresh = match owed.seq {
                        Some(seq) => seq > applied_seq,
                        None => by_request.get(owed.request_id.as_bytes())?.is_none(),
                    };
                    if !fresh {
                        continue;
                    }
                    let key = owed.ledger_key();
                    ledger.insert(key.as_slice(), owed.encoded.as_slice())?;
                    by_request.insert(owed.request_id.as_bytes(), key)?;
                    if owed.cost != 0 {
                        *debits.entry(&owed.tenant).or_default() += owed.cost;
                        *spend.entry(&owed.spend_key).or_default() += owed.cost;
                    }
                    last_seq = last_seq.max(owed.seq.unwrap_or(0));
                }
                for (tenant, cost) in debits {
                    let current = decode_balance(balances.get(tenant)?).map_err(abort)?;
                    balances.insert(tenant, (current - cost).to_be_bytes().to_vec())?;
                }
                for (key, cost) in spend {
                    let spent = decode_balance(key_spend.get(key)?).map_err(abort)?;
                    key_spend.insert(key, (spent + cost).to_be_bytes().to_vec())?;
                }
                meta.insert(APPLIED_SEQ, last_seq.to_be_bytes().to_vec())?;
                Ok(())
            })
            .map_err(transaction_error)?;
        books.unapplied.clear();
        books.unapplied_debits.clear();
        books.unapplied_spend.clear();
        Ok(())
    }

    /// Applies what waits and seals the log's records (now in the trees). The part sealed last
    /// time is dropped first, after a flush of the trees; sled flushes on its own every half
    /// second, so that flush has rarely anything left to write.
    fn checkpoint(&self, books: &mut Books) -> Result<(), StoreError> {
        self.apply(books)?;
        if books.log.len() == 0 {
            return Ok(());
        }
        if LedgerLog::has_sealed(books.log.path()) {
            self.db.flush().map_err(backend)?;
            LedgerLog::drop_sealed(books.log.path())?;
        }
        books.log.seal()
    }

    /// Runs an operator's change and flushes it: what the admin API acknowledges survives a
    /// crash. (Commits of usage records have their own log and never wait for a flush.)
    fn durable<T>(&self, change: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let value = change()?;
        self.db.flush().map_err(backend)?;
        Ok(value)
    }

    /// Brings the trees up to date before a read of the ledger or the balances.
    fn applied(&self) -> Result<(), StoreError> {
        let mut books = self.books();
        self.apply(&mut books)
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
/// The ledger's last applied sequence number; 0 before any.
fn decode_seq(bytes: Option<sled::IVec>) -> Result<u64, StoreError> {
    let Some(bytes) = bytes else { return Ok(0) };
    let raw: [u8; 8] = bytes.as_ref().try_into().map_err(|_| StoreError::Corrupt {
        keyspace: "ledger_meta",
        reason: format!("{} bytes, expected 8", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(raw))
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
        self.durable(|| {
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
        })
    }

    fn disable_tenant(&self, name: &str) -> Result<bool, StoreError> {
        self.durable(|| {
            let Some(mut tenant) = self.tenant(name)? else {
                return Ok(false);
            };
            tenant.disabled = true;
            self.tenants
                .insert(name, encode(&tenant)?)
                .map_err(backend)?;
            Ok(true)
        })
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
        self.durable(|| {
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
        })
    }

    fn key_by_secret_sha256(&self, secret_sha256: &[u8; 32]) -> Result<Option<ApiKey>, StoreError> {
        self.keys
            .get(secret_sha256)
            .map_err(backend)?
            .map(|bytes| decode("api_keys", &bytes))
            .transpose()
    }

    fn balance_picos(&self, tenant: &str) -> Result<i128, StoreError> {
        let books = self.books();
        self.balance_with(&books, tenant)
    }

    fn available_picos(&self, tenant: &str) -> Result<i128, StoreError> {
        let books = self.books();
        let balance = self.balance_with(&books, tenant)?;
        Ok(balance - books.held.get(tenant).copied().unwrap_or(0))
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
        })
    }

    fn place_hold(
        &self,
        tenant: &str,
        hold_id: &str,
        amount_picos: u64,
        seen_available: i128,
    ) -> Result<bool, StoreError> {
        let mut books = self.books();
        let balance = self.balance_with(&books, tenant)?;
        let held = books.held.get(tenant).copied().unwrap_or(0);
        if balance - held != seen_available {
            return Ok(false);
        }
        books
            .held
            .insert(tenant.to_owned(), held + i128::from(amount_picos));
        books
            .by_id
            .insert(hold_id.to_owned(), (tenant.to_owned(), amount_picos));
        Ok(true)
    }

    fn clear_holds(&self) -> Result<(), StoreError> {
        let mut books = self.books();
        books.by_id.clear();
        books.held.clear();
        Ok(())
    }

    fn commit_usages(&self, settlements: &[Settlement]) -> Result<(), StoreError> {
        let owed = settlements
            .iter()
            .map(|settlement| Owed::new(&settlement.record))
            .collect::<Result<Vec<_>, _>>()?;
        let mut books = self.books();
        let first_seq = books.next_seq;
        books.next_seq += owed.len() as u64;
        // Committed once logged: the trees take the records later, in a batch.
        books.log.append(
            owed.iter()
                .zip(first_seq..)
                .map(|(owed, seq)| (seq, owed.encoded.as_slice())),
        )?;
        for ((settlement, mut owed), seq) in settlements.iter().zip(owed).zip(first_seq..) {
            owed.seq = Some(seq);
            books.owe(owed);
            if let Some(hold_id) = &settlement.hold_id {
                books.release(hold_id);
            }
        }
        if books.unapplied.len() >= APPLY_BATCH
            && let Err(error) = self.checkpoint(&mut books)
        {
            // The records are committed (logged and counted); the next batch tries again.
            tracing::warn!(%error, "ledger checkpoint failed");
        }
        Ok(())
    }

    fn key_spend_picos(&self, key_id: &str, day: u64) -> Result<i128, StoreError> {
        let key = spend_key(key_id, day);
        let books = self.books();
        let stored = decode_balance(self.key_spend.get(&key).map_err(backend)?)?;
        Ok(stored + books.unapplied_spend.get(&key).copied().unwrap_or(0))
    }

    fn prune_usage(&self, before_unix_ms: u64) -> Result<u64, StoreError> {
        self.durable(|| {
            self.applied()?;
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
        if let Err(error) = self.applied() {
            return Box::new(std::iter::once(Err(error)));
        }
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
        self.applied()?;
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
        let mut books = self.books();
        self.checkpoint(&mut books)?;
        self.db.flush().map_err(backend)?;
        LedgerLog::drop_sealed(books.log.path())
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

    /// A store with tenant `acme` holding 1,000 picos.
    fn store_with_credit(dir: &Path) -> SledStore {
        let store = SledStore::open(dir).expect("the store opens");
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
        store
    }

    #[test]
    fn a_group_commit_records_debits_and_releases_every_hold_at_once() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = store_with_credit(dir.path());
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
        assert!(store.books().by_id.is_empty() && store.books().held.is_empty());
    }

    /// Opens the store again once the last one let go of its files (sled's threads release the
    /// lock shortly after the drop).
    fn reopen(dir: &Path) -> SledStore {
        for _ in 0..100 {
            match SledStore::open(dir) {
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
            store
                .commit_usages(&[Settlement {
                    record: record("logged-only", 300),
                    hold_id: None,
                }])
                .expect("committed");
            assert_eq!(store.balance_picos("acme").expect("read"), 700);
            assert!(store.books().log.len() == 1 && store.books().unapplied.len() == 1);
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
            assert_eq!(store.key_spend_picos("key_1", 20_000).expect("read"), 300);
            // Applied to the trees (a read does that) but still in the log, as after a crash
            // between the two: the next open must not debit it again.
            store
                .commit_usages(&[Settlement {
                    record: record("applied-and-logged", 100),
                    hold_id: None,
                }])
                .expect("committed");
            store.applied().expect("applied");
            assert_eq!(store.books().log.len(), 1);
        }
        let store = reopen(dir.path());
        assert_eq!(store.balance_picos("acme").expect("read"), 600);
        assert_eq!(
            store.books().log.len(),
            0,
            "sealed once the trees hold its records"
        );
        let reconciled = store.reconcile().expect("reconciles");
        assert_eq!(reconciled[0].difference_picos, 0, "{reconciled:?}");
    }

    #[test]
    fn requests_that_reuse_an_id_are_each_debited_and_recorded_once() {
        let dir = tempfile::tempdir().expect("a temp dir");
        {
            let store = store_with_credit(dir.path());
            // A client may send its own `x-request-id`, the same one twice; both records carry
            // the same time here too.
            for cost in [100, 50] {
                store
                    .commit_usages(&[Settlement {
                        record: record("reused", cost),
                        hold_id: None,
                    }])
                    .expect("committed");
            }
            store.applied().expect("applied");
            assert_eq!(store.balance_picos("acme").expect("read"), 850);
            assert_eq!(store.ledger.len(), 2, "two records, neither overwritten");
            // Dropped without a flush: both records are in the trees and still in the log.
        }
        let store = reopen(dir.path());
        assert_eq!(
            store.balance_picos("acme").expect("read"),
            850,
            "replayed once"
        );
        assert_eq!(store.ledger.len(), 2);
        assert_eq!(store.key_spend_picos("key_1", 20_000).expect("read"), 150);
        let reconciled = store.reconcile().expect("reconciles");
        assert_eq!(reconciled[0].difference_picos, 0, "{reconciled:?}");
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
    fn a_full_batch_goes_into_the_trees_and_empties_the_log() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = store_with_credit(dir.path());
        for index in 0..APPLY_BATCH {
            store
                .commit_usages(&[Settlement {
                    record: record(&format!("r{index}"), 1),
                    hold_id: None,
                }])
                .expect("committed");
        }
        assert_eq!(store.books().unapplied.len(), 0);
        assert_eq!(store.books().log.len(), 0);
        assert!(dir.path().join("ledger.log.sealed").exists(), "sealed");
        store.flush().expect("flushed");
        assert!(
            !dir.path().join("ledger.log.sealed").exists(),
            "dropped once the trees are durable"
        );
        assert_eq!(
            decode_balance(store.balances.get("acme").expect("read")).expect("decodes"),
            1_000 - APPLY_BATCH as i128
        );
    }
}
