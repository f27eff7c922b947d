//! A Messages request (or count-tokens request) in OpenAI's chat shape: what the host routes and
//! bills by, and what a channel of another protocol receives.
//!
//! Lenient where the same-protocol path needs nothing from it: what OpenAI's shape has no place
//! for (thinking blocks, `cache_control`, server tools, `top_k`) is left out here, and survives
//! untouched when the route lands on an Anthropic channel, which receives the client's own body.

use serde_json::{Map, Value, json};
use tollgate_plugin_sdk::inbound::{Endpoint, InvalidRequest};

fn invalid(message: impl Into<String>, param: &str) -> InvalidRequest {
    InvalidRequest {
        message: message.into(),
        param: Some(param.to_owned()),
    }
}

/// Converts the client's Messages body.
pub fn to_openai(endpoint: Endpoint, body: &str) -> Result<Value, InvalidRequest> {
    let request: Map<String, Value> = serde_json::from_str(body).map_err(|_| InvalidRequest {
        message: "The request body must be a JSON object.".to_owned(),
        param: None,
    })?;
    let model = match request.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        _ => return Err(invalid("model: Field required", "model")),
    };
    let mut chat = Map::new();
    chat.insert("model".into(), Value::String(model));
    match (endpoint, request.get("max_tokens")) {
        (_, Some(Value::Number(max))) if max.as_u64().is_some() => {
            chat.insert("max_tokens".into(), Value::Number(max.clone()));
        }
        (Endpoint::Messages, None) => {
            return Err(invalid("max_tokens: Field required", "max_tokens"));
        }
        (_, None) => {}
        (_, Some(_)) => {
            return Err(invalid(
                "max_tokens: Input should be a valid integer",
                "max_tokens",
            ));
        }
    }
    let mut messages = Vec::new();
    if let Some(system) = request.get("system") {
        let text = text_of(system, "system")?;
        if !text.is_empty() {
            messages.push(json!({"role": "system", "content": text}));
        }
    }
    let Some(Value::Array(turns)) = request.get("messages") else {
        return Err(invalid("messages: Field required", "messages"));
    };
    if turns.is_empty() {
        return Err(invalid(
            "messages: at least one message is required",
            "messages",
        ));
    }
    for (at, turn) in turns.iter().enumerate() {
        turn_to_openai(turn, at, &mut messages)?;
    }
    chat.insert("messages".into(), Value::Array(messages));
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        chat.insert("stream".into(), Value::Bool(true));
        // The host bills from the usage: ask every upstream for it.
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    for field in ["temperature", "top_p"] {
        if let Some(value @ Value::Number(_)) = request.get(field) {
            chat.insert(field.into(), value.clone());
        }
    }
    if let Some(Value::Array(stops)) = request.get("stop_sequences")
        && !stops.is_empty()
    {
        chat.insert("stop".into(), Value::Array(stops.clone()));
    }
    if let Some(user) = request
        .get("metadata")
        .and_then(|metadata| metadata.get("user_id"))
        .and_then(Value::as_str)
    {
        chat.insert("user".into(), Value::String(user.to_owned()));
    }
    if let Some(Value::Array(tools)) = request.get("tools") {
        let functions: Vec<Value> = tools.iter().filter_map(tool_to_openai).collect();
        if !functions.is_empty() {
            chat.insert("tools".into(), Value::Array(functions));
        }
    }
    if let Some(choice) = request.get("tool_choice") {
        let kind = choice.get("type").and_then(Value::as_str);
        let mapped = match kind {
            Some("auto") => Some(json!("auto")),
            Some("any") => Some(json!("required")),
            Some("none") => Some(json!("none")),
            Some("tool") => {
                let name = choice.get("name").and_then(Value::as_str).ok_or_else(|| {
                    invalid("tool_choice.name: Field required", "tool_choice.name")
                })?;
                Some(json!({"type": "function", "function": {"name": name}}))
            }
            _ => None,
        };
        if let Some(mapped) = mapped {
            chat.insert("tool_choice".into(), mapped);
        }
        if choice
            .get("disable_parallel_tool_use")
            .and_then(Value::as_bool)
            == Some(true)
        {
            chat.insert("parallel_tool_calls".into(), Value::Bool(false));
        }
    }
    if let Some(format) = request
        .get("output_config")
        .and_then(|config| config.get("format"))
        && format.get("type").and_then(Value::as_str) == Some("json_schema")
        && let Some(schema) = format.get("schema")
    {
        chat.insert(
            "response_format".into(),
            json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": true}}),
        );
    }
    Ok(Value::Object(chat))
}

/// The text of a `system` prompt or a tool result: a string, or text blocks joined.
fn text_of(content: &Value, at: &str) -> Result<String, InvalidRequest> {
    match content {
        Value::String(text) => Ok(text.clone()),
        Value::Array(blocks) => Ok(blocks
            .iter()
            .filter(|block| block.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|block| block.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n")),
        _ => Err(invalid(
            format!("{at}: Input should be a valid string or a list of content blocks"),
            at,
        )),
    }
}

fn tool_to_openai(tool: &Value) -> Option<Value> {
    // Server tools (`web_search_20250305`, …) carry a versioned `type` and run at Anthropic only.
    if tool.get("type").is_some_and(|kind| kind != "custom") {
        return None;
    }
    let mut function = Map::new();
    function.insert("name".into(), tool.get("name")?.clone());
    if let Some(description) = tool.get("description") {
        function.insert("description".into(), description.clone());
    }
    function.insert(
        "parameters".into(),
        tool.get("input_schema")
            .cloned()
            .unwrap_or_else(|| json!({"type": "object"})),
    );
    Some(json!({"type": "function", "function": function}))
}

/// One Messages turn as OpenAI messages: a user turn's tool results become `tool` messages
/// (first, since they answer the assistant turn before), an assistant's tool uses `tool_calls`.
fn turn_to_openai(
    turn: &Value,
    at: usize,
    messages: &mut Vec<Value>,
) -> Result<(), InvalidRequest> {
    let here = format!("messages.{at}");
    let role = match turn.get("role").and_then(Value::as_str) {
        Some(role @ ("user" | "assistant")) => role,
        _ => {
            return Err(invalid(
                format!("{here}.role: Input should be 'user' or 'assistant'"),
                &format!("{here}.role"),
            ));
        }
    };
    let blocks = match turn.get("content") {
        Some(Value::String(text)) => {
            messages.push(json!({"role": role, "content": text}));
            return Ok(());
        }
        Some(Value::Array(blocks)) => blocks,
        _ => {
            return Err(invalid(
                format!("{here}.content: Field required"),
                &format!("{here}.content"),
            ));
        }
    };
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for (index, block) in blocks.iter().enumerate() {
        let at = format!("{here}.content.{index}");
        match block.get("type").and_then(Value::as_str) {
            Some("text") => {
                let piece = block
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                text.push_str(piece);
                parts.push(json!({"type": "text", "text": piece}));
            }
            Some("image") if role == "user" => parts.push(image_part(block, &at)?),
            Some("document") if role == "user" => {
                if let Some(part) = document_part(block) {
                    parts.push(part);
                }
            }
            Some("tool_result") if role == "user" => {
                let id = block
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        invalid(
                            format!("{at}.tool_use_id: Field required"),
                            &format!("{at}.tool_use_id"),
                        )
                    })?;
                let content = match block.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(content) => text_of(content, &format!("{at}.content"))?,
                };
                messages.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
            }
            Some("tool_use") if role == "assistant" => {
                let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                let mut call = json!({
                    "id": block.get("id").cloned().unwrap_or(Value::Null),
                    "type": "function",
                    "function": {
                        "name": block.get("name").cloned().unwrap_or(Value::Null),
                        "arguments": input.to_string(),
                    }
                });
                // What another channel's translator attached to the call (Gemini's thought
                // signature) comes back on the block; see `answer::carry_extra_content`.
                if let (Some(extra), Some(call)) =
                    (block.get("extra_content"), call.as_object_mut())
                {
                    call.insert("extra_content".into(), extra.clone());
                }
                tool_calls.push(call);
            }
            // Thinking, redacted thinking and server-tool blocks have no OpenAI form.
            _ => {}
        }
    }
    if role == "assistant" {
        let mut message = Map::new();
        message.insert("role".into(), json!("assistant"));
        message.insert(
            "content".into(),
            if text.is_empty() && !tool_calls.is_empty() {
                Value::Null
            } else {
                Value::String(text)
            },
        );
        if !tool_calls.is_empty() {
            message.insert("tool_calls".into(), Value::Array(tool_calls));
        }
        messages.push(Value::Object(message));
    } else if !parts.is_empty() {
        messages.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

fn image_part(block: &Value, at: &str) -> Result<Value, InvalidRequest> {
    let source = block.get("source").unwrap_or(&Value::Null);
    let url = match source.get("type").and_then(Value::as_str) {
        Some("base64") => format!(
            "data:{};base64,{}",
            source
                .get("media_type")
                .and_then(Value::as_str)
                .unwrap_or("image/png"),
            source
                .get("data")
                .and_then(Value::as_str)
                .unwrap_or_default()
        ),
        Some("url") => source
            .get("url")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        _ => {
            return Err(invalid(
                format!("{at}.source: only base64 and url image sources can go to this channel"),
                &format!("{at}.source"),
            ));
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// A document as OpenAI's `file` part (base64 PDFs) or as text (plain-text sources).
fn document_part(block: &Value) -> Option<Value> {
    let source = block.get("source")?;
    match source.get("type").and_then(Value::as_str)? {
        "base64" => Some(json!({"type": "file", "file": {
            "filename": block.get("title").and_then(Value::as_str).unwrap_or("document.pdf"),
            "file_data": format!(
                "data:{};base64,{}",
                source.get("media_type").and_then(Value::as_str).unwrap_or("application/pdf"),
                source.get("data").and_then(Value::as_str).unwrap_or_default()
            ),
        }})),
        "text" => Some(json!({"type": "text", "text": source.get("data")?})),
        _ => None,
    }
}
