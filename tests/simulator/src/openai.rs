//! The OpenAI dialect: chat completions (whole and streamed), embeddings, models.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::{CREATED, Dialect, Fault, Shared, admit, embedding, event_stream, lock, words};

/// OpenAI's error body.
pub(crate) fn error_response(
    status: StatusCode,
    kind: &str,
    code: Option<&str>,
    message: &str,
) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

pub(crate) fn fault_status_response(status: u16) -> Response {
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
    error_response(status, kind, code, message)
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

const FINGERPRINT: &str = "fp_tollgate_sim";

pub(crate) async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request, fault) = match admit(
        &shared,
        Dialect::OpenAi,
        "/v1/chat/completions",
        &headers,
        &body,
    )
    .await
    {
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
    for piece in text.split_inclusive(' ') {
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
    event_stream(shared, fault, frames)
}

pub(crate) async fn embeddings(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request, _fault) =
        match admit(&shared, Dialect::OpenAi, "/v1/embeddings", &headers, &body).await {
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
            let vector = embedding(text, 8);
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

pub(crate) async fn models() -> Json<Value> {
    let data: Vec<Value> = ["sim-gpt-4o-mini", "sim-gpt-4o", "sim-embedding"]
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": CREATED, "owned_by": "tollgate-simulator"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}
