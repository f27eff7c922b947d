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
pub mod table;
pub mod translator;
mod wit;

use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Instance, InstancePre, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use sandbox::{Limits, fair_share, serving};
use sandbox::{PluginIdentity, PluginState, PluginStore, Standby};
pub use wit::types::Operation;

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

impl Role {
    /// Reads `router`, `translator` or `billing`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "router" => Some(Role::Router),
            "translator" => Some(Role::Translator),
            "billing" => Some(Role::Billing),
            _ => None,
        }
    }
}

/// How much of a pooled linear memory or table is reset in place (zeroed) rather than returned to
/// the kernel when its instance ends: more than a translator touches for a 128 KiB body.
const KEEP_RESIDENT_BYTES: usize = 4 << 20;

/// Versions of the `tollgate:plugin` WIT package this host serves, newest first. A plugin built
/// against another is refused at upload, naming both.
pub const CONTRACTS: &[&str] = &["0.1.2", "0.1.1", "0.1.0"];

impl Role {
    /// `router`, `translator` or `billing`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Router => "router",
            Role::Translator => "translator",
            Role::Billing => "billing",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
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
    /// Uploaded bytes that fit no plugin world: not wasm, a core module, no role export, an
    /// unknown contract version, or imports the host does not provide.
    #[error("`{name}` is not a Tollgate plugin: {reason}")]
    Unfit {
        /// The name it was uploaded under.
        name: String,
        /// What is missing or extra.
        reason: String,
    },
    /// The plugin returned more than its binding allows.
    #[error(
        "plugin {plugin} ({role}) returned {bytes} bytes from `{export}`, over its cap of {cap_bytes}"
    )]
    OutputTooLarge {
        /// The plugin.
        plugin: PluginRef,
        /// Its role.
        role: Role,
        /// The export called.
        export: &'static str,
        /// What it returned.
        bytes: usize,
        /// The cap.
        cap_bytes: usize,
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
    /// Every plugin instance the pool may lend to this kind of call is in use (open streams and
    /// calls in flight): the gateway's load, not the plugin's fault.
    #[error("no plugin instance is free for a {role} call: the pool is in use")]
    PoolFull {
        /// The role called.
        role: Role,
    },
    /// The tenant served holds its share of the instances (see `sandbox::fair_share`): its own
    /// load, not the plugin's fault.
    #[error("no plugin instance is free for a {role} call: this tenant holds its share")]
    TenantShare {
        /// The role called.
        role: Role,
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
            | PluginError::Contract { plugin, role, .. }
            | PluginError::OutputTooLarge { plugin, role, .. } => Some((plugin, *role)),
            PluginError::Invalid { .. }
            | PluginError::Unfit { .. }
            | PluginError::Unbound { .. }
            | PluginError::PoolFull { .. }
            | PluginError::TenantShare { .. }
            | PluginError::Engine(_) => None,
        }
    }

    /// A short name of what went wrong, for traces: `deadline`, `memory_cap`, `trap`, …
    pub fn class(&self) -> &'static str {
        match self {
            PluginError::Invalid { .. } | PluginError::Unfit { .. } => "invalid",
            PluginError::OutputTooLarge { .. } => "output_too_large",
            PluginError::Config { .. } => "config",
            PluginError::Deadline { .. } => "deadline",
            PluginError::MemoryCap { .. } => "memory_cap",
            PluginError::Trap { .. } => "trap",
            PluginError::Contract { .. } => "contract",
            PluginError::Unbound { .. } => "unbound",
            PluginError::PoolFull { .. } => "pool_full",
            PluginError::TenantShare { .. } => "tenant_share",
            PluginError::Engine(_) => "engine",
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
    /// A fixed cap on the instances each tenant's calls and streams hold, instead of its fair
    /// share (see [`fair_share`]).
    pub max_instances_per_tenant: Option<u32>,
}

/// Labels of plugin call figures. Every call finds its figures by them: nothing here is
/// formatted or copied per call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct PluginLabels {
    /// `router`, `translator` or `billing`.
    pub role: &'static str,
    /// `name@sha`, made once per compiled plugin.
    pub plugin: Arc<String>,
    /// The export called.
    pub export: &'static str,
}

/// Plugin call durations and failures, registered by the gateway's metrics.
#[derive(Clone)]
pub struct PluginMetrics {
    /// Call durations, seconds, instantiation included when the call made its instance.
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
    /// Calls served by a global default after the bound plugin failed.
    pub fail_opens: prometheus_client::metrics::counter::Counter,
    /// Canaries rolled back for their failure rate.
    pub canary_rollbacks: prometheus_client::metrics::counter::Counter,
    /// Instances made ahead of the call that used them, off the request's path.
    pub made_ahead: prometheus_client::metrics::counter::Counter,
    /// Instances a call had to make itself, none being ready.
    pub made_in_call: prometheus_client::metrics::counter::Counter,
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
            fail_opens: Default::default(),
            canary_rollbacks: Default::default(),
            made_ahead: Default::default(),
            made_in_call: Default::default(),
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
    standby_counts: Arc<sandbox::StandbyCounts>,
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
        if PoolingAllocationConfig::is_pagemap_scan_available() {
            // Reset a finished instance's memory by zeroing the pages it dirtied, found with
            // PAGEMAP_SCAN (Linux 6.7+), instead of `madvise`: each `madvise` of a live mapping
            // costs a TLB shootdown on every other core running the gateway, which at 32
            // concurrent requests took over a quarter of its CPU. Memory is still zeroed between
            // instances, so nothing passes from one request to the next. Without the scan,
            // zeroing the whole kept range would cost more than the `madvise`.
            pool.pagemap_scan(wasmtime::Enabled::Yes)
                .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
                .table_keep_resident(KEEP_RESIDENT_BYTES);
        }
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
            standby_counts: Arc::new(sandbox::StandbyCounts::new(
                settings.max_instances,
                settings.max_instances_per_tenant,
            )),
        }))
    }

    /// Instances calls and streams may hold at once: the pool less the instances made ahead, the
    /// stores waiting to be dropped and the reserve only pricing may use.
    pub fn lendable_instances(&self) -> u32 {
        u32::try_from(self.standby_counts.lendable()).unwrap_or(u32::MAX)
    }

    /// Compiles (or loads from the cache) a component to bind, and checks that it plays the role
    /// it is bound for. `sha256` is the bytes' hash when the caller already knows it (the store
    /// keeps plugins under theirs), which spares hashing megabytes at every start.
    pub fn load(
        &self,
        name: &str,
        role: Role,
        bytes: &[u8],
        sha256: Option<&str>,
    ) -> Result<CompiledPlugin, PluginError> {
        let compiled = self
            .examine(name, bytes, sha256)
            .map_err(|error| match error {
                PluginError::Unfit { name, reason } => PluginError::Invalid { name, role, reason },
                other => other,
            })?;
        if compiled.role() != role {
            return Err(PluginError::Invalid {
                name: name.to_owned(),
                role,
                reason: format!("it is a {} plugin", compiled.role()),
            });
        }
        Ok(compiled)
    }

    /// Compiles (or loads from the cache) uploaded bytes and reads what they are: the role comes from
    /// the one `tollgate:plugin/<role>` interface the component exports, the contract from that
    /// interface's version; every import must be one the sandbox provides.
    pub fn inspect(&self, name: &str, bytes: &[u8]) -> Result<CompiledPlugin, PluginError> {
        self.examine(name, bytes, None)
    }

    fn examine(
        &self,
        name: &str,
        bytes: &[u8],
        sha256: Option<&str>,
    ) -> Result<CompiledPlugin, PluginError> {
        let unfit = |reason: String| PluginError::Unfit {
            name: name.to_owned(),
            reason,
        };
        component_header(bytes).map_err(unfit)?;
        let plugin = PluginRef {
            name: name.to_owned(),
            sha256: sha256.map_or_else(|| hex::encode(Sha256::digest(bytes)), str::to_owned),
        };
        let component = self
            .compile_cached(&plugin, bytes)
            .map_err(|error| match error {
                PluginError::Engine(_) => error,
                other => unfit(other.to_string()),
            })?;
        let shape = component.component_type();
        let exports: Vec<&str> = shape.exports(&self.engine).map(|(name, _)| name).collect();
        let (role, contract) = role_and_contract(&exports).map_err(unfit)?;
        let unprovided: Vec<&str> = shape
            .imports(&self.engine)
            .map(|(name, _)| name)
            .filter(|import| !sandbox::provides(import))
            .collect();
        if !unprovided.is_empty() {
            return Err(unfit(format!(
                "it imports what the sandbox does not provide: {}. A plugin gets \
                 `tollgate:plugin/host` and only the WASI streams, stdio, environment, exit and \
                 random a Rust `wasm32-wasip2` guest imports anyway: no files, sockets or clocks",
                listed(&unprovided)
            )));
        }
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| unfit(format!("{e:#}")))?;
        let world =
            |e: wasmtime::Error| unfit(format!("it does not match the {role} world: {e:#}"));
        let exports = match role {
            Role::Router => Exports::Router(router::RouterPluginIndices::new(&pre).map_err(world)?),
            Role::Translator => Exports::Translator(Box::new(
                translator::TranslatorExports::new(&pre).map_err(world)?,
            )),
            Role::Billing => {
                Exports::Billing(billing::BillingPluginIndices::new(&pre).map_err(world)?)
            }
        };
        Ok(CompiledPlugin {
            identity: Arc::new(PluginIdentity {
                label: Arc::new(plugin.to_string()),
                plugin,
                role,
                metrics: self.metrics.clone(),
            }),
            contract: contract.to_owned(),
            pre,
            exports,
        })
    }

    fn compile_cached(&self, plugin: &PluginRef, bytes: &[u8]) -> Result<Component, PluginError> {
        let path = self
            .cache_dir
            .join(format!("{}-{}.cwasm", plugin.sha256, self.engine_key));
        if let Some(component) = self.load_artifact(&path) {
            return Ok(component);
        }
        // Gateways sharing a cache directory (a new process starting beside the old one, several
        // on one machine) compile each plugin once: the others wait here for its artifact.
        let lock_path = path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .and_then(|lock| lock.lock().map(|()| lock))
            .map_err(|e| PluginError::Engine(format!("locking {}: {e}", lock_path.display())))?;
        if let Some(component) = self.load_artifact(&path) {
            return Ok(component);
        }
        // Seconds per plugin, once per engine build: a first start would otherwise say nothing
        // for that long.
        tracing::info!(%plugin, cache = %self.cache_dir.display(), "compiling a plugin for this machine (once; later starts load it from the cache)");
        let started = std::time::Instant::now();
        let artifact = self
            .engine
            .precompile_component(bytes)
            .map_err(|e| PluginError::Unfit {
                name: plugin.name.clone(),
                reason: format!("{e:#}"),
            })?;
        let compile_ms = started.elapsed().as_millis() as u64;
        tracing::info!(%plugin, compile_ms, "plugin compiled");
        // Write then rename, so a concurrent reader never sees half an artifact.
        let partial = path.with_extension(format!("partial-{}", std::process::id()));
        std::fs::write(&partial, &artifact)
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|e| PluginError::Engine(format!("writing {}: {e}", path.display())))?;
        let component = self
            .load_artifact(&path)
            .ok_or_else(|| PluginError::Engine(format!("reloading {}", path.display())));
        drop(lock);
        component
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

    /// Plugin call figures, for the gateway's metrics.
    pub fn metrics(&self) -> &PluginMetrics {
        &self.metrics
    }
}

/// A compiled plugin ready to instantiate: `InstancePre` per role world, so each call pays only for
/// instantiation (about 12 µs), never for linking.
pub struct CompiledPlugin {
    /// Its name, hash, role and metric label, shared with every store it runs in.
    identity: Arc<PluginIdentity>,
    contract: String,
    /// Linked once: every instance of the plugin is made from it.
    pre: InstancePre<PluginState>,
    exports: Exports,
}

impl CompiledPlugin {
    /// Its name and hash.
    pub fn plugin(&self) -> &PluginRef {
        &self.identity.plugin
    }

    /// The role its exports play.
    pub fn role(&self) -> Role {
        self.identity.role
    }

    /// The WIT package version it was built against.
    pub fn contract(&self) -> &str {
        &self.contract
    }
}

/// Whether `bytes` start as a WebAssembly component; why not, if they do not.
fn component_header(bytes: &[u8]) -> Result<(), String> {
    match bytes.get(..8) {
        Some(&[0, b'a', b's', b'm', 1, 0, 0, 0]) => Err(
            "it is a core WebAssembly module, not a component: build it for `wasm32-wasip2` (or \
             wrap it with `wasm-tools component new`)"
                .to_owned(),
        ),
        Some(&[0, b'a', b's', b'm', ..]) => Ok(()),
        _ => Err("it is not WebAssembly (no `\\0asm` header)".to_owned()),
    }
}

/// The one role a component's exports play, and the contract version it was built against; why
/// not, when it plays none, several, or speaks a version this host does not serve.
fn role_and_contract<'e>(exports: &[&'e str]) -> Result<(Role, &'e str), String> {
    let roles: Vec<(Role, &str)> = exports
        .iter()
        .filter_map(|export| {
            let (interface, version) = export.strip_prefix("tollgate:plugin/")?.split_once('@')?;
            Some((Role::parse(interface)?, version))
        })
        .collect();
    let (role, contract) = match roles.as_slice() {
        [(role, contract)] => (*role, *contract),
        [] => {
            return Err(format!(
                "it exports none of the role interfaces `tollgate:plugin/router`, \
                 `tollgate:plugin/translator`, `tollgate:plugin/billing`; it exports {}",
                listed(exports)
            ));
        }
        several => {
            let names: Vec<String> = several.iter().map(|(role, _)| role.to_string()).collect();
            return Err(format!(
                "it exports several roles ({}); a plugin plays exactly one",
                names.join(", ")
            ));
        }
    };
    if !CONTRACTS.contains(&contract) {
        let served: Vec<String> = CONTRACTS
            .iter()
            .map(|version| format!("tollgate:plugin@{version}"))
            .collect();
        let served = match served.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
            _ => served.concat(),
        };
        return Err(format!(
            "it was built against tollgate:plugin@{contract}; this host serves {served}"
        ));
    }
    Ok((role, contract))
}

/// `a`, `b` and `c` (or `nothing`), for messages.
fn listed(names: &[&str]) -> String {
    if names.is_empty() {
        return "nothing".to_owned();
    }
    names
        .iter()
        .map(|name| format!("`{name}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where a role's exports are in every instance, found once at load.
enum Exports {
    Router(router::RouterPluginIndices),
    Translator(Box<translator::TranslatorExports>),
    Billing(billing::BillingPluginIndices),
}

/// A compiled plugin with the configuration and limits an operator bound it with.
pub struct Binding {
    compiled: CompiledPlugin,
    /// The configuration JSON text the plugin reads through `host.config`.
    config: Arc<str>,
    runtime: Arc<PluginRuntime>,
    standby: Arc<Standby>,
    /// A translator's `version-path`: what a channel's bare base URL stands for.
    version_path: Option<String>,
}

impl Binding {
    /// Binds a compiled plugin, asking the plugin to validate the configuration first.
    pub async fn new(
        runtime: Arc<PluginRuntime>,
        compiled: CompiledPlugin,
        config: String,
        limits: Limits,
    ) -> Result<Self, PluginError> {
        let config: Arc<str> = Arc::from(config);
        let standby = Arc::new(Standby::new(
            runtime.engine.clone(),
            compiled.pre.clone(),
            compiled.identity.clone(),
            config.clone(),
            limits,
            runtime.standby_counts.clone(),
        ));
        let mut binding = Self {
            compiled,
            config,
            runtime,
            standby,
            version_path: None,
        };
        let verdict = match binding.compiled.role() {
            Role::Router => binding.router_validate_config().await?,
            Role::Translator => binding.translator_validate_config().await?,
            Role::Billing => binding.billing_validate_config().await?,
        };
        verdict.map_err(|message| PluginError::Config {
            plugin: binding.compiled.plugin().clone(),
            role: binding.compiled.role(),
            message,
        })?;
        if binding.compiled.role() == Role::Translator {
            let version_path = binding.translator_version_path().await?;
            if let Some(path) = version_path
                .as_deref()
                .filter(|path| !path.starts_with('/'))
            {
                return Err(PluginError::Contract {
                    plugin: binding.compiled.plugin().clone(),
                    role: Role::Translator,
                    detail: format!("version-path `{path}` does not start with `/`"),
                });
            }
            binding.version_path = version_path;
        }
        Ok(binding)
    }

    /// The path a translator puts under a channel's bare base URL (`/v1`), if it has one.
    pub fn version_path(&self) -> Option<&str> {
        self.version_path.as_deref()
    }

    /// The configuration JSON the plugin was bound with.
    pub fn config(&self) -> &str {
        &self.config
    }

    /// Counts a failing-open onto this binding (`tollgate_plugin_fail_opens_total`).
    pub fn count_fail_open(&self) {
        self.runtime.metrics.fail_opens.inc();
    }

    /// The bound plugin's name and hash.
    pub fn plugin(&self) -> &PluginRef {
        self.compiled.plugin()
    }

    /// A fresh store for one call or one stream (nothing survives from an earlier call), within
    /// the pool's share for them.
    fn store(&self) -> Result<PluginStore, PluginError> {
        let role = self.compiled.role();
        self.standby.store().map_err(|unlent| match unlent {
            sandbox::Unlent::PoolFull => PluginError::PoolFull { role },
            sandbox::Unlent::TenantShare => PluginError::TenantShare { role },
        })
    }

    /// A store for pricing a finished call, which may use the pool's reserve (see
    /// `sandbox::StandbyCounts`).
    fn settlement_store(&self) -> PluginStore {
        self.standby.settlement_store()
    }

    /// Calls one export on a fresh instance in a fresh store, under the call deadline, and holds
    /// what it returns (`output_bytes` of it) to the output cap.
    async fn call<R>(
        &self,
        export: &'static str,
        call: impl AsyncFnOnce(&mut wasmtime::Store<PluginState>, Instance) -> wasmtime::Result<R>,
        output_bytes: impl FnOnce(&R) -> usize,
    ) -> Result<R, PluginError> {
        let mut store = self.store()?;
        let value = self.call_in(&mut store, export, call).await?;
        sandbox::check_output(&store, export, output_bytes(&value))?;
        Ok(value)
    }

    /// Calls one export on a fresh instance in `store`, under the call deadline; the store (and
    /// its instance) stays the caller's, for a stream that goes on in it.
    async fn call_in<R>(
        &self,
        store: &mut PluginStore,
        export: &'static str,
        call: impl AsyncFnOnce(&mut wasmtime::Store<PluginState>, Instance) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        let pre = &self.compiled.pre;
        sandbox::bounded(store, export, async |store| {
            let instance = sandbox::instance(&mut *store, pre).await?;
            call(store, instance).await
        })
        .await
    }
}

/// The bytes of an answer, for the output cap; a refusal is not held to it.
fn answered_bytes<T, E>(answer: &Result<T, E>, bytes: impl FnOnce(&T) -> usize) -> usize {
    answer.as_ref().map_or(0, bytes)
}

impl Binding {
    /// A binding is made for one role; calling another role's export on it is a host bug, reported
    /// as a plugin error rather than a panic.
    fn wrong_role(&self, expected: Role) -> PluginError {
        PluginError::Unbound {
            role: expected,
            what: format!(
                "{} (a {} plugin)",
                self.compiled.plugin(),
                self.compiled.role()
            ),
        }
    }
}
