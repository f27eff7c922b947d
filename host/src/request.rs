//! What the client asked, read from its OpenAI-shaped body before auth hands over to route: the
//! model, stream flags, output cap and a prompt-size estimate. The body itself stays opaque text
//! for the translator; nothing here is stored.

use serde_json::Value;

use crate::plugin::router::Operation;

/// The facts of a client request the host needs (the translator reads the rest).
#[derive(Debug, Clone)]
pub struct ClientRequest {
    /// What was called.
    pub operation: Operation,
    /// The body as the client sent it (valid JSON object text).
    pub body: String,
    /// Public model name.
    pub model: String,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage: true`.
    pub include_usage: bool,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_output_tokens: Option<u64>,
    /// Prompt tokens estimated by the host (about four bytes of text per token).
    pub estimated_input_tokens: u64,
    /// Embeddings: `encoding_format: "base64"`.
    pub base64_embeddings: bool,
}

/// A body the host refuses before any plugin sees it: HTTP 400.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct InvalidBody {
    /// What is wrong.
    pub message: String,
    /// The offending field.
    pub param: Option<String>,
}

fn invalid(message: impl Into<String>, param: &str) -> InvalidBody {
    InvalidBody {
        message: message.into(),
        param: Some(param.to_owned()),
    }
}

/// Reads the facts of a parsed body.
pub fn read(
    operation: Operation,
    body: String,
    json: &Value,
) -> Result<ClientRequest, InvalidBody> {
    let Value::Object(fields) = json else {
        return Err(InvalidBody {
            message: "The request body must be a JSON object.".to_owned(),
            param: None,
        });
    };
    let model = match fields.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        Some(_) => return Err(invalid("`model` must be a non-empty string.", "model")),
        None => return Err(invalid("you must provide a model parameter", "model")),
    };
    let (stream, include_usage, max_output_tokens, estimated_input_tokens) = match operation {
        Operation::Chat => {
            let Some(Value::Array(messages)) = fields.get("messages") else {
                return Err(invalid(
                    "`messages` must be an array of messages.",
                    "messages",
                ));
            };
            if messages.is_empty() {
                return Err(invalid("`messages` must not be empty.", "messages"));
            }
            let stream = match fields.get("stream") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(stream)) => *stream,
                Some(_) => return Err(invalid("`stream` must be a boolean.", "stream")),
            };
            let include_usage = fields
                .get("stream_options")
                .and_then(|options| options.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let max_output_tokens = fields
                .get("max_completion_tokens")
                .or_else(|| fields.get("max_tokens"))
                .and_then(Value::as_u64);
            let estimate = messages.iter().map(estimate_tokens).sum::<u64>() + 3;
            (stream, include_usage, max_output_tokens, estimate)
        }
        Operation::Embeddings => {
            let input = fields
                .get("input")
                .ok_or_else(|| invalid("you must provide an input parameter", "input"))?;
            (false, false, None, estimate_tokens(input))
        }
    };
    let base64_embeddings = operation == Operation::Embeddings
        && fields.get("encoding_format").and_then(Value::as_str) == Some("base64");
    Ok(ClientRequest {
        base64_embeddings,
        operation,
        body,
        model,
        stream,
        include_usage,
        max_output_tokens,
        estimated_input_tokens,
    })
}

/// Rough token count of a JSON value's text: four bytes per token, plus a little per item, as
/// tokenizers do for English. Used for holds and limits, and for usage only when the upstream
/// reports none (the record then says `estimated`).
fn estimate_tokens(value: &Value) -> u64 {
    match value {
        Value::String(text) => (text.len() as u64).div_ceil(4),
        Value::Array(items) => items.iter().map(estimate_tokens).sum::<u64>() + 1,
        Value::Object(fields) => fields.values().map(estimate_tokens).sum::<u64>() + 3,
        Value::Number(_) => 1,
        Value::Bool(_) | Value::Null => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(json: &str) -> Result<ClientRequest, InvalidBody> {
        let value: Value = serde_json::from_str(json).unwrap();
        read(Operation::Chat, json.to_owned(), &value)
    }

    #[test]
    fn reads_stream_flags_and_caps() {
        let request = chat(r#"{"model":"m","messages":[{"role":"user","content":"hello there"}],"stream":true,"stream_options":{"include_usage":true},"max_tokens":9}"#).unwrap();
        assert!(request.stream && request.include_usage);
        assert_eq!(request.max_output_tokens, Some(9));
        assert!(request.estimated_input_tokens >= 3);
    }

    #[test]
    fn names_the_bad_field() {
        assert_eq!(
            chat(r#"{"messages":[{}]}"#).unwrap_err().param.as_deref(),
            Some("model")
        );
        assert_eq!(
            chat(r#"{"model":"m"}"#).unwrap_err().param.as_deref(),
            Some("messages")
        );
        assert_eq!(
            chat(r#"{"model":"m","messages":[{}],"stream":"yes"}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("stream")
        );
    }
}
