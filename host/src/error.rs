//! `ApiError`: every layer's error, and the one mapping from error to HTTP status and OpenAI error
//! `type`/`code` (DESIGN.md §6). Rendering has no side effects: the error travels in the response
//! extensions and the trace layer logs it once.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::json;

use crate::gateway::BindError;
use crate::http::admin::error::AdminError;
use crate::http::admission::BodyReadTimedOut;
use crate::plugin::translator::{FailureClass, StreamEvent};
use crate::plugin::{PluginError, Role};
use crate::request::InvalidBody;
use crate::stages::auth::AuthError;
use crate::stages::bill::BillingError;
use crate::stages::context::Dialect;
use crate::stages::limit::LimitError;
use crate::stages::route::RouteError;
use crate::stages::translate::TranslateError;
use crate::stages::upstream::UpstreamError;
use crate::store::StoreError;

/// Any error a client request can end with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Missing or bad key.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Over a key or tenant limit.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// Malformed body.
    #[error(transparent)]
    InvalidBody(#[from] InvalidBody),
    /// The body is larger than the server accepts.
    #[error("The request body is larger than this gateway accepts.")]
    BodyTooLarge,
    /// The body did not arrive in time.
    #[error(transparent)]
    BodyReadTimedOut(#[from] BodyReadTimedOut),
    /// The client's address failed authentication too often; it is refused for a while.
    #[error(
        "Too many failed authentication attempts from your address; retry after {} s.",
        retry_after.as_secs().max(1)
    )]
    AuthThrottled {
        /// How long the address stays throttled.
        retry_after: Duration,
    },
    /// No route.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// Billing refused or failed.
    #[error(transparent)]
    Billing(#[from] BillingError),
    /// Translation failed.
    #[error(transparent)]
    Translate(#[from] TranslateError),
    /// The last upstream attempt failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// A plugin failed.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The plan held no attempt.
    #[error("no upstream attempt could be made")]
    NoAttempt,
    /// The admin API refused the operator's request.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// No such endpoint.
    #[error("Invalid URL ({method} {path})")]
    UnknownPath {
        /// Method asked.
        method: String,
        /// Path asked.
        path: String,
    },
}

impl From<BindError> for ApiError {
    fn from(error: BindError) -> Self {
        ApiError::Admin(AdminError::Bind(error))
    }
}

/// The rendered facts of an error: status, OpenAI's error object, and the short class usage
/// records keep.
#[derive(Debug, PartialEq, Eq)]
struct Rendered {
    status: StatusCode,
    kind: &'static str,
    code: Option<String>,
    class: &'static str,
    message: String,
    param: Option<String>,
    retry_after_ms: Option<u64>,
}

impl Rendered {
    /// The record class, where it says more than the code.
    fn class(self, class: &'static str) -> Self {
        Self { class, ..self }
    }

    fn retry_after(self, retry_after_ms: u64) -> Self {
        Self {
            retry_after_ms: Some(retry_after_ms),
            ..self
        }
    }
}

/// A status with the OpenAI error `type` it is answered with.
#[derive(Clone, Copy)]
struct Answer(StatusCode, &'static str);

const BAD_REQUEST: Answer = Answer(StatusCode::BAD_REQUEST, "invalid_request_error");
const UNAUTHORIZED: Answer = Answer(StatusCode::UNAUTHORIZED, "invalid_request_error");
const FORBIDDEN: Answer = Answer(StatusCode::FORBIDDEN, "permission_error");
const NOT_FOUND: Answer = Answer(StatusCode::NOT_FOUND, "invalid_request_error");
const REQUEST_TIMEOUT: Answer = Answer(StatusCode::REQUEST_TIMEOUT, "invalid_request_error");
const CONFLICT: Answer = Answer(StatusCode::CONFLICT, "invalid_request_error");
const TOO_LARGE: Answer = Answer(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error");
const RATE_LIMITED: Answer = Answer(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error");
const NO_QUOTA: Answer = Answer(StatusCode::TOO_MANY_REQUESTS, "insufficient_quota");
const FAILED: Answer = Answer(StatusCode::INTERNAL_SERVER_ERROR, "server_error");
const UPSTREAM_FAILED: Answer = Answer(StatusCode::BAD_GATEWAY, "upstream_error");
const UNAVAILABLE: Answer = Answer(StatusCode::SERVICE_UNAVAILABLE, "server_error");
const UPSTREAM_TIMEOUT: Answer = Answer(StatusCode::GATEWAY_TIMEOUT, "upstream_error");

impl Answer {
    /// Answered with `code`, which is also the record class unless [`Rendered::class`] says more.
    fn with(self, code: &'static str, message: impl Into<String>) -> Rendered {
        Rendered {
            code: Some(code.to_owned()),
            class: code,
            ..self.without_code(code, message)
        }
    }

    /// Answered with no `code` (OpenAI's own invalid-request errors have none).
    fn without_code(self, class: &'static str, message: impl Into<String>) -> Rendered {
        let Answer(status, kind) = self;
        Rendered {
            status,
            kind,
            code: None,
            class,
            message: message.into(),
            param: None,
            retry_after_ms: None,
        }
    }
}

/// Gateway decisions carry no upstream hint: a second is as good as any.
const DECIDED_RETRY_AFTER_MS: u64 = 1000;

impl ApiError {
    /// The one mapping from error to status, OpenAI error object and record class.
    fn render(&self) -> Rendered {
        // Formatted only by the rows that answer with the error's own words.
        let message = || self.to_string();
        match self {
            ApiError::Store(StoreError::Exists { .. }) => {
                CONFLICT.with("already_exists", message())
            }
            ApiError::Store(StoreError::Missing { .. }) => NOT_FOUND.with("not_found", message()),
            ApiError::Auth(AuthError::Store(_))
            | ApiError::Store(_)
            | ApiError::Billing(BillingError::Store(_)) => storage_failed(),
            ApiError::Auth(_) => UNAUTHORIZED.with("invalid_api_key", message()),
            ApiError::AuthThrottled { retry_after } => RATE_LIMITED
                .with("rate_limit_exceeded", message())
                .class("auth_throttled")
                .retry_after(retry_after.as_millis() as u64),
            ApiError::Limit(LimitError::ModelNotAllowed { .. }) => NOT_FOUND
                .with("model_not_found", message())
                .class("model_not_allowed"),
            ApiError::Limit(LimitError::RateLimited { retry_after, .. }) => RATE_LIMITED
                .with("rate_limit_exceeded", message())
                .retry_after(retry_after.as_millis() as u64),
            ApiError::InvalidBody(InvalidBody { message, param })
            | ApiError::Translate(TranslateError::InvalidRequest { message, param }) => Rendered {
                param: param.clone(),
                ..BAD_REQUEST.without_code("invalid_request", message.clone())
            },
            ApiError::BodyTooLarge => TOO_LARGE.with("request_too_large", message()),
            ApiError::BodyReadTimedOut(_) => REQUEST_TIMEOUT.with("request_timeout", message()),
            ApiError::Route(RouteError::NoRoute(detail))
            | ApiError::Billing(BillingError::UnpricedModel(detail)) => {
                NOT_FOUND.with("model_not_found", detail.clone())
            }
            ApiError::Route(RouteError::Refused(detail)) => {
                FORBIDDEN.with("route_refused", detail.clone())
            }
            ApiError::Billing(
                BillingError::InsufficientBalance(detail) | BillingError::BudgetExceeded(detail),
            ) => NO_QUOTA.with("insufficient_quota", detail.clone()),
            ApiError::Billing(BillingError::Contended) => RATE_LIMITED
                .with("rate_limit_exceeded", message())
                .class("billing_contended")
                .retry_after(DECIDED_RETRY_AFTER_MS),
            ApiError::Route(RouteError::Plugin(error))
            | ApiError::Billing(BillingError::Plugin(error))
            | ApiError::Translate(TranslateError::Plugin(error))
            | ApiError::Plugin(error) => plugin_rendered(error),
            ApiError::Translate(TranslateError::Upstream(error)) | ApiError::Upstream(error) => {
                upstream_rendered(error).class(error.class())
            }
            ApiError::NoAttempt => UNAVAILABLE
                .with("no_upstream", message())
                .retry_after(DECIDED_RETRY_AFTER_MS),
            ApiError::Admin(error) => admin_rendered(error, message()),
            ApiError::UnknownPath { .. } => NOT_FOUND.with("unknown_url", message()),
        }
    }

    /// The HTTP status this error is answered with and the class its usage record keeps.
    pub fn recorded_as(&self) -> (u16, &'static str) {
        let rendered = self.render();
        (rendered.status.as_u16(), rendered.class)
    }

    /// A short class for usage records: the error code, or what it says more precisely.
    pub fn class(&self) -> &'static str {
        self.render().class
    }

    /// Status and body in the dialect.
    fn shaped(rendered: &Rendered, dialect: Dialect) -> (StatusCode, serde_json::Value) {
        match dialect {
            Dialect::OpenAi => (
                rendered.status,
                json!({
                    "error": {
                        "message": rendered.message,
                        "type": rendered.kind,
                        "param": rendered.param,
                        "code": rendered.code,
                    }
                }),
            ),
            Dialect::AnthropicMessages => {
                let overloaded = rendered.code.as_deref() == Some("upstream_overloaded");
                let (status, kind) = match rendered.status.as_u16() {
                    _ if overloaded => (
                        StatusCode::from_u16(529).expect("529 is a valid status code"),
                        "overloaded_error",
                    ),
                    400 | 422 => (rendered.status, "invalid_request_error"),
                    401 => (rendered.status, "authentication_error"),
                    403 => (rendered.status, "permission_error"),
                    404 | 405 => (rendered.status, "not_found_error"),
                    413 => (rendered.status, "request_too_large"),
                    429 => (rendered.status, "rate_limit_error"),
                    400..=499 => (rendered.status, "invalid_request_error"),
                    _ => (rendered.status, "api_error"),
                };
                (
                    status,
                    json!({"type": "error", "error": {"type": kind, "message": rendered.message}}),
                )
            }
        }
    }

    /// The error as one SSE event, for a stream that already started (its status cannot change).
    pub fn sse_frame(&self, dialect: Dialect) -> Bytes {
        let (_, body) = Self::shaped(&self.render(), dialect);
        match dialect {
            Dialect::OpenAi => crate::sse::data_frame(&body.to_string()),
            Dialect::AnthropicMessages => crate::sse::event_frame(&StreamEvent {
                event: Some("error".to_owned()),
                data: body.to_string(),
            }),
        }
    }

    /// The error as a response in the dialect of the endpoint that was called.
    pub fn response_in(self, dialect: Dialect) -> Response {
        let rendered = self.render();
        let (status, body) = Self::shaped(&rendered, dialect);
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(retry_after_ms) = rendered.retry_after_ms {
            let seconds = retry_after_ms.div_ceil(1000).max(1);
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        if self.ends_connection() {
            // The body may be unread (the request was refused from its head): the connection
            // cannot carry another request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.is_failed_authentication() {
            response.extensions_mut().insert(CountedRefusal);
            return response;
        }
        let mut described = self.to_string();
        let mut source = std::error::Error::source(&self);
        while let Some(cause) = source {
            described.push_str(": ");
            described.push_str(&cause.to_string());
            source = cause.source();
        }
        response.extensions_mut().insert(LoggedError(described));
        response
    }

    /// The plugin failure this error is, if it is one.
    pub fn plugin_error(&self) -> Option<&PluginError> {
        match self {
            ApiError::Route(RouteError::Plugin(error))
            | ApiError::Billing(BillingError::Plugin(error))
            | ApiError::Translate(TranslateError::Plugin(error))
            | ApiError::Plugin(error) => Some(error),
            _ => None,
        }
    }

    /// A refusal of a credential: counted per address and logged as counts by admission, not
    /// one line per request.
    fn is_failed_authentication(&self) -> bool {
        matches!(
            self,
            ApiError::Auth(AuthError::Missing | AuthError::Invalid | AuthError::Expired)
                | ApiError::Admin(AdminError::Unauthorized | AdminError::Closed)
                | ApiError::AuthThrottled { .. }
        )
    }

    /// Answered from the request head, before the body was read (or while it was late): the
    /// connection closes after the answer.
    fn ends_connection(&self) -> bool {
        self.is_failed_authentication()
            || matches!(self, ApiError::BodyTooLarge | ApiError::BodyReadTimedOut(_))
    }
}

/// Marks the response of a failed authentication: the trace layer writes no line for it
/// (admission logs such refusals as counts per address and interval).
#[derive(Debug, Clone, Copy)]
pub struct CountedRefusal;

/// The error's description, kept in the response extensions for the trace layer to log once.
#[derive(Debug, Clone)]
pub struct LoggedError(pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.response_in(Dialect::OpenAi)
    }
}

/// The store's detail stays in the log: a client learns only that storage failed.
fn storage_failed() -> Rendered {
    FAILED
        .with("storage_failed", "The gateway's storage failed.")
        .class("storage")
}

fn plugin_rendered(error: &PluginError) -> Rendered {
    let culprit = error.culprit();
    let message = match (culprit, error) {
        (_, PluginError::TenantShare { .. }) => {
            return RATE_LIMITED
                .with(
                    "rate_limit_exceeded",
                    "This tenant's requests hold their share of the gateway's plugin instances; \
                     retry shortly.",
                )
                .class("tenant_share")
                .retry_after(DECIDED_RETRY_AFTER_MS);
        }
        (_, PluginError::PoolFull { .. }) => {
            return UNAVAILABLE
                .with(
                    "gateway_busy",
                    "The gateway is at its limit of requests in flight; retry shortly.",
                )
                .retry_after(DECIDED_RETRY_AFTER_MS);
        }
        (Some((plugin, role)), PluginError::Deadline { after, .. }) => format!(
            "The {role} plugin {plugin} did not answer within {} ms.",
            after.as_millis()
        ),
        (Some((plugin, role)), PluginError::MemoryCap { .. }) => {
            format!("The {role} plugin {plugin} exceeded its memory limit.")
        }
        (Some((plugin, role)), PluginError::OutputTooLarge { cap_bytes, .. }) => {
            format!(
                "The {role} plugin {plugin} returned more than its {cap_bytes}-byte output cap."
            )
        }
        (Some((plugin, role)), PluginError::Contract { detail, .. }) => {
            format!("The {role} plugin {plugin} returned an invalid result: {detail}.")
        }
        (Some((plugin, role)), _) => format!("The {role} plugin {plugin} failed."),
        (None, PluginError::Unbound { role, what }) => {
            format!("No {role} plugin is bound for {what}.")
        }
        (None, _) => "The plugin engine failed.".to_owned(),
    };
    let class = match culprit.map(|(_, role)| role) {
        Some(Role::Router) => "plugin_router",
        Some(Role::Translator) => "plugin_translator",
        Some(Role::Billing) => "plugin_billing",
        None => "plugin",
    };
    FAILED.with("plugin_failed", message).class(class)
}

/// An upstream's failure; its record class is the upstream error's own class.
fn upstream_rendered(error: &UpstreamError) -> Rendered {
    let class = error.class();
    let failure = match error {
        UpstreamError::Failure { failure, .. } => failure,
        UpstreamError::NoUsableKey {
            retry_after: Some(rest),
            ..
        } => {
            return RATE_LIMITED
                .with(
                    "rate_limit_exceeded",
                    "Every upstream key for this model is rate limited; retry later.",
                )
                .retry_after(rest.as_millis() as u64);
        }
        UpstreamError::CircuitOpen { .. } | UpstreamError::NoUsableKey { .. } => {
            return upstream_coded(
                UNAVAILABLE,
                class,
                "No upstream for this model is available right now; retry later.",
            )
            .retry_after(DECIDED_RETRY_AFTER_MS);
        }
        UpstreamError::Timeout { .. } | UpstreamError::Silent { .. } => {
            return UPSTREAM_TIMEOUT
                .with("upstream_timeout", "The upstream did not answer in time.");
        }
        _ => {
            return upstream_coded(
                UPSTREAM_FAILED,
                class,
                format!("The upstream failed ({class})."),
            );
        }
    };
    match failure.class {
        // The upstream's own words about the request: relayed with its status, code and param.
        FailureClass::InvalidRequest => Rendered {
            status: StatusCode::from_u16(failure.status)
                .ok()
                .filter(|status| status.is_client_error())
                .unwrap_or(StatusCode::BAD_REQUEST),
            code: failure.code.clone(),
            param: failure.param.clone(),
            ..BAD_REQUEST.without_code(class, failure.message.clone())
        },
        FailureClass::RateLimited => Rendered {
            retry_after_ms: failure.retry_after_ms,
            ..RATE_LIMITED.with(
                "rate_limit_exceeded",
                "Every upstream for this model is rate limited; retry later.",
            )
        },
        FailureClass::Overloaded => UNAVAILABLE.with(
            "upstream_overloaded",
            "Every upstream for this model is overloaded; retry later.",
        ),
        _ => upstream_coded(
            UPSTREAM_FAILED,
            class,
            format!("The upstream failed ({class}): {}", failure.message),
        ),
    }
}

/// Coded `upstream_` and the upstream error's class.
fn upstream_coded(answer: Answer, class: &'static str, message: impl Into<String>) -> Rendered {
    Rendered {
        code: Some(format!("upstream_{class}")),
        ..answer.without_code(class, message)
    }
}

/// The admin API's refusals; a refused binding is recorded as one class, whatever the cause.
fn admin_rendered(error: &AdminError, message: String) -> Rendered {
    match error {
        AdminError::Unauthorized => UNAUTHORIZED.with("invalid_admin_token", message),
        AdminError::Closed => UNAUTHORIZED.with("admin_api_closed", message),
        AdminError::UnknownTenant { .. } => NOT_FOUND.with("tenant_not_found", message),
        AdminError::ConfigChannel { .. } => CONFLICT.with("channel_in_config", message),
        AdminError::UnknownChannel { .. } => NOT_FOUND.with("channel_not_found", message),
        AdminError::ChannelReload(_) => FAILED.with(
            "channel_reload_failed",
            "The channel was stored but the live channel set could not be rebuilt.",
        ),
        AdminError::UnknownKey { .. } => NOT_FOUND.with("not_found", message),
        AdminError::UnknownRequest { .. } => NOT_FOUND.with("request_not_found", message),
        AdminError::Bind(error) => bind_rendered(error, message).class("binding_refused"),
        AdminError::PluginTooLarge { .. } => TOO_LARGE.with("plugin_too_large", message),
    }
}

/// A refused plugin or binding change: the operator's input is at fault, except for the store.
fn bind_rendered(error: &BindError, message: String) -> Rendered {
    match error {
        BindError::Store(_) => storage_failed(),
        BindError::Plugin(PluginError::Config { .. }) => {
            BAD_REQUEST.with("plugin_config_rejected", message)
        }
        BindError::Plugin(PluginError::Engine(_)) => FAILED.with("plugin_engine", message),
        BindError::Plugin(PluginError::Unfit { .. } | PluginError::Invalid { .. }) => {
            BAD_REQUEST.with("invalid_plugin", message)
        }
        BindError::Plugin(_) => BAD_REQUEST.with("plugin_failed", message),
        BindError::UnknownPlugin { .. } => NOT_FOUND.with("plugin_not_found", message),
        BindError::WrongRole { .. } => BAD_REQUEST.with("wrong_role", message),
        BindError::Invalid(_) => BAD_REQUEST.with("invalid_binding", message),
        BindError::Conflict(_) => CONFLICT.with("binding_conflict", message),
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::plugin::PluginRef;
    use crate::plugin::translator::UpstreamFailure;

    fn plugin() -> PluginRef {
        PluginRef {
            name: "failover".into(),
            sha256: "0123456789abcdef".into(),
        }
    }

    fn failure(class: FailureClass, status: u16) -> ApiError {
        ApiError::Upstream(UpstreamError::Failure {
            channel: "c".into(),
            failure: Box::new(UpstreamFailure {
                class,
                status,
                message: "upstream says no".into(),
                code: Some("some_code".into()),
                param: Some("messages".into()),
                retry_after_ms: Some(1500),
            }),
        })
    }

    /// Asserts the status, OpenAI `type`, `code` and record class an error is answered with.
    #[track_caller]
    fn maps(error: impl Into<ApiError>, status: u16, kind: &str, code: Option<&str>, class: &str) {
        let error = error.into();
        let rendered = error.render();
        assert_eq!(rendered.status.as_u16(), status, "{error:?}");
        assert_eq!(rendered.kind, kind, "{error:?}");
        assert_eq!(rendered.code.as_deref(), code, "{error:?}");
        assert_eq!(error.class(), class, "{error:?}");
    }

    const INVALID: &str = "invalid_request_error";

    #[test]
    fn authentication_and_body_errors_map_to_their_status_code_and_class() {
        let key = Some("invalid_api_key");
        maps(AuthError::Missing, 401, INVALID, key, "invalid_api_key");
        maps(AuthError::Invalid, 401, INVALID, key, "invalid_api_key");
        let body = InvalidBody {
            message: "bad".into(),
            param: None,
        };
        maps(body, 400, INVALID, None, "invalid_request");
        let too_large = Some("request_too_large");
        maps(
            ApiError::BodyTooLarge,
            413,
            INVALID,
            too_large,
            "request_too_large",
        );
        let late = BodyReadTimedOut {
            timeout_ms: 10_000,
            min_bytes_per_second: 8_192,
            received: 3,
        };
        maps(
            late,
            408,
            INVALID,
            Some("request_timeout"),
            "request_timeout",
        );
        let throttled = ApiError::AuthThrottled {
            retry_after: Duration::from_secs(10),
        };
        let limited = Some("rate_limit_exceeded");
        maps(
            throttled,
            429,
            "rate_limit_error",
            limited,
            "auth_throttled",
        );
        let path = ApiError::UnknownPath {
            method: "GET".into(),
            path: "/x".into(),
        };
        maps(path, 404, INVALID, Some("unknown_url"), "unknown_url");
    }

    #[test]
    fn limit_route_and_billing_refusals_map_to_their_status_code_and_class() {
        let limited = Some("rate_limit_exceeded");
        let rate = LimitError::RateLimited {
            what: "requests per minute",
            retry_after: Duration::from_secs(2),
        };
        maps(
            rate,
            429,
            "rate_limit_error",
            limited,
            "rate_limit_exceeded",
        );
        let unknown_model = Some("model_not_found");
        let not_allowed = LimitError::ModelNotAllowed { model: "m".into() };
        maps(
            not_allowed,
            404,
            INVALID,
            unknown_model,
            "model_not_allowed",
        );
        maps(
            RouteError::NoRoute("m".into()),
            404,
            INVALID,
            unknown_model,
            "model_not_found",
        );
        let refused = RouteError::Refused("no".into());
        maps(
            refused,
            403,
            "permission_error",
            Some("route_refused"),
            "route_refused",
        );
        let quota = Some("insufficient_quota");
        let poor = BillingError::InsufficientBalance("poor".into());
        maps(poor, 429, "insufficient_quota", quota, "insufficient_quota");
        let over = BillingError::BudgetExceeded("cap".into());
        maps(over, 429, "insufficient_quota", quota, "insufficient_quota");
        let unpriced = BillingError::UnpricedModel("m".into());
        maps(unpriced, 404, INVALID, unknown_model, "model_not_found");
        let contended = BillingError::Contended;
        maps(
            contended,
            429,
            "rate_limit_error",
            limited,
            "billing_contended",
        );
    }

    #[test]
    fn gateway_plugin_and_store_errors_map_to_their_status_code_and_class() {
        let failed = Some("plugin_failed");
        let deadline = PluginError::Deadline {
            plugin: plugin(),
            role: Role::Router,
            export: "plan",
            after: Duration::from_millis(5),
        };
        maps(deadline, 500, "server_error", failed, "plugin_router");
        let output = PluginError::OutputTooLarge {
            plugin: plugin(),
            role: Role::Billing,
            export: "charge",
            bytes: 2,
            cap_bytes: 1,
        };
        maps(output, 500, "server_error", failed, "plugin_billing");
        let busy = PluginError::PoolFull { role: Role::Router };
        maps(
            busy,
            503,
            "server_error",
            Some("gateway_busy"),
            "gateway_busy",
        );
        let share = PluginError::TenantShare { role: Role::Router };
        let limited = Some("rate_limit_exceeded");
        maps(share, 429, "rate_limit_error", limited, "tenant_share");
        let storage = Some("storage_failed");
        maps(
            StoreError::Backend("x".into()),
            500,
            "server_error",
            storage,
            "storage",
        );
        let exists = StoreError::Exists {
            what: "tenant",
            name: "t".into(),
        };
        maps(
            exists,
            409,
            INVALID,
            Some("already_exists"),
            "already_exists",
        );
        let missing = StoreError::Missing {
            what: "tenant",
            name: "t".into(),
        };
        maps(missing, 404, INVALID, Some("not_found"), "not_found");
        maps(
            ApiError::NoAttempt,
            503,
            "server_error",
            Some("no_upstream"),
            "no_upstream",
        );
    }

    #[test]
    fn upstream_errors_map_to_their_status_code_and_class() {
        let failing = [
            (
                FailureClass::InvalidRequest,
                422,
                INVALID,
                "some_code",
                "invalid_request",
            ),
            (
                FailureClass::RateLimited,
                429,
                "rate_limit_error",
                "rate_limit_exceeded",
                "rate_limited",
            ),
            (
                FailureClass::Overloaded,
                503,
                "server_error",
                "upstream_overloaded",
                "overloaded",
            ),
            (
                FailureClass::Server,
                502,
                "upstream_error",
                "upstream_server",
                "server",
            ),
            (
                FailureClass::Authentication,
                502,
                "upstream_error",
                "upstream_authentication",
                "authentication",
            ),
        ];
        for (class, status, kind, code, record_class) in failing {
            let said = if class == FailureClass::Overloaded {
                529
            } else {
                status
            };
            maps(failure(class, said), status, kind, Some(code), record_class);
        }
        let timeout = Some("upstream_timeout");
        let headers = UpstreamError::Timeout {
            channel: "c".into(),
            phase: crate::stages::upstream::TimeoutPhase::Headers,
        };
        maps(headers, 504, "upstream_error", timeout, "timeout_headers");
        let silent = UpstreamError::Silent {
            channel: "c".into(),
        };
        maps(silent, 504, "upstream_error", timeout, "channel_silent");
        let keyless = UpstreamError::NoUsableKey {
            channel: "c".into(),
            retry_after: None,
        };
        let no_key = Some("upstream_no_usable_key");
        maps(keyless, 503, "server_error", no_key, "no_usable_key");
        let resting = UpstreamError::NoUsableKey {
            channel: "c".into(),
            retry_after: Some(Duration::from_secs(3)),
        };
        let limited = Some("rate_limit_exceeded");
        maps(resting, 429, "rate_limit_error", limited, "no_usable_key");
    }

    #[test]
    fn admin_errors_map_to_their_status_code_and_class() {
        let token = Some("invalid_admin_token");
        maps(
            AdminError::Unauthorized,
            401,
            INVALID,
            token,
            "invalid_admin_token",
        );
        let closed = Some("admin_api_closed");
        maps(AdminError::Closed, 401, INVALID, closed, "admin_api_closed");
        let request = AdminError::UnknownRequest {
            request_id: "r".into(),
        };
        maps(
            request,
            404,
            INVALID,
            Some("request_not_found"),
            "request_not_found",
        );
        let tenant = AdminError::UnknownTenant { tenant: "t".into() };
        maps(
            tenant,
            404,
            INVALID,
            Some("tenant_not_found"),
            "tenant_not_found",
        );
        let key = AdminError::UnknownKey { key_id: "k".into() };
        maps(key, 404, INVALID, Some("not_found"), "not_found");
        let in_config = AdminError::ConfigChannel { name: "c".into() };
        maps(
            in_config,
            409,
            INVALID,
            Some("channel_in_config"),
            "channel_in_config",
        );
        let channel = AdminError::UnknownChannel { name: "c".into() };
        maps(
            channel,
            404,
            INVALID,
            Some("channel_not_found"),
            "channel_not_found",
        );
        let large = AdminError::PluginTooLarge { max_bytes: 1 };
        maps(
            large,
            413,
            INVALID,
            Some("plugin_too_large"),
            "plugin_too_large",
        );
    }

    #[test]
    fn refused_bindings_map_to_their_status_and_code_and_one_class() {
        let unfit = BindError::Plugin(PluginError::Unfit {
            name: "x".into(),
            reason: "not wasm".into(),
        });
        let config = BindError::Plugin(PluginError::Config {
            plugin: plugin(),
            role: Role::Router,
            message: "no".into(),
        });
        let unknown = BindError::UnknownPlugin {
            role: Role::Router,
            reference: "r".into(),
        };
        let wrong = BindError::WrongRole {
            plugin: "p".into(),
            actual: Role::Billing,
            expected: Role::Router,
        };
        let table = [
            (unfit, 400, INVALID, "invalid_plugin"),
            (config, 400, INVALID, "plugin_config_rejected"),
            (unknown, 404, INVALID, "plugin_not_found"),
            (wrong, 400, INVALID, "wrong_role"),
            (
                BindError::Invalid("percent".into()),
                400,
                INVALID,
                "invalid_binding",
            ),
            (
                BindError::Conflict("bound".into()),
                409,
                INVALID,
                "binding_conflict",
            ),
            (
                BindError::Store(StoreError::Backend("disk".into())),
                500,
                "server_error",
                "storage_failed",
            ),
        ];
        for (error, status, kind, code) in table {
            maps(error, status, kind, Some(code), "binding_refused");
        }
    }

    #[test]
    fn plugin_errors_name_plugin_and_role_but_not_internals() {
        let error = ApiError::Plugin(PluginError::Trap {
            plugin: plugin(),
            role: Role::Billing,
            export: "charge",
            trap: "wasm unreachable".into(),
            output: "panicked at secret.rs".into(),
        });
        let message = error.render().message;
        assert!(
            message.contains("billing") && message.contains("failover@0123456789ab"),
            "{message}"
        );
        assert!(!message.contains("secret.rs"), "{message}");
    }

    #[test]
    fn the_anthropic_dialect_uses_anthropic_types_and_529_for_overload() {
        let table: Vec<(ApiError, u16, &str)> = vec![
            (AuthError::Invalid.into(), 401, "authentication_error"),
            (
                ApiError::Route(RouteError::Refused("no".into())),
                403,
                "permission_error",
            ),
            (
                ApiError::Route(RouteError::NoRoute("m".into())),
                404,
                "not_found_error",
            ),
            (ApiError::BodyTooLarge, 413, "request_too_large"),
            (
                failure(FailureClass::RateLimited, 429),
                429,
                "rate_limit_error",
            ),
            (
                failure(FailureClass::Overloaded, 529),
                529,
                "overloaded_error",
            ),
            (failure(FailureClass::Server, 500), 502, "api_error"),
            (
                failure(FailureClass::InvalidRequest, 400),
                400,
                "invalid_request_error",
            ),
        ];
        for (error, status, kind) in table {
            let (rendered_status, body) =
                ApiError::shaped(&error.render(), Dialect::AnthropicMessages);
            assert_eq!(rendered_status.as_u16(), status, "{error:?}");
            assert_eq!(body["type"], "error", "{error:?}");
            assert_eq!(body["error"]["type"], kind, "{error:?}");
            assert!(body["error"]["message"].is_string(), "{error:?}");
        }
        let frame = failure(FailureClass::Overloaded, 529).sse_frame(Dialect::AnthropicMessages);
        let frame = std::str::from_utf8(&frame).expect("UTF-8");
        assert!(
            frame.starts_with("event: error\ndata: {") && frame.contains("overloaded_error"),
            "{frame}"
        );
    }

    #[test]
    fn every_503_the_gateway_decides_carries_retry_after() {
        let decided = [
            ApiError::NoAttempt,
            ApiError::Upstream(UpstreamError::CircuitOpen {
                channel: "c".into(),
            }),
            ApiError::Upstream(UpstreamError::NoUsableKey {
                channel: "c".into(),
                retry_after: None,
            }),
            ApiError::Plugin(PluginError::PoolFull { role: Role::Router }),
        ];
        for error in decided {
            let described = format!("{error:?}");
            let response = error.into_response();
            assert_eq!(
                response.status(),
                StatusCode::SERVICE_UNAVAILABLE,
                "{described}"
            );
            assert_eq!(response.headers()[header::RETRY_AFTER], "1", "{described}");
        }
    }

    #[test]
    fn rate_limits_carry_retry_after() {
        let response = failure(FailureClass::RateLimited, 429).into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }
}
