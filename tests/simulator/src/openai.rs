//! The OpenAI dialect: chat completions (whole and streamed), embeddings, models.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::{CREATED, Dialect, Fault, Shared, admit, embedding, event_stream, lock, sample, words};

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

/// An error message that echoes the key presented, in full and its middle part.
pub(crate) fn key_echo(key: &str) -> String {
    let middle = key.get(4..key.len().saturating_sub(4)).unwrap_or(key);
    format!("Incorrect API key provided: {key}. The key in use contains {middle}.")
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

/// One tool call of an answer.
struct Call {
    id: String,
    name: String,
    arguments: String,
}

/// What the simulator answers.
struct Reply {
    model: String,
    prompt_tokens: u64,
    text: Option<String>,
    calls: Vec<Call>,
    completion_tokens: u64,
    /// The reply stopped at the request's output cap.
    truncated: bool,
}

impl Reply {
    fn finish_reason(&self) -> &'static str {
        if self.truncated {
            "length"
        } else if self.calls.is_empty() {
            "stop"
        } else {
            "tool_calls"
        }
    }

    /// Stops the reply at `cap` tokens (words), as OpenAI stops at `max_completion_tokens`.
    fn cap(&mut self, cap: u64) {
        if self.completion_tokens <= cap {
            return;
        }
        let text = self.text.take().unwrap_or_default();
        let kept: String = text
            .split_inclusive(' ')
            .filter(|piece| !piece.trim().is_empty())
            .take(usize::try_from(cap).unwrap_or(usize::MAX))
            .collect();
        self.text = Some(kept);
        self.calls.clear();
        self.completion_tokens = cap;
        self.truncated = true;
    }
}

/// Checks tool-call pairing as OpenAI does: every `tool` message answers a call of the assistant
/// message before it, and every call of an assistant message is answered before the next turn.
fn check_tool_pairing(messages: &[Value]) -> Result<(), String> {
    let mut open: Vec<String> = Vec::new();
    for message in messages {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        if role == "tool" {
            let id = message
                .get("tool_call_id")
                .and_then(Value::as_str)
                .unwrap_or("");
            let Some(at) = open.iter().position(|call| call == id) else {
                return Err("Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'.".into());
            };
            open.remove(at);
            continue;
        }
        if !open.is_empty() {
            return Err(format!(
                "An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. The following tool_call_ids did not have response messages: {}",
                open.join(", ")
            ));
        }
        if role == "assistant" {
            open = message
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|call| call.get("id").and_then(Value::as_str).map(str::to_owned))
                .collect();
        }
    }
    Ok(())
}

/// The tools the answer calls: those named in the last user message (`tool_choice` may force one
/// or any, or forbid them).
fn called_tools<'a>(body: &'a Value, last_user: &str) -> Vec<&'a Value> {
    let tools: Vec<&Value> = body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let name = |tool: &Value| {
        tool.pointer("/function/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    match body.get("tool_choice") {
        Some(Value::String(choice)) if choice == "none" => Vec::new(),
        Some(Value::Object(choice)) => {
            let forced = choice
                .get("function")
                .and_then(|function| function.get("name"));
            tools
                .into_iter()
                .filter(|tool| tool.pointer("/function/name") == forced)
                .collect()
        }
        choice => {
            let mut called: Vec<&Value> = tools
                .iter()
                .copied()
                .filter(|tool| last_user.contains(&name(tool)))
                .collect();
            if called.is_empty() && choice == Some(&json!("required")) {
                called.extend(tools.first());
            }
            if body.get("parallel_tool_calls") == Some(&json!(false)) {
                called.truncate(1);
            }
            called
        }
    }
}

/// The deterministic rules: prompt tokens = words in every message's content; the reply is
/// `Echo: <last user message>`, the results of the tools when the last messages are tool
/// results, or calls of the tools the last user message names; completion tokens = words in the
/// reply (text and arguments).
#[expect(
    clippy::result_large_err,
    reason = "the error is the handler's own response, returned at once"
)]
fn reply(body: &Value, seed: usize) -> Result<Reply, Response> {
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
    check_tool_pairing(messages).map_err(|message| bad(&message))?;
    let prompt_tokens = messages
        .iter()
        .map(|message| {
            words(&content_text(
                message.get("content").unwrap_or(&Value::Null),
            ))
        })
        .sum();
    let results: Vec<String> = messages
        .iter()
        .rev()
        .take_while(|message| message.get("role").and_then(Value::as_str) == Some("tool"))
        .map(|message| content_text(message.get("content").unwrap_or(&Value::Null)))
        .collect();
    let last_user = messages
        .iter()
        .rev()
        .find(|message| message.get("role").and_then(Value::as_str) == Some("user"))
        .map(|message| content_text(message.get("content").unwrap_or(&Value::Null)))
        .unwrap_or_default();
    let mut calls = Vec::new();
    let text = if !results.is_empty() {
        let results: Vec<String> = results.into_iter().rev().collect();
        Some(format!("Tool results: {}", results.join(" ")))
    } else {
        for (index, tool) in called_tools(body, &last_user).into_iter().enumerate() {
            let name = tool
                .pointer("/function/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            calls.push(Call {
                id: format!("call_sim{seed:04x}{index:02}"),
                name: name.to_owned(),
                arguments: sample(
                    tool.pointer("/function/parameters").unwrap_or(&Value::Null),
                    name,
                )
                .to_string(),
            });
        }
        if calls.is_empty() {
            Some(format!("Echo: {last_user}"))
        } else {
            last_user
                .contains("explain")
                .then(|| "Let me look that up.".to_owned())
        }
    };
    let completion_tokens = text.as_deref().map_or(0, words)
        + calls
            .iter()
            .map(|call| words(&call.arguments).max(1))
            .sum::<u64>();
    Ok(Reply {
        model,
        prompt_tokens,
        text,
        calls,
        completion_tokens,
        truncated: false,
    })
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
    let seed = lock(&shared.seen).len();
    let mut reply = match reply(&request, seed) {
        Ok(reply) => reply,
        Err(response) => return response,
    };
    if let Some(served) = &fault.served_model {
        reply.model = served.clone();
    }
    let cap = request
        .get("max_completion_tokens")
        .or_else(|| request.get("max_tokens"))
        .and_then(Value::as_u64);
    if let Some(cap) = cap.filter(|_| !fault.ignore_output_cap) {
        reply.cap(cap);
    }
    let id = format!("chatcmpl-sim{seed:08x}");
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage = request
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        let presented_key = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        return stream(shared, fault, id, reply, include_usage, presented_key);
    }
    let mut message =
        json!({"role": "assistant", "content": reply.text, "refusal": null, "annotations": []});
    if !reply.calls.is_empty() {
        message["tool_calls"] = reply
            .calls
            .iter()
            .map(|call| json!({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}))
            .collect();
    }
    let mut answer = json!({
        "id": id,
        "object": "chat.completion",
        "created": CREATED,
        "model": reply.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": reply.finish_reason()
        }],
        "usage": usage(reply.prompt_tokens, reply.completion_tokens),
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT
    });
    if fault.omit_usage
        && let Some(object) = answer.as_object_mut()
    {
        object.remove("usage");
    }
    crate::whole_answer(&fault, &answer)
}

fn stream(
    shared: Arc<Shared>,
    fault: Fault,
    id: String,
    reply: Reply,
    include_usage: bool,
    presented_key: Option<&str>,
) -> Response {
    let model = &reply.model;
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
        let message = match (fault.echo_key, presented_key) {
            (true, Some(key)) => key_echo(key),
            _ => "The server had an error while processing your request.".to_owned(),
        };
        let error = json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
        frames.push(Bytes::from(format!("data: {error}\n\n")));
    }
    frames.push(chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        Value::Null,
    ));
    for piece in reply.text.as_deref().unwrap_or("").split_inclusive(' ') {
        frames.push(chunk(json!({"content": piece}), Value::Null));
    }
    for (index, call) in reply.calls.iter().enumerate() {
        frames.push(chunk(
            json!({"tool_calls": [{"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}]}),
            Value::Null,
        ));
        // Several argument deltas, as OpenAI streams them.
        let characters: Vec<char> = call.arguments.chars().collect();
        for piece in characters.chunks(6) {
            let piece: String = piece.iter().collect();
            frames.push(chunk(
                json!({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}),
                Value::Null,
            ));
        }
    }
    frames.push(chunk(json!({}), json!(reply.finish_reason())));
    if include_usage && !fault.omit_usage {
        let usage_chunk = json!({
            "id": id, "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "service_tier": "default", "system_fingerprint": FINGERPRINT,
            "choices": [], "usage": usage(reply.prompt_tokens, reply.completion_tokens)
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
