//! Translator `openai`: speaks the OpenAI chat-completions and embeddings API, which most upstreams
//! (OpenAI, Azure-style proxies, vLLM, llama.cpp, OpenRouter …) accept. Bodies pass through untouched
//! but for the model name and, on streams, a request for usage so the host can bill what was streamed.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;
use tollgate_plugin_sdk::export_translator;
use tollgate_plugin_sdk::translator::{
    AttemptContext, AuthPlacement, ChatResponse, EmbeddingsResponse, FailureClass, StreamEnd,
    StreamEvent, StreamFraming, StreamTranslate, TranslateError, Translator, UpstreamFailure,
    UpstreamRequest, UpstreamResponse, Usage, failure_message, post_json, request_object,
    retry_after_ms, stream_usage, unknown_path, unreported_usage,
};

/// Channel options an operator may attach to an OpenAI channel.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ChannelOptions {
    /// Sent as `openai-organization`.
    organization: Option<String>,
    /// Sent as `openai-project`.
    project: Option<String>,
}

/// OpenAI's `usage` object (chat and embeddings); unknown fields ignored.
#[derive(Debug, Default, Deserialize)]
struct OpenAiUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<OpenAiPromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<OpenAiCompletionDetails>,
}

#[derive(Debug, Default, Deserialize)]
struct OpenAiPromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct OpenAiCompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl OpenAiUsage {
    /// OpenAI already counts cached tokens inside `prompt_tokens` and reasoning inside
    /// `completion_tokens`, which is the normalized rule; clamp so a buggy upstream cannot break it.
    fn normalize(&self) -> Usage {
        let cached = self
            .prompt_tokens_details
            .as_ref()
            .and_then(|details| details.cached_tokens)
            .unwrap_or(0);
        let reasoning = self
            .completion_tokens_details
            .as_ref()
            .and_then(|details| details.reasoning_tokens)
            .unwrap_or(0);
        Usage {
            input_tokens: self.prompt_tokens,
            cache_read_tokens: cached.min(self.prompt_tokens),
            cache_write_tokens: 0,
            output_tokens: self.completion_tokens,
            reasoning_tokens: reasoning.min(self.completion_tokens),
            estimated: false,
        }
    }
}

/// The parts of a whole answer the translator reads; everything else passes through.
#[derive(Debug, Deserialize)]
struct OpenAiAnswer {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
}

/// The parts of a stream chunk the translator reads.
#[derive(Debug, Deserialize)]
struct OpenAiChunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
    #[serde(default)]
    choices: Vec<OpenAiChunkChoice>,
    #[serde(default)]
    error: Option<OpenAiError>,
}

#[derive(Debug, Default, Deserialize)]
struct OpenAiChunkChoice {
    #[serde(default)]
    delta: OpenAiDelta,
}

#[derive(Debug, Default, Deserialize)]
struct OpenAiDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
}

/// OpenAI's error object.
#[derive(Debug, Default, Deserialize)]
struct OpenAiError {
    #[serde(default)]
    message: Option<String>,
    /// A string or a number, kept as its JSON text.
    #[serde(default)]
    code: Option<Box<RawValue>>,
    #[serde(default)]
    param: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

#[derive(Debug, Deserialize)]
struct OpenAiErrorBody {
    error: OpenAiError,
}

/// The translator.
struct OpenAi;

impl Translator for OpenAi {
    type Stream = OpenAiStream;

    fn chat_request(
        context: AttemptContext,
        body: String,
    ) -> Result<UpstreamRequest, TranslateError> {
        let model = raw(&context.upstream_model)?;
        // Each top-level value kept as raw JSON text: the request goes upstream as the client
        // wrote it but for the fields replaced, and a long conversation is never parsed into a
        // tree and written out again.
        let mut request: BTreeMap<String, &RawValue> = request_object(&body)?;
        request.insert("model".to_owned(), &model);
        let include_usage;
        if context.stream {
            // Always ask for usage: the host bills streams from it. The usage chunk is withheld
            // from clients that did not ask for it (see `OpenAiStream::push`). The client's other
            // stream options pass as it wrote them.
            let mut options: BTreeMap<String, Box<RawValue>> = request
                .get("stream_options")
                .and_then(|options| serde_json::from_str(options.get()).ok())
                .unwrap_or_default();
            options.insert("include_usage".to_owned(), raw(&true)?);
            include_usage = raw(&options)?;
            request.insert("stream_options".to_owned(), &include_usage);
        }
        upstream_request(&context, "/chat/completions", &request)
    }

    fn chat_response(
        _context: AttemptContext,
        response: UpstreamResponse,
    ) -> Result<ChatResponse, TranslateError> {
        let (body, usage, served_model) = read_answer(response)?;
        Ok(ChatResponse {
            body,
            usage,
            served_model,
        })
    }

    fn embeddings_request(
        context: AttemptContext,
        body: String,
    ) -> Result<UpstreamRequest, TranslateError> {
        let model = raw(&context.upstream_model)?;
        // Each top-level value kept as raw JSON text: the request goes upstream as the client
        // wrote it but for the fields replaced, and a long conversation is never parsed into a
        // tree and written out again.
        let mut request: BTreeMap<String, &RawValue> = request_object(&body)?;
        request.insert("model".to_owned(), &model);
        upstream_request(&context, "/embeddings", &request)
    }

    fn embeddings_response(
        _context: AttemptContext,
        response: UpstreamResponse,
    ) -> Result<EmbeddingsResponse, TranslateError> {
        let (body, usage, served_model) = read_answer(response)?;
        Ok(EmbeddingsResponse {
            body,
            usage,
            served_model,
        })
    }

    /// A 404 about the path rather than the model: not JSON at all (a server without the route
    /// answers plain text or HTML), FastAPI's `{"detail":"Not Found"}`, or OpenAI's
    /// `Invalid URL (…)`. Other servers' JSON (vLLM's unknown model, say) is read as before.
    fn read_failure(_context: AttemptContext, response: UpstreamResponse) -> UpstreamFailure {
        if response.status == 404 && is_about_the_path(&response.body) {
            return unknown_path(&response.body);
        }
        let error = serde_json::from_slice::<OpenAiErrorBody>(&response.body)
            .map(|body| body.error)
            .unwrap_or_default();
        let retry_after_ms =
            response
                .headers
                .iter()
                .find_map(|(name, value)| match name.as_str() {
                    "retry-after-ms" => value.trim().parse::<u64>().ok(),
                    "retry-after" => retry_after_ms(value),
                    _ => None,
                });
        failure(response.status, error, retry_after_ms)
    }
}

export_translator!(OpenAi);

/// Whether a 404's body says the path, not the model, is unknown (see `read_failure`).
fn is_about_the_path(body: &[u8]) -> bool {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(body) else {
        return true;
    };
    body["detail"] == "Not Found"
        || body["error"]["message"]
            .as_str()
            .is_some_and(|message| message.starts_with("Invalid URL"))
}

/// A 2xx answer passes through verbatim; only its usage and model are read.
fn read_answer(
    response: UpstreamResponse,
) -> Result<(String, Usage, Option<String>), TranslateError> {
    let answer: OpenAiAnswer = serde_json::from_slice(&response.body)
        .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?;
    let body = String::from_utf8(response.body)
        .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?;
    // No usage reported: zeros flagged as an estimate, which the host then counts itself.
    let usage = answer
        .usage
        .map_or_else(unreported_usage, |usage| usage.normalize());
    Ok((body, usage, answer.model))
}

/// A value as raw JSON text, to replace a field of the client's body. Fields are never rebuilt
/// through a `serde_json::Value`, so what the client wrote passes as written (a number is not
/// reformatted through a float).
fn raw(value: &impl serde::Serialize) -> Result<Box<RawValue>, TranslateError> {
    serde_json::to_string(value)
        .and_then(RawValue::from_string)
        .map_err(|error| TranslateError::MalformedResponse(error.to_string()))
}

fn upstream_request(
    context: &AttemptContext,
    path: &str,
    body: &BTreeMap<String, &RawValue>,
) -> Result<UpstreamRequest, TranslateError> {
    let options: ChannelOptions =
        serde_json::from_str(&context.channel_options).unwrap_or_default();
    let mut headers = Vec::new();
    if let Some(organization) = options.organization {
        headers.push(("openai-organization".to_owned(), organization));
    }
    if let Some(project) = options.project {
        headers.push(("openai-project".to_owned(), project));
    }
    let framing = context.stream.then_some(StreamFraming::Sse);
    post_json(
        path.to_owned(),
        headers,
        body,
        AuthPlacement::Bearer,
        framing,
    )
}

/// Maps an OpenAI error (from a status or a stream's error event) onto a failure class.
fn failure(status: u16, error: OpenAiError, retry_after_ms: Option<u64>) -> UpstreamFailure {
    let code = error.code.as_deref().map(RawValue::get).and_then(|code| {
        if code.starts_with('"') {
            serde_json::from_str::<String>(code).ok()
        } else {
            code.starts_with(|first: char| first == '-' || first.is_ascii_digit())
                .then(|| code.to_owned())
        }
    });
    let class = match status {
        401 | 403 => FailureClass::Authentication,
        429 => FailureClass::RateLimited,
        404 if code.as_deref() == Some("model_not_found") => FailureClass::ModelNotFound,
        400..=499 => FailureClass::InvalidRequest,
        503 | 529 => FailureClass::Overloaded,
        0 if error.kind.as_deref() == Some("invalid_request_error") => FailureClass::InvalidRequest,
        _ => FailureClass::Server,
    };
    UpstreamFailure {
        class,
        status,
        message: failure_message(error.message, status),
        code,
        param: error.param,
        retry_after_ms,
    }
}

/// One streamed answer: chunks pass through verbatim; usage and model are noted on the way.
pub struct OpenAiStream {
    include_usage: bool,
    usage: Option<Usage>,
    served_model: Option<String>,
    /// Bytes of text passed to the client, for an estimate when the upstream reports no usage.
    delivered_text_bytes: usize,
}

impl StreamTranslate for OpenAiStream {
    fn new(context: AttemptContext) -> Self {
        Self {
            include_usage: context.include_usage,
            usage: None,
            served_model: None,
            delivered_text_bytes: 0,
        }
    }

    fn push(&mut self, event: StreamEvent) -> Result<Vec<String>, TranslateError> {
        if event.data == "[DONE]" {
            return Ok(Vec::new());
        }
        let chunk: OpenAiChunk = serde_json::from_str(&event.data)
            .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?;
        self.delivered_text_bytes += chunk
            .choices
            .iter()
            .map(|choice| {
                choice.delta.content.as_deref().map_or(0, str::len)
                    + choice.delta.refusal.as_deref().map_or(0, str::len)
            })
            .sum::<usize>();
        if let Some(error) = chunk.error {
            return Err(TranslateError::Upstream(failure(0, error, None)));
        }
        if self.served_model.is_none() {
            self.served_model = chunk.model;
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage.normalize());
            // The usage-only chunk (no choices) exists because we asked for it; pass it on only to
            // clients that asked too.
            if chunk.choices.is_empty() && !self.include_usage {
                return Ok(Vec::new());
            }
        }
        Ok(vec![event.data])
    }

    fn finish(&mut self) -> Result<StreamEnd, TranslateError> {
        // OpenAI's usage chunk comes last: a stream without it was cut before the end.
        let ended = self.usage.is_some();
        let usage = stream_usage(self.usage.take(), ended, self.delivered_text_bytes);
        Ok(StreamEnd {
            chunks: Vec::new(),
            usage,
            served_model: self.served_model.take(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_plugin_sdk::translator::Operation;

    fn context(stream: bool, include_usage: bool) -> AttemptContext {
        AttemptContext {
            request_id: "r".into(),
            operation: Operation::Chat,
            public_model: "m".into(),
            upstream_model: "up-m".into(),
            channel: "c".into(),
            channel_options: r#"{"organization":"org-1"}"#.into(),
            stream,
            include_usage,
            created_unix_s: 0,
        }
    }

    #[test]
    fn request_gets_upstream_model_and_usage_for_streams() {
        let request = OpenAi::chat_request(
            context(true, false),
            r#"{"model":"m","messages":[],"stream":true,"extra":1}"#.into(),
        )
        .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(body["model"], "up-m");
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["extra"], 1);
        assert_eq!(request.path, "/chat/completions");
        assert!(matches!(request.framing, Some(StreamFraming::Sse)));
        assert_eq!(
            request.headers,
            [("openai-organization".to_owned(), "org-1".to_owned())]
        );
    }

    #[test]
    fn the_clients_body_goes_upstream_as_written_but_for_model_and_stream_options() {
        let body = r#"{"model":"m","temperature":1.50e0,"future":{"b":[1,  2],"a":"\u00e9"},"stream":true,"stream_options":{"keep":1.50e0},"messages":[{"role":"user","content":"hi"}]}"#;
        let request = OpenAi::chat_request(context(true, false), body.to_owned()).unwrap();
        let sent = String::from_utf8(request.body).unwrap();
        for untouched in [
            r#""temperature":1.50e0"#,
            r#""future":{"b":[1,  2],"a":"\u00e9"}"#,
            r#""messages":[{"role":"user","content":"hi"}]"#,
            // Inside the one object the translator rewrites, too.
            r#""keep":1.50e0"#,
        ] {
            assert!(sent.contains(untouched), "{untouched} in {sent}");
        }
        let sent: serde_json::Value = serde_json::from_str(&sent).unwrap();
        assert_eq!(sent["model"], "up-m");
        assert_eq!(
            sent["stream_options"],
            serde_json::json!({"keep": 1.5, "include_usage": true})
        );
        let refused = OpenAi::chat_request(context(false, false), "[1]".to_owned());
        assert!(matches!(refused, Err(TranslateError::InvalidRequest(_))));
    }

    #[test]
    fn usage_chunk_is_withheld_unless_asked_for() {
        let usage_chunk = r#"{"id":"x","object":"chat.completion.chunk","model":"up-m-1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"completion_tokens_details":{"reasoning_tokens":2}}}"#;
        let event = || StreamEvent {
            event: None,
            data: usage_chunk.to_owned(),
        };
        let mut hidden = OpenAiStream::new(context(true, false));
        assert!(hidden.push(event()).unwrap().is_empty());
        let end = hidden.finish().unwrap();
        let usage = end.usage.unwrap();
        assert_eq!(
            (
                usage.input_tokens,
                usage.output_tokens,
                usage.reasoning_tokens
            ),
            (5, 7, 2)
        );
        assert_eq!(end.served_model.as_deref(), Some("up-m-1"));

        let mut shown = OpenAiStream::new(context(true, true));
        assert_eq!(shown.push(event()).unwrap().len(), 1);
    }

    #[test]
    fn error_event_is_an_upstream_failure() {
        let mut stream = OpenAiStream::new(context(true, false));
        let error = stream
            .push(StreamEvent {
                event: None,
                data: r#"{"error":{"message":"boom","type":"server_error"}}"#.into(),
            })
            .unwrap_err();
        assert!(
            matches!(error, TranslateError::Upstream(failure) if failure.class == FailureClass::Server)
        );
    }

    #[test]
    fn statuses_map_to_classes() {
        let response = |status: u16, body: &str, headers: Vec<(String, String)>| UpstreamResponse {
            status,
            headers,
            body: body.as_bytes().to_vec(),
        };
        let limited = OpenAi::read_failure(
            context(false, false),
            response(
                429,
                r#"{"error":{"message":"slow down","code":"rate_limit_exceeded"}}"#,
                vec![("retry-after".into(), "2".into())],
            ),
        );
        assert_eq!(limited.class, FailureClass::RateLimited);
        assert_eq!(limited.retry_after_ms, Some(2000));
        assert_eq!(limited.message, "slow down");
        let missing = OpenAi::read_failure(
            context(false, false),
            response(
                404,
                r#"{"error":{"message":"no","code":"model_not_found"}}"#,
                vec![],
            ),
        );
        assert_eq!(missing.class, FailureClass::ModelNotFound);
        for path in [
            "404 page not found",
            r#"{"detail":"Not Found"}"#,
            r#"{"error":{"message":"Invalid URL (POST /v1/chat/completion)","type":"invalid_request_error"}}"#,
        ] {
            let lost = OpenAi::read_failure(context(false, false), response(404, path, vec![]));
            assert_eq!(lost.class, FailureClass::Server, "{path}");
            assert!(lost.message.contains("no such path"), "{}", lost.message);
        }
        // vLLM's unknown model: JSON of its own shape, read as before (the client's 404).
        let vllm = r#"{"object":"error","message":"The model `x` does not exist.","type":"NotFoundError","code":404}"#;
        let unknown = OpenAi::read_failure(context(false, false), response(404, vllm, vec![]));
        assert_eq!(unknown.class, FailureClass::InvalidRequest);
        let broken = OpenAi::read_failure(context(false, false), response(502, "<html>", vec![]));
        assert_eq!(broken.class, FailureClass::Server);
        assert_eq!(broken.message, "upstream answered HTTP 502");
    }
}
