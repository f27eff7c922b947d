//! A billing plugin that reports which instance its calls ran in (README.md): no request may find
//! another request's mark in its instance's memory.

use std::sync::Mutex;

use tollgate_plugin_sdk::billing::{
    AuthorizeRequest, Billing, BillingDenial, BillingError, ChargeRequest, Hold, LineItem, Price,
};
use tollgate_plugin_sdk::export_billing;

/// The request this instance served last.
static SERVED: Mutex<Option<String>> = Mutex::new(None);

/// Marks the instance as serving `request_id`; returns the request it served before, if any.
fn mark(request_id: &str) -> Option<String> {
    SERVED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .replace(request_id.to_owned())
}

/// The probe.
struct InstanceProbe;

impl Billing for InstanceProbe {
    fn authorize(request: AuthorizeRequest) -> Result<Hold, BillingDenial> {
        match mark(&request.request_id) {
            Some(other) if other != request.request_id => Err(BillingDenial::BudgetExceeded(
                format!("state leaked: this instance served request {other}"),
            )),
            _ => Ok(Hold { amount_picos: 0 }),
        }
    }

    fn charge(request: ChargeRequest) -> Result<Price, BillingError> {
        let kind = match mark(&request.request_id) {
            None => "fresh-instance",
            Some(earlier) if earlier == request.request_id => "same-instance",
            Some(other) => {
                return Err(BillingError::Internal(format!(
                    "state leaked: this instance served request {other}"
                )));
            }
        };
        Ok(Price {
            amount_picos: 0,
            line_items: vec![LineItem {
                kind: kind.to_owned(),
                tokens: 0,
                price_per_million_micros: 0,
                amount_picos: 0,
            }],
        })
    }
}

export_billing!(InstanceProbe);
