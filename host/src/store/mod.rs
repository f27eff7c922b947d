//! Durable state behind one trait: tenants, API keys (by SHA-256 of the secret), balances and the
//! usage ledger. sled is the default backend; a PostgreSQL backend will implement the same trait, so
//! no sled type leaves this module. Knows nothing about HTTP.

mod codec;
mod ledger_books;
mod ledger_log;
mod sled;

use serde::{Deserialize, Serialize};

pub use self::sled::SledStore;
pub use crate::config::LedgerSync;

/// Milliseconds since the Unix epoch: the time every stored record carries.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// Milliseconds in a UTC day: daily spend caps reset at midnight UTC.
pub const MILLIS_PER_DAY: u64 = 86_400_000;

/// A customer of the gateway: owns keys, a balance and usage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tenant {
    /// Unique, operator-chosen name.
    pub name: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// A disabled tenant's keys are refused.
    pub disabled: bool,
    /// Requests of this tenant in flight at once, at most (none: no cap).
    #[serde(default)]
    pub max_concurrency: Option<u32>,
}

/// An API key's metadata. The secret itself is never stored: only its SHA-256, as the lookup key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiKey {
    /// Public id, safe to log and show (`key_…`).
    pub id: String,
    /// Owning tenant's name.
    pub tenant: String,
    /// The first characters of the secret, so an operator can tell keys apart.
    pub prefix: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// A revoked key is refused.
    pub revoked: bool,
    /// After this time (milliseconds since the Unix epoch) the key is refused.
    #[serde(default)]
    pub expires_unix_ms: Option<u64>,
    /// Public models this key may use; empty: every model.
    #[serde(default)]
    pub allowed_models: Vec<String>,
    /// Requests per minute, at most.
    #[serde(default)]
    pub rpm: Option<u32>,
    /// Tokens (prompt and output) per minute, at most.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Spend per UTC day, at most, in micro-units.
    #[serde(default)]
    pub daily_spend_cap_micros: Option<u64>,
}

/// Normalized token usage as recorded (see `types.usage` in the WIT for the subset rules).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecordedUsage {
    /// Every prompt token, cached or not.
    pub input_tokens: u64,
    /// Prompt tokens read from cache (subset of input).
    pub cache_read_tokens: u64,
    /// Prompt tokens written to cache (subset of input).
    pub cache_write_tokens: u64,
    /// Every generated token, reasoning included.
    pub output_tokens: u64,
    /// Reasoning tokens (subset of output).
    pub reasoning_tokens: u64,
    /// Counted by the host because the upstream reported nothing.
    pub estimated: bool,
}

/// One priced part of a charge, as the billing plugin returned it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecordedLineItem {
    /// What was priced (`input`, `output`, …).
    pub kind: String,
    /// Tokens priced.
    pub tokens: u64,
    /// Price in micro-units per million tokens.
    pub price_per_million_micros: u64,
    /// `tokens * price`, in picos (10^-12 currency units).
    pub amount_picos: u64,
}

/// One upstream attempt of a request, for the trace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecordedAttempt {
    /// Channel tried.
    pub channel: String,
    /// The upstream key used, by the name of its environment variable (never the secret).
    pub key: Option<String>,
    /// Upstream model name sent.
    pub upstream_model: String,
    /// Upstream HTTP status, if an answer came.
    pub status: Option<u16>,
    /// Failure class when the attempt failed (`rate_limited`, `server`, `timeout`, …).
    pub error_class: Option<String>,
    /// Time the attempt took, in milliseconds.
    pub latency_ms: u64,
    /// Time to the first byte (first streamed content, or the answer's headers), in milliseconds.
    pub ttfb_ms: Option<u64>,
}

/// The ledger record of one request: who, what was asked, what answered, what it cost.
/// Never holds prompt or completion text. The sled ledger stores it without field names
/// (`sled::encode_record`): a change to its fields needs a new stored version there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UsageRecord {
    /// When the request arrived, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// The request id.
    pub request_id: String,
    /// Tenant name.
    pub tenant: String,
    /// API key id.
    pub key_id: String,
    /// `chat` or `embeddings`.
    pub operation: String,
    /// Public model name asked for.
    pub model_asked: String,
    /// The fallback model that served because every route to the asked one failed.
    pub degraded_to: Option<String>,
    /// Model name the upstream reported (empty when none answered).
    pub model_served: String,
    /// Channel that answered (empty when none did).
    pub channel: String,
    /// The upstream reported a model other than the one the route asked for (a swapped model).
    pub model_mismatch: bool,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Every attempt in order.
    pub attempts: Vec<RecordedAttempt>,
    /// Normalized usage.
    pub usage: RecordedUsage,
    /// Amount debited, in picos; `None` when the call could not be priced (reconcile reports it).
    pub cost_picos: Option<u64>,
    /// The billing plugin's line items.
    pub line_items: Vec<RecordedLineItem>,
    /// Time from arrival to the last byte sent, in milliseconds.
    pub latency_ms: u64,
    /// HTTP status the client got.
    pub status: u16,
    /// Error class when the request failed, or `stream_cut` when a stream ended early.
    pub error_class: Option<String>,
    /// Router, translator and billing plugins that ran (`name@sha`).
    pub plugins: Vec<String>,
    /// The protocol the client spoke: `openai`, or the protocol of the endpoint it called
    /// (`anthropic` on `/v1/messages`). Records written before this field existed say `openai`.
    #[serde(default = "openai_protocol")]
    pub protocol_in: String,
    /// The protocol of the channel that answered (`None` when none did).
    #[serde(default)]
    pub protocol_out: Option<String>,
    /// What the billing plugin priced past the request's hold, in picos: not charged (a request
    /// is never charged more than its hold, so no balance goes below its floor) and written off,
    /// for the operator and reconcile. Last, so the compact form of the records stored before it
    /// decodes with it appended (see `sled::decode_record`).
    #[serde(default)]
    pub written_off_picos: u64,
}

fn openai_protocol() -> String {
    "openai".to_owned()
}

/// A credit to a tenant's balance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TopUp {
    /// Tenant name.
    pub tenant: String,
    /// Amount credited, in picos (negative for a correction).
    pub amount_picos: i128,
    /// Why, as the operator said it.
    pub reason: String,
    /// When, milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

/// One tenant's books: the balance must equal top-ups minus ledger charges, to the pico.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reconciliation {
    /// Tenant name.
    pub tenant: String,
    /// The stored balance, in picos.
    pub balance_picos: i128,
    /// The sum of its top-ups, in picos.
    pub top_ups_picos: i128,
    /// The sum of its ledger charges, in picos.
    pub charges_picos: i128,
    /// `balance − (top-ups − charges)`: zero when the books agree.
    pub difference_picos: i128,
    /// Ledger records that could not be priced (the billing plugin failed); they need an operator.
    pub unpriced_records: u64,
    /// What was priced past the requests' holds and not charged, in picos.
    pub written_off_picos: i128,
}

/// A channel created through the admin API, as stored: its configuration and its keys, sealed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredChannel {
    /// The channel's configuration (`api_key_env` empty).
    pub config: crate::config::ChannelConfig,
    /// Its upstream keys, sealed under the master key (see `secrets`).
    pub sealed_keys: Vec<String>,
}

/// A plugin an operator uploaded. Its bytes are kept beside it under the same hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredPlugin {
    /// Hex SHA-256 of the component bytes: the plugin's identity.
    pub sha256: String,
    /// The name it was uploaded under; several versions may share a name.
    pub name: String,
    /// The role detected from its exports (`router`, `translator`, `billing`).
    pub role: String,
    /// The WIT package version it was built against (`0.1.0`).
    pub contract: String,
    /// Size of the component, in bytes.
    pub size_bytes: u64,
    /// When it was uploaded.
    pub uploaded_unix_ms: u64,
}

/// One plugin bound to a scope, with its configuration and sandbox limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredBinding {
    /// The plugin's hash (an uploaded plugin), or `shipped:<name>` for a plugin built into the binary.
    pub plugin: String,
    /// The configuration JSON the plugin reads through `host.config`.
    pub config: serde_json::Value,
    /// `closed` (the request gets the plugin's error) or `open` (the global default serves instead).
    pub failure_policy: String,
    /// Per-call deadline, in milliseconds (`None`: the `[plugins]` default).
    pub deadline_ms: Option<u64>,
    /// Memory cap, in MiB (`None`: the `[plugins]` default).
    pub memory_mib: Option<usize>,
    /// Cap on what one call may return, in KiB (`None`: the `[plugins]` default).
    pub max_output_kib: Option<usize>,
    /// When it was bound.
    pub bound_unix_ms: u64,
}

/// A new plugin version serving a share of a scope's traffic beside the current binding.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredCanary {
    /// The candidate binding.
    pub binding: StoredBinding,
    /// Share of requests it serves, 1–99 %.
    pub percent: u8,
    /// Plugin failures (traps, deadlines, limits, contract breaches) above this share of its calls
    /// roll it back by itself, in %.
    pub max_failure_percent: u8,
    /// Calls before the failure share is judged.
    pub min_calls: u64,
}

/// Everything bound to one scope (a role, per tenant or global; translators also per protocol).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StoredBindingSlot {
    /// What serves the scope now.
    pub current: Option<StoredBinding>,
    /// Earlier bindings, newest last: `rollback` restores the last one.
    pub history: Vec<StoredBinding>,
    /// A candidate serving part of the traffic.
    pub canary: Option<StoredCanary>,
    /// Why the last canary ended, when it was rolled back by itself.
    pub canary_rolled_back: Option<String>,
}

/// A request that went to an upstream, as the ledger log notes it until its record settles it:
/// what a record needs should the gateway stop before that (see `flow::recover`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OpenedRequest {
    /// The request's hold; its record names it.
    pub hold_id: String,
    /// What the hold reserves, in picos: the most the request may be charged.
    pub hold_picos: u64,
    /// When the request arrived, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// The request id.
    pub request_id: String,
    /// Tenant name.
    pub tenant: String,
    /// API key id.
    pub key_id: String,
    /// `chat` or `embeddings`.
    pub operation: String,
    /// Public model name asked for.
    pub model_asked: String,
    /// The channel it went to first.
    pub channel: String,
    /// The upstream model name asked of that channel.
    pub upstream_model: String,
    /// The client's protocol.
    pub protocol_in: String,
    /// The channel's protocol.
    pub protocol_out: String,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// The host's estimate of the prompt's tokens (four bytes a token).
    pub prompt_tokens: u64,
    /// The plugins that ran so far.
    pub plugins: Vec<String>,
}

/// A finished request's record and the hold it releases.
#[derive(Debug, Clone)]
pub struct Settlement {
    /// The usage record.
    pub record: UsageRecord,
    /// The request's balance hold, if billing placed one.
    pub hold_id: Option<String>,
}

/// A hold a request asks for before its upstream call.
#[derive(Debug, Clone)]
pub struct HoldRequest<'a> {
    /// The tenant whose balance it holds.
    pub tenant: &'a str,
    /// The API key the request came with.
    pub key_id: &'a str,
    /// The hold's id, which the request's settlement names.
    pub hold_id: &'a str,
    /// What to hold, in picos.
    pub amount_picos: u64,
    /// The tenant's available amount the billing plugin decided on: the hold is placed only if it
    /// is still that, so that concurrent requests cannot overdraw the balance together.
    pub seen_available: i128,
    /// The key's daily spend cap, in picos, with the UTC day it counts: the hold is placed only
    /// if the key's charges that day plus its holds in flight plus this one stay within it.
    pub key_cap: Option<(i128, u64)>,
}

/// Whether a hold was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldOutcome {
    /// It was.
    Placed,
    /// The available amount changed since the plugin decided: decide again.
    BalanceChanged,
    /// The key's daily spend cap has no room for it.
    OverKeyCap,
}

/// A commit's durability: resolves once the records are as safe as `server.ledger_sync` makes
/// them (at once with `none`; once synced to the disk with `batch`).
#[must_use = "a whole answer waits for its record to be durable before it goes out"]
pub struct Durable {
    /// The sequence number to wait for, and the synced one, with `batch`.
    synced: Option<(u64, tokio::sync::watch::Receiver<u64>)>,
}

impl Durable {
    /// Already durable.
    pub fn now() -> Self {
        Self { synced: None }
    }

    /// Durable once `synced` reaches `seq`.
    fn synced(seq: u64, synced: tokio::sync::watch::Receiver<u64>) -> Self {
        Self {
            synced: Some((seq, synced)),
        }
    }

    /// Waits for the sync that covers the commit.
    pub async fn wait(self) {
        let Some((seq, mut synced)) = self.synced else {
            return;
        };
        // An error means the syncing thread is gone: the store is closing.
        let _ = synced.wait_for(|synced| *synced >= seq).await;
    }
}

/// Commits usage records through the store. A store commit is cheap (the sled store appends the
/// record to its ledger log and applies records to its trees in batches), so each request commits
/// its own, on its own task, before its answer goes out: nothing a client was answered for goes
/// unrecorded.
pub struct LedgerWriter {
    store: std::sync::Arc<dyn Store>,
}

impl LedgerWriter {
    /// A writer into `store`.
    pub fn new(store: std::sync::Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Commits one request's record (debiting its cost and releasing its hold) and returns once
    /// it is committed, with what says when it is durable.
    pub fn commit(
        &self,
        record: UsageRecord,
        hold_id: Option<String>,
    ) -> Result<Durable, StoreError> {
        self.store.commit_usages(&[Settlement { record, hold_id }])
    }
}

/// A lazy sequence of ledger records.
pub type UsageRecords = Box<dyn Iterator<Item = Result<UsageRecord, StoreError>> + Send>;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (normally a running gateway) holds the data directory.
    #[error("the data directory {path} is in use by another process (is a gateway running on it?)")]
    Locked {
        /// The data directory.
        path: String,
    },
    /// A name that must be unique is taken.
    #[error("{what} `{name}` already exists")]
    Exists {
        /// The kind of thing (`tenant`).
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// A referenced item does not exist.
    #[error("{what} `{name}` does not exist")]
    Missing {
        /// The kind of thing.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// The backend failed.
    #[error("store backend: {0}")]
    Backend(String),
    /// A stored value could not be decoded.
    #[error("corrupt stored value in {keyspace}: {reason}")]
    Corrupt {
        /// Where.
        keyspace: &'static str,
        /// What the decoder said.
        reason: String,
    },
}

/// The gateway's durable state. Implementations must make `commit_usages` atomic: the ledger
/// records and the balance debits land together or not at all.
pub trait Store: Send + Sync {
    /// Creates a tenant with a zero balance.
    fn create_tenant(&self, tenant: &Tenant) -> Result<(), StoreError>;
    /// A tenant by name.
    fn tenant(&self, name: &str) -> Result<Option<Tenant>, StoreError>;
    /// Every tenant, by name.
    fn tenants(&self) -> Result<Vec<Tenant>, StoreError>;
    /// Stores a key under the SHA-256 of its secret. The tenant must exist.
    fn insert_key(&self, secret_sha256: &[u8; 32], key: &ApiKey) -> Result<(), StoreError>;
    /// A key by its public id.
    fn key_by_id(&self, key_id: &str) -> Result<Option<ApiKey>, StoreError>;
    /// Every key of a tenant.
    fn keys_of(&self, tenant: &str) -> Result<Vec<ApiKey>, StoreError>;
    /// Changes a key in place (its terms, or revoked); in force for the next request. `None` when
    /// no key has that id.
    fn update_key(
        &self,
        key_id: &str,
        change: &mut dyn FnMut(&mut ApiKey),
    ) -> Result<Option<ApiKey>, StoreError>;
    /// Marks a key revoked; `false` when no key has that id.
    fn revoke_key(&self, key_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .update_key(key_id, &mut |key| key.revoked = true)?
            .is_some())
    }
    /// Disables a tenant (its keys are refused) or enables it again; `false` when no tenant has
    /// that name.
    fn set_tenant_disabled(&self, name: &str, disabled: bool) -> Result<bool, StoreError>;
    /// The key whose secret hashes to this value.
    fn key_by_secret_sha256(&self, secret_sha256: &[u8; 32]) -> Result<Option<ApiKey>, StoreError>;
    /// A tenant's balance in picos (10^-12 currency units); negative when overdrawn.
    fn balance_picos(&self, tenant: &str) -> Result<i128, StoreError>;
    /// A tenant's balance minus the holds of its requests in flight, in picos.
    fn available_picos(&self, tenant: &str) -> Result<i128, StoreError>;
    /// Adds to a tenant's balance and records the top-up with its reason, atomically. The tenant
    /// must exist.
    fn top_up(&self, top_up: &TopUp) -> Result<i128, StoreError>;
    /// Places a request's hold, atomically with the checks of [`HoldRequest`].
    fn place_hold(&self, hold: &HoldRequest<'_>) -> Result<HoldOutcome, StoreError>;
    /// Drops every hold: at start-up no request is in flight.
    fn clear_holds(&self) -> Result<(), StoreError>;
    /// For each settlement, appends the record to the ledger, debits its cost from the tenant's
    /// balance and releases the request's hold (if it names one), settling the request if it was
    /// opened; all of them atomically. When it returns, the records survive a crash of the
    /// gateway's process; once the returned [`Durable`] resolves, a crash of the machine too (as
    /// far as `server.ledger_sync` promises).
    fn commit_usages(&self, settlements: &[Settlement]) -> Result<Durable, StoreError>;
    /// Notes a request that goes to an upstream, so that a crash before its record leaves it
    /// to be charged at the next start (see [`Store::unsettled_requests`]).
    fn open_request(&self, opened: &OpenedRequest) -> Result<(), StoreError>;
    /// Notes how many bytes of text an opened request's stream delivered so far.
    fn mark_progress(&self, hold_id: &str, delivered_text_bytes: u64) -> Result<(), StoreError>;
    /// The requests opened and never settled before this store was opened (the gateway stopped
    /// while they were in flight), each with the text bytes its last progress mark noted. Taken
    /// once: later calls answer none.
    fn unsettled_requests(&self) -> Result<Vec<(OpenedRequest, u64)>, StoreError>;
    /// What a key has been charged on a UTC day (days since the Unix epoch) plus the holds of its
    /// requests in flight, in picos: what its daily spend cap counts.
    fn key_committed_picos(&self, key_id: &str, day: u64) -> Result<i128, StoreError>;
    /// Removes the ledger records that arrived before `before_unix_ms`, folding their charges into
    /// the tenant's archived total (so reconcile still balances); returns how many went.
    fn prune_usage(&self, before_unix_ms: u64) -> Result<u64, StoreError>;
    /// Channels created through the admin API, by name.
    fn api_channels(&self) -> Result<Vec<StoredChannel>, StoreError>;
    /// Creates or replaces an API channel.
    fn put_api_channel(&self, channel: &StoredChannel) -> Result<(), StoreError>;
    /// Deletes an API channel; `false` when none has that name.
    fn delete_api_channel(&self, name: &str) -> Result<bool, StoreError>;
    /// Checks every tenant's balance against its top-ups minus its ledger charges.
    /// Uploaded plugins, without their bytes.
    fn plugins(&self) -> Result<Vec<StoredPlugin>, StoreError>;
    /// One uploaded plugin's metadata.
    fn plugin(&self, sha256: &str) -> Result<Option<StoredPlugin>, StoreError>;
    /// One uploaded plugin's component bytes.
    fn plugin_bytes(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores a plugin and its bytes together.
    fn put_plugin(&self, plugin: &StoredPlugin, bytes: &[u8]) -> Result<(), StoreError>;
    /// Removes a plugin and its bytes; false when it was not stored.
    fn delete_plugin(&self, sha256: &str) -> Result<bool, StoreError>;
    /// Every binding slot, by scope key (see `plugin::table::Scope`).
    fn binding_slots(&self) -> Result<Vec<(String, StoredBindingSlot)>, StoreError>;
    /// Replaces one binding slot.
    fn put_binding_slot(&self, scope: &str, slot: &StoredBindingSlot) -> Result<(), StoreError>;
    fn reconcile(&self) -> Result<Vec<Reconciliation>, StoreError>;
    /// Ledger records that arrived in `[from_unix_ms, to_unix_ms)`, in time order, read lazily so a
    /// long export never sits in memory.
    fn usage_between(&self, from_unix_ms: u64, to_unix_ms: u64) -> UsageRecords;
    /// The ledger record of one request.
    fn usage_by_request(&self, request_id: &str) -> Result<Option<UsageRecord>, StoreError>;
    /// Answers when the store is open and readable (for `/readyz`).
    fn check(&self) -> Result<(), StoreError>;
    /// Flushes to disk (sled also flushes in the background every 500 ms).
    fn flush(&self) -> Result<(), StoreError>;
}
