//! Router `cost-first`: the cheapest channel first. A channel's cost is its price per million
//! prompt tokens times the request's estimated prompt, plus its price per million output tokens
//! times the output cap (or `assumed_output_tokens`); channels without prices go after priced
//! ones. Open circuits last; ties by priority.

use serde::Deserialize;
use tollgate_plugin_sdk::export_router;
use tollgate_plugin_sdk::host::{config, parse_config};
use tollgate_plugin_sdk::router::{
    Attempt, Candidate, Channel, RequestFacts, RouteError, Router, plan_by,
};

/// The plugin's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct CostFirstConfig {
    /// Output tokens assumed when the client sets no cap.
    assumed_output_tokens: u64,
}

impl Default for CostFirstConfig {
    fn default() -> Self {
        Self {
            assumed_output_tokens: 500,
        }
    }
}

/// The router.
struct CostFirst;

impl Router for CostFirst {
    fn validate_config(config: &str) -> Result<(), String> {
        parse_config::<CostFirstConfig>(config).map(|_| ())
    }

    fn plan(facts: RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
        let settings = config::<CostFirstConfig>().map_err(RouteError::Refused)?;
        plan(&facts, channels, &settings)
    }
}

export_router!(CostFirst);

fn plan(
    facts: &RequestFacts,
    channels: Vec<Channel>,
    config: &CostFirstConfig,
) -> Result<Vec<Attempt>, RouteError> {
    let output_tokens = facts
        .max_output_tokens
        .unwrap_or(config.assumed_output_tokens);
    plan_by(facts, channels, |candidate: &Candidate| {
        let model = &candidate.model;
        match (
            model.price_per_million_input_micros,
            model.price_per_million_output_micros,
        ) {
            (Some(input), Some(output)) => {
                u128::from(input) * u128::from(facts.estimated_input_tokens)
                    + u128::from(output) * u128::from(output_tokens)
            }
            _ => u128::MAX,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_plugin_sdk::router::Circuit;
    use tollgate_plugin_sdk::router::testing::{channel, facts};

    fn priced(name: &str, input: u64, output: u64) -> Channel {
        let mut channel = channel(name, "m");
        channel.models[0].price_per_million_input_micros = Some(input);
        channel.models[0].price_per_million_output_micros = Some(output);
        channel
    }

    fn order(attempts: &[Attempt]) -> Vec<&str> {
        attempts
            .iter()
            .map(|attempt| attempt.channel.as_str())
            .collect()
    }

    #[test]
    fn cheapest_first_unpriced_and_open_last() {
        let mut open_cheap = priced("open-cheap", 1, 1);
        open_cheap.circuit = Circuit::Open;
        let channels = vec![
            channel("unpriced", "m"),
            priced("dear", 3_000_000, 15_000_000),
            open_cheap,
            priced("cheap", 150_000, 600_000),
        ];
        let plan = plan(&facts("m"), channels, &CostFirstConfig::default()).unwrap();
        assert_eq!(order(&plan), ["cheap", "dear", "unpriced", "open-cheap"]);
    }

    #[test]
    fn the_output_cap_can_change_the_winner() {
        // Cheap prompts but dear output against the reverse.
        let channels = vec![
            priced("cheap-in", 100, 10_000),
            priced("cheap-out", 1_000, 1_000),
        ];
        let mut long_answer = facts("m");
        long_answer.max_output_tokens = Some(10_000);
        let long = plan(&long_answer, channels.clone(), &CostFirstConfig::default()).unwrap();
        assert_eq!(order(&long)[0], "cheap-out");
        let mut short_answer = facts("m");
        short_answer.estimated_input_tokens = 100_000;
        short_answer.max_output_tokens = Some(1);
        let short = plan(&short_answer, channels, &CostFirstConfig::default()).unwrap();
        assert_eq!(order(&short)[0], "cheap-in");
    }
}
