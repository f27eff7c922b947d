//! {{name}}: a Tollgate translator for an OpenAI-compatible upstream that wants its key in an
//! `api-key` header. Requests and answers pass through but for the model name; usage is read for
//! billing. Change `chat_request` and the readers to speak another protocol.

use serde::Deserialize;
use serde_json::Value;
use tollgate_plugin_sdk::export_translator;
use tollgate_plugin_sdk::translator::{
    AttemptContext, AuthPlacement, ChatResponse, FailureClass, HttpMethod, InvalidRequest,
    StreamEnd, StreamEvent, StreamFraming, StreamTranslate, TranslateError, Translator,
    UpstreamFailure, UpstreamRequest, UpstreamResponse, Usage, failure_message, unreported_usage,
};

/// The parts of an answer or chunk this plugin reads.
#[derive(Debug, Default, Deserialize)]
struct Answer {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<Tokens>,
}

#[derive(Debug, Default, Deserialize)]
struct Tokens {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

impl Tokens {
    fn usage(&self) -> Usage {
        Usage {
            input_tokens: self.prompt_tokens,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            output_tokens: self.completion_tokens,
            reasoning_tokens: 0,
            estimated: false,
        }
    }
}

/// The translator.
struct Plugin;

impl Translator for Plugin {
    type Stream = Stream;

    fn chat_request(
        context: AttemptContext,
        body: String,
    ) -> Result<UpstreamRequest, TranslateError> {
        let Ok(Value::Object(mut request)) = serde_json::from_str::<Value>(&body) else {
            return Err(TranslateError::InvalidRequest(InvalidRequest {
                message: "the request body must be a JSON object".to_owned(),
                param: None,
            }));
        };
        request.insert("model".to_owned(), Value::String(context.upstream_model));
        if context.stream {
            request.insert(
                "stream_options".to_owned(),
                serde_json::json!({"include_usage": true}),
            );
        }
        Ok(UpstreamRequest {
            method: HttpMethod::Post,
            path: "/chat/completions".to_owned(),
            headers: Vec::new(),
            body: serde_json::to_vec(&request)
                .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?,
            auth: AuthPlacement::Header("api-key".to_owned()),
            framing: context.stream.then_some(StreamFraming::Sse),
        })
    }

    fn chat_response(
        _context: AttemptContext,
        response: UpstreamResponse,
    ) -> Result<ChatResponse, TranslateError> {
        let answer: Answer = serde_json::from_slice(&response.body)
            .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?;
        Ok(ChatResponse {
            body: String::from_utf8(response.body)
                .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?,
            usage: answer.usage.map_or_else(unreported_usage, |tokens| tokens.usage()),
            served_model: answer.model,
        })
    }

    fn read_failure(_context: AttemptContext, response: UpstreamResponse) -> UpstreamFailure {
        let message = serde_json::from_slice::<Value>(&response.body)
            .ok()
            .and_then(|body| body["error"]["message"].as_str().map(str::to_owned));
        let class = match response.status {
            401 | 403 => FailureClass::Authentication,
            429 => FailureClass::RateLimited,
            400..=499 => FailureClass::InvalidRequest,
            503 => FailureClass::Overloaded,
            _ => FailureClass::Server,
        };
        UpstreamFailure {
            class,
            status: response.status,
            message: failure_message(message, response.status),
            code: None,
            param: None,
            retry_after_ms: None,
        }
    }
}

/// One streamed answer: chunks pass through; usage and model are noted on the way.
pub struct Stream {
    usage: Option<Usage>,
    served_model: Option<String>,
}

impl StreamTranslate for Stream {
    fn new(_context: AttemptContext) -> Self {
        Self {
            usage: None,
            served_model: None,
        }
    }

    fn push(&mut self, event: StreamEvent) -> Result<Vec<String>, TranslateError> {
        if event.data == "[DONE]" {
            return Ok(Vec::new());
        }
        let chunk: Answer = serde_json::from_str(&event.data)
            .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?;
        if self.served_model.is_none() {
            self.served_model = chunk.model;
        }
        if let Some(tokens) = chunk.usage {
            self.usage = Some(tokens.usage());
        }
        Ok(vec![event.data])
    }

    fn finish(&mut self) -> Result<StreamEnd, TranslateError> {
        Ok(StreamEnd {
            chunks: Vec::new(),
            usage: self.usage,
            served_model: self.served_model.take(),
        })
    }
}

export_translator!(Plugin);

// `cargo test` runs these natively: the SDK stands in for the host (`host::testing`).
#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_plugin_sdk::translator::testing::context;

    #[test]
    fn the_upstream_model_goes_in_and_the_key_in_api_key() {
        let body = r#"{"model":"public-model","messages":[{"role":"user","content":"hi"}]}"#;
        let request = Plugin::chat_request(context("upstream-model", false), body.to_owned())
            .expect("translated");
        let sent: Value = serde_json::from_slice(&request.body).expect("JSON");
        assert_eq!(sent["model"], "upstream-model");
        assert!(matches!(request.auth, AuthPlacement::Header(name) if name == "api-key"));
    }

    #[test]
    fn a_rate_limit_is_read_as_one() {
        let response = UpstreamResponse {
            status: 429,
            headers: Vec::new(),
            body: br#"{"error":{"message":"slow down"}}"#.to_vec(),
        };
        let failure = Plugin::read_failure(context("upstream-model", false), response);
        assert!(matches!(failure.class, FailureClass::RateLimited));
        assert_eq!(failure.message, "slow down");
    }
}
