//! The load benchmark: in one run, the simulator as a fast upstream, a bare reverse proxy (plain
//! hyper forwarding: no auth, no plugins) as the baseline, and `tollgate serve` with the real path
//! on (auth, router + translator + billing plugins, holds, ledger writes), each driven with the same
//! load at several concurrencies, non-stream and stream, with 1 KB, 16 KB and 128 KB request
//! bodies. Prints req/s; p50, p90 and p99 latency and the p50/p99 added over going direct; stream
//! time to first byte; the CPU time per request and peak RSS of the proxy processes; and the
//! throughput ratio against the bare proxy.
//!
//! Run: `cargo bench -p tollgate --bench load` (see `--help` for concurrencies, sizes, duration,
//! `--target NAME=URL[,HEADER=VALUE]` to measure another gateway in the same run, and
//! `--gateway NAME=BINARY` to measure another build of tollgate beside this one, `--rounds N` for
//! medians over N rounds).

#![expect(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tollgate_simulator::Simulator;

const HELP: &str = "cargo bench -p tollgate --bench load -- [options]
  --concurrency 1,32,256    concurrent clients per run
  --sizes 1,16,128          request body sizes, KiB
  --seconds 2               measured time per run (after a short warm-up)
  --modes whole,stream      non-stream answers and/or streams
  --rounds 1                measure every cell this many times, all targets in turn each round,
                            and print each figure's median (errors summed)
  --target NAME=URL[,HEADER=VALUE]
                            another OpenAI-compatible endpoint (its chat-completions URL) to
                            measure beside the others, with the header carrying its key
  --gateway NAME=BINARY     another tollgate binary (a build of another commit) started like this
                            one and measured right after it in every cell: A/B of two builds in
                            one run, where run-to-run drift of the machine would hide a few %
  --ledger-sync-batch       also start this build with `server.ledger_sync = \"batch\"` (named
                            tollgate-batch) and measure it right after the default one
  --unauthenticated N       instead of the matrix: open N connections to each tollgate build that
                            start a request head and never finish it, then close them; prints
                            each gateway's RSS before, while held and 2 s after
  --channels 1              channels configured in every tollgate build, 20 models each; only the
                            last serves the measured model (per-request cost against deployment size)
  --streams N               instead of the matrix: hold N streams open through tollgate at once
                            (the upstream sending one chunk per second, for about half a minute)
                            and report the gateway's memory per open stream and any error";

/// One endpoint under load.
struct Target {
    name: String,
    url: String,
    header: Option<(String, String)>,
    /// The process serving it, for CPU and memory figures; `None` for external targets.
    pid: Option<u32>,
    /// The model name it routes.
    model: String,
}

struct Options {
    concurrency: Vec<usize>,
    sizes_kib: Vec<usize>,
    run: Duration,
    modes: Vec<bool>,
    /// Times every cell is measured; the medians are printed.
    rounds: usize,
    extra: Vec<Target>,
    /// Other tollgate builds to start: name and binary.
    gateways: Vec<(String, String)>,
    /// Also measure this build with its ledger log synced in batches.
    ledger_sync_batch: bool,
    streams: Option<usize>,
    unauthenticated: Option<usize>,
    /// Channels configured in every tollgate build (`--channels`).
    channels: usize,
}

fn options(args: &[String]) -> anyhow::Result<Options> {
    let mut options = Options {
        concurrency: vec![1, 32, 256],
        sizes_kib: vec![1, 16, 128],
        run: Duration::from_secs(2),
        modes: vec![false, true],
        rounds: 1,
        extra: Vec::new(),
        gateways: Vec::new(),
        ledger_sync_batch: false,
        streams: None,
        unauthenticated: None,
        channels: 1,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("a value after the flag");
        let list = |text: &str| -> anyhow::Result<Vec<usize>> {
            text.split(',')
                .map(|item| item.trim().parse().context("a number"))
                .collect()
        };
        match arg.as_str() {
            "--concurrency" => options.concurrency = list(value()?)?,
            "--sizes" => options.sizes_kib = list(value()?)?,
            "--seconds" => options.run = Duration::from_secs_f64(value()?.parse()?),
            "--modes" => {
                options.modes = value()?
                    .split(',')
                    .map(|mode| match mode {
                        "whole" => Ok(false),
                        "stream" => Ok(true),
                        other => bail!("unknown mode {other}"),
                    })
                    .collect::<anyhow::Result<_>>()?;
            }
            "--streams" => options.streams = Some(value()?.parse()?),
            "--channels" => options.channels = value()?.parse::<usize>()?.max(1),
            "--unauthenticated" => options.unauthenticated = Some(value()?.parse()?),
            "--ledger-sync-batch" => options.ledger_sync_batch = true,
            "--rounds" => options.rounds = value()?.parse::<usize>()?.max(1),
            "--target" => {
                let spec = value()?;
                let (name, rest) = spec.split_once('=').context("--target NAME=URL")?;
                let (url, header) = match rest.split_once(',') {
                    Some((url, header)) => {
                        let (key, value) = header.split_once('=').context("HEADER=VALUE")?;
                        (url, Some((key.to_owned(), value.to_owned())))
                    }
                    None => (rest, None),
                };
                options.extra.push(Target {
                    name: name.to_owned(),
                    url: url.to_owned(),
                    header,
                    pid: None,
                    model: "bench-model".to_owned(),
                });
            }
            "--gateway" => {
                let spec = value()?;
                let (name, binary) = spec.split_once('=').context("--gateway NAME=BINARY")?;
                options.gateways.push((name.to_owned(), binary.to_owned()));
            }
            "--help" | "-h" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            // cargo bench passes `--bench`.
            "--bench" => {}
            other => bail!("unknown argument {other}\n{HELP}"),
        }
    }
    Ok(options)
}

/// The bare proxy: forwards every request to the upstream with hyper and streams the answer back.
/// Runs in its own process (this binary, re-run with `--bare-proxy UPSTREAM`), so its CPU and
/// memory are measured apart from the load generator's.
async fn bare_proxy(upstream: &str) -> anyhow::Result<()> {
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let upstream: hyper::Uri = upstream.parse()?;
    let client: Client<_, http_body_util::combinators::BoxBody<bytes::Bytes, hyper::Error>> =
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build_http();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    println!("bare proxy listening on http://{}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let client = client.clone();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let client = client.clone();
                let upstream = upstream.clone();
                async move {
                    let (mut parts, body) = request.into_parts();
                    let path = parts
                        .uri
                        .path_and_query()
                        .map_or("/", |path| path.as_str())
                        .to_owned();
                    parts.uri = format!(
                        "{}://{}{path}",
                        upstream.scheme_str().unwrap_or("http"),
                        upstream
                            .authority()
                            .map_or("", |authority| authority.as_str())
                    )
                    .parse()
                    .expect("an upstream URI with a path is a URI");
                    let request = hyper::Request::from_parts(parts, body.boxed());
                    client.request(request).await
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Peak resident memory of a process, in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmHWM:").map(|kib| kib / 1024.0)
}

/// A `/proc/PID/status` figure, in KiB.
fn status_kib(pid: u32, field: &str) -> Option<f64> {
    proc_kib(pid, "status", field)
}

/// A figure of a `/proc/PID/FILE` made of `Field: N kB` lines, in KiB.
fn proc_kib(pid: u32, file: &str, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    let line = text.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident memory no other process or mapping shares: what the streams really cost. RSS counts
/// a shared page once per mapping, and every plugin instance maps its plugin's data image.
fn private_kib(pid: u32) -> Option<f64> {
    Some(
        proc_kib(pid, "smaps_rollup", "Private_Clean:")?
            + proc_kib(pid, "smaps_rollup", "Private_Dirty:")?,
    )
}

/// Proportional set size: each resident page divided by the number of mappings that share it.
/// The plugin's data image, mapped once per instance, counts once here, where RSS counts it per
/// instance.
fn proportional_kib(pid: u32) -> Option<f64> {
    proc_kib(pid, "smaps_rollup", "Pss:")
}

/// How long each held stream lasts: the upstream sends one chunk per second.
const HELD_STREAM_CHUNKS: usize = 30;

/// Holds `count` streams open through the gateway at once, the upstream sending one chunk per
/// second for about half a minute, and reports the gateway's memory per open stream (resident and
/// private) once all are open, then whether every stream ended complete.
async fn open_streams(
    simulator: &Simulator,
    client: &reqwest::Client,
    target: &Arc<Target>,
    count: usize,
) -> anyhow::Result<()> {
    let pid = target.pid.context("the gateway's pid")?;
    simulator.set_standing_fault(Some(tollgate_simulator::Fault {
        chunk_interval_ms: Some(1000),
        ..Default::default()
    }));
    // The simulator echoes the last message a word per chunk.
    let body = bytes::Bytes::from(
        json!({
            "model": target.model,
            "stream": true,
            "messages": [{"role": "user", "content": "word ".repeat(HELD_STREAM_CHUNKS)}],
        })
        .to_string(),
    );
    let idle_kib = status_kib(pid, "VmRSS:").context("the gateway's RSS")?;
    let idle_private_kib = private_kib(pid).context("the gateway's private memory")?;
    let idle_proportional_kib = proportional_kib(pid).context("the gateway's PSS")?;
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let (opened, mut first_chunks) = tokio::sync::mpsc::channel::<bool>(count.max(1));
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        let (client, target, opened, body) =
            (client.clone(), target.clone(), opened.clone(), body.clone());
        streams.push(tokio::spawn(async move {
            let mut request = client
                .post(&target.url)
                .header("content-type", "application/json")
                .body(body);
            if let Some((name, value)) = &target.header {
                request = request.header(name, value);
            }
            let response = match request.send().await {
                Ok(response) if response.status().is_success() => response,
                _ => {
                    let _ = opened.send(false).await;
                    return false;
                }
            };
            let mut body = response.bytes_stream();
            let first = matches!(body.next().await, Some(Ok(_)));
            let _ = opened.send(first).await;
            let mut complete = first;
            let mut tail = Vec::new();
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(bytes) => {
                        // The end of the body, however the network split it.
                        tail.extend_from_slice(&bytes);
                        tail.drain(..tail.len().saturating_sub(64));
                    }
                    Err(_) => complete = false,
                }
            }
            // An error mid-stream arrives as an error event, not as `[DONE]`.
            complete && String::from_utf8_lossy(&tail).contains("data: [DONE]")
        }));
    }
    drop(opened);
    let mut open = 0;
    let mut failed = 0;
    while open + failed < count {
        match tokio::time::timeout(Duration::from_secs(120), first_chunks.recv()).await {
            Ok(Some(true)) => open += 1,
            Ok(Some(false)) => failed += 1,
            Ok(None) | Err(_) => break,
        }
    }
    let opening = started.elapsed();
    // Let the gateway settle (allocator, pending writes) before reading its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held_kib = status_kib(pid, "VmRSS:").context("the gateway's RSS")?;
    let held_private_kib = private_kib(pid).context("the gateway's private memory")?;
    let held_proportional_kib = proportional_kib(pid).context("the gateway's PSS")?;
    simulator.set_standing_fault(None);
    let mut completed = 0;
    for stream in streams {
        completed += usize::from(stream.await.unwrap_or(false));
    }
    let cpu = match (cpu_before, cpu_seconds(pid)) {
        (Some(before), Some(after)) => format!("{:.0} µs", (after - before) * 1e6 / count as f64),
        _ => "-".to_owned(),
    };
    println!(
        "{count} streams held open at once through tollgate, one upstream chunk per second: {open} opened in {:.1} s, {failed} failed to open, {completed} ended complete ([DONE]) after {:.0} s",
        opening.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let per_stream = |held: f64, idle: f64| (held - idle) / open.max(1) as f64;
    println!(
        "gateway RSS {:.1} MiB idle, {:.1} MiB with them open: {:.1} KiB per open stream ({:.1} KiB proportional (PSS), {:.1} KiB private, not shared with other mappings); CPU per stream {cpu}",
        idle_kib / 1024.0,
        held_kib / 1024.0,
        per_stream(held_kib, idle_kib),
        per_stream(held_proportional_kib, idle_proportional_kib),
        per_stream(held_private_kib, idle_private_kib)
    );
    Ok(())
}

/// Opens `count` connections to a gateway that send part of a request head and nothing more (the
/// gateway keeps at most `server.max_unauthenticated_connections` of them), then closes them all;
/// prints its RSS before, while they are held, and 2 s after they closed: whether the memory of a
/// burst that came and went is given back.
async fn hold_unauthenticated(target: &Target, count: usize) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let pid = target.pid.context("the gateway's pid")?;
    let address = target
        .url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .context("the gateway's address")?
        .to_owned();
    let rss_mib = || status_kib(pid, "VmRSS:").map_or(f64::NAN, |kib| kib / 1024.0);
    let before = rss_mib();
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let Ok(mut tcp) = tokio::net::TcpStream::connect(&address).await else {
            continue;
        };
        if tcp
            .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
            .await
            .is_ok()
        {
            held.push(tcp);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let holding = rss_mib();
    drop(held);
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "{:<11} {count} unauthenticated connections: RSS {before:.1} MiB before, {holding:.1} MiB while held, {:.1} MiB 2 s after they closed",
        target.name,
        rss_mib()
    );
    Ok(())
}

/// What one run measured.
struct Run {
    requests: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    first_bytes: Vec<Duration>,
    cpu_seconds: Option<f64>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

/// One target's figures in one cell, latencies in µs; over several rounds, each figure's median
/// on its own (errors summed).
#[derive(Clone, Copy)]
struct Figures {
    rate: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    /// Over going direct in the same round.
    added_p50: f64,
    added_p99: f64,
    first_byte_p50: f64,
    cpu_per_request: Option<f64>,
    errors: usize,
}

impl Figures {
    fn of(run: &Run, direct: Option<&Figures>) -> Self {
        let p50 = micros(percentile(&run.latencies, 0.5));
        let p99 = micros(percentile(&run.latencies, 0.99));
        Self {
            rate: run.requests as f64 / run.elapsed.as_secs_f64(),
            p50,
            p90: micros(percentile(&run.latencies, 0.9)),
            p99,
            added_p50: direct.map_or(0.0, |direct| p50 - direct.p50),
            added_p99: direct.map_or(0.0, |direct| p99 - direct.p99),
            first_byte_p50: micros(percentile(&run.first_bytes, 0.5)),
            cpu_per_request: run
                .cpu_seconds
                .map(|seconds| seconds * 1e6 / run.requests.max(1) as f64),
            errors: run.errors,
        }
    }

    fn median(runs: &[Figures]) -> Self {
        let median = |figure: fn(&Figures) -> f64| {
            let mut values: Vec<f64> = runs.iter().map(figure).collect();
            values.sort_by(f64::total_cmp);
            values.get(values.len() / 2).copied().unwrap_or_default()
        };
        Self {
            rate: median(|f| f.rate),
            p50: median(|f| f.p50),
            p90: median(|f| f.p90),
            p99: median(|f| f.p99),
            added_p50: median(|f| f.added_p50),
            added_p99: median(|f| f.added_p99),
            first_byte_p50: median(|f| f.first_byte_p50),
            cpu_per_request: runs
                .iter()
                .all(|f| f.cpu_per_request.is_some())
                .then(|| median(|f| f.cpu_per_request.unwrap_or_default())),
            errors: runs.iter().map(|f| f.errors).sum(),
        }
    }
}

/// A chat body of about `kib` KiB: the bulk in an earlier turn (a long context), a short last
/// question, so the answer stays short whatever the size.
fn chat_body(model: &str, kib: usize, stream: bool) -> bytes::Bytes {
    let filler = "lorem ipsum dolor sit amet ".repeat(kib * 1024 / 27);
    let body = json!({
        "model": model,
        "stream": stream,
        "messages": [
            {"role": "user", "content": filler},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "Summarize that in one word."},
        ],
    });
    bytes::Bytes::from(body.to_string())
}

async fn one_call(
    client: &reqwest::Client,
    target: &Target,
    body: bytes::Bytes,
    stream: bool,
) -> anyhow::Result<(Duration, Option<Duration>)> {
    let mut request = client
        .post(&target.url)
        .header("content-type", "application/json")
        .body(body);
    if let Some((name, value)) = &target.header {
        request = request.header(name, value);
    }
    let started = Instant::now();
    let response = request.send().await?;
    if !response.status().is_success() {
        bail!("{} answered {}", target.name, response.status());
    }
    let mut body = response.bytes_stream();
    let mut first = None;
    while let Some(chunk) = body.next().await {
        chunk?;
        if stream && first.is_none() {
            first = Some(started.elapsed());
        }
    }
    Ok((started.elapsed(), first))
}

async fn drive(
    client: &reqwest::Client,
    target: Arc<Target>,
    concurrency: usize,
    kib: usize,
    stream: bool,
    run: Duration,
) -> Run {
    let body = chat_body(&target.model, kib, stream);
    // Warm-up: connections open, caches fill; not measured.
    let measure_from = Instant::now() + Duration::from_millis(300);
    let stop_at = measure_from + run;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, target, body) = (client.clone(), target.clone(), body.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut first_bytes = Vec::new();
            let mut errors = 0;
            loop {
                let now = Instant::now();
                if now >= stop_at {
                    break;
                }
                let outcome = one_call(&client, &target, body.clone(), stream).await;
                if now < measure_from {
                    continue;
                }
                match outcome {
                    Ok((latency, first)) => {
                        latencies.push(latency);
                        first_bytes.extend(first);
                    }
                    Err(_) => errors += 1,
                }
            }
            (latencies, first_bytes, errors)
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu_before = target.pid.and_then(cpu_seconds);
    let mut run_result = Run {
        requests: 0,
        errors: 0,
        elapsed: run,
        latencies: Vec::new(),
        first_bytes: Vec::new(),
        cpu_seconds: None,
    };
    for worker in workers {
        let (latencies, first_bytes, errors) = worker.await.expect("a worker ends");
        run_result.latencies.extend(latencies);
        run_result.first_bytes.extend(first_bytes);
        run_result.errors += errors;
    }
    run_result.elapsed = measure_from.elapsed();
    run_result.cpu_seconds = match (cpu_before, target.pid.and_then(cpu_seconds)) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    run_result.requests = run_result.latencies.len();
    run_result.latencies.sort();
    run_result.first_bytes.sort();
    run_result
}

/// `count` channel tables of 20 models each on the simulator, as a relay with many upstream
/// accounts configures them: only the last serves `bench-model`, so a request's route is the same
/// whatever the count and only the deployment's size varies.
fn channel_tables(simulator: &Simulator, count: usize) -> String {
    const MODELS_PER_CHANNEL: usize = 20;
    (0..count)
        .map(|channel| {
            let last = channel + 1 == count;
            let models: Vec<String> = (0..MODELS_PER_CHANNEL)
                .map(|model| {
                    if last && model == 0 {
                        r#""bench-model" = "sim-model""#.to_owned()
                    } else {
                        format!(r#""filler-{channel}-{model}" = "sim-model""#)
                    }
                })
                .collect();
            format!(
                "\n[[channels]]\nname = \"sim-{channel}\"\nprotocol = \"openai\"\nbase_url = \"{}\"\n\
                 priority = 1\nmodels = {{ {} }}\n",
                simulator.openai_base_url(),
                models.join(", ")
            )
        })
        .collect()
}

/// Starts a tollgate binary with its own data directory under `dir`, named `name` in the figures.
async fn start_tollgate(
    simulator: &Simulator,
    dir: &std::path::Path,
    max_instances: usize,
    (name, binary): (&str, &str),
    server_lines: &str,
    channels: usize,
) -> anyhow::Result<(tokio::process::Child, Target)> {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = "127.0.0.1:0"
data_dir = "{data}"
{server_lines}

[plugins]
max_instances = {max_instances}

[bindings.billing]
plugin = "price-table"
config = {{ credit_limit_micros = 1000000000000, models = {{ "bench-model" = {{ input = 150000, output = 600000 }} }} }}
{channels}"#,
            data = dir.join("data").display(),
            channels = channel_tables(simulator, channels)
        ),
    )?;
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
    let url = first_url(&mut child, "tollgate listening on ").await?;
    let pid = child.id();
    Ok((
        child,
        Target {
            name: name.to_owned(),
            url: format!("{url}/v1/chat/completions"),
            header: Some(("authorization".to_owned(), format!("Bearer {key}"))),
            pid,
            model: "bench-model".to_owned(),
        },
    ))
}

async fn first_url(child: &mut tokio::process::Child, prefix: &str) -> anyhow::Result<String> {
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    loop {
        let line = lines.next_line().await?.context("the process exited")?;
        if let Some(url) = line.strip_prefix(prefix) {
            // Keep draining, so the process never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return Ok(url.to_owned());
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, upstream] = args.as_slice()
        && flag == "--bare-proxy"
    {
        return bare_proxy(upstream).await;
    }
    let options = options(&args)?;
    let simulator = Simulator::start(([127, 0, 0, 1], 0).into(), Vec::new()).await?;
    simulator.forget_contents();
    let dir = tempfile::tempdir()?;
    // Each open stream holds a translator instance; other requests need a few more.
    let max_instances = options.streams.map_or(1000, |streams| streams + 1000);
    let this_build = ("tollgate", env!("CARGO_BIN_EXE_tollgate"));
    let (_gateway, tollgate) = start_tollgate(
        &simulator,
        dir.path(),
        max_instances,
        this_build,
        "",
        options.channels,
    )
    .await?;
    // Kept until the end: dropping a child kills it.
    let mut other_gateways = Vec::new();
    let mut other_builds = Vec::new();
    let mut variants: Vec<(&str, &str, &str)> = Vec::new();
    if options.ledger_sync_batch {
        variants.push(("tollgate-batch", this_build.1, "ledger_sync = \"batch\""));
    }
    for (name, binary) in &options.gateways {
        variants.push((name, binary, ""));
    }
    for (name, binary, server_lines) in variants {
        let (gateway, target) = start_tollgate(
            &simulator,
            dir.path(),
            max_instances,
            (name, binary),
            server_lines,
            options.channels,
        )
        .await
        .with_context(|| format!("starting {binary}"))?;
        other_gateways.push(gateway);
        other_builds.push(target);
    }
    let mut proxy = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--bare-proxy", &format!("http://{}", simulator.address())])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let proxy_url = first_url(&mut proxy, "bare proxy listening on ").await?;
    let mut targets = vec![
        Target {
            name: "direct".to_owned(),
            url: format!("{}/chat/completions", simulator.openai_base_url()),
            header: None,
            pid: None,
            model: "sim-model".to_owned(),
        },
        Target {
            name: "bare-proxy".to_owned(),
            url: format!("{proxy_url}/v1/chat/completions"),
            header: None,
            pid: proxy.id(),
            model: "sim-model".to_owned(),
        },
        tollgate,
    ];
    targets.extend(other_builds);
    targets.extend(options.extra);
    let targets: Vec<Arc<Target>> = targets.into_iter().map(Arc::new).collect();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .http1_only()
        .tcp_nodelay(true)
        .build()?;
    if let Some(count) = options.unauthenticated {
        for target in targets.iter().filter(|target| target.pid.is_some()) {
            if target.name != "bare-proxy" {
                hold_unauthenticated(target, count).await?;
            }
        }
        return Ok(());
    }
    if let Some(count) = options.streams {
        let tollgate = targets
            .iter()
            .find(|target| target.name == "tollgate")
            .context("the tollgate target")?;
        return open_streams(&simulator, &client, tollgate, count).await;
    }
    println!(
        "load benchmark: {} cores, {:.1} s per run after 0.3 s warm-up; latency and stream first byte in µs; added = over direct",
        std::thread::available_parallelism().map_or(1, usize::from),
        options.run.as_secs_f64()
    );
    println!(
        "{:<11} {:<6} {:>4} {:>5} {:>8} {:>7} {:>7} {:>7} {:>8} {:>8} {:>8} {:>9} {:>7} {:>6}",
        "target",
        "mode",
        "conc",
        "KiB",
        "req/s",
        "p50",
        "p90",
        "p99",
        "+p50",
        "+p99",
        "ttfb50",
        "cpu µs/rq",
        "vs bare",
        "errors"
    );
    for &stream in &options.modes {
        for &kib in &options.sizes_kib {
            for &concurrency in &options.concurrency {
                // Every round drives every target once, in order, so drift of the machine
                // spreads over all of them alike.
                let mut rounds: Vec<Vec<Figures>> = vec![Vec::new(); targets.len()];
                for _ in 0..options.rounds {
                    let mut direct = None;
                    for (index, target) in targets.iter().enumerate() {
                        let run = drive(
                            &client,
                            target.clone(),
                            concurrency,
                            kib,
                            stream,
                            options.run,
                        )
                        .await;
                        let figures = Figures::of(&run, direct.as_ref());
                        if target.name == "direct" {
                            direct = Some(figures);
                        }
                        rounds[index].push(figures);
                    }
                }
                let medians: Vec<Figures> =
                    rounds.iter().map(|runs| Figures::median(runs)).collect();
                let bare_rate = targets
                    .iter()
                    .zip(&medians)
                    .find(|(target, _)| target.name == "bare-proxy")
                    .map(|(_, figures)| figures.rate);
                for (target, figures) in targets.iter().zip(&medians) {
                    let shown = |value: Option<f64>| {
                        value.map_or_else(|| "-".to_owned(), |value| format!("{value:.0}"))
                    };
                    let versus = bare_rate
                        .map(|bare| format!("{:.0} %", figures.rate / bare * 100.0))
                        .unwrap_or_else(|| "-".to_owned());
                    println!(
                        "{:<11} {:<6} {:>4} {:>5} {:>8.0} {:>7.0} {:>7.0} {:>7.0} {:>8.0} {:>8.0} {:>8} {:>9} {:>7} {:>6}",
                        target.name,
                        if stream { "stream" } else { "whole" },
                        concurrency,
                        kib,
                        figures.rate,
                        figures.p50,
                        figures.p90,
                        figures.p99,
                        figures.added_p50,
                        figures.added_p99,
                        shown(stream.then_some(figures.first_byte_p50)),
                        shown(figures.cpu_per_request),
                        versus,
                        figures.errors,
                    );
                }
            }
        }
    }
    for target in &targets {
        if let Some(rss) = target.pid.and_then(peak_rss_mib) {
            println!("peak RSS of {}: {rss:.1} MiB", target.name);
        }
    }
    Ok(())
}
