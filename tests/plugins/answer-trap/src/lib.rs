//! An OpenAI translator that builds sound requests and traps on every answer: `chat_response` and
//! each stream `push` panic. A canary of it fails only after the upstream call, where the host
//! must still count its failures.

use tollgate_plugin_sdk::export_translator;
use tollgate_plugin_sdk::translator::{
    AttemptContext, AuthPlacement, ChatResponse, FailureClass, HttpMethod, StreamEnd, StreamEvent,
    StreamFraming, StreamTranslate, TranslateError, Translator, UpstreamFailure, UpstreamRequest,
    UpstreamResponse,
};

/// The translator.
struct AnswerTrap;

impl Translator for AnswerTrap {
    type Stream = AnswerTrapStream;

    fn chat_request(
        context: AttemptContext,
        body: String,
    ) -> Result<UpstreamRequest, TranslateError> {
        let mut request: serde_json::Value = serde_json::from_str(&body)
            .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?;
        request["model"] = serde_json::Value::String(context.upstream_model.clone());
        Ok(UpstreamRequest {
            method: HttpMethod::Post,
            path: "/chat/completions".to_owned(),
            headers: Vec::new(),
            body: request.to_string().into_bytes(),
            auth: AuthPlacement::Bearer,
            framing: context.stream.then_some(StreamFraming::Sse),
        })
    }

    fn chat_response(
        _context: AttemptContext,
        _response: UpstreamResponse,
    ) -> Result<ChatResponse, TranslateError> {
        panic!("this test plugin traps on every answer");
    }

    fn read_failure(_context: AttemptContext, response: UpstreamResponse) -> UpstreamFailure {
        UpstreamFailure {
            class: FailureClass::Server,
            status: response.status,
            message: "upstream failure".to_owned(),
            code: None,
            param: None,
            retry_after_ms: None,
        }
    }
}

/// A stream that traps on its first event.
pub struct AnswerTrapStream;

impl StreamTranslate for AnswerTrapStream {
    fn new(_context: AttemptContext) -> Self {
        Self
    }

    fn push(&mut self, _event: StreamEvent) -> Result<Vec<String>, TranslateError> {
        panic!("this test plugin traps on every stream event");
    }

    fn finish(&mut self) -> Result<StreamEnd, TranslateError> {
        panic!("this test plugin traps at the end of a stream");
    }
}

export_translator!(AnswerTrap);
