//! Upstream: sends the translator's request to the channel with the channel's credentials, under the
//! channel's timeouts.
//!
//! In: a channel and an `UpstreamRequest` (no credentials). Out: the upstream's response, or an
//! [`UpstreamError`] whose [`UpstreamError::is_retryable`] decides failover. Next: translate the
//! answer (non-stream) or stream it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;

use crate::channel::{Channel, UpstreamKey};
use crate::health::{SilenceCheck, SilenceWatch};
use crate::plugin::translator::{
    AuthPlacement, FailureClass, HttpMethod, UpstreamFailure, UpstreamRequest, UpstreamResponse,
};

/// Which timeout fired. Every wait on an upstream is bounded by one of them, and by the total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutPhase {
    /// No response headers within the first-byte timeout.
    Headers,
    /// A stream's first content did not come within the first-byte timeout of the attempt's start.
    FirstContent,
    /// The next whole event of a stream, or the next body chunk of a whole answer, did not come
    /// within the idle timeout.
    Idle,
    /// The attempt, stream or not, passed the total timeout.
    Total,
}

impl TimeoutPhase {
    /// The record's error class.
    pub fn class(self) -> &'static str {
        match self {
            TimeoutPhase::Headers => "timeout_headers",
            TimeoutPhase::FirstContent => "timeout_first_content",
            TimeoutPhase::Idle => "timeout_idle",
            TimeoutPhase::Total => "timeout_total",
        }
    }

    /// The deadline of a wait of `wait` in this phase starting now, or the total deadline if it
    /// comes first (and then the phase is `Total`).
    pub fn deadline(self, wait: Duration, total: Instant) -> (Instant, TimeoutPhase) {
        let until = Instant::now() + wait;
        if total <= until {
            (total, TimeoutPhase::Total)
        } else {
            (until, self)
        }
    }
}

/// Why an upstream attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The connection could not be made or broke before an answer.
    #[error("channel `{channel}`: connection failed")]
    Connect {
        /// The channel.
        channel: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// A timeout fired.
    #[error("channel `{channel}`: timed out ({phase:?})")]
    Timeout {
        /// The channel.
        channel: String,
        /// Which one.
        phase: TimeoutPhase,
    },
    /// The upstream answered with a failure, classified by the translator.
    #[error("channel `{channel}`: upstream failure {}: {}", .failure.status, .failure.message)]
    Failure {
        /// The channel.
        channel: String,
        /// The translator's reading of it (boxed: it is large and rare).
        failure: Box<UpstreamFailure>,
    },
    /// The upstream's answer could not be understood.
    #[error("channel `{channel}`: malformed answer: {reason}")]
    Malformed {
        /// The channel.
        channel: String,
        /// What the translator or reader said.
        reason: String,
    },
    /// The channel's protocol does not offer the operation.
    #[error("channel `{channel}`: {reason}")]
    Unsupported {
        /// The channel.
        channel: String,
        /// The translator's message.
        reason: String,
    },
    /// No response headers yet, and the channel answered no probe sent after the call: it left
    /// for the next route.
    #[error("channel `{channel}`: silent")]
    Silent {
        /// The channel.
        channel: String,
    },
    /// The channel's circuit is open: it was not called.
    #[error("channel `{channel}`: circuit open")]
    CircuitOpen {
        /// The channel.
        channel: String,
    },
    /// Every key of the channel's pool is disabled or cooling down: it was not called.
    #[error("channel `{channel}`: no usable key")]
    NoUsableKey {
        /// The channel.
        channel: String,
        /// When the first rate-limited key comes back, if any will.
        retry_after: Option<Duration>,
    },
    /// The upstream's answer ended early or exceeded the size cap.
    #[error("channel `{channel}`: answer cut: {reason}")]
    Cut {
        /// The channel.
        channel: String,
        /// What happened.
        reason: String,
    },
}

impl UpstreamError {
    /// Whether the next attempt of the plan may be tried. Only the client's own mistakes stop the
    /// chain; everything else is the channel's problem.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, UpstreamError::Failure { failure, .. } if failure.class == FailureClass::InvalidRequest)
    }

    /// A short class name for records, traces and the client's error code.
    pub fn class(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::Timeout { phase, .. } => phase.class(),
            UpstreamError::Silent { .. } => "channel_silent",
            UpstreamError::Failure { failure, .. } => match failure.class {
                FailureClass::Authentication => "authentication",
                FailureClass::RateLimited => "rate_limited",
                FailureClass::InvalidRequest => "invalid_request",
                FailureClass::ModelNotFound => "model_not_found",
                FailureClass::Overloaded => "overloaded",
                FailureClass::Server => "server",
            },
            UpstreamError::Malformed { .. } => "malformed_response",
            UpstreamError::Unsupported { .. } => "unsupported",
            UpstreamError::Cut { .. } => "cut",
            UpstreamError::CircuitOpen { .. } => "circuit_open",
            UpstreamError::NoUsableKey { .. } => "no_usable_key",
        }
    }

    /// Whether the upstream was reached and answered (badly): then the failure is the model's,
    /// not the whole channel's.
    pub fn upstream_answered(&self) -> bool {
        matches!(
            self,
            UpstreamError::Failure { .. }
                | UpstreamError::Malformed { .. }
                | UpstreamError::Cut { .. }
        )
    }

    /// The translator's class, when the upstream answered with a failure.
    pub fn failure_class(&self) -> Option<FailureClass> {
        match self {
            UpstreamError::Failure { failure, .. } => Some(failure.class),
            _ => None,
        }
    }

    /// How long the upstream asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            UpstreamError::Failure { failure, .. } => {
                failure.retry_after_ms.map(Duration::from_millis)
            }
            UpstreamError::NoUsableKey { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The upstream's error code (`invalid_api_key`, `insufficient_quota`…), if it gave one.
    pub fn failure_code(&self) -> Option<&str> {
        match self {
            UpstreamError::Failure { failure, .. } => failure.code.as_deref(),
            _ => None,
        }
    }

    /// The upstream's HTTP status, if one was received.
    pub fn status(&self) -> Option<u16> {
        match self {
            UpstreamError::Failure { failure, .. } if failure.status != 0 => Some(failure.status),
            _ => None,
        }
    }
}

/// Sends the request and waits for the response headers, within `first_byte`.
pub async fn send(
    channel: &Channel,
    key: Option<&UpstreamKey>,
    request: UpstreamRequest,
    first_byte: Duration,
) -> Result<reqwest::Response, UpstreamError> {
    let name = &channel.config.name;
    let url = upstream_url(&channel.base_url, &request.path);
    let method = match request.method {
        HttpMethod::Get => reqwest::Method::GET,
        HttpMethod::Post => reqwest::Method::POST,
    };
    let mut builder = channel
        .http()
        .request(method, url)
        .header(http::header::CONTENT_TYPE, "application/json");
    let auth_header = match &request.auth {
        AuthPlacement::Header(header) => Some(header.to_ascii_lowercase()),
        _ => None,
    };
    for (header, value) in &request.headers {
        let lowered = header.to_ascii_lowercase();
        // A translator never carries credentials; drop anything that looks like it tried.
        if lowered == "authorization" || Some(&lowered) == auth_header.as_ref() {
            continue;
        }
        builder = builder.header(header, value);
    }
    if let Some(secret) = key.map(UpstreamKey::secret) {
        builder = match &request.auth {
            AuthPlacement::None => builder,
            AuthPlacement::Bearer => builder.bearer_auth(secret),
            AuthPlacement::Header(header) => builder.header(header, secret),
            AuthPlacement::Query(parameter) => builder.query(&[(parameter, secret)]),
        };
    }
    let sent_at = Instant::now();
    match tokio::time::timeout(first_byte, builder.body(request.body).send()).await {
        Err(_) => Err(UpstreamError::Timeout {
            channel: name.clone(),
            phase: TimeoutPhase::Headers,
        }),
        Ok(Err(source)) if source.is_timeout() => Err(UpstreamError::Timeout {
            channel: name.clone(),
            phase: TimeoutPhase::Headers,
        }),
        Ok(Err(source)) => Err(UpstreamError::Connect {
            channel: name.clone(),
            source,
        }),
        Ok(Ok(response)) => {
            channel.silence.heard(sent_at);
            Ok(response)
        }
    }
}

/// Builds the request of a channel's silence probe when one is needed.
pub trait ProbeRequest {
    /// The request, or `None` when none can be built.
    fn build(&self) -> impl Future<Output = Option<UpstreamRequest>> + Send;
}

/// `waiting` (for a call's headers, or a stream's first content), given up when the channel goes
/// silent (see [`SilenceWatch`]) — for a call that has another route to go to, which gives a
/// `probe`.
pub async fn unless_silent<T, E: From<UpstreamError>>(
    channel: &Arc<Channel>,
    key: Option<usize>,
    sent_at: Instant,
    probe: Option<&impl ProbeRequest>,
    waiting: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let Some(probe) = probe else {
        return waiting.await;
    };
    tokio::select! {
        done = waiting => done,
        () = silence(channel, key, sent_at, probe) => Err(UpstreamError::Silent {
            channel: channel.config.name.clone(),
        }
        .into()),
    }
}

/// Ends when the channel is judged silent for a call sent at `sent_at`; never when probes are
/// off or the probe cannot be built.
async fn silence(
    channel: &Arc<Channel>,
    key: Option<usize>,
    sent_at: Instant,
    probe_request: &impl ProbeRequest,
) {
    let Some(after) = channel.silence.after() else {
        return std::future::pending().await;
    };
    let mut probe_ends = channel.silence.probe_ends();
    let mut check_at = sent_at + after;
    loop {
        tokio::time::sleep_until(check_at.into()).await;
        probe_ends.borrow_and_update();
        match channel.silence.check(sent_at, Instant::now()) {
            SilenceCheck::Silent => return,
            SilenceCheck::Answering { until } => {
                check_at = until;
                continue;
            }
            SilenceCheck::Probing => {}
            SilenceCheck::Probe => {
                let claim = ProbeClaim(Some(&channel.silence));
                let Some(request) = probe_request.build().await else {
                    // The claim's drop reports it; waiting calls fall back on their timeouts.
                    drop(claim);
                    return std::future::pending().await;
                };
                claim.handed_over();
                tokio::spawn(probe(Arc::clone(channel), key, request));
            }
        }
        if probe_ends.changed().await.is_err() {
            return std::future::pending().await;
        }
        check_at = Instant::now();
    }
}

/// The right to send the channel's probe, given back if the call goes (its headers came) before
/// the probe left.
struct ProbeClaim<'w>(Option<&'w SilenceWatch>);

impl ProbeClaim<'_> {
    fn handed_over(mut self) {
        self.0 = None;
    }
}

impl Drop for ProbeClaim<'_> {
    fn drop(&mut self) {
        if let Some(watch) = self.0 {
            watch.probed(None);
        }
    }
}

/// Sends the probe and reports whether its headers came in time; a silent channel's circuit
/// opens, so the requests after go elsewhere first.
async fn probe(channel: Arc<Channel>, key: Option<usize>, request: UpstreamRequest) {
    let timeout = channel.silence.probe_timeout();
    let key = key.map(|index| &channel.keys[index]);
    let answered = send(&channel, key, request, timeout).await.is_ok();
    if !answered {
        tracing::warn!(
            channel = %channel.config.name,
            timeout_ms = timeout.as_millis() as u64,
            "channel silent: no headers to a probe; its waiting calls leave"
        );
        channel.health.trip(Instant::now());
    }
    channel.silence.probed(Some(answered));
}

/// The translator's path (`/chat/completions`, `/models/m:streamGenerateContent?alt=sse`) under the
/// channel's base URL, which keeps its own path (`/v1`).
fn upstream_url(base_url: &reqwest::Url, path_and_query: &str) -> reqwest::Url {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let mut url = base_url.clone();
    url.set_path(&format!("{}{path}", base_url.path().trim_end_matches('/')));
    url.set_query(query);
    url
}

/// Reads a whole answer (non-stream or error) under the size cap: each body chunk within the idle
/// timeout, the whole within the total timeout of the attempt that `started` then.
pub async fn read_whole(
    channel: &Channel,
    response: reqwest::Response,
    max_bytes: usize,
    started: Instant,
) -> Result<UpstreamResponse, UpstreamError> {
    let name = &channel.config.name;
    let status = response.status().as_u16();
    let headers = response_headers(&response);
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    let idle = Duration::from_millis(channel.config.idle_timeout_ms);
    let total = started + Duration::from_millis(channel.config.total_timeout_ms);
    loop {
        let (until, phase) = TimeoutPhase::Idle.deadline(idle, total);
        let chunk = tokio::time::timeout_at(until.into(), chunks.next())
            .await
            .map_err(|_| UpstreamError::Timeout {
                channel: name.clone(),
                phase,
            })?;
        let Some(chunk) = chunk else {
            break;
        };
        let chunk: Bytes = chunk.map_err(|error| UpstreamError::Cut {
            channel: name.clone(),
            reason: error.to_string(),
        })?;
        if body.len() + chunk.len() > max_bytes {
            return Err(UpstreamError::Cut {
                channel: name.clone(),
                reason: format!("answer larger than {max_bytes} bytes"),
            });
        }
        body.extend_from_slice(&chunk);
    }
    // An error answer may echo the key it was sent; what follows (the translator's reading, the
    // client's error, log lines, a disabled key's reason) sees it scrubbed. Answers are not.
    if !(200..300).contains(&status)
        && let std::borrow::Cow::Owned(scrubbed) = channel.secrets.scrub_bytes(&body)
    {
        body = scrubbed;
    }
    Ok(UpstreamResponse {
        status,
        headers,
        body,
    })
}

/// Response headers as lowercase (name, value) pairs, values that are not text dropped.
pub fn response_headers(response: &reqwest::Response) -> Vec<(String, String)> {
    response
        .headers()
        .iter()
        .filter_map(|(name, value)| {
            value
                .to_str()
                .ok()
                .map(|value| (name.as_str().to_owned(), value.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_translators_path_and_query_go_under_the_base_urls_own_path() {
        let url = |base: &str, path: &str| {
            upstream_url(&reqwest::Url::parse(base).expect("base URL"), path).to_string()
        };
        assert_eq!(
            url("http://127.0.0.1:9/v1", "/chat/completions"),
            "http://127.0.0.1:9/v1/chat/completions"
        );
        assert_eq!(
            url(
                "https://api.example.com/v1beta/",
                "/models/m:streamGenerateContent?alt=sse"
            ),
            "https://api.example.com/v1beta/models/m:streamGenerateContent?alt=sse"
        );
        assert_eq!(
            url("http://upstream.internal", "/v1/messages"),
            "http://upstream.internal/v1/messages"
        );
    }
}
