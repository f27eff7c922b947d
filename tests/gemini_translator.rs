//! Round trips through the compiled `gemini` translator, loaded in the host's plugin runtime:
//! recorded Gemini API bodies and streams (tests/fixtures/gemini, see SOURCES.md) go in,
//! OpenAI-shaped answers and chunks come out, framed by the host's own SSE framer.

mod harness;

use harness::translators::{context, shipped_translator};
use serde_json::{Value, json};
use tollgate::plugin::Operation;
use tollgate::plugin::translator::{
    AuthPlacement, FailureClass, RequestKind, StreamFraming, UpstreamResponse,
};

#[tokio::test]
async fn a_recorded_text_stream_becomes_chunks_with_thoughts_counted_as_output() {
    let plugin = shipped_translator("gemini", "{}").await.expect("binds");
    let streamed = plugin.stream_fixture("stream_text.sse", true).await;
    assert!(streamed.error.is_none());
    streamed.assert_one_id_and_role_first();
    let text = streamed.text("content");
    assert!(
        text.starts_with("The capital of Poland is **Warsaw"),
        "{text}"
    );
    assert!(text.ends_with("razed to the ground, especially after the Warsaw Uprising in."));
    assert_eq!(streamed.finish_reasons(), ["stop"]);
    let usage = streamed.usage.expect("usage");
    // 771 candidate tokens plus 914 thought tokens are output; 914 of it reasoning.
    assert_eq!(
        (
            usage.input_tokens,
            usage.output_tokens,
            usage.reasoning_tokens
        ),
        (15, 771 + 914, 914)
    );
    assert!(!usage.estimated);
    let usage_chunk = streamed.chunks.last().expect("chunks");
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 1685);
    assert_eq!(streamed.served_model.as_deref(), Some("gemini-2.5-flash"));
}

#[tokio::test]
async fn a_stream_ending_in_a_signed_empty_part_finishes_cleanly() {
    let plugin = shipped_translator("gemini", "{}").await.expect("binds");
    let streamed = plugin
        .stream_fixture("stream_signature_tail.sse", false)
        .await;
    streamed.assert_one_id_and_role_first();
    assert_eq!(streamed.text("content"), "Hello! How can I help you today?");
    assert_eq!(streamed.finish_reasons(), ["stop"]);
    assert!(
        streamed
            .chunks
            .iter()
            .all(|chunk| chunk.get("usage").is_none()),
        "no usage chunk unless asked for"
    );
    let usage = streamed.usage.expect("usage");
    assert_eq!((usage.input_tokens, usage.output_tokens), (1, 9));
}

#[tokio::test]
async fn function_calls_get_minted_ids_and_carry_their_thought_signature() {
    let plugin = shipped_translator("gemini", "{}").await.expect("binds");
    let (body, usage, served) = plugin.whole("message_function_call.json").await;
    let message = &body["choices"][0]["message"];
    assert_eq!(
        body["choices"][0]["finish_reason"], "tool_calls",
        "Gemini said STOP"
    );
    assert_eq!(message["content"], Value::Null);
    assert_eq!(message["tool_calls"][0]["id"], "call_req-1_0");
    assert_eq!(message["tool_calls"][0]["function"]["name"], "get_weather");
    let arguments = message["tool_calls"][0]["function"]["arguments"]
        .as_str()
        .expect("a JSON string");
    assert_eq!(
        serde_json::from_str::<Value>(arguments).expect("JSON"),
        json!({"City": "New York"})
    );
    assert_eq!((usage.input_tokens, usage.output_tokens), (123, 6));
    assert_eq!(served.as_deref(), Some("gemini-2.0-flash"));

    let (body, usage, _) = plugin.whole("message_parallel_calls_signed.json").await;
    let calls = body["choices"][0]["message"]["tool_calls"]
        .as_array()
        .expect("calls");
    assert_eq!(calls.len(), 2);
    assert_ne!(calls[0]["id"], calls[1]["id"]);
    assert_eq!(
        calls[0]["extra_content"],
        json!({"google": {"thought_signature": "<Signature_A>"}})
    );
    assert!(calls[1].get("extra_content").is_none());
    assert_eq!(usage.input_tokens, 71);
    assert_eq!(usage.cache_read_tokens, 40);
    assert_eq!(
        (usage.output_tokens, usage.reasoning_tokens),
        (30 + 124, 124)
    );
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 40);
}

#[tokio::test]
async fn a_blocked_prompt_finishes_as_content_filter() {
    let plugin = shipped_translator("gemini", "{}").await.expect("binds");
    let (body, usage, _) = plugin.whole("message_safety_blocked.json").await;
    assert_eq!(body["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(body["choices"][0]["message"]["content"], Value::Null);
    assert_eq!(usage.input_tokens, 8);
}

#[tokio::test]
async fn google_errors_map_to_failover_classes() {
    let plugin = shipped_translator("gemini", "{}").await.expect("binds");
    let cases = [
        (
            429,
            plugin.fixture("error_resource_exhausted.json"),
            FailureClass::RateLimited,
        ),
        (
            400,
            plugin.fixture("error_api_key_invalid.json"),
            FailureClass::Authentication,
        ),
        (
            503,
            plugin.fixture("error_unavailable.json"),
            FailureClass::Overloaded,
        ),
        (
            404,
            br#"{"error":{"code":404,"message":"models/x is not found","status":"NOT_FOUND"}}"#
                .to_vec(),
            FailureClass::ModelNotFound,
        ),
        (
            400,
            br#"{"error":{"code":400,"message":"bad","status":"INVALID_ARGUMENT"}}"#.to_vec(),
            FailureClass::InvalidRequest,
        ),
        (
            403,
            br#"{"error":{"code":403,"message":"Method doesn't allow unregistered callers.","status":"PERMISSION_DENIED"}}"#.to_vec(),
            FailureClass::Authentication,
        ),
        (500, b"<html>oops</html>".to_vec(), FailureClass::Server),
    ];
    for (status, body, class) in cases {
        let failure = plugin
            .binding
            .read_failure(
                &context(false, false, "{}"),
                &UpstreamResponse {
                    status,
                    headers: vec![],
                    body,
                },
            )
            .await
            .expect("the plugin runs");
        assert_eq!(failure.class, class, "HTTP {status}");
        if status == 429 {
            assert_eq!(failure.retry_after_ms, Some(43_000), "from RetryInfo");
            assert_eq!(failure.code.as_deref(), Some("RESOURCE_EXHAUSTED"));
        }
    }
}

#[tokio::test]
async fn requests_go_to_the_model_method_with_the_key_in_its_header() {
    let plugin = shipped_translator("gemini", "{}").await.expect("binds");
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}).to_string();
    let stream = plugin
        .binding
        .translate_request(RequestKind::Chat, &context(true, false, "{}"), &body)
        .await
        .expect("runs")
        .expect("translates");
    assert_eq!(
        stream.path,
        "/models/upstream-model:streamGenerateContent?alt=sse"
    );
    assert!(matches!(stream.auth, AuthPlacement::Header(ref name) if name == "x-goog-api-key"));
    assert!(matches!(stream.framing, Some(StreamFraming::Sse)));

    let mut embeddings_context = context(false, false, "{}");
    embeddings_context.operation = Operation::Embeddings;
    let request = plugin
        .binding
        .translate_request(
            RequestKind::Embeddings,
            &embeddings_context,
            &json!({"model": "e", "input": ["a b", "c"], "dimensions": 4}).to_string(),
        )
        .await
        .expect("runs")
        .expect("translates");
    assert_eq!(request.path, "/models/upstream-model:batchEmbedContents");
    let sent: Value = serde_json::from_slice(&request.body).expect("JSON");
    assert_eq!(
        sent["requests"][1],
        json!({"model": "models/upstream-model", "content": {"parts": [{"text": "c"}]}, "outputDimensionality": 4})
    );
    let answer = plugin
        .binding
        .translate_response(
            RequestKind::Embeddings,
            &embeddings_context,
            &UpstreamResponse {
                status: 200,
                headers: vec![],
                body: plugin.fixture("embeddings_batch.json"),
            },
        )
        .await
        .expect("runs")
        .expect("translates");
    let list: Value = serde_json::from_str(&answer.body).expect("JSON");
    assert_eq!(list["data"][1]["index"], 1);
    assert_eq!(list["data"][1]["embedding"][0], -0.0025484476);
    assert!(answer.usage.estimated, "Gemini reports no embedding usage");
}
