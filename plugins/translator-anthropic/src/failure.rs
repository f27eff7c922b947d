//! Anthropic error answers → the typed upstream failure classes that decide failover.
//!
//! Anthropic sends `{"type":"error","error":{"type","message"},"request_id"}` with the statuses of
//! its error reference (400, 401, 403, 404, 413, 429, 500, 529); inside a 200 stream the same error
//! object arrives as an `error` event.

use serde::Deserialize;
use tollgate_plugin_sdk::translator::{
    FailureClass, UpstreamFailure, UpstreamResponse, failure_message, retry_after_ms, unknown_path,
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

/// Classifies a non-2xx answer. A 404 that is not Anthropic's error object, or is its bare
/// `Not Found` (what api.anthropic.com answers for a path it lacks, where an unknown model says
/// `model: …`), is about the path.
pub fn read_failure(response: &UpstreamResponse) -> UpstreamFailure {
    let body = serde_json::from_slice::<ErrorBody>(&response.body).ok();
    if response.status == 404
        && body
            .as_ref()
            .is_none_or(|body| body.error.message.as_deref() == Some("Not Found"))
    {
        return unknown_path(&response.body);
    }
    let detail = body.map(|body| body.error).unwrap_or_default();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_404_names_the_path_unless_it_names_a_model() {
        let failure = |body: &str| {
            read_failure(&UpstreamResponse {
                status: 404,
                headers: Vec::new(),
                body: body.as_bytes().to_vec(),
            })
        };
        let unknown_model = r#"{"type": "error", "error": {"type": "not_found_error",
            "message": "model: claude-9"}}"#;
        assert_eq!(failure(unknown_model).class, FailureClass::ModelNotFound);
        // What api.anthropic.com answers for a path it lacks (`/messages` without `/v1`).
        let bare =
            r#"{"type": "error", "error": {"type": "not_found_error", "message": "Not Found"}}"#;
        let lost = failure(bare);
        assert_eq!(lost.class, FailureClass::Server);
        assert!(lost.message.contains("no such path"), "{}", lost.message);
        assert_eq!(failure("<html>404</html>").class, FailureClass::Server);
    }
}
