//! What the translator fuzz targets share: an attempt's facts and the chunk invariant.

use tollgate_plugin_sdk::translator::{AttemptContext, Operation};

/// The facts of one streamed chat attempt.
pub fn context(include_usage: bool) -> AttemptContext {
    AttemptContext {
        request_id: "fuzz".into(),
        operation: Operation::Chat,
        public_model: "m".into(),
        upstream_model: "m-up".into(),
        channel: "c".into(),
        channel_options: "{}".into(),
        stream: true,
        include_usage,
        created_unix_s: 0,
    }
}

/// Every chunk a translator emits must be a JSON object.
pub fn assert_object(chunk: &str) {
    let value: serde_json::Value = serde_json::from_str(chunk).expect("chunks are JSON");
    assert!(value.is_object(), "chunks are objects: {chunk}");
}
