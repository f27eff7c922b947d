//! `tollgate serve`: boots the gateway — tracing, the allocator, the open-file limit, the
//! serving workers with their listeners, the admin listener, background jobs and the signals that
//! stop them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use tollgate::config::{self, Config};
use tollgate::http::admin::AdminTokens;
use tollgate::http::admission::{
    AdmissionLimits, ClientAdmission, FAILED_AUTHENTICATION_LOG_INTERVAL,
};
use tollgate::http::listen;
use tollgate::secrets::Redacted;
use tollgate::stages::auth;
use tollgate::store::{Store, now_unix_ms};
use tollgate::{console, gateway};

use super::data_dir::{load_config, new_tenant};

/// Runs the gateway with the configuration at `config_path` (or the embedded one), on `listen`
/// when given, until a signal.
pub(crate) fn run(
    config_path: Option<&Path>,
    listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let mut loaded = load_config(config_path)?;
    if let Some(listen) = listen {
        loaded.server.listen = listen;
    }
    let provider = init_tracing(Some(&loaded.telemetry))?;
    return_freed_memory_at_once();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = runtime.block_on(serve(loaded, config_path));
    if let Some(provider) = provider {
        // Sends the spans still batched; a collector that is down must not block exit.
        let _ = provider.shutdown();
    }
    served
}

/// mimalloc's `purge_delay` option: its number in `mi_option_e` of mimalloc 3 (`mimalloc.h`, as
/// libmimalloc-sys 0.1.49 builds it), which the crate does not name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// The mimalloc major version that number belongs to (`mi_version()` is major × 10,000 + …).
const MIMALLOC_MAJOR: i32 = 3;

/// Gives memory back to the system as soon as mimalloc frees a page of it, instead of after a
/// delay, counted only when the freeing thread allocates again. Otherwise a burst that came and
/// went (4,096 unauthenticated connections held, then closed) could stay resident on idle workers:
/// 139 MB kept against 64 MB returned. The load benchmark shows no CPU cost.
fn return_freed_memory_at_once() {
    #[expect(
        unsafe_code,
        reason = "mimalloc's options are set through its C API; the option number is used only \
                  with the mimalloc version it belongs to"
    )]
    // SAFETY: plain C calls into the linked mimalloc: `mi_version` reads a constant and
    // `mi_option_set` stores one value in its option table (safe from any thread); they touch no
    // Rust memory.
    let version = unsafe {
        let version = libmimalloc_sys::mi_version();
        if version / 10_000 == MIMALLOC_MAJOR {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        }
        version
    };
    if version / 10_000 != MIMALLOC_MAJOR {
        tracing::warn!(
            version,
            "freed memory is returned late: an unexpected mimalloc version"
        );
    }
}

/// Logs to stderr (level from `RUST_LOG`, default `info`), and, when the configuration names an
/// OTLP endpoint, exports the spans there too. Returns the provider to flush at exit.
pub(crate) fn init_tracing(
    telemetry: Option<&config::TelemetryConfig>,
) -> anyhow::Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: a log file or journald would keep the escape codes.
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let Some((telemetry, endpoint)) =
        telemetry.and_then(|telemetry| Some((telemetry, telemetry.otlp_endpoint.as_deref()?)))
    else {
        tracing_subscriber::registry()
            .with(filter)
            .with(logs)
            .init();
        return Ok(None);
    };
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .with_timeout(std::time::Duration::from_secs(5))
        .build()
        .context("building the OTLP exporter")?;
    let batch = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            opentelemetry_sdk::trace::BatchConfigBuilder::default()
                .with_scheduled_delay(std::time::Duration::from_millis(
                    telemetry.export_interval_ms,
                ))
                .build(),
        )
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_span_processor(batch)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(telemetry.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("tollgate");
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .init();
    Ok(Some(provider))
}

/// Raises the soft open-file limit to the hard one, as Go's runtime does at start: every open
/// stream holds two descriptors (the client's connection and the upstream's), and the soft limit
/// of 1,024 many systems start services with would refuse connections past ~500 streams.
fn raise_open_file_limit(max_instances: u32) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // An unlimited hard limit is not a valid soft one for files; the kernel's usual cap is.
    let wanted = limit.maximum.unwrap_or(1 << 20);
    let raised = Rlimit {
        current: Some(wanted),
        maximum: limit.maximum,
    };
    let open_files = match setrlimit(Resource::Nofile, raised) {
        Ok(()) => Some(wanted),
        Err(error) => {
            tracing::warn!(%error, "could not raise the open-file limit");
            limit.current
        }
    };
    let Some(open_files) = open_files else {
        return;
    };
    // Descriptors the gateway holds whatever the load: its store, log, listener, epoll.
    let streams = open_files.saturating_sub(64) / 2;
    if streams < u64::from(max_instances) {
        tracing::warn!(
            open_files,
            streams,
            max_instances,
            "the open-file limit allows fewer open streams than `plugins.max_instances`: raise \
             the hard limit (`ulimit -Hn`, systemd `LimitNOFILE=`)"
        );
    } else {
        tracing::info!(open_files, streams, "open-file limit");
    }
}

async fn serve(config: Config, config_path: Option<&Path>) -> anyhow::Result<()> {
    raise_open_file_limit(config.plugins.max_instances);
    let config_dir = config_path
        .and_then(Path::parent)
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let gateway = gateway::Gateway::start(&config, &config_dir).await?;
    let recovered = tollgate::flow::recover(&gateway).await?;
    if recovered > 0 {
        tracing::warn!(
            recovered,
            "charged the requests the last run left in flight"
        );
    }
    let demo_key = bootstrap(&config, gateway.store.as_ref())?;
    let admin_token = admin_token(&config, config_path.is_none())?;
    log_channels(&gateway);
    let mut listeners = bind_listeners(config.server.listen, config.server.worker_count())?;
    let first = listeners.remove(0);
    let address = first.local_addr()?;
    let store = gateway.store.clone();
    if let Some(days) = config.server.ledger_retention_days {
        tokio::spawn(apply_ledger_retention(store.clone(), days));
    }
    let metrics_token = config.server.metrics_token.as_ref().map(Redacted::expose);
    let tokens = AdminTokens::new(admin_token.token(), metrics_token);
    let (app, admin_app) = listen::apps(gateway, &tokens, config.server.admin_listen.is_some());
    let admission = client_admission(&config.server);
    // Every worker stops accepting as soon as the signal comes, then finishes what it holds.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stop = Arc::new(stop);
    let serving = Serving {
        admission,
        header_read_timeout: std::time::Duration::from_millis(
            config.server.header_read_timeout_ms.get(),
        ),
        stopped,
    };
    let workers = start_workers(listeners, &app, &serving)?;
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown_signal().await;
            let _ = stop.send(true);
        }
    });
    let admin_served = match (admin_app, config.server.admin_listen) {
        (Some(admin_app), Some(admin_address)) => {
            Some(serve_admin(admin_app, admin_address, &serving)?)
        }
        _ => None,
    };
    let admin_address = config.server.admin_listen.unwrap_or(address);
    let demo_token = match &admin_token {
        AdminToken::Demo(token) => Some(token.as_str()),
        _ => None,
    };
    say_how_to_call(address, admin_address, demo_key.as_deref(), demo_token);
    // Said once every worker's thread runs: scripts and tests wait for this line.
    console::line(&format!("tollgate listening on http://{address}"));
    // This thread is worker 0. Should it stop serving for another reason, so do the others.
    let served = serving.serve(first, app).await.context("serving");
    if let Some(admin_served) = admin_served {
        admin_served.await?.context("serving the admin API")?;
    }
    let _ = stop.send(true);
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("a serving worker panicked"))??;
    }
    served?;
    store.flush()?;
    Ok(())
}

/// Says which channels serve and which wait for their keys.
fn log_channels(gateway: &gateway::Gateway) {
    for channel in gateway.channels().iter() {
        let label = channel.config.label.as_deref().unwrap_or("");
        if channel.is_active() {
            tracing::info!(channel = %channel.config.name, label, "channel active");
        } else {
            tracing::info!(
                channel = %channel.config.name,
                needs = ?channel.config.api_key_env,
                "channel inactive: none of its key variables is set"
            );
        }
    }
}

/// Every hour, drops usage records older than `days`.
async fn apply_ledger_retention(store: Arc<dyn Store>, days: u64) {
    let mut hourly = tokio::time::interval(std::time::Duration::from_secs(3_600));
    loop {
        hourly.tick().await;
        let cutoff = now_unix_ms().saturating_sub(days * tollgate::store::MILLIS_PER_DAY);
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.prune_usage(cutoff)).await {
            Ok(Ok(pruned)) => tracing::info!(pruned, days, "ledger retention applied"),
            Ok(Err(error)) => tracing::error!(%error, "ledger retention failed"),
            Err(error) => tracing::error!(%error, "ledger retention task failed"),
        }
    }
}

/// The admission of client connections, whose failed authentications are logged as counts.
fn client_admission(server: &config::ServerConfig) -> Arc<ClientAdmission> {
    let admission = ClientAdmission::new(AdmissionLimits {
        max_unauthenticated_connections: server.max_unauthenticated_connections.get(),
        failed_auth_per_second: server.failed_auth_per_second.get(),
        body_read_timeout: std::time::Duration::from_millis(server.body_read_timeout_ms.get()),
        body_min_bytes_per_second: server.body_min_bytes_per_second,
    });
    tokio::spawn({
        let admission = admission.clone();
        async move {
            let mut every = tokio::time::interval(FAILED_AUTHENTICATION_LOG_INTERVAL);
            loop {
                every.tick().await;
                admission.log_failed_authentications();
            }
        }
    });
    admission
}

/// What every listener is served with.
struct Serving {
    admission: Arc<ClientAdmission>,
    header_read_timeout: std::time::Duration,
    stopped: tokio::sync::watch::Receiver<bool>,
}

impl Serving {
    /// Serves `listener` with `app` until the stop signal.
    fn serve(
        &self,
        listener: std::net::TcpListener,
        app: axum::Router,
    ) -> impl Future<Output = std::io::Result<()>> + Send + 'static {
        let mut stopped = self.stopped.clone();
        listen::serve_listener(
            listener,
            app,
            self.admission.clone(),
            self.header_read_timeout,
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            },
        )
    }
}

/// Starts a serving worker, each a thread with its own runtime, for each of `listeners`.
fn start_workers(
    listeners: Vec<std::net::TcpListener>,
    app: &axum::Router,
    serving: &Serving,
) -> anyhow::Result<Vec<std::thread::JoinHandle<anyhow::Result<()>>>> {
    let (ready, started) = std::sync::mpsc::channel();
    let mut workers = Vec::new();
    for (index, listener) in (1..).zip(listeners) {
        // Built here, so a runtime that cannot start fails start-up instead of one thread.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a worker's runtime")?;
        let served = serving.serve(listener, app.clone());
        let ready = ready.clone();
        let worker = std::thread::Builder::new()
            .name(format!("worker-{index}"))
            .spawn(move || {
                tollgate::channel::enter_worker(index);
                let _ = ready.send(());
                drop(ready);
                runtime.block_on(served).context("serving")
            })
            .context("starting a worker thread")?;
        workers.push(worker);
    }
    drop(ready);
    if started.iter().count() != workers.len() {
        anyhow::bail!("a serving worker's thread did not start");
    }
    Ok(workers)
}

/// Serves the admin API on its own address.
fn serve_admin(
    admin_app: axum::Router,
    address: std::net::SocketAddr,
    serving: &Serving,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let listener = std::net::TcpListener::bind(address)
        .with_context(|| format!("binding the admin listener {address}"))?;
    listener.set_nonblocking(true)?;
    console::line(&format!(
        "tollgate admin listening on http://{}",
        listener.local_addr()?
    ));
    Ok(tokio::spawn(serving.serve(listener, admin_app)))
}

/// On a data directory without tenants, creates the configured demo tenant with its balance and
/// prints one key, so a newcomer can call the gateway at once. Returns the key's secret.
fn bootstrap(config: &Config, store: &dyn Store) -> anyhow::Result<Option<String>> {
    let Some(bootstrap) = &config.bootstrap else {
        return Ok(None);
    };
    if !store.tenants()?.is_empty() {
        return Ok(None);
    }
    store.create_tenant(&new_tenant(&bootstrap.tenant))?;
    store.top_up(&tollgate::store::TopUp {
        tenant: bootstrap.tenant.clone(),
        amount_picos: i128::from(bootstrap.balance_micros) * 1_000_000,
        reason: "bootstrap: opening balance of the demo tenant".to_owned(),
        unix_ms: now_unix_ms(),
    })?;
    let (key, secret) = auth::issue_key(
        store,
        &bootstrap.tenant,
        auth::KeyTerms::default(),
        now_unix_ms(),
    )?;
    store.flush()?;
    console::line(&format!(
        "created tenant {} with key {} (the secret is shown once):",
        bootstrap.tenant, key.id
    ));
    console::line(&secret);
    Ok(Some(secret))
}

/// Where the admin token comes from.
enum AdminToken {
    /// `TOLLGATE_ADMIN_TOKEN`: always the token when set, whatever the configuration.
    Variable(String),
    /// The demo's own, kept in its data directory.
    Demo(String),
    /// None: the admin API refuses every call.
    Closed,
}

impl AdminToken {
    fn token(&self) -> Option<&str> {
        match self {
            AdminToken::Variable(token) | AdminToken::Demo(token) => Some(token),
            AdminToken::Closed => None,
        }
    }
}

/// Where the demo keeps its admin token, in its data directory.
const DEMO_ADMIN_TOKEN_FILE: &str = "admin-token";

/// The admin token: `TOLLGATE_ADMIN_TOKEN` when it is set. Without it, the demo (embedded
/// defaults) makes one on its first run and keeps it in its data directory, readable by its owner
/// only, so that its admin API and CLI work at once; a gateway with a configuration file then has
/// no admin API, and says so.
fn admin_token(config: &Config, demo: bool) -> anyhow::Result<AdminToken> {
    if let Some(token) = std::env::var("TOLLGATE_ADMIN_TOKEN")
        .ok()
        .filter(|token| !token.is_empty())
    {
        return Ok(AdminToken::Variable(token));
    }
    if !demo {
        tracing::warn!(
            "the admin API is closed: TOLLGATE_ADMIN_TOKEN is not set (every admin call answers \
             401 admin_api_closed)"
        );
        return Ok(AdminToken::Closed);
    }
    let path = config.server.data_dir.join(DEMO_ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => {
            return Ok(AdminToken::Demo(token.trim().to_owned()));
        }
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    }
    let token = format!("tga-{}", hex::encode(rand::random::<[u8; 24]>()));
    write_owner_only(&path, &token)?;
    Ok(AdminToken::Demo(token))
}

/// Writes `text` into a new file only its owner may read.
fn write_owner_only(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Ready-to-paste lines: where to call it and its admin API (the CLI reads
/// `TOLLGATE_ADMIN_URL`), with which key (on the run that made it) and, for the demo, which admin
/// token (an operator's is already in their environment).
fn say_how_to_call(
    address: std::net::SocketAddr,
    admin_address: std::net::SocketAddr,
    key: Option<&str>,
    demo_admin_token: Option<&str>,
) {
    console::line("To call it, paste into a shell:");
    console::line(&format!("  export TOLLGATE_BASE_URL=http://{address}/v1"));
    console::line(&format!(
        "  export TOLLGATE_ADMIN_URL=http://{admin_address}"
    ));
    if let Some(key) = key {
        console::line(&format!("  export TOLLGATE_KEY={key}"));
    }
    if let Some(token) = demo_admin_token {
        console::line(&format!("  export TOLLGATE_ADMIN_TOKEN={token}"));
    }
}

/// Binds `count` listening sockets to `address`, all with `SO_REUSEPORT`, so the kernel spreads
/// incoming connections over the serving workers; port 0 picks one free port for all of them.
fn bind_listeners(
    address: std::net::SocketAddr,
    count: usize,
) -> anyhow::Result<Vec<std::net::TcpListener>> {
    // A probe without `SO_REUSEPORT` first: with it alone, a second gateway started on a port in
    // use would silently share that port's connections instead of failing to start.
    let probe =
        std::net::TcpListener::bind(address).with_context(|| format!("binding {address}"))?;
    let mut bound = probe.local_addr()?;
    drop(probe);
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = if bound.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }?;
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket
            .bind(bound)
            .with_context(|| format!("binding {bound}"))?;
        let listener = socket.listen(1024)?;
        bound = listener.local_addr()?;
        listeners.push(listener.into_std()?);
    }
    Ok(listeners)
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => return interrupt.await.unwrap_or(()),
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
