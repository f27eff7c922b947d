//! End-to-end: Anthropic's Messages API at `/v1/messages`, driven by the official `anthropic`
//! Python SDK (tests/sdk/anthropic_messages.py) against an Anthropic channel (the client's body
//! forwarded untouched) and against OpenAI and Gemini channels (converted both ways by the
//! `anthropic` plugin's client side and the channel's translator), with each error class in
//! Anthropic's shape, and what the record keeps.

mod harness;

use reqwest::Method;
use serde_json::{Value, json};
use tollgate_simulator::{Fault, Simulator};

use harness::{Gateway, protocol_channel, sdk_script, simulator, start, test_plugin};

/// The price table with the busy model priced too, so its requests reach the upstream.
const BILLING: &str = r#"
[bindings.billing]
plugin = "price-table"
config = { credit_limit_micros = 1000000, models = { "test-model" = { input = 150000, output = 600000 }, "busy-model" = { input = 150000, output = 600000 } } }
"#;

/// A gateway with one channel of `protocol` serving `test-model` and `busy-model` (whose upstream
/// is always overloaded), a key limited to one request a minute, and a tenant whose router
/// refuses every request. Returns the gateway and the environment the SDK script reads.
async fn gateway_for(sim: &Simulator, protocol: &str) -> (Gateway, Vec<(&'static str, String)>) {
    let (url, models, busy, busy_status) = match protocol {
        "anthropic" => (
            sim.anthropic_base_url(),
            r#""test-model" = "claude-sim", "busy-model" = "claude-busy""#,
            "claude-busy",
            529,
        ),
        "gemini" => (
            sim.gemini_base_url(),
            r#""test-model" = "gemini-sim", "busy-model" = "gemini-busy""#,
            "gemini-busy",
            503,
        ),
        _ => (
            sim.openai_base_url(),
            r#""test-model" = "sim-model", "busy-model" = "sim-busy""#,
            "sim-busy",
            503,
        ),
    };
    sim.set_standing_fault(Some(Fault {
        status: Some(busy_status),
        only_model: Some(busy.to_owned()),
        ..Fault::default()
    }));
    let config = format!(
        "{BILLING}{}",
        protocol_channel("upstream", protocol, &url, 1, models)
    );
    let gateway = start(&config).await.expect("the gateway starts");

    let limited = gateway
        .admin(Method::POST, "/tenants/acme/keys", Some(json!({"rpm": 1})))
        .await;
    assert_eq!(limited.status, 201, "{}", limited.json);
    let created = gateway
        .admin(Method::POST, "/tenants", Some(json!({"name": "globex"})))
        .await;
    assert_eq!(created.status, 201, "{}", created.json);
    let refused = gateway
        .admin(Method::POST, "/tenants/globex/keys", None)
        .await;
    let router = std::fs::read(test_plugin("tollgate_test_plugin_scripted_router.wasm"))
        .expect("the scripted router is built");
    let uploaded = gateway.upload_plugin("scripted", router).await;
    assert_eq!(uploaded.status, 201, "{}", uploaded.json);
    let bound = gateway
        .admin(
            Method::PUT,
            "/bindings?role=router&tenant=globex",
            Some(json!({"plugin": "scripted", "config": {"refuse": "globex may not call models"}})),
        )
        .await;
    assert_eq!(bound.status, 200, "{}", bound.json);
    let env = vec![
        ("CHANNEL", protocol.to_owned()),
        ("LIMITED_KEY", secret(&limited.json)),
        ("REFUSED_KEY", secret(&refused.json)),
        ("MAX_BODY_BYTES", (8u64 << 20).to_string()),
    ];
    (gateway, env)
}

/// A gateway with one Anthropic channel serving `test-model`.
async fn anthropic_channel_gateway() -> (Simulator, Gateway) {
    let sim = simulator().await;
    let config = format!(
        "{BILLING}{}",
        protocol_channel(
            "upstream",
            "anthropic",
            &sim.anthropic_base_url(),
            1,
            r#""test-model" = "claude-sim""#
        )
    );
    let gateway = start(&config).await.expect("the gateway starts");
    (sim, gateway)
}

fn secret(created: &Value) -> String {
    created["secret"]
        .as_str()
        .expect("a new key's secret")
        .to_owned()
}

async fn run(gateway: &Gateway, env: &[(&'static str, String)]) -> Value {
    let env: Vec<(&str, &str)> = env
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    sdk_script("python3", "anthropic_messages.py", gateway, &env).await
}

/// What the SDK must see whatever protocol the channel speaks. `split_arguments`: the upstream
/// streams a call's arguments in pieces (Gemini sends each call whole).
fn assert_session(python: &Value, split_arguments: bool) {
    assert_eq!(python["plain"]["text"], "Echo: hello plain");
    assert_eq!(python["plain"]["stop_reason"], "end_turn");
    assert!(
        python["plain"]["output_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0)
    );
    assert_eq!(python["system"]["text"], "Echo: with a system prompt");

    let tool_turn = &python["tool_turn"];
    assert_eq!(
        tool_turn["stop_reason"], "tool_use",
        "never end_turn after a call"
    );
    assert_eq!(tool_turn["name"], "get_weather");
    assert_eq!(tool_turn["input"], json!({"city": "sim-city"}));
    let events: Vec<&str> = tool_turn["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(events.first(), Some(&"message_start"), "{events:?}");
    assert_eq!(events.last(), Some(&"message_stop"), "{events:?}");
    for expected in [
        "content_block_start",
        "input_json_delta",
        "content_block_stop",
        "message_delta",
    ] {
        assert!(events.contains(&expected), "{expected} in {events:?}");
    }
    assert!(
        !split_arguments
            || events
                .iter()
                .filter(|event| **event == "input_json_delta")
                .count()
                >= 2,
        "the arguments arrive in several deltas: {events:?}"
    );
    assert_eq!(python["follow_up"]["text"], "Tool results: 18 degrees");
    assert_eq!(python["follow_up"]["stop_reason"], "end_turn");

    let errors = &python["errors"];
    for (case, status, class, kind) in [
        (
            "authentication",
            401,
            "AuthenticationError",
            "authentication_error",
        ),
        (
            "permission",
            403,
            "PermissionDeniedError",
            "permission_error",
        ),
        ("not_found", 404, "NotFoundError", "not_found_error"),
        (
            "invalid_request",
            400,
            "BadRequestError",
            "invalid_request_error",
        ),
        (
            "request_too_large",
            413,
            "ContentTooLargeError",
            "request_too_large",
        ),
        ("rate_limit", 429, "RateLimitError", "rate_limit_error"),
        ("overloaded", 529, "OverloadedError", "overloaded_error"),
    ] {
        let error = &errors[case];
        assert_eq!(error["status"], status, "{case}: {error}");
        assert_eq!(error["class"], class, "{case}: {error}");
        assert_eq!(
            error["type"], "error",
            "{case}: Anthropic's error shape: {error}"
        );
        assert_eq!(error["error_type"], kind, "{case}: {error}");
        assert!(
            error["request_id"].is_string(),
            "{case}: request-id header: {error}"
        );
    }
    assert_eq!(
        errors["rate_limit_first"],
        Value::Null,
        "the first request is within the limit"
    );
}

#[tokio::test]
async fn the_anthropic_sdk_on_an_anthropic_channel_gets_the_upstream_answer_untouched() {
    let sim = simulator().await;
    let (gateway, env) = gateway_for(&sim, "anthropic").await;
    let python = run(&gateway, &env).await;
    assert_session(&python, true);
    assert!(
        python["plain"]["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("msg_sim")),
        "the upstream's own answer: {}",
        python["plain"]
    );
    // "count these four words" and "Be brief.": the upstream counted.
    assert_eq!(python["count_tokens"], 6);
    let signature = python["thinking"]["signature"].as_str().unwrap_or_default();
    assert!(signature.starts_with("simsig"), "{}", python["thinking"]);
    assert_eq!(
        python["thinking"]["next_turn"][0], "thinking",
        "the signed thinking went back and the upstream accepted it"
    );
    assert!(
        python["cached"]["cache_creation_input_tokens"]
            .as_u64()
            .is_some_and(|tokens| tokens > 0),
        "{}",
        python["cached"]
    );
    let cached_call = sim
        .seen()
        .into_iter()
        .find(|seen| seen.body.pointer("/messages/0/content") == Some(&json!("use the cache")))
        .expect("the cached call reached the upstream");
    assert_eq!(
        cached_call.body["system"][0]["cache_control"],
        json!({"type": "ephemeral"}),
        "cache_control reaches the upstream unchanged"
    );
    assert_eq!(
        cached_call.body["model"], "claude-sim",
        "only the model was rewritten"
    );
    assert!(
        cached_call
            .headers
            .iter()
            .any(|(name, value)| name == "anthropic-beta" && value == "prompt-caching-2024-07-31"),
        "anthropic-beta forwarded: {:?}",
        cached_call.headers
    );
    let count_call = sim
        .seen()
        .into_iter()
        .find(|seen| seen.path == "/v1/messages/count_tokens")
        .expect("count_tokens was forwarded");
    assert!(count_call.body.get("max_tokens").is_none());

    let request_id = python["plain"]["request_id"].as_str().expect("request-id");
    let record = gateway.record(request_id).await;
    assert_eq!(record["protocol_in"], "anthropic");
    assert_eq!(record["protocol_out"], "anthropic");
    assert_eq!(record["model_served"], "claude-sim");
    assert!(
        record["cost_picos"].as_u64().is_some_and(|cost| cost > 0),
        "{record}"
    );
}

#[tokio::test]
async fn the_anthropic_sdk_on_openai_and_gemini_channels_gets_answers_converted_by_the_plugins() {
    for protocol in ["openai", "gemini"] {
        converted_session(protocol).await;
    }
}

async fn converted_session(protocol: &str) {
    let sim = simulator().await;
    let (gateway, env) = gateway_for(&sim, protocol).await;
    let python = run(&gateway, &env).await;
    assert_session(&python, protocol != "gemini");
    assert!(
        python["plain"]["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("msg_")),
        "{}",
        python["plain"]
    );
    assert!(
        python["count_tokens"]
            .as_u64()
            .is_some_and(|tokens| tokens > 0),
        "the host counted: {}",
        python["count_tokens"]
    );
    let request_id = python["plain"]["request_id"].as_str().expect("request-id");
    let record = gateway.record(request_id).await;
    assert_eq!(record["protocol_in"], "anthropic");
    assert_eq!(record["protocol_out"], protocol);
    assert_eq!(
        record["usage"]["input_tokens"],
        python["plain"]["input_tokens"]
    );
}

/// Streams one Messages request with a plain HTTP client, authenticated with a bearer token;
/// returns its SSE events (name, data) and the request id.
async fn stream_messages(gateway: &Gateway) -> (Vec<(String, Value)>, String) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/messages", gateway.url))
        // The SDK sends `x-api-key`; a bearer token is accepted as well.
        .bearer_auth(&gateway.key)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({
            "model": "test-model", "max_tokens": 100, "stream": true,
            "messages": [{"role": "user", "content": "one two three four five six"}]
        }))
        .send()
        .await
        .expect("the gateway answers");
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["request-id"]
        .to_str()
        .expect("ASCII")
        .to_owned();
    let body = tokio::time::timeout(std::time::Duration::from_secs(30), response.text())
        .await
        .expect("the stream ends")
        .expect("a body");
    let events = body
        .split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let line = |prefix: &str| {
                block
                    .lines()
                    .find_map(|line| line.strip_prefix(prefix))
                    .unwrap_or_default()
                    .to_owned()
            };
            let data = serde_json::from_str(&line("data: ")).expect("JSON data");
            (line("event: "), data)
        })
        .collect();
    (events, request_id)
}

#[tokio::test]
async fn a_stream_failing_midway_ends_with_an_anthropic_error_event_on_either_channel() {
    for (protocol, fault, kind) in [
        (
            "anthropic",
            Fault {
                error_event: true,
                ..Fault::default()
            },
            "overloaded_error",
        ),
        (
            "openai",
            Fault {
                cut_after_chunks: Some(3),
                ..Fault::default()
            },
            "api_error",
        ),
    ] {
        let sim = simulator().await;
        let (gateway, _) = gateway_for(&sim, protocol).await;
        sim.push_fault(fault);
        let (events, request_id) = stream_messages(&gateway).await;
        let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names.first(),
            Some(&"message_start"),
            "{protocol}: {names:?}"
        );
        assert!(
            names.contains(&"content_block_delta"),
            "{protocol}: {names:?}"
        );
        assert!(
            !names.contains(&"message_stop"),
            "{protocol}: never a silent stop: {names:?}"
        );
        let (last, data) = events.last().expect("events");
        assert_eq!(last, "error", "{protocol}: {names:?}");
        assert_eq!(data["type"], "error", "{protocol}: {data}");
        assert_eq!(data["error"]["type"], kind, "{protocol}: {data}");
        let record = gateway.record_eventually(&request_id).await;
        assert_eq!(record["error_class"], "stream_cut", "{protocol}: {record}");
        assert_eq!(record["protocol_in"], "anthropic");
        assert_eq!(record["protocol_out"], protocol);
        if protocol == "openai" {
            // Cut before its usage chunk: the host counts the prompt ("one two three four five
            // six") once the stream has ended, from the body the stream kept.
            assert_eq!(record["usage"]["estimated"], true, "{record}");
            assert_eq!(record["usage"]["input_tokens"], 6, "{record}");
        }
    }
}

#[tokio::test]
async fn a_body_that_is_not_json_is_refused_in_anthropics_shape() {
    let (sim, gateway) = anthropic_channel_gateway().await;
    for (path, body) in [
        ("/v1/messages", "{\"model\": \"test-model\", "),
        ("/v1/messages/count_tokens", "not json"),
        ("/v1/messages", "[1, 2]"),
    ] {
        let response = reqwest::Client::new()
            .post(format!("{}{path}", gateway.url))
            .header("x-api-key", &gateway.key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("the gateway answers");
        assert_eq!(response.status(), 400, "{path} {body}");
        assert!(response.headers().contains_key("request-id"));
        let error: Value = response.json().await.expect("a JSON error");
        assert_eq!(error["type"], "error", "{error}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    }
    assert_eq!(sim.calls(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn a_protocol_whose_translator_has_no_client_side_is_refused_naming_why() {
    let (sim, gateway) = anthropic_channel_gateway().await;
    // The `openai` translator, bound for the `anthropic` protocol, has no client side.
    let bound = gateway
        .admin(
            Method::PUT,
            "/bindings?role=translator&protocol=anthropic",
            Some(json!({"plugin": "openai"})),
        )
        .await;
    assert_eq!(bound.status, 200, "{}", bound.json);
    let response = reqwest::Client::new()
        .post(format!("{}/v1/messages", gateway.url))
        .header("x-api-key", &gateway.key)
        .json(&json!({"model": "test-model", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("the gateway answers");
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.expect("a JSON error");
    assert_eq!(error["type"], "error", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("does not serve clients")),
        "{error}"
    );
    assert_eq!(sim.calls(), 0);
}

#[tokio::test]
async fn a_count_its_channel_fails_is_counted_by_the_gateway() {
    let (sim, gateway) = anthropic_channel_gateway().await;
    sim.set_standing_fault(Some(Fault {
        status: Some(503),
        ..Fault::default()
    }));
    let response = reqwest::Client::new()
        .post(format!("{}/v1/messages/count_tokens", gateway.url))
        .header("x-api-key", &gateway.key)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "test-model",
            "messages": [{"role": "user", "content": "one two three four five six"}]}))
        .send()
        .await
        .expect("the gateway answers");
    assert_eq!(response.status(), 200);
    let counted: Value = response.json().await.expect("a JSON count");
    assert!(
        counted["input_tokens"]
            .as_u64()
            .is_some_and(|tokens| tokens >= 6),
        "the gateway counted: {counted}"
    );
    let asked = sim
        .seen()
        .into_iter()
        .filter(|seen| seen.path == "/v1/messages/count_tokens")
        .count();
    assert!(asked >= 1, "the channel was asked first");
}
