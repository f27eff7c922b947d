//! The client side: clients call the gateway in Anthropic's Messages API (`POST /v1/messages`,
//! `POST /v1/messages/count_tokens`), whatever channel the route lands on.
//!
//! - `request`: a Messages body → OpenAI's chat shape (routing facts; other protocols' channels).
//! - `forward`: same protocol — the client's body upstream and the answer back, untouched.
//! - `answer`, `stream`: cross protocol — OpenAI answers and chunks → Messages answers and events.

mod answer;
mod forward;
mod request;
mod stream;

use serde_json::json;
use tollgate_plugin_sdk::inbound::{
    AttemptContext, Endpoint, ForwardedAnswer, Header, Inbound, InvalidRequest, TranslateError,
    UpstreamRequest, UpstreamResponse,
};

pub use forward::ForwardedStream;
pub use stream::ConvertedStream;

/// Anthropic's Messages API as a client protocol; `pub` so a native build sees it used.
pub struct Messages;

impl Inbound for Messages {
    type Forwarded = ForwardedStream;
    type Converted = ConvertedStream;

    fn to_openai_request(endpoint: Endpoint, body: String) -> Result<String, InvalidRequest> {
        request::to_openai(endpoint, &body).map(|chat| chat.to_string())
    }

    fn forward_request(
        endpoint: Endpoint,
        context: AttemptContext,
        body: String,
        client_headers: Vec<Header>,
    ) -> Result<UpstreamRequest, TranslateError> {
        forward::request(endpoint, &context, &body, &client_headers)
    }

    fn read_forwarded_response(
        endpoint: Endpoint,
        _context: AttemptContext,
        response: UpstreamResponse,
    ) -> Result<ForwardedAnswer, TranslateError> {
        forward::response(endpoint, response)
    }

    fn from_openai_response(
        context: AttemptContext,
        body: String,
    ) -> Result<String, TranslateError> {
        answer::from_openai(&context, &body)
    }

    fn count_tokens_answer(input_tokens: u64) -> String {
        json!({ "input_tokens": input_tokens }).to_string()
    }
}
