//! The Anthropic dialect: `POST /v1/messages`, whole and streamed, as strict as Anthropic's API
//! reference where a translator could get it wrong: `x-api-key` and `anthropic-version` required,
//! `max_tokens` required, `system` only at the top level, strictly alternating roles, every
//! `tool_use` answered by a `tool_result` at the start of the next user turn (and no result without
//! its call), no empty text blocks, image media types checked, temperature from 0 to 1, thinking
//! blocks passed back with the signature they were given.
//!
//! Deterministic answers, in this order of precedence:
//! - the last user turn carries tool results → `Tool results: <their text>`;
//! - `output_config.format` is a JSON schema → a JSON text that satisfies it;
//! - tools are offered and the last user text names some of them (or `tool_choice` forces one) →
//!   one `tool_use` block per named tool (only the first with `disable_parallel_tool_use`), input
//!   made from the tool's schema; a text block `Let me look that up.` comes first when the user
//!   text contains `explain`;
//! - otherwise `Echo: <last user text>`.
//!
//! With `thinking` enabled a thinking block (`Considering: …`) with a signature comes first.
//! Token counts are whitespace-separated words; blocks up to the last `cache_control` marker are
//! reported as a cache write, the rest as `input_tokens`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::{Dialect, Fault, Shared, admit, event_stream, lock, sample, signature, words};

const IMAGE_MEDIA_TYPES: &[&str] = &["image/jpeg", "image/png", "image/gif", "image/webp"];

/// Anthropic's error body, with the `request-id` header Anthropic sends.
pub(crate) fn error_response(status: StatusCode, kind: &str, message: &str) -> Response {
    let request_id = "req_sim_error";
    let body = json!({
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": request_id
    });
    (status, [("request-id", request_id)], Json(body)).into_response()
}

fn invalid(message: impl AsRef<str>) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        message.as_ref(),
    )
}

pub(crate) fn fault_status_response(status: u16) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (kind, message) = match status {
        401 => ("authentication_error", "invalid x-api-key"),
        403 => (
            "permission_error",
            "Your API key does not have permission to use the specified resource.",
        ),
        404 => (
            "not_found_error",
            "The requested resource could not be found.",
        ),
        413 => (
            "request_too_large",
            "Request exceeds the maximum allowed number of bytes.",
        ),
        429 => (
            "rate_limit_error",
            "Number of request tokens has exceeded your per-minute rate limit",
        ),
        529 => ("overloaded_error", "Overloaded"),
        400..=499 => ("invalid_request_error", "Simulated invalid request."),
        _ => ("api_error", "Internal server error"),
    };
    error_response(code, kind, message)
}

/// One block of the answer.
enum Block {
    Thinking(String),
    Text(String),
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
}

impl Block {
    fn words(&self) -> u64 {
        match self {
            Self::Thinking(text) | Self::Text(text) => words(text),
            Self::ToolUse { input, .. } => words(&input.to_string()).max(1),
        }
    }

    fn whole(&self) -> Value {
        match self {
            Self::Thinking(thinking) => {
                json!({"type": "thinking", "thinking": thinking, "signature": signature(thinking)})
            }
            Self::Text(text) => json!({"type": "text", "text": text}),
            Self::ToolUse { id, name, input } => {
                json!({"type": "tool_use", "id": id, "name": name, "input": input})
            }
        }
    }
}

/// Prompt token counts: cache write (up to the last `cache_control`) and the rest.
#[derive(Default)]
struct PromptCount {
    total: u64,
    cached_prefix: u64,
}

impl PromptCount {
    fn add(&mut self, words: u64, block: &Value) {
        self.total += words;
        if block.get("cache_control").is_some() {
            self.cached_prefix = self.total;
        }
    }
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|block| block.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The blocks of a message's content (a string is one text block).
fn blocks_of(content: &Value) -> Vec<Value> {
    match content {
        Value::String(text) => vec![json!({"type": "text", "text": text})],
        Value::Array(blocks) => blocks.clone(),
        _ => Vec::new(),
    }
}

/// Checks a request the way Anthropic does; the message is the 400's.
fn check(request: &Value, headers: &HeaderMap) -> Result<(), String> {
    if headers.get("anthropic-version").is_none() {
        return Err("anthropic-version: header is required".into());
    }
    let object = request
        .as_object()
        .ok_or("the request body must be an object")?;
    if !object.get("model").is_some_and(Value::is_string) {
        return Err("model: Field required".into());
    }
    match object.get("max_tokens") {
        None => return Err("max_tokens: Field required".into()),
        Some(tokens) if tokens.as_u64().is_none_or(|tokens| tokens == 0) => {
            return Err("max_tokens: Input should be a valid positive integer".into());
        }
        Some(_) => {}
    }
    if let Some(temperature) = object.get("temperature")
        && !temperature
            .as_f64()
            .is_some_and(|value| (0.0..=1.0).contains(&value))
    {
        return Err("temperature: Input should be less than or equal to 1".into());
    }
    if let Some(system) = object.get("system") {
        check_system(system)?;
    }
    check_tools(object)?;
    check_messages(object.get("messages"))?;
    if let Some(format) = object
        .get("output_config")
        .and_then(|config| config.get("format"))
        && (format.get("type").and_then(Value::as_str) != Some("json_schema")
            || !format.get("schema").is_some_and(Value::is_object))
    {
        return Err(
            "output_config.format: expected {\"type\": \"json_schema\", \"schema\": {...}}".into(),
        );
    }
    Ok(())
}

fn check_system(system: &Value) -> Result<(), String> {
    match system {
        Value::String(_) => Ok(()),
        Value::Array(blocks) => {
            for (index, block) in blocks.iter().enumerate() {
                if block.get("type").and_then(Value::as_str) != Some("text") {
                    return Err(format!("system.{index}: Input tag does not match 'text'"));
                }
                if block
                    .get("text")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    return Err(format!(
                        "system.{index}: text content blocks must be non-empty"
                    ));
                }
            }
            Ok(())
        }
        _ => Err("system: Input should be a valid string or list".into()),
    }
}

fn check_tools(request: &Map<String, Value>) -> Result<(), String> {
    if let Some(tools) = request.get("tools") {
        let tools = tools
            .as_array()
            .ok_or("tools: Input should be a valid list")?;
        for (index, tool) in tools.iter().enumerate() {
            if !tool.get("name").is_some_and(Value::is_string) {
                return Err(format!("tools.{index}.name: Field required"));
            }
            if !tool.get("input_schema").is_some_and(Value::is_object) {
                return Err(format!("tools.{index}.input_schema: Field required"));
            }
        }
    }
    if let Some(choice) = request.get("tool_choice") {
        match choice.get("type").and_then(Value::as_str) {
            Some("auto" | "any" | "none") => {}
            Some("tool") if choice.get("name").is_some_and(Value::is_string) => {}
            _ => {
                return Err("tool_choice: Input tag does not match auto, any, tool or none".into());
            }
        }
    }
    Ok(())
}

fn check_messages(messages: Option<&Value>) -> Result<(), String> {
    let messages = messages
        .and_then(Value::as_array)
        .ok_or("messages: Field required")?;
    if messages.is_empty() {
        return Err("messages: at least one message is required".into());
    }
    let mut previous_role = "";
    let mut open_tool_uses: Vec<String> = Vec::new();
    for (index, message) in messages.iter().enumerate() {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        match role {
            "user" | "assistant" => {}
            "system" => {
                return Err(format!(
                    "messages.{index}: Unexpected role \"system\". The Messages API accepts a top-level `system` parameter, not \"system\" as an input message role."
                ));
            }
            other => {
                return Err(format!(
                    "messages.{index}.role: Input should be 'user' or 'assistant', got {other:?}"
                ));
            }
        }
        if role == previous_role {
            return Err(format!(
                "messages: roles must alternate between \"user\" and \"assistant\", but found multiple \"{role}\" roles in a row"
            ));
        }
        previous_role = role;
        let content = message.get("content").unwrap_or(&Value::Null);
        if !(content.is_string() || content.is_array()) {
            return Err(format!("messages.{index}.content: Field required"));
        }
        let blocks = blocks_of(content);
        if role == "user" {
            check_tool_results(index, &blocks, &mut open_tool_uses)?;
        } else if !open_tool_uses.is_empty() {
            return Err(format!(
                "messages.{index}: `tool_use` ids were found without `tool_result` blocks immediately after: {}. Each `tool_use` block must have a corresponding `tool_result` block in the next message.",
                open_tool_uses.join(", ")
            ));
        }
        for (position, block) in blocks.iter().enumerate() {
            check_block(role, block, &format!("messages.{index}.content.{position}"))?;
            if block.get("type").and_then(Value::as_str) == Some("tool_use") {
                open_tool_uses.push(
                    block
                        .get("id")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
        }
    }
    Ok(())
}

/// A user turn after tool calls must open with one result per call, and name no other call.
fn check_tool_results(
    index: usize,
    blocks: &[Value],
    open_tool_uses: &mut Vec<String>,
) -> Result<(), String> {
    let mut answered = Vec::new();
    let mut seen_other = false;
    for block in blocks {
        if block.get("type").and_then(Value::as_str) == Some("tool_result") {
            if seen_other {
                return Err(format!(
                    "messages.{index}: `tool_result` blocks must come before any other content in the user turn"
                ));
            }
            let id = block
                .get("tool_use_id")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !open_tool_uses.iter().any(|open| open == id) {
                return Err(format!(
                    "messages.{index}.content: unexpected `tool_use_id` found in `tool_result` blocks: {id}. Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
                ));
            }
            answered.push(id.to_owned());
        } else {
            seen_other = true;
        }
    }
    let missing: Vec<&String> = open_tool_uses
        .iter()
        .filter(|open| !answered.contains(open))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "messages.{index}: `tool_use` ids were found without `tool_result` blocks immediately after: {}. Each `tool_use` block must have a corresponding `tool_result` block in the next message.",
            missing
                .iter()
                .map(|id| id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    open_tool_uses.clear();
    Ok(())
}

fn check_block(role: &str, block: &Value, at: &str) -> Result<(), String> {
    let kind = block.get("type").and_then(Value::as_str).unwrap_or("");
    let allowed = match role {
        "user" => matches!(kind, "text" | "image" | "document" | "tool_result"),
        _ => matches!(kind, "text" | "tool_use" | "thinking" | "redacted_thinking"),
    };
    if !allowed {
        return Err(format!(
            "{at}: a {role} message cannot hold a `{kind}` block"
        ));
    }
    match kind {
        "text"
            if block
                .get("text")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty) =>
        {
            Err(format!("{at}: text content blocks must be non-empty"))
        }
        "image" => check_image(block, at),
        "tool_use"
            if !block.get("id").is_some_and(Value::is_string)
                || !block.get("name").is_some_and(Value::is_string)
                || !block.get("input").is_some_and(Value::is_object) =>
        {
            Err(format!("{at}: tool_use needs id, name and an object input"))
        }
        "thinking" => {
            let thinking = block.get("thinking").and_then(Value::as_str).unwrap_or("");
            if block.get("signature").and_then(Value::as_str) == Some(signature(thinking).as_str())
            {
                Ok(())
            } else {
                Err(format!("{at}: Invalid `signature` in `thinking` block"))
            }
        }
        _ => Ok(()),
    }
}

fn check_image(block: &Value, at: &str) -> Result<(), String> {
    let source = block.get("source").unwrap_or(&Value::Null);
    match source.get("type").and_then(Value::as_str) {
        Some("base64") => {
            let media_type = source
                .get("media_type")
                .and_then(Value::as_str)
                .unwrap_or("");
            if !IMAGE_MEDIA_TYPES.contains(&media_type) {
                return Err(format!(
                    "{at}.source.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"
                ));
            }
            let data = source.get("data").and_then(Value::as_str).unwrap_or("");
            use base64::Engine as _;
            if data.is_empty()
                || base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .is_err()
            {
                return Err(format!("{at}.source.data: invalid base64 data"));
            }
            Ok(())
        }
        Some("url") if source.get("url").is_some_and(Value::is_string) => Ok(()),
        _ => Err(format!(
            "{at}.source: Input tag does not match 'base64' or 'url'"
        )),
    }
}

struct Answer {
    blocks: Vec<Block>,
    stop_reason: &'static str,
    stop_sequence: Option<String>,
    input_tokens: u64,
    cache_creation_tokens: u64,
    output_tokens: u64,
}

/// The prompt's word count, with the cached prefix (up to the last `cache_control`).
fn prompt_count(request: &Value) -> PromptCount {
    let mut prompt = PromptCount::default();
    if let Some(system) = request.get("system") {
        for block in blocks_of(system) {
            prompt.add(words(&text_of(&json!([block]))), &block);
        }
    }
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for message in &messages {
        for block in blocks_of(message.get("content").unwrap_or(&Value::Null)) {
            let counted = match block.get("type").and_then(Value::as_str) {
                Some("tool_result") => {
                    words(&text_of(block.get("content").unwrap_or(&Value::Null)))
                }
                Some("tool_use") => {
                    words(&block.get("input").map(Value::to_string).unwrap_or_default())
                }
                Some("thinking") => {
                    words(block.get("thinking").and_then(Value::as_str).unwrap_or(""))
                }
                _ => words(block.get("text").and_then(Value::as_str).unwrap_or("")),
            };
            prompt.add(counted, &block);
        }
    }
    prompt
}

fn answer(request: &Value, id_seed: usize) -> Answer {
    let prompt = prompt_count(request);
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let last_user = messages
        .iter()
        .rev()
        .find(|message| message.get("role").and_then(Value::as_str) == Some("user"));
    let last_blocks = last_user
        .map(|message| blocks_of(message.get("content").unwrap_or(&Value::Null)))
        .unwrap_or_default();
    let user_text = last_blocks
        .iter()
        .filter(|block| block.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|block| block.get("text").and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join(" ");
    let results: Vec<String> = last_blocks
        .iter()
        .filter(|block| block.get("type").and_then(Value::as_str) == Some("tool_result"))
        .map(|block| text_of(block.get("content").unwrap_or(&Value::Null)))
        .collect();

    let mut blocks = Vec::new();
    if request.pointer("/thinking/type").and_then(Value::as_str) == Some("enabled") {
        blocks.push(Block::Thinking(format!("Considering: {user_text}")));
    }
    let tools = request
        .get("tools")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let choice = request.get("tool_choice");
    let choice_type = choice
        .and_then(|choice| choice.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("auto");
    let mut called: Vec<&Value> = match choice_type {
        "none" => Vec::new(),
        "tool" => {
            let forced = choice.and_then(|choice| choice.get("name"));
            tools
                .iter()
                .filter(|tool| tool.get("name") == forced)
                .collect()
        }
        _ => tools
            .iter()
            .filter(|tool| {
                tool.get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|name| user_text.contains(name))
            })
            .collect(),
    };
    if called.is_empty() && choice_type == "any" {
        called.extend(tools.first());
    }
    if choice.and_then(|choice| choice.get("disable_parallel_tool_use")) == Some(&json!(true)) {
        called.truncate(1);
    }
    let format = request.pointer("/output_config/format/schema");
    if !results.is_empty() {
        blocks.push(Block::Text(format!("Tool results: {}", results.join(" "))));
    } else if let Some(schema) = format {
        blocks.push(Block::Text(sample(schema, "value").to_string()));
    } else if !called.is_empty() {
        if user_text.contains("explain") {
            blocks.push(Block::Text("Let me look that up.".into()));
        }
        for (index, tool) in called.iter().enumerate() {
            let name = tool.get("name").and_then(Value::as_str).unwrap_or_default();
            blocks.push(Block::ToolUse {
                id: format!("toolu_sim{id_seed:04x}{index:02}"),
                name: name.to_owned(),
                input: sample(tool.get("input_schema").unwrap_or(&Value::Null), name),
            });
        }
    } else {
        blocks.push(Block::Text(format!("Echo: {user_text}")));
    }

    let mut stop_reason = if blocks
        .iter()
        .any(|block| matches!(block, Block::ToolUse { .. }))
    {
        "tool_use"
    } else {
        "end_turn"
    };
    let mut stop_sequence = None;
    let stops: Vec<String> = request
        .get("stop_sequences")
        .and_then(Value::as_array)
        .map(|stops| {
            stops
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let max_tokens = request
        .get("max_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    for block in &mut blocks {
        if let Block::Text(text) = block {
            if let Some((at, stop)) = stops
                .iter()
                .filter_map(|stop| text.find(stop.as_str()).map(|at| (at, stop)))
                .min()
            {
                text.truncate(at);
                stop_reason = "stop_sequence";
                stop_sequence = Some(stop.clone());
            }
            let kept: Vec<&str> = text.split_whitespace().collect();
            if kept.len() as u64 > max_tokens {
                *text = kept[..max_tokens as usize].join(" ");
                stop_reason = "max_tokens";
            }
        }
    }
    blocks.retain(|block| !matches!(block, Block::Text(text) if text.is_empty()));
    let output_tokens = blocks.iter().map(Block::words).sum();
    Answer {
        blocks,
        stop_reason,
        stop_sequence,
        input_tokens: prompt.total - prompt.cached_prefix,
        cache_creation_tokens: prompt.cached_prefix,
        output_tokens,
    }
}

fn usage(answer: &Answer, output_tokens: u64) -> Value {
    json!({
        "input_tokens": answer.input_tokens,
        "cache_creation_input_tokens": answer.cache_creation_tokens,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
        "service_tier": "standard"
    })
}

pub(crate) async fn messages(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request, fault) =
        match admit(&shared, Dialect::Anthropic, "/v1/messages", &headers, &body).await {
            Ok(admitted) => admitted,
            Err(response) => return response,
        };
    if let Err(message) = check(&request, &headers) {
        return invalid(message);
    }
    let seed = lock(&shared.seen).len();
    let answer = answer(&request, seed);
    let id = format!("msg_sim{seed:08x}");
    let model = fault.served_model.clone().unwrap_or_else(|| {
        request
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    });
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        return stream(shared, fault, &id, &model, &answer);
    }
    let content: Vec<Value> = answer.blocks.iter().map(Block::whole).collect();
    let whole = json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": answer.stop_reason,
        "stop_sequence": answer.stop_sequence,
        "usage": usage(&answer, answer.output_tokens)
    });
    crate::whole_answer(&fault, &whole)
}

/// `POST /v1/messages/count_tokens`: the request as for `messages`, without `max_tokens`.
pub(crate) async fn count_tokens(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (mut request, _) = match admit(
        &shared,
        Dialect::Anthropic,
        "/v1/messages/count_tokens",
        &headers,
        &body,
    )
    .await
    {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    if let Some(object) = request.as_object_mut() {
        if object.contains_key("max_tokens") {
            return invalid("max_tokens: Extra inputs are not permitted");
        }
        // The same checks as `messages`, whose only extra requirement is the output cap.
        object.insert("max_tokens".to_owned(), json!(1));
    }
    if let Err(message) = check(&request, &headers) {
        return invalid(message);
    }
    Json(json!({ "input_tokens": prompt_count(&request).total })).into_response()
}

fn frame(event: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// Splits a string into pieces of about `size` bytes on character boundaries.
fn pieces(text: &str, size: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut end = 0;
    for (at, character) in text.char_indices() {
        end = at + character.len_utf8();
        if end - start >= size {
            pieces.push(&text[start..end]);
            start = end;
        }
    }
    if end > start {
        pieces.push(&text[start..end]);
    }
    pieces
}

fn stream(shared: Arc<Shared>, fault: Fault, id: &str, model: &str, answer: &Answer) -> Response {
    let mut frames = vec![
        frame(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": null, "stop_sequence": null, "usage": usage(answer, 1)
            }}),
        ),
        frame("ping", &json!({"type": "ping"})),
    ];
    let delta = |index: usize, delta: Value| {
        frame(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        )
    };
    for (index, block) in answer.blocks.iter().enumerate() {
        let start = match block {
            Block::Thinking(_) => json!({"type": "thinking", "thinking": ""}),
            Block::Text(_) => json!({"type": "text", "text": ""}),
            Block::ToolUse { id, name, .. } => {
                json!({"type": "tool_use", "id": id, "name": name, "input": {}})
            }
        };
        frames.push(frame(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        match block {
            Block::Thinking(thinking) => {
                for piece in thinking.split_inclusive(' ') {
                    frames.push(delta(
                        index,
                        json!({"type": "thinking_delta", "thinking": piece}),
                    ));
                }
                frames.push(delta(
                    index,
                    json!({"type": "signature_delta", "signature": signature(thinking)}),
                ));
            }
            Block::Text(text) => {
                for piece in text.split_inclusive(' ') {
                    frames.push(delta(index, json!({"type": "text_delta", "text": piece})));
                }
                if fault.error_event {
                    // Anthropic ends the stream with the error event.
                    frames.push(frame(
                        "error",
                        &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
                    ));
                    return event_stream(shared, fault, frames);
                }
            }
            Block::ToolUse { input, .. } => {
                frames.push(delta(
                    index,
                    json!({"type": "input_json_delta", "partial_json": ""}),
                ));
                for piece in pieces(&input.to_string(), 8) {
                    frames.push(delta(
                        index,
                        json!({"type": "input_json_delta", "partial_json": piece}),
                    ));
                }
            }
        }
        frames.push(frame(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        ));
    }
    frames.push(frame(
        "message_delta",
        &json!({"type": "message_delta",
            "delta": {"stop_reason": answer.stop_reason, "stop_sequence": answer.stop_sequence},
            "usage": usage(answer, answer.output_tokens)}),
    ));
    frames.push(frame("message_stop", &json!({"type": "message_stop"})));
    event_stream(shared, fault, frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            "anthropic-version",
            axum::http::HeaderValue::from_static("2023-06-01"),
        );
        headers
    }

    fn refused(request: Value) -> String {
        check(&request, &headers()).expect_err("Anthropic refuses this")
    }

    #[test]
    fn it_is_as_strict_as_anthropic_where_translators_go_wrong() {
        let user = |text: &str| json!({"role": "user", "content": text});
        let base = |messages: Value| json!({"model": "m", "max_tokens": 10, "messages": messages});
        assert!(check(&base(json!([user("hi")])), &headers()).is_ok());
        assert!(check(&base(json!([user("hi")])), &HeaderMap::new()).is_err());
        assert!(refused(json!({"model": "m", "messages": [user("hi")]})).contains("max_tokens"));
        assert!(refused(base(json!([user("a"), user("b")]))).contains("alternate"));
        assert!(
            refused(base(
                json!([{"role": "system", "content": "s"}, user("hi")])
            ))
            .contains("top-level `system`")
        );
        assert!(
            refused(base(
                json!([{"role": "user", "content": [{"type": "text", "text": ""}]}])
            ))
            .contains("non-empty")
        );
        let call = json!({"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": "f", "input": {}}
        ]});
        assert!(refused(base(json!([user("go"), call, user("no result")]))).contains("t1"));
        let wrong_result = json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t2", "content": "x"}
        ]});
        assert!(refused(base(json!([user("go"), call, wrong_result]))).contains("t2"));
        let result_after_text = json!({"role": "user", "content": [
            {"type": "text", "text": "and"},
            {"type": "tool_result", "tool_use_id": "t1", "content": "x"}
        ]});
        assert!(refused(base(json!([user("go"), call, result_after_text]))).contains("before"));
        let tiff = json!({"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/tiff", "data": "AAAA"}}]});
        assert!(refused(base(json!([tiff]))).contains("media_type"));
        let unsigned = json!({"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "forged"}]});
        assert!(refused(base(json!([user("q"), unsigned, user("more")]))).contains("signature"));
        let mut hot = base(json!([user("hi")]));
        hot["temperature"] = json!(1.5);
        assert!(refused(hot).contains("temperature"));
    }
}
