//! Test harness: starts the real `tollgate` binary on 127.0.0.1 port 0 with its own data directory,
//! against an in-process upstream simulator, and kills it on drop.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tollgate_simulator::Simulator;

pub mod translators;

/// The key the simulator demands and the gateway reads from `TEST_UPSTREAM_KEY`.
pub const UPSTREAM_KEY: &str = "sk-sim-upstream-secret";
/// A second accepted upstream key, which the gateway reads from `TEST_UPSTREAM_KEY_2`.
pub const SECOND_UPSTREAM_KEY: &str = "sk-sim-upstream-second";
/// The master key that seals API channels' secrets (64 hex digits).
pub const MASTER_KEY: &str = "8f3c2a1b9d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a";
/// The admin token the gateway is started with.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Prices of `test-model` in the default billing config, micro-units per million tokens.
pub const INPUT_PRICE: u64 = 150_000;
pub const OUTPUT_PRICE: u64 = 600_000;

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_tollgate")
}

/// A wasm test plugin built by `host/build.rs`.
pub fn test_plugin(file: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/guests/wasm32-wasip2/release")
        .join(file);
    assert!(
        path.exists(),
        "{} is missing: build the guests with `cargo build -p tollgate` (host/build.rs builds them)",
        path.display()
    );
    path
}

/// A component's bytes with every `tollgate:plugin` interface version rewritten (same length, so
/// the binary stays well-formed): a plugin built against a contract this host does not serve.
pub fn built_against(component: &[u8], version: &[u8; 5]) -> Vec<u8> {
    let needle = b"@0.1.2";
    let mut bytes = component.to_vec();
    let mut at = 0;
    while let Some(found) = bytes[at..]
        .windows(needle.len())
        .position(|window| window == needle)
    {
        let start = at + found + 1;
        bytes[start..start + 5].copy_from_slice(version);
        at = start + 5;
    }
    bytes
}

/// Starts a simulator demanding [`UPSTREAM_KEY`].
pub async fn simulator() -> Simulator {
    Simulator::start(
        ([127, 0, 0, 1], 0).into(),
        vec![UPSTREAM_KEY.to_owned(), SECOND_UPSTREAM_KEY.to_owned()],
    )
    .await
    .expect("the simulator binds a loopback port")
}

/// One channel table for a simulator serving `test-model` (and `test-embedding`).
pub fn channel(name: &str, simulator: &Simulator, priority: u32) -> String {
    channel_with(
        name,
        simulator,
        priority,
        r#"api_key_env = ["TEST_UPSTREAM_KEY"]"#,
    )
}

/// A channel table with extra lines (which must set `api_key_env`).
pub fn channel_with(name: &str, simulator: &Simulator, priority: u32, extra: &str) -> String {
    format!(
        r#"
[[channels]]
name = "{name}"
protocol = "openai"
base_url = "{url}"
priority = {priority}
models = {{ "test-model" = "sim-model", "test-embedding" = "sim-embedding" }}
{extra}
"#,
        url = simulator.openai_base_url()
    )
}

/// The billing binding every test uses unless it needs another: prices for the test models and a
/// credit line, so tenants made by the CLI (balance 0) can call.
pub fn billing(credit_limit_micros: u64) -> String {
    format!(
        r#"
[bindings.billing]
plugin = "price-table"
config = {{ credit_limit_micros = {credit_limit_micros}, models = {{ "test-model" = {{ input = {INPUT_PRICE}, output = {OUTPUT_PRICE} }}, "test-embedding" = {{ input = 20000, output = 0 }} }} }}
"#
    )
}

/// A running gateway.
pub struct Gateway {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Where the admin API and `/metrics` answer: `url`, or the `server.admin_listen` address.
    pub admin_url: String,
    /// An API key of tenant `acme`.
    pub key: String,
    /// The configuration file.
    pub config: PathBuf,
    /// The data directory (deleted on drop).
    pub data_dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Runs a `tollgate` CLI command to completion.
pub fn cli(args: &[&str]) -> anyhow::Result<std::process::Output> {
    std::process::Command::new(binary())
        .args(args)
        .output()
        .context("running the tollgate CLI")
}

/// Writes the config (listen on port 0, own data dir, shared plugin cache, then `body`, whose first
/// lines may still set `[plugins]` keys since that table comes last), creates
/// tenant `acme` and a key with the CLI, and starts `tollgate serve`.
pub async fn start(body: &str) -> anyhow::Result<Gateway> {
    start_with_server("", body).await
}

/// Writes `dir/tollgate.toml`: the `[server]` table with `server`'s lines and a data directory in
/// `dir`, then `[plugins]` with the shared plugin cache, then `body` (whose first lines may still
/// set `[plugins]` keys). Returns its path.
pub fn write_config(dir: &Path, server: &str, body: &str) -> anyhow::Result<PathBuf> {
    let config = dir.join("tollgate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\n{server}data_dir = \"{}\"\n\n[plugins]\ncache_dir = \"{}\"\n{body}",
            dir.join("data").display(),
            Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join("plugin-cache")
                .display()
        ),
    )?;
    Ok(config)
}

/// [`start`], with `server` (lines of `[server]` keys) added to the `[server]` table.
pub async fn start_with_server(server: &str, body: &str) -> anyhow::Result<Gateway> {
    start_beside(&[], server, body).await
}

/// [`start_with_server`], with `files` (name, contents) written beside the configuration file.
pub async fn start_beside(
    files: &[(&str, &[u8])],
    server: &str,
    body: &str,
) -> anyhow::Result<Gateway> {
    let data_dir = tempfile::tempdir()?;
    for (name, contents) in files {
        std::fs::write(data_dir.path().join(name), contents)?;
    }
    let config = write_config(
        data_dir.path(),
        &format!("listen = \"127.0.0.1:0\"\n{server}"),
        body,
    )?;
    let config_arg = config.to_str().context("utf-8 temp path")?;
    let created = cli(&["tenant", "create", "acme", "--config", config_arg])?;
    if !created.status.success() {
        bail!(
            "tenant create failed: {}",
            String::from_utf8_lossy(&created.stderr)
        );
    }
    let key_out = cli(&["key", "create", "--tenant", "acme", "--config", config_arg])?;
    if !key_out.status.success() {
        bail!(
            "key create failed: {}",
            String::from_utf8_lossy(&key_out.stderr)
        );
    }
    let key = String::from_utf8(key_out.stdout)?
        .lines()
        .last()
        .context("key create prints the secret last")?
        .to_owned();
    let (child, url, admin_url) = serve(&config, &data_dir.path().join("gateway.log")).await?;
    Ok(Gateway {
        child,
        url,
        admin_url,
        key,
        config,
        data_dir,
        http: reqwest::Client::new(),
    })
}

/// Starts `tollgate serve` on a config and returns it with the URL it listens on.
/// The admin URL is the `server.admin_listen` one when the gateway announces it, else the URL.
async fn serve(config: &Path, log: &Path) -> anyhow::Result<(Child, String, String)> {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut child = Command::new(binary())
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
        .env("TEST_UPSTREAM_KEY_2", SECOND_UPSTREAM_KEY)
        .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("TOLLGATE_MASTER_KEY", MASTER_KEY)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("piped stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut admin_url = None;
    let url = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(url) = line.strip_prefix("tollgate admin listening on ") {
                admin_url = Some(url.to_owned());
            }
            if let Some(url) = line.strip_prefix("tollgate listening on ") {
                return Ok(url.to_owned());
            }
        }
        bail!("the gateway exited before listening")
    })
    .await
    .context("the gateway did not start listening within 120 s")??;
    // Keep draining stdout so the gateway never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let admin_url = admin_url.unwrap_or_else(|| url.clone());
    Ok((child, url, admin_url))
}

impl Gateway {
    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the gateway runs until dropped")
    }

    /// Asks the gateway to stop (SIGTERM), as a service manager does.
    pub fn terminate(&self) {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "SIGTERM was delivered");
    }

    /// Waits for the gateway's process to end, at most `within`.
    pub async fn exit_status(&mut self, within: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("the gateway exits in time")
            .expect("its exit status")
    }

    /// Kills the gateway with SIGKILL (no shutdown, no flush) and starts it again on the same data
    /// directory; `url` changes.
    pub async fn crash_and_restart(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        let (child, url, admin_url) =
            serve(&self.config, &self.data_dir.path().join("gateway.log")).await?;
        self.child = child;
        self.url = url;
        self.admin_url = admin_url;
        Ok(())
    }
}

/// A parsed response.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub json: Value,
}

impl Gateway {
    /// The gateway's log so far, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// POSTs a chat completion with another key than the tenant's.
    pub async fn chat_as(&self, key: &str, body: &Value) -> Answer {
        let response = self
            .http
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .expect("the gateway answers");
        Answer::read(response).await
    }

    /// POSTs JSON with the tenant key and extra headers.
    pub async fn post(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Answer {
        let mut request = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.key)
            .json(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("the gateway answers");
        Answer::read(response).await
    }

    /// POSTs a chat body to `/v1/chat/completions` and hands back the response unread, for streams.
    pub async fn post_stream(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await
            .expect("the gateway answers")
    }

    /// The usage record of a request, from the admin API, or the trace endpoint's answer when it
    /// has none.
    async fn fetch_record(&self, request_id: &str) -> Answer {
        let response = self
            .http
            .get(format!("{}/admin/requests/{request_id}", self.admin_url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("the admin API answers");
        Answer::read(response).await
    }

    /// The usage record of a request, from the admin API.
    pub async fn record(&self, request_id: &str) -> Value {
        let answer = self.fetch_record(request_id).await;
        assert_eq!(
            answer.status, 200,
            "record of {request_id}: {}",
            answer.json
        );
        answer.json
    }

    /// Waits (bounded) until a request's record exists; streams write theirs after the last byte.
    pub async fn record_eventually(&self, request_id: &str) -> Value {
        for _ in 0..100 {
            let answer = self.fetch_record(request_id).await;
            if answer.status == 200 {
                return answer.json;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no record for {request_id} within 5 s");
    }
}

impl Answer {
    pub async fn read(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("a readable body");
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer {
            status,
            headers,
            json,
        }
    }

    pub fn request_id(&self) -> String {
        self.headers
            .get("x-request-id")
            .and_then(|value| value.to_str().ok())
            .expect("every response carries x-request-id")
            .to_owned()
    }

    /// Asserts an OpenAI-shaped error with this status and code.
    pub fn assert_error(&self, status: u16, code: Option<&str>) {
        assert_eq!(self.status, status, "body: {}", self.json);
        let error = &self.json["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "body: {}",
            self.json
        );
        assert!(error["type"].is_string(), "body: {}", self.json);
        assert_eq!(error["code"].as_str(), code, "body: {}", self.json);
    }
}

/// A chat body for `test-model`.
pub fn chat(text: &str) -> Value {
    serde_json::json!({"model": "test-model", "messages": [{"role": "user", "content": text}]})
}

/// Reads SSE `data:` payloads from a streaming response until it ends.
pub struct SseReader {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
        }
    }

    /// The next data payload, or `None` at the end of the body. Bounded by `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let data = frame
                    .trim_end()
                    .strip_prefix("data: ")
                    .expect("frames are data lines");
                return Some(data.to_owned());
            }
            let chunk = tokio::time::timeout(wait, self.body.next())
                .await
                .expect("the stream makes progress within the wait")?;
            self.buffer
                .push_str(std::str::from_utf8(&chunk.expect("body bytes")).expect("utf-8"));
        }
    }

    /// Every remaining payload.
    pub async fn rest(&mut self) -> Vec<String> {
        let mut payloads = Vec::new();
        while let Some(payload) = self.next(Duration::from_secs(20)).await {
            payloads.push(payload);
        }
        payloads
    }
}

/// A channel table of `protocol` at `url` with a models table (`"public" = "upstream"` pairs).
pub fn protocol_channel(
    name: &str,
    protocol: &str,
    url: &str,
    priority: u32,
    models: &str,
) -> String {
    format!(
        r#"
[[channels]]
name = "{name}"
protocol = "{protocol}"
base_url = "{url}"
priority = {priority}
models = {{ {models} }}
api_key_env = ["TEST_UPSTREAM_KEY"]
"#
    )
}

/// A channel table for the simulator's Anthropic API serving `test-model` as `claude-sim`.
pub fn anthropic_channel(name: &str, simulator: &Simulator, priority: u32) -> String {
    protocol_channel(
        name,
        "anthropic",
        &simulator.anthropic_base_url(),
        priority,
        r#""test-model" = "claude-sim""#,
    )
}

/// A channel table for the simulator's Gemini API serving `test-model` as `gemini-sim` and
/// `test-embedding` as `gemini-embed`.
pub fn gemini_channel(name: &str, simulator: &Simulator, priority: u32) -> String {
    protocol_channel(
        name,
        "gemini",
        &simulator.gemini_base_url(),
        priority,
        r#""test-model" = "gemini-sim", "test-embedding" = "gemini-embed""#,
    )
}

/// A function tool taking a `city`, in OpenAI's shape.
pub fn weather_tool(name: &str) -> Value {
    json!({"type": "function", "function": {
        "name": name,
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    }})
}

/// Streams a chat body; returns the parsed chunks (`[DONE]` as `Value::Null`) and the request id.
pub async fn stream_chat(gateway: &Gateway, mut body: Value) -> (Vec<Value>, String) {
    body["stream"] = json!(true);
    let response = gateway.post_stream(&body).await;
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let chunks = SseReader::new(response)
        .rest()
        .await
        .iter()
        .map(|payload| {
            if payload == "[DONE]" {
                Value::Null
            } else {
                serde_json::from_str(payload).expect("chunks are JSON")
            }
        })
        .collect();
    (chunks, request_id)
}

/// Every finish reason a stream's chunks carried.
pub fn finish_reasons(chunks: &[Value]) -> Vec<&str> {
    chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["finish_reason"].as_str())
        .collect()
}

/// The content text a stream's chunks carried.
pub fn streamed_content(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect()
}

impl Gateway {
    /// Calls the admin API with the admin token.
    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Answer {
        let mut request = self
            .http
            .request(method, format!("{}/admin{path}", self.admin_url))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        Answer::read(request.send().await.expect("the admin API answers")).await
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.admin_url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("metrics are text")
    }

    /// Uploads plugin bytes under a name.
    pub async fn upload_plugin(&self, name: &str, bytes: Vec<u8>) -> Answer {
        let response = self
            .http
            .post(format!("{}/admin/plugins?name={name}", self.admin_url))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/wasm")
            .body(bytes)
            .send()
            .await
            .expect("the admin API answers");
        Answer::read(response).await
    }
}

/// The same component with a custom section appended: another hash, the same behaviour, as a
/// rebuilt plugin version would be.
pub fn plugin_version(component: &[u8], label: &str) -> Vec<u8> {
    fn leb128(mut value: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"tollgate-test-version";
    let mut payload = Vec::new();
    leb128(name.len(), &mut payload);
    payload.extend_from_slice(name);
    payload.extend_from_slice(label.as_bytes());
    let mut bytes = component.to_vec();
    bytes.push(0);
    leb128(payload.len(), &mut bytes);
    bytes.extend_from_slice(&payload);
    bytes
}

/// Runs an official-SDK script from tests/sdk against the gateway, with the base URL and key in
/// the environment variables the `openai` and `anthropic` SDKs read; returns the JSON object it
/// printed.
pub async fn sdk_script(
    program: &str,
    script: &str,
    gateway: &Gateway,
    env: &[(&str, &str)],
) -> serde_json::Value {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/sdk");
    let script = sdk.join(script);
    // Python runs in the set-up's virtual environment, where the SDKs are.
    let program = match program {
        "python3" => sdk.join(".venv/bin/python3"),
        other => PathBuf::from(other),
    };
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(program)
            .arg(&script)
            .env("OPENAI_BASE_URL", format!("{}/v1", gateway.url))
            .env("OPENAI_API_KEY", &gateway.key)
            .env("ANTHROPIC_BASE_URL", &gateway.url)
            .env("ANTHROPIC_API_KEY", &gateway.key)
            .envs(env.iter().copied())
            .output(),
    )
    .await
    .expect("the SDK script finishes within 60 s")
    .expect("the interpreter runs (.ci/run installs the SDKs: scripts/setup.sh --with-test-deps)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{}: stdout: {stdout}\nstderr: {stderr}",
        script.display()
    );
    serde_json::from_str(stdout.trim()).expect("the script prints JSON")
}
