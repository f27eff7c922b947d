//! A whole Anthropic Messages answer → an OpenAI `chat.completion`.

use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_plugin_sdk::translator::{
    AttemptContext, ChatResponse, TranslateError, openai_usage, unreported_usage,
};

use crate::usage::{AnthropicUsage, finish_reason};

/// The parts of an Anthropic `message` the translator reads.
#[derive(Debug, Deserialize)]
struct Message {
    id: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    content: Vec<Block>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<AnthropicUsage>,
}

/// A content block, whole in an answer or opening a stream's `content_block_start`; kinds OpenAI's
/// shape has no place for (redacted thinking, server tools, citations' own blocks) are skipped.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Block {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    Thinking {
        #[serde(default)]
        thinking: String,
    },
    #[serde(other)]
    Other,
}

/// Reads a 2xx answer.
pub fn chat_response(
    context: &AttemptContext,
    body: &[u8],
) -> Result<ChatResponse, TranslateError> {
    let message: Message = serde_json::from_slice(body)
        .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?;
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut tool_calls = Vec::new();
    for block in message.content {
        match block {
            Block::Text { text: part } => text.push_str(&part),
            Block::Thinking { thinking } => reasoning.push_str(&thinking),
            Block::ToolUse { id, name, input } => {
                let arguments = if input.is_null() {
                    "{}".to_owned()
                } else {
                    input.to_string()
                };
                tool_calls.push(json!({
                    "id": id, "type": "function",
                    "function": { "name": name, "arguments": arguments }
                }));
            }
            Block::Other => {}
        }
    }
    let finish = finish_reason(message.stop_reason.as_deref(), !tool_calls.is_empty());
    let mut reply = json!({
        "role": "assistant",
        "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { json!(text) },
        "refusal": null,
    });
    if let Some(object) = reply.as_object_mut() {
        if !tool_calls.is_empty() {
            object.insert("tool_calls".into(), Value::Array(tool_calls));
        }
        if !reasoning.is_empty() {
            object.insert("reasoning_content".into(), json!(reasoning));
        }
    }
    // An answer without usage is billed from the host's own count, flagged as an estimate.
    let usage = message
        .usage
        .as_ref()
        .map_or_else(unreported_usage, AnthropicUsage::normalize);
    let model = message
        .model
        .clone()
        .unwrap_or_else(|| context.upstream_model.clone());
    let mut completion = json!({
        "id": format!("chatcmpl-{}", message.id),
        "object": "chat.completion",
        "created": context.created_unix_s,
        "model": model,
        "choices": [{ "index": 0, "message": reply, "logprobs": null, "finish_reason": finish }],
    });
    if message.usage.is_some()
        && let Some(object) = completion.as_object_mut()
    {
        object.insert("usage".into(), openai_usage(&usage));
    }
    Ok(ChatResponse {
        body: completion.to_string(),
        usage,
        served_model: message.model,
    })
}
