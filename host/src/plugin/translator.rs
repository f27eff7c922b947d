//! Bindings of `world translator-plugin` and the typed calls the translate and stream stages make.

use wasmtime::Store;
use wasmtime::component::ResourceAny;

use super::sandbox::PluginState;
use super::{Binding, Exports, PluginError, Role, sandbox};

wasmtime::component::bindgen!({
    world: "translator-plugin",
    path: "../wit",
    exports: { default: async },
    with: {
        "tollgate:plugin/host": super::router::tollgate::plugin::host,
        "tollgate:plugin/types": super::router::tollgate::plugin::types,
    },
});

pub use super::router::tollgate::plugin::types::{FailureClass, UpstreamFailure, Usage};
pub use exports::tollgate::plugin::translator::{
    AttemptContext, AuthPlacement, HttpMethod, StreamEnd, StreamEvent, StreamFraming,
    TranslateError, UpstreamRequest, UpstreamResponse,
};

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
    fn translator_pre(&self) -> Result<&TranslatorPluginPre<PluginState>, PluginError> {
        match &self.compiled.exports {
            Exports::Translator(pre) => Ok(pre),
            _ => Err(self.wrong_role(Role::Translator)),
        }
    }

    /// Builds the upstream request for one attempt.
    pub async fn translate_request(
        &self,
        kind: RequestKind,
        context: &AttemptContext,
        body: &str,
    ) -> Result<Result<UpstreamRequest, TranslateError>, PluginError> {
        let pre = self.translator_pre()?;
        let mut store = self.store();
        let export = match kind {
            RequestKind::Chat => "translate-chat-request",
            RequestKind::Embeddings => "translate-embeddings-request",
        };
        let request = sandbox::bounded(&mut store, export, async |store| {
            let plugin = pre.instantiate_async(&mut *store).await?;
            let translator = plugin.tollgate_plugin_translator();
            match kind {
                RequestKind::Chat => {
                    translator
                        .call_translate_chat_request(&mut *store, context, body)
                        .await
                }
                RequestKind::Embeddings => {
                    translator
                        .call_translate_embeddings_request(&mut *store, context, body)
                        .await
                }
            }
        })
        .await?;
        if let Ok(request) = &request {
            let bytes = request.body.len()
                + request.path.len()
                + request
                    .headers
                    .iter()
                    .map(|(name, value)| name.len() + value.len())
                    .sum::<usize>();
            sandbox::check_output(&store, export, bytes)?;
        }
        Ok(request)
    }

    /// Reads a 2xx whole answer (chat or embeddings) into OpenAI's shape.
    pub async fn translate_response(
        &self,
        kind: RequestKind,
        context: &AttemptContext,
        response: &UpstreamResponse,
    ) -> Result<Result<TranslatedAnswer, TranslateError>, PluginError> {
        let pre = self.translator_pre()?;
        let mut store = self.store();
        let export = match kind {
            RequestKind::Chat => "translate-chat-response",
            RequestKind::Embeddings => "translate-embeddings-response",
        };
        let answer = sandbox::bounded(&mut store, export, async |store| {
            let plugin = pre.instantiate_async(&mut *store).await?;
            let translator = plugin.tollgate_plugin_translator();
            Ok(match kind {
                RequestKind::Chat => translator
                    .call_translate_chat_response(&mut *store, context, response)
                    .await?
                    .map(|answer| TranslatedAnswer {
                        body: answer.body,
                        usage: answer.usage,
                        served_model: answer.served_model,
                    }),
                RequestKind::Embeddings => translator
                    .call_translate_embeddings_response(&mut *store, context, response)
                    .await?
                    .map(|answer| TranslatedAnswer {
                        body: answer.body,
                        usage: answer.usage,
                        served_model: answer.served_model,
                    }),
            })
        })
        .await?;
        if let Ok(answer) = &answer {
            sandbox::check_output(&store, export, answer.body.len())?;
        }
        Ok(answer)
    }

    /// Classifies a non-2xx answer.
    pub async fn read_failure(
        &self,
        context: &AttemptContext,
        response: &UpstreamResponse,
    ) -> Result<UpstreamFailure, PluginError> {
        let pre = self.translator_pre()?;
        let mut store = self.store();
        sandbox::bounded(&mut store, "read-failure", async |store| {
            let plugin = pre.instantiate_async(&mut *store).await?;
            plugin
                .tollgate_plugin_translator()
                .call_read_failure(&mut *store, context, response)
                .await
        })
        .await
    }

    /// Opens a stream translator for one streamed upstream answer. It keeps its own store (and
    /// instance) until dropped; every `push` gets the full per-call deadline.
    pub async fn open_stream(
        &self,
        context: &AttemptContext,
    ) -> Result<StreamSession, PluginError> {
        let pre = self.translator_pre()?;
        let mut store = self.store();
        let (plugin, resource) = sandbox::bounded(&mut store, "stream-translator", async |store| {
            let plugin = pre.instantiate_async(&mut *store).await?;
            let resource = plugin
                .tollgate_plugin_translator()
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

    pub(super) async fn translator_validate_config(
        &self,
    ) -> Result<Result<(), String>, PluginError> {
        let pre = self.translator_pre()?;
        let mut store = self.store();
        sandbox::bounded(&mut store, "validate-config", async |store| {
            let plugin = pre.instantiate_async(&mut *store).await?;
            plugin
                .tollgate_plugin_translator()
                .call_validate_config(&mut *store, &self.config)
                .await
        })
        .await
    }
}

/// One live `stream-translator` resource with the store that owns it. Dropping the session drops the
/// store and with it the instance.
pub struct StreamSession {
    store: Store<PluginState>,
    plugin: TranslatorPlugin,
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
                .tollgate_plugin_translator()
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
                .tollgate_plugin_translator()
                .stream_translator()
                .call_finish(&mut *store, resource)
                .await
        })
        .await
    }
}
