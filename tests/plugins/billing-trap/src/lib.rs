//! A billing plugin that allows every request (holding nothing) and panics when asked to price
//! one: the host must still record the usage, as unpriced, and reconcile must report it.

use tollgate_plugin_sdk::billing::{
    AuthorizeRequest, Billing, BillingDenial, BillingError, ChargeRequest, Hold, Price,
};
use tollgate_plugin_sdk::export_billing;

/// The hostile billing plugin.
struct ChargeTrap;

impl Billing for ChargeTrap {
    fn authorize(_request: AuthorizeRequest) -> Result<Hold, BillingDenial> {
        Ok(Hold { amount_picos: 0 })
    }

    fn charge(_request: ChargeRequest) -> Result<Price, BillingError> {
        panic!("this test plugin traps when pricing");
    }
}

export_billing!(ChargeTrap);
