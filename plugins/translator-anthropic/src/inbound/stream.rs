//! Cross protocol: OpenAI `chat.completion.chunk`s (from another channel's translator) as the
//! Messages event sequence — `message_start`, `content_block_start` / `_delta` / `_stop` per text
//! or tool-use block, `message_delta` with the stop reason and usage, `message_stop`.

use serde_json::{Value, json};
use tollgate_plugin_sdk::inbound::{
    AttemptContext, ConvertStream, StreamEvent, TranslateError, Usage,
};

use super::answer::{anthropic_usage, carry_extra_content, message_id, stop_reason};

/// The content block open now.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Open {
    Text,
    /// A tool call, by its OpenAI index.
    Tool(u64),
}

/// The state of one converted stream.
pub struct ConvertedStream {
    id: String,
    model: String,
    started: bool,
    open: Option<Open>,
    /// Index of the next content block.
    next_block: u64,
    finish_reason: Option<String>,
    called_tools: bool,
}

fn event(name: &str, data: Value) -> StreamEvent {
    StreamEvent {
        event: Some(name.to_owned()),
        data: data.to_string(),
    }
}

impl ConvertedStream {
    fn start(&mut self, events: &mut Vec<StreamEvent>) {
        if self.started {
            return;
        }
        self.started = true;
        events.push(event(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }}),
        ));
    }

    fn close(&mut self, events: &mut Vec<StreamEvent>) {
        if self.open.take().is_some() {
            events.push(event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": self.next_block - 1}),
            ));
        }
    }

    fn open(&mut self, events: &mut Vec<StreamEvent>, open: Open, block: Value) {
        self.close(events);
        events.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": self.next_block, "content_block": block}),
        ));
        self.next_block += 1;
        self.open = Some(open);
    }

    fn delta(&self, events: &mut Vec<StreamEvent>, delta: Value) {
        events.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": self.next_block - 1, "delta": delta}),
        ));
    }
}

impl ConvertStream for ConvertedStream {
    fn new(context: AttemptContext) -> Self {
        Self {
            id: message_id(&context),
            model: context.public_model,
            started: false,
            open: None,
            next_block: 0,
            finish_reason: None,
            called_tools: false,
        }
    }

    fn push(&mut self, chunk: String) -> Result<Vec<StreamEvent>, TranslateError> {
        let chunk: Value = serde_json::from_str(&chunk)
            .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?;
        let mut events = Vec::new();
        self.start(&mut events);
        let Some(choice) = chunk.pointer("/choices/0") else {
            // The usage chunk: the host passes the settled usage to `finish`.
            return Ok(events);
        };
        let delta = choice.get("delta").unwrap_or(&Value::Null);
        if let Some(text) = delta.get("content").and_then(Value::as_str)
            && !text.is_empty()
        {
            if self.open != Some(Open::Text) {
                self.open(&mut events, Open::Text, json!({"type": "text", "text": ""}));
            }
            self.delta(&mut events, json!({"type": "text_delta", "text": text}));
        }
        for call in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            if self.open != Some(Open::Tool(index)) {
                self.called_tools = true;
                let mut block = json!({
                    "type": "tool_use",
                    "id": call.get("id").cloned().unwrap_or(Value::Null),
                    "name": call.pointer("/function/name").cloned().unwrap_or(Value::Null),
                    "input": {},
                });
                carry_extra_content(call, &mut block);
                self.open(&mut events, Open::Tool(index), block);
            }
            if let Some(arguments) = call.pointer("/function/arguments").and_then(Value::as_str)
                && !arguments.is_empty()
            {
                self.delta(
                    &mut events,
                    json!({"type": "input_json_delta", "partial_json": arguments}),
                );
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish_reason = Some(reason.to_owned());
            self.close(&mut events);
        }
        Ok(events)
    }

    fn finish(&mut self, usage: Usage) -> Result<Vec<StreamEvent>, TranslateError> {
        let mut events = Vec::new();
        self.start(&mut events);
        self.close(&mut events);
        events.push(event(
            "message_delta",
            json!({
                "type": "message_delta",
                "delta": {
                    "stop_reason": stop_reason(self.finish_reason.as_deref(), self.called_tools),
                    "stop_sequence": null,
                },
                "usage": anthropic_usage(&usage),
            }),
        ));
        events.push(event("message_stop", json!({"type": "message_stop"})));
        Ok(events)
    }
}
