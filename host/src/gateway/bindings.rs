//! The plugin lifecycle of a running gateway: uploaded plugins, the bindings stored per scope, and
//! the live [`BindingTable`] every request resolves its plugins from.
//!
//! A change (bind, rollback, canary, promote) first builds the new binding outside any lock — the
//! plugin compiles from the cache and validates its configuration — then, under one short lock,
//! writes the store and swaps in a new table. Requests hold the table they started with, so they
//! finish on the version they started on; nothing restarts.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::Gateway;
use crate::plugin::table::{
    BindingTable, Canary, CanaryStats, CanaryTripped, FailurePolicy, Scope, Slot,
};
use crate::plugin::{Binding, Limits, PluginError, Role, shipped};
use crate::store::{StoreError, StoredBinding, StoredBindingSlot, StoredCanary, StoredPlugin};

/// Why a plugin or binding change was refused.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The plugin failed to load, or refused its configuration.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The reference names no uploaded or shipped plugin.
    #[error("no {role} plugin `{reference}` is uploaded or shipped")]
    UnknownPlugin {
        /// The role looked for.
        role: Role,
        /// The reference given.
        reference: String,
    },
    /// The plugin plays another role than the scope's.
    #[error("plugin `{plugin}` is a {actual} plugin; this binding needs a {expected}")]
    WrongRole {
        /// The plugin.
        plugin: String,
        /// Its role.
        actual: Role,
        /// The scope's role.
        expected: Role,
    },
    /// A field is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The scope's state does not allow the change (nothing to roll back to, no canary, a plugin
    /// still bound).
    #[error("{0}")]
    Conflict(String),
}

/// What an operator binds: a plugin and how it runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingSpec {
    /// A plugin hash (or its first 12+ hex digits), the name of an uploaded plugin (its newest
    /// version), or a shipped plugin's name.
    pub plugin: String,
    /// The plugin's configuration: `{}` when absent, except for a canary, which then keeps the
    /// configuration of the binding it runs beside.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// `closed` (default) or `open`.
    #[serde(default)]
    pub failure_policy: Option<String>,
    /// Per-call deadline, in milliseconds.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// Memory cap, in MiB.
    #[serde(default)]
    pub memory_mib: Option<usize>,
    /// Cap on one call's output, in KiB.
    #[serde(default)]
    pub max_output_kib: Option<usize>,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// A canary: a binding plus its share of the traffic and its failure threshold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanarySpec {
    /// The candidate.
    #[serde(flatten)]
    pub binding: BindingSpec,
    /// Share of requests, 1–99 %.
    pub percent: u8,
    /// Failure share that rolls it back by itself, 1–100 % (default 20).
    #[serde(default)]
    pub max_failure_percent: Option<u8>,
    /// Calls before the failure share is judged (default 20).
    #[serde(default)]
    pub min_calls: Option<u64>,
}

const DEFAULT_MAX_FAILURE_PERCENT: u8 = 20;
const DEFAULT_MIN_CALLS: u64 = 20;
/// Deadlines longer than this would let one plugin call hold a request for a minute.
const MAX_DEADLINE_MS: u64 = 60_000;

/// The bindings as the admin API lists them: live and stored, as of one moment.
pub struct BindingsView {
    /// The table requests draw from.
    pub live: Arc<BindingTable>,
    /// The stored slots by scope key.
    pub stored: Vec<(String, StoredBindingSlot)>,
}

impl Gateway {
    /// The live bindings: a snapshot that stays valid while they change.
    pub fn bindings(&self) -> Arc<BindingTable> {
        self.bindings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Stores uploaded bytes after checking them: a component of one role world, of a contract
    /// this host serves, importing nothing the sandbox lacks. Compiling warms the artifact cache,
    /// so binding it later is quick. Returns the plugin and whether it is new.
    pub async fn upload_plugin(
        &self,
        name: String,
        bytes: Vec<u8>,
    ) -> Result<(StoredPlugin, bool), BindError> {
        if name.is_empty() || name.len() > 64 || name.contains('/') {
            return Err(BindError::Invalid(
                "a plugin name is 1 to 64 characters without `/`".to_owned(),
            ));
        }
        let runtime = self.runtime.clone();
        // Compiling a component takes tens of milliseconds of CPU: off the async workers.
        let (compiled, bytes) = tokio::task::spawn_blocking(move || {
            let compiled = runtime.inspect(&name, &bytes);
            (compiled, bytes)
        })
        .await
        .map_err(|error| PluginError::Engine(format!("compile task: {error}")))?;
        let compiled = compiled?;
        if let Some(existing) = self.store.plugin(&compiled.plugin().sha256)? {
            return Ok((existing, false));
        }
        let plugin = StoredPlugin {
            sha256: compiled.plugin().sha256.clone(),
            name: compiled.plugin().name.clone(),
            role: compiled.role().to_string(),
            contract: compiled.contract().to_owned(),
            size_bytes: bytes.len() as u64,
            uploaded_unix_ms: crate::store::now_unix_ms(),
        };
        self.store.put_plugin(&plugin, &bytes)?;
        tracing::info!(plugin = %compiled.plugin(), role = %compiled.role(), "plugin uploaded");
        Ok((plugin, true))
    }

    /// Deletes an uploaded plugin unless a binding or canary still uses it.
    pub fn delete_plugin(&self, sha256: &str) -> Result<bool, BindError> {
        let _writing = self.binding_writes();
        let users = self.bound_in(sha256)?;
        if !users.is_empty() {
            return Err(BindError::Conflict(format!(
                "plugin {sha256} is bound in {}; rebind or roll back those first",
                users.join(", ")
            )));
        }
        Ok(self.store.delete_plugin(sha256)?)
    }

    /// Scopes whose current binding or canary runs a plugin.
    pub fn bound_in(&self, sha256: &str) -> Result<Vec<String>, BindError> {
        Ok(self
            .store
            .binding_slots()?
            .into_iter()
            .filter(|(_, slot)| {
                slot.current.iter().any(|bound| bound.plugin == sha256)
                    || slot
                        .canary
                        .iter()
                        .any(|canary| canary.binding.plugin == sha256)
            })
            .map(|(scope, _)| scope)
            .collect())
    }

    /// Binds a plugin to a scope; the previous binding goes to the scope's history.
    pub async fn bind(
        &self,
        scope: &Scope,
        spec: &BindingSpec,
    ) -> Result<StoredBindingSlot, BindError> {
        let stored = self.stored_binding(scope.role, spec)?;
        let built = self.build(scope.role, &stored).await?;
        self.change_slot(scope, |slot, live| {
            self.still_stored(&stored)?;
            if let Some(previous) = slot.current.replace(stored.clone()) {
                remember(slot, previous);
            }
            live.current = Some(built.clone());
            live.failure_policy = policy(&stored);
            Ok(())
        })
    }

    /// Restores the scope's previous binding; with none left, removes the scope's binding, so it
    /// falls back to the global one (or, for a global scope, to the configuration file's).
    pub async fn rollback(&self, scope: &Scope) -> Result<StoredBindingSlot, BindError> {
        let stored = self.store_slot(scope)?;
        if stored.current.is_none() {
            return Err(BindError::Conflict(format!("nothing is bound in {scope}")));
        }
        let previous = stored.history.last().cloned();
        let built = match &previous {
            Some(previous) => Some(self.build(scope.role, previous).await?),
            None => None,
        };
        self.change_slot(scope, |slot, live| {
            if slot.history.last() != previous.as_ref() {
                return Err(BindError::Conflict(format!(
                    "{scope} changed while rolling back; try again"
                )));
            }
            slot.current = slot.history.pop();
            live.failure_policy = slot.current.as_ref().map(policy).unwrap_or_default();
            live.current = built.clone();
            Ok(())
        })
    }

    /// Starts a canary in a scope: a share of its requests run the candidate.
    pub async fn start_canary(
        &self,
        scope: &Scope,
        spec: &CanarySpec,
    ) -> Result<StoredBindingSlot, BindError> {
        if !(1..=99).contains(&spec.percent) {
            return Err(BindError::Invalid(
                "`percent` is between 1 and 99".to_owned(),
            ));
        }
        let max_failure_percent = spec
            .max_failure_percent
            .unwrap_or(DEFAULT_MAX_FAILURE_PERCENT);
        if !(1..=100).contains(&max_failure_percent) {
            return Err(BindError::Invalid(
                "`max_failure_percent` is between 1 and 100".to_owned(),
            ));
        }
        let mut candidate = spec.binding.clone();
        if candidate.config.is_none() {
            // A canary is mostly a new version of what serves: it keeps that configuration.
            let bindings = self.bindings();
            candidate.config = bindings
                .serving(scope)
                .and_then(|current| serde_json::from_str(current.config()).ok());
        }
        let canary = StoredCanary {
            binding: self.stored_binding(scope.role, &candidate)?,
            percent: spec.percent,
            max_failure_percent,
            min_calls: spec.min_calls.unwrap_or(DEFAULT_MIN_CALLS).max(1),
        };
        let built = self.build(scope.role, &canary.binding).await?;
        self.change_slot(scope, |slot, live| {
            self.still_stored(&canary.binding)?;
            live.canary = Some(live_canary(built.clone(), &canary));
            slot.canary = Some(canary.clone());
            slot.canary_rolled_back = None;
            Ok(())
        })
    }

    /// Ends a scope's canary: `reason` set means it was rolled back for failing, kept for the
    /// operator to read.
    pub fn end_canary(
        &self,
        scope: &Scope,
        reason: Option<String>,
    ) -> Result<StoredBindingSlot, BindError> {
        self.close_canary(scope, reason, None)
    }

    /// Ends a scope's canary; with `only`, only the canary whose tally that is (not one an
    /// operator started since).
    fn close_canary(
        &self,
        scope: &Scope,
        reason: Option<String>,
        only: Option<&Arc<CanaryStats>>,
    ) -> Result<StoredBindingSlot, BindError> {
        self.change_slot(scope, |slot, live| {
            let running = live.canary.as_ref().map(|canary| &canary.stats);
            if let Some(only) = only
                && !running.is_some_and(|running| Arc::ptr_eq(running, only))
            {
                return Err(BindError::Conflict(format!(
                    "the canary in {scope} was replaced"
                )));
            }
            if slot.canary.take().is_none() {
                return Err(BindError::Conflict(format!("no canary runs in {scope}")));
            }
            slot.canary_rolled_back = reason.clone();
            live.canary = None;
            Ok(())
        })
    }

    /// Makes a scope's canary its binding for all traffic.
    pub fn promote_canary(&self, scope: &Scope) -> Result<StoredBindingSlot, BindError> {
        self.change_slot(scope, |slot, live| {
            let canary = slot
                .canary
                .take()
                .ok_or_else(|| BindError::Conflict(format!("no canary runs in {scope}")))?;
            let live_canary = live
                .canary
                .take()
                .ok_or_else(|| BindError::Conflict(format!("no canary runs in {scope}")))?;
            if let Some(previous) = slot.current.replace(canary.binding.clone()) {
                remember(slot, previous);
            }
            live.failure_policy = policy(&canary.binding);
            live.current = Some(live_canary.binding);
            Ok(())
        })
    }

    /// A canary failed too often: roll it back and say why, in the log, the metrics and the
    /// binding's state that the admin API shows.
    fn canary_tripped(&self, tripped: &CanaryTripped) {
        let closed = self.close_canary(
            &tripped.scope,
            Some(tripped.reason.clone()),
            Some(&tripped.stats),
        );
        match closed {
            Ok(_) => {
                tracing::error!(scope = %tripped.scope, reason = %tripped.reason, "canary rolled back");
                self.runtime.metrics().canary_rollbacks.inc();
            }
            Err(BindError::Conflict(_)) => {}
            Err(error) => {
                tracing::error!(scope = %tripped.scope, %error, "canary rollback failed");
            }
        }
    }

    /// Loads every stored binding at start. A binding that no longer loads (its plugin deleted from
    /// the store by hand, its configuration now refused) is left out with an error in the log, so
    /// its scope falls back to the global binding instead of the gateway refusing to start.
    pub(super) async fn load_stored_bindings(&self) -> Result<(), BindError> {
        let mut table = self.bindings().as_ref().clone();
        for (key, stored) in self.store.binding_slots()? {
            let Some(scope) = Scope::parse(&key) else {
                tracing::error!(scope = key, "unknown binding scope in the store; ignored");
                continue;
            };
            match self.live_slot(&scope, &stored).await {
                Ok(slot) => table = table.with_slot(scope, Some(slot)),
                Err(error) => tracing::error!(%scope, %error, "stored binding left out"),
            }
        }
        *self
            .bindings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(table);
        Ok(())
    }

    async fn live_slot(
        &self,
        scope: &Scope,
        stored: &StoredBindingSlot,
    ) -> Result<Slot, BindError> {
        let current = match &stored.current {
            Some(current) => Some(self.build(scope.role, current).await?),
            None => None,
        };
        let canary = match &stored.canary {
            Some(canary) => Some(live_canary(
                self.build(scope.role, &canary.binding).await?,
                canary,
            )),
            None => None,
        };
        Ok(Slot {
            current,
            failure_policy: stored.current.as_ref().map(policy).unwrap_or_default(),
            canary,
        })
    }

    /// Rolls back the canaries the table reports as tripped, for as long as the gateway lives.
    pub(super) fn watch_canaries(
        gateway: std::sync::Weak<Self>,
        mut trips: tokio::sync::mpsc::UnboundedReceiver<CanaryTripped>,
    ) {
        tokio::spawn(async move {
            while let Some(tripped) = trips.recv().await {
                let Some(gateway) = gateway.upgrade() else {
                    return;
                };
                gateway.canary_tripped(&tripped);
            }
        });
    }

    /// The live binding table and the stored slots, read together under the writers' lock: a
    /// change (a bind, a canary's rollback) is never seen half made, stored but not yet live.
    pub fn bindings_view(&self) -> Result<BindingsView, StoreError> {
        let _writing = self.binding_writes();
        Ok(BindingsView {
            live: self.bindings(),
            stored: self.store.binding_slots()?,
        })
    }

    fn binding_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        // Guards no data of its own: it orders writers, and the admin listing against them.
        self.binding_writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn store_slot(&self, scope: &Scope) -> Result<StoredBindingSlot, BindError> {
        Ok(self
            .store
            .binding_slots()?
            .into_iter()
            .find(|(key, _)| *key == scope.key())
            .map(|(_, slot)| slot)
            .unwrap_or_default())
    }

    /// Applies one change to a scope's stored and live slot together, under the writers' lock:
    /// the store is written first, then the new table is swapped in.
    fn change_slot(
        &self,
        scope: &Scope,
        change: impl FnOnce(&mut StoredBindingSlot, &mut Slot) -> Result<(), BindError>,
    ) -> Result<StoredBindingSlot, BindError> {
        let _writing = self.binding_writes();
        let mut stored = self.store_slot(scope)?;
        let table = self.bindings();
        let mut live = table.slot(scope).cloned().unwrap_or(Slot {
            current: None,
            failure_policy: FailurePolicy::Closed,
            canary: None,
        });
        change(&mut stored, &mut live)?;
        self.store.put_binding_slot(&scope.key(), &stored)?;
        let next = table.with_slot(scope.clone(), Some(live));
        *self
            .bindings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
        tracing::info!(%scope, "bindings changed");
        Ok(stored)
    }

    /// Refuses to bind a plugin deleted since it was looked up (called under the writers' lock,
    /// which deletion also takes).
    fn still_stored(&self, stored: &StoredBinding) -> Result<(), BindError> {
        if stored.plugin.starts_with("shipped:") || self.store.plugin(&stored.plugin)?.is_some() {
            return Ok(());
        }
        Err(BindError::Conflict(format!(
            "plugin {} was deleted meanwhile",
            stored.plugin
        )))
    }

    /// Checks a spec and resolves its plugin reference to what the store keeps.
    fn stored_binding(&self, role: Role, spec: &BindingSpec) -> Result<StoredBinding, BindError> {
        let failure_policy = spec.failure_policy.as_deref().unwrap_or("closed");
        if FailurePolicy::parse(failure_policy).is_none() {
            return Err(BindError::Invalid(format!(
                "`failure_policy` is `closed` or `open`, not `{failure_policy}`"
            )));
        }
        if spec
            .deadline_ms
            .is_some_and(|ms| ms == 0 || ms > MAX_DEADLINE_MS)
        {
            return Err(BindError::Invalid(format!(
                "`deadline_ms` is between 1 and {MAX_DEADLINE_MS}"
            )));
        }
        let max_memory_mib = self.plugin_settings.max_memory_mib;
        if spec
            .memory_mib
            .is_some_and(|mib| mib == 0 || mib > max_memory_mib)
        {
            return Err(BindError::Invalid(format!(
                "`memory_mib` is between 1 and {max_memory_mib} (`plugins.max_memory_mib`)"
            )));
        }
        if spec.max_output_kib == Some(0) {
            return Err(BindError::Invalid(
                "`max_output_kib` is at least 1".to_owned(),
            ));
        }
        Ok(StoredBinding {
            plugin: self.plugin_reference(role, &spec.plugin)?,
            config: spec.config.clone().unwrap_or_else(empty_object),
            failure_policy: failure_policy.to_owned(),
            deadline_ms: spec.deadline_ms,
            memory_mib: spec.memory_mib,
            max_output_kib: spec.max_output_kib,
            bound_unix_ms: crate::store::now_unix_ms(),
        })
    }

    /// A hash (whole, or 12+ leading hex digits), an uploaded name (its newest version), or a
    /// shipped name (`shipped:<name>` in the store).
    fn plugin_reference(&self, role: Role, reference: &str) -> Result<String, BindError> {
        let uploaded = self.store.plugins()?;
        let by_hash: Vec<&StoredPlugin> = if reference.len() >= 12 {
            uploaded
                .iter()
                .filter(|plugin| plugin.sha256.starts_with(reference))
                .collect()
        } else {
            Vec::new()
        };
        let chosen = match by_hash.as_slice() {
            [one] => Some(*one),
            [] => uploaded
                .iter()
                .filter(|plugin| plugin.name == reference)
                .max_by_key(|plugin| plugin.uploaded_unix_ms),
            _ => {
                return Err(BindError::Invalid(format!(
                    "`{reference}` is the start of several plugin hashes; give more of it"
                )));
            }
        };
        if let Some(plugin) = chosen {
            if plugin.role != role.to_string() {
                return Err(BindError::WrongRole {
                    plugin: format!("{}@{}", plugin.name, &plugin.sha256[..12]),
                    actual: Role::parse(&plugin.role).unwrap_or(role),
                    expected: role,
                });
            }
            return Ok(plugin.sha256.clone());
        }
        let name = reference.strip_prefix("shipped:").unwrap_or(reference);
        match shipped::find(role, name) {
            Some(plugin) => Ok(format!("shipped:{}", plugin.name)),
            None => Err(BindError::UnknownPlugin {
                role,
                reference: reference.to_owned(),
            }),
        }
    }

    /// Compiles (from the cache) and binds a stored binding; the plugin validates its configuration.
    async fn build(&self, role: Role, stored: &StoredBinding) -> Result<Arc<Binding>, BindError> {
        let (name, bytes, known_sha256) = match stored.plugin.strip_prefix("shipped:") {
            Some(name) => {
                let plugin = shipped::find(role, name).ok_or_else(|| BindError::UnknownPlugin {
                    role,
                    reference: stored.plugin.clone(),
                })?;
                (plugin.name.to_owned(), plugin.bytes.to_vec(), None)
            }
            None => {
                let missing =
                    || BindError::Conflict(format!("plugin {} is no longer stored", stored.plugin));
                let plugin = self.store.plugin(&stored.plugin)?.ok_or_else(missing)?;
                let bytes = self
                    .store
                    .plugin_bytes(&stored.plugin)?
                    .ok_or_else(missing)?;
                (plugin.name, bytes, Some(stored.plugin.as_str()))
            }
        };
        let compiled = self.runtime.load(&name, role, &bytes, known_sha256)?;
        let defaults = &self.plugin_settings;
        let limits = Limits {
            deadline: Duration::from_millis(stored.deadline_ms.unwrap_or(defaults.deadline_ms)),
            memory_bytes: stored.memory_mib.unwrap_or(defaults.memory_mib) << 20,
            max_output_bytes: stored.max_output_kib.unwrap_or(defaults.max_output_kib) << 10,
        };
        let config = serde_json::to_string(&stored.config).unwrap_or_else(|_| "{}".to_owned());
        Ok(Arc::new(
            Binding::new(self.runtime.clone(), compiled, config, limits).await?,
        ))
    }
}

/// Bindings a scope remembers for `rollback`; older ones are forgotten.
const HISTORY: usize = 20;

/// Puts a replaced binding on the scope's history, forgetting the oldest past [`HISTORY`].
fn remember(slot: &mut StoredBindingSlot, previous: StoredBinding) {
    slot.history.push(previous);
    if slot.history.len() > HISTORY {
        slot.history.remove(0);
    }
}

fn policy(stored: &StoredBinding) -> FailurePolicy {
    FailurePolicy::parse(&stored.failure_policy).unwrap_or_default()
}

fn live_canary(binding: Arc<Binding>, stored: &StoredCanary) -> Canary {
    Canary {
        binding,
        percent: stored.percent,
        stats: Arc::new(CanaryStats::new(
            stored.max_failure_percent,
            stored.min_calls,
        )),
    }
}
