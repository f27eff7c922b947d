//! Framing of event streams: splitting an upstream body into events (SSE or NDJSON, as the
//! translator declared) and writing OpenAI chunks to the client as SSE.

use bytes::Bytes;

use crate::plugin::translator::{StreamEvent, StreamFraming};

/// Splits a byte stream into events as bytes arrive; holds back only an incomplete line.
pub struct EventFramer {
    framing: StreamFraming,
    line: Vec<u8>,
    event: Option<String>,
    data: String,
    has_data: bool,
}

impl EventFramer {
    /// A framer for the given framing.
    pub fn new(framing: StreamFraming) -> Self {
        Self {
            framing,
            line: Vec::new(),
            event: None,
            data: String::new(),
            has_data: false,
        }
    }

    /// Takes the next bytes of the body; returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<StreamEvent> {
        let mut events = Vec::new();
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|&byte| byte == b'\n') {
            self.line.extend_from_slice(&rest[..end]);
            rest = &rest[end + 1..];
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if let Some(event) = self.line_done(&line) {
                events.push(event);
            }
        }
        self.line.extend_from_slice(rest);
        events
    }

    /// The body ended: an event still being assembled (no final blank line) is complete now.
    pub fn finish(&mut self) -> Option<StreamEvent> {
        let line = std::mem::take(&mut self.line);
        let from_line = if line.is_empty() {
            None
        } else {
            self.line_done(&line)
        };
        from_line.or_else(|| self.dispatch())
    }

    fn line_done(&mut self, line: &[u8]) -> Option<StreamEvent> {
        let line = String::from_utf8_lossy(line);
        match self.framing {
            StreamFraming::Ndjson => {
                let trimmed = line.trim();
                (!trimmed.is_empty()).then(|| StreamEvent {
                    event: None,
                    data: trimmed.to_owned(),
                })
            }
            StreamFraming::Sse => {
                if line.is_empty() {
                    return self.dispatch();
                }
                if line.starts_with(':') {
                    return None;
                }
                let (field, value) = match line.split_once(':') {
                    Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                    None => (line.as_ref(), ""),
                };
                match field {
                    "event" => self.event = Some(value.to_owned()),
                    "data" => {
                        if self.has_data {
                            self.data.push('\n');
                        }
                        self.data.push_str(value);
                        self.has_data = true;
                    }
                    _ => {}
                }
                None
            }
        }
    }

    fn dispatch(&mut self) -> Option<StreamEvent> {
        let event = self.event.take();
        if !self.has_data {
            return None;
        }
        self.has_data = false;
        Some(StreamEvent {
            event,
            data: std::mem::take(&mut self.data),
        })
    }
}

/// One SSE frame carrying `payload` as its data.
pub fn data_frame(payload: &str) -> Bytes {
    let mut frame = String::with_capacity(payload.len() + 8);
    frame.push_str("data: ");
    frame.push_str(payload);
    frame.push_str("\n\n");
    Bytes::from(frame)
}

/// One named SSE event (`event: NAME` then its data, one `data:` line per line of it), as a client
/// protocol other than OpenAI's streams them.
pub fn event_frame(event: &StreamEvent) -> Bytes {
    let mut frame = String::with_capacity(event.data.len() + 32);
    if let Some(name) = &event.event {
        frame.push_str("event: ");
        frame.push_str(name);
        frame.push('\n');
    }
    for line in event.data.split('\n') {
        frame.push_str("data: ");
        frame.push_str(line);
        frame.push('\n');
    }
    frame.push('\n');
    Bytes::from(frame)
}

/// Whether an OpenAI chunk payload sets a `finish_reason` (a string, not `null`). Every complete
/// OpenAI stream has one before `[DONE]`; a stream that ends without one was cut, whatever the
/// upstream's framing said. A byte scan, not a parse: it runs on every chunk.
pub fn carries_finish_reason(payload: &str) -> bool {
    const FIELD: &str = "\"finish_reason\"";
    let mut rest = payload;
    while let Some(at) = rest.find(FIELD) {
        rest = &rest[at + FIELD.len()..];
        let value = rest.trim_start();
        if let Some(value) = value.strip_prefix(':')
            && value.trim_start().starts_with('"')
        {
            return true;
        }
    }
    false
}

/// Keys under which streamed answers carry generated text, in OpenAI's chunks and in the
/// events of the protocols a stream passes through in (`text`, `partial_json`, `thinking`).
const TEXT_KEYS: [&[u8]; 8] = [
    b"content",
    b"text",
    b"partial_json",
    b"thinking",
    b"arguments",
    b"refusal",
    b"reasoning_content",
    b"reasoning",
];

/// Bytes of generated text a frame carries: the string values under [`TEXT_KEYS`], escapes
/// counted as written. The host counts a stream's output with it as it goes out (four bytes a
/// token), whatever the protocol. A byte scan, not a parse: it runs on every frame.
pub fn text_bytes(frame: &[u8]) -> u64 {
    let mut total = 0;
    let mut under_text_key = false;
    let mut at = 0;
    while let Some(open) = frame[at..].iter().position(|&byte| byte == b'"') {
        let start = at + open + 1;
        let mut end = start;
        while end < frame.len() && frame[end] != b'"' {
            end += if frame[end] == b'\\' { 2 } else { 1 };
        }
        let end = end.min(frame.len());
        let string = &frame[start..end];
        at = (end + 1).min(frame.len());
        let after = frame[at..]
            .iter()
            .find(|byte| !byte.is_ascii_whitespace())
            .copied();
        if after == Some(b':') {
            under_text_key = TEXT_KEYS.contains(&string);
        } else {
            if under_text_key {
                total += string.len() as u64;
            }
            under_text_key = false;
        }
    }
    total
}

/// The frame that ends an OpenAI stream.
pub const DONE_FRAME: &str = "data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn sse() -> EventFramer {
        EventFramer::new(StreamFraming::Sse)
    }

    #[test]
    fn a_named_event_frames_back_to_itself() {
        let event = StreamEvent {
            event: Some("message_stop".to_owned()),
            data: "{\"type\":\"message_stop\"}\nsecond line".to_owned(),
        };
        let frame = event_frame(&event);
        assert_eq!(
            frame,
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\ndata: second line\n\n"
        );
        let framed = sse().push(&frame);
        assert_eq!(framed.len(), 1);
        assert_eq!(framed[0].event, event.event);
        assert_eq!(framed[0].data, event.data);
    }

    #[test]
    fn events_split_across_chunks_are_reassembled() {
        let mut framer = sse();
        assert!(framer.push(b"event: message_start\nda").is_empty());
        let events = framer.push(b"ta: {\"a\":1}\r\n\r\ndata: [DONE]\n\n");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].event.as_deref(), Some("message_start"));
        assert_eq!(events[0].data, "{\"a\":1}");
        assert_eq!(events[1].event, None);
        assert_eq!(events[1].data, "[DONE]");
    }

    #[test]
    fn comments_are_skipped_and_data_lines_joined() {
        let mut framer = sse();
        let events = framer.push(b": keep-alive\n\ndata: a\ndata:b\n\n");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, "a\nb");
    }

    #[test]
    fn an_unterminated_last_event_is_delivered_at_the_end() {
        let mut framer = sse();
        assert!(framer.push(b"data: tail").is_empty());
        assert_eq!(
            framer.finish().map(|event| event.data).as_deref(),
            Some("tail")
        );
        assert!(framer.finish().is_none());
    }

    #[test]
    fn finish_reasons_are_found_in_any_spacing_and_null_is_not_one() {
        assert!(carries_finish_reason(
            r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#
        ));
        assert!(carries_finish_reason(
            r#"{"choices": [{"delta": {}, "finish_reason" : "tool_calls"}]}"#
        ));
        assert!(!carries_finish_reason(
            r#"{"choices":[{"delta":{"content":"finish_reason"},"finish_reason":null}]}"#
        ));
        assert!(!carries_finish_reason(r#"{"choices":[],"usage":{}}"#));
    }

    #[test]
    fn text_is_counted_under_its_keys_in_every_protocol_and_nothing_else_is() {
        let openai = r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}"#;
        assert_eq!(text_bytes(openai.as_bytes()), 5);
        let tool = r#"data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"get","arguments":"{\"city\":"}}]}}]}"#;
        assert_eq!(text_bytes(tool.as_bytes()), br#"{\"city\":"#.len() as u64);
        let anthropic = "event: content_block_delta\ndata: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \"漢字\"}}\n\n";
        assert_eq!(text_bytes(anthropic.as_bytes()), "漢字".len() as u64);
        let role = r#"data: {"choices":[{"delta":{"role":"assistant","content":""}}],"usage":{"prompt_tokens":9}}"#;
        assert_eq!(text_bytes(role.as_bytes()), 0);
    }

    #[test]
    fn ndjson_is_one_event_per_line() {
        let mut framer = EventFramer::new(StreamFraming::Ndjson);
        let events = framer.push(b"{\"a\":1}\n\n{\"b\":2}\n{\"c\"");
        assert_eq!(events.len(), 2);
        assert_eq!(
            framer.finish().map(|event| event.data).as_deref(),
            Some("{\"c\"")
        );
    }
}
