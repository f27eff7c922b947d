//! Anthropic's usage counts, normalized to the host's rule and rendered in OpenAI's shape.
//!
//! Anthropic's `input_tokens` excludes the tokens read from and written to the prompt cache; the
//! normalized `input-tokens` (and OpenAI's `prompt_tokens`) include them, so they are added back.

use serde::Deserialize;
use tollgate_plugin_sdk::translator::Usage;

/// Anthropic's `usage` object; every count optional because `message_delta` carries only the ones
/// that changed (and older streams only `output_tokens`).
#[derive(Debug, Default, Clone, Deserialize)]
pub struct AnthropicUsage {
    #[serde(default)]
    pub input_tokens: Option<u64>,
    #[serde(default)]
    pub output_tokens: Option<u64>,
    #[serde(default)]
    pub cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    pub cache_read_input_tokens: Option<u64>,
}

impl AnthropicUsage {
    /// Takes the counts a later (cumulative) report carries, keeping the earlier ones it omits.
    pub fn update(&mut self, later: &AnthropicUsage) {
        let keep = |mine: &mut Option<u64>, theirs: Option<u64>| {
            if theirs.is_some() {
                *mine = theirs;
            }
        };
        keep(&mut self.input_tokens, later.input_tokens);
        keep(&mut self.output_tokens, later.output_tokens);
        keep(
            &mut self.cache_creation_input_tokens,
            later.cache_creation_input_tokens,
        );
        keep(
            &mut self.cache_read_input_tokens,
            later.cache_read_input_tokens,
        );
    }

    /// The normalized usage: cache reads and writes are part of the input.
    pub fn normalize(&self) -> Usage {
        let cache_read = self.cache_read_input_tokens.unwrap_or(0);
        let cache_write = self.cache_creation_input_tokens.unwrap_or(0);
        Usage {
            input_tokens: self
                .input_tokens
                .unwrap_or(0)
                .saturating_add(cache_read)
                .saturating_add(cache_write),
            cache_read_tokens: cache_read,
            cache_write_tokens: cache_write,
            output_tokens: self.output_tokens.unwrap_or(0),
            reasoning_tokens: 0,
            estimated: false,
        }
    }
}

/// OpenAI's `finish_reason` for Anthropic's `stop_reason`. A turn that called a tool finishes as
/// `tool_calls` whatever Anthropic says, because that is what tells an OpenAI client to run it.
pub fn finish_reason(stop_reason: Option<&str>, called_tools: bool) -> &'static str {
    if called_tools {
        return "tool_calls";
    }
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cache_reads_and_writes_are_added_back_into_the_input() {
        let usage: AnthropicUsage = serde_json::from_value(json!({
            "input_tokens": 21, "cache_creation_input_tokens": 188086,
            "cache_read_input_tokens": 7, "output_tokens": 393
        }))
        .unwrap();
        let normalized = usage.normalize();
        assert_eq!(normalized.input_tokens, 21 + 188086 + 7);
        assert_eq!(normalized.cache_write_tokens, 188086);
        assert_eq!(normalized.cache_read_tokens, 7);
        assert_eq!(normalized.output_tokens, 393);
    }

    #[test]
    fn a_later_report_overrides_only_what_it_carries() {
        let mut usage: AnthropicUsage = serde_json::from_value(
            json!({"input_tokens": 10, "cache_read_input_tokens": 4, "output_tokens": 1}),
        )
        .unwrap();
        usage.update(
            &serde_json::from_value(json!({"output_tokens": 15, "cache_read_input_tokens": null}))
                .unwrap(),
        );
        let normalized = usage.normalize();
        assert_eq!(
            (normalized.input_tokens, normalized.output_tokens),
            (14, 15)
        );
    }

    #[test]
    fn stop_reasons_map_to_finish_reasons() {
        assert_eq!(finish_reason(Some("end_turn"), false), "stop");
        assert_eq!(finish_reason(Some("stop_sequence"), false), "stop");
        assert_eq!(finish_reason(Some("max_tokens"), false), "length");
        assert_eq!(finish_reason(Some("tool_use"), false), "tool_calls");
        assert_eq!(finish_reason(Some("refusal"), false), "content_filter");
        assert_eq!(finish_reason(Some("end_turn"), true), "tool_calls");
    }
}
