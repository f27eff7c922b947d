//! The TOML configuration (DESIGN.md §7). Names marked fixed there — `server.listen`, `server.data_dir`,
//! `[[channels]]` with `name`, `protocol`, `base_url`, `api_key_env`, `priority`, `models` — are a
//! stable interface: operators' scripts rely on them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The configuration used when `serve` gets no `--config`: the offline demo (a simulated channel
/// plus real providers that come alive when their key variables are set).
pub const EMBEDDED_DEFAULT: &str = include_str!("../../examples/demo.toml");

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listener and storage.
    #[serde(default)]
    pub server: ServerConfig,
    /// Plugin engine settings.
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// Which plugin plays each role, with its configuration.
    #[serde(default)]
    pub bindings: BindingsConfig,
    /// Upstream channels.
    #[serde(default)]
    pub channels: Vec<ChannelConfig>,
    /// What to create on an empty data directory.
    #[serde(default)]
    pub bootstrap: Option<BootstrapConfig>,
    /// Circuit-breaker settings of every channel.
    #[serde(default)]
    pub health: crate::health::HealthConfig,
    /// Settings per public model.
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
    /// Trace export.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// `[telemetry]`: OpenTelemetry trace export, off unless an endpoint is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP (protobuf) traces endpoint, e.g. `http://127.0.0.1:4318/v1/traces`.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// How often batched spans are sent, in milliseconds.
    pub export_interval_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "tollgate".to_owned(),
            export_interval_ms: 5_000,
        }
    }
}

/// `[models."<public name>"]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Served instead when every route to this model fails (degradation). The record marks it and
    /// the response carries `x-tollgate-degraded`.
    pub fallback: Option<String>,
    /// The most output tokens the model writes in one answer: a request without its own cap is
    /// held for this many (default [`DEFAULT_MAX_OUTPUT_TOKENS`]), and a cap the host puts in the
    /// upstream request for a tenant near its floor never exceeds it.
    pub max_output_tokens: Option<u64>,
    /// The model's context window in tokens: the prompt bound a hold rests on never exceeds it
    /// (an upstream refuses a longer prompt). None: no cap.
    pub max_input_tokens: Option<u64>,
}

/// Output tokens held for a request without a cap to a model without `max_output_tokens`.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 32_768;

/// The token limits of one public model, as the hold uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelLimits {
    /// See [`ModelConfig::max_output_tokens`].
    pub max_output_tokens: u64,
    /// See [`ModelConfig::max_input_tokens`].
    pub max_input_tokens: Option<u64>,
}

impl ModelConfig {
    /// This model's limits, with the defaults filled in.
    pub fn limits(&self) -> ModelLimits {
        ModelLimits {
            max_output_tokens: self.max_output_tokens.unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS),
            max_input_tokens: self.max_input_tokens,
        }
    }
}

impl Default for ModelLimits {
    fn default() -> Self {
        Self {
            max_output_tokens: DEFAULT_MAX_OUTPUT_TOKENS,
            max_input_tokens: None,
        }
    }
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on (fixed name). Port 0 picks a free port; the log says which.
    pub listen: SocketAddr,
    /// Where sled and the compiled-plugin cache live (fixed name).
    pub data_dir: PathBuf,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest upstream answer read whole (non-stream and error answers), in bytes.
    pub max_upstream_body_bytes: usize,
    /// No new upstream attempt (retry or failover) starts later than this after the request
    /// arrived, in milliseconds.
    pub failover_budget_ms: u64,
    /// Usage records older than this many days are removed, hourly (their charges stay in the
    /// books); none: kept until removed by an operator.
    pub ledger_retention_days: Option<u64>,
    /// Threads serving requests; none: one per CPU. Each runs its own single-threaded runtime,
    /// listener socket (`SO_REUSEPORT`: the kernel spreads connections over them) and upstream
    /// connections, so a request's tasks never cross threads.
    pub workers: Option<std::num::NonZeroUsize>,
    /// A client that has not sent a whole request head this long after its connection opened (or
    /// after its previous request, on a kept-alive connection) is disconnected, in milliseconds:
    /// a client that trickles headers, or sends none, cannot hold a connection open for ever.
    pub header_read_timeout_ms: std::num::NonZeroU64,
    /// How the ledger log reaches the disk: `"none"` (written to the operating system at commit;
    /// a machine that loses power loses what it had not written out) or `"batch"` (commits that
    /// arrive together share one `fdatasync` before their answers go out).
    pub ledger_sync: LedgerSync,
    /// A request body must have arrived this long after its request head, in milliseconds,
    /// extended by one second per `body_min_bytes_per_second` bytes received; past it the request
    /// is answered 408 and its connection closed.
    pub body_read_timeout_ms: std::num::NonZeroU64,
    /// The slowest a request body may arrive, in bytes a second, averaged from its start (see
    /// `body_read_timeout_ms`); 0: the body has `body_read_timeout_ms` in all.
    pub body_min_bytes_per_second: u64,
    /// Connections on which no request has authenticated yet, at most; at the cap the oldest of
    /// them is closed. Idle or trickling connections without a key cannot exhaust descriptors.
    pub max_unauthenticated_connections: std::num::NonZeroUsize,
    /// Failed authentications (API key or admin token) one client address may make a second,
    /// on average, before its further failures are answered 429 with `retry-after: 10` for ten
    /// seconds. IPv6 addresses count by their /64. A valid credential is never refused.
    pub failed_auth_per_second: std::num::NonZeroU32,
    /// Where the admin API and `/metrics` listen instead of `listen`; none: on `listen`.
    pub admin_listen: Option<SocketAddr>,
    /// A bearer token that opens `/metrics` (and nothing else), for a scraper that should not
    /// hold the admin token; the admin token opens it too.
    pub metrics_token: Option<crate::secrets::Redacted>,
}

impl ServerConfig {
    /// The number of serving threads.
    pub fn worker_count(&self) -> usize {
        self.workers.map_or_else(
            || std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            std::num::NonZeroUsize::get,
        )
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            max_body_bytes: 8 << 20,
            max_upstream_body_bytes: 32 << 20,
            failover_budget_ms: 60_000,
            ledger_retention_days: None,
            workers: None,
            header_read_timeout_ms: std::num::NonZeroU64::new(30_000).expect("30,000 is not zero"),
            ledger_sync: LedgerSync::default(),
            body_read_timeout_ms: std::num::NonZeroU64::new(10_000).expect("10,000 is not zero"),
            body_min_bytes_per_second: 8_192,
            max_unauthenticated_connections: std::num::NonZeroUsize::new(4_096)
                .expect("4,096 is not zero"),
            failed_auth_per_second: std::num::NonZeroU32::new(20).expect("20 is not zero"),
            admin_listen: None,
            metrics_token: None,
        }
    }
}

/// `[plugins]`: the engine-wide sandbox settings and the defaults of every binding.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Plugin instances alive at once: concurrent calls plus open streams, plus up to a sixteenth
    /// of it each for instances made ahead of their calls and for stores waiting to be dropped,
    /// plus a thirty-second (2 to 32) only pricing may use.
    pub max_instances: u32,
    /// Largest memory any plugin may be given, in MiB (reserved per pool slot).
    pub max_memory_mib: usize,
    /// Default per-call deadline: the plugin's own running time, in milliseconds (5 ms granularity).
    pub deadline_ms: u64,
    /// Default memory cap per instance, in MiB.
    pub memory_mib: usize,
    /// Default cap on what one plugin call may return, in KiB.
    pub max_output_kib: usize,
    /// Largest plugin the admin API accepts, in MiB.
    pub max_upload_mib: usize,
    /// Each tenant's open streams, at most (each holds a plugin instance for its life); none: a
    /// fair share of the instances calls and streams may hold (most of `max_instances`): nine
    /// tenths split between the tenants with streams open, a tenth kept for tenants with none.
    /// Past it a stream request gets 429 `rate_limit_exceeded` with `retry-after`.
    pub max_streams_per_tenant: Option<u32>,
    /// Each tenant's plugin instances held at once by its calls and streams, at most; none: the
    /// same fair share as streams. Past it the call's request gets 429 `rate_limit_exceeded` with
    /// `retry-after`.
    pub max_instances_per_tenant: Option<u32>,
    /// Where compiled plugins are cached (default: `<data_dir>/plugin-cache`). Artifacts are keyed
    /// by plugin hash and engine build, so several gateways may share one directory.
    pub cache_dir: Option<PathBuf>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            max_instances: 1000,
            max_memory_mib: 256,
            deadline_ms: 250,
            memory_mib: 64,
            max_output_kib: 8 << 10,
            max_upload_mib: 32,
            max_streams_per_tenant: None,
            max_instances_per_tenant: None,
            cache_dir: None,
        }
    }
}

/// `[bindings]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BindingsConfig {
    /// The router every tenant uses.
    pub router: BindingConfig,
    /// The billing plugin every tenant uses.
    pub billing: BindingConfig,
    /// Translators by protocol name; a protocol without an entry uses the shipped plugin of that name.
    pub translators: BTreeMap<String, BindingConfig>,
}

impl Default for BindingsConfig {
    fn default() -> Self {
        Self {
            router: BindingConfig::shipped("failover"),
            billing: BindingConfig::shipped("price-table"),
            translators: BTreeMap::new(),
        }
    }
}

/// One binding: a plugin, its configuration and its limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingConfig {
    /// A shipped plugin's name (`failover`, `openai`, `price-table`) or a path to a `.wasm` component.
    pub plugin: String,
    /// The plugin's configuration, handed to it as JSON.
    #[serde(default = "empty_table")]
    pub config: toml::Value,
    /// Per-call deadline, in milliseconds (default: `plugins.deadline_ms`).
    pub deadline_ms: Option<u64>,
    /// Memory cap, in MiB (default: `plugins.memory_mib`).
    pub memory_mib: Option<usize>,
    /// Cap on one call's output, in KiB (default: `plugins.max_output_kib`).
    pub max_output_kib: Option<usize>,
}

fn empty_table() -> toml::Value {
    toml::Value::Table(toml::Table::new())
}

impl BindingConfig {
    /// The shipped plugin of that name with its defaults.
    pub fn shipped(name: &str) -> Self {
        Self {
            plugin: name.to_owned(),
            config: empty_table(),
            deadline_ms: None,
            memory_mib: None,
            max_output_kib: None,
        }
    }

    /// The plugin's configuration as JSON text.
    pub fn config_json(&self) -> String {
        serde_json::to_string(&self.config).unwrap_or_else(|_| "{}".to_owned())
    }

    /// Where the component comes from: a file when the name ends in `.wasm`, else a shipped plugin.
    pub fn file(&self, config_dir: &Path) -> Option<PathBuf> {
        self.plugin
            .ends_with(".wasm")
            .then(|| config_dir.join(&self.plugin))
    }
}

/// `[[channels]]`: one upstream. Channels created through the admin API have the same fields (and
/// their keys sealed in the store instead of `api_key_env`).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// Unique channel name (fixed).
    pub name: String,
    /// The protocol, i.e. the translator that speaks to it (fixed).
    pub protocol: String,
    /// Base URL the translator's paths are appended to (fixed).
    pub base_url: String,
    /// Names of environment variables holding the key pool (fixed); never the secret itself.
    /// A channel that lists variables but finds none set is inactive. An empty list means the
    /// upstream needs no key.
    #[serde(default)]
    pub api_key_env: Vec<String>,
    /// Lower is tried first by the failover router (fixed).
    #[serde(default)]
    pub priority: u32,
    /// Weight for weighted routers.
    #[serde(default = "one")]
    pub weight: u32,
    /// Public model name → upstream model name (fixed).
    #[serde(default)]
    pub models: BTreeMap<String, String>,
    /// This channel's prices by public model name, for cost-aware routers (billing has its own).
    #[serde(default)]
    pub prices: BTreeMap<String, ChannelPrice>,
    /// Protocol options handed to the translator as JSON (e.g. an API version).
    #[serde(default = "empty_table")]
    pub options: toml::Value,
    /// Label shown in logs and `/v1/models` owners, e.g. to mark a simulated upstream.
    #[serde(default)]
    pub label: Option<String>,
    /// A PEM file of root certificates this channel trusts beside the built-in web roots: the
    /// CA of a private upstream (a self-hosted model server behind an internal CA). Read when the
    /// channel is loaded; a relative path is read from the configuration file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Timeout to establish the connection, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Timeout until the upstream's response headers (and, for streams, first event), in ms.
    #[serde(default = "default_first_byte_timeout_ms")]
    pub first_byte_timeout_ms: u64,
    /// Per public model overrides of `first_byte_timeout_ms` (reasoning models think for minutes).
    #[serde(default)]
    pub model_first_byte_timeout_ms: BTreeMap<String, u64>,
    /// Longest gap between two stream events, in milliseconds.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Timeout for a whole non-stream call, in milliseconds.
    #[serde(default = "default_total_timeout_ms")]
    pub total_timeout_ms: u64,
    /// Retries on this channel after a failure of its own (connection, timeout, 5xx, overload)
    /// before the next channel of the plan, with exponential backoff and jitter.
    #[serde(default)]
    pub retries: u32,
    /// First retry's backoff, in milliseconds; doubled on each further retry.
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
}

/// What a channel charges for a model, in micro-units per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelPrice {
    /// Per million prompt tokens.
    pub input: u64,
    /// Per million generated tokens.
    pub output: u64,
}

fn one() -> u32 {
    1
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_first_byte_timeout_ms() -> u64 {
    60_000
}
fn default_idle_timeout_ms() -> u64 {
    60_000
}
fn default_total_timeout_ms() -> u64 {
    600_000
}
fn default_retry_backoff_ms() -> u64 {
    100
}

/// `[bootstrap]`: on a data directory with no tenant, create this tenant, credit it and print a key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapConfig {
    /// Tenant name.
    pub tenant: String,
    /// Opening balance in micro-units.
    #[serde(default)]
    pub balance_micros: u64,
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("invalid configuration in {origin}")]
    Parse {
        /// The file, or `embedded default`.
        origin: String,
        /// The parser's message.
        #[source]
        source: toml::de::Error,
    },
    /// Two channels share a name.
    #[error("two channels are named `{0}`")]
    DuplicateChannel(String),
}

impl Config {
    /// Reads a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Self::parse(&text, &path.display().to_string())?;
        // Found beside the file, as plugin files are, whatever directory the gateway runs in.
        if let Some(dir) = path.parent() {
            for channel in &mut config.channels {
                if let Some(ca_file) = &mut channel.ca_file {
                    *ca_file = dir.join(&*ca_file);
                }
            }
        }
        Ok(config)
    }

    /// Parses configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            origin: origin.to_owned(),
            source,
        })?;
        let mut names = std::collections::BTreeSet::new();
        for channel in &config.channels {
            if !names.insert(channel.name.as_str()) {
                return Err(ConfigError::DuplicateChannel(channel.name.clone()));
            }
        }
        Ok(config)
    }
}

/// How the ledger log reaches the disk (`server.ledger_sync`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerSync {
    /// Written to the operating system at commit, never synced by the gateway: a killed gateway
    /// loses nothing, a machine that loses power loses what the system had not written out.
    #[default]
    None,
    /// Commits that arrive together share one `fdatasync` before their answers go out.
    Batch,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_head_timeout_defaults_to_30_s_and_refuses_zero() {
        let default = Config::parse("", "test").expect("an empty file is the defaults");
        assert_eq!(default.server.header_read_timeout_ms.get(), 30_000);
        let set = Config::parse("[server]\nheader_read_timeout_ms = 250\n", "test")
            .expect("a positive timeout parses");
        assert_eq!(set.server.header_read_timeout_ms.get(), 250);
        let Err(ConfigError::Parse { source, .. }) =
            Config::parse("[server]\nheader_read_timeout_ms = 0\n", "test")
        else {
            panic!("a zero timeout must be refused");
        };
        assert!(
            source.to_string().contains("header_read_timeout_ms"),
            "the error names the key: {source}"
        );
    }

    /// The fields of every configuration struct in `source` (those deriving `Deserialize`).
    fn configuration_fields(source: &str) -> Vec<String> {
        let mut fields = Vec::new();
        let mut in_config_struct = false;
        let mut deserialized = false;
        for line in source.lines() {
            if line.starts_with("#[derive(") {
                deserialized = line.contains("Deserialize");
            } else if line.starts_with("pub struct ") && line.ends_with('{') {
                in_config_struct = deserialized;
            } else if line.starts_with('}') {
                in_config_struct = false;
            } else if in_config_struct
                && let Some(field) = line.strip_prefix("    pub ")
                && let Some((name, _)) = field.split_once(':')
            {
                fields.push(name.to_owned());
            }
        }
        fields
    }

    #[test]
    fn every_configuration_key_is_documented() {
        let documented = include_str!("../../docs/configuration.md");
        let spans: Vec<&str> = documented.split('`').skip(1).step_by(2).collect();
        let fields: Vec<String> = [include_str!("config.rs"), include_str!("health.rs")]
            .into_iter()
            .flat_map(configuration_fields)
            .collect();
        assert!(fields.len() > 50, "the fields were found: {fields:?}");
        let missing: Vec<&String> = fields
            .iter()
            .filter(|field| {
                !spans.iter().any(|span| {
                    span.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .any(|word| word == field.as_str())
                })
            })
            .collect();
        assert!(
            missing.is_empty(),
            "docs/configuration.md lacks {missing:?}"
        );
    }
}
