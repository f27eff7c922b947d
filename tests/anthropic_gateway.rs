//! End-to-end: OpenAI-shaped clients served from an Anthropic Messages channel by the shipped
//! `anthropic` translator, through the real `tollgate` binary, against the simulator's strict
//! Anthropic API (which answers 400 to anything Anthropic would refuse).

mod harness;

use harness::{
    INPUT_PRICE, OUTPUT_PRICE, UPSTREAM_KEY, anthropic_channel, billing, channel, finish_reasons,
    simulator, start, stream_chat, streamed_content, weather_tool,
};
use serde_json::{Value, json};
use tollgate_simulator::{Fault, Simulator};

async fn gateway_for(sim: &Simulator) -> harness::Gateway {
    start(&format!(
        "{}{}",
        billing(1_000_000),
        anthropic_channel("claude", sim, 1)
    ))
    .await
    .expect("the gateway starts")
}

fn tool_call_deltas(chunks: &[Value]) -> Vec<&Value> {
    chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect()
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
                {"role": "user", "content": "hello"},
                {"role": "user", "content": "there"}
            ]}),
            &[],
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!(answer.json["object"], "chat.completion");
    assert_eq!(
        answer.json["choices"][0]["message"]["content"],
        "Echo: hello there"
    );
    assert_eq!(answer.json["choices"][0]["finish_reason"], "stop");
    // Words: system 2 + user 2 in, "Echo: hello there" 3 out.
    assert_eq!(answer.json["usage"]["prompt_tokens"], 4);
    assert_eq!(answer.json["usage"]["completion_tokens"], 3);

    let seen = &sim.seen()[0];
    assert_eq!(seen.path, "/v1/messages");
    let header = |name: &str| {
        seen.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    assert_eq!(header("x-api-key"), Some(UPSTREAM_KEY));
    assert_eq!(header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(
        header("authorization"),
        None,
        "the secret goes only in x-api-key"
    );
    assert_eq!(
        seen.body["system"],
        json!([{"type": "text", "text": "Answer briefly."}])
    );
    assert_eq!(seen.body["messages"].as_array().map(Vec::len), Some(1));
    assert_eq!(seen.body["max_tokens"], 4096);

    let record = gateway.record(&answer.request_id()).await;
    assert_eq!(record["channel"], "claude");
    assert_eq!(record["model_served"], "claude-sim");
    assert_eq!(record["usage"]["input_tokens"], 4);
    assert_eq!(record["usage"]["output_tokens"], 3);
    assert_eq!(record["cost_picos"], 4 * INPUT_PRICE + 3 * OUTPUT_PRICE);
}

#[tokio::test]
async fn a_two_turn_tool_conversation_round_trips_the_call_id() {
    let sim = simulator().await;
    let gateway = gateway_for(&sim).await;
    let mut messages = vec![json!({"role": "user", "content": "use get_weather for Paris"})];
    let first = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "test-model", "messages": messages, "tools": [weather_tool("get_weather")]}),
            &[],
        )
        .await;
    assert_eq!(first.status, 200, "{}", first.json);
    assert_eq!(first.json["choices"][0]["finish_reason"], "tool_calls");
    let reply = first.json["choices"][0]["message"].clone();
    let call = &reply["tool_calls"][0];
    let call_id = call["id"].as_str().expect("a call id").to_owned();
    assert_eq!(call["function"]["name"], "get_weather");
    let arguments: Value = serde_json::from_str(
        call["function"]["arguments"]
            .as_str()
            .expect("JSON-string arguments"),
    )
    .expect("JSON");
    assert_eq!(arguments, json!({"city": "sim-city"}));

    messages.push(reply);
    messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": "sunny and warm"}));
    let second = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "test-model", "messages": messages, "tools": [weather_tool("get_weather")]}),
            &[],
        )
        .await;
    assert_eq!(second.status, 200, "{}", second.json);
    assert_eq!(
        second.json["choices"][0]["message"]["content"],
        "Tool results: sunny and warm"
    );
    assert_eq!(second.json["choices"][0]["finish_reason"], "stop");
    let sent = &sim.seen()[1].body;
    assert_eq!(sent["messages"][1]["content"][0]["id"], call_id.as_str());
    assert_eq!(
        sent["messages"][2]["content"][0]["tool_use_id"],
        call_id.as_str()
    );
}

#[tokio::test]
async fn a_streamed_tool_call_arrives_in_several_argument_deltas() {
    let sim = simulator().await;
    let gateway = gateway_for(&sim).await;
    let (chunks, request_id) = stream_chat(&gateway,
        json!({"model": "test-model", "messages": [{"role": "user", "content": "call get_weather now"}],
               "tools": [weather_tool("get_weather")], "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(chunks.last(), Some(&Value::Null), "ends with [DONE]");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let id = &chunks[0]["id"];
    assert!(
        chunks
            .iter()
            .filter(|chunk| !chunk.is_null())
            .all(|chunk| &chunk["id"] == id)
    );
    let deltas = tool_call_deltas(&chunks);
    assert!(deltas.len() >= 3, "several deltas: {deltas:?}");
    assert!(deltas.iter().all(|delta| delta["index"] == 0));
    assert!(deltas[0]["id"].is_string() && deltas[0]["function"]["name"] == "get_weather");
    assert!(deltas[1..].iter().all(|delta| delta.get("id").is_none()));
    let arguments: String = deltas
        .iter()
        .filter_map(|delta| delta["function"]["arguments"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&arguments).expect("JSON"),
        json!({"city": "sim-city"})
    );
    assert_eq!(finish_reasons(&chunks), ["tool_calls"]);
    let usage = &chunks[chunks.len() - 2]["usage"];
    assert!(
        usage["completion_tokens"]
            .as_u64()
            .is_some_and(|tokens| tokens > 0)
    );
    let record = gateway.record_eventually(&request_id).await;
    assert_eq!(record["usage"]["estimated"], false);
    assert_eq!(record["usage"]["output_tokens"], usage["completion_tokens"]);
}

#[tokio::test]
async fn text_then_a_tool_call_and_parallel_calls_finish_as_tool_calls() {
    let sim = simulator().await;
    let gateway = gateway_for(&sim).await;
    let tools = json!([weather_tool("get_weather"), weather_tool("get_time")]);

    let (chunks, _) = stream_chat(
        &gateway,
        json!({"model": "test-model", "tools": tools,
               "messages": [{"role": "user", "content": "explain, then use get_weather"}]}),
    )
    .await;
    let text = streamed_content(&chunks);
    assert_eq!(text, "Let me look that up.");
    assert_eq!(finish_reasons(&chunks), ["tool_calls"], "not `stop`");

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
        .expect("tool calls");
    assert_eq!(calls.len(), 2, "{}", whole.json);
    assert_ne!(calls[0]["id"], calls[1]["id"]);

    let (chunks, _) = stream_chat(
        &gateway,
        json!({"model": "test-model", "tools": tools,
               "messages": [{"role": "user", "content": "use get_weather and get_time"}]}),
    )
    .await;
    let starts: Vec<&Value> = tool_call_deltas(&chunks)
        .into_iter()
        .filter(|delta| delta.get("id").is_some())
        .collect();
    assert_eq!(starts.len(), 2);
    assert_eq!(
        (&starts[0]["index"], &starts[1]["index"]),
        (&json!(0), &json!(1))
    );
    assert_eq!(starts[1]["function"]["name"], "get_time");

    // parallel_tool_calls: false reaches Anthropic as disable_parallel_tool_use.
    let serial = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "test-model", "tools": tools, "parallel_tool_calls": false,
                    "messages": [{"role": "user", "content": "use get_weather and get_time"}]}),
            &[],
        )
        .await;
    assert_eq!(
        serial.json["choices"][0]["message"]["tool_calls"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}

#[tokio::test]
async fn json_mode_and_json_schema_become_structured_outputs() {
    let sim = simulator().await;
    let gateway = gateway_for(&sim).await;
    let schema = json!({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                        "required": ["name", "age"], "additionalProperties": false});
    let strict = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "test-model", "messages": [{"role": "user", "content": "a person"}],
                    "response_format": {"type": "json_schema", "json_schema": {"name": "person", "strict": true, "schema": schema}}}),
            &[],
        )
        .await;
    assert_eq!(strict.status, 200, "{}", strict.json);
    let content: Value = serde_json::from_str(
        strict.json["choices"][0]["message"]["content"]
            .as_str()
            .expect("text"),
    )
    .expect("the content is JSON");
    assert_eq!(content, json!({"name": "sim-name", "age": 1}));
    assert_eq!(
        sim.seen()[0].body["output_config"]["format"]["schema"],
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
    let content = object.json["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    assert!(serde_json::from_str::<Value>(content).is_ok_and(|value| value.is_object()));
}

#[tokio::test]
async fn image_parts_are_sent_as_sources_and_bad_ones_refused_by_name() {
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
        sim.seen()[0].body["messages"][0]["content"][1]["source"]["media_type"],
        "image/png"
    );
    let refused = gateway
        .post(
            "/v1/chat/completions",
            &image("http://example.com/cat.png"),
            &[],
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.json);
    assert_eq!(
        refused.json["error"]["param"],
        "messages[0].content[1].image_url.url"
    );
    assert_eq!(
        sim.calls(),
        1,
        "a refused request never reaches the upstream"
    );
}

#[tokio::test]
async fn rate_limits_and_overload_fail_over_with_their_classes_recorded() {
    let claude = simulator().await;
    let backup = simulator().await;
    let gateway = start(&format!(
        "{}{}{}",
        billing(1_000_000),
        anthropic_channel("claude", &claude, 1),
        channel("backup", &backup, 2)
    ))
    .await
    .expect("the gateway starts");
    // Overload first: a 429 rests the channel's key for its retry-after, so a request right after
    // it would not reach Anthropic at all.
    for (status, class) in [(529, "overloaded"), (429, "rate_limited")] {
        claude.push_fault(Fault {
            status: Some(status),
            retry_after_s: Some(1),
            ..Fault::default()
        });
        let answer = gateway
            .post(
                "/v1/chat/completions",
                &harness::chat("fall back please"),
                &[],
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.json);
        let record = gateway.record(&answer.request_id()).await;
        assert_eq!(record["channel"], "backup");
        assert_eq!(record["attempts"][0]["channel"], "claude");
        assert_eq!(record["attempts"][0]["status"], status);
        assert_eq!(record["attempts"][0]["error_class"], class);
    }
}

#[tokio::test]
async fn an_overloaded_only_channel_answers_the_client_with_the_class() {
    let sim = simulator().await;
    let gateway = gateway_for(&sim).await;
    sim.set_standing_fault(Some(Fault {
        status: Some(529),
        ..Fault::default()
    }));
    let answer = gateway
        .post("/v1/chat/completions", &harness::chat("x"), &[])
        .await;
    answer.assert_error(503, Some("upstream_overloaded"));
    sim.set_standing_fault(Some(Fault {
        status: Some(429),
        retry_after_s: Some(3),
        ..Fault::default()
    }));
    let limited = gateway
        .post("/v1/chat/completions", &harness::chat("x"), &[])
        .await;
    assert_eq!(limited.status, 429, "{}", limited.json);
    assert!(limited.headers.get("retry-after").is_some());
}

#[tokio::test]
async fn an_error_event_mid_stream_ends_the_client_stream_with_an_error_and_is_recorded() {
    let sim = simulator().await;
    let gateway = gateway_for(&sim).await;
    sim.push_fault(Fault {
        error_event: true,
        ..Fault::default()
    });
    let (chunks, request_id) = stream_chat(
        &gateway,
        json!({"model": "test-model", "messages": [{"role": "user", "content": "one two three"}]}),
    )
    .await;
    let text = streamed_content(&chunks);
    assert_eq!(text, "Echo: one two three");
    let last = chunks.last().expect("chunks");
    assert_eq!(
        last["error"]["code"], "upstream_overloaded",
        "ends with an error event: {last}"
    );
    assert!(!chunks.contains(&Value::Null), "no [DONE] after an error");
    assert!(finish_reasons(&chunks).is_empty(), "never a silent stop");
    let record = gateway.record_eventually(&request_id).await;
    assert_eq!(record["error_class"], "stream_cut", "{record}");
    assert_eq!(record["attempts"][0]["error_class"], "overloaded");
    assert_eq!(record["usage"]["estimated"], true);
    assert!(
        record["usage"]["output_tokens"]
            .as_u64()
            .is_some_and(|tokens| tokens > 0)
    );
}

#[tokio::test]
async fn prompt_cache_writes_count_as_input() {
    let sim = simulator().await;
    let gateway = gateway_for(&sim).await;
    let answer = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "test-model", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "a long shared preamble", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "question"}
            ]}]}),
            &[],
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    // The simulator reports the four preamble words as a cache write and one as input_tokens.
    assert_eq!(answer.json["usage"]["prompt_tokens"], 5);
    let record = gateway.record(&answer.request_id()).await;
    assert_eq!(record["usage"]["input_tokens"], 5);
    assert_eq!(record["usage"]["cache_write_tokens"], 4);
}

#[tokio::test]
async fn a_stream_that_ends_cleanly_mid_answer_is_reported_as_cut() {
    let sim = simulator().await;
    let gateway = gateway_for(&sim).await;
    // message_start, ping, content_block_start, two text deltas: then the body ends.
    sim.push_fault(Fault {
        end_after_chunks: Some(5),
        ..Fault::default()
    });
    let (chunks, request_id) = stream_chat(
        &gateway,
        json!({"model": "test-model", "messages": [{"role": "user", "content": "one two three"}]}),
    )
    .await;
    let last = chunks.last().expect("chunks");
    assert_eq!(last["error"]["code"], "upstream_cut", "{last}");
    assert!(!chunks.contains(&Value::Null), "no [DONE]");
    assert!(finish_reasons(&chunks).is_empty());
    let record = gateway.record_eventually(&request_id).await;
    assert_eq!(record["error_class"], "stream_cut");
    assert_eq!(record["usage"]["estimated"], true);
    // The prompt as Anthropic counted it at message_start, the delivered "Echo: one " estimated.
    assert_eq!(record["usage"]["input_tokens"], 3);
    assert_eq!(record["usage"]["output_tokens"], 3);
}
