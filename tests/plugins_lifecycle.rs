//! End-to-end plugin lifecycle through the admin API: upload, bind per tenant, a request routed by
//! the new plugin, rebinding under steady load without a failed request, rollback, persistence
//! across a restart, a canary on a share of the traffic that rolls itself back when it fails, and
//! the fail-open policy.

mod harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use harness::{Answer, billing, channel, chat, plugin_version, simulator, start, test_plugin};
use reqwest::Method;
use serde_json::{Value, json};

const ACME_ROUTER: &str = "/bindings?role=router&tenant=acme";

fn scripted_router() -> Vec<u8> {
    std::fs::read(test_plugin("tollgate_test_plugin_scripted_router.wasm"))
        .expect("the scripted router is built")
}

async fn two_channel_gateway() -> (tollgate_simulator::Simulator, harness::Gateway) {
    let sim = simulator().await;
    let config = format!(
        "{}{}{}",
        billing(1_000_000),
        channel("primary", &sim, 1),
        channel("secondary", &sim, 2)
    );
    let gateway = start(&config).await.expect("the gateway starts");
    (sim, gateway)
}

async fn upload(gateway: &harness::Gateway, name: &str, bytes: Vec<u8>) -> String {
    let uploaded = gateway.upload_plugin(name, bytes).await;
    assert_eq!(uploaded.status, 201, "upload: {}", uploaded.json);
    uploaded.json["sha256"].as_str().expect("a hash").to_owned()
}

async fn bind(gateway: &harness::Gateway, scope: &str, body: Value) -> Answer {
    gateway.admin(Method::PUT, scope, Some(body)).await
}

/// The only stored binding slot (the one the test changes), as `/admin/bindings` shows it.
async fn stored_slot(gateway: &harness::Gateway) -> Value {
    let bindings = gateway.admin(Method::GET, "/bindings", None).await;
    bindings.json["data"][0].clone()
}

/// Whether the slot's canary is gone; if so, it was rolled back naming the `candidate` that failed.
fn canary_rolled_back(slot: &Value, candidate: &str) -> bool {
    if !slot["canary"].is_null() {
        return false;
    }
    let reason = slot["canary_rolled_back"].as_str().unwrap_or_default();
    assert!(
        reason.contains("failed") && reason.contains(&candidate[..12]),
        "{reason}"
    );
    true
}

/// Sends one chat request; returns the answer and the channel its record names.
async fn routed(gateway: &harness::Gateway, key: &str) -> (Answer, Value) {
    let response = gateway
        .http
        .post(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(key)
        .json(&chat("hi"))
        .send()
        .await
        .expect("the gateway answers");
    let answer = Answer::read(response).await;
    let record = gateway.record_eventually(&answer.request_id()).await;
    (answer, record)
}

async fn second_tenant_key(gateway: &harness::Gateway) -> String {
    let created = gateway
        .admin(Method::POST, "/tenants", Some(json!({"name": "globex"})))
        .await;
    assert_eq!(created.status, 201, "{}", created.json);
    gateway
        .admin(
            Method::POST,
            "/tenants/globex/top-ups",
            Some(json!({"amount_micros": 1_000_000, "reason": "test"})),
        )
        .await;
    let key = gateway
        .admin(Method::POST, "/tenants/globex/keys", None)
        .await;
    key.json["secret"].as_str().expect("a secret").to_owned()
}

#[tokio::test]
async fn a_plugin_built_against_the_previous_contract_still_loads_and_routes() {
    let (_sim, gateway) = two_channel_gateway().await;
    let old = harness::built_against(&scripted_router(), b"0.1.0");
    let uploaded = gateway.upload_plugin("scripted-0.1.0", old).await;
    assert_eq!(uploaded.status, 201, "{}", uploaded.json);
    assert_eq!(uploaded.json["contract"], "0.1.0");
    let bound = bind(
        &gateway,
        ACME_ROUTER,
        json!({"plugin": "scripted-0.1.0", "config": {"prefer": "secondary"}}),
    )
    .await;
    assert_eq!(bound.status, 200, "{}", bound.json);
    let (answer, record) = routed(&gateway, &gateway.key).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!(record["channel"], "secondary", "the 0.1.0 router routed it");
}

#[tokio::test]
async fn a_translator_built_against_the_previous_contract_still_serves() {
    let (_sim, gateway) = two_channel_gateway().await;
    let shipped = std::fs::read(harness::test_plugin("tollgate_translator_openai.wasm"))
        .expect("the shipped translator is built");
    let old = harness::built_against(&shipped, b"0.1.0");
    let uploaded = gateway.upload_plugin("openai-0.1.0", old).await;
    assert_eq!(uploaded.status, 201, "{}", uploaded.json);
    assert_eq!(uploaded.json["contract"], "0.1.0");
    let bound = bind(
        &gateway,
        "/bindings?role=translator&protocol=openai&tenant=acme",
        json!({"plugin": "openai-0.1.0"}),
    )
    .await;
    assert_eq!(bound.status, 200, "{}", bound.json);
    let (answer, record) = routed(&gateway, &gateway.key).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!(
        answer.json["choices"][0]["message"]["content"], "Echo: hi",
        "{}",
        answer.json
    );
    let plugins = record["plugins"].to_string();
    assert!(plugins.contains("openai-0.1.0"), "{plugins}");
}

#[tokio::test]
async fn upload_bind_rebind_under_load_rollback_and_restart() {
    let (_sim, mut gateway) = two_channel_gateway().await;
    let globex = second_tenant_key(&gateway).await;
    let version_a = upload(&gateway, "scripted", scripted_router()).await;
    let again = gateway.upload_plugin("scripted", scripted_router()).await;
    assert_eq!(again.status, 200, "the same bytes again: {}", again.json);
    assert_eq!(again.json["role"], "router");
    assert_eq!(again.json["contract"], "0.1.2");

    // A configuration the plugin refuses is refused at bind time, with the plugin's message.
    let refused = bind(
        &gateway,
        ACME_ROUTER,
        json!({"plugin": "scripted", "config": {"prefer": 3}}),
    )
    .await;
    refused.assert_error(400, Some("plugin_config_rejected"));

    let bound = bind(
        &gateway,
        ACME_ROUTER,
        json!({"plugin": version_a, "config": {"prefer": "secondary", "log": "scripted plans"}}),
    )
    .await;
    assert_eq!(bound.status, 200, "{}", bound.json);
    let (answer, record) = routed(&gateway, &gateway.key).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!(record["channel"], "secondary", "the new plugin routed it");
    assert!(
        record["plugins"][0]
            .as_str()
            .is_some_and(|entry| entry.starts_with(&format!("scripted@{}", &version_a[..12]))),
        "the trace names the version: {}",
        record["plugins"]
    );
    // Its log line carries the tenant and the request id (the request's span) and the plugin.
    let log = gateway.log();
    let line = log
        .lines()
        .find(|line| line.contains("scripted plans") && line.contains(&answer.request_id()))
        .unwrap_or_else(|| panic!("a plugin log line with the request id in:\n{log}"));
    assert!(
        line.contains("tenant=\"acme\"") && line.contains("plugin=\"scripted@"),
        "{line}"
    );
    // Another tenant keeps the global default.
    let (_, other) = routed(&gateway, &globex).await;
    assert_eq!(other["channel"], "primary", "tenant globex is untouched");

    // Rebind to a new version again and again while requests flow: none fails.
    let version_b = upload(
        &gateway,
        "scripted",
        plugin_version(&scripted_router(), "b"),
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (http, url, key) = (
            gateway.http.clone(),
            gateway.url.clone(),
            gateway.key.clone(),
        );
        let (stop, served) = (stop.clone(), served.clone());
        load.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..2_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let response = http
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(&key)
                    .json(&chat("steady"))
                    .send()
                    .await
                    .expect("the gateway answers");
                let status = response.status().as_u16();
                if status == 200 {
                    served.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.push(format!(
                        "{status}: {}",
                        response.text().await.unwrap_or_default()
                    ));
                }
            }
            failures
        }));
    }
    for round in 0..10 {
        let (version, prefer) = if round % 2 == 0 {
            (&version_b, "primary")
        } else {
            (&version_a, "secondary")
        };
        let rebound = bind(
            &gateway,
            ACME_ROUTER,
            json!({"plugin": version, "config": {"prefer": prefer}}),
        )
        .await;
        assert_eq!(rebound.status, 200, "{}", rebound.json);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for task in load {
        failures.extend(task.await.expect("the load task ends"));
    }
    assert!(
        failures.is_empty(),
        "requests failed during rebinds: {failures:?}"
    );
    assert!(served.load(Ordering::Relaxed) >= 20, "the load ran");

    // The last bind (round 9) was version A preferring secondary; rollback goes to round 8's B.
    let rolled = gateway
        .admin(
            Method::POST,
            "/bindings/rollback?role=router&tenant=acme",
            None,
        )
        .await;
    assert_eq!(rolled.status, 200, "{}", rolled.json);
    assert_eq!(rolled.json["current"]["plugin"], version_b.as_str());
    let (_, record) = routed(&gateway, &gateway.key).await;
    assert_eq!(record["channel"], "primary");
    assert!(
        record["plugins"][0]
            .as_str()
            .is_some_and(|e| e.contains(&version_b[..12]))
    );

    // A bound plugin cannot be deleted.
    let refused = gateway
        .admin(Method::DELETE, &format!("/plugins/{version_b}"), None)
        .await;
    refused.assert_error(409, Some("binding_conflict"));

    // Everything persists across a crash.
    gateway
        .crash_and_restart()
        .await
        .expect("the gateway restarts");
    let (_, record) = routed(&gateway, &gateway.key).await;
    assert!(
        record["plugins"][0]
            .as_str()
            .is_some_and(|e| e.contains(&version_b[..12])),
        "the binding survived the restart: {}",
        record["plugins"]
    );
    let listed = gateway.admin(Method::GET, "/plugins", None).await;
    assert_eq!(listed.json["data"].as_array().map(Vec::len), Some(2));
}

/// Starts a canary beside acme's router binding.
async fn start_canary(gateway: &harness::Gateway, body: Value) -> Answer {
    gateway
        .admin(
            Method::PUT,
            "/bindings/canary?role=router&tenant=acme",
            Some(body),
        )
        .await
}

/// Uploads the scripted router and a second version of it: (stable, candidate) hashes.
async fn stable_and_candidate(gateway: &harness::Gateway) -> (String, String) {
    let stable = upload(gateway, "scripted", scripted_router()).await;
    let candidate = upload(
        gateway,
        "scripted",
        plugin_version(&scripted_router(), "candidate"),
    )
    .await;
    (stable, candidate)
}

#[tokio::test]
async fn a_canary_takes_its_share_and_a_failing_one_rolls_itself_back() {
    let (_sim, gateway) = two_channel_gateway().await;
    let (stable, candidate) = stable_and_candidate(&gateway).await;
    let bound = bind(
        &gateway,
        ACME_ROUTER,
        json!({"plugin": stable, "config": {"prefer": "secondary"}}),
    )
    .await;
    assert_eq!(bound.status, 200, "{}", bound.json);
    let canary = start_canary(
        &gateway,
        json!({"plugin": candidate, "config": {"prefer": "primary"}, "percent": 20}),
    )
    .await;
    assert_eq!(canary.status, 200, "{}", canary.json);

    let mut by_canary = 0;
    for _ in 0..100 {
        let (answer, record) = routed(&gateway, &gateway.key).await;
        assert_eq!(answer.status, 200);
        let trace = record["plugins"][0].as_str().unwrap_or_default().to_owned();
        let canary_ran = trace.ends_with("(canary)");
        assert_eq!(
            canary_ran,
            trace.contains(&candidate[..12]),
            "the trace names the version that ran: {trace}"
        );
        assert_eq!(
            record["channel"] == "primary",
            canary_ran,
            "the canary routed exactly its share"
        );
        by_canary += usize::from(canary_ran);
    }
    // Binomial(100, 0.2): mean 20, standard deviation 4; these bounds are over 3 deviations out.
    assert!(
        (7..=35).contains(&by_canary),
        "{by_canary} of 100 ran the canary"
    );

    // A canary that traps on every call is rolled back once its failure share passes 20 %.
    let failing = start_canary(
        &gateway,
        json!({
            "plugin": candidate, "config": {"misbehave": "trap"},
            "percent": 50, "min_calls": 4, "max_failure_percent": 20
        }),
    )
    .await;
    assert_eq!(failing.status, 200, "{}", failing.json);
    let mut failed = 0;
    let mut rolled_back = false;
    for _ in 0..200 {
        let (answer, _) = routed(&gateway, &gateway.key).await;
        if answer.status != 200 {
            answer.assert_error(500, Some("plugin_failed"));
            failed += 1;
        }
        let slot = stored_slot(&gateway).await;
        if canary_rolled_back(&slot, &candidate) {
            rolled_back = true;
            break;
        }
    }
    assert!(rolled_back, "the failing canary was rolled back");
    assert!(
        failed >= 1,
        "the canary's failures reached clients (fail closed)"
    );
    for _ in 0..20 {
        let (answer, record) = routed(&gateway, &gateway.key).await;
        assert_eq!(answer.status, 200, "after the rollback: {}", answer.json);
        assert_eq!(record["channel"], "secondary");
    }
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("tollgate_plugin_canary_rollbacks_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn fail_open_serves_with_the_global_default_and_the_trace_says_so() {
    let (_sim, gateway) = two_channel_gateway().await;
    let sha = upload(&gateway, "scripted", scripted_router()).await;
    let bound = bind(
        &gateway,
        ACME_ROUTER,
        json!({"plugin": sha, "config": {"misbehave": "trap"}, "failure_policy": "open"}),
    )
    .await;
    assert_eq!(bound.status, 200, "{}", bound.json);
    let (answer, record) = routed(&gateway, &gateway.key).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    let trace = record["plugins"][0].as_str().unwrap_or_default();
    assert!(
        trace.starts_with("failover@")
            && trace.contains(&format!("fail-open after scripted@{}", &sha[..12]))
            && trace.ends_with(": trap)"),
        "{trace}"
    );

    let closed = bind(
        &gateway,
        ACME_ROUTER,
        json!({"plugin": sha, "config": {"misbehave": "trap"}, "failure_policy": "closed"}),
    )
    .await;
    assert_eq!(closed.status, 200, "{}", closed.json);
    let (answer, _) = routed(&gateway, &gateway.key).await;
    answer.assert_error(500, Some("plugin_failed"));

    let bad = bind(
        &gateway,
        ACME_ROUTER,
        json!({"plugin": sha, "failure_policy": "sometimes"}),
    )
    .await;
    bad.assert_error(400, Some("invalid_binding"));
    let wrong_role = bind(
        &gateway,
        "/bindings?role=translator&protocol=openai&tenant=acme",
        json!({"plugin": sha}),
    )
    .await;
    wrong_role.assert_error(400, Some("wrong_role"));
    let unknown = bind(&gateway, ACME_ROUTER, json!({"plugin": "nothing-like-it"})).await;
    unknown.assert_error(404, Some("plugin_not_found"));
    let no_tenant = bind(
        &gateway,
        "/bindings?role=router&tenant=nobody",
        json!({"plugin": sha}),
    )
    .await;
    no_tenant.assert_error(404, Some("tenant_not_found"));

    let globex_router = "role=router&tenant=globex";
    second_tenant_key(&gateway).await;
    for (method, path) in [
        (Method::POST, format!("/bindings/rollback?{globex_router}")),
        (Method::DELETE, format!("/bindings/canary?{globex_router}")),
        (
            Method::POST,
            format!("/bindings/canary/promote?{globex_router}"),
        ),
    ] {
        let refused = gateway.admin(method, &path, None).await;
        refused.assert_error(409, Some("binding_conflict"));
    }
    let bad_percent = gateway
        .admin(
            Method::PUT,
            &format!("/bindings/canary?{globex_router}"),
            Some(json!({"plugin": sha, "percent": 100})),
        )
        .await;
    bad_percent.assert_error(400, Some("invalid_binding"));
    let unknown = gateway
        .admin(
            Method::DELETE,
            &format!("/plugins/{}", "0".repeat(64)),
            None,
        )
        .await;
    unknown.assert_error(404, Some("not_found"));
}

#[tokio::test]
async fn translators_bind_per_protocol_globally_and_per_tenant() {
    let (_sim, gateway) = two_channel_gateway().await;
    let globex = second_tenant_key(&gateway).await;
    let shipped = std::fs::read(test_plugin("tollgate_translator_openai.wasm"))
        .expect("the openai translator is built");
    let for_acme = upload(&gateway, "openai-acme", plugin_version(&shipped, "acme")).await;
    let for_all = upload(&gateway, "openai-next", plugin_version(&shipped, "next")).await;
    let scope = "/bindings?role=translator&protocol=openai";
    let bound = bind(
        &gateway,
        &format!("{scope}&tenant=acme"),
        json!({"plugin": for_acme}),
    )
    .await;
    assert_eq!(bound.status, 200, "{}", bound.json);
    let bound = bind(&gateway, scope, json!({"plugin": for_all})).await;
    assert_eq!(bound.status, 200, "{}", bound.json);

    let translator_of = |record: &Value| {
        record["plugins"]
            .as_array()
            .and_then(|plugins| plugins.get(2))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (answer, acme) = routed(&gateway, &gateway.key).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert!(
        translator_of(&acme).starts_with(&format!("openai-acme@{}", &for_acme[..12])),
        "{}",
        acme["plugins"]
    );
    let (_, other) = routed(&gateway, &globex).await;
    assert!(
        translator_of(&other).starts_with(&format!("openai-next@{}", &for_all[..12])),
        "{}",
        other["plugins"]
    );

    // Rolling the global binding back leaves the configuration file's (the shipped plugin).
    let rolled = gateway
        .admin(
            Method::POST,
            "/bindings/rollback?role=translator&protocol=openai",
            None,
        )
        .await;
    assert_eq!(rolled.status, 200, "{}", rolled.json);
    assert!(rolled.json["current"].is_null());
    let (_, other) = routed(&gateway, &globex).await;
    assert!(
        translator_of(&other).starts_with("openai@"),
        "{}",
        other["plugins"]
    );
    let (_, acme) = routed(&gateway, &gateway.key).await;
    assert!(
        translator_of(&acme).starts_with("openai-acme@"),
        "{}",
        acme["plugins"]
    );

    let no_protocol = bind(
        &gateway,
        "/bindings?role=translator",
        json!({"plugin": for_all}),
    )
    .await;
    no_protocol.assert_error(400, None);
    assert_eq!(no_protocol.json["error"]["param"], "protocol");
    let router_protocol = bind(
        &gateway,
        "/bindings?role=router&protocol=openai",
        json!({"plugin": "failover"}),
    )
    .await;
    router_protocol.assert_error(400, None);
}

#[tokio::test]
async fn a_translator_canary_that_breaks_only_answers_is_rolled_back() {
    let (_sim, gateway) = two_channel_gateway().await;
    let bytes = std::fs::read(test_plugin("tollgate_test_plugin_answer_trap.wasm"))
        .expect("the answer-trap translator is built");
    let candidate = upload(&gateway, "answer-trap", bytes).await;
    let scope = "/bindings/canary?role=translator&tenant=acme&protocol=openai";
    let canary = gateway
        .admin(
            Method::PUT,
            scope,
            Some(json!({
                "plugin": candidate, "percent": 50, "min_calls": 4, "max_failure_percent": 20
            })),
        )
        .await;
    assert_eq!(canary.status, 200, "{}", canary.json);
    // Its requests are sound; its answers, whole or streamed, trap.
    let mut failed = 0;
    let mut rolled_back = false;
    for round in 0..100 {
        let mut body = chat("hi");
        body["stream"] = json!(round % 2 == 1);
        let answer = gateway.post("/v1/chat/completions", &body, &[]).await;
        if answer.status != 200 {
            failed += 1;
        }
        let slot = stored_slot(&gateway).await;
        assert!(
            slot["scope"]
                .as_str()
                .is_some_and(|scope| scope.contains("openai")),
            "{slot}"
        );
        if canary_rolled_back(&slot, &candidate) {
            rolled_back = true;
            break;
        }
    }
    assert!(
        rolled_back,
        "the canary that broke {failed} answers was rolled back"
    );
    for _ in 0..10 {
        let answer = gateway.post("/v1/chat/completions", &chat("hi"), &[]).await;
        assert_eq!(answer.status, 200, "after the rollback: {}", answer.json);
    }
}

#[tokio::test]
async fn fail_open_covers_a_translators_whole_answers() {
    let (_sim, gateway) = two_channel_gateway().await;
    let bytes = std::fs::read(test_plugin("tollgate_test_plugin_answer_trap.wasm"))
        .expect("the answer-trap translator is built");
    let sha = upload(&gateway, "answer-trap", bytes).await;
    let bound = bind(
        &gateway,
        "/bindings?role=translator&protocol=openai&tenant=acme",
        json!({"plugin": sha, "failure_policy": "open"}),
    )
    .await;
    assert_eq!(bound.status, 200, "{}", bound.json);
    // The bound translator's request is used; its answer traps, and the global default reads it.
    let (answer, record) = routed(&gateway, &gateway.key).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    let traces: Vec<&str> = record["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        traces
            .iter()
            .any(|trace| trace.contains(&format!("fail-open after answer-trap@{}", &sha[..12]))),
        "{traces:?}"
    );
}

#[tokio::test]
async fn a_canary_without_a_configuration_keeps_the_one_it_runs_beside() {
    let (_sim, gateway) = two_channel_gateway().await;
    let (stable, candidate) = stable_and_candidate(&gateway).await;
    let config = json!({"prefer": "secondary"});
    let bound = bind(
        &gateway,
        ACME_ROUTER,
        json!({"plugin": stable, "config": config}),
    )
    .await;
    assert_eq!(bound.status, 200, "{}", bound.json);
    let canary = start_canary(&gateway, json!({"plugin": candidate, "percent": 20})).await;
    assert_eq!(canary.status, 200, "{}", canary.json);
    assert_eq!(
        canary.json["canary"]["binding"]["config"], config,
        "the answer shows the configuration used: {}",
        canary.json
    );
    // Given, it is the canary's own.
    let own = json!({"prefer": "primary"});
    let canary = start_canary(
        &gateway,
        json!({"plugin": candidate, "config": own, "percent": 20}),
    )
    .await;
    assert_eq!(canary.status, 200, "{}", canary.json);
    assert_eq!(canary.json["canary"]["binding"]["config"], own);
}
