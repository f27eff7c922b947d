//! The upstream simulator: an HTTP server that speaks the OpenAI API's wire format (chat
//! completions, streamed and not, embeddings, models) deterministically, and injects faults on
//! demand. It is the one stand-in in Tollgate's tests, benchmark and offline demo.
//!
//! Wire shapes follow OpenAI's API reference and the `openai` Python SDK's types (see
//! `tests/fixtures/openai/SOURCES.md`). Answers are deterministic: the reply echoes the last user
//! message, and token counts are whitespace-separated words, so tests can compute expected usage.
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
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

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
    /// Streams: after this many chunks, hold the rest until [`Simulator::release`] is called.
    pub hold_after_chunks: Option<usize>,
    /// Streams: send an OpenAI error event as the first event (status stays 200).
    pub error_event: bool,
    /// Leave `usage` out of the answer (the gateway must estimate).
    pub omit_usage: bool,
    /// Send the headers, then wait this long before the body (a stall after headers).
    pub stall_after_headers_ms: Option<u64>,
    /// Report this model in the answer instead of the one asked for (a swapped model).
    pub served_model: Option<String>,
    /// A standing fault applies only to requests for this model (queued faults ignore it).
    pub only_model: Option<String>,
}

/// What the simulator saw of one request.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Request path.
    pub path: String,
    /// The `authorization` header, if any.
    pub authorization: Option<String>,
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
}

/// A running simulator.
#[derive(Clone)]
pub struct Simulator {
    shared: Arc<Shared>,
    address: SocketAddr,
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
        Ok(Self { shared, address })
    }

    /// The address it listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Base URL of its OpenAI API (`http://addr/v1`).
    pub fn openai_base_url(&self) -> String {
        format!("http://{}/v1", self.address)
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
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicked holder cannot leave these collections half-updated; keep serving.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
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

/// OpenAI's error body.
fn error_response(status: StatusCode, kind: &str, code: Option<&str>, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

fn fault_status_response(status: u16, retry_after_s: Option<u64>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (kind, code, message) = match status.as_u16() {
        401 => (
            "invalid_request_error",
            Some("invalid_api_key"),
            "Incorrect API key provided.",
        ),
        429 => (
            "requests",
            Some("rate_limit_exceeded"),
            "Rate limit reached for requests.",
        ),
        400..=499 => ("invalid_request_error", None, "Simulated client error."),
        503 => (
            "server_error",
            None,
            "The engine is currently overloaded, please try again later.",
        ),
        _ => (
            "server_error",
            None,
            "The server had an error while processing your request.",
        ),
    };
    let mut response = error_response(status, kind, code, message);
    if let Some(seconds) = retry_after_s
        && let Ok(value) = seconds.to_string().parse()
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// Records the request, checks the key, takes the next fault, applies its delay and status.
async fn admit(
    shared: &Shared,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Value, Fault), Response> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    lock(&shared.seen).push(SeenRequest {
        path: path.to_owned(),
        authorization: authorization.clone(),
        body: parsed.clone(),
    });
    let presented = authorization
        .as_deref()
        .and_then(|value| value.strip_prefix("Bearer "));
    if !shared.api_keys.is_empty()
        && !presented.is_some_and(|key| shared.api_keys.iter().any(|known| known == key))
    {
        return Err(error_response(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            "Incorrect API key provided.",
        ));
    }
    let requested_model = parsed
        .get("model")
        .and_then(Value::as_str)
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
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Some(status) = fault.status {
        return Err(fault_status_response(status, fault.retry_after_s));
    }
    if parsed.is_null() {
        return Err(error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            "We could not parse the JSON body of your request.",
        ));
    }
    Ok((parsed, fault))
}

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Text of a message's `content`: a string, or the text parts of an array.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The deterministic rules: prompt tokens = words in every message's content; the reply is
/// `Echo: <last user message>`; completion tokens = words in the reply.
#[expect(
    clippy::result_large_err,
    reason = "the error is the handler's own response, returned at once"
)]
fn reply(body: &Value) -> Result<(String, u64, String, u64), Response> {
    let bad = |message: &str| {
        error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            message,
        )
    };
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("you must provide a model parameter"))?
        .to_owned();
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .filter(|messages| !messages.is_empty())
        .ok_or_else(|| bad("'messages' must be a non-empty array"))?;
    let prompt_tokens = messages
        .iter()
        .map(|message| {
            words(&content_text(
                message.get("content").unwrap_or(&Value::Null),
            ))
        })
        .sum();
    let last_user = messages
        .iter()
        .rev()
        .find(|message| message.get("role").and_then(Value::as_str) == Some("user"))
        .map(|message| content_text(message.get("content").unwrap_or(&Value::Null)))
        .unwrap_or_default();
    let text = format!("Echo: {last_user}");
    let completion_tokens = words(&text);
    Ok((model, prompt_tokens, text, completion_tokens))
}

fn usage(prompt_tokens: u64, completion_tokens: u64) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0
        }
    })
}

const CREATED: u64 = 1_732_000_000;
const FINGERPRINT: &str = "fp_tollgate_sim";

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request, fault) = match admit(&shared, "/v1/chat/completions", &headers, &body).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let (model, prompt_tokens, text, completion_tokens) = match reply(&request) {
        Ok(reply) => reply,
        Err(response) => return response,
    };
    let model = fault.served_model.clone().unwrap_or(model);
    let id = format!("chatcmpl-sim{:08x}", lock(&shared.seen).len());
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage = request
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        return stream(
            shared,
            fault,
            id,
            model,
            text,
            prompt_tokens,
            completion_tokens,
            include_usage,
        );
    }
    let mut answer = json!({
        "id": id,
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": usage(prompt_tokens, completion_tokens),
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT
    });
    if fault.omit_usage
        && let Some(object) = answer.as_object_mut()
    {
        object.remove("usage");
    }
    let Some(stall) = fault.stall_after_headers_ms else {
        return Json(answer).into_response();
    };
    let body = futures::stream::once(async move {
        tokio::time::sleep(Duration::from_millis(stall)).await;
        Ok::<_, std::io::Error>(Bytes::from(answer.to_string()))
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(body),
    )
        .into_response()
}

#[expect(clippy::too_many_arguments, reason = "one answer's facts, passed once")]
fn stream(
    shared: Arc<Shared>,
    fault: Fault,
    id: String,
    model: String,
    text: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    include_usage: bool,
) -> Response {
    let (sender, receiver) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let chunk = |delta: Value, finish_reason: Value| {
            let mut chunk = json!({
                "id": id, "object": "chat.completion.chunk", "created": CREATED, "model": model,
                "service_tier": "default", "system_fingerprint": FINGERPRINT,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]
            });
            if include_usage && let Some(object) = chunk.as_object_mut() {
                object.insert("usage".to_owned(), Value::Null);
            }
            Bytes::from(format!("data: {chunk}\n\n"))
        };
        let mut frames = Vec::new();
        if fault.error_event {
            let error = json!({"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": null, "code": null}});
            frames.push(Bytes::from(format!("data: {error}\n\n")));
        }
        frames.push(chunk(
            json!({"role": "assistant", "content": "", "refusal": null}),
            Value::Null,
        ));
        let pieces: Vec<&str> = text.split_inclusive(' ').collect();
        for piece in &pieces {
            frames.push(chunk(json!({"content": piece}), Value::Null));
        }
        frames.push(chunk(json!({}), json!("stop")));
        if include_usage && !fault.omit_usage {
            let usage_chunk = json!({
                "id": id, "object": "chat.completion.chunk", "created": CREATED, "model": model,
                "service_tier": "default", "system_fingerprint": FINGERPRINT,
                "choices": [], "usage": usage(prompt_tokens, completion_tokens)
            });
            frames.push(Bytes::from(format!("data: {usage_chunk}\n\n")));
        }
        frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
        if let Some(stall) = fault.stall_after_headers_ms {
            tokio::time::sleep(Duration::from_millis(stall)).await;
        }
        for (index, frame) in frames.into_iter().enumerate() {
            if fault.hold_after_chunks == Some(index) {
                shared.release.notified().await;
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
            if sender.send(Ok(frame)).await.is_err() {
                return;
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

/// A deterministic unit vector per input: 8 dimensions derived from the text's bytes.
fn embedding(text: &str) -> Vec<f32> {
    let mut vector = [0f32; 8];
    for (index, byte) in text.bytes().enumerate() {
        vector[index % 8] += f32::from(byte) / 255.0;
    }
    let norm = vector
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    vector.iter().map(|x| x / norm).collect()
}

async fn embeddings(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request, _fault) = match admit(&shared, "/v1/embeddings", &headers, &body).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let Some(model) = request.get("model").and_then(Value::as_str) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            "you must provide a model parameter",
        );
    };
    let inputs: Vec<String> = match request.get("input") {
        Some(Value::String(text)) => vec![text.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map_or_else(|| item.to_string(), str::to_owned)
            })
            .collect(),
        _ => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                "'input' is required",
            );
        }
    };
    let base64 = request.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let vector = embedding(text);
            let encoded = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": encoded})
        })
        .collect();
    let prompt_tokens: u64 = inputs.iter().map(|text| words(text)).sum();
    Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    }))
    .into_response()
}

async fn models() -> Json<Value> {
    let data: Vec<Value> = ["sim-gpt-4o-mini", "sim-gpt-4o", "sim-embedding"]
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": CREATED, "owned_by": "tollgate-simulator"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}
