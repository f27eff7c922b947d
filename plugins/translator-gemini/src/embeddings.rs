//! OpenAI embeddings ↔ Gemini `batchEmbedContents`: one request per input, vectors back in input
//! order. Gemini reports no token usage for embeddings: the usage is flagged for the host to count.
//! Vectors go back as floats; when the client asked for base64 the host encodes them.

use serde::Deserialize;
use serde_json::{Map, Value, json};
use tollgate_plugin_sdk::translator::{
    AttemptContext, EmbeddingsResponse, InvalidRequest, TranslateError, unreported_usage,
};

use tollgate_plugin_sdk::openai::{invalid, present};

/// The `batchEmbedContents` body for an OpenAI embeddings request.
pub fn batch_body(
    request: &Map<String, Value>,
    upstream_model: &str,
) -> Result<Value, InvalidRequest> {
    let inputs: Vec<&str> = match present(request, "input") {
        Some(Value::String(one)) => vec![one],
        Some(Value::Array(many)) if !many.is_empty() => many
            .iter()
            .map(Value::as_str)
            .collect::<Option<_>>()
            .ok_or_else(|| {
                invalid(
                    "a Gemini model embeds text: input must be a string or an array of strings",
                    "input",
                )
            })?,
        _ => {
            return Err(invalid(
                "input must be a string or a non-empty array of strings",
                "input",
            ));
        }
    };
    let dimensions = match present(request, "dimensions") {
        None => None,
        Some(value) => Some(
            value
                .as_u64()
                .filter(|dimensions| *dimensions > 0)
                .ok_or_else(|| invalid("dimensions must be a positive integer", "dimensions"))?,
        ),
    };
    let model = format!("models/{upstream_model}");
    let requests: Vec<Value> = inputs
        .into_iter()
        .map(|text| {
            let mut one = json!({ "model": model, "content": { "parts": [{ "text": text }] } });
            if let (Some(dimensions), Some(object)) = (dimensions, one.as_object_mut()) {
                object.insert("outputDimensionality".into(), json!(dimensions));
            }
            one
        })
        .collect();
    Ok(json!({ "requests": requests }))
}

#[derive(Debug, Deserialize)]
struct BatchEmbeddings {
    embeddings: Vec<Embedding>,
}

#[derive(Debug, Deserialize)]
struct Embedding {
    values: Vec<f64>,
}

/// Reads a 2xx `batchEmbedContents` answer into OpenAI's list, one entry per input in order.
pub fn embeddings_response(
    context: &AttemptContext,
    body: &[u8],
) -> Result<EmbeddingsResponse, TranslateError> {
    let batch: BatchEmbeddings = serde_json::from_slice(body)
        .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?;
    let data: Vec<Value> = batch
        .embeddings
        .into_iter()
        .enumerate()
        .map(|(index, embedding)| {
            json!({ "object": "embedding", "index": index, "embedding": embedding.values })
        })
        .collect();
    let list = json!({
        "object": "list",
        "data": data,
        "model": context.upstream_model,
        "usage": { "prompt_tokens": 0, "total_tokens": 0 }
    });
    Ok(EmbeddingsResponse {
        body: list.to_string(),
        usage: unreported_usage(),
        served_model: None,
    })
}
