//! Translate: the channel's translator plugin turns the client's OpenAI body into the upstream's
//! request, and the upstream's whole answer back into OpenAI's shape.
//!
//! In: the [`RequestContext`], one planned attempt. Out: an `UpstreamRequest` / an OpenAI body with
//! normalized usage, or a [`TranslateError`]. Next: upstream (for requests), bill (for answers).
//! Streams are translated by the stream stage, with the same plugin.

use base64::Engine as _;

use crate::channel::Channel;
use crate::plugin::Operation;
use crate::plugin::table::{Called, Resolved};
use crate::plugin::translator::{
    self as wit, AttemptContext, Endpoint, RequestKind, UpstreamRequest, UpstreamResponse,
};
use crate::plugin::{Binding, PluginError, Role};
use crate::request::ClientRequest;
use crate::secrets::SecretScrubber;
use crate::stages::context::Inbound;
use crate::stages::context::RequestContext;
use crate::stages::route::PlannedAttempt;
use crate::stages::upstream::{ProbeRequest, UpstreamError};

/// A translated whole answer.
pub use crate::plugin::translator::TranslatedAnswer as Answer;

/// Finishes an answer's OpenAI body where the host owns the client protocol: usage the host
/// counted itself (the upstream reported none) goes into `usage`, and embedding vectors a
/// translator returned as floats are encoded when the client asked for base64 (little-endian
/// f32, as OpenAI encodes them). The body is parsed only when one of the two applies.
pub fn complete_body(request: &ClientRequest, answer: &mut Answer) {
    // Upstreams that honour `encoding_format` themselves (OpenAI) send strings: nothing to do.
    let encode = request.base64_embeddings
        && (answer.body.contains("\"embedding\":[") || answer.body.contains("\"embedding\": ["));
    if !answer.usage.estimated && !encode {
        return;
    }
    let Ok(serde_json::Value::Object(mut body)) = serde_json::from_str(&answer.body) else {
        return;
    };
    if answer.usage.estimated {
        let usage = &answer.usage;
        let counted = match request.operation {
            Operation::Chat => serde_json::json!({
                "prompt_tokens": usage.input_tokens,
                "completion_tokens": usage.output_tokens,
                "total_tokens": usage.input_tokens.saturating_add(usage.output_tokens),
            }),
            Operation::Embeddings => serde_json::json!({
                "prompt_tokens": usage.input_tokens,
                "total_tokens": usage.input_tokens,
            }),
        };
        body.insert("usage".to_owned(), counted);
    }
    if encode {
        for item in body
            .get_mut("data")
            .and_then(serde_json::Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(vector) = item.get("embedding").and_then(serde_json::Value::as_array) {
                let bytes: Vec<u8> = vector
                    .iter()
                    .filter_map(serde_json::Value::as_f64)
                    .flat_map(|value| (value as f32).to_le_bytes())
                    .collect();
                item["embedding"] = serde_json::Value::String(
                    base64::engine::general_purpose::STANDARD.encode(bytes),
                );
            }
        }
    }
    answer.body = serde_json::Value::Object(body).to_string();
}

/// Why a translation failed.
#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    /// The client's request cannot be expressed for this upstream (400, not retried).
    #[error("{message}")]
    InvalidRequest {
        /// The translator's message.
        message: String,
        /// The offending field.
        param: Option<String>,
    },
    /// The upstream's answer was a failure, or unreadable: the attempt failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The translator plugin failed.
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

impl TranslateError {
    /// The same error with the channel's secrets taken out of what the upstream wrote into it
    /// (an in-stream error event may echo the key, as an error body may).
    pub fn scrubbed(mut self, secrets: &SecretScrubber) -> Self {
        let scrub = |text: &mut String| {
            if let std::borrow::Cow::Owned(clean) = secrets.scrub(text) {
                *text = clean;
            }
        };
        match &mut self {
            TranslateError::Upstream(UpstreamError::Failure { failure, .. }) => {
                scrub(&mut failure.message);
                failure.code.as_mut().map(scrub);
                failure.param.as_mut().map(scrub);
            }
            TranslateError::Upstream(
                UpstreamError::Malformed { reason, .. } | UpstreamError::Unsupported { reason, .. },
            ) => scrub(reason),
            _ => {}
        }
        self
    }
}

/// The translator bound to a channel's protocol for this request's tenant.
pub fn translator(context: &RequestContext, channel: &Channel) -> Result<Resolved, PluginError> {
    context.bindings.require(
        &context.caller.tenant,
        Role::Translator,
        Some(&channel.config.protocol),
    )
}

/// The facts every translator call of one attempt receives.
pub fn attempt_context(
    context: &RequestContext,
    channel: &Channel,
    attempt: &PlannedAttempt,
) -> AttemptContext {
    AttemptContext {
        request_id: context.request_id.clone(),
        operation: context.request.operation,
        public_model: context.request.model.clone(),
        upstream_model: attempt.upstream_model.clone(),
        channel: channel.config.name.clone(),
        channel_options: channel.options_json.clone(),
        stream: context.request.stream,
        include_usage: context.request.include_usage,
        created_unix_s: context.received_unix_ms / 1000,
    }
}

/// Maps the translator's own error for an attempt on `channel`, its secrets scrubbed.
pub fn plugin_error(channel: &Channel, error: wit::TranslateError) -> TranslateError {
    plugin_error_named(&channel.config.name, error).scrubbed(&channel.secrets)
}

/// [`plugin_error`] for a channel known by name.
pub fn plugin_error_named(channel: &str, error: wit::TranslateError) -> TranslateError {
    let channel = channel.to_owned();
    match error {
        wit::TranslateError::InvalidRequest(invalid) => TranslateError::InvalidRequest {
            message: invalid.message,
            param: invalid.param,
        },
        wit::TranslateError::Upstream(failure) => {
            TranslateError::Upstream(UpstreamError::Failure {
                channel,
                failure: Box::new(failure),
            })
        }
        wit::TranslateError::MalformedResponse(reason) => {
            TranslateError::Upstream(UpstreamError::Malformed { channel, reason })
        }
        wit::TranslateError::Unsupported(reason) => {
            TranslateError::Upstream(UpstreamError::Unsupported { channel, reason })
        }
    }
}

fn request_kind(operation: Operation) -> RequestKind {
    match operation {
        Operation::Chat => RequestKind::Chat,
        Operation::Embeddings => RequestKind::Embeddings,
    }
}

/// Builds the upstream request of one attempt, failing open to the global translator if the
/// binding says so.
pub async fn request(
    translator: &Resolved,
    channel: &Channel,
    attempt: &AttemptContext,
    body: &str,
) -> Result<Called<UpstreamRequest>, TranslateError> {
    let kind = request_kind(attempt.operation);
    let called = translator
        .call(|binding| async move { binding.translate_request(kind, attempt, body).await })
        .await?;
    addressed(called, channel)
}

/// The translator's answer, placed under the channel's base URL by [`place`].
fn addressed(
    called: Called<Result<UpstreamRequest, wit::TranslateError>>,
    channel: &Channel,
) -> Result<Called<UpstreamRequest>, TranslateError> {
    let translator = called.ran.clone();
    called.try_map(|translated| {
        let mut request = translated.map_err(|error| plugin_error(channel, error))?;
        place(&mut request, &translator, channel);
        Ok(request)
    })
}

/// Puts the request under the channel's base URL as its translator means it: when the base URL
/// is a bare host, under the translator's version path (`/v1`) first, so an operator may write the
/// base URL as the provider's SDKs take it.
fn place(request: &mut UpstreamRequest, translator: &Binding, channel: &Channel) {
    if let Some(version_path) = translator.version_path()
        && channel.base_url.path() == "/"
    {
        request
            .path
            .insert_str(0, version_path.trim_end_matches('/'));
    }
}

/// The request of a channel's silence probe (see [`crate::health::SilenceWatch`]): the smallest
/// streamed chat of the attempt's model, built by the translator of the attempt, so it goes where
/// and how that channel's calls go.
pub struct SilenceProbe<'a> {
    /// The attempt's translator.
    pub translator: &'a Binding,
    /// The attempt.
    pub attempt: &'a AttemptContext,
    /// The channel it goes to.
    pub channel: &'a Channel,
}

impl ProbeRequest for SilenceProbe<'_> {
    async fn build(&self) -> Option<UpstreamRequest> {
        let probe = AttemptContext {
            operation: Operation::Chat,
            stream: true,
            include_usage: false,
            ..self.attempt.clone()
        };
        let body = serde_json::json!({
            "model": self.attempt.public_model,
            "messages": [{"role": "user", "content": "ping"}],
            "max_tokens": 1,
            "stream": true,
        })
        .to_string();
        let mut request = match self
            .translator
            .translate_request(RequestKind::Chat, &probe, &body)
            .await
        {
            Ok(Ok(request)) => request,
            _ => return None,
        };
        place(&mut request, self.translator, self.channel);
        Some(request)
    }
}

/// Builds the upstream request that forwards the client's own body to a channel of its protocol,
/// failing open like [`request`].
pub async fn forward(
    translator: &Resolved,
    channel: &Channel,
    attempt: &AttemptContext,
    inbound: &Inbound,
) -> Result<Called<UpstreamRequest>, TranslateError> {
    let called = translator
        .call(|binding| async move {
            binding
                .forward_request(inbound.endpoint, attempt, &inbound.body, &inbound.headers)
                .await
        })
        .await?;
    addressed(called, channel)
}

/// Reads a whole answer of the client's own protocol: a failure for non-2xx, else the body as it
/// came with its usage read.
pub async fn forwarded_answer(
    translator: &Binding,
    channel: &Channel,
    attempt: &AttemptContext,
    endpoint: Endpoint,
    response: &UpstreamResponse,
) -> Result<Answer, TranslateError> {
    if !(200..300).contains(&response.status) {
        return Err(failure(translator, channel, attempt, response).await);
    }
    let answer = translator
        .read_forwarded_response(endpoint, attempt, response)
        .await?
        .map_err(|error| plugin_error(channel, error))?;
    Ok(Answer {
        body: answer.body,
        usage: answer.usage,
        served_model: answer.served_model,
    })
}

/// Reads a whole upstream answer: a failure for non-2xx, else the OpenAI-shaped answer.
pub async fn answer(
    translator: &Binding,
    channel: &Channel,
    attempt: &AttemptContext,
    response: &UpstreamResponse,
) -> Result<Answer, TranslateError> {
    if !(200..300).contains(&response.status) {
        return Err(failure(translator, channel, attempt, response).await);
    }
    translator
        .translate_response(request_kind(attempt.operation), attempt, response)
        .await?
        .map_err(|error| plugin_error(channel, error))
}

/// Classifies a non-2xx answer with the translator.
pub async fn failure(
    translator: &Binding,
    channel: &Channel,
    attempt: &AttemptContext,
    response: &UpstreamResponse,
) -> TranslateError {
    match translator.read_failure(attempt, response).await {
        Ok(failure) => TranslateError::Upstream(UpstreamError::Failure {
            channel: channel.config.name.clone(),
            failure: Box::new(failure),
        })
        .scrubbed(&channel.secrets),
        Err(error) => TranslateError::Plugin(error),
    }
}
