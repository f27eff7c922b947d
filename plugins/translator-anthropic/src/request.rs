//! OpenAI chat-completions request → Anthropic Messages request.
//!
//! Anthropic is stricter than OpenAI in ways a client cannot see: system text lives outside the
//! conversation, turns alternate strictly, tool results are user-turn blocks, `max_tokens` is
//! required, and temperature stops at 1. This module bridges those differences and refuses, naming
//! the parameter, what Anthropic cannot express; OpenAI fields it does not know are ignored.

use serde_json::{Map, Value, json};
use tollgate_plugin_sdk::openai::{
    self, Message, ToolChoice, Turns, data_url, invalid, max_output_tokens, present, stop_sequences,
};
use tollgate_plugin_sdk::translator::InvalidRequest;

/// Image media types Anthropic accepts in a base64 source.
const IMAGE_MEDIA_TYPES: &[&str] = &["image/jpeg", "image/png", "image/gif", "image/webp"];

/// Builds the Anthropic request body for one attempt.
pub fn messages_body(
    request: &Map<String, Value>,
    upstream_model: &str,
    stream: bool,
    default_max_tokens: u64,
) -> Result<Map<String, Value>, InvalidRequest> {
    refuse_inexpressible(request)?;
    let (system, messages) = conversation(request.get("messages"))?;
    let mut body = Map::new();
    body.insert("model".into(), json!(upstream_model));
    body.insert("messages".into(), Value::Array(messages));
    if !system.is_empty() {
        body.insert("system".into(), Value::Array(system));
    }
    body.insert(
        "max_tokens".into(),
        json!(max_output_tokens(request)?.unwrap_or(default_max_tokens)),
    );
    if let Some(temperature) = present(request, "temperature") {
        let value = temperature
            .as_f64()
            .ok_or_else(|| invalid("temperature must be a number", "temperature"))?;
        if !(0.0..=1.0).contains(&value) {
            return Err(invalid(
                format!(
                    "temperature {value} cannot be sent to this model: Anthropic accepts 0 to 1"
                ),
                "temperature",
            ));
        }
        body.insert("temperature".into(), temperature.clone());
    }
    if let Some(top_p) = present(request, "top_p") {
        body.insert("top_p".into(), top_p.clone());
    }
    if let Some(stops) = stop_sequences(request)? {
        body.insert("stop_sequences".into(), json!(stops));
    }
    if let Some(Value::String(user)) = present(request, "user") {
        body.insert("metadata".into(), json!({ "user_id": user }));
    }
    if let Some(tools) = present(request, "tools") {
        body.insert("tools".into(), tool_definitions(tools)?);
    }
    if let Some(choice) = tool_choice(request)? {
        body.insert("tool_choice".into(), choice);
    }
    if let Some(format) = present(request, "response_format")
        && let Some(format) = output_format(format)?
    {
        body.insert("output_config".into(), json!({ "format": format }));
    }
    if stream {
        body.insert("stream".into(), Value::Bool(true));
    }
    Ok(body)
}

/// OpenAI parameters with no Anthropic equivalent, refused when they would change the answer.
fn refuse_inexpressible(request: &Map<String, Value>) -> Result<(), InvalidRequest> {
    let cannot = |param: &str, why: &str| {
        Err(invalid(
            format!("`{param}` cannot be sent to an Anthropic model: {why}"),
            param,
        ))
    };
    if present(request, "n").is_some_and(|n| n.as_u64() != Some(1)) {
        return cannot("n", "it returns exactly one choice");
    }
    if present(request, "logprobs").is_some_and(|value| value.as_bool() == Some(true)) {
        return cannot("logprobs", "it reports no log probabilities");
    }
    if present(request, "top_logprobs").is_some() {
        return cannot("top_logprobs", "it reports no log probabilities");
    }
    for penalty in ["presence_penalty", "frequency_penalty"] {
        if present(request, penalty).is_some_and(|value| value.as_f64() != Some(0.0)) {
            return cannot(penalty, "it has no sampling penalties");
        }
    }
    if present(request, "logit_bias")
        .and_then(Value::as_object)
        .is_some_and(|bias| !bias.is_empty())
    {
        return cannot("logit_bias", "it has no token biases");
    }
    let wants_audio = present(request, "audio").is_some()
        || present(request, "modalities")
            .and_then(Value::as_array)
            .is_some_and(|modes| modes.iter().any(|mode| mode.as_str() == Some("audio")));
    if wants_audio {
        return cannot("audio", "it produces no audio");
    }
    Ok(())
}

/// Splits the OpenAI messages into Anthropic's top-level system blocks and alternating turns.
fn conversation(messages: Option<&Value>) -> Result<(Vec<Value>, Vec<Value>), InvalidRequest> {
    let mut system = Vec::new();
    let mut turns = Turns::default();
    for Message {
        at,
        role,
        content,
        message,
        ..
    } in openai::messages(messages)?
    {
        match role {
            "system" | "developer" => system.extend(text_blocks(content, &at)?),
            "user" => turns.push("user", user_blocks(content, &at)?),
            "assistant" => turns.push("assistant", assistant_blocks(message, content, &at)?),
            "tool" => turns.push("user", vec![tool_result(message, content, &at)?]),
            "function" => {
                return Err(invalid(
                    "the legacy `function` role is not supported: send tool results as `tool` messages",
                    format!("{at}.role"),
                ));
            }
            other => {
                return Err(invalid(
                    format!("unknown message role `{other}`"),
                    format!("{at}.role"),
                ));
            }
        }
    }
    Ok((system, turns.into_json("content")))
}

/// A text block, keeping a `cache_control` marker some OpenAI clients put on their parts.
/// Anthropic rejects empty text blocks, so empty text yields none.
fn text_block(text: &str, part: Option<&Value>) -> Option<Value> {
    if text.is_empty() {
        return None;
    }
    let mut block = json!({ "type": "text", "text": text });
    if let Some(cache_control) = part.and_then(|part| part.get("cache_control"))
        && let Some(object) = block.as_object_mut()
    {
        object.insert("cache_control".into(), cache_control.clone());
    }
    Some(block)
}

/// Content that may hold only text: a string or an array of text parts.
fn text_blocks(content: &Value, at: &str) -> Result<Vec<Value>, InvalidRequest> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(text) => Ok(text_block(text, None).into_iter().collect()),
        Value::Array(parts) => {
            let mut blocks = Vec::new();
            for (index, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str);
                let text = match kind {
                    Some("text") => part.get("text").and_then(Value::as_str),
                    Some("refusal") => part.get("refusal").and_then(Value::as_str),
                    _ => None,
                };
                let text = text.ok_or_else(|| {
                    invalid(
                        "only text parts are allowed here",
                        format!("{at}.content[{index}]"),
                    )
                })?;
                blocks.extend(text_block(text, Some(part)));
            }
            Ok(blocks)
        }
        _ => Err(invalid(
            "content must be a string or an array of parts",
            format!("{at}.content"),
        )),
    }
}

fn user_blocks(content: &Value, at: &str) -> Result<Vec<Value>, InvalidRequest> {
    let Value::Array(parts) = content else {
        return text_blocks(content, at);
    };
    let mut blocks = Vec::new();
    for (index, part) in parts.iter().enumerate() {
        let at = format!("{at}.content[{index}]");
        match part.get("type").and_then(Value::as_str) {
            Some("text") => {
                let text = part
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid("a text part needs `text`", at.clone()))?;
                blocks.extend(text_block(text, Some(part)));
            }
            Some("image_url") => blocks.push(image_block(part, &at)?),
            Some("file") => blocks.push(document_block(part, &at)?),
            Some(other) => {
                return Err(invalid(
                    format!("content parts of type `{other}` cannot be sent to an Anthropic model"),
                    at,
                ));
            }
            None => return Err(invalid("every content part needs a type", at)),
        }
    }
    Ok(blocks)
}

fn image_block(part: &Value, at: &str) -> Result<Value, InvalidRequest> {
    let param = format!("{at}.image_url.url");
    let url = part
        .pointer("/image_url/url")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("an image part needs image_url.url", param.clone()))?;
    if let Some((media_type, data)) = data_url(url) {
        if !IMAGE_MEDIA_TYPES.contains(&media_type) {
            return Err(invalid(
                format!(
                    "image type `{media_type}` is not accepted: use one of {}",
                    IMAGE_MEDIA_TYPES.join(", ")
                ),
                param,
            ));
        }
        return Ok(json!({
            "type": "image",
            "source": { "type": "base64", "media_type": media_type, "data": data }
        }));
    }
    if url.starts_with("https://") {
        return Ok(json!({ "type": "image", "source": { "type": "url", "url": url } }));
    }
    Err(invalid(
        "an image URL must be an https URL or a base64 data URL",
        param,
    ))
}

fn document_block(part: &Value, at: &str) -> Result<Value, InvalidRequest> {
    let param = format!("{at}.file.file_data");
    let data = part
        .pointer("/file/file_data")
        .and_then(Value::as_str)
        .and_then(data_url)
        .filter(|(media_type, _)| *media_type == "application/pdf")
        .ok_or_else(|| {
            invalid(
                "only PDF files given inline as a base64 data URL can be sent to an Anthropic model",
                param,
            )
        })?;
    Ok(json!({
        "type": "document",
        "source": { "type": "base64", "media_type": data.0, "data": data.1 }
    }))
}

fn assistant_blocks(
    message: &Value,
    content: &Value,
    at: &str,
) -> Result<Vec<Value>, InvalidRequest> {
    let mut blocks = text_blocks(content, at)?;
    let Some(calls) = message.get("tool_calls").filter(|calls| !calls.is_null()) else {
        return Ok(blocks);
    };
    let calls = calls
        .as_array()
        .ok_or_else(|| invalid("tool_calls must be an array", format!("{at}.tool_calls")))?;
    for (index, call) in calls.iter().enumerate() {
        let at = format!("{at}.tool_calls[{index}]");
        let id = call
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("a tool call needs an id", format!("{at}.id")))?;
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
            .unwrap_or("{}");
        let arguments_param = format!("{at}.function.arguments");
        let input: Value = if arguments.trim().is_empty() {
            json!({})
        } else {
            serde_json::from_str(arguments).map_err(|error| {
                invalid(
                    format!("tool call arguments must be JSON: {error}"),
                    arguments_param.clone(),
                )
            })?
        };
        if !input.is_object() {
            return Err(invalid(
                "tool call arguments must be a JSON object",
                arguments_param,
            ));
        }
        blocks.push(json!({ "type": "tool_use", "id": id, "name": name, "input": input }));
    }
    Ok(blocks)
}

fn tool_result(message: &Value, content: &Value, at: &str) -> Result<Value, InvalidRequest> {
    let id = message
        .get("tool_call_id")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(
                "a tool message needs the tool_call_id it answers",
                format!("{at}.tool_call_id"),
            )
        })?;
    let content = match content {
        Value::String(text) => json!(text),
        _ => Value::Array(text_blocks(content, at)?),
    };
    Ok(json!({ "type": "tool_result", "tool_use_id": id, "content": content }))
}

fn tool_definitions(tools: &Value) -> Result<Value, InvalidRequest> {
    let definitions = openai::function_tools(tools, "an Anthropic model")?
        .into_iter()
        .map(|function| {
            let schema = function
                .parameters
                .cloned()
                .unwrap_or_else(|| json!({ "type": "object", "properties": {} }));
            let mut definition = json!({ "name": function.name, "input_schema": schema });
            if let Some(description) = function.description {
                definition["description"] = description.clone();
            }
            if function.strict {
                definition["strict"] = Value::Bool(true);
            }
            definition
        })
        .collect();
    Ok(Value::Array(definitions))
}

fn tool_choice(request: &Map<String, Value>) -> Result<Option<Value>, InvalidRequest> {
    let mut choice = openai::tool_choice(request)?.map(|choice| match choice {
        ToolChoice::Auto => json!({ "type": "auto" }),
        ToolChoice::None => json!({ "type": "none" }),
        ToolChoice::Required => json!({ "type": "any" }),
        ToolChoice::Function(name) => json!({ "type": "tool", "name": name }),
    });
    if present(request, "parallel_tool_calls").and_then(Value::as_bool) == Some(false) {
        let choice = choice.get_or_insert_with(|| json!({ "type": "auto" }));
        if choice.get("type").and_then(Value::as_str) != Some("none")
            && let Some(object) = choice.as_object_mut()
        {
            object.insert("disable_parallel_tool_use".into(), Value::Bool(true));
        }
    }
    Ok(choice)
}

/// OpenAI's `response_format` as Anthropic's structured-output format; `None` for plain text.
fn output_format(format: &Value) -> Result<Option<Value>, InvalidRequest> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({
            "type": "json_schema",
            "schema": { "type": "object" }
        }))),
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
            Ok(Some(json!({ "type": "json_schema", "schema": schema })))
        }
        _ => Err(invalid(
            "response_format.type must be text, json_object or json_schema",
            "response_format.type",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(request: Value) -> Result<Value, InvalidRequest> {
        let Value::Object(request) = request else {
            panic!("test requests are objects");
        };
        messages_body(&request, "claude-up", false, 1024).map(Value::Object)
    }

    #[test]
    fn system_and_developer_messages_merge_into_the_top_level_system() {
        let body = translate(json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
                {"role": "user", "content": "Again"}
            ]
        }))
        .unwrap();
        assert_eq!(
            body["system"],
            json!([{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use French."}])
        );
        assert_eq!(
            body["messages"],
            json!([{"role": "user", "content": [
                {"type": "text", "text": "Hi"}, {"type": "text", "text": "Again"}
            ]}])
        );
        assert_eq!(body["max_tokens"], 1024);
        assert_eq!(body["model"], "claude-up");
    }

    #[test]
    fn tool_calls_and_results_round_trip_with_their_ids() {
        let body = translate(json!({
            "messages": [
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "toolu_2", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "rain"}]}
            ],
            "max_completion_tokens": 50
        }))
        .unwrap();
        assert_eq!(body["max_tokens"], 50);
        assert_eq!(
            body["messages"][1]["content"][1]["input"],
            json!({"city": "Rome"})
        );
        assert_eq!(
            body["messages"][2],
            json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "rain"}]}
            ]})
        );
    }

    #[test]
    fn tools_and_choices_map_to_anthropic_names() {
        let tools = json!([{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]);
        let cases = [
            (json!("auto"), json!({"type": "auto"})),
            (json!("none"), json!({"type": "none"})),
            (json!("required"), json!({"type": "any"})),
            (
                json!({"type": "function", "function": {"name": "f"}}),
                json!({"type": "tool", "name": "f"}),
            ),
        ];
        for (openai, anthropic) in cases {
            let body = translate(json!({
                "messages": [{"role": "user", "content": "x"}],
                "tools": tools, "tool_choice": openai
            }))
            .unwrap();
            assert_eq!(body["tool_choice"], anthropic);
            assert_eq!(
                body["tools"],
                json!([{"name": "f", "description": "d", "input_schema": {"type": "object"}}])
            );
        }
        let serial = translate(json!({
            "messages": [{"role": "user", "content": "x"}],
            "tools": tools, "parallel_tool_calls": false
        }))
        .unwrap();
        assert_eq!(
            serial["tool_choice"],
            json!({"type": "auto", "disable_parallel_tool_use": true})
        );
    }

    #[test]
    fn images_become_base64_or_url_sources_and_other_schemes_are_refused() {
        let body = translate(json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
        ]}]}))
        .unwrap();
        let content = &body["messages"][0]["content"];
        assert_eq!(
            content[1]["source"],
            json!({"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="})
        );
        assert_eq!(
            content[2]["source"],
            json!({"type": "url", "url": "https://example.com/cat.jpg"})
        );
        for url in [
            "http://example.com/cat.jpg",
            "data:image/tiff;base64,AAAA",
            "ftp://x/y.png",
        ] {
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
    fn response_formats_become_structured_outputs() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": false});
        let strict = translate(json!({
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        }))
        .unwrap();
        assert_eq!(
            strict["output_config"],
            json!({"format": {"type": "json_schema", "schema": schema}})
        );
        let object = translate(json!({
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_object"}
        }))
        .unwrap();
        assert_eq!(
            object["output_config"]["format"]["schema"],
            json!({"type": "object"})
        );
    }

    #[test]
    fn inexpressible_parameters_are_refused_by_name_and_unknown_ones_ignored() {
        for (field, value, param) in [
            ("n", json!(2), "n"),
            ("logprobs", json!(true), "logprobs"),
            ("temperature", json!(1.5), "temperature"),
            ("frequency_penalty", json!(0.5), "frequency_penalty"),
            ("logit_bias", json!({"50256": -100}), "logit_bias"),
            ("modalities", json!(["text", "audio"]), "audio"),
        ] {
            let mut request = json!({"messages": [{"role": "user", "content": "x"}]});
            request[field] = value;
            let error = translate(request).unwrap_err();
            assert_eq!(error.param.as_deref(), Some(param), "{field}");
        }
        let body = translate(json!({
            "messages": [{"role": "user", "content": "x"}],
            "n": 1, "logprobs": false, "presence_penalty": 0, "seed": 7,
            "some_future_field": {"x": 1}, "temperature": 0.3, "stop": "END", "user": "u-1"
        }))
        .unwrap();
        assert_eq!(body["stop_sequences"], json!(["END"]));
        assert_eq!(body["metadata"], json!({"user_id": "u-1"}));
        assert!(body.get("some_future_field").is_none() && body.get("seed").is_none());
    }

    #[test]
    fn malformed_messages_name_the_offending_field() {
        let cases = [
            (json!({"messages": []}), "messages"),
            (json!({"messages": [{"content": "x"}]}), "messages[0].role"),
            (
                json!({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]}),
                "messages[1].tool_call_id",
            ),
            (
                json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{not json"}}]}]}),
                "messages[0].tool_calls[0].function.arguments",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
                "max_tokens",
            ),
        ];
        for (request, param) in cases {
            assert_eq!(
                translate(request).unwrap_err().param.as_deref(),
                Some(param)
            );
        }
    }
}
