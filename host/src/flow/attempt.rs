//! The attempts of a plan: each route in turn (held-back routes last), each key and retry of a
//! route, one attempt translating, calling and delivering.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::channel::{Channel, KeyScope};
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::health::{Admission, ChannelHealth};
use crate::metrics::{AttemptLabels, ChannelLabels};
use crate::plugin::Binding;
use crate::plugin::Operation;
use crate::plugin::table::CanaryTally;
use crate::plugin::translator::{AttemptContext, Endpoint, FailureClass, StreamFraming};
use crate::stages::context::RequestContext;
use crate::stages::inbound;
use crate::stages::route::{self, PlannedAttempt};
use crate::stages::stream;
use crate::stages::translate::{self, TranslateError};
use crate::stages::upstream::{self, UpstreamError};
use crate::store::RecordedAttempt;
use crate::tokens;

use super::settle::note_opened;

/// Why a plan ended without an answer.
pub(super) enum PlanFailure {
    /// Every route failed; the last failure (an upstream's own before a held-back route's).
    Failed(UpstreamError),
    /// The request fails whatever route is tried, or the plan held none.
    Fatal(ApiError),
}

/// Runs a plan's attempts in order until one answers. A route held back by its circuit or its
/// keys' state is not skipped but moved to the end: those are tried last, anyway, so a breaker or
/// a resting key reorders traffic and never refuses it alone. `fallback_after`: a fallback model
/// is left to try when the plan fails.
pub(super) async fn run_plan(
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

/// What an attempt produced.
pub(super) enum Reply {
    /// A whole answer in the client's protocol; pricing and recording follow.
    Whole(translate::Answer),
    /// A stream whose first content has arrived; pumping, pricing and recording follow.
    Streaming(Box<stream::OpenStream>),
}

/// A successful attempt with its health bookkeeping, which ends when the answer does.
pub(super) struct Answered {
    pub(super) reply: Reply,
    pub(super) admission: Admission,
    pub(super) started: Instant,
    pub(super) ttfb: Duration,
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
        let (admission, key) = match admit_call(context, attempt, pass, now, &tried_keys) {
            Ok(cleared) => cleared,
            Err(why) => return held_back(last_error, why),
        };
        let span = tracing::info_span!(
            "upstream.attempt",
            channel = %channel.config.name,
            attempt = context.attempts.len() + 1
        );
        context.attempt_in_flight = Some(recorded(channel, attempt, key));
        let result = try_attempt(gateway, context, attempt, key, pass.routes_left())
            .instrument(span)
            .await;
        context.attempt_in_flight = None;
        record_attempt(gateway, context, attempt, key, now.elapsed(), &result);
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
        // The upstream's own words (scrubbed of the channel's secrets) say what the class cannot:
        // a 404 about a path rather than a model, say.
        tracing::info!(channel = %channel.config.name, class = error.class(), %error, "upstream attempt failed");
        let retry = Retry {
            tried_keys: &mut tried_keys,
            retries: &mut retries,
            deadline,
        };
        let error = match after_attempt_failed(attempt, admission, key, error, retry).await {
            ControlFlow::Break(outcome) => return outcome,
            ControlFlow::Continue(error) => error,
        };
        if Instant::now() >= deadline {
            return ChannelOutcome::Failed(error);
        }
        last_error = Some(error);
    }
}

/// The circuits' admission and a key for the route's next call, or why the route is not called
/// now (its attempt is then recorded as skipped).
fn admit_call(
    context: &mut RequestContext,
    attempt: &PlannedAttempt,
    pass: Pass,
    now: Instant,
    tried_keys: &[usize],
) -> Result<(Admission, Option<usize>), UpstreamError> {
    let channel = attempt.channel.as_ref();
    let Some(admission) = admit(channel, &context.request.model, pass, now) else {
        context
            .attempts
            .push(skipped(channel, attempt, "circuit_open"));
        return Err(UpstreamError::CircuitOpen {
            channel: channel.config.name.clone(),
        });
    };
    let picked = channel.pick_key(
        &context.caller.tenant,
        &attempt.upstream_model,
        now,
        tried_keys,
        matches!(pass, Pass::LastResort { .. }),
    );
    match picked {
        Ok(key) => Ok((admission, key)),
        Err(back_at) => {
            admission.neutral();
            context
                .attempts
                .push(skipped(channel, attempt, "no_usable_key"));
            Err(UpstreamError::NoUsableKey {
                channel: channel.config.name.clone(),
                retry_after: Some(back_at.saturating_duration_since(now)),
            })
        }
    }
}

/// A route that was not called: failed, when an earlier call on it failed; else held back.
fn held_back(last_error: Option<UpstreamError>, why: UpstreamError) -> ChannelOutcome {
    match last_error {
        Some(error) => ChannelOutcome::Failed(error),
        None => ChannelOutcome::HeldBack(why),
    }
}

/// What a route's loop carries from one failed attempt to the next.
struct Retry<'a> {
    /// Keys refused or rested during this route's attempts.
    tried_keys: &'a mut Vec<usize>,
    /// Retries made on the channel's own failures.
    retries: &'a mut u32,
    deadline: Instant,
}

/// Carries out [`after_failure`]'s decision: the key's refusal or rest, the health's count, the
/// backoff before a retry. `Break` ends the route with that outcome; `Continue` tries it again.
async fn after_attempt_failed(
    attempt: &PlannedAttempt,
    admission: Admission,
    key: Option<usize>,
    error: UpstreamError,
    retry: Retry<'_>,
) -> ControlFlow<ChannelOutcome, UpstreamError> {
    let channel = attempt.channel.as_ref();
    let scope = key_scope(&error, &attempt.upstream_model);
    match (after_failure(&error, key.is_some()), key) {
        (AfterFailure::Fatal, _) => {
            admission.neutral();
            return ControlFlow::Break(ChannelOutcome::Fatal(error.into()));
        }
        (AfterFailure::RefuseKey, Some(key)) => {
            // Not this key again until its probe: the next key of the pool, or the next channel.
            admission.neutral();
            channel.keys[key].refuse(scope, format!("the upstream refused it: {error}"));
            retry.tried_keys.push(key);
        }
        (AfterFailure::RestKey, Some(key)) => {
            admission.neutral();
            let rest = error.retry_after().unwrap_or(Duration::from_secs(1));
            channel.keys[key].rest(scope, Instant::now() + rest);
            retry.tried_keys.push(key);
        }
        (AfterFailure::NextRoute { failed }, _) => {
            if failed {
                admission.failed(Instant::now(), false);
            } else {
                admission.neutral();
            }
            return ControlFlow::Break(ChannelOutcome::Failed(error));
        }
        (AfterFailure::Retry | AfterFailure::RefuseKey | AfterFailure::RestKey, _) => {
            admission.failed(Instant::now(), error.upstream_answered());
            let backoff = retry_backoff(channel.config.retry_backoff_ms, *retry.retries);
            if *retry.retries >= channel.config.retries
                || Instant::now() + backoff >= retry.deadline
            {
                return ControlFlow::Break(ChannelOutcome::Failed(error));
            }
            *retry.retries += 1;
            tokio::time::sleep(backoff).await;
        }
    }
    ControlFlow::Continue(error)
}

/// What a failed attempt means for its route (as pingora's `RetryType`): one decision over the
/// failure's class, so the loop above only carries it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterFailure {
    /// The client's own mistake: no route would do better.
    Fatal,
    /// The upstream refused the key: the next key of the pool, or the next route.
    RefuseKey,
    /// The upstream rate-limited the key: rest it; the next key, or the next route.
    RestKey,
    /// Not this route again: it cannot serve the request, or it went silent (`failed`: counted
    /// against its health).
    NextRoute {
        /// Whether the channel's health counts it.
        failed: bool,
    },
    /// The channel's own failure: again on it, within its `retries` and the deadline.
    Retry,
}

/// The decision over a failed attempt; `keyed`: the attempt carried one of the pool's keys (a
/// refusal or rate limit without one is the channel's own failure).
fn after_failure(error: &UpstreamError, keyed: bool) -> AfterFailure {
    match (error.failure_class(), error) {
        (Some(FailureClass::InvalidRequest), _) => AfterFailure::Fatal,
        (Some(FailureClass::Authentication), _) if keyed => AfterFailure::RefuseKey,
        (Some(FailureClass::RateLimited), _) if keyed => AfterFailure::RestKey,
        (_, UpstreamError::Unsupported { .. }) => AfterFailure::NextRoute { failed: false },
        // The channel answers nothing now, and another route is left.
        (_, UpstreamError::Silent { .. }) => AfterFailure::NextRoute { failed: true },
        _ => AfterFailure::Retry,
    }
}

/// Lets a call on `channel` for public `model` through its circuits: both the channel's and the
/// model's; on the last-resort pass whatever they say.
fn admit(channel: &Channel, model: &str, pass: Pass, now: Instant) -> Option<Admission> {
    let model_health = channel.model_health.get(model);
    match (model_health, pass) {
        (Some(model_health), Pass::Usable { .. }) => {
            ChannelHealth::admit_all(&[&channel.health, model_health], now)
        }
        (None, Pass::Usable { .. }) => channel.health.admit(now),
        (Some(model_health), Pass::LastResort { .. }) => Some(ChannelHealth::admit_anyway(&[
            &channel.health,
            model_health,
        ])),
        (None, Pass::LastResort { .. }) => Some(ChannelHealth::admit_anyway(&[&channel.health])),
    }
}

/// An attempt's record before it ends.
fn recorded(channel: &Channel, attempt: &PlannedAttempt, key: Option<usize>) -> RecordedAttempt {
    RecordedAttempt {
        channel: channel.config.name.clone(),
        key: key.map(|index| channel.keys[index].id.clone()),
        upstream_model: attempt.upstream_model.clone(),
        status: None,
        error_class: None,
        latency_ms: 0,
        ttfb_ms: None,
    }
}

/// Records how an attempt ended, in the request's trace and the metrics.
fn record_attempt(
    gateway: &Gateway,
    context: &mut RequestContext,
    attempt: &PlannedAttempt,
    key: Option<usize>,
    latency: Duration,
    result: &Result<(Reply, Duration), TranslateError>,
) {
    let channel = attempt.channel.as_ref();
    let (status, error_class, ttfb) = match result {
        Ok((_, ttfb)) => (Some(200), None, Some(*ttfb)),
        Err(TranslateError::Upstream(error)) => {
            (error.status(), Some(error.class().to_owned()), None)
        }
        Err(_) => (None, Some("plugin".to_owned()), None),
    };
    let labels = AttemptLabels {
        channel: channel.config.name.clone(),
        outcome: error_class.clone().unwrap_or_else(|| "ok".to_owned()),
    };
    let metrics = &gateway.metrics;
    metrics.attempts.get_or_create(&labels).inc();
    metrics
        .upstream_latency
        .get_or_create(&labels)
        .observe(latency.as_secs_f64());
    if let Some(ttfb) = ttfb {
        metrics
            .upstream_ttfb
            .get_or_create(&ChannelLabels {
                channel: channel.config.name.clone(),
            })
            .observe(ttfb.as_secs_f64());
    }
    context.attempts.push(RecordedAttempt {
        status,
        error_class,
        latency_ms: latency.as_millis() as u64,
        ttfb_ms: ttfb.map(|ttfb| ttfb.as_millis() as u64),
        ..recorded(channel, attempt, key)
    });
}

/// Exponential backoff with full jitter: a random wait up to `base * 2^retry`, capped at 10 s.
fn retry_backoff(base_ms: u64, retry: u32) -> Duration {
    let ceiling = base_ms.saturating_mul(1 << retry.min(16)).min(10_000);
    Duration::from_millis(rand::random_range(ceiling / 2..=ceiling.max(1)))
}

/// The trace entry of a channel passed over without a call.
fn skipped(channel: &Channel, attempt: &PlannedAttempt, class: &str) -> RecordedAttempt {
    RecordedAttempt {
        error_class: Some(class.to_owned()),
        ..recorded(channel, attempt, None)
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
            let body = &context.request.body;
            translate::request(&translator, channel, &attempt_context, body).await?
        }
    };
    context.plugins.push(translated.trace);
    let framing = translated.value.framing;
    let sent = Sent {
        attempt,
        key,
        context: attempt_context,
        forwarded: forwarded.map(|inbound| inbound.endpoint),
        translator: translated.ran,
        canary: translated.canary,
        fallback: translated.fallback,
        sent_at: Instant::now(),
        routes_left,
    };
    if !context.reached_upstream {
        context.reached_upstream = true;
        note_opened(gateway, context, channel, attempt);
    }
    let first_byte = channel.first_byte_timeout(&context.request.model);
    let upstream_key = key.map(|index| &channel.keys[index]);
    let sending = upstream::send(channel, upstream_key, translated.value, first_byte);
    let response = sent.unless_silent(sending).await;
    context.upstream_wait += sent.sent_at.elapsed();
    let response = response?;
    let reply = if let (true, Some(framing)) = (context.request.stream, framing) {
        let open = open_stream(gateway, context, &sent, framing, response).await?;
        (Reply::Streaming(Box::new(open)), started.elapsed())
    } else {
        let ttfb = started.elapsed();
        let answer = whole_answer(gateway, context, &sent, response).await?;
        context.served_model = answer.served_model.clone();
        (Reply::Whole(answer), ttfb)
    };
    context.served_protocol = Some(channel.config.protocol.clone());
    context.served_channel = Some(channel.config.name.clone());
    context.routed_model = Some(attempt.upstream_model.clone());
    Ok(reply)
}

/// An attempt whose request went upstream. The rest of the attempt runs on the plugin that
/// translated the request, and counts against its canary if the canary did.
struct Sent<'a> {
    attempt: &'a PlannedAttempt,
    key: Option<usize>,
    context: AttemptContext,
    /// The client's endpoint, when its own body was forwarded to a channel of its protocol.
    forwarded: Option<Endpoint>,
    translator: Arc<Binding>,
    canary: Option<CanaryTally>,
    fallback: Option<Arc<Binding>>,
    /// The attempt's first-byte and total timeouts count from here.
    sent_at: Instant,
    routes_left: bool,
}

impl Sent<'_> {
    /// `waiting` (for the headers, or a stream's first content), given up when the channel goes
    /// silent, while another route is left.
    async fn unless_silent<T, E: From<UpstreamError>>(
        &self,
        waiting: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let channel = &self.attempt.channel;
        let probe = self.routes_left.then(|| translate::SilenceProbe {
            translator: &self.translator,
            attempt: &self.context,
            channel,
        });
        upstream::unless_silent(channel, self.key, self.sent_at, probe.as_ref(), waiting).await
    }
}

/// Opens the stream of an answer whose headers came, up to its first content.
async fn open_stream(
    gateway: &Gateway,
    context: &mut RequestContext,
    sent: &Sent<'_>,
    framing: StreamFraming,
    response: reqwest::Response,
) -> Result<stream::OpenStream, TranslateError> {
    let channel = sent.attempt.channel.as_ref();
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
    let (translator, attempt_context) = (&sent.translator, &sent.context);
    let relay = async || -> Result<stream::Relay, TranslateError> {
        if sent.forwarded.is_some() {
            let session = translator.open_forwarded_stream(attempt_context).await?;
            return Ok(stream::Relay::Forwarded(session));
        }
        let session = translator.open_stream(attempt_context).await?;
        Ok(match &context.inbound {
            Some(inbound) => {
                let converter = inbound.plugin.open_openai_stream(attempt_context).await?;
                stream::Relay::Converted(session, Box::new(converter))
            }
            None => stream::Relay::OpenAi(session),
        })
    };
    let waiting = Instant::now();
    let response = (response, sent.sent_at);
    let opening = stream::open(translator, relay, channel, attempt_context, response, shape);
    let opened = sent.unless_silent(opening).await;
    // Includes the translator's pushes before the first chunk: a few µs each.
    context.upstream_wait += waiting.elapsed();
    let canary = sent.canary.clone();
    Ok(counted(canary.as_ref(), opened)?.watched_by(canary))
}

/// Reads and translates a whole answer whose headers came (a forwarded one read as it came).
async fn whole_answer(
    gateway: &Gateway,
    context: &mut RequestContext,
    sent: &Sent<'_>,
    response: reqwest::Response,
) -> Result<translate::Answer, TranslateError> {
    let channel = sent.attempt.channel.as_ref();
    let max_bytes = gateway.max_upstream_body_bytes;
    let whole = upstream::read_whole(channel, response, max_bytes, sent.sent_at).await?;
    let (translator, attempt_context) = (&sent.translator, &sent.context);
    let canary = sent.canary.as_ref();
    let fallback = sent.fallback.clone();
    if let Some(endpoint) = sent.forwarded {
        let read = async |binding: Arc<Binding>| {
            translate::forwarded_answer(&binding, channel, attempt_context, endpoint, &whole).await
        };
        let answered = counted(canary, read(translator.clone()).await);
        return fail_open(context, translator, fallback, answered, read).await;
    }
    let read = async |binding: Arc<Binding>| {
        translate::answer(&binding, channel, attempt_context, &whole).await
    };
    let answered = counted(canary, read(translator.clone()).await);
    let mut answer = fail_open(context, translator, fallback, answered, read).await?;
    complete_answer(context, &mut answer);
    if let Some(inbound) = &context.inbound {
        inbound::convert_answer(inbound, attempt_context, &mut answer).await?;
    }
    Ok(answer)
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
pub(super) fn counted<T>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::translator::UpstreamFailure;

    fn failure(class: FailureClass, status: u16) -> UpstreamError {
        UpstreamError::Failure {
            channel: "c".into(),
            failure: Box::new(UpstreamFailure {
                class,
                status,
                message: "upstream says no".into(),
                code: None,
                param: None,
                retry_after_ms: None,
            }),
        }
    }

    #[test]
    fn each_failure_class_has_one_decision() {
        let channel = || "c".to_owned();
        let cases = [
            (
                failure(FailureClass::InvalidRequest, 400),
                true,
                AfterFailure::Fatal,
            ),
            (
                failure(FailureClass::InvalidRequest, 400),
                false,
                AfterFailure::Fatal,
            ),
            (
                failure(FailureClass::Authentication, 403),
                true,
                AfterFailure::RefuseKey,
            ),
            (
                failure(FailureClass::Authentication, 401),
                false,
                AfterFailure::Retry,
            ),
            (
                failure(FailureClass::RateLimited, 429),
                true,
                AfterFailure::RestKey,
            ),
            (
                failure(FailureClass::RateLimited, 429),
                false,
                AfterFailure::Retry,
            ),
            (
                failure(FailureClass::Server, 500),
                true,
                AfterFailure::Retry,
            ),
            (
                failure(FailureClass::Overloaded, 529),
                true,
                AfterFailure::Retry,
            ),
            (
                failure(FailureClass::ModelNotFound, 404),
                true,
                AfterFailure::Retry,
            ),
            (
                UpstreamError::Timeout {
                    channel: channel(),
                    phase: upstream::TimeoutPhase::Headers,
                },
                true,
                AfterFailure::Retry,
            ),
            (
                UpstreamError::Unsupported {
                    channel: channel(),
                    reason: "no embeddings".into(),
                },
                true,
                AfterFailure::NextRoute { failed: false },
            ),
            (
                UpstreamError::Silent { channel: channel() },
                true,
                AfterFailure::NextRoute { failed: true },
            ),
        ];
        for (error, keyed, expected) in cases {
            assert_eq!(
                after_failure(&error, keyed),
                expected,
                "{error} (keyed: {keyed})"
            );
        }
    }
}
