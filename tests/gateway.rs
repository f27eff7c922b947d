//! End-to-end: the real `tollgate` binary with the shipped plugins, against the upstream simulator.

mod harness;

use std::time::Duration;

use harness::{
    Answer, INPUT_PRICE, OUTPUT_PRICE, SseReader, UPSTREAM_KEY, billing, channel, chat, simulator,
    start,
};
use serde_json::{Value, json};
use tollgate_simulator::Fault;

fn config_with(channels: &str) -> String {
    format!("{}{channels}", billing(1_000_000))
}

#[tokio::test]
async fn chat_round_trip_is_recorded_with_exact_cost() {
    let sim = simulator().await;
    let gateway = start(&config_with(&channel("primary", &sim, 1)))
        .await
        .unwrap();
    let answer = gateway
        .post(
            "/v1/chat/completions",
            &chat("hello there world"),
            &[("x-request-id", "req-round-trip")],
        )
        .await;
    assert_eq!(
        answer.status,
        200,
        "{} / log: {}",
        answer.json,
        gateway.log()
    );
    assert_eq!(answer.request_id(), "req-round-trip");
    assert_eq!(answer.json["object"], "chat.completion");
    assert_eq!(
        answer.json["choices"][0]["message"]["content"],
        "Echo: hello there world"
    );
    // The host injected the channel's key and the translator rewrote the model.
    let seen = sim.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );
    assert_eq!(seen[0].body["model"], "sim-model");
    assert_ne!(
        seen[0].authorization.as_deref(),
        Some(format!("Bearer {}", gateway.key).as_str())
    );

    let record = gateway.record("req-round-trip").await;
    assert_eq!(record["tenant"], "acme");
    assert_eq!(record["model_asked"], "test-model");
    assert_eq!(record["model_served"], "sim-model");
    assert_eq!(record["channel"], "primary");
    assert_eq!(record["status"], 200);
    assert_eq!(record["usage"]["input_tokens"], 3);
    assert_eq!(record["usage"]["output_tokens"], 4);
    assert_eq!(record["usage"]["estimated"], false);
    // Money rule: tokens × price per million micros = picos, exactly.
    assert_eq!(record["cost_picos"], 3 * INPUT_PRICE + 4 * OUTPUT_PRICE);
    assert!(
        record["key_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("key_"))
    );
    assert_eq!(record["attempts"].as_array().map(Vec::len), Some(1));
    let text = record.to_string();
    assert!(
        !text.contains("hello there"),
        "no prompt text in the record: {text}"
    );
}

#[tokio::test]
async fn stream_first_chunk_reaches_client_while_upstream_holds_the_rest() {
    let sim = simulator().await;
    let gateway = start(&config_with(&channel("primary", &sim, 1)))
        .await
        .unwrap();
    // The simulator sends the role chunk and one content chunk, then waits for `release`.
    sim.push_fault(Fault {
        hold_after_chunks: Some(2),
        ..Fault::default()
    });
    let mut body = chat("one two three");
    body["stream"] = json!(true);
    let response = gateway.post_stream(&body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut reader = SseReader::new(response);
    let first: Value =
        serde_json::from_str(&reader.next(Duration::from_secs(20)).await.unwrap()).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let second: Value =
        serde_json::from_str(&reader.next(Duration::from_secs(20)).await.unwrap()).unwrap();
    assert_eq!(second["choices"][0]["delta"]["content"], "Echo: ");
    // Nothing more comes while the upstream holds back: the gateway does not buffer.
    assert!(
        tokio::time::timeout(
            Duration::from_millis(300),
            reader.next(Duration::from_secs(1))
        )
        .await
        .is_err(),
        "no chunk may arrive while the upstream holds the stream"
    );
    sim.release();
    let rest = reader.rest().await;
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = rest[..rest.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "one two three");
    assert!(
        chunks
            .iter()
            .all(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty())),
        "no usage chunk unasked"
    );
    // The gateway asked the upstream for usage anyway and recorded it.
    assert_eq!(sim.seen()[0].body["stream_options"]["include_usage"], true);
    let record = gateway.record_eventually(&request_id).await;
    assert_eq!(record["usage"]["input_tokens"], 3);
    assert_eq!(record["usage"]["output_tokens"], 4);
    assert_eq!(record["usage"]["estimated"], false);
    assert_eq!(record["stream"], true);
    assert_eq!(record["cost_picos"], 3 * INPUT_PRICE + 4 * OUTPUT_PRICE);
}

#[tokio::test]
async fn stream_usage_chunk_is_sent_when_asked_for() {
    let sim = simulator().await;
    let gateway = start(&config_with(&channel("primary", &sim, 1)))
        .await
        .unwrap();
    let mut body = chat("a b");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let rest = SseReader::new(gateway.post_stream(&body).await)
        .rest()
        .await;
    let usage_chunk: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], 2);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn client_errors_are_openai_shaped() {
    let sim = simulator().await;
    let gateway = start(&config_with(&channel("primary", &sim, 1)))
        .await
        .unwrap();
    let url = format!("{}/v1/chat/completions", gateway.url);

    let missing = Answer::read(
        gateway
            .http
            .post(&url)
            .json(&chat("x"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    missing.assert_error(401, Some("invalid_api_key"));
    let wrong = Answer::read(
        gateway
            .http
            .post(&url)
            .bearer_auth("tg-nope")
            .json(&chat("x"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    wrong.assert_error(401, Some("invalid_api_key"));

    let malformed = Answer::read(
        gateway
            .http
            .post(&url)
            .bearer_auth(&gateway.key)
            .body("{\"model\": ")
            .send()
            .await
            .unwrap(),
    )
    .await;
    malformed.assert_error(400, None);
    let message = malformed.json["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("EOF") || message.contains("parse"),
        "{message}"
    );

    let no_messages = gateway
        .post("/v1/chat/completions", &json!({"model": "test-model"}), &[])
        .await;
    no_messages.assert_error(400, None);
    assert_eq!(no_messages.json["error"]["param"], "messages");

    let unknown_model = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
            &[],
        )
        .await;
    unknown_model.assert_error(404, Some("model_not_found"));

    let unknown_path = gateway.post("/v1/nothing", &json!({}), &[]).await;
    unknown_path.assert_error(404, Some("unknown_url"));
    assert!(!unknown_path.request_id().is_empty());
    // None of these reached the upstream.
    assert_eq!(sim.calls(), 0);
}

#[tokio::test]
async fn a_failing_channel_fails_over_to_the_next() {
    let broken = simulator().await;
    let healthy = simulator().await;
    let channels = format!(
        "{}{}",
        channel("broken", &broken, 1),
        channel("healthy", &healthy, 2)
    );
    let gateway = start(&config_with(&channels)).await.unwrap();
    broken.push_fault(Fault {
        status: Some(500),
        ..Fault::default()
    });
    let answer = gateway
        .post("/v1/chat/completions", &chat("still here"), &[])
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!((broken.calls(), healthy.calls()), (1, 1));
    let record = gateway.record(&answer.request_id()).await;
    assert_eq!(record["channel"], "healthy");
    let attempts = record["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["channel"], "broken");
    assert_eq!(attempts[0]["status"], 500);
    assert_eq!(attempts[0]["error_class"], "server");
    assert_eq!(attempts[1]["channel"], "healthy");
}

#[tokio::test]
async fn exhausted_routes_report_the_last_upstream_failure_class() {
    let sim = simulator().await;
    let gateway = start(&config_with(&channel("only", &sim, 1)))
        .await
        .unwrap();
    sim.push_fault(Fault {
        status: Some(502),
        ..Fault::default()
    });
    let failed = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    failed.assert_error(502, Some("upstream_server"));
    let record = gateway.record(&failed.request_id()).await;
    assert_eq!(record["status"], 502);
    assert_eq!(record["error_class"], "server");

    // The client's own mistakes are not retried and come back as the upstream said them.
    sim.push_fault(Fault {
        status: Some(400),
        ..Fault::default()
    });
    let invalid = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    invalid.assert_error(400, None);
    assert_eq!(invalid.json["error"]["message"], "Simulated client error.");

    sim.push_fault(Fault {
        status: Some(429),
        retry_after_s: Some(7),
        ..Fault::default()
    });
    let limited = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    limited.assert_error(429, Some("rate_limit_exceeded"));
    assert_eq!(limited.headers["retry-after"], "7");
    // The only key now rests, but it is the last route: the next request is sent anyway, and
    // the upstream, its limit passed, answers.
    let calls = sim.calls();
    let resting = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    assert_eq!(resting.status, 200, "{}", resting.json);
    assert_eq!(sim.calls(), calls + 1);
}

#[tokio::test]
async fn an_error_event_before_content_fails_over() {
    let first = simulator().await;
    let second = simulator().await;
    let channels = format!(
        "{}{}",
        channel("first", &first, 1),
        channel("second", &second, 2)
    );
    let gateway = start(&config_with(&channels)).await.unwrap();
    first.push_fault(Fault {
        error_event: true,
        ..Fault::default()
    });
    let mut body = chat("x y");
    body["stream"] = json!(true);
    let response = gateway.post_stream(&body).await;
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let rest = SseReader::new(response).rest().await;
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    assert!(
        rest.iter().all(|payload| !payload.contains("\"error\"")),
        "{rest:?}"
    );
    let record = gateway.record_eventually(&request_id).await;
    assert_eq!(record["channel"], "second");
    assert_eq!(record["attempts"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn a_stream_cut_mid_way_ends_with_an_error_event_and_is_recorded() {
    let sim = simulator().await;
    let gateway = start(&config_with(&channel("only", &sim, 1)))
        .await
        .unwrap();
    sim.push_fault(Fault {
        cut_after_chunks: Some(3),
        ..Fault::default()
    });
    let mut body = chat("one two three four");
    body["stream"] = json!(true);
    let response = gateway.post_stream(&body).await;
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let rest = SseReader::new(response).rest().await;
    assert_eq!(rest.len(), 4, "three chunks then one error event: {rest:?}");
    let error: Value = serde_json::from_str(&rest[3]).unwrap();
    assert_eq!(error["error"]["code"], "upstream_cut");
    assert!(rest.iter().all(|payload| payload != "[DONE]"));
    let record = gateway.record_eventually(&request_id).await;
    assert_eq!(record["error_class"], "stream_cut");
    assert_eq!(record["usage"]["estimated"], true);
    // Charged for what was delivered: "Echo: one " is 10 bytes, about 3 tokens.
    assert_eq!(record["usage"]["output_tokens"], 3);
    assert!(record["cost_picos"].as_u64().is_some_and(|cost| cost > 0));
    // Only one upstream call: after the first byte there is no failover.
    assert_eq!(sim.calls(), 1);
}

#[tokio::test]
async fn missing_upstream_usage_is_estimated_and_flagged() {
    let sim = simulator().await;
    let gateway = start(&config_with(&channel("only", &sim, 1)))
        .await
        .unwrap();
    sim.push_fault(Fault {
        omit_usage: true,
        ..Fault::default()
    });
    let answer = gateway
        .post("/v1/chat/completions", &chat("hello world"), &[])
        .await;
    assert_eq!(answer.status, 200);
    let record = gateway.record(&answer.request_id()).await;
    assert_eq!(record["usage"]["estimated"], true);
    // Counted with the o200k tokenizer: "hello world" is 2 tokens (4 bytes a token would say 3),
    // the answer "Echo: hello world" 4.
    assert_eq!(record["usage"]["input_tokens"], 2);
    assert_eq!(record["usage"]["output_tokens"], 4);
    assert_eq!(record["cost_picos"], 2 * INPUT_PRICE + 4 * OUTPUT_PRICE);
}

#[tokio::test]
async fn embeddings_and_models() {
    let sim = simulator().await;
    let gateway = start(&config_with(&channel("primary", &sim, 1)))
        .await
        .unwrap();
    let floats = gateway
        .post(
            "/v1/embeddings",
            &json!({"model": "test-embedding", "input": ["alpha beta", "gamma"]}),
            &[],
        )
        .await;
    assert_eq!(floats.status, 200, "{}", floats.json);
    assert_eq!(floats.json["object"], "list");
    assert_eq!(floats.json["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        floats.json["data"][0]["embedding"].as_array().map(Vec::len),
        Some(8)
    );
    assert_eq!(floats.json["usage"]["prompt_tokens"], 3);
    let encoded = gateway
        .post(
            "/v1/embeddings",
            &json!({"model": "test-embedding", "input": "alpha", "encoding_format": "base64"}),
            &[],
        )
        .await;
    assert_eq!(encoded.status, 200);
    assert!(encoded.json["data"][0]["embedding"].is_string());
    let record = gateway.record(&encoded.request_id()).await;
    assert_eq!(record["operation"], "embeddings");
    assert_eq!(record["cost_picos"], 20_000);

    let models = Answer::read(
        gateway
            .http
            .get(format!("{}/v1/models", gateway.url))
            .bearer_auth(&gateway.key)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(models.status, 200);
    let ids: Vec<&str> = models.json["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["test-embedding", "test-model"]);
}

#[tokio::test]
async fn insufficient_balance_is_refused_before_any_upstream_call() {
    let sim = simulator().await;
    let config = format!("{}{}", billing(0), channel("primary", &sim, 1));
    let gateway = start(&config).await.unwrap();
    let answer = gateway.post("/v1/chat/completions", &chat("x"), &[]).await;
    answer.assert_error(429, Some("insufficient_quota"));
    assert_eq!(sim.calls(), 0);
}

#[tokio::test]
async fn cli_says_plainly_when_a_gateway_holds_the_data_dir() {
    let sim = simulator().await;
    let gateway = start(&config_with(&channel("primary", &sim, 1)))
        .await
        .unwrap();
    let output = harness::cli(&[
        "tenant",
        "create",
        "other",
        "--config",
        gateway.config.to_str().unwrap(),
    ])
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("in use by another process"), "{stderr}");
}

/// The soft limit of open files of a running process, and its hard limit.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("its limits");
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("a line for open files");
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[tokio::test]
async fn serve_raises_its_open_file_limit_and_says_when_it_caps_the_streams() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let config = harness::write_config(
        dir.path(),
        "listen = \"127.0.0.1:0\"\n",
        &format!("max_instances = 1000\n{}", billing(1_000_000)),
    )
    .unwrap();
    let log = dir.path().join("gateway.log");
    // Started the way many systems start a service: 1,024 files at most, 256 until raised.
    let mut child = tokio::process::Command::new("sh")
        .args([
            "-c",
            "ulimit -Sn 256 && ulimit -Hn 1024 && exec \"$0\" serve --config \"$1\"",
            harness::binary(),
        ])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("tollgate listening on ") {
                return;
            }
        }
        panic!(
            "the gateway exited: {}",
            std::fs::read_to_string(&log).unwrap()
        );
    })
    .await
    .expect("listening within 60 s");
    assert_eq!(open_file_limits(pid), (1024, 1024));
    // 1,024 files hold ~480 streams, fewer than the 1,000 instances the pool is sized for.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("allows fewer open streams than `plugins.max_instances`"),
        "{logged}"
    );
}

/// A client that opens a new connection for every request, so the kernel picks a worker each time.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a plain client builds")
}

/// The names of a process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("its threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect()
}

#[tokio::test]
async fn every_serving_worker_takes_connections_and_reaches_the_upstream() {
    let sim = simulator().await;
    let gateway =
        harness::start_with_server("workers = 3\n", &config_with(&channel("primary", &sim, 1)))
            .await
            .unwrap();
    let names = thread_names(gateway.pid());
    let workers: Vec<&String> = names
        .iter()
        .filter(|name| name.starts_with("worker-"))
        .collect();
    // The main thread is worker 0: two more make three.
    assert_eq!(workers.len(), 2, "{names:?}");
    // The kernel spreads connections over the workers' sockets by their addresses: a worker that
    // took connections but did not serve them would leave some of these hanging.
    for attempt in 0..30 {
        let response = fresh_client()
            .post(format!("{}/v1/chat/completions", gateway.url))
            .bearer_auth(&gateway.key)
            .json(&chat("hello"))
            .send()
            .await
            .unwrap_or_else(|error| panic!("connection {attempt}: {error}"));
        let answer = Answer::read(response).await;
        assert_eq!(answer.status, 200, "connection {attempt}: {}", answer.json);
    }
    assert_eq!(sim.calls(), 30);
}

#[tokio::test]
async fn a_second_gateway_cannot_take_a_port_in_use() {
    let sim = simulator().await;
    let first = start(&config_with(&channel("primary", &sim, 1)))
        .await
        .unwrap();
    let address = first.url.trim_start_matches("http://").to_owned();
    let dir = tempfile::tempdir().unwrap();
    let config = harness::write_config(
        dir.path(),
        &format!("listen = \"{address}\"\n"),
        &billing(1_000_000),
    )
    .unwrap();
    let second = tokio::process::Command::new(harness::binary())
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), second)
        .await
        .expect("the second gateway gives up within 60 s instead of serving")
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("binding {address}")), "{stderr}");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_head_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sim = simulator().await;
    let gateway = harness::start_with_server(
        "header_read_timeout_ms = 300\n",
        &config_with(&channel("primary", &sim, 1)),
    )
    .await
    .unwrap();
    let address = gateway.url.trim_start_matches("http://");
    // The request line and one header, then nothing more.
    let mut trickling = tokio::net::TcpStream::connect(address).await.unwrap();
    trickling
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: tollgate\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(20), trickling.read_to_end(&mut answer)).await;
    assert!(
        closed.is_ok(),
        "the gateway must close a connection whose head is unfinished after 300 ms"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(!answer.contains(" 200 "), "{answer}");
    assert_eq!(sim.calls(), 0, "nothing reached the upstream");
    // A whole request, sent in time on a fresh connection, is served as always.
    let served = fresh_client()
        .post(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(&gateway.key)
        .json(&chat("hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
}

#[tokio::test]
async fn on_sigterm_every_worker_stops_taking_connections_and_open_streams_finish() {
    let sim = simulator().await;
    let mut gateway =
        harness::start_with_server("workers = 3\n", &config_with(&channel("primary", &sim, 1)))
            .await
            .unwrap();
    // Streams held open on fresh connections, so every worker (the kernel picks one per
    // connection; 24 miss one of 3 with odds of 1 in 5,000) has one in flight when the signal
    // comes: a worker left without one would otherwise stop at once and hide one that did not.
    sim.set_standing_fault(Some(Fault {
        hold_after_chunks: Some(2),
        ..Fault::default()
    }));
    let mut body = chat("one two three");
    body["stream"] = json!(true);
    let mut readers = Vec::new();
    for _ in 0..24 {
        let response = fresh_client()
            .post(format!("{}/v1/chat/completions", gateway.url))
            .bearer_auth(&gateway.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let mut reader = SseReader::new(response);
        assert!(reader.next(Duration::from_secs(20)).await.is_some());
        readers.push(reader);
    }
    let healthz = format!("{}/healthz", gateway.url);
    let fresh_connection = || async {
        fresh_client()
            .get(&healthz)
            .timeout(Duration::from_secs(5))
            .send()
            .await
    };
    assert_eq!(fresh_connection().await.unwrap().status(), 200);
    gateway.terminate();
    // Bounded wait for the signal to land; then no worker may take a connection (each listening
    // socket left open would take about a third of them). Only a refused connect says every
    // socket is closed: a connection reset comes from the backlog of one worker's socket as that
    // worker closes it, while the others may still be listening.
    let mut refused = false;
    for _ in 0..200 {
        if fresh_connection()
            .await
            .is_err_and(|error| error.is_connect())
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        refused,
        "the gateway still takes connections 10 s after SIGTERM"
    );
    for attempt in 0..20 {
        assert!(
            fresh_connection().await.is_err(),
            "connection {attempt} was served after SIGTERM"
        );
    }
    // The streams in flight are not cut: they end whole once the upstream goes on.
    sim.release();
    for mut reader in readers {
        let rest = reader.rest().await;
        assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    }
    let status = gateway.exit_status(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}: {}", gateway.log());
}

/// A relay's deployment: 400 channels of 20 models each. A request reaches the channels of its
/// model, and its router is handed those alone, each with the asked model's entry only.
#[tokio::test]
async fn among_400_channels_a_request_routes_by_its_models_channels_alone() {
    let sim = harness::simulator().await;
    let mut config = harness::billing(1_000_000);
    for channel in 0..400 {
        // `test-model` is served by channels 7 (priority 2) and 399 (priority 1) only.
        let serves_it = matches!(channel, 7 | 399);
        let models: Vec<String> = (0..20)
            .map(|model| {
                if serves_it && model == 0 {
                    r#""test-model" = "sim-model""#.to_owned()
                } else {
                    format!(r#""filler-{channel}-{model}" = "sim-model""#)
                }
            })
            .collect();
        config.push_str(&format!(
            "\n[[channels]]\nname = \"c{channel}\"\nprotocol = \"openai\"\nbase_url = \"{}\"\n\
             priority = {}\napi_key_env = [\"TEST_UPSTREAM_KEY\"]\nmodels = {{ {} }}\n",
            sim.openai_base_url(),
            if channel == 399 { 1 } else { 2 },
            models.join(", ")
        ));
    }
    let gateway = start(&config).await.expect("the gateway starts");
    let answer = gateway.post("/v1/chat/completions", &chat("hi"), &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!(
        gateway.record(&answer.request_id()).await["channel"],
        "c399"
    );

    let router = std::fs::read(harness::test_plugin(
        "tollgate_test_plugin_scripted_router.wasm",
    ))
    .expect("built");
    let uploaded = gateway.upload_plugin("describer", router).await;
    assert_eq!(uploaded.status, 201, "{}", uploaded.json);
    let bound = gateway
        .admin(
            reqwest::Method::PUT,
            "/bindings?role=router&tenant=acme",
            Some(json!({"plugin": "describer", "config": {"describe_input": true}})),
        )
        .await;
    assert_eq!(bound.status, 200, "{}", bound.json);
    let described = gateway.post("/v1/chat/completions", &chat("hi"), &[]).await;
    described.assert_error(403, Some("route_refused"));
    assert_eq!(
        described.json["error"]["message"], "saw c7(1), c399(1)",
        "the router gets the model's channels, in order, each with that model alone"
    );
}
