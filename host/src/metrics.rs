//! Metrics: what `/metrics` exposes, in the OpenMetrics text format Prometheus scrapes. The flow
//! records requests, tokens, cost and attempts as they finish; circuit states are read from the
//! channels' health at scrape time; plugin call figures come from the plugin runtime.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::plugin::PluginMetrics;
use crate::plugin::router::Circuit;
use crate::store::UsageRecord;

/// Labels of a finished request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Tenant name.
    pub tenant: String,
    /// Public model asked for.
    pub model: String,
    /// Channel that answered (empty when none did).
    pub channel: String,
    /// HTTP status the client got.
    pub status: u16,
}

/// Labels of per-model figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// Tenant name.
    pub tenant: String,
    /// Public model asked for.
    pub model: String,
}

/// Labels of token counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// Tenant name.
    pub tenant: String,
    /// Public model asked for.
    pub model: String,
    /// `input`, `cache_read`, `cache_write`, `output` or `reasoning`.
    pub kind: &'static str,
}

/// Labels of upstream attempts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// Channel tried.
    pub channel: String,
    /// `ok`, or the failure class.
    pub outcome: String,
}

/// Labels of per-channel figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabels {
    /// Channel.
    pub channel: String,
}

/// Every metric of the gateway.
pub struct Metrics {
    registry: Registry,
    /// Requests by tenant, model, channel, status.
    pub requests: Family<RequestLabels, Counter>,
    /// Time from arrival to the last byte, seconds.
    pub request_duration: Family<ModelLabels, Histogram, fn() -> Histogram>,
    /// Time from arrival to the first byte sent to the client, minus the time spent waiting on
    /// upstreams: what the gateway itself adds, seconds.
    pub gateway_overhead: Histogram,
    /// Upstream time to first byte of successful attempts, seconds.
    pub upstream_ttfb: Family<ChannelLabels, Histogram, fn() -> Histogram>,
    /// Upstream attempts by channel and outcome.
    pub attempts: Family<AttemptLabels, Counter>,
    /// Duration of every upstream attempt until its answer (or first stream content, or
    /// failure), seconds.
    pub upstream_latency: Family<AttemptLabels, Histogram, fn() -> Histogram>,
    /// Tokens by tenant, model and kind.
    pub tokens: Family<TokenLabels, Counter>,
    /// Cost in picos (10^-12 currency units) by tenant and model.
    pub cost_picos: Family<ModelLabels, Counter>,
    /// Answers whose served model differs from the routed one.
    pub model_mismatches: Family<ChannelLabels, Counter>,
    /// Circuit state per channel: 0 closed, 1 half-open, 2 open.
    pub circuit: Family<ChannelLabels, Gauge>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.0, 20))
}

/// `metric`, registered under `name` (a family shares its series with its clones).
fn registered<M>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    registry.register(name, help, metric.clone());
    metric
}

/// A family of latency histograms.
fn latency_family<L>() -> Family<L, Histogram, fn() -> Histogram>
where
    L: Clone + std::hash::Hash + Eq,
{
    Family::new_with_constructor(latency_histogram)
}

/// The plugin runtime's figures, under the gateway's prefix.
fn register_plugin_metrics(registry: &mut Registry, plugins: &PluginMetrics) {
    registry.register(
        "plugin_call_duration_seconds",
        "Plugin calls, instantiation included when the call made its instance",
        plugins.calls.clone(),
    );
    registry.register(
        "plugin_failures",
        "Plugin traps, deadlines and limit hits",
        plugins.failures.clone(),
    );
    registry.register(
        "plugin_fail_opens",
        "Requests served by the global default plugin after their own failed (policy open)",
        plugins.fail_opens.clone(),
    );
    registry.register(
        "plugin_canary_rollbacks",
        "Canaries rolled back by themselves for failing too often",
        plugins.canary_rollbacks.clone(),
    );
    registry.register(
        "plugin_instances_made_ahead",
        "Plugin instances made off the request's path, before the call that used them",
        plugins.made_ahead.clone(),
    );
    registry.register(
        "plugin_instances_made_in_call",
        "Plugin instances a call made itself, none being ready",
        plugins.made_in_call.clone(),
    );
}

impl Metrics {
    /// Registers every family, the plugin runtime's included.
    pub fn new(plugins: &PluginMetrics) -> Self {
        let mut registry = Registry::with_prefix("tollgate");
        let requests = registered(
            &mut registry,
            "requests",
            "Requests answered",
            Family::default(),
        );
        let request_duration = registered(
            &mut registry,
            "request_duration_seconds",
            "Arrival to last byte",
            latency_family(),
        );
        let gateway_overhead = registered(
            &mut registry,
            "gateway_overhead_seconds",
            "Time to the client's first byte minus time waiting on upstreams",
            latency_histogram(),
        );
        let upstream_ttfb = registered(
            &mut registry,
            "upstream_ttfb_seconds",
            "Upstream time to first byte",
            latency_family(),
        );
        let attempts = registered(
            &mut registry,
            "upstream_attempts",
            "Upstream attempts by outcome",
            Family::default(),
        );
        let upstream_latency = registered(
            &mut registry,
            "upstream_latency_seconds",
            "Upstream attempts until their answer, first stream content or failure",
            latency_family(),
        );
        let tokens = registered(&mut registry, "tokens", "Tokens by kind", Family::default());
        let cost_picos = registered(
            &mut registry,
            "cost_picos",
            "Cost charged, in 10^-12 currency units",
            Family::default(),
        );
        let model_mismatches = registered(
            &mut registry,
            "model_mismatches",
            "Answers reporting another model than the route asked for",
            Family::default(),
        );
        let circuit = registered(
            &mut registry,
            "circuit_state",
            "0 closed, 1 half-open, 2 open",
            Family::default(),
        );
        register_plugin_metrics(&mut registry, plugins);
        Self {
            registry,
            requests,
            request_duration,
            gateway_overhead,
            upstream_ttfb,
            attempts,
            upstream_latency,
            tokens,
            cost_picos,
            model_mismatches,
            circuit,
        }
    }

    /// Counts a finished request. `elapsed` is its duration at full precision (the
    /// record keeps whole milliseconds, too coarse for a gateway's sub-millisecond figures).
    pub fn observe(&self, record: &UsageRecord, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                tenant: record.tenant.clone(),
                model: record.model_asked.clone(),
                channel: record.channel.clone(),
                status: record.status,
            })
            .inc();
        let model = ModelLabels {
            tenant: record.tenant.clone(),
            model: record.model_asked.clone(),
        };
        self.request_duration
            .get_or_create(&model)
            .observe(elapsed.as_secs_f64());
        if let Some(cost) = record.cost_picos {
            self.cost_picos.get_or_create(&model).inc_by(cost);
        }
        let usage = &record.usage;
        for (kind, tokens) in [
            ("input", usage.input_tokens),
            ("cache_read", usage.cache_read_tokens),
            ("cache_write", usage.cache_write_tokens),
            ("output", usage.output_tokens),
            ("reasoning", usage.reasoning_tokens),
        ] {
            if tokens > 0 {
                self.tokens
                    .get_or_create(&TokenLabels {
                        tenant: record.tenant.clone(),
                        model: record.model_asked.clone(),
                        kind,
                    })
                    .inc_by(tokens);
            }
        }
        if record.model_mismatch {
            self.model_mismatches
                .get_or_create(&ChannelLabels {
                    channel: record.channel.clone(),
                })
                .inc();
        }
    }

    /// Sets a channel's circuit gauge.
    pub fn set_circuit(&self, channel: &str, circuit: Circuit) {
        let value = match circuit {
            Circuit::Closed => 0,
            Circuit::HalfOpen => 1,
            Circuit::Open => 2,
        };
        self.circuit
            .get_or_create(&ChannelLabels {
                channel: channel.to_owned(),
            })
            .set(value);
    }

    /// The registry in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
