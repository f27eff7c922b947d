//! Round trips through the compiled `anthropic` translator, loaded in the host's plugin runtime:
//! Anthropic's own published bodies and streams (tests/fixtures/anthropic, see SOURCES.md) go in,
//! OpenAI-shaped answers and chunks come out, framed by the host's own SSE framer.

mod harness;

use harness::translators::{context, shipped_translator};
use serde_json::{Value, json};
use tollgate::plugin::translator::{
    AuthPlacement, FailureClass, RequestKind, StreamFraming, TranslateError, UpstreamResponse,
};

#[tokio::test]
async fn a_text_stream_becomes_chunks_with_one_id_and_the_final_usage() {
    let plugin = shipped_translator("anthropic", "{}").await.expect("binds");
    let streamed = plugin.stream_fixture("stream_text.sse", true).await;
    assert!(streamed.error.is_none());
    streamed.assert_one_id_and_role_first();
    assert_eq!(streamed.text("content"), "Hello there!");
    assert_eq!(streamed.finish_reasons(), ["stop"]);
    let usage_chunk = streamed.chunks.last().expect("chunks");
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], 11);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 6);
    let usage = streamed.usage.expect("usage");
    assert_eq!((usage.input_tokens, usage.output_tokens), (11, 6));
    assert!(!usage.estimated);
    assert_eq!(
        streamed.served_model.as_deref(),
        Some("claude-3-opus-latest")
    );

    let quiet = plugin.stream_fixture("stream_text.sse", false).await;
    assert!(
        quiet
            .chunks
            .iter()
            .all(|chunk| chunk.get("usage").is_none()),
        "no usage chunk unless asked for"
    );
}

#[tokio::test]
async fn text_then_a_tool_call_streams_as_tool_call_deltas_and_finishes_as_tool_calls() {
    let plugin = shipped_translator("anthropic", "{}").await.expect("binds");
    let streamed = plugin
        .stream_fixture("stream_text_then_tool_use.sse", false)
        .await;
    streamed.assert_one_id_and_role_first();
    assert_eq!(
        streamed.text("content"),
        "I'll check the current weather in Paris for you."
    );
    let calls: Vec<&Value> = streamed
        .chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert!(calls.len() >= 4, "several argument deltas: {calls:?}");
    assert!(
        calls.iter().all(|call| call["index"] == 0),
        "Anthropic's block 1 is the first tool call, OpenAI index 0"
    );
    assert_eq!(calls[0]["id"], "toolu_01NRLabsLyVHZPKxbKvkfSMn");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert!(
        calls[1..]
            .iter()
            .all(|call| call.get("id").is_none() && call["function"].get("name").is_none()),
        "id and name only in the first delta"
    );
    let arguments: String = calls
        .iter()
        .filter_map(|call| call["function"]["arguments"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&arguments).expect("JSON arguments"),
        json!({"location": "Paris"})
    );
    assert_eq!(streamed.finish_reasons(), ["tool_calls"]);
    let usage = streamed.usage.expect("usage");
    assert_eq!((usage.input_tokens, usage.output_tokens), (377, 65));
}

#[tokio::test]
async fn thinking_streams_as_reasoning_content_and_missing_usage_is_an_estimate() {
    let plugin = shipped_translator("anthropic", "{}").await.expect("binds");
    let streamed = plugin.stream_fixture("stream_thinking.sse", true).await;
    streamed.assert_one_id_and_role_first();
    assert!(
        streamed
            .text("reasoning_content")
            .contains("GCD(1071, 462) = 21")
    );
    assert_eq!(
        streamed.text("content"),
        "The greatest common divisor of 1071 and 462 is **21**."
    );
    assert_eq!(streamed.finish_reasons(), ["stop"]);
    let usage = streamed.usage.expect("an estimate");
    assert!(usage.estimated, "the stream reported no usage");
    assert!(usage.output_tokens > 0);
}

#[tokio::test]
async fn an_error_event_mid_stream_is_a_typed_upstream_failure() {
    let plugin = shipped_translator("anthropic", "{}").await.expect("binds");
    let streamed = plugin
        .stream_fixture("stream_error_overloaded.sse", false)
        .await;
    assert_eq!(streamed.text("content"), "Hello");
    match &streamed.error {
        Some(TranslateError::Upstream(failure)) => {
            assert_eq!(failure.class, FailureClass::Overloaded);
            assert_eq!(failure.message, "Overloaded");
        }
        other => panic!("expected an upstream failure, got {other:?}"),
    }
    assert!(streamed.finish_reasons().is_empty(), "never a silent stop");
    let usage = streamed.usage.expect("usage so far");
    assert!(usage.estimated);
    assert_eq!(usage.input_tokens, 25);
}

#[tokio::test]
async fn whole_answers_become_chat_completions() {
    let plugin = shipped_translator("anthropic", "{}").await.expect("binds");
    let (body, usage, served) = plugin.whole("message_text.json").await;
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hi! My name is Claude."
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 2095);
    assert_eq!((usage.input_tokens, usage.output_tokens), (2095, 503));
    assert_eq!(served.as_deref(), Some("claude-sonnet-4-5-20250929"));

    let (body, _, _) = plugin.whole("message_tool_use.json").await;
    let message = &body["choices"][0]["message"];
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        message["content"],
        "I'll check the current weather in San Francisco for you."
    );
    assert_eq!(
        message["tool_calls"][0]["id"],
        "toolu_01A09q90qw90lq917835lq9"
    );
    let arguments = message["tool_calls"][0]["function"]["arguments"]
        .as_str()
        .expect("arguments are a JSON string");
    assert_eq!(
        serde_json::from_str::<Value>(arguments).expect("JSON"),
        json!({"location": "San Francisco, CA", "unit": "celsius"})
    );

    let (body, usage, _) = plugin.whole("message_cache_usage.json").await;
    assert_eq!(usage.input_tokens, 21 + 188_086, "cache writes are input");
    assert_eq!(usage.cache_write_tokens, 188_086);
    assert_eq!(body["usage"]["prompt_tokens"], 21 + 188_086);
}

#[tokio::test]
async fn error_answers_map_to_failover_classes() {
    let plugin = shipped_translator("anthropic", "{}").await.expect("binds");
    let cases = [
        (
            429,
            plugin.fixture("error_rate_limit.json"),
            vec![("retry-after".into(), "7".into())],
            FailureClass::RateLimited,
        ),
        (
            529,
            plugin.fixture("error_overloaded.json"),
            vec![],
            FailureClass::Overloaded,
        ),
        (
            404,
            plugin.fixture("error_not_found.json"),
            vec![],
            FailureClass::ModelNotFound,
        ),
        (
            401,
            br#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#.to_vec(),
            vec![],
            FailureClass::Authentication,
        ),
        (502, b"<html>bad gateway</html>".to_vec(), vec![], FailureClass::Server),
    ];
    for (status, body, headers, class) in cases {
        let failure = plugin
            .binding
            .read_failure(
                &context(false, false, "{}"),
                &UpstreamResponse {
                    status,
                    headers,
                    body,
                },
            )
            .await
            .expect("the plugin runs");
        assert_eq!(failure.class, class, "HTTP {status}");
        assert_eq!(failure.status, status);
        if status == 429 {
            assert_eq!(failure.retry_after_ms, Some(7000));
            assert_eq!(failure.code.as_deref(), Some("rate_limit_error"));
        }
    }
}

#[tokio::test]
async fn the_request_carries_headers_auth_placement_and_the_configured_max_tokens() {
    let plugin = shipped_translator("anthropic", r#"{"default_max_tokens": 77}"#)
        .await
        .expect("binds");
    let body =
        json!({"model": "claude", "messages": [{"role": "user", "content": "Hi"}]}).to_string();
    let request = plugin
        .binding
        .translate_request(
            RequestKind::Chat,
            &context(true, false, r#"{"beta": ["a-2025", "b-2026"]}"#),
            &body,
        )
        .await
        .expect("the plugin runs")
        .expect("the request translates");
    assert_eq!(request.path, "/messages");
    assert!(matches!(request.auth, AuthPlacement::Header(ref name) if name == "x-api-key"));
    assert!(matches!(request.framing, Some(StreamFraming::Sse)));
    assert!(
        request
            .headers
            .contains(&("anthropic-version".into(), "2023-06-01".into()))
    );
    assert!(
        request
            .headers
            .contains(&("anthropic-beta".into(), "a-2025,b-2026".into()))
    );
    let sent: Value = serde_json::from_slice(&request.body).expect("JSON");
    assert_eq!(sent["max_tokens"], 77);
    assert_eq!(sent["model"], "upstream-model");
    assert_eq!(sent["stream"], true);
}

#[tokio::test]
async fn a_bad_configuration_is_refused_at_bind_time() {
    for config in [r#"{"default_max_tokens": 0}"#, r#"{"max_tokens": 5}"#] {
        let error = shipped_translator("anthropic", config)
            .await
            .err()
            .expect("refused");
        assert!(error.to_string().contains("anthropic"), "{error}");
    }
}
