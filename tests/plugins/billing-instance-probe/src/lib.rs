//! A billing plugin that tells which instance priced a call, for the test that a request's
//! `authorize` and `charge` share one instance and no two requests ever do. `authorize` refuses when
//! its instance already authorized another request; `charge` names, as its one line item, the
//! instance it runs on: `same-instance` (the one that authorized this request), `fresh-instance`
//! (a new one), or `another-request` (a leak).

use std::sync::Mutex;

use tollgate_plugin_sdk::billing::{
    AuthorizeRequest, Billing, BillingDenial, BillingError, ChargeRequest, Hold, LineItem, Price,
};
use tollgate_plugin_sdk::export_billing;

/// The request this instance authorized, if any.
static AUTHORIZED: Mutex<Option<String>> = Mutex::new(None);

/// The probe.
pub struct InstanceProbe;

impl Billing for InstanceProbe {
    fn authorize(request: AuthorizeRequest) -> Result<Hold, BillingDenial> {
        let mut authorized = AUTHORIZED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(earlier) = authorized.as_ref() {
            return Err(BillingDenial::BudgetExceeded(format!(
                "state leaked: this instance authorized request {earlier} before {}",
                request.request_id
            )));
        }
        *authorized = Some(request.request_id);
        Ok(Hold { amount_picos: 0 })
    }

    fn charge(request: ChargeRequest) -> Result<Price, BillingError> {
        let authorized = AUTHORIZED.lock().unwrap_or_else(|e| e.into_inner());
        let kind = match authorized.as_deref() {
            Some(id) if id == request.request_id => "same-instance",
            Some(_) => "another-request",
            None => "fresh-instance",
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
