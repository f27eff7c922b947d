//! Router `failover`: tries the channels that serve the requested model in priority order (lower
//! first), channels with an open circuit last, so the plan is the failover chain an operator expects.

use serde::Deserialize;
use tollgate_plugin_sdk::export_router;
use tollgate_plugin_sdk::host::parse_config;
use tollgate_plugin_sdk::router::{Attempt, Channel, RequestFacts, RouteError, Router, plan_by};

/// The plugin's configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FailoverConfig {
    /// At most this many attempts per request (0: every channel that serves the model).
    max_attempts: usize,
}

/// The router.
struct Failover;

impl Router for Failover {
    fn validate_config(config: &str) -> Result<(), String> {
        parse_config::<FailoverConfig>(config).map(|_| ())
    }

    fn plan(facts: RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
        let config =
            tollgate_plugin_sdk::host::config::<FailoverConfig>().map_err(RouteError::Refused)?;
        plan(&facts, channels, &config)
    }
}

export_router!(Failover);

/// Orders the channels serving `facts.model` by priority, open circuits last.
fn plan(
    facts: &RequestFacts,
    channels: Vec<Channel>,
    config: &FailoverConfig,
) -> Result<Vec<Attempt>, RouteError> {
    let mut attempts = plan_by(facts, channels, |_| ())?;
    if config.max_attempts > 0 {
        attempts.truncate(config.max_attempts);
    }
    Ok(attempts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_plugin_sdk::router::{ChannelModel, Circuit, Operation};

    fn facts(model: &str) -> RequestFacts {
        RequestFacts {
            request_id: "r".into(),
            tenant: "t".into(),
            key_id: "k".into(),
            operation: Operation::Chat,
            model: model.into(),
            stream: false,
            estimated_input_tokens: 10,
            max_output_tokens: None,
            tags: vec![],
        }
    }

    fn channel(name: &str, priority: u32, circuit: Circuit, models: &[(&str, &str)]) -> Channel {
        Channel {
            name: name.into(),
            protocol: "openai".into(),
            models: models
                .iter()
                .map(|(public, upstream)| ChannelModel {
                    public_name: (*public).into(),
                    upstream_name: (*upstream).into(),
                    price_per_million_input_micros: None,
                    price_per_million_output_micros: None,
                    circuit: Circuit::Closed,
                })
                .collect(),
            priority,
            weight: 1,
            circuit,
            latency_ewma_ms: None,
            ttfb_ewma_ms: None,
            error_rate_permille: 0,
            in_flight: 0,
        }
    }

    #[test]
    fn orders_by_priority_with_open_circuits_last() {
        let channels = vec![
            channel("c", 3, Circuit::Closed, &[("m", "m-c")]),
            channel("a", 1, Circuit::Open, &[("m", "m-a")]),
            channel("b", 2, Circuit::Closed, &[("m", "m-b")]),
            channel("x", 0, Circuit::Closed, &[("other", "other")]),
        ];
        let plan = plan(&facts("m"), channels, &FailoverConfig::default()).expect("m is served");
        let order: Vec<_> = plan
            .iter()
            .map(|a| (a.channel.as_str(), a.upstream_model.as_str()))
            .collect();
        assert_eq!(order, [("b", "m-b"), ("c", "m-c"), ("a", "m-a")]);
    }

    #[test]
    fn unknown_model_has_no_route() {
        let channels = vec![channel("a", 1, Circuit::Closed, &[("m", "m")])];
        let error = plan(&facts("nope"), channels, &FailoverConfig::default()).unwrap_err();
        assert!(matches!(error, RouteError::NoRoute(message) if message.contains("nope")));
    }

    #[test]
    fn max_attempts_cuts_the_chain() {
        let channels = vec![
            channel("a", 1, Circuit::Closed, &[("m", "m")]),
            channel("b", 2, Circuit::Closed, &[("m", "m")]),
        ];
        let config = FailoverConfig { max_attempts: 1 };
        assert_eq!(plan(&facts("m"), channels, &config).unwrap().len(), 1);
    }
}
