//! Hostile clients and leaky upstreams: no channel secret leaves the gateway, whatever an upstream
//! echoes.

mod harness;

use harness::{SseReader, chat, start};
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
