//! `tollgate`: the gateway binary. `serve` runs it; the other subcommands administer its data
//! directory. The only place `anyhow` is used.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

use tollgate::admin::AdminTokens;
use tollgate::admission::{AdmissionLimits, ClientAdmission, FAILED_AUTHENTICATION_LOG_INTERVAL};
use tollgate::config::{self, Config};
use tollgate::secrets::Redacted;
use tollgate::store::{SledStore, Store};
use tollgate::{auth, console, gateway, listen};

/// mimalloc instead of glibc's allocator: a request allocates and frees many small buffers across
/// threads, and glibc's `malloc`/`free` (with its chunk consolidation) took about a seventh of the
/// gateway's CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "LLM API gateway programmable with WebAssembly"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the gateway.
    Serve {
        /// Configuration file; without it the embedded demo configuration is used.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Manages tenants.
    Tenant {
        #[command(subcommand)]
        action: TenantAction,
    },
    /// Manages API keys.
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Manages channels created through the admin API.
    Channel {
        #[command(subcommand)]
        action: ChannelAction,
    },
    /// Manages balances, through a running gateway's admin API.
    Balance {
        #[command(subcommand)]
        action: BalanceAction,
    },
    /// Usage and the books, through a running gateway's admin API.
    Usage {
        #[command(subcommand)]
        action: UsageAction,
    },
    /// Plugins: write, test, upload and bind them (the last through a running gateway).
    Plugin {
        #[command(subcommand)]
        action: PluginAction,
    },
}

/// Which binding a plugin command changes.
#[derive(clap::Args)]
struct ScopeArgs {
    /// `router`, `translator` or `billing`.
    #[arg(long)]
    role: String,
    /// The tenant; without it, the global binding.
    #[arg(long)]
    tenant: Option<String>,
    /// The protocol, for translators.
    #[arg(long)]
    protocol: Option<String>,
}

impl ScopeArgs {
    fn query(&self) -> String {
        let mut query = format!("role={}", percent_encode(&self.role));
        for (name, value) in [("tenant", &self.tenant), ("protocol", &self.protocol)] {
            if let Some(value) = value {
                query.push_str(&format!("&{name}={}", percent_encode(value)));
            }
        }
        query
    }
}

/// A binding's plugin, configuration and limits.
#[derive(clap::Args)]
struct BindingArgs {
    /// A plugin hash (12+ leading hex digits suffice), an uploaded plugin's name (its newest
    /// version) or a shipped plugin's name.
    #[arg(long)]
    plugin: String,
    /// The plugin's configuration, as JSON.
    #[arg(long, default_value = "{}")]
    config: String,
    /// `closed` (the request gets the plugin's error) or `open` (the global default serves it).
    #[arg(long)]
    failure_policy: Option<String>,
    /// Per-call deadline, in milliseconds.
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Memory cap, in MiB.
    #[arg(long)]
    memory_mib: Option<usize>,
    /// Cap on one call's output, in KiB.
    #[arg(long)]
    max_output_kib: Option<usize>,
}

impl BindingArgs {
    fn body(&self) -> anyhow::Result<serde_json::Value> {
        let config: serde_json::Value =
            serde_json::from_str(&self.config).context("--config is not JSON")?;
        let mut body = serde_json::json!({"plugin": self.plugin, "config": config});
        let optional = [
            (
                "failure_policy",
                self.failure_policy.clone().map(serde_json::Value::from),
            ),
            ("deadline_ms", self.deadline_ms.map(serde_json::Value::from)),
            ("memory_mib", self.memory_mib.map(serde_json::Value::from)),
            (
                "max_output_kib",
                self.max_output_kib.map(serde_json::Value::from),
            ),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                body[name] = value;
            }
        }
        Ok(body)
    }
}

#[derive(Subcommand)]
enum PluginAction {
    /// Writes a ready-to-build plugin crate.
    New {
        /// The crate's name.
        name: String,
        /// `router`, `translator` or `billing`.
        #[arg(long)]
        role: String,
        /// Where to write it (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The Tollgate plugin SDK crate (default: the source tree this binary was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Runs a plugin locally on one request and prints its decision as JSON.
    Test {
        /// The component (`.wasm`).
        file: PathBuf,
        /// An OpenAI chat-completions body (JSON, or @FILE).
        #[arg(long)]
        request: String,
        /// Routers: the channels as a JSON array (or @FILE) of
        /// `{name, models: {public: upstream}, priority, weight, price_per_million_input_micros,
        /// price_per_million_output_micros, circuit, latency_ewma_ms, error_rate_permille,
        /// in_flight}`; one channel serving the requested model by default.
        #[arg(long)]
        channels: Option<String>,
        /// The plugin's configuration (JSON, or @FILE).
        #[arg(long, default_value = "{}")]
        config: String,
        /// A tag as the router sees an `x-tollgate-NAME: VALUE` header: `NAME=VALUE`. Repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Uploads a component: checked, stored by hash, compiled once.
    Upload {
        /// The component (`.wasm`).
        file: PathBuf,
        /// The name to know it by (default: the file's stem).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Lists uploaded and shipped plugins.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Shows one uploaded plugin and where it is bound.
    Show {
        /// Its hash.
        sha256: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Deletes an uploaded plugin that nothing binds.
    Delete {
        /// Its hash.
        sha256: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Lists every binding, with canaries and their tallies.
    Bindings {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Binds a plugin to a scope (atomic; requests in flight finish on the old one).
    Bind {
        #[command(flatten)]
        scope: ScopeArgs,
        #[command(flatten)]
        binding: BindingArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Restores a scope's previous binding.
    Rollback {
        #[command(flatten)]
        scope: ScopeArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Runs a new version on a share of a scope's requests; it rolls itself back if it fails.
    Canary {
        #[command(flatten)]
        scope: ScopeArgs,
        #[command(flatten)]
        binding: BindingArgs,
        /// Share of requests, 1–99 %.
        #[arg(long)]
        percent: u8,
        /// Failure share that rolls it back, % (default 20).
        #[arg(long)]
        max_failure_percent: Option<u8>,
        /// Calls before the failure share is judged (default 20).
        #[arg(long)]
        min_calls: Option<u64>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Makes a scope's canary serve every request.
    Promote {
        #[command(flatten)]
        scope: ScopeArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Stops a scope's canary.
    Abort {
        #[command(flatten)]
        scope: ScopeArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The gateway's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    admin_url: String,
    /// The admin token.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
}

#[derive(Subcommand)]
enum BalanceAction {
    /// Credits a tenant (a negative amount corrects a mistake); the reason is recorded.
    TopUp {
        /// Tenant name.
        #[arg(long)]
        tenant: String,
        /// Amount in micro-units of currency (1 unit = 1,000,000).
        #[arg(long, allow_hyphen_values = true)]
        amount_micros: i64,
        /// Why.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Shows a tenant's balance.
    Get {
        /// Tenant name.
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum ChannelAction {
    /// Lists every channel with its health and key state (never a secret).
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Creates a channel from a JSON file: a `[[channels]]` table's fields plus `api_keys`.
    Create {
        /// The channel's JSON.
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Replaces an API channel from a JSON file (without `api_keys` its keys stay).
    Update {
        /// Channel name.
        name: String,
        /// The channel's JSON.
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Deletes an API channel.
    Delete {
        /// Channel name.
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum UsageAction {
    /// Checks that every balance equals its top-ups minus its ledger charges; exits 1 if not.
    Reconcile {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Lists usage records matching the filters (JSON).
    Query {
        #[command(flatten)]
        filters: UsageFilters,
        /// At most this many records.
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Writes usage records matching the filters to stdout as CSV, streamed.
    Export {
        #[command(flatten)]
        filters: UsageFilters,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(clap::Args)]
struct UsageFilters {
    /// Tenant name.
    #[arg(long)]
    tenant: Option<String>,
    /// Key id.
    #[arg(long)]
    key: Option<String>,
    /// Public model asked for.
    #[arg(long)]
    model: Option<String>,
    /// Channel that answered.
    #[arg(long)]
    channel: Option<String>,
    /// From this time, milliseconds since the Unix epoch (inclusive).
    #[arg(long)]
    from_ms: Option<u64>,
    /// Until this time, milliseconds since the Unix epoch (exclusive).
    #[arg(long)]
    to_ms: Option<u64>,
}

impl UsageFilters {
    fn query_string(&self, limit: Option<usize>) -> String {
        let pairs = [
            ("tenant", self.tenant.clone()),
            ("key", self.key.clone()),
            ("model", self.model.clone()),
            ("channel", self.channel.clone()),
            ("from_ms", self.from_ms.map(|ms| ms.to_string())),
            ("to_ms", self.to_ms.map(|ms| ms.to_string())),
            ("limit", limit.map(|limit| limit.to_string())),
        ];
        let encoded: Vec<String> = pairs
            .into_iter()
            .filter_map(|(name, value)| Some(format!("{name}={}", percent_encode(&value?))))
            .collect();
        if encoded.is_empty() {
            String::new()
        } else {
            format!("?{}", encoded.join("&"))
        }
    }
}

/// Percent-encodes a query value (everything but unreserved characters).
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(byte).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[derive(clap::Args)]
struct DataDirArgs {
    /// Configuration file whose `server.data_dir` to use.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (wins over `--config`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Act through a running gateway's admin API instead of the data directory (the token comes
    /// from `TOLLGATE_ADMIN_TOKEN`).
    #[arg(long, conflicts_with_all = ["config", "data_dir"])]
    admin_url: Option<String>,
}

impl DataDirArgs {
    /// The admin API to use, when `--admin-url` was given.
    fn admin(&self) -> anyhow::Result<Option<AdminArgs>> {
        let Some(admin_url) = self.admin_url.clone() else {
            return Ok(None);
        };
        let admin_token = std::env::var("TOLLGATE_ADMIN_TOKEN")
            .context("--admin-url needs the admin token in TOLLGATE_ADMIN_TOKEN")?;
        Ok(Some(AdminArgs {
            admin_url,
            admin_token,
        }))
    }
}

#[derive(Subcommand)]
enum TenantAction {
    /// Creates a tenant (in the data directory; use the admin API while a gateway runs).
    Create {
        /// Tenant name.
        name: String,
        #[command(flatten)]
        data: DataDirArgs,
    },
    /// Lists tenants, through the admin API.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Shows one tenant, through the admin API.
    Get {
        /// Tenant name.
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Disables a tenant: its keys are refused. Through the admin API.
    Disable {
        /// Tenant name.
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum KeyAction {
    /// Creates an API key; the secret is printed once, as the last line.
    Create {
        /// The tenant the key belongs to.
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        data: DataDirArgs,
    },
    /// Lists a tenant's keys (prefixes, never secrets), through the admin API.
    List {
        /// Tenant name.
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Revokes a key by id, through the admin API.
    Revoke {
        /// Key id (`key_…`).
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Logs to stderr (level from `RUST_LOG`, default `info`), and, when the configuration names an
/// OTLP endpoint, exports the spans there too. Returns the provider to flush at exit.
fn init_tracing(
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // `serve` sets up tracing once its configuration (which may name an OTLP endpoint) is read.
    if !matches!(cli.command, Command::Serve { .. }) {
        init_tracing(None)?;
    }
    match cli.command {
        Command::Serve { config } => {
            let loaded = load_config(config.as_deref())?;
            let provider = init_tracing(Some(&loaded.telemetry))?;
            return_freed_memory_at_once();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let served = runtime.block_on(serve(loaded, config.as_deref()));
            if let Some(provider) = provider {
                // Sends the spans still batched; a collector that is down must not block exit.
                let _ = provider.shutdown();
            }
            served
        }
        Command::Tenant {
            action: TenantAction::Create { name, data },
        } => {
            if let Some(admin) = data.admin()? {
                let body = serde_json::json!({ "name": name });
                admin_request(&admin, reqwest::Method::POST, "/tenants", Some(body))?;
                console::line(&format!("created tenant {name}"));
                return Ok(());
            }
            let store = open_store(&data)?;
            store.create_tenant(&new_tenant(&name))?;
            console::line(&format!("created tenant {name}"));
            Ok(())
        }
        Command::Balance { action } => match action {
            BalanceAction::TopUp {
                tenant,
                amount_micros,
                reason,
                admin,
            } => admin_call(
                &admin,
                reqwest::Method::POST,
                &format!("/tenants/{tenant}/top-ups"),
                Some(serde_json::json!({"amount_micros": amount_micros, "reason": reason})),
            )
            .map(drop),
            BalanceAction::Get { tenant, admin } => admin_call(
                &admin,
                reqwest::Method::GET,
                &format!("/tenants/{tenant}/balance"),
                None,
            )
            .map(drop),
        },
        Command::Channel { action } => {
            let read = |file: &Path| -> anyhow::Result<serde_json::Value> {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?;
                serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))
            };
            match action {
                ChannelAction::List { admin } => {
                    admin_call(&admin, reqwest::Method::GET, "/channels", None)
                }
                ChannelAction::Create { file, admin } => admin_call(
                    &admin,
                    reqwest::Method::POST,
                    "/channels",
                    Some(read(&file)?),
                ),
                ChannelAction::Update { name, file, admin } => admin_call(
                    &admin,
                    reqwest::Method::PUT,
                    &format!("/channels/{}", percent_encode(&name)),
                    Some(read(&file)?),
                ),
                ChannelAction::Delete { name, admin } => admin_call(
                    &admin,
                    reqwest::Method::DELETE,
                    &format!("/channels/{}", percent_encode(&name)),
                    None,
                ),
            }
            .map(drop)
        }
        Command::Tenant {
            action: TenantAction::List { admin },
        } => admin_call(&admin, reqwest::Method::GET, "/tenants", None).map(drop),
        Command::Tenant {
            action: TenantAction::Get { name, admin },
        } => {
            let path = format!("/tenants/{}", percent_encode(&name));
            admin_call(&admin, reqwest::Method::GET, &path, None).map(drop)
        }
        Command::Tenant {
            action: TenantAction::Disable { name, admin },
        } => {
            let path = format!("/tenants/{}/disable", percent_encode(&name));
            admin_call(&admin, reqwest::Method::POST, &path, None).map(drop)
        }
        Command::Key {
            action: KeyAction::List { tenant, admin },
        } => {
            let path = format!("/tenants/{}/keys", percent_encode(&tenant));
            admin_call(&admin, reqwest::Method::GET, &path, None).map(drop)
        }
        Command::Key {
            action: KeyAction::Revoke { id, admin },
        } => {
            let path = format!("/keys/{}/revoke", percent_encode(&id));
            admin_call(&admin, reqwest::Method::POST, &path, None).map(drop)
        }
        Command::Usage {
            action:
                UsageAction::Query {
                    filters,
                    limit,
                    admin,
                },
        } => {
            let path = format!("/usage{}", filters.query_string(limit));
            admin_call(&admin, reqwest::Method::GET, &path, None).map(drop)
        }
        Command::Usage {
            action: UsageAction::Export { filters, admin },
        } => export_csv(&admin, &format!("/usage.csv{}", filters.query_string(None))),
        Command::Usage {
            action: UsageAction::Reconcile { admin },
        } => {
            let books = admin_call(&admin, reqwest::Method::GET, "/reconcile", None)?;
            anyhow::ensure!(
                books["balanced"] == serde_json::Value::Bool(true),
                "the books do not balance"
            );
            Ok(())
        }
        Command::Plugin { action } => plugin_command(action),
        Command::Key {
            action: KeyAction::Create { tenant, data },
        } => {
            if let Some(admin) = data.admin()? {
                let path = format!("/tenants/{}/keys", percent_encode(&tenant));
                let created = admin_request(&admin, reqwest::Method::POST, &path, None)?;
                let id = created["key"]["id"].as_str().unwrap_or_default();
                console::line(&format!("created key {id} for tenant {tenant}"));
                console::line(
                    created["secret"]
                        .as_str()
                        .context("the answer holds the secret")?,
                );
                return Ok(());
            }
            let store = open_store(&data)?;
            let (key, secret) =
                auth::issue_key(&store, &tenant, auth::KeyTerms::default(), now_unix_ms())?;
            store.flush()?;
            console::line(&format!("created key {} for tenant {}", key.id, key.tenant));
            console::line(&secret);
            Ok(())
        }
    }
}

fn plugin_command(action: PluginAction) -> anyhow::Result<()> {
    use reqwest::Method;
    match action {
        PluginAction::New {
            name,
            role,
            dir,
            sdk,
        } => {
            let role = tollgate::plugin::Role::parse(&role)
                .context("--role is router, translator or billing")?;
            let sdk = sdk
                .or_else(tollgate::trial::default_sdk_path)
                .context("the SDK is not beside this binary: pass --sdk PATH/plugins/sdk")?;
            let sdk = sdk.canonicalize().unwrap_or(sdk);
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            anyhow::ensure!(!dir.exists(), "{} already exists", dir.display());
            for (path, contents) in tollgate::trial::template(&name, role, &sdk) {
                let path = dir.join(path);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("creating {}", parent.display()))?;
                }
                std::fs::write(&path, contents)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            console::line(&format!(
                "created the {role} plugin {name} in {}; build it with \
                 `cargo build --release --target wasm32-wasip2`",
                dir.display()
            ));
            Ok(())
        }
        PluginAction::Test {
            file,
            request,
            channels,
            config,
            tags,
        } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let json = |text: &str, what: &str| -> anyhow::Result<serde_json::Value> {
                let text = match text.strip_prefix('@') {
                    Some(path) => {
                        std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
                    }
                    None => text.to_owned(),
                };
                serde_json::from_str(&text).with_context(|| format!("{what} is not JSON"))
            };
            let tags = tags
                .iter()
                .map(|tag| {
                    tag.split_once('=')
                        .map(|(name, value)| (name.to_owned(), value.to_owned()))
                        .context("a --tag is NAME=VALUE")
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let trial = tollgate::trial::Trial {
                name: file.file_stem().map_or_else(
                    || "plugin".to_owned(),
                    |stem| stem.to_string_lossy().into_owned(),
                ),
                bytes,
                config: json(&config, "--config")?.to_string(),
                request: json(&request, "--request")?,
                tags,
                channels: channels.map(|text| json(&text, "--channels")).transpose()?,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let decision = runtime.block_on(tollgate::trial::run(trial))?;
            console::line(&serde_json::to_string_pretty(&decision)?);
            Ok(())
        }
        PluginAction::Upload { file, name, admin } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let name = name
                .or_else(|| {
                    file.file_stem()
                        .map(|stem| stem.to_string_lossy().into_owned())
                })
                .context("name the plugin with --name")?;
            let path = format!("/plugins?name={}", percent_encode(&name));
            let answer = send_admin(&admin, Method::POST, &path, |request| {
                request
                    .header("content-type", "application/wasm")
                    .body(bytes)
            })?;
            console::line(&serde_json::to_string_pretty(&answer)?);
            Ok(())
        }
        PluginAction::List { admin } => admin_call(&admin, Method::GET, "/plugins", None).map(drop),
        PluginAction::Show { sha256, admin } => {
            let path = format!("/plugins/{}", percent_encode(&sha256));
            admin_call(&admin, Method::GET, &path, None).map(drop)
        }
        PluginAction::Delete { sha256, admin } => {
            let path = format!("/plugins/{}", percent_encode(&sha256));
            admin_call(&admin, Method::DELETE, &path, None).map(drop)
        }
        PluginAction::Bindings { admin } => {
            admin_call(&admin, Method::GET, "/bindings", None).map(drop)
        }
        PluginAction::Bind {
            scope,
            binding,
            admin,
        } => {
            let path = format!("/bindings?{}", scope.query());
            admin_call(&admin, Method::PUT, &path, Some(binding.body()?)).map(drop)
        }
        PluginAction::Rollback { scope, admin } => {
            let path = format!("/bindings/rollback?{}", scope.query());
            admin_call(&admin, Method::POST, &path, None).map(drop)
        }
        PluginAction::Canary {
            scope,
            binding,
            percent,
            max_failure_percent,
            min_calls,
            admin,
        } => {
            let mut body = binding.body()?;
            body["percent"] = percent.into();
            if let Some(max_failure_percent) = max_failure_percent {
                body["max_failure_percent"] = max_failure_percent.into();
            }
            if let Some(min_calls) = min_calls {
                body["min_calls"] = min_calls.into();
            }
            let path = format!("/bindings/canary?{}", scope.query());
            admin_call(&admin, Method::PUT, &path, Some(body)).map(drop)
        }
        PluginAction::Promote { scope, admin } => {
            let path = format!("/bindings/canary/promote?{}", scope.query());
            admin_call(&admin, Method::POST, &path, None).map(drop)
        }
        PluginAction::Abort { scope, admin } => {
            let path = format!("/bindings/canary?{}", scope.query());
            admin_call(&admin, Method::DELETE, &path, None).map(drop)
        }
    }
}

/// Calls the admin API and prints its JSON answer; a non-2xx answer is an error.
fn admin_call(
    admin: &AdminArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let answer = admin_request(admin, method, path, body)?;
    console::line(&serde_json::to_string_pretty(&answer)?);
    Ok(answer)
}

/// Calls the admin API and returns its JSON answer; a non-2xx answer is an error.
fn admin_request(
    admin: &AdminArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    send_admin(admin, method, path, |request| match body {
        Some(body) => request.json(&body),
        None => request,
    })
}

/// Sends one admin request, its body set by `with_body`; returns the JSON answer of a 2xx.
fn send_admin(
    admin: &AdminArgs,
    method: reqwest::Method,
    path: &str,
    with_body: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
) -> anyhow::Result<serde_json::Value> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let url = format!("{}/admin{path}", admin.admin_url.trim_end_matches('/'));
        let request = with_body(
            reqwest::Client::new()
                .request(method, &url)
                .bearer_auth(&admin.admin_token),
        );
        let response = request
            .send()
            .await
            .with_context(|| format!("calling {url}"))?;
        let status = response.status();
        let answer: serde_json::Value = response.json().await.context("reading the answer")?;
        anyhow::ensure!(status.is_success(), "{status}: {answer}");
        Ok(answer)
    })
}

fn new_tenant(name: &str) -> tollgate::store::Tenant {
    tollgate::store::Tenant {
        name: name.to_owned(),
        created_unix_ms: now_unix_ms(),
        disabled: false,
        max_concurrency: None,
    }
}

/// Copies a CSV export to stdout as it arrives.
fn export_csv(admin: &AdminArgs, path: &str) -> anyhow::Result<()> {
    use futures::StreamExt;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let url = format!("{}/admin{path}", admin.admin_url.trim_end_matches('/'));
        let response = reqwest::Client::new()
            .get(&url)
            .bearer_auth(&admin.admin_token)
            .send()
            .await
            .with_context(|| format!("calling {url}"))?;
        let status = response.status();
        anyhow::ensure!(status.is_success(), "{status}: {}", response.text().await?);
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            console::raw(&chunk.context("the export broke off")?)?;
        }
        Ok(())
    })
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(path) => Config::from_file(path)?,
        None => Config::parse(
            config::EMBEDDED_DEFAULT,
            "the embedded default configuration",
        )?,
    })
}

fn open_store(args: &DataDirArgs) -> anyhow::Result<SledStore> {
    let data_dir = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => load_config(args.config.as_deref())?.server.data_dir,
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    // The CLI commits no usage records: the log is never synced by it.
    Ok(SledStore::open(
        &data_dir,
        tollgate::store::LedgerSync::None,
    )?)
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
    bootstrap(&config, gateway.store.as_ref())?;
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
    let mut listeners = bind_listeners(config.server.listen, config.server.worker_count())?;
    let first = listeners.remove(0);
    let address = first.local_addr()?;
    let store = gateway.store.clone();
    if let Some(days) = config.server.ledger_retention_days {
        let store = store.clone();
        tokio::spawn(async move {
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
        });
    }
    let admin_token = std::env::var("TOLLGATE_ADMIN_TOKEN").ok();
    let metrics_token = config.server.metrics_token.as_ref().map(Redacted::expose);
    let tokens = AdminTokens::new(admin_token.as_deref(), metrics_token);
    let (app, admin_app) = listen::apps(gateway, &tokens, config.server.admin_listen.is_some());
    let admission = ClientAdmission::new(AdmissionLimits {
        max_unauthenticated_connections: config.server.max_unauthenticated_connections.get(),
        failed_auth_per_second: config.server.failed_auth_per_second.get(),
        body_read_timeout: std::time::Duration::from_millis(
            config.server.body_read_timeout_ms.get(),
        ),
        body_min_bytes_per_second: config.server.body_min_bytes_per_second,
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
    // Every worker stops accepting as soon as the signal comes, then finishes what it holds.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stop = std::sync::Arc::new(stop);
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let header_read_timeout =
        std::time::Duration::from_millis(config.server.header_read_timeout_ms.get());
    let (ready, started) = std::sync::mpsc::channel();
    let mut workers = Vec::new();
    for (index, listener) in (1..).zip(listeners) {
        // Built here, so a runtime that cannot start fails start-up instead of one thread.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a worker's runtime")?;
        let (app, stopping, ready) = (app.clone(), until_stopped(stopped.clone()), ready.clone());
        let admission = admission.clone();
        let worker = std::thread::Builder::new()
            .name(format!("worker-{index}"))
            .spawn(move || {
                gateway::enter_worker(index);
                let _ = ready.send(());
                drop(ready);
                runtime
                    .block_on(listen::serve_listener(
                        listener,
                        app,
                        admission,
                        header_read_timeout,
                        stopping,
                    ))
                    .context("serving")
            })
            .context("starting a worker thread")?;
        workers.push(worker);
    }
    drop(ready);
    if started.iter().count() != workers.len() {
        anyhow::bail!("a serving worker's thread did not start");
    }
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown_signal().await;
            let _ = stop.send(true);
        }
    });
    let admin_served = match (admin_app, config.server.admin_listen) {
        (Some(admin_app), Some(admin_address)) => {
            let listener = std::net::TcpListener::bind(admin_address)
                .with_context(|| format!("binding the admin listener {admin_address}"))?;
            listener.set_nonblocking(true)?;
            console::line(&format!(
                "tollgate admin listening on http://{}",
                listener.local_addr()?
            ));
            Some(tokio::spawn(listen::serve_listener(
                listener,
                admin_app,
                admission.clone(),
                header_read_timeout,
                until_stopped(stopped.clone()),
            )))
        }
        _ => None,
    };
    // Said once every worker's thread runs: scripts and tests wait for this line.
    console::line(&format!("tollgate listening on http://{address}"));
    // This thread is worker 0. Should it stop serving for another reason, so do the others.
    let served = listen::serve_listener(
        first,
        app,
        admission,
        header_read_timeout,
        until_stopped(stopped),
    )
    .await
    .context("serving");
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

/// On a data directory without tenants, creates the configured demo tenant with its balance and
/// prints one key, so a newcomer can call the gateway at once.
fn bootstrap(config: &Config, store: &dyn Store) -> anyhow::Result<()> {
    let Some(bootstrap) = &config.bootstrap else {
        return Ok(());
    };
    if !store.tenants()?.is_empty() {
        return Ok(());
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
    Ok(())
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
