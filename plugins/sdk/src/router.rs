//! The router role: order the channels a request tries.

pub use crate::types::Operation;
pub use crate::wit::router::exports::tollgate::plugin::router::{
    Attempt, Channel, ChannelModel, Circuit, RequestFacts, RouteError,
};

/// A channel that serves the requested model, with that model's entry.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The channel and its live state.
    pub channel: Channel,
    /// The channel's entry for the requested model (upstream name, prices).
    pub model: ChannelModel,
}

impl Candidate {
    /// The plan step that calls this candidate.
    pub fn attempt(&self) -> Attempt {
        Attempt {
            channel: self.channel.name.clone(),
            upstream_model: self.model.upstream_name.clone(),
        }
    }

    /// Whether the host's circuit breaker has this channel, or this model on it, open (failing;
    /// try it only after the others).
    pub fn is_open(&self) -> bool {
        self.channel.circuit == Circuit::Open || self.model.circuit == Circuit::Open
    }
}

/// The channels that serve `facts.model`, in the order given. Routers order these; the SDK keeps
/// the matching rule in one place.
pub fn candidates(facts: &RequestFacts, channels: Vec<Channel>) -> Vec<Candidate> {
    channels
        .into_iter()
        .filter_map(|channel| {
            let model = channel
                .models
                .iter()
                .find(|model| model.public_name == facts.model)?
                .clone();
            Some(Candidate { channel, model })
        })
        .collect()
}

/// The refusal for a model no channel serves (HTTP 404 `model_not_found`).
pub fn no_route(facts: &RequestFacts) -> RouteError {
    RouteError::NoRoute(format!(
        "The model `{}` does not exist or you do not have access to it.",
        facts.model
    ))
}

/// Orders candidates by a key, open circuits last, and turns them into the plan.
/// Ties keep the operator's priority, then the channel name, so plans are stable.
pub fn plan_by<K: Ord>(
    facts: &RequestFacts,
    channels: Vec<Channel>,
    key: impl Fn(&Candidate) -> K,
) -> Result<Vec<Attempt>, RouteError> {
    let mut candidates = candidates(facts, channels);
    if candidates.is_empty() {
        return Err(no_route(facts));
    }
    candidates.sort_by(|a, b| {
        (a.is_open(), key(a), a.channel.priority, &a.channel.name).cmp(&(
            b.is_open(),
            key(b),
            b.channel.priority,
            &b.channel.name,
        ))
    });
    Ok(candidates.iter().map(Candidate::attempt).collect())
}

/// A router plugin. Implement it on a unit struct and export it with [`export_router!`](crate::export_router).
pub trait Router {
    /// Checks the configuration JSON before the operator's binding takes effect. Accepts anything by default.
    fn validate_config(config: &str) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// Orders the attempts for one request: the returned list is the failover chain.
    fn plan(facts: RequestFacts, channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError>;
}

/// Exports a [`Router`] implementation as the plugin's router world.
#[macro_export]
macro_rules! export_router {
    ($router:ty) => {
        #[doc(hidden)]
        struct TollgateRouterExport;


        impl $crate::wit::router::exports::tollgate::plugin::router::Guest for TollgateRouterExport {
            fn validate_config(config: String) -> Result<(), String> {
                <$router as $crate::router::Router>::validate_config(&config)
            }

            fn plan(
                facts: $crate::router::RequestFacts,
                channels: Vec<$crate::router::Channel>,
            ) -> Result<Vec<$crate::router::Attempt>, $crate::router::RouteError> {
                <$router as $crate::router::Router>::plan(facts, channels)
            }
        }

        // Only a wasm build exports the world: a native build (for the plugin's unit tests) cannot
        // link the component-model export names, and holds the export here instead, so that the
        // plugin's own type is not dead code there.
        #[cfg(not(target_arch = "wasm32"))]
        const _: fn(String) -> Result<(), String> =
            <TollgateRouterExport as $crate::wit::router::exports::tollgate::plugin::router::Guest>::validate_config;
        #[cfg(target_arch = "wasm32")]
        $crate::wit::router::export_router_world!(TollgateRouterExport with_types_in $crate::wit::router);
    };
}

/// Builders for testing routers natively (`cargo test`), with neutral defaults to override.
pub mod testing {
    use super::{Channel, ChannelModel, Circuit, Operation, RequestFacts};

    /// Facts of a non-stream chat request for `model`.
    pub fn facts(model: &str) -> RequestFacts {
        RequestFacts {
            request_id: "test-request".into(),
            tenant: "tenant".into(),
            key_id: "key".into(),
            operation: Operation::Chat,
            model: model.into(),
            stream: false,
            estimated_input_tokens: 10,
            max_output_tokens: None,
            tags: Vec::new(),
        }
    }

    /// A healthy channel `name` serving `model` as `upstream-<model>`, priority 1, weight 1, no
    /// prices and no history.
    pub fn channel(name: &str, model: &str) -> Channel {
        Channel {
            name: name.into(),
            protocol: "openai".into(),
            models: vec![ChannelModel {
                public_name: model.into(),
                upstream_name: format!("upstream-{model}"),
                price_per_million_input_micros: None,
                price_per_million_output_micros: None,
                circuit: Circuit::Closed,
            }],
            priority: 1,
            weight: 1,
            circuit: Circuit::Closed,
            latency_ewma_ms: None,
            ttfb_ewma_ms: None,
            error_rate_permille: 0,
            in_flight: 0,
        }
    }
}
