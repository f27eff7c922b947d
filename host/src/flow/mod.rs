//! The request flow: the stages in order, and the per-request state they share.
//!
//! ```text
//! listen → auth → route → bill::authorize → for each planned attempt:
//!     translate request → upstream → translate answer | stream   (failover on retryable errors
//!                                                                  until a byte reached the client)
//! → bill::charge → record
//! ```

mod attempt;
mod count_tokens;
mod settle;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::health::Admission;
use crate::metrics::{ChannelLabels, Metrics, ModelLabels, RequestLabels, TokenLabels};
use crate::plugin;
use crate::plugin::billing::CallOutcome;
use crate::plugin::translator::Usage;
use crate::stages::bill::{self, Priced};
use crate::stages::context::RequestContext;
use crate::stages::limit;
use crate::stages::record;
use crate::stages::route;
use crate::stages::stream;
use crate::stages::translate;
use crate::store::{Durable, UsageRecord};

use self::attempt::{PlanFailure, run_plan};
use self::settle::{Unsettled, carry_stream};

pub use self::count_tokens::count_tokens;
pub use self::settle::recover;

/// What an attempt produced.
enum Reply {
    /// A whole answer in the client's protocol; pricing and recording follow.
    Whole(translate::Answer),
    /// A stream whose first content has arrived; pumping, pricing and recording follow.
    Streaming(Box<stream::OpenStream>),
}

/// A successful attempt with its health bookkeeping, which ends when the answer does.
struct Answered {
    reply: Reply,
    admission: Admission,
    started: Instant,
    ttfb: Duration,
}

/// What the client gets on success.
pub enum Delivery {
    /// A whole JSON body.
    Json(String),
    /// SSE frames as they are produced; the sender side ends with `[DONE]` or an error event.
    Stream(mpsc::Receiver<Bytes>),
}

/// Which route answered, for the `x-tollgate-*` response headers.
#[derive(Debug, Clone)]
pub struct Served {
    /// The channel that answered.
    pub channel: String,
    /// The model the upstream reported (whole answers), else the upstream model asked for.
    pub model: String,
    /// Attempts made, the answering one included.
    pub attempts: usize,
    /// The fallback model that served, when the asked one was down.
    pub degraded_to: Option<String>,
}

/// Runs a chat-completions or embeddings request through every stage. Failures are recorded
/// before they are returned, so the ledger holds one record per authenticated request; a request
/// the client abandons is settled by [`Unsettled`].
pub async fn run(
    gateway: Arc<Gateway>,
    context: RequestContext,
) -> Result<(Delivery, Served), ApiError> {
    let mut unsettled = Unsettled::new(gateway.clone(), context);
    let context = unsettled.context();
    let tenant = Arc::from(context.caller.tenant.as_str());
    let answered = match plugin::serving(tenant, deliver(&gateway, context)).await {
        Ok(answered) => answered,
        Err(error) => {
            let usage = zero_usage();
            let status = error.status_code();
            let durable = finish(
                &gateway,
                context,
                &usage,
                &Priced::default(),
                status,
                Some(error.class()),
            );
            unsettled.settled();
            durable.wait().await;
            return Err(error);
        }
    };
    let served = Served {
        channel: context.served_channel.clone().unwrap_or_default(),
        model: context
            .served_model
            .clone()
            .or_else(|| context.routed_model.clone())
            .unwrap_or_default(),
        attempts: context.attempts.len(),
        degraded_to: context
            .degraded_from
            .as_ref()
            .map(|_| context.request.model.clone()),
    };
    let Answered {
        reply,
        admission,
        started,
        ttfb,
    } = answered;
    gateway.metrics.gateway_overhead.observe(
        context
            .received_at
            .elapsed()
            .saturating_sub(context.upstream_wait)
            .as_secs_f64(),
    );
    match reply {
        Reply::Whole(answer) => {
            admission.succeeded(started.elapsed(), ttfb);
            unsettled.usage = Some(answer.usage);
            let context = unsettled.context();
            let priced = bill::charge(context, &answer.usage, CallOutcome::Complete).await;
            let durable = finish(&gateway, context, &answer.usage, &priced, 200, None);
            unsettled.settled();
            // The ledger commit stays before the answer (with `ledger_sync = "batch"`, its sync).
            durable.wait().await;
            Ok((Delivery::Json(answer.body), served))
        }
        Reply::Streaming(open) => {
            let mut context = unsettled.hand_over();
            // The client's own body served the attempts. A stream keeps its context until it
            // ends, and the prompt settling may have to count is `request.body`: one copy of a
            // long context per open stream is enough.
            if let Some(inbound) = context.inbound.as_mut() {
                inbound.body = String::new();
            }
            let (sender, receiver) = mpsc::channel(32);
            tokio::spawn(
                carry_stream(gateway, context, open, sender, admission, started, ttfb)
                    .in_current_span(),
            );
            Ok((Delivery::Stream(receiver), served))
        }
    }
}

fn zero_usage() -> Usage {
    Usage {
        input_tokens: 0,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        output_tokens: 0,
        reasoning_tokens: 0,
        estimated: false,
    }
}

async fn deliver(gateway: &Gateway, context: &mut RequestContext) -> Result<Answered, ApiError> {
    context.permit = Some(limit::admit(
        &gateway.limiter,
        &context.caller,
        &context.request,
    )?);
    let plan = route::plan(&gateway.channels(), context).await?;
    let limits = gateway.model_limits(&context.request.model);
    let grant = bill::authorize(gateway.store.as_ref(), limits, context).await?;
    if let Some(cap) = grant.upstream_cap {
        context.request.cap_output(cap);
    }
    context.grant = Some(grant);
    let deadline = context.received_at + gateway.failover_budget;
    let fallback = gateway.fallbacks.get(&context.request.model).cloned();
    let last_error = match run_plan(gateway, context, &plan, deadline, fallback.is_some()).await {
        Ok(answered) => return Ok(answered),
        Err(PlanFailure::Fatal(error)) => return Err(error),
        Err(PlanFailure::Failed(error)) => error,
    };
    // Degradation: every channel of the asked model failed; its configured fallback may serve.
    if let Some(fallback) = fallback
        && Instant::now() < deadline
    {
        tracing::warn!(model = %context.request.model, %fallback, "every route failed; degrading");
        context.degraded_from = Some(std::mem::replace(&mut context.request.model, fallback));
        let plan = route::plan(&gateway.channels(), context).await?;
        return match run_plan(gateway, context, &plan, deadline, false).await {
            Ok(answered) => Ok(answered),
            Err(PlanFailure::Fatal(error)) => Err(error),
            Err(PlanFailure::Failed(error)) => Err(error.into()),
        };
    }
    Err(last_error.into())
}

/// Writes the request's usage record; what it returns resolves once the record is durable. A
/// failed write is logged loudly: the answer goes out anyway.
fn finish(
    gateway: &Gateway,
    context: &mut RequestContext,
    usage: &Usage,
    priced: &Priced,
    status: u16,
    class: Option<&str>,
) -> Durable {
    if let Some(failure) = &priced.failure {
        tracing::error!(
            failure,
            "the call could not be priced; recorded as unpriced"
        );
    }
    if let Some(permit) = context.permit.as_mut() {
        permit.settle_tokens(usage.input_tokens + usage.output_tokens);
    }
    if let Some(trace) = &priced.trace
        && !context.plugins.contains(trace)
    {
        context.plugins.push(trace.clone());
    }
    let usage_record = record::usage_record(context, usage, priced, status, class);
    observe(
        &gateway.metrics,
        &usage_record,
        context.received_at.elapsed(),
    );
    let hold_id = context.grant.as_ref().map(|grant| grant.hold_id.clone());
    record::commit(&gateway.ledger, usage_record, hold_id).unwrap_or_else(|error| {
            tracing::error!(error = %error, source = ?std::error::Error::source(&error), "usage record lost");
            Durable::now()
        })
}

/// Counts a finished request in the metrics. `elapsed` is its duration at full precision (the
/// record keeps whole milliseconds, too coarse for a gateway's sub-millisecond figures).
fn observe(metrics: &Metrics, record: &UsageRecord, elapsed: Duration) {
    metrics
        .requests
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
    metrics
        .request_duration
        .get_or_create(&model)
        .observe(elapsed.as_secs_f64());
    if let Some(cost) = record.cost_picos {
        metrics.cost_picos.get_or_create(&model).inc_by(cost);
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
            metrics
                .tokens
                .get_or_create(&TokenLabels {
                    tenant: record.tenant.clone(),
                    model: record.model_asked.clone(),
                    kind,
                })
                .inc_by(tokens);
        }
    }
    if record.model_mismatch {
        metrics
            .model_mismatches
            .get_or_create(&ChannelLabels {
                channel: record.channel.clone(),
            })
            .inc();
    }
}
