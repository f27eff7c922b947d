//! `ApiError`: every layer's error, and the one mapping from error to HTTP status and OpenAI error
//! `type`/`code` (DESIGN.md §6). Rendering has no side effects: the error travels in the response
//! extensions and the trace layer logs it once.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::json;

use crate::gateway::BindError;
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
    BodyReadTimedOut(#[from] crate::http::admission::BodyReadTimedOut),
    /// The client's address failed authentication too often; it is refused for a while.
    #[error(
        "Too many failed authentication attempts from your address; retry after {} s.",
        retry_after.as_secs().max(1)
    )]
    AuthThrottled {
        /// How long the address stays throttled.
        retry_after: std::time::Duration,
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
    /// The admin token is missing or wrong (or the admin API is not enabled).
    #[error("A valid admin token is required (Authorization: Bearer $TOLLGATE_ADMIN_TOKEN).")]
    AdminUnauthorized,
    /// No such tenant.
    #[error("No tenant is named `{tenant}`.")]
    UnknownTenant {
        /// The name asked for.
        tenant: String,
    },
    /// The admin API may not change a channel of the configuration file.
    #[error("The channel `{name}` is defined in the configuration file; change it there.")]
    ConfigChannel {
        /// The channel.
        name: String,
    },
    /// No API channel has that name.
    #[error("No channel created through the API is named `{name}`.")]
    UnknownChannel {
        /// The name asked for.
        name: String,
    },
    /// The channel set could not be rebuilt after a change.
    #[error("the channels could not be reloaded")]
    ChannelReload(#[source] Box<crate::gateway::StartError>),
    /// No such key.
    #[error("No key has the id `{key_id}`.")]
    UnknownKey {
        /// The id asked for.
        key_id: String,
    },
    /// No record of that request id.
    #[error("No request with id `{request_id}` is recorded.")]
    UnknownRequest {
        /// The id asked for.
        request_id: String,
    },
    /// A plugin or binding change was refused.
    #[error(transparent)]
    Bind(#[from] crate::gateway::BindError),
    /// An uploaded plugin is larger than the gateway accepts.
    #[error(
        "The plugin is larger than the {max_bytes} bytes this gateway accepts (`plugins.max_upload_mib`)."
    )]
    PluginTooLarge {
        /// The cap.
        max_bytes: usize,
    },
    /// No such endpoint.
    #[error("Invalid URL ({method} {path})")]
    UnknownPath {
        /// Method asked.
        method: String,
        /// Path asked.
        path: String,
    },
}

/// The rendered facts of an error: status and OpenAI's error object.
#[derive(Debug, PartialEq, Eq)]
struct Rendered {
    status: StatusCode,
    kind: &'static str,
    code: Option<String>,
    message: String,
    param: Option<String>,
    retry_after_ms: Option<u64>,
}

fn rendered(
    status: StatusCode,
    kind: &'static str,
    code: Option<&str>,
    message: String,
) -> Rendered {
    Rendered {
        status,
        kind,
        code: code.map(str::to_owned),
        message,
        param: None,
        retry_after_ms: None,
    }
}

fn plugin_rendered(error: &PluginError) -> Rendered {
    if let PluginError::TenantShare { .. } = error {
        return Rendered {
            retry_after_ms: Some(1000),
            ..rendered(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
                "This tenant's requests hold their share of the gateway's plugin instances; retry \
                 shortly."
                    .to_owned(),
            )
        };
    }
    if let PluginError::PoolFull { .. } = error {
        return Rendered {
            retry_after_ms: Some(1000),
            ..rendered(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("gateway_busy"),
                "The gateway is at its limit of requests in flight; retry shortly.".to_owned(),
            )
        };
    }
    let message = match (error.culprit(), error) {
        (Some((plugin, role)), PluginError::Deadline { after, .. }) => {
            format!(
                "The {role} plugin {plugin} did not answer within {} ms.",
                after.as_millis()
            )
        }
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
    rendered(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        Some("plugin_failed"),
        message,
    )
}

/// A refused plugin or binding change: the operator's input is at fault, except for the store.
fn bind_rendered(error: &BindError) -> Rendered {
    let (status, code) = match error {
        BindError::Store(error) => {
            return ApiError::Store(StoreError::Backend(error.to_string())).render();
        }
        BindError::Plugin(PluginError::Config { .. }) => {
            (StatusCode::BAD_REQUEST, "plugin_config_rejected")
        }
        BindError::Plugin(PluginError::Engine(_)) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "plugin_engine")
        }
        BindError::Plugin(PluginError::Unfit { .. } | PluginError::Invalid { .. }) => {
            (StatusCode::BAD_REQUEST, "invalid_plugin")
        }
        BindError::Plugin(_) => (StatusCode::BAD_REQUEST, "plugin_failed"),
        BindError::UnknownPlugin { .. } => (StatusCode::NOT_FOUND, "plugin_not_found"),
        BindError::WrongRole { .. } => (StatusCode::BAD_REQUEST, "wrong_role"),
        BindError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_binding"),
        BindError::Conflict(_) => (StatusCode::CONFLICT, "binding_conflict"),
    };
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    rendered(status, kind, Some(code), error.to_string())
}

fn upstream_rendered(error: &UpstreamError) -> Rendered {
    let class = error.class();
    match error {
        UpstreamError::Failure { failure, .. } => match failure.class {
            FailureClass::InvalidRequest => Rendered {
                status: StatusCode::from_u16(failure.status)
                    .ok()
                    .filter(|status| status.is_client_error())
                    .unwrap_or(StatusCode::BAD_REQUEST),
                kind: "invalid_request_error",
                code: failure.code.clone(),
                message: failure.message.clone(),
                param: failure.param.clone(),
                retry_after_ms: None,
            },
            FailureClass::RateLimited => Rendered {
                retry_after_ms: failure.retry_after_ms,
                ..rendered(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    Some("rate_limit_exceeded"),
                    "Every upstream for this model is rate limited; retry later.".to_owned(),
                )
            },
            FailureClass::Overloaded => rendered(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("upstream_overloaded"),
                "Every upstream for this model is overloaded; retry later.".to_owned(),
            ),
            _ => rendered(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                Some(&format!("upstream_{class}")),
                format!("The upstream failed ({class}): {}", failure.message),
            ),
        },
        UpstreamError::NoUsableKey {
            retry_after: Some(rest),
            ..
        } => Rendered {
            retry_after_ms: Some(rest.as_millis() as u64),
            ..rendered(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
                "Every upstream key for this model is rate limited; retry later.".to_owned(),
            )
        },
        // Decided by the gateway, not said by an upstream: a second is as good a hint as any.
        UpstreamError::CircuitOpen { .. } | UpstreamError::NoUsableKey { .. } => Rendered {
            retry_after_ms: Some(1000),
            ..rendered(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some(&format!("upstream_{class}")),
                "No upstream for this model is available right now; retry later.".to_owned(),
            )
        },
        UpstreamError::Timeout { .. } | UpstreamError::Silent { .. } => rendered(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_error",
            Some("upstream_timeout"),
            "The upstream did not answer in time.".to_owned(),
        ),
        _ => rendered(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            Some(&format!("upstream_{class}")),
            format!("The upstream failed ({class})."),
        ),
    }
}

impl ApiError {
    /// The one mapping from error to status and OpenAI error object.
    fn render(&self) -> Rendered {
        match self {
            ApiError::Store(StoreError::Exists { .. }) => rendered(
                StatusCode::CONFLICT,
                "invalid_request_error",
                Some("already_exists"),
                self.to_string(),
            ),
            ApiError::Store(StoreError::Missing { .. }) | ApiError::UnknownKey { .. } => rendered(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("not_found"),
                self.to_string(),
            ),
            ApiError::Auth(AuthError::Store(_)) | ApiError::Store(_) => rendered(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                Some("storage_failed"),
                "The gateway's storage failed.".to_owned(),
            ),
            ApiError::Limit(LimitError::ModelNotAllowed { .. }) => rendered(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                self.to_string(),
            ),
            ApiError::Limit(LimitError::RateLimited { retry_after, .. })
            | ApiError::AuthThrottled { retry_after } => Rendered {
                retry_after_ms: Some(retry_after.as_millis() as u64),
                ..rendered(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    Some("rate_limit_exceeded"),
                    self.to_string(),
                )
            },
            ApiError::Auth(error) => rendered(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                error.to_string(),
            ),
            ApiError::InvalidBody(body) => Rendered {
                param: body.param.clone(),
                ..rendered(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    None,
                    body.message.clone(),
                )
            },
            ApiError::BodyTooLarge => rendered(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
                self.to_string(),
            ),
            ApiError::BodyReadTimedOut(_) => rendered(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                Some("request_timeout"),
                self.to_string(),
            ),
            ApiError::Route(RouteError::NoRoute(message))
            | ApiError::Billing(BillingError::UnpricedModel(message)) => rendered(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                message.clone(),
            ),
            ApiError::Route(RouteError::Refused(message)) => rendered(
                StatusCode::FORBIDDEN,
                "permission_error",
                Some("route_refused"),
                message.clone(),
            ),
            ApiError::Route(RouteError::Plugin(error))
            | ApiError::Billing(BillingError::Plugin(error))
            | ApiError::Translate(TranslateError::Plugin(error))
            | ApiError::Plugin(error) => plugin_rendered(error),
            ApiError::Billing(BillingError::InsufficientBalance(message))
            | ApiError::Billing(BillingError::BudgetExceeded(message)) => rendered(
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                Some("insufficient_quota"),
                message.clone(),
            ),
            ApiError::Billing(BillingError::Contended) => Rendered {
                retry_after_ms: Some(1000),
                ..rendered(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    Some("rate_limit_exceeded"),
                    self.to_string(),
                )
            },
            ApiError::Billing(BillingError::Store(_)) => {
                ApiError::Store(StoreError::Backend(String::new())).render()
            }
            ApiError::Translate(TranslateError::InvalidRequest { message, param }) => Rendered {
                param: param.clone(),
                ..rendered(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    None,
                    message.clone(),
                )
            },
            ApiError::Translate(TranslateError::Upstream(error)) | ApiError::Upstream(error) => {
                upstream_rendered(error)
            }
            ApiError::NoAttempt => Rendered {
                retry_after_ms: Some(1000),
                ..rendered(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    Some("no_upstream"),
                    self.to_string(),
                )
            },
            ApiError::AdminUnauthorized => rendered(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_admin_token"),
                self.to_string(),
            ),
            ApiError::ConfigChannel { .. } => rendered(
                StatusCode::CONFLICT,
                "invalid_request_error",
                Some("channel_in_config"),
                self.to_string(),
            ),
            ApiError::UnknownChannel { .. } => rendered(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("channel_not_found"),
                self.to_string(),
            ),
            ApiError::ChannelReload(_) => rendered(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                Some("channel_reload_failed"),
                "The channel was stored but the live channel set could not be rebuilt.".to_owned(),
            ),
            ApiError::UnknownTenant { .. } => rendered(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("tenant_not_found"),
                self.to_string(),
            ),
            ApiError::UnknownRequest { .. } => rendered(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("request_not_found"),
                self.to_string(),
            ),
            ApiError::Bind(error) => bind_rendered(error),
            ApiError::PluginTooLarge { .. } => rendered(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("plugin_too_large"),
                self.to_string(),
            ),
            ApiError::UnknownPath { .. } => rendered(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("unknown_url"),
                self.to_string(),
            ),
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status_code(&self) -> u16 {
        self.render().status.as_u16()
    }

    /// A short class for usage records: the error code, or its type.
    pub fn class(&self) -> &'static str {
        match self {
            ApiError::Store(StoreError::Exists { .. }) => "already_exists",
            ApiError::Store(StoreError::Missing { .. }) => "not_found",
            ApiError::Auth(AuthError::Store(_))
            | ApiError::Store(_)
            | ApiError::Billing(BillingError::Store(_)) => "storage",
            ApiError::Auth(_) => "invalid_api_key",
            ApiError::Limit(LimitError::ModelNotAllowed { .. }) => "model_not_allowed",
            ApiError::Limit(LimitError::RateLimited { .. }) => "rate_limit_exceeded",
            ApiError::InvalidBody(_)
            | ApiError::Translate(TranslateError::InvalidRequest { .. }) => "invalid_request",
            ApiError::BodyTooLarge => "request_too_large",
            ApiError::BodyReadTimedOut(_) => "request_timeout",
            ApiError::AuthThrottled { .. } => "auth_throttled",
            ApiError::Route(RouteError::NoRoute(_))
            | ApiError::Billing(BillingError::UnpricedModel(_)) => "model_not_found",
            ApiError::Route(RouteError::Refused(_)) => "route_refused",
            ApiError::Route(RouteError::Plugin(error))
            | ApiError::Billing(BillingError::Plugin(error))
            | ApiError::Translate(TranslateError::Plugin(error))
            | ApiError::Plugin(error) => match error.culprit().map(|(_, role)| role) {
                _ if matches!(error, PluginError::PoolFull { .. }) => "gateway_busy",
                _ if matches!(error, PluginError::TenantShare { .. }) => "tenant_share",
                Some(Role::Router) => "plugin_router",
                Some(Role::Translator) => "plugin_translator",
                Some(Role::Billing) => "plugin_billing",
                None => "plugin",
            },
            ApiError::Billing(BillingError::Contended) => "billing_contended",
            ApiError::Billing(_) => "insufficient_quota",
            ApiError::Translate(TranslateError::Upstream(error)) | ApiError::Upstream(error) => {
                error.class()
            }
            ApiError::NoAttempt => "no_upstream",
            ApiError::AdminUnauthorized => "invalid_admin_token",
            ApiError::UnknownTenant { .. } => "tenant_not_found",
            ApiError::ConfigChannel { .. } => "channel_in_config",
            ApiError::UnknownChannel { .. } => "channel_not_found",
            ApiError::ChannelReload(_) => "channel_reload_failed",
            ApiError::UnknownKey { .. } => "not_found",
            ApiError::UnknownRequest { .. } => "request_not_found",
            ApiError::UnknownPath { .. } => "unknown_url",
            ApiError::Bind(_) => "binding_refused",
            ApiError::PluginTooLarge { .. } => "plugin_too_large",
        }
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
                | ApiError::AdminUnauthorized
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

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

    #[test]
    fn every_variant_maps_to_its_status_and_code() {
        let table: Vec<(ApiError, u16, &str, Option<&str>)> = vec![
            (
                AuthError::Missing.into(),
                401,
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            (
                AuthError::Invalid.into(),
                401,
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            (
                InvalidBody {
                    message: "bad".into(),
                    param: None,
                }
                .into(),
                400,
                "invalid_request_error",
                None,
            ),
            (
                ApiError::BodyTooLarge,
                413,
                "invalid_request_error",
                Some("request_too_large"),
            ),
            (
                ApiError::BodyReadTimedOut(crate::http::admission::BodyReadTimedOut {
                    timeout_ms: 10_000,
                    min_bytes_per_second: 8_192,
                    received: 3,
                }),
                408,
                "invalid_request_error",
                Some("request_timeout"),
            ),
            (
                ApiError::AuthThrottled {
                    retry_after: Duration::from_secs(10),
                },
                429,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            (
                RouteError::NoRoute("m".into()).into(),
                404,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            (
                RouteError::Refused("no".into()).into(),
                403,
                "permission_error",
                Some("route_refused"),
            ),
            (
                BillingError::InsufficientBalance("poor".into()).into(),
                429,
                "insufficient_quota",
                Some("insufficient_quota"),
            ),
            (
                BillingError::UnpricedModel("m".into()).into(),
                404,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            (
                PluginError::Deadline {
                    plugin: plugin(),
                    role: Role::Router,
                    export: "plan",
                    after: Duration::from_millis(5),
                }
                .into(),
                500,
                "server_error",
                Some("plugin_failed"),
            ),
            (
                failure(FailureClass::InvalidRequest, 422),
                422,
                "invalid_request_error",
                Some("some_code"),
            ),
            (
                failure(FailureClass::RateLimited, 429),
                429,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            (
                failure(FailureClass::Overloaded, 529),
                503,
                "server_error",
                Some("upstream_overloaded"),
            ),
            (
                failure(FailureClass::Server, 500),
                502,
                "upstream_error",
                Some("upstream_server"),
            ),
            (
                failure(FailureClass::Authentication, 401),
                502,
                "upstream_error",
                Some("upstream_authentication"),
            ),
            (
                UpstreamError::Timeout {
                    channel: "c".into(),
                    phase: crate::stages::upstream::TimeoutPhase::Headers,
                }
                .into(),
                504,
                "upstream_error",
                Some("upstream_timeout"),
            ),
            (
                UpstreamError::Silent {
                    channel: "c".into(),
                }
                .into(),
                504,
                "upstream_error",
                Some("upstream_timeout"),
            ),
            (
                StoreError::Backend("x".into()).into(),
                500,
                "server_error",
                Some("storage_failed"),
            ),
            (
                ApiError::UnknownPath {
                    method: "GET".into(),
                    path: "/x".into(),
                },
                404,
                "invalid_request_error",
                Some("unknown_url"),
            ),
            (
                ApiError::AdminUnauthorized,
                401,
                "invalid_request_error",
                Some("invalid_admin_token"),
            ),
            (
                ApiError::UnknownRequest {
                    request_id: "r".into(),
                },
                404,
                "invalid_request_error",
                Some("request_not_found"),
            ),
            (
                ApiError::UnknownTenant { tenant: "t".into() },
                404,
                "invalid_request_error",
                Some("tenant_not_found"),
            ),
            (
                BillingError::Contended.into(),
                429,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            (
                PluginError::PoolFull { role: Role::Router }.into(),
                503,
                "server_error",
                Some("gateway_busy"),
            ),
            (
                UpstreamError::NoUsableKey {
                    channel: "c".into(),
                    retry_after: None,
                }
                .into(),
                503,
                "server_error",
                Some("upstream_no_usable_key"),
            ),
            (
                UpstreamError::NoUsableKey {
                    channel: "c".into(),
                    retry_after: Some(Duration::from_secs(3)),
                }
                .into(),
                429,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            (
                BindError::Plugin(PluginError::Unfit {
                    name: "x".into(),
                    reason: "not wasm".into(),
                })
                .into(),
                400,
                "invalid_request_error",
                Some("invalid_plugin"),
            ),
            (
                BindError::Plugin(PluginError::Config {
                    plugin: plugin(),
                    role: Role::Router,
                    message: "no".into(),
                })
                .into(),
                400,
                "invalid_request_error",
                Some("plugin_config_rejected"),
            ),
            (
                BindError::UnknownPlugin {
                    role: Role::Router,
                    reference: "r".into(),
                }
                .into(),
                404,
                "invalid_request_error",
                Some("plugin_not_found"),
            ),
            (
                BindError::WrongRole {
                    plugin: "p".into(),
                    actual: Role::Billing,
                    expected: Role::Router,
                }
                .into(),
                400,
                "invalid_request_error",
                Some("wrong_role"),
            ),
            (
                BindError::Invalid("percent".into()).into(),
                400,
                "invalid_request_error",
                Some("invalid_binding"),
            ),
            (
                BindError::Conflict("bound".into()).into(),
                409,
                "invalid_request_error",
                Some("binding_conflict"),
            ),
            (
                BindError::Store(StoreError::Backend("disk".into())).into(),
                500,
                "server_error",
                Some("storage_failed"),
            ),
            (
                ApiError::PluginTooLarge { max_bytes: 1 },
                413,
                "invalid_request_error",
                Some("plugin_too_large"),
            ),
            (
                PluginError::OutputTooLarge {
                    plugin: plugin(),
                    role: Role::Router,
                    export: "plan",
                    bytes: 2,
                    cap_bytes: 1,
                }
                .into(),
                500,
                "server_error",
                Some("plugin_failed"),
            ),
        ];
        for (error, status, kind, code) in table {
            let rendered = error.render();
            assert_eq!(rendered.status.as_u16(), status, "{error:?}");
            assert_eq!(rendered.kind, kind, "{error:?}");
            assert_eq!(rendered.code.as_deref(), code, "{error:?}");
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
