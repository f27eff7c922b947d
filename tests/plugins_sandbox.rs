//! End-to-end: hostile router plugins (a trap, an endless loop, a memory bomb, a huge output) get
//! a clear 500 naming plugin and role within the deadline, the gateway serves the next request and
//! `/metrics` counts the failure; uploads that are not plugins get a clear error naming why.

mod harness;

use std::time::{Duration, Instant};

use harness::{billing, channel, chat, simulator, start, test_plugin};
use reqwest::Method;
use serde_json::json;

/// Sends one request to a gateway whose router misbehaves: it gets a 500 naming the plugin (every
/// word of `words` in the message) well within the time a hang would take.
async fn contained(
    gateway: &harness::Gateway,
    headers: &[(&str, &str)],
    words: &[&str],
) -> harness::Answer {
    let started = Instant::now();
    let hostile = tokio::time::timeout(
        Duration::from_secs(30),
        gateway.post("/v1/chat/completions", &chat("x"), headers),
    )
    .await
    .expect("a hostile plugin never hangs the request");
    hostile.assert_error(500, Some("plugin_failed"));
    let message = hostile.json["error"]["message"]
        .as_str()
        .expect("a message");
    for word in words {
        assert!(message.contains(word), "`{word}` in {message}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered in {:?}",
        started.elapsed()
    );
    hostile
}

/// A router bound in the configuration file that misbehaves on `x-tollgate-hostile: 1` is
/// contained, and the next request is served.
async fn hostile_router_is_contained(
    file: &str,
    deadline_ms: u64,
    expected_words: &[&str],
) -> harness::Gateway {
    let sim = simulator().await;
    let config = format!(
        "[bindings.router]\nplugin = \"{}\"\ndeadline_ms = {deadline_ms}\n{}{}",
        test_plugin(file).display(),
        billing(1_000_000),
        channel("primary", &sim, 1)
    );
    let gateway = start(&config).await.expect("the gateway starts");
    let hostile = contained(&gateway, &[("x-tollgate-hostile", "1")], expected_words).await;
    assert_eq!(sim.calls(), 0);
    let record = gateway.record(&hostile.request_id()).await;
    assert_eq!(record["error_class"], "plugin_router");

    let next = gateway
        .post("/v1/chat/completions", &chat("after"), &[])
        .await;
    assert_eq!(
        next.status,
        200,
        "the gateway keeps serving: {} / {}",
        next.json,
        gateway.log()
    );
    assert_eq!(next.json["choices"][0]["message"]["content"], "Echo: after");
    gateway
}

#[tokio::test]
async fn a_trapping_router_gets_a_500_naming_it() {
    let gateway = hostile_router_is_contained(
        "tollgate_test_plugin_trap.wasm",
        1000,
        &["router", "tollgate_test_plugin_trap@"],
    )
    .await;
    // The plugin's own panic message reaches the operator's log, through the WASI stderr the
    // sandbox makes on the plugin's first write.
    assert!(
        gateway.log().contains("this test plugin traps on request"),
        "{}",
        gateway.log()
    );
}

#[tokio::test]
async fn an_endless_router_is_cut_at_its_deadline() {
    let _gateway = hostile_router_is_contained(
        "tollgate_test_plugin_endless_loop.wasm",
        200,
        &["router", "tollgate_test_plugin_endless_loop@", "200 ms"],
    )
    .await;
}

/// Binds the scripted router, misbehaving as asked, to tenant `acme` through the admin API; the
/// request gets a 500 naming plugin and role, a request of the same tenant right after a rollback
/// is served, and `/metrics` counts the failure.
/// A gateway with one channel and the scripted router uploaded (not bound).
async fn gateway_with_scripted_router() -> (tollgate_simulator::Simulator, harness::Gateway) {
    let sim = simulator().await;
    let config = format!("{}{}", billing(1_000_000), channel("primary", &sim, 1));
    let gateway = start(&config).await.expect("the gateway starts");
    let bytes = std::fs::read(test_plugin("tollgate_test_plugin_scripted_router.wasm"))
        .expect("the scripted router is built");
    let uploaded = gateway.upload_plugin("scripted", bytes).await;
    assert_eq!(uploaded.status, 201, "{}", uploaded.json);
    (sim, gateway)
}

async fn uploaded_router_is_contained(
    misbehaviour: &str,
    limits: serde_json::Value,
    words: &[&str],
) {
    let (sim, gateway) = gateway_with_scripted_router().await;
    let mut binding = json!({"plugin": "scripted", "config": {"misbehave": misbehaviour}});
    binding
        .as_object_mut()
        .expect("an object")
        .extend(limits.as_object().cloned().unwrap_or_default());
    let bound = gateway
        .admin(
            Method::PUT,
            "/bindings?role=router&tenant=acme",
            Some(binding),
        )
        .await;
    assert_eq!(bound.status, 200, "{}", bound.json);

    let words: Vec<&str> = words
        .iter()
        .copied()
        .chain(["router", "scripted@"])
        .collect();
    contained(&gateway, &[], &words).await;
    assert_eq!(sim.calls(), 0);

    let rolled = gateway
        .admin(
            Method::POST,
            "/bindings/rollback?role=router&tenant=acme",
            None,
        )
        .await;
    assert_eq!(rolled.status, 200, "{}", rolled.json);
    let next = gateway
        .post("/v1/chat/completions", &chat("after"), &[])
        .await;
    assert_eq!(next.status, 200, "the gateway keeps serving: {}", next.json);
    let metrics = gateway.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("tollgate_plugin_failures_total{")
                && line.contains("plugin=\"scripted@")
                && line.ends_with(" 1")),
        "the failure is counted: {metrics}"
    );
}

#[tokio::test]
async fn a_memory_bomb_hits_its_cap() {
    uploaded_router_is_contained("memory", json!({"memory_mib": 16}), &["memory limit"]).await;
}

#[tokio::test]
async fn a_huge_output_is_refused() {
    uploaded_router_is_contained(
        "huge-output",
        json!({"max_output_kib": 1024}),
        &["output cap"],
    )
    .await;
}

#[tokio::test]
async fn no_call_finds_the_memory_of_an_earlier_one() {
    let (_sim, gateway) = gateway_with_scripted_router().await;
    let bound = gateway
        .admin(
            Method::PUT,
            "/bindings?role=router&tenant=acme",
            Some(json!({"plugin": "scripted", "config": {"expect_fresh": true}})),
        )
        .await;
    assert_eq!(bound.status, 200, "{}", bound.json);
    // Enough calls that pooled instance slots are reused many times over, concurrently too.
    all_served_at_once(&gateway, "are you fresh?", 40).await;
}

/// Sends `count` chat requests at once; every one must be served.
async fn all_served_at_once(gateway: &harness::Gateway, text: &str, count: usize) {
    let body = chat(text);
    let calls = (0..count).map(|_| gateway.post("/v1/chat/completions", &body, &[]));
    for answer in futures::future::join_all(calls).await {
        assert_eq!(answer.status, 200, "{}", answer.json);
    }
}

#[tokio::test]
async fn a_gateway_with_idle_moments_makes_plugin_instances_ahead_of_their_calls() {
    let sim = simulator().await;
    let gateway = start(&format!(
        "{}{}",
        billing(1_000_000),
        channel("primary", &sim, 1)
    ))
    .await
    .expect("the gateway starts");
    let before = instances_made(&gateway).await;
    let requests = 10;
    for index in 0..requests {
        let answer = gateway
            .post(
                "/v1/chat/completions",
                &chat(&format!("one at a time {index}")),
                &[],
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.json);
        // Time for the request's stores to be dropped and its plugins' next instances made.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = instances_made(&gateway).await;
    let (ahead, in_call) = (after.0 - before.0, after.1 - before.1);
    // Five calls a request (route, authorize, translate the request and the answer, charge),
    // each in an instance of its own, whichever way it was made.
    assert!(
        ahead + in_call >= 5 * requests,
        "{ahead} made ahead, {in_call} in calls"
    );
    // The first call to each of the three plugins in a request finds an instance ready.
    assert!(
        in_call <= 2 * requests,
        "{ahead} made ahead, {in_call} in calls"
    );
}

/// The gateway's counts of plugin instances made ahead of their calls and in them.
async fn instances_made(gateway: &harness::Gateway) -> (u64, u64) {
    let metrics = gateway.metrics().await;
    let count = |name: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} is in the metrics: {metrics}"))
    };
    (
        count("tollgate_plugin_instances_made_ahead_total"),
        count("tollgate_plugin_instances_made_in_call_total"),
    )
}

#[tokio::test]
async fn requests_waiting_on_their_upstream_hold_no_plugin_instance() {
    let sim = simulator().await;
    let gateway = start(&format!(
        "max_instances = 6\n{}{}",
        billing(1_000_000),
        channel("primary", &sim, 1)
    ))
    .await
    .expect("the gateway starts");
    // A slow upstream and more requests waiting on it than the pool has instances: a request
    // holds one only while a plugin runs, never across the upstream call. The requests start
    // 20 ms apart, so their plugin calls seldom overlap while all 16 wait on the upstream
    // together (the last starts 300 ms in, the first answer comes at 800 ms).
    sim.set_standing_fault(Some(tollgate_simulator::Fault {
        delay_ms: Some(800),
        ..Default::default()
    }));
    let body = chat("slow upstream");
    let calls = (0..16u64).map(|index| {
        let body = &body;
        let gateway = &gateway;
        async move {
            tokio::time::sleep(Duration::from_millis(20 * index)).await;
            gateway.post("/v1/chat/completions", body, &[]).await
        }
    });
    for answer in futures::future::join_all(calls).await {
        assert_eq!(answer.status, 200, "{}", answer.json);
    }
}

#[tokio::test]
async fn an_uploaded_endless_loop_is_cut_at_its_binding_deadline() {
    uploaded_router_is_contained("loop", json!({"deadline_ms": 100}), &["100 ms"]).await;
}

#[tokio::test]
async fn an_uploaded_trap_is_contained() {
    uploaded_router_is_contained("trap", json!({}), &["failed"]).await;
}

#[tokio::test]
async fn uploads_that_are_not_plugins_are_refused_naming_why() {
    let sim = simulator().await;
    let config = format!(
        "max_upload_mib = 5\n{}{}",
        billing(1_000_000),
        channel("primary", &sim, 1)
    );
    let gateway = start(&config).await.expect("the gateway starts");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage",
            b"these bytes are not wasm at all".to_vec(),
            "not WebAssembly",
        ),
        (
            "core-module",
            b"\0asm\x01\0\0\0".to_vec(),
            "core WebAssembly module, not a component",
        ),
        (
            "command",
            std::fs::read(test_plugin("not-a-plugin.wasm")).expect("built"),
            "exports none of the role interfaces",
        ),
        (
            "reads-files",
            std::fs::read(test_plugin("tollgate_test_plugin_reads_files.wasm")).expect("built"),
            "wasi:filesystem/",
        ),
        (
            "future",
            harness::built_against(
                &std::fs::read(test_plugin("tollgate_test_plugin_scripted_router.wasm"))
                    .expect("built"),
                b"0.9.0",
            ),
            "built against tollgate:plugin@0.9.0; this host serves tollgate:plugin@0.1.2, tollgate:plugin@0.1.1 and tollgate:plugin@0.1.0",
        ),
    ];
    for (name, bytes, expected) in cases {
        let answer = gateway.upload_plugin(name, bytes).await;
        answer.assert_error(400, Some("invalid_plugin"));
        let message = answer.json["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(expected),
            "{name}: `{expected}` in {message}"
        );
    }
    let command = gateway
        .upload_plugin(
            "command",
            std::fs::read(test_plugin("not-a-plugin.wasm")).expect("built"),
        )
        .await;
    let message = command.json["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("wasi:cli/run"),
        "names what it exports: {message}"
    );

    // Just over the 5 MiB cap: the gateway refuses once it has read 5 MiB, and the few bytes the
    // client has still to send fit in the socket buffers, so it always gets to read the answer
    // (megabytes more would break its pipe while writing, before it reads the 413).
    let oversize = gateway
        .upload_plugin("big", vec![0; (5 << 20) + (16 << 10)])
        .await;
    oversize.assert_error(413, Some("plugin_too_large"));
    let nameless = gateway
        .http
        .post(format!("{}/admin/plugins", gateway.url))
        .bearer_auth(harness::ADMIN_TOKEN)
        .body(b"\0asm".to_vec())
        .send()
        .await
        .expect("the admin API answers");
    harness::Answer::read(nameless)
        .await
        .assert_error(400, None);
    let listed = gateway.admin(Method::GET, "/plugins", None).await;
    assert_eq!(listed.json["data"], json!([]), "nothing refused was stored");
}
