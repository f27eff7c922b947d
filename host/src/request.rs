//! What the client asked, read from its OpenAI-shaped body before auth hands over to route: the
//! model, stream flags, output cap, a prompt-size estimate and a prompt-size bound. The body itself
//! stays opaque text for the translator; nothing here is stored.
//!
//! The bound is what holds rest on, so it must hold under every provider's tokenizer, which the
//! host does not have: every tokenizer in use is byte-level (BPE over UTF-8 bytes, or
//! SentencePiece with byte fallback), so a text never makes more tokens than it has bytes. Media
//! are not text: an image or a file counts a fixed number of tokens, documented in
//! `docs/money.md`, and is never fetched to be sized.

use bytes::Bytes;
use serde_json::Value;

use crate::plugin::Operation;

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
    /// `max_completion_tokens`, else `max_tokens`: the client's cap on output tokens.
    pub max_output_tokens: Option<u64>,
    /// Prompt tokens estimated by the host (about four bytes of text per token), for rate limits
    /// and for the usage shown when an upstream reports none.
    pub estimated_input_tokens: u64,
    /// Prompt tokens no provider counts more of (see the module doc), for holds.
    pub prompt_bound_tokens: u64,
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

/// A body as JSON text and value; a 400 naming the parse error otherwise.
pub fn parse_json(body: Bytes) -> Result<(String, Value), InvalidBody> {
    let value: Value = serde_json::from_slice(&body).map_err(|error| InvalidBody {
        message: format!(
            "We could not parse the JSON body of your request ({error}). The OpenAI API expects a \
             JSON payload."
        ),
        param: None,
    })?;
    Ok((utf8(body)?, value))
}

/// A body as JSON text, checked to be JSON without building a value (the client protocol's
/// plugin reads it); a 400 naming the parse error otherwise.
pub fn json_text(body: Bytes) -> Result<String, InvalidBody> {
    serde_json::from_slice::<serde::de::IgnoredAny>(&body).map_err(|error| InvalidBody {
        message: format!("The request body is not valid JSON ({error})."),
        param: None,
    })?;
    utf8(body)
}

fn utf8(body: Bytes) -> Result<String, InvalidBody> {
    String::from_utf8(Vec::from(body)).map_err(|_| InvalidBody {
        message: "The request body is not UTF-8.".to_owned(),
        param: None,
    })
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
            let max_output_tokens = match output_cap(fields, "max_completion_tokens")? {
                Some(cap) => Some(cap),
                None => output_cap(fields, "max_tokens")?,
            };
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
    let prompt_bound_tokens = prompt_bound(json, &|text: &str| text.len() as u64);
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
        prompt_bound_tokens,
    })
}

impl ClientRequest {
    /// Puts an output cap the client did not set into its body, as `max_completion_tokens` (the
    /// translators map it to their protocol's field): the hold covers no more output than this.
    /// A client's own cap is never raised: a request whose cap does not fit is refused instead.
    pub fn cap_output(&mut self, cap: u64) {
        let Ok(Value::Object(mut fields)) = serde_json::from_str::<Value>(&self.body) else {
            return;
        };
        fields.insert("max_completion_tokens".to_owned(), Value::from(cap));
        self.body = Value::Object(fields).to_string();
        self.max_output_tokens = Some(cap);
    }
}

/// A client's output cap: absent or `null`, or a positive integer; anything else is a 400 naming
/// the field (a cap the host ignored would leave the hold without its bound).
fn output_cap(
    fields: &serde_json::Map<String, Value>,
    field: &str,
) -> Result<Option<u64>, InvalidBody> {
    match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match value.as_u64() {
            Some(cap) if cap > 0 => Ok(Some(cap)),
            _ => Err(invalid(
                format!("`{field}` must be a positive integer."),
                field,
            )),
        },
    }
}

/// Tokens an image counts in a prompt bound, whatever its size: the most any provider documents
/// for one image is below it (OpenAI's patch-based models about 2,500, Anthropic's about 1,600 at
/// 1.15 megapixels, Gemini's tiles 258 each up to a few thousand).
pub const IMAGE_BOUND_TOKENS: u64 = 10_000;

/// Tokens a file (a PDF or another document) counts in a prompt bound: 100 pages, the page limit
/// of OpenAI's and Anthropic's chat APIs, at 4,000 tokens a page (text and page image). A model's
/// `max_input_tokens` caps the whole bound when it is configured.
pub const FILE_BOUND_TOKENS: u64 = 400_000;

/// Tokens of formatting around the prompt's parts that no text accounts for: per object (a
/// message's role and separators), per array item, and once for the answer's priming.
const OBJECT_OVERHEAD_TOKENS: u64 = 4;
const ITEM_OVERHEAD_TOKENS: u64 = 1;
const REQUEST_OVERHEAD_TOKENS: u64 = 16;

/// A bound on the prompt tokens of a body, every string (keys too: tool schemas become text) by
/// `measure`, plus the formatting overheads, with images and files at their fixed bounds. With
/// `measure` the UTF-8 length it holds for every byte-level tokenizer; `bill` also calls it with
/// a tokenizer count and a margin, when the balance is too low for the byte bound.
pub fn prompt_bound(body: &Value, measure: &dyn Fn(&str) -> u64) -> u64 {
    fn walk(value: &Value, measure: &dyn Fn(&str) -> u64) -> u64 {
        match value {
            Value::String(text) => measure(text),
            Value::Number(number) => measure(&number.to_string()).max(1),
            Value::Bool(_) | Value::Null => 1,
            Value::Array(items) => items
                .iter()
                .map(|item| walk(item, measure).saturating_add(ITEM_OVERHEAD_TOKENS))
                .fold(0, u64::saturating_add),
            Value::Object(fields) => match fields.get("type").and_then(Value::as_str) {
                Some("image_url" | "image") => IMAGE_BOUND_TOKENS,
                Some("file" | "document") => FILE_BOUND_TOKENS,
                _ => fields
                    .iter()
                    .map(|(key, value)| measure(key).saturating_add(walk(value, measure)))
                    .fold(OBJECT_OVERHEAD_TOKENS, u64::saturating_add),
            },
        }
    }
    walk(body, measure).saturating_add(REQUEST_OVERHEAD_TOKENS)
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
    fn an_output_cap_that_is_not_a_positive_integer_is_refused_by_name() {
        for (body, field) in [
            (r#""max_tokens":0"#, "max_tokens"),
            (r#""max_tokens":-5"#, "max_tokens"),
            (r#""max_completion_tokens":1.5"#, "max_completion_tokens"),
            (r#""max_completion_tokens":"9""#, "max_completion_tokens"),
        ] {
            let json =
                format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],{body}}}"#);
            let error = chat(&json).expect_err(body);
            assert_eq!(error.param.as_deref(), Some(field), "{body}");
        }
        let null =
            chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":null}"#);
        assert_eq!(null.expect("null is no cap").max_output_tokens, None);
    }

    #[test]
    fn the_prompt_bound_is_at_least_the_text_bytes_and_counts_media_at_their_bound() {
        let cjk = "漢字".repeat(1_000);
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"{cjk}"}},{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"https://example.com/a.png"}}}},{{"type":"file","file":{{"file_id":"file-1"}}}}]}}]}}"#
        );
        let request = chat(&body).expect("a valid body");
        assert!(
            request.prompt_bound_tokens
                >= cjk.len() as u64 + IMAGE_BOUND_TOKENS + FILE_BOUND_TOKENS
        );
        // The cheap estimate is no bound: a CJK character is about one token, and three bytes.
        assert!(request.estimated_input_tokens < cjk.chars().count() as u64);
        assert!(
            request.prompt_bound_tokens
                < cjk.len() as u64 + IMAGE_BOUND_TOKENS + FILE_BOUND_TOKENS + 200
        );
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
