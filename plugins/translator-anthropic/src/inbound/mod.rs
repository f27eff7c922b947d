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

/// Anthropic's Messages API as a client protocol; `pub` for the fuzz targets.
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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use tollgate_plugin_sdk::inbound::{ConvertStream, StreamEvent, Usage};
    use tollgate_plugin_sdk::translator::Operation;

    use super::*;

    fn context() -> AttemptContext {
        AttemptContext {
            request_id: "req-1".into(),
            operation: Operation::Chat,
            public_model: "claude-public".into(),
            upstream_model: "claude-upstream".into(),
            channel: "c".into(),
            channel_options: r#"{"beta":["from-channel"]}"#.into(),
            stream: true,
            include_usage: false,
            created_unix_s: 1,
        }
    }

    #[test]
    fn a_messages_body_becomes_an_openai_conversation() {
        let body = json!({
            "model": "m", "max_tokens": 64, "stream": true,
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}},
                      {"type": "web_search_20250305", "name": "web_search"}],
            "tool_choice": {"type": "any"},
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hm", "signature": "s"},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18"}]},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}
            ]
        });
        let chat: Value = serde_json::from_str(
            &Messages::to_openai_request(Endpoint::Messages, body.to_string()).unwrap(),
        )
        .unwrap();
        assert_eq!(chat["max_tokens"], 64);
        assert_eq!(chat["stream_options"]["include_usage"], true);
        assert_eq!(chat["tool_choice"], "required");
        assert_eq!(
            chat["tools"].as_array().unwrap().len(),
            1,
            "server tools stay Anthropic's"
        );
        let messages = chat["messages"].as_array().unwrap();
        assert_eq!(
            messages[0],
            json!({"role": "system", "content": "Be brief."})
        );
        assert_eq!(messages[2]["tool_calls"][0]["id"], "toolu_1");
        assert_eq!(
            messages[2]["tool_calls"][0]["function"]["arguments"],
            r#"{"city":"Paris"}"#
        );
        assert_eq!(
            messages[3],
            json!({"role": "tool", "tool_call_id": "toolu_1", "content": "18"})
        );
        assert_eq!(
            messages[4]["content"][0]["image_url"]["url"],
            "data:image/png;base64,AAAA"
        );

        let missing = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let refused =
            Messages::to_openai_request(Endpoint::Messages, missing.to_string()).unwrap_err();
        assert_eq!(refused.param.as_deref(), Some("max_tokens"));
        assert!(Messages::to_openai_request(Endpoint::CountTokens, missing.to_string()).is_ok());
    }

    #[test]
    fn forwarding_changes_the_model_and_nothing_else() {
        let body = r#"{"model":"claude-public","max_tokens":1.5e2,"stream":true,"future_field":{"z":1,"a":[2,  3]},"messages":[{"role":"user","content":[{"type":"text","text":"hi","cache_control":{"type":"ephemeral"}}]}]}"#;
        let headers = vec![
            ("anthropic-beta".to_owned(), "from-client".to_owned()),
            ("anthropic-version".to_owned(), "2023-06-01".to_owned()),
        ];
        let request =
            Messages::forward_request(Endpoint::Messages, context(), body.into(), headers).unwrap();
        let sent = String::from_utf8(request.body).unwrap();
        assert!(sent.contains(r#""model":"claude-upstream""#), "{sent}");
        for untouched in [
            r#""max_tokens":1.5e2"#,
            r#""future_field":{"z":1,"a":[2,  3]}"#,
            r#""cache_control":{"type":"ephemeral"}"#,
        ] {
            assert!(sent.contains(untouched), "{untouched} in {sent}");
        }
        assert_eq!(request.path, "/messages");
        assert!(request.framing.is_some());
        assert!(request.headers.contains(&(
            "anthropic-beta".to_owned(),
            "from-client,from-channel".to_owned()
        )));
    }

    fn events(events: &[StreamEvent]) -> Vec<String> {
        events
            .iter()
            .map(|event| event.event.clone().unwrap_or_default())
            .collect()
    }

    #[test]
    fn openai_chunks_become_the_messages_event_sequence() {
        let mut stream = ConvertedStream::new(context());
        let mut sent = Vec::new();
        for chunk in [
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "Let me look."}, "finish_reason": null}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}, "finish_reason": null}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}, "finish_reason": null}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}, "finish_reason": null}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        ] {
            sent.extend(stream.push(chunk.to_string()).unwrap());
        }
        let usage = Usage {
            input_tokens: 10,
            cache_read_tokens: 4,
            cache_write_tokens: 0,
            output_tokens: 7,
            reasoning_tokens: 0,
            estimated: false,
        };
        sent.extend(stream.finish(usage).unwrap());
        assert_eq!(
            events(&sent),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        let tool_start: Value = serde_json::from_str(&sent[4].data).unwrap();
        assert_eq!(
            tool_start["index"], 1,
            "Anthropic counts the text block too"
        );
        assert_eq!(tool_start["content_block"]["id"], "call_1");
        let delta: Value = serde_json::from_str(&sent[8].data).unwrap();
        assert_eq!(
            delta["delta"]["stop_reason"], "tool_use",
            "a turn that called a tool"
        );
        assert_eq!(
            delta["usage"]["input_tokens"], 6,
            "cache reads are outside Anthropic's input"
        );
        assert_eq!(delta["usage"]["cache_read_input_tokens"], 4);
    }

    #[test]
    fn a_tool_calls_extra_content_goes_out_on_its_block_and_comes_back() {
        let signed = json!({"google": {"thought_signature": "sig-1"}});
        let answer = json!({
            "model": "gemini-sim",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant",
                "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "f", "arguments": "{}"}, "extra_content": signed}]}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1}
        });
        let message: Value = serde_json::from_str(
            &Messages::from_openai_response(context(), answer.to_string()).unwrap(),
        )
        .unwrap();
        assert_eq!(message["content"][0]["extra_content"], signed);
        let next_turn = json!({
            "model": "m", "max_tokens": 9,
            "messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": message["content"]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "ok"}]}
            ]
        });
        let chat: Value = serde_json::from_str(
            &Messages::to_openai_request(Endpoint::Messages, next_turn.to_string()).unwrap(),
        )
        .unwrap();
        assert_eq!(
            chat["messages"][1]["tool_calls"][0]["extra_content"],
            signed
        );
    }

    #[test]
    fn a_whole_openai_answer_becomes_a_message() {
        let answer = json!({
            "id": "chatcmpl-1", "model": "gpt-sim",
            "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "cut"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2}
        });
        let message: Value = serde_json::from_str(
            &Messages::from_openai_response(context(), answer.to_string()).unwrap(),
        )
        .unwrap();
        assert_eq!(message["type"], "message");
        assert_eq!(message["model"], "gpt-sim");
        assert_eq!(message["content"], json!([{"type": "text", "text": "cut"}]));
        assert_eq!(message["stop_reason"], "max_tokens");
        assert_eq!(message["usage"]["input_tokens"], 5);
    }
}
