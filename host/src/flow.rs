//! The request flow: the stages in order, and the per-request state they share.
//!
//! ```text
//! listen → auth → route → bill::authorize → for each planned attempt:
//!     translate request → upstream → translate answer | stream   (failover on retryable errors
//!                                                                  until a byte reached the client)
//! → bill::charge → record
//! ```

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::auth::Caller;
use crate::bill::{self, Priced};
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::plugin::billing::CallOutcome;
use crate::plugin::translator::Usage;
use crate::record;
use crate::request::ClientRequest;
use crate::route::{self, PlannedAttempt};
use crate::store::RecordedAttempt;
use crate::stream;
use crate::translate::{self, TranslateError};
use crate::upstream;

/// Everything one request accumulates on its way through the stages. Made once, in [`RequestContext::new`].
pub struct RequestContext {
    /// The request id (client's `x-request-id`, or generated).
    pub request_id: String,
    /// When the request arrived.
    pub received_at: Instant,
    /// Arrival time, milliseconds since the Unix epoch.
    pub received_unix_ms: u64,
    /// Who is calling.
    pub caller: Caller,
    /// What was asked.
    pub request: ClientRequest,
    /// `x-tollgate-*` header tags for the router.
    pub tags: Vec<(String, String)>,
    /// Attempts made so far, in order.
    pub attempts: Vec<RecordedAttempt>,
    /// The model the upstream reported, once one answered.
    pub served_model: Option<String>,
    /// The channel that answered.
    pub served_channel: Option<String>,
    /// Plugins that ran (`name@sha`), for the record.
    pub plugins: Vec<String>,
}

impl RequestContext {
    /// Starts the context of an authenticated request.
    pub fn new(
        request_id: String,
        received_at: Instant,
        caller: Caller,
        request: ClientRequest,
        tags: Vec<(String, String)>,
    ) -> Self {
        let received_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis() as u64);
        Self {
            request_id,
            received_at,
            received_unix_ms,
            caller,
            request,
            tags,
            attempts: Vec::new(),
            served_model: None,
            served_channel: None,
            plugins: Vec::new(),
        }
    }

    /// Milliseconds since the request arrived.
    pub fn elapsed_ms(&self) -> u64 {
        self.received_at.elapsed().as_millis() as u64
    }
}

/// How an attempt answered.
enum Answered {
    /// A whole OpenAI-shaped answer; pricing and recording follow.
    Whole(translate::Answer),
    /// A stream whose first content has arrived; pumping, pricing and recording follow.
    Streaming(Box<stream::OpenStream>),
}

/// What the client gets on success.
pub enum Delivery {
    /// A whole JSON body.
    Json(String),
    /// SSE frames as they are produced; the sender side ends with `[DONE]` or an error event.
    Stream(mpsc::Receiver<Bytes>),
}

/// Runs a chat-completions or embeddings request through every stage. Failures are recorded
/// before they are returned, so the ledger holds one record per authenticated request.
pub async fn run(gateway: Arc<Gateway>, mut context: RequestContext) -> Result<Delivery, ApiError> {
    match deliver(&gateway, &mut context).await {
        Ok(Answered::Whole(answer)) => {
            let priced =
                bill::charge(&gateway, &context, &answer.usage, CallOutcome::Complete).await;
            finish(&gateway, &context, &answer.usage, &priced, 200, None);
            Ok(Delivery::Json(answer.body))
        }
        Ok(Answered::Streaming(open)) => {
            let (sender, receiver) = mpsc::channel(32);
            tokio::spawn(
                async move {
                    let outcome = stream::pump(*open, sender).await;
                    settle_stream(&gateway, context, outcome).await;
                }
                .in_current_span(),
            );
            Ok(Delivery::Stream(receiver))
        }
        Err(error) => {
            let usage = Usage {
                input_tokens: 0,
                cache_read_tokens: 0,
                cache_write_tokens: 0,
                output_tokens: 0,
                reasoning_tokens: 0,
                estimated: false,
            };
            finish(
                &gateway,
                &context,
                &usage,
                &Priced::default(),
                error.status_code(),
                Some(error.class()),
            );
            Err(error)
        }
    }
}

async fn deliver(gateway: &Gateway, context: &mut RequestContext) -> Result<Answered, ApiError> {
    context.plugins.push(gateway.router.plugin().to_string());
    let plan = route::plan(gateway, context).await?;
    context.plugins.push(gateway.billing.plugin().to_string());
    bill::authorize(gateway, context).await?;
    let mut last_error = None;
    for (number, attempt) in plan.attempts.iter().enumerate() {
        let channel = &gateway.channels[attempt.channel];
        let span = tracing::info_span!("upstream.attempt", channel = %channel.config.name, attempt = number + 1);
        let started = Instant::now();
        let result = try_attempt(gateway, context, attempt)
            .instrument(span)
            .await;
        let (status, error_class) = match &result {
            Ok(_) => (Some(200), None),
            Err(TranslateError::Upstream(error)) => {
                (error.status(), Some(error.class().to_owned()))
            }
            Err(_) => (None, Some("plugin".to_owned())),
        };
        context.attempts.push(RecordedAttempt {
            channel: channel.config.name.clone(),
            upstream_model: attempt.upstream_model.clone(),
            status,
            error_class,
            latency_ms: started.elapsed().as_millis() as u64,
        });
        match result {
            Ok(answered) => return Ok(answered),
            // Failover only before the first byte: `try_attempt` returns an error only then.
            Err(TranslateError::Upstream(error)) if error.is_retryable() => {
                tracing::info!(channel = %channel.config.name, class = error.class(), "attempt failed; trying the next");
                last_error = Some(error);
            }
            Err(error) => return Err(error.into()),
        }
    }
    Err(last_error.map_or_else(|| ApiError::NoAttempt, ApiError::from))
}

/// One attempt: translate, call, and deliver (whole answer, or a stream whose first content came).
async fn try_attempt(
    gateway: &Gateway,
    context: &mut RequestContext,
    attempt: &PlannedAttempt,
) -> Result<Answered, TranslateError> {
    let channel = &gateway.channels[attempt.channel];
    let translator = translate::translator(gateway, channel)?;
    let attempt_context = translate::attempt_context(context, channel, attempt);
    let upstream_request =
        translate::request(translator, channel, &attempt_context, &context.request.body).await?;
    let framing = upstream_request.framing;
    let response = upstream::send(channel, upstream_request).await?;
    if let (true, Some(framing)) = (context.request.stream, framing) {
        let max_error_bytes = gateway.max_upstream_body_bytes;
        let open = stream::open(
            translator,
            channel,
            &attempt_context,
            framing,
            response,
            max_error_bytes,
        )
        .await?;
        context.served_channel = Some(channel.config.name.clone());
        context.plugins.push(translator.plugin().to_string());
        return Ok(Answered::Streaming(Box::new(open)));
    }
    let whole = upstream::read_whole(channel, response, gateway.max_upstream_body_bytes).await?;
    let answer = translate::answer(translator, channel, &attempt_context, &whole).await?;
    context.served_model = answer.served_model.clone();
    context.served_channel = Some(channel.config.name.clone());
    context.plugins.push(translator.plugin().to_string());
    Ok(Answered::Whole(answer))
}

/// After a stream: usage (estimated from the prompt if the upstream reported none), price, record.
async fn settle_stream(
    gateway: &Gateway,
    mut context: RequestContext,
    outcome: stream::StreamOutcome,
) {
    context.served_model = outcome.served_model;
    let usage = outcome.usage.unwrap_or(Usage {
        input_tokens: context.request.estimated_input_tokens,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        output_tokens: 0,
        reasoning_tokens: 0,
        estimated: true,
    });
    let (call_outcome, class) = match (outcome.cut, outcome.client_gone) {
        (Some(_), _) => (CallOutcome::Cut, Some("stream_cut")),
        (None, true) => (CallOutcome::Cut, Some("client_closed")),
        (None, false) => (CallOutcome::Complete, None),
    };
    let priced = bill::charge(gateway, &context, &usage, call_outcome).await;
    finish(gateway, &context, &usage, &priced, 200, class);
}

/// Writes the request's usage record. A failed write is logged loudly: the answer is already out.
fn finish(
    gateway: &Gateway,
    context: &RequestContext,
    usage: &Usage,
    priced: &Priced,
    status: u16,
    class: Option<&str>,
) {
    if let Some(failure) = &priced.failure {
        tracing::error!(
            failure,
            "the call could not be priced; recorded as unpriced"
        );
    }
    let usage_record = record::usage_record(context, usage, priced, status, class);
    if let Err(error) = record::commit(gateway.store.as_ref(), &usage_record) {
        tracing::error!(error = %error, source = ?std::error::Error::source(&error), "usage record lost");
    }
}
