//! What a plugin runs inside: its store state, the host imports it may call, the WASI surface it is
//! given (empty), its memory cap and its deadline.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::Instrument;
use wasmtime::component::{HasSelf, Instance, InstancePre, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::cli::{WasiCli, WasiCliView};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::random::{WasiRandom, WasiRandomView};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::wit::{host, types};
use super::{PluginError, PluginLabels, PluginMetrics, PluginRef, Role};

/// Limits of one binding. Every call runs under them.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Running-time budget of one call (one `push` for streams), counted in epoch ticks of the
    /// plugin actually executing; time spent waiting for a CPU does not count.
    pub deadline: Duration,
    /// Linear memory a plugin instance may grow to, in bytes.
    pub memory_bytes: usize,
    /// What one call may return (a body, a plan, the chunks of one push), in bytes: a plugin's
    /// output goes on to an upstream or a client, and is refused past this.
    pub max_output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            deadline: Duration::from_millis(250),
            memory_bytes: 64 << 20,
            max_output_bytes: 8 << 20,
        }
    }
}

/// How much of a plugin's stdout/stderr is kept for the log (a panic message fits).
const CAPTURED_OUTPUT_BYTES: usize = 4096;

/// What every store of one compiled plugin shares: made once when the plugin is loaded, so a call
/// copies none of it.
pub(super) struct PluginIdentity {
    pub(super) plugin: PluginRef,
    /// `plugin` as its metric label.
    pub(super) label: Arc<String>,
    pub(super) role: Role,
    pub(super) metrics: PluginMetrics,
}

/// A store's data: one plugin call's (or one stream's) whole world.
pub struct PluginState {
    pub(super) identity: Arc<PluginIdentity>,
    config: Arc<str>,
    /// Made on the plugin's first WASI call: most calls make none, and building it (random number
    /// generators, clocks, stdio) cost 1 % of the gateway's CPU at 32 concurrent requests.
    wasi: Option<Wasi>,
    table: ResourceTable,
    memory_cap: usize,
    memory_cap_hit: bool,
    max_output_bytes: usize,
    pub(super) call_budget: Duration,
    /// Epoch ticks the current call may still run through before it is interrupted.
    ticks_left: u32,
    /// The instance made in this store ahead of its call, until the call takes it.
    made_ahead: Option<Instance>,
}

/// The WASI a plugin sees: empty environment, closed stdin, and stdout/stderr captured.
struct Wasi {
    ctx: WasiCtx,
    /// What the plugin wrote to stdout and stderr.
    output: MemoryOutputPipe,
}

impl Wasi {
    fn new() -> Self {
        let output = MemoryOutputPipe::new(CAPTURED_OUTPUT_BYTES);
        let ctx = WasiCtx::builder()
            .stdout(output.clone())
            .stderr(output.clone())
            .build();
        Self { ctx, output }
    }
}

impl PluginState {
    /// What the plugin wrote to stdout/stderr (a Rust panic writes its message there).
    fn captured_output(&self) -> String {
        self.wasi.as_ref().map_or_else(String::new, |wasi| {
            String::from_utf8_lossy(&wasi.output.contents())
                .trim()
                .to_owned()
        })
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi.get_or_insert_with(Wasi::new).ctx,
            table: &mut self.table,
        }
    }
}

impl wasmtime_wasi_io::IoView for PluginState {
    fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}

impl ResourceLimiter for PluginState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            // Recorded because the guest sees a failed grow and usually aborts, which would
            // otherwise look like any other trap.
            self.memory_cap_hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl host::Host for PluginState {
    fn log(&mut self, level: host::LogLevel, message: String) {
        let plugin = self.identity.label.as_str();
        let role = self.identity.role.name();
        match level {
            host::LogLevel::Trace => tracing::trace!(plugin, role, message, "plugin log"),
            host::LogLevel::Debug => tracing::debug!(plugin, role, message, "plugin log"),
            host::LogLevel::Info => tracing::info!(plugin, role, message, "plugin log"),
            host::LogLevel::Warn => tracing::warn!(plugin, role, message, "plugin log"),
            host::LogLevel::Error => tracing::error!(plugin, role, message, "plugin log"),
        }
    }

    fn now_unix_ms(&mut self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as u64)
            .unwrap_or(0)
    }

    fn config(&mut self) -> String {
        self.config.to_string()
    }
}

impl types::Host for PluginState {}

/// Interfaces [`linker`] provides, without their versions: an upload importing anything else is
/// refused, naming the import. Kept beside the linker so the two change together.
const PROVIDED_INTERFACES: &[&str] = &[
    "tollgate:plugin/host",
    "tollgate:plugin/types",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:cli/exit",
    "wasi:cli/environment",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
];

/// Whether the sandbox provides an import (`wasi:io/streams@0.2.6`).
pub(super) fn provides(import: &str) -> bool {
    let interface = import.split_once('@').map_or(import, |(name, _)| name);
    PROVIDED_INTERFACES.contains(&interface)
}

/// Refuses a call's output past the binding's cap.
pub(super) fn check_output(
    store: &Store<PluginState>,
    export: &'static str,
    bytes: usize,
) -> Result<(), PluginError> {
    let state = store.data();
    if bytes <= state.max_output_bytes {
        return Ok(());
    }
    state
        .identity
        .metrics
        .failures
        .get_or_create(&PluginLabels {
            role: state.identity.role.name(),
            plugin: state.identity.label.clone(),
            export,
        })
        .inc();
    Err(PluginError::OutputTooLarge {
        plugin: state.identity.plugin.clone(),
        role: state.identity.role,
        export,
        bytes,
        cap_bytes: state.max_output_bytes,
    })
}

/// The one linker every plugin is instantiated with: the `host` interface, and of WASI only what a
/// plain Rust `wasm32-wasip2` guest imports anyway (io streams, cli stdio/environment/exit, random),
/// backed by nothing: empty environment, closed stdin, stdout/stderr captured for the log. No clocks,
/// filesystem or sockets are linked, so a component importing them fails to load, naming the import.
pub(super) fn linker(engine: &Engine) -> Result<Linker<PluginState>, PluginError> {
    use wasmtime_wasi::p2::bindings::{cli, random};
    let mut linker = Linker::new(engine);
    let engine_error = |e: wasmtime::Error| PluginError::Engine(format!("{e:#}"));
    host::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |state| state)
        .map_err(engine_error)?;
    wasmtime_wasi_io::add_to_linker_async(&mut linker).map_err(engine_error)?;
    let l = &mut linker;
    (|| -> wasmtime::Result<()> {
        cli::exit::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
        cli::environment::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
        cli::stdin::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
        cli::stdout::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
        cli::stderr::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
        cli::terminal_input::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
        cli::terminal_output::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
        cli::terminal_stdin::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
        cli::terminal_stdout::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
        cli::terminal_stderr::add_to_linker::<PluginState, WasiCli>(l, PluginState::cli)?;
        random::random::add_to_linker::<PluginState, WasiRandom>(l, WasiRandomView::random)?;
        random::insecure::add_to_linker::<PluginState, WasiRandom>(l, WasiRandomView::random)?;
        random::insecure_seed::add_to_linker::<PluginState, WasiRandom>(l, WasiRandomView::random)?;
        Ok(())
    })()
    .map_err(engine_error)?;
    Ok(linker)
}

/// A fresh store for one call or one stream.
fn store(
    engine: &Engine,
    identity: Arc<PluginIdentity>,
    config: Arc<str>,
    limits: &Limits,
) -> Store<PluginState> {
    let state = PluginState {
        identity,
        config,
        wasi: None,
        table: ResourceTable::new(),
        memory_cap: limits.memory_bytes,
        memory_cap_hit: false,
        max_output_bytes: limits.max_output_bytes,
        call_budget: limits.deadline,
        ticks_left: budget_ticks(limits.deadline),
        made_ahead: None,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|state| state);
    // Called when an epoch tick passes while the guest runs. The deadline counts these ticks, so
    // it measures the plugin's own running time: a call that waits for a CPU behind a hundred
    // others (the tick passes while it is parked, but fires once on resume) is not punished for
    // the gateway's load. Between ticks the guest yields, so a busy plugin never holds a tokio
    // worker for long.
    store.epoch_deadline_callback(|mut context| {
        let state = context.data_mut();
        if state.ticks_left == 0 {
            return Ok(UpdateDeadline::Interrupt);
        }
        state.ticks_left -= 1;
        Ok(UpdateDeadline::Yield(1))
    });
    store.set_epoch_deadline(1);
    store
}

/// The instance a call runs in: the one its store was given ahead of the call, or a new one.
pub(super) async fn instance(
    store: &mut Store<PluginState>,
    pre: &InstancePre<PluginState>,
) -> wasmtime::Result<Instance> {
    if let Some(instance) = store.data_mut().made_ahead.take() {
        return Ok(instance);
    }
    store.data().identity.metrics.made_in_call.inc();
    pre.instantiate_async(store).await
}

/// Ready instances the whole runtime may hold at once, whatever the pool's size: each holds a pool
/// slot and about 30 KiB.
const MAX_READY: usize = 64;

/// Stores whose dropping may wait for a task at once, across the runtime. More than this means
/// the workers have no idle moment to do it in: stores are then dropped where their call ends,
/// while their memory is still in the core's cache (deferring every drop at 32 concurrent
/// requests cost 16 % more CPU per request), and calls make their own instances. A request makes
/// three calls before it waits for its upstream and two after, so one request at a time stays
/// within it (8 measured the same).
const MAX_RETIRING: usize = 4;

/// What every binding's [`Standby`] shares: how many ready instances, stores still to drop and
/// stores lent to calls the runtime holds. Ready instances and stores to drop hold pool slots, so
/// each may take a sixteenth of the pool at most: a pool of fewer than 16 instances has neither.
///
/// Calls and streams may hold what is left but a reserve, which only pricing may use: a request
/// that was served must be priced, and a pool full of open streams (a stalled provider holds
/// them) would otherwise leave the streams that end unpriced. Pricing never holds an instance
/// across an upstream wait, so a small reserve drains as fast as it fills.
pub(super) struct StandbyCounts {
    ready: AtomicUsize,
    most_ready: usize,
    retiring: AtomicUsize,
    most_retiring: usize,
    /// Stores lent to calls and streams (not to pricing).
    lent: AtomicUsize,
    most_lent: usize,
    /// Stores lent to each tenant's calls and streams (those made while serving it).
    lent_by_tenant: Mutex<HashMap<Arc<str>, usize>>,
    /// A fixed cap on each tenant's instead of its fair share.
    per_tenant: Option<usize>,
}

tokio::task_local! {
    /// The tenant whose request the task serves.
    static SERVING: Arc<str>;
}

/// Runs `work` for a request of `tenant`: the instances its plugin calls and streams hold count
/// against that tenant's share of the pool, so one tenant's long calls (a plugin spinning to its
/// deadline) or open streams cannot take every instance.
pub async fn serving<F: Future>(tenant: Arc<str>, work: F) -> F::Output {
    SERVING.scope(tenant, work).await
}

/// A tenant's share of `pool` instances, `holders` being the tenants holding some (counting it):
/// the pool less a tenth kept for tenants with none, split between the holders, never less than a
/// hundredth of the pool. A lone tenant may use nine tenths; a newcomer always finds the reserve.
pub fn fair_share(pool: usize, holders: usize) -> usize {
    let reserve = (pool / 10).max(1);
    let floor = (pool / 100).max(1);
    (pool.saturating_sub(reserve) / holders.max(1)).max(floor)
}

/// The pool slots only pricing may use: a thirty-second of the pool, at least 2 and at most 32.
fn settlement_reserve(max_instances: usize) -> usize {
    (max_instances / 32).clamp(2, 32)
}

impl StandbyCounts {
    pub(super) fn new(max_instances: u32, per_tenant: Option<u32>) -> Self {
        let max_instances = max_instances as usize;
        let sixteenth = max_instances / 16;
        let most_ready = MAX_READY.min(sixteenth);
        let most_retiring = MAX_RETIRING.min(sixteenth);
        Self {
            ready: AtomicUsize::new(0),
            most_ready,
            retiring: AtomicUsize::new(0),
            most_retiring,
            lent: AtomicUsize::new(0),
            most_lent: max_instances
                .saturating_sub(most_ready + most_retiring + settlement_reserve(max_instances))
                .max(1),
            lent_by_tenant: Mutex::default(),
            per_tenant: per_tenant.map(|cap| cap as usize),
        }
    }

    /// Counts a store lent to `tenant`, unless it holds its share.
    fn lend_to(&self, tenant: &Arc<str>) -> bool {
        let mut lent = self
            .lent_by_tenant
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let own = lent.get(tenant).copied().unwrap_or(0);
        let share = self
            .per_tenant
            .unwrap_or_else(|| fair_share(self.most_lent, lent.len() + usize::from(own == 0)));
        if own >= share {
            return false;
        }
        *lent.entry(tenant.clone()).or_insert(0) += 1;
        true
    }

    fn give_back(&self, tenant: &Arc<str>) {
        let mut lent = self
            .lent_by_tenant
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = lent.get_mut(tenant) {
            *count -= 1;
            if *count == 0 {
                lent.remove(tenant);
            }
        }
    }
}

impl StandbyCounts {
    /// Stores calls and streams may hold at once.
    pub(super) fn lendable(&self) -> usize {
        self.most_lent
    }
}

/// Where one binding's stores come from, and where they go when their call is done.
///
/// Making an instance and, once its call is done, resetting its memory and returning its pool
/// slot are about a third of a plugin call's cost. Both happen in a task of their own: a call
/// takes a store whose instance was made ahead of it (fresh, never called) when one is ready, and
/// its store goes to that task when it is dropped, which also makes the binding's next instance.
/// On a worker that is not saturated the task runs while the request waits for its upstream or
/// after its answer went out, so the request's latency carries neither. No instance serves two
/// calls: requests are as isolated as with an instance made in the call.
pub(super) struct Standby {
    engine: Engine,
    pre: InstancePre<PluginState>,
    identity: Arc<PluginIdentity>,
    config: Arc<str>,
    limits: Limits,
    /// At most one store with its instance made and never called.
    ready: Mutex<Ready>,
    counts: Arc<StandbyCounts>,
}

impl Standby {
    pub(super) fn new(
        engine: Engine,
        pre: InstancePre<PluginState>,
        identity: Arc<PluginIdentity>,
        config: Arc<str>,
        limits: Limits,
        counts: Arc<StandbyCounts>,
    ) -> Self {
        Self {
            engine,
            pre,
            identity,
            config,
            limits,
            ready: Mutex::new(Ready::Vacant),
            counts,
        }
    }

    /// A store for one call or one stream: a ready one if there is one, else a new, empty one;
    /// refused when the tenant served holds its share of the pool, or calls and streams hold the
    /// whole of it.
    pub(super) fn store(self: &Arc<Self>) -> Result<PluginStore, Unlent> {
        let counts = &self.counts;
        let tenant = SERVING.try_with(Arc::clone).ok();
        if let Some(tenant) = &tenant
            && !counts.lend_to(tenant)
        {
            return Err(Unlent::TenantShare);
        }
        let lent = counts
            .lent
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |lent| {
                (lent < counts.most_lent).then_some(lent + 1)
            });
        if lent.is_err() {
            if let Some(tenant) = &tenant {
                counts.give_back(tenant);
            }
            return Err(Unlent::PoolFull);
        }
        let mut store = self.settlement_store();
        store.lent = true;
        store.tenant = tenant;
        Ok(store)
    }

    /// A store for pricing a finished call: not counted against the share of calls and streams,
    /// so it may use the reserve.
    pub(super) fn settlement_store(self: &Arc<Self>) -> PluginStore {
        let ready = {
            let mut ready = self.ready.lock().unwrap_or_else(PoisonError::into_inner);
            match std::mem::replace(&mut *ready, Ready::Vacant) {
                Ready::Made(store) => Some(store),
                other => {
                    *ready = other;
                    None
                }
            }
        };
        let store = match ready {
            Some(store) => {
                self.counts.ready.fetch_sub(1, Ordering::Relaxed);
                store
            }
            None => store(
                &self.engine,
                self.identity.clone(),
                self.config.clone(),
                &self.limits,
            ),
        };
        PluginStore {
            store: Some(store),
            standby: self.clone(),
            lent: false,
            tenant: None,
        }
    }

    /// Makes the next ready instance, unless one is ready or being made, or the runtime holds its
    /// most.
    async fn replenish(&self) {
        {
            let mut ready = self.ready.lock().unwrap_or_else(PoisonError::into_inner);
            if !matches!(*ready, Ready::Vacant) {
                return;
            }
            if self
                .counts
                .ready
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |ready| {
                    (ready < self.counts.most_ready).then_some(ready + 1)
                })
                .is_err()
            {
                return;
            }
            *ready = Ready::Making;
        }
        let mut store = store(
            &self.engine,
            self.identity.clone(),
            self.config.clone(),
            &self.limits,
        );
        let made = match self.pre.instantiate_async(&mut store).await {
            Ok(instance) => {
                store.data_mut().made_ahead = Some(instance);
                self.identity.metrics.made_ahead.inc();
                Ready::Made(store)
            }
            // The pool is full, or the plugin's start-up fails: the next call instantiates
            // in the call, and reports what goes wrong there.
            Err(error) => {
                tracing::debug!(plugin = %self.identity.plugin, error = %error, "no instance made ahead");
                self.counts.ready.fetch_sub(1, Ordering::Relaxed);
                Ready::Vacant
            }
        };
        *self.ready.lock().unwrap_or_else(PoisonError::into_inner) = made;
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        let ready = self.ready.get_mut().unwrap_or_else(PoisonError::into_inner);
        if matches!(ready, Ready::Made(_)) {
            self.counts.ready.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A binding's instance made ahead.
enum Ready {
    /// None, and none being made.
    Vacant,
    /// One is being made; it counts as ready.
    Making,
    /// Made and never called.
    Made(Store<PluginState>),
}

/// A store for one call or one stream, whose dropping is left to a task of its own (see
/// [`Standby`]).
pub(super) struct PluginStore {
    /// `Some` until dropped.
    store: Option<Store<PluginState>>,
    standby: Arc<Standby>,
    /// Counted among the stores lent to calls and streams.
    lent: bool,
    /// The tenant it is counted against.
    tenant: Option<Arc<str>>,
}

/// Why no store was lent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unlent {
    /// Calls and streams hold the whole pool.
    PoolFull,
    /// The tenant served holds its share.
    TenantShare,
}

impl Deref for PluginStore {
    type Target = Store<PluginState>;

    fn deref(&self) -> &Self::Target {
        self.store
            .as_ref()
            .expect("a plugin store is present until it is dropped")
    }
}

impl DerefMut for PluginStore {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.store
            .as_mut()
            .expect("a plugin store is present until it is dropped")
    }
}

impl Drop for PluginStore {
    fn drop(&mut self) {
        if self.lent {
            // A store waiting to be dropped keeps its slot, counted among the retiring instead.
            self.standby.counts.lent.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(tenant) = &self.tenant {
            self.standby.counts.give_back(tenant);
        }
        let Some(store) = self.store.take() else {
            return;
        };
        // Outside a runtime (start-up checks, tests) the store is dropped here.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let counts = &self.standby.counts;
        if counts
            .retiring
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |retiring| {
                (retiring < counts.most_retiring).then_some(retiring + 1)
            })
            .is_err()
        {
            return;
        }
        let standby = self.standby.clone();
        runtime.spawn(async move {
            // Behind whatever is ready to run: the request's own work (writing to its upstream
            // or its client) goes first.
            tokio::task::yield_now().await;
            drop(store);
            standby.replenish().await;
            standby.counts.retiring.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// The running time a deadline allows, in epoch ticks (at least one).
fn budget_ticks(deadline: Duration) -> u32 {
    let ticks = deadline.as_millis() / super::EPOCH_TICK.as_millis().max(1);
    u32::try_from(ticks).unwrap_or(u32::MAX).max(1)
}

/// Starts the budget of the next call on this store. Streams call it before every `push`, since the
/// deadline is per call, not per stream.
pub(super) fn arm(store: &mut Store<PluginState>) {
    let budget = store.data().call_budget;
    store.data_mut().ticks_left = budget_ticks(budget);
    store.set_epoch_deadline(1);
}

/// A wall-clock backstop far beyond the running-time deadline: a call that neither returns nor
/// traps by then (stuck outside wasm, which no host function of ours can be) is abandoned with its
/// store. Generous, because under heavy load a call's wall time far exceeds its running time.
fn host_timeout(budget: Duration) -> Duration {
    budget * 20 + Duration::from_secs(5)
}

/// Runs one export call under the store's deadline and maps whatever goes wrong to a [`PluginError`].
pub(super) async fn bounded<R>(
    store: &mut Store<PluginState>,
    export: &'static str,
    call: impl AsyncFnOnce(&mut Store<PluginState>) -> wasmtime::Result<R>,
) -> Result<R, PluginError> {
    arm(store);
    let budget = store.data().call_budget;
    let span = tracing::debug_span!(
        "plugin.call",
        role = %store.data().identity.role,
        plugin = %store.data().identity.plugin,
        export
    );
    let started = Instant::now();
    let outcome = tokio::time::timeout(host_timeout(budget), call(store))
        .instrument(span)
        .await;
    let state = store.data();
    let labels = PluginLabels {
        role: state.identity.role.name(),
        plugin: state.identity.label.clone(),
        export,
    };
    state
        .identity
        .metrics
        .calls
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    if !matches!(outcome, Ok(Ok(_))) {
        state.identity.metrics.failures.get_or_create(&labels).inc();
    }
    let deadline = || PluginError::Deadline {
        plugin: state.identity.plugin.clone(),
        role: state.identity.role,
        export,
        after: budget,
    };
    let error = match outcome {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(error)) => error,
        Err(_elapsed) => return Err(deadline()),
    };
    if state.memory_cap_hit {
        return Err(PluginError::MemoryCap {
            plugin: state.identity.plugin.clone(),
            role: state.identity.role,
            export,
            cap_bytes: state.memory_cap,
        });
    }
    if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return Err(deadline());
    }
    if error
        .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
        .is_some()
    {
        return Err(PluginError::PoolFull {
            role: state.identity.role,
        });
    }
    Err(PluginError::Trap {
        plugin: state.identity.plugin.clone(),
        role: state.identity.role,
        export,
        trap: error
            .downcast_ref::<Trap>()
            .map_or_else(|| format!("{error:#}"), Trap::to_string),
        output: state.captured_output(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenants_share_shrinks_with_the_tenants_holding_instances() {
        // 100 instances: 100 lendable less ready (6), retiring (4) and the pricing reserve (3).
        let counts = StandbyCounts::new(100, None);
        assert_eq!(counts.lendable(), 87);
        let acme: Arc<str> = Arc::from("acme");
        let globex: Arc<str> = Arc::from("globex");
        let lone = (0..100).take_while(|_| counts.lend_to(&acme)).count();
        assert_eq!(lone, fair_share(87, 1), "a lone tenant leaves a tenth");
        assert!(counts.lend_to(&globex), "a newcomer finds the reserve");
        assert!(
            !counts.lend_to(&acme),
            "and the first tenant holds more than half"
        );
        for _ in 0..=lone - fair_share(87, 2) {
            counts.give_back(&acme);
        }
        assert!(
            counts.lend_to(&acme),
            "back under half, it may take one more"
        );
        let fixed = StandbyCounts::new(100, Some(2));
        assert!(fixed.lend_to(&acme) && fixed.lend_to(&acme));
        assert!(!fixed.lend_to(&acme), "a fixed cap instead of the share");
    }
}
