//! Translator `gemini`: serves OpenAI-shaped clients from channels that speak Google's Gemini API
//! (`models/{model}:generateContent`, `:streamGenerateContent?alt=sse`, `:batchEmbedContents`).
//!
//! - `request`: OpenAI chat request → `generateContent` (system instruction, user/model turns,
//!   function calls and responses with their thought signatures, media, generation config).
//! - `answer`: a whole response → `chat.completion` (and the response types streams reuse).
//! - `stream`: stream events → `chat.completion.chunk`s.
//! - `embeddings`: embeddings ↔ `batchEmbedContents`.
//! - `failure`: Google errors → failover classes.
//! - `usage`: `usageMetadata` → the normalized rule (thoughts are output).

mod answer;
mod embeddings;
mod failure;
mod request;
mod stream;
mod usage;

use serde_json::{Map, Value};
use tollgate_plugin_sdk::export_translator;
use tollgate_plugin_sdk::translator::{
    AttemptContext, AuthPlacement, ChatResponse, EmbeddingsResponse, StreamFraming, TranslateError,
    Translator, UpstreamFailure, UpstreamRequest, UpstreamResponse, post_json, request_object,
};

pub use stream::GeminiStream;

/// The translator; `pub` for the fuzz targets.
pub struct Gemini;

/// A POST to Gemini, with the key in its header.
fn post(
    path: String,
    body: &Value,
    framing: Option<StreamFraming>,
) -> Result<UpstreamRequest, TranslateError> {
    let auth = AuthPlacement::Header("x-goog-api-key".to_owned());
    post_json(path, Vec::new(), body, auth, framing)
}

impl Translator for Gemini {
    type Stream = GeminiStream;

    /// A channel's base URL may be the bare host, as Google's SDKs take it.
    const VERSION_PATH: Option<&'static str> = Some("/v1beta");

    fn chat_request(
        context: AttemptContext,
        body: String,
    ) -> Result<UpstreamRequest, TranslateError> {
        let request = request_object::<Map<String, Value>>(&body)?;
        let body =
            request::generate_content_body(&request).map_err(TranslateError::InvalidRequest)?;
        let model = &context.upstream_model;
        if context.stream {
            post(
                format!("/models/{model}:streamGenerateContent?alt=sse"),
                &body,
                Some(StreamFraming::Sse),
            )
        } else {
            post(format!("/models/{model}:generateContent"), &body, None)
        }
    }

    fn chat_response(
        context: AttemptContext,
        response: UpstreamResponse,
    ) -> Result<ChatResponse, TranslateError> {
        answer::chat_response(&context, &response.body)
    }

    fn embeddings_request(
        context: AttemptContext,
        body: String,
    ) -> Result<UpstreamRequest, TranslateError> {
        let request = request_object::<Map<String, Value>>(&body)?;
        let body = embeddings::batch_body(&request, &context.upstream_model)
            .map_err(TranslateError::InvalidRequest)?;
        post(
            format!("/models/{}:batchEmbedContents", context.upstream_model),
            &body,
            None,
        )
    }

    fn embeddings_response(
        context: AttemptContext,
        response: UpstreamResponse,
    ) -> Result<EmbeddingsResponse, TranslateError> {
        embeddings::embeddings_response(&context, &response.body)
    }

    fn read_failure(_context: AttemptContext, response: UpstreamResponse) -> UpstreamFailure {
        failure::read_failure(&response)
    }
}

export_translator!(Gemini);
