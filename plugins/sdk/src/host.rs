//! What the host gives a plugin: log lines, the clock and the plugin's own configuration.
//!
//! In a native build (the plugin's `cargo test`) there is no host: these functions use the
//! stand-ins of [`testing`] instead, so a test sets the configuration and the clock and reads the
//! log lines its plugin wrote.

use crate::wit::router::tollgate::plugin::host as imports;
pub use imports::LogLevel;

/// Writes a log line into the gateway's log, inside the current request's span.
/// Never log prompts, completions or secrets.
pub fn log(level: LogLevel, message: &str) {
    #[cfg(target_arch = "wasm32")]
    imports::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    testing::write_log(level, message);
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
    #[cfg(target_arch = "wasm32")]
    return imports::now_unix_ms();
    #[cfg(not(target_arch = "wasm32"))]
    return testing::now_unix_ms();
}

/// The plugin's configuration JSON text as the operator bound it (`{}` when none).
pub fn config_json() -> String {
    #[cfg(target_arch = "wasm32")]
    return imports::config();
    #[cfg(not(target_arch = "wasm32"))]
    return testing::config_json();
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

/// The host's stand-ins in a native build, for a plugin's unit tests: the configuration it was
/// bound with (`{}` until set), the clock (the machine's until set) and the log lines it wrote.
///
/// Each is per thread, and the Rust test harness runs every test on a thread of its own, so tests
/// running in parallel do not see each other's settings.
///
/// ```
/// use tollgate_plugin_sdk::host::{self, LogLevel, testing};
///
/// testing::set_config(r#"{"limit": 3}"#);
/// testing::set_now_unix_ms(1_700_000_000_000);
/// host::warn("over the limit");
/// assert_eq!(host::config_json(), r#"{"limit": 3}"#);
/// assert_eq!(host::now_unix_ms(), 1_700_000_000_000);
/// assert_eq!(testing::take_log(), [(LogLevel::Warn, "over the limit".to_owned())]);
/// ```
#[cfg(not(target_arch = "wasm32"))]
pub mod testing {
    use std::cell::RefCell;

    use super::LogLevel;

    #[derive(Default)]
    struct StandIn {
        config: Option<String>,
        now_unix_ms: Option<u64>,
        log: Vec<(LogLevel, String)>,
    }

    thread_local! {
        static HOST: RefCell<StandIn> = RefCell::default();
    }

    /// The configuration `host::config` answers from now on, as if the operator had bound the plugin
    /// with it.
    pub fn set_config(json: &str) {
        HOST.with_borrow_mut(|host| host.config = Some(json.to_owned()));
    }

    /// The time `host::now_unix_ms` answers from now on.
    pub fn set_now_unix_ms(unix_ms: u64) {
        HOST.with_borrow_mut(|host| host.now_unix_ms = Some(unix_ms));
    }

    /// The log lines written since the last call, oldest first.
    pub fn take_log() -> Vec<(LogLevel, String)> {
        HOST.with_borrow_mut(|host| std::mem::take(&mut host.log))
    }

    pub(super) fn write_log(level: LogLevel, message: &str) {
        HOST.with_borrow_mut(|host| host.log.push((level, message.to_owned())));
    }

    pub(super) fn now_unix_ms() -> u64 {
        HOST.with_borrow(|host| host.now_unix_ms)
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| {
                        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
                    })
            })
    }

    pub(super) fn config_json() -> String {
        HOST.with_borrow(|host| host.config.clone())
            .unwrap_or_else(|| "{}".to_owned())
    }
}
