//! Gemini's `usageMetadata`, normalized to the host's rule and rendered in OpenAI's shape.
//!
//! Gemini counts thought tokens outside `candidatesTokenCount`; they are output (and reasoning), so
//! they are added in. Cached content tokens are already part of `promptTokenCount`.

use serde::Deserialize;
use tollgate_plugin_sdk::translator::Usage;

/// Gemini's usage counts; each may be missing (early stream chunks carry only some).
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct UsageMetadata {
    pub prompt_token_count: u64,
    pub tool_use_prompt_token_count: u64,
    pub cached_content_token_count: u64,
    pub candidates_token_count: u64,
    pub thoughts_token_count: u64,
}

impl UsageMetadata {
    /// The normalized usage.
    pub fn normalize(&self) -> Usage {
        let input = self
            .prompt_token_count
            .saturating_add(self.tool_use_prompt_token_count);
        Usage {
            input_tokens: input,
            cache_read_tokens: self.cached_content_token_count.min(input),
            cache_write_tokens: 0,
            output_tokens: self
                .candidates_token_count
                .saturating_add(self.thoughts_token_count),
            reasoning_tokens: self.thoughts_token_count,
            estimated: false,
        }
    }
}

/// OpenAI's `finish_reason` for Gemini's `finishReason`. A turn that called a function finishes
/// as `tool_calls` although Gemini says `STOP`; a prompt Gemini blocked is `content_filter`.
pub fn finish_reason(reason: Option<&str>, called_tools: bool, blocked: bool) -> &'static str {
    if called_tools {
        return "tool_calls";
    }
    if blocked {
        return "content_filter";
    }
    match reason {
        Some("MAX_TOKENS") => "length",
        Some(
            "SAFETY" | "RECITATION" | "PROHIBITED_CONTENT" | "BLOCKLIST" | "SPII" | "IMAGE_SAFETY",
        ) => "content_filter",
        _ => "stop",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn thoughts_are_output_and_cached_tokens_a_subset_of_the_prompt() {
        let usage: UsageMetadata = serde_json::from_value(json!({
            "promptTokenCount": 71, "candidatesTokenCount": 30, "thoughtsTokenCount": 124,
            "cachedContentTokenCount": 40, "totalTokenCount": 225
        }))
        .unwrap();
        let normalized = usage.normalize();
        assert_eq!(normalized.input_tokens, 71);
        assert_eq!(normalized.cache_read_tokens, 40);
        assert_eq!(normalized.output_tokens, 154);
        assert_eq!(normalized.reasoning_tokens, 124);
    }

    #[test]
    fn finish_reasons_map() {
        assert_eq!(finish_reason(Some("STOP"), false, false), "stop");
        assert_eq!(finish_reason(Some("MAX_TOKENS"), false, false), "length");
        for reason in ["SAFETY", "RECITATION", "PROHIBITED_CONTENT"] {
            assert_eq!(finish_reason(Some(reason), false, false), "content_filter");
        }
        assert_eq!(finish_reason(Some("STOP"), true, false), "tool_calls");
        assert_eq!(finish_reason(None, false, true), "content_filter");
    }
}
