//! A Gemini `streamGenerateContent?alt=sse` stream → OpenAI `chat.completion.chunk`s.
//!
//! Every event is a whole `GenerateContentResponse` holding the next parts. Text goes out as
//! content deltas, thoughts as `reasoning_content`, and a function call arrives whole, so it goes
//! out as one tool-call delta (id, name, arguments, thought signature). Gemini has no end event:
//! the finish reason comes with the last parts (possibly after the call), so the finish chunk and
//! the usage chunk are written by `finish` — only if a finish reason came, else the stream was cut
//! and the host says so.

use serde_json::json;
use tollgate_plugin_sdk::translator::{
    AttemptContext, ChunkWriter, StreamEnd, StreamEvent, StreamTranslate, TranslateError, Usage,
    stream_usage,
};

use crate::answer::{GenerateContentResponse, tool_call};
use crate::failure::failure;
use crate::usage::{UsageMetadata, finish_reason};

/// The state of one streamed answer.
pub struct GeminiStream {
    include_usage: bool,
    request_id: String,
    chunks: ChunkWriter,
    served_model: Option<String>,
    tool_calls: usize,
    usage: Option<UsageMetadata>,
    finish_reason: Option<String>,
    blocked: bool,
    /// Bytes of text passed to the client, for an estimate when the stream is cut before usage.
    delivered_text_bytes: usize,
}

impl GeminiStream {
    fn ended(&self) -> bool {
        self.finish_reason.is_some() || self.blocked
    }

    /// The usage so far; before a finish reason the stream was cut and it is an estimate.
    fn usage(&self) -> Option<Usage> {
        stream_usage(
            self.usage.as_ref().map(UsageMetadata::normalize),
            self.ended(),
            self.delivered_text_bytes,
        )
    }
}

impl StreamTranslate for GeminiStream {
    fn new(context: AttemptContext) -> Self {
        Self {
            include_usage: context.include_usage,
            chunks: ChunkWriter::new(
                format!("chatcmpl-{}", context.request_id),
                context.upstream_model,
                context.created_unix_s,
            ),
            request_id: context.request_id,
            served_model: None,
            tool_calls: 0,
            usage: None,
            finish_reason: None,
            blocked: false,
            delivered_text_bytes: 0,
        }
    }

    fn push(&mut self, event: StreamEvent) -> Result<Vec<String>, TranslateError> {
        let mut response: GenerateContentResponse = serde_json::from_str(&event.data)
            .map_err(|error| TranslateError::MalformedResponse(error.to_string()))?;
        if let Some(error) = response.error.take() {
            return Err(TranslateError::Upstream(failure(0, error)));
        }
        // The chunk id follows Gemini's response id, as the whole answer's does; it is fixed by
        // the first chunk.
        if !self.chunks.started()
            && let Some(id) = response.response_id.take()
        {
            self.chunks.id = format!("chatcmpl-{id}");
        }
        if self.served_model.is_none()
            && let Some(model) = response.model_version.take()
        {
            self.chunks.model.clone_from(&model);
            self.served_model = Some(model);
        }
        if response.usage_metadata.is_some() {
            self.usage = response.usage_metadata;
        }
        if let Some(reason) = response.finish_reason() {
            self.finish_reason = Some(reason.to_owned());
        }
        self.blocked |= response.blocked();
        let mut chunks = Vec::new();
        for part in response.parts() {
            if let Some(call) = part.function_call {
                let index = self.tool_calls;
                self.tool_calls += 1;
                let mut call = tool_call(call, part.thought_signature, &self.request_id, index);
                self.delivered_text_bytes += call.to_string().len();
                if let Some(object) = call.as_object_mut() {
                    object.insert("index".into(), json!(index));
                }
                self.chunks
                    .emit(&mut chunks, json!({ "tool_calls": [call] }));
            } else if let Some(text) = part.text.filter(|text| !text.is_empty()) {
                self.delivered_text_bytes += text.len();
                let field = if part.thought {
                    "reasoning_content"
                } else {
                    "content"
                };
                self.chunks.emit(&mut chunks, json!({ field: text }));
            }
        }
        Ok(chunks)
    }

    fn finish(&mut self) -> Result<StreamEnd, TranslateError> {
        let mut chunks = Vec::new();
        if self.ended() {
            self.chunks.start(&mut chunks);
            let finish = finish_reason(
                self.finish_reason.as_deref(),
                self.tool_calls > 0,
                self.blocked,
            );
            chunks.push(self.chunks.delta(json!({}), Some(finish)));
            if self.include_usage
                && let Some(usage) = self.usage()
            {
                chunks.push(self.chunks.usage(&usage));
            }
        }
        Ok(StreamEnd {
            chunks,
            usage: self.usage(),
            served_model: self.served_model.take(),
        })
    }
}
