//! The admin API under `/admin/`, off the hot path: reading the ledger and request traces, and
//! `/metrics`. Every call needs `Authorization: Bearer <token>` with the token from
//! `TOLLGATE_ADMIN_TOKEN` (`/metrics` also takes `server.metrics_token`); without that variable
//! the admin API refuses every call. With `server.admin_listen` these routes are served there
//! and nowhere else.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::http::admission::{ClientConnection, Credential};
use crate::store::UsageRecord;
use error::AdminError;

pub(crate) mod error;
mod plugins;

/// The bearer tokens the admin surfaces accept, as digests.
#[derive(Clone, Default)]
pub struct AdminTokens {
    admin_sha256: Option<[u8; 32]>,
    metrics_sha256: Option<[u8; 32]>,
}

impl AdminTokens {
    /// The admin token (`TOLLGATE_ADMIN_TOKEN`; none or empty: the admin API refuses every call)
    /// and the token that opens `/metrics` alone (`server.metrics_token`).
    pub fn new(admin: Option<&str>, metrics: Option<&str>) -> Self {
        let digest = |token: Option<&str>| {
            token
                .filter(|token| !token.is_empty())
                .map(|token| Sha256::digest(token.as_bytes()).into())
        };
        Self {
            admin_sha256: digest(admin),
            metrics_sha256: digest(metrics),
        }
    }
}

/// Admin state: the gateway and the expected tokens' digests.
#[derive(Clone)]
struct AdminState {
    gateway: Arc<Gateway>,
    tokens: AdminTokens,
}

/// The admin routes, to be nested under `/admin`.
pub fn routes(gateway: Arc<Gateway>, tokens: &AdminTokens) -> Router {
    let state = AdminState {
        gateway,
        tokens: tokens.clone(),
    };
    Router::new()
        .route("/usage", get(usage))
        .route("/usage.csv", get(usage_csv))
        .route("/usage/prune", axum::routing::post(prune_usage))
        .route("/requests/{request_id}", get(request_trace))
        .route("/channels", get(channels).post(create_channel))
        .route(
            "/channels/{channel}",
            axum::routing::put(update_channel).delete(delete_channel),
        )
        .route("/tenants", get(list_tenants).post(create_tenant))
        .route("/tenants/{tenant}", get(get_tenant))
        .route(
            "/tenants/{tenant}/disable",
            axum::routing::post(disable_tenant),
        )
        .route(
            "/tenants/{tenant}/enable",
            axum::routing::post(enable_tenant),
        )
        .route("/tenants/{tenant}/keys", get(list_keys).post(create_key))
        .route("/keys/{key_id}", axum::routing::patch(update_key))
        .route("/keys/{key_id}/revoke", axum::routing::post(revoke_key))
        .route("/tenants/{tenant}/balance", get(balance))
        .route("/tenants/{tenant}/top-ups", axum::routing::post(top_up))
        .route("/reconcile", get(reconcile))
        .route(
            "/plugins",
            get(plugins::list)
                .post(plugins::upload)
                .layer(axum::extract::DefaultBodyLimit::max(
                    state.gateway.max_upload_bytes(),
                )),
        )
        .route(
            "/plugins/{sha256}",
            get(plugins::show).delete(plugins::delete),
        )
        .route("/bindings", get(plugins::bindings).put(plugins::bind))
        .route("/bindings/rollback", axum::routing::post(plugins::rollback))
        .route(
            "/bindings/canary",
            axum::routing::put(plugins::start_canary).delete(plugins::abort_canary),
        )
        .route(
            "/bindings/canary/promote",
            axum::routing::post(plugins::promote_canary),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_admin,
        ))
        .with_state(state)
}

/// `GET /metrics`, whose labels name tenants: it needs the admin token or the metrics token.
pub fn metrics_routes(gateway: Arc<Gateway>, tokens: &AdminTokens) -> Router {
    let state = AdminState {
        gateway,
        tokens: tokens.clone(),
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_metrics_reader,
        ))
        .with_state(state)
}

/// Lets a request through only with the admin token. One layer guards every admin route.
async fn require_admin(
    State(state): State<AdminState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    let accepted = [state.tokens.admin_sha256];
    admit(&accepted, request, next).await
}

/// Lets a request through with the admin token or the metrics token.
async fn require_metrics_reader(
    State(state): State<AdminState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    let accepted = [state.tokens.admin_sha256, state.tokens.metrics_sha256];
    admit(&accepted, request, next).await
}

/// Runs `next` if the request's bearer token is one of `accepted`, comparing digests in
/// constant time. A refusal counts against the client's address (429 once it is throttled).
async fn admit(
    accepted: &[Option<[u8; 32]>],
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    let presented: Option<[u8; 32]> = request
        .headers()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(|token| Sha256::digest(token.as_bytes()).into());
    let connection = request.extensions().get::<Arc<ClientConnection>>();
    let admitted = presented.is_some_and(|presented| {
        accepted.iter().flatten().fold(false, |found, expected| {
            let difference = expected
                .iter()
                .zip(presented.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            found | (difference == 0)
        })
    });
    if !admitted {
        let throttled = connection.and_then(|client| client.failed(Credential::AdminToken));
        let refused = if accepted.iter().all(Option::is_none) {
            AdminError::Closed
        } else {
            AdminError::Unauthorized
        };
        return Err(
            throttled.map_or(refused.into(), |retry_after| ApiError::AuthThrottled {
                retry_after,
            }),
        );
    }
    if let Some(connection) = connection {
        connection.authenticated();
    }
    Ok(next.run(request).await)
}

/// `GET /metrics`: Prometheus/OpenMetrics text.
async fn metrics(State(state): State<AdminState>) -> Response {
    let gateway = &state.gateway;
    let now = std::time::Instant::now();
    for channel in gateway.channels().iter() {
        let circuit = channel.health.snapshot(now).circuit;
        gateway.metrics.set_circuit(&channel.config.name, circuit);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        )],
        gateway.metrics.render(),
    )
        .into_response()
}

/// Filters of a usage query; every one optional. Times are milliseconds since the Unix epoch,
/// `from_ms` inclusive, `to_ms` exclusive.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    tenant: Option<String>,
    key: Option<String>,
    model: Option<String>,
    channel: Option<String>,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
    /// JSON answers stop after this many records (default 1,000); CSV exports have no cap.
    limit: Option<usize>,
}

impl UsageQuery {
    fn matches(&self, record: &UsageRecord) -> bool {
        let wanted =
            |filter: &Option<String>, value: &str| filter.as_deref().is_none_or(|f| f == value);
        wanted(&self.tenant, &record.tenant)
            && wanted(&self.key, &record.key_id)
            && wanted(&self.model, &record.model_asked)
            && wanted(&self.channel, &record.channel)
    }

    fn records(&self, store: &dyn crate::store::Store) -> crate::store::UsageRecords {
        store.usage_between(self.from_ms.unwrap_or(0), self.to_ms.unwrap_or(u64::MAX))
    }
}

/// A malformed query string gets an OpenAI-shaped 400 naming the problem.
fn usage_query(query: Result<Query<UsageQuery>, QueryRejection>) -> Result<UsageQuery, ApiError> {
    query.map(|Query(query)| query).map_err(|rejection| {
        crate::request::InvalidBody {
            message: format!("invalid usage query: {}", rejection.body_text()),
            param: None,
        }
        .into()
    })
}

/// `GET /admin/usage?tenant=&key=&model=&channel=&from_ms=&to_ms=&limit=`: ledger records in time
/// order.
async fn usage(
    State(state): State<AdminState>,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = usage_query(query)?;
    let mut records = Vec::new();
    for record in query.records(state.gateway.store.as_ref()) {
        let record = record?;
        if query.matches(&record) {
            records.push(record);
            if records.len() >= query.limit.unwrap_or(1_000) {
                break;
            }
        }
    }
    Ok(axum::Json(serde_json::json!({ "object": "list", "data": records })).into_response())
}

/// The CSV columns of a usage export.
const CSV_HEADER: &str = "unix_ms,request_id,tenant,key_id,operation,model_asked,model_served,\
channel,stream,status,error_class,input_tokens,cache_read_tokens,cache_write_tokens,output_tokens,\
reasoning_tokens,estimated,cost_picos,latency_ms,attempts,degraded_to,model_mismatch,protocol_in,\
protocol_out\n";

/// A CSV field, quoted when it holds a separator, a quote or a line break.
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

fn csv_row(record: &UsageRecord) -> String {
    let usage = &record.usage;
    let fields = [
        record.unix_ms.to_string(),
        csv_field(&record.request_id),
        csv_field(&record.tenant),
        csv_field(&record.key_id),
        csv_field(&record.operation),
        csv_field(&record.model_asked),
        csv_field(&record.model_served),
        csv_field(&record.channel),
        record.stream.to_string(),
        record.status.to_string(),
        csv_field(record.error_class.as_deref().unwrap_or("")),
        usage.input_tokens.to_string(),
        usage.cache_read_tokens.to_string(),
        usage.cache_write_tokens.to_string(),
        usage.output_tokens.to_string(),
        usage.reasoning_tokens.to_string(),
        usage.estimated.to_string(),
        record
            .cost_picos
            .map(|cost| cost.to_string())
            .unwrap_or_default(),
        record.latency_ms.to_string(),
        record.attempts.len().to_string(),
        csv_field(record.degraded_to.as_deref().unwrap_or("")),
        record.model_mismatch.to_string(),
        csv_field(&record.protocol_in),
        csv_field(record.protocol_out.as_deref().unwrap_or("")),
    ];
    let mut row = fields.join(",");
    row.push('\n');
    row
}

/// `GET /admin/usage.csv` with the filters of `/admin/usage`: streamed row by row from the store,
/// never built in memory.
async fn usage_csv(
    State(state): State<AdminState>,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = usage_query(query)?;
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(16);
    let store = state.gateway.store.clone();
    tokio::task::spawn_blocking(move || {
        if sender
            .blocking_send(Ok(bytes::Bytes::from_static(CSV_HEADER.as_bytes())))
            .is_err()
        {
            return;
        }
        for record in query.records(store.as_ref()) {
            let chunk = match record {
                Ok(record) if query.matches(&record) => Ok(bytes::Bytes::from(csv_row(&record))),
                Ok(_) => continue,
                // Ends the body with an error: the client sees a broken export, not a short one.
                Err(error) => Err(std::io::Error::other(error.to_string())),
            };
            let failed = chunk.is_err();
            if sender.blocking_send(chunk).is_err() || failed {
                return;
            }
        }
    });
    let rows = futures::stream::unfold(receiver, |mut receiver| async move {
        let chunk = receiver.recv().await?;
        Some((chunk, receiver))
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8")],
        axum::body::Body::from_stream(rows),
    )
        .into_response())
}

/// `GET /admin/requests/{id}`: the usage record and attempts of one request.
async fn request_trace(
    State(state): State<AdminState>,
    Path(request_id): Path<String>,
) -> Result<Response, ApiError> {
    let record = state
        .gateway
        .store
        .usage_by_request(&request_id)?
        .ok_or(AdminError::UnknownRequest { request_id })?;
    Ok(axum::Json(record).into_response())
}

/// The query of `GET /admin/channels`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelsQuery {
    /// Whose router orders `try_order` (default: the global binding's).
    tenant: Option<String>,
}

/// `GET /admin/channels[?tenant=]`: every channel's health, per model too, and its keys' state (by
/// the name of their environment variable; never a secret); and `try_order`, the order a request
/// for each public model would try them now.
async fn channels(
    State(state): State<AdminState>,
    query: Result<Query<ChannelsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|rejection| crate::request::InvalidBody {
        message: format!("invalid channels query: {}", rejection.body_text()),
        param: None,
    })?;
    if let Some(tenant) = &query.tenant
        && state.gateway.store.tenant(tenant)?.is_none()
    {
        return Err(AdminError::UnknownTenant {
            tenant: tenant.clone(),
        }
        .into());
    }
    let try_order = try_order(&state.gateway, query.tenant.as_deref()).await?;
    let now = std::time::Instant::now();
    let health = |snapshot: crate::health::HealthSnapshot| {
        serde_json::json!({
            "circuit": match snapshot.circuit {
                crate::plugin::router::Circuit::Closed => "closed",
                crate::plugin::router::Circuit::Open => "open",
                crate::plugin::router::Circuit::HalfOpen => "half_open",
            },
            "latency_ewma_ms": snapshot.latency_ewma_ms,
            "ttfb_ewma_ms": snapshot.ttfb_ewma_ms,
            "error_rate_permille": snapshot.error_rate_permille,
            "in_flight": snapshot.in_flight,
        })
    };
    let channels: Vec<serde_json::Value> = state
        .gateway
        .channels()
        .iter()
        .map(|channel| {
            let models: serde_json::Map<String, serde_json::Value> = channel
                .model_health
                .iter()
                .map(|(model, model_health)| (model.clone(), health(model_health.snapshot(now))))
                .collect();
            let keys: Vec<serde_json::Value> =
                channel.keys.iter().map(|key| key.report(now)).collect();
            let source = if state.gateway.is_config_channel(&channel.config.name) {
                "config"
            } else {
                "api"
            };
            serde_json::json!({
                "name": channel.config.name,
                "source": source,
                "protocol": channel.config.protocol,
                "base_url": channel.config.base_url,
                "priority": channel.config.priority,
                "weight": channel.config.weight,
                "active": channel.is_active(),
                "health": health(channel.health.snapshot(now)),
                "models": models,
                "keys": keys,
            })
        })
        .collect();
    Ok(axum::Json(serde_json::json!({
        "object": "list",
        "data": channels,
        "try_order": try_order,
    }))
    .into_response())
}

/// What the router bound for `tenant` (or globally) plans for a plain chat request of each public
/// model the active channels serve: channel names in the order a request tries them, or the
/// router's refusal. The call is a real one in the sandbox, but counts toward no canary.
async fn try_order(gateway: &Gateway, tenant: Option<&str>) -> Result<serde_json::Value, ApiError> {
    use crate::plugin::Operation;
    use crate::plugin::router::{RequestFacts, RouteError};
    let resolved = gateway.bindings().require(
        tenant.unwrap_or_default(),
        crate::plugin::Role::Router,
        None,
    )?;
    let channels = gateway.channels();
    let models: std::collections::BTreeSet<&str> = channels.models().collect();
    let mut planned = serde_json::Map::new();
    for model in models {
        let candidates = crate::stages::route::candidates(&channels, model);
        if candidates.is_empty() {
            continue;
        }
        let facts = RequestFacts {
            request_id: "try-order".to_owned(),
            tenant: tenant.unwrap_or_default().to_owned(),
            key_id: String::new(),
            operation: Operation::Chat,
            model: model.to_owned(),
            stream: false,
            estimated_input_tokens: 0,
            max_output_tokens: None,
            tags: Vec::new(),
        };
        let order = match resolved.binding.plan(&facts, &candidates).await {
            Ok(Ok(attempts)) => serde_json::json!({
                "channels": attempts.iter().map(|attempt| &attempt.channel).collect::<Vec<_>>(),
            }),
            Ok(Err(RouteError::NoRoute(message) | RouteError::Refused(message))) => {
                serde_json::json!({ "refused": message })
            }
            Err(error) => serde_json::json!({ "error": error.to_string() }),
        };
        planned.insert(model.to_owned(), order);
    }
    Ok(serde_json::json!({
        "router": resolved.binding.plugin().to_string(),
        "canary": resolved.canary.is_some(),
        "models": planned,
    }))
}

/// Picos per micro-unit: top-ups and balances are shown in micro-units, kept in picos.
const PICOS_PER_MICRO: i128 = 1_000_000;

/// `GET /admin/tenants/{tenant}/balance`.
async fn balance(
    State(state): State<AdminState>,
    Path(tenant): Path<String>,
) -> Result<Response, ApiError> {
    let store = &state.gateway.store;
    if store.tenant(&tenant)?.is_none() {
        return Err(AdminError::UnknownTenant { tenant }.into());
    }
    let balance = store.balance_picos(&tenant)?;
    let available = store.available_picos(&tenant)?;
    Ok(axum::Json(serde_json::json!({
        "tenant": tenant,
        "balance_picos": balance.to_string(),
        "available_picos": available.to_string(),
        "balance_micros": balance.div_euclid(PICOS_PER_MICRO).to_string(),
    }))
    .into_response())
}

/// The body of a top-up.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TopUpBody {
    /// Micro-units to credit (negative corrects a mistake).
    amount_micros: i64,
    /// Why; recorded with the top-up.
    reason: String,
}

/// `POST /admin/tenants/{tenant}/top-ups` with `{"amount_micros": …, "reason": "…"}`.
async fn top_up(
    State(state): State<AdminState>,
    Path(tenant): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: TopUpBody =
        serde_json::from_slice(&body).map_err(|error| crate::request::InvalidBody {
            message: format!("invalid top-up: {error}"),
            param: None,
        })?;
    if body.reason.trim().is_empty() {
        return Err(crate::request::InvalidBody {
            message: "a top-up needs a reason".to_owned(),
            param: Some("reason".to_owned()),
        }
        .into());
    }
    let store = &state.gateway.store;
    if store.tenant(&tenant)?.is_none() {
        return Err(AdminError::UnknownTenant { tenant }.into());
    }
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64);
    let balance = store.top_up(&crate::store::TopUp {
        tenant: tenant.clone(),
        amount_picos: i128::from(body.amount_micros) * PICOS_PER_MICRO,
        reason: body.reason,
        unix_ms,
    })?;
    Ok(axum::Json(serde_json::json!({
        "tenant": tenant,
        "balance_picos": balance.to_string(),
    }))
    .into_response())
}

/// `GET /admin/reconcile`: every tenant's books; `balanced` is true when no balance differs from
/// its top-ups minus its charges, no record is unpriced and no balance is below its floor (which
/// the tenant's billing plugin knows: `bill::below_floor`).
async fn reconcile(State(state): State<AdminState>) -> Result<Response, ApiError> {
    let books = state.gateway.store.reconcile()?;
    let models: Vec<String> = state
        .gateway
        .channels()
        .iter()
        .flat_map(|channel| channel.config.models.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut balanced = true;
    let mut tenants = Vec::with_capacity(books.len());
    for book in &books {
        let below_floor = crate::stages::bill::below_floor(
            &state.gateway.bindings(),
            &book.tenant,
            book.balance_picos,
            &models,
        )
        .await?;
        balanced &= book.difference_picos == 0 && book.unpriced_records == 0;
        balanced &= below_floor.is_none();
        tenants.push(serde_json::json!({
            "tenant": book.tenant,
            "balance_picos": book.balance_picos.to_string(),
            "top_ups_picos": book.top_ups_picos.to_string(),
            "charges_picos": book.charges_picos.to_string(),
            "difference_picos": book.difference_picos.to_string(),
            "unpriced_records": book.unpriced_records,
            "written_off_picos": book.written_off_picos.to_string(),
            "below_floor": below_floor,
        }));
    }
    Ok(axum::Json(serde_json::json!({ "balanced": balanced, "tenants": tenants })).into_response())
}

/// Parses an admin JSON body, answering 400 with the parser's message otherwise.
fn admin_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| {
        crate::request::InvalidBody {
            message: format!("invalid JSON body: {error}"),
            param: None,
        }
        .into()
    })
}

/// The body of a tenant creation.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    /// Unique name.
    name: String,
    /// Requests in flight at once, at most.
    #[serde(default)]
    max_concurrency: Option<u32>,
}

/// `POST /admin/tenants` with `{"name": …, "max_concurrency": …}`.
async fn create_tenant(
    State(state): State<AdminState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let new: NewTenant = admin_body(&body)?;
    if new.name.trim().is_empty() || new.name.contains('/') {
        return Err(crate::request::InvalidBody {
            message: "a tenant name must be non-empty and contain no `/`".to_owned(),
            param: Some("name".to_owned()),
        }
        .into());
    }
    let tenant = crate::store::Tenant {
        name: new.name,
        created_unix_ms: crate::store::now_unix_ms(),
        disabled: false,
        max_concurrency: new.max_concurrency,
    };
    state.gateway.store.create_tenant(&tenant)?;
    Ok((axum::http::StatusCode::CREATED, axum::Json(tenant)).into_response())
}

/// `GET /admin/tenants`.
async fn list_tenants(State(state): State<AdminState>) -> Result<Response, ApiError> {
    let tenants = state.gateway.store.tenants()?;
    Ok(axum::Json(serde_json::json!({ "object": "list", "data": tenants })).into_response())
}

/// `GET /admin/tenants/{tenant}`.
async fn get_tenant(
    State(state): State<AdminState>,
    Path(tenant): Path<String>,
) -> Result<Response, ApiError> {
    let found = state
        .gateway
        .store
        .tenant(&tenant)?
        .ok_or(AdminError::UnknownTenant { tenant })?;
    Ok(axum::Json(found).into_response())
}

/// `POST /admin/tenants/{tenant}/disable`: its keys are refused from now on.
async fn disable_tenant(
    State(state): State<AdminState>,
    Path(tenant): Path<String>,
) -> Result<Response, ApiError> {
    set_tenant_disabled(&state, tenant, true)
}

/// `POST /admin/tenants/{tenant}/enable`: its keys are accepted again (those not revoked).
async fn enable_tenant(
    State(state): State<AdminState>,
    Path(tenant): Path<String>,
) -> Result<Response, ApiError> {
    set_tenant_disabled(&state, tenant, false)
}

fn set_tenant_disabled(
    state: &AdminState,
    tenant: String,
    disabled: bool,
) -> Result<Response, ApiError> {
    if !state.gateway.store.set_tenant_disabled(&tenant, disabled)? {
        return Err(AdminError::UnknownTenant { tenant }.into());
    }
    Ok(axum::Json(serde_json::json!({ "tenant": tenant, "disabled": disabled })).into_response())
}

/// `POST /admin/tenants/{tenant}/keys` with the key's terms; answers the secret, once.
async fn create_key(
    State(state): State<AdminState>,
    Path(tenant): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let terms: crate::stages::auth::KeyTerms = if body.is_empty() {
        crate::stages::auth::KeyTerms::default()
    } else {
        admin_body(&body)?
    };
    let store = state.gateway.store.as_ref();
    if store.tenant(&tenant)?.is_none() {
        return Err(AdminError::UnknownTenant { tenant }.into());
    }
    let (key, secret) =
        crate::stages::auth::issue_key(store, &tenant, terms, crate::store::now_unix_ms())?;
    Ok((
        axum::http::StatusCode::CREATED,
        axum::Json(serde_json::json!({ "key": key, "secret": secret })),
    )
        .into_response())
}

/// `GET /admin/tenants/{tenant}/keys`: metadata and prefixes only, never a secret.
async fn list_keys(
    State(state): State<AdminState>,
    Path(tenant): Path<String>,
) -> Result<Response, ApiError> {
    let store = &state.gateway.store;
    if store.tenant(&tenant)?.is_none() {
        return Err(AdminError::UnknownTenant { tenant }.into());
    }
    let keys = store.keys_of(&tenant)?;
    Ok(axum::Json(serde_json::json!({ "object": "list", "data": keys })).into_response())
}

/// A change of a key's terms: any subset of the creation fields; `null` clears one (no expiry, every
/// model, no limit).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyChange {
    #[serde(default, deserialize_with = "present")]
    expires_unix_ms: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    allowed_models: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "present")]
    rpm: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    tpm: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    daily_spend_cap_micros: Option<Option<u64>>,
}

/// A field that is there, `null` or not: absent fields stay `None` by `default`.
fn present<'de, T, D>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    serde::Deserialize::deserialize(deserializer).map(Some)
}

impl KeyChange {
    fn apply(&self, key: &mut crate::store::ApiKey) {
        if let Some(expires) = self.expires_unix_ms {
            key.expires_unix_ms = expires;
        }
        if let Some(models) = &self.allowed_models {
            key.allowed_models = models.clone().unwrap_or_default();
        }
        if let Some(rpm) = self.rpm {
            key.rpm = rpm;
        }
        if let Some(tpm) = self.tpm {
            key.tpm = tpm;
        }
        if let Some(cap) = self.daily_spend_cap_micros {
            key.daily_spend_cap_micros = cap;
        }
    }
}

/// `PATCH /admin/keys/{key_id}` with a [`KeyChange`]: in force for the key's next request.
async fn update_key(
    State(state): State<AdminState>,
    Path(key_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let change: KeyChange = admin_body(&body)?;
    let updated = state
        .gateway
        .store
        .update_key(&key_id, &mut |key| change.apply(key))?;
    let Some(key) = updated else {
        return Err(AdminError::UnknownKey { key_id }.into());
    };
    Ok(axum::Json(serde_json::json!({ "key": key })).into_response())
}

/// `POST /admin/keys/{key_id}/revoke`.
async fn revoke_key(
    State(state): State<AdminState>,
    Path(key_id): Path<String>,
) -> Result<Response, ApiError> {
    if !state.gateway.store.revoke_key(&key_id)? {
        return Err(AdminError::UnknownKey { key_id }.into());
    }
    Ok(axum::Json(serde_json::json!({ "key": key_id, "revoked": true })).into_response())
}

/// The body of a prune.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PruneBody {
    /// Records that arrived before this time (milliseconds since the Unix epoch) are removed.
    before_ms: u64,
}

/// `POST /admin/usage/prune` with `{"before_ms": …}`: removes old usage records; their charges stay
/// in the books, so reconcile still balances.
async fn prune_usage(
    State(state): State<AdminState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let prune: PruneBody = admin_body(&body)?;
    let store = state.gateway.store.clone();
    let pruned = tokio::task::spawn_blocking(move || store.prune_usage(prune.before_ms))
        .await
        .map_err(|error| ApiError::Store(crate::store::StoreError::Backend(error.to_string())))??;
    Ok(axum::Json(serde_json::json!({ "pruned": pruned })).into_response())
}

/// A channel body: the fields of a `[[channels]]` table plus `api_keys`, the secrets (sealed
/// before they are stored, never answered back).
fn channel_body(
    body: &[u8],
) -> Result<(crate::config::ChannelConfig, Option<Vec<String>>), ApiError> {
    let invalid = |message: String, param: Option<&str>| -> ApiError {
        crate::request::InvalidBody {
            message,
            param: param.map(str::to_owned),
        }
        .into()
    };
    let mut value: serde_json::Value = admin_body(body)?;
    let api_keys = match value
        .as_object_mut()
        .and_then(|fields| fields.remove("api_keys"))
    {
        None => None,
        Some(keys) => Some(serde_json::from_value::<Vec<String>>(keys).map_err(|_| {
            invalid(
                "`api_keys` must be an array of strings".to_owned(),
                Some("api_keys"),
            )
        })?),
    };
    let config: crate::config::ChannelConfig = serde_json::from_value(value)
        .map_err(|error| invalid(format!("invalid channel: {error}"), None))?;
    if config.name.trim().is_empty() || config.name.contains('/') {
        return Err(invalid(
            "a channel name must be non-empty and contain no `/`".to_owned(),
            Some("name"),
        ));
    }
    if !config.api_key_env.is_empty() {
        return Err(invalid(
            "channels created through the API take their secrets in `api_keys`; `api_key_env` is for the configuration file".to_owned(),
            Some("api_key_env"),
        ));
    }
    let is_http = config.base_url.starts_with("http://") || config.base_url.starts_with("https://");
    if !is_http || reqwest::Url::parse(&config.base_url).is_err() {
        return Err(invalid(
            "`base_url` must be an http(s) URL".to_owned(),
            Some("base_url"),
        ));
    }
    if let Some(path) = &config.ca_file
        && let Err(error) = crate::channel::trusted_roots(&config.name, path)
    {
        return Err(invalid(error.to_string(), Some("ca_file")));
    }
    Ok((config, api_keys))
}

/// Seals the keys and stores the channel, then swaps the live channel set.
fn store_channel(
    state: &AdminState,
    config: crate::config::ChannelConfig,
    sealed_keys: Vec<String>,
) -> Result<(), ApiError> {
    let gateway = &state.gateway;
    if !gateway
        .bindings()
        .protocols()
        .any(|protocol| protocol == config.protocol)
    {
        return Err(crate::request::InvalidBody {
            message: format!(
                "no translator plugin is bound for the protocol `{}`",
                config.protocol
            ),
            param: Some("protocol".to_owned()),
        }
        .into());
    }
    gateway
        .store
        .put_api_channel(&crate::store::StoredChannel {
            config,
            sealed_keys,
        })?;
    gateway
        .reload_api_channels()
        .map_err(|error| AdminError::ChannelReload(Box::new(error)).into())
}

fn seal_keys(state: &AdminState, keys: &[String]) -> Result<Vec<String>, ApiError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let sealer = state
        .gateway
        .sealer
        .as_ref()
        .ok_or_else(|| crate::request::InvalidBody {
            message:
                "storing upstream keys needs TOLLGATE_MASTER_KEY (64 hex digits) on the gateway"
                    .to_owned(),
            param: Some("api_keys".to_owned()),
        })?;
    Ok(keys.iter().map(|key| sealer.seal(key)).collect())
}

fn channel_answer(
    config: &crate::config::ChannelConfig,
    keys: usize,
    status: axum::http::StatusCode,
) -> Response {
    let mut shown = serde_json::to_value(config).unwrap_or_default();
    if let Some(fields) = shown.as_object_mut() {
        fields.remove("api_key_env");
        fields.insert(
            "api_keys".to_owned(),
            serde_json::json!(format!("{keys} sealed")),
        );
    }
    (status, axum::Json(shown)).into_response()
}

/// `POST /admin/channels`: creates a channel beside the configuration file's.
async fn create_channel(
    State(state): State<AdminState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let (config, keys) = channel_body(&body)?;
    let exists = state
        .gateway
        .channels()
        .iter()
        .any(|channel| channel.config.name == config.name);
    if exists {
        return Err(crate::store::StoreError::Exists {
            what: "channel",
            name: config.name,
        }
        .into());
    }
    let sealed = seal_keys(&state, &keys.unwrap_or_default())?;
    let count = sealed.len();
    store_channel(&state, config.clone(), sealed)?;
    Ok(channel_answer(
        &config,
        count,
        axum::http::StatusCode::CREATED,
    ))
}

/// `PUT /admin/channels/{channel}`: replaces an API channel; without `api_keys` its keys stay.
async fn update_channel(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    if state.gateway.is_config_channel(&name) {
        return Err(AdminError::ConfigChannel { name }.into());
    }
    let (config, keys) = channel_body(&body)?;
    if config.name != name {
        return Err(crate::request::InvalidBody {
            message: format!("the body names `{}`, the path `{name}`", config.name),
            param: Some("name".to_owned()),
        }
        .into());
    }
    let Some(stored) = state
        .gateway
        .store
        .api_channels()?
        .into_iter()
        .find(|channel| channel.config.name == name)
    else {
        return Err(AdminError::UnknownChannel { name }.into());
    };
    let sealed = match keys {
        Some(keys) => seal_keys(&state, &keys)?,
        None => stored.sealed_keys,
    };
    let count = sealed.len();
    store_channel(&state, config.clone(), sealed)?;
    Ok(channel_answer(&config, count, axum::http::StatusCode::OK))
}

/// `DELETE /admin/channels/{channel}`: removes an API channel; requests already routed to it finish.
async fn delete_channel(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    if state.gateway.is_config_channel(&name) {
        return Err(AdminError::ConfigChannel { name }.into());
    }
    if !state.gateway.store.delete_api_channel(&name)? {
        return Err(AdminError::UnknownChannel { name }.into());
    }
    state
        .gateway
        .reload_api_channels()
        .map_err(|error| AdminError::ChannelReload(Box::new(error)))?;
    Ok(axum::Json(serde_json::json!({ "channel": name, "deleted": true })).into_response())
}
