//! The request flow: the stages in order, from the arrival listen hands over to the record.
//!
//! ```text
//! auth → read the body → inbound (another client protocol) → context → limit → route
//!   → bill::authorize → for each planned attempt:
//!       translate request → upstream → translate answer | stream   (failover on retryable
//!                                                                   errors until a byte
//!                                                                   reached the client)
//!   → bill::charge → record
//! ```

mod arrival;
mod attempt;
mod count_tokens;
mod settle;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{Instrument, Span};

use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::plugin;
use crate::plugin::billing::CallOutcome;
use crate::request;
use crate::stages::bill::{self};
use crate::stages::context::RequestContext;
use crate::stages::inbound;
use crate::stages::limit;
use crate::stages::route;

use self::attempt::{Answered, PlanFailure, Reply, run_plan};
use self::settle::{Unsettled, carry_stream, finish, finish_failed};

pub use self::arrival::{Arrival, Asked, BodyRead, ClientStanding, Credentials, authenticate};
pub use self::count_tokens::count_tokens;
pub use self::settle::recover;

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

/// Runs a request through every stage. Failures after arrival are recorded before they are
/// returned, so the ledger holds one record per authenticated request whose body was read; a
/// request the client abandons is settled by [`Unsettled`].
pub async fn run(gateway: Arc<Gateway>, arrival: Arrival) -> Result<(Delivery, Served), ApiError> {
    let context = arrive(&gateway, arrival).await?;
    let mut unsettled = Unsettled::new(gateway.clone(), context);
    let context = unsettled.context();
    let tenant = Arc::from(context.caller.tenant.as_str());
    let answered = match plugin::serving(tenant, deliver(&gateway, context)).await {
        Ok(answered) => answered,
        Err(error) => {
            let durable = finish_failed(&gateway, context, &error);
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
    let overhead = context.gateway_time().as_secs_f64();
    gateway.metrics.gateway_overhead.observe(overhead);
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
            let context = unsettled.hand_over();
            let (sender, receiver) = mpsc::channel(32);
            tokio::spawn(
                carry_stream(gateway, context, open, sender, admission, started, ttfb)
                    .in_current_span(),
            );
            Ok((Delivery::Stream(receiver), served))
        }
    }
}

/// Who calls (from the head alone: a refused request's body is never read), then the body, in
/// the OpenAI form the stages read, then the context they share.
async fn arrive(gateway: &Gateway, arrival: Arrival) -> Result<RequestContext, ApiError> {
    let caller = authenticate(gateway, &arrival.credentials)?;
    let body = arrival.body.await?;
    let bindings = gateway.bindings();
    let (request, inbound) = match arrival.asked {
        Asked::OpenAi(operation) => {
            let (text, value) = request::parse_json(body)?;
            (request::read(operation, text, &value)?, None)
        }
        Asked::Inbound {
            protocol,
            endpoint,
            headers,
        } => {
            let text = request::json_text(body)?;
            let tenant = &caller.tenant;
            let (inbound, request, trace) =
                inbound::convert_request(&bindings, tenant, protocol, endpoint, text, headers)
                    .await?;
            (request, Some((inbound, trace)))
        }
    };
    Span::current().record("model", request.model.as_str());
    let (id, received_at, tags) = (arrival.request_id, arrival.received_at, arrival.tags);
    let mut context = RequestContext::new(id, received_at, caller, request, tags, bindings)?;
    if let Some((inbound, trace)) = inbound {
        context.plugins.push(trace);
        context.inbound = Some(inbound);
    }
    Ok(context)
}

/// Limit, route, authorize the spend, then the attempts (and the fallback model's, when every
/// route of the asked one failed).
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
