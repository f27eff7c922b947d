//! Bindings of `world billing-plugin` and the typed calls the bill stage makes.

use wasmtime::component::InstancePre;

use super::sandbox::{Kept, PluginState};
use super::{Binding, Exports, PluginError, Role, sandbox};

wasmtime::component::bindgen!({
    world: "billing-plugin",
    path: "../wit",
    exports: { default: async },
    with: {
        "tollgate:plugin/host": super::router::tollgate::plugin::host,
        "tollgate:plugin/types": super::router::tollgate::plugin::types,
    },
});

use exports::tollgate::plugin::billing::GuestIndices;
pub use exports::tollgate::plugin::billing::{
    AuthorizeRequest, BillingDenial, BillingError, CallOutcome, ChargeRequest, Hold, Price,
};

/// A billing plugin's export, found once at load.
pub(super) struct BillingExports {
    pre: InstancePre<PluginState>,
    billing: GuestIndices,
}

impl BillingExports {
    /// Finds the `billing` export of a component.
    pub(super) fn new(pre: InstancePre<PluginState>) -> wasmtime::Result<Self> {
        let billing = GuestIndices::new(&pre)?;
        Ok(Self { pre, billing })
    }
}

impl Binding {
    fn billing_exports(&self) -> Result<&BillingExports, PluginError> {
        match &self.compiled.exports {
            Exports::Billing(exports) => Ok(exports),
            _ => Err(self.wrong_role(Role::Billing)),
        }
    }

    /// Asks the billing plugin whether the request may go ahead and what to hold, on the instance
    /// the request keeps of it.
    pub async fn authorize(
        &self,
        request: &AuthorizeRequest,
        kept: &Kept,
    ) -> Result<Result<Hold, BillingDenial>, PluginError> {
        let exports = self.billing_exports()?;
        self.call_kept(
            kept,
            &exports.pre,
            "authorize",
            async |store, instance| {
                exports
                    .billing
                    .load(&mut *store, instance)?
                    .call_authorize(&mut *store, request)
                    .await
            },
            |_| 0,
        )
        .await
    }

    /// Asks the billing plugin to price a finished call, on the instance the request keeps of it.
    pub async fn charge(
        &self,
        request: &ChargeRequest,
        kept: &Kept,
    ) -> Result<Result<Price, BillingError>, PluginError> {
        let exports = self.billing_exports()?;
        self.call_kept(
            kept,
            &exports.pre,
            "charge",
            async |store, instance| {
                exports
                    .billing
                    .load(&mut *store, instance)?
                    .call_charge(&mut *store, request)
                    .await
            },
            // Each line item is stored with the usage record: its text and three numbers.
            |price| {
                price.as_ref().map_or(0, |price| {
                    price
                        .line_items
                        .iter()
                        .map(|item| item.kind.len() + 24)
                        .sum()
                })
            },
        )
        .await
    }

    pub(super) async fn billing_validate_config(&self) -> Result<Result<(), String>, PluginError> {
        let exports = self.billing_exports()?;
        let mut store = self.store();
        sandbox::bounded(&mut store, "validate-config", async |store| {
            let instance = exports.pre.instantiate_async(&mut *store).await?;
            exports
                .billing
                .load(&mut *store, &instance)?
                .call_validate_config(&mut *store, &self.config)
                .await
        })
        .await
    }
}
