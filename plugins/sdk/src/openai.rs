//! Reading the client's OpenAI chat request: the pieces every translator needs in the same way,
//! each refusing a malformed field with an [`InvalidRequest`] that names it (the client's 400).

use serde_json::{Map, Value};

use crate::types::InvalidRequest;

/// An [`InvalidRequest`] naming the offending field.
pub fn invalid(message: impl Into<String>, param: impl Into<String>) -> InvalidRequest {
    InvalidRequest {
        message: message.into(),
        param: Some(param.into()),
    }
}

/// A field that is present and not `null` (OpenAI clients send explicit nulls for defaults).
pub fn present<'a>(request: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    request.get(name).filter(|value| !value.is_null())
}

/// `max_completion_tokens`, else the older `max_tokens`; a positive integer when given.
pub fn max_output_tokens(request: &Map<String, Value>) -> Result<Option<u64>, InvalidRequest> {
    for name in ["max_completion_tokens", "max_tokens"] {
        if let Some(value) = present(request, name) {
            return value
                .as_u64()
                .filter(|tokens| *tokens > 0)
                .map(Some)
                .ok_or_else(|| invalid(format!("{name} must be a positive integer"), name));
        }
    }
    Ok(None)
}

/// `stop` as a list, whether the client sent one string or several.
pub fn stop_sequences(request: &Map<String, Value>) -> Result<Option<Vec<String>>, InvalidRequest> {
    match present(request, "stop") {
        None => Ok(None),
        Some(Value::String(one)) => Ok(Some(vec![one.clone()])),
        Some(Value::Array(many)) => many
            .iter()
            .map(|stop| stop.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(|| invalid("stop must be a string or an array of strings", "stop")),
        Some(_) => Err(invalid(
            "stop must be a string or an array of strings",
            "stop",
        )),
    }
}

/// OpenAI's `tool_choice`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolChoice<'a> {
    /// `"auto"`: the model decides.
    Auto,
    /// `"none"`: no tool call.
    None,
    /// `"required"`: at least one tool call.
    Required,
    /// `{"type":"function","function":{"name":…}}`: this function.
    Function(&'a str),
}

/// `tool_choice`, if the client set one.
pub fn tool_choice(request: &Map<String, Value>) -> Result<Option<ToolChoice<'_>>, InvalidRequest> {
    match present(request, "tool_choice") {
        None => Ok(None),
        Some(Value::String(mode)) => match mode.as_str() {
            "auto" => Ok(Some(ToolChoice::Auto)),
            "none" => Ok(Some(ToolChoice::None)),
            "required" => Ok(Some(ToolChoice::Required)),
            other => Err(invalid(
                format!("unknown tool_choice `{other}`: use auto, none, required or a function"),
                "tool_choice",
            )),
        },
        Some(named) => named
            .pointer("/function/name")
            .and_then(Value::as_str)
            .filter(|_| named.get("type").and_then(Value::as_str) == Some("function"))
            .map(|name| Some(ToolChoice::Function(name)))
            .ok_or_else(|| {
                invalid(
                    "tool_choice must name a function as {\"type\":\"function\",\"function\":{\"name\":…}}",
                    "tool_choice",
                )
            }),
    }
}

/// One of OpenAI's function `tools`, as every provider's tool declaration needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FunctionTool<'a> {
    /// `function.name`.
    pub name: &'a str,
    /// `function.description`, when it is a string.
    pub description: Option<&'a Value>,
    /// `function.parameters` (a JSON schema), unless absent or null.
    pub parameters: Option<&'a Value>,
    /// `function.strict` is `true`.
    pub strict: bool,
}

/// The request's `tools`, every one a named function; `provider` names the upstream in the
/// refusal of any other kind of tool ("an Anthropic model").
pub fn function_tools<'a>(
    tools: &'a Value,
    provider: &str,
) -> Result<Vec<FunctionTool<'a>>, InvalidRequest> {
    let tools = tools
        .as_array()
        .ok_or_else(|| invalid("tools must be an array", "tools"))?;
    let mut functions = Vec::with_capacity(tools.len());
    for (index, tool) in tools.iter().enumerate() {
        let at = format!("tools[{index}]");
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            return Err(invalid(
                format!("only `function` tools can be sent to {provider}"),
                format!("{at}.type"),
            ));
        }
        let function = tool.get("function").unwrap_or(&Value::Null);
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                invalid(
                    "a function tool needs a name",
                    format!("{at}.function.name"),
                )
            })?;
        functions.push(FunctionTool {
            name,
            description: function.get("description").filter(|text| text.is_string()),
            parameters: function
                .get("parameters")
                .filter(|schema| !schema.is_null()),
            strict: function.get("strict").and_then(Value::as_bool) == Some(true),
        });
    }
    Ok(functions)
}

/// A `data:<media type>;base64,<data>` URL split into its media type and data.
pub fn data_url(url: &str) -> Option<(&str, &str)> {
    let (media_type, data) = url.strip_prefix("data:")?.split_once(',')?;
    Some((media_type.strip_suffix(";base64")?, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("an object"),
        }
    }

    #[test]
    fn fields_are_read_and_bad_ones_named() {
        let request = object(
            json!({"max_tokens": 5, "stop": "END", "tool_choice": {"type": "function", "function": {"name": "f"}}}),
        );
        assert_eq!(max_output_tokens(&request).unwrap(), Some(5));
        assert_eq!(
            stop_sequences(&request).unwrap(),
            Some(vec!["END".to_owned()])
        );
        assert_eq!(
            tool_choice(&request).unwrap(),
            Some(ToolChoice::Function("f"))
        );
        let bad =
            object(json!({"max_completion_tokens": 0, "stop": [1], "tool_choice": "sometimes"}));
        assert_eq!(
            max_output_tokens(&bad).unwrap_err().param.as_deref(),
            Some("max_completion_tokens")
        );
        assert_eq!(
            stop_sequences(&bad).unwrap_err().param.as_deref(),
            Some("stop")
        );
        assert_eq!(
            tool_choice(&bad).unwrap_err().param.as_deref(),
            Some("tool_choice")
        );
        assert_eq!(
            data_url("data:image/png;base64,AAAA"),
            Some(("image/png", "AAAA"))
        );
        assert_eq!(data_url("https://x/y.png"), None);
    }
}

/// One message of the client's conversation, with what a refusal names.
pub struct Message<'a> {
    /// Its position in `messages`.
    pub index: usize,
    /// Its path for error params: `messages[3]`.
    pub at: String,
    /// Its role (`system`, `user`, `assistant`, `tool`, …).
    pub role: &'a str,
    /// Its `content` (`null` when absent).
    pub content: &'a Value,
    /// The whole message (tool calls, tool call id …).
    pub message: &'a Value,
}

/// The request's messages, each with a role; a missing or empty list, or a message without a
/// role, is refused naming it.
pub fn messages(messages: Option<&Value>) -> Result<Vec<Message<'_>>, InvalidRequest> {
    let messages = messages
        .and_then(Value::as_array)
        .filter(|messages| !messages.is_empty())
        .ok_or_else(|| invalid("messages must be a non-empty array", "messages"))?;
    messages
        .iter()
        .enumerate()
        .map(|(index, message)| {
            let at = format!("messages[{index}]");
            let role = message
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("every message needs a role", format!("{at}.role")))?;
            Ok(Message {
                index,
                at,
                role,
                content: message.get("content").unwrap_or(&Value::Null),
                message,
            })
        })
        .collect()
}

/// A provider's conversation being assembled: consecutive items for one role merge into one turn,
/// as providers that require alternating turns want.
#[derive(Default)]
pub struct Turns {
    turns: Vec<(&'static str, Vec<Value>)>,
}

impl Turns {
    /// Adds a message's items (content blocks, parts) under `role`; nothing for an empty list.
    pub fn push(&mut self, role: &'static str, items: Vec<Value>) {
        if items.is_empty() {
            return;
        }
        match self.turns.last_mut() {
            Some((last, merged)) if *last == role => merged.extend(items),
            _ => self.turns.push((role, items)),
        }
    }

    /// The turns as `{"role": …, <items_key>: […]}` objects.
    pub fn into_json(self, items_key: &str) -> Vec<Value> {
        self.turns
            .into_iter()
            .map(|(role, items)| {
                let mut turn = Map::new();
                turn.insert("role".to_owned(), Value::String(role.to_owned()));
                turn.insert(items_key.to_owned(), Value::Array(items));
                Value::Object(turn)
            })
            .collect()
    }
}
