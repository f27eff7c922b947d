//! End-to-end tenancy: tenants and keys through the admin API, key terms (expiry, model
//! allow-list, requests and tokens per minute) and the tenant concurrency cap.

mod harness;

use std::time::Duration;

use harness::{ADMIN_TOKEN, Answer, billing, channel, chat, simulator, start};
use serde_json::{Value, json};
use tollgate_simulator::Fault;

async fn admin(
    gateway: &harness::Gateway,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
    token: &str,
) -> Answer {
    let mut request = gateway
        .http
        .request(method, format!("{}/admin{path}", gateway.url))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    Answer::read(request.send().await.expect("the admin API answers")).await
}

async fn call_with(gateway: &harness::Gateway, key: &str, body: &Value) -> Answer {
    let response = gateway
        .http
        .post(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("the gateway answers");
    Answer::read(response).await
}

async fn new_key(gateway: &harness::Gateway, tenant: &str, terms: Value) -> String {
    let created = admin(
        gateway,
        reqwest::Method::POST,
        &format!("/tenants/{tenant}/keys"),
        Some(terms),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.json);
    created.json["secret"]
        .as_str()
        .expect("the secret, once")
        .to_owned()
}

#[tokio::test]
async fn tenants_and_keys_are_managed_through_the_admin_api() {
    use reqwest::Method;
    let sim = simulator().await;
    let gateway = start(&format!(
        "{}{}",
        billing(1_000_000),
        channel("only", &sim, 1)
    ))
    .await
    .expect("starts");

    admin(&gateway, Method::GET, "/tenants", None, "wrong-token")
        .await
        .assert_error(401, Some("invalid_admin_token"));
    let created = admin(
        &gateway,
        Method::POST,
        "/tenants",
        Some(json!({"name": "beta"})),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.json);
    admin(
        &gateway,
        Method::POST,
        "/tenants",
        Some(json!({"name": "beta"})),
        ADMIN_TOKEN,
    )
    .await
    .assert_error(409, Some("already_exists"));
    let malformed = gateway
        .http
        .post(format!("{}/admin/tenants", gateway.url))
        .bearer_auth(ADMIN_TOKEN)
        .body("{\"name\": ")
        .send()
        .await
        .expect("answers");
    Answer::read(malformed).await.assert_error(400, None);
    let listed = admin(&gateway, Method::GET, "/tenants", None, ADMIN_TOKEN).await;
    let names: Vec<&str> = listed.json["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["acme", "beta"]);
    admin(&gateway, Method::GET, "/tenants/nobody", None, ADMIN_TOKEN)
        .await
        .assert_error(404, Some("tenant_not_found"));

    let first = new_key(&gateway, "beta", json!({})).await;
    let second = new_key(&gateway, "beta", json!({})).await;
    assert_eq!(call_with(&gateway, &first, &chat("x")).await.status, 200);
    let keys = admin(
        &gateway,
        Method::GET,
        "/tenants/beta/keys",
        None,
        ADMIN_TOKEN,
    )
    .await;
    let listed_keys = keys.json["data"].as_array().expect("a list");
    assert_eq!(listed_keys.len(), 2);
    assert!(
        !keys.json.to_string().contains(&first),
        "key listings never show a secret"
    );
    let first_id = listed_keys
        .iter()
        .find(|key| first.starts_with(key["prefix"].as_str().unwrap()))
        .map(|key| key["id"].as_str().unwrap().to_owned())
        .expect("the first key is listed by its prefix");

    assert_eq!(
        admin(
            &gateway,
            Method::POST,
            &format!("/keys/{first_id}/revoke"),
            None,
            ADMIN_TOKEN
        )
        .await
        .status,
        200
    );
    call_with(&gateway, &first, &chat("x"))
        .await
        .assert_error(401, Some("invalid_api_key"));
    assert_eq!(call_with(&gateway, &second, &chat("x")).await.status, 200);
    assert_eq!(
        admin(
            &gateway,
            Method::POST,
            "/tenants/beta/disable",
            None,
            ADMIN_TOKEN
        )
        .await
        .status,
        200
    );
    call_with(&gateway, &second, &chat("x"))
        .await
        .assert_error(401, Some("invalid_api_key"));
}

#[tokio::test]
async fn key_terms_are_enforced_before_any_upstream_call() {
    let sim = simulator().await;
    let gateway = start(&format!(
        "{}{}",
        billing(1_000_000),
        channel("only", &sim, 1)
    ))
    .await
    .expect("starts");

    let only_embeddings = new_key(
        &gateway,
        "acme",
        json!({"allowed_models": ["test-embedding"]}),
    )
    .await;
    call_with(&gateway, &only_embeddings, &chat("x"))
        .await
        .assert_error(404, Some("model_not_found"));

    let expired = new_key(&gateway, "acme", json!({"expires_unix_ms": 1})).await;
    let answer = call_with(&gateway, &expired, &chat("x")).await;
    answer.assert_error(401, Some("invalid_api_key"));
    assert!(
        answer.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );

    let two_a_minute = new_key(&gateway, "acme", json!({"rpm": 2})).await;
    assert_eq!(
        call_with(&gateway, &two_a_minute, &chat("x")).await.status,
        200
    );
    assert_eq!(
        call_with(&gateway, &two_a_minute, &chat("x")).await.status,
        200
    );
    let limited = call_with(&gateway, &two_a_minute, &chat("x")).await;
    limited.assert_error(429, Some("rate_limit_exceeded"));
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (20..=30).contains(&retry_after),
        "one request comes back every 30 s: {retry_after}"
    );

    let few_tokens = new_key(&gateway, "acme", json!({"tpm": 40})).await;
    let long_prompt = chat(&"many words here ".repeat(20));
    call_with(&gateway, &few_tokens, &long_prompt)
        .await
        .assert_error(429, Some("rate_limit_exceeded"));
    assert_eq!(
        sim.calls(),
        2,
        "only the two allowed requests reached the upstream"
    );
}

#[tokio::test]
async fn the_tenant_concurrency_cap_holds() {
    use reqwest::Method;
    let sim = simulator().await;
    let gateway = start(&format!(
        "{}{}",
        billing(1_000_000),
        channel("only", &sim, 1)
    ))
    .await
    .expect("starts");
    admin(
        &gateway,
        Method::POST,
        "/tenants",
        Some(json!({"name": "solo", "max_concurrency": 1})),
        ADMIN_TOKEN,
    )
    .await;
    let key = new_key(&gateway, "solo", json!({})).await;
    sim.push_fault(Fault {
        hold_after_chunks: Some(2),
        ..Fault::default()
    });
    let mut streamed = chat("x");
    streamed["stream"] = json!(true);
    let open = gateway
        .http
        .post(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(&key)
        .json(&streamed)
        .send()
        .await
        .expect("the first stream opens");
    assert_eq!(open.status(), 200);
    call_with(&gateway, &key, &chat("x"))
        .await
        .assert_error(429, Some("rate_limit_exceeded"));
    sim.release();
    open.bytes().await.expect("the stream ends");
    // The slot comes back when the stream's record is written.
    for _ in 0..100 {
        if call_with(&gateway, &key, &chat("x")).await.status == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the concurrency slot was not released");
}
