//! End-to-end billing: holds keep concurrent requests from overdrawing a balance, the books
//! balance to the pico after concurrent mixed load, a billing plugin that fails to price still
//! leaves the usage recorded, and no billing call finds another's state in its instance.

mod harness;

use std::time::Duration;

use futures::StreamExt;
use harness::{ADMIN_TOKEN, channel, chat, simulator, start, test_plugin};
use serde_json::{Value, json};
use tollgate_simulator::Fault;

/// Input is free and output costs 1,000,000 micros per million tokens (1 micro per token), so a
/// hold is exactly `hold_output_tokens` micros.
fn output_priced_billing(hold_output_tokens: u64) -> String {
    format!(
        r#"
[bindings.billing]
plugin = "price-table"
config = {{ hold_output_tokens = {hold_output_tokens}, models = {{ "test-model" = {{ input = 0, output = 1000000 }} }} }}
"#
    )
}

fn cli_admin(gateway: &harness::Gateway, args: &[&str]) -> std::process::Output {
    std::process::Command::new(harness::binary())
        .args(args)
        .args(["--admin-url", &gateway.url])
        .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("the CLI runs")
}

fn top_up(gateway: &harness::Gateway, micros: i64) {
    let output = cli_admin(
        gateway,
        &[
            "balance",
            "top-up",
            "--tenant",
            "acme",
            "--amount-micros",
            &micros.to_string(),
            "--reason",
            "test credit",
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

async fn admin_get(gateway: &harness::Gateway, path: &str) -> Value {
    gateway
        .http
        .get(format!("{}/admin{path}", gateway.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("the admin API answers")
        .json()
        .await
        .expect("JSON")
}

fn streamed(text: &str) -> Value {
    let mut body = chat(text);
    body["stream"] = json!(true);
    body
}

#[tokio::test]
async fn holds_keep_concurrent_requests_from_overdrawing() {
    let sim = simulator().await;
    let gateway = start(&format!(
        "{}{}",
        output_priced_billing(100),
        channel("only", &sim, 1)
    ))
    .await
    .expect("the gateway starts");
    top_up(&gateway, 500); // exactly five holds of 100 micros
    // Streams stay open (held by the simulator) so their holds stay placed.
    sim.set_standing_fault(Some(Fault {
        hold_after_chunks: Some(2),
        ..Fault::default()
    }));
    // Each asks for at most 100 output tokens: its hold is 100 micros.
    let mut capped_stream = streamed("x");
    capped_stream["max_tokens"] = json!(100);
    let requests = (0..12).map(|_| {
        let capped_stream = &capped_stream;
        let http = gateway.http.clone();
        let url = format!("{}/v1/chat/completions", gateway.url);
        let key = gateway.key.clone();
        async move {
            let response = http
                .post(url)
                .bearer_auth(key)
                .json(&capped_stream)
                .send()
                .await
                .expect("answers");
            let status = response.status().as_u16();
            // Keep reading in the background until the end (accepted streams wait for release).
            tokio::spawn(async move { response.bytes().await.map(|body| body.len()) });
            status
        }
    });
    let statuses = futures::future::join_all(requests).await;
    let accepted = statuses.iter().filter(|status| **status == 200).count();
    let refused = statuses.iter().filter(|status| **status == 429).count();
    assert_eq!((accepted, refused), (5, 7), "{statuses:?}");
    let balance = admin_get(&gateway, "/tenants/acme/balance").await;
    assert_eq!(balance["available_picos"], "0", "{balance}");
    sim.set_standing_fault(None);
    sim.release();
    // Settled: each stream cost 2 output tokens, i.e. 2 micros; the holds are gone.
    for _ in 0..100 {
        let balance = admin_get(&gateway, "/tenants/acme/balance").await;
        if balance["available_picos"] == "490000000" {
            assert_eq!(balance["balance_picos"], "490000000");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "holds were not settled: {}",
        admin_get(&gateway, "/tenants/acme/balance").await
    );
}

#[tokio::test]
async fn the_books_balance_to_the_pico_after_concurrent_mixed_load() {
    const REQUESTS: usize = 1_000;
    let sim = simulator().await;
    // Every request holds a plugin instance while it streams: give the pool room for all.
    let gateway = start(&format!(
        "max_instances = 4000\n{}{}",
        harness::billing(0),
        channel("only", &sim, 1)
    ))
    .await
    .expect("the gateway starts");
    top_up(&gateway, 10_000_000);
    // Two tenants, two keys each.
    let created = gateway
        .http
        .post(format!("{}/admin/tenants", gateway.url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "beta"}))
        .send()
        .await
        .expect("answers");
    assert_eq!(created.status(), 201);
    let output = cli_admin(
        &gateway,
        &[
            "balance",
            "top-up",
            "--tenant",
            "beta",
            "--amount-micros",
            "10000000",
            "--reason",
            "test credit",
        ],
    );
    assert!(output.status.success());
    let mut keys = vec![gateway.key.clone()];
    for tenant in ["acme", "beta", "beta"] {
        let created: Value = gateway
            .http
            .post(format!("{}/admin/tenants/{tenant}/keys", gateway.url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("answers")
            .json()
            .await
            .expect("JSON");
        keys.push(created["secret"].as_str().expect("a secret").to_owned());
    }
    let mut tasks = Vec::new();
    for index in 0..REQUESTS {
        let http = gateway.http.clone();
        let url = format!("{}/v1/chat/completions", gateway.url);
        let key = keys[index % keys.len()].clone();
        let text = format!("request {index} {}", "word ".repeat(index % 7));
        tasks.push(tokio::spawn(async move {
            let body = if index % 3 == 0 {
                chat(&text)
            } else {
                streamed(&text)
            };
            let response = http
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .expect("answers");
            if response.status() != 200 {
                panic!(
                    "{}: {}",
                    response.status(),
                    response.text().await.unwrap_or_default()
                );
            }
            if index % 5 == 0 {
                // This client goes away after the first bytes.
                let mut stream = response.bytes_stream();
                let _ = stream.next().await;
                return;
            }
            response.bytes().await.expect("the whole answer");
        }));
    }
    for task in tasks {
        task.await.expect("no client panicked");
    }
    // Every request is recorded (streams after their last byte).
    let mut records = Vec::new();
    for _ in 0..200 {
        records = admin_get(&gateway, "/usage?limit=5000").await["data"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if records.len() == REQUESTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(records.len(), REQUESTS);
    for tenant in ["acme", "beta"] {
        let charged: i128 = records
            .iter()
            .filter(|record| record["tenant"] == tenant)
            .map(|record| i128::from(record["cost_picos"].as_u64().expect("priced")))
            .sum();
        assert!(charged > 0);
        let balance = admin_get(&gateway, &format!("/tenants/{tenant}/balance")).await;
        let expected = 10_000_000_i128 * 1_000_000 - charged;
        assert_eq!(balance["balance_picos"], expected.to_string(), "{tenant}");
        assert_eq!(
            balance["available_picos"],
            expected.to_string(),
            "no hold left behind for {tenant}"
        );
    }
    let output = cli_admin(&gateway, &["usage", "reconcile"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let books: Value = serde_json::from_slice(&output.stdout).expect("reconcile prints JSON");
    assert_eq!(books["balanced"], true);
    for book in books["tenants"].as_array().expect("tenants") {
        assert_eq!(book["difference_picos"], "0", "{book}");
    }
}

#[tokio::test]
async fn two_requests_sent_with_the_same_request_id_are_both_charged() {
    let sim = simulator().await;
    let gateway = start(&format!(
        "{}{}",
        output_priced_billing(0),
        channel("only", &sim, 1)
    ))
    .await
    .expect("the gateway starts");
    top_up(&gateway, 1_000);
    let mut output_tokens = 0;
    for _ in 0..2 {
        let answer = gateway
            .post(
                "/v1/chat/completions",
                &chat("same id"),
                &[("x-request-id", "client-chosen-id")],
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.json);
        assert_eq!(answer.request_id(), "client-chosen-id");
        output_tokens += answer.json["usage"]["completion_tokens"]
            .as_u64()
            .expect("usage");
        // Reconciling brings the ledger's trees up to date first, so the second request's
        // record meets the first one's there.
        let books = admin_get(&gateway, "/reconcile").await;
        assert_eq!(books["balanced"], true, "{books}");
    }
    // One micro per output token.
    let balance = admin_get(&gateway, "/tenants/acme/balance").await;
    assert_eq!(
        balance["balance_picos"],
        ((1_000 - output_tokens) * 1_000_000).to_string(),
        "{balance}"
    );
}

/// A gateway whose billing plugin is the test plugin `file`, with one channel to the simulator.
async fn billed_by(file: &str) -> (tollgate_simulator::Simulator, harness::Gateway) {
    let sim = simulator().await;
    let config = format!(
        "[bindings.billing]\nplugin = \"{}\"\n{}",
        test_plugin(file).display(),
        channel("only", &sim, 1)
    );
    let gateway = start(&config).await.expect("the gateway starts");
    (sim, gateway)
}

#[tokio::test]
async fn usage_is_recorded_unpriced_when_the_billing_plugin_traps() {
    let (_sim, gateway) = billed_by("tollgate_test_plugin_billing_trap.wasm").await;
    let answer = gateway
        .post("/v1/chat/completions", &chat("still served"), &[])
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    let record = gateway.record(&answer.request_id()).await;
    assert_eq!(record["cost_picos"], Value::Null);
    assert_eq!(record["usage"]["output_tokens"], 3);
    let books = admin_get(&gateway, "/reconcile").await;
    assert_eq!(books["balanced"], false);
    assert_eq!(books["tenants"][0]["unpriced_records"], 1);
    let output = cli_admin(&gateway, &["usage", "reconcile"]);
    assert!(
        !output.status.success(),
        "reconcile fails while a record is unpriced"
    );
}

#[tokio::test]
async fn no_billing_call_finds_another_calls_state_in_its_instance() {
    let (_sim, gateway) = billed_by("tollgate_test_plugin_billing_instance_probe.wasm").await;
    // Concurrent whole requests and streams: a call finding another request's mark in its
    // instance refuses the request (429) or leaves it unpriced.
    let bodies: Vec<Value> = (0..24)
        .map(|index| chat(&format!("whole {index}")))
        .collect();
    let wholes = bodies
        .iter()
        .map(|body| gateway.post("/v1/chat/completions", body, &[]));
    let streams =
        (0..8).map(|index| harness::stream_chat(&gateway, streamed(&format!("stream {index}"))));
    let (wholes, streams) = futures::join!(
        futures::future::join_all(wholes),
        futures::future::join_all(streams)
    );
    let mut records = Vec::new();
    for answer in &wholes {
        assert_eq!(answer.status, 200, "{}", answer.json);
        records.push(gateway.record(&answer.request_id()).await);
    }
    for (chunks, request_id) in &streams {
        assert_eq!(chunks.last(), Some(&Value::Null), "ends with [DONE]");
        records.push(gateway.record_eventually(request_id).await);
    }
    // Nor does a charge find its own request's authorize: an instance serves one call, so a
    // request waiting on its upstream holds none.
    for record in &records {
        assert_eq!(record["cost_picos"], 0, "priced: {record}");
        assert_eq!(
            record["line_items"][0]["kind"], "fresh-instance",
            "{record}"
        );
    }
}

#[tokio::test]
async fn a_crash_loses_no_record_older_than_the_durability_window() {
    let sim = simulator().await;
    let mut gateway = start(&format!(
        "{}{}",
        harness::billing(0),
        channel("only", &sim, 1)
    ))
    .await
    .expect("the gateway starts");
    top_up(&gateway, 10_000_000);
    let completed = std::sync::Arc::new(std::sync::Mutex::new(
        Vec::<(String, std::time::Instant)>::new(),
    ));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..4 {
        let (http, url, key) = (
            gateway.http.clone(),
            format!("{}/v1/chat/completions", gateway.url),
            gateway.key.clone(),
        );
        let (completed, stop) = (completed.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut index = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && index < 2_000 {
                index += 1;
                let body = if index % 2 == 0 {
                    chat("durable")
                } else {
                    streamed("durable")
                };
                let request_id = format!("crash-{worker}-{index}");
                let Ok(response) = http
                    .post(&url)
                    .bearer_auth(&key)
                    .header("x-request-id", &request_id)
                    .json(&body)
                    .send()
                    .await
                else {
                    break;
                };
                if response.status() != 200 || response.bytes().await.is_err() {
                    break;
                }
                completed
                    .lock()
                    .expect("not poisoned")
                    .push((request_id, std::time::Instant::now()));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let killed_at = std::time::Instant::now();
    gateway
        .crash_and_restart()
        .await
        .expect("the gateway restarts");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for worker in workers {
        let _ = worker.await;
    }
    let records = admin_get(&gateway, "/usage").await["data"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let recorded: std::collections::HashSet<String> = records
        .iter()
        .filter_map(|record| record["request_id"].as_str().map(str::to_owned))
        .collect();
    let window = Duration::from_secs(1);
    let must_have: Vec<String> = completed
        .lock()
        .expect("not poisoned")
        .iter()
        .filter(|(_, at)| *at + window <= killed_at)
        .map(|(id, _)| id.clone())
        .collect();
    eprintln!(
        "crash: {} requests completed, {} more than {window:?} before the kill, {} records after restart",
        completed.lock().expect("not poisoned").len(),
        must_have.len(),
        recorded.len()
    );
    assert!(
        must_have.len() > 20,
        "enough load before the crash: {}",
        must_have.len()
    );
    let lost: Vec<&String> = must_have
        .iter()
        .filter(|id| !recorded.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} records lost: {lost:?}",
        lost.len(),
        must_have.len()
    );
    let books = admin_get(&gateway, "/reconcile").await;
    assert_eq!(books["balanced"], true, "{books}");
}

#[tokio::test]
async fn pruned_usage_leaves_the_books_balanced() {
    let sim = simulator().await;
    let gateway = start(&format!(
        "{}{}",
        harness::billing(0),
        channel("only", &sim, 1)
    ))
    .await
    .expect("the gateway starts");
    top_up(&gateway, 1_000_000);
    for _ in 0..3 {
        assert_eq!(
            gateway
                .post("/v1/chat/completions", &chat("x y"), &[])
                .await
                .status,
            200
        );
    }
    let before = admin_get(&gateway, "/tenants/acme/balance").await;
    let cutoff = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
        + 1_000;
    let pruned: Value = gateway
        .http
        .post(format!("{}/admin/usage/prune", gateway.url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"before_ms": cutoff}))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("JSON");
    assert_eq!(pruned["pruned"], 3);
    assert_eq!(admin_get(&gateway, "/usage").await["data"], json!([]));
    assert_eq!(admin_get(&gateway, "/tenants/acme/balance").await, before);
    let books = admin_get(&gateway, "/reconcile").await;
    assert_eq!(books["balanced"], true, "{books}");
}
