//! Same protocol: the client's Messages body to an Anthropic channel and the answer back, both
//! untouched but for the model name. Values are carried as raw JSON text, so `cache_control`,
//! thinking signatures, citations and fields this plugin has never heard of reach the upstream and
//! the client byte for byte; only the usage is read on the way back.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;
use tollgate_plugin_sdk::inbound::{
    AttemptContext, Endpoint, ForwardStream, ForwardedAnswer, ForwardedEnd, Header, StreamEvent,
    TranslateError, UpstreamRequest, UpstreamResponse,
};
use tollgate_plugin_sdk::translator::{
    AuthPlacement, HttpMethod, InvalidRequest, StreamFraming, stream_usage,
};

use crate::failure::failure;
use crate::stream::Event;
use crate::usage::AnthropicUsage;
use crate::{ChannelOptions, DEFAULT_API_VERSION};

/// Client headers Anthropic defines and the upstream should see.
const FORWARDED_HEADERS: [&str; 2] = ["anthropic-version", "anthropic-beta"];

/// The upstream request: the client's body with the routed model.
pub fn request(
    endpoint: Endpoint,
    context: &AttemptContext,
    body: &str,
    client_headers: &[Header],
) -> Result<UpstreamRequest, TranslateError> {
    let mut fields: BTreeMap<String, &RawValue> = serde_json::from_str(body).map_err(|_| {
        TranslateError::InvalidRequest(InvalidRequest {
            message: "The request body must be a JSON object.".to_owned(),
            param: None,
        })
    })?;
    let model = serde_json::to_string(&context.upstream_model)
        .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?;
    let model = RawValue::from_string(model)
        .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?;
    fields.insert("model".to_owned(), &model);
    let stream = fields
        .get("stream")
        .is_some_and(|stream| stream.get().trim() == "true");
    let body = serde_json::to_vec(&fields)
        .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?;

    let options: ChannelOptions =
        serde_json::from_str(&context.channel_options).unwrap_or_default();
    let client = |name: &str| {
        client_headers
            .iter()
            .find(|(header, _)| header == name && FORWARDED_HEADERS.contains(&name))
            .map(|(_, value)| value.clone())
    };
    let version = client("anthropic-version")
        .or(options.anthropic_version)
        .unwrap_or_else(|| DEFAULT_API_VERSION.to_owned());
    let mut headers = vec![("anthropic-version".to_owned(), version)];
    let mut betas: Vec<String> = client("anthropic-beta")
        .map(|betas| {
            betas
                .split(',')
                .map(|beta| beta.trim().to_owned())
                .collect()
        })
        .unwrap_or_default();
    for beta in options.beta {
        if !betas.contains(&beta) {
            betas.push(beta);
        }
    }
    betas.retain(|beta| !beta.is_empty());
    if !betas.is_empty() {
        headers.push(("anthropic-beta".to_owned(), betas.join(",")));
    }
    let path = match endpoint {
        Endpoint::Messages => "/messages",
        Endpoint::CountTokens => "/messages/count_tokens",
    };
    Ok(UpstreamRequest {
        method: HttpMethod::Post,
        path: path.to_owned(),
        headers,
        body,
        auth: AuthPlacement::Header("x-api-key".to_owned()),
        framing: (stream && endpoint == Endpoint::Messages).then_some(StreamFraming::Sse),
    })
}

/// The parts of an answer the plugin reads; the rest passes untouched.
#[derive(Deserialize)]
struct Counted {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<AnthropicUsage>,
}

/// A 2xx whole answer, passed back as it came, its usage read.
pub fn response(
    endpoint: Endpoint,
    response: UpstreamResponse,
) -> Result<ForwardedAnswer, TranslateError> {
    let body = String::from_utf8(response.body)
        .map_err(|_| TranslateError::MalformedResponse("the answer is not UTF-8".to_owned()))?;
    let counted: Counted = serde_json::from_str(&body)
        .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?;
    let usage = match endpoint {
        Endpoint::Messages => counted.usage.unwrap_or_default().normalize(),
        Endpoint::CountTokens => AnthropicUsage::default().normalize(),
    };
    Ok(ForwardedAnswer {
        body,
        usage,
        served_model: counted.model,
    })
}

/// A streamed answer passed through event by event.
pub struct ForwardedStream {
    usage: Option<AnthropicUsage>,
    served_model: Option<String>,
    stopped: bool,
    /// Bytes of content deltas passed, for an estimate when the stream is cut before its usage.
    delta_bytes: usize,
}

impl ForwardStream for ForwardedStream {
    fn new(_context: AttemptContext) -> Self {
        Self {
            usage: None,
            served_model: None,
            stopped: false,
            delta_bytes: 0,
        }
    }

    fn push(&mut self, event: StreamEvent) -> Result<Vec<StreamEvent>, TranslateError> {
        // Deltas are most of a stream and carry no usage: pass them without parsing.
        if event.event.as_deref() == Some("content_block_delta") {
            self.delta_bytes += event.data.len();
            return Ok(vec![event]);
        }
        match serde_json::from_str::<Event>(&event.data) {
            Ok(Event::MessageStart { message }) => {
                self.served_model = message.model;
                self.usage = message.usage;
            }
            Ok(Event::MessageDelta {
                usage: Some(later), ..
            }) => {
                self.usage
                    .get_or_insert_with(AnthropicUsage::default)
                    .update(&later);
            }
            Ok(Event::MessageStop) => self.stopped = true,
            Ok(Event::Error { error }) => {
                return Err(TranslateError::Upstream(failure(0, error, None)));
            }
            Ok(_) | Err(_) => {}
        }
        Ok(vec![event])
    }

    fn finish(&mut self) -> Result<ForwardedEnd, TranslateError> {
        Ok(ForwardedEnd {
            events: Vec::new(),
            usage: stream_usage(
                self.usage.as_ref().map(AnthropicUsage::normalize),
                self.stopped,
                self.delta_bytes / 2,
            ),
            served_model: self.served_model.clone(),
            complete: self.stopped,
        })
    }
}
