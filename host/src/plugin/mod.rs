//! The plugin runtime: one wasmtime engine, plugins compiled once (and cached on disk), and every call
//! run in a fresh store under a deadline and a memory cap, so no request sees another's state and a
//! hostile plugin can neither hang nor crash the gateway.
//!
//! In: plugin bytes (shipped, or a file an operator names) and typed calls from the stages.
//! Out: typed results, or a [`PluginError`] naming plugin and role. Knows nothing about HTTP.

pub mod billing;
pub mod router;
mod sandbox;
pub mod shipped;
pub mod translator;

use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use sandbox::Limits;
use sandbox::PluginState;

/// The role a plugin plays; one per plugin, fixed by the world it was built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Orders the channels a request tries.
    Router,
    /// Speaks one upstream protocol.
    Translator,
    /// Prices usage.
    Billing,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Router => "router",
            Role::Translator => "translator",
            Role::Billing => "billing",
        })
    }
}

/// Names a plugin version in errors, logs and usage records: its name and the head of its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginRef {
    /// The name it was loaded under (a shipped name, or the file's stem).
    pub name: String,
    /// Hex SHA-256 of the component bytes.
    pub sha256: String,
}

impl fmt::Display for PluginRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}",
            self.name,
            &self.sha256[..12.min(self.sha256.len())]
        )
    }
}

/// Why a plugin could not be loaded or a call did not return a value.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The bytes are not a component of the role's world (or not wasm at all).
    #[error("plugin `{name}` is not a valid {role} component: {reason}")]
    Invalid {
        /// The name it was loaded under.
        name: String,
        /// The role it was loaded for.
        role: Role,
        /// What the compiler or linker said.
        reason: String,
    },
    /// The plugin refused the configuration it was bound with.
    #[error("plugin {plugin} ({role}) rejected its configuration: {message}")]
    Config {
        /// The plugin.
        plugin: PluginRef,
        /// Its role.
        role: Role,
        /// The plugin's own message.
        message: String,
    },
    /// The call ran past its deadline and was interrupted.
    #[error("plugin {plugin} ({role}) did not finish `{export}` within {after:?}")]
    Deadline {
        /// The plugin.
        plugin: PluginRef,
        /// Its role.
        role: Role,
        /// The export called.
        export: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The plugin tried to grow its memory past its cap.
    #[error("plugin {plugin} ({role}) hit its memory cap of {cap_bytes} bytes in `{export}`")]
    MemoryCap {
        /// The plugin.
        plugin: PluginRef,
        /// Its role.
        role: Role,
        /// The export called.
        export: &'static str,
        /// The cap.
        cap_bytes: usize,
    },
    /// The plugin trapped (a panic, an unreachable, a failed instantiation).
    #[error("plugin {plugin} ({role}) failed in `{export}`: {trap} (plugin output: {output:?})")]
    Trap {
        /// The plugin.
        plugin: PluginRef,
        /// Its role.
        role: Role,
        /// The export called.
        export: &'static str,
        /// The trap as wasmtime describes it.
        trap: String,
        /// What the plugin wrote to stdout/stderr (a Rust panic's message lands here).
        output: String,
    },
    /// The plugin returned something the contract forbids (e.g. a route to an unknown channel).
    #[error("plugin {plugin} ({role}) broke the contract: {detail}")]
    Contract {
        /// The plugin.
        plugin: PluginRef,
        /// Its role.
        role: Role,
        /// What was wrong.
        detail: String,
    },
    /// No plugin is bound for what was asked (e.g. no translator for a channel's protocol).
    #[error("no {role} plugin is bound for `{what}`")]
    Unbound {
        /// The role.
        role: Role,
        /// What lacks a binding (a protocol name, a tenant).
        what: String,
    },
    /// The engine or the compile cache failed.
    #[error("plugin engine: {0}")]
    Engine(String),
}

impl PluginError {
    /// The plugin and role, when the error is about one plugin (the 500 body names them).
    pub fn culprit(&self) -> Option<(&PluginRef, Role)> {
        match self {
            PluginError::Config { plugin, role, .. }
            | PluginError::Deadline { plugin, role, .. }
            | PluginError::MemoryCap { plugin, role, .. }
            | PluginError::Trap { plugin, role, .. }
            | PluginError::Contract { plugin, role, .. } => Some((plugin, *role)),
            PluginError::Invalid { .. } | PluginError::Unbound { .. } | PluginError::Engine(_) => {
                None
            }
        }
    }
}

/// Engine-wide settings, from the `[plugins]` config table.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    /// Instances the pool holds at once: concurrent plugin calls plus open streams.
    pub max_instances: u32,
    /// The largest linear memory any plugin may have, in bytes (the pool reserves this per slot).
    pub max_memory_bytes: usize,
    /// Where compiled artifacts are cached.
    pub cache_dir: PathBuf,
}

/// Labels of plugin call figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct PluginLabels {
    /// `router`, `translator` or `billing`.
    pub role: String,
    /// `name@sha`.
    pub plugin: String,
    /// The export called.
    pub export: String,
}

/// Plugin call durations and failures, registered by the gateway's metrics.
#[derive(Clone)]
pub struct PluginMetrics {
    /// Call durations, instantiation included, seconds.
    pub calls: prometheus_client::metrics::family::Family<
        PluginLabels,
        prometheus_client::metrics::histogram::Histogram,
        fn() -> prometheus_client::metrics::histogram::Histogram,
    >,
    /// Traps, deadlines, limit hits.
    pub failures: prometheus_client::metrics::family::Family<
        PluginLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl PluginMetrics {
    fn new() -> Self {
        fn histogram() -> prometheus_client::metrics::histogram::Histogram {
            prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.000_005, 2.0, 20),
            )
        }
        Self {
            calls: prometheus_client::metrics::family::Family::new_with_constructor(histogram),
            failures: Default::default(),
        }
    }
}

/// The wasmtime engine and linker every plugin runs on.
pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<PluginState>,
    cache_dir: PathBuf,
    /// Part of every cache file name, so an artifact from another engine build is never loaded.
    engine_key: String,
    metrics: PluginMetrics,
}

/// How often the epoch advances; a deadline is counted in these ticks of running time.
const EPOCH_TICK: Duration = Duration::from_millis(5);

impl PluginRuntime {
    /// Builds the engine (pooling allocator, epoch interruption) and starts its epoch ticker thread.
    pub fn new(settings: &RuntimeSettings) -> Result<Arc<Self>, PluginError> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(settings.max_instances)
            .total_core_instances(settings.max_instances.saturating_mul(4))
            .total_memories(settings.max_instances.saturating_mul(2))
            .total_tables(settings.max_instances.saturating_mul(4))
            .total_stacks(settings.max_instances)
            .max_memory_size(settings.max_memory_bytes);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| PluginError::Engine(e.to_string()))?;
        let linker = sandbox::linker(&engine)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = format!("{:016x}", hasher.finish());
        std::fs::create_dir_all(&settings.cache_dir)
            .map_err(|e| PluginError::Engine(format!("cache dir: {e}")))?;
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("plugin-epoch".to_owned())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| PluginError::Engine(format!("epoch thread: {e}")))?;
        Ok(Arc::new(Self {
            engine,
            linker,
            cache_dir: settings.cache_dir.clone(),
            engine_key,
            metrics: PluginMetrics::new(),
        }))
    }

    /// Compiles (or loads from the cache) a component and checks it against its role's world.
    pub fn load(
        &self,
        name: &str,
        role: Role,
        bytes: &[u8],
    ) -> Result<CompiledPlugin, PluginError> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let plugin = PluginRef {
            name: name.to_owned(),
            sha256,
        };
        let component = self.compile_cached(&plugin, role, bytes)?;
        let invalid = |reason: String| PluginError::Invalid {
            name: name.to_owned(),
            role,
            reason,
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| invalid(format!("{e:#}")))?;
        let exports = match role {
            Role::Router => Exports::Router(
                router::RouterPluginPre::new(pre).map_err(|e| invalid(format!("{e:#}")))?,
            ),
            Role::Translator => Exports::Translator(
                translator::TranslatorPluginPre::new(pre).map_err(|e| invalid(format!("{e:#}")))?,
            ),
            Role::Billing => Exports::Billing(
                billing::BillingPluginPre::new(pre).map_err(|e| invalid(format!("{e:#}")))?,
            ),
        };
        Ok(CompiledPlugin {
            plugin,
            role,
            exports,
        })
    }

    fn compile_cached(
        &self,
        plugin: &PluginRef,
        role: Role,
        bytes: &[u8],
    ) -> Result<Component, PluginError> {
        let path = self
            .cache_dir
            .join(format!("{}-{}.cwasm", plugin.sha256, self.engine_key));
        if let Some(component) = self.load_artifact(&path) {
            return Ok(component);
        }
        let artifact =
            self.engine
                .precompile_component(bytes)
                .map_err(|e| PluginError::Invalid {
                    name: plugin.name.clone(),
                    role,
                    reason: format!("{e:#}"),
                })?;
        // Write then rename, so a concurrent reader never sees half an artifact.
        let partial = path.with_extension(format!("partial-{}", std::process::id()));
        std::fs::write(&partial, &artifact)
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|e| PluginError::Engine(format!("writing {}: {e}", path.display())))?;
        self.load_artifact(&path)
            .ok_or_else(|| PluginError::Engine(format!("reloading {}", path.display())))
    }

    #[expect(
        unsafe_code,
        reason = "Component::deserialize_file trusts its input; see the invariant below"
    )]
    fn load_artifact(&self, path: &Path) -> Option<Component> {
        if !path.exists() {
            return None;
        }
        // SAFETY: only this host writes into the cache directory, under a name made of the
        // component's SHA-256 and this engine's compatibility hash, via write-then-rename; so the
        // file is an artifact this engine produced for exactly these bytes. wasmtime still checks
        // the header and refuses an artifact of another engine configuration.
        unsafe { Component::deserialize_file(&self.engine, path) }.ok()
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Plugin call figures, for the gateway's metrics.
    pub fn metrics(&self) -> &PluginMetrics {
        &self.metrics
    }
}

/// A compiled plugin ready to instantiate: `InstancePre` per role world, so each call pays only for
/// instantiation (about 12 µs), never for linking.
pub struct CompiledPlugin {
    plugin: PluginRef,
    role: Role,
    exports: Exports,
}

enum Exports {
    Router(router::RouterPluginPre<PluginState>),
    Translator(translator::TranslatorPluginPre<PluginState>),
    Billing(billing::BillingPluginPre<PluginState>),
}

/// A compiled plugin with the configuration and limits an operator bound it with.
pub struct Binding {
    compiled: CompiledPlugin,
    /// The configuration JSON text the plugin reads through `host.config`.
    config: Arc<str>,
    limits: Limits,
    runtime: Arc<PluginRuntime>,
}

impl Binding {
    /// Binds a compiled plugin, asking the plugin to validate the configuration first.
    pub async fn new(
        runtime: Arc<PluginRuntime>,
        compiled: CompiledPlugin,
        config: String,
        limits: Limits,
    ) -> Result<Self, PluginError> {
        let binding = Self {
            compiled,
            config: Arc::from(config),
            limits,
            runtime,
        };
        let verdict = match binding.compiled.role {
            Role::Router => binding.router_validate_config().await?,
            Role::Translator => binding.translator_validate_config().await?,
            Role::Billing => binding.billing_validate_config().await?,
        };
        verdict.map_err(|message| PluginError::Config {
            plugin: binding.compiled.plugin.clone(),
            role: binding.compiled.role,
            message,
        })?;
        Ok(binding)
    }

    /// The bound plugin's name and hash.
    pub fn plugin(&self) -> &PluginRef {
        &self.compiled.plugin
    }

    /// A fresh store for one call or one stream: nothing survives from an earlier call.
    fn store(&self) -> wasmtime::Store<PluginState> {
        sandbox::store(
            self.runtime.engine(),
            self.compiled.plugin.clone(),
            self.compiled.role,
            self.config.clone(),
            &self.limits,
            self.runtime.metrics.clone(),
        )
    }
}

impl Binding {
    /// A binding is made for one role; calling another role's export on it is a host bug, reported
    /// as a plugin error rather than a panic.
    fn wrong_role(&self, expected: Role) -> PluginError {
        PluginError::Unbound {
            role: expected,
            what: format!("{} (a {} plugin)", self.compiled.plugin, self.compiled.role),
        }
    }
}
