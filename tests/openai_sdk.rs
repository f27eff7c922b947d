//! End-to-end: the official `openai` Python SDK, changing only base URL and key, does a chat and a
//! stream through the gateway (tests/sdk/openai_chat.py).

mod harness;

use std::path::Path;
use std::time::Duration;

use harness::{billing, channel, simulator, start};

#[tokio::test]
async fn the_official_python_sdk_chats_and_streams() {
    let sim = simulator().await;
    let gateway = start(&format!(
        "{}{}",
        billing(1_000_000),
        channel("primary", &sim, 1)
    ))
    .await
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/sdk/openai_chat.py");
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("python3")
            .arg(&script)
            .env("OPENAI_BASE_URL", format!("{}/v1", gateway.url))
            .env("OPENAI_API_KEY", &gateway.key)
            .output(),
    )
    .await
    .expect("the SDK script finishes within 60 s")
    .expect("python3 runs (the openai package is installed by .ci/run: pip install -r tests/sdk/requirements.txt)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let results: serde_json::Value =
        serde_json::from_str(stdout.trim()).expect("the script prints JSON");
    assert_eq!(results["chat"], "Echo: hello from the sdk");
    assert_eq!(results["chat_model"], "sim-model");
    assert_eq!(results["chat_usage_total"], 4 + 5);
    assert_eq!(results["stream"], "Echo: stream please");
    assert_eq!(results["stream_usage_total"], 2 + 3);
    assert_eq!(results["error_status"], 404);
    assert_eq!(sim.calls(), 2);
}
