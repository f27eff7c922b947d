//! Shipped translator plugins run in the host's plugin runtime against recorded provider bodies
//! and streams (tests/fixtures/<protocol>/, with their sources).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tollgate::plugin::Operation;
use tollgate::plugin::translator::{
    AttemptContext, RequestKind, StreamFraming, TranslateError, UpstreamResponse, Usage,
};
use tollgate::plugin::{Binding, Limits, PluginRuntime, Role, RuntimeSettings, shipped};
use tollgate::sse::EventFramer;

/// A shipped translator bound in a real plugin runtime, with its protocol's fixtures.
pub struct Plugin {
    pub binding: Binding,
    protocol: &'static str,
}

/// Binds the shipped translator of `protocol` with `config`.
pub async fn shipped_translator(
    protocol: &'static str,
    config: &str,
) -> Result<Plugin, tollgate::plugin::PluginError> {
    // One compile cache for every test: compiling a component takes seconds in a debug build.
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("translator-plugin-cache");
    let runtime: Arc<PluginRuntime> = PluginRuntime::new(&RuntimeSettings {
        max_instances: 16,
        max_memory_bytes: 64 << 20,
        cache_dir: cache,
        max_instances_per_tenant: None,
    })
    .expect("the engine starts");
    let plugin = shipped::find(Role::Translator, protocol).expect("the translator is shipped");
    let compiled = runtime
        .load(protocol, Role::Translator, plugin.bytes, None)
        .expect("the shipped plugin compiles");
    let binding = Binding::new(runtime, compiled, config.to_owned(), Limits::default()).await?;
    Ok(Plugin { binding, protocol })
}

/// The facts of one attempt, as the host makes them.
pub fn context(stream: bool, include_usage: bool, channel_options: &str) -> AttemptContext {
    AttemptContext {
        request_id: "req-1".into(),
        operation: Operation::Chat,
        public_model: "public-model".into(),
        upstream_model: "upstream-model".into(),
        channel: "main".into(),
        channel_options: channel_options.into(),
        stream,
        include_usage,
        created_unix_s: 1_700_000_000,
    }
}

/// What a client would receive for a fixture stream: every chunk, then the stream's end.
pub struct Streamed {
    pub chunks: Vec<Value>,
    pub usage: Option<Usage>,
    pub served_model: Option<String>,
    pub error: Option<TranslateError>,
}

impl Streamed {
    /// The concatenated `field` of every delta.
    pub fn text(&self, field: &str) -> String {
        self.chunks
            .iter()
            .filter_map(|chunk| chunk["choices"][0]["delta"][field].as_str())
            .collect()
    }

    /// Every finish reason sent.
    pub fn finish_reasons(&self) -> Vec<&str> {
        self.chunks
            .iter()
            .filter_map(|chunk| chunk["choices"][0]["finish_reason"].as_str())
            .collect()
    }
}

impl Plugin {
    /// The bytes of a fixture of this plugin's protocol (tests/fixtures/<protocol>/).
    pub fn fixture(&self, name: &str) -> Vec<u8> {
        let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(self.protocol)
            .join(name);
        std::fs::read(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
    }

    /// Runs a fixture stream through the host's framer (in small, uneven pieces, as a network
    /// delivers them) and the plugin: what a client would receive, then the stream's end.
    pub async fn stream_fixture(&self, name: &str, include_usage: bool) -> Streamed {
        let mut session = self
            .binding
            .open_stream(&context(true, include_usage, "{}"))
            .await
            .expect("the stream opens");
        let mut framer = EventFramer::new(StreamFraming::Sse);
        let bytes = self.fixture(name);
        let mut events = Vec::new();
        for piece in bytes.chunks(37) {
            events.extend(framer.push(piece));
        }
        events.extend(framer.finish());
        let mut streamed = Streamed {
            chunks: Vec::new(),
            usage: None,
            served_model: None,
            error: None,
        };
        for event in &events {
            match session.push(event).await.expect("the plugin runs") {
                Ok(chunks) => streamed.chunks.extend(
                    chunks
                        .iter()
                        .map(|chunk| serde_json::from_str(chunk).expect("chunks are JSON")),
                ),
                Err(error) => {
                    streamed.error = Some(error);
                    break;
                }
            }
        }
        let end = session
            .finish()
            .await
            .expect("the plugin runs")
            .expect("finish succeeds");
        streamed.chunks.extend(
            end.chunks
                .iter()
                .map(|chunk| serde_json::from_str::<Value>(chunk).expect("chunks are JSON")),
        );
        streamed.usage = end.usage;
        streamed.served_model = end.served_model;
        streamed
    }

    /// A whole-answer fixture through the plugin: the OpenAI body, usage and served model.
    pub async fn whole(&self, name: &str) -> (Value, Usage, Option<String>) {
        let response = UpstreamResponse {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: self.fixture(name),
        };
        let answer = self
            .binding
            .translate_response(RequestKind::Chat, &context(false, false, "{}"), &response)
            .await
            .expect("the plugin runs")
            .expect("the answer translates");
        (
            serde_json::from_str(&answer.body).expect("JSON"),
            answer.usage,
            answer.served_model,
        )
    }
}

impl Streamed {
    /// The OpenAI stream invariants: one id on every chunk, the role in the first chunk only.
    pub fn assert_one_id_and_role_first(&self) {
        let first = &self.chunks[0];
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(first["object"], "chat.completion.chunk");
        let id = first["id"].as_str().expect("an id");
        assert!(
            self.chunks.iter().all(|chunk| chunk["id"] == id),
            "one id across the stream"
        );
        assert_eq!(
            self.chunks
                .iter()
                .filter(|chunk| !chunk["choices"][0]["delta"]["role"].is_null())
                .count(),
            1,
            "the role only in the first chunk"
        );
    }
}
