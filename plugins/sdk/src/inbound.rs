//! The client side of a protocol: lets clients call the gateway in a translator's own protocol
//! (the `inbound` interface, contract 0.1.1). Optional: a translator exported with
//! [`export_translator!(T)`](crate::export_translator) has none and answers such calls as
//! unsupported; `export_translator!(T, inbound: I)` adds `I`.
//!
//! Two paths, chosen by the host per attempt. **Same protocol**: the client's body goes to the
//! upstream untouched but for the model ([`Inbound::forward_request`]) and the answer comes back
//! untouched, the plugin reading only the usage ([`Inbound::read_forwarded_response`],
//! [`ForwardStream`]). **Cross protocol**: the request becomes OpenAI's shape
//! ([`Inbound::to_openai_request`]), another channel's translator speaks to its upstream, and the
//! OpenAI answer comes back in this protocol ([`Inbound::from_openai_response`], [`ConvertStream`]).

pub use crate::translator::{
    AttemptContext, Header, InvalidRequest, StreamEvent, TranslateError, UpstreamRequest,
    UpstreamResponse, Usage,
};
pub use crate::wit::translator::exports::tollgate::plugin::inbound::{
    Endpoint, ForwardedAnswer, ForwardedEnd,
};

/// A protocol's client side. Every function must be pure over its inputs.
pub trait Inbound {
    /// Reads a same-protocol stream; see [`ForwardStream`].
    type Forwarded: ForwardStream;
    /// Writes an OpenAI stream in this protocol; see [`ConvertStream`].
    type Converted: ConvertStream;

    /// The client's body as an OpenAI chat-completions body: what the host routes and bills by,
    /// and what channels of other protocols receive.
    fn to_openai_request(endpoint: Endpoint, body: String) -> Result<String, InvalidRequest>;

    /// The upstream request for the client's own body on a channel of this protocol: the model
    /// replaced by `context.upstream_model`, nothing else changed.
    fn forward_request(
        endpoint: Endpoint,
        context: AttemptContext,
        body: String,
        client_headers: Vec<Header>,
    ) -> Result<UpstreamRequest, TranslateError>;

    /// A 2xx whole answer of this protocol, passed back with its usage read.
    fn read_forwarded_response(
        endpoint: Endpoint,
        context: AttemptContext,
        response: UpstreamResponse,
    ) -> Result<ForwardedAnswer, TranslateError>;

    /// An OpenAI `chat.completion` body as this protocol's answer.
    fn from_openai_response(
        context: AttemptContext,
        body: String,
    ) -> Result<String, TranslateError>;

    /// The count-tokens answer for the host's own count of the prompt.
    fn count_tokens_answer(input_tokens: u64) -> String;
}

/// One same-protocol stream passed through. The host calls `new`, then `push` per upstream event,
/// then `finish` once.
pub trait ForwardStream: 'static {
    /// Starts reading a stream for one attempt.
    fn new(context: AttemptContext) -> Self;
    /// Takes one upstream event; returns the events to send to the client now.
    fn push(&mut self, event: StreamEvent) -> Result<Vec<StreamEvent>, TranslateError>;
    /// Ends the stream: trailing events, usage, served model, whether it ended properly.
    fn finish(&mut self) -> Result<ForwardedEnd, TranslateError>;
}

/// One OpenAI stream written in this protocol. The host calls `new`, then `push` per OpenAI chunk,
/// then `finish` once with the final usage.
pub trait ConvertStream: 'static {
    /// Starts converting a stream for one attempt.
    fn new(context: AttemptContext) -> Self;
    /// Takes one OpenAI `chat.completion.chunk` payload; returns the events to send now.
    fn push(&mut self, chunk: String) -> Result<Vec<StreamEvent>, TranslateError>;
    /// Ends the stream with the events that close it, carrying `usage`.
    fn finish(&mut self, usage: Usage) -> Result<Vec<StreamEvent>, TranslateError>;
}

/// The client side of a protocol that has none: every call answers that clients cannot speak it.
pub struct NoInbound;

const NO_CLIENT_SIDE: &str = "this protocol's translator does not serve clients in its protocol";

impl Inbound for NoInbound {
    type Forwarded = NoInbound;
    type Converted = NoInbound;

    fn to_openai_request(_: Endpoint, _: String) -> Result<String, InvalidRequest> {
        Err(InvalidRequest {
            message: NO_CLIENT_SIDE.to_owned(),
            param: None,
        })
    }

    fn forward_request(
        _: Endpoint,
        _: AttemptContext,
        _: String,
        _: Vec<Header>,
    ) -> Result<UpstreamRequest, TranslateError> {
        Err(TranslateError::Unsupported(NO_CLIENT_SIDE.to_owned()))
    }

    fn read_forwarded_response(
        _: Endpoint,
        _: AttemptContext,
        _: UpstreamResponse,
    ) -> Result<ForwardedAnswer, TranslateError> {
        Err(TranslateError::Unsupported(NO_CLIENT_SIDE.to_owned()))
    }

    fn from_openai_response(_: AttemptContext, _: String) -> Result<String, TranslateError> {
        Err(TranslateError::Unsupported(NO_CLIENT_SIDE.to_owned()))
    }

    fn count_tokens_answer(_: u64) -> String {
        String::new()
    }
}

impl ForwardStream for NoInbound {
    fn new(_: AttemptContext) -> Self {
        NoInbound
    }

    fn push(&mut self, _: StreamEvent) -> Result<Vec<StreamEvent>, TranslateError> {
        Err(TranslateError::Unsupported(NO_CLIENT_SIDE.to_owned()))
    }

    fn finish(&mut self) -> Result<ForwardedEnd, TranslateError> {
        Err(TranslateError::Unsupported(NO_CLIENT_SIDE.to_owned()))
    }
}

impl ConvertStream for NoInbound {
    fn new(_: AttemptContext) -> Self {
        NoInbound
    }

    fn push(&mut self, _: String) -> Result<Vec<StreamEvent>, TranslateError> {
        Err(TranslateError::Unsupported(NO_CLIENT_SIDE.to_owned()))
    }

    fn finish(&mut self, _: Usage) -> Result<Vec<StreamEvent>, TranslateError> {
        Err(TranslateError::Unsupported(NO_CLIENT_SIDE.to_owned()))
    }
}
