//! Bill: the tenant's billing plugin authorizes a request before the upstream call and prices it
//! after. The plugin only computes amounts; record moves the money.
//!
//! In: the [`RequestContext`] (and, for `charge`, the final usage). Out: a [`Grant`] (the hold and
//! the output it covers), or a [`BillingError`] (`insufficient_quota` denials); after the call a
//! [`Priced`] result, never past the hold, and never an error: a pricing failure leaves the record
//! unpriced for reconciliation. Next: record.

use crate::config::ModelLimits;
use crate::plugin::Operation;
use crate::plugin::billing::{AuthorizeRequest, BillingDenial, CallOutcome, ChargeRequest, Price};
use crate::plugin::table::BindingTable;
use crate::plugin::table::{Called, Resolved};
use crate::plugin::translator::Usage;
use crate::plugin::{PluginError, Role};
use crate::request::ClientRequest;
use crate::stages::context::{Grant, RequestContext};
use crate::store::Store;
use crate::store::StoreError;
use crate::store::{HoldOutcome, HoldRequest, OpenedRequest};
use crate::tokens;

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
    /// What the plugin priced past the request's hold: the charge stops at the hold (`price`
    /// then says the hold, its line items what the plugin priced) and this is written off.
    pub written_off_picos: u64,
}

/// How often authorization is retried when concurrent requests keep changing the balance between
/// the plugin's decision and the hold.
const HOLD_ATTEMPTS: usize = 64;

/// Picos per micro-unit.
const PICOS_PER_MICRO: i128 = 1_000_000;

/// The margin on a tokenizer count that stands in for the byte bound near a tenant's floor: the
/// o200k count of the prompt's text times 3/2. Providers' own tokenizers count other numbers (up
/// to about a third more for Anthropic's on code and non-English text); what a provider reports
/// past the hold is written off, never charged past it.
const COUNTED_MARGIN: (u64, u64) = (3, 2);

/// Asks the billing plugin whether the request may go ahead and places its hold. The hold covers
/// a bound on the prompt and the client's output cap, or the model's output limit; the hold is
/// placed only if the available balance is still the one the plugin decided on (and the key's
/// daily spend cap, counting the holds in flight, has room), so concurrent requests can never
/// overdraw a balance or a cap together.
///
/// Near the floor, when the plugin refuses that: the prompt is counted with the tokenizer (plus
/// [`COUNTED_MARGIN`]) instead of bounded by its bytes, and a request without its own cap gets the
/// largest output the plugin allows, found by bisection (at most about 17 decisions), which flow
/// then puts in the upstream request. A request whose own cap does not fit is refused.
pub async fn authorize(
    store: &dyn Store,
    limits: ModelLimits,
    context: &mut RequestContext,
) -> Result<Grant, BillingError> {
    let chat = context.request.operation == Operation::Chat;
    let client_cap = context.request.max_output_tokens;
    let output_wanted = if chat {
        client_cap.unwrap_or(limits.max_output_tokens)
    } else {
        0
    };
    let within_context = |tokens: u64| {
        limits
            .max_input_tokens
            .map_or(tokens, |cap| tokens.min(cap))
    };
    let byte_bound = within_context(context.request.prompt_bound_tokens);
    let key_cap = context.caller.daily_spend_cap_micros.map(|cap| {
        (
            i128::from(cap) * PICOS_PER_MICRO,
            context.received_unix_ms / crate::store::MILLIS_PER_DAY,
        )
    });
    let hold_id = uuid::Uuid::new_v4().to_string();
    let mut counted_bound = None;
    let mut judge = Judge {
        context,
        available: 0,
        cap_room: None,
        traced: false,
    };
    for _ in 0..HOLD_ATTEMPTS {
        judge.available = store.available_picos(&judge.context.caller.tenant)?;
        judge.cap_room = match key_cap {
            Some((cap, day)) => {
                Some(cap - store.key_committed_picos(&judge.context.caller.key_id, day)?)
            }
            None => None,
        };
        let sized = match judge.verdict(byte_bound, output_wanted).await? {
            Verdict::Allowed(amount) => Sized {
                amount,
                output: output_wanted,
            },
            Verdict::Refused(refusal) => return Err(refusal),
            Verdict::Short(shortfall) => {
                let counted = *counted_bound.get_or_insert_with(|| {
                    within_context(counted_prompt_bound(&judge.context.request))
                });
                let can_shrink_output = chat && client_cap.is_none();
                judge
                    .fit(byte_bound.min(counted), output_wanted, can_shrink_output)
                    .await?
                    .ok_or(shortfall)?
            }
        };
        let placed = store.place_hold(&HoldRequest {
            tenant: &judge.context.caller.tenant,
            key_id: &judge.context.caller.key_id,
            hold_id: &hold_id,
            amount_picos: sized.amount,
            seen_available: judge.available,
            key_cap,
        })?;
        if placed == HoldOutcome::Placed {
            return Ok(Grant {
                hold_id,
                hold_picos: sized.amount,
                output_allowance: chat.then_some(sized.output),
                upstream_cap: (chat && sized.output < output_wanted).then_some(sized.output),
            });
        }
        tokio::task::yield_now().await;
    }
    Err(BillingError::Contended)
}

/// The prompt bound near a tenant's floor: the tokenizer's count of every string with
/// [`COUNTED_MARGIN`], media at their fixed bounds.
fn counted_prompt_bound(request: &ClientRequest) -> u64 {
    let Ok(body) = serde_json::from_str::<serde_json::Value>(&request.body) else {
        return request.prompt_bound_tokens;
    };
    let (times, per) = COUNTED_MARGIN;
    crate::request::prompt_bound(&body, &|text: &str| {
        (tokens::count(text) * times).div_ceil(per)
    })
}

/// A hold's size: its amount and the output tokens it covers.
struct Sized {
    amount: u64,
    output: u64,
}

/// What the plugin (and the key's cap) say to one estimate.
enum Verdict {
    /// Allowed, with the hold's amount in picos.
    Allowed(u64),
    /// Refused for want of balance or cap room: a smaller estimate may pass.
    Short(BillingError),
    /// Refused for another reason.
    Refused(BillingError),
}

/// Asks the billing plugin about estimates on one available balance.
struct Judge<'a> {
    context: &'a mut RequestContext,
    available: i128,
    /// What the key's daily spend cap has left, counting holds in flight.
    cap_room: Option<i128>,
    traced: bool,
}

impl Judge<'_> {
    async fn verdict(&mut self, prompt: u64, output: u64) -> Result<Verdict, BillingError> {
        let called = decide(self.context, self.available, prompt, output).await?;
        if !self.traced {
            self.context.plugins.push(called.trace);
            self.traced = true;
        }
        Ok(match called.value {
            Ok(amount) if self.cap_room.is_some_and(|room| i128::from(amount) > room) => {
                Verdict::Short(BillingError::BudgetExceeded(
                    "This key reached its daily spend cap; it resets at midnight UTC.".to_owned(),
                ))
            }
            Ok(amount) => Verdict::Allowed(amount),
            Err(shortfall @ BillingError::InsufficientBalance(_)) => Verdict::Short(shortfall),
            Err(refusal) => Verdict::Refused(refusal),
        })
    }

    /// The prompt with the whole output wanted, else (when it may shrink) the largest output the
    /// plugin allows with it; `None` when nothing fits.
    async fn fit(
        &mut self,
        prompt: u64,
        output_wanted: u64,
        can_shrink_output: bool,
    ) -> Result<Option<Sized>, BillingError> {
        match self.verdict(prompt, output_wanted).await? {
            Verdict::Allowed(amount) => {
                return Ok(Some(Sized {
                    amount,
                    output: output_wanted,
                }));
            }
            Verdict::Refused(refusal) => return Err(refusal),
            Verdict::Short(_) if !can_shrink_output => return Ok(None),
            Verdict::Short(_) => {}
        }
        // Bisection over [1, output_wanted): the plugin's amount grows with the output.
        let (mut allowed, mut refused) = (0, output_wanted);
        let mut best = None;
        while refused - allowed > 1 {
            let output = allowed + (refused - allowed) / 2;
            match self.verdict(prompt, output).await? {
                Verdict::Allowed(amount) => {
                    allowed = output;
                    best = Some(Sized { amount, output });
                }
                Verdict::Short(_) => refused = output,
                Verdict::Refused(refusal) => return Err(refusal),
            }
        }
        Ok(best)
    }
}

/// One authorization decision of the plugin on an estimate and an available balance. The outer
/// error is the plugin's failure, the inner one its refusal.
async fn decide(
    context: &RequestContext,
    available: i128,
    prompt_tokens: u64,
    output_tokens: u64,
) -> Result<Called<Result<u64, BillingError>>, BillingError> {
    let request = AuthorizeRequest {
        request_id: context.request_id.clone(),
        tenant: context.caller.tenant.clone(),
        key_id: context.caller.key_id.clone(),
        operation: context.request.operation,
        model: context.request.model.clone(),
        estimated_usage: estimate(prompt_tokens, output_tokens),
        balance_picos: plugin_balance(available),
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

/// The host's estimate of a request's usage, as `authorize` takes it.
fn estimate(prompt_tokens: u64, output_tokens: u64) -> Usage {
    Usage {
        input_tokens: prompt_tokens,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        output_tokens,
        reasoning_tokens: 0,
        estimated: true,
    }
}

/// A balance as the contract carries it (`s64` picos), saturated.
fn plugin_balance(picos: i128) -> i64 {
    i64::try_from(picos).unwrap_or(if picos < 0 { i64::MIN } else { i64::MAX })
}

/// Why a tenant's balance is below its floor (zero, or minus the credit its billing plugin grants),
/// or `None`. The host knows no floor: it asks the tenant's billing plugin to authorize an
/// embeddings request estimated at zero tokens on that balance, for each public model until the
/// plugin prices one; a refusal for want of balance means the balance is below the floor (the
/// convention every billing plugin keeps: a request that costs nothing is refused only there).
pub async fn below_floor(
    bindings: &BindingTable,
    tenant: &str,
    balance_picos: i128,
    models: &[String],
) -> Result<Option<String>, BillingError> {
    let billing = bindings.require(tenant, Role::Billing, None)?;
    for model in models {
        let request = AuthorizeRequest {
            request_id: String::new(),
            tenant: tenant.to_owned(),
            key_id: String::new(),
            operation: Operation::Embeddings,
            model: model.clone(),
            estimated_usage: estimate(0, 0),
            balance_picos: plugin_balance(balance_picos),
        };
        let called = billing
            .call(|billing| {
                let request = &request;
                async move { billing.authorize(request).await }
            })
            .await?;
        match called.value {
            Ok(_) => return Ok(None),
            Err(BillingDenial::InsufficientBalance(message)) => {
                return Ok(Some(format!(
                    "the billing plugin refuses even a request that costs nothing at this balance: {message}"
                )));
            }
            Err(BillingDenial::UnpricedModel(_) | BillingDenial::BudgetExceeded(_)) => {}
        }
    }
    Ok(None)
}

/// Prices a finished call, never past its hold. Never fails the request: the usage is recorded
/// either way.
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
    let hold = context.grant.as_ref().map(|grant| grant.hold_picos);
    within_hold(price(&context.billing, &request).await, hold)
}

/// Prices a request a stopped gateway left open (see `flow::recover`) as a cut call, never past
/// its hold.
pub async fn charge_recovered(billing: &Resolved, opened: &OpenedRequest, usage: &Usage) -> Priced {
    let request = ChargeRequest {
        request_id: opened.request_id.clone(),
        tenant: opened.tenant.clone(),
        key_id: opened.key_id.clone(),
        operation: if opened.operation == "embeddings" {
            Operation::Embeddings
        } else {
            Operation::Chat
        },
        model_asked: opened.model_asked.clone(),
        model_served: String::new(),
        channel: opened.channel.clone(),
        usage: *usage,
        latency_ms: 0,
        outcome: CallOutcome::Cut,
    };
    within_hold(price(billing, &request).await, Some(opened.hold_picos))
}

/// Stops a price at the hold, writing off the rest.
fn within_hold(mut priced: Priced, hold_picos: Option<u64>) -> Priced {
    if let (Some(price), Some(hold_picos)) = (priced.price.as_mut(), hold_picos)
        && price.amount_picos > hold_picos
    {
        priced.written_off_picos = price.amount_picos - hold_picos;
        price.amount_picos = hold_picos;
        tracing::warn!(
            written_off_picos = priced.written_off_picos,
            "the upstream's usage was priced past the hold; the excess is written off"
        );
    }
    priced
}

/// The billing plugin's price of a finished call.
async fn price(billing: &Resolved, request: &ChargeRequest) -> Priced {
    let called = billing
        .call(|billing| async move { billing.charge(request).await })
        .await;
    let called = match called {
        Ok(called) => called,
        Err(error) => {
            return Priced {
                failure: Some(error.to_string()),
                ..Priced::default()
            };
        }
    };
    match called.value {
        Ok(price) => Priced {
            price: Some(price),
            trace: Some(called.trace),
            ..Priced::default()
        },
        Err(error) => Priced {
            // The plugin's own error, not the stage's [`BillingError`].
            failure: Some(match error {
                crate::plugin::billing::BillingError::UnpricedModel(message) => {
                    format!("unpriced model: {message}")
                }
                crate::plugin::billing::BillingError::Internal(message) => {
                    format!("internal: {message}")
                }
            }),
            trace: Some(called.trace),
            ..Priced::default()
        },
    }
}
