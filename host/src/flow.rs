//! The request flow: the stages in order, and the per-request state they share.
//!
//! ```text
//! listen → auth → route → bill::authorize → for each planned attempt:
//!     translate request → upstream → translate answer | stream   (failover on retryable errors
//!                                                                  until a byte reached the client)
//! → bill::charge → record
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::error::ApiError;
use crate::gateway::{Gateway, KeyScope};
use crate::health::{Admission, ChannelHealth};
use crate::metrics::{
    AttemptLabels, ChannelLabels, Metrics, ModelLabels, RequestLabels, TokenLabels,
};
use crate::plugin::billing::CallOutcome;
use crate::plugin::router::Operation;
use crate::plugin::table::CanaryTally;
use crate::plugin::translator::{FailureClass, Usage};
use crate::plugin::{self, Binding, Role};
use crate::stages::bill::{self, Priced};
use crate::stages::context::RequestContext;
use crate::stages::inbound;
use crate::stages::limit;
use crate::stages::record;
use crate::stages::route::{self, PlannedAttempt};
use crate::stages::stream;
use crate::stages::translate::{self, TranslateError};
use crate::stages::upstream::{self, UpstreamError};
use crate::store::{Durable, OpenedRequest, RecordedAttempt, Settlement, StoreError, UsageRecord};
use crate::tokens;

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

/// A request on its way, until it is settled (priced and recorded) or handed to the task that
/// carries its stream. The client's connection owns the request's future, and drops it when the
/// client goes away: nothing after the pending `await` runs, the upstream call in it is dropped
/// (cancelled), and this guard hands the request to a task that settles it as `client_closed`.
struct Unsettled {
    gateway: Arc<Gateway>,
    context: Option<RequestContext>,
    /// The usage of a whole answer that came while it is being priced.
    usage: Option<Usage>,
    span: tracing::Span,
}

impl Unsettled {
    fn new(gateway: Arc<Gateway>, context: RequestContext) -> Self {
        Self {
            gateway,
            context: Some(context),
            usage: None,
            span: tracing::Span::current(),
        }
    }

    fn context(&mut self) -> &mut RequestContext {
        self.context
            .as_mut()
            .expect("a request is settled or handed over once, at the end of `run`")
    }

    /// The request was recorded.
    fn settled(mut self) {
        self.context = None;
    }

    /// The request goes on in another task, which settles it.
    fn hand_over(mut self) -> RequestContext {
        self.context
            .take()
            .expect("a request is settled or handed over once, at the end of `run`")
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        let Some(context) = self.context.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(request_id = %context.request_id, "an abandoned request could not be settled: no runtime");
            return;
        };
        let settling = settle_abandoned(self.gateway.clone(), context, self.usage.take());
        runtime.spawn(settling.instrument(self.span.clone()));
    }
}

/// Settles a request its client abandoned before its answer: recorded as 499 `client_closed`,
/// priced as a cut stream (its prompt, counted, once it reached an upstream; a whole answer that
/// came meanwhile, in full), its hold released.
async fn settle_abandoned(
    gateway: Arc<Gateway>,
    mut context: RequestContext,
    usage: Option<Usage>,
) {
    if let Some(mut attempt) = context.attempt_in_flight.take() {
        attempt.error_class = Some("client_closed".to_owned());
        context.attempts.push(attempt);
    }
    let usage = usage.unwrap_or_else(|| {
        if !context.reached_upstream {
            return zero_usage();
        }
        Usage {
            input_tokens: tokens::prompt_tokens(context.request.operation, &context.request.body),
            estimated: true,
            ..zero_usage()
        }
    });
    let priced = bill::charge(&context, &usage, CallOutcome::Cut).await;
    tracing::info!("the client went away before its answer; settled");
    // No answer waits for this record.
    drop(finish(
        &gateway,
        &mut context,
        &usage,
        &priced,
        499,
        Some("client_closed"),
    ));
}

/// Pumps a stream to the client, then prices and records it. Every held stream keeps this
/// future, so it is kept small: the pricing and recording state is boxed when the stream ends,
/// and as an `async fn` it measured 4.5 KiB, where the `async move` block it replaced measured
/// 6.3 KiB (13.9 KiB before the boxing).
async fn carry_stream(
    gateway: Arc<Gateway>,
    context: RequestContext,
    open: Box<stream::OpenStream>,
    sender: mpsc::Sender<Bytes>,
    admission: Admission,
    started: Instant,
    ttfb: Duration,
) {
    let outcome = stream::pump(*open, sender).await;
    match (outcome.cut, outcome.client_gone) {
        (Some(_), _) => admission.failed(Instant::now(), true),
        (None, true) => admission.neutral(),
        (None, false) => admission.succeeded(started.elapsed(), ttfb),
    }
    let settling = Box::pin(settle_stream(&gateway, context, outcome));
    settling.await;
}

/// Counts the prompt's tokens for a client protocol's count endpoint. The planned channels of the
/// client's own protocol are asked in order, forwarded untouched (an exact count); when the plan
/// reaches a channel of another protocol, or they all fail, the host counts with its tokenizer
/// and the protocol's plugin writes the answer. Counting is free: nothing is held, charged or
/// recorded, but the key's model allow-list and request rate apply.
pub async fn count_tokens(
    gateway: Arc<Gateway>,
    context: RequestContext,
) -> Result<String, ApiError> {
    let tenant = Arc::from(context.caller.tenant.as_str());
    plugin::serving(tenant, count_tokens_served(gateway, context)).await
}

async fn count_tokens_served(
    gateway: Arc<Gateway>,
    mut context: RequestContext,
) -> Result<String, ApiError> {
    let mut permit = limit::admit(&gateway.limiter, &context.caller, &context.request)?;
    permit.settle_tokens(0);
    let plan = route::plan(&gateway, &mut context).await?;
    let Some(inbound) = context.inbound.as_ref() else {
        return Err(ApiError::NoAttempt);
    };
    for attempt in &plan.attempts {
        let channel = attempt.channel.as_ref();
        if !inbound.forwards_to(&channel.config.protocol) {
            break;
        }
        let now = Instant::now();
        let Ok(key) = channel.pick_key(
            &context.caller.tenant,
            &attempt.upstream_model,
            now,
            &[],
            true,
        ) else {
            continue;
        };
        let translator = translate::translator(&context, channel)?;
        let attempt_context = translate::attempt_context(&context, channel, attempt);
        let forwarded = translate::forward(&translator, channel, &attempt_context, inbound).await?;
        let first_byte = channel.first_byte_timeout(&context.request.model);
        let sent_at = Instant::now();
        // The local estimate is always left to go to.
        let probe = translate::SilenceProbe {
            translator: &forwarded.ran,
            attempt: &attempt_context,
        };
        let upstream_key = key.map(|index| &channel.keys[index]);
        let sending = upstream::send(channel, upstream_key, forwarded.value, first_byte);
        let sent =
            upstream::unless_silent(&attempt.channel, key, sent_at, Some(&probe), sending).await;
        let answered = match sent {
            Ok(response) => {
                let max_bytes = gateway.max_upstream_body_bytes;
                upstream::read_whole(channel, response, max_bytes, sent_at).await
            }
            Err(error) => Err(error),
        };
        let counted = match answered {
            Ok(whole) => {
                translate::forwarded_answer(
                    &forwarded.ran,
                    channel,
                    &attempt_context,
                    inbound.endpoint,
                    &whole,
                )
                .await
            }
            Err(error) => Err(error.into()),
        };
        match counted {
            Ok(answer) => return Ok(answer.body),
            Err(TranslateError::Upstream(error)) if error.is_retryable() => {
                tracing::info!(channel = %channel.config.name, class = error.class(), "token count failed; next channel");
            }
            Err(error) => return Err(error.into()),
        }
    }
    let counted = tokens::prompt_tokens(Operation::Chat, &context.request.body);
    Ok(inbound.plugin.count_tokens_answer(counted).await?)
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
    let plan = route::plan(gateway, context).await?;
    let grant = bill::authorize(gateway, context).await?;
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
        let plan = route::plan(gateway, context).await?;
        return match run_plan(gateway, context, &plan, deadline, false).await {
            Ok(answered) => Ok(answered),
            Err(PlanFailure::Fatal(error)) => Err(error),
            Err(PlanFailure::Failed(error)) => Err(error.into()),
        };
    }
    Err(last_error.into())
}

/// Why a plan ended without an answer.
enum PlanFailure {
    /// Every route failed; the last failure (an upstream's own before a held-back route's).
    Failed(UpstreamError),
    /// The request fails whatever route is tried, or the plan held none.
    Fatal(ApiError),
}

/// Runs a plan's attempts in order until one answers. A route held back by its circuit or its
/// keys' state is not skipped but moved to the end: those are tried last, anyway, so a breaker or
/// a resting key reorders traffic and never refuses it alone. `fallback_after`: a fallback model
/// is left to try when the plan fails.
async fn run_plan(
    gateway: &Gateway,
    context: &mut RequestContext,
    plan: &route::Plan,
    deadline: Instant,
    fallback_after: bool,
) -> Result<Answered, PlanFailure> {
    let mut last_error = None;
    let mut held_back = Vec::new();
    let mut held_back_error = None;
    for (index, attempt) in plan.attempts.iter().enumerate() {
        let routes_left =
            fallback_after || index + 1 < plan.attempts.len() || !held_back.is_empty();
        let pass = Pass::Usable { routes_left };
        // Failover only before the first byte: an attempt fails only before it sent any.
        match attempt_channel(gateway, context, attempt, deadline, pass).await {
            ChannelOutcome::Answered(answered) => return Ok(*answered),
            ChannelOutcome::Failed(error) => last_error = Some(error),
            ChannelOutcome::HeldBack(error) => {
                held_back.push(attempt);
                held_back_error.get_or_insert(error);
            }
            ChannelOutcome::Fatal(error) => return Err(PlanFailure::Fatal(error)),
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    let held_back_count = held_back.len();
    for (index, attempt) in held_back.into_iter().enumerate() {
        if Instant::now() >= deadline {
            break;
        }
        let routes_left = fallback_after || index + 1 < held_back_count;
        let pass = Pass::LastResort { routes_left };
        match attempt_channel(gateway, context, attempt, deadline, pass).await {
            ChannelOutcome::Answered(answered) => return Ok(*answered),
            ChannelOutcome::Failed(error) | ChannelOutcome::HeldBack(error) => {
                last_error = Some(error);
            }
            ChannelOutcome::Fatal(error) => return Err(PlanFailure::Fatal(error)),
        }
    }
    Err(last_error
        .or(held_back_error)
        .map_or(PlanFailure::Fatal(ApiError::NoAttempt), PlanFailure::Failed))
}

/// Which routes a pass over the plan calls. `routes_left`: another route (or a fallback model)
/// remains after this one, so a call may leave a silent channel for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Routes whose circuits are closed (or due a probe) with a key that may be used now.
    Usable { routes_left: bool },
    /// The routes the first pass held back, whatever their circuits and keys say.
    LastResort { routes_left: bool },
}

impl Pass {
    fn routes_left(self) -> bool {
        match self {
            Pass::Usable { routes_left } | Pass::LastResort { routes_left } => routes_left,
        }
    }
}

/// How one planned channel ended.
enum ChannelOutcome {
    /// It answered.
    Answered(Box<Answered>),
    /// It failed in a way the next channel may fix.
    Failed(UpstreamError),
    /// It was not called: its circuit is open or every key is held back. Tried again last.
    HeldBack(UpstreamError),
    /// The request fails whatever channel is tried (the client's mistake, a plugin failure).
    Fatal(ApiError),
}

/// What an upstream's refusal or rate limit was about: the whole key when it says the key is
/// invalid or out of quota, otherwise the one model called (providers limit and authorise per
/// model).
fn key_scope<'m>(error: &UpstreamError, upstream_model: &'m str) -> KeyScope<'m> {
    let about_the_key = matches!(error.status(), Some(401))
        || matches!(
            error.failure_code(),
            Some("invalid_api_key" | "API_KEY_INVALID" | "insufficient_quota")
        );
    if about_the_key {
        KeyScope::Key
    } else {
        KeyScope::Model(upstream_model)
    }
}

/// Tries one channel of the plan: each of its usable keys in turn while the upstream refuses or
/// rate-limits a key, and up to `retries` more times (with backoff) on failures of its own.
async fn attempt_channel(
    gateway: &Gateway,
    context: &mut RequestContext,
    attempt: &PlannedAttempt,
    deadline: Instant,
    pass: Pass,
) -> ChannelOutcome {
    let channel = attempt.channel.as_ref();
    let mut tried_keys = Vec::new();
    let mut retries = 0;
    let mut last_error = None;
    loop {
        let now = Instant::now();
        let model_health = channel.model_health.get(&context.request.model);
        let admitted = match (model_health, pass) {
            (Some(model_health), Pass::Usable { .. }) => {
                ChannelHealth::admit_all(&[&channel.health, model_health], now)
            }
            (None, Pass::Usable { .. }) => channel.health.admit(now),
            (Some(model_health), Pass::LastResort { .. }) => Some(ChannelHealth::admit_anyway(&[
                &channel.health,
                model_health,
            ])),
            (None, Pass::LastResort { .. }) => {
                Some(ChannelHealth::admit_anyway(&[&channel.health]))
            }
        };
        let Some(admission) = admitted else {
            context
                .attempts
                .push(skipped(channel, attempt, "circuit_open"));
            return match last_error {
                Some(error) => ChannelOutcome::Failed(error),
                None => ChannelOutcome::HeldBack(UpstreamError::CircuitOpen {
                    channel: channel.config.name.clone(),
                }),
            };
        };
        let picked = channel.pick_key(
            &context.caller.tenant,
            &attempt.upstream_model,
            now,
            &tried_keys,
            matches!(pass, Pass::LastResort { .. }),
        );
        let key = match picked {
            Ok(key) => key,
            Err(back_at) => {
                admission.neutral();
                context
                    .attempts
                    .push(skipped(channel, attempt, "no_usable_key"));
                return match last_error {
                    Some(error) => ChannelOutcome::Failed(error),
                    None => ChannelOutcome::HeldBack(UpstreamError::NoUsableKey {
                        channel: channel.config.name.clone(),
                        retry_after: Some(back_at.saturating_duration_since(now)),
                    }),
                };
            }
        };
        let span = tracing::info_span!(
            "upstream.attempt",
            channel = %channel.config.name,
            attempt = context.attempts.len() + 1
        );
        context.attempt_in_flight = Some(RecordedAttempt {
            channel: channel.config.name.clone(),
            key: key.map(|index| channel.keys[index].id.clone()),
            upstream_model: attempt.upstream_model.clone(),
            status: None,
            error_class: None,
            latency_ms: 0,
            ttfb_ms: None,
        });
        let result = try_attempt(gateway, context, attempt, key, pass.routes_left())
            .instrument(span)
            .await;
        context.attempt_in_flight = None;
        let latency = now.elapsed();
        let latency_ms = latency.as_millis() as u64;
        let key_id = key.map(|index| channel.keys[index].id.clone());
        let (status, error_class, ttfb_ms) = match &result {
            Ok((_, ttfb)) => (Some(200), None, Some(ttfb.as_millis() as u64)),
            Err(TranslateError::Upstream(error)) => {
                (error.status(), Some(error.class().to_owned()), None)
            }
            Err(_) => (None, Some("plugin".to_owned()), None),
        };
        let labels = AttemptLabels {
            channel: channel.config.name.clone(),
            outcome: error_class.clone().unwrap_or_else(|| "ok".to_owned()),
        };
        gateway.metrics.attempts.get_or_create(&labels).inc();
        gateway
            .metrics
            .upstream_latency
            .get_or_create(&labels)
            .observe(latency.as_secs_f64());
        if let Ok((_, ttfb)) = &result {
            gateway
                .metrics
                .upstream_ttfb
                .get_or_create(&ChannelLabels {
                    channel: channel.config.name.clone(),
                })
                .observe(ttfb.as_secs_f64());
        }
        context.attempts.push(RecordedAttempt {
            channel: channel.config.name.clone(),
            key: key_id,
            upstream_model: attempt.upstream_model.clone(),
            status,
            error_class,
            latency_ms,
            ttfb_ms,
        });
        let error = match result {
            Ok((reply, ttfb)) => {
                if let Some(key) = key {
                    channel.keys[key].answered(&attempt.upstream_model);
                }
                return ChannelOutcome::Answered(Box::new(Answered {
                    reply,
                    admission,
                    started: now,
                    ttfb,
                }));
            }
            Err(TranslateError::Upstream(error)) => error,
            Err(error) => {
                admission.neutral();
                return ChannelOutcome::Fatal(error.into());
            }
        };
        tracing::info!(channel = %channel.config.name, class = error.class(), "upstream attempt failed");
        match (error.failure_class(), key) {
            (Some(FailureClass::InvalidRequest), _) => {
                admission.neutral();
                return ChannelOutcome::Fatal(error.into());
            }
            (Some(FailureClass::Authentication), Some(key)) => {
                // Not this key again until its probe: the next key of the pool, or the next channel.
                admission.neutral();
                channel.keys[key].refuse(
                    key_scope(&error, &attempt.upstream_model),
                    format!("the upstream refused it: {error}"),
                );
                tried_keys.push(key);
            }
            (Some(FailureClass::RateLimited), Some(key)) => {
                admission.neutral();
                let rest = error.retry_after().unwrap_or(Duration::from_secs(1));
                channel.keys[key].rest(
                    key_scope(&error, &attempt.upstream_model),
                    Instant::now() + rest,
                );
                tried_keys.push(key);
            }
            _ if matches!(error, UpstreamError::Unsupported { .. }) => {
                admission.neutral();
                return ChannelOutcome::Failed(error);
            }
            // Not again: the channel answers nothing now, and another route is left.
            _ if matches!(error, UpstreamError::Silent { .. }) => {
                admission.failed(Instant::now(), false);
                return ChannelOutcome::Failed(error);
            }
            _ => {
                admission.failed(Instant::now(), error.upstream_answered());
                let backoff = retry_backoff(channel.config.retry_backoff_ms, retries);
                if retries >= channel.config.retries || Instant::now() + backoff >= deadline {
                    return ChannelOutcome::Failed(error);
                }
                retries += 1;
                tokio::time::sleep(backoff).await;
            }
        }
        if Instant::now() >= deadline {
            return ChannelOutcome::Failed(error);
        }
        last_error = Some(error);
    }
}

/// Exponential backoff with full jitter: a random wait up to `base * 2^retry`, capped at 10 s.
fn retry_backoff(base_ms: u64, retry: u32) -> Duration {
    let ceiling = base_ms.saturating_mul(1 << retry.min(16)).min(10_000);
    Duration::from_millis(rand::random_range(ceiling / 2..=ceiling.max(1)))
}

/// The trace entry of a channel passed over without a call.
fn skipped(
    channel: &crate::gateway::Channel,
    attempt: &PlannedAttempt,
    class: &str,
) -> RecordedAttempt {
    RecordedAttempt {
        channel: channel.config.name.clone(),
        key: None,
        upstream_model: attempt.upstream_model.clone(),
        status: None,
        error_class: Some(class.to_owned()),
        latency_ms: 0,
        ttfb_ms: None,
    }
}

/// One attempt: translate (or, on a channel of the client's own protocol, forward), call, and
/// deliver (whole answer, or a stream whose first content came). Returns the reply and its time to
/// first byte (first content for streams, the answer's headers otherwise). With `routes_left`,
/// the call leaves a channel that goes silent before its headers.
async fn try_attempt(
    gateway: &Gateway,
    context: &mut RequestContext,
    attempt: &PlannedAttempt,
    key: Option<usize>,
    routes_left: bool,
) -> Result<(Reply, Duration), TranslateError> {
    let started = Instant::now();
    let channel = attempt.channel.as_ref();
    let translator = translate::translator(context, channel)?;
    let attempt_context = translate::attempt_context(context, channel, attempt);
    let forwarded = context
        .inbound
        .as_ref()
        .filter(|inbound| inbound.forwards_to(&channel.config.protocol));
    let translated = match forwarded {
        Some(inbound) => {
            translate::forward(&translator, channel, &attempt_context, inbound).await?
        }
        None => {
            translate::request(
                &translator,
                channel,
                &attempt_context,
                &context.request.body,
            )
            .await?
        }
    };
    let forwarded = forwarded.map(|inbound| inbound.endpoint);
    context.plugins.push(translated.trace);
    // The rest of the attempt runs on the plugin that translated the request, and counts against
    // its canary if the canary did.
    let canary = translated.canary;
    let fallback = translated.fallback;
    let translator = translated.ran;
    let upstream_request = translated.value;
    let framing = upstream_request.framing;
    let waiting = Instant::now();
    let first_byte = channel.first_byte_timeout(&context.request.model);
    if !context.reached_upstream {
        context.reached_upstream = true;
        note_opened(gateway, context, channel, attempt);
    }
    // The attempt's first-byte and total timeouts count from here.
    let sent_at = waiting;
    // With another route left, the wait for the headers and for a stream's first content ends
    // when the channel goes silent.
    let probe = routes_left.then(|| translate::SilenceProbe {
        translator: &translator,
        attempt: &attempt_context,
    });
    let upstream_key = key.map(|index| &channel.keys[index]);
    let sending = upstream::send(channel, upstream_key, upstream_request, first_byte);
    let sent =
        upstream::unless_silent(&attempt.channel, key, sent_at, probe.as_ref(), sending).await;
    context.upstream_wait += waiting.elapsed();
    let response = sent?;
    let reply = if let (true, Some(framing)) = (context.request.stream, framing) {
        let shape = stream::StreamShape {
            framing,
            dialect: context.dialect(),
            max_error_body_bytes: gateway.max_upstream_body_bytes,
            prompt_estimate: context.request.estimated_input_tokens,
            output_allowance: context
                .grant
                .as_ref()
                .and_then(|grant| grant.output_allowance),
            progress: context.grant.as_ref().map(|grant| stream::ProgressMarks {
                store: gateway.store.clone(),
                hold_id: grant.hold_id.clone(),
                marked: None,
            }),
        };
        let relay = async || -> Result<stream::Relay, TranslateError> {
            if forwarded.is_some() {
                let session = translator.open_forwarded_stream(&attempt_context).await?;
                return Ok(stream::Relay::Forwarded(session));
            }
            let session = translator.open_stream(&attempt_context).await?;
            Ok(match &context.inbound {
                Some(inbound) => {
                    let converter = inbound.plugin.open_openai_stream(&attempt_context).await?;
                    stream::Relay::Converted(session, Box::new(converter))
                }
                None => stream::Relay::OpenAi(session),
            })
        };
        let waiting = Instant::now();
        let opening = stream::open(
            &translator,
            relay,
            channel,
            &attempt_context,
            (response, sent_at),
            shape,
        );
        let opened =
            upstream::unless_silent(&attempt.channel, key, sent_at, probe.as_ref(), opening).await;
        // Includes the translator's pushes before the first chunk: a few µs each.
        context.upstream_wait += waiting.elapsed();
        let open = counted(canary.as_ref(), opened)?.watched_by(canary);
        (Reply::Streaming(Box::new(open)), started.elapsed())
    } else {
        let ttfb = started.elapsed();
        let whole =
            upstream::read_whole(channel, response, gateway.max_upstream_body_bytes, sent_at)
                .await?;
        let answer = match forwarded {
            Some(endpoint) => {
                let read = async |binding: Arc<Binding>| {
                    let context = &attempt_context;
                    translate::forwarded_answer(&binding, channel, context, endpoint, &whole).await
                };
                let answered = read(translator.clone()).await;
                let answered = counted(canary.as_ref(), answered);
                fail_open(context, &translator, fallback, answered, read).await?
            }
            None => {
                let read = async |binding: Arc<Binding>| {
                    translate::answer(&binding, channel, &attempt_context, &whole).await
                };
                let answered = read(translator.clone()).await;
                let answered = counted(canary.as_ref(), answered);
                let mut answer = fail_open(context, &translator, fallback, answered, read).await?;
                complete_answer(context, &mut answer);
                if let Some(inbound) = &context.inbound {
                    inbound::convert_answer(inbound, &attempt_context, &mut answer).await?;
                }
                answer
            }
        };
        context.served_model = answer.served_model.clone();
        (Reply::Whole(answer), ttfb)
    };
    context.served_protocol = Some(channel.config.protocol.clone());
    context.served_channel = Some(channel.config.name.clone());
    context.routed_model = Some(attempt.upstream_model.clone());
    Ok(reply)
}

/// The answer of the attempt's translator, or, when that plugin itself failed and its binding's
/// policy is `open`, the global default's reading of the same upstream answer (the trace says so).
async fn fail_open<T>(
    context: &mut RequestContext,
    translator: &Binding,
    fallback: Option<Arc<Binding>>,
    answered: Result<T, TranslateError>,
    read: impl AsyncFnOnce(Arc<Binding>) -> Result<T, TranslateError>,
) -> Result<T, TranslateError> {
    let (Err(TranslateError::Plugin(error)), Some(fallback)) = (&answered, fallback) else {
        return answered;
    };
    if error.culprit().is_none() {
        return answered;
    }
    tracing::warn!(%error, fallback = %fallback.plugin(), "answer translation failed; failing open");
    fallback.count_fail_open();
    context.plugins.push(format!(
        "{} (fail-open after {}: {})",
        fallback.plugin(),
        translator.plugin(),
        error.class()
    ));
    read(fallback).await
}

/// `result` of a later call of the attempt's translator, counted against its canary when the
/// canary translated the request: a canary that breaks only answers or streams is rolled back too.
fn counted<T>(
    canary: Option<&CanaryTally>,
    result: Result<T, TranslateError>,
) -> Result<T, TranslateError> {
    if let Some(canary) = canary {
        let failure = match &result {
            Err(TranslateError::Plugin(error)) => Some(error),
            _ => None,
        };
        canary.count_outcome(failure);
    }
    result
}

/// Charges the requests the gateway left open when it last stopped (killed, crashed, or the
/// machine lost power): each went to an upstream and has no record. The rule is a cut stream's:
/// the prompt (the host's estimate, four bytes a token) and the text its last progress mark
/// proves delivered (four bytes a token), never more than its hold; the record says `recovered`.
/// Runs at start-up, before the gateway serves. Returns how many it settled.
pub async fn recover(gateway: &Gateway) -> Result<usize, StoreError> {
    let unsettled = gateway.store.unsettled_requests()?;
    let bindings = gateway.bindings();
    for (opened, delivered) in &unsettled {
        let usage = Usage {
            input_tokens: opened.prompt_tokens,
            output_tokens: delivered.div_ceil(4),
            estimated: true,
            ..zero_usage()
        };
        let priced = match Gateway::resolve(&bindings, &opened.tenant, Role::Billing, None) {
            Ok(billing) => bill::charge_recovered(&billing, opened, &usage).await,
            Err(error) => Priced {
                failure: Some(error.to_string()),
                ..Priced::default()
            },
        };
        let record = record::recovered_record(opened, &usage, &priced, *delivered);
        tracing::warn!(request_id = %opened.request_id, tenant = %opened.tenant, cost_picos = ?record.cost_picos, "charged a request the last run left open");
        // Recovery runs before serving: nothing waits for its durability.
        drop(gateway.store.commit_usages(&[Settlement {
            record,
            hold_id: Some(opened.hold_id.clone()),
        }])?);
    }
    Ok(unsettled.len())
}

/// Notes in the ledger log that the request goes to an upstream: should the gateway stop before
/// its record, the next start charges it (see [`recover`]).
fn note_opened(
    gateway: &Gateway,
    context: &RequestContext,
    channel: &crate::gateway::Channel,
    attempt: &PlannedAttempt,
) {
    let Some(grant) = &context.grant else {
        return;
    };
    let opened = OpenedRequest {
        hold_id: grant.hold_id.clone(),
        hold_picos: grant.hold_picos,
        unix_ms: context.received_unix_ms,
        request_id: context.request_id.clone(),
        tenant: context.caller.tenant.clone(),
        key_id: context.caller.key_id.clone(),
        operation: record::operation_name(context.request.operation).to_owned(),
        model_asked: context.request.model.clone(),
        channel: channel.config.name.clone(),
        upstream_model: attempt.upstream_model.clone(),
        protocol_in: record::protocol_in(context).to_owned(),
        protocol_out: channel.config.protocol.clone(),
        stream: context.request.stream,
        prompt_tokens: context.request.estimated_input_tokens,
        plugins: context.plugins.clone(),
    };
    if let Err(error) = gateway.store.open_request(&opened) {
        // The record still settles it; only a crash before then would leave it unbilled.
        tracing::error!(%error, "the request could not be noted as opened");
    }
}

/// Finishes an OpenAI-shaped whole answer: usage the upstream did not report is counted with the
/// tokenizer (both sides) and written into the body, base64 embeddings encoded.
fn complete_answer(context: &RequestContext, answer: &mut translate::Answer) {
    if answer.usage.estimated {
        answer.usage.input_tokens =
            tokens::prompt_tokens(context.request.operation, &context.request.body);
        if context.request.operation == Operation::Chat {
            answer.usage.output_tokens = tokens::answer_tokens(&answer.body);
        }
    }
    translate::complete_body(&context.request, answer);
}

/// After a stream: usage (estimated from the prompt if the upstream reported none), price, record.
async fn settle_stream(
    gateway: &Gateway,
    mut context: RequestContext,
    outcome: stream::StreamOutcome,
) {
    context.served_model = outcome.served_model;
    let mut usage = outcome.usage.unwrap_or(Usage {
        estimated: true,
        ..zero_usage()
    });
    if usage.estimated && usage.input_tokens == 0 {
        // The translator counted what it delivered; the prompt is the host's to count.
        usage.input_tokens =
            tokens::prompt_tokens(context.request.operation, &context.request.body);
    }
    // The record says `stream_cut`; the attempt that carried the stream says why.
    if let Some(cause) = outcome.cut
        && let Some(carrier) = context.attempts.last_mut()
    {
        carrier.error_class = Some(cause.to_owned());
    }
    let (call_outcome, class) = match (outcome.cut, outcome.client_gone) {
        (Some(_), _) => (CallOutcome::Cut, Some("stream_cut")),
        (None, true) => (CallOutcome::Cut, Some("client_closed")),
        (None, false) => (CallOutcome::Complete, None),
    };
    let priced = bill::charge(&context, &usage, call_outcome).await;
    // The stream's answer is out already.
    drop(finish(gateway, &mut context, &usage, &priced, 200, class));
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
