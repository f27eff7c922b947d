//! The translator role: speak one upstream protocol.

pub use crate::types::{FailureClass, Header, InvalidRequest, Operation, UpstreamFailure, Usage};
pub use crate::wit::translator::exports::tollgate::plugin::translator::{
    AttemptContext, AuthPlacement, ChatResponse, EmbeddingsResponse, HttpMethod, StreamEnd,
    StreamEvent, StreamFraming, TranslateError, UpstreamRequest, UpstreamResponse,
};

/// The client's body as a JSON object of `T`'s shape (a map of values, or of raw JSON text to
/// splice without parsing); otherwise the client's mistake.
pub fn request_object<'a, T: serde::Deserialize<'a>>(body: &'a str) -> Result<T, TranslateError> {
    serde_json::from_str(body).map_err(|_| {
        TranslateError::InvalidRequest(InvalidRequest {
            message: "the request body must be a JSON object".to_owned(),
            param: None,
        })
    })
}

/// A `POST` of `body` as JSON to `path` under the channel's base URL.
pub fn post_json(
    path: String,
    headers: Vec<Header>,
    body: &impl serde::Serialize,
    auth: AuthPlacement,
    framing: Option<StreamFraming>,
) -> Result<UpstreamRequest, TranslateError> {
    let body = serde_json::to_vec(body)
        .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?;
    Ok(UpstreamRequest {
        method: HttpMethod::Post,
        path,
        headers,
        body,
        auth,
        framing,
    })
}

/// Usage the upstream did not report: zeros flagged `estimated`. The host counts the prompt itself
/// when `input_tokens` is 0; a translator that saw some of the answer sets `output_tokens` (about
/// four bytes of text a token).
pub fn unreported_usage() -> Usage {
    Usage {
        input_tokens: 0,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        output_tokens: 0,
        reasoning_tokens: 0,
        estimated: true,
    }
}

/// The message of an upstream failure: the upstream's own, or — when it gave none or an empty
/// one — a stand-in naming the status, so the client always reads why.
pub fn failure_message(message: Option<String>, status: u16) -> String {
    message
        .filter(|message| !message.trim().is_empty())
        .unwrap_or_else(|| format!("upstream answered HTTP {status}"))
}

/// A 404 about the path, not the model: the upstream has nothing where the channel's base URL and
/// the translator's path lead (a base URL missing or doubling its version path, a proxy's prefix).
/// Classed `server`, so the request fails over: this channel can serve nothing, another may. The
/// message says so and quotes the start of what the upstream answered (the host scrubs secrets
/// from it before anyone sees it).
pub fn unknown_path(body: &[u8]) -> UpstreamFailure {
    const QUOTED_CHARS: usize = 200;
    let answered: String = String::from_utf8_lossy(body)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(QUOTED_CHARS)
        .collect();
    UpstreamFailure {
        class: FailureClass::Server,
        status: 404,
        message: format!(
            "the upstream has no such path (404): check the channel's base_url; it answered: {answered}"
        ),
        code: None,
        param: None,
        retry_after_ms: None,
    }
}

/// The delay of a `retry-after` header in milliseconds: its delay-seconds, with a fraction as some
/// upstreams send (`2`, `1.5`; digits past milliseconds are dropped). `None` for anything else,
/// an HTTP date included. Read without float parsing, whose tables would add 10 KiB to the memory
/// image of every instance of the plugin.
pub fn retry_after_ms(value: &str) -> Option<u64> {
    let value = value.trim();
    let (seconds, fraction) = value.split_once('.').unwrap_or((value, ""));
    let all_digits = |text: &str| text.bytes().all(|byte| byte.is_ascii_digit());
    if seconds.is_empty() || !all_digits(seconds) || !all_digits(fraction) {
        return None;
    }
    let millis = fraction
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0, |millis, digit| millis * 10 + u64::from(digit - b'0'));
    seconds
        .parse::<u64>()
        .ok()?
        .checked_mul(1000)?
        .checked_add(millis)
}

/// The usage of a stream at its end. A stream that `ended` (its upstream said so) has the reported
/// usage; one cut before that is charged for at least what was delivered (about four bytes of
/// text a token) on top of whatever was reported, flagged as an estimate (the host counts the
/// prompt when the input is 0). `None` when nothing was reported or delivered.
pub fn stream_usage(
    reported: Option<Usage>,
    ended: bool,
    delivered_text_bytes: usize,
) -> Option<Usage> {
    if ended && let Some(reported) = reported {
        return Some(reported);
    }
    let mut usage = reported.unwrap_or_else(unreported_usage);
    usage.output_tokens = usage
        .output_tokens
        .max(delivered_text_bytes.div_ceil(4) as u64);
    usage.estimated = true;
    (usage.input_tokens > 0 || usage.output_tokens > 0).then_some(usage)
}

/// OpenAI's `usage` object for a normalized usage (cached tokens as `prompt_tokens_details`,
/// reasoning as `completion_tokens_details`).
pub fn openai_usage(usage: &Usage) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens.saturating_add(usage.output_tokens),
        "prompt_tokens_details": { "cached_tokens": usage.cache_read_tokens },
        "completion_tokens_details": { "reasoning_tokens": usage.reasoning_tokens }
    })
}

/// Writes the OpenAI `chat.completion.chunk`s of one stream: the same id, model and creation time
/// on every chunk, serialized from borrowed fields (no copy of them per chunk), and the role in the
/// first chunk only.
#[derive(Debug, Clone)]
pub struct ChunkWriter {
    /// The chunk id (`chatcmpl-…`); may change until the first chunk is written.
    pub id: String,
    /// The model name to report.
    pub model: String,
    /// Unix seconds, for `created`.
    pub created: u64,
    role_sent: bool,
}

#[derive(serde::Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChunkChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<serde_json::Value>,
}

#[derive(serde::Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: serde_json::Value,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
}

impl ChunkWriter {
    /// A writer for one stream.
    pub fn new(id: String, model: String, created: u64) -> Self {
        Self {
            id,
            model,
            created,
            role_sent: false,
        }
    }

    /// Whether the first chunk (the one with the role) went out.
    pub fn started(&self) -> bool {
        self.role_sent
    }

    /// Appends the role chunk, if it has not gone out yet.
    pub fn start(&mut self, chunks: &mut Vec<String>) {
        if !self.role_sent {
            self.role_sent = true;
            chunks.push(self.delta(
                serde_json::json!({ "role": "assistant", "content": "" }),
                None,
            ));
        }
    }

    /// Appends a content chunk, after the role chunk if that has not gone out yet.
    pub fn emit(&mut self, chunks: &mut Vec<String>, delta: serde_json::Value) {
        self.start(chunks);
        chunks.push(self.delta(delta, None));
    }

    /// A chunk with one choice carrying `delta` (and the finish reason, on the last one).
    pub fn delta(&self, delta: serde_json::Value, finish_reason: Option<&str>) -> String {
        self.write(
            &[ChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason,
            }],
            None,
        )
    }

    /// The usage chunk: no choices, the usage (sent only to clients that asked for it).
    pub fn usage(&self, usage: &Usage) -> String {
        self.write(&[], Some(openai_usage(usage)))
    }

    fn write(&self, choices: &[ChunkChoice<'_>], usage: Option<serde_json::Value>) -> String {
        let chunk = Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
            usage,
        };
        serde_json::to_string(&chunk)
            .expect("a chunk of strings, numbers and JSON values always serializes")
    }
}

/// A translator plugin. Implement it on a unit struct and export it with
/// [`export_translator!`](crate::export_translator). Every function must be pure over its inputs: the
/// host calls them again for each attempt of a request.
pub trait Translator {
    /// Translates one streamed answer; see [`StreamTranslate`].
    type Stream: StreamTranslate;

    /// The path a channel's bare base URL stands for (`/v1` when the provider's SDKs call
    /// `https://api.example.com` and the API lives under `/v1`): the host puts it before every
    /// request path when the channel's base URL has no path. `None` (the default): base URLs are
    /// used as they are.
    const VERSION_PATH: Option<&'static str> = None;

    /// Checks the configuration JSON before the operator's binding takes effect. Accepts anything by default.
    fn validate_config(config: &str) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// Builds the upstream request for an OpenAI chat-completions body.
    fn chat_request(
        context: AttemptContext,
        body: String,
    ) -> Result<UpstreamRequest, TranslateError>;

    /// Reads a 2xx non-stream chat answer into OpenAI's shape.
    fn chat_response(
        context: AttemptContext,
        response: UpstreamResponse,
    ) -> Result<ChatResponse, TranslateError>;

    /// Builds the upstream request for an OpenAI embeddings body.
    fn embeddings_request(
        context: AttemptContext,
        body: String,
    ) -> Result<UpstreamRequest, TranslateError> {
        let _ = (context, body);
        Err(TranslateError::Unsupported(
            "this protocol has no embeddings".to_owned(),
        ))
    }

    /// Reads a 2xx embeddings answer into OpenAI's shape.
    fn embeddings_response(
        context: AttemptContext,
        response: UpstreamResponse,
    ) -> Result<EmbeddingsResponse, TranslateError> {
        let _ = (context, response);
        Err(TranslateError::Unsupported(
            "this protocol has no embeddings".to_owned(),
        ))
    }

    /// Classifies a non-2xx upstream answer.
    fn read_failure(context: AttemptContext, response: UpstreamResponse) -> UpstreamFailure;
}

/// The state of one streamed answer. The host calls `new`, then `push` per upstream event, then
/// `finish` once.
pub trait StreamTranslate: 'static {
    /// Starts a stream for one attempt.
    fn new(context: AttemptContext) -> Self;
    /// Takes one upstream event; returns the OpenAI chunk payloads to send now.
    fn push(&mut self, event: StreamEvent) -> Result<Vec<String>, TranslateError>;
    /// Ends the stream with trailing chunks, usage and the served model.
    fn finish(&mut self) -> Result<StreamEnd, TranslateError>;
}

/// Exports a [`Translator`] implementation as the plugin's translator world, with no client side
/// (`export_translator!(T)`) or with the [`Inbound`](crate::inbound::Inbound) implementation that
/// lets clients speak the protocol (`export_translator!(T, inbound: I)`).
#[macro_export]
macro_rules! export_translator {
    ($translator:ty) => {
        $crate::export_translator!($translator, inbound: $crate::inbound::NoInbound);
    };
    ($translator:ty, inbound: $inbound:ty) => {
        #[doc(hidden)]
        struct TollgateTranslatorExport;

        #[doc(hidden)]
        struct TollgateStreamExport(
            ::core::cell::RefCell<<$translator as $crate::translator::Translator>::Stream>,
        );


        impl $crate::wit::translator::exports::tollgate::plugin::translator::GuestStreamTranslator
            for TollgateStreamExport
        {

            fn new(context: $crate::translator::AttemptContext) -> Self {
                Self(::core::cell::RefCell::new(
                    <<$translator as $crate::translator::Translator>::Stream as $crate::translator::StreamTranslate>::new(context),
                ))
            }

            fn push(
                &self,
                event: $crate::translator::StreamEvent,
            ) -> Result<Vec<String>, $crate::translator::TranslateError> {
                $crate::translator::StreamTranslate::push(&mut *self.0.borrow_mut(), event)
            }

            fn finish(&self) -> Result<$crate::translator::StreamEnd, $crate::translator::TranslateError> {
                $crate::translator::StreamTranslate::finish(&mut *self.0.borrow_mut())
            }
        }

        impl $crate::wit::translator::exports::tollgate::plugin::translator::Guest
            for TollgateTranslatorExport
        {
            type StreamTranslator = TollgateStreamExport;

            fn validate_config(config: String) -> Result<(), String> {
                <$translator as $crate::translator::Translator>::validate_config(&config)
            }

            fn translate_chat_request(
                context: $crate::translator::AttemptContext,
                body: String,
            ) -> Result<$crate::translator::UpstreamRequest, $crate::translator::TranslateError> {
                <$translator as $crate::translator::Translator>::chat_request(context, body)
            }

            fn translate_chat_response(
                context: $crate::translator::AttemptContext,
                response: $crate::translator::UpstreamResponse,
            ) -> Result<$crate::translator::ChatResponse, $crate::translator::TranslateError> {
                <$translator as $crate::translator::Translator>::chat_response(context, response)
            }

            fn translate_embeddings_request(
                context: $crate::translator::AttemptContext,
                body: String,
            ) -> Result<$crate::translator::UpstreamRequest, $crate::translator::TranslateError> {
                <$translator as $crate::translator::Translator>::embeddings_request(context, body)
            }

            fn translate_embeddings_response(
                context: $crate::translator::AttemptContext,
                response: $crate::translator::UpstreamResponse,
            ) -> Result<$crate::translator::EmbeddingsResponse, $crate::translator::TranslateError> {
                <$translator as $crate::translator::Translator>::embeddings_response(context, response)
            }

            fn read_failure(
                context: $crate::translator::AttemptContext,
                response: $crate::translator::UpstreamResponse,
            ) -> $crate::translator::UpstreamFailure {
                <$translator as $crate::translator::Translator>::read_failure(context, response)
            }
        }

        #[doc(hidden)]
        struct TollgateForwardedExport(
            ::core::cell::RefCell<<$inbound as $crate::inbound::Inbound>::Forwarded>,
        );

        impl $crate::wit::translator::exports::tollgate::plugin::inbound::GuestForwardedStream
            for TollgateForwardedExport
        {
            fn new(context: $crate::translator::AttemptContext) -> Self {
                Self(::core::cell::RefCell::new(
                    <<$inbound as $crate::inbound::Inbound>::Forwarded as $crate::inbound::ForwardStream>::new(context),
                ))
            }

            fn push(
                &self,
                event: $crate::translator::StreamEvent,
            ) -> Result<Vec<$crate::translator::StreamEvent>, $crate::translator::TranslateError> {
                $crate::inbound::ForwardStream::push(&mut *self.0.borrow_mut(), event)
            }

            fn finish(&self) -> Result<$crate::inbound::ForwardedEnd, $crate::translator::TranslateError> {
                $crate::inbound::ForwardStream::finish(&mut *self.0.borrow_mut())
            }
        }

        #[doc(hidden)]
        struct TollgateConvertedExport(
            ::core::cell::RefCell<<$inbound as $crate::inbound::Inbound>::Converted>,
        );

        impl $crate::wit::translator::exports::tollgate::plugin::inbound::GuestOpenaiStream
            for TollgateConvertedExport
        {
            fn new(context: $crate::translator::AttemptContext) -> Self {
                Self(::core::cell::RefCell::new(
                    <<$inbound as $crate::inbound::Inbound>::Converted as $crate::inbound::ConvertStream>::new(context),
                ))
            }

            fn push(
                &self,
                chunk: String,
            ) -> Result<Vec<$crate::translator::StreamEvent>, $crate::translator::TranslateError> {
                $crate::inbound::ConvertStream::push(&mut *self.0.borrow_mut(), chunk)
            }

            fn finish(
                &self,
                usage: $crate::translator::Usage,
            ) -> Result<Vec<$crate::translator::StreamEvent>, $crate::translator::TranslateError> {
                $crate::inbound::ConvertStream::finish(&mut *self.0.borrow_mut(), usage)
            }
        }

        impl $crate::wit::translator::exports::tollgate::plugin::inbound::Guest
            for TollgateTranslatorExport
        {
            type ForwardedStream = TollgateForwardedExport;
            type OpenaiStream = TollgateConvertedExport;

            fn to_openai_request(
                endpoint: $crate::inbound::Endpoint,
                body: String,
            ) -> Result<String, $crate::translator::InvalidRequest> {
                <$inbound as $crate::inbound::Inbound>::to_openai_request(endpoint, body)
            }

            fn forward_request(
                endpoint: $crate::inbound::Endpoint,
                context: $crate::translator::AttemptContext,
                body: String,
                client_headers: Vec<$crate::translator::Header>,
            ) -> Result<$crate::translator::UpstreamRequest, $crate::translator::TranslateError> {
                <$inbound as $crate::inbound::Inbound>::forward_request(endpoint, context, body, client_headers)
            }

            fn read_forwarded_response(
                endpoint: $crate::inbound::Endpoint,
                context: $crate::translator::AttemptContext,
                response: $crate::translator::UpstreamResponse,
            ) -> Result<$crate::inbound::ForwardedAnswer, $crate::translator::TranslateError> {
                <$inbound as $crate::inbound::Inbound>::read_forwarded_response(endpoint, context, response)
            }

            fn from_openai_response(
                context: $crate::translator::AttemptContext,
                body: String,
            ) -> Result<String, $crate::translator::TranslateError> {
                <$inbound as $crate::inbound::Inbound>::from_openai_response(context, body)
            }

            fn count_tokens_answer(input_tokens: u64) -> String {
                <$inbound as $crate::inbound::Inbound>::count_tokens_answer(input_tokens)
            }
        }

        impl $crate::wit::translator::exports::tollgate::plugin::upstream_address::Guest
            for TollgateTranslatorExport
        {
            fn version_path() -> Option<String> {
                <$translator as $crate::translator::Translator>::VERSION_PATH.map(str::to_owned)
            }
        }

        // Only a wasm build exports the world: a native build (for the plugin's unit tests) cannot
        // link the component-model export names, and holds the exports here instead, so that the
        // plugin's own types are not dead code there.
        #[cfg(not(target_arch = "wasm32"))]
        const _: (fn(String) -> Result<(), String>, fn(u64) -> String) = (
            <TollgateTranslatorExport as $crate::wit::translator::exports::tollgate::plugin::translator::Guest>::validate_config,
            <TollgateTranslatorExport as $crate::wit::translator::exports::tollgate::plugin::inbound::Guest>::count_tokens_answer,
        );
        #[cfg(target_arch = "wasm32")]
        $crate::wit::translator::export_translator_world!(TollgateTranslatorExport with_types_in $crate::wit::translator);
    };
}

#[cfg(test)]
mod tests {
    use super::retry_after_ms;

    #[test]
    fn retry_after_reads_whole_and_fractional_seconds_only() {
        assert_eq!(retry_after_ms("2"), Some(2_000));
        assert_eq!(retry_after_ms(" 20 "), Some(20_000));
        assert_eq!(retry_after_ms("1.5"), Some(1_500));
        assert_eq!(retry_after_ms("0.25"), Some(250));
        assert_eq!(retry_after_ms("3.0004"), Some(3_000));
        assert_eq!(retry_after_ms("7."), Some(7_000));
        for refused in [
            "",
            ".5",
            "-1",
            "+1",
            "1e3",
            "inf",
            "NaN",
            "Wed, 21 Oct 2015 07:28:00 GMT",
        ] {
            assert_eq!(retry_after_ms(refused), None, "{refused:?}");
        }
        assert_eq!(retry_after_ms("18446744073709551615"), None, "overflow");
    }
}

/// Builders for testing translators natively (`cargo test`).
pub mod testing {
    use super::{AttemptContext, Operation};

    /// The context of a chat attempt asking for `public-model`, sent upstream as `upstream_model`
    /// on channel `channel`, streamed or not, with no channel options.
    pub fn context(upstream_model: &str, stream: bool) -> AttemptContext {
        AttemptContext {
            request_id: "test-request".into(),
            operation: Operation::Chat,
            public_model: "public-model".into(),
            upstream_model: upstream_model.into(),
            channel: "channel".into(),
            channel_options: "{}".into(),
            stream,
            include_usage: stream,
            created_unix_s: 1_700_000_000,
        }
    }
}
