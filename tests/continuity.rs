//! Continuity: breakers and key states reorder routes but never refuse the last ones, and what an
//! upstream says about one model stays with that model.

mod harness;

use std::time::{Duration, Instant};

use futures::future::join_all;

use harness::{Gateway, billing, channel, chat, simulator, start};
use serde_json::{Value, json};
use tollgate_simulator::Fault;

fn failing(status: u16) -> Fault {
    Fault {
        status: Some(status),
        ..Fault::default()
    }
}

/// A gateway with one channel, `only`, on `sim`.
async fn only_channel(sim: &tollgate_simulator::Simulator) -> Gateway {
    start(&format!(
        "{}{}",
        billing(1_000_000),
        channel("only", sim, 1)
    ))
    .await
    .expect("the gateway starts")
}

/// The `/admin/channels` entry of `name`.
async fn channel_state(gateway: &Gateway, name: &str) -> Value {
    let channels = gateway
        .admin(reqwest::Method::GET, "/channels", None)
        .await
        .json;
    channels["data"]
        .as_array()
        .expect("a list of channels")
        .iter()
        .find(|channel| channel["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no channel {name} in {channels}"))
}

#[tokio::test]
async fn an_open_circuit_on_the_only_route_does_not_refuse_requests() {
    let sim = simulator().await;
    let gateway = only_channel(&sim).await;
    for _ in 0..3 {
        sim.push_fault(failing(500));
        let failed = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
        assert_eq!(failed.status, 502, "{}", failed.json);
    }
    let state = channel_state(&gateway, "only").await;
    assert_eq!(state["models"]["test-model"]["circuit"], "open", "{state}");
    // The upstream is healthy again: the open circuit moves the route last, and last is first.
    for _ in 0..3 {
        let answer = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
        assert_eq!(answer.status, 200, "{}", answer.json);
    }
    assert_eq!(sim.calls(), 6);
    let state = channel_state(&gateway, "only").await;
    assert_eq!(
        state["models"]["test-model"]["circuit"], "closed",
        "{state}"
    );
}

#[tokio::test]
async fn a_resting_key_on_the_only_route_still_serves() {
    let sim = simulator().await;
    let gateway = only_channel(&sim).await;
    sim.push_fault(Fault {
        status: Some(429),
        retry_after_s: Some(1),
        ..Fault::default()
    });
    let limited = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    limited.assert_error(429, Some("rate_limit_exceeded"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!(sim.calls(), 2);
}

#[tokio::test]
async fn what_an_upstream_says_about_one_model_stays_with_that_model() {
    let sim = simulator().await;
    let gateway = only_channel(&sim).await;
    let embedding = json!({"model": "test-embedding", "input": "x"});
    // A 429 on the chat model rests the key for that model only.
    sim.push_fault(Fault {
        status: Some(429),
        retry_after_s: Some(30),
        ..Fault::default()
    });
    let limited = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    limited.assert_error(429, Some("rate_limit_exceeded"));
    let other = gateway.post("/v1/embeddings", &embedding, &[]).await;
    assert_eq!(
        other.status, 200,
        "another model keeps the key: {}",
        other.json
    );
    assert_eq!(sim.calls(), 2, "and reaches the upstream");

    // A 403 for the chat model: that model's key is refused, and probed again later.
    sim.push_fault(failing(403));
    let refused = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert_eq!(refused.status, 502, "{}", refused.json);
    let state = channel_state(&gateway, "only").await;
    let key = &state["keys"][0];
    assert_eq!(key["state"]["state"], "usable", "{state}");
    assert_eq!(key["models"]["sim-model"]["state"], "refused", "{state}");
    let next_probe = key["models"]["sim-model"]["next_probe_ms"]
        .as_u64()
        .expect("the next probe is shown");
    assert!(next_probe > 0, "{state}");
    let other = gateway.post("/v1/embeddings", &embedding, &[]).await;
    assert_eq!(other.status, 200, "{}", other.json);
    // The only key of the only route is refused for chat: tried anyway, and the upstream, whose
    // refusal has passed, answers; that clears the refusal.
    let answer = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    let state = channel_state(&gateway, "only").await;
    assert_eq!(state["keys"][0]["models"], json!({}), "{state}");
    assert_eq!(sim.calls(), 5);
}

#[tokio::test]
async fn a_key_refused_for_good_answers_the_refusal_not_503() {
    let sim = simulator().await;
    let gateway = only_channel(&sim).await;
    sim.set_standing_fault(Some(failing(401)));
    for _ in 0..3 {
        let refused = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
        refused.assert_error(502, Some("upstream_authentication"));
    }
    let state = channel_state(&gateway, "only").await;
    assert_eq!(state["keys"][0]["state"]["state"], "refused", "{state}");
}

/// A gateway serving the test model on `first` (named `name`, tried first) and then on `healthy`.
async fn two_routes(
    name: &str,
    first: &tollgate_simulator::Simulator,
    healthy: &tollgate_simulator::Simulator,
) -> Gateway {
    start(&format!(
        "{}{}{}",
        billing(1_000_000),
        channel(name, first, 1),
        channel("healthy", healthy, 2)
    ))
    .await
    .expect("the gateway starts")
}

/// A model on two channels, the first accepting connections and never answering: with the
/// default settings, whole and streamed requests waiting on it move to the healthy channel within
/// 3 s, and the requests after them go there at once.
#[tokio::test]
async fn a_silent_channel_is_left_within_3_seconds() {
    let silent = simulator().await;
    let healthy = simulator().await;
    silent.set_standing_fault(Some(Fault {
        delay_ms: Some(30_000),
        ..Fault::default()
    }));
    let gateway = two_routes("silent", &silent, &healthy).await;
    let started = Instant::now();
    let requests = (0..4).map(|index| {
        let mut body = chat("x");
        body["stream"] = json!(index % 2 == 1);
        let gateway = &gateway;
        async move { gateway.post("/v1/chat/completions", &body, &[]).await }
    });
    let answers = tokio::time::timeout(Duration::from_secs(20), join_all(requests))
        .await
        .expect("no request waits out the silent channel's timeouts");
    let waited = started.elapsed();
    for answer in &answers {
        assert_eq!(answer.status, 200, "{}", answer.json);
    }
    assert!(
        waited < Duration::from_secs(3),
        "requests left the silent channel after {waited:?}"
    );
    let classes = attempt_classes(&gateway, &answers[0].request_id()).await;
    assert_eq!(classes, ["channel_silent"]);

    let started = Instant::now();
    let answer = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the next request goes to the healthy channel first"
    );
    assert_eq!(healthy.calls(), 5);
}

/// A stream whose upstream sent its headers, then went silent with its whole channel (new calls
/// get no headers), leaves within 3 s while nothing has reached the client.
#[tokio::test]
async fn a_stream_waiting_for_content_leaves_a_channel_gone_silent() {
    let silent = simulator().await;
    let healthy = simulator().await;
    silent.push_fault(Fault {
        hold_after_chunks: Some(0),
        ..Fault::default()
    });
    silent.set_standing_fault(Some(Fault {
        delay_ms: Some(30_000),
        ..Fault::default()
    }));
    let gateway = two_routes("silent", &silent, &healthy).await;
    let mut body = chat("x");
    body["stream"] = json!(true);
    let started = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        gateway.post("/v1/chat/completions", &body, &[]),
    )
    .await
    .expect("the stream does not wait out the first-byte timeout");
    let waited = started.elapsed();
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert!(
        waited < Duration::from_secs(3),
        "the stream left after {waited:?}"
    );
    let classes = attempt_classes(&gateway, &answer.request_id()).await;
    assert_eq!(classes, ["channel_silent"]);
    assert_eq!(healthy.calls(), 1);
}

/// A channel that takes long over one whole answer but answers the probe is not silent: the call
/// stays, and is answered there.
#[tokio::test]
async fn a_slow_answer_on_a_channel_that_answers_stays() {
    let slow = simulator().await;
    let healthy = simulator().await;
    slow.push_fault(Fault {
        delay_ms: Some(3_500),
        ..Fault::default()
    });
    let gateway = two_routes("slow", &slow, &healthy).await;
    let answer = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    let record = gateway.record_eventually(&answer.request_id()).await;
    assert_eq!(record["channel"], "slow", "{record}");
    assert_eq!(healthy.calls(), 0);
    assert!(
        slow.calls() >= 2,
        "the channel was probed while the answer came"
    );
}

/// One provider's part of the fault run: its public model, simulator and overload status.
struct Provider {
    model: &'static str,
    sim: tollgate_simulator::Simulator,
    overload: u16,
}

/// Each fault of the run on `provider`'s only route, one request each: faulted requests get an
/// error envelope (or a cut stream), never a hang; the request that waits out the 10 s stall
/// before the headers is answered.
async fn run_faults(gateway: &Gateway, provider: &Provider) {
    let whole = json!({"model": provider.model, "messages": [{"role": "user", "content": "x"}]});
    let mut streamed = whole.clone();
    streamed["stream"] = json!(true);
    let faults = [
        (failing(500), &whole),
        (failing(500), &whole),
        (failing(500), &whole),
        (failing(provider.overload), &whole),
        (
            Fault {
                cut_whole: true,
                ..Fault::default()
            },
            &whole,
        ),
        (
            Fault {
                cut_after_chunks: Some(1),
                ..Fault::default()
            },
            &streamed,
        ),
        (
            Fault {
                error_event: true,
                ..Fault::default()
            },
            &streamed,
        ),
    ];
    for (fault, body) in faults {
        provider.sim.push_fault(fault.clone());
        let answer = gateway.post("/v1/chat/completions", body, &[]).await;
        let cut_stream = answer.status == 200 && body["stream"] == true;
        assert!(
            cut_stream || answer.json["error"]["message"].is_string(),
            "{}: {fault:?}: {} {}",
            provider.model,
            answer.status,
            answer.json
        );
    }
    provider.sim.push_fault(Fault {
        delay_ms: Some(10_000),
        ..Fault::default()
    });
    let stalled = gateway.post("/v1/chat/completions", &whole, &[]).await;
    assert_eq!(stalled.status, 200, "{}: {}", provider.model, stalled.json);
    for _ in 0..2 {
        provider.sim.push_fault(Fault {
            status: Some(429),
            retry_after_s: Some(1),
            ..Fault::default()
        });
        let limited = gateway.post("/v1/chat/completions", &whole, &[]).await;
        limited.assert_error(429, Some("rate_limit_exceeded"));
    }
}

/// The issue's closing sequence: one gateway, without restart, takes every fault on each
/// provider, and the normal requests right after (the official SDKs, retries off) all succeed; a
/// channel whose key was refused still answers the refusal, not 503.
#[tokio::test]
async fn after_every_fault_on_every_provider_normal_requests_succeed() {
    let providers = [
        Provider {
            model: "openai-model",
            sim: simulator().await,
            overload: 503,
        },
        Provider {
            model: "anthropic-model",
            sim: simulator().await,
            overload: 529,
        },
        Provider {
            model: "gemini-model",
            sim: simulator().await,
            overload: 503,
        },
    ];
    let refusing = simulator().await;
    refusing.set_standing_fault(Some(failing(401)));
    let priced = |model: &str| format!(r#""{model}" = {{ input = 150000, output = 600000 }}"#);
    let prices = [
        "openai-model",
        "anthropic-model",
        "gemini-model",
        "refused-model",
    ]
    .map(priced)
    .join(", ");
    let config = format!(
        "[bindings.billing]\nplugin = \"price-table\"\n\
         config = {{ credit_limit_micros = 10000000, models = {{ {prices} }} }}\n{}{}{}{}",
        harness::protocol_channel(
            "openai",
            "openai",
            &providers[0].sim.openai_base_url(),
            1,
            r#""openai-model" = "sim-model""#
        ),
        harness::protocol_channel(
            "anthropic",
            "anthropic",
            &providers[1].sim.anthropic_base_url(),
            1,
            r#""anthropic-model" = "claude-sim""#
        ),
        harness::protocol_channel(
            "gemini",
            "gemini",
            &providers[2].sim.gemini_base_url(),
            1,
            r#""gemini-model" = "gemini-sim""#
        ),
        harness::protocol_channel(
            "refusing",
            "openai",
            &refusing.openai_base_url(),
            1,
            r#""refused-model" = "sim-model""#
        ),
    );
    let gateway = start(&config).await.expect("the gateway starts");
    let refused_body =
        json!({"model": "refused-model", "messages": [{"role": "user", "content": "x"}]});
    let refused = gateway
        .post("/v1/chat/completions", &refused_body, &[])
        .await;
    refused.assert_error(502, Some("upstream_authentication"));

    tokio::time::timeout(
        Duration::from_secs(60),
        join_all(
            providers
                .iter()
                .map(|provider| run_faults(&gateway, provider)),
        ),
    )
    .await
    .expect("the fault run ends");

    let models = [("MODELS", "openai-model,anthropic-model,gemini-model")];
    let python = harness::sdk_script("python3", "after_faults.py", &gateway, &models).await;
    let node = harness::sdk_script("node", "after_faults.mjs", &gateway, &models).await;
    for (sdk, results) in [("python", &python), ("node", &node)] {
        for provider in &providers {
            let result = &results[provider.model];
            assert_eq!(
                result["whole"],
                format!("Echo: whole from {sdk}"),
                "{sdk}: {results}"
            );
            assert_eq!(
                result["stream"],
                format!("Echo: stream from {sdk}"),
                "{sdk}: {results}"
            );
            assert_eq!(result["tool"], "get_weather", "{sdk}: {results}");
        }
    }

    let refused = gateway
        .post("/v1/chat/completions", &refused_body, &[])
        .await;
    refused.assert_error(502, Some("upstream_authentication"));
}

/// A gateway with one channel whose timeouts are first byte and idle 1 s, total 3 s.
async fn short_timeouts(sim: &tollgate_simulator::Simulator) -> Gateway {
    let timeouts = "api_key_env = [\"TEST_UPSTREAM_KEY\"]\nfirst_byte_timeout_ms = 1000\n\
                    idle_timeout_ms = 1000\ntotal_timeout_ms = 3000";
    start(&format!(
        "{}{}",
        billing(1_000_000),
        harness::channel_with("only", sim, 1, timeouts)
    ))
    .await
    .expect("the gateway starts")
}

/// The error classes of a request's attempts.
async fn attempt_classes(gateway: &Gateway, request_id: &str) -> Vec<String> {
    let record = gateway.record_eventually(request_id).await;
    record["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .filter_map(|attempt| attempt["error_class"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn every_upstream_wait_ends_and_the_record_says_which() {
    let sim = simulator().await;
    let gateway = short_timeouts(&sim).await;
    let bounded = Duration::from_secs(8);

    // A stream dripping a byte every 50 ms: bytes come, but no whole event within the first-byte
    // timeout.
    sim.push_fault(Fault {
        drip_interval_ms: Some(50),
        ..Fault::default()
    });
    let mut body = chat("x");
    body["stream"] = json!(true);
    let dripped = tokio::time::timeout(bounded, gateway.post("/v1/chat/completions", &body, &[]))
        .await
        .expect("a dripping stream is given up");
    dripped.assert_error(504, Some("upstream_timeout"));
    assert_eq!(
        attempt_classes(&gateway, &dripped.request_id()).await,
        ["timeout_first_content"]
    );

    // A whole answer whose body stalls after its headers: the idle timeout, not the total.
    sim.push_fault(Fault {
        stall_after_headers_ms: Some(6_000),
        ..Fault::default()
    });
    let stalled = tokio::time::timeout(
        bounded,
        gateway.post("/v1/chat/completions", &chat("x"), &[]),
    )
    .await
    .expect("a stalled whole answer is given up");
    stalled.assert_error(504, Some("upstream_timeout"));
    assert_eq!(
        attempt_classes(&gateway, &stalled.request_id()).await,
        ["timeout_idle"]
    );

    // A steady stream, an event every 400 ms, longer than the total timeout: cut at 3 s with an
    // error event, the record naming the total.
    sim.push_fault(Fault {
        chunk_interval_ms: Some(400),
        ..Fault::default()
    });
    let mut body = chat("a prompt long enough for a dozen chunks of six characters each");
    body["stream"] = json!(true);
    let (chunks, request_id) = tokio::time::timeout(bounded, async {
        let response = gateway.post_stream(&body).await;
        assert_eq!(response.status(), 200);
        let request_id = response.headers()["x-request-id"]
            .to_str()
            .expect("an id")
            .to_owned();
        (harness::SseReader::new(response).rest().await, request_id)
    })
    .await
    .expect("a stream past its total timeout is cut");
    // Whole, the stream would take 5.2 s and end cleanly: an error event means it was cut.
    let last = chunks.last().expect("events came");
    assert!(
        last.contains("upstream_timeout"),
        "an error event ends it: {chunks:?}"
    );
    // The record says the stream was cut; the attempt that carried it says why.
    let record = gateway.record_eventually(&request_id).await;
    assert_eq!(record["error_class"], "stream_cut", "{record}");
    assert_eq!(
        attempt_classes(&gateway, &request_id).await,
        ["timeout_total"]
    );
}

/// A key of a new tenant `name`.
async fn tenant_key(gateway: &Gateway, name: &str) -> String {
    let created = gateway
        .admin(
            reqwest::Method::POST,
            "/tenants",
            Some(json!({"name": name})),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.json);
    gateway
        .admin(
            reqwest::Method::POST,
            &format!("/tenants/{name}/keys"),
            None,
        )
        .await
        .json["secret"]
        .as_str()
        .expect("a key")
        .to_owned()
}

/// Tenant acme's own router spins to its deadline on every call, 60 requests at once: its calls
/// may hold only its share of the plugin instances, so another tenant is served meanwhile.
#[tokio::test]
async fn a_tenant_whose_plugin_calls_run_long_leaves_a_share_for_another() {
    let sim = simulator().await;
    let gateway = start(&format!(
        "max_instances = 40\n{}{}",
        billing(1_000_000),
        channel("only", &sim, 1)
    ))
    .await
    .expect("the gateway starts");
    let other = tenant_key(&gateway, "globex").await;
    let bytes = std::fs::read(harness::test_plugin(
        "tollgate_test_plugin_scripted_router.wasm",
    ))
    .expect("the scripted router is built");
    let uploaded = gateway.upload_plugin("scripted", bytes).await;
    assert_eq!(uploaded.status, 201, "{}", uploaded.json);
    let binding =
        json!({"plugin": "scripted", "config": {"misbehave": "loop"}, "deadline_ms": 200});
    let bound = gateway
        .admin(
            reqwest::Method::PUT,
            "/bindings?role=router&tenant=acme",
            Some(binding),
        )
        .await;
    assert_eq!(bound.status, 200, "{}", bound.json);

    let body = chat("x");
    let spinning = join_all((0..60).map(|_| gateway.post("/v1/chat/completions", &body, &[])));
    let served = async {
        // Once acme's calls hold the instances, globex asks, whole and streamed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut statuses = Vec::new();
        for round in 0..6 {
            let mut request = chat("x");
            request["stream"] = json!(round % 2 == 1);
            statuses.push(gateway.chat_as(&other, &request).await);
        }
        statuses
    };
    let (spun, statuses) = tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::join(spinning, served),
    )
    .await
    .expect("every request ends");
    for (round, answer) in statuses.iter().enumerate() {
        assert_eq!(answer.status, 200, "round {round}: {}", answer.json);
    }
    // acme's requests over its share are told to come back, never a 500 of the pool's.
    let over_share: Vec<_> = spun.iter().filter(|answer| answer.status != 500).collect();
    assert!(!over_share.is_empty(), "acme held more than its share");
    for answer in over_share {
        answer.assert_error(429, Some("rate_limit_exceeded"));
        assert!(
            answer.headers.contains_key("retry-after"),
            "{:?}",
            answer.headers
        );
    }
}

#[tokio::test]
async fn a_tenant_holding_streams_leaves_a_share_for_another() {
    let sim = simulator().await;
    let gateway = start(&format!(
        "max_instances = 40\n{}{}",
        billing(1_000_000),
        channel("only", &sim, 1)
    ))
    .await
    .expect("the gateway starts");
    let other = tenant_key(&gateway, "globex").await;
    // Tenant acme opens streams the upstream holds after their first chunk, until refused.
    sim.set_standing_fault(Some(Fault {
        hold_after_chunks: Some(2),
        ..Fault::default()
    }));
    let mut body = chat("x");
    body["stream"] = json!(true);
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..60 {
        let response = gateway.post_stream(&body).await;
        if response.status() != 200 {
            refused = Some(harness::Answer::read(response).await);
            break;
        }
        let mut reader = harness::SseReader::new(response);
        reader
            .next(Duration::from_secs(10))
            .await
            .expect("the stream's first chunk");
        held.push(reader);
    }
    let refused = refused.expect("a tenant cannot take every instance");
    refused.assert_error(429, Some("rate_limit_exceeded"));
    assert!(
        refused.headers.contains_key("retry-after"),
        "{:?}",
        refused.headers
    );
    assert!(
        held.len() >= 20,
        "a lone tenant uses most of the pool: {}",
        held.len()
    );
    // The other tenant is served, whole and streamed, while acme holds its streams.
    sim.set_standing_fault(None);
    for round in 0..6 {
        let mut request = chat("x");
        request["stream"] = json!(round % 2 == 1);
        let answer = gateway.chat_as(&other, &request).await;
        assert_eq!(answer.status, 200, "round {round}: {}", answer.json);
    }
    sim.release();
    drop(held);
}
