//! `tier-router`: routes by the caller's tier, sent as the `x-tollgate-tier` header. `premium`
//! requests go to the best model first (the channel whose model costs the most per output token),
//! `free` requests to the cheapest healthy channel; both fail over through the rest. Channels with
//! an open circuit go last either way. A request without the header gets `default_tier`.

use serde::Deserialize;
use tollgate_plugin_sdk::export_router;
use tollgate_plugin_sdk::host::{config, parse_config};
use tollgate_plugin_sdk::router::{
    Attempt, Candidate, Channel, RequestFacts, RouteError, Router, plan_by,
};

/// The configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Settings {
    /// The tier of a request without the header.
    default_tier: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            default_tier: "free".to_owned(),
        }
    }
}

/// The router.
struct TierRouter;

impl Router for TierRouter {
    fn validate_config(config: &str) -> Result<(), String> {
        let settings = parse_config::<Settings>(config)?;
        tier_order(&settings.default_tier).map(|_| ())
    }

    fn plan(facts: RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
        let settings = config::<Settings>().map_err(RouteError::Refused)?;
        plan(&facts, channels, &settings)
    }
}

export_router!(TierRouter);

/// Whether a tier wants the most expensive model first (`premium`) or the cheapest (`free`).
fn tier_order(tier: &str) -> Result<bool, String> {
    match tier {
        "premium" => Ok(true),
        "free" => Ok(false),
        other => Err(format!("unknown tier `{other}`: use `premium` or `free`")),
    }
}

fn plan(
    facts: &RequestFacts,
    channels: Vec<Channel>,
    settings: &Settings,
) -> Result<Vec<Attempt>, RouteError> {
    let tier = facts
        .tags
        .iter()
        .find(|(name, _)| name == "tier")
        .map_or(settings.default_tier.as_str(), |(_, value)| value.as_str());
    let premium = tier_order(tier).map_err(RouteError::Refused)?;
    plan_by(facts, channels, |candidate: &Candidate| {
        let price = candidate
            .model
            .price_per_million_output_micros
            .unwrap_or(u64::MAX);
        // `plan_by` puts open circuits last and breaks ties by priority.
        if premium { u64::MAX - price } else { price }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_plugin_sdk::router::Circuit;
    use tollgate_plugin_sdk::router::testing::{channel, facts};

    fn priced(name: &str, output_price: u64) -> Channel {
        let mut channel = channel(name, "chat");
        channel.models[0].price_per_million_output_micros = Some(output_price);
        channel
    }

    fn tiered(tier: &str) -> RequestFacts {
        let mut facts = facts("chat");
        facts.tags.push(("tier".into(), tier.into()));
        facts
    }

    fn order(plan: Result<Vec<Attempt>, RouteError>) -> Vec<String> {
        plan.expect("a plan")
            .into_iter()
            .map(|attempt| attempt.channel)
            .collect()
    }

    #[test]
    fn premium_gets_the_best_model_and_free_the_cheapest_healthy_one() {
        let channels = || {
            vec![
                priced("cheap", 100),
                priced("best", 900),
                priced("mid", 500),
            ]
        };
        let settings = Settings::default();
        assert_eq!(
            order(plan(&tiered("premium"), channels(), &settings)),
            ["best", "mid", "cheap"]
        );
        assert_eq!(
            order(plan(&tiered("free"), channels(), &settings)),
            ["cheap", "mid", "best"]
        );
        assert_eq!(
            order(plan(&facts("chat"), channels(), &settings)),
            ["cheap", "mid", "best"]
        );

        let mut broken = channels();
        broken[0].circuit = Circuit::Open;
        assert_eq!(
            order(plan(&tiered("free"), broken, &settings)),
            ["mid", "best", "cheap"]
        );
    }

    #[test]
    fn an_unknown_tier_is_refused_by_name() {
        let refused = plan(
            &tiered("gold"),
            vec![priced("cheap", 1)],
            &Settings::default(),
        );
        assert!(matches!(refused, Err(RouteError::Refused(message)) if message.contains("gold")));
        assert!(TierRouter::validate_config(r#"{"default_tier":"gold"}"#).is_err());
        assert!(TierRouter::validate_config(r#"{"default_tier":"premium"}"#).is_ok());
    }
}
