//! Per-request overhead of the gateway over calling the upstream directly: sequential requests
//! (concurrency 1) against the simulator, direct and through `tollgate serve` with the shipped
//! router, translator and billing plugins and ledger writes on. Prints p50/p90/p99 latency for each
//! and the difference, for non-stream answers and for stream time to first chunk.
//!
//! Run: `cargo bench -p tollgate --bench overhead` (optionally `-- --requests 2000`).
//! The full load benchmark (concurrency, body sizes, CPU, RSS, bare-proxy baseline) is issue #10.

#![expect(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tollgate_simulator::Simulator;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

struct Summary {
    p50: Duration,
    p90: Duration,
    p99: Duration,
}

fn summarize(mut samples: Vec<Duration>) -> Summary {
    samples.sort();
    Summary {
        p50: percentile(&samples, 0.50),
        p90: percentile(&samples, 0.90),
        p99: percentile(&samples, 0.99),
    }
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

/// Time of one whole non-stream call, or of the first stream chunk.
async fn measure(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: &Value,
    stream: bool,
) -> anyhow::Result<Duration> {
    let mut request = client.post(url).json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let started = Instant::now();
    let response = request.send().await?;
    if !response.status().is_success() {
        bail!("{url} answered {}", response.status());
    }
    if !stream {
        response.bytes().await?;
        return Ok(started.elapsed());
    }
    let mut body = response.bytes_stream();
    let first = body.next().await.context("a first chunk")??;
    let elapsed = started.elapsed();
    anyhow::ensure!(first.starts_with(b"data: "), "an SSE frame");
    while body.next().await.is_some() {}
    Ok(elapsed)
}

async fn series(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: &Value,
    stream: bool,
    count: usize,
) -> anyhow::Result<Summary> {
    for _ in 0..count / 10 {
        measure(client, url, key, body, stream).await?;
    }
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        samples.push(measure(client, url, key, body, stream).await?);
    }
    Ok(summarize(samples))
}

fn report(name: &str, direct: &Summary, gateway: &Summary) {
    println!(
        "{name:<28} direct p50 {:>7.0} µs p90 {:>7.0} µs p99 {:>7.0} µs | gateway p50 {:>7.0} µs p90 {:>7.0} µs p99 {:>7.0} µs | added p50 {:>6.0} µs p99 {:>6.0} µs",
        micros(direct.p50),
        micros(direct.p90),
        micros(direct.p99),
        micros(gateway.p50),
        micros(gateway.p90),
        micros(gateway.p99),
        micros(gateway.p50) - micros(direct.p50),
        micros(gateway.p99) - micros(direct.p99),
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let count = args
        .iter()
        .position(|arg| arg == "--requests")
        .and_then(|index| args.get(index + 1))
        .and_then(|value| value.parse().ok())
        .unwrap_or(500);
    let simulator = Simulator::start(([127, 0, 0, 1], 0).into(), Vec::new()).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = "127.0.0.1:0"
data_dir = "{data}"

[bindings.billing]
plugin = "price-table"
config = {{ credit_limit_micros = 1000000000000, models = {{ "bench-model" = {{ input = 150000, output = 600000 }} }} }}

[[channels]]
name = "sim"
protocol = "openai"
base_url = "{base}"
priority = 1
models = {{ "bench-model" = "sim-model" }}
"#,
            data = dir.path().join("data").display(),
            base = simulator.openai_base_url()
        ),
    )?;
    let binary = env!("CARGO_BIN_EXE_tollgate");
    let config_arg = config.to_str().context("utf-8 path")?;
    std::process::Command::new(binary)
        .args(["tenant", "create", "bench", "--config", config_arg])
        .output()?;
    let key_output = std::process::Command::new(binary)
        .args(["key", "create", "--tenant", "bench", "--config", config_arg])
        .output()?;
    let key = String::from_utf8(key_output.stdout)?
        .lines()
        .last()
        .context("a key")?
        .to_owned();
    let mut child = tokio::process::Command::new(binary)
        .args(["serve", "--config", config_arg])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let gateway_url = loop {
        let line = lines.next_line().await?.context("the gateway exited")?;
        if let Some(url) = line.strip_prefix("tollgate listening on ") {
            break url.to_owned();
        }
    };
    let client = reqwest::Client::new();
    let text = "lorem ipsum dolor sit amet ".repeat(1024 / 27);
    let body = |model: &str, stream: bool| json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]});
    let direct_url = format!("{}/chat/completions", simulator.openai_base_url());
    let gateway_url = format!("{gateway_url}/v1/chat/completions");
    println!(
        "{count} sequential requests each, ~1 KB chat bodies, loopback, after {} warm-up requests",
        count / 10
    );
    let direct = series(
        &client,
        &direct_url,
        None,
        &body("sim-model", false),
        false,
        count,
    )
    .await?;
    let through = series(
        &client,
        &gateway_url,
        Some(&key),
        &body("bench-model", false),
        false,
        count,
    )
    .await?;
    report("non-stream (whole answer)", &direct, &through);
    let direct = series(
        &client,
        &direct_url,
        None,
        &body("sim-model", true),
        true,
        count,
    )
    .await?;
    let through = series(
        &client,
        &gateway_url,
        Some(&key),
        &body("bench-model", true),
        true,
        count,
    )
    .await?;
    report("stream (first chunk)", &direct, &through);
    child.start_kill()?;
    Ok(())
}
