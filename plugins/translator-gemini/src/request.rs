//! OpenAI chat-completions request → Gemini `generateContent` request.
//!
//! Gemini keeps system text outside the conversation (`systemInstruction`), knows the roles `user`
//! and `model` only, takes tool results as `functionResponse` parts named after the function (it has
//! no call ids: the name is found from the id in the conversation's own assistant turn), and needs
//! a model's thought signature back on the function-call part it came with. The signature travels
//! inside the OpenAI tool call as Google's OpenAI-compatible endpoint carries it:
//! `extra_content.google.thought_signature`.

use serde_json::{Map, Value, json};
use tollgate_plugin_sdk::openai::{
    self, Message, ToolChoice, Turns, data_url, invalid, max_output_tokens, present, stop_sequences,
};
use tollgate_plugin_sdk::translator::InvalidRequest;

/// Media types Gemini accepts inline or by URI, by file extension for URLs.
const URL_MEDIA_TYPES: &[(&str, &str)] = &[
    (".png", "image/png"),
    (".jpg", "image/jpeg"),
    (".jpeg", "image/jpeg"),
    (".webp", "image/webp"),
    (".heic", "image/heic"),
    (".heif", "image/heif"),
    (".pdf", "application/pdf"),
];

/// Builds the Gemini request body for one attempt.
pub fn generate_content_body(request: &Map<String, Value>) -> Result<Value, InvalidRequest> {
    refuse_inexpressible(request)?;
    let (system, contents) = conversation(request.get("messages"))?;
    let mut body = Map::new();
    body.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        body.insert("systemInstruction".into(), json!({ "parts": system }));
    }
    if let Some(tools) = present(request, "tools") {
        body.insert("tools".into(), tool_declarations(tools)?);
    }
    if let Some(config) = tool_config(request)? {
        body.insert("toolConfig".into(), config);
    }
    let config = generation_config(request)?;
    if !config.is_empty() {
        body.insert("generationConfig".into(), Value::Object(config));
    }
    Ok(Value::Object(body))
}

fn refuse_inexpressible(request: &Map<String, Value>) -> Result<(), InvalidRequest> {
    let cannot = |param: &str, why: &str| {
        Err(invalid(
            format!("`{param}` cannot be sent to a Gemini model: {why}"),
            param,
        ))
    };
    if present(request, "n").is_some_and(|n| n.as_u64() != Some(1)) {
        return cannot("n", "the gateway returns exactly one choice");
    }
    if present(request, "logprobs").is_some_and(|value| value.as_bool() == Some(true)) {
        return cannot("logprobs", "its log probabilities are not translated");
    }
    if present(request, "logit_bias")
        .and_then(Value::as_object)
        .is_some_and(|bias| !bias.is_empty())
    {
        return cannot("logit_bias", "it has no token biases");
    }
    if present(request, "audio").is_some() {
        return cannot("audio", "audio output is not translated");
    }
    Ok(())
}

fn generation_config(request: &Map<String, Value>) -> Result<Map<String, Value>, InvalidRequest> {
    let mut config = Map::new();
    if let Some(tokens) = max_output_tokens(request)? {
        config.insert("maxOutputTokens".into(), json!(tokens));
    }
    for (openai, gemini) in [
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
        ("seed", "seed"),
    ] {
        if let Some(value) = present(request, openai) {
            if !value.is_number() {
                return Err(invalid(format!("{openai} must be a number"), openai));
            }
            config.insert(gemini.into(), value.clone());
        }
    }
    if let Some(stops) = stop_sequences(request)? {
        config.insert("stopSequences".into(), json!(stops));
    }
    if let Some(format) = present(request, "response_format") {
        match format.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => {
                config.insert("responseMimeType".into(), json!("application/json"));
            }
            Some("json_schema") => {
                let schema = format
                    .pointer("/json_schema/schema")
                    .filter(|schema| schema.is_object())
                    .ok_or_else(|| {
                        invalid(
                            "a json_schema response format needs json_schema.schema",
                            "response_format.json_schema.schema",
                        )
                    })?;
                config.insert("responseMimeType".into(), json!("application/json"));
                config.insert("responseJsonSchema".into(), schema.clone());
            }
            _ => {
                return Err(invalid(
                    "response_format.type must be text, json_object or json_schema",
                    "response_format.type",
                ));
            }
        }
    }
    Ok(config)
}

/// Splits the OpenAI messages into Gemini's system instruction parts and alternating contents.
fn conversation(messages: Option<&Value>) -> Result<(Vec<Value>, Vec<Value>), InvalidRequest> {
    let all = messages
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let mut system = Vec::new();
    let mut turns = Turns::default();
    for Message {
        index,
        at,
        role,
        content,
        message,
    } in openai::messages(messages)?
    {
        match role {
            "system" | "developer" => system.extend(text_parts(content, &at)?),
            "user" => turns.push("user", user_parts(content, &at)?),
            "assistant" => turns.push("model", model_parts(message, content, &at)?),
            "tool" => turns.push("user", vec![function_response(all, index, content, &at)?]),
            other => {
                return Err(invalid(
                    format!("message role `{other}` cannot be sent to a Gemini model"),
                    format!("{at}.role"),
                ));
            }
        }
    }
    Ok((system, turns.into_json("parts")))
}

fn text_parts(content: &Value, at: &str) -> Result<Vec<Value>, InvalidRequest> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(text) if text.is_empty() => Ok(Vec::new()),
        Value::String(text) => Ok(vec![json!({ "text": text })]),
        Value::Array(parts) => {
            let mut texts = Vec::new();
            for (index, part) in parts.iter().enumerate() {
                let text = match part.get("type").and_then(Value::as_str) {
                    Some("text") => part.get("text").and_then(Value::as_str),
                    Some("refusal") => part.get("refusal").and_then(Value::as_str),
                    _ => None,
                }
                .ok_or_else(|| {
                    invalid(
                        "only text parts are allowed here",
                        format!("{at}.content[{index}]"),
                    )
                })?;
                if !text.is_empty() {
                    texts.push(json!({ "text": text }));
                }
            }
            Ok(texts)
        }
        _ => Err(invalid(
            "content must be a string or an array of parts",
            format!("{at}.content"),
        )),
    }
}

fn user_parts(content: &Value, at: &str) -> Result<Vec<Value>, InvalidRequest> {
    let Value::Array(items) = content else {
        return text_parts(content, at);
    };
    let mut parts = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let at = format!("{at}.content[{index}]");
        match item.get("type").and_then(Value::as_str) {
            Some("text") => {
                let text = item
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid("a text part needs `text`", at.clone()))?;
                if !text.is_empty() {
                    parts.push(json!({ "text": text }));
                }
            }
            Some("image_url") => {
                let param = format!("{at}.image_url.url");
                let url = item
                    .pointer("/image_url/url")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid("an image part needs image_url.url", param.clone()))?;
                parts.push(media_part(url, &param)?);
            }
            Some("file") => {
                let param = format!("{at}.file.file_data");
                let url = item
                    .pointer("/file/file_data")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid("a file part needs file.file_data", param.clone()))?;
                parts.push(media_part(url, &param)?);
            }
            Some("input_audio") => {
                let data = item.pointer("/input_audio/data").and_then(Value::as_str);
                let format = item.pointer("/input_audio/format").and_then(Value::as_str);
                let (Some(data), Some(format)) = (data, format) else {
                    return Err(invalid("an audio part needs data and format", at));
                };
                parts.push(json!({ "inlineData": { "mimeType": format!("audio/{format}"), "data": data } }));
            }
            Some(other) => {
                return Err(invalid(
                    format!("content parts of type `{other}` cannot be sent to a Gemini model"),
                    at,
                ));
            }
            None => return Err(invalid("every content part needs a type", at)),
        }
    }
    Ok(parts)
}

/// A data URL goes inline; an https URL of a known media type goes by reference.
fn media_part(url: &str, param: &str) -> Result<Value, InvalidRequest> {
    if let Some((media_type, data)) = data_url(url) {
        return Ok(json!({ "inlineData": { "mimeType": media_type, "data": data } }));
    }
    if url.starts_with("https://") {
        let path = url
            .split(['?', '#'])
            .next()
            .unwrap_or(url)
            .to_ascii_lowercase();
        if let Some((_, media_type)) = URL_MEDIA_TYPES
            .iter()
            .find(|(extension, _)| path.ends_with(extension))
        {
            return Ok(json!({ "fileData": { "mimeType": media_type, "fileUri": url } }));
        }
        return Err(invalid(
            "a Gemini model takes an https URL only for a known file type (png, jpg, webp, heic, heif, pdf); send other media as a base64 data URL",
            param,
        ));
    }
    Err(invalid(
        "a media URL must be an https URL or a base64 data URL",
        param,
    ))
}

fn model_parts(message: &Value, content: &Value, at: &str) -> Result<Vec<Value>, InvalidRequest> {
    let mut parts = text_parts(content, at)?;
    let Some(calls) = message.get("tool_calls").filter(|calls| !calls.is_null()) else {
        return Ok(parts);
    };
    let calls = calls
        .as_array()
        .ok_or_else(|| invalid("tool_calls must be an array", format!("{at}.tool_calls")))?;
    for (index, call) in calls.iter().enumerate() {
        let at = format!("{at}.tool_calls[{index}]");
        let name = call
            .pointer("/function/name")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                invalid(
                    "a tool call needs a function name",
                    format!("{at}.function.name"),
                )
            })?;
        let arguments = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .filter(|arguments| !arguments.trim().is_empty())
            .unwrap_or("{}");
        let args: Value = serde_json::from_str(arguments)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| {
                invalid(
                    "tool call arguments must be a JSON object",
                    format!("{at}.function.arguments"),
                )
            })?;
        let mut part = json!({ "functionCall": { "name": name, "args": args } });
        if let Some(signature) = call
            .pointer("/extra_content/google/thought_signature")
            .and_then(Value::as_str)
            && let Some(object) = part.as_object_mut()
        {
            object.insert("thoughtSignature".into(), json!(signature));
        }
        parts.push(part);
    }
    Ok(parts)
}

/// A `tool` message as a `functionResponse`, named after the call it answers: the call is found by
/// its id in an earlier assistant message of the same conversation.
fn function_response(
    messages: &[Value],
    index: usize,
    content: &Value,
    at: &str,
) -> Result<Value, InvalidRequest> {
    let param = format!("{at}.tool_call_id");
    let id = messages[index]
        .get("tool_call_id")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(
                "a tool message needs the tool_call_id it answers",
                param.clone(),
            )
        })?;
    let name = messages[..index]
        .iter()
        .rev()
        .filter_map(|message| message.get("tool_calls").and_then(Value::as_array))
        .flatten()
        .find(|call| call.get("id").and_then(Value::as_str) == Some(id))
        .and_then(|call| call.pointer("/function/name").and_then(Value::as_str))
        .ok_or_else(|| {
            invalid(
                format!("tool_call_id `{id}` answers no tool call of an earlier assistant message"),
                param,
            )
        })?;
    let text = match content {
        Value::String(text) => text.clone(),
        other => text_parts(other, at)?
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
    };
    // Gemini wants an object: a JSON object result goes as it is, anything else under `result`.
    let response = serde_json::from_str::<Value>(&text)
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({ "result": text }));
    Ok(json!({ "functionResponse": { "name": name, "response": response } }))
}

fn tool_declarations(tools: &Value) -> Result<Value, InvalidRequest> {
    let declarations: Vec<Value> = openai::function_tools(tools, "a Gemini model")?
        .into_iter()
        .map(|function| {
            let mut declaration = json!({ "name": function.name });
            if let Some(description) = function.description {
                declaration["description"] = description.clone();
            }
            if let Some(schema) = function.parameters {
                declaration["parametersJsonSchema"] = schema.clone();
            }
            declaration
        })
        .collect();
    Ok(json!([{ "functionDeclarations": declarations }]))
}

fn tool_config(request: &Map<String, Value>) -> Result<Option<Value>, InvalidRequest> {
    Ok(openai::tool_choice(request)?.map(|choice| {
        let config = match choice {
            ToolChoice::Auto => json!({ "mode": "AUTO" }),
            ToolChoice::None => json!({ "mode": "NONE" }),
            ToolChoice::Required => json!({ "mode": "ANY" }),
            ToolChoice::Function(name) => json!({ "mode": "ANY", "allowedFunctionNames": [name] }),
        };
        json!({ "functionCallingConfig": config })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(request: Value) -> Result<Value, InvalidRequest> {
        let Value::Object(request) = request else {
            panic!("test requests are objects");
        };
        generate_content_body(&request)
    }

    #[test]
    fn system_goes_to_the_system_instruction_and_roles_become_user_and_model() {
        let body = translate(json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "user", "content": "there"},
            {"role": "assistant", "content": "Hello"},
            {"role": "developer", "content": "In French."}
        ], "max_tokens": 9, "temperature": 1.4, "stop": "END", "seed": 3}))
        .unwrap();
        assert_eq!(
            body["systemInstruction"],
            json!({"parts": [{"text": "Be brief."}, {"text": "In French."}]})
        );
        assert_eq!(
            body["contents"],
            json!([
                {"role": "user", "parts": [{"text": "Hi"}, {"text": "there"}]},
                {"role": "model", "parts": [{"text": "Hello"}]}
            ])
        );
        assert_eq!(
            body["generationConfig"],
            json!({"maxOutputTokens": 9, "temperature": 1.4, "stopSequences": ["END"], "seed": 3})
        );
    }

    #[test]
    fn tool_results_are_named_from_the_conversation_and_signatures_travel_back() {
        let body = translate(json!({"messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"},
                 "extra_content": {"google": {"thought_signature": "sig-1"}}},
                {"id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_a", "content": "{\"temp\":21}"},
            {"role": "tool", "tool_call_id": "call_b", "content": "noon"}
        ]}))
        .unwrap();
        assert_eq!(
            body["contents"][1]["parts"][0],
            json!({"functionCall": {"name": "weather", "args": {"city": "Paris"}}, "thoughtSignature": "sig-1"})
        );
        assert!(
            body["contents"][1]["parts"][1]
                .get("thoughtSignature")
                .is_none()
        );
        assert_eq!(
            body["contents"][2],
            json!({"role": "user", "parts": [
                {"functionResponse": {"name": "weather", "response": {"temp": 21}}},
                {"functionResponse": {"name": "time", "response": {"result": "noon"}}}
            ]})
        );
        let unknown = translate(json!({"messages": [
            {"role": "user", "content": "x"},
            {"role": "tool", "tool_call_id": "nope", "content": "y"}
        ]}))
        .unwrap_err();
        assert_eq!(unknown.param.as_deref(), Some("messages[1].tool_call_id"));
    }

    #[test]
    fn tools_choices_and_formats_map_to_gemini_names() {
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        for (choice, config) in [
            (json!("auto"), json!({"mode": "AUTO"})),
            (json!("none"), json!({"mode": "NONE"})),
            (json!("required"), json!({"mode": "ANY"})),
            (
                json!({"type": "function", "function": {"name": "f"}}),
                json!({"mode": "ANY", "allowedFunctionNames": ["f"]}),
            ),
        ] {
            let body = translate(json!({"messages": [{"role": "user", "content": "x"}], "tools": tools, "tool_choice": choice})).unwrap();
            assert_eq!(body["toolConfig"]["functionCallingConfig"], config);
            assert_eq!(
                body["tools"],
                json!([{"functionDeclarations": [{"name": "f", "parametersJsonSchema": {"type": "object"}}]}])
            );
        }
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        let body = translate(json!({"messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})).unwrap();
        assert_eq!(
            body["generationConfig"]["responseMimeType"],
            "application/json"
        );
        assert_eq!(body["generationConfig"]["responseJsonSchema"], schema);
    }

    #[test]
    fn media_goes_inline_or_by_uri_and_unknown_urls_are_refused() {
        let body = translate(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.JPG?x=1"}}
        ]}]}))
        .unwrap();
        assert_eq!(
            body["contents"][0]["parts"],
            json!([
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/cat.JPG?x=1"}}
            ])
        );
        for url in ["https://example.com/page", "http://example.com/a.png"] {
            let error = translate(json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}
            ]}]}))
            .unwrap_err();
            assert_eq!(
                error.param.as_deref(),
                Some("messages[0].content[0].image_url.url")
            );
        }
    }

    #[test]
    fn inexpressible_parameters_are_refused_by_name() {
        for (field, value) in [
            ("n", json!(3)),
            ("logprobs", json!(true)),
            ("logit_bias", json!({"1": 2})),
        ] {
            let mut request = json!({"messages": [{"role": "user", "content": "x"}]});
            request[field] = value;
            assert_eq!(
                translate(request).unwrap_err().param.as_deref(),
                Some(field)
            );
        }
    }
}
