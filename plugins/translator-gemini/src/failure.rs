//! Google's error answers → the typed upstream failure classes that decide failover.
//!
//! Google sends `{"error":{"code","message","status","details"}}`; the `status` name is the reliable
//! part (`RESOURCE_EXHAUSTED`, `UNAVAILABLE`, …). A 429's wait is in a `RetryInfo` detail
//! (`retryDelay: "43s"`), not in a header; an invalid API key is a 400 `INVALID_ARGUMENT` whose
//! `ErrorInfo` says `API_KEY_INVALID`. Inside a 200 stream the same object arrives as an event.

use serde::Deserialize;
use serde_json::Value;
use tollgate_plugin_sdk::translator::{
    FailureClass, UpstreamFailure, UpstreamResponse, failure_message, retry_after_ms, unknown_path,
};

/// Google's error object.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct GoogleError {
    pub code: Option<u16>,
    pub message: Option<String>,
    pub status: Option<String>,
    pub details: Vec<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: GoogleError,
}

impl GoogleError {
    fn detail(&self, kind: &str) -> Option<&Value> {
        self.details.iter().find(|detail| {
            detail
                .get("@type")
                .and_then(Value::as_str)
                .is_some_and(|name| name.ends_with(kind))
        })
    }

    /// `RetryInfo.retryDelay` (a protobuf Duration: `"43s"`, `"1.5s"`) in milliseconds, read
    /// without float parsing, whose tables would add 10 KiB to every instance's memory image.
    fn retry_after_ms(&self) -> Option<u64> {
        let delay = self.detail("google.rpc.RetryInfo")?.get("retryDelay")?;
        retry_after_ms(delay.as_str()?.strip_suffix('s')?)
    }

    fn reason(&self) -> Option<&str> {
        self.detail("google.rpc.ErrorInfo")?.get("reason")?.as_str()
    }
}

/// Classifies a non-2xx answer. A 404 that is not Google's error object (Google answers a path it
/// lacks with an HTML page), or one that names no model (`Method not found.`), is about the path.
pub fn read_failure(response: &UpstreamResponse) -> UpstreamFailure {
    let error = serde_json::from_slice::<ErrorBody>(&response.body)
        .ok()
        .map(|body| body.error);
    if response.status == 404
        && error.as_ref().is_none_or(|error| {
            !error
                .message
                .as_deref()
                .is_some_and(|message| message.contains("models/"))
        })
    {
        return unknown_path(&response.body);
    }
    failure(response.status, error.unwrap_or_default())
}

/// Maps an error (from a status, or from a stream event with status 0) onto a class.
pub fn failure(status: u16, error: GoogleError) -> UpstreamFailure {
    let code = if status == 0 {
        error.code.unwrap_or(0)
    } else {
        status
    };
    let class = match (code, error.status.as_deref(), error.reason()) {
        (_, _, Some("API_KEY_INVALID")) | (401 | 403, _, _) => FailureClass::Authentication,
        (_, Some("UNAUTHENTICATED" | "PERMISSION_DENIED"), _) => FailureClass::Authentication,
        (429, _, _) | (_, Some("RESOURCE_EXHAUSTED"), _) => FailureClass::RateLimited,
        (503, _, _) | (_, Some("UNAVAILABLE"), _) => FailureClass::Overloaded,
        (404, _, _) | (_, Some("NOT_FOUND"), _) => FailureClass::ModelNotFound,
        (400..=499, _, _) | (_, Some("INVALID_ARGUMENT" | "FAILED_PRECONDITION"), _) => {
            FailureClass::InvalidRequest
        }
        _ => FailureClass::Server,
    };
    let retry_after_ms = error.retry_after_ms();
    UpstreamFailure {
        class,
        status,
        message: failure_message(error.message, status),
        code: error.status,
        param: None,
        retry_after_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_404_names_the_path_unless_it_names_a_model() {
        let class = |body: &str| {
            read_failure(&UpstreamResponse {
                status: 404,
                headers: Vec::new(),
                body: body.as_bytes().to_vec(),
            })
            .class
        };
        let unknown_model = r#"{"error": {"code": 404, "status": "NOT_FOUND",
            "message": "models/gemini-9 is not found for API version v1beta"}}"#;
        assert_eq!(class(unknown_model), FailureClass::ModelNotFound);
        let html = "<!DOCTYPE html><title>Error 404 (Not Found)!!1</title>";
        assert_eq!(class(html), FailureClass::Server);
        let method =
            r#"{"error": {"code": 404, "status": "NOT_FOUND", "message": "Method not found."}}"#;
        assert_eq!(class(method), FailureClass::Server);
    }

    /// Found by the `gemini_decoding` fuzz target: an error with an empty message left the client
    /// an empty error message.
    #[test]
    fn an_empty_message_still_tells_the_client_something() {
        let failure = read_failure(&UpstreamResponse {
            status: 401,
            headers: Vec::new(),
            body: b"{\n  \"error\": {\n  \"message\": \"\"}}".to_vec(),
        });
        assert_eq!(failure.message, "upstream answered HTTP 401");
        assert_eq!(failure.class, FailureClass::Authentication);
    }

    #[test]
    fn a_retry_delay_is_read_in_milliseconds_with_its_fraction() {
        let wait = |delay: &str| {
            read_failure(&UpstreamResponse {
                status: 429,
                headers: Vec::new(),
                body: serde_json::json!({"error": {"status": "RESOURCE_EXHAUSTED", "details": [
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}
                ]}})
                .to_string()
                .into_bytes(),
            })
            .retry_after_ms
        };
        assert_eq!(wait("43s"), Some(43_000));
        assert_eq!(wait("1.5s"), Some(1_500));
        assert_eq!(wait("0.000250s"), Some(0));
        assert_eq!(wait("-1s"), None);
        assert_eq!(wait("43"), None, "a Duration ends in s");
    }
}
