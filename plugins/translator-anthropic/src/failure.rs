//! Anthropic error answers → the typed upstream failure classes that decide failover.
//!
//! Anthropic sends `{"type":"error","error":{"type","message"},"request_id"}` with the statuses of
//! its error reference (400, 401, 403, 404, 413, 429, 500, 529); inside a 200 stream the same error
//! object arrives as an `error` event.

use serde::Deserialize;
use tollgate_plugin_sdk::translator::{
    FailureClass, UpstreamFailure, UpstreamResponse, failure_message, retry_after_ms,
};

/// Anthropic's error body.
#[derive(Debug, Default, Deserialize)]
pub struct ErrorBody {
    #[serde(default)]
    pub error: ErrorDetail,
}

/// Anthropic's error object.
#[derive(Debug, Default, Deserialize)]
pub struct ErrorDetail {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// Classifies a non-2xx answer.
pub fn read_failure(response: &UpstreamResponse) -> UpstreamFailure {
    let detail = serde_json::from_slice::<ErrorBody>(&response.body)
        .map(|body| body.error)
        .unwrap_or_default();
    let retry_after_ms = response
        .headers
        .iter()
        .find_map(|(name, value)| (name == "retry-after").then(|| retry_after_ms(value))?);
    failure(response.status, detail, retry_after_ms)
}

/// Maps an error (from a status, or from a stream's error event with status 0) onto a class.
pub fn failure(status: u16, detail: ErrorDetail, retry_after_ms: Option<u64>) -> UpstreamFailure {
    let class = match (status, detail.kind.as_deref()) {
        (401 | 403, _) | (_, Some("authentication_error" | "permission_error")) => {
            FailureClass::Authentication
        }
        (429, _) | (_, Some("rate_limit_error")) => FailureClass::RateLimited,
        (529, _) | (_, Some("overloaded_error")) => FailureClass::Overloaded,
        (404, _) | (_, Some("not_found_error")) => FailureClass::ModelNotFound,
        (400..=499, _) | (_, Some("invalid_request_error" | "request_too_large")) => {
            FailureClass::InvalidRequest
        }
        _ => FailureClass::Server,
    };
    UpstreamFailure {
        class,
        status,
        message: failure_message(detail.message, status),
        code: detail.kind,
        param: None,
        retry_after_ms,
    }
}
