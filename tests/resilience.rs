//! End-to-end resilience: key pools, retries, timeouts, the circuit breaker, failover under load,
//! and the trace of every attempt.

mod harness;

use std::time::{Duration, Instant};

use harness::{
    SECOND_UPSTREAM_KEY, SseReader, UPSTREAM_KEY, billing, channel, channel_with, chat, simulator,
    start,
};
use tollgate_simulator::{Fault, Simulator, TlsIdentity};

fn fault(status: u16) -> Fault {
    Fault {
        status: Some(status),
        ..Fault::default()
    }
}

fn keys_used(sim: &tollgate_simulator::Simulator) -> Vec<String> {
    sim.seen()
        .into_iter()
        .map(|seen| {
            seen.authorization
                .unwrap_or_default()
                .replace("Bearer ", "")
        })
        .collect()
}

#[tokio::test]
async fn a_refused_key_is_set_aside_and_a_rate_limited_key_rests() {
    let sim = simulator().await;
    let pool = r#"api_key_env = ["TEST_UPSTREAM_KEY", "TEST_UPSTREAM_KEY_2"]"#;
    let gateway = start(&format!(
        "{}{}",
        billing(1_000_000),
        channel_with("pool", &sim, 1, pool)
    ))
    .await
    .expect("the gateway starts");

    // The tenant sticks to one key while it works.
    for _ in 0..3 {
        assert_eq!(
            gateway
                .post("/v1/chat/completions", &chat("x"), &[])
                .await
                .status,
            200
        );
    }
    let used = keys_used(&sim);
    assert!(
        used.iter().all(|key| key == &used[0]),
        "one key while healthy: {used:?}"
    );
    let first = used[0].clone();
    let second = if first == UPSTREAM_KEY {
        SECOND_UPSTREAM_KEY
    } else {
        UPSTREAM_KEY
    }
    .to_owned();

    // A 401 disables that key: the same request moves to the other key, and so do later ones.
    sim.push_fault(fault(401));
    let moved = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert_eq!(moved.status, 200, "{}", moved.json);
    assert_eq!(moved.headers["x-tollgate-attempts"], "2");
    assert_eq!(
        gateway
            .post("/v1/chat/completions", &chat("x"), &[])
            .await
            .status,
        200
    );
    let used = keys_used(&sim);
    assert_eq!(&used[3..], [first.clone(), second.clone(), second.clone()]);
    let record = gateway.record(&moved.request_id()).await;
    assert_eq!(record["attempts"][0]["error_class"], "authentication");
    assert_eq!(
        record["attempts"][1]["key"],
        if second == UPSTREAM_KEY {
            "TEST_UPSTREAM_KEY"
        } else {
            "TEST_UPSTREAM_KEY_2"
        }
    );
    assert!(
        !record.to_string().contains(&second),
        "the trace never holds a secret"
    );

    // The remaining key gets a 429 with retry-after: it rests for that model, and with no key
    // left the client gets the upstream's 429 and its retry-after.
    sim.push_fault(Fault {
        status: Some(429),
        retry_after_s: Some(30),
        ..Fault::default()
    });
    let limited = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    limited.assert_error(429, Some("rate_limit_exceeded"));
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(retry_after, 30);
    // The operator sees why each key is out, by variable name, never by secret.
    let channels = gateway
        .http
        .get(format!("{}/admin/channels", gateway.url))
        .bearer_auth(harness::ADMIN_TOKEN)
        .send()
        .await
        .expect("the admin API answers")
        .text()
        .await
        .expect("text");
    assert!(channels.contains("the upstream refused it"), "{channels}");
    assert!(channels.contains("\"resting\""), "{channels}");
    assert!(
        !channels.contains(UPSTREAM_KEY) && !channels.contains(SECOND_UPSTREAM_KEY),
        "{channels}"
    );
    // Every key is held back: the resting one is tried anyway, and the upstream, whose limit has
    // passed, answers. A key's state never refuses the last route by itself.
    let calls = sim.calls();
    let resting = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert_eq!(resting.status, 200, "{}", resting.json);
    assert_eq!(sim.calls(), calls + 1);
    assert_eq!(keys_used(&sim).last(), Some(&second));
}

#[tokio::test]
async fn retries_stay_on_the_channel_then_fail_over() {
    let flaky = simulator().await;
    let backup = simulator().await;
    let channels = format!(
        "{}{}",
        channel_with(
            "flaky",
            &flaky,
            1,
            "api_key_env = [\"TEST_UPSTREAM_KEY\"]\nretries = 1\nretry_backoff_ms = 10"
        ),
        channel("backup", &backup, 2)
    );
    let gateway = start(&format!("{}{channels}", billing(1_000_000)))
        .await
        .expect("the gateway starts");
    flaky.push_fault(fault(503));
    let retried = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert_eq!(retried.status, 200);
    assert_eq!(retried.headers["x-tollgate-channel"], "flaky");
    assert_eq!((flaky.calls(), backup.calls()), (2, 0));

    flaky.push_fault(fault(500));
    flaky.push_fault(fault(502));
    let failed_over = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert_eq!(failed_over.status, 200);
    assert_eq!(failed_over.headers["x-tollgate-channel"], "backup");
    assert_eq!(failed_over.headers["x-tollgate-attempts"], "3");
    assert_eq!((flaky.calls(), backup.calls()), (4, 1));

    // A 400 is the client's: never retried, never failed over.
    flaky.push_fault(fault(400));
    gateway
        .post("/v1/chat/completions", &chat("x"), &[])
        .await
        .assert_error(400, None);
    assert_eq!((flaky.calls(), backup.calls()), (5, 1));
}

#[tokio::test]
async fn timeouts_fail_over_and_exhaustion_reports_the_class() {
    let slow = simulator().await;
    let stalling = simulator().await;
    let channels = format!(
        "{}{}",
        channel_with(
            "slow",
            &slow,
            1,
            // The channel default would wait a minute; the model's own override cuts at 200 ms.
            "api_key_env = [\"TEST_UPSTREAM_KEY\"]\nfirst_byte_timeout_ms = 60000\nmodel_first_byte_timeout_ms = { \"test-model\" = 200 }"
        ),
        channel_with(
            "stalling",
            &stalling,
            2,
            "api_key_env = [\"TEST_UPSTREAM_KEY\"]\ntotal_timeout_ms = 200"
        )
    );
    let gateway = start(&format!("{}{channels}", billing(1_000_000)))
        .await
        .expect("the gateway starts");
    slow.push_fault(Fault {
        delay_ms: Some(2_000),
        ..Fault::default()
    });
    stalling.push_fault(Fault {
        stall_after_headers_ms: Some(2_000),
        ..Fault::default()
    });
    let started = Instant::now();
    let timed_out = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    timed_out.assert_error(504, Some("upstream_timeout"));
    assert!(
        started.elapsed() < Duration::from_millis(1_500),
        "{:?}",
        started.elapsed()
    );
    let record = gateway.record(&timed_out.request_id()).await;
    let classes: Vec<&str> = record["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["error_class"].as_str())
        .collect();
    assert_eq!(classes, ["timeout_headers", "timeout_total"]);

    slow.push_fault(fault(529));
    stalling.push_fault(fault(503));
    gateway
        .post("/v1/chat/completions", &chat("x"), &[])
        .await
        .assert_error(503, Some("upstream_overloaded"));
}

#[tokio::test]
async fn the_circuit_opens_and_recovers_through_a_half_open_probe() {
    let failing = simulator().await;
    let healthy = simulator().await;
    let config = format!(
        "[health]\nfailure_threshold = 2\ncooldown_ms = 400\n{}{}{}",
        billing(1_000_000),
        channel("failing", &failing, 1),
        channel("healthy", &healthy, 2)
    );
    let gateway = start(&config).await.expect("the gateway starts");
    failing.set_standing_fault(Some(fault(500)));
    for _ in 0..2 {
        let answer = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
        assert_eq!(answer.headers["x-tollgate-channel"], "healthy");
    }
    assert_eq!(failing.calls(), 2);
    // Open: the router sees it and puts the failing channel last, so it gets no call.
    let skipped = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert_eq!(skipped.status, 200);
    assert_eq!(skipped.headers["x-tollgate-attempts"], "1");
    assert_eq!(failing.calls(), 2);
    // After the cooldown one probe goes through; it succeeds, and the circuit closes.
    failing.set_standing_fault(None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let probe = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert_eq!(probe.headers["x-tollgate-channel"], "failing");
    let after = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert_eq!(after.headers["x-tollgate-channel"], "failing");
    assert_eq!(failing.calls(), 4);
}

#[tokio::test]
async fn a_channel_failing_under_steady_load_is_isolated_without_client_errors() {
    let primary = simulator().await;
    let secondary = simulator().await;
    let config = format!(
        "{}{}{}",
        billing(1_000_000),
        channel("primary", &primary, 1),
        channel("secondary", &secondary, 2)
    );
    let gateway = start(&config).await.expect("the gateway starts");
    let mut failed_at = None;
    let mut isolated_after = None;
    for index in 0..200 {
        if index == 50 {
            primary.set_standing_fault(Some(fault(500)));
            failed_at = Some(Instant::now());
        }
        let answer = gateway
            .post("/v1/chat/completions", &chat("steady"), &[])
            .await;
        assert_eq!(
            answer.status, 200,
            "the client never sees the failure: {}",
            answer.json
        );
        // Isolated: the first answer after the failure that did not try the primary first.
        if let Some(at) = failed_at
            && isolated_after.is_none()
            && answer.headers["x-tollgate-channel"] == "secondary"
            && answer.headers["x-tollgate-attempts"] == "1"
        {
            isolated_after = Some(at.elapsed());
        }
        if isolated_after.is_some() && index >= 100 {
            break;
        }
    }
    let isolated_after = isolated_after.expect("the failing channel is isolated");
    eprintln!("failing channel isolated {isolated_after:?} after it started failing");
    assert!(
        isolated_after < Duration::from_secs(3),
        "{isolated_after:?}"
    );
    assert_eq!(
        primary.calls(),
        50 + 3,
        "after 3 failures (the threshold) no more calls"
    );
}

#[tokio::test]
async fn a_swapped_model_is_flagged() {
    let sim = simulator().await;
    let gateway = start(&format!(
        "{}{}",
        billing(1_000_000),
        channel("only", &sim, 1)
    ))
    .await
    .expect("the gateway starts");
    let honest = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert_eq!(honest.headers["x-tollgate-model"], "sim-model");
    assert_eq!(
        gateway.record(&honest.request_id()).await["model_mismatch"],
        false
    );
    sim.push_fault(Fault {
        served_model: Some("cheaper-model".to_owned()),
        ..Fault::default()
    });
    let swapped = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert_eq!(swapped.headers["x-tollgate-model"], "cheaper-model");
    let record = gateway.record(&swapped.request_id()).await;
    assert_eq!(record["model_mismatch"], true);
    assert_eq!(record["model_served"], "cheaper-model");
}

#[tokio::test]
async fn metrics_count_requests_attempts_tokens_and_circuits() {
    let broken = simulator().await;
    let healthy = simulator().await;
    let config = format!(
        "{}{}{}",
        billing(1_000_000),
        channel("broken", &broken, 1),
        channel("healthy", &healthy, 2)
    );
    let gateway = start(&config).await.expect("the gateway starts");
    broken.push_fault(fault(500));
    assert_eq!(
        gateway
            .post("/v1/chat/completions", &chat("a b c"), &[])
            .await
            .status,
        200
    );
    let metrics = gateway.metrics().await;
    for line in [
        r#"tollgate_requests_total{tenant="acme",model="test-model",channel="healthy",status="200"} 1"#,
        r#"tollgate_upstream_attempts_total{channel="broken",outcome="server"} 1"#,
        r#"tollgate_upstream_attempts_total{channel="healthy",outcome="ok"} 1"#,
        r#"tollgate_tokens_total{tenant="acme",model="test-model",kind="input"} 3"#,
        r#"tollgate_tokens_total{tenant="acme",model="test-model",kind="output"} 4"#,
        r#"tollgate_circuit_state{channel="broken"} 0"#,
        r#"tollgate_gateway_overhead_seconds_count 1"#,
    ] {
        assert!(metrics.contains(line), "`{line}` missing from:\n{metrics}");
    }
    assert!(
        metrics.contains("tollgate_plugin_call_duration_seconds_count{role=\"router\""),
        "{metrics}"
    );
    let ready = gateway
        .http
        .get(format!("{}/readyz", gateway.url))
        .send()
        .await
        .expect("readyz answers");
    assert_eq!(ready.status(), 200);
}

#[tokio::test]
async fn every_shipped_router_routes_and_cost_first_picks_the_cheapest() {
    for router in [
        "failover",
        "cost-first",
        "latency-first",
        "least-busy",
        "weighted",
    ] {
        let dear = simulator().await;
        let cheap = simulator().await;
        let prices = |input: u64| {
            format!(
                "api_key_env = [\"TEST_UPSTREAM_KEY\"]\nprices = {{ \"test-model\" = {{ input = {input}, output = {input} }} }}"
            )
        };
        let config = format!(
            "[bindings.router]\nplugin = \"{router}\"\n{}{}{}",
            billing(1_000_000),
            channel_with("dear", &dear, 1, &prices(5_000_000)),
            channel_with("cheap", &cheap, 2, &prices(100_000)),
        );
        let gateway = start(&config).await.expect("the gateway starts");
        let answer = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
        assert_eq!(answer.status, 200, "{router}: {}", answer.json);
        if router == "cost-first" {
            assert_eq!(answer.headers["x-tollgate-channel"], "cheap");
        }
        if router == "failover" {
            assert_eq!(answer.headers["x-tollgate-channel"], "dear");
        }
    }
}

#[tokio::test]
async fn a_model_whose_routes_all_fail_degrades_to_its_fallback() {
    let main = simulator().await;
    let spare = simulator().await;
    let config = format!(
        r#"
[models."test-model"]
fallback = "spare-model"
{}{}
[[channels]]
name = "spare"
protocol = "openai"
base_url = "{}"
api_key_env = ["TEST_UPSTREAM_KEY"]
models = {{ "spare-model" = "sim-spare" }}
"#,
        billing(1_000_000).replace("\"test-embedding\"", "\"spare-model\""),
        channel("main", &main, 1),
        spare.openai_base_url()
    );
    let gateway = start(&config).await.expect("the gateway starts");
    let normal = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert!(!normal.headers.contains_key("x-tollgate-degraded"));
    main.set_standing_fault(Some(fault(500)));
    let degraded = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert_eq!(degraded.status, 200, "{}", degraded.json);
    assert_eq!(degraded.headers["x-tollgate-degraded"], "spare-model");
    assert_eq!(degraded.headers["x-tollgate-channel"], "spare");
    let record = gateway.record(&degraded.request_id()).await;
    assert_eq!(record["model_asked"], "test-model");
    assert_eq!(record["degraded_to"], "spare-model");
    assert_eq!(record["model_served"], "sim-spare");
    assert_eq!(spare.calls(), 1);
}

#[tokio::test]
async fn a_refused_connection_fails_over() {
    let healthy = simulator().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let closed_url = format!("http://{}/v1", closed.local_addr().expect("an address"));
    drop(closed);
    let config = format!(
        r#"{}
[[channels]]
name = "gone"
protocol = "openai"
base_url = "{closed_url}"
api_key_env = ["TEST_UPSTREAM_KEY"]
priority = 1
models = {{ "test-model" = "sim-model" }}
{}"#,
        billing(1_000_000),
        channel("healthy", &healthy, 2)
    );
    let gateway = start(&config).await.expect("the gateway starts");
    let answer = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    let record = gateway.record(&answer.request_id()).await;
    assert_eq!(record["attempts"][0]["error_class"], "connect");
    assert_eq!(record["channel"], "healthy");
}

#[tokio::test]
async fn a_failing_model_opens_its_own_circuit_not_the_channels() {
    let mixed = simulator().await;
    let backup = simulator().await;
    let config = format!(
        "[health]\nfailure_threshold = 2\ncooldown_ms = 60000\n{}{}{}",
        billing(1_000_000),
        channel("mixed", &mixed, 1),
        channel("backup", &backup, 2)
    );
    let gateway = start(&config).await.expect("the gateway starts");
    mixed.set_standing_fault(Some(Fault {
        status: Some(500),
        only_model: Some("sim-model".to_owned()),
        ..Fault::default()
    }));
    for _ in 0..2 {
        let answer = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
        assert_eq!(answer.headers["x-tollgate-channel"], "backup");
        assert_eq!(answer.headers["x-tollgate-attempts"], "2");
    }
    // The chat model's circuit on `mixed` is open: chat goes straight to the backup ...
    let chat_now = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert_eq!(chat_now.headers["x-tollgate-attempts"], "1");
    assert_eq!(chat_now.headers["x-tollgate-channel"], "backup");
    // ... while the channel keeps serving its other model.
    let embedding = gateway
        .post(
            "/v1/embeddings",
            &serde_json::json!({"model": "test-embedding", "input": "x"}),
            &[],
        )
        .await;
    assert_eq!(embedding.status, 200, "{}", embedding.json);
    assert_eq!(embedding.headers["x-tollgate-channel"], "mixed");
}

#[tokio::test]
async fn spans_are_exported_over_otlp_when_configured() {
    use std::sync::{Arc, Mutex};
    /// (content type, body) of each export the collector received.
    type Exports = Arc<Mutex<Vec<(String, Vec<u8>)>>>;
    let received: Exports = Arc::default();
    let sink = received.clone();
    let collector = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let kind = headers
                        .get("content-type")
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    sink.lock()
                        .expect("not poisoned")
                        .push((kind, body.to_vec()));
                    axum::http::StatusCode::OK
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let endpoint = format!(
        "http://{}/v1/traces",
        listener.local_addr().expect("an address")
    );
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let sim = simulator().await;
    let config = format!(
        "[telemetry]\notlp_endpoint = \"{endpoint}\"\nexport_interval_ms = 100\n{}{}",
        billing(1_000_000),
        channel("only", &sim, 1)
    );
    let gateway = start(&config).await.expect("the gateway starts");
    assert_eq!(
        gateway
            .post("/v1/chat/completions", &chat("x"), &[])
            .await
            .status,
        200
    );
    let mut exported = false;
    for _ in 0..100 {
        let batches = received.lock().expect("not poisoned").clone();
        if batches.iter().any(|(kind, body)| {
            kind == "application/x-protobuf"
                && body
                    .windows(b"upstream.attempt".len())
                    .any(|w| w == b"upstream.attempt")
        }) {
            exported = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        exported,
        "an upstream.attempt span reaches the collector within 10 s"
    );
}

#[tokio::test]
async fn a_stream_that_goes_quiet_is_cut_at_the_idle_timeout() {
    let sim = simulator().await;
    let config = format!(
        "{}{}",
        billing(1_000_000),
        channel_with(
            "quiet",
            &sim,
            1,
            "api_key_env = [\"TEST_UPSTREAM_KEY\"]\nidle_timeout_ms = 300"
        )
    );
    let gateway = start(&config).await.expect("the gateway starts");
    sim.push_fault(Fault {
        hold_after_chunks: Some(2),
        ..Fault::default()
    });
    let mut body = chat("one two three");
    body["stream"] = serde_json::json!(true);
    let started = Instant::now();
    let text = gateway
        .http
        .post(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(&gateway.key)
        .json(&body)
        .send()
        .await
        .expect("the gateway answers")
        .text()
        .await
        .expect("the stream ends");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(text.contains("\"code\":\"upstream_timeout\""), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    sim.release();
}

/// Hosted providers speak HTTPS and offer HTTP/2, which caps the requests one connection carries
/// at once (about a hundred); this upstream allows one. A stream running there must not hold back
/// the next request, as it would if the gateway sent both on one HTTP/2 connection.
#[tokio::test]
async fn a_running_stream_does_not_hold_back_the_next_request_to_an_https_upstream() {
    let sim = Simulator::start_tls(
        ([127, 0, 0, 1], 0).into(),
        vec![UPSTREAM_KEY.to_owned()],
        &TlsIdentity {
            certificate_chain_pem: include_bytes!("fixtures/tls/upstream.pem"),
            private_key_pem: include_bytes!("fixtures/tls/upstream.key"),
        },
        1,
    )
    .await
    .expect("the TLS simulator binds a loopback port");
    // Named relative to the configuration file, which the gateway does not run beside.
    let config = format!(
        "{}{}",
        billing(1_000_000),
        channel_with(
            "hosted",
            &sim,
            1,
            "api_key_env = [\"TEST_UPSTREAM_KEY\"]\nca_file = \"ca.pem\"\nfirst_byte_timeout_ms = 3000",
        )
    );
    let ca = include_bytes!("fixtures/tls/ca.pem");
    let gateway = harness::start_beside(&[("ca.pem", ca)], "", &config)
        .await
        .expect("the gateway starts");
    sim.push_fault(Fault {
        hold_after_chunks: Some(1),
        ..Fault::default()
    });
    let mut body = chat("one two three");
    body["stream"] = serde_json::json!(true);
    let running = gateway.post_stream(&body).await;
    assert_eq!(running.status(), 200);
    let mut running = SseReader::new(running);
    let first = running
        .next(Duration::from_secs(10))
        .await
        .expect("the stream's first chunk");
    assert!(first.contains("chat.completion.chunk"), "{first}");

    let next = gateway
        .post("/v1/chat/completions", &chat("four five"), &[])
        .await;
    assert_eq!(next.status, 200, "{}", next.json);
    assert_eq!(
        next.json["choices"][0]["message"]["content"], "Echo: four five",
        "{}",
        next.json
    );

    sim.release();
    let rest = running.rest().await;
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"), "{rest:?}");
    assert_eq!(sim.calls(), 2);
}

/// A channel's `ca_file` that cannot be read stops start-up with a message naming the channel and
/// the file, instead of a gateway whose every call to that upstream fails its TLS handshake.
#[tokio::test]
async fn a_channel_whose_ca_file_is_missing_stops_the_gateway_at_start() {
    let sim = simulator().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = harness::write_config(
        dir.path(),
        "listen = \"127.0.0.1:0\"\n",
        &format!(
            "{}{}",
            billing(1_000_000),
            channel_with(
                "private",
                &sim,
                1,
                "api_key_env = [\"TEST_UPSTREAM_KEY\"]\nca_file = \"no-such-ca.pem\""
            )
        ),
    )
    .expect("the config is written");
    let served = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(harness::binary())
            .args(["serve", "--config"])
            .arg(&config)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the gateway exits instead of serving")
    .expect("the gateway runs");
    assert!(!served.status.success());
    let stderr = String::from_utf8_lossy(&served.stderr);
    // The path it looked at: beside the configuration file.
    let looked_at = dir.path().join("no-such-ca.pem");
    assert!(
        stderr.contains(&format!(
            "channel `private`: `ca_file` {:?} cannot be used",
            looked_at.display().to_string()
        )),
        "{stderr}"
    );
}
