//! A whole Gemini `GenerateContentResponse` → an OpenAI `chat.completion`. The response types here
//! also read each event of a stream, which is a sequence of the same responses.

use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_plugin_sdk::translator::{
    AttemptContext, ChatResponse, TranslateError, openai_usage, unreported_usage,
};

use crate::failure::GoogleError;
use crate::usage::{UsageMetadata, finish_reason};

/// Gemini's response (whole, or one stream event); unknown fields ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct GenerateContentResponse {
    pub candidates: Vec<Candidate>,
    pub prompt_feedback: Option<PromptFeedback>,
    pub usage_metadata: Option<UsageMetadata>,
    pub model_version: Option<String>,
    pub response_id: Option<String>,
    /// Present when a stream event carries an error instead of content.
    pub error: Option<GoogleError>,
}

impl GenerateContentResponse {
    /// The first candidate's parts (the gateway asks for one candidate).
    pub fn parts(&mut self) -> Vec<Part> {
        self.candidates
            .first_mut()
            .and_then(|candidate| candidate.content.take())
            .map(|content| content.parts)
            .unwrap_or_default()
    }

    pub fn finish_reason(&self) -> Option<&str> {
        self.candidates
            .first()
            .and_then(|candidate| candidate.finish_reason.as_deref())
    }

    pub fn blocked(&self) -> bool {
        self.prompt_feedback
            .as_ref()
            .is_some_and(|feedback| feedback.block_reason.is_some())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Candidate {
    pub content: Option<Content>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Content {
    pub parts: Vec<Part>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct PromptFeedback {
    pub block_reason: Option<String>,
}

/// One part; kinds OpenAI's shape has no place for (code execution, inline media answers) are
/// skipped.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Part {
    pub text: Option<String>,
    /// The text is the model's thinking, not its answer.
    pub thought: bool,
    pub function_call: Option<FunctionCall>,
    pub thought_signature: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct FunctionCall {
    pub id: Option<String>,
    pub name: String,
    pub args: Value,
}

/// An OpenAI tool call for a Gemini function call. Gemini gives no id (or only sometimes): one is
/// minted from the request id and the call's position, unique within the conversation. The
/// thought signature rides along where Google's own OpenAI-compatible endpoint puts it.
pub(crate) fn tool_call(
    call: FunctionCall,
    signature: Option<String>,
    request_id: &str,
    position: usize,
) -> Value {
    let id = call
        .id
        .unwrap_or_else(|| format!("call_{request_id}_{position}"));
    let arguments = if call.args.is_null() {
        "{}".to_owned()
    } else {
        call.args.to_string()
    };
    let mut tool_call = json!({
        "id": id, "type": "function",
        "function": { "name": call.name, "arguments": arguments }
    });
    if let Some(signature) = signature
        && let Some(object) = tool_call.as_object_mut()
    {
        object.insert(
            "extra_content".into(),
            json!({ "google": { "thought_signature": signature } }),
        );
    }
    tool_call
}

/// Reads a 2xx answer.
pub fn chat_response(
    context: &AttemptContext,
    body: &[u8],
) -> Result<ChatResponse, TranslateError> {
    let mut response: GenerateContentResponse = serde_json::from_slice(body)
        .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?;
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut tool_calls = Vec::new();
    for part in response.parts() {
        if let Some(call) = part.function_call {
            let position = tool_calls.len();
            tool_calls.push(tool_call(
                call,
                part.thought_signature,
                &context.request_id,
                position,
            ));
        } else if let Some(part_text) = part.text {
            if part.thought {
                reasoning.push_str(&part_text);
            } else {
                text.push_str(&part_text);
            }
        }
    }
    let finish = finish_reason(
        response.finish_reason(),
        !tool_calls.is_empty(),
        response.blocked(),
    );
    let mut message = json!({
        "role": "assistant",
        "content": if text.is_empty() && (!tool_calls.is_empty() || response.blocked()) { Value::Null } else { json!(text) },
        "refusal": null,
    });
    if let Some(object) = message.as_object_mut() {
        if !tool_calls.is_empty() {
            object.insert("tool_calls".into(), Value::Array(tool_calls));
        }
        if !reasoning.is_empty() {
            object.insert("reasoning_content".into(), json!(reasoning));
        }
    }
    let usage = response
        .usage_metadata
        .as_ref()
        .map_or_else(unreported_usage, UsageMetadata::normalize);
    let model = response
        .model_version
        .clone()
        .unwrap_or_else(|| context.upstream_model.clone());
    let id = response
        .response_id
        .as_deref()
        .unwrap_or(&context.request_id);
    let mut completion = json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion",
        "created": context.created_unix_s,
        "model": model,
        "choices": [{ "index": 0, "message": message, "logprobs": null, "finish_reason": finish }],
    });
    if response.usage_metadata.is_some()
        && let Some(object) = completion.as_object_mut()
    {
        object.insert("usage".into(), openai_usage(&usage));
    }
    Ok(ChatResponse {
        body: completion.to_string(),
        usage,
        served_model: response.model_version,
    })
}
