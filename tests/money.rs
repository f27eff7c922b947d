//! Money stays exact under faults: no balance below its floor whatever an upstream answers, a
//! request its client abandons is settled (hold released, one record, upstream call cancelled),
//! and a daily spend cap counts the requests in flight.

mod harness;

use std::time::Duration;

use futures::future::join_all;
use harness::{Gateway, SseReader, channel, chat, simulator, start};
use serde_json::{Value, json};
use tollgate_simulator::Fault;

/// Picos per micro-unit.
const PICOS: i128 = 1_000_000;

async fn top_up(gateway: &Gateway, micros: u64) {
    let answer = gateway
        .admin(
            reqwest::Method::POST,
            "/tenants/acme/top-ups",
            Some(json!({"amount_micros": micros, "reason": "test"})),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
}

/// The tenant's balance and available amount, in picos.
async fn balance(gateway: &Gateway) -> (i128, i128) {
    let answer = gateway
        .admin(reqwest::Method::GET, "/tenants/acme/balance", None)
        .await;
    let picos = |field: &str| {
        answer.json[field]
            .as_str()
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("{field} in {}", answer.json))
    };
    (picos("balance_picos"), picos("available_picos"))
}

/// Waits (bounded) until no hold is left, and returns the balance.
async fn settled_balance(gateway: &Gateway) -> i128 {
    for _ in 0..200 {
        let (balance, available) = balance(gateway).await;
        if balance == available {
            return balance;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "holds are still placed after 10 s: {:?}",
        balance(gateway).await
    );
}

async fn reconcile(gateway: &Gateway) -> Value {
    let answer = gateway
        .admin(reqwest::Method::GET, "/reconcile", None)
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    answer.json
}

/// Every usage record of tenant `acme`.
async fn records(gateway: &Gateway) -> Vec<Value> {
    let answer = gateway
        .admin(reqwest::Method::GET, "/usage?tenant=acme&limit=5000", None)
        .await;
    answer.json["data"]
        .as_array()
        .unwrap_or_else(|| panic!("a list of records: {}", answer.json))
        .clone()
}

/// A gateway on `sim`'s channel, `test-model` at 0.15 micros a prompt token and 0.6 an output
/// token, prepaid (floor 0).
async fn priced_gateway(sim: &tollgate_simulator::Simulator) -> Gateway {
    start(&format!(
        "{}{}",
        harness::billing(0),
        channel("only", sim, 1)
    ))
    .await
    .expect("the gateway starts")
}

/// A prompt of `words` words, one o200k token and five bytes each.
fn long_prompt(words: usize) -> Value {
    chat(&"word ".repeat(words))
}

/// The upstream model's output cap the simulator saw in each request, in order.
fn caps_seen(sim: &tollgate_simulator::Simulator) -> Vec<Option<u64>> {
    sim.seen()
        .iter()
        .map(|seen| seen.body["max_completion_tokens"].as_u64())
        .collect()
}

#[tokio::test]
async fn a_long_prompt_without_a_cap_never_takes_a_balance_below_its_floor() {
    let sim = simulator().await;
    // Prompt 0.15 and output 0.6 micros a token; prepaid (floor 0).
    let gateway = priced_gateway(&sim).await;
    let prompt = long_prompt(8_000);

    // An upstream that answers past any cap: 8,000 prompt tokens and 8,001 of output would cost
    // 6,000.6 micros; the tenant has 5,000.
    sim.set_standing_fault(Some(Fault {
        ignore_output_cap: true,
        ..Fault::default()
    }));
    top_up(&gateway, 5_000).await;
    let whole = gateway.post("/v1/chat/completions", &prompt, &[]).await;
    assert_eq!(whole.status, 200, "{}", whole.json);
    assert!(
        settled_balance(&gateway).await >= 0,
        "{:?}",
        balance(&gateway).await
    );
    let allowance = caps_seen(&sim)[0].expect("the upstream request carries the allowance");
    assert!(
        (1_000..8_000).contains(&allowance),
        "the largest output 5,000 micros cover after the prompt: {allowance}"
    );

    top_up(&gateway, 5_000).await;
    let mut streamed = prompt.clone();
    streamed["stream"] = json!(true);
    let response = gateway.post_stream(&streamed).await;
    assert_eq!(response.status(), 200);
    let payloads = SseReader::new(response).rest().await;
    let last: Value = serde_json::from_str(payloads.last().expect("some events")).expect("JSON");
    assert_eq!(
        last["error"]["code"], "insufficient_quota",
        "a stream past its allowance is cut with an error event"
    );
    assert!(
        settled_balance(&gateway).await >= 0,
        "{:?}",
        balance(&gateway).await
    );

    // Several at once, whole and streamed.
    top_up(&gateway, 5_000).await;
    let requests = (0..6).map(|index| {
        let body = if index % 2 == 0 { &prompt } else { &streamed };
        let gateway = &gateway;
        async move {
            let response = gateway
                .http
                .post(format!("{}/v1/chat/completions", gateway.url))
                .bearer_auth(&gateway.key)
                .json(body)
                .send()
                .await
                .expect("the gateway answers");
            let status = response.status().as_u16();
            let _ = response.bytes().await;
            status
        }
    });
    let statuses = join_all(requests).await;
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(
        statuses.iter().all(|status| [200, 429].contains(status)),
        "{statuses:?}"
    );
    assert!(
        settled_balance(&gateway).await >= 0,
        "{:?}",
        balance(&gateway).await
    );

    // An upstream that honours the cap stops there; the answer says so.
    sim.set_standing_fault(None);
    top_up(&gateway, 5_000).await;
    let capped = gateway.post("/v1/chat/completions", &prompt, &[]).await;
    assert_eq!(capped.status, 200, "{}", capped.json);
    assert_eq!(capped.json["choices"][0]["finish_reason"], "length");
    assert!(
        settled_balance(&gateway).await >= 0,
        "{:?}",
        balance(&gateway).await
    );

    let books = reconcile(&gateway).await;
    assert_eq!(books["balanced"], true, "{books}");
    let written_off: i128 = books["tenants"][0]["written_off_picos"]
        .as_str()
        .and_then(|picos| picos.parse().ok())
        .expect("written_off_picos");
    assert!(
        written_off > 0,
        "what the upstream wrote past the holds is written off: {books}"
    );
}

#[tokio::test]
async fn a_request_whose_own_cap_the_balance_cannot_cover_is_refused_up_front() {
    let sim = simulator().await;
    let gateway = priced_gateway(&sim).await;
    top_up(&gateway, 100).await;
    let mut body = chat("hello");
    body["max_tokens"] = json!(1_000);
    gateway
        .post("/v1/chat/completions", &body, &[])
        .await
        .assert_error(429, Some("insufficient_quota"));
    body["max_tokens"] = json!(0);
    let refused = gateway.post("/v1/chat/completions", &body, &[]).await;
    refused.assert_error(400, None);
    assert_eq!(refused.json["error"]["param"], "max_tokens");
    assert_eq!(sim.calls(), 0, "no upstream call");
}

#[tokio::test]
async fn clients_that_leave_during_the_upstream_wait_leave_no_hold_and_one_record_each() {
    const CLIENTS: usize = 20;
    let sim = simulator().await;
    let gateway = priced_gateway(&sim).await;
    top_up(&gateway, 1_000_000).await;
    sim.set_standing_fault(Some(Fault {
        delay_ms: Some(3_000),
        ..Fault::default()
    }));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .expect("a client");
    let requests = (0..CLIENTS).map(|index| {
        let mut body = chat("four words of prompt");
        body["stream"] = json!(index % 2 == 1);
        client
            .post(format!("{}/v1/chat/completions", gateway.url))
            .bearer_auth(&gateway.key)
            .json(&body)
            .send()
    });
    for result in join_all(requests).await {
        assert!(
            result.as_ref().is_err_and(reqwest::Error::is_timeout),
            "the client gives up first: {result:?}"
        );
    }
    let balance_now = settled_balance(&gateway).await;
    let mut settled = Vec::new();
    for _ in 0..100 {
        settled = records(&gateway).await;
        if settled.len() >= CLIENTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(settled.len(), CLIENTS, "one record each: {settled:?}");
    let mut charged: i128 = 0;
    for record in &settled {
        assert_eq!(record["status"], 499, "{record}");
        assert_eq!(record["error_class"], "client_closed", "{record}");
        let cost = record["cost_picos"].as_u64().expect("priced") as i128;
        assert!(
            cost > 0,
            "the prompt that reached the upstream is charged: {record}"
        );
        charged += cost;
    }
    assert_eq!(balance_now, 1_000_000 * PICOS - charged);
    assert_eq!(
        sim.abandoned(),
        CLIENTS,
        "every upstream call was cancelled, none waited out"
    );
    assert_eq!(reconcile(&gateway).await["balanced"], true);
}

#[tokio::test]
async fn a_daily_spend_cap_counts_the_requests_in_flight() {
    const REQUESTS: usize = 200;
    let sim = simulator().await;
    // Output 1 micro a token, input free: a request capped at 5 tokens holds exactly 5 micros,
    // and costs that (the simulator answers "Echo: a b c d", five words).
    let gateway = start(&format!(
        r#"
[bindings.billing]
plugin = "price-table"
config = {{ models = {{ "test-model" = {{ input = 0, output = 1000000 }} }} }}
{}"#,
        channel("only", &sim, 1)
    ))
    .await
    .expect("the gateway starts");
    top_up(&gateway, 1_000_000).await;
    let created = gateway
        .admin(
            reqwest::Method::POST,
            "/tenants/acme/keys",
            Some(json!({"daily_spend_cap_micros": 100})),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.json);
    let capped = created.json["secret"]
        .as_str()
        .expect("the secret")
        .to_owned();
    // Every admitted stream stays open until released, so all are in flight together.
    sim.set_standing_fault(Some(Fault {
        hold_after_chunks: Some(1),
        ..Fault::default()
    }));
    let mut body = chat("a b c d");
    body["stream"] = json!(true);
    body["max_tokens"] = json!(5);
    let requests = (0..REQUESTS).map(|_| {
        let (http, url, key, body) = (
            gateway.http.clone(),
            format!("{}/v1/chat/completions", gateway.url),
            capped.clone(),
            body.clone(),
        );
        async move {
            let response = http
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .expect("the gateway answers");
            let status = response.status().as_u16();
            let rest = tokio::spawn(async move { response.bytes().await.map(|body| body.len()) });
            (status, rest)
        }
    });
    let answered = join_all(requests).await;
    let served = answered.iter().filter(|(status, _)| *status == 200).count();
    assert_eq!(served, 20, "the cap holds 20 requests' worth");
    sim.set_standing_fault(None);
    sim.release();
    for (_, rest) in answered {
        let _ = rest.await;
    }
    settled_balance(&gateway).await;
    let spent: u64 = records(&gateway)
        .await
        .iter()
        .filter_map(|record| record["cost_picos"].as_u64())
        .sum();
    assert_eq!(spent, 100_000_000, "the cap, to the pico");
}

#[tokio::test]
async fn streams_at_the_edge_of_the_plugin_pool_are_all_priced() {
    let sim = simulator().await;
    // A pool of 16 instances: each open stream holds one. The tenant may fill it (no fair share
    // holds its streams or instances back): this is about the pool's own edge.
    let gateway = start(&format!(
        "max_instances = 16\nmax_streams_per_tenant = 1000\nmax_instances_per_tenant = 1000\n{}{}",
        harness::billing(0),
        channel("only", &sim, 1)
    ))
    .await
    .expect("the gateway starts");
    top_up(&gateway, 1_000_000).await;
    sim.set_standing_fault(Some(Fault {
        hold_after_chunks: Some(1),
        ..Fault::default()
    }));
    let mut body = chat("keep this open");
    body["stream"] = json!(true);
    let mut open = Vec::new();
    let mut refused = None;
    for _ in 0..40 {
        let response = gateway.post_stream(&body).await;
        if response.status() != 200 {
            refused = Some(harness::Answer::read(response).await);
            break;
        }
        let mut reader = SseReader::new(response);
        assert!(reader.next(Duration::from_secs(20)).await.is_some());
        open.push(reader);
    }
    let refused = refused.expect("the pool fills before 40 streams");
    assert!(open.len() >= 4, "{} streams opened", open.len());
    // A full pool is the gateway's load: 503, to retry shortly.
    refused.assert_error(503, Some("gateway_busy"));
    assert!(refused.headers.contains_key("retry-after"));
    sim.set_standing_fault(None);
    sim.release();
    for mut reader in open {
        assert_eq!(
            reader.rest().await.last().map(String::as_str),
            Some("[DONE]")
        );
    }
    settled_balance(&gateway).await;
    let served: Vec<Value> = records(&gateway)
        .await
        .into_iter()
        .filter(|record| record["status"] == 200)
        .collect();
    let unpriced: Vec<&Value> = served
        .iter()
        .filter(|record| !record["cost_picos"].is_u64())
        .map(|record| &record["request_id"])
        .collect();
    assert!(unpriced.is_empty(), "served but never priced: {unpriced:?}");
    let books = reconcile(&gateway).await;
    assert_eq!(books["tenants"][0]["unpriced_records"], 0, "{books}");
}

#[tokio::test]
async fn streams_open_at_a_crash_are_charged_once_at_the_next_start() {
    const STREAMS: usize = 16;
    let sim = simulator().await;
    let mut gateway = priced_gateway(&sim).await;
    top_up(&gateway, 1_000_000).await;
    // Slow streams: a word every 200 ms, about five seconds each.
    sim.set_standing_fault(Some(Fault {
        chunk_interval_ms: Some(200),
        ..Fault::default()
    }));
    let mut body = chat(&"slow ".repeat(24));
    body["stream"] = json!(true);
    let mut open = Vec::new();
    for _ in 0..STREAMS {
        let response = gateway.post_stream(&body).await;
        assert_eq!(response.status(), 200);
        let request_id = response.headers()["x-request-id"]
            .to_str()
            .expect("ASCII")
            .to_owned();
        open.push((request_id, SseReader::new(response)));
    }
    for (_, reader) in &mut open {
        // The role chunk, then content.
        for _ in 0..3 {
            assert!(reader.next(Duration::from_secs(10)).await.is_some());
        }
    }
    gateway
        .crash_and_restart()
        .await
        .expect("the gateway restarts");
    let ids: Vec<String> = open.into_iter().map(|(id, _)| id).collect();
    let charged = |records: &[Value], id: &str| -> Vec<Value> {
        records
            .iter()
            .filter(|record| record["request_id"] == id)
            .cloned()
            .collect()
    };
    let records_now = records(&gateway).await;
    for id in &ids {
        let recovered = charged(&records_now, id);
        assert_eq!(recovered.len(), 1, "{id} is charged once: {recovered:?}");
        let record = &recovered[0];
        assert_eq!(record["error_class"], "recovered", "{record}");
        assert_eq!(record["status"], 200, "it delivered content: {record}");
        assert!(
            record["usage"]["output_tokens"].as_u64() > Some(0),
            "what it delivered is charged: {record}"
        );
        assert!(record["cost_picos"].as_u64() > Some(0), "{record}");
    }
    assert_eq!(reconcile(&gateway).await["balanced"], true);
    // Charged once, whatever follows.
    gateway
        .crash_and_restart()
        .await
        .expect("the gateway restarts");
    let records_again = records(&gateway).await;
    for id in &ids {
        assert_eq!(charged(&records_again, id).len(), 1, "{id}");
    }
    assert_eq!(balance(&gateway).await.0, settled_balance(&gateway).await);
}

#[tokio::test]
async fn mixed_load_with_client_cancels_and_upstream_faults_keeps_the_books_exact() {
    use rand::{Rng, SeedableRng};
    const REQUESTS: usize = 300;
    let sim = simulator().await;
    let gateway = priced_gateway(&sim).await;
    top_up(&gateway, 3_000).await;
    // The same mix every run: the seed is fixed.
    let mut rng = rand::rngs::StdRng::seed_from_u64(24);
    for _ in 0..REQUESTS {
        let fault = match rng.random_range(0..10) {
            0 => Fault {
                status: Some(500),
                ..Fault::default()
            },
            1 => Fault {
                status: Some(429),
                retry_after_s: Some(1),
                ..Fault::default()
            },
            2 => Fault {
                delay_ms: Some(300),
                ..Fault::default()
            },
            3 => Fault {
                cut_after_chunks: Some(2),
                ..Fault::default()
            },
            4 => Fault {
                ignore_output_cap: true,
                ..Fault::default()
            },
            5 => Fault {
                chunk_interval_ms: Some(40),
                ..Fault::default()
            },
            _ => Fault::default(),
        };
        sim.push_fault(fault);
    }
    let requests = (0..REQUESTS).map(|index| {
        let mut body = chat(&"word ".repeat(rng.random_range(1..400)));
        body["stream"] = json!(rng.random_bool(0.5));
        if rng.random_bool(0.5) {
            body["max_tokens"] = json!(rng.random_range(1..60));
        }
        // A third of the clients give up after 50 to 400 ms.
        let timeout = rng
            .random_bool(0.33)
            .then(|| Duration::from_millis(rng.random_range(50..400)));
        let gateway = &gateway;
        async move {
            let mut request = gateway
                .http
                .post(format!("{}/v1/chat/completions", gateway.url))
                .bearer_auth(&gateway.key)
                .header("x-request-id", format!("mixed-{index}"))
                .json(&body);
            if let Some(timeout) = timeout {
                request = request.timeout(timeout);
            }
            match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let read = response.bytes().await;
                    Some((status, read.is_ok()))
                }
                Err(_) => None,
            }
        }
    });
    let outcomes = join_all(requests).await;
    let answered = outcomes.iter().flatten().count();
    assert!(answered > REQUESTS / 2, "{answered} answered");
    let balance = settled_balance(&gateway).await;
    assert!(balance >= 0, "the floor holds: {balance}");
    let books = reconcile(&gateway).await;
    assert_eq!(books["balanced"], true, "{books}");
    let records = records(&gateway).await;
    let mut ids: Vec<&str> = records
        .iter()
        .filter_map(|record| record["request_id"].as_str())
        .collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), before, "one record per request");
    for (index, outcome) in outcomes.iter().enumerate() {
        if outcome.is_some() {
            assert!(
                ids.binary_search(&format!("mixed-{index}").as_str())
                    .is_ok(),
                "request {index} was answered and has a record"
            );
        }
    }
}

#[tokio::test]
async fn reconcile_reports_a_balance_below_its_floor() {
    let sim = simulator().await;
    // A credit line of 100 micros: the floor is -100.
    let gateway = start(&format!(
        "{}{}",
        harness::billing(100),
        channel("only", &sim, 1)
    ))
    .await
    .expect("the gateway starts");
    let correction = |micros: i64| {
        gateway.admin(
            reqwest::Method::POST,
            "/tenants/acme/top-ups",
            Some(json!({"amount_micros": micros, "reason": "correction"})),
        )
    };
    assert_eq!(correction(-100).await.status, 200);
    let at_floor = reconcile(&gateway).await;
    assert_eq!(at_floor["balanced"], true, "{at_floor}");
    assert!(
        at_floor["tenants"][0]["below_floor"].is_null(),
        "{at_floor}"
    );
    assert_eq!(correction(-1).await.status, 200);
    let below = reconcile(&gateway).await;
    assert_eq!(below["balanced"], false, "{below}");
    assert!(
        below["tenants"][0]["below_floor"].is_string(),
        "the entry says why: {below}"
    );
}

#[tokio::test]
async fn a_billing_plugin_built_against_0_1_0_sizes_the_output_near_the_floor() {
    let sim = simulator().await;
    let gateway = priced_gateway(&sim).await;
    let shipped = std::fs::read(harness::test_plugin("tollgate_billing_price_table.wasm"))
        .expect("the shipped billing plugin is built");
    let uploaded = gateway
        .upload_plugin(
            "price-table-0.1.0",
            harness::built_against(&shipped, b"0.1.0"),
        )
        .await;
    assert_eq!(uploaded.status, 201, "{}", uploaded.json);
    assert_eq!(uploaded.json["contract"], "0.1.0");
    let bound = gateway
        .admin(
            reqwest::Method::PUT,
            "/bindings?role=billing&tenant=acme",
            Some(json!({"plugin": "price-table-0.1.0", "config": {"models": {"test-model": {"input": 150_000, "output": 600_000}}}})),
        )
        .await;
    assert_eq!(bound.status, 200, "{}", bound.json);
    top_up(&gateway, 5_000).await;
    sim.set_standing_fault(Some(Fault {
        ignore_output_cap: true,
        ..Fault::default()
    }));
    let answer = gateway
        .post("/v1/chat/completions", &long_prompt(8_000), &[])
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert!(caps_seen(&sim)[0].is_some_and(|cap| cap < 8_000));
    assert!(settled_balance(&gateway).await >= 0);
    let record = gateway.record(&answer.request_id()).await;
    assert!(
        record["plugins"].to_string().contains("price-table-0.1.0"),
        "{record}"
    );
}

#[tokio::test]
async fn with_batch_sync_every_answered_request_survives_a_crash() {
    let sim = simulator().await;
    let mut gateway = harness::start_with_server(
        "ledger_sync = \"batch\"\n",
        &format!("{}{}", harness::billing(0), channel("only", &sim, 1)),
    )
    .await
    .expect("the gateway starts");
    top_up(&gateway, 1_000_000).await;
    let hello = chat("hi");
    let answers = join_all((0..8).map(|_| gateway.post("/v1/chat/completions", &hello, &[]))).await;
    gateway
        .crash_and_restart()
        .await
        .expect("the gateway restarts");
    for answer in answers {
        assert_eq!(answer.status, 200, "{}", answer.json);
        let record = gateway.record(&answer.request_id()).await;
        assert!(record["cost_picos"].as_u64() > Some(0), "{record}");
    }
    assert_eq!(reconcile(&gateway).await["balanced"], true);
}
