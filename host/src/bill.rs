//! Bill: the tenant's billing plugin authorizes a request before the upstream call and prices it
//! after. The plugin only computes amounts; record moves the money.
//!
//! In: the [`RequestContext`] (and, for `charge`, the final usage). Out: a hold amount, or a
//! [`BillingError`] (`insufficient_quota` denials); after the call a [`Priced`] result, which is
//! never an error: a pricing failure leaves the record unpriced for reconciliation. Next: record.

use crate::flow::RequestContext;
use crate::gateway::Gateway;
use crate::plugin::PluginError;
use crate::plugin::billing::{AuthorizeRequest, BillingDenial, CallOutcome, ChargeRequest, Price};
use crate::plugin::table::Called;
use crate::plugin::translator::Usage;
use crate::store::StoreError;

/// Why a request may not go ahead.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// The balance does not cover the request (429 `insufficient_quota`).
    #[error("{0}")]
    InsufficientBalance(String),
    /// A budget rule refuses the request (429 `insufficient_quota`).
    #[error("{0}")]
    BudgetExceeded(String),
    /// The billing plugin has no price for the model (404 `model_not_found`).
    #[error("{0}")]
    UnpricedModel(String),
    /// The billing plugin failed.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The balance could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The balance kept changing under concurrent requests; the client may retry.
    #[error("the balance is changing too fast to place a hold; retry")]
    Contended,
}

/// The result of pricing a finished call.
#[derive(Debug, Default)]
pub struct Priced {
    /// The price, or `None` when the billing plugin could not price the call.
    pub price: Option<Price>,
    /// Why it could not, for the record.
    pub failure: Option<String>,
    /// The plugin that priced it, when it differs from the one that authorized (a fail-open).
    pub trace: Option<String>,
}

/// How often authorization is retried when concurrent requests keep changing the balance between
/// the plugin's decision and the hold.
const HOLD_ATTEMPTS: usize = 64;

/// Asks the billing plugin whether the request may go ahead and places its hold; returns the
/// hold's id. The hold is placed only if the available balance is still the one the plugin decided
/// on, so concurrent requests can never overdraw it together.
pub async fn authorize(
    gateway: &Gateway,
    context: &mut RequestContext,
) -> Result<String, BillingError> {
    let tenant = &context.caller.tenant;
    if let Some(cap_micros) = context.caller.daily_spend_cap_micros {
        let today = context.received_unix_ms / crate::store::MILLIS_PER_DAY;
        let spent = gateway
            .store
            .key_spend_picos(&context.caller.key_id, today)?;
        // Checked against what was charged so far: requests in flight may still pass the cap by
        // their own cost.
        if spent >= i128::from(cap_micros) * 1_000_000 {
            return Err(BillingError::BudgetExceeded(
                "This key reached its daily spend cap; it resets at midnight UTC.".to_owned(),
            ));
        }
    }
    let hold_id = uuid::Uuid::new_v4().to_string();
    for round in 0..HOLD_ATTEMPTS {
        let available = gateway.store.available_picos(tenant)?;
        let called = decide(context, available).await?;
        if round == 0 {
            context.plugins.push(called.trace);
        }
        let amount = called.value?;
        if gateway
            .store
            .place_hold(tenant, &hold_id, amount, available)?
        {
            return Ok(hold_id);
        }
        tokio::task::yield_now().await;
    }
    Err(BillingError::Contended)
}

/// One authorization decision of the plugin, on the given available balance. The outer error is
/// the plugin's failure, the inner one its refusal.
async fn decide(
    context: &RequestContext,
    available: i128,
) -> Result<Called<Result<u64, BillingError>>, BillingError> {
    let balance = available;
    let request = AuthorizeRequest {
        request_id: context.request_id.clone(),
        tenant: context.caller.tenant.clone(),
        key_id: context.caller.key_id.clone(),
        operation: context.request.operation,
        model: context.request.model.clone(),
        estimated_usage: Usage {
            input_tokens: context.request.estimated_input_tokens,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            output_tokens: context.request.max_output_tokens.unwrap_or(0),
            reasoning_tokens: 0,
            estimated: true,
        },
        balance_picos: i64::try_from(balance).unwrap_or(if balance < 0 {
            i64::MIN
        } else {
            i64::MAX
        }),
    };
    let called = context
        .billing
        .call(|billing| {
            let request = &request;
            async move { billing.authorize(request).await }
        })
        .await?;
    called.try_map(|decision| {
        Ok::<_, BillingError>(match decision {
            Ok(hold) => Ok(hold.amount_picos),
            Err(BillingDenial::InsufficientBalance(message)) => {
                Err(BillingError::InsufficientBalance(message))
            }
            Err(BillingDenial::BudgetExceeded(message)) => {
                Err(BillingError::BudgetExceeded(message))
            }
            Err(BillingDenial::UnpricedModel(message)) => Err(BillingError::UnpricedModel(message)),
        })
    })
}

/// Prices a finished call. Never fails the request: the usage is recorded either way.
pub async fn charge(context: &RequestContext, usage: &Usage, outcome: CallOutcome) -> Priced {
    let request = ChargeRequest {
        request_id: context.request_id.clone(),
        tenant: context.caller.tenant.clone(),
        key_id: context.caller.key_id.clone(),
        operation: context.request.operation,
        model_asked: context.request.model.clone(),
        model_served: context.served_model.clone().unwrap_or_default(),
        channel: context.served_channel.clone().unwrap_or_default(),
        usage: *usage,
        latency_ms: context.elapsed_ms(),
        outcome,
    };
    let called = context
        .billing
        .call(|billing| {
            let request = &request;
            async move { billing.charge(request).await }
        })
        .await;
    let called = match called {
        Ok(called) => called,
        Err(error) => {
            return Priced {
                price: None,
                failure: Some(error.to_string()),
                trace: None,
            };
        }
    };
    match called.value {
        Ok(price) => Priced {
            price: Some(price),
            failure: None,
            trace: Some(called.trace),
        },
        Err(error) => Priced {
            price: None,
            failure: Some(format!("{error:?}")),
            trace: Some(called.trace),
        },
    }
}
