//! The Gemini dialect: `POST /v1beta/models/{model}:generateContent`,
//! `:streamGenerateContent?alt=sse` and `:batchEmbedContents`, as strict as Google's API reference
//! where a translator could get it wrong: `x-goog-api-key` required (a bad key is Google's 400
//! `API_KEY_INVALID`), roles `user` and `model` only, no empty parts, function calls only in model
//! turns and answered by as many `functionResponse` parts in the next user turn, the thought
//! signature it issued present on the first function call of each model turn, inline media with a
//! MIME type and valid base64, temperature from 0 to 2, one candidate.
//!
//! Deterministic answers, like the Anthropic dialect's: `Tool results: …` after function
//! responses; a JSON text that satisfies `responseJsonSchema` (or `{"echo": …}` for a bare
//! `responseMimeType: application/json`); function calls for the declared functions the user text
//! names (or the allowed ones under mode `ANY`), text `Let me look that up.` first when it says
//! `explain`; otherwise `Echo: <last user text>`. With `thinkingConfig.includeThoughts` a thought
//! part comes first. Tokens are words; thoughts are counted in `thoughtsTokenCount` only.
//! Streams send the text word by word, the calls in one event, and the finish reason with the
//! usage in a last event of their own.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::{
    Dialect, Fault, Shared, admit, embedding, event_stream, lock, sample, signature, words,
};

/// Google's error body.
pub(crate) fn error_response(
    status: StatusCode,
    name: &str,
    message: &str,
    details: Vec<Value>,
) -> Response {
    let mut error = json!({"code": status.as_u16(), "message": message, "status": name});
    if !details.is_empty() {
        error["details"] = Value::Array(details);
    }
    (status, Json(json!({ "error": error }))).into_response()
}

fn invalid(message: impl AsRef<str>) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        "INVALID_ARGUMENT",
        message.as_ref(),
        Vec::new(),
    )
}

pub(crate) fn fault_status_response(status: u16, retry_after_s: Option<u64>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match status {
        // Google answers a bad key with 400, not 401.
        401 => error_response(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            vec![json!({
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"}
            })],
        ),
        403 => error_response(
            code,
            "PERMISSION_DENIED",
            "Method doesn't allow unregistered callers.",
            Vec::new(),
        ),
        404 => error_response(
            code,
            "NOT_FOUND",
            "models/unknown is not found for API version v1beta, or is not supported for generateContent.",
            Vec::new(),
        ),
        429 => {
            let mut details = vec![json!({
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests", "quotaValue": "15"}]
            })];
            if let Some(seconds) = retry_after_s {
                details.push(json!({
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": format!("{seconds}s")
                }));
            }
            error_response(
                code,
                "RESOURCE_EXHAUSTED",
                "You exceeded your current quota, please check your plan and billing details.",
                details,
            )
        }
        503 => error_response(
            code,
            "UNAVAILABLE",
            "The model is overloaded. Please try again later.",
            Vec::new(),
        ),
        400..=499 => error_response(
            code,
            "INVALID_ARGUMENT",
            "Simulated invalid request.",
            Vec::new(),
        ),
        _ => error_response(
            code,
            "INTERNAL",
            "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
            Vec::new(),
        ),
    }
}

fn parts_of(content: &Value) -> &[Value] {
    content
        .get("parts")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// The text a function call is signed over.
fn call_signature(call: &Value) -> String {
    signature(&format!(
        "{}{}",
        call.get("name").and_then(Value::as_str).unwrap_or(""),
        call.get("args").cloned().unwrap_or(Value::Null)
    ))
}

fn check(request: &Value) -> Result<(), String> {
    let contents = request
        .get("contents")
        .and_then(Value::as_array)
        .filter(|contents| !contents.is_empty())
        .ok_or("* GenerateContentRequest.contents: contents is not specified")?;
    if let Some(system) = request.get("systemInstruction") {
        for part in parts_of(system) {
            if !part.get("text").is_some_and(Value::is_string) {
                return Err("systemInstruction parts must be text".into());
            }
        }
    }
    let mut open_calls: Vec<String> = Vec::new();
    for (index, content) in contents.iter().enumerate() {
        let role = content.get("role").and_then(Value::as_str).unwrap_or("");
        if !matches!(role, "user" | "model") {
            return Err("Please use a valid role: user, model.".into());
        }
        let parts = parts_of(content);
        if parts.is_empty() {
            return Err(format!(
                "* GenerateContentRequest.contents[{index}].parts: contents.parts must not be empty."
            ));
        }
        let responses: Vec<String> = parts
            .iter()
            .filter_map(|part| {
                part.pointer("/functionResponse/name")
                    .and_then(Value::as_str)
            })
            .map(str::to_owned)
            .collect();
        if role == "model" && !responses.is_empty() {
            return Err(format!(
                "contents[{index}]: a functionResponse belongs in a user turn"
            ));
        }
        if !open_calls.is_empty() || !responses.is_empty() {
            let mut expected = open_calls.clone();
            let mut got = responses.clone();
            expected.sort();
            got.sort();
            if role != "user" || expected != got {
                return Err("Please ensure that the number of function response parts is equal to the number of function call parts of the function call turn.".into());
            }
        }
        open_calls.clear();
        let mut first_call = true;
        for (position, part) in parts.iter().enumerate() {
            let at = format!("contents[{index}].parts[{position}]");
            check_part(part, &at)?;
            if let Some(call) = part.get("functionCall") {
                if role != "model" {
                    return Err(format!("{at}: a functionCall belongs in a model turn"));
                }
                if first_call
                    && part.get("thoughtSignature").and_then(Value::as_str)
                        != Some(call_signature(call).as_str())
                {
                    return Err(format!(
                        "Function call is missing a thought_signature in functionCall parts. This is required for tools to work correctly, and missing thought_signature may lead to degraded model performance. Additional data, function call `default_api:{}` , position {} .",
                        call.get("name").and_then(Value::as_str).unwrap_or(""),
                        position + 1
                    ));
                }
                first_call = false;
                open_calls.push(
                    call.get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
        }
    }
    if !open_calls.is_empty() {
        return Err("Please ensure that function call turn comes immediately after a user turn or after a function response turn.".into());
    }
    if let Some(config) = request.get("generationConfig") {
        if let Some(temperature) = config.get("temperature")
            && !temperature
                .as_f64()
                .is_some_and(|value| (0.0..=2.0).contains(&value))
        {
            return Err(
                "* GenerateContentRequest.generation_config.temperature: must be in [0.0, 2.0]"
                    .into(),
            );
        }
        if config
            .get("candidateCount")
            .is_some_and(|count| count.as_u64() != Some(1))
        {
            return Err("Only one candidate can be specified in the current model".into());
        }
        if let Some(mime) = config.get("responseMimeType").and_then(Value::as_str)
            && !matches!(mime, "text/plain" | "application/json" | "text/x.enum")
        {
            return Err(format!(
                "* GenerateContentRequest.generation_config.response_mime_type: allowed mimetypes are `text/plain`, `application/json`, and `text/x.enum`, got {mime}"
            ));
        }
    }
    for tool in request
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for declaration in tool
            .get("functionDeclarations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !declaration.get("name").is_some_and(Value::is_string) {
                return Err("* GenerateContentRequest.tools[0].function_declarations[0].name: Invalid function name.".into());
            }
        }
    }
    if let Some(mode) = request
        .pointer("/toolConfig/functionCallingConfig/mode")
        .and_then(Value::as_str)
        && !matches!(mode, "AUTO" | "ANY" | "NONE" | "VALIDATED")
    {
        return Err(format!(
            "Invalid value at 'tool_config.function_calling_config.mode' ({mode})"
        ));
    }
    Ok(())
}

fn check_part(part: &Value, at: &str) -> Result<(), String> {
    let data_fields = [
        "text",
        "inlineData",
        "fileData",
        "functionCall",
        "functionResponse",
    ];
    let present = data_fields
        .iter()
        .filter(|field| part.get(**field).is_some())
        .count();
    if present != 1 {
        return Err(format!(
            "* GenerateContentRequest.{at}.data: required oneof field 'data' must have one initialized field"
        ));
    }
    if let Some(inline) = part.get("inlineData") {
        let mime = inline.get("mimeType").and_then(Value::as_str).unwrap_or("");
        let data = inline.get("data").and_then(Value::as_str).unwrap_or("");
        if mime.is_empty() || !mime.contains('/') {
            return Err(format!("{at}.inline_data.mime_type: required"));
        }
        if base64::engine::general_purpose::STANDARD
            .decode(data)
            .is_err()
            || data.is_empty()
        {
            return Err(format!(
                "Invalid value at '{at}.inline_data.data' (TYPE_BYTES), Base64 decoding failed"
            ));
        }
    }
    if let Some(file) = part.get("fileData")
        && (!file.get("fileUri").is_some_and(Value::is_string)
            || !file.get("mimeType").is_some_and(Value::is_string))
    {
        return Err(format!("{at}.file_data: fileUri and mimeType are required"));
    }
    if let Some(response) = part.get("functionResponse")
        && !response.get("response").is_some_and(Value::is_object)
    {
        return Err(format!(
            "{at}.function_response.response: must be an object"
        ));
    }
    Ok(())
}

/// One part of the answer.
enum Part {
    Thought(String),
    Text(String),
    Call { name: String, args: Value },
}

impl Part {
    fn to_json(&self, first_call: bool) -> Value {
        match self {
            Self::Thought(text) => json!({"text": text, "thought": true}),
            Self::Text(text) => json!({"text": text}),
            Self::Call { name, args } => {
                let call = json!({"name": name, "args": args});
                let mut part = json!({"functionCall": call});
                if first_call {
                    part["thoughtSignature"] = json!(call_signature(&call));
                }
                part
            }
        }
    }
}

struct Answer {
    parts: Vec<Part>,
    finish_reason: &'static str,
    prompt_tokens: u64,
    candidate_tokens: u64,
    thought_tokens: u64,
}

impl Answer {
    fn parts_json(&self) -> Vec<Value> {
        let mut first_call = true;
        self.parts
            .iter()
            .map(|part| {
                let json = part.to_json(first_call);
                if matches!(part, Part::Call { .. }) {
                    first_call = false;
                }
                json
            })
            .collect()
    }

    fn usage(&self) -> Value {
        json!({
            "promptTokenCount": self.prompt_tokens,
            "candidatesTokenCount": self.candidate_tokens,
            "thoughtsTokenCount": self.thought_tokens,
            "totalTokenCount": self.prompt_tokens + self.candidate_tokens + self.thought_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": self.prompt_tokens}]
        })
    }
}

fn part_words(part: &Value) -> u64 {
    if let Some(text) = part.get("text").and_then(Value::as_str) {
        return words(text);
    }
    if let Some(response) = part.pointer("/functionResponse/response") {
        return words(&response.to_string());
    }
    part.pointer("/functionCall/args")
        .map_or(0, |args| words(&args.to_string()))
}

fn answer(request: &Value) -> Answer {
    let contents = request
        .get("contents")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let system_words: u64 = request
        .get("systemInstruction")
        .map_or(0, |system| parts_of(system).iter().map(part_words).sum());
    let prompt_tokens = system_words
        + contents
            .iter()
            .flat_map(|content| parts_of(content).iter())
            .map(part_words)
            .sum::<u64>();
    let last_user = contents
        .iter()
        .rev()
        .find(|content| content.get("role").and_then(Value::as_str) == Some("user"));
    let last_parts = last_user.map_or(&[][..], parts_of);
    let user_text = last_parts
        .iter()
        .filter_map(|part| part.get("text").and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join(" ");
    let results: Vec<String> = last_parts
        .iter()
        .filter_map(|part| part.pointer("/functionResponse/response"))
        .map(|response| match response.get("result") {
            Some(Value::String(text)) => text.clone(),
            _ => response.to_string(),
        })
        .collect();

    let mut parts = Vec::new();
    if request
        .pointer("/generationConfig/thinkingConfig/includeThoughts")
        .and_then(Value::as_bool)
        == Some(true)
    {
        parts.push(Part::Thought(format!("Considering: {user_text}")));
    }
    let declarations: Vec<&Value> = request
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|tool| tool.get("functionDeclarations").and_then(Value::as_array))
        .flatten()
        .collect();
    let calling = request.pointer("/toolConfig/functionCallingConfig");
    let mode = calling
        .and_then(|config| config.get("mode"))
        .and_then(Value::as_str)
        .unwrap_or("AUTO");
    let allowed: Option<Vec<&str>> = calling
        .and_then(|config| config.get("allowedFunctionNames"))
        .and_then(Value::as_array)
        .map(|names| names.iter().filter_map(Value::as_str).collect());
    let name_of = |declaration: &&Value| {
        declaration
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let mut called: Vec<&Value> = match mode {
        "NONE" => Vec::new(),
        _ => declarations
            .iter()
            .copied()
            .filter(|declaration| {
                let name = name_of(declaration);
                allowed
                    .as_ref()
                    .map_or(user_text.contains(&name), |allowed| {
                        allowed.contains(&name.as_str())
                    })
            })
            .collect(),
    };
    if called.is_empty() && mode == "ANY" {
        called.extend(declarations.first().copied());
    }
    let config = request.get("generationConfig");
    let json_mode = config
        .and_then(|config| config.get("responseMimeType"))
        .and_then(Value::as_str)
        == Some("application/json");
    if !results.is_empty() {
        parts.push(Part::Text(format!("Tool results: {}", results.join(" "))));
    } else if json_mode {
        let text = match config.and_then(|config| config.get("responseJsonSchema")) {
            Some(schema) => sample(schema, "value"),
            None => json!({ "echo": user_text }),
        };
        parts.push(Part::Text(text.to_string()));
    } else if !called.is_empty() {
        if user_text.contains("explain") {
            parts.push(Part::Text("Let me look that up.".into()));
        }
        for declaration in called {
            let name = name_of(&declaration);
            let schema = declaration
                .get("parametersJsonSchema")
                .or_else(|| declaration.get("parameters"))
                .unwrap_or(&Value::Null);
            parts.push(Part::Call {
                args: sample(schema, &name),
                name,
            });
        }
    } else {
        parts.push(Part::Text(format!("Echo: {user_text}")));
    }
    let mut finish_reason = "STOP";
    if let Some(limit) = config
        .and_then(|config| config.get("maxOutputTokens"))
        .and_then(Value::as_u64)
    {
        for part in &mut parts {
            if let Part::Text(text) = part {
                let kept: Vec<&str> = text.split_whitespace().collect();
                if kept.len() as u64 > limit {
                    *text = kept[..limit as usize].join(" ");
                    finish_reason = "MAX_TOKENS";
                }
            }
        }
    }
    let thought_tokens = parts
        .iter()
        .map(|part| match part {
            Part::Thought(text) => words(text),
            _ => 0,
        })
        .sum();
    let candidate_tokens = parts
        .iter()
        .map(|part| match part {
            Part::Thought(_) => 0,
            Part::Text(text) => words(text),
            Part::Call { args, .. } => words(&args.to_string()).max(1),
        })
        .sum();
    Answer {
        parts,
        finish_reason,
        prompt_tokens,
        candidate_tokens,
        thought_tokens,
    }
}

/// `POST /v1beta/models/{model}:{method}`.
pub(crate) async fn models(
    State(shared): State<Arc<Shared>>,
    Path(target): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/v1beta/models/{target}");
    let (request, fault) = match admit(&shared, Dialect::Gemini, &path, &headers, &body).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let Some((model, method)) = target.split_once(':') else {
        return error_response(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "Method not found.",
            Vec::new(),
        );
    };
    match method {
        "generateContent" => generate(&shared, fault, model, &request, false),
        "streamGenerateContent" if query.as_deref() == Some("alt=sse") => {
            generate(&shared, fault, model, &request, true)
        }
        "streamGenerateContent" => invalid("this simulator streams only with alt=sse"),
        "batchEmbedContents" => batch_embed(model, &request),
        _ => error_response(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "Method not found.",
            Vec::new(),
        ),
    }
}

fn generate(
    shared: &Arc<Shared>,
    fault: Fault,
    model: &str,
    request: &Value,
    stream: bool,
) -> Response {
    if let Err(message) = check(request) {
        return invalid(message);
    }
    let seed = lock(&shared.seen).len();
    let response_id = format!("sim{seed:08x}");
    let model = fault
        .served_model
        .clone()
        .unwrap_or_else(|| model.to_owned());
    let answer = answer(request);
    if fault.safety_block {
        let blocked = json!({
            "promptFeedback": {
                "blockReason": "SAFETY",
                "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}]
            },
            "usageMetadata": {"promptTokenCount": answer.prompt_tokens, "totalTokenCount": answer.prompt_tokens},
            "modelVersion": model,
            "responseId": response_id
        });
        if stream {
            return event_stream(shared.clone(), fault, vec![frame(&blocked)]);
        }
        return Json(blocked).into_response();
    }
    if !stream {
        let whole = json!({
            "candidates": [{
                "content": {"role": "model", "parts": answer.parts_json()},
                "finishReason": answer.finish_reason,
                "index": 0
            }],
            "usageMetadata": answer.usage(),
            "modelVersion": model,
            "responseId": response_id
        });
        return crate::whole_answer(&fault, &whole);
    }
    let event = |parts: Vec<Value>, finish: Option<&str>, usage: Option<Value>| {
        let mut candidate = json!({"content": {"role": "model", "parts": parts}, "index": 0});
        if let Some(finish) = finish {
            candidate["finishReason"] = json!(finish);
        }
        let mut response =
            json!({"candidates": [candidate], "modelVersion": model, "responseId": response_id});
        if let Some(usage) = usage {
            response["usageMetadata"] = usage;
        }
        frame(&response)
    };
    let mut frames = Vec::new();
    let parts = answer.parts_json();
    let (calls, texts): (Vec<Value>, Vec<Value>) = parts
        .into_iter()
        .partition(|part| part.get("functionCall").is_some());
    for part in texts {
        let thought = part.get("thought").is_some();
        let text = part.get("text").and_then(Value::as_str).unwrap_or("");
        for piece in text.split_inclusive(' ') {
            let mut piece_part = json!({"text": piece});
            if thought {
                piece_part["thought"] = json!(true);
            }
            frames.push(event(vec![piece_part], None, None));
            if fault.error_event {
                frames.push(frame(&json!({"error": {
                    "code": 503, "message": "The model is overloaded. Please try again later.", "status": "UNAVAILABLE"
                }})));
                return event_stream(shared.clone(), fault, frames);
            }
        }
    }
    if !calls.is_empty() {
        frames.push(event(calls, None, None));
    }
    frames.push(event(
        vec![json!({"text": ""})],
        Some(answer.finish_reason),
        Some(answer.usage()),
    ));
    event_stream(shared.clone(), fault, frames)
}

/// One SSE event as Google frames it.
fn frame(response: &Value) -> Bytes {
    Bytes::from(format!("data: {response}\r\n\r\n"))
}

fn batch_embed(model: &str, request: &Value) -> Response {
    let Some(requests) = request
        .get("requests")
        .and_then(Value::as_array)
        .filter(|requests| !requests.is_empty())
    else {
        return invalid("* BatchEmbedContentsRequest.requests: requests is not specified");
    };
    let expected_model = format!("models/{model}");
    let mut embeddings = Vec::new();
    for (index, one) in requests.iter().enumerate() {
        if one.get("model").and_then(Value::as_str) != Some(expected_model.as_str()) {
            return invalid(format!(
                "* BatchEmbedContentsRequest.requests[{index}].model: the model must be {expected_model}, as in the URL"
            ));
        }
        let text = one
            .get("content")
            .map(parts_of)
            .unwrap_or_default()
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        if text.is_empty() {
            return invalid(format!(
                "* BatchEmbedContentsRequest.requests[{index}].content.parts: contents.parts must not be empty."
            ));
        }
        let dimensions = one
            .get("outputDimensionality")
            .and_then(Value::as_u64)
            .unwrap_or(8) as usize;
        embeddings.push(json!({ "values": embedding(&text, dimensions) }));
    }
    Json(json!({ "embeddings": embeddings })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(request: Value) -> String {
        check(&request).expect_err("Google refuses this")
    }

    #[test]
    fn it_is_as_strict_as_gemini_where_translators_go_wrong() {
        let user = |text: &str| json!({"role": "user", "parts": [{"text": text}]});
        assert!(check(&json!({"contents": [user("hi")]})).is_ok());
        assert!(refused(json!({"contents": []})).contains("contents"));
        assert!(
            refused(json!({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}))
                .contains("valid role")
        );
        assert!(
            refused(json!({"contents": [{"role": "user", "parts": []}]}))
                .contains("must not be empty")
        );
        let call = json!({"name": "f", "args": {"a": 1}});
        let unsigned = json!({"role": "model", "parts": [{"functionCall": call}]});
        let answer = json!({"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {"ok": true}}}]});
        assert!(
            refused(json!({"contents": [user("go"), unsigned, answer]}))
                .contains("thought_signature")
        );
        let signed = json!({"role": "model", "parts": [{"functionCall": call, "thoughtSignature": call_signature(&call)}]});
        assert!(check(&json!({"contents": [user("go"), signed, answer]})).is_ok());
        assert!(
            refused(json!({"contents": [user("go"), signed, user("no answer")]}))
                .contains("number of function response parts")
        );
        let bad_image = json!({"role": "user", "parts": [{"inlineData": {"mimeType": "image/png", "data": "@@@"}}]});
        assert!(refused(json!({"contents": [bad_image]})).contains("Base64"));
        assert!(
            refused(json!({"contents": [user("x")], "generationConfig": {"temperature": 2.5}}))
                .contains("temperature")
        );
        assert!(
            refused(json!({"contents": [user("x")], "generationConfig": {"candidateCount": 2}}))
                .contains("candidate")
        );
    }
}
