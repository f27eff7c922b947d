//! Plugins and bindings through the admin API: upload, list, show, delete; bind a scope, roll it
//! back, run a canary in it, promote or abort the canary; list every binding with its live state.
//!
//! A scope is named by query parameters: `role` (router, translator, billing), `tenant` (absent
//! for the global binding) and `protocol` (translators only).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::AdminError;
use super::{AdminState, admin_body};
use crate::error::ApiError;
use crate::gateway::{BindingSpec, CanarySpec};
use crate::plugin::Role;
use crate::plugin::table::{BindingTable, Scope, Slot};
use crate::request::InvalidBody;
use crate::store::StoredPlugin;

/// Query of an upload.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UploadQuery {
    /// The name the plugin is known by.
    name: String,
}

/// Query naming a scope.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScopeQuery {
    /// `router`, `translator` or `billing`.
    role: String,
    /// The tenant; absent for the global binding.
    tenant: Option<String>,
    /// The protocol, for translators.
    protocol: Option<String>,
}

fn invalid(message: String, param: &str) -> ApiError {
    InvalidBody {
        message,
        param: Some(param.to_owned()),
    }
    .into()
}

/// Reads the scope and checks its tenant exists.
fn scope(
    state: &AdminState,
    query: Result<Query<ScopeQuery>, QueryRejection>,
) -> Result<Scope, ApiError> {
    let Query(query) = query.map_err(|rejection| {
        invalid(format!("invalid scope: {}", rejection.body_text()), "role")
    })?;
    let role = Role::parse(&query.role).ok_or_else(|| {
        invalid(
            format!(
                "`role` is `router`, `translator` or `billing`, not `{}`",
                query.role
            ),
            "role",
        )
    })?;
    match (role, &query.protocol) {
        (Role::Translator, None) => {
            return Err(invalid(
                "a translator binding names its `protocol`".to_owned(),
                "protocol",
            ));
        }
        (Role::Router | Role::Billing, Some(_)) => {
            return Err(invalid(
                format!("a {role} binding has no `protocol`"),
                "protocol",
            ));
        }
        _ => {}
    }
    if let Some(tenant) = &query.tenant
        && state.gateway.store.tenant(tenant)?.is_none()
    {
        return Err(AdminError::UnknownTenant {
            tenant: tenant.clone(),
        }
        .into());
    }
    Ok(Scope {
        tenant: query.tenant,
        role,
        protocol: query.protocol,
    })
}

/// `POST /admin/plugins?name=NAME` with the component as the body: 201 with what it is, or 200
/// when those exact bytes were uploaded before.
pub(super) async fn upload(
    State(state): State<AdminState>,
    query: Result<Query<UploadQuery>, QueryRejection>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AdminError::PluginTooLarge {
                max_bytes: state.gateway.max_upload_bytes(),
            }
            .into()
        } else {
            invalid(rejection.body_text(), "body")
        }
    })?;
    let Query(query) = query.map_err(|rejection| {
        invalid(
            format!("an upload names the plugin: {}", rejection.body_text()),
            "name",
        )
    })?;
    let (plugin, created) = state
        .gateway
        .upload_plugin(query.name, body.to_vec())
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(plugin_answer(&state, plugin)?)).into_response())
}

fn plugin_answer(state: &AdminState, plugin: StoredPlugin) -> Result<serde_json::Value, ApiError> {
    let bound_in = state.gateway.bound_in(&plugin.sha256)?;
    let mut answer = serde_json::to_value(plugin).unwrap_or_default();
    answer["bound_in"] = json!(bound_in);
    Ok(answer)
}

/// `GET /admin/plugins`: uploaded plugins, newest first, and the shipped ones.
pub(super) async fn list(State(state): State<AdminState>) -> Result<Response, ApiError> {
    let mut uploaded = state.gateway.store.plugins()?;
    uploaded.sort_by_key(|plugin| std::cmp::Reverse(plugin.uploaded_unix_ms));
    let data = uploaded
        .into_iter()
        .map(|plugin| plugin_answer(&state, plugin))
        .collect::<Result<Vec<_>, _>>()?;
    let shipped: Vec<_> = crate::plugin::shipped::SHIPPED
        .iter()
        .map(|plugin| json!({"name": plugin.name, "role": plugin.role.to_string()}))
        .collect();
    Ok(axum::Json(json!({"data": data, "shipped": shipped})).into_response())
}

/// `GET /admin/plugins/{sha256}`.
pub(super) async fn show(
    State(state): State<AdminState>,
    Path(sha256): Path<String>,
) -> Result<Response, ApiError> {
    let plugin = state
        .gateway
        .store
        .plugin(&sha256)?
        .ok_or(crate::store::StoreError::Missing {
            what: "plugin",
            name: sha256,
        })?;
    Ok(axum::Json(plugin_answer(&state, plugin)?).into_response())
}

/// `DELETE /admin/plugins/{sha256}`: refused (409) while a binding or canary uses it.
pub(super) async fn delete(
    State(state): State<AdminState>,
    Path(sha256): Path<String>,
) -> Result<Response, ApiError> {
    if !state.gateway.delete_plugin(&sha256)? {
        return Err(crate::store::StoreError::Missing {
            what: "plugin",
            name: sha256,
        }
        .into());
    }
    Ok(axum::Json(json!({"deleted": sha256})).into_response())
}

/// `GET /admin/bindings`: every stored binding with its live canary tally, and the configuration
/// file's defaults.
pub(super) async fn bindings(State(state): State<AdminState>) -> Result<Response, ApiError> {
    let crate::gateway::BindingsView {
        live: table,
        mut stored,
    } = state.gateway.bindings_view()?;
    stored.sort_by(|(a, _), (b, _)| a.cmp(b));
    let data: Vec<_> = stored
        .into_iter()
        .map(|(key, slot)| {
            let live = Scope::parse(&key).and_then(|scope| table.slot(&scope).cloned());
            slot_answer(&key, &slot, live.as_ref())
        })
        .collect();
    let mut defaults: Vec<_> = table
        .defaults()
        .map(|(scope, binding)| json!({"scope": scope.key(), "plugin": binding.plugin().to_string()}))
        .collect();
    defaults.sort_by_key(|entry| entry["scope"].as_str().unwrap_or_default().to_owned());
    Ok(axum::Json(json!({"data": data, "defaults": defaults})).into_response())
}

fn slot_answer(
    key: &str,
    slot: &crate::store::StoredBindingSlot,
    live: Option<&Slot>,
) -> serde_json::Value {
    let mut answer = json!({
        "scope": key,
        "current": slot.current,
        "history": slot.history,
        "canary": slot.canary,
        "canary_rolled_back": slot.canary_rolled_back,
        "live": live.is_some(),
    });
    if let Some(canary) = live.and_then(|live| live.canary.as_ref()) {
        let (calls, failures) = canary.stats.tally();
        answer["canary_tally"] = json!({"calls": calls, "failures": failures});
    }
    answer
}

fn slot_response(
    table: &BindingTable,
    scope: &Scope,
    slot: &crate::store::StoredBindingSlot,
) -> Response {
    axum::Json(slot_answer(&scope.key(), slot, table.slot(scope))).into_response()
}

/// `PUT /admin/bindings?role=&tenant=&protocol=` with a [`BindingSpec`].
pub(super) async fn bind(
    State(state): State<AdminState>,
    query: Result<Query<ScopeQuery>, QueryRejection>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let scope = scope(&state, query)?;
    let spec: BindingSpec = admin_body(&body)?;
    let slot = state.gateway.bind(&scope, &spec).await?;
    Ok(slot_response(&state.gateway.bindings(), &scope, &slot))
}

/// `POST /admin/bindings/rollback?role=&tenant=&protocol=`.
pub(super) async fn rollback(
    State(state): State<AdminState>,
    query: Result<Query<ScopeQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let scope = scope(&state, query)?;
    let slot = state.gateway.rollback(&scope).await?;
    Ok(slot_response(&state.gateway.bindings(), &scope, &slot))
}

/// `PUT /admin/bindings/canary?role=&tenant=&protocol=` with a [`CanarySpec`].
pub(super) async fn start_canary(
    State(state): State<AdminState>,
    query: Result<Query<ScopeQuery>, QueryRejection>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let scope = scope(&state, query)?;
    let spec: CanarySpec = admin_body(&body)?;
    let slot = state.gateway.start_canary(&scope, &spec).await?;
    Ok(slot_response(&state.gateway.bindings(), &scope, &slot))
}

/// `DELETE /admin/bindings/canary?role=&tenant=&protocol=`: the canary stops, the binding stays.
pub(super) async fn abort_canary(
    State(state): State<AdminState>,
    query: Result<Query<ScopeQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let scope = scope(&state, query)?;
    let slot = state.gateway.end_canary(&scope, None)?;
    Ok(slot_response(&state.gateway.bindings(), &scope, &slot))
}

/// `POST /admin/bindings/canary/promote?role=&tenant=&protocol=`: the canary serves everything.
pub(super) async fn promote_canary(
    State(state): State<AdminState>,
    query: Result<Query<ScopeQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let scope = scope(&state, query)?;
    let slot = state.gateway.promote_canary(&scope)?;
    Ok(slot_response(&state.gateway.bindings(), &scope, &slot))
}
