//! End-to-end: the official `openai` SDKs, changing only base URL and key, talk to the gateway:
//! Python does a chat and a stream (tests/sdk/openai_chat.py) and consumes Anthropic's and Gemini's
//! translated streams, streamed tool calls, JSON mode and (Gemini) embeddings
//! (tests/sdk/translated_channel.py); the npm package consumes one translated stream
//! (tests/sdk/anthropic_stream.mjs).

mod harness;

use harness::{anthropic_channel, billing, channel, gemini_channel, simulator, start};

/// What tests/sdk/translated_channel.py must see whatever protocol the channel speaks.
fn assert_translated_session(python: &serde_json::Value) {
    assert_eq!(python["stream"], "Echo: stream through translation");
    assert_eq!(python["stream_finish"], "stop");
    // In: system 2 + user 3 words; out: "Echo: stream from claude" 4.
    assert_eq!(python["stream_usage_total"], 5 + 4);
    assert_eq!(python["tool_text"], "Let me look that up.");
    assert_eq!(python["tool_name"], "get_weather");
    assert_eq!(
        python["tool_arguments"],
        serde_json::json!({"city": "sim-city"})
    );
    assert_eq!(python["tool_finish"], "tool_calls");
    assert_eq!(
        python["person"],
        serde_json::json!({"name": "sim-name", "age": 1})
    );
}

#[tokio::test]
async fn the_official_python_sdk_consumes_a_gemini_channel() {
    let sim = simulator().await;
    let gateway = start(&format!(
        "{}{}",
        billing(1_000_000),
        gemini_channel("gemini", &sim, 1)
    ))
    .await
    .unwrap();
    let python = harness::sdk_script(
        "python3",
        "translated_channel.py",
        &gateway,
        &[("WITH_EMBEDDINGS", "1")],
    )
    .await;
    assert_translated_session(&python);
    let embeddings = &python["embeddings"];
    assert_eq!(embeddings["count"], 2);
    assert_eq!(embeddings["indexes"], serde_json::json!([0, 1]));
    assert_eq!(
        embeddings["same_vector"], true,
        "base64 decodes to the floats"
    );
    assert_eq!(embeddings["dimensions"], 8);
    assert!(
        embeddings["prompt_tokens"]
            .as_u64()
            .is_some_and(|tokens| tokens > 0)
    );
}

#[tokio::test]
async fn the_official_sdks_consume_an_anthropic_channel() {
    let sim = simulator().await;
    let gateway = start(&format!(
        "{}{}",
        billing(1_000_000),
        anthropic_channel("claude", &sim, 1)
    ))
    .await
    .unwrap();
    let python = harness::sdk_script("python3", "translated_channel.py", &gateway, &[]).await;
    assert_translated_session(&python);

    let node = harness::sdk_script("node", "anthropic_stream.mjs", &gateway, &[]).await;
    assert_eq!(node["stream"], "Echo: hello from node");
    assert_eq!(node["finish"], "stop");
    assert_eq!(node["usage_total"], 3 + 4);
}

#[tokio::test]
async fn the_official_python_sdk_chats_and_streams() {
    let sim = simulator().await;
    let gateway = start(&format!(
        "{}{}",
        billing(1_000_000),
        channel("primary", &sim, 1)
    ))
    .await
    .unwrap();
    let results = harness::sdk_script("python3", "openai_chat.py", &gateway, &[]).await;
    assert_eq!(results["chat"], "Echo: hello from the sdk");
    assert_eq!(results["chat_model"], "sim-model");
    assert_eq!(results["chat_usage_total"], 4 + 5);
    assert_eq!(results["stream"], "Echo: stream please");
    assert_eq!(results["stream_usage_total"], 2 + 3);
    assert_eq!(results["error_status"], 404);
    assert_eq!(sim.calls(), 2);
}
