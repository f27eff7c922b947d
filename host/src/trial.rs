//! `tollgate plugin test`: runs a plugin outside the gateway, in the same sandbox, on one request,
//! and reports its decision as JSON — so a plugin author sees what the gateway would do before
//! uploading anything.
//!
//! In: the component's bytes, its configuration, an OpenAI request body, and (for routers) the
//! channels to choose from. Out: the router's plan, the translator's upstream request, or the
//! billing plugin's hold and price; or a [`TrialError`].

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::plugin::Operation;
use crate::plugin::billing::{
    AuthorizeRequest, BillingDenial, BillingError, CallOutcome, ChargeRequest,
};
use crate::plugin::router::{Channel, ChannelModel, Circuit, RequestFacts, RouteError};
use crate::plugin::translator::{
    AttemptContext, AuthPlacement, HttpMethod, RequestKind, StreamFraming, TranslateError, Usage,
};
use crate::plugin::{Binding, Limits, PluginError, PluginRuntime, Role, RuntimeSettings};
use crate::request::{self, InvalidBody};

/// Why a trial could not run.
#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    /// The plugin failed to load, refused its configuration, or failed in the call.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The request body is not a valid OpenAI request.
    #[error("the request: {}", .0.message)]
    Request(InvalidBody),
    /// The channels are not in the expected shape.
    #[error("the channels: {0}")]
    Channels(#[source] serde_json::Error),
}

/// A channel as the trial takes it: the router's view, with defaults for what a test rarely sets.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrialChannel {
    /// The channel's name.
    name: String,
    /// Its protocol.
    #[serde(default = "openai")]
    protocol: String,
    /// Public model name → upstream model name.
    models: std::collections::BTreeMap<String, String>,
    /// Lower goes first for priority-ordered routers.
    #[serde(default = "one")]
    priority: u32,
    /// Relative weight for weighted routers.
    #[serde(default = "one")]
    weight: u32,
    /// Price per million input tokens, in micro-units.
    #[serde(default)]
    price_per_million_input_micros: Option<u64>,
    /// Price per million output tokens, in micro-units.
    #[serde(default)]
    price_per_million_output_micros: Option<u64>,
    /// `closed`, `open` or `half-open`.
    #[serde(default)]
    circuit: Option<String>,
    /// Recent latency.
    #[serde(default)]
    latency_ewma_ms: Option<u32>,
    /// Recent errors per thousand.
    #[serde(default)]
    error_rate_permille: u32,
    /// Requests in flight.
    #[serde(default)]
    in_flight: u32,
}

fn openai() -> String {
    "openai".to_owned()
}

fn one() -> u32 {
    1
}

fn circuit(name: Option<&str>) -> Circuit {
    match name {
        Some("open") => Circuit::Open,
        Some("half-open") => Circuit::HalfOpen,
        _ => Circuit::Closed,
    }
}

impl TrialChannel {
    fn into_wit(self) -> Channel {
        let state = circuit(self.circuit.as_deref());
        Channel {
            models: self
                .models
                .into_iter()
                .map(|(public_name, upstream_name)| ChannelModel {
                    public_name,
                    upstream_name,
                    price_per_million_input_micros: self.price_per_million_input_micros,
                    price_per_million_output_micros: self.price_per_million_output_micros,
                    circuit: state,
                })
                .collect(),
            name: self.name,
            protocol: self.protocol,
            priority: self.priority,
            weight: self.weight,
            circuit: state,
            latency_ewma_ms: self.latency_ewma_ms,
            ttfb_ewma_ms: self.latency_ewma_ms,
            error_rate_permille: self.error_rate_permille,
            in_flight: self.in_flight,
        }
    }
}

/// What to run the plugin on.
pub struct Trial {
    /// The component.
    pub bytes: Vec<u8>,
    /// Its name, for messages.
    pub name: String,
    /// Its configuration JSON.
    pub config: String,
    /// An OpenAI chat-completions body.
    pub request: Value,
    /// `x-tollgate-*` tags, without the prefix, as the router sees them.
    pub tags: Vec<(String, String)>,
    /// For routers: the channels (JSON array of [`TrialChannel`]); one channel serving the requested
    /// model when absent.
    pub channels: Option<Value>,
}

/// Loads the plugin in a sandbox like the gateway's and runs its role's calls on the request.
pub async fn run(trial: Trial) -> Result<Value, TrialError> {
    let runtime = PluginRuntime::new(&RuntimeSettings {
        max_instances: 8,
        max_memory_bytes: 256 << 20,
        cache_dir: std::env::temp_dir().join("tollgate-plugin-test-cache"),
        max_instances_per_tenant: None,
    })?;
    let compiled = runtime.inspect(&trial.name, &trial.bytes)?;
    let role = compiled.role();
    let plugin = compiled.plugin().to_string();
    let binding = Binding::new(runtime, compiled, trial.config, Limits::default()).await?;
    let text = trial.request.to_string();
    let client =
        request::read(Operation::Chat, text, &trial.request).map_err(TrialError::Request)?;
    let decision = match role {
        Role::Router => route(&binding, &client, trial.tags, trial.channels).await?,
        Role::Translator => translate(&binding, &client).await?,
        Role::Billing => bill(&binding, &client).await?,
    };
    Ok(json!({"plugin": plugin, "role": role.to_string(), "decision": decision}))
}

async fn route(
    binding: &Binding,
    client: &request::ClientRequest,
    tags: Vec<(String, String)>,
    channels: Option<Value>,
) -> Result<Value, TrialError> {
    let channels: Vec<Channel> = match channels {
        Some(channels) => serde_json::from_value::<Vec<TrialChannel>>(channels)
            .map_err(TrialError::Channels)?
            .into_iter()
            .map(TrialChannel::into_wit)
            .collect(),
        None => vec![
            TrialChannel {
                name: "default".to_owned(),
                protocol: openai(),
                models: [(client.model.clone(), client.model.clone())].into(),
                priority: 1,
                weight: 1,
                price_per_million_input_micros: None,
                price_per_million_output_micros: None,
                circuit: None,
                latency_ewma_ms: None,
                error_rate_permille: 0,
                in_flight: 0,
            }
            .into_wit(),
        ],
    };
    let facts = RequestFacts {
        request_id: "plugin-test".to_owned(),
        tenant: "test".to_owned(),
        key_id: "test".to_owned(),
        operation: Operation::Chat,
        model: client.model.clone(),
        stream: client.stream,
        estimated_input_tokens: client.estimated_input_tokens,
        max_output_tokens: client.max_output_tokens,
        tags,
    };
    Ok(match binding.plan(&facts, &channels).await? {
        Ok(attempts) => json!({
            "plan": attempts
                .iter()
                .map(|attempt| json!({"channel": attempt.channel, "upstream_model": attempt.upstream_model}))
                .collect::<Vec<_>>()
        }),
        Err(RouteError::NoRoute(message)) => json!({"no_route": message}),
        Err(RouteError::Refused(message)) => json!({"refused": message}),
    })
}

async fn translate(
    binding: &Binding,
    client: &request::ClientRequest,
) -> Result<Value, TrialError> {
    let context = AttemptContext {
        request_id: "plugin-test".to_owned(),
        operation: Operation::Chat,
        public_model: client.model.clone(),
        upstream_model: client.model.clone(),
        channel: "test".to_owned(),
        channel_options: "{}".to_owned(),
        stream: client.stream,
        include_usage: client.include_usage,
        created_unix_s: 0,
    };
    Ok(
        match binding
            .translate_request(RequestKind::Chat, &context, &client.body)
            .await?
        {
            Ok(upstream) => {
                let body = serde_json::from_slice::<Value>(&upstream.body).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(&upstream.body).into_owned())
                });
                let auth = match upstream.auth {
                    AuthPlacement::None => json!("none"),
                    AuthPlacement::Bearer => json!("bearer"),
                    AuthPlacement::Header(name) => json!({"header": name}),
                    AuthPlacement::Query(name) => json!({"query": name}),
                };
                json!({
                    "method": match upstream.method {
                        HttpMethod::Get => "GET",
                        HttpMethod::Post => "POST",
                    },
                    "path": upstream.path,
                    "headers": upstream.headers,
                    "auth": auth,
                    "stream_framing": upstream.framing.map(|framing| match framing {
                        StreamFraming::Sse => "sse",
                        StreamFraming::Ndjson => "ndjson",
                    }),
                    "body": body,
                })
            }
            Err(error) => json!({"refused": translate_refusal(&error)}),
        },
    )
}

async fn bill(binding: &Binding, client: &request::ClientRequest) -> Result<Value, TrialError> {
    // The estimate the gateway sends for a request far from its floor.
    let usage = Usage {
        input_tokens: client.prompt_bound_tokens,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        output_tokens: client
            .max_output_tokens
            .unwrap_or(crate::config::DEFAULT_MAX_OUTPUT_TOKENS),
        reasoning_tokens: 0,
        estimated: true,
    };
    let authorized = binding
        .authorize(&AuthorizeRequest {
            request_id: "plugin-test".to_owned(),
            tenant: "test".to_owned(),
            key_id: "test".to_owned(),
            operation: Operation::Chat,
            model: client.model.clone(),
            estimated_usage: usage,
            balance_picos: i64::MAX,
        })
        .await?;
    let charged = binding
        .charge(&ChargeRequest {
            request_id: "plugin-test".to_owned(),
            tenant: "test".to_owned(),
            key_id: "test".to_owned(),
            operation: Operation::Chat,
            model_asked: client.model.clone(),
            model_served: client.model.clone(),
            channel: "test".to_owned(),
            usage,
            latency_ms: 0,
            outcome: CallOutcome::Complete,
        })
        .await?;
    Ok(json!({
        "authorize": match authorized {
            Ok(hold) => json!({"hold_picos": hold.amount_picos}),
            Err(denial) => json!({"denied": match denial {
                BillingDenial::InsufficientBalance(message) =>
                    json!({"kind": "insufficient_balance", "message": message}),
                BillingDenial::UnpricedModel(message) =>
                    json!({"kind": "unpriced_model", "message": message}),
                BillingDenial::BudgetExceeded(message) =>
                    json!({"kind": "budget_exceeded", "message": message}),
            }}),
        },
        "charge_for_estimate": match charged {
            Ok(price) => json!({
                "amount_picos": price.amount_picos,
                "line_items": price.line_items.iter().map(|item| json!({
                    "kind": item.kind, "tokens": item.tokens,
                    "price_per_million_micros": item.price_per_million_micros,
                    "amount_picos": item.amount_picos,
                })).collect::<Vec<_>>(),
            }),
            Err(error) => json!({"error": match error {
                BillingError::UnpricedModel(message) =>
                    json!({"kind": "unpriced_model", "message": message}),
                BillingError::Internal(message) => json!({"kind": "internal", "message": message}),
            }}),
        },
    }))
}

/// A translator's refusal as plain words: its kind, and what it said.
fn translate_refusal(error: &TranslateError) -> Value {
    match error {
        TranslateError::InvalidRequest(invalid) => json!({
            "kind": "invalid_request", "message": invalid.message, "param": invalid.param,
        }),
        TranslateError::Upstream(failure) => json!({
            "kind": "upstream", "status": failure.status, "message": failure.message,
        }),
        TranslateError::MalformedResponse(message) => {
            json!({"kind": "malformed_response", "message": message})
        }
        TranslateError::Unsupported(message) => json!({"kind": "unsupported", "message": message}),
    }
}

/// Where `tollgate plugin new` finds the SDK when not told: the source tree this binary was built
/// from, if it is still there.
pub fn default_sdk_path() -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk");
    path.join("Cargo.toml")
        .exists()
        .then(|| path.canonicalize().unwrap_or(path))
}

/// The files of a new plugin crate for `role`: (relative path, contents).
pub fn template(name: &str, role: Role, sdk: &std::path::Path) -> Vec<(&'static str, String)> {
    let crate_name = name.replace('-', "_");
    let source = match role {
        Role::Router => include_str!("../templates/router.rs"),
        Role::Translator => include_str!("../templates/translator.rs"),
        Role::Billing => include_str!("../templates/billing.rs"),
    };
    let fill = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{crate_name}}", &crate_name)
            .replace("{{role}}", &role.to_string())
            .replace("{{sdk}}", &sdk.display().to_string())
    };
    vec![
        (
            "Cargo.toml",
            fill(include_str!("../templates/Cargo.toml.in")),
        ),
        ("src/lib.rs", fill(source)),
        ("README.md", fill(include_str!("../templates/README.md.in"))),
    ]
}
