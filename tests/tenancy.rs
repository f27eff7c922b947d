//! End-to-end tenancy: tenants and keys through the admin API, key terms (expiry, model
//! allow-list, requests and tokens per minute) and the tenant concurrency cap.

mod harness;

use std::time::Duration;

use harness::{ADMIN_TOKEN, Answer, billing, channel, chat, simulator, start, start_with_server};
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
    assert_eq!(gateway.chat_as(&first, &chat("x")).await.status, 200);
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
    gateway
        .chat_as(&first, &chat("x"))
        .await
        .assert_error(401, Some("invalid_api_key"));
    assert_eq!(gateway.chat_as(&second, &chat("x")).await.status, 200);
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
    gateway
        .chat_as(&second, &chat("x"))
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
    gateway
        .chat_as(&only_embeddings, &chat("x"))
        .await
        .assert_error(404, Some("model_not_found"));

    let expired = new_key(&gateway, "acme", json!({"expires_unix_ms": 1})).await;
    let answer = gateway.chat_as(&expired, &chat("x")).await;
    answer.assert_error(401, Some("invalid_api_key"));
    assert!(
        answer.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );

    let two_a_minute = new_key(&gateway, "acme", json!({"rpm": 2})).await;
    assert_eq!(gateway.chat_as(&two_a_minute, &chat("x")).await.status, 200);
    assert_eq!(gateway.chat_as(&two_a_minute, &chat("x")).await.status, 200);
    let limited = gateway.chat_as(&two_a_minute, &chat("x")).await;
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

    // A daily spend cap must have room for a request's hold (a bound on its prompt, here about
    // 80 tokens at 0.15 micros, and its output allowance), as a balance must: a 5-micro cap has
    // none, and the request never reaches the upstream (tests/money.rs counts a cap to the pico).
    let capped = new_key(&gateway, "acme", json!({"daily_spend_cap_micros": 5})).await;
    let calls = sim.calls();
    gateway
        .chat_as(&capped, &chat("hello there world"))
        .await
        .assert_error(429, Some("insufficient_quota"));
    assert_eq!(sim.calls(), calls, "refused before any upstream call");

    let few_tokens = new_key(&gateway, "acme", json!({"tpm": 40})).await;
    let long_prompt = chat(&"many words here ".repeat(20));
    gateway
        .chat_as(&few_tokens, &long_prompt)
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
    gateway
        .chat_as(&key, &chat("x"))
        .await
        .assert_error(429, Some("rate_limit_exceeded"));
    sim.release();
    open.bytes().await.expect("the stream ends");
    // The slot comes back when the stream's record is written.
    for _ in 0..100 {
        if gateway.chat_as(&key, &chat("x")).await.status == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the concurrency slot was not released");
}

#[tokio::test]
async fn usage_is_queried_by_filter_and_exported_as_csv() {
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
        Some(json!({"name": "other, inc"})),
        ADMIN_TOKEN,
    )
    .await;
    let other = new_key(&gateway, "other, inc", json!({})).await;
    for _ in 0..3 {
        assert_eq!(
            gateway.chat_as(&gateway.key, &chat("a b")).await.status,
            200
        );
    }
    assert_eq!(
        gateway
            .chat_as(&other, &chat("a \"quoted\" b"))
            .await
            .status,
        200
    );
    let acme = admin(
        &gateway,
        Method::GET,
        "/usage?tenant=acme",
        None,
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(acme.json["data"].as_array().map(Vec::len), Some(3));
    let limited = admin(&gateway, Method::GET, "/usage?limit=2", None, ADMIN_TOKEN).await;
    assert_eq!(limited.json["data"].as_array().map(Vec::len), Some(2));
    let future = admin(
        &gateway,
        Method::GET,
        "/usage?from_ms=99999999999999",
        None,
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(future.json["data"].as_array().map(Vec::len), Some(0));
    admin(
        &gateway,
        Method::GET,
        "/usage?from_ms=yesterday",
        None,
        ADMIN_TOKEN,
    )
    .await
    .assert_error(400, None);

    let csv = gateway
        .http
        .get(format!("{}/admin/usage.csv?model=test-model", gateway.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("the export answers");
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    let text = csv.text().await.expect("CSV text");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1 + 4, "{text}");
    assert!(lines[0].starts_with("unix_ms,request_id,tenant,"));
    assert_eq!(
        lines
            .iter()
            .filter(|line| line.contains(",\"other, inc\","))
            .count(),
        1,
        "{text}"
    );
    let columns = lines[0].split(',').count();
    let cost_column = lines[0]
        .split(',')
        .position(|name| name == "cost_picos")
        .expect("a cost column");
    let acme_row: Vec<&str> = lines[1].split(',').collect();
    assert_eq!(acme_row.len(), columns);
    // Prompt "a b" is 2 tokens, the echo "Echo: a b" 3.
    assert_eq!(
        acme_row[cost_column],
        (2 * harness::INPUT_PRICE + 3 * harness::OUTPUT_PRICE).to_string()
    );
}

#[tokio::test]
async fn the_cli_drives_the_admin_api() {
    let sim = simulator().await;
    let gateway = start(&format!(
        "{}{}",
        billing(1_000_000),
        channel("only", &sim, 1)
    ))
    .await
    .expect("starts");
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(harness::binary())
            .args(args)
            .args(["--admin-url", &gateway.url])
            .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .expect("the CLI runs");
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("UTF-8")
    };
    // The fixed verbs work through the API too, while the gateway holds the data directory.
    assert_eq!(
        cli(&["tenant", "create", "gamma"]).trim(),
        "created tenant gamma"
    );
    let created = cli(&["key", "create", "--tenant", "gamma"]);
    let secret = created.lines().last().expect("the secret is the last line");
    assert_eq!(gateway.chat_as(secret, &chat("x")).await.status, 200);
    let tenants: Value = serde_json::from_str(&cli(&["tenant", "list"])).expect("JSON");
    let file = gateway.data_dir.path().join("channel.json");
    let spec = json!({"name": "cli", "protocol": "openai", "base_url": sim.openai_base_url(), "models": {"cli-model": "sim-cli"}});
    std::fs::write(&file, spec.to_string()).expect("writable");
    cli(&["channel", "create", "--file", file.to_str().expect("UTF-8")]);
    let channels: Value = serde_json::from_str(&cli(&["channel", "list"])).expect("JSON");
    assert_eq!(channels["data"][1]["name"], "cli");
    cli(&["channel", "delete", "cli"]);
    assert_eq!(tenants["data"][0]["name"], "acme");
    assert_eq!(gateway.chat_as(&gateway.key, &chat("x")).await.status, 200);
    let export = cli(&["usage", "export", "--tenant", "acme"]);
    assert_eq!(export.lines().count(), 2, "{export}");
    let keys: Value =
        serde_json::from_str(&cli(&["key", "list", "--tenant", "acme"])).expect("JSON");
    let id = keys["data"][0]["id"].as_str().expect("a key id").to_owned();
    cli(&["key", "revoke", &id]);
    gateway
        .chat_as(&gateway.key, &chat("x"))
        .await
        .assert_error(401, Some("invalid_api_key"));
    let refused = std::process::Command::new(harness::binary())
        .args(["tenant", "list", "--admin-url", &gateway.url])
        .env("TOLLGATE_ADMIN_TOKEN", "wrong")
        .output()
        .expect("the CLI runs");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
}

/// `docs/openapi.json`, parsed.
fn openapi_document() -> Value {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json"),
    )
    .expect("docs/openapi.json exists");
    serde_json::from_str(&text).expect("the spec is JSON")
}

/// Every operation of `docs/openapi.json` exists on the server: called with the admin token it is
/// routed (no `unknown_url`, no 405), and called without it, it is refused as the spec says.
#[tokio::test]
async fn the_openapi_document_matches_the_server() {
    let sim = simulator().await;
    // Every operation is called once with a wrong token: more failures than the default throttle
    // lets through from one address.
    let gateway = start_with_server(
        "failed_auth_per_second = 1000\n",
        &format!("{}{}", billing(1_000_000), channel("only", &sim, 1)),
    )
    .await
    .expect("starts");
    let spec = openapi_document();
    let paths = spec["paths"].as_object().expect("paths");
    assert!(paths.len() >= 20, "{} paths", paths.len());
    for (path, operations) in paths {
        let mut concrete = path
            .replace("{tenant}", "acme")
            .replace("{key_id}", "key_missing")
            .replace("{request_id}", "req_missing")
            .replace("{channel}", "only")
            .replace("{sha256}", "0000");
        if path.starts_with("/admin/bindings") {
            // Binding operations name their scope in the query.
            concrete.push_str("?role=router&tenant=acme");
        }
        for (method, operation) in operations.as_object().expect("operations") {
            let method: reqwest::Method = method.to_uppercase().parse().expect("an HTTP method");
            let body = operation.get("requestBody").map(|_| json!({}));
            let unauthorized = admin(
                &gateway,
                method.clone(),
                concrete.trim_start_matches("/admin"),
                body.clone(),
                "wrong",
            )
            .await;
            unauthorized.assert_error(401, Some("invalid_admin_token"));
            let schema = &operation["responses"]["401"]["content"]["application/json"]["schema"];
            assert!(schema.is_object(), "{method} {path} documents its 401");
            if let Some(found) = departure(&spec, schema, &unauthorized.json, "answer") {
                panic!("{method} {path} 401: {found}");
            }
            let answer = admin(
                &gateway,
                method.clone(),
                concrete.trim_start_matches("/admin"),
                body,
                ADMIN_TOKEN,
            )
            .await;
            assert_ne!(answer.status, 405, "{method} {path}");
            assert_ne!(
                answer.json["error"]["code"], "unknown_url",
                "{method} {path} is routed"
            );
        }
    }
}

#[tokio::test]
async fn channels_are_created_through_the_api_with_sealed_secrets() {
    use reqwest::Method;
    const SECRET: &str = "sk-api-channel-secret-7f1e";
    let config_sim = simulator().await;
    let api_sim =
        tollgate_simulator::Simulator::start(([127, 0, 0, 1], 0).into(), vec![SECRET.to_owned()])
            .await
            .expect("a simulator");
    let billing = billing(1_000_000).replace("\"test-embedding\"", "\"api-model\"");
    let mut gateway = start(&format!("{billing}{}", channel("only", &config_sim, 1)))
        .await
        .expect("starts");
    let body = json!({
        "name": "api",
        "protocol": "openai",
        "base_url": api_sim.openai_base_url(),
        "models": {"api-model": "sim-api"},
        "api_keys": [SECRET],
    });
    let created = admin(
        &gateway,
        Method::POST,
        "/channels",
        Some(body.clone()),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.json);
    assert!(!created.json.to_string().contains(SECRET));
    admin(
        &gateway,
        Method::POST,
        "/channels",
        Some(body.clone()),
        ADMIN_TOKEN,
    )
    .await
    .assert_error(409, Some("already_exists"));
    // Each refused with 400: secrets from the environment, a protocol nobody speaks, a base URL
    // that does not parse, a CA file the gateway cannot read.
    for (name, field, value) in [
        ("env", "api_key_env", json!(["X"])),
        ("other", "protocol", json!("carrier-pigeon")),
        ("broken", "base_url", json!("http://[::1/v1")),
        ("untrusted", "ca_file", json!("/no/such/ca.pem")),
    ] {
        let mut refused = body.clone();
        refused["name"] = json!(name);
        refused[field] = value;
        admin(
            &gateway,
            Method::POST,
            "/channels",
            Some(refused),
            ADMIN_TOKEN,
        )
        .await
        .assert_error(400, None);
    }

    let api_model =
        json!({"model": "api-model", "messages": [{"role": "user", "content": "via api"}]});
    let answer = gateway.post("/v1/chat/completions", &api_model, &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!(answer.headers["x-tollgate-channel"], "api");
    assert_eq!(
        api_sim.seen()[0].authorization.as_deref(),
        Some(format!("Bearer {SECRET}").as_str())
    );

    // The secret is nowhere: not in admin answers, not in the log, not in the raw store files.
    let channels = admin(&gateway, Method::GET, "/channels", None, ADMIN_TOKEN).await;
    assert!(
        channels.json.to_string().contains("\"source\":\"api\""),
        "{}",
        channels.json
    );
    assert!(!channels.json.to_string().contains(SECRET));
    assert!(!gateway.log().contains(SECRET));
    let mut files = vec![gateway.data_dir.path().to_path_buf()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(
                std::fs::read_dir(&path)
                    .expect("readable")
                    .map(|entry| entry.expect("an entry").path()),
            );
        } else {
            let bytes = std::fs::read(&path).expect("readable");
            assert!(
                !bytes
                    .windows(SECRET.len())
                    .any(|window| window == SECRET.as_bytes()),
                "{} holds the secret",
                path.display()
            );
        }
    }

    // Config-file channels are the file's; API channels change and go.
    admin(
        &gateway,
        Method::DELETE,
        "/channels/only",
        None,
        ADMIN_TOKEN,
    )
    .await
    .assert_error(409, Some("channel_in_config"));
    let mut moved = body.clone();
    moved.as_object_mut().expect("an object").remove("api_keys");
    moved["models"] = json!({"api-model": "sim-api-v2"});
    assert_eq!(
        admin(
            &gateway,
            Method::PUT,
            "/channels/api",
            Some(moved),
            ADMIN_TOKEN
        )
        .await
        .status,
        200
    );
    assert_eq!(
        gateway
            .post("/v1/chat/completions", &api_model, &[])
            .await
            .headers["x-tollgate-model"],
        "sim-api-v2"
    );

    // Sealed keys survive a restart.
    gateway.crash_and_restart().await.expect("restarts");
    assert_eq!(
        gateway
            .post("/v1/chat/completions", &api_model, &[])
            .await
            .status,
        200
    );
    assert_eq!(
        admin(&gateway, Method::DELETE, "/channels/api", None, ADMIN_TOKEN)
            .await
            .status,
        200
    );
    gateway
        .post("/v1/chat/completions", &api_model, &[])
        .await
        .assert_error(404, Some("model_not_found"));
    admin(&gateway, Method::DELETE, "/channels/api", None, ADMIN_TOKEN)
        .await
        .assert_error(404, Some("channel_not_found"));
}

/// Where `value` departs from `schema` (OpenAPI 3.1's JSON Schema, the parts the document uses:
/// `$ref`, `anyOf`, `type`, `properties`, `required`, `items`, `additionalProperties`, `enum`), or
/// `None`.
/// An object schema with `properties` is closed: an answer's field the document does not name is a
/// departure too.
fn departure(spec: &Value, schema: &Value, value: &Value, at: &str) -> Option<String> {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.trim_start_matches("#/components/schemas/");
        return departure(spec, &spec["components"]["schemas"][name], value, at);
    }
    if let Some(branches) = schema["anyOf"].as_array() {
        let departures: Vec<String> = branches
            .iter()
            .filter_map(|branch| departure(spec, branch, value, at))
            .collect();
        return (departures.len() == branches.len()).then(|| departures.join("; "));
    }
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(one) => vec![one.as_str()],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let is = |name: &str| match name {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            _ => false,
        };
        if !types.iter().any(|name| is(name)) {
            return Some(format!("{at}: {value} is not {types:?}"));
        }
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        return Some(format!("{at}: {value} is not one of {allowed:?}"));
    }
    if let (Some(object), Some(properties)) = (value.as_object(), schema["properties"].as_object())
    {
        for required in schema["required"].as_array().into_iter().flatten() {
            let name = required.as_str().unwrap_or_default();
            if !object.contains_key(name) {
                return Some(format!("{at}: `{name}` is missing"));
            }
        }
        for (name, field) in object {
            let Some(documented) = properties.get(name) else {
                return Some(format!("{at}: `{name}` is not documented"));
            };
            if let Some(found) = departure(spec, documented, field, &format!("{at}.{name}")) {
                return Some(found);
            }
        }
    } else if let (Some(object), Some(values)) =
        (value.as_object(), schema.get("additionalProperties"))
        && values.is_object()
    {
        for (name, field) in object {
            if let Some(found) = departure(spec, values, field, &format!("{at}.{name}")) {
                return Some(found);
            }
        }
    }
    if let (Some(items), Some(schema)) = (value.as_array(), schema.get("items")) {
        for (index, item) in items.iter().enumerate() {
            if let Some(found) = departure(spec, schema, item, &format!("{at}[{index}]")) {
                return Some(found);
            }
        }
    }
    None
}

/// Calls documented operations and checks each answer against the document.
struct Operator<'a> {
    gateway: &'a harness::Gateway,
    spec: &'a Value,
    /// `METHOD /path` of every operation checked so far.
    checked: std::collections::BTreeSet<String>,
}

impl Operator<'_> {
    /// Checks `answer` of `method path` against the schema documented for its status.
    fn check(&mut self, method: reqwest::Method, path: &str, answer: &Answer) {
        let operation = &self.spec["paths"][path][method.as_str().to_lowercase()];
        assert!(operation.is_object(), "{method} {path} is documented");
        let status = answer.status.to_string();
        let schema = &operation["responses"][&status]["content"]["application/json"]["schema"];
        assert!(
            schema.is_object(),
            "{method} {path} documents the fields of its {status}: {}",
            answer.json
        );
        if let Some(found) = departure(self.spec, schema, &answer.json, "answer") {
            panic!("{method} {path} {status}: {found}\n{}", answer.json);
        }
        self.checked.insert(format!("{method} {path}"));
    }

    /// Makes each call (method, documented path, concrete path, body), expecting a 2xx, and
    /// checks its answer.
    async fn call(&mut self, calls: Vec<(reqwest::Method, &str, String, Option<Value>)>) {
        for (method, documented, path, body) in calls {
            let answer = self.gateway.admin(method.clone(), &path, body).await;
            assert!(
                (200..300).contains(&answer.status),
                "{method} {path}: {}",
                answer.json
            );
            self.check(method, documented, &answer);
        }
    }
}

/// Every operation of `docs/openapi.json` called as an operator would, each answer checked
/// against the fields the document describes for its status.
#[tokio::test]
async fn every_answer_has_the_fields_the_openapi_document_describes() {
    use reqwest::Method;
    let sim = simulator().await;
    let gateway = start(&format!(
        "{}{}",
        billing(1_000_000),
        channel("only", &sim, 1)
    ))
    .await
    .expect("starts");
    let spec = openapi_document();
    let answered = gateway.post("/v1/chat/completions", &chat("hi"), &[]).await;
    assert_eq!(answered.status, 200);
    let request_id = answered.request_id();
    let router = harness::test_plugin("tollgate_test_plugin_scripted_router.wasm");
    let router = std::fs::read(router).expect("built");
    let mut operator = Operator {
        gateway: &gateway,
        spec: &spec,
        checked: std::collections::BTreeSet::new(),
    };
    let calls: Vec<(Method, &str, String, Option<Value>)> = vec![
        (Method::GET, "/admin/tenants", "/tenants".into(), None),
        (
            Method::POST,
            "/admin/tenants",
            "/tenants".into(),
            Some(json!({"name": "docs"})),
        ),
        (
            Method::GET,
            "/admin/tenants/{tenant}",
            "/tenants/docs".into(),
            None,
        ),
        (
            Method::POST,
            "/admin/tenants/{tenant}/disable",
            "/tenants/docs/disable".into(),
            None,
        ),
        (
            Method::POST,
            "/admin/tenants/{tenant}/enable",
            "/tenants/docs/enable".into(),
            None,
        ),
        (
            Method::POST,
            "/admin/tenants/{tenant}/keys",
            "/tenants/docs/keys".into(),
            Some(json!({"rpm": 60})),
        ),
        (
            Method::GET,
            "/admin/tenants/{tenant}/keys",
            "/tenants/docs/keys".into(),
            None,
        ),
        (
            Method::GET,
            "/admin/tenants/{tenant}/balance",
            "/tenants/acme/balance".into(),
            None,
        ),
        (
            Method::POST,
            "/admin/tenants/{tenant}/top-ups",
            "/tenants/acme/top-ups".into(),
            Some(json!({"amount_micros": 1000, "reason": "the document's test"})),
        ),
        (Method::GET, "/admin/usage", "/usage".into(), None),
        (
            Method::GET,
            "/admin/requests/{request_id}",
            format!("/requests/{request_id}"),
            None,
        ),
        (Method::GET, "/admin/reconcile", "/reconcile".into(), None),
        (Method::GET, "/admin/channels", "/channels".into(), None),
        (
            Method::POST,
            "/admin/channels",
            "/channels".into(),
            Some(
                json!({"name": "api", "protocol": "openai", "base_url": sim.openai_base_url(),
                        "models": {"api-model": "sim-api"}}),
            ),
        ),
        (
            Method::PUT,
            "/admin/channels/{channel}",
            "/channels/api".into(),
            Some(
                json!({"name": "api", "protocol": "openai", "base_url": sim.openai_base_url(),
                        "priority": 3, "models": {"api-model": "sim-api"}}),
            ),
        ),
        (
            Method::DELETE,
            "/admin/channels/{channel}",
            "/channels/api".into(),
            None,
        ),
        (
            Method::POST,
            "/admin/usage/prune",
            "/usage/prune".into(),
            Some(json!({"before_ms": 0})),
        ),
    ];
    operator.call(calls).await;
    let key = gateway
        .admin(Method::GET, "/tenants/docs/keys", None)
        .await
        .json["data"][0]["id"]
        .as_str()
        .expect("a key id")
        .to_owned();
    operator
        .call(vec![
            (
                Method::PATCH,
                "/admin/keys/{key_id}",
                format!("/keys/{key}"),
                Some(json!({"rpm": null})),
            ),
            (
                Method::POST,
                "/admin/keys/{key_id}/revoke",
                format!("/keys/{key}/revoke"),
                None,
            ),
        ])
        .await;

    // Plugins and bindings.
    let uploaded = gateway.upload_plugin("scripted", router.clone()).await;
    operator.check(Method::POST, "/admin/plugins", &uploaded);
    let again = gateway.upload_plugin("scripted", router.clone()).await;
    operator.check(Method::POST, "/admin/plugins", &again);
    let sha = uploaded.json["sha256"].as_str().expect("a hash").to_owned();
    let other = gateway
        .upload_plugin("spare", harness::plugin_version(&router, "spare"))
        .await;
    let spare = other.json["sha256"].as_str().expect("a hash").to_owned();
    let scope = "?role=router&tenant=acme";
    let calls: Vec<(Method, &str, String, Option<Value>)> = vec![
        (Method::GET, "/admin/plugins", "/plugins".into(), None),
        (
            Method::GET,
            "/admin/plugins/{sha256}",
            format!("/plugins/{sha}"),
            None,
        ),
        (Method::GET, "/admin/bindings", "/bindings".into(), None),
        (
            Method::PUT,
            "/admin/bindings",
            format!("/bindings{scope}"),
            Some(json!({"plugin": "failover"})),
        ),
        (
            Method::PUT,
            "/admin/bindings",
            format!("/bindings{scope}"),
            Some(json!({"plugin": sha})),
        ),
        (
            Method::PUT,
            "/admin/bindings/canary",
            format!("/bindings/canary{scope}"),
            Some(json!({"plugin": spare, "percent": 10})),
        ),
        (
            Method::DELETE,
            "/admin/bindings/canary",
            format!("/bindings/canary{scope}"),
            None,
        ),
        (
            Method::PUT,
            "/admin/bindings/canary",
            format!("/bindings/canary{scope}"),
            Some(json!({"plugin": spare, "percent": 10})),
        ),
        (
            Method::POST,
            "/admin/bindings/canary/promote",
            format!("/bindings/canary/promote{scope}"),
            None,
        ),
        (
            Method::POST,
            "/admin/bindings/rollback",
            format!("/bindings/rollback{scope}"),
            None,
        ),
        (
            Method::PUT,
            "/admin/bindings",
            format!("/bindings{scope}"),
            Some(json!({"plugin": "failover"})),
        ),
        (
            Method::DELETE,
            "/admin/plugins/{sha256}",
            format!("/plugins/{spare}"),
            None,
        ),
    ];
    operator.call(calls).await;
    // The CSV export is text: its columns are its first line.
    let csv = gateway
        .http
        .get(format!("{}/admin/usage.csv", gateway.admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("answers");
    assert_eq!(csv.status(), 200);
    assert!(
        spec["paths"]["/admin/usage.csv"]["get"]["responses"]["200"]["content"]["text/csv"]
            .is_object(),
        "the export documents its text/csv answer"
    );
    operator.checked.insert("GET /admin/usage.csv".to_owned());

    let documented: std::collections::BTreeSet<String> = spec["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, operations)| {
            operations
                .as_object()
                .expect("operations")
                .keys()
                .map(move |method| format!("{} {path}", method.to_uppercase()))
        })
        .collect();
    assert_eq!(
        operator.checked, documented,
        "every documented operation is checked"
    );
}
