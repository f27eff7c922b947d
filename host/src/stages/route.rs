//! Route: asks the router plugin which channels to try, in which order.
//!
//! In: the [`RequestContext`] (caller and request facts) and the active channels.
//! Out: a [`Plan`] — the failover chain — or a [`RouteError`]. Next: bill (authorize), then translate.

use crate::stages::context::RequestContext;
use std::sync::Arc;

use crate::channel::{Channel as GatewayChannel, ChannelSet};
use crate::plugin::PluginError;
use crate::plugin::router::{self as wit, Channel, ChannelModel, Circuit, RequestFacts};

/// One step of the plan.
#[derive(Clone)]
pub struct PlannedAttempt {
    /// The channel, from the snapshot the request routed with.
    pub channel: Arc<GatewayChannel>,
    /// The upstream model name to send.
    pub upstream_model: String,
}

/// The attempts in the order the host runs them.
#[derive(Clone, Default)]
pub struct Plan {
    /// The failover chain.
    pub attempts: Vec<PlannedAttempt>,
}

/// Why there is no plan.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// No channel serves the model (404 `model_not_found`).
    #[error("{0}")]
    NoRoute(String),
    /// The router's policy refuses the request (403).
    #[error("{0}")]
    Refused(String),
    /// The router plugin failed.
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

/// The router's view of one active channel serving `model`: that model's entry (its price and
/// circuit; the channel's other models are no business of this request) and the channel's health
/// now.
fn candidate(channel: &GatewayChannel, model: &str, now: std::time::Instant) -> Channel {
    let health = channel.health.snapshot(now);
    let models = channel
        .config
        .models
        .get_key_value(model)
        .map(|(public, upstream)| {
            let price = channel.config.prices.get(public);
            let circuit = channel
                .model_health
                .get(public)
                .map_or(Circuit::Closed, |health| health.snapshot(now).circuit);
            ChannelModel {
                public_name: public.clone(),
                upstream_name: upstream.clone(),
                price_per_million_input_micros: price.map(|price| price.input),
                price_per_million_output_micros: price.map(|price| price.output),
                circuit,
            }
        });
    Channel {
        name: channel.config.name.clone(),
        protocol: channel.config.protocol.clone(),
        models: models.into_iter().collect(),
        priority: channel.config.priority,
        weight: channel.config.weight,
        circuit: health.circuit,
        latency_ewma_ms: health.latency_ewma_ms,
        ttfb_ewma_ms: health.ttfb_ewma_ms,
        error_rate_permille: health.error_rate_permille,
        in_flight: health.in_flight,
    }
}

/// What the router sees for a request of the public `model`: the active channels serving it, found
/// through the set's index, each with their state now. However many channels and models the
/// gateway runs, a request pays only for its own model's.
pub fn candidates(channels: &ChannelSet, model: &str) -> Vec<Channel> {
    let now = std::time::Instant::now();
    channels
        .serving(model)
        .filter(|channel| channel.is_active())
        .map(|channel| candidate(channel, model, now))
        .collect()
}

/// Asks the router for the plan over the gateway's `channels` and checks it names only active
/// ones.
pub async fn plan(channels: &ChannelSet, context: &mut RequestContext) -> Result<Plan, RouteError> {
    let facts = RequestFacts {
        request_id: context.request_id.clone(),
        tenant: context.caller.tenant.clone(),
        key_id: context.caller.key_id.clone(),
        operation: context.request.operation,
        model: context.request.model.clone(),
        stream: context.request.stream,
        estimated_input_tokens: context.request.estimated_input_tokens,
        max_output_tokens: context.request.max_output_tokens,
        tags: context.tags.clone(),
    };
    let candidates = candidates(channels, &context.request.model);
    let called = context
        .router
        .call(|router| {
            let (facts, candidates) = (&facts, &candidates);
            async move { router.plan(facts, candidates).await }
        })
        .await?;
    context.plugins.push(called.trace);
    let router = called.ran;
    let attempts = match called.value {
        Ok(attempts) => attempts,
        Err(wit::RouteError::NoRoute(message)) => return Err(RouteError::NoRoute(message)),
        Err(wit::RouteError::Refused(message)) => return Err(RouteError::Refused(message)),
    };
    if attempts.is_empty() {
        return Err(RouteError::NoRoute(format!(
            "The model `{}` does not exist or you do not have access to it.",
            context.request.model
        )));
    }
    let attempts = attempts
        .into_iter()
        .map(|attempt| {
            let channel = channels
                .named(&attempt.channel)
                .filter(|channel| channel.is_active())
                .cloned()
                .ok_or_else(|| PluginError::Contract {
                    plugin: router.plugin().clone(),
                    role: crate::plugin::Role::Router,
                    detail: format!("planned unknown or inactive channel `{}`", attempt.channel),
                })?;
            Ok(PlannedAttempt {
                channel,
                upstream_model: attempt.upstream_model,
            })
        })
        .collect::<Result<Vec<_>, PluginError>>()?;
    Ok(Plan { attempts })
}
