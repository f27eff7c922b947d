//! End-to-end: OpenAI-shaped clients served from a Gemini channel by the shipped `gemini`
//! translator, through the real `tollgate` binary, against the simulator's strict Gemini API
//! (which answers 400 to anything Google would refuse, a missing thought signature included).

mod harness;

use base64::Engine as _;
use harness::{
    INPUT_PRICE, OUTPUT_PRICE, UPSTREAM_KEY, billing, channel, finish_reasons, gemini_channel,
    simulator, start, stream_chat, streamed_content, weather_tool,
};
use serde_json::{Value, json};
use tollgate_simulator::{Fault, Simulator};

async fn gateway_for(sim: &Simulator) -> harness::Gateway {
    start(&format!(
        "{}{}",
        billing(1_000_000),
        gemini_channel("gemini", sim, 1)
    ))
    .await
    .expect("the gateway starts")
}

#[tokio::test]
async fn plain_chat_with_a_system_prompt_is_translated_and_billed() {
    let sim = simulator().await;
    let gateway = gateway_for(&sim).await;
    let answer = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "test-model", "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "hello gemini"}
            ]}),
            &[],
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!(
        answer.json["choices"][0]["message"]["content"],
        "Echo: hello gemini"
    );
    assert_eq!(answer.json["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer.json["usage"]["prompt_tokens"], 4);
    let seen = &sim.seen()[0];
    assert_eq!(seen.path, "/v1beta/models/gemini-sim:generateContent");
    let header = |name: &str| {
        seen.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    assert_eq!(header("x-goog-api-key"), Some(UPSTREAM_KEY));
    assert_eq!(header("authorization"), None);
    assert_eq!(
        seen.body["systemInstruction"],
        json!({"parts": [{"text": "Answer briefly."}]})
    );
    let record = gateway.record(&answer.request_id()).await;
    assert_eq!(record["model_served"], "gemini-sim");
    assert_eq!(record["cost_picos"], 4 * INPUT_PRICE + 3 * OUTPUT_PRICE);
}

#[tokio::test]
async fn a_two_turn_tool_conversation_carries_the_thought_signature_back() {
    let sim = simulator().await;
    let gateway = gateway_for(&sim).await;
    let tools = json!([weather_tool("get_weather")]);
    let mut messages = vec![json!({"role": "user", "content": "use get_weather for Paris"})];
    let first = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "test-model", "messages": messages, "tools": tools}),
            &[],
        )
        .await;
    assert_eq!(first.status, 200, "{}", first.json);
    assert_eq!(first.json["choices"][0]["finish_reason"], "tool_calls");
    let reply = first.json["choices"][0]["message"].clone();
    let call = &reply["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    assert!(
        call["extra_content"]["google"]["thought_signature"].is_string(),
        "{call}"
    );
    let call_id = call["id"].as_str().expect("an id").to_owned();

    messages.push(reply.clone());
    messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": "sunny"}));
    let second = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "test-model", "messages": messages, "tools": tools}),
            &[],
        )
        .await;
    assert_eq!(second.status, 200, "{}", second.json);
    assert_eq!(
        second.json["choices"][0]["message"]["content"],
        "Tool results: sunny"
    );
    let sent = &sim.seen()[1].body;
    assert_eq!(
        sent["contents"][2]["parts"][0]["functionResponse"]["name"],
        "get_weather"
    );

    // Without the signature Gemini refuses the turn, and the client hears why.
    let mut unsigned = reply;
    if let Some(call) = unsigned["tool_calls"][0].as_object_mut() {
        call.remove("extra_content");
    }
    messages[1] = unsigned;
    let refused = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "test-model", "messages": messages, "tools": tools}),
            &[],
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.json);
    assert!(
        refused.json["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("thought_signature"))
    );
}

#[tokio::test]
async fn streamed_and_parallel_function_calls_finish_as_tool_calls() {
    let sim = simulator().await;
    let gateway = gateway_for(&sim).await;
    let tools = json!([weather_tool("get_weather"), weather_tool("get_time")]);
    let (chunks, request_id) = stream_chat(&gateway,
        json!({"model": "test-model", "tools": tools, "stream_options": {"include_usage": true},
               "messages": [{"role": "user", "content": "explain, then use get_weather and get_time"}]}),
    )
    .await;
    assert_eq!(chunks.last(), Some(&Value::Null), "ends with [DONE]");
    assert_eq!(streamed_content(&chunks), "Let me look that up.");
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        (&calls[0]["index"], &calls[1]["index"]),
        (&json!(0), &json!(1))
    );
    assert_eq!(calls[1]["function"]["name"], "get_time");
    assert_eq!(
        serde_json::from_str::<Value>(calls[0]["function"]["arguments"].as_str().expect("text"))
            .expect("JSON"),
        json!({"city": "sim-city"})
    );
    assert!(calls[0]["extra_content"]["google"]["thought_signature"].is_string());
    // The simulator sends STOP in a later event than the calls.
    assert_eq!(finish_reasons(&chunks), ["tool_calls"]);
    let record = gateway.record_eventually(&request_id).await;
    assert_eq!(record["usage"]["estimated"], false);

    let whole = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "test-model", "tools": tools,
                    "messages": [{"role": "user", "content": "use get_weather and get_time"}]}),
            &[],
        )
        .await;
    let calls = whole.json["choices"][0]["message"]["tool_calls"]
        .as_array()
        .expect("calls");
    assert_eq!(calls.len(), 2);
    assert_ne!(calls[0]["id"], calls[1]["id"]);
}

#[tokio::test]
async fn json_mode_and_json_schema_ask_for_json() {
    let sim = simulator().await;
    let gateway = gateway_for(&sim).await;
    let schema = json!({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                        "required": ["name", "age"]});
    let strict = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "test-model", "messages": [{"role": "user", "content": "a person"}],
                    "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}}),
            &[],
        )
        .await;
    assert_eq!(strict.status, 200, "{}", strict.json);
    let parsed: Value = serde_json::from_str(
        strict.json["choices"][0]["message"]["content"]
            .as_str()
            .expect("text"),
    )
    .expect("JSON");
    assert_eq!(parsed, json!({"name": "sim-name", "age": 1}));
    assert_eq!(
        sim.seen()[0].body["generationConfig"]["responseJsonSchema"],
        schema
    );
    let object = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "test-model", "messages": [{"role": "user", "content": "anything"}],
                    "response_format": {"type": "json_object"}}),
            &[],
        )
        .await;
    let text = object.json["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    assert!(serde_json::from_str::<Value>(text).is_ok_and(|value| value.is_object()));
}

#[tokio::test]
async fn image_parts_go_inline_and_a_safety_block_is_a_content_filter() {
    let sim = simulator().await;
    let gateway = gateway_for(&sim).await;
    let image = |url: &str| {
        json!({"model": "test-model", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": url}}
        ]}]})
    };
    let ok = gateway
        .post(
            "/v1/chat/completions",
            &image("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="),
            &[],
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.json);
    assert_eq!(
        sim.seen()[0].body["contents"][0]["parts"][1]["inlineData"]["mimeType"],
        "image/png"
    );
    let refused = gateway
        .post(
            "/v1/chat/completions",
            &image("ftp://example.com/a.png"),
            &[],
        )
        .await;
    assert_eq!(refused.status, 400);
    assert_eq!(
        refused.json["error"]["param"],
        "messages[0].content[1].image_url.url"
    );

    sim.push_fault(Fault {
        safety_block: true,
        ..Fault::default()
    });
    let blocked = gateway
        .post("/v1/chat/completions", &harness::chat("something bad"), &[])
        .await;
    assert_eq!(blocked.status, 200, "{}", blocked.json);
    assert_eq!(
        blocked.json["choices"][0]["finish_reason"],
        "content_filter"
    );
    sim.push_fault(Fault {
        safety_block: true,
        ..Fault::default()
    });
    let (chunks, _) = stream_chat(&gateway, harness::chat("something bad")).await;
    assert_eq!(finish_reasons(&chunks), ["content_filter"]);
    assert_eq!(chunks.last(), Some(&Value::Null));
}

#[tokio::test]
async fn a_429_with_retry_info_and_a_503_are_classed_and_fail_over() {
    let sim = simulator().await;
    let gateway = gateway_for(&sim).await;
    sim.push_fault(Fault {
        status: Some(429),
        retry_after_s: Some(7),
        ..Fault::default()
    });
    let limited = gateway
        .post("/v1/chat/completions", &harness::chat("x"), &[])
        .await;
    limited.assert_error(429, Some("rate_limit_exceeded"));
    let wait: u64 = limited.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((6..=7).contains(&wait), "from RetryInfo: {wait}");

    let gemini = simulator().await;
    let backup = simulator().await;
    let failover = start(&format!(
        "{}{}{}",
        billing(1_000_000),
        gemini_channel("gemini", &gemini, 1),
        channel("backup", &backup, 2)
    ))
    .await
    .expect("starts");
    gemini.push_fault(Fault {
        status: Some(503),
        ..Fault::default()
    });
    let answer = failover
        .post("/v1/chat/completions", &harness::chat("fall back"), &[])
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    let record = failover.record(&answer.request_id()).await;
    assert_eq!(record["channel"], "backup");
    assert_eq!(record["attempts"][0]["error_class"], "overloaded");
}

#[tokio::test]
async fn an_error_mid_stream_ends_the_client_stream_with_an_error() {
    let sim = simulator().await;
    let gateway = gateway_for(&sim).await;
    sim.push_fault(Fault {
        error_event: true,
        ..Fault::default()
    });
    let (chunks, request_id) = stream_chat(&gateway, harness::chat("one two three")).await;
    assert_eq!(streamed_content(&chunks), "Echo: ");
    let last = chunks.last().expect("chunks");
    assert_eq!(last["error"]["code"], "upstream_overloaded", "{last}");
    assert!(finish_reasons(&chunks).is_empty());
    let record = gateway.record_eventually(&request_id).await;
    assert_eq!(record["error_class"], "stream_cut");
    assert_eq!(record["attempts"][0]["error_class"], "overloaded");
}

#[tokio::test]
async fn a_stream_that_ends_without_a_finish_reason_is_reported_as_cut() {
    let sim = simulator().await;
    let gateway = gateway_for(&sim).await;
    // "Echo: " and "one " arrive, then the body ends before the event with the finish reason.
    sim.push_fault(Fault {
        end_after_chunks: Some(2),
        ..Fault::default()
    });
    let (chunks, request_id) = stream_chat(&gateway, harness::chat("one two three")).await;
    assert_eq!(streamed_content(&chunks), "Echo: one ");
    let last = chunks.last().expect("chunks");
    assert_eq!(last["error"]["code"], "upstream_cut", "{last}");
    assert!(finish_reasons(&chunks).is_empty());
    let record = gateway.record_eventually(&request_id).await;
    assert_eq!(record["error_class"], "stream_cut");
    assert_eq!(record["usage"]["estimated"], true);
}

#[tokio::test]
async fn embeddings_for_one_and_several_inputs_in_both_encodings() {
    let sim = simulator().await;
    let gateway = gateway_for(&sim).await;
    let one = gateway
        .post(
            "/v1/embeddings",
            &json!({"model": "test-embedding", "input": "alpha beta", "dimensions": 4}),
            &[],
        )
        .await;
    assert_eq!(one.status, 200, "{}", one.json);
    let floats = one.json["data"][0]["embedding"].as_array().expect("floats");
    assert_eq!(floats.len(), 4);
    assert_eq!(sim.seen()[0].body["requests"][0]["outputDimensionality"], 4);
    // Gemini reports no usage: the host counts the input and says so in the body too.
    assert_eq!(one.json["usage"]["prompt_tokens"], 2);

    let several = |encoding: &str| json!({"model": "test-embedding", "input": ["alpha beta", "gamma"], "encoding_format": encoding});
    let plain = gateway.post("/v1/embeddings", &several("float"), &[]).await;
    let packed = gateway
        .post("/v1/embeddings", &several("base64"), &[])
        .await;
    assert_eq!(packed.status, 200, "{}", packed.json);
    for index in 0..2 {
        assert_eq!(plain.json["data"][index]["index"], index);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(
                packed.json["data"][index]["embedding"]
                    .as_str()
                    .expect("base64 text"),
            )
            .expect("base64");
        let decoded: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|four| f32::from_le_bytes([four[0], four[1], four[2], four[3]]))
            .collect();
        let expected: Vec<f32> = plain.json["data"][index]["embedding"]
            .as_array()
            .expect("floats")
            .iter()
            .map(|value| value.as_f64().expect("a number") as f32)
            .collect();
        assert_eq!(decoded, expected);
    }
    let record = gateway.record(&packed.request_id()).await;
    assert_eq!(record["usage"]["estimated"], true);
    assert!(
        record["usage"]["input_tokens"]
            .as_u64()
            .is_some_and(|tokens| tokens > 0)
    );
    assert_eq!(
        record["usage"]["input_tokens"], packed.json["usage"]["prompt_tokens"],
        "the body says what was billed"
    );
}
