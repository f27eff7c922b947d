//! Inbound: requests that arrive in a client protocol other than OpenAI's (Anthropic's Messages API
//! at `/v1/messages`). The protocol's translator plugin converts the body to the OpenAI form every
//! other stage reads (model, stream, output cap, prompt size), so the host stays protocol-free.
//! Per attempt, a channel of the same protocol then gets the client's own body, forwarded (see
//! `flow`); any other channel gets the OpenAI form, and its answer is converted back here.
//!
//! In: the client's body and protocol headers, after auth. Out: [`Inbound`], kept on the
//! `RequestContext`, and the request read from the OpenAI body. Errors: [`TranslateError`] (a 400
//! for a body the plugin refuses, or the plugin's failure). Next: the request context, then the flow.

use crate::plugin::translator::{AttemptContext, Endpoint, Header};
use crate::plugin::{Operation, PluginError, Role};
use crate::request::{self, ClientRequest};
use crate::stages::context::{Dialect, Inbound};
use crate::stages::translate::{self, Answer, TranslateError};

/// A client protocol served at its own endpoints: which translator speaks it, and the prefix of
/// the headers its clients send that belong to it.
#[derive(Debug, Clone, Copy)]
pub struct ClientProtocol {
    /// The protocol name, as channels and translator bindings name it.
    pub name: &'static str,
    /// Client headers with this prefix go to the plugin (it forwards the ones its protocol
    /// defines to a channel of the same protocol).
    pub header_prefix: &'static str,
    /// The shape its clients read errors in.
    pub dialect: Dialect,
}

/// Converts the client's body to the OpenAI form with the protocol's translator (bound for the
/// tenant, else globally). Returns the inbound facts, the request read from the OpenAI body and
/// the plugin's trace entry.
pub async fn convert_request(
    bindings: &crate::plugin::table::BindingTable,
    tenant: &str,
    protocol: ClientProtocol,
    endpoint: Endpoint,
    body: String,
    headers: Vec<Header>,
) -> Result<(Inbound, ClientRequest, String), TranslateError> {
    let resolved = bindings.require(tenant, Role::Translator, Some(protocol.name))?;
    let called = resolved
        .call(|binding| {
            let body = &body;
            async move { binding.to_openai_request(endpoint, body).await }
        })
        .await?;
    let openai = called
        .value
        .map_err(|invalid| TranslateError::InvalidRequest {
            message: invalid.message,
            param: invalid.param,
        })?;
    let value: serde_json::Value =
        serde_json::from_str(&openai).map_err(|error| PluginError::Contract {
            plugin: called.ran.plugin().clone(),
            role: Role::Translator,
            detail: format!("`to-openai-request` returned no JSON: {error}"),
        })?;
    // The stages read what the plugin wrote: a body they refuse is the client's (a 400).
    let request = request::read(Operation::Chat, openai, &value).map_err(|invalid| {
        TranslateError::InvalidRequest {
            message: invalid.message,
            param: invalid.param,
        }
    })?;
    let inbound = Inbound {
        protocol: protocol.name,
        dialect: protocol.dialect,
        endpoint,
        body,
        headers,
        plugin: called.ran,
    };
    Ok((inbound, request, called.trace))
}

/// Converts a whole OpenAI answer (from a channel of another protocol) to the client's protocol.
pub async fn convert_answer(
    inbound: &Inbound,
    attempt: &AttemptContext,
    answer: &mut Answer,
) -> Result<(), TranslateError> {
    answer.body = inbound
        .plugin
        .from_openai_response(attempt, &answer.body)
        .await?
        .map_err(|error| translate::plugin_error_named(&attempt.channel, error))?;
    Ok(())
}
