//! The upstream simulator: an HTTP server that speaks providers' wire formats deterministically
//! and injects faults on demand. It is the one stand-in in Tollgate's tests, benchmark and offline
//! demo.
//!
//! - `openai`: chat completions (streamed and not), embeddings, models — shapes from OpenAI's API
//!   reference and the `openai` Python SDK (`tests/fixtures/openai/SOURCES.md`).
//! - `anthropic`: the Messages API, as strict as Anthropic's reference
//!   (`tests/fixtures/anthropic/SOURCES.md`).
//! - `gemini`: `generateContent`, `streamGenerateContent?alt=sse` and `batchEmbedContents`, as
//!   strict as Google's reference (`tests/fixtures/gemini/SOURCES.md`).
//!
//! Answers are deterministic: the reply echoes the last user message, and token counts are
//! whitespace-separated words, so tests can compute expected usage.
//!
//! Faults are queued: each request to a model endpoint takes the next queued fault, if any.
//! In-process users call [`Simulator`] methods; the binary exposes the same over `/_sim/*`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, mpsc};

mod anthropic;
mod gemini;
mod openai;

/// One fault, applied to one upstream request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fault {
    /// Answer with this HTTP status and an OpenAI-shaped error body instead of an answer.
    pub status: Option<u16>,
    /// The `retry-after` header (seconds) to send with the status.
    pub retry_after_s: Option<u64>,
    /// Wait this long before sending the response headers.
    pub delay_ms: Option<u64>,
    /// Streams: stop after this many content chunks by breaking the connection.
    pub cut_after_chunks: Option<usize>,
    /// Whole answers: send the headers (with the full `content-length`) and half the body, then
    /// break the connection.
    pub cut_whole: bool,
    /// Answer as if the provider's safety filter blocked the prompt (Gemini: `promptFeedback`).
    pub safety_block: bool,
    /// Streams: end the body cleanly after this many chunks, mid-answer (no final event).
    pub end_after_chunks: Option<usize>,
    /// Streams: after this many chunks, hold the rest until [`Simulator::release`] is called.
    pub hold_after_chunks: Option<usize>,
    /// Streams: wait this long before each chunk after the first (a slow, steady upstream).
    pub chunk_interval_ms: Option<u64>,
    /// Streams: send an OpenAI error event as the first event (status stays 200).
    pub error_event: bool,
    /// Leave `usage` out of the answer (the gateway must estimate).
    pub omit_usage: bool,
    /// Send the headers, then wait this long before the body (a stall after headers).
    pub stall_after_headers_ms: Option<u64>,
    /// Send the body one byte at a time, this long apart: an upstream that drips.
    pub drip_interval_ms: Option<u64>,
    /// Report this model in the answer instead of the one asked for (a swapped model).
    pub served_model: Option<String>,
    /// A standing fault applies only to requests for this model (queued faults ignore it).
    pub only_model: Option<String>,
    /// OpenAI: answer in full whatever `max_completion_tokens` or `max_tokens` says (an upstream
    /// that does not honour the cap; by default the reply stops there with `length`).
    pub ignore_output_cap: bool,
    /// OpenAI: the error answer of `status`, or the `error_event`, echoes the key the request
    /// presented, in full and a part of it, as some upstreams' key errors do.
    pub echo_key: bool,
}

/// What the simulator saw of one request.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Request path.
    pub path: String,
    /// The `authorization` header, if any.
    pub authorization: Option<String>,
    /// Every header, names lowercase.
    pub headers: Vec<(String, String)>,
    /// The parsed JSON body (`Null` if it was not JSON).
    pub body: Value,
}

#[derive(Default)]
struct Shared {
    faults: Mutex<VecDeque<Fault>>,
    seen: Mutex<Vec<SeenRequest>>,
    release: Notify,
    api_keys: Vec<String>,
    /// Applied when the queue is empty; `None`: answer normally.
    standing_fault: Mutex<Option<Fault>>,
    /// Keep only the path of each request seen (benchmarks send too many to keep their bodies).
    forget_contents: std::sync::atomic::AtomicBool,
    /// Requests whose caller went away before their answer ended.
    abandoned: std::sync::atomic::AtomicUsize,
}

/// A running simulator.
#[derive(Clone)]
pub struct Simulator {
    shared: Arc<Shared>,
    address: SocketAddr,
    /// `http`, or `https` when started with [`Simulator::start_tls`].
    scheme: &'static str,
}

/// The certificate chain and key a TLS simulator presents, both PEM.
pub struct TlsIdentity<'a> {
    /// The server's certificate, then any intermediates.
    pub certificate_chain_pem: &'a [u8],
    /// Its private key (PKCS#8).
    pub private_key_pem: &'a [u8],
}

impl Simulator {
    /// Starts a simulator on `address` (port 0 picks a free one). With `api_keys`, requests must
    /// carry `Authorization: Bearer <one of them>` or get OpenAI's 401.
    pub async fn start(address: SocketAddr, api_keys: Vec<String>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            api_keys,
            ..Shared::default()
        });
        let listener = tokio::net::TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        // Stream frames leave at once, as a real upstream's do (no Nagle delay).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let app = router(shared.clone());
        tokio::spawn(async move {
            // The simulator lives as long as its runtime; a serve error ends it quietly.
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            shared,
            address,
            scheme: "http",
        })
    }

    /// Starts a simulator that speaks HTTPS, as hosted providers do: it offers HTTP/2 and
    /// HTTP/1.1 by ALPN, and lets an HTTP/2 connection carry at most `streams_per_connection`
    /// requests at once (hosted providers allow about a hundred).
    pub async fn start_tls(
        address: SocketAddr,
        api_keys: Vec<String>,
        identity: &TlsIdentity<'_>,
        streams_per_connection: u32,
    ) -> std::io::Result<Self> {
        let acceptor = tls_acceptor(identity)?;
        let shared = Arc::new(Shared {
            api_keys,
            ..Shared::default()
        });
        let listener = tokio::net::TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let service = hyper_util::service::TowerToHyperService::new(router(shared.clone()));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let (acceptor, service) = (acceptor.clone(), service.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut server = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    server
                        .http2()
                        .max_concurrent_streams(streams_per_connection);
                    let _ = server
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(Self {
            shared,
            address,
            scheme: "https",
        })
    }

    /// From now on, remember of each request only its path (`seen` and `calls` still count it):
    /// a benchmark's hundreds of thousands of bodies would otherwise fill the memory.
    pub fn forget_contents(&self) {
        self.shared
            .forget_contents
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The address it listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Base URL of its OpenAI API (`http://addr/v1`, or `https://`).
    pub fn openai_base_url(&self) -> String {
        format!("{}://{}/v1", self.scheme, self.address)
    }

    /// Base URL of its Gemini API (`http://addr/gemini/v1beta`, or `https://`).
    pub fn gemini_base_url(&self) -> String {
        format!("{}://{}/gemini/v1beta", self.scheme, self.address)
    }

    /// Base URL of its Anthropic API (`http://addr/anthropic/v1`, or `https://`).
    pub fn anthropic_base_url(&self) -> String {
        format!("{}://{}/anthropic/v1", self.scheme, self.address)
    }

    /// Queues a fault for the next request.
    pub fn push_fault(&self, fault: Fault) {
        lock(&self.shared.faults).push_back(fault);
    }

    /// Applies `fault` to every request while no queued fault is waiting (`None` to stop).
    pub fn set_standing_fault(&self, fault: Option<Fault>) {
        *lock(&self.shared.standing_fault) = fault;
    }

    /// Releases streams held by `hold_after_chunks`.
    pub fn release(&self) {
        self.shared.release.notify_waiters();
    }

    /// Requests seen so far, in arrival order.
    pub fn seen(&self) -> Vec<SeenRequest> {
        lock(&self.shared.seen).clone()
    }

    /// Number of requests to model endpoints seen so far.
    pub fn calls(&self) -> usize {
        lock(&self.shared.seen).len()
    }

    /// Requests whose caller (the gateway) went away before their answer ended: it closed the
    /// connection during a delay or a stall, or stopped reading a stream.
    pub fn abandoned(&self) -> usize {
        self.shared
            .abandoned
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The TLS side of [`Simulator::start_tls`]: `identity`, HTTP/2 preferred by ALPN.
fn tls_acceptor(identity: &TlsIdentity<'_>) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |error: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, error.to_string())
    };
    let chain = CertificateDer::pem_slice_iter(identity.certificate_chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| invalid(&error))?;
    let key =
        PrivateKeyDer::from_pem_slice(identity.private_key_pem).map_err(|error| invalid(&error))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| invalid(&error))?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|error| invalid(&error))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicked holder cannot leave these collections half-updated; keep serving.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::models))
        .route("/anthropic/v1/messages", post(anthropic::messages))
        .route(
            "/anthropic/v1/messages/count_tokens",
            post(anthropic::count_tokens),
        )
        .route("/gemini/v1beta/models/{target}", post(gemini::models))
        // Where each provider serves them on its own host, for channels whose base URL is the
        // bare host its SDKs take.
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1beta/models/{target}", post(gemini::models))
        .route("/_sim/faults", post(control_fault))
        .route("/_sim/release", post(control_release))
        .route("/_sim/calls", get(control_calls))
        .with_state(shared)
}

async fn control_fault(State(shared): State<Arc<Shared>>, Json(fault): Json<Fault>) -> StatusCode {
    lock(&shared.faults).push_back(fault);
    StatusCode::NO_CONTENT
}

async fn control_release(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.release.notify_waiters();
    StatusCode::NO_CONTENT
}

async fn control_calls(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({ "calls": lock(&shared.seen).len() }))
}

/// How a provider presents keys and renders errors; the admission steps are the same for all.
#[derive(Debug, Clone, Copy)]
enum Dialect {
    OpenAi,
    Anthropic,
    Gemini,
}

impl Dialect {
    /// The API key the request presents, in this provider's header.
    fn presented_key(self, headers: &HeaderMap) -> Option<&str> {
        match self {
            Self::OpenAi => headers
                .get(header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("Bearer ")),
            Self::Anthropic => headers
                .get("x-api-key")
                .and_then(|value| value.to_str().ok()),
            Self::Gemini => headers
                .get("x-goog-api-key")
                .and_then(|value| value.to_str().ok()),
        }
    }

    /// The provider's error answer for a status (with `retry-after` when given; Google puts the
    /// wait in the body's `RetryInfo` instead of a header).
    fn fault(self, status: u16, retry_after_s: Option<u64>) -> Response {
        let mut response = match self {
            Self::OpenAi => openai::fault_status_response(status),
            Self::Anthropic => anthropic::fault_status_response(status),
            Self::Gemini => return gemini::fault_status_response(status, retry_after_s),
        };
        if let Some(seconds) = retry_after_s
            && let Ok(value) = seconds.to_string().parse()
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }

    /// The provider's 400 for a body that is not JSON.
    fn unparseable(self) -> Response {
        match self {
            Self::OpenAi => openai::error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                "We could not parse the JSON body of your request.",
            ),
            Self::Anthropic => anthropic::error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "There was an issue with the format of your request: the body is not valid JSON",
            ),
            Self::Gemini => gemini::error_response(
                StatusCode::BAD_REQUEST,
                "INVALID_ARGUMENT",
                "Invalid JSON payload received.",
                Vec::new(),
            ),
        }
    }
}

/// Records the request, checks the key, takes the next fault, applies its delay and status.
async fn admit(
    shared: &Shared,
    dialect: Dialect,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Value, Fault), Response> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let seen = if shared
        .forget_contents
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        SeenRequest {
            path: path.to_owned(),
            authorization: None,
            headers: Vec::new(),
            body: Value::Null,
        }
    } else {
        SeenRequest {
            path: path.to_owned(),
            authorization,
            headers: headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_owned(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: parsed.clone(),
        }
    };
    lock(&shared.seen).push(seen);
    let presented = dialect.presented_key(headers);
    if !shared.api_keys.is_empty()
        && !presented.is_some_and(|key| shared.api_keys.iter().any(|known| known == key))
    {
        return Err(dialect.fault(401, None));
    }
    // In the body (OpenAI, Anthropic) or in the path (Gemini: `models/{model}:method`).
    let requested_model = parsed
        .get("model")
        .and_then(Value::as_str)
        .or_else(|| path.split("models/").nth(1)?.split(':').next())
        .unwrap_or_default();
    let queued = lock(&shared.faults).pop_front();
    let standing = || {
        lock(&shared.standing_fault).clone().filter(|fault| {
            fault
                .only_model
                .as_deref()
                .is_none_or(|model| model == requested_model)
        })
    };
    let fault = queued.or_else(standing).unwrap_or_default();
    if let Some(delay) = fault.delay_ms {
        // Dropped with the handler when the caller closes its connection during the wait.
        let waiting = Abandoned::armed(shared);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        waiting.disarm();
    }
    if let Some(status) = fault.status {
        if let (true, Dialect::OpenAi, Some(key)) = (fault.echo_key, dialect, presented) {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::UNAUTHORIZED);
            return Err(openai::error_response(
                status,
                "invalid_request_error",
                Some("invalid_api_key"),
                &openai::key_echo(key),
            ));
        }
        return Err(dialect.fault(status, fault.retry_after_s));
    }
    if parsed.is_null() {
        return Err(dialect.unparseable());
    }
    Ok((parsed, fault))
}

/// Counts a request as abandoned when dropped armed.
struct Abandoned<'a> {
    shared: Option<&'a Shared>,
}

impl<'a> Abandoned<'a> {
    fn armed(shared: &'a Shared) -> Self {
        Self {
            shared: Some(shared),
        }
    }

    fn disarm(mut self) {
        self.shared = None;
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some(shared) = self.shared {
            shared
                .abandoned
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

pub(crate) fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

const CREATED: u64 = 1_732_000_000;

/// Sends a whole JSON answer, applying the fault's stall, drip and cut.
fn whole_answer(fault: &Fault, answer: &Value) -> Response {
    let text = Bytes::from(answer.to_string());
    let length = text.len();
    let stall = Duration::from_millis(fault.stall_after_headers_ms.unwrap_or(0));
    let pieces: Vec<Result<Bytes, std::io::Error>> = if fault.cut_whole {
        vec![
            Ok(text.slice(..length / 2)),
            Err(std::io::Error::other("simulated cut")),
        ]
    } else if fault.drip_interval_ms.is_some() {
        (0..length).map(|at| Ok(text.slice(at..=at))).collect()
    } else {
        vec![Ok(text)]
    };
    let drip = Duration::from_millis(fault.drip_interval_ms.unwrap_or(0));
    let body = futures::StreamExt::then(
        futures::stream::iter(pieces.into_iter().enumerate()),
        move |(index, piece)| async move {
            let wait = if index == 0 { stall } else { drip };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            if piece.is_err() {
                // Let the half before it leave first, as from an upstream that dies mid-answer.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            piece
        },
    );
    (
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// Sends SSE frames as a streamed body, applying the fault's stall, hold and cut.
fn event_stream(shared: Arc<Shared>, fault: Fault, frames: Vec<Bytes>) -> Response {
    let (sender, receiver) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        if let Some(stall) = fault.stall_after_headers_ms {
            tokio::time::sleep(Duration::from_millis(stall)).await;
        }
        for (index, frame) in frames.into_iter().enumerate() {
            if let (Some(interval), 1..) = (fault.chunk_interval_ms, index) {
                tokio::time::sleep(Duration::from_millis(interval)).await;
            }
            if fault.hold_after_chunks == Some(index) {
                tokio::select! {
                    () = shared.release.notified() => {}
                    () = sender.closed() => {
                        shared
                            .abandoned
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                }
            }
            if fault.end_after_chunks == Some(index) {
                return;
            }
            if fault.cut_after_chunks == Some(index) {
                // An error item makes hyper abort the chunked body: the client sees a broken
                // connection, not a clean end. The pause lets the chunks before it leave first,
                // as they would from a real upstream that dies mid-answer.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = sender
                    .send(Err(std::io::Error::other("simulated cut")))
                    .await;
                return;
            }
            let pieces = match fault.drip_interval_ms {
                Some(_) => (0..frame.len()).map(|at| frame.slice(at..=at)).collect(),
                None => vec![frame],
            };
            for (at, piece) in pieces.into_iter().enumerate() {
                if let (Some(interval), 1..) = (fault.drip_interval_ms, index + at) {
                    tokio::time::sleep(Duration::from_millis(interval)).await;
                }
                if sender.send(Ok(piece)).await.is_err() {
                    shared
                        .abandoned
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
            }
        }
    });
    let frames = futures::stream::unfold(receiver, |mut receiver| async move {
        let frame = receiver.recv().await?;
        Some((frame, receiver))
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")],
        Body::from_stream(frames),
    )
        .into_response()
}

/// A deterministic unit vector per input, derived from the text's bytes.
fn embedding(text: &str, dimensions: usize) -> Vec<f32> {
    let mut vector = vec![0f32; dimensions.max(1)];
    for (index, byte) in text.bytes().enumerate() {
        vector[index % dimensions.max(1)] += f32::from(byte) / 255.0;
    }
    let norm = vector
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    vector.iter().map(|x| x / norm).collect()
}

/// The signature the simulator gives a thinking text, and demands back with it.
fn signature(thinking: &str) -> String {
    let hash = thinking
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    format!("simsig{hash:016x}")
}

/// A value that satisfies a (simple) JSON schema.
fn sample(schema: &Value, name: &str) -> Value {
    match schema.get("type").and_then(Value::as_str) {
        Some("string") => schema
            .get("enum")
            .and_then(|values| values.get(0))
            .cloned()
            .unwrap_or_else(|| json!(format!("sim-{name}"))),
        Some("integer" | "number") => json!(1),
        Some("boolean") => json!(true),
        Some("array") => json!([sample(schema.get("items").unwrap_or(&Value::Null), name)]),
        Some("null") => Value::Null,
        _ => {
            let mut object = Map::new();
            if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
                for (property, property_schema) in properties {
                    object.insert(property.clone(), sample(property_schema, property));
                }
            }
            Value::Object(object)
        }
    }
}
