//! End-to-end: hostile router plugins (a trap, an endless loop) get a clear 500 naming plugin and
//! role within the deadline, and the gateway serves the next request.

mod harness;

use std::time::{Duration, Instant};

use harness::{billing, channel, chat, simulator, start, test_plugin};

async fn hostile_router_is_contained(file: &str, deadline_ms: u64, expected_words: &[&str]) {
    let sim = simulator().await;
    let config = format!(
        "[bindings.router]\nplugin = \"{}\"\ndeadline_ms = {deadline_ms}\n{}{}",
        test_plugin(file).display(),
        billing(1_000_000),
        channel("primary", &sim, 1)
    );
    let gateway = start(&config).await.expect("the gateway starts");
    let started = Instant::now();
    let hostile = tokio::time::timeout(
        Duration::from_secs(30),
        gateway.post(
            "/v1/chat/completions",
            &chat("x"),
            &[("x-tollgate-hostile", "1")],
        ),
    )
    .await
    .expect("a hostile plugin never hangs the request");
    hostile.assert_error(500, Some("plugin_failed"));
    let message = hostile.json["error"]["message"]
        .as_str()
        .expect("a message");
    for word in expected_words {
        assert!(message.contains(word), "`{word}` in {message}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered in {:?}",
        started.elapsed()
    );
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
}

#[tokio::test]
async fn a_trapping_router_gets_a_500_naming_it() {
    hostile_router_is_contained(
        "tollgate_test_plugin_trap.wasm",
        1000,
        &["router", "tollgate_test_plugin_trap@"],
    )
    .await;
}

#[tokio::test]
async fn an_endless_router_is_cut_at_its_deadline() {
    hostile_router_is_contained(
        "tollgate_test_plugin_endless_loop.wasm",
        200,
        &["router", "tollgate_test_plugin_endless_loop@", "200 ms"],
    )
    .await;
}
