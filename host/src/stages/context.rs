//! The request's context: what one request accumulates on its way through the stages, and the
//! facts of the client's protocol that shape its answers. Every stage reads and fills it; the flow
//! makes it and hands it on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::plugin::table::{BindingTable, Resolved};
use crate::plugin::translator::{Endpoint, Header};
use crate::plugin::{Binding, PluginError, Role};
use crate::request::ClientRequest;
use crate::stages::auth::Caller;
use crate::stages::limit::LimitPermit;
use crate::store::RecordedAttempt;

/// The client protocol an error is rendered in: the shape of the endpoint that was called. The
/// mapping from error to status and class is one; only its rendering differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `{"error":{"message","type","code","param"}}`, as OpenAI answers.
    OpenAi,
    /// `{"type":"error","error":{"type","message"}}`, as Anthropic's Messages API answers, with
    /// its error types and its 529 for an overloaded upstream.
    AnthropicMessages,
}

/// Everything one request accumulates on its way through the stages. Made once, in [`RequestContext::new`].
pub struct RequestContext {
    /// The request id (client's `x-request-id`, or generated).
    pub request_id: String,
    /// When the request arrived.
    pub received_at: Instant,
    /// Arrival time, milliseconds since the Unix epoch.
    pub received_unix_ms: u64,
    /// Who is calling.
    pub caller: Caller,
    /// What was asked.
    pub request: ClientRequest,
    /// `x-tollgate-*` header tags for the router.
    pub tags: Vec<(String, String)>,
    /// Attempts made so far, in order.
    pub attempts: Vec<RecordedAttempt>,
    /// The model the upstream reported, once one answered.
    pub served_model: Option<String>,
    /// The channel that answered.
    pub served_channel: Option<String>,
    /// The upstream model name the answering attempt asked for (to spot a swapped model).
    pub routed_model: Option<String>,
    /// Time spent waiting on upstreams before the client's first byte, over every attempt.
    pub upstream_wait: Duration,
    /// The model the client asked for, when every route to it failed and its fallback served
    /// instead (`request.model` then names the fallback).
    pub degraded_from: Option<String>,
    /// This request's balance hold, once billing placed one (released by record), with the output
    /// it covers.
    pub grant: Option<Grant>,
    /// The request's slot under its key's and tenant's limits, held until it ends.
    pub permit: Option<LimitPermit>,
    /// Plugins that ran (`name@sha`, marked when a canary ran or a fallback served), for the
    /// record.
    pub plugins: Vec<String>,
    /// The bindings as they were when the request arrived: every plugin it calls comes from here,
    /// so a rebind meanwhile never mixes versions within one request.
    pub bindings: Arc<BindingTable>,
    /// The router this request calls.
    pub router: Resolved,
    /// The billing plugin this request calls (the same one for authorize and charge).
    pub billing: Resolved,
    /// Set when the client spoke another protocol than OpenAI's: its own body and plugin.
    pub inbound: Option<Inbound>,
    /// The protocol of the channel that answered.
    pub served_protocol: Option<String>,
    /// The attempt under way, for the record of a request the client abandons during it.
    pub attempt_in_flight: Option<RecordedAttempt>,
    /// Whether a request went to an upstream: one the client abandons is then charged its prompt.
    pub reached_upstream: bool,
}

impl RequestContext {
    /// Time since arrival not spent waiting on upstreams: what the gateway itself took.
    pub fn gateway_time(&self) -> Duration {
        self.received_at
            .elapsed()
            .saturating_sub(self.upstream_wait)
    }

    /// Starts the context of an authenticated request, with its router and billing plugin drawn
    /// from the bindings of the moment.
    pub fn new(
        request_id: String,
        received_at: Instant,
        caller: Caller,
        request: ClientRequest,
        tags: Vec<(String, String)>,
        bindings: Arc<BindingTable>,
    ) -> Result<Self, PluginError> {
        let received_unix_ms = crate::store::now_unix_ms();
        let router = bindings.require(&caller.tenant, Role::Router, None)?;
        let billing = bindings.require(&caller.tenant, Role::Billing, None)?;
        Ok(Self {
            request_id,
            received_at,
            received_unix_ms,
            caller,
            request,
            tags,
            attempts: Vec::new(),
            served_model: None,
            served_channel: None,
            routed_model: None,
            upstream_wait: Duration::ZERO,
            degraded_from: None,
            grant: None,
            permit: None,
            plugins: Vec::new(),
            bindings,
            router,
            billing,
            inbound: None,
            served_protocol: None,
            attempt_in_flight: None,
            reached_upstream: false,
        })
    }

    /// The dialect the client's errors are rendered in.
    pub fn dialect(&self) -> Dialect {
        self.inbound
            .as_ref()
            .map_or(Dialect::OpenAi, |inbound| inbound.dialect)
    }

    /// Milliseconds since the request arrived.
    pub fn elapsed_ms(&self) -> u64 {
        self.received_at.elapsed().as_millis() as u64
    }
}

/// What authorization granted a request.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The hold's id, which the settlement releases.
    pub hold_id: String,
    /// What the hold reserves, in picos: the most the request is ever charged.
    pub hold_picos: u64,
    /// The output tokens the hold covers (chat; `None` for embeddings).
    pub output_allowance: Option<u64>,
    /// Set when the allowance is below the model's limit and the client set no cap of its own:
    /// the cap the upstream request must carry.
    pub upstream_cap: Option<u64>,
}

/// What a request that came in in another protocol keeps for its attempts and its answer.
pub struct Inbound {
    /// The client's protocol.
    pub protocol: &'static str,
    /// The shape its clients read errors in.
    pub dialect: Dialect,
    /// Which of its endpoints was called.
    pub endpoint: Endpoint,
    /// The client's body, as it came: what a channel of the same protocol receives. Emptied once
    /// a stream opens, when no attempt needs it any more.
    pub body: String,
    /// The client's protocol headers (names lowercase).
    pub headers: Vec<Header>,
    /// The protocol's translator as it converted the request: the same version converts the
    /// answer back, whatever is rebound meanwhile.
    pub plugin: Arc<Binding>,
}

impl Inbound {
    /// Whether an attempt on a channel of `protocol` forwards the client's own body.
    pub fn forwards_to(&self, protocol: &str) -> bool {
        self.protocol == protocol
    }
}
