//! Translator `anthropic`: serves OpenAI-shaped clients from channels that speak Anthropic's
//! Messages API (`POST /v1/messages`). The proof that a protocol is a plugin: nothing in the host
//! knows Anthropic.
//!
//! - `request`: OpenAI chat request → Messages request (system, alternation, tools, images,
//!   structured outputs; what Anthropic cannot express is refused by name).
//! - `answer`: a whole Messages answer → `chat.completion`.
//! - `stream`: Messages events → `chat.completion.chunk`s.
//! - `failure`: Anthropic errors → failover classes.
//! - `inbound`: the client side, for clients that speak Messages to the gateway.
//! - `usage`: Anthropic's token counts → the normalized rule (cache tokens added back).

mod answer;
mod failure;
mod inbound;
mod request;
mod stream;
mod usage;

use serde::Deserialize;
use serde_json::{Map, Value};
use tollgate_plugin_sdk::export_translator;
use tollgate_plugin_sdk::host;
use tollgate_plugin_sdk::translator::{
    AttemptContext, AuthPlacement, ChatResponse, StreamFraming, TranslateError, Translator,
    UpstreamFailure, UpstreamRequest, UpstreamResponse, post_json, request_object,
};

pub use inbound::{ConvertedStream, ForwardedStream, Messages};
pub use stream::AnthropicStream;

/// The API version sent when the channel names none: the only version Anthropic has published.
pub(crate) const DEFAULT_API_VERSION: &str = "2023-06-01";

/// The plugin's configuration, attached by the operator when binding it.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `max_tokens` for requests that set none (Anthropic requires one; OpenAI does not).
    pub default_max_tokens: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            default_max_tokens: 4096,
        }
    }
}

/// Channel options an operator may attach to an Anthropic channel.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ChannelOptions {
    /// Sent as `anthropic-version` (default 2023-06-01).
    pub(crate) anthropic_version: Option<String>,
    /// Beta features, sent as one comma-separated `anthropic-beta` header.
    pub(crate) beta: Vec<String>,
}

/// The translator; `pub` for the fuzz targets.
pub struct Anthropic;

impl Anthropic {
    /// Builds the upstream request with an explicit configuration, so tests and fuzzing need no
    /// host to read it from.
    pub fn chat_request_with(
        context: &AttemptContext,
        body: &str,
        config: &Config,
    ) -> Result<UpstreamRequest, TranslateError> {
        let request: Map<String, Value> = request_object(body)?;
        let body = request::messages_body(
            &request,
            &context.upstream_model,
            context.stream,
            config.default_max_tokens,
        )
        .map_err(TranslateError::InvalidRequest)?;
        let options: ChannelOptions =
            serde_json::from_str(&context.channel_options).unwrap_or_default();
        let mut headers = vec![(
            "anthropic-version".to_owned(),
            options
                .anthropic_version
                .unwrap_or_else(|| DEFAULT_API_VERSION.to_owned()),
        )];
        if !options.beta.is_empty() {
            headers.push(("anthropic-beta".to_owned(), options.beta.join(",")));
        }
        let auth = AuthPlacement::Header("x-api-key".to_owned());
        let framing = context.stream.then_some(StreamFraming::Sse);
        post_json("/messages".to_owned(), headers, &body, auth, framing)
    }
}

impl Translator for Anthropic {
    type Stream = AnthropicStream;

    /// A channel's base URL may be the bare host, as Anthropic's SDKs take it.
    const VERSION_PATH: Option<&'static str> = Some("/v1");

    fn validate_config(config: &str) -> Result<(), String> {
        let config: Config = host::parse_config(config)?;
        if config.default_max_tokens == 0 {
            return Err("default_max_tokens must be at least 1".to_owned());
        }
        Ok(())
    }

    fn chat_request(
        context: AttemptContext,
        body: String,
    ) -> Result<UpstreamRequest, TranslateError> {
        // The host accepted this configuration through `validate_config`; should it still not
        // parse, the defaults serve and the operator reads why in the log.
        let config = host::config::<Config>().unwrap_or_else(|error| {
            host::warn(&error);
            Config::default()
        });
        Self::chat_request_with(&context, &body, &config)
    }

    fn chat_response(
        context: AttemptContext,
        response: UpstreamResponse,
    ) -> Result<ChatResponse, TranslateError> {
        answer::chat_response(&context, &response.body)
    }

    fn read_failure(_context: AttemptContext, response: UpstreamResponse) -> UpstreamFailure {
        failure::read_failure(&response)
    }
}

export_translator!(Anthropic, inbound: Messages);
