//! What the host gives a plugin: log lines, the clock and the plugin's own configuration.

use crate::wit::router::tollgate::plugin::host as imports;
pub use imports::LogLevel;

/// Writes a log line into the gateway's log, inside the current request's span.
/// Never log prompts, completions or secrets.
pub fn log(level: LogLevel, message: &str) {
    imports::log(level, message);
}

/// Logs at debug level.
pub fn debug(message: &str) {
    log(LogLevel::Debug, message);
}

/// Logs at warn level.
pub fn warn(message: &str) {
    log(LogLevel::Warn, message);
}

/// Milliseconds since the Unix epoch, read by the host (plugins have no clock of their own).
pub fn now_unix_ms() -> u64 {
    imports::now_unix_ms()
}

/// The plugin's configuration JSON text as the operator bound it (`{}` when none).
pub fn config_json() -> String {
    imports::config()
}

/// The plugin's configuration parsed into `T`.
///
/// The host accepted this configuration through `validate_config` at bind time, so a parse error here
/// means the plugin's own `validate_config` accepts what `T` rejects: keep the two on one type.
pub fn config<T: serde::de::DeserializeOwned>() -> Result<T, String> {
    parse_config(&config_json())
}

/// Parses configuration text into `T`, with a message fit for an operator. Use it in `validate_config`
/// so validation and use share one definition.
pub fn parse_config<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, String> {
    serde_json::from_str(json).map_err(|error| format!("invalid plugin configuration: {error}"))
}
