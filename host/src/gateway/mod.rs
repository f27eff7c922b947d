//! The gateway's long-lived parts, built once at start-up from the configuration: the store, the
//! plugin bindings, the live channels with their HTTP clients and keys.

mod bindings;

pub use bindings::{BindError, BindingSpec, BindingsView, CanarySpec};

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::channel::{Channel, ChannelError, ChannelSet};
use crate::config::{BindingConfig, ChannelConfig, Config, ModelLimits, PluginsConfig};
use crate::health::HealthConfig;
use crate::metrics::Metrics;
use crate::plugin::table::{BindingTable, Scope};
use crate::plugin::{Binding, Limits, PluginError, PluginRuntime, Role, RuntimeSettings, shipped};
use crate::secrets::{SealError, Sealer};
use crate::stages::limit::Limiter;
use crate::store::StoredChannel;
use crate::store::{SledStore, Store, StoreError};

/// Everything a request needs, shared by all requests.
pub struct Gateway {
    /// Durable state.
    pub store: Arc<dyn Store>,
    /// Commits each request's usage record before its answer goes out.
    pub ledger: crate::store::LedgerWriter,
    /// The plugin runtime every binding runs on.
    pub runtime: Arc<PluginRuntime>,
    /// Sandbox defaults and caps of bindings.
    plugin_settings: PluginsConfig,
    /// The live bindings; replaced whole on every change, a request keeps the one it started with.
    bindings: std::sync::RwLock<Arc<BindingTable>>,
    /// Orders binding changes, so each is a read-modify-write of one slot.
    binding_writes: Mutex<()>,
    /// Channels: the configuration file's, in order, then those created through the admin API.
    /// Replaced whole when the API changes one; a request keeps the snapshot it routed with.
    channels: std::sync::RwLock<Arc<ChannelSet>>,
    /// Request body cap, in bytes.
    pub max_body_bytes: usize,
    /// Cap on upstream answers read whole, in bytes.
    pub max_upstream_body_bytes: usize,
    /// No new attempt starts later than this after a request arrived.
    pub failover_budget: Duration,
    /// What `/metrics` exposes.
    pub metrics: Metrics,
    /// Public model → the model to serve instead when every route to it fails.
    pub fallbacks: HashMap<String, String>,
    /// Public model → its token limits, for those `[models]` configures.
    model_limits: HashMap<String, ModelLimits>,
    /// Per-key and per-tenant limit state.
    pub limiter: Limiter,
    /// Names of the configuration file's channels (the admin API cannot change them).
    config_channels: Vec<String>,
    /// Circuit-breaker settings, for channels created later.
    health: HealthConfig,
    /// Serving threads, each with its own HTTP client per channel (`server.workers`).
    workers: usize,
    /// Seals the keys of API channels; `None` without `TOLLGATE_MASTER_KEY`.
    pub sealer: Option<Sealer>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A plugin could not be loaded or bound.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The stored bindings could not be read.
    #[error(transparent)]
    Bindings(#[from] BindError),
    /// A plugin file could not be read.
    #[error("cannot read plugin file {path}")]
    PluginFile {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A binding names a shipped plugin that does not exist.
    #[error("no shipped {role} plugin is named `{name}`")]
    UnknownPlugin {
        /// The role.
        role: Role,
        /// The name.
        name: String,
    },
    /// An API channel's keys are sealed but `TOLLGATE_MASTER_KEY` is not set.
    #[error("channel `{channel}` has sealed keys but TOLLGATE_MASTER_KEY is not set")]
    NoMasterKey {
        /// The channel.
        channel: String,
    },
    /// A channel cannot be set up.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The master key is malformed, or a sealed key cannot be opened with it.
    #[error(transparent)]
    Seal(#[from] SealError),
}

/// A channel created through the admin API: its sealed keys opened under the master key.
fn api_channel(
    stored: &StoredChannel,
    sealer: Option<&Sealer>,
    health: &HealthConfig,
    workers: usize,
) -> Result<Channel, StartError> {
    let keys = stored
        .sealed_keys
        .iter()
        .enumerate()
        .map(|(index, sealed)| {
            let sealer = sealer.ok_or(StartError::NoMasterKey {
                channel: stored.config.name.clone(),
            })?;
            Ok((format!("api-key-{}", index + 1), sealer.open(sealed)?))
        })
        .collect::<Result<Vec<_>, StartError>>()?;
    Ok(Channel::with_keys(&stored.config, keys, health, workers)?)
}

impl Gateway {
    /// Rebuilds the channel set after the admin API changed the stored channels. Channels whose
    /// configuration and keys did not change keep their live health and key state.
    pub fn reload_api_channels(&self) -> Result<(), StartError> {
        let current = self.channels();
        let mut next: Vec<Arc<Channel>> = current
            .iter()
            .filter(|channel| self.config_channels.contains(&channel.config.name))
            .cloned()
            .collect();
        for stored in self.store.api_channels()? {
            let fresh = api_channel(&stored, self.sealer.as_ref(), &self.health, self.workers)?;
            let unchanged = current.iter().find(|channel| {
                channel.config == fresh.config
                    && channel.keys.len() == fresh.keys.len()
                    && channel
                        .keys
                        .iter()
                        .zip(&fresh.keys)
                        .all(|(old, new)| old.secret() == new.secret())
            });
            next.push(unchanged.cloned().unwrap_or_else(|| Arc::new(fresh)));
        }
        *self
            .channels
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(ChannelSet::new(next));
        Ok(())
    }

    /// Whether a channel comes from the configuration file (and so is not the admin API's).
    pub fn is_config_channel(&self, name: &str) -> bool {
        self.config_channels.iter().any(|known| known == name)
    }

    /// The channels now: a snapshot that stays valid while the set changes.
    pub fn channels(&self) -> Arc<ChannelSet> {
        self.channels
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Builds the gateway: opens the store, compiles and binds the plugins, resolves channel keys.
    pub async fn start(config: &Config, config_dir: &Path) -> Result<Arc<Self>, StartError> {
        let store = open_store(config)?;
        let runtime = PluginRuntime::new(&RuntimeSettings {
            max_instances: config.plugins.max_instances,
            max_memory_bytes: config.plugins.max_memory_mib << 20,
            cache_dir: config
                .plugins
                .cache_dir
                .clone()
                .unwrap_or_else(|| config.server.data_dir.join("plugin-cache")),
            max_instances_per_tenant: config.plugins.max_instances_per_tenant,
        })?;
        let defaults = default_bindings(config, config_dir, &runtime).await?;
        let sealer = Sealer::from_env()?;
        let workers = config.server.worker_count();
        let channels = start_channels(config, store.as_ref(), sealer.as_ref(), workers)?;
        let (trips, tripped) = tokio::sync::mpsc::unbounded_channel();
        let gateway = Arc::new(Self {
            ledger: crate::store::LedgerWriter::new(store.clone()),
            store,
            plugin_settings: config.plugins.clone(),
            bindings: std::sync::RwLock::new(Arc::new(BindingTable::new(defaults, trips))),
            binding_writes: Mutex::new(()),
            channels: std::sync::RwLock::new(Arc::new(ChannelSet::new(channels))),
            max_body_bytes: config.server.max_body_bytes,
            max_upstream_body_bytes: config.server.max_upstream_body_bytes,
            failover_budget: Duration::from_millis(config.server.failover_budget_ms),
            metrics: Metrics::new(runtime.metrics()),
            fallbacks: config
                .models
                .iter()
                .filter_map(|(model, settings)| Some((model.clone(), settings.fallback.clone()?)))
                .collect(),
            model_limits: config
                .models
                .iter()
                .map(|(model, settings)| (model.clone(), settings.limits()))
                .collect(),
            limiter: Limiter::new(
                runtime.lendable_instances(),
                config.plugins.max_streams_per_tenant,
            ),
            config_channels: config
                .channels
                .iter()
                .map(|channel| channel.name.clone())
                .collect(),
            health: config.health.clone(),
            workers,
            sealer,
            runtime,
        });
        Self::watch_canaries(Arc::downgrade(&gateway), tripped);
        gateway.load_stored_bindings().await?;
        Ok(gateway)
    }

    /// A public model's token limits (the defaults for a model `[models]` does not name).
    pub fn model_limits(&self, model: &str) -> ModelLimits {
        self.model_limits.get(model).copied().unwrap_or_default()
    }

    /// The largest plugin the admin API accepts, in bytes.
    pub fn max_upload_bytes(&self) -> usize {
        self.plugin_settings.max_upload_mib << 20
    }
}

/// The store in `server.data_dir`, made if missing, with no hold left from a previous run (holds
/// belong to requests in flight, and none survives a restart).
fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartError> {
    std::fs::create_dir_all(&config.server.data_dir).map_err(|source| {
        StartError::Store(StoreError::Backend(format!(
            "cannot create {}: {source}",
            config.server.data_dir.display()
        )))
    })?;
    let store: Arc<dyn Store> = Arc::new(SledStore::open(
        &config.server.data_dir,
        config.server.ledger_sync,
    )?);
    store.clear_holds()?;
    Ok(store)
}

/// The configuration file's global bindings: router, billing, and a translator for every protocol
/// its channels name, it binds, or a shipped translator speaks (so channels created later can use
/// it).
async fn default_bindings(
    config: &Config,
    config_dir: &Path,
    runtime: &Arc<PluginRuntime>,
) -> Result<HashMap<Scope, Arc<Binding>>, StartError> {
    let bind = |role: Role, binding: BindingConfig| {
        let runtime = runtime.clone();
        let defaults = &config.plugins;
        async move {
            let (name, bytes) = plugin_bytes(role, &binding, config_dir)?;
            let compiled = runtime.load(&name, role, &bytes, None)?;
            let limits = Limits {
                deadline: Duration::from_millis(
                    binding.deadline_ms.unwrap_or(defaults.deadline_ms),
                ),
                memory_bytes: binding.memory_mib.unwrap_or(defaults.memory_mib) << 20,
                max_output_bytes: binding.max_output_kib.unwrap_or(defaults.max_output_kib) << 10,
            };
            Ok::<_, StartError>(Arc::new(
                Binding::new(runtime, compiled, binding.config_json(), limits).await?,
            ))
        }
    };
    let global = |role: Role, protocol: Option<&str>| Scope {
        tenant: None,
        role,
        protocol: protocol.map(str::to_owned),
    };
    let mut defaults = HashMap::new();
    defaults.insert(
        global(Role::Router, None),
        bind(Role::Router, config.bindings.router.clone()).await?,
    );
    defaults.insert(
        global(Role::Billing, None),
        bind(Role::Billing, config.bindings.billing.clone()).await?,
    );
    let protocols: std::collections::BTreeSet<&str> = config
        .channels
        .iter()
        .map(|channel| channel.protocol.as_str())
        .chain(config.bindings.translators.keys().map(String::as_str))
        .chain(
            shipped::SHIPPED
                .iter()
                .filter(|plugin| plugin.role == Role::Translator)
                .map(|plugin| plugin.name),
        )
        .collect();
    for protocol in protocols {
        let binding = config
            .bindings
            .translators
            .get(protocol)
            .cloned()
            .unwrap_or_else(|| BindingConfig::shipped(protocol));
        defaults.insert(
            global(Role::Translator, Some(protocol)),
            bind(Role::Translator, binding).await?,
        );
    }
    Ok(defaults)
}

/// The configuration file's channels, then those created through the admin API.
fn start_channels(
    config: &Config,
    store: &dyn Store,
    sealer: Option<&Sealer>,
    workers: usize,
) -> Result<Vec<Arc<Channel>>, StartError> {
    let mut channels = config
        .channels
        .iter()
        .map(|channel| Ok(Arc::new(live_channel(channel, &config.health, workers)?)))
        .collect::<Result<Vec<_>, StartError>>()?;
    for stored in store.api_channels()? {
        let channel = api_channel(&stored, sealer, &config.health, workers)?;
        channels.push(Arc::new(channel));
    }
    Ok(channels)
}

fn plugin_bytes(
    role: Role,
    binding: &BindingConfig,
    config_dir: &Path,
) -> Result<(String, Vec<u8>), StartError> {
    if let Some(path) = binding.file(config_dir) {
        let bytes = std::fs::read(&path).map_err(|source| StartError::PluginFile {
            path: path.display().to_string(),
            source,
        })?;
        let name = path.file_stem().map_or_else(
            || binding.plugin.clone(),
            |stem| stem.to_string_lossy().into_owned(),
        );
        return Ok((name, bytes));
    }
    let shipped =
        shipped::find(role, &binding.plugin).ok_or_else(|| StartError::UnknownPlugin {
            role,
            name: binding.plugin.clone(),
        })?;
    Ok((shipped.name.to_owned(), shipped.bytes.to_vec()))
}

/// A channel of the configuration file: its keys come from the environment variables it names.
fn live_channel(
    config: &ChannelConfig,
    health: &HealthConfig,
    workers: usize,
) -> Result<Channel, StartError> {
    let keys = config
        .api_key_env
        .iter()
        .filter_map(|name| {
            let secret = std::env::var(name)
                .ok()
                .filter(|secret| !secret.is_empty())?;
            Some((name.clone(), secret))
        })
        .collect();
    Ok(Channel::with_keys(config, keys, health, workers)?)
}
