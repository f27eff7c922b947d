//! Listen: the HTTP surface. The connection loop, the axum router, the request id, the body cap,
//! the request span, and the handlers that turn HTTP into an [`Arrival`] and a [`Delivery`] back
//! into HTTP.
//!
//! In: HTTP requests. Out: OpenAI-shaped responses (Anthropic-shaped on `/v1/messages`), or an
//! [`ApiError`] rendered by `error.rs` in the endpoint's dialect. Next: `flow::run`, which
//! authenticates from the head's facts (under `admission`'s throttle) before it reads the body
//! (under its deadline).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use tracing::Span;

use crate::error::{ApiError, CountedRefusal, LoggedError};
use crate::flow::{self, Arrival, Asked, ClientStanding, Credentials, Delivery};
use crate::gateway::Gateway;
use crate::http::admin::AdminTokens;
use crate::http::admission::{
    BodyReadTimedOut, ClientAdmission, ClientConnection, Credential, TimedBody,
};
use crate::plugin::Operation;
use crate::plugin::translator::Endpoint;
use crate::request::InvalidBody;
use crate::stages::context::Dialect;
use crate::stages::inbound::ClientProtocol;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Client headers with this prefix become router tags (`x-tollgate-tier: batch` → `tier=batch`).
const TAG_PREFIX: &str = "x-tollgate-";
/// Anthropic's Messages API, spoken by the translator bound for the `anthropic` protocol.
const ANTHROPIC_MESSAGES: ClientProtocol = ClientProtocol {
    name: "anthropic",
    header_prefix: "anthropic-",
    dialect: Dialect::AnthropicMessages,
};

/// Serves `app` on one worker's listener until `shutdown` completes, then lets every open
/// connection finish what it holds (a stream runs to its end) before it returns.
///
/// HTTP/1.1 only, and hyper directly: `axum::serve` first reads 24 bytes to tell HTTP/2 from
/// HTTP/1.1, and hands them back to hyper, which then grew the connection's read buffer from 8 to
/// 16 KiB at its next read, for as long as the connection lived (a stream's, say).
///
/// Every connection is registered with `admission` as unauthenticated until a request on it
/// authenticates, and closed at once if it is the oldest such connection when the cap is passed.
pub async fn serve_listener(
    listener: std::net::TcpListener,
    app: Router,
    admission: Arc<ClientAdmission>,
    header_read_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    // Every connection holds a receiver: the stop reaches them all, and the sender sees when the
    // last has closed.
    let (stop, stopping) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                pause_after(error).await;
                continue;
            }
        };
        // Small SSE frames must leave at once: Nagle's algorithm would hold them for the peer's ACK.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::warn!(%error, "could not set TCP_NODELAY");
        }
        let client = admission.arrive(peer.ip());
        let service = {
            let (client, admission) = (client.clone(), admission.clone());
            tower::ServiceExt::map_request(
                app.clone(),
                move |request: axum::http::Request<hyper::body::Incoming>| {
                    let mut request = request.map(|body| TimedBody::new(body, &admission));
                    request.extensions_mut().insert(client.clone());
                    request
                },
            )
        };
        let connection = http.serve_connection(
            hyper_util::rt::TokioIo::new(tcp),
            hyper_util::service::TowerToHyperService::new(service),
        );
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                // Dropping the connection closes its socket: it never authenticated a request.
                () = client.evicted() => return,
                _ = stopping.changed() => {
                    // Ends the connection once its request in flight, if any, is answered.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = served {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    drop(stopping);
    stop.send_replace(());
    stop.closed().await;
    Ok(())
}

/// After a failed accept. A connection that failed before it was accepted is skipped; anything
/// else (out of file descriptors, most likely) is logged and waited out for a second, so the
/// loop does not spin while nothing can be accepted.
async fn pause_after(error: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    tracing::error!(%error, "accepting a connection failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The gateway's HTTP applications: the public one, and the admin one (the admin API and
/// `/metrics`) when `admin_apart` (`server.admin_listen`) puts it on a listener of its own;
/// otherwise the public one carries both.
pub fn apps(
    gateway: Arc<Gateway>,
    tokens: &AdminTokens,
    admin_apart: bool,
) -> (Router, Option<Router>) {
    let admin = Router::new()
        .nest(
            "/admin",
            crate::http::admin::routes(gateway.clone(), tokens),
        )
        .merge(crate::http::admin::metrics_routes(gateway.clone(), tokens));
    let public = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/v1/models", get(models))
        .with_state(gateway.clone());
    let probes = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(gateway.clone());
    let max_body = gateway.max_body_bytes;
    if admin_apart {
        let public = public.merge(probes.clone());
        let admin = admin.merge(probes);
        (served(public, max_body), Some(served(admin, max_body)))
    } else {
        (served(public.merge(probes).merge(admin), max_body), None)
    }
}

/// `routes` with the fallback, the body cap, the request id and the request span.
fn served(routes: Router, max_body: usize) -> Router {
    routes
        .fallback(unknown_path)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    let request_id = request
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or("");
                    tracing::info_span!(
                        "request",
                        request_id,
                        method = %request.method(),
                        path = request.uri().path(),
                        tenant = tracing::field::Empty,
                        model = tracing::field::Empty,
                    )
                })
                .on_request(())
                .on_response(|response: &Response, latency: Duration, _span: &Span| {
                    if response.extensions().get::<CountedRefusal>().is_some() {
                        // Counted by admission, logged per address and interval.
                        return;
                    }
                    let status = response.status().as_u16();
                    let latency_ms = latency.as_millis() as u64;
                    match response.extensions().get::<LoggedError>() {
                        Some(LoggedError(error)) if status >= 500 => {
                            tracing::error!(status, latency_ms, error, "request failed");
                        }
                        Some(LoggedError(error)) => {
                            tracing::info!(status, latency_ms, error, "request refused");
                        }
                        None => tracing::info!(status, latency_ms, "request answered"),
                    }
                })
                .on_failure(()),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, TimeOrderedRequestId))
}

/// What the flow takes: the head's facts, free of HTTP, and the body, read only when the flow
/// asks for it (after authentication).
fn arrival(gateway: &Gateway, request: Request, asked: fn(&HeaderMap) -> Asked) -> Arrival {
    let received_at = Instant::now();
    let (head, body) = request.into_parts();
    Arrival {
        request_id: header_str(&head.headers, REQUEST_ID.as_str())
            .unwrap_or_default()
            .to_owned(),
        received_at,
        credentials: credentials(&head),
        tags: tags(&head.headers),
        asked: asked(&head.headers),
        body: Box::pin(read_body(body, gateway.max_body_bytes)),
    }
}

/// The credential headers, and the connection the throttle counts them on.
fn credentials(head: &Parts) -> Credentials {
    let header = |name| header_str(&head.headers, name).map(str::to_owned);
    Credentials {
        authorization: header("authorization"),
        api_key: header("x-api-key"),
        client: head
            .extensions
            .get::<Arc<ClientConnection>>()
            .map(|client| client.clone() as Arc<dyn ClientStanding>),
    }
}

/// Failed API keys count against the connection's address.
impl ClientStanding for ClientConnection {
    fn refused(&self) -> Option<Duration> {
        self.failed(Credential::ApiKey)
    }

    fn authenticated(&self) {
        ClientConnection::authenticated(self);
    }
}

/// An endpoint of Anthropic's Messages API, with the client's `anthropic-*` headers.
fn anthropic(endpoint: Endpoint, headers: &HeaderMap) -> Asked {
    let protocol = ANTHROPIC_MESSAGES;
    let headers = headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with(protocol.header_prefix))
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect();
    Asked::Inbound {
        protocol,
        endpoint,
        headers,
    }
}

/// Reads `body` whole: a 413 past `max_bytes`, a 408 when it is late (see [`TimedBody`]).
async fn read_body(body: Body, max_bytes: usize) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let collected = http_body_util::Limited::new(body, max_bytes)
        .collect()
        .await
        .map_err(|error| {
            if error.is::<http_body_util::LengthLimitError>() {
                return ApiError::BodyTooLarge;
            }
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*error);
            while let Some(error) = cause {
                if let Some(timed_out) = error.downcast_ref::<BodyReadTimedOut>() {
                    return ApiError::BodyReadTimedOut(timed_out.clone());
                }
                cause = error.source();
            }
            ApiError::InvalidBody(InvalidBody {
                message: format!("The request body could not be read: {error}"),
                param: None,
            })
        })?;
    Ok(collected.to_bytes())
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

fn tags(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter_map(|(name, value)| {
            let tag = name.as_str().strip_prefix(TAG_PREFIX)?;
            Some((tag.to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect()
}

async fn chat_completions(
    State(gateway): State<Arc<Gateway>>,
    request: Request,
) -> Result<Response, ApiError> {
    let arrival = arrival(&gateway, request, |_| Asked::OpenAi(Operation::Chat));
    respond(gateway, arrival).await
}

async fn embeddings(
    State(gateway): State<Arc<Gateway>>,
    request: Request,
) -> Result<Response, ApiError> {
    let arrival = arrival(&gateway, request, |_| Asked::OpenAi(Operation::Embeddings));
    respond(gateway, arrival).await
}

/// `POST /v1/messages`: Anthropic's Messages API, answered and failed in its shape.
async fn messages(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let request_id = request.headers().get(REQUEST_ID).cloned();
    let arrival = arrival(&gateway, request, |headers| {
        anthropic(Endpoint::Messages, headers)
    });
    in_dialect(request_id, respond(gateway, arrival).await)
}

/// `POST /v1/messages/count_tokens`.
async fn count_tokens(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let request_id = request.headers().get(REQUEST_ID).cloned();
    let arrival = arrival(&gateway, request, |headers| {
        anthropic(Endpoint::CountTokens, headers)
    });
    let counted = flow::count_tokens(gateway, arrival).await;
    in_dialect(request_id, counted.map(json_response))
}

/// An Anthropic-endpoint response: errors in Anthropic's shape, the request id in `request-id`
/// as Anthropic's SDKs read it.
fn in_dialect(request_id: Option<HeaderValue>, result: Result<Response, ApiError>) -> Response {
    let mut response = result.unwrap_or_else(|error| error.response_in(ANTHROPIC_MESSAGES.dialect));
    if let Some(request_id) = request_id {
        response
            .headers_mut()
            .insert(HeaderName::from_static("request-id"), request_id);
    }
    response
}

fn json_response(body: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// Runs the flow and writes what it delivers.
async fn respond(gateway: Arc<Gateway>, arrival: Arrival) -> Result<Response, ApiError> {
    let (delivery, served) = flow::run(gateway, arrival).await?;
    let mut response = match delivery {
        Delivery::Json(body) => json_response(body),
        Delivery::Stream(receiver) => {
            let frames = futures::stream::unfold(receiver, |mut receiver| async move {
                let frame = receiver.recv().await?;
                Some((Ok::<_, Infallible>(frame), receiver))
            });
            (
                [
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/event-stream"),
                    ),
                    (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
                ],
                Body::from_stream(frames),
            )
                .into_response()
        }
    };
    let headers = response.headers_mut();
    if let Some(fallback) = served.degraded_to.as_deref()
        && let Ok(value) = HeaderValue::from_str(fallback)
    {
        headers.insert("x-tollgate-degraded", value);
    }
    for (name, value) in [
        ("x-tollgate-channel", served.channel),
        ("x-tollgate-model", served.model),
        ("x-tollgate-attempts", served.attempts.to_string()),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    Ok(response)
}

/// `GET /v1/models`: the public models of the active channels.
async fn models(
    State(gateway): State<Arc<Gateway>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (head, _) = request.into_parts();
    let caller = flow::authenticate(&gateway, &credentials(&head))?;
    let channels = gateway.channels();
    let names: std::collections::BTreeSet<&str> = channels
        .iter()
        .filter(|channel| channel.is_active())
        .flat_map(|channel| channel.config.models.keys().map(String::as_str))
        .filter(|model| {
            caller.allowed_models.is_empty() || caller.allowed_models.iter().any(|m| m == model)
        })
        .collect();
    let data: Vec<Value> = names
        .into_iter()
        .map(|name| json!({"id": name, "object": "model", "created": 0, "owned_by": "tollgate"}))
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

/// `GET /readyz`: the store answers and the plugins are loaded (they are, once serving starts).
async fn ready(State(gateway): State<Arc<Gateway>>) -> Result<&'static str, ApiError> {
    gateway.store.check()?;
    Ok("ready")
}

async fn unknown_path(method: Method, uri: Uri) -> ApiError {
    ApiError::UnknownPath {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

/// Request ids for requests that bring none: UUIDv7, which sort by the time they were made. The
/// ledger indexes records by request id, and random (v4) ids put every insert into a random
/// place of that index: its applier spent about 30 % more CPU, and the gateway's peak RSS under
/// load was 20 MiB higher.
#[derive(Clone, Copy)]
struct TimeOrderedRequestId;

impl MakeRequestId for TimeOrderedRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let id = uuid::Uuid::now_v7().to_string();
        HeaderValue::from_str(&id).ok().map(RequestId::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_request_ids_are_uuids_in_the_order_they_were_made() {
        let request = axum::http::Request::new(());
        let ids: Vec<uuid::Uuid> = (0..1_000)
            .map(|_| {
                let id = TimeOrderedRequestId
                    .make_request_id(&request)
                    .expect("an id");
                uuid::Uuid::parse_str(id.header_value().to_str().expect("ASCII")).expect("a UUID")
            })
            .collect();
        // The ledger's index takes them in this order; the strings sort as the UUIDs do.
        assert!(ids.iter().all(|id| id.get_version_num() == 7));
        assert!(
            ids.windows(2)
                .all(|pair| pair[0].to_string() < pair[1].to_string())
        );
    }
}
