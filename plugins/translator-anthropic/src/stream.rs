//! An Anthropic Messages event stream → OpenAI `chat.completion.chunk`s.
//!
//! Anthropic streams typed blocks (`content_block_start` / `_delta` / `_stop`, indexed across text,
//! thinking and tool blocks alike); OpenAI streams one delta per chunk with tool calls numbered
//! among tool calls only. Every chunk carries one id; the role goes in the first chunk; a tool
//! call's id and name go only in its first delta; the finish reason and usage come at
//! `message_stop`, with usage from `message_start` updated by the cumulative `message_delta`.

use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_plugin_sdk::translator::{
    AttemptContext, ChunkWriter, StreamEnd, StreamEvent, StreamTranslate, TranslateError, Usage,
    stream_usage,
};

use crate::answer::Block;
use crate::failure::{ErrorDetail, failure};
use crate::usage::{AnthropicUsage, finish_reason};

/// One Anthropic stream event, read by its `type`; unknown event types are skipped, as
/// Anthropic's versioning policy asks of clients. Also what a forwarded stream reads its usage
/// from (`inbound::forward`).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Event {
    MessageStart {
        message: StartedMessage,
    },
    ContentBlockStart {
        index: u64,
        content_block: Block,
    },
    ContentBlockDelta {
        index: u64,
        delta: Delta,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDelta,
        #[serde(default)]
        usage: Option<AnthropicUsage>,
    },
    MessageStop,
    Error {
        #[serde(default)]
        error: ErrorDetail,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
pub(crate) struct StartedMessage {
    #[serde(default)]
    pub(crate) id: Option<String>,
    #[serde(default)]
    pub(crate) model: Option<String>,
    #[serde(default)]
    pub(crate) usage: Option<AnthropicUsage>,
}

/// A `content_block_delta`'s payload, named by Anthropic's `type` (`text_delta`, …).
#[derive(Debug, Deserialize)]
#[serde(tag = "type")]
pub(crate) enum Delta {
    #[serde(rename = "text_delta")]
    Text { text: String },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: String },
    #[serde(rename = "thinking_delta")]
    Thinking { thinking: String },
    #[serde(other)]
    Other,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct MessageDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

/// The state of one streamed answer.
pub struct AnthropicStream {
    include_usage: bool,
    chunks: ChunkWriter,
    served_model: Option<String>,
    /// Anthropic block index → OpenAI tool-call index, for every tool block so far.
    tool_blocks: Vec<(u64, usize)>,
    usage: Option<AnthropicUsage>,
    stop_reason: Option<String>,
    stopped: bool,
    /// Bytes of text passed to the client, for an estimate when the stream is cut before usage.
    delivered_text_bytes: usize,
}

impl AnthropicStream {
    fn tool_index(&self, block: u64) -> Option<usize> {
        self.tool_blocks
            .iter()
            .find_map(|(known, tool)| (*known == block).then_some(*tool))
    }

    /// The usage so far; before `message_stop` the stream was cut and it is an estimate.
    fn usage(&self) -> Option<Usage> {
        stream_usage(
            self.usage.as_ref().map(AnthropicUsage::normalize),
            self.stopped,
            self.delivered_text_bytes,
        )
    }
}

impl StreamTranslate for AnthropicStream {
    fn new(context: AttemptContext) -> Self {
        Self {
            include_usage: context.include_usage,
            chunks: ChunkWriter::new(
                format!("chatcmpl-{}", context.request_id),
                context.upstream_model,
                context.created_unix_s,
            ),
            served_model: None,
            tool_blocks: Vec::new(),
            usage: None,
            stop_reason: None,
            stopped: false,
            delivered_text_bytes: 0,
        }
    }

    fn push(&mut self, event: StreamEvent) -> Result<Vec<String>, TranslateError> {
        let event: Event = serde_json::from_str(&event.data)
            .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?;
        let mut chunks = Vec::new();
        match event {
            Event::MessageStart { message } => {
                if let Some(id) = message.id {
                    self.chunks.id = format!("chatcmpl-{id}");
                }
                if let Some(model) = message.model {
                    self.chunks.model.clone_from(&model);
                    self.served_model = Some(model);
                }
                self.usage = message.usage;
                self.chunks.start(&mut chunks);
            }
            Event::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                Block::Text { text } if !text.is_empty() => {
                    self.delivered_text_bytes += text.len();
                    self.chunks.emit(&mut chunks, json!({ "content": text }));
                }
                Block::Thinking { thinking } if !thinking.is_empty() => {
                    self.chunks
                        .emit(&mut chunks, json!({ "reasoning_content": thinking }));
                }
                Block::ToolUse { id, name, input } => {
                    let tool = self.tool_blocks.len();
                    self.tool_blocks.push((index, tool));
                    // The start block's input is `{}` while deltas follow; a non-empty one is whole.
                    let arguments = match input {
                        Value::Object(fields) if !fields.is_empty() => {
                            Value::Object(fields).to_string()
                        }
                        _ => String::new(),
                    };
                    self.delivered_text_bytes += name.len() + arguments.len();
                    self.chunks.emit(
                        &mut chunks,
                        json!({ "tool_calls": [{
                            "index": tool, "id": id, "type": "function",
                            "function": { "name": name, "arguments": arguments }
                        }] }),
                    );
                }
                _ => {}
            },
            Event::ContentBlockDelta { index, delta } => match delta {
                Delta::Text { text } if !text.is_empty() => {
                    self.delivered_text_bytes += text.len();
                    self.chunks.emit(&mut chunks, json!({ "content": text }));
                }
                Delta::InputJson { partial_json } if !partial_json.is_empty() => {
                    let tool = self.tool_index(index).ok_or_else(|| {
                        TranslateError::MalformedResponse(format!(
                            "input_json_delta for block {index}, which is not a tool_use block"
                        ))
                    })?;
                    self.delivered_text_bytes += partial_json.len();
                    self.chunks.emit(
                        &mut chunks,
                        json!({ "tool_calls": [{
                            "index": tool, "function": { "arguments": partial_json }
                        }] }),
                    );
                }
                Delta::Thinking { thinking } if !thinking.is_empty() => {
                    self.delivered_text_bytes += thinking.len();
                    self.chunks
                        .emit(&mut chunks, json!({ "reasoning_content": thinking }));
                }
                _ => {}
            },
            Event::MessageDelta { delta, usage } => {
                if delta.stop_reason.is_some() {
                    self.stop_reason = delta.stop_reason;
                }
                if let Some(later) = usage {
                    self.usage
                        .get_or_insert_with(AnthropicUsage::default)
                        .update(&later);
                }
            }
            Event::MessageStop => {
                self.stopped = true;
                self.chunks.start(&mut chunks);
                let finish =
                    finish_reason(self.stop_reason.as_deref(), !self.tool_blocks.is_empty());
                chunks.push(self.chunks.delta(json!({}), Some(finish)));
                if self.include_usage
                    && let Some(usage) = self.usage()
                {
                    chunks.push(self.chunks.usage(&usage));
                }
            }
            Event::Error { error } => {
                return Err(TranslateError::Upstream(failure(0, error, None)));
            }
            Event::Other => {}
        }
        Ok(chunks)
    }

    fn finish(&mut self) -> Result<StreamEnd, TranslateError> {
        Ok(StreamEnd {
            chunks: Vec::new(),
            usage: self.usage(),
            served_model: self.served_model.take(),
        })
    }
}
