//! Cross protocol: an OpenAI `chat.completion` (from another channel's translator) as a Messages
//! answer.

use serde_json::{Value, json};
use tollgate_plugin_sdk::inbound::{AttemptContext, TranslateError, Usage};

/// Anthropic's `stop_reason` for OpenAI's `finish_reason`. A turn that called a tool stops for
/// `tool_use` whatever the upstream said, because that is what tells the client to run it.
pub fn stop_reason(finish_reason: Option<&str>, called_tools: bool) -> &'static str {
    if called_tools {
        return "tool_use";
    }
    match finish_reason {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// Anthropic's `usage` for a normalized usage: its `input_tokens` excludes cache reads and writes.
pub fn anthropic_usage(usage: &Usage) -> Value {
    json!({
        "input_tokens": usage
            .input_tokens
            .saturating_sub(usage.cache_read_tokens)
            .saturating_sub(usage.cache_write_tokens),
        "output_tokens": usage.output_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
    })
}

/// A tool call's JSON-string arguments as a `tool_use` input (an object; `{}` when unparsable).
pub fn tool_input(arguments: Option<&str>) -> Value {
    arguments
        .and_then(|arguments| serde_json::from_str::<Value>(arguments).ok())
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}))
}

/// Copies a tool call's `extra_content` onto its `tool_use` block. Gemini needs its thought
/// signature back with the call on the next turn; its translator puts it there, as Google's own
/// OpenAI-compatible endpoint does, and Anthropic's SDKs keep a block's unknown fields when the
/// client sends the turn back, so it returns the same way (`request` reads it).
pub fn carry_extra_content(call: &Value, block: &mut Value) {
    if let (Some(extra), Some(block)) = (call.get("extra_content"), block.as_object_mut()) {
        block.insert("extra_content".into(), extra.clone());
    }
}

/// The answer's id: one per request, in Anthropic's `msg_` form.
pub fn message_id(context: &AttemptContext) -> String {
    format!("msg_{}", context.request_id.replace('-', ""))
}

/// Converts a whole answer.
pub fn from_openai(context: &AttemptContext, body: &str) -> Result<String, TranslateError> {
    let answer: Value = serde_json::from_str(body)
        .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?;
    let choice = answer.pointer("/choices/0").unwrap_or(&Value::Null);
    let message = choice.get("message").unwrap_or(&Value::Null);
    let mut content = Vec::new();
    if let Some(text) = message.get("content").and_then(Value::as_str)
        && !text.is_empty()
    {
        content.push(json!({"type": "text", "text": text}));
    }
    let calls = message
        .get("tool_calls")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for call in calls {
        let mut block = json!({
            "type": "tool_use",
            "id": call.get("id").cloned().unwrap_or(Value::Null),
            "name": call.pointer("/function/name").cloned().unwrap_or(Value::Null),
            "input": tool_input(call.pointer("/function/arguments").and_then(Value::as_str)),
        });
        carry_extra_content(call, &mut block);
        content.push(block);
    }
    let usage = answer.get("usage").unwrap_or(&Value::Null);
    let count = |pointer: &str| usage.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
    let usage = Usage {
        input_tokens: count("/prompt_tokens"),
        cache_read_tokens: count("/prompt_tokens_details/cached_tokens"),
        cache_write_tokens: 0,
        output_tokens: count("/completion_tokens"),
        reasoning_tokens: count("/completion_tokens_details/reasoning_tokens"),
        estimated: false,
    };
    let model = answer
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(&context.public_model);
    Ok(json!({
        "id": message_id(context),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(
            choice.get("finish_reason").and_then(Value::as_str),
            !calls.is_empty(),
        ),
        "stop_sequence": null,
        "usage": anthropic_usage(&usage),
    })
    .to_string())
}
