//! Bindings of `world translator-plugin` and the typed calls the translate and stream stages make.
//!
//! The world's two exports are looked up one by one rather than through the generated world
//! struct, because `inbound` is optional: translators built against contract 0.1.0 do not export
//! it and must keep loading.

use wasmtime::component::{ComponentExportIndex, InstancePre, ResourceAny};

use super::sandbox::{PluginState, PluginStore};
use super::{Binding, Exports, PluginError, Role, sandbox};

wasmtime::component::bindgen!({
    world: "translator-plugin",
    path: "../wit",
    exports: { default: async },
    with: {
        "tollgate:plugin/host": super::wit::host,
        "tollgate:plugin/types": super::wit::types,
    },
});

use super::wit::types::InvalidRequest;
pub use super::wit::types::{FailureClass, Header, UpstreamFailure, Usage};
pub use exports::tollgate::plugin::inbound::{Endpoint, ForwardedAnswer, ForwardedEnd};
pub use exports::tollgate::plugin::translator::{
    AttemptContext, AuthPlacement, HttpMethod, StreamEnd, StreamEvent, StreamFraming,
    TranslateError, UpstreamRequest, UpstreamResponse,
};
use exports::tollgate::plugin::{inbound, translator, upstream_address};

/// A translator's exports, found once at load.
pub(super) struct TranslatorExports {
    translator: translator::GuestIndices,
    /// `None` for a plugin built against 0.1.0, which has no client side.
    inbound: Option<inbound::GuestIndices>,
    /// `None` for a plugin built before 0.1.2, which does not say where its paths live.
    upstream_address: Option<upstream_address::GuestIndices>,
    /// The two calls every whole chat answer makes, looked up on their own: loading the whole
    /// interface type-checks every one of its functions on every instance.
    chat_request: ComponentExportIndex,
    chat_response: ComponentExportIndex,
}

impl TranslatorExports {
    /// Finds the exports of a component that exports `translator`.
    pub(super) fn new(pre: &InstancePre<PluginState>) -> wasmtime::Result<Self> {
        let translator = translator::GuestIndices::new(pre)?;
        let inbound = inbound::GuestIndices::new(pre).ok();
        let upstream_address = upstream_address::GuestIndices::new(pre).ok();
        let component = pre.component();
        let interface = component
            .get_export_index(
                None,
                format!("tollgate:plugin/translator@{}", super::CONTRACTS[0]),
            )
            .ok_or_else(|| wasmtime::format_err!("no `translator` export"))?;
        let function = |name: &str| {
            component
                .get_export_index(Some(&interface), name)
                .ok_or_else(|| wasmtime::format_err!("no `{name}` in `translator`"))
        };
        Ok(Self {
            chat_request: function("translate-chat-request")?,
            chat_response: function("translate-chat-response")?,
            translator,
            inbound,
            upstream_address,
        })
    }
}

/// The size of a translated request, for the output cap.
fn request_bytes(request: &UpstreamRequest) -> usize {
    request.body.len()
        + request.path.len()
        + request
            .headers
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum::<usize>()
}

/// A whole answer in OpenAI's shape, chat or embeddings alike.
#[derive(Debug)]
pub struct TranslatedAnswer {
    /// OpenAI-shaped JSON text.
    pub body: String,
    /// Normalized usage.
    pub usage: Usage,
    /// The model the upstream reported.
    pub served_model: Option<String>,
}

/// Which translation a one-shot call performs.
#[derive(Debug, Clone, Copy)]
pub enum RequestKind {
    /// `translate-chat-request`.
    Chat,
    /// `translate-embeddings-request`.
    Embeddings,
}

impl Binding {
    fn translator_exports(&self) -> Result<&TranslatorExports, PluginError> {
        match &self.compiled.exports {
            Exports::Translator(exports) => Ok(exports),
            _ => Err(self.wrong_role(Role::Translator)),
        }
    }

    fn inbound_exports(&self) -> Result<&inbound::GuestIndices, PluginError> {
        let exports = self.translator_exports()?;
        let indices = exports
            .inbound
            .as_ref()
            .ok_or_else(|| PluginError::Unbound {
                role: Role::Translator,
                what: format!(
                    "clients of its protocol ({} has no `inbound` export)",
                    self.plugin()
                ),
            })?;
        Ok(indices)
    }

    /// Builds the upstream request for one attempt.
    pub async fn translate_request(
        &self,
        kind: RequestKind,
        context: &AttemptContext,
        body: &str,
    ) -> Result<Result<UpstreamRequest, TranslateError>, PluginError> {
        let exports = self.translator_exports()?;
        let export = match kind {
            RequestKind::Chat => "translate-chat-request",
            RequestKind::Embeddings => "translate-embeddings-request",
        };
        self.call(
            export,
            async |store, instance| match kind {
                RequestKind::Chat => {
                    let call = instance.get_typed_func::<
                        (&AttemptContext, &str),
                        (Result<UpstreamRequest, TranslateError>,),
                    >(&mut *store, &exports.chat_request)?;
                    Ok(call.call_async(&mut *store, (context, body)).await?.0)
                }
                RequestKind::Embeddings => {
                    exports
                        .translator
                        .load(&mut *store, &instance)?
                        .call_translate_embeddings_request(&mut *store, context, body)
                        .await
                }
            },
            |answer| super::answered_bytes(answer, request_bytes),
        )
        .await
    }

    /// Reads a 2xx whole answer (chat or embeddings) into OpenAI's shape.
    pub async fn translate_response(
        &self,
        kind: RequestKind,
        context: &AttemptContext,
        response: &UpstreamResponse,
    ) -> Result<Result<TranslatedAnswer, TranslateError>, PluginError> {
        let exports = self.translator_exports()?;
        let export = match kind {
            RequestKind::Chat => "translate-chat-response",
            RequestKind::Embeddings => "translate-embeddings-response",
        };
        self.call(
            export,
            async |store, instance| {
                Ok(match kind {
                    RequestKind::Chat => {
                        let call = instance.get_typed_func::<
                        (&AttemptContext, &UpstreamResponse),
                        (Result<translator::ChatResponse, TranslateError>,),
                    >(&mut *store, &exports.chat_response)?;
                        call.call_async(&mut *store, (context, response))
                            .await?
                            .0
                            .map(|answer| TranslatedAnswer {
                                body: answer.body,
                                usage: answer.usage,
                                served_model: answer.served_model,
                            })
                    }
                    RequestKind::Embeddings => exports
                        .translator
                        .load(&mut *store, &instance)?
                        .call_translate_embeddings_response(&mut *store, context, response)
                        .await?
                        .map(|answer| TranslatedAnswer {
                            body: answer.body,
                            usage: answer.usage,
                            served_model: answer.served_model,
                        }),
                })
            },
            |answer| super::answered_bytes(answer, |answer| answer.body.len()),
        )
        .await
    }

    /// Classifies a non-2xx answer.
    pub async fn read_failure(
        &self,
        context: &AttemptContext,
        response: &UpstreamResponse,
    ) -> Result<UpstreamFailure, PluginError> {
        let exports = self.translator_exports()?;
        self.call(
            "read-failure",
            async |store, instance| {
                exports
                    .translator
                    .load(&mut *store, &instance)?
                    .call_read_failure(&mut *store, context, response)
                    .await
            },
            |_| 0,
        )
        .await
    }

    /// Opens a stream translator for one streamed upstream answer. It keeps its own store (and
    /// instance) until dropped; every `push` gets the full per-call deadline.
    pub async fn open_stream(
        &self,
        context: &AttemptContext,
    ) -> Result<StreamSession, PluginError> {
        let exports = self.translator_exports()?;
        let mut store = self.store()?;
        let (plugin, resource) = self
            .call_in(&mut store, "stream-translator", async |store, instance| {
                let plugin = exports.translator.load(&mut *store, &instance)?;
                let resource = plugin
                    .stream_translator()
                    .call_constructor(&mut *store, context)
                    .await?;
                Ok((plugin, resource))
            })
            .await?;
        Ok(StreamSession {
            store,
            plugin,
            resource,
        })
    }

    /// The translator's `version-path` (0.1.2), asked once at bind time; `None` for an older
    /// plugin.
    pub(super) async fn translator_version_path(&self) -> Result<Option<String>, PluginError> {
        let exports = self.translator_exports()?;
        let Some(indices) = &exports.upstream_address else {
            return Ok(None);
        };
        self.call(
            "version-path",
            async |store, instance| {
                indices
                    .load(&mut *store, &instance)?
                    .call_version_path(&mut *store)
                    .await
            },
            |path| path.as_ref().map_or(0, String::len),
        )
        .await
    }

    pub(super) async fn translator_validate_config(
        &self,
    ) -> Result<Result<(), String>, PluginError> {
        let exports = self.translator_exports()?;
        self.call(
            "validate-config",
            async |store, instance| {
                exports
                    .translator
                    .load(&mut *store, &instance)?
                    .call_validate_config(&mut *store, &self.config)
                    .await
            },
            |_| 0,
        )
        .await
    }
}

/// One live `stream-translator` resource with the store that owns it. Dropping the session drops the
/// store and with it the instance.
pub struct StreamSession {
    store: PluginStore,
    plugin: translator::Guest,
    resource: ResourceAny,
}

impl StreamSession {
    /// Pushes one upstream event; returns the OpenAI chunks to send now.
    pub async fn push(
        &mut self,
        event: &StreamEvent,
    ) -> Result<Result<Vec<String>, TranslateError>, PluginError> {
        let resource = self.resource;
        let plugin = &self.plugin;
        let chunks = sandbox::bounded(&mut self.store, "stream-translator.push", async |store| {
            plugin
                .stream_translator()
                .call_push(&mut *store, resource, event)
                .await
        })
        .await?;
        if let Ok(chunks) = &chunks {
            let bytes = chunks.iter().map(String::len).sum();
            sandbox::check_output(&self.store, "stream-translator.push", bytes)?;
        }
        Ok(chunks)
    }

    /// Ends the stream: trailing chunks, usage, served model.
    pub async fn finish(&mut self) -> Result<Result<StreamEnd, TranslateError>, PluginError> {
        let resource = self.resource;
        let plugin = &self.plugin;
        sandbox::bounded(&mut self.store, "stream-translator.finish", async |store| {
            plugin
                .stream_translator()
                .call_finish(&mut *store, resource)
                .await
        })
        .await
    }
}

/// The client side (`inbound`): calls for requests that came in in the plugin's own protocol.
impl Binding {
    /// The client's body in OpenAI's chat shape.
    pub async fn to_openai_request(
        &self,
        endpoint: Endpoint,
        body: &str,
    ) -> Result<Result<String, InvalidRequest>, PluginError> {
        let indices = self.inbound_exports()?;
        self.call(
            "to-openai-request",
            async |store, instance| {
                indices
                    .load(&mut *store, &instance)?
                    .call_to_openai_request(&mut *store, endpoint, body)
                    .await
            },
            |answer| super::answered_bytes(answer, String::len),
        )
        .await
    }

    /// The upstream request for the client's own body, on a channel of the same protocol.
    pub async fn forward_request(
        &self,
        endpoint: Endpoint,
        context: &AttemptContext,
        body: &str,
        client_headers: &[Header],
    ) -> Result<Result<UpstreamRequest, TranslateError>, PluginError> {
        let indices = self.inbound_exports()?;
        self.call(
            "forward-request",
            async |store, instance| {
                indices
                    .load(&mut *store, &instance)?
                    .call_forward_request(&mut *store, endpoint, context, body, client_headers)
                    .await
            },
            |answer| super::answered_bytes(answer, request_bytes),
        )
        .await
    }

    /// Reads a same-protocol 2xx whole answer: passed through, usage read.
    pub async fn read_forwarded_response(
        &self,
        endpoint: Endpoint,
        context: &AttemptContext,
        response: &UpstreamResponse,
    ) -> Result<Result<ForwardedAnswer, TranslateError>, PluginError> {
        let indices = self.inbound_exports()?;
        self.call(
            "read-forwarded-response",
            async |store, instance| {
                indices
                    .load(&mut *store, &instance)?
                    .call_read_forwarded_response(&mut *store, endpoint, context, response)
                    .await
            },
            |answer| super::answered_bytes(answer, |answer| answer.body.len()),
        )
        .await
    }

    /// An OpenAI `chat.completion` body in the plugin's protocol.
    pub async fn from_openai_response(
        &self,
        context: &AttemptContext,
        body: &str,
    ) -> Result<Result<String, TranslateError>, PluginError> {
        let indices = self.inbound_exports()?;
        self.call(
            "from-openai-response",
            async |store, instance| {
                indices
                    .load(&mut *store, &instance)?
                    .call_from_openai_response(&mut *store, context, body)
                    .await
            },
            |answer| super::answered_bytes(answer, String::len),
        )
        .await
    }

    /// The count-tokens answer for the host's own count.
    pub async fn count_tokens_answer(&self, input_tokens: u64) -> Result<String, PluginError> {
        let indices = self.inbound_exports()?;
        self.call(
            "count-tokens-answer",
            async |store, instance| {
                indices
                    .load(&mut *store, &instance)?
                    .call_count_tokens_answer(&mut *store, input_tokens)
                    .await
            },
            String::len,
        )
        .await
    }

    /// Opens a same-protocol stream reader; like [`Binding::open_stream`], it keeps its own store.
    pub async fn open_forwarded_stream(
        &self,
        context: &AttemptContext,
    ) -> Result<ForwardedSession, PluginError> {
        let indices = self.inbound_exports()?;
        let mut store = self.store()?;
        let (plugin, resource) = self
            .call_in(&mut store, "forwarded-stream", async |store, instance| {
                let plugin = indices.load(&mut *store, &instance)?;
                let resource = plugin
                    .forwarded_stream()
                    .call_constructor(&mut *store, context)
                    .await?;
                Ok((plugin, resource))
            })
            .await?;
        Ok(ForwardedSession {
            store,
            plugin,
            resource,
        })
    }

    /// Opens a converter of OpenAI chunks into the plugin's protocol; it keeps its own store.
    pub async fn open_openai_stream(
        &self,
        context: &AttemptContext,
    ) -> Result<ConvertedSession, PluginError> {
        let indices = self.inbound_exports()?;
        let mut store = self.store()?;
        let (plugin, resource) = self
            .call_in(&mut store, "openai-stream", async |store, instance| {
                let plugin = indices.load(&mut *store, &instance)?;
                let resource = plugin
                    .openai_stream()
                    .call_constructor(&mut *store, context)
                    .await?;
                Ok((plugin, resource))
            })
            .await?;
        Ok(ConvertedSession {
            store,
            plugin,
            resource,
        })
    }
}

fn events_bytes(events: &[StreamEvent]) -> usize {
    events
        .iter()
        .map(|event| event.data.len() + event.event.as_ref().map_or(0, String::len))
        .sum()
}

/// One live `forwarded-stream` resource with the store that owns it.
pub struct ForwardedSession {
    store: PluginStore,
    plugin: inbound::Guest,
    resource: ResourceAny,
}

impl ForwardedSession {
    /// Pushes one upstream event; returns the events to send the client now.
    pub async fn push(
        &mut self,
        event: &StreamEvent,
    ) -> Result<Result<Vec<StreamEvent>, TranslateError>, PluginError> {
        let resource = self.resource;
        let plugin = &self.plugin;
        let events = sandbox::bounded(&mut self.store, "forwarded-stream.push", async |store| {
            plugin
                .forwarded_stream()
                .call_push(&mut *store, resource, event)
                .await
        })
        .await?;
        if let Ok(events) = &events {
            sandbox::check_output(&self.store, "forwarded-stream.push", events_bytes(events))?;
        }
        Ok(events)
    }

    /// Ends the stream: trailing events, usage, served model, completeness.
    pub async fn finish(&mut self) -> Result<Result<ForwardedEnd, TranslateError>, PluginError> {
        let resource = self.resource;
        let plugin = &self.plugin;
        sandbox::bounded(&mut self.store, "forwarded-stream.finish", async |store| {
            plugin
                .forwarded_stream()
                .call_finish(&mut *store, resource)
                .await
        })
        .await
    }
}

/// One live `openai-stream` resource with the store that owns it.
pub struct ConvertedSession {
    store: PluginStore,
    plugin: inbound::Guest,
    resource: ResourceAny,
}

impl ConvertedSession {
    /// Pushes one OpenAI chunk; returns the events to send the client now.
    pub async fn push(
        &mut self,
        chunk: &str,
    ) -> Result<Result<Vec<StreamEvent>, TranslateError>, PluginError> {
        let resource = self.resource;
        let plugin = &self.plugin;
        let events = sandbox::bounded(&mut self.store, "openai-stream.push", async |store| {
            plugin
                .openai_stream()
                .call_push(&mut *store, resource, chunk)
                .await
        })
        .await?;
        if let Ok(events) = &events {
            sandbox::check_output(&self.store, "openai-stream.push", events_bytes(events))?;
        }
        Ok(events)
    }

    /// Ends the stream with the final usage; returns the closing events.
    pub async fn finish(
        &mut self,
        usage: Usage,
    ) -> Result<Result<Vec<StreamEvent>, TranslateError>, PluginError> {
        let resource = self.resource;
        let plugin = &self.plugin;
        sandbox::bounded(&mut self.store, "openai-stream.finish", async |store| {
            plugin
                .openai_stream()
                .call_finish(&mut *store, resource, usage)
                .await
        })
        .await
    }
}
