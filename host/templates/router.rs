//! {{name}}: a Tollgate router. `plan` orders the channels a request tries; that order is the
//! failover chain. The host gives each call a fresh instance: keep no state between calls.

use serde::Deserialize;
use tollgate_plugin_sdk::export_router;
use tollgate_plugin_sdk::host::{config, parse_config};
use tollgate_plugin_sdk::router::{
    Attempt, Candidate, Channel, RequestFacts, RouteError, Router, plan_by,
};

/// The configuration an operator binds the plugin with (JSON).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Settings {
    /// Channels to try only after every other one.
    last_resort: Vec<String>,
}

/// The router.
struct Plugin;

impl Router for Plugin {
    fn validate_config(config: &str) -> Result<(), String> {
        parse_config::<Settings>(config).map(|_| ())
    }

    fn plan(facts: RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
        let settings = config::<Settings>().map_err(RouteError::Refused)?;
        // Lowest key first: not last-resort, then fewer recent errors, then the operator's priority.
        plan_by(&facts, channels, |candidate: &Candidate| {
            (
                settings.last_resort.contains(&candidate.channel.name),
                candidate.channel.error_rate_permille,
                candidate.channel.priority,
            )
        })
    }
}

export_router!(Plugin);

// `cargo test` runs these natively: the SDK stands in for the host (`host::testing`).
#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_plugin_sdk::host::testing::set_config;
    use tollgate_plugin_sdk::router::testing::{channel, facts};

    fn order(attempts: &[Attempt]) -> Vec<&str> {
        attempts.iter().map(|attempt| attempt.channel.as_str()).collect()
    }

    #[test]
    fn last_resort_channels_go_last() {
        set_config(r#"{"last_resort": ["first"]}"#);
        let channels = vec![channel("first", "test-model"), channel("second", "test-model")];
        let plan = Plugin::plan(facts("test-model"), channels).expect("a plan");
        assert_eq!(order(&plan), ["second", "first"]);
    }

    #[test]
    fn channels_not_serving_the_model_are_left_out() {
        let channels = vec![channel("other", "other-model"), channel("serving", "test-model")];
        let plan = Plugin::plan(facts("test-model"), channels).expect("a plan");
        assert_eq!(order(&plan), ["serving"]);
    }

    #[test]
    fn a_misspelt_setting_is_refused_at_bind_time() {
        assert!(Plugin::validate_config(r#"{"last_resrot": []}"#).is_err());
    }
}
