//! The command line: every subcommand and its arguments.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "LLM API gateway programmable with WebAssembly"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Writes a starter configuration (the demo's, commented) to begin from.
    Init {
        /// Where to write it; an existing file is never overwritten.
        #[arg(long, default_value = "tollgate.toml")]
        config: PathBuf,
    },
    /// Runs the gateway.
    Serve {
        /// Configuration file; without it the embedded demo configuration is used.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen here instead of the configuration's `server.listen` (port 0: any free port).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
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
pub(crate) struct ScopeArgs {
    /// `router`, `translator` or `billing`.
    #[arg(long)]
    pub(crate) role: String,
    /// The tenant; without it, the global binding.
    #[arg(long)]
    pub(crate) tenant: Option<String>,
    /// The protocol, for translators.
    #[arg(long)]
    pub(crate) protocol: Option<String>,
}

impl ScopeArgs {
    pub(crate) fn query(&self) -> String {
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
/// Serialized, it is the admin API's binding body but for `config`, which is JSON text here.
#[derive(clap::Args, serde::Serialize)]
pub(crate) struct BindingArgs {
    /// A plugin hash (12+ leading hex digits suffice), an uploaded plugin's name (its newest
    /// version) or a shipped plugin's name.
    #[arg(long)]
    pub(crate) plugin: String,
    /// The plugin's configuration, as JSON (default: `{}`; a canary's: the configuration of the
    /// binding it runs beside).
    #[arg(long)]
    #[serde(skip)]
    pub(crate) config: Option<String>,
    /// `closed` (the request gets the plugin's error) or `open` (the global default serves it).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) failure_policy: Option<String>,
    /// Per-call deadline, in milliseconds.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) deadline_ms: Option<u64>,
    /// Memory cap, in MiB.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) memory_mib: Option<usize>,
    /// Cap on one call's output, in KiB.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_output_kib: Option<usize>,
}

impl BindingArgs {
    pub(crate) fn body(&self) -> anyhow::Result<serde_json::Value> {
        let mut body = serde_json::to_value(self)?;
        if let Some(config) = &self.config {
            body["config"] = serde_json::from_str(config).context("--config is not JSON")?;
        }
        Ok(body)
    }
}

#[derive(Subcommand)]
pub(crate) enum PluginAction {
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
pub(crate) struct AdminArgs {
    /// The gateway's admin API: its address without a path (`serve` prints it).
    #[arg(
        long,
        env = "TOLLGATE_ADMIN_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub(crate) admin_url: String,
    /// The admin token.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub(crate) admin_token: String,
}

#[derive(Subcommand)]
pub(crate) enum BalanceAction {
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
pub(crate) enum ChannelAction {
    /// Lists every channel with its health and key state (never a secret), and the order a request
    /// for each model would try them now (`try_order`).
    List {
        /// Order by this tenant's router instead of the global one.
        #[arg(long)]
        tenant: Option<String>,
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
pub(crate) enum UsageAction {
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
pub(crate) struct UsageFilters {
    /// Tenant name.
    #[arg(long)]
    pub(crate) tenant: Option<String>,
    /// Key id.
    #[arg(long)]
    pub(crate) key: Option<String>,
    /// Public model asked for.
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// Channel that answered.
    #[arg(long)]
    pub(crate) channel: Option<String>,
    /// From this time, milliseconds since the Unix epoch (inclusive).
    #[arg(long)]
    pub(crate) from_ms: Option<u64>,
    /// Until this time, milliseconds since the Unix epoch (exclusive).
    #[arg(long)]
    pub(crate) to_ms: Option<u64>,
}

impl UsageFilters {
    pub(crate) fn query_string(&self, limit: Option<usize>) -> String {
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

#[derive(clap::Args)]
pub(crate) struct DataDirArgs {
    /// Configuration file whose `server.data_dir` to use.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Data directory (wins over `--config`).
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Act through a running gateway's admin API instead of the data directory (the token comes
    /// from `TOLLGATE_ADMIN_TOKEN`).
    #[arg(long, conflicts_with_all = ["config", "data_dir"])]
    pub(crate) admin_url: Option<String>,
}

impl DataDirArgs {
    /// The admin API to use, when `--admin-url` was given.
    pub(crate) fn admin(&self) -> anyhow::Result<Option<AdminArgs>> {
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
pub(crate) enum TenantAction {
    /// Creates a tenant (in the data directory; use the admin API while a gateway runs).
    Create {
        /// Tenant name.
        name: String,
        /// Opening balance, in micro-units (a top-up recorded as the opening balance).
        #[arg(long, default_value_t = 0)]
        balance_micros: u64,
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
    /// Enables a disabled tenant again. Through the admin API.
    Enable {
        /// Tenant name.
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
pub(crate) enum KeyAction {
    /// Creates an API key; the secret is printed once, as the last line.
    Create {
        /// The tenant the key belongs to.
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        terms: KeyTermArgs,
        #[command(flatten)]
        data: DataDirArgs,
    },
    /// Changes a key's terms, in force for its next request; through the admin API.
    Update {
        /// Key id (`key_…`).
        id: String,
        #[command(flatten)]
        terms: KeyTermArgs,
        /// Clears a term (no expiry, every model, no limit): `expires_unix_ms`,
        /// `allowed_models`, `rpm`, `tpm` or `daily_spend_cap_micros`; repeatable.
        #[arg(long, value_name = "TERM")]
        clear: Vec<String>,
        #[command(flatten)]
        admin: AdminArgs,
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

/// A key's terms, as flags (each left out: unchanged on update, none on creation).
/// Serialized, it is the admin API's key terms, those given only.
#[derive(clap::Args, serde::Serialize)]
pub(crate) struct KeyTermArgs {
    /// Expiry, milliseconds since the Unix epoch.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) expires_unix_ms: Option<u64>,
    /// Public models the key may use, comma-separated (default: every model).
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) allowed_models: Option<Vec<String>>,
    /// Requests per minute, at most.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rpm: Option<u32>,
    /// Tokens (prompt and output) per minute, at most.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tpm: Option<u64>,
    /// Spend per UTC day, at most, in micro-units.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) daily_spend_cap_micros: Option<u64>,
}

impl KeyTermArgs {
    /// The terms given, as the admin API's key fields.
    pub(crate) fn body(&self) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
        Ok(serde_json::from_value(serde_json::to_value(self)?)?)
    }
}

/// Percent-encodes a query value (everything but unreserved characters).
pub(crate) fn percent_encode(value: &str) -> String {
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
