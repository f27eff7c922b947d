//! Hostile clients and leaky upstreams: no channel secret leaves the gateway, whatever an upstream
//! echoes.

mod harness;

use harness::{SseReader, chat, start, start_with_server};
use serde_json::json;
use tollgate_simulator::{Fault, Simulator};

/// A channel key with no word in it, so that any run of 8 of its bytes in a text is a leak.
const CHANNEL_KEY: &str = "sk-Zq8x1Vb7Kp2Lw9Rt5Ny3Hd6";

/// Every run of 8 bytes of the channel key that `text` holds.
fn leaks(text: &str) -> Vec<&'static str> {
    (0..=CHANNEL_KEY.len() - 8)
        .map(|start| &CHANNEL_KEY[start..start + 8])
        .filter(|run| text.contains(run))
        .collect()
}

#[tokio::test]
async fn an_upstream_that_echoes_its_key_leaks_it_nowhere() {
    let sim = Simulator::start(([127, 0, 0, 1], 0).into(), vec![CHANNEL_KEY.to_owned()])
        .await
        .expect("a simulator");
    let gateway = start(&harness::billing(1_000_000))
        .await
        .expect("the gateway starts");
    // A channel of the admin API: its key is the one this test chose.
    let created = gateway
        .admin(
            reqwest::Method::POST,
            "/channels",
            Some(json!({
                "name": "leaky",
                "protocol": "openai",
                "base_url": sim.openai_base_url(),
                "models": {"test-model": "sim-model"},
                "api_keys": [CHANNEL_KEY],
            })),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.json);
    let mut seen = Vec::new();

    // In a stream: an error event before any content, echoing the key.
    sim.push_fault(Fault {
        error_event: true,
        echo_key: true,
        ..Fault::default()
    });
    let mut body = chat("hello");
    body["stream"] = json!(true);
    let response = gateway.post_stream(&body).await;
    let status = response.status();
    let text = if status == 200 {
        SseReader::new(response).rest().await.join("\n")
    } else {
        response.text().await.expect("a body")
    };
    seen.push(format!("stream {status}: {text}"));

    // A refused request the upstream blames on the client, echoing the key.
    sim.push_fault(Fault {
        status: Some(400),
        echo_key: true,
        ..Fault::default()
    });
    let answer = gateway
        .post("/v1/chat/completions", &chat("hello"), &[])
        .await;
    assert_eq!(answer.status, 400, "{}", answer.json);
    seen.push(answer.json.to_string());

    // A key refused, echoed: the key is disabled with the upstream's reason.
    sim.push_fault(Fault {
        status: Some(401),
        echo_key: true,
        ..Fault::default()
    });
    let answer = gateway
        .post("/v1/chat/completions", &chat("hello"), &[])
        .await;
    assert!(answer.status >= 400, "{}", answer.json);
    seen.push(answer.json.to_string());
    let channels = gateway.admin(reqwest::Method::GET, "/channels", None).await;
    assert!(
        channels.json.to_string().contains("refused"),
        "the key is out of the pool, with its reason: {}",
        channels.json
    );
    seen.push(channels.json.to_string());
    let usage = gateway
        .admin(reqwest::Method::GET, "/usage?tenant=acme", None)
        .await;
    seen.push(usage.json.to_string());
    seen.push(gateway.log());

    for text in &seen {
        assert!(leaks(text).is_empty(), "the key leaked: {text}");
        // Nor do the gateway's own secrets appear anywhere.
        for secret in [harness::ADMIN_TOKEN, harness::MASTER_KEY] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }
    // Every call presented the key the simulator echoed: unscrubbed, the texts would hold it.
    assert_eq!(sim.calls(), 3);
    let presented = format!("Bearer {CHANNEL_KEY}");
    assert!(
        sim.seen()
            .iter()
            .all(|request| request.authorization.as_deref() == Some(presented.as_str()))
    );
}

/// Opens a raw connection to the gateway and sends `head` (and whatever body bytes it holds).
async fn raw_connection(gateway: &harness::Gateway, head: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let address = gateway.url.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("the gateway accepts a connection");
    tcp.write_all(head.as_bytes())
        .await
        .expect("the request head is sent");
    tcp
}

/// Everything the gateway sends on `tcp` until it closes the connection, or `None` if it has not
/// closed it within `wait`.
async fn read_until_closed(
    tcp: &mut tokio::net::TcpStream,
    wait: std::time::Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(wait, tcp.read_to_end(&mut answer)).await;
    match read {
        Ok(Ok(_)) => Some(String::from_utf8_lossy(&answer).into_owned()),
        // A reset after the answer is a close too.
        Ok(Err(_)) => Some(String::from_utf8_lossy(&answer).into_owned()),
        Err(_) => None,
    }
}

/// A chat request's head announcing a large body, with `credential` (a whole header line or
/// nothing), and the first few bytes of that body.
fn trickled_head(credential: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: tollgate\r\ncontent-type: application/json\r\n\
         content-length: 100000\r\n{credential}\r\n{{\"model\":"
    )
}

#[tokio::test]
async fn a_request_without_a_valid_key_is_answered_before_its_body_arrives() {
    let gateway = start_with_server("body_read_timeout_ms = 600\n", &harness::billing(0))
        .await
        .expect("the gateway starts");
    let wait = std::time::Duration::from_secs(5);
    for credential in [
        "",
        "authorization: Bearer tg-not-a-key\r\n",
        "x-api-key: tg-not-a-key\r\n",
    ] {
        let mut tcp = raw_connection(&gateway, &trickled_head(credential)).await;
        let answer = read_until_closed(&mut tcp, wait).await.unwrap_or_else(|| {
            panic!("{credential:?}: no answer and no close while the body was still due")
        });
        assert!(
            answer.starts_with("HTTP/1.1 401"),
            "{credential:?}: a 401 at once: {answer}"
        );
        assert!(
            answer.contains("invalid_api_key"),
            "{credential:?}: in OpenAI's shape: {answer}"
        );
    }
    // A valid key whose body stalls: answered 408 once the body is overdue, and closed.
    let mut tcp = raw_connection(
        &gateway,
        &trickled_head(&format!("authorization: Bearer {}\r\n", gateway.key)),
    )
    .await;
    let answer = read_until_closed(&mut tcp, wait)
        .await
        .expect("a stalled body is given up within its timeout");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
}

#[tokio::test]
async fn a_body_slower_than_the_minimum_rate_is_given_up() {
    use tokio::io::AsyncWriteExt;
    let gateway = start_with_server(
        "body_read_timeout_ms = 500\nbody_min_bytes_per_second = 1000\n",
        &harness::billing(0),
    )
    .await
    .expect("the gateway starts");
    let mut tcp = raw_connection(
        &gateway,
        &trickled_head(&format!("authorization: Bearer {}\r\n", gateway.key)),
    )
    .await;
    // One byte every 100 ms: always moving, at a hundredth of the minimum rate.
    let trickle = async {
        for _ in 0..50 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            if tcp.write_all(b" ").await.is_err() {
                break;
            }
        }
    };
    let started = std::time::Instant::now();
    trickle.await;
    let answer = read_until_closed(&mut tcp, std::time::Duration::from_secs(2))
        .await
        .expect("the trickling body is given up");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "given up before the trickle ended"
    );
}

#[tokio::test]
async fn connections_that_never_authenticate_cannot_crowd_out_a_client() {
    let sim = harness::simulator().await;
    let gateway = start_with_server(
        "max_unauthenticated_connections = 20\n",
        &format!(
            "{}{}",
            harness::billing(1_000_000),
            harness::channel("sim", &sim, 1)
        ),
    )
    .await
    .expect("the gateway starts");
    // The gateway's descriptors, then a limit 100 above them, as a small machine would have.
    let pid = gateway.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc lists the gateway's descriptors")
        .count();
    let limit = open + 100;
    let lowered = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("prlimit runs");
    assert!(lowered.success(), "the open-file limit is lowered");
    // 150 clients that start a request head and never finish it.
    let mut idle = Vec::new();
    for _ in 0..150 {
        idle.push(
            raw_connection(
                &gateway,
                "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n",
            )
            .await,
        );
    }
    // The oldest are closed as the cap is passed. Wait until the gateway has taken every one from
    // its accept queue (all but the cap's 20 closed): a client connecting while it still takes
    // them is older than those accepted after it, and would be the one closed.
    let mut closed = vec![false; idle.len()];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while closed.iter().filter(|closed| **closed).count() < 130 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the oldest unauthenticated connections are closed: {} of 150",
            closed.iter().filter(|closed| **closed).count()
        );
        for (tcp, closed) in idle.iter_mut().zip(closed.iter_mut()) {
            if !*closed
                && read_until_closed(tcp, std::time::Duration::from_millis(5))
                    .await
                    .is_some()
            {
                *closed = true;
            }
        }
    }
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        gateway.post("/v1/chat/completions", &chat("hello"), &[]),
    )
    .await
    .expect("a client with a key is served while the idle connections wait");
    assert_eq!(answer.status, 200, "{}", answer.json);
}

#[tokio::test]
async fn failed_logins_are_throttled_per_address_and_logged_as_counts() {
    let sim = harness::simulator().await;
    let gateway = start(&format!(
        "{}{}",
        harness::billing(1_000_000),
        harness::channel("sim", &sim, 1)
    ))
    .await
    .expect("the gateway starts");
    let mut statuses = Vec::new();
    for attempt in 0..40 {
        let response = gateway
            .http
            .post(format!("{}/v1/chat/completions", gateway.url))
            .bearer_auth(format!("tg-wrong-{attempt}"))
            .json(&chat("hello"))
            .send()
            .await
            .expect("the gateway answers");
        let answer = harness::Answer::read(response).await;
        if answer.status == 429 {
            let retry_after = answer
                .headers
                .get("retry-after")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse::<u64>().ok());
            assert!(
                retry_after.is_some_and(|seconds| seconds >= 1),
                "{:?}",
                answer.headers
            );
            assert_eq!(
                answer.json["error"]["code"], "rate_limit_exceeded",
                "{}",
                answer.json
            );
        }
        statuses.push(answer.status);
    }
    assert!(
        statuses[..20].iter().all(|status| *status == 401),
        "the first 20 failures a second are answered 401: {statuses:?}"
    );
    let throttled = statuses.iter().filter(|status| **status == 429).count();
    assert!(throttled >= 15, "then 429: {statuses:?}");
    // Wrong admin tokens from the same address are throttled too.
    let admin = gateway
        .http
        .get(format!("{}/admin/tenants", gateway.url))
        .bearer_auth("not-the-admin-token")
        .send()
        .await
        .expect("the admin API answers");
    assert_eq!(admin.status(), 429);
    // A valid key and the admin token from that address are never refused by the throttle.
    let answer = gateway
        .post("/v1/chat/completions", &chat("hello"), &[])
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    let tenants = gateway.admin(reqwest::Method::GET, "/tenants", None).await;
    assert_eq!(tenants.status, 200, "{}", tenants.json);
    // The refusals are logged as counts per address and kind, not one line each.
    let counted = |log: &str, kind: &str| -> u64 {
        log.lines()
            .filter(|line| line.contains("failed authentication"))
            .filter(|line| line.contains("address=127.0.0.1") && line.contains(kind))
            .filter_map(|line| {
                line.split("refused=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    };
    let logged = tokio::time::timeout(std::time::Duration::from_secs(15), async {
        loop {
            let log = gateway.log();
            if counted(&log, "kind=api_key") >= 40 && counted(&log, "kind=admin_token") >= 1 {
                return log;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the refusals are counted in the log within an interval:\n{}",
            gateway.log()
        )
    });
    assert_eq!(counted(&logged, "kind=api_key"), 40, "{logged}");
    assert_eq!(counted(&logged, "kind=admin_token"), 1, "{logged}");
    let per_request = logged
        .lines()
        .filter(|line| line.contains("invalid_api_key") || line.contains("invalid_admin_token"))
        .count();
    assert_eq!(per_request, 0, "no line per refusal:\n{logged}");
}

#[tokio::test]
async fn the_admin_api_and_metrics_can_listen_apart_and_metrics_need_a_token() {
    let gateway = start_with_server(
        "admin_listen = \"127.0.0.1:0\"\nmetrics_token = \"scraper-token\"\n",
        &harness::billing(0),
    )
    .await
    .expect("the gateway starts");
    assert_ne!(
        gateway.url, gateway.admin_url,
        "the admin API has its own address"
    );
    let get = |url: String, token: Option<&'static str>| {
        let request = gateway.http.get(url);
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        async move { request.send().await.expect("an answer").status().as_u16() }
    };
    // The public listener serves neither the admin API nor the metrics.
    let public = &gateway.url;
    let admin = &gateway.admin_url;
    assert_eq!(
        get(
            format!("{public}/admin/tenants"),
            Some(harness::ADMIN_TOKEN)
        )
        .await,
        404
    );
    assert_eq!(
        get(format!("{public}/metrics"), Some(harness::ADMIN_TOKEN)).await,
        404
    );
    assert_eq!(get(format!("{public}/healthz"), None).await, 200);
    // The admin listener does, with the right tokens only.
    assert_eq!(
        get(format!("{admin}/admin/tenants"), Some(harness::ADMIN_TOKEN)).await,
        200
    );
    assert_eq!(
        get(format!("{admin}/admin/tenants"), Some("scraper-token")).await,
        401
    );
    assert_eq!(get(format!("{admin}/metrics"), None).await, 401);
    assert_eq!(
        get(format!("{admin}/metrics"), Some("scraper-token")).await,
        200
    );
    assert_eq!(
        get(format!("{admin}/metrics"), Some(harness::ADMIN_TOKEN)).await,
        200
    );
    assert_eq!(get(format!("{admin}/v1/models"), None).await, 404);
    assert_eq!(get(format!("{admin}/healthz"), None).await, 200);
    // The configured metrics token is not logged.
    assert!(
        !gateway.log().contains("scraper-token"),
        "{}",
        gateway.log()
    );
}

#[tokio::test]
async fn metrics_on_the_public_listener_need_a_token() {
    let gateway = start(&harness::billing(0))
        .await
        .expect("the gateway starts");
    let metrics = gateway
        .http
        .get(format!("{}/metrics", gateway.url))
        .send()
        .await
        .expect("an answer");
    assert_eq!(metrics.status(), 401, "tenant names are not public");
    assert!(
        gateway.metrics().await.contains("# EOF"),
        "the admin token opens them"
    );
}
