//! Token counting for usage the upstream did not report: the o200k tokenizer (GPT-4o's) counts the
//! prompt and, for whole answers, the completion, and the record says `estimated`. Never on the
//! hot path: holds and limits use the cheap estimate of `request`; this runs only when an
//! upstream's usage is missing.

use serde_json::Value;

use crate::plugin::Operation;

/// Tokens of a text.
pub fn count(text: &str) -> u64 {
    tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(text)
        .len() as u64
}

/// The text of a `content` value: a string, or the text parts of an array.
fn content_text(content: &Value, into: &mut String) {
    match content {
        Value::String(text) => {
            into.push_str(text);
            into.push('\n');
        }
        Value::Array(parts) => {
            for part in parts {
                if let Some(text) = part.get("text").and_then(Value::as_str) {
                    into.push_str(text);
                    into.push('\n');
                }
            }
        }
        _ => {}
    }
}

/// Tokens of a client request's prompt: every message's text (chat) or every input (embeddings).
pub fn prompt_tokens(operation: Operation, body: &str) -> u64 {
    let Ok(body) = serde_json::from_str::<Value>(body) else {
        return 0;
    };
    let mut text = String::new();
    match operation {
        Operation::Chat => {
            for message in body["messages"].as_array().into_iter().flatten() {
                content_text(&message["content"], &mut text);
            }
        }
        Operation::Embeddings => match &body["input"] {
            Value::Array(items) => {
                for item in items {
                    content_text(item, &mut text);
                }
            }
            other => content_text(other, &mut text),
        },
    }
    count(text.trim_end())
}

/// Tokens of an OpenAI chat answer's messages.
pub fn answer_tokens(answer: &str) -> u64 {
    let Ok(answer) = serde_json::from_str::<Value>(answer) else {
        return 0;
    };
    let mut text = String::new();
    for choice in answer["choices"].as_array().into_iter().flatten() {
        content_text(&choice["message"]["content"], &mut text);
    }
    count(text.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_with_the_o200k_tokenizer() {
        assert_eq!(count("hello world"), 2);
        assert_eq!(count(""), 0);
        let prompt = r#"{"model":"m","messages":[{"role":"user","content":"hello world"},{"role":"user","content":[{"type":"text","text":"hello world"}]}]}"#;
        assert!(prompt_tokens(Operation::Chat, prompt) >= 4);
        let answer = r#"{"choices":[{"message":{"role":"assistant","content":"hello world"}}]}"#;
        assert_eq!(answer_tokens(answer), 2);
    }
}
